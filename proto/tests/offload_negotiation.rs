//! Offload negotiation through the three cores (client, the gateway's two link cores, site):
//! super-packets are granted on a session only when the client, the gateway and the site all
//! announced them, and a peer that did not announce never receives an offload field (peers that
//! predate them refuse unknown fields). The hub's part (passing the client's flag to the site
//! and the site's to the client) is played here as `gateway/src/hub` plays it.

use std::time::{Duration, Instant};

use pinhole_proto::gateway::MAX_DATAGRAM;
use pinhole_proto::{
    Agent, AgentType, ClientCore, ClientEvent, GatewayCore, GatewayEvent, Message, PeerAuth,
    SiteCore, SiteEvent, SiteHello,
};

fn no_data() -> impl FnMut(u32, &[u8]) {
    |_, _| {}
}

/// What the session grants at the client and at the site, and every byte the gateway sent to
/// each end.
fn negotiate(
    client_offload: bool,
    site_offload: bool,
) -> (Option<u32>, Option<u32>, String, String) {
    let now = Instant::now();
    let mut client =
        ClientCore::with_offload(now, "0.1.0", Duration::from_secs(15), client_offload);
    let mut site = SiteCore::new(
        now,
        SiteHello {
            software: "0.1.0".into(),
            boot_id: "b".into(),
            heartbeat: Duration::from_secs(60),
            agents: Vec::new(),
            offload: site_offload,
        },
    );
    let mut gc = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
    let mut gs = GatewayCore::new(now, PeerAuth::Site("plant-a".into()));
    let (mut to_client, mut to_site) = (Vec::new(), Vec::new());
    while let Some(b) = client.poll_transmit() {
        gc.handle_input(&b, now, &mut no_data());
    }
    while let Some(b) = site.poll_transmit() {
        gs.handle_input(&b, now, &mut no_data());
    }
    assert!(matches!(
        gc.poll_event(),
        Some(GatewayEvent::TechnicianHello { offload, .. }) if offload == client_offload
    ));
    assert!(matches!(
        gs.poll_event(),
        Some(GatewayEvent::SiteHello { offload, .. }) if offload == site_offload
    ));
    gc.welcome(
        "alice",
        Some("100.64.0.2".parse().expect("ip")),
        None,
        false,
        now,
    );
    gs.welcome("plant-a", None, None, false, now);
    let flush = |gw: &mut GatewayCore, wire: &mut Vec<u8>| -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = gw.poll_transmit() {
            wire.extend_from_slice(&b);
            out.push(b);
        }
        out
    };
    for b in flush(&mut gs, &mut to_site) {
        site.handle_input(&b, now);
    }
    for b in flush(&mut gc, &mut to_client) {
        client.handle_input(&b, now);
    }
    assert_eq!(site.poll_event(), Some(SiteEvent::Welcomed));
    assert!(matches!(
        client.poll_event(),
        Some(ClientEvent::LoggedIn { .. })
    ));
    // The client asks; the hub forwards with the client's flag.
    client.open_session(1, "plant-a", "plc", &"ab".repeat(32), now);
    while let Some(b) = client.poll_transmit() {
        gc.handle_input(&b, now, &mut no_data());
    }
    // Its subscription to inventory changes (sent right after the welcome) comes first.
    assert!(matches!(
        gc.poll_event(),
        Some(GatewayEvent::List { changes: true })
    ));
    assert!(matches!(
        gc.poll_event(),
        Some(GatewayEvent::SessionOpen { .. })
    ));
    gs.send(
        &Message::SessionOpen {
            session: 9,
            site: "plant-a".into(),
            agent: "plc".into(),
            key: "ab".repeat(32),
            tunnel_ip: Some("100.64.0.2".parse().expect("ip")),
            offload: gc.peer_offload(),
        },
        now,
    );
    for b in flush(&mut gs, &mut to_site) {
        site.handle_input(&b, now);
    }
    let Some(SiteEvent::SessionOpen {
        offload: at_site, ..
    }) = site.poll_event()
    else {
        panic!("no session_open at the site")
    };
    let agent = Agent::new(
        "plc",
        AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    );
    site.session_opened(9, &"cd".repeat(32), agent.clone(), now);
    while let Some(b) = site.poll_transmit() {
        gs.handle_input(&b, now, &mut no_data());
    }
    let Some(GatewayEvent::SessionOpened { offload, .. }) = gs.poll_event() else {
        panic!("no session_opened at the gateway")
    };
    gc.send(
        &Message::SessionOpened {
            session: 1,
            key: "cd".repeat(32),
            agent,
            offload,
        },
        now,
    );
    for b in flush(&mut gc, &mut to_client) {
        client.handle_input(&b, now);
    }
    let Some(ClientEvent::SessionOpened {
        offload: at_client, ..
    }) = client.poll_event()
    else {
        panic!("no session_opened at the client")
    };
    (
        at_client,
        at_site,
        String::from_utf8_lossy(&to_client).into_owned(),
        String::from_utf8_lossy(&to_site).into_owned(),
    )
}

#[test]
fn super_packets_only_when_client_gateway_and_site_all_announced() {
    let (c, s, _, _) = negotiate(true, true);
    assert_eq!((c, s), (Some(MAX_DATAGRAM), Some(MAX_DATAGRAM)));
    for (client, site) in [(true, false), (false, true), (false, false)] {
        let (c, s, to_client, to_site) = negotiate(client, site);
        assert_eq!((c, s), (None, None), "client {client}, site {site}");
        // An end that did not announce gets no field it would refuse.
        for (announced, wire) in [(client, &to_client), (site, &to_site)] {
            if !announced {
                assert!(
                    !wire.contains("offload") && !wire.contains("max_datagram"),
                    "{wire}"
                );
            }
        }
    }
}

/// A site of this build behind a gateway that predates offload: its `welcome` has no
/// `max_datagram`, so even a client's flag passed on grants nothing, and the site's answer
/// carries no field that gateway would refuse.
#[test]
fn a_gateway_that_predates_offload_grants_nothing() {
    let now = Instant::now();
    let mut site = SiteCore::new(
        now,
        SiteHello {
            software: "0.1.0".into(),
            boot_id: "b".into(),
            heartbeat: Duration::from_secs(60),
            agents: Vec::new(),
            offload: true,
        },
    );
    let _ = site.poll_transmit();
    let mut wire = Vec::new();
    pinhole_proto::frame::encode_control(br#"{"type":"welcome","name":"plant-a"}"#, &mut wire);
    pinhole_proto::frame::encode_control(
        br#"{"type":"session_open","session":9,"site":"plant-a","agent":"plc","key":"ab","offload":true}"#,
        &mut wire,
    );
    site.handle_input(&wire, now);
    assert_eq!(site.poll_event(), Some(SiteEvent::Welcomed));
    assert!(matches!(
        site.poll_event(),
        Some(SiteEvent::SessionOpen { offload: None, .. })
    ));
    let agent = Agent::new(
        "plc",
        AgentType::SiemensS7,
        "192.168.0.10".parse().expect("ip"),
        [],
    );
    site.session_opened(9, &"cd".repeat(32), agent, now);
    let sent = site.poll_transmit().expect("session_opened");
    assert!(!String::from_utf8_lossy(&sent).contains("offload"));
}
