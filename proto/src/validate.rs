//! The rules for every field a peer controls, checked before anything is recorded, relayed or
//! formatted.
//!
//! | field                         | rule |
//! |-------------------------------|------|
//! | site, agent and account names | [`name`]: 1 to [`MAX_NAME_LEN`] bytes of `A-Z a-z 0-9 . _ @ -` (also the rule of certificate subjects and `site.toml`) |
//! | software version              | [`text`]: at most [`MAX_SOFTWARE_LEN`] bytes, no control character |
//! | boot id                       | [`text`]: at most [`MAX_BOOT_ID_LEN`] bytes, no control character |
//! | reasons                       | [`text`]: at most [`MAX_REASON_LEN`] bytes, no control character |
//! | enrollment token              | [`text`]: at most [`MAX_TOKEN_LEN`] bytes, no control character |
//! | a site's public key           | [`hex_bytes`]: hex of 1 to [`MAX_PUBLIC_KEY_LEN`] bytes |
//! | WireGuard keys                | [`wg_key`]: 64 hex digits (32 bytes) |
//! | a site's agents               | [`agents`]: at most [`MAX_AGENTS_PER_SITE`], valid and unique names, one device's unicast address, 1 to [`MAX_PORTS_PER_AGENT`] ports, none of them 0 |
//!
//! An [`Invalid`] names the field and what is wrong. It never carries more than
//! [`EXCERPT_CHARS`] characters of the value, with control characters escaped, so it can be
//! sent back to the peer, logged and audited as it is.
//!
//! Must never: allocate in proportion to a hostile value (a 3 MB name costs a length check),
//! or let a control character reach a log line or a terminal through [`escape`].

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::agent::Agent;

/// Longest site, agent or account name, in bytes: it goes into a certificate's common name,
/// an nftables comment and a technician's terminal.
pub const MAX_NAME_LEN: usize = 64;
/// Longest software version text (`hello`), in bytes.
pub const MAX_SOFTWARE_LEN: usize = 64;
/// Longest boot id (a site's `hello`), in bytes: a UUID is 36.
pub const MAX_BOOT_ID_LEN: usize = 64;
/// Longest reason (`session_refused`, `session_close`), in bytes: one sentence a technician
/// reads.
pub const MAX_REASON_LEN: usize = 256;
/// Longest enrollment token, in bytes: the gateway's tokens are 48 hex digits.
pub const MAX_TOKEN_LEN: usize = 128;
/// Longest public key in `enroll`: DER SubjectPublicKeyInfo bytes, after hex decoding. A P-256
/// key is 91 bytes, an RSA-4096 key about 550.
pub const MAX_PUBLIC_KEY_LEN: usize = 1024;
/// Longest WireGuard key text, in bytes: checked before the exact form, so a huge value costs
/// a length check. A 32-byte key is 64 hex digits.
pub const MAX_WG_KEY_LEN: usize = 64;
/// Most agents one site may report: every inventory of the site's domain carries them all, so
/// one site's list must never make another technician's inventory too big to send.
pub const MAX_AGENTS_PER_SITE: usize = 256;
/// Most ports one agent may allow (the presets have one or two).
pub const MAX_PORTS_PER_AGENT: usize = 64;

/// How many characters of a refused value an [`Invalid`] carries.
pub const EXCERPT_CHARS: usize = 32;

