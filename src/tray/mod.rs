//! `pinhole tray`: Pinhole in the desktop's system tray, as a StatusNotifierItem.
//!
//! What it is for: the technician's everyday controls in one menu — who is logged in where, the
//! sites and their devices to connect and disconnect, import a bundle, log in and out — and a
//! notification when a session ends that the technician did not end. It is one more client of
//! `pinholed`'s control socket ([`crate::control::call`], as the CLI) and has no privileges of
//! its own.
//!
//! How it is built: [`model`] decides (menu, icon, notifications: pure, tested); [`item`]
//! renders the model with ksni; [`desktop`] calls the desktop's notification server and file
//! chooser portal; [`pinentry`] asks for passwords; [`secrets`] keeps a remembered one in the
//! desktop's Secret Service; [`settings`] reads (and for "Remember password" writes) the
//! per-user settings.
//! The loop here polls the daemon every [`POLL`], carries out the clicked actions in tasks of
//! their own (a password dialog does not stop the polling) and moves the results between them.
//!
//! Must never: hold a password longer than one login (the request, and storing it when the
//! technician asked to remember it), write one to its log, keep one outside the Secret Service,
//! or talk to the gateway other than through the daemon.

pub mod desktop;
pub mod item;
pub mod model;
pub mod pinentry;
pub mod secrets;
pub mod settings;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ksni::TrayMethods;
use tokio::sync::mpsc;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::control::{self, LinkState, Request, Response};
use model::{Action, Daemon, Notice, Snapshot, Target, Watch};
use settings::{LastLogin, Settings};

/// How often the daemon's status is read: a local socket, cheap; a session that the gateway
/// ends shows in the menu and as a notification within this.
pub const POLL: Duration = Duration::from_secs(2);

/// How often the sites are asked for again while logged in, for their online flags: each ask
/// goes to the gateway.
const SITES_EVERY: Duration = Duration::from_secs(30);

/// Password attempts per "Log in…" or "Import certificate…": as many as a technician who
/// mistyped needs, few enough that a stuck dialog does not come back forever.
const PASSWORD_TRIES: usize = 3;

/// Runs the tray until "Quit", SIGINT or SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    let settings_path = settings::path();
    let settings = Arc::new(Mutex::new(Settings::load(settings_path.as_deref())?));
    let log = Arc::new(Log::new(settings::log_path()));
    let bus = zbus::Connection::session()
        .await
        .context("connecting to the D-Bus session bus (the tray runs in a desktop session)")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = item::Item {
        snap: Snapshot::default(),
        actions: tx.clone(),
    }
    // A tray started with the session may come up before the panel: wait for its host.
    .assume_sni_available(true)
    .spawn()
    .await
    .context("starting the StatusNotifierItem")?;
    info!(settings = ?settings_path, log = ?log.path, "tray started");
    log.write("tray started");

    let ctx = Ctx {
        bus,
        settings,
        settings_path,
        log: log.clone(),
        done: tx,
    };
    // The account whose remembered password was last deleted because the gateway forbids it.
    let mut forgotten: Option<secrets::Key> = None;
    let mut shown = Snapshot::default();
    let mut watch = Watch::default();
    let mut sites_at: Option<Instant> = None;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    loop {
        let force_sites = tokio::select! {
            _ = poll.tick() => false,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            action = rx.recv() => match action {
                None | Some(Action::Quit) => break,
                Some(Action::Refresh) => true,
                Some(a) => {
                    tokio::spawn(ctx.clone().perform(a));
                    continue;
                }
            },
        };
        let mut snap = read(&shown, force_sites, &mut sites_at).await;
        snap.remember_password = ctx.settings().remember_password;
        if snap.forbids_remembering() {
            let key = match &snap.daemon {
                Daemon::Up(s) => key_of(s),
                _ => None,
            };
            if key.is_some() && key != forgotten {
                forgotten.clone_from(&key);
                let c = ctx.clone();
                tokio::spawn(async move {
                    c.forget(key, "the gateway forbids it for this account")
                        .await
                });
            }
        } else if snap.allows_remembering() {
            // Allowed again: a later ban deletes again.
            forgotten = None;
        }
        if let Daemon::Up(s) = &snap.daemon {
            for notice in watch.notices(s) {
                log.write(&format!("{}: {}", notice.summary, notice.body));
                if ctx.settings().notifications {
                    ctx.notify(&notice).await;
                }
            }
        }
        let line = model::status_line(&snap);
        if line != model::status_line(&shown) {
            log.write(&line);
        }
        let changed = model::menu(&snap) != model::menu(&shown)
            || model::icon(&snap) != model::icon(&shown)
            || model::tooltip(&snap) != model::tooltip(&shown);
        shown = snap;
        if changed {
            let s = shown.clone();
            if handle.update(move |item| item.snap = s).await.is_none() {
                break; // the service ended
            }
        }
    }
    log.write("tray stopped");
    handle.shutdown().await;
    Ok(())
}

