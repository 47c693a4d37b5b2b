//! The portal's HTTPS listener: TLS 1.3 (rustls, the gateway's aws-lc-rs provider) with the
//! gateway's server certificate or one the operator supplies, HTTP/1.1.
//!
//! Every connection runs in its own task, bounded in number (in all and per source address)
//! and in time (the TLS handshake, and the HTTP request headers, which also bound a
//! kept-alive connection's idling), so a peer that opens many connections or sends its
//! request a byte at a time (slowloris) holds neither the accept loop nor more than its share.
//! A request's body and handling are bounded by the router's deadline
//! ([`crate::portal::router`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
#[cfg(test)]
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// An administrator's browser finishes a handshake in well under a second.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors building the portal's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum PortalTlsError {
    #[error("reading {path}: {source}")]
    Pem {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The TLS configuration for `chain` (leaf first) and its key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, PortalTlsError> {
    let mut c = ServerConfig::builder_with_provider(pinhole_certs::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// An operator's certificate chain and key, PEM files.
pub fn load_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PortalTlsError> {
    let pem_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| PortalTlsError::Pem { path, source }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert))?;
    if chain.is_empty() {
        return Err(PortalTlsError::NoCertificate(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
    Ok((chain, key))
}

/// Bounds on the portal's connections: a peer that opens many, or sends its request a byte at
/// a time (slowloris), holds a bounded share and for a bounded time.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// To finish the TLS handshake.
    pub handshake: Duration,
    /// To send a request's headers, and the most a kept-alive connection idles.
    pub header: Duration,
    /// Connections at once from one source address.
    pub per_source: usize,
    /// Connections at once in all; more wait in the kernel's backlog.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: HANDSHAKE_TIMEOUT,
            // A browser sends its headers in one packet; 10 s allows for a slow link.
            header: Duration::from_secs(10),
            // A browser opens about six connections per origin; an administrator behind a
            // NAT shares the address with a colleague or two.
            per_source: 16,
            connections: 256,
        }
    }
}

/// The portal's TCP listener and TLS configuration.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    local: SocketAddr,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        Ok(Self {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves `app` (with each peer's address as [`axum::extract::ConnectInfo`]) until the
    /// task is dropped. Each connection runs in its own task: TLS handshake within
    /// [`Limits::handshake`], then HTTP/1.1 with [`Limits::header`] to send each request's
    /// headers (and as the idle limit between requests).
    pub async fn serve(self, app: Router, limits: Limits) {
        let all = Arc::new(Semaphore::new(limits.connections.max(1)));
        let sources = Arc::new(Mutex::new(HashMap::new()));
        loop {
            let Ok(permit) = all.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "portal: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = SourceSlot::take(&sources, peer.ip(), limits.per_source) else {
                tracing::debug!(
                    per_source = limits.per_source,
                    "portal: connection refused: too many from one source"
                );
                continue;
            };
            let acceptor = self.acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let _held = (permit, slot);
                let tls =
                    match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "portal: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("portal: TLS handshake timed out");
                            return;
                        }
                    };
                let app = app.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
                let service = hyper_util::service::TowerToHyperService::new(app);
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(error = %e, "portal: connection ended");
                }
            });
        }
    }
}

/// One connection's place in the per-source count; gives it back when dropped.
struct SourceSlot {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut map = sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            sources: sources.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use pinhole_certs::ca::{CertificateAuthority, Validity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Server {
        addr: SocketAddr,
        client: tokio_rustls::TlsConnector,
        _task: tokio::task::JoinHandle<()>,
    }

    async fn server(limits: Limits) -> Server {
        let ca = CertificateAuthority::generate("test").expect("ca");
        let id = ca
            .issue_server(&["localhost".into()], Validity::days_from_now(1))
            .expect("server");
        let config = server_config(id.chain().to_vec(), id.private_key()).expect("config");
        let l = TlsListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config)
            .await
            .expect("bind");
        let addr = l.local_addr();
        let app = Router::new().route(
            "/",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        );
        let task = tokio::spawn(l.serve(app, limits));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.certificate().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(pinhole_certs::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Server {
            addr,
            client: tokio_rustls::TlsConnector::from(Arc::new(client)),
            _task: task,
        }
    }

    impl Server {
        async fn tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
            let tcp = TcpStream::connect(self.addr).await.expect("connect");
            self.client
                .connect("localhost".try_into().expect("name"), tcp)
                .await
                .expect("handshake")
        }
    }

    /// Reads until the server closes; how long that took, or `None` within `limit`.
    async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
        s: &mut S,
        limit: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf))
                .await
            {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    fn quick() -> Limits {
        Limits {
            handshake: Duration::from_secs(1),
            header: Duration::from_secs(1),
            per_source: 3,
            connections: 16,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_gets_its_answer_with_the_peer_address() {
        let s = server(quick()).await;
        let mut c = s.tls().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.ok();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("127.0.0.1"), "{out}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_peer_that_never_finishes_its_headers_is_cut_off() {
        let s = server(quick()).await;
        let mut c = s.tls().await;
        // Slowloris: a header line, then another now and then, never the blank line.
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .expect("write");
        let took = closed_within(&mut c, Duration::from_secs(5)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(3)),
            "the connection stayed open: {took:?}"
        );
        // A kept-alive connection that idles goes the same way.
        let mut c = s.tls().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let took = closed_within(&mut c, Duration::from_secs(5)).await;
        assert!(took.is_some_and(|t| t < Duration::from_secs(3)), "{took:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connections_per_source_are_bounded_and_a_handshake_is_timed() {
        let s = server(quick()).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(s.addr).await.expect("connect"));
        }
        // Give the accept loop time to count them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = TcpStream::connect(s.addr).await.expect("connect");
        let took = closed_within(&mut extra, Duration::from_millis(800)).await;
        assert!(
            took.is_some(),
            "a fourth connection from one source is refused at once"
        );
        // Those that never start a handshake are closed after the handshake limit, and the
        // source may connect again.
        for h in &mut held {
            let took = closed_within(h, Duration::from_secs(3)).await;
            assert!(took.is_some(), "an idle handshake is cut off");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = s.tls().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.ok();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
}
