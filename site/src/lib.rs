//! pinhole-site: the site agent.
//!
//! What it is for: dials out to the gateway, pins its key on first use, reports the device
//! agents ([`config`]) and keeps the link up ([`agent`]); forwarding a session's packets to the
//! device and ports of its agent follows.
//!
//! Must not depend on: the gateway crate; it speaks to the gateway only through the protocol.

pub mod agent;
pub mod config;
