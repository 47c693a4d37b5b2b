//! The filter's parts as values: why a packet is dropped ([`DropReason`]), what a connected
//! device allows ([`Device`]: the union of its connected agents' ports), and which flows the
//! technician opened ([`Flows`]). The [`crate::engine`] applies them to every packet.
//!
//! Flows, as a stateful firewall keeps them: TCP opens on a SYN only and closes on FIN or RST
//! (after a short linger that lets the last segments through); UDP and ICMP echo flows idle
//! out. Expiry runs on a timer and takes flows in deadline order, so it costs O(expired); the
//! packet path never scans the table. A full table refuses new flows.
//!
//! Pure: no I/O, no clock (time is passed in).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use pinhole_proto::{Port, Transport};

use crate::packet::{PROTO_TCP, PROTO_UDP};

/// Flow idle timeouts, as a stateful firewall would use: TCP connections to a PLC can sit idle
/// for long (an engineering tool polling every few minutes); UDP and ICMP answers come fast; a
/// closed TCP connection lingers for its last ACKs and retransmitted FINs.
pub const TCP_IDLE: Duration = Duration::from_secs(2 * 3600);
pub const TCP_LINGER: Duration = Duration::from_secs(10);
pub const UDP_IDLE: Duration = Duration::from_secs(180);
pub const ICMP_IDLE: Duration = Duration::from_secs(30);

/// A cap on tracked flows per tunnel: a scan from the technician's PC through one allowed port
/// cannot grow memory without bound; new flows beyond it are dropped until old ones expire.
pub const MAX_FLOWS: usize = 16 * 1024;

/// Why a packet was dropped. The counters in `pinhole status --json` use these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Too short, wrong version, bad lengths.
    Malformed,
    /// An IPv4 fragment refused by reassembly (overlap, a bound broken, a bad length).
    FragmentRefused,
    /// An IPv4 fragment whose datagram did not complete in time.
    FragmentTimeout,
    /// An IPv4 header with options, or an authentication header.
    IpOptions,
    /// An IPv6 extension header (or any next header other than TCP, UDP, ICMPv6).
    Ipv6Extension,
    /// A protocol other than TCP, UDP, ICMP echo and ICMP errors.
    Protocol,
    /// The destination is not a connected device.
    NotConnected,
    /// The device is connected, but none of its agents allows this protocol and port.
    PortNotAllowed,
    /// At the client: a packet from the TUN whose source is not the tunnel address.
    WrongSource,
    /// At the client: a decrypted packet for another address than the tunnel address.
    WrongDestination,
    /// Cryptokey routing: a decrypted packet whose source does not belong to its tunnel (at the
    /// client, not one of the tunnel's devices; at the site, not the session's tunnel address).
    WrongTunnel,
    /// A packet that answers no flow the technician opened.
    NoFlow,
    /// The flow table is full.
    FlowTableFull,
    /// No tunnel for this session (closed, or never opened).
    NoTunnel,
    /// Offload metadata (GSO, partial checksum) that does not match its packet, or a broken
    /// metadata trailer (see [`crate::gso`]).
    BadOffload,
    /// A packet toward the TUN held for its tunnel ([`crate::Engine::hold`]) beyond the hold's
    /// bounds ([`crate::engine::HOLD_PACKETS`], [`crate::engine::HOLD_BYTES`]).
    HoldFull,
    /// A held packet whose tunnel was removed before it was released (at the site: the
    /// session's firewall table did not load, and nothing goes to the device network).
    HeldDiscarded,
}

impl DropReason {
    pub const ALL: [DropReason; 17] = [
        DropReason::Malformed,
        DropReason::FragmentRefused,
        DropReason::FragmentTimeout,
        DropReason::IpOptions,
        DropReason::Ipv6Extension,
        DropReason::Protocol,
        DropReason::NotConnected,
        DropReason::PortNotAllowed,
        DropReason::WrongSource,
        DropReason::WrongDestination,
        DropReason::WrongTunnel,
        DropReason::NoFlow,
        DropReason::FlowTableFull,
        DropReason::NoTunnel,
        DropReason::BadOffload,
        DropReason::HoldFull,
        DropReason::HeldDiscarded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::FragmentRefused => "fragment-refused",
            DropReason::FragmentTimeout => "fragment-timeout",
            DropReason::IpOptions => "ip-options",
            DropReason::Ipv6Extension => "ipv6-extension",
            DropReason::Protocol => "protocol",
            DropReason::NotConnected => "not-connected",
            DropReason::PortNotAllowed => "port-not-allowed",
            DropReason::WrongSource => "wrong-source",
            DropReason::WrongDestination => "wrong-destination",
            DropReason::WrongTunnel => "wrong-tunnel",
            DropReason::NoFlow => "no-flow",
            DropReason::FlowTableFull => "flow-table-full",
            DropReason::NoTunnel => "no-tunnel",
            DropReason::BadOffload => "bad-offload",
            DropReason::HoldFull => "hold-full",
            DropReason::HeldDiscarded => "held-discarded",
        }
    }
}

