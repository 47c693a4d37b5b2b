//! The gateway's side of one peer link (a technician, a site, or a site enrolling).
//!
//! The core checks the order and shape of messages and that the role declared in `hello`
//! matches the certificate; every decision that needs the registry (is the account open, which
//! sites may it see, is the token valid) is handed to the caller as an event, and the caller
//! answers with [`GatewayCore::welcome`], [`GatewayCore::refuse`] and the like.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::frame::PROTOCOL_VERSION;
use crate::link::{CloseReason, Input, Link};
use crate::message::{ErrorCode, Message, Role, SiteView};

/// A peer with a certificate must say `hello` this soon after the TLS handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer without a certificate must send `enroll` this soon after the TLS handshake: a site
/// that enrolls has its message ready, and a stranger's idle link is what fills the gateway's
/// descriptor table.
pub const HELLO_TIMEOUT_ANONYMOUS: Duration = Duration::from_secs(3);

/// The largest control payload (bytes) a peer without a certificate may send. Its only
/// message is `enroll` (a token, a name and a public key, under 3 KiB); anything bigger is an
/// attempt to make the gateway buffer for a stranger.
pub const MAX_CONTROL_UNAUTHENTICATED: usize = 16 * 1024;

/// The largest control payload (bytes) an authenticated peer may send. The largest message a
/// peer sends is a site's `hello` (or `agents`) with its agents; inventories, the only bigger
/// messages, flow from the gateway.
pub const MAX_CONTROL_FROM_PEER: usize = 1024 * 1024;

/// Who the TLS handshake says the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    Technician(String),
    Site(String),
    /// No client certificate: the peer may only enroll.
    Anonymous,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A technician said hello: check the account and answer.
    TechnicianHello {
        software: String,
    },
    /// A site said hello: record it and answer.
    SiteHello {
        software: String,
        boot_id: String,
        agents: Vec<Agent>,
        heartbeat: Duration,
    },
    /// An anonymous peer wants to enroll.
    Enroll {
        token: String,
        site: String,
        public_key: Vec<u8>,
    },
    List,
    Agents(Vec<Agent>),
    SessionOpen {
        session: u32,
        site: String,
        agent: String,
        key: String,
    },
    SessionOpened {
        session: u32,
        key: String,
        agent: Agent,
    },
    SessionRefused {
        session: u32,
        reason: String,
    },
    SessionClose {
        session: u32,
        reason: String,
        agent: Option<String>,
    },
    Data {
        session: u32,
        datagram: Vec<u8>,
    },
    Logout,
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitDecision,
    Running,
}

/// Sans-IO gateway link; see [`crate::link`] for the calling contract.
#[derive(Debug)]
pub struct GatewayCore {
    link: Link,
    auth: PeerAuth,
    phase: Phase,
    hello_deadline: Instant,
    events: VecDeque<GatewayEvent>,
}

impl GatewayCore {
    /// A new link, after the TLS handshake that established `auth`. A peer without a
    /// certificate must enroll within [`HELLO_TIMEOUT_ANONYMOUS`] and may send control frames
    /// up to [`MAX_CONTROL_UNAUTHENTICATED`]; others must say hello within [`HELLO_TIMEOUT`]
    /// and may send up to [`MAX_CONTROL_FROM_PEER`].
    pub fn new(now: Instant, auth: PeerAuth) -> Self {
        let (max_control, hello_timeout) = match auth {
            PeerAuth::Anonymous => (MAX_CONTROL_UNAUTHENTICATED, HELLO_TIMEOUT_ANONYMOUS),
            PeerAuth::Technician(_) | PeerAuth::Site(_) => (MAX_CONTROL_FROM_PEER, HELLO_TIMEOUT),
        };
        // The interval is replaced by the peer's own once it says hello.
        Self {
            link: Link::with_max_control(now, HELLO_TIMEOUT, max_control),
            auth,
            phase: Phase::AwaitHello,
            hello_deadline: now + hello_timeout,
            events: VecDeque::new(),
        }
    }

    pub fn auth(&self) -> &PeerAuth {
        &self.auth
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running && self.link.closed().is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.link.closed().is_some()
    }

