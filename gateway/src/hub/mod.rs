//! The hub: every decision the gateway makes, as a pure state machine.
//!
//! Who may open what, which link a datagram goes to, which audit record an event produces,
//! which links an administrative change ends: all of it is here, and none of it does I/O. The
//! hub reads no clock (`now` is an argument), opens no socket and holds no database handle:
//! persistent state is reached through the [`Registry`] trait, which the caller passes in.
//!
//! # Calling contract
//!
//! The I/O layer owns one [`GatewayCore`] per link (framing, message order, heartbeats) and
//! drives the hub with what happens:
//!
//! * After a TLS handshake, [`Hub::handle_connect`] with the certificate the peer presented;
//!   it answers who the peer is, or `None` (close the connection). A failed handshake goes to
//!   [`Hub::handle_handshake_refused`].
//! * Each [`GatewayEvent`] the link's core yields goes to [`Hub::handle_event`]; a link that
//!   ended, with its reason, to [`Hub::handle_closed`] (exactly once per connected link).
//! * Each data frame goes to [`Hub::route`]: one hash lookup, no allocation; it returns the
//!   receiving link's handle (`H`, the I/O layer's own per-link value) and the session id that
//!   link knows. A datagram the receiver had no room for goes back to [`Hub::count_drop`].
//! * After the registry changed underneath (the CLI or the portal committed),
//!   [`Hub::handle_admin_change`].
//! * At [`Hub::poll_timeout`] (or on any periodic tick), [`Hub::handle_timeout`]: it flushes
//!   aggregated refusal records, pushes coalesced inventory updates, writes last-seen times
//!   and ends links whose certificate expired.
//!
//! Every `handle_*` returns `#[must_use]` [`Command`]s, in the order to carry them out: a
//! message to send on a link, a link to close. Audit records are written through the
//! registry inside the decision, durably, before the command that acknowledges the action is
//! returned; a record that cannot be written turns the action into a refusal.

mod live;
mod refusals;
pub mod relay;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use pinhole_certs::Role;
use pinhole_proto::{
    Agent, CloseReason, ErrorCode, GatewayCore, GatewayEvent, Message, PeerAuth, SiteView,
};
use tracing::{debug, info, warn};

use crate::audit::Actor;
use crate::registry::{
    Account, AuditRecord, EnrollError, Issued, Registry, RegistryError, SiteReport,
};
pub use live::{EndSessionError, LiveSession};
pub use refusals::Kind as RefusalKind;
use refusals::Refusals;
pub use relay::Route;
use relay::{AgentClosed, Ended, Relay, RequestError};

/// The gateway's name for one connected peer.
pub type LinkId = u64;

/// Inventory updates are coalesced for this long: after a gateway restart thousands of sites
/// say hello within seconds, and each technician then gets a few updates, not thousands.
pub const INVENTORY_COALESCE: Duration = Duration::from_millis(200);

/// Last-seen times of sites are written at most this often, all in one transaction.
pub const SEEN_FLUSH: Duration = Duration::from_secs(30);

/// A technician's `list` is answered at most this often; more are folded into one update.
pub const LIST_INTERVAL: Duration = Duration::from_secs(1);

/// Session requests (`session_open`) one technician link may make per [`RATE_WINDOW`]: each
/// costs two durable audit records; a person clicking devices never needs more.
pub const MAX_SESSION_REQUESTS: u32 = 30;

/// Agent list changes (`agents`) one site link may send per [`RATE_WINDOW`]: a configuration
/// reload is a person's doing.
pub const MAX_AGENT_CHANGES: u32 = 5;

/// Firewall restorations (`firewall_restored`) one site link may report per [`RATE_WINDOW`]:
/// the site checks its table once a second, so an honest site sends at most 60; more is a
/// hostile peer filling the audit log, and its link ends.
pub const MAX_FIREWALL_ALARMS: u32 = 60;

/// Links one account may hold at once: a technician has one daemon; a stolen bundle must not
/// take the descriptors every other peer needs.
pub const MAX_LINKS_PER_ACCOUNT: usize = 8;

/// A site answers a session request within milliseconds (a lookup in its agent table and a
/// WireGuard key). One that has not answered after this long is not there: its link is dead
/// although neither TCP end has noticed yet (a NAT or firewall on the way forgot it). The
/// technician is told so, and the site's link is ended so that the site is listed offline
/// until it reconnects.
pub const SESSION_ANSWER: Duration = Duration::from_secs(5);

/// The window of the per-link rate limits.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// An inventory must fit one control frame with room to spare for the message around it.
const MAX_INVENTORY_JSON: usize = pinhole_proto::frame::MAX_CONTROL - 64 * 1024;

/// Sites one technician link may owe changes for; past this many, it is owed the whole
/// inventory instead (as small as that many changes, and one query to build). Bounds what the
/// hub keeps per technician between two flushes.
pub const MAX_PENDING_CHANGES: usize = 1024;

/// Issues site certificates at enrollment (the gateway CA, or a subordinate signer).
pub trait Issuer {
    /// A certificate for `site`'s key (`public_key`: DER SubjectPublicKeyInfo).
    fn issue_site(&self, site: &str, public_key: &[u8]) -> Result<Issued, String>;
    /// The CA certificate (DER) the site must trust from now on.
    fn ca_certificate(&self) -> &[u8];
}

/// The certificate a peer presented, as the TLS verifier accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    pub role: Role,
    pub name: String,
    pub serial: Vec<u8>,
    /// When the certificate's validity ends, on the caller's monotonic clock.
    pub expires: Instant,
}

/// What the I/O layer must do, in order.
#[must_use]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Send a message on a link.
    Send { link: LinkId, message: Box<Message> },
    /// Accept the peer (`welcome`); a technician gets its tunnel address and inventory.
    Welcome {
        link: LinkId,
        name: String,
        tunnel_ip: Option<Ipv4Addr>,
        inventory: Option<Vec<SiteView>>,
        /// The account forbids remembering its password (false for a site).
        forbid_remembered_password: bool,
    },
    /// The technician's inventory: the answer to `list`, or a push after a change.
    Inventory {
        link: LinkId,
        sites: Vec<SiteView>,
        update: bool,
    },
    /// What changed in the technician's inventory since its last inventory message (to a
    /// client that asked for changes): `sites` added or changed, `removed` no longer visible.
    InventoryChanges {
        link: LinkId,
        sites: Vec<SiteView>,
        removed: Vec<String>,
    },
    /// Answer an enrollment with the site's certificate and the CA; then the link ends.
    Enrolled {
        link: LinkId,
        certificate: Vec<u8>,
        ca: Vec<u8>,
    },
    /// Tell the peer why, then end the link.
    Close {
        link: LinkId,
        code: ErrorCode,
        text: String,
    },
}

impl Command {
    /// The link the command is for.
    pub fn link(&self) -> LinkId {
        match self {
            Command::Send { link, .. }
            | Command::Welcome { link, .. }
            | Command::Inventory { link, .. }
            | Command::InventoryChanges { link, .. }
            | Command::Enrolled { link, .. }
            | Command::Close { link, .. } => *link,
        }
    }

