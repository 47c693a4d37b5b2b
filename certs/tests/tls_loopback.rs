//! The TLS profile and verifiers over real sockets on loopback.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pinhole_certs::tls::{self, Anonymous, key_refused};
use pinhole_certs::{
    CertificateAuthority, GatewayClientVerifier, Identity, KeyRefused, PinnedServerVerifier,
    RevocationList, TofuOutcome, TofuServerVerifier, TofuStore, Validity,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Revoked(Mutex<Vec<Vec<u8>>>);

impl RevocationList for Revoked {
    fn is_revoked(&self, serial: &[u8]) -> bool {
        self.0.lock().expect("lock").iter().any(|s| s == serial)
    }
}

/// What the server saw of one connection.
#[derive(Debug)]
struct ServerSide {
    handshake: Result<(), String>,
    received: Vec<u8>,
    peer_name: Option<String>,
}

/// Serves one TLS connection: completes the handshake, reads until EOF, answers "pong".
async fn serve_once(
    listener: TcpListener,
    server: &Identity,
    ca: &CertificateAuthority,
    revoked: Arc<Revoked>,
) -> ServerSide {
    serve_once_with(listener, server, ca, revoked, Anonymous::Refuse).await
}

async fn serve_once_with(
    listener: TcpListener,
    server: &Identity,
    ca: &CertificateAuthority,
    revoked: Arc<Revoked>,
    anonymous: Anonymous,
) -> ServerSide {
    let verifier =
        GatewayClientVerifier::new(ca.certificate(), revoked, anonymous).expect("verifier");
    let config = tls::server_config(server, verifier).expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tcp, _) = listener.accept().await.expect("accept");
    match acceptor.accept(tcp).await {
        Err(e) => ServerSide {
            handshake: Err(e.to_string()),
            received: Vec::new(),
            peer_name: None,
        },
        Ok(mut stream) => {
            let peer_name = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| pinhole_certs::PeerIdentity::from_certificate(c).ok())
                .map(|p| p.name);
            let mut received = vec![0u8; 4];
            let read = stream.read_exact(&mut received).await;
            if read.is_err() {
                received.clear();
            } else {
                let _ = stream.write_all(b"pong").await;
                let _ = stream.shutdown().await;
            }
            ServerSide {
                handshake: Ok(()),
                received,
                peer_name,
            }
        }
    }
}

/// Connects as a client, sends "ping", expects "pong".
async fn client(
    addr: std::net::SocketAddr,
    identity: &Identity,
    verifier: Arc<dyn ServerCertVerifier>,
) -> std::io::Result<Vec<u8>> {
    let config = tls::client_config(identity, verifier).expect("client config");
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let mut stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(tls::ALPN));
    stream.write_all(b"ping").await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    Ok(reply)
}

async fn run(
    server: &Identity,
    ca: &CertificateAuthority,
    revoked: Arc<Revoked>,
    identity: &Identity,
    verifier: Arc<dyn ServerCertVerifier>,
) -> (ServerSide, std::io::Result<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (server_side, client_side) = tokio::time::timeout(TIMEOUT, async {
        tokio::join!(
            serve_once(listener, server, ca, revoked),
            client(addr, identity, verifier)
        )
    })
    .await
    .expect("no hang");
    (server_side, client_side)
}

#[tokio::test]
async fn pinned_client_reaches_the_right_gateway() {
    let w = common::World::new();
    let tech = w.technician("alice");
    let (server, client) = run(
        &w.server,
        &w.ca,
        Arc::default(),
        &tech,
        PinnedServerVerifier::new(w.info.pin()),
    )
    .await;
    assert_eq!(client.expect("client"), b"pong");
    assert_eq!(server.handshake, Ok(()));
    assert_eq!(server.received, b"ping");
    assert_eq!(server.peer_name.as_deref(), Some("alice"));
}

