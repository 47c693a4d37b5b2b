//! The gateway's per-link core on its own: order and shape of messages, with a virtual clock.
//! The whole control plane (the real hub, registry, client and site cores together) is
//! simulated in `gateway/tests/simulation.rs`.

use std::time::{Duration, Instant};

use pinhole_proto::{ClientCore, CloseReason, GatewayCore, GatewayEvent, PeerAuth};

#[test]
fn a_peer_that_never_says_hello_is_dropped() {
    let now = Instant::now();
    let mut gw = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
    let deadline = gw.poll_timeout().expect("timer");
    assert!(deadline <= now + pinhole_proto::gateway::HELLO_TIMEOUT);
    gw.handle_timeout(deadline);
    assert!(gw.is_closed());
    assert_eq!(
        gw.poll_event(),
        Some(GatewayEvent::Closed(CloseReason::Timeout))
    );
}

#[test]
fn wrong_role_and_garbage_close_only_that_link() {
    let now = Instant::now();
    // A site certificate whose peer claims to be a technician.
    let mut gw = GatewayCore::new(now, PeerAuth::Site("plant-a".into()));
    let mut client = ClientCore::new(now, "0.1.0", Duration::from_secs(15));
    gw.handle_input(&client.poll_transmit().expect("hello"), now, &mut |_, _| {});
    assert!(gw.is_closed());
    assert!(matches!(
        gw.poll_event(),
        Some(GatewayEvent::Closed(CloseReason::Protocol(_)))
    ));
    // Garbage on another link.
    let mut gw2 = GatewayCore::new(now, PeerAuth::Technician("alice".into()));
    gw2.handle_input(b"GET / HTTP/1.1\r\n\r\n", now, &mut |_, _| {});
    assert!(gw2.is_closed());
    // A third, healthy link is unaffected.
    let mut gw3 = GatewayCore::new(now, PeerAuth::Technician("bob".into()));
    let mut c3 = ClientCore::new(now, "0.1.0", Duration::from_secs(15));
    gw3.handle_input(&c3.poll_transmit().expect("hello"), now, &mut |_, _| {});
    assert!(matches!(
        gw3.poll_event(),
        Some(GatewayEvent::TechnicianHello { .. })
    ));
    assert!(!gw3.is_closed());
}

/// A peer's bytes quoted in a protocol error (a parser names the unknown message type) are
/// escaped and capped before they reach logs or the audit log.
#[test]
fn a_protocol_error_quoting_the_peer_is_escaped_and_capped() {
    let now = Instant::now();
    let mut gw = GatewayCore::new(now, PeerAuth::Technician("eve".into()));
    let json = format!(
        "{{\"type\":\"x\\n2026-11-29T10:00:00Z INFO login ok account=root\\n{}\"}}",
        "B".repeat(500_000)
    );
    let mut frame = vec![1, 1];
    frame.extend_from_slice(&u32::try_from(json.len()).expect("len").to_be_bytes());
    frame.extend_from_slice(json.as_bytes());
    gw.handle_input(&frame, now, &mut |_, _| {});
    match gw.poll_event() {
        Some(GatewayEvent::Closed(CloseReason::Protocol(what))) => {
            assert!(!what.contains('\n'), "{what}");
            assert!(
                what.len() <= pinhole_proto::link::MAX_REASON_TEXT + 3,
                "{}",
                what.len()
            );
        }
        other => panic!("{other:?}"),
    }
    let _ = Duration::ZERO;
}
