//! A link to the gateway through a corporate HTTP proxy: an HTTP `CONNECT` tunnel (RFC 9110
//! §9.3.6) with the TLS to the gateway inside it, so that the gateway's pin is checked exactly
//! as on a direct connection and the proxy sees nothing but an opaque byte stream.
//!
//! Authentication to the proxy (RFC 9110 §11.7, `Proxy-Authenticate` / `Proxy-Authorization`):
//! * `none`;
//! * `basic` (RFC 7617): user and password in one header, once;
//! * `ntlm` ([MS-NLMP], as HTTP carries it in [MS-NTHT]): negotiate → challenge → authenticate,
//!   the three messages on one TCP connection (NTLM authenticates the connection, not the
//!   request), NTLMv2 responses; the messages are built and parsed by the `ntlmclient` crate.
//!
//! The proxy is a peer on the network: its answer is read with hard bounds
//! ([`MAX_HEAD`], [`MAX_BODY`]), and what is logged of it is cut and escaped. Credentials come
//! from a file ([`Credentials::from_file`]), never from the command line, and are never logged.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// The most bytes of a proxy's answer head (status line and headers) read before giving up.
pub const MAX_HEAD: usize = 16 * 1024;

/// The most bytes of a proxy's error page read (and dropped) to keep the connection usable.
pub const MAX_BODY: usize = 64 * 1024;

/// How much of a proxy's answer goes into an error message or the log.
const SHOWN: usize = 200;

/// How the proxy wants us to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    #[default]
    None,
    Basic,
    Ntlm,
}

impl fmt::Display for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Auth::None => "none",
            Auth::Basic => "basic",
            Auth::Ntlm => "ntlm",
        })
    }
}

/// Proxy credentials: a user (for NTLM optionally `DOMAIN\user`) and a password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Zeroizing<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"…")
            .finish()
    }
}

impl Credentials {
    /// Reads a credentials file: the user on the first line, the password on the second.
    ///
    /// # Errors
    /// The file is unreadable, is readable by group or others (it holds a password), or does
    /// not hold two non-empty lines.
    pub fn from_file(path: &Path) -> Result<Self, ProxyError> {
        use std::os::unix::fs::PermissionsExt as _;
        let bad = |why: String| ProxyError::Credentials(format!("{}: {why}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "readable by group or others (mode {:o}); run `chmod 600` on it",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
        let mut lines = text.lines();
        let user = lines.next().unwrap_or("").trim().to_owned();
        let password = Zeroizing::new(lines.next().unwrap_or("").to_owned());
        if user.is_empty() || password.is_empty() {
            return Err(bad(
                "expected the user on the first line and the password on the second".into(),
            ));
        }
        if user.chars().any(char::is_control) || user.contains(':') && !user.contains('\\') {
            return Err(bad("the user name holds a control character or ':'".into()));
        }
        Ok(Self { user, password })
    }
}

/// Where the proxy is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or address of the proxy.
    pub host: String,
    pub port: u16,
    pub auth: Auth,
    /// Required for `basic` and `ntlm`.
    pub credentials: Option<Credentials>,
}

impl Proxy {
    /// A proxy from its settings (`site.toml`'s `[proxy]`, pinholed's `--proxy*` options):
    /// the URL checked, the credentials read from their file.
    ///
    /// # Errors
    /// A bad URL; `basic` or `ntlm` without a credentials file, or `none` with one; an
    /// unusable credentials file (see [`Credentials::from_file`]).
    pub fn from_setting(
        url: &str,
        auth: Auth,
        credentials: Option<&Path>,
    ) -> Result<Self, ProxyError> {
        let (host, port) = Self::parse_url(url)?;
        let credentials = match (auth, credentials) {
            (Auth::None, None) => None,
            (Auth::None, Some(_)) => {
                return Err(ProxyError::Credentials(
                    "given, but auth is \"none\": set auth = \"basic\" or \"ntlm\"".into(),
                ));
            }
            (_, None) => {
                return Err(ProxyError::Credentials(format!(
                    "missing: auth = \"{auth}\" needs a credentials file"
                )));
            }
            (_, Some(path)) => Some(Credentials::from_file(path)?),
        };
        Ok(Self {
            host,
            port,
            auth,
            credentials,
        })
    }

