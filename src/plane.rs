//! The client's data plane: the TUN adapter `pinhole0`, one host route per connected device,
//! the packet filter, and one WireGuard tunnel per site.
//!
//! Packets read from the TUN pass the filter forward (destination a connected device, protocol
//! and port in its agent's set) and are encrypted to that device's site; datagrams from a site
//! are decrypted and pass the filter in reverse (replies on flows the technician opened) before
//! they reach the TUN. The filter and tunnels are plain values; the link task moves bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use pinhole_adapter::filter::{Filter, Verdict};
use pinhole_adapter::tun::Tun;
use pinhole_adapter::wg::{self, Decapsulated, Keypair, Peer};
use pinhole_proto::Agent;
use pinhole_routes::Routes;
use tracing::{info, trace, warn};

use crate::control::{FilterCounters, SessionView};

/// The client's TUN device.
pub const TUN_NAME: &str = "pinhole0";

/// Overrides the TUN name (tests run several daemons in one network namespace).
pub const TUN_ENV: &str = "PINHOLE_TUN";

struct Connected {
    agent: Agent,
    since: String,
}

/// One site's tunnel.
struct SiteTunnel {
    site: String,
    peer: Option<Peer>,
    site_key: Option<String>,
    agents: BTreeMap<String, Connected>,
    /// Agents asked for and not answered yet.
    pending: BTreeSet<String>,
    bytes_out: u64,
    bytes_in: u64,
}

/// The data plane of one login.
pub struct Plane {
    tun_name: String,
    keys: Keypair,
    tun: Option<Tun>,
    routes: Option<Routes>,
    filter: Filter,
    tunnels: BTreeMap<u32, SiteTunnel>,
    by_device: BTreeMap<IpAddr, u32>,
    next_sid: u32,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("tunnels", &self.tunnels.len())
            .finish_non_exhaustive()
    }
}

impl Plane {
    /// A plane with a fresh WireGuard key (one per login), whose TUN will be `tun_name`.
    pub fn new(tun_name: &str) -> Self {
        Self {
            tun_name: tun_name.to_owned(),
            keys: Keypair::from_secret(pinhole_certs::random::<32>()),
            tun: None,
            routes: None,
            filter: Filter::new(),
            tunnels: BTreeMap::new(),
            by_device: BTreeMap::new(),
            next_sid: 0,
            buf: vec![0; wg::BUFFER],
            out: vec![0; wg::BUFFER],
        }
    }

    pub fn public_key(&self) -> String {
        self.keys.public_hex()
    }

    pub fn tun(&self) -> Option<&Tun> {
        self.tun.as_ref()
    }

    /// Creates the TUN with the tunnel address (once per login; kept across reconnects).
    pub fn ensure_tun(&mut self, addr: Ipv4Addr) -> Result<(), String> {
        if self.tun.is_some() {
            return Ok(());
        }
        let name = &self.tun_name;
        let tun = Tun::create(name, addr, 32).map_err(|e| {
            format!("cannot create the {name} adapter: {e} (pinholed must run as root)")
        })?;
        let index = tun.index().map_err(|e| format!("{name}: {e}"))?;
        let routes = Routes::new(index).map_err(|e| format!("netlink: {e}"))?;
        info!(tun = tun.name(), %addr, "virtual adapter up");
        self.tun = Some(tun);
        self.routes = Some(routes);
        Ok(())
    }

    /// The session id for `site`: the existing tunnel, or a new one.
    pub fn session_for(&mut self, site: &str) -> u32 {
        if let Some((id, _)) = self.tunnels.iter().find(|(_, t)| t.site == site) {
            return *id;
        }
        self.next_sid += 1;
        let id = self.next_sid;
        self.tunnels.insert(
            id,
            SiteTunnel {
                site: site.into(),
                peer: None,
                site_key: None,
                agents: BTreeMap::new(),
                pending: BTreeSet::new(),
                bytes_out: 0,
                bytes_in: 0,
            },
        );
        id
    }

