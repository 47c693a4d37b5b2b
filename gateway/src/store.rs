//! The registry: domains, sites, accounts, grants, enrollment tokens, revoked serials and the
//! audit log, in one SQLite file.
//!
//! Every change is one transaction that also appends its audit record ([`crate::audit`]); the
//! database runs in WAL mode with `synchronous=FULL`, so a committed change and its record
//! survive power loss, and a failed audit write refuses the change. The CLI and the running
//! server open the same file; the server notices the CLI's commits through SQLite's
//! `data_version` (see [`Store::data_version`]).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use pinhole_proto::{Agent, SiteView};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::{self, Actor};
use crate::syslog::Syslog;

/// First technician tunnel address: 100.64.0.0/10 (RFC 6598 shared space, which no plant or
/// office network should use), skipping .0 (network) and .1 (reserved for the gateway).
const TUNNEL_BASE: u32 = u32::from_be_bytes([100, 64, 0, 1]);

/// Size of the tunnel range: a /10.
const TUNNEL_SIZE: u32 = 1 << 22;

/// Enrollment tokens: 24 random bytes, hex. Only their SHA-256 is stored.
const TOKEN_BYTES: usize = 24;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    enrolled TEXT NOT NULL,
    serial BLOB NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT,
    software TEXT,
    boot_id TEXT,
    revoked TEXT,
    agents TEXT NOT NULL DEFAULT '[]',
    switched_off INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    closed TEXT,
    serial BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    account TEXT NOT NULL REFERENCES accounts(name),
    domain TEXT NOT NULL REFERENCES domains(name),
    PRIMARY KEY (account, domain)
);
CREATE INDEX IF NOT EXISTS sites_by_domain ON sites(domain);
CREATE TABLE IF NOT EXISTS revoked (
    serial BLOB PRIMARY KEY,
    revoked TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    domain TEXT NOT NULL REFERENCES domains(name),
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    used TEXT,
    site TEXT
);
CREATE TABLE IF NOT EXISTS admins (
    name TEXT PRIMARY KEY,
    password TEXT NOT NULL,
    must_change INTEGER NOT NULL,
    created TEXT NOT NULL
);
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("enrollment token refused: {0}")]
    TokenRefused(&'static str),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The database's files (syncing the write-ahead log).
    #[error("database file: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Every column a migration may add, as (table, column): SQLite cannot bind identifiers, so
/// [`add_column_if_missing`] puts names into its `ALTER TABLE` only from this list.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("sites", "revoked"),
    ("sites", "switched_off"),
    ("accounts", "expires"),
    ("accounts", "forbid_remembered_password"),
    ("accounts", "domain"),
    ("tokens", "site"),
    ("admins", "role"),
    ("admins", "domain"),
    ("admins", "totp_secret"),
    ("admins", "totp_last_step"),
    ("admins", "closed"),
];

/// Adds `column` with `declaration` (its type and constraints, say `INTEGER NOT NULL
/// DEFAULT 0`) to `table` unless the table has it already (SQLite's `pragma_table_info`): the
/// one migration step of the schema upgrades. The names must be a pair of [`ADDED_COLUMNS`]
/// and the declaration a constant of the code, so no SQL is built from input; another pair is
/// [`StoreError::Invalid`] and changes nothing. Returns whether the column was added.
pub(crate) fn add_column_if_missing(
    conn: &Connection,
    table: &'static str,
    column: &'static str,
    declaration: &'static str,
) -> Result<bool> {
    if !ADDED_COLUMNS.contains(&(table, column)) {
        return Err(StoreError::Invalid(format!(
            "{table}.{column} is not a column a migration adds"
        )));
    }
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get(0),
    )?;
    if has {
        return Ok(false);
    }
    conn.execute_batch(&format!(
        "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
    ))?;
    Ok(true)
}

pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// When a certificate issued now for `days` expires, as the issuer computes it
/// (`Validity::days_from_now`), to the second.
pub fn expiry(days: i64) -> String {
    rfc3339(OffsetDateTime::now_utc() + time::Duration::days(days))
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    // Second precision keeps the text sortable and readable; formatting a UTC time in RFC 3339
    // cannot fail for years 0..=9999.
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// A domain path: lower-case labels joined by dots (`acme.plant-a.line-3`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DomainPath(String);

impl FromStr for DomainPath {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 200
            && s.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(StoreError::Invalid(format!(
                "`{s}` is not a domain: use lower-case labels of letters, digits and `-`, joined by `.` (e.g. acme.plant-a)"
            )))
        }
    }
}

impl DomainPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path and its ancestors, root first: `acme`, `acme.plant-a`.
    fn lineage(&self) -> Vec<String> {
        let labels: Vec<&str> = self.0.split('.').collect();
        (1..=labels.len()).map(|n| labels[..n].join(".")).collect()
    }
}

