//! The local control protocol between `pinhole` (CLI, tray) and `pinholed`: one JSON request
//! per line, one JSON response per line, over a Unix socket whose peer the daemon checks.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use pinhole_proto::SiteView;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

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

/// How long a client waits for the daemon's answer: a login dials the gateway, which the
/// daemon bounds itself well below this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many ended sessions [`Status::ended`] keeps: enough for a tray that polls every few
/// seconds to see every one, bounded so that a flapping site cannot grow the status.
pub const ENDED_KEPT: usize = 16;

/// Why [`call`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(
        "cannot reach pinholed at {path} (is it running? PINHOLE_SOCKET overrides the path): {source}"
    )]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to pinholed: {0}")]
    Io(#[from] std::io::Error),
    #[error("pinholed closed the connection without answering")]
    NoAnswer,
    #[error("the daemon's answer is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Sends one request to the daemon at [`socket_path`] and reads its answer (blocking): the one
/// client of the control protocol, used by the CLI and the tray alike.
pub fn call(req: &Request) -> Result<Response, CallError> {
    let path = socket_path();
    let mut stream = UnixStream::connect(&path).map_err(|source| CallError::Unreachable {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = Zeroizing::new(serde_json::to_vec(req)?);
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(CallError::NoAnswer);
    }
    Ok(serde_json::from_str(&reply)?)
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
    /// The last sessions that ended without the technician asking (the gateway closed them,
    /// the account was closed, the link was lost), oldest first, at most [`ENDED_KEPT`]. Kept
    /// across logins so that their numbers only grow.
    #[serde(default)]
    pub ended: Vec<EndedView>,
    /// Whether the account lets the technician's tray remember the bundle password (in the
    /// desktop's Secret Service), as the gateway said in this login's welcome; `None` before
    /// a welcome. Kept after a logout, until the next login.
    #[serde(default)]
    pub remember_password: Option<bool>,
}

impl Status {
    /// Records that `site/agent` ended for `reason`, numbered after the last one.
    pub fn push_ended(&mut self, site: &str, agent: &str, reason: &str, at: String) {
        let seq = self.ended.last().map_or(1, |e| e.seq + 1);
        if self.ended.len() >= ENDED_KEPT {
            self.ended.remove(0);
        }
        self.ended.push(EndedView {
            seq,
            site: site.to_owned(),
            agent: agent.to_owned(),
            reason: reason.to_owned(),
            at,
        });
    }
}

/// A session that ended without the technician asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedView {
    /// Grows by one per ended session for the daemon's lifetime: a client that remembers the
    /// last number it saw finds exactly the new ones.
    pub seq: u64,
    pub site: String,
    pub agent: String,
    /// In words a technician understands.
    pub reason: String,
    /// UTC, RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCounters {
    pub passed: u64,
    /// Refused packets answered at once (TCP RST, ICMP administratively prohibited).
    #[serde(default)]
    pub answered: u64,
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// GSO super-packets (TUN offload) that passed each way: `sent` toward the sites,
    /// `received` from them; bytes are whole IP packets. Zero without TUN offload.
    #[serde(default)]
    pub super_packets: SuperPackets,
}

/// See [`FilterCounters::super_packets`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuperPackets {
    /// Read from the TUN and sent toward a site whole.
    pub sent: u64,
    /// Their bytes (whole IP packets).
    pub sent_bytes: u64,
    /// Received from a site, checked, and written to the TUN whole.
    pub received: u64,
    /// Their bytes (whole IP packets).
    pub received_bytes: u64,
    /// Read from the TUN and cut into MTU-size packets before encryption: the site or the
    /// gateway did not announce offload (absent from daemons that predate it).
    #[serde(default)]
    pub split: u64,
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

// One response exists per request, built and sent at once: boxing the status would only move
// the same bytes to the heap.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Ok { message: String },
    Error { message: String },
    Status(Status),
    Inventory { sites: Vec<SiteView> },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            state: LinkState::LoggedIn,
            account: None,
            gateway: None,
            tunnel_ip: None,
            since: None,
            certificate_expires: None,
            last_error: None,
            sites: 0,
            sessions: Vec::new(),
            filter: FilterCounters::default(),
            refused: Vec::new(),
            ended: Vec::new(),
            remember_password: None,
        }
    }

    #[test]
    fn ended_sessions_are_numbered_and_bounded() {
        let mut s = status();
        for i in 0..ENDED_KEPT + 3 {
            s.push_ended(
                "plant-a",
                &format!("a{i}"),
                "site switched off",
                String::new(),
            );
        }
        assert_eq!(s.ended.len(), ENDED_KEPT);
        assert_eq!(s.ended[0].seq, 4);
        assert_eq!(s.ended.last().map(|e| e.seq), Some(ENDED_KEPT as u64 + 3));
        assert_eq!(s.ended[0].agent, "a3");
    }

    #[test]
    fn a_status_without_ended_sessions_still_parses() {
        let mut v = serde_json::to_value(status()).expect("json");
        v.as_object_mut().expect("object").remove("ended");
        let s: Status = serde_json::from_value(v).expect("parses");
        assert!(s.ended.is_empty());
    }
}
