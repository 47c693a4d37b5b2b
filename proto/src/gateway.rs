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

/// A peer must say `hello` (or `enroll`) this soon after the TLS handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub fn new(now: Instant, auth: PeerAuth) -> Self {
        // The interval is replaced by the peer's own once it says hello.
        Self {
            link: Link::new(now, HELLO_TIMEOUT),
            auth,
            phase: Phase::AwaitHello,
            hello_deadline: now + HELLO_TIMEOUT,
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
