//! The site agent's side of its link to the gateway: enrollment, or the running link.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::frame::PROTOCOL_VERSION;
use crate::link::{CloseReason, DatagramPool, Input, Link};
use crate::message::{FirewallChange, Message, Role};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteEvent {
    /// Enrollment succeeded: certificate and CA, DER.
    Enrolled {
        certificate: Vec<u8>,
        ca: Vec<u8>,
    },
    /// The gateway accepted the site's `hello`.
    Welcomed,
    SessionOpen {
        session: u32,
        agent: String,
        key: String,
        tunnel_ip: Option<Ipv4Addr>,
        /// `Some(max_datagram)`: this site, the gateway and the technician's client all
        /// announced offload (see [`crate::message`]), so super-packets may go into the
        /// session's tunnel in WireGuard messages of up to that many bytes. `None`: MTU-size
        /// packets only.
        offload: Option<u32>,
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
    Closed(CloseReason),
}

/// What the site reports about itself in its `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteHello {
    pub software: String,
    pub boot_id: String,
    pub heartbeat: Duration,
    pub agents: Vec<Agent>,
    /// Say in `hello` that this site takes super-packets (see [`crate::message`]); false
    /// behaves as a site that predates offload.
    pub offload: bool,
}

/// Sans-IO site link; see [`crate::link`] for the calling contract.
#[derive(Debug)]
pub struct SiteCore {
    link: Link,
    enrolling: bool,
    welcomed: bool,
    events: VecDeque<SiteEvent>,
    datagrams: DatagramPool,
    /// This site's `hello` said `offload`.
    offload: bool,
    /// The gateway's `max_datagram` (its `welcome`): it relays super-packets.
    max_datagram: Option<u32>,
}

impl SiteCore {
    /// A running link of an enrolled site; the `hello` is queued at once.
    pub fn new(now: Instant, hello: SiteHello) -> Self {
        let offload = hello.offload;
        let mut link = Link::new(now, hello.heartbeat);
        link.send(
            &Message::Hello {
                role: Role::Site,
                version: PROTOCOL_VERSION,
                software: hello.software,
                heartbeat_secs: u32::try_from(link.heartbeat().as_secs()).unwrap_or(u32::MAX),
                boot_id: Some(hello.boot_id),
                agents: hello.agents,
                offload: hello.offload,
            },
            now,
        );
        Self {
            link,
            enrolling: false,
            welcomed: false,
            events: VecDeque::new(),
            datagrams: DatagramPool::default(),
            offload,
            max_datagram: None,
        }
    }

    /// An enrollment link: sends the token, the name and the site's public key (DER SPKI).
    pub fn enroll(now: Instant, token: &str, site: &str, public_key: &[u8]) -> Self {
        let mut link = Link::new(now, Duration::from_secs(30));
        link.send(
            &Message::Enroll {
                token: token.into(),
                site: site.into(),
                public_key: hex::encode(public_key),
            },
            now,
        );
        Self {
            link,
            enrolling: true,
            welcomed: false,
            events: VecDeque::new(),
            datagrams: DatagramPool::default(),
            offload: false,
            max_datagram: None,
        }
    }

    pub fn is_welcomed(&self) -> bool {
        self.welcomed && self.link.closed().is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.link.closed().is_some()
    }

    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.link.push_input(bytes, now);
        while let Some(input) = self.link.next_input() {
            match input {
                Input::Failed(reason) => self.events.push_back(SiteEvent::Closed(reason)),
                Input::Data { session, datagram } => self.events.push_back(SiteEvent::Data {
                    session,
                    datagram: self.datagrams.copy(datagram),
                }),
                Input::Message(m) => self.on_message(m),
            }
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.link.close(reason.clone());
        self.events.push_back(SiteEvent::Closed(reason));
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::Error { code, text } => self.close(CloseReason::Error { code, text }),
            Message::Enrolled { certificate, ca } if self.enrolling => {
                match (hex::decode(&certificate), hex::decode(&ca)) {
                    (Ok(certificate), Ok(ca)) => {
                        self.events
                            .push_back(SiteEvent::Enrolled { certificate, ca });
                        self.link.close(CloseReason::Local);
                    }
                    _ => self.close(CloseReason::Protocol("enrolled: bad hex".into())),
                }
            }
            Message::Welcome { max_datagram, .. } if !self.enrolling && !self.welcomed => {
                self.welcomed = true;
                self.max_datagram = max_datagram.filter(|_| self.offload);
                self.events.push_back(SiteEvent::Welcomed);
            }
            Message::SessionOpen {
                session,
                agent,
                key,
                tunnel_ip,
                offload,
                ..
            } if self.welcomed => {
                self.events.push_back(SiteEvent::SessionOpen {
                    session,
                    agent,
                    key,
                    tunnel_ip,
                    offload: self.max_datagram.filter(|_| offload),
                });
            }
            Message::SessionClose {
                session,
                reason,
                agent,
            } if self.welcomed => {
                self.events.push_back(SiteEvent::SessionClose {
                    session,
                    reason,
                    agent,
                });
            }
            other => self.close(CloseReason::Protocol(format!(
                "unexpected `{}`",
                other.kind()
            ))),
        }
    }

    /// Reports a new agent list (after a configuration reload).
    pub fn update_agents(&mut self, agents: Vec<Agent>, now: Instant) {
        self.link.send(&Message::Agents { agents }, now);
    }

    /// Says that the site's switch reads off: the caller closes the link once this is sent
    /// (the gateway then shows the site as switched off rather than lost).
    pub fn switched_off(&mut self, now: Instant) {
        self.link.send(&Message::SwitchedOff, now);
    }

    /// Reports that the site restored its firewall table (audited at the gateway).
    pub fn firewall_restored(&mut self, change: FirewallChange, now: Instant) {
        self.link.send(&Message::FirewallRestored { change }, now);
    }

    pub fn session_opened(&mut self, session: u32, key: &str, agent: Agent, now: Instant) {
        self.link.send(
            &Message::SessionOpened {
                session,
                key: key.into(),
                agent,
                // Only through a gateway that relays super-packets (and so reads the field).
                offload: self.max_datagram.is_some(),
            },
            now,
        );
    }

    pub fn session_refused(&mut self, session: u32, reason: &str, now: Instant) {
        self.link.send(
            &Message::SessionRefused {
                session,
                reason: reason.into(),
            },
            now,
        );
    }

    /// Closes a session, or with `agent` only that agent's part of it.
    pub fn close_session(&mut self, session: u32, agent: Option<&str>, reason: &str, now: Instant) {
        self.link.send(
            &Message::SessionClose {
                session,
                reason: reason.into(),
                agent: agent.map(str::to_owned),
            },
            now,
        );
    }

    pub fn send_data(&mut self, session: u32, datagram: &[u8], now: Instant) {
        self.link.send_data(session, datagram, now);
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.link.poll_transmit()
    }

    /// Gives back a buffer from [`SiteCore::poll_transmit`] once it is written (optional: saves
    /// growing a new one for the next writes).
    pub fn reclaim(&mut self, buf: Vec<u8>) {
        self.link.reclaim(buf);
    }

    /// Gives back the buffer of a [`SiteEvent::Data`] datagram once it is handled (optional: the
    /// next datagrams reuse it instead of allocating).
    pub fn recycle_datagram(&mut self, buf: Vec<u8>) {
        self.datagrams.recycle(buf);
    }

    pub fn poll_event(&mut self) -> Option<SiteEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link.handle_timeout(now) {
            self.events
                .push_back(SiteEvent::Closed(CloseReason::Timeout));
        }
    }
}
