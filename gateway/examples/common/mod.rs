//! What the gateway's bench tools (`load`, `flood`) share: dialing the gateway with the
//! programs' own dial and link driver (`pinhole-shell`) from a chosen loopback source, raw TCP
//! and TLS for the attackers, the fixture of enrolled sites and technician accounts,
//! simulated sites (reconnecting with the real site's backoff) and technicians (with or without
//! a live session that relays a datagram a second), one-shot login probes, and /proc readings.
//! Not part of the product.
#![allow(dead_code)] // each tool uses its part

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use pinhole_certs::{
    GatewayAddress, GatewayInfo, Identity, Pin, PinnedServerVerifier, Validity, tls,
};
use pinhole_gateway::audit::Actor;
use pinhole_gateway::state::StateDir;
use pinhole_proto::{
    Agent, AgentType, Backoff, ClientCore, ClientEvent, SiteCore, SiteEvent, SiteHello,
};
use pinhole_shell::{Dialer, Handler, Lost, Stream, drive};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio_rustls::TlsConnector;

/// The WireGuard key simulated sites answer with: X25519's base point, a valid public key.
pub const SITE_KEY: &str = "0900000000000000000000000000000000000000000000000000000000000000";

/// The key simulated technicians send.
pub const CLIENT_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

/// Simulated sites and technicians are idle: a heartbeat an hour.
pub const IDLE_HEARTBEAT: Duration = Duration::from_secs(3600);

/// The `n`-th loopback address from block `second` on: 127.second.(n / 250).(n % 250 + 1),
/// spilling into the next blocks past 62 500 (100 000 sites take blocks 2 and 3). The gateway
/// caps unwelcomed connections per source address, so simulated peers that stand for distinct
/// plants or PCs dial from distinct addresses, as they would on the internet; each address also
/// has its own 28 000 ephemeral ports, so 100 000 links never run out of them.
pub fn loopback(second: u8, n: u32) -> IpAddr {
    const PER_BLOCK: u32 = 250 * 250;
    let second = u8::try_from(u32::from(second) + n / PER_BLOCK).expect("within 127/8");
    let n = n % PER_BLOCK;
    let third = u8::try_from(n / 250).expect("below 250");
    let fourth = u8::try_from(n % 250 + 1).expect("below 251");
    IpAddr::V4(Ipv4Addr::new(127, second, third, fourth))
}

/// A gateway under test, started as its own process (`serve`) so that it can be stopped with
/// SIGTERM and started again on the same state. Killed if dropped while it runs: a tool or
/// test that fails leaves no gateway behind.
pub struct Gateway {
    child: Child,
    /// Where its standard error (the log) is appended.
    pub log: PathBuf,
    /// When it was started.
    pub started: Instant,
    /// From the start until it said it is listening.
    pub up: Duration,
}

