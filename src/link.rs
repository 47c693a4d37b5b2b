//! The daemon's link to the gateway: log in, keep the inventory, reconnect after a loss
//! (never after the account was closed or the gateway's key stopped matching).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pinhole_certs::tls;
use pinhole_certs::{Bundle, GatewayAddress, PinnedServerVerifier};
use pinhole_proto::{Backoff, ClientCore, ClientEvent, CloseReason, ErrorCode, SiteView};
use pinhole_shell::{DialError, Dialer, Handler, Lost, Refused, Stream, drive};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, warn};

use crate::control::{LinkState, SessionView, Status};
use crate::plane::{AdapterConfig, Plane};

/// `pinhole ls` waits this long for a fresh inventory before answering from the cache.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// What a technician reads when the gateway's key is not the pinned one.
pub const PIN_MISMATCH: &str =
    "the gateway's key does not match your certificate — possible interception; not connected";

pub const ACCOUNT_CLOSED: &str = "your account was closed; ask your administrator";

/// Commands from the control socket to the link task.
#[derive(Debug)]
pub enum LinkCmd {
    Logout(oneshot::Sender<()>),
    /// Copy the plane's current counters into the shared status, then answer: `pinhole
    /// status` shows what happened up to the request, not up to the last tick.
    Refresh(oneshot::Sender<()>),
    List(oneshot::Sender<Vec<SiteView>>),
    Connect {
        site: String,
        agent: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// One device, or every one with `None`.
    Disconnect {
        target: Option<(String, String)>,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// The answer to a control request.
type Reply = oneshot::Sender<Result<String, String>>;

/// How often the WireGuard timers run and `pinhole status` figures refresh.
const TICK: Duration = Duration::from_millis(250);

/// Why a connection attempt or a connected period ended.
#[derive(Debug)]
enum End {
    /// Worth retrying (network loss, gateway restart).
    Retry(String),
    /// Not worth retrying: the technician must act.
    Fatal(String),
    Logout,
}

/// A refusal in a technician's words: none of them is worth retrying.
fn refused(r: &Refused) -> End {
    End::Fatal(match r {
        Refused::Key(_) => PIN_MISMATCH.into(),
        Refused::Revoked => ACCOUNT_CLOSED.into(),
        Refused::Expired => {
            "your certificate has expired; ask your administrator for a new bundle".into()
        }
        Refused::Certificate(alert) => {
            format!("the gateway refused your certificate ({alert:?})")
        }
    })
}

async fn dial(
    dialer: &mut Dialer,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(Stream, GatewayAddress), End> {
    match dialer.dial(config.clone()).await {
        Ok(d) => Ok((d.stream, d.address)),
        Err(DialError::Refused(r)) => Err(refused(&r)),
        Err(e @ DialError::Unreachable(_)) => Err(End::Retry(e.to_string())),
        Err(e @ DialError::Intercepted { .. }) => Err(End::Fatal(e.to_string())),
        // The proxy down or confused may pass; credentials or a scheme it wants will not.
        Err(DialError::Proxy(
            e @ (ProxyError::Connect { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::Io(_)
            | ProxyError::Malformed(_)),
        )) => Err(End::Retry(e.to_string())),
        Err(DialError::Proxy(e)) => Err(End::Fatal(e.to_string())),
    }
}

use pinhole_shell::proxy::ProxyError;

fn update(status: &Mutex<Status>, f: impl FnOnce(&mut Status)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Runs the link until logout or a fatal refusal. `first` gets the outcome of the first
/// attempt: `pinhole login` reports it and the link gives up if it failed. `last_gateway`, the
/// address the previous login reached, is dialed first: a network that blocks 443 then costs
/// one connect timeout per daemon, not one per login.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    adapter: AdapterConfig,
    proxy: Option<pinhole_shell::proxy::Proxy>,
    bundle: Bundle,
    last_gateway: Option<GatewayAddress>,
    status: Arc<Mutex<Status>>,
    inventory: Arc<Mutex<Vec<SiteView>>>,
    mut cmds: mpsc::Receiver<LinkCmd>,
    first: oneshot::Sender<Result<String, String>>,
) {
    let mut first = Some(first);
    let mut backoff = Backoff::new();
    let mut plane = Plane::new(&adapter);
    let mut dialer = Dialer::new(bundle.gateway().addresses().to_vec()).through(proxy);
    if let Some(last) = last_gateway {
        dialer.prefer(last);
    }
    let config = match tls::client_config(
        bundle.identity(),
        PinnedServerVerifier::new(bundle.gateway().pin()),
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let why = format!("TLS setup: {e}");
            if let Some(tx) = first.take() {
                let _ = tx.send(Err(why.clone()));
            }
            update(&status, |s| {
                s.state = LinkState::Failed;
                s.last_error = Some(why);
            });
            return;
        }
    };
    loop {
        update(&status, |s| {
            s.state = if first.is_some() {
                LinkState::Connecting
            } else {
                LinkState::Reconnecting
            };
        });
        let end = match dial(&mut dialer, &config).await {
            Ok((stream, addr)) => {
                connected(
                    stream,
                    &addr,
                    &status,
                    &inventory,
                    &mut cmds,
                    &mut first,
                    &mut backoff,
                    &mut plane,
                )
                .await
            }
            Err(end) => end,
        };
        // Sessions do not outlive their link: the technician connects again after a loss.
        let before = plane.views().0;
        plane.close_all().await;
        if let End::Fatal(why) | End::Retry(why) = &end {
            record_ended(&status, &before, &plane, why);
        }
        if !matches!(end, End::Retry(_)) || first.is_some() {
            plane.shutdown().await;
        }
        publish(&status, &plane);
        match end {
            End::Logout => {
                update(&status, |s| {
                    s.state = LinkState::LoggedOut;
                    s.tunnel_ip = None;
                    s.since = None;
                });
                inventory.lock().unwrap_or_else(|p| p.into_inner()).clear();
                return;
            }
            End::Fatal(why) | End::Retry(why) if first.is_some() => {
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(why.clone()));
                }
                update(&status, |s| {
                    s.state = LinkState::Failed;
                    s.last_error = Some(why);
                });
                return;
            }
            End::Fatal(why) => {
                warn!(reason = %why, "link ended; not reconnecting");
                update(&status, |s| {
                    s.state = LinkState::Failed;
                    s.last_error = Some(why);
                    s.tunnel_ip = None;
                    s.since = None;
                    s.sites = 0;
                });
                inventory.lock().unwrap_or_else(|p| p.into_inner()).clear();
                return;
            }
            End::Retry(why) => {
                let delay = backoff.next_delay(u32::from_ne_bytes(pinhole_certs::random::<4>()));
                info!(reason = %why, delay_ms = delay.as_millis() as u64, "gateway link lost; reconnecting");
                update(&status, |s| {
                    s.state = LinkState::Reconnecting;
                    s.last_error = Some(why);
                });
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = cmds.recv() => match cmd {
                            None => return,
                            Some(LinkCmd::Logout(done)) => {
                                update(&status, |s| { s.state = LinkState::LoggedOut; s.tunnel_ip = None; s.since = None; });
                                let _ = done.send(());
                                return;
                            }
                            Some(LinkCmd::Refresh(done)) => {
                                let _ = done.send(());
                            }
                            Some(LinkCmd::List(tx)) => {
                                let _ = tx.send(inventory.lock().unwrap_or_else(|p| p.into_inner()).clone());
                            }
                            Some(LinkCmd::Connect { reply, .. }) => {
                                let _ = reply.send(Err("not connected to the gateway (reconnecting)".into()));
                            }
                            Some(LinkCmd::Disconnect { reply, .. }) => {
                                let _ = reply.send(Ok("nothing is connected".into()));
                            }
                        },
                    }
                }
            }
        }
    }
}

