//! Portal sessions: random ids, stages of the login, timeouts, rotation and CSRF tokens.
//!
//! A session id is 128 random bits, sent only in a `__Host-` cookie (`Secure; HttpOnly;
//! SameSite=Strict; Path=/`). The table is keyed by the SHA-256 of the id, so a lookup's time
//! says nothing about a stored id, and the memory holds no usable id. Sessions live in memory
//! only: a restart of the gateway logs every administrator out.
//!
//! A session is created anonymous when the login page is shown (the login form needs a CSRF
//! token), moves through the stages of [`Stage`], and gets a new id at each step that raises
//! its privilege (password accepted, second factor accepted): an id seen before login is
//! worthless after it. Pure: every call takes `now`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use aws_lc_rs::{digest, hmac};
use subtle::ConstantTimeEq;

use super::authz::AdminRole;
use super::totp::TotpSecret;

/// The cookie's name; the `__Host-` prefix makes the browser refuse it unless it is `Secure`,
/// has `Path=/` and no `Domain`.
pub const COOKIE: &str = "__Host-pinhole-portal";

/// A logged-in session ends after 15 idle minutes.
pub const IDLE: Duration = Duration::from_secs(15 * 60);
/// A half-done login (password accepted, second factor pending) ends sooner.
pub const LOGIN_IDLE: Duration = Duration::from_secs(5 * 60);
/// Every session ends 8 hours after it was created, however active.
pub const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);

/// Bounds the memory an unauthenticated visitor can make the portal hold; when full, the
/// oldest sessions that are not logged in go first.
pub const MAX_SESSIONS: usize = 10_000;

/// A bundle is kept for its single download this long.
pub const BUNDLE_TTL: Duration = Duration::from_secs(10 * 60);

/// A session id: 128 random bits.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionId([u8; 16]);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

impl SessionId {
    fn generate() -> Self {
        Self(pinhole_certs::random::<16>())
    }

    /// The cookie value.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        if s.len() != 32 {
            return None;
        }
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(Self(b))
    }

    fn key(&self) -> [u8; 32] {
        let d = digest::digest(&digest::SHA256, &self.0);
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }
}

/// The administrator a session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub role: AdminRole,
}

/// Where a session is in the login.
#[derive(Debug, Clone)]
pub enum Stage {
    /// Shown the login form.
    Anonymous,
    /// Password accepted; the TOTP code (or a recovery code) is next.
    SecondFactor(Who),
    /// A one-time password was accepted: a new password is next, then enrollment.
    ChangePassword(Who),
    /// Enrolling TOTP with this secret, shown on the page until a code confirms it.
    Enroll(Who, TotpSecret),
    /// Logged in.
    Full(Who),
}

/// A bundle waiting for its single download.
#[derive(Debug)]
pub struct PendingBundle {
    pub account: String,
    pub p12: zeroize::Zeroizing<Vec<u8>>,
    pub expires: Instant,
}

#[derive(Debug)]
pub struct Session {
    pub stage: Stage,
    csrf_key: [u8; 32],
    created: Instant,
    last: Instant,
    /// Bundles of accounts created in this session, by one-time download token.
    pub bundles: BTreeMap<String, PendingBundle>,
}

impl Session {
    fn new(now: Instant) -> Self {
        Self {
            stage: Stage::Anonymous,
            csrf_key: pinhole_certs::random::<32>(),
            created: now,
            last: now,
            bundles: BTreeMap::new(),
        }
    }

    /// The logged-in administrator, if the login is complete.
    pub fn admin(&self) -> Option<&Who> {
        match &self.stage {
            Stage::Full(w) => Some(w),
            _ => None,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        let idle = match self.stage {
            Stage::Full(_) => IDLE,
            _ => LOGIN_IDLE,
        };
        now.saturating_duration_since(self.last) >= idle
            || now.saturating_duration_since(self.created) >= ABSOLUTE
    }

    /// The CSRF token of the form that posts to `action` (a path). See [`CsrfSigner`].
    pub fn csrf(&self, action: &str) -> String {
        self.signer().token(action)
    }

    /// What pages need to put tokens in their forms.
    pub fn signer(&self) -> CsrfSigner {
        CsrfSigner(self.csrf_key)
    }

    /// Whether `token` is the CSRF token of `action`; constant time.
    pub fn csrf_ok(&self, action: &str, token: &str) -> bool {
        bool::from(self.csrf(action).as_bytes().ct_eq(token.as_bytes()))
    }
}

/// Makes CSRF tokens: the token of a form is an HMAC of the path it posts to, under the
/// session's own key (renewed at every rotation). A token is good for one form of one session.
#[derive(Clone)]
pub struct CsrfSigner([u8; 32]);

impl std::fmt::Debug for CsrfSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfSigner(<redacted>)")
    }
}

impl CsrfSigner {
    pub fn token(&self, action: &str) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hex::encode(&hmac::sign(&key, action.as_bytes()).as_ref()[..16])
    }
}

/// Every portal session. See the module documentation.
#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<[u8; 32], Session>,
}

