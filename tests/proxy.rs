//! Corporate networks, in network namespaces with the real kernel: the office and plant
//! networks reach the gateway only through Debian's squid (CONNECT to the gateway's port only,
//! Basic authentication from an htpasswd file); the direct path is dropped on the WAN router.
//! Both sites enroll and stay connected through it, and a technician whose daemon uses it
//! connects to a device. A TLS-inspecting proxy (its own certificate inside the CONNECT) is
//! refused with a message that names the interception. Root only; tests/run installs squid.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::{Lab, Options, System};
use common::{text, wait_until};

const USER: &str = "plant-proxy";
const PASSWORD: &str = "proxy secret 7";

/// A proxy that answers every CONNECT with 200 and then speaks TLS itself, with a certificate
/// of its own: what a TLS-inspecting proxy does.
const INTERCEPTOR: &str = r#"
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], 3129)); l.listen(16)
def serve(c):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(1024)
            if not d: return
            head += d
        c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        t = ctx.wrap_socket(c, server_side=True)
        t.recv(100)
    except Exception:
        pass
    finally:
        c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// squid on the WAN router (on its addresses towards the sites and the technicians), allowing
/// CONNECT to the gateway's 443 only, for USER; the direct path to the gateway is dropped.
fn corporate_network(lab: &Lab) -> std::process::Child {
    let dir = &lab.dir;
    // squid and its helper run as the `proxy` user: they must read their files.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let hash = Command::new("openssl")
        .args(["passwd", "-apr1", PASSWORD])
        .output()
        .expect("openssl passwd");
    std::fs::write(
        dir.join("htpasswd"),
        format!("{USER}:{}\n", String::from_utf8_lossy(&hash.stdout).trim()),
    )
    .expect("htpasswd");
    std::fs::write(dir.join("squid-cache.log"), "").expect("log");
    std::fs::write(dir.join("squid-access.log"), "").expect("log");
    for f in ["squid-cache.log", "squid-access.log"] {
        let _ = Command::new("chown").arg("proxy").arg(dir.join(f)).status();
    }
    let conf = format!(
        "http_port 10.9.0.1:3128\n\
         pid_filename none\ncache deny all\nshutdown_lifetime 0 seconds\n\
         access_log stdio:{access}\ncache_log {cache}\n\
         auth_param basic program /usr/lib/squid/basic_ncsa_auth {htpasswd}\n\
         auth_param basic realm corp\n\
         acl gateway dst 10.9.2.2\nacl gateway_port port 443\nacl authed proxy_auth REQUIRED\n\
         http_access deny !CONNECT\nhttp_access deny !gateway\nhttp_access deny !gateway_port\n\
         http_access allow authed\nhttp_access deny all\n",
        access = dir.join("squid-access.log").display(),
        cache = dir.join("squid-cache.log").display(),
        htpasswd = dir.join("htpasswd").display(),
    );
    std::fs::write(dir.join("squid.conf"), conf).expect("squid.conf");
    // The proxy's address: on the router, reached by every site and technician.
    lab.exec("wan", &["ip", "addr", "add", "10.9.0.1/32", "dev", "lo"]);
    let squid = Command::new("ip")
        .args(["netns", "exec", &lab.ns("wan"), "squid", "-N", "-f"])
        .arg(dir.join("squid.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("squid");
    assert!(
        wait_until(Duration::from_secs(20), || {
            lab.exec("wan", &["ss", "-ltn"])
                .stdout
                .windows(14)
                .any(|w| w == b"10.9.0.1:3128 ")
        }),
        "squid did not start: {}",
        std::fs::read_to_string(dir.join("squid-cache.log")).unwrap_or_default()
    );
    // No direct path: whatever the router forwards to the gateway's ports is dropped; squid's
    // own connections leave the router itself and are not forwarded.
    lab.nft(
        "wan",
        "table inet corp {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    ip daddr 10.9.2.2 tcp dport { 443, 11444 } counter drop\n  }\n}\n",
    );
    credentials(dir, "proxy.cred", PASSWORD);
    squid
}

fn credentials(dir: &Path, name: &str, password: &str) {
    let p = dir.join(name);
    std::fs::write(&p, format!("{USER}\n{password}\n")).expect("credentials");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// The sites' `[proxy]`: the router's address on each site's own link.
fn site_proxy(dir: &Path) -> Options {
    Options {
        site_config: format!(
            "[proxy]\nurl = \"http://10.9.0.1:3128\"\nauth = \"basic\"\ncredentials = \"{}\"\n",
            dir.join("proxy.cred").display()
        ),
        ..Options::default()
    }
}

#[test]
#[ignore = "needs root"]
fn sites_and_technicians_reach_the_gateway_through_squid_and_an_interceptor_is_named() {
    let dir = tempfile::tempdir().expect("dir");
    let mut squid = None;
    let mut sys = System::start_with(dir.path(), &site_proxy(dir.path()), |lab| {
        squid = Some(corporate_network(lab));
        for ns in ["site", "siteb", "tech", "tech2"] {
            let gw = match ns {
                "site" => "10.9.3.1",
                "siteb" => "10.9.5.1",
                "tech" => "10.9.1.1",
                _ => "10.9.4.1",
            };
            lab.exec(ns, &["ip", "route", "replace", "10.9.0.1/32", "via", gw]);
        }
    });
    // Both sites came online (start_with waits for it) with the direct path dropped: through
    // squid, authenticated.
    let access = sys.log("squid-access.log");
    assert!(
        access.contains("CONNECT 10.9.2.2:443") && access.contains(USER),
        "{access}"
    );
    assert!(
        !sys.lab.tcp_open("site", "10.9.2.2", 443),
        "the direct path must be closed"
    );

    // A technician through the proxy: login, connect, traffic.
    let cred = dir.path().join("proxy.cred");
    let alice = sys.enlist(
        "tech",
        "alice",
        "acme",
        &[
            "--proxy",
            "http://10.9.0.1:3128",
            "--proxy-auth",
            "basic",
            "--proxy-credentials",
            cred.to_str().expect("utf8"),
        ],
    );
    alice.ok(&["login", "--password-file", alice.pw.to_str().expect("utf8")]);
    alice.ok(&["connect", "plant-a/press-4-plc"]);
    assert!(
        wait_until(Duration::from_secs(5), || sys.lab.udp_echo(
            "tech",
            "192.168.0.10",
            161
        ) == "UDP ping"),
        "{}",
        alice.status()
    );

    // Wrong credentials: refused at once, in words, and the password is nowhere in them.
    credentials(dir.path(), "wrong.cred", "not the password");
    let wrong = dir.path().join("wrong.cred");
    let bob = sys.enlist(
        "tech2",
        "bob",
        "acme",
        &[
            "--proxy",
            "http://10.9.0.1:3128",
            "--proxy-auth",
            "basic",
            "--proxy-credentials",
            wrong.to_str().expect("utf8"),
        ],
    );
    let out = bob.cli(&["login", "--password-file", bob.pw.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("refused the basic credentials"), "{said}");
    assert!(!said.contains("not the password"), "{said}");

    // A TLS-inspecting proxy: refused, named, never trusted.
    let (cert, key) = (dir.path().join("mitm.crt"), dir.path().join("mitm.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=corp-inspection",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", text(&made));
    std::fs::write(dir.path().join("mitm.py"), INTERCEPTOR).expect("mitm.py");
    let mitm = dir.path().join("mitm.py");
    sys.lab.spawn(
        "wan",
        Path::new("/usr/bin/python3"),
        &[
            mitm.to_str().expect("utf8"),
            "10.9.0.1",
            cert.to_str().expect("utf8"),
            key.to_str().expect("utf8"),
        ],
        &[],
        "mitm.log",
    );
    std::thread::sleep(Duration::from_millis(500));
    let carol = sys.enlist(
        "tech2",
        "carol",
        "acme",
        &["--proxy", "http://10.9.0.1:3129"],
    );
    let out = carol.cli(&["login", "--password-file", carol.pw.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("intercepts TLS"), "{said}");
    drop(sys);
    if let Some(mut squid) = squid {
        let _ = squid.kill();
        let _ = squid.wait();
    }
}
