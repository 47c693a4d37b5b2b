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

/// Deletes audit rows after `keep`, through a connection without the append-only triggers, as
/// someone with the database file would.
fn cut_audit_log(state: &std::path::Path, keep: i64) {
    let c = rusqlite::Connection::open(state.join("gateway.db")).expect("open");
    c.execute_batch("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
        .expect("drop triggers");
    c.execute("DELETE FROM audit WHERE id > ?1", [keep])
        .expect("delete");
}

#[test]
fn audit_verify_with_a_checkpoint_finds_a_cut_log_that_the_chain_alone_misses() {
    let gw = Gw::init();
    gw.ok(&["domain", "create", "acme.plant-a"]);
    let line = gw.ok(&["audit", "checkpoint"]);
    assert_eq!(line.lines().count(), 1, "one line: {line:?}");
    assert!(
        line.starts_with("pinhole-audit-checkpoint v1 rows=4 "),
        "{line}"
    );
    let file = gw.dir.path().join("checkpoints");
    std::fs::write(&file, &line).expect("store the checkpoint");
    let file = file.to_str().expect("utf-8 path");
    let key = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("key="))
        .expect("the public key")
        .to_owned();

    // Intact and longer: holds, with the local key and with the operator's copy of it.
    gw.ok(&["domain", "create", "zeta"]);
    let out = gw.ok(&["audit", "verify", "--checkpoint", file]);
    assert!(out.contains("holds"), "{out}");
    gw.ok(&[
        "audit",
        "verify",
        "--checkpoint",
        file,
        "--audit-public-key",
        &key,
    ]);

    // Cut before the checkpoint: the chain still verifies, the checkpoint does not.
    cut_audit_log(&gw.state(), 3);
    gw.ok(&["audit", "verify"]);
    let out = gw.run(&["audit", "verify", "--checkpoint", file]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("CUT: the checkpoint covers 4 rows, the log has 3"),
        "{}",
        text(&out)
    );

    // A checkpoint edited to match the cut log: the signature fails.
    let forged = gw.dir.path().join("forged");
    std::fs::write(&forged, line.replace("rows=4", "rows=3")).expect("forge");
    let out = gw.run(&[
        "audit",
        "verify",
        "--checkpoint",
        forged.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("signature is NOT VALID"),
        "{}",
        text(&out)
    );

    // Checked against another trusted key: refused.
    let other = "11".repeat(32);
    let out = gw.run(&[
        "audit",
        "verify",
        "--checkpoint",
        file,
        "--audit-public-key",
        &other,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("ANOTHER KEY"), "{}", text(&out));
}

#[test]
fn the_audit_key_can_live_outside_the_state_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gw { dir };
    let keys = gw.dir.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    let key = keys.join("audit.key");
    let out = gw
        .cmd(&["init", "--public-address", "gw.example.com:443"])
        .env("PINHOLE_GATEWAY_AUDIT_KEY", &key)
        .output()
        .expect("init");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("audit public key"), "{}", text(&out));
    assert!(key.exists());
    assert!(!gw.state().join("audit.key").exists());
    let key = key.to_str().expect("utf-8");
    let line = gw.ok(&["--audit-key", key, "audit", "checkpoint"]);
    let file = gw.dir.path().join("cp");
    std::fs::write(&file, &line).expect("write");
    let file = file.to_str().expect("utf-8");
    gw.ok(&["--audit-key", key, "audit", "verify", "--checkpoint", file]);
    // Without the key, nothing to trust: a clear refusal, not a new key.
    let out = gw.run(&["audit", "verify", "--checkpoint", file]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--audit-public-key"), "{}", text(&out));
    assert!(!gw.state().join("audit.key").exists());
}

#[test]
fn status_reports_the_log_the_key_and_free_space_against_the_reserve() {
    let gw = Gw::init();
    // A reserve of 1 MiB: the default (2 % of the file system) depends on the machine the test
    // runs on; the reserve's arithmetic has its own unit tests.
    let out = gw.ok(&["status", "--disk-reserve", "1MiB"]);
    for want in [
        "state directory",
        "audit log        2 rows",
        "last checkpoint  none",
        "public key",
        "reserve",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert!(out.trim_end().ends_with("ok"), "{out}");

    let line = gw.ok(&["audit", "checkpoint"]);
    let json: serde_json::Value =
        serde_json::from_str(&gw.ok(&["status", "--json", "--disk-reserve", "1MiB"]))
            .expect("json");
    assert_eq!(json["audit_rows"], 3);
    assert_eq!(json["last_checkpoint"]["rows"], 2);
    assert!(line.contains(json["audit_public_key"].as_str().expect("key")));
    assert_eq!(json["disk"]["low"], false);
    assert!(json["database_bytes"].as_u64().expect("size") > 0);

    // Below the reserve: said loudly, and status fails for a monitor to see.
    let out = gw.run(&["status", "--disk-reserve", "100%"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("LOW"),
        "{}",
        text(&out)
    );
    let out = gw
        .cmd(&["domain", "create", "acme"])
        .env("PINHOLE_GATEWAY_DISK_RESERVE", "100%")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("LOW DISK SPACE"),
        "{}",
        text(&out)
    );
    let out = gw.run(&["status", "--disk-reserve", "lots"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("e.g. 512MiB"), "{}", text(&out));
}

#[test]
fn site_revoke_and_remove_say_what_they_did_and_refuse_an_unknown_site() {
    let gw = Gw::init();
    let mut store = gw.store();
    let acme = "acme".parse().expect("domain");
    store.create_domain(&Actor::System, &acme).expect("domain");
    let (token, _) = store
        .create_token(&Actor::System, &acme, std::time::Duration::from_secs(60))
        .expect("token");
    store
        .enroll(&token, "s1", || Ok((vec![1], vec![0x42])))
        .expect("enroll");

    let out = gw.ok(&["site", "revoke", "s1"]);
    assert!(out.starts_with("revoked site s1"), "{out}");
    let sites = gw.ok(&["sites"]);
    assert!(
        sites.lines().nth(1).expect("row").contains("revoked"),
        "{sites}"
    );
    assert!(store.revoked().expect("revoked").contains(&vec![0x42]));

    let out = gw.ok(&["site", "remove", "s1"]);
    assert!(out.starts_with("removed site s1"), "{out}");
    assert_eq!(gw.ok(&["sites"]).lines().count(), 1, "header only");
    let events: Vec<String> = gw
        .audit_json()
        .iter()
        .map(|r| r["event"].as_str().expect("event").to_owned())
        .collect();
    assert!(
        events.ends_with(&["site revoked".into(), "site removed".into()]),
        "{events:?}"
    );

    let out = gw.run(&["site", "remove", "s1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("pinhole-gateway: site s1 not found"),
        "{}",
        text(&out)
    );
}

#[test]
fn domains_are_renamed_and_deleted_and_a_bundle_reissued_from_the_cli_as_from_the_portal() {
    let gw = Gw::init();
    gw.ok(&["domain", "create", "acme.plant-a"]);
    gw.ok(&["domain", "create", "acme.empty"]);
    let out = gw.ok(&["domain", "rename", "acme.plant-a", "acme.plant-z"]);
    assert!(
        out.contains("renamed domain acme.plant-a to acme.plant-z"),
        "{out}"
    );
    let out = gw.run(&["domain", "delete", "acme"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not empty"), "{}", text(&out));
    gw.ok(&["domain", "delete", "acme.empty"]);
    assert_eq!(
        gw.store().domains().expect("domains"),
        ["acme", "acme.plant-z"]
    );

    let dir = gw.dir.path();
    let first = dir.join("alice.p12");
    gw.ok(&[
        "account",
        "create",
        "alice",
        "--out",
        first.to_str().expect("utf8"),
    ]);
    let old = gw.store().account("alice").expect("q").expect("a").serial;
    let second = dir.join("alice-2.p12");
    let out = gw.ok(&[
        "account",
        "reissue",
        "alice",
        "--out",
        second.to_str().expect("utf8"),
        "--days",
        "90",
    ]);
    assert!(out.contains("bundle password (shown once): "), "{out}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&second).expect("bundle").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let store = gw.store();
    let now = store.account("alice").expect("q").expect("a");
    assert_ne!(now.serial, old);
    assert!(store.revoked().expect("revoked").contains(&old));
    assert!(now.expires.is_some());
    // An existing file is not overwritten; a closed account gets no new bundle.
    assert!(
        !gw.run(&[
            "account",
            "reissue",
            "alice",
            "--out",
            second.to_str().expect("utf8")
        ])
        .status
        .success()
    );
    gw.ok(&["account", "close", "alice"]);
    let third = dir.join("alice-3.p12");
    let out = gw.run(&[
        "account",
        "reissue",
        "alice",
        "--out",
        third.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success() && !third.exists(), "{}", text(&out));
}
