//! The site agent's main loop: enroll once, then stay connected to the gateway.
//!
//! State directory (0700): `site.key` (0600, generated here, never leaves the site),
//! `site.crt` and `ca.crt` (from enrollment), `gateway.pin` (0600, the gateway's key: from the
//! enrollment token, or pinned on first use), `isolation.state` (what the device domain
//! changed, while the site runs; see [`crate::isolation`]).
//!
//! Trust in the gateway: enrollment is pinned by the pin the token carries (a token without
//! one is trusted on first use, with a warning); afterwards every connection must present a
//! gateway certificate of the CA received at enrollment **and** the pinned key; after `repin`
//! the next gateway of that CA is pinned.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pinhole_certs::ca::{generate_site_key, pem_decode, pem_encode};
use pinhole_certs::fsutil::write_private_atomic;
use pinhole_certs::tls;
use pinhole_certs::{
    CaPinnedServerVerifier, Identity, PinnedServerVerifier, TofuServerVerifier, TofuStore,
};
use pinhole_proto::{
    Backoff, CloseReason, ErrorCode, FirewallChange, SiteCore, SiteEvent, SiteHello,
};
use pinhole_shell::{DialError, Dialer, Handler, Lost, Refused, Stream, drive};
use rustls::pki_types::CertificateDer;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use crate::config::{Config, IfName};
use crate::firewall::Firewall;
use crate::forward::Forwarder;
use crate::isolation::DeviceDomain;
use crate::{firewall, light};
use pinhole_adapter::Dest;
use pinhole_adapter::tun::Tun;

/// How often the switch input is read: the issue allows a 1 s poll, and a file read per second
/// costs nothing.
const SWITCH_POLL: Duration = Duration::from_secs(1);

/// How often the engine's timers run (WireGuard handshakes and rekeying, flow and fragment
/// expiry).
const WG_TICK: Duration = pinhole_adapter::engine::TICK;

/// The site's TUN device.
pub const SITE_TUN: &str = "pinhole-site0";

/// The site's address on its TUN: the first of the tunnel network (100.64.0.0/10), which the
/// gateway never hands to a technician. The /10 prefix routes every technician's address back
/// through the TUN.
const SITE_TUN_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 64, 0, 1);
const SITE_TUN_PREFIX: u8 = 10;

/// How often the firewall table is checked: a removed or changed table is restored within
/// this plus one `nft` run, inside the 2 s the issue allows, at the cost of one `nft list` a
/// second.
const FIREWALL_CHECK: Duration = Duration::from_secs(1);

/// Firewall reports waiting for the gateway link: one a second at most, so a minute's worth;
/// more while the link is down are dropped (and logged locally).
const FIREWALL_REPORTS: usize = 64;

/// The two layers that keep the uplink and the device network apart: the device routing
/// domain with its forwarding switch, and the firewall table.
#[derive(Debug)]
struct Guard {
    domain: DeviceDomain,
    firewall: Firewall,
}

/// The data plane: TUN, sessions, and what the light shows.
#[derive(Default)]
struct Plane {
    tun: Option<Tun>,
    guard: Option<Arc<Mutex<Guard>>>,
    fwd: Forwarder,
    light_on: Option<bool>,
    /// The firewall table's loads; `None` without a device interface (and so no sessions).
    tables: Option<Tables>,
}

/// The firewall table's loads, run by [`load_tables`] in a task of their own, so that the
/// site's loop goes on with the tunnels while `nft` runs (3–5 ms on a quiet machine, tens of
/// ms under load): a new session's WireGuard handshake, other sessions' packets, keepalives.
///
/// A session whose table is not loaded yet is held ([`Forwarder::hold`]): its packets toward
/// the device network wait, in order and bounded (`hold-full` drops beyond
/// [`pinhole_adapter::engine::HOLD_PACKETS`] / [`pinhole_adapter::engine::HOLD_BYTES`]), and go
/// once a table that lets them through is loaded. If that load fails, they are dropped
/// (`held-discarded`) and the session ends: nothing of it reaches the device network before
/// the table allows it (fail closed; forwarding is off until the watcher restores the table).
struct Tables {
    /// The latest policy to load and its generation. The task loads the latest: requests made
    /// while a load runs are coalesced into the next one.
    requests: watch::Sender<(u64, firewall::Policy)>,
    /// The latest load done. A load of generation `g` that succeeded put in place a policy that
    /// allows every session held at or before `g` and still open (the policy is taken from the
    /// sessions when it is requested); one that failed ends them.
    done: watch::Receiver<Loaded>,
    task: JoinHandle<()>,
    /// The last generation requested.
    generation: u64,
    /// Held sessions, with the generation whose load lets their packets through.
    held: BTreeMap<u32, u64>,
}

