//! One read buffer per thread for every link's reads.
//!
//! Most of a large gateway's links are idle sites that read a heartbeat an hour; a buffer per
//! link, held while the link waits, would cost kilobytes each at 100 000 sites. Instead a link
//! waits on its stream with no buffer of its own, and what arrives is read into this thread's
//! buffer and handed to the caller before the task can be suspended again, so no other link on
//! the thread overwrites it meanwhile. The buffer is as large as a busy session's reads need:
//! a 64 KB read takes whole TLS records (16 KB each) in one go.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes one read may return.
pub const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// Waits until `rd` has bytes, reads up to [`SCRATCH_BYTES`] of them into this thread's buffer
/// and returns `f` of them, called within the same poll; `None` at the end of the stream.
///
/// `f` must not read through this module itself (it would find the buffer taken and read
/// into a temporary one instead).
pub async fn read_with<R, T>(rd: &mut R, mut f: impl FnMut(&[u8]) -> T) -> io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
{
    std::future::poll_fn(move |cx| {
        let mut poll = |buf: &mut [u8]| {
            let mut rb = ReadBuf::new(buf);
            ready!(Pin::new(&mut *rd).poll_read(cx, &mut rb))?;
            let filled = rb.filled();
            Poll::Ready(Ok(if filled.is_empty() {
                None
            } else {
                Some(f(filled))
            }))
        };
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut buf) => poll(&mut buf[..]),
            // Re-entered (see above): correct, only slower.
            Err(_) => poll(&mut vec![0; SCRATCH_BYTES]),
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A busy link reads a large frame in one or two reads, not in a string of small ones.
    #[tokio::test]
    async fn a_large_frame_arrives_in_one_read() {
        let (mut far, mut near) = tokio::io::duplex(256 * 1024);
        far.write_all(&vec![7u8; 60 * 1024]).await.expect("write");
        let got = read_with(&mut near, <[u8]>::len).await.expect("read");
        assert_eq!(got, Some(60 * 1024));
    }

    /// Two links on one thread, interleaved: each sees its own bytes.
    #[tokio::test]
    async fn links_on_one_thread_see_their_own_bytes() {
        let (mut a_far, mut a) = tokio::io::duplex(1024);
        let (mut b_far, mut b) = tokio::io::duplex(1024);
        a_far.write_all(b"site a").await.expect("a");
        b_far.write_all(b"site b").await.expect("b");
        let ra = read_with(&mut a, <[u8]>::to_vec).await.expect("a");
        let rb = read_with(&mut b, <[u8]>::to_vec).await.expect("b");
        assert_eq!(ra.as_deref(), Some(&b"site a"[..]));
        assert_eq!(rb.as_deref(), Some(&b"site b"[..]));
        drop(a_far);
        assert_eq!(read_with(&mut a, <[u8]>::len).await.expect("eof"), None);
    }
}
