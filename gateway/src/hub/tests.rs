//! The hub's decisions, against the real SQLite registry in a temporary directory.

use std::time::{Duration, Instant};

use pinhole_proto::{Agent, AgentType, ErrorCode, GatewayEvent, Message};

use super::*;
use crate::audit;
use crate::store::{DomainPath, Store};

struct TestIssuer;

impl Issuer for TestIssuer {
    fn issue_site(&self, site: &str, _public_key: &[u8]) -> Result<Issued, String> {
        Ok(Issued {
            certificate: site.as_bytes().to_vec(),
            serial: vec![0x51, site.len() as u8],
        })
    }
    fn ca_certificate(&self) -> &[u8] {
        b"ca"
    }
}

const SITE_SERIAL: [u8; 2] = [0x51, 7];
const ALICE_SERIAL: [u8; 1] = [0xa1];

struct World {
    _dir: tempfile::TempDir,
    store: Store,
    hub: Hub<LinkId>,
    now: Instant,
}

fn plc() -> Agent {
    Agent::new(
        "plc",
        AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    )
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 40000))
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let mut store = Store::open(&dir.path().join("gateway.db")).expect("open");
        let admin = Actor::System;
        store
            .create_domain(&admin, &"acme".parse::<DomainPath>().expect("d"))
            .expect("domain");
        let (tok, _) = store
            .create_token(&admin, &"acme".parse().expect("d"), Duration::from_secs(60))
            .expect("token");
        // "plant-a" has 7 bytes: the test issuer's serial is [0x51, 7].
        store
            .enroll(&tok, "plant-a", || Ok((vec![1], SITE_SERIAL.to_vec())))
            .expect("enroll");
        store
            .create_account(&admin, "alice", &ALICE_SERIAL, 365)
            .expect("alice");
        store
            .set_grant(&admin, "alice", &"acme".parse().expect("d"), true)
            .expect("grant");
        let now = Instant::now();
        Self {
            _dir: dir,
            store,
            hub: Hub::new(Box::new(TestIssuer), now),
            now,
        }
    }

    fn events(&self) -> Vec<String> {
        audit::list(self.store.conn(), None)
            .expect("audit")
            .into_iter()
            .map(|r| format!("{} | {}", r.event, r.description))
            .collect()
    }

    fn event(&mut self, link: LinkId, ev: GatewayEvent) -> Vec<Command> {
        self.hub.handle_event(&mut self.store, link, ev, self.now)
    }

    fn connect(&mut self, link: LinkId, role: Role, name: &str, serial: &[u8]) -> Option<PeerAuth> {
        let presented = Presented {
            role,
            name: name.into(),
            serial: serial.to_vec(),
            expires: self.now + Duration::from_secs(3600),
        };
        self.hub.handle_connect(
            &mut self.store,
            link,
            link,
            addr(link as u8),
            Some(presented),
            self.now,
        )
    }

    fn site_online(&mut self, link: LinkId, agents: Vec<Agent>) -> Vec<Command> {
        self.connect(link, Role::Site, "plant-a", &SITE_SERIAL)
            .expect("site auth");
        self.event(
            link,
            GatewayEvent::SiteHello {
                software: "1.0".into(),
                boot_id: "b1".into(),
                agents,
                heartbeat: Duration::from_secs(10),
                offload: false,
            },
        )
    }

    fn alice_in(&mut self, link: LinkId) -> Vec<Command> {
        self.alice_in_with(link, false)
    }

    /// alice logs in; `offload`: her client's `hello` said it takes super-packets.
    fn alice_in_with(&mut self, link: LinkId, offload: bool) -> Vec<Command> {
        self.connect(link, Role::Technician, "alice", &ALICE_SERIAL)
            .expect("alice auth");
        self.event(
            link,
            GatewayEvent::TechnicianHello {
                software: "1.0".into(),
                offload,
            },
        )
    }

    /// alice (link 1) opens plant-a/plc through the site (link 2); returns the gateway id.
    fn open(&mut self) -> u32 {
        self.site_online(2, vec![plc()]);
        self.alice_in(1);
        let cmds = self.event(
            1,
            GatewayEvent::SessionOpen {
                session: 5,
                site: "plant-a".into(),
                agent: "plc".into(),
                key: "c1".repeat(32),
            },
        );
        match cmds.as_slice() {
            [Command::Send { link: 2, message }] => match &**message {
                Message::SessionOpen { session, .. } => *session,
                m => panic!("{m:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}

/// The hub passes each end's offload word to the other: the technician's in `session_open`,
/// the site's in `session_opened` (each link's core then drops it for a peer that did not
/// announce offload).
#[test]
fn each_ends_offload_word_goes_to_the_other_end() {
    for (client, site) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut w = World::new();
        w.site_online(2, vec![plc()]);
        w.alice_in_with(1, client);
        let cmds = w.event(
            1,
            GatewayEvent::SessionOpen {
                session: 5,
                site: "plant-a".into(),
                agent: "plc".into(),
                key: "c1".repeat(32),
            },
        );
        let [Command::Send { link: 2, message }] = cmds.as_slice() else {
            panic!("{cmds:?}")
        };
        let Message::SessionOpen {
            session, offload, ..
        } = &**message
        else {
            panic!("{message:?}")
        };
        assert_eq!(*offload, client);
        let cmds = w.event(
            2,
            GatewayEvent::SessionOpened {
                session: *session,
                key: "5e".repeat(32),
                agent: plc(),
                offload: site,
            },
        );
        assert!(
            matches!(cmds.as_slice(), [Command::Send { link: 1, message }]
                if matches!(&**message, Message::SessionOpened { offload, .. } if *offload == site)),
            "{cmds:?}"
        );
    }
}

#[test]
fn a_session_opens_with_the_registered_agent_and_relays() {
    let mut w = World::new();
    let gsid = w.open();
    let cmds = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    assert!(
        matches!(cmds.as_slice(), [Command::Send { link: 1, message }]
            if matches!(&**message, Message::SessionOpened { session: 5, agent, .. } if *agent == plc())),
        "{cmds:?}"
    );
    assert_eq!(
        w.hub.route(1, 5, 100),
        Some(Route {
            to: 2,
            session: gsid
        })
    );
    assert_eq!(w.hub.route(2, gsid, 40), Some(Route { to: 1, session: 5 }));
    assert_eq!(w.hub.route(3, gsid, 40), None, "another link owns nothing");
    let cmds = w.event(
        1,
        GatewayEvent::SessionClose {
            session: 5,
            reason: "done".into(),
            agent: None,
        },
    );
    assert_eq!(cmds.len(), 1, "the site is told: {cmds:?}");
    let ev = w.events();
    assert!(
        ev.iter().any(|e| e
            .starts_with("session opened | alice connected to plant-a/plc (192.168.0.10 tcp/102)")),
        "{ev:#?}"
    );
    assert!(
        ev.iter().any(|e| e.starts_with("session closed")
            && e.contains("100 bytes to the site, 40 bytes from it")),
        "{ev:#?}"
    );
}

/// Hole 4a: a compromised site chooses which address the technician routes into its tunnel.
#[test]
fn a_site_confirming_another_address_is_refused() {
    let mut w = World::new();
    let gsid = w.open();
    let mut forged = plc();
    forged.address = "10.1.1.1".parse().expect("ip");
    let cmds = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: forged,
            offload: false,
        },
    );
    assert!(
        cmds.iter().all(|c| !matches!(c, Command::Send { message, .. } if matches!(&**message, Message::SessionOpened { .. }))),
        "the technician never gets the forged agent: {cmds:?}"
    );
    assert!(cmds.iter().any(|c| matches!(c, Command::Send { link: 1, message } if matches!(&**message, Message::SessionRefused { session: 5, .. }))));
    assert!(cmds.iter().any(|c| matches!(c, Command::Send { link: 2, message } if matches!(&**message, Message::SessionClose { .. }))));
    assert_eq!(w.hub.sessions(), 0);
    assert!(
        w.events()
            .iter()
            .any(|e| e.starts_with("session refused | site plant-a confirmed plc wrongly"))
    );
}

/// Hole 5: a close that closes nothing is not forwarded, audited or acted on.
#[test]
fn closes_that_close_nothing_are_ignored() {
    let mut w = World::new();
    let gsid = w.open();
    let before = w.events().len();
    for _ in 0..100 {
        let cmds = w.event(
            1,
            GatewayEvent::SessionClose {
                session: 5,
                reason: "x".into(),
                agent: Some("not-an-agent".into()),
            },
        );
        assert!(cmds.is_empty(), "{cmds:?}");
        let cmds = w.event(
            2,
            GatewayEvent::SessionClose {
                session: gsid + 1,
                reason: "x".into(),
                agent: None,
            },
        );
        assert!(cmds.is_empty(), "{cmds:?}");
    }
    assert_eq!(w.events().len(), before);
}

/// Hole 6: "session opened" that cannot be recorded is not acknowledged.
#[test]
fn a_session_that_cannot_be_recorded_is_refused() {
    let mut w = World::new();
    let gsid = w.open();
    w.store
        .conn()
        .execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON audit WHEN NEW.event = 'session opened'
             BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .expect("trigger");
    let cmds = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    assert!(
        cmds.iter().any(|c| matches!(c, Command::Send { link: 1, message } if matches!(&**message, Message::SessionRefused { .. }))),
        "{cmds:?}"
    );
    assert!(cmds.iter().all(|c| !matches!(c, Command::Send { message, .. } if matches!(&**message, Message::SessionOpened { .. }))));
    assert_eq!(w.hub.route(1, 5, 1), None, "nothing relayed");
}

/// Hole 6: a login that cannot be recorded is refused.
#[test]
fn a_login_that_cannot_be_recorded_is_refused() {
    let mut w = World::new();
    w.store
        .conn()
        .execute_batch("CREATE TRIGGER fail BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END;")
        .expect("trigger");
    let cmds = w.alice_in(1);
    assert!(
        matches!(
            cmds.as_slice(),
            [Command::Close {
                code: ErrorCode::Internal,
                ..
            }]
        ),
        "{cmds:?}"
    );
}

/// Hole 1: a flood of refused enrollments costs one record per source and minute.
#[test]
fn refused_enrollments_are_recorded_in_aggregate() {
    let mut w = World::new();
    let before = w.events().len();
    for i in 0..500u64 {
        let link = 100 + i;
        w.hub
            .handle_connect(&mut w.store, link, link, addr(9), None, w.now)
            .expect("anonymous");
        let cmds = w.event(
            link,
            GatewayEvent::Enroll {
                token: format!("bogus{i}"),
                site: format!("s{i}"),
                public_key: vec![1],
            },
        );
        assert!(
            matches!(
                cmds.as_slice(),
                [Command::Close {
                    code: ErrorCode::TokenRefused,
                    ..
                }]
            ),
            "{cmds:?}"
        );
        let _ = w
            .hub
            .handle_closed(&mut w.store, link, &CloseReason::Local, w.now);
    }
    assert_eq!(w.events().len(), before, "nothing written per attempt");
    let later = w.now + Duration::from_secs(61);
    assert!(w.hub.poll_timeout().is_some_and(|t| t <= later));
    let _ = w.hub.handle_timeout(&mut w.store, later);
    let ev = w.events();
    assert_eq!(ev.len(), before + 1, "{ev:#?}");
    assert!(
        ev[before].starts_with("enrollments refused | 500 from 192.0.2.9"),
        "{}",
        ev[before]
    );
}

/// Hole 7: a revoked site loses its link and sessions at the next administrative change.
#[test]
fn revoking_a_site_ends_its_link_and_sessions() {
    let mut w = World::new();
    let _gsid = w.open();
    w.store
        .conn()
        .execute(
            "INSERT INTO revoked (serial, revoked) VALUES (?1, '2026-01-01T00:00:00Z')",
            [SITE_SERIAL.to_vec()],
        )
        .expect("revoke");
    let cmds = w.hub.handle_admin_change(&mut w.store, w.now);
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::Close {
                link: 2,
                code: ErrorCode::UnknownSite,
                ..
            }
        )),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|c| matches!(c, Command::Send { link: 1, message } if matches!(&**message, Message::SessionClose { session: 5, .. }))), "{cmds:?}");
    assert_eq!(w.hub.sessions(), 0);
    assert_eq!(
        w.connect(9, Role::Site, "plant-a", &SITE_SERIAL),
        None,
        "and cannot come back"
    );
}

