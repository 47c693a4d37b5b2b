//! `pinholed`: see the crate documentation.

use clap::Parser;

/// Pinhole client.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the client is not built yet; see README.md for the project status")
}
