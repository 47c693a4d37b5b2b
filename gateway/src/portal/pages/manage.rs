//! Dashboard, accounts, domains, access and sites: each handler loads its object, checks the
//! object's domain against the administrator's role, then acts through the store (or the
//! hub, for live sessions).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use askama::Template;
use axum::Form;
use axum::extract::{Extension, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{Nav, render};
use crate::portal::session::{BUNDLE_TTL, PendingBundle};
use crate::portal::{Admin, EndOutcome, Portal, PortalError, Sid};
use crate::store::{AccountRow, DomainPath, SiteRow, within};

type Result<T> = std::result::Result<T, PortalError>;

fn parse_domain(s: &str) -> Result<DomainPath> {
    s.trim()
        .parse()
        .map_err(|e: crate::store::StoreError| PortalError::Invalid(e.to_string()))
}

/// The site and its domain, if the administrator may see it (403 otherwise, 404 if absent).
fn site_for(p: &Portal, admin: &Admin, name: &str, write: bool) -> Result<SiteRow> {
    let site = p
        .db(|s| s.sites())?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| PortalError::NotFound(format!("site {name} not found")))?;
    let ok = if write {
        admin.role().may_write(Some(&site.domain))
    } else {
        admin.role().may_read(Some(&site.domain))
    };
    if ok {
        Ok(site)
    } else {
        Err(PortalError::Forbidden)
    }
}

/// The account's home domain, if the administrator may change the account.
fn account_for_write(p: &Portal, admin: &Admin, name: &str) -> Result<Option<String>> {
    if p.db(|s| s.account(name))?.is_none() {
        // Nothing to hide from a gateway administrator; others learn nothing either way.
        return Err(if admin.role().is_gateway() {
            PortalError::NotFound(format!("account {name} not found"))
        } else {
            PortalError::Forbidden
        });
    }
    let domain = p.db(|s| s.account_domain(name))?;
    if admin.role().may_write(domain.as_deref()) {
        Ok(domain)
    } else {
        Err(PortalError::Forbidden)
    }
}

