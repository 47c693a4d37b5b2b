//! The site loads a session's firewall table while the session starts: the WireGuard handshake
//! completes during the load, and the packets toward the device wait for the table — delivered
//! in order once it is loaded, never if the load fails (the session then ends). The load is
//! made slow or failing with a wrapper around the real `nft`, first on the site's PATH: a load
//! (`nft -f`) waits while a file `hold` exists and fails while a file `fail` exists.
//!
//! Root-only (namespaces, TUN, nftables); run with `tests/run`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::netns::{Lab, System, Technician};
use common::{bin, text, wait_until};

const PLC: &str = "192.168.0.10";

/// The wrapper's control directory and the PATH that puts it before the real `nft`.
struct SlowNft {
    control: PathBuf,
    path: String,
}

impl SlowNft {
    fn new(dir: &Path) -> Self {
        let real = Command::new("sh")
            .args(["-c", "command -v nft"])
            .output()
            .expect("sh");
        let real = String::from_utf8_lossy(&real.stdout).trim().to_owned();
        assert!(!real.is_empty(), "nft is not installed");
        let bin_dir = dir.join("slow-nft");
        let control = dir.join("nft-control");
        std::fs::create_dir_all(&bin_dir).expect("dir");
        std::fs::create_dir_all(&control).expect("dir");
        let c = control.display();
        std::fs::write(
            bin_dir.join("nft"),
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" = \"-f\" ]; then\n\
                 \x20   while [ -e {c}/hold ]; do sleep 0.01; done\n\
                 \x20   if [ -e {c}/fail ]; then cat >/dev/null; echo 'nft (test wrapper): load refused' >&2; exit 1; fi\n\
                 fi\n\
                 exec {real} \"$@\"\n"
            ),
        )
        .expect("nft wrapper");
        let chmod = Command::new("chmod")
            .args(["755", bin_dir.join("nft").to_str().expect("utf8")])
            .status()
            .expect("chmod");
        assert!(chmod.success());
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Self { control, path }
    }

    fn set(&self, what: &str, on: bool) {
        let f = self.control.join(what);
        if on {
            std::fs::write(f, "").expect("control file");
        } else {
            std::fs::remove_file(f).expect("control file");
        }
    }
}

/// Replaces plant-a's site with one whose `nft` is the wrapper; waits until it is online.
fn restart_site_a_with(sys: &mut System, nft: &SlowNft) {
    let idx = sys
        .lab
        .procs
        .iter()
        .position(|p| p.log.ends_with("plant-a.log"))
        .expect("plant-a process");
    sys.lab.procs[idx].terminate();
    let dir = sys.lab.dir.clone();
    let config = dir.join("plant-a.toml");
    let state = dir.join("plant-a-state");
    let last = sys.lab.spawn(
        "site",
        &bin("pinhole-site"),
        &[
            "run",
            "--config",
            config.to_str().expect("utf8"),
            "--state",
            state.to_str().expect("utf8"),
        ],
        &[("PATH", &nft.path)],
        "plant-a-slow-nft.log",
    );
    let log = sys.lab.procs[last].log.clone();
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("connected to the gateway")
                .count()
                >= 1
        }),
        "the site did not come back: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Counts, in the plant, the UDP datagrams that reach the PLC's port 161.
fn count_plc_udp(lab: &Lab) {
    lab.nft(
        "plant",
        "table inet probe {\n  counter plc_udp {}\n  chain input {\n    type filter hook input priority 0; policy accept;\n    ip daddr 192.168.0.10 udp dport 161 counter name plc_udp\n  }\n}\n",
    );
}

