//! pinhole: the technician's client — the `pinholed` daemon and the `pinhole` CLI.
//!
//! What it is for: the daemon ([`daemon`]) keeps the imported bundle, logs in to the gateway and
//! keeps the link up ([`link`]), and routes and filters the connected devices ([`plane`]); the
//! CLI and the tray ([`tray`]) talk to it over a local socket ([`control`]).
//!
//! Must not depend on: the gateway or site crates; it talks to them only through the protocol.

pub mod control;
pub mod daemon;
pub mod link;
pub mod plane;
pub mod tray;

/// The current UTC time in RFC 3339, second precision.
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
