//! `pinhole-gateway`: see the crate documentation.

use clap::Parser;

/// Pinhole gateway: the relay server, registry and audit log.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the gateway server is not built yet; see README.md for the project status")
}
