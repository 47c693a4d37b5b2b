//! The site's sessions on the tunnel engine: one engine tunnel per technician session (its
//! WireGuard peer, its tunnel address, its agents' devices and ports). Every per-packet decision
//! is the engine's ([`pinhole_adapter::engine`]); this keeps which agents each session carries
//! and what the firewall must allow. No I/O here: the agent loop moves the bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use pinhole_adapter::tun::Tun;
use pinhole_adapter::wg::{Keypair, Peer};
use pinhole_adapter::{Engine, Side, Transmit, TunOffload, TunnelId, TunnelOffload};
use pinhole_proto::Agent;

use crate::firewall::Policy;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the session's tunnel address changed")]
    AddressChanged,
    #[error("the technician's WireGuard key is not valid")]
    BadKey,
    #[error("{0}")]
    Engine(#[from] pinhole_adapter::EngineError),
}

#[derive(Debug)]
struct Session {
    key: String,
    tunnel_ip: IpAddr,
    agents: BTreeMap<String, Agent>,
}

/// All open sessions of the site.
#[derive(Debug)]
pub struct Forwarder {
    engine: Engine,
    sessions: BTreeMap<u32, Session>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        Self {
            engine: Engine::new(Side::Site),
            sessions: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Opens a session (or adds `agent` to it). `secret` seeds a fresh WireGuard key for a new
    /// session; `offload` is what the session agreed about super-packets, set on a new
    /// session's tunnel. Returns the site's public key.
    pub fn open(
        &mut self,
        session: u32,
        agent: &Agent,
        client_key: &str,
        tunnel_ip: IpAddr,
        secret: [u8; 32],
        offload: TunnelOffload,
    ) -> Result<String, OpenError> {
        let id = TunnelId(session);
        if let Some(s) = self.sessions.get_mut(&session) {
            if s.tunnel_ip != tunnel_ip {
                return Err(OpenError::AddressChanged);
            }
            self.engine
                .connect(id, &agent.name, agent.address, agent.ports.clone())?;
            s.agents.insert(agent.name.clone(), agent.clone());
            return Ok(s.key.clone());
        }
        let keys = Keypair::from_secret(secret);
        let peer = Peer::new(&keys, client_key, session).map_err(|_| OpenError::BadKey)?;
        self.engine.add_tunnel(id, peer, Some(tunnel_ip))?;
        self.engine.set_tunnel_offload(id, offload)?;
        if let Err(e) = self
            .engine
            .connect(id, &agent.name, agent.address, agent.ports.clone())
        {
            self.engine.remove_tunnel(id);
            return Err(e.into());
        }
        let key = keys.public_hex();
        self.sessions.insert(
            session,
            Session {
                key: key.clone(),
                tunnel_ip,
                agents: [(agent.name.clone(), agent.clone())].into_iter().collect(),
            },
        );
        Ok(key)
    }

    /// Whether `session` is open.
    pub fn contains(&self, session: u32) -> bool {
        self.sessions.contains_key(&session)
    }

    /// Holds `session`'s packets toward the device network (those its filter passed) until
    /// [`Forwarder::release`], in order and bounded ([`Engine::hold`]); its handshakes,
    /// keepalives and the device's answers go on. Closing the session drops them.
    pub fn hold(&mut self, session: u32) -> bool {
        self.engine.hold(TunnelId(session))
    }

    /// Ends `session`'s hold: what it held goes to the TUN, in order, with the next
    /// [`Forwarder::poll_transmit`]s. Returns how many packets it held.
    pub fn release(&mut self, session: u32) -> usize {
        self.engine.release(TunnelId(session))
    }

    /// Closes a session, or one agent of it. Returns true if the session is gone.
    pub fn close(&mut self, session: u32, agent: Option<&str>) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return true;
        };
        if let Some(a) = agent {
            s.agents.remove(a);
            self.engine.disconnect(TunnelId(session), a);
            if !s.agents.is_empty() {
                return false;
            }
        }
        self.sessions.remove(&session);
        self.engine.remove_tunnel(TunnelId(session));
        self.log_counters(session);
        true
    }

    /// The engine's counters (all sessions), logged when a session ends: packets passed and
    /// dropped by reason, and the GSO super-packets that crossed each way (whether TUN
    /// offload works).
    fn log_counters(&self, session: u32) {
        let (drops, passed, answered) = self.engine.counters();
        let o = self.engine.offload_counters();
        let drops: Vec<String> = drops
            .iter()
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        tracing::info!(
            session,
            passed,
            answered,
            dropped = %drops.join(", "),
            super_sent = o.sent,
            super_sent_bytes = o.sent_bytes,
            super_received = o.received,
            super_received_bytes = o.received_bytes,
            super_split = o.split,
            "data plane counters (all sessions)"
        );
    }

    /// Drops by reason, packets passed, local answers (all sessions).
    pub fn counters(&self) -> (&BTreeMap<pinhole_adapter::DropReason, u64>, u64, u64) {
        self.engine.counters()
    }

    /// Closes everything (the gateway link is gone).
    pub fn clear(&mut self) {
        for id in std::mem::take(&mut self.sessions).into_keys() {
            self.engine.remove_tunnel(TunnelId(id));
            self.log_counters(id);
        }
    }

    /// Sessions that carry an agent by this name.
    pub fn sessions_with(&self, agent: &str) -> Vec<u32> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.agents.contains_key(agent))
            .map(|(id, _)| *id)
            .collect()
    }

    /// What the firewall must let through.
    pub fn policy(&self) -> Policy {
        let mut p = Policy::default();
        for s in self.sessions.values() {
            for a in s.agents.values() {
                p.echo.insert((s.tunnel_ip, a.address));
                for port in &a.ports {
                    p.allowed.insert((s.tunnel_ip, a.address, *port));
                }
            }
        }
        p
    }

    /// A datagram of `session` from the gateway.
    pub fn handle_datagram(&mut self, session: u32, datagram: &[u8], now: Instant) {
        self.engine
            .handle_datagram(TunnelId(session), datagram, now);
    }

    /// A packet from the device network (read from the TUN).
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        self.engine.handle_tun_packet(packet, now);
    }

    /// What one read of `tun` returned (`buf[..n]`; with offload, a `virtio_net_hdr` first).
    pub fn handle_tun_read(&mut self, tun: &Tun, buf: &mut [u8], n: usize, now: Instant) {
        tun.feed(&mut self.engine, buf, n, now);
    }

    /// What the TUN takes: super-packets and partial checksums whole, or not.
    pub fn set_tun_offload(&mut self, offload: TunOffload) {
        self.engine.set_tun_offload(offload);
    }

    /// WireGuard timers, flow and fragment expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
    }

    /// The next packet for the TUN or datagram for a session.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.engine.poll_transmit()
    }

    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.engine.recycle(buf);
    }
}