/// One connected device: the ports of each connected agent, their union, and what it refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    agents: BTreeMap<String, BTreeSet<Port>>,
    allowed: BTreeSet<Port>,
    refused: u64,
    last_refused: Option<(u8, u16)>,
}

impl Device {
    /// Adds (or replaces) an agent's ports.
    pub fn connect(&mut self, agent: &str, ports: BTreeSet<Port>) {
        self.agents.insert(agent.to_owned(), ports);
        self.union();
    }

    /// Removes an agent; true if it was there.
    pub fn disconnect(&mut self, agent: &str) -> bool {
        let was = self.agents.remove(agent).is_some();
        self.union();
        was
    }

    fn union(&mut self) {
        self.allowed = self.agents.values().flatten().copied().collect();
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn agents(&self) -> impl Iterator<Item = &str> {
        self.agents.keys().map(String::as_str)
    }

    /// The union of the agents' ports.
    pub fn allowed(&self) -> &BTreeSet<Port> {
        &self.allowed
    }

    /// Whether (`proto`, `port`) is in the union.
    pub fn allows(&self, proto: u8, port: u16) -> bool {
        let transport = match proto {
            PROTO_TCP => Transport::Tcp,
            PROTO_UDP => Transport::Udp,
            _ => return false,
        };
        self.allowed.contains(&Port { transport, port })
    }

    pub(crate) fn note_refused(&mut self, proto: u8, port: u16) {
        self.refused += 1;
        self.last_refused = Some((proto, port));
    }

    /// How many packets to this device were refused, and the last one as `tcp/22`.
    pub fn refused(&self) -> (u64, Option<String>) {
        let last = self.last_refused.map(|(proto, port)| match proto {
            PROTO_TCP => format!("tcp/{port}"),
            PROTO_UDP => format!("udp/{port}"),
            1 | 58 => "icmp".to_owned(),
            p => format!("protocol {p}"),
        });
        (self.refused, last)
    }
}

/// A flow, in the technician's direction: (protocol, technician address and port, device
/// address and port). ICMP echo uses the echo id as the technician's port and 0 for the
/// device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub tech: IpAddr,
    pub tech_port: u16,
    pub device: IpAddr,
    pub device_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    last: Instant,
    closing: bool,
    /// The deadline entry that stands for this flow (older entries are stale).
    entry: u64,
}

impl Flow {
    fn idle(&self, proto: u8) -> Duration {
        match proto {
            PROTO_TCP if self.closing => TCP_LINGER,
            PROTO_TCP => TCP_IDLE,
            PROTO_UDP => UDP_IDLE,
            _ => ICMP_IDLE,
        }
    }

    fn alive(&self, proto: u8, now: Instant) -> bool {
        now.saturating_duration_since(self.last) <= self.idle(proto)
    }
}

/// The flows of one tunnel, with a deadline index for expiry.
#[derive(Debug, Default)]
pub struct Flows {
    map: HashMap<FlowKey, Flow>,
    deadlines: BTreeMap<(Instant, u64), FlowKey>,
    next: u64,
}

impl Flows {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn schedule(&mut self, key: FlowKey, at: Instant) -> u64 {
        self.next += 1;
        self.deadlines.insert((at, self.next), key);
        self.next
    }

    /// Opens (or refreshes) a flow. `Err(FlowTableFull)` if the table is full.
    pub fn open(&mut self, key: FlowKey, now: Instant) -> Result<(), DropReason> {
        if let Some(f) = self.map.get_mut(&key) {
            let was_closing = f.closing;
            f.last = now;
            f.closing = false;
            if was_closing {
                let entry = self.schedule(key, now + TCP_IDLE);
                if let Some(f) = self.map.get_mut(&key) {
                    f.entry = entry;
                }
            }
            return Ok(());
        }
        if self.map.len() >= MAX_FLOWS {
            self.expire(now);
            if self.map.len() >= MAX_FLOWS {
                return Err(DropReason::FlowTableFull);
            }
        }
        let flow = Flow {
            last: now,
            closing: false,
            entry: 0,
        };
        let entry = self.schedule(key, now + flow.idle(key.proto));
        self.map.insert(key, Flow { entry, ..flow });
        Ok(())
    }

