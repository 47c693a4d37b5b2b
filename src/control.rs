//! The local control protocol between `pinhole` (CLI, tray) and `pinholed`: one JSON request
//! per line, one JSON response per line, over a Unix socket whose peer the daemon checks.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use pinhole_proto::SiteView;
use serde::{Deserialize, Serialize};

/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/pinhole/pinholed.sock";

/// Overrides the socket path for both programs (tests run several clients side by side).
pub const SOCKET_ENV: &str = "PINHOLE_SOCKET";

/// A request larger than this is refused: a bundle is a few kilobytes.
pub const MAX_REQUEST: usize = 2 * 1024 * 1024;

/// The socket path: `PINHOLE_SOCKET`, else the default.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Store a bundle (hex of the PKCS#12 bytes) after checking it opens with `password`.
    Import {
        bundle: String,
        password: String,
    },
    Login {
        password: String,
    },
    Logout,
    Status,
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// No bundle imported yet.
    NoBundle,
    LoggedOut,
    Connecting,
    LoggedIn,
    /// Reconnecting after a loss.
    Reconnecting,
    /// Stopped for good until the next login (account closed, pin mismatch, …).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: LinkState,
    pub account: Option<String>,
    pub gateway: Option<String>,
    pub tunnel_ip: Option<Ipv4Addr>,
    /// When the current login succeeded (UTC, RFC 3339).
    pub since: Option<String>,
    pub certificate_expires: Option<String>,
    /// The last problem, in words a technician understands.
    pub last_error: Option<String>,
    pub sites: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Ok { message: String },
    Error { message: String },
    Status(Status),
    Inventory { sites: Vec<SiteView> },
}
