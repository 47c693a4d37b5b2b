//! The tunnel engine: every per-packet decision of the client and the site, pure.
//!
//! How to drive it: create one [`Engine`] per side ([`Side::Client`] with the technician's
//! tunnel address, or [`Side::Site`]); add a tunnel per WireGuard peer ([`Engine::add_tunnel`]:
//! per site at the client, per technician session at the site) and the agents connected through
//! it ([`Engine::connect`]). Feed it what the TUN reads ([`Engine::handle_tun_packet`]), what the
//! peer's datagrams carry ([`Engine::handle_datagram`]) and a timer every [`TICK`]
//! ([`Engine::handle_timeout`]), each with `now`. Then take [`Transmit`]s from
//! [`Engine::poll_transmit`] — packets for the TUN, datagrams for a tunnel — write them, and give
//! the buffers back with [`Engine::recycle`]. Nothing here does I/O or reads the clock.
//!
//! What waits to be written is handed out flow by flow ([`sched`]: deficit round robin by
//! 5-tuple, a flow with nothing queued first), so that a request of an interactive protocol
//! read late in a burst is not written behind a bulk transfer's megabytes; one flow's packets
//! keep their order.
//!
//! Per packet: one parse ([`crate::packet`]); IPv4 fragments reassembled under bounds
//! ([`crate::defrag`]) and judged whole; then the checks, by direction:
//!
//! * **toward a device** (client: from the TUN; site: decrypted): at the client the source is
//!   the tunnel address and the destination picks the tunnel (cryptokey routing); at the site
//!   the source must be the session's tunnel address (else `wrong-tunnel`). The destination is a
//!   connected device, the (protocol, port) in the union of its agents' ports; TCP opens a flow
//!   on SYN only; UDP and ICMP echo open or refresh one; an ICMP error passes if it quotes a
//!   live flow.
//! * **toward the technician** (client: decrypted; site: from the TUN): only replies on a live
//!   flow, from a device of *this* tunnel (else `wrong-tunnel` at the client), and ICMP errors
//!   (unreachable, fragmentation needed, packet too big, time exceeded, parameter problem) that
//!   quote such a flow, whichever router sent them.
//!
//! A packet the client refuses toward a connected device (a port no agent allows, a protocol)
//! is answered on the TUN at once, rate-limited: a TCP RST, or ICMP administratively
//! prohibited; the device's counters keep what it refused. Every drop is counted by reason.
//!
//! With TUN offload ([`crate::gso`]), a super-packet read from the TUN
//! ([`Engine::handle_tun_offload`]) is judged by its one IP + L4 header (its segments share
//! it, so checking it is checking each segment's) and sent as one WireGuard message with its
//! metadata in an encrypted trailer. One that arrives is checked against its metadata before
//! the filter ([`crate::gso::Offload::validate`], else `bad-offload`) and given to the TUN
//! whole, with its metadata in [`Transmit::offload`]; a TUN without offload
//! ([`Engine::set_tun_offload`]) gets its segments, cut here, with their checksums complete.
//!
//! Whether a tunnel carries super-packets is agreed per tunnel ([`Engine::set_tunnel_offload`],
//! from the session messages: see `pinhole_proto::message`): a super-packet goes into a tunnel
//! whole only if its peer announced that it takes them, the gateway relays datagrams of its
//! size, and this end announced it too; otherwise it is cut into its MTU-size segments
//! (checksums complete, no trailer) before encryption, by the same cutter a TUN without
//! offload gets. A tunnel on which this end did not announce offload takes no trailer: bytes
//! after the IP packet are dropped as `bad-offload`. A new tunnel has agreed nothing.
//!
//! A tunnel can be *held* ([`Engine::hold`]): what its datagrams carry toward the TUN is kept
//! back, in order and bounded ([`HOLD_PACKETS`], [`HOLD_BYTES`]; beyond them dropped as
//! `hold-full`), until [`Engine::release`] queues it for the TUN; a tunnel removed while held
//! drops it (`held-discarded`). Its handshakes, keepalives and what goes the other way are not
//! held. The site holds a new session until its firewall table is loaded.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use pinhole_proto::Port;

use crate::defrag::{Added, Defrag};
use crate::filter::{Device, DropReason, FlowKey, Flows};
use crate::gso::{self, Offload, TunOffload};
use crate::packet::{self, L4, Parsed, Summary};
use crate::wg::{self, Decapsulated, Peer};
use sched::{NO_FLOW, Sched, flow_key};

/// How often [`Engine::handle_timeout`] should run: WireGuard's timers have a granularity of a
/// quarter second, and flow and fragment expiry need no finer.
pub const TICK: Duration = Duration::from_millis(250);

/// Local answers (RST, administratively prohibited): at most this many per second, in bursts of
/// [`ANSWER_BURST`] — Linux's own ICMP rate limit (`icmp_msgs_per_sec` 1000), so that a scan
/// through the tunnel is answered like a host would and a flood cannot turn into one.
pub const ANSWERS_PER_SECOND: u64 = 1000;
pub const ANSWER_BURST: u64 = 100;

/// What each flow may send per round of the output's deficit round robin, in bytes of
/// datagrams (or packets): one MTU-size packet and its WireGuard overhead.
pub const QUANTUM: usize = 1600;
/// A held tunnel ([`Engine::hold`]) keeps at most this many packets toward the TUN; more are
/// dropped (`hold-full`). A connect's first packets are a SYN or a few datagrams: this leaves
/// room for a burst while a site's firewall table loads (a few ms, tens under load).
pub const HOLD_PACKETS: usize = 128;

