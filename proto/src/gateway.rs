//! The gateway's side of one peer link (a technician, a site, or a site enrolling).
//!
//! The core checks the order and shape of messages, every peer-controlled field
//! ([`crate::validate`]) and that the role declared in `hello` matches the certificate; every decision that needs the registry (is the account open, which
//! sites may it see, is the token valid) is handed to the caller as an event, and the caller
//! answers with [`GatewayCore::welcome`], [`GatewayCore::refuse`] and the like.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::frame::PROTOCOL_VERSION;
use crate::link::{CloseReason, Input, Link};
use crate::message::{ErrorCode, FirewallChange, Message, Role, SiteView};
use crate::validate::{self, Invalid};

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
/// peer sends is a site's `hello` (or `agents`) with its agents, and [`validate::agents`]
/// bounds those: at most 256 agents, each a 64-byte name, an address and 64 ports, about
/// 2.3 KB of JSON; the largest valid hello is 581 484 bytes (built by the test
/// `the_largest_valid_hello_fits`). Inventories, the only bigger messages, flow from the
/// gateway.
pub const MAX_CONTROL_FROM_PEER: usize = 1024 * 1024;

/// The largest WireGuard message this gateway relays in a data frame, in bytes: a data
/// payload of [`crate::frame::MAX_DATA`] less its 4-byte session id. Announced in `welcome`
/// (`max_datagram`) to peers that take super-packets.
pub const MAX_DATAGRAM: u32 = (crate::frame::MAX_DATA - 4) as u32;

/// Who the TLS handshake says the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    Technician(String),
    Site(String),
    /// No client certificate: the peer may only enroll.
    Anonymous,
}

/// What a peer's control messages ask of the caller, and the link's end. Datagrams are not
/// events: [`GatewayCore::handle_input`] hands them to its `on_data` callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// A technician said hello: check the account and answer.
    TechnicianHello {
        software: String,
        /// The client's `hello` said `offload` (it takes super-packets).
        offload: bool,
    },
    /// A site said hello: record it and answer.
    SiteHello {
        software: String,
        boot_id: String,
        agents: Vec<Agent>,
        heartbeat: Duration,
        /// The site's `hello` said `offload` (it takes super-packets).
        offload: bool,
    },
    /// An anonymous peer wants to enroll.
    Enroll {
        token: String,
        site: String,
        public_key: Vec<u8>,
    },
    /// A technician asks for its inventory; `changes`: it applies `inventory_changes`.
    List {
        changes: bool,
    },
    Agents(Vec<Agent>),
    /// A site restored its firewall table.
    FirewallRestored(FirewallChange),
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
        /// The site takes super-packets on this session.
        offload: bool,
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
    Logout,
    /// A site's switch says off: the site closes the link next.
    SwitchedOff,
    Closed(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitDecision,
    Running,
}

/// Checks every peer-controlled field of a message before it becomes an event (the public key
/// of `enroll` is checked where it is decoded). Messages the gateway never accepts have nothing
/// to check: [`GatewayCore`] refuses them as unexpected, without echoing them.
fn check_fields(m: &Message) -> Result<(), Invalid> {
    use validate::{MAX_BOOT_ID_LEN, MAX_REASON_LEN, MAX_SOFTWARE_LEN, MAX_TOKEN_LEN};
    match m {
        Message::Enroll { token, site, .. } => {
            validate::text("token", token, MAX_TOKEN_LEN)?;
            validate::name("site", site)
        }
        // Another version's fields may follow other rules: that hello is refused for its
        // version.
        Message::Hello { version, .. } if *version != PROTOCOL_VERSION => Ok(()),
        Message::Hello {
            software,
            boot_id,
            agents,
            ..
        } => {
            validate::text("software", software, MAX_SOFTWARE_LEN)?;
            if let Some(boot_id) = boot_id {
                validate::text("boot id", boot_id, MAX_BOOT_ID_LEN)?;
            }
            validate::agents(agents)
        }
        Message::Agents { agents } => validate::agents(agents),
        Message::SessionOpen {
            site, agent, key, ..
        } => {
            validate::name("site", site)?;
            validate::name("agent", agent)?;
            validate::wg_key("key", key)
        }
        Message::SessionOpened { key, agent, .. } => {
            validate::wg_key("key", key)?;
            validate::agents(std::slice::from_ref(agent))
        }
        Message::SessionRefused { reason, .. } => validate::text("reason", reason, MAX_REASON_LEN),
        Message::SessionClose { reason, agent, .. } => {
            validate::text("reason", reason, MAX_REASON_LEN)?;
            agent
                .as_deref()
                .map_or(Ok(()), |agent| validate::name("agent", agent))
        }
        Message::Enrolled { .. }
        | Message::Welcome { .. }
        | Message::List { .. }
        | Message::Inventory { .. }
        | Message::InventoryUpdate { .. }
        | Message::InventoryChanges { .. }
        | Message::FirewallRestored { .. }
        | Message::Heartbeat
        | Message::Logout
        | Message::SwitchedOff
        | Message::Error { .. } => Ok(()),
    }
}

