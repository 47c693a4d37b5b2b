//! Handler tests: the portal's router against a real SQLite registry, a fake hub and a fake
//! CA, driven request by request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use tower::ServiceExt;

use super::*;
use crate::audit;
use crate::portal::session::Stage;
use crate::portal::totp::TotpSecret;
use crate::store::DomainPath;

struct FakeLive {
    sessions: Mutex<Vec<LiveSession>>,
    domains: BTreeMap<String, String>,
}

impl Live for FakeLive {
    fn sessions(&self) -> Vec<LiveSession> {
        self.sessions.lock().expect("lock").clone()
    }
    fn end_session(
        &self,
        id: u32,
        _actor: &Actor,
        allowed: &dyn Fn(Option<&str>) -> bool,
    ) -> EndOutcome {
        let mut s = self.sessions.lock().expect("lock");
        let Some(i) = s.iter().position(|x| x.id == id) else {
            return EndOutcome::NotOpen;
        };
        if !allowed(self.domains.get(&s[i].site).map(String::as_str)) {
            return EndOutcome::Forbidden;
        }
        s.remove(i);
        EndOutcome::Ended
    }
}

/// Issues "bundles" whose serial is the account and a counter: every issue is a new
/// certificate.
#[derive(Default)]
struct FakeCa(std::sync::atomic::AtomicU32);

impl BundleIssuer for FakeCa {
    fn issue(&self, account: &str, _days: i64) -> Result<IssuedBundle, String> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(IssuedBundle {
            p12: zeroize::Zeroizing::new(format!("p12 of {account} #{n}").into_bytes()),
            password: zeroize::Zeroizing::new("bundle-password".into()),
            serial: format!("{account}-{n}").into_bytes(),
        })
    }
}

const HOST: &str = "localhost:8443";
const ORIGIN: &str = "https://localhost:8443";

struct World {
    dir: tempfile::TempDir,
    portal: Arc<Portal>,
    live: Arc<FakeLive>,
}

fn d(s: &str) -> DomainPath {
    s.parse().expect("domain")
}

fn open_store(dir: &std::path::Path) -> Store {
    Store::open(&dir.join("gateway.db")).expect("open")
}

fn live_session(id: u32, account: &str, site: &str) -> LiveSession {
    LiveSession {
        id,
        account: account.into(),
        site: site.into(),
        agents: vec!["plc".into()],
        age: Duration::from_secs(5),
        up: 1,
        down: 2,
    }
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let mut s = open_store(dir.path());
        let sys = Actor::System;
        for dom in ["acme.plant-a", "globex"] {
            s.create_domain(&sys, &d(dom)).expect("domain");
        }
        for (site, dom) in [("acme-site", "acme.plant-a"), ("globex-site", "globex")] {
            let (tok, _) = s
                .create_token(&sys, &d(dom), Duration::from_secs(60))
                .expect("token");
            s.enroll(&tok, site, || Ok((vec![1], site.as_bytes().to_vec())))
                .expect("enroll");
        }
        s.create_account_in(&sys, "alice", b"alice", 30, &d("acme"))
            .expect("alice");
        s.create_account_in(&sys, "gus", b"gus", 30, &d("globex"))
            .expect("gus");
        s.set_grant(&sys, "gus", &d("globex"), true).expect("grant");
        for (name, role) in [
            ("root", AdminRole::Gateway),
            ("acme-admin", AdminRole::Domain(d("acme"))),
            ("aud", AdminRole::Auditor),
        ] {
            s.add_admin(&sys, name, &role, "x").expect("admin");
            s.set_admin_password(name, "x").expect("pw");
            s.enroll_totp(name, &TotpSecret::generate(), 1, &[])
                .expect("totp");
        }
        let domains = [("acme-site", "acme.plant-a"), ("globex-site", "globex")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        let live = Arc::new(FakeLive {
            sessions: Mutex::new(vec![
                live_session(7, "gus", "globex-site"),
                live_session(8, "alice", "acme-site"),
            ]),
            domains,
        });
        let portal = Self::portal(dir.path(), live.clone());
        Self { dir, portal, live }
    }

    fn portal(dir: &std::path::Path, live: Arc<FakeLive>) -> Arc<Portal> {
        Portal::new(
            open_store(dir),
            live,
            Arc::new(FakeCa::default()),
            PortalConfig {
                hosts: vec!["localhost".into()],
                issuer: "Pinhole test".into(),
            },
        )
    }

    /// Restarts the portal on the same database (sessions are lost, lockouts are not).
    fn restart(&mut self) {
        self.portal = Self::portal(self.dir.path(), self.live.clone());
    }

    /// A logged-in session of `admin`: its cookie value.
    fn login_as(&self, admin: &str) -> String {
        let role = self
            .portal
            .db(|s| s.admin(admin))
            .expect("q")
            .expect("admin")
            .role;
        let now = std::time::Instant::now();
        let mut s = self.portal.sessions();
        let id = s.create(now);
        s.get(&id, now).expect("live").stage = Stage::Full(session::Who {
            name: admin.into(),
            role,
        });
        id.to_hex()
    }

    fn csrf(&self, cookie: &str, action: &str) -> String {
        let id = SessionId::parse(cookie).expect("id");
        self.portal
            .sessions()
            .get(&id, std::time::Instant::now())
            .expect("live")
            .csrf(action)
    }

    async fn send(&self, req: Request<Body>) -> Response {
        router(self.portal.clone())
            .layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 9], 40000))))
            .oneshot(req)
            .await
            .expect("infallible")
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Response {
        let mut b = Request::get(path).header(header::HOST, HOST);
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, format!("{}={c}", session::COOKIE));
        }
        self.send(b.body(Body::empty()).expect("req")).await
    }

    async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Response {
        self.post_with(path, cookie, form, Some(ORIGIN)).await
    }

    async fn post_with(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Response {
        let mut b = Request::post(path)
            .header(header::HOST, HOST)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, format!("{}={c}", session::COOKIE));
        }
        let body = serde_urlencoded::to_string(form).expect("form");
        self.send(b.body(Body::from(body)).expect("req")).await
    }

    /// POST with the right CSRF token for the form.
    async fn submit(&self, path: &str, cookie: &str, form: &[(&str, &str)]) -> Response {
        let token = self.csrf(cookie, path.split('?').next().unwrap_or(path));
        let mut f = form.to_vec();
        f.push(("csrf", &token));
        self.post(path, Some(cookie), &f).await
    }

    fn audit_rows(&self) -> usize {
        self.portal
            .db(|s| audit::list(s.conn(), None))
            .expect("audit")
            .len()
    }

    fn events(&self) -> Vec<String> {
        self.portal
            .db(|s| audit::list(s.conn(), None))
            .expect("audit")
            .into_iter()
            .map(|r| format!("{} | {} | {}", r.event, r.actor, r.description))
            .collect()
    }
}

