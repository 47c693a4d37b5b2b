//! `pinholed`: the privileged daemon. It keeps the imported bundle (still encrypted), owns the
//! link to the gateway, and answers the CLI over a Unix socket whose every peer is checked.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use pinhole_certs::fsutil::write_private_atomic;
use pinhole_certs::{Bundle, BundleError};
use pinhole_proto::SiteView;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::control::{LinkState, MAX_REQUEST, Request, Response, Status};
use crate::link::{self, LinkCmd};

/// The group whose members may use the daemon besides root.
pub const GROUP: &str = "pinhole";

/// A login waits this long for the gateway's first answer (all addresses, with timeouts).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(45);

/// A connect waits this long for the site's answer through the gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `pinhole status` waits for the link task to bring its figures up to date.
const REFRESH_WAIT: Duration = Duration::from_millis(500);

/// The group id of `name` from /etc/group, and its member list.
fn group(name: &str) -> Option<(u32, Vec<String>)> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        if f.next()? != name {
            return None;
        }
        let gid = f.nth(1)?.parse().ok()?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        Some((gid, members))
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Root, the daemon's own user, or a member of the `pinhole` group.
fn peer_allowed(uid: u32, gid: u32) -> bool {
    let own = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok();
    if uid == 0 || Some(uid) == own {
        return true;
    }
    match group(GROUP) {
        Some((pgid, members)) => {
            gid == pgid || user_name(uid).is_some_and(|n| members.contains(&n))
        }
        None => false,
    }
}

struct Daemon {
    adapter: crate::plane::AdapterConfig,
    /// The HTTP proxy the link goes through, if any.
    proxy: Option<pinhole_shell::proxy::Proxy>,
    bundle_path: PathBuf,
    status: Arc<Mutex<Status>>,
    inventory: Arc<Mutex<Vec<SiteView>>>,
    link: tokio::sync::Mutex<Option<(mpsc::Sender<LinkCmd>, tokio::task::JoinHandle<()>)>>,
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

fn expiry_text(t: time::OffsetDateTime) -> String {
    crate::rfc3339(t)
}

impl Daemon {
    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn read_bundle(&self, password: &str) -> Result<Bundle, String> {
        let data = match fs::read(&self.bundle_path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("no bundle imported: run `pinhole import FILE.p12` first".into());
            }
            Err(e) => return Err(format!("cannot read the stored bundle: {e}")),
        };
        Bundle::from_pkcs12(&data, password).map_err(|e| match e {
            BundleError::WrongPassword => "wrong password".to_owned(),
            other => format!("the stored bundle is unusable: {other}"),
        })
    }

    /// Sends a command to the link task and waits for its answer.
    async fn link_call(
        &self,
        cmd: LinkCmd,
        rx: oneshot::Receiver<Result<String, String>>,
    ) -> Response {
        let tx = match self.link.lock().await.as_ref() {
            Some((tx, h)) if !h.is_finished() => tx.clone(),
            _ => return error("not logged in: run `pinhole login`"),
        };
        if tx.send(cmd).await.is_err() {
            return error("not logged in: run `pinhole login`");
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, rx).await {
            Ok(Ok(Ok(message))) => Response::Ok { message },
            Ok(Ok(Err(message))) => error(message),
            Ok(Err(_)) => error("the link to the gateway ended"),
            Err(_) => error("no answer from the gateway in time"),
        }
    }

    /// Brings the status's sessions and counters up to date with the link task's plane, if a
    /// link runs; waits at most [`REFRESH_WAIT`] (a busy link answers at its next turn).
    async fn refresh(&self) {
        let tx = match self.link.lock().await.as_ref() {
            Some((tx, h)) if !h.is_finished() => tx.clone(),
            _ => return,
        };
        let (done, rx) = oneshot::channel();
        if tx.send(LinkCmd::Refresh(done)).await.is_ok() {
            let _ = tokio::time::timeout(REFRESH_WAIT, rx).await;
        }
    }