#[tokio::test]
async fn pinned_client_refuses_another_key_before_sending_anything() {
    let w = common::World::new();
    let tech = w.technician("alice");
    // Same CA, same names: only the key differs.
    let impostor =
        w.ca.issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            Validity::days_from_now(30),
        )
        .expect("impostor");
    let (server, client) = run(
        &impostor,
        &w.ca,
        Arc::default(),
        &tech,
        PinnedServerVerifier::new(w.info.pin()),
    )
    .await;
    let err = client.expect_err("must refuse");
    assert!(
        matches!(key_refused(&err), Some(KeyRefused::PinMismatch { .. })),
        "{err}"
    );
    assert!(
        server.received.is_empty(),
        "no application byte reached the impostor"
    );
    assert!(
        server.handshake.is_err(),
        "the impostor's handshake failed: {server:?}"
    );
}

#[tokio::test]
async fn tofu_records_first_key_survives_restart_and_refuses_another() {
    let w = common::World::new();
    let dir = tempfile::tempdir().expect("dir");
    let pin_path = dir.path().join("gateway.pin");
    let (site_key, spki) = pinhole_certs::ca::generate_site_key().expect("site key");
    let site_cert =
        w.ca.issue_site("plant-a", &spki, Validity::days_from_now(30))
            .expect("site cert");
    let site = Identity::from_parts(site_key, vec![site_cert, w.ca.certificate().clone()])
        .expect("identity");

    // First use: accepted, and recorded once the handshake completed.
    let store = TofuStore::new(&pin_path);
    let (server, client) = run(
        &w.server,
        &w.ca,
        Arc::default(),
        &site,
        TofuServerVerifier::new(store.clone()),
    )
    .await;
    assert_eq!(client.expect("first"), b"pong");
    assert_eq!(server.peer_name.as_deref(), Some("plant-a"));
    assert_eq!(
        store.confirm(w.server.certificate()).expect("confirm"),
        TofuOutcome::Recorded(w.info.pin())
    );

    // "Restart": a new store object reads the file.
    let store = TofuStore::new(&pin_path);
    assert_eq!(store.pinned().expect("read"), Some(w.info.pin()));
    let (_, client) = run(
        &w.server,
        &w.ca,
        Arc::default(),
        &site,
        TofuServerVerifier::new(store.clone()),
    )
    .await;
    assert_eq!(client.expect("same gateway"), b"pong");

    // Another key at the same address is refused, and the pin is unchanged.
    let other =
        w.ca.issue_server(&["localhost".into()], Validity::days_from_now(30))
            .expect("other");
    let (server, client) = run(
        &other,
        &w.ca,
        Arc::default(),
        &site,
        TofuServerVerifier::new(store.clone()),
    )
    .await;
    let err = client.expect_err("refused");
    assert!(
        matches!(key_refused(&err), Some(KeyRefused::PinMismatch { .. })),
        "{err}"
    );
    assert!(server.received.is_empty());
    assert_eq!(store.pinned().expect("read"), Some(w.info.pin()));

    // After an operator repins, the new gateway is trusted on first use.
    assert!(store.forget().expect("forget"));
    let (_, client) = run(
        &other,
        &w.ca,
        Arc::default(),
        &site,
        TofuServerVerifier::new(store.clone()),
    )
    .await;
    assert_eq!(client.expect("after repin"), b"pong");
}

async fn expect_gateway_refuses(w: &common::World, revoked: Arc<Revoked>, identity: &Identity) {
    let (server, client) = run(
        &w.server,
        &w.ca,
        revoked,
        identity,
        PinnedServerVerifier::new(w.info.pin()),
    )
    .await;
    assert!(server.handshake.is_err(), "gateway accepted: {server:?}");
    assert!(server.received.is_empty());
    // In TLS 1.3 the client may finish its side before the server's verdict arrives, but it
    // never gets an answer.
    assert!(client.map(|reply| reply.is_empty()).unwrap_or(true));
}

