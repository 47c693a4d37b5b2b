//! Connect to a device, end to end, in network namespaces with the real kernel, TUN devices,
//! routes and nftables: technician → WAN → gateway relay → site → plant. Root only.

mod common;

use std::time::{Duration, Instant};

use common::netns::System;
use common::wait_until;

const T: Duration = Duration::from_secs(20);

#[test]
#[ignore = "needs root"]
fn a_device_is_reachable_on_its_agent_ports_and_nothing_else() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    assert_eq!(sys.light(), "0", "the light is off before any session");

    // Nothing is reachable before connecting.
    assert!(
        sys.lab
            .tcp_check("tech", "192.168.0.10", 1000, 2.0)
            .starts_with("FAIL")
    );
    let out = alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert!(
        out.contains("192.168.0.10") && out.contains("tcp/102"),
        "{out}"
    );
    assert!(
        sys.lab.routes("tech").contains("192.168.0.10 dev pinhole0"),
        "{}",
        sys.lab.routes("tech")
    );
    // Allowed TCP, with content checked both ways (10 MB and its SHA-256), UDP, ICMP echo.
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 10_000_000, 20.0),
        "OK"
    );
    // The site answers a session before it loads the firewall and lights the light, and does
    // both before it handles the session's first datagram: once traffic has flowed, it is on.
    assert_eq!(sys.light(), "1", "the light is on during a session");
    assert_eq!(sys.lab.udp_echo("tech", "192.168.0.10", 161), "UDP ping");
    assert!(sys.lab.ping("tech", "192.168.0.10"));
    // A forbidden port of the same device, and another host of the plant: unreachable.
    assert!(!sys.lab.tcp_open("tech", "192.168.0.10", 22));
    assert!(!sys.lab.tcp_open("tech", "192.168.0.11", 102));
    assert!(!sys.lab.ping("tech", "192.168.0.11"));

    // The status shows the session and the drops.
    let status = alice.status();
    let session = &status["sessions"][0];
    assert_eq!(session["site"], "plant-a");
    assert_eq!(session["agent"], "press-4-plc");
    assert!(
        session["bytes_out"].as_u64().expect("bytes") > 10_000_000,
        "{status}"
    );
    assert!(
        status["filter"]["dropped"]["port-not-allowed"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{status}"
    );

    // The uplink side of the site cannot reach the plant, nor the plant the uplink.
    sys.lab.exec(
        "wan",
        &["ip", "route", "add", "192.168.0.0/24", "via", "10.9.3.2"],
    );
    assert!(!sys.lab.tcp_open("wan", "192.168.0.10", 102));
    assert!(!sys.lab.ping("wan", "192.168.0.10"));
    assert!(!sys.lab.ping("plant", "10.9.3.1"));
    assert!(!sys.lab.ping("plant", "10.9.1.2"));
    assert!(!sys.lab.tcp_open("plant", "10.9.2.2", 443));

    // Disconnect: the route goes, nothing reaches the plant, the light goes off.
    alice.ok(&["disconnect", "plant-a/press-4-plc"]);
    assert!(!sys.lab.routes("tech").contains("192.168.0.10"));
    assert!(
        sys.lab
            .tcp_check("tech", "192.168.0.10", 1000, 2.0)
            .starts_with("FAIL")
    );
    assert!(
        wait_until(T, || sys.light() == "0"),
        "light {}",
        sys.light()
    );
    let audit = sys.gateway(&["audit", "list"]);
    for event in ["session requested", "session opened", "session closed"] {
        assert!(audit.contains(event), "{event} missing:\n{audit}");
    }
}

#[test]
#[ignore = "needs root"]
fn two_technicians_reach_only_their_own_devices() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    let bob = sys.technician("tech2", "bob", "beta");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    bob.ok(&["connect", "plant-b/drive"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
    assert_eq!(
        sys.lab.tcp_check("tech2", "192.168.1.20", 100_000, 10.0),
        "OK"
    );
    // Each is refused the other's site, and has no path to the other's device.
    let out = alice.cli(&["connect", "plant-b/drive"]);
    assert!(!out.status.success(), "{}", common::text(&out));
    let out = bob.cli(&["connect", "plant-a/press-4-plc"]);
    assert!(!out.status.success(), "{}", common::text(&out));
    assert!(!sys.lab.tcp_open("tech", "192.168.1.20", 102));
    assert!(!sys.lab.tcp_open("tech2", "192.168.0.10", 102));

    // Granted both, alice holds devices at two sites at once.
    sys.gateway(&["grant", "alice", "beta"]);
    assert!(wait_until(T, || alice
        .cli(&["connect", "plant-b/drive"])
        .status
        .success()));
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.1.20", 100_000, 10.0),
        "OK"
    );
    assert_eq!(
        alice.status()["sessions"]
            .as_array()
            .expect("sessions")
            .len(),
        2
    );
    // Taking a grant away ends that site's session at once; the other stays.
    sys.gateway(&["ungrant", "alice", "beta"]);
    assert!(
        wait_until(T, || !sys.lab.routes("tech").contains("192.168.1.20")),
        "{}",
        sys.lab.routes("tech")
    );
    assert!(!sys.lab.tcp_open("tech", "192.168.1.20", 102));
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
    // Disconnect everything.
    alice.ok(&["disconnect", "--all"]);
    assert!(
        sys.lab.routes("tech").is_empty(),
        "{}",
        sys.lab.routes("tech")
    );
    assert!(
        alice.status()["sessions"]
            .as_array()
            .expect("sessions")
            .is_empty()
    );
}

