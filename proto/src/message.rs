//! Control messages: one JSON object per control frame, tagged by `"type"`.
//!
//! | type              | direction              | meaning |
//! |-------------------|------------------------|---------|
//! | `hello`           | client/site → gateway  | first message: role, protocol version, software, heartbeat interval; a site adds boot id and agents |
//! | `enroll`          | site → gateway         | first message of an unauthenticated site: one-time token, site name, the site's public key |
//! | `enrolled`        | gateway → site         | the site's certificate and the CA certificate; the connection then closes |
//! | `welcome`         | gateway → client/site  | login accepted: account or site name; for a technician the tunnel address and inventory |
//! | `list`            | client → gateway       | asks for the current inventory; with `changes`, the client also takes `inventory_changes` from then on |
//! | `inventory`       | gateway → client       | the sites and agents the account may use (answer to `list`) |
//! | `inventory_update`| gateway → client       | the inventory changed (a site went on- or offline, a grant changed): the whole inventory again |
//! | `inventory_changes`| gateway → client      | only what changed since the last inventory message: sites added or changed, sites removed (only to a client that sent `list` with `changes`) |
//! | `agents`          | site → gateway         | the site's agents changed (config reload) |
//! | `firewall_restored` | site → gateway       | the site found its firewall table removed or changed and restored it; the gateway audits it (a fixed kind, no free text) |
//! | `heartbeat`       | both ways              | sent after `heartbeat_secs` of silence; 3 missed intervals end the link |
//! | `session_open`    | client → gateway → site| open a session to `site/agent` with the client's WireGuard key; the same session id again adds an agent of the same site to its tunnel |
//! | `session_opened`  | site → gateway → client| the site's WireGuard key and the agent (device address, ports) |
//! | `session_refused` | gateway/site → client  | with a reason a technician can read |
//! | `session_close`   | any                    | the session ends, with a reason |
//! | `logout`          | client → gateway       | the technician logs out; the gateway closes the link |
//! | `switched_off`    | site → gateway         | the site's remote access switch reads off: the site closes the link after it, and the gateway shows the site as switched off (not merely offline) until it connects again |
//! | `error`           | gateway → peer         | a code and a text; the connection closes after it |
//!
//! The gateway checks every field a peer controls against [`crate::validate`] before the
//! message becomes an event.
//!
//! # Offload negotiation (super-packets)
//!
//! A WireGuard message may carry a GSO super-packet of up to 64 KiB with a 12-byte offload
//! trailer (`pinhole_adapter::gso`, [`crate::frame`]). An end sends one into a session only
//! when all three parties on the path said they take it, each in a field that peers which
//! predate offload neither send nor receive:
//!
//! | field | in | meaning |
//! |---|---|---|
//! | `offload: true` | `hello` (client/site → gateway) | this end takes super-packets with the trailer, and reads the fields below |
//! | `max_datagram: n` | `welcome` (gateway → client/site) | the relay forwards WireGuard messages of up to `n` bytes; sent only to a peer whose `hello` said `offload` |
//! | `offload: true` | `session_open` (gateway → site) | the technician's client said `offload` in its `hello`; sent only to a site that did |
//! | `offload: true` | `session_opened` (site → gateway → client) | the site takes super-packets on this session; sent by a site only after a `welcome` with `max_datagram`, and passed on only to a client that said `offload` |
//!
//! An end sends super-packets into a session when its own `hello` said `offload`, its
//! `welcome` had `max_datagram`, and the other end's flag arrived (`session_open` at the site,
//! `session_opened` at the client); then only those whose message fits `max_datagram`. Every
//! other packet is cut into MTU-size segments before encryption. A field absent (a peer that
//! predates it) reads as false or none (`#[serde(default)]`): no offload. An end that did not
//! announce offload drops a trailer as a malformed packet (`bad-offload`).
//!
//! Every message is `deny_unknown_fields`, in old builds too: an old gateway refuses a `hello`
//! with `offload`, so an end of this build needs a gateway of this build or later (upgrade the
//! gateway first). The gateway, having read each peer's `hello`, never sends a field its peer
//! did not announce ([`Message::for_peer`]), so old clients and sites keep working with a new
//! gateway, without offload.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::agent::Agent;

/// Who speaks on a link, as declared in `hello` (and checked against the certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Technician,
    Site,
}

