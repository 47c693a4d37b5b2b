//! Free space in the state directory's file system, against a reserve.
//!
//! Every change and every login appends an audit record, and a record that cannot be written
//! refuses its action: a full disk stops the gateway. The reserve is the margin at which the
//! gateway starts saying so — in its log every minute and in `pinhole-gateway status` — while
//! there is still room to act. By default it is 256 MiB or 2 % of the file system, whichever is
//! larger: 256 MiB holds about a million audit records, 2 % keeps pace with large volumes where
//! other writers fill space faster.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

const MIB: u64 = 1 << 20;

/// The default reserve's floor.
const DEFAULT_BYTES: u64 = 256 * MIB;

/// The default reserve's share of the file system, in percent.
const DEFAULT_PERCENT: u8 = 2;

/// How much free space the gateway wants to keep: `bytes` or `percent` of the file system,
/// whichever is larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskReserve {
    bytes: u64,
    percent: u8,
}

impl Default for DiskReserve {
    fn default() -> Self {
        Self {
            bytes: DEFAULT_BYTES,
            percent: DEFAULT_PERCENT,
        }
    }
}

impl DiskReserve {
    /// The reserve in bytes on a file system of `total` bytes.
    pub fn of(&self, total: u64) -> u64 {
        let share =
            u64::try_from(u128::from(total) * u128::from(self.percent) / 100).unwrap_or(u64::MAX);
        self.bytes.max(share)
    }
}

impl fmt::Display for DiskReserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.bytes, self.percent) {
            (b, 0) => f.write_str(&human(b)),
            (0, p) => write!(f, "{p} %"),
            (b, p) => write!(f, "{} or {p} %, whichever is larger", human(b)),
        }
    }
}

/// Why a `--disk-reserve` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a disk reserve: give a size (e.g. 512MiB, 2GiB) or a share of the file system (e.g. 5%)"
)]
pub struct ParseReserveError(String);

impl FromStr for DiskReserve {
    type Err = ParseReserveError;

    /// `512MiB`, `2GiB`, `300M`, `1048576` (bytes), or `5%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseReserveError(s.to_owned());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let percent: u8 = p.trim().parse().map_err(|_| err())?;
            if percent > 100 {
                return Err(err());
            }
            return Ok(Self { bytes: 0, percent });
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let number: u64 = number.parse().map_err(|_| err())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(err()),
        };
        let bytes = number.checked_mul(1 << shift).ok_or_else(err)?;
        Ok(Self { bytes, percent: 0 })
    }
}

/// Free space in the file system that holds a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskStatus {
    pub path: PathBuf,
    /// Size of the file system.
    pub total_bytes: u64,
    /// Space an unprivileged writer may still use (root may have a little more).
    pub available_bytes: u64,
    /// The reserve, in bytes, on this file system.
    pub reserve_bytes: u64,
    /// `available_bytes < reserve_bytes`.
    pub low: bool,
}

impl DiskStatus {
    /// The loud message to log while the space is low; `None` while it is not.
    pub fn warning(&self) -> Option<String> {
        self.low.then(|| {
            format!(
                "LOW DISK SPACE: {} free in the file system of {}, below the reserve of {}; free space now: when it runs out, the audit log cannot be written and every change and login is refused",
                human(self.available_bytes),
                crate::audit::escape(&self.path.to_string_lossy()),
                human(self.reserve_bytes),
            )
        })
    }
}

/// Free space and reserve for the file system holding `dir`.
pub fn disk_status(dir: &Path, reserve: DiskReserve) -> io::Result<DiskStatus> {
    let st = rustix::fs::statvfs(dir)?;
    let block = st.f_frsize;
    let total = st.f_blocks.saturating_mul(block);
    let available = st.f_bavail.saturating_mul(block);
    let reserve_bytes = reserve.of(total);
    Ok(DiskStatus {
        path: dir.to_owned(),
        total_bytes: total,
        available_bytes: available,
        reserve_bytes,
        low: available < reserve_bytes,
    })
}

/// `1.5 GiB`, `300 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit < UNITS.len() - 1 {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // Display only: a float's rounding is fine here.
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_reserve_is_the_larger_of_256_mib_and_2_percent() {
        let r = DiskReserve::default();
        assert_eq!(r.of(1 << 30), 256 * MIB);
        assert_eq!(r.of(100 << 30), 2 << 30);
        assert_eq!(r.to_string(), "256 MiB or 2 %, whichever is larger");
    }

    #[test]
    fn reserves_parse_as_sizes_or_shares() {
        let p = |s: &str| s.parse::<DiskReserve>();
        assert_eq!(p("512MiB").expect("mib").of(0), 512 * MIB);
        assert_eq!(p("2 GiB").expect("gib").of(0), 2 << 30);
        assert_eq!(p("300M").expect("m").of(0), 300 * MIB);
        assert_eq!(p("4096").expect("bytes").of(0), 4096);
        assert_eq!(p("5%").expect("percent").of(1000), 50);
        assert_eq!(p("100%").expect("all").of(1000), 1000);
        for bad in [
            "",
            "-1",
            "5 potatoes",
            "101%",
            "1.5GiB",
            "99999999999999TiB",
        ] {
            let e = p(bad).expect_err(bad);
            assert!(e.to_string().contains("e.g. 512MiB"), "{e}");
        }
    }

    #[test]
    fn a_real_directory_has_a_status_and_a_full_reserve_is_low() {
        let dir = tempfile::tempdir().expect("dir");
        let st = disk_status(dir.path(), DiskReserve::default()).expect("statvfs");
        assert!(st.total_bytes > 0 && st.available_bytes <= st.total_bytes);
        let st = disk_status(dir.path(), "100%".parse().expect("r")).expect("statvfs");
        assert!(st.low);
        assert!(st.warning().expect("warning").starts_with("LOW DISK SPACE"));
        let st = disk_status(dir.path(), "0".parse().expect("r")).expect("statvfs");
        assert!(!st.low && st.warning().is_none());
        assert!(disk_status(&dir.path().join("missing"), DiskReserve::default()).is_err());
    }

    #[test]
    fn sizes_read_as_a_human_would_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(256 * MIB), "256 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