    /// Carries the command out on its link's core.
    pub fn apply(self, core: &mut GatewayCore, now: Instant) {
        match self {
            Command::Send { message, .. } => core.send(&message, now),
            Command::Welcome {
                name,
                tunnel_ip,
                inventory,
                forbid_remembered_password,
                ..
            } => core.welcome(&name, tunnel_ip, inventory, forbid_remembered_password, now),
            Command::Inventory { sites, update, .. } => {
                if core.is_running() {
                    core.inventory(sites, update, now);
                }
            }
            Command::InventoryChanges { sites, removed, .. } => {
                if core.is_running() {
                    core.inventory_changes(sites, removed, now);
                }
            }
            Command::Enrolled {
                certificate, ca, ..
            } => core.enrolled(&certificate, &ca, now),
            Command::Close { code, text, .. } => core.refuse(code, &text, now),
        }
    }

    /// About how many bytes the command puts on the wire: the I/O layer bounds its queues in
    /// bytes with it.
    pub fn approx_size(&self) -> usize {
        fn sites(s: &[SiteView]) -> usize {
            s.iter()
                .map(|v| 64 + v.name.len() + v.domain.len() + v.agents.len() * 128)
                .sum()
        }
        64 + match self {
            Command::Send { message, .. } => match &**message {
                Message::SessionOpened { .. } | Message::SessionOpen { .. } => 512,
                _ => 256,
            },
            Command::Welcome { inventory, .. } => inventory.as_deref().map_or(0, sites),
            Command::Inventory { sites: s, .. } => sites(s),
            Command::InventoryChanges {
                sites: s, removed, ..
            } => sites(s) + removed.iter().map(|r| 4 + r.len()).sum::<usize>(),
            Command::Enrolled {
                certificate, ca, ..
            } => 2 * (certificate.len() + ca.len()),
            Command::Close { text, .. } => text.len(),
        }
    }
}

#[derive(Debug)]
struct Link<H> {
    handle: H,
    auth: PeerAuth,
    source: SocketAddr,
    serial: Vec<u8>,
    expires: Option<Instant>,
    welcomed: bool,
    logged_out: bool,
    /// The site said its remote access switch reads off (`switched_off`) before closing.
    switched_off: bool,
    /// A technician's account as of login or the last administrative change.
    account: Option<Account>,
    /// A site's domain.
    domain: Option<String>,
    /// When the last `list` was answered.
    last_list: Option<Instant>,
    /// A technician's client applies `inventory_changes` (it sent `list` with `changes`).
    changes: bool,
    /// Sites whose view changed since the technician's last inventory message (at most
    /// [`MAX_PENDING_CHANGES`]).
    pending: BTreeSet<String>,
    /// The technician is owed its whole inventory (its grants may have changed, it asked
    /// again too soon, too many sites changed, or its client takes no changes).
    full_owed: bool,
    /// Requests in the current rate window: (window start, count).
    requests: (Instant, u32),
    /// A site's firewall reports in the current rate window: (window start, count).
    alarms: (Instant, u32),
    /// A site link that left a session request unanswered: it is being ended, and takes no
    /// more requests.
    suspect: bool,
    /// The peer's `hello` said `offload`: it takes super-packets (`pinhole_proto::message`).
    /// A technician's flag goes to the site in `session_open`; the link's own core keeps any
    /// offload field from a peer that did not announce it.
    offload: bool,
}

impl<H> Link<H> {
    /// `site`'s view changed: owed as a change, or (past [`MAX_PENDING_CHANGES`]) as part of
    /// a whole inventory. A client that takes no changes gets the whole inventory anyway.
    fn owe_site(&mut self, site: &str) {
        if self.full_owed {
            return;
        }
        if self.pending.len() >= MAX_PENDING_CHANGES {
            self.owe_all();
        } else {
            self.pending.insert(site.to_owned());
        }
    }

    /// Owed the whole inventory.
    fn owe_all(&mut self) {
        self.full_owed = true;
        self.pending = BTreeSet::new();
    }

    /// An inventory message of the current state is on its way: nothing is owed.
    fn owe_nothing(&mut self) {
        self.full_owed = false;
        self.pending = BTreeSet::new();
    }
    /// Counts one request; `false` once more than `max` arrived within [`RATE_WINDOW`].
    fn within_rate(&mut self, max: u32, now: Instant) -> bool {
        if now.saturating_duration_since(self.requests.0) >= RATE_WINDOW {
            self.requests = (now, 0);
        }
        self.requests.1 += 1;
        self.requests.1 <= max
    }

    /// Counts one firewall report; `false` once more than [`MAX_FIREWALL_ALARMS`] arrived
    /// within [`RATE_WINDOW`].
    fn alarm_within_rate(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.alarms.0) >= RATE_WINDOW {
            self.alarms = (now, 0);
        }
        self.alarms.1 += 1;
        self.alarms.1 <= MAX_FIREWALL_ALARMS
    }
}

/// The sites that fit one inventory message, in order; the rest are left out (and logged), so
/// that sites with very many agents never keep every technician of their domain from logging
/// in.
fn fit_inventory(mut sites: Vec<SiteView>) -> Vec<SiteView> {
    let mut total = 0;
    let mut keep = sites.len();
    for (i, s) in sites.iter().enumerate() {
        total += serde_json::to_vec(s).map_or(usize::MAX / 2, |j| j.len() + 1);
        if total > MAX_INVENTORY_JSON {
            keep = i;
            break;
        }
    }
    if keep < sites.len() {
        warn!(
            shown = keep,
            left_out = sites.len() - keep,
            "an inventory does not fit one message: sites left out"
        );
        sites.truncate(keep);
    }
    sites
}

/// See the module documentation for the calling contract.
pub struct Hub<H> {
    issuer: Box<dyn Issuer + Send>,
    links: BTreeMap<LinkId, Link<H>>,
    /// Site name → its welcomed link.
    sites: BTreeMap<String, LinkId>,
    relay: Relay<H>,
    refusals: Refusals,
    /// Technician links owed an inventory update, and since when.
    dirty: BTreeSet<LinkId>,
    dirty_since: Option<Instant>,
    /// Session requests sent to sites and not yet answered: (deadline, session, agent). An
    /// entry whose agent was answered or closed meanwhile is skipped when it comes due.
    awaiting: BTreeSet<(Instant, u32, String)>,
    /// Sites heard from since the last flush.
    seen: BTreeSet<String>,
    seen_flushed: Option<Instant>,
    /// Technician links (a few hundred, among up to 100 000 site links): whom a site's change
    /// concerns is looked for among these only.
    technicians: BTreeSet<LinkId>,
    /// The `now` of the latest call (for durations in audit records).
    now: Instant,
}

impl<H> std::fmt::Debug for Hub<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("links", &self.links.len())
            .field("sites", &self.sites.len())
            .field("sessions", &self.relay.len())
            .finish_non_exhaustive()
    }
}

fn site_object(site: &str) -> String {
    format!("site:{site}")
}

fn account_object(account: &str) -> String {
    format!("account:{account}")
}

/// The reason a link ended, in words for the audit log.
fn describe(reason: &CloseReason) -> String {
    match reason {
        CloseReason::Error { text, .. } => pinhole_proto::link::bounded_reason(text),
        CloseReason::Protocol(what) => {
            format!(
                "protocol error: {}",
                pinhole_proto::link::bounded_reason(what)
            )
        }
        CloseReason::Timeout => "timed out".into(),
        CloseReason::Local => "connection closed".into(),
    }
}

impl<H: Clone> Hub<H> {
    pub fn new(issuer: Box<dyn Issuer + Send>, now: Instant) -> Self {
        Self {
            issuer,
            links: BTreeMap::new(),
            sites: BTreeMap::new(),
            relay: Relay::default(),
            refusals: Refusals::default(),
            dirty: BTreeSet::new(),
            dirty_since: None,
            awaiting: BTreeSet::new(),
            seen: BTreeSet::new(),
            seen_flushed: None,
            technicians: BTreeSet::new(),
            now,
        }
    }