/// ... and at most this many bytes of them (whole IP packets; a GSO super-packet counts whole).
pub const HOLD_BYTES: usize = 256 * 1024;

/// WireGuard handshake messages are at most 148 bytes.
const HANDSHAKE: usize = 148;

/// A tunnel: the session id the gateway gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelId(pub u32);

impl std::fmt::Display for TunnelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which end of the tunnels this engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The technician's computer: `address` is its tunnel address. With `any_source`, packets
    /// from the TUN may carry another source (a VM or container behind the laptop routed into
    /// the tunnel, by explicit choice); replies are then accepted for any destination.
    Client { address: IpAddr, any_source: bool },
    /// The site: each tunnel carries one technician, whose tunnel address it names.
    Site,
}

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Tun,
    Tunnel(TunnelId),
}

/// A packet to write to the TUN or a datagram to send through a tunnel.
#[must_use = "a transmit must be written (and its buffer recycled)"]
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dest: Dest,
    pub bytes: Vec<u8>,
    /// For the TUN: the packet's offload metadata, to write as its `virtio_net_hdr`
    /// ([`Offload::NONE`] for a whole packet; never anything else unless the TUN has offload).
    /// For a tunnel: always [`Offload::NONE`].
    pub offload: Offload,
}

impl Transmit {
    fn new(dest: Dest, bytes: Vec<u8>) -> Self {
        Self {
            dest,
            bytes,
            offload: Offload::NONE,
        }
    }
}

/// What the two ends of one tunnel, and the gateway between them, agreed about super-packets
/// (the trailer of [`crate::gso`]). The default agrees nothing: every packet goes into the
/// tunnel as a whole packet within the MTU, and a trailer that arrives is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunnelOffload {
    /// `Some(max)`: the peer takes super-packets with their trailer, and every hop on the path
    /// forwards WireGuard messages of up to `max` bytes (WireGuard's 32 bytes of overhead
    /// included); a super-packet whose message would be larger is cut. `None`: the peer (or
    /// the relay) did not announce offload, so every super-packet is cut into its segments.
    pub send: Option<usize>,
    /// This end announced, for this tunnel, that it takes super-packets: a trailer that
    /// arrives is validated and used. Without, anything after the IP packet is malformed.
    pub receive: bool,
}

impl TunnelOffload {
    /// Both ways, at the largest message this build sends: the inner packet at most
    /// [`gso::MAX_PACKET`] bytes with its [`gso::TRAILER`], plus WireGuard's overhead.
    pub const FULL: TunnelOffload = TunnelOffload {
        send: Some(gso::MAX_PACKET + gso::TRAILER + wg::OVERHEAD),
        receive: true,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("tunnel {0} exists already")]
    TunnelExists(TunnelId),
    #[error("no tunnel {0}")]
    NoTunnel(TunnelId),
    #[error("a site tunnel needs the technician's tunnel address")]
    NoRemote,
    #[error("tunnel address {0} already has a tunnel here")]
    AddressInUse(IpAddr),
    #[error("{device} is a device of tunnel {tunnel} already")]
    DeviceOfAnotherTunnel { device: IpAddr, tunnel: TunnelId },
}

struct Tunnel {
    peer: Peer,
    /// At the site: the technician's tunnel address.
    remote: Option<IpAddr>,
    devices: BTreeMap<IpAddr, Device>,
    flows: Flows,
    /// Fragments decrypted from the tunnel, and fragments read from the TUN for it.
    defrag_in: Defrag,
    defrag_out: Defrag,
    bytes_in: u64,
    bytes_out: u64,
    offload: TunnelOffload,
    /// While held: the packets toward the TUN, in order, not yet released.
    held: Option<Held>,
}

/// A held tunnel's packets toward the TUN and their bytes.
#[derive(Debug, Default)]
struct Held {
    /// With their flows ([`sched`]).
    packets: VecDeque<(u64, Transmit)>,
    bytes: usize,
}

/// A token bucket for local answers.
#[derive(Debug)]
struct RateLimit {
    tokens: u64,
    last: Option<Instant>,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        let last = *self.last.get_or_insert(now);
        let refill =
            now.saturating_duration_since(last).as_millis() as u64 * ANSWERS_PER_SECOND / 1000;
        if refill > 0 {
            self.tokens = (self.tokens + refill).min(ANSWER_BURST);
            self.last = Some(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Both sides' data plane. See the module documentation for how to drive it.
pub struct Engine {
    side: Side,
    tunnels: BTreeMap<TunnelId, Tunnel>,
    /// Client: device → its tunnel. Site: technician's tunnel address → its tunnel.
    owners: HashMap<IpAddr, TunnelId>,
    answers: RateLimit,
    /// What to write, by flow ([`sched`]).
    out: Sched,
    /// Keys the flow hash: per engine, so that nobody can choose packets whose flows collide.
    hasher: std::collections::hash_map::RandomState,
    pool: Vec<Vec<u8>>,
    tun_offload: TunOffload,
    drops: BTreeMap<DropReason, u64>,
    passed: u64,
    answered: u64,
    offload_counters: OffloadCounters,
    /// How many tunnels are held (none: the per-datagram path skips the hold).
    holding: usize,
}

/// How many GSO super-packets (packets with [`gso::Offload`] metadata that a TUN cuts into
/// segments) passed the filter each way, and their bytes (IP packets, headers included):
/// whether offload works end to end, and how large the super-packets are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadCounters {
    /// Super-packets read from the TUN and sent into a tunnel whole.
    pub sent: u64,
    /// Their bytes.
    pub sent_bytes: u64,
    /// Super-packets read from the TUN and cut into their segments before encryption, because
    /// the tunnel's peer or the relay did not announce offload ([`TunnelOffload`]).
    pub split: u64,
    /// Super-packets that arrived from a tunnel, metadata validated, and went to the TUN.
    pub received: u64,
    /// Their bytes.
    pub received_bytes: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("side", &self.side)
            .field("tunnels", &self.tunnels.len())
            .finish_non_exhaustive()
    }
}

/// Buffers kept for reuse: a burst's worth.
const POOL: usize = 256;

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToDevice,
    ToTechnician,
}

