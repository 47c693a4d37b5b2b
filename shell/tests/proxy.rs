//! The CONNECT tunnel through a real proxy: Debian's squid, with Basic authentication (an
//! htpasswd file read by squid's own `basic_ncsa_auth`) and NTLM (squid's NTLM helper protocol
//! answered by a small helper that checks NTLMv2 responses against the right password), CONNECT
//! allowed to one port only. Run by tests/run (which installs squid).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pinhole_shell::proxy::{self, Auth, Credentials, Proxy, ProxyError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

/// squid's NTLM helper protocol (YR → TT challenge, KK → AF user | NA reason), checking the
/// NTLMv2 proof ([MS-NLMP] 3.3.2) against the NT hash given as the first argument.
const NTLM_HELPER: &str = r#"
import base64, hmac, os, struct, sys
nthash = bytes.fromhex(sys.argv[1])
challenge = b""
def utf16(s): return s.encode("utf-16-le")
def field(msg, at):
    n, _, off = struct.unpack_from("<HHI", msg, at)
    return msg[off:off + n]
for line in sys.stdin:
    kind, _, data = line.strip().partition(" ")
    try:
        msg = base64.b64decode(data)
        assert msg[:8] == b"NTLMSSP\0"
        if kind == "YR":
            challenge = os.urandom(8)
            name = utf16("TEST")
            info = struct.pack("<HH", 2, len(name)) + name + struct.pack("<HH", 0, 0)
            flags = 0x00000001 | 0x00000200 | 0x00008000 | 0x00080000 | 0x00800000 | 0x00010000
            head = b"NTLMSSP\0" + struct.pack("<I", 2)
            head += struct.pack("<HHI", len(name), len(name), 56)
            head += struct.pack("<I", flags) + challenge + b"\0" * 8
            head += struct.pack("<HHI", len(info), len(info), 56 + len(name))
            head += b"\0" * 8
            print("TT " + base64.b64encode(head + name + info).decode(), flush=True)
        elif kind == "KK":
            assert struct.unpack_from("<I", msg, 8)[0] == 3
            nt = field(msg, 20)
            domain = field(msg, 28).decode("utf-16-le")
            user = field(msg, 36).decode("utf-16-le")
            key = hmac.new(nthash, utf16(user.upper() + domain), "md5").digest()
            proof = hmac.new(key, challenge + nt[16:], "md5").digest()
            if len(nt) > 16 and hmac.compare_digest(proof, nt[:16]) and user == "alice":
                print("AF " + user, flush=True)
            else:
                print("NA wrong password", flush=True)
        else:
            print("BH unexpected " + kind, flush=True)
    except Exception as e:
        print("BH " + type(e).__name__, flush=True)
"#;

struct Squid {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts squid on a free port of 127.0.0.1 that allows CONNECT to `allowed` only, for users
/// authenticated by `auth` ("basic" or "ntlm").
fn squid(dir: &Path, auth: &str, allowed: u16) -> Squid {
    use std::os::unix::fs::PermissionsExt as _;
    // squid drops to its `proxy` user: its helpers must read their files.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let port = free_port();
    let auth_conf = match auth {
        "basic" => {
            let hash = Command::new("openssl")
                .args(["passwd", "-apr1", PASSWORD])
                .output()
                .expect("openssl passwd");
            let line = format!("{USER}:{}", String::from_utf8_lossy(&hash.stdout).trim());
            std::fs::write(dir.join("htpasswd"), line + "\n").expect("htpasswd");
            format!(
                "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\nauth_param basic realm pinhole-test\n",
                dir.join("htpasswd").display()
            )
        }
        _ => {
            std::fs::write(dir.join("ntlm.py"), NTLM_HELPER).expect("helper");
            let nthash = hex(&ntlmclient::ntlm_v1_password_func(PASSWORD));
            format!(
                "auth_param ntlm program /usr/bin/python3 {} {nthash}\nauth_param ntlm children 2 startup=1 idle=1\n",
                dir.join("ntlm.py").display()
            )
        }
    };
    let conf = format!(
        "http_port 127.0.0.1:{port}\n\
         pid_filename none\n\
         cache deny all\n\
         access_log none\n\
         cache_log {log}\n\
         shutdown_lifetime 0 seconds\n\
         {auth_conf}\
         acl gateway port {allowed}\n\
         acl authed proxy_auth REQUIRED\n\
         http_access deny !CONNECT\n\
         http_access deny !gateway\n\
         http_access allow authed\n\
         http_access deny all\n",
        log = dir.join("cache.log").display()
    );
    std::fs::write(dir.join("squid.conf"), conf).expect("conf");
    let _ = std::fs::File::create(dir.join("cache.log"));
    let _ = Command::new("chown")
        .args(["proxy", &dir.join("cache.log").display().to_string()])
        .status();
    let child = Command::new("squid")
        .args(["-N", "-f"])
        .arg(dir.join("squid.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("squid");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "squid did not start: {}",
            std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Squid {
        child,
        port,
        dir: dir.to_owned(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A TCP service standing in for the gateway: answers "hello" and echoes a line.
fn service() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().expect("clone");
                let _ = w.write_all(b"hello\n");
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
                let _ = w.write_all(line.as_bytes());
            });
        }
    });
    port
}