/// Records in the status the devices that were in `before` and are no longer in the plane,
/// ended for `reason` without the technician asking (the tray tells them).
fn record_ended(status: &Mutex<Status>, before: &[SessionView], plane: &Plane, reason: &str) {
    let after = plane.views().0;
    let at = crate::now_rfc3339();
    update(status, |s| {
        for v in before {
            if !after.iter().any(|a| a.site == v.site && a.agent == v.agent) {
                s.push_ended(&v.site, &v.agent, reason, at.clone());
            }
        }
    });
}

/// Copies the plane's sessions and counters into the shared status.
fn publish(status: &Mutex<Status>, plane: &Plane) {
    let (sessions, filter, refused) = plane.views();
    update(status, |s| {
        s.sessions = sessions;
        s.filter = filter;
        s.refused = refused;
    });
}

/// What the daemon's own inputs produced, while a link is up.
enum Wake {
    Tun(std::io::Result<usize>),
    Tick,
    Cmd(Option<LinkCmd>),
}

/// The daemon's side of a connected link: the gateway's events, the TUN, the engine's timers
/// and the commands of the control socket.
struct ClientLink<'a> {
    addr: &'a GatewayAddress,
    status: &'a Mutex<Status>,
    inventory: &'a Mutex<Vec<SiteView>>,
    cmds: &'a mut mpsc::Receiver<LinkCmd>,
    first: &'a mut Option<oneshot::Sender<Result<String, String>>>,
    backoff: &'a mut Backoff,
    plane: &'a mut Plane,
    waiting_list: Vec<oneshot::Sender<Vec<SiteView>>>,
    logout: Option<oneshot::Sender<()>>,
    /// Connect requests waiting for the gateway's answer: (session, agent, reply).
    waiting_connect: Vec<(u32, String, Reply)>,
    tun_buf: Vec<u8>,
    tick: tokio::time::Interval,
    /// The engine's count of refusals as last published.
    answered: u64,
}

