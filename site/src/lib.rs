//! pinhole-site: the site agent.
//!
//! What it is for: dials out to the gateway, pins its key on first use, reports the device
//! agents ([`config`]), keeps the link up ([`agent`]), and forwards a session's packets only to
//! the device and ports of its agents ([`forward`]) through its TUN and an nftables table that
//! keeps the uplink and device networks apart ([`firewall`]); [`light`] shows when remote access
//! is active.
//!
//! Must not depend on: the gateway crate; it speaks to the gateway only through the protocol.

pub mod agent;
pub mod config;
pub mod firewall;
pub mod forward;
pub mod light;
pub mod proxy;
