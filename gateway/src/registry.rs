//! The registry as the hub sees it: accounts, sites, grants, enrollment and the audit log,
//! behind one small trait.
//!
//! [`crate::hub::Hub`] reaches persistent state only through [`Registry`]. The trait speaks in
//! the gateway's own types (no SQLite types, no connections, no transactions): the embedded
//! SQLite [`crate::store::Store`] implements it, and a PostgreSQL-backed registry for a
//! gateway of several nodes will implement it the same way.
//!
//! Every method that changes something also appends its audit record in the same durable
//! transaction, and returns only once both are on disk; an `Err` means neither happened.

use std::net::Ipv4Addr;

use pinhole_proto::{Agent, SiteView};

use crate::audit::Actor;

/// The registry could not answer or could not make a change durable. The hub fails closed on
/// it: the action it was asked to record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry: {0}")]
pub struct RegistryError(pub String);

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    /// The token is unknown, used or expired, or the name is taken: nothing was changed.
    #[error("enrollment refused: {0}")]
    Refused(&'static str),
    /// The certificate could not be issued for the site's key.
    #[error("enrollment refused: {0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// An account, as far as the hub needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub closed: bool,
    pub tunnel_ip: Ipv4Addr,
    /// Serial of the account's current certificate (big-endian bytes).
    pub serial: Vec<u8>,
    /// Granted domain paths; a grant covers the domain and everything below it.
    pub grants: Vec<String>,
    /// Its client must not remember the bundle password (told in the welcome).
    pub forbid_remembered_password: bool,
}

impl Account {
    /// Whether the account may see a site in `domain`.
    pub fn may_see(&self, domain: &str) -> bool {
        !self.closed && self.grants.iter().any(|g| crate::store::within(domain, g))
    }
}

/// A site, as far as the hub needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub name: String,
    pub domain: String,
    /// Serial of the site's current certificate.
    pub serial: Vec<u8>,
    /// The certificate was revoked (`site revoke`): the site may not connect.
    pub revoked: bool,
    /// The agents the site last reported (validated before they were stored).
    pub agents: Vec<Agent>,
}

/// What a site says about itself in `hello`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteReport<'a> {
    pub software: &'a str,
    pub boot_id: &'a str,
    pub agents: &'a [Agent],
    /// The peer's address, as text, for the audit record.
    pub from: &'a str,
}

/// One audit event (the registry stamps the time and chains it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub actor: Actor,
    pub object: String,
    pub event: &'static str,
    pub description: String,
}

impl AuditRecord {
    pub fn new(
        actor: Actor,
        object: impl Into<String>,
        event: &'static str,
        description: impl Into<String>,
    ) -> Self {
        Self {
            actor,
            object: object.into(),
            event,
            description: description.into(),
        }
    }
}

/// A certificate issued at enrollment: DER and serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub certificate: Vec<u8>,
    pub serial: Vec<u8>,
}

/// Site name → serial of its current, unrevoked certificate (big-endian bytes).
pub type SiteSerials = std::collections::HashMap<String, Vec<u8>>;

/// Persistent state of the gateway. See the module documentation.
pub trait Registry {
    fn account(&mut self, name: &str) -> Result<Option<Account>, RegistryError>;

    fn site(&mut self, name: &str) -> Result<Option<Site>, RegistryError>;

    /// Every enrolled site whose certificate is not revoked, with its current certificate's
    /// serial: one read to re-check every connected site after an administrative change (a
    /// query per site would hold the hub for seconds at 100 000 sites).
    fn site_serials(&mut self) -> Result<SiteSerials, RegistryError>;

    /// The sites `account` may see, with their online state as last recorded.
    fn inventory(&mut self, account: &Account) -> Result<Vec<SiteView>, RegistryError>;

    /// Checks and consumes `token`, then stores `site` with the certificate `issue` returns for
    /// the token's domain; audited. A refusal changes and records nothing (the caller
    /// aggregates refusals).
    fn enroll(
        &mut self,
        token: &str,
        site: &str,
        issue: &mut dyn FnMut() -> Result<Issued, String>,
    ) -> Result<Vec<u8>, EnrollError>;

    /// A site said hello: online, its report stored, what changed since its last visit audited.
    fn site_connected(&mut self, site: &str, report: &SiteReport<'_>) -> Result<(), RegistryError>;

    /// A site's agents changed (configuration reload); audited if they differ.
    fn site_agents(&mut self, site: &str, agents: &[Agent]) -> Result<(), RegistryError>;

    /// A site's link ended: offline (switched off if `switched_off`: the site said its switch
    /// reads off before it closed), with `record`.
    fn site_disconnected(
        &mut self,
        site: &str,
        switched_off: bool,
        record: &AuditRecord,
    ) -> Result<(), RegistryError>;

    /// Sites heard from since the last call (last-seen times, not audited; one transaction).
    fn sites_seen(&mut self, sites: &[String]) -> Result<(), RegistryError>;

    /// Appends `records` in one durable transaction.
    fn record(&mut self, records: &[AuditRecord]) -> Result<(), RegistryError>;

    /// Appends `records` in one transaction that is not flushed to disk before this returns:
    /// the store flushes it in the background at once (durable while the site works on the
    /// request), and the next durable commit flushes it with its own at the latest (the log is
    /// written in order). Only for the record
    /// of a step that nobody is told about and whose outcome is recorded durably before
    /// anyone is (a session request: its `session opened` or `session refused` follows), so
    /// the audit log is still durable before the action it records is acknowledged, at one
    /// disk flush per session instead of two. Defaults to [`Registry::record`].
    fn record_pending(&mut self, records: &[AuditRecord]) -> Result<(), RegistryError> {
        self.record(records)
    }
}
