//! The daemon's link to the gateway: log in, keep the inventory, reconnect after a loss
//! (never after the account was closed or the gateway's key stopped matching).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pinhole_certs::tls::{self, key_refused};
use pinhole_certs::{Bundle, GatewayAddress, PinnedServerVerifier};
use pinhole_proto::{Backoff, ClientCore, ClientEvent, CloseReason, ErrorCode, SiteView};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::control::{LinkState, SessionView, Status};
use crate::plane::{AdapterConfig, Plane};

/// TCP connect and TLS handshake to one address must finish this soon.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// `pinhole ls` waits this long for a fresh inventory before answering from the cache.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

const READ_BUFFER: usize = 16 * 1024;

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

/// A rustls alert or verifier verdict behind an I/O error, in a technician's words.
fn classify(e: &io::Error) -> End {
    if key_refused(e).is_some() {
        return End::Fatal(PIN_MISMATCH.into());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(err) = source {
        if let Some(rustls::Error::AlertReceived(alert)) = err.downcast_ref::<rustls::Error>() {
            return match alert {
                rustls::AlertDescription::CertificateRevoked => End::Fatal(ACCOUNT_CLOSED.into()),
                rustls::AlertDescription::CertificateExpired => End::Fatal(
                    "your certificate has expired; ask your administrator for a new bundle".into(),
                ),
                other => End::Fatal(format!("the gateway refused your certificate ({other:?})")),
            };
        }
        source = err.source();
    }
    End::Retry(e.to_string())
}

fn server_name(addr: &GatewayAddress) -> Option<ServerName<'static>> {
    match addr.ip() {
        Some(ip) => Some(ServerName::IpAddress(ip.into())),
        None => ServerName::try_from(addr.host().to_owned()).ok(),
    }
}

type Stream = tokio_rustls::client::TlsStream<TcpStream>;

async fn dial(bundle: &Bundle) -> Result<(Stream, GatewayAddress), End> {
    let config = tls::client_config(
        bundle.identity(),
        PinnedServerVerifier::new(bundle.gateway().pin()),
    )
    .map_err(|e| End::Fatal(format!("TLS setup: {e}")))?;
    let connector = TlsConnector::from(Arc::new(config));
    let mut tried = Vec::new();
    for addr in bundle.gateway().addresses() {
        let Some(name) = server_name(addr) else {
            continue;
        };
        let attempt = async {
            let tcp = TcpStream::connect((addr.host(), addr.port())).await?;
            tcp.set_nodelay(true)?;
            socket2::SockRef::from(&tcp).set_send_buffer_size(tls::LINK_SEND_BUFFER)?;
            connector.connect(name, tcp).await
        };
        match tokio::time::timeout(DIAL_TIMEOUT, attempt).await {
            Ok(Ok(stream)) => return Ok((stream, addr.clone())),
            Ok(Err(e)) => match classify(&e) {
                End::Retry(why) => tried.push(format!("{addr}: {why}")),
                fatal => return Err(fatal),
            },
            Err(_) => tried.push(format!("{addr}: timed out")),
        }
    }
    Err(End::Retry(format!(
        "gateway unreachable (tried {})",
        tried.join("; ")
    )))
}

