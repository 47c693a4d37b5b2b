//! pinhole: the technician's client — the `pinholed` daemon and the `pinhole` CLI.
//!
//! What it is for: unlocking the technician's bundle, logging in to the gateway, and (in the
//! daemon) owning the TUN adapter, host routes and packet filter of connected devices.
//!
//! Must not depend on: the gateway or site crates; it talks to them only through the protocol.