/// A firewall table load that [`load_tables`] finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loaded {
    generation: u64,
    ok: bool,
}

impl Tables {
    /// Starts the loading task for `guard`.
    fn start(guard: Arc<Mutex<Guard>>) -> Self {
        let (requests, rx) = watch::channel((0, firewall::Policy::default()));
        let (tx, done) = watch::channel(Loaded {
            generation: 0,
            ok: true,
        });
        Self {
            requests,
            done,
            task: tokio::spawn(load_tables(guard, rx, tx)),
            generation: 0,
            held: BTreeMap::new(),
        }
    }

    /// Ends the task once the load that runs (if any) is done.
    async fn stop(self) {
        let Self { requests, task, .. } = self;
        drop(requests);
        let _ = task.await;
    }
}

/// Loads the firewall table for each policy `requests` carries (the latest, when several came
/// during a load), and says in `done` how it went. A failed load switches forwarding off (the
/// watcher restores the table and switches it on again). The kernel's listing of a loaded table
/// (for the watcher, which waits for the lock) is taken after `done` is told: another `nft`
/// run that the held packets need not wait for.
async fn load_tables(
    guard: Arc<Mutex<Guard>>,
    mut requests: watch::Receiver<(u64, firewall::Policy)>,
    done: watch::Sender<Loaded>,
) {
    while requests.changed().await.is_ok() {
        let (generation, policy) = requests.borrow_and_update().clone();
        let started = Instant::now();
        let mut g = guard.lock().await;
        let ok = match g.firewall.load(&policy).await {
            Ok(()) => true,
            Err(e) => {
                error!(error = %e, "cannot update the firewall; forwarding off until it is restored");
                if let Err(e) = g.domain.set_forwarding(false) {
                    error!(error = %e, "cannot switch forwarding off");
                }
                false
            }
        };
        debug!(
            generation,
            ok,
            took_us = started.elapsed().as_micros() as u64,
            "firewall table load done"
        );
        done.send_replace(Loaded { generation, ok });
        if ok && let Err(e) = g.firewall.record_applied().await {
            // The watcher finds the table changed, switches forwarding off and applies it again.
            error!(error = %e, "cannot list the firewall table");
        }
    }
}

