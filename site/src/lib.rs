//! pinhole-site: the site agent.
//!
//! What it is for: dials out to the gateway, pins its key on first use, reports the device
//! agents ([`config`]), keeps the link up ([`agent`]), and forwards a session's packets only to
//! the device and ports of its agents ([`forward`]) through its TUN and an nftables table that
//! is the second layer behind the device side's own routing domain ([`isolation`]), which keeps
//! the uplink and device networks apart by construction; [`light`] shows when remote access is
//! active.
//!
//! Must not depend on: the gateway crate; it speaks to the gateway only through the protocol.

pub mod agent;
pub mod config;
pub mod firewall;
pub mod forward;
pub mod isolation;
pub mod light;