/// Hole 7: a link ends when its certificate expires.
#[test]
fn a_link_ends_when_its_certificate_expires() {
    let mut w = World::new();
    w.alice_in(1);
    let expiry = w.now + Duration::from_secs(3600);
    assert!(w.hub.poll_timeout().is_some_and(|t| t <= expiry));
    let cmds = w.hub.handle_timeout(&mut w.store, expiry);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Close { link: 1, .. })),
        "{cmds:?}"
    );
}

#[test]
fn withdrawing_a_grant_ends_the_session_and_account_close_the_link() {
    let mut w = World::new();
    let gsid = w.open();
    let _ = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    w.store
        .set_grant(&Actor::System, "alice", &"acme".parse().expect("d"), false)
        .expect("ungrant");
    let cmds = w.hub.handle_admin_change(&mut w.store, w.now);
    assert!(cmds.iter().any(|c| matches!(c, Command::Send { link: 2, message } if matches!(&**message, Message::SessionClose { .. }))), "{cmds:?}");
    assert_eq!(w.hub.sessions(), 0);
    w.store
        .close_account(&Actor::System, "alice")
        .expect("close");
    let cmds = w.hub.handle_admin_change(&mut w.store, w.now);
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::Close {
                link: 1,
                code: ErrorCode::AccountClosed,
                ..
            }
        )),
        "{cmds:?}"
    );
}

