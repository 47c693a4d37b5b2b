//! What every request goes through before a handler: the Host check, the origin and CSRF
//! checks of state-changing requests, and the security headers of every response.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::session::{COOKIE, SessionId};
use super::{Portal, Sid, unauthenticated};

/// A form is small; nothing the portal takes is larger.
const MAX_FORM: usize = 64 * 1024;

/// No script but our own file, no style but our own, no frames, forms only to ourselves.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub async fn guard(State(p): State<Arc<Portal>>, req: Request, next: Next) -> Response {
    let mut resp = check(&p, req, next).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The session cookie's id.
pub fn session_cookie(headers: &HeaderMap) -> Option<SessionId> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .and_then(|(_, v)| SessionId::parse(v))
}

/// A state-changing request must come from a page of this portal: `Origin` must be this
/// origin, and `Sec-Fetch-Site`, when present, same-origin. A request with neither is refused.
///
/// Under `Referrer-Policy: no-referrer` browsers send `Origin: null` on form posts; such a
/// request passes only on `Sec-Fetch-Site: same-origin` (which every current browser sends
/// and no page can forge).
fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|o| *o != "null");
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let origin_ok = origin.map(|o| o == format!("https://{host}"));
    let site_ok = site.map(|s| s == "same-origin");
    match (origin_ok, site_ok) {
        (None, None) => false,
        (o, s) => o.unwrap_or(true) && s.unwrap_or(true),
    }
}

fn refuse(status: StatusCode, text: &str) -> Response {
    (status, super::pages::message_page(status, text)).into_response()
}

async fn check(p: &Portal, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !p.host_allowed(&host) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this portal does not answer to that host name",
        );
    }
    let sid = session_cookie(req.headers());
    let safe = req.method() == Method::GET || req.method() == Method::HEAD;
    let mut req = if safe {
        req
    } else {
        if !same_origin(req.headers(), &host) {
            return refuse(
                StatusCode::FORBIDDEN,
                "refused: the request did not come from this portal",
            );
        }
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request too large");
        };
        let token = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|f| f.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v));
        let verdict = sid.as_ref().and_then(|id| {
            p.sessions().get(id, Instant::now()).map(|s| {
                token
                    .as_deref()
                    .is_some_and(|t| s.csrf_ok(parts.uri.path(), t))
            })
        });
        match verdict {
            None => return unauthenticated(&parts.method),
            Some(false) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "refused: the form's security token is missing or stale; reload the page and try again",
                );
            }
            Some(true) => Request::from_parts(parts, Body::from(bytes)),
        }
    };
    req.extensions_mut().insert(Sid(sid));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn origin_checks() {
        let host = "gw.example:8443";
        assert!(same_origin(
            &headers(&[("origin", "https://gw.example:8443")]),
            host
        ));
        assert!(same_origin(
            &headers(&[
                ("origin", "https://gw.example:8443"),
                ("sec-fetch-site", "same-origin")
            ]),
            host
        ));
        assert!(same_origin(
            &headers(&[("sec-fetch-site", "same-origin")]),
            host
        ));
        assert!(!same_origin(&headers(&[]), host), "neither header");
        assert!(!same_origin(
            &headers(&[("origin", "https://evil.example")]),
            host
        ));
        assert!(!same_origin(
            &headers(&[("origin", "http://gw.example:8443")]),
            host
        ));
        assert!(!same_origin(&headers(&[("origin", "null")]), host));
        assert!(same_origin(
            &headers(&[("origin", "null"), ("sec-fetch-site", "same-origin")]),
            host
        ));
        assert!(!same_origin(
            &headers(&[("origin", "null"), ("sec-fetch-site", "cross-site")]),
            host
        ));
        assert!(!same_origin(
            &headers(&[
                ("origin", "https://gw.example:8443"),
                ("sec-fetch-site", "cross-site")
            ]),
            host
        ));
        assert!(!same_origin(
            &headers(&[("sec-fetch-site", "same-site")]),
            host
        ));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let id = "00112233445566778899aabbccddeeff";
        let h = headers(&[("cookie", &format!("a=b; {COOKIE}={id}; c=d"))]);
        assert_eq!(session_cookie(&h).map(|s| s.to_hex()), Some(id.to_owned()));
        assert!(session_cookie(&headers(&[("cookie", "pinhole=1")])).is_none());
    }
}
