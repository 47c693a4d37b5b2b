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
    /// Connect a device: `site/agent`.
    Connect {
        site: String,
        agent: String,
    },
    /// Disconnect one device, or every device with `all`.
    Disconnect {
        site: Option<String>,
        agent: Option<String>,
        all: bool,
    },
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
    /// Connected devices.
    #[serde(default)]
    pub sessions: Vec<SessionView>,
    /// Packets the filter dropped, by reason (`not-connected`, `port-not-allowed`, …), and the
    /// number it passed.
    #[serde(default)]
    pub filter: FilterCounters,
    /// Per connected device that refused something: which agents' ports refused it.
    #[serde(default)]
    pub refused: Vec<RefusedView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCounters {
    pub passed: u64,
    /// Refused packets answered at once (TCP RST, ICMP administratively prohibited).
    #[serde(default)]
    pub answered: u64,
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// What a connected device's agents refused: the technician's tools got a RST or an ICMP
/// "administratively prohibited" for it at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedView {
    pub device: std::net::IpAddr,
    /// The connected agents (`site/agent`) whose ports were checked.
    pub agents: Vec<String>,
    /// Their ports together: what the device allows.
    pub allowed: String,
    pub count: u64,
    /// The last refused port, e.g. `tcp/22`.
    pub last: String,
}

/// One connected device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub site: String,
    pub agent: String,
    pub device: std::net::IpAddr,
    pub ports: String,
    /// UTC, RFC 3339.
    pub since: String,
    /// Bytes of the site's tunnel (shared by the agents of one site): to and from the site.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Ok { message: String },
    Error { message: String },
    Status(Status),
    Inventory { sites: Vec<SiteView> },
}
