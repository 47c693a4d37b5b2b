//! pinhole-shell: the I/O shell around the protocol cores, shared by every program that dials
//! the gateway (the client daemon, the site agent, the gateway's bench tools) and by the
//! gateway's listener for what both ends of a link share.
//!
//! What it is for: one [`dial`] (gateway addresses in order, a short connect timeout, the
//! address that worked first next time, and a typed [`DialError`] that says in words why the
//! gateway refused); one [`driver`] loop that moves bytes between a TLS stream and a sans-IO
//! core ([`pinhole_proto::ClientCore`], [`pinhole_proto::SiteCore`]) and reads the gateway's
//! last words when a write fails; the [`socket`] options of every link (keepalive, user
//! timeout); and one [`telemetry`] setup for every binary.
//!
//! Depends on: tokio, rustls through tokio-rustls, socket2, `pinhole-proto` (the cores it
//! drives) and `pinhole-certs` (pins and the refusals of its verifiers). It exists as a crate
//! of its own because neither of those two may depend on tokio or sockets.
//!
//! Must not depend on: the gateway, the adapter or the routes — it knows nothing of sessions,
//! TUN devices or the registry; what a program does with the events is the program's own
//! [`driver::Handler`].

pub mod dial;
pub mod driver;
pub mod proxy;
pub mod socket;
pub mod telemetry;

pub use dial::{Attempt, AttemptError, DialError, Dialed, Dialer, Refused, Stream, refusal};
pub use driver::{Core, Handler, Lost, drive};
