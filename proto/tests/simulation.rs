//! Deterministic simulation: gateway, site and client cores wired over an in-memory network
//! with a virtual clock. No sockets, no sleeps; a run takes milliseconds and always unfolds
//! the same way.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use pinhole_proto::{
    Agent, AgentType, Backoff, ClientCore, ClientEvent, CloseReason, ErrorCode, GatewayCore,
    GatewayEvent, PeerAuth, SiteCore, SiteEvent, SiteHello, SiteView,
};

/// One direction of a connection: bytes in flight with their delivery time.
#[derive(Default)]
struct Pipe(VecDeque<(Instant, Vec<u8>)>);

/// A peer of the gateway, on the far end of one connection.
enum Peer {
    Client(ClientCore),
    Site(SiteCore),
}

struct Conn {
    peer: Peer,
    gw: GatewayCore,
    up: Pipe,
    down: Pipe,
    /// A partitioned connection silently drops everything.
    partitioned: bool,
}

/// The gateway's registry, reduced to what the control plane needs.
struct Registry {
    /// site name → (domain, online, agents)
    sites: BTreeMap<String, (String, bool, Vec<Agent>)>,
    /// account → granted domains
    grants: BTreeMap<String, Vec<String>>,
    closed_accounts: Vec<String>,
}

impl Registry {
    fn visible(&self, account: &str) -> Vec<SiteView> {
        let grants = self.grants.get(account).cloned().unwrap_or_default();
        self.sites
            .iter()
            .filter(|(_, (domain, _, _))| {
                grants
                    .iter()
                    .any(|g| domain == g || domain.starts_with(&format!("{g}.")))
            })
            .map(|(name, (domain, online, agents))| SiteView {
                name: name.clone(),
                domain: domain.clone(),
                online: *online,
                agents: agents.clone(),
            })
            .collect()
    }
}

struct Sim {
    now: Instant,
    latency: Duration,
    conns: Vec<Conn>,
    registry: Registry,
    client_events: Vec<ClientEvent>,
    site_events: Vec<SiteEvent>,
    gateway_log: Vec<String>,
}

const SITE_HEARTBEAT: Duration = Duration::from_secs(10);

fn agents() -> Vec<Agent> {
    vec![Agent::new(
        "press-4-plc",
        AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    )]
}

impl Sim {
    fn new() -> Self {
        let mut sites = BTreeMap::new();
        sites.insert(
            "plant-a".to_owned(),
            ("acme.plant-a".to_owned(), false, Vec::new()),
        );
        sites.insert("plant-z".to_owned(), ("zeta".to_owned(), false, Vec::new()));
        let mut grants = BTreeMap::new();
        grants.insert("alice".to_owned(), vec!["acme".to_owned()]);
        Self {
            now: Instant::now(),
            latency: Duration::from_millis(20),
            conns: Vec::new(),
            registry: Registry {
                sites,
                grants,
                closed_accounts: Vec::new(),
            },
            client_events: Vec::new(),
            site_events: Vec::new(),
            gateway_log: Vec::new(),
        }
    }

    fn add(&mut self, peer: Peer, auth: PeerAuth) -> usize {
        self.conns.push(Conn {
            peer,
            gw: GatewayCore::new(self.now, auth),
            up: Pipe::default(),
            down: Pipe::default(),
            partitioned: false,
        });
        self.conns.len() - 1
    }

    fn connect_site(&mut self, name: &str) -> usize {
        let site = SiteCore::new(
            self.now,
            SiteHello {
                software: "0.1.0".into(),
                boot_id: "boot-1".into(),
                heartbeat: SITE_HEARTBEAT,
                agents: agents(),
            },
        );
        self.add(Peer::Site(site), PeerAuth::Site(name.into()))
    }

    fn connect_client(&mut self, account: &str) -> usize {
        let client = ClientCore::new(self.now, "0.1.0", Duration::from_secs(15));
        self.add(Peer::Client(client), PeerAuth::Technician(account.into()))
    }

