//! The gateway's certificate authority, and the certificates it issues.
//!
//! Every key is ECDSA P-256 (small signatures, fast on every platform Pinhole runs on). The CA
//! issues three kinds of certificate, told apart by the subject's organizational unit
//! ([`Role`]): the gateway's server certificate, technician certificates (which carry the
//! [`GatewayInfo`] extension and go into a PKCS#12 bundle) and site certificates (issued for a
//! key the site generated and keeps).

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::gateway_info::GatewayInfo;
use crate::x509;

/// Technician certificates last a year unless the operator says otherwise: long enough not to
/// strand a technician in the field, short enough that a lost laptop's bundle dies on its own.
pub const DEFAULT_TECHNICIAN_DAYS: i64 = 365;

/// The CA outlives every certificate it may issue many times over.
pub const CA_DAYS: i64 = 20 * 365;

/// Server and site certificates are renewed by the programs themselves; ten years keeps a
/// forgotten plant box working.
pub const SERVER_DAYS: i64 = 10 * 365;

/// Certificates start slightly in the past so that a peer whose clock lags still accepts them.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// 128 random bits: serials must be unpredictable (RFC 5280 allows up to 20 octets).
const SERIAL_LEN: usize = 16;

/// Why issuing failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("`{0}` is not a valid name (1-64 characters: letters, digits, `.`, `-`, `_`, `@`)")]
    BadName(String),
    #[error("`{0}` is neither a DNS name nor an IP address")]
    BadServerName(String),
    #[error("the validity period ends before it starts")]
    BadValidity,
    #[error("the public key is not usable: {0}")]
    BadPublicKey(String),
    #[error("the CA certificate or key is malformed: {0}")]
    BadCa(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Which kind of peer a certificate names, kept in the subject's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Technician,
    Site,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "pinhole-gateway",
            Role::Technician => "pinhole-technician",
            Role::Site => "pinhole-site",
        }
    }

    fn from_ou(ou: &str) -> Option<Self> {
        [Role::Gateway, Role::Technician, Role::Site]
            .into_iter()
            .find(|r| r.as_str() == ou)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Gateway => "gateway",
            Role::Technician => "technician",
            Role::Site => "site",
        })
    }
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From a few minutes ago (clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + Duration::days(days),
        }
    }

    fn check(self) -> Result<Self, IssueError> {
        if self.not_after <= self.not_before {
            return Err(IssueError::BadValidity);
        }
        Ok(self)
    }
}

/// A private key (PKCS#8 DER, wiped on drop) and its certificate chain, leaf first.
pub struct Identity {
    key_pkcs8: Zeroizing<Vec<u8>>,
    chain: Vec<CertificateDer<'static>>,
}

impl Identity {
    pub(crate) fn new(key_pkcs8: Zeroizing<Vec<u8>>, chain: Vec<CertificateDer<'static>>) -> Self {
        Self { key_pkcs8, chain }
    }

    /// An identity from a stored key (PKCS#8 DER) and its chain, leaf first. `None` if the
    /// chain is empty or the key does not belong to the leaf.
    pub fn from_parts(
        key_pkcs8: Zeroizing<Vec<u8>>,
        chain: Vec<CertificateDer<'static>>,
    ) -> Option<Self> {
        let leaf = chain.first()?;
        let key = KeyPair::try_from(key_pkcs8.as_slice()).ok()?;
        let spki = x509::spki_der(leaf).ok()?;
        (spki == rcgen::PublicKeyData::subject_public_key_info(&key))
            .then(|| Self::new(key_pkcs8, chain))
    }

    /// The private key, PKCS#8 DER.
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        // Invariant: every constructor is given a non-empty chain.
        &self.chain[0]
    }

    /// The private key as PEM, for files the owner alone reads.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.key_pkcs8))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("key", &"<redacted>")
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

/// Facts read back from a certificate Pinhole issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    /// The account, site or gateway name (the subject CN).
    pub name: String,
    /// The serial number, big-endian, as the revocation list keeps it.
    pub serial: Vec<u8>,
    pub not_after: OffsetDateTime,
}