/// Why a peer-controlled field is refused. The text names the field and the rule; the only
/// part of the value it carries is an [`excerpt`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A required value is empty.
    #[error("{field} is empty")]
    Empty { field: &'static str },
    /// The value is longer than its limit, in bytes.
    #[error("{field} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A name holds a character other than `A-Z a-z 0-9 . _ @ -`.
    #[error("{field} `{excerpt}` may only hold letters, digits, `.`, `-`, `_` and `@`")]
    NameCharacter {
        field: &'static str,
        excerpt: String,
    },
    /// Text holds a control character.
    #[error("{field} `{excerpt}` holds a control character")]
    ControlCharacter {
        field: &'static str,
        excerpt: String,
    },
    /// The value is not hexadecimal.
    #[error("{field} is not hexadecimal")]
    Hex { field: &'static str },
    /// The value is not a WireGuard public key: 64 hex digits.
    #[error("{field} is not a WireGuard public key (64 hex digits)")]
    WgKey { field: &'static str },
    /// A list holds more entries than allowed.
    #[error("{count} {field}; at most {max} are allowed")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    /// Two agents of one site have the same name.
    #[error("two agents are named `{agent}`")]
    DuplicateAgent { agent: String },
    /// An agent's address is not the unicast address of one device.
    #[error("agent `{agent}`: {address} is {why}, not the unicast address of one device")]
    Address {
        agent: String,
        address: IpAddr,
        why: &'static str,
    },
    /// An agent allows no port, or too many.
    #[error("agent `{agent}` allows {count} ports; 1 to {max} are allowed")]
    PortCount {
        agent: String,
        count: usize,
        max: usize,
    },
    /// An agent allows port 0.
    #[error("agent `{agent}` allows port 0")]
    PortZero { agent: String },
}

/// Checks a site, agent or account name: 1 to [`MAX_NAME_LEN`] bytes, each a letter, a digit
/// or one of `.`, `_`, `@`, `-`. `field` names the value in the error.
pub fn name(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(Invalid::Empty { field });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(Invalid::TooLong {
            field,
            len: s.len(),
            max: MAX_NAME_LEN,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
    {
        return Err(Invalid::NameCharacter {
            field,
            excerpt: excerpt(s),
        });
    }
    Ok(())
}

/// Checks free text: at most `max` bytes and no control character ([`char::is_control`]).
/// Empty text is allowed.
pub fn text(field: &'static str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(Invalid::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::ControlCharacter {
            field,
            excerpt: excerpt(s),
        });
    }
    Ok(())
}

/// Decodes hex of 1 to `max` bytes (either case). The length is checked before decoding.
pub fn hex_bytes(field: &'static str, s: &str, max: usize) -> Result<Vec<u8>, Invalid> {
    if s.is_empty() {
        return Err(Invalid::Empty { field });
    }
    if s.len() > max.saturating_mul(2) {
        return Err(Invalid::TooLong {
            field,
            len: s.len().div_ceil(2),
            max,
        });
    }
    hex::decode(s).map_err(|_| Invalid::Hex { field })
}

/// Checks a WireGuard public key as the protocol carries it: exactly 64 hex digits (32 bytes,
/// either case), the form `pinhole_adapter::wg` writes and parses.
pub fn wg_key(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.len() > MAX_WG_KEY_LEN {
        return Err(Invalid::TooLong {
            field,
            len: s.len(),
            max: MAX_WG_KEY_LEN,
        });
    }
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Invalid::WgKey { field })
    }
}

/// Checks a site's agents: at most [`MAX_AGENTS_PER_SITE`]; each name valid ([`name`]) and
/// unique; each address the unicast address of one device; 1 to [`MAX_PORTS_PER_AGENT`] ports,
/// none of them 0.
///
/// Refused addresses: unspecified, loopback, multicast, the IPv4 broadcast address, and these
/// again written as IPv4-mapped IPv6 (`::ffff:127.0.0.1`). Link-local addresses (169.254/16,
/// fe80::/10) are allowed: industrial devices without DHCP fall back to them, and
/// `site.toml` accepts them, so refusing them here would lock such a site out.
pub fn agents(list: &[Agent]) -> Result<(), Invalid> {
    if list.len() > MAX_AGENTS_PER_SITE {
        return Err(Invalid::TooMany {
            field: "agents",
            count: list.len(),
            max: MAX_AGENTS_PER_SITE,
        });
    }
    let mut names = BTreeSet::new();
    for a in list {
        name("agent name", &a.name)?;
        // The name is valid from here on: short, and nothing in it to escape.
        if !names.insert(a.name.as_str()) {
            return Err(Invalid::DuplicateAgent {
                agent: a.name.clone(),
            });
        }
        if let Some(why) = not_unicast(a.address) {
            return Err(Invalid::Address {
                agent: a.name.clone(),
                address: a.address,
                why,
            });
        }
        let count = a.ports.len();
        if count == 0 || count > MAX_PORTS_PER_AGENT {
            return Err(Invalid::PortCount {
                agent: a.name.clone(),
                count,
                max: MAX_PORTS_PER_AGENT,
            });
        }
        if a.ports.iter().any(|p| p.port == 0) {
            return Err(Invalid::PortZero {
                agent: a.name.clone(),
            });
        }
    }
    Ok(())
}

