//! Key pins: the SHA-256 digest of a DER SubjectPublicKeyInfo.
//!
//! A pin names a key, not a certificate: a gateway that renews its certificate with the
//! same key keeps its pin. Pins are compared in constant time so that a mismatch reveals
//! nothing about how many leading bytes matched.

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;

use crate::x509;

/// Length of a SHA-256 digest.
const PIN_LEN: usize = 32;

/// The textual prefix that names the hash; it leaves room for other hashes later.
const PREFIX: &str = "sha256:";

/// SHA-256 of a SubjectPublicKeyInfo, printed and parsed as `sha256:<64 lower-case hex>`.
#[derive(Clone, Copy)]
pub struct Pin([u8; PIN_LEN]);

/// Why a text or a certificate did not give a pin.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    #[error("a pin must start with `sha256:`")]
    MissingPrefix,
    #[error("a pin must have 64 hexadecimal digits after `sha256:`")]
    BadDigest,
    #[error("the certificate cannot be parsed")]
    BadCertificate,
}

impl Pin {
    /// The pin of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
        let mut out = [0u8; PIN_LEN];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The pin of the key in a DER-encoded certificate.
    pub fn of_certificate(cert_der: &[u8]) -> Result<Self, PinError> {
        let cert = x509::parse(cert_der).map_err(|_| PinError::BadCertificate)?;
        Ok(Self::of_spki(cert.public_key().raw))
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; PIN_LEN] {
        &self.0
    }
}

impl PartialEq for Pin {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Pin {}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({self})")
    }
}

impl FromStr for Pin {
    type Err = PinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(PinError::MissingPrefix)?;
        if digits.len() != PIN_LEN * 2 {
            return Err(PinError::BadDigest);
        }
        let mut out = [0u8; PIN_LEN];
        hex::decode_to_slice(digits, &mut out).map_err(|_| PinError::BadDigest)?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let pin = Pin::of_spki(b"some key");
        let text = pin.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Pin>(), Ok(pin));
    }

    #[test]
    fn known_digest() {
        // SHA-256 of the empty string.
        let pin = Pin::of_spki(b"");
        assert_eq!(
            pin.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn rejects_malformed_text() {
        assert_eq!("e3b0".parse::<Pin>(), Err(PinError::MissingPrefix));
        assert_eq!("sha256:e3b0".parse::<Pin>(), Err(PinError::BadDigest));
        let not_hex = format!("sha256:{}", "zz".repeat(32));
        assert_eq!(not_hex.parse::<Pin>(), Err(PinError::BadDigest));
        let too_long = format!("sha256:{}", "00".repeat(33));
        assert_eq!(too_long.parse::<Pin>(), Err(PinError::BadDigest));
    }

    #[test]
    fn different_keys_differ() {
        assert_ne!(Pin::of_spki(b"a"), Pin::of_spki(b"b"));
    }

    #[test]
    fn garbage_certificate_has_no_pin() {
        assert_eq!(
            Pin::of_certificate(b"garbage"),
            Err(PinError::BadCertificate)
        );
    }
}
