//! The site's nftables table, `inet pinhole_site`, applied atomically in one `nft -f` batch.
//!
//! This is the second layer: the first is the device side's own routing domain
//! ([`crate::isolation`]), which leaves the uplink no route to the plant whatever this table
//! says.
//!
//! Policy (a value, rendered to one ruleset):
//! * forward from the TUN to the device interface only what a session's agents allow, bound
//!   to that session's tunnel address (`ip saddr . ip daddr . l4proto . dport`), so one
//!   technician's allowance never opens a port for another; ICMP echo likewise; and replies;
//! * nothing else is forwarded to or from the device interface: the uplink (office) network
//!   and the device (machine) network never meet, in either direction;
//! * input on the device interface only for replies to the site's own traffic; nothing from
//!   the TUN to the site itself;
//! * session traffic leaves the device interface masqueraded to the site's address there, so
//!   devices need no route back to the tunnel network.
//!
//! The table is created at start (before forwarding is switched on) and deleted at exit.
//! [`Firewall`] keeps what it applied and checks every second that the table is still there
//! as applied ([`Firewall::check`]); the agent restores it and reports it to the gateway.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use pinhole_proto::{FirewallChange, Port, Transport};

use crate::config::IfName;

/// The table's name (the only one pinhole-site touches).
pub const TABLE: &str = "pinhole_site";

/// The tunnel network: technicians' addresses.
pub const TUNNEL_NET: &str = "100.64.0.0/10";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running nft: {0} (is the nftables package installed?)")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Nft(String),
}

/// What the firewall lets through: per session (its tunnel address), the agents' devices and
/// ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// (tunnel address, device address, port).
    pub allowed: BTreeSet<(IpAddr, IpAddr, Port)>,
    /// (tunnel address, device address): ICMP echo.
    pub echo: BTreeSet<(IpAddr, IpAddr)>,
}

fn quote(ifname: &IfName) -> String {
    // An `IfName` holds only `[A-Za-z0-9_.:-]`: nothing that could end the string.
    format!("\"{ifname}\"")
}

/// The ruleset text for `policy`.
pub fn render(tun: &IfName, device: &IfName, policy: &Policy) -> String {
    let (tun, dev) = (quote(tun), quote(device));
    let v4: Vec<String> = policy
        .allowed
        .iter()
        .filter(|(src, dst, _)| src.is_ipv4() && dst.is_ipv4())
        .map(|(src, dst, p)| {
            let proto = match p.transport {
                Transport::Tcp => "tcp",
                Transport::Udp => "udp",
            };
            format!("{src} . {dst} . {proto} . {}", p.port)
        })
        .collect();
    let echo: Vec<String> = policy
        .echo
        .iter()
        .filter(|(src, dst)| src.is_ipv4() && dst.is_ipv4())
        .map(|(src, dst)| format!("{src} . {dst}"))
        .collect();
    let elements = |e: &[String]| {
        if e.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}", e.join(", "))
        }
    };
    format!(
        "table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    set agents {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; {agents} }}
    set echo {{ type ipv4_addr . ipv4_addr; {echo} }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname {tun} oifname {dev} ip saddr {TUNNEL_NET} ip saddr . ip daddr . meta l4proto . th dport @agents accept
        iifname {tun} oifname {dev} ip saddr {TUNNEL_NET} ip saddr . ip daddr @echo icmp type echo-request accept
        iifname {dev} oifname {tun} ct state established,related accept
        iifname {tun} oifname {dev} ip saddr {TUNNEL_NET} meta l4proto icmp ct state related accept
        iifname {dev} drop
        oifname {dev} drop
        iifname {tun} drop
        oifname {tun} drop
    }}
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname {dev} ct state established,related accept
        iifname {dev} drop
        iifname {tun} drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname {dev} ip saddr {TUNNEL_NET} masquerade
    }}
}}
",
        agents = elements(&v4),
        echo = elements(&echo),
    )
}