/// Certificates expiring within this many days are warned about (accounts page, dashboard):
/// a month leaves time to hand a technician a re-issued bundle.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// An account certificate's expiry as the pages show it: the date, and whether (and how) to
/// warn. `None`: not recorded (accounts older than the column).
fn expiry_view(expires: Option<&str>, now: time::OffsetDateTime) -> (String, Option<String>) {
    let Some(text) = expires else {
        return ("unknown".into(), None);
    };
    let Ok(at) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    else {
        return (text.to_owned(), None);
    };
    let date = text.get(..10).unwrap_or(text).to_owned();
    let left = at - now;
    if left <= time::Duration::ZERO {
        return (date, Some("expired".into()));
    }
    // Whole days, rounded up: a certificate valid 20 days from now shows "in 20 days".
    let days = (left.whole_seconds() + 86_399) / 86_400;
    if days <= EXPIRY_WARNING_DAYS {
        (
            date,
            Some(format!("in {}", plural(days as usize, "day", "days"))),
        )
    } else {
        (date, None)
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_age(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

struct SessionView {
    id: u32,
    account: String,
    site: String,
    agents: String,
    age: String,
    up: String,
    down: String,
    may_end: bool,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    nav: Nav,
    online: Vec<SiteRow>,
    offline: Vec<SiteRow>,
    sessions: Vec<SessionView>,
    /// Open accounts whose certificate expires within [`EXPIRY_WARNING_DAYS`]: "bob (in 20 days)".
    expiring: Vec<String>,
}

pub async fn dashboard(State(p): State<Arc<Portal>>, admin: Admin) -> Result<Response> {
    let sites: Vec<SiteRow> = p
        .db(|s| s.sites())?
        .into_iter()
        .filter(|s| admin.role().may_read(Some(&s.domain)))
        .collect();
    let domain_of: BTreeMap<String, String> = sites
        .iter()
        .map(|s| (s.name.clone(), s.domain.clone()))
        .collect();
    let sessions = p
        .live
        .sessions()
        .into_iter()
        .filter_map(|s| {
            let d = domain_of.get(&s.site)?;
            Some(SessionView {
                id: s.id,
                may_end: admin.role().may_write(Some(d)),
                agents: s.agents.join(", "),
                account: s.account,
                site: s.site,
                age: human_age(s.age),
                up: human_bytes(s.up),
                down: human_bytes(s.down),
            })
        })
        .collect();
    let now = time::OffsetDateTime::now_utc();
    let mut expiring = Vec::new();
    for a in p.db(|s| s.accounts())? {
        if a.closed.is_some() {
            continue;
        }
        let home = p.db(|s| s.account_domain(&a.name))?;
        if !admin.role().may_read(home.as_deref()) {
            continue;
        }
        if let (_, Some(warn)) = expiry_view(a.expires.as_deref(), now) {
            expiring.push(format!("{} ({warn})", a.name));
        }
    }
    let (online, offline) = sites.into_iter().partition(|s| s.online);
    Ok(render(&Dashboard {
        nav: Nav::new(&admin, "dashboard"),
        online,
        offline,
        sessions,
        expiring,
    }))
}

#[derive(Deserialize)]
pub struct SessionForm {
    session: u32,
}

pub async fn end_session(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<SessionForm>,
) -> Result<Response> {
    let role = admin.role().clone();
    match p
        .live
        .end_session(f.session, &admin.actor(), &|d| role.may_write(d))
    {
        EndOutcome::Ended => Ok(Redirect::to("/").into_response()),
        EndOutcome::NotOpen => Err(PortalError::NotFound(format!(
            "session {} is not open (any more)",
            f.session
        ))),
        EndOutcome::Forbidden => Err(PortalError::Forbidden),
        EndOutcome::Failed(e) => Err(PortalError::Invalid(format!(
            "the session was not ended: {e}"
        ))),
    }
}

struct AccountView {
    row: AccountRow,
    domain: String,
    may_write: bool,
    expires: String,
    /// "in 20 days", "expired": shown highlighted.
    warning: Option<String>,
}

#[derive(Template)]
#[template(path = "accounts.html")]
struct AccountsPage {
    nav: Nav,
    accounts: Vec<AccountView>,
    /// Domains the administrator may create accounts in.
    domains: Vec<String>,
    gateway: bool,
}

fn writable_domains(p: &Portal, admin: &Admin) -> Result<Vec<String>> {
    Ok(p.db(|s| s.domains())?
        .into_iter()
        .filter(|d| admin.role().may_write(Some(d)))
        .collect())
}

pub async fn accounts(State(p): State<Arc<Portal>>, admin: Admin) -> Result<Response> {
    let rows = p.db(|s| s.accounts())?;
    let now = time::OffsetDateTime::now_utc();
    let mut accounts = Vec::new();
    for row in rows {
        let domain = p.db(|s| s.account_domain(&row.name))?;
        if admin.role().may_read(domain.as_deref()) {
            let (expires, warning) = expiry_view(row.expires.as_deref(), now);
            accounts.push(AccountView {
                expires,
                warning: warning.filter(|_| row.closed.is_none()),
                may_write: admin.role().may_write(domain.as_deref()) && row.closed.is_none(),
                domain: domain.unwrap_or_default(),
                row,
            });
        }
    }
    Ok(render(&AccountsPage {
        nav: Nav::new(&admin, "accounts"),
        accounts,
        domains: writable_domains(&p, &admin)?,
        gateway: admin.role().is_gateway(),
    }))
}

#[derive(Deserialize)]
pub struct CreateAccountForm {
    name: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    days: Option<i64>,
}

/// The page that shows a new bundle's password once and offers its download once.
#[derive(Template)]
#[template(path = "account_created.html")]
struct AccountCreated {
    nav: Nav,
    heading: String,
    detail: String,
    name: String,
    password: String,
    token: String,
}

/// Keeps `p12` for one download by this session; returns the download token.
fn hold_bundle(
    p: &Portal,
    sid: &Sid,
    account: &str,
    p12: zeroize::Zeroizing<Vec<u8>>,
) -> Result<String> {
    let token = hex::encode(pinhole_certs::random::<16>());
    let now = Instant::now();
    let mut s = p.sessions();
    let Some(sess) = sid.0.as_ref().and_then(|id| s.get(id, now)) else {
        return Err(PortalError::Invalid("session ended".into()));
    };
    sess.bundles.insert(
        token.clone(),
        PendingBundle {
            account: account.to_owned(),
            p12,
            expires: now + BUNDLE_TTL,
        },
    );
    Ok(token)
}

fn check_days(days: Option<i64>) -> Result<i64> {
    let days = days.unwrap_or(pinhole_certs::ca::DEFAULT_TECHNICIAN_DAYS);
    if (1..=3650).contains(&days) {
        Ok(days)
    } else {
        Err(PortalError::Invalid(
            "validity must be 1 to 3650 days".into(),
        ))
    }
}

pub async fn create_account(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    admin: Admin,
    Form(f): Form<CreateAccountForm>,
) -> Result<Response> {
    let name = f.name.trim().to_owned();
    let domain = if f.domain.trim().is_empty() {
        None
    } else {
        Some(parse_domain(&f.domain)?)
    };
    if !admin
        .role()
        .may_write(domain.as_ref().map(DomainPath::as_str))
    {
        return Err(PortalError::Forbidden);
    }
    pinhole_certs::ca::check_name(&name).map_err(|e| PortalError::Invalid(e.to_string()))?;
    let days = check_days(f.days)?;
    if p.db(|s| s.account(&name))?.is_some() {
        return Err(PortalError::Invalid(format!(
            "account {name} already exists"
        )));
    }
    let bundle = tokio::task::block_in_place(|| p.bundles.issue(&name, days))
        .map_err(PortalError::Invalid)?;
    let actor = admin.actor();
    let ip = p.db(|s| match &domain {
        Some(d) => s.create_account_in(&actor, &name, &bundle.serial, days, d),
        None => s.create_account(&actor, &name, &bundle.serial, days),
    })?;
    let token = hold_bundle(&p, &sid, &name, bundle.p12)?;
    Ok(render(&AccountCreated {
        nav: Nav::new(&admin, "accounts"),
        heading: format!("Account {name} created"),
        detail: format!("Tunnel address {ip}."),
        name,
        password: bundle.password.to_string(),
        token,
    }))
}

#[derive(Deserialize)]
pub struct ReissueForm {
    name: String,
    #[serde(default)]
    days: Option<i64>,
    #[serde(default)]
    confirm: String,
}

/// A new bundle for an open account; its old certificate is revoked in the same transaction,
/// so the running server ends the old bundle's link at once.
pub async fn reissue_account(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    admin: Admin,
    Form(f): Form<ReissueForm>,
) -> Result<Response> {
    account_for_write(&p, &admin, &f.name)?;
    let days = check_days(f.days)?;
    if f.confirm != "yes" {
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "accounts"),
            question: format!(
                "Re-issue the bundle of {}? Its current certificate is revoked at once (its live sessions end); the new bundle is valid {days} days.",
                f.name
            ),
            action: "/accounts/reissue",
            fields: vec![("name", f.name.clone()), ("days", days.to_string())],
            button: format!("Re-issue the bundle of {}", f.name),
            back: "/accounts",
        }));
    }
    match p.db(|s| s.account(&f.name))? {
        Some(a) if a.closed.is_none() => {}
        _ => {
            return Err(PortalError::Invalid(format!(
                "account {} is closed: it gets no new bundle",
                f.name
            )));
        }
    }
    let bundle = tokio::task::block_in_place(|| p.bundles.issue(&f.name, days))
        .map_err(PortalError::Invalid)?;
    p.db(|s| s.reissue_account(&admin.actor(), &f.name, &bundle.serial, days))?;
    let token = hold_bundle(&p, &sid, &f.name, bundle.p12)?;
    Ok(render(&AccountCreated {
        nav: Nav::new(&admin, "accounts"),
        heading: format!("Bundle of {} re-issued", f.name),
        detail: format!(
            "The previous certificate is revoked. The new one is valid {}.",
            plural(days as usize, "day", "days")
        ),
        name: f.name,
        password: bundle.password.to_string(),
        token,
    }))
}