    /// Parses `http://HOST[:PORT][/]` (port 3128 by default, as squid's). Credentials in the
    /// URL are refused: they would end up in process listings, environments and logs.
    ///
    /// # Errors
    /// Another scheme, user information in the URL, a path, or a bad port.
    pub fn parse_url(url: &str) -> Result<(String, u16), ProxyError> {
        // Never echo user information: it may hold a password.
        let redacted = match url.rsplit_once('@') {
            Some((_, host)) => format!("http://…@{host}"),
            None => url.to_owned(),
        };
        let bad = |why: &str| ProxyError::Url(format!("{}: {why}", shown(redacted.as_bytes())));
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// proxies are supported (the TLS is inside)"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(bad(
                "credentials do not belong in the URL; put them in a credentials file",
            ));
        }
        if rest.contains('/') || rest.contains('?') || rest.contains('#') || rest.is_empty() {
            return Err(bad("expected http://HOST[:PORT]"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("bad host name"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, p.parse::<u16>().map_err(|_| bad("bad port"))?),
                None if after.is_empty() => (host, 3128),
                None => return Err(bad("expected http://HOST[:PORT]")),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
                None => (rest, 3128),
            }
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        {
            return Err(bad("bad host name"));
        }
        if port == 0 {
            return Err(bad("bad port"));
        }
        Ok((host.to_owned(), port))
    }
}

/// Why a tunnel through the proxy could not be opened. Every variant says what the proxy
/// answered, cut to a few hundred bytes and escaped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy URL {0}")]
    Url(String),
    #[error("proxy credentials file {0}")]
    Credentials(String),
    #[error("cannot reach the proxy {proxy}: {source}")]
    Connect {
        proxy: String,
        source: std::io::Error,
    },
    #[error("the proxy {proxy} did not answer within {0:?}", .timeout)]
    Timeout { proxy: String, timeout: Duration },
    #[error("the connection to the proxy failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the proxy's answer is not HTTP: {0}")]
    Malformed(String),
    #[error("the proxy refused to connect to {target}: {answer}")]
    Refused { target: String, answer: String },
    #[error(
        "the proxy asks for authentication ({schemes}); set `auth` and `credentials` for the proxy: {answer}"
    )]
    AuthRequired { schemes: String, answer: String },
    #[error("the proxy refused the {auth} credentials: {answer}")]
    BadCredentials { auth: Auth, answer: String },
    #[error(
        "the proxy asks for authentication by {schemes}, which Pinhole does not support (none, basic, ntlm): {answer}"
    )]
    Unsupported { schemes: String, answer: String },
    #[error("the proxy ended the connection during the NTLM exchange (NTLM needs one connection)")]
    NtlmConnectionClosed,
    #[error("NTLM: {0}")]
    Ntlm(String),
}

/// Opens a TCP connection to `target` (`host:port`) through the proxy and returns it once the
/// proxy answered `200`: the caller starts its TLS handshake on it. The whole exchange is
/// bounded by `timeout`.
///
/// # Errors
/// See [`ProxyError`]: each says in words what the proxy answered.
pub async fn connect(
    proxy: &Proxy,
    target: &str,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let name = format!("{}:{}", proxy.host, proxy.port);
    match tokio::time::timeout(timeout, exchange(proxy, &name, target)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout {
            proxy: name,
            timeout,
        }),
    }
}