    fn gateway_event(&mut self, i: usize, ev: GatewayEvent) {
        let now = self.now;
        let auth = self.conns[i].gw.auth().clone();
        self.gateway_log.push(format!("{auth:?} {ev:?}"));
        match (auth, ev) {
            (PeerAuth::Technician(a), GatewayEvent::TechnicianHello { .. }) => {
                if self.registry.closed_accounts.contains(&a) {
                    self.conns[i]
                        .gw
                        .refuse(ErrorCode::AccountClosed, "account closed", now);
                } else {
                    let inv = self.registry.visible(&a);
                    let ip = "100.64.0.2".parse().expect("ip");
                    self.conns[i].gw.welcome(&a, Some(ip), Some(inv), now);
                }
            }
            (PeerAuth::Technician(a), GatewayEvent::List) => {
                let inv = self.registry.visible(&a);
                self.conns[i].gw.inventory(inv, false, now);
            }
            (PeerAuth::Site(s), GatewayEvent::SiteHello { agents, .. }) => {
                if let Some(entry) = self.registry.sites.get_mut(&s) {
                    entry.1 = true;
                    entry.2 = agents;
                    self.conns[i].gw.welcome(&s, None, None, now);
                } else {
                    self.conns[i]
                        .gw
                        .refuse(ErrorCode::UnknownSite, "unknown site", now);
                }
            }
            (PeerAuth::Site(s), GatewayEvent::Closed(_)) => {
                if let Some(entry) = self.registry.sites.get_mut(&s) {
                    entry.1 = false;
                }
            }
            _ => {}
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.conns
            .iter()
            .flat_map(|c| {
                [
                    c.up.0.front().map(|x| x.0),
                    c.down.0.front().map(|x| x.0),
                    c.gw.poll_timeout(),
                    match &c.peer {
                        Peer::Client(p) => p.poll_timeout(),
                        Peer::Site(p) => p.poll_timeout(),
                    },
                ]
            })
            .flatten()
            .min()
    }

    /// Moves bytes, fires timers and handles events until `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            self.pump();
            match self.next_wakeup() {
                Some(t) if t <= until => self.now = self.now.max(t),
                _ => {
                    self.now = until;
                    self.pump();
                    return;
                }
            }
        }
    }

    fn pump(&mut self) {
        let now = self.now;
        let latency = self.latency;
        for i in 0..self.conns.len() {
            let c = &mut self.conns[i];
            // Timers.
            if c.gw.poll_timeout().is_some_and(|t| t <= now) {
                c.gw.handle_timeout(now);
            }
            match &mut c.peer {
                Peer::Client(p) if p.poll_timeout().is_some_and(|t| t <= now) => {
                    p.handle_timeout(now)
                }
                Peer::Site(p) if p.poll_timeout().is_some_and(|t| t <= now) => {
                    p.handle_timeout(now)
                }
                _ => {}
            }
            // Deliver.
            while c.up.0.front().is_some_and(|x| x.0 <= now) {
                let (_, b) = c.up.0.pop_front().expect("front");
                // This simulation relays no data.
                c.gw.handle_input(&b, now, &mut |_, _| {});
            }
            while c.down.0.front().is_some_and(|x| x.0 <= now) {
                let (_, b) = c.down.0.pop_front().expect("front");
                match &mut c.peer {
                    Peer::Client(p) => p.handle_input(&b, now),
                    Peer::Site(p) => p.handle_input(&b, now),
                }
            }
            // Events.
            while let Some(ev) = self.conns[i].gw.poll_event() {
                self.gateway_event(i, ev);
            }
            match &mut self.conns[i].peer {
                Peer::Client(p) => {
                    while let Some(ev) = p.poll_event() {
                        self.client_events.push(ev)
                    }
                }
                Peer::Site(p) => {
                    while let Some(ev) = p.poll_event() {
                        self.site_events.push(ev)
                    }
                }
            }
            let c = &mut self.conns[i];
            // Transmit.
            let out = match &mut c.peer {
                Peer::Client(p) => p.poll_transmit(),
                Peer::Site(p) => p.poll_transmit(),
            };
            if let Some(b) = out.filter(|_| !c.partitioned) {
                c.up.0.push_back((now + latency, b));
            }
            if let Some(b) = c.gw.poll_transmit().filter(|_| !c.partitioned) {
                c.down.0.push_back((now + latency, b));
            }
        }
    }

    fn client(&mut self, i: usize) -> &mut ClientCore {
        match &mut self.conns[i].peer {
            Peer::Client(c) => c,
            Peer::Site(_) => panic!("not a client"),
        }
    }

    fn site(&mut self, i: usize) -> &mut SiteCore {
        match &mut self.conns[i].peer {
            Peer::Site(s) => s,
            Peer::Client(_) => panic!("not a site"),
        }
    }

    fn after(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }
}

fn last_inventory(events: &[ClientEvent]) -> Option<Vec<SiteView>> {
    events.iter().rev().find_map(|e| match e {
        ClientEvent::LoggedIn { sites, .. } | ClientEvent::Inventory(sites) => Some(sites.clone()),
        _ => None,
    })
}

#[test]
fn login_shows_exactly_the_granted_sites() {
    let mut sim = Sim::new();
    let s = sim.connect_site("plant-a");
    sim.connect_site("plant-z");
    sim.after(Duration::from_millis(100));
    assert!(sim.site(s).is_welcomed());
    let c = sim.connect_client("alice");
    sim.after(Duration::from_millis(100));
    assert!(sim.client(c).is_logged_in());
    let inv = last_inventory(&sim.client_events).expect("inventory");
    assert_eq!(inv.len(), 1, "plant-z is in an ungranted domain: {inv:?}");
    assert_eq!(inv[0].name, "plant-a");
    assert!(inv[0].online);
    assert_eq!(inv[0].agents, agents());
}

