//! One parse per packet: the IP and transport facts every check of the engine reads, taken from
//! `etherparse` slices (no copy), and the packets the engine writes itself (TCP RST, ICMP
//! administratively-prohibited, fragments).
//!
//! What is refused here, with its [`DropReason`]: malformed headers, IPv4 options, IPv4
//! authentication headers and IPv6 extension headers (a filter that cannot see the ports must
//! not guess). IPv4 fragments are not refused: they are reported as [`Parsed::Fragment`] for
//! the reassembly in [`crate::defrag`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Slice, Icmpv6Slice, Ipv4HeaderSlice, Ipv6Slice, TcpSlice, UdpSlice};

use crate::filter::DropReason;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
const PROTO_AH: u8 = 51;

/// TCP flags the flow table reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// The transport part of a packet, as far as the filter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: TcpFlags,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// ICMP or ICMPv6 echo request (`request`) or reply.
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMP error (destination unreachable, fragmentation needed / packet too big, time
    /// exceeded, parameter problem) and the packet it quotes.
    Error(Quoted),
    /// Any other ICMP message.
    OtherIcmp,
    /// Any other IP protocol.
    Other(u8),
}

/// The packet an ICMP error quotes: its addresses, protocol and ports (for ICMP echo, the
/// echo id as the source port of a request or the destination port of a reply, 0 for the
/// other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A whole (unfragmented) packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
}

impl Summary {
    /// The IP protocol number of the transport (ICMPv6 for IPv6 echo and errors).
    pub fn proto(&self) -> u8 {
        let icmp = if self.src.is_ipv4() {
            PROTO_ICMP
        } else {
            PROTO_ICMPV6
        };
        match self.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Echo { .. } | L4::Error(_) | L4::OtherIcmp => icmp,
            L4::Other(p) => p,
        }
    }
}

/// An IPv4 fragment: enough to file it for reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub id: u16,
    /// Offset of this fragment's payload in the datagram, in bytes.
    pub offset: usize,
    pub more: bool,
}

/// What one parse of a packet found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Whole(Summary),
    Fragment(Fragment),
}

impl Parsed {
    pub fn dst(&self) -> IpAddr {
        match self {
            Parsed::Whole(s) => s.dst,
            Parsed::Fragment(f) => f.dst.into(),
        }
    }

    pub fn src(&self) -> IpAddr {
        match self {
            Parsed::Whole(s) => s.src,
            Parsed::Fragment(f) => f.src.into(),
        }
    }
}

/// Parses an IP packet, refusing what the filter must not pass.
pub fn parse(packet: &[u8]) -> Result<Parsed, DropReason> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => parse_v4(packet),
        Some(6) => parse_v6(packet).map(Parsed::Whole),
        _ => Err(DropReason::Malformed),
    }
}

fn parse_v4(p: &[u8]) -> Result<Parsed, DropReason> {
    let h = Ipv4HeaderSlice::from_slice(p).map_err(|_| DropReason::Malformed)?;
    if h.ihl() != 5 {
        return Err(DropReason::IpOptions);
    }
    let total = usize::from(h.total_len());
    if total < 20 || total > p.len() {
        return Err(DropReason::Malformed);
    }
    let proto = h.protocol().0;
    if proto == PROTO_AH {
        return Err(DropReason::IpOptions);
    }
    let (src, dst) = (h.source_addr(), h.destination_addr());
    if h.is_fragmenting_payload() {
        return Ok(Parsed::Fragment(Fragment {
            src,
            dst,
            proto,
            id: h.identification(),
            offset: usize::from(h.fragments_offset().byte_offset()),
            more: h.more_fragments(),
        }));
    }
    let l4 = parse_l4(proto, &p[20..total], false)?;
    Ok(Parsed::Whole(Summary {
        src: src.into(),
        dst: dst.into(),
        l4,
    }))
}

