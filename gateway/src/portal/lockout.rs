//! Login lockout: after [`MAX_FAILURES`] failed logins within [`WINDOW`], an account (and,
//! separately, a source address) is refused until the oldest of those failures leaves the
//! window.
//!
//! The failures are rows in the database ([`crate::store::Store::login_failed`]), so a lockout
//! survives a restart and starting the login over does not reset it. This module is the pure
//! rule over their times.

/// Five tries: enough for typing mistakes, far too few to guess a password or a code.
pub const MAX_FAILURES: usize = 5;

/// Failures count for 15 minutes.
pub const WINDOW: i64 = 15 * 60;

/// What is locked, for the audit record and the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Account,
    Source,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Account => "account",
            Scope::Source => "source",
        }
    }
}

/// Until when (unix seconds) a key with failures at `times` is locked at `now`, if it is.
pub fn locked_until(times: &[i64], now: i64) -> Option<i64> {
    let mut recent: Vec<i64> = times
        .iter()
        .copied()
        .filter(|t| *t > now - WINDOW && *t <= now)
        .collect();
    if recent.len() < MAX_FAILURES {
        return None;
    }
    recent.sort_unstable();
    // Locked until enough failures have aged out that fewer than MAX_FAILURES remain.
    let nth = recent[recent.len() - MAX_FAILURES];
    Some(nth + WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_within_the_window_lock() {
        let now = 10_000;
        assert_eq!(
            locked_until(&[now - 4, now - 3, now - 2, now - 1], now),
            None
        );
        assert_eq!(
            locked_until(&[now - 4, now - 3, now - 2, now - 1, now], now),
            Some(now - 4 + WINDOW)
        );
    }

    #[test]
    fn old_failures_do_not_count() {
        let now = 10_000;
        let times = [now - WINDOW, now - 3, now - 2, now - 1, now];
        assert_eq!(locked_until(&times, now), None);
        let times = [now - WINDOW + 1, now - 3, now - 2, now - 1, now];
        assert_eq!(locked_until(&times, now), Some(now + 1));
        assert_eq!(
            locked_until(&times, now + 1),
            None,
            "unlocked once it ages out"
        );
    }

    #[test]
    fn more_failures_keep_it_locked_longer() {
        let now = 10_000;
        let times: Vec<i64> = (0..8).map(|i| now - 100 + i * 10).collect();
        assert_eq!(locked_until(&times, now), Some(now - 100 + 30 + WINDOW));
    }
}