    /// Whether a link task is alive.
    async fn link_running(&self) -> bool {
        self.link
            .lock()
            .await
            .as_ref()
            .is_some_and(|(_, h)| !h.is_finished())
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                self.refresh().await;
                Response::Status(self.status())
            }
            Request::Connect { site, agent } => {
                let (reply, rx) = oneshot::channel();
                self.link_call(LinkCmd::Connect { site, agent, reply }, rx)
                    .await
            }
            Request::Disconnect { site, agent, all } => {
                let target = match (site, agent, all) {
                    (_, _, true) => None,
                    (Some(s), Some(a), false) => Some((s, a)),
                    _ => return error("name a device as SITE/AGENT, or use --all"),
                };
                let (reply, rx) = oneshot::channel();
                self.link_call(LinkCmd::Disconnect { target, reply }, rx)
                    .await
            }
            Request::Import { bundle, password } => {
                let password = Zeroizing::new(password);
                if self.link_running().await {
                    return error("log out before importing another bundle");
                }
                let Ok(data) = hex::decode(&bundle) else {
                    return error("the request did not carry a bundle");
                };
                let parsed = match Bundle::from_pkcs12(&data, &password) {
                    Ok(b) => b,
                    Err(BundleError::WrongPassword) => {
                        return error("wrong password; nothing was imported");
                    }
                    Err(e) => return error(format!("{e}; nothing was imported")),
                };
                if let Err(e) = write_private_atomic(&self.bundle_path, &data) {
                    return error(format!("cannot store the bundle: {e}"));
                }
                let account = parsed.peer().name.clone();
                let expires = expiry_text(parsed.peer().not_after);
                self.set(|s| {
                    *s = Status {
                        state: LinkState::LoggedOut,
                        account: Some(account.clone()),
                        certificate_expires: Some(expires.clone()),
                        ended: std::mem::take(&mut s.ended),
                        ..empty_status()
                    };
                });
                info!(%account, "bundle imported");
                let gateways: Vec<String> = parsed
                    .gateway()
                    .addresses()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                Response::Ok {
                    message: format!(
                        "imported the bundle of {account} (gateway {}, certificate valid until {expires})",
                        gateways.join(", ")
                    ),
                }
            }
            Request::Login { password } => {
                let password = Zeroizing::new(password);
                if self.link_running().await {
                    let s = self.status();
                    return error(format!(
                        "already logged in as {} (state {:?}); log out first",
                        s.account.unwrap_or_default(),
                        s.state
                    ));
                }
                let bundle = match self.read_bundle(&password) {
                    Ok(b) => b,
                    Err(message) => return error(message),
                };
                let expires = bundle.peer().not_after;
                if expires < time::OffsetDateTime::now_utc() {
                    return error(format!(
                        "your certificate expired on {}; ask your administrator for a new bundle",
                        expiry_text(expires)
                    ));
                }
                let account = bundle.peer().name.clone();
                let last_gateway = self.status().gateway.and_then(|g| g.parse().ok());
                self.set(|s| {
                    *s = Status {
                        state: LinkState::Connecting,
                        account: Some(account),
                        certificate_expires: Some(expiry_text(expires)),
                        ended: std::mem::take(&mut s.ended),
                        ..empty_status()
                    };
                });
                let (tx, rx) = mpsc::channel(8);
                let (first_tx, first_rx) = oneshot::channel();
                let handle = tokio::spawn(link::run(
                    self.adapter.clone(),
                    self.proxy.clone(),
                    bundle,
                    last_gateway,
                    self.status.clone(),
                    self.inventory.clone(),
                    rx,
                    first_tx,
                ));
                *self.link.lock().await = Some((tx, handle));
                match tokio::time::timeout(LOGIN_TIMEOUT, first_rx).await {
                    Ok(Ok(Ok(message))) => Response::Ok { message },
                    Ok(Ok(Err(message))) => error(message),
                    Ok(Err(_)) => error("the login was interrupted"),
                    Err(_) => error("the gateway did not answer in time"),
                }
            }
            Request::Logout => {
                let taken = self.link.lock().await.take();
                let Some((tx, handle)) = taken else {
                    return error("not logged in");
                };
                let (done_tx, done_rx) = oneshot::channel();
                if tx.send(LinkCmd::Logout(done_tx)).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(3), done_rx).await;
                }
                handle.abort();
                self.inventory
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                self.set(|s| {
                    s.state = LinkState::LoggedOut;
                    s.tunnel_ip = None;
                    s.since = None;
                    s.sites = 0;
                });
                Response::Ok {
                    message: "logged out".into(),
                }
            }
            Request::List => {
                let tx = match self.link.lock().await.as_ref() {
                    Some((tx, h)) if !h.is_finished() => tx.clone(),
                    _ => {
                        let s = self.status();
                        return error(match s.last_error {
                            Some(e) if s.state == LinkState::Failed => {
                                format!("not logged in: {e}")
                            }
                            _ => "not logged in: run `pinhole login`".into(),
                        });
                    }
                };
                if self.status().state != LinkState::LoggedIn {
                    let s = self.status();
                    return error(format!(
                        "not connected to the gateway ({})",
                        s.last_error.unwrap_or_else(|| "connecting".into())
                    ));
                }
                let (reply_tx, reply_rx) = oneshot::channel();
                if tx.send(LinkCmd::List(reply_tx)).await.is_err() {
                    return error("not logged in");
                }
                match tokio::time::timeout(link::list_timeout(), reply_rx).await {
                    Ok(Ok(sites)) => Response::Inventory { sites },
                    _ => Response::Inventory {
                        sites: self
                            .inventory
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone(),
                    },
                }
            }
        }
    }
}

