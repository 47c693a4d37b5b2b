//! The one TLS profile of Pinhole, and the certificate verifiers of its three programs.
//!
//! Profile: TLS 1.3 only (rustls is built without TLS 1.2), AES-GCM suites only, key exchange
//! offering hybrid post-quantum groups first (X25519MLKEM768, SecP256r1MLKEM768), then P-256
//! and P-384; ALPN `pinhole/1`. Every program builds its configuration here, so a peer can
//! never negotiate something weaker than what this module lists.
//!
//! Verifiers:
//! * [`PinnedServerVerifier`] (client → gateway): the gateway's key must match the pin in the
//!   technician's certificate. The pin replaces the name and chain check; the handshake
//!   signature is still verified, so only the key's holder passes.
//! * [`TofuServerVerifier`] (site → gateway): trust on first use, backed by a pin file.
//! * [`GatewayClientVerifier`] (gateway ← client, site): chain to the gateway CA, client-auth
//!   EKU, validity, and a revocation list that the caller keeps.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::ca::Identity;
use crate::fsutil;
use crate::pin::Pin;
use crate::x509;

/// Kernel send buffer for the TLS links. Autotuning grows it to megabytes under a bulk transfer,
/// and every byte queued there delays an interactive packet behind it (a HMI click behind a
/// firmware download). 256 KB is ~4 ms at 0.5 Gbit/s and still fills a LAN or a short WAN
/// path; the programs set it on every link socket.
pub const LINK_SEND_BUFFER: usize = 256 * 1024;

/// The application protocol of the agent connections.
pub const ALPN: &[u8] = b"pinhole/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the CA certificate is not usable as a trust anchor: {0}")]
    BadCa(String),
}

/// The crypto provider with Pinhole's suites and groups.
pub fn provider() -> Arc<CryptoProvider> {
    let base = aws_lc_rs::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::SECP256R1MLKEM768,
            aws_lc_rs::kx_group::SECP256R1,
            aws_lc_rs::kx_group::SECP384R1,
        ],
        ..base
    })
}

/// The reason a pinned or TOFU verifier refused the gateway's key.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KeyRefused {
    #[error("the gateway's key {seen} does not match the pinned key {expected}")]
    PinMismatch { expected: Pin, seen: Pin },
    #[error("the pin file {0} is damaged; refusing every gateway until it is repinned")]
    PinFileDamaged(PathBuf),
    #[error(
        "the gateway's certificate is not a gateway certificate of the CA received at enrollment: {0}"
    )]
    NotGatewayOfCa(String),
}

/// The [`KeyRefused`] behind a failed handshake, if that is why it failed.
pub fn key_refused(err: &io::Error) -> Option<KeyRefused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = err.get_ref().map(|e| e as _);
    while let Some(e) = source {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
        {
            return other.0.downcast_ref::<KeyRefused>().cloned();
        }
        source = e.source();
    }
    None
}

fn refuse(reason: KeyRefused) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(reason))))
}

/// The pin of an end-entity certificate that is within its validity period at `now`.
fn current_key_pin(end_entity: &CertificateDer<'_>, now: UnixTime) -> Result<Pin, rustls::Error> {
    let cert = x509::parse(end_entity)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > validity.not_after.timestamp() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(Pin::of_spki(cert.public_key().raw))
}

/// Handshake-signature checks shared by the server verifiers: the peer must prove it holds
/// the key that the certificate (and so the pin) names.
#[derive(Debug)]
pub(crate) struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    pub(crate) fn new() -> Self {
        Self(provider())
    }

    pub(crate) fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    pub(crate) fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    pub(crate) fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts exactly the gateway whose key has the given pin.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: Pin,
    signatures: Signatures,
}