impl Engine {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            tunnels: BTreeMap::new(),
            owners: HashMap::new(),
            answers: RateLimit {
                tokens: ANSWER_BURST,
                last: None,
            },
            out: Sched::default(),
            hasher: std::collections::hash_map::RandomState::new(),
            pool: Vec::new(),
            tun_offload: TunOffload::default(),
            drops: BTreeMap::new(),
            passed: 0,
            answered: 0,
            offload_counters: OffloadCounters::default(),
            holding: 0,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    /// What the TUN this engine writes to takes: with offload, super-packets and partial
    /// checksums go to it whole; without (the default), they are cut and completed here.
    pub fn set_tun_offload(&mut self, offload: TunOffload) {
        self.tun_offload = offload;
    }

    /// Adds a tunnel. At the site, `remote` is the technician's tunnel address (one tunnel per
    /// address); at the client it is `None`.
    pub fn add_tunnel(
        &mut self,
        id: TunnelId,
        peer: Peer,
        remote: Option<IpAddr>,
    ) -> Result<(), EngineError> {
        if self.tunnels.contains_key(&id) {
            return Err(EngineError::TunnelExists(id));
        }
        if self.side == Side::Site {
            let addr = remote.ok_or(EngineError::NoRemote)?;
            if self.owners.contains_key(&addr) {
                return Err(EngineError::AddressInUse(addr));
            }
            self.owners.insert(addr, id);
        }
        self.tunnels.insert(
            id,
            Tunnel {
                peer,
                remote,
                devices: BTreeMap::new(),
                flows: Flows::default(),
                defrag_in: Defrag::new(),
                defrag_out: Defrag::new(),
                bytes_in: 0,
                bytes_out: 0,
                offload: TunnelOffload::default(),
                held: None,
            },
        );
        Ok(())
    }

    /// What tunnel `id`'s ends and relay agreed about super-packets (see [`TunnelOffload`]);
    /// a new tunnel has agreed nothing. Errors: [`EngineError::NoTunnel`].
    pub fn set_tunnel_offload(
        &mut self,
        id: TunnelId,
        offload: TunnelOffload,
    ) -> Result<(), EngineError> {
        let t = self.tunnels.get_mut(&id).ok_or(EngineError::NoTunnel(id))?;
        t.offload = offload;
        Ok(())
    }

    /// Removes a tunnel with its devices and flows; returns the devices it had. Packets it
    /// held are dropped (`held-discarded`).
    pub fn remove_tunnel(&mut self, id: TunnelId) -> Vec<IpAddr> {
        let Some(mut t) = self.tunnels.remove(&id) else {
            return Vec::new();
        };
        self.owners.retain(|_, owner| *owner != id);
        if let Some(held) = t.held.take() {
            self.holding -= 1;
            let n = held.packets.len() as u64;
            if n > 0 {
                self.drop_packet(DropReason::HeldDiscarded, n);
            }
            for (_, p) in held.packets {
                self.recycle(p.bytes);
            }
        }
        t.devices.into_keys().collect()
    }

