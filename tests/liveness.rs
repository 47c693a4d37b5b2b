//! Links that notice a dead path, and port fallback, in network namespaces with the real
//! kernel: a stateful firewall on the WAN router in front of plant-a that forgets idle
//! connections, a path that stops carrying anything, and a network that blocks port 443.
//! Root only.

mod common;

use std::time::{Duration, Instant};

use common::netns::{Lab, Options, System};
use common::wait_until;

/// The sites keep the default heartbeat (10 minutes): only TCP keepalive, the user timeout and
/// the gateway's session timeout can notice a dead path within these tests.
fn quiet_sites(ports: &[u16]) -> Options {
    Options {
        site_heartbeat: None,
        gateway_ports: ports.to_vec(),
        site_config: String::new(),
    }
}

/// Whether the gateway lists `site` as online.
fn online(sys: &System, site: &str) -> bool {
    let sites: serde_json::Value =
        serde_json::from_str(&sys.gateway(&["sites", "--json"])).expect("json");
    sites
        .as_array()
        .expect("array")
        .iter()
        .any(|s| s["name"] == site && s["online"] == true)
}

/// Lines of a log that contain `what`.
fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// A carrier-grade stateful firewall in front of plant-a's uplink (the WAN router's port to
/// the site): it forgets an established TCP connection after 20 s without packets, and with
/// loose pickup off it drops whatever belongs to a connection it forgot. The site may open new
/// connections; nothing may open one towards it.
fn forgetful_firewall(lab: &Lab) {
    let site = lab.ifname("w3");
    lab.nft(
        "wan",
        &format!(
            "table inet carrier {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"{site}\" ct state invalid counter drop\n    oifname \"{site}\" ct state invalid counter drop\n    oifname \"{site}\" ct state new counter drop\n  }}\n}}\n"
        ),
    );
    lab.sysctl(
        "wan",
        "net.netfilter.nf_conntrack_tcp_timeout_established=20",
    );
    lab.sysctl("wan", "net.netfilter.nf_conntrack_tcp_loose=0");
}

#[test]
#[ignore = "needs root"]
fn a_site_behind_a_firewall_that_forgets_idle_links_reconnects_and_connect_works() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start_with(dir.path(), &quiet_sites(&[443]), forgetful_firewall);
    // plant-a's link is idle from its welcome on: nothing crosses it until a session request.
    let idle_from = sys.sites_online_at;
    let alice = sys.technician("tech", "alice", "acme");
    let welcomed = |sys: &System| count(&sys.log("plant-a.log"), "connected to the gateway");
    assert_eq!(welcomed(&sys), 1, "{}", sys.log("plant-a.log"));
    assert!(
        idle_from.elapsed() < Duration::from_secs(40),
        "the technician's login took too long for the measurement"
    );

    // 45 s of idleness: the firewall forgets the site's link after 20 s. The site must notice
    // and come back on a new connection by itself.
    let mut reconnected = None;
    while idle_from.elapsed() < Duration::from_secs(45) {
        if reconnected.is_none() && welcomed(&sys) >= 2 {
            reconnected = Some(idle_from.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    let out = alice.cli(&["connect", "plant-a/press-4-plc"]);
    let took = t.elapsed();
    eprintln!(
        "figures: site reconnected {reconnected:?} after its link's last packet (the firewall forgot the link at 20 s); connect at 45 s took {took:?}"
    );
    assert!(
        out.status.success(),
        "connect after 45 s idle: {}\n--- plant-a ---\n{}\n--- gateway ---\n{}",
        common::text(&out),
        sys.log("plant-a.log"),
        sys.log("gateway.log")
    );
    assert!(took < Duration::from_secs(5), "connect took {took:?}");
    let reconnected = reconnected.expect("the site reconnected while idle");
    assert!(
        reconnected < Duration::from_secs(40),
        "reconnected after {reconnected:?}"
    );
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
}

#[test]
#[ignore = "needs root"]
fn a_session_request_a_cut_off_site_does_not_answer_is_refused_within_seconds() {
    let dir = tempfile::tempdir().expect("dir");
    let mut sys = System::start_with(dir.path(), &quiet_sites(&[443]), |_| {});
    let alice = sys.technician("tech", "alice", "acme");
    // The path between the site and everything else stops carrying packets, silently (a
    // carrier NAT that lost its state, a cable pulled upstream).
    let site = sys.lab.ifname("w3");
    sys.lab.nft(
        "wan",
        &format!(
            "table inet cut {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"{site}\" drop\n    oifname \"{site}\" drop\n  }}\n}}\n"
        ),
    );
    assert!(
        sys.gateway(&["sites", "--json"])
            .contains("\"online\": true")
    );
    let t = Instant::now();
    let out = alice.cli(&["connect", "plant-a/press-4-plc"]);
    let took = t.elapsed();
    let text = common::text(&out);
    eprintln!(
        "figures: the refused connect took {took:?}: {}",
        text.trim()
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("plant-a does not answer; its connection to the gateway may be broken"),
        "{text}"
    );
    assert!(took < Duration::from_secs(10), "refused after {took:?}");
    // The gateway ended the suspect link: plant-a is offline, and the audit log says why.
    assert!(
        wait_until(Duration::from_secs(3), || !online(&sys, "plant-a")),
        "{}",
        sys.gateway(&["sites", "--json"])
    );
    let audit = sys.gateway(&["audit", "export", "--format", "jsonl"]);
    assert!(audit.contains("does not answer"), "{audit}");

    // The path heals: the site notices its old link is gone and comes back by itself.
    let t = Instant::now();
    let out = sys
        .lab
        .exec("wan", &["nft", "delete", "table", "inet", "cut"]);
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        wait_until(Duration::from_secs(60), || online(&sys, "plant-a")),
        "{}",
        sys.log("plant-a.log")
    );
    eprintln!(
        "figures: plant-a back online {:?} after the path healed",
        t.elapsed()
    );
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );
}

