//! The site's nftables table, `inet pinhole_site`, applied atomically in one `nft -f` batch.
//!
//! Policy (a value, rendered to one ruleset):
//! * forward from the TUN to the device interface only to the sessions' agents (address,
//!   protocol, port; ICMP echo to an agent's address), and their replies back;
//! * nothing else is forwarded to or from the device interface: the uplink (office) network
//!   and the device (machine) network never meet, in either direction;
//! * input on the device interface only for replies to the site's own traffic;
//! * session traffic leaves the device interface masqueraded to the site's address there, so
//!   devices need no route back to the tunnel network.
//!
//! The table is created at start (before the first session) and deleted at exit.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use pinhole_proto::{Port, Transport};

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

/// What the firewall lets through: the agents of the open sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allowed: BTreeSet<(IpAddr, Port)>,
    pub echo: BTreeSet<IpAddr>,
}

fn quote(ifname: &str) -> String {
    // Interface names were validated (no quotes, no spaces) when the configuration was read.
    format!("\"{ifname}\"")
}

/// The ruleset text for `policy`.
pub fn render(tun: &str, device: &str, policy: &Policy) -> String {
    let (tun, dev) = (quote(tun), quote(device));
    let v4: Vec<String> = policy
        .allowed
        .iter()
        .filter(|(ip, _)| ip.is_ipv4())
        .map(|(ip, p)| {
            let proto = match p.transport {
                Transport::Tcp => "tcp",
                Transport::Udp => "udp",
            };
            format!("{ip} . {proto} . {}", p.port)
        })
        .collect();
    let echo: Vec<String> = policy
        .echo
        .iter()
        .filter(|ip| ip.is_ipv4())
        .map(ToString::to_string)
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
    set agents {{ type ipv4_addr . inet_proto . inet_service; {agents} }}
    set echo {{ type ipv4_addr; {echo} }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname {tun} oifname {dev} ip saddr {TUNNEL_NET} ip daddr . meta l4proto . th dport @agents accept
        iifname {tun} oifname {dev} ip saddr {TUNNEL_NET} ip daddr @echo icmp type echo-request accept
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

/// Replaces the table with the one for `policy`, atomically.
pub async fn apply(tun: &str, device: &str, policy: &Policy) -> Result<(), FirewallError> {
    nft(&render(tun, device, policy)).await
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
        p.allowed
            .insert(("192.168.0.10".parse().expect("ip"), Port::tcp(102)));
        p.allowed
            .insert(("192.168.0.10".parse().expect("ip"), Port::udp(161)));
        p.echo.insert("192.168.0.10".parse().expect("ip"));
        let text = render("pinhole-site0", "eth1", &p);
        assert!(
            text.contains("elements = { 192.168.0.10 . tcp . 102, 192.168.0.10 . udp . 161 }"),
            "{text}"
        );
        assert!(text.contains("iifname \"eth1\" drop"));
        assert!(text.contains("oifname \"eth1\" drop"));
        assert!(text.contains("masquerade"));
        let empty = render("pinhole-site0", "eth1", &Policy::default());
        assert!(!empty.contains("elements"), "{empty}");
    }
}