    /// Holds tunnel `id`: from now on, the packets its datagrams carry toward the TUN (those
    /// the filter passed) are kept back until [`Engine::release`], at most [`HOLD_PACKETS`]
    /// packets and [`HOLD_BYTES`] bytes (more are dropped, `hold-full`). Handshakes,
    /// keepalives and packets toward the tunnel go on as before. Returns false if there is no
    /// such tunnel; holding a held tunnel changes nothing.
    pub fn hold(&mut self, id: TunnelId) -> bool {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return false;
        };
        if t.held.is_none() {
            t.held = Some(Held::default());
            self.holding += 1;
        }
        true
    }

    /// Ends tunnel `id`'s hold: what it held is queued for the TUN, in the order it came,
    /// before anything that arrives later. Returns how many packets were held (0 if the tunnel
    /// was not held or does not exist).
    pub fn release(&mut self, id: TunnelId) -> usize {
        let Some(held) = self.tunnels.get_mut(&id).and_then(|t| t.held.take()) else {
            return 0;
        };
        self.holding -= 1;
        let n = held.packets.len();
        for (flow, tx) in held.packets {
            self.out.push(flow, tx);
        }
        n
    }

    /// Whether tunnel `id` is held ([`Engine::hold`]).
    pub fn is_held(&self, id: TunnelId) -> bool {
        self.tunnels.get(&id).is_some_and(|t| t.held.is_some())
    }

    /// Puts what tunnel `id`'s datagram produced (`got`, with flows, in order) into its hold
    /// if it is held, bounded; what goes elsewhere is queued as usual.
    fn hold_new(&mut self, id: TunnelId, got: Vec<(u64, Transmit)>) {
        let mut full = 0u64;
        let mut held = self.tunnels.get_mut(&id).and_then(|t| t.held.as_mut());
        for (flow, tx) in got {
            let Some(held) = held.as_mut().filter(|_| tx.dest == Dest::Tun) else {
                self.out.push(flow, tx);
                continue;
            };
            if held.packets.len() >= HOLD_PACKETS || held.bytes + tx.bytes.len() > HOLD_BYTES {
                full += 1;
                if self.pool.len() < POOL {
                    self.pool.push(tx.bytes);
                }
            } else {
                held.bytes += tx.bytes.len();
                held.packets.push_back((flow, tx));
            }
        }
        if full > 0 {
            self.drop_packet(DropReason::HoldFull, full);
        }
    }

    /// Connects `agent` (its `ports` of `device`) through tunnel `id`: the device's allowed set
    /// grows by them. At the client a device belongs to one tunnel only.
    pub fn connect(
        &mut self,
        id: TunnelId,
        agent: &str,
        device: IpAddr,
        ports: BTreeSet<Port>,
    ) -> Result<(), EngineError> {
        if let Side::Client { .. } = self.side
            && let Some(&owner) = self.owners.get(&device)
            && owner != id
        {
            return Err(EngineError::DeviceOfAnotherTunnel {
                device,
                tunnel: owner,
            });
        }
        let t = self.tunnels.get_mut(&id).ok_or(EngineError::NoTunnel(id))?;
        t.devices.entry(device).or_default().connect(agent, ports);
        if let Side::Client { .. } = self.side {
            self.owners.insert(device, id);
        }
        Ok(())
    }

    /// Disconnects `agent` from tunnel `id`: only its ports go (and the flows on them). If the
    /// tunnel is held, what it held is dropped (`held-discarded`): it was let through while the
    /// agent was connected. Returns the device if this was its last agent (the caller removes
    /// the host route).
    pub fn disconnect(&mut self, id: TunnelId, agent: &str) -> Option<IpAddr> {
        let t = self.tunnels.get_mut(&id)?;
        let device = t
            .devices
            .iter_mut()
            .find_map(|(ip, d)| d.disconnect(agent).then_some(*ip))?;
        let gone = t.devices.get(&device).is_none_or(Device::is_empty);
        if gone {
            t.devices.remove(&device);
            if let Side::Client { .. } = self.side {
                self.owners.remove(&device);
            }
        }
        // What a held tunnel keeps was let through while the agent was connected: none of it
        // may reach a device after the agent is gone, and a hold does not tell agents apart.
        let discarded = t.held.as_mut().map(|h| {
            h.bytes = 0;
            std::mem::take(&mut h.packets)
        });
        let devices = &t.devices;
        t.flows.retain(|k| match devices.get(&k.device) {
            None => false,
            Some(d) => {
                !matches!(k.proto, packet::PROTO_TCP | packet::PROTO_UDP)
                    || d.allows(k.proto, k.device_port)
            }
        });
        if let Some(held) = discarded.filter(|p| !p.is_empty()) {
            self.drop_packet(DropReason::HeldDiscarded, held.len() as u64);
            for (_, p) in held {
                self.recycle(p.bytes);
            }
        }
        gone.then_some(device)
    }

    /// The tunnel that owns `addr` (client: a device; site: a technician's tunnel address).
    pub fn owner(&self, addr: &IpAddr) -> Option<TunnelId> {
        self.owners.get(addr).copied()
    }

    pub fn tunnels(&self) -> impl Iterator<Item = TunnelId> + '_ {
        self.tunnels.keys().copied()
    }

    /// The connected devices of a tunnel.
    pub fn devices(&self, id: TunnelId) -> impl Iterator<Item = (&IpAddr, &Device)> {
        self.tunnels.get(&id).into_iter().flat_map(|t| &t.devices)
    }

    /// Bytes of WireGuard datagrams received from and sent to a tunnel's peer.
    pub fn bytes(&self, id: TunnelId) -> (u64, u64) {
        self.tunnels
            .get(&id)
            .map_or((0, 0), |t| (t.bytes_in, t.bytes_out))
    }

    /// Drops by reason, packets passed, and local answers sent.
    pub fn counters(&self) -> (&BTreeMap<DropReason, u64>, u64, u64) {
        (&self.drops, self.passed, self.answered)
    }

    /// GSO super-packets that passed, each way.
    pub fn offload_counters(&self) -> OffloadCounters {
        self.offload_counters
    }

    /// Starts a tunnel's handshake now instead of at its first packet.
    pub fn initiate(&mut self, id: TunnelId) {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        let mut buf = take_len(&mut self.pool, HANDSHAKE);
        if let Some(d) = t.peer.initiate(&mut buf) {
            let n = d.len();
            buf.truncate(n);
            t.bytes_out += n as u64;
            self.out.push(NO_FLOW, Transmit::new(Dest::Tunnel(id), buf));
        }
    }

    /// The next packet or datagram to write: flows take turns ([`sched`]), a flow's own
    /// packets in their order.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop()
    }

    /// Bytes waiting in [`Engine::poll_transmit`]'s queue.
    pub fn queued_bytes(&self) -> usize {
        self.out.bytes()
    }

    /// Gives a written transmit's buffer back. Its contents stay: a buffer taken again at
    /// most this long is not zeroed again ([`take_len`]).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL {
            self.pool.push(buf);
        }
    }

    fn drop_packet(&mut self, reason: DropReason, n: u64) {
        *self.drops.entry(reason).or_default() += n;
    }

    /// A packet read from the TUN.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        self.tun_packet(packet, packet, Offload::NONE, now);
    }

    /// A packet read from a TUN with offload: `buf[..len]` is the packet (maybe a
    /// super-packet), `offload` the `virtio_net_hdr` it came with; `buf` has
    /// [`gso::TRAILER`] bytes of room after the packet, where the metadata is put to travel
    /// inside the WireGuard message.
    pub fn handle_tun_offload(
        &mut self,
        buf: &mut [u8],
        len: usize,
        offload: Offload,
        now: Instant,
    ) {
        let packet = &buf[..len];
        let offload = offload.normalize(packet);
        if offload.is_none() {
            return self.tun_packet(packet, packet, offload, now);
        }
        if buf.len() < len + gso::TRAILER
            || offload
                .validate(packet, usize::from(crate::tun::MTU))
                .is_err()
        {
            return self.drop_packet(DropReason::BadOffload, 1);
        }
        buf[len..len + gso::TRAILER].copy_from_slice(&offload.to_trailer());
        let (packet, wire) = (&buf[..len], &buf[..len + gso::TRAILER]);
        self.tun_packet(packet, wire, offload, now);
    }

    /// A packet from the TUN, and what to encrypt if it passes (the packet, and its offload
    /// trailer if it has metadata).
    fn tun_packet(&mut self, packet: &[u8], wire: &[u8], offload: Offload, now: Instant) {
        let parsed = match packet::parse(packet) {
            Ok(p) => p,
            Err(r) => return self.drop_packet(r, 1),
        };
        if !offload.is_none() && !matches!(parsed, Parsed::Whole(_)) {
            return self.drop_packet(DropReason::BadOffload, 1);
        }
        if let Side::Client {
            address,
            any_source: false,
        } = self.side
            && parsed.src() != address
        {
            return self.drop_packet(DropReason::WrongSource, 1);
        }
        let Some(&id) = self.owners.get(&parsed.dst()) else {
            let reason = match self.side {
                Side::Client { .. } => DropReason::NotConnected,
                Side::Site => DropReason::NoFlow,
            };
            return self.drop_packet(reason, 1);
        };
        self.handle_parsed(id, packet, wire, offload, parsed, true, now);
    }

    /// A datagram from tunnel `id`'s peer. It is decrypted into a pooled buffer that goes to
    /// the TUN as it is when the packet passes (no copy), or into the tunnel's hold while it
    /// is held ([`Engine::hold`]).
    pub fn handle_datagram(&mut self, id: TunnelId, datagram: &[u8], now: Instant) {
        if self.holding == 0 {
            return self.datagram(id, datagram, now);
        }
        self.out.capture();
        self.datagram(id, datagram, now);
        let got = self.out.captured();
        self.hold_new(id, got);
    }

    fn datagram(&mut self, id: TunnelId, datagram: &[u8], now: Instant) {
        enum Got {
            Packet(usize, Result<(Offload, Parsed), DropReason>),
            Send(usize, usize),
            Nothing,
        }
        let Some(t) = self.tunnels.get_mut(&id) else {
            return self.drop_packet(DropReason::NoTunnel, 1);
        };
        t.bytes_in += datagram.len() as u64;
        let mut buf = take_len(&mut self.pool, datagram.len().max(HANDSHAKE));
        let base = buf.as_ptr() as usize;
        let receive = t.offload.receive;
        let got = match t.peer.decapsulate(datagram, &mut buf) {
            Decapsulated::Packet { packet: p, rest } => {
                let trailer = if rest.is_empty() || receive {
                    Offload::from_trailer(rest)
                } else {
                    // Not announced here: a conforming peer sends no trailer.
                    Err(DropReason::BadOffload)
                };
                let checked = trailer.and_then(|offload| {
                    let parsed = packet::parse(p)?;
                    if !offload.is_none() {
                        if !matches!(parsed, Parsed::Whole(_)) {
                            return Err(DropReason::BadOffload);
                        }
                        offload.validate(p, usize::from(crate::tun::MTU))?;
                    }
                    Ok((offload, parsed))
                });
                Got::Packet(p.len(), checked)
            }
            Decapsulated::Send(d) => Got::Send(d.as_ptr() as usize - base, d.len()),
            Decapsulated::Nothing => Got::Nothing,
        };
        match got {
            Got::Packet(n, Ok((offload, Parsed::Whole(s)))) => {
                let p = &buf[..n];
                if self.judge(id, p, p, offload, &s, false, now) {
                    let flow = flow_key(&self.hasher, &s);
                    return self.write_tun_owned(buf, n, offload, flow);
                }
            }
            Got::Packet(n, Ok((offload, parsed))) => {
                let p = &buf[..n];
                self.handle_parsed(id, p, p, offload, parsed, false, now);
            }
            Got::Packet(_, Err(r)) => self.drop_packet(r, 1),
            Got::Send(at, n) => {
                // A handshake answer, then what was queued behind the handshake.
                let mut reply = take(&mut self.pool, n);
                reply.extend_from_slice(&buf[at..at + n]);
                let Some(t) = self.tunnels.get_mut(&id) else {
                    return;
                };
                t.bytes_out += n as u64;
                self.out
                    .push(NO_FLOW, Transmit::new(Dest::Tunnel(id), reply));
                buf.resize(wg::BUFFER, 0);
                while let Some(d) = t.peer.flush(&mut buf) {
                    let mut reply = take(&mut self.pool, d.len());
                    reply.extend_from_slice(d);
                    t.bytes_out += reply.len() as u64;
                    self.out
                        .push(NO_FLOW, Transmit::new(Dest::Tunnel(id), reply));
                }
            }
            Got::Nothing => {}
        }
        self.recycle(buf);
    }

    /// Timers: WireGuard handshakes and rekeying, flow and fragment expiry. Call every
    /// [`TICK`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut timed_out = 0;
        for (id, t) in self.tunnels.iter_mut() {
            let mut buf = take_len(&mut self.pool, HANDSHAKE);
            if let Some(d) = t.peer.tick(&mut buf) {
                let n = d.len();
                buf.truncate(n);
                t.bytes_out += n as u64;
                self.out
                    .push(NO_FLOW, Transmit::new(Dest::Tunnel(*id), buf));
            }
            t.flows.expire(now);
            timed_out += t.defrag_in.expire(now) + t.defrag_out.expire(now);
        }
        if timed_out > 0 {
            self.drop_packet(DropReason::FragmentTimeout, timed_out as u64);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_parsed(
        &mut self,
        id: TunnelId,
        packet: &[u8],
        wire: &[u8],
        offload: Offload,
        parsed: Parsed,
        from_tun: bool,
        now: Instant,
    ) {
        match parsed {
            Parsed::Whole(s) => {
                if self.judge(id, packet, wire, offload, &s, from_tun, now) && !from_tun {
                    self.write_tun(packet, offload, flow_key(&self.hasher, &s));
                }
            }
            Parsed::Fragment(f) => {
                let Some(t) = self.tunnels.get_mut(&id) else {
                    return self.drop_packet(DropReason::NoTunnel, 1);
                };
                let pool = if from_tun {
                    &mut t.defrag_out
                } else {
                    &mut t.defrag_in
                };
                match pool.add(&f, packet, now) {
                    Added::Held => {}
                    Added::Refused(n) => self.drop_packet(DropReason::FragmentRefused, n as u64),
                    Added::Complete(whole) => {
                        match packet::parse(&whole) {
                            Ok(Parsed::Whole(s)) => {
                                if self.judge(id, &whole, &whole, Offload::NONE, &s, from_tun, now)
                                    && !from_tun
                                {
                                    let flow = flow_key(&self.hasher, &s);
                                    self.write_tun(&whole, Offload::NONE, flow);
                                }
                            }
                            Ok(Parsed::Fragment(_)) => {
                                self.drop_packet(DropReason::FragmentRefused, 1)
                            }
                            Err(r) => self.drop_packet(r, 1),
                        }
                        self.recycle(whole);
                    }
                }
            }
        }
    }

    /// The filter's verdict on a whole packet: whether it passed. What passes from the TUN is
    /// encrypted here (`wire`: the packet and its offload trailer); what passes from a tunnel
    /// the caller writes to the TUN.
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &mut self,
        id: TunnelId,
        packet: &[u8],
        wire: &[u8],
        offload: Offload,
        s: &Summary,
        from_tun: bool,
        now: Instant,
    ) -> bool {
        let dir = match (self.side, from_tun) {
            (Side::Client { .. }, true) | (Side::Site, false) => Dir::ToDevice,
            _ => Dir::ToTechnician,
        };
        let side = self.side;
        let Some(t) = self.tunnels.get_mut(&id) else {
            self.drop_packet(DropReason::NoTunnel, 1);
            return false;
        };
        let verdict = match dir {
            Dir::ToDevice => to_device(side, t, s, now),
            Dir::ToTechnician => to_technician(side, t, s, now),
        };
        match verdict {
            Ok(()) => {
                self.passed += 1;
                if from_tun {
                    self.send_tunnel(id, packet, wire, offload);
                } else if offload.is_gso() {
                    let c = &mut self.offload_counters;
                    c.received += 1;
                    c.received_bytes += packet.len() as u64;
                }
                true
            }
            Err(reason) => {
                let refused = dir == Dir::ToDevice
                    && matches!(reason, DropReason::PortNotAllowed | DropReason::Protocol);
                if refused && let Some(d) = t.devices.get_mut(&s.dst) {
                    let port = match s.l4 {
                        L4::Tcp { dst_port, .. } | L4::Udp { dst_port, .. } => dst_port,
                        _ => 0,
                    };
                    d.note_refused(s.proto(), port);
                }
                self.drop_packet(reason, 1);
                if refused && from_tun {
                    self.answer(packet, s, now);
                }
                false
            }
        }
    }

    /// The fast local answer to a refused packet: RST for TCP, administratively prohibited for
    /// the rest; never for ICMP messages (no error about an error), rate-limited.
    fn answer(&mut self, packet: &[u8], s: &Summary, now: Instant) {
        if matches!(s.l4, L4::Echo { .. } | L4::Error(_) | L4::OtherIcmp) {
            return;
        }
        if !self.answers.allow(now) {
            return;
        }
        let mut buf = take(&mut self.pool, 0);
        match s.l4 {
            L4::Tcp { .. } => {
                if !packet::tcp_reset(packet, s, &mut buf) {
                    return self.recycle(buf);
                }
            }
            _ => packet::admin_prohibited(packet, s, &mut buf),
        }
        self.answered += 1;
        let flow = flow_key(&self.hasher, s);
        self.out.push(flow, Transmit::new(Dest::Tun, buf));
    }

    /// Encrypts a packet that passed from the TUN into tunnel `id`: `wire` (the packet and its
    /// trailer) when the tunnel agreed on super-packets of its size; else the packet itself
    /// if it has no metadata, or its segments (checksums complete, no trailer).
    fn send_tunnel(&mut self, id: TunnelId, packet: &[u8], wire: &[u8], offload: Offload) {
        if offload.is_none() {
            return self.encapsulate(id, packet);
        }
        let send = self.tunnels.get(&id).and_then(|t| t.offload.send);
        if send.is_some_and(|max| wire.len() + wg::OVERHEAD <= max) {
            if offload.is_gso() {
                let c = &mut self.offload_counters;
                c.sent += 1;
                c.sent_bytes += packet.len() as u64;
            }
            return self.encapsulate(id, wire);
        }
        let Some(segments) = self.cut(packet, offload) else {
            return;
        };
        if offload.is_gso() {
            self.offload_counters.split += 1;
        }
        for s in segments {
            self.encapsulate(id, &s);
            self.recycle(s);
        }
    }

    fn encapsulate(&mut self, id: TunnelId, packet: &[u8]) {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        let mut buf = take_len(&mut self.pool, (packet.len() + wg::OVERHEAD).max(HANDSHAKE));
        let start = buf.as_ptr() as usize;
        let Some(d) = t.peer.encapsulate(packet, &mut buf) else {
            // Queued behind a handshake.
            return self.recycle(buf);
        };
        let n = d.len();
        if d.as_ptr() as usize != start {
            // boringtun writes at the start of the buffer; anything else is copied.
            let copy = d.to_vec();
            buf.clear();
            buf.extend_from_slice(&copy);
        }
        buf.truncate(n);
        t.bytes_out += n as u64;
        self.out.push(NO_FLOW, Transmit::new(Dest::Tunnel(id), buf));
    }

    /// Writes a packet to the TUN; an IPv4 datagram larger than the TUN's MTU that may be
    /// fragmented is fragmented to it. A packet with offload metadata goes whole to a TUN that
    /// takes it, and is cut into its segments (checksums completed) for one that does not.
    fn write_tun(&mut self, packet: &[u8], offload: Offload, flow: u64) {
        if !offload.is_none() {
            return self.write_tun_offload(packet, offload, flow);
        }
        let mtu = usize::from(crate::tun::MTU);
        if packet.len() > mtu && packet[0] >> 4 == 4 && !packet::dont_fragment(packet) {
            let (out, pool) = (&mut self.out, &mut self.pool);
            packet::fragment(packet, mtu, &mut |f| {
                let mut buf = take(pool, f.len());
                buf.extend_from_slice(f);
                out.push(flow, Transmit::new(Dest::Tun, buf));
            });
            return;
        }
        let mut buf = take(&mut self.pool, packet.len());
        buf.extend_from_slice(packet);
        self.out.push(flow, Transmit::new(Dest::Tun, buf));
    }
}

