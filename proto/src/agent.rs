//! Device agents: what a session may reach (one device address, a set of ports).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Transport protocol of an allowed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// One allowed port, written `tcp/102` or `udp/2222`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    pub transport: Transport,
    pub port: u16,
}

impl Port {
    pub const fn tcp(port: u16) -> Self {
        Self {
            transport: Transport::Tcp,
            port,
        }
    }

    pub const fn udp(port: u16) -> Self {
        Self {
            transport: Transport::Udp,
            port,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a port: write tcp/N or udp/N with N from 1 to 65535")]
pub struct BadPort(pub String);

impl FromStr for Port {
    type Err = BadPort;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPort(s.to_owned());
        let (proto, num) = s.split_once('/').ok_or_else(bad)?;
        let transport = match proto {
            "tcp" => Transport::Tcp,
            "udp" => Transport::Udp,
            _ => return Err(bad()),
        };
        let port: u16 = num.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(Self { transport, port })
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        write!(f, "{t}/{}", self.port)
    }
}

/// Agent types: presets of ports for common industrial equipment, or `custom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentType {
    SiemensS7,
    Rdp,
    Vnc,
    Http,
    Modbus,
    Opcua,
    EthernetIp,
    Ssh,
    Custom,
}

impl AgentType {
    pub const ALL: [AgentType; 9] = [
        AgentType::SiemensS7,
        AgentType::Rdp,
        AgentType::Vnc,
        AgentType::Http,
        AgentType::Modbus,
        AgentType::Opcua,
        AgentType::EthernetIp,
        AgentType::Ssh,
        AgentType::Custom,
    ];

    /// The preset's ports.
    pub fn preset(self) -> &'static [Port] {
        const S7: &[Port] = &[Port::tcp(102)];
        const RDP: &[Port] = &[Port::tcp(3389), Port::udp(3389)];
        const VNC: &[Port] = &[Port::tcp(5900)];
        const HTTP: &[Port] = &[Port::tcp(80), Port::tcp(443)];
        const MODBUS: &[Port] = &[Port::tcp(502)];
        const OPCUA: &[Port] = &[Port::tcp(4840)];
        const ENIP: &[Port] = &[Port::tcp(44818), Port::udp(2222)];
        const SSH: &[Port] = &[Port::tcp(22)];
        match self {
            AgentType::SiemensS7 => S7,
            AgentType::Rdp => RDP,
            AgentType::Vnc => VNC,
            AgentType::Http => HTTP,
            AgentType::Modbus => MODBUS,
            AgentType::Opcua => OPCUA,
            AgentType::EthernetIp => ENIP,
            AgentType::Ssh => SSH,
            AgentType::Custom => &[],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AgentType::SiemensS7 => "siemens-s7",
            AgentType::Rdp => "rdp",
            AgentType::Vnc => "vnc",
            AgentType::Http => "http",
            AgentType::Modbus => "modbus",
            AgentType::Opcua => "opcua",
            AgentType::EthernetIp => "ethernet-ip",
            AgentType::Ssh => "ssh",
            AgentType::Custom => "custom",
        }
    }
}

impl fmt::Display for AgentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AgentType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!("unknown agent type `{s}` (one of: {})", names.join(", "))
            })
    }
}

/// A device agent as the site reports it: the device it reaches and the ports allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: AgentType,
    pub address: IpAddr,
    /// Preset and extra ports, sorted, without duplicates.
    pub ports: BTreeSet<Port>,
}

impl Agent {
    /// An agent with its type's preset ports plus `extra`.
    pub fn new(
        name: impl Into<String>,
        kind: AgentType,
        address: IpAddr,
        extra: impl IntoIterator<Item = Port>,
    ) -> Self {
        let mut ports: BTreeSet<Port> = kind.preset().iter().copied().collect();
        ports.extend(extra);
        Self {
            name: name.into(),
            kind,
            address,
            ports,
        }
    }

    /// The ports as text: `tcp/80,tcp/443`.
    pub fn ports_text(&self) -> String {
        self.ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_design() {
        let a = Agent::new(
            "plc",
            AgentType::SiemensS7,
            "192.168.0.10".parse().expect("ip"),
            [],
        );
        assert_eq!(a.ports_text(), "tcp/102");
        let e = Agent::new(
            "d",
            AgentType::EthernetIp,
            "10.0.0.1".parse().expect("ip"),
            [Port::udp(161)],
        );
        assert_eq!(e.ports_text(), "tcp/44818,udp/161,udp/2222");
        assert_eq!(
            Agent::new("r", AgentType::Rdp, "10.0.0.1".parse().expect("ip"), []).ports_text(),
            "tcp/3389,udp/3389"
        );
        for t in AgentType::ALL {
            assert_eq!(t.name().parse::<AgentType>(), Ok(t));
        }
    }

    #[test]
    fn ports_parse_strictly() {
        assert_eq!("tcp/8080".parse::<Port>(), Ok(Port::tcp(8080)));
        assert_eq!("udp/161".parse::<Port>(), Ok(Port::udp(161)));
        for bad in [
            "tcp/0",
            "tcp/65536",
            "sctp/1",
            "8080",
            "tcp/",
            "tcp/-1",
            "TCP/80",
        ] {
            assert!(bad.parse::<Port>().is_err(), "{bad}");
        }
    }
}
