//! Deterministic simulation: the real hub (with the real SQLite registry in a temporary
//! directory), the real gateway link cores, and the real client and site cores, wired over an
//! in-memory network with a virtual clock. No sockets, no sleeps.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pinhole_certs::Role;
use pinhole_gateway::audit::{self, Actor};
use pinhole_gateway::hub::{Command, Hub, Issuer, LinkId, Presented};
use pinhole_gateway::registry::Issued;
use pinhole_gateway::store::Store;
use pinhole_proto::{
    Agent, AgentType, ClientCore, ClientEvent, CloseReason, ErrorCode, GatewayCore, GatewayEvent,
    SiteCore, SiteEvent, SiteHello, SiteView,
};

struct NoIssuer;

impl Issuer for NoIssuer {
    fn issue_site(&self, _: &str, _: &[u8]) -> Result<Issued, String> {
        Err("not in this simulation".into())
    }
    fn ca_certificate(&self) -> &[u8] {
        b""
    }
}

#[derive(Default)]
struct Pipe(VecDeque<(Instant, Vec<u8>)>);

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
    /// The gateway side has reported this link's end to the hub.
    ended: bool,
    client_events: Vec<ClientEvent>,
    site_events: Vec<SiteEvent>,
}

/// WireGuard public keys travel as 64 hex digits.
static CLIENT_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "c1".repeat(32));
static SITE_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| "5e".repeat(32));

const SITE_HEARTBEAT: Duration = Duration::from_secs(10);
const CLIENT_HEARTBEAT: Duration = Duration::from_secs(15);

fn plc() -> Agent {
    Agent::new(
        "plc",
        AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    )
}

struct Sim {
    _dir: tempfile::TempDir,
    store: Store,
    hub: Hub<LinkId>,
    now: Instant,
    latency: Duration,
    conns: Vec<Conn>,
}