impl Engine {
    /// Whether the TUN takes a packet with this (validated, not empty) metadata as it is.
    fn tun_takes(&self, offload: Offload) -> bool {
        if offload.is_gso() && offload.gso_type & !gso::GSO_ECN == gso::GSO_UDP_L4 {
            self.tun_offload.udp
        } else {
            self.tun_offload.tcp
        }
    }

    /// [`Engine::write_tun`] for a packet that is `buf[..len]`: the buffer itself goes to the
    /// TUN when the packet needs no cutting (no copy).
    fn write_tun_owned(&mut self, mut buf: Vec<u8>, len: usize, offload: Offload, flow: u64) {
        let whole = if offload.is_none() {
            len <= usize::from(crate::tun::MTU)
                || buf[0] >> 4 != 4
                || packet::dont_fragment(&buf[..len])
        } else {
            self.tun_takes(offload)
        };
        if !whole {
            self.write_tun(&buf[..len], offload, flow);
            return self.recycle(buf);
        }
        buf.truncate(len);
        self.out.push(
            flow,
            Transmit {
                dest: Dest::Tun,
                bytes: buf,
                offload,
            },
        );
    }

    /// [`Engine::write_tun`] for a (validated) packet with metadata.
    fn write_tun_offload(&mut self, packet: &[u8], offload: Offload, flow: u64) {
        if self.tun_takes(offload) {
            let mut buf = take(&mut self.pool, packet.len());
            buf.extend_from_slice(packet);
            self.out.push(
                flow,
                Transmit {
                    dest: Dest::Tun,
                    bytes: buf,
                    offload,
                },
            );
            return;
        }
        if let Some(segments) = self.cut(packet, offload) {
            for b in segments {
                self.out.push(flow, Transmit::new(Dest::Tun, b));
            }
        }
    }

