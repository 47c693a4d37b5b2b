//! What waits to be written to one link: hub commands and relayed datagrams, both bounded in
//! bytes.
//!
//! Datagrams are encoded as frames straight into one buffer that the link's driver swaps out
//! whole and writes in one go: no allocation per datagram once the two buffers have grown. A
//! receiver that reads slower than its sessions send loses its own datagrams (WireGuard and
//! the TCP inside recover), and nobody else waits. Commands are never dropped: a link whose
//! commands pile up past [`MAX_COMMAND_BYTES`] is not reading at all and is ended.

use std::collections::VecDeque;
use std::sync::Mutex;

use pinhole_proto::frame;
use tokio::sync::Notify;

use crate::hub::Command;

/// Datagram bytes queued towards one link. About 256 full-size datagrams: ~6 ms at
/// 0.5 Gbit/s, so a bulk transfer cannot queue an interactive session's packets behind
/// seconds of data, and a stalled peer pins at most this much memory.
pub const MAX_DATA_BYTES: usize = 384 * 1024;

/// Command bytes queued towards one link: four of the largest inventories.
pub const MAX_COMMAND_BYTES: usize = 4 * frame::MAX_CONTROL;

#[derive(Debug, Default)]
struct State {
    commands: VecDeque<Command>,
    command_bytes: usize,
    data: Vec<u8>,
    /// The link must end now (its commands overflowed, or the gateway ends it).
    killed: bool,
    /// A command that ends the link is queued.
    closing: bool,
}

/// One link's queue; shared between the link's driver and whoever routes to it.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Something was queued.
    notify: Notify,
    /// The link is to end (a closing command was queued, or it was killed). Separate from
    /// `notify`, so that a driver waiting on a slow write for this does not swallow the wake-up
    /// of data queued meanwhile.
    closing: Notify,
}

impl Outbox {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain buffers behind: still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a hub command for the driver.
    pub fn push_command(&self, c: Command) {
        let ends;
        {
            let mut s = self.state();
            s.command_bytes += c.approx_size();
            if matches!(c, Command::Close { .. } | Command::Enrolled { .. }) {
                s.closing = true;
            }
            if s.command_bytes > MAX_COMMAND_BYTES {
                s.killed = true;
            } else {
                s.commands.push_back(c);
            }
            ends = s.closing || s.killed;
        }
        self.notify.notify_one();
        if ends {
            self.closing.notify_one();
        }
    }

    /// Queues one datagram as a data frame; `false` if there is no room (dropped).
    pub fn push_data(&self, session: u32, datagram: &[u8]) -> bool {
        let was_empty;
        {
            let mut s = self.state();
            if s.killed || s.data.len() + frame::HEADER_LEN + 4 + datagram.len() > MAX_DATA_BYTES {
                return false;
            }
            was_empty = s.data.is_empty();
            frame::encode_data(session, datagram, &mut s.data);
        }
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Ends the link at the next turn of its driver.
    pub fn kill(&self) {
        self.state().killed = true;
        self.notify.notify_one();
        self.closing.notify_one();
    }

    /// Moves what is queued into the driver's buffers (`data` must be empty: the buffers are
    /// swapped, not copied). Returns whether the link must end.
    pub fn take(&self, commands: &mut Vec<Command>, data: &mut Vec<u8>) -> bool {
        debug_assert!(data.is_empty());
        let mut s = self.state();
        commands.extend(s.commands.drain(..));
        s.command_bytes = 0;
        std::mem::swap(&mut s.data, data);
        s.killed
    }

    /// Whether a command that ends the link is queued or the link was killed.
    pub fn is_closing(&self) -> bool {
        let s = self.state();
        s.closing || s.killed
    }

    /// Resolves when something was queued (or immediately if something was queued since the
    /// last wait).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Resolves once the link is to end (at once if it already is).
    pub async fn closing(&self) {
        if self.is_closing() {
            return;
        }
        self.closing.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinhole_proto::ErrorCode;

    #[test]
    fn data_is_bounded_in_bytes_and_buffers_are_swapped() {
        let o = Outbox::default();
        let dg = [7u8; 1400];
        let mut n = 0;
        while o.push_data(1, &dg) {
            n += 1;
        }
        assert!(n > 200 && n * 1410 <= MAX_DATA_BYTES, "{n}");
        let (mut cmds, mut data) = (Vec::new(), Vec::new());
        assert!(!o.take(&mut cmds, &mut data));
        assert_eq!(data.len(), n * (frame::HEADER_LEN + 4 + 1400));
        assert!(o.push_data(1, &dg), "room again after the driver took it");
    }

    #[test]
    fn commands_overflowing_kill_the_link() {
        let o = Outbox::default();
        let big = Command::Inventory {
            link: 1,
            sites: vec![
                pinhole_proto::SiteView {
                    name: "s".into(),
                    domain: "d".into(),
                    online: true,
                    agents: Vec::new(),
                };
                20_000
            ],
            update: true,
        };
        for _ in 0..4 {
            o.push_command(big.clone());
        }
        assert!(!o.is_closing());
        let (mut cmds, mut data) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            o.push_command(big.clone());
        }
        assert!(
            o.take(&mut cmds, &mut data),
            "a link that never reads is ended"
        );
        assert!(!o.push_data(1, b"x"));
        let o = Outbox::default();
        o.push_command(Command::Close {
            link: 1,
            code: ErrorCode::AccountClosed,
            text: "closed".into(),
        });
        assert!(o.is_closing());
    }
}
