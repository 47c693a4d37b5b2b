//! pinhole-proto: the wire protocol between client, gateway and site.
//!
//! What it is for: frames and messages inside the TLS links, and the sans-IO state machines
//! of the three roles (input and `now` in; frames, events and the next wake-up out).
//!
//! Must not depend on: tokio, sockets, files or clocks. Time is always passed in, so the
//! protocol can be tested in simulation.