    /// Refreshes a live flow; `closing` (a FIN or RST) starts its linger. False if there is
    /// no live flow.
    pub fn touch(&mut self, key: &FlowKey, now: Instant, closing: bool) -> bool {
        let Some(f) = self.map.get_mut(key) else {
            return false;
        };
        if !f.alive(key.proto, now) {
            return false;
        }
        f.last = now;
        if closing && !f.closing {
            f.closing = true;
            let entry = self.schedule(*key, now + TCP_LINGER);
            if let Some(f) = self.map.get_mut(key) {
                f.entry = entry;
            }
        }
        true
    }

    /// Whether a live flow exists (for ICMP errors, which do not refresh it).
    pub fn contains(&self, key: &FlowKey, now: Instant) -> bool {
        self.map.get(key).is_some_and(|f| f.alive(key.proto, now))
    }

    /// Forgets the flows that `keep` rejects (an agent disconnected: its ports go). Not on the
    /// packet path: it runs when an agent leaves.
    pub fn retain(&mut self, mut keep: impl FnMut(&FlowKey) -> bool) {
        self.map.retain(|k, _| keep(k));
        let map = &self.map;
        self.deadlines.retain(|_, k| map.contains_key(k));
    }

    /// Forgets idle flows, in deadline order: O(expired + refreshed), never the whole table.
    pub fn expire(&mut self, now: Instant) {
        while let Some(entry) = self.deadlines.first_entry() {
            let (at, seq) = *entry.key();
            if at > now {
                break;
            }
            let key = entry.remove();
            let Some(f) = self.map.get(&key).copied() else {
                continue;
            };
            if f.entry != seq {
                continue;
            }
            let due = f.last + f.idle(key.proto);
            if due > now {
                let entry = self.schedule(key, due);
                if let Some(f) = self.map.get_mut(&key) {
                    f.entry = entry;
                }
            } else {
                self.map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: PROTO_UDP,
            tech: "100.64.0.2".parse().expect("ip"),
            tech_port: port,
            device: "192.168.0.10".parse().expect("ip"),
            device_port: 161,
        }
    }

    #[test]
    fn the_union_of_agents_and_removing_one() {
        let mut d = Device::default();
        d.connect(
            "plc",
            [Port::tcp(102), Port::udp(161)].into_iter().collect(),
        );
        d.connect(
            "modbus",
            [Port::tcp(502), Port::tcp(102)].into_iter().collect(),
        );
        assert!(d.allows(PROTO_TCP, 102) && d.allows(PROTO_TCP, 502) && d.allows(PROTO_UDP, 161));
        assert!(!d.allows(PROTO_UDP, 102));
        assert!(d.disconnect("plc"));
        assert!(d.allows(PROTO_TCP, 102), "still modbus's");
        assert!(!d.allows(PROTO_UDP, 161));
        assert!(d.disconnect("modbus"));
        assert!(d.is_empty() && d.allowed().is_empty());
    }

    #[test]
    fn expiry_takes_only_what_is_due_and_keeps_refreshed_flows() {
        let t0 = Instant::now();
        let mut f = Flows::default();
        for p in 0..100 {
            f.open(key(p), t0).expect("room");
        }
        // Flow 7 is refreshed halfway; at the first deadline only the others go.
        assert!(f.touch(&key(7), t0 + UDP_IDLE / 2, false));
        f.expire(t0 + UDP_IDLE + Duration::from_millis(1));
        assert_eq!(f.len(), 1);
        assert!(f.contains(&key(7), t0 + UDP_IDLE));
        f.expire(t0 + UDP_IDLE * 2);
        assert!(f.is_empty());
        assert!(f.deadlines.is_empty());
    }

    #[test]
    fn a_closing_tcp_flow_lingers_briefly() {
        let t0 = Instant::now();
        let mut f = Flows::default();
        let k = FlowKey {
            proto: PROTO_TCP,
            ..key(1)
        };
        f.open(k, t0).expect("room");
        assert!(f.touch(&k, t0, true));
        assert!(f.contains(&k, t0 + TCP_LINGER));
        assert!(!f.contains(&k, t0 + TCP_LINGER + Duration::from_secs(1)));
        f.expire(t0 + TCP_LINGER + Duration::from_secs(1));
        assert!(f.is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_flows_until_old_ones_expire() {
        let t0 = Instant::now();
        let mut f = Flows::default();
        for p in 0..MAX_FLOWS {
            let k = FlowKey {
                tech_port: (p % 60_000) as u16,
                device_port: (p / 60_000) as u16,
                ..key(0)
            };
            f.open(k, t0).expect("room");
        }
        assert_eq!(f.open(key(60_001), t0), Err(DropReason::FlowTableFull));
        assert_eq!(f.open(key(60_001), t0 + UDP_IDLE * 2), Ok(()));
    }
}
