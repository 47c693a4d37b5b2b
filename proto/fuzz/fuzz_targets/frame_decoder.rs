//! Arbitrary bytes, split at arbitrary points, into the frame decoder and the gateway core:
//! nothing may panic, and the decoder never buffers more than it was given.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pinhole_proto::{FrameDecoder, GatewayCore, PeerAuth};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut decoder = FrameDecoder::new();
    let mut given = 0;
    for chunk in data.chunks(split) {
        decoder.push(chunk);
        given += chunk.len();
        while let Ok(Some(_)) = decoder.next_frame() {}
        assert!(decoder.buffered() <= given);
    }
    let now = Instant::now();
    let mut core = GatewayCore::new(now, PeerAuth::Technician("fuzz".into()));
    core.handle_input(data, now, &mut |_, _| {});
    while core.poll_event().is_some() {}
    let _ = core.poll_transmit();
});