/// A site as a technician sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteView {
    pub name: String,
    pub domain: String,
    pub online: bool,
    pub agents: Vec<Agent>,
}

/// Applies an `inventory_changes` message to `inventory`: each of `sites` replaces the site of
/// its name or is added (in name order, as the gateway sends inventories), each of `removed`
/// leaves. Used by the client on its copy and by the gateway to fold changes into an
/// inventory not yet sent.
pub fn apply_inventory_changes(
    inventory: &mut Vec<SiteView>,
    sites: Vec<SiteView>,
    removed: &[String],
) {
    if !removed.is_empty() {
        inventory.retain(|s| !removed.contains(&s.name));
    }
    for site in sites {
        match inventory.iter().position(|s| s.name == site.name) {
            Some(i) => inventory[i] = site,
            None => {
                let at = inventory.partition_point(|s| s.name < site.name);
                inventory.insert(at, site);
            }
        }
    }
}

/// What the site found when it restored its firewall table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirewallChange {
    /// The table was gone (for example `nft flush ruleset`).
    Removed,
    /// The table was there but not as the site made it.
    Changed,
}

impl FirewallChange {
    /// The audit text.
    pub fn describe(self) -> &'static str {
        match self {
            FirewallChange::Removed => "site firewall table was removed; restored",
            FirewallChange::Changed => "site firewall table was changed; restored",
        }
    }
}

/// Why the gateway ends a link or refuses something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The account is closed; the client must not reconnect.
    AccountClosed,
    /// The peer's protocol version is not supported.
    Version,
    /// A message that is not valid here.
    Protocol,
    /// The enrollment token is unknown, used or expired.
    TokenRefused,
    /// The site name is already enrolled.
    SiteExists,
    /// The site is not (or no longer) known to the gateway.
    UnknownSite,
    /// The same site or account connected again; this older link is replaced.
    Replaced,
    /// The gateway is shutting down.
    Shutdown,
    /// The gateway could not record the event (audit), so it refuses the action.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello {
        role: Role,
        version: u8,
        software: String,
        heartbeat_secs: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        agents: Vec<Agent>,
        /// This end takes super-packets with the offload trailer and reads the offload fields
        /// of `welcome`, `session_open` and `session_opened` (module documentation). Absent
        /// (false) from peers that predate offload, and sent only when true.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        offload: bool,
    },
    Enroll {
        token: String,
        site: String,
        /// DER SubjectPublicKeyInfo, hex.
        public_key: String,
    },
    Enrolled {
        /// DER, hex.
        certificate: String,
        /// DER, hex.
        ca: String,
    },
    Welcome {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tunnel_ip: Option<Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inventory: Option<Vec<SiteView>>,
        /// A technician's account forbids the client to remember its bundle password (in the
        /// desktop's Secret Service); a client that remembered it deletes it. Absent (false)
        /// from gateways that predate the flag, and sent only when true, so that clients that
        /// predate it read every other welcome unchanged.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        forbid_remembered_password: bool,
        /// The largest WireGuard message, in bytes, the gateway relays in a data frame (its
        /// trailer and WireGuard's overhead included): the gateway takes super-packets. Sent
        /// only to a peer whose `hello` said `offload`; absent means no super-packets.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_datagram: Option<u32>,
    },
    /// Asks for the inventory. `changes`: the client applies `inventory_changes` (sent only
    /// when true, so that the message is `{"type":"list"}` as before; a gateway that predates
    /// the field ignores it and keeps sending whole inventories).
    List {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        changes: bool,
    },
    Inventory {
        sites: Vec<SiteView>,
    },
    InventoryUpdate {
        sites: Vec<SiteView>,
    },
    /// What changed since the last inventory message, to a client that asked for changes:
    /// `sites` replace (or add) the sites of the same name, `removed` names sites the account
    /// no longer sees. Sent instead of a whole `inventory_update`, which a gateway still sends
    /// when many sites changed at once or the account's grants changed.
    InventoryChanges {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sites: Vec<SiteView>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        removed: Vec<String>,
    },
    Agents {
        agents: Vec<Agent>,
    },
    FirewallRestored {
        change: FirewallChange,
    },
    Heartbeat,
    SessionOpen {
        session: u32,
        site: String,
        agent: String,
        /// The client's WireGuard public key: 64 hex digits.
        key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tunnel_ip: Option<Ipv4Addr>,
        /// Gateway → site: the technician's client takes super-packets (its `hello` said
        /// `offload`). Sent only when true, and only to a site whose `hello` said `offload`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        offload: bool,
    },
    SessionOpened {
        session: u32,
        /// The site's WireGuard public key: 64 hex digits.
        key: String,
        agent: Agent,
        /// The site takes super-packets on this session. Sent only when true, by a site that
        /// said `offload` and got `max_datagram`; the gateway passes it on only to a client
        /// whose `hello` said `offload`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        offload: bool,
    },
    SessionRefused {
        session: u32,
        reason: String,
    },
    /// Ends a session, or with `agent` only that agent's part of it (one tunnel per site may
    /// carry several agents).
    SessionClose {
        session: u32,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
    },
    Logout,
    /// The site's switch says off; the site closes its link right after this message.
    SwitchedOff,
    Error {
        code: ErrorCode,
        text: String,
    },
}