/// Asks the daemon for its status, and for the sites when they are due.
async fn read(last: &Snapshot, force_sites: bool, sites_at: &mut Option<Instant>) -> Snapshot {
    let asked = tokio::task::spawn_blocking(|| control::call(&Request::Status)).await;
    let daemon = match asked {
        Ok(Ok(Response::Status(s))) => Daemon::Up(Box::new(s)),
        Ok(Ok(other)) => Daemon::Unreachable(format!("unexpected answer from pinholed: {other:?}")),
        Ok(Err(e)) => Daemon::Unreachable(unreachable_text(&e)),
        Err(e) => Daemon::Unreachable(format!("the request failed: {e}")),
    };
    let mut snap = Snapshot {
        daemon,
        sites: last.sites.clone(),
        remember_password: last.remember_password,
    };
    let logged_in = matches!(&snap.daemon, Daemon::Up(s) if s.state == LinkState::LoggedIn);
    if !logged_in {
        snap.sites.clear();
        *sites_at = None;
        return snap;
    }
    let due = sites_at.is_none_or(|t| t.elapsed() >= SITES_EVERY);
    if force_sites || due || snap.wants_sites() {
        *sites_at = Some(Instant::now());
        match blocking(Request::List).await {
            Ok(Response::Inventory { sites }) => snap.sites = sites,
            Ok(Response::Error { message }) => warn!(%message, "cannot list the sites"),
            Ok(_) => warn!("unexpected answer to a site list"),
            Err(e) => warn!(error = %e, "cannot list the sites"),
        }
    }
    snap
}

/// One control request, on a blocking thread (the client is synchronous, as the CLI's).
async fn blocking(req: Request) -> Result<Response, String> {
    tokio::task::spawn_blocking(move || control::call(&req).map_err(|e| e.to_string()))
        .await
        .unwrap_or_else(|e| Err(format!("the request failed: {e}")))
}

/// Why the daemon did not answer, with what to do about it.
pub fn unreachable_text(e: &control::CallError) -> String {
    use std::io::ErrorKind;
    match e {
        control::CallError::Unreachable { source, .. }
            if source.kind() == ErrorKind::PermissionDenied =>
        {
            "Not allowed to use pinholed: join the group pinhole (sudo adduser $USER pinhole), \
             then log in to the desktop again"
                .into()
        }
        control::CallError::Unreachable { source, .. }
            if matches!(
                source.kind(),
                ErrorKind::NotFound | ErrorKind::ConnectionRefused
            ) =>
        {
            "pinholed is not running (sudo systemctl start pinholed)".into()
        }
        other => other.to_string(),
    }
}

/// Why the daemon refused a login.
#[derive(Debug)]
enum LoginRefused {
    /// The password does not open the bundle.
    WrongPassword,
    /// Anything else, in the daemon's words.
    Other(String),
}

/// Whether a refusal is about the password (so asking again makes sense).
pub fn wrong_password(message: &str) -> bool {
    message.starts_with("wrong password")
}

/// What the action tasks share.
#[derive(Clone)]
struct Ctx {
    bus: zbus::Connection,
    settings: Arc<Mutex<Settings>>,
    /// Where "Remember password" is saved.
    settings_path: Option<PathBuf>,
    log: Arc<Log>,
    /// Where a finished action asks for a refresh.
    done: mpsc::UnboundedSender<Action>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

/// The Secret Service key of the daemon's account, once it knows its gateway.
fn key_of(s: &control::Status) -> Option<secrets::Key> {
    Some(secrets::Key {
        gateway: s.gateway.clone()?,
        account: s.account.clone()?,
    })
}

impl Ctx {
    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn notify(&self, notice: &Notice) {
        if let Err(e) = desktop::notify(&self.bus, notice, "pinhole").await {
            warn!(error = %e, "cannot show a notification");
        }
    }

    /// Tells the technician about a failure: a notification and a line in the log.
    async fn fail(&self, summary: String, body: String) {
        self.log.write(&format!("{summary}: {body}"));
        self.notify(&Notice { summary, body }).await;
    }