#[derive(Deserialize)]
pub struct BundleForm {
    token: String,
}

pub async fn download_bundle(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    admin: Admin,
    Form(f): Form<BundleForm>,
) -> Result<Response> {
    let bundle = {
        let mut s = p.sessions();
        sid.0
            .as_ref()
            .and_then(|id| s.get(id, Instant::now()))
            .and_then(|sess| sess.bundles.remove(&f.token))
    };
    let Some(b) = bundle else {
        return Err(PortalError::NotFound(
            "this bundle was downloaded already or has expired; re-issue it from the accounts page"
                .into(),
        ));
    };
    let account = b.account.clone();
    p.db(|s| {
        s.record(
            &admin.actor(),
            &format!("account:{account}"),
            "account bundle downloaded",
            &format!(
                "bundle of account {account} downloaded by {}",
                admin.actor()
            ),
        )
    })?;
    let mut r = b.p12.to_vec().into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pkcs12"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{account}.p12\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[derive(Deserialize)]
pub struct NameForm {
    name: String,
    #[serde(default)]
    confirm: String,
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct ConfirmPage {
    nav: Nav,
    question: String,
    action: &'static str,
    fields: Vec<(&'static str, String)>,
    button: String,
    back: &'static str,
}

impl ConfirmPage {
    fn csrf(&self) -> String {
        self.nav.csrf(self.action)
    }
}

pub async fn close_account(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<NameForm>,
) -> Result<Response> {
    account_for_write(&p, &admin, &f.name)?;
    if f.confirm != "yes" {
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "accounts"),
            question: format!(
                "Close account {}? Its certificate is revoked and its live sessions end at once.",
                f.name
            ),
            action: "/accounts/close",
            fields: vec![("name", f.name.clone())],
            button: format!("Close account {}", f.name),
            back: "/accounts",
        }));
    }
    p.db(|s| s.close_account(&admin.actor(), &f.name))?;
    Ok(Redirect::to("/accounts").into_response())
}

