//! The session table: which client link and session id pair with which site link and
//! gateway session id, which agents each session carries, and the bytes it moved.
//!
//! A session is one WireGuard tunnel between one client and one site; it may carry several of
//! the site's agents. The client names its sessions with its own ids; the gateway gives each a
//! global id, which is what the site sees. Pure bookkeeping: the server moves the bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// A relayed session.
#[derive(Debug, Clone)]
pub struct Session {
    pub account: String,
    pub client_link: u64,
    pub client_sid: u32,
    pub site: String,
    pub site_link: u64,
    /// Agents the site confirmed.
    pub agents: BTreeSet<String>,
    /// Agents asked for, not yet confirmed.
    pub pending: BTreeSet<String>,
    pub started: Instant,
    /// Client → site bytes (WireGuard datagrams).
    pub up: u64,
    /// Site → client bytes.
    pub down: u64,
    /// Datagrams dropped because the receiving link's queue was full.
    pub dropped: u64,
}

/// What the caller must do after an agent left a session.
#[derive(Debug)]
pub enum AgentClosed {
    /// The session goes on with its other agents.
    Remains,
    /// That was its last agent: the session is gone (returned for the audit record).
    SessionEnded(Session),
}

#[derive(Debug, Default)]
pub struct Relay {
    next: u32,
    sessions: BTreeMap<u32, Session>,
    by_client: BTreeMap<(u64, u32), u32>,
}

impl Relay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a request for `agent`: a new session, or the client's existing session to the
    /// same site. Returns the global id.
    /// `client` is (link, the client's session id); `site` is (name, link).
    pub fn request(
        &mut self,
        account: &str,
        client: (u64, u32),
        site: (&str, u64),
        agent: &str,
        now: Instant,
    ) -> Result<u32, String> {
        let ((client_link, client_sid), (site, site_link)) = (client, site);
        if let Some(&gsid) = self.by_client.get(&(client_link, client_sid)) {
            let s = self.sessions.get_mut(&gsid).ok_or("session vanished")?;
            if s.site != site {
                return Err(format!("session {client_sid} belongs to site {}", s.site));
            }
            if s.agents.contains(agent) || s.pending.contains(agent) {
                return Err(format!("{site}/{agent} is already connected"));
            }
            s.pending.insert(agent.to_owned());
            return Ok(gsid);
        }
        if self.by_client.keys().any(|(l, _)| *l == client_link)
            && self
                .sessions
                .values()
                .any(|s| s.client_link == client_link && s.site == site)
        {
            return Err(format!("a session to site {site} is already open; use it"));
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
                up: 0,
                down: 0,
                dropped: 0,
            },
        );
        self.by_client.insert((client_link, client_sid), gsid);
        Ok(gsid)
    }

    /// The site confirmed `agent` for `gsid` (from `site_link` only).
    pub fn confirm(&mut self, site_link: u64, gsid: u32, agent: &str) -> Option<&Session> {
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
    pub fn of_client(&self, client_link: u64, client_sid: u32) -> Option<u32> {
        self.by_client.get(&(client_link, client_sid)).copied()
    }

    /// Where a client's datagram goes: (site link, global id); counts its bytes.
    pub fn route_up(
        &mut self,
        client_link: u64,
        client_sid: u32,
        len: usize,
    ) -> Option<(u64, u32)> {
        let gsid = self.of_client(client_link, client_sid)?;
        let s = self.sessions.get_mut(&gsid)?;
        s.up += len as u64;
        Some((s.site_link, gsid))
    }

    /// Where a site's datagram goes: (client link, client's id); counts its bytes.
    pub fn route_down(&mut self, site_link: u64, gsid: u32, len: usize) -> Option<(u64, u32)> {
        let s = self
            .sessions
            .get_mut(&gsid)
            .filter(|s| s.site_link == site_link)?;
        s.down += len as u64;
        Some((s.client_link, s.client_sid))
    }

    pub fn count_drop(&mut self, gsid: u32) {
        if let Some(s) = self.sessions.get_mut(&gsid) {
            s.dropped += 1;
        }
    }

    /// Removes `agent` from a session (confirmed or pending).
    pub fn close_agent(&mut self, gsid: u32, agent: &str) -> Option<AgentClosed> {
        let s = self.sessions.get_mut(&gsid)?;
        let had = s.agents.remove(agent) | s.pending.remove(agent);
        if !had {
            return None;
        }
        if s.agents.is_empty() && s.pending.is_empty() {
            return self.close(gsid).map(AgentClosed::SessionEnded);
        }
        Some(AgentClosed::Remains)
    }

    /// Removes a whole session.
    pub fn close(&mut self, gsid: u32) -> Option<Session> {
        let s = self.sessions.remove(&gsid)?;
        self.by_client.remove(&(s.client_link, s.client_sid));
        Some(s)
    }

    /// Sessions with an end on `link`.
    pub fn of_link(&self, link: u64) -> Vec<u32> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.client_link == link || s.site_link == link)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn all(&self) -> impl Iterator<Item = (&u32, &Session)> {
        self.sessions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_confirm_route_and_close() {
        let mut r = Relay::new();
        let now = Instant::now();
        let g = r
            .request("alice", (1, 7), ("plant-a", 2), "plc", now)
            .expect("request");
        assert!(
            r.route_up(1, 7, 100).is_some(),
            "datagrams flow during the handshake"
        );
        assert!(
            r.confirm(3, g, "plc").is_none(),
            "only the session's site confirms"
        );
        assert!(r.confirm(2, g, "plc").is_some());
        // A second agent of the same site joins the same tunnel.
        assert_eq!(
            r.request("alice", (1, 7), ("plant-a", 2), "hmi", now),
            Ok(g)
        );
        assert!(
            r.request("alice", (1, 7), ("plant-b", 4), "x", now)
                .is_err()
        );
        assert!(
            r.request("alice", (1, 7), ("plant-a", 2), "hmi", now)
                .is_err(),
            "twice"
        );
        r.confirm(2, g, "hmi").expect("hmi");
        assert_eq!(r.route_up(1, 7, 10), Some((2, g)));
        assert_eq!(r.route_down(2, g, 20), Some((1, 7)));
        assert_eq!(
            r.route_down(9, g, 20),
            None,
            "from another site link: nowhere"
        );
        assert!(matches!(
            r.close_agent(g, "hmi"),
            Some(AgentClosed::Remains)
        ));
        match r.close_agent(g, "plc") {
            Some(AgentClosed::SessionEnded(s)) => {
                assert_eq!((s.up, s.down), (110, 20));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.route_up(1, 7, 1), None);
    }

    #[test]
    fn sessions_of_a_link() {
        let mut r = Relay::new();
        let now = Instant::now();
        let a = r
            .request("alice", (1, 1), ("plant-a", 10), "plc", now)
            .expect("a");
        let b = r
            .request("bob", (2, 1), ("plant-a", 10), "plc", now)
            .expect("b");
        let c = r
            .request("bob", (2, 2), ("plant-b", 11), "plc", now)
            .expect("c");
        assert_eq!(r.of_link(10), vec![a, b]);
        assert_eq!(r.of_link(2), vec![b, c]);
        assert!(r.close(b).is_some());
        assert_eq!(r.of_link(10), vec![a]);
    }
}
