//! Signed checkpoints of the audit log, and the key that signs them.
//!
//! The hash chain ([`crate::audit::verify`]) shows an edit in the middle of the log, but anyone
//! with the database file can cut rows off its end, or rewrite a row and recompute every hash
//! after it: the chain has no secret. A checkpoint closes both holes. It states how many rows
//! the log had and the hash of the last one (which, through the chain, fixes every row before
//! it), when, and is signed with the gateway's audit key (Ed25519):
//!
//! ```text
//! pinhole-audit-checkpoint v1 rows=42 head=<64 hex> time=2026-11-27T10:00:00Z key=<64 hex> sig=<128 hex>
//! ```
//!
//! The operator keeps these lines away from the gateway (another machine, a ticket, the system
//! log's remote copy) together with the audit public key. Verifying one against the database
//! ([`verify_checkpoint`]) finds a log cut before the checkpoint (fewer rows), a rewritten log
//! (another hash at that row) and a forged or altered checkpoint (bad signature, or signed by a
//! key that is not the trusted one). A line is verified against the key the verifier trusts —
//! the operator's copy of the public key, or the gateway's own key file — never merely the key
//! it names, which anyone can make.
//!
//! The signature covers a canonical, versioned encoding: each field length-prefixed (u32
//! big-endian) as in the row hash, starting with `pinhole-audit-checkpoint-v1`, then rows (u64
//! big-endian), head, time and public key.
//!
//! The key lives in `STATE/audit.key` (PKCS#8 PEM, mode 0600) or wherever `--audit-key` puts
//! it: kept on another file system or device, a thief of the database alone cannot sign.
//!
//! Must never: accept a checkpoint on the strength of the key it names alone.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use pinhole_certs::ca::{pem_decode, pem_encode};
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::audit::{GENESIS, put};

/// The first word of a checkpoint line, also how one is found inside a longer log line.
pub const MARKER: &str = "pinhole-audit-checkpoint";

/// The format version: the text layout and the signed encoding together.
const VERSION: &str = "v1";

/// Domain separation: a checkpoint signature can never be taken for another signed message.
const SIGNED_CONTEXT: &[u8] = b"pinhole-audit-checkpoint-v1";

/// Group or other may not read the key: the same rule as ssh for private keys.
const PRIVATE_BITS: u32 = 0o077;

/// Why the audit key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot read the audit key {}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write the audit key {} (does its directory exist?)", .path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the audit key {} may be read by group or others (mode {mode:o}); make it private: chmod 600 {}",
        .path.display(), .path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{} is not an Ed25519 private key (PKCS#8 PEM)", .path.display())]
    Invalid { path: PathBuf },
    #[error("cannot generate an Ed25519 key")]
    Generate,
}

/// The key that signs checkpoints.
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A new key, in memory only.
    pub fn generate() -> Result<Self, AuditKeyError> {
        let pair = Ed25519KeyPair::generate().map_err(|_| AuditKeyError::Generate)?;
        Ok(Self { pair })
    }

    /// Loads the key at `path`, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Self, AuditKeyError> {
        let read = |source| AuditKeyError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        if meta.mode() & PRIVATE_BITS != 0 {
            return Err(AuditKeyError::Exposed {
                path: path.to_owned(),
                mode: meta.mode() & 0o777,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(read)?);
        let invalid = || AuditKeyError::Invalid {
            path: path.to_owned(),
        };
        let der = Zeroizing::new(pem_decode("PRIVATE KEY", &text).ok_or_else(invalid)?);
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|_| invalid())?;
        Ok(Self { pair })
    }

    /// Loads the key at `path`, or creates it there (mode 0600) if there is none.
    ///
    /// Two processes creating it at once (the server starting while the CLI takes a
    /// checkpoint) end with one key: the file is linked into place only if the name is free,
    /// and the loser loads the winner's.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditKeyError> {
        match fs::symlink_metadata(path) {
            Ok(_) => return Self::load(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AuditKeyError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let key = Self::generate()?;
        let der = key.pair.to_pkcs8().map_err(|_| AuditKeyError::Generate)?;
        let pem = Zeroizing::new(pem_encode("PRIVATE KEY", der.as_ref()));
        match pinhole_certs::fsutil::write_private_new(path, pem.as_bytes()) {
            Ok(()) => {
                tracing::info!(
                    path = %crate::audit::escape(&path.to_string_lossy()),
                    public_key = %key.public_key(),
                    "created the audit signing key"
                );
                Ok(key)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(source) => Err(AuditKeyError::Write {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn public_key(&self) -> AuditPublicKey {
        let mut key = [0; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        AuditPublicKey(key)
    }
}

/// An audit public key: 32 bytes, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AuditPublicKey([u8; 32]);

impl AuditPublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for AuditPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for AuditPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditPublicKey({self})")
    }
}

impl Serialize for AuditPublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a text is not an audit public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an audit public key is 64 hex digits, as `init` and `status` print it")]
pub struct ParseKeyError;

impl FromStr for AuditPublicKey {
    type Err = ParseKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fixed_hex(s, "key").map(Self).map_err(|_| ParseKeyError)
    }
}

fn fixed_hex<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], ParseCheckpointError> {
    let mut out = [0; N];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| ParseCheckpointError::Field(what, N * 2))?;
    Ok(out)
}

/// Why a line is not a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseCheckpointError {
    #[error("not a checkpoint: it must start with `{MARKER} {VERSION}`")]
    NotACheckpoint,
    #[error("checkpoint format {0} is not supported (this gateway reads {VERSION})")]
    Version(String),
    #[error(
        "malformed checkpoint: expected `{MARKER} {VERSION} rows=N head=HEX time=RFC3339 key=HEX sig=HEX`"
    )]
    Layout,
    #[error("malformed checkpoint: {0} must be {1} hex digits")]
    Field(&'static str, usize),
    #[error("malformed checkpoint: rows must be a number")]
    Rows,
    #[error("malformed checkpoint: time must be RFC 3339 UTC")]
    Time,
}

