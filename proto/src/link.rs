//! The part every role shares: framing, the outgoing buffer and the heartbeat clock.
//!
//! Sans-IO contract (the same for [`crate::ClientCore`], [`crate::SiteCore`] and
//! [`crate::GatewayCore`]): feed received bytes with `handle_input(bytes, now)`; after any call,
//! drain `poll_transmit()` (bytes to write, in order) and `poll_event()`; sleep until
//! `poll_timeout()` and then call `handle_timeout(now)`. Nothing here reads a clock, touches a
//! socket or blocks; `now` always comes from the caller, so tests drive a virtual clock.

use std::time::{Duration, Instant};

use crate::frame::{self, FrameDecoder};
use crate::message::{ErrorCode, Message};

/// The most transmit buffer capacity a link keeps between writes ([`Link::reclaim`]): a
/// burst of 64 super-packets (the TUN readers' batch) is about 4 MiB.
pub const KEEP_TRANSMIT: usize = 4 * 1024 * 1024;

/// Received datagram buffers a core keeps for reuse ([`DatagramPool`]).
const POOLED_DATAGRAMS: usize = 64;

/// Buffers for the datagrams a client or site core hands out in its `Data` events: taken
/// from here and given back by the program once the datagram is handled, so that the data
/// path allocates nothing per datagram.
#[derive(Debug, Default)]
pub(crate) struct DatagramPool {
    free: Vec<Vec<u8>>,
}

impl DatagramPool {
    /// A copy of `datagram` in a pooled buffer.
    pub(crate) fn copy(&mut self, datagram: &[u8]) -> Vec<u8> {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(datagram);
        buf
    }

    /// Takes a buffer back (at most [`POOLED_DATAGRAMS`] are kept).
    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.free.len() < POOLED_DATAGRAMS {
            self.free.push(buf);
        }
    }
}

/// A link is dead after this many heartbeat intervals without a byte from the peer.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Bounds on the heartbeat interval a peer may ask for: below one second the control traffic
/// is noise; above an hour a dead site goes unnoticed for half a shift.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// Why a link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent an `error` message.
    Error { code: ErrorCode, text: String },
    /// The peer broke the protocol (bad frame, bad message, wrong order).
    Protocol(String),
    /// Nothing heard from the peer for [`MISSED_HEARTBEATS`] intervals.
    Timeout,
    /// This side ended the link (logout, refusal sent, enrollment done).
    Local,
}

#[derive(Debug)]
pub(crate) struct Link {
    decoder: FrameDecoder,
    transmit: Vec<u8>,
    heartbeat: Duration,
    last_sent: Instant,
    last_received: Instant,
    closed: Option<CloseReason>,
}

