//! `pinhole`: the technician's command line.
#![allow(clippy::print_stdout)] // a CLI prints for its user

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pinhole::control::{Request, Response};
use zeroize::Zeroizing;

/// Pinhole: reach one industrial device through your gateway, and nothing else.
///
/// Import the bundle your administrator gave you once, then log in. The `pinholed` daemon must
/// be running; PINHOLE_SOCKET names its socket if it is not the default.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store your PKCS#12 bundle with the daemon (it stays encrypted).
    Import {
        file: PathBuf,
        /// Read the password from this file (first line) instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Unlock the bundle and log in to the gateway it names.
    Login {
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// List the sites and device agents you may use.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show the connection state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Log out.
    Logout,
    /// Make one device reachable: its address is routed through Pinhole, on its agent's ports
    /// only.
    Connect {
        /// SITE/AGENT, as `pinhole ls` shows them.
        target: String,
    },
    /// Disconnect a device, or all of them.
    Disconnect {
        /// SITE/AGENT
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        target: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Show Pinhole in the desktop's system tray: log in and out, connect and disconnect
    /// devices from its menu, and get a notification when a session ends that you did not end.
    ///
    /// Needs a desktop session (its D-Bus session bus, a StatusNotifier host such as the KDE or
    /// XFCE panel or GNOME's AppIndicator extension). Passwords are asked with `pinentry`; the
    /// settings are in ~/.config/pinhole/tray.toml, the tray's log in
    /// ~/.local/state/pinhole/tray.log.
    Tray,
}

fn split_target(t: &str) -> anyhow::Result<(String, String)> {
    match t.split_once('/') {
        Some((s, a)) if !s.is_empty() && !a.is_empty() && !a.contains('/') => {
            Ok((s.to_owned(), a.to_owned()))
        }
        _ => bail!("`{t}` is not SITE/AGENT (see `pinhole ls`)"),
    }
}

fn password(file: Option<&PathBuf>) -> anyhow::Result<Zeroizing<String>> {
    match file {
        Some(p) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            );
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                bail!(
                    "{} is empty: the first line must hold the password",
                    p.display()
                );
            }
            Ok(Zeroizing::new(line.to_owned()))
        }
        None => Ok(Zeroizing::new(
            rpassword::prompt_password("Bundle password: ")
                .context("reading the password from the terminal (or use --password-file)")?,
        )),
    }
}

fn call(req: &Request) -> anyhow::Result<Response> {
    Ok(pinhole::control::call(req)?)
}

