//! The gateway with its CA key in a separate signer (`pinhole-gateway signer`), end to end with
//! the real binaries on loopback: `serve --signer` holds no CA key, yet a site enrolls and a
//! technician whose bundle `account create` made through the signer logs in.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Client, Gateway, PLC_AGENT, Proc, Site, bin, free_port, wait_until};

const T: Duration = Duration::from_secs(30);

#[test]
fn a_gateway_without_the_ca_key_enrolls_a_site_and_logs_a_technician_in() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);

    // The CA key moves to the signer's directory, as the package's move-ca-key does.
    let ca = dir.path().join("ca");
    std::fs::create_dir(&ca).expect("ca dir");
    std::fs::rename(gw.state.join("ca.key"), ca.join("ca.key")).expect("move ca.key");
    std::fs::copy(gw.state.join("ca.crt"), ca.join("ca.crt")).expect("copy ca.crt");
    let socket = dir.path().join("signer.sock");
    let _signer = Proc::spawn(
        Command::new(bin("pinhole-gateway"))
            .args(["signer", "--ca-state"])
            .arg(&ca)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "info"),
        dir.path().join("signer.log"),
    );
    assert!(wait_until(T, || socket.exists()), "signer did not start");
    let signer_arg = socket.to_str().expect("utf8");

    // Without the key and without a signer, the gateway says what is missing.
    let out = gw.cli(&["account", "create", "nobody", "--out", "/nonexistent/x.p12"]);
    assert!(!out.status.success());

    gw.ok(&["domain", "create", "acme"]);
    let token = gw.token("acme");
    let log = dir.path().join("gateway.log");
    gw.proc = Some(Proc::spawn(
        Command::new(bin("pinhole-gateway"))
            .arg("--state")
            .arg(&gw.state)
            .args(["--signer", signer_arg, "serve"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info"),
        log,
    ));
    assert!(
        wait_until(T, || std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok()),
        "gateway did not start: {}",
        gw.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    );
    assert!(!gw.state.join("ca.key").exists());

    let mut site = Site::new(dir.path(), "plant-a", port, &token, PLC_AGENT);
    site.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "site did not enroll: {}\n{}",
        site.log(),
        gw.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    );

    let pw = dir.path().join("gina.pw");
    std::fs::write(&pw, "pw-of-gina\n").expect("pw");
    let p12 = dir.path().join("gina.p12");
    gw.ok(&[
        "--signer",
        signer_arg,
        "account",
        "create",
        "gina",
        "--out",
        p12.to_str().expect("utf8"),
        "--password-file",
        pw.to_str().expect("utf8"),
    ]);
    gw.ok(&["grant", "gina", "acme"]);
    let client = Client::start(dir.path(), "gina");
    client.import_and_login(&p12, &pw);
    assert!(
        wait_until(T, || client.status()["state"] == "logged-in"),
        "{}",
        client.status()
    );

    let issued = std::fs::read_to_string(ca.join("issued.log")).expect("issued.log");
    assert!(issued.contains(" site plant-a serial="), "{issued}");
    assert!(issued.contains(" technician gina serial="), "{issued}");
    assert!(!gw.state.join("ca.key").exists());
}