#[test]
#[ignore = "needs root"]
fn closing_the_account_stops_a_running_transfer_within_a_second() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    // A long transfer in the background: 2 GB would take far longer than the test.
    let transfer = sys.lab.start_transfer("tech", "192.168.0.10");
    // Wait until bytes flow.
    assert!(wait_until(T, || alice.status()["sessions"][0]["bytes_out"]
        .as_u64()
        .unwrap_or(0)
        > 5_000_000));
    let closed = Instant::now();
    sys.gateway(&["account", "close", "alice"]);
    assert!(
        wait_until(Duration::from_secs(1), || alice.status()["state"]
            == "failed"),
        "{}",
        alice.status()
    );
    assert!(
        closed.elapsed() <= Duration::from_millis(1500),
        "{:?}",
        closed.elapsed()
    );
    // The route is gone and the transfer fails instead of completing.
    assert!(!sys.lab.routes("tech").contains("192.168.0.10"));
    let out = transfer.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("FAIL"), "{text}");
    assert!(wait_until(T, || sys.light() == "0"));
    let again = alice.cli(&["login", "--password-file", alice.pw.to_str().expect("utf8")]);
    assert!(!again.status.success());
}

#[test]
#[ignore = "needs root"]
fn kill_9_of_pinholed_leaves_no_route_and_a_restart_connects_again() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert!(sys.lab.routes("tech").contains("192.168.0.10"));
    sys.lab.procs[alice.proc].kill9();
    assert!(
        wait_until(T, || !sys.lab.routes("tech").contains("192.168.0.10")),
        "{}",
        sys.lab.routes("tech")
    );
    let links = sys.lab.exec("tech", &["ip", "link"]);
    assert!(!String::from_utf8_lossy(&links.stdout).contains("pinhole0"));
    // The gateway notices the lost link and ends the session at the site.
    assert!(
        wait_until(Duration::from_secs(60), || sys.light() == "0"),
        "light {}",
        sys.light()
    );
    // Restart (the stale socket is replaced), log in, connect: it works again.
    let socket = alice.socket.to_str().expect("utf8").to_owned();
    let state = alice.state.to_str().expect("utf8").to_owned();
    sys.lab.spawn(
        "tech",
        &common::bin("pinholed"),
        &["--state", &state],
        &[("PINHOLE_SOCKET", &socket)],
        "pinholed-alice-2.log",
    );
    assert!(wait_until(T, || alice.cli(&["status"]).status.success()));
    alice.ok(&["login", "--password-file", alice.pw.to_str().expect("utf8")]);
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
}

#[test]
#[ignore = "needs root"]
fn kill_9_of_the_gateway_mid_transfer_then_everyone_reconnects() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    let transfer = sys.lab.start_transfer("tech", "192.168.0.10");
    assert!(wait_until(T, || alice.status()["sessions"][0]["bytes_out"]
        .as_u64()
        .unwrap_or(0)
        > 5_000_000));
    let gw = sys.gw;
    sys.lab.procs[gw].kill9();
    let out = transfer.wait_with_output().expect("wait");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAIL"));
    // Restart the gateway; the client and the site come back by themselves.
    let state = sys.gw_state.to_str().expect("utf8").to_owned();
    sys.gw = sys.lab.spawn(
        "gw",
        &common::bin("pinhole-gateway"),
        &["--state", &state, "serve", "--listen", "10.9.2.2:443"],
        &[],
        "gateway-2.log",
    );
    assert!(
        wait_until(Duration::from_secs(60), || alice.status()["state"]
            == "logged-in"
            && sys
                .gateway(&["sites", "--json"])
                .matches("\"online\": true")
                .count()
                == 2),
        "{} / {}",
        alice.status(),
        sys.log("plant-a.log")
    );
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 1_000_000, 10.0),
        "OK"
    );
}

#[test]
#[ignore = "needs root"]
fn changing_the_agent_at_the_site_ends_its_session() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start(dir.path());
    let alice = sys.technician("tech", "alice", "acme");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 10_000, 10.0),
        "OK"
    );
    // The site's operator drops the extra UDP port and reloads.
    let config = dir.path().join("plant-a.toml");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text.replace("ports = [\"udp/161\"]\n", "")).expect("write");
    let hup = std::process::Command::new("pkill")
        .args([
            "-HUP",
            "-f",
            &format!("pinhole-site run --config {}", config.display()),
        ])
        .status()
        .expect("pkill");
    assert!(hup.success());
    assert!(
        wait_until(T, || !sys.lab.routes("tech").contains("192.168.0.10")),
        "{}",
        sys.log("plant-a.log")
    );
    assert!(wait_until(T, || sys.light() == "0"));
    assert!(
        alice.status()["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("configuration changed"),
        "{}",
        alice.status()
    );
    let audit = sys.gateway(&["audit", "list"]);
    assert!(
        audit.contains("site agents changed") && audit.contains("session closed"),
        "{audit}"
    );
    // Connecting again gets the new port set.
    assert!(wait_until(T, || alice
        .cli(&["connect", "plant-a/press-4-plc"])
        .status
        .success()));
    assert_eq!(alice.status()["sessions"][0]["ports"], "tcp/102");
    assert_eq!(
        sys.lab
            .udp_echo("tech", "192.168.0.10", 161)
            .split_whitespace()
            .next(),
        Some("FAIL")
    );
}
