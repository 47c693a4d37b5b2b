//! The admin portal: HTTPS, server-rendered pages, two-factor login.
//!
//! What it is for: administrators in a browser manage what the CLI manages (accounts and
//! their bundles, domains, grants, sites), watch and end live sessions, and read and export
//! the audit log. It acts through the same [`Store`] methods as the CLI, so every change is
//! audited in its own transaction and reaches live links through the server's watcher and
//! [`crate::hub::Hub::handle_admin_change`]; ending a live session goes through the hub
//! ([`Live`]).
//!
//! How a request is handled: [`guard::guard`] checks the Host header, the origin of every
//! state-changing request and its CSRF token, and sets the security headers on every
//! response; the [`Admin`] extractor requires a complete login and reloads the role from the
//! database; each handler then checks its object's domain against the role
//! ([`authz::AdminRole`]) before it reads or changes anything.
//!
//! Must never: serve anything from outside the binary (no CDN: gateways often run without
//! internet), run inline script, log or store a secret in clear (passwords, TOTP codes,
//! bundle passwords, session ids), or act on a request it has not authorised per object.

pub mod admins;
pub mod authz;
mod changes;
mod guard;
pub mod lockout;
mod pages;
pub mod session;
pub mod tls;
pub mod totp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use crate::audit::Actor;
use crate::hub::LiveSession;
use crate::store::{Store, StoreError};
use authz::AdminRole;
use session::{SessionId, Sessions, Who};

/// Live state the portal shows and acts on: the running server's hub.
pub trait Live: Send + Sync {
    /// Every open session.
    fn sessions(&self) -> Vec<LiveSession>;
    /// Ends session `id` if `allowed` says yes to its site's domain.
    fn end_session(
        &self,
        id: u32,
        actor: &Actor,
        allowed: &dyn Fn(Option<&str>) -> bool,
    ) -> EndOutcome;
}

/// What [`Live::end_session`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndOutcome {
    Ended,
    NotOpen,
    Forbidden,
    /// The administrator's action could not be recorded: nothing ended.
    Failed(String),
}

/// A technician bundle, issued for the portal.
pub struct IssuedBundle {
    pub p12: zeroize::Zeroizing<Vec<u8>>,
    pub password: zeroize::Zeroizing<String>,
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for IssuedBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuedBundle(<redacted>)")
    }
}

/// Issues technician certificates and their PKCS#12 bundles (the gateway CA).
pub trait BundleIssuer: Send + Sync {
    fn issue(&self, account: &str, days: i64) -> Result<IssuedBundle, String>;
}

/// How the portal is reached.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    /// Host names (without port) the Host header may carry; compared case-insensitively.
    pub hosts: Vec<String>,
    /// The issuer name authenticator apps show next to the account.
    pub issuer: String,
}

/// The portal's state, shared by every request.
pub struct Portal {
    store: Mutex<Store>,
    sessions: Mutex<Sessions>,
    live: Arc<dyn Live>,
    bundles: Arc<dyn BundleIssuer>,
    config: PortalConfig,
}

impl std::fmt::Debug for Portal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Portal")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Portal {
    pub fn new(
        store: Store,
        live: Arc<dyn Live>,
        bundles: Arc<dyn BundleIssuer>,
        config: PortalConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(store),
            sessions: Mutex::new(Sessions::default()),
            live,
            bundles,
            config,
        })
    }

    /// Runs `f` on the registry. SQLite writes wait for fsync: `block_in_place` keeps them
    /// from stalling the other tasks on this worker.
    fn db<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        tokio::task::block_in_place(|| {
            let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s)
        })
    }

    fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        self.config
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// The name part of a Host header value (`[::1]:8443` → `[::1]`, `gw:8443` → `gw`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The most a request may take once its headers are in, its body included: a form is a few
/// kilobytes, so only a peer trickling its body (slowloris) comes near it.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Every route of the portal.
pub fn router(portal: Arc<Portal>) -> Router {
    pages::routes()
        .layer(axum::middleware::from_fn_with_state(
            portal.clone(),
            guard::guard,
        ))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(portal)
}

/// Ends a request that takes longer than [`REQUEST_DEADLINE`] with 408.
async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long").into_response(),
    }
}

/// The session id the request's cookie names, if any (put there by [`guard::guard`]).
#[derive(Debug, Clone)]
struct Sid(Option<SessionId>);

/// A logged-in administrator, with the role as the database has it now.
#[derive(Debug, Clone)]
pub struct Admin {
    pub who: Who,
    csrf: session::CsrfSigner,
}

impl Admin {
    fn actor(&self) -> Actor {
        Actor::Admin(self.who.name.clone())
    }

    fn role(&self) -> &AdminRole {
        &self.who.role
    }
}

/// Not logged in: a page load goes to the login, anything else is refused.
fn unauthenticated(method: &Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        Redirect::to("/login").into_response()
    } else {
        (StatusCode::UNAUTHORIZED, "not logged in").into_response()
    }
}

impl FromRequestParts<Arc<Portal>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, p: &Arc<Portal>) -> Result<Self, Response> {
        let Some(Sid(Some(sid))) = parts.extensions.get::<Sid>().cloned() else {
            return Err(unauthenticated(&parts.method));
        };
        let found = {
            let mut s = p.sessions();
            s.get(&sid, Instant::now())
                .and_then(|s| s.admin().cloned().map(|w| (w, s.signer())))
        };
        let Some((who, csrf)) = found else {
            return Err(unauthenticated(&parts.method));
        };
        // The role and the account's state as they are now: a reset or a role change takes
        // effect at the next request.
        match p.db(|s| s.admin(&who.name)) {
            Ok(Some(row)) if !row.must_change && row.totp_enrolled => Ok(Admin {
                who: Who {
                    name: row.name,
                    role: row.role,
                },
                csrf,
            }),
            Ok(_) => {
                p.sessions().remove(&sid);
                Err(unauthenticated(&parts.method))
            }
            Err(e) => Err(PortalError::Store(e).into_response()),
        }
    }
}

/// Why a request failed, as the administrator sees it.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("you may not do this")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for PortalError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => PortalError::NotFound(format!("{what} not found")),
            StoreError::Exists(what) => PortalError::Invalid(format!("{what} already exists")),
            StoreError::Invalid(why) => PortalError::Invalid(why),
            e => PortalError::Store(e),
        }
    }
}

impl IntoResponse for PortalError {
    fn into_response(self) -> Response {
        let status = match &self {
            PortalError::Forbidden => StatusCode::FORBIDDEN,
            PortalError::NotFound(_) => StatusCode::NOT_FOUND,
            PortalError::Invalid(_) => StatusCode::BAD_REQUEST,
            PortalError::Store(e) => {
                tracing::warn!(error = %e, "portal: registry error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let text = match &self {
            PortalError::Store(_) => {
                "the gateway could not do this (registry error; see its log)".to_owned()
            }
            e => e.to_string(),
        };
        (status, pages::message_page(status, &text)).into_response()
    }
}

/// The peer's address as the audit log shows it.
fn source(addr: &SocketAddr) -> String {
    addr.ip().to_string()
}

#[cfg(test)]
mod tests;