fn update(status: &Mutex<Status>, f: impl FnOnce(&mut Status)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Runs the link until logout or a fatal refusal. `first` gets the outcome of the first
/// attempt: `pinhole login` reports it and the link gives up if it failed.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    adapter: AdapterConfig,
    bundle: Bundle,
    status: Arc<Mutex<Status>>,
    inventory: Arc<Mutex<Vec<SiteView>>>,
    mut cmds: mpsc::Receiver<LinkCmd>,
    first: oneshot::Sender<Result<String, String>>,
) {
    let mut first = Some(first);
    let mut backoff = Backoff::new();
    let mut plane = Plane::new(&adapter);
    loop {
        update(&status, |s| {
            s.state = if first.is_some() {
                LinkState::Connecting
            } else {
                LinkState::Reconnecting
            };
        });
        let end = match dial(&bundle).await {
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

#[allow(clippy::too_many_arguments)]
async fn connected(
    stream: Stream,
    addr: &GatewayAddress,
    status: &Mutex<Status>,
    inventory: &Mutex<Vec<SiteView>>,
    cmds: &mut mpsc::Receiver<LinkCmd>,
    first: &mut Option<oneshot::Sender<Result<String, String>>>,
    backoff: &mut Backoff,
    plane: &mut Plane,
) -> End {
    plane.set_gateway(stream.get_ref().0.peer_addr().ok().map(|a| a.ip()));
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut core = ClientCore::new(
        Instant::now(),
        env!("CARGO_PKG_VERSION"),
        pinhole_proto::client::CLIENT_HEARTBEAT,
    );
    let mut buf = vec![0u8; READ_BUFFER];
    let mut waiting_list: Vec<oneshot::Sender<Vec<SiteView>>> = Vec::new();
    let mut logout: Option<oneshot::Sender<()>> = None;
    let mut waiting_connect: Vec<(u32, String, Reply)> = Vec::new();
    let mut tun_buf = vec![0u8; pinhole_adapter::wg::BUFFER];
    let mut tick = tokio::time::interval(TICK);
    let end = loop {
        let mut end = None;
        while let Some(ev) = core.poll_event() {
            if !matches!(ev, ClientEvent::Data { .. }) {
                tracing::debug!(event = ?ev, "from the gateway");
            }
            match ev {
                ClientEvent::LoggedIn {
                    account,
                    tunnel_ip,
                    sites,
                } => {
                    backoff.reset();
                    if let Some(ip) = tunnel_ip
                        && let Err(e) = plane.ensure_tun(ip)
                    {
                        end = Some(End::Fatal(e));
                        break;
                    }
                    info!(%account, gateway = %addr, sites = sites.len(), "logged in");
                    update(status, |s| {
                        s.state = LinkState::LoggedIn;
                        s.gateway = Some(addr.to_string());
                        s.tunnel_ip = tunnel_ip;
                        s.sites = sites.len();
                        s.last_error = None;
                        if s.since.is_none() {
                            s.since = Some(crate::now_rfc3339());
                        }
                    });
                    let n = sites.len();
                    *inventory.lock().unwrap_or_else(|p| p.into_inner()) = sites;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(format!(
                            "logged in as {account} at {addr}; {n} site(s) available"
                        )));
                    }
                }
                ClientEvent::Inventory(sites) => {
                    update(status, |s| s.sites = sites.len());
                    *inventory.lock().unwrap_or_else(|p| p.into_inner()) = sites.clone();
                    for tx in waiting_list.drain(..) {
                        let _ = tx.send(sites.clone());
                    }
                }
                ClientEvent::SessionOpened {
                    session,
                    key,
                    agent,
                } => {
                    let now = Instant::now();
                    let name = agent.name.clone();
                    let result = plane
                        .opened(session, &key, agent)
                        .await
                        .map_err(|e| e.to_string());
                    plane.flush(&mut core, now).await;
                    if result.is_err() {
                        core.close_session(
                            session,
                            Some(&name),
                            "the client could not set up the device",
                            now,
                        );
                        plane.close(session, Some(&name)).await;
                    }
                    if let Some(i) = waiting_connect
                        .iter()
                        .position(|(s, a, _)| *s == session && *a == name)
                    {
                        let (_, _, reply) = waiting_connect.remove(i);
                        let _ = reply.send(result);
                    }
                    publish(status, plane);
                }
                ClientEvent::SessionRefused { session, reason } => {
                    for agent in plane.refused(session) {
                        if let Some(i) = waiting_connect
                            .iter()
                            .position(|(s, a, _)| *s == session && *a == agent)
                        {
                            let (_, _, reply) = waiting_connect.remove(i);
                            let _ = reply.send(Err(reason.clone()));
                        }
                    }
                }
                ClientEvent::SessionClosed {
                    session,
                    reason,
                    agent,
                } => {
                    info!(session, agent = ?agent, %reason, "device disconnected by the gateway");
                    let before = plane.views().0;
                    plane.close(session, agent.as_deref()).await;
                    record_ended(status, &before, plane, &reason);
                    update(status, |s| {
                        s.last_error = Some(format!("disconnected: {reason}"))
                    });
                    publish(status, plane);
                }
                ClientEvent::Data { session, datagram } => {
                    let now = Instant::now();
                    plane.handle_datagram(session, &datagram, now);
                    plane.flush(&mut core, now).await;
                }
                ClientEvent::Closed(CloseReason::Error {
                    code: ErrorCode::AccountClosed,
                    ..
                }) => end = Some(End::Fatal(ACCOUNT_CLOSED.into())),
                ClientEvent::Closed(CloseReason::Error { code, text }) => {
                    end = Some(match code {
                        ErrorCode::Shutdown | ErrorCode::Replaced | ErrorCode::Internal => {
                            End::Retry(format!("the gateway ended the link: {text}"))
                        }
                        _ => End::Fatal(format!("the gateway refused: {text}")),
                    });
                }
                ClientEvent::Closed(CloseReason::Timeout) => {
                    end = Some(End::Retry("the gateway stopped answering".into()))
                }
                ClientEvent::Closed(CloseReason::Protocol(p)) => {
                    end = Some(End::Retry(format!("protocol error: {p}")))
                }
                ClientEvent::Closed(CloseReason::Local) => end = Some(End::Logout),
            }
        }
        while let Some(b) = core.poll_transmit() {
            if let Err(e) = wr.write_all(&b).await {
                // The gateway may have said why it closed (an account closed): read what is
                // left before concluding that the network failed.
                let mut why = classify(&e);
                let _ = tokio::time::timeout(Duration::from_millis(300), async {
                    while let Ok(n) = rd.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        core.handle_input(&buf[..n], Instant::now());
                    }
                })
                .await;
                while let Some(ev) = core.poll_event() {
                    if let ClientEvent::Closed(CloseReason::Error { code, text }) = ev {
                        why = if code == ErrorCode::AccountClosed {
                            End::Fatal(ACCOUNT_CLOSED.into())
                        } else {
                            End::Retry(format!("the gateway ended the link: {text}"))
                        };
                    }
                }
                end.get_or_insert(why);
                break;
            }
        }
        if let Some(end) = end {
            break end;
        }
        if core.is_closed() {
            break End::Logout;
        }
        let timeout = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        let tun = plane.tun();
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => break End::Retry("the gateway closed the connection".into()),
                Err(e) => break classify(&e),
                Ok(n) => core.handle_input(&buf[..n], Instant::now()),
            },
            n = pinhole_adapter::tun::recv_or_wait(tun, &mut tun_buf) => {
                if let Ok(n) = n {
                    let now = Instant::now();
                    plane.handle_tun_packets(&mut tun_buf, n, now);
                    plane.flush(&mut core, now).await;
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                plane.handle_timeout(now);
                plane.flush(&mut core, now).await;
                publish(status, plane);
            }
            _ = tokio::time::sleep_until(timeout.into()) => core.handle_timeout(Instant::now()),
            cmd = cmds.recv() => match cmd {
                None => break End::Logout,
                Some(LinkCmd::Logout(done)) => {
                    core.logout(Instant::now());
                    logout = Some(done);
                }
                Some(LinkCmd::Refresh(done)) => {
                    publish(status, plane);
                    let _ = done.send(());
                }
                Some(LinkCmd::List(tx)) => {
                    if core.is_logged_in() {
                        core.list(Instant::now());
                        waiting_list.push(tx);
                    } else {
                        let _ = tx.send(inventory.lock().unwrap_or_else(|p| p.into_inner()).clone());
                    }
                }
                Some(LinkCmd::Connect { site, agent, reply }) => {
                    if !core.is_logged_in() {
                        let _ = reply.send(Err("not logged in yet".into()));
                        continue;
                    }
                    let found = inventory
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .find(|s| s.name == site)
                        .map(|s| (s.online, s.agents.iter().find(|a| a.name == agent).cloned()));
                    let a = match found {
                        None => { let _ = reply.send(Err(format!("no site {site} in your inventory (see `pinhole ls`)"))); continue; }
                        Some((_, None)) => { let _ = reply.send(Err(format!("site {site} has no agent {agent} (see `pinhole ls`)"))); continue; }
                        Some((_, Some(a))) => a,
                    };
                    if plane.find(&site, &agent).is_some() {
                        let _ = reply.send(Ok(format!("{site}/{agent} is already connected")));
                        continue;
                    }
                    let sid = plane.session_for(&site);
                    if let Err(e) = plane.request(sid, &a) {
                        let _ = reply.send(Err(e.to_string()));
                        continue;
                    }
                    core.open_session(sid, &site, &agent, &plane.public_key(), Instant::now());
                    waiting_connect.push((sid, agent, reply));
                }
                Some(LinkCmd::Disconnect { target, reply }) => {
                    let now = Instant::now();
                    match target {
                        Some((site, agent)) => match plane.find(&site, &agent) {
                            Some(sid) => {
                                core.close_session(sid, Some(&agent), "disconnected by the technician", now);
                                plane.close(sid, Some(&agent)).await;
                                let _ = reply.send(Ok(format!("disconnected {site}/{agent}")));
                            }
                            None => { let _ = reply.send(Err(format!("{site}/{agent} is not connected"))); }
                        },
                        None => {
                            let n = plane.sessions().len();
                            for sid in plane.sessions() {
                                core.close_session(sid, None, "disconnected by the technician", now);
                            }
                            plane.close_all().await;
                            let _ = reply.send(Ok(format!("disconnected everything ({n} site tunnel(s))")));
                        }
                    }
                    publish(status, plane);
                }
            },
        }
    };
    for (_, _, reply) in waiting_connect.drain(..) {
        let _ = reply.send(Err("the link to the gateway ended".into()));
    }
    // Answer waiting `ls` from the cache; flush a logout.
    for tx in waiting_list.drain(..) {
        let _ = tx.send(inventory.lock().unwrap_or_else(|p| p.into_inner()).clone());
    }
    while let Some(b) = core.poll_transmit() {
        if wr.write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    if let Some(done) = logout {
        let _ = done.send(());
    }
    end
}

/// How long `ls` waits for the gateway's fresh answer.
pub fn list_timeout() -> Duration {
    LIST_TIMEOUT
}
