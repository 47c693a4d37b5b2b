//! pinhole-routes: host routes for connected devices.
//!
//! What it is for: one /32 route per connected device through the client's TUN, tagged with a
//! private routing-protocol number, removed on disconnect and exit and swept after a crash.
//!
//! Must not depend on: the protocol or the gateway; it is platform code behind a small
//! interface.
