//! Gateway scale benchmark: N idle sites and M live sessions against a real gateway, over real
//! TLS, from one process. Used by `bench/run --scale`; not part of the product.
//!
//!   cargo run --release -p pinhole-gateway --example load -- \
//!       --state DIR --gateway-bin target/release/pinhole-gateway --listen 127.0.0.1:18443 \
//!       --sites 1000 --sessions 100 [--closes 100] [--no-restart] [--pause-before-sites SECS]
//!
//! `DIR` is an initialised gateway state (`pinhole-gateway init`). In order:
//! 1. it enrolls the sites (in domains of 1 000) and creates the technician accounts directly in
//!    the gateway's state (the same library calls the CLI makes);
//! 2. starts `serve` and connects every site, each from its own loopback address (127.2.0.1,
//!    …, as plants dial from their own; a site the gateway turns away dials again with the real
//!    site's backoff), then opens one session per technician;
//! 3. measures the gateway's resident memory and CPU while everything idles;
//! 4. closes `--closes` accounts one after the other (`account close`, as the CLI does) and
//!    times each until the technician's link ends;
//! 5. stops the gateway with SIGTERM, starts it again and times the sites' return.
//!
//! Prints one JSON object. The tool's own memory is reported apart: it shares the machine.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Gateway, LiveTraffic, SimSite, SimTech, SiteNote, TechNote, round1};
use pinhole_gateway::audit::Actor;
use pinhole_gateway::state::StateDir;

/// Sites per domain, and so per technician's inventory.
const GROUP: usize = 1000;

/// Technicians logging in at once.
const TECHS_AT_ONCE: usize = 32;

/// The next technician note: (1, None) for a session opened, (0, Some(tech)) for a login to
/// try again; an error after more failures than technicians.
async fn next_note(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<TechNote>,
    retried: &mut usize,
    techs: usize,
) -> anyhow::Result<(usize, Option<usize>)> {
    let note = tokio::time::timeout(Duration::from_secs(300), rx.recv())
        .await?
        .context("sessions")?;
    Ok(match note {
        TechNote::Opened { .. } => (1, None),
        TechNote::Ended { tech, why, .. } => {
            *retried += 1;
            if *retried > techs.max(10) {
                bail!("technician: {why}");
            }
            (0, Some(tech))
        }
    })
}

struct Args {
    state: PathBuf,
    gateway_bin: PathBuf,
    listen: SocketAddr,
    sites: usize,
    sessions: usize,
    closes: Option<usize>,
    restart: bool,
    /// Seconds to wait between the gateway's start and the sites' (to attach a profiler).
    pause: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        state: PathBuf::new(),
        gateway_bin: PathBuf::new(),
        listen: "127.0.0.1:18443".parse()?,
        sites: 100,
        sessions: 10,
        closes: None,
        restart: true,
        pause: 0,
    };
    while let Some(k) = it.next() {
        if k == "--no-restart" {
            a.restart = false;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--state" => a.state = PathBuf::from(v),
            "--gateway-bin" => a.gateway_bin = PathBuf::from(v),
            "--listen" => a.listen = v.parse()?,
            "--sites" => a.sites = v.parse()?,
            "--sessions" => a.sessions = v.parse()?,
            "--closes" => a.closes = Some(v.parse()?),
            "--pause-before-sites" => a.pause = v.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    if a.state.as_os_str().is_empty() || a.gateway_bin.as_os_str().is_empty() {
        bail!("--state and --gateway-bin are required");
    }
    Ok(a)
}

/// Raises this process's descriptor limits (soft and, when privileged, hard) to what the
/// kernel allows a process (`fs.nr_open`): the tool and the gateway it starts each hold one
/// descriptor per link. Returns the soft limit in force.
fn raise_nofile_to_nr_open() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let want = Rlimit {
        current: Some(nr_open),
        maximum: Some(nr_open),
    };
    if setrlimit(Resource::Nofile, want).is_err() {
        // Unprivileged: the hard limit stays; take it.
        common::raise_nofile();
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The gateway under test; a large state may take a while to open.
fn start_gateway(a: &Args, log: &std::path::Path) -> anyhow::Result<Gateway> {
    Gateway::start(
        &a.gateway_bin,
        &a.state,
        a.listen,
        log,
        Duration::from_secs(120),
    )
}

/// Waits until `n` sites were welcomed (counting from now); returns the welcome times, sorted,
/// and the dials that failed meanwhile. Gives up after `limit`.
async fn welcomes(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<SiteNote>,
    n: usize,
    limit: Duration,
) -> (Vec<Instant>, usize) {
    let deadline = tokio::time::Instant::now() + limit;
    let (mut times, mut failed) = (Vec::with_capacity(n), 0);
    while times.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(SiteNote::Welcomed { at, .. })) => times.push(at),
            Ok(Some(SiteNote::Lost {
                welcomed: false, ..
            })) => failed += 1,
            Ok(Some(SiteNote::Lost { .. })) => {}
            Ok(None) | Err(_) => break,
        }
    }
    times.sort();
    (times, failed)
}

