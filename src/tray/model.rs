//! The tray's decisions, pure: what the menu shows for a daemon status, which icon, and which
//! notifications a new status calls for. No D-Bus, no sockets, no clock: `item.rs` renders
//! these values with ksni and `mod.rs` carries out the [`Action`]s; the tests here assert on
//! the values.

use std::collections::BTreeMap;

use pinhole_proto::SiteView;

use crate::control::{EndedView, LinkState, Status};

/// What the tray last learnt from the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Daemon {
    /// Not asked yet.
    Unknown,
    /// The control socket did not answer; why, in words.
    Unreachable(String),
    Up(Box<Status>),
}

/// The daemon's status and the sites of the logged-in account.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub daemon: Daemon,
    /// Empty unless logged in.
    pub sites: Vec<SiteView>,
    /// The technician's "Remember password" setting.
    pub remember_password: bool,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            daemon: Daemon::Unknown,
            sites: Vec::new(),
            remember_password: false,
        }
    }
}

impl Snapshot {
    fn status(&self) -> Option<&Status> {
        match &self.daemon {
            Daemon::Up(s) => Some(s),
            _ => None,
        }
    }

    fn state(&self) -> Option<LinkState> {
        self.status().map(|s| s.state)
    }

    /// Whether any device is connected.
    pub fn connected(&self) -> bool {
        self.status().is_some_and(|s| !s.sessions.is_empty())
    }

    fn is_connected(&self, site: &str, agent: &str) -> bool {
        self.status().is_some_and(|s| {
            s.sessions
                .iter()
                .any(|v| v.site == site && v.agent == agent)
        })
    }

    /// Whether the link to the gateway runs (or is being set up): logging out makes sense.
    fn logged_in(&self) -> bool {
        matches!(
            self.state(),
            Some(LinkState::LoggedIn | LinkState::Connecting | LinkState::Reconnecting)
        )
    }

    /// Whether the gateway forbids the logged-in account to remember its password: any
    /// remembered one is to be deleted.
    pub fn forbids_remembering(&self) -> bool {
        self.status()
            .is_some_and(|s| s.state == LinkState::LoggedIn && s.remember_password == Some(false))
    }

    /// Whether the gateway's last welcome allowed remembering the password.
    pub fn allows_remembering(&self) -> bool {
        self.status()
            .is_some_and(|s| s.remember_password == Some(true))
    }

    /// Whether the sites should be asked for again: the link came up, or the number of
    /// sites the gateway announced differs from the list the tray holds.
    pub fn wants_sites(&self) -> bool {
        match self.status() {
            Some(s) if s.state == LinkState::LoggedIn => s.sites != self.sites.len(),
            _ => false,
        }
    }
}

/// One device of one site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub site: String,
    pub agent: String,
}

/// What a menu item asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ImportCertificate,
    LogIn,
    Connect(Target),
    Disconnect(Target),
    DisconnectAll,
    LogOut,
    /// Turn "Remember password" on or off.
    RememberPassword(bool),
    OpenLog,
    /// Ask the daemon again (the menu is about to open).
    Refresh,
    Quit,
}

/// One entry of the menu, as the host shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Text the technician cannot click (the status line).
    Text(String),
    Separator,
    Button {
        label: String,
        enabled: bool,
        action: Action,
    },
    /// A device: checked while connected; a click toggles it.
    Device {
        label: String,
        checked: bool,
        enabled: bool,
        action: Action,
    },
    Submenu {
        label: String,
        enabled: bool,
        entries: Vec<Entry>,
    },
    /// A setting: checked while on; a click toggles it.
    Toggle {
        label: String,
        checked: bool,
        action: Action,
    },
}

/// The icon: idle, a device connected, or something the technician should look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icon {
    Idle,
    Connected,
    Attention,
}

impl Icon {
    /// The icon theme name, installed by the package in hicolor.
    pub fn name(self) -> &'static str {
        match self {
            Icon::Idle => "pinhole",
            Icon::Connected => "pinhole-connected",
            Icon::Attention => "pinhole-attention",
        }
    }
}