async fn exchange(proxy: &Proxy, name: &str, target: &str) -> Result<TcpStream, ProxyError> {
    let mut stream = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| ProxyError::Connect {
            proxy: name.to_owned(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let creds = || {
        proxy
            .credentials
            .as_ref()
            .ok_or_else(|| ProxyError::Credentials(format!("needed for auth = \"{}\"", proxy.auth)))
    };
    let authorization = match proxy.auth {
        Auth::None => None,
        Auth::Basic => {
            let c = creds()?;
            let pair = Zeroizing::new(format!("{}:{}", c.user, c.password.as_str()));
            Some(Zeroizing::new(format!(
                "Basic {}",
                BASE64.encode(pair.as_bytes())
            )))
        }
        Auth::Ntlm => {
            let msg = ntlm::negotiate()?;
            Some(Zeroizing::new(format!("NTLM {msg}")))
        }
    };
    let head = request(
        &mut stream,
        target,
        authorization.as_deref().map(|s| s.as_str()),
    )
    .await?;
    let head = match (head.status, proxy.auth) {
        (407, Auth::Ntlm) => {
            let challenge = head
                .challenges
                .iter()
                .find_map(|c| c.strip_prefix("NTLM "))
                .map(str::trim)
                .ok_or_else(|| unsupported_or_bad(&head, Auth::Ntlm))?;
            if head.closes {
                return Err(ProxyError::NtlmConnectionClosed);
            }
            let answer = ntlm::authenticate(challenge, creds()?)?;
            request(&mut stream, target, Some(&format!("NTLM {answer}"))).await?
        }
        _ => head,
    };
    match head.status {
        200..=299 => Ok(stream),
        407 => Err(match proxy.auth {
            Auth::None => {
                let schemes = head.schemes();
                ProxyError::AuthRequired {
                    schemes: if schemes.is_empty() {
                        "no scheme named".into()
                    } else {
                        schemes
                    },
                    answer: head.shown,
                }
            }
            auth => unsupported_or_bad(&head, auth),
        }),
        _ => Err(ProxyError::Refused {
            target: target.to_owned(),
            answer: head.shown,
        }),
    }
}

/// A 407 to our credentials: refused credentials if the proxy offers the scheme we used,
/// an unsupported scheme otherwise.
fn unsupported_or_bad(head: &Head, auth: Auth) -> ProxyError {
    let ours = match auth {
        Auth::Basic => "basic",
        _ => "ntlm",
    };
    let offered = head.challenges.iter().any(|c| {
        c.split_whitespace()
            .next()
            .unwrap_or("")
            .eq_ignore_ascii_case(ours)
    });
    if offered || head.challenges.is_empty() {
        ProxyError::BadCredentials {
            auth,
            answer: head.shown.clone(),
        }
    } else {
        ProxyError::Unsupported {
            schemes: head.schemes(),
            answer: head.shown.clone(),
        }
    }
}

/// The parts of a proxy's answer that matter here.
#[derive(Debug)]
struct Head {
    status: u16,
    /// `Proxy-Authenticate` values, each cut to [`MAX_HEAD`].
    challenges: Vec<String>,
    /// The proxy will close the connection after this answer.
    closes: bool,
    /// The status line, for messages and the log.
    shown: String,
}

impl Head {
    fn schemes(&self) -> String {
        let mut s: Vec<&str> = self
            .challenges
            .iter()
            .filter_map(|c| c.split_whitespace().next())
            .collect();
        s.dedup();
        s.join(", ")
    }
}

/// Sends one CONNECT and reads the answer's head (and its body, if any, so that the connection
/// can carry the next request).
async fn request(
    stream: &mut TcpStream,
    target: &str,
    authorization: Option<&str>,
) -> Result<Head, ProxyError> {
    let mut req = Zeroizing::new(format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Connection: Keep-Alive\r\nUser-Agent: pinhole/{}\r\n",
        env!("CARGO_PKG_VERSION")
    ));
    if let Some(a) = authorization {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    read_head(stream).await
}

/// Reads one answer head, and the body of a non-2xx answer, and not one byte more: what
/// follows a `200` belongs to the tunnel. Peeks, then consumes exactly the head's bytes.
async fn read_head(stream: &mut TcpStream) -> Result<Head, ProxyError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if buf.len() > MAX_HEAD {
            return Err(ProxyError::Malformed(format!(
                "an answer head longer than {MAX_HEAD} bytes"
            )));
        }
        let n = stream.peek(&mut chunk).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ProxyError::Malformed("the proxy closed the connection without answering".into())
            } else {
                ProxyError::Malformed(format!(
                    "the proxy closed the connection mid-answer: {}",
                    shown(&buf)
                ))
            });
        }
        // The terminator may straddle what was read and what is peeked.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        let found = buf[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| from + i + 4);
        let take = match found {
            Some(end) => n - (buf.len() - end),
            None => n,
        };
        buf.truncate(buf.len() - (n - take));
        stream.read_exact(&mut chunk[..take]).await?;
        if let Some(end) = found {
            break end;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(ProxyError::Malformed(shown(&buf[..end.min(SHOWN)])));
        }
    }
    let status = resp.code.unwrap_or(0);
    let line_end = buf.windows(2).position(|w| w == b"\r\n").unwrap_or(end);
    let mut head = Head {
        status,
        challenges: Vec::new(),
        closes: resp.version == Some(0),
        shown: shown(&buf[..line_end]),
    };
    let mut length = 0usize;
    for h in resp.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        if h.name.eq_ignore_ascii_case("proxy-authenticate") {
            head.challenges.push(value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| ProxyError::Malformed(format!("Content-Length {}", shown(h.value))))?;
        } else if (h.name.eq_ignore_ascii_case("connection")
            || h.name.eq_ignore_ascii_case("proxy-connection"))
            && value.eq_ignore_ascii_case("close")
        {
            head.closes = true;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") && (200..300).contains(&status) {
            return Err(ProxyError::Malformed(
                "a body in a 2xx answer to CONNECT".into(),
            ));
        }
    }
    // A 2xx answer to CONNECT has no body (RFC 9110 §9.3.6): what follows is the tunnel's.
    if (200..300).contains(&status) {
        return Ok(head);
    }
    if length > MAX_BODY {
        head.closes = true;
        return Ok(head);
    }
    let mut left = length;
    while left > 0 {
        let n = stream.read(&mut chunk[..left.min(1024)]).await?;
        if n == 0 {
            head.closes = true;
            break;
        }
        left -= n;
    }
    Ok(head)
}

