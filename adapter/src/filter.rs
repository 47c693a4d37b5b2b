//! The packet filter: default deny, exactly the connected agents' ports, replies only on flows
//! the technician opened.
//!
//! The same filter runs at both ends of a session, in two directions:
//!
//! * **forward** (technician → device): the destination must be a connected device, and the
//!   protocol and port in its agent's set (ICMP echo requests are allowed to a connected
//!   device). At the site, the source must also be the session's tunnel address. A passing
//!   packet opens (or refreshes) a flow.
//! * **reverse** (device → technician): only packets that answer an open flow pass.
//!
//! The client applies `forward` to what it reads from its TUN and `reverse` to what WireGuard
//! decrypts; the site applies `forward` to what WireGuard decrypts and `reverse` to what its TUN
//! reads from the device network. IPv4 fragments, IPv4 options, IPv6 extension headers and
//! malformed headers are dropped in both directions: the TUN MTU makes fragments unnecessary,
//! and a filter that cannot see the ports must not guess.
//!
//! Pure: no I/O, no clock (time is passed in), nothing allocated per packet once a flow exists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use pinhole_proto::{Port, Transport};

/// Flow idle timeouts, as a stateful firewall would use: TCP connections to a PLC can sit idle
/// for long (an engineering tool polling every few minutes); UDP and ICMP answers come fast.
const TCP_IDLE: Duration = Duration::from_secs(2 * 3600);
const UDP_IDLE: Duration = Duration::from_secs(180);
const ICMP_IDLE: Duration = Duration::from_secs(30);

/// A cap on tracked flows per filter: a scan from the technician's PC through one allowed port
/// cannot grow memory without bound; new flows beyond it are dropped until old ones expire.
pub const MAX_FLOWS: usize = 16 * 1024;

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// Why a packet was dropped. The counters in `pinhole status --json` use these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Too short, wrong version, bad lengths.
    Malformed,
    /// An IPv4 fragment (MF set or a non-zero offset).
    Fragment,
    /// An IPv4 header with options.
    IpOptions,
    /// An IPv6 extension header (or any next header other than TCP, UDP, ICMPv6).
    Ipv6Extension,
    /// A protocol other than TCP, UDP and ICMP echo.
    Protocol,
    /// The destination is not a connected device.
    NotConnected,
    /// The device is connected, but not on this protocol and port.
    PortNotAllowed,
    /// At the site: the source is not the session's tunnel address.
    WrongSource,
    /// A packet from a device that answers no flow the technician opened.
    NoFlow,
    /// The flow table is full.
    FlowTableFull,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::IpOptions,
        DropReason::Ipv6Extension,
        DropReason::Protocol,
        DropReason::NotConnected,
        DropReason::PortNotAllowed,
        DropReason::WrongSource,
        DropReason::NoFlow,
        DropReason::FlowTableFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::IpOptions => "ip-options",
            DropReason::Ipv6Extension => "ipv6-extension",
            DropReason::Protocol => "protocol",
            DropReason::NotConnected => "not-connected",
            DropReason::PortNotAllowed => "port-not-allowed",
            DropReason::WrongSource => "wrong-source",
            DropReason::NoFlow => "no-flow",
            DropReason::FlowTableFull => "flow-table-full",
        }
    }
}

/// The filter's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop(DropReason),
}

/// What the filter reads from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp { src_port: u16, dst_port: u16 },
    Udp { src_port: u16, dst_port: u16 },
    EchoRequest { id: u16 },
    EchoReply { id: u16 },
}