pub fn icon(snap: &Snapshot) -> Icon {
    if snap.connected() {
        return Icon::Connected;
    }
    match &snap.daemon {
        Daemon::Unreachable(_) => Icon::Attention,
        Daemon::Up(s) if matches!(s.state, LinkState::Failed | LinkState::Reconnecting) => {
            Icon::Attention
        }
        _ => Icon::Idle,
    }
}

/// The first line of the menu, and the tooltip's title.
pub fn status_line(snap: &Snapshot) -> String {
    let s = match &snap.daemon {
        Daemon::Unknown => return "Asking pinholed…".into(),
        Daemon::Unreachable(_) => return "Pinhole is not available".into(),
        Daemon::Up(s) => s,
    };
    let account = s.account.as_deref().unwrap_or("?");
    let at = match s.gateway.as_deref() {
        Some(g) => format!(" at {g}"),
        None => String::new(),
    };
    match s.state {
        LinkState::NoBundle => "No certificate imported".into(),
        LinkState::LoggedOut => format!("Logged out ({account})"),
        LinkState::Connecting => format!("Logging in as {account}{at}…"),
        LinkState::LoggedIn => format!("Logged in as {account}{at}"),
        LinkState::Reconnecting => format!("Reconnecting as {account}{at}…"),
        LinkState::Failed => format!("Logged out ({account}): login failed"),
    }
}

/// The second line, when there is a problem to tell.
fn problem_line(snap: &Snapshot) -> Option<String> {
    match &snap.daemon {
        Daemon::Unreachable(why) => Some(why.clone()),
        Daemon::Up(s) if matches!(s.state, LinkState::Failed | LinkState::Reconnecting) => {
            s.last_error.clone()
        }
        _ => None,
    }
}

/// The tooltip's text: the status line, and the connected devices.
pub fn tooltip(snap: &Snapshot) -> String {
    let mut lines = Vec::new();
    if let Some(p) = problem_line(snap) {
        lines.push(p);
    }
    if let Some(s) = snap.status() {
        for v in &s.sessions {
            lines.push(format!("{}/{} ({})", v.site, v.agent, v.device));
        }
    }
    lines.join("\n")
}

/// The menu for `snap`.
pub fn menu(snap: &Snapshot) -> Vec<Entry> {
    let mut m = vec![Entry::Text(status_line(snap))];
    if let Some(p) = problem_line(snap) {
        m.push(Entry::Text(p));
    }
    m.push(Entry::Separator);
    let up = matches!(snap.daemon, Daemon::Up(_));
    let linked = snap.state() == Some(LinkState::LoggedIn);
    if linked {
        if snap.sites.is_empty() {
            m.push(Entry::Text("No sites: ask your administrator".into()));
        }
        for site in &snap.sites {
            let entries = site
                .agents
                .iter()
                .map(|a| {
                    let t = Target {
                        site: site.name.clone(),
                        agent: a.name.clone(),
                    };
                    let checked = snap.is_connected(&t.site, &t.agent);
                    Entry::Device {
                        label: format!("{} ({}, {})", a.name, a.kind, a.address),
                        checked,
                        // A connected device can always be disconnected.
                        enabled: site.online || checked,
                        action: if checked {
                            Action::Disconnect(t)
                        } else {
                            Action::Connect(t)
                        },
                    }
                })
                .collect::<Vec<_>>();
            m.push(Entry::Submenu {
                label: if site.online {
                    site.name.clone()
                } else {
                    format!("{} (offline)", site.name)
                },
                enabled: !entries.is_empty(),
                entries,
            });
        }
        m.push(Entry::Button {
            label: "Disconnect all".into(),
            enabled: snap.connected(),
            action: Action::DisconnectAll,
        });
        m.push(Entry::Separator);
    }
    let logged_in = snap.logged_in();
    let has_bundle = snap.state().is_some_and(|s| s != LinkState::NoBundle);
    m.push(Entry::Button {
        label: "Import certificate…".into(),
        enabled: up && !logged_in,
        action: Action::ImportCertificate,
    });
    m.push(Entry::Button {
        label: "Log in…".into(),
        enabled: has_bundle && !logged_in,
        action: Action::LogIn,
    });
    m.push(Entry::Button {
        label: "Log out".into(),
        enabled: logged_in,
        action: Action::LogOut,
    });
    // Only where the gateway said the account may: an account that forbids it never sees it.
    if snap.allows_remembering() {
        m.push(Entry::Toggle {
            label: "Remember password".into(),
            checked: snap.remember_password,
            action: Action::RememberPassword(!snap.remember_password),
        });
    }
    m.push(Entry::Separator);
    m.push(Entry::Button {
        label: "Open log".into(),
        enabled: true,
        action: Action::OpenLog,
    });
    m.push(Entry::Button {
        label: "Quit".into(),
        enabled: true,
        action: Action::Quit,
    });
    m
}

