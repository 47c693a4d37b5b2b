//! The gateway server: TLS listeners, one task per peer link around a sans-IO
//! [`GatewayCore`], and a watcher that applies administrative changes at once.
//!
//! Administrative commands (`pinhole-gateway account close …`) write the database directly,
//! whether or not the server runs. The server polls SQLite's `data_version` every
//! [`WATCH_INTERVAL`]: when another process committed, it reloads the revocation list, ends the
//! links of closed accounts and pushes fresh inventories to logged-in technicians. That keeps one
//! source of truth and needs no admin socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use pinhole_certs::tls::{self, Anonymous};
use pinhole_certs::{GatewayClientVerifier, PeerIdentity, RevocationList, Role, Validity};
use pinhole_proto::{CloseReason, ErrorCode, GatewayCore, GatewayEvent, Message, PeerAuth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, warn};

use crate::audit::Actor;
use crate::relay::{AgentClosed, Relay};
use crate::state::{Loaded, StateDir};
use crate::store::{Store, StoreError};

/// How often the server looks for changes made by the CLI; well inside the 1 s within which
/// `account close` must end a live link.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// A TLS handshake must finish this soon; a peer that stalls it holds no resources for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A link's read buffer starts small: most links are idle sites that only ever read a heartbeat,
/// and at thousands of sites every kilobyte per link counts. A read that fills the buffer
/// doubles it, up to [`MAX_READ_BUFFER`], so a busy session soon reads whole TLS records.
const MIN_READ_BUFFER: usize = 2 * 1024;
const MAX_READ_BUFFER: usize = 64 * 1024;

/// Certificates the gateway issues to sites last as long as the server's.
const SITE_DAYS: i64 = pinhole_certs::ca::SERVER_DAYS;

/// The revocation list the TLS verifier consults, refreshed from the database.
#[derive(Debug, Default)]
struct Revoked(RwLock<BTreeSet<Vec<u8>>>);

impl RevocationList for Revoked {
    fn is_revoked(&self, serial: &[u8]) -> bool {
        // A poisoned lock means a writer panicked mid-update: fail closed.
        self.0.read().map(|s| s.contains(serial)).unwrap_or(true)
    }
}

#[derive(Debug)]
enum Command {
    /// Send an error and close.
    Refuse(ErrorCode, String),
    /// Send the technician a fresh inventory.
    PushInventory,
    /// Send a (session) message. Boxed: channel blocks hold 32 commands from the start, and a
    /// `Message` inline would make every idle link's queue several kilobytes.
    Send(Box<Message>),
}

/// Datagrams queued towards one link. Bounded: a peer that reads slower than its sessions
/// send loses its own datagrams (WireGuard and TCP inside recover), and nobody else waits.
/// Short on purpose: 256 full-size datagrams are ~370 KB, about 6 ms at 0.5 Gbit/s, so a bulk
/// transfer cannot queue an interactive session's packets behind seconds of data; and a
/// stalled peer pins at most that much memory.
const DATA_QUEUE: usize = 256;

/// How long a closing link keeps reading so that its last message is not lost to a reset.
const LINGER: Duration = Duration::from_millis(500);

/// Datagrams taken from the queue per write to the peer.
const DATA_BATCH: usize = 64;

/// Datagrams for one link: (session id as that peer knows it, WireGuard datagram).
type DataReceiver = mpsc::Receiver<(u32, Vec<u8>)>;

#[derive(Debug)]
struct LinkEntry {
    auth: PeerAuth,
    tx: mpsc::UnboundedSender<Command>,
    data: mpsc::Sender<(u32, Vec<u8>)>,
    running: bool,
}

struct Gateway {
    store: Mutex<Store>,
    revoked: Arc<Revoked>,
    links: Mutex<BTreeMap<u64, LinkEntry>>,
    next_link: Mutex<u64>,
    relay: Mutex<Relay>,
    loaded: Loaded,
}

impl Gateway {
    /// Runs `f` on the store. SQLite calls are short but may fsync; `block_in_place` keeps them
    /// from stalling the other tasks on this worker.
    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        tokio::task::block_in_place(|| {
            let mut guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
    }

    fn register(&self, auth: PeerAuth) -> (u64, mpsc::UnboundedReceiver<Command>, DataReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        let mut next = self.next_link.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        let id = *next;
        self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            LinkEntry {
                auth,
                tx,
                data,
                running: false,
            },
        );
        (id, rx, data_rx)
    }

