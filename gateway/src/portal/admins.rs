//! Portal administrators in the registry: credentials, second factor, recovery codes and
//! login failures; and the portal's own changes to the registry (accounts in a domain,
//! moving a site). Every change is one audited transaction, like the rest of
//! [`crate::store`]; the CLI (`admin create|reset|list`) and the portal call the same methods.
//!
//! Passwords are stored as argon2id hashes, recovery codes as SHA-256 (they carry 80 random
//! bits: no dictionary to try), TOTP secrets as they are (a TOTP verifier needs the secret;
//! the database is readable by the gateway's user alone).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use zeroize::Zeroizing;

use super::authz::AdminRole;
use super::lockout::{self, Scope};
use super::totp::TotpSecret;
use crate::audit::{self, Actor};
use crate::store::{DomainPath, Result, Store, StoreError, now_rfc3339};

/// Recovery codes given at enrollment.
pub const RECOVERY_CODES: usize = 10;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS admin_recovery (
    admin TEXT NOT NULL REFERENCES admins(name) ON DELETE CASCADE,
    hash BLOB NOT NULL,
    used TEXT,
    PRIMARY KEY (admin, hash)
);
CREATE TABLE IF NOT EXISTS login_failures (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (scope, key, at);
";

/// Brings `admins` and `accounts` to the portal's columns.
pub(crate) fn upgrade(conn: &Connection) -> crate::store::Result<()> {
    use crate::store::add_column_if_missing;
    conn.execute_batch(SCHEMA)?;
    add_column_if_missing(conn, "admins", "role", "TEXT NOT NULL DEFAULT 'gateway'")?;
    add_column_if_missing(conn, "admins", "domain", "TEXT")?;
    add_column_if_missing(conn, "admins", "totp_secret", "BLOB")?;
    add_column_if_missing(
        conn,
        "admins",
        "totp_last_step",
        "INTEGER NOT NULL DEFAULT 0",
    )?;
    add_column_if_missing(conn, "admins", "closed", "TEXT")?;
    add_column_if_missing(conn, "accounts", "domain", "TEXT")?;
    Ok(())
}

/// An administrator, without secrets.
#[derive(Debug, Clone, Serialize)]
pub struct AdminRow {
    pub name: String,
    #[serde(serialize_with = "role_ser")]
    pub role: AdminRole,
    /// Must set a new password (and enroll TOTP) at next login.
    pub must_change: bool,
    pub totp_enrolled: bool,
    pub created: String,
}

fn role_ser<S: serde::Serializer>(r: &AdminRole, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&match r {
        AdminRole::Gateway => "gateway".to_owned(),
        AdminRole::Auditor => "auditor".to_owned(),
        AdminRole::Domain(d) => format!("domain:{d}"),
    })
}

/// What a login checks.
pub struct AdminSecrets {
    pub row: AdminRow,
    pub password_hash: Zeroizing<String>,
    pub totp: Option<TotpSecret>,
}

impl std::fmt::Debug for AdminSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSecrets")
            .field("row", &self.row)
            .finish_non_exhaustive()
    }
}

/// A lockout in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    pub scope: Scope,
    /// Unix seconds.
    pub until: i64,
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// A recovery code: 80 random bits as four groups of five base32 characters.
pub fn generate_recovery_code() -> Zeroizing<String> {
    let s = TotpSecret::from_bytes(pinhole_certs::random::<10>().to_vec()).base32();
    Zeroizing::new(format!(
        "{}-{}-{}-{}",
        &s[0..4],
        &s[4..8],
        &s[8..12],
        &s[12..16]
    ))
}

/// A typed recovery code in its stored form: upper case, without separators or spaces.
fn recovery_hash(code: &str) -> Vec<u8> {
    let norm: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    sha256(norm.as_bytes())
}