impl PinnedServerVerifier {
    pub fn new(pin: Pin) -> Arc<Self> {
        Arc::new(Self {
            pin,
            signatures: Signatures::new(),
        })
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = current_key_pin(end_entity, now)?;
        if seen != self.pin {
            return Err(refuse(KeyRefused::PinMismatch {
                expected: self.pin,
                seen,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Why the TOFU pin file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TofuError {
    #[error("cannot read the pin file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the pin file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the pin file {0} is damaged")]
    Damaged(PathBuf),
    #[error(transparent)]
    Refused(#[from] KeyRefused),
    #[error("the certificate cannot be parsed")]
    BadCertificate,
}

/// What [`TofuStore::confirm`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TofuOutcome {
    /// This was the first use: the key is now pinned.
    Recorded(Pin),
    /// The key was already pinned and matches.
    Matched(Pin),
}

/// The site's record of its gateway's key: one `sha256:…` line in a 0600 file.
#[derive(Debug, Clone)]
pub struct TofuStore {
    path: PathBuf,
    /// Serializes check-and-record within the process so two first connections cannot both
    /// record different keys.
    lock: Arc<Mutex<()>>,
}

impl TofuStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            lock: Arc::new(Mutex::new(())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A verifier's verdict on the key `seen`: accepted before the first pin (first use) or
    /// when it is the pinned one; refused when another key is pinned, and — failing closed —
    /// when the pin file cannot be read (an unreadable pin must not turn into "first use").
    fn accepts(&self, seen: Pin) -> Result<ServerCertVerified, rustls::Error> {
        match self.pinned() {
            Ok(None) => Ok(ServerCertVerified::assertion()),
            Ok(Some(expected)) if expected == seen => Ok(ServerCertVerified::assertion()),
            Ok(Some(expected)) => Err(refuse(KeyRefused::PinMismatch { expected, seen })),
            Err(_) => Err(refuse(KeyRefused::PinFileDamaged(self.path.clone()))),
        }
    }

    /// The pinned key, or `None` before the first successful connection.
    pub fn pinned(&self) -> Result<Option<Pin>, TofuError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| TofuError::Damaged(self.path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TofuError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Called once the handshake with `end_entity` has completed (its signature verified):
    /// records its key if nothing is pinned yet, or checks it against the pin.
    pub fn confirm(&self, end_entity: &[u8]) -> Result<TofuOutcome, TofuError> {
        let seen = Pin::of_certificate(end_entity).map_err(|_| TofuError::BadCertificate)?;
        // A poisoned lock only means another thread panicked mid-check; the file is the truth.
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.pinned()? {
            Some(expected) if expected == seen => Ok(TofuOutcome::Matched(seen)),
            Some(expected) => Err(KeyRefused::PinMismatch { expected, seen }.into()),
            None => {
                fsutil::write_private_atomic(&self.path, format!("{seen}\n").as_bytes()).map_err(
                    |source| TofuError::Write {
                        path: self.path.clone(),
                        source,
                    },
                )?;
                Ok(TofuOutcome::Recorded(seen))
            }
        }
    }

    /// Forgets the pin (`pinhole-site repin`): the next gateway is trusted on first use again.
    pub fn forget(&self) -> Result<bool, TofuError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(TofuError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// Trust on first use: accepts any key while nothing is pinned, then only the pinned one.
///
/// The pin is recorded by [`TofuStore::confirm`] after the handshake completes, never here:
/// at this point the peer has not yet proven that it holds the key.
#[derive(Debug)]
pub struct TofuServerVerifier {
    store: TofuStore,
    signatures: Signatures,
}

impl TofuServerVerifier {
    pub fn new(store: TofuStore) -> Arc<Self> {
        Arc::new(Self {
            store,
            signatures: Signatures::new(),
        })
    }
}

impl ServerCertVerifier for TofuServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = current_key_pin(end_entity, now)?;
        self.store.accepts(seen)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// A site's verifier after enrollment: the gateway's certificate must chain to the CA the
/// site received at enrollment, carry the serverAuth key usage and the gateway role, **and**
/// match the pinned key. With nothing pinned (after `pinhole-site repin`), the first gateway
/// that passes the CA checks is accepted and its key is then recorded by
/// [`TofuStore::confirm`]; a server with a certificate of any other issuer never is.
#[derive(Debug)]
pub struct CaPinnedServerVerifier {
    roots: RootCertStore,
    store: TofuStore,
    signatures: Signatures,
}

impl CaPinnedServerVerifier {
    pub fn new(ca: &CertificateDer<'static>, store: TofuStore) -> Result<Arc<Self>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
        Ok(Arc::new(Self {
            roots,
            store,
            signatures: Signatures::new(),
        }))
    }
}

/// Chain to `roots`, serverAuth, and the gateway role in the subject.
fn check_gateway_of_ca(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    signatures: &Signatures,
) -> Result<(), KeyRefused> {
    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)
        .map_err(|e| KeyRefused::NotGatewayOfCa(e.to_string()))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        signatures.0.signature_verification_algorithms.all,
    )
    .map_err(|e| KeyRefused::NotGatewayOfCa(e.to_string()))?;
    let peer = crate::ca::PeerIdentity::from_certificate(end_entity)
        .map_err(|e| KeyRefused::NotGatewayOfCa(e.to_string()))?;
    if peer.role != crate::ca::Role::Gateway {
        return Err(KeyRefused::NotGatewayOfCa(format!(
            "its role is {}, not gateway",
            peer.role
        )));
    }
    Ok(())
}

impl ServerCertVerifier for CaPinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = current_key_pin(end_entity, now)?;
        check_gateway_of_ca(
            &self.roots,
            end_entity,
            intermediates,
            now,
            &self.signatures,
        )
        .map_err(refuse)?;
        self.store.accepts(seen)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// The gateway's list of revoked certificate serials (big-endian bytes, as in the certificate).
pub trait RevocationList: Send + Sync + fmt::Debug {
    fn is_revoked(&self, serial: &[u8]) -> bool;
}

/// A client certificate must chain to the gateway CA, carry the client-auth EKU, be within its
/// validity period, and not be revoked.
#[derive(Debug)]
pub struct GatewayClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<dyn RevocationList>,
    anonymous: Anonymous,
}

/// Whether a peer may complete the handshake without a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Every peer must present a valid certificate.
    Refuse,
    /// A peer without a certificate is let through to enroll, and may do nothing else (the
    /// gateway's protocol core enforces that). A certificate that is presented is still
    /// verified in full: a bad one is refused, never downgraded to anonymous.
    AllowEnrollment,
}

impl GatewayClientVerifier {
    pub fn new(
        ca: &CertificateDer<'static>,
        revoked: Arc<dyn RevocationList>,
        anonymous: Anonymous,
    ) -> Result<Arc<Self>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let inner = match anonymous {
            Anonymous::Refuse => builder.build()?,
            Anonymous::AllowEnrollment => builder.allow_unauthenticated().build()?,
        };
        Ok(Arc::new(Self {
            inner,
            revoked,
            anonymous,
        }))
    }
}

impl ClientCertVerifier for GatewayClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = x509::parse(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revoked.is_revoked(cert.raw_serial()) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.anonymous == Anonymous::Refuse
    }
}

/// A client configuration with Pinhole's profile, the given server verifier and a client
/// certificate.
pub fn client_config(
    identity: &Identity,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain().to_vec(), identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// A client configuration without a certificate: only for a site's enrollment, which the
/// gateway limits to exactly that.
pub fn enrollment_client_config(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The gateway's server configuration: its certificate, and the client verifier. Sessions are
/// never resumed: every handshake is a full one.
pub fn server_config(
    identity: &Identity,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain().to_vec(), identity.private_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption. A resumed handshake does not run the client verifier: the certificate's
    // revocation and validity would be taken from the first handshake, so a closed account
    // or a revoked site could come back on a ticket. Without a session cache and without
    // tickets (stateful: `send_tls13_tickets`; stateless: the builder's `ticketer`, which
    // produces none and stays so) every connection is a full handshake; it costs one
    // signature more per login.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, Validity};

    #[test]
    fn profile_is_tls13_aes_gcm_with_pq_first() {
        let p = provider();
        assert!(
            p.cipher_suites
                .iter()
                .all(|s| s.version() == &rustls::version::TLS13)
        );
        let names: Vec<String> = p
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n.contains("AES_") && n.contains("GCM")),
            "{names:?}"
        );
        let groups: Vec<String> = p
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect();
        assert_eq!(
            groups,
            [
                "X25519MLKEM768",
                "secp256r1MLKEM768",
                "secp256r1",
                "secp384r1"
            ]
        );
    }

    #[test]
    fn the_server_neither_caches_sessions_nor_issues_tickets() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let server = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("server");
        let verifier = GatewayClientVerifier::new(
            ca.certificate(),
            Arc::new(NoRevocations),
            Anonymous::Refuse,
        )
        .expect("verifier");
        let config = server_config(&server, verifier).expect("config");
        assert!(!config.session_storage.can_cache());
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.ticketer.enabled());
    }

    #[derive(Debug)]
    struct NoRevocations;

    impl RevocationList for NoRevocations {
        fn is_revoked(&self, _: &[u8]) -> bool {
            false
        }
    }

    #[test]
    fn tofu_store_records_once_then_refuses_others() {
        let dir = tempfile::tempdir().expect("dir");
        let store = TofuStore::new(dir.path().join("gateway.pin"));
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let a = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("a");
        let b = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("b");
        assert_eq!(store.pinned().expect("read"), None);
        let pin_a = Pin::of_certificate(a.certificate()).expect("pin");
        assert_eq!(
            store.confirm(a.certificate()).expect("first"),
            TofuOutcome::Recorded(pin_a)
        );
        assert_eq!(
            store.confirm(a.certificate()).expect("again"),
            TofuOutcome::Matched(pin_a)
        );
        assert!(matches!(
            store.confirm(b.certificate()),
            Err(TofuError::Refused(KeyRefused::PinMismatch { .. }))
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.path())
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.forget().expect("forget"));
        assert!(!store.forget().expect("forget again"));
        assert_eq!(store.pinned().expect("read"), None);
    }

    #[test]
    fn after_enrollment_only_a_gateway_of_the_ca_is_pinned() {
        let dir = tempfile::tempdir().expect("dir");
        let store = TofuStore::new(dir.path().join("gateway.pin"));
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let gw = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("gw");
        let other_ca = CertificateAuthority::generate("acme").expect("other ca");
        let fake = other_ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("fake");
        let v = CaPinnedServerVerifier::new(ca.certificate(), store.clone()).expect("verifier");
        let name = ServerName::try_from("anything").expect("name");
        let verify = |cert: &CertificateDer<'_>| {
            v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
        };
        // Nothing pinned (after `repin`): a gateway of another CA is refused, ours accepted.
        let err = verify(fake.certificate()).expect_err("another CA");
        assert!(format!("{err:?}").contains("NotGatewayOfCa"), "{err:?}");
        verify(gw.certificate()).expect("the CA's gateway");
        // Pinned: another key of the same CA is refused too.
        store.confirm(gw.certificate()).expect("pin");
        let twin = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("twin");
        let err = verify(twin.certificate()).expect_err("not the pinned key");
        assert!(format!("{err:?}").contains("PinMismatch"), "{err:?}");
        verify(gw.certificate()).expect("pinned and of the CA");
    }