    /// Connected links (welcomed or not).
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Open sessions.
    pub fn sessions(&self) -> usize {
        self.relay.len()
    }

    /// Whether `site` has a welcomed link.
    pub fn site_online(&self, site: &str) -> bool {
        self.sites.contains_key(site)
    }

    /// A TLS handshake failed (revoked, expired or foreign certificate, or not TLS at all).
    /// Counted and recorded in aggregate.
    pub fn handle_handshake_refused(&mut self, source: IpAddr, reason: &str, now: Instant) {
        // rustls words every refusal of the peer's certificate this way.
        let kind = if reason.contains("invalid peer certificate") {
            RefusalKind::Certificate
        } else {
            RefusalKind::Handshake
        };
        self.refusals.add(source, kind, reason, now);
    }

    /// A TLS handshake finished. Returns who the peer is, or `None` if its certificate is not
    /// the current one of its site or account (a site re-enrolled or revoked, an account
    /// re-issued): the caller closes the connection and must not call [`Hub::handle_closed`].
    pub fn handle_connect(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        handle: H,
        source: SocketAddr,
        presented: Option<Presented>,
        now: Instant,
    ) -> Option<PeerAuth> {
        self.now = self.now.max(now);
        let (auth, serial, expires) = match presented {
            None => (PeerAuth::Anonymous, Vec::new(), None),
            Some(p) => {
                let current = match p.role {
                    Role::Site => registry
                        .site(&p.name)
                        .map(|s| s.is_some_and(|s| s.serial == p.serial && !s.revoked)),
                    // An account that does not exist any more still gets to hello, to be
                    // told so.
                    Role::Technician => registry
                        .account(&p.name)
                        .map(|a| a.is_none_or(|a| a.serial == p.serial)),
                    Role::Gateway => Ok(false),
                };
                match current {
                    Ok(true) => {}
                    Ok(false) => {
                        self.refusals.add(
                            source.ip(),
                            RefusalKind::StaleCertificate,
                            &format!("{:?} {}: not the current certificate", p.role, p.name),
                            now,
                        );
                        return None;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot check a certificate: closing");
                        return None;
                    }
                }
                let auth = match p.role {
                    Role::Site => PeerAuth::Site(p.name),
                    _ => PeerAuth::Technician(p.name),
                };
                if matches!(auth, PeerAuth::Technician(_))
                    && self
                        .technicians
                        .iter()
                        .filter(|id| self.links.get(id).is_some_and(|l| l.auth == auth))
                        .count()
                        >= MAX_LINKS_PER_ACCOUNT
                {
                    self.refusals.add(
                        source.ip(),
                        RefusalKind::StaleCertificate,
                        &format!("{auth:?}: more than {MAX_LINKS_PER_ACCOUNT} links at once"),
                        now,
                    );
                    return None;
                }
                (auth, p.serial, Some(p.expires))
            }
        };
        if matches!(auth, PeerAuth::Technician(_)) {
            self.technicians.insert(link);
        }
        self.links.insert(
            link,
            Link {
                handle,
                auth: auth.clone(),
                source,
                serial,
                expires,
                welcomed: false,
                logged_out: false,
                switched_off: false,
                account: None,
                domain: None,
                last_list: None,
                changes: false,
                pending: BTreeSet::new(),
                full_owed: false,
                requests: (now, 0),
                alarms: (now, 0),
                suspect: false,
                offload: false,
            },
        );
        Some(auth)
    }

    /// The data path: where a datagram of `len` bytes from `link` for `session` goes.
    pub fn route(&mut self, link: LinkId, session: u32, len: usize) -> Option<Route<H>> {
        self.relay.route(link, session, len).map(|r| Route {
            to: r.to.clone(),
            session: r.session,
        })
    }

    /// The receiver of a datagram routed from `link`/`session` had no room for it.
    pub fn count_drop(&mut self, link: LinkId, session: u32) {
        self.relay.count_drop(link, session);
    }

    /// A site's link heard from its site (the caller throttles this to once per heartbeat).
    pub fn handle_site_seen(&mut self, link: LinkId) {
        if let Some(Link {
            auth: PeerAuth::Site(name),
            welcomed: true,
            ..
        }) = self.links.get(&link)
        {
            self.seen.insert(name.clone());
        }
    }

