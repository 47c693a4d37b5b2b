//! The CA signer: the gateway CA's private key in a process of its own, away from the network.
//!
//! `pinhole-gateway serve` faces the internet. With a signer it keeps only the CA certificate
//! (`STATE/ca.crt`) and asks `pinhole-gateway signer` over a Unix socket for each certificate it
//! hands out: a site's at enrollment, a technician's when the portal issues a bundle. The
//! signer runs as its own user (`pinhole-ca`) in a unit without network access, and its state
//! directory holds `ca.crt` and `ca.key` (0600). Whoever takes over the serve process can then
//! ask for certificates while they hold it — at most [`DEFAULT_PER_MINUTE`] a minute, each one
//! written to the signer's own log — but cannot carry the key away: once the hole is closed,
//! the certificates they obtained are found in `ISSUED.log` by serial and revoked, and the CA
//! (which every site and bundle trusts) need not be replaced.
//!
//! ```text
//! CA_STATE/              0700, the signer's user
//!   ca.crt  ca.key       the CA certificate, and its key (0600)
//!   issued.log           one line per certificate issued (0600): time, kind, name, serial, uid
//! ```
//!
//! # Protocol
//!
//! One request per connection. A frame is a 4-byte big-endian length and that many bytes of
//! JSON, at most [`MAX_FRAME`] bytes; the request is a [`Request`], the answer a [`Response`].
//! Keys and certificates travel as lower-case hex of their DER. The signer trusts nothing in
//! a request: names go through [`pinhole_proto::validate::name`] (the rule of certificate
//! subjects), a public key must be an uncompressed P-256 SubjectPublicKeyInfo whose point is
//! on the curve (the only kind Pinhole generates), a validity is bounded, gateway addresses
//! are parsed and counted, and the caller's uid (`SO_PEERCRED`) must be root, the signer's own,
//! or one named with `--allow-user`. A refused request changes nothing and is logged.
//!
//! The signer issues site and technician certificates only: never a server certificate or a
//! CA. It never sees a private key other than its own: the caller generates the technician's
//! key and sends its public half.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pinhole_certs::ca::{SERVER_DAYS, generate_site_key};
use pinhole_certs::{
    CertificateAuthority, GatewayAddress, GatewayInfo, Identity, PeerIdentity, Pin, Role, Validity,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::registry::Issued;

/// Where the packaged signer listens, and where the CLI looks for it when the gateway's state
/// directory holds no `ca.key`.
pub const DEFAULT_SOCKET: &str = "/run/pinhole-ca/signer.sock";

/// The packaged signer's state directory.
pub const DEFAULT_CA_STATE: &str = "/var/lib/pinhole-ca";

/// The largest frame (length prefix excluded), in bytes, either way. A request is a few hundred
/// bytes; an answer a certificate of well under 1 KiB, in hex.
pub const MAX_FRAME: usize = 8 * 1024;

/// Certificates the signer issues a minute unless `--per-minute` says otherwise: far above what
/// enrollments and portal bundles need, far below what an intruder would like.
pub const DEFAULT_PER_MINUTE: u32 = 30;

/// Site certificates last as long as the server's.
pub const SITE_DAYS: i64 = SERVER_DAYS;

/// The longest technician certificate the signer issues, in days.
pub const MAX_TECHNICIAN_DAYS: i64 = SERVER_DAYS;

/// The most gateway addresses a technician certificate carries.
pub const MAX_ADDRESSES: usize = 16;

/// How long the signer waits for a caller's request frame, and to hand over its answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller ([`SignerClient`]) waits for each read and write on the socket. The
/// gateway asks while holding the hub's decision lock (an enrollment), so this bounds how long
/// a stuck signer can stall every other link's decisions; a signature takes milliseconds.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The signer's record of what it issued, in its state directory.
pub const ISSUED_LOG: &str = "issued.log";

/// DER of the SubjectPublicKeyInfo header of an uncompressed P-256 key (RFC 5480):
/// `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) 04 X Y }`.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The prefix, then 0x04 and two 32-byte coordinates.
const P256_SPKI_LEN: usize = P256_SPKI_PREFIX.len() + 65;

/// What a caller asks the signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The CA certificate, for the caller to check against its `ca.crt`.
    CaCertificate,
    /// A site certificate, valid [`SITE_DAYS`], for the site's key.
    Site {
        /// The site name (certificate subject CN).
        name: String,
        /// Hex of the site's DER SubjectPublicKeyInfo (P-256).
        public_key: String,
    },
    /// A technician certificate for a key the caller generated.
    Technician {
        /// The account name (certificate subject CN).
        account: String,
        /// Hex of the technician's DER SubjectPublicKeyInfo (P-256).
        public_key: String,
        /// Validity, 1 to [`MAX_TECHNICIAN_DAYS`] days.
        days: i64,
        /// Where the gateway is (`HOST:PORT`, 1 to [`MAX_ADDRESSES`]), for the certificate's
        /// gateway extension.
        addresses: Vec<String>,
        /// The gateway's key pin, for the same extension.
        pin: String,
    },
}