/// Sans-IO gateway link; see [`crate::link`] for the calling contract.
#[derive(Debug)]
pub struct GatewayCore {
    link: Link,
    auth: PeerAuth,
    phase: Phase,
    hello_deadline: Instant,
    events: VecDeque<GatewayEvent>,
    /// The peer's `hello` said `offload`: it reads the offload fields.
    peer_offload: bool,
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
            peer_offload: false,
        }
    }

    pub fn auth(&self) -> &PeerAuth {
        &self.auth
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running && self.link.closed().is_none()
    }

    /// Why the link ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.link.closed()
    }

    pub fn is_closed(&self) -> bool {
        self.link.closed().is_some()
    }

    /// The peer's heartbeat interval (after `hello`).
    pub fn heartbeat(&self) -> Duration {
        self.link.heartbeat()
    }

    /// Feeds received bytes. Control messages become events ([`poll_event`](Self::poll_event));
    /// each data frame is handed to `on_data(session, datagram)` in arrival order, borrowed
    /// from the receive buffer: no allocation per datagram. Data before the peer is welcomed is
    /// a protocol violation (refused, the link closed, [`GatewayEvent::Closed`]).
    pub fn handle_input(
        &mut self,
        bytes: &[u8],
        now: Instant,
        on_data: &mut dyn FnMut(u32, &[u8]),
    ) {
        self.link.push_input(bytes, now);
        while let Some(input) = self.link.next_input() {
            match input {
                Input::Failed(reason) => self.events.push_back(GatewayEvent::Closed(reason)),
                Input::Data { session, datagram } if self.phase == Phase::Running => {
                    on_data(session, datagram);
                }
                Input::Data { .. } => self.violation("data before login".into(), now),
                Input::Message(m) => self.on_message(m, now),
            }
        }
    }

    fn violation(&mut self, what: String, now: Instant) {
        let what = crate::link::bounded_reason(&what);
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
        if let Err(e) = check_fields(&m) {
            self.violation(format!("{}: {e}", m.kind()), now);
            return;
        }
        match (self.phase, &self.auth, m) {
            (
                Phase::AwaitHello,
                PeerAuth::Anonymous,
                Message::Enroll {
                    token,
                    site,
                    public_key,
                },
            ) => match validate::hex_bytes("public key", &public_key, validate::MAX_PUBLIC_KEY_LEN)
            {
                Ok(public_key) => {
                    self.phase = Phase::AwaitDecision;
                    self.events.push_back(GatewayEvent::Enroll {
                        token,
                        site,
                        public_key,
                    });
                }
                Err(e) => self.violation(format!("enroll: {e}"), now),
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
                    offload,
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
                        self.peer_offload = offload;
                        self.events
                            .push_back(GatewayEvent::TechnicianHello { software, offload });
                    }
                    (Role::Site, PeerAuth::Site(_)) => {
                        self.phase = Phase::AwaitDecision;
                        self.peer_offload = offload;
                        let heartbeat = self.link.heartbeat();
                        self.events.push_back(GatewayEvent::SiteHello {
                            software,
                            boot_id: boot_id.unwrap_or_default(),
                            agents,
                            heartbeat,
                            offload,
                        });
                    }
                    _ => self.violation(
                        "the role in hello does not match the certificate".into(),
                        now,
                    ),
                }
            }
            (Phase::Running, PeerAuth::Technician(_), Message::List { changes }) => {
                self.events.push_back(GatewayEvent::List { changes })
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
            (Phase::Running, PeerAuth::Site(_), Message::SwitchedOff) => {
                self.events.push_back(GatewayEvent::SwitchedOff)
            }
            (Phase::Running, PeerAuth::Site(_), Message::FirewallRestored { change }) => self
                .events
                .push_back(GatewayEvent::FirewallRestored(change)),
            (
                Phase::Running,
                PeerAuth::Site(_),
                Message::SessionOpened {
                    session,
                    key,
                    agent,
                    offload,
                },
            ) => {
                self.events.push_back(GatewayEvent::SessionOpened {
                    session,
                    key,
                    agent,
                    // Only from a site that announced offload (and so got `max_datagram`).
                    offload: offload && self.peer_offload,
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
    /// `forbid_remembered_password`: the account's policy, for a technician (false for a site).
    /// A peer whose `hello` said `offload` also learns the relay's data limit
    /// ([`MAX_DATAGRAM`]: this gateway relays super-packets).
    pub fn welcome(
        &mut self,
        name: &str,
        tunnel_ip: Option<Ipv4Addr>,
        inventory: Option<Vec<SiteView>>,
        forbid_remembered_password: bool,
        now: Instant,
    ) {
        if self.phase == Phase::AwaitDecision {
            self.phase = Phase::Running;
            self.link.send(
                &Message::Welcome {
                    name: name.into(),
                    tunnel_ip,
                    inventory,
                    forbid_remembered_password,
                    max_datagram: self.peer_offload.then_some(MAX_DATAGRAM),
                },
                now,
            );
        }
    }

    /// Whether the peer's `hello` said `offload` (false before it).
    pub fn peer_offload(&self) -> bool {
        self.peer_offload
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

    /// Only what changed since the last inventory message (see [`Message::InventoryChanges`]);
    /// for a client that asked for changes.
    pub fn inventory_changes(&mut self, sites: Vec<SiteView>, removed: Vec<String>, now: Instant) {
        self.link
            .send(&Message::InventoryChanges { sites, removed }, now);
    }

    /// Forwards a session message to this peer, without the offload fields if the peer did
    /// not announce offload ([`Message::for_peer`]: a peer that predates them refuses them).
    pub fn send(&mut self, message: &Message, now: Instant) {
        if self.peer_offload {
            self.link.send(message, now);
        } else {
            self.link.send(&message.clone().for_peer(false), now);
        }
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

    fn no_data(_: u32, _: &[u8]) {
        panic!("no datagram expected");
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
        gw.handle_input(
            &control_header(MAX_CONTROL_UNAUTHENTICATED),
            now,
            &mut no_data,
        );
        assert!(!gw.is_closed(), "at the limit is only incomplete");

        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        let len = MAX_CONTROL_UNAUTHENTICATED + 1;
        gw.handle_input(&control_header(len), now, &mut no_data);
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
            gw.handle_input(&control_header(MAX_CONTROL_FROM_PEER), now, &mut no_data);
            assert!(!gw.is_closed(), "{auth:?}: at the limit is only incomplete");

            let mut gw = GatewayCore::new(now, auth);
            let len = MAX_CONTROL_FROM_PEER + 1;
            gw.handle_input(&control_header(len), now, &mut no_data);
            assert_refused_for_size(&mut gw, len, MAX_CONTROL_FROM_PEER);
        }
    }

    fn control(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_control(&m.to_json(), &mut out);
        out
    }

    fn wg_key() -> String {
        "ab".repeat(32)
    }

    fn plc(address: &str) -> Agent {
        Agent::new(
            "press-4-plc",
            crate::agent::AgentType::SiemensS7,
            address.parse().expect("ip"),
            [],
        )
    }

    fn enroll(site: &str) -> Message {
        Message::Enroll {
            token: "00ff".into(),
            site: site.into(),
            public_key: hex::encode([1u8; 91]),
        }
    }

    fn site_hello(software: &str, agents: Vec<Agent>) -> Message {
        Message::Hello {
            role: Role::Site,
            version: PROTOCOL_VERSION,
            software: software.into(),
            heartbeat_secs: 600,
            boot_id: Some("boot-1".into()),
            agents,
            offload: false,
        }
    }

    fn running(auth: PeerAuth, now: Instant) -> GatewayCore {
        let mut gw = GatewayCore::new(now, auth.clone());
        let hello = match auth {
            PeerAuth::Site(_) => site_hello("0.1.0", vec![plc("192.168.0.10")]),
            _ => Message::Hello {
                role: Role::Technician,
                version: PROTOCOL_VERSION,
                software: "0.1.0".into(),
                heartbeat_secs: 15,
                boot_id: None,
                agents: Vec::new(),
                offload: false,
            },
        };
        gw.handle_input(&control(&hello), now, &mut no_data);
        assert_eq!(events(&mut gw).len(), 1);
        gw.welcome("x", None, None, false, now);
        let _ = sent(&mut gw);
        assert!(gw.is_running());
        gw
    }

    /// The peer was told why, the link is closed, and the only event is that closing.
    fn assert_protocol_refusal(gw: &mut GatewayCore, expected: &str) {
        assert!(gw.is_closed());
        let sent = sent(gw);
        let [Message::Error { code, text }] = sent.as_slice() else {
            panic!("{sent:?}");
        };
        assert_eq!(*code, ErrorCode::Protocol);
        assert!(text.contains(expected), "{text}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert_eq!(
            events(gw),
            [GatewayEvent::Closed(CloseReason::Protocol(text.clone()))]
        );
    }

    fn refused(auth: PeerAuth, running_first: bool, m: &Message, expected: &str) {
        let now = Instant::now();
        let mut gw = if running_first {
            running(auth, now)
        } else {
            GatewayCore::new(now, auth)
        };
        gw.handle_input(&control(m), now, &mut no_data);
        assert_protocol_refusal(&mut gw, expected);
    }

    #[test]
    fn an_enrollment_is_checked_before_it_becomes_an_event() {
        let now = Instant::now();
        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        gw.handle_input(&control(&enroll("plant-a")), now, &mut no_data);
        assert!(matches!(
            events(&mut gw).as_slice(),
            [GatewayEvent::Enroll { site, public_key, .. }] if site == "plant-a" && public_key.len() == 91
        ));

        // 3 MB: the frame limit refuses it from the header.
        let mut gw = GatewayCore::new(now, PeerAuth::Anonymous);
        gw.handle_input(&control(&enroll(&"a".repeat(3_000_000))), now, &mut no_data);
        assert_protocol_refusal(&mut gw, "exceeds the maximum of 16384");

        refused(
            PeerAuth::Anonymous,
            false,
            &enroll(&"a".repeat(200)),
            "site is 200 bytes long",
        );
        refused(
            PeerAuth::Anonymous,
            false,
            &enroll("plant\nSITE ENROLLED"),
            "site `plant\\nSITE ENROLLED`",
        );
        let long_token = Message::Enroll {
            token: "0".repeat(129),
            site: "plant-a".into(),
            public_key: "00".into(),
        };
        refused(
            PeerAuth::Anonymous,
            false,
            &long_token,
            "token is 129 bytes long",
        );
        let big_key = Message::Enroll {
            token: "00".into(),
            site: "plant-a".into(),
            public_key: "00".repeat(1025),
        };
        refused(
            PeerAuth::Anonymous,
            false,
            &big_key,
            "public key is 1025 bytes long",
        );
        let not_hex = Message::Enroll {
            token: "00".into(),
            site: "plant-a".into(),
            public_key: "xyz".into(),
        };
        refused(
            PeerAuth::Anonymous,
            false,
            &not_hex,
            "public key is not hexadecimal",
        );
    }

    #[test]
    fn a_sites_hello_and_agents_are_checked() {
        let site = || PeerAuth::Site("plant-a".into());
        let many: Vec<Agent> = (0..40_000)
            .map(|i| {
                let mut a = plc("10.0.0.1");
                a.name = format!("a{i}");
                a
            })
            .collect();
        // 40 000 agents are more than a peer's frame limit...
        refused(
            site(),
            false,
            &site_hello("0.1.0", many.clone()),
            "exceeds the maximum of 1048576",
        );
        // ...and 300 are more than a site may have.
        refused(
            site(),
            false,
            &site_hello("0.1.0", many[..300].to_vec()),
            "300 agents; at most 256",
        );
        refused(
            site(),
            false,
            &site_hello("0.1.0", vec![plc("10.0.0.1"), plc("10.0.0.2")]),
            "two agents are named `press-4-plc`",
        );
        refused(
            site(),
            false,
            &site_hello("0.1.0", vec![plc("224.0.0.1")]),
            "224.0.0.1 is a multicast address",
        );
        refused(
            site(),
            false,
            &site_hello("0.1\u{1b}[2J", vec![]),
            "software `0.1\\u{1b}[2J` holds a control character",
        );
        let boot = Message::Hello {
            role: Role::Site,
            version: PROTOCOL_VERSION,
            software: "0.1.0".into(),
            heartbeat_secs: 600,
            boot_id: Some("b".repeat(65)),
            agents: Vec::new(),
            offload: false,
        };
        refused(site(), false, &boot, "boot id is 65 bytes long");

        let agents = |agents| Message::Agents { agents };
        refused(
            site(),
            true,
            &agents(vec![plc("ff02::1")]),
            "ff02::1 is a multicast address",
        );
        refused(site(), true, &agents(many[..257].to_vec()), "257 agents");

        let now = Instant::now();
        let mut gw = running(site(), now);
        gw.handle_input(&control(&agents(vec![plc("10.0.0.7")])), now, &mut no_data);
        assert_eq!(
            events(&mut gw),
            [GatewayEvent::Agents(vec![plc("10.0.0.7")])]
        );
    }

    #[test]
    fn session_messages_are_checked() {
        let site = || PeerAuth::Site("plant-a".into());
        let tech = || PeerAuth::Technician("alice".into());
        let open = |site: &str, agent: &str, key: String| Message::SessionOpen {
            session: 1,
            site: site.into(),
            agent: agent.into(),
            key,
            tunnel_ip: None,
            offload: false,
        };
        refused(
            tech(),
            true,
            &open("plant a", "plc", wg_key()),
            "site `plant a`",
        );
        refused(
            tech(),
            true,
            &open("plant-a", &"p".repeat(65), wg_key()),
            "agent is 65 bytes long",
        );
        refused(
            tech(),
            true,
            &open(
                "plant-a",
                "plc",
                "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=".into(),
            ),
            "key is not a WireGuard public key",
        );
        let now = Instant::now();
        let mut gw = running(tech(), now);
        gw.handle_input(
            &control(&open("plant-a", "plc", wg_key())),
            now,
            &mut no_data,
        );
        assert_eq!(
            events(&mut gw),
            [GatewayEvent::SessionOpen {
                session: 1,
                site: "plant-a".into(),
                agent: "plc".into(),
                key: wg_key()
            }]
        );

        let opened = |key: String, agent: Agent| Message::SessionOpened {
            session: 1,
            key,
            agent,
            offload: false,
        };
        refused(
            site(),
            true,
            &opened(wg_key(), plc("239.1.2.3")),
            "239.1.2.3 is a multicast address",
        );
        refused(
            site(),
            true,
            &opened("k".into(), plc("10.0.0.1")),
            "key is not a WireGuard public key",
        );

        let refused_msg = Message::SessionRefused {
            session: 1,
            reason: "PLC in STOP\n\u{7}".into(),
        };
        refused(
            site(),
            true,
            &refused_msg,
            "reason `PLC in STOP\\n\\u{7}` holds a control character",
        );
        let long = Message::SessionRefused {
            session: 1,
            reason: "r".repeat(257),
        };
        refused(site(), true, &long, "reason is 257 bytes long");

        let close = |reason: &str, agent: Option<&str>| Message::SessionClose {
            session: 1,
            reason: reason.into(),
            agent: agent.map(str::to_owned),
        };
        refused(
            tech(),
            true,
            &close("bye\r", None),
            "reason `bye\\r` holds a control character",
        );
        refused(site(), true, &close("bye", Some("a b")), "agent `a b`");
        let now = Instant::now();
        let mut gw = running(site(), now);
        gw.handle_input(&control(&close("bye", Some("plc"))), now, &mut no_data);
        assert_eq!(
            events(&mut gw),
            [GatewayEvent::SessionClose {
                session: 1,
                reason: "bye".into(),
                agent: Some("plc".into())
            }]
        );
    }

    #[test]
    fn the_largest_valid_hello_fits() {
        // Every field at its limit, with the longest text each can take on the wire.
        let agents: Vec<Agent> = (0..crate::validate::MAX_AGENTS_PER_SITE)
            .map(|i| {
                Agent::new(
                    format!("{i:0>64}"),
                    crate::agent::AgentType::EthernetIp,
                    "fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                        .parse()
                        .expect("ip"),
                    (0..crate::validate::MAX_PORTS_PER_AGENT as u16 - 2)
                        .map(|p| crate::agent::Port::udp(60_000 + p)),
                )
            })
            .collect();
        crate::validate::agents(&agents).expect("valid");
        let hello = Message::Hello {
            role: Role::Site,
            version: PROTOCOL_VERSION,
            // A quote takes two bytes in JSON.
            software: "\"".repeat(crate::validate::MAX_SOFTWARE_LEN),
            heartbeat_secs: u32::MAX,
            boot_id: Some("\"".repeat(crate::validate::MAX_BOOT_ID_LEN)),
            agents,
            offload: false,
        };
        let len = hello.to_json().len();
        assert!(len <= MAX_CONTROL_FROM_PEER, "{len}");
        assert!(
            len > MAX_CONTROL_FROM_PEER / 2,
            "the bound is not loose: {len}"
        );
        let now = Instant::now();
        let mut gw = GatewayCore::new(now, PeerAuth::Site("plant-a".into()));
        gw.handle_input(&control(&hello), now, &mut no_data);
        assert!(matches!(
            events(&mut gw).as_slice(),
            [GatewayEvent::SiteHello { .. }]
        ));
    }

    #[test]
    fn datagrams_are_handed_over_borrowed_in_arrival_order() {
        let now = Instant::now();
        let mut gw = running(PeerAuth::Technician("alice".into()), now);
        let mut wire = Vec::new();
        frame::encode_data(1, b"one", &mut wire);
        wire.extend(control(&Message::List { changes: false }));
        frame::encode_data(2, b"two", &mut wire);
        frame::encode_data(1, b"", &mut wire);
        let mut got = Vec::new();
        // Cut inside the second datagram: the rest comes with the next read.
        let cut = wire.len() - 12;
        gw.handle_input(&wire[..cut], now, &mut |s, d| got.push((s, d.to_vec())));
        assert_eq!(got, [(1, b"one".to_vec())]);
        gw.handle_input(&wire[cut..], now, &mut |s, d| got.push((s, d.to_vec())));
        assert_eq!(
            got,
            [(1, b"one".to_vec()), (2, b"two".to_vec()), (1, Vec::new())]
        );
        assert_eq!(events(&mut gw), [GatewayEvent::List { changes: false }]);
        assert!(!gw.is_closed());
    }

    #[test]
    fn a_datagram_before_welcome_is_a_protocol_violation() {
        let now = Instant::now();
        for auth in [
            PeerAuth::Anonymous,
            PeerAuth::Technician("alice".into()),
            PeerAuth::Site("plant-a".into()),
        ] {
            let mut gw = GatewayCore::new(now, auth);
            let mut wire = Vec::new();
            frame::encode_data(1, b"early", &mut wire);
            gw.handle_input(&wire, now, &mut no_data);
            assert_protocol_refusal(&mut gw, "data before login");
        }
    }

    #[test]
    fn a_site_says_its_switch_is_off_and_no_one_else_may() {
        let now = Instant::now();
        let mut gw = running(PeerAuth::Site("plant-a".into()), now);
        // What the site's core sends is what the gateway's core reads.
        let mut site = crate::site::SiteCore::new(
            now,
            crate::site::SiteHello {
                software: "0.1.0".into(),
                boot_id: "b".into(),
                heartbeat: Duration::from_secs(600),
                agents: Vec::new(),
                offload: false,
            },
        );
        let _hello = site.poll_transmit();
        site.switched_off(now);
        let wire: Vec<u8> = std::iter::from_fn(|| site.poll_transmit())
            .flatten()
            .collect();
        gw.handle_input(&wire, now, &mut no_data);
        assert_eq!(events(&mut gw), [GatewayEvent::SwitchedOff]);
        assert!(!gw.is_closed(), "the site closes the link itself");

        refused(
            PeerAuth::Technician("alice".into()),
            true,
            &Message::SwitchedOff,
            "switched_off",
        );
        refused(
            PeerAuth::Site("plant-a".into()),
            false,
            &Message::SwitchedOff,
            "switched_off",
        );
    }
}
