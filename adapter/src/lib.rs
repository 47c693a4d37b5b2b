//! pinhole-adapter: the virtual adapter — the tunnel engine that the client and the site both
//! run, and the TUN device.
//!
//! What it is for: the [`engine`] holds every per-packet decision of both sides (WireGuard
//! peers per tunnel, cryptokey routing, the default-deny filter, flows, reassembly, local
//! answers), built from [`packet`] (one parse per packet, the packets the engine writes),
//! [`defrag`] (bounded IPv4 reassembly), [`gso`] (TUN offload metadata and its checks), [`filter`] (drop reasons, device rules, flows) and
//! [`wg`] (WireGuard peers). [`tun`] is the crate's only I/O.
//!
//! Must not depend on: the gateway, the store or the TLS stack. Everything but [`tun`] is pure
//! and free of I/O so that it can be property-tested and fuzzed.

pub mod defrag;
pub mod engine;
pub mod filter;
pub mod gso;
pub mod packet;
pub mod tun;
pub mod wg;

pub use engine::{
    Dest, Engine, EngineError, OffloadCounters, Side, Transmit, TunnelId, TunnelOffload,
};
pub use filter::DropReason;
pub use gso::{Offload, TunOffload};
