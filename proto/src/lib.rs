//! pinhole-proto: the wire protocol between client, gateway and site.
//!
//! What it is for: frames ([`frame`]) and control messages ([`message`]) inside the TLS links,
//! device agents and their port presets ([`agent`]), and the sans-IO state machines of the
//! three roles ([`ClientCore`], [`SiteCore`], [`GatewayCore`]): input and `now` in; bytes to
//! send, events and the next wake-up out; the rules for every field a peer controls
//! ([`validate`]). The calling contract is documented in [`link`].
//!
//! Must not depend on: tokio, sockets, files or clocks. Time is always passed in, so the
//! protocol can be tested in simulation (`gateway/tests/simulation.rs` wires these cores to the
//! real gateway hub over an in-memory network with a virtual clock).

pub mod agent;
pub mod backoff;
pub mod client;
pub mod duration;
pub mod frame;
pub mod gateway;
pub mod link;
pub mod message;
pub mod site;
pub mod validate;

pub use agent::{Agent, AgentType, Port, Transport};
pub use backoff::Backoff;
pub use client::{ClientCore, ClientEvent};
pub use frame::{Frame, FrameDecoder, FrameError, MAX_PAYLOAD, PROTOCOL_VERSION};
pub use gateway::{GatewayCore, GatewayEvent, PeerAuth};
pub use link::CloseReason;
pub use message::{ErrorCode, FirewallChange, Message, Role, SiteView, apply_inventory_changes};
pub use site::{SiteCore, SiteEvent, SiteHello};
pub use validate::Invalid;
