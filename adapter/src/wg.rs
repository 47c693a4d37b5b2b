//! WireGuard peers (boringtun), end to end between client and site.
//!
//! WireGuard datagrams travel inside the TLS links as data frames, so there is no UDP socket
//! here: [`Peer`] turns IP packets into datagrams and back, and the caller moves the datagrams.
//! Keys are exchanged in the session messages, hex-encoded.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// WireGuard's overhead on a data message: 16-byte header and 16-byte authentication tag.
pub const OVERHEAD: usize = 32;

/// Output buffers hold the largest IP packet, its offload trailer ([`crate::gso::TRAILER`])
/// and the overhead (handshake messages are smaller).
pub const BUFFER: usize = 65_535 + crate::gso::TRAILER + OVERHEAD;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WgError {
    #[error("the peer's WireGuard key is not 32 hex-encoded bytes")]
    BadKey,
}

/// A WireGuard key pair. The secret is zeroed on drop by x25519-dalek.
pub struct Keypair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair({})", self.public_hex())
    }
}

impl Keypair {
    /// From 32 random bytes (the caller owns the randomness source).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.public.as_bytes())
    }
}

/// Parses a hex public key.
pub fn parse_public(hex_key: &str) -> Result<PublicKey, WgError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).map_err(|_| WgError::BadKey)?;
    Ok(PublicKey::from(bytes))
}

/// What feeding a datagram produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decapsulated<'a> {
    /// An inner IP packet (for the filter), and the rest of the decrypted plaintext after it
    /// (its IP total length): empty, or the offload trailer of [`crate::gso`].
    Packet { packet: &'a [u8], rest: &'a [u8] },
    /// A datagram to send back to the peer (a handshake response); call [`Peer::flush`] until
    /// it returns `None`, for the packets queued behind the handshake.
    Send(&'a [u8]),
    /// Nothing (a keepalive, or an invalid datagram).
    Nothing,
}

/// One WireGuard tunnel.
pub struct Peer {
    tunn: Box<Tunn>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

impl Peer {
    /// A tunnel from `local` to the peer with `remote` public key; `index` must be unique among
    /// this side's tunnels (boringtun uses it to tell sessions apart).
    pub fn new(local: &Keypair, remote: &str, index: u32) -> Result<Self, WgError> {
        let remote = parse_public(remote)?;
        // No persistent keepalive: the TLS links carry their own heartbeats.
        let tunn = Tunn::new(
            local.secret.clone(),
            remote,
            None,
            None,
            index & 0x00ff_ffff,
            None,
        );
        Ok(Self {
            tunn: Box::new(tunn),
        })
    }

    /// Encrypts an IP packet into `out` (at least the packet plus [`OVERHEAD`], and 148 bytes
    /// for a handshake). Returns the datagram to send, if any (before the handshake the packet
    /// is queued and a handshake initiation is returned instead).
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }

