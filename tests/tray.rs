//! `pinhole tray` against a real system: gateway, sites and the technician's `pinholed` in
//! network namespaces (tests/common/netns.rs), and a private D-Bus session bus started here
//! (`dbus-daemon`) on which the test plays the desktop — a StatusNotifierWatcher, a
//! notification server and the file chooser portal, each a small zbus service. The test reads
//! the tray's menu over `com.canonical.dbusmenu` and clicks items as a panel does (`Event`
//! "clicked"); passwords come from a scripted pinentry speaking Assuan. Root only.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::System;
use common::{Proc, bin, wait_until};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

const T: Duration = Duration::from_secs(20);

/// What the desktop stand-ins saw.
#[derive(Debug, Default)]
struct Desktop {
    items: Vec<String>,
    notifications: Vec<(String, String)>,
    /// What the file chooser hands out.
    file: Option<PathBuf>,
    opened: usize,
}

type Shared = Arc<Mutex<Desktop>>;

fn lock(d: &Shared) -> std::sync::MutexGuard<'_, Desktop> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

struct Watcher(Shared);

#[zbus::interface(name = "org.kde.StatusNotifierWatcher")]
impl Watcher {
    fn register_status_notifier_item(
        &self,
        service: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) {
        // ksni passes its well-known name; a bare path would mean "the sender, at this path".
        let name = if service.starts_with('/') {
            hdr.sender().map(|s| s.to_string()).unwrap_or_default()
        } else {
            service.to_owned()
        };
        lock(&self.0).items.push(name);
    }

    fn register_status_notifier_host(&self, _service: &str) {}

    #[zbus(property)]
    fn registered_status_notifier_items(&self) -> Vec<String> {
        lock(&self.0).items.clone()
    }

    #[zbus(property)]
    fn is_status_notifier_host_registered(&self) -> bool {
        true
    }

    #[zbus(property)]
    fn protocol_version(&self) -> i32 {
        0
    }
}

struct Notifications(Shared);

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        _app_name: &str,
        _replaces_id: u32,
        _app_icon: &str,
        summary: &str,
        body: &str,
        _actions: Vec<String>,
        _hints: HashMap<String, OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        let mut d = lock(&self.0);
        d.notifications.push((summary.to_owned(), body.to_owned()));
        d.notifications.len() as u32
    }

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into()]
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "stand-in".into(),
            "pinhole tests".into(),
            "1".into(),
            "1.2".into(),
        )
    }
}

struct FileChooser(Shared);

#[zbus::interface(name = "org.freedesktop.portal.FileChooser")]
impl FileChooser {
    async fn open_file(
        &self,
        _parent_window: &str,
        _title: &str,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        let token = options
            .get("handle_token")
            .and_then(|v| String::try_from(v.clone()).ok())
            .unwrap_or_else(|| "t".into());
        let sender = hdr
            .sender()
            .map(|s| s.trim_start_matches(':').replace('.', "_"))
            .unwrap_or_default();
        let path = format!("/org/freedesktop/portal/desktop/request/{sender}/{token}");
        let file = {
            let mut d = lock(&self.0);
            d.opened += 1;
            d.file.clone()
        };
        let handle = OwnedObjectPath::try_from(path.clone())
            .map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        let conn = conn.clone();
        // The answer comes as a signal after the method returns, as the real portal's does.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (code, results) = match file {
                Some(f) => {
                    let mut r: HashMap<&str, Value<'_>> = HashMap::new();
                    r.insert("uris", Value::from(vec![format!("file://{}", f.display())]));
                    (0u32, r)
                }
                None => (1u32, HashMap::new()),
            };
            let _ = conn
                .emit_signal(
                    None::<&str>,
                    path.as_str(),
                    "org.freedesktop.portal.Request",
                    "Response",
                    &(code, results),
                )
                .await;
        });
        Ok(handle)
    }
}

