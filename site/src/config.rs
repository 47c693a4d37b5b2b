//! `site.toml`: what a site is called, where its gateway is, and its device agents.
//!
//! ```toml
//! name = "plant-a"
//! gateway = ["gw.example.com:443", "gw.example.com:11444"]   # tried in order
//! token = "…@sha256:…"            # from `site-token create`; remove it after enrollment
//! device_interface = "eth1"      # the interface towards the machines
//! heartbeat = "10m"              # default 10m
//! offload = true                 # default true: take GSO super-packets (see below)
//!
//! [switch]                       # optional "remote access allowed" input
//! path = "/sys/class/gpio/gpio17/value"
//! mode = "enable-when-1"         # or "disable-when-1"
//!
//! [light]                        # optional "remote access active" output
//! path = "/sys/class/gpio/gpio18/value"   # gets 1 / 0
//! command = "/usr/local/bin/beacon"       # run with `on` / `off`
//!
//! [proxy]                       # optional corporate HTTP proxy (CONNECT)
//! url = "http://proxy.corp:3128"
//! auth = "ntlm"                  # "none" (default), "basic" or "ntlm"
//! credentials = "/etc/pinhole/proxy-credentials"   # user (or DOMAIN\user), then password; mode 600
//!
//! [[agent]]
//! name = "press-4-plc"
//! type = "siemens-s7"            # a preset, or "custom"
//! address = "192.168.0.10"
//! ports = ["tcp/8080", "udp/161"]   # optional extra ports
//! ```
//!
//! Unknown keys, bad addresses and bad ports are refused with an error that names the key and
//! the value.
//!
//! `offload = false` makes the site announce no offload to the gateway (its `hello` then reads
//! as one from a site that predates offload): technicians send it MTU-size packets only, and a
//! super-packet's trailer that arrives anyway is dropped (`pinhole_proto::message`, offload
//! negotiation).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pinhole_certs::{EnrollmentToken, GatewayAddress};
use pinhole_proto::{Agent, AgentType, Port};
use serde::Deserialize;

/// A network interface name as the kernel accepts it (`dev_valid_name`): 1 to 15 bytes of
/// `[A-Za-z0-9_.:-]`, not `.` or `..`. Only such names reach a command line or a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfName(String);

/// `IFNAMSIZ` (16) minus the terminating zero.
const MAX_IFNAME: usize = 15;

impl IfName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for IfName {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_IFNAME {
            return Err("an interface name has 1 to 15 characters");
        }
        if s == "." || s == ".." {
            return Err("not a Linux interface name");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err("an interface name has only letters, digits and `_ . : -`");
        }
        Ok(Self(s.to_owned()))
    }
}

