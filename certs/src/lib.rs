//! pinhole-certs: the identity layer of Pinhole.
//!
//! What it is for: the gateway's certificate authority and the certificates it issues
//! ([`ca`]); the technician's password-protected PKCS#12 bundle that carries the gateway's
//! addresses and key pin ([`bundle`], [`gateway_info`]); key pins ([`pin`]); the site enrollment token that carries the gateway's pin ([`token`]); and the one TLS
//! profile with the verifiers of the three programs ([`tls`]).
//!
//! Depends on: rustls with the aws-lc-rs provider (the only crypto provider of the workspace),
//! rcgen, x509-parser, p12-keystore, and `pinhole-proto` for the one rule of names
//! (`pinhole_proto::validate::name`: a certificate's subject follows the rule of the names
//! peers send). It does no network I/O and starts no runtime; the only files it touches are
//! the ones a caller names (the TOFU pin file).
//!
//! Must not depend on: tokio, or any Pinhole crate but `pinhole-proto` (which depends on no
//! Pinhole crate); everything else builds on these two.
//! Anything that weakens verification lives in [`danger`], which only tests can enable.

pub mod bundle;
pub mod ca;
#[cfg(feature = "danger")]
pub mod danger;
pub mod fsutil;
pub mod gateway_info;
pub mod pin;
pub mod tls;
pub mod token;
pub mod x509;

pub use bundle::{Bundle, BundleError, Protection};
pub use ca::{CertificateAuthority, Identity, IssueError, PeerIdentity, Role, Validity};
pub use gateway_info::{GatewayAddress, GatewayInfo, GatewayInfoError};
pub use pin::{Pin, PinError};
pub use tls::{
    ALPN, Anonymous, CaPinnedServerVerifier, GatewayClientVerifier, KeyRefused,
    PinnedServerVerifier, RevocationList, TlsError, TofuError, TofuOutcome, TofuServerVerifier,
    TofuStore,
};
pub use token::{EnrollmentToken, TokenError};

/// `N` bytes from the operating system's secure random source (through aws-lc).
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // aws-lc's RNG only fails without an OS entropy source, where no key could be made either.
    aws_lc_rs::rand::fill(&mut b).expect("system random number generator");
    b
}