impl Sessions {
    /// A new anonymous session.
    pub fn create(&mut self, now: Instant) -> SessionId {
        self.sweep(now);
        if self.map.len() >= MAX_SESSIONS {
            let oldest = self
                .map
                .iter()
                .filter(|(_, s)| s.admin().is_none())
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        let id = SessionId::generate();
        self.map.insert(id.key(), Session::new(now));
        id
    }

    /// The live session of `id`, touched; an expired one is removed and `None`.
    pub fn get(&mut self, id: &SessionId, now: Instant) -> Option<&mut Session> {
        let key = id.key();
        if self.map.get(&key).is_some_and(|s| s.expired(now)) {
            self.map.remove(&key);
            return None;
        }
        let s = self.map.get_mut(&key)?;
        s.last = now;
        s.bundles.retain(|_, b| b.expires > now);
        Some(s)
    }

    /// Moves the session to a new id and a new CSRF key (after a step up in privilege); the old
    /// id is dead.
    pub fn rotate(&mut self, id: &SessionId, now: Instant) -> Option<SessionId> {
        let mut s = self.map.remove(&id.key())?;
        s.csrf_key = pinhole_certs::random::<32>();
        s.last = now;
        let new = SessionId::generate();
        self.map.insert(new.key(), s);
        Some(new)
    }

    pub fn remove(&mut self, id: &SessionId) {
        self.map.remove(&id.key());
    }

    /// Ends every session of administrator `name` (reset, password change elsewhere).
    pub fn remove_admin(&mut self, name: &str) {
        self.map.retain(|_, s| match &s.stage {
            Stage::Anonymous => true,
            Stage::SecondFactor(w)
            | Stage::ChangePassword(w)
            | Stage::Enroll(w, _)
            | Stage::Full(w) => w.name != name,
        });
    }

    fn sweep(&mut self, now: Instant) {
        self.map.retain(|_, s| !s.expired(now));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Who {
        Who {
            name: "admin".into(),
            role: AdminRole::Gateway,
        }
    }

    #[test]
    fn ids_are_128_bit_and_round_trip() {
        let mut s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now);
        let b = s.create(now);
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(SessionId::parse(&a.to_hex()), Some(a.clone()));
        assert_eq!(SessionId::parse("zz"), None);
        assert_eq!(SessionId::parse(&"g".repeat(32)), None);
    }

    #[test]
    fn rotation_kills_the_old_id_and_changes_the_csrf_tokens() {
        let mut s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now);
        let token = s.get(&a, now).expect("live").csrf("/login");
        let b = s.rotate(&a, now).expect("rotated");
        assert!(s.get(&a, now).is_none(), "the old id is dead");
        let sess = s.get(&b, now).expect("new id lives");
        assert!(!sess.csrf_ok("/login", &token), "old tokens are dead too");
    }

    #[test]
    fn idle_and_absolute_timeouts() {
        let mut s = Sessions::default();
        let t0 = Instant::now();
        let a = s.create(t0);
        s.get(&a, t0).expect("live").stage = Stage::Full(who());
        // Active every 14 minutes: alive until the absolute limit.
        let mut t = t0;
        while t + Duration::from_secs(14 * 60) < t0 + ABSOLUTE {
            t += Duration::from_secs(14 * 60);
            assert!(s.get(&a, t).is_some(), "alive at {:?}", t - t0);
        }
        assert!(s.get(&a, t0 + ABSOLUTE).is_none(), "absolute limit");

        let b = s.create(t0);
        s.get(&b, t0).expect("live").stage = Stage::Full(who());
        assert!(s.get(&b, t0 + IDLE).is_none(), "idle limit");

        let c = s.create(t0);
        s.get(&c, t0).expect("live").stage = Stage::SecondFactor(who());
        assert!(
            s.get(&c, t0 + LOGIN_IDLE).is_none(),
            "a half login ends sooner"
        );
    }

    #[test]
    fn csrf_tokens_are_per_form_and_per_session() {
        let mut s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now);
        let b = s.create(now);
        let ta = s.get(&a, now).expect("a").csrf("/accounts");
        let sa = s.get(&a, now).expect("a");
        assert!(sa.csrf_ok("/accounts", &ta));
        assert!(!sa.csrf_ok("/domains", &ta), "another form");
        assert!(!sa.csrf_ok("/accounts", ""), "missing");
        assert!(
            !s.get(&b, now).expect("b").csrf_ok("/accounts", &ta),
            "another session"
        );
    }

    #[test]
    fn the_table_is_bounded_and_spares_logged_in_sessions() {
        let mut s = Sessions::default();
        let now = Instant::now();
        let admin = s.create(now);
        s.get(&admin, now).expect("live").stage = Stage::Full(who());
        for _ in 0..MAX_SESSIONS + 10 {
            s.create(now + Duration::from_secs(1));
        }
        assert!(s.len() <= MAX_SESSIONS);
        assert!(s.get(&admin, now + Duration::from_secs(2)).is_some());
    }

    #[test]
    fn removing_an_admin_ends_its_sessions() {
        let mut s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now);
        s.get(&a, now).expect("live").stage = Stage::Full(who());
        let anon = s.create(now);
        s.remove_admin("admin");
        assert!(s.get(&a, now).is_none());
        assert!(s.get(&anon, now).is_some());
    }
}
