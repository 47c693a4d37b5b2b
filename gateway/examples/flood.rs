//! The gateway under an anonymous flood, and after a restart. Used by `bench/run --flood`;
//! not part of the product.
//!
//!   flood --state DIR --gateway-bin target/release/pinhole-gateway --listen 127.0.0.1:18443 \
//!         [--sites 1000] [--sessions 100] [--half-open 5000] [--attacker-sources 1] \
//!         [--rate 200] [--flood-seconds 60] [--restart] [--label NAME] \
//!         [--cli target/release/pinhole --cli-password-file FILE --cli-target SITE/AGENT]
//!
//! The tool starts the gateway itself (`serve`, on an initialized state directory), so that it
//! can stop it with SIGTERM and start it again. In order:
//!
//! 1. enrolls the sites and creates the technician accounts (see `common::fixture`), starts
//!    the gateway, connects the sites (each from its own loopback address, reconnecting with
//!    the real site's backoff) and one live session per technician: every session relays a
//!    small datagram every second, both ways, for the whole run;
//! 2. baseline: 20 legitimate logins and session opens (real TLS links, one at a time), and
//!    with `--cli` three rounds of the real `pinhole login` / `pinhole connect` (pinholed must
//!    run, with the bundle imported; `PINHOLE_SOCKET` names its socket);
//! 3. the flood: an attacker opens `--half-open` TCP connections from `--attacker-sources`
//!    loopback addresses (127.0.1.1, 127.0.1.2, …) that send 5 bytes of a TLS record header and
//!    never finish the handshake; when the gateway closes one it is opened again a second later,
//!    for the whole flood. Two seconds later, `--rate` anonymous TLS connections a second (from
//!    the same addresses) send an oversized frame header, HTTP garbage, broken JSON, a bad
//!    `enroll` (unknown token, 200-byte name, control characters) or 16 KB of heartbeats then
//!    a bad `enroll`, for `--flood-seconds`. Meanwhile a legitimate technician logs in and
//!    opens a session every 250 ms (and the CLI round repeats); the gateway's RSS, CPU and
//!    descriptors are sampled every second;
//! 4. the attacker stops; the live sessions stop sending and their datagrams are counted; the
//!    gateway is stopped with SIGTERM (which writes the aggregated refusals) and the audit rows
//!    and bytes added since the flood began are counted;
//! 5. with `--restart`: the gateway is started again and the time until every site is welcomed
//!    again is measured (sites come back on their own, with their backoff).
//!
//! Prints one JSON object on stdout, and a summary on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{Gateway, LiveTraffic, SimSite, SimTech, SiteNote, TechNote, percentile_ms, round1};
use rustls::ClientConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

struct Args {
    state: PathBuf,
    gateway_bin: PathBuf,
    listen: SocketAddr,
    sites: usize,
    sessions: usize,
    half_open: usize,
    attacker_sources: usize,
    rate: u64,
    flood_s: u64,
    restart: bool,
    label: String,
    cli: Option<PathBuf>,
    cli_password_file: Option<PathBuf>,
    cli_target: String,
    baseline_probes: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        state: PathBuf::new(),
        gateway_bin: PathBuf::from("target/release/pinhole-gateway"),
        listen: "127.0.0.1:18443".parse()?,
        sites: 1000,
        sessions: 100,
        half_open: 5000,
        attacker_sources: 1,
        rate: 200,
        flood_s: 60,
        restart: false,
        label: "flood".into(),
        cli: None,
        cli_password_file: None,
        cli_target: String::new(),
        baseline_probes: 20,
    };
    let mut state = None;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--restart" {
            a.restart = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--state" => state = Some(PathBuf::from(v)),
            "--gateway-bin" => a.gateway_bin = v.into(),
            "--listen" => a.listen = v.parse()?,
            "--sites" => a.sites = v.parse()?,
            "--sessions" => a.sessions = v.parse()?,
            "--half-open" => a.half_open = v.parse()?,
            "--attacker-sources" => a.attacker_sources = v.parse::<usize>()?.max(1),
            "--rate" => a.rate = v.parse()?,
            "--flood-seconds" => a.flood_s = v.parse()?,
            "--label" => a.label = v,
            "--cli" => a.cli = Some(v.into()),
            "--cli-password-file" => a.cli_password_file = Some(v.into()),
            "--cli-target" => a.cli_target = v,
            "--baseline-probes" => a.baseline_probes = v.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    a.state = state.context("--state DIR (an initialized gateway state directory)")?;
    if a.cli.is_some() && (a.cli_password_file.is_none() || a.cli_target.is_empty()) {
        bail!("--cli needs --cli-password-file and --cli-target");
    }
    if a.sessions > a.sites {
        bail!("one site per live session: --sessions ≤ --sites");
    }
    Ok(a)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("flood: {}", msg.as_ref());
}

// --- the gateway process --------------------------------------------------------------------