#[tokio::test]
async fn gateway_refuses_a_foreign_ca() {
    let w = common::World::new();
    let foreign = common::World::new();
    expect_gateway_refuses(
        &w,
        Arc::default(),
        &foreign
            .ca
            .issue_technician("mallory", &w.info, Validity::days_from_now(30))
            .expect("foreign"),
    )
    .await;
}

#[tokio::test]
async fn gateway_refuses_an_expired_certificate() {
    let w = common::World::new();
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    expect_gateway_refuses(
        &w,
        Arc::default(),
        &w.ca
            .issue_technician("alice", &w.info, expired)
            .expect("expired"),
    )
    .await;
}

#[tokio::test]
async fn gateway_refuses_a_revoked_certificate() {
    let w = common::World::new();
    let tech = w.technician("alice");
    let revoked = Arc::new(Revoked::default());
    let (_, ok) = run(
        &w.server,
        &w.ca,
        revoked.clone(),
        &tech,
        PinnedServerVerifier::new(w.info.pin()),
    )
    .await;
    assert_eq!(ok.expect("before revocation"), b"pong");
    let serial = pinhole_certs::PeerIdentity::from_certificate(tech.certificate())
        .expect("peer")
        .serial;
    revoked.0.lock().expect("lock").push(serial);
    expect_gateway_refuses(&w, revoked, &tech).await;
}

#[tokio::test]
async fn gateway_refuses_a_certificate_without_client_auth() {
    let w = common::World::new();
    // A server certificate from the right CA: right chain, wrong purpose.
    let server_cert =
        w.ca.issue_server(&["localhost".into()], Validity::days_from_now(30))
            .expect("server cert");
    expect_gateway_refuses(&w, Arc::default(), &server_cert).await;
}

/// Runs `openssl s_client` against a gateway on loopback and returns its output.
async fn s_client(w: &common::World, args: &[&str]) -> (ServerSide, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn({
        let server = Identity::from_parts(
            zeroize::Zeroizing::new(w.server.key_pkcs8().to_vec()),
            w.server.chain().to_vec(),
        )
        .expect("identity");
        let ca = CertificateAuthority::from_pem(&w.ca.cert_pem(), &w.ca.key_pem()).expect("ca");
        async move { serve_once(listener, &server, &ca, Arc::default()).await }
    });
    let connect = addr.to_string();
    let mut full: Vec<&str> = vec!["s_client", "-connect", &connect, "-ign_eof"];
    full.extend_from_slice(args);
    let mut child = tokio::process::Command::new("openssl")
        .args(&full)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"ping").await;
    }
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .expect("no hang")
        .expect("openssl ran");
    let server = tokio::time::timeout(TIMEOUT, server)
        .await
        .expect("no hang")
        .expect("joined");
    (
        server,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let w = common::World::new();
    let (server, text) = s_client(&w, &["-tls1_2"]).await;
    assert!(server.handshake.is_err(), "{server:?}\n{text}");
    assert!(server.received.is_empty());
    assert!(
        text.contains("alert")
            || text.contains("no protocols available")
            || text.contains("wrong version"),
        "{text}"
    );
}

#[tokio::test]
async fn openssl_client_negotiates_tls13_aes_gcm_and_a_nist_group() {
    let w = common::World::new();
    let dir = tempfile::tempdir().expect("dir");
    let tech = w.technician("alice");
    std::fs::write(dir.path().join("t.key"), tech.key_pem().as_bytes()).expect("key");
    std::fs::write(
        dir.path().join("t.crt"),
        pinhole_certs::ca::pem_encode("CERTIFICATE", tech.certificate()),
    )
    .expect("crt");
    let key = dir.path().join("t.key");
    let crt = dir.path().join("t.crt");
    let (server, text) = s_client(
        &w,
        &[
            "-cert",
            crt.to_str().expect("utf8"),
            "-key",
            key.to_str().expect("utf8"),
            "-alpn",
            "pinhole/1",
            "-brief",
        ],
    )
    .await;
    assert_eq!(server.handshake, Ok(()), "{text}");
    assert_eq!(server.received, b"ping");
    assert!(text.contains("Protocol version: TLSv1.3"), "{text}");
    assert!(
        text.contains("Ciphersuite: TLS_AES_256_GCM_SHA384"),
        "{text}"
    );
    // OpenSSL 3.0 has no ML-KEM: the server falls back to P-256.
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
    // An offer with ChaCha20 only finds no common suite.
    let (server, text) = s_client(&w, &["-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"]).await;
    assert!(server.handshake.is_err(), "{text}");
}