/// A private session bus: no service files, so nothing of this machine's desktop is activated.
struct Bus {
    proc: std::process::Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Self {
        let conf = dir.join("session.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.join("bus").display()
            ),
        )
        .expect("session.conf");
        let mut proc = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbus-daemon (apt-get install dbus-daemon)");
        let mut address = String::new();
        BufReader::new(proc.stdout.take().expect("stdout"))
            .read_line(&mut address)
            .expect("bus address");
        assert!(address.starts_with("unix:"), "{address:?}");
        Self {
            proc,
            address: address.trim().to_owned(),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// A dbusmenu layout node on the wire: id, properties, children (each a variant of the same).
type Layout = (i32, HashMap<String, OwnedValue>, Vec<OwnedValue>);

/// One node of a dbusmenu layout.
#[derive(Debug, Clone)]
struct Node {
    id: i32,
    label: String,
    enabled: bool,
    checkmark: bool,
    checked: bool,
    children: Vec<Node>,
}

impl Node {
    fn parse(v: &Value<'_>) -> Node {
        let v = match v {
            Value::Value(inner) => inner,
            other => other,
        };
        let Value::Structure(s) = v else {
            panic!("a layout node is a structure: {v:?}")
        };
        let f = s.fields();
        let Value::I32(id) = f[0] else {
            panic!("id {:?}", f[0])
        };
        let props: HashMap<String, OwnedValue> =
            HashMap::try_from(f[1].try_clone().expect("props")).expect("props");
        let children = match &f[2] {
            Value::Array(a) => a.iter().map(Node::parse).collect(),
            other => panic!("children {other:?}"),
        };
        let text = |k: &str| {
            props
                .get(k)
                .and_then(|v| String::try_from(v.clone()).ok())
                .unwrap_or_default()
        };
        Node {
            id,
            label: text("label").replace("__", "_"),
            enabled: props
                .get("enabled")
                .and_then(|v| bool::try_from(v.clone()).ok())
                .unwrap_or(true),
            checkmark: text("toggle-type") == "checkmark",
            checked: props
                .get("toggle-state")
                .and_then(|v| i32::try_from(v.clone()).ok())
                == Some(1),
            children,
        }
    }

    fn find(&self, f: &dyn Fn(&Node) -> bool) -> Option<&Node> {
        if f(self) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(f))
    }

    fn labels(&self) -> Vec<String> {
        let mut out = vec![self.label.clone()];
        for c in &self.children {
            out.extend(c.labels().into_iter().map(|l| format!("  {l}")));
        }
        out
    }
}

/// The test's side of the bus: the desktop stand-ins and a way to read and click the menu.
struct Host {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    desk: Shared,
}

impl Host {
    /// The watcher and the notification server, and the file chooser portal if `portal`.
    fn start(address: &str, portal: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let desk: Shared = Arc::default();
        let conn = rt.block_on(async {
            let mut b = zbus::connection::Builder::address(address)
                .expect("address")
                .name("org.kde.StatusNotifierWatcher")
                .expect("name")
                .name("org.freedesktop.Notifications")
                .expect("name")
                .serve_at("/StatusNotifierWatcher", Watcher(desk.clone()))
                .expect("watcher")
                .serve_at(
                    "/org/freedesktop/Notifications",
                    Notifications(desk.clone()),
                )
                .expect("notifications");
            if portal {
                b = b
                    .name("org.freedesktop.portal.Desktop")
                    .expect("name")
                    .serve_at("/org/freedesktop/portal/desktop", FileChooser(desk.clone()))
                    .expect("portal");
            }
            b.build().await.expect("connect to the test bus")
        });
        Self { rt, conn, desk }
    }

    fn item(&self) -> Option<String> {
        lock(&self.desk).items.first().cloned()
    }

    fn call<B>(&self, iface: &str, path: &str, method: &str, body: &B) -> zbus::Message
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        let dest = self.item().expect("a registered item");
        self.rt
            .block_on(
                self.conn
                    .call_method(Some(dest.as_str()), path, Some(iface), method, body),
            )
            .unwrap_or_else(|e| panic!("{iface}.{method}: {e}"))
    }

    fn property(&self, name: &str) -> OwnedValue {
        let m = self.call(
            "org.freedesktop.DBus.Properties",
            "/StatusNotifierItem",
            "Get",
            &("org.kde.StatusNotifierItem", name),
        );
        m.body().deserialize::<OwnedValue>().expect("property")
    }

    fn text_property(&self, name: &str) -> String {
        String::try_from(self.property(name)).expect("a string")
    }

    fn menu_path(&self) -> String {
        OwnedObjectPath::try_from(self.property("Menu"))
            .expect("an object path")
            .to_string()
    }

    fn layout(&self) -> Node {
        let path = self.menu_path();
        let m = self.call(
            "com.canonical.dbusmenu",
            &path,
            "GetLayout",
            &(0i32, -1i32, Vec::<&str>::new()),
        );
        let (_rev, (id, _props, children)): (u32, Layout) = m.body().deserialize().expect("layout");
        Node {
            id,
            label: String::new(),
            enabled: true,
            checkmark: false,
            checked: false,
            children: children.iter().map(|c| Node::parse(c)).collect(),
        }
    }

