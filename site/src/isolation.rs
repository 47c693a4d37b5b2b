//! The device side's own routing domain: what keeps the office (uplink) network and the
//! machine (device) network apart whatever the firewall says and whether or not pinhole-site
//! runs.
//!
//! The Linux way is a VRF; kernels built without `CONFIG_NET_VRF` (the one this was written
//! on, for one) cannot make one, and a separate network namespace would have to take the
//! device interface away from the system's own network configuration (its addresses,
//! ifupdown or NetworkManager) and be kept alive by a bind mount that a private mount
//! namespace (systemd's `PrivateMounts`, `ip netns exec`) makes disappear with the process. A
//! VRF is itself a routing table plus a policy rule per interface, so the site builds exactly
//! that with policy routing:
//!
//! | pref            | rule                               | why |
//! |-----------------|------------------------------------|-----|
//! | [`PREF_TUN`]    | `iif <tun> lookup` [`TABLE`]       | session traffic is routed only in the device table |
//! | [`PREF_DEVICE`] | `iif <device> lookup` [`TABLE`]    | the plant's packets too: that table has no route to the uplink (`unreachable default`) |
//! | [`PREF_LOCAL`]  | `iif lo lookup main`               | the site's own traffic (an admin's ping) keeps the system's routes |
//! | [`PREF_FENCE`]  | `to <device route> prohibit`, `to 100.64.0.0/10 prohibit` | anything else (the uplink) has no route to the plant or the tunnel network |
//!
//! The rules and the table restrict only, so they stay in place when the site stops (clean or
//! not) and are rebuilt at every start. What opens a path is forwarding: it is switched on
//! per interface (`net.ipv4.conf.<tun|device>.forwarding`, never `net.ipv4.ip_forward`, which
//! would make the uplink forward too), only after the firewall table is in place, and set
//! back to what it was at exit and after a failed start. The original values are written to
//! `isolation.state` in the state directory before anything changes, so that the next start
//! repairs what a crash left behind.
//!
//! Must never: switch on forwarding on an interface other than the TUN and the device
//! interface, or before the firewall table exists.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::{info, warn};

use crate::config::IfName;
use crate::firewall::TUNNEL_NET;

/// The device domain's routing table. Any id the system does not use would do; this one is
/// the protocol number pinhole tags its host routes with (231), made four digits.
pub const TABLE: u32 = 7231;

/// Rule priorities: above the local table (0), below main (32766), in a range of their own
/// so that a start can remove every rule a crashed run left.
pub const PREF_TUN: u32 = 7231;
pub const PREF_DEVICE: u32 = 7232;
pub const PREF_LOCAL: u32 = 7233;
pub const PREF_FENCE: u32 = 7234;
const PREFS: std::ops::RangeInclusive<u32> = PREF_TUN..=PREF_FENCE;

/// A bound on rule deletions per priority: more rules than any device network has routes.
const MAX_RULES_PER_PREF: usize = 1024;

