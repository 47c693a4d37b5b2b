//! End to end, with the real binaries: a gateway, sites and client daemons on loopback.
//! Log in, see the granted plant, close accounts, pin keys, survive restarts, refuse bad input.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Gateway, PLC_AGENT, Site, bin, free_port, run, text, wait_until};

const T: Duration = Duration::from_secs(20);

/// A gateway with domains acme.plant-a and zeta, sites in each, and alice granted acme.
struct World {
    dir: tempfile::TempDir,
    gw: Gateway,
    site_a: Site,
    site_z: Site,
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme.plant-a"]);
    gw.ok(&["domain", "create", "zeta"]);
    gw.start();
    let mut site_a = Site::new(
        dir.path(),
        "plant-a",
        port,
        &gw.token("acme.plant-a"),
        PLC_AGENT,
    );
    let mut site_z = Site::new(
        dir.path(),
        "plant-z",
        port,
        &gw.token("zeta"),
        "[[agent]]\nname = \"hmi\"\ntype = \"vnc\"\naddress = \"10.9.0.5\"\n",
    );
    site_a.start();
    site_z.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a") && gw.site_online("plant-z")),
        "sites did not come online\n{}\n{}",
        site_a.log(),
        site_z.log()
    );
    World {
        dir,
        gw,
        site_a,
        site_z,
    }
}

fn site_names(ls: &serde_json::Value) -> Vec<String> {
    ls.as_array()
        .expect("array")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn login_lists_exactly_the_granted_sites() {
    let w = world();
    let (p12, pw) = w.gw.account("alice");
    let client = Client::start(w.dir.path(), "alice");
    client.import_and_login(&p12, &pw);
    // No grant: nothing visible.
    assert!(site_names(&client.ls()).is_empty());
    w.gw.ok(&["grant", "alice", "acme"]);
    // The running gateway applies the grant at once; ls asks it afresh.
    assert!(wait_until(T, || site_names(&client.ls()) == ["plant-a"]));
    let ls = client.ls();
    let agent = &ls[0]["agents"][0];
    assert_eq!(agent["name"], "press-4-plc");
    assert_eq!(agent["type"], "siemens-s7");
    assert_eq!(agent["address"], "192.168.0.10");
    assert_eq!(agent["ports"][0]["port"], 102);
    assert_eq!(ls[0]["online"], true);
    let table = client.ok(&["ls"]);
    assert!(
        table.contains("press-4-plc") && table.contains("tcp/102"),
        "{table}"
    );
    assert!(!table.contains("plant-z"), "{table}");
    let status = client.status();
    assert_eq!(status["state"], "logged-in");
    assert_eq!(status["account"], "alice");
    assert_eq!(status["tunnel_ip"], "100.64.0.2");
    // Taking the grant away hides the site again.
    w.gw.ok(&["ungrant", "alice", "acme"]);
    assert!(wait_until(T, || site_names(&client.ls()).is_empty()));
    client.ok(&["logout"]);
    assert_eq!(client.status()["state"], "logged-out");
    // The gateway records the logout when it sees the link end, which may be just after the
    // client has answered.
    assert!(
        wait_until(T, || w
            .gw
            .audit_events()
            .iter()
            .any(|e| e.starts_with("logout | account:alice"))),
        "{:#?}",
        w.gw.audit_events()
    );
    let events = w.gw.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("login ok | account:alice")),
        "{events:#?}"
    );
    drop(w.site_z);
    drop(w.site_a);
}

