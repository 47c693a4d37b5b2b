//! The portal's HTTPS listener: TLS 1.3 (rustls, the gateway's aws-lc-rs provider) with the
//! gateway's server certificate or one the operator supplies, HTTP/1.1.
//!
//! Handshakes run in their own tasks, bounded in number and time, so a peer that never
//! finishes one holds neither the accept loop nor more than its own slot.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// An administrator's browser finishes a handshake in well under a second.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const HANDSHAKES: usize = 64;

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

/// Accepted, handshaken connections, for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Binds `addr` and starts accepting.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, rx) = mpsc::channel(HANDSHAKES);
        let slots = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "portal: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "portal: TLS handshake failed"),
                        Err(_) => tracing::debug!("portal: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop ended: nothing will come again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