impl Sim {
    /// Domains acme.plant-a and zeta, sites plant-a (serial 0xa) and plant-z (0xb), accounts
    /// alice (granted acme) and bob (no grant).
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = Store::open(&dir.path().join("gateway.db")).expect("db");
        let a = Actor::System;
        store
            .create_domain(&a, &"acme.plant-a".parse().expect("d"))
            .expect("d");
        store
            .create_domain(&a, &"zeta".parse().expect("d"))
            .expect("d");
        for (site, domain, serial) in [("plant-a", "acme.plant-a", 0xa), ("plant-z", "zeta", 0xb)] {
            let (tok, _) = store
                .create_token(&a, &domain.parse().expect("d"), Duration::from_secs(60))
                .expect("token");
            store
                .enroll(&tok, site, || Ok((vec![1], vec![serial])))
                .expect("enroll");
        }
        store
            .create_account(&a, "alice", &[0xa1], 365)
            .expect("alice");
        store.create_account(&a, "bob", &[0xb0], 365).expect("bob");
        store
            .set_grant(&a, "alice", &"acme".parse().expect("d"), true)
            .expect("grant");
        let now = Instant::now();
        Self {
            _dir: dir,
            store,
            hub: Hub::new(Box::new(NoIssuer), now),
            now,
            latency: Duration::from_millis(20),
            conns: Vec::new(),
        }
    }

    fn add(&mut self, peer: Peer, role: Role, name: &str, serial: u8) -> usize {
        let link = self.conns.len();
        let presented = Presented {
            role,
            name: name.into(),
            serial: vec![serial],
            expires: self.now + Duration::from_secs(365 * 86400),
        };
        let auth = self
            .hub
            .handle_connect(
                &mut self.store,
                link as LinkId,
                link as LinkId,
                "192.0.2.1:443".parse().expect("addr"),
                Some(presented),
                self.now,
            )
            .expect("current certificate");
        self.conns.push(Conn {
            peer,
            gw: GatewayCore::new(self.now, auth),
            up: Pipe::default(),
            down: Pipe::default(),
            partitioned: false,
            ended: false,
            client_events: Vec::new(),
            site_events: Vec::new(),
        });
        link
    }

    fn connect_site(&mut self, name: &str, serial: u8) -> usize {
        let site = SiteCore::new(
            self.now,
            SiteHello {
                software: "0.1.0".into(),
                boot_id: "boot-1".into(),
                heartbeat: SITE_HEARTBEAT,
                agents: vec![plc()],
                offload: true,
            },
        );
        self.add(Peer::Site(site), Role::Site, name, serial)
    }

    fn connect_client(&mut self, account: &str, serial: u8) -> usize {
        let c = ClientCore::new(self.now, "0.1.0", CLIENT_HEARTBEAT);
        self.add(Peer::Client(c), Role::Technician, account, serial)
    }

    fn apply(&mut self, cmds: Vec<Command>) {
        for c in cmds {
            let i = c.link() as usize;
            if let Some(conn) = self.conns.get_mut(i) {
                c.apply(&mut conn.gw, self.now);
                if let Some(b) = conn.gw.poll_transmit().filter(|_| !conn.partitioned) {
                    conn.down.0.push_back((self.now + self.latency, b));
                }
            }
        }
    }

    /// The link's end as its driver reports it (EOF, timeout, or the gateway closed it).
    fn end(&mut self, i: usize, reason: CloseReason) {
        if !self.conns[i].ended {
            self.conns[i].ended = true;
            let cmds = self
                .hub
                .handle_closed(&mut self.store, i as LinkId, &reason, self.now);
            self.apply(cmds);
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.conns
            .iter()
            .flat_map(|c| {
                let live = !c.ended;
                [
                    c.up.0.front().map(|x| x.0).filter(|_| live),
                    c.down.0.front().map(|x| x.0),
                    c.gw.poll_timeout().filter(|_| live),
                    match &c.peer {
                        Peer::Client(p) => p.poll_timeout(),
                        Peer::Site(p) => p.poll_timeout(),
                    },
                ]
            })
            .chain([self.hub.poll_timeout()])
            .flatten()
            .min()
    }

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

    fn after(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    fn pump(&mut self) {
        let now = self.now;
        if self.hub.poll_timeout().is_some_and(|t| t <= now) {
            let cmds = self.hub.handle_timeout(&mut self.store, now);
            self.apply(cmds);
        }
        for i in 0..self.conns.len() {
            let latency = self.latency;
            let mut forwards: Vec<(usize, u32, Vec<u8>)> = Vec::new();
            {
                let c = &mut self.conns[i];
                match &mut c.peer {
                    Peer::Client(p) if p.poll_timeout().is_some_and(|t| t <= now) => {
                        p.handle_timeout(now)
                    }
                    Peer::Site(p) if p.poll_timeout().is_some_and(|t| t <= now) => {
                        p.handle_timeout(now)
                    }
                    _ => {}
                }
                if c.ended {
                    // The peer's bytes have nowhere to go; what the gateway sent still arrives.
                    c.up.0.clear();
                }
                if !c.ended && c.gw.poll_timeout().is_some_and(|t| t <= now) {
                    c.gw.handle_timeout(now);
                }
                let hub = &mut self.hub;
                while c.up.0.front().is_some_and(|x| x.0 <= now) {
                    let (_, b) = c.up.0.pop_front().expect("front");
                    c.gw.handle_input(&b, now, &mut |session, datagram| {
                        if let Some(r) = hub.route(i as LinkId, session, datagram.len()) {
                            forwards.push((r.to as usize, r.session, datagram.to_vec()));
                        }
                    });
                }
                while c.down.0.front().is_some_and(|x| x.0 <= now) {
                    let (_, b) = c.down.0.pop_front().expect("front");
                    match &mut c.peer {
                        Peer::Client(p) => p.handle_input(&b, now),
                        Peer::Site(p) => p.handle_input(&b, now),
                    }
                }
            }
            for (to, session, datagram) in forwards {
                self.conns[to].gw.send_data(session, &datagram, now);
            }
            let mut closed = None;
            while let Some(ev) = self.conns[i].gw.poll_event() {
                match ev {
                    GatewayEvent::Closed(r) => closed = Some(r),
                    ev => {
                        let cmds = self.hub.handle_event(&mut self.store, i as LinkId, ev, now);
                        self.apply(cmds);
                    }
                }
            }
            let c = &mut self.conns[i];
            match &mut c.peer {
                Peer::Client(p) => {
                    while let Some(ev) = p.poll_event() {
                        c.client_events.push(ev);
                    }
                }
                Peer::Site(p) => {
                    while let Some(ev) = p.poll_event() {
                        c.site_events.push(ev);
                    }
                }
            }
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
            if c.gw.is_closed() {
                self.end(i, closed.unwrap_or(CloseReason::Local));
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

    fn admin_change(&mut self) {
        let cmds = self.hub.handle_admin_change(&mut self.store, self.now);
        self.apply(cmds);
        self.after(Duration::from_millis(300));
    }

    fn audit(&self) -> Vec<String> {
        audit::list(self.store.conn(), None)
            .expect("audit")
            .into_iter()
            .map(|r| format!("{} | {}", r.event, r.description))
            .collect()
    }

    /// alice on a new connection opens plant-a/plc; the site accepts. Returns (client
    /// connection, site connection, the session id the site knows).
    fn session(&mut self) -> (usize, usize, u32) {
        let s = self.connect_site("plant-a", 0xa);
        let c = self.connect_client("alice", 0xa1);
        self.after(Duration::from_millis(100));
        let now = self.now;
        self.client(c)
            .open_session(1, "plant-a", "plc", &CLIENT_KEY, now);
        self.after(Duration::from_millis(100));
        let gsid = self.conns[s]
            .site_events
            .iter()
            .find_map(|e| match e {
                SiteEvent::SessionOpen { session, agent, .. } if agent == "plc" => Some(*session),
                _ => None,
            })
            .unwrap_or_else(|| {
                panic!(
                    "the site was not asked: site {:?}; client {:?}; audit {:#?}",
                    self.conns[s].site_events,
                    self.conns[c].client_events,
                    self.audit()
                )
            });
        let now = self.now;
        self.site(s).session_opened(gsid, &SITE_KEY, plc(), now);
        self.after(Duration::from_millis(100));
        (c, s, gsid)
    }
}

fn last_inventory(events: &[ClientEvent]) -> Option<Vec<SiteView>> {
    events.iter().rev().find_map(|e| match e {
        ClientEvent::LoggedIn { sites, .. } | ClientEvent::Inventory(sites) => Some(sites.clone()),
        _ => None,
    })
}

fn closed_with(events: &[ClientEvent], code: ErrorCode) -> bool {
    events
        .iter()
        .any(|e| matches!(e, ClientEvent::Closed(CloseReason::Error { code: c, .. }) if *c == code))
}

#[test]
fn login_inventory_session_relay_and_close() {
    let mut sim = Sim::new();
    sim.connect_site("plant-z", 0xb);
    let (c, s, gsid) = sim.session();
    let inv = last_inventory(&sim.conns[c].client_events).expect("inventory");
    assert_eq!(inv.len(), 1, "plant-z is in an ungranted domain: {inv:?}");
    assert_eq!((inv[0].name.as_str(), inv[0].online), ("plant-a", true));
    assert!(sim.conns[c].client_events.iter().any(|e| matches!(e,
        ClientEvent::SessionOpened { session: 1, agent, key, offload: Some(pinhole_proto::gateway::MAX_DATAGRAM) } if *agent == plc() && *key == *SITE_KEY)));

    // Data both ways, through the hub's relay table.
    let now = sim.now;
    sim.client(c).send_data(1, b"hello plc", now);
    sim.site(s).send_data(gsid, b"hello tech", now);
    sim.after(Duration::from_millis(100));
    assert!(sim.conns[s].site_events.iter().any(|e| matches!(e,
        SiteEvent::Data { session, datagram } if *session == gsid && datagram == b"hello plc")));
    assert!(sim.conns[c].client_events.iter().any(|e| matches!(e,
        ClientEvent::Data { session: 1, datagram } if datagram == b"hello tech")));

    let now = sim.now;
    sim.client(c).close_session(1, None, "done", now);
    sim.after(Duration::from_millis(100));
    assert!(sim.conns[s].site_events.iter().any(|e| matches!(e,
        SiteEvent::SessionClose { session, .. } if *session == gsid)));
    let audit = sim.audit();
    assert!(
        audit
            .iter()
            .any(|e| e.starts_with("session opened | alice connected to plant-a/plc")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|e| e.starts_with("session closed")
            && e.contains("(done); 9 bytes to the site, 10 bytes from it")),
        "{audit:#?}"
    );
}

#[test]
fn account_close_ends_link_and_session_at_every_party() {
    let mut sim = Sim::new();
    let (c, s, gsid) = sim.session();
    sim.store
        .close_account(&Actor::System, "alice")
        .expect("close");
    sim.admin_change();
    assert!(closed_with(
        &sim.conns[c].client_events,
        ErrorCode::AccountClosed
    ));
    assert!(sim.conns[s].site_events.iter().any(|e| matches!(e,
        SiteEvent::SessionClose { session, .. } if *session == gsid)));
    assert_eq!(sim.hub.sessions(), 0);
    // And alice cannot come back.
    let c2 = sim.connect_client("alice", 0xa1);
    sim.after(Duration::from_millis(100));
    assert!(closed_with(
        &sim.conns[c2].client_events,
        ErrorCode::AccountClosed
    ));
}

#[test]
fn grant_removal_ends_the_session_and_empties_the_inventory() {
    let mut sim = Sim::new();
    let (c, s, _) = sim.session();
    sim.store
        .set_grant(&Actor::System, "alice", &"acme".parse().expect("d"), false)
        .expect("ungrant");
    sim.admin_change();
    assert!(
        sim.conns[c]
            .client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::SessionClosed { session: 1, .. }))
    );
    assert!(
        sim.conns[s]
            .site_events
            .iter()
            .any(|e| matches!(e, SiteEvent::SessionClose { .. }))
    );
    assert_eq!(
        last_inventory(&sim.conns[c].client_events),
        Some(Vec::new())
    );
    assert!(
        sim.client(c).is_logged_in(),
        "the technician stays logged in"
    );
}

#[test]
fn site_switch_off_ends_sessions_and_shows_offline() {
    let mut sim = Sim::new();
    let (c, s, _) = sim.session();
    // The switch says off: the site closes its connection.
    sim.conns[s].partitioned = true;
    sim.end(s, CloseReason::Local);
    sim.after(Duration::from_millis(500));
    assert!(
        sim.conns[c]
            .client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::SessionClosed { session: 1, .. }))
    );
    let inv = last_inventory(&sim.conns[c].client_events).expect("inventory");
    assert!(!inv[0].online, "{inv:?}");
    // Asking again is refused with a reason.
    let now = sim.now;
    sim.client(c)
        .open_session(2, "plant-a", "plc", &CLIENT_KEY, now);
    sim.after(Duration::from_millis(100));
    assert!(sim.conns[c].client_events.iter().any(|e| matches!(e,
        ClientEvent::SessionRefused { session: 2, reason } if reason.contains("offline"))));
}

