//! The CA signer as a real process (`pinhole-gateway signer`) on a real Unix socket: what the
//! gateway asks of it through [`pinhole_gateway::signer`], and what it refuses from a caller it
//! must not trust (oversized, malformed, bad names and keys, too many, the wrong uid). A
//! refused request issues nothing: the signer's `issued.log` does not change.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinhole_certs::{Bundle, GatewayInfo, PeerIdentity, Role};
use pinhole_gateway::hub::Issuer;
use pinhole_gateway::portal::BundleIssuer;
use pinhole_gateway::signer::{BundleMaker, Ca, MAX_FRAME, SiteIssuer};
use pinhole_gateway::state::StateDir;

/// An initialized gateway state whose CA key was moved to a signer's directory, and the signer.
struct World {
    dir: tempfile::TempDir,
    signer: Child,
}

impl World {
    fn start(per_minute: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_pinhole-gateway"))
            .arg("--state")
            .arg(dir.path().join("gw"))
            .args(["init", "--public-address", "gw.example.com:443"])
            .env("PINHOLE_SYSLOG_SOCKET", dir.path().join("no-syslog"))
            .output()
            .expect("init");
        assert!(out.status.success(), "init: {out:?}");
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).expect("ca dir");
        std::fs::rename(dir.path().join("gw/ca.key"), ca.join("ca.key")).expect("move key");
        std::fs::copy(dir.path().join("gw/ca.crt"), ca.join("ca.crt")).expect("copy crt");
        let signer = Command::new(env!("CARGO_BIN_EXE_pinhole-gateway"))
            .args(["signer", "--ca-state"])
            .arg(&ca)
            .arg("--socket")
            .arg(dir.path().join("signer.sock"))
            .args(["--per-minute", &per_minute.to_string()])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(dir.path().join("signer.log")).expect("log"))
            .spawn()
            .expect("signer");
        let w = Self { dir, signer };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(w.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "signer did not start: {}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("signer.sock")
    }

    fn state(&self) -> StateDir {
        StateDir::new(self.dir.path().join("gw"))
    }

    fn issued(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca/issued.log")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("signer.log")).unwrap_or_default()
    }

    /// The gateway's view: `open` with --signer.
    fn ca(&self) -> (Arc<Ca>, GatewayInfo) {
        let state = self.state();
        let mut loaded = state.load().expect("load");
        assert!(loaded.ca.is_none(), "the gateway state must hold no key");
        let ca = pinhole_gateway::signer::open(&state, &mut loaded, Some(&self.socket()))
            .expect("open the signer");
        let info = GatewayInfo::new(loaded.addresses, loaded.pin).expect("info");
        (Arc::new(ca), info)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.signer.kill();
        let _ = self.signer.wait();
    }
}

/// Sends raw bytes; returns the answer's JSON, or None when the signer closed without one.
fn raw(socket: &Path, bytes: &[u8]) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(serde_json::from_slice(&body).expect("json answer"))
}

fn framed(json: &str) -> Vec<u8> {
    let mut v = (json.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v
}

fn error_of(answer: Option<serde_json::Value>) -> String {
    let a = answer.expect("an answer");
    a["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {a}"))
        .to_owned()
}

#[test]
fn the_gateway_gets_site_certificates_and_portal_bundles_from_the_signer() {
    let w = World::start(30);
    assert!(!w.dir.path().join("gw/ca.key").exists());
    let (ca, info) = w.ca();
    assert!(matches!(*ca, Ca::Signer { .. }));

    // Enrollment: a site certificate for the site's own key, as the hub asks for it.
    let (_, spki) = pinhole_certs::ca::generate_site_key().expect("key");
    let issuer = SiteIssuer::new(ca.clone());
    let issued = issuer
        .issue_site("plant-a", &spki)
        .expect("site certificate");
    let site = PeerIdentity::from_certificate(&issued.certificate).expect("parse");
    assert_eq!((site.role, site.name.as_str()), (Role::Site, "plant-a"));
    assert_eq!(issued.serial, site.serial);
    assert_eq!(issuer.ca_certificate(), ca.certificate().as_ref());

    // The portal: a technician bundle whose key never left this process.
    let bundles = BundleMaker::new(ca.clone(), info.clone());
    let b = bundles.issue("alice", 30).expect("bundle");
    let bundle = Bundle::from_pkcs12(&b.p12, &b.password).expect("open the bundle");
    let tech = PeerIdentity::from_certificate(bundle.identity().certificate()).expect("parse");
    assert_eq!((tech.role, tech.name.as_str()), (Role::Technician, "alice"));
    assert_eq!(tech.serial, b.serial);
    assert_eq!(
        GatewayInfo::from_certificate(bundle.identity().certificate()).expect("extension"),
        info
    );

    // The signer's own record names both, with their serials.
    let log = w.issued();
    assert!(
        log.contains(&format!(
            "site plant-a serial={}",
            hex::encode(&site.serial)
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "technician alice serial={}",
            hex::encode(&tech.serial)
        )),
        "{log}"
    );
    assert!(w.log().contains("certificate issued"), "{}", w.log());
}

