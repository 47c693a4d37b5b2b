//! The administration CLI through the real binary, on a real state directory in a tempdir. No
//! server runs: every command here works on the state directory alone.

use std::path::PathBuf;
use std::process::{Command, Output};

use pinhole_gateway::audit::Actor;
use pinhole_gateway::store::Store;
use pinhole_gateway::syslog::Syslog;

struct Gw {
    dir: tempfile::TempDir,
}

impl Gw {
    /// `pinhole-gateway init` in a fresh state directory.
    fn init() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = Self { dir };
        let out = gw.run(&["init", "--public-address", "gw.example.com:443"]);
        assert!(out.status.success(), "init: {}", text(&out));
        gw
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pinhole-gateway"));
        c.arg("--state")
            .arg(self.state())
            .args(args)
            .env_remove("PINHOLE_GATEWAY_AUDIT_KEY")
            .env_remove("PINHOLE_GATEWAY_DISK_RESERVE")
            .env_remove("SUDO_UID")
            .env_remove("SUDO_USER")
            .env("PINHOLE_SYSLOG_SOCKET", self.dir.path().join("no-syslog"))
            .env("RUST_LOG", "warn");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run pinhole-gateway")
    }

    /// Runs a command that must succeed; returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn store(&self) -> Store {
        Store::open(&self.state().join("gateway.db"))
            .expect("open the store")
            .with_syslog(Syslog::disabled())
    }

    fn audit_json(&self) -> Vec<serde_json::Value> {
        self.ok(&["audit", "list", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn audit_list_prints_a_hostile_description_on_one_line_escaped() {
    let gw = Gw::init();
    gw.store()
        .record(
            &Actor::Site("s1".into()),
            "site:s1",
            "site connected",
            "\x1b[31m\nfake row",
        )
        .expect("record");
    let out = gw.ok(&["audit", "list"]);
    assert!(!out.contains('\x1b'), "{out:?}");
    let line = out
        .lines()
        .find(|l| l.contains("site connected"))
        .expect("the row");
    assert!(line.ends_with("\\u{1b}[31m\\nfake row"), "{line:?}");
    assert!(
        !out.lines().any(|l| l.starts_with("fake row")),
        "no forged line: {out:?}"
    );
}

#[test]
fn sites_print_peer_supplied_agent_names_escaped() {
    let gw = Gw::init();
    let mut store = gw.store();
    let admin = Actor::System;
    store
        .create_domain(&admin, &"acme".parse().expect("domain"))
        .expect("domain");
    let (token, _) = store
        .create_token(
            &admin,
            &"acme".parse().expect("domain"),
            std::time::Duration::from_secs(60),
        )
        .expect("token");
    store
        .enroll(&token, "s1", || Ok((vec![1], vec![1])))
        .expect("enroll");
    // A site names its own agents: that is peer input.
    let agent = pinhole_proto::Agent::new(
        "plc\n\x1b[2Jevil",
        pinhole_proto::AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    );
    store
        .site_connected("s1", "1.0", "boot", &[agent], "198.51.100.7")
        .expect("connected");
    let out = gw.ok(&["sites"]);
    assert!(!out.contains('\x1b'), "{out:?}");
    assert_eq!(out.lines().count(), 2, "header and one site: {out:?}");
    assert!(out.contains("plc\\n\\u{1b}[2Jevil"), "{out:?}");
}

#[test]
fn the_audit_actor_is_the_real_user_not_the_environment() {
    let gw = Gw::init();
    let out = gw
        .cmd(&["domain", "create", "acme"])
        .env("USER", "mallory")
        .env("LOGNAME", "mallory")
        .env("SUDO_USER", "mallory")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let rows = gw.audit_json();
    let row = rows.last().expect("a row");
    let expected = format!("admin:cli:uid={}({})", id("-u"), id("-un"));
    assert_eq!(row["actor"], expected.as_str(), "{row}");
}

#[test]
fn under_sudo_the_actor_is_the_invoking_uid() {
    if id("-u") != "0" {
        // SUDO_UID is only believed from root; as another user it is ignored (tested above).
        return;
    }
    let gw = Gw::init();
    let out = gw
        .cmd(&["domain", "create", "acme"])
        .env("SUDO_UID", "0")
        .env("SUDO_USER", "mallory")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let rows = gw.audit_json();
    assert_eq!(
        rows.last().expect("row")["actor"],
        "admin:cli:sudo:uid=0(root)"
    );
    // A uid without a passwd entry is named by number alone.
    let out = gw
        .cmd(&["domain", "create", "zeta"])
        .env("SUDO_UID", "4000000123")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let rows = gw.audit_json();
    assert_eq!(
        rows.last().expect("row")["actor"],
        "admin:cli:sudo:uid=4000000123"
    );
}

#[test]
fn cli_changes_reach_the_system_log() {
    let gw = Gw::init();
    let path = gw.dir.path().join("log");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let out = gw
        .cmd(&["domain", "create", "acme"])
        .env("PINHOLE_SYSLOG_SOCKET", &path)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    let mut buf = vec![0; 65536];
    let n = sock.recv(&mut buf).expect("a datagram");
    let line = String::from_utf8_lossy(&buf[..n]);
    let row = gw.audit_json().pop().expect("row");
    assert!(
        line.contains(&format!("hash={}", row["hash"].as_str().expect("hash"))),
        "{line}"
    );
    assert!(line.contains(r#"event="domain created""#), "{line}");
}

#[test]
fn a_missing_system_log_is_a_warning_not_a_failure() {
    let gw = Gw::init();
    // Two records, one warning.
    let out = gw.run(&["domain", "create", "acme.plant-a"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("cannot copy audit records to the system log")
            .count(),
        1,
        "{err}"
    );
}