    /// Waits for an item whose label starts with `label`, and clicks it.
    fn click(&self, label: &str) {
        let mut node = None;
        assert!(
            wait_until(T, || {
                node = self
                    .layout()
                    .find(&|n| n.label.starts_with(label) && n.enabled)
                    .cloned();
                node.is_some()
            }),
            "no enabled {label} in the menu:\n{}",
            self.layout().labels().join("\n")
        );
        let id = node.expect("found").id;
        let path = self.menu_path();
        self.call(
            "com.canonical.dbusmenu",
            &path,
            "Event",
            &(id, "clicked", Value::from(0i32), 0u32),
        );
    }

    fn wait_menu(&self, what: &str, f: impl Fn(&Node) -> bool) {
        assert!(
            wait_until(T, || f(&self.layout())),
            "{what}; the menu:\n{}",
            self.layout().labels().join("\n")
        );
    }
}

/// A pinentry that answers every command OK and GETPIN with the first line of `pw`, and logs
/// the commands it got (without the password) to `log`.
fn pinentry(dir: &Path, pw: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("pinentry");
    let log = dir.join("pinentry.log");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho 'OK Pleased to meet you'\nwhile IFS= read -r line; do\n  echo \"$line\" >> '{log}'\n  case \"$line\" in\n    GETPIN) printf 'D %s\\nOK\\n' \"$(head -n1 '{pw}')\" ;;\n    BYE) echo 'OK closing connection'; exit 0 ;;\n    *) echo OK ;;\n  esac\ndone\n",
            log = log.display(),
            pw = pw.display()
        ),
    )
    .expect("pinentry");
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .expect("chmod");
    (script, log)
}

/// `pinhole tray` on `bus`, for the daemon at `socket`, with its own home under `dir`.
fn tray(dir: &Path, bus: &Bus, socket: &Path, pinentry: &Path) -> Proc {
    let home = dir.join("home");
    Proc::spawn(
        Command::new(bin("pinhole"))
            .arg("tray")
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("PINHOLE_SOCKET", socket)
            .env("PINHOLE_PINENTRY", pinentry)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_STATE_HOME", home.join("state"))
            .env("RUST_LOG", "info"),
        dir.join("tray.log"),
    )
}

/// No root: a daemon without a bundle, a desktop without a file chooser portal.
#[test]
fn without_a_portal_the_tray_says_how_to_import() {
    let dir = tempfile::tempdir().expect("dir");
    let bus = Bus::start(dir.path());
    let host = Host::start(&bus.address, false);
    // Before the daemon runs: the tray says so, and offers nothing but the log.
    let socket = dir.path().join("t.sock");
    let mut tray = tray(
        dir.path(),
        &bus,
        &socket,
        Path::new("/nonexistent/pinentry"),
    );
    assert!(
        wait_until(T, || host.item().is_some()),
        "the tray did not register: {}",
        tray.log_text()
    );
    host.wait_menu("the daemon is not running", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "Pinhole is not available")
            && m.children
                .get(1)
                .is_some_and(|n| n.label.starts_with("pinholed is not running"))
    });
    assert_eq!(host.text_property("IconName"), "pinhole-attention");
    let client = common::Client::start(dir.path(), "t");
    assert_eq!(client.socket, socket);
    host.wait_menu("no certificate yet", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "No certificate imported")
            && m.find(&|n| n.label == "Log in…")
                .is_some_and(|n| !n.enabled)
    });
    host.click("Import certificate");
    assert!(
        wait_until(T, || !lock(&host.desk).notifications.is_empty()),
        "{}",
        tray.log_text()
    );
    let (summary, body) = lock(&host.desk).notifications[0].clone();
    assert_eq!(summary, "Pinhole: no file chooser");
    assert!(body.contains("pinhole import FILE.p12"), "{body}");
    host.click("Quit");
    assert!(wait_until(T, || tray.exited().is_some()));
}

