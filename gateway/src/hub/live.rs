//! Live sessions as an administrator sees them, and ending one from the portal.
//!
//! Read-only views and one decision: [`Hub::handle_end_session`] ends a session on both
//! links exactly as an account close would, records who ended it, and returns the commands.

use std::time::{Duration, Instant};

use super::{Command, Hub, Registry, site_object};
use crate::audit::Actor;
use crate::registry::AuditRecord;

/// One relayed session, for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    /// The gateway's id of the session (what the site knows).
    pub id: u32,
    pub account: String,
    pub site: String,
    /// Confirmed agents (the devices the technician reaches).
    pub agents: Vec<String>,
    /// How long the session has been open.
    pub age: Duration,
    /// Bytes client → site.
    pub up: u64,
    /// Bytes site → client.
    pub down: u64,
}

/// Why [`Hub::handle_end_session`] ended nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndSessionError {
    #[error("session {0} is not open")]
    NotOpen(u32),
    /// The administrator's action could not be recorded: nothing was ended.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

impl<H: Clone> Hub<H> {
    /// Every open session, oldest first.
    pub fn live_sessions(&self, now: Instant) -> Vec<LiveSession> {
        let mut out: Vec<LiveSession> = self
            .relay
            .all()
            .map(|(id, s)| {
                let (up, down) = self.relay.counters(*id);
                LiveSession {
                    id: *id,
                    account: s.account.clone(),
                    site: s.site.clone(),
                    agents: s.agents.iter().cloned().collect(),
                    age: now.saturating_duration_since(s.started),
                    up: up.bytes,
                    down: down.bytes,
                }
            })
            .collect();
        out.sort_by(|a, b| b.age.cmp(&a.age).then(a.id.cmp(&b.id)));
        out
    }

    /// The site a session goes to (for the caller's authorisation check).
    pub fn session_site(&self, id: u32) -> Option<&str> {
        self.relay.get(id).map(|s| s.site.as_str())
    }

    /// An administrator ends session `id`: both ends are told at once, the administrator's
    /// action and the session's end are recorded. The action is recorded first; if that
    /// fails, nothing is ended.
    pub fn handle_end_session(
        &mut self,
        registry: &mut dyn Registry,
        id: u32,
        actor: &Actor,
        now: Instant,
    ) -> Result<Vec<Command>, EndSessionError> {
        self.now = self.now.max(now);
        let Some(s) = self.relay.get(id) else {
            return Err(EndSessionError::NotOpen(id));
        };
        registry.record(&[AuditRecord::new(
            actor.clone(),
            site_object(&s.site),
            "session ended by admin",
            format!("session of {} to {} ended by {actor}", s.account, s.site),
        )])?;
        let mut out = Vec::new();
        self.end_session(
            registry,
            id,
            "an administrator ended the session",
            None,
            &mut out,
        );
        Ok(out)
    }
}
