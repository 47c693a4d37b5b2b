//! The audit log: filters, paging, export, and whether the chain verifies. Gateway
//! administrators and auditors read all of it; a domain administrator the records of its
//! subtree ([`Scope`]).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use rusqlite::params_from_iter;
use serde::Deserialize;

use super::{Nav, render};
use crate::audit::{self, Record, Verdict};
use crate::portal::{Admin, Portal, PortalError};

/// Rows per page.
const PAGE: i64 = 100;

/// Rows in one export at most; a larger log is exported with the CLI.
const EXPORT_MAX: i64 = 1_000_000;

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Filter {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    site: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    page: Option<i64>,
    #[serde(default)]
    format: String,
}

/// The rows a domain administrator reads: `domain:` objects within its domain (by name, so
/// renamed and deleted domains keep their history), and the sites, accounts and
/// administrators it has now.
#[derive(Debug, Clone)]
struct Scope {
    domain: String,
    /// JSON array of object names.
    objects: String,
}

impl Scope {
    fn of(p: &Portal, admin: &Admin) -> Result<Option<Self>, PortalError> {
        let Some(d) = admin.role().audit_scope() else {
            return Ok(None);
        };
        let objects = p.db(|s| s.audit_objects_within(d))?;
        Ok(Some(Self {
            domain: d.to_string(),
            objects: serde_json::to_string(&objects).unwrap_or_else(|_| "[]".into()),
        }))
    }
}

impl Filter {
    /// The WHERE clause and its parameters. Times compare as text (RFC 3339 UTC sorts).
    fn clause(&self, scope: Option<&Scope>) -> (String, Vec<String>) {
        let mut w = Vec::new();
        let mut args = Vec::new();
        let mut add = |sql: &str, v: String| {
            w.push(sql.to_owned());
            args.push(v);
        };
        if let Some(s) = scope {
            // Domain labels hold no `%`, `_` or `\\`: the domain is safe in a LIKE pattern.
            add(
                "(object = 'domain:' || ? OR object LIKE 'domain:' || ? || '.%' OR object IN (SELECT value FROM json_each(?)))",
                s.domain.clone(),
            );
            add("", s.domain.clone());
            add("", s.objects.clone());
        }
        if !self.from.trim().is_empty() {
            add("time >= ?", normalise_time(&self.from));
        }
        if !self.to.trim().is_empty() {
            add("time <= ?", normalise_time(&self.to));
        }
        if !self.actor.trim().is_empty() {
            add(
                "actor LIKE ? ESCAPE '\\'",
                format!("%{}%", like(self.actor.trim())),
            );
        }
        if !self.site.trim().is_empty() {
            add("object = ?", format!("site:{}", self.site.trim()));
        }
        if !self.event.trim().is_empty() {
            add("event = ?", self.event.trim().to_owned());
        }
        w.retain(|c: &String| !c.is_empty());
        let clause = if w.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", w.join(" AND "))
        };
        (clause, args)
    }

    /// The query string of this filter, for paging and export links.
    fn query(&self) -> String {
        serde_urlencoded::to_string([
            ("from", self.from.as_str()),
            ("to", self.to.as_str()),
            ("actor", self.actor.as_str()),
            ("site", self.site.as_str()),
            ("event", self.event.as_str()),
        ])
        .unwrap_or_default()
    }
}

/// A `datetime-local` value (`2026-11-27T10:00`) as the log's RFC 3339 text.
fn normalise_time(s: &str) -> String {
    let s = s.trim();
    if s.len() == 16 {
        format!("{s}:00Z")
    } else {
        s.to_owned()
    }
}

