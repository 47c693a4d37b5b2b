//! WireGuard peers (boringtun), end to end between client and site.
//!
//! WireGuard datagrams travel inside the TLS links as data frames, so there is no UDP socket
//! here: [`Peer`] turns IP packets into datagrams and back, and the caller moves the datagrams.
//! Keys are exchanged in the session messages, hex-encoded.

use std::net::IpAddr;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// WireGuard's overhead on a data message: 16-byte header and 16-byte authentication tag.
pub const OVERHEAD: usize = 32;

/// Output buffers hold the largest IP packet plus overhead (handshake messages are smaller).
pub const BUFFER: usize = 65_535 + OVERHEAD;

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
    /// An inner IP packet for the TUN (after the filter).
    Packet(&'a [u8], IpAddr),
    /// Nothing for the TUN (a handshake message, a keepalive, or an invalid datagram).
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

    /// Encrypts an IP packet. Returns the datagram to send, if any (before the handshake the
    /// packet is queued and a handshake initiation is returned instead).
    pub fn encapsulate<'a>(&mut self, packet: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
        match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => Some(d),
            _ => None,
        }
    }

    /// Decrypts a datagram. Datagrams that must go back to the peer (handshake responses,
    /// queued packets) are handed to `send`.
    pub fn decapsulate<'a>(
        &mut self,
        datagram: &[u8],
        out: &'a mut [u8],
        send: &mut dyn FnMut(&[u8]),
    ) -> Decapsulated<'a> {
        // boringtun answers on `out`; a WriteToNetwork must be flushed by calling again with an
        // empty datagram until it reports Done.
        let first = match self.tunn.decapsulate(None, datagram, out) {
            TunnResult::WriteToNetwork(d) => {
                send(d);
                None
            }
            TunnResult::WriteToTunnelV4(p, ip) => Some((p.len(), IpAddr::V4(ip))),
            TunnResult::WriteToTunnelV6(p, ip) => Some((p.len(), IpAddr::V6(ip))),
            TunnResult::Done | TunnResult::Err(_) => return Decapsulated::Nothing,
        };
        match first {
            Some((len, ip)) => Decapsulated::Packet(&out[..len], ip),
            None => {
                let mut scratch = vec![0u8; BUFFER];
                while let TunnResult::WriteToNetwork(d) =
                    self.tunn.decapsulate(None, &[], &mut scratch)
                {
                    send(d);
                }
                Decapsulated::Nothing
            }
        }
    }

    /// Drives the timers (handshake retries, rekeying); call every few hundred milliseconds.
    pub fn tick(&mut self, out: &mut [u8], send: &mut dyn FnMut(&[u8])) {
        if let TunnResult::WriteToNetwork(d) = self.tunn.update_timers(out) {
            send(d);
        }
    }

    /// Starts the handshake now instead of waiting for the first packet.
    pub fn initiate(&mut self, out: &mut [u8], send: &mut dyn FnMut(&[u8])) {
        if let TunnResult::WriteToNetwork(d) = self.tunn.format_handshake_initiation(out, false) {
            send(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Keypair {
        Keypair::from_secret([b; 32])
    }

    #[test]
    fn handshake_and_data_both_ways_in_memory() {
        let (a_key, b_key) = (key(1), key(2));
        let mut a = Peer::new(&a_key, &b_key.public_hex(), 1).expect("a");
        let mut b = Peer::new(&b_key, &a_key.public_hex(), 2).expect("b");
        let packet = crate::filter::packet::udp(
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
        let mut to_a = Vec::new();
        let mut buf = vec![0u8; BUFFER];
        assert_eq!(
            b.decapsulate(&init, &mut buf, &mut |d| to_a.push(d.to_vec())),
            Decapsulated::Nothing
        );
        assert_eq!(to_a.len(), 1, "handshake response");
        // A takes the response and sends its queued packet.
        let mut to_b = Vec::new();
        let response = to_a.remove(0);
        assert_eq!(
            a.decapsulate(&response, &mut buf, &mut |d| to_b.push(d.to_vec())),
            Decapsulated::Nothing
        );
        assert!(!to_b.is_empty(), "the queued packet follows the handshake");
        let mut got = None;
        for d in &to_b {
            if let Decapsulated::Packet(p, src) = b.decapsulate(d, &mut buf, &mut |_| {}) {
                got = Some((p.to_vec(), src));
            }
        }
        let (p, src) = got.expect("packet");
        assert_eq!(p, packet);
        assert_eq!(src, "100.64.0.2".parse::<IpAddr>().expect("ip"));
        // And back.
        let reply = crate::filter::packet::udp(
            "192.168.0.10".parse().expect("ip"),
            161,
            "100.64.0.2".parse().expect("ip"),
            5000,
            b"hi",
        );
        let d = b.encapsulate(&reply, &mut out).expect("data").to_vec();
        match a.decapsulate(&d, &mut buf, &mut |_| {}) {
            Decapsulated::Packet(p, _) => assert_eq!(p, reply),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tampered_and_foreign_datagrams_yield_nothing() {
        let (a_key, b_key, c_key) = (key(1), key(2), key(3));
        let mut a = Peer::new(&a_key, &b_key.public_hex(), 1).expect("a");
        let mut b = Peer::new(&b_key, &a_key.public_hex(), 2).expect("b");
        let mut c = Peer::new(&c_key, &b_key.public_hex(), 3).expect("c");
        let mut out = vec![0u8; BUFFER];
        let mut buf = vec![0u8; BUFFER];
        let init = c.encapsulate(b"x", &mut out).expect("init").to_vec();
        let mut sent = 0;
        assert_eq!(
            b.decapsulate(&init, &mut buf, &mut |_| sent += 1),
            Decapsulated::Nothing
        );
        assert_eq!(sent, 0, "an initiation from an unknown key gets no answer");
        let mut init = a.encapsulate(b"x", &mut out).expect("init").to_vec();
        init[40] ^= 1;
        assert_eq!(
            b.decapsulate(&init, &mut buf, &mut |_| sent += 1),
            Decapsulated::Nothing
        );
        assert_eq!(sent, 0);
        assert_eq!(
            b.decapsulate(b"garbage", &mut buf, &mut |_| sent += 1),
            Decapsulated::Nothing
        );
        assert!(Peer::new(&a_key, "zz", 1).is_err());
    }
}
