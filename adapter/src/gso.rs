//! TUN offload metadata: the virtio-net header of a GSO super-packet, how it travels to the
//! other end, and the checks it must pass before a TUN takes it.
//!
//! With offload on (`IFF_VNET_HDR`, `TUNSETOFFLOAD` with `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`
//! and, where the kernel has it, `TUN_F_USO4 | TUN_F_USO6`), every read from a TUN starts with
//! a `struct virtio_net_hdr` (Linux `include/uapi/linux/virtio_net.h`, host byte order) and the
//! packet may be a *super-packet* of up to 64 KiB: one IP + TCP (or UDP) header and the payload
//! of many segments, which the kernel cuts into `gso_size`-byte segments when it writes it to a
//! network. Carrying it whole through WireGuard and the TLS links (which have no path MTU) is a
//! fraction of the per-packet work of carrying its segments one by one.
//!
//! # On the wire
//!
//! The metadata travels *inside* the WireGuard message, after the IP packet, so it is encrypted
//! and authenticated end to end (the gateway can neither read nor alter it) and the relay needs
//! no change. boringtun returns the inner packet cut to its IP total length; the trailer is the
//! rest of the decrypted plaintext. A plaintext with nothing after the IP packet is a packet
//! without metadata (what every WireGuard implementation sends); with exactly [`TRAILER`]
//! bytes, it is this trailer; anything else is dropped (`bad-offload`).
//!
//! A trailer is sent only into a tunnel whose peer and relay agreed to take it, and accepted
//! only on a tunnel where this end announced it
//! ([`crate::engine::TunnelOffload`]; the announcement is in the session messages, see
//! `pinhole_proto::message`); elsewhere super-packets are cut into their segments before
//! encryption, and a trailer that arrives is dropped (`bad-offload`).
//!
//! ```text
//! offset  size  field
//! 0       1     magic        0xB1 (version 1 of this trailer)
//! 1       1     flags        0 or 1 = NEEDS_CSUM (the L4 checksum holds the pseudo-header sum)
//! 2       1     gso_type     0 none, 1 TCPv4, 4 TCPv6, 5 UDP (L4), | 0x80 ECN (TCP only)
//! 3       1     reserved     0
//! 4       2     hdr_len      IP + L4 header length (0 without GSO), big-endian
//! 6       2     gso_size     payload bytes per segment (0 without GSO), big-endian
//! 8       2     csum_start   where the L4 checksum starts: the IP header length, big-endian
//! 10      2     csum_offset  the checksum's offset from csum_start: 16 TCP, 6 UDP, big-endian
//! ```
//!
//! # The checks ([`Offload::validate`])
//!
//! The metadata that arrives from the network is attacker input: it is checked against the
//! packet (already parsed by [`crate::packet`]: no IPv4 options, no IPv6 extension headers) and
//! the packet dropped if anything disagrees: flags and type known; the GSO type matches the IP
//! version and the L4 protocol; `csum_start` is the IP header length and `csum_offset` the L4
//! protocol's checksum field; `hdr_len` the real IP + L4 header length; `gso_size` non-zero,
//! each segment within the receiving TUN's MTU, at most [`MAX_SEGMENTS`] segments; no SYN or
//! RST on a TCP super-packet; the packet at most 65 535 bytes and exactly its IP total length.
//! The sender's `gso_size` is kept (the device's MSS), never enlarged.

use crate::filter::DropReason;
use crate::packet::{PROTO_TCP, PROTO_UDP};

/// Bytes of the trailer that carries [`Offload`] after the IP packet inside a WireGuard message.
pub const TRAILER: usize = 12;

/// The trailer's first byte (and version).
const MAGIC: u8 = 0xB1;

/// Bytes of the `struct virtio_net_hdr` that starts every read from and write to an offload TUN.
pub const VNET_HDR: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum field holds the pseudo-header sum; the
/// checksum over `csum_start..` is still to be computed.
pub const NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the kernel checked the checksum (read side only; cleared).
const DATA_VALID: u8 = 2;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// The most segments one super-packet may become: 64 KiB in 32-byte segments. Linux's TCP
/// never uses an MSS below 48 bytes, so no real super-packet comes near; it bounds what one
/// datagram can make the receiving kernel send.
pub const MAX_SEGMENTS: usize = 2048;

/// The largest packet an offload TUN reads or takes (an IPv4 total length's limit; IPv6
/// super-packets are kept to it as well).
pub const MAX_PACKET: usize = 65_535;