/// The next finished table load; without a firewall, waits forever (a `select!` branch that
/// never fires).
async fn next_loaded(tables: &mut Option<Tables>) -> Option<Loaded> {
    match tables {
        Some(t) => match t.done.changed().await {
            Ok(()) => Some(*t.done.borrow_and_update()),
            // The task ended (only at exit).
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Checks the firewall table every [`FIREWALL_CHECK`]; while it is missing or changed,
/// forwarding is off; it is restored and the restoration reported (`reports`).
async fn watch_firewall(guard: Arc<Mutex<Guard>>, reports: mpsc::Sender<FirewallChange>) {
    let mut tick = tokio::time::interval(FIREWALL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut g = guard.lock().await;
        let change = match g.firewall.check().await {
            Ok(None) => {
                if !g.domain.forwarding()
                    && let Err(e) = g.domain.set_forwarding(true)
                {
                    error!(error = %e, "cannot switch forwarding on");
                }
                continue;
            }
            Ok(Some(change)) => change,
            Err(e) => {
                error!(error = %e, "cannot check the firewall table");
                FirewallChange::Changed
            }
        };
        // No session traffic is forwarded until the table is back.
        if let Err(e) = g.domain.set_forwarding(false) {
            error!(error = %e, "cannot switch forwarding off");
        }
        match g.firewall.restore().await {
            Ok(()) => {
                if let Err(e) = g.domain.set_forwarding(true) {
                    error!(error = %e, "cannot switch forwarding on");
                }
                error!(
                    what = change.describe(),
                    "the firewall table was not as the site made it: restored"
                );
                if reports.try_send(change).is_err() {
                    warn!(
                        "too many firewall reports waiting for the gateway: this one is only logged here"
                    );
                }
            }
            Err(e) => {
                error!(error = %e, "cannot restore the firewall table; forwarding stays off");
            }
        }
    }
}

impl Plane {
    /// Writes what the engine produced: packets to the TUN, datagrams to the gateway link.
    async fn flush(&mut self, core: &mut SiteCore, now: Instant) {
        while let Some(t) = self.fwd.poll_transmit() {
            match t.dest {
                Dest::Tun => {
                    if let Some(tun) = &self.tun {
                        let _ = tun.send_packet(&t.bytes, t.offload).await;
                    }
                }
                Dest::Tunnel(id) => core.send_data(id.0, &t.bytes, now),
            }
            self.fwd.recycle(t.bytes);
        }
    }
}

/// Paths in the site's state directory.
#[derive(Debug, Clone)]
pub struct SiteState {
    root: PathBuf,
}

impl SiteState {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn pin_store(&self) -> TofuStore {
        TofuStore::new(self.root.join("gateway.pin"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn ensure(&self) -> anyhow::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    /// The enrolled identity, if enrollment happened.
    fn identity(&self) -> anyhow::Result<Option<Identity>> {
        let (Ok(cert), Ok(key), Ok(ca)) = (
            fs::read_to_string(self.path("site.crt")),
            fs::read_to_string(self.path("site.key")).map(Zeroizing::new),
            fs::read_to_string(self.path("ca.crt")),
        ) else {
            return Ok(None);
        };
        let cert = pem_decode("CERTIFICATE", &cert).context("site.crt is not PEM")?;
        let ca = pem_decode("CERTIFICATE", &ca).context("ca.crt is not PEM")?;
        let key = Zeroizing::new(pem_decode("PRIVATE KEY", &key).context("site.key is not PEM")?);
        let id = Identity::from_parts(
            key,
            vec![CertificateDer::from(cert), CertificateDer::from(ca)],
        )
        .context("site.key does not belong to site.crt")?;
        Ok(Some(id))
    }

    /// The CA certificate received at enrollment.
    fn ca(&self) -> anyhow::Result<CertificateDer<'static>> {
        let pem = fs::read_to_string(self.path("ca.crt")).context("reading ca.crt")?;
        let der = pem_decode("CERTIFICATE", &pem).context("ca.crt is not PEM")?;
        Ok(CertificateDer::from(der))
    }

    /// The site's key: made once, kept.
    fn key(&self) -> anyhow::Result<(Zeroizing<Vec<u8>>, Vec<u8>)> {
        let path = self.path("site.key");
        if let Ok(pem) = fs::read_to_string(&path) {
            let der =
                Zeroizing::new(pem_decode("PRIVATE KEY", &pem).context("site.key is not PEM")?);
            let spki = pinhole_certs::ca::spki_of_pkcs8(&der).context("site.key")?;
            return Ok((der, spki));
        }
        let (der, spki) = generate_site_key()?;
        write_private_atomic(&path, pem_encode("PRIVATE KEY", &der).as_bytes())
            .context("writing site.key")?;
        Ok((der, spki))
    }
}

/// The kernel's boot id: changes at every boot, so the gateway can log reboots.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The gateway's certificate, as the handshake presented it.
fn gateway_certificate(stream: &Stream) -> anyhow::Result<CertificateDer<'static>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .context("the gateway sent no certificate")
}

/// A refusal in an operator's words.
fn refusal_words(r: &Refused, state: &Path) -> String {
    match r {
        Refused::Key(k) => format!(
            "{k}: the gateway's key does not match the key pinned at first connection — possible \
             interception; not connected. If the gateway was really replaced, run \
             `pinhole-site repin --state {}`",
            state.display()
        ),
        Refused::Revoked => {
            "the gateway refused this site's certificate: it was revoked (the site was removed \
             at the gateway); enroll it again with a new token"
                .into()
        }
        Refused::Expired => {
            "the gateway refused this site's certificate: it has expired; enroll the site again \
             with a new token"
                .into()
        }
        Refused::Certificate(alert) => {
            format!("the gateway refused this site's certificate ({alert:?})")
        }
    }
}

struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

#[derive(Debug, PartialEq, Eq)]
enum Sig {
    Reload,
    Stop,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.hup.recv() => Sig::Reload,
            _ = self.term.recv() => Sig::Stop,
            _ = self.int.recv() => Sig::Stop,
        }
    }
}

/// How a connected period ended.
enum Outcome {
    Stop,
    /// Lost or refused; `worked` says whether the gateway had accepted the site.
    Lost {
        worked: bool,
    },
    SwitchedOff,
    /// Enrollment succeeded: connect at once.
    Enrolled,
}

/// The site agent.
pub struct SiteAgent {
    config_path: PathBuf,
    config: Config,
    state: SiteState,
    plane: Plane,
    /// Firewall restorations to report to the gateway.
    reports: Option<mpsc::Receiver<FirewallChange>>,
    /// The gateway's addresses, the one that worked last first.
    dialer: Dialer,
}

impl std::fmt::Debug for SiteAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteAgent")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl SiteAgent {
    pub fn new(config_path: &Path, state: &Path) -> anyhow::Result<Self> {
        let config = Config::load(config_path)?;
        if config.token.is_some() {
            check_token_file(config_path)?;
        }
        Ok(Self {
            config_path: config_path.to_owned(),
            dialer: Dialer::new(config.gateways.clone()).through(config.proxy.clone()),
            config,
            state: SiteState::new(state),
            plane: Plane::default(),
            reports: None,
        })
    }

    fn switched_on(&self) -> bool {
        self.config.switch.as_ref().is_none_or(|s| s.enabled())
    }

    /// Re-reads site.toml; a bad file is reported and the running configuration kept.
    fn reload(&mut self) -> bool {
        match Config::load(&self.config_path) {
            Ok(c) => {
                let changed = c != self.config;
                if (&c.gateways, &c.proxy) != (&self.config.gateways, &self.config.proxy) {
                    self.dialer = Dialer::new(c.gateways.clone()).through(c.proxy.clone());
                }
                self.config = c;
                info!(changed, "configuration reloaded");
                changed
            }
            Err(e) => {
                error!(error = %e, "configuration reload refused; keeping the running configuration");
                false
            }
        }
    }

    /// Runs until SIGTERM or SIGINT.
    pub async fn run(mut self) -> anyhow::Result<()> {
        self.state.ensure()?;
        if self.config.token.is_some() && self.state.identity()?.is_some() {
            warn!(
                config = %self.config_path.display(),
                "this site is enrolled: remove `token` from site.toml, it is not needed any more"
            );
        }
        // Before anything changes: a SIGTERM during the start is then handled once the start is
        // complete (a clean stop), not by the default action in the middle of it.
        let mut signals = Signals::new()?;
        let mut watcher = None;
        if let Some(dev) = self.config.device_interface.clone() {
            let (guard, tun) = self.isolate(dev).await?;
            let guard = Arc::new(Mutex::new(guard));
            let (tx, rx) = mpsc::channel(FIREWALL_REPORTS);
            self.reports = Some(rx);
            watcher = Some(tokio::spawn(watch_firewall(guard.clone(), tx)));
            self.plane.tables = Some(Tables::start(guard.clone()));
            self.plane.guard = Some(guard);
            self.plane.fwd.set_tun_offload(tun.offload());
            self.plane.tun = Some(tun);
        }
        self.sync_plane();
        let result = self.main_loop(&mut signals).await;
        self.plane.fwd.clear();
        if let Some(t) = self.plane.tables.take() {
            t.stop().await;
        }
        if let Some(w) = watcher {
            w.abort();
        }
        if let Some(guard) = self.plane.guard.take() {
            let mut g = guard.lock().await;
            // Forwarding off first: no moment without the table but with forwarding.
            g.domain.release();
            if let Err(e) = firewall::remove().await {
                warn!(error = %e, "cannot remove the nftables table");
            }
            info!("forwarding restored to what it was; the device routing domain stays in place");
        }
        self.plane.light_on = None;
        light::set(self.config.light.as_ref(), false);
        result
    }

    /// Builds the device side: TUN, routing domain, firewall table, and only then forwarding.
    /// Whatever fails leaves forwarding as it was.
    async fn isolate(&self, dev: IfName) -> anyhow::Result<(Guard, Tun)> {
        if !Path::new("/sys/class/net").join(dev.as_str()).exists() {
            bail!("device_interface {dev:?} does not exist on this machine");
        }
        let tun = Tun::create(SITE_TUN, SITE_TUN_ADDR, SITE_TUN_PREFIX)
            .with_context(|| format!("creating the TUN device {SITE_TUN} (needs root)"))?;
        let tun_name: IfName = tun
            .name()
            .parse()
            .map_err(|e| anyhow::anyhow!("the TUN's name {:?}: {e}", tun.name()))?;
        let mut domain = DeviceDomain::establish(&self.state.root, tun_name.clone(), dev.clone())
            .context("building the device routing domain")?;
        let mut firewall = Firewall::new(tun_name, dev.clone());
        if let Err(e) = firewall.apply(&firewall::Policy::default()).await {
            domain.release();
            return Err(
                anyhow::Error::new(e).context("creating the nftables table; forwarding stays off")
            );
        }
        if let Err(e) = domain.set_forwarding(true) {
            domain.release();
            return Err(anyhow::Error::new(e).context("switching forwarding on"));
        }
        info!(tun = tun.name(), tso = tun.offload().tcp, uso = tun.offload().udp, device = %dev, "forwarding ready; uplink and device network isolated");
        Ok((Guard { domain, firewall }, tun))
    }

    async fn main_loop(&mut self, signals: &mut Signals) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        let tofu = self.state.pin_store();
        loop {
            if !self.switched_on() {
                info!("remote access is switched off: staying away from the gateway");
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(SWITCH_POLL) => if self.switched_on() { break },
                        sig = signals.next() => match sig {
                            Sig::Stop => return Ok(()),
                            Sig::Reload => { self.reload(); }
                        },
                    }
                }
                info!("remote access is switched on");
            }
            let outcome = match self.state.identity()? {
                Some(identity) => self.connected(&identity, &tofu, signals).await,
                None => self.enroll(&tofu).await.map(|()| Outcome::Enrolled),
            };
            let worked = match outcome {
                Ok(Outcome::Stop) => return Ok(()),
                Ok(Outcome::SwitchedOff | Outcome::Enrolled) => continue,
                Ok(Outcome::Lost { worked }) => worked,
                Err(e) => {
                    if let Some(DialError::Refused(r)) = e.downcast_ref::<DialError>() {
                        error!(reason = %refusal_words(r, &self.state.root), "not connected");
                    } else if let Some(d @ (DialError::Intercepted { .. } | DialError::Proxy(_))) =
                        e.downcast_ref::<DialError>()
                    {
                        // The operator must act ([proxy] in site.toml, then SIGHUP).
                        error!(reason = %d, "not connected");
                    } else if e.downcast_ref::<Fatal>().is_some() {
                        return Err(e);
                    } else {
                        warn!(error = %format!("{e:#}"), "not connected");
                    }
                    false
                }
            };
            if worked {
                backoff.reset();
            }
            let delay = backoff.next_delay(u32::from_ne_bytes(pinhole_certs::random::<4>()));
            info!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after a pause"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                sig = signals.next() => match sig {
                    Sig::Stop => return Ok(()),
                    Sig::Reload => { self.reload(); }
                },
            }
        }
    }

    async fn enroll(&mut self, tofu: &TofuStore) -> anyhow::Result<()> {
        let Some(token) = self.config.token.clone() else {
            return Err(Fatal("this site is not enrolled and site.toml has no `token`: create one with `pinhole-gateway site-token create DOMAIN`".into()).into());
        };
        info!(site = %self.config.name, "enrolling with the gateway");
        let (_key, spki) = self.state.key()?;
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match token.pin() {
            Some(pin) => {
                info!(%pin, "enrolling with the gateway key pin from the token");
                PinnedServerVerifier::new(pin)
            }
            None => {
                warn!(
                    "the token carries no gateway key pin: the first connection trusts whichever \
                     server answers; use a token from `pinhole-gateway site-token create`, which \
                     carries the pin"
                );
                TofuServerVerifier::new(tofu.clone())
            }
        };
        let config = tls::enrollment_client_config(verifier)?;
        let mut stream = self.dialer.dial(Arc::new(config)).await?.stream;
        let peer = gateway_certificate(&stream)?;
        let mut core = SiteCore::enroll(Instant::now(), token.secret(), &self.config.name, &spki);
        let mut enrollment = Enrollment {
            state: &self.state,
            site: &self.config.name,
            config_path: &self.config_path,
            tofu,
            peer,
        };
        drive(&mut stream, &mut core, &mut enrollment).await
    }

    async fn connected(
        &mut self,
        identity: &Identity,
        tofu: &TofuStore,
        signals: &mut Signals,
    ) -> anyhow::Result<Outcome> {
        let verifier = CaPinnedServerVerifier::new(&self.state.ca()?, tofu.clone())
            .context("ca.crt from enrollment")?;
        let config = tls::client_config(identity, verifier)?;
        let dialed = self.dialer.dial(Arc::new(config)).await?;
        let mut stream = dialed.stream;
        let peer = gateway_certificate(&stream)?;
        if let pinhole_certs::TofuOutcome::Recorded(pin) = tofu.confirm(&peer)? {
            info!(%pin, "gateway key pinned (first use)");
        }
        let hello = SiteHello {
            software: env!("CARGO_PKG_VERSION").into(),
            boot_id: boot_id(),
            heartbeat: self.config.heartbeat,
            agents: self.config.agents.clone(),
            offload: self.config.offload,
        };
        let mut core = SiteCore::new(Instant::now(), hello);
        let span = tracing::info_span!("link", gateway = %dialed.address);
        let outcome = {
            let mut link = SiteLink::new(self, signals);
            tracing::Instrument::instrument(drive(&mut stream, &mut core, &mut link), span).await
        };
        // Whatever ended the link ended its sessions.
        if !self.plane.fwd.is_empty() {
            info!(
                sessions = self.plane.fwd.len(),
                "gateway link gone: closing every session"
            );
            self.plane.fwd.clear();
            self.sync_plane();
        }
        if let Some(t) = &mut self.plane.tables {
            t.held.clear();
        }
        Ok(outcome)
    }

    /// Applies the sessions to the light, and asks for their firewall table ([`Tables`]);
    /// returns the generation of that table's load (`None` without a firewall).
    fn sync_plane(&mut self) -> Option<u64> {
        let active = !self.plane.fwd.is_empty();
        if self.plane.light_on != Some(active) {
            self.plane.light_on = Some(active);
            info!(active, "remote access light");
            light::set(self.config.light.as_ref(), active);
        }
        let t = self.plane.tables.as_mut()?;
        t.generation += 1;
        t.requests
            .send_replace((t.generation, self.plane.fwd.policy()));
        Some(t.generation)
    }

    /// A firewall table load finished: the sessions it was for are released, or, if it
    /// failed, ended with what they held.
    fn table_loaded(&mut self, core: &mut SiteCore, loaded: Loaded) {
        let Some(t) = &mut self.plane.tables else {
            return;
        };
        let mut due = Vec::new();
        t.held.retain(|session, generation| {
            let now_due = *generation <= loaded.generation;
            if now_due {
                due.push(*session);
            }
            !now_due
        });
        if loaded.ok {
            for session in due {
                let packets = self.plane.fwd.release(session);
                debug!(
                    session,
                    packets, "firewall table loaded: the session's held packets go on"
                );
            }
            return;
        }
        let mut ended = false;
        for session in due {
            if !self.plane.fwd.contains(session) {
                continue;
            }
            error!(
                session,
                "the firewall table for this session did not load: ending the session (nothing of it reached the device network)"
            );
            self.plane.fwd.close(session, None);
            core.close_session(
                session,
                None,
                "the site could not load its firewall table for this session",
                Instant::now(),
            );
            ended = true;
        }
        if ended {
            self.sync_plane();
        }
    }

    async fn open_session(
        &mut self,
        core: &mut SiteCore,
        session: u32,
        agent: &str,
        key: &str,
        tunnel_ip: Option<std::net::Ipv4Addr>,
        offload: Option<u32>,
    ) {
        let now = Instant::now();
        let Some(a) = self.config.agents.iter().find(|a| a.name == agent).cloned() else {
            core.session_refused(session, &format!("this site has no agent {agent}"), now);
            return;
        };
        if self.plane.tun.is_none() {
            core.session_refused(session, "this site has no device_interface configured", now);
            return;
        }
        let Some(tunnel_ip) = tunnel_ip else {
            core.session_refused(session, "no tunnel address in the request", now);
            return;
        };
        match self.plane.fwd.open(
            session,
            &a,
            key,
            tunnel_ip.into(),
            pinhole_certs::random::<32>(),
            // What this site announced, and what the client and the gateway agreed to.
            pinhole_adapter::TunnelOffload {
                send: offload.map(|max| max as usize),
                receive: self.config.offload,
            },
        ) {
            Ok(site_key) => {
                info!(session, agent = %a.name, device = %a.address, "session opened");
                core.session_opened(session, &site_key, a, now);
                // The answer goes out at once; the table loads meanwhile, and the session's
                // packets toward the devices wait for it (its handshake does not).
                if let Some(generation) = self.sync_plane() {
                    self.plane.fwd.hold(session);
                    if let Some(t) = &mut self.plane.tables {
                        t.held.insert(session, generation);
                    }
                }
            }
            Err(reason) => core.session_refused(session, &reason.to_string(), now),
        }
    }
}