fn like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn rows(
    p: &Portal,
    f: &Filter,
    scope: Option<&Scope>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Record>, i64), PortalError> {
    let (clause, args) = f.clause(scope);
    p.db(|s| {
        let conn = s.conn();
        let total: i64 = conn.query_row(
            &format!("SELECT count(*) FROM audit {clause}"),
            params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(&format!(
            "SELECT id, time, actor, object, event, description, hash FROM audit {clause} ORDER BY id DESC LIMIT {limit} OFFSET {offset}"
        ))?;
        let rows = stmt
            .query_map(params_from_iter(args.iter()), |r| {
                Ok(Record {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    actor: r.get(2)?,
                    object: r.get(3)?,
                    event: r.get(4)?,
                    description: r.get(5)?,
                    hash: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok::<_, rusqlite::Error>((rows, total))
    })
    .map_err(|e| PortalError::Store(e.into()))
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    nav: Nav,
    filter: Filter,
    rows: Vec<Record>,
    total: i64,
    page: i64,
    pages: i64,
    query: String,
    chain: String,
    chain_ok: bool,
    checkpoint: String,
    events: Vec<String>,
}

pub async fn audit(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Query(f): Query<Filter>,
) -> Result<Response, PortalError> {
    let scope = Scope::of(&p, &admin)?;
    let page = f.page.unwrap_or(1).max(1);
    let (rows, total) = rows(&p, &f, scope.as_ref(), PAGE, (page - 1) * PAGE)?;
    let (chain, chain_ok) = match p.db(|s| audit::verify(s.conn())) {
        Ok(Verdict::Intact { rows }) => (format!("intact: {rows} rows verified"), true),
        Ok(Verdict::Broken { row, why }) => {
            (format!("TAMPERED: first bad row is {row}: {why}"), false)
        }
        Err(e) => (format!("could not be checked: {e}"), false),
    };
    let checkpoint = p
        .db(|s| {
            s.conn().query_row(
                "SELECT time FROM audit WHERE event = ?1 ORDER BY id DESC LIMIT 1",
                [audit::CHECKPOINT_EVENT],
                |r| r.get::<_, String>(0),
            )
        })
        .unwrap_or_else(|_| "none yet".into());
    let events = p
        .db(|s| -> rusqlite::Result<Vec<String>> {
            let mut stmt = s
                .conn()
                .prepare("SELECT DISTINCT event FROM audit ORDER BY event")?;
            let v = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(v)
        })
        .unwrap_or_default();
    Ok(render(&AuditPage {
        nav: Nav::new(&admin, "audit"),
        query: f.query(),
        pages: ((total + PAGE - 1) / PAGE).max(1),
        filter: f,
        rows,
        total,
        page,
        chain,
        chain_ok,
        checkpoint,
        events,
    }))
}

pub async fn export(
    State(p): State<Arc<Portal>>,
    admin: Admin,
    Query(f): Query<Filter>,
) -> Result<Response, PortalError> {
    let scope = Scope::of(&p, &admin)?;
    let (mut rows, _) = rows(&p, &f, scope.as_ref(), EXPORT_MAX, 0)?;
    rows.reverse();
    let (body, kind, ext) = match f.format.as_str() {
        "jsonl" => {
            let mut out = String::new();
            for r in &rows {
                out.push_str(&serde_json::to_string(r).unwrap_or_default());
                out.push('\n');
            }
            (out, "application/x-ndjson", "jsonl")
        }
        "csv" => {
            let mut out = String::from("id,time,actor,object,event,description,hash\n");
            for r in &rows {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{}\n",
                    r.id,
                    audit::csv_field(&r.time),
                    audit::csv_field(&r.actor),
                    audit::csv_field(&r.object),
                    audit::csv_field(&r.event),
                    audit::csv_field(&r.description),
                    hex::encode(&r.hash)
                ));
            }
            (out, "text/csv; charset=utf-8", "csv")
        }
        _ => return Err(PortalError::Invalid("format must be csv or jsonl".into())),
    };
    p.db(|s| {
        s.record(
            &admin.actor(),
            "audit",
            "audit exported",
            &format!(
                "{} rows{} exported as {ext} by {}",
                rows.len(),
                scope
                    .as_ref()
                    .map(|s| format!(" of domain {}", s.domain))
                    .unwrap_or_default(),
                admin.actor()
            ),
        )
    })?;
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"audit.{ext}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}