    /// A (validated) packet with metadata as whole packets without any: its segments as the
    /// kernel would cut them, or the one packet, checksums complete. The one cutter of the
    /// engine: for a TUN without offload and for a tunnel that did not agree on super-packets.
    /// `None` (counted as `bad-offload`) if the cut fails.
    fn cut(&mut self, packet: &[u8], offload: Offload) -> Option<Vec<Vec<u8>>> {
        let mut buf = take(&mut self.pool, packet.len());
        buf.extend_from_slice(packet);
        if !offload.is_gso() {
            packet::complete_checksum(
                &mut buf,
                usize::from(offload.csum_start),
                usize::from(offload.csum_offset),
            );
            return Some(vec![buf]);
        }
        // The segments, as the kernel would cut them (validate bounded their number and size).
        let payload = packet.len() - usize::from(offload.hdr_len);
        let n = payload.div_ceil(usize::from(offload.gso_size));
        let seg = usize::from(offload.hdr_len) + usize::from(offload.gso_size);
        let mut segs: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let mut b = take(&mut self.pool, seg);
                b.resize(seg, 0);
                b
            })
            .collect();
        let mut sizes = vec![0usize; n];
        let hdr = tun_rs::VirtioNetHdr {
            flags: offload.flags,
            gso_type: offload.gso_type,
            hdr_len: offload.hdr_len,
            gso_size: offload.gso_size,
            csum_start: offload.csum_start,
            csum_offset: offload.csum_offset,
        };
        let v6 = packet[0] >> 4 == 6;
        let cut = match tun_rs::gso_split(&mut buf, hdr, &mut segs, &mut sizes, 0, v6) {
            Ok(k) => {
                let mut cut: Vec<Vec<u8>> = segs.drain(..k).collect();
                for (b, size) in cut.iter_mut().zip(sizes) {
                    b.truncate(size);
                }
                Some(cut)
            }
            Err(_) => {
                self.drop_packet(DropReason::BadOffload, 1);
                None
            }
        };
        for b in segs {
            self.recycle(b);
        }
        self.recycle(buf);
        cut
    }
}

