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
    /// Reach the gateway through this HTTP proxy (CONNECT; the TLS to the gateway and its pin
    /// are inside): `http://HOST[:PORT]`. HTTPS_PROXY (or https_proxy) is used when this is
    /// not given. Credentials never go in the URL: see --proxy-credentials.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// How to authenticate to the proxy.
    #[arg(long, value_enum, default_value = "none")]
    proxy_auth: ProxyAuth,
    /// File with the proxy user (or DOMAIN\\user for NTLM) on the first line and the password
    /// on the second; mode 600.
    #[arg(long, value_name = "FILE")]
    proxy_credentials: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProxyAuth {
    None,
    Basic,
    Ntlm,
}

impl Cli {
    /// The proxy from the options or the environment.
    fn proxy(&self) -> anyhow::Result<Option<pinhole_shell::proxy::Proxy>> {
        use pinhole_shell::proxy::{Auth, Proxy};
        let url = self.proxy.clone().or_else(|| {
            ["HTTPS_PROXY", "https_proxy"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        });
        let Some(url) = url else {
            if self.proxy_credentials.is_some() || !matches!(self.proxy_auth, ProxyAuth::None) {
                anyhow::bail!("--proxy-auth and --proxy-credentials need --proxy (or HTTPS_PROXY)");
            }
            return Ok(None);
        };
        let auth = match self.proxy_auth {
            ProxyAuth::None => Auth::None,
            ProxyAuth::Basic => Auth::Basic,
            ProxyAuth::Ntlm => Auth::Ntlm,
        };
        Proxy::from_setting(&url, auth, self.proxy_credentials.as_deref())
            .map(Some)
            .context("the proxy setting")
    }
}

fn main() -> std::process::ExitCode {
    pinhole_clidoc::hook::<Cli>("pinholed"); // `__generate-docs DIR`, for packaging/build
    let cli = Cli::parse();
    pinhole_shell::telemetry::init();
    let proxy = match cli.proxy() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pinholed: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
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
            rt.block_on(pinhole::daemon::run(
                &cli.state,
                &cli.socket,
                adapter,
                proxy,
            ))
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinholed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
