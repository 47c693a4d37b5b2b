//! The client's data plane: the TUN adapter `pinhole0`, one host route per connected device,
//! and the tunnel engine ([`pinhole_adapter::engine`]) with one tunnel per site.
//!
//! Every per-packet decision is the engine's. This keeps what the technician connected (site
//! tunnels, agents, since when), checks a site's answer against the agent asked for, keeps a
//! device's host route while any of its agents is connected, and moves the engine's output.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use pinhole_adapter::tun::Tun;
use pinhole_adapter::wg::{Keypair, Peer};
use pinhole_adapter::{Dest, Engine, Side, TunnelId, TunnelOffload};
use pinhole_proto::{Agent, ClientCore};
use pinhole_routes::Routes;
use tracing::{debug, info, warn};

use crate::control::{FilterCounters, RefusedView, SessionView, SuperPackets};

/// The client's TUN device.
pub const TUN_NAME: &str = "pinhole0";

/// Overrides the TUN name (tests run several daemons in one network namespace).
pub const TUN_ENV: &str = "PINHOLE_TUN";

/// How the adapter is set up, from the daemon's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterConfig {
    /// The TUN's name.
    pub tun_name: String,
    /// Let packets with another source than the tunnel address into the tunnel (a VM or
    /// container behind the laptop routed into it). Off by default: only the technician's own
    /// programs use the tunnel.
    pub other_sources: bool,
}

/// Why a device cannot be connected, in a technician's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "{address} is already connected (as {site}/{agent}); two sites' devices on one address cannot be connected at once"
    )]
    AddressTaken {
        address: IpAddr,
        site: String,
        agent: String,
    },
    #[error("{0} is being connected")]
    Pending(String),
    #[error("{0} is not the unicast address of one device; not connected")]
    NotUnicast(IpAddr),
    #[error("{0} is this computer's own address; connecting it would cut this computer off")]
    OwnAddress(IpAddr),
    #[error("{0} is the gateway's address; connecting it would cut the link to the gateway")]
    GatewayAddress(IpAddr),
    #[error("the answer names another agent than the one asked for ({asked}); not connected")]
    NotAsked { asked: String },
    #[error("the site answered with another key for the same tunnel")]
    KeyChanged,
    #[error("the site's WireGuard key is not valid")]
    BadKey,
    #[error("no such session")]
    NoSession,
    #[error("not logged in")]
    NoTunnelAddress,
    #[error("cannot add the route to {0}: {1}")]
    Route(Ipv4Addr, String),
}

/// Whether `addr` is the unicast address of one device.
fn unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    }
}

/// Whether `addr` is one of this computer's own addresses: only a local address can be bound.
fn own_address(addr: IpAddr) -> bool {
    std::net::UdpSocket::bind((addr, 0)).is_ok()
}

struct Connected {
    agent: Agent,
    since: String,
}

/// One site's tunnel.
struct SiteTunnel {
    site: String,
    site_key: Option<String>,
    agents: BTreeMap<String, Connected>,
    /// Agents asked for and not answered yet, as the inventory showed them.
    pending: BTreeMap<String, Agent>,
}

/// The data plane of one login.
pub struct Plane {
    tun_name: String,
    other_sources: bool,
    keys: Keypair,
    tun: Option<Tun>,
    routes: Option<Routes>,
    engine: Option<Engine>,
    tunnels: BTreeMap<u32, SiteTunnel>,
    gateway: Option<IpAddr>,
    next_sid: u32,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("tunnels", &self.tunnels.len())
            .finish_non_exhaustive()
    }
}

impl Plane {
    /// A plane with a fresh WireGuard key (one per login) and the TUN `config` names.
    pub fn new(config: &AdapterConfig) -> Self {
        Self {
            tun_name: config.tun_name.clone(),
            other_sources: config.other_sources,
            keys: Keypair::from_secret(pinhole_certs::random::<32>()),
            tun: None,
            routes: None,
            engine: None,
            tunnels: BTreeMap::new(),
            gateway: None,
            next_sid: 0,
        }
    }

    pub fn public_key(&self) -> String {
        self.keys.public_hex()
    }