    /// Carries out one clicked action, then asks the loop to refresh.
    async fn perform(self, action: Action) {
        match &action {
            Action::Connect(t) => {
                self.request(
                    Request::Connect {
                        site: t.site.clone(),
                        agent: t.agent.clone(),
                    },
                    format!("Pinhole: cannot connect {}", target(t)),
                )
                .await
            }
            Action::Disconnect(t) => {
                self.request(
                    Request::Disconnect {
                        site: Some(t.site.clone()),
                        agent: Some(t.agent.clone()),
                        all: false,
                    },
                    format!("Pinhole: cannot disconnect {}", target(t)),
                )
                .await
            }
            Action::DisconnectAll => {
                self.request(
                    Request::Disconnect {
                        site: None,
                        agent: None,
                        all: true,
                    },
                    "Pinhole: cannot disconnect".into(),
                )
                .await
            }
            Action::LogOut => {
                self.request(Request::Logout, "Pinhole: cannot log out".into())
                    .await
            }
            Action::LogIn => self.log_in().await,
            Action::RememberPassword(on) => self.remember(*on).await,
            Action::ImportCertificate => self.import().await,
            Action::OpenLog => self.open_log().await,
            Action::Refresh | Action::Quit => {}
        }
        let _ = self.done.send(Action::Refresh);
    }

    /// A request whose answer is `Ok` or an error to tell.
    async fn request(&self, req: Request, failure: String) {
        match blocking(req).await {
            Ok(Response::Ok { message }) => self.log.write(&message),
            Ok(Response::Error { message }) => self.fail(failure, message).await,
            Ok(other) => {
                self.fail(failure, format!("unexpected answer: {other:?}"))
                    .await
            }
            Err(e) => self.fail(failure, e).await,
        }
    }

    /// Which remembered password a login would use: the daemon's account at the gateway it
    /// last logged in to, or (a restarted daemon knows neither before the login) the tray's
    /// record of the last login whose password it stored.
    fn login_key(status: Option<&control::Status>) -> Option<secrets::Key> {
        if let Some(k) = status.and_then(key_of) {
            return Some(k);
        }
        let last = LastLogin::load()?;
        match status.and_then(|s| s.account.as_deref()) {
            Some(a) if a != last.account => None,
            _ => Some(secrets::Key {
                gateway: last.gateway,
                account: last.account,
            }),
        }
    }

    /// Sends a login; `Ok` with the daemon's message, or its refusal.
    async fn send_login(password: &str) -> Result<String, LoginRefused> {
        let req = Request::Login {
            password: password.to_owned(),
        };
        match blocking(req).await {
            Ok(Response::Ok { message }) => Ok(message),
            Ok(Response::Error { message }) if wrong_password(&message) => {
                Err(LoginRefused::WrongPassword)
            }
            Ok(Response::Error { message }) => Err(LoginRefused::Other(message)),
            Ok(other) => Err(LoginRefused::Other(format!("{other:?}"))),
            Err(e) => Err(LoginRefused::Other(e)),
        }
    }

    async fn log_in(&self) {
        let status = match blocking(Request::Status).await {
            Ok(Response::Status(s)) => Some(s),
            _ => None,
        };
        let account = status
            .as_ref()
            .and_then(|s| s.account.clone())
            .unwrap_or_default();
        let remember = self.settings().remember_password;
        let mut prompt = pinentry::Prompt {
            title: "Pinhole".into(),
            description: format!(
                "Log in to your Pinhole gateway as {account}.\n\nThe password of your certificate bundle:"
            ),
            prompt: "Password:".into(),
            error: None,
        };
        if remember && let Some(key) = Self::login_key(status.as_ref()) {
            match secrets::get(&self.bus, &key).await {
                Ok(Some(password)) => match Self::send_login(&password).await {
                    Ok(message) => {
                        return self
                            .log
                            .write(&format!("{message} (with the remembered password)"));
                    }
                    Err(LoginRefused::WrongPassword) => {
                        // The bundle changed since: the remembered password is no use.
                        self.log
                            .write("the remembered password is wrong; it is deleted");
                        self.forget(Some(key), "it is wrong").await;
                        prompt.error = Some("The remembered password is wrong".into());
                    }
                    Err(LoginRefused::Other(message)) => {
                        return self.fail("Pinhole: login failed".into(), message).await;
                    }
                },
                Ok(None) => {}
                Err(e) => self.log.write(&format!(
                    "cannot read a remembered password: {e}; asking for it"
                )),
            }
        }
        for _ in 0..PASSWORD_TRIES {
            let password = match self.password(&prompt).await {
                Ok(Some(p)) => p,
                Ok(None) => return, // cancelled
                Err(e) => {
                    return self
                        .fail("Pinhole: cannot ask for the password".into(), e)
                        .await;
                }
            };
            match Self::send_login(&password).await {
                Ok(message) => {
                    self.log.write(&message);
                    if remember {
                        self.keep(&password).await;
                    }
                    return;
                }
                Err(LoginRefused::WrongPassword) => {
                    prompt.error = Some("Wrong password, try again".into());
                }
                Err(LoginRefused::Other(message)) => {
                    return self.fail("Pinhole: login failed".into(), message).await;
                }
            }
        }
        self.fail(
            "Pinhole: login failed".into(),
            format!("wrong password, {PASSWORD_TRIES} times"),
        )
        .await;
    }

