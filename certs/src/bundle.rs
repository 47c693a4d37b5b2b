//! A technician's identity file: a password-protected PKCS#12 bundle holding the private key,
//! the technician certificate and the gateway CA certificate.
//!
//! Export writes PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) with an HMAC-SHA256 MAC by default,
//! the same as OpenSSL 3; [`Protection::Legacy`] writes 3DES with a SHA-1 MAC for old
//! platforms. Import reads both and what `openssl pkcs12 -export` writes with or without
//! `-legacy`. Import is pure: it reads bytes and returns a value, so a wrong password or a
//! damaged file can never leave anything half-written behind.

use std::fmt;

use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, Pkcs12Archive,
    PrivateKey, PrivateKeyChain,
};
use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

use crate::ca::{Identity, PeerIdentity};
use crate::gateway_info::{GatewayInfo, GatewayInfoError};
use crate::x509;

/// No real bundle comes near this; a larger file is refused before any parsing.
pub const MAX_BUNDLE_LEN: usize = 1 << 20;

/// PBKDF2 rounds for a modern export: well above OpenSSL's 2048 default while keeping
/// `pinhole login` fast on a small laptop.
const MODERN_ITERATIONS: u32 = 100_000;

/// The legacy PKCS#12 KDF is slow per round; 2048 is what OpenSSL writes.
const LEGACY_ITERATIONS: u32 = 2048;

/// How a bundle is encrypted on export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protection {
    /// PBES2 (PBKDF2-HMAC-SHA256 + AES-256-CBC), HMAC-SHA256 MAC.
    #[default]
    Modern,
    /// PBE-SHA1-3DES for keys and certificates, HMAC-SHA1 MAC: for platforms that predate
    /// PBES2 in PKCS#12 (older Windows and macOS keychains).
    Legacy,
}

/// Why a bundle was not read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("wrong password for this bundle")]
    WrongPassword,
    #[error("the bundle file is damaged or not a PKCS#12 file: {0}")]
    Malformed(String),
    #[error("the bundle is too large ({0} bytes; at most {MAX_BUNDLE_LEN})")]
    TooLarge(usize),
    #[error("the bundle holds no private key")]
    NoKey,
    #[error("the bundle holds {0} private keys; expected exactly one")]
    SeveralKeys(usize),
    #[error("the bundle holds no certificate for its private key")]
    NoCertificate,
    #[error("the bundle holds no CA certificate that issued its certificate")]
    NoCa,
    #[error("the bundle's certificate is not a Pinhole technician certificate: {0}")]
    NotTechnician(String),
    #[error("the bundle does not say where the gateway is: {0}")]
    NoGateway(#[from] GatewayInfoError),
    #[error("writing the bundle failed: {0}")]
    Export(String),
}

/// A decrypted technician bundle.
pub struct Bundle {
    identity: Identity,
    ca: CertificateDer<'static>,
    gateway: GatewayInfo,
    peer: PeerIdentity,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("account", &self.peer.name)
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

fn classify(err: p12_keystore::error::Error) -> BundleError {
    use p12_keystore::error::Error as E;
    match err {
        // The MAC is keyed by the password: a mismatch means the password is wrong (a damaged
        // file whose outer structure still parses also lands here, and "wrong password" is the
        // message a user can act on). Without a MAC, a wrong key shows as bad padding.
        E::MacError(_) | E::UnpadError => BundleError::WrongPassword,
        other => BundleError::Malformed(other.to_string()),
    }
}

impl Bundle {
    /// A bundle from an identity issued by the CA (chain: leaf, CA).
    pub fn new(identity: Identity) -> Result<Self, BundleError> {
        let ca = identity.chain().get(1).cloned().ok_or(BundleError::NoCa)?;
        Self::assemble(identity, ca)
    }

    fn assemble(identity: Identity, ca: CertificateDer<'static>) -> Result<Self, BundleError> {
        let peer = PeerIdentity::from_certificate(identity.certificate())
            .map_err(|e| BundleError::NotTechnician(e.to_string()))?;
        if peer.role != crate::ca::Role::Technician {
            return Err(BundleError::NotTechnician(format!(
                "it names a {}",
                peer.role
            )));
        }
        let gateway = GatewayInfo::from_certificate(identity.certificate())?;
        Ok(Self {
            identity,
            ca,
            gateway,
            peer,
        })
    }

    /// Decrypts and checks a PKCS#12 file: exactly one key, its certificate, the CA that issued
    /// it, and the gateway extension.
    pub fn from_pkcs12(data: &[u8], password: &str) -> Result<Self, BundleError> {
        if data.len() > MAX_BUNDLE_LEN {
            return Err(BundleError::TooLarge(data.len()));
        }
        let archive = Pkcs12Archive::from_pkcs12(data, password).map_err(classify)?;
        let key = match archive.keys.as_slice() {
            [] => return Err(BundleError::NoKey),
            [one] => &one.key,
            many => return Err(BundleError::SeveralKeys(many.len())),
        };
        let key_der = Zeroizing::new(key.as_der().to_vec());
        let key_pair = rcgen::KeyPair::try_from(key_der.as_slice())
            .map_err(|e| BundleError::Malformed(format!("private key: {e}")))?;
        let key_spki = rcgen::PublicKeyData::subject_public_key_info(&key_pair);

        let certs: Vec<&[u8]> = archive.certs.iter().map(|c| c.cert.as_der()).collect();
        let leaf = certs
            .iter()
            .copied()
            .find(|der| x509::spki_der(der).is_ok_and(|spki| spki == key_spki))
            .ok_or(BundleError::NoCertificate)?;
        let leaf_cert = x509::parse(leaf).map_err(|e| BundleError::Malformed(e.to_string()))?;
        let ca = certs
            .iter()
            .copied()
            .find(|der| {
                *der != leaf
                    && x509::parse(der).is_ok_and(|c| {
                        c.subject() == leaf_cert.issuer()
                            && leaf_cert.verify_signature(Some(c.public_key())).is_ok()
                    })
            })
            .ok_or(BundleError::NoCa)?;
        let identity = Identity::new(key_der, vec![CertificateDer::from(leaf.to_vec())]);
        Self::assemble(identity, CertificateDer::from(ca.to_vec()))
    }