#[tokio::test]
async fn enrollment_mode_admits_no_certificate_but_still_refuses_a_bad_one() {
    let w = common::World::new();
    // No certificate at all: admitted (the protocol then allows enrollment only).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config =
        tls::enrollment_client_config(PinnedServerVerifier::new(w.info.pin())).expect("config");
    let connector = TlsConnector::from(Arc::new(config));
    let (server, anon) = tokio::join!(
        serve_once_with(
            listener,
            &w.server,
            &w.ca,
            Arc::default(),
            Anonymous::AllowEnrollment
        ),
        async {
            let tcp = TcpStream::connect(addr).await?;
            let mut s = connector
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await?;
            s.write_all(b"ping").await?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        }
    );
    assert_eq!(anon.expect("anonymous"), b"pong");
    assert_eq!(server.peer_name, None);
    // A certificate from a foreign CA is not downgraded to anonymous: it is refused.
    let foreign = common::World::new();
    let mallory = foreign
        .ca
        .issue_technician("mallory", &w.info, Validity::days_from_now(30))
        .expect("foreign");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (server, refused) = tokio::join!(
        serve_once_with(
            listener,
            &w.server,
            &w.ca,
            Arc::default(),
            Anonymous::AllowEnrollment
        ),
        client(addr, &mallory, PinnedServerVerifier::new(w.info.pin()))
    );
    assert!(server.handshake.is_err(), "{server:?}");
    assert!(refused.map(|r| r.is_empty()).unwrap_or(true));
}

/// A resumed handshake skips the client certificate's revocation and validity checks: the
/// gateway must run a full handshake every time, even for a client that kept a ticket.
#[tokio::test]
async fn the_gateway_never_resumes_a_session() {
    let w = common::World::new();
    let tech = w.technician("alice");
    let verifier = GatewayClientVerifier::new(
        w.ca.certificate(),
        Arc::<Revoked>::default(),
        Anonymous::Refuse,
    )
    .expect("verifier");
    let acceptor = TlsAcceptor::from(Arc::new(
        tls::server_config(&w.server, verifier).expect("server config"),
    ));
    // One client configuration, and so one resumption store, for both connections.
    let connector = TlsConnector::from(Arc::new(
        tls::client_config(&tech, PinnedServerVerifier::new(w.info.pin())).expect("client"),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");

    let server = async move {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut stream = acceptor.accept(tcp).await.expect("server handshake");
            kinds.push(stream.get_ref().1.handshake_kind());
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.expect("ping");
            stream.write_all(b"pong").await.expect("pong");
            stream.shutdown().await.expect("shutdown");
        }
        kinds
    };
    let client = async move {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut stream = connector
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("client handshake");
            stream.write_all(b"ping").await.expect("ping");
            // Reading to the end also takes in any ticket the server sent.
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).await.expect("pong");
            assert_eq!(reply, b"pong");
            kinds.push(stream.get_ref().1.handshake_kind());
        }
        kinds
    };
    let (server, client) = tokio::time::timeout(TIMEOUT, async { tokio::join!(server, client) })
        .await
        .expect("no hang");
    let full = Some(rustls::HandshakeKind::Full);
    assert_eq!(client, [full, full], "client side");
    assert_eq!(server, [full, full], "server side");
}