fn main() -> std::process::ExitCode {
    pinhole_clidoc::hook::<Cli>("pinhole"); // `__generate-docs DIR`, for packaging/build
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinhole: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The tray: its own runtime (one thread is plenty for a menu), logs on stderr.
fn tray() -> anyhow::Result<()> {
    // A level, not an EnvFilter: per-target directives are not worth the regex engine they
    // link into every technician's `pinhole` (RUST_LOG=debug etc. still works).
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(pinhole::tray::run())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let response = match &cli.command {
        Command::Tray => return tray(),
        Command::Import {
            file,
            password_file,
        } => {
            let data =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            if data.len() > pinhole_certs::bundle::MAX_BUNDLE_LEN {
                bail!("{} is too large to be a bundle", file.display());
            }
            let pw = password(password_file.as_ref())?;
            call(&Request::Import {
                bundle: hex::encode(&data),
                password: pw.to_string(),
            })?
        }
        Command::Login { password_file } => {
            let pw = password(password_file.as_ref())?;
            call(&Request::Login {
                password: pw.to_string(),
            })?
        }
        Command::Ls { .. } => call(&Request::List)?,
        Command::Status { .. } => call(&Request::Status)?,
        Command::Logout => call(&Request::Logout)?,
        Command::Connect { target } => {
            let (site, agent) = split_target(target)?;
            call(&Request::Connect { site, agent })?
        }
        Command::Disconnect { target, all } => {
            let (site, agent) = match target {
                Some(t) => {
                    let (s, a) = split_target(t)?;
                    (Some(s), Some(a))
                }
                None => (None, None),
            };
            call(&Request::Disconnect {
                site,
                agent,
                all: *all,
            })?
        }
    };
    let json = matches!(
        cli.command,
        Command::Ls { json: true } | Command::Status { json: true }
    );
    match response {
        Response::Ok { message } => println!("{message}"),
        Response::Error { message } => bail!("{message}"),
        Response::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
        Response::Status(s) => {
            println!("state:       {:?}", s.state);
            if let Some(a) = &s.account {
                println!("account:     {a}");
            }
            if let Some(g) = &s.gateway {
                println!("gateway:     {g}");
            }
            if let Some(ip) = s.tunnel_ip {
                println!("tunnel:      {ip}");
            }
            if let Some(t) = &s.since {
                println!("since:       {t}");
            }
            if let Some(t) = &s.certificate_expires {
                println!("certificate: valid until {t}");
            }
            println!("sites:       {}", s.sites);
            if let Some(e) = &s.last_error {
                println!("last error:  {e}");
            }
            if !s.sessions.is_empty() {
                println!();
                println!(
                    "{:<28} {:<16} {:<20} {:<21} {:>10} {:>10}",
                    "DEVICE", "ADDRESS", "PORTS", "SINCE", "OUT", "IN"
                );
                for v in &s.sessions {
                    println!(
                        "{:<28} {:<16} {:<20} {:<21} {:>10} {:>10}",
                        format!("{}/{}", v.site, v.agent),
                        v.device.to_string(),
                        v.ports,
                        v.since,
                        v.bytes_out,
                        v.bytes_in
                    );
                }
            }
            if !s.filter.dropped.is_empty() {
                let drops: Vec<String> = s
                    .filter
                    .dropped
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                println!(
                    "filtered:    {} passed; {} refused at once; dropped: {}",
                    s.filter.passed,
                    s.filter.answered,
                    drops.join(", ")
                );
            }
            let sp = &s.filter.super_packets;
            if sp.sent + sp.received + sp.split > 0 {
                let avg = |bytes: u64, n: u64| bytes.checked_div(n).unwrap_or(0);
                println!(
                    "offload:     {} super-packets sent (avg {} B), {} received (avg {} B), {} cut for a peer without offload",
                    sp.sent,
                    avg(sp.sent_bytes, sp.sent),
                    sp.received,
                    avg(sp.received_bytes, sp.received),
                    sp.split
                );
            }
            for r in &s.refused {
                println!(
                    "refused:     {} to {}: not among the ports of {} ({}); {} packet(s) refused",
                    r.last,
                    r.device,
                    r.agents.join(", "),
                    r.allowed,
                    r.count
                );
            }
        }
        Response::Inventory { sites } if json => {
            println!("{}", serde_json::to_string_pretty(&sites)?)
        }
        Response::Inventory { sites } => {
            if sites.is_empty() {
                println!("no sites: your account has no grants, or none of its sites is enrolled");
            }
            println!(
                "{:<20} {:<20} {:<12} {:<16} {:<20} ONLINE",
                "SITE", "AGENT", "TYPE", "DEVICE", "PORTS"
            );
            for s in sites {
                if s.agents.is_empty() {
                    println!(
                        "{:<20} {:<20} {:<12} {:<16} {:<20} {}",
                        s.name,
                        "-",
                        "-",
                        "-",
                        "-",
                        if s.online { "yes" } else { "no" }
                    );
                }
                for a in &s.agents {
                    println!(
                        "{:<20} {:<20} {:<12} {:<16} {:<20} {}",
                        s.name,
                        a.name,
                        a.kind.to_string(),
                        a.address.to_string(),
                        a.ports_text(),
                        if s.online { "yes" } else { "no" }
                    );
                }
            }
        }
    }
    Ok(())
}