#[test]
fn heartbeats_keep_an_idle_link_alive_and_silence_ends_it() {
    let mut sim = Sim::new();
    let s = sim.connect_site("plant-a");
    let c = sim.connect_client("alice");
    // An hour of idleness: heartbeats flow, nothing closes.
    sim.after(Duration::from_secs(3600));
    assert!(sim.site(s).is_welcomed());
    assert!(sim.client(c).is_logged_in());
    assert!(
        !sim.site_events
            .iter()
            .any(|e| matches!(e, SiteEvent::Closed(_)))
    );

    // The site's path goes silent: both ends notice within 3 heartbeats (+ latency).
    sim.conns[s].partitioned = true;
    sim.after(SITE_HEARTBEAT * 3 + Duration::from_secs(1));
    assert!(sim.conns[s].gw.is_closed());
    assert!(
        sim.gateway_log
            .iter()
            .any(|l| l.contains("Site(\"plant-a\") Closed(Timeout)")),
        "{:?}",
        sim.gateway_log
    );
    assert!(
        sim.site_events
            .contains(&SiteEvent::Closed(CloseReason::Timeout))
    );

    // The technician sees the site offline.
    let now = sim.now;
    sim.client(c).list(now);
    sim.after(Duration::from_millis(100));
    let inv = last_inventory(&sim.client_events).expect("inventory");
    assert!(!inv[0].online);
}

#[test]
fn site_reconnects_with_backoff_after_loss() {
    let mut sim = Sim::new();
    let s = sim.connect_site("plant-a");
    sim.after(Duration::from_secs(1));
    sim.conns[s].partitioned = true;
    sim.after(SITE_HEARTBEAT * 4);
    assert!(sim.site(s).is_closed());
    // The driver waits per the backoff, then dials again: a fresh core on a fresh connection.
    let mut backoff = Backoff::new();
    let delay = backoff.next_delay(12345);
    assert!(delay <= Duration::from_secs(1));
    sim.after(delay);
    let s2 = sim.connect_site("plant-a");
    sim.after(Duration::from_millis(100));
    assert!(sim.site(s2).is_welcomed());
    let c = sim.connect_client("alice");
    sim.after(Duration::from_millis(100));
    assert!(sim.client(c).is_logged_in());
    assert!(last_inventory(&sim.client_events).expect("inv")[0].online);
}

#[test]
fn closed_account_is_refused_with_its_code() {
    let mut sim = Sim::new();
    sim.registry.closed_accounts.push("alice".into());
    let c = sim.connect_client("alice");
    sim.after(Duration::from_millis(100));
    assert!(sim.client(c).is_closed());
    assert!(sim.client_events.iter().any(|e| matches!(
        e,
        ClientEvent::Closed(CloseReason::Error {
            code: ErrorCode::AccountClosed,
            ..
        })
    )));
}

#[test]
fn a_peer_that_never_says_hello_is_dropped() {
    let now = Instant::now();
    let mut gw = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
    let deadline = gw.poll_timeout().expect("timer");
    assert!(deadline <= now + pinhole_proto::gateway::HELLO_TIMEOUT);
    gw.handle_timeout(deadline);
    assert!(gw.is_closed());
    assert_eq!(
        gw.poll_event(),
        Some(GatewayEvent::Closed(CloseReason::Timeout))
    );
}

#[test]
fn wrong_role_and_garbage_close_only_that_link() {
    let now = Instant::now();
    // A site certificate whose peer claims to be a technician.
    let mut gw = GatewayCore::new(now, PeerAuth::Site("plant-a".into()));
    let mut client = ClientCore::new(now, "0.1.0", Duration::from_secs(15));
    gw.handle_input(&client.poll_transmit().expect("hello"), now, &mut |_, _| {});
    assert!(gw.is_closed());
    assert!(matches!(
        gw.poll_event(),
        Some(GatewayEvent::Closed(CloseReason::Protocol(_)))
    ));
    // Garbage on another link.
    let mut gw2 = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
    gw2.handle_input(b"GET / HTTP/1.1\r\n\r\n", now, &mut |_, _| {});
    assert!(gw2.is_closed());
    // A third, healthy link is unaffected.
    let mut gw3 = GatewayCore::new(now, PeerAuth::Technician("bob".into()));
    let mut c3 = ClientCore::new(now, "0.1.0", Duration::from_secs(15));
    gw3.handle_input(&c3.poll_transmit().expect("hello"), now, &mut |_, _| {});
    assert!(matches!(
        gw3.poll_event(),
        Some(GatewayEvent::TechnicianHello { .. })
    ));
    assert!(!gw3.is_closed());
}
