//! The gateway against hostile peers, from outside, with the real binary: anonymous floods,
//! oversized fields and connections that never finish a handshake must neither fill the disk
//! nor lock out the legitimate sites and technicians.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Gateway, PLC_AGENT, Site, free_port, wait_until};

const T: Duration = Duration::from_secs(20);

/// An anonymous TLS link, as a site that enrolls would open it.
fn anonymous(port: u16) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let config =
        pinhole_certs::tls::enrollment_client_config(pinhole_certs::danger::AcceptAnyServer::new())
            .expect("config");
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().expect("name"))
            .expect("conn");
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("tcp");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

fn control_frame(json: &[u8]) -> Vec<u8> {
    let mut out = vec![1, 1];
    out.extend_from_slice(&u32::try_from(json.len()).expect("len").to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// Sends one frame and reads until the gateway closes; returns what it said.
fn send_and_drain(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    frame: &[u8],
) -> String {
    let _ = s.write_all(frame);
    let _ = s.flush();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .expect("dir")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum()
}

fn audit_rows(gw: &Gateway) -> usize {
    gw.audit_events().len()
}

#[test]
fn anonymous_floods_neither_fill_the_disk_nor_flood_the_audit_log() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme"]);
    gw.start();
    let size_before = dir_size(&gw.state);
    let rows_before = audit_rows(&gw);

    // 20 enrollments whose site name is 3 MB long.
    let huge = "a".repeat(3 * 1024 * 1024);
    for _ in 0..20 {
        let mut s = anonymous(port);
        let json = format!(r#"{{"type":"enroll","token":"t","site":"{huge}","public_key":"00"}}"#);
        let said = send_and_drain(&mut s, &control_frame(json.as_bytes()));
        assert!(
            said.contains("exceeds the maximum"),
            "refused from the header: {said:?}"
        );
    }
    // 200 enrollments with bad tokens, names with control characters or 200 bytes long.
    for i in 0..200 {
        let mut s = anonymous(port);
        let site = match i % 3 {
            0 => format!("site-{i}"),
            1 => "x".repeat(200),
            _ => "evil\\nrow".to_owned(),
        };
        let json = format!(
            r#"{{"type":"enroll","token":"bogus{i}","site":"{site}","public_key":"3059"}}"#
        );
        let said = send_and_drain(&mut s, &control_frame(json.as_bytes()));
        assert!(
            said.contains("\"type\":\"error\""),
            "refused with a reason: {said:?}"
        );
    }
    // Nothing per attempt: at most the aggregated records of a minute that is not over yet.
    let rows_after = audit_rows(&gw);
    assert!(
        rows_after <= rows_before + 2,
        "{} audit rows for 220 refused enrollments",
        rows_after - rows_before
    );
    let grown = dir_size(&gw.state).saturating_sub(size_before);
    assert!(grown < 1024 * 1024, "state directory grew by {grown} bytes");

    // The gateway still enrolls a real site and a technician still logs in.
    let mut site = Site::new(dir.path(), "plant-a", port, &gw.token("acme"), PLC_AGENT);
    site.start();
    assert!(
        wait_until(T, || gw.site_online("plant-a")),
        "{}",
        site.log()
    );
    // Stopping the gateway writes what was aggregated: one record for the whole flood.
    gw.stop();
    let events = gw.audit_events();
    let aggregated: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("enrollments refused"))
        .collect();
    assert_eq!(aggregated.len(), 1, "{events:#?}");
    assert!(
        aggregated[0].contains("220 from 127.0.0.1"),
        "{aggregated:?}"
    );
}

#[test]
fn connections_that_never_handshake_are_capped_and_logins_still_work() {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let mut gw = Gateway::init(dir.path(), "gw", port);
    gw.ok(&["domain", "create", "acme"]);
    gw.start();
    let (p12, pw) = gw.account("alice");
    gw.ok(&["grant", "alice", "acme"]);

    // 300 TCP connections from one address (127.0.0.2, not the technician's) that never
    // start TLS.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
                .expect("bind");
            s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
                .expect("connect");
            TcpStream::from(s)
        })
        .collect();
    // Beyond the per-source limit the gateway closes them at once instead of holding them
    // for a whole handshake window (checked without waiting: a closed socket reads 0 at once).
    std::thread::sleep(Duration::from_millis(500));
    for s in &idle {
        s.set_nonblocking(true).expect("nonblocking");
    }
    let closed = idle
        .iter()
        .filter(|s| {
            let mut b = [0u8; 1];
            let mut r: &TcpStream = s;
            matches!(r.read(&mut b), Ok(0))
        })
        .count();
    assert!(
        closed >= 200,
        "only {closed} of 300 idle connections were closed"
    );

    let client = Client::start(dir.path(), "alice");
    let t0 = Instant::now();
    client.import_and_login(&p12, &pw);
    assert_eq!(client.status()["state"], "logged-in");
    eprintln!("login during the flood took {:?}", t0.elapsed());
    drop(idle);
}
