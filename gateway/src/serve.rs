//! The gateway server: listeners, one driver per link ([`crate::link`]), and the watcher that
//! applies administrative changes and the hub's timers.
//!
//! Administrative commands (`pinhole-gateway account close …`) write the database directly,
//! whether or not the server runs. The watcher polls SQLite's `data_version` every
//! [`WATCH_INTERVAL`]: when another process committed, it reloads the revocation list and
//! hands the change to the hub, which ends what must end and pushes fresh inventories. That
//! keeps one source of truth and needs no admin socket.
//!
//! Every decision is the hub's ([`crate::hub`]); this module only moves commands to links.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use pinhole_certs::tls::{self, Anonymous};
use pinhole_certs::{GatewayClientVerifier, RevocationList};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::audit::Actor;
use crate::hub::{Command, EndSessionError, Hub, LinkId, LiveSession};
use crate::listen::{self, Unwelcomed};
use crate::outbox::Outbox;
use crate::signer::{BundleMaker, Ca, SiteIssuer};
use crate::state::StateDir;
use crate::store::Store;

/// How often the server looks for changes made by the CLI: `account close` must end a live
/// link within 100 ms (p99), and a look is one cheap `PRAGMA data_version`.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(40);

/// The watcher looks at the hub's timers every this many ticks (200 ms).
const TIMER_TICKS: u64 = 5;

/// Site hellos decided in one group commit at most: bounds how long one holds the hub (a hello
/// is a few hundred microseconds of SQLite work).
const MAX_HELLO_BATCH: usize = 256;

/// A signed audit checkpoint is recorded at start and this often (`audit verify --checkpoint`
/// detects a log cut or rewritten before any checkpoint an operator kept).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);

/// Free space in the state directory is checked this often; below the reserve the gateway says
/// so loudly, before audit writes start failing.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The revocation list the TLS verifier consults, refreshed from the database.
#[derive(Debug, Default)]
struct Revoked(RwLock<BTreeSet<Vec<u8>>>);

impl RevocationList for Revoked {
    fn is_revoked(&self, serial: &[u8]) -> bool {
        // A poisoned lock means a writer panicked mid-update: fail closed.
        self.0.read().map(|s| s.contains(serial)).unwrap_or(true)
    }
}

/// Where and how the admin portal is served.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub listen: SocketAddr,
    /// The operator's certificate chain and key (PEM); default: the gateway's own.
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Host names besides localhost, the listen address and the public addresses.
    pub hosts: Vec<String>,
}

impl AdminOptions {
    /// Loopback only, with the gateway's certificate: reach it through an SSH tunnel.
    pub fn loopback() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            cert: None,
            hosts: Vec::new(),
        }
    }
}

/// The hub and the registry it decides with, behind one lock.
struct Decider {
    hub: Hub<Arc<Outbox>>,
    store: Store,
}

/// A site's hello and what came with it, waiting for the next group commit.
struct Hello {
    link: LinkId,
    events: Vec<pinhole_proto::GatewayEvent>,
    now: Instant,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Site hellos waiting for one group commit ([`hello_batches`]).
#[derive(Default)]
struct Hellos {
    queue: Mutex<Vec<Hello>>,
    wake: tokio::sync::Notify,
}

/// What every link driver shares.
pub(crate) struct Shared {
    decider: Mutex<Decider>,
    hellos: Hellos,
    outboxes: Mutex<HashMap<LinkId, Arc<Outbox>>>,
    next_link: AtomicU64,
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Runs a hub decision. Decisions may write the registry (SQLite, fsync):
    /// `block_in_place` keeps them from stalling the other tasks on this worker.
    pub(crate) fn decide<T>(&self, f: impl FnOnce(&mut Hub<Arc<Outbox>>, &mut Store) -> T) -> T {
        tokio::task::block_in_place(|| {
            let mut d = self.decider.lock().unwrap_or_else(|p| p.into_inner());
            let Decider { hub, store } = &mut *d;
            f(hub, store)
        })
    }

    /// Decides a site's hello (and the events that came with it) in the next group commit:
    /// after a gateway restart every site says hello within seconds, and a durable commit
    /// (fsync) per site would cap the rate at the disk's. Returns once the site's records are
    /// durable and the answer is in its outbox.
    pub(crate) async fn decide_hello(
        &self,
        link: LinkId,
        events: Vec<pinhole_proto::GatewayEvent>,
        now: Instant,
    ) {
        let (done, finished) = tokio::sync::oneshot::channel();
        self.hellos
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Hello {
                link,
                events,
                now,
                done,
            });
        self.hellos.wake.notify_one();
        // Dropped unanswered only when the gateway stops.
        let _ = finished.await;
    }