struct DomainNode {
    name: String,
    /// The last label, which a rename changes.
    label: String,
    depth: usize,
    sites: Vec<SiteRow>,
    may_write: bool,
    /// Rename and delete.
    may_manage: bool,
}

#[derive(Template)]
#[template(path = "domains.html")]
struct DomainsPage {
    nav: Nav,
    tree: Vec<DomainNode>,
    movable: Vec<String>,
    writable: Vec<String>,
}

pub async fn domains(State(p): State<Arc<Portal>>, admin: Admin) -> Result<Response> {
    let sites = p.db(|s| s.sites())?;
    let tree: Vec<DomainNode> = p
        .db(|s| s.domains())?
        .into_iter()
        .filter(|d| admin.role().may_read(Some(d)))
        .map(|d| DomainNode {
            depth: d.matches('.').count(),
            sites: sites.iter().filter(|s| s.domain == d).cloned().collect(),
            may_write: admin.role().may_write(Some(&d)),
            may_manage: admin.role().may_manage_domain(&d),
            label: d.rsplit('.').next().unwrap_or(&d).to_owned(),
            name: d,
        })
        .collect();
    let movable = sites
        .iter()
        .filter(|s| admin.role().may_write(Some(&s.domain)))
        .map(|s| s.name.clone())
        .collect();
    Ok(render(&DomainsPage {
        nav: Nav::new(&admin, "domains"),
        writable: tree
            .iter()
            .filter(|d| d.may_write)
            .map(|d| d.name.clone())
            .collect(),
        tree,
        movable,
    }))
}

#[derive(Deserialize)]
pub struct DomainForm {
    domain: String,
}

