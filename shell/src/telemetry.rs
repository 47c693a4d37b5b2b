//! The one tracing setup of every binary: human-readable lines on stderr (systemd's journal
//! takes them from there), no colours, the level from `RUST_LOG` (default `info`).
//!
//! What the programs log follows one policy: structured fields, a span per link or session;
//! nothing per packet above TRACE; no device or customer addresses above DEBUG unless the
//! event is about that address; never a key, password or token.

/// Installs the subscriber; a second call (a test that set one already) changes nothing.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