/// The gateway under test, started and stopped with SIGTERM by this tool.
fn start_gateway(a: &Args) -> anyhow::Result<Gateway> {
    let log = a.state.with_extension("log");
    Gateway::start(
        &a.gateway_bin,
        &a.state,
        a.listen,
        &log,
        Duration::from_secs(30),
    )
}

/// SIGTERM; logs an exit that was not clean. Returns how long the stop took.
fn stop_gateway(gw: Gateway) -> anyhow::Result<Duration> {
    let (took, status) = gw.stop()?;
    if !status.success() {
        log(format!("the gateway exited with {status}"));
    }
    Ok(took)
}

/// Warnings and errors in the gateway's log, by message, counted.
fn log_warnings(path: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.contains(" panicked at ") {
            // The message is on the next line.
            let msg = lines.next().unwrap_or_default().trim().to_owned();
            *out.entry(format!("PANIC {msg}")).or_insert(0) += 1;
            continue;
        }
        let Some(level) = [" WARN ", " ERROR "].into_iter().find(|l| line.contains(l)) else {
            continue;
        };
        // `… WARN target: message key=value…`: keep the message, without the fields' values.
        let rest = line.split_once(level).map_or(line, |(_, r)| r);
        let rest = rest.split_once(": ").map_or(rest, |(_, m)| m);
        let msg: String = rest
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        *out.entry(format!("{}{msg}", level.trim_start()))
            .or_insert(0) += 1;
    }
    out
}

// --- /proc sampling -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    rss_kb: u64,
    gw_ticks: u64,
    tool_ticks: u64,
    fds: usize,
    threads: u64,
}

fn sample(pid: u32) -> Sample {
    Sample {
        at: Instant::now(),
        rss_kb: common::rss_kb(pid),
        gw_ticks: common::cpu_ticks(pid),
        tool_ticks: common::cpu_ticks(std::process::id()),
        fds: common::fds(pid),
        threads: common::threads(pid),
    }
}

/// Gateway figures over a window of samples.
fn window(samples: &[Sample], from: Instant, to: Instant) -> Value {
    let w: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at <= to)
        .collect();
    let (Some(first), Some(last)) = (w.first(), w.last()) else {
        return Value::Null;
    };
    let secs = last.at.duration_since(first.at).as_secs_f64().max(0.001);
    let pct = |a: u64, b: u64| round1(b.saturating_sub(a) as f64 / 100.0 / secs * 100.0);
    let max_1s = w
        .windows(2)
        .map(|p| {
            let s = p[1].at.duration_since(p[0].at).as_secs_f64().max(0.001);
            p[1].gw_ticks.saturating_sub(p[0].gw_ticks) as f64 / 100.0 / s * 100.0
        })
        .fold(0.0, f64::max);
    json!({
        "seconds": round1(secs),
        "gateway_rss_mb_start": round1(first.rss_kb as f64 / 1024.0),
        "gateway_rss_mb_peak": round1(w.iter().map(|s| s.rss_kb).max().unwrap_or(0) as f64 / 1024.0),
        "gateway_rss_mb_end": round1(last.rss_kb as f64 / 1024.0),
        "gateway_cpu_percent_mean": pct(first.gw_ticks, last.gw_ticks),
        "gateway_cpu_percent_max_1s": round1(max_1s),
        "gateway_fds_peak": w.iter().map(|s| s.fds).max().unwrap_or(0),
        "gateway_threads_peak": w.iter().map(|s| s.threads).max().unwrap_or(0),
        "tool_cpu_percent_mean": pct(first.tool_ticks, last.tool_ticks),
    })
}

// --- legitimate technicians -----------------------------------------------------------------

#[derive(Debug)]
struct ProbeResult {
    at: Instant,
    result: Result<common::ProbeTimes, String>,
}

/// Legitimate logins and session opens, one at a time, on their own thread and runtime so
/// that the attacker's tasks do not delay the measurement. Runs `count` probes, or until
/// `stop` if `count` is 0.
fn prober(
    addr: SocketAddr,
    configs: Vec<Arc<ClientConfig>>,
    sites: Vec<String>,
    count: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<ProbeResult>> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut out = Vec::new();
            let mut k = 0usize;
            while (count == 0 && !stop.load(Ordering::Relaxed)) || (count > 0 && k < count) {
                let config = configs[k % configs.len()].clone();
                let site = &sites[k % sites.len()];
                let at = Instant::now();
                let stage = std::cell::Cell::new("dial");
                let result = match tokio::time::timeout(
                    Duration::from_secs(10),
                    common::probe(addr, None, config, site, &stage),
                )
                .await
                {
                    Ok(Ok(t)) => Ok(t),
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(_) => Err(format!("no answer within 10 s ({})", stage.get())),
                };
                out.push(ProbeResult { at, result });
                k += 1;
                tokio::time::sleep(every).await;
            }
            out
        })
    })
}

