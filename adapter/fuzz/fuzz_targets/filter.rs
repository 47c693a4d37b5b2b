//! Arbitrary bytes through a client engine with one site tunnel and one connected device, from
//! the TUN and (encrypted by the site's real WireGuard peer) from the tunnel: nothing may panic;
//! nothing but a parsed packet to the device goes into the tunnel; nothing comes out of the
//! tunnel onto the TUN unless something passed toward the device first (a flow, or the first
//! fragment of a datagram). Chunks are split at 0xA5; a chunk starting with 0x00 goes through
//! the tunnel, one starting with 0x01 is cut into fragments first.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pinhole_adapter::packet::{self, Parsed, build};
use pinhole_adapter::wg::{self, Decapsulated, Keypair, Peer};
use pinhole_adapter::{Dest, Engine, Side, TunnelId};
use pinhole_proto::Port;

const TECH: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
const DEVICE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10));
const SITE: TunnelId = TunnelId(1);

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let local = Keypair::from_secret([1; 32]);
    let remote = Keypair::from_secret([2; 32]);
    let mut engine = Engine::new(Side::Client { address: TECH, any_source: false });
    let peer = Peer::new(&local, &remote.public_hex(), 1).expect("peer");
    engine.add_tunnel(SITE, peer, None).expect("tunnel");
    engine
        .connect(SITE, "plc", DEVICE, [Port::tcp(102), Port::udp(161)].into_iter().collect())
        .expect("device");
    let mut site = Peer::new(&remote, &local.public_hex(), 2).expect("site");
    let mut buf = vec![0u8; wg::BUFFER];
    engine.initiate(SITE);
    let mut passed_forward = false;
    let mut pump = |engine: &mut Engine, site: &mut Peer, passed_forward: &mut bool, now: Instant| {
        while let Some(t) = engine.poll_transmit() {
            match t.dest {
                Dest::Tunnel(_) => match site.decapsulate(&t.bytes, &mut buf) {
                    Decapsulated::Packet(p) => {
                        *passed_forward = true;
                        match packet::parse(p) {
                            Ok(Parsed::Whole(s)) => assert_eq!(s.dst, DEVICE),
                            other => panic!("a non-packet passed: {other:?}"),
                        }
                    }
                    Decapsulated::Send(d) => {
                        let d = d.to_vec();
                        engine.handle_datagram(SITE, &d, now);
                        while let Some(d) = site.flush(&mut buf) {
                            let d = d.to_vec();
                            engine.handle_datagram(SITE, &d, now);
                        }
                    }
                    Decapsulated::Nothing => {}
                },
                Dest::Tun => {
                    // Local answers toward the technician are fine; anything else needs a flow.
                    let local_answer = matches!(packet::parse(&t.bytes), Ok(Parsed::Whole(s)) if s.src == DEVICE && s.dst == TECH);
                    assert!(local_answer || *passed_forward, "reached the TUN without a flow");
                }
            }
            engine.recycle(t.bytes);
        }
    };
    pump(&mut engine, &mut site, &mut passed_forward, now);
    for chunk in data.split(|b| *b == 0xA5) {
        now += Duration::from_millis(100);
        match chunk.first() {
            Some(0) => {
                let mut out = vec![0u8; wg::BUFFER];
                if let Some(d) = site.encapsulate(&chunk[1..], &mut out) {
                    let d = d.to_vec();
                    engine.handle_datagram(SITE, &d, now);
                }
            }
            Some(1) if chunk.len() > 21 => {
                for f in build::fragments(&chunk[1..], 68) {
                    engine.handle_tun_packet(&f, now);
                }
            }
            _ => engine.handle_tun_packet(chunk, now),
        }
        engine.handle_timeout(now);
        pump(&mut engine, &mut site, &mut passed_forward, now);
    }
});