/// A label as dbusmenu wants it: a single `_` marks the access key there, so a literal one
/// (site and agent names may hold it) is doubled.
pub fn menu_label(text: &str) -> String {
    text.replace('_', "__")
}

/// A desktop notification to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
}

/// Follows the daemon's record of sessions that ended without the technician asking, and says
/// which ones are new.
#[derive(Debug, Default)]
pub struct Watch {
    /// The last number seen; `None` before the first status, whose old records are history the
    /// technician was not there for, not news.
    seen: Option<u64>,
}

impl Watch {
    /// The notifications `status` calls for: one per reason among the sessions that ended since
    /// the last call.
    pub fn notices(&mut self, status: &Status) -> Vec<Notice> {
        let last = status.ended.last().map_or(0, |e| e.seq);
        let Some(seen) = self.seen.replace(last) else {
            return Vec::new();
        };
        // The daemon restarted: its numbers began again; all it holds is new.
        let seen = if last < seen { 0 } else { seen };
        let mut by_reason: BTreeMap<&str, Vec<&EndedView>> = BTreeMap::new();
        for e in status.ended.iter().filter(|e| e.seq > seen) {
            by_reason.entry(e.reason.as_str()).or_default().push(e);
        }
        by_reason
            .into_iter()
            .map(|(reason, ended)| {
                let devices: Vec<String> = ended
                    .iter()
                    .map(|e| format!("{}/{}", e.site, e.agent))
                    .collect();
                Notice {
                    summary: if devices.len() == 1 {
                        format!("Pinhole: {} disconnected", devices[0])
                    } else {
                        format!("Pinhole: {} devices disconnected", devices.len())
                    },
                    body: if devices.len() == 1 {
                        capitalise(reason)
                    } else {
                        format!("{}: {}", capitalise(reason), devices.join(", "))
                    },
                }
            })
            .collect()
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use pinhole_proto::{Agent, AgentType};

    use super::*;
    use crate::control::{FilterCounters, SessionView};

    fn status(state: LinkState) -> Status {
        Status {
            state,
            account: Some("alice".into()),
            gateway: Some("gw.example:443".into()),
            tunnel_ip: None,
            since: None,
            certificate_expires: None,
            last_error: None,
            sites: 2,
            sessions: Vec::new(),
            filter: FilterCounters::default(),
            refused: Vec::new(),
            ended: Vec::new(),
            remember_password: None,
        }
    }

    fn site(name: &str, online: bool, agents: &[(&str, u8)]) -> SiteView {
        SiteView {
            name: name.into(),
            domain: "acme".into(),
            online,
            agents: agents
                .iter()
                .map(|(a, last)| {
                    Agent::new(
                        *a,
                        AgentType::SiemensS7,
                        IpAddr::V4(Ipv4Addr::new(192, 168, 0, *last)),
                        [],
                    )
                })
                .collect(),
        }
    }

    fn session(site: &str, agent: &str) -> SessionView {
        SessionView {
            site: site.into(),
            agent: agent.into(),
            device: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10)),
            ports: "tcp/102".into(),
            since: String::new(),
            bytes_out: 0,
            bytes_in: 0,
        }
    }

    fn snap(s: Status, sites: Vec<SiteView>) -> Snapshot {
        Snapshot {
            daemon: Daemon::Up(Box::new(s)),
            sites,
            remember_password: false,
        }
    }

    fn button<'a>(m: &'a [Entry], label: &str) -> &'a Entry {
        m.iter()
            .find(|e| matches!(e, Entry::Button { label: l, .. } if l == label))
            .unwrap_or_else(|| panic!("no {label} in {m:?}"))
    }

    fn enabled(e: &Entry) -> bool {
        matches!(e, Entry::Button { enabled: true, .. })
    }

    #[test]
    fn the_status_line_says_who_is_logged_in_where() {
        let s = snap(status(LinkState::LoggedIn), vec![]);
        assert_eq!(status_line(&s), "Logged in as alice at gw.example:443");
        assert_eq!(
            status_line(&snap(status(LinkState::LoggedOut), vec![])),
            "Logged out (alice)"
        );
        assert_eq!(
            status_line(&snap(status(LinkState::NoBundle), vec![])),
            "No certificate imported"
        );
        let down = Snapshot {
            daemon: Daemon::Unreachable("pinholed is not running".into()),
            sites: vec![],
            remember_password: false,
        };
        assert_eq!(status_line(&down), "Pinhole is not available");
        assert_eq!(
            menu(&down)[1],
            Entry::Text("pinholed is not running".into())
        );
    }

    #[test]
    fn logged_out_the_menu_offers_import_and_login_and_no_devices() {
        let m = menu(&snap(status(LinkState::LoggedOut), vec![]));
        assert!(enabled(button(&m, "Import certificate…")));
        assert!(enabled(button(&m, "Log in…")));
        assert!(!enabled(button(&m, "Log out")));
        assert!(!m.iter().any(|e| matches!(e, Entry::Submenu { .. })));
        assert!(
            !m.iter()
                .any(|e| matches!(e, Entry::Button { label, .. } if label == "Disconnect all"))
        );
        // Without a bundle there is nothing to log in with.
        let m = menu(&snap(status(LinkState::NoBundle), vec![]));
        assert!(!enabled(button(&m, "Log in…")));
        assert!(enabled(button(&m, "Import certificate…")));
    }

    #[test]
    fn logged_in_the_menu_has_sites_with_devices_checked_while_connected() {
        let mut s = status(LinkState::LoggedIn);
        s.sessions.push(session("plant-a", "press-4-plc"));
        let m = menu(&snap(
            s,
            vec![
                site(
                    "plant-a",
                    true,
                    &[("press-4-plc", 10), ("press-4-modbus", 10)],
                ),
                site("plant-b", false, &[("drive", 20)]),
            ],
        ));
        let Entry::Submenu {
            label,
            enabled: true,
            entries,
        } = &m[2]
        else {
            panic!("{m:?}")
        };
        assert_eq!(label, "plant-a");
        assert_eq!(
            entries[0],
            Entry::Device {
                label: "press-4-plc (siemens-s7, 192.168.0.10)".into(),
                checked: true,
                enabled: true,
                action: Action::Disconnect(Target {
                    site: "plant-a".into(),
                    agent: "press-4-plc".into()
                }),
            }
        );
        assert!(matches!(
            &entries[1],
            Entry::Device { checked: false, enabled: true, action: Action::Connect(t), .. } if t.agent == "press-4-modbus"
        ));
        // An offline site says so, and its devices cannot be connected.
        let Entry::Submenu { label, entries, .. } = &m[3] else {
            panic!("{m:?}")
        };
        assert_eq!(label, "plant-b (offline)");
        assert!(matches!(&entries[0], Entry::Device { enabled: false, .. }));
        assert!(enabled(button(&m, "Disconnect all")));
        assert!(enabled(button(&m, "Log out")));
        assert!(!enabled(button(&m, "Log in…")));
        assert!(!enabled(button(&m, "Import certificate…")));
        assert_eq!(icon(&snap(status(LinkState::LoggedIn), vec![])), Icon::Idle);
    }

    #[test]
    fn the_icon_shows_a_connected_device_and_trouble() {
        let mut s = status(LinkState::LoggedIn);
        s.sessions.push(session("plant-a", "press-4-plc"));
        assert_eq!(icon(&snap(s, vec![])), Icon::Connected);
        let mut failed = status(LinkState::Failed);
        failed.last_error = Some("your account was closed; ask your administrator".into());
        let f = snap(failed, vec![]);
        assert_eq!(icon(&f), Icon::Attention);
        assert_eq!(
            menu(&f)[1],
            Entry::Text("your account was closed; ask your administrator".into())
        );
        assert_eq!(icon(&Snapshot::default()), Icon::Idle);
    }

    #[test]
    fn sites_are_asked_for_when_the_list_does_not_match_the_login() {
        let s = snap(status(LinkState::LoggedIn), vec![]);
        assert!(s.wants_sites());
        let s = snap(
            status(LinkState::LoggedIn),
            vec![site("a", true, &[]), site("b", true, &[])],
        );
        assert!(!s.wants_sites());
        assert!(!snap(status(LinkState::Connecting), vec![]).wants_sites());
    }

    fn toggle(m: &[Entry]) -> Option<&Entry> {
        m.iter().find(|e| matches!(e, Entry::Toggle { .. }))
    }

    #[test]
    fn remember_password_is_offered_only_where_the_gateway_allows_it() {
        // Before any welcome the gateway has not said: nothing offered.
        let s = snap(status(LinkState::LoggedOut), vec![]);
        assert!(toggle(&menu(&s)).is_none());
        assert!(!s.forbids_remembering());
        let mut allowed = status(LinkState::LoggedIn);
        allowed.remember_password = Some(true);
        let mut s = snap(allowed.clone(), vec![]);
        assert_eq!(
            toggle(&menu(&s)),
            Some(&Entry::Toggle {
                label: "Remember password".into(),
                checked: false,
                action: Action::RememberPassword(true),
            })
        );
        s.remember_password = true;
        assert!(matches!(
            toggle(&menu(&s)),
            Some(Entry::Toggle {
                checked: true,
                action: Action::RememberPassword(false),
                ..
            })
        ));
        // Still offered after logging out: the last welcome said so.
        allowed.state = LinkState::LoggedOut;
        assert!(toggle(&menu(&snap(allowed, vec![]))).is_some());
        let mut forbidden = status(LinkState::LoggedIn);
        forbidden.remember_password = Some(false);
        let mut s = snap(forbidden, vec![]);
        s.remember_password = true;
        assert!(toggle(&menu(&s)).is_none(), "the setting does not matter");
        assert!(s.forbids_remembering());
    }

    #[test]
    fn underscores_are_not_access_keys() {
        assert_eq!(menu_label("line_3/plc"), "line__3/plc");
    }

    #[test]
    fn ended_sessions_become_one_notice_per_reason_once() {
        let mut w = Watch::default();
        let mut s = status(LinkState::LoggedIn);
        s.push_ended("old", "thing", "site switched off", String::new());
        // The first status is history, not news.
        assert!(w.notices(&s).is_empty());
        assert!(w.notices(&s).is_empty());
        s.push_ended("plant-a", "press-4-plc", "site switched off", String::new());
        assert_eq!(
            w.notices(&s),
            vec![Notice {
                summary: "Pinhole: plant-a/press-4-plc disconnected".into(),
                body: "Site switched off".into()
            }]
        );
        assert!(w.notices(&s).is_empty(), "told once");
        s.push_ended(
            "plant-a",
            "press-4-plc",
            "your account was closed",
            String::new(),
        );
        s.push_ended(
            "plant-a",
            "press-4-modbus",
            "your account was closed",
            String::new(),
        );
        s.push_ended(
            "plant-b",
            "drive",
            "the gateway stopped answering",
            String::new(),
        );
        let n = w.notices(&s);
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(n[1].summary, "Pinhole: 2 devices disconnected");
        assert_eq!(
            n[1].body,
            "Your account was closed: plant-a/press-4-plc, plant-a/press-4-modbus"
        );
        assert_eq!(n[0].body, "The gateway stopped answering");
    }

    #[test]
    fn a_restarted_daemon_numbers_anew() {
        let mut w = Watch::default();
        let mut s = status(LinkState::LoggedIn);
        for _ in 0..5 {
            s.push_ended("a", "b", "x", String::new());
        }
        assert!(w.notices(&s).is_empty());
        let mut fresh = status(LinkState::LoggedIn);
        fresh.push_ended("plant-a", "plc", "site switched off", String::new());
        assert_eq!(w.notices(&fresh).len(), 1);
    }
}