fn plc_udp_packets(lab: &Lab) -> u64 {
    let out = lab.exec(
        "plant",
        &["nft", "list", "counter", "inet", "probe", "plc_udp"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {listing}"))
}

/// Sends one datagram to the PLC's UDP 161 from `ns` and waits up to `timeout` s for the echo;
/// prints `OK <reply>` or `TIMEOUT`.
fn udp_probe(lab: &Lab, ns: &str, payload: &str, timeout: f64) -> Child {
    let code = format!(
        "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.settimeout({timeout})\nu.sendto(b'{payload}',('{PLC}',161))\ntry:\n    print('OK', u.recvfrom(100)[0].decode(), flush=True)\nexcept socket.timeout:\n    print('TIMEOUT', flush=True)\n"
    );
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(ns),
            "/usr/bin/python3",
            "-c",
            &code,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("probe")
}

fn finished(probe: &mut Child) -> bool {
    probe.try_wait().expect("probe").is_some()
}

fn probe_output(probe: Child) -> String {
    let out = probe.wait_with_output().expect("probe");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Bytes the technician's daemon received from plant-a's tunnel (a WireGuard handshake
/// response is 92).
fn bytes_in(alice: &Technician) -> u64 {
    alice.status()["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["site"] == "plant-a"))
        .and_then(|s| s["bytes_in"].as_u64())
        .unwrap_or(0)
}

fn connected(alice: &Technician) -> bool {
    alice.status()["sessions"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["site"] == "plant-a"))
}

#[test]
#[ignore = "needs root"]
fn device_packets_wait_for_the_table_and_the_handshake_does_not() {
    let dir = tempfile::tempdir().expect("dir");
    let nft = SlowNft::new(dir.path());
    let mut sys = System::start(dir.path());
    restart_site_a_with(&mut sys, &nft);
    count_plc_udp(&sys.lab);
    let alice = sys.technician("tech", "alice", "acme");

    nft.set("hold", true);
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    let mut probe = udp_probe(&sys.lab, "tech", "first", 20.0);
    // The handshake completes while the table's load waits.
    assert!(
        wait_until(Duration::from_secs(10), || bytes_in(&alice) >= 92),
        "no handshake response while the table loads: {}",
        alice.status()
    );
    // The datagram went through the tunnel (the handshake was done), and waits at the site:
    // nothing reaches the device before the table allows it.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        plc_udp_packets(&sys.lab),
        0,
        "a packet passed before the table"
    );
    assert!(
        !finished(&mut probe),
        "answered before the table was loaded"
    );

    // Once loaded, the held datagram goes on and is answered.
    nft.set("hold", false);
    assert_eq!(probe_output(probe), "OK UDP first");
    assert_eq!(plc_udp_packets(&sys.lab), 1);
    assert_eq!(sys.lab.udp_echo("tech", PLC, 161), "UDP ping");
    assert!(sys.lab.tcp_open("tech", PLC, 102));
}

#[test]
#[ignore = "needs root"]
fn a_table_that_fails_to_load_ends_the_session_and_nothing_reaches_the_device() {
    let dir = tempfile::tempdir().expect("dir");
    let nft = SlowNft::new(dir.path());
    let mut sys = System::start(dir.path());
    restart_site_a_with(&mut sys, &nft);
    count_plc_udp(&sys.lab);
    let alice = sys.technician("tech", "alice", "acme");

    nft.set("hold", true);
    nft.set("fail", true);
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    let mut probe = udp_probe(&sys.lab, "tech", "first", 6.0);
    assert!(
        wait_until(Duration::from_secs(10), || bytes_in(&alice) >= 92),
        "no handshake response while the table loads: {}",
        alice.status()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!finished(&mut probe));

    // The load fails: the session ends, and what it held never reaches the device.
    nft.set("hold", false);
    assert!(
        wait_until(Duration::from_secs(10), || !connected(&alice)),
        "the session outlived its failed table: {}",
        alice.status()
    );
    let ended = alice.status()["ended"].to_string();
    assert!(ended.contains("firewall table"), "{ended}");
    assert_eq!(probe_output(probe), "TIMEOUT");
    assert_eq!(plc_udp_packets(&sys.lab), 0, "a held packet passed");
    let log = std::fs::read_to_string(dir.path().join("plant-a-slow-nft.log")).unwrap_or_default();
    assert!(log.contains("did not load"), "{log}");

    // nft works again: the site restores its table, and a new session works.
    nft.set("fail", false);
    std::thread::sleep(Duration::from_secs(2));
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert_eq!(sys.lab.udp_echo("tech", PLC, 161), "UDP ping");
    assert_eq!(plc_udp_packets(&sys.lab), 1);
}