    /// Decrypts a datagram into `out` (at least as long as the datagram).
    ///
    /// boringtun decrypts a data message's whole plaintext to the start of `out` and returns it
    /// cut to the inner packet's IP total length; the plaintext is the datagram less
    /// WireGuard's 16-byte header and 16-byte tag (boringtun does not pad), so what follows the
    /// packet is `out[packet..datagram − OVERHEAD]`.
    pub fn decapsulate<'a>(&mut self, datagram: &[u8], out: &'a mut [u8]) -> Decapsulated<'a> {
        enum Got {
            Packet(usize),
            Send(usize, usize),
            Nothing,
        }
        let base = out.as_ptr() as usize;
        let got = match self.tunn.decapsulate(None, datagram, out) {
            TunnResult::WriteToNetwork(d) => Got::Send(d.as_ptr() as usize - base, d.len()),
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _)
                if p.as_ptr() as usize == base =>
            {
                Got::Packet(p.len())
            }
            _ => Got::Nothing,
        };
        match got {
            Got::Packet(n) => {
                let plain = datagram.len().saturating_sub(OVERHEAD).max(n);
                let (packet, rest) = out[..plain].split_at(n);
                Decapsulated::Packet { packet, rest }
            }
            Got::Send(at, n) => Decapsulated::Send(&out[at..at + n]),
            Got::Nothing => Decapsulated::Nothing,
        }
    }

    /// After [`Decapsulated::Send`]: the next datagram queued behind the handshake, if any.
    /// `out` must hold the largest packet plus overhead ([`BUFFER`]).
    pub fn flush<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }

    /// Drives the timers (handshake retries, rekeying); call every few hundred milliseconds.
    pub fn tick<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.update_timers(out) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }

    /// Starts the handshake now instead of waiting for the first packet.
    pub fn initiate<'a>(&mut self, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;

    fn key(b: u8) -> Keypair {
        Keypair::from_secret([b; 32])
    }

    /// Feeds `d` to `to`; returns the packets that came out and the datagrams for the other side.
    fn feed(to: &mut Peer, d: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut buf = vec![0u8; BUFFER];
        let (mut packets, mut back) = (Vec::new(), Vec::new());
        match to.decapsulate(d, &mut buf) {
            Decapsulated::Packet { packet, rest } => {
                assert!(rest.is_empty());
                packets.push(packet.to_vec())
            }
            Decapsulated::Send(r) => {
                back.push(r.to_vec());
                while let Some(r) = to.flush(&mut buf) {
                    back.push(r.to_vec());
                }
            }
            Decapsulated::Nothing => {}
        }
        (packets, back)
    }

    #[test]
    fn handshake_and_data_both_ways_in_memory() {
        let (a_key, b_key) = (key(1), key(2));
        let mut a = Peer::new(&a_key, &b_key.public_hex(), 1).expect("a");
        let mut b = Peer::new(&b_key, &a_key.public_hex(), 2).expect("b");
        let packet = build::udp(
            "100.64.0.2".parse().expect("ip"),
            5000,
            "192.168.0.10".parse().expect("ip"),
            161,
            b"hello plc",
        );
        let mut out = vec![0u8; BUFFER];
        // A's first packet is queued behind a handshake initiation.
        let init = a
            .encapsulate(&packet, &mut out)
            .expect("initiation")
            .to_vec();
        let (p, to_a) = feed(&mut b, &init);
        assert!(p.is_empty());
        assert_eq!(to_a.len(), 1, "handshake response");
        // A takes the response and sends its queued packet.
        let (p, to_b) = feed(&mut a, &to_a[0]);
        assert!(p.is_empty());
        assert!(!to_b.is_empty(), "the queued packet follows the handshake");
        let got: Vec<Vec<u8>> = to_b.iter().flat_map(|d| feed(&mut b, d).0).collect();
        assert_eq!(got, vec![packet]);
        // And back.
        let reply = build::udp(
            "192.168.0.10".parse().expect("ip"),
            161,
            "100.64.0.2".parse().expect("ip"),
            5000,
            b"hi",
        );
        let d = b.encapsulate(&reply, &mut out).expect("data").to_vec();
        assert_eq!(feed(&mut a, &d).0, vec![reply.clone()]);
        // What follows the IP packet in the plaintext comes out as the rest, and a 64 KiB
        // packet fits one message.
        let mut with = reply.clone();
        with.extend_from_slice(b"trailer");
        let d = b.encapsulate(&with, &mut out).expect("data").to_vec();
        let mut buf = vec![0u8; BUFFER];
        match a.decapsulate(&d, &mut buf) {
            Decapsulated::Packet { packet, rest } => {
                assert_eq!((packet, rest), (&reply[..], &b"trailer"[..]))
            }
            other => panic!("{other:?}"),
        }
        let (big, _) = crate::gso::build::tcp_v4(
            "192.168.0.10".parse().expect("ip"),
            161,
            "100.64.0.2".parse().expect("ip"),
            5000,
            65_535 - 40,
            1380,
        );
        let d = b.encapsulate(&big, &mut out).expect("data").to_vec();
        assert_eq!(feed(&mut a, &d).0, vec![big]);
    }

    #[test]
    fn tampered_and_foreign_datagrams_yield_nothing() {
        let (a_key, b_key, c_key) = (key(1), key(2), key(3));
        let mut a = Peer::new(&a_key, &b_key.public_hex(), 1).expect("a");
        let mut b = Peer::new(&b_key, &a_key.public_hex(), 2).expect("b");
        let mut c = Peer::new(&c_key, &b_key.public_hex(), 3).expect("c");
        let mut out = vec![0u8; BUFFER];
        let init = c.encapsulate(b"x", &mut out).expect("init").to_vec();
        assert_eq!(
            feed(&mut b, &init),
            (vec![], vec![]),
            "an unknown key gets no answer"
        );
        let mut init = a.encapsulate(b"x", &mut out).expect("init").to_vec();
        init[40] ^= 1;
        assert_eq!(feed(&mut b, &init), (vec![], vec![]));
        assert_eq!(feed(&mut b, b"garbage"), (vec![], vec![]));
        assert!(Peer::new(&a_key, "zz", 1).is_err());
    }
}
