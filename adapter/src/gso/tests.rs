use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::build::{tcp_v4, tcp_v6};
use super::*;
use crate::packet::build as pb;

const MTU: usize = 1420;
const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);

fn v6() -> (Ipv6Addr, Ipv6Addr) {
    (
        "fd00::2".parse().expect("ip"),
        "fd00::10".parse().expect("ip"),
    )
}

#[test]
fn valid_tcp_super_packets_are_accepted() {
    let (p, o) = tcp_v4(A, 40000, B, 102, 64_000, 1380);
    assert_eq!(o.validate(&p, MTU), Ok(()));
    let (s, d) = v6();
    let (p, o) = tcp_v6(s, 40000, d, 102, 65_000, 1360);
    assert_eq!(o.validate(&p, MTU), Ok(()));
    // With ECN, and one segment only.
    let (p, mut o) = tcp_v4(A, 40000, B, 102, 100, 1380);
    o.gso_type |= GSO_ECN;
    assert_eq!(o.validate(&p, MTU), Ok(()));
    // No metadata at all.
    assert_eq!(Offload::NONE.validate(&p, MTU), Ok(()));
    // A single packet with a partial checksum (no GSO).
    let udp = pb::udp(A, 5000, B, 161, b"x");
    let o = Offload {
        flags: NEEDS_CSUM,
        csum_start: 20,
        csum_offset: 6,
        ..Offload::NONE
    };
    assert_eq!(o.validate(&udp, MTU), Ok(()));
}

#[test]
fn trailer_round_trips_and_bad_trailers_are_refused() {
    let (_, o) = tcp_v4(A, 1, B, 2, 3000, 1380);
    assert_eq!(Offload::from_trailer(&o.to_trailer()), Ok(o));
    assert_eq!(Offload::from_trailer(&[]), Ok(Offload::NONE));
    let mut t = o.to_trailer();
    t[0] = 0xB2;
    assert_eq!(Offload::from_trailer(&t), Err(DropReason::BadOffload));
    let mut t = o.to_trailer();
    t[3] = 1;
    assert_eq!(Offload::from_trailer(&t), Err(DropReason::BadOffload));
    assert_eq!(
        Offload::from_trailer(&o.to_trailer()[..11]),
        Err(DropReason::BadOffload)
    );
    assert_eq!(Offload::from_trailer(&[0; 13]), Err(DropReason::BadOffload));
    assert_eq!(Offload::from_vnet(&o.to_vnet()), o);
}

/// Every field broken one at a time is refused.
#[test]
fn every_malformed_field_is_refused() {
    let (p, good) = tcp_v4(A, 40000, B, 102, 20_000, 1380);
    let (s, d) = v6();
    let (p6, good6) = tcp_v6(s, 40000, d, 102, 20_000, 1360);
    let udp = pb::udp(A, 5000, B, 161, &[7; 4000]);
    let cases: Vec<(&str, &[u8], Offload)> = vec![
        ("unknown flag", &p, Offload { flags: 3, ..good }),
        (
            "data-valid flag",
            &p,
            Offload {
                flags: 2 | 1,
                ..good
            },
        ),
        ("no partial checksum", &p, Offload { flags: 0, ..good }),
        (
            "TCPv6 type on IPv4",
            &p,
            Offload {
                gso_type: GSO_TCPV6,
                ..good
            },
        ),
        (
            "TCPv4 type on IPv6",
            &p6,
            Offload {
                gso_type: GSO_TCPV4,
                ..good6
            },
        ),
        (
            "UDP (UFO) type",
            &p,
            Offload {
                gso_type: 3,
                ..good
            },
        ),
        (
            "unknown type",
            &p,
            Offload {
                gso_type: 9,
                ..good
            },
        ),
        (
            "ECN alone",
            &p,
            Offload {
                gso_type: GSO_ECN,
                ..good
            },
        ),
        (
            "UDP L4 type on TCP",
            &p,
            Offload {
                gso_type: GSO_UDP_L4,
                ..good
            },
        ),
        (
            "TCP type on UDP",
            &udp,
            Offload {
                hdr_len: 28,
                csum_offset: 6,
                ..good
            },
        ),
        (
            "zero gso_size",
            &p,
            Offload {
                gso_size: 0,
                ..good
            },
        ),
        (
            "segments over the MTU",
            &p,
            Offload {
                gso_size: 1381,
                ..good
            },
        ),
        (
            "too many segments",
            &p,
            Offload {
                gso_size: 8,
                ..good
            },
        ),
        (
            "hdr_len short",
            &p,
            Offload {
                hdr_len: 39,
                ..good
            },
        ),
        (
            "hdr_len long",
            &p,
            Offload {
                hdr_len: 41,
                ..good
            },
        ),
        (
            "hdr_len of the v4 header on v6",
            &p6,
            Offload {
                hdr_len: 40,
                ..good6
            },
        ),
        (
            "csum_start",
            &p,
            Offload {
                csum_start: 21,
                ..good
            },
        ),
        (
            "csum_start of v4 on v6",
            &p6,
            Offload {
                csum_start: 20,
                ..good6
            },
        ),
        (
            "csum_offset UDP on TCP",
            &p,
            Offload {
                csum_offset: 6,
                ..good
            },
        ),
        (
            "csum_offset",
            &p,
            Offload {
                csum_offset: 17,
                ..good
            },
        ),
        (
            "gso_size without GSO",
            &udp,
            Offload {
                flags: 1,
                gso_type: 0,
                hdr_len: 0,
                gso_size: 1000,
                csum_start: 20,
                csum_offset: 6,
            },
        ),
        (
            "hdr_len without GSO",
            &udp,
            Offload {
                flags: 1,
                gso_type: 0,
                hdr_len: 28,
                gso_size: 0,
                csum_start: 20,
                csum_offset: 6,
            },
        ),
        (
            "checksum place without the flag",
            &udp,
            Offload {
                flags: 0,
                gso_type: 0,
                hdr_len: 0,
                gso_size: 0,
                csum_start: 20,
                csum_offset: 6,
            },
        ),
    ];
    for (what, packet, o) in cases {
        assert_eq!(
            o.validate(packet, MTU),
            Err(DropReason::BadOffload),
            "{what}"
        );
    }
    // The packet disagrees with its IP total length, or has no payload, or is SYN/RST.
    let mut long = p.clone();
    long.push(0);
    assert_eq!(
        good.validate(&long, MTU),
        Err(DropReason::BadOffload),
        "trailing byte"
    );
    let mut short = p.clone();
    short.pop();
    assert_eq!(
        good.validate(&short, MTU),
        Err(DropReason::BadOffload),
        "short"
    );
    let (empty, o) = tcp_v4(A, 40000, B, 102, 0, 1380);
    assert_eq!(
        o.validate(&empty, MTU),
        Err(DropReason::BadOffload),
        "no payload"
    );
    for flag in [0x02, 0x04] {
        let mut syn = p.clone();
        syn[33] |= flag;
        assert_eq!(
            good.validate(&syn, MTU),
            Err(DropReason::BadOffload),
            "flag {flag}"
        );
    }
    // A smaller TUN MTU at the receiver than the sender's segments.
    assert_eq!(good.validate(&p, 1400), Err(DropReason::BadOffload), "mtu");
}