fn empty_status() -> Status {
    Status {
        state: LinkState::NoBundle,
        account: None,
        gateway: None,
        tunnel_ip: None,
        since: None,
        certificate_expires: None,
        last_error: None,
        sites: 0,
        sessions: Vec::new(),
        filter: Default::default(),
        refused: Vec::new(),
        ended: Vec::new(),
        remember_password: None,
    }
}

async fn serve_one(daemon: Arc<Daemon>, stream: UnixStream) {
    let allowed = stream
        .peer_cred()
        .map(|c| peer_allowed(c.uid(), c.gid()))
        .unwrap_or(false);
    let (rd, mut wr) = stream.into_split();
    // The request is read in full even from a peer that will be refused: closing with its
    // bytes unread would reset the connection, and the peer would see a broken pipe instead of
    // the reason.
    let mut line = Zeroizing::new(String::new());
    let mut reader = BufReader::new(rd.take(MAX_REQUEST as u64));
    let read = reader.read_line(&mut line).await;
    let response = if !allowed {
        warn!("control request from a user outside root and the `pinhole` group refused");
        error(format!(
            "permission denied: only root and members of the `{GROUP}` group may use pinholed"
        ))
    } else {
        match read {
            Ok(0) => return,
            Ok(_) => match serde_json::from_str::<Request>(&line) {
                Ok(req) => daemon.handle(req).await,
                Err(e) => error(format!("malformed request: {e}")),
            },
            Err(e) => error(format!("reading the request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = wr.write_all(&out).await;
}

/// Binds the control socket: mode 0660, group `pinhole` when it exists. A stale socket from a
/// crashed daemon is replaced; a live one means another daemon runs.
async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another pinholed is already listening on {}",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    if let Some((gid, _)) = group(GROUP) {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {GROUP}", path.display()))?;
    }
    Ok(listener)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(
    state: &Path,
    socket: &Path,
    adapter: crate::plane::AdapterConfig,
    proxy: Option<pinhole_shell::proxy::Proxy>,
) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("creating {}", state.display()))?;
    fs::set_permissions(state, fs::Permissions::from_mode(0o700))?;
    let bundle_path = state.join("bundle.p12");
    let mut initial = empty_status();
    if bundle_path.exists() {
        initial.state = LinkState::LoggedOut;
    }
    let daemon = Arc::new(Daemon {
        adapter,
        proxy,
        bundle_path,
        status: Arc::new(Mutex::new(initial)),
        inventory: Arc::new(Mutex::new(Vec::new())),
        link: tokio::sync::Mutex::new(None),
    });
    // Routes a crashed daemon left behind (the kernel removes those of its TUN anyway).
    match pinhole_routes::Routes::new(0) {
        Ok(r) => match r.sweep().await {
            Ok(0) => {}
            Ok(n) => info!(routes = n, "swept routes left by an earlier run"),
            Err(e) => warn!(error = %e, "cannot sweep old routes"),
        },
        Err(e) => warn!(error = %e, "netlink unavailable"),
    }
    let listener = bind(socket).await?;
    info!(socket = %socket.display(), state = %state.display(), "pinholed ready");
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve_one(daemon.clone(), stream)); }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping");
    let _ = daemon.handle(Request::Logout).await;
    let _ = fs::remove_file(socket);
    Ok(())
}
