//! `pinhole-gateway status`: the state directory's health at a glance.
//!
//! Read-only: it never creates the audit key and writes no audit record, so it can run as
//! often as a monitor likes, and it still answers when the disk is full.

use std::fmt;
use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use crate::audit::{self, AuditKey, AuditPublicKey, Checkpoint, escape};
use crate::disk::{DiskStatus, disk_status, human};
use crate::state::StateDir;

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state_dir: PathBuf,
    /// The database with its write-ahead log.
    pub database_bytes: u64,
    pub audit_rows: u64,
    /// The last checkpoint recorded in the log (by `audit checkpoint` or the server).
    pub last_checkpoint: Option<Checkpoint>,
    pub audit_key: PathBuf,
    /// `None` while no key exists or it cannot be read (see `audit_key_problem`).
    pub audit_public_key: Option<AuditPublicKey>,
    pub audit_key_problem: Option<String>,
    pub disk: DiskStatus,
    /// The reserve as configured (e.g. "256 MiB or 2 %, whichever is larger").
    pub disk_reserve: String,
}

/// Gathers the status of `state`.
pub fn status(state: &StateDir) -> anyhow::Result<Status> {
    let store = state.store()?;
    let database_bytes = ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut p = state.db().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).ok()
        })
        .map(|m| m.len())
        .sum();
    let audit_rows =
        u64::try_from(audit::last_id(store.conn()).context("counting audit rows")?).unwrap_or(0);
    let last_checkpoint =
        audit::last_checkpoint(store.conn()).context("reading the last checkpoint")?;
    let audit_key = state.audit_key_path();
    let (audit_public_key, audit_key_problem) = if audit_key.exists() {
        match AuditKey::load(&audit_key) {
            Ok(k) => (Some(k.public_key()), None),
            Err(e) => (None, Some(format!("{:#}", anyhow::Error::from(e)))),
        }
    } else {
        (
            None,
            Some(
                "not created yet (the first `audit checkpoint` or server start creates it)".into(),
            ),
        )
    };
    let disk = disk_status(state.root(), state.disk_reserve())
        .with_context(|| format!("reading the free space of {}", state.root().display()))?;
    Ok(Status {
        state_dir: std::path::absolute(state.root()).unwrap_or_else(|_| state.root().to_owned()),
        database_bytes,
        audit_rows,
        last_checkpoint,
        audit_key,
        audit_public_key,
        audit_key_problem,
        disk,
        disk_reserve: state.disk_reserve().to_string(),
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = |p: &PathBuf| escape(&p.to_string_lossy()).into_owned();
        writeln!(f, "state directory  {}", path(&self.state_dir))?;
        writeln!(f, "database         {}", human(self.database_bytes))?;
        writeln!(f, "audit log        {} rows", self.audit_rows)?;
        match &self.last_checkpoint {
            Some(cp) => writeln!(f, "last checkpoint  {}, {} rows", cp.time, cp.rows)?,
            None => writeln!(
                f,
                "last checkpoint  none (take one: pinhole-gateway audit checkpoint)"
            )?,
        }
        match (&self.audit_public_key, &self.audit_key_problem) {
            (Some(k), _) => writeln!(
                f,
                "audit key        {}, public key {k}",
                path(&self.audit_key)
            )?,
            (None, Some(why)) => writeln!(
                f,
                "audit key        {}: {}",
                path(&self.audit_key),
                escape(why)
            )?,
            (None, None) => writeln!(f, "audit key        {}", path(&self.audit_key))?,
        }
        write!(
            f,
            "free space       {} of {}; reserve {} ({}): ",
            human(self.disk.available_bytes),
            human(self.disk.total_bytes),
            human(self.disk.reserve_bytes),
            self.disk_reserve
        )?;
        if self.disk.low {
            writeln!(
                f,
                "LOW — free space now: when it runs out, the audit log cannot be written and every change and login is refused"
            )
        } else {
            writeln!(f, "ok")
        }
    }
}