fn errors_by_text<'a>(errors: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in errors {
        *m.entry(e.clone()).or_insert(0) += 1;
    }
    m
}

fn probe_summary(results: &[ProbeResult]) -> Value {
    let ok: Vec<common::ProbeTimes> = results
        .iter()
        .filter_map(|r| r.result.as_ref().ok().copied())
        .collect();
    let login: Vec<Duration> = ok.iter().map(|t| t.login).collect();
    let connect: Vec<Duration> = ok.iter().map(|t| t.connect).collect();
    json!({
        "attempts": results.len(),
        "ok": ok.len(),
        "failed": results.len() - ok.len(),
        "login_ms_p50": percentile_ms(&login, 50.0),
        "login_ms_p99": percentile_ms(&login, 99.0),
        "login_ms_max": percentile_ms(&login, 100.0),
        "connect_ms_p50": percentile_ms(&connect, 50.0),
        "connect_ms_p99": percentile_ms(&connect, 99.0),
        "connect_ms_max": percentile_ms(&connect, 100.0),
        "errors": errors_by_text(results.iter().filter_map(|r| r.result.as_ref().err())),
    })
}

#[derive(Debug)]
struct CliRound {
    login: Result<Duration, String>,
    connect: Option<Result<Duration, String>>,
}

fn run_cli(bin: &Path, args: &[&str]) -> Result<Duration, String> {
    let t = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(t.elapsed())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Rounds of the real CLI: `pinhole login`, `pinhole connect`, disconnect, logout.
fn cli_rounds(
    bin: PathBuf,
    password_file: PathBuf,
    target: String,
    count: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<CliRound>> {
    std::thread::spawn(move || {
        let pw = password_file.to_string_lossy().into_owned();
        let mut out = Vec::new();
        while (count == 0 && !stop.load(Ordering::Relaxed)) || (count > 0 && out.len() < count) {
            let login = run_cli(&bin, &["login", "--password-file", &pw]);
            let connect = login.is_ok().then(|| run_cli(&bin, &["connect", &target]));
            let _ = run_cli(&bin, &["disconnect", "--all"]);
            let _ = run_cli(&bin, &["logout"]);
            out.push(CliRound { login, connect });
            std::thread::sleep(Duration::from_millis(500));
        }
        out
    })
}

fn cli_summary(rounds: &[CliRound]) -> Value {
    let login: Vec<Duration> = rounds
        .iter()
        .filter_map(|r| r.login.as_ref().ok().copied())
        .collect();
    let connect: Vec<Duration> = rounds
        .iter()
        .filter_map(|r| r.connect.as_ref()?.as_ref().ok().copied())
        .collect();
    let errors = rounds.iter().flat_map(|r| {
        r.login
            .as_ref()
            .err()
            .into_iter()
            .chain(r.connect.as_ref().and_then(|c| c.as_ref().err()))
    });
    json!({
        "rounds": rounds.len(),
        "logins_ok": login.len(),
        "connects_ok": connect.len(),
        "login_ms_p50": percentile_ms(&login, 50.0),
        "login_ms_p99": percentile_ms(&login, 99.0),
        "login_ms_max": percentile_ms(&login, 100.0),
        "connect_ms_p50": percentile_ms(&connect, 50.0),
        "connect_ms_p99": percentile_ms(&connect, 99.0),
        "connect_ms_max": percentile_ms(&connect, 100.0),
        "errors": errors_by_text(errors),
    })
}

// --- the attacker ---------------------------------------------------------------------------

/// The attacker's addresses: 127.0.1.1, 127.0.1.2, … (127.0.0.1 stays the technicians'). The
/// half-open connections come from the first `sources`, the anonymous TLS connections from the
/// next `sources`: with one source, the half-open connections use up its 64 places, and an
/// attacker whose TLS connections were all turned away would use another address.
fn attacker_source(i: usize, sources: usize, tls: bool) -> IpAddr {
    let n = i % sources + if tls { sources } else { 0 };
    common::loopback(0, 250 + u32::try_from(n).expect("few sources"))
}

#[derive(Debug, Default)]
struct HalfOpenStats {
    connects: AtomicU64,
    connect_failed: AtomicU64,
    /// Closed by the gateway within a second: turned away by a cap.
    closed_at_once: AtomicU64,
    /// Closed by the gateway after a second or more: the handshake timeout.
    timed_out: AtomicU64,
    held_ms: AtomicU64,
    open_now: AtomicU64,
    open_peak: AtomicU64,
}

/// One connection slot of the attacker: a TLS record header and nothing more, reopened a
/// second after the gateway closes it, until `stop`.
async fn half_open(
    addr: SocketAddr,
    source: IpAddr,
    mut stop: watch::Receiver<bool>,
    st: Arc<HalfOpenStats>,
) {
    let mut buf = [0u8; 256];
    while !*stop.borrow() {
        st.connects.fetch_add(1, Ordering::Relaxed);
        let connected = tokio::select! {
            c = common::tcp(addr, Some(source)) => c,
            _ = stop.changed() => return,
        };
        match connected {
            Ok(mut s) => {
                let t = Instant::now();
                let now_open = st.open_now.fetch_add(1, Ordering::Relaxed) + 1;
                st.open_peak.fetch_max(now_open, Ordering::Relaxed);
                // A ClientHello record of 512 bytes is announced; 5 bytes of it ever come.
                let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
                let stopped = tokio::select! {
                    _ = async { while let Ok(n) = s.read(&mut buf).await { if n == 0 { break } } } => false,
                    _ = stop.changed() => true,
                };
                st.open_now.fetch_sub(1, Ordering::Relaxed);
                if stopped {
                    return;
                }
                let held = t.elapsed();
                if held < Duration::from_secs(1) {
                    st.closed_at_once.fetch_add(1, Ordering::Relaxed);
                } else {
                    st.timed_out.fetch_add(1, Ordering::Relaxed);
                    st.held_ms.fetch_add(
                        u64::try_from(held.as_millis()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
            }
            Err(_) => {
                st.connect_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

const KINDS: [&str; 5] = [
    "oversized frame",
    "http garbage",
    "broken json",
    "bad enroll",
    "heartbeats then bad enroll",
];

#[derive(Debug, Default)]
struct AnonKind {
    attempted: u64,
    tcp_failed: u64,
    /// The handshake failed: the gateway closed the connection at once (a cap).
    refused_before_tls: u64,
    /// The gateway answered with an error, then closed.
    answered: u64,
    /// The gateway closed without a word.
    closed_silently: u64,
    /// Still open 10 s later.
    stuck: u64,
    closed_after: Vec<Duration>,
}

fn control_frame(json: &[u8]) -> Vec<u8> {
    let mut out = vec![1, 1];
    out.extend_from_slice(&u32::try_from(json.len()).expect("small").to_be_bytes());
    out.extend_from_slice(json);
    out
}

fn bad_enroll(n: u64) -> Vec<u8> {
    let site = match n % 3 {
        0 => format!("site-{n}"),
        1 => "x".repeat(200),
        _ => "evil\\nrow\\u0007".to_owned(),
    };
    control_frame(
        format!(r#"{{"type":"enroll","token":"bogus-{n}","site":"{site}","public_key":"3059"}}"#)
            .as_bytes(),
    )
}

/// What anonymous connection `n` sends after its handshake.
fn garbage(kind: usize, n: u64) -> Vec<u8> {
    match kind {
        0 => {
            let mut out = vec![1, 1];
            out.extend_from_slice(&(3u32 * 1024 * 1024).to_be_bytes());
            out.extend_from_slice(&[b'a'; 16 * 1024]);
            out
        }
        1 => {
            let mut out = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n".to_vec();
            out.extend_from_slice(&pinhole_certs::random::<256>());
            out
        }
        2 => control_frame(br#"{"type":"enroll","token":"x","site":"#),
        3 => bad_enroll(n),
        _ => {
            let beat = control_frame(br#"{"type":"heartbeat"}"#);
            let mut out = Vec::new();
            while out.len() + beat.len() < 15 * 1024 {
                out.extend_from_slice(&beat);
            }
            out.extend_from_slice(&bad_enroll(n));
            out
        }
    }
}

/// How the gateway's refusal starts (a control frame's JSON).
const ERROR: &[u8] = br#""type":"error""#;

async fn anonymous(
    addr: SocketAddr,
    source: IpAddr,
    config: Arc<ClientConfig>,
    n: u64,
    stats: Arc<Mutex<Vec<AnonKind>>>,
) {
    let kind = usize::try_from(n % KINDS.len() as u64).unwrap_or(0);
    let t = Instant::now();
    let outcome = async {
        let Ok(tcp) = common::tcp(addr, Some(source)).await else {
            return 0;
        };
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(10), common::tls_over(addr, tcp, config))
                .await
        else {
            return 1;
        };
        let _ = s.write_all(&garbage(kind, n)).await;
        let _ = s.flush().await;
        let mut said = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                said.extend_from_slice(&buf[..k]);
            }
        })
        .await;
        match closed {
            Err(_) => 4,
            Ok(()) if said.windows(ERROR.len()).any(|w| w == ERROR) => 2,
            Ok(()) => 3,
        }
    }
    .await;
    let mut st = stats.lock().unwrap_or_else(|p| p.into_inner());
    let k = &mut st[kind];
    k.attempted += 1;
    match outcome {
        0 => k.tcp_failed += 1,
        1 => k.refused_before_tls += 1,
        2 => k.answered += 1,
        3 => k.closed_silently += 1,
        _ => k.stuck += 1,
    }
    if outcome >= 2 {
        k.closed_after.push(t.elapsed());
    }
}

/// `rate` anonymous connections a second for `seconds`, round-robin over the attacker's
/// sources. Returns how many were launched and how many were skipped (too many in flight).
async fn anonymous_flood(
    addr: SocketAddr,
    a: &Args,
    stats: Arc<Mutex<Vec<AnonKind>>>,
) -> anyhow::Result<(u64, u64, Duration)> {
    const MAX_IN_FLIGHT: u64 = 2000;
    let config = common::anonymous_config()?;
    let in_flight = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(a.flood_s);
    let (mut launched, mut skipped) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < end {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * a.rate as f64) as u64;
        while launched + skipped < due {
            if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                skipped += 1;
                continue;
            }
            let n = launched;
            launched += 1;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (config, stats, in_flight) = (config.clone(), stats.clone(), in_flight.clone());
            let source = attacker_source(usize::try_from(n)?, a.attacker_sources, true);
            tokio::spawn(async move {
                anonymous(addr, source, config, n, stats).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    let took = start.elapsed();
    // Let the last ones finish (each gives up after 20 s at most).
    let deadline = Instant::now() + Duration::from_secs(25);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((launched, skipped, took))
}

fn anon_summary(stats: &[AnonKind]) -> Value {
    let mut kinds = serde_json::Map::new();
    let mut all: Vec<Duration> = Vec::new();
    for (name, k) in KINDS.iter().zip(stats) {
        all.extend(&k.closed_after);
        kinds.insert(
            (*name).to_owned(),
            json!({
                "attempted": k.attempted,
                "answered_with_error": k.answered,
                "closed_silently": k.closed_silently,
                "refused_before_tls": k.refused_before_tls,
                "tcp_failed": k.tcp_failed,
                "still_open_after_10s": k.stuck,
                "closed_after_ms_p50": percentile_ms(&k.closed_after, 50.0),
                "closed_after_ms_p99": percentile_ms(&k.closed_after, 99.0),
            }),
        );
    }
    let sum = |f: fn(&AnonKind) -> u64| stats.iter().map(f).sum::<u64>();
    json!({
        "attempted": sum(|k| k.attempted),
        "answered_with_error": sum(|k| k.answered),
        "closed_silently": sum(|k| k.closed_silently),
        "refused_before_tls": sum(|k| k.refused_before_tls),
        "tcp_failed": sum(|k| k.tcp_failed),
        "still_open_after_10s": sum(|k| k.stuck),
        "closed_after_ms_p50": percentile_ms(&all, 50.0),
        "closed_after_ms_p99": percentile_ms(&all, 99.0),
        "by_kind": kinds,
    })
}

// --- the audit log and the state directory --------------------------------------------------

/// Bytes of the database: the file and its write-ahead log, after moving the log into the file
/// if no one holds it (then the figure is what stays on disk).
fn db_bytes(conn: &rusqlite::Connection, db: &Path) -> u64 {
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    let wal = db.with_extension("db-wal");
    [db.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn audit_last_id(conn: &rusqlite::Connection) -> anyhow::Result<i64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) FROM audit", [], |r| r.get(0))?)
}

/// Audit rows after `since`, by event; bytes are the stored fields (text and both hashes).
/// Rows about anonymous peers (object `peer:…`) are the flood's.
fn audit_added(conn: &rusqlite::Connection, since: i64) -> anyhow::Result<Value> {
    let mut q = conn.prepare(
        "SELECT object LIKE 'peer:%', event, COUNT(*), \
         SUM(LENGTH(time) + LENGTH(actor) + LENGTH(object) + LENGTH(event) + LENGTH(description) \
             + LENGTH(prev) + LENGTH(hash) + 8) \
         FROM audit WHERE id > ?1 GROUP BY 1, 2 ORDER BY 1 DESC, 3 DESC",
    )?;
    let rows = q.query_map([since], |r| {
        Ok((
            r.get::<_, bool>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let (mut rows_all, mut bytes_all, mut rows_flood, mut bytes_flood) = (0, 0, 0, 0);
    let mut by_event = serde_json::Map::new();
    for row in rows {
        let (flood, event, n, bytes) = row?;
        rows_all += n;
        bytes_all += bytes;
        if flood {
            rows_flood += n;
            bytes_flood += bytes;
        }
        by_event.insert(event, json!({"rows": n, "bytes": bytes}));
    }
    Ok(json!({
        "rows_added": rows_all,
        "bytes_added": bytes_all,
        "rows_about_anonymous_peers": rows_flood,
        "bytes_about_anonymous_peers": bytes_flood,
        "by_event": by_event,
    }))
}

// --- the run --------------------------------------------------------------------------------

/// Site notes as they come, for the phases to count.
#[derive(Default)]
struct Notes {
    sites: Mutex<Vec<SiteNote>>,
    techs: Mutex<Vec<TechNote>>,
}

impl Notes {
    fn welcomed_since(&self, t: Instant) -> Vec<Instant> {
        let notes = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let mut first: BTreeMap<usize, Instant> = BTreeMap::new();
        for n in notes.iter() {
            if let SiteNote::Welcomed { site, at } = n
                && *at >= t
            {
                first.entry(*site).or_insert(*at);
            }
        }
        let mut v: Vec<Instant> = first.into_values().collect();
        v.sort();
        v
    }

    fn sites_lost_between(&self, from: Instant, to: Instant, live: usize) -> (usize, usize) {
        let notes = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let mut live_lost = 0;
        let mut idle_lost = 0;
        for n in notes.iter() {
            if let SiteNote::Lost {
                site,
                at,
                welcomed: true,
                ..
            } = n
                && *at >= from
                && *at <= to
            {
                if *site < live {
                    live_lost += 1;
                } else {
                    idle_lost += 1;
                }
            }
        }
        (live_lost, idle_lost)
    }

    fn failed_dials_since(&self, t: Instant) -> usize {
        let notes = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        notes
            .iter()
            .filter(|n| matches!(n, SiteNote::Lost { at, welcomed: false, .. } if *at >= t))
            .count()
    }

    fn techs_opened(&self) -> usize {
        let notes = self.techs.lock().unwrap_or_else(|p| p.into_inner());
        notes
            .iter()
            .filter(|n| matches!(n, TechNote::Opened { .. }))
            .count()
    }

    fn techs_ended_before(&self, t: Instant) -> Vec<String> {
        let notes = self.techs.lock().unwrap_or_else(|p| p.into_inner());
        notes
            .iter()
            .filter_map(|n| match n {
                TechNote::Ended { tech, at, why } if *at < t => Some(format!("tech-{tech}: {why}")),
                _ => None,
            })
            .collect()
    }
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn since_s(t: Instant, from: Instant) -> f64 {
    (t.duration_since(from).as_secs_f64() * 100.0).round() / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let nofile = common::raise_nofile();
    let addr = a.listen;
    const PROBE_ACCOUNTS: usize = 4;
    let t0 = Instant::now();
    let fx = common::fixture(&a.state, a.sites, a.sessions + PROBE_ACCOUNTS)?;
    let setup_s = t0.elapsed().as_secs_f64();
    log(format!(
        "{}: {} sites, {} technicians set up in {setup_s:.1} s (descriptor limit {nofile})",
        a.label,
        a.sites,
        fx.techs.len()
    ));

    let gw = start_gateway(&a)?;
    let gw_pid = gw.pid();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampling = Arc::new(AtomicU64::new(u64::from(gw_pid)));
    {
        let (samples, sampling) = (samples.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let pid = u32::try_from(sampling.load(Ordering::Relaxed)).unwrap_or(0);
                if pid != 0 {
                    let s = sample(pid);
                    samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                }
            }
        });
    }

    // Sites and live sessions.
    let notes = Arc::new(Notes::default());
    let traffic = Arc::new(LiveTraffic::default());
    let (site_tx, mut site_rx) = tokio::sync::mpsc::unbounded_channel();
    let (tech_tx, mut tech_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let (for_sites, for_techs) = (notes.clone(), notes.clone());
        tokio::spawn(async move {
            while let Some(n) = site_rx.recv().await {
                for_sites
                    .sites
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(n);
            }
        });
        tokio::spawn(async move {
            while let Some(n) = tech_rx.recv().await {
                for_techs
                    .techs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(n);
            }
        });
    }
    let t_sites = Instant::now();
    for (i, (_, id)) in fx.sites.iter().enumerate() {
        let site = SimSite {
            index: i,
            config: common::peer_config(id, fx.pin)?,
            source: Some(common::loopback(2, u32::try_from(i)?)),
            live: i < a.sessions,
        };
        tokio::spawn(common::run_site(
            addr,
            site,
            site_tx.clone(),
            traffic.clone(),
            true,
        ));
    }
    wait_for("all sites welcomed", Duration::from_secs(600), || {
        notes.welcomed_since(t_sites).len() == a.sites
    })
    .await?;
    let sites_connect_s = t_sites.elapsed().as_secs_f64();
    log(format!(
        "{} sites online in {sites_connect_s:.1} s",
        a.sites
    ));
    for (i, (_, id)) in fx.techs.iter().take(a.sessions).enumerate() {
        let tech = SimTech {
            index: i,
            config: common::peer_config(id, fx.pin)?,
            source: Some(common::loopback(1, u32::try_from(i)?)),
            site: format!("load-{i}"),
            live: true,
        };
        tokio::spawn(common::run_technician(
            addr,
            tech,
            tech_tx.clone(),
            traffic.clone(),
        ));
    }
    wait_for("live sessions open", Duration::from_secs(300), || {
        notes.techs_opened() == a.sessions
    })
    .await?;
    log(format!("{} live sessions open", a.sessions));

    // Baseline.
    let probe_configs: Vec<Arc<ClientConfig>> = fx.techs[a.sessions..]
        .iter()
        .map(|(_, id)| common::peer_config(id, fx.pin))
        .collect::<anyhow::Result<_>>()?;
    // Probes open sessions to the idle sites (the live ones count every datagram).
    let mut probe_sites: Vec<String> = (a.sessions..a.sites).map(|i| format!("load-{i}")).collect();
    if probe_sites.is_empty() {
        probe_sites.push("load-0".into());
    }
    let stop_probes = Arc::new(AtomicBool::new(false));
    let t_base = Instant::now();
    let base_probes = prober(
        addr,
        probe_configs.clone(),
        probe_sites.clone(),
        a.baseline_probes,
        Duration::from_millis(100),
        stop_probes.clone(),
    )
    .join()
    .map_err(|_| anyhow::anyhow!("prober panicked"))?;
    let base_cli = match &a.cli {
        Some(bin) => Some(
            cli_rounds(
                bin.clone(),
                a.cli_password_file.clone().unwrap_or_default(),
                a.cli_target.clone(),
                3,
                stop_probes.clone(),
            )
            .join()
            .map_err(|_| anyhow::anyhow!("cli panicked"))?,
        ),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t_base_end = Instant::now();
    log(format!("baseline: {}", probe_summary(&base_probes)));

    // The flood.
    let state = pinhole_gateway::state::StateDir::new(&a.state);
    let conn = rusqlite::Connection::open(state.db())?;
    conn.busy_timeout(Duration::from_secs(2))?;
    let audit_before = audit_last_id(&conn)?;
    let db_before = db_bytes(&conn, &state.db());
    let log_path = a.state.with_extension("log");
    let log_size = || std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let log_before = log_size();
    let flooding = a.flood_s > 0 || a.half_open > 0;
    let mut flood = Value::Null;
    let t_flood = Instant::now();
    if flooding {
        log(format!(
            "flood: {} half-open connections from {} source(s), then {} anonymous TLS connections a second for {} s",
            a.half_open, a.attacker_sources, a.rate, a.flood_s
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let half = Arc::new(HalfOpenStats::default());
        for i in 0..a.half_open {
            tokio::spawn(half_open(
                addr,
                attacker_source(i, a.attacker_sources, false),
                stop_rx.clone(),
                half.clone(),
            ));
        }
        let probes = prober(
            addr,
            probe_configs.clone(),
            probe_sites.clone(),
            0,
            Duration::from_millis(250),
            stop_probes.clone(),
        );
        let cli = a.cli.as_ref().map(|bin| {
            cli_rounds(
                bin.clone(),
                a.cli_password_file.clone().unwrap_or_default(),
                a.cli_target.clone(),
                0,
                stop_probes.clone(),
            )
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let half_open_after_2s = half.open_now.load(Ordering::Relaxed);
        let anon = Arc::new(Mutex::new(
            (0..KINDS.len())
                .map(|_| AnonKind::default())
                .collect::<Vec<_>>(),
        ));
        let t_anon = Instant::now();
        let (launched, skipped, took) = anonymous_flood(addr, &a, anon.clone()).await?;
        let t_anon_end = t_anon + took;
        stop_probes.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let probes = probes
            .join()
            .map_err(|_| anyhow::anyhow!("prober panicked"))?;
        let cli = match cli {
            Some(h) => Some(h.join().map_err(|_| anyhow::anyhow!("cli panicked"))?),
            None => None,
        };
        let t_flood_end = Instant::now();
        let samples_now = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let h = &half;
        let timed_out = h.timed_out.load(Ordering::Relaxed);
        let anon = std::mem::take(&mut *anon.lock().unwrap_or_else(|p| p.into_inner()));
        // Only the probes while the attacker was at full strength (after the half-open
        // connections were up).
        let during: Vec<ProbeResult> = probes
            .into_iter()
            .filter(|p| p.at >= t_flood + Duration::from_secs(1))
            .collect();
        flood = json!({
            "half_open": {
                "slots": a.half_open,
                "sources": a.attacker_sources,
                "open_after_2s": half_open_after_2s,
                "open_peak": h.open_peak.load(Ordering::Relaxed),
                "connects": h.connects.load(Ordering::Relaxed),
                "connect_failed": h.connect_failed.load(Ordering::Relaxed),
                "closed_at_once": h.closed_at_once.load(Ordering::Relaxed),
                "closed_by_handshake_timeout": timed_out,
                "mean_held_s": (timed_out > 0).then(|| round1(h.held_ms.load(Ordering::Relaxed) as f64 / timed_out as f64 / 1000.0)),
            },
            "anonymous": {
                "rate_target": a.rate,
                "rate_achieved": round1(launched as f64 / took.as_secs_f64().max(0.001)),
                "skipped_in_flight_cap": skipped,
                "seconds": round1(took.as_secs_f64()),
                "outcomes": anon_summary(&anon),
            },
            "gateway": window(&samples_now, t_flood, t_anon_end),
            "probes": probe_summary(&during),
            "cli": cli.as_deref().map(cli_summary),
        });
        log(format!(
            "flood over after {:.1} s",
            t_flood_end.duration_since(t_flood).as_secs_f64()
        ));
    }

    // Live sessions: stop sending, let the last datagrams arrive, count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    traffic.to_site.sending.store(false, Ordering::Relaxed);
    traffic.to_tech.sending.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t_stop = Instant::now();
    let ended = notes.techs_ended_before(t_stop);
    let (live_sites_lost, idle_sites_lost) = notes.sites_lost_between(t_sites, t_stop, a.sessions);
    let count = |t: &common::Traffic| {
        let (s, r) = (
            t.sent.load(Ordering::Relaxed),
            t.received.load(Ordering::Relaxed),
        );
        json!({"sent": s, "received": r, "lost": s.saturating_sub(r)})
    };
    let live = json!({
        "sessions": a.sessions,
        "technician_links_or_sessions_ended": ended.len(),
        "ended": ended.iter().take(5).collect::<Vec<_>>(),
        "live_site_links_lost": live_sites_lost,
        "idle_site_links_lost": idle_sites_lost,
        "technician_to_site": count(&traffic.to_site),
        "site_to_technician": count(&traffic.to_tech),
    });
    let samples_now = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let idle = window(&samples_now, t_base, t_base_end);

    // Stop: the aggregated refusals are written; count what the audit log grew by.
    sampling.store(0, Ordering::Relaxed);
    let gw_log = gw.log.clone();
    let t_sigterm = Instant::now();
    let stop_s = stop_gateway(gw)?.as_secs_f64();
    // Sites welcomed again by the gateway that was stopping (they dial again within a second).
    let welcomed_while_stopping = notes.welcomed_since(t_sigterm).len();
    let audit = audit_added(&conn, audit_before)?;
    let db_bytes_added = db_bytes(&conn, &state.db()).saturating_sub(db_before);
    let log_bytes_added = log_size().saturating_sub(log_before);
    log(format!("gateway stopped in {stop_s:.1} s; audit: {audit}"));

    // Restart: every site comes back by itself.
    let mut restart = Value::Null;
    if a.restart {
        let gw = start_gateway(&a)?;
        let (t_restart, up_s) = (gw.started, gw.up.as_secs_f64());
        sampling.store(u64::from(gw.pid()), Ordering::Relaxed);
        let back = wait_for("every site back", Duration::from_secs(900), || {
            notes.welcomed_since(t_restart).len() == a.sites
        })
        .await;
        let times = notes.welcomed_since(t_restart);
        let at = |frac: f64| -> Option<f64> {
            let k = ((frac * a.sites as f64).ceil() as usize).clamp(1, a.sites.max(1));
            times.get(k - 1).map(|t| since_s(*t, t_restart))
        };
        let rss = common::rss_kb(gw.pid());
        sampling.store(0, Ordering::Relaxed);
        restart = json!({
            "sites": a.sites,
            "all_back": back.is_ok(),
            "back": times.len(),
            "listening_after_s": round1(up_s),
            "p50_back_s": at(0.5),
            "p90_back_s": at(0.9),
            "p99_back_s": at(0.99),
            "all_back_s": back.is_ok().then(|| at(1.0)).flatten(),
            // The sites' backoff grows while the gateway is down: the stop counts too.
            "all_back_from_sigterm_s": back.is_ok().then(|| times.last().map(|t| since_s(*t, t_sigterm))).flatten(),
            "refused_or_failed_dials": notes.failed_dials_since(t_restart),
            "gateway_rss_mb": round1(rss as f64 / 1024.0),
            "gateway_threads": common::threads(gw.pid()),
        });
        log(format!("restart: {restart}"));
        stop_gateway(gw)?;
    }

    let out = json!({
        "label": a.label,
        "sites": a.sites,
        "sessions": a.sessions,
        "setup_s": round1(setup_s),
        "sites_connect_s": round1(sites_connect_s),
        "idle": idle,
        "baseline_probes": probe_summary(&base_probes),
        "baseline_cli": base_cli.as_deref().map(cli_summary),
        "flood": flood,
        "live": live,
        "audit": audit,
        "database_bytes_added": db_bytes_added,
        "gateway_log_bytes_added": log_bytes_added,
        "stop_s": round1(stop_s),
        "sites_welcomed_while_stopping": welcomed_while_stopping,
        "restart": restart,
        "gateway_log_warnings": log_warnings(&gw_log),
    });
    println!("{out}");
    std::process::exit(0);
}