/// A re-issued bundle (portal) revokes the old certificate: the old bundle's link ends with
/// its session, and says why.
#[test]
fn a_reissued_certificate_ends_the_old_bundles_link() {
    let mut w = World::new();
    let gsid = w.open();
    let _ = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    w.store
        .reissue_account(&Actor::System, "alice", &[0xa2], 30)
        .expect("reissue");
    let cmds = w.hub.handle_admin_change(&mut w.store, w.now);
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::Close {
                link: 1,
                code: ErrorCode::AccountClosed,
                text,
            } if text.contains("replaced")
        )),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|c| matches!(c, Command::Send { link: 2, message } if matches!(&**message, Message::SessionClose { .. }))), "{cmds:?}");
    assert_eq!(w.hub.sessions(), 0);
}

/// A site whose old link is replaced stays online when the old link finally ends.
#[test]
fn a_replaced_site_link_does_not_take_the_site_offline() {
    let mut w = World::new();
    let _ = w.site_online(2, vec![plc()]);
    let cmds = w.site_online(3, vec![plc()]);
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::Close {
                link: 2,
                code: ErrorCode::Replaced,
                ..
            }
        )),
        "{cmds:?}"
    );
    let _ = w
        .hub
        .handle_closed(&mut w.store, 2, &CloseReason::Local, w.now);
    assert!(w.hub.site_online("plant-a"));
    let online = w.store.sites().expect("sites")[0].online;
    assert!(online, "the registry still says online");
}