/// The enrollment exchange: the token out, the certificate and the CA back.
struct Enrollment<'a> {
    state: &'a SiteState,
    site: &'a str,
    config_path: &'a Path,
    tofu: &'a TofuStore,
    peer: CertificateDer<'static>,
}

impl Enrollment<'_> {
    fn store(&self, certificate: &[u8], ca: &[u8]) -> anyhow::Result<()> {
        self.tofu.confirm(&self.peer)?;
        fs::write(self.state.path("ca.crt"), pem_encode("CERTIFICATE", ca))?;
        write_private_atomic(
            &self.state.path("site.crt"),
            pem_encode("CERTIFICATE", certificate).as_bytes(),
        )?;
        info!(site = %self.site, pin = %pinhole_certs::Pin::of_certificate(&self.peer)?, "enrolled; gateway key pinned");
        warn!(
            config = %self.config_path.display(),
            "enrolled: remove `token` from site.toml now; it is used up and not needed again"
        );
        Ok(())
    }
}

impl Handler for Enrollment<'_> {
    type Core = SiteCore;
    type Wake = ();
    type End = anyhow::Result<()>;

    async fn on_event(&mut self, _: &mut SiteCore, event: SiteEvent) -> Option<anyhow::Result<()>> {
        match event {
            SiteEvent::Enrolled { certificate, ca } => Some(self.store(&certificate, &ca)),
            SiteEvent::Closed(CloseReason::Error {
                code: ErrorCode::TokenRefused,
                text,
            }) => Some(Err(Fatal(format!(
                "{text} (ask the gateway operator for a new token)"
            ))
            .into())),
            SiteEvent::Closed(reason) => {
                Some(Err(anyhow::anyhow!("enrollment failed: {reason:?}")))
            }
            _ => None,
        }
    }

    async fn wait(&mut self) {
        std::future::pending::<()>().await
    }

    async fn on_wake(&mut self, _: &mut SiteCore, (): ()) -> Option<anyhow::Result<()>> {
        None
    }

    fn on_lost(&mut self, lost: Lost) -> anyhow::Result<()> {
        match lost {
            Lost::Failed {
                error,
                refused: None,
            } => Err(anyhow::Error::new(error).context("enrollment")),
            other => bail!("the gateway ended the enrollment: {other}"),
        }
    }
}