/// A buffer from the pool of exactly `len` bytes, whatever they hold (for a decryption or an
/// encryption to overwrite): only what it grows by is zeroed.
fn take_len(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut buf = pool.pop().unwrap_or_default();
    buf.resize(len, 0);
    buf
}

/// A buffer from the pool (empty, with room for `want` bytes).
fn take(pool: &mut Vec<Vec<u8>>, want: usize) -> Vec<u8> {
    let mut buf = pool.pop().unwrap_or_default();
    buf.clear();
    buf.reserve(want);
    buf
}

/// The checks toward a device (see the module documentation).
fn to_device(side: Side, t: &mut Tunnel, s: &Summary, now: Instant) -> Result<(), DropReason> {
    if side == Side::Site && t.remote != Some(s.src) {
        return Err(DropReason::WrongTunnel);
    }
    let Some(device) = t.devices.get(&s.dst) else {
        return Err(DropReason::NotConnected);
    };
    let proto = s.proto();
    let key = |tech_port, device_port| FlowKey {
        proto,
        tech: s.src,
        tech_port,
        device: s.dst,
        device_port,
    };
    match s.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        } => {
            if !device.allows(proto, dst_port) {
                return Err(DropReason::PortNotAllowed);
            }
            let k = key(src_port, dst_port);
            if flags.syn && !flags.ack {
                t.flows.open(k, now)?;
            }
            if t.flows.touch(&k, now, flags.fin || flags.rst) {
                Ok(())
            } else {
                Err(DropReason::NoFlow)
            }
        }
        L4::Udp { src_port, dst_port } => {
            if !device.allows(proto, dst_port) {
                return Err(DropReason::PortNotAllowed);
            }
            t.flows.open(key(src_port, dst_port), now)
        }
        L4::Echo { request: true, id } => t.flows.open(key(id, 0), now),
        // The technician's host reports a problem with a device's packet: it must quote a
        // packet of a live flow, from the device to the technician.
        L4::Error(q) if q.src == s.dst && q.dst == s.src => {
            let k = FlowKey {
                proto: q.proto,
                tech: q.dst,
                tech_port: q.dst_port,
                device: q.src,
                device_port: q.src_port,
            };
            if t.flows.contains(&k, now) {
                Ok(())
            } else {
                Err(DropReason::NoFlow)
            }
        }
        L4::Error(_) => Err(DropReason::NoFlow),
        L4::Echo { request: false, .. } | L4::OtherIcmp | L4::Other(_) => Err(DropReason::Protocol),
    }
}

