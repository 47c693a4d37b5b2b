//! The session table: which client link and session id pair with which site link and
//! gateway session id, which agents each session carries, and the bytes it moved.
//!
//! A session is one WireGuard tunnel between one client and one site; it may carry several of
//! the site's agents. The client names its sessions with its own ids; the gateway gives each a
//! global id, which is what the site sees. The data path is [`Relay::route`]: one hash lookup
//! keyed by (incoming link, session id as that link knows it), which yields where the datagram
//! goes and counts it, without allocating.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::LinkId;

/// A relayed session.
#[derive(Debug, Clone)]
pub struct Session {
    pub account: String,
    pub client_link: LinkId,
    pub client_sid: u32,
    pub site: String,
    pub site_link: LinkId,
    /// Agents the site confirmed.
    pub agents: BTreeSet<String>,
    /// Agents asked for, not yet confirmed.
    pub pending: BTreeSet<String>,
    pub started: Instant,
}

/// Bytes and drops of one direction of a session, kept in its route entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub dropped: u64,
}

/// Where a datagram goes: the receiving link's handle and the session id it knows.
#[derive(Debug)]
struct RouteEntry<H> {
    to: H,
    session: u32,
    counters: Counters,
}

/// The answer of [`Relay::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<H> {
    /// The receiving link.
    pub to: H,
    /// The session id as the receiving link knows it.
    pub session: u32,
}

/// A session that ended, with what it moved (for the audit record).
#[derive(Debug, Clone)]
pub struct Ended {
    pub session: Session,
    pub gsid: u32,
    /// Client → site.
    pub up: Counters,
    /// Site → client.
    pub down: Counters,
}

/// What the caller must do after an agent left a session.
#[derive(Debug)]
pub enum AgentClosed {
    /// The session goes on with its other agents.
    Remains,
    /// That was its last agent: the session is gone.
    SessionEnded(Box<Ended>),
}

/// Why a request for an agent cannot join a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("session {0} belongs to another site")]
    OtherSite(u32),
    #[error("{0} is already connected")]
    Already(String),
    #[error("a session to site {0} is already open; use it")]
    SiteInUse(String),
}

#[derive(Debug)]
pub struct Relay<H> {
    next: u32,
    sessions: BTreeMap<u32, Session>,
    by_client: HashMap<(LinkId, u32), u32>,
    routes: HashMap<(LinkId, u32), RouteEntry<H>>,
}

impl<H> Default for Relay<H> {
    fn default() -> Self {
        Self {
            next: 0,
            sessions: BTreeMap::new(),
            by_client: HashMap::new(),
            routes: HashMap::new(),
        }
    }
}

impl<H: Clone> Relay<H> {
    /// Records a request for `agent`: a new session, or the client's existing session to the
    /// same site. Returns the global id. `client` is (link, its handle, the client's session
    /// id); `site` is (name, link, its handle).
    pub fn request(
        &mut self,
        account: &str,
        client: (LinkId, &H, u32),
        site: (&str, LinkId, &H),
        agent: &str,
        now: Instant,
    ) -> Result<u32, RequestError> {
        let (client_link, client_handle, client_sid) = client;
        let (site, site_link, site_handle) = site;
        if let Some(&gsid) = self.by_client.get(&(client_link, client_sid))
            && let Some(s) = self.sessions.get_mut(&gsid)
        {
            if s.site != site {
                return Err(RequestError::OtherSite(client_sid));
            }
            if s.agents.contains(agent) || s.pending.contains(agent) {
                return Err(RequestError::Already(format!("{site}/{agent}")));
            }
            s.pending.insert(agent.to_owned());
            return Ok(gsid);
        }
        if self
            .sessions
            .values()
            .any(|s| s.client_link == client_link && s.site == site)
        {
            return Err(RequestError::SiteInUse(site.to_owned()));
        }
        // Ids wrap after 4 billion sessions; skip any still in use.
        loop {
            self.next = self.next.wrapping_add(1).max(1);
            if !self.sessions.contains_key(&self.next) {
                break;
            }
        }
        let gsid = self.next;
        self.sessions.insert(
            gsid,
            Session {
                account: account.to_owned(),
                client_link,
                client_sid,
                site: site.to_owned(),
                site_link,
                agents: BTreeSet::new(),
                pending: [agent.to_owned()].into_iter().collect(),
                started: now,
            },
        );
        self.by_client.insert((client_link, client_sid), gsid);
        self.routes.insert(
            (client_link, client_sid),
            RouteEntry {
                to: site_handle.clone(),
                session: gsid,
                counters: Counters::default(),
            },
        );
        self.routes.insert(
            (site_link, gsid),
            RouteEntry {
                to: client_handle.clone(),
                session: client_sid,
                counters: Counters::default(),
            },
        );
        Ok(gsid)
    }
}

impl<H> Relay<H> {
    /// The site confirmed `agent` for `gsid` (from `site_link` only); `None` if that agent was
    /// not pending there.
    pub fn confirm(&mut self, site_link: LinkId, gsid: u32, agent: &str) -> Option<&Session> {
        let s = self
            .sessions
            .get_mut(&gsid)
            .filter(|s| s.site_link == site_link)?;
        if !s.pending.remove(agent) {
            return None;
        }
        s.agents.insert(agent.to_owned());
        Some(s)
    }

    pub fn get(&self, gsid: u32) -> Option<&Session> {
        self.sessions.get(&gsid)
    }