/// A site that reports every ten minutes is noticed offline within half an hour, at a cost of
/// a few bytes; sites on metered links may raise it.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: `{key}` = {value:?}: {why}")]
    Value {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    gateway: Vec<String>,
    token: Option<String>,
    device_interface: Option<String>,
    heartbeat: Option<String>,
    offload: Option<bool>,
    switch: Option<RawSwitch>,
    light: Option<RawLight>,
    proxy: Option<RawProxy>,
    #[serde(default)]
    agent: Vec<RawAgent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    url: String,
    #[serde(default)]
    auth: pinhole_shell::proxy::Auth,
    credentials: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwitch {
    path: PathBuf,
    mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLight {
    path: Option<PathBuf>,
    command: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    address: String,
    #[serde(default)]
    ports: Vec<String>,
}

/// How the switch input reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// Access is enabled while the input reads `1`.
    EnableWhen1,
    /// Access is disabled while the input reads `1`.
    DisableWhen1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub path: PathBuf,
    pub mode: SwitchMode,
}

impl Switch {
    /// Whether remote access is allowed now. An unreadable input counts as "disabled": the
    /// switch fails closed.
    pub fn enabled(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return false;
        };
        let one = text.trim() == "1";
        match self.mode {
            SwitchMode::EnableWhen1 => one,
            SwitchMode::DisableWhen1 => !one && text.trim() == "0",
        }
    }

    /// The value to write for "access on" / "access off" (for sites without hardware).
    pub fn value_for(&self, on: bool) -> &'static str {
        match (self.mode, on) {
            (SwitchMode::EnableWhen1, true) | (SwitchMode::DisableWhen1, false) => "1",
            _ => "0",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Light {
    pub path: Option<PathBuf>,
    pub command: Option<PathBuf>,
}

/// A validated site configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub gateways: Vec<GatewayAddress>,
    pub token: Option<EnrollmentToken>,
    pub device_interface: Option<IfName>,
    pub heartbeat: Duration,
    /// Announce offload (take GSO super-packets with their trailer); default true.
    pub offload: bool,
    pub switch: Option<Switch>,
    pub light: Option<Light>,
    /// The corporate proxy the link goes through, if any.
    pub proxy: Option<pinhole_shell::proxy::Proxy>,
    pub agents: Vec<Agent>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let bad = |key: String, value: &str, why: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            value: value.to_owned(),
            why,
        };

        pinhole_certs::ca::check_name(&raw.name)
            .map_err(|e| bad("name".into(), &raw.name, e.to_string()))?;
        if raw.gateway.is_empty() {
            return Err(bad(
                "gateway".into(),
                "[]",
                "give at least one HOST:PORT".into(),
            ));
        }
        let gateways = raw
            .gateway
            .iter()
            .enumerate()
            .map(|(i, g)| {
                g.parse().map_err(|e: pinhole_certs::GatewayInfoError| {
                    bad(format!("gateway[{i}]"), g, e.to_string())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let heartbeat = match &raw.heartbeat {
            None => DEFAULT_HEARTBEAT,
            Some(h) => {
                let d = pinhole_proto::duration::parse(h)
                    .map_err(|e| bad("heartbeat".into(), h, e.to_string()))?;
                if !(pinhole_proto::link::MIN_HEARTBEAT..=pinhole_proto::link::MAX_HEARTBEAT)
                    .contains(&d)
                {
                    return Err(bad(
                        "heartbeat".into(),
                        h,
                        "must be between 1s and 1h".into(),
                    ));
                }
                d
            }
        };
        let token = raw
            .token
            .as_deref()
            .map(|t| {
                t.parse::<EnrollmentToken>()
                    .map_err(|e| bad("token".into(), "<hidden>", e.to_string()))
            })
            .transpose()?;
        let device_interface = raw
            .device_interface
            .as_deref()
            .map(|i| {
                i.parse::<IfName>()
                    .map_err(|e| bad("device_interface".into(), i, e.into()))
            })
            .transpose()?;
        let switch = raw
            .switch
            .map(|s| {
                let mode = match s.mode.as_str() {
                    "enable-when-1" => SwitchMode::EnableWhen1,
                    "disable-when-1" => SwitchMode::DisableWhen1,
                    other => {
                        return Err(bad(
                            "switch.mode".into(),
                            other,
                            "use \"enable-when-1\" or \"disable-when-1\"".into(),
                        ));
                    }
                };
                Ok(Switch { path: s.path, mode })
            })
            .transpose()?;
        let light = raw.light.map(|l| Light {
            path: l.path,
            command: l.command,
        });
        if let Some(Light {
            path: None,
            command: None,
        }) = &light
        {
            return Err(bad(
                "light".into(),
                "{}",
                "give `path`, `command` or both".into(),
            ));
        }

        let proxy = raw
            .proxy
            .map(|p| {
                pinhole_shell::proxy::Proxy::from_setting(&p.url, p.auth, p.credentials.as_deref())
            })
            .transpose()
            .map_err(|e| bad("proxy".into(), "…", e.to_string()))?;

        let mut names = BTreeSet::new();
        let mut agents = Vec::new();
        for (i, a) in raw.agent.iter().enumerate() {
            let key = |k: &str| format!("agent[{i}].{k}");
            pinhole_certs::ca::check_name(&a.name)
                .map_err(|e| bad(key("name"), &a.name, e.to_string()))?;
            if !names.insert(a.name.clone()) {
                return Err(bad(
                    key("name"),
                    &a.name,
                    "another agent has this name".into(),
                ));
            }
            let kind: AgentType = a
                .kind
                .parse()
                .map_err(|e: String| bad(key("type"), &a.kind, e))?;
            let address: IpAddr = a
                .address
                .parse()
                .map_err(|_| bad(key("address"), &a.address, "not an IP address".into()))?;
            if address.is_unspecified()
                || address.is_multicast()
                || address.is_loopback()
                || matches!(address, IpAddr::V4(v4) if v4.is_broadcast())
            {
                return Err(bad(
                    key("address"),
                    &a.address,
                    "must be the unicast address of one device".into(),
                ));
            }
            let ports = a
                .ports
                .iter()
                .map(|p| {
                    p.parse::<Port>()
                        .map_err(|e| bad(key("ports"), p, e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let agent = Agent::new(&a.name, kind, address, ports);
            if agent.ports.is_empty() {
                return Err(bad(
                    key("ports"),
                    "[]",
                    "a custom agent needs at least one port".into(),
                ));
            }
            agents.push(agent);
        }
        Ok(Config {
            name: raw.name,
            gateways,
            token,
            device_interface,
            heartbeat,
            offload: raw.offload.unwrap_or(true),
            switch,
            light,
            proxy,
            agents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "plant-a"
gateway = ["gw.example.com:443", "gw.example.com:11444"]
token = "abcdef0123"
device_interface = "eth1"
heartbeat = "30s"

[switch]
path = "/tmp/switch"
mode = "disable-when-1"

[light]
command = "/usr/local/bin/beacon"

[[agent]]
name = "press-4-plc"
type = "siemens-s7"
address = "192.168.0.10"

[[agent]]
name = "hmi"
type = "custom"
address = "192.168.0.20"
ports = ["tcp/8080", "udp/161"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("site.toml"))
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).expect("good");
        assert_eq!(c.name, "plant-a");
        assert_eq!(c.gateways.len(), 2);
        assert_eq!(c.heartbeat, Duration::from_secs(30));
        assert!(c.offload, "offload is announced unless switched off");
        let off = Config::parse(&format!("offload = false\n{GOOD}"), Path::new("site.toml"))
            .expect("offload = false");
        assert!(!off.offload);
        assert_eq!(c.agents[0].ports_text(), "tcp/102");
        assert_eq!(c.agents[1].ports_text(), "tcp/8080,udp/161");
        assert_eq!(
            c.switch.as_ref().expect("switch").mode,
            SwitchMode::DisableWhen1
        );
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must fail").to_string()
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = err(&GOOD.replace("192.168.0.10", "192.168.0.300"));
        assert!(
            e.contains("agent[0].address") && e.contains("192.168.0.300"),
            "{e}"
        );
        let e = err(&GOOD.replace("tcp/8080", "tcp/80800"));
        assert!(
            e.contains("agent[1].ports") && e.contains("tcp/80800"),
            "{e}"
        );
        let e = err(&GOOD.replace("udp/161", "icmp/1"));
        assert!(e.contains("icmp/1"), "{e}");
        let e = err(&GOOD.replace("siemens-s7", "siemens-s5"));
        assert!(
            e.contains("agent[0].type") && e.contains("siemens-s5"),
            "{e}"
        );
        let e = err(&GOOD.replace("gw.example.com:11444", "gw.example.com"));
        assert!(e.contains("gateway[1]"), "{e}");
        let e = err(&GOOD.replace("heartbeat = \"30s\"", "heartbeat = \"soon\""));
        assert!(e.contains("heartbeat") && e.contains("soon"), "{e}");
        let e = err(&GOOD.replace("device_interface", "device_iface"));
        assert!(e.contains("device_iface"), "unknown key named: {e}");
        let e = err(&GOOD.replace("disable-when-1", "sometimes"));
        assert!(e.contains("switch.mode"), "{e}");
        let e = err(&GOOD.replace(
            "address = \"192.168.0.20\"",
            "address = \"192.168.0.20\"\ncolour = \"red\"",
        ));
        assert!(e.contains("colour"), "{e}");
        let e = err(&GOOD.replace("ports = [\"tcp/8080\", \"udp/161\"]", ""));
        assert!(e.contains("custom agent"), "{e}");
        let e = err(&GOOD.replace("name = \"hmi\"", "name = \"press-4-plc\""));
        assert!(e.contains("another agent"), "{e}");
        let e = err(&GOOD.replace("192.168.0.10", "127.0.0.1"));
        assert!(e.contains("unicast"), "{e}");
    }

    #[test]
    fn proxy_settings() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let cred = dir.path().join("cred");
        std::fs::write(&cred, "CORP\\alice\nsecret\n").expect("write");
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let with = |proxy: &str| format!("{GOOD}\n[proxy]\n{proxy}\n");
        let c = parse(&with(&format!(
            "url = \"http://proxy.corp:8080\"\nauth = \"ntlm\"\ncredentials = \"{}\"",
            cred.display()
        )))
        .expect("ntlm proxy");
        let p = c.proxy.expect("proxy");
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 8080));
        assert_eq!(p.credentials.expect("credentials").user, "CORP\\alice");
        let c = parse(&with("url = \"http://10.1.1.1\"")).expect("no auth");
        assert_eq!(c.proxy.expect("proxy").port, 3128);

        for (bad, want) in [
            ("url = \"http://u:secret@proxy\"", "credentials file"),
            ("url = \"https://proxy\"", "http://"),
            (
                "url = \"http://proxy\"\nauth = \"basic\"",
                "needs a credentials file",
            ),
            ("url = \"http://proxy\"\nauth = \"kerberos\"", "kerberos"),
            ("url = \"http://proxy\"\npassword = \"x\"", "password"),
        ] {
            let e = err(&with(bad));
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = err(&with(&format!(
            "url = \"http://proxy\"\nauth = \"basic\"\ncredentials = \"{}\"",
            cred.display()
        )));
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for good in [
            "eth1",
            "enp3s0",
            "br-plant.10",
            "veth_a:1",
            "a23456789012345",
        ] {
            assert!(good.parse::<IfName>().is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a234567890123456",
            "eth 1",
            "eth1/",
            "eth\"1",
            "eth1;x",
            "ä",
        ] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?}");
        }
        let e = err(&GOOD.replace("\"eth1\"", "\"eth1\\\" accept\""));
        assert!(e.contains("device_interface"), "{e}");
    }

    #[test]
    fn a_token_may_carry_the_gateway_pin() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let c = parse(&GOOD.replace("abcdef0123", &format!("abcdef0123@{pin}"))).expect("good");
        let t = c.token.expect("token");
        assert_eq!(
            (t.secret(), t.pin().map(|p| p.to_string())),
            ("abcdef0123", Some(pin))
        );
        let e = err(&GOOD.replace("abcdef0123", "abcdef0123@sha256:00"));
        assert!(e.contains("token") && !e.contains("abcdef0123"), "{e}");
    }

    #[test]
    fn switch_reads_fail_closed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sw");
        let on1 = Switch {
            path: path.clone(),
            mode: SwitchMode::EnableWhen1,
        };
        let off1 = Switch {
            path: path.clone(),
            mode: SwitchMode::DisableWhen1,
        };
        assert!(!on1.enabled() && !off1.enabled(), "missing input: disabled");
        std::fs::write(&path, "1\n").expect("w");
        assert!(on1.enabled() && !off1.enabled());
        std::fs::write(&path, "0\n").expect("w");
        assert!(!on1.enabled() && off1.enabled());
        std::fs::write(&path, "garbage").expect("w");
        assert!(!on1.enabled() && !off1.enabled());
        assert_eq!(on1.value_for(true), "1");
        assert_eq!(off1.value_for(true), "0");
    }
}