/// Inventory updates go only to technicians the change concerns, coalesced.
#[test]
fn inventory_updates_only_for_concerned_technicians() {
    let mut w = World::new();
    w.store
        .create_account(&Actor::System, "bob", &[0xb0], 365)
        .expect("bob");
    w.alice_in(1);
    w.connect(4, Role::Technician, "bob", &[0xb0]).expect("bob");
    let _ = w.event(
        4,
        GatewayEvent::TechnicianHello {
            software: "1".into(),
            offload: false,
        },
    );
    let _ = w.site_online(2, vec![plc()]);
    assert!(
        w.hub
            .handle_timeout(&mut w.store, w.now)
            .iter()
            .all(|c| !matches!(c, Command::Inventory { .. })),
        "coalesced"
    );
    let cmds = w
        .hub
        .handle_timeout(&mut w.store, w.now + INVENTORY_COALESCE);
    let to: Vec<LinkId> = cmds
        .iter()
        .filter(|c| matches!(c, Command::Inventory { .. }))
        .map(Command::link)
        .collect();
    assert_eq!(to, [1], "alice sees plant-a, bob has no grant");
}

/// A client that asked for changes gets the changed site only, first in the answer to its
/// subscription (what changed since its welcome), then in coalesced pushes; a client that did
/// not ask still gets whole inventories.
#[test]
fn a_subscribed_technician_gets_changes_not_whole_inventories() {
    let mut w = World::new();
    w.store
        .create_account(&Actor::System, "bob", &[0xb0], 365)
        .expect("bob");
    w.store
        .set_grant(&Actor::System, "bob", &"acme".parse().expect("d"), true)
        .expect("grant");
    w.alice_in(1);
    w.connect(4, Role::Technician, "bob", &[0xb0]).expect("bob");
    let _ = w.event(
        4,
        GatewayEvent::TechnicianHello {
            software: "1".into(),
            offload: false,
        },
    );
    // plant-a comes online between alice's welcome and her subscription.
    let _ = w.site_online(2, vec![plc()]);
    let answer = w.event(1, GatewayEvent::List { changes: true });
    match answer.as_slice() {
        [
            Command::InventoryChanges {
                link: 1,
                sites,
                removed,
            },
        ] => {
            assert_eq!(sites.len(), 1);
            assert_eq!(sites[0].name, "plant-a");
            assert!(sites[0].online);
            assert!(removed.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Then it goes offline: alice gets that change, bob (no subscription) the whole list.
    let _ = w
        .hub
        .handle_closed(&mut w.store, 2, &CloseReason::Local, w.now);
    let cmds = w
        .hub
        .handle_timeout(&mut w.store, w.now + INVENTORY_COALESCE);
    let mut to_alice = 0;
    let mut to_bob = 0;
    for c in &cmds {
        match c {
            Command::InventoryChanges { link: 1, sites, .. } => {
                to_alice += 1;
                assert_eq!(sites.len(), 1);
                assert!(!sites[0].online, "{sites:?}");
            }
            Command::Inventory {
                link: 4,
                update: true,
                ..
            } => to_bob += 1,
            other if other.link() == 1 || other.link() == 4 => panic!("{other:?}"),
            _ => {}
        }
    }
    assert_eq!((to_alice, to_bob), (1, 1), "{cmds:?}");
}

#[test]
fn an_admin_sees_live_sessions_with_their_bytes() {
    let mut w = World::new();
    let gsid = w.open();
    let _ = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    let _ = w.hub.route(1, 5, 100);
    let _ = w.hub.route(2, gsid, 40);
    let live = w.hub.live_sessions(w.now + Duration::from_secs(7));
    assert_eq!(
        live,
        vec![LiveSession {
            id: gsid,
            account: "alice".into(),
            site: "plant-a".into(),
            agents: vec!["plc".into()],
            age: Duration::from_secs(7),
            up: 100,
            down: 40,
        }]
    );
    assert_eq!(w.hub.session_site(gsid), Some("plant-a"));
}

#[test]
fn an_admin_ends_a_session_at_both_ends_and_it_is_recorded() {
    let mut w = World::new();
    let gsid = w.open();
    let actor = Actor::Admin("root".into());
    let cmds = w
        .hub
        .handle_end_session(&mut w.store, gsid, &actor, w.now)
        .expect("ended");
    let told: Vec<LinkId> = cmds
        .iter()
        .filter(|c| matches!(c, Command::Send { message, .. } if matches!(&**message, Message::SessionClose { .. })))
        .map(Command::link)
        .collect();
    assert_eq!(told, vec![1, 2], "client and site are told: {cmds:?}");
    assert!(w.hub.live_sessions(w.now).is_empty());
    let ev = w.events();
    assert!(
        ev.iter().any(
            |e| e == "session ended by admin | session of alice to plant-a ended by admin:root"
        ),
        "{ev:#?}"
    );
    assert!(
        ev.iter().any(|e| e.starts_with("session closed")),
        "{ev:#?}"
    );
    assert_eq!(
        w.hub.handle_end_session(&mut w.store, gsid, &actor, w.now),
        Err(EndSessionError::NotOpen(gsid)),
        "ending it twice is refused"
    );
}

/// A technician asking for its inventory in a loop gets one answer, then one coalesced update.
#[test]
fn list_in_a_loop_is_answered_once_then_coalesced() {
    let mut w = World::new();
    w.alice_in(1);
    let answers: usize = (0..1000)
        .map(|_| w.event(1, GatewayEvent::List { changes: false }).len())
        .sum();
    assert_eq!(answers, 1);
    let cmds = w
        .hub
        .handle_timeout(&mut w.store, w.now + INVENTORY_COALESCE);
    assert_eq!(
        cmds.iter()
            .filter(|c| matches!(c, Command::Inventory { .. }))
            .count(),
        1
    );
}

/// Each session request costs durable records: a flood of them ends the link.
#[test]
fn session_requests_and_agent_changes_are_rate_limited() {
    let mut w = World::new();
    w.site_online(2, vec![plc()]);
    w.alice_in(1);
    let mut closed = false;
    for i in 0..=MAX_SESSION_REQUESTS {
        let cmds = w.event(
            1,
            GatewayEvent::SessionOpen {
                session: 100 + i,
                site: "plant-z".into(),
                agent: "plc".into(),
                key: "c1".repeat(32),
            },
        );
        closed = cmds.iter().any(|c| {
            matches!(
                c,
                Command::Close {
                    link: 1,
                    code: ErrorCode::Protocol,
                    ..
                }
            )
        });
    }
    assert!(closed, "request {} ends the link", MAX_SESSION_REQUESTS + 1);
    let mut closed = false;
    for _ in 0..=MAX_AGENT_CHANGES {
        let cmds = w.event(2, GatewayEvent::Agents(vec![plc()]));
        closed = cmds
            .iter()
            .any(|c| matches!(c, Command::Close { link: 2, .. }));
    }
    assert!(closed);
}

/// One bundle cannot hold more than a few links.
#[test]
fn links_per_account_are_bounded() {
    let mut w = World::new();
    for link in 0..MAX_LINKS_PER_ACCOUNT as u64 {
        assert!(
            w.connect(10 + link, Role::Technician, "alice", &ALICE_SERIAL)
                .is_some()
        );
    }
    assert_eq!(
        w.connect(99, Role::Technician, "alice", &ALICE_SERIAL),
        None
    );
}

/// Sites with very many agents are left out of an inventory rather than locking the whole
/// domain out of logging in.
#[test]
fn an_inventory_always_fits_one_message() {
    let big: Vec<Agent> = (0..256)
        .map(|i| {
            Agent::new(
                format!("agent-{i:03}-{}", "x".repeat(50)),
                AgentType::Custom,
                "2001:db8::1".parse().expect("ip"),
                (1..=64).map(pinhole_proto::Port::tcp),
            )
        })
        .collect();
    let site = SiteView {
        name: "s".into(),
        domain: "acme".into(),
        online: true,
        agents: big,
    };
    let sites = fit_inventory(vec![site; 12]);
    let json = serde_json::to_vec(&Message::Inventory {
        sites: sites.clone(),
    })
    .expect("json");
    assert!(
        json.len() <= pinhole_proto::frame::MAX_CONTROL,
        "{}",
        json.len()
    );
    assert!(sites.len() >= 6 && sites.len() < 12, "{}", sites.len());
}

/// A site that restored its firewall table leaves an audit record; a flood of such reports
/// ends its link.
#[test]
fn firewall_restorations_are_audited_and_bounded() {
    let mut w = World::new();
    w.site_online(2, vec![plc()]);
    let cmds = w.event(
        2,
        GatewayEvent::FirewallRestored(pinhole_proto::FirewallChange::Removed),
    );
    assert!(
        !cmds.iter().any(|c| matches!(c, Command::Close { .. })),
        "{cmds:?}"
    );
    assert!(
        w.events()
            .iter()
            .any(|e| e.contains("site firewall restored")),
        "{:?}",
        w.events()
    );
    let mut closed = false;
    for _ in 0..MAX_FIREWALL_ALARMS {
        let cmds = w.event(
            2,
            GatewayEvent::FirewallRestored(pinhole_proto::FirewallChange::Changed),
        );
        closed = cmds
            .iter()
            .any(|c| matches!(c, Command::Close { link: 2, .. }));
    }
    assert!(closed);
}

#[test]
fn a_session_request_the_site_leaves_unanswered_is_refused_and_the_site_link_ended() {
    let mut w = World::new();
    let gsid = w.open();
    // The request is due an answer within SESSION_ANSWER: the hub wants to be woken then.
    let due = w.now + SESSION_ANSWER;
    assert!(w.hub.poll_timeout().is_some_and(|t| t <= due));
    let early = w
        .hub
        .handle_timeout(&mut w.store, due - Duration::from_millis(1));
    assert!(early.iter().all(|c| c.link() != 1), "{early:?}");
    let cmds = w.hub.handle_timeout(&mut w.store, due);
    let refusal = cmds.iter().find_map(|c| match c {
        Command::Send { link: 1, message } => match &**message {
            Message::SessionRefused { session: 5, reason } => Some(reason.clone()),
            _ => None,
        },
        _ => None,
    });
    assert_eq!(
        refusal.as_deref(),
        Some("plant-a does not answer; its connection to the gateway may be broken"),
        "{cmds:?}"
    );
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Close { link: 2, .. })),
        "the suspect site link is ended: {cmds:?}"
    );
    assert_eq!(w.hub.sessions(), 0, "session {gsid} is gone");
    // Until its link is gone, the suspect site takes no more requests.
    let again = w.event(
        1,
        GatewayEvent::SessionOpen {
            session: 6,
            site: "plant-a".into(),
            agent: "plc".into(),
            key: "c1".repeat(32),
        },
    );
    assert!(again.iter().all(|c| c.link() != 2), "{again:?}");
    assert!(
        again.iter().any(|c| matches!(c, Command::Send { link: 1, message }
            if matches!(&**message, Message::SessionRefused { reason, .. } if reason.contains("does not answer")))),
        "{again:?}"
    );
    let events = w.events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("site link suspect | site plant-a did not answer")),
        "{events:?}"
    );
    // The I/O layer closes the link: plant-a goes offline.
    let _ = w
        .hub
        .handle_closed(&mut w.store, 2, &CloseReason::Local, due);
    assert!(!w.hub.site_online("plant-a"));
}

