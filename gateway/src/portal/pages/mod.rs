//! The portal's routes and pages. Every page is server-rendered; forms post to fixed paths
//! with the object in a field, so a form's CSRF token is bound to its action.

mod audit;
mod auth;
mod manage;

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};

use super::session::CsrfSigner;
use super::{Admin, Portal};

/// Every route, with what it needs.
///
/// | route | method | who |
/// |---|---|---|
/// | `/login`, `/login/totp`, `/login/password`, `/login/enroll` | GET, POST | the login in progress |
/// | `/logout` | POST | logged in |
/// | `/` | GET | any role; sites and sessions of its domains |
/// | `/sessions/end` | POST | writer of the session's site |
/// | `/accounts` | GET | any role; accounts of its domains |
/// | `/accounts/create`, `/accounts/close`, `/accounts/reissue` | POST | writer of the account's domain |
/// | `/accounts/bundle` | POST | the session that created or re-issued the bundle, once |
/// | `/domains` | GET | any role |
/// | `/domains/create`, `/sites/move` | POST | writer of the domain (both domains for a move) |
/// | `/domains/rename`, `/domains/delete` | POST | gateway administrator; a domain administrator below its own domain |
/// | `/access` | GET | any role |
/// | `/access/grant`, `/access/ungrant` | POST | writer of the account's and the granted domain |
/// | `/sites` | GET | any role |
/// | `/sites/revoke`, `/sites/remove` | POST | writer of the site's domain |
/// | `/audit`, `/audit/export` | GET | gateway administrator, auditor: all; domain administrator: its subtree |
/// | `/static/*` | GET | anyone (the stylesheet and script, from the binary) |
pub fn routes() -> Router<Arc<Portal>> {
    Router::new()
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/login/totp", get(auth::totp_page).post(auth::totp))
        .route(
            "/login/password",
            get(auth::password_page).post(auth::password),
        )
        .route("/login/enroll", get(auth::enroll_page).post(auth::enroll))
        .route("/logout", post(auth::logout))
        .route("/", get(manage::dashboard))
        .route("/sessions/end", post(manage::end_session))
        .route("/accounts", get(manage::accounts))
        .route("/accounts/create", post(manage::create_account))
        .route("/accounts/close", post(manage::close_account))
        .route("/accounts/bundle", post(manage::download_bundle))
        .route("/accounts/reissue", post(manage::reissue_account))
        .route("/domains", get(manage::domains))
        .route("/domains/create", post(manage::create_domain))
        .route("/domains/rename", post(manage::rename_domain))
        .route("/domains/delete", post(manage::delete_domain))
        .route("/sites/move", post(manage::move_site))
        .route("/access", get(manage::access))
        .route("/access/grant", post(manage::grant))
        .route("/access/ungrant", post(manage::ungrant))
        .route("/sites", get(manage::sites))
        .route("/sites/revoke", post(manage::revoke_site))
        .route("/sites/remove", post(manage::remove_site))
        .route("/audit", get(audit::audit))
        .route("/audit/export", get(audit::export))
        .route("/static/portal.css", get(css))
        .route("/static/portal.js", get(js))
}

/// Every GET route that needs a login, for the route scan in the tests.
#[cfg(test)]
pub const PROTECTED_GETS: &[&str] = &[
    "/",
    "/accounts",
    "/domains",
    "/access",
    "/sites",
    "/audit",
    "/audit/export?format=csv",
];

/// Every POST route, for the route scan in the tests.
#[cfg(test)]
pub const POSTS: &[&str] = &[
    "/login",
    "/login/totp",
    "/login/password",
    "/login/enroll",
    "/logout",
    "/sessions/end",
    "/accounts/create",
    "/accounts/close",
    "/accounts/bundle",
    "/accounts/reissue",
    "/domains/create",
    "/domains/rename",
    "/domains/delete",
    "/sites/move",
    "/access/grant",
    "/access/ungrant",
    "/sites/revoke",
    "/sites/remove",
];

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../static/portal.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("../static/portal.js"),
    )
        .into_response()
}

/// What the layout needs: who is logged in, and CSRF tokens for the page's forms.
#[derive(Debug, Clone)]
pub struct Nav {
    pub name: String,
    pub role: String,
    pub audit: bool,
    pub writer: bool,
    pub here: &'static str,
    csrf: CsrfSigner,
}

impl Nav {
    pub fn new(admin: &Admin, here: &'static str) -> Self {
        Self {
            name: admin.who.name.clone(),
            role: admin.who.role.to_string(),
            // Every role reads the audit log, a domain administrator its subtree's part.
            audit: true,
            writer: !matches!(admin.who.role, super::authz::AdminRole::Auditor),
            here,
            csrf: admin.csrf.clone(),
        }
    }

    /// The CSRF token of the form posting to `action`.
    pub fn csrf(&self, action: &str) -> String {
        self.csrf.token(action)
    }

    /// `aria-current` for the navigation link of `page`.
    pub fn current(&self, page: &str) -> &'static str {
        if self.here == page { "page" } else { "false" }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    title: &'a str,
    text: &'a str,
}

/// A page with one message (errors, refusals).
pub fn message_page(status: StatusCode, text: &str) -> Html<String> {
    let title = status.canonical_reason().unwrap_or("Error");
    Html(
        MessagePage { title, text }
            .render()
            .unwrap_or_else(|_| "error".into()),
    )
}

/// Renders a template, or says why not.
fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "portal: template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error").into_response()
        }
    }
}

fn render_status(status: StatusCode, t: &impl Template) -> Response {
    let mut r = render(t);
    if r.status() == StatusCode::OK {
        *r.status_mut() = status;
    }
    r
}
