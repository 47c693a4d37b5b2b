//! Frames: the unit on the wire inside every TLS link.
//!
//! ```text
//! offset  size  field
//! 0       1     version      PROTOCOL_VERSION (1); anything else closes the connection
//! 1       1     kind         1 = control (JSON message), 2 = data
//! 2       4     length       payload length, big-endian: at most MAX_CONTROL (control) or
//!                            MAX_DATA (data); a decoder may set a lower control limit
//!                            (the gateway's: 16 KiB without a certificate, 1 MiB with one)
//! 6       n     payload
//! ```
//!
//! A data payload is `session id (u32, big-endian) ‖ opaque datagram` (a WireGuard message).
//! With TUN offload, the message's plaintext may be a GSO super-packet of up to 64 KiB (many
//! MTU-size segments under one IP + L4 header: the TLS links have no path MTU, so it is never
//! cut on the way) followed by a 12-byte trailer with its offload metadata (`virtio_net_hdr`:
//! GSO type and segment size, header length, checksum state). The trailer is inside the
//! encryption, so the gateway relays the frame as it relays any other: it neither sees nor
//! can alter the metadata; the receiving end checks it against the packet before its TUN
//! takes it. Layout and checks: `pinhole_adapter::gso`. Only on a session whose two ends and
//! gateway all announced offload ([`crate::message`], offload negotiation); elsewhere the
//! sender cuts super-packets into MTU-size packets first.
//! A control payload is one UTF-8 JSON object, a [`crate::Message`].
//!
//! The decoder never allocates more than one payload's worth, and refuses a header that
//! announces more than its kind's maximum before reading the payload: a hostile peer cannot make
//! the other side buffer without bound.

/// Version of the framing and of the message set.
pub const PROTOCOL_VERSION: u8 = 1;

/// Header size: version, kind, 32-bit length.
pub const HEADER_LEN: usize = 6;

/// The largest data payload: a session id and one WireGuard message, whose inner packet is at
/// most 64 KiB (a GSO super-packet) with its 12-byte offload trailer, plus WireGuard's 32
/// bytes.
pub const MAX_DATA: usize = 4 + 65_535 + 12 + 32;

/// The largest control payload. The biggest control message is a technician's inventory:
/// about 150 bytes of JSON per site with one agent, so 4 MiB holds some 25 000 sites. It also
/// bounds what one peer can make the other buffer.
pub const MAX_CONTROL: usize = 4 * 1024 * 1024;

/// The larger of the two limits (what a decoder may have to hold).
pub const MAX_PAYLOAD: usize = MAX_CONTROL;

/// Kind byte of a control frame.
const KIND_CONTROL: u8 = 1;
/// Kind byte of a data frame.
const KIND_DATA: u8 = 2;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON control message (not yet parsed).
    Control(Vec<u8>),
    /// A datagram for a session.
    Data { session: u32, datagram: Vec<u8> },
}

/// Why the byte stream is not valid framing. Every one of these closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of {0} bytes exceeds the maximum of {1} for its kind")]
    Oversize(usize, usize),
    #[error("data frame too short for a session id")]
    ShortData,
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Control(json) => encode_control(json, out),
            Frame::Data { session, datagram } => encode_data(*session, datagram, out),
        }
    }
}

fn header(kind: u8, len: usize, out: &mut Vec<u8>) {
    debug_assert!(
        len <= if kind == KIND_DATA {
            MAX_DATA
        } else {
            MAX_CONTROL
        },
        "callers never build oversize frames"
    );
    out.push(PROTOCOL_VERSION);
    out.push(kind);
    // MAX_PAYLOAD fits in u32; a longer payload is a bug caught by the assertion above.
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

/// Appends a control frame holding `json`.
pub fn encode_control(json: &[u8], out: &mut Vec<u8>) {
    header(KIND_CONTROL, json.len(), out);
    out.extend_from_slice(json);
}

/// Appends a data frame without building a [`Frame`] first (the data path's form).
pub fn encode_data(session: u32, datagram: &[u8], out: &mut Vec<u8>) {
    header(KIND_DATA, datagram.len() + 4, out);
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(datagram);
}

/// One frame borrowed from the decoder's buffer: the data path's form, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRef<'a> {
    /// A JSON control message (not yet parsed).
    Control(&'a [u8]),
    /// A datagram for a session.
    Data { session: u32, datagram: &'a [u8] },
}

impl FrameRef<'_> {
    /// The owned form (copies the payload).
    pub fn into_frame(self) -> Frame {
        match self {
            FrameRef::Control(json) => Frame::Control(json.to_vec()),
            FrameRef::Data { session, datagram } => Frame::Data {
                session,
                datagram: datagram.to_vec(),
            },
        }
    }
}

/// Where a whole frame's payload lies in the decoder's buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    kind: u8,
    start: usize,
    end: usize,
}