#[test]
#[ignore = "needs root"]
fn the_tray_imports_logs_in_connects_and_tells_when_the_gateway_ends_a_session() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    // The tray starts from nothing: logged out, the bundle to be imported through its menu.
    alice.ok(&["logout"]);
    let bus = Bus::start(dir.path());
    let host = Host::start(&bus.address, true);
    lock(&host.desk).file = Some(dir.path().join("alice.p12"));
    let (pinentry, pinentry_log) = pinentry(dir.path(), &alice.pw);
    let home = dir.path().join("home");
    let mut tray = tray(dir.path(), &bus, &alice.socket, &pinentry);
    assert!(
        wait_until(T, || host.item().is_some()),
        "the tray did not register with the watcher: {}",
        tray.log_text()
    );
    assert_eq!(host.text_property("Title"), "Pinhole");
    assert_eq!(host.text_property("IconName"), "pinhole");
    host.wait_menu("the status line says logged out", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "Logged out (alice)")
    });

    // Import through the file chooser portal and pinentry.
    host.click("Import certificate");
    assert!(
        wait_until(T, || lock(&host.desk)
            .notifications
            .iter()
            .any(|(s, _)| s == "Pinhole: certificate imported")),
        "{:?}\n{}",
        lock(&host.desk).notifications,
        tray.log_text()
    );
    assert_eq!(lock(&host.desk).opened, 1);

    // Log in through pinentry.
    host.click("Log in");
    host.wait_menu("logged in", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "Logged in as alice at 10.9.2.2:443")
    });
    let asked = std::fs::read_to_string(&pinentry_log).unwrap_or_default();
    assert!(asked.contains("GETPIN"), "{asked}");
    assert!(
        asked.contains("SETDESC Log in to your Pinhole gateway as alice."),
        "{asked}"
    );
    assert!(
        !asked.contains("pw-alice"),
        "the password is no command: {asked}"
    );

    // The sites and their devices; click one: the daemon connects it.
    host.wait_menu("plant-a and its devices", |m| {
        m.find(&|n| n.label == "plant-a").is_some_and(|s| {
            s.children
                .iter()
                .any(|d| d.label.starts_with("press-4-plc") && d.checkmark && !d.checked)
        })
    });
    assert!(
        host.layout()
            .find(&|n| n.label.starts_with("plant-b"))
            .is_none(),
        "alice sees only her grants"
    );
    host.click("press-4-plc");
    assert!(
        wait_until(T, || alice.status()["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|v| v["agent"] == "press-4-plc"))),
        "not connected: {}\n{}",
        alice.status(),
        tray.log_text()
    );
    host.wait_menu("the device is checked", |m| {
        m.find(&|n| n.label.starts_with("press-4-plc"))
            .is_some_and(|n| n.checked)
    });
    assert!(
        wait_until(T, || host.text_property("IconName") == "pinhole-connected"),
        "icon {}",
        host.text_property("IconName")
    );
    assert_eq!(sys.lab.tcp_check("tech", "192.168.0.10", 1000, 5.0), "OK");

    // Clicking it again disconnects: no notification, the technician did it.
    host.click("press-4-plc");
    assert!(
        wait_until(T, || alice.status()["sessions"]
            .as_array()
            .is_some_and(Vec::is_empty)),
        "{}",
        alice.status()
    );
    assert!(wait_until(T, || host.text_property("IconName") == "pinhole"));

    // Log out and in again through the menu.
    host.click("Log out");
    host.wait_menu("logged out", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "Logged out (alice)")
    });
    assert_eq!(alice.status()["state"], "logged-out");
    host.click("Log in");
    host.click("press-4-plc");
    assert!(wait_until(T, || alice.status()["sessions"]
        .as_array()
        .is_some_and(|s| s.len() == 1)));
    let before = lock(&host.desk).notifications.len();

    // The administrator closes the account: the session ends, and the tray says why.
    sys.gateway(&["account", "close", "alice"]);
    assert!(
        wait_until(T, || lock(&host.desk).notifications.len() > before),
        "no notification; tray log:\n{}",
        tray.log_text()
    );
    let notes = lock(&host.desk).notifications.clone();
    let (summary, body) = &notes[before];
    assert_eq!(
        summary, "Pinhole: plant-a/press-4-plc disconnected",
        "{notes:?}"
    );
    assert!(body.contains("account was closed"), "{body}");
    assert_eq!(
        notes.len(),
        before + 1,
        "one notification for one ended session: {notes:?}"
    );
    host.wait_menu("the status line tells the failure", |m| {
        m.children
            .first()
            .is_some_and(|n| n.label == "Logged out (alice): login failed")
    });
    assert_eq!(host.text_property("IconName"), "pinhole-attention");

    // The tray kept its log where "Open log" finds it.
    let log = std::fs::read_to_string(home.join("state/pinhole/tray.log")).unwrap_or_default();
    assert!(log.contains("account was closed"), "{log}");
    assert!(!log.contains("pw-alice"), "no password in the log");

    host.click("Quit");
    assert!(
        wait_until(T, || tray.exited().is_some()),
        "the tray did not quit"
    );
    drop(bus);
}

