//! Accepting connections and the TLS handshake, under limits for peers that have not yet
//! proved who they are.
//!
//! Anyone on the internet can open a TCP connection to the gateway. Until a link is welcomed
//! it counts against [`MAX_UNWELCOMED`] in all and [`MAX_UNWELCOMED_PER_SOURCE`] per source
//! address; beyond those, new connections are closed at once, without TLS. The handshake must
//! finish within [`HANDSHAKE_TIMEOUT`]. Accept errors (out of descriptors) pause the loop for a
//! few milliseconds only.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// A TLS handshake must finish this soon; a peer that stalls it holds no resources for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Links not yet welcomed, in all. A welcomed link costs a few kilobytes; an unwelcomed one is
/// an anonymous peer's doing, and a flood of them must not take the descriptors and memory
/// the real sites and technicians need. Also capped at a quarter of the descriptor limit.
pub const MAX_UNWELCOMED: usize = 4096;

/// Links not yet welcomed from one source address: a plant or office behind one NAT address
/// reconnects a handful of sites at once, never hundreds within a handshake's time.
pub const MAX_UNWELCOMED_PER_SOURCE: usize = 64;

/// After an accept error (EMFILE, ENFILE, ENOBUFS) the loop pauses this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(20);

/// A listening socket with a deep accept queue: after a gateway restart every site of a large
/// deployment dials at once, and the default backlog of 1 024 makes the rest retry their SYNs
/// for seconds. The kernel caps the value at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

pub fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft descriptor limit to the hard one: every link is a descriptor, and the
/// common default of 1 024 is reached by a modest deployment. Returns the limit in force.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum
        && lim.current != Some(max)
    {
        lim.current = Some(max);
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            warn!(error = %e, "could not raise the descriptor limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The count of unwelcomed links, in all and per source.
///
/// When the total is reached, a new connection evicts the oldest unwelcomed one instead of
/// being refused: an attacker with many addresses who holds every place open then only churns
/// his own connections, while a real peer's handshake (milliseconds) finishes long before 4 096
/// newer connections push it out.
#[derive(Debug)]
pub struct Unwelcomed {
    limit: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Admission order: sequence number → the ticket's eviction signal.
    order: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

/// One unwelcomed link's place; released on drop (or when the link is welcomed).
#[derive(Debug)]
pub struct Ticket {
    owner: Arc<Unwelcomed>,
    source: IpAddr,
    seq: u64,
    evicted: Arc<Notify>,
}

impl Ticket {
    /// Resolves when a newer connection took this place: the link must end.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Unwelcomed {
    /// `nofile`: the descriptor limit in force.
    pub fn new(nofile: u64) -> Arc<Self> {
        let quarter = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
        Arc::new(Self {
            limit: MAX_UNWELCOMED.min(quarter).max(16),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A place for a new connection from `source`, or `None` if its source has too many.
    /// At the total limit the oldest unwelcomed connection is told to end; until it has, the
    /// total may exceed the limit by an eighth, beyond which new connections are refused.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Ticket> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let per = c.per_source.get(&source).copied().unwrap_or(0);
        if per >= MAX_UNWELCOMED_PER_SOURCE || c.total >= self.limit + self.limit / 8 {
            return None;
        }
        if c.total >= self.limit
            && let Some((_, oldest)) = c.order.pop_first()
        {
            oldest.notify_one();
        }
        c.total += 1;
        c.per_source.insert(source, per + 1);
        let seq = c.next;
        c.next += 1;
        let evicted = Arc::new(Notify::new());
        c.order.insert(seq, evicted.clone());
        Some(Ticket {
            owner: self.clone(),
            source,
            seq,
            evicted,
        })
    }

    /// Unwelcomed links now.
    pub fn count(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        c.order.remove(&self.seq);
        if let Some(n) = c.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.source);
            }
        }
    }
}

/// Accepts forever; each admitted connection goes to `spawn` with its ticket.
pub async fn accept_loop(
    listener: TcpListener,
    unwelcomed: Arc<Unwelcomed>,
    mut on_refused: impl FnMut(IpAddr),
    mut spawn: impl FnMut(TcpStream, SocketAddr, Ticket),
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => match unwelcomed.admit(peer.ip()) {
                Some(ticket) => spawn(tcp, peer, ticket),
                None => {
                    debug!("too many unwelcomed connections: closing one at once");
                    on_refused(peer.ip());
                    drop(tcp);
                }
            },
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_in_all_and_per_source_release_on_drop() {
        let u = Unwelcomed::new(1 << 20);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let tickets: Vec<Ticket> = (0..MAX_UNWELCOMED_PER_SOURCE)
            .map(|_| u.admit(a).expect("within the limit"))
            .collect();
        assert!(u.admit(a).is_none(), "per source");
        assert!(u.admit(b).is_some(), "another source still gets in");
        drop(tickets);
        assert_eq!(u.count(), 0);
        assert!(u.admit(a).is_some());
        let small = Unwelcomed::new(64);
        let held: Vec<Ticket> = (0..16u32)
            .map(|i| small.admit(IpAddr::from(i.to_be_bytes())).expect("in"))
            .collect();
        // In all: a quarter of the descriptors, at least 16. One more evicts the oldest.
        let newest = small.admit(b).expect("the newest gets in");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("rt");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), held[0].evicted())
                .await
                .expect("the oldest is told to go");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), held[1].evicted())
                    .await
                    .is_err(),
                "only the oldest"
            );
        });
        // Until evicted ones go, an eighth more; then refusal.
        let extra = small.admit("192.0.2.100".parse().expect("ip"));
        assert!(extra.is_some());
        assert!(small.admit("192.0.2.99".parse().expect("ip")).is_none());
        drop((held, newest, extra));
        assert_eq!(small.count(), 0);
    }

    #[test]
    fn the_descriptor_limit_is_raised_to_the_hard_one() {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        let now = raise_nofile_limit();
        if let Some(h) = hard {
            assert_eq!(now, h);
        }
    }
}