/// What the site's own inputs produced, while a link is up.
enum Wake {
    Tun(std::io::Result<usize>),
    /// A firewall table load finished.
    Loaded(Loaded),
    EngineTick,
    /// The firewall table was restored: tell the gateway.
    Report(FirewallChange),
    SwitchTick,
    Signal(Sig),
}

/// The site's side of a connected link: the gateway's events, the TUN, the engine's timers,
/// the switch input and signals.
struct SiteLink<'a> {
    agent: &'a mut SiteAgent,
    signals: &'a mut Signals,
    tun_buf: Vec<u8>,
    switch_tick: tokio::time::Interval,
    engine_tick: tokio::time::Interval,
    /// Whether the gateway welcomed the site on this link.
    worked: bool,
}

impl<'a> SiteLink<'a> {
    fn new(agent: &'a mut SiteAgent, signals: &'a mut Signals) -> Self {
        Self {
            agent,
            signals,
            tun_buf: vec![0u8; pinhole_adapter::tun::RECV_BUFFER],
            switch_tick: tokio::time::interval(SWITCH_POLL),
            engine_tick: tokio::time::interval(WG_TICK),
            worked: false,
        }
    }

    /// Applies a reloaded configuration to the link; `Some` when the link must be redone.
    async fn reloaded(&mut self, core: &mut SiteCore) -> Option<Outcome> {
        let before = self.agent.config.clone();
        if !self.agent.reload() {
            return None;
        }
        let after = &self.agent.config;
        // `offload` is announced in the link's hello: a change needs a new link.
        if (
            &before.name,
            &before.gateways,
            &before.device_interface,
            &before.proxy,
            before.offload,
        ) != (
            &after.name,
            &after.gateways,
            &after.device_interface,
            &after.proxy,
            after.offload,
        ) {
            info!("name, gateway, device interface, proxy or offload changed: reconnecting");
            return Some(Outcome::Lost { worked: true });
        }
        // Agents removed or changed end their sessions.
        for old in &before.agents {
            if self.agent.config.agents.contains(old) {
                continue;
            }
            for session in self.agent.plane.fwd.sessions_with(&old.name) {
                info!(session, agent = %old.name, "agent changed: ending its part of the session");
                self.agent.plane.fwd.close(session, Some(&old.name));
                core.close_session(
                    session,
                    Some(&old.name),
                    "the agent's configuration changed",
                    Instant::now(),
                );
            }
        }
        self.agent.sync_plane();
        core.update_agents(self.agent.config.agents.clone(), Instant::now());
        None
    }
}

