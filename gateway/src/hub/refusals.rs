//! Refusals of unauthenticated or failed peers, aggregated per source and minute.
//!
//! Anyone on the internet can open a TLS connection and send an `enroll` with a bad token, or
//! fail a handshake with a revoked certificate. Recording each attempt would cost one fsync per
//! attempt and let a flood fill the disk; recording none would hide exactly what an auditor
//! looks for (a closed account trying to come back). So each (source address, kind) gets one
//! audit record per [`WINDOW`]: how many attempts and the first reason. The table is bounded
//! ([`MAX_SOURCES`]); sources beyond it are counted together.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::audit::Actor;
use crate::registry::AuditRecord;

/// One record per source and kind per minute.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Distinct sources tracked per window: at ~250 bytes of record each, a full window writes at
/// most ~250 KB per kind, one transaction, once a minute (the flood bench measured 4 096
/// sources at 2 MB a minute).
pub const MAX_SOURCES: usize = 1024;

/// What was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An `enroll` with a bad token, a taken name or malformed fields.
    Enrollment,
    /// A TLS handshake that failed on the peer's certificate (revoked, expired, foreign): kept
    /// apart from other failures, because a closed account trying to come back is what an
    /// auditor looks for.
    Certificate,
    /// A TLS handshake that failed otherwise (not TLS at all, cut short, timed out).
    Handshake,
    /// A certificate that verified but is not current for its site or account.
    StaleCertificate,
}

impl Kind {
    fn event(self) -> &'static str {
        match self {
            Kind::Enrollment => "enrollments refused",
            Kind::Certificate => "certificates refused",
            Kind::Handshake => "handshakes refused",
            Kind::StaleCertificate => "stale certificates refused",
        }
    }
}

#[derive(Debug)]
struct Entry {
    count: u64,
    first_reason: String,
}

/// The table of one window. `None` as source: every source beyond [`MAX_SOURCES`].
#[derive(Debug, Default)]
pub struct Refusals {
    started: Option<Instant>,
    entries: BTreeMap<(Option<IpAddr>, Kind), Entry>,
}

impl Refusals {
    /// Counts one refusal.
    pub fn add(&mut self, source: IpAddr, kind: Kind, reason: &str, now: Instant) {
        self.started.get_or_insert(now);
        let key = if self.entries.len() < MAX_SOURCES
            || self.entries.contains_key(&(Some(source), kind))
        {
            (Some(source), kind)
        } else {
            (None, kind)
        };
        self.entries
            .entry(key)
            .or_insert_with(|| Entry {
                count: 0,
                // Reasons are the gateway's own words, but may quote peer input.
                first_reason: pinhole_proto::link::bounded_reason(reason),
            })
            .count += 1;
    }

    /// When the current window closes, if anything was counted.
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|s| s + WINDOW)
    }

    /// The window's records, if it is over; the table starts again.
    pub fn flush(&mut self, now: Instant) -> Vec<AuditRecord> {
        match self.deadline() {
            Some(d) if now >= d => self.take(),
            _ => Vec::new(),
        }
    }

    /// Everything counted so far (at shutdown).
    pub fn take(&mut self) -> Vec<AuditRecord> {
        self.started = None;
        std::mem::take(&mut self.entries)
            .into_iter()
            .map(|((source, kind), e)| {
                let from = source.map_or_else(|| "other sources".to_owned(), |s| s.to_string());
                AuditRecord::new(
                    Actor::System,
                    format!("peer:{from}"),
                    kind.event(),
                    format!(
                        "{} from {from} within a minute; first: {}",
                        e.count, e.first_reason
                    ),
                )
            })
            .collect()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_source_and_minute_bounded() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        for i in 0..1000 {
            r.add(a, Kind::Enrollment, &format!("unknown token {i}"), t0);
        }
        assert!(r.flush(t0 + Duration::from_secs(59)).is_empty());
        let recs = r.flush(t0 + WINDOW);
        assert_eq!(recs.len(), 1);
        assert!(recs[0].description.starts_with("1000 from 192.0.2.1"));
        assert!(recs[0].description.ends_with("unknown token 0"));
        // Many sources: bounded, the rest counted together.
        for i in 0..(MAX_SOURCES as u32 + 500) {
            r.add(IpAddr::from(i.to_be_bytes()), Kind::Handshake, "x", t0);
        }
        assert_eq!(r.len(), MAX_SOURCES + 1);
        let recs = r.take();
        assert!(
            recs.iter()
                .any(|x| x.description.starts_with("500 from other sources"))
        );
        assert!(r.is_empty() && r.deadline().is_none());
    }

    #[test]
    fn reasons_are_capped_and_escaped() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        r.add(
            "192.0.2.1".parse().expect("ip"),
            Kind::Handshake,
            &format!("\n{}", "é".repeat(1000)),
            t0,
        );
        let d = &r.take()[0].description;
        assert!(!d.contains('\n') && d.len() < 300, "{d}");
    }
}
