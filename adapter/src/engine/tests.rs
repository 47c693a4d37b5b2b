//! The engine against real WireGuard peers in memory: the tests hold the far end of every
//! tunnel, encrypt what a site (or a compromised site) would send, and read what comes out.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;
use crate::gso;
use crate::packet::build::*;
use crate::packet::{PROTO_TCP, PROTO_UDP};
use crate::wg::Keypair;

const TECH: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const PLC: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
const DRIVE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 20);
const A: TunnelId = TunnelId(1);
const B: TunnelId = TunnelId(2);

/// A client engine with tunnels A (PLC: tcp/101 udp/102 as `plc`, tcp/103 as `extra`) and B
/// (DRIVE: tcp/101), and the far end of each.
struct Rig {
    engine: Engine,
    far: BTreeMap<TunnelId, Peer>,
    now: Instant,
    /// The offload metadata of every packet written to the TUN, and the plaintext after the IP
    /// packet of every datagram the far ends decrypted.
    offloads: Vec<Offload>,
    rests: Vec<Vec<u8>>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Out {
    tun: Vec<Vec<u8>>,
    far: Vec<(TunnelId, Vec<u8>)>,
}

impl Rig {
    fn client() -> Self {
        let local = Keypair::from_secret([1; 32]);
        let mut engine = Engine::new(Side::Client {
            address: TECH.into(),
            any_source: false,
        });
        let mut far = BTreeMap::new();
        for (id, seed) in [(A, 2u8), (B, 3u8)] {
            let site = Keypair::from_secret([seed; 32]);
            let peer = Peer::new(&local, &site.public_hex(), id.0).expect("peer");
            engine.add_tunnel(id, peer, None).expect("tunnel");
            far.insert(
                id,
                Peer::new(&site, &local.public_hex(), 100 + id.0).expect("far"),
            );
        }
        let ports = |p: &[Port]| p.iter().copied().collect::<BTreeSet<Port>>();
        engine
            .connect(
                A,
                "plc",
                PLC.into(),
                ports(&[Port::tcp(101), Port::udp(102)]),
            )
            .expect("plc");
        engine
            .connect(A, "extra", PLC.into(), ports(&[Port::tcp(103)]))
            .expect("extra");
        engine
            .connect(B, "drive", DRIVE.into(), ports(&[Port::tcp(101)]))
            .expect("drive");
        let mut rig = Self {
            engine,
            far,
            now: Instant::now(),
            offloads: Vec::new(),
            rests: Vec::new(),
        };
        for id in [A, B] {
            rig.engine
                .set_tunnel_offload(id, TunnelOffload::FULL)
                .expect("tunnel");
            rig.engine.initiate(id);
        }
        let out = rig.pump();
        assert_eq!(out, Out::default(), "handshakes carry no packets");
        rig
    }

    /// Delivers every transmit until nothing moves; returns what reached the TUN and the sites.
    fn pump(&mut self) -> Out {
        let mut out = Out::default();
        let mut buf = vec![0u8; wg::BUFFER];
        while let Some(t) = self.engine.poll_transmit() {
            match t.dest {
                Dest::Tun => {
                    out.tun.push(t.bytes.clone());
                    self.offloads.push(t.offload);
                }
                Dest::Tunnel(id) => {
                    let far = self.far.get_mut(&id).expect("far end");
                    let mut back = Vec::new();
                    match far.decapsulate(&t.bytes, &mut buf) {
                        Decapsulated::Packet { packet, rest } => {
                            out.far.push((id, packet.to_vec()));
                            self.rests.push(rest.to_vec());
                        }
                        Decapsulated::Send(d) => {
                            back.push(d.to_vec());
                            while let Some(d) = far.flush(&mut buf) {
                                back.push(d.to_vec());
                            }
                        }
                        Decapsulated::Nothing => {}
                    }
                    for d in back {
                        self.engine.handle_datagram(id, &d, self.now);
                    }
                }
            }
            self.engine.recycle(t.bytes);
        }
        out
    }

    fn tun_in(&mut self, p: &[u8]) -> Out {
        self.engine.handle_tun_packet(p, self.now);
        self.pump()
    }