pub async fn create_domain(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<DomainForm>,
) -> Result<Response> {
    let d = parse_domain(&f.domain)?;
    if !admin.role().may_write(Some(d.as_str())) {
        return Err(PortalError::Forbidden);
    }
    p.db(|s| s.create_domain(&admin.actor(), &d))?;
    Ok(Redirect::to("/domains").into_response())
}

#[derive(Deserialize)]
pub struct RenameForm {
    domain: String,
    /// The new last label.
    name: String,
}

pub async fn rename_domain(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<RenameForm>,
) -> Result<Response> {
    let from = parse_domain(&f.domain)?;
    if !admin.role().may_manage_domain(from.as_str()) {
        return Err(PortalError::Forbidden);
    }
    let label = f.name.trim();
    if label.contains('.') {
        return Err(PortalError::Invalid(format!(
            "`{label}` is not one label: a rename keeps the domain under its parent"
        )));
    }
    let to = match from.as_str().rsplit_once('.') {
        Some((parent, _)) => parse_domain(&format!("{parent}.{label}"))?,
        None => parse_domain(label)?,
    };
    if !admin.role().may_manage_domain(to.as_str()) {
        return Err(PortalError::Forbidden);
    }
    p.db(|s| s.rename_domain(&admin.actor(), &from, &to))?;
    Ok(Redirect::to("/domains").into_response())
}

pub async fn delete_domain(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<ConfirmDomainForm>,
) -> Result<Response> {
    let d = parse_domain(&f.domain)?;
    if !admin.role().may_manage_domain(d.as_str()) {
        return Err(PortalError::Forbidden);
    }
    if f.confirm != "yes" {
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "domains"),
            question: format!(
                "Delete domain {d}? Only an empty domain can be deleted (no subdomain, site, grant, account or administrator in it)."
            ),
            action: "/domains/delete",
            fields: vec![("domain", d.to_string())],
            button: format!("Delete domain {d}"),
            back: "/domains",
        }));
    }
    p.db(|s| s.delete_domain(&admin.actor(), &d))?;
    Ok(Redirect::to("/domains").into_response())
}

#[derive(Deserialize)]
pub struct ConfirmDomainForm {
    domain: String,
    #[serde(default)]
    confirm: String,
}

#[derive(Deserialize)]
pub struct MoveForm {
    site: String,
    domain: String,
}

pub async fn move_site(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<MoveForm>,
) -> Result<Response> {
    site_for(&p, &admin, &f.site, true)?;
    let d = parse_domain(&f.domain)?;
    if !admin.role().may_write(Some(d.as_str())) {
        return Err(PortalError::Forbidden);
    }
    p.db(|s| s.move_site(&admin.actor(), &f.site, &d))?;
    Ok(Redirect::to("/domains").into_response())
}

/// One cell of the access matrix.
struct Cell {
    domain: String,
    /// "granted", "inherited from X" or "".
    state: String,
    direct: bool,
}

struct AccessRow {
    account: String,
    cells: Vec<Cell>,
    /// One per column of the site matrix: through which grant the account reaches the site
    /// (always inherited from a domain: sites are granted through their domains), or "".
    site_cells: Vec<String>,
    reach: String,
    may_write: bool,
}

/// A column of the site matrix: a site the administrator may see, and its agents.
struct SiteColumn {
    name: String,
    domain: String,
    agents: Vec<String>,
}

#[derive(Template)]
#[template(path = "access.html")]
struct AccessPage {
    nav: Nav,
    domains: Vec<String>,
    site_columns: Vec<SiteColumn>,
    rows: Vec<AccessRow>,
    grantable_accounts: Vec<String>,
    grantable_domains: Vec<String>,
}

/// What a set of grants opens: (devices, sites).
fn reach(grants: &[String], sites: &[SiteRow]) -> (usize, usize) {
    let open: Vec<&SiteRow> = sites
        .iter()
        .filter(|s| s.revoked.is_none() && grants.iter().any(|g| within(&s.domain, g)))
        .collect();
    (open.iter().map(|s| s.agents.len()).sum(), open.len())
}

