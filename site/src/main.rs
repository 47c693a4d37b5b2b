//! `pinhole-site`: the site agent and its local commands.
#![allow(clippy::print_stdout)] // a CLI prints for its user

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use pinhole_site::agent::{SiteAgent, SiteState};
use pinhole_site::config::Config;

/// Pinhole site agent: connects a plant's devices to its gateway.
///
/// The site dials out (no open port), enrolls once with a one-time token, pins the gateway's
/// key on first use, and reports its device agents.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (until SIGTERM; SIGHUP reloads site.toml).
    Run {
        #[arg(long, default_value = "/etc/pinhole-site/site.toml")]
        config: PathBuf,
        #[arg(long, default_value = "/var/lib/pinhole-site")]
        state: PathBuf,
    },
    /// Forget the pinned gateway key: the next gateway whose certificate chains to the CA
    /// received at enrollment is pinned.
    Repin {
        #[arg(long, default_value = "/var/lib/pinhole-site")]
        state: PathBuf,
    },
    /// Remove the device routing domain (policy rules and table) that stays in place while
    /// the site is stopped: before uninstalling.
    RemoveIsolation {
        #[arg(long, default_value = "/var/lib/pinhole-site")]
        state: PathBuf,
    },
    /// Allow (on) or forbid (off) remote access, for sites without a hardware switch: writes
    /// the [switch] input file of site.toml.
    Switch {
        state: OnOff,
        #[arg(long, default_value = "/etc/pinhole-site/site.toml")]
        config: PathBuf,
    },
    /// Check site.toml and print what it defines.
    Check {
        #[arg(long, default_value = "/etc/pinhole-site/site.toml")]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    pinhole_clidoc::hook::<Cli>("pinhole-site"); // `__generate-docs DIR`, for packaging/build
    let cli = Cli::parse();
    pinhole_shell::telemetry::init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinhole-site: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, state } => {
            let agent = SiteAgent::new(&config, &state)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?
                .block_on(agent.run())
        }
        Command::Repin { state } => {
            let store = SiteState::new(&state).pin_store();
            if store.forget()? {
                println!(
                    "forgot the pinned gateway key; the next gateway whose certificate chains to \
                     the CA received at enrollment ({}) is pinned. Compare the pin the site logs \
                     (\"gateway key pinned\") with `pinhole-gateway init`'s or the gateway's log.",
                    state.join("ca.crt").display()
                );
            } else {
                println!("no gateway key was pinned");
            }
            Ok(())
        }
        Command::RemoveIsolation { state } => {
            pinhole_site::isolation::remove(&state);
            println!(
                "removed the device routing domain: the uplink and device networks are now kept apart only by this machine's own settings"
            );
            Ok(())
        }
        Command::Switch { state, config } => {
            let c = Config::load(&config)?;
            let Some(switch) = c.switch else {
                bail!(
                    "{} has no [switch] section: add one with `path` and `mode`",
                    config.display()
                );
            };
            let on = matches!(state, OnOff::On);
            std::fs::write(&switch.path, format!("{}\n", switch.value_for(on)))
                .with_context(|| format!("writing {}", switch.path.display()))?;
            println!("remote access {}", if on { "enabled" } else { "disabled" });
            Ok(())
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            println!(
                "site {} → {}",
                c.name,
                c.gateways
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for a in &c.agents {
                println!(
                    "  agent {} ({}) {} {}",
                    a.name,
                    a.kind,
                    a.address,
                    a.ports_text()
                );
            }
            Ok(())
        }
    }
}