impl PeerIdentity {
    /// Reads role, name, serial and expiry from a DER certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IssueError> {
        let bad = |what: &str| IssueError::BadCa(format!("peer certificate: {what}"));
        let cert = x509::parse(der).map_err(|e| bad(&e.to_string()))?;
        let ou = x509::subject_attr(
            &cert,
            &x509_parser::oid_registry::OID_X509_ORGANIZATIONAL_UNIT,
        )
        .ok_or_else(|| bad("no organizational unit"))?;
        let role = Role::from_ou(&ou).ok_or_else(|| bad("unknown role"))?;
        let name = x509::subject_attr(&cert, &x509_parser::oid_registry::OID_X509_COMMON_NAME)
            .ok_or_else(|| bad("no common name"))?;
        Ok(Self {
            role,
            name,
            serial: cert.raw_serial().to_vec(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }
}

/// Checks a name that goes into a certificate subject: the one rule of
/// [`pinhole_proto::validate::name`] (1 to 64 bytes of letters, digits, `.`, `-`, `_`, `@`),
/// the same as for names a peer sends. The error carries at most an escaped excerpt of the name.
pub fn check_name(name: &str) -> Result<(), IssueError> {
    pinhole_proto::validate::name("name", name)
        .map_err(|_| IssueError::BadName(pinhole_proto::validate::excerpt(name)))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; SERIAL_LEN];
    // aws-lc's RNG only fails when the OS has no entropy source, in which case no key could
    // have been generated either.
    aws_lc_rs::rand::fill(&mut bytes).expect("system random number generator");
    // Serials are positive INTEGERs and must not be zero: clear the sign bit, set the next.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn subject(role: Role, name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pinhole");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    dn
}

fn leaf_params(
    role: Role,
    name: &str,
    validity: Validity,
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, IssueError> {
    let validity = validity.check()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(role, name);
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn generate_key() -> Result<KeyPair, IssueError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// The gateway's CA: its key signs every certificate in a Pinhole deployment.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh P-256 key and a self-signed certificate.
    pub fn generate(name: &str) -> Result<Self, IssueError> {
        check_name(name)?;
        let key = generate_key()?;
        let validity = Validity::days_from_now(CA_DAYS);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Pinhole");
        dn.push(DnType::CommonName, format!("{name} Pinhole CA"));
        params.distinguished_name = dn;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        // Path length 0: the CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let cert = cert.der().clone();
        let issuer = Issuer::new(params, key);
        Ok(Self { cert, issuer })
    }

    /// Loads a CA from its certificate and PKCS#8 key, both PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| IssueError::BadCa(format!("key: {e}")))?;
        let der = pem_decode("CERTIFICATE", cert_pem)
            .ok_or_else(|| IssueError::BadCa("certificate is not PEM".into()))?;
        let cert = CertificateDer::from(der);
        let spki = x509::spki_der(&cert).map_err(|e| IssueError::BadCa(e.to_string()))?;
        if spki != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(IssueError::BadCa(
                "the key does not belong to the certificate".into(),
            ));
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert, key).map_err(|e| IssueError::BadCa(e.to_string()))?;
        Ok(Self { cert, issuer })
    }

