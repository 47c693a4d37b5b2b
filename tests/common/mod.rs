//! Fixtures for end-to-end tests: the real binaries as child processes, each test in its own
//! temporary directory with its own ports. Every process is killed when its handle drops, so a
//! failing test leaves nothing running.
#![allow(dead_code)]

pub mod netns;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where cargo put the workspace's binaries (this test runs from `target/<profile>/deps`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `tests/run`, which builds every binary first",
        path.display()
    );
    path
}

/// A free TCP port on loopback (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process, killed on drop; its stderr goes to a log file for diagnosis.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to 5 s.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes a file readable by its owner only (a site.toml with a token must be).
pub fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Runs a command to completion.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A gateway state directory with its CLI.
pub struct Gateway {
    pub state: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
    dir: PathBuf,
}

impl Gateway {
    /// `init` on a fresh state directory for 127.0.0.1:port.
    pub fn init(dir: &Path, name: &str, port: u16) -> Self {
        let state = dir.join(name);
        let out = run(Command::new(bin("pinhole-gateway"))
            .arg("--state")
            .arg(&state)
            .args(["init", "--public-address", &format!("127.0.0.1:{port}")]));
        assert!(out.status.success(), "init: {}", text(&out));
        Self {
            state,
            port,
            proc: None,
            dir: dir.to_owned(),
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(bin("pinhole-gateway"))
            .arg("--state")
            .arg(&self.state)
            .args(args))
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start(&mut self) {
        let log = self.dir.join(format!("gateway-{}.log", self.port));
        let proc = Proc::spawn(
            Command::new(bin("pinhole-gateway"))
                .arg("--state")
                .arg(&self.state)
                .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
                // Tests run side by side: each portal on a port of its own.
                .args(["--admin-listen", "127.0.0.1:0"])
                .env("RUST_LOG", "info"),
            log,
        );
        self.proc = Some(proc);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "gateway did not start"
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    pub fn token(&self, domain: &str) -> String {
        self.ok(&["site-token", "create", domain]).trim().to_owned()
    }

    /// Creates an account with a password file; returns (bundle path, password file).
    pub fn account(&self, name: &str) -> (PathBuf, PathBuf) {
        let pw = self.dir.join(format!("{name}.pw"));
        std::fs::write(&pw, format!("pw-of-{name}\n")).expect("pw");
        let p12 = self.dir.join(format!("{name}.p12"));
        self.ok(&[
            "account",
            "create",
            name,
            "--out",
            p12.to_str().expect("utf8"),
            "--password-file",
            pw.to_str().expect("utf8"),
        ]);
        (p12, pw)
    }

    pub fn sites_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["sites", "--json"])).expect("json")
    }

    pub fn site_online(&self, name: &str) -> bool {
        self.sites_json()
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["name"] == name && s["online"] == true)
    }

    pub fn audit_events(&self) -> Vec<String> {
        self.ok(&["audit", "export", "--format", "jsonl"])
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("jsonl");
                format!(
                    "{} | {} | {}",
                    v["event"].as_str().unwrap_or(""),
                    v["actor"].as_str().unwrap_or(""),
                    v["description"].as_str().unwrap_or("")
                )
            })
            .collect()
    }
}

/// A site agent with its config and state.
pub struct Site {
    pub config: PathBuf,
    pub state: PathBuf,
    pub proc: Option<Proc>,
    dir: PathBuf,
    name: String,
}

impl Site {
    pub fn new(dir: &Path, name: &str, port: u16, token: &str, agents: &str) -> Self {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\ngateway = [\"127.0.0.1:{port}\"]\ntoken = \"{token}\"\nheartbeat = \"2s\"\n{agents}"
            ),
        )
        .expect("site.toml");
        private(&config);
        Self {
            config,
            state: dir.join(format!("{name}-state")),
            proc: None,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn start(&mut self) {
        let log = self.dir.join(format!("site-{}.log", self.name));
        self.proc = Some(Proc::spawn(
            Command::new(bin("pinhole-site"))
                .args(["run", "--config"])
                .arg(&self.config)
                .arg("--state")
                .arg(&self.state)
                .env("RUST_LOG", "info"),
            log,
        ));
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

/// A client daemon with its own socket, and the CLI bound to it.
pub struct Client {
    pub socket: PathBuf,
    pub proc: Proc,
}

impl Client {
    pub fn start(dir: &Path, name: &str) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let proc = Proc::spawn(
            Command::new(bin("pinholed"))
                .arg("--state")
                .arg(dir.join(format!("{name}-client")))
                .env("PINHOLE_SOCKET", &socket)
                // Several daemons share this namespace: each gets its own adapter name.
                .env(
                    "PINHOLE_TUN",
                    format!("pht-{}", &name[..name.len().min(10)]),
                )
                .env("RUST_LOG", "info"),
            dir.join(format!("pinholed-{name}.log")),
        );
        let s = socket.clone();
        assert!(
            wait_until(Duration::from_secs(10), || s.exists()),
            "pinholed did not start"
        );
        Self { socket, proc }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        run(Command::new(bin("pinhole"))
            .args(args)
            .env("PINHOLE_SOCKET", &self.socket))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "pinhole {args:?}: {}\n--- daemon log ---\n{}",
            text(&out),
            self.proc.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn import_and_login(&self, p12: &Path, pw: &Path) {
        self.ok(&[
            "import",
            p12.to_str().expect("utf8"),
            "--password-file",
            pw.to_str().expect("utf8"),
        ]);
        self.ok(&["login", "--password-file", pw.to_str().expect("utf8")]);
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("json")
    }

    pub fn ls(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ls", "--json"])).expect("json")
    }
}

pub const PLC_AGENT: &str =
    "[[agent]]\nname = \"press-4-plc\"\ntype = \"siemens-s7\"\naddress = \"192.168.0.10\"\n";