/// A signed statement of the audit log's length and last hash at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// How many rows the log had (the id of its last row).
    pub rows: u64,
    /// The hash of row `rows` (all zeros for an empty log).
    #[serde(serialize_with = "hex_ser")]
    pub head: [u8; 32],
    /// When, UTC, RFC 3339.
    pub time: String,
    /// The key that signed it.
    pub key: AuditPublicKey,
    #[serde(serialize_with = "hex_ser")]
    signature: [u8; 64],
}

fn hex_ser<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

impl Checkpoint {
    /// The bytes the signature covers.
    fn signed_bytes(rows: u64, head: &[u8; 32], time: &str, key: &AuditPublicKey) -> Vec<u8> {
        let mut buf = Vec::with_capacity(160);
        put(&mut buf, SIGNED_CONTEXT);
        put(&mut buf, &rows.to_be_bytes());
        put(&mut buf, head);
        put(&mut buf, time.as_bytes());
        put(&mut buf, key.as_bytes());
        buf
    }

    /// Whether the signature is valid for the key the checkpoint names.
    pub fn signature_valid(&self) -> bool {
        let msg = Self::signed_bytes(self.rows, &self.head, &self.time, &self.key);
        UnparsedPublicKey::new(&ED25519, self.key.as_bytes())
            .verify(&msg, &self.signature)
            .is_ok()
    }

    /// The checkpoint inside `line` (e.g. a system log line), if it holds one.
    pub fn find(line: &str) -> Option<Result<Self, ParseCheckpointError>> {
        let rest = &line[line.find(MARKER)?..];
        // A checkpoint ends with its signature's hex digits: what a log line or an export
        // wraps around it (a closing quote, a JSON brace) is not part of it.
        let end = rest.find(" sig=").map_or(rest.len(), |s| {
            let hex = s + " sig=".len();
            hex + rest[hex..]
                .bytes()
                .take_while(u8::is_ascii_hexdigit)
                .count()
        });
        Some(rest[..end].trim_end().parse())
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MARKER} {VERSION} rows={} head={} time={} key={} sig={}",
            self.rows,
            hex::encode(self.head),
            self.time,
            self.key,
            hex::encode(self.signature)
        )
    }
}

impl FromStr for Checkpoint {
    type Err = ParseCheckpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut words = s.split_ascii_whitespace();
        if words.next() != Some(MARKER) {
            return Err(ParseCheckpointError::NotACheckpoint);
        }
        match words.next() {
            Some(VERSION) => {}
            Some(v) => return Err(ParseCheckpointError::Version(v.to_owned())),
            None => return Err(ParseCheckpointError::Layout),
        }
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|w| w.strip_prefix(name)?.strip_prefix('='))
                .ok_or(ParseCheckpointError::Layout)
        };
        let rows = field("rows")?
            .parse()
            .map_err(|_| ParseCheckpointError::Rows)?;
        let head = fixed_hex(field("head")?, "head")?;
        let time = field("time")?.to_owned();
        let key = AuditPublicKey(fixed_hex(field("key")?, "key")?);
        let signature = fixed_hex(field("sig")?, "sig")?;
        if words.next().is_some() {
            return Err(ParseCheckpointError::Layout);
        }
        time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339)
            .map_err(|_| ParseCheckpointError::Time)?;
        Ok(Self {
            rows,
            head,
            time,
            key,
            signature,
        })
    }
}

