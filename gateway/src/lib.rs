//! pinhole-gateway: the relay server, registry, audit log and portal.
//!
//! What it is for: the only listening component of Pinhole. It authenticates every peer by
//! certificate, keeps the registry (domains, sites, agents, accounts, grants) in SQLite
//! ([`store`]), opens sessions, relays their packets and records every event in a hash-chained
//! audit log ([`audit`]) with signed [`checkpoint`]s and a copy in the system log ([`syslog`]).
//!
//! How it is built: every decision is made by the pure [`hub::Hub`], which reaches the
//! registry only through the [`registry::Registry`] trait and returns commands. Around it,
//! thin I/O by concern: [`listen`] (accept, limits for unauthenticated peers), `link` (one
//! driver per peer link: read, decode, hand to the hub, write; [`outbox`] is its bounded
//! queue), and [`serve`] (wiring, and the watcher that applies administrative changes).
//! [`signer`] keeps the CA key in a process of its own, off the network. [`state`] lays out
//! the state directory, [`disk`] watches its free space, [`status`] reports on it.
//!
//! Must not depend on: the client crates (adapter, routes) — the gateway never touches a TUN
//! device or a route.

pub mod audit;
pub mod checkpoint;
pub mod disk;
pub mod hub;
pub(crate) mod link;
pub mod listen;
pub mod memory;
pub mod operator;
pub mod outbox;
pub mod portal;
pub mod registry;
mod scratch;
pub mod serve;
pub mod signer;
pub mod state;
pub mod status;
pub mod store;
mod store_registry;
pub mod syslog;