impl ClientLink<'_> {
    /// Answers what still waits once the link is gone.
    fn ended(self) {
        for (_, _, reply) in self.waiting_connect {
            let _ = reply.send(Err("the link to the gateway ended".into()));
        }
        // Waiting `ls` get the cache.
        for tx in self.waiting_list {
            let _ = tx.send(
                self.inventory
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            );
        }
        if let Some(done) = self.logout {
            let _ = done.send(());
        }
    }

    fn answer_connect(&mut self, session: u32, agent: &str, result: Result<String, String>) {
        if let Some(i) = self
            .waiting_connect
            .iter()
            .position(|(s, a, _)| *s == session && a == agent)
        {
            let (_, _, reply) = self.waiting_connect.remove(i);
            let _ = reply.send(result);
        }
    }

    fn logged_in(
        &mut self,
        account: String,
        tunnel_ip: Option<std::net::Ipv4Addr>,
        sites: Vec<SiteView>,
        forbid_remembered_password: bool,
    ) -> Option<End> {
        self.backoff.reset();
        if let Some(ip) = tunnel_ip
            && let Err(e) = self.plane.ensure_tun(ip)
        {
            return Some(End::Fatal(e));
        }
        let addr = self.addr;
        info!(%account, gateway = %addr, sites = sites.len(), "logged in");
        update(self.status, |s| {
            s.state = LinkState::LoggedIn;
            s.gateway = Some(addr.to_string());
            s.tunnel_ip = tunnel_ip;
            s.sites = sites.len();
            s.last_error = None;
            s.remember_password = Some(!forbid_remembered_password);
            if s.since.is_none() {
                s.since = Some(crate::now_rfc3339());
            }
        });
        let n = sites.len();
        *self.inventory.lock().unwrap_or_else(|p| p.into_inner()) = sites;
        if let Some(tx) = self.first.take() {
            let _ = tx.send(Ok(format!(
                "logged in as {account} at {addr}; {n} site(s) available"
            )));
        }
        None
    }

    async fn command(&mut self, core: &mut ClientCore, cmd: LinkCmd) -> Option<End> {
        match cmd {
            LinkCmd::Logout(done) => {
                core.logout(Instant::now());
                self.logout = Some(done);
            }
            LinkCmd::Refresh(done) => {
                publish(self.status, self.plane);
                let _ = done.send(());
            }
            LinkCmd::List(tx) => {
                if core.is_logged_in() {
                    core.list(Instant::now());
                    self.waiting_list.push(tx);
                } else {
                    let _ = tx.send(
                        self.inventory
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone(),
                    );
                }
            }
            LinkCmd::Connect { site, agent, reply } => {
                if !core.is_logged_in() {
                    let _ = reply.send(Err("not logged in yet".into()));
                    return None;
                }
                let found = self
                    .inventory
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|s| s.name == site)
                    .map(|s| s.agents.iter().find(|a| a.name == agent).cloned());
                let a = match found {
                    None => {
                        let _ = reply.send(Err(format!(
                            "no site {site} in your inventory (see `pinhole ls`)"
                        )));
                        return None;
                    }
                    Some(None) => {
                        let _ = reply.send(Err(format!(
                            "site {site} has no agent {agent} (see `pinhole ls`)"
                        )));
                        return None;
                    }
                    Some(Some(a)) => a,
                };
                if self.plane.find(&site, &agent).is_some() {
                    let _ = reply.send(Ok(format!("{site}/{agent} is already connected")));
                    return None;
                }
                let sid = self.plane.session_for(&site);
                if let Err(e) = self.plane.request(sid, &a) {
                    let _ = reply.send(Err(e.to_string()));
                    return None;
                }
                info!(session = sid, %site, %agent, "connect requested");
                core.open_session(sid, &site, &agent, &self.plane.public_key(), Instant::now());
                self.waiting_connect.push((sid, agent, reply));
            }
            LinkCmd::Disconnect { target, reply } => {
                let now = Instant::now();
                match target {
                    Some((site, agent)) => match self.plane.find(&site, &agent) {
                        Some(sid) => {
                            core.close_session(
                                sid,
                                Some(&agent),
                                "disconnected by the technician",
                                now,
                            );
                            self.plane.close(sid, Some(&agent)).await;
                            let _ = reply.send(Ok(format!("disconnected {site}/{agent}")));
                        }
                        None => {
                            let _ = reply.send(Err(format!("{site}/{agent} is not connected")));
                        }
                    },
                    None => {
                        let n = self.plane.sessions().len();
                        for sid in self.plane.sessions() {
                            core.close_session(sid, None, "disconnected by the technician", now);
                        }
                        self.plane.close_all().await;
                        let _ =
                            reply.send(Ok(format!("disconnected everything ({n} site tunnel(s))")));
                    }
                }
                publish(self.status, self.plane);
            }
        }
        None
    }
}

