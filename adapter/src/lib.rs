//! pinhole-adapter: the virtual adapter (TUN device) and the packet filter.
//!
//! What it is for: the default-deny [`filter`] that the client and the site both apply to every
//! packet, and the TUN devices they read and write.
//!
//! Must not depend on: the gateway, the store or any network protocol crate; the filter itself
//! is pure and must stay free of I/O so that it can be property-tested and fuzzed.

pub mod filter;

pub use filter::{DropReason, Filter, Verdict};
