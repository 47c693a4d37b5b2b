//! One dial to the gateway for every peer: TCP to each address in order, with a short connect
//! timeout, the link's socket options, then the TLS handshake; the address that worked is
//! tried first next time.
//!
//! A gateway publishes several addresses, typically the same host on 443 and 11444: a plant or
//! office network that blocks one port usually drops its packets rather than refusing them, so
//! each address gets [`CONNECT_TIMEOUT`] before the next is tried, and once one worked the next
//! dial starts there instead of waiting on the blocked one again.
//!
//! Through a corporate proxy ([`Dialer::through`]) each address is reached by an HTTP CONNECT
//! tunnel ([`crate::proxy`]) and the TLS runs inside it, pinned as on a direct connection. A
//! proxy that answers the handshake with a certificate of its own (TLS inspection) is named as
//! such ([`DialError::Intercepted`]) and never trusted.
//!
//! A handshake the gateway refused (a revoked or expired certificate, a key that does not match
//! the pin) is not an unreachable gateway: the dial stops and says why in a [`Refused`], which
//! the program turns into words for its user. Trying the other addresses would only repeat the
//! refusal.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::{self, Proxy, ProxyError};
use pinhole_certs::tls::key_refused;
use pinhole_certs::{GatewayAddress, KeyRefused};
use rustls::AlertDescription;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

/// The TLS link to the gateway.
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TCP connect to one address must finish this soon, or the next address is tried. A port
/// blocked by a firewall that drops packets leaves the SYN unanswered; the kernel resends it
/// after 1 s and 3 s, so 4 s gives three SYNs on a lossy uplink without a long wait before
/// the next port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// Through a proxy, the CONNECT exchange (TCP to the proxy, the proxy's own connect to the
/// gateway, an NTLM round trip) must finish this soon, or the next address is tried.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(8);

/// The TLS handshake after the connect must finish this soon (one round trip and the
/// certificate checks; the gateway itself gives a peer 5 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gateway refused this peer, or this peer refused the gateway. Retrying the same
/// dial cannot help; a person must act.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The gateway's key is not the pinned one (possible interception).
    #[error("{0}")]
    Key(KeyRefused),
    /// The gateway refused the certificate: revoked (an account closed, a site removed).
    #[error("the gateway refused this certificate: it was revoked")]
    Revoked,
    /// The gateway refused the certificate: expired.
    #[error("the gateway refused this certificate: it has expired")]
    Expired,
    /// The gateway refused the certificate for another reason (the TLS alert it sent).
    #[error("the gateway refused this certificate ({0:?})")]
    Certificate(AlertDescription),
}

/// The refusal behind an I/O error of a handshake or a link, if that is what it was: a
/// verifier's verdict on the gateway's key, or a TLS alert from the gateway.
pub fn refusal(err: &io::Error) -> Option<Refused> {
    if let Some(k) = key_refused(err) {
        return Some(Refused::Key(k));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = err.get_ref().map(|e| e as _);
    while let Some(e) = source {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            return Some(match alert {
                AlertDescription::CertificateRevoked => Refused::Revoked,
                AlertDescription::CertificateExpired => Refused::Expired,
                other => Refused::Certificate(*other),
            });
        }
        source = e.source();
    }
    None
}

/// Why one address did not give a link.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("no TCP connection within {}s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("{0}")]
    Connect(io::Error),
    #[error("no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout,
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    #[error("not a valid TLS server name")]
    Name,
    #[error("{0}")]
    Proxy(ProxyError),
}

/// One address tried, and why it failed.
#[derive(Debug)]
pub struct Attempt {
    pub address: GatewayAddress,
    pub error: AttemptError,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.address, self.error)
    }
}

/// Why a dial gave no link.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A handshake was refused; the other addresses were not tried.
    #[error("{0}")]
    Refused(Refused),
    /// Every address failed (timed out, refused the connection, broke the handshake).
    #[error("gateway unreachable (tried {})", list(.0))]
    Unreachable(Vec<Attempt>),
    /// The proxy refused us whatever the address (unreachable, credentials, a scheme we do
    /// not speak, not HTTP): the other addresses were not tried.
    #[error("{0}")]
    Proxy(ProxyError),
    /// Through a proxy, the certificate that answered is not the gateway's: the proxy
    /// inspects TLS with a certificate of its own. Nothing was sent.
    #[error(
        "the proxy {proxy} intercepts TLS: it answered with a certificate of its own instead of \
         the gateway's ({key}); refused, nothing was sent. Ask the network's administrators to \
         exempt the gateway from TLS inspection"
    )]
    Intercepted { proxy: String, key: KeyRefused },
}

fn list(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "no address".into();
    }
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A link that came up.
#[derive(Debug)]
pub struct Dialed {
    pub stream: Stream,
    /// The address that answered.
    pub address: GatewayAddress,
    /// The addresses tried before it, and why they failed.
    pub failed: Vec<Attempt>,
}

/// The gateway's addresses and which of them worked last.
#[derive(Debug, Clone)]
pub struct Dialer {
    addresses: Vec<GatewayAddress>,
    source: Option<IpAddr>,
    preferred: Option<GatewayAddress>,
    proxy: Option<Proxy>,
}

/// Whether a proxy's refusal concerns this address only (it may allow the next port, or the
/// next address may answer it in time), rather than us.
fn per_address(e: &ProxyError) -> bool {
    matches!(e, ProxyError::Refused { .. } | ProxyError::Timeout { .. })
}

fn server_name(addr: &GatewayAddress) -> Option<ServerName<'static>> {
    match addr.ip() {
        Some(ip) => Some(ServerName::IpAddress(ip.into())),
        None => ServerName::try_from(addr.host().to_owned()).ok(),
    }
}

