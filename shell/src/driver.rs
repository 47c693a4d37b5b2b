//! The one loop that drives a link to the gateway: bytes from the TLS stream into a sans-IO
//! core, the core's bytes back out, its timers, and the program's own inputs.
//!
//! [`drive`] owns the order of things, so that every program gets it right once: drain the
//! core's events (each to [`Handler::on_event`]), write and flush what the core wants sent,
//! then wait for the first of: bytes from the gateway, the core's next timeout, or the
//! handler's own input ([`Handler::wait`]: a TUN device, commands, signals, ticks).
//!
//! When a write fails, the gateway may have said why before it closed (an account closed, a
//! site replaced): the driver reads what is left for a moment ([`LAST_WORDS`]) and hands those
//! events to the handler before it reports the loss. A link that ends by the handler's choice
//! gets what the core still has to send (a logout) and a TLS close, within [`FINISH`].

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use pinhole_proto::{ClientCore, ClientEvent, SiteCore, SiteEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::dial::{Refused, refusal};

/// A TLS record's worth: a read returns at most one record's plaintext at a time anyway.
pub const READ_BUFFER: usize = 16 * 1024;

/// After a failed write, the gateway's last message is read for this long. It was sent before
/// the gateway closed, so it is already here or nearly; a dead path gives nothing anyway.
pub const LAST_WORDS: Duration = Duration::from_millis(300);

/// A link that ends by the program's choice flushes and closes within this long.
pub const FINISH: Duration = Duration::from_secs(1);

/// A core without a timer is still woken this often (it never is: heartbeats always run).
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// The sans-IO contract of the protocol cores (see [`pinhole_proto::link`]).
pub trait Core {
    type Event;
    fn handle_input(&mut self, bytes: &[u8], now: Instant);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    /// Takes back a written buffer from [`Core::poll_transmit`], for reuse.
    fn reclaim(&mut self, buf: Vec<u8>);
    fn poll_event(&mut self) -> Option<Self::Event>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn is_closed(&self) -> bool;
}

macro_rules! core {
    ($core:ty, $event:ty) => {
        impl Core for $core {
            type Event = $event;
            fn handle_input(&mut self, bytes: &[u8], now: Instant) {
                <$core>::handle_input(self, bytes, now)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$core>::handle_timeout(self, now)
            }
            fn poll_transmit(&mut self) -> Option<Vec<u8>> {
                <$core>::poll_transmit(self)
            }
            fn reclaim(&mut self, buf: Vec<u8>) {
                <$core>::reclaim(self, buf)
            }
            fn poll_event(&mut self) -> Option<$event> {
                <$core>::poll_event(self)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$core>::poll_timeout(self)
            }
            fn is_closed(&self) -> bool {
                <$core>::is_closed(self)
            }
        }
    };
}

core!(ClientCore, ClientEvent);
core!(SiteCore, SiteEvent);

/// How the connection under a link was lost (the handler's [`Handler::on_lost`] turns it into
/// the program's own outcome).
#[derive(Debug)]
pub enum Lost {
    /// The gateway closed the connection.
    Closed,
    /// A read or write failed; `refused` when the gateway refused this peer with an alert.
    Failed {
        error: io::Error,
        refused: Option<Refused>,
    },
    /// The core ended the link and no event said more.
    Ended,
}

impl From<io::Error> for Lost {
    fn from(error: io::Error) -> Self {
        let refused = refusal(&error);
        Self::Failed { error, refused }
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Closed => f.write_str("the gateway closed the connection"),
            Lost::Failed {
                refused: Some(r), ..
            } => write!(f, "{r}"),
            Lost::Failed { error, .. } => write!(f, "{error}"),
            Lost::Ended => f.write_str("the link ended"),
        }
    }
}

/// What a program does with its link: the events of its core, its own inputs, and the end.
///
/// Every method may change the core (send messages); [`drive`] writes what they queued.
/// [`Handler::wait`] must be cancel-safe: it is raced against the link's reads and timers.
pub trait Handler {
    type Core: Core;
    /// What the handler's own inputs produced.
    type Wake;
    /// How the link ended, in the program's terms.
    type End;

    /// One event of the core; `Some` ends the link.
    fn on_event(
        &mut self,
        core: &mut Self::Core,
        event: <Self::Core as Core>::Event,
    ) -> impl Future<Output = Option<Self::End>>;

    /// Waits for the handler's own input.
    fn wait(&mut self) -> impl Future<Output = Self::Wake>;

    /// Handles what [`Handler::wait`] returned; `Some` ends the link.
    fn on_wake(
        &mut self,
        core: &mut Self::Core,
        wake: Self::Wake,
    ) -> impl Future<Output = Option<Self::End>>;

    /// The connection was lost, after every event was handled.
    fn on_lost(&mut self, lost: Lost) -> Self::End;
}