    /// Encrypts the bundle as PKCS#12.
    pub fn to_pkcs12(
        &self,
        password: &str,
        protection: Protection,
    ) -> Result<Vec<u8>, BundleError> {
        let export = |e: p12_keystore::error::Error| BundleError::Export(e.to_string());
        let key = PrivateKey::from_der(self.identity.key_pkcs8()).map_err(export)?;
        let leaf = Certificate::from_der(self.identity.certificate()).map_err(export)?;
        let ca = Certificate::from_der(&self.ca).map_err(export)?;
        // The local key id ties the key bag to its certificate bag; the SPKI pin is a stable,
        // unique value for it.
        let key_id = crate::pin::Pin::of_certificate(self.identity.certificate())
            .map_err(|e| BundleError::Export(e.to_string()))?;
        let mut store = KeyStore::new();
        store.add_entry(
            &self.peer.name,
            KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(
                key_id.as_bytes().to_vec(),
                key,
                [leaf, ca],
            )),
        );
        let writer = store.writer(password);
        let writer = match protection {
            Protection::Modern => writer
                .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
                .encryption_iterations(MODERN_ITERATIONS)
                .mac_algorithm(MacAlgorithm::HmacSha256)
                .mac_iterations(MODERN_ITERATIONS),
            Protection::Legacy => writer
                .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
                .encryption_iterations(LEGACY_ITERATIONS)
                .mac_algorithm(MacAlgorithm::HmacSha1)
                .mac_iterations(LEGACY_ITERATIONS),
        };
        writer.write().map_err(export)
    }

    /// The technician's key and certificate.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The gateway CA certificate.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Where the gateway is and the pin of its key.
    pub fn gateway(&self) -> &GatewayInfo {
        &self.gateway
    }

    /// The account name, serial and expiry of the certificate.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, Validity};
    use crate::pin::Pin;

    fn bundle() -> Bundle {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let info = GatewayInfo::new(
            vec!["gw.example.com:443".parse().expect("a")],
            Pin::of_spki(b"k"),
        )
        .expect("i");
        Bundle::new(
            ca.issue_technician("alice", &info, Validity::days_from_now(30))
                .expect("tech"),
        )
        .expect("bundle")
    }

    #[test]
    fn round_trip_modern_and_legacy() {
        let b = bundle();
        for protection in [Protection::Modern, Protection::Legacy] {
            let p12 = b.to_pkcs12("correct horse", protection).expect("export");
            let back = Bundle::from_pkcs12(&p12, "correct horse").expect("import");
            assert_eq!(back.identity().key_pkcs8(), b.identity().key_pkcs8());
            assert_eq!(back.identity().certificate(), b.identity().certificate());
            assert_eq!(back.ca(), b.ca());
            assert_eq!(back.gateway(), b.gateway());
            assert_eq!(back.peer().name, "alice");
        }
    }

    #[test]
    fn wrong_password_is_named() {
        let p12 = bundle()
            .to_pkcs12("right", Protection::Modern)
            .expect("export");
        assert!(matches!(
            Bundle::from_pkcs12(&p12, "wrong"),
            Err(BundleError::WrongPassword)
        ));
        let p12 = bundle()
            .to_pkcs12("right", Protection::Legacy)
            .expect("export");
        assert!(matches!(
            Bundle::from_pkcs12(&p12, "wrong"),
            Err(BundleError::WrongPassword)
        ));
    }

    #[test]
    fn truncated_and_garbage_are_malformed() {
        let p12 = bundle()
            .to_pkcs12("pw", Protection::Modern)
            .expect("export");
        for cut in [0, 1, 10, p12.len() / 2, p12.len() - 1] {
            let err = Bundle::from_pkcs12(&p12[..cut], "pw").expect_err("truncated");
            assert!(matches!(err, BundleError::Malformed(_)), "cut {cut}: {err}");
        }
        assert!(matches!(
            Bundle::from_pkcs12(b"not a pkcs12 file", "pw"),
            Err(BundleError::Malformed(_))
        ));
        let huge = vec![0u8; MAX_BUNDLE_LEN + 1];
        assert!(matches!(
            Bundle::from_pkcs12(&huge, "pw"),
            Err(BundleError::TooLarge(_))
        ));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let text = format!("{:?}", bundle());
        assert!(text.contains("alice"));
        assert!(!text.contains("PRIVATE"));
    }
}
