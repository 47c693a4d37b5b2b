//! pinhole-site: the site agent.
//!
//! What it is for: dials out to the gateway, pins its key on first use, reports the device
//! agents and forwards a session's packets only to the device and ports of its agent.
//!
//! Must not depend on: the gateway crate; it speaks to the gateway only through the protocol.