/// Exactly what a grant of `grant` opens: "plant-a (plc, hmi); plant-b (drive)", in site
/// order, revoked sites left out.
fn opened(grant: &str, sites: &[SiteRow]) -> String {
    let parts: Vec<String> = sites
        .iter()
        .filter(|s| s.revoked.is_none() && within(&s.domain, grant))
        .map(|s| {
            let agents: Vec<&str> = s.agents.iter().map(|a| a.name.as_str()).collect();
            if agents.is_empty() {
                format!("{} (no devices yet)", s.name)
            } else {
                format!("{} ({})", s.name, agents.join(", "))
            }
        })
        .collect();
    parts.join("; ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub async fn access(State(p): State<Arc<Portal>>, admin: Admin) -> Result<Response> {
    let sites = p.db(|s| s.sites())?;
    let domains: Vec<String> = p
        .db(|s| s.domains())?
        .into_iter()
        .filter(|d| admin.role().may_read(Some(d)))
        .collect();
    let visible: Vec<&SiteRow> = sites
        .iter()
        .filter(|s| s.revoked.is_none() && admin.role().may_read(Some(&s.domain)))
        .collect();
    let mut rows = Vec::new();
    for a in p.db(|s| s.accounts())? {
        let home = p.db(|s| s.account_domain(&a.name))?;
        if a.closed.is_some() || !admin.role().may_read(home.as_deref()) {
            continue;
        }
        let cells = domains
            .iter()
            .map(|d| {
                let direct = a.grants.contains(d);
                let parent = a.grants.iter().find(|g| *g != d && within(d, g));
                Cell {
                    domain: d.clone(),
                    state: match (direct, parent) {
                        (true, _) => "granted".into(),
                        (false, Some(g)) => format!("inherited from {g}"),
                        _ => String::new(),
                    },
                    direct,
                }
            })
            .collect();
        let site_cells = visible
            .iter()
            .map(|s| {
                a.grants
                    .iter()
                    .find(|g| within(&s.domain, g))
                    .map(|g| format!("inherited from {g}"))
                    .unwrap_or_default()
            })
            .collect();
        let (devices, n) = reach(&a.grants, &sites);
        rows.push(AccessRow {
            site_cells,
            may_write: admin.role().may_write(home.as_deref()),
            reach: format!(
                "{} at {}",
                plural(devices, "device", "devices"),
                plural(n, "site", "sites")
            ),
            account: a.name,
            cells,
        });
    }
    Ok(render(&AccessPage {
        nav: Nav::new(&admin, "access"),
        grantable_accounts: rows
            .iter()
            .filter(|r| r.may_write)
            .map(|r| r.account.clone())
            .collect(),
        grantable_domains: domains
            .iter()
            .filter(|d| admin.role().may_write(Some(d)))
            .cloned()
            .collect(),
        domains,
        site_columns: visible
            .iter()
            .map(|s| SiteColumn {
                name: s.name.clone(),
                domain: s.domain.clone(),
                agents: s.agents.iter().map(|a| a.name.clone()).collect(),
            })
            .collect(),
        rows,
    }))
}

#[derive(Deserialize)]
pub struct GrantForm {
    account: String,
    domain: String,
    #[serde(default)]
    confirm: String,
}

fn check_grant(p: &Portal, admin: &Admin, f: &GrantForm) -> Result<DomainPath> {
    account_for_write(p, admin, &f.account)?;
    let d = parse_domain(&f.domain)?;
    if !admin.role().may_write(Some(d.as_str())) {
        return Err(PortalError::Forbidden);
    }
    Ok(d)
}

pub async fn grant(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<GrantForm>,
) -> Result<Response> {
    let d = check_grant(&p, &admin, &f)?;
    if f.confirm != "yes" {
        let sites = p.db(|s| s.sites())?;
        let now_grants = p
            .db(|s| s.account(&f.account))?
            .map(|a| a.grants)
            .unwrap_or_default();
        let (before_dev, before_sites) = reach(&now_grants, &sites);
        let mut after = now_grants.clone();
        after.push(d.to_string());
        let (dev, n) = reach(&after, &sites);
        let (only_dev, only_sites) = reach(&[d.to_string()], &sites);
        let list = opened(d.as_str(), &sites);
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "access"),
            question: format!(
                "Grant {d} to {}? This gives {} {} at {} (in {d} and below{}); {} can then reach {} at {} in all (now {} at {}).",
                f.account,
                f.account,
                plural(only_dev, "device", "devices"),
                plural(only_sites, "site", "sites"),
                if list.is_empty() {
                    String::new()
                } else {
                    format!(": {list}")
                },
                f.account,
                plural(dev, "device", "devices"),
                plural(n, "site", "sites"),
                plural(before_dev, "device", "devices"),
                plural(before_sites, "site", "sites"),
            ),
            action: "/access/grant",
            fields: vec![("account", f.account.clone()), ("domain", d.to_string())],
            button: format!("Grant {d} to {}", f.account),
            back: "/access",
        }));
    }
    p.db(|s| s.set_grant(&admin.actor(), &f.account, &d, true))?;
    Ok(Redirect::to("/access").into_response())
}

