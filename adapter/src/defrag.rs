//! IPv4 reassembly under hard bounds, so that a datagram split by the sender's kernel (a large
//! SNMP or CIP request) is filtered whole, on its real transport header.
//!
//! Bounds, each with its reason:
//!
//! | bound | value | why |
//! |---|---|---|
//! | fragments per datagram | [`MAX_FRAGMENTS`] | a 65 535-byte datagram at the 1 420 MTU is 47 fragments |
//! | datagrams in reassembly per pool | [`MAX_DATAGRAMS`] | a technician's tools send a few at a time |
//! | bytes held per pool | [`MAX_BYTES`] | four maximum-size datagrams; memory per tunnel stays small |
//! | time to complete | [`TIMEOUT`] | fragments arrive back to back from one hop away; Linux waits 30 s |
//! | overlapping fragments | refused | overlaps only serve to make two readers see two datagrams |
//!
//! A datagram that breaks a bound is dropped whole, every fragment held for it counted as
//! refused; one that does not complete in time is dropped, its fragments counted as timed out.
//! Expiry takes the datagrams in the order they started, so it costs O(expired).
//!
//! This pool and not `etherparse::defrag`: that one has no fragment or byte bounds, accepts
//! overlapping fragments (the later bytes win) and expires by scanning every datagram.
//!
//! Pure: no I/O, time passed in.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::{self, Fragment};

pub const MAX_FRAGMENTS: usize = 64;
pub const MAX_DATAGRAMS: usize = 32;
pub const MAX_BYTES: usize = 4 * 65_535;
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest IPv4 payload: the total length is 16 bits and the header is 20 bytes.
const MAX_PAYLOAD: usize = 65_535 - 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
}

#[derive(Debug)]
struct Partial {
    started: Instant,
    /// The header of the fragment at offset 0, once it arrived.
    first: Option<[u8; 20]>,
    /// Byte ranges held, unordered (at most [`MAX_FRAGMENTS`]).
    pieces: Vec<(usize, usize)>,
    data: Vec<u8>,
    /// The payload length, once the last fragment arrived.
    total: Option<usize>,
    held: usize,
}

/// What adding a fragment did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Held, waiting for the rest.
    Held,
    /// The datagram is complete: the whole packet.
    Complete(Vec<u8>),
    /// Refused (a bound broken, an overlap, a bad length): this many fragments are dropped,
    /// the new one included.
    Refused(usize),
}

/// One reassembly pool (one per tunnel and direction).
#[derive(Debug, Default)]
pub struct Defrag {
    partial: HashMap<Key, Partial>,
    order: VecDeque<(Instant, Key)>,
    bytes: usize,
}