impl Span {
    pub(crate) fn is_data(self) -> bool {
        self.kind == KIND_DATA
    }
}

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
///
/// The work is linear in the bytes received, whatever a peer sends: frames are taken out by
/// advancing a read offset, and the unread rest is moved to the front of the buffer at most
/// once per [`push`](Self::push), so no byte is ever moved twice.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the bytes not yet returned as frames.
    read: usize,
    max_control: usize,
    failed: Option<FrameError>,
    /// Bytes moved by compaction, for the tests that prove the work is linear.
    #[cfg(test)]
    moved: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder that accepts control payloads up to [`MAX_CONTROL`] (the client's and the
    /// site's: inventories come from the gateway).
    pub fn new() -> Self {
        Self::with_max_control(MAX_CONTROL)
    }

    /// A decoder that refuses, from the header alone, a control payload longer than `max`
    /// bytes ([`FrameError::Oversize`] with `max`). `max` above [`MAX_CONTROL`] is lowered to
    /// it: no conforming peer sends more. Data frames keep [`MAX_DATA`].
    pub fn with_max_control(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            read: 0,
            max_control: max.min(MAX_CONTROL),
            failed: None,
            #[cfg(test)]
            moved: 0,
        }
    }

    /// The largest control payload this decoder accepts, in bytes.
    pub fn max_control(&self) -> usize {
        self.max_control
    }

    /// Adds received bytes. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.read > 0 {
            #[cfg(test)]
            {
                self.moved += self.buf.len() - self.read;
            }
            self.buf.drain(..self.read);
            self.read = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.read
    }

    /// The next whole frame, copied out; `Ok(None)` if more bytes are needed. After an error
    /// the decoder stays failed: the stream cannot be resynchronized.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        Ok(self.next_frame_ref()?.map(FrameRef::into_frame))
    }

    /// The next whole frame, borrowed from the buffer until the next call; `Ok(None)` if more
    /// bytes are needed. Errors as [`next_frame`](Self::next_frame).
    pub fn next_frame_ref(&mut self) -> Result<Option<FrameRef<'_>>, FrameError> {
        Ok(self.next_span()?.map(|span| self.frame_at(span)))
    }

    /// Takes the next whole frame out and says where its payload lies (valid until the next
    /// `push`).
    pub(crate) fn next_span(&mut self) -> Result<Option<Span>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let rest = &self.buf[self.read..];
        match check_header(rest, self.max_control) {
            Ok(Some((kind, len))) if rest.len() >= HEADER_LEN + len => {
                let start = self.read + HEADER_LEN;
                self.read = start + len;
                Ok(Some(Span {
                    kind,
                    start,
                    end: start + len,
                }))
            }
            Ok(_) => Ok(None),
            Err(e) => {
                self.buf = Vec::new();
                self.read = 0;
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The frame a span from [`next_span`](Self::next_span) points to.
    pub(crate) fn frame_at(&self, span: Span) -> FrameRef<'_> {
        if span.is_data() {
            let (session, datagram) = self.data_at(span);
            FrameRef::Data { session, datagram }
        } else {
            FrameRef::Control(self.payload_at(span))
        }
    }

    /// The payload a span points to.
    pub(crate) fn payload_at(&self, span: Span) -> &[u8] {
        &self.buf[span.start..span.end]
    }

    /// The session id and datagram of a data span.
    pub(crate) fn data_at(&self, span: Span) -> (u32, &[u8]) {
        // `check_header` refused data frames shorter than a session id, so the split is in bounds.
        let (id, datagram) = self.payload_at(span).split_at(4);
        (u32::from_be_bytes([id[0], id[1], id[2], id[3]]), datagram)
    }
}

/// Checks the header at the front of `buf`: its kind and payload length, `Ok(None)` if the
/// header is not complete yet. The payload may still be incomplete.
fn check_header(buf: &[u8], max_control: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        // Check what we can already: a bad first byte fails fast.
        if let Some(&v) = buf.first()
            && v != PROTOCOL_VERSION
        {
            return Err(FrameError::Version(v));
        }
        return Ok(None);
    };
    if head[0] != PROTOCOL_VERSION {
        return Err(FrameError::Version(head[0]));
    }
    let kind = head[1];
    if kind != KIND_CONTROL && kind != KIND_DATA {
        return Err(FrameError::Kind(kind));
    }
    let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
    let max = if kind == KIND_DATA {
        MAX_DATA
    } else {
        max_control
    };
    if len > max {
        return Err(FrameError::Oversize(len, max));
    }
    if kind == KIND_DATA && len < 4 {
        return Err(FrameError::ShortData);
    }
    Ok(Some((kind, len)))
}