/// The offload metadata of one packet (`struct virtio_net_hdr` without `num_buffers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offload {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// What the TUN the engine writes to can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunOffload {
    /// `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`: partial checksums and TCP super-packets.
    pub tcp: bool,
    /// `TUN_F_USO4 | TUN_F_USO6`: UDP super-packets.
    pub udp: bool,
}

impl Offload {
    /// No metadata: a whole packet with its checksums complete.
    pub const NONE: Offload = Offload {
        flags: 0,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// A super-packet to be cut into segments (as opposed to one packet, maybe with a partial
    /// checksum).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// From the `virtio_net_hdr` a TUN read starts with (host byte order).
    pub fn from_vnet(h: &[u8; VNET_HDR]) -> Self {
        let u = |at: usize| u16::from_ne_bytes([h[at], h[at + 1]]);
        Self {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// The `virtio_net_hdr` to write before the packet (host byte order).
    pub fn to_vnet(&self) -> [u8; VNET_HDR] {
        let mut h = [0u8; VNET_HDR];
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        h[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        h[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        h[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        h
    }

    /// The trailer (see the module documentation).
    pub fn to_trailer(&self) -> [u8; TRAILER] {
        let mut t = [0u8; TRAILER];
        t[0] = MAGIC;
        t[1] = self.flags;
        t[2] = self.gso_type;
        t[4..6].copy_from_slice(&self.hdr_len.to_be_bytes());
        t[6..8].copy_from_slice(&self.gso_size.to_be_bytes());
        t[8..10].copy_from_slice(&self.csum_start.to_be_bytes());
        t[10..12].copy_from_slice(&self.csum_offset.to_be_bytes());
        t
    }

    /// The metadata in what follows the IP packet in a decrypted WireGuard message: nothing is
    /// [`Offload::NONE`]; a trailer of the wrong size, magic or reserved byte is refused.
    pub fn from_trailer(rest: &[u8]) -> Result<Self, DropReason> {
        if rest.is_empty() {
            return Ok(Self::NONE);
        }
        let t: &[u8; TRAILER] = rest.try_into().map_err(|_| DropReason::BadOffload)?;
        if t[0] != MAGIC || t[3] != 0 {
            return Err(DropReason::BadOffload);
        }
        let u = |at: usize| u16::from_be_bytes([t[at], t[at + 1]]);
        Ok(Self {
            flags: t[1],
            gso_type: t[2],
            hdr_len: u(4),
            gso_size: u(6),
            csum_start: u(8),
            csum_offset: u(10),
        })
    }

    /// The metadata of a packet read from a local TUN, put in the form [`Offload::validate`]
    /// wants: the kernel's `hdr_len` is a hint (on the forward path it is the whole linear
    /// part of the first packet), so it is recomputed from the headers; `DATA_VALID` is
    /// dropped; without GSO, `hdr_len` and `gso_size` are 0. The packet's own headers are
    /// trusted as far as the parse in [`crate::packet`] checked them.
    pub fn normalize(mut self, packet: &[u8]) -> Self {
        self.flags &= !DATA_VALID;
        if self.is_gso() {
            if let Some((ip, l4)) = headers(packet) {
                self.hdr_len = (ip + l4) as u16;
            }
        } else {
            self.hdr_len = 0;
            self.gso_size = 0;
        }
        if self.flags & NEEDS_CSUM == 0 {
            self.csum_start = 0;
            self.csum_offset = 0;
        }
        self
    }

    /// Checks the metadata against `packet` (an IPv4 or IPv6 packet that [`crate::packet::parse`]
    /// took as whole) for a TUN of `mtu`: see the module documentation. `Ok` for
    /// [`Offload::NONE`].
    pub fn validate(&self, packet: &[u8], mtu: usize) -> Result<(), DropReason> {
        if self.is_none() {
            return Ok(());
        }
        let bad = Err(DropReason::BadOffload);
        if self.flags & !NEEDS_CSUM != 0 {
            return bad;
        }
        if packet.len() > MAX_PACKET || ip_total(packet) != Some(packet.len()) {
            return bad;
        }
        let v6 = packet[0] >> 4 == 6;
        let (ip_len, proto) = if v6 { (40, packet[6]) } else { (20, packet[9]) };
        let base = self.gso_type & !GSO_ECN;
        let ecn = self.gso_type & GSO_ECN != 0;
        let want_proto = match base {
            GSO_NONE if !ecn => None,
            GSO_TCPV4 if !v6 => Some(PROTO_TCP),
            GSO_TCPV6 if v6 => Some(PROTO_TCP),
            GSO_UDP_L4 if !ecn => Some(PROTO_UDP),
            _ => return bad,
        };
        if want_proto.is_some_and(|p| p != proto) {
            return bad;
        }
        // The checksum: partial for every super-packet; where it starts and lies is fixed by
        // the headers.
        if self.flags & NEEDS_CSUM != 0 {
            let offset = match proto {
                PROTO_TCP => 16,
                PROTO_UDP => 6,
                _ => return bad,
            };
            if usize::from(self.csum_start) != ip_len || self.csum_offset != offset {
                return bad;
            }
        } else if self.csum_start != 0 || self.csum_offset != 0 || want_proto.is_some() {
            return bad;
        }
        let Some(p) = want_proto else {
            return if self.hdr_len == 0 && self.gso_size == 0 {
                Ok(())
            } else {
                bad
            };
        };
        let Some((ip, l4)) = headers(packet) else {
            return bad;
        };
        if ip != ip_len || usize::from(self.hdr_len) != ip + l4 {
            return bad;
        }
        if p == PROTO_TCP && packet[ip + 13] & 0x06 != 0 {
            // SYN or RST: never part of a super-packet, and one would become many.
            return bad;
        }
        let size = usize::from(self.gso_size);
        let payload = packet.len() - ip - l4;
        if size == 0 || payload == 0 || ip + l4 + size > mtu {
            return bad;
        }
        if payload.div_ceil(size) > MAX_SEGMENTS {
            return bad;
        }
        Ok(())
    }
}

/// The IP total length an IPv4 or IPv6 header announces.
fn ip_total(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(usize::from(u16::from_be_bytes([packet[2], packet[3]]))),
        6 if packet.len() >= 40 => {
            Some(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))
        }
        _ => None,
    }
}

/// The IP and the TCP or UDP header lengths of a packet without IPv4 options or IPv6 extension
/// headers; `None` for another protocol or a header that does not fit.
fn headers(packet: &[u8]) -> Option<(usize, usize)> {
    let (ip, proto) = match packet.first()? >> 4 {
        4 if packet.len() >= 20 => (usize::from(packet[0] & 0x0f) * 4, packet[9]),
        6 if packet.len() >= 40 => (40, packet[6]),
        _ => return None,
    };
    let l4 = match proto {
        PROTO_TCP => usize::from(packet.get(ip + 12)? >> 4) * 4,
        PROTO_UDP => 8,
        _ => return None,
    };
    if (proto == PROTO_TCP && l4 < 20) || ip + l4 > packet.len() {
        return None;
    }
    Some((ip, l4))
}

/// Builders for test super-packets (also used by the engine's tests and the fuzz target).
pub mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::{GSO_TCPV4, GSO_TCPV6, NEEDS_CSUM, Offload};
    use crate::packet::PROTO_TCP;

    fn tcp_header(sport: u16, dport: u16) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x18; // ACK, PSH
        t[14] = 0xff;
        t
    }

    fn payload(len: usize) -> impl Iterator<Item = u8> {
        (0..len).map(|i| (i % 251) as u8)
    }

    /// A TCPv4 super-packet (ACK) of `len` payload bytes in `mss`-byte segments, as a TUN with
    /// offload reads it (checksum partial), with its metadata.
    pub fn tcp_v4(
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        len: usize,
        mss: u16,
    ) -> (Vec<u8>, Offload) {
        let total = 40 + len;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&tcp_header(sport, dport));
        p.extend(payload(len));
        let o = Offload {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (p, o)
    }

    /// The same over IPv6.
    pub fn tcp_v6(
        src: Ipv6Addr,
        sport: u16,
        dst: Ipv6Addr,
        dport: u16,
        len: usize,
        mss: u16,
    ) -> (Vec<u8>, Offload) {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((20 + len) as u16).to_be_bytes());
        p.extend_from_slice(&[PROTO_TCP, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&tcp_header(sport, dport));
        p.extend(payload(len));
        let o = Offload {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 60,
            gso_size: mss,
            csum_start: 40,
            csum_offset: 16,
        };
        (p, o)
    }
}

#[cfg(test)]
mod tests;