/// The checks toward the technician (see the module documentation).
fn to_technician(side: Side, t: &mut Tunnel, s: &Summary, now: Instant) -> Result<(), DropReason> {
    // Cryptokey routing: a device of another tunnel (or none) is not this tunnel's to speak for.
    let foreign = match side {
        Side::Client { .. } => DropReason::WrongTunnel,
        Side::Site => DropReason::NoFlow,
    };
    if let Side::Client {
        address,
        any_source: false,
    } = side
        && s.dst != address
    {
        return Err(DropReason::WrongDestination);
    }
    if let L4::Error(q) = s.l4 {
        // An ICMP error about a packet the technician sent: any router on the way may send it,
        // but the packet it quotes must be of a live flow to a device of this tunnel.
        if q.src != s.dst {
            return Err(DropReason::NoFlow);
        }
        if !t.devices.contains_key(&q.dst) {
            return Err(foreign);
        }
        let k = FlowKey {
            proto: q.proto,
            tech: q.src,
            tech_port: q.src_port,
            device: q.dst,
            device_port: q.dst_port,
        };
        return if t.flows.contains(&k, now) {
            Ok(())
        } else {
            Err(DropReason::NoFlow)
        };
    }
    if !t.devices.contains_key(&s.src) {
        return Err(foreign);
    }
    let proto = s.proto();
    let (k, closing) = match s.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        } => ((dst_port, src_port), flags.fin || flags.rst),
        L4::Udp { src_port, dst_port } => ((dst_port, src_port), false),
        L4::Echo { request: false, id } => ((id, 0), false),
        _ => return Err(DropReason::NoFlow),
    };
    let key = FlowKey {
        proto,
        tech: s.dst,
        tech_port: k.0,
        device: s.src,
        device_port: k.1,
    };
    if t.flows.touch(&key, now, closing) {
        Ok(())
    } else {
        Err(DropReason::NoFlow)
    }
}

mod sched;

#[cfg(test)]
mod tests;