    fn set_running(&self, id: u64) {
        if let Some(l) = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            l.running = true;
        }
    }

    fn relay(&self) -> std::sync::MutexGuard<'_, Relay> {
        self.relay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a message to one link (a no-op if it is gone).
    fn send_to(&self, link: u64, m: Message) {
        if let Some(l) = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&link)
        {
            let _ = l.tx.send(Command::Send(Box::new(m)));
        }
    }

    /// The live, welcomed link of a site.
    fn site_link(&self, site: &str) -> Option<u64> {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, l)| l.running && matches!(&l.auth, PeerAuth::Site(n) if n == site))
            .map(|(id, _)| *id)
    }

    /// Queues a datagram for a link; on a full queue the datagram is dropped and counted.
    fn forward_data(&self, link: u64, session: u32, counted_on: u32, datagram: Vec<u8>) {
        let full = match self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&link)
        {
            Some(l) => l.data.try_send((session, datagram)).is_err(),
            None => false,
        };
        if full {
            self.relay().count_drop(counted_on);
        }
    }

    /// Ends a whole session: tells both ends (except `skip`), records it.
    fn end_session(&self, gsid: u32, reason: &str, skip: Option<u64>) {
        let Some(s) = self.relay().close(gsid) else {
            return;
        };
        if skip != Some(s.client_link) {
            self.send_to(
                s.client_link,
                Message::SessionClose {
                    session: s.client_sid,
                    reason: reason.into(),
                    agent: None,
                },
            );
        }
        if skip != Some(s.site_link) {
            self.send_to(
                s.site_link,
                Message::SessionClose {
                    session: gsid,
                    reason: reason.into(),
                    agent: None,
                },
            );
        }
        self.record_closed(&s, reason);
    }

    fn record_closed(&self, s: &crate::relay::Session, reason: &str) {
        let secs = s.started.elapsed().as_secs();
        let text = format!(
            "session to {} closed after {secs} s ({reason}); {} bytes to the site, {} bytes from it; {} datagrams dropped",
            s.site, s.up, s.down, s.dropped
        );
        info!(account = %s.account, site = %s.site, up = s.up, down = s.down, "session closed");
        let _ = self.with_store(|st| {
            st.record(
                &Actor::Account(s.account.clone()),
                &format!("site:{}", s.site),
                "session closed",
                &text,
            )
        });
    }

    /// Ends the sessions whose account lost its grant for the site.
    fn enforce_grants(&self) {
        let sessions: Vec<(u32, String, String)> = self
            .relay()
            .all()
            .map(|(id, s)| (*id, s.account.clone(), s.site.clone()))
            .collect();
        for (gsid, account, site) in sessions {
            let visible = self
                .with_store(|st| st.inventory(&account))
                .map(|inv| inv.iter().any(|v| v.name == site))
                .unwrap_or(false);
            if !visible {
                self.end_session(gsid, "access to the site was withdrawn", None);
            }
        }
    }

    fn unregister(&self, id: u64) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Sends `cmd()` to every link whose auth matches.
    fn tell(&self, matches: impl Fn(u64, &PeerAuth) -> bool, cmd: impl Fn() -> Command) {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        for (id, l) in links.iter() {
            if matches(*id, &l.auth) {
                // A full queue means the link is already behind; it gets the next push.
                let _ = l.tx.send(cmd());
            }
        }
    }

    fn push_inventories(&self) {
        self.tell(
            |_, a| matches!(a, PeerAuth::Technician(_)),
            || Command::PushInventory,
        );
    }

    /// Re-reads what the CLI may have changed and applies it to live links.
    fn apply_admin_changes(&self) {
        let (revoked, closed) = self.with_store(|s| {
            let revoked = s.revoked().unwrap_or_default();
            let closed: BTreeSet<String> = s
                .accounts()
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.closed.is_some())
                .map(|a| a.name)
                .collect();
            (revoked, closed)
        });
        if let Ok(mut r) = self.revoked.0.write() {
            *r = revoked;
        }
        self.tell(
            |_, a| matches!(a, PeerAuth::Technician(n) if closed.contains(n)),
            || Command::Refuse(ErrorCode::AccountClosed, "your account was closed".into()),
        );
        self.enforce_grants();
        self.push_inventories();
    }
}