/// At most [`SHOWN`] bytes, with control characters and non-ASCII escaped.
fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(SHOWN)];
    let mut s: String = cut.escape_ascii().to_string();
    if bytes.len() > SHOWN {
        s.push('…');
    }
    s
}

mod ntlm {
    //! The NTLM messages, NTLMv2 ([MS-NLMP] 3.3.2), built and parsed by `ntlmclient`.
    use super::{BASE64, Credentials, ProxyError};
    use base64::Engine as _;
    use ntlmclient::{Flags, Message, NegotiateMessage};

    /// The largest challenge message accepted, decoded.
    const MAX_CHALLENGE: usize = 4096;

    fn flags() -> Flags {
        Flags::NEGOTIATE_UNICODE
            | Flags::REQUEST_TARGET
            | Flags::NEGOTIATE_NTLM
            | Flags::NEGOTIATE_ALWAYS_SIGN
            | Flags::NEGOTIATE_NTLM2_KEY
            | Flags::NEGOTIATE_TARGET_INFO
            | Flags::NEGOTIATE_128BIT
    }

    /// The negotiate message, base64.
    pub(super) fn negotiate() -> Result<String, ProxyError> {
        let msg = Message::Negotiate(NegotiateMessage {
            flags: flags(),
            supplied_domain: String::new(),
            supplied_workstation: String::new(),
            os_version: Default::default(),
        });
        let bytes = msg
            .to_bytes()
            .map_err(|e| ProxyError::Ntlm(format!("cannot encode the negotiate message: {e}")))?;
        Ok(BASE64.encode(bytes))
    }

