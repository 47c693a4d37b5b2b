//! Reconnection delays: exponential with jitter, capped.
//!
//! Jitter keeps a thousand sites that lost the gateway at the same moment from all coming back
//! in the same second. The random input is passed in, like time, so the schedule is testable.

use std::time::Duration;

/// First retry after about a second.
pub const INITIAL: Duration = Duration::from_secs(1);

/// Never wait longer than a minute: a technician or plant should not sit idle for long after
/// the gateway is back.
pub const CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget past failures (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next attempt. `random` is any u32; the delay is drawn from
    /// [base/2, base], with base = INITIAL × 2^attempt, capped at [`CAP`].
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let base = INITIAL
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(CAP);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(u64::from(random) % (spread + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps() {
        let mut b = Backoff::new();
        let max: Vec<Duration> = (0..10).map(|_| b.next_delay(u32::MAX)).collect();
        assert!(max.windows(2).all(|w| w[0] <= w[1]), "{max:?}");
        assert!(max.iter().all(|d| *d <= CAP));
        assert!(*max.last().expect("some") >= CAP / 2);
        b.reset();
        assert!(b.next_delay(0) <= INITIAL);
    }

    proptest! {
        #[test]
        fn always_within_bounds(randoms in proptest::collection::vec(any::<u32>(), 1..40)) {
            let mut b = Backoff::new();
            for r in randoms {
                let d = b.next_delay(r);
                prop_assert!(d >= INITIAL / 2 && d <= CAP, "{:?}", d);
            }
        }
    }
}
