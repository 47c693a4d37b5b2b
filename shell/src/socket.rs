//! The TCP options of every link, on both ends: the client's and the site's dial and the
//! gateway's accepted connections.
//!
//! A link idles for minutes between heartbeats (10 minutes by default). Carrier NATs and
//! stateful firewalls forget an idle TCP connection after a few minutes (some after one), and
//! then drop whatever the link sends later: without help, neither end learns it until its next
//! heartbeat, and a technician's session request goes nowhere. Keepalive probes from the kernel
//! keep that state alive and find a dead path without waking the application; the user timeout
//! ends a link whose data (or probes) the peer stopped acknowledging within seconds, not the
//! kernel's default of about 15 minutes of retransmissions.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Silence after which the kernel starts sending keepalive probes: well under the idle timeouts
/// of common NATs and firewalls (minutes), so the probe refreshes their state in time.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(25);

/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Unanswered probes before the link is declared dead (when no user timeout is set).
pub const KEEPALIVE_PROBES: u32 = 3;

/// Data the peer has not acknowledged for this long ends the link. Linux also applies it to
/// keepalive: once a probe went unanswered and this long passed since the peer was last heard,
/// the link ends at the next probe interval, so a dead idle path is noticed about
/// [`KEEPALIVE_IDLE`] + [`KEEPALIVE_INTERVAL`] after the last packet. Long enough for several
/// retransmissions on a lossy uplink (TCP backs off from 200 ms), short enough that a session
/// request never waits on a dead link for long.
pub const USER_TIMEOUT: Duration = Duration::from_secs(15);

/// Sets the options of a link: no Nagle delay (control messages and WireGuard datagrams are
/// sent whole), the send buffer of [`pinhole_certs::tls::LINK_SEND_BUFFER`], keepalive and the
/// user timeout.
pub fn tune(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = SockRef::from(tcp);
    socket.set_send_buffer_size(pinhole_certs::tls::LINK_SEND_BUFFER)?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tuned_link_carries_keepalive_and_the_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tune(&tcp).expect("tune");
        let s = SockRef::from(&tcp);
        assert!(s.keepalive().expect("keepalive"));
        assert_eq!(s.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
        assert_eq!(
            s.tcp_keepalive_interval().expect("interval"),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(s.tcp_keepalive_retries().expect("probes"), KEEPALIVE_PROBES);
        assert_eq!(s.tcp_user_timeout().expect("user"), Some(USER_TIMEOUT));
        assert!(tcp.nodelay().expect("nodelay"));
    }
}