/// A real Secret Service on the test bus: `gnome-keyring-daemon --unlock`, its login keyring
/// created (and unlocked) with a password from stdin, in a home of its own under `dir`.
struct Keyring {
    proc: std::process::Child,
}

impl Keyring {
    fn start(dir: &Path, bus: &Bus, host: &Host) -> Self {
        let home = dir.join("keyring-home");
        let run = home.join("run");
        std::fs::create_dir_all(&run).expect("keyring home");
        common::private(&run);
        let mut proc = Command::new("gnome-keyring-daemon")
            .args(["--unlock", "--foreground", "--components=secrets"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &run)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("gnome-keyring-daemon (apt-get install gnome-keyring)");
        {
            use std::io::Write;
            let mut stdin = proc.stdin.take().expect("stdin");
            stdin
                .write_all(b"keyring-pw")
                .expect("the keyring's password");
        }
        let k = Self { proc };
        assert!(
            wait_until(T, || host.secret_service_default().is_some()),
            "gnome-keyring-daemon did not come up with a default collection"
        );
        k
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

const SECRETS: &str = "org.freedesktop.secrets";
const SECRETS_PATH: &str = "/org/freedesktop/secrets";
const SECRET_SERVICE: &str = "org.freedesktop.Secret.Service";

impl Host {
    /// The Secret Service's default collection, if one answers.
    fn secret_service_default(&self) -> Option<OwnedObjectPath> {
        let m = self
            .rt
            .block_on(self.conn.call_method(
                Some(SECRETS),
                SECRETS_PATH,
                Some(SECRET_SERVICE),
                "ReadAlias",
                &("default",),
            ))
            .ok()?;
        let path: OwnedObjectPath = m.body().deserialize().ok()?;
        (path.as_str() != "/").then_some(path)
    }

    /// The items stored for alice at the test's gateway, and their secrets (read through a
    /// "plain" session, as any client of the Secret Service may).
    fn remembered(&self, gateway: &str, account: &str) -> Vec<String> {
        let attrs: HashMap<&str, &str> = HashMap::from([
            ("xdg:schema", "org.pinhole.Password"),
            ("gateway", gateway),
            ("account", account),
        ]);
        let m = self
            .rt
            .block_on(self.conn.call_method(
                Some(SECRETS),
                SECRETS_PATH,
                Some(SECRET_SERVICE),
                "SearchItems",
                &(attrs,),
            ))
            .expect("SearchItems");
        let (unlocked, locked): (Vec<OwnedObjectPath>, Vec<OwnedObjectPath>) =
            m.body().deserialize().expect("items");
        assert!(
            locked.is_empty(),
            "the login keyring is unlocked: {locked:?}"
        );
        if unlocked.is_empty() {
            return Vec::new();
        }
        let m = self
            .rt
            .block_on(self.conn.call_method(
                Some(SECRETS),
                SECRETS_PATH,
                Some(SECRET_SERVICE),
                "OpenSession",
                &("plain", Value::from("")),
            ))
            .expect("OpenSession");
        let (_, session): (OwnedValue, OwnedObjectPath) = m.body().deserialize().expect("session");
        unlocked
            .iter()
            .filter_map(|item| {
                // An item found by the search may be deleted by the tray before we read it
                // (the tests poll while the tray forgets): then it is gone, not an error.
                let m = match self.rt.block_on(self.conn.call_method(
                    Some(SECRETS),
                    item.as_str(),
                    Some("org.freedesktop.Secret.Item"),
                    "GetSecret",
                    &(&session,),
                )) {
                    Ok(m) => m,
                    Err(e) if format!("{e:?}").contains("Unknown") => return None,
                    Err(e) => panic!("GetSecret: {e:?}"),
                };
                let (_, _, value, _): (OwnedObjectPath, Vec<u8>, Vec<u8>, String) =
                    m.body().deserialize().expect("secret");
                Some(String::from_utf8(value).expect("text"))
            })
            .collect()
    }
}

fn getpins(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "GETPIN")
        .count()
}

fn first_line_is(label: &'static str) -> impl Fn(&Node) -> bool {
    move |m: &Node| m.children.first().is_some_and(|n| n.label == label)
}

fn remember_item(m: &Node) -> Option<&Node> {
    m.find(&|n| n.label == "Remember password")
}

const GATEWAY: &str = "10.9.2.2:443";
const LOGGED_IN: &str = "Logged in as alice at 10.9.2.2:443";
const LOGGED_OUT: &str = "Logged out (alice)";

#[test]
#[ignore = "needs root"]
fn a_remembered_password_logs_in_without_asking_until_the_account_forbids_it() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    // Logged in once (by the CLI): the daemon knows the account, the gateway, and that the
    // gateway allows remembering.
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["logout"]);
    let bus = Bus::start(dir.path());
    let host = Host::start(&bus.address, false);
    let _keyring = Keyring::start(dir.path(), &bus, &host);
    let (pinentry, asked) = pinentry(dir.path(), &alice.pw);
    let mut tray1 = tray(dir.path(), &bus, &alice.socket, &pinentry);
    assert!(
        wait_until(T, || host.item().is_some()),
        "{}",
        tray1.log_text()
    );
    host.wait_menu("logged out", first_line_is(LOGGED_OUT));