/// Clamps a requested heartbeat interval to the allowed range.
pub fn clamp_heartbeat(d: Duration) -> Duration {
    d.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

impl Link {
    /// A link that accepts control frames up to [`frame::MAX_CONTROL`].
    pub(crate) fn new(now: Instant, heartbeat: Duration) -> Self {
        Self::with_max_control(now, heartbeat, frame::MAX_CONTROL)
    }

    /// A link that refuses control frames longer than `max_control` bytes (the refusal is
    /// sent to the peer before the link closes, as for every framing error).
    pub(crate) fn with_max_control(now: Instant, heartbeat: Duration, max_control: usize) -> Self {
        Self {
            decoder: FrameDecoder::with_max_control(max_control),
            transmit: Vec::new(),
            heartbeat: clamp_heartbeat(heartbeat),
            last_sent: now,
            last_received: now,
            closed: None,
        }
    }

    pub(crate) fn set_heartbeat(&mut self, d: Duration) {
        self.heartbeat = clamp_heartbeat(d);
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    pub(crate) fn send(&mut self, msg: &Message, now: Instant) {
        if self.closed.is_none() {
            let json = msg.to_json();
            if json.len() > frame::MAX_CONTROL {
                // Never put a frame on the wire that the peer must refuse: end the link
                // instead, with a reason in our own logs.
                self.close(CloseReason::Protocol(format!(
                    "a `{}` message of {} bytes exceeds the protocol's limit",
                    msg.kind(),
                    json.len()
                )));
                return;
            }
            frame::encode_control(&json, &mut self.transmit);
            self.last_sent = now;
        }
    }

    pub(crate) fn send_data(&mut self, session: u32, datagram: &[u8], now: Instant) {
        if self.closed.is_none() && datagram.len() + 4 <= frame::MAX_DATA {
            frame::encode_data(session, datagram, &mut self.transmit);
            self.last_sent = now;
        }
    }

    /// Ends the link; what was queued before is still transmitted.
    pub(crate) fn close(&mut self, reason: CloseReason) {
        if self.closed.is_none() {
            self.closed = Some(reason);
        }
    }

    pub(crate) fn closed(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    pub(crate) fn push_input(&mut self, bytes: &[u8], now: Instant) {
        if self.closed.is_none() && !bytes.is_empty() {
            self.last_received = now;
            self.decoder.push(bytes);
        }
    }

    /// The next received message or datagram, heartbeats skipped (in a loop: a read full of
    /// heartbeats costs no stack). A framing or JSON error closes the link.
    pub(crate) fn next_input(&mut self) -> Option<Input<'_>> {
        loop {
            if self.closed.is_some() {
                return None;
            }
            let span = match self.decoder.next_span() {
                Ok(None) => return None,
                Ok(Some(span)) => span,
                Err(e) => return Some(self.fail(e.to_string())),
            };
            // Decided before borrowing: a datagram is returned borrowed, a message parsed.
            if span.is_data() {
                let (session, datagram) = self.decoder.data_at(span);
                return Some(Input::Data { session, datagram });
            }
            let json = self.decoder.payload_at(span);
            match Message::from_json(json) {
                Ok(Message::Heartbeat) => {}
                Ok(m) => return Some(Input::Message(m)),
                Err(e) => return Some(self.fail(format!("malformed message: {e}"))),
            }
        }
    }

    /// A protocol violation: tell the peer why (its last frame), then close.
    fn fail(&mut self, what: String) -> Input<'static> {
        let what = bounded_reason(&what);
        let now = self.last_received;
        self.send(
            &Message::Error {
                code: ErrorCode::Protocol,
                text: what.clone(),
            },
            now,
        );
        let reason = CloseReason::Protocol(what);
        self.close(reason.clone());
        Input::Failed(reason)
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.transmit.is_empty()).then(|| std::mem::take(&mut self.transmit))
    }

    /// Takes back a buffer [`Link::poll_transmit`] returned, once written: the next frames
    /// are encoded into it instead of a new buffer that grows again (a burst of super-packets
    /// is megabytes). Kept only while nothing new is queued, and only up to [`KEEP_TRANSMIT`]
    /// bytes of capacity.
    pub(crate) fn reclaim(&mut self, mut buf: Vec<u8>) {
        if self.transmit.is_empty() && buf.capacity() <= KEEP_TRANSMIT {
            buf.clear();
            self.transmit = buf;
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        Some((self.last_sent + self.heartbeat).min(self.dead_at()))
    }

    fn dead_at(&self) -> Instant {
        self.last_received + self.heartbeat * MISSED_HEARTBEATS
    }

    /// Sends a heartbeat when due; returns true when the peer has been silent too long (the
    /// link is then closed with [`CloseReason::Timeout`]).
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.closed.is_some() {
            return false;
        }
        if now >= self.dead_at() {
            self.close(CloseReason::Timeout);
            return true;
        }
        if now >= self.last_sent + self.heartbeat {
            self.send(&Message::Heartbeat, now);
        }
        false
    }
}

/// What [`Link::next_input`] takes out of the received bytes.
/// The longest description of a protocol violation that is kept: it may quote the peer's own
/// bytes (a parser's "unknown variant `…`"), and it ends up in logs and the audit log.
pub const MAX_REASON_TEXT: usize = 200;

