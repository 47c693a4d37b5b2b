//! A lab of network namespaces: technicians, a WAN router, the gateway, sites and a plant
//! network with real services. Created per test with a unique prefix, deleted on drop (every
//! process inside is killed first), so tests can run side by side and leave nothing behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{Proc, bin, text, wait_until};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The plant services: TCP 102 answers with the byte count and SHA-256 of what it received;
/// TCP 22 answers a banner (no agent allows it); TCP 502 echoes each read (a Modbus stand-in);
/// UDP 161 echoes with a 4-byte prefix, whatever the size. UDP 2222 has no listener.
pub const SERVICES: &str = r#"
import hashlib, socket, socketserver, threading
class Sha(socketserver.StreamRequestHandler):
    def handle(self):
        h = hashlib.sha256(); n = 0
        while True:
            b = self.request.recv(65536)
            if not b: break
            h.update(b); n += len(b)
        self.request.sendall(f"PLC {n} {h.hexdigest()}\n".encode())
class Banner(socketserver.StreamRequestHandler):
    def handle(self): self.request.sendall(b"SSH-2.0-forbidden\n")
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            b = self.request.recv(65536)
            if not b: break
            self.request.sendall(b)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
for port, h in [(102, Sha), (22, Banner), (502, Echo)]:
    s = socketserver.ThreadingTCPServer(("0.0.0.0", port), h)
    threading.Thread(target=s.serve_forever, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 161))
print("ready", flush=True)
while True:
    d, a = u.recvfrom(65535); u.sendto(b"UDP " + d, a)
"#;

/// Probes run inside a technician's namespace. `udp` sends `size` bytes on a connected socket
/// and prints `OK <reply length>`, `REFUSED`, `UNREACHABLE` or `TIMEOUT`; `tcp` connects and
/// prints `OPEN`, `REFUSED`, `UNREACHABLE` or `TIMEOUT`. Both append the elapsed milliseconds.
pub const PROBE: &str = r#"
import errno, socket, sys, time
kind, host, port, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
t = time.monotonic()
def done(what): print(f"{what} {round((time.monotonic() - t) * 1000)}"); sys.exit(0)
try:
    if kind == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(timeout)
        u.connect((host, port)); u.send(b"x" * size)
        done(f"OK {len(u.recv(65535))}")
    s = socket.create_connection((host, port), timeout=timeout); done("OPEN")
except ConnectionRefusedError: done("REFUSED")
except socket.timeout: done("TIMEOUT")
except OSError as e:
    done("UNREACHABLE" if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else f"ERROR {e.errno}")
"#;