    // Off by default; turned on in the menu, and saved.
    host.wait_menu("an unchecked Remember password", |m| {
        remember_item(m).is_some_and(|n| n.checkmark && !n.checked)
    });
    host.click("Remember password");
    host.wait_menu("Remember password checked", |m| {
        remember_item(m).is_some_and(|n| n.checked)
    });
    let settings = dir.path().join("home/config/pinhole/tray.toml");
    let text = std::fs::read_to_string(&settings).unwrap_or_default();
    assert!(text.contains("remember_password = true"), "{text}");

    // The first login asks, and the password is stored under the gateway and account.
    host.click("Log in");
    host.wait_menu("logged in", first_line_is(LOGGED_IN));
    assert_eq!(getpins(&asked), 1);
    assert!(
        wait_until(T, || !host.remembered(GATEWAY, "alice").is_empty()),
        "nothing stored: {}",
        tray1.log_text()
    );
    assert_eq!(host.remembered(GATEWAY, "alice"), ["pw-alice"]);
    assert!(
        host.remembered(GATEWAY, "bob").is_empty(),
        "keyed by account"
    );
    host.click("Log out");
    host.wait_menu("logged out", first_line_is(LOGGED_OUT));

    // A new tray (a new desktop session): it logs in without asking.
    host.click("Quit");
    assert!(
        wait_until(T, || tray1.exited().is_some()),
        "the tray did not quit"
    );
    lock(&host.desk).items.clear();
    let mut tray2 = tray(dir.path(), &bus, &alice.socket, &pinentry);
    assert!(
        wait_until(T, || host.item().is_some()),
        "{}",
        tray2.log_text()
    );
    host.click("Log in");
    host.wait_menu(
        "logged in with the remembered password",
        first_line_is(LOGGED_IN),
    );
    assert_eq!(getpins(&asked), 1, "pinentry was not asked again");
    assert_eq!(alice.status()["state"], "logged-in");

    // The administrator forbids it: the next login still uses it (the client learns the
    // policy from the login's welcome), and then the tray deletes it and hides the item.
    sys.gateway(&["account", "set", "alice", "--remembered-password", "forbid"]);
    let accounts = sys.gateway(&["accounts"]);
    assert!(
        accounts
            .lines()
            .any(|l| l.starts_with("alice") && l.contains("forbidden")),
        "{accounts}"
    );
    host.click("Log out");
    host.wait_menu("logged out", first_line_is(LOGGED_OUT));
    host.click("Log in");
    host.wait_menu("logged in", first_line_is(LOGGED_IN));
    assert!(
        wait_until(T, || host.remembered(GATEWAY, "alice").is_empty()),
        "the remembered password was not deleted: {}",
        tray2.log_text()
    );
    host.wait_menu("no Remember password where the account forbids it", |m| {
        remember_item(m).is_none()
    });
    // And from now on the password is asked, and not stored again.
    host.click("Log out");
    host.wait_menu("logged out", first_line_is(LOGGED_OUT));
    host.click("Log in");
    host.wait_menu("logged in", first_line_is(LOGGED_IN));
    assert_eq!(getpins(&asked), 2, "pinentry was asked");
    std::thread::sleep(Duration::from_secs(1));
    assert!(host.remembered(GATEWAY, "alice").is_empty());