    /// After a login with `password`: stores it in the Secret Service if the gateway allows
    /// it for the account.
    async fn keep(&self, password: &str) {
        let status = match blocking(Request::Status).await {
            Ok(Response::Status(s)) => s,
            _ => return,
        };
        if status.remember_password != Some(true) {
            return; // forbidden: the loop deletes any remembered one
        }
        let Some(key) = key_of(&status) else { return };
        match secrets::store(&self.bus, &key, password).await {
            Ok(()) => {
                LastLogin {
                    gateway: key.gateway.clone(),
                    account: key.account.clone(),
                }
                .save();
                info!(account = %key.account, gateway = %key.gateway, "password remembered");
                self.log.write(&format!(
                    "the password of {} at {} is remembered in the Secret Service",
                    key.account, key.gateway
                ));
            }
            Err(secrets::SecretsError::Unavailable(why)) => {
                warn!(%why, "no Secret Service; the password will be asked each time");
                self.log.write(&format!(
                    "cannot remember the password: {}; it will be asked each time",
                    secrets::SecretsError::Unavailable(why)
                ));
            }
            Err(e) => {
                self.fail(
                    "Pinhole: cannot remember the password".into(),
                    e.to_string(),
                )
                .await
            }
        }
    }

    /// Deletes the remembered password of `key` (the daemon's account if `None`), saying `why`
    /// in the log.
    async fn forget(&self, key: Option<secrets::Key>, why: &str) {
        let key = match key {
            Some(k) => Some(k),
            None => match blocking(Request::Status).await {
                Ok(Response::Status(s)) => Self::login_key(Some(&s)),
                _ => None,
            },
        };
        let Some(key) = key else { return };
        match secrets::delete(&self.bus, &key).await {
            Ok(0) => {}
            Ok(n) => {
                info!(account = %key.account, gateway = %key.gateway, items = n, "remembered password deleted");
                self.log.write(&format!(
                    "the remembered password of {} at {} is deleted: {why}",
                    key.account, key.gateway
                ));
            }
            // Nothing can have been remembered without one.
            Err(secrets::SecretsError::Unavailable(_)) => {}
            Err(e) => warn!(error = %e, "cannot delete the remembered password"),
        }
    }

    /// "Remember password" clicked: saves the setting; turning it off forgets the password.
    async fn remember(&self, on: bool) {
        if let Some(path) = &self.settings_path
            && let Err(e) = Settings::save_remember_password(path, on)
        {
            return self
                .fail("Pinhole: cannot save the setting".into(), format!("{e:#}"))
                .await;
        }
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remember_password = on;
        if on {
            self.log
                .write("remember password: on (from the next login with the password)");
        } else {
            self.log.write("remember password: off");
            self.forget(None, "remember password was turned off").await;
        }
    }

    async fn import(&self) {
        let path = match desktop::choose_bundle(&self.bus).await {
            Ok(desktop::Chosen::File(p)) => p,
            Ok(desktop::Chosen::Cancelled) => return,
            Ok(desktop::Chosen::NoPortal(why)) => {
                return self
                    .fail(
                        "Pinhole: no file chooser".into(),
                        format!(
                            "The desktop portal (xdg-desktop-portal) is not available ({why}). \
                             Import the bundle in a terminal: pinhole import FILE.p12"
                        ),
                    )
                    .await;
            }
            Err(e) => {
                return self
                    .fail(
                        "Pinhole: no file chooser".into(),
                        format!("{e}. Import the bundle in a terminal: pinhole import FILE.p12"),
                    )
                    .await;
            }
        };
        let data = match read_bundle(&path) {
            Ok(d) => d,
            Err(e) => return self.fail("Pinhole: cannot import".into(), e).await,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut prompt = pinentry::Prompt {
            title: "Pinhole".into(),
            description: format!("Import the certificate bundle {name}.\n\nIts password:"),
            prompt: "Password:".into(),
            error: None,
        };
        for _ in 0..PASSWORD_TRIES {
            let password = match self.password(&prompt).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => {
                    return self
                        .fail("Pinhole: cannot ask for the password".into(), e)
                        .await;
                }
            };
            let req = Request::Import {
                bundle: hex::encode(&data),
                password: password.to_string(),
            };
            drop(password);
            match blocking(req).await {
                Ok(Response::Ok { message }) => {
                    self.log.write(&message);
                    return self
                        .notify(&Notice {
                            summary: "Pinhole: certificate imported".into(),
                            body: message,
                        })
                        .await;
                }
                Ok(Response::Error { message }) if wrong_password(&message) => {
                    prompt.error = Some("Wrong password, try again".into());
                }
                Ok(Response::Error { message }) => {
                    return self.fail("Pinhole: cannot import".into(), message).await;
                }
                Ok(other) => {
                    return self
                        .fail("Pinhole: cannot import".into(), format!("{other:?}"))
                        .await;
                }
                Err(e) => return self.fail("Pinhole: cannot import".into(), e).await,
            }
        }
    }

