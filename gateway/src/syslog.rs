//! A copy of every committed audit record in the system log.
//!
//! The SQLite audit log is the record; this copy leaves the gateway's database at once, to a
//! log the operator may already ship elsewhere, so that deleting rows from the database later
//! leaves a trace outside it. One datagram per record, RFC 3164 as glibc's `syslog()` writes it
//! to `/dev/log` (journald and rsyslog both read it), facility `authpriv`, severity `notice`:
//!
//! ```text
//! <85>Nov 27 10:00:00 pinhole-gateway[812]: audit id=42 hash=9f…e1 time=2026-11-27T10:00:00Z actor="admin:cli:uid=0(root)" object="domain:acme" event="domain created" description="domain acme created"
//! ```
//!
//! Every text field is quoted and escaped ([`crate::audit::escape`], and `"` as `\"`), so a
//! field can neither end the line nor pose as another field or another message.
//!
//! Must never: block or fail the change it copies. The socket is non-blocking; when it is
//! missing or full the datagram is dropped and a warning logged once (until a send works
//! again).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use time::OffsetDateTime;
use time::macros::format_description;
use tracing::{info, warn};

use crate::audit::{Record, escape};

/// Where the system logger listens.
pub const DEV_LOG: &str = "/dev/log";

/// Overrides [`DEV_LOG`] (tests, or a logger listening elsewhere).
pub const SOCKET_ENV: &str = "PINHOLE_SYSLOG_SOCKET";

/// `authpriv` (10) × 8 + `notice` (5): security records, kept out of the world-readable logs
/// by the usual logger configurations.
const PRIORITY: u8 = 85;

/// rsyslog's default message size limit is 8 KiB: a longer description is cut to fit (the full
/// record stays in the database, found by its id and hash).
const MAX_MESSAGE: usize = 8000;

/// What a description cut to fit ends with.
const TRUNCATED: &str = "…[truncated]";

/// The system log, as a destination for audit records.
#[derive(Debug)]
pub struct Syslog {
    target: Option<(UnixDatagram, PathBuf)>,
    /// Whether the last send failed: the warning is logged once per failing streak.
    failing: AtomicBool,
}

impl Syslog {
    /// `$PINHOLE_SYSLOG_SOCKET`, else `/dev/log`.
    pub fn from_env() -> Self {
        let path = std::env::var_os(SOCKET_ENV).map_or_else(|| PathBuf::from(DEV_LOG), Into::into);
        Self::to(path)
    }

    /// Records go to the datagram socket at `path`.
    pub fn to(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let target = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(sock) => Some((sock, path)),
            Err(e) => {
                warn!(error = %e, "cannot create a socket for the system log; audit records stay in the database only");
                None
            }
        };
        Self {
            target,
            failing: AtomicBool::new(false),
        }
    }

    /// Records go nowhere (tests of other parts).
    pub fn disabled() -> Self {
        Self {
            target: None,
            failing: AtomicBool::new(false),
        }
    }

    /// Whether the last send failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Sends each record as one datagram. Called only after the records' transaction
    /// committed.
    pub fn send(&self, records: &[Record]) {
        let Some((sock, path)) = &self.target else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        for r in records {
            let message = format_message(r, std::process::id(), now);
            self.note(path, sock.send_to(message.as_bytes(), path));
        }
    }

    fn note(&self, path: &Path, result: io::Result<usize>) {
        match result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(socket = %escape(&path.to_string_lossy()), "audit records reach the system log again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(
                        socket = %escape(&path.to_string_lossy()),
                        error = %e,
                        "cannot copy audit records to the system log; the audit log in the database stays complete, the system log copy does not"
                    );
                }
            }
        }
    }
}

/// A field escaped for a quoted value: control characters and `\\` by [`escape`], and `"`.
fn escaped(s: &str) -> String {
    escape(s).replace('"', "\\\"")
}

/// One record as an RFC 3164 message for `/dev/log`.
pub fn format_message(r: &Record, pid: u32, now: OffsetDateTime) -> String {
    // The local logger stamps its own receive time; this one is for loggers that keep the
    // message's. RFC 3164 has no zone: it is UTC, as is the record's own `time`.
    let stamp = now
        .format(format_description!(
            "[month repr:short] [day padding:space] [hour]:[minute]:[second]"
        ))
        .unwrap_or_default();
    let mut message = format!(
        "<{PRIORITY}>{stamp} pinhole-gateway[{pid}]: audit id={} hash={} time=\"{}\" actor=\"{}\" object=\"{}\" event=\"{}\" description=\"",
        r.id,
        hex::encode(&r.hash),
        escaped(&r.time),
        escaped(&r.actor),
        escaped(&r.object),
        escaped(&r.event),
    );
    let description = escaped(&r.description);
    if message.len() + description.len() < MAX_MESSAGE {
        message.push_str(&description);
    } else {
        // Whole characters, each whole escaped, up to the room left for the marker.
        let room = MAX_MESSAGE.saturating_sub(TRUNCATED.len() + 1);
        let mut buf = [0; 4];
        for c in r.description.chars() {
            let piece = escaped(c.encode_utf8(&mut buf));
            if message.len() + piece.len() > room {
                break;
            }
            message.push_str(&piece);
        }
        message.push_str(TRUNCATED);
    }
    message.push('"');
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(description: &str) -> Record {
        Record {
            id: 7,
            time: "2026-11-27T10:00:00Z".into(),
            actor: "system".into(),
            object: "gateway".into(),
            event: "test".into(),
            description: description.into(),
            hash: vec![0xab; 32],
        }
    }

    #[test]
    fn the_message_reads_as_rfc3164() {
        let now = OffsetDateTime::from_unix_timestamp(1_795_773_600).expect("time");
        let m = format_message(&record("hello"), 812, now);
        assert_eq!(
            m,
            format!(
                "<85>Nov 27 10:00:00 pinhole-gateway[812]: audit id=7 hash={} time=\"2026-11-27T10:00:00Z\" actor=\"system\" object=\"gateway\" event=\"test\" description=\"hello\"",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn a_long_description_is_cut_to_fit_without_a_half_escape() {
        let now = OffsetDateTime::now_utc();
        for filler in ["é", "\x1b", "\\", "\"", "a"] {
            let m = format_message(&record(&filler.repeat(10_000)), 1, now);
            assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
            assert!(
                m.ends_with("…[truncated]\""),
                "{filler:?}: …{}",
                &m[m.len() - 40..]
            );
            let body = &m[m.find("description=\"").expect("field") + 13..m.len() - 1];
            let body = body.strip_suffix(TRUNCATED).expect("marker");
            // What remains is whole escapes only.
            let piece = escaped(filler);
            assert_eq!(body.len() % piece.len(), 0, "{filler:?}");
            assert_eq!(body, piece.repeat(body.len() / piece.len()), "{filler:?}");
        }
    }
}