/// The record of what the site changed, in the state directory.
const RECORD: &str = "isolation.state";

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("running ip: {0} (is iproute2 installed?)")]
    Spawn(std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("{path}: {source}")]
    Sysctl {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn ip(args: &[&str]) -> Result<String, IsolationError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(IsolationError::Spawn)?;
    if !out.status.success() {
        return Err(IsolationError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn forwarding_path(ifname: &IfName) -> PathBuf {
    Path::new("/proc/sys/net/ipv4/conf")
        .join(ifname.as_str())
        .join("forwarding")
}

fn read_sysctl(path: &Path) -> Result<String, IsolationError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| IsolationError::Sysctl {
            path: path.to_owned(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), IsolationError> {
    fs::write(path, value).map_err(|source| IsolationError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// The destinations the system routes through `dev` (its connected networks and any static
/// routes behind it), IPv4 or IPv6; link-local and multicast ones stay where they are.
fn device_routes(
    family: &str,
    dev: &IfName,
) -> Result<Vec<(String, Option<String>)>, IsolationError> {
    let text = ip(&[
        family,
        "-j",
        "route",
        "show",
        "table",
        "main",
        "dev",
        dev.as_str(),
    ])?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    Ok(routes
        .iter()
        .filter_map(|r| {
            let dst = r.get("dst")?.as_str()?.to_owned();
            let gateway = r.get("gateway").and_then(|g| g.as_str()).map(str::to_owned);
            Some((dst, gateway))
        })
        .filter(|(dst, _)| dst != "default" && !dst.starts_with("fe80") && !dst.starts_with("ff"))
        .collect())
}

/// The address families to fence: IPv6 too unless the kernel runs without it.
fn families() -> &'static [&'static str] {
    if Path::new("/proc/sys/net/ipv6").exists() {
        &["-4", "-6"]
    } else {
        &["-4"]
    }
}

/// Removes every rule in the site's priority range and empties its table (both families).
/// Idempotent: run at every start, after whatever the last run left.
pub fn sweep() {
    for family in families() {
        for pref in PREFS {
            let pref = pref.to_string();
            for _ in 0..MAX_RULES_PER_PREF {
                if ip(&[family, "rule", "del", "pref", &pref]).is_err() {
                    break;
                }
            }
        }
        let _ = ip(&[family, "route", "flush", "table", &TABLE.to_string()]);
    }
}

/// The device domain, established. Dropping it does nothing: call [`DeviceDomain::release`].
#[derive(Debug)]
pub struct DeviceDomain {
    tun: IfName,
    device: IfName,
    record: PathBuf,
    /// The device interface's `forwarding` before the site changed it.
    device_forwarding: String,
    forwarding: bool,
}

impl DeviceDomain {
    /// Repairs what an earlier run left, records the current forwarding setting, and builds
    /// the rules and the table. Forwarding stays off: switch it on with
    /// [`DeviceDomain::set_forwarding`] once the firewall is in place.
    pub fn establish(state: &Path, tun: IfName, device: IfName) -> Result<Self, IsolationError> {
        let record = state.join(RECORD);
        repair(&record);
        let device_forwarding = read_sysctl(&forwarding_path(&device))?;
        fs::write(
            &record,
            format!("{}\n{}\n", device.as_str(), device_forwarding),
        )
        .map_err(|source| IsolationError::Record {
            path: record.clone(),
            source,
        })?;
        let mut domain = Self {
            tun,
            device,
            record,
            device_forwarding,
            forwarding: true,
        };
        // A new TUN takes `conf.default.forwarding`, which an admin may have set to 1: off
        // until the firewall is in place.
        domain.set_forwarding(false)?;
        if let Err(e) = domain.build() {
            domain.release();
            return Err(e);
        }
        let global = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        if global.trim() == "1" {
            warn!(
                "net.ipv4.ip_forward is 1: this machine forwards on every interface, the uplink \
                 included; the device domain still keeps the office and the plant apart, but set \
                 it to 0 unless something else on this machine needs it"
            );
        }
        Ok(domain)
    }

    fn build(&self) -> Result<(), IsolationError> {
        sweep();
        let table = TABLE.to_string();
        let (tun, dev) = (self.tun.as_str(), self.device.as_str());
        let mut fenced = String::new();
        for family in families() {
            ip(&[
                family,
                "route",
                "add",
                "unreachable",
                "default",
                "table",
                &table,
            ])?;
            for (dst, gateway) in device_routes(family, &self.device)? {
                match &gateway {
                    Some(gw) => ip(&[
                        family,
                        "route",
                        "add",
                        dst.as_str(),
                        "via",
                        gw.as_str(),
                        "dev",
                        dev,
                        "table",
                        &table,
                    ])?,
                    None => ip(&[
                        family,
                        "route",
                        "add",
                        dst.as_str(),
                        "dev",
                        dev,
                        "table",
                        &table,
                    ])?,
                };
                ip(&[
                    family,
                    "rule",
                    "add",
                    "pref",
                    &PREF_FENCE.to_string(),
                    "to",
                    dst.as_str(),
                    "prohibit",
                ])?;
                let _ = write!(fenced, " {dst}");
            }
            ip(&[
                family,
                "rule",
                "add",
                "pref",
                &PREF_TUN.to_string(),
                "iif",
                tun,
                "lookup",
                &table,
            ])?;
            ip(&[
                family,
                "rule",
                "add",
                "pref",
                &PREF_DEVICE.to_string(),
                "iif",
                dev,
                "lookup",
                &table,
            ])?;
            ip(&[
                family,
                "rule",
                "add",
                "pref",
                &PREF_LOCAL.to_string(),
                "iif",
                "lo",
                "lookup",
                "main",
            ])?;
        }
        ip(&[
            "-4", "route", "add", TUNNEL_NET, "dev", tun, "table", &table,
        ])?;
        ip(&[
            "-4",
            "rule",
            "add",
            "pref",
            &PREF_FENCE.to_string(),
            "to",
            TUNNEL_NET,
            "prohibit",
        ])?;
        info!(table = TABLE, device = dev, tun, fenced = %fenced.trim(), "device routing domain in place");
        Ok(())
    }

    /// Switches forwarding on or off on the TUN and the device interface (only there).
    pub fn set_forwarding(&mut self, on: bool) -> Result<(), IsolationError> {
        let value = if on { "1" } else { "0" };
        write_sysctl(&forwarding_path(&self.tun), value)?;
        write_sysctl(&forwarding_path(&self.device), value)?;
        self.forwarding = on;
        Ok(())
    }

    pub fn forwarding(&self) -> bool {
        self.forwarding
    }

    /// Sets the device interface's forwarding back to what it was and forgets the record.
    /// The rules and the table stay: they only restrict, and keep the networks apart while
    /// the site is stopped.
    pub fn release(&mut self) {
        let _ = write_sysctl(&forwarding_path(&self.tun), "0");
        if let Err(e) = write_sysctl(&forwarding_path(&self.device), &self.device_forwarding) {
            warn!(error = %e, "cannot restore the device interface's forwarding setting");
        }
        self.forwarding = false;
        if let Err(e) = fs::remove_file(&self.record)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %e, "cannot remove the isolation record");
        }
    }
}

/// Restores what a run that could not clean up (a crash, a power cut during start) recorded.
fn repair(record: &Path) {
    let Ok(text) = fs::read_to_string(record) else {
        return;
    };
    let mut lines = text.lines();
    let (Some(dev), Some(value)) = (lines.next(), lines.next()) else {
        warn!(record = %record.display(), "damaged isolation record: ignored");
        let _ = fs::remove_file(record);
        return;
    };
    match (dev.parse::<IfName>(), value) {
        (Ok(dev), "0" | "1") => {
            let path = forwarding_path(&dev);
            if path.exists() {
                match write_sysctl(&path, value) {
                    Ok(()) => {
                        info!(
                            device = dev.as_str(),
                            forwarding = value,
                            "restored the device interface's forwarding after an unclean stop"
                        )
                    }
                    Err(e) => warn!(error = %e, "cannot restore forwarding after an unclean stop"),
                }
            }
        }
        _ => warn!(record = %record.display(), "damaged isolation record: ignored"),
    }
    let _ = fs::remove_file(record);
}

/// Removes the device domain entirely (`pinhole-site remove-isolation`, before uninstalling).
pub fn remove(state: &Path) {
    repair(&state.join(RECORD));
    sweep();
}