/// The signer's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Hex of a DER certificate.
    Certificate { der: String },
    /// Why the request was refused; nothing was issued.
    Error { message: String },
}

/// Why asking the signer failed.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("the CA signer at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the CA signer refused: {0}")]
    Refused(String),
    #[error("the CA signer's answer is malformed: {0}")]
    Malformed(String),
    #[error("the CA signer's certificate does not match the request: {0}")]
    Mismatch(&'static str),
    #[error(transparent)]
    Issue(#[from] pinhole_certs::IssueError),
}

// ---------------------------------------------------------------- frames

/// Reads one frame; `Err` carries the reason to send back.
async fn read_frame(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "the request is {len} bytes long; at most {MAX_FRAME} are allowed"
        ));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    Ok(body)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------- validation

/// Checks that `der` is an uncompressed P-256 SubjectPublicKeyInfo with its point on the curve.
pub fn check_p256_spki(der: &[u8]) -> Result<(), String> {
    if der.len() != P256_SPKI_LEN || der[..P256_SPKI_PREFIX.len()] != P256_SPKI_PREFIX {
        return Err("the public key is not an uncompressed P-256 SubjectPublicKeyInfo".into());
    }
    aws_lc_rs::signature::ParsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &der[P256_SPKI_PREFIX.len()..],
    )
    .map_err(|_| "the public key is not a point on P-256".to_owned())?;
    Ok(())
}

fn public_key(hex_text: &str) -> Result<Vec<u8>, String> {
    if hex_text.len() != 2 * P256_SPKI_LEN {
        return Err(format!(
            "the public key is {} hex digits long; a P-256 key is {}",
            hex_text.len(),
            2 * P256_SPKI_LEN
        ));
    }
    let der = hex::decode(hex_text).map_err(|_| "the public key is not hexadecimal".to_owned())?;
    check_p256_spki(&der)?;
    Ok(der)
}

/// A request that passed every check.
#[derive(Debug)]
enum Checked {
    Ca,
    Site {
        name: String,
        spki: Vec<u8>,
    },
    Technician {
        account: String,
        spki: Vec<u8>,
        days: i64,
        info: GatewayInfo,
    },
}

