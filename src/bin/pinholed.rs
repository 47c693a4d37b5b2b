//! `pinholed`: the Pinhole client daemon (runs as root).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Pinhole client daemon: keeps the technician's bundle, logs in to the gateway and keeps the
/// link up. The `pinhole` command talks to it; root and members of the `pinhole` group may.
#[derive(Debug, Parser)]
#[command(name = "pinholed", version, about, long_about)]
struct Cli {
    /// State directory: the imported bundle (still encrypted).
    #[arg(long, default_value = "/var/lib/pinhole")]
    state: PathBuf,
    /// Control socket (PINHOLE_SOCKET overrides the default for both programs).
    #[arg(long, env = "PINHOLE_SOCKET", default_value = pinhole::control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Name of the virtual adapter (PINHOLE_TUN). One daemon per network namespace uses the
    /// default; tests that run several side by side give each its own.
    #[arg(long, env = "PINHOLE_TUN", default_value = pinhole::plane::TUN_NAME)]
    tun: String,
    /// Let packets from other source addresses than the tunnel address (a VM or container
    /// behind this computer, routed into the tunnel) through. Off: only this computer's own
    /// programs reach the devices.
    #[arg(long, env = "PINHOLE_ALLOW_OTHER_SOURCES")]
    allow_other_sources: bool,
}

fn main() -> std::process::ExitCode {
    pinhole_clidoc::hook::<Cli>("pinholed"); // `__generate-docs DIR`, for packaging/build
    let cli = Cli::parse();
    pinhole_shell::telemetry::init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| {
            let adapter = pinhole::plane::AdapterConfig {
                tun_name: cli.tun,
                other_sources: cli.allow_other_sources,
            };
            rt.block_on(pinhole::daemon::run(&cli.state, &cli.socket, adapter))
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinholed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
