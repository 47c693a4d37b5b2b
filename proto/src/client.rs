//! The technician client's side of its link to the gateway.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::frame::PROTOCOL_VERSION;
use crate::link::{CloseReason, DatagramPool, Input, Link};
use crate::message::{Message, Role, SiteView, apply_inventory_changes};

/// The client's heartbeat: frequent enough that a dead gateway is noticed within a minute
/// (3 × 15 s) even when no TCP reset arrives.
pub const CLIENT_HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    LoggedIn {
        account: String,
        tunnel_ip: Option<Ipv4Addr>,
        sites: Vec<SiteView>,
        /// The account forbids remembering its password (see [`Message::Welcome`]).
        forbid_remembered_password: bool,
    },
    /// The whole inventory, after a `list`, an update, or changes applied to the last one.
    Inventory(Vec<SiteView>),
    SessionOpened {
        session: u32,
        key: String,
        agent: Agent,
        /// `Some(max_datagram)`: this client, the gateway and the site all announced offload
        /// (see [`crate::message`]), so super-packets may go into the session's tunnel in
        /// WireGuard messages of up to that many bytes. `None`: MTU-size packets only.
        offload: Option<u32>,
    },
    SessionRefused {
        session: u32,
        reason: String,
    },
    SessionClosed {
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

/// Sans-IO technician link; see [`crate::link`] for the calling contract.
#[derive(Debug)]
pub struct ClientCore {
    link: Link,
    logged_in: bool,
    events: VecDeque<ClientEvent>,
    datagrams: DatagramPool,
    /// This client's `hello` said `offload`.
    offload: bool,
    /// The gateway's `max_datagram` (its `welcome`): it relays super-packets.
    max_datagram: Option<u32>,
    /// The inventory as last received, with the changes since applied.
    inventory: Vec<SiteView>,
}

impl ClientCore {
    /// A new link; the `hello` is queued at once.
    pub fn new(now: Instant, software: &str, heartbeat: Duration) -> Self {
        Self::with_offload(now, software, heartbeat, true)
    }

    /// [`ClientCore::new`], saying in `hello` whether this client takes super-packets
    /// (`offload`; see [`crate::message`]). Without, it behaves as a client that predates
    /// offload: no offload field is sent, and none is granted.
    pub fn with_offload(now: Instant, software: &str, heartbeat: Duration, offload: bool) -> Self {
        let mut link = Link::new(now, heartbeat);
        link.send(
            &Message::Hello {
                role: Role::Technician,
                version: PROTOCOL_VERSION,
                software: software.to_owned(),
                heartbeat_secs: u32::try_from(link.heartbeat().as_secs()).unwrap_or(u32::MAX),
                boot_id: None,
                agents: Vec::new(),
                offload,
            },
            now,
        );
        Self {
            link,
            logged_in: false,
            events: VecDeque::new(),
            datagrams: DatagramPool::default(),
            offload,
            max_datagram: None,
            inventory: Vec::new(),
        }
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in && self.link.closed().is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.link.closed().is_some()
    }

    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        self.link.push_input(bytes, now);
        while let Some(input) = self.link.next_input() {
            match input {
                Input::Failed(reason) => self.events.push_back(ClientEvent::Closed(reason)),
                Input::Data { session, datagram } => self.events.push_back(ClientEvent::Data {
                    session,
                    datagram: self.datagrams.copy(datagram),
                }),
                Input::Message(m) => self.on_message(m, now),
            }
        }
    }

    fn protocol_error(&mut self, what: String) {
        let reason = CloseReason::Protocol(what);
        self.link.close(reason.clone());
        self.events.push_back(ClientEvent::Closed(reason));
    }

    fn on_message(&mut self, m: Message, now: Instant) {
        match (self.logged_in, m) {
            (
                false,
                Message::Welcome {
                    name,
                    tunnel_ip,
                    inventory,
                    forbid_remembered_password,
                    max_datagram,
                },
            ) => {
                self.logged_in = true;
                self.max_datagram = max_datagram.filter(|_| self.offload);
                let sites = inventory.unwrap_or_default();
                self.inventory.clone_from(&sites);
                self.events.push_back(ClientEvent::LoggedIn {
                    account: name,
                    tunnel_ip,
                    sites,
                    forbid_remembered_password,
                });
                // From now on only what changes, not the whole inventory at every change (a
                // gateway that predates changes answers with the inventory, and keeps sending
                // whole ones).
                self.link.send(&Message::List { changes: true }, now);
            }
            (_, Message::Error { code, text }) => {
                let reason = CloseReason::Error { code, text };
                self.link.close(reason.clone());
                self.events.push_back(ClientEvent::Closed(reason));
            }
            (true, Message::Inventory { sites } | Message::InventoryUpdate { sites }) => {
                self.inventory.clone_from(&sites);
                self.events.push_back(ClientEvent::Inventory(sites));
            }
            (true, Message::InventoryChanges { sites, removed }) => {
                apply_inventory_changes(&mut self.inventory, sites, &removed);
                self.events
                    .push_back(ClientEvent::Inventory(self.inventory.clone()));
            }
            (
                true,
                Message::SessionOpened {
                    session,
                    key,
                    agent,
                    offload,
                },
            ) => {
                self.events.push_back(ClientEvent::SessionOpened {
                    session,
                    key,
                    agent,
                    offload: self.max_datagram.filter(|_| offload && self.offload),
                });
            }
            (true, Message::SessionRefused { session, reason }) => {
                self.events
                    .push_back(ClientEvent::SessionRefused { session, reason });
            }
            (
                true,
                Message::SessionClose {
                    session,
                    reason,
                    agent,
                },
            ) => {
                self.events.push_back(ClientEvent::SessionClosed {
                    session,
                    reason,
                    agent,
                });
            }
            (logged_in, other) => {
                self.protocol_error(format!(
                    "unexpected `{}` (logged in: {logged_in})",
                    other.kind()
                ));
            }
        }
    }

    /// Asks for the current inventory.
    pub fn list(&mut self, now: Instant) {
        self.link.send(&Message::List { changes: true }, now);
    }

    /// Asks the gateway to open a session.
    pub fn open_session(&mut self, session: u32, site: &str, agent: &str, key: &str, now: Instant) {
        self.link.send(
            &Message::SessionOpen {
                session,
                site: site.into(),
                agent: agent.into(),
                key: key.into(),
                tunnel_ip: None,
                // The gateway knows from `hello`; the field is for the site.
                offload: false,
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

    /// Logs out; the link closes once the `logout` is transmitted.
    pub fn logout(&mut self, now: Instant) {
        self.link.send(&Message::Logout, now);
        self.link.close(CloseReason::Local);
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.link.poll_transmit()
    }

    /// Gives back a buffer from [`ClientCore::poll_transmit`] once it is written (optional: saves
    /// growing a new one for the next writes).
    pub fn reclaim(&mut self, buf: Vec<u8>) {
        self.link.reclaim(buf);
    }

    /// Gives back the buffer of a [`ClientEvent::Data`] datagram once it is handled (optional: the
    /// next datagrams reuse it instead of allocating).
    pub fn recycle_datagram(&mut self, buf: Vec<u8>) {
        self.datagrams.recycle(buf);
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link.handle_timeout(now) {
            self.events
                .push_back(ClientEvent::Closed(CloseReason::Timeout));
        }
    }
}