#[test]
fn normalize_recomputes_the_kernels_header_length_hint() {
    let (p, good) = tcp_v4(A, 40000, B, 102, 20_000, 1380);
    let hinted = Offload {
        flags: NEEDS_CSUM | 2,
        hdr_len: 1420,
        ..good
    };
    assert_eq!(hinted.normalize(&p), good);
    let udp = pb::udp(A, 5000, B, 161, b"x");
    let partial = Offload {
        flags: NEEDS_CSUM,
        hdr_len: 29,
        csum_start: 20,
        csum_offset: 6,
        ..Offload::NONE
    };
    let n = partial.normalize(&udp);
    assert_eq!(n.hdr_len, 0);
    assert_eq!(n.validate(&udp, MTU), Ok(()));
}

proptest! {
    /// Whatever the metadata and the packet bytes, the validator never panics; and what it
    /// accepts as a super-packet has real headers at the announced places and segments that
    /// fit the MTU.
    #[test]
    fn the_validator_is_total_and_what_it_accepts_is_consistent(
        len in 0usize..4000,
        mss in 0u16..2000,
        flags in 0u8..4,
        gso_type in prop::sample::select(vec![0u8, 1, 3, 4, 5, 0x80, 0x81, 0x84, 7]),
        hdr_len in prop::sample::select(vec![0u16, 28, 39, 40, 41, 60, 1500]),
        csum_start in prop::sample::select(vec![0u16, 20, 40, 41]),
        csum_offset in prop::sample::select(vec![0u16, 6, 16, 17]),
        flip in prop::option::of((0usize..60, any::<u8>())),
        v6 in any::<bool>(),
    ) {
        let (s, d) = self::v6();
        let (mut p, _) = if v6 {
            tcp_v6(s, 1, d, 2, len, 1000)
        } else {
            tcp_v4(A, 1, B, 2, len, 1000)
        };
        if let Some((at, b)) = flip && at < p.len() {
            p[at] = b;
        }
        let o = Offload { flags, gso_type, hdr_len, gso_size: mss, csum_start, csum_offset };
        if o.validate(&p, MTU).is_ok() && o.is_gso() {
            let (ip, l4) = headers(&p).expect("headers");
            prop_assert_eq!(usize::from(o.hdr_len), ip + l4);
            prop_assert!(usize::from(o.hdr_len) + usize::from(o.gso_size) <= MTU);
            prop_assert_eq!(ip_total(&p), Some(p.len()));
            prop_assert_eq!(o.flags, NEEDS_CSUM);
        }
        let _ = Offload::from_trailer(&o.to_trailer()[..(len % 13)]);
    }
}