#[test]
fn the_signer_refuses_bad_requests_and_issues_nothing() {
    let w = World::start(30);
    let socket = w.socket();
    let (_, spki) = pinhole_certs::ca::generate_site_key().expect("key");
    let key = hex::encode(&spki);

    // Oversized: refused on the length alone.
    let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    huge.extend(std::iter::repeat_n(b' ', 64));
    assert!(error_of(raw(&socket, &huge)).contains("at most"));
    // Garbage, an unknown operation, an unknown field.
    assert!(error_of(raw(&socket, &framed("{not json"))).contains("malformed"));
    assert!(
        error_of(raw(&socket, &framed(r#"{"op":"server","names":["x"]}"#))).contains("malformed")
    );
    let extra = format!(r#"{{"op":"site","name":"a","public_key":"{key}","ca":true}}"#);
    assert!(error_of(raw(&socket, &framed(&extra))).contains("malformed"));
    // Bad names.
    for name in ["", "plant a", "plant-\\u0007", &"x".repeat(65)] {
        let req = format!(r#"{{"op":"site","name":"{name}","public_key":"{key}"}}"#);
        error_of(raw(&socket, &framed(&req)));
    }
    // Bad keys: not hex, truncated, off the curve, another algorithm.
    let mut off_curve = spki.clone();
    *off_curve.last_mut().expect("byte") ^= 1;
    let mut rsa_oid = spki.clone();
    rsa_oid[12] = 0x02; // 1.2.840.10045.2.2 instead of id-ecPublicKey (…2.1)
    for k in [
        "zz".repeat(91),
        key[..100].to_owned(),
        hex::encode(&off_curve),
        hex::encode(&rsa_oid),
    ] {
        let req = format!(r#"{{"op":"site","name":"plant-a","public_key":"{k}"}}"#);
        assert!(error_of(raw(&socket, &framed(&req))).contains("public key"));
    }
    // Technician: validity and addresses bounded.
    let pin = w.state().load().expect("load").pin.to_string();
    for (days, addrs) in [
        (0, r#"["gw.example.com:443"]"#.to_owned()),
        (100_000, r#"["gw.example.com:443"]"#.to_owned()),
        (30, "[]".to_owned()),
        (
            30,
            format!("[{}]", vec![r#""gw.example.com:443""#; 17].join(",")),
        ),
        (30, r#"["no port"]"#.to_owned()),
    ] {
        let req = format!(
            r#"{{"op":"technician","account":"alice","public_key":"{key}","days":{days},"addresses":{addrs},"pin":"{pin}"}}"#
        );
        error_of(raw(&socket, &framed(&req)));
    }
    assert_eq!(w.issued(), "", "a refused request issued something");
    // The signer still serves after all that.
    let good = format!(r#"{{"op":"site","name":"plant-a","public_key":"{key}"}}"#);
    assert!(raw(&socket, &framed(&good)).expect("answer")["certificate"]["der"].is_string());
    assert_eq!(w.issued().lines().count(), 1);
}

#[test]
fn the_signer_issues_at_most_its_rate_a_minute() {
    let w = World::start(3);
    let (ca, _) = w.ca();
    let (_, spki) = pinhole_certs::ca::generate_site_key().expect("key");
    for i in 0..3 {
        ca.issue_site(&format!("plant-{i}"), &spki)
            .expect("within the rate");
    }
    let e = ca.issue_site("plant-3", &spki).expect_err("over the rate");
    assert!(e.to_string().contains("rate limit"), "{e}");
    assert_eq!(w.issued().lines().count(), 3);
    // Asking for the CA certificate is not issuing.
    ca.issue_site("plant-3", &spki)
        .expect_err("still over the rate");
    w.ca();
}

#[test]
fn a_gateway_whose_ca_crt_differs_from_the_signers_is_refused() {
    let w = World::start(30);
    let other = pinhole_certs::CertificateAuthority::generate("other").expect("ca");
    std::fs::write(w.dir.path().join("gw/ca.crt"), other.cert_pem()).expect("swap ca.crt");
    let state = w.state();
    // The server certificate no longer chains to ca.crt, but load() does not check that: the
    // signer check must catch the mismatch.
    let mut loaded = state.load().expect("load");
    let e = pinhole_gateway::signer::open(&state, &mut loaded, Some(&w.socket()))
        .expect_err("another CA");
    assert!(e.to_string().contains("another CA"), "{e}");
}

#[test]
fn a_gateway_told_to_use_a_signer_refuses_to_hold_the_ca_key() {
    let w = World::start(30);
    // The key is back in the gateway's directory (a restored backup, a second `init`).
    std::fs::copy(
        w.dir.path().join("ca/ca.key"),
        w.dir.path().join("gw/ca.key"),
    )
    .expect("copy key back");
    let state = w.state();
    let mut loaded = state.load().expect("load");
    let e = pinhole_gateway::signer::open(&state, &mut loaded, Some(&w.socket()))
        .expect_err("ca.key beside a signer");
    assert!(
        e.to_string().contains("still in the gateway's state"),
        "{e}"
    );
    assert!(loaded.ca.is_none(), "the key was dropped, not kept");
}

/// Only with root: a caller whose uid is not allowed is refused, even with the socket open to
/// it, and nothing is issued.
#[test]
fn a_caller_with_another_uid_is_refused() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a client as another uid (setpriv)");
        return;
    }
    let w = World::start(30);
    // Open the way to the socket for everyone: SO_PEERCRED alone must refuse.
    for p in [w.dir.path().to_owned(), w.socket()] {
        use std::os::unix::fs::PermissionsExt;
        let mode = if p == w.socket() { 0o666 } else { 0o755 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let (_, spki) = pinhole_certs::ca::generate_site_key().expect("key");
    let req = framed(&format!(
        r#"{{"op":"site","name":"plant-a","public_key":"{}"}}"#,
        hex::encode(&spki)
    ));
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(bytes.fromhex(sys.argv[2]))\nd=b''\nwhile True:\n    c=s.recv(4096)\n    if not c: break\n    d+=c\nsys.stdout.write(d[4:].decode())\n";
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(w.socket())
        .arg(hex::encode(&req))
        .output()
        .expect("setpriv");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("permission denied: uid 65534"),
        "answer: {answer}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.issued(), "");
}

#[test]
fn a_stuck_signer_costs_the_gateway_at_most_the_call_timeout() {
    // The hub asks for a site certificate while holding its decision lock: a signer that
    // accepts and never answers (here, stopped with SIGSTOP: the kernel still queues the
    // connection) must not hold every other link's decisions for long.
    let w = World::start(30);
    let (ca, _) = w.ca();
    let issuer = SiteIssuer::new(ca);
    let (_, spki) = pinhole_certs::ca::generate_site_key().expect("key");
    let stop = Command::new("kill")
        .args(["-STOP", &w.signer.id().to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    let start = Instant::now();
    let result = issuer.issue_site("plant-a", &spki);
    let took = start.elapsed();
    let _ = Command::new("kill")
        .args(["-CONT", &w.signer.id().to_string()])
        .status();
    let e = result.expect_err("a stopped signer issued a certificate");
    assert!(e.contains("CA signer"), "{e}");
    // Given up after the timeout (not at once: the stopped signer did take the connection),
    // and within a few seconds: before, a caller waited 10 s for each read.
    let limit = pinhole_gateway::signer::CALL_TIMEOUT;
    assert!(took >= limit, "gave up after {took:?}, before {limit:?}");
    assert!(
        took < Duration::from_secs(4),
        "a stopped signer held the caller {took:?}"
    );
}
