//! The gateway's state directory.
//!
//! ```text
//! STATE/                 0700, root
//!   gateway.toml         public addresses (written by `init`)
//!   ca.crt  ca.key       the CA certificate, and its key (0600); with a CA signer the key
//!                        lives in the signer's state directory instead (see `signer`)
//!   server.crt server.key the server certificate, and its key (0600)
//!   gateway.db           SQLite registry and audit log (0600; WAL files beside it)
//!   audit.key            the key that signs audit checkpoints (0600; see `checkpoint`),
//!                        unless `--audit-key` keeps it elsewhere
//! ```

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use pinhole_certs::ca::{SERVER_DAYS, pem_decode, pem_encode};
use pinhole_certs::fsutil::write_private_atomic;
use pinhole_certs::{CertificateAuthority, GatewayAddress, Identity, Pin, Validity};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::audit::{AuditKey, AuditPublicKey};
use crate::disk::DiskReserve;
use crate::store::Store;

/// The first portal administrator.
pub const FIRST_ADMIN: &str = "admin";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    public_addresses: Vec<String>,
}

/// Paths in the state directory, and the settings that go with it.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    audit_key: Option<PathBuf>,
    disk_reserve: DiskReserve,
}

/// What `init` created, for the operator.
#[derive(Debug)]
pub struct Initialized {
    pub pin: Pin,
    pub admin: String,
    pub admin_password: Zeroizing<String>,
    pub audit_public_key: AuditPublicKey,
}