    /// The password from pinentry; from the terminal if there is no pinentry and the tray runs
    /// in one.
    async fn password(
        &self,
        prompt: &pinentry::Prompt,
    ) -> Result<Option<Zeroizing<String>>, String> {
        let program = self.settings().pinentry;
        let p = prompt.clone();
        let asked = tokio::task::spawn_blocking(move || match pinentry::ask(&program, &p) {
            Err(pinentry::PinentryError::Start { program, source })
                if std::io::stdin().is_terminal() =>
            {
                warn!(%program, error = %source, "no pinentry; asking on the terminal");
                eprintln!("{}", p.description);
                rpassword::prompt_password("Password: ")
                    .map(|pw| Some(Zeroizing::new(pw)))
                    .map_err(|e| format!("reading the password from the terminal: {e}"))
            }
            Err(pinentry::PinentryError::Start { program, source }) => Err(format!(
                "cannot start the password dialog {program} ({source}): install a pinentry \
                     (e.g. pinentry-gnome3 or pinentry-qt), or set `pinentry` in tray.toml"
            )),
            other => other.map_err(|e| e.to_string()),
        })
        .await;
        asked.unwrap_or_else(|e| Err(format!("the password dialog failed: {e}")))
    }

    async fn open_log(&self) {
        let Some(path) = self.log.path.clone() else {
            return self
                .fail("Pinhole: no log".into(), "no home directory".into())
                .await;
        };
        let open = self.settings().open;
        let started = tokio::process::Command::new(&open)
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .spawn();
        match started {
            // Reaped in the background: a viewer may stay open for long.
            Ok(mut child) => {
                tokio::spawn(async move { child.wait().await });
            }
            Err(e) => {
                self.fail(
                    "Pinhole: cannot open the log".into(),
                    format!("{open} {}: {e}", path.display()),
                )
                .await
            }
        }
    }
}

fn target(t: &Target) -> String {
    format!("{}/{}", t.site, t.agent)
}

fn read_bundle(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if data.len() > pinhole_certs::bundle::MAX_BUNDLE_LEN {
        return Err(format!("{} is too large to be a bundle", path.display()));
    }
    Ok(data)
}

/// The tray's log is moved to `tray.log.1` past this size: a few thousand lines of history,
/// bounded however long the session runs.
const LOG_ROTATE: u64 = 1024 * 1024;

/// The tray's own log of what it saw and did (no passwords, no addresses beyond what the
/// menu shows): what "Open log" opens. Best effort: a log that cannot be written is skipped.
#[derive(Debug)]
struct Log {
    path: Option<PathBuf>,
}

impl Log {
    fn new(path: Option<PathBuf>) -> Self {
        if let Some(dir) = path.as_deref().and_then(std::path::Path::parent) {
            let _ = std::fs::create_dir_all(dir);
        }
        Self { path }
    }

    fn write(&self, line: &str) {
        let Some(path) = &self.path else { return };
        if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE) {
            let _ = std::fs::rename(path, path.with_extension("log.1"));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{} {line}", crate::now_rfc3339());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_daemon_is_explained() {
        let e = |kind| control::CallError::Unreachable {
            path: "/run/pinhole/pinholed.sock".into(),
            source: std::io::Error::from(kind),
        };
        assert!(unreachable_text(&e(std::io::ErrorKind::PermissionDenied)).contains("adduser"));
        assert!(unreachable_text(&e(std::io::ErrorKind::NotFound)).contains("not running"));
        assert!(unreachable_text(&control::CallError::NoAnswer).contains("without answering"));
    }

    #[test]
    fn only_a_wrong_password_is_asked_again() {
        assert!(wrong_password("wrong password"));
        assert!(wrong_password("wrong password; nothing was imported"));
        assert!(!wrong_password("the gateway did not answer in time"));
    }
}
