//! The admin portal end to end: the real gateway binary and a real headless Chromium
//! (tests/portal_e2e.py, Selenium over chromedriver): first login with the password change
//! and TOTP enrollment, a domain, an account and its bundle, a grant, closing the account,
//! each step in the audit log. The bundle the browser downloaded is checked with openssl.
//!
//! Needs Debian's chromium, chromium-driver and python3-selenium (`tests/run` installs them).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Gateway, Proc, bin, free_port, text, wait_until};

#[test]
#[ignore = "needs chromium, chromium-driver and python3-selenium"]
fn an_administrator_logs_in_with_totp_and_closes_an_account_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let gw = Gateway::init(dir.path(), "gw", port);
    // `init` printed the one-time password; a reset gives one we can read here.
    let out = gw.ok(&["admin", "reset", "admin"]);
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("one-time password (shown once, change it at first login): "))
        .expect("one-time password")
        .trim()
        .to_owned();
    let admin_port = free_port();
    let _server = Proc::spawn(
        Command::new(bin("pinhole-gateway"))
            .arg("--state")
            .arg(&gw.state)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .env("RUST_LOG", "info"),
        dir.path().join("gateway.log"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            admin_port
        ))
        .is_ok()),
        "the portal did not start"
    );
    let downloads = dir.path().join("downloads");
    std::fs::create_dir(&downloads).expect("downloads");
    // README's screenshots: `PINHOLE_PORTAL_SCREENSHOTS=docs/portal tests/run --test portal`
    // refreshes them; otherwise they stay in the test's directory.
    let shots = std::env::var_os("PINHOLE_PORTAL_SCREENSHOTS")
        .map(|d| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(d))
        .unwrap_or_else(|| dir.path().join("screenshots"));
    std::fs::create_dir_all(&shots).expect("screenshots");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/portal_e2e.py");
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .env("PORTAL_URL", format!("https://127.0.0.1:{admin_port}"))
        .env("ADMIN_PASSWORD", &password)
        .env("DOWNLOADS", &downloads)
        .env("SCREENSHOTS", &shots)
        .env("PROFILE", dir.path().join("chromium-profile"))
        .output()
        .expect("python3");
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "browser: {}\ngateway log:\n{log}",
        text(&out)
    );

    // The bundle the browser downloaded opens with the password the page showed.
    let p12 = downloads.join("tech1.p12");
    let pw = downloads.join("tech1.pw");
    let check = Command::new("openssl")
        .args(["pkcs12", "-in"])
        .arg(&p12)
        .arg("-passin")
        .arg(format!("file:{}", pw.display()))
        .args(["-nokeys", "-clcerts"])
        .output()
        .expect("openssl");
    assert!(check.status.success(), "bundle: {}", text(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("tech1"));

    let accounts: serde_json::Value =
        serde_json::from_str(&gw.ok(&["accounts", "--json"])).expect("json");
    assert!(accounts[0]["closed"].is_string(), "{accounts}");
    let events = gw.audit_events();
    for e in [
        "admin password changed | admin:admin",
        "admin TOTP enrolled | admin:admin",
        "admin login | admin:admin",
        "account created | admin:admin",
        "grant changed | admin:admin",
        "account closed | admin:admin",
    ] {
        assert!(events.iter().any(|x| x.starts_with(e)), "{e}: {events:#?}");
    }
}