/// Parses the IP and transport headers the filter needs, refusing what it must not pass.
pub fn parse(packet: &[u8]) -> Result<Summary, DropReason> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => parse_v4(packet),
        Some(6) => parse_v6(packet),
        _ => Err(DropReason::Malformed),
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse_v4(p: &[u8]) -> Result<Summary, DropReason> {
    if p.len() < 20 {
        return Err(DropReason::Malformed);
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(DropReason::Malformed);
    }
    if ihl > 20 {
        return Err(DropReason::IpOptions);
    }
    let total = usize::from(be16(p, 2).ok_or(DropReason::Malformed)?);
    if total < ihl || total > p.len() {
        return Err(DropReason::Malformed);
    }
    let flags_frag = be16(p, 6).ok_or(DropReason::Malformed)?;
    // MF set, or a fragment offset: a fragment, first or later.
    if flags_frag & 0x2000 != 0 || flags_frag & 0x1fff != 0 {
        return Err(DropReason::Fragment);
    }
    let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
    let l4 = parse_l4(p[9], &p[ihl..total], PROTO_ICMP)?;
    Ok(Summary { src, dst, l4 })
}

fn parse_v6(p: &[u8]) -> Result<Summary, DropReason> {
    if p.len() < 40 {
        return Err(DropReason::Malformed);
    }
    let payload = usize::from(be16(p, 4).ok_or(DropReason::Malformed)?);
    if 40 + payload > p.len() {
        return Err(DropReason::Malformed);
    }
    let next = p[6];
    if !matches!(next, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) {
        return Err(DropReason::Ipv6Extension);
    }
    let addr = |at: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&p[at..at + 16]);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    let l4 = parse_l4(next, &p[40..40 + payload], PROTO_ICMPV6)?;
    Ok(Summary {
        src: addr(8),
        dst: addr(24),
        l4,
    })
}

fn parse_l4(proto: u8, l4: &[u8], icmp: u8) -> Result<L4, DropReason> {
    match proto {
        PROTO_TCP => {
            // A TCP header is at least 20 bytes with a sane data offset.
            if l4.len() < 20
                || usize::from(l4[12] >> 4) * 4 < 20
                || usize::from(l4[12] >> 4) * 4 > l4.len()
            {
                return Err(DropReason::Malformed);
            }
            Ok(L4::Tcp {
                src_port: be16(l4, 0).ok_or(DropReason::Malformed)?,
                dst_port: be16(l4, 2).ok_or(DropReason::Malformed)?,
            })
        }
        PROTO_UDP => {
            if l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
            Ok(L4::Udp {
                src_port: be16(l4, 0).ok_or(DropReason::Malformed)?,
                dst_port: be16(l4, 2).ok_or(DropReason::Malformed)?,
            })
        }
        p if p == icmp => {
            if l4.len() < 8 {
                return Err(DropReason::Malformed);
            }
            let (request, reply) = if icmp == PROTO_ICMP {
                (8, 0)
            } else {
                (128, 129)
            };
            let id = be16(l4, 4).ok_or(DropReason::Malformed)?;
            match l4[0] {
                t if t == request && l4[1] == 0 => Ok(L4::EchoRequest { id }),
                t if t == reply && l4[1] == 0 => Ok(L4::EchoReply { id }),
                _ => Err(DropReason::Protocol),
            }
        }
        _ => Err(DropReason::Protocol),
    }
}

/// A flow, in the forward direction: (protocol, technician address and port, device address
/// and port). ICMP uses the echo id as the technician's port and 0 for the device's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FlowKey {
    proto: u8,
    tech: IpAddr,
    tech_port: u16,
    device: IpAddr,
    device_port: u16,
}

/// One connected device: its allowed ports, and at the site the only source allowed to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    ports: BTreeSet<Port>,
    source: Option<IpAddr>,
}

/// The filter of one client (all its connected devices) or one site session.
#[derive(Debug, Default)]
pub struct Filter {
    rules: BTreeMap<IpAddr, Rule>,
    flows: HashMap<FlowKey, Instant>,
    drops: BTreeMap<DropReason, u64>,
    passed: u64,
}

impl Filter {
    /// The empty filter: everything is dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `ports` of `device`; at the site, `source` is the session's tunnel address.
    /// Replaces an earlier rule for the same device (and forgets its flows).
    pub fn allow(&mut self, device: IpAddr, ports: BTreeSet<Port>, source: Option<IpAddr>) {
        self.revoke(device);
        self.rules.insert(device, Rule { ports, source });
    }

