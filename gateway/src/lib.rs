//! pinhole-gateway: the relay server, registry, audit log and portal.
//!
//! What it is for: the only listening component of Pinhole. It authenticates every peer by
//! certificate, keeps the registry (domains, sites, agents, accounts, grants) in SQLite
//! ([`store`]), opens sessions, relays their packets and records every event in a hash-chained
//! audit log ([`audit`]) with signed [`checkpoint`]s and a copy in the system log ([`syslog`]).
//! [`state`] lays out the state directory, [`disk`] watches its free space, [`status`] reports
//! on it; [`server`] is the TLS server around the sans-IO [`pinhole_proto::GatewayCore`].
//!
//! Must not depend on: the client crates (adapter, routes) — the gateway never touches a TUN
//! device or a route.

pub mod audit;
pub mod checkpoint;
pub mod disk;
pub mod operator;
pub mod relay;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
pub mod syslog;