/// A client program run inside a namespace: sends `size` random bytes to host:102 and checks
/// the device's answer (byte count and SHA-256). Prints OK or the failure. The bytes are a
/// random 1 MiB block repeated, so that sending starts at once whatever the size.
pub const TCP_CHECK: &str = r#"
import hashlib, os, socket, sys
host, size, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
block = os.urandom(1 << 20)
try:
    s = socket.create_connection((host, 102), timeout=timeout)
    digest, left = hashlib.sha256(), size
    while left:
        chunk = block[:min(left, len(block))]
        s.sendall(chunk); digest.update(chunk); left -= len(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(200).decode()
    want = f"PLC {size} {digest.hexdigest()}"
    print("OK" if reply.strip() == want else f"MISMATCH {reply!r}")
except Exception as e:
    print(f"FAIL {type(e).__name__} {e}")
"#;

pub struct Lab {
    pub p: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    pub procs: Vec<Proc>,
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .expect("command")
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
}

impl Lab {
    /// Namespaces `{p}wan`, `{p}gw`, `{p}tech`, `{p}tech2`, `{p}site`, `{p}siteb`, `{p}plant`.
    /// Addresses: technicians 10.9.1.2 and 10.9.4.2, gateway 10.9.2.2, site uplinks 10.9.3.2
    /// and 10.9.5.2; plant-a's network 192.168.0.0/24 (site .1, PLC .10, a host without agent
    /// .11), plant-b's 192.168.1.0/24 (site .1, device .20).
    pub fn new(dir: &Path) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = format!("ph{}{n}", std::process::id() % 1000);
        let mut lab = Self {
            p: p.clone(),
            dir: dir.to_owned(),
            namespaces: Vec::new(),
            procs: Vec::new(),
        };
        for ns in ["wan", "gw", "tech", "tech2", "site", "siteb", "plant"] {
            let name = format!("{p}{ns}");
            must(&["ip", "netns", "add", &name]);
            lab.namespaces.push(name.clone());
            must(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        }
        let pair = |a: &str, ia: &str, aa: &str, b: &str, ib: &str, ab: &str| {
            let (na, nb) = (format!("{p}{a}"), format!("{p}{b}"));
            let (ia, ib) = (format!("{p}{ia}"), format!("{p}{ib}"));
            must(&[
                "ip", "link", "add", &ia, "netns", &na, "type", "veth", "peer", "name", &ib,
                "netns", &nb,
            ]);
            must(&["ip", "-n", &na, "addr", "add", aa, "dev", &ia]);
            must(&["ip", "-n", &na, "link", "set", &ia, "up"]);
            must(&["ip", "-n", &nb, "addr", "add", ab, "dev", &ib]);
            must(&["ip", "-n", &nb, "link", "set", &ib, "up"]);
        };
        pair("tech", "t0", "10.9.1.2/24", "wan", "w1", "10.9.1.1/24");
        pair("gw", "g0", "10.9.2.2/24", "wan", "w2", "10.9.2.1/24");
        pair("site", "s0", "10.9.3.2/24", "wan", "w3", "10.9.3.1/24");
        pair("tech2", "u0", "10.9.4.2/24", "wan", "w4", "10.9.4.1/24");
        pair("siteb", "b0", "10.9.5.2/24", "wan", "w5", "10.9.5.1/24");
        pair(
            "plant",
            "p0",
            "192.168.0.10/24",
            "site",
            "s1",
            "192.168.0.1/24",
        );
        pair(
            "plant",
            "p1",
            "192.168.1.20/24",
            "siteb",
            "b1",
            "192.168.1.1/24",
        );
        must(&[
            "ip",
            "-n",
            &format!("{p}plant"),
            "addr",
            "add",
            "192.168.0.11/24",
            "dev",
            &format!("{p}p0"),
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            &format!("{p}wan"),
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        for (ns, via) in [
            ("tech", "10.9.1.1"),
            ("gw", "10.9.2.1"),
            ("site", "10.9.3.1"),
            ("tech2", "10.9.4.1"),
            ("siteb", "10.9.5.1"),
        ] {
            must(&[
                "ip",
                "-n",
                &format!("{p}{ns}"),
                "route",
                "add",
                "default",
                "via",
                via,
            ]);
        }
        // The plant host answers both its networks through their sites.
        must(&[
            "ip",
            "-n",
            &format!("{p}plant"),
            "route",
            "add",
            "default",
            "via",
            "192.168.0.1",
        ]);
        lab
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.p)
    }

    pub fn ifname(&self, name: &str) -> String {
        format!("{}{name}", self.p)
    }

    /// Runs a command inside a namespace to completion.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec"];
        let ns = self.ns(ns);
        full.push(&ns);
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Starts a long-running program inside a namespace.
    pub fn spawn(
        &mut self,
        ns: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &str,
    ) -> usize {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)])
            .arg(program)
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("RUST_LOG", "info");
        self.procs.push(Proc::spawn(&mut cmd, self.dir.join(log)));
        self.procs.len() - 1
    }

    pub fn start_services(&mut self) {
        let script = self.dir.join("services.py");
        std::fs::write(&script, SERVICES).expect("services.py");
        self.spawn(
            "plant",
            Path::new("/usr/bin/python3"),
            &[script.to_str().expect("utf8")],
            &[],
            "services.log",
        );
        let log = self.dir.join("services.log");
        assert!(wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.contains("ready"))
        }));
    }

    /// Sends `size` bytes from a technician namespace to host:102 and checks the digest.
    pub fn tcp_check(&self, ns: &str, host: &str, size: usize, timeout: f64) -> String {
        let script = self.dir.join("tcp_check.py");
        if !script.exists() {
            std::fs::write(&script, TCP_CHECK).expect("tcp_check.py");
        }
        let out = self.exec(
            ns,
            &[
                "/usr/bin/python3",
                script.to_str().expect("utf8"),
                host,
                &size.to_string(),
                &timeout.to_string(),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Starts a 2 GB transfer to host:102 in the background (far longer than any test), with a
    /// 5 s socket timeout so that it fails soon once its path is cut. Its stdout says how it
    /// ended.
    pub fn start_transfer(&self, ns: &str, host: &str) -> std::process::Child {
        let script = self.dir.join("tcp_check.py");
        if !script.exists() {
            std::fs::write(&script, TCP_CHECK).expect("tcp_check.py");
        }
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "/usr/bin/python3"])
            .arg(&script)
            .args([host, "2000000000", "5"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("transfer")
    }

    /// A UDP round trip to host:port.
    pub fn udp_echo(&self, ns: &str, host: &str, port: u16) -> String {
        let code = format!(
            "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.settimeout(2)\ntry:\n    u.sendto(b'ping',('{host}',{port}))\n    print(u.recvfrom(100)[0].decode())\nexcept Exception as e:\n    print('FAIL', e)\n"
        );
        let out = self.exec(ns, &["/usr/bin/python3", "-c", &code]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs [`PROBE`]: returns its outcome word(s) and the elapsed milliseconds.
    pub fn probe(&self, ns: &str, kind: &str, host: &str, port: u16, size: usize) -> (String, u64) {
        let script = self.dir.join("probe.py");
        if !script.exists() {
            std::fs::write(&script, PROBE).expect("probe.py");
        }
        let out = self.exec(
            ns,
            &[
                "/usr/bin/python3",
                script.to_str().expect("utf8"),
                kind,
                host,
                &port.to_string(),
                &size.to_string(),
                "5",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (what, ms) = text.rsplit_once(' ').unwrap_or((&text, ""));
        (what.to_owned(), ms.parse().unwrap_or(u64::MAX))
    }

    /// Gives namespace `ns` a LAN of its own: a veth to a new namespace `{ns}lan`, `ns` at
    /// `addr` and the LAN host at `host`, both in `prefix`.
    pub fn add_lan(&mut self, ns: &str, addr: &str, host: &str, prefix: u8) {
        let lan = format!("{ns}lan");
        let name = self.ns(&lan);
        must(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        must(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let (a, b) = (self.ifname("l0"), self.ifname("l1"));
        let ns_name = self.ns(ns);
        must(&[
            "ip", "link", "add", &a, "netns", &ns_name, "type", "veth", "peer", "name", &b,
            "netns", &name,
        ]);
        must(&[
            "ip",
            "-n",
            &ns_name,
            "addr",
            "add",
            &format!("{addr}/{prefix}"),
            "dev",
            &a,
        ]);
        must(&["ip", "-n", &ns_name, "link", "set", &a, "up"]);
        must(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{host}/{prefix}"),
            "dev",
            &b,
        ]);
        must(&["ip", "-n", &name, "link", "set", &b, "up"]);
    }

    /// Whether a TCP connection to host:port opens within 2 s.
    pub fn tcp_open(&self, ns: &str, host: &str, port: u16) -> bool {
        let code = format!(
            "import socket\ntry:\n    socket.create_connection(('{host}',{port}),timeout=2)\n    print('open')\nexcept Exception as e:\n    print('closed')\n"
        );
        let out = self.exec(ns, &["/usr/bin/python3", "-c", &code]);
        String::from_utf8_lossy(&out.stdout).trim() == "open"
    }

    /// Loads an nftables ruleset (`nft -f`) inside a namespace.
    pub fn nft(&self, ns: &str, ruleset: &str) {
        let file = self.dir.join(format!("{ns}-{}.nft", self.p));
        std::fs::write(&file, ruleset).expect("ruleset");
        let out = self.exec(ns, &["nft", "-f", file.to_str().expect("utf8")]);
        assert!(out.status.success(), "nft -f {ruleset}: {}", text(&out));
    }

    /// Sets a sysctl inside a namespace.
    pub fn sysctl(&self, ns: &str, key_value: &str) {
        let out = self.exec(ns, &["sysctl", "-qw", key_value]);
        assert!(out.status.success(), "sysctl {key_value}: {}", text(&out));
    }

    pub fn ping(&self, ns: &str, host: &str) -> bool {
        self.exec(ns, &["ping", "-c", "1", "-W", "1", host])
            .status
            .success()
    }

    /// Registers a namespace the test made itself, so that it goes with the lab.
    pub fn adopt(&mut self, ns: &str) {
        self.namespaces.push(self.ns(ns));
    }

    pub fn routes(&self, ns: &str) -> String {
        String::from_utf8_lossy(
            &self
                .exec(ns, &["ip", "-4", "route", "show", "proto", "231"])
                .stdout,
        )
        .into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.terminate();
        }
        // PINHOLE_TEST_LOGS=DIR keeps every process log of the lab for diagnosis.
        if let Some(keep) = std::env::var_os("PINHOLE_TEST_LOGS") {
            let to = std::path::Path::new(&keep).join(&self.p);
            let _ = std::fs::create_dir_all(&to);
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let _ = std::fs::copy(e.path(), to.join(e.file_name()));
                }
            }
        }
        for ns in &self.namespaces {
            // Anything still running inside (children of children) goes too.
            let pids = sh(&["ip", "netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// The whole system in a lab: a gateway, two sites, and a client daemon per technician.
pub struct System {
    pub lab: Lab,
    pub gw_state: PathBuf,
    pub light: PathBuf,
    pub gw: usize,
    /// The gateway's ports on 10.9.2.2, in the order sites and technicians try them.
    pub ports: Vec<u16>,
    /// From starting the sites until the gateway listed both online.
    pub sites_online_after: Duration,
    /// When the gateway listed both sites online (their links' last packets, if they idle).
    pub sites_online_at: std::time::Instant,
}

/// How [`System::start_with`] sets the system up.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sites' `heartbeat`; `None` keeps the default (10 minutes).
    pub site_heartbeat: Option<&'static str>,
    /// The gateway's ports, as its public addresses (in order) and where it listens.
    pub gateway_ports: Vec<u16>,
    /// More of both sites' `site.toml` (a `[proxy]` table, say).
    pub site_config: String,
}

impl Default for Options {
    /// Two-second heartbeats (a lost link is noticed within seconds) and port 443 only.
    fn default() -> Self {
        Self {
            site_heartbeat: Some("2s"),
            gateway_ports: vec![443],
            site_config: String::new(),
        }
    }
}

impl System {
    pub fn gateway(&self, args: &[&str]) -> String {
        let out = Command::new(bin("pinhole-gateway"))
            .arg("--state")
            .arg(&self.gw_state)
            .args(args)
            .output()
            .expect("gateway");
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &Options::default(), |_| {})
    }

    /// The gateway's `serve` arguments for `ports` on 10.9.2.2.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "--state".to_owned(),
            self.gw_state.to_str().expect("utf8").to_owned(),
            "serve".to_owned(),
        ];
        for port in &self.ports {
            args.push("--listen".into());
            args.push(format!("10.9.2.2:{port}"));
        }
        args
    }

    /// Like [`System::start`], with `options`; `prepare` runs on the lab before any program
    /// starts (a firewall on the path, say).
    pub fn start_with(dir: &Path, options: &Options, prepare: impl FnOnce(&Lab)) -> Self {
        let mut lab = Lab::new(dir);
        prepare(&lab);
        lab.start_services();
        let gw_state = dir.join("gw");
        let g = |args: &[&str]| {
            let out = Command::new(bin("pinhole-gateway"))
                .arg("--state")
                .arg(&gw_state)
                .args(args)
                .output()
                .expect("gateway");
            assert!(out.status.success(), "{args:?}: {}", text(&out));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let addresses: Vec<String> = options
            .gateway_ports
            .iter()
            .map(|p| format!("10.9.2.2:{p}"))
            .collect();
        let mut init = vec!["init"];
        for a in &addresses {
            init.extend(["--public-address", a]);
        }
        g(&init);
        g(&["domain", "create", "acme.plant-a"]);
        g(&["domain", "create", "beta"]);
        let token_a = g(&["site-token", "create", "acme.plant-a"]);
        let token_b = g(&["site-token", "create", "beta"]);
        let mut serve = vec!["--state", gw_state.to_str().expect("utf8"), "serve"];
        for a in &addresses {
            serve.extend(["--listen", a]);
        }
        let gw = lab.spawn("gw", &bin("pinhole-gateway"), &serve, &[], "gateway.log");
        let gateways = addresses
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let heartbeat = options
            .site_heartbeat
            .map(|h| format!("heartbeat = \"{h}\"\n"))
            .unwrap_or_default();
        let sites_started = std::time::Instant::now();
        let light = dir.join("light");
        for (name, token, dev, agents, ns) in [
            (
                "plant-a",
                token_a,
                lab.ifname("s1"),
                format!(
                    "[light]\npath = \"{}\"\n[[agent]]\nname = \"press-4-plc\"\ntype = \"siemens-s7\"\naddress = \"192.168.0.10\"\nports = [\"udp/161\"]\n[[agent]]\nname = \"press-4-modbus\"\ntype = \"modbus\"\naddress = \"192.168.0.10\"\nports = [\"udp/2222\"]\n",
                    light.display()
                ),
                "site",
            ),
            (
                "plant-b",
                token_b,
                lab.ifname("b1"),
                "[[agent]]\nname = \"drive\"\ntype = \"siemens-s7\"\naddress = \"192.168.1.20\"\n"
                    .to_owned(),
                "siteb",
            ),
        ] {
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!("name = \"{name}\"\ngateway = [{gateways}]\ntoken = \"{token}\"\ndevice_interface = \"{dev}\"\n{heartbeat}{}\n{agents}", options.site_config),
            )
            .expect("site.toml");
            super::private(&config);
            let state = dir.join(format!("{name}-state"));
            lab.spawn(
                ns,
                &bin("pinhole-site"),
                &[
                    "run",
                    "--config",
                    config.to_str().expect("utf8"),
                    "--state",
                    state.to_str().expect("utf8"),
                ],
                &[],
                &format!("{name}.log"),
            );
        }
        let mut sys = Self {
            lab,
            gw_state,
            light,
            gw,
            ports: options.gateway_ports.clone(),
            sites_online_after: Duration::ZERO,
            sites_online_at: sites_started,
        };
        assert!(
            wait_until(Duration::from_secs(20), || {
                let sites = sys.gateway(&["sites", "--json"]);
                sites.matches("\"online\": true").count() == 2
            }),
            "sites did not come online: {}",
            std::fs::read_to_string(dir.join("plant-a.log")).unwrap_or_default()
        );
        sys.sites_online_at = std::time::Instant::now();
        sys.sites_online_after = sys.sites_online_at - sites_started;
        sys
    }

    /// Starts a client daemon in `ns` for a new account granted `domain`; logs it in.
    pub fn technician(&mut self, ns: &str, account: &str, domain: &str) -> Technician {
        let t = self.enlist(ns, account, domain, &[]);
        t.ok(&["login", "--password-file", t.pw.to_str().expect("utf8")]);
        t
    }

    /// Starts a client daemon in `ns`, with `args`, for a new account granted `domain`, and
    /// imports its bundle; does not log in.
    pub fn enlist(&mut self, ns: &str, account: &str, domain: &str, args: &[&str]) -> Technician {
        let pw = self.lab.dir.join(format!("{account}.pw"));
        std::fs::write(&pw, format!("pw-{account}\n")).expect("pw");
        let p12 = self.lab.dir.join(format!("{account}.p12"));
        self.gateway(&[
            "account",
            "create",
            account,
            "--out",
            p12.to_str().expect("utf8"),
            "--password-file",
            pw.to_str().expect("utf8"),
        ]);
        self.gateway(&["grant", account, domain]);
        self.start_technician(ns, account, &p12, &pw, args)
    }

    /// Starts a client daemon in `ns`, with `args`, and imports the bundle `p12` (its password
    /// in the file `pw`, which also protects the daemon's key store); does not log in.
    pub fn start_technician(
        &mut self,
        ns: &str,
        account: &str,
        p12: &Path,
        pw: &Path,
        args: &[&str],
    ) -> Technician {
        let socket = self.lab.dir.join(format!("{account}.sock"));
        let state = self.lab.dir.join(format!("{account}-client"));
        let mut daemon_args = vec!["--state", state.to_str().expect("utf8")];
        daemon_args.extend_from_slice(args);
        let idx = self.lab.spawn(
            ns,
            &bin("pinholed"),
            &daemon_args,
            &[("PINHOLE_SOCKET", socket.to_str().expect("utf8"))],
            &format!("pinholed-{account}.log"),
        );
        let s = socket.clone();
        assert!(wait_until(Duration::from_secs(10), || s.exists()));
        let t = Technician {
            socket,
            state,
            pw: pw.to_owned(),
            proc: idx,
            ns: ns.to_owned(),
        };
        t.ok(&[
            "import",
            p12.to_str().expect("utf8"),
            "--password-file",
            t.pw.to_str().expect("utf8"),
        ]);
        t
    }

    pub fn light(&self) -> String {
        std::fs::read_to_string(&self.light)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.lab.dir.join(name)).unwrap_or_default()
    }
}

pub struct Technician {
    pub socket: PathBuf,
    pub state: PathBuf,
    pub pw: PathBuf,
    pub proc: usize,
    pub ns: String,
}

impl Technician {
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("pinhole"))
            .args(args)
            .env("PINHOLE_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("pinhole")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "pinhole {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("json")
    }
}
