//! One peer link, from TLS handshake to close: read, decode, hand to the hub, write.
//!
//! The driver owns the link's [`GatewayCore`] (framing, message order, heartbeats) and its
//! [`Outbox`]. Control events go to the hub; data frames are routed with one hub lookup and
//! copied straight into the receiving link's outbox, borrowed from this link's receive buffer.
//! A write that makes no progress for [`MISSED_HEARTBEATS`] heartbeat intervals ends the link,
//! and so does a write still stuck a moment after the hub decided to close it: a peer that
//! stops reading cannot pin its link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinhole_certs::PeerIdentity;
use pinhole_proto::link::MISSED_HEARTBEATS;
use pinhole_proto::{CloseReason, ErrorCode, GatewayCore, GatewayEvent};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, warn};

use crate::hub::{Command, LinkId, Presented};
use crate::listen::{HANDSHAKE_TIMEOUT, Ticket};
use crate::outbox::Outbox;
use crate::serve::Shared;

/// How long a closing link keeps reading so that its last message is not lost to a reset.
const LINGER: Duration = Duration::from_millis(500);

/// How long a write may still take once the hub decided to end the link.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

/// What the certificate says, with its expiry on the monotonic clock.
fn presented(
    certs: Option<&[CertificateDer<'_>]>,
    now: Instant,
) -> Result<Option<Presented>, String> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Ok(None);
    };
    let id = PeerIdentity::from_certificate(leaf).map_err(|e| e.to_string())?;
    let left = id.not_after - time::OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    Ok(Some(Presented {
        role: id.role,
        name: id.name,
        serial: id.serial,
        expires: now + left,
    }))
}

/// Handshake, authentication, then the link until it ends.
pub(crate) async fn run(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
    // The peer's side sets the same: keepalive keeps a NAT's state of an idle link alive and
    // finds a dead path; the user timeout ends a link whose data goes unacknowledged.
    if let Err(e) = pinhole_shell::socket::tune(&tcp) {
        debug!(%peer, error = %e, "cannot set the link's socket options");
    }
    // Boxed: the handshake's state (a whole TLS connection) is freed when it ends, instead of
    // sizing the link's task for the link's whole life (see `drive`).
    let handshake = Box::pin(tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        shared.acceptor.accept(tcp),
    ));
    let handshake = async {
        tokio::select! {
            r = handshake => r,
            _ = ticket.evicted() => Ok(Err(std::io::Error::other(
                "evicted by newer connections while at the limit",
            ))),
        }
    };
    let stream = match handshake.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake refused");
            let reason = format!("TLS handshake refused: {e}");
            shared
                .decide(|hub, _| hub.handle_handshake_refused(peer.ip(), &reason, Instant::now()));
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            shared.decide(|hub, _| {
                hub.handle_handshake_refused(peer.ip(), "TLS handshake timed out", Instant::now())
            });
            return;
        }
    };
    let now = Instant::now();
    let presented = match presented(stream.get_ref().1.peer_certificates(), now) {
        Ok(p) => p,
        Err(e) => {
            shared.decide(|hub, _| hub.handle_handshake_refused(peer.ip(), &e, now));
            return;
        }
    };
    let link = shared.new_link_id();
    let outbox = Arc::new(Outbox::default());
    shared.add_outbox(link, outbox.clone());
    let auth = shared
        .decide(|hub, reg| hub.handle_connect(reg, link, outbox.clone(), peer, presented, now));
    let Some(auth) = auth else {
        debug!(%peer, "certificate is not current for its site or account; closing");
        shared.remove_outbox(link);
        return;
    };
    let span = tracing::info_span!("link", link, auth = ?auth);
    debug!(parent: &span, %peer, "connected");
    let core = GatewayCore::new(now, auth);
    // Split here, not in `drive`: an async fn keeps its arguments for its whole life, and the
    // stream by value (the TLS connection, a kilobyte) would sit in every idle link's task
    // next to the halves that own it.
    let (rd, wr) = tokio::io::split(stream);
    drive(shared, link, outbox, rd, wr, core, ticket)
        .instrument(span)
        .await;
}

/// Writes `bytes` and flushes them, giving up when the peer stops reading for `stall`, or
/// shortly after the link was told to close.
///
/// The flush matters: a TLS stream's `write` returns once rustls has taken the bytes, and when
/// the socket is full it keeps the last records in its own buffer until the next write or flush.
/// Without it, a 1.6 MB welcome (an inventory of 10 000 sites) sometimes lost its tail until the
/// technician's next heartbeat, and the login hung.
async fn write<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    stall: Duration,
    outbox: &Outbox,
) -> bool {
    let write = tokio::time::timeout(stall, async {
        wr.write_all(bytes).await?;
        wr.flush().await
    });
    tokio::pin!(write);
    tokio::select! {
        r = &mut write => matches!(r, Ok(Ok(()))),
        _ = outbox.closing() => {
            matches!(tokio::time::timeout(CLOSING_GRACE, &mut write).await, Ok(Ok(Ok(()))))
        }
    }
}

