//! Login (password, then TOTP or a recovery code), the first login's password change and
//! TOTP enrollment, and logout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use askama::Template;
use axum::Form;
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{render, render_status};
use crate::audit::Actor;
use crate::portal::admins::{RECOVERY_CODES, generate_recovery_code};
use crate::portal::session::{COOKIE, CsrfSigner, SessionId, Stage, Who};
use crate::portal::totp::{self, TotpSecret};
use crate::portal::{Portal, PortalError, Sid, source};

/// Passwords an administrator chooses: long enough to resist guessing offline should the
/// hashes leak; bounded so that hashing stays cheap.
const MIN_PASSWORD: usize = 12;
const MAX_PASSWORD: usize = 1024;

/// Compared against when the name is unknown, so that an unknown name costs as much time as
/// a wrong password (a hash of a random password, made once).
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        crate::state::hash_password(&crate::state::generate_password()).unwrap_or_default()
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn set_cookie(resp: &mut Response, id: &SessionId) {
    let v = format!(
        "{COOKIE}={}; Path=/; Secure; HttpOnly; SameSite=Strict",
        id.to_hex()
    );
    if let Ok(v) = HeaderValue::from_str(&v) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn clear_cookie(resp: &mut Response) {
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-pinhole-portal=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
}

fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::PasswordVerifier;
    tokio::task::block_in_place(|| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), hash)
            .is_ok()
    })
}

/// The session's stage and CSRF signer, if the session is alive.
fn stage_of(p: &Portal, sid: &Sid) -> Option<(Stage, CsrfSigner)> {
    let id = sid.0.as_ref()?;
    let mut s = p.sessions();
    let sess = s.get(id, Instant::now())?;
    Some((sess.stage.clone(), sess.signer()))
}

/// Sets the stage of the session and moves it to a new id (a step up in privilege).
fn advance(p: &Portal, sid: &Sid, stage: Stage) -> Option<SessionId> {
    let id = sid.0.as_ref()?;
    let now = Instant::now();
    let mut s = p.sessions();
    s.get(id, now)?.stage = stage;
    s.rotate(id, now)
}

fn redirect_with(id: Option<SessionId>, to: &str) -> Response {
    let mut r = Redirect::to(to).into_response();
    if let Some(id) = id {
        set_cookie(&mut r, &id);
    }
    r
}

fn next_page(stage: &Stage) -> &'static str {
    match stage {
        Stage::Anonymous => "/login",
        Stage::SecondFactor(_) => "/login/totp",
        Stage::ChangePassword(_) => "/login/password",
        Stage::Enroll(..) => "/login/enroll",
        Stage::Full(_) => "/",
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    error: String,
}

pub async fn login_page(State(p): State<Arc<Portal>>, Extension(sid): Extension<Sid>) -> Response {
    if let Some((stage, csrf)) = stage_of(&p, &sid) {
        if !matches!(stage, Stage::Anonymous) {
            return Redirect::to(next_page(&stage)).into_response();
        }
        return render(&LoginPage {
            csrf: csrf.token("/login"),
            error: String::new(),
        });
    }
    let (id, csrf) = {
        let mut s = p.sessions();
        let now = Instant::now();
        let id = s.create(now);
        let csrf = s
            .get(&id, now)
            .map(|s| s.csrf("/login"))
            .unwrap_or_default();
        (id, csrf)
    };
    let mut r = render(&LoginPage {
        csrf,
        error: String::new(),
    });
    set_cookie(&mut r, &id);
    r
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: Zeroizing<String>,
}

fn login_error(p: &Portal, sid: &Sid, status: StatusCode, error: &str) -> Response {
    let csrf = stage_of(p, sid)
        .map(|(_, c)| c.token("/login"))
        .unwrap_or_default();
    render_status(
        status,
        &LoginPage {
            csrf,
            error: error.into(),
        },
    )
}

fn locked_text(until: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(until)
        .map(crate::store::rfc3339)
        .unwrap_or_default();
    format!("Too many failed logins. Try again after {t} (UTC).")
}

