//! The hash-chained audit log.
//!
//! Each row holds time (UTC, RFC 3339), actor, object, event and description, plus `prev` (the
//! previous row's hash) and `hash` = SHA-256 over a canonical encoding of the row's id, fields
//! and `prev`. The canonical encoding is length-prefixed (u32 big-endian length, then bytes) so
//! no choice of field contents can make two different rows encode the same. Editing, deleting
//! or reordering rows breaks the chain at the first row touched, which [`verify`] names.
//!
//! Rows are appended inside the same SQLite transaction as the change they describe, on a
//! connection with `synchronous=FULL`: when the change is committed, its record is on disk; if
//! the record cannot be written, the change is rolled back and refused.

use std::borrow::Cow;
use std::fmt;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

pub use crate::checkpoint::{
    AuditKey, AuditKeyError, AuditPublicKey, CHECKPOINT_EVENT, Checkpoint, CheckpointError,
    CheckpointVerdict, ParseCheckpointError, ParseKeyError, checkpoint, last_checkpoint,
    verify_checkpoint,
};

/// The `prev` of the first row.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// One audit event, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub id: i64,
    pub time: String,
    pub actor: String,
    pub object: String,
    pub event: String,
    pub description: String,
    #[serde(serialize_with = "hex_ser")]
    pub hash: Vec<u8>,
}

fn hex_ser<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

/// Who did something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Account(String),
    Admin(String),
    Site(String),
    System,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Account(a) => write!(f, "account:{a}"),
            Actor::Admin(a) => write!(f, "admin:{a}"),
            Actor::Site(s) => write!(f, "site:{s}"),
            Actor::System => f.write_str("system"),
        }
    }
}

/// Appends `field` length-prefixed (u32 big-endian): the canonical encoding of hashed and
/// signed data.
pub(crate) fn put(buf: &mut Vec<u8>, field: &[u8]) {
    // Fields are bounded by SQLite's row size (1 GB), well within u32.
    buf.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(field);
}

fn row_hash(
    id: i64,
    time: &str,
    actor: &str,
    object: &str,
    event: &str,
    description: &str,
    prev: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128 + description.len());
    put(&mut buf, b"pinhole-audit-v1");
    put(&mut buf, &id.to_be_bytes());
    for f in [time, actor, object, event, description] {
        put(&mut buf, f.as_bytes());
    }
    put(&mut buf, prev);
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &buf)
        .as_ref()
        .to_vec()
}

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    object TEXT NOT NULL,
    event TEXT NOT NULL,
    description TEXT NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// Appends one event inside `tx`. The caller commits (or rolls back) with its change.
pub fn append(
    tx: &Transaction<'_>,
    actor: &Actor,
    object: &str,
    event: &str,
    description: &str,
) -> rusqlite::Result<i64> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (id, prev) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, GENESIS.to_vec()),
    };
    let time = crate::store::now_rfc3339();
    let actor = actor.to_string();
    let hash = row_hash(id, &time, &actor, object, event, description, &prev);
    tx.execute(
        "INSERT INTO audit (id, time, actor, object, event, description, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![id, time, actor, object, event, description, prev, hash],
    )?;
    Ok(id)
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        rows: i64,
    },
    /// The first row whose content, position or link is wrong.
    Broken {
        row: i64,
        why: String,
    },
}

/// Recomputes the chain from the first row.
pub fn verify(conn: &Connection) -> rusqlite::Result<Verdict> {
    let mut stmt = conn.prepare(
        "SELECT id, time, actor, object, event, description, prev, hash FROM audit ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    let mut expected_prev = GENESIS.to_vec();
    let mut expected_id = 1i64;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let fields: [String; 5] = [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?];
        let prev: Vec<u8> = r.get(6)?;
        let hash: Vec<u8> = r.get(7)?;
        if id != expected_id {
            return Ok(Verdict::Broken {
                row: expected_id,
                why: format!("row {expected_id} is missing (next row is {id})"),
            });
        }
        if prev != expected_prev {
            return Ok(Verdict::Broken { row: id, why: "its link to the previous row does not match (rows deleted, inserted or reordered)".into() });
        }
        let [time, actor, object, event, description] = &fields;
        if row_hash(id, time, actor, object, event, description, &prev) != hash {
            return Ok(Verdict::Broken {
                row: id,
                why: "its content does not match its hash (edited)".into(),
            });
        }
        expected_prev = hash;
        expected_id += 1;
    }
    Ok(Verdict::Intact {
        rows: expected_id - 1,
    })
}