    /// The authenticate message answering the proxy's base64 challenge, base64.
    pub(super) fn authenticate(challenge: &str, creds: &Credentials) -> Result<String, ProxyError> {
        if challenge.len() > MAX_CHALLENGE * 4 / 3 + 4 {
            return Err(ProxyError::Ntlm("the challenge is too long".into()));
        }
        let bytes = BASE64
            .decode(challenge)
            .map_err(|_| ProxyError::Ntlm("the challenge is not base64".into()))?;
        // The parser is the crate's; a proxy's malformed bytes must not take the link task down.
        let parsed = std::panic::catch_unwind(|| Message::try_from(bytes.as_slice()))
            .map_err(|_| ProxyError::Ntlm("a malformed challenge".into()))?;
        let challenge = match parsed {
            Ok(Message::Challenge(c)) => c,
            Ok(_) => {
                return Err(ProxyError::Ntlm(
                    "the proxy sent no challenge message".into(),
                ));
            }
            Err(e) => return Err(ProxyError::Ntlm(format!("a malformed challenge: {e:?}"))),
        };
        let (domain, user) = match creds.user.split_once('\\') {
            Some((d, u)) => (d.to_owned(), u.to_owned()),
            None => (String::new(), creds.user.clone()),
        };
        let creds = ntlmclient::Credentials {
            username: user,
            password: creds.password.as_str().to_owned(),
            domain,
        };
        let target_info: Vec<u8> = challenge
            .target_information
            .iter()
            .flat_map(|e| e.to_bytes())
            .collect();
        let response = ntlmclient::respond_challenge_ntlm_v2(
            challenge.challenge,
            &target_info,
            ntlmclient::get_ntlm_time(),
            &creds,
        );
        let msg = response.to_message(&creds, "", flags());
        let mut password = creds.password;
        zeroize::Zeroize::zeroize(&mut password);
        let bytes = msg.to_bytes().map_err(|e| {
            ProxyError::Ntlm(format!("cannot encode the authenticate message: {e}"))
        })?;
        Ok(BASE64.encode(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        assert_eq!(
            Proxy::parse_url("http://proxy.corp:8080").expect("ok"),
            ("proxy.corp".into(), 8080)
        );
        assert_eq!(
            Proxy::parse_url("http://10.0.0.1/").expect("ok"),
            ("10.0.0.1".into(), 3128)
        );
        assert_eq!(
            Proxy::parse_url("http://[fd00::1]:3128").expect("ok"),
            ("fd00::1".into(), 3128)
        );
        for bad in [
            "https://proxy:443",
            "http://user:pw@proxy:3128",
            "proxy:3128",
            "http://proxy:99999",
            "http://proxy:0",
            "http://proxy/path",
            "http://",
            "http://pro xy",
        ] {
            let e = Proxy::parse_url(bad).expect_err(bad).to_string();
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn shown_cuts_and_escapes() {
        assert_eq!(
            shown(b"HTTP/1.1 403 \x1b[31mNo"),
            "HTTP/1.1 403 \\x1b[31mNo"
        );
        assert!(shown(&[b'a'; 1000]).ends_with('…'));
    }

    #[test]
    fn credentials_files_must_be_private_and_complete() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("ok");
        let p = dir.path().join("cred");
        std::fs::write(&p, "CORP\\alice\nsecret\n").expect("ok");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("ok");
        assert!(
            Credentials::from_file(&p)
                .expect_err("refused")
                .to_string()
                .contains("chmod 600")
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("ok");
        let c = Credentials::from_file(&p).expect("ok");
        assert_eq!(c.user, "CORP\\alice");
        assert!(!format!("{c:?}").contains("secret"));
        std::fs::write(&p, "alice\n").expect("ok");
        assert!(Credentials::from_file(&p).is_err());
    }
}
