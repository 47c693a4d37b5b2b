//! The engine's output queue: deficit round robin between flows (RFC 8290's flow queueing,
//! without its AQM), so that an interactive flow's packet is not written behind a bulk flow's
//! burst.
//!
//! A burst can hold megabytes of one bulk transfer's (super-)packets; written in the order they
//! came, a request of an interactive protocol that came late in the burst waits for all of it
//! (milliseconds at the link's rate). Here every packet toward the TUN is queued by its flow (a
//! hash of the 5-tuple the engine already parsed, [`flow_key`]); [`Sched::pop`] takes from the
//! flows in turn, each allowed [`QUANTUM`] bytes per round, and a flow that had nothing queued
//! goes ahead of the flows that did (RFC 8290 §4.1.1's new flows). A small flow's packet
//! therefore waits for at most one packet of at most [`QUANTUM`] bytes per other flow, and
//! never for a super-packet that was queued before it. One flow's packets keep their order
//! (one FIFO per flow).
//!
//! WireGuard messages into a tunnel are **not** reordered: each tunnel is one flow here
//! ([`Sched::push`]). A message's counter is fixed when it is encrypted, and the receiver drops
//! one more than its replay window below the highest counter it has seen (RFC 6479's window;
//! 1 024 messages in boringtun, `N_BITS`; the WireGuard paper §5.4.6): one burst without
//! offload encrypts thousands of segments, so moving a small flow's message ahead of them
//! would have the peer drop the bulk flow's messages. Between tunnels and toward the TUN the
//! flows take turns as above.
//!
//! Nothing is dropped here: the queue holds what one burst produced and the caller drains it
//! before it reads more, so its bytes are bounded by what one burst reads.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use super::{Dest, QUANTUM, Transmit};
use crate::packet::{L4, Summary};

/// The key given with messages into a tunnel (data, handshakes, keepalives, cookie replies):
/// their flow is the tunnel's whatever the key ([`Sched::push`]).
pub(crate) const NO_FLOW: u64 = 0;

/// The flows of messages into a tunnel: this bit and the tunnel's id. [`flow_key`] never sets it.
const TUNNEL_FLOWS: u64 = 1 << 63;

/// The flow `s` belongs to: its protocol, addresses and ports (ICMP echo: its id), hashed, and
/// never [`NO_FLOW`] nor a tunnel's. Both directions of a connection get different keys, which is fine: the
/// queue of one engine carries each direction separately (to the TUN, into a tunnel).
pub(crate) fn flow_key(hasher: &impl BuildHasher, s: &Summary) -> u64 {
    let mut h = hasher.build_hasher();
    s.proto().hash(&mut h);
    s.src.hash(&mut h);
    s.dst.hash(&mut h);
    match s.l4 {
        L4::Tcp {
            src_port, dst_port, ..
        }
        | L4::Udp { src_port, dst_port } => (src_port, dst_port).hash(&mut h),
        L4::Echo { id, .. } => id.hash(&mut h),
        // An ICMP error goes with the flow it is about.
        L4::Error(q) => (q.src, q.dst, q.proto, q.src_port, q.dst_port).hash(&mut h),
        L4::OtherIcmp | L4::Other(_) => {}
    }
    (h.finish() & !TUNNEL_FLOWS).max(1)
}

#[derive(Debug, Default)]
struct Flow {
    key: u64,
    queue: VecDeque<Transmit>,
    deficit: usize,
}

/// Which round-robin list a flow is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    New,
    Old,
}

/// The transmits waiting, by flow, in deficit round robin. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Sched {
    /// Flow slots; the active ones are on `new` or `old`, the others on `free`.
    flows: Vec<Flow>,
    free: Vec<usize>,
    by_key: HashMap<u64, usize>,
    /// Flows that had nothing queued when their first packet came: served first.
    new: VecDeque<usize>,
    old: VecDeque<usize>,
    len: usize,
    bytes: usize,
    /// While set ([`Sched::capture`]), pushes land here in their order instead of the queues.
    captured: Option<Vec<(u64, Transmit)>>,
}

impl Sched {
    /// From now until [`Sched::captured`], [`Sched::push`] sets transmits aside (with their
    /// flow) instead of queueing them: the engine holds some of them back.
    pub(crate) fn capture(&mut self) {
        self.captured = Some(Vec::new());
    }

    /// What was pushed since [`Sched::capture`], in order; pushes queue again.
    pub(crate) fn captured(&mut self) -> Vec<(u64, Transmit)> {
        self.captured.take().unwrap_or_default()
    }