impl Handler for ClientLink<'_> {
    type Core = ClientCore;
    type Wake = Wake;
    type End = End;

    async fn on_event(&mut self, core: &mut ClientCore, event: ClientEvent) -> Option<End> {
        if !matches!(event, ClientEvent::Data { .. }) {
            tracing::debug!(event = ?event, "from the gateway");
        }
        match event {
            ClientEvent::LoggedIn {
                account,
                tunnel_ip,
                sites,
                forbid_remembered_password,
            } => return self.logged_in(account, tunnel_ip, sites, forbid_remembered_password),
            ClientEvent::Inventory(sites) => {
                update(self.status, |s| s.sites = sites.len());
                *self.inventory.lock().unwrap_or_else(|p| p.into_inner()) = sites.clone();
                for tx in self.waiting_list.drain(..) {
                    let _ = tx.send(sites.clone());
                }
            }
            ClientEvent::SessionOpened {
                session,
                key,
                agent,
                offload,
            } => {
                let now = Instant::now();
                let name = agent.name.clone();
                let result = self
                    .plane
                    .opened(session, &key, agent, offload)
                    .await
                    .map_err(|e| e.to_string());
                self.plane.flush(core, now).await;
                if result.is_err() {
                    core.close_session(
                        session,
                        Some(&name),
                        "the client could not set up the device",
                        now,
                    );
                    self.plane.close(session, Some(&name)).await;
                }
                self.answer_connect(session, &name, result);
                publish(self.status, self.plane);
            }
            ClientEvent::SessionRefused { session, reason } => {
                info!(session, %reason, "connect refused");
                for agent in self.plane.refused(session) {
                    self.answer_connect(session, &agent, Err(reason.clone()));
                }
            }
            ClientEvent::SessionClosed {
                session,
                reason,
                agent,
            } => {
                info!(session, agent = ?agent, %reason, "device disconnected by the gateway");
                let before = self.plane.views().0;
                self.plane.close(session, agent.as_deref()).await;
                record_ended(self.status, &before, self.plane, &reason);
                update(self.status, |s| {
                    s.last_error = Some(format!("disconnected: {reason}"))
                });
                publish(self.status, self.plane);
            }
            ClientEvent::Data { session, datagram } => {
                let now = Instant::now();
                self.plane.handle_datagram(session, &datagram, now);
                core.recycle_datagram(datagram);
                self.plane.flush(core, now).await;
            }
            ClientEvent::Closed(CloseReason::Error {
                code: ErrorCode::AccountClosed,
                ..
            }) => return Some(End::Fatal(ACCOUNT_CLOSED.into())),
            ClientEvent::Closed(CloseReason::Error { code, text }) => {
                return Some(match code {
                    ErrorCode::Shutdown | ErrorCode::Replaced | ErrorCode::Internal => {
                        End::Retry(format!("the gateway ended the link: {text}"))
                    }
                    _ => End::Fatal(format!("the gateway refused: {text}")),
                });
            }
            ClientEvent::Closed(CloseReason::Timeout) => {
                return Some(End::Retry("the gateway stopped answering".into()));
            }
            ClientEvent::Closed(CloseReason::Protocol(p)) => {
                return Some(End::Retry(format!("protocol error: {p}")));
            }
            ClientEvent::Closed(CloseReason::Local) => return Some(End::Logout),
        }
        None
    }

    async fn wait(&mut self) -> Wake {
        let tun = self.plane.tun();
        tokio::select! {
            n = pinhole_adapter::tun::recv_or_wait(tun, &mut self.tun_buf) => Wake::Tun(n),
            _ = self.tick.tick() => Wake::Tick,
            cmd = self.cmds.recv() => Wake::Cmd(cmd),
        }
    }

    async fn on_wake(&mut self, core: &mut ClientCore, wake: Wake) -> Option<End> {
        match wake {
            Wake::Tun(Ok(n)) => {
                let now = Instant::now();
                self.plane.handle_tun_packets(&mut self.tun_buf, n, now);
                self.plane.flush(core, now).await;
                // A refused packet shows in `pinhole status` as soon as the tool reports it,
                // not at the next tick (refusals are rate-limited, so this stays rare).
                let answered = self.plane.answered();
                if answered != self.answered {
                    self.answered = answered;
                    publish(self.status, self.plane);
                }
            }
            Wake::Tun(Err(_)) => {}
            Wake::Tick => {
                let now = Instant::now();
                self.plane.handle_timeout(now);
                self.plane.flush(core, now).await;
                publish(self.status, self.plane);
            }
            Wake::Cmd(None) => return Some(End::Logout),
            Wake::Cmd(Some(cmd)) => return self.command(core, cmd).await,
        }
        None
    }

    fn on_lost(&mut self, lost: Lost) -> End {
        match lost {
            Lost::Failed {
                refused: Some(r), ..
            } => refused(&r),
            Lost::Ended => End::Logout,
            other => End::Retry(other.to_string()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connected(
    mut stream: Stream,
    addr: &GatewayAddress,
    status: &Mutex<Status>,
    inventory: &Mutex<Vec<SiteView>>,
    cmds: &mut mpsc::Receiver<LinkCmd>,
    first: &mut Option<oneshot::Sender<Result<String, String>>>,
    backoff: &mut Backoff,
    plane: &mut Plane,
) -> End {
    plane.set_gateway(stream.get_ref().0.peer_addr().ok().map(|a| a.ip()));
    let mut core = ClientCore::new(
        Instant::now(),
        env!("CARGO_PKG_VERSION"),
        pinhole_proto::client::CLIENT_HEARTBEAT,
    );
    let mut link = ClientLink {
        addr,
        status,
        inventory,
        cmds,
        first,
        backoff,
        plane,
        waiting_list: Vec::new(),
        logout: None,
        waiting_connect: Vec::new(),
        tun_buf: vec![0u8; pinhole_adapter::wg::BUFFER],
        tick: tokio::time::interval(TICK),
        answered: 0,
    };
    let span = tracing::info_span!("link", gateway = %addr);
    let end = drive(&mut stream, &mut core, &mut link)
        .instrument(span)
        .await;
    link.ended();
    end
}

/// How long `ls` waits for the gateway's fresh answer.
pub fn list_timeout() -> Duration {
    LIST_TIMEOUT
}