/// Whether `domain` is `grant` or below it (`acme.plant-a` is within `acme`, `acme2` is not).
pub fn within(domain: &str, grant: &str) -> bool {
    domain
        .strip_prefix(grant)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

impl fmt::Display for DomainPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteRow {
    pub name: String,
    pub domain: String,
    pub enrolled: String,
    pub online: bool,
    pub last_seen: Option<String>,
    pub software: Option<String>,
    pub boot_id: Option<String>,
    /// When its certificate was revoked (`site revoke`): it cannot log in until removed and
    /// enrolled again.
    pub revoked: Option<String>,
    pub agents: Vec<Agent>,
    /// Offline because its remote access switch was turned off (it said so before it
    /// closed its link); cleared when it connects again.
    pub switched_off: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountRow {
    pub name: String,
    pub created: String,
    pub closed: Option<String>,
    /// When its certificate expires (RFC 3339); `None` for accounts stored before expiries
    /// were recorded.
    pub expires: Option<String>,
    pub tunnel_ip: Ipv4Addr,
    pub grants: Vec<String>,
    /// Its technicians' clients must not remember the bundle password (in the desktop's Secret
    /// Service); told to the client in the login's welcome.
    pub forbid_remembered_password: bool,
    #[serde(skip)]
    pub serial: Vec<u8>,
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

pub use pinhole_certs::random as random_bytes;

fn tunnel_ip(id: i64) -> Result<Ipv4Addr> {
    let id = u32::try_from(id)
        .ok()
        .filter(|i| *i < TUNNEL_SIZE - 2)
        .ok_or_else(|| StoreError::Invalid("tunnel address space exhausted".into()))?;
    Ok(Ipv4Addr::from(TUNNEL_BASE + id))
}

/// What changed between two stored agent lists (JSON), in words: which agents were added,
/// removed or changed, each with its address and ports. Bounded by the agent limits
/// ([`pinhole_proto::validate`]); the full lists stay in the `sites` table, not in every
/// audit row, so a site reloading its configuration cannot grow the log by megabytes.
fn agents_change(old: &str, new: &str) -> String {
    let parse = |s: &str| serde_json::from_str::<Vec<Agent>>(s).unwrap_or_default();
    let (old, new) = (parse(old), parse(new));
    let describe = |a: &Agent| format!("{} ({} {} {})", a.name, a.kind, a.address, a.ports_text());
    let mut parts = Vec::new();
    for a in &new {
        match old.iter().find(|o| o.name == a.name) {
            None => parts.push(format!("added {}", describe(a))),
            Some(o) if o != a => parts.push(format!("changed {} to {}", describe(o), describe(a))),
            Some(_) => {}
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|a| a.name == o.name)) {
        parts.push(format!("removed {}", describe(o)));
    }
    let mut text = format!("{} agents now", new.len());
    for p in parts {
        // One row stays small whatever the site sends: at most 8 KB of detail.
        if text.len() + p.len() > 8 * 1024 {
            text.push_str("; …");
            break;
        }
        text.push_str("; ");
        text.push_str(&p);
    }
    text
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
    syslog: Syslog,
    /// The background flusher of the write-ahead log ([`Store::sync_wal_soon`]), started at
    /// its first use.
    flusher: std::sync::OnceLock<std::sync::mpsc::Sender<PathBuf>>,
}

/// A write transaction whose audit records go to the system log once it commits.
///
/// It is `IMMEDIATE`: it holds SQLite's write lock from the start, so the rows after
/// `last_id` at commit are exactly the ones it appended. Dropped without [`AuditTx::commit`],
/// it rolls back and sends nothing.
pub(crate) struct AuditTx<'a> {
    tx: Transaction<'a>,
    last_id: i64,
    syslog: &'a Syslog,
}

impl<'a> Deref for AuditTx<'a> {
    type Target = Transaction<'a>;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl AuditTx<'_> {
    /// Commits, then copies the records this transaction appended to the system log.
    pub(crate) fn commit(self) -> Result<()> {
        let records = audit::after(&self.tx, self.last_id)?;
        self.tx.commit()?;
        self.syslog.send(&records);
        Ok(())
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit is on disk before it returns, so an acknowledged action's audit record
        // survives power loss (NORMAL in WAL mode may lose the last transactions).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(audit::SCHEMA)?;
        Self::upgrade(&conn)?;
        // Unit tests never write to the host's system log.
        let syslog = if cfg!(test) {
            Syslog::disabled()
        } else {
            Syslog::from_env()
        };
        Ok(Self {
            conn,
            syslog,
            flusher: std::sync::OnceLock::new(),
        })
    }

    /// Sends committed audit records to `syslog` instead of `$PINHOLE_SYSLOG_SOCKET` or
    /// `/dev/log`.
    pub fn with_syslog(mut self, syslog: Syslog) -> Self {
        self.syslog = syslog;
        self
    }

    /// Brings a database created by an older gateway to the current schema: each column
    /// added since the first schema, if missing ([`add_column_if_missing`]).
    fn upgrade(conn: &Connection) -> Result<()> {
        // Sites and accounts stored before a column existed read as its default: not revoked,
        // no expiry shown until re-issued, a token for any site, switched on, a remembered
        // password allowed.
        add_column_if_missing(conn, "sites", "revoked", "TEXT")?;
        add_column_if_missing(conn, "accounts", "expires", "TEXT")?;
        add_column_if_missing(conn, "tokens", "site", "TEXT")?;
        add_column_if_missing(conn, "sites", "switched_off", "INTEGER NOT NULL DEFAULT 0")?;
        add_column_if_missing(
            conn,
            "accounts",
            "forbid_remembered_password",
            "INTEGER NOT NULL DEFAULT 0",
        )?;
        crate::portal::admins::upgrade(conn)?;
        Ok(())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Group commit, step 1: this connection's commits from now on are written to the WAL but
    /// not synced (`synchronous=NORMAL`), until [`Store::end_deferred`]. Their actions must not
    /// be acknowledged before [`Store::sync_wal`] returns.
    pub fn defer_sync(&mut self) -> Result<()> {
        Ok(self.conn.pragma_update(None, "synchronous", "NORMAL")?)
    }

    /// Group commit, step 2: commits are synced again one by one (`synchronous=FULL`).
    pub fn end_deferred(&mut self) -> Result<()> {
        Ok(self.conn.pragma_update(None, "synchronous", "FULL")?)
    }

    /// The write-ahead log's path (the file [`Store::sync_wal`] syncs), if the database is a
    /// file.
    pub fn wal_path(&self) -> Option<std::path::PathBuf> {
        self.conn
            .path()
            .filter(|p| !p.is_empty())
            .map(|p| std::path::PathBuf::from(format!("{p}-wal")))
    }

    /// Group commit, step 3: makes every commit written so far durable with one `fsync` of the
    /// write-ahead log at `wal` ([`Store::wal_path`]). In WAL mode a commit is durable once its
    /// frames are on disk: `synchronous=FULL` syncs the log at every commit, this syncs the
    /// frames of many commits at once (SQLite's "WAL mode" documentation, `synchronous`). Needs
    /// no lock: the log stays while any connection (the server's) is open.
    ///
    /// A failure sticks for the life of the process: after a failed `fsync` Linux marks the
    /// pages clean and reports the error only once, to descriptors open at the time, so a later
    /// `fsync` on a new descriptor may succeed with the lost frames never written ("fsyncgate";
    /// PostgreSQL's answer is the same: no retry). Every later call fails too; a log that cannot
    /// be opened fails this call only.
    pub fn sync_wal(wal: &Path) -> Result<()> {
        use std::sync::atomic::{AtomicBool, Ordering};
        static FAILED: AtomicBool = AtomicBool::new(false);
        if FAILED.load(Ordering::Acquire) {
            return Err(std::io::Error::other(
                "an earlier sync of the database's log failed: restart the gateway",
            )
            .into());
        }
        let synced = std::fs::File::open(wal)?.sync_data();
        if synced.is_err() {
            FAILED.store(true, Ordering::Release);
        }
        Ok(synced?)
    }

    /// Changes when another connection (the CLI) commits: the server polls it to act on
    /// administrative changes at once.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    pub(crate) fn tx(&mut self) -> Result<AuditTx<'_>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last_id = audit::last_id(&tx)?;
        Ok(AuditTx {
            tx,
            last_id,
            syslog: &self.syslog,
        })
    }

    /// Starts an `fsync` of the write-ahead log in a thread of its own and returns at once: the
    /// commits written so far become durable while the caller goes on (relays a session
    /// request to its site, say), instead of after ([`Store::unflushed`] alone) or before (a
    /// `synchronous=FULL` commit, on the caller's way). Requests made while one runs are
    /// served by one more `fsync`. A failure is logged and sticks ([`Store::sync_wal`]): the
    /// group commit of site hellos fails from then on; SQLite's own `synchronous=FULL` commits
    /// report their own failures to their callers.
    pub(crate) fn sync_wal_soon(&self) {
        let Some(wal) = self.wal_path() else {
            return;
        };
        let tx = self.flusher.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
            let spawned = std::thread::Builder::new()
                .name("wal-flusher".into())
                .spawn(move || {
                    while let Ok(mut wal) = rx.recv() {
                        while let Ok(next) = rx.try_recv() {
                            wal = next;
                        }
                        if let Err(e) = Store::sync_wal(&wal) {
                            tracing::warn!(error = %e, "cannot sync the database's log in the background");
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the log flusher: records wait for the next durable commit");
            }
            tx
        });
        let _ = tx.send(wal);
    }

    /// Runs `f` with `synchronous=NORMAL`: its commits reach the write-ahead log but are not
    /// flushed to disk; the next commit with `synchronous=FULL` (every other one) flushes them
    /// with its own, since the log is written and replayed in order (SQLite's "WAL mode"
    /// documentation, `synchronous`). `FULL` is back when this returns, whatever `f` did.
    pub(crate) fn unflushed<T, E: From<rusqlite::Error>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let out = f(self);
        let back = self.conn.pragma_update(None, "synchronous", "FULL");
        let out = out?;
        back?;
        Ok(out)
    }

    /// Records an event that changes nothing else (login, logout, refusal).
    pub fn record(
        &mut self,
        actor: &Actor,
        object: &str,
        event: &str,
        description: &str,
    ) -> Result<()> {
        let tx = self.tx()?;
        audit::append(&tx, actor, object, event, description)?;
        tx.commit()?;
        Ok(())
    }

    /// Takes a checkpoint of the audit log ([`audit::checkpoint`]) and records it as the next
    /// row, in one transaction: no record can come between the two.
    pub fn record_checkpoint(
        &mut self,
        actor: &Actor,
        key: &audit::AuditKey,
    ) -> Result<audit::Checkpoint> {
        let tx = self.tx()?;
        let cp = audit::checkpoint(&tx, key).map_err(|e| match e {
            audit::CheckpointError::Sql(e) => StoreError::Sql(e),
            e => StoreError::Invalid(e.to_string()),
        })?;
        audit::append(
            &tx,
            actor,
            "audit",
            audit::CHECKPOINT_EVENT,
            &cp.to_string(),
        )?;
        tx.commit()?;
        Ok(cp)
    }

    pub fn create_domain(&mut self, actor: &Actor, path: &DomainPath) -> Result<Vec<String>> {
        let tx = self.tx()?;
        let now = now_rfc3339();
        let mut created = Vec::new();
        for d in path.lineage() {
            if tx.execute(
                "INSERT OR IGNORE INTO domains (name, created) VALUES (?1, ?2)",
                params![d, now],
            )? == 1
            {
                audit::append(
                    &tx,
                    actor,
                    &format!("domain:{d}"),
                    "domain created",
                    &format!("domain {d} created"),
                )?;
                created.push(d);
            }
        }
        if created.is_empty() {
            return Err(StoreError::Exists(format!("domain {path}")));
        }
        tx.commit()?;
        Ok(created)
    }

    fn domain_exists(tx: &Connection, d: &str) -> Result<bool> {
        Ok(tx
            .query_row("SELECT 1 FROM domains WHERE name = ?1", [d], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// A one-time enrollment token for a site in `domain`, valid for `ttl`, usable by any site
    /// name (see [`Store::create_site_token`]).
    pub fn create_token(
        &mut self,
        actor: &Actor,
        domain: &DomainPath,
        ttl: Duration,
    ) -> Result<(String, String)> {
        self.create_site_token(actor, domain, None, ttl)
    }

    /// A one-time enrollment token for a site in `domain`, valid for `ttl`; with `site`, only a
    /// site of that name may use it.
    pub fn create_site_token(
        &mut self,
        actor: &Actor,
        domain: &DomainPath,
        site: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, String)> {
        if let Some(site) = site {
            pinhole_certs::ca::check_name(site).map_err(|e| StoreError::Invalid(e.to_string()))?;
        }
        let tx = self.tx()?;
        if !Self::domain_exists(&tx, domain.as_str())? {
            return Err(StoreError::NotFound(format!(
                "domain {domain} (create it with `domain create {domain}`)"
            )));
        }
        let token = hex::encode(random_bytes::<TOKEN_BYTES>());
        let now = OffsetDateTime::now_utc();
        let expires = rfc3339(now + ttl);
        tx.execute(
            "INSERT INTO tokens (hash, domain, created, expires, site) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                sha256(token.as_bytes()),
                domain.as_str(),
                rfc3339(now),
                expires,
                site
            ],
        )?;
        // The token itself never reaches the log: only a short fingerprint of its hash.
        let fp = &hex::encode(sha256(token.as_bytes()))[..12];
        audit::append(
            &tx,
            actor,
            &format!("domain:{domain}"),
            "enrollment token created",
            &match site {
                Some(site) => format!("token {fp}… for site {site}, valid until {expires}"),
                None => format!("token {fp}… valid until {expires}"),
            },
        )?;
        tx.commit()?;
        Ok((token, expires))
    }

    /// Enrolls a site: checks and consumes the token, then stores the site with the serial of
    /// the certificate that `issue()` returns (certificate DER, serial). A refusal changes and
    /// records nothing: refusals come from anonymous peers, and the hub records them in
    /// aggregate (one record per source and minute) so that a flood cannot fill the disk.
    pub fn enroll(
        &mut self,
        token: &str,
        site: &str,
        issue: impl FnOnce() -> std::result::Result<(Vec<u8>, Vec<u8>), String>,
    ) -> Result<Vec<u8>> {
        pinhole_certs::ca::check_name(site).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let hash = sha256(token.as_bytes());
        let fp = hex::encode(&hash)[..12].to_owned();
        let actor = Actor::Site(site.to_owned());
        let row: Option<(String, String, Option<String>, Option<String>)> = self
            .conn
            .query_row(
                "SELECT domain, expires, used, site FROM tokens WHERE hash = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let refusal = match &row {
            None => Some("unknown token"),
            Some((_, _, Some(_), _)) => Some("token already used"),
            Some((_, expires, None, _)) if expires.as_str() < now_rfc3339().as_str() => {
                Some("token expired")
            }
            Some((_, _, None, Some(bound))) if bound != site => {
                Some("this token was created for another site name")
            }
            Some(_) => None,
        };
        let exists = self
            .conn
            .query_row("SELECT 1 FROM sites WHERE name = ?1", [site], |_| Ok(()))
            .optional()?
            .is_some();
        let refusal = refusal.or(exists.then_some("a site with this name is already enrolled"));
        if let Some(why) = refusal {
            return Err(StoreError::TokenRefused(why));
        }
        let Some((domain, _, _, _)) = row else {
            return Err(StoreError::TokenRefused("unknown token"));
        };
        let (cert, serial) = issue().map_err(StoreError::Invalid)?;
        let tx = self.tx()?;
        let now = now_rfc3339();
        // Consume the token only if nobody else did meanwhile.
        if tx.execute(
            "UPDATE tokens SET used = ?1 WHERE hash = ?2 AND used IS NULL",
            params![now, hash],
        )? != 1
        {
            return Err(StoreError::TokenRefused("token already used"));
        }
        tx.execute(
            "INSERT INTO sites (name, domain, enrolled, serial) VALUES (?1, ?2, ?3, ?4)",
            params![site, domain, now, serial],
        )?;
        audit::append(
            &tx,
            &actor,
            &format!("domain:{domain}"),
            "enrollment token used",
            &format!("token {fp}… used by site {site}"),
        )?;
        audit::append(
            &tx,
            &actor,
            &format!("site:{site}"),
            "site enrolled",
            &format!("site {site} enrolled in domain {domain}"),
        )?;
        tx.commit()?;
        Ok(cert)
    }

    /// Stores a new account with its certificate serial; returns its tunnel address.
    pub fn create_account(
        &mut self,
        actor: &Actor,
        name: &str,
        serial: &[u8],
        days: i64,
    ) -> Result<Ipv4Addr> {
        let tx = self.tx()?;
        if tx
            .query_row("SELECT 1 FROM accounts WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some()
        {
            return Err(StoreError::Exists(format!("account {name}")));
        }
        tx.execute(
            "INSERT INTO accounts (name, created, serial, expires) VALUES (?1, ?2, ?3, ?4)",
            params![name, now_rfc3339(), serial, expiry(days)],
        )?;
        let ip = tunnel_ip(tx.last_insert_rowid())?;
        audit::append(
            &tx,
            actor,
            &format!("account:{name}"),
            "account created",
            &format!(
                "account {name} created; certificate {} valid {days} days; tunnel address {ip}",
                hex::encode(serial)
            ),
        )?;
        tx.commit()?;
        Ok(ip)
    }

    pub fn close_account(&mut self, actor: &Actor, name: &str) -> Result<()> {
        let tx = self.tx()?;
        let row: Option<(Vec<u8>, Option<String>)> = tx
            .query_row(
                "SELECT serial, closed FROM accounts WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (serial, closed) =
            row.ok_or_else(|| StoreError::NotFound(format!("account {name}")))?;
        if closed.is_some() {
            return Err(StoreError::Invalid(format!(
                "account {name} is already closed"
            )));
        }
        let now = now_rfc3339();
        tx.execute(
            "UPDATE accounts SET closed = ?1 WHERE name = ?2",
            params![now, name],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked (serial, revoked) VALUES (?1, ?2)",
            params![serial, now],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("account:{name}"),
            "account closed",
            &format!(
                "account {name} closed; certificate {} revoked",
                hex::encode(&serial)
            ),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forbids (or allows again) `name`'s clients to remember the bundle password. Takes
    /// effect at the account's next login: the welcome carries it. Setting what is already set
    /// is refused and changes nothing.
    pub fn set_remembered_password(
        &mut self,
        actor: &Actor,
        name: &str,
        forbid: bool,
    ) -> Result<()> {
        let tx = self.tx()?;
        let now: Option<bool> = tx
            .query_row(
                "SELECT forbid_remembered_password FROM accounts WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let now = now.ok_or_else(|| StoreError::NotFound(format!("account {name}")))?;
        let word = if forbid { "forbidden" } else { "allowed" };
        if now == forbid {
            return Err(StoreError::Invalid(format!(
                "account {name}: a remembered password is already {word}"
            )));
        }
        tx.execute(
            "UPDATE accounts SET forbid_remembered_password = ?1 WHERE name = ?2",
            params![forbid, name],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("account:{name}"),
            "remembered password policy changed",
            &format!("account {name}: a remembered password is {word}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn set_grant(
        &mut self,
        actor: &Actor,
        account: &str,
        domain: &DomainPath,
        granted: bool,
    ) -> Result<()> {
        let tx = self.tx()?;
        if tx
            .query_row("SELECT 1 FROM accounts WHERE name = ?1", [account], |_| {
                Ok(())
            })
            .optional()?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("account {account}")));
        }
        if !Self::domain_exists(&tx, domain.as_str())? {
            return Err(StoreError::NotFound(format!("domain {domain}")));
        }
        let changed = if granted {
            tx.execute(
                "INSERT OR IGNORE INTO grants (account, domain) VALUES (?1, ?2)",
                params![account, domain.as_str()],
            )?
        } else {
            tx.execute(
                "DELETE FROM grants WHERE account = ?1 AND domain = ?2",
                params![account, domain.as_str()],
            )?
        };
        if changed == 0 {
            return Err(StoreError::Invalid(format!(
                "account {account} {} domain {domain}",
                if granted {
                    "already has"
                } else {
                    "has no grant for"
                }
            )));
        }
        let what = if granted { "granted" } else { "ungranted" };
        audit::append(
            &tx,
            actor,
            &format!("account:{account}"),
            "grant changed",
            &format!("account {account} {what} domain {domain}"),
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn account(&self, name: &str) -> Result<Option<AccountRow>> {
        Ok(self.accounts()?.into_iter().find(|a| a.name == name))
    }

    pub fn accounts(&self) -> Result<Vec<AccountRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT a.id, a.name, a.created, a.closed, a.serial, group_concat(g.domain, ','), a.expires,
                    a.forbid_remembered_password
             FROM accounts a LEFT JOIN grants g ON g.account = a.name GROUP BY a.id ORDER BY a.name",
        )?;
        let rows = stmt.query_map([], |r| {
            let grants: Option<String> = r.get(5)?;
            Ok((
                r.get::<_, i64>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                grants,
                r.get(6)?,
                r.get(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, created, closed, serial, grants, expires, forbid_remembered_password) =
                row?;
            let mut grants: Vec<String> = grants
                .map(|g| g.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            grants.sort();
            out.push(AccountRow {
                name,
                created,
                closed,
                expires,
                tunnel_ip: tunnel_ip(id)?,
                grants,
                forbid_remembered_password,
                serial,
            });
        }
        Ok(out)
    }

    pub fn sites(&self) -> Result<Vec<SiteRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, domain, enrolled, online, last_seen, software, boot_id, agents, revoked, switched_off FROM sites ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let agents: String = r.get(7)?;
            Ok(SiteRow {
                name: r.get(0)?,
                domain: r.get(1)?,
                enrolled: r.get(2)?,
                online: r.get(3)?,
                last_seen: r.get(4)?,
                software: r.get(5)?,
                boot_id: r.get(6)?,
                revoked: r.get(8)?,
                switched_off: r.get(9)?,
                agents: serde_json::from_str(&agents).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The sites an account may see: those in a granted domain or below it.
    pub fn inventory(&self, account: &str) -> Result<Vec<SiteView>> {
        let Some(acct) = self.account(account)? else {
            return Ok(Vec::new());
        };
        if acct.closed.is_some() {
            return Ok(Vec::new());
        }
        // Only the granted domains' rows, by index: a gateway of 100 000 sites must not read and
        // parse every site for each technician's inventory. A grant covers its domain and the
        // domains below it (`within`): `g` and the names from `g.` up to `g/`, '/' being the
        // character after '.' (domain names are letters, digits, '-' and '.').
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, domain, online, agents FROM sites
             WHERE domain = ?1 OR (domain >= ?1 || '.' AND domain < ?1 || '/')",
        )?;
        let mut found = std::collections::BTreeMap::new();
        for grant in &acct.grants {
            let rows = stmt.query_map([grant], |r| {
                let agents: String = r.get(3)?;
                Ok(SiteView {
                    name: r.get(0)?,
                    domain: r.get(1)?,
                    online: r.get(2)?,
                    agents: serde_json::from_str(&agents).unwrap_or_default(),
                })
            })?;
            for row in rows {
                let site = row?;
                debug_assert!(within(&site.domain, grant));
                found.entry(site.name.clone()).or_insert(site);
            }
        }
        Ok(found.into_values().collect())
    }

    pub fn revoked(&self) -> Result<BTreeSet<Vec<u8>>> {
        let mut stmt = self.conn.prepare("SELECT serial FROM revoked")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The certificate serial a site must present.
    pub fn site_serial(&self, site: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT serial FROM sites WHERE name = ?1", [site], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Whether `site`'s certificate is revoked (`NotFound` for a site that is not enrolled).
    pub fn site_revoked(&self, site: &str) -> Result<bool> {
        let revoked: Option<String> = self
            .conn
            .query_row("SELECT revoked FROM sites WHERE name = ?1", [site], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("site {site}")))?;
        Ok(revoked.is_some())
    }

    /// Revokes `site`'s certificate: its serial joins [`Store::revoked`], so it cannot log in
    /// again, and the site is marked revoked. It keeps its name until [`Store::remove_site`];
    /// enrolling it again takes a removal and a new token.
    pub fn revoke_site(&mut self, actor: &Actor, site: &str) -> Result<()> {
        let tx = self.tx()?;
        let (serial, revoked) = Self::site_for_revocation(&tx, site)?;
        if let Some(when) = revoked {
            return Err(StoreError::Invalid(format!(
                "site {site} is already revoked (since {when}); `site remove {site}` deletes it"
            )));
        }
        let now = now_rfc3339();
        tx.execute(
            "UPDATE sites SET revoked = ?1 WHERE name = ?2",
            params![now, site],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked (serial, revoked) VALUES (?1, ?2)",
            params![serial, now],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("site:{site}"),
            "site revoked",
            &format!(
                "site {site} revoked; certificate {} revoked",
                hex::encode(&serial)
            ),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Revokes `site`'s certificate (if it is not already) and deletes the site: its name is
    /// free for a new enrollment, with a new token and a new certificate.
    pub fn remove_site(&mut self, actor: &Actor, site: &str) -> Result<()> {
        let tx = self.tx()?;
        let (serial, _) = Self::site_for_revocation(&tx, site)?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked (serial, revoked) VALUES (?1, ?2)",
            params![serial, now_rfc3339()],
        )?;
        tx.execute("DELETE FROM sites WHERE name = ?1", [site])?;
        audit::append(
            &tx,
            actor,
            &format!("site:{site}"),
            "site removed",
            &format!(
                "site {site} removed; certificate {} revoked",
                hex::encode(&serial)
            ),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The serial and revocation time of `site`, or `NotFound`.
    fn site_for_revocation(tx: &Connection, site: &str) -> Result<(Vec<u8>, Option<String>)> {
        tx.query_row(
            "SELECT serial, revoked FROM sites WHERE name = ?1",
            [site],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("site {site}")))
    }

    /// A site said hello: online, and audit what changed since its last visit.
    pub fn site_connected(
        &mut self,
        site: &str,
        software: &str,
        boot_id: &str,
        agents: &[Agent],
        from: &str,
    ) -> Result<()> {
        let tx = self.tx()?;
        let (old_sw, old_boot, old_agents): (Option<String>, Option<String>, String) = tx
            .query_row(
                "SELECT software, boot_id, agents FROM sites WHERE name = ?1",
                [site],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("site {site}")))?;
        let actor = Actor::Site(site.to_owned());
        let object = format!("site:{site}");
        let new_agents = serde_json::to_string(agents).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "UPDATE sites SET online = 1, switched_off = 0, last_seen = ?1, software = ?2, boot_id = ?3, agents = ?4 WHERE name = ?5",
            params![now_rfc3339(), software, boot_id, new_agents, site],
        )?;
        audit::append(
            &tx,
            &actor,
            &object,
            "site connected",
            &format!("site {site} connected from {from}"),
        )?;
        if let Some(old) = old_boot.filter(|b| b != boot_id) {
            audit::append(
                &tx,
                &actor,
                &object,
                "site rebooted",
                &format!("boot id changed from {old} to {boot_id}"),
            )?;
        }
        if let Some(old) = old_sw.filter(|s| s != software) {
            audit::append(
                &tx,
                &actor,
                &object,
                "site software changed",
                &format!("software version changed from {old} to {software}"),
            )?;
        }
        if old_agents != new_agents {
            audit::append(
                &tx,
                &actor,
                &object,
                "site agents changed",
                &agents_change(&old_agents, &new_agents),
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn site_agents(&mut self, site: &str, agents: &[Agent]) -> Result<()> {
        let tx = self.tx()?;
        let old: String =
            tx.query_row("SELECT agents FROM sites WHERE name = ?1", [site], |r| {
                r.get(0)
            })?;
        let new = serde_json::to_string(agents).unwrap_or_else(|_| "[]".into());
        if old != new {
            tx.execute(
                "UPDATE sites SET agents = ?1 WHERE name = ?2",
                params![new, site],
            )?;
            audit::append(
                &tx,
                &Actor::Site(site.into()),
                &format!("site:{site}"),
                "site agents changed",
                &agents_change(&old, &new),
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn site_seen(&mut self, site: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE sites SET last_seen = ?1 WHERE name = ?2",
            params![now_rfc3339(), site],
        )?;
        Ok(())
    }

    pub fn site_disconnected(
        &mut self,
        site: &str,
        switched_off: bool,
        event: &str,
        description: &str,
    ) -> Result<()> {
        let tx = self.tx()?;
        tx.execute(
            "UPDATE sites SET online = 0, switched_off = ?1 WHERE name = ?2",
            params![switched_off, site],
        )?;
        audit::append(
            &tx,
            &Actor::Site(site.into()),
            &format!("site:{site}"),
            event,
            description,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// At start: nothing is connected yet, whatever the last run left behind.
    pub fn mark_all_offline(&mut self) -> Result<()> {
        self.conn.execute("UPDATE sites SET online = 0", [])?;
        Ok(())
    }

    pub fn create_admin(&mut self, name: &str, password_hash: &str) -> Result<()> {
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO admins (name, password, must_change, created) VALUES (?1, ?2, 1, ?3)",
            params![name, password_hash, now_rfc3339()],
        )?;
        audit::append(
            &tx,
            &Actor::System,
            &format!("admin:{name}"),
            "admin created",
            &format!("portal administrator {name} created with a one-time password"),
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("dir");
        let s = Store::open(&dir.path().join("gateway.db")).expect("open");
        (dir, s)
    }

    const ADMIN: Actor = Actor::System;

    #[test]
    fn a_pending_record_is_kept_in_order_and_full_sync_comes_back() {
        use crate::registry::{AuditRecord, Registry};
        let (_d, mut s) = store();
        let rec = |event| AuditRecord::new(Actor::System, "site:s", event, "x");
        s.record_pending(&[rec("session requested")])
            .expect("pending");
        let sync: i64 = s
            .conn()
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma");
        assert_eq!(sync, 2, "synchronous=FULL again for every other commit");
        Registry::record(&mut s, &[rec("session opened")]).expect("durable");
        let events: Vec<String> = audit::list(s.conn(), None)
            .expect("audit")
            .into_iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(events, ["session requested", "session opened"]);
        assert_eq!(
            audit::verify(s.conn()).expect("verify"),
            audit::Verdict::Intact { rows: 2 }
        );
    }

    fn d(s: &str) -> DomainPath {
        s.parse().expect("domain")
    }

    #[test]
    fn domains_create_their_ancestors_and_refuse_bad_names() {
        let (_d, mut s) = store();
        assert_eq!(
            s.create_domain(&ADMIN, &d("acme.plant-a")).expect("create"),
            ["acme", "acme.plant-a"]
        );
        assert!(matches!(
            s.create_domain(&ADMIN, &d("acme.plant-a")),
            Err(StoreError::Exists(_))
        ));
        for bad in ["", "Acme", "a..b", "-x", "a b", "a/b"] {
            assert!(bad.parse::<DomainPath>().is_err(), "{bad}");
        }
    }

    #[test]
    fn within_follows_labels_not_characters() {
        assert!(within("acme", "acme"));
        assert!(within("acme.plant-a", "acme"));
        assert!(!within("acme2", "acme"));
        assert!(!within("acme", "acme.plant-a"));
    }

    #[test]
    fn grants_are_inherited_and_nothing_without_one() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme.plant-a")).expect("a");
        s.create_domain(&ADMIN, &d("zeta")).expect("z");
        for (site, dom) in [("pa", "acme.plant-a"), ("z1", "zeta")] {
            let (tok, _) = s
                .create_token(&ADMIN, &d(dom), Duration::from_secs(60))
                .expect("token");
            s.enroll(&tok, site, || Ok((vec![1], vec![site.len() as u8])))
                .expect("enroll");
        }
        s.create_account(&ADMIN, "alice", &[9], 365).expect("alice");
        assert!(
            s.inventory("alice").expect("inv").is_empty(),
            "no grant, nothing visible"
        );
        s.set_grant(&ADMIN, "alice", &d("acme"), true)
            .expect("grant");
        let inv: Vec<String> = s
            .inventory("alice")
            .expect("inv")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(inv, ["pa"]);
        s.set_grant(&ADMIN, "alice", &d("acme"), false)
            .expect("ungrant");
        assert!(s.inventory("alice").expect("inv").is_empty());
    }

    /// The inventory reads the granted domains by index range; it must see exactly what
    /// `within` sees, next to names that sort just around a grant (`acme-b`, `acme2`, `acmez`).
    #[test]
    fn inventory_sees_a_grant_and_below_and_nothing_beside() {
        let (_d, mut s) = store();
        let sites = [
            ("s1", "acme"),
            ("s2", "acme.plant-a"),
            ("s3", "acme.plant-a.line-1"),
            ("s4", "acme-b"),
            ("s5", "acme2"),
            ("s6", "acmez"),
            ("s7", "ac"),
            ("s8", "zeta"),
        ];
        for (i, (site, dom)) in sites.iter().enumerate() {
            let _ = s.create_domain(&ADMIN, &d(dom));
            let (tok, _) = s
                .create_token(&ADMIN, &d(dom), Duration::from_secs(60))
                .expect("token");
            s.enroll(&tok, site, || {
                Ok((vec![1], vec![u8::try_from(i).expect("few")]))
            })
            .expect("enroll");
        }
        s.create_account(&ADMIN, "alice", &[9], 365).expect("alice");
        s.set_grant(&ADMIN, "alice", &d("acme"), true)
            .expect("grant");
        s.set_grant(&ADMIN, "alice", &d("acme.plant-a"), true)
            .expect("overlapping grant");
        s.set_grant(&ADMIN, "alice", &d("zeta"), true)
            .expect("grant");
        let inv: Vec<String> = s
            .inventory("alice")
            .expect("inv")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(inv, ["s1", "s2", "s3", "s8"], "sorted by name, each once");
    }

    #[test]
    fn a_token_bound_to_a_site_name_refuses_another_name() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        let (tok, _) = s
            .create_site_token(&ADMIN, &d("acme"), Some("plant-a"), Duration::from_secs(60))
            .expect("token");
        assert!(matches!(
            s.enroll(&tok, "plant-b", || Ok((vec![1], vec![1]))),
            Err(StoreError::TokenRefused(
                "this token was created for another site name"
            ))
        ));
        s.enroll(&tok, "plant-a", || Ok((vec![1], vec![2])))
            .expect("the bound name enrolls, the refusal did not consume the token");
    }

    #[test]
    fn tokens_are_one_time_and_expire() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        let (tok, _) = s
            .create_token(&ADMIN, &d("acme"), Duration::from_secs(60))
            .expect("token");
        s.enroll(&tok, "site-1", || Ok((vec![1], vec![1])))
            .expect("first use");
        assert!(matches!(
            s.enroll(&tok, "site-2", || Ok((vec![1], vec![2]))),
            Err(StoreError::TokenRefused("token already used"))
        ));
        assert!(matches!(
            s.enroll("bogus", "site-3", || Ok((vec![1], vec![3]))),
            Err(StoreError::TokenRefused("unknown token"))
        ));
        let (tok, _) = s
            .create_token(&ADMIN, &d("acme"), Duration::from_secs(1))
            .expect("token");
        s.conn
            .execute("UPDATE tokens SET expires = '2000-01-01T00:00:00Z'", [])
            .expect("age");
        assert!(matches!(
            s.enroll(&tok, "site-4", || Ok((vec![1], vec![4]))),
            Err(StoreError::TokenRefused("token expired"))
        ));
        let events: Vec<String> = audit::list(s.conn(), None)
            .expect("audit")
            .into_iter()
            .map(|r| r.event)
            .collect();
        // Refusals write nothing here: they come from anonymous peers, and the hub records
        // them in aggregate.
        assert_eq!(
            events,
            [
                "domain created",
                "enrollment token created",
                "enrollment token used",
                "site enrolled",
                "enrollment token created"
            ]
        );
        assert!(matches!(
            audit::verify(s.conn()).expect("verify"),
            audit::Verdict::Intact { .. }
        ));
        // The token itself is in no audit row.
        assert!(
            audit::list(s.conn(), None)
                .expect("audit")
                .iter()
                .all(|r| !r.description.contains(&tok))
        );
    }

    #[test]
    fn closing_revokes_and_hides_everything() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        let ip = s
            .create_account(&ADMIN, "alice", &[7, 7], 365)
            .expect("alice");
        assert_eq!(ip, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(
            s.create_account(&ADMIN, "bob", &[8], 365).expect("bob"),
            Ipv4Addr::new(100, 64, 0, 3)
        );
        s.set_grant(&ADMIN, "alice", &d("acme"), true)
            .expect("grant");
        s.close_account(&ADMIN, "alice").expect("close");
        assert!(s.revoked().expect("revoked").contains(&vec![7, 7]));
        assert!(
            s.account("alice")
                .expect("a")
                .expect("exists")
                .closed
                .is_some()
        );
        assert!(matches!(
            s.close_account(&ADMIN, "alice"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            s.create_account(&ADMIN, "alice", &[1], 365),
            Err(StoreError::Exists(_))
        ));
    }

    /// A bound datagram socket standing in for `/dev/log`.
    fn syslog_listener(dir: &Path) -> (std::os::unix::net::UnixDatagram, std::path::PathBuf) {
        let path = dir.join("log");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (sock, path)
    }

    fn datagrams(sock: &std::os::unix::net::UnixDatagram) -> Vec<String> {
        sock.set_nonblocking(true).expect("nonblocking");
        let mut out = Vec::new();
        let mut buf = vec![0; 65536];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8(buf[..n].to_vec()).expect("utf-8"));
        }
        out
    }

    #[test]
    fn committed_records_reach_syslog_with_their_hash() {
        let dir = tempfile::tempdir().expect("dir");
        let (sock, path) = syslog_listener(dir.path());
        let mut s = Store::open(&dir.path().join("gateway.db"))
            .expect("open")
            .with_syslog(Syslog::to(&path));
        s.create_domain(&ADMIN, &d("acme.plant-a")).expect("create");
        let got = datagrams(&sock);
        let rows = audit::list(s.conn(), None).expect("audit");
        assert_eq!(got.len(), 2, "{got:?}");
        for (line, row) in got.iter().zip(&rows) {
            assert!(line.starts_with("<85>"), "authpriv.notice: {line}");
            assert!(line.contains("pinhole-gateway["), "{line}");
            assert!(line.contains(&format!("id={} ", row.id)), "{line}");
            assert!(
                line.contains(&format!("hash={}", hex::encode(&row.hash))),
                "{line}"
            );
            assert!(line.contains(r#"event="domain created""#), "{line}");
        }
    }

    #[test]
    fn rolled_back_records_never_reach_syslog() {
        let dir = tempfile::tempdir().expect("dir");
        let (sock, path) = syslog_listener(dir.path());
        let mut s = Store::open(&dir.path().join("gateway.db"))
            .expect("open")
            .with_syslog(Syslog::to(&path));
        // The record for `acme` is written, then the one for `acme.plant-a` fails: the whole
        // transaction rolls back, and neither record may be sent.
        s.conn
            .execute_batch(
                "CREATE TRIGGER fail BEFORE INSERT ON audit WHEN NEW.object = 'domain:acme.plant-a'
                 BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
            )
            .expect("trigger");
        assert!(s.create_domain(&ADMIN, &d("acme.plant-a")).is_err());
        // A transaction dropped without commit sends nothing either.
        {
            let tx = s.tx().expect("tx");
            audit::append(&tx, &ADMIN, "x", "test", "never committed").expect("append");
        }
        assert_eq!(audit::list(s.conn(), None).expect("audit").len(), 0);
        assert_eq!(datagrams(&sock), Vec::<String>::new());
        s.conn.execute_batch("DROP TRIGGER fail").expect("drop");
        s.create_domain(&ADMIN, &d("zeta")).expect("create");
        assert_eq!(datagrams(&sock).len(), 1);
    }

    #[test]
    fn syslog_fields_are_escaped() {
        let dir = tempfile::tempdir().expect("dir");
        let (sock, path) = syslog_listener(dir.path());
        let mut s = Store::open(&dir.path().join("gateway.db"))
            .expect("open")
            .with_syslog(Syslog::to(&path));
        s.record(
            &Actor::Site("s1".into()),
            "site:s1",
            "site connected",
            "x\"\n<13>Jan  1 00:00:00 host forged: \x1b[31m\\",
        )
        .expect("record");
        let got = datagrams(&sock);
        assert_eq!(got.len(), 1);
        let line = &got[0];
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.ends_with(r#"description="x\"\n<13>Jan  1 00:00:00 host forged: \u{1b}[31m\\""#),
            "{line}"
        );
    }

    #[test]
    fn a_missing_syslog_socket_warns_and_changes_go_on() {
        let dir = tempfile::tempdir().expect("dir");
        let syslog = Syslog::to(dir.path().join("no-such-socket"));
        let mut s = Store::open(&dir.path().join("gateway.db"))
            .expect("open")
            .with_syslog(syslog);
        s.create_domain(&ADMIN, &d("acme")).expect("create");
        s.create_domain(&ADMIN, &d("zeta")).expect("create");
        assert_eq!(audit::list(s.conn(), None).expect("audit").len(), 2);
        assert!(
            s.syslog.failing(),
            "the failure is remembered (warned once)"
        );
    }

    #[test]
    fn a_recorded_checkpoint_is_the_next_row_and_the_last_checkpoint() {
        let (_d, mut s) = store();
        let key = audit::AuditKey::generate().expect("key");
        assert_eq!(audit::last_checkpoint(s.conn()).expect("last"), None);
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        let cp = s.record_checkpoint(&ADMIN, &key).expect("checkpoint");
        assert_eq!(cp.rows, 1);
        let rows = audit::list(s.conn(), None).expect("audit");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].event, audit::CHECKPOINT_EVENT);
        assert_eq!(rows[1].description, cp.to_string());
        assert_eq!(audit::last_checkpoint(s.conn()).expect("last"), Some(cp));
    }

    /// Enrolls `site` in `domain` with a certificate of serial `serial`.
    fn enroll(s: &mut Store, site: &str, domain: &str, serial: &[u8]) -> Result<Vec<u8>> {
        let (tok, _) = s
            .create_token(&ADMIN, &d(domain), Duration::from_secs(60))
            .expect("token");
        s.enroll(&tok, site, || Ok((vec![1], serial.to_vec())))
    }

    fn last_event(s: &Store) -> audit::Record {
        audit::list(s.conn(), None)
            .expect("audit")
            .pop()
            .expect("a row")
    }

    #[test]
    fn a_revoked_site_stays_out_until_removed_and_enrolled_again() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        enroll(&mut s, "s1", "acme", &[5, 5]).expect("enroll");
        assert!(!s.site_revoked("s1").expect("state"));

        s.revoke_site(&ADMIN, "s1").expect("revoke");
        assert!(s.revoked().expect("revoked").contains(&vec![5, 5]));
        assert!(s.site_revoked("s1").expect("state"));
        assert!(s.sites().expect("sites")[0].revoked.is_some());
        let row = last_event(&s);
        assert_eq!(
            (row.event.as_str(), row.object.as_str()),
            ("site revoked", "site:s1")
        );
        assert!(row.description.contains("0505"), "{}", row.description);
        assert!(matches!(
            s.revoke_site(&ADMIN, "s1"),
            Err(StoreError::Invalid(e)) if e.contains("already revoked")
        ));
        // Its name is still taken: no token brings it back while it is there.
        assert!(matches!(
            enroll(&mut s, "s1", "acme", &[6]),
            Err(StoreError::TokenRefused(_))
        ));

        s.remove_site(&ADMIN, "s1").expect("remove");
        assert_eq!(s.site_serial("s1").expect("serial"), None);
        enroll(&mut s, "s1", "acme", &[6]).expect("enrolled again");
        assert!(!s.site_revoked("s1").expect("state"));
        let revoked = s.revoked().expect("revoked");
        assert!(revoked.contains(&vec![5, 5]) && !revoked.contains(&vec![6]));
        assert!(matches!(
            audit::verify(s.conn()).expect("verify"),
            audit::Verdict::Intact { .. }
        ));
    }

    #[test]
    fn removing_a_site_revokes_and_deletes_it() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        enroll(&mut s, "s2", "acme", &[7]).expect("enroll");
        s.remove_site(&ADMIN, "s2").expect("remove");
        assert!(s.revoked().expect("revoked").contains(&vec![7]));
        assert!(s.sites().expect("sites").is_empty());
        assert_eq!(s.site_serial("s2").expect("serial"), None);
        let row = last_event(&s);
        assert_eq!(
            (row.event.as_str(), row.object.as_str()),
            ("site removed", "site:s2")
        );
        for e in [
            s.remove_site(&ADMIN, "s2").expect_err("gone"),
            s.revoke_site(&ADMIN, "nowhere").expect_err("unknown"),
        ] {
            assert!(matches!(e, StoreError::NotFound(_)), "{e}");
        }
        assert!(matches!(s.site_revoked("s2"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn a_site_revocation_without_its_audit_record_does_not_happen() {
        let (_d, mut s) = store();
        s.create_domain(&ADMIN, &d("acme")).expect("a");
        enroll(&mut s, "s1", "acme", &[5]).expect("enroll");
        s.conn.execute_batch("CREATE TRIGGER fail BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;").expect("trigger");
        assert!(s.revoke_site(&ADMIN, "s1").is_err());
        assert!(s.remove_site(&ADMIN, "s1").is_err());
        assert!(!s.site_revoked("s1").expect("state"));
        assert!(s.revoked().expect("revoked").is_empty());
    }

    /// The one migration step: adds a listed column once, and refuses any other name without
    /// touching the database.
    #[test]
    fn a_column_is_added_once_and_only_from_the_list() {
        let c = Connection::open_in_memory().expect("open");
        c.execute_batch("CREATE TABLE sites (name TEXT); CREATE TABLE tokens (hash BLOB);")
            .expect("old tables");
        let columns = |table: &str| -> Vec<String> {
            let mut q = c
                .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
                .expect("q");
            q.query_map([table], |r| r.get(0))
                .expect("rows")
                .collect::<rusqlite::Result<_>>()
                .expect("names")
        };
        assert!(
            add_column_if_missing(&c, "sites", "switched_off", "INTEGER NOT NULL DEFAULT 0")
                .expect("added")
        );
        assert!(
            !add_column_if_missing(&c, "sites", "switched_off", "INTEGER NOT NULL DEFAULT 0")
                .expect("there already")
        );
        assert_eq!(columns("sites"), ["name", "switched_off"]);
        for (table, column) in [
            ("sites", "evil"),
            ("tokens", "revoked"),
            ("sites; DROP TABLE tokens; --", "revoked"),
            ("sites", "x TEXT; DROP TABLE tokens; --"),
        ] {
            let e = add_column_if_missing(&c, table, column, "TEXT").expect_err(column);
            assert!(matches!(e, StoreError::Invalid(_)), "{e}");
        }
        assert_eq!(columns("sites"), ["name", "switched_off"]);
        assert_eq!(columns("tokens"), ["hash"]);
        // Every listed pair names a table of the schema.
        let full = Connection::open_in_memory().expect("open");
        full.execute_batch(SCHEMA).expect("schema");
        crate::portal::admins::upgrade(&full).expect("portal");
        for (table, _) in ADDED_COLUMNS {
            let n: i64 = full
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("count");
            assert_eq!(n, 1, "{table}");
        }
    }

    #[test]
    fn a_database_from_before_site_revocation_is_upgraded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("gateway.db");
        {
            let c = Connection::open(&path).expect("open");
            c.execute_batch(&SCHEMA.replace("    revoked TEXT,\n", ""))
                .expect("old schema");
            c.execute_batch("INSERT INTO domains VALUES ('acme', 't'); INSERT INTO sites (name, domain, enrolled, serial) VALUES ('old', 'acme', 't', x'09');")
                .expect("old site");
        }
        let mut s = Store::open(&path).expect("upgrade");
        assert!(!s.site_revoked("old").expect("state"));
        s.revoke_site(&ADMIN, "old").expect("revoke");
        assert!(s.revoked().expect("revoked").contains(&vec![9]));
    }

    #[test]
    fn a_remembered_password_is_allowed_until_forbidden_and_old_accounts_allow_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("gateway.db");
        {
            // A database from before the column: the account is there, the column is not.
            let c = Connection::open(&path).expect("open");
            c.execute_batch(SCHEMA).expect("schema");
            c.execute_batch(
                "INSERT INTO accounts (name, created, serial) VALUES ('old', 't', x'05');",
            )
            .expect("old account");
        }
        let mut s = Store::open(&path).expect("upgrade");
        let forbidden = |s: &Store, n: &str| {
            s.account(n)
                .expect("a")
                .expect("exists")
                .forbid_remembered_password
        };
        assert!(!forbidden(&s, "old"));
        s.create_account(&ADMIN, "alice", &[7], 365).expect("alice");
        assert!(!forbidden(&s, "alice"), "allowed by default");
        s.set_remembered_password(&ADMIN, "alice", true)
            .expect("forbid");
        assert!(forbidden(&s, "alice"));
        assert!(!forbidden(&s, "old"), "only that account");
        let json = serde_json::to_value(s.account("alice").expect("a")).expect("json");
        assert_eq!(json["forbid_remembered_password"], true);
        // Setting it again, or for nobody, changes nothing and says why.
        let again = s.set_remembered_password(&ADMIN, "alice", true);
        assert!(
            matches!(&again, Err(StoreError::Invalid(m)) if m.contains("already forbidden")),
            "{again:?}"
        );
        assert!(matches!(
            s.set_remembered_password(&ADMIN, "nobody", true),
            Err(StoreError::NotFound(_))
        ));
        s.set_remembered_password(&ADMIN, "alice", false)
            .expect("allow");
        assert!(!forbidden(&s, "alice"));
        let events: i64 = s
            .conn
            .query_row(
                "SELECT count(*) FROM audit WHERE event = 'remembered password policy changed'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(events, 2, "each change is audited, the refused ones not");
    }

    #[test]
    fn audit_failure_refuses_the_change() {
        let (_d, mut s) = store();
        // Simulate a failing audit write: make inserts into audit abort.
        s.conn.execute_batch("CREATE TRIGGER fail BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;").expect("trigger");
        assert!(s.create_domain(&ADMIN, &d("acme")).is_err());
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM domains", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 0, "the domain was not created without its audit record");
    }
}