impl Message {
    /// The JSON payload of a control frame.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain data types cannot fail: no maps with non-string keys, no
        // custom serializers.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The message as a peer may receive it: without the offload fields (module documentation)
    /// if the peer's `hello` did not say `offload` (`peer_offload` false), so that a peer that
    /// predates them, whose parser refuses unknown fields, reads it.
    pub fn for_peer(mut self, peer_offload: bool) -> Self {
        if !peer_offload {
            match &mut self {
                Message::Hello { offload, .. }
                | Message::SessionOpen { offload, .. }
                | Message::SessionOpened { offload, .. } => *offload = false,
                Message::Welcome { max_datagram, .. } => *max_datagram = None,
                _ => {}
            }
        }
        self
    }

    /// The `type` tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Enroll { .. } => "enroll",
            Message::Enrolled { .. } => "enrolled",
            Message::Welcome { .. } => "welcome",
            Message::List { .. } => "list",
            Message::Inventory { .. } => "inventory",
            Message::InventoryUpdate { .. } => "inventory_update",
            Message::InventoryChanges { .. } => "inventory_changes",
            Message::Agents { .. } => "agents",
            Message::FirewallRestored { .. } => "firewall_restored",
            Message::Heartbeat => "heartbeat",
            Message::SessionOpen { .. } => "session_open",
            Message::SessionOpened { .. } => "session_opened",
            Message::SessionRefused { .. } => "session_refused",
            Message::SessionClose { .. } => "session_close",
            Message::Logout => "logout",
            Message::SwitchedOff => "switched_off",
            Message::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentType;