/// What makes `address` something other than one device's unicast address, if anything.
fn not_unicast(address: IpAddr) -> Option<&'static str> {
    let address = address.to_canonical();
    if address.is_unspecified() {
        Some("unspecified")
    } else if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if matches!(address, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Escapes control characters (and backslash) for logs and terminal output: `\n` becomes
/// `\\n` (also `\r`, `\t`), `\` becomes `\\`, other control characters `\u{7f}`. Borrowed when
/// there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || c.is_control()) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The first [`EXCERPT_CHARS`] characters of `s`, [`escape`]d, with `…` when cut: the most of a
/// refused value that an error carries.
pub fn excerpt(s: &str) -> String {
    match s.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", escape(&s[..cut])),
        None => escape(s).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentType, Port};

    fn agent(name: &str, address: &str) -> Agent {
        Agent::new(name, AgentType::SiemensS7, address.parse().expect("ip"), [])
    }

    #[test]
    fn names_follow_one_rule() {
        for good in [
            "plant-a",
            "a",
            "alice@acme.example",
            "line_3.press-4",
            &"x".repeat(64),
        ] {
            assert_eq!(name("site", good), Ok(()), "{good}");
        }
        assert_eq!(name("site", ""), Err(Invalid::Empty { field: "site" }));
        assert_eq!(
            name("site", &"x".repeat(65)),
            Err(Invalid::TooLong {
                field: "site",
                len: 65,
                max: 64
            })
        );
        for bad in ["plant a", "plant\na", "plant/a", "plänt", "a;rm"] {
            assert!(
                matches!(name("site", bad), Err(Invalid::NameCharacter { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors_carry_a_short_escaped_excerpt() {
        let e = name("site", "evil\n2025-01-01 login ok\u{1b}[2J").expect_err("refused");
        let text = e.to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert_eq!(
            text,
            "site `evil\\n2025-01-01 login ok\\u{1b}[2J` may only hold letters, digits, `.`, `-`, \
             `_` and `@`"
        );
        let long = format!("{}\n", "é".repeat(60));
        let e = text_error(&long);
        assert_eq!(
            e,
            format!("reason `{}…` holds a control character", "é".repeat(32))
        );
        // A huge value is refused for its length, without an excerpt.
        assert_eq!(
            name("site", &"a".repeat(3_000_000))
                .expect_err("long")
                .to_string(),
            "site is 3000000 bytes long; at most 64 are allowed"
        );
    }

    fn text_error(s: &str) -> String {
        text("reason", s, 1000).expect_err("refused").to_string()
    }

    #[test]
    fn text_is_bounded_and_has_no_control_characters() {
        assert_eq!(text("reason", "", 10), Ok(()));
        assert_eq!(text("reason", "the PLC is in STOP – äöü", 256), Ok(()));
        assert!(matches!(
            text("reason", "0123456789a", 10),
            Err(Invalid::TooLong {
                len: 11,
                max: 10,
                ..
            })
        ));
        for bad in ["a\nb", "\u{7f}", "\u{1b}[31m", "tab\t", "\u{85}"] {
            assert!(
                matches!(
                    text("reason", bad, 256),
                    Err(Invalid::ControlCharacter { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn escape_borrows_when_clean() {
        assert!(matches!(escape("plain text"), Cow::Borrowed("plain text")));
        assert_eq!(escape("a\nb\\c\u{7f}\r\t"), "a\\nb\\\\c\\u{7f}\\r\\t");
        assert_eq!(excerpt("short"), "short");
        assert_eq!(excerpt(&"x".repeat(40)), format!("{}…", "x".repeat(32)));
    }

    #[test]
    fn wireguard_keys_are_64_hex_digits() {
        let key = "0123456789abcdef".repeat(4);
        assert_eq!(wg_key("key", &key), Ok(()));
        assert_eq!(wg_key("key", &key.to_uppercase()), Ok(()));
        for bad in [
            "",
            &key[..63],
            &format!("{}g", &key[..63]),
            "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
        ] {
            assert_eq!(
                wg_key("key", bad),
                Err(Invalid::WgKey { field: "key" }),
                "{bad}"
            );
        }
        assert!(matches!(
            wg_key("key", &"a".repeat(65)),
            Err(Invalid::TooLong { .. })
        ));
    }

    #[test]
    fn hex_is_bounded_before_decoding() {
        assert_eq!(hex_bytes("public key", "00ff", 2), Ok(vec![0, 255]));
        assert_eq!(
            hex_bytes("public key", "00ff00", 2),
            Err(Invalid::TooLong {
                field: "public key",
                len: 3,
                max: 2
            })
        );
        assert!(matches!(
            hex_bytes("public key", &"00".repeat(1025), MAX_PUBLIC_KEY_LEN),
            Err(Invalid::TooLong {
                len: 1025,
                max: 1024,
                ..
            })
        ));
        assert_eq!(
            hex_bytes("public key", "zz", 2),
            Err(Invalid::Hex {
                field: "public key"
            })
        );
        assert_eq!(
            hex_bytes("public key", "", 2),
            Err(Invalid::Empty {
                field: "public key"
            })
        );
    }

    #[test]
    fn agents_follow_the_sites_rules() {
        let ok = vec![
            agent("plc", "192.168.0.10"),
            agent("hmi", "fe80::1"),
            agent("ll", "169.254.1.2"),
        ];
        assert_eq!(agents(&ok), Ok(()));
        assert_eq!(agents(&[]), Ok(()));

        let many: Vec<Agent> = (0..40_000)
            .map(|i| agent(&format!("a{i}"), "10.0.0.1"))
            .collect();
        assert_eq!(
            agents(&many),
            Err(Invalid::TooMany {
                field: "agents",
                count: 40_000,
                max: MAX_AGENTS_PER_SITE
            })
        );
        assert_eq!(agents(&many[..MAX_AGENTS_PER_SITE]), Ok(()));

        assert_eq!(
            agents(&[agent("plc", "10.0.0.1"), agent("plc", "10.0.0.2")]),
            Err(Invalid::DuplicateAgent {
                agent: "plc".into()
            })
        );
        for (address, why) in [
            ("224.0.0.1", "a multicast address"),
            ("ff02::1", "a multicast address"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("127.0.0.1", "a loopback address"),
            ("::1", "a loopback address"),
            ("::ffff:127.0.0.1", "a loopback address"),
            ("255.255.255.255", "the broadcast address"),
        ] {
            assert_eq!(
                agents(&[agent("plc", address)]),
                Err(Invalid::Address {
                    agent: "plc".into(),
                    address: address.parse().expect("ip"),
                    why
                }),
                "{address}"
            );
        }
        assert!(matches!(
            agents(&[agent("bad name", "10.0.0.1")]),
            Err(Invalid::NameCharacter {
                field: "agent name",
                ..
            })
        ));

        let none = Agent::new("c", AgentType::Custom, "10.0.0.1".parse().expect("ip"), []);
        assert!(matches!(
            agents(&[none]),
            Err(Invalid::PortCount { count: 0, .. })
        ));
        let wide = Agent::new(
            "c",
            AgentType::Custom,
            "10.0.0.1".parse().expect("ip"),
            (1..=65).map(Port::tcp),
        );
        assert!(matches!(
            agents(&[wide]),
            Err(Invalid::PortCount { count: 65, .. })
        ));
        let zero = Agent::new(
            "c",
            AgentType::Custom,
            "10.0.0.1".parse().expect("ip"),
            [Port::udp(0)],
        );
        assert_eq!(
            agents(&[zero]),
            Err(Invalid::PortZero { agent: "c".into() })
        );
    }
}
