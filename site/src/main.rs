//! `pinhole-site`: see the crate documentation.

use clap::Parser;

/// Pinhole site: the agent that connects a plant to its gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the site agent is not built yet; see README.md for the project status")
}