    /// Queues `t` behind the other packets of flow `key`; a message into a tunnel behind the
    /// tunnel's other messages, whatever `key` (see the module documentation).
    pub(crate) fn push(&mut self, key: u64, t: Transmit) {
        let key = match t.dest {
            Dest::Tunnel(id) => TUNNEL_FLOWS | u64::from(id.0),
            Dest::Tun => key,
        };
        if let Some(c) = self.captured.as_mut() {
            return c.push((key, t));
        }
        let i = match self.by_key.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.free.pop().unwrap_or_else(|| {
                    self.flows.push(Flow::default());
                    self.flows.len() - 1
                });
                self.by_key.insert(key, i);
                let f = &mut self.flows[i];
                f.key = key;
                f.deficit = QUANTUM;
                self.new.push_back(i);
                i
            }
        };
        self.len += 1;
        self.bytes += t.bytes.len();
        self.flows[i].queue.push_back(t);
    }

    /// The next transmit: from the first flow (new flows before old) whose deficit covers its
    /// head packet; flows passed over get [`QUANTUM`] more and go to the end of the old list.
    pub(crate) fn pop(&mut self) -> Option<Transmit> {
        if self.len == 0 {
            return None;
        }
        loop {
            let (list, i) = match self.new.front() {
                Some(&i) => (List::New, i),
                None => (List::Old, *self.old.front()?),
            };
            let only = self.new.len() + self.old.len() == 1;
            let f = &mut self.flows[i];
            let size = f.queue.front().map_or(0, |t| t.bytes.len());
            if f.deficit < size {
                if !only {
                    f.deficit += QUANTUM;
                    self.rotate(list);
                    continue;
                }
                // Nobody else to wait for: no rounds of empty turns.
                f.deficit = size;
            }
            f.deficit -= size;
            let t = f.queue.pop_front()?;
            self.len -= 1;
            self.bytes -= t.bytes.len();
            if f.queue.is_empty() {
                let key = f.key;
                self.take_front(list);
                self.by_key.remove(&key);
                self.free.push(i);
            }
            return Some(t);
        }
    }

    /// Bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn take_front(&mut self, list: List) -> Option<usize> {
        match list {
            List::New => self.new.pop_front(),
            List::Old => self.old.pop_front(),
        }
    }

    /// Moves the front flow of `list` to the end of the old list.
    fn rotate(&mut self, list: List) {
        if let Some(i) = self.take_front(list) {
            self.old.push_back(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Dest, TunnelId};

    fn t(tag: u8, len: usize) -> Transmit {
        let mut bytes = vec![0u8; len];
        bytes[0] = tag;
        Transmit::new(Dest::Tun, bytes)
    }

    #[test]
    fn messages_into_one_tunnel_keep_their_order_whatever_their_keys() {
        let mut s = Sched::default();
        let msg =
            |tunnel: u32, tag: u8| Transmit::new(Dest::Tunnel(TunnelId(tunnel)), vec![tag; 1400]);
        for k in 0..20u8 {
            s.push(u64::from(k % 4) + 1, msg(1, k));
            s.push(u64::from(k % 3) + 7, msg(2, k));
        }
        let mut seen: Vec<(u32, u8)> = Vec::new();
        while let Some(t) = s.pop() {
            let Dest::Tunnel(id) = t.dest else {
                panic!("a tunnel's")
            };
            seen.push((id.0, t.bytes[0]));
        }
        for tunnel in [1, 2] {
            let tags: Vec<u8> = seen
                .iter()
                .filter(|(id, _)| *id == tunnel)
                .map(|(_, t)| *t)
                .collect();
            assert_eq!(tags, (0..20).collect::<Vec<u8>>(), "tunnel {tunnel}");
        }
        // The two tunnels take turns.
        assert_ne!(seen[..20].iter().filter(|(id, _)| *id == 1).count(), 20);
    }

    #[test]
    fn flows_take_turns_each_keeps_its_order_and_the_bytes_are_counted() {
        let mut s = Sched::default();
        for i in 0..5 {
            s.push(1, t(10 + i, 60_000));
            s.push(2, t(20 + i, 1_400));
        }
        s.push(3, t(30, 100));
        assert_eq!(s.bytes(), 5 * 61_400 + 100);
        let mut order = Vec::new();
        while let Some(x) = s.pop() {
            order.push(x.bytes[0]);
        }
        assert_eq!(s.bytes(), 0);
        assert_eq!(order.len(), 11);
        // The small flows go first; the bulk flow's packets after, in their order.
        let pos = |tag| order.iter().position(|&x| x == tag).expect("tag");
        assert!(pos(30) < pos(10) && pos(20) < pos(10), "{order:?}");
        for flow in [10u8, 20] {
            let mine: Vec<u8> = order
                .iter()
                .copied()
                .filter(|x| (flow..flow + 5).contains(x))
                .collect();
            assert_eq!(mine, (flow..flow + 5).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_lone_flow_goes_out_without_empty_rounds_and_slots_are_reused() {
        let mut s = Sched::default();
        for round in 0..3u8 {
            s.push(7, t(round, 65_000));
            assert_eq!(s.pop().map(|x| x.bytes[0]), Some(round));
            assert!(s.pop().is_none());
        }
        assert_eq!(s.flows.len(), 1);
    }
}