fn admin_object(name: &str) -> String {
    format!("admin:{name}")
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(AdminRow, String, Option<Vec<u8>>)> {
    let role: String = r.get(1)?;
    let domain: Option<String> = r.get(2)?;
    let secret: Option<Vec<u8>> = r.get(5)?;
    Ok((
        AdminRow {
            name: r.get(0)?,
            // An unreadable role reads as the least privilege.
            role: AdminRole::from_columns(&role, domain.as_deref()).unwrap_or(AdminRole::Auditor),
            must_change: r.get(3)?,
            totp_enrolled: secret.is_some(),
            created: r.get(6)?,
        },
        r.get(4)?,
        secret,
    ))
}

const ADMIN_COLUMNS: &str = "name, role, domain, must_change, password, totp_secret, created FROM admins WHERE closed IS NULL";

impl Store {
    /// A new administrator with a one-time password (`password_hash`, argon2id): at first login
    /// they set their own and enroll TOTP.
    pub fn add_admin(
        &mut self,
        actor: &Actor,
        name: &str,
        role: &AdminRole,
        password_hash: &str,
    ) -> Result<()> {
        check_admin_name(name)?;
        let tx = self.tx()?;
        if tx
            .query_row("SELECT 1 FROM admins WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some()
        {
            return Err(StoreError::Exists(format!("administrator {name}")));
        }
        let (r, d) = role.to_columns();
        tx.execute(
            "INSERT INTO admins (name, password, must_change, created, role, domain) VALUES (?1, ?2, 1, ?3, ?4, ?5)",
            params![name, password_hash, now_rfc3339(), r, d],
        )?;
        audit::append(
            &tx,
            actor,
            &admin_object(name),
            "admin created",
            &format!("portal administrator {name} created as {role} with a one-time password"),
        )?;
        tx.commit()
    }

    /// A new one-time password; the second factor and recovery codes are removed (a lost
    /// phone), failures forgotten. The administrator enrolls again at next login.
    pub fn reset_admin(&mut self, actor: &Actor, name: &str, password_hash: &str) -> Result<()> {
        let tx = self.tx()?;
        if tx.execute(
            "UPDATE admins SET password = ?2, must_change = 1, totp_secret = NULL, totp_last_step = 0 WHERE name = ?1 AND closed IS NULL",
            params![name, password_hash],
        )? != 1
        {
            return Err(StoreError::NotFound(format!("administrator {name}")));
        }
        tx.execute("DELETE FROM admin_recovery WHERE admin = ?1", [name])?;
        tx.execute(
            "DELETE FROM login_failures WHERE scope = 'account' AND key = ?1",
            [name],
        )?;
        audit::append(
            &tx,
            actor,
            &admin_object(name),
            "admin reset",
            &format!(
                "portal administrator {name} reset: one-time password, TOTP and recovery codes removed"
            ),
        )?;
        tx.commit()
    }

    pub fn admins(&self) -> Result<Vec<AdminRow>> {
        let mut stmt = self
            .conn()
            .prepare(&format!("SELECT {ADMIN_COLUMNS} ORDER BY name"))?;
        let rows = stmt.query_map([], row)?;
        Ok(rows
            .map(|r| r.map(|(a, _, _)| a))
            .collect::<rusqlite::Result<_>>()?)
    }

    pub fn admin_secrets(&self, name: &str) -> Result<Option<AdminSecrets>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {ADMIN_COLUMNS} AND name = ?1"),
                [name],
                row,
            )
            .optional()?
            .map(|(row, hash, secret)| AdminSecrets {
                row,
                password_hash: Zeroizing::new(hash),
                totp: secret.map(TotpSecret::from_bytes),
            }))
    }

    pub fn admin(&self, name: &str) -> Result<Option<AdminRow>> {
        Ok(self.admin_secrets(name)?.map(|s| s.row))
    }

    /// The administrator's own new password (first login, or a change).
    pub fn set_admin_password(&mut self, name: &str, password_hash: &str) -> Result<()> {
        let tx = self.tx()?;
        if tx.execute(
            "UPDATE admins SET password = ?2, must_change = 0 WHERE name = ?1 AND closed IS NULL",
            params![name, password_hash],
        )? != 1
        {
            return Err(StoreError::NotFound(format!("administrator {name}")));
        }
        audit::append(
            &tx,
            &Actor::Admin(name.into()),
            &admin_object(name),
            "admin password changed",
            &format!("portal administrator {name} set a new password"),
        )?;
        tx.commit()
    }

    /// Stores the TOTP secret the administrator confirmed with a code of `step` (which is
    /// thereby used), and the hashes of fresh recovery codes (replacing any old ones).
    pub fn enroll_totp(
        &mut self,
        name: &str,
        secret: &TotpSecret,
        step: u64,
        recovery_codes: &[Zeroizing<String>],
    ) -> Result<()> {
        let tx = self.tx()?;
        let step = i64::try_from(step).map_err(|_| StoreError::Invalid("TOTP step".into()))?;
        if tx.execute(
            "UPDATE admins SET totp_secret = ?2, totp_last_step = ?3 WHERE name = ?1 AND closed IS NULL",
            params![name, secret.as_bytes(), step],
        )? != 1
        {
            return Err(StoreError::NotFound(format!("administrator {name}")));
        }
        tx.execute("DELETE FROM admin_recovery WHERE admin = ?1", [name])?;
        for c in recovery_codes {
            tx.execute(
                "INSERT INTO admin_recovery (admin, hash) VALUES (?1, ?2)",
                params![name, recovery_hash(c)],
            )?;
        }
        audit::append(
            &tx,
            &Actor::Admin(name.into()),
            &admin_object(name),
            "admin TOTP enrolled",
            &format!(
                "portal administrator {name} enrolled a TOTP authenticator; {} recovery codes issued",
                recovery_codes.len()
            ),
        )?;
        tx.commit()
    }

    /// Takes TOTP `step` for `name` if it is later than every step accepted before: each code
    /// works once. Atomic, so two logins racing with one code cannot both win.
    pub fn use_totp_step(&mut self, name: &str, step: u64) -> Result<bool> {
        let step = i64::try_from(step).map_err(|_| StoreError::Invalid("TOTP step".into()))?;
        Ok(self.conn().execute(
            "UPDATE admins SET totp_last_step = ?2 WHERE name = ?1 AND totp_last_step < ?2 AND closed IS NULL",
            params![name, step],
        )? == 1)
    }

    /// Uses a recovery code of `name` if it is one and unused; audited.
    pub fn use_recovery_code(&mut self, name: &str, code: &str, from: &str) -> Result<bool> {
        let tx = self.tx()?;
        let used = tx.execute(
            "UPDATE admin_recovery SET used = ?3 WHERE admin = ?1 AND hash = ?2 AND used IS NULL",
            params![name, recovery_hash(code), now_rfc3339()],
        )? == 1;
        if used {
            let left: i64 = tx.query_row(
                "SELECT count(*) FROM admin_recovery WHERE admin = ?1 AND used IS NULL",
                [name],
                |r| r.get(0),
            )?;
            audit::append(
                &tx,
                &Actor::Admin(name.into()),
                &admin_object(name),
                "admin recovery code used",
                &format!(
                    "portal administrator {name} used a recovery code from {from}; {left} left"
                ),
            )?;
            tx.commit()?;
        }
        Ok(used)
    }

    /// The lockout in force for `name` or `source` at `now` (unix seconds), account first.
    pub fn login_locked(&self, name: &str, source: &str, now: i64) -> Result<Option<Locked>> {
        for (scope, key) in [(Scope::Account, name), (Scope::Source, source)] {
            let mut stmt = self.conn().prepare_cached(
                "SELECT at FROM login_failures WHERE scope = ?1 AND key = ?2 AND at > ?3",
            )?;
            let times: Vec<i64> = stmt
                .query_map(params![scope.as_str(), key, now - lockout::WINDOW], |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<_>>()?;
            if let Some(until) = lockout::locked_until(&times, now) {
                return Ok(Some(Locked { scope, until }));
            }
        }
        Ok(None)
    }

    /// A failed login (`why`: wrong password, wrong code…) of `name` from `source`: counted
    /// for both and audited; a lockout it starts is audited too. Returns the lockout now in
    /// force, if any.
    pub fn login_failed(
        &mut self,
        name: &str,
        source: &str,
        why: &str,
        now: i64,
    ) -> Result<Option<Locked>> {
        let before = self.login_locked(name, source, now)?;
        let tx = self.tx()?;
        tx.execute(
            "DELETE FROM login_failures WHERE at <= ?1",
            [now - lockout::WINDOW],
        )?;
        for (scope, key) in [(Scope::Account, name), (Scope::Source, source)] {
            tx.execute(
                "INSERT INTO login_failures (scope, key, at) VALUES (?1, ?2, ?3)",
                params![scope.as_str(), key, now],
            )?;
        }
        // The name is what the visitor typed: escaped, and it may not be an administrator.
        let shown = audit::escape(name);
        audit::append(
            &tx,
            &Actor::System,
            &admin_object(&shown),
            "admin login failed",
            &format!("portal login of {shown} from {source} failed: {why}"),
        )?;
        tx.commit()?;
        let after = self.login_locked(name, source, now)?;
        if let (None, Some(l)) = (before, after) {
            self.record(
                &Actor::System,
                &admin_object(&shown),
                "admin locked out",
                &format!(
                    "portal login of {shown} from {source} locked for {} s after {} failures ({} lockout)",
                    l.until - now,
                    lockout::MAX_FAILURES,
                    l.scope.as_str()
                ),
            )?;
        }
        Ok(after)
    }

    /// A complete login: the account's failures are forgotten (the source's are not: they
    /// may belong to guesses at other accounts).
    pub fn login_succeeded(&mut self, name: &str, source: &str, how: &str) -> Result<()> {
        let tx = self.tx()?;
        tx.execute(
            "DELETE FROM login_failures WHERE scope = 'account' AND key = ?1",
            [name],
        )?;
        audit::append(
            &tx,
            &Actor::Admin(name.into()),
            &admin_object(name),
            "admin login",
            &format!("portal login of {name} from {source} ({how})"),
        )?;
        tx.commit()
    }

    /// Creates an account whose home is `domain` (a domain administrator's accounts).
    pub fn create_account_in(
        &mut self,
        actor: &Actor,
        name: &str,
        serial: &[u8],
        days: i64,
        domain: &DomainPath,
    ) -> Result<std::net::Ipv4Addr> {
        let ip = self.create_account(actor, name, serial, days)?;
        let tx = self.tx()?;
        tx.execute(
            "UPDATE accounts SET domain = ?2 WHERE name = ?1",
            params![name, domain.as_str()],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("account:{name}"),
            "account domain set",
            &format!("account {name} belongs to domain {domain}"),
        )?;
        tx.commit()?;
        Ok(ip)
    }

    /// The home domain of an account (`None`: a gateway-wide account).
    pub fn account_domain(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT domain FROM accounts WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?
            .flatten())
    }

    /// Every domain, sorted (a parent comes before its children).
    pub fn domains(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .conn()
            .prepare("SELECT name FROM domains ORDER BY name")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves `site` to `domain`; sessions that lose their grant end through the hub's
    /// administrative-change check.
    pub fn move_site(&mut self, actor: &Actor, site: &str, domain: &DomainPath) -> Result<()> {
        let tx = self.tx()?;
        let old: String = tx
            .query_row("SELECT domain FROM sites WHERE name = ?1", [site], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("site {site}")))?;
        if tx
            .query_row(
                "SELECT 1 FROM domains WHERE name = ?1",
                [domain.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_none()
        {
            return Err(StoreError::NotFound(format!("domain {domain}")));
        }
        if old == domain.as_str() {
            return Err(StoreError::Invalid(format!(
                "site {site} is already in {domain}"
            )));
        }
        tx.execute(
            "UPDATE sites SET domain = ?2 WHERE name = ?1",
            params![site, domain.as_str()],
        )?;
        audit::append(
            &tx,
            actor,
            &format!("site:{site}"),
            "site moved",
            &format!("site {site} moved from domain {old} to {domain}"),
        )?;
        tx.commit()
    }
}

/// Administrator names: what a login form and an audit record can carry without surprise.
fn check_admin_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "`{name}` is not an administrator name: use up to 64 lower-case letters, digits, `-`, `_` or `.`"
        )))
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

    fn events(s: &Store) -> Vec<String> {
        audit::list(s.conn(), None)
            .expect("audit")
            .into_iter()
            .map(|r| format!("{} | {}", r.event, r.description))
            .collect()
    }

    #[test]
    fn lockout_holds_across_a_reopen_and_is_audited() {
        let (dir, mut s) = store();
        s.add_admin(&Actor::System, "ann", &AdminRole::Gateway, "h")
            .expect("admin");
        let now = 1_800_000_000;
        for i in 0..4 {
            assert_eq!(
                s.login_failed("ann", "192.0.2.7", "wrong password", now + i)
                    .expect("failed"),
                None
            );
        }
        let l = s
            .login_failed("ann", "192.0.2.7", "wrong password", now + 4)
            .expect("failed")
            .expect("locked");
        assert_eq!(l.scope, Scope::Account);
        drop(s);
        let mut s = Store::open(&dir.path().join("gateway.db")).expect("reopen");
        assert!(
            s.login_locked("ann", "198.51.100.1", now + 10)
                .expect("q")
                .is_some()
        );
        assert_eq!(
            s.login_locked("ann", "198.51.100.1", now + lockout::WINDOW + 1)
                .expect("q"),
            None,
            "the lock ends with the window"
        );
        let ev = events(&s);
        assert_eq!(
            ev.iter()
                .filter(|e| e.starts_with("admin login failed") && e.contains("from 192.0.2.7"))
                .count(),
            5,
            "{ev:#?}"
        );
        assert_eq!(
            ev.iter()
                .filter(|e| e.starts_with("admin locked out"))
                .count(),
            1,
            "{ev:#?}"
        );
        // A success forgets the account's failures but not the source's.
        s.login_succeeded("ann", "192.0.2.8", "password and TOTP")
            .expect("ok");
        assert_eq!(
            s.login_locked("ann", "192.0.2.8", now + 10).expect("q"),
            None
        );
        assert_eq!(
            s.login_locked("bob", "192.0.2.7", now + 10)
                .expect("q")
                .map(|l| l.scope),
            Some(Scope::Source),
            "guessing at other accounts from the same source stays locked"
        );
    }

    #[test]
    fn a_totp_step_is_taken_once() {
        let (_dir, mut s) = store();
        s.add_admin(&Actor::System, "ann", &AdminRole::Gateway, "h")
            .expect("admin");
        let secret = TotpSecret::generate();
        s.enroll_totp("ann", &secret, 100, &[]).expect("enroll");
        assert!(
            !s.use_totp_step("ann", 100).expect("q"),
            "the enrollment code"
        );
        assert!(s.use_totp_step("ann", 101).expect("q"));
        assert!(
            !s.use_totp_step("ann", 101).expect("q"),
            "the same code again"
        );
        assert!(!s.use_totp_step("ann", 100).expect("q"), "an older one");
        assert!(s.use_totp_step("ann", 102).expect("q"));
    }

    #[test]
    fn recovery_codes_work_once_and_reset_removes_the_second_factor() {
        let (_dir, mut s) = store();
        s.add_admin(&Actor::System, "ann", &AdminRole::Gateway, "h")
            .expect("admin");
        let codes: Vec<_> = (0..RECOVERY_CODES)
            .map(|_| generate_recovery_code())
            .collect();
        assert_eq!(codes[0].len(), 19);
        s.enroll_totp("ann", &TotpSecret::generate(), 1, &codes)
            .expect("enroll");
        let typed = codes[3].to_lowercase().replace('-', " ");
        assert!(s.use_recovery_code("ann", &typed, "192.0.2.1").expect("q"));
        assert!(
            !s.use_recovery_code("ann", &codes[3], "192.0.2.1")
                .expect("q")
        );
        assert!(
            !s.use_recovery_code("bob", &codes[4], "192.0.2.1")
                .expect("q")
        );
        assert!(s.admin("ann").expect("q").expect("ann").totp_enrolled);
        s.reset_admin(&Actor::System, "ann", "h2").expect("reset");
        let a = s.admin_secrets("ann").expect("q").expect("ann");
        assert!(a.totp.is_none() && a.row.must_change);
        assert!(
            !s.use_recovery_code("ann", &codes[4], "192.0.2.1")
                .expect("q")
        );
        let ev = events(&s);
        assert!(ev.iter().any(|e| e.starts_with("admin reset")), "{ev:#?}");
        assert!(
            ev.iter()
                .any(|e| e.starts_with("admin recovery code used") && e.ends_with("9 left")),
            "{ev:#?}"
        );
    }

    #[test]
    fn admin_names_and_duplicates_are_refused() {
        let (_dir, mut s) = store();
        s.add_admin(&Actor::System, "ann", &AdminRole::Auditor, "h")
            .expect("admin");
        assert!(matches!(
            s.add_admin(&Actor::System, "ann", &AdminRole::Auditor, "h"),
            Err(StoreError::Exists(_))
        ));
        for bad in ["", "Ann", "a b", "a\nb"] {
            assert!(
                s.add_admin(&Actor::System, bad, &AdminRole::Auditor, "h")
                    .is_err()
            );
        }
        assert_eq!(s.admins().expect("list")[0].role, AdminRole::Auditor);
    }
}