#[test]
fn an_answered_request_sets_off_nothing_when_its_deadline_passes() {
    let mut w = World::new();
    let gsid = w.open();
    let cmds = w.event(
        2,
        GatewayEvent::SessionOpened {
            session: gsid,
            key: "5e".repeat(32),
            agent: plc(),
            offload: false,
        },
    );
    assert!(!cmds.is_empty());
    let cmds = w.hub.handle_timeout(&mut w.store, w.now + SESSION_ANSWER);
    assert!(
        cmds.iter()
            .all(|c| !matches!(c, Command::Close { .. }) && c.link() != 1),
        "{cmds:?}"
    );
    assert_eq!(w.hub.sessions(), 1);
}

/// A site that says its switch reads off before it closes is offline *switched off* in the
/// registry, audited as such; a site that is merely lost is not; connecting again clears it.
#[test]
fn a_site_switched_off_is_recorded_as_such() {
    let mut w = World::new();
    w.site_online(2, vec![plc()]);
    let _ = w.event(2, GatewayEvent::SwitchedOff);
    let _ = w
        .hub
        .handle_closed(&mut w.store, 2, &CloseReason::Local, w.now);
    let site = &w.store.sites().expect("sites")[0];
    assert!(!site.online && site.switched_off, "{site:?}");
    assert!(
        w.events().iter().any(|e| e.starts_with(
            "site switched off | site plant-a disconnected: its remote access switch was turned off"
        )),
        "{:?}",
        w.events()
    );

    w.site_online(3, vec![plc()]);
    let site = &w.store.sites().expect("sites")[0];
    assert!(site.online && !site.switched_off, "{site:?}");
    let _ = w
        .hub
        .handle_closed(&mut w.store, 3, &CloseReason::Local, w.now);
    let site = &w.store.sites().expect("sites")[0];
    assert!(
        !site.online && !site.switched_off,
        "lost, not switched off: {site:?}"
    );
}

/// The site half of an administrative change works from one read of every site's serial: a
/// site still current keeps its link, one whose serial changed (re-enrolled) or that is gone
/// loses it, with its sessions.
#[test]
fn a_site_not_current_in_one_read_of_all_sites_loses_its_link() {
    let mut w = World::new();
    let _gsid = w.open();
    let mut current = crate::registry::SiteSerials::new();
    current.insert("plant-a".into(), SITE_SERIAL.to_vec());
    let cmds = w.hub.handle_site_change(&mut w.store, &current, w.now);
    assert!(cmds.is_empty(), "{cmds:?}");
    assert_eq!(w.hub.sessions(), 1);
    current.insert("plant-a".into(), vec![0x51, 8]);
    let cmds = w.hub.handle_site_change(&mut w.store, &current, w.now);
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            Command::Close {
                link: 2,
                code: ErrorCode::UnknownSite,
                ..
            }
        )),
        "{cmds:?}"
    );
    assert_eq!(w.hub.sessions(), 0);
}