#[test]
#[ignore = "needs root"]
fn with_443_blocked_site_and_technician_connect_on_11444() {
    let dir = tempfile::tempdir().expect("dir");
    let block = |lab: &Lab| {
        lab.nft(
            "wan",
            "table inet office {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    tcp dport 443 drop\n  }\n}\n",
        )
    };
    let mut sys = System::start_with(dir.path(), &quiet_sites(&[443, 11444]), block);
    eprintln!(
        "figures: both sites online {:?} after they started",
        sys.sites_online_after
    );
    assert!(
        sys.sites_online_after < Duration::from_secs(8),
        "sites online after {:?}",
        sys.sites_online_after
    );
    let alice = sys.technician("tech", "alice", "acme");
    assert_eq!(alice.status()["gateway"], "10.9.2.2:11444");
    let daemon = sys.log("pinholed-alice.log");
    assert!(
        daemon.contains("reached the gateway at a later address")
            && daemon.contains("10.9.2.2:443"),
        "{daemon}"
    );
    let first_login = alice.status();
    // The next login starts at the address that worked: no connect timeout on 443 again.
    alice.ok(&["logout"]);
    let t = Instant::now();
    alice.ok(&["login", "--password-file", alice.pw.to_str().expect("utf8")]);
    let login = t.elapsed();
    eprintln!("figures: a login again with 443 blocked took {login:?}");
    let daemon = sys.log("pinholed-alice.log");
    assert_eq!(
        count(&daemon, "reached the gateway at a later address"),
        1,
        "the second login tried 443 again (took {login:?}; first: {first_login}): {daemon}"
    );
    assert!(login < Duration::from_secs(8), "login took {login:?}");
    assert_eq!(alice.status()["gateway"], "10.9.2.2:11444");
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(
        sys.lab.tcp_check("tech", "192.168.0.10", 100_000, 10.0),
        "OK"
    );

    // The address that worked is tried first next time: after a gateway restart nobody waits
    // for 443 again (a wait for 443 alone would take the connect timeout).
    let gw = sys.gw;
    sys.lab.procs[gw].kill9();
    let args = sys.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sys.gw = sys.lab.spawn(
        "gw",
        &common::bin("pinhole-gateway"),
        &args,
        &[],
        "gateway-2.log",
    );
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            alice.status()["state"] == "logged-in"
                && online(&sys, "plant-a")
                && online(&sys, "plant-b")
        }),
        "{}",
        sys.log("plant-a.log")
    );
    let back = t.elapsed();
    eprintln!("figures: everyone back {back:?} after the gateway restart");
    assert!(back < Duration::from_secs(8), "back after {back:?}");
    assert_eq!(alice.status()["gateway"], "10.9.2.2:11444");
}