    /// The CA certificate, DER.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The CA key, PKCS#8 PEM. Only for a file that the gateway alone reads.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    fn identity(&self, key: &KeyPair, cert: rcgen::Certificate) -> Identity {
        Identity::new(
            Zeroizing::new(key.serialize_der()),
            vec![cert.der().clone(), self.cert.clone()],
        )
    }

    /// The gateway's server certificate for its public names (DNS names or IP addresses), with
    /// a new key.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Validity,
    ) -> Result<Identity, IssueError> {
        let key = generate_key()?;
        self.issue_server_for_key(&key, names, validity)
    }

    /// The gateway's server certificate for an existing key (a renewal keeps the pin).
    pub fn issue_server_for_key(
        &self,
        key: &KeyPair,
        names: &[String],
        validity: Validity,
    ) -> Result<Identity, IssueError> {
        let mut params = leaf_params(
            Role::Gateway,
            "pinhole-gateway",
            validity,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) if crate::gateway_info::valid_dns_name(n) => n
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| IssueError::BadServerName(n.clone())),
                Err(_) => Err(IssueError::BadServerName(n.clone())),
            })
            .collect::<Result<_, _>>()?;
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(self.identity(key, cert))
    }

    /// A technician certificate with a new key; it carries where the gateway is and its pin.
    pub fn issue_technician(
        &self,
        account: &str,
        gateway: &GatewayInfo,
        validity: Validity,
    ) -> Result<Identity, IssueError> {
        let key = generate_key()?;
        let cert = self.technician_certificate(account, &key, gateway, validity)?;
        Ok(Identity::new(
            Zeroizing::new(key.serialize_der()),
            vec![cert, self.cert.clone()],
        ))
    }

    /// A technician certificate for a key made elsewhere (DER SubjectPublicKeyInfo): how a
    /// separate signer issues one without ever seeing the technician's private key.
    pub fn issue_technician_for_key(
        &self,
        account: &str,
        spki_der: &[u8],
        gateway: &GatewayInfo,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IssueError> {
        let public = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| IssueError::BadPublicKey(e.to_string()))?;
        self.technician_certificate(account, &public, gateway, validity)
    }

    fn technician_certificate(
        &self,
        account: &str,
        public: &impl rcgen::PublicKeyData,
        gateway: &GatewayInfo,
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IssueError> {
        check_name(account)?;
        let mut params = leaf_params(
            Role::Technician,
            account,
            validity,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        // Non-critical: software that does not know the extension must still accept the
        // certificate (RFC 5280 4.2).
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                crate::gateway_info::OID,
                gateway.to_extension_value(),
            ));
        Ok(params.signed_by(public, &self.issuer)?.der().clone())
    }

    /// A site certificate for the site's own public key (DER SubjectPublicKeyInfo): the site's
    /// private key never leaves the site.
    pub fn issue_site(
        &self,
        site: &str,
        spki_der: &[u8],
        validity: Validity,
    ) -> Result<CertificateDer<'static>, IssueError> {
        check_name(site)?;
        let public = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| IssueError::BadPublicKey(e.to_string()))?;
        let params = leaf_params(
            Role::Site,
            site,
            validity,
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(params.signed_by(&public, &self.issuer)?.der().clone())
    }
}

/// A new P-256 key for a site, PKCS#8 DER (wiped on drop), and its SubjectPublicKeyInfo.
pub fn generate_site_key() -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), IssueError> {
    let key = generate_key()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    Ok((Zeroizing::new(key.serialize_der()), spki))
}

/// The SubjectPublicKeyInfo (DER) of a PKCS#8 DER private key.
pub fn spki_of_pkcs8(key_pkcs8: &[u8]) -> Result<Vec<u8>, IssueError> {
    let key = KeyPair::try_from(key_pkcs8).map_err(|e| IssueError::BadPublicKey(e.to_string()))?;
    Ok(rcgen::PublicKeyData::subject_public_key_info(&key))
}

/// PEM armour (64 columns, `\n` line ends).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