impl Gateway {
    /// Starts `bin --state STATE serve --listen LISTEN`, its log appended to `log`, and waits
    /// until the log says "listening"; an error if that takes longer than `limit`.
    pub fn start(
        bin: &Path,
        state: &Path,
        listen: SocketAddr,
        log: &Path,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let from = std::fs::metadata(log).map_or(0, |m| m.len());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("--state")
            .arg(state)
            .arg("serve")
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut gw = Self {
            child,
            log: log.to_owned(),
            started,
            up: Duration::ZERO,
        };
        let deadline = started + limit;
        loop {
            let text = std::fs::read(log).unwrap_or_default();
            let new = String::from_utf8_lossy(&text[usize::try_from(from)?.min(text.len())..])
                .into_owned();
            if new.contains("listening") {
                gw.up = started.elapsed();
                return Ok(gw);
            }
            if let Some(status) = gw.child.try_wait()? {
                bail!("the gateway exited ({status}) before listening:\n{new}");
            }
            if Instant::now() > deadline {
                bail!("the gateway did not start:\n{new}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit; returns how long the stop took and how it exited.
    pub fn stop(mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let t = Instant::now();
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success();
        if !ok {
            bail!("kill -TERM {pid} failed");
        }
        let status = self.child.wait()?;
        Ok((t.elapsed(), status))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's descriptor limit to the hard one (thousands of links per tool).
pub fn raise_nofile() -> u64 {
    pinhole_gateway::listen::raise_nofile_limit()
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of `pid`, in KB.
pub fn rss_kb(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// utime + stime of `pid` in clock ticks (100 per second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

/// Open descriptors of `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A TCP connection to `addr` from `source` (any local address if `None`).
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// A site's or technician's link to the gateway at `addr` with `config`, from `source`: the
/// programs' own dial.
pub async fn tls_link(
    addr: SocketAddr,
    source: Option<IpAddr>,
    config: Arc<ClientConfig>,
) -> anyhow::Result<Stream> {
    let address: GatewayAddress = addr.to_string().parse()?;
    let mut dialer = Dialer::new(vec![address]);
    if let Some(ip) = source {
        dialer = dialer.from_source(ip);
    }
    Ok(dialer.dial(config).await?.stream)
}

/// The TLS handshake on a connected `tcp` to `addr` (an attacker's: no socket options).
pub async fn tls_over(
    addr: SocketAddr,
    tcp: TcpStream,
    config: Arc<ClientConfig>,
) -> std::io::Result<Stream> {
    tcp.set_nodelay(true)?;
    TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// The client configuration of a site or technician: its certificate, the gateway's pin.
pub fn peer_config(identity: &Identity, pin: Pin) -> anyhow::Result<Arc<ClientConfig>> {
    Ok(Arc::new(tls::client_config(
        identity,
        PinnedServerVerifier::new(pin),
    )?))
}

/// The configuration of an anonymous peer (no certificate, any server key): what an attacker
/// or an enrolling site presents.
pub fn anonymous_config() -> anyhow::Result<Arc<ClientConfig>> {
    Ok(Arc::new(tls::enrollment_client_config(
        pinhole_certs::danger::AcceptAnyServer::new(),
    )?))
}

/// Sites and technician accounts, created directly in the gateway's state (the library calls
/// the CLI makes). Every account is granted the domain `load`, which holds every site.
pub struct Fixture {
    pub pin: Pin,
    pub sites: Vec<(String, Identity)>,
    pub techs: Vec<(String, Identity)>,
}

pub fn fixture(state: &Path, sites: usize, techs: usize) -> anyhow::Result<Fixture> {
    fixture_grouped(state, sites, techs, None)
}

/// One site made by the fixture: name, identity, certificate (DER), serial.
type MadeSite = (String, Identity, Vec<u8>, Vec<u8>);

/// As [`fixture`]; with `group`, sites are enrolled in domains of `group` sites each
/// (`load.g0`, `load.g1`, …) and technician `i` is granted only the domain of site
/// `i % sites` (a technician sees a plant's sites, not a whole country's: at 100 000 sites one
/// inventory of every site would not fit a message). Keys and certificates are made on every
/// core; the store writes stay one connection's, as the CLI's are.
pub fn fixture_grouped(
    state: &Path,
    sites: usize,
    techs: usize,
    group: Option<usize>,
) -> anyhow::Result<Fixture> {
    let state = StateDir::new(state);
    let loaded = state.load()?;
    let mut store = state.store()?;
    // The bench's own connection need not wait for the disk at every one of its thousands of
    // setup transactions; the gateway's connection keeps its own setting.
    store.conn().pragma_update(None, "synchronous", "OFF")?;
    let admin = Actor::Admin("load".into());
    let top: pinhole_gateway::store::DomainPath = "load".parse()?;
    let _ = store.create_domain(&admin, &top); // may exist already
    let domain_of = |i: usize| -> anyhow::Result<pinhole_gateway::store::DomainPath> {
        Ok(match group {
            Some(g) => format!("load.g{}", i / g.max(1)).parse()?,
            None => top.clone(),
        })
    };
    if group.is_some() {
        for i in (0..sites).step_by(group.unwrap_or(1).max(1)) {
            let _ = store.create_domain(&admin, &domain_of(i)?);
        }
    }
    let ca = loaded
        .ca
        .as_ref()
        .context("the fixture signs with STATE/ca.key: run it on a state without a signer")?;
    // Keys and certificates in parallel: signing is most of an enrollment's CPU.
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = sites.div_ceil(workers).max(1);
    let made: Vec<anyhow::Result<Vec<MadeSite>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..sites)
            .step_by(chunk)
            .map(|start| {
                scope.spawn(move || {
                    (start..(start + chunk).min(sites))
                        .map(|i| {
                            let name = format!("load-{i}");
                            let (key, spki) = pinhole_certs::ca::generate_site_key()?;
                            let c = ca.issue_site(&name, &spki, Validity::days_from_now(2))?;
                            let serial = pinhole_certs::PeerIdentity::from_certificate(&c)?.serial;
                            let der = c.to_vec();
                            let id = Identity::from_parts(key, vec![c, ca.certificate().clone()])
                                .context("site identity")?;
                            Ok((name, id, der, serial))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a key worker panicked"))?)
            .collect()
    });
    let mut site_ids = Vec::with_capacity(sites);
    for part in made {
        for (name, id, der, serial) in part? {
            let i = site_ids.len();
            let (token, _) =
                store.create_token(&admin, &domain_of(i)?, Duration::from_secs(600))?;
            store.enroll(&token, &name, || Ok((der, serial)))?;
            site_ids.push((name, id));
        }
    }
    let info = GatewayInfo::new(loaded.addresses.clone(), loaded.pin)?;
    let mut tech_ids = Vec::with_capacity(techs);
    for i in 0..techs {
        let name = format!("tech-{i}");
        let id = ca.issue_technician(&name, &info, Validity::days_from_now(2))?;
        let serial = pinhole_certs::PeerIdentity::from_certificate(id.certificate())?.serial;
        store.create_account(&admin, &name, &serial, 2)?;
        let grant = if group.is_some() && sites > 0 {
            domain_of(i % sites)?
        } else {
            top.clone()
        };
        store.set_grant(&admin, &name, &grant, true)?;
        tech_ids.push((name, id));
    }
    Ok(Fixture {
        pin: loaded.pin,
        sites: site_ids,
        techs: tech_ids,
    })
}

/// Datagrams of one direction of the live sessions: sent and received, and whether senders
/// still send (they stop before the counts are compared).
#[derive(Debug)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub sending: AtomicBool,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sending: AtomicBool::new(true),
        }
    }
}

impl Traffic {
    fn send(&self) -> bool {
        let on = self.sending.load(Ordering::Relaxed);
        if on {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        on
    }

    fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }
}

/// The datagram both ends of a live session send every second.
pub const DATA_EVERY: Duration = Duration::from_secs(1);

/// A simulated site.
pub struct SimSite {
    pub index: usize,
    pub config: Arc<ClientConfig>,
    pub source: Option<IpAddr>,
    /// Sends a datagram every second on each of its open sessions (counted in `to_tech`), and
    /// counts what arrives (`to_site`).
    pub live: bool,
}

#[derive(Debug)]
pub enum SiteNote {
    Welcomed {
        site: usize,
        at: Instant,
    },
    /// The link ended, or a dial failed (`welcomed` false).
    Lost {
        site: usize,
        at: Instant,
        welcomed: bool,
        why: String,
    },
}

/// Both directions of the live sessions.
#[derive(Debug, Default)]
pub struct LiveTraffic {
    pub to_site: Traffic,
    pub to_tech: Traffic,
}

/// A site that says hello, answers heartbeats and opens every session it is asked for; when
/// its link ends it dials again after the real site's backoff (reset after a welcome), until
/// `reconnect` is false.
pub async fn run_site(
    addr: SocketAddr,
    site: SimSite,
    notes: UnboundedSender<SiteNote>,
    traffic: Arc<LiveTraffic>,
    reconnect: bool,
) {
    let mut backoff = Backoff::new();
    loop {
        let mut welcomed = false;
        let why = match site_link(addr, &site, &notes, &traffic, &mut welcomed).await {
            Ok(()) => "closed".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        let _ = notes.send(SiteNote::Lost {
            site: site.index,
            at: Instant::now(),
            welcomed,
            why,
        });
        if !reconnect {
            return;
        }
        if welcomed {
            backoff.reset();
        }
        let delay = backoff.next_delay(u32::from_ne_bytes(pinhole_certs::random::<4>()));
        tokio::time::sleep(delay).await;
    }
}

fn plc() -> Agent {
    Agent::new(
        "plc",
        AgentType::SiemensS7,
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10)),
        [],
    )
}

/// A simulated site's side of its link.
struct SimSiteLink<'a> {
    site: &'a SimSite,
    notes: &'a UnboundedSender<SiteNote>,
    traffic: &'a LiveTraffic,
    welcomed: &'a mut bool,
    agent: Agent,
    sessions: BTreeSet<u32>,
    tick: tokio::time::Interval,
}

impl Handler for SimSiteLink<'_> {
    type Core = SiteCore;
    type Wake = ();
    type End = anyhow::Result<()>;

    async fn on_event(&mut self, core: &mut SiteCore, ev: SiteEvent) -> Option<anyhow::Result<()>> {
        match ev {
            SiteEvent::Welcomed => {
                *self.welcomed = true;
                let _ = self.notes.send(SiteNote::Welcomed {
                    site: self.site.index,
                    at: Instant::now(),
                });
            }
            SiteEvent::SessionOpen { session, .. } => {
                core.session_opened(session, SITE_KEY, self.agent.clone(), Instant::now());
                self.sessions.insert(session);
            }
            SiteEvent::SessionClose { session, .. } => {
                self.sessions.remove(&session);
            }
            SiteEvent::Data { .. } if self.site.live => self.traffic.to_site.received(),
            SiteEvent::Closed(r) => return Some(Err(anyhow!("site link closed: {r:?}"))),
            _ => {}
        }
        None
    }

    async fn wait(&mut self) {
        if self.site.live && !self.sessions.is_empty() {
            self.tick.tick().await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    async fn on_wake(&mut self, core: &mut SiteCore, (): ()) -> Option<anyhow::Result<()>> {
        let now = Instant::now();
        for &session in &self.sessions {
            if self.traffic.to_tech.send() {
                core.send_data(session, b"site to technician", now);
            }
        }
        None
    }

    fn on_lost(&mut self, lost: Lost) -> anyhow::Result<()> {
        match lost {
            Lost::Closed => bail!("the gateway closed the link"),
            other => bail!("{other}"),
        }
    }
}

async fn site_link(
    addr: SocketAddr,
    site: &SimSite,
    notes: &UnboundedSender<SiteNote>,
    traffic: &LiveTraffic,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let mut s = tls_link(addr, site.source, site.config.clone()).await?;
    let agent = plc();
    let mut core = SiteCore::new(
        Instant::now(),
        SiteHello {
            software: "load".into(),
            boot_id: "load".into(),
            heartbeat: IDLE_HEARTBEAT,
            agents: vec![agent.clone()],
            offload: true,
        },
    );
    let mut tick = tokio::time::interval(DATA_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link = SimSiteLink {
        site,
        notes,
        traffic,
        welcomed,
        agent,
        sessions: BTreeSet::new(),
        tick,
    };
    drive(&mut s, &mut core, &mut link).await
}

/// A simulated technician with one session.
pub struct SimTech {
    pub index: usize,
    pub config: Arc<ClientConfig>,
    pub source: Option<IpAddr>,
    pub site: String,
    /// Sends a datagram every second once the session is open (counted in `to_site`), and
    /// counts what arrives (`to_tech`).
    pub live: bool,
}

#[derive(Debug)]
pub enum TechNote {
    Opened {
        tech: usize,
        at: Instant,
    },
    /// The session or the link ended.
    Ended {
        tech: usize,
        at: Instant,
        why: String,
    },
}

/// A technician that logs in, opens one session to its site and keeps it until the link or the
/// session ends.
pub async fn run_technician(
    addr: SocketAddr,
    tech: SimTech,
    notes: UnboundedSender<TechNote>,
    traffic: Arc<LiveTraffic>,
) {
    let why = match technician_link(addr, &tech, &notes, &traffic).await {
        Ok(why) => why,
        Err(e) => format!("{e:#}"),
    };
    let _ = notes.send(TechNote::Ended {
        tech: tech.index,
        at: Instant::now(),
        why,
    });
}

/// A simulated technician's side of its link.
struct SimTechLink<'a> {
    tech: &'a SimTech,
    notes: &'a UnboundedSender<TechNote>,
    traffic: &'a LiveTraffic,
    open: bool,
    tick: tokio::time::Interval,
}

impl Handler for SimTechLink<'_> {
    type Core = ClientCore;
    type Wake = ();
    type End = anyhow::Result<String>;

    async fn on_event(
        &mut self,
        core: &mut ClientCore,
        ev: ClientEvent,
    ) -> Option<anyhow::Result<String>> {
        match ev {
            ClientEvent::LoggedIn { .. } => {
                core.open_session(1, &self.tech.site, "plc", CLIENT_KEY, Instant::now());
            }
            ClientEvent::SessionOpened { .. } => {
                self.open = true;
                let _ = self.notes.send(TechNote::Opened {
                    tech: self.tech.index,
                    at: Instant::now(),
                });
            }
            ClientEvent::SessionRefused { reason, .. } => {
                return Some(Err(anyhow!("session refused: {reason}")));
            }
            ClientEvent::SessionClosed { reason, .. } => {
                return Some(Ok(format!("session closed: {reason}")));
            }
            ClientEvent::Data { .. } if self.tech.live => self.traffic.to_tech.received(),
            ClientEvent::Closed(r) => return Some(Ok(format!("link closed: {r:?}"))),
            _ => {}
        }
        None
    }

    async fn wait(&mut self) {
        if self.tech.live && self.open {
            self.tick.tick().await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    async fn on_wake(&mut self, core: &mut ClientCore, (): ()) -> Option<anyhow::Result<String>> {
        if self.traffic.to_site.send() {
            core.send_data(1, b"technician to site", Instant::now());
        }
        None
    }

    fn on_lost(&mut self, lost: Lost) -> anyhow::Result<String> {
        match lost {
            Lost::Closed => Ok("the gateway closed the link".into()),
            other => Ok(other.to_string()),
        }
    }
}

async fn technician_link(
    addr: SocketAddr,
    tech: &SimTech,
    notes: &UnboundedSender<TechNote>,
    traffic: &LiveTraffic,
) -> anyhow::Result<String> {
    let mut s = tls_link(addr, tech.source, tech.config.clone()).await?;
    let mut core = ClientCore::new(Instant::now(), "load", IDLE_HEARTBEAT);
    let mut tick = tokio::time::interval(DATA_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link = SimTechLink {
        tech,
        notes,
        traffic,
        open: false,
        tick,
    };
    drive(&mut s, &mut core, &mut link).await
}

/// What one legitimate technician waited for.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTimes {
    /// From the TCP connect to `welcome` (TLS handshake, hello, account check, inventory).
    pub login: Duration,
    /// From `session_open` to `session_opened` (the gateway asks the site, the site answers).
    pub connect: Duration,
}

/// A probe's side of its link: login, one session, logout.
struct ProbeLink<'a> {
    site: &'a str,
    stage: &'a std::cell::Cell<&'static str>,
    t0: Instant,
    login: Option<Duration>,
    asked: Instant,
}

impl Handler for ProbeLink<'_> {
    type Core = ClientCore;
    type Wake = ();
    type End = anyhow::Result<ProbeTimes>;

    async fn on_event(
        &mut self,
        core: &mut ClientCore,
        ev: ClientEvent,
    ) -> Option<anyhow::Result<ProbeTimes>> {
        match ev {
            ClientEvent::LoggedIn { .. } => {
                self.login = Some(self.t0.elapsed());
                self.asked = Instant::now();
                self.stage.set("session open");
                core.open_session(1, self.site, "plc", CLIENT_KEY, self.asked);
                None
            }
            ClientEvent::SessionOpened { .. } => {
                let connect = self.asked.elapsed();
                let Some(login) = self.login else {
                    return Some(Err(anyhow!("opened before login")));
                };
                let now = Instant::now();
                self.stage.set("logout");
                // The driver sends both before it closes the link.
                core.close_session(1, None, "probe done", now);
                core.logout(now);
                Some(Ok(ProbeTimes { login, connect }))
            }
            ClientEvent::SessionRefused { reason, .. } => {
                Some(Err(anyhow!("session refused: {reason}")))
            }
            ClientEvent::Closed(r) => Some(Err(anyhow!("link closed: {r:?}"))),
            _ => None,
        }
    }

    async fn wait(&mut self) {
        std::future::pending::<()>().await
    }

    async fn on_wake(&mut self, _: &mut ClientCore, (): ()) -> Option<anyhow::Result<ProbeTimes>> {
        None
    }

    fn on_lost(&mut self, lost: Lost) -> anyhow::Result<ProbeTimes> {
        let when = if self.login.is_some() {
            "after the login"
        } else {
            "before the login"
        };
        match lost {
            Lost::Closed => bail!("the gateway closed the link {when}"),
            other => bail!("{other} ({when})"),
        }
    }
}

/// One technician login and session open, over a fresh link, then logout. `stage` tells how far
/// it got (for a caller that gives up waiting).
pub async fn probe(
    addr: SocketAddr,
    source: Option<IpAddr>,
    config: Arc<ClientConfig>,
    site: &str,
    stage: &std::cell::Cell<&'static str>,
) -> anyhow::Result<ProbeTimes> {
    let t0 = Instant::now();
    stage.set("dial");
    let mut s = tls_link(addr, source, config).await.context("dial")?;
    stage.set("login");
    let mut core = ClientCore::new(t0, "probe", IDLE_HEARTBEAT);
    let mut link = ProbeLink {
        site,
        stage,
        t0,
        login: None,
        asked: t0,
    };
    drive(&mut s, &mut core, &mut link).await
}

/// p-th percentile (nearest rank) of `v`, in ms.
pub fn percentile_ms(v: &[Duration], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(round1(s[rank.clamp(1, s.len()) - 1]))
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