impl Dialer {
    /// Tries `addresses` in this order.
    pub fn new(addresses: Vec<GatewayAddress>) -> Self {
        Self {
            addresses,
            source: None,
            preferred: None,
            proxy: None,
        }
    }

    /// Reaches the gateway through this HTTP proxy (CONNECT), or directly with `None`.
    pub fn through(mut self, proxy: Option<Proxy>) -> Self {
        self.proxy = proxy;
        self
    }

    /// Connects from this local address (the bench tools stand for many peers on loopback).
    pub fn from_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Starts the next dial at `address` (one that worked before, remembered by the caller).
    pub fn prefer(&mut self, address: GatewayAddress) {
        self.preferred = Some(address);
    }

    /// The order of the next dial: the address that worked last, then the others as given.
    pub fn order(&self) -> Vec<&GatewayAddress> {
        let first = self
            .preferred
            .as_ref()
            .and_then(|p| self.addresses.iter().find(|a| *a == p));
        first
            .into_iter()
            .chain(self.addresses.iter().filter(|a| Some(*a) != first))
            .collect()
    }

    /// A TLS link to the first address that gives one, with `config` (the program's
    /// certificate and its verifier of the gateway's key).
    pub async fn dial(&mut self, config: Arc<ClientConfig>) -> Result<Dialed, DialError> {
        let connector = TlsConnector::from(config);
        let mut failed = Vec::new();
        let order: Vec<GatewayAddress> = self.order().into_iter().cloned().collect();
        for address in order {
            match self.attempt(&connector, &address).await {
                Ok(stream) => {
                    if !failed.is_empty() {
                        info!(
                            gateway = %address,
                            failed = %list(&failed),
                            "reached the gateway at a later address; it is tried first from now on"
                        );
                    }
                    self.preferred = Some(address.clone());
                    return Ok(Dialed {
                        stream,
                        address,
                        failed,
                    });
                }
                Err(AttemptError::Handshake(e)) => {
                    if let Some(refused) = refusal(&e) {
                        if let (Some(p), Refused::Key(key)) = (&self.proxy, &refused) {
                            return Err(DialError::Intercepted {
                                proxy: format!("{}:{}", p.host, p.port),
                                key: key.clone(),
                            });
                        }
                        return Err(DialError::Refused(refused));
                    }
                    debug!(gateway = %address, error = %e, "TLS handshake failed");
                    failed.push(Attempt {
                        address,
                        error: AttemptError::Handshake(e),
                    });
                }
                Err(AttemptError::Proxy(e)) if !per_address(&e) => {
                    return Err(DialError::Proxy(e));
                }
                Err(error) => {
                    debug!(gateway = %address, %error, "gateway address failed");
                    failed.push(Attempt { address, error });
                }
            }
        }
        Err(DialError::Unreachable(failed))
    }

    async fn attempt(
        &self,
        connector: &TlsConnector,
        address: &GatewayAddress,
    ) -> Result<Stream, AttemptError> {
        let name = server_name(address).ok_or(AttemptError::Name)?;
        let tcp = match &self.proxy {
            Some(p) => proxy::connect(
                p,
                &format!("{}:{}", address.host(), address.port()),
                PROXY_TIMEOUT,
            )
            .await
            .map_err(AttemptError::Proxy)?,
            None => tokio::time::timeout(CONNECT_TIMEOUT, self.connect(address))
                .await
                .map_err(|_| AttemptError::ConnectTimeout)?
                .map_err(AttemptError::Connect)?,
        };
        crate::socket::tune(&tcp).map_err(AttemptError::Connect)?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| AttemptError::HandshakeTimeout)?
            .map_err(AttemptError::Handshake)
    }

    async fn connect(&self, address: &GatewayAddress) -> io::Result<TcpStream> {
        let Some(source) = self.source else {
            return TcpStream::connect((address.host(), address.port())).await;
        };
        let ip = match address.ip() {
            Some(ip) => ip,
            None => tokio::net::lookup_host((address.host(), address.port()))
                .await?
                .next()
                .ok_or_else(|| io::Error::other("the gateway's name has no address"))?
                .ip(),
        };
        let socket = if ip.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        socket.connect(SocketAddr::new(ip, address.port())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> GatewayAddress {
        s.parse().expect("address")
    }

    #[test]
    fn the_address_that_worked_goes_first_and_the_rest_keep_their_order() {
        let mut d = Dialer::new(vec![
            addr("gw.example.com:443"),
            addr("gw.example.com:11444"),
            addr("gw2.example.com:443"),
        ]);
        let names = |d: &Dialer| d.order().iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(&d),
            [
                "gw.example.com:443",
                "gw.example.com:11444",
                "gw2.example.com:443"
            ]
        );
        d.preferred = Some(addr("gw2.example.com:443"));
        assert_eq!(
            names(&d),
            [
                "gw2.example.com:443",
                "gw.example.com:443",
                "gw.example.com:11444"
            ]
        );
        // A preference no longer among the addresses (a changed configuration) is ignored.
        d.preferred = Some(addr("old.example.com:443"));
        assert_eq!(names(&d)[0], "gw.example.com:443");
    }

    #[test]
    fn an_unreachable_gateway_lists_every_address_tried() {
        let e = DialError::Unreachable(vec![
            Attempt {
                address: addr("10.0.0.1:443"),
                error: AttemptError::ConnectTimeout,
            },
            Attempt {
                address: addr("10.0.0.1:11444"),
                error: AttemptError::Connect(io::Error::from(io::ErrorKind::ConnectionRefused)),
            },
        ]);
        let text = e.to_string();
        assert!(
            text.starts_with("gateway unreachable (tried 10.0.0.1:443: no TCP connection within 4s; 10.0.0.1:11444: "),
            "{text}"
        );
    }
}
