//! Inventory pushes through the real gateway binary: real TLS on loopback, the real SQLite
//! state, real site and technician link cores (the bench tools' simulated peers).
//!
//! After a gateway restart or a network blip, many sites reconnect while technicians are
//! connected. Each technician must get what changed, not its whole inventory again at every
//! change: on a loaded gateway of 10 000 sites and 1 000 technicians, whole inventories after
//! each reconnection grew the gateway to 1.5 GB.

#[path = "../examples/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Gateway, LiveTraffic, SimSite, SiteNote};
use pinhole_proto::{ClientCore, ClientEvent, SiteView};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SITES: usize = 120;
const BATCH: usize = 10;

/// What the technician saw: bytes read since its welcome, inventory messages, its view.
#[derive(Default)]
struct Seen {
    welcome_bytes: usize,
    bytes_after_welcome: usize,
    view: Option<Vec<SiteView>>,
    inventories: usize,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A technician that logs in and counts every byte the gateway sends it.
async fn technician(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    seen: Arc<Mutex<Seen>>,
) -> anyhow::Result<()> {
    let mut s = common::tls_link(addr, Some(common::loopback(1, 0)), config).await?;
    let mut core = ClientCore::new(Instant::now(), "test", common::IDLE_HEARTBEAT);
    let mut buf = vec![0u8; 64 * 1024];
    let mut logged_in = false;
    loop {
        while let Some(b) = core.poll_transmit() {
            s.write_all(&b).await?;
        }
        s.flush().await?;
        let n = s.read(&mut buf).await?;
        if n == 0 {
            anyhow::bail!("the gateway closed the link");
        }
        core.handle_input(&buf[..n], Instant::now());
        let mut seen = seen.lock().expect("lock");
        if logged_in {
            seen.bytes_after_welcome += n;
        } else {
            seen.welcome_bytes += n;
        }
        while let Some(ev) = core.poll_event() {
            match ev {
                ClientEvent::LoggedIn { sites, .. } => {
                    logged_in = true;
                    seen.view = Some(sites);
                }
                ClientEvent::Inventory(sites) => {
                    seen.inventories += 1;
                    seen.view = Some(sites);
                }
                ClientEvent::Closed(r) => anyhow::bail!("closed: {r:?}"),
                _ => {}
            }
        }
    }
}

/// Waits for `n` welcomes of sites.
async fn welcomed(rx: &mut tokio::sync::mpsc::UnboundedReceiver<SiteNote>, n: usize) {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(SiteNote::Welcomed { .. })) => got += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("only {got} of {n} sites were welcomed"),
        }
    }
}

/// Polls `f` until it holds or `limit` passes.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

fn all_online(view: Option<&Vec<SiteView>>) -> bool {
    view.is_some_and(|v| v.len() == SITES && v.iter().all(|s| s.online))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_sites_reach_a_technician_as_changes_not_whole_inventories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("gw");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_pinhole-gateway"));
    let init = std::process::Command::new(bin)
        .arg("--state")
        .arg(&state)
        .args(["init", "--public-address", &addr.to_string()])
        .env("PINHOLE_SYSLOG_SOCKET", dir.path().join("no-syslog"))
        .output()
        .expect("init");
    assert!(init.status.success(), "{init:?}");
    let fx = common::fixture(&state, SITES, 1).expect("fixture");
    let log = dir.path().join("gw.log");
    let gw = Gateway::start(bin, &state, addr, &log, Duration::from_secs(30)).expect("serve");

    let traffic = Arc::new(LiveTraffic::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawn_site = |i: usize| {
        let site = SimSite {
            index: i,
            config: common::peer_config(&fx.sites[i].1, fx.pin).expect("config"),
            source: Some(common::loopback(2, u32::try_from(i).expect("small"))),
            live: false,
        };
        tokio::spawn(common::run_site(
            addr,
            site,
            tx.clone(),
            traffic.clone(),
            false,
        ))
    };
    let mut sites: Vec<_> = (0..SITES).map(spawn_site).collect();
    welcomed(&mut rx, SITES).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let config = common::peer_config(&fx.techs[0].1, fx.pin).expect("config");
    let tech = tokio::spawn(technician(addr, config, seen.clone()));
    assert!(
        eventually(Duration::from_secs(20), || all_online(
            seen.lock().expect("lock").view.as_ref()
        ))
        .await,
        "the technician's welcome lists every site online"
    );
    // The size of one whole inventory, as the welcome carried it (and a moment for the
    // answer to the client's first `list`).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let whole = {
        let s = seen.lock().expect("lock");
        serde_json::to_vec(s.view.as_ref().expect("view"))
            .expect("json")
            .len()
    };
    let before = seen.lock().expect("lock").bytes_after_welcome;

    // Every site drops its link and dials again, ten at a time, a few coalescing windows
    // apart: as after a blip of a plant network, or sites ended as suspects on a loaded
    // gateway.
    for batch in (0..SITES).collect::<Vec<_>>().chunks(BATCH) {
        for &i in batch {
            sites[i].abort();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for &i in batch {
            sites[i] = spawn_site(i);
        }
        welcomed(&mut rx, batch.len()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || all_online(
            seen.lock().expect("lock").view.as_ref()
        ))
        .await,
        "the technician ends with every site online: {:?}",
        seen.lock()
            .expect("lock")
            .view
            .as_ref()
            .map(|v| v.iter().filter(|s| !s.online).count())
    );
    let s = seen.lock().expect("lock");
    let pushed = s.bytes_after_welcome - before;
    let batches = SITES.div_ceil(BATCH);
    eprintln!(
        "{SITES} sites reconnected in {batches} batches: {pushed} bytes in {} inventory \
         messages to the technician; one whole inventory is {whole} bytes",
        s.inventories
    );
    // Each site went off- and online once: its view twice at most, with the framing and TLS
    // around it. Whole inventories after each change would be one per batch and more.
    assert!(
        pushed <= 4 * whole,
        "{pushed} bytes pushed for {SITES} reconnections: more than four whole inventories \
         ({whole} bytes each)"
    );
    let names: Vec<&str> = s
        .view
        .as_ref()
        .expect("view")
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    let mut want: Vec<String> = fx.sites.iter().map(|(n, _)| n.clone()).collect();
    want.sort();
    assert_eq!(names, want, "the technician's view names every site once");
    drop(s);
    tech.abort();
    let (_, status) = gw.stop().expect("stop");
    assert!(status.success(), "the gateway stopped cleanly: {status}");
}
