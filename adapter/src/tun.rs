//! TUN devices (Linux, tun-rs): the client's `pinhole0` and the site's `pinhole-site0`.
//!
//! Devices are never persistent: when the process exits, even by `kill -9`, the kernel removes
//! the device and every route through it.

use std::io::{self, IoSlice};
use std::net::Ipv4Addr;

use crate::gso::{self, Offload, TunOffload};

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

/// The buffer a TUN read needs: the `virtio_net_hdr`, the largest (super-)packet, and room
/// after it for the offload trailer the engine appends ([`crate::Engine::handle_tun_offload`]).
pub const RECV_BUFFER: usize = gso::VNET_HDR + gso::MAX_PACKET + gso::TRAILER;

/// A TUN device.
pub struct Tun {
    dev: tun_rs::AsyncDevice,
    name: String,
    offload: TunOffload,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
}

impl Tun {
    /// Creates `name` with `addr/prefix`, brings it up, with offload (`IFF_VNET_HDR`,
    /// `TUNSETOFFLOAD` TCP checksum and segmentation, and UDP segmentation where the kernel
    /// has it); where the kernel refuses offload, without (logged once at INFO).
    pub fn create(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<Self> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .ipv4(addr, prefix, None)
                .mtu(MTU)
                .offload(offload)
                .build_async()
        };
        let (dev, offload) = match build(true) {
            Ok(dev) => {
                let offload = TunOffload {
                    tcp: dev.tcp_gso(),
                    udp: dev.udp_gso(),
                };
                (dev, offload)
            }
            Err(e) => {
                tracing::info!(tun = name, error = %e, "no TUN offload here; packets go one by one");
                (build(false)?, TunOffload::default())
            }
        };
        let name = dev.name()?;
        Ok(Self { dev, name, offload })
    }

    /// What the device takes and gives with offload (nothing without: whole packets only).
    pub fn offload(&self) -> TunOffload {
        self.offload
    }

    /// Bytes of `virtio_net_hdr` before every packet read from or written to this device.
    pub fn header_len(&self) -> usize {
        if self.offload.tcp { gso::VNET_HDR } else { 0 }
    }

    /// Splits what a read returned (`buf[..n]`) into its offload metadata and where the packet
    /// starts; `None` for a read too short to hold the header.
    pub fn split(&self, buf: &[u8], n: usize) -> Option<(Offload, usize)> {
        let h = self.header_len();
        if h == 0 {
            return Some((Offload::NONE, 0));
        }
        let hdr: &[u8; gso::VNET_HDR] = buf.get(..h)?.try_into().ok()?;
        (n > h).then(|| (Offload::from_vnet(hdr), h))
    }

    /// Writes a packet with its offload metadata (which must be [`Offload::NONE`] on a device
    /// without offload), header and packet in one write without a copy.
    pub async fn send_packet(&self, packet: &[u8], offload: Offload) -> io::Result<usize> {
        if self.header_len() == 0 {
            return self.dev.send(packet).await;
        }
        let hdr = offload.to_vnet();
        let bufs = [IoSlice::new(&hdr), IoSlice::new(packet)];
        self.dev.send_vectored(&bufs).await
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

    /// Gives `engine` what one read returned (`buf[..n]`, `buf` of [`RECV_BUFFER`] bytes):
    /// with offload, the packet after its `virtio_net_hdr`, with the metadata.
    pub fn feed(
        &self,
        engine: &mut crate::Engine,
        buf: &mut [u8],
        n: usize,
        now: std::time::Instant,
    ) {
        if self.header_len() == 0 {
            return engine.handle_tun_packet(&buf[..n], now);
        }
        if let Some((offload, at)) = self.split(buf, n) {
            engine.handle_tun_offload(&mut buf[at..], n - at, offload, now);
        }
    }

    /// Reads one packet; with offload, `buf` starts with its `virtio_net_hdr` (see
    /// [`Tun::split`]).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
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
