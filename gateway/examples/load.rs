//! Gateway scale benchmark: N idle sites and M live sessions against a real gateway, over real
//! TLS, from one process. Used by `bench/run --scale`; not part of the product.
//!
//!   cargo run --release -p pinhole-gateway --example load -- \
//!       --state DIR --gateway 127.0.0.1:18443 --sites 1000 --sessions 100 --pid GATEWAY_PID
//!
//! It enrolls the sites and creates the technician accounts directly in the gateway's state
//! (the same library calls the CLI makes), connects them all (each site from its own loopback
//! address, as plants dial from their own; a site the gateway turns away dials again with the
//! real site's backoff), opens one session per technician, then measures the gateway's
//! resident memory and CPU while everything idles, and how long `account close` takes to end a
//! live session under that load. Prints one JSON object.
#![allow(clippy::print_stdout)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{LiveTraffic, SimSite, SimTech, SiteNote, TechNote};
use pinhole_gateway::audit::Actor;
use pinhole_gateway::state::StateDir;

struct Args {
    state: PathBuf,
    gateway: SocketAddr,
    sites: usize,
    sessions: usize,
    pid: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut state, mut gateway, mut sites, mut sessions, mut pid) = (None, None, 100, 10, 0);
    while let Some(a) = it.next() {
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--state" => state = Some(PathBuf::from(v)),
            "--gateway" => gateway = Some(v.parse()?),
            "--sites" => sites = v.parse()?,
            "--sessions" => sessions = v.parse()?,
            "--pid" => pid = v.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(Args {
        state: state.context("--state")?,
        gateway: gateway.context("--gateway")?,
        sites,
        sessions,
        pid,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    common::raise_nofile();
    let t0 = Instant::now();
    let fx = common::fixture(&a.state, a.sites, a.sessions)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let rss_before = common::rss_kb(a.pid);

    let traffic = Arc::new(LiveTraffic::default());
    let (site_tx, mut site_rx) = tokio::sync::mpsc::unbounded_channel();
    let n_sites = fx.sites.len();
    let site_names: Vec<String> = fx.sites.iter().map(|(n, _)| n.clone()).collect();
    for (i, (_, id)) in fx.sites.iter().enumerate() {
        let site = SimSite {
            index: i,
            config: common::peer_config(id, fx.pin)?,
            source: Some(common::loopback(2, u32::try_from(i)?)),
            live: false,
        };
        tokio::spawn(common::run_site(
            a.gateway,
            site,
            site_tx.clone(),
            traffic.clone(),
            true,
        ));
    }
    let t1 = Instant::now();
    let mut welcomed = 0;
    while welcomed < n_sites {
        match tokio::time::timeout(Duration::from_secs(300), site_rx.recv())
            .await?
            .context("sites")?
        {
            SiteNote::Welcomed { .. } => welcomed += 1,
            SiteNote::Lost { .. } => {}
        }
    }
    let sites_connect_s = t1.elapsed().as_secs_f64();
    let rss_sites = common::rss_kb(a.pid);

    let (tech_tx, mut tech_rx) = tokio::sync::mpsc::unbounded_channel();
    let n_techs = fx.techs.len();
    for (i, (_, id)) in fx.techs.iter().enumerate() {
        let tech = SimTech {
            index: i,
            config: common::peer_config(id, fx.pin)?,
            source: Some(common::loopback(1, u32::try_from(i)?)),
            site: site_names[i % n_sites.max(1)].clone(),
            live: false,
        };
        tokio::spawn(common::run_technician(
            a.gateway,
            tech,
            tech_tx.clone(),
            traffic.clone(),
        ));
    }
    let mut opened = 0;
    while opened < n_techs {
        match tokio::time::timeout(Duration::from_secs(300), tech_rx.recv())
            .await?
            .context("sessions")?
        {
            TechNote::Opened { .. } => opened += 1,
            TechNote::Ended { why, .. } => bail!("technician: {why}"),
        }
    }
    // Idle for a while: memory and CPU of an idle gateway under this load.
    let cpu0 = common::cpu_ticks(a.pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu_pct = (common::cpu_ticks(a.pid) - cpu0) as f64 / 100.0 / 10.0 * 100.0;
    let rss_all = common::rss_kb(a.pid);

    // Close one account and time until its link ends.
    let mut close_ms = None;
    if n_techs > 0 {
        let mut store = StateDir::new(&a.state).store()?;
        let t = Instant::now();
        store.close_account(&Actor::Admin("load".into()), "tech-0")?;
        while let Some(note) = tokio::time::timeout(Duration::from_secs(10), tech_rx.recv()).await?
        {
            if let TechNote::Ended { tech: 0, at, .. } = note {
                close_ms = Some(at.duration_since(t).as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    let per_site_kb = if n_sites > 0 {
        (rss_sites.saturating_sub(rss_before)) as f64 / n_sites as f64
    } else {
        0.0
    };
    println!(
        "{}",
        serde_json::json!({
            "sites": n_sites,
            "sessions": n_techs,
            "setup_s": common::round1(setup_s),
            "sites_connect_s": common::round1(sites_connect_s),
            "gateway_rss_kb_before": rss_before,
            "gateway_rss_kb_with_sites": rss_sites,
            "gateway_rss_kb_with_sessions": rss_all,
            "kb_per_idle_site": common::round1(per_site_kb),
            "gateway_idle_cpu_percent": common::round1(idle_cpu_pct),
            "account_close_ms": close_ms.map(common::round1),
        })
    );
    std::process::exit(0);
}
