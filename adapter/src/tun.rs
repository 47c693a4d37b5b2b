//! TUN devices (Linux, tun-rs): the client's `pinhole0` and the site's `pinhole-site0`.
//!
//! Devices are never persistent: when the process exits, even by `kill -9`, the kernel removes
//! the device and every route through it.

use std::io;
use std::net::Ipv4Addr;

/// The TUN MTU. Inner packets leave the site onto the device network, an Ethernet with an MTU
/// of 1500, so the TUN must not exceed that for the site never to fragment. 1420 is WireGuard's
/// own figure (1500 − 40 IPv6 header − 8 UDP − 32 WireGuard overhead): it leaves room for a
/// later direct-UDP transport over IPv6 without changing what hosts see, and costs 5 % of
/// payload per full-size packet. The TLS links carry the datagrams as a byte stream, so the
/// relay path adds no limit of its own.
pub const MTU: u16 = 1420;

/// Packets taken from a TUN in one go after a wake-up: a burst is encrypted and written to the
/// TLS link as one write (fewer syscalls and TLS records) instead of one write per packet.
/// 64 full-size packets are about 90 KB, a few TLS records.
pub const BATCH: usize = 64;

/// A TUN device.
pub struct Tun {
    dev: tun_rs::AsyncDevice,
    name: String,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

impl Tun {
    /// Creates `name` with `addr/prefix`, brings it up.
    pub fn create(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<Self> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(addr, prefix, None)
            .mtu(MTU)
            .build_async()?;
        let name = dev.name()?;
        Ok(Self { dev, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel's interface index (for routes).
    pub fn index(&self) -> io::Result<u32> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.name))?;
        text.trim()
            .parse()
            .map_err(|_| io::Error::other("bad ifindex"))
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }

    pub async fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.dev.send(buf).await
    }

    /// A packet if one is waiting, without blocking (`WouldBlock` otherwise): lets a reader
    /// drain a burst and hand it on in one batch.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.try_recv(buf)
    }
}

/// Reads from the TUN if there is one; without one, waits forever (a `select!` branch that
/// never fires).
pub async fn recv_or_wait(tun: Option<&Tun>, buf: &mut [u8]) -> io::Result<usize> {
    match tun {
        Some(t) => t.recv(buf).await,
        None => std::future::pending().await,
    }
}