/// Parses one frame from the front of `buf` with the default limits: the frame and the bytes
/// it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some((kind, len)) = check_header(buf, MAX_CONTROL)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = match payload.split_first_chunk::<4>() {
        Some((id, datagram)) if kind == KIND_DATA => Frame::Data {
            session: u32::from_be_bytes(*id),
            datagram: datagram.to_vec(),
        },
        _ => Frame::Control(payload.to_vec()),
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_both_kinds() {
        let mut out = Vec::new();
        Frame::Control(b"{\"type\":\"heartbeat\"}".to_vec()).encode(&mut out);
        encode_data(7, b"wireguard", &mut out);
        let mut d = FrameDecoder::new();
        d.push(&out);
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame::Control(b"{\"type\":\"heartbeat\"}".to_vec())))
        );
        assert_eq!(
            d.next_frame(),
            Ok(Some(Frame::Data {
                session: 7,
                datagram: b"wireguard".to_vec()
            }))
        );
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 0);

        let mut d = FrameDecoder::new();
        d.push(&out);
        assert_eq!(
            d.next_frame_ref(),
            Ok(Some(FrameRef::Control(b"{\"type\":\"heartbeat\"}")))
        );
        assert_eq!(
            d.next_frame_ref(),
            Ok(Some(FrameRef::Data {
                session: 7,
                datagram: b"wireguard"
            }))
        );
        assert_eq!(d.next_frame_ref(), Ok(None));
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut d = FrameDecoder::new();
        d.push(&[PROTOCOL_VERSION, KIND_CONTROL, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversize(0xffff_ffff, MAX_CONTROL))
        );
        // It stays failed, whatever comes next.
        d.push(b"more");
        assert!(d.next_frame().is_err());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn each_kind_has_its_own_limit() {
        let big = u32::try_from(MAX_DATA + 1).expect("fits").to_be_bytes();
        let data = [1, KIND_DATA, big[0], big[1], big[2], big[3]];
        assert_eq!(
            parse(&data),
            Err(FrameError::Oversize(MAX_DATA + 1, MAX_DATA))
        );
        let control = [1, KIND_CONTROL, big[0], big[1], big[2], big[3]];
        assert_eq!(
            parse(&control),
            Ok(None),
            "a large control frame is only incomplete"
        );
    }

    #[test]
    fn bad_version_kind_and_short_data() {
        assert_eq!(parse(&[9]), Err(FrameError::Version(9)));
        assert_eq!(parse(&[1, 3, 0, 0, 0, 0]), Err(FrameError::Kind(3)));
        assert_eq!(
            parse(&[1, KIND_DATA, 0, 0, 0, 2, 0, 0]),
            Err(FrameError::ShortData)
        );
        assert_eq!(parse(&[1, KIND_CONTROL, 0, 0]), Ok(None));
    }

    const HEARTBEAT: &[u8] = br#"{"type":"heartbeat"}"#;

    #[test]
    fn heartbeats_decode_in_linear_work() {
        // More than 64 KiB of heartbeats in one read: every frame is taken out, and no byte is
        // moved more than once (the buffer is compacted once per push, not once per frame).
        let mut wire = Vec::new();
        while wire.len() <= 64 * 1024 {
            encode_control(HEARTBEAT, &mut wire);
        }
        let frames = wire.len() / (HEADER_LEN + HEARTBEAT.len());
        let mut d = FrameDecoder::new();
        d.push(&wire);
        let mut got = 0;
        while let Some(f) = d.next_frame().expect("valid") {
            assert_eq!(f, Frame::Control(HEARTBEAT.to_vec()));
            got += 1;
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
        assert!(
            d.moved <= wire.len(),
            "{} bytes moved to decode {} bytes",
            d.moved,
            wire.len()
        );
    }

    #[test]
    fn split_frames_move_each_byte_at_most_once() {
        // Frames cut across reads at every odd place: the bytes moved stay below the bytes
        // pushed.
        let mut wire = Vec::new();
        for i in 0..2000u32 {
            encode_data(i, &[7; 40], &mut wire);
            encode_control(HEARTBEAT, &mut wire);
        }
        let mut d = FrameDecoder::new();
        let mut got = 0;
        for chunk in wire.chunks(997) {
            d.push(chunk);
            while d.next_frame().expect("valid").is_some() {
                got += 1;
            }
        }
        assert_eq!(got, 4000);
        assert!(d.moved <= wire.len(), "{} > {}", d.moved, wire.len());
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(
            frames in proptest::collection::vec((any::<bool>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
            cut in 1usize..64,
        ) {
            let frames: Vec<Frame> = frames.into_iter().map(|(control, s, b)| if control { Frame::Control(b) } else { Frame::Data { session: s, datagram: b } }).collect();
            let mut wire = Vec::new();
            for f in &frames { f.encode(&mut wire); }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.push(chunk);
                while let Some(f) = d.next_frame().expect("valid") { got.push(f); }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn garbage_never_panics_or_overbuffers(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
            prop_assert!(d.buffered() <= bytes.len());
        }
    }
}