#[test]
fn link_loss_is_noticed_by_heartbeats_and_recorded() {
    let mut sim = Sim::new();
    let (c, s, _) = sim.session();
    // An hour of idleness first: heartbeats flow, nothing closes.
    sim.after(Duration::from_secs(3600));
    assert!(sim.site(s).is_welcomed() && sim.client(c).is_logged_in());
    assert_eq!(sim.hub.sessions(), 1);
    sim.conns[s].partitioned = true;
    sim.after(SITE_HEARTBEAT * 3 + Duration::from_secs(1));
    assert!(sim.conns[s].ended);
    assert!(
        sim.audit()
            .iter()
            .any(|e| e.starts_with("site heartbeat missed | no heartbeat from site plant-a"))
    );
    assert!(
        sim.conns[c]
            .client_events
            .iter()
            .any(|e| matches!(e, ClientEvent::SessionClosed { session: 1, .. }))
    );
    assert!(!sim.hub.site_online("plant-a"));
}

#[test]
fn a_gateway_restart_starts_clean_and_everyone_comes_back() {
    let mut sim = Sim::new();
    let _ = sim.session();
    // The gateway process goes away: its hub and every link with it.
    sim.store.mark_all_offline().expect("offline");
    sim.hub = Hub::new(Box::new(NoIssuer), sim.now);
    for c in &mut sim.conns {
        c.ended = true;
        c.partitioned = true;
    }
    let s = sim.connect_site("plant-a", 0xa);
    let c = sim.connect_client("alice", 0xa1);
    sim.after(Duration::from_millis(500));
    assert!(sim.site(s).is_welcomed());
    let inv = last_inventory(&sim.conns[c].client_events).expect("inventory");
    assert!(inv[0].online);
    assert_eq!(sim.hub.sessions(), 0, "no session survives a restart");
}

#[test]
fn a_technician_without_grant_cannot_open_and_a_closed_agent_is_refused() {
    let mut sim = Sim::new();
    sim.connect_site("plant-a", 0xa);
    let b = sim.connect_client("bob", 0xb0);
    sim.after(Duration::from_millis(100));
    let now = sim.now;
    sim.client(b)
        .open_session(1, "plant-a", "plc", &CLIENT_KEY, now);
    sim.client(b)
        .open_session(2, "plant-z", "nothing", &CLIENT_KEY, now);
    sim.after(Duration::from_millis(100));
    let refusals: Vec<&String> = sim.conns[b]
        .client_events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::SessionRefused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(
        refusals.iter().all(|r| r.contains("no access")),
        "{refusals:?}"
    );
    assert_eq!(sim.hub.sessions(), 0);
}