/// `what`, with control characters escaped and cut to [`MAX_REASON_TEXT`] bytes. Backslashes
/// stay as they are: texts that quote a value escaped it already, and a literal `\n` breaks no
/// line.
pub fn bounded_reason(what: &str) -> String {
    let escaped: String = if what.chars().any(char::is_control) {
        what.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        what.to_owned()
    };
    if escaped.len() <= MAX_REASON_TEXT {
        return escaped;
    }
    let mut end = MAX_REASON_TEXT;
    while !escaped.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &escaped[..end])
}

pub(crate) enum Input<'a> {
    Message(Message),
    /// Borrowed from the link's receive buffer until the next call.
    Data {
        session: u32,
        datagram: &'a [u8],
    },
    Failed(CloseReason),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_transmit_buffer_is_reused_and_datagram_buffers_come_back() {
        let now = Instant::now();
        let mut link = Link::new(now, Duration::from_secs(10));
        link.send_data(1, &[7u8; 60_000], now);
        let first = link.poll_transmit().expect("frame");
        let (ptr, cap) = (first.as_ptr(), first.capacity());
        link.reclaim(first);
        link.send_data(1, &[8u8; 60_000], now);
        let second = link.poll_transmit().expect("frame");
        assert_eq!(
            (second.as_ptr(), second.capacity()),
            (ptr, cap),
            "the same buffer"
        );
        assert_eq!(second.len(), frame::HEADER_LEN + 4 + 60_000);
        // Not while something new is queued (it would be lost), nor a huge one.
        link.send_data(2, b"x", now);
        link.reclaim(second);
        assert_eq!(
            link.poll_transmit().expect("frame").len(),
            frame::HEADER_LEN + 5
        );
        link.reclaim(Vec::with_capacity(KEEP_TRANSMIT + 1));
        assert_eq!(link.transmit.capacity(), 0);

        let mut pool = DatagramPool::default();
        let a = pool.copy(b"one");
        let ptr = a.as_ptr();
        pool.recycle(a);
        let b = pool.copy(b"two");
        assert_eq!((b.as_ptr(), &b[..]), (ptr, &b"two"[..]));
    }

    #[test]
    fn clients_and_sites_accept_inventories_up_to_the_protocol_limit() {
        let now = Instant::now();
        let mut link = Link::new(now, Duration::from_secs(10));
        let len = u32::try_from(frame::MAX_CONTROL)
            .expect("fits")
            .to_be_bytes();
        link.push_input(
            &[frame::PROTOCOL_VERSION, 1, len[0], len[1], len[2], len[3]],
            now,
        );
        assert!(link.next_input().is_none());
        assert!(
            link.closed().is_none(),
            "a 4 MiB control frame is only incomplete"
        );
    }

    #[test]
    fn a_million_heartbeats_in_one_read_are_skipped_by_a_loop() {
        // 1 000 000 heartbeats (26 MB) in one read, then a `list`. On a small stack: skipping
        // a heartbeat must not cost a stack frame.
        let run = || {
            let now = Instant::now();
            let mut link = Link::new(now, Duration::from_secs(10));
            let heartbeat = Message::Heartbeat.to_json();
            let mut wire = Vec::with_capacity(1_000_001 * (frame::HEADER_LEN + heartbeat.len()));
            for _ in 0..1_000_000 {
                frame::encode_control(&heartbeat, &mut wire);
            }
            frame::encode_control(&Message::List { changes: false }.to_json(), &mut wire);
            link.push_input(&wire, now);
            let first = matches!(
                link.next_input(),
                Some(Input::Message(Message::List { .. }))
            );
            first && link.next_input().is_none() && link.closed().is_none()
        };
        let thread = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(run)
            .expect("spawn");
        assert!(thread.join().expect("no stack overflow"));
    }
}