    #[test]
    fn damaged_pin_file_fails_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("gateway.pin");
        std::fs::write(&path, "not a pin").expect("write");
        let store = TofuStore::new(&path);
        assert!(matches!(store.pinned(), Err(TofuError::Damaged(_))));
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let a = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("a");
        assert!(store.confirm(a.certificate()).is_err());
        let verifier = TofuServerVerifier::new(store);
        let name = ServerName::try_from("gw").expect("name");
        let err = verifier
            .verify_server_cert(a.certificate(), &[], &name, &[], UnixTime::now())
            .expect_err("damaged pin refuses");
        assert!(matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Other(_))
        ));
    }

    #[test]
    fn pinned_verifier_checks_key_and_validity() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let a = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("a");
        let b = ca
            .issue_server(&["gw".into()], Validity::days_from_now(1))
            .expect("b");
        let v = PinnedServerVerifier::new(Pin::of_certificate(a.certificate()).expect("pin"));
        let name = ServerName::try_from("anything").expect("name");
        assert!(
            v.verify_server_cert(a.certificate(), &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        assert!(
            v.verify_server_cert(b.certificate(), &[], &name, &[], UnixTime::now())
                .is_err()
        );
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 3 * 86_400,
        ));
        let err = v
            .verify_server_cert(a.certificate(), &[], &name, &[], later)
            .expect_err("expired");
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Expired)
        );
    }
}
