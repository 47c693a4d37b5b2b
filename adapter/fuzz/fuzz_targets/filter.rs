//! Arbitrary packets through a filter with one connected device, both directions: nothing may
//! panic, a packet to anything but the device never passes forward, and nothing passes in
//! reverse unless it answers a flow that passed forward.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pinhole_adapter::filter::{self, Filter, Verdict};
use pinhole_proto::Port;

const DEVICE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 10));

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut f = Filter::new();
    f.allow(DEVICE, [Port::tcp(102), Port::udp(161)].into_iter().collect(), None);
    let mut forward_passed = false;
    for chunk in data.split(|b| *b == 0xA5) {
        if let Verdict::Pass = f.forward(chunk, now) {
            forward_passed = true;
            let s = filter::parse(chunk).expect("a passing packet parses");
            assert_eq!(s.dst, DEVICE);
        }
        if let Verdict::Pass = f.reverse(chunk, now) {
            assert!(forward_passed, "reverse passed without any forward flow");
        }
    }
});