/// Everything `serve` and the account commands need.
pub struct Loaded {
    /// The CA certificate (`ca.crt`, DER).
    pub ca_cert: CertificateDer<'static>,
    /// The CA with its key, when `ca.key` is here; `None` when a CA signer keeps it (see
    /// [`crate::signer::open`]).
    pub ca: Option<CertificateAuthority>,
    pub server: Identity,
    pub addresses: Vec<GatewayAddress>,
    pub pin: Pin,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("addresses", &self.addresses)
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

/// A random password from an alphabet without look-alikes (no 0/O, 1/l/I): 20 characters of 56
/// give 116 bits.
pub fn generate_password() -> Zeroizing<String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = Zeroizing::new(String::with_capacity(24));
    let mut i = 0;
    while i < 20 {
        let [b] = crate::store::random_bytes::<1>();
        // Rejection sampling keeps every character equally likely.
        if usize::from(b) < 256 - 256 % ALPHABET.len() {
            out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            i += 1;
        }
    }
    out
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::PasswordHasher;
    let salt = crate::store::random_bytes::<16>();
    let hash = argon2::Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
    Ok(hash.to_string())
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            audit_key: None,
            disk_reserve: DiskReserve::default(),
        }
    }

    /// Keeps the audit key at `path` instead of `STATE/audit.key`.
    pub fn with_audit_key(mut self, path: Option<PathBuf>) -> Self {
        self.audit_key = path;
        self
    }

    /// The free space below which the gateway warns (see [`crate::disk`]).
    pub fn with_disk_reserve(mut self, reserve: DiskReserve) -> Self {
        self.disk_reserve = reserve;
        self
    }

    pub fn disk_reserve(&self) -> DiskReserve {
        self.disk_reserve
    }

    /// Where the audit key is: `--audit-key`, else `STATE/audit.key`.
    pub fn audit_key_path(&self) -> PathBuf {
        self.audit_key
            .clone()
            .unwrap_or_else(|| self.file("audit.key"))
    }

    /// The audit key, created on first use (state directories initialized before it existed
    /// get theirs at the first checkpoint or server start).
    /// A key given with `--audit-key` must exist (a mistyped path must not quietly start a
    /// new key); only `init` creates one there.
    pub fn audit_key(&self) -> anyhow::Result<AuditKey> {
        if let Some(path) = &self.audit_key
            && !path.exists()
        {
            bail!(
                "there is no audit key at {} (--audit-key): check the path; `init` creates the key",
                path.display()
            );
        }
        Ok(AuditKey::load_or_create(&self.audit_key_path())?)
    }

    /// The audit key's public half, for verifying: never creates a key (a new key would not
    /// verify anything).
    pub fn audit_public_key(&self) -> anyhow::Result<AuditPublicKey> {
        let path = self.audit_key_path();
        if !path.exists() {
            bail!(
                "there is no audit key at {}: give the audit public key you stored (--audit-public-key HEX), or point --audit-key at the key",
                path.display()
            );
        }
        Ok(AuditKey::load(&path)?.public_key())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("gateway.db")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates the CA, the server key and certificate, the database and the first admin.
    pub fn init(&self, addresses: &[GatewayAddress]) -> anyhow::Result<Initialized> {
        if addresses.is_empty() {
            bail!(
                "give at least one --public-address HOST:PORT (the address technicians and sites dial)"
            );
        }
        if self.file("gateway.toml").exists() || self.db().exists() {
            bail!(
                "{} is already initialized (gateway.toml or gateway.db exists); refusing to overwrite it",
                self.root.display()
            );
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("securing {}", self.root.display()))?;

        let audit_key = AuditKey::load_or_create(&self.audit_key_path())?;
        let ca = CertificateAuthority::generate("gateway").context("creating the CA")?;
        let mut names: Vec<String> = addresses.iter().map(|a| a.host().to_owned()).collect();
        names.dedup();
        let server = ca
            .issue_server(&names, Validity::days_from_now(SERVER_DAYS))
            .context("issuing the server certificate")?;
        let pin = Pin::of_certificate(server.certificate()).context("server pin")?;

        write_private_atomic(&self.file("ca.key"), ca.key_pem().as_bytes())
            .context("writing ca.key")?;
        write_private_atomic(&self.file("server.key"), server.key_pem().as_bytes())
            .context("writing server.key")?;
        fs::write(self.file("ca.crt"), ca.cert_pem()).context("writing ca.crt")?;
        fs::write(
            self.file("server.crt"),
            pem_encode("CERTIFICATE", server.certificate()),
        )
        .context("writing server.crt")?;

        let mut store = Store::open(&self.db()).context("creating the database")?;
        fs::set_permissions(self.db(), fs::Permissions::from_mode(0o600))?;
        store
            .record(
                &crate::audit::Actor::System,
                "gateway",
                "gateway initialized",
                &format!(
                    "public addresses {}; server pin {pin}; audit key {}",
                    addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    audit_key.public_key()
                ),
            )
            .context("writing the audit log")?;
        let password = generate_password();
        store
            .create_admin(FIRST_ADMIN, &hash_password(&password)?)
            .context("creating the first administrator")?;

        // Written last: its presence marks a complete initialization.
        let config = Config {
            public_addresses: addresses.iter().map(ToString::to_string).collect(),
        };
        fs::write(
            self.file("gateway.toml"),
            toml::to_string(&config).context("encoding gateway.toml")?,
        )
        .context("writing gateway.toml")?;
        Ok(Initialized {
            pin,
            admin: FIRST_ADMIN.into(),
            admin_password: password,
            audit_public_key: audit_key.public_key(),
        })
    }

    /// Loads the keys and the configuration.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let config_path = self.file("gateway.toml");
        let text = fs::read_to_string(&config_path).with_context(|| {
            format!(
                "reading {} (run `pinhole-gateway init --state {}` first)",
                config_path.display(),
                self.root.display()
            )
        })?;
        let config: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
        let addresses = config
            .public_addresses
            .iter()
            .map(|a| a.parse::<GatewayAddress>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("in {}", config_path.display()))?;
        let read = |name: &str| {
            fs::read_to_string(self.file(name))
                .with_context(|| format!("reading {}", self.file(name).display()))
        };
        let ca_pem = read("ca.crt")?;
        let ca_cert =
            CertificateDer::from(pem_decode("CERTIFICATE", &ca_pem).context("ca.crt is not PEM")?);
        let ca = if self.file("ca.key").exists() {
            let ca_key = Zeroizing::new(read("ca.key")?);
            Some(CertificateAuthority::from_pem(&ca_pem, &ca_key).context("loading the CA")?)
        } else {
            None
        };
        let server_cert =
            pem_decode("CERTIFICATE", &read("server.crt")?).context("server.crt is not PEM")?;
        let server_key = Zeroizing::new(
            pem_decode("PRIVATE KEY", &Zeroizing::new(read("server.key")?))
                .context("server.key is not a PKCS#8 PEM key")?,
        );
        let pin = Pin::of_certificate(&server_cert).context("server.crt")?;
        let server = Identity::from_parts(
            server_key,
            vec![CertificateDer::from(server_cert), ca_cert.clone()],
        )
        .context("server.key does not belong to server.crt")?;
        Ok(Loaded {
            ca_cert,
            ca,
            server,
            addresses,
            pin,
        })
    }

    pub fn store(&self) -> anyhow::Result<Store> {
        if !self.db().exists() {
            bail!(
                "{} does not exist (run `pinhole-gateway init --state {}` first)",
                self.db().display(),
                self.root.display()
            );
        }
        Store::open(&self.db()).with_context(|| format!("opening {}", self.db().display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_reinit() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path().join("gw"));
        let addrs = vec![
            "gw.example.com:443".parse().expect("a"),
            "gw.example.com:11444".parse().expect("b"),
        ];
        let init = state.init(&addrs).expect("init");
        assert_eq!(init.admin_password.len(), 20);
        let loaded = state.load().expect("load");
        assert_eq!(loaded.pin, init.pin);
        assert_eq!(loaded.addresses, addrs);
        for (f, mode) in [
            ("audit.key", 0o600),
            ("ca.key", 0o600),
            ("server.key", 0o600),
            ("gateway.db", 0o600),
        ] {
            let m = fs::metadata(dir.path().join("gw").join(f))
                .expect(f)
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        assert_eq!(
            fs::metadata(dir.path().join("gw"))
                .expect("dir")
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert!(state.init(&addrs).is_err());
        assert_eq!(
            state.audit_public_key().expect("audit key"),
            init.audit_public_key
        );
    }

    #[test]
    fn passwords_differ_and_use_the_alphabet() {
        let a = generate_password();
        let b = generate_password();
        assert_ne!(*a, *b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() && !"0O1lI".contains(c))
        );
        let h = hash_password(&a).expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains(a.as_str()));
    }
}