/// Why a checkpoint could not be taken or checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("reading the audit log")]
    Sql(#[from] rusqlite::Error),
    #[error("audit row {0} has a malformed hash")]
    MalformedHash(i64),
}

/// The log's length and last hash, signed with `key`.
pub fn checkpoint(conn: &Connection, key: &AuditKey) -> Result<Checkpoint, CheckpointError> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (rows, head) = match last {
        Some((id, hash)) => {
            let head: [u8; 32] = hash
                .try_into()
                .map_err(|_| CheckpointError::MalformedHash(id))?;
            // Row ids start at 1 (see `audit::append`).
            (u64::try_from(id).unwrap_or(0), head)
        }
        None => (0, GENESIS),
    };
    let time = crate::store::now_rfc3339();
    let public = key.public_key();
    let msg = Checkpoint::signed_bytes(rows, &head, &time, &public);
    let mut signature = [0; 64];
    signature.copy_from_slice(key.pair.sign(&msg).as_ref());
    Ok(Checkpoint {
        rows,
        head,
        time,
        key: public,
        signature,
    })
}

/// The audit event that records a checkpoint taken by [`crate::store::Store::record_checkpoint`];
/// its description is the checkpoint line.
pub const CHECKPOINT_EVENT: &str = "audit checkpoint";

/// The last checkpoint recorded in the log itself, if any (for `status`; a checkpoint proves
/// something only from a copy kept elsewhere).
pub fn last_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, CheckpointError> {
    let line: Option<String> = conn
        .query_row(
            "SELECT description FROM audit WHERE event = ?1 ORDER BY id DESC LIMIT 1",
            [CHECKPOINT_EVENT],
            |r| r.get(0),
        )
        .optional()?;
    Ok(line.and_then(|l| l.parse().ok()))
}

/// What a checkpoint says about the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointVerdict {
    /// The log holds the checkpoint's rows unchanged (and may have more).
    Holds,
    /// The log has fewer rows than the checkpoint: its end was cut off.
    Cut { rows: u64, have: u64 },
    /// Row `row` has another hash than the checkpoint: rows up to it were rewritten.
    Rewritten { row: u64 },
    /// The signature does not match the checkpoint's contents: altered or forged.
    BadSignature,
    /// Signed by a key other than the trusted one.
    OtherKey { key: AuditPublicKey },
}

impl fmt::Display for CheckpointVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Holds => f.write_str("holds"),
            Self::Cut { rows, have } => write!(
                f,
                "the log was CUT: the checkpoint covers {rows} rows, the log has {have} (rows {} to {rows} deleted)",
                have + 1
            ),
            Self::Rewritten { row } => write!(
                f,
                "the log was REWRITTEN: row {row} does not have the hash the checkpoint records"
            ),
            Self::BadSignature => f.write_str(
                "the checkpoint's signature is NOT VALID: the checkpoint was altered or forged",
            ),
            Self::OtherKey { key } => write!(
                f,
                "the checkpoint is signed by ANOTHER KEY ({key}), not the trusted audit key"
            ),
        }
    }
}

/// Checks `cp` against the log, trusting only signatures by `trusted`.
pub fn verify_checkpoint(
    conn: &Connection,
    cp: &Checkpoint,
    trusted: &AuditPublicKey,
) -> Result<CheckpointVerdict, CheckpointError> {
    if !cp.signature_valid() {
        return Ok(CheckpointVerdict::BadSignature);
    }
    if cp.key != *trusted {
        return Ok(CheckpointVerdict::OtherKey { key: cp.key });
    }
    if cp.rows == 0 {
        return Ok(CheckpointVerdict::Holds);
    }
    let have = u64::try_from(crate::audit::last_id(conn)?).unwrap_or(0);
    if have < cp.rows {
        return Ok(CheckpointVerdict::Cut {
            rows: cp.rows,
            have,
        });
    }
    let row = i64::try_from(cp.rows).unwrap_or(i64::MAX);
    let hash: Option<Vec<u8>> = conn
        .query_row("SELECT hash FROM audit WHERE id = ?1", [row], |r| r.get(0))
        .optional()?;
    if hash.as_deref() != Some(&cp.head[..]) {
        return Ok(CheckpointVerdict::Rewritten { row: cp.rows });
    }
    Ok(CheckpointVerdict::Holds)
}
