//! The site's sessions: one WireGuard peer and one filter per technician tunnel, carrying the
//! agents the technician connected. Packets from the gateway are decrypted, checked (source is
//! the session's tunnel address, destination one of its agents' devices and ports) and handed
//! to the TUN; packets from devices are checked against the flows the technician opened and
//! encrypted back. No I/O here: the agent loop moves the bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use pinhole_adapter::filter::{self, Filter, Verdict};
use pinhole_adapter::wg::{self, Decapsulated, Keypair, Peer};
use pinhole_proto::Agent;

use crate::firewall::Policy;

struct SiteSession {
    peer: Peer,
    key: String,
    filter: Filter,
    tunnel_ip: IpAddr,
    agents: BTreeMap<String, Agent>,
}

/// All open sessions of the site.
pub struct Forwarder {
    sessions: BTreeMap<u32, SiteSession>,
    by_tunnel: BTreeMap<IpAddr, u32>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        Self {
            sessions: BTreeMap::new(),
            by_tunnel: BTreeMap::new(),
            buf: vec![0; wg::BUFFER],
            out: vec![0; wg::BUFFER],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Opens a session (or adds `agent` to it). `secret` seeds a fresh WireGuard key for a new
    /// session. Returns the site's public key.
    pub fn open(
        &mut self,
        session: u32,
        agent: &Agent,
        client_key: &str,
        tunnel_ip: IpAddr,
        secret: [u8; 32],
    ) -> Result<String, String> {
        if let Some(s) = self.sessions.get_mut(&session) {
            if s.tunnel_ip != tunnel_ip {
                return Err("the session's tunnel address changed".into());
            }
            s.agents.insert(agent.name.clone(), agent.clone());
            Self::refresh_rules(s);
            return Ok(s.key.clone());
        }
        if let Some(other) = self.by_tunnel.get(&tunnel_ip) {
            return Err(format!(
                "tunnel address {tunnel_ip} already has session {other} here"
            ));
        }
        let keys = Keypair::from_secret(secret);
        let peer = Peer::new(&keys, client_key, session).map_err(|e| e.to_string())?;
        let mut s = SiteSession {
            peer,
            key: keys.public_hex(),
            filter: Filter::new(),
            tunnel_ip,
            agents: [(agent.name.clone(), agent.clone())].into_iter().collect(),
        };
        Self::refresh_rules(&mut s);
        let key = s.key.clone();
        self.sessions.insert(session, s);
        self.by_tunnel.insert(tunnel_ip, session);
        Ok(key)
    }

    /// The filter allows exactly the session's agents, from its tunnel address only.
    fn refresh_rules(s: &mut SiteSession) {
        let mut by_device: BTreeMap<IpAddr, std::collections::BTreeSet<pinhole_proto::Port>> =
            BTreeMap::new();
        for a in s.agents.values() {
            by_device
                .entry(a.address)
                .or_default()
                .extend(a.ports.iter().copied());
        }
        let current: Vec<IpAddr> = s.filter.devices().copied().collect();
        for d in current {
            if !by_device.contains_key(&d) {
                s.filter.revoke(d);
            }
        }
        for (device, ports) in by_device {
            s.filter.allow(device, ports, Some(s.tunnel_ip));
        }
    }

    /// Closes a session, or one agent of it. Returns true if the session is gone.
    pub fn close(&mut self, session: u32, agent: Option<&str>) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else {
            return true;
        };
        if let Some(a) = agent {
            s.agents.remove(a);
            if !s.agents.is_empty() {
                Self::refresh_rules(s);
                return false;
            }
        }
        if let Some(s) = self.sessions.remove(&session) {
            self.by_tunnel.remove(&s.tunnel_ip);
        }
        true
    }

    /// Closes everything (the gateway link is gone).
    pub fn clear(&mut self) {
        self.sessions.clear();
        self.by_tunnel.clear();
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
                p.echo.insert(a.address);
                for port in &a.ports {
                    p.allowed.insert((a.address, *port));
                }
            }
        }
        p
    }

    /// A datagram from the gateway: returns the packet for the TUN, if one passes.
    pub fn from_gateway(
        &mut self,
        session: u32,
        datagram: &[u8],
        now: Instant,
        send: &mut dyn FnMut(u32, &[u8]),
    ) -> Option<&[u8]> {
        let s = self.sessions.get_mut(&session)?;
        let mut reply = |d: &[u8]| send(session, d);
        match s.peer.decapsulate(datagram, &mut self.buf, &mut reply) {
            Decapsulated::Packet(p, _) => match s.filter.forward(p, now) {
                Verdict::Pass => Some(p),
                Verdict::Drop(reason) => {
                    tracing::trace!(
                        session,
                        reason = reason.name(),
                        "dropped from the technician"
                    );
                    None
                }
            },
            Decapsulated::Nothing => None,
        }
    }

    /// A packet from the device network (read from the TUN): encrypts it to its session.
    pub fn from_device(&mut self, packet: &[u8], now: Instant, send: &mut dyn FnMut(u32, &[u8])) {
        let Ok(summary) = filter::parse(packet) else {
            return;
        };
        let Some(&session) = self.by_tunnel.get(&summary.dst) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.filter.reverse(packet, now) != Verdict::Pass {
            return;
        }
        if let Some(d) = s.peer.encapsulate(packet, &mut self.out) {
            send(session, d);
        }
    }

    /// WireGuard timers of every session.
    pub fn tick(&mut self, send: &mut dyn FnMut(u32, &[u8])) {
        for (id, s) in self.sessions.iter_mut() {
            let mut f = |d: &[u8]| send(*id, d);
            s.peer.tick(&mut self.out, &mut f);
        }
    }
}