    /// Removes a device: nothing to or from it passes afterwards, open flows included.
    pub fn revoke(&mut self, device: IpAddr) {
        self.rules.remove(&device);
        self.flows.retain(|k, _| k.device != device);
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn devices(&self) -> impl Iterator<Item = &IpAddr> {
        self.rules.keys()
    }

    /// Drop counts by reason, and the number of packets passed.
    pub fn counters(&self) -> (&BTreeMap<DropReason, u64>, u64) {
        (&self.drops, self.passed)
    }

    fn count(&mut self, v: Verdict) -> Verdict {
        match v {
            Verdict::Pass => self.passed += 1,
            Verdict::Drop(r) => *self.drops.entry(r).or_default() += 1,
        }
        v
    }

    fn idle(proto: u8) -> Duration {
        match proto {
            PROTO_TCP => TCP_IDLE,
            PROTO_UDP => UDP_IDLE,
            _ => ICMP_IDLE,
        }
    }

    /// Technician → device.
    pub fn forward(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let v = self.forward_inner(packet, now);
        self.count(v)
    }

    fn forward_inner(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let s = match parse(packet) {
            Ok(s) => s,
            Err(r) => return Verdict::Drop(r),
        };
        let Some(rule) = self.rules.get(&s.dst) else {
            return Verdict::Drop(DropReason::NotConnected);
        };
        if rule.source.is_some_and(|src| src != s.src) {
            return Verdict::Drop(DropReason::WrongSource);
        }
        let (proto, tech_port, device_port) = match s.l4 {
            L4::Tcp { src_port, dst_port } => {
                if !rule.ports.contains(&Port::tcp(dst_port)) {
                    return Verdict::Drop(DropReason::PortNotAllowed);
                }
                (PROTO_TCP, src_port, dst_port)
            }
            L4::Udp { src_port, dst_port } => {
                if !rule.ports.contains(&Port {
                    transport: Transport::Udp,
                    port: dst_port,
                }) {
                    return Verdict::Drop(DropReason::PortNotAllowed);
                }
                (PROTO_UDP, src_port, dst_port)
            }
            L4::EchoRequest { id } => (PROTO_ICMP, id, 0),
            L4::EchoReply { .. } => return Verdict::Drop(DropReason::Protocol),
        };
        let key = FlowKey {
            proto,
            tech: s.src,
            tech_port,
            device: s.dst,
            device_port,
        };
        if !self.flows.contains_key(&key) && self.flows.len() >= MAX_FLOWS {
            self.expire(now);
            if self.flows.len() >= MAX_FLOWS {
                return Verdict::Drop(DropReason::FlowTableFull);
            }
        }
        self.flows.insert(key, now);
        Verdict::Pass
    }

    /// Device → technician.
    pub fn reverse(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let v = self.reverse_inner(packet, now);
        self.count(v)
    }

    fn reverse_inner(&mut self, packet: &[u8], now: Instant) -> Verdict {
        let s = match parse(packet) {
            Ok(s) => s,
            Err(r) => return Verdict::Drop(r),
        };
        if !self.rules.contains_key(&s.src) {
            return Verdict::Drop(DropReason::NoFlow);
        }
        let key = match s.l4 {
            L4::Tcp { src_port, dst_port } => FlowKey {
                proto: PROTO_TCP,
                tech: s.dst,
                tech_port: dst_port,
                device: s.src,
                device_port: src_port,
            },
            L4::Udp { src_port, dst_port } => FlowKey {
                proto: PROTO_UDP,
                tech: s.dst,
                tech_port: dst_port,
                device: s.src,
                device_port: src_port,
            },
            L4::EchoReply { id } => FlowKey {
                proto: PROTO_ICMP,
                tech: s.dst,
                tech_port: id,
                device: s.src,
                device_port: 0,
            },
            L4::EchoRequest { .. } => return Verdict::Drop(DropReason::NoFlow),
        };
        match self.flows.get_mut(&key) {
            Some(seen) if now.saturating_duration_since(*seen) <= Self::idle(key.proto) => {
                *seen = now;
                Verdict::Pass
            }
            _ => Verdict::Drop(DropReason::NoFlow),
        }
    }

    /// Forgets idle flows.
    pub fn expire(&mut self, now: Instant) {
        self.flows
            .retain(|k, seen| now.saturating_duration_since(*seen) <= Self::idle(k.proto));
    }
}

/// Builders for test packets (also used by the fuzz target and the benchmarks).
pub mod packet {
    use std::net::Ipv4Addr;

    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for chunk in data.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 header (no options) around `l4`.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // don't fragment
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
        ipv4(src, dst, 6, &l4)
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(payload);
        ipv4(src, dst, 17, &l4)
    }

    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0] = if request { 8 } else { 0 };
        l4[4..6].copy_from_slice(&id.to_be_bytes());
        ipv4(src, dst, 1, &l4)
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use proptest::prelude::*;

    const TECH: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const PLC: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
    const OTHER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 11);

    fn plc_filter() -> Filter {
        let mut f = Filter::new();
        f.allow(
            PLC.into(),
            [Port::tcp(102), Port::udp(161)].into_iter().collect(),
            None,
        );
        f
    }

    #[test]
    fn default_deny() {
        let mut f = Filter::new();
        let now = Instant::now();
        assert_eq!(
            f.forward(&tcp(TECH, 40000, PLC, 102), now),
            Verdict::Drop(DropReason::NotConnected)
        );
        assert_eq!(
            f.reverse(&tcp(PLC, 102, TECH, 40000), now),
            Verdict::Drop(DropReason::NoFlow)
        );
    }

    #[test]
    fn allowed_ports_and_replies_on_opened_flows_only() {
        let mut f = plc_filter();
        let now = Instant::now();
        assert_eq!(f.forward(&tcp(TECH, 40000, PLC, 102), now), Verdict::Pass);
        assert_eq!(f.reverse(&tcp(PLC, 102, TECH, 40000), now), Verdict::Pass);
        // Another port of the same device, from the device, or another device: dropped.
        assert_eq!(
            f.forward(&tcp(TECH, 40000, PLC, 22), now),
            Verdict::Drop(DropReason::PortNotAllowed)
        );
        assert_eq!(
            f.forward(&udp(TECH, 40000, PLC, 102, b""), now),
            Verdict::Drop(DropReason::PortNotAllowed)
        );
        assert_eq!(
            f.reverse(&tcp(PLC, 102, TECH, 40001), now),
            Verdict::Drop(DropReason::NoFlow)
        );
        assert_eq!(
            f.reverse(&tcp(PLC, 22, TECH, 40000), now),
            Verdict::Drop(DropReason::NoFlow)
        );
        assert_eq!(
            f.forward(&tcp(TECH, 40000, OTHER, 102), now),
            Verdict::Drop(DropReason::NotConnected)
        );
        // UDP and ICMP echo.
        assert_eq!(
            f.forward(&udp(TECH, 5000, PLC, 161, b"get"), now),
            Verdict::Pass
        );
        assert_eq!(
            f.reverse(&udp(PLC, 161, TECH, 5000, b"resp"), now),
            Verdict::Pass
        );
        assert_eq!(f.forward(&echo(TECH, PLC, true, 7), now), Verdict::Pass);
        assert_eq!(f.reverse(&echo(PLC, TECH, false, 7), now), Verdict::Pass);
        assert_eq!(
            f.reverse(&echo(PLC, TECH, false, 8), now),
            Verdict::Drop(DropReason::NoFlow)
        );
        assert_eq!(
            f.reverse(&echo(PLC, TECH, true, 7), now),
            Verdict::Drop(DropReason::NoFlow),
            "a device may not ping the technician"
        );
        let (drops, passed) = f.counters();
        assert_eq!(passed, 6);
        assert_eq!(drops[&DropReason::NoFlow], 4);
    }

    #[test]
    fn flows_expire_and_revoke_cuts_them() {
        let mut f = plc_filter();
        let t0 = Instant::now();
        assert_eq!(
            f.forward(&udp(TECH, 5000, PLC, 161, b""), t0),
            Verdict::Pass
        );
        assert_eq!(
            f.reverse(
                &udp(PLC, 161, TECH, 5000, b""),
                t0 + UDP_IDLE + Duration::from_secs(1)
            ),
            Verdict::Drop(DropReason::NoFlow)
        );
        assert_eq!(f.forward(&tcp(TECH, 40000, PLC, 102), t0), Verdict::Pass);
        f.revoke(PLC.into());
        assert_eq!(
            f.reverse(&tcp(PLC, 102, TECH, 40000), t0),
            Verdict::Drop(DropReason::NoFlow)
        );
        assert_eq!(
            f.forward(&tcp(TECH, 40000, PLC, 102), t0),
            Verdict::Drop(DropReason::NotConnected)
        );
    }

    #[test]
    fn site_rule_checks_the_source() {
        let mut f = Filter::new();
        f.allow(
            PLC.into(),
            [Port::tcp(102)].into_iter().collect(),
            Some(TECH.into()),
        );
        let now = Instant::now();
        assert_eq!(f.forward(&tcp(TECH, 1, PLC, 102), now), Verdict::Pass);
        assert_eq!(
            f.forward(&tcp(Ipv4Addr::new(100, 64, 0, 3), 1, PLC, 102), now),
            Verdict::Drop(DropReason::WrongSource)
        );
    }

    #[test]
    fn fragments_options_extensions_and_garbage_are_dropped() {
        let mut f = plc_filter();
        let now = Instant::now();
        let mut frag = tcp(TECH, 40000, PLC, 102);
        frag[6] = 0x20; // MF
        assert_eq!(f.forward(&frag, now), Verdict::Drop(DropReason::Fragment));
        frag[6] = 0x00;
        frag[7] = 0x10; // offset
        assert_eq!(f.forward(&frag, now), Verdict::Drop(DropReason::Fragment));
        let mut opts = tcp(TECH, 40000, PLC, 102);
        opts[0] = 0x46;
        assert_eq!(f.forward(&opts, now), Verdict::Drop(DropReason::IpOptions));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&8u16.to_be_bytes());
        v6[6] = 0; // hop-by-hop options
        assert_eq!(
            f.forward(&v6, now),
            Verdict::Drop(DropReason::Ipv6Extension)
        );
        assert_eq!(f.forward(&[], now), Verdict::Drop(DropReason::Malformed));
        assert_eq!(
            f.forward(&[0x45; 10], now),
            Verdict::Drop(DropReason::Malformed)
        );
        let mut short = tcp(TECH, 40000, PLC, 102);
        short.truncate(30);
        assert_eq!(f.forward(&short, now), Verdict::Drop(DropReason::Malformed));
        let gre = ipv4(TECH, PLC, 47, &[0; 8]);
        assert_eq!(f.forward(&gre, now), Verdict::Drop(DropReason::Protocol));
    }

    #[test]
    fn the_flow_table_is_bounded() {
        let mut f = plc_filter();
        let now = Instant::now();
        for port in 0..MAX_FLOWS as u32 {
            let sport = 1 + (port % 60000) as u16;
            let src = Ipv4Addr::from(u32::from(TECH) + port / 60000);
            assert_eq!(
                f.forward(&udp(src, sport, PLC, 161, b""), now),
                Verdict::Pass
            );
        }
        assert_eq!(
            f.forward(&udp(Ipv4Addr::new(100, 65, 0, 1), 9, PLC, 161, b""), now),
            Verdict::Drop(DropReason::FlowTableFull)
        );
        // Once the old flows are idle, new ones fit again.
        assert_eq!(
            f.forward(
                &udp(Ipv4Addr::new(100, 65, 0, 1), 9, PLC, 161, b""),
                now + UDP_IDLE * 2
            ),
            Verdict::Pass
        );
    }

    /// The reference model: a list of allowed (device, proto, port) and a list of opened flows,
    /// no timeouts (the property test stays within them).
    #[derive(Default)]
    struct Model {
        allowed: Vec<(Ipv4Addr, u8, u16)>,
        opened: Vec<(u8, Ipv4Addr, u16, Ipv4Addr, u16)>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Forward {
            proto: u8,
            src_port: u16,
            dst: u8,
            dst_port: u16,
        },
        Reverse {
            proto: u8,
            src: u8,
            src_port: u16,
            dst_port: u16,
        },
    }

    fn ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 0, 10 + i)
    }

    fn pkt(proto: u8, src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, reply: bool) -> Vec<u8> {
        match proto {
            6 => tcp(src, sp, dst, dp),
            17 => udp(src, sp, dst, dp, b"x"),
            _ => echo(src, dst, !reply, if reply { dp } else { sp }),
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        let proto = prop_oneof![Just(6u8), Just(17u8), Just(1u8)];
        let port = 100u16..104;
        prop_oneof![
            (proto.clone(), port.clone(), 0u8..3, port.clone()).prop_map(
                |(proto, src_port, dst, dst_port)| Op::Forward {
                    proto,
                    src_port,
                    dst,
                    dst_port
                }
            ),
            (proto, 0u8..3, port.clone(), port).prop_map(|(proto, src, src_port, dst_port)| {
                Op::Reverse {
                    proto,
                    src,
                    src_port,
                    dst_port,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut f = Filter::new();
            let mut m = Model::default();
            // Device 0: tcp/101 and udp/102; device 1: tcp/103; device 2: not connected.
            f.allow(ip(0).into(), [Port::tcp(101), Port::udp(102)].into_iter().collect(), None);
            f.allow(ip(1).into(), [Port::tcp(103)].into_iter().collect(), None);
            m.allowed = vec![(ip(0), 6, 101), (ip(0), 17, 102), (ip(1), 6, 103)];
            let connected = |d: Ipv4Addr| d == ip(0) || d == ip(1);
            let now = Instant::now();
            for o in ops {
                match o {
                    Op::Forward { proto, src_port, dst, dst_port } => {
                        let d = ip(dst);
                        let expect = if proto == 1 {
                            connected(d)
                        } else {
                            m.allowed.contains(&(d, proto, dst_port))
                        };
                        let got = f.forward(&pkt(proto, TECH, src_port, d, dst_port, false), now) == Verdict::Pass;
                        prop_assert_eq!(got, expect, "forward {:?}", o);
                        if expect {
                            let key = if proto == 1 { (1, TECH, src_port, d, 0) } else { (proto, TECH, src_port, d, dst_port) };
                            m.opened.push(key);
                        }
                    }
                    Op::Reverse { proto, src, src_port, dst_port } => {
                        let s = ip(src);
                        let key = if proto == 1 { (1, TECH, dst_port, s, 0) } else { (proto, TECH, dst_port, s, src_port) };
                        let expect = m.opened.contains(&key);
                        let got = f.reverse(&pkt(proto, s, src_port, TECH, dst_port, true), now) == Verdict::Pass;
                        prop_assert_eq!(got, expect, "reverse {:?}", o);
                    }
                }
            }
        }

        #[test]
        fn garbage_never_passes_an_empty_filter(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut f = Filter::new();
            let now = Instant::now();
            prop_assert!(matches!(f.forward(&bytes, now), Verdict::Drop(_)));
            prop_assert!(matches!(f.reverse(&bytes, now), Verdict::Drop(_)));
        }
    }
}