    pub(crate) fn new_link_id(&self) -> LinkId {
        self.next_link.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn add_outbox(&self, link: LinkId, o: Arc<Outbox>) {
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(link, o);
    }

    pub(crate) fn remove_outbox(&self, link: LinkId) {
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&link);
    }

    /// Hands the hub's commands to their links, in order.
    pub(crate) fn dispatch(&self, commands: Vec<Command>) {
        if commands.is_empty() {
            return;
        }
        let outboxes = self.outboxes.lock().unwrap_or_else(|p| p.into_inner());
        for c in commands {
            if let Some(o) = outboxes.get(&c.link()) {
                o.push_command(c);
            }
        }
    }

    /// The data path: one hub lookup, then a copy into the receiving link's outbox.
    pub(crate) fn forward(&self, link: LinkId, session: u32, datagram: &[u8]) {
        let route = {
            let mut d = self.decider.lock().unwrap_or_else(|p| p.into_inner());
            d.hub.route(link, session, datagram.len())
        };
        if let Some(r) = route
            && !r.to.push_data(r.session, datagram)
        {
            self.decider
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .hub
                .count_drop(link, session);
        }
    }

    fn links_count(&self) -> usize {
        self.outboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl crate::portal::Live for Shared {
    fn sessions(&self) -> Vec<LiveSession> {
        self.decide(|hub, _| hub.live_sessions(Instant::now()))
    }

    fn end_session(
        &self,
        id: u32,
        actor: &Actor,
        allowed: &dyn Fn(Option<&str>) -> bool,
    ) -> crate::portal::EndOutcome {
        use crate::portal::EndOutcome;
        use crate::registry::Registry;
        let (outcome, cmds) = self.decide(|hub, store| {
            let Some(site) = hub.session_site(id).map(str::to_owned) else {
                return (EndOutcome::NotOpen, Vec::new());
            };
            let domain = match Registry::site(store, &site) {
                Ok(s) => s.map(|s| s.domain),
                Err(e) => return (EndOutcome::Failed(e.to_string()), Vec::new()),
            };
            if !allowed(domain.as_deref()) {
                return (EndOutcome::Forbidden, Vec::new());
            }
            match hub.handle_end_session(store, id, actor, Instant::now()) {
                Ok(cmds) => (EndOutcome::Ended, cmds),
                Err(EndSessionError::NotOpen(_)) => (EndOutcome::NotOpen, Vec::new()),
                Err(e) => (EndOutcome::Failed(e.to_string()), Vec::new()),
            }
        });
        self.dispatch(cmds);
        outcome
    }
}

/// Host names the portal answers to by default: loopback, the listen address and the
/// gateway's public addresses.
fn portal_hosts(admin: &AdminOptions, addresses: &[pinhole_certs::GatewayAddress]) -> Vec<String> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
    if !admin.listen.ip().is_unspecified() {
        hosts.push(match admin.listen {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        });
    }
    hosts.extend(addresses.iter().map(|a| a.host().to_owned()));
    hosts.extend(admin.hosts.iter().cloned());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Starts the admin portal on its own listener.
async fn start_portal(
    state: &StateDir,
    shared: Arc<Shared>,
    admin: &AdminOptions,
    ca: Arc<Ca>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let loaded = state.load()?;
    let (chain, key) = match &admin.cert {
        Some((cert, key)) => crate::portal::tls::load_pem(cert, key)?,
        None => (loaded.server.chain().to_vec(), loaded.server.private_key()),
    };
    let config = crate::portal::tls::server_config(chain, key)?;
    let listener = crate::portal::tls::TlsListener::bind(admin.listen, config)
        .await
        .with_context(|| format!("admin portal: listening on {}", admin.listen))?;
    let local = listener.local_addr();
    let hosts = portal_hosts(admin, &loaded.addresses);
    let info = pinhole_certs::GatewayInfo::new(loaded.addresses.clone(), loaded.pin)?;
    let issuer = loaded
        .addresses
        .first()
        .map_or_else(|| "Pinhole".to_owned(), |a| format!("Pinhole {}", a.host()));
    let portal = crate::portal::Portal::new(
        state.store()?,
        shared,
        Arc::new(BundleMaker::new(ca, info)),
        crate::portal::PortalConfig { hosts, issuer },
    );
    info!(address = %local, "admin portal listening");
    tasks.spawn(listener.serve(
        crate::portal::router(portal),
        crate::portal::tls::Limits::default(),
    ));
    Ok(())
}

/// Serves until SIGTERM or SIGINT. Certificates come from the CA signer at `signer` when
/// given, else as [`crate::signer::open`] finds the CA.
pub async fn serve(
    state: &StateDir,
    listen: &[SocketAddr],
    admin: &AdminOptions,
    signer: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let nofile = listen::raise_nofile_limit();
    let mut loaded = state.load()?;
    let ca = Arc::new(crate::signer::open(state, &mut loaded, signer)?);
    info!(ca = ?ca, "certificate authority");
    let mut store = state.store()?;
    store.mark_all_offline().context("resetting site status")?;
    let revoked = Arc::new(Revoked(RwLock::new(store.revoked()?)));
    let verifier =
        GatewayClientVerifier::new(&loaded.ca_cert, revoked.clone(), Anonymous::AllowEnrollment)?;
    let config = tls::server_config(&loaded.server, verifier)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let pin = loaded.pin;
    let issuer = SiteIssuer::new(ca.clone());

    let mut listeners = Vec::new();
    for addr in listen {
        let l = listen::listen_on(*addr).with_context(|| format!("listening on {addr}"))?;
        info!(address = %l.local_addr()?, "listening");
        listeners.push(l);
    }
    store
        .record(
            &Actor::System,
            "gateway",
            "gateway started",
            &format!(
                "listening on {}; server pin {pin}",
                listen
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .context("writing the audit log")?;
    let audit_key = state.audit_key().context("loading the audit key")?;
    let cp = store
        .record_checkpoint(&Actor::System, &audit_key)
        .context("recording an audit checkpoint")?;
    info!(checkpoint = %cp, "audit checkpoint");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let wal = store.wal_path();
    let shared = Arc::new(Shared {
        decider: Mutex::new(Decider {
            hub: Hub::new(Box::new(issuer), Instant::now()),
            store,
        }),
        hellos: Hellos::default(),
        outboxes: Mutex::new(HashMap::new()),
        next_link: AtomicU64::new(0),
        acceptor,
        shutdown: shutdown_rx,
    });
    let unwelcomed = Unwelcomed::new(nofile);
    info!(descriptors = nofile, "descriptor limit");

    let mut accepting = tokio::task::JoinSet::new();
    for l in listeners {
        let shared = shared.clone();
        let unwelcomed = unwelcomed.clone();
        accepting.spawn(async move {
            let refused = shared.clone();
            listen::accept_loop(
                l,
                unwelcomed,
                move |ip| {
                    refused.decide(|hub, _| {
                        hub.handle_handshake_refused(
                            ip,
                            "too many unauthenticated connections",
                            Instant::now(),
                        )
                    })
                },
                |tcp, peer, ticket| {
                    tokio::spawn(crate::link::run(shared.clone(), tcp, peer, ticket));
                },
            )
            .await;
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    start_portal(state, shared.clone(), admin, ca, &mut tasks).await?;
    let watcher_store = state
        .store()
        .context("opening the watcher's database connection")?;
    tasks.spawn(watch_loop(shared.clone(), revoked, watcher_store));
    tasks.spawn(housekeeping(shared.clone(), state.clone(), audit_key));
    tasks.spawn(hello_batches(shared.clone(), wal));
    tasks.spawn(trim_memory(shared.clone()));

    wait_for_signal().await?;
    info!("stopping: closing every link");
    // Every link's disconnection is recorded as it ends, without a sync each: nothing waits on
    // those records, and the "gateway stopped" commit below syncs them all at once (at 100 000
    // sites a sync per record would outlast the service manager's stop timeout).
    if let Err(e) = shared.decide(|_, store| store.defer_sync()) {
        warn!(error = %e, "cannot defer syncing while stopping");
    }
    // No new links from here: a site told "restarting" dials again within a second, and must
    // not be welcomed by a gateway that is going away.
    accepting.shutdown().await;
    let _ = shutdown_tx.send(true);
    // Give links a moment to send their goodbye and record disconnections.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && shared.links_count() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    shared
        .decide(|hub, store| {
            store.end_deferred()?;
            hub.handle_shutdown(store);
            store.mark_all_offline()?;
            store.record(
                &Actor::System,
                "gateway",
                "gateway stopped",
                "graceful stop",
            )
        })
        .context("writing the audit log")?;
    info!("stopped");
    Ok(())
}

/// Applies administrative changes and the hub's timers.
///
/// A change is applied in two steps, each with its own dispatch: accounts first (a closed
/// account's link ends at once), then sites, re-checked against one read of every site's
/// current serial made on `own` connection while the hub keeps serving the links.
async fn watch_loop(shared: Arc<Shared>, revoked: Arc<Revoked>, mut own: Store) {
    use crate::registry::Registry;
    let mut last = shared.decide(|_, s| s.data_version().unwrap_or(0));
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The hub's timers (inventory coalescing, unanswered requests, expiries) are looked at
    // every fifth tick: finding the next one walks every link.
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let now = Instant::now();
        let mut changed = false;
        let cmds = shared.decide(|hub, store| {
            let mut out = Vec::new();
            let v = store.data_version().unwrap_or(last);
            if v != last {
                last = v;
                changed = true;
                match store.revoked() {
                    Ok(r) => {
                        if let Ok(mut set) = revoked.0.write() {
                            *set = r;
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot reload the revocation list"),
                }
                out.extend(hub.handle_account_change(store, now));
            }
            if ticks.is_multiple_of(TIMER_TICKS) && hub.poll_timeout().is_some_and(|t| t <= now) {
                out.extend(hub.handle_timeout(store, now));
            }
            out
        });
        shared.dispatch(cmds);
        if changed {
            match tokio::task::block_in_place(|| own.site_serials()) {
                Ok(current) => {
                    let cmds = shared.decide(|hub, store| {
                        hub.handle_site_change(store, &current, Instant::now())
                    });
                    shared.dispatch(cmds);
                }
                Err(e) => warn!(error = %e, "cannot re-check the sites"),
            }
        }
    }
}

/// Group commit of site hellos: every hello queued meanwhile is decided in one round, with the
/// store's commits written but not synced; then one `fsync` of the write-ahead log (`wal`)
/// makes them all durable, and only then do the answers go out ("durable before the action it
/// records is acknowledged", DESIGN.md). The sync happens before the hub is released and the
/// store is back to a sync per commit by then, so no other decision can act on a hello (a
/// session to the site) before the site's welcome is queued. If the sync fails, the batch's
/// links are closed unanswered.
async fn hello_batches(shared: Arc<Shared>, wal: Option<std::path::PathBuf>) {
    loop {
        shared.hellos.wake.notified().await;
        loop {
            let mut batch: Vec<Hello> = {
                let mut q = shared
                    .hellos
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let n = q.len().min(MAX_HELLO_BATCH);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let (cmds, durable) = shared.decide(|hub, store| {
                let deferred = match store.defer_sync() {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(error = %e, "cannot defer syncing: one sync per commit");
                        false
                    }
                };
                let mut out = Vec::new();
                for h in &mut batch {
                    for ev in h.events.drain(..) {
                        out.extend(hub.handle_event(store, h.link, ev, h.now));
                    }
                }
                let durable = match (&wal, deferred) {
                    (Some(wal), true) => match Store::sync_wal(wal) {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(error = %e, sites = batch.len(), "cannot sync the database: refusing the sites' hellos");
                            false
                        }
                    },
                    _ => true,
                };
                if deferred && let Err(e) = store.end_deferred() {
                    warn!(error = %e, "cannot restore syncing every commit");
                }
                (out, durable)
            });
            if durable {
                shared.dispatch(cmds);
            } else {
                shared.dispatch(
                    batch
                        .iter()
                        .map(|h| Command::Close {
                            link: h.link,
                            code: pinhole_proto::ErrorCode::Internal,
                            text: "the gateway could not record this action and refused it".into(),
                        })
                        .collect(),
                );
            }
            for h in batch {
                let _ = h.done.send(());
            }
        }
    }
}

/// Gives the memory that bursts of handshakes and logins freed back to the system
/// ([`crate::memory`]).
async fn trim_memory(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::memory::TRIM_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = crate::memory::Trimmer::default();
    loop {
        tick.tick().await;
        if trimmer.due(shared.next_link.load(Ordering::Relaxed)) {
            let t = Instant::now();
            let trimmed = tokio::task::spawn_blocking(crate::memory::trim).await;
            debug!(
                took_ms = t.elapsed().as_millis(),
                ?trimmed,
                "allocator trimmed"
            );
        }
    }
}

/// Hourly checkpoints and the disk reserve.
async fn housekeeping(shared: Arc<Shared>, state: StateDir, key: crate::checkpoint::AuditKey) {
    let mut disk = tokio::time::interval(DISK_CHECK_INTERVAL);
    let mut checkpoint = tokio::time::interval_at(
        tokio::time::Instant::now() + CHECKPOINT_INTERVAL,
        CHECKPOINT_INTERVAL,
    );
    loop {
        tokio::select! {
            _ = disk.tick() => match crate::disk::disk_status(state.root(), state.disk_reserve()) {
                Ok(status) => {
                    if let Some(w) = status.warning() {
                        warn!("{w}");
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the free space of the state directory"),
            },
            _ = checkpoint.tick() => {
                match shared.decide(|_, store| store.record_checkpoint(&Actor::System, &key)) {
                    Ok(cp) => info!(checkpoint = %cp, "audit checkpoint"),
                    Err(e) => warn!(error = %e, "could not record an audit checkpoint"),
                }
            }
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
