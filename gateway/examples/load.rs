//! Gateway scale benchmark: N idle sites and M live sessions against a real gateway, over real
//! TLS, from one process. Used by `bench/run --scale`; not part of the product.
//!
//!   cargo run --release -p pinhole-gateway --example load -- \
//!       --state DIR --gateway 127.0.0.1:18443 --sites 1000 --sessions 100 --pid GATEWAY_PID
//!
//! It enrolls the sites and creates the technician accounts directly in the gateway's state
//! (the same library calls the CLI makes), connects them all, opens one session per technician,
//! then measures the gateway's resident memory and CPU while everything idles, and how long
//! `account close` takes to end a live session under that load. Prints one JSON object.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pinhole_certs::{GatewayInfo, Identity, PinnedServerVerifier, Validity, tls};
use pinhole_gateway::audit::Actor;
use pinhole_gateway::state::StateDir;
use pinhole_proto::{Agent, AgentType, ClientCore, ClientEvent, SiteCore, SiteEvent, SiteHello};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

type Stream = tokio_rustls::client::TlsStream<TcpStream>;

async fn dial(
    addr: SocketAddr,
    identity: &Identity,
    pin: pinhole_certs::Pin,
) -> anyhow::Result<Stream> {
    let config = tls::client_config(identity, PinnedServerVerifier::new(pin))?;
    let tcp = TcpStream::connect(addr).await?;
    Ok(TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?)
}

/// An idle site: says hello, answers heartbeats and session requests, forever.
async fn site(
    addr: SocketAddr,
    identity: Identity,
    pin: pinhole_certs::Pin,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let mut s = dial(addr, &identity, pin).await?;
    let agent = Agent::new("plc", AgentType::SiemensS7, "192.168.0.10".parse()?, []);
    let mut core = SiteCore::new(
        Instant::now(),
        SiteHello {
            software: "load".into(),
            boot_id: "load".into(),
            heartbeat: Duration::from_secs(3600),
            agents: vec![agent.clone()],
        },
    );
    let mut buf = vec![0u8; 4096];
    let mut ready = Some(ready);
    loop {
        while let Some(ev) = core.poll_event() {
            match ev {
                SiteEvent::Welcomed => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(()).await;
                    }
                }
                SiteEvent::SessionOpen { session, .. } => {
                    core.session_opened(session, &"00".repeat(32), agent.clone(), Instant::now())
                }
                SiteEvent::Closed(r) => bail!("site closed: {r:?}"),
                _ => {}
            }
        }
        while let Some(b) = core.poll_transmit() {
            s.write_all(&b).await?;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("gateway closed");
        }
        core.handle_input(&buf[..n], Instant::now());
    }
}