    // The password is in no log.
    let log =
        std::fs::read_to_string(dir.path().join("home/state/pinhole/tray.log")).unwrap_or_default();
    assert!(log.contains("is remembered in the Secret Service"), "{log}");
    assert!(log.contains("is deleted: the gateway forbids it"), "{log}");
    for text in [log, tray1.log_text(), tray2.log_text()] {
        assert!(!text.contains("pw-alice"), "a password in a log: {text}");
    }
    host.click("Quit");
    assert!(wait_until(T, || tray2.exited().is_some()));
}

#[test]
#[ignore = "needs root"]
fn without_a_secret_service_the_tray_asks_each_time() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["logout"]);
    let bus = Bus::start(dir.path());
    let host = Host::start(&bus.address, false);
    let settings = dir.path().join("home/config/pinhole/tray.toml");
    std::fs::create_dir_all(settings.parent().expect("dir")).expect("config dir");
    std::fs::write(&settings, "remember_password = true\n").expect("settings");
    let (pinentry, asked) = pinentry(dir.path(), &alice.pw);
    let mut tray = tray(dir.path(), &bus, &alice.socket, &pinentry);
    assert!(
        wait_until(T, || host.item().is_some()),
        "{}",
        tray.log_text()
    );
    for n in 1..=2 {
        host.click("Log in");
        host.wait_menu("logged in", first_line_is(LOGGED_IN));
        assert_eq!(getpins(&asked), n, "asked each time");
        host.wait_menu("the setting is shown as it is", |m| {
            remember_item(m).is_some_and(|n| n.checked)
        });
        host.click("Log out");
        host.wait_menu("logged out", first_line_is(LOGGED_OUT));
    }
    assert!(
        tray.exited().is_none(),
        "the tray runs on: {}",
        tray.log_text()
    );
    let log =
        std::fs::read_to_string(dir.path().join("home/state/pinhole/tray.log")).unwrap_or_default();
    assert!(log.contains("it will be asked each time"), "{log}");
    host.click("Quit");
    assert!(wait_until(T, || tray.exited().is_some()));
}

/// The xfce4-panel of the screenshot: one panel at the bottom, a spacer and the status tray
/// (xfce4-panel 4.18's systray plugin hosts StatusNotifierItems and is the watcher).
const PANEL_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfce4-panel" version="1.0">
  <property name="configver" type="int" value="2"/>
  <property name="panels" type="array">
    <value type="int" value="1"/>
    <property name="panel-1" type="empty">
      <property name="position" type="string" value="p=8;x=0;y=0"/>
      <property name="length" type="uint" value="100"/>
      <property name="position-locked" type="bool" value="true"/>
      <property name="size" type="uint" value="32"/>
      <property name="plugin-ids" type="array">
        <value type="int" value="1"/>
        <value type="int" value="2"/>
      </property>
    </property>
  </property>
  <property name="plugins" type="empty">
    <property name="plugin-1" type="string" value="separator">
      <property name="expand" type="bool" value="true"/>
      <property name="style" type="uint" value="0"/>
    </property>
    <property name="plugin-2" type="string" value="systray">
      <property name="square-icons" type="bool" value="true"/>
    </property>
  </property>
</channel>
"#;

fn x(display: &str, program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .env("DISPLAY", display)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        common::text(&out)
    );
    out
}