    pub fn tun(&self) -> Option<&Tun> {
        self.tun.as_ref()
    }

    /// The gateway's address on the current link (a device may not take it).
    pub fn set_gateway(&mut self, addr: Option<IpAddr>) {
        self.gateway = addr;
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
        let offload = tun.offload();
        info!(
            tun = tun.name(),
            tso = offload.tcp,
            uso = offload.udp,
            "virtual adapter up"
        );
        debug!(%addr, "tunnel address");
        let mut engine = Engine::new(Side::Client {
            address: addr.into(),
            any_source: self.other_sources,
        });
        engine.set_tun_offload(offload);
        self.tun = Some(tun);
        self.routes = Some(routes);
        self.engine = Some(engine);
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
                site_key: None,
                agents: BTreeMap::new(),
                pending: BTreeMap::new(),
            },
        );
        id
    }

    /// Checks that `agent` (from the inventory) can be connected, and marks it pending.
    pub fn request(&mut self, sid: u32, agent: &Agent) -> Result<(), ConnectError> {
        let address = agent.address;
        if !unicast(address) {
            return Err(ConnectError::NotUnicast(address));
        }
        if self.gateway == Some(address) {
            return Err(ConnectError::GatewayAddress(address));
        }
        if own_address(address) {
            return Err(ConnectError::OwnAddress(address));
        }
        for (id, t) in &self.tunnels {
            if *id == sid {
                continue;
            }
            let holder = t
                .agents
                .values()
                .map(|c| &c.agent)
                .chain(t.pending.values())
                .find(|a| a.address == address);
            if let Some(a) = holder {
                return Err(ConnectError::AddressTaken {
                    address,
                    site: t.site.clone(),
                    agent: a.name.clone(),
                });
            }
        }
        let t = self.tunnels.get_mut(&sid).ok_or(ConnectError::NoSession)?;
        if t.pending.contains_key(&agent.name) {
            return Err(ConnectError::Pending(format!("{}/{}", t.site, agent.name)));
        }
        t.pending.insert(agent.name.clone(), agent.clone());
        Ok(())
    }

    /// The site's answer for an agent: it must be exactly the agent asked for. Then the tunnel,
    /// the engine's rules, the host route (once per device).
    /// `offload`: what the session agreed about super-packets (`ClientEvent::SessionOpened`),
    /// set on the tunnel when it is made.
    pub async fn opened(
        &mut self,
        sid: u32,
        site_key: &str,
        agent: Agent,
        offload: Option<u32>,
    ) -> Result<String, ConnectError> {
        let t = self.tunnels.get_mut(&sid).ok_or(ConnectError::NoSession)?;
        let Some(asked) = t.pending.remove(&agent.name) else {
            return Err(ConnectError::NotAsked {
                asked: t.pending.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        if asked != agent {
            warn!(site = %t.site, agent = %asked.name, "the session answer is not the agent asked for");
            return Err(ConnectError::NotAsked {
                asked: format!(
                    "{}/{}: {} {}",
                    t.site,
                    asked.name,
                    asked.address,
                    asked.ports_text()
                ),
            });
        }
        let engine = self.engine.as_mut().ok_or(ConnectError::NoTunnelAddress)?;
        let id = TunnelId(sid);
        match &t.site_key {
            None => {
                let peer =
                    Peer::new(&self.keys, site_key, sid).map_err(|_| ConnectError::BadKey)?;
                engine
                    .add_tunnel(id, peer, None)
                    .map_err(|_| ConnectError::NoSession)?;
                // This client's `hello` said `offload` (`ClientCore::new`), so it takes
                // super-packets; it sends them only where the site and the gateway agreed.
                engine
                    .set_tunnel_offload(
                        id,
                        TunnelOffload {
                            send: offload.map(|max| max as usize),
                            receive: true,
                        },
                    )
                    .map_err(|_| ConnectError::NoSession)?;
                debug!(session = sid, offload = ?offload, "tunnel offload agreed");
                // Start the handshake now: the first packet then finds the tunnel ready.
                engine.initiate(id);
                t.site_key = Some(site_key.to_owned());
            }
            Some(k) if k != site_key => return Err(ConnectError::KeyChanged),
            Some(_) => {}
        }
        let routed = engine.owner(&agent.address).is_some();
        if let Err(e) = engine.connect(id, &agent.name, agent.address, agent.ports.clone()) {
            warn!(error = %e, "cannot connect the device");
            return Err(ConnectError::AddressTaken {
                address: agent.address,
                site: t.site.clone(),
                agent: agent.name.clone(),
            });
        }
        if !routed && let (Some(routes), IpAddr::V4(v4)) = (self.routes.as_mut(), agent.address) {
            debug!(device = %v4, "adding the host route");
            if let Err(e) = routes.add(v4).await {
                engine.disconnect(id, &agent.name);
                return Err(ConnectError::Route(v4, e.to_string()));
            }
        }
        let text = format!(
            "connected to {}/{}: device {}, ports {}",
            t.site,
            agent.name,
            agent.address,
            agent.ports_text()
        );
        info!(site = %t.site, agent = %agent.name, "connected");
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
        let pending: Vec<String> = std::mem::take(&mut t.pending).into_keys().collect();
        if t.agents.is_empty() {
            self.tunnels.remove(&sid);
            if let Some(e) = self.engine.as_mut() {
                e.remove_tunnel(TunnelId(sid));
            }
        }
        pending
    }

    /// Disconnects an agent (or the whole site tunnel with `None`): its ports go; the device's
    /// route goes with its last agent.
    pub async fn close(&mut self, sid: u32, agent: Option<&str>) {
        let Some(t) = self.tunnels.get_mut(&sid) else {
            return;
        };
        let id = TunnelId(sid);
        let mut unrouted = Vec::new();
        match agent {
            Some(a) => {
                t.pending.remove(a);
                t.agents.remove(a);
                if let Some(device) = self.engine.as_mut().and_then(|e| e.disconnect(id, a)) {
                    unrouted.push(device);
                }
            }
            None => {
                t.pending.clear();
                t.agents.clear();
            }
        }
        if t.agents.is_empty() && t.pending.is_empty() {
            self.tunnels.remove(&sid);
            if let Some(e) = self.engine.as_mut() {
                unrouted.extend(e.remove_tunnel(id));
            }
        }
        for device in unrouted {
            if let (Some(routes), IpAddr::V4(v4)) = (self.routes.as_mut(), device)
                && let Err(e) = routes.remove(v4).await
            {
                warn!(error = %e, "cannot remove a host route");
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
        self.engine = None;
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

    /// A packet read from the TUN (the first `first` bytes of `buf`), and what else the TUN already holds (up to a batch): the
    /// caller then writes the whole burst to the link at once.
    pub fn handle_tun_packets(&mut self, buf: &mut [u8], first: usize, now: Instant) {
        let (Some(engine), Some(tun)) = (self.engine.as_mut(), self.tun.as_ref()) else {
            return;
        };
        tun.feed(engine, buf, first, now);
        for _ in 1..pinhole_adapter::tun::BATCH {
            match tun.try_recv(buf) {
                Ok(n) => tun.feed(engine, buf, n, now),
                Err(_) => break,
            }
        }
    }

    /// Packets the engine refused with a local answer so far (a cheap check for "publish").
    pub fn answered(&self) -> u64 {
        self.engine.as_ref().map_or(0, |e| e.counters().2)
    }

    /// A datagram from a site.
    pub fn handle_datagram(&mut self, sid: u32, datagram: &[u8], now: Instant) {
        if let Some(e) = self.engine.as_mut() {
            e.handle_datagram(TunnelId(sid), datagram, now);
        }
    }

    /// WireGuard timers, flow and fragment expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(e) = self.engine.as_mut() {
            e.handle_timeout(now);
        }
    }

    /// Writes what the engine produced: packets to the TUN, datagrams to the gateway link.
    pub async fn flush(&mut self, core: &mut ClientCore, now: Instant) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        while let Some(t) = engine.poll_transmit() {
            match t.dest {
                Dest::Tun => {
                    if let Some(tun) = self.tun.as_ref() {
                        let _ = tun.send_packet(&t.bytes, t.offload).await;
                    }
                }
                Dest::Tunnel(id) => core.send_data(id.0, &t.bytes, now),
            }
            engine.recycle(t.bytes);
        }
    }

    /// What `pinhole status` shows: connected agents, the engine's counters, and per device
    /// what its agents' ports refused.
    pub fn views(&self) -> (Vec<SessionView>, FilterCounters, Vec<RefusedView>) {
        let mut views = Vec::new();
        let mut refused = Vec::new();
        for (sid, t) in &self.tunnels {
            let (bytes_in, bytes_out) = self
                .engine
                .as_ref()
                .map_or((0, 0), |e| e.bytes(TunnelId(*sid)));
            for c in t.agents.values() {
                views.push(SessionView {
                    site: t.site.clone(),
                    agent: c.agent.name.clone(),
                    device: c.agent.address,
                    ports: c.agent.ports_text(),
                    since: c.since.clone(),
                    bytes_out,
                    bytes_in,
                });
            }
            let Some(engine) = self.engine.as_ref() else {
                continue;
            };
            for (device, d) in engine.devices(TunnelId(*sid)) {
                let (count, last) = d.refused();
                if count == 0 {
                    continue;
                }
                refused.push(RefusedView {
                    device: *device,
                    agents: d.agents().map(|a| format!("{}/{a}", t.site)).collect(),
                    allowed: d
                        .allowed()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    count,
                    last: last.unwrap_or_default(),
                });
            }
        }
        let counters = match self.engine.as_ref() {
            Some(e) => {
                let (drops, passed, answered) = e.counters();
                let o = e.offload_counters();
                FilterCounters {
                    super_packets: SuperPackets {
                        sent: o.sent,
                        sent_bytes: o.sent_bytes,
                        received: o.received,
                        received_bytes: o.received_bytes,
                        split: o.split,
                    },
                    passed,
                    answered,
                    dropped: drops
                        .iter()
                        .map(|(r, n)| (r.name().to_owned(), *n))
                        .collect(),
                }
            }
            None => FilterCounters::default(),
        };
        (views, counters, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinhole_proto::{AgentType, Port};

    fn plc(addr: &str) -> Agent {
        Agent::new(
            "plc",
            AgentType::SiemensS7,
            addr.parse().expect("ip"),
            [Port::udp(161)],
        )
    }

    #[test]
    fn device_addresses_that_would_break_the_computer_are_refused() {
        let mut p = Plane::new(&AdapterConfig {
            tun_name: "pht-test".into(),
            other_sources: false,
        });
        p.set_gateway(Some("10.9.2.2".parse().expect("ip")));
        let sid = p.session_for("plant-a");
        for (addr, want) in [
            ("224.0.0.1", "unicast"),
            ("255.255.255.255", "unicast"),
            ("0.0.0.0", "unicast"),
            ("127.0.0.1", "unicast"),
            ("169.254.1.1", "unicast"),
            ("10.9.2.2", "gateway"),
        ] {
            let e = p.request(sid, &plc(addr)).expect_err(addr).to_string();
            assert!(e.contains(want), "{addr}: {e}");
        }
        assert!(p.request(sid, &plc("192.0.2.10")).is_ok());
    }

    #[test]
    fn an_answer_that_is_not_the_agent_asked_for_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut p = Plane::new(&AdapterConfig {
            tun_name: "pht-test".into(),
            other_sources: false,
        });
        let sid = p.session_for("plant-a");
        p.request(sid, &plc("192.0.2.10")).expect("request");
        // The same name, another address: refused, and nothing is left pending.
        let forged = plc("192.0.2.99");
        let key = Keypair::from_secret([3; 32]).public_hex();
        let e = rt
            .block_on(p.opened(sid, &key, forged, None))
            .expect_err("forged");
        assert!(matches!(e, ConnectError::NotAsked { .. }), "{e}");
        assert!(e.to_string().contains("192.0.2.10"), "{e}");
        // Another name altogether.
        p.request(sid, &plc("192.0.2.10")).expect("request");
        let mut other = plc("192.0.2.10");
        other.name = "other".into();
        assert!(rt.block_on(p.opened(sid, &key, other, None)).is_err());
    }
}