fn check(request: Request) -> Result<Checked, String> {
    match request {
        Request::CaCertificate => Ok(Checked::Ca),
        Request::Site {
            name,
            public_key: k,
        } => {
            pinhole_proto::validate::name("site name", &name).map_err(|e| e.to_string())?;
            Ok(Checked::Site {
                name,
                spki: public_key(&k)?,
            })
        }
        Request::Technician {
            account,
            public_key: k,
            days,
            addresses,
            pin,
        } => {
            pinhole_proto::validate::name("account", &account).map_err(|e| e.to_string())?;
            if !(1..=MAX_TECHNICIAN_DAYS).contains(&days) {
                return Err(format!(
                    "days is {days}; it must be 1 to {MAX_TECHNICIAN_DAYS}"
                ));
            }
            if addresses.is_empty() || addresses.len() > MAX_ADDRESSES {
                return Err(format!(
                    "{} gateway addresses; 1 to {MAX_ADDRESSES} are allowed",
                    addresses.len()
                ));
            }
            let addresses = addresses
                .iter()
                .map(|a| {
                    a.parse::<GatewayAddress>().map_err(|e| {
                        format!(
                            "gateway address `{}`: {e}",
                            pinhole_proto::validate::excerpt(a)
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let pin: Pin = pin.parse().map_err(|e| format!("the gateway pin: {e}"))?;
            let info = GatewayInfo::new(addresses, pin).map_err(|e| e.to_string())?;
            Ok(Checked::Technician {
                account,
                spki: public_key(&k)?,
                days,
                info,
            })
        }
    }
}

// ---------------------------------------------------------------- the signer process

/// How the signer serves.
#[derive(Debug, Clone)]
pub struct SignerOptions {
    /// The socket to create (a stale socket there is replaced; anything else is refused).
    pub socket: PathBuf,
    /// Callers allowed besides root and the signer's own uid.
    pub allowed_uids: Vec<u32>,
    /// The group the socket (mode 0660) must have, so that the gateway's user can connect:
    /// given with `chown` unless the socket was born in it (a set-group-ID directory).
    pub socket_gid: Option<u32>,
    /// Certificates a minute, at most.
    pub per_minute: u32,
}

/// Loads the CA from the signer's state directory, refusing a key others may read.
pub fn load_ca(dir: &Path) -> anyhow::Result<CertificateAuthority> {
    let key_path = dir.join("ca.key");
    let meta = fs::metadata(&key_path).with_context(|| {
        format!(
            "reading {} (move the gateway's ca.key there: see README, \"The CA signer\")",
            key_path.display()
        )
    })?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "{} is mode {:o}: the CA key must be readable by its owner only (chmod 600)",
            key_path.display(),
            meta.mode() & 0o777
        );
    }
    let key = Zeroizing::new(
        fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
    );
    let cert_path = dir.join("ca.crt");
    let cert = fs::read_to_string(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?;
    CertificateAuthority::from_pem(&cert, &key)
        .with_context(|| format!("loading the CA from {}", dir.display()))
}

/// The uid of user `name` in /etc/passwd.
pub fn user_id(name: &str) -> Option<u32> {
    id_in("/etc/passwd", name)
}

/// The gid of group `name` in /etc/group.
pub fn group_id(name: &str) -> Option<u32> {
    id_in("/etc/group", name)
}

/// The third field (`name:x:ID:…`) of the line for `name` in a passwd-style file.
fn id_in(file: &str, name: &str) -> Option<u32> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Tells systemd (`Type=notify`) that the socket is ready, when started by it.
fn notify_ready() {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &a));
    if let Err(e) = sent {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// The signer's state while it runs.
struct Signer {
    ca: CertificateAuthority,
    dir: PathBuf,
    allowed: Vec<u32>,
    per_minute: u32,
    /// When each certificate of the last minute was issued.
    recent: VecDeque<Instant>,
}

impl Signer {
    fn allowed(&self, uid: u32) -> bool {
        uid == 0 || self.allowed.contains(&uid)
    }

    /// Answers one request from `uid`.
    fn answer(&mut self, body: &[u8], uid: u32) -> Response {
        let refuse = |message: String| {
            warn!(peer_uid = uid, reason = %message, "request refused");
            Response::Error { message }
        };
        let request: Request = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return refuse(format!("the request is malformed: {e}")),
        };
        let checked = match check(request) {
            Ok(c) => c,
            Err(e) => return refuse(e),
        };
        if matches!(checked, Checked::Ca) {
            return Response::Certificate {
                der: hex::encode(self.ca.certificate()),
            };
        }
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.per_minute as usize {
            return refuse(format!(
                "rate limit: {} certificates in the last minute; try again later",
                self.per_minute
            ));
        }
        let (kind, name, issued) = match checked {
            Checked::Ca => unreachable!("answered above"),
            Checked::Site { name, spki } => {
                let c = self
                    .ca
                    .issue_site(&name, &spki, Validity::days_from_now(SITE_DAYS));
                ("site", name, c)
            }
            Checked::Technician {
                account,
                spki,
                days,
                info,
            } => {
                let c = self.ca.issue_technician_for_key(
                    &account,
                    &spki,
                    &info,
                    Validity::days_from_now(days),
                );
                ("technician", account, c)
            }
        };
        let cert = match issued {
            Ok(c) => c,
            Err(e) => return refuse(format!("issuing: {e}")),
        };
        let serial = match PeerIdentity::from_certificate(&cert) {
            Ok(p) => hex::encode(p.serial),
            Err(e) => return refuse(format!("reading the new certificate: {e}")),
        };
        // Recorded before it is handed out: a certificate the signer cannot account for is
        // never issued.
        if let Err(e) = self.record(kind, &name, &serial, uid) {
            return refuse(format!("cannot record the issuance: {e:#}"));
        }
        self.recent.push_back(now);
        info!(kind, name = %name, serial = %serial, peer_uid = uid, "certificate issued");
        Response::Certificate {
            der: hex::encode(&cert),
        }
    }

    /// Appends a line to `issued.log` and syncs it.
    fn record(&self, kind: &str, name: &str, serial: &str, uid: u32) -> anyhow::Result<()> {
        let path = self.dir.join(ISSUED_LOG);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .context("formatting the time")?;
        // `name` passed the name rule: no spaces, no control characters.
        writeln!(f, "{time} {kind} {name} serial={serial} uid={uid}")?;
        f.sync_data()?;
        Ok(())
    }

    async fn serve_one(&mut self, mut stream: UnixStream) {
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let response = match tokio::time::timeout(IO_TIMEOUT, read_frame(&mut stream)).await {
            Err(_) => {
                warn!(peer_uid = uid, "request timed out");
                return;
            }
            Ok(Err(message)) => {
                warn!(peer_uid = uid, reason = %message, "request refused");
                Response::Error { message }
            }
            Ok(Ok(body)) => match uid {
                Some(uid) if self.allowed(uid) => self.answer(&body, uid),
                Some(uid) => {
                    warn!(peer_uid = uid, "request from a user not allowed refused");
                    Response::Error {
                        message: format!("permission denied: uid {uid} may not use the signer"),
                    }
                }
                None => Response::Error {
                    message: "permission denied: the caller's credentials are unknown".into(),
                },
            },
        };
        let body = serde_json::to_vec(&response).unwrap_or_default();
        let _ = tokio::time::timeout(IO_TIMEOUT, async {
            stream.write_all(&frame(&body)).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// Gives `socket` to group `gid`, unless it has that group already: created in a
/// set-group-ID directory of that group (as the packaged unit's `/run/pinhole-ca`, mode 2710),
/// a socket is born in the directory's group and no `chown` is needed, which the unit's system
/// call filter (`~@privileged`, of which `@chown` is part) refuses with EPERM. Otherwise the
/// signer's user must be a member of the group.
fn give_group(socket: &Path, gid: u32) -> anyhow::Result<()> {
    let meta = fs::metadata(socket).with_context(|| format!("reading {}", socket.display()))?;
    if meta.gid() == gid {
        return Ok(());
    }
    std::os::unix::fs::chown(socket, None, Some(gid)).with_context(|| {
        format!(
            "giving {} to group {gid} (the signer's user must be in that group and may call \
             chown; or make the socket's directory set-group-ID, of that group)",
            socket.display()
        )
    })
}

/// Serves requests one at a time until `stop` completes. The CA comes from `ca_state`
/// ([`load_ca`]); the socket is created mode 0660, in `options.socket_gid` if given.
pub async fn run_signer(
    ca_state: &Path,
    options: &SignerOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let ca = load_ca(ca_state)?;
    let socket = &options.socket;
    if let Ok(m) = fs::symlink_metadata(socket) {
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            );
        }
        fs::remove_file(socket).with_context(|| format!("removing {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    if let Some(gid) = options.socket_gid {
        give_group(socket, gid)?;
    }
    fs::set_permissions(socket, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("securing {}", socket.display()))?;
    let mut allowed = options.allowed_uids.clone();
    allowed.push(rustix::process::getuid().as_raw());
    let mut signer = Signer {
        ca,
        dir: ca_state.to_owned(),
        allowed,
        per_minute: options.per_minute,
        recent: VecDeque::new(),
    };
    info!(
        socket = %socket.display(),
        per_minute = options.per_minute,
        "CA signer listening"
    );
    notify_ready();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => signer.serve_one(stream).await,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut stop => break,
        }
    }
    let _ = fs::remove_file(socket);
    info!("CA signer stopped");
    Ok(())
}

// ---------------------------------------------------------------- the client

/// Connects to the signer's socket with both timeouts at [`CALL_TIMEOUT`], set *before* the
/// connect: a Unix stream connect to a listener whose backlog is full (a signer that stopped
/// accepting) waits for room at most the socket's send timeout (`SO_SNDTIMEO`, Linux
/// `unix_stream_connect`), then fails with `EAGAIN`, reported as a timeout of the connect.
fn connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    s.set_write_timeout(Some(CALL_TIMEOUT))?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    match s.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => Ok(std::os::fd::OwnedFd::from(s).into()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect: not accepted within {} s", CALL_TIMEOUT.as_secs()),
        )),
        Err(e) => Err(e),
    }
}

/// Asks a signer for certificates (blocking; the connect and each read and write on the socket
/// wait at most [`CALL_TIMEOUT`], and a call takes milliseconds when the signer is up).
#[derive(Debug, Clone)]
pub struct SignerClient {
    socket: PathBuf,
}

impl SignerClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request`; returns the certificate of the answer.
    fn call(&self, request: &Request) -> Result<CertificateDer<'static>, SignerError> {
        let io = |source| SignerError::Io {
            path: self.socket.display().to_string(),
            source,
        };
        let mut s = connect(&self.socket).map_err(io)?;
        let body =
            serde_json::to_vec(request).map_err(|e| SignerError::Malformed(e.to_string()))?;
        s.write_all(&frame(&body)).map_err(io)?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(io)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(SignerError::Malformed(format!("{len} bytes")));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(io)?;
        match serde_json::from_slice(&body).map_err(|e| SignerError::Malformed(e.to_string()))? {
            Response::Certificate { der } => hex::decode(der)
                .map(CertificateDer::from)
                .map_err(|_| SignerError::Malformed("the certificate is not hexadecimal".into())),
            Response::Error { message } => Err(SignerError::Refused(
                pinhole_proto::validate::excerpt(&message),
            )),
        }
    }

    /// The signer's CA certificate.
    pub fn ca_certificate(&self) -> Result<CertificateDer<'static>, SignerError> {
        self.call(&Request::CaCertificate)
    }

    /// A site certificate for `spki` (DER SubjectPublicKeyInfo).
    pub fn issue_site(
        &self,
        name: &str,
        spki: &[u8],
    ) -> Result<CertificateDer<'static>, SignerError> {
        self.call(&Request::Site {
            name: name.to_owned(),
            public_key: hex::encode(spki),
        })
    }

    /// A technician certificate for `spki`, `days` long, pointing at `info`.
    pub fn issue_technician(
        &self,
        account: &str,
        spki: &[u8],
        info: &GatewayInfo,
        days: i64,
    ) -> Result<CertificateDer<'static>, SignerError> {
        self.call(&Request::Technician {
            account: account.to_owned(),
            public_key: hex::encode(spki),
            days,
            addresses: info.addresses().iter().map(ToString::to_string).collect(),
            pin: info.pin().to_string(),
        })
    }
}

// ---------------------------------------------------------------- issuing, either way

/// The gateway CA as the gateway uses it: the key in this process, or a signer.
pub enum Ca {
    /// `STATE/ca.key` loaded here (a gateway without a signer; the lab and most tests).
    Local(Box<CertificateAuthority>),
    /// A signer holds the key; `certificate` is `STATE/ca.crt`, which the signer confirmed.
    Signer {
        client: SignerClient,
        certificate: CertificateDer<'static>,
    },
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ca::Local(_) => f.write_str("Ca::Local"),
            Ca::Signer { client, .. } => write!(f, "Ca::Signer({})", client.socket.display()),
        }
    }
}

/// Checks that a certificate from the signer names `role` and `name` (its key is checked by
/// the caller).
fn check_issued(cert: &[u8], role: Role, name: &str) -> Result<PeerIdentity, SignerError> {
    let id = PeerIdentity::from_certificate(cert)?;
    if id.role != role {
        return Err(SignerError::Mismatch("role"));
    }
    if id.name != name {
        return Err(SignerError::Mismatch("name"));
    }
    Ok(id)
}

impl Ca {
    /// Asks the signer at `socket` for its CA certificate and checks that it is `ca_crt` (the
    /// gateway's `ca.crt`): a gateway must not hand out certificates its own TLS verifier
    /// would refuse.
    pub fn connect(socket: &Path, ca_crt: &CertificateDer<'static>) -> anyhow::Result<Self> {
        let client = SignerClient::new(socket);
        let theirs = client.ca_certificate()?;
        if theirs != *ca_crt {
            bail!(
                "the CA signer at {} holds another CA than this gateway's ca.crt",
                socket.display()
            );
        }
        Ok(Ca::Signer {
            client,
            certificate: ca_crt.clone(),
        })
    }

    /// The CA certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        match self {
            Ca::Local(ca) => ca.certificate(),
            Ca::Signer { certificate, .. } => certificate,
        }
    }

    /// A site certificate ([`SITE_DAYS`]) for the site's own key (DER SubjectPublicKeyInfo).
    pub fn issue_site(
        &self,
        name: &str,
        spki: &[u8],
    ) -> Result<CertificateDer<'static>, SignerError> {
        match self {
            Ca::Local(ca) => Ok(ca.issue_site(name, spki, Validity::days_from_now(SITE_DAYS))?),
            Ca::Signer { client, .. } => {
                let cert = client.issue_site(name, spki)?;
                check_issued(&cert, Role::Site, name)?;
                if pinhole_certs::x509::spki_der(&cert).ok().as_deref() != Some(spki) {
                    return Err(SignerError::Mismatch("public key"));
                }
                Ok(cert)
            }
        }
    }

    /// A technician identity (new key, certificate, CA) valid `days`.
    pub fn issue_technician(
        &self,
        account: &str,
        info: &GatewayInfo,
        days: i64,
    ) -> Result<Identity, SignerError> {
        match self {
            Ca::Local(ca) => {
                Ok(ca.issue_technician(account, info, Validity::days_from_now(days))?)
            }
            Ca::Signer {
                client,
                certificate,
            } => {
                let (key, spki) = generate_site_key()?;
                let cert = client.issue_technician(account, &spki, info, days)?;
                check_issued(&cert, Role::Technician, account)?;
                Identity::from_parts(key, vec![cert, certificate.clone()])
                    .ok_or(SignerError::Mismatch("public key"))
            }
        }
    }
}

/// Site certificates at enrollment ([`crate::hub::Issuer`]).
#[derive(Debug)]
pub struct SiteIssuer {
    ca: Arc<Ca>,
    der: Vec<u8>,
}

impl SiteIssuer {
    pub fn new(ca: Arc<Ca>) -> Self {
        let der = ca.certificate().to_vec();
        Self { ca, der }
    }
}

impl crate::hub::Issuer for SiteIssuer {
    fn issue_site(&self, site: &str, public_key: &[u8]) -> Result<Issued, String> {
        let cert = self
            .ca
            .issue_site(site, public_key)
            .map_err(|e| e.to_string())?;
        let serial = PeerIdentity::from_certificate(&cert)
            .map_err(|e| e.to_string())?
            .serial;
        Ok(Issued {
            certificate: cert.to_vec(),
            serial,
        })
    }

    fn ca_certificate(&self) -> &[u8] {
        &self.der
    }
}

/// Technician bundles for the portal ([`crate::portal::BundleIssuer`]).
#[derive(Debug)]
pub struct BundleMaker {
    ca: Arc<Ca>,
    info: GatewayInfo,
    /// Serialises issuance: the signer answers one request at a time anyway.
    lock: Mutex<()>,
}

impl BundleMaker {
    pub fn new(ca: Arc<Ca>, info: GatewayInfo) -> Self {
        Self {
            ca,
            info,
            lock: Mutex::new(()),
        }
    }
}

impl crate::portal::BundleIssuer for BundleMaker {
    fn issue(&self, account: &str, days: i64) -> Result<crate::portal::IssuedBundle, String> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let identity = self
            .ca
            .issue_technician(account, &self.info, days)
            .map_err(|e| e.to_string())?;
        let serial = PeerIdentity::from_certificate(identity.certificate())
            .map_err(|e| e.to_string())?
            .serial;
        let bundle = pinhole_certs::Bundle::new(identity).map_err(|e| e.to_string())?;
        let password = crate::state::generate_password();
        let p12 = bundle
            .to_pkcs12(&password, pinhole_certs::Protection::Modern)
            .map_err(|e| e.to_string())?;
        Ok(crate::portal::IssuedBundle {
            p12: Zeroizing::new(p12),
            password,
            serial,
        })
    }
}

/// The CA for `serve` and the account commands: the signer at `signer` when given; else
/// `STATE/ca.key` when the state directory has it; else the signer at [`DEFAULT_SOCKET`] when
/// it exists.
pub fn open(
    state: &crate::state::StateDir,
    loaded: &mut crate::state::Loaded,
    signer: Option<&Path>,
) -> anyhow::Result<Ca> {
    if let Some(socket) = signer {
        if loaded.ca.take().is_some() {
            // Fail closed: a gateway told to use a signer must not hold the key it guards.
            bail!(
                "{} is still in the gateway's state directory although a signer holds the CA: \
                 move it to the signer's (`systemctl restart pinhole-ca` does; see README, \
                 \"The CA signer\")",
                state.root().join("ca.key").display()
            );
        }
        return Ca::connect(socket, &loaded.ca_cert);
    }
    if let Some(ca) = loaded.ca.take() {
        return Ok(Ca::Local(Box::new(ca)));
    }
    let default = Path::new(DEFAULT_SOCKET);
    if default.exists() {
        return Ca::connect(default, &loaded.ca_cert);
    }
    bail!(
        "{} holds no ca.key and no CA signer listens at {DEFAULT_SOCKET}: start it (systemctl start pinhole-ca) or give --signer PATH",
        state.root().display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signer that stopped accepting (its backlog full): the connect gives up after
    /// [`CALL_TIMEOUT`] instead of stalling the gateway's decisions for good.
    #[test]
    fn a_connect_to_a_signer_that_does_not_accept_gives_up_in_time() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("signer.sock");
        let listener = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .expect("socket");
        listener
            .bind(&socket2::SockAddr::unix(&path).expect("addr"))
            .expect("bind");
        // A backlog of 0 holds one waiting connection; it never gets accepted.
        listener.listen(0).expect("listen");
        let _first = std::os::unix::net::UnixStream::connect(&path).expect("first");
        let (tx, rx) = std::sync::mpsc::channel();
        let client = SignerClient::new(&path);
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = client.ca_certificate();
            let _ = tx.send((result, started.elapsed()));
        });
        let (result, took) = rx
            .recv_timeout(CALL_TIMEOUT * 5)
            .expect("the connect to a stuck signer never gave up");
        let e = result.expect_err("no signer answered");
        assert!(matches!(e, SignerError::Io { .. }), "{e}");
        assert!(e.to_string().contains("connect"), "{e}");
        assert!(took >= CALL_TIMEOUT / 2, "{took:?}");
        drop(listener);
    }

    fn info() -> GatewayInfo {
        GatewayInfo::new(
            vec!["gw.example.com:443".parse().expect("addr")],
            Pin::of_spki(b"k"),
        )
        .expect("info")
    }

    #[test]
    fn generated_keys_pass_and_others_fail_the_p256_check() {
        let (_, spki) = generate_site_key().expect("key");
        check_p256_spki(&spki).expect("a generated key");
        let mut off_curve = spki.clone();
        off_curve[P256_SPKI_LEN - 1] ^= 1;
        assert!(check_p256_spki(&off_curve).is_err());
        assert!(check_p256_spki(&spki[..60]).is_err());
        let mut other_curve = spki;
        other_curve[24] = 0x22; // secp384r1's last arc
        assert!(check_p256_spki(&other_curve).is_err());
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        let (_, spki) = generate_site_key().expect("key");
        let key = hex::encode(&spki);
        let site = |name: &str, k: &str| Request::Site {
            name: name.into(),
            public_key: k.into(),
        };
        assert!(matches!(
            check(site("plant-a", &key)),
            Ok(Checked::Site { .. })
        ));
        assert!(check(site("plant a", &key)).is_err());
        assert!(check(site("", &key)).is_err());
        assert!(check(site(&"a".repeat(65), &key)).is_err());
        assert!(check(site("plant-a", "zz")).is_err());
        assert!(check(site("plant-a", &key[..key.len() - 2])).is_err());
        let tech = |days: i64, addresses: Vec<String>, pin: String| Request::Technician {
            account: "alice".into(),
            public_key: key.clone(),
            days,
            addresses,
            pin,
        };
        let addr = vec!["gw.example.com:443".to_owned()];
        let pin = info().pin().to_string();
        assert!(check(tech(365, addr.clone(), pin.clone())).is_ok());
        assert!(check(tech(0, addr.clone(), pin.clone())).is_err());
        assert!(check(tech(MAX_TECHNICIAN_DAYS + 1, addr.clone(), pin.clone())).is_err());
        assert!(check(tech(365, Vec::new(), pin.clone())).is_err());
        assert!(
            check(tech(
                365,
                vec![addr[0].clone(); MAX_ADDRESSES + 1],
                pin.clone()
            ))
            .is_err()
        );
        assert!(check(tech(365, vec!["no port".into()], pin.clone())).is_err());
        assert!(check(tech(365, addr, "sha256//nope".into())).is_err());
        // Unknown fields and operations are refused by the decoder.
        assert!(serde_json::from_str::<Request>(r#"{"op":"server","name":"x"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"site","name":"x","public_key":"","ca":1}"#)
                .is_err()
        );
    }
}