/// Runs `nft -f -` without blocking the runtime: the site's one thread also carries every
/// session's packets, which must not stall while nft loads a ruleset.
async fn nft(script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(FirewallError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(FirewallError::Spawn)?;
    if !out.status.success() {
        return Err(FirewallError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The table as the kernel has it now (`nft list table`); `None` if it does not exist.
async fn listing() -> Result<Option<String>, FirewallError> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(FirewallError::Spawn)?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") || err.contains("does not exist") {
        return Ok(None);
    }
    Err(FirewallError::Nft(err.trim().to_owned()))
}

/// The site's table: what was applied last, to apply again when it was removed or changed.
#[derive(Debug)]
pub struct Firewall {
    tun: IfName,
    device: IfName,
    policy: Policy,
    /// The kernel's listing right after the last apply.
    applied: Option<String>,
}

impl Firewall {
    pub fn new(tun: IfName, device: IfName) -> Self {
        Self {
            tun,
            device,
            policy: Policy::default(),
            applied: None,
        }
    }

    /// Replaces the table with the one for `policy`, atomically, and records the kernel's
    /// listing of it ([`Firewall::load`], then [`Firewall::record_applied`]).
    pub async fn apply(&mut self, policy: &Policy) -> Result<(), FirewallError> {
        self.load(policy).await?;
        self.record_applied().await
    }

    /// Replaces the table with the one for `policy`, atomically: when this returns, the kernel
    /// filters with it. [`Firewall::check`] reports it changed until
    /// [`Firewall::record_applied`] ran.
    pub async fn load(&mut self, policy: &Policy) -> Result<(), FirewallError> {
        self.applied = None;
        // Taken before nft runs: if the load fails, the watcher restores this policy (a closed
        // session's address gone), never the older one.
        self.policy = policy.clone();
        nft(&render(&self.tun, &self.device, policy)).await?;
        Ok(())
    }

    /// Records the kernel's listing of the table, what [`Firewall::check`] compares with.
    pub async fn record_applied(&mut self) -> Result<(), FirewallError> {
        self.applied = listing().await?;
        Ok(())
    }

    /// Whether the table is still as applied: `None` if so, else what happened to it.
    pub async fn check(&self) -> Result<Option<FirewallChange>, FirewallError> {
        Ok(match listing().await? {
            None => Some(FirewallChange::Removed),
            Some(now) if Some(&now) != self.applied.as_ref() => Some(FirewallChange::Changed),
            Some(_) => None,
        })
    }

    /// Applies the last policy again.
    pub async fn restore(&mut self) -> Result<(), FirewallError> {
        let policy = self.policy.clone();
        self.apply(&policy).await
    }
}

/// Deletes the table (at exit).
pub async fn remove() -> Result<(), FirewallError> {
    nft(&format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
    ))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_agents_and_isolation() {
        let mut p = Policy::default();
        let (alice, plc) = (
            "100.64.0.7".parse().expect("ip"),
            "192.168.0.10".parse().expect("ip"),
        );
        p.allowed.insert((alice, plc, Port::tcp(102)));
        p.allowed.insert((alice, plc, Port::udp(161)));
        p.echo.insert((alice, plc));
        let (tun, dev) = (
            "pinhole-site0".parse().expect("tun"),
            "eth1".parse().expect("dev"),
        );
        let text = render(&tun, &dev, &p);
        assert!(
            text.contains(
                "elements = { 100.64.0.7 . 192.168.0.10 . tcp . 102, 100.64.0.7 . 192.168.0.10 . udp . 161 }"
            ),
            "{text}"
        );
        assert!(text.contains("ip saddr . ip daddr . meta l4proto . th dport @agents"));
        assert!(text.contains("elements = { 100.64.0.7 . 192.168.0.10 }"));
        assert!(text.contains("iifname \"eth1\" drop"));
        assert!(text.contains("oifname \"eth1\" drop"));
        assert!(
            text.contains("iifname \"pinhole-site0\" drop\n    }\n    chain postrouting"),
            "input from the TUN is dropped: {text}"
        );
        assert!(text.contains("masquerade"));
        let empty = render(&tun, &dev, &Policy::default());
        assert!(!empty.contains("elements"), "{empty}");
    }
}
