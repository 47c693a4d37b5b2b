//! pinhole-adapter: the virtual adapter — TUN device, WireGuard peer and packet filter.
//!
//! What it is for: the default-deny [`filter`] that the client and the site both apply to every
//! packet, the WireGuard tunnels ([`wg`]) that carry packets end to end, and the TUN devices
//! ([`tun`]) they read and write.
//!
//! Must not depend on: the gateway, the store or the TLS stack. The filter is pure and free of
//! I/O so that it can be property-tested and fuzzed.

pub mod filter;
pub mod tun;
pub mod wg;

pub use filter::{DropReason, Filter, Verdict};
