//! Frames: the unit on the wire inside every TLS link.
//!
//! ```text
//! offset  size  field
//! 0       1     version      PROTOCOL_VERSION (1); anything else closes the connection
//! 1       1     kind         1 = control (JSON message), 2 = data
//! 2       4     length       payload length, big-endian: at most MAX_CONTROL (control) or
//!                            MAX_DATA (data)
//! 6       n     payload
//! ```
//!
//! A data payload is `session id (u32, big-endian) ‖ opaque datagram` (a WireGuard message).
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
/// most 64 KiB (a GSO super-packet) plus WireGuard's 32 bytes.
pub const MAX_DATA: usize = 4 + 65_535 + 32;

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

/// Incremental decoder: feed bytes as they arrive, take whole frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed. After an error the decoder
    /// stays failed: the stream cannot be resynchronized.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match parse(&self.buf) {
            Ok(None) => Ok(None),
            Ok(Some((frame, used))) => {
                self.buf.drain(..used);
                Ok(Some(frame))
            }
            Err(e) => {
                self.buf = Vec::new();
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Parses one frame from the front of `buf`: the frame and the bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
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
        MAX_CONTROL
    };
    if len > max {
        return Err(FrameError::Oversize(len, max));
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = if kind == KIND_CONTROL {
        Frame::Control(payload.to_vec())
    } else {
        let (id, datagram) = payload
            .split_first_chunk::<4>()
            .ok_or(FrameError::ShortData)?;
        Frame::Data {
            session: u32::from_be_bytes(*id),
            datagram: datagram.to_vec(),
        }
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
