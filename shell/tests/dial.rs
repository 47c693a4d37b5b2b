//! The dial over real sockets and real TLS on loopback: an address that does not answer, one
//! that does, the preference for the one that worked, and a refusal in words.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pinhole_certs::tls::{self, Anonymous};
use pinhole_certs::{
    CertificateAuthority, GatewayClientVerifier, GatewayInfo, Identity, Pin, PinnedServerVerifier,
    RevocationList, Validity,
};
use pinhole_shell::{DialError, Dialer, Refused};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Default)]
struct Revoked(Mutex<Vec<Vec<u8>>>);

impl RevocationList for Revoked {
    fn is_revoked(&self, serial: &[u8]) -> bool {
        self.0.lock().expect("lock").iter().any(|s| s == serial)
    }
}

struct Gateway {
    acceptor: TlsAcceptor,
    pin: Pin,
    revoked: Arc<Revoked>,
    ca: CertificateAuthority,
}

impl Gateway {
    fn new() -> Self {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let server = ca
            .issue_server(&["127.0.0.1".into()], Validity::days_from_now(30))
            .expect("server");
        let revoked = Arc::new(Revoked::default());
        let verifier =
            GatewayClientVerifier::new(ca.certificate(), revoked.clone(), Anonymous::Refuse)
                .expect("verifier");
        let config = tls::server_config(&server, verifier).expect("server config");
        Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            pin: Pin::of_certificate(server.certificate()).expect("pin"),
            revoked,
            ca,
        }
    }

    fn technician(&self) -> Identity {
        let info =
            GatewayInfo::new(vec!["127.0.0.1:443".parse().expect("addr")], self.pin).expect("info");
        self.ca
            .issue_technician("alice", &info, Validity::days_from_now(30))
            .expect("technician")
    }

    /// Accepts TLS connections on `listener` forever; each is held open until the peer goes.
    fn serve(&self, listener: TcpListener) {
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut s) = acceptor.accept(tcp).await {
                        let mut b = [0u8; 16];
                        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
                    }
                });
            }
        });
    }
}

/// A loopback port where nothing listens: the connection is refused at once.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn the_next_address_is_tried_and_the_one_that_worked_goes_first_next_time() {
    let gw = Gateway::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let open = listener.local_addr().expect("addr").port();
    gw.serve(listener);
    let closed = closed_port().await;
    let alice = gw.technician();
    let config = Arc::new(
        tls::client_config(&alice, PinnedServerVerifier::new(gw.pin)).expect("client config"),
    );
    let mut dialer = Dialer::new(vec![
        format!("127.0.0.1:{closed}").parse().expect("addr"),
        format!("127.0.0.1:{open}").parse().expect("addr"),
    ]);
    let first = dialer.dial(config.clone()).await.expect("second address");
    assert_eq!(first.address.port(), open);
    assert_eq!(first.failed.len(), 1);
    assert_eq!(first.failed[0].address.port(), closed);
    let again = dialer.dial(config).await.expect("dial again");
    assert_eq!(again.address.port(), open);
    assert!(again.failed.is_empty(), "{:?}", again.failed);
}

#[tokio::test]
async fn a_revoked_certificate_stops_the_dial_with_the_reason() {
    let gw = Gateway::new();
    let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (p1, p2) = (
        l1.local_addr().expect("addr").port(),
        l2.local_addr().expect("addr").port(),
    );
    gw.serve(l1);
    gw.serve(l2);
    let alice = gw.technician();
    let serial = pinhole_certs::PeerIdentity::from_certificate(alice.certificate())
        .expect("identity")
        .serial;
    gw.revoked.0.lock().expect("lock").push(serial);
    let config = Arc::new(
        tls::client_config(&alice, PinnedServerVerifier::new(gw.pin)).expect("client config"),
    );
    let mut dialer = Dialer::new(vec![
        format!("127.0.0.1:{p1}").parse().expect("addr"),
        format!("127.0.0.1:{p2}").parse().expect("addr"),
    ]);
    // TLS 1.3: the client's handshake is done before the gateway has checked its certificate,
    // so the refusal arrives as an alert on the first read (where the link driver reads it).
    let t = Instant::now();
    let refused = match dialer.dial(config).await {
        Err(DialError::Refused(r)) => r,
        Ok(mut d) => {
            let mut b = [0u8; 16];
            let e = tokio::io::AsyncReadExt::read(&mut d.stream, &mut b)
                .await
                .expect_err("refused");
            pinhole_shell::refusal(&e).expect("a refusal")
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(refused, Refused::Revoked);
    assert_eq!(
        refused.to_string(),
        "the gateway refused this certificate: it was revoked"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_gateway_with_another_key_is_refused_as_such() {
    let gw = Gateway::new();
    let other = Gateway::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    other.serve(listener);
    let alice = gw.technician();
    let config = Arc::new(
        tls::client_config(&alice, PinnedServerVerifier::new(gw.pin)).expect("client config"),
    );
    let mut dialer = Dialer::new(vec![format!("127.0.0.1:{port}").parse().expect("addr")]);
    match dialer.dial(config).await {
        Err(DialError::Refused(Refused::Key(_))) => {}
        other => panic!("{other:?}"),
    }
}