    /// Checks that `agent` can be connected, and marks it pending.
    pub fn request(&mut self, sid: u32, agent: &Agent) -> Result<(), String> {
        if let Some(&other) = self.by_device.get(&agent.address) {
            let t = &self.tunnels[&other];
            let name = t
                .agents
                .values()
                .find(|c| c.agent.address == agent.address)
                .map(|c| c.agent.name.clone())
                .unwrap_or_default();
            return Err(format!(
                "{} is already connected (as {}/{name})",
                agent.address, t.site
            ));
        }
        let t = self.tunnels.get_mut(&sid).ok_or("no such session")?;
        if !t.pending.insert(agent.name.clone()) {
            return Err(format!("{}/{} is being connected", t.site, agent.name));
        }
        Ok(())
    }

    /// The site confirmed an agent: tunnel, filter rule, host route.
    pub async fn opened(
        &mut self,
        sid: u32,
        site_key: &str,
        agent: Agent,
        send: &mut (dyn FnMut(u32, &[u8]) + Send),
    ) -> Result<String, String> {
        let t = self.tunnels.get_mut(&sid).ok_or("unknown session")?;
        t.pending.remove(&agent.name);
        if t.peer.is_none() {
            let mut peer = Peer::new(&self.keys, site_key, sid).map_err(|e| e.to_string())?;
            // Start the handshake now: the first packet then finds the tunnel ready.
            peer.initiate(&mut self.out, &mut |d| send(sid, d));
            t.peer = Some(peer);
            t.site_key = Some(site_key.to_owned());
        } else if t.site_key.as_deref() != Some(site_key) {
            return Err("the site answered with another key for the same tunnel".into());
        }
        self.filter.allow(agent.address, agent.ports.clone(), None);
        tracing::debug!(device = %agent.address, "adding the host route");
        if let (Some(routes), IpAddr::V4(v4)) = (self.routes.as_mut(), agent.address)
            && let Err(e) = routes.add(v4).await
        {
            self.filter.revoke(agent.address);
            return Err(format!("cannot add the route to {v4}: {e}"));
        }
        tracing::debug!(device = %agent.address, "host route added");
        self.by_device.insert(agent.address, sid);
        let text = format!(
            "connected to {}/{}: device {}, ports {}",
            t.site,
            agent.name,
            agent.address,
            agent.ports_text()
        );
        info!(site = %t.site, agent = %agent.name, device = %agent.address, "connected");
        t.agents.insert(
            agent.name.clone(),
            Connected {
                agent,
                since: crate::now_rfc3339(),
            },
        );
        Ok(text)
    }

    /// A request was refused: forget the pending agents (and an empty tunnel).
    pub fn refused(&mut self, sid: u32) -> Vec<String> {
        let Some(t) = self.tunnels.get_mut(&sid) else {
            return Vec::new();
        };
        let pending: Vec<String> = std::mem::take(&mut t.pending).into_iter().collect();
        if t.agents.is_empty() {
            self.tunnels.remove(&sid);
        }
        pending
    }

    /// Disconnects an agent (or the whole site tunnel with `None`): filter, route, tunnel.
    pub async fn close(&mut self, sid: u32, agent: Option<&str>) {
        let Some(t) = self.tunnels.get_mut(&sid) else {
            return;
        };
        let names: Vec<String> = match agent {
            Some(a) => vec![a.to_owned()],
            None => t.agents.keys().cloned().collect(),
        };
        let mut gone = Vec::new();
        for n in names {
            t.pending.remove(&n);
            if let Some(c) = t.agents.remove(&n) {
                gone.push(c.agent.address);
            }
        }
        let empty = t.agents.is_empty() && t.pending.is_empty();
        if empty || agent.is_none() {
            self.tunnels.remove(&sid);
        }
        for device in gone {
            self.filter.revoke(device);
            self.by_device.remove(&device);
            if let (Some(routes), IpAddr::V4(v4)) = (self.routes.as_mut(), device)
                && let Err(e) = routes.remove(v4).await
            {
                warn!(%v4, error = %e, "cannot remove the route");
            }
        }
    }

    /// Disconnects everything (link lost, logout).
    pub async fn close_all(&mut self) {
        let ids: Vec<u32> = self.tunnels.keys().copied().collect();
        for id in ids {
            self.close(id, None).await;
        }
    }