/// The DER inside the first PEM block with `label`.
pub fn pem_decode(label: &str, text: &str) -> Option<Vec<u8>> {
    pem::parse_many(text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == label)
        .map(pem::Pem::into_contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pin::Pin;

    fn info() -> GatewayInfo {
        GatewayInfo::new(
            vec!["gw.example.com:443".parse().expect("addr")],
            Pin::of_spki(b"k"),
        )
        .expect("info")
    }

    #[test]
    fn ca_survives_pem_round_trip_and_keeps_signing() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let again = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).expect("reload");
        assert_eq!(again.certificate(), ca.certificate());
        let tech = again
            .issue_technician("alice", &info(), Validity::days_from_now(1))
            .expect("issue");
        let leaf = x509::parse(tech.certificate()).expect("parse");
        let ca_cert = x509::parse(ca.certificate()).expect("parse ca");
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());
    }

    #[test]
    fn ca_refuses_a_foreign_key() {
        let a = CertificateAuthority::generate("a").expect("a");
        let b = CertificateAuthority::generate("b").expect("b");
        assert!(matches!(
            CertificateAuthority::from_pem(&a.cert_pem(), &b.key_pem()),
            Err(IssueError::BadCa(_))
        ));
    }

    #[test]
    fn ca_certificate_is_a_constrained_ca() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let cert = x509::parse(ca.certificate()).expect("parse");
        let bc = cert
            .basic_constraints()
            .expect("ok")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
    }

    #[test]
    fn technician_certificate_has_eku_serial_validity_and_extension() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let a = ca
            .issue_technician(
                "alice",
                &info(),
                Validity::days_from_now(DEFAULT_TECHNICIAN_DAYS),
            )
            .expect("a");
        let b = ca
            .issue_technician(
                "alice",
                &info(),
                Validity::days_from_now(DEFAULT_TECHNICIAN_DAYS),
            )
            .expect("b");
        let cert = x509::parse(a.certificate()).expect("parse");
        let eku = cert
            .extended_key_usage()
            .expect("ok")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        let days = (cert.validity().not_after.to_datetime()
            - cert.validity().not_before.to_datetime())
        .whole_days();
        assert_eq!(days, DEFAULT_TECHNICIAN_DAYS);
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == crate::gateway_info::OID_DOTTED)
            .expect("gateway extension");
        assert!(!ext.critical);
        assert_eq!(
            GatewayInfo::from_certificate(a.certificate()).expect("info"),
            info()
        );
        let peer = PeerIdentity::from_certificate(a.certificate()).expect("peer");
        assert_eq!((peer.role, peer.name.as_str()), (Role::Technician, "alice"));
        let other = PeerIdentity::from_certificate(b.certificate()).expect("peer");
        assert_ne!(peer.serial, other.serial, "serials are random");
        assert_eq!(peer.serial.len(), SERIAL_LEN);
    }

    #[test]
    fn server_certificate_names_dns_and_ip() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let id = ca
            .issue_server(
                &["gw.example.com".into(), "192.0.2.7".into()],
                Validity::days_from_now(SERVER_DAYS),
            )
            .expect("server");
        let cert = x509::parse(id.certificate()).expect("parse");
        let san = cert
            .subject_alternative_name()
            .expect("ok")
            .expect("present")
            .value;
        use x509_parser::extensions::GeneralName;
        let dns: Vec<&str> = san
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect();
        let ips: Vec<&[u8]> = san
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::IPAddress(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        assert_eq!(dns, ["gw.example.com"]);
        assert_eq!(ips, [&[192u8, 0, 2, 7][..]]);
        assert!(
            cert.extended_key_usage()
                .expect("ok")
                .expect("present")
                .value
                .server_auth
        );
        assert!(
            ca.issue_server(&["bad name".into()], Validity::days_from_now(1))
                .is_err()
        );
    }

    #[test]
    fn site_certificate_is_for_the_sites_own_key() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        let (_key, spki) = generate_site_key().expect("key");
        let cert = ca
            .issue_site("plant-a", &spki, Validity::days_from_now(SERVER_DAYS))
            .expect("site");
        assert_eq!(x509::spki_der(&cert).expect("spki"), spki);
        let peer = PeerIdentity::from_certificate(&cert).expect("peer");
        assert_eq!((peer.role, peer.name.as_str()), (Role::Site, "plant-a"));
        assert!(matches!(
            ca.issue_site("plant-a", b"junk", Validity::days_from_now(1)),
            Err(IssueError::BadPublicKey(_))
        ));
    }

    #[test]
    fn bad_names_and_validity_are_refused() {
        let ca = CertificateAuthority::generate("acme").expect("ca");
        for bad in ["", "a b", "x/y", "ä", &"a".repeat(65)] {
            assert!(
                matches!(
                    ca.issue_technician(bad, &info(), Validity::days_from_now(1)),
                    Err(IssueError::BadName(_))
                ),
                "{bad}"
            );
        }
        let Err(e) = ca.issue_technician("a\nfake line", &info(), Validity::days_from_now(1))
        else {
            panic!("a name with a newline was accepted");
        };
        assert!(
            e.to_string()
                .starts_with("`a\\nfake line` is not a valid name"),
            "{e}"
        );
        let v = Validity::days_from_now(1);
        let backwards = Validity {
            not_before: v.not_after,
            not_after: v.not_before,
        };
        assert!(matches!(
            ca.issue_technician("bob", &info(), backwards),
            Err(IssueError::BadValidity)
        ));
    }

    #[test]
    fn pem_round_trip() {
        for n in 0..70 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_encode("X", &data);
            assert_eq!(pem_decode("X", &pem), Some(data));
        }
        assert_eq!(pem_decode("X", "nothing"), None);
    }
}