pub async fn ungrant(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<GrantForm>,
) -> Result<Response> {
    let d = check_grant(&p, &admin, &f)?;
    p.db(|s| s.set_grant(&admin.actor(), &f.account, &d, false))?;
    Ok(Redirect::to("/access").into_response())
}

struct SiteView {
    row: SiteRow,
    agents: Vec<String>,
    may_write: bool,
    /// Open sessions: the site's "remote access active" output is lit while there is one.
    sessions: usize,
}

#[derive(Template)]
#[template(path = "sites.html")]
struct SitesPage {
    nav: Nav,
    sites: Vec<SiteView>,
}

pub async fn sites(State(p): State<Arc<Portal>>, admin: Admin) -> Result<Response> {
    let live = p.live.sessions();
    let sites = p
        .db(|s| s.sites())?
        .into_iter()
        .filter(|s| admin.role().may_read(Some(&s.domain)))
        .map(|s| SiteView {
            agents: s
                .agents
                .iter()
                .map(|a| {
                    format!(
                        "{} ({:?}, {} {})",
                        a.name,
                        a.kind,
                        a.address,
                        a.ports_text()
                    )
                })
                .collect(),
            may_write: admin.role().may_write(Some(&s.domain)),
            sessions: live.iter().filter(|l| l.site == s.name).count(),
            row: s,
        })
        .collect();
    Ok(render(&SitesPage {
        nav: Nav::new(&admin, "sites"),
        sites,
    }))
}

pub async fn revoke_site(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<NameForm>,
) -> Result<Response> {
    site_for(&p, &admin, &f.name, true)?;
    if f.confirm != "yes" {
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "sites"),
            question: format!(
                "Revoke site {}? Its certificate is refused from now on and its link ends.",
                f.name
            ),
            action: "/sites/revoke",
            fields: vec![("name", f.name.clone())],
            button: format!("Revoke site {}", f.name),
            back: "/sites",
        }));
    }
    p.db(|s| s.revoke_site(&admin.actor(), &f.name))?;
    Ok(Redirect::to("/sites").into_response())
}

pub async fn remove_site(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Form(f): Form<NameForm>,
) -> Result<Response> {
    site_for(&p, &admin, &f.name, true)?;
    if f.confirm != "yes" {
        return Ok(render(&ConfirmPage {
            nav: Nav::new(&admin, "sites"),
            question: format!(
                "Remove site {}? Its certificate is revoked and the site deleted; enrolling it again takes a new token.",
                f.name
            ),
            action: "/sites/remove",
            fields: vec![("name", f.name.clone())],
            button: format!("Remove site {}", f.name),
            back: "/sites",
        }));
    }
    p.db(|s| s.remove_site(&admin.actor(), &f.name))?;
    Ok(Redirect::to("/sites").into_response())
}