/// A technician with one open session; reports when its link ends.
async fn technician(
    addr: SocketAddr,
    identity: Identity,
    pin: pinhole_certs::Pin,
    site: String,
    opened: tokio::sync::mpsc::Sender<()>,
    ended: tokio::sync::mpsc::Sender<(String, Instant)>,
    name: String,
) -> anyhow::Result<()> {
    let mut s = dial(addr, &identity, pin).await?;
    let mut core = ClientCore::new(Instant::now(), "load", Duration::from_secs(3600));
    let mut buf = vec![0u8; 4096];
    let mut opened = Some(opened);
    loop {
        while let Some(ev) = core.poll_event() {
            match ev {
                ClientEvent::LoggedIn { .. } => {
                    core.open_session(1, &site, "plc", &"11".repeat(32), Instant::now())
                }
                ClientEvent::SessionOpened { .. } => {
                    if let Some(o) = opened.take() {
                        let _ = o.send(()).await;
                    }
                }
                ClientEvent::SessionRefused { reason, .. } => bail!("refused: {reason}"),
                ClientEvent::Closed(_) => {
                    let _ = ended.send((name.clone(), Instant::now())).await;
                    return Ok(());
                }
                _ => {}
            }
        }
        while let Some(b) = core.poll_transmit() {
            s.write_all(&b).await?;
        }
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            let _ = ended.send((name.clone(), Instant::now())).await;
            return Ok(());
        }
        core.handle_input(&buf[..n], Instant::now());
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let state = StateDir::new(&a.state);
    let loaded = state.load()?;
    let mut store = state.store()?;
    let admin = Actor::Admin("load".into());
    let domain: pinhole_gateway::store::DomainPath = "load".parse()?;
    let _ = store.create_domain(&admin, &domain);
    let t0 = Instant::now();
    // Sites: enrolled through the store, each with its own key and certificate.
    let mut site_ids = Vec::new();
    for i in 0..a.sites {
        let name = format!("load-{i}");
        let (key, spki) = pinhole_certs::ca::generate_site_key()?;
        let (token, _) = store.create_token(&admin, &domain, Duration::from_secs(600))?;
        let ca = &loaded.ca;
        let cert = store.enroll(&token, &name, || {
            let c = ca
                .issue_site(&name, &spki, Validity::days_from_now(2))
                .map_err(|e| e.to_string())?;
            let serial = pinhole_certs::PeerIdentity::from_certificate(&c)
                .map_err(|e| e.to_string())?
                .serial;
            Ok((c.to_vec(), serial))
        })?;
        let id = Identity::from_parts(
            key,
            vec![CertificateDer::from(cert), ca.certificate().clone()],
        )
        .context("site identity")?;
        site_ids.push((name, id));
    }
    // Technicians: one account each, granted the domain.
    let info = GatewayInfo::new(loaded.addresses.clone(), loaded.pin)?;
    let mut techs = Vec::new();
    for i in 0..a.sessions {
        let name = format!("tech-{i}");
        let id = loaded
            .ca
            .issue_technician(&name, &info, Validity::days_from_now(2))?;
        let serial = pinhole_certs::PeerIdentity::from_certificate(id.certificate())?.serial;
        store.create_account(&admin, &name, &serial, 2)?;
        store.set_grant(&admin, &name, &domain, true)?;
        techs.push((name, id));
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let rss_before = rss_kb(a.pid);

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(1024);
    let n_sites = site_ids.len();
    let site_names: Vec<String> = site_ids.iter().map(|(n, _)| n.clone()).collect();
    for (_, id) in site_ids {
        let tx = ready_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = site(a.gateway, id, loaded.pin, tx).await {
                eprintln!("site: {e:#}");
            }
        });
    }
    let t1 = Instant::now();
    for _ in 0..n_sites {
        tokio::time::timeout(Duration::from_secs(300), ready_rx.recv())
            .await?
            .context("sites")?;
    }
    let sites_connect_s = t1.elapsed().as_secs_f64();
    let rss_sites = rss_kb(a.pid);

    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel(1024);
    let (end_tx, mut end_rx) = tokio::sync::mpsc::channel(1024);
    let n_techs = techs.len();
    for (i, (name, id)) in techs.into_iter().enumerate() {
        let site = site_names[i % n_sites.max(1)].clone();
        let (o, e) = (open_tx.clone(), end_tx.clone());
        tokio::spawn(async move {
            if let Err(err) = technician(a.gateway, id, loaded.pin, site, o, e, name).await {
                eprintln!("technician: {err:#}");
            }
        });
    }
    for _ in 0..n_techs {
        tokio::time::timeout(Duration::from_secs(300), open_rx.recv())
            .await?
            .context("sessions")?;
    }
    // Idle for a while: memory and CPU of an idle gateway under this load.
    let cpu0 = cpu_ticks(a.pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu_pct = (cpu_ticks(a.pid) - cpu0) as f64 / 100.0 / 10.0 * 100.0;
    let rss_all = rss_kb(a.pid);

    // Close one account and time until its link ends.
    let mut close_ms = None;
    if n_techs > 0 {
        let t = Instant::now();
        store.close_account(&admin, "tech-0")?;
        while let Some((name, at)) =
            tokio::time::timeout(Duration::from_secs(10), end_rx.recv()).await?
        {
            if name == "tech-0" {
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
            "setup_s": (setup_s * 10.0).round() / 10.0,
            "sites_connect_s": (sites_connect_s * 10.0).round() / 10.0,
            "gateway_rss_kb_before": rss_before,
            "gateway_rss_kb_with_sites": rss_sites,
            "gateway_rss_kb_with_sessions": rss_all,
            "kb_per_idle_site": (per_site_kb * 10.0).round() / 10.0,
            "gateway_idle_cpu_percent": (idle_cpu_pct * 10.0).round() / 10.0,
            "account_close_ms": close_ms.map(|m| (m * 10.0).round() / 10.0),
        })
    );
    std::process::exit(0);
}