#[test]
fn closing_an_account_ends_its_link_within_a_second_and_refuses_login() {
    let mut w = world();
    let (p12, pw) = w.gw.account("bob");
    w.gw.ok(&["grant", "bob", "acme"]);
    let client = Client::start(w.dir.path(), "bob");
    client.import_and_login(&p12, &pw);
    assert_eq!(client.status()["state"], "logged-in");
    let start = Instant::now();
    w.gw.ok(&["account", "close", "bob"]);
    assert!(
        wait_until(Duration::from_secs(2), || client.status()["state"]
            == "failed"),
        "link still up: {}",
        client.status()
    );
    let elapsed = start.elapsed();
    // The CLI returned after its commit; the link ends within the gateway's watch interval.
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
    assert!(
        client.status()["last_error"]
            .as_str()
            .expect("error")
            .contains("account was closed")
    );
    // No reconnect afterwards, and a new login is refused with the same words.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(client.status()["state"], "failed");
    client.ok(&["logout"]);
    let out = client.cli(&["login", "--password-file", pw.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("account was closed"), "{}", text(&out));
    let events = w.gw.audit_events();
    assert!(
        events.iter().any(|e| e.starts_with("account closed |")),
        "{events:#?}"
    );
    // The closed account trying to come back is on record, in aggregate.
    w.gw.stop();
    let events = w.gw.audit_events();
    assert!(
        events.iter().any(|e| e.starts_with("certificates refused")
            && e.contains("from 127.0.0.1")
            && e.contains("Revoked")),
        "{events:#?}"
    );
}

/// A revoked site loses its live link within a second and cannot come back; a removed one
/// disappears from the registry and from technicians' inventories.
#[test]
fn revoking_a_site_ends_its_link_within_a_second_and_keeps_it_out() {
    let w = world();
    let (p12, pw) = w.gw.account("carol");
    w.gw.ok(&["grant", "carol", "acme"]);
    let client = Client::start(w.dir.path(), "carol");
    client.import_and_login(&p12, &pw);
    let start = Instant::now();
    w.gw.ok(&["site", "revoke", "plant-a"]);
    assert!(
        wait_until(Duration::from_secs(2), || !w.gw.site_online("plant-a")),
        "site still online"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        start.elapsed()
    );
    // It keeps dialling, and every handshake is refused.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!w.gw.site_online("plant-a"), "a revoked site came back");
    let ls = client.ls();
    assert_eq!(ls[0]["online"], false, "{ls}");
    assert!(w.gw.site_online("plant-z"), "other sites are untouched");
    w.gw.ok(&["site", "remove", "plant-z"]);
    assert!(
        wait_until(Duration::from_secs(2), || !w.gw.site_online("plant-z")
            && !w.gw.sites_json().to_string().contains("plant-z")),
        "removed site still there"
    );
    let events = w.gw.audit_events();
    assert!(
        events.iter().any(|e| e.starts_with("site revoked")),
        "{events:#?}"
    );
}

#[test]
fn technician_messages_for_wrong_password_unreachable_gateway_and_foreign_key() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let gw = Gateway::init(dir.path(), "gw", port);
    let (p12, pw) = gw.account("carol");
    let client = Client::start(dir.path(), "carol");
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "nope\n").expect("pw");
    // Wrong password on import: nothing stored.
    let out = client.cli(&[
        "import",
        p12.to_str().expect("utf8"),
        "--password-file",
        wrong.to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("wrong password"), "{}", text(&out));
    assert_eq!(client.status()["state"], "no-bundle");
    assert!(!dir.path().join("carol-client").join("bundle.p12").exists());
    // A truncated file: a clear message, nothing stored.
    let bytes = std::fs::read(&p12).expect("read");
    let cut = dir.path().join("cut.p12");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let out = client.cli(&[
        "import",
        cut.to_str().expect("utf8"),
        "--password-file",
        pw.to_str().expect("utf8"),
    ]);
    assert!(text(&out).contains("damaged"), "{}", text(&out));
    assert!(!dir.path().join("carol-client").join("bundle.p12").exists());

    client.ok(&[
        "import",
        p12.to_str().expect("utf8"),
        "--password-file",
        pw.to_str().expect("utf8"),
    ]);
    let out = client.cli(&["login", "--password-file", wrong.to_str().expect("utf8")]);
    assert!(text(&out).contains("wrong password"), "{}", text(&out));
    // The gateway is not running.
    let out = client.cli(&["login", "--password-file", pw.to_str().expect("utf8")]);
    assert!(text(&out).contains("gateway unreachable"), "{}", text(&out));
    client.cli(&["logout"]);
    // Another gateway (another key) at the address in the bundle.
    let mut impostor = Gateway::init(dir.path(), "impostor", port);
    impostor.start();
    let out = client.cli(&["login", "--password-file", pw.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the gateway's key does not match your certificate — possible interception; not connected"),
        "{}",
        text(&out)
    );
    // Nothing reached the impostor's application layer: no login in its audit log.
    assert!(
        !impostor
            .audit_events()
            .iter()
            .any(|e| e.starts_with("login"))
    );
    impostor.stop();
}

#[test]
fn site_refuses_a_second_gateway_with_another_key_until_repinned() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme"]);
    gw.start();
    let mut site = Site::new(dir.path(), "plant-a", port, &gw.token("acme"), PLC_AGENT);
    site.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    let pin = std::fs::read_to_string(site.state.join("gateway.pin")).expect("pin recorded");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(site.state.join("gateway.pin"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(site.state.join("site.key"))
            .expect("key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    gw.stop();
    // Same address, another gateway and key.
    let mut other = Gateway::init(dir.path(), "other", port);
    other.start();
    assert!(
        wait_until(T, || site.log().contains("does not match the key pinned")),
        "{}",
        site.log()
    );
    assert_eq!(
        std::fs::read_to_string(site.state.join("gateway.pin")).expect("pin"),
        pin
    );
    assert!(other.sites_json().as_array().expect("array").is_empty());
    other.stop();
    // The site survives a restart of itself with the pin intact, and `repin` forgets it.
    drop(site.proc.take());
    let out = run(Command::new(bin("pinhole-site"))
        .args(["repin", "--state"])
        .arg(&site.state));
    assert!(
        out.status.success() && text(&out).contains("forgot"),
        "{}",
        text(&out)
    );
    assert!(!site.state.join("gateway.pin").exists());
}

#[test]
fn a_used_enrollment_token_is_refused_and_audited() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme"]);
    gw.start();
    let token = gw.token("acme");
    let mut first = Site::new(dir.path(), "plant-a", port, &token, PLC_AGENT);
    first.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "{}",
        first.log()
    );
    let mut second = Site::new(dir.path(), "plant-b", port, &token, PLC_AGENT);
    second.start();
    let proc = second.proc.as_mut().expect("proc");
    assert!(
        wait_until(T, || proc.exited().is_some()),
        "the second site must stop"
    );
    let log = second.log();
    assert!(log.contains("token already used"), "{log}");
    assert!(!gw.sites_json().to_string().contains("plant-b"));
    // Refusals from peers without a certificate are recorded per source and minute (here: at
    // the stop, before the minute is over).
    gw.stop();
    let events = gw.audit_events();
    assert!(
        events.iter().any(|e| e.starts_with("enrollments refused")
            && e.contains("from 127.0.0.1")
            && e.contains("site plant-b: enrollment refused: token already used")),
        "{events:#?}"
    );
}

/// A raw TLS link to the gateway with a technician's certificate, for sending it garbage.
fn raw_link(
    gw: &Gateway,
    p12: &std::path::Path,
    pw: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let password = std::fs::read_to_string(pw).expect("pw");
    let bundle =
        pinhole_certs::Bundle::from_pkcs12(&std::fs::read(p12).expect("p12"), password.trim())
            .expect("bundle");
    let config = pinhole_certs::tls::client_config(
        bundle.identity(),
        pinhole_certs::danger::AcceptAnyServer::new(),
    )
    .expect("config");
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().expect("name"))
            .expect("conn");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", gw.port)).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads until EOF or error; returns what arrived.
fn drain(s: &mut impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Err(e) => {
                eprintln!("drain: {e}");
                return out;
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn oversize_and_garbage_frames_close_only_their_own_connection() {
    let w = world();
    let (p12, pw) = w.gw.account("dave");
    w.gw.ok(&["grant", "dave", "acme"]);
    let client = Client::start(w.dir.path(), "dave");
    client.import_and_login(&p12, &pw);

    // Oversize: a header announcing 4 GiB.
    let mut s = raw_link(&w.gw, &p12, &pw);
    s.write_all(&[1, 1, 0xff, 0xff, 0xff, 0xff]).expect("write");
    let got = String::from_utf8_lossy(&drain(&mut s)).into_owned();
    assert!(
        got.contains("exceeds the maximum"),
        "the gateway says why before closing: {got:?}"
    );
    // Garbage JSON in a well-formed frame.
    let mut s = raw_link(&w.gw, &p12, &pw);
    s.write_all(&[1, 1, 0, 0, 0, 5]).expect("write");
    s.write_all(b"{{{{{").expect("write");
    let got = String::from_utf8_lossy(&drain(&mut s)).into_owned();
    assert!(got.contains("malformed message"), "{got:?}");
    // Not TLS at all.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", w.gw.port)).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    drain(&mut tcp);

    // Everyone else is untouched: the daemon's link, the sites, and new logins.
    assert_eq!(client.status()["state"], "logged-in");
    assert_eq!(site_names(&client.ls()), ["plant-a"]);
    assert!(w.gw.site_online("plant-a") && w.gw.site_online("plant-z"));
    let (p12e, pwe) = w.gw.account("erin");
    let erin = Client::start(w.dir.path(), "erin");
    erin.import_and_login(&p12e, &pwe);
    assert_eq!(erin.status()["state"], "logged-in");
    let log = w.gw.proc.as_ref().expect("gw").log_text();
    assert!(
        log.contains("protocol error: link closed") && log.contains("exceeds the maximum"),
        "{log}"
    );
}

#[test]
fn audit_verify_passes_then_names_an_edited_row() {
    let w = world();
    w.gw.account("frank");
    let out = w.gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("intact"));
    let csv = w.gw.ok(&["audit", "export", "--format", "csv"]);
    assert!(
        csv.starts_with("id,time,actor,object,event,description,hash\n"),
        "{csv}"
    );
    // Edit row 3 with the sqlite3 CLI, as someone with the file would (dropping the guard
    // triggers first).
    let db = w.gw.state.join("gateway.db");
    let out = run(Command::new("sqlite3").arg(&db).arg(
        "DROP TRIGGER audit_no_update; UPDATE audit SET description = 'nothing to see' WHERE id = 3;",
    ));
    assert!(out.status.success(), "sqlite3: {}", text(&out));
    let out = w.gw.cli(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("first bad row is 3"), "{}", text(&out));
}

#[test]
fn site_and_client_reconnect_after_a_gateway_restart() {
    let mut w = world();
    let (p12, pw) = w.gw.account("gina");
    w.gw.ok(&["grant", "gina", "acme"]);
    let client = Client::start(w.dir.path(), "gina");
    client.import_and_login(&p12, &pw);
    w.gw.stop();
    assert!(
        wait_until(T, || client.status()["state"] == "reconnecting"),
        "{}",
        client.status()
    );
    w.gw.start();
    assert!(
        wait_until(Duration::from_secs(40), || client.status()["state"]
            == "logged-in"
            && w.gw.site_online("plant-a")),
        "client {} / site log {}",
        client.status(),
        w.site_a.log()
    );
    assert_eq!(site_names(&client.ls()), ["plant-a"]);
    let events = w.gw.audit_events();
    assert!(
        events
            .iter()
            .filter(|e| e.starts_with("login ok | account:gina"))
            .count()
            >= 2,
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("gateway stopped")),
        "{events:#?}"
    );
}

#[test]
fn bad_site_configuration_is_refused_with_key_and_value() {
    let dir = tempfile::tempdir().expect("dir");
    for (agents, key, value) in [
        (
            "[[agent]]\nname = \"p\"\ntype = \"custom\"\naddress = \"192.168.0.10\"\nports = [\"tcp/99999\"]\n",
            "agent[0].ports",
            "tcp/99999",
        ),
        (
            "[[agent]]\nname = \"p\"\ntype = \"modbus\"\naddress = \"192.168.0.999\"\n",
            "agent[0].address",
            "192.168.0.999",
        ),
        (
            "[[agent]]\nname = \"p\"\ntype = \"modbus\"\naddress = \"192.168.0.9\"\nport = [\"tcp/1\"]\n",
            "port",
            "",
        ),
    ] {
        let site = Site::new(dir.path(), "plant-x", 1, "abcd", agents);
        let state = dir.path().join("never");
        let out = run(Command::new(bin("pinhole-site"))
            .args(["run", "--config"])
            .arg(&site.config)
            .arg("--state")
            .arg(&state));
        assert!(!out.status.success());
        let t = text(&out);
        assert!(t.contains(key) && t.contains(value), "{t}");
        assert!(!state.exists(), "a refused configuration changes nothing");
    }
}

#[test]
fn switch_off_keeps_the_site_away() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme"]);
    gw.start();
    let switch = dir.path().join("switch");
    std::fs::write(&switch, "1\n").expect("switch");
    let agents = format!(
        "[switch]\npath = \"{}\"\nmode = \"enable-when-1\"\n{PLC_AGENT}",
        switch.display()
    );
    let mut site = Site::new(dir.path(), "plant-a", port, &gw.token("acme"), &agents);
    site.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    let out = run(Command::new(bin("pinhole-site"))
        .args(["switch", "off", "--config"])
        .arg(&site.config));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&switch).expect("read").trim(), "0");
    assert!(
        wait_until(T, || !gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    // The site said why before it closed: the gateway knows it is switched off, not lost.
    let switched_off = |gw: &Gateway| {
        gw.sites_json()
            .as_array()
            .expect("array")
            .iter()
            .any(|s| s["name"] == "plant-a" && s["switched_off"] == true)
    };
    assert!(switched_off(&gw), "{}", gw.sites_json());
    assert!(
        gw.audit_events()
            .iter()
            .any(|e| e.starts_with("site switched off | site:plant-a")),
        "{:#?}",
        gw.audit_events()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!gw.site_online("plant-a"), "stays away while switched off");
    run(Command::new(bin("pinhole-site"))
        .args(["switch", "on", "--config"])
        .arg(&site.config));
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    assert!(!switched_off(&gw), "{}", gw.sites_json());
    // A site that is merely lost is not shown as switched off.
    drop(site.proc.take());
    assert!(
        wait_until(T, || !gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    assert!(!switched_off(&gw), "{}", gw.sites_json());
}

#[test]
fn sighup_reloads_agents_and_the_gateway_audits_the_change() {
    let w = world();
    let (p12, pw) = w.gw.account("hank");
    w.gw.ok(&["grant", "hank", "acme"]);
    let client = Client::start(w.dir.path(), "hank");
    client.import_and_login(&p12, &pw);
    let text = std::fs::read_to_string(&w.site_a.config).expect("read");
    std::fs::write(
        &w.site_a.config,
        format!("{text}[[agent]]\nname = \"hmi-1\"\ntype = \"http\"\naddress = \"192.168.0.20\"\n"),
    )
    .expect("write");
    let pid = w.site_a.proc.as_ref().expect("site").pid();
    assert!(
        run(Command::new("kill").args(["-HUP", &pid.to_string()]))
            .status
            .success()
    );
    assert!(
        wait_until(T, || w.gw.ok(&["sites"]).contains("hmi-1")),
        "{}",
        w.site_a.log()
    );
    // The technician's inventory follows.
    assert!(wait_until(T, || client.ls()[0]["agents"]
        .as_array()
        .is_some_and(|a| a.len() == 2)));
    let events = w.gw.audit_events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("site agents changed | site:plant-a") && e.contains("hmi-1")),
        "{events:#?}"
    );
    // A broken file on reload is refused and the running agents stay.
    std::fs::write(&w.site_a.config, "name = \"plant-a\"\nbogus = 1\n").expect("write");
    assert!(
        run(Command::new("kill").args(["-HUP", &pid.to_string()]))
            .status
            .success()
    );
    assert!(wait_until(T, || w
        .site_a
        .log()
        .contains("configuration reload refused")));
    assert!(w.gw.site_online("plant-a"));
    assert!(w.gw.ok(&["sites"]).contains("hmi-1"));
}

#[test]
fn the_daemon_refuses_users_outside_root_and_the_pinhole_group() {
    let dir = tempfile::tempdir().expect("dir");
    let client = Client::start(dir.path(), "ivan");
    // Open the file permissions wide, so that only the daemon's own peer check stands between
    // an unprivileged user and the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    std::fs::set_permissions(&client.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let out = run(Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(bin("pinhole"))
        .arg("status")
        .env("PINHOLE_SOCKET", &client.socket));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("permission denied: only root and members of the `pinhole` group"),
        "{}",
        text(&out)
    );
    // Root is let in.
    assert!(client.cli(&["status"]).status.success());
}