/// The highest row id (the number of rows of an intact log), 0 for an empty log.
pub fn last_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM audit", [], |r| r.get(0))
}

/// Rows with `id > after`, oldest first.
pub(crate) fn after(conn: &Connection, after: i64) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare(
        "SELECT id, time, actor, object, event, description, hash FROM audit WHERE id > ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([after], record)?;
    rows.collect()
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        id: r.get(0)?,
        time: r.get(1)?,
        actor: r.get(2)?,
        object: r.get(3)?,
        event: r.get(4)?,
        description: r.get(5)?,
        hash: r.get(6)?,
    })
}

/// Rows with `time >= since` (RFC 3339 text compares in time order for UTC), oldest first.
pub fn list(conn: &Connection, since: Option<&str>) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare(
        "SELECT id, time, actor, object, event, description, hash FROM audit WHERE time >= ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([since.unwrap_or("")], record)?;
    rows.collect()
}

/// `s` with every control character and backslash escaped, for a terminal or a log line: a
/// newline is written as the two characters `\n`, a tab as `\t`, a backslash as `\\`, any
/// other control character as `\u{1b}` (its hex code point). Borrowed when there is nothing
/// to escape. Peer-supplied text (a site's agent names, its software version) and operator
/// text reach listings and logs through it, so no field can start a new line, move the cursor
/// or recolour the screen.
///
/// A stand-in with the signature and behaviour of `pinhole_proto::validate::escape`, which
/// replaces it.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One CSV field, quoted when needed (RFC 4180).
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().expect("db");
        c.execute_batch(SCHEMA).expect("schema");
        c
    }

    fn add(c: &mut Connection, n: usize) {
        for i in 0..n {
            let tx = c.transaction().expect("tx");
            append(
                &tx,
                &Actor::Admin("root".into()),
                &format!("obj{i}"),
                "test",
                &format!("event {i}"),
            )
            .expect("append");
            tx.commit().expect("commit");
        }
    }

    /// Rewrites rows through a connection without the triggers, as an attacker with the file
    /// would.
    fn tamper(c: &Connection, sql: &str) {
        c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
            .expect("drop");
        c.execute_batch(sql).expect("tamper");
    }

    #[test]
    fn intact_chain_verifies() {
        let mut c = db();
        assert_eq!(verify(&c).expect("v"), Verdict::Intact { rows: 0 });
        add(&mut c, 5);
        assert_eq!(verify(&c).expect("v"), Verdict::Intact { rows: 5 });
    }

    #[test]
    fn edit_is_detected_at_its_row() {
        let mut c = db();
        add(&mut c, 5);
        tamper(
            &c,
            "UPDATE audit SET description = 'nothing happened' WHERE id = 3",
        );
        assert!(matches!(
            verify(&c).expect("v"),
            Verdict::Broken { row: 3, .. }
        ));
    }

    #[test]
    fn delete_is_detected() {
        let mut c = db();
        add(&mut c, 5);
        tamper(&c, "DELETE FROM audit WHERE id = 2");
        assert!(matches!(
            verify(&c).expect("v"),
            Verdict::Broken { row: 2, .. }
        ));
        let mut c = db();
        add(&mut c, 5);
        // Delete and renumber: the link catches it.
        tamper(
            &c,
            "DELETE FROM audit WHERE id = 2; UPDATE audit SET id = id - 1 WHERE id > 2;",
        );
        assert!(matches!(
            verify(&c).expect("v"),
            Verdict::Broken { row: 2, .. }
        ));
    }

    #[test]
    fn reorder_is_detected() {
        let mut c = db();
        add(&mut c, 4);
        tamper(
            &c,
            "UPDATE audit SET id = 100 WHERE id = 2; UPDATE audit SET id = 2 WHERE id = 3; UPDATE audit SET id = 3 WHERE id = 100;",
        );
        assert!(matches!(
            verify(&c).expect("v"),
            Verdict::Broken { row: 2, .. }
        ));
    }

    #[test]
    fn append_only_triggers_refuse_changes() {
        let mut c = db();
        add(&mut c, 1);
        assert!(c.execute("UPDATE audit SET event = 'x'", []).is_err());
        assert!(c.execute("DELETE FROM audit", []).is_err());
    }

    /// Recomputes every hash from row `from` on, as an attacker who knows the (public) hash
    /// function would after editing a row: the chain alone then verifies again.
    fn rehash_from(c: &Connection, from: i64) {
        let rows: Vec<(i64, [String; 5])> = {
            let mut stmt = c
                .prepare("SELECT id, time, actor, object, event, description FROM audit WHERE id >= ?1 ORDER BY id")
                .expect("prepare");
            stmt.query_map([from], |r| {
                Ok((
                    r.get(0)?,
                    [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
                ))
            })
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
        };
        let mut prev: Vec<u8> = c
            .query_row("SELECT hash FROM audit WHERE id = ?1", [from - 1], |r| {
                r.get(0)
            })
            .unwrap_or_else(|_| GENESIS.to_vec());
        for (id, [time, actor, object, event, description]) in rows {
            let hash = row_hash(id, &time, &actor, &object, &event, &description, &prev);
            c.execute(
                "UPDATE audit SET prev = ?1, hash = ?2 WHERE id = ?3",
                params![prev, hash, id],
            )
            .expect("rehash");
            prev = hash;
        }
    }

    fn key() -> AuditKey {
        AuditKey::generate().expect("key")
    }

    #[test]
    fn a_checkpoint_holds_on_the_intact_log_and_after_it_grows() {
        let mut c = db();
        let k = key();
        add(&mut c, 5);
        let cp = checkpoint(&c, &k).expect("checkpoint");
        assert_eq!(cp.rows, 5);
        let trusted = k.public_key();
        assert_eq!(
            verify_checkpoint(&c, &cp, &trusted).expect("v"),
            CheckpointVerdict::Holds
        );
        add(&mut c, 3);
        assert_eq!(
            verify_checkpoint(&c, &cp, &trusted).expect("v"),
            CheckpointVerdict::Holds
        );
        // An empty log has a checkpoint too.
        let empty = db();
        let cp = checkpoint(&empty, &k).expect("checkpoint");
        assert_eq!(cp.rows, 0);
        assert_eq!(
            verify_checkpoint(&c, &cp, &trusted).expect("v"),
            CheckpointVerdict::Holds
        );
    }

    #[test]
    fn cutting_the_log_after_a_checkpoint_is_detected() {
        let mut c = db();
        let k = key();
        add(&mut c, 5);
        let cp = checkpoint(&c, &k).expect("checkpoint");
        tamper(&c, "DELETE FROM audit WHERE id > 3");
        // The chain alone cannot see a cut end.
        assert_eq!(verify(&c).expect("v"), Verdict::Intact { rows: 3 });
        assert_eq!(
            verify_checkpoint(&c, &cp, &k.public_key()).expect("v"),
            CheckpointVerdict::Cut { rows: 5, have: 3 }
        );
        // Cut, then refilled to the same length with other rows.
        add(&mut c, 2);
        assert_eq!(
            verify_checkpoint(&c, &cp, &k.public_key()).expect("v"),
            CheckpointVerdict::Rewritten { row: 5 }
        );
    }

    #[test]
    fn rewriting_before_a_checkpoint_is_detected_even_with_the_chain_rehashed() {
        let mut c = db();
        let k = key();
        add(&mut c, 5);
        let cp = checkpoint(&c, &k).expect("checkpoint");
        add(&mut c, 2);
        tamper(
            &c,
            "UPDATE audit SET description = 'nothing happened' WHERE id = 3",
        );
        rehash_from(&c, 3);
        assert_eq!(verify(&c).expect("v"), Verdict::Intact { rows: 7 });
        assert_eq!(
            verify_checkpoint(&c, &cp, &k.public_key()).expect("v"),
            CheckpointVerdict::Rewritten { row: 5 }
        );
    }

    #[test]
    fn a_forged_or_foreign_checkpoint_is_refused() {
        let mut c = db();
        let k = key();
        add(&mut c, 5);
        let cp = checkpoint(&c, &k).expect("checkpoint");
        tamper(&c, "DELETE FROM audit WHERE id > 3");
        // The attacker edits the checkpoint to match the cut log, keeping the signature.
        let head3: Vec<u8> = c
            .query_row("SELECT hash FROM audit WHERE id = 3", [], |r| r.get(0))
            .expect("head");
        let forged: Checkpoint = cp
            .to_string()
            .replace("rows=5", "rows=3")
            .replace(&hex::encode(cp.head), &hex::encode(&head3))
            .parse()
            .expect("still parses");
        assert_eq!(
            verify_checkpoint(&c, &forged, &k.public_key()).expect("v"),
            CheckpointVerdict::BadSignature
        );
        // Or signs a fresh one with a key of their own.
        let theirs = checkpoint(&c, &key()).expect("checkpoint");
        assert!(matches!(
            verify_checkpoint(&c, &theirs, &k.public_key()).expect("v"),
            CheckpointVerdict::OtherKey { .. }
        ));
    }

    #[test]
    fn a_checkpoint_is_one_line_that_reads_back() {
        let mut c = db();
        add(&mut c, 2);
        let cp = checkpoint(&c, &key()).expect("checkpoint");
        let line = cp.to_string();
        assert!(
            line.starts_with("pinhole-audit-checkpoint v1 rows=2 head="),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert_eq!(line.parse::<Checkpoint>().expect("parse"), cp);
        // Found inside a system log line, too.
        let logged = format!("Nov 27 10:00:00 gw pinhole-gateway[9]: {line}");
        assert_eq!(
            Checkpoint::find(&logged).expect("found").expect("parse"),
            cp
        );
        // And as the syslog copy and the JSON export quote it.
        for wrapped in [
            format!("<84>audit id=3 hash=00 event=\"audit checkpoint\" description=\"{line}\""),
            format!(
                "{{\"event\":\"audit checkpoint\",\"description\":\"{line}\",\"hash\":\"00\"}}"
            ),
        ] {
            assert_eq!(
                Checkpoint::find(&wrapped).expect("found").expect("parse"),
                cp,
                "{wrapped}"
            );
        }
        for bad in [
            "pinhole-audit-checkpoint v2 rows=2",
            "pinhole-audit-checkpoint v1 rows=x head=00 time=t key=00 sig=00",
            &line.replace(" sig=", " signature="),
            &format!("{line} extra=1"),
        ] {
            assert!(bad.parse::<Checkpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_is_created_private_and_loaded_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("audit.key");
        let k = AuditKey::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            AuditKey::load_or_create(&path).expect("load").public_key(),
            k.public_key()
        );
        assert_eq!(
            AuditKey::load(&path).expect("load").public_key(),
            k.public_key()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = AuditKey::load(&path).expect_err("readable by others");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::write(dir.path().join("junk.key"), "not a key").expect("junk");
        std::fs::set_permissions(
            dir.path().join("junk.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        assert!(AuditKey::load(&dir.path().join("junk.key")).is_err());
        assert!(AuditKey::load(&dir.path().join("missing.key")).is_err());
        let leftovers = std::fs::read_dir(dir.path()).expect("ls").count();
        assert_eq!(leftovers, 2, "no temporary file left behind");
    }

    #[test]
    fn field_boundaries_matter() {
        assert_ne!(
            row_hash(1, "t", "ab", "c", "e", "d", &GENESIS),
            row_hash(1, "t", "a", "bc", "e", "d", &GENESIS)
        );
    }

    #[test]
    fn escape_leaves_one_line_and_borrows_when_clean() {
        assert!(matches!(escape("plain text, ünïcode"), Cow::Borrowed(_)));
        assert_eq!(escape("\x1b[31m\nfake row"), "\\u{1b}[31m\\nfake row");
        assert_eq!(
            escape("a\tb\\c\r\u{7f}\u{85}"),
            "a\\tb\\\\c\\u{d}\\u{7f}\\u{85}"
        );
    }

    #[test]
    fn csv_quotes_what_it_must() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