impl Defrag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the fragment `f` (whose whole packet is `packet`).
    pub fn add(&mut self, f: &Fragment, packet: &[u8], now: Instant) -> Added {
        let key = Key {
            src: f.src,
            dst: f.dst,
            proto: f.proto,
            id: f.id,
        };
        // The parser checked the header and the total length.
        let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let payload = &packet[20..total_len];
        let end = f.offset + payload.len();
        let bad_len = (f.more && (payload.is_empty() || !payload.len().is_multiple_of(8)))
            || end > MAX_PAYLOAD
            || (payload.is_empty() && f.offset == 0);
        if !self.partial.contains_key(&key) {
            if bad_len {
                return Added::Refused(1);
            }
            if self.partial.len() >= MAX_DATAGRAMS {
                self.expire(now);
                if self.partial.len() >= MAX_DATAGRAMS {
                    return Added::Refused(1);
                }
            }
            self.partial.insert(
                key,
                Partial {
                    started: now,
                    first: None,
                    pieces: Vec::new(),
                    data: Vec::new(),
                    total: None,
                    held: 0,
                },
            );
            self.order.push_back((now, key));
        }
        let refuse = |this: &mut Self| {
            let held = this.drop_datagram(&key);
            Added::Refused(held + 1)
        };
        let Some(p) = self.partial.get_mut(&key) else {
            return Added::Refused(1);
        };
        if bad_len
            || p.pieces.len() >= MAX_FRAGMENTS
            || self.bytes + payload.len() > MAX_BYTES
            || p.pieces.iter().any(|&(s, e)| f.offset < e && s < end)
            || p.total.is_some_and(|t| end > t || (!f.more && end != t))
            || (!f.more && p.pieces.iter().any(|&(_, e)| e > end))
        {
            return refuse(self);
        }
        if p.data.len() < end {
            p.data.resize(end, 0);
        }
        p.data[f.offset..end].copy_from_slice(payload);
        p.pieces.push((f.offset, end));
        p.held += payload.len();
        self.bytes += payload.len();
        if !f.more {
            p.total = Some(end);
        }
        if f.offset == 0 {
            let mut h = [0u8; 20];
            h.copy_from_slice(&packet[..20]);
            p.first = Some(h);
        }
        match (p.total, p.first) {
            (Some(total), Some(first)) if p.held == total => {
                let header = packet::whole_header(&first, total);
                let mut whole = Vec::with_capacity(20 + total);
                whole.extend_from_slice(&header);
                whole.extend_from_slice(&p.data[..total]);
                self.drop_datagram(&key);
                Added::Complete(whole)
            }
            _ => Added::Held,
        }
    }

    /// Forgets a datagram; returns how many fragments it held.
    fn drop_datagram(&mut self, key: &Key) -> usize {
        match self.partial.remove(key) {
            Some(p) => {
                self.bytes -= p.held;
                p.pieces.len()
            }
            None => 0,
        }
    }

    /// Drops the datagrams older than [`TIMEOUT`]; returns how many fragments they held.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(&(started, key)) = self.order.front() {
            if now.saturating_duration_since(started) < TIMEOUT {
                break;
            }
            self.order.pop_front();
            // The key may have completed and started again since: only the same start expires.
            if self.partial.get(&key).is_some_and(|p| p.started == started) {
                dropped += self.drop_datagram(&key);
            }
        }
        // Entries of completed datagrams are skipped above; do not let them pile up.
        if self.order.len() > 4 * MAX_DATAGRAMS.max(self.partial.len()) {
            let partial = &self.partial;
            self.order
                .retain(|(s, k)| partial.get(k).is_some_and(|p| p.started == *s));
        }
        dropped
    }

    /// Bytes held for incomplete datagrams.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn datagrams(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::*;
    use crate::packet::{Parsed, parse};

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);

    fn frag(p: &[u8]) -> Fragment {
        match parse(p) {
            Ok(Parsed::Fragment(f)) => f,
            other => panic!("{other:?}"),
        }
    }

    fn big(id: u16, size: usize) -> Vec<u8> {
        let mut p = udp(A, 5000, B, 161, &vec![9u8; size]);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        may_fragment(p)
    }

    #[test]
    fn any_order_reassembles_the_exact_datagram() {
        let now = Instant::now();
        let whole = big(1, 5000);
        let mut frags = fragments(&whole, 1420);
        frags.reverse();
        let mut d = Defrag::new();
        let n = frags.len();
        for (i, f) in frags.iter().enumerate() {
            match d.add(&frag(f), f, now) {
                Added::Complete(p) => {
                    assert_eq!(i + 1, n);
                    assert!(p == whole, "the same bytes, header included");
                    assert!(matches!(parse(&p), Ok(Parsed::Whole(_))));
                }
                Added::Held => assert!(i + 1 < n),
                Added::Refused(_) => panic!("refused"),
            }
        }
        assert_eq!((d.bytes(), d.datagrams()), (0, 0));
    }

    #[test]
    fn overlaps_and_duplicates_are_refused_whole() {
        let now = Instant::now();
        let whole = big(2, 3000);
        let frags = fragments(&whole, 1420);
        let mut d = Defrag::new();
        assert_eq!(d.add(&frag(&frags[0]), &frags[0], now), Added::Held);
        assert_eq!(d.add(&frag(&frags[0]), &frags[0], now), Added::Refused(2));
        assert_eq!((d.bytes(), d.datagrams()), (0, 0));
        // A fragment that overlaps the middle of another.
        let shifted = fragments(&whole, 1020);
        assert_eq!(d.add(&frag(&frags[0]), &frags[0], now), Added::Held);
        assert_eq!(
            d.add(&frag(&shifted[1]), &shifted[1], now),
            Added::Refused(2)
        );
    }

    #[test]
    fn bounds_hold_and_stale_datagrams_expire() {
        let t0 = Instant::now();
        let mut d = Defrag::new();
        for id in 0..MAX_DATAGRAMS as u16 {
            let f = &fragments(&big(id, 3000), 1420)[0];
            assert_eq!(d.add(&frag(f), f, t0), Added::Held);
        }
        let f = &fragments(&big(999, 3000), 1420)[0];
        assert_eq!(d.add(&frag(f), f, t0), Added::Refused(1));
        assert_eq!(d.expire(t0 + TIMEOUT), MAX_DATAGRAMS);
        assert_eq!((d.bytes(), d.datagrams()), (0, 0));
        assert_eq!(d.add(&frag(f), f, t0 + TIMEOUT), Added::Held);
        // Too many fragments for one datagram.
        let mut d = Defrag::new();
        let tiny = fragments(&big(7, 8 * (MAX_FRAGMENTS + 2)), 28);
        let mut refused = false;
        for f in &tiny {
            if let Added::Refused(n) = d.add(&frag(f), f, t0) {
                assert_eq!(n, MAX_FRAGMENTS + 1);
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