async fn drive(
    shared: Arc<Shared>,
    link: LinkId,
    outbox: Arc<Outbox>,
    mut rd: ReadHalf<TlsStream<TcpStream>>,
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut core: GatewayCore,
    ticket: Ticket,
) {
    let mut ticket = Some(ticket);
    let mut commands: Vec<Command> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut events: Vec<GatewayEvent> = Vec::new();
    let mut close_reason: Option<CloseReason> = None;
    let mut seen_reported = Instant::now();
    let mut shutdown = shared.shutdown.clone();
    let is_site = matches!(core.auth(), pinhole_proto::PeerAuth::Site(_));
    loop {
        // Events of this link's core go to the hub; what the hub decides lands in outboxes.
        while let Some(ev) = core.poll_event() {
            match ev {
                GatewayEvent::Closed(reason) => close_reason = Some(reason),
                ev => events.push(ev),
            }
        }
        if is_site
            && events
                .iter()
                .any(|e| matches!(e, GatewayEvent::SiteHello { .. }))
        {
            // Recorded in a group commit with the other sites' hellos (`Shared::decide_hello`).
            shared
                .decide_hello(link, std::mem::take(&mut events), Instant::now())
                .await;
        }
        if !events.is_empty() {
            let now = Instant::now();
            let cmds = shared.decide(|hub, reg| {
                let mut out = Vec::new();
                for ev in events.drain(..) {
                    out.extend(hub.handle_event(reg, link, ev, now));
                }
                out
            });
            shared.dispatch(cmds);
        }
        let killed = outbox.take(&mut commands, &mut data);
        let now = Instant::now();
        for c in commands.drain(..) {
            c.apply(&mut core, now);
        }
        if ticket.is_some() && core.is_running() {
            ticket = None;
        }
        let stall = core.heartbeat() * MISSED_HEARTBEATS;
        let mut written = true;
        while written && let Some(bytes) = core.poll_transmit() {
            written = write(&mut wr, &bytes, stall, &outbox).await;
        }
        if written && !data.is_empty() {
            written = write(&mut wr, &data, stall, &outbox).await;
        }
        data.clear();
        if !written {
            info!("the peer stopped reading: link closed");
            close_reason.get_or_insert(CloseReason::Local);
        }
        if killed {
            warn!("the link's queue overflowed: link closed");
            close_reason.get_or_insert(CloseReason::Local);
        }
        if core.is_closed() || close_reason.is_some() {
            break;
        }
        let timeout = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // No read buffer of the link's own: idle links hold none (see `crate::scratch`).
            read = crate::scratch::read_with(&mut rd, |bytes| {
                let now = Instant::now();
                core.handle_input(bytes, now, &mut |session, datagram| {
                    shared.forward(link, session, datagram);
                });
                now
            }) => match read {
                Ok(None) | Err(_) => close_reason = Some(CloseReason::Local),
                Ok(Some(now)) => {
                    if is_site && core.is_running() && now.duration_since(seen_reported) >= core.heartbeat() {
                        seen_reported = now;
                        shared.decide(|hub, _| hub.handle_site_seen(link));
                    }
                }
            },
            _ = tokio::time::sleep_until(timeout.into()) => core.handle_timeout(Instant::now()),
            _ = outbox.changed() => {}
            _ = shutdown.changed() => core.refuse(ErrorCode::Shutdown, "the gateway is restarting", Instant::now()),
            _ = async {
                match &ticket {
                    Some(t) => t.evicted().await,
                    None => std::future::pending().await,
                }
            } => {
                debug!("evicted by newer connections before saying hello");
                close_reason = Some(CloseReason::Protocol(
                    "not welcomed before newer connections took its place".into(),
                ));
            }
        }
    }
    // Flush a goodbye if there is one; the peer may already be gone.
    while let Some(bytes) = core.poll_transmit() {
        let flushed = tokio::time::timeout(CLOSING_GRACE, async {
            wr.write_all(&bytes).await?;
            wr.flush().await
        });
        if !matches!(flushed.await, Ok(Ok(()))) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    let reason = close_reason
        .or_else(|| core.close_reason().cloned())
        .unwrap_or(CloseReason::Local);
    match &reason {
        CloseReason::Protocol(what) => warn!(error = %what, "protocol error: link closed"),
        other => debug!(reason = ?other, "closed"),
    }
    let now = Instant::now();
    let cmds = shared.decide(|hub, reg| hub.handle_closed(reg, link, &reason, now));
    shared.remove_outbox(link);
    shared.dispatch(cmds);
    drop(ticket);
    // Read (and drop) what the peer still sends until it closes too, briefly: closing a socket
    // with unread input makes the kernel answer with a reset, which can destroy our goodbye
    // (an account-closed error) before the peer reads it.
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(Some(())) = crate::scratch::read_with(&mut rd, |_| ()).await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A writer that, like a TLS stream, may keep accepted bytes in its own buffer: a link's
    /// write must reach the peer without waiting for the next one.
    #[tokio::test]
    async fn a_write_reaches_the_peer_without_another_write() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut wr = tokio::io::BufWriter::new(near);
        let outbox = Outbox::default();
        assert!(write(&mut wr, b"welcome", Duration::from_secs(5), &outbox).await);
        let mut got = [0u8; 7];
        let read = tokio::time::timeout(Duration::from_secs(1), far.read_exact(&mut got)).await;
        assert!(matches!(read, Ok(Ok(7))), "the bytes stayed in the writer");
        assert_eq!(&got, b"welcome");
    }
}