    /// The far end of `id` sends `p` into the tunnel.
    fn site_in(&mut self, id: TunnelId, p: &[u8]) -> Out {
        let mut buf = vec![0u8; wg::BUFFER];
        let far = self.far.get_mut(&id).expect("far end");
        let d = far.encapsulate(p, &mut buf).expect("established").to_vec();
        self.engine.handle_datagram(id, &d, self.now);
        self.pump()
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.engine.counters().0.get(&r).copied().unwrap_or(0)
    }
}

#[test]
fn initiate_sends_the_handshake_at_once_and_the_first_packet_needs_no_round_trip() {
    let local = Keypair::from_secret([1; 32]);
    let site = Keypair::from_secret([2; 32]);
    let mut engine = Engine::new(Side::Client {
        address: TECH.into(),
        any_source: false,
    });
    let peer = Peer::new(&local, &site.public_hex(), A.0).expect("peer");
    engine.add_tunnel(A, peer, None).expect("tunnel");
    engine.initiate(A);
    let t = engine.poll_transmit().expect("a handshake initiation");
    assert_eq!(
        (t.dest, t.bytes.len(), t.bytes[0]),
        (Dest::Tunnel(A), 148, 1)
    );
    // The site answers; the tunnel is up before the first packet, which goes out at once.
    let mut far = Peer::new(&site, &local.public_hex(), 100).expect("far");
    let mut buf = vec![0u8; wg::BUFFER];
    let response = match far.decapsulate(&t.bytes, &mut buf) {
        Decapsulated::Send(d) => d.to_vec(),
        other => panic!("{other:?}"),
    };
    engine.handle_datagram(A, &response, Instant::now());
    while engine.poll_transmit().is_some() {}
    engine
        .connect(A, "plc", PLC.into(), [Port::udp(102)].into_iter().collect())
        .expect("plc");
    let p = udp(TECH, 5000, PLC, 102, b"first");
    engine.handle_tun_packet(&p, Instant::now());
    let t = engine.poll_transmit().expect("the packet");
    match far.decapsulate(&t.bytes, &mut buf) {
        Decapsulated::Packet { packet, .. } => assert_eq!(packet, &p[..]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cryptokey_routing_each_tunnel_speaks_only_for_its_devices() {
    let mut rig = Rig::client();
    let syn = tcp(TECH, 40000, DRIVE, 101);
    assert_eq!(rig.tun_in(&syn).far, vec![(B, syn.clone())], "to B only");
    let reply = tcp_ack(DRIVE, 101, TECH, 40000);
    // Tunnel A injects a reply with B's device as source: dropped.
    assert_eq!(rig.site_in(A, &reply), Out::default());
    assert_eq!(rig.drops(DropReason::WrongTunnel), 1);
    // The same from B passes.
    assert_eq!(rig.site_in(B, &reply).tun, vec![reply]);
    // An ICMP error from A quoting B's flow: dropped too.
    let err = icmp_error(PLC, TECH, 3, 3, &syn);
    assert_eq!(rig.site_in(A, &err), Out::default());
    assert_eq!(rig.drops(DropReason::WrongTunnel), 2);
    // A packet from the TUN with another source is not the technician's.
    let other = tcp(Ipv4Addr::new(172, 17, 0, 2), 1, PLC, 101);
    assert_eq!(rig.tun_in(&other), Out::default());
    assert_eq!(rig.drops(DropReason::WrongSource), 1);
}

#[test]
fn refusals_are_answered_locally_and_counted_per_device() {
    let mut rig = Rig::client();
    let syn = tcp(TECH, 40000, PLC, 22);
    let out = rig.tun_in(&syn);
    assert!(out.far.is_empty());
    let rst = match packet::parse(&out.tun[0]) {
        Ok(Parsed::Whole(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!((rst.src, rst.dst), (PLC.into(), TECH.into()));
    assert!(matches!(rst.l4, L4::Tcp { flags, .. } if flags.rst));
    let udp = udp(TECH, 5000, PLC, 5001, b"x");
    let out = rig.tun_in(&udp);
    assert!(matches!(
        packet::parse(&out.tun[0]),
        Ok(Parsed::Whole(Summary {
            l4: L4::Error(_),
            ..
        }))
    ));
    let (_, plc) = rig
        .engine
        .devices(A)
        .find(|(ip, _)| **ip == IpAddr::from(PLC))
        .expect("plc");
    assert_eq!(plc.refused(), (2, Some("udp/5001".into())));
    assert_eq!(plc.agents().collect::<Vec<_>>(), ["extra", "plc"]);
    // The answers are rate-limited: a flood gets at most a burst.
    let mut answered = 0;
    for port in 0..1000u16 {
        answered += rig.tun_in(&tcp(TECH, 1000 + port, PLC, 2000)).tun.len();
    }
    assert!(answered as u64 <= ANSWER_BURST, "{answered}");
    // An RST is never answered.
    let rst = tcp_flags(
        TECH,
        1,
        PLC,
        22,
        packet::TcpFlags {
            rst: true,
            ..Default::default()
        },
    );
    rig.now += Duration::from_secs(1);
    assert!(rig.tun_in(&rst).tun.is_empty());
}

#[test]
fn related_icmp_errors_pass_both_ways_for_live_flows_only() {
    let mut rig = Rig::client();
    let req = udp(TECH, 5000, PLC, 102, b"get");
    assert_eq!(rig.tun_in(&req).far.len(), 1);
    // Port unreachable from the device, and fragmentation needed from a router on the way.
    let unreachable = icmp_error(PLC, TECH, 3, 3, &req);
    assert_eq!(rig.site_in(A, &unreachable).tun, vec![unreachable]);
    let router = Ipv4Addr::new(192, 168, 0, 1);
    let frag_needed = icmp_error(router, TECH, 3, 4, &req);
    assert_eq!(rig.site_in(A, &frag_needed).tun, vec![frag_needed]);
    // An error about a flow never opened: dropped.
    let other = udp(TECH, 5001, PLC, 102, b"get");
    assert!(
        rig.site_in(A, &icmp_error(PLC, TECH, 3, 3, &other))
            .tun
            .is_empty()
    );
    // The technician's host reports a device's reply as unwanted: passes toward the device.
    let reply = udp(PLC, 102, TECH, 5000, b"resp");
    assert_eq!(rig.site_in(A, &reply).tun.len(), 1);
    let back = icmp_error(TECH, PLC, 3, 3, &reply);
    assert_eq!(rig.tun_in(&back).far, vec![(A, back.clone())]);
    // Echo to a connected device, and its reply.
    assert_eq!(rig.tun_in(&echo(TECH, PLC, true, 9)).far.len(), 1);
    assert_eq!(rig.site_in(A, &echo(PLC, TECH, false, 9)).tun.len(), 1);
    assert!(rig.site_in(A, &echo(PLC, TECH, true, 9)).tun.is_empty());
}

#[test]
fn fragments_are_reassembled_filtered_whole_and_sent_whole() {
    let mut rig = Rig::client();
    let big = may_fragment(udp(TECH, 5000, PLC, 102, &[1u8; 3000]));
    let frags = fragments(&big, 1420);
    let mut far = Vec::new();
    for f in &frags {
        far.extend(rig.tun_in(f).far);
    }
    assert_eq!(far, vec![(A, big.clone())]);
    // The answer arrives whole through the tunnel and is fragmented to the TUN's MTU.
    let answer = may_fragment(udp(PLC, 102, TECH, 5000, &[2u8; 3004]));
    let tun = rig.site_in(A, &answer).tun;
    assert!(tun.len() > 1 && tun.iter().all(|p| p.len() <= usize::from(crate::tun::MTU)));
    // Fragments to a port no agent allows: refused whole, answered once.
    let denied = may_fragment(udp(TECH, 5000, PLC, 999, &[1u8; 3000]));
    let mut out = Out::default();
    for f in fragments(&denied, 1420) {
        let o = rig.tun_in(&f);
        out.tun.extend(o.tun);
        out.far.extend(o.far);
    }
    assert!(out.far.is_empty());
    assert_eq!(out.tun.len(), 1);
    // A datagram never completed is dropped and counted when it times out.
    rig.tun_in(&frags[0]);
    rig.engine
        .handle_timeout(rig.now + crate::defrag::TIMEOUT + Duration::from_secs(1));
    assert_eq!(rig.drops(DropReason::FragmentTimeout), 1);
}

#[test]
fn disconnecting_one_agent_keeps_the_device_for_the_other() {
    let mut rig = Rig::client();
    let s103 = tcp(TECH, 1, PLC, 103);
    assert_eq!(rig.tun_in(&s103).far.len(), 1);
    assert_eq!(rig.engine.disconnect(A, "extra"), None, "plc remains");
    assert!(rig.tun_in(&tcp_ack(TECH, 1, PLC, 103)).far.is_empty());
    assert!(rig.site_in(A, &tcp_ack(PLC, 103, TECH, 1)).tun.is_empty());
    assert_eq!(rig.tun_in(&tcp(TECH, 2, PLC, 101)).far.len(), 1);
    assert_eq!(rig.engine.disconnect(A, "plc"), Some(PLC.into()));
    assert_eq!(rig.engine.owner(&PLC.into()), None);
    // A device of tunnel B cannot be connected through A.
    assert!(matches!(
        rig.engine
            .connect(A, "x", DRIVE.into(), [Port::tcp(1)].into_iter().collect()),
        Err(EngineError::DeviceOfAnotherTunnel { .. })
    ));
}

#[test]
fn the_site_accepts_only_its_technician_and_its_devices() {
    let tech_key = Keypair::from_secret([7; 32]);
    let site_key = Keypair::from_secret([8; 32]);
    let mut engine = Engine::new(Side::Site);
    let peer = Peer::new(&site_key, &tech_key.public_hex(), 5).expect("peer");
    engine
        .add_tunnel(TunnelId(5), peer, Some(TECH.into()))
        .expect("tunnel");
    engine
        .connect(
            TunnelId(5),
            "plc",
            PLC.into(),
            [Port::tcp(102)].into_iter().collect(),
        )
        .expect("plc");
    let mut far = BTreeMap::new();
    far.insert(
        TunnelId(5),
        Peer::new(&tech_key, &site_key.public_hex(), 6).expect("far"),
    );
    let mut rig = Rig {
        engine,
        far,
        now: Instant::now(),
        offloads: Vec::new(),
        rests: Vec::new(),
    };
    // The technician side initiates.
    let mut buf = vec![0u8; wg::BUFFER];
    let init = rig
        .far
        .get_mut(&TunnelId(5))
        .expect("far")
        .initiate(&mut buf)
        .expect("init")
        .to_vec();
    rig.engine.handle_datagram(TunnelId(5), &init, rig.now);
    rig.pump();
    let syn = tcp(TECH, 40000, PLC, 102);
    assert_eq!(rig.site_in(TunnelId(5), &syn).tun, vec![syn]);
    let spoofed = tcp(Ipv4Addr::new(100, 64, 0, 9), 40000, PLC, 102);
    assert!(rig.site_in(TunnelId(5), &spoofed).tun.is_empty());
    assert_eq!(rig.drops(DropReason::WrongTunnel), 1);
    let reply = tcp_ack(PLC, 102, TECH, 40000);
    assert_eq!(rig.tun_in(&reply).far, vec![(TunnelId(5), reply)]);
    let other = tcp_ack(Ipv4Addr::new(192, 168, 0, 11), 102, TECH, 40000);
    assert!(rig.tun_in(&other).far.is_empty());
}

/// A site engine with one session (tunnel 5, technician TECH, PLC tcp/102 and udp/161) and
/// the technician's end of it; the handshake not done yet.
fn site_rig() -> Rig {
    let tech_key = Keypair::from_secret([7; 32]);
    let site_key = Keypair::from_secret([8; 32]);
    let mut engine = Engine::new(Side::Site);
    let peer = Peer::new(&site_key, &tech_key.public_hex(), 5).expect("peer");
    engine
        .add_tunnel(TunnelId(5), peer, Some(TECH.into()))
        .expect("tunnel");
    engine
        .connect(
            TunnelId(5),
            "plc",
            PLC.into(),
            [Port::tcp(102), Port::udp(161)].into_iter().collect(),
        )
        .expect("plc");
    let mut far = BTreeMap::new();
    far.insert(
        TunnelId(5),
        Peer::new(&tech_key, &site_key.public_hex(), 6).expect("far"),
    );
    Rig {
        engine,
        far,
        now: Instant::now(),
        offloads: Vec::new(),
        rests: Vec::new(),
    }
}

impl Rig {
    /// The technician's end starts the handshake; returns what came out (the response went
    /// back to the far end, which is then established).
    fn far_initiates(&mut self, id: TunnelId) -> Out {
        let mut buf = vec![0u8; wg::BUFFER];
        let init = self
            .far
            .get_mut(&id)
            .expect("far")
            .initiate(&mut buf)
            .expect("init")
            .to_vec();
        self.engine.handle_datagram(id, &init, self.now);
        self.pump()
    }
}

#[test]
fn a_held_tunnel_shakes_hands_and_keeps_its_packets_until_released_in_order() {
    let mut rig = site_rig();
    let id = TunnelId(5);
    assert!(rig.engine.hold(id));
    assert!(!rig.engine.hold(TunnelId(99)), "no such tunnel");
    // The handshake is answered while held: the far end can encrypt afterwards.
    rig.far_initiates(id);
    let first = tcp(TECH, 40000, PLC, 102);
    let second = udp(TECH, 40001, PLC, 161, b"get");
    assert!(rig.site_in(id, &first).tun.is_empty(), "held");
    assert!(rig.site_in(id, &second).tun.is_empty(), "held");
    // The other way is not held: the device's answer to a flow goes to the technician.
    let reply = tcp_ack(PLC, 102, TECH, 40000);
    assert_eq!(rig.tun_in(&reply).far, vec![(id, reply)]);
    // What the filter refuses is not held either: it is dropped as before.
    assert!(rig.site_in(id, &tcp(TECH, 40002, PLC, 22)).tun.is_empty());
    assert_eq!(rig.drops(DropReason::PortNotAllowed), 1);
    assert_eq!(rig.engine.release(id), 2);
    assert!(!rig.engine.is_held(id));
    assert_eq!(
        rig.pump().tun,
        vec![first, second],
        "in order, once released"
    );
    assert_eq!(rig.engine.release(id), 0);
    let third = udp(TECH, 40001, PLC, 161, b"again");
    assert_eq!(
        rig.site_in(id, &third).tun,
        vec![third],
        "not held any more"
    );
}

#[test]
fn an_agent_disconnected_while_held_gets_nothing_of_what_was_held() {
    let mut rig = site_rig();
    let id = TunnelId(5);
    rig.engine
        .connect(
            id,
            "drive",
            DRIVE.into(),
            [Port::tcp(502)].into_iter().collect(),
        )
        .expect("drive");
    rig.far_initiates(id);
    rig.engine.hold(id);
    // Let through while "drive" was connected, held while the site's table loads...
    assert!(
        rig.site_in(id, &tcp(TECH, 40000, DRIVE, 502))
            .tun
            .is_empty()
    );
    // ... then the gateway withdraws the agent before the load is done.
    rig.engine.disconnect(id, "drive");
    assert_eq!(rig.drops(DropReason::HeldDiscarded), 1);
    assert_eq!(rig.engine.release(id), 0);
    assert!(
        rig.pump().tun.is_empty(),
        "nothing reaches the withdrawn device"
    );
    // The session goes on for the agent that stays.
    let plc = tcp(TECH, 40001, PLC, 102);
    assert_eq!(rig.site_in(id, &plc).tun, vec![plc]);
}

#[test]
fn a_hold_is_bounded_and_a_removed_tunnel_drops_what_it_held() {
    let mut rig = site_rig();
    let id = TunnelId(5);
    rig.far_initiates(id);
    rig.engine.hold(id);
    // Bounded in packets...
    for i in 0..HOLD_PACKETS + 3 {
        let p = udp(TECH, 40000, PLC, 161, &(i as u32).to_be_bytes());
        assert!(rig.site_in(id, &p).tun.is_empty());
    }
    assert_eq!(rig.drops(DropReason::HoldFull), 3);
    assert_eq!(rig.engine.release(id), HOLD_PACKETS);
    let out = rig.pump().tun;
    assert_eq!(out.len(), HOLD_PACKETS);
    assert_eq!(
        &out[0][out[0].len() - 4..],
        &0u32.to_be_bytes(),
        "the first are kept"
    );
    // ... and in bytes.
    rig.engine.hold(id);
    let big = udp(TECH, 40000, PLC, 161, &vec![7u8; 8000]);
    let fits = HOLD_BYTES / big.len();
    for _ in 0..fits + 2 {
        rig.site_in(id, &big);
    }
    assert_eq!(rig.drops(DropReason::HoldFull), 3 + 2);
    // A tunnel removed while held: nothing of it reaches the TUN.
    rig.engine.remove_tunnel(id);
    assert_eq!(rig.drops(DropReason::HeldDiscarded), fits as u64);
    assert_eq!(rig.engine.release(id), 0);
    assert!(rig.pump().tun.is_empty());
}

impl Rig {
    /// A super-packet read from the TUN with its metadata.
    fn tun_in_offload(&mut self, p: &[u8], o: Offload) -> Out {
        let mut buf = p.to_vec();
        buf.resize(p.len() + gso::TRAILER, 0);
        self.engine
            .handle_tun_offload(&mut buf, p.len(), o, self.now);
        self.pump()
    }

    /// The far end of `id` sends `p` followed by `rest` in one WireGuard message.
    fn site_in_raw(&mut self, id: TunnelId, p: &[u8], rest: &[u8]) -> Out {
        let mut plain = p.to_vec();
        plain.extend_from_slice(rest);
        self.site_in(id, &plain)
    }
}

fn payload_of(p: &[u8]) -> &[u8] {
    let ip = usize::from(p[0] & 0x0f) * 4;
    &p[ip + usize::from(p[ip + 12] >> 4) * 4..]
}

#[test]
fn super_packets_travel_whole_with_their_metadata() {
    let mut rig = Rig::client();
    let syn = tcp(TECH, 40000, PLC, 101);
    assert_eq!(rig.tun_in(&syn).far.len(), 1);
    // Technician → site: one WireGuard message, the metadata in its trailer.
    let (sp, o) = gso::build::tcp_v4(TECH, 40000, PLC, 101, 64_000, 1380);
    let out = rig.tun_in_offload(&sp, o);
    assert_eq!(out.far, vec![(A, sp.clone())]);
    assert_eq!(
        rig.rests.last().map(Vec::as_slice),
        Some(&o.to_trailer()[..])
    );
    // The kernel's header-length hint is replaced by the real one.
    let hinted = Offload {
        hdr_len: 1420,
        flags: o.flags | 2,
        ..o
    };
    rig.tun_in_offload(&sp, hinted);
    assert_eq!(
        rig.rests.last().map(Vec::as_slice),
        Some(&o.to_trailer()[..])
    );
    // Site → technician, to a TUN with offload: whole, with the metadata.
    rig.engine.set_tun_offload(TunOffload {
        tcp: true,
        udp: false,
    });
    let (reply, ro) = gso::build::tcp_v4(PLC, 101, TECH, 40000, 30_000, 1380);
    let out = rig.site_in_raw(A, &reply, &ro.to_trailer());
    assert_eq!(out.tun, vec![reply.clone()]);
    assert_eq!(rig.offloads.last(), Some(&ro));
    // To a TUN without offload: the segments, each within the MTU, the payload in order.
    rig.engine.set_tun_offload(TunOffload::default());
    let out = rig.site_in_raw(A, &reply, &ro.to_trailer());
    assert_eq!(out.tun.len(), 30_000usize.div_ceil(1380));
    assert!(out.tun.iter().all(|s| s.len() <= 1420));
    let joined: Vec<u8> = out
        .tun
        .iter()
        .flat_map(|s| payload_of(s).to_vec())
        .collect();
    assert_eq!(joined, payload_of(&reply));
    assert!(
        rig.offloads
            .iter()
            .rev()
            .take(out.tun.len())
            .all(Offload::is_none)
    );
    // The filter sees the super-packet's headers: a port no agent allows is refused.
    let (bad, bo) = gso::build::tcp_v4(TECH, 40001, PLC, 999, 10_000, 1380);
    assert!(rig.tun_in_offload(&bad, bo).far.is_empty());
    assert_eq!(rig.drops(DropReason::PortNotAllowed), 1);
    // And from the site, a super-packet of no flow is dropped.
    let (stray, so) = gso::build::tcp_v4(PLC, 101, TECH, 40009, 10_000, 1380);
    assert!(rig.site_in_raw(A, &stray, &so.to_trailer()).tun.is_empty());
    assert_eq!(rig.drops(DropReason::NoFlow), 1);
    assert_eq!(rig.drops(DropReason::BadOffload), 0);
}

#[test]
fn malformed_metadata_from_the_tunnel_is_dropped_and_counted() {
    let mut rig = Rig::client();
    rig.engine.set_tun_offload(TunOffload {
        tcp: true,
        udp: true,
    });
    assert_eq!(rig.tun_in(&tcp(TECH, 40000, PLC, 101)).far.len(), 1);
    let (reply, o) = gso::build::tcp_v4(PLC, 101, TECH, 40000, 30_000, 1380);
    let mut syn = reply.clone();
    syn[33] |= 0x02;
    let trailer = |o: Offload| o.to_trailer().to_vec();
    let mut magic = trailer(o);
    magic[0] ^= 1;
    let cases: Vec<(&str, &[u8], Vec<u8>)> = vec![
        ("gso_size 0", &reply, trailer(Offload { gso_size: 0, ..o })),
        (
            "segments over the MTU",
            &reply,
            trailer(Offload {
                gso_size: 1400,
                ..o
            }),
        ),
        (
            "TCPv6 on IPv4",
            &reply,
            trailer(Offload {
                gso_type: gso::GSO_TCPV6,
                ..o
            }),
        ),
        (
            "UDP on TCP",
            &reply,
            trailer(Offload {
                gso_type: gso::GSO_UDP_L4,
                ..o
            }),
        ),
        ("hdr_len", &reply, trailer(Offload { hdr_len: 60, ..o })),
        (
            "csum_start",
            &reply,
            trailer(Offload { csum_start: 0, ..o }),
        ),
        (
            "csum_offset",
            &reply,
            trailer(Offload {
                csum_offset: 6,
                ..o
            }),
        ),
        ("flags", &reply, trailer(Offload { flags: 0x81, ..o })),
        ("a SYN", &syn, trailer(o)),
        ("magic", &reply, magic),
        ("short trailer", &reply, trailer(o)[..7].to_vec()),
        ("long trailer", &reply, [trailer(o), vec![0]].concat()),
    ];
    for (i, (what, p, rest)) in cases.iter().enumerate() {
        let out = rig.site_in_raw(A, p, rest);
        assert!(out.tun.is_empty(), "{what}");
        assert_eq!(rig.drops(DropReason::BadOffload), i as u64 + 1, "{what}");
    }
    // The tunnel still works.
    assert_eq!(rig.site_in_raw(A, &reply, &trailer(o)).tun, vec![reply]);
}

/// The reference model: which (device, protocol, port) each agent allows, and the flows opened.
#[derive(Debug, Clone)]
enum Op {
    /// From the TUN: a SYN, an ACK, a UDP datagram (fragmented when `big`), an echo request.
    Out {
        kind: u8,
        sport: u16,
        dev: u8,
        dport: u16,
        big: bool,
    },
    /// From tunnel `via`: a reply from device `dev`, or an ICMP error quoting a flow.
    In {
        via: bool,
        kind: u8,
        dev: u8,
        sport: u16,
        dport: u16,
        error: bool,
    },
    /// The `extra` agent of the PLC disconnects.
    DropExtra,
}

fn dev(i: u8) -> Ipv4Addr {
    [PLC, DRIVE, Ipv4Addr::new(192, 168, 0, 11)][usize::from(i)]
}

fn op() -> impl Strategy<Value = Op> {
    let port = 100u16..104;
    prop_oneof![
        6 => (0u8..4, port.clone(), 0u8..3, port.clone(), any::<bool>()).prop_map(
            |(kind, sport, dev, dport, big)| Op::Out { kind, sport, dev, dport, big }
        ),
        6 => (any::<bool>(), 0u8..4, 0u8..3, port.clone(), port, any::<bool>()).prop_map(
            |(via, kind, dev, sport, dport, error)| Op::In { via, kind, dev, sport, dport, error }
        ),
        1 => Just(Op::DropExtra),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut rig = Rig::client();
        let mut allowed: Vec<(Ipv4Addr, u8, u16)> =
            vec![(PLC, 6, 101), (PLC, 17, 102), (PLC, 6, 103), (DRIVE, 6, 101)];
        let owner = |d: Ipv4Addr| if d == PLC { Some(A) } else if d == DRIVE { Some(B) } else { None };
        // (proto, tech port, device, device port)
        let mut opened: Vec<(u8, u16, Ipv4Addr, u16)> = Vec::new();
        for o in ops {
            match o.clone() {
                Op::Out { kind, sport, dev: d, dport, big } => {
                    let d = dev(d);
                    let (p, proto, key, opens) = match kind {
                        0 => (tcp(TECH, sport, d, dport), PROTO_TCP, (6, sport, d, dport), true),
                        1 => (tcp_ack(TECH, sport, d, dport), PROTO_TCP, (6, sport, d, dport), false),
                        2 => (udp(TECH, sport, d, dport, &vec![5u8; if big { 3000 } else { 10 }]), PROTO_UDP, (17, sport, d, dport), true),
                        _ => (echo(TECH, d, true, sport), 1, (1, sport, d, 0), true),
                    };
                    let port_ok = proto == 1 && owner(d).is_some() || allowed.contains(&(d, proto, dport));
                    let pass = port_ok && (opens || opened.contains(&key));
                    let p = if kind == 2 && big { may_fragment(p) } else { p };
                    let mut out = Out::default();
                    let frags = if kind == 2 && big { fragments(&p, 1420) } else { vec![p.clone()] };
                    for f in frags {
                        let o = rig.tun_in(&f);
                        out.tun.extend(o.tun);
                        out.far.extend(o.far);
                    }
                    if pass {
                        prop_assert_eq!(out.far, vec![(owner(d).expect("owner"), p)], "{:?}", o);
                        if !opened.contains(&key) { opened.push(key); }
                    } else {
                        prop_assert!(out.far.is_empty(), "{:?}", o);
                        // A refused port of a connected device is answered; nothing else is.
                        let answered = owner(d).is_some() && proto != 1 && !port_ok;
                        prop_assert_eq!(out.tun.len(), usize::from(answered), "{:?}", o);
                    }
                }
                Op::In { via, kind, dev: d, sport, dport, error } => {
                    let id = if via { B } else { A };
                    let d = dev(d);
                    let (reply, key) = match kind {
                        0 | 1 => (tcp_ack(d, sport, TECH, dport), (6, dport, d, sport)),
                        2 => (udp(d, sport, TECH, dport, b"r"), (17, dport, d, sport)),
                        _ => (echo(d, TECH, false, dport), (1, dport, d, 0)),
                    };
                    let p = if error {
                        // The device reports the technician's packet of this flow as unreachable.
                        let sent = match kind {
                            0 | 1 => tcp(TECH, dport, d, sport),
                            2 => udp(TECH, dport, d, sport, b"q"),
                            _ => echo(TECH, d, true, dport),
                        };
                        icmp_error(d, TECH, 3, 3, &sent)
                    } else {
                        reply
                    };
                    let pass = owner(d) == Some(id) && opened.contains(&key);
                    let out = rig.site_in(id, &p);
                    prop_assert!(out.far.is_empty());
                    prop_assert_eq!(out.tun, if pass { vec![p] } else { vec![] }, "{:?}", o);
                }
                Op::DropExtra => {
                    rig.engine.disconnect(A, "extra");
                    allowed.retain(|a| *a != (PLC, 6, 103));
                    opened.retain(|k| !(k.0 == 6 && k.2 == PLC && k.3 == 103));
                }
            }
        }
    }

    /// Whatever metadata a peer sends with a super-packet, the engine never panics, and what
    /// reaches the TUN with metadata passed the validator.
    #[test]
    fn any_metadata_from_the_tunnel_is_validated(
        len in 0usize..5000,
        mss in 0u16..1500,
        trailer in proptest::collection::vec(any::<u8>(), 12),
        flip in proptest::option::of((0usize..60, any::<u8>())),
        offload in any::<bool>(),
    ) {
        let mut rig = Rig::client();
        rig.engine.set_tun_offload(TunOffload { tcp: offload, udp: offload });
        prop_assert_eq!(rig.tun_in(&tcp(TECH, 40000, PLC, 101)).far.len(), 1);
        let (mut p, o) = gso::build::tcp_v4(PLC, 101, TECH, 40000, len, mss);
        if let Some((at, b)) = flip && at < p.len() {
            p[at] = b;
        }
        for rest in [o.to_trailer().to_vec(), trailer.clone()] {
            let n = rig.offloads.len();
            let out = rig.site_in_raw(A, &p, &rest);
            for (pkt, meta) in out.tun.iter().zip(&rig.offloads[n..]) {
                prop_assert!(meta.validate(pkt, 1420).is_ok());
                prop_assert!(offload || meta.is_none());
                prop_assert!(meta.is_gso() || pkt.len() <= 1420 || !packet::dont_fragment(pkt) || p.len() == pkt.len());
            }
        }
    }

    #[test]
    fn garbage_never_passes_and_never_panics(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..8),
    ) {
        let mut rig = Rig::client();
        for c in &chunks {
            let out = rig.tun_in(c);
            prop_assert!(out.far.is_empty() || matches!(packet::parse(c), Ok(Parsed::Whole(_)) | Ok(Parsed::Fragment(_))));
            let out = rig.site_in(A, c);
            prop_assert!(out.tun.is_empty(), "nothing answers a flow never opened");
        }
    }
}

#[test]
fn a_peer_that_did_not_announce_offload_gets_only_mtu_packets_and_refuses_trailers() {
    let mut rig = Rig::client();
    // Tunnel A's site predates offload (or the relay on its path does): nothing was agreed.
    rig.engine
        .set_tunnel_offload(A, TunnelOffload::default())
        .expect("tunnel");
    assert_eq!(rig.tun_in(&tcp(TECH, 40000, PLC, 101)).far.len(), 1);
    let (sp, o) = gso::build::tcp_v4(TECH, 40000, PLC, 101, 64_000, 1380);
    let n = rig.rests.len();
    let out = rig.tun_in_offload(&sp, o);
    // Cut before encryption: each segment its own WireGuard message, within the MTU, with no
    // trailer after it, and together the same bytes.
    assert_eq!(out.far.len(), 64_000usize.div_ceil(1380));
    assert!(out.far.iter().all(|(id, s)| *id == A && s.len() <= 1420));
    assert!(rig.rests[n..].iter().all(Vec::is_empty));
    let joined: Vec<u8> = out
        .far
        .iter()
        .flat_map(|(_, s)| payload_of(s).to_vec())
        .collect();
    assert_eq!(joined, payload_of(&sp));
    assert_eq!(rig.engine.offload_counters().sent, 0);
    assert_eq!(rig.engine.offload_counters().split, 1);
    // A packet with only a partial checksum goes out complete, without a trailer.
    let (small, so) = gso::build::tcp_v4(TECH, 40000, PLC, 101, 100, 1380);
    let partial = Offload {
        gso_type: gso::GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        ..so
    };
    let n = rig.rests.len();
    let out = rig.tun_in_offload(&small, partial);
    assert_eq!(out.far.len(), 1);
    assert!(rig.rests[n..].iter().all(Vec::is_empty));
    // We did not announce offload on A: a trailer from its peer is malformed.
    let (reply, ro) = gso::build::tcp_v4(PLC, 101, TECH, 40000, 30_000, 1380);
    assert!(rig.site_in_raw(A, &reply, &ro.to_trailer()).tun.is_empty());
    assert_eq!(rig.drops(DropReason::BadOffload), 1);
    // Plain packets still pass both ways.
    let ack = tcp_ack(PLC, 101, TECH, 40000);
    assert_eq!(rig.site_in(A, &ack).tun, vec![ack]);
    // Tunnel B agreed on offload: whole, with its trailer.
    assert_eq!(rig.tun_in(&tcp(TECH, 40000, DRIVE, 101)).far.len(), 1);
    let (sp, o) = gso::build::tcp_v4(TECH, 40000, DRIVE, 101, 64_000, 1380);
    assert_eq!(rig.tun_in_offload(&sp, o).far, vec![(B, sp.clone())]);
    assert_eq!(
        rig.rests.last().map(Vec::as_slice),
        Some(&o.to_trailer()[..])
    );
}

#[test]
fn a_relay_with_a_smaller_frame_limit_gets_super_packets_cut() {
    let mut rig = Rig::client();
    // The peer takes super-packets, but the relay forwards datagrams of at most 16 KiB.
    rig.engine
        .set_tunnel_offload(
            A,
            TunnelOffload {
                send: Some(16 * 1024),
                receive: true,
            },
        )
        .expect("tunnel");
    assert_eq!(rig.tun_in(&tcp(TECH, 40000, PLC, 101)).far.len(), 1);
    let (big, o) = gso::build::tcp_v4(TECH, 40000, PLC, 101, 64_000, 1380);
    let out = rig.tun_in_offload(&big, o);
    assert_eq!(out.far.len(), 64_000usize.div_ceil(1380));
    let (fits, fo) = gso::build::tcp_v4(TECH, 40000, PLC, 101, 13_800, 1380);
    assert_eq!(rig.tun_in_offload(&fits, fo).far, vec![(A, fits.clone())]);
    assert_eq!(
        rig.engine
            .set_tunnel_offload(TunnelId(9), TunnelOffload::default()),
        Err(EngineError::NoTunnel(TunnelId(9)))
    );
}

impl Rig {
    /// Reads `p` from the TUN as part of a burst: nothing is written until [`Rig::pump`].
    fn tun_burst(&mut self, p: &[u8], o: Offload) {
        let mut buf = p.to_vec();
        buf.resize(p.len() + gso::TRAILER, 0);
        self.engine
            .handle_tun_offload(&mut buf, p.len(), o, self.now);
    }

    /// The far end of `id` sends `p` (and `rest`, e.g. a trailer) as part of a burst of
    /// datagrams: nothing is written until [`Rig::pump`].
    fn site_burst(&mut self, id: TunnelId, p: &[u8], rest: &[u8]) {
        let mut plain = p.to_vec();
        plain.extend_from_slice(rest);
        let mut buf = vec![0u8; wg::BUFFER];
        let far = self.far.get_mut(&id).expect("far end");
        let d = far
            .encapsulate(&plain, &mut buf)
            .expect("established")
            .to_vec();
        self.engine.handle_datagram(id, &d, self.now);
    }
}

/// The TCP source port of an IPv4 packet (the flow a test packet belongs to).
fn sport(p: &[u8]) -> u16 {
    let ip = usize::from(p[0] & 0x0f) * 4;
    u16::from_be_bytes([p[ip], p[ip + 1]])
}

/// The TCP destination port of an IPv4 packet.
fn dport(p: &[u8]) -> u16 {
    let ip = usize::from(p[0] & 0x0f) * 4;
    u16::from_be_bytes([p[ip + 2], p[ip + 3]])
}

/// What went to the TUN before `p`, in bytes of IP packets.
fn bytes_ahead_of(out: &Out, p: &[u8]) -> usize {
    let at = out
        .tun
        .iter()
        .position(|q| q == p)
        .expect("the packet went out");
    out.tun[..at].iter().map(Vec::len).sum()
}

#[test]
fn a_small_flows_packet_goes_ahead_of_bulk_flows_super_packets_in_one_burst() {
    let mut rig = Rig::client();
    rig.engine.set_tun_offload(TunOffload {
        tcp: true,
        udp: false,
    });
    for port in [40000, 40001] {
        assert_eq!(rig.tun_in(&tcp(TECH, port, PLC, 101)).far.len(), 1);
    }
    let ask = udp(TECH, 5000, PLC, 102, b"read coil 7");
    assert_eq!(rig.tun_in(&ask).far.len(), 1);
    // One burst of datagrams from the site: two bulk flows' super-packets (~1 MB) toward the
    // technician, the device's answer to the interactive request late in it, then more bulk.
    let answer = udp(PLC, 102, TECH, 5000, b"coil 7 = 1");
    let mut bulk: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
    for i in 0..10usize {
        for port in [40000u16, 40001] {
            let len = 60_000 + 100 * i + usize::from(port - 40000);
            let (sp, o) = gso::build::tcp_v4(PLC, 101, TECH, port, len, 1380);
            rig.site_burst(A, &sp, &o.to_trailer());
            bulk.entry(port).or_default().push(sp);
        }
        if i == 7 {
            rig.site_burst(A, &answer, &[]);
        }
    }
    let out = rig.pump();
    assert_eq!(out.tun.len(), 21, "everything went out");
    // Behind no super-packet: a flow with nothing queued goes first.
    let ahead = bytes_ahead_of(&out, &answer);
    assert!(ahead <= QUANTUM, "{ahead} bytes of bulk went first");
    // Each flow's packets in the order they came.
    for (port, sent) in &bulk {
        let got: Vec<&Vec<u8>> = out
            .tun
            .iter()
            .filter(|p| p[9] == PROTO_TCP && dport(p) == *port)
            .collect();
        assert_eq!(
            got,
            sent.iter().collect::<Vec<_>>(),
            "flow {port} reordered"
        );
    }
}

#[test]
fn without_offload_a_small_flows_packet_waits_for_at_most_one_packet_per_bulk_flow() {
    let mut rig = Rig::client();
    let flows = [40000u16, 40001, 40002, 40003];
    for port in flows {
        assert_eq!(rig.tun_in(&tcp(TECH, port, PLC, 101)).far.len(), 1);
    }
    let ask = udp(TECH, 5000, PLC, 102, b"read coil 7");
    assert_eq!(rig.tun_in(&ask).far.len(), 1);
    // MTU-size segments of four bulk flows from the site, 64 each, then the device's answer.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for i in 0..64u8 {
        for port in flows {
            let mut p = tcp_ack(PLC, 101, TECH, port);
            // A payload that tells the segments apart (the filter reads only the headers).
            p.extend(std::iter::repeat_n(i, 1380));
            let total = u16::try_from(p.len()).expect("len");
            p[2..4].copy_from_slice(&total.to_be_bytes());
            rig.site_burst(A, &p, &[]);
            sent.push(p);
        }
    }
    let answer = udp(PLC, 102, TECH, 5000, b"coil 7 = 1");
    rig.site_burst(A, &answer, &[]);
    let out = rig.pump();
    assert_eq!(out.tun.len(), sent.len() + 1);
    let ahead = bytes_ahead_of(&out, &answer);
    assert!(
        ahead <= flows.len() * 1420,
        "{ahead} bytes of bulk went first"
    );
    for port in flows {
        let got: Vec<&Vec<u8>> = out
            .tun
            .iter()
            .filter(|p| p[9] == PROTO_TCP && dport(p) == port)
            .collect();
        let want: Vec<&Vec<u8>> = sent.iter().filter(|p| dport(p) == port).collect();
        assert_eq!(got, want, "flow {port} reordered");
    }
}

#[test]
fn messages_into_a_tunnel_leave_in_the_order_they_were_encrypted() {
    // A tunnel that agreed no super-packets: one burst of two bulk flows' super-packets is cut
    // into ~2 800 segments, each its own WireGuard message, and an interactive request comes
    // last. Were the messages reordered by flow, the far end (real boringtun) would drop those
    // more than its replay window (1 024) below the highest counter it has seen.
    let mut rig = Rig::client();
    rig.engine
        .set_tunnel_offload(A, TunnelOffload::default())
        .expect("tunnel");
    for port in [40000, 40001] {
        assert_eq!(rig.tun_in(&tcp(TECH, port, PLC, 101)).far.len(), 1);
    }
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for port in [40000u16, 40001] {
        for _ in 0..32 {
            let (sp, o) = gso::build::tcp_v4(TECH, port, PLC, 101, 60_000, 1380);
            rig.tun_burst(&sp, o);
            sent.push(sp);
        }
    }
    let request = udp(TECH, 5000, PLC, 102, b"read coil 7");
    rig.tun_burst(&request, Offload::NONE);
    let out = rig.pump();
    let segments = 64 * 60_000usize.div_ceil(1380);
    assert_eq!(out.far.len(), segments + 1, "every message decrypted");
    assert_eq!(out.far.last().map(|(_, p)| p), Some(&request));
    for port in [40000u16, 40001] {
        let got: Vec<u8> = out
            .far
            .iter()
            .filter(|(_, p)| p[9] == PROTO_TCP && sport(p) == port)
            .flat_map(|(_, p)| payload_of(p).to_vec())
            .collect();
        let want: Vec<u8> = sent
            .iter()
            .filter(|p| sport(p) == port)
            .flat_map(|p| payload_of(p).to_vec())
            .collect();
        assert_eq!(got, want, "flow {port}");
    }
}