fn parse_v6(p: &[u8]) -> Result<Summary, DropReason> {
    let s = Ipv6Slice::from_slice(p).map_err(|_| DropReason::Malformed)?;
    let h = s.header();
    if h.next_header().0 != s.payload().ip_number.0 || s.payload().fragmented {
        return Err(DropReason::Ipv6Extension);
    }
    let next = h.next_header().0;
    if !matches!(next, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) {
        return Err(DropReason::Ipv6Extension);
    }
    let l4 = parse_l4(next, s.payload().payload, true)?;
    Ok(Summary {
        src: IpAddr::V6(h.source_addr()),
        dst: IpAddr::V6(h.destination_addr()),
        l4,
    })
}

fn parse_l4(proto: u8, l4: &[u8], v6: bool) -> Result<L4, DropReason> {
    match proto {
        PROTO_TCP => {
            let t = TcpSlice::from_slice(l4).map_err(|_| DropReason::Malformed)?;
            Ok(L4::Tcp {
                src_port: t.source_port(),
                dst_port: t.destination_port(),
                flags: TcpFlags {
                    syn: t.syn(),
                    ack: t.ack(),
                    fin: t.fin(),
                    rst: t.rst(),
                },
            })
        }
        PROTO_UDP => {
            let u = UdpSlice::from_slice(l4).map_err(|_| DropReason::Malformed)?;
            Ok(L4::Udp {
                src_port: u.source_port(),
                dst_port: u.destination_port(),
            })
        }
        PROTO_ICMP if !v6 => {
            let i = Icmpv4Slice::from_slice(l4).map_err(|_| DropReason::Malformed)?;
            Ok(icmp(
                i.type_u8(),
                i.code_u8(),
                i.bytes5to8(),
                i.payload(),
                false,
            ))
        }
        PROTO_ICMPV6 if v6 => {
            let i = Icmpv6Slice::from_slice(l4).map_err(|_| DropReason::Malformed)?;
            let b = i.slice();
            // Every ICMPv6 message has at least the 8 bytes the slice checked.
            let rest = [b[4], b[5], b[6], b[7]];
            Ok(icmp(i.type_u8(), i.code_u8(), rest, &b[8..], true))
        }
        p => Ok(L4::Other(p)),
    }
}

/// The ICMP message types the engine knows: echo, and the errors that quote a packet.
fn icmp(kind: u8, code: u8, rest: [u8; 4], payload: &[u8], v6: bool) -> L4 {
    let id = u16::from_be_bytes([rest[0], rest[1]]);
    let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
    let error = if v6 {
        matches!(kind, 1..=4)
    } else {
        matches!(kind, 3 | 11 | 12)
    };
    match kind {
        k if k == request && code == 0 => L4::Echo { request: true, id },
        k if k == reply && code == 0 => L4::Echo { request: false, id },
        _ if error => match quoted(payload, v6) {
            Some(q) => L4::Error(q),
            None => L4::OtherIcmp,
        },
        _ => L4::OtherIcmp,
    }
}

/// The quoted packet of an ICMP error: an IP header (no options, not a later fragment) and at
/// least the first 8 bytes of its transport header (RFC 792, RFC 4443).
fn quoted(q: &[u8], v6: bool) -> Option<Quoted> {
    let (src, dst, proto, l4) = if v6 {
        if q.len() < 48 || q[0] >> 4 != 6 {
            return None;
        }
        let a = |at: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&q[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(b))
        };
        (a(8), a(24), q[6], &q[40..])
    } else {
        let h = Ipv4HeaderSlice::from_slice(q).ok()?;
        if h.ihl() != 5 || h.fragments_offset().value() != 0 || q.len() < 28 {
            return None;
        }
        (
            h.source_addr().into(),
            h.destination_addr().into(),
            h.protocol().0,
            &q[20..],
        )
    };
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    let icmp = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    let (src_port, dst_port) = match proto {
        PROTO_TCP | PROTO_UDP => (port(0), port(2)),
        p if p == icmp => {
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            match l4[0] {
                t if t == request => (port(4), 0),
                t if t == reply => (0, port(4)),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(Quoted {
        src,
        dst,
        proto,
        src_port,
        dst_port,
    })
}

/// Whether an IPv4 packet has Don't Fragment set (IPv6 packets are never fragmented on the way).
pub fn dont_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(6).is_some_and(|b| b & 0x40 != 0),
        _ => true,
    }
}