    /// The peer's heartbeat interval (after `hello`).
    pub fn heartbeat(&self) -> Duration {
        self.link.heartbeat()
    }

    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.link.push_input(bytes, now);
        while let Some(input) = self.link.next_input() {
            match input {
                Input::Failed(reason) => self.events.push_back(GatewayEvent::Closed(reason)),
                Input::Data { session, datagram } if self.phase == Phase::Running => {
                    self.events.push_back(GatewayEvent::Data {
                        session,
                        datagram: datagram.to_vec(),
                    });
                }
                Input::Data { .. } => self.violation("data before login".into(), now),
                Input::Message(m) => self.on_message(m, now),
            }
        }
    }

    fn violation(&mut self, what: String, now: Instant) {
        self.link.send(
            &Message::Error {
                code: ErrorCode::Protocol,
                text: what.clone(),
            },
            now,
        );
        let reason = CloseReason::Protocol(what);
        self.link.close(reason.clone());
        self.events.push_back(GatewayEvent::Closed(reason));
    }

    fn on_message(&mut self, m: Message, now: Instant) {
        match (self.phase, &self.auth, m) {
            (
                Phase::AwaitHello,
                PeerAuth::Anonymous,
                Message::Enroll {
                    token,
                    site,
                    public_key,
                },
            ) => match hex::decode(&public_key) {
                Ok(public_key) => {
                    self.phase = Phase::AwaitDecision;
                    self.events.push_back(GatewayEvent::Enroll {
                        token,
                        site,
                        public_key,
                    });
                }
                Err(_) => self.violation("enroll: public key is not hex".into(), now),
            },
            (
                Phase::AwaitHello,
                PeerAuth::Technician(_) | PeerAuth::Site(_),
                Message::Hello {
                    role,
                    version,
                    software,
                    heartbeat_secs,
                    boot_id,
                    agents,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    self.refuse(ErrorCode::Version, &format!("protocol version {version} is not supported; this gateway speaks {PROTOCOL_VERSION}"), now);
                    return;
                }
                self.link
                    .set_heartbeat(Duration::from_secs(u64::from(heartbeat_secs)));
                match (role, &self.auth) {
                    (Role::Technician, PeerAuth::Technician(_)) => {
                        self.phase = Phase::AwaitDecision;
                        self.events
                            .push_back(GatewayEvent::TechnicianHello { software });
                    }
                    (Role::Site, PeerAuth::Site(_)) => {
                        self.phase = Phase::AwaitDecision;
                        let heartbeat = self.link.heartbeat();
                        self.events.push_back(GatewayEvent::SiteHello {
                            software,
                            boot_id: boot_id.unwrap_or_default(),
                            agents,
                            heartbeat,
                        });
                    }
                    _ => self.violation(
                        "the role in hello does not match the certificate".into(),
                        now,
                    ),
                }
            }
            (Phase::Running, PeerAuth::Technician(_), Message::List) => {
                self.events.push_back(GatewayEvent::List)
            }
            (Phase::Running, PeerAuth::Technician(_), Message::Logout) => {
                self.link.close(CloseReason::Local);
                self.events.push_back(GatewayEvent::Logout);
            }
            (
                Phase::Running,
                PeerAuth::Technician(_),
                Message::SessionOpen {
                    session,
                    site,
                    agent,
                    key,
                    ..
                },
            ) => {
                self.events.push_back(GatewayEvent::SessionOpen {
                    session,
                    site,
                    agent,
                    key,
                });
            }
            (Phase::Running, PeerAuth::Site(_), Message::Agents { agents }) => {
                self.events.push_back(GatewayEvent::Agents(agents))
            }
            (
                Phase::Running,
                PeerAuth::Site(_),
                Message::SessionOpened {
                    session,
                    key,
                    agent,
                },
            ) => {
                self.events.push_back(GatewayEvent::SessionOpened {
                    session,
                    key,
                    agent,
                });
            }
            (Phase::Running, PeerAuth::Site(_), Message::SessionRefused { session, reason }) => {
                self.events
                    .push_back(GatewayEvent::SessionRefused { session, reason });
            }
            (
                Phase::Running,
                _,
                Message::SessionClose {
                    session,
                    reason,
                    agent,
                },
            ) => {
                self.events.push_back(GatewayEvent::SessionClose {
                    session,
                    reason,
                    agent,
                });
            }
            (phase, _, other) => {
                self.violation(format!("unexpected `{}` ({phase:?})", other.kind()), now)
            }
        }
    }

    /// Accepts the peer after `hello`. A technician gets its tunnel address and inventory.
    pub fn welcome(
        &mut self,
        name: &str,
        tunnel_ip: Option<Ipv4Addr>,
        inventory: Option<Vec<SiteView>>,
        now: Instant,
    ) {
        if self.phase == Phase::AwaitDecision {
            self.phase = Phase::Running;
            self.link.send(
                &Message::Welcome {
                    name: name.into(),
                    tunnel_ip,
                    inventory,
                },
                now,
            );
        }
    }

    /// Answers an enrollment and ends the link.
    pub fn enrolled(&mut self, certificate: &[u8], ca: &[u8], now: Instant) {
        self.link.send(
            &Message::Enrolled {
                certificate: hex::encode(certificate),
                ca: hex::encode(ca),
            },
            now,
        );
        self.link.close(CloseReason::Local);
    }

    /// Sends an error and ends the link.
    pub fn refuse(&mut self, code: ErrorCode, text: &str, now: Instant) {
        self.link.send(
            &Message::Error {
                code,
                text: text.into(),
            },
            now,
        );
        self.link.close(CloseReason::Local);
    }

    /// The answer to `list`, or a push after a change.
    pub fn inventory(&mut self, sites: Vec<SiteView>, update: bool, now: Instant) {
        let m = if update {
            Message::InventoryUpdate { sites }
        } else {
            Message::Inventory { sites }
        };
        self.link.send(&m, now);
    }

    /// Forwards a session message to this peer.
    pub fn send(&mut self, message: &Message, now: Instant) {
        self.link.send(message, now);
    }

    pub fn send_data(&mut self, session: u32, datagram: &[u8], now: Instant) {
        self.link.send_data(session, datagram, now);
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.link.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.link.poll_timeout()?;
        Some(if self.phase == Phase::AwaitHello {
            t.min(self.hello_deadline)
        } else {
            t
        })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link.closed().is_some() {
            return;
        }
        if self.phase == Phase::AwaitHello && now >= self.hello_deadline {
            self.link.close(CloseReason::Timeout);
            self.events
                .push_back(GatewayEvent::Closed(CloseReason::Timeout));
            return;
        }
        if self.link.handle_timeout(now) {
            self.events
                .push_back(GatewayEvent::Closed(CloseReason::Timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, FrameDecoder};

    /// The messages the core has queued for its peer.
    fn sent(gw: &mut GatewayCore) -> Vec<Message> {
        let mut d = FrameDecoder::new();
        while let Some(bytes) = gw.poll_transmit() {
            d.push(&bytes);
        }
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().expect("valid frames") {
            match f {
                frame::Frame::Control(json) => out.push(Message::from_json(&json).expect("json")),
                frame::Frame::Data { .. } => panic!("unexpected data"),
            }
        }
        out
    }

    fn events(gw: &mut GatewayCore) -> Vec<GatewayEvent> {
        std::iter::from_fn(|| gw.poll_event()).collect()
    }

    /// A control frame header announcing `len` bytes of payload.
    fn control_header(len: usize) -> Vec<u8> {
        let mut h = vec![frame::PROTOCOL_VERSION, 1];
        h.extend_from_slice(&u32::try_from(len).expect("fits").to_be_bytes());
        h
    }

    fn assert_refused_for_size(gw: &mut GatewayCore, len: usize, max: usize) {
        let text = format!("frame of {len} bytes exceeds the maximum of {max} for its kind");
        assert!(gw.is_closed());
        assert_eq!(
            sent(gw),
            [Message::Error {
                code: ErrorCode::Protocol,
                text: text.clone()
            }]
        );
        assert_eq!(
            events(gw),
            [GatewayEvent::Closed(CloseReason::Protocol(text))]
        );
    }

    #[test]
    fn a_peer_without_a_certificate_has_a_shorter_hello_window() {
        let now = Instant::now();
        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        assert_eq!(gw.poll_timeout(), Some(now + HELLO_TIMEOUT_ANONYMOUS));
        assert_eq!(HELLO_TIMEOUT_ANONYMOUS, Duration::from_secs(3));
        gw.handle_timeout(now + HELLO_TIMEOUT_ANONYMOUS);
        assert!(gw.is_closed());
        assert_eq!(
            events(&mut gw),
            [GatewayEvent::Closed(CloseReason::Timeout)]
        );

        let mut gw = GatewayCore::new(now, PeerAuth::Site("plant-a".into()));
        assert_eq!(gw.poll_timeout(), Some(now + HELLO_TIMEOUT));
        gw.handle_timeout(now + Duration::from_secs(3));
        assert!(!gw.is_closed());
    }

    #[test]
    fn an_anonymous_peer_may_send_only_small_control_frames() {
        let now = Instant::now();
        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        gw.handle_input(&control_header(MAX_CONTROL_UNAUTHENTICATED), now);
        assert!(!gw.is_closed(), "at the limit is only incomplete");

        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        let len = MAX_CONTROL_UNAUTHENTICATED + 1;
        gw.handle_input(&control_header(len), now);
        assert_refused_for_size(&mut gw, len, MAX_CONTROL_UNAUTHENTICATED);
    }

    #[test]
    fn an_authenticated_peer_may_send_up_to_a_mebibyte() {
        let now = Instant::now();
        for auth in [
            PeerAuth::Technician("alice".into()),
            PeerAuth::Site("plant-a".into()),
        ] {
            let mut gw = GatewayCore::new(now, auth.clone());
            gw.handle_input(&control_header(MAX_CONTROL_FROM_PEER), now);
            assert!(!gw.is_closed(), "{auth:?}: at the limit is only incomplete");

            let mut gw = GatewayCore::new(now, auth);
            let len = MAX_CONTROL_FROM_PEER + 1;
            gw.handle_input(&control_header(len), now);
            assert_refused_for_size(&mut gw, len, MAX_CONTROL_FROM_PEER);
        }
    }
}