impl Handler for SiteLink<'_> {
    type Core = SiteCore;
    type Wake = Wake;
    type End = Outcome;

    async fn on_event(&mut self, core: &mut SiteCore, event: SiteEvent) -> Option<Outcome> {
        let agent = &mut *self.agent;
        match event {
            SiteEvent::Welcomed => {
                self.worked = true;
                info!(site = %agent.config.name, agents = agent.config.agents.len(), "connected to the gateway");
            }
            SiteEvent::SessionOpen {
                session,
                agent: name,
                key,
                tunnel_ip,
                offload,
            } => {
                let span = tracing::info_span!("session", session);
                tracing::Instrument::instrument(
                    agent.open_session(core, session, &name, &key, tunnel_ip, offload),
                    span,
                )
                .await;
            }
            SiteEvent::SessionClose {
                session,
                reason,
                agent: name,
            } => {
                info!(session, agent = ?name, %reason, "session closed by the gateway");
                if agent.plane.fwd.close(session, name.as_deref())
                    && let Some(t) = &mut agent.plane.tables
                {
                    t.held.remove(&session);
                }
                agent.sync_plane();
            }
            SiteEvent::Data { session, datagram } => {
                let now = Instant::now();
                agent.plane.fwd.handle_datagram(session, &datagram, now);
                core.recycle_datagram(datagram);
                agent.plane.flush(core, now).await;
            }
            SiteEvent::Closed(CloseReason::Error { code, text }) => {
                warn!(?code, %text, "the gateway ended the connection");
                return Some(Outcome::Lost {
                    worked: self.worked,
                });
            }
            SiteEvent::Closed(reason) => {
                warn!(?reason, "connection to the gateway lost");
                return Some(Outcome::Lost {
                    worked: self.worked,
                });
            }
            SiteEvent::Enrolled { .. } => {}
        }
        None
    }

    async fn wait(&mut self) -> Wake {
        let tun = self.agent.plane.tun.as_ref();
        tokio::select! {
            n = pinhole_adapter::tun::recv_or_wait(tun, &mut self.tun_buf) => Wake::Tun(n),
            _ = self.engine_tick.tick() => Wake::EngineTick,
            Some(change) = next_report(&mut self.agent.reports), if self.worked => Wake::Report(change),
            Some(loaded) = next_loaded(&mut self.agent.plane.tables) => Wake::Loaded(loaded),
            _ = self.switch_tick.tick() => Wake::SwitchTick,
            sig = self.signals.next() => Wake::Signal(sig),
        }
    }

    async fn on_wake(&mut self, core: &mut SiteCore, wake: Wake) -> Option<Outcome> {
        let plane = &mut self.agent.plane;
        match wake {
            Wake::Tun(Ok(n)) => {
                let now = Instant::now();
                // Take the rest of a burst too: one write to the gateway for all of it.
                if let Some(tun) = &plane.tun {
                    plane.fwd.handle_tun_read(tun, &mut self.tun_buf, n, now);
                    for _ in 1..pinhole_adapter::tun::BATCH {
                        let Ok(n) = tun.try_recv(&mut self.tun_buf) else {
                            break;
                        };
                        plane.fwd.handle_tun_read(tun, &mut self.tun_buf, n, now);
                    }
                }
                plane.flush(core, now).await;
            }
            Wake::Tun(Err(_)) => {}
            Wake::Loaded(loaded) => {
                self.agent.table_loaded(core, loaded);
                self.agent.plane.flush(core, Instant::now()).await;
            }
            Wake::EngineTick => {
                let now = Instant::now();
                plane.fwd.handle_timeout(now);
                plane.flush(core, now).await;
            }
            Wake::Report(change) => core.firewall_restored(change, Instant::now()),
            Wake::SwitchTick => {
                if !self.agent.switched_on() {
                    info!("remote access switched off: closing the gateway connection");
                    // Said first, so that the gateway shows the site as switched off rather
                    // than lost; the driver sends what is queued before it closes the link.
                    if self.worked {
                        core.switched_off(Instant::now());
                    }
                    return Some(Outcome::SwitchedOff);
                }
            }
            Wake::Signal(Sig::Stop) => return Some(Outcome::Stop),
            Wake::Signal(Sig::Reload) => return self.reloaded(core).await,
        }
        None
    }

    fn on_lost(&mut self, lost: Lost) -> Outcome {
        match &lost {
            Lost::Failed {
                refused: Some(r), ..
            } => {
                error!(reason = %refusal_words(r, &self.agent.state.root), "the gateway ended the connection")
            }
            _ => warn!(reason = %lost, "connection to the gateway lost"),
        }
        Outcome::Lost {
            worked: self.worked,
        }
    }
}

/// The next firewall report; without a firewall, waits forever (a `select!` branch that
/// never fires).
async fn next_report(
    reports: &mut Option<mpsc::Receiver<FirewallChange>>,
) -> Option<FirewallChange> {
    match reports {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Refuses a site.toml that holds an enrollment token and that group or others may read: the
/// token enrolls a site into the plant's domain.
fn check_token_file(path: &Path) -> anyhow::Result<()> {
    let mode = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Fatal(format!(
            "{} holds an enrollment token and is readable by group or others (mode {:o}): \
             `chmod 600 {}`, or remove the token if the site is enrolled",
            path.display(),
            mode & 0o777,
            path.display()
        ))
        .into());
    }
    Ok(())
}

/// An error that retrying cannot fix (no token, token refused): the agent stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(String);
