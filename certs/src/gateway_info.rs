//! The gateway-information extension carried by technician certificates.
//!
//! A technician's certificate tells the client everything it needs to reach its gateway: the
//! gateway's addresses (`host:port`, tried in order) and the pin of the gateway's key. It sits
//! in a non-critical X.509 extension so that other software ignores it, and its value is a DER
//! UTF8String in plain text so that `openssl x509 -text` shows it readably:
//!
//! ```text
//! 1.3.6.1.4.1.32473.1.1:
//!     ..gateway=gw.example.com:443,gw.example.com:11444; pin=sha256:4f1c…
//! ```
//!
//! OID: `1.3.6.1.4.1.32473.1.1`, arc 1 ("certificate extensions"), item 1 ("gateway info") under
//! the private enterprise number 32473. That number is the one RFC 5612 sets aside for
//! documentation; it cannot collide with any vendor's extension, and the project moves to its
//! own registered number before 1.0 by changing [`OID`] (readers accept exactly this one).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::pin::{Pin, PinError};
use crate::x509;

/// `1.3.6.1.4.1.32473.1.1`; see the module documentation.
pub const OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 1, 1];

/// The same OID in dotted form, as `openssl` prints it.
pub const OID_DOTTED: &str = "1.3.6.1.4.1.32473.1.1";

/// The longest host name DNS allows.
const MAX_HOST_LEN: usize = 253;

/// A gateway address: a DNS name or an IP address, and a port.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayAddress {
    host: String,
    port: u16,
}

/// Why a gateway address or the extension was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayInfoError {
    #[error("`{0}` is not HOST:PORT (a DNS name or an IP address, and a port 1-65535)")]
    BadAddress(String),
    #[error("the certificate has no Pinhole gateway extension ({OID_DOTTED})")]
    Missing,
    #[error("the Pinhole gateway extension is malformed: {0}")]
    Malformed(&'static str),
    #[error("the gateway pin in the certificate is malformed: {0}")]
    BadPin(#[from] PinError),
    #[error("the certificate cannot be parsed")]
    BadCertificate,
}

impl GatewayAddress {
    /// The host: a DNS name, or an IP address without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

pub(crate) fn valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for GatewayAddress {
    type Err = GatewayInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GatewayInfoError::BadAddress(s.to_owned());
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest.split_once("]:").ok_or_else(bad)?;
            let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| bad())?;
            (ip.to_string(), port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
                (ip.to_string(), port)
            } else if valid_dns_name(host) && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                (host.to_ascii_lowercase(), port)
            } else {
                return Err(bad());
            }
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Self { host, port })
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayAddress({self})")
    }
}

/// What the client needs to reach its gateway: where, and which key to expect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayInfo {
    addresses: Vec<GatewayAddress>,
    pin: Pin,
}

impl GatewayInfo {
    /// At least one address is required; a certificate without one would leave the client
    /// nowhere to go.
    pub fn new(addresses: Vec<GatewayAddress>, pin: Pin) -> Result<Self, GatewayInfoError> {
        if addresses.is_empty() {
            return Err(GatewayInfoError::Malformed("no gateway address"));
        }
        Ok(Self { addresses, pin })
    }

    /// The addresses, in the order to try them.
    pub fn addresses(&self) -> &[GatewayAddress] {
        &self.addresses
    }

    /// The pin of the gateway's key.
    pub fn pin(&self) -> Pin {
        self.pin
    }

    /// The extension's text form.
    fn to_text(&self) -> String {
        let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        format!("gateway={}; pin={}", addrs.join(","), self.pin)
    }

    fn from_text(text: &str) -> Result<Self, GatewayInfoError> {
        let (gw, pin) = text
            .split_once("; ")
            .ok_or(GatewayInfoError::Malformed("expected `gateway=…; pin=…`"))?;
        let gw = gw
            .strip_prefix("gateway=")
            .ok_or(GatewayInfoError::Malformed("missing `gateway=`"))?;
        let pin = pin
            .strip_prefix("pin=")
            .ok_or(GatewayInfoError::Malformed("missing `pin=`"))?;
        let addresses = gw
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(addresses, pin.parse()?)
    }

    /// The DER extension value (`extnValue` contents).
    pub(crate) fn to_extension_value(&self) -> Vec<u8> {
        x509::der_utf8_string(&self.to_text())
    }

    /// Reads the extension from a DER certificate.
    pub fn from_certificate(cert_der: &[u8]) -> Result<Self, GatewayInfoError> {
        let cert = x509::parse(cert_der).map_err(|_| GatewayInfoError::BadCertificate)?;
        let oid = x509_parser::oid_registry::Oid::from(OID)
            .map_err(|_| GatewayInfoError::Malformed("OID"))?;
        let mut found = cert.extensions().iter().filter(|e| e.oid == oid);
        let ext = found.next().ok_or(GatewayInfoError::Missing)?;
        if found.next().is_some() {
            return Err(GatewayInfoError::Malformed("the extension appears twice"));
        }
        let text = x509::parse_der_utf8_string(ext.value)
            .ok_or(GatewayInfoError::Malformed("not a DER UTF8String"))?;
        Self::from_text(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        for (input, printed) in [
            ("gw.example.com:443", "gw.example.com:443"),
            ("GW.Example.COM:11444", "gw.example.com:11444"),
            ("192.0.2.1:443", "192.0.2.1:443"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("localhost:8443", "localhost:8443"),
        ] {
            let addr: GatewayAddress = input.parse().expect(input);
            assert_eq!(addr.to_string(), printed);
        }
        let v6: GatewayAddress = "[::1]:1".parse().expect("v6");
        assert_eq!(v6.ip(), Some("::1".parse().expect("ip")));
        assert_eq!(v6.port(), 1);
    }

    #[test]
    fn bad_addresses_are_named() {
        for bad in [
            "",
            "host",
            "host:",
            "host:0",
            "host:65536",
            ":443",
            "-bad.example:443",
            "a b:443",
            "2001:db8::1:443",
            "[2001:db8::1]443",
            "999.1.1.1:443",
            "gw.example.com:443,x",
        ] {
            let err = bad.parse::<GatewayAddress>().expect_err(bad);
            assert_eq!(err, GatewayInfoError::BadAddress(bad.to_owned()));
        }
    }

    #[test]
    fn text_round_trip() {
        let info = GatewayInfo::new(
            vec![
                "gw.example.com:443".parse().expect("a"),
                "gw.example.com:11444".parse().expect("b"),
            ],
            Pin::of_spki(b"k"),
        )
        .expect("info");
        let text = info.to_text();
        assert!(text.starts_with("gateway=gw.example.com:443,gw.example.com:11444; pin=sha256:"));
        assert_eq!(GatewayInfo::from_text(&text), Ok(info));
    }

    #[test]
    fn malformed_text_is_refused() {
        let pin = Pin::of_spki(b"k");
        for bad in [
            String::new(),
            format!("gateway=; pin={pin}"),
            format!("gw=a:1; pin={pin}"),
            "gateway=a:1; pin=sha256:00".to_owned(),
            format!("gateway=a:1 pin={pin}"),
        ] {
            assert!(GatewayInfo::from_text(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn needs_an_address() {
        assert!(GatewayInfo::new(vec![], Pin::of_spki(b"k")).is_err());
    }
}