/// Serves until SIGTERM or SIGINT.
pub async fn serve(state: &StateDir, listen: &[SocketAddr]) -> anyhow::Result<()> {
    let loaded = state.load()?;
    let mut store = state.store()?;
    store.mark_all_offline().context("resetting site status")?;
    let revoked = Arc::new(Revoked(RwLock::new(store.revoked()?)));
    let verifier = GatewayClientVerifier::new(
        loaded.ca.certificate(),
        revoked.clone(),
        Anonymous::AllowEnrollment,
    )?;
    let config = tls::server_config(&loaded.server, verifier)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let pin = loaded.pin;
    let gw = Arc::new(Gateway {
        store: Mutex::new(store),
        revoked,
        links: Mutex::new(BTreeMap::new()),
        next_link: Mutex::new(0),
        relay: Mutex::new(Relay::new()),
        loaded,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut listeners = Vec::new();
    for addr in listen {
        let l = listen_on(*addr).with_context(|| format!("listening on {addr}"))?;
        info!(address = %l.local_addr()?, "listening");
        listeners.push(l);
    }
    gw.with_store(|s| {
        s.record(
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
    })
    .context("writing the audit log")?;

    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let gw = gw.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let _ = socket2::SockRef::from(&tcp)
                            .set_send_buffer_size(tls::LINK_SEND_BUFFER);
                        tokio::spawn(link(
                            gw.clone(),
                            acceptor.clone(),
                            tcp,
                            peer,
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    // The watcher.
    {
        let gw = gw.clone();
        tasks.spawn(async move {
            let mut last = gw.with_store(|s| s.data_version().unwrap_or(0));
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tick.tick().await;
                let v = gw.with_store(|s| s.data_version().unwrap_or(last));
                if v != last {
                    last = v;
                    gw.apply_admin_changes();
                }
            }
        });
    }

    wait_for_signal().await?;
    info!("stopping: closing every link");
    let _ = shutdown_tx.send(true);
    // Give links a moment to send their goodbye and record disconnections.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && !gw
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.abort_all();
    gw.with_store(|s| {
        s.mark_all_offline()?;
        s.record(
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

/// A listening socket with a deep accept queue: after a gateway restart every site of a large
/// deployment dials at once, and the default backlog of 1 024 makes the rest retry their SYNs
/// for seconds. The kernel caps the value at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
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

/// Who the handshake says the peer is; `None` if the certificate is ours but stale (a site
/// re-enrolled, an account re-issued).
fn authenticate(
    gw: &Gateway,
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Option<PeerAuth> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Some(PeerAuth::Anonymous);
    };
    let peer = PeerIdentity::from_certificate(leaf).ok()?;
    let current = gw.with_store(|s| match peer.role {
        Role::Site => s.site_serial(&peer.name).ok().flatten(),
        Role::Technician => s.account(&peer.name).ok().flatten().map(|a| a.serial),
        Role::Gateway => None,
    });
    // An account that does not exist any more still gets to hello, to be told so.
    match peer.role {
        Role::Site if current.as_deref() == Some(peer.serial.as_slice()) => {
            Some(PeerAuth::Site(peer.name))
        }
        Role::Technician if current.is_none_or(|s| s == peer.serial) => {
            Some(PeerAuth::Technician(peer.name))
        }
        _ => None,
    }
}

/// One peer link, from TLS handshake to close.
async fn link(
    gw: Arc<Gateway>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let Some(auth) = authenticate(&gw, stream.get_ref().1.peer_certificates()) else {
        info!(%peer, "certificate is not current for its site or account; closing");
        return;
    };
    let span = tracing::info_span!("link", %peer, auth = ?auth);
    run_link(gw, stream, auth, peer, &mut shutdown)
        .instrument(span)
        .await;
}

async fn run_link(
    gw: Arc<Gateway>,
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    auth: PeerAuth,
    peer: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) {
    debug!("connected");
    let (id, mut commands, mut data) = gw.register(auth.clone());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut core = GatewayCore::new(Instant::now(), auth.clone());
    let mut buf = vec![0u8; MIN_READ_BUFFER];
    let mut welcomed = false;
    let mut close_reason: Option<CloseReason> = None;
    let mut logged_out = false;
    let mut seen_written = Instant::now();
    loop {
        while let Some(ev) = core.poll_event() {
            match ev {
                GatewayEvent::Closed(reason) => close_reason = Some(reason),
                GatewayEvent::Logout => logged_out = true,
                ev => on_event(&gw, id, &mut core, ev, peer, &mut welcomed),
            }
        }
        while let Some(bytes) = core.poll_transmit() {
            if wr.write_all(&bytes).await.is_err() {
                close_reason.get_or_insert(CloseReason::Local);
                break;
            }
        }
        if core.is_closed() || close_reason.is_some() {
            break;
        }
        let timeout = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            read = rd.read(&mut buf) => match read {
                Ok(0) | Err(_) => { close_reason = Some(CloseReason::Local); }
                Ok(n) => {
                    let now = Instant::now();
                    core.handle_input(&buf[..n], now, &mut |session, datagram| {
                        relay_data(&gw, id, &auth, session, datagram)
                    });
                    if n == buf.len() && buf.len() < MAX_READ_BUFFER {
                        buf.resize(buf.len() * 2, 0);
                    }
                    // A site's last-seen time is written at most once per heartbeat interval.
                    if let PeerAuth::Site(name) = &auth
                        && welcomed
                        && now.duration_since(seen_written) >= core.heartbeat()
                    {
                        seen_written = now;
                        let _ = gw.with_store(|s| s.site_seen(name));
                    }
                }
            },
            _ = tokio::time::sleep_until(timeout.into()) => core.handle_timeout(Instant::now()),
            Some((session, datagram)) = data.recv() => {
                let now = Instant::now();
                core.send_data(session, &datagram, now);
                // Whatever else is queued goes out in the same write.
                for _ in 1..DATA_BATCH {
                    let Ok((session, datagram)) = data.try_recv() else { break };
                    core.send_data(session, &datagram, now);
                }
            }
            Some(cmd) = commands.recv() => match cmd {
                Command::Send(m) => core.send(&m, Instant::now()),
                Command::Refuse(code, text) => {
                    info!(?code, %text, "ending link");
                    core.refuse(code, &text, Instant::now());
                }
                Command::PushInventory => {
                    if let (PeerAuth::Technician(name), true) = (&auth, core.is_running()) {
                        match gw.with_store(|s| s.inventory(name)) {
                            Ok(sites) => core.inventory(sites, true, Instant::now()),
                            Err(e) => warn!(error = %e, "inventory"),
                        }
                    }
                }
            },
            _ = shutdown.changed() => core.refuse(ErrorCode::Shutdown, "the gateway is restarting", Instant::now()),
        }
    }
    // Flush a goodbye if there is one; the peer may already be gone.
    while let Some(bytes) = core.poll_transmit() {
        if wr.write_all(&bytes).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    gw.unregister(id);
    let why = match &auth {
        PeerAuth::Site(_) => "the site disconnected",
        _ => "the technician disconnected",
    };
    // Collected first: the relay's lock must not be held while sessions end.
    let sessions = gw.relay().of_link(id);
    for gsid in sessions {
        gw.end_session(gsid, why, Some(id));
    }
    let reason = close_reason.unwrap_or(CloseReason::Local);
    match &reason {
        CloseReason::Protocol(what) => warn!(error = %what, "protocol error: link closed"),
        other => debug!(reason = ?other, "closed"),
    }
    // Read (and drop) what the peer still sends until it closes too, briefly: closing a socket
    // with unread input makes the kernel answer with a reset, which can destroy our goodbye
    // (an account-closed error) before the peer reads it.
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    if !welcomed {
        return;
    }
    let recorded = gw.with_store(|s| match &auth {
        PeerAuth::Site(name) => {
            let (event, text) = match &reason {
                CloseReason::Timeout => (
                    "site heartbeat missed",
                    format!("no heartbeat from site {name} for 3 intervals; disconnected"),
                ),
                other => (
                    "site disconnected",
                    format!("site {name} disconnected ({})", describe(other)),
                ),
            };
            s.site_disconnected(name, event, &text)
        }
        PeerAuth::Technician(name) if logged_out => s.record(
            &Actor::Account(name.clone()),
            &format!("account:{name}"),
            "logout",
            &format!("{name} logged out"),
        ),
        PeerAuth::Technician(name) => s.record(
            &Actor::Account(name.clone()),
            &format!("account:{name}"),
            "disconnected",
            &format!("{name} disconnected ({})", describe(&reason)),
        ),
        PeerAuth::Anonymous => Ok(()),
    });
    if let Err(e) = recorded {
        warn!(error = %e, "could not record the disconnection");
    }
    if matches!(auth, PeerAuth::Site(_)) {
        gw.push_inventories();
    }
}

fn describe(reason: &CloseReason) -> String {
    match reason {
        CloseReason::Error { text, .. } => text.clone(),
        CloseReason::Protocol(what) => format!("protocol error: {what}"),
        CloseReason::Timeout => "timed out".into(),
        CloseReason::Local => "connection closed".into(),
    }
}

/// Refuses on an audit failure: the action is not taken when its record cannot be written.
fn fail_closed(core: &mut GatewayCore, e: &StoreError) {
    warn!(error = %e, "refusing: the action could not be recorded");
    core.refuse(
        ErrorCode::Internal,
        "the gateway could not record this action and refused it",
        Instant::now(),
    );
}

fn on_event(
    gw: &Gateway,
    id: u64,
    core: &mut GatewayCore,
    ev: GatewayEvent,
    peer: SocketAddr,
    welcomed: &mut bool,
) {
    let now = Instant::now();
    let auth = core.auth().clone();
    match (auth, ev) {
        (PeerAuth::Technician(name), GatewayEvent::TechnicianHello { software }) => {
            let actor = Actor::Account(name.clone());
            let object = format!("account:{name}");
            let result = gw.with_store(|s| -> Result<_, StoreError> {
                match s.account(&name)? {
                    None => {
                        s.record(
                            &actor,
                            &object,
                            "login failed",
                            &format!("{name} from {peer}: unknown account"),
                        )?;
                        Ok(Err((
                            ErrorCode::AccountClosed,
                            "this account does not exist".to_owned(),
                        )))
                    }
                    Some(a) if a.closed.is_some() => {
                        s.record(
                            &actor,
                            &object,
                            "login failed",
                            &format!("{name} from {peer}: account closed"),
                        )?;
                        Ok(Err((
                            ErrorCode::AccountClosed,
                            "your account was closed".to_owned(),
                        )))
                    }
                    Some(a) => {
                        let sites = s.inventory(&name)?;
                        s.record(
                            &actor,
                            &object,
                            "login ok",
                            &format!("{name} logged in from {peer} (client {software})"),
                        )?;
                        Ok(Ok((a.tunnel_ip, sites)))
                    }
                }
            });
            match result {
                Ok(Ok((ip, sites))) => {
                    info!(account = %name, "login ok");
                    *welcomed = true;
                    gw.set_running(id);
                    core.welcome(&name, Some(ip), Some(sites), now);
                }
                Ok(Err((code, text))) => {
                    info!(account = %name, %text, "login refused");
                    core.refuse(code, &text, now);
                }
                Err(e) => fail_closed(core, &e),
            }
        }
        (
            PeerAuth::Site(name),
            GatewayEvent::SiteHello {
                software,
                boot_id,
                agents,
                heartbeat,
            },
        ) => {
            // One link per site: a new one replaces an old one that has not noticed its loss.
            gw.tell(
                |other, a| other != id && matches!(a, PeerAuth::Site(n) if *n == name),
                || {
                    Command::Refuse(
                        ErrorCode::Replaced,
                        "replaced by a newer connection of this site".into(),
                    )
                },
            );
            match gw.with_store(|s| {
                s.site_connected(&name, &software, &boot_id, &agents, &peer.to_string())
            }) {
                Ok(()) => {
                    info!(site = %name, agents = agents.len(), heartbeat_secs = heartbeat.as_secs(), "site online");
                    *welcomed = true;
                    gw.set_running(id);
                    core.welcome(&name, None, None, now);
                    gw.push_inventories();
                }
                Err(e) => fail_closed(core, &e),
            }
        }
        (
            PeerAuth::Anonymous,
            GatewayEvent::Enroll {
                token,
                site,
                public_key,
            },
        ) => {
            let ca = &gw.loaded.ca;
            let result = gw.with_store(|s| {
                s.enroll(&token, &site, || {
                    let cert = ca
                        .issue_site(&site, &public_key, Validity::days_from_now(SITE_DAYS))
                        .map_err(|e| e.to_string())?;
                    let serial = PeerIdentity::from_certificate(&cert)
                        .map_err(|e| e.to_string())?
                        .serial;
                    Ok((cert.to_vec(), serial))
                })
            });
            match result {
                Ok(cert) => {
                    info!(%site, "site enrolled");
                    core.enrolled(&cert, ca.certificate(), now);
                }
                Err(StoreError::TokenRefused(why)) => {
                    info!(%site, why, "enrollment refused");
                    core.refuse(
                        ErrorCode::TokenRefused,
                        &format!("enrollment refused: {why}"),
                        now,
                    );
                }
                Err(StoreError::Invalid(why)) => core.refuse(ErrorCode::Protocol, &why, now),
                Err(e) => fail_closed(core, &e),
            }
        }
        (PeerAuth::Technician(name), GatewayEvent::List) => {
            match gw.with_store(|s| s.inventory(&name)) {
                Ok(sites) => core.inventory(sites, false, now),
                Err(e) => fail_closed(core, &e),
            }
        }
        (PeerAuth::Site(name), GatewayEvent::Agents(agents)) => {
            let before: Vec<pinhole_proto::Agent> = gw
                .with_store(|s| s.sites())
                .ok()
                .and_then(|sites| sites.into_iter().find(|s| s.name == name))
                .map(|s| s.agents)
                .unwrap_or_default();
            match gw.with_store(|s| s.site_agents(&name, &agents)) {
                Ok(()) => {
                    let changed: Vec<String> = before
                        .iter()
                        .filter(|a| !agents.contains(a))
                        .map(|a| a.name.clone())
                        .collect();
                    let sessions: Vec<(u32, Vec<String>)> = gw
                        .relay()
                        .all()
                        .filter(|(_, s)| s.site_link == id)
                        .map(|(g, s)| {
                            (
                                *g,
                                s.agents
                                    .iter()
                                    .chain(s.pending.iter())
                                    .filter(|a| changed.contains(a))
                                    .cloned()
                                    .collect(),
                            )
                        })
                        .collect();
                    for (gsid, gone) in sessions {
                        for agent in gone {
                            close_from(
                                gw,
                                gsid,
                                Some(agent),
                                "the site's agent configuration changed",
                                id,
                                false,
                            );
                        }
                    }
                    gw.push_inventories();
                }
                Err(e) => fail_closed(core, &e),
            }
        }
        (
            PeerAuth::Technician(account),
            GatewayEvent::SessionOpen {
                session,
                site,
                agent,
                key,
            },
        ) => {
            open_session(gw, id, core, &account, session, &site, &agent, &key);
        }
        (
            PeerAuth::Site(site),
            GatewayEvent::SessionOpened {
                session,
                key,
                agent,
            },
        ) => {
            let confirmed = gw
                .relay()
                .confirm(id, session, &agent.name)
                .map(|s| (s.client_link, s.client_sid, s.account.clone()));
            if let Some((client_link, client_sid, account)) = confirmed {
                let _ = gw.with_store(|st| {
                    st.record(
                        &Actor::Account(account.clone()),
                        &format!("site:{site}"),
                        "session opened",
                        &format!(
                            "{account} connected to {site}/{} ({} {})",
                            agent.name,
                            agent.address,
                            agent.ports_text()
                        ),
                    )
                });
                info!(%account, %site, agent = %agent.name, "session opened");
                gw.send_to(
                    client_link,
                    Message::SessionOpened {
                        session: client_sid,
                        key,
                        agent,
                    },
                );
            }
        }
        (PeerAuth::Site(site), GatewayEvent::SessionRefused { session, reason }) => {
            let Some(s) = gw
                .relay()
                .get(session)
                .filter(|s| s.site_link == id)
                .cloned()
            else {
                return;
            };
            let _ = gw.with_store(|st| {
                st.record(
                    &Actor::Site(site.clone()),
                    &format!("account:{}", s.account),
                    "session refused",
                    &format!("site {site} refused: {reason}"),
                )
            });
            gw.send_to(
                s.client_link,
                Message::SessionRefused {
                    session: s.client_sid,
                    reason: format!("the site refused: {reason}"),
                },
            );
            for a in s.pending.iter() {
                if let Some(AgentClosed::SessionEnded(_)) = gw.relay().close_agent(session, a) {}
            }
        }
        (
            PeerAuth::Technician(_),
            GatewayEvent::SessionClose {
                session,
                reason,
                agent,
            },
        ) => {
            let Some(gsid) = gw.relay().of_client(id, session) else {
                return;
            };
            close_from(gw, gsid, agent, &reason, id, true);
        }
        (
            PeerAuth::Site(_),
            GatewayEvent::SessionClose {
                session,
                reason,
                agent,
            },
        ) => {
            if gw.relay().get(session).is_some_and(|s| s.site_link == id) {
                close_from(gw, session, agent, &reason, id, false);
            }
        }
        (_, ev) => debug!(?ev, "ignored"),
    }
}

/// A datagram from a peer, forwarded along its session's route.
fn relay_data(gw: &Gateway, id: u64, auth: &PeerAuth, session: u32, datagram: &[u8]) {
    match auth {
        PeerAuth::Technician(_) => {
            let route = gw.relay().route_up(id, session, datagram.len());
            if let Some((site_link, gsid)) = route {
                gw.forward_data(site_link, gsid, gsid, datagram.to_vec());
            }
        }
        PeerAuth::Site(_) => {
            let route = gw.relay().route_down(id, session, datagram.len());
            if let Some((client_link, csid)) = route {
                gw.forward_data(client_link, csid, session, datagram.to_vec());
            }
        }
        PeerAuth::Anonymous => {}
    }
}

/// A technician asks for `site/agent`: check the grant, the site and the agent, then ask the
/// site.
#[allow(clippy::too_many_arguments)]
fn open_session(
    gw: &Gateway,
    id: u64,
    core: &mut GatewayCore,
    account: &str,
    session: u32,
    site: &str,
    agent: &str,
    key: &str,
) {
    let now = Instant::now();
    let actor = Actor::Account(account.to_owned());
    let object = format!("site:{site}");
    let refuse = |core: &mut GatewayCore, reason: String| {
        info!(%account, %site, %agent, %reason, "session refused");
        let _ = gw.with_store(|st| {
            st.record(
                &actor,
                &object,
                "session refused",
                &format!("{account} asked for {site}/{agent}: {reason}"),
            )
        });
        core.send(&Message::SessionRefused { session, reason }, now);
    };
    if gw
        .with_store(|st| {
            st.record(
                &actor,
                &object,
                "session requested",
                &format!("{account} asked for {site}/{agent}"),
            )
        })
        .is_err()
    {
        core.send(
            &Message::SessionRefused {
                session,
                reason: "the gateway could not record the request".into(),
            },
            now,
        );
        return;
    }
    let inventory = match gw.with_store(|st| st.inventory(account)) {
        Ok(i) => i,
        Err(e) => return refuse(core, format!("registry error: {e}")),
    };
    let Some(view) = inventory.into_iter().find(|v| v.name == site) else {
        return refuse(core, format!("you have no access to site {site}"));
    };
    if !view.agents.iter().any(|a| a.name == agent) {
        return refuse(core, format!("site {site} has no agent {agent}"));
    }
    let Some(site_link) = gw.site_link(site) else {
        return refuse(core, format!("site {site} is offline or switched off"));
    };
    let tunnel_ip = gw
        .with_store(|st| st.account(account))
        .ok()
        .flatten()
        .map(|a| a.tunnel_ip);
    let requested = gw
        .relay()
        .request(account, (id, session), (site, site_link), agent, now);
    match requested {
        Ok(gsid) => gw.send_to(
            site_link,
            Message::SessionOpen {
                session: gsid,
                site: site.into(),
                agent: agent.into(),
                key: key.into(),
                tunnel_ip,
            },
        ),
        Err(reason) => refuse(core, reason),
    }
}

/// One side closed a session or one agent of it: tell the other side, record the end.
fn close_from(
    gw: &Gateway,
    gsid: u32,
    agent: Option<String>,
    reason: &str,
    from: u64,
    from_client: bool,
) {
    let Some(s) = gw.relay().get(gsid).cloned() else {
        return;
    };
    let (other, other_sid) = if from_client {
        (s.site_link, gsid)
    } else {
        (s.client_link, s.client_sid)
    };
    match agent {
        None => gw.end_session(gsid, reason, Some(from)),
        Some(a) => {
            let closed = gw.relay().close_agent(gsid, &a);
            gw.send_to(
                other,
                Message::SessionClose {
                    session: other_sid,
                    reason: reason.into(),
                    agent: Some(a.clone()),
                },
            );
            let _ = gw.with_store(|st| {
                st.record(
                    &Actor::Account(s.account.clone()),
                    &format!("site:{}", s.site),
                    "session agent closed",
                    &format!("{}/{a} disconnected ({reason})", s.site),
                )
            });
            if let Some(AgentClosed::SessionEnded(ended)) = closed {
                gw.record_closed(&ended, reason);
            }
        }
    }
}