    /// Ends the login: everything closed, the TUN removed (its routes go with it).
    pub async fn shutdown(&mut self) {
        self.close_all().await;
        if let Some(mut r) = self.routes.take() {
            let _ = r.clear().await;
        }
        self.tun = None;
    }

    /// The session of a connected `site/agent`.
    pub fn find(&self, site: &str, agent: &str) -> Option<u32> {
        self.tunnels
            .iter()
            .find(|(_, t)| t.site == site && t.agents.contains_key(agent))
            .map(|(id, _)| *id)
    }

    pub fn sessions(&self) -> Vec<u32> {
        self.tunnels.keys().copied().collect()
    }

    /// A packet read from the TUN: filter, then encrypt to its site.
    pub fn from_tun(&mut self, packet: &[u8], now: Instant, send: &mut dyn FnMut(u32, &[u8])) {
        if let Verdict::Drop(reason) = self.filter.forward(packet, now) {
            trace!(reason = reason.name(), "dropped on the way out");
            return;
        }
        // The filter passed it, so its destination is a connected device.
        let Ok(summary) = pinhole_adapter::filter::parse(packet) else {
            return;
        };
        let Some(&sid) = self.by_device.get(&summary.dst) else {
            return;
        };
        let Some(t) = self.tunnels.get_mut(&sid) else {
            return;
        };
        let Some(peer) = t.peer.as_mut() else { return };
        if let Some(d) = peer.encapsulate(packet, &mut self.out) {
            t.bytes_out += d.len() as u64;
            send(sid, d);
        }
    }

    /// After a packet was read: takes what else the TUN already holds (up to a batch) through
    /// the same path, so the caller writes the whole burst to the link at once.
    pub fn drain_tun(&mut self, buf: &mut [u8], now: Instant, send: &mut dyn FnMut(u32, &[u8])) {
        for _ in 1..pinhole_adapter::tun::BATCH {
            let n = match self.tun.as_ref().map(|t| t.try_recv(buf)) {
                Some(Ok(n)) => n,
                _ => return,
            };
            self.from_tun(&buf[..n], now, send);
        }
    }

    /// A datagram from a site: decrypt, filter, write to the TUN.
    pub async fn from_site(
        &mut self,
        sid: u32,
        datagram: &[u8],
        now: Instant,
        send: &mut (dyn FnMut(u32, &[u8]) + Send),
    ) {
        let Self {
            tunnels,
            filter,
            buf,
            tun,
            ..
        } = self;
        let Some(t) = tunnels.get_mut(&sid) else {
            return;
        };
        t.bytes_in += datagram.len() as u64;
        let Some(peer) = t.peer.as_mut() else { return };
        if let Decapsulated::Packet(p, _) = peer.decapsulate(datagram, buf, &mut |d| send(sid, d)) {
            match filter.reverse(p, now) {
                Verdict::Pass => {
                    if let Some(tun) = tun.as_ref() {
                        let _ = tun.send(p).await;
                    }
                }
                Verdict::Drop(reason) => trace!(reason = reason.name(), "dropped on the way in"),
            }
        }
    }

    /// WireGuard timers.
    pub fn tick(&mut self, send: &mut dyn FnMut(u32, &[u8])) {
        for (sid, t) in self.tunnels.iter_mut() {
            if let Some(peer) = t.peer.as_mut() {
                peer.tick(&mut self.out, &mut |d| send(*sid, d));
            }
        }
    }

    /// What `pinhole status` shows.
    pub fn views(&self) -> (Vec<SessionView>, FilterCounters) {
        let mut views = Vec::new();
        for t in self.tunnels.values() {
            for c in t.agents.values() {
                views.push(SessionView {
                    site: t.site.clone(),
                    agent: c.agent.name.clone(),
                    device: c.agent.address,
                    ports: c.agent.ports_text(),
                    since: c.since.clone(),
                    bytes_out: t.bytes_out,
                    bytes_in: t.bytes_in,
                });
            }
        }
        let (drops, passed) = self.filter.counters();
        let dropped = drops
            .iter()
            .map(|(r, n)| (r.name().to_owned(), *n))
            .collect();
        (views, FilterCounters { passed, dropped })
    }
}