async fn body(r: Response) -> String {
    let b = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .expect("body");
    String::from_utf8_lossy(&b).into_owned()
}

fn set_cookie(r: &Response) -> Option<String> {
    r.headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(session::COOKIE) && !v.contains("Max-Age=0"))
        .map(str::to_owned)
}

fn cookie_value(set: &str) -> String {
    set.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("cookie")
}

/// The CSRF token in the form posting to `action`.
fn form_token(html: &str, action: &str) -> String {
    let at = html.find(&format!("action=\"{action}\"")).expect("form");
    let rest = &html[at..];
    let v = rest.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
    rest[v..v + 32].to_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_without_a_session_is_refused() {
    let w = World::new();
    for path in pages::PROTECTED_GETS {
        let r = w.get(path, None).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "GET {path}");
        assert_eq!(r.headers()[header::LOCATION], "/login", "GET {path}");
    }
    let before = w.audit_rows();
    for path in pages::POSTS {
        let r = w.post(path, None, &[("csrf", "00")]).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "POST {path}");
    }
    // A session that is not logged in (the login form's) reaches no page either.
    let anon = set_cookie(&w.get("/login", None).await).expect("cookie");
    let anon = cookie_value(&anon);
    for path in pages::PROTECTED_GETS {
        assert_eq!(
            w.get(path, Some(&anon)).await.status(),
            StatusCode::SEE_OTHER,
            "GET {path}"
        );
    }
    assert_eq!(w.audit_rows(), before, "nothing was recorded or changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_post_without_a_valid_csrf_token_or_from_elsewhere_is_refused() {
    let w = World::new();
    let root = w.login_as("root");
    let before = w.audit_rows();
    for path in pages::POSTS {
        let r = w.post(path, Some(&root), &[("name", "gus")]).await;
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "POST {path} without a token"
        );
        // Another form's token.
        let other = w.csrf(&root, "/logout");
        if *path != "/logout" {
            let r = w
                .post(path, Some(&root), &[("name", "gus"), ("csrf", &other)])
                .await;
            assert_eq!(
                r.status(),
                StatusCode::FORBIDDEN,
                "POST {path} with another form's token"
            );
        }
        let token = w.csrf(&root, path);
        let form = [("name", "gus"), ("csrf", token.as_str())];
        for origin in [
            Some("https://evil.example"),
            Some("null"),
            Some("http://localhost:8443"),
            None,
        ] {
            let r = w.post_with(path, Some(&root), &form, origin).await;
            assert_eq!(
                r.status(),
                StatusCode::FORBIDDEN,
                "POST {path} from {origin:?}"
            );
        }
    }
    assert_eq!(w.audit_rows(), before, "nothing was recorded or changed");
    assert!(
        w.portal
            .db(|s| s.account("gus"))
            .expect("q")
            .expect("gus")
            .closed
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_domain_admin_of_acme_gets_403_for_globex_objects() {
    let w = World::new();
    let a = w.login_as("acme-admin");
    let before = w.audit_rows();
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("/accounts/close", &[("name", "gus"), ("confirm", "yes")]),
        ("/accounts/create", &[("name", "eve"), ("domain", "globex")]),
        ("/accounts/create", &[("name", "eve"), ("domain", "")]),
        (
            "/access/grant",
            &[("account", "gus"), ("domain", "globex"), ("confirm", "yes")],
        ),
        (
            "/access/grant",
            &[
                ("account", "alice"),
                ("domain", "globex"),
                ("confirm", "yes"),
            ],
        ),
        (
            "/access/grant",
            &[("account", "gus"), ("domain", "acme"), ("confirm", "yes")],
        ),
        (
            "/access/ungrant",
            &[("account", "gus"), ("domain", "globex")],
        ),
        ("/domains/create", &[("domain", "globex.x")]),
        ("/domains/create", &[("domain", "initech")]),
        (
            "/sites/move",
            &[("site", "globex-site"), ("domain", "acme")],
        ),
        (
            "/sites/move",
            &[("site", "acme-site"), ("domain", "globex")],
        ),
        (
            "/sites/revoke",
            &[("name", "globex-site"), ("confirm", "yes")],
        ),
        (
            "/sites/remove",
            &[("name", "globex-site"), ("confirm", "yes")],
        ),
        ("/sessions/end", &[("session", "7")]),
        (
            "/domains/rename",
            &[("domain", "globex"), ("name", "globex2")],
        ),
        // Its own root is the gateway administrator's to rename or delete.
        ("/domains/rename", &[("domain", "acme"), ("name", "acme2")]),
        (
            "/domains/delete",
            &[("domain", "globex"), ("confirm", "yes")],
        ),
        ("/domains/delete", &[("domain", "acme"), ("confirm", "yes")]),
        ("/accounts/reissue", &[("name", "gus"), ("confirm", "yes")]),
        ("/accounts/reissue", &[("name", "gus")]),
    ];
    for (path, form) in cases {
        let r = w.submit(path, &a, form).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "POST {path} {form:?}");
    }
    assert_eq!(w.audit_rows(), before, "nothing changed");
    assert_eq!(
        w.live.sessions().len(),
        2,
        "the globex session is still open"
    );
    // What it lists is its own, the audit log included.
    for path in [
        "/",
        "/accounts",
        "/domains",
        "/access",
        "/sites",
        "/audit",
        "/audit/export?format=csv",
        "/audit/export?format=jsonl",
    ] {
        let r = w.get(path, Some(&a)).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        let html = body(r).await;
        assert!(
            !html.contains("globex") && !html.contains("gus"),
            "GET {path} shows globex"
        );
    }
    // And within acme it may act.
    let r = w.submit("/sessions/end", &a, &[("session", "8")]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = w
        .submit(
            "/access/grant",
            &a,
            &[
                ("account", "alice"),
                ("domain", "acme.plant-a"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        w.events()
            .iter()
            .any(|e| e.starts_with("grant changed | admin:acme-admin"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auditor_reads_everything_and_changes_nothing() {
    let w = World::new();
    let a = w.login_as("aud");
    let before = w.audit_rows();
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("/accounts/close", &[("name", "alice"), ("confirm", "yes")]),
        ("/accounts/create", &[("name", "eve"), ("domain", "acme")]),
        (
            "/access/grant",
            &[("account", "alice"), ("domain", "acme"), ("confirm", "yes")],
        ),
        ("/domains/create", &[("domain", "acme.x")]),
        (
            "/domains/rename",
            &[("domain", "acme.plant-a"), ("name", "plant-z")],
        ),
        (
            "/domains/delete",
            &[("domain", "acme.plant-a"), ("confirm", "yes")],
        ),
        (
            "/accounts/reissue",
            &[("name", "alice"), ("confirm", "yes")],
        ),
        ("/sites/move", &[("site", "acme-site"), ("domain", "acme")]),
        (
            "/sites/revoke",
            &[("name", "acme-site"), ("confirm", "yes")],
        ),
        ("/sessions/end", &[("session", "8")]),
    ];
    for (path, form) in cases {
        assert_eq!(
            w.submit(path, &a, form).await.status(),
            StatusCode::FORBIDDEN,
            "POST {path}"
        );
    }
    assert_eq!(w.audit_rows(), before);
    for path in ["/", "/accounts", "/domains", "/access", "/sites", "/audit"] {
        assert_eq!(
            w.get(path, Some(&a)).await.status(),
            StatusCode::OK,
            "GET {path}"
        );
    }
    let r = w.get("/audit/export?format=jsonl", Some(&a)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body(r).await.lines().count() >= before);
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_carry_the_security_headers_and_unknown_hosts_are_refused() {
    let w = World::new();
    let r = w.get("/login", None).await;
    let h = r.headers();
    assert_eq!(h[header::CONTENT_SECURITY_POLICY], guard::CSP);
    assert!(!guard::CSP.contains("unsafe-inline"));
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    let html = body(r).await;
    assert!(
        !html.contains("<script>") && !html.contains("http://") && !html.contains("https://"),
        "no inline script, nothing external"
    );
    let mut req = Request::get("/login")
        .header(header::HOST, "evil.example:8443")
        .body(Body::empty())
        .expect("req");
    req.headers_mut()
        .insert(header::HOST, "evil.example".parse().expect("v"));
    assert_eq!(w.send(req).await.status(), StatusCode::MISDIRECTED_REQUEST);
}

/// The first login of an administrator from `admin create`: password, new password, TOTP
/// enrollment, recovery codes; then a normal login, where a code is refused the second time.
#[tokio::test(flavor = "multi_thread")]
async fn first_login_enrolls_and_a_totp_code_works_once() {
    let w = World::new();
    let hash = crate::state::hash_password("one-time-pass").expect("hash");
    w.portal
        .db(|s| s.add_admin(&Actor::System, "ann", &AdminRole::Gateway, &hash))
        .expect("ann");

    let r = w.get("/login", None).await;
    let c0 = cookie_value(&set_cookie(&r).expect("cookie"));
    let html = body(r).await;
    let t = form_token(&html, "/login");
    let r = w
        .post(
            "/login",
            Some(&c0),
            &[
                ("username", "ann"),
                ("password", "one-time-pass"),
                ("csrf", &t),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/login/password");
    let set = set_cookie(&r).expect("rotated");
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(set.starts_with("__Host-"));
    let c1 = cookie_value(&set);
    assert_ne!(c0, c1, "rotated at the password");
    assert_eq!(
        w.get("/login/password", Some(&c0)).await.status(),
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        w.get("/", Some(&c1)).await.status(),
        StatusCode::SEE_OTHER,
        "not logged in yet"
    );

    let html = body(w.get("/login/password", Some(&c1)).await).await;
    let t = form_token(&html, "/login/password");
    let r = w
        .post(
            "/login/password",
            Some(&c1),
            &[
                ("new", "one-time-pass"),
                ("confirm", "one-time-pass"),
                ("csrf", &t),
            ],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "the one-time password cannot stay"
    );
    let r = w
        .post(
            "/login/password",
            Some(&c1),
            &[
                ("new", "correct horse battery"),
                ("confirm", "correct horse battery"),
                ("csrf", &t),
            ],
        )
        .await;
    assert_eq!(r.headers()[header::LOCATION], "/login/enroll");
    let c2 = cookie_value(&set_cookie(&r).expect("cookie"));

    let html = body(w.get("/login/enroll", Some(&c2)).await).await;
    assert!(html.contains("<svg"), "the QR code is inline SVG");
    let at = html
        .find("id=\"secret\" class=\"secret\">")
        .expect("secret")
        + 27;
    let secret_b32 = &html[at..at + 32];
    let secret = {
        // Decode the base32 the page shows, as an app would.
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in secret_b32.bytes() {
            let v = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
                .iter()
                .position(|x| *x == c)
                .expect("b32") as u32;
            bits = (bits << 5) | v;
            n += 5;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        TotpSecret::from_bytes(out)
    };
    let now = unix_now();
    let t = form_token(&html, "/login/enroll");
    let r = w
        .post(
            "/login/enroll",
            Some(&c2),
            &[("code", "000000"), ("csrf", &t)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = w
        .post(
            "/login/enroll",
            Some(&c2),
            &[("code", &secret.code(now)), ("csrf", &t)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let c3 = cookie_value(&set_cookie(&r).expect("rotated"));
    let page = body(r).await;
    assert_eq!(page.matches("<li><code>").count(), admins::RECOVERY_CODES);
    assert_eq!(
        w.get("/", Some(&c3)).await.status(),
        StatusCode::OK,
        "logged in"
    );
    assert_eq!(
        w.get("/", Some(&c2)).await.status(),
        StatusCode::SEE_OTHER,
        "the old id is dead"
    );

    // Log out, then in again: the enrollment's code is used; the next one works once.
    let r = w.submit("/logout", &c3, &[]).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(w.get("/", Some(&c3)).await.status(), StatusCode::SEE_OTHER);
    let login = async |code: String| -> StatusCode {
        let r = w.get("/login", None).await;
        let c = cookie_value(&set_cookie(&r).expect("cookie"));
        let t = form_token(&body(r).await, "/login");
        let r = w
            .post(
                "/login",
                Some(&c),
                &[
                    ("username", "ann"),
                    ("password", "correct horse battery"),
                    ("csrf", &t),
                ],
            )
            .await;
        assert_eq!(r.headers()[header::LOCATION], "/login/totp");
        let c = cookie_value(&set_cookie(&r).expect("cookie"));
        let t = form_token(
            &body(w.get("/login/totp", Some(&c)).await).await,
            "/login/totp",
        );
        w.post("/login/totp", Some(&c), &[("code", &code), ("csrf", &t)])
            .await
            .status()
    };
    assert_eq!(
        login(secret.code(now)).await,
        StatusCode::UNAUTHORIZED,
        "the enrollment code again"
    );
    let next = secret.code(now + totp::STEP);
    assert_eq!(
        login(next.clone()).await,
        StatusCode::SEE_OTHER,
        "the next code"
    );
    assert_eq!(
        login(next).await,
        StatusCode::UNAUTHORIZED,
        "the same code a second time"
    );
    let ev = w.events();
    for e in [
        "admin password changed | admin:ann",
        "admin TOTP enrolled | admin:ann",
        "admin login | admin:ann",
        "admin logout | admin:ann",
        "admin login failed | system | portal login of ann from 192.0.2.9 failed: wrong or reused one-time code",
    ] {
        assert!(ev.iter().any(|x| x.starts_with(e)), "{e}: {ev:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lockout_holds_across_a_restart_and_a_new_login() {
    let mut w = World::new();
    let hash = crate::state::hash_password("right-password").expect("hash");
    w.portal
        .db(|s| s.add_admin(&Actor::System, "ann", &AdminRole::Gateway, &hash))
        .expect("ann");
    let attempt = async |w: &World, pw: &str| -> StatusCode {
        let r = w.get("/login", None).await;
        let c = cookie_value(&set_cookie(&r).expect("cookie"));
        let t = form_token(&body(r).await, "/login");
        w.post(
            "/login",
            Some(&c),
            &[("username", "ann"), ("password", pw), ("csrf", &t)],
        )
        .await
        .status()
    };
    for _ in 0..4 {
        assert_eq!(attempt(&w, "wrong").await, StatusCode::UNAUTHORIZED);
    }
    // The fifth failure locks: the right password is refused now, in a new session too.
    assert_eq!(attempt(&w, "wrong").await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        attempt(&w, "right-password").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    w.restart();
    assert_eq!(
        attempt(&w, "right-password").await,
        StatusCode::TOO_MANY_REQUESTS,
        "after a restart"
    );
    let ev = w.events();
    assert_eq!(
        ev.iter()
            .filter(|e| e.starts_with("admin login failed") && e.contains("from 192.0.2.9"))
            .count(),
        5
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.starts_with("admin locked out"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_is_created_its_bundle_downloads_once_and_it_closes_with_a_named_confirmation() {
    let w = World::new();
    let root = w.login_as("root");
    let r = w
        .submit(
            "/accounts/create",
            &root,
            &[("name", "bob"), ("domain", "acme"), ("days", "30")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = body(r).await;
    assert!(html.contains("bundle-password"));
    let at = html.find("name=\"token\" value=\"").expect("token") + 20;
    let token = html[at..at + 32].to_owned();
    let r = w
        .submit("/accounts/bundle", &root, &[("token", &token)])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-pkcs12");
    assert_eq!(body(r).await, "p12 of bob #0");
    let r = w
        .submit("/accounts/bundle", &root, &[("token", &token)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "once");
    assert_eq!(
        w.portal
            .db(|s| s.account_domain("bob"))
            .expect("q")
            .as_deref(),
        Some("acme")
    );

    let r = w.submit("/accounts/close", &root, &[("name", "bob")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        body(r).await.contains("Close account bob"),
        "the confirmation names the account"
    );
    assert!(
        w.portal
            .db(|s| s.account("bob"))
            .expect("q")
            .expect("bob")
            .closed
            .is_none()
    );
    let r = w
        .submit(
            "/accounts/close",
            &root,
            &[("name", "bob"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        w.portal
            .db(|s| s.account("bob"))
            .expect("q")
            .expect("bob")
            .closed
            .is_some()
    );
    assert!(
        w.events()
            .iter()
            .any(|e| e.starts_with("account closed | admin:root"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_says_what_it_opens_before_it_is_saved() {
    let w = World::new();
    let root = w.login_as("root");
    w.portal
        .db(|s| {
            let agents = vec![
                pinhole_proto::Agent::new(
                    "plc",
                    pinhole_proto::AgentType::SiemensS7,
                    "192.168.0.10".parse().expect("ip"),
                    [],
                ),
                pinhole_proto::Agent::new(
                    "hmi",
                    pinhole_proto::AgentType::Vnc,
                    "192.168.0.11".parse().expect("ip"),
                    [],
                ),
            ];
            s.site_agents("acme-site", &agents)
        })
        .expect("agents");
    let r = w
        .submit(
            "/access/grant",
            &root,
            &[("account", "alice"), ("domain", "acme")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = body(r).await;
    assert!(
        html.contains("This gives alice 2 devices at 1 site"),
        "{html}"
    );
    // Exactly which: the site and its agents.
    assert!(
        html.contains("(in acme and below: acme-site (plc, hmi))"),
        "{html}"
    );
    assert!(
        w.portal
            .db(|s| s.account("alice"))
            .expect("q")
            .expect("a")
            .grants
            .is_empty()
    );
    let r = w
        .submit(
            "/access/grant",
            &root,
            &[("account", "alice"), ("domain", "acme"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let html = body(w.get("/access", Some(&root)).await).await;
    assert!(
        html.contains("inherited from acme"),
        "the subdomain is marked inherited"
    );
    // The site matrix: a column per site with its agents; alice reaches acme-site through
    // the grant of acme, gus reaches globex-site through globex.
    let matrix = &html[html.find("id=\"site-matrix\"").expect("site matrix")..];
    assert!(
        matrix.contains("data-site-column=\"acme-site\""),
        "{matrix}"
    );
    assert!(matrix.contains("<li>hmi</li>"), "{matrix}");
    let row = |who: &str| {
        let at = matrix
            .find(&format!("<th scope=\"row\">{who}</th>"))
            .expect("row");
        matrix[at..at + matrix[at..].find("</tr>").expect("end")].to_owned()
    };
    assert!(
        row("alice").contains("<td class=\"inherited\">inherited from acme</td>"),
        "{}",
        row("alice")
    );
    assert!(
        row("gus").contains("inherited from globex"),
        "{}",
        row("gus")
    );
    // A domain administrator of acme sees acme's sites only.
    let acme = w.login_as("acme-admin");
    let html = body(w.get("/access", Some(&acme)).await).await;
    assert!(html.contains("data-site-column=\"acme-site\""), "{html}");
    assert!(!html.contains("globex-site"), "{html}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_domain_is_renamed_with_its_subtree_and_deleted_only_when_empty() {
    let w = World::new();
    let root = w.login_as("root");
    w.portal
        .db(|s| {
            s.create_domain(&Actor::System, &d("acme.plant-a.line-3"))?;
            s.set_grant(&Actor::System, "alice", &d("acme.plant-a"), true)
        })
        .expect("setup");
    let r = w
        .submit(
            "/domains/rename",
            &root,
            &[("domain", "acme.plant-a"), ("name", "plant-z")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let domains = w.portal.db(|s| s.domains()).expect("domains");
    assert_eq!(
        domains,
        ["acme", "acme.plant-z", "acme.plant-z.line-3", "globex"],
        "the subtree moved with it"
    );
    let site = w
        .portal
        .db(|s| s.sites())
        .expect("sites")
        .into_iter()
        .find(|s| s.name == "acme-site")
        .expect("site");
    assert_eq!(site.domain, "acme.plant-z");
    let alice = w.portal.db(|s| s.account("alice")).expect("q").expect("a");
    assert_eq!(alice.grants, ["acme.plant-z"], "the grant follows");
    assert!(
        w.events().iter().any(|e| e.starts_with(
            "domain renamed | admin:root | domain acme.plant-a renamed to acme.plant-z"
        )),
        "{:#?}",
        w.events()
    );
    // Onto an existing name, onto itself, or to an invalid one: refused.
    for (dom, name) in [
        ("globex", "acme"),
        ("acme.plant-z", "plant-z"),
        ("acme.plant-z", "Bad Name"),
        ("acme.plant-z", "a.b"),
    ] {
        let r = w
            .submit("/domains/rename", &root, &[("domain", dom), ("name", name)])
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{dom} to {name}");
    }
    let r = w
        .submit(
            "/domains/rename",
            &root,
            &[("domain", "acme.plant-z.line-3"), ("name", "plant-z")],
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "a sibling name elsewhere is fine"
    );

    // Delete: a confirmation naming it first; a domain with a site, a subdomain, a grant or
    // an account in it stays.
    let before = w.audit_rows();
    for dom in ["acme.plant-z", "acme", "globex"] {
        let r = w
            .submit(
                "/domains/delete",
                &root,
                &[("domain", dom), ("confirm", "yes")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{dom} is not empty");
        assert!(body(r).await.contains("not empty"));
    }
    assert_eq!(w.audit_rows(), before);
    w.portal
        .db(|s| s.create_domain(&Actor::System, &d("acme.empty")))
        .expect("empty");
    let r = w
        .submit("/domains/delete", &root, &[("domain", "acme.empty")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body(r).await.contains("Delete domain acme.empty"));
    assert!(
        w.portal
            .db(|s| s.domains())
            .expect("d")
            .contains(&"acme.empty".to_owned())
    );
    let r = w
        .submit(
            "/domains/delete",
            &root,
            &[("domain", "acme.empty"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(
        !w.portal
            .db(|s| s.domains())
            .expect("d")
            .contains(&"acme.empty".to_owned())
    );
    assert!(
        w.events()
            .iter()
            .any(|e| e.starts_with("domain deleted | admin:root | domain acme.empty deleted"))
    );
    // A domain administrator manages the domains below its own.
    let a = w.login_as("acme-admin");
    let r = w
        .submit(
            "/domains/rename",
            &a,
            &[("domain", "acme.plant-z.plant-z"), ("name", "line-4")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let html = body(w.get("/domains", Some(&a)).await).await;
    assert!(html.contains("acme.plant-z.line-4"), "{html}");
    assert!(
        html.contains("action=\"/domains/rename\"") && html.contains("action=\"/domains/delete\"")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_expiry_is_shown_and_warned_about_30_days_ahead() {
    let w = World::new();
    let root = w.login_as("root");
    w.portal
        .db(|s| {
            s.create_account_in(&Actor::System, "bob", b"bob", 20, &d("acme"))?;
            s.create_account_in(&Actor::System, "carol", b"carol", 365, &d("acme"))
        })
        .expect("accounts");
    let html = body(w.get("/accounts", Some(&root)).await).await;
    let row = |name: &str| -> String {
        let at = html.find(&format!("<td>{name}</td>")).expect("row");
        html[at..at + html[at..].find("</tr>").expect("end")].to_owned()
    };
    let in_days = |days: i64| {
        crate::store::rfc3339(time::OffsetDateTime::now_utc() + time::Duration::days(days))[..10]
            .to_owned()
    };
    assert!(row("bob").contains(&in_days(20)), "{}", row("bob"));
    assert!(row("bob").contains("expires in 20 days"), "{}", row("bob"));
    assert!(row("bob").contains("class=\"warn\""), "{}", row("bob"));
    assert!(row("carol").contains(&in_days(365)), "{}", row("carol"));
    assert!(!row("carol").contains("class=\"warn\""), "{}", row("carol"));
    // The dashboard says so too.
    let html = body(w.get("/", Some(&root)).await).await;
    assert!(html.contains("id=\"expiring\""), "{html}");
    assert!(html.contains("bob (in 20 days)"), "{html}");
    assert!(!html.contains("carol"), "{html}");
    // A domain administrator of globex would not see bob's.
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reissued_bundle_revokes_the_old_certificate_and_downloads_once() {
    let w = World::new();
    let root = w.login_as("root");
    let r = w
        .submit("/accounts/reissue", &root, &[("name", "alice")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body(r).await.contains("Re-issue the bundle of alice"));
    let old = w
        .portal
        .db(|s| s.account("alice"))
        .expect("q")
        .expect("a")
        .serial;
    let r = w
        .submit(
            "/accounts/reissue",
            &root,
            &[("name", "alice"), ("confirm", "yes"), ("days", "90")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = body(r).await;
    assert!(html.contains("id=\"bundle-password\""), "{html}");
    assert!(
        html.contains("bundle-password</code>"),
        "the password is shown: {html}"
    );
    let now = w.portal.db(|s| s.account("alice")).expect("q").expect("a");
    assert_ne!(now.serial, old);
    assert!(now.closed.is_none());
    let revoked = w.portal.db(|s| s.revoked()).expect("revoked");
    assert!(revoked.contains(&old), "the old certificate is revoked");
    assert!(!revoked.contains(&now.serial));
    let at = html.find("name=\"token\" value=\"").expect("token") + 20;
    let token = html[at..at + 32].to_owned();
    let r = w
        .submit("/accounts/bundle", &root, &[("token", &token)])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, "p12 of alice #0");
    let r = w
        .submit("/accounts/bundle", &root, &[("token", &token)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "once");
    assert!(
        w.events()
            .iter()
            .any(|e| e
                .starts_with("account bundle re-issued | admin:root | account alice: certificate")),
        "{:#?}",
        w.events()
    );
    let html = body(w.get("/accounts", Some(&root)).await).await;
    let in_90 = crate::store::rfc3339(time::OffsetDateTime::now_utc() + time::Duration::days(90));
    assert!(html.contains(&in_90[..10]), "the new expiry is shown");
    // A closed account gets no new bundle.
    w.portal
        .db(|s| s.close_account(&Actor::System, "gus"))
        .expect("close");
    let r = w
        .submit(
            "/accounts/reissue",
            &root,
            &[("name", "gus"), ("confirm", "yes")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_domain_admin_reads_and_exports_the_audit_log_of_its_subtree_only() {
    let w = World::new();
    let a = w.login_as("acme-admin");
    let r = w.get("/audit", Some(&a)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = body(r).await;
    for mine in [
        "account alice created",
        "site acme-site enrolled",
        "domain acme.plant-a created",
    ] {
        assert!(html.contains(mine), "{mine}: {html}");
    }
    for theirs in ["gus", "globex"] {
        assert!(!html.contains(theirs), "{theirs}: {html}");
    }
    for format in ["csv", "jsonl"] {
        let r = w
            .get(&format!("/audit/export?format={format}"), Some(&a))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let text = body(r).await;
        assert!(text.contains("account alice created"), "{text}");
        assert!(!text.contains("gus") && !text.contains("globex"), "{text}");
    }
    // Asking for a globex site by name shows nothing either.
    let html = body(w.get("/audit?site=globex-site", Some(&a)).await).await;
    assert!(html.contains("0 events") && !html.contains("globex-site enrolled"));
    // The gateway's auditor sees everything.
    let aud = w.login_as("aud");
    let html = body(w.get("/audit", Some(&aud)).await).await;
    assert!(html.contains("account gus created"), "{html}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sites_page_shows_the_remote_access_light_of_each_site() {
    let w = World::new();
    let root = w.login_as("root");
    let html = body(w.get("/sites", Some(&root)).await).await;
    let cell = |site: &str| {
        let at = html.find(&format!("<td>{site}</td>")).expect("row");
        let rest = &html[at..];
        let l = rest.find("class=\"light\">").expect("light") + 14;
        rest[l..l + rest[l..].find("</td>").expect("end")].to_owned()
    };
    assert_eq!(cell("acme-site"), "on (1 session)");
    w.live.sessions.lock().expect("lock").clear();
    let html = body(w.get("/sites", Some(&root)).await).await;
    assert!(html.contains("class=\"light\">off</td>"), "{html}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sites_page_shows_the_switch_of_each_site() {
    let w = World::new();
    let root = w.login_as("root");
    let switch = |html: &str, site: &str| {
        let at = html.find(&format!("<td>{site}</td>")).expect("row");
        let rest = &html[at..];
        let l = rest.find("class=\"switch\">").expect("switch") + 15;
        rest[l..l + rest[l..].find("</td>").expect("end")].to_owned()
    };
    let html = body(w.get("/sites", Some(&root)).await).await;
    assert_eq!(switch(&html, "acme-site"), "unknown (offline)");
    w.portal
        .db(|s| {
            s.site_connected("acme-site", "0.1.0", "boot", &[], "192.0.2.1:1")?;
            s.site_connected("globex-site", "0.1.0", "boot", &[], "192.0.2.2:1")
        })
        .expect("connected");
    let html = body(w.get("/sites", Some(&root)).await).await;
    assert_eq!(switch(&html, "acme-site"), "on");
    // acme-site said its switch reads off before it closed; globex-site was lost.
    w.portal
        .db(|s| {
            s.site_disconnected("acme-site", true, "site switched off", "off")?;
            s.site_disconnected("globex-site", false, "site disconnected", "lost")
        })
        .expect("disconnected");
    let html = body(w.get("/sites", Some(&root)).await).await;
    assert_eq!(switch(&html, "acme-site"), "off");
    assert_eq!(switch(&html, "globex-site"), "unknown (offline)");
    assert!(html.contains("offline (switched off)"), "{html}");
    let html = body(w.get("/", Some(&root)).await).await;
    assert!(
        html.contains("acme-site <small>(acme.plant-a)</small> switched off"),
        "{html}"
    );
    assert!(
        html.contains("globex-site <small>(globex)</small> offline"),
        "{html}"
    );
    // Connected again: on, and the mark is gone.
    w.portal
        .db(|s| s.site_connected("acme-site", "0.1.0", "boot", &[], "192.0.2.1:1"))
        .expect("connected");
    let html = body(w.get("/sites", Some(&root)).await).await;
    assert_eq!(switch(&html, "acme-site"), "on");
}

/// A request body that never arrives: a peer that sent its headers and then trickles (or
/// withholds) the rest.
struct Endless;

impl hyper::body::Body for Endless {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// The deadline covers the whole request, its body included, before anything else is done
/// with it (the CSRF check reads the form first). Paused time: the test takes no 30 s.
/// (`start_paused` needs a current-thread runtime, on which the portal's database calls
/// cannot block in place, so the request carries no session: it never gets that far.)
#[tokio::test(start_paused = true)]
async fn a_request_that_takes_longer_than_30_s_ends_with_408() {
    let w = World::new();
    let rows = || {
        audit::list(open_store(w.dir.path()).conn(), None)
            .expect("audit")
            .len()
    };
    let audit = rows();
    let start = tokio::time::Instant::now();
    let req = Request::post("/domains/create")
        .header(header::HOST, HOST)
        .header(header::ORIGIN, ORIGIN)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::CONTENT_LENGTH, "100")
        .body(Body::new(Endless))
        .expect("req");
    let r = w.send(req).await;
    let took = start.elapsed();
    assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(31),
        "{took:?}"
    );
    assert_eq!(rows(), audit, "nothing happened");
}