/// Seconds from `t0` at which the fraction `frac` of `n` sites was back (`None` if it never was).
fn back_at(times: &[Instant], n: usize, frac: f64, t0: Instant) -> Option<f64> {
    let k = ((frac * n as f64).ceil() as usize).clamp(1, n.max(1));
    times
        .get(k - 1)
        .map(|t| round1(t.duration_since(t0).as_secs_f64()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let nofile = raise_nofile_to_nr_open();
    if (nofile as usize) < a.sites + a.sessions + 1024 {
        bail!(
            "the descriptor limit ({nofile}) is below the links: run as root or raise `ulimit -Hn`"
        );
    }
    let me = std::process::id();
    let log = a.state.with_extension("log");
    let t0 = Instant::now();
    let fx = common::fixture_grouped(&a.state, a.sites, a.sessions, Some(GROUP))?;
    let setup_s = t0.elapsed().as_secs_f64();
    let gw = start_gateway(&a, &log)?;
    let start = gw.up;
    // Let the start settle (the audit checkpoint, the first watcher round).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = gw.pid();
    if a.pause > 0 {
        eprintln!("gateway pid {pid}: waiting {} s before the sites", a.pause);
        tokio::time::sleep(Duration::from_secs(a.pause)).await;
    }
    let rss_before = common::rss_kb(pid);

    let traffic = Arc::new(LiveTraffic::default());
    let (site_tx, mut site_rx) = tokio::sync::mpsc::unbounded_channel();
    let n_sites = fx.sites.len();
    let site_names: Vec<String> = fx.sites.iter().map(|(n, _)| n.clone()).collect();
    let t1 = Instant::now();
    for (i, (_, id)) in fx.sites.iter().enumerate() {
        let site = SimSite {
            index: i,
            config: common::peer_config(id, fx.pin)?,
            source: Some(common::loopback(2, u32::try_from(i)?)),
            live: false,
        };
        tokio::spawn(common::run_site(
            a.listen,
            site,
            site_tx.clone(),
            traffic.clone(),
            true,
        ));
    }
    let (times, failed_first) = welcomes(&mut site_rx, n_sites, Duration::from_secs(900)).await;
    if times.len() < n_sites {
        bail!("only {} of {n_sites} sites were welcomed", times.len());
    }
    let sites_connect_s = t1.elapsed().as_secs_f64();
    // Idle a moment: what the handshakes left behind settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_sites = common::rss_kb(pid);
    let tool_rss_sites = common::rss_kb(me);

    // Technicians log in a few dozen at a time, as people do: a thousand handshakes at once
    // on a shared 2-core machine would outlast the client's 10 s dial timeout.
    let (tech_tx, mut tech_rx) = tokio::sync::mpsc::unbounded_channel();
    let n_techs = fx.techs.len();
    let t_techs = Instant::now();
    let spawn_tech = |i: usize| -> anyhow::Result<()> {
        let tech = SimTech {
            index: i,
            config: common::peer_config(&fx.techs[i].1, fx.pin)?,
            source: Some(common::loopback(1, u32::try_from(i)?)),
            site: site_names[i % n_sites.max(1)].clone(),
            live: false,
        };
        tokio::spawn(common::run_technician(
            a.listen,
            tech,
            tech_tx.clone(),
            traffic.clone(),
        ));
        Ok(())
    };
    // A login that fails (a dial timeout or an unanswered session request on a starved
    // machine) is tried again, a few times; the failures are reported.
    let (mut opened, mut retried) = (0, 0);
    for i in 0..n_techs {
        while i - opened >= TECHS_AT_ONCE {
            let (n, again) = next_note(&mut tech_rx, &mut retried, n_techs).await?;
            opened += n;
            if let Some(t) = again {
                spawn_tech(t)?;
            }
        }
        spawn_tech(i)?;
    }
    while opened < n_techs {
        let (n, again) = next_note(&mut tech_rx, &mut retried, n_techs).await?;
        opened += n;
        if let Some(t) = again {
            spawn_tech(t)?;
        }
    }
    let sessions_open_s = t_techs.elapsed().as_secs_f64();
    // Idle for a while: memory and CPU of an idle gateway under this load.
    let cpu0 = common::cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu_pct = (common::cpu_ticks(pid) - cpu0) as f64 / 100.0 / 10.0 * 100.0;
    let rss_all = common::rss_kb(pid);

    // Close accounts one after the other; time each until its technician's link ends.
    let closes = a.closes.unwrap_or(n_techs.min(100)).min(n_techs);
    let mut close_times = Vec::with_capacity(closes);
    {
        let mut store = StateDir::new(&a.state).store()?;
        for k in 0..closes {
            let t = Instant::now();
            store.close_account(&Actor::Admin("load".into()), &format!("tech-{k}"))?;
            loop {
                match tokio::time::timeout(Duration::from_secs(10), tech_rx.recv()).await {
                    Ok(Some(TechNote::Ended { tech, at, .. })) if tech == k => {
                        close_times.push(at.duration_since(t));
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => bail!("account tech-{k} closed, its link stayed"),
                }
            }
            // Closes a few times a second, not back to back: each is its own admin change.
            tokio::time::sleep(Duration::from_millis(20 + 13 * (k as u64 % 7))).await;
        }
    }

    // SIGTERM, start again: every site comes back by itself, with its own backoff.
    let mut restart = serde_json::Value::Null;
    let gw = if a.restart {
        while site_rx.try_recv().is_ok() {}
        let t_term = Instant::now();
        let (stop, _) = gw.stop()?;
        // Sites that were welcomed again by the stopping gateway do not count.
        while site_rx.try_recv().is_ok() {}
        let gw = start_gateway(&a, &log)?;
        let (up, t_start) = (gw.up, gw.started);
        let (times, failed) = welcomes(&mut site_rx, n_sites, Duration::from_secs(600)).await;
        let all = times.len() == n_sites;
        restart = serde_json::json!({
            "stop_s": round1(stop.as_secs_f64()),
            "listening_after_s": round1(up.as_secs_f64()),
            "back": times.len(),
            "p50_back_s": back_at(&times, n_sites, 0.5, t_start),
            "p90_back_s": back_at(&times, n_sites, 0.9, t_start),
            "all_back_s": all.then(|| back_at(&times, n_sites, 1.0, t_start)).flatten(),
            "all_back_from_sigterm_s": all.then(|| back_at(&times, n_sites, 1.0, t_term)).flatten(),
            "failed_dials": failed,
            "gateway_rss_kb": common::rss_kb(gw.pid()),
        });
        gw
    } else {
        gw
    };
    let tool_rss_end = common::rss_kb(me);
    gw.stop()?;

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
            "setup_s": round1(setup_s),
            "gateway_listening_after_s": round1(start.as_secs_f64()),
            "sites_connect_s": round1(sites_connect_s),
            "sessions_open_s": round1(sessions_open_s),
            "technician_logins_retried": retried,
            "failed_dials_first_connect": failed_first,
            "gateway_rss_kb_before": rss_before,
            "gateway_rss_kb_with_sites": rss_sites,
            "gateway_rss_kb_with_sessions": rss_all,
            "kb_per_idle_site": round1(per_site_kb),
            "gateway_idle_cpu_percent": round1(idle_cpu_pct),
            "account_closes": close_times.len(),
            "account_close_ms_p50": common::percentile_ms(&close_times, 50.0),
            "account_close_ms_p99": common::percentile_ms(&close_times, 99.0),
            "account_close_ms_max": common::percentile_ms(&close_times, 100.0),
            "restart": restart,
            "tool_rss_kb_with_sites": tool_rss_sites,
            "tool_rss_kb_end": tool_rss_end,
        })
    );
    std::process::exit(0);
}