/// Makes the README's screenshot (docs/screenshot-tray runs it): the tray on a real
/// StatusNotifier host (xfce4-panel under Xvfb), its menu opened with xdotool on the sites →
/// devices submenu, captured with ImageMagick's `import` into `$PINHOLE_TRAY_SCREENSHOT`.
/// Without that variable it does nothing. Root only (the system behind the menu is real).
#[test]
#[ignore = "needs root; makes docs/tray.png when PINHOLE_TRAY_SCREENSHOT is set"]
fn screenshot_of_the_tray_menu() {
    let Some(out) = std::env::var_os("PINHOLE_TRAY_SCREENSHOT") else {
        eprintln!("PINHOLE_TRAY_SCREENSHOT is not set: no screenshot");
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["connect", "plant-a/press-4-plc"]);

    let n = (90..200)
        .find(|n| !Path::new(&format!("/tmp/.X{n}-lock")).exists())
        .expect("a free display");
    let display = format!(":{n}");
    let _xvfb = Proc::spawn(
        Command::new("Xvfb").args([
            &display,
            "-screen",
            "0",
            "760x400x24",
            "-nolisten",
            "tcp",
            "-noreset",
        ]),
        dir.path().join("xvfb.log"),
    );
    assert!(wait_until(T, || Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()));
    // A desktop's colour behind the menu (ImageMagick's `display` sets it, then exits 1).
    let _ = Command::new("display")
        .args(["-window", "root", "-size", "760x400", "xc:#4a6785"])
        .env("DISPLAY", &display)
        .status()
        .expect("display (apt-get install imagemagick)");

    let bus = Bus::start(dir.path());
    let home = dir.path().join("home");
    let xml = home.join("config/xfce4/xfconf/xfce-perchannel-xml");
    std::fs::create_dir_all(&xml).expect("xfconf dir");
    std::fs::write(xml.join("xfce4-panel.xml"), PANEL_XML).expect("panel config");
    // The tray's icons, where a package installs them (hicolor), for the panel to find.
    let icons = home.join("data/icons/hicolor/scalable/apps");
    std::fs::create_dir_all(&icons).expect("icons dir");
    for name in ["pinhole", "pinhole-connected", "pinhole-attention"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("packaging/desktop/{name}.svg")),
            icons.join(format!("{name}.svg")),
        )
        .expect("icon");
    }
    let desktop = |cmd: &mut Command| {
        cmd.env("DISPLAY", &display)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("NO_AT_BRIDGE", "1");
    };
    let mut cmd = Command::new("/usr/lib/x86_64-linux-gnu/xfce4/xfconf/xfconfd");
    desktop(&mut cmd);
    let _xfconfd = Proc::spawn(&mut cmd, dir.path().join("xfconfd.log"));
    let mut cmd = Command::new("xfce4-panel");
    cmd.arg("--disable-wm-check");
    desktop(&mut cmd);
    let panel = Proc::spawn(&mut cmd, dir.path().join("panel.log"));
    let (pinentry, _) = pinentry(dir.path(), &alice.pw);
    let tray = tray(dir.path(), &bus, &alice.socket, &pinentry);

    // The panel window: its right end holds the tray's icon.
    let mut geometry = None;
    assert!(
        wait_until(T, || {
            let o = Command::new("xdotool")
                .args([
                    "search",
                    "--onlyvisible",
                    "--class",
                    "xfce4-panel",
                    "getwindowgeometry",
                    "%@",
                ])
                .env("DISPLAY", &display)
                .output()
                .expect("xdotool");
            let t = String::from_utf8_lossy(&o.stdout).into_owned();
            geometry = t
                .split("Window ")
                .filter_map(|w| {
                    let pos = w.split("Position: ").nth(1)?.split(' ').next()?;
                    let size = w.split("Geometry: ").nth(1)?.split_whitespace().next()?;
                    let (x, y) = pos.split_once(',')?;
                    let (wd, ht) = size.split_once('x')?;
                    Some((
                        x.parse::<i32>().ok()?,
                        y.parse::<i32>().ok()?,
                        wd.parse::<i32>().ok()?,
                        ht.parse::<i32>().ok()?,
                    ))
                })
                .find(|g| g.2 > 100);
            geometry.is_some()
        }),
        "no panel: {}",
        panel.log_text()
    );
    let (px, py, pw, ph) = geometry.expect("geometry");
    // The icon shows a connected device once the tray has registered and read the daemon.
    std::thread::sleep(Duration::from_secs(6));
    let (ix, iy) = (px + pw - ph / 2, py + ph / 2);
    x(
        &display,
        "xdotool",
        &["mousemove", &ix.to_string(), &iy.to_string(), "click", "3"],
    );
    std::thread::sleep(Duration::from_secs(2));
    // The first item one can select is the first site; Right opens its devices.
    x(&display, "xdotool", &["key", "Down"]);
    std::thread::sleep(Duration::from_millis(500));
    x(&display, "xdotool", &["key", "Right"]);
    std::thread::sleep(Duration::from_secs(1));
    let shot = dir.path().join("tray.png");
    x(
        &display,
        "import",
        &["-window", "root", shot.to_str().expect("utf-8")],
    );
    std::fs::copy(&shot, &out).expect("the screenshot");
    eprintln!(
        "wrote {}; tray log:\n{}",
        Path::new(&out).display(),
        tray.log_text()
    );
}