/// The Internet checksum (RFC 1071) of `data`, continuing from `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Completes a partial L4 checksum (`NEEDS_CSUM`, see [`crate::gso`]): the field at
/// `start + offset` holds the pseudo-header sum; the one's complement sum of everything from
/// `start` on (RFC 1071) replaces it. The caller has checked that the field lies in `packet`.
pub(crate) fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) {
    let at = start + offset;
    let initial = u32::from(u16::from_be_bytes([packet[at], packet[at + 1]]));
    packet[at] = 0;
    packet[at + 1] = 0;
    let mut c = fold(sum16(initial, &packet[start..]));
    if c == 0 && offset == 6 {
        // UDP (checksum at offset 6): a computed zero is sent as all ones; zero means "no
        // checksum" (RFC 768) and IPv6 receivers drop it (RFC 8200, 8.1).
        c = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Writes the IPv4 header checksum of `header` (20 bytes).
fn ipv4_checksum(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let c = fold(sum16(0, &header[..20]));
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The pseudo-header sum of a transport checksum.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum = sum16(sum, &s.octets());
            sum = sum16(sum, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            sum = sum16(sum, &v6(s));
            sum = sum16(sum, &v6(d));
        }
    }
    sum + u32::from(proto) + (len as u32 & 0xffff) + (len as u32 >> 16)
}

/// Puts an IP header (v4 without options, or v6) from `src` to `dst` around `l4` into `out`,
/// with the transport checksum at `checksum_at` in `l4` (ICMPv4 has no pseudo-header).
fn wrap(
    out: &mut Vec<u8>,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &[u8],
    checksum_at: Option<usize>,
) {
    out.clear();
    let start = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + l4.len();
            out.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0]);
            out.extend_from_slice(&[64, proto, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            ipv4_checksum(&mut out[..20]);
            20
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            let len = l4.len();
            out.extend_from_slice(&[0x60, 0, 0, 0, (len >> 8) as u8, len as u8, proto, 64]);
            out.extend_from_slice(&v6(s));
            out.extend_from_slice(&v6(d));
            40
        }
    };
    out.extend_from_slice(l4);
    let Some(checksum_at) = checksum_at else {
        return;
    };
    out[start + checksum_at..start + checksum_at + 2].copy_from_slice(&[0, 0]);
    let base = if proto == PROTO_ICMP {
        0
    } else {
        pseudo(src, dst, proto, l4.len())
    };
    let sum = fold(sum16(base, &out[start..]));
    // A UDP checksum of 0 means "none"; the ones' complement form of 0 is 0xffff.
    let sum = if sum == 0 && proto == PROTO_UDP {
        0xffff
    } else {
        sum
    };
    out[start + checksum_at..start + checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The TCP RST that refuses `packet` (a TCP segment from the technician), from its destination,
/// as RFC 9293 3.10.7.1 has a closed port answer. `None` for a RST (never answered).
pub fn tcp_reset(packet: &[u8], s: &Summary, out: &mut Vec<u8>) -> bool {
    let L4::Tcp {
        src_port,
        dst_port,
        flags,
    } = s.l4
    else {
        return false;
    };
    if flags.rst {
        return false;
    }
    let header = if packet[0] >> 4 == 4 { 20 } else { 40 };
    let Ok(t) = TcpSlice::from_slice(&packet[header..]) else {
        return false;
    };
    let mut l4 = [0u8; 20];
    l4[0..2].copy_from_slice(&dst_port.to_be_bytes());
    l4[2..4].copy_from_slice(&src_port.to_be_bytes());
    l4[12] = 5 << 4;
    if flags.ack {
        l4[4..8].copy_from_slice(&t.acknowledgment_number().to_be_bytes());
        l4[13] = 0x04; // RST
    } else {
        let len = t.payload().len() as u32 + u32::from(flags.syn) + u32::from(flags.fin);
        let ack = t.sequence_number().wrapping_add(len);
        l4[8..12].copy_from_slice(&ack.to_be_bytes());
        l4[13] = 0x14; // RST, ACK
    }
    wrap(out, s.dst, s.src, PROTO_TCP, &l4, Some(16));
    true
}

/// The ICMP "administratively prohibited" error (ICMPv4 3/13, ICMPv6 1/1) that refuses
/// `packet`, from its destination, quoting as much of it as RFC 1812 / RFC 4443 allow.
pub fn admin_prohibited(packet: &[u8], s: &Summary, out: &mut Vec<u8>) {
    let (kind, code, quote, proto) = if s.src.is_ipv4() {
        (3, 13, 548, PROTO_ICMP)
    } else {
        (1, 1, 1232, PROTO_ICMPV6)
    };
    let quoted = &packet[..packet.len().min(quote)];
    let mut l4 = Vec::with_capacity(8 + quoted.len());
    l4.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
    l4.extend_from_slice(quoted);
    wrap(out, s.dst, s.src, proto, &l4, Some(2));
}

/// Splits an IPv4 packet (no options) into fragments of at most `mtu` bytes, each written by
/// `emit`. The payload of every fragment but the last is a multiple of 8 bytes (RFC 791).
pub fn fragment(packet: &[u8], mtu: usize, emit: &mut dyn FnMut(&[u8])) {
    let Ok(h) = Ipv4HeaderSlice::from_slice(packet) else {
        return;
    };
    let hl = usize::from(h.ihl()) * 4;
    let total = usize::from(h.total_len()).min(packet.len());
    let base = usize::from(h.fragments_offset().byte_offset());
    let last_more = h.more_fragments();
    let step = (mtu.saturating_sub(hl)) & !7;
    if step == 0 || total <= hl {
        return;
    }
    let payload = &packet[hl..total];
    let mut buf = Vec::with_capacity(mtu);
    let mut at = 0;
    while at < payload.len() {
        let end = (at + step).min(payload.len());
        let more = end < payload.len() || last_more;
        buf.clear();
        buf.extend_from_slice(&packet[..hl]);
        let len = hl + end - at;
        buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let off = ((base + at) / 8) as u16 | if more { 0x2000 } else { 0 };
        buf[6..8].copy_from_slice(&off.to_be_bytes());
        ipv4_checksum(&mut buf[..20]);
        buf.extend_from_slice(&payload[at..end]);
        emit(&buf);
        at = end;
    }
}

/// Reassembles the IPv4 header of a whole datagram: `first` is the header of the fragment at
/// offset 0; the result has no fragment flags and the datagram's length.
pub(crate) fn whole_header(first: &[u8; 20], payload_len: usize) -> [u8; 20] {
    let mut h = *first;
    let total = 20 + payload_len;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[6] = 0;
    h[7] = 0;
    ipv4_checksum(&mut h);
    h
}

/// Builders for test packets (also used by the fuzz target and the benchmarks).
pub mod build {
    use std::net::Ipv4Addr;

    use super::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, TcpFlags, wrap};

    /// An IPv4 packet (no options, Don't Fragment) around `l4`, checksums filled in.
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let at = match proto {
            PROTO_TCP => Some(16),
            PROTO_UDP => Some(6),
            PROTO_ICMP => Some(2),
            _ => None,
        };
        wrap(&mut out, src.into(), dst.into(), proto, l4, at);
        out
    }

    pub fn tcp_flags(
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        flags: TcpFlags,
    ) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
        l4[12] = 5 << 4;
        l4[13] = u8::from(flags.fin)
            | u8::from(flags.syn) << 1
            | u8::from(flags.rst) << 2
            | u8::from(flags.ack) << 4;
        l4[14] = 0xff;
        ipv4(src, dst, PROTO_TCP, &l4)
    }

    /// A TCP SYN.
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let syn = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        tcp_flags(src, sport, dst, dport, syn)
    }

    /// A TCP segment of an established connection (ACK).
    pub fn tcp_ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let ack = TcpFlags {
            ack: true,
            ..TcpFlags::default()
        };
        tcp_flags(src, sport, dst, dport, ack)
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(payload);
        ipv4(src, dst, PROTO_UDP, &l4)
    }

    pub fn echo(src: Ipv4Addr, dst: Ipv4Addr, request: bool, id: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0] = if request { 8 } else { 0 };
        l4[4..6].copy_from_slice(&id.to_be_bytes());
        ipv4(src, dst, PROTO_ICMP, &l4)
    }

    /// An ICMP error `kind`/`code` from `src` to `dst` quoting the first 28 bytes of `about`.
    pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, about: &[u8]) -> Vec<u8> {
        let mut l4 = vec![kind, code, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&about[..about.len().min(28)]);
        ipv4(src, dst, PROTO_ICMP, &l4)
    }

    /// The packet with Don't Fragment cleared (so that it may be fragmented).
    pub fn may_fragment(mut packet: Vec<u8>) -> Vec<u8> {
        packet[6] &= !0x40;
        super::ipv4_checksum(&mut packet[..20]);
        packet
    }

    /// The fragments of `packet` at `mtu`.
    pub fn fragments(packet: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        super::fragment(packet, mtu, &mut |f| out.push(f.to_vec()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);

    fn whole(p: &[u8]) -> Summary {
        match parse(p) {
            Ok(Parsed::Whole(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn built_packets_parse_and_their_checksums_hold() {
        let p = udp(A, 5000, B, 161, b"get");
        let s = whole(&p);
        assert_eq!(
            s.l4,
            L4::Udp {
                src_port: 5000,
                dst_port: 161
            }
        );
        assert_eq!(fold(sum16(0, &p[..20])), 0, "IPv4 header checksum");
        let t = tcp(A, 40000, B, 102);
        assert_eq!(fold(sum16(pseudo(A.into(), B.into(), 6, 20), &t[20..])), 0);
        assert!(matches!(whole(&t).l4, L4::Tcp { flags, .. } if flags.syn && !flags.ack));
    }

    #[test]
    fn icmp_errors_expose_the_quoted_flow() {
        let req = udp(A, 5000, B, 2222, b"x");
        let err = icmp_error(B, A, 3, 3, &req);
        assert_eq!(
            whole(&err).l4,
            L4::Error(Quoted {
                src: A.into(),
                dst: B.into(),
                proto: PROTO_UDP,
                src_port: 5000,
                dst_port: 2222,
            })
        );
        // A quote too short for the ports is not an error the filter can relate.
        let short = icmp_error(B, A, 3, 3, &req[..24]);
        assert_eq!(whole(&short).l4, L4::OtherIcmp);
        // Redirects and timestamps are not errors.
        assert_eq!(whole(&icmp_error(B, A, 5, 0, &req)).l4, L4::OtherIcmp);
    }

    #[test]
    fn answers_are_well_formed_and_quote_the_refused_packet() {
        let syn = tcp(A, 40000, B, 22);
        let s = whole(&syn);
        let mut out = Vec::new();
        assert!(tcp_reset(&syn, &s, &mut out));
        let r = whole(&out);
        assert_eq!((r.src, r.dst), (B.into(), A.into()));
        assert!(
            matches!(r.l4, L4::Tcp { src_port: 22, dst_port: 40000, flags } if flags.rst && flags.ack)
        );
        assert_eq!(
            fold(sum16(pseudo(B.into(), A.into(), 6, 20), &out[20..])),
            0
        );
        let u = udp(A, 5000, B, 5001, b"x");
        admin_prohibited(&u, &whole(&u), &mut out);
        match whole(&out).l4 {
            L4::Error(q) => assert_eq!((q.src_port, q.dst_port), (5000, 5001)),
            other => panic!("{other:?}"),
        }
        assert_eq!(fold(sum16(0, &out[20..])), 0, "ICMP checksum");
    }

    #[test]
    fn fragments_cover_the_datagram_on_8_byte_boundaries() {
        let big = may_fragment(udp(A, 5000, B, 161, &[7u8; 3000]));
        let frags = fragments(&big, 1420);
        assert_eq!(frags.len(), 3);
        let mut covered = 0;
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1420);
            match parse(f) {
                Ok(Parsed::Fragment(x)) => {
                    assert_eq!(x.offset, covered);
                    assert_eq!(x.more, i + 1 < frags.len());
                    covered += f.len() - 20;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(covered, big.len() - 20);
    }
}