    /// One event from a link's core.
    pub fn handle_event(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        event: GatewayEvent,
        now: Instant,
    ) -> Vec<Command> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let Some(auth) = self.links.get(&link).map(|l| l.auth.clone()) else {
            return out;
        };
        match (auth, event) {
            (PeerAuth::Technician(name), GatewayEvent::TechnicianHello { software, offload }) => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.offload = offload;
                }
                self.technician_hello(registry, link, &name, &software, &mut out);
            }
            (
                PeerAuth::Site(name),
                GatewayEvent::SiteHello {
                    software,
                    boot_id,
                    agents,
                    ..
                },
            ) => self.site_hello(
                registry, link, &name, &software, &boot_id, &agents, now, &mut out,
            ),
            (
                PeerAuth::Anonymous,
                GatewayEvent::Enroll {
                    token,
                    site,
                    public_key,
                },
            ) => self.enroll(registry, link, &token, &site, &public_key, now, &mut out),
            (PeerAuth::Technician(name), GatewayEvent::List { changes }) => {
                // The first `list` with `changes` (a client sends it right after its welcome)
                // is answered with what changed since the welcome: usually nothing.
                if changes
                    && let Some(l) = self.links.get_mut(&link)
                    && l.welcomed
                    && !l.changes
                {
                    l.changes = true;
                    l.last_list = Some(now);
                    let owed = std::mem::take(&mut l.pending);
                    let full = std::mem::replace(&mut l.full_owed, false);
                    self.dirty.remove(&link);
                    if full {
                        match self.inventory_of(registry, &name) {
                            Ok(sites) => out.push(Command::Inventory {
                                link,
                                sites,
                                update: false,
                            }),
                            Err(e) => {
                                warn!(error = %e, "inventory");
                                self.owe_again(link, now);
                            }
                        }
                    } else {
                        let mut views = BTreeMap::new();
                        if let Some(c) = self.changes_for(registry, link, &owed, &mut views) {
                            out.push(c);
                        }
                    }
                    return out;
                }
                let recent = self.links.get_mut(&link).is_some_and(|l| {
                    let recent = l
                        .last_list
                        .is_some_and(|t| now.saturating_duration_since(t) < LIST_INTERVAL);
                    if !recent {
                        l.last_list = Some(now);
                    }
                    recent
                });
                if recent {
                    // Folded into one coalesced update: a peer asking in a loop (and not
                    // reading) cannot make the gateway build and queue inventory after
                    // inventory.
                    if let Some(l) = self.links.get_mut(&link) {
                        l.owe_all();
                    }
                    self.dirty.insert(link);
                    self.dirty_since.get_or_insert(now);
                    return out;
                }
                match self.inventory_of(registry, &name) {
                    Ok(sites) => {
                        if let Some(l) = self.links.get_mut(&link) {
                            l.owe_nothing();
                        }
                        self.dirty.remove(&link);
                        out.push(Command::Inventory {
                            link,
                            sites,
                            update: false,
                        });
                    }
                    Err(e) => warn!(error = %e, "inventory"),
                }
            }
            (PeerAuth::Site(name), GatewayEvent::Agents(agents)) => {
                if !self
                    .links
                    .get_mut(&link)
                    .is_some_and(|l| l.within_rate(MAX_AGENT_CHANGES, now))
                {
                    out.push(Command::Close {
                        link,
                        code: ErrorCode::Protocol,
                        text: format!(
                            "more than {MAX_AGENT_CHANGES} agent changes within {} s",
                            RATE_WINDOW.as_secs()
                        ),
                    });
                    return out;
                }
                self.site_agents(registry, link, &name, &agents, now, &mut out);
            }
            (PeerAuth::Site(name), GatewayEvent::FirewallRestored(change)) => {
                if !self
                    .links
                    .get_mut(&link)
                    .is_some_and(|l| l.alarm_within_rate(now))
                {
                    out.push(Command::Close {
                        link,
                        code: ErrorCode::Protocol,
                        text: format!(
                            "more than {MAX_FIREWALL_ALARMS} firewall reports within {} s",
                            RATE_WINDOW.as_secs()
                        ),
                    });
                    return out;
                }
                warn!(site = %name, change = change.describe(), "site restored its firewall");
                let rec = AuditRecord::new(
                    Actor::Site(name.clone()),
                    site_object(&name),
                    "site firewall restored",
                    format!("site {name}: {}", change.describe()),
                );
                if let Err(e) = registry.record(&[rec]) {
                    self.fail_closed(link, &e, &mut out);
                }
            }
            (
                PeerAuth::Technician(account),
                GatewayEvent::SessionOpen {
                    session,
                    site,
                    agent,
                    key,
                },
            ) => {
                if !self
                    .links
                    .get_mut(&link)
                    .is_some_and(|l| l.within_rate(MAX_SESSION_REQUESTS, now))
                {
                    out.push(Command::Close {
                        link,
                        code: ErrorCode::Protocol,
                        text: format!(
                            "more than {MAX_SESSION_REQUESTS} session requests within {} s",
                            RATE_WINDOW.as_secs()
                        ),
                    });
                    return out;
                }
                self.open_session(
                    registry, link, &account, session, &site, &agent, &key, now, &mut out,
                );
            }
            (
                PeerAuth::Site(site),
                GatewayEvent::SessionOpened {
                    session,
                    key,
                    agent,
                    offload,
                },
            ) => self.session_opened(
                registry, link, &site, session, key, &agent, offload, &mut out,
            ),
            (PeerAuth::Site(site), GatewayEvent::SessionRefused { session, reason }) => {
                self.session_refused(registry, link, &site, session, &reason, &mut out);
            }
            (
                PeerAuth::Technician(_),
                GatewayEvent::SessionClose {
                    session,
                    reason,
                    agent,
                },
            ) => {
                if let Some(gsid) = self.relay.of_client(link, session) {
                    self.close_from(registry, gsid, agent.as_deref(), &reason, true, &mut out);
                }
            }
            (
                PeerAuth::Site(_),
                GatewayEvent::SessionClose {
                    session,
                    reason,
                    agent,
                },
            ) => {
                if self.relay.get(session).is_some_and(|s| s.site_link == link) {
                    self.close_from(
                        registry,
                        session,
                        agent.as_deref(),
                        &reason,
                        false,
                        &mut out,
                    );
                }
            }
            (PeerAuth::Site(name), GatewayEvent::SwitchedOff) => {
                info!(site = %name, "site switched off remote access");
                if let Some(l) = self.links.get_mut(&link) {
                    l.switched_off = true;
                }
            }
            (PeerAuth::Technician(_), GatewayEvent::Logout) => {
                if let Some(l) = self.links.get_mut(&link) {
                    l.logged_out = true;
                }
            }
            // The link's end arrives through `handle_closed`.
            (_, GatewayEvent::Closed(_)) => {}
            (_, ev) => debug!(?ev, "ignored"),
        }
        out
    }

    fn technician_hello(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        name: &str,
        software: &str,
        out: &mut Vec<Command>,
    ) {
        let source = self.links.get(&link).map(|l| l.source);
        let from = source.map(|s| s.to_string()).unwrap_or_default();
        let actor = Actor::Account(name.to_owned());
        let refuse = |code, text: &str, out: &mut Vec<Command>| {
            out.push(Command::Close {
                link,
                code,
                text: text.into(),
            })
        };
        let account = match registry.account(name) {
            Ok(a) => a,
            Err(e) => return self.fail_closed(link, &e, out),
        };
        let (why, text) = match &account {
            None => ("unknown account", "this account does not exist"),
            Some(a) if a.closed => ("account closed", "your account was closed"),
            Some(_) => ("", ""),
        };
        if !why.is_empty() {
            let rec = AuditRecord::new(
                actor,
                account_object(name),
                "login failed",
                format!("{name} from {from}: {why}"),
            );
            if let Err(e) = registry.record(&[rec]) {
                warn!(error = %e, "could not record a refused login");
            }
            info!(account = %name, reason = why, "login refused");
            return refuse(ErrorCode::AccountClosed, text, out);
        }
        let Some(account) = account else { return };
        let sites = match registry.inventory(&account) {
            Ok(s) => fit_inventory(s),
            Err(e) => return self.fail_closed(link, &e, out),
        };
        let rec = AuditRecord::new(
            actor,
            account_object(name),
            "login ok",
            format!("{name} logged in from {from} (client {software})"),
        );
        if let Err(e) = registry.record(&[rec]) {
            return self.fail_closed(link, &e, out);
        }
        info!(account = %name, "login ok");
        let tunnel_ip = account.tunnel_ip;
        let forbid_remembered_password = account.forbid_remembered_password;
        if let Some(l) = self.links.get_mut(&link) {
            l.welcomed = true;
            l.account = Some(account);
        }
        out.push(Command::Welcome {
            link,
            name: name.to_owned(),
            tunnel_ip: Some(tunnel_ip),
            inventory: Some(sites),
            forbid_remembered_password,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn site_hello(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        name: &str,
        software: &str,
        boot_id: &str,
        agents: &[Agent],
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let from = self
            .links
            .get(&link)
            .map(|l| l.source.to_string())
            .unwrap_or_default();
        let site = match registry.site(name) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return out.push(Command::Close {
                    link,
                    code: ErrorCode::UnknownSite,
                    text: "this site is not enrolled any more".into(),
                });
            }
            Err(e) => return self.fail_closed(link, &e, out),
        };
        let report = SiteReport {
            software,
            boot_id,
            agents,
            from: &from,
        };
        if let Err(e) = registry.site_connected(name, &report) {
            return self.fail_closed(link, &e, out);
        }
        // One link per site: a new one replaces an old one that has not noticed its loss.
        if let Some(old) = self.sites.insert(name.to_owned(), link)
            && old != link
        {
            self.end_sessions_of(registry, old, "the site reconnected", None, out);
            out.push(Command::Close {
                link: old,
                code: ErrorCode::Replaced,
                text: "replaced by a newer connection of this site".into(),
            });
        }
        info!(site = %name, agents = agents.len(), "site online");
        if let Some(l) = self.links.get_mut(&link) {
            l.welcomed = true;
            l.domain = Some(site.domain.clone());
        }
        out.push(Command::Welcome {
            link,
            name: name.to_owned(),
            tunnel_ip: None,
            inventory: None,
            forbid_remembered_password: false,
        });
        self.mark_concerned(&site.domain, name, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn enroll(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        token: &str,
        site: &str,
        public_key: &[u8],
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let source = self.links.get(&link).map(|l| l.source.ip());
        let issuer = &self.issuer;
        let result = registry.enroll(token, site, &mut || issuer.issue_site(site, public_key));
        match result {
            Ok(certificate) => {
                info!(%site, "site enrolled");
                out.push(Command::Enrolled {
                    link,
                    certificate,
                    ca: self.issuer.ca_certificate().to_vec(),
                });
            }
            Err(EnrollError::Registry(e)) => self.fail_closed(link, &e, out),
            Err(e @ (EnrollError::Refused(_) | EnrollError::Invalid(_))) => {
                let text = e.to_string();
                info!(%site, reason = %text, "enrollment refused");
                if let Some(ip) = source {
                    self.refusals.add(
                        ip,
                        RefusalKind::Enrollment,
                        &format!("site {site}: {text}"),
                        now,
                    );
                }
                out.push(Command::Close {
                    link,
                    code: ErrorCode::TokenRefused,
                    text,
                });
            }
        }
    }

    fn site_agents(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        name: &str,
        agents: &[Agent],
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let before = match registry.site(name) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => return self.fail_closed(link, &e, out),
        };
        if let Err(e) = registry.site_agents(name, agents) {
            return self.fail_closed(link, &e, out);
        }
        // Agents that changed or went away: the sessions carrying them lose them.
        let changed: BTreeSet<&str> = before
            .agents
            .iter()
            .filter(|a| !agents.contains(a))
            .map(|a| a.name.as_str())
            .collect();
        let affected: Vec<(u32, Vec<String>)> = self
            .relay
            .all()
            .filter(|(_, s)| s.site_link == link)
            .map(|(g, s)| {
                (
                    *g,
                    s.agents
                        .iter()
                        .chain(s.pending.iter())
                        .filter(|a| changed.contains(a.as_str()))
                        .cloned()
                        .collect(),
                )
            })
            .collect();
        for (gsid, gone) in affected {
            for agent in gone {
                self.close_agent_both(
                    registry,
                    gsid,
                    &agent,
                    "the site's agent configuration changed",
                    out,
                );
            }
        }
        self.mark_concerned(&before.domain, name, now);
    }

    /// A technician asks for `site/agent`: check the grant, the site and the agent, then ask
    /// the site.
    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        account: &str,
        session: u32,
        site: &str,
        agent: &str,
        key: &str,
        now: Instant,
        out: &mut Vec<Command>,
    ) {
        let actor = Actor::Account(account.to_owned());
        let requested = AuditRecord::new(
            actor.clone(),
            site_object(site),
            "session requested",
            format!("{account} asked for {site}/{agent}"),
        );
        // Flushed to disk in the background while the site works on it, and with the request's
        // outcome (`session opened` or refused) at the latest, before the technician hears of
        // it: no disk flush of its own on the way to a connected device.
        if registry.record_pending(&[requested]).is_err() {
            out.push(refused(
                link,
                session,
                "the gateway could not record the request",
            ));
            return;
        }
        let refuse = |registry: &mut dyn Registry, out: &mut Vec<Command>, reason: String| {
            info!(%account, %site, %agent, %reason, "session refused");
            let rec = AuditRecord::new(
                actor.clone(),
                site_object(site),
                "session refused",
                format!("{account} asked for {site}/{agent}: {reason}"),
            );
            if let Err(e) = registry.record(&[rec]) {
                warn!(error = %e, "could not record a refusal");
            }
            out.push(refused(link, session, &reason));
        };
        match self.check_access(registry, account, site, agent) {
            Ok(()) => {}
            Err(reason) => return refuse(registry, out, reason),
        }
        let Some(&site_link) = self.sites.get(site) else {
            return refuse(
                registry,
                out,
                format!("site {site} is offline or switched off"),
            );
        };
        let (Some(client), Some(site_l)) = (self.links.get(&link), self.links.get(&site_link))
        else {
            return refuse(
                registry,
                out,
                format!("site {site} is offline or switched off"),
            );
        };
        if site_l.suspect {
            return refuse(registry, out, no_answer(site));
        }
        let tunnel_ip = client.account.as_ref().map(|a| a.tunnel_ip);
        let client_offload = client.offload;
        let (ch, sh) = (client.handle.clone(), site_l.handle.clone());
        let gsid = match self.relay.request(
            account,
            (link, &ch, session),
            (site, site_link, &sh),
            agent,
            now,
        ) {
            Ok(g) => g,
            Err(
                e @ (RequestError::OtherSite(_)
                | RequestError::Already(_)
                | RequestError::SiteInUse(_)),
            ) => {
                return refuse(registry, out, e.to_string());
            }
        };
        // Checked again now that the session is in the table: a grant removed meanwhile is
        // caught either here or by the administrative change that removed it.
        if let Err(reason) = self.check_access(registry, account, site, agent) {
            let _ = self.relay.close_agent(gsid, agent);
            return refuse(registry, out, reason);
        }
        out.push(Command::Send {
            link: site_link,
            message: Box::new(Message::SessionOpen {
                session: gsid,
                site: site.into(),
                agent: agent.into(),
                key: key.into(),
                tunnel_ip,
                // The technician's word; the site's core drops it for a site that did not
                // announce offload.
                offload: client_offload,
            }),
        });
        self.awaiting
            .insert((now + SESSION_ANSWER, gsid, agent.to_owned()));
    }

    /// Requests due at `now` that their site left unanswered: each is refused, and the site's
    /// link is ended as suspect (with every session on it).
    fn unanswered(&mut self, registry: &mut dyn Registry, now: Instant, out: &mut Vec<Command>) {
        let mut suspects = BTreeSet::new();
        while let Some((due, _, _)) = self.awaiting.first()
            && *due <= now
        {
            let Some((_, gsid, agent)) = self.awaiting.pop_first() else {
                break;
            };
            let Some(s) = self
                .relay
                .get(gsid)
                .filter(|s| s.pending.contains(&agent))
                .cloned()
            else {
                continue;
            };
            let reason = no_answer(&s.site);
            warn!(session = gsid, site = %s.site, %agent, account = %s.account, "the site did not answer a session request in time");
            let rec = AuditRecord::new(
                Actor::Account(s.account.clone()),
                site_object(&s.site),
                "session refused",
                format!(
                    "{} asked for {}/{agent}: the site did not answer within {} s",
                    s.account,
                    s.site,
                    SESSION_ANSWER.as_secs()
                ),
            );
            if let Err(e) = registry.record(&[rec]) {
                warn!(error = %e, "could not record a refusal");
            }
            out.push(refused(s.client_link, s.client_sid, &reason));
            if let Some(AgentClosed::SessionEnded(e)) = self.relay.close_agent(gsid, &agent) {
                self.record_ended(registry, &e, &reason);
            }
            suspects.insert((s.site_link, s.site));
        }
        for (link, site) in suspects {
            let Some(l) = self.links.get_mut(&link).filter(|l| !l.suspect) else {
                continue;
            };
            l.suspect = true;
            let rec = AuditRecord::new(
                Actor::Site(site.clone()),
                site_object(&site),
                "site link suspect",
                format!(
                    "site {site} did not answer a session request within {} s; its link is ended",
                    SESSION_ANSWER.as_secs()
                ),
            );
            if let Err(e) = registry.record(&[rec]) {
                warn!(error = %e, "could not record a suspect site link");
            }
            self.end_sessions_of(registry, link, &no_answer(&site), Some(link), out);
            out.push(Command::Close {
                link,
                code: ErrorCode::Protocol,
                text: format!(
                    "no answer to a session request within {} s",
                    SESSION_ANSWER.as_secs()
                ),
            });
        }
    }

    /// Whether `account` may reach `site/agent` now, per the registry.
    fn check_access(
        &self,
        registry: &mut dyn Registry,
        account: &str,
        site: &str,
        agent: &str,
    ) -> Result<(), String> {
        let acct = registry
            .account(account)
            .map_err(|e| format!("registry error: {e}"))?
            .filter(|a| !a.closed)
            .ok_or_else(|| "your account was closed".to_owned())?;
        let s = registry
            .site(site)
            .map_err(|e| format!("registry error: {e}"))?
            .filter(|s| acct.may_see(&s.domain))
            .ok_or_else(|| format!("you have no access to site {site}"))?;
        if !s.agents.iter().any(|a| a.name == agent) {
            return Err(format!("site {site} has no agent {agent}"));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn session_opened(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        site: &str,
        gsid: u32,
        key: String,
        agent: &Agent,
        offload: bool,
        out: &mut Vec<Command>,
    ) {
        // Only an agent this site was asked for, on this session.
        let Some(s) = self.relay.get(gsid).filter(|s| s.site_link == link) else {
            return;
        };
        if !s.pending.contains(&agent.name) {
            return;
        }
        let (account, client_link, client_sid) = (s.account.clone(), s.client_link, s.client_sid);
        // The technician installs a route for the agent's address: it must be the agent the
        // registry holds, never what the site says now.
        let registered = registry
            .site(site)
            .ok()
            .flatten()
            .and_then(|s| s.agents.into_iter().find(|a| a.name == agent.name));
        let refusal = match &registered {
            None => Some("the agent is not registered".to_owned()),
            Some(r) if r != agent => Some(format!(
                "the site answered for {} with {} {} instead of the registered {} {}",
                r.name,
                agent.address,
                agent.ports_text(),
                r.address,
                r.ports_text()
            )),
            Some(_) => None,
        };
        let actor = Actor::Account(account.clone());
        let opened = registered.filter(|_| refusal.is_none());
        let rec = match &opened {
            Some(a) => AuditRecord::new(
                actor.clone(),
                site_object(site),
                "session opened",
                format!(
                    "{account} connected to {site}/{} ({} {})",
                    a.name,
                    a.address,
                    a.ports_text()
                ),
            ),
            None => AuditRecord::new(
                Actor::Site(site.to_owned()),
                account_object(&account),
                "session refused",
                format!(
                    "site {site} confirmed {} wrongly: {}",
                    agent.name,
                    refusal.as_deref().unwrap_or_default()
                ),
            ),
        };
        let written = registry.record(&[rec]);
        match (opened, written) {
            (Some(a), Ok(())) => {
                let _ = self.relay.confirm(link, gsid, &a.name);
                info!(%account, %site, agent = %a.name, "session opened");
                out.push(Command::Send {
                    link: client_link,
                    message: Box::new(Message::SessionOpened {
                        session: client_sid,
                        key,
                        agent: a,
                        // The site's word; the client's core drops it for a client that
                        // did not announce offload.
                        offload,
                    }),
                });
            }
            (_, written) => {
                let reason = if let Err(e) = &written {
                    warn!(error = %e, "refusing a session: it could not be recorded");
                    "the gateway could not record the session".to_owned()
                } else {
                    warn!(%site, "site confirmed an agent that differs from the registered one");
                    "the site's answer does not match its registered agent".to_owned()
                };
                out.push(refused(client_link, client_sid, &reason));
                out.push(Command::Send {
                    link,
                    message: Box::new(Message::SessionClose {
                        session: gsid,
                        reason: reason.clone(),
                        agent: Some(agent.name.clone()),
                    }),
                });
                if let Some(AgentClosed::SessionEnded(e)) =
                    self.relay.close_agent(gsid, &agent.name)
                {
                    self.record_ended(registry, &e, &reason);
                }
            }
        }
    }

    fn session_refused(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        site: &str,
        gsid: u32,
        reason: &str,
        out: &mut Vec<Command>,
    ) {
        let Some(s) = self
            .relay
            .get(gsid)
            .filter(|s| s.site_link == link)
            .cloned()
        else {
            return;
        };
        if s.pending.is_empty() {
            return;
        }
        let rec = AuditRecord::new(
            Actor::Site(site.to_owned()),
            account_object(&s.account),
            "session refused",
            format!("site {site} refused: {reason}"),
        );
        if let Err(e) = registry.record(&[rec]) {
            warn!(error = %e, "could not record a refusal");
        }
        out.push(refused(
            s.client_link,
            s.client_sid,
            &format!("the site refused: {reason}"),
        ));
        for a in &s.pending {
            if let Some(AgentClosed::SessionEnded(e)) = self.relay.close_agent(gsid, a) {
                self.record_ended(registry, &e, reason);
            }
        }
    }

    /// One side closed a session or one agent of it: tell the other side, record the end.
    /// A close that closes nothing is ignored.
    fn close_from(
        &mut self,
        registry: &mut dyn Registry,
        gsid: u32,
        agent: Option<&str>,
        reason: &str,
        from_client: bool,
        out: &mut Vec<Command>,
    ) {
        let Some(s) = self.relay.get(gsid) else {
            return;
        };
        let (other, other_sid) = if from_client {
            (s.site_link, gsid)
        } else {
            (s.client_link, s.client_sid)
        };
        let (account, site) = (s.account.clone(), s.site.clone());
        match agent {
            None => {
                let skip = if from_client {
                    s.client_link
                } else {
                    s.site_link
                };
                self.end_session(registry, gsid, reason, Some(skip), out);
            }
            Some(a) => {
                let Some(closed) = self.relay.close_agent(gsid, a) else {
                    return;
                };
                out.push(Command::Send {
                    link: other,
                    message: Box::new(Message::SessionClose {
                        session: other_sid,
                        reason: reason.into(),
                        agent: Some(a.to_owned()),
                    }),
                });
                let rec = AuditRecord::new(
                    Actor::Account(account),
                    site_object(&site),
                    "session agent closed",
                    format!("{site}/{a} disconnected ({reason})"),
                );
                if let Err(e) = registry.record(&[rec]) {
                    warn!(error = %e, "could not record a session end");
                }
                if let AgentClosed::SessionEnded(e) = closed {
                    self.record_ended(registry, &e, reason);
                }
            }
        }
    }

    /// Ends one agent of a session at both ends.
    fn close_agent_both(
        &mut self,
        registry: &mut dyn Registry,
        gsid: u32,
        agent: &str,
        reason: &str,
        out: &mut Vec<Command>,
    ) {
        let Some(s) = self.relay.get(gsid) else {
            return;
        };
        let (client_link, client_sid, site_link) = (s.client_link, s.client_sid, s.site_link);
        let Some(closed) = self.relay.close_agent(gsid, agent) else {
            return;
        };
        for (link, session) in [(client_link, client_sid), (site_link, gsid)] {
            out.push(Command::Send {
                link,
                message: Box::new(Message::SessionClose {
                    session,
                    reason: reason.into(),
                    agent: Some(agent.to_owned()),
                }),
            });
        }
        if let AgentClosed::SessionEnded(e) = closed {
            self.record_ended(registry, &e, reason);
        }
    }

    /// Ends a whole session: tells both ends (except `skip`), records it.
    fn end_session(
        &mut self,
        registry: &mut dyn Registry,
        gsid: u32,
        reason: &str,
        skip: Option<LinkId>,
        out: &mut Vec<Command>,
    ) {
        let Some(e) = self.relay.close(gsid) else {
            return;
        };
        let s = &e.session;
        for (link, session) in [(s.client_link, s.client_sid), (s.site_link, gsid)] {
            if skip != Some(link) {
                out.push(Command::Send {
                    link,
                    message: Box::new(Message::SessionClose {
                        session,
                        reason: reason.into(),
                        agent: None,
                    }),
                });
            }
        }
        self.record_ended(registry, &e, reason);
    }

    fn end_sessions_of(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        reason: &str,
        skip: Option<LinkId>,
        out: &mut Vec<Command>,
    ) {
        for gsid in self.relay.of_link(link) {
            self.end_session(registry, gsid, reason, skip, out);
        }
    }

    /// Ending a session is never refused (it takes access away); a record that cannot be
    /// written is logged loudly.
    fn record_ended(&mut self, registry: &mut dyn Registry, e: &Ended, reason: &str) {
        let s = &e.session;
        let secs = self.now.saturating_duration_since(s.started).as_secs();
        let rec = AuditRecord::new(
            Actor::Account(s.account.clone()),
            site_object(&s.site),
            "session closed",
            format!(
                "session to {} closed after {secs} s ({reason}); {} bytes to the site, {} bytes from it; {} datagrams dropped",
                s.site,
                e.up.bytes,
                e.down.bytes,
                e.up.dropped + e.down.dropped
            ),
        );
        info!(account = %s.account, site = %s.site, up = e.up.bytes, down = e.down.bytes, "session closed");
        if let Err(err) = registry.record(&[rec]) {
            warn!(error = %err, "could not record a session end");
        }
    }

    fn fail_closed(&mut self, link: LinkId, e: &RegistryError, out: &mut Vec<Command>) {
        warn!(error = %e, "refusing: the action could not be recorded");
        out.push(Command::Close {
            link,
            code: ErrorCode::Internal,
            text: "the gateway could not record this action and refused it".into(),
        });
    }

    /// An inventory for `link` could not be built (the registry failed): it is owed the whole
    /// one, tried again at the next coalesced push. Its client takes only changes after its
    /// first inventory, so a change lost here would stay wrong in its view until it logs in
    /// again.
    fn owe_again(&mut self, link: LinkId, now: Instant) {
        if let Some(l) = self.links.get_mut(&link) {
            l.owe_all();
            self.dirty.insert(link);
            self.dirty_since.get_or_insert(now);
        }
    }

    fn inventory_of(
        &self,
        registry: &mut dyn Registry,
        account: &str,
    ) -> Result<Vec<SiteView>, RegistryError> {
        match registry.account(account)? {
            Some(a) if !a.closed => registry.inventory(&a).map(fit_inventory),
            _ => Ok(Vec::new()),
        }
    }

    /// The `owed` sites' changes for technician link `id`, from `views` (each site's view and
    /// its size in JSON, read from the registry once per flush). `None` when a whole inventory
    /// must go instead: the changes would not fit one message, or the registry failed.
    fn changes_for(
        &self,
        registry: &mut dyn Registry,
        id: LinkId,
        owed: &BTreeSet<String>,
        views: &mut BTreeMap<String, Option<(SiteView, usize)>>,
    ) -> Option<Command> {
        let account = self.links.get(&id)?.account.as_ref()?;
        let (mut sites, mut removed, mut size) = (Vec::new(), Vec::new(), 0);
        for name in owed {
            if !views.contains_key(name) {
                let view = match registry.site(name) {
                    Ok(Some(s)) => {
                        let v = SiteView {
                            online: self.sites.contains_key(name),
                            name: s.name,
                            domain: s.domain,
                            agents: s.agents,
                        };
                        let n = serde_json::to_vec(&v).map_or(usize::MAX / 2, |j| j.len() + 1);
                        Some((v, n))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        warn!(error = %e, "inventory changes");
                        return None;
                    }
                };
                views.insert(name.clone(), view);
            }
            match views.get(name) {
                Some(Some((v, n))) if account.may_see(&v.domain) => {
                    size += n;
                    sites.push(v.clone());
                }
                _ => {
                    size += name.len() + 3;
                    removed.push(name.clone());
                }
            }
        }
        (size <= MAX_INVENTORY_JSON).then_some(Command::InventoryChanges {
            link: id,
            sites,
            removed,
        })
    }

    /// Technicians that may see `site` (of `domain`) get an update (coalesced): the site's
    /// change, or their whole inventory.
    fn mark_concerned(&mut self, domain: &str, site: &str, now: Instant) {
        for id in &self.technicians {
            if let Some(l) = self.links.get_mut(id)
                && l.welcomed
                && l.account.as_ref().is_some_and(|a| a.may_see(domain))
            {
                l.owe_site(site);
                self.dirty.insert(*id);
            }
        }
        if !self.dirty.is_empty() {
            self.dirty_since.get_or_insert(now);
        }
    }

    /// A link ended. Ends its sessions and records the disconnection.
    pub fn handle_closed(
        &mut self,
        registry: &mut dyn Registry,
        link: LinkId,
        reason: &CloseReason,
        now: Instant,
    ) -> Vec<Command> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        self.technicians.remove(&link);
        let Some(l) = self.links.remove(&link) else {
            return out;
        };
        self.dirty.remove(&link);
        if let (PeerAuth::Anonymous, CloseReason::Protocol(what)) = (&l.auth, reason) {
            // A malformed or oversized enrollment is a refused enrollment too.
            self.refusals
                .add(l.source.ip(), RefusalKind::Enrollment, what, now);
        }
        let why = match &l.auth {
            PeerAuth::Site(_) => "the site disconnected",
            _ => "the technician disconnected",
        };
        self.end_sessions_of(registry, link, why, Some(link), &mut out);
        if !l.welcomed {
            return out;
        }
        let result = match &l.auth {
            PeerAuth::Site(name) => {
                let (event, text) = match reason {
                    _ if l.switched_off => (
                        "site switched off",
                        format!(
                            "site {name} disconnected: its remote access switch was turned off"
                        ),
                    ),
                    CloseReason::Timeout => (
                        "site heartbeat missed",
                        format!("no heartbeat from site {name} for 3 intervals; disconnected"),
                    ),
                    other => (
                        "site disconnected",
                        format!("site {name} disconnected ({})", describe(other)),
                    ),
                };
                let rec =
                    AuditRecord::new(Actor::Site(name.clone()), site_object(name), event, text);
                if self.sites.get(name) == Some(&link) {
                    self.sites.remove(name);
                    if let Some(d) = &l.domain {
                        self.mark_concerned(d, name, now);
                    }
                    registry.site_disconnected(name, l.switched_off, &rec)
                } else {
                    // Replaced by a newer link: the site stays online.
                    registry.record(&[rec])
                }
            }
            PeerAuth::Technician(name) if l.logged_out => registry.record(&[AuditRecord::new(
                Actor::Account(name.clone()),
                account_object(name),
                "logout",
                format!("{name} logged out"),
            )]),
            PeerAuth::Technician(name) => registry.record(&[AuditRecord::new(
                Actor::Account(name.clone()),
                account_object(name),
                "disconnected",
                format!("{name} disconnected ({})", describe(reason)),
            )]),
            PeerAuth::Anonymous => Ok(()),
        };
        if let Err(e) = result {
            warn!(error = %e, "could not record the disconnection");
        }
        out
    }

    /// The registry changed underneath (CLI, portal): closed accounts and revoked or removed
    /// sites lose their links and sessions, withdrawn grants their sessions, and technicians
    /// get fresh inventories. [`Hub::handle_account_change`], then
    /// [`Hub::handle_site_change`] with the registry's [`Registry::site_serials`].
    pub fn handle_admin_change(
        &mut self,
        registry: &mut dyn Registry,
        now: Instant,
    ) -> Vec<Command> {
        let mut out = self.handle_account_change(registry, now);
        match registry.site_serials() {
            Ok(current) => out.extend(self.handle_site_change(registry, &current, now)),
            Err(e) => warn!(error = %e, "cannot re-check the sites"),
        }
        out
    }

    /// The account half of [`Hub::handle_admin_change`]: closed or re-issued accounts lose
    /// their links, withdrawn grants their sessions; technicians get fresh inventories. A
    /// query per technician link and per session: the server runs it first, so that `account
    /// close` does not wait for the re-check of every site.
    pub fn handle_account_change(
        &mut self,
        registry: &mut dyn Registry,
        now: Instant,
    ) -> Vec<Command> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let ids: Vec<LinkId> = self.technicians.iter().copied().collect();
        for id in ids {
            let Some(l) = self.links.get(&id) else {
                continue;
            };
            let end = match &l.auth {
                PeerAuth::Technician(name) => match registry.account(name) {
                    Ok(Some(a)) if !a.closed && a.serial == l.serial => {
                        if l.welcomed {
                            if let Some(l) = self.links.get_mut(&id) {
                                l.account = Some(a);
                                l.owe_all();
                            }
                            self.dirty.insert(id);
                            self.dirty_since.get_or_insert(now);
                        }
                        None
                    }
                    Ok(Some(a)) if !a.closed => Some((
                        ErrorCode::AccountClosed,
                        "your certificate was replaced: import the new bundle",
                    )),
                    Ok(_) => Some((ErrorCode::AccountClosed, "your account was closed")),
                    Err(e) => {
                        warn!(error = %e, "cannot re-check an account");
                        None
                    }
                },
                PeerAuth::Site(_) | PeerAuth::Anonymous => None,
            };
            if let Some((code, text)) = end {
                info!(
                    link = id,
                    ?code,
                    "ending a link after an administrative change"
                );
                self.end_sessions_of(registry, id, text, Some(id), &mut out);
                out.push(Command::Close {
                    link: id,
                    code,
                    text: text.into(),
                });
            }
        }
        // Sessions whose account lost its grant for the site.
        let sessions: Vec<(u32, String, String)> = self
            .relay
            .all()
            .map(|(id, s)| (*id, s.account.clone(), s.site.clone()))
            .collect();
        for (gsid, account, site) in sessions {
            let visible = match (registry.account(&account), registry.site(&site)) {
                (Ok(Some(a)), Ok(Some(s))) => a.may_see(&s.domain),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, "cannot re-check a grant: ending the session");
                    false
                }
                _ => false,
            };
            if !visible {
                self.end_session(
                    registry,
                    gsid,
                    "access to the site was withdrawn",
                    None,
                    &mut out,
                );
            }
        }
        out
    }

    /// The site half of [`Hub::handle_admin_change`]: a connected site whose certificate is
    /// no longer in `current` (revoked, replaced, or the site removed) loses its link and
    /// sessions. `current` is [`Registry::site_serials`], read before the call (the server
    /// reads it on a connection of its own, without holding the hub).
    pub fn handle_site_change(
        &mut self,
        registry: &mut dyn Registry,
        current: &crate::registry::SiteSerials,
        now: Instant,
    ) -> Vec<Command> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let gone: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| match &l.auth {
                PeerAuth::Site(name) => current.get(name) != Some(&l.serial),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let text = "this site's certificate was revoked or the site removed";
            info!(
                link = id,
                code = ?ErrorCode::UnknownSite,
                "ending a link after an administrative change"
            );
            self.end_sessions_of(registry, id, text, Some(id), &mut out);
            out.push(Command::Close {
                link: id,
                code: ErrorCode::UnknownSite,
                text: text.into(),
            });
        }
        out
    }

    /// When [`Hub::handle_timeout`] has work next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.links.values().filter_map(|l| l.expires).min();
        [
            self.refusals.deadline(),
            self.awaiting.first().map(|(t, _, _)| *t),
            self.dirty_since.map(|t| t + INVENTORY_COALESCE),
            self.seen_flushed.map(|t| t + SEEN_FLUSH),
            expiry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Flushes what is due: aggregated refusals, coalesced inventory updates, last-seen
    /// times; refuses session requests their site left unanswered for [`SESSION_ANSWER`] and
    /// ends that site's link; ends links whose certificate expired.
    pub fn handle_timeout(&mut self, registry: &mut dyn Registry, now: Instant) -> Vec<Command> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        self.unanswered(registry, now, &mut out);
        let records = self.refusals.flush(now);
        if !records.is_empty()
            && let Err(e) = registry.record(&records)
        {
            warn!(error = %e, records = records.len(), "could not record aggregated refusals");
        }
        if self
            .dirty_since
            .is_some_and(|t| now >= t + INVENTORY_COALESCE)
        {
            self.dirty_since = None;
            // Each changed site's view is read once, whatever the technicians it concerns.
            let mut views = BTreeMap::new();
            let mut failed = Vec::new();
            for id in std::mem::take(&mut self.dirty) {
                let Some(l) = self.links.get_mut(&id) else {
                    continue;
                };
                let Some(name) = l.account.as_ref().map(|a| a.name.clone()) else {
                    continue;
                };
                let full = std::mem::replace(&mut l.full_owed, false) || !l.changes;
                let owed = std::mem::take(&mut l.pending);
                if !full && let Some(c) = self.changes_for(registry, id, &owed, &mut views) {
                    out.push(c);
                    continue;
                }
                match self.inventory_of(registry, &name) {
                    Ok(sites) => out.push(Command::Inventory {
                        link: id,
                        sites,
                        update: true,
                    }),
                    Err(e) => {
                        warn!(error = %e, "inventory");
                        failed.push(id);
                    }
                }
            }
            for id in failed {
                self.owe_again(id, now);
            }
        }
        if self.seen_flushed.is_none_or(|t| now >= t + SEEN_FLUSH) {
            self.seen_flushed = Some(now);
            let seen: Vec<String> = std::mem::take(&mut self.seen).into_iter().collect();
            if !seen.is_empty()
                && let Err(e) = registry.sites_seen(&seen)
            {
                warn!(error = %e, "could not write last-seen times");
            }
        }
        let expired: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.expires.is_some_and(|t| now >= t))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(l) = self.links.get_mut(&id) {
                // Closed once: the link's end arrives through `handle_closed`.
                l.expires = None;
            }
            self.end_sessions_of(registry, id, "the certificate expired", Some(id), &mut out);
            out.push(Command::Close {
                link: id,
                code: ErrorCode::AccountClosed,
                text: "your certificate expired".into(),
            });
        }
        out
    }

    /// At shutdown: what is still aggregated is written.
    pub fn handle_shutdown(&mut self, registry: &mut dyn Registry) {
        let records = self.refusals.take();
        if !records.is_empty()
            && let Err(e) = registry.record(&records)
        {
            warn!(error = %e, "could not record aggregated refusals");
        }
        let seen: Vec<String> = std::mem::take(&mut self.seen).into_iter().collect();
        if !seen.is_empty() {
            let _ = registry.sites_seen(&seen);
        }
    }
}

/// What a technician reads when the site did not answer.
fn no_answer(site: &str) -> String {
    format!("{site} does not answer; its connection to the gateway may be broken")
}

fn refused(link: LinkId, session: u32, reason: &str) -> Command {
    Command::Send {
        link,
        message: Box::new(Message::SessionRefused {
            session,
            reason: reason.into(),
        }),
    }
}

#[cfg(test)]
mod tests;