    #[test]
    fn json_shape_is_stable() {
        let m = Message::Hello {
            role: Role::Site,
            version: 1,
            software: "0.1.0".into(),
            heartbeat_secs: 600,
            boot_id: Some("b".into()),
            agents: vec![Agent::new(
                "plc",
                AgentType::SiemensS7,
                "192.168.0.10".parse().expect("ip"),
                [],
            )],
            offload: false,
        };
        let json = String::from_utf8(m.to_json()).expect("utf8");
        assert!(
            json.starts_with(r#"{"type":"hello","role":"site","version":1"#),
            "{json}"
        );
        assert!(json.contains(r#""type":"siemens-s7""#), "{json}");
        assert!(json.contains(r#"{"transport":"tcp","port":102}"#), "{json}");
        assert_eq!(Message::from_json(json.as_bytes()).expect("parse"), m);
        assert_eq!(Message::Heartbeat.to_json(), br#"{"type":"heartbeat"}"#);
        assert_eq!(
            Message::SwitchedOff.to_json(),
            br#"{"type":"switched_off"}"#
        );
    }

    /// A `list` with `changes` reaches gateways that predate the field: their `list` was a unit
    /// variant, and serde ignores the fields of an internally tagged unit variant (even with
    /// `deny_unknown_fields`). The old message type is copied here to keep that checked.
    #[test]
    fn a_list_asking_for_changes_is_read_by_an_old_gateway_and_plain_list_is_unchanged() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
        enum Old {
            List,
            Heartbeat,
        }
        let new = Message::List { changes: true }.to_json();
        assert_eq!(new, br#"{"type":"list","changes":true}"#);
        assert_eq!(
            serde_json::from_slice::<Old>(&new).expect("an old gateway reads it"),
            Old::List
        );
        assert_eq!(
            Message::List { changes: false }.to_json(),
            br#"{"type":"list"}"#
        );
        assert_eq!(
            Message::from_json(br#"{"type":"list"}"#).expect("an old client's list"),
            Message::List { changes: false }
        );
        let c = Message::InventoryChanges {
            sites: Vec::new(),
            removed: vec!["plant-a".into()],
        };
        assert_eq!(
            c.to_json(),
            br#"{"type":"inventory_changes","removed":["plant-a"]}"#
        );
        assert_eq!(Message::from_json(&c.to_json()).expect("parse"), c);
    }

    #[test]
    fn the_remembered_password_flag_is_sent_only_when_it_forbids() {
        // From a gateway that predates the flag: allowed.
        let old = br#"{"type":"welcome","name":"alice","tunnel_ip":"100.64.0.2"}"#;
        let Message::Welcome {
            forbid_remembered_password,
            ..
        } = Message::from_json(old).expect("an old welcome")
        else {
            panic!("not a welcome")
        };
        assert!(!forbid_remembered_password);
        // Allowed: the welcome is what it was, so clients that predate the flag read it.
        let allowed = Message::Welcome {
            name: "alice".into(),
            tunnel_ip: Some("100.64.0.2".parse().expect("ip")),
            inventory: None,
            forbid_remembered_password: false,
            max_datagram: None,
        };
        assert_eq!(allowed.to_json(), old.to_vec());
        let forbidden = Message::Welcome {
            name: "alice".into(),
            tunnel_ip: None,
            inventory: None,
            forbid_remembered_password: true,
            max_datagram: None,
        };
        let json = forbidden.to_json();
        assert!(
            String::from_utf8_lossy(&json).contains(r#""forbid_remembered_password":true"#),
            "{}",
            String::from_utf8_lossy(&json)
        );
        assert_eq!(Message::from_json(&json).expect("parse"), forbidden);
    }

    /// What peers that predate offload send (their exact JSON) reads as no offload, and what
    /// is sent without offload is byte for byte what they send, so they read it.
    #[test]
    fn messages_of_peers_that_predate_offload_read_as_no_offload() {
        let old: [&[u8]; 4] = [
            br#"{"type":"hello","role":"technician","version":1,"software":"0.1.0","heartbeat_secs":15}"#,
            br#"{"type":"welcome","name":"alice","tunnel_ip":"100.64.0.2"}"#,
            br#"{"type":"session_open","session":7,"site":"s","agent":"plc","key":"ab","tunnel_ip":"100.64.0.2"}"#,
            br#"{"type":"session_opened","session":7,"key":"ab","agent":{"name":"plc","type":"siemens-s7","address":"192.168.0.10","ports":[{"transport":"tcp","port":102}]}}"#,
        ];
        for json in old {
            let m = Message::from_json(json).expect("an old message");
            match &m {
                Message::Hello { offload, .. }
                | Message::SessionOpen { offload, .. }
                | Message::SessionOpened { offload, .. } => assert!(!offload),
                Message::Welcome { max_datagram, .. } => assert_eq!(*max_datagram, None),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                m.to_json(),
                json.to_vec(),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        // With offload: the fields are there, and read back.
        let new = [
            br#"{"type":"hello","role":"site","version":1,"software":"0.1.0","heartbeat_secs":15,"offload":true}"#.to_vec(),
            br#"{"type":"welcome","name":"s","max_datagram":65614}"#.to_vec(),
            br#"{"type":"session_open","session":7,"site":"s","agent":"plc","key":"ab","offload":true}"#.to_vec(),
        ];
        for json in new {
            let m = Message::from_json(&json).expect("a new message");
            assert_eq!(m.to_json(), json);
            // For a peer that did not announce offload: the old form, which old peers parse.
            let plain = m.for_peer(false).to_json();
            let text = String::from_utf8_lossy(&plain).into_owned();
            assert!(
                !text.contains("offload") && !text.contains("max_datagram"),
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        assert!(
            Message::from_json(br#"{"type":"error","code":"protocol","text":"t","x":1}"#).is_err()
        );
        assert!(Message::from_json(br#"{"type":"error","code":"nonsense","text":"t"}"#).is_err());
        assert!(Message::from_json(br#"{"type":"launch_missiles"}"#).is_err());
        assert!(Message::from_json(b"not json").is_err());
    }
}