pub async fn login(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Result<Response, PortalError> {
    let Some((Stage::Anonymous, _)) = stage_of(&p, &sid) else {
        return Ok(Redirect::to("/login").into_response());
    };
    let from = source(&peer);
    let now = unix_now() as i64;
    // What the visitor typed is bounded before it reaches the database or the log.
    let name: String = f.username.trim().chars().take(64).collect();
    if let Some(l) = p.db(|s| s.login_locked(&name, &from, now))? {
        return Ok(login_error(
            &p,
            &sid,
            StatusCode::TOO_MANY_REQUESTS,
            &locked_text(l.until),
        ));
    }
    let secrets = p.db(|s| s.admin_secrets(&name))?;
    let password_ok = f.password.len() <= MAX_PASSWORD
        && match &secrets {
            Some(a) => verify_password(&a.password_hash, &f.password),
            None => {
                let _ = verify_password(dummy_hash(), &f.password);
                false
            }
        };
    let Some(a) = secrets.filter(|_| password_ok) else {
        let locked = p.db(|s| s.login_failed(&name, &from, "wrong name or password", now))?;
        let text = match locked {
            Some(l) => locked_text(l.until),
            None => "Wrong name or password.".to_owned(),
        };
        return Ok(login_error(&p, &sid, StatusCode::UNAUTHORIZED, &text));
    };
    let who = Who {
        name: a.row.name.clone(),
        role: a.row.role.clone(),
    };
    let stage = if a.row.must_change {
        Stage::ChangePassword(who)
    } else if a.totp.is_some() {
        Stage::SecondFactor(who)
    } else {
        Stage::Enroll(who, TotpSecret::generate())
    };
    let to = next_page(&stage);
    Ok(redirect_with(advance(&p, &sid, stage), to))
}

#[derive(Template)]
#[template(path = "totp.html")]
struct TotpPage {
    csrf: String,
    name: String,
    error: String,
}

pub async fn totp_page(State(p): State<Arc<Portal>>, Extension(sid): Extension<Sid>) -> Response {
    match stage_of(&p, &sid) {
        Some((Stage::SecondFactor(w), csrf)) => render(&TotpPage {
            csrf: csrf.token("/login/totp"),
            name: w.name,
            error: String::new(),
        }),
        Some((stage, _)) => Redirect::to(next_page(&stage)).into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

#[derive(Deserialize)]
pub struct CodeForm {
    code: Zeroizing<String>,
}

pub async fn totp(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<CodeForm>,
) -> Result<Response, PortalError> {
    let Some((Stage::SecondFactor(who), csrf)) = stage_of(&p, &sid) else {
        return Ok(Redirect::to("/login").into_response());
    };
    let from = source(&peer);
    let now = unix_now();
    let again = |status, error: String| {
        render_status(
            status,
            &TotpPage {
                csrf: csrf.token("/login/totp"),
                name: who.name.clone(),
                error,
            },
        )
    };
    if let Some(l) = p.db(|s| s.login_locked(&who.name, &from, now as i64))? {
        return Ok(again(StatusCode::TOO_MANY_REQUESTS, locked_text(l.until)));
    }
    let code: String = f
        .code
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(64)
        .collect();
    let how = if code.len() == usize::from(totp::DIGITS) {
        let secret = p.db(|s| s.admin_secrets(&who.name))?.and_then(|a| a.totp);
        let step = secret.and_then(|s| totp::verify(&s, &code, now));
        match step {
            Some(step) if p.db(|s| s.use_totp_step(&who.name, step))? => Some("password and TOTP"),
            _ => None,
        }
    } else if p.db(|s| s.use_recovery_code(&who.name, &code, &from))? {
        Some("password and recovery code")
    } else {
        None
    };
    let Some(how) = how else {
        let locked = p.db(|s| {
            s.login_failed(
                &who.name,
                &from,
                "wrong or reused one-time code",
                now as i64,
            )
        })?;
        let text = match locked {
            Some(l) => locked_text(l.until),
            None => "Wrong or already used code.".to_owned(),
        };
        return Ok(again(StatusCode::UNAUTHORIZED, text));
    };
    p.db(|s| s.login_succeeded(&who.name, &from, how))?;
    Ok(redirect_with(advance(&p, &sid, Stage::Full(who)), "/"))
}

#[derive(Template)]
#[template(path = "password.html")]
struct PasswordPage {
    csrf: String,
    name: String,
    error: String,
    min: usize,
}

pub async fn password_page(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
) -> Response {
    match stage_of(&p, &sid) {
        Some((Stage::ChangePassword(w), csrf)) => render(&PasswordPage {
            csrf: csrf.token("/login/password"),
            name: w.name,
            error: String::new(),
            min: MIN_PASSWORD,
        }),
        Some((stage, _)) => Redirect::to(next_page(&stage)).into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

#[derive(Deserialize)]
pub struct PasswordForm {
    new: Zeroizing<String>,
    confirm: Zeroizing<String>,
}

pub async fn password(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    Form(f): Form<PasswordForm>,
) -> Result<Response, PortalError> {
    let Some((Stage::ChangePassword(who), csrf)) = stage_of(&p, &sid) else {
        return Ok(Redirect::to("/login").into_response());
    };
    let error = if f.new.as_str() != f.confirm.as_str() {
        Some("The two passwords differ.")
    } else if f.new.chars().count() < MIN_PASSWORD || f.new.len() > MAX_PASSWORD {
        Some("Choose a password of at least 12 characters.")
    } else if p
        .db(|s| s.admin_secrets(&who.name))?
        .is_some_and(|a| verify_password(&a.password_hash, &f.new))
    {
        Some("Choose a password other than the one-time password.")
    } else {
        None
    };
    if let Some(error) = error {
        return Ok(render_status(
            StatusCode::BAD_REQUEST,
            &PasswordPage {
                csrf: csrf.token("/login/password"),
                name: who.name,
                error: error.into(),
                min: MIN_PASSWORD,
            },
        ));
    }
    let hash = tokio::task::block_in_place(|| crate::state::hash_password(&f.new))
        .map_err(|e| PortalError::Invalid(e.to_string()))?;
    p.db(|s| s.set_admin_password(&who.name, &hash))?;
    let stage = Stage::Enroll(who, TotpSecret::generate());
    Ok(redirect_with(advance(&p, &sid, stage), "/login/enroll"))
}

#[derive(Template)]
#[template(path = "enroll.html")]
struct EnrollPage {
    csrf: String,
    name: String,
    qr: String,
    secret: String,
    error: String,
}

fn enroll_view(
    p: &Portal,
    who: &Who,
    secret: &TotpSecret,
    csrf: &CsrfSigner,
    error: &str,
) -> EnrollPage {
    EnrollPage {
        csrf: csrf.token("/login/enroll"),
        name: who.name.clone(),
        qr: totp::qr_svg(&secret.uri(&p.config.issuer, &who.name)),
        secret: secret.base32(),
        error: error.into(),
    }
}

pub async fn enroll_page(State(p): State<Arc<Portal>>, Extension(sid): Extension<Sid>) -> Response {
    match stage_of(&p, &sid) {
        Some((Stage::Enroll(w, secret), csrf)) => render(&enroll_view(&p, &w, &secret, &csrf, "")),
        Some((stage, _)) => Redirect::to(next_page(&stage)).into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

#[derive(Template)]
#[template(path = "recovery.html")]
struct RecoveryPage {
    codes: Vec<String>,
}

pub async fn enroll(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<CodeForm>,
) -> Result<Response, PortalError> {
    let Some((Stage::Enroll(who, secret), csrf)) = stage_of(&p, &sid) else {
        return Ok(Redirect::to("/login").into_response());
    };
    let from = source(&peer);
    let now = unix_now();
    if let Some(l) = p.db(|s| s.login_locked(&who.name, &from, now as i64))? {
        return Ok(render_status(
            StatusCode::TOO_MANY_REQUESTS,
            &enroll_view(&p, &who, &secret, &csrf, &locked_text(l.until)),
        ));
    }
    let code: String = f
        .code
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(16)
        .collect();
    let Some(step) = totp::verify(&secret, &code, now) else {
        p.db(|s| {
            s.login_failed(
                &who.name,
                &from,
                "wrong code at TOTP enrollment",
                now as i64,
            )
        })?;
        return Ok(render_status(
            StatusCode::UNAUTHORIZED,
            &enroll_view(
                &p,
                &who,
                &secret,
                &csrf,
                "Wrong code: check the time on your phone and try the next code.",
            ),
        ));
    };
    let codes: Vec<Zeroizing<String>> = (0..RECOVERY_CODES)
        .map(|_| generate_recovery_code())
        .collect();
    p.db(|s| s.enroll_totp(&who.name, &secret, step, &codes))?;
    p.db(|s| s.login_succeeded(&who.name, &from, "first login: password set, TOTP enrolled"))?;
    let id = advance(&p, &sid, Stage::Full(who));
    let mut r = render(&RecoveryPage {
        codes: codes.iter().map(|c| c.to_string()).collect(),
    });
    if let Some(id) = id {
        set_cookie(&mut r, &id);
    }
    Ok(r)
}

pub async fn logout(
    State(p): State<Arc<Portal>>,
    Extension(sid): Extension<Sid>,
) -> Result<Response, PortalError> {
    if let Some(id) = &sid.0 {
        let who = {
            let mut s = p.sessions();
            let who = s.get(id, Instant::now()).and_then(|s| s.admin().cloned());
            s.remove(id);
            who
        };
        if let Some(w) = who {
            p.db(|s| {
                s.record(
                    &Actor::Admin(w.name.clone()),
                    &format!("admin:{}", w.name),
                    "admin logout",
                    &format!("portal administrator {} logged out", w.name),
                )
            })?;
        }
    }
    let mut r = Redirect::to("/login").into_response();
    clear_cookie(&mut r);
    Ok(r)
}
