//! pinhole-adapter: the virtual adapter (TUN device) and the packet filter.
//!
//! What it is for: the client's and the site's TUN devices, and the default-deny filter that
//! both apply to every packet.
//!
//! Must not depend on: the gateway, the store or any network protocol crate; the filter itself
//! is pure and must stay free of I/O so that it can be property-tested and fuzzed.