    /// The client's session id → the global one, if the link owns it.
    pub fn of_client(&self, client_link: LinkId, client_sid: u32) -> Option<u32> {
        self.by_client.get(&(client_link, client_sid)).copied()
    }

    /// The data path: where a datagram of `len` bytes that arrived on `link` for `session`
    /// goes. Counts it. One lookup, no allocation.
    pub fn route(&mut self, link: LinkId, session: u32, len: usize) -> Option<Route<&H>> {
        let e = self.routes.get_mut(&(link, session))?;
        e.counters.bytes += len as u64;
        Some(Route {
            to: &e.to,
            session: e.session,
        })
    }

    /// A datagram routed from `link`/`session` was dropped (the receiver's queue was full).
    pub fn count_drop(&mut self, link: LinkId, session: u32) {
        if let Some(e) = self.routes.get_mut(&(link, session)) {
            e.counters.dropped += 1;
        }
    }

    /// Removes `agent` from a session (confirmed or pending); `None` if the session does not
    /// carry it (nothing to do, nothing to tell anyone).
    pub fn close_agent(&mut self, gsid: u32, agent: &str) -> Option<AgentClosed> {
        let s = self.sessions.get_mut(&gsid)?;
        let had = s.agents.remove(agent) | s.pending.remove(agent);
        if !had {
            return None;
        }
        if s.agents.is_empty() && s.pending.is_empty() {
            return self
                .close(gsid)
                .map(|e| AgentClosed::SessionEnded(Box::new(e)));
        }
        Some(AgentClosed::Remains)
    }

    /// Removes a whole session.
    pub fn close(&mut self, gsid: u32) -> Option<Ended> {
        let s = self.sessions.remove(&gsid)?;
        self.by_client.remove(&(s.client_link, s.client_sid));
        let up = self
            .routes
            .remove(&(s.client_link, s.client_sid))
            .map(|e| e.counters)
            .unwrap_or_default();
        let down = self
            .routes
            .remove(&(s.site_link, gsid))
            .map(|e| e.counters)
            .unwrap_or_default();
        Some(Ended {
            session: s,
            gsid,
            up,
            down,
        })
    }

    /// Sessions with an end on `link`.
    pub fn of_link(&self, link: LinkId) -> Vec<u32> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.client_link == link || s.site_link == link)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Client → site and site → client counters of a session (zero if unknown).
    pub fn counters(&self, gsid: u32) -> (Counters, Counters) {
        let Some(s) = self.sessions.get(&gsid) else {
            return Default::default();
        };
        let of = |key| {
            self.routes
                .get(&key)
                .map(|e| e.counters)
                .unwrap_or_default()
        };
        (of((s.client_link, s.client_sid)), of((s.site_link, gsid)))
    }

    pub fn all(&self) -> impl Iterator<Item = (&u32, &Session)> {
        self.sessions.iter()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_confirm_route_and_close() {
        let mut r: Relay<u64> = Relay::default();
        let now = Instant::now();
        let g = r
            .request("alice", (1, &1, 7), ("plant-a", 2, &2), "plc", now)
            .expect("request");
        assert!(
            r.confirm(3, g, "plc").is_none(),
            "only the session's site confirms"
        );
        assert!(r.confirm(2, g, "plc").is_some());
        // A second agent of the same site joins the same tunnel.
        assert_eq!(
            r.request("alice", (1, &1, 7), ("plant-a", 2, &2), "hmi", now),
            Ok(g)
        );
        assert!(
            r.request("alice", (1, &1, 7), ("plant-b", 4, &4), "x", now)
                .is_err()
        );
        assert!(
            r.request("alice", (1, &1, 7), ("plant-a", 2, &2), "hmi", now)
                .is_err(),
            "twice"
        );
        r.confirm(2, g, "hmi").expect("hmi");
        assert_eq!(r.route(1, 7, 110), Some(Route { to: &2, session: g }));
        assert_eq!(r.route(2, g, 20), Some(Route { to: &1, session: 7 }));
        assert_eq!(r.route(9, g, 20), None, "from another site link: nowhere");
        r.count_drop(2, g);
        assert!(matches!(
            r.close_agent(g, "hmi"),
            Some(AgentClosed::Remains)
        ));
        assert!(r.close_agent(g, "nothing").is_none(), "closes nothing");
        match r.close_agent(g, "plc") {
            Some(AgentClosed::SessionEnded(e)) => {
                assert_eq!((e.up.bytes, e.down.bytes, e.down.dropped), (110, 20, 1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.route(1, 7, 1), None);
        assert!(r.is_empty());
    }

    #[test]
    fn sessions_of_a_link() {
        let mut r: Relay<u64> = Relay::default();
        let now = Instant::now();
        let a = r
            .request("alice", (1, &1, 1), ("plant-a", 10, &10), "plc", now)
            .expect("a");
        let b = r
            .request("bob", (2, &2, 1), ("plant-a", 10, &10), "plc", now)
            .expect("b");
        let c = r
            .request("bob", (2, &2, 2), ("plant-b", 11, &11), "plc", now)
            .expect("c");
        assert_eq!(r.of_link(10), vec![a, b]);
        assert_eq!(r.of_link(2), vec![b, c]);
        assert!(r.close(b).is_some());
        assert_eq!(r.of_link(10), vec![a]);
        assert_eq!(
            r.request("bob", (2, &2, 9), ("plant-b", 11, &11), "hmi", now),
            Err(RequestError::SiteInUse("plant-b".into()))
        );
    }
}
