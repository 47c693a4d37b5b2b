//! Memory given back to the system after bursts of links.
//!
//! A TLS handshake allocates far more than the link keeps (key shares, the peer's certificate
//! chain being verified, transcript buffers), and a login builds a technician's inventory: a
//! burst of them (every site dialing back after a gateway restart, a wave of logins) leaves
//! the freed memory spread through glibc's heap, where it stays resident. Measured at 10 000
//! idle sites, that was a fifth of the gateway's memory per site (`bench/scale-notes.md`).
//!
//! [`Trimmer`] decides when to ask the allocator to return free pages (`malloc_trim`, which
//! `madvise`s free runs in every arena): once a burst has settled, and now and then during a
//! long one. Elsewhere than glibc the trim does nothing.

use std::time::Duration;

/// How often the trimmer looks at the count of links opened.
pub const TRIM_CHECK: Duration = Duration::from_secs(1);

/// Links opened since the last trim that make one worth it once the burst settles: fewer
/// leave little behind.
pub const TRIM_AFTER_LINKS: u64 = 64;

/// Links opened since the last trim that make one worth it even while the burst goes on (a
/// restart of 100 000 sites lasts a minute).
pub const TRIM_DURING_BURST: u64 = 4096;

/// Looks ([`TRIM_CHECK`]) that must pass between two trims: a trim holds the arenas' locks for
/// milliseconds, and whoever can open TLS links (anyone, for enrolment) could otherwise have
/// one every other second.
pub const TRIM_MIN_CHECKS: u64 = 30;

/// When to trim, from the running count of links opened, read every [`TRIM_CHECK`].
#[derive(Debug)]
pub struct Trimmer {
    /// The count at the last look.
    seen: u64,
    /// The count at the last trim.
    trimmed: u64,
    /// Looks since the last trim.
    checks: u64,
}

impl Default for Trimmer {
    fn default() -> Self {
        Self {
            seen: 0,
            trimmed: 0,
            checks: TRIM_MIN_CHECKS,
        }
    }
}

impl Trimmer {
    /// Whether to trim now, given the count of links opened so far (`opened` never falls).
    /// True when at least [`TRIM_AFTER_LINKS`] were opened since the last trim and none since
    /// the last look (the burst settled), or [`TRIM_DURING_BURST`] were; never within
    /// [`TRIM_MIN_CHECKS`] looks of the last trim.
    pub fn due(&mut self, opened: u64) -> bool {
        let settled = opened == self.seen;
        self.seen = opened;
        self.checks = self.checks.saturating_add(1);
        let since = opened.saturating_sub(self.trimmed);
        let due = self.checks > TRIM_MIN_CHECKS
            && ((settled && since >= TRIM_AFTER_LINKS) || since >= TRIM_DURING_BURST);
        if due {
            self.trimmed = opened;
            self.checks = 0;
        }
        due
    }
}

/// Arenas glibc's allocator may keep: one per thread by default (up to 8 per core), and the
/// runtime's blocking threads come and go in hundreds during a burst of decisions. Memory freed
/// in one arena cannot serve another's allocations, so many arenas keep more resident.
pub const ARENAS: i32 = 2;

/// Limits the allocator to [`ARENAS`] arenas; call before threads start. Whether it took.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // an FFI call with two integers; see SAFETY
pub fn limit_arenas() -> bool {
    // SAFETY: `mallopt` takes two integers and only sets glibc's own tunables; `M_ARENA_MAX`
    // is a documented parameter, valid at any time (arenas already made stay).
    unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1 }
}

/// Limits the allocator's arenas: nothing to do outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() -> bool {
    false
}

/// Returns the allocator's free memory to the system; whether any was. Takes milliseconds
/// on a large heap and holds each arena's lock meanwhile: call it off the runtime's workers.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // an FFI call without arguments to point at; see SAFETY
pub fn trim() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and only walks glibc's own heap under its arena
    // locks; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns the allocator's free memory to the system: nothing to do outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_burst_settles_and_during_a_long_one() {
        let mut t = Trimmer::default();
        assert!(!t.due(0), "nothing opened");
        assert!(!t.due(1000), "still arriving");
        assert!(t.due(1000), "settled");
        assert!(!t.due(1000), "once");
        // A long burst: a trim every TRIM_DURING_BURST links, at most one per TRIM_MIN_CHECKS
        // looks.
        let mut trims = 0;
        let mut opened = 1000;
        for _ in 0..20 * (TRIM_MIN_CHECKS + 1) {
            opened += 1000;
            if t.due(opened) {
                trims += 1;
            }
        }
        assert_eq!(trims, 20);
        assert!(!t.due(opened), "settled, but trimmed a moment ago");
        for _ in 0..TRIM_MIN_CHECKS {
            t.due(opened);
        }
        assert!(!t.due(opened), "nothing opened since");
    }

    #[test]
    fn handshakes_in_waves_trim_at_most_once_per_min_checks() {
        // An outsider opens 64 links, waits a look, and again: a trim each time before.
        let mut t = Trimmer::default();
        let mut opened = 0;
        let mut trims = 0;
        let looks = 20 * (TRIM_MIN_CHECKS + 1);
        for _ in 0..looks / 2 {
            opened += TRIM_AFTER_LINKS;
            for _ in 0..2 {
                if t.due(opened) {
                    trims += 1;
                }
            }
        }
        // Each wave settles, so each was trimmed before: 310 trims in 620 looks.
        assert_eq!(trims, 20, "one per {} looks", TRIM_MIN_CHECKS + 1);
    }

    #[test]
    fn trimming_is_harmless() {
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![1; 1000 + i]).collect();
        drop(v);
        trim();
        // The allocator still serves allocations, large and small, after the trim.
        let big: Vec<u8> = std::iter::repeat_n(2u8, 1 << 20).collect();
        let small: Vec<Vec<u8>> = (0..100).map(|i| vec![3; i]).collect();
        assert!(big.iter().all(|b| *b == 2) && small[99].len() == 99);
    }
}