fn credentials(dir: &Path, user: &str, password: &str) -> Credentials {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(format!("cred-{user}"));
    std::fs::write(&p, format!("{user}\n{password}\n")).expect("cred");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    Credentials::from_file(&p).expect("credentials")
}

fn proxy_for(s: &Squid, auth: Auth, creds: Option<Credentials>) -> Proxy {
    Proxy {
        host: "127.0.0.1".into(),
        port: s.port,
        auth,
        credentials: creds,
    }
}

async fn tunnel(p: &Proxy, target: u16) -> Result<String, ProxyError> {
    let mut s = proxy::connect(p, &format!("127.0.0.1:{target}"), Duration::from_secs(10)).await?;
    s.write_all(b"through\n").await?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 64];
        while !got.ends_with(b"through\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    Ok(String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
#[ignore = "needs squid (tests/run installs it)"]
async fn basic_authentication_through_squid() {
    let dir = tempfile::tempdir().expect("dir");
    let target = service();
    let s = squid(dir.path(), "basic", target);

    let right = proxy_for(&s, Auth::Basic, Some(credentials(&s.dir, USER, PASSWORD)));
    assert_eq!(
        tunnel(&right, target).await.expect("tunnel"),
        "hello\nthrough\n"
    );

    let wrong = proxy_for(&s, Auth::Basic, Some(credentials(&s.dir, USER, "wrong")));
    let e = tunnel(&wrong, target).await.expect_err("wrong password");
    assert!(matches!(e, ProxyError::BadCredentials { .. }), "{e}");
    assert!(e.to_string().contains("407"), "{e}");

    let none = proxy_for(&s, Auth::None, None);
    let e = tunnel(&none, target).await.expect_err("no credentials");
    assert!(matches!(e, ProxyError::AuthRequired { .. }), "{e}");
    assert!(e.to_string().contains("Basic"), "{e}");

    // NTLM offered to a proxy that only knows Basic: named as unsupported by the proxy.
    let ntlm = proxy_for(&s, Auth::Ntlm, Some(credentials(&s.dir, USER, PASSWORD)));
    let e = tunnel(&ntlm, target).await.expect_err("ntlm to basic");
    assert!(matches!(e, ProxyError::Unsupported { .. }), "{e}");

    // CONNECT to another port: the proxy's refusal, with its status.
    let e = tunnel(&right, free_port()).await.expect_err("other port");
    assert!(matches!(e, ProxyError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("403"), "{e}");
    // The password is in no message.
    assert!(!e.to_string().contains(PASSWORD));
}

#[tokio::test]
#[ignore = "needs squid (tests/run installs it)"]
async fn ntlm_authentication_through_squid() {
    let dir = tempfile::tempdir().expect("dir");
    let target = service();
    let s = squid(dir.path(), "ntlm", target);

    let right = proxy_for(
        &s,
        Auth::Ntlm,
        Some(credentials(&s.dir, &format!("CORP\\{USER}"), PASSWORD)),
    );
    assert_eq!(
        tunnel(&right, target).await.expect("tunnel"),
        "hello\nthrough\n"
    );

    let wrong = proxy_for(&s, Auth::Ntlm, Some(credentials(&s.dir, USER, "wrong")));
    let e = tunnel(&wrong, target).await.expect_err("wrong password");
    assert!(matches!(e, ProxyError::BadCredentials { .. }), "{e}");

    // Basic offered to an NTLM-only proxy: unsupported by the proxy, named.
    let basic = proxy_for(&s, Auth::Basic, Some(credentials(&s.dir, USER, PASSWORD)));
    let e = tunnel(&basic, target).await.expect_err("basic to ntlm");
    assert!(matches!(e, ProxyError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("NTLM"), "{e}");
}

#[tokio::test]
async fn a_proxy_that_answers_garbage_too_much_or_never_ends_is_refused_in_bounded_time() {
    for answer in [
        b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
        [b"HTTP/1.1 200 OK\r\nX: ".to_vec(), vec![b'a'; 100_000]].concat(),
        b"HTTP/1.1 200 OK\r\nno end".to_vec(),
    ] {
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&answer).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let p = Proxy {
            host: "127.0.0.1".into(),
            port,
            auth: Auth::None,
            credentials: None,
        };
        let t = Instant::now();
        let e = proxy::connect(&p, "127.0.0.1:1", Duration::from_secs(3))
            .await
            .expect_err("garbage");
        // Garbage and oversize heads at once; a head that never ends at the exchange's timeout.
        assert!(
            matches!(e, ProxyError::Malformed(_) | ProxyError::Timeout { .. }),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    }
}