/// Drives `core` over `stream` until the handler ends the link or the connection is lost.
pub async fn drive<S, H>(stream: &mut S, core: &mut H::Core, handler: &mut H) -> H::End
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        while let Some(event) = core.poll_event() {
            if let Some(end) = handler.on_event(core, event).await {
                finish(stream, core).await;
                return end;
            }
        }
        if let Err(e) = write(stream, core).await {
            last_words(stream, core, &mut buf).await;
            while let Some(event) = core.poll_event() {
                if let Some(end) = handler.on_event(core, event).await {
                    return end;
                }
            }
            return handler.on_lost(Lost::from(e));
        }
        if core.is_closed() {
            finish(stream, core).await;
            return handler.on_lost(Lost::Ended);
        }
        let timeout = core
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => return handler.on_lost(Lost::Closed),
                Ok(n) => core.handle_input(&buf[..n], Instant::now()),
                Err(e) => {
                    // What arrived before the error may say why (an error message, then a
                    // reset): the core has it already; its events go first.
                    while let Some(event) = core.poll_event() {
                        if let Some(end) = handler.on_event(core, event).await {
                            return end;
                        }
                    }
                    return handler.on_lost(Lost::from(e));
                }
            },
            _ = tokio::time::sleep_until(timeout.into()) => core.handle_timeout(Instant::now()),
            wake = handler.wait() => {
                if let Some(end) = handler.on_wake(core, wake).await {
                    finish(stream, core).await;
                    return end;
                }
            }
        }
    }
}

/// Writes everything the core queued, then flushes (the TLS layer may hold a record back).
async fn write<S, C>(stream: &mut S, core: &mut C) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
    C: Core,
{
    let mut wrote = false;
    while let Some(bytes) = core.poll_transmit() {
        stream.write_all(&bytes).await?;
        core.reclaim(bytes);
        wrote = true;
    }
    if wrote {
        stream.flush().await?;
    }
    Ok(())
}

/// Reads what the gateway sent before it closed, for [`LAST_WORDS`].
async fn last_words<S, C>(stream: &mut S, core: &mut C, buf: &mut [u8])
where
    S: AsyncRead + Unpin,
    C: Core,
{
    let _ = tokio::time::timeout(LAST_WORDS, async {
        while let Ok(n) = stream.read(buf).await {
            if n == 0 {
                break;
            }
            core.handle_input(&buf[..n], Instant::now());
        }
    })
    .await;
}

/// Sends what the core still queued (a logout, a refusal) and closes the TLS stream.
async fn finish<S, C>(stream: &mut S, core: &mut C)
where
    S: AsyncWrite + Unpin,
    C: Core,
{
    let _ = tokio::time::timeout(FINISH, async {
        let _ = write(stream, core).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinhole_proto::message::ErrorCode;
    use pinhole_proto::{CloseReason, GatewayCore, PeerAuth};
    use std::time::Duration;

    /// A technician's handler that records what it saw and never ends the link itself.
    #[derive(Default)]
    struct Recorder {
        closed: Option<CloseReason>,
    }

    impl Handler for Recorder {
        type Core = ClientCore;
        type Wake = ();
        type End = String;

        async fn on_event(&mut self, _: &mut ClientCore, event: ClientEvent) -> Option<String> {
            if let ClientEvent::Closed(r) = event {
                self.closed = Some(r.clone());
                return Some(format!("closed: {r:?}"));
            }
            None
        }

        async fn wait(&mut self) {
            std::future::pending::<()>().await
        }

        async fn on_wake(&mut self, _: &mut ClientCore, (): ()) -> Option<String> {
            None
        }

        fn on_lost(&mut self, lost: Lost) -> String {
            format!("lost: {lost}")
        }
    }

    /// A stream whose writes fail (the gateway closed) but whose reads still deliver what the
    /// gateway sent before it closed.
    struct ClosedForWrites(tokio::io::DuplexStream);

    impl AsyncRead for ClosedForWrites {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for ClosedForWrites {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn after_a_failed_write_the_gateways_last_message_is_the_reason() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let now = Instant::now();
        let mut gw = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
        gw.refuse(ErrorCode::AccountClosed, "your account was closed", now);
        while let Some(b) = gw.poll_transmit() {
            theirs.write_all(&b).await.expect("write");
        }
        let mut stream = ClosedForWrites(ours);
        // The client's hello is its first write, and it fails.
        let mut core = ClientCore::new(now, "test", Duration::from_secs(600));
        let mut handler = Recorder::default();
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            drive(&mut stream, &mut core, &mut handler),
        )
        .await
        .expect("the link ends");
        assert!(
            matches!(
                handler.closed,
                Some(CloseReason::Error {
                    code: ErrorCode::AccountClosed,
                    ..
                })
            ),
            "{end}"
        );
    }
}
