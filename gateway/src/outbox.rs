//! What waits to be written to one link: hub commands and relayed datagrams, both bounded in
//! bytes.
//!
//! Datagrams are encoded as frames straight into one buffer that the link's driver swaps out
//! whole and writes in one go: no allocation per datagram once the two buffers have grown. A
//! receiver that reads slower than its sessions send loses its own datagrams (WireGuard and
//! the TCP inside recover), and nobody else waits. Commands are never dropped: a link whose
//! commands pile up past [`MAX_COMMAND_BYTES`] is not reading at all and is ended. Inventory
//! pushes are folded instead of queued: a newer whole inventory replaces a queued one (and
//! queued changes), changes are applied to a queued inventory or merged with queued changes,
//! so a technician whose link is slow holds at most one inventory's worth, however many sites
//! change meanwhile.
//!
//! The datagram bytes are shared fairly between the sessions that send to the link (a site
//! link carries every technician's session to that site; a technician's link, one per site):
//! between two takes of the driver, a session may queue its first datagram and then at most its
//! share, [`MAX_DATA_BYTES`] − [`RESERVE_BYTES`] divided by the number of sessions queueing in
//! that turn. The last [`RESERVE_BYTES`] take only sessions that queued at most
//! [`INTERACTIVE_BYTES`] in the turn. Bulk transfers in one or several sessions therefore
//! always leave room for another session's datagrams (an interactive click is not dropped
//! behind a firmware download), and sessions that all send at once get equal shares.
//! Within the buffer, datagrams stay in their order of arrival.

use std::collections::VecDeque;
use std::sync::Mutex;

use pinhole_proto::frame;
use tokio::sync::Notify;

use crate::hub::Command;

/// Datagram bytes queued towards one link. About 256 full-size datagrams: ~6 ms at
/// 0.5 Gbit/s, so a bulk transfer cannot queue an interactive session's packets behind
/// seconds of data, and a stalled peer pins at most this much memory.
pub const MAX_DATA_BYTES: usize = 384 * 1024;

/// Datagram bytes that one session can never take: what is left for the link's other
/// sessions when one floods (about 45 full-size datagrams between two writes of the link).
pub const RESERVE_BYTES: usize = MAX_DATA_BYTES / 6;

/// What a session may queue in one turn and still use the reserve: a few requests and answers
/// of an interactive protocol, not a bulk flow. Several flooding sessions can take at most this
/// much of the reserve each.
pub const INTERACTIVE_BYTES: usize = RESERVE_BYTES / 8;

/// Command bytes queued towards one link: two of the largest inventories (a welcome and one
/// folded update).
pub const MAX_COMMAND_BYTES: usize = 2 * frame::MAX_CONTROL;

/// Folds an inventory push `c` into the inventory command already queued (the last one), if
/// there is one; returns `c` when it is to be queued as it is. Returns the change in queued
/// bytes.
fn fold_inventory(commands: &mut VecDeque<Command>, c: Command) -> (Option<Command>, isize) {
    let is_inventory = |q: &Command| {
        matches!(
            q,
            Command::Inventory { .. } | Command::InventoryChanges { .. }
        )
    };
    let size = |q: &Command| isize::try_from(q.approx_size()).unwrap_or(isize::MAX);
    match c {
        Command::Inventory { .. } => {
            // A whole inventory supersedes every inventory message still queued.
            let mut freed = 0;
            commands.retain(|q| {
                let old = is_inventory(q);
                if old {
                    freed += size(q);
                }
                !old
            });
            (Some(c), -freed)
        }
        Command::InventoryChanges {
            link,
            sites,
            removed,
        } => {
            let Some(q) = commands.iter_mut().rev().find(|q| is_inventory(q)) else {
                return (
                    Some(Command::InventoryChanges {
                        link,
                        sites,
                        removed,
                    }),
                    0,
                );
            };
            let before = size(q);
            match q {
                Command::Inventory { sites: whole, .. } => {
                    pinhole_proto::apply_inventory_changes(whole, sites, &removed);
                }
                Command::InventoryChanges {
                    sites: qs,
                    removed: qr,
                    ..
                } => {
                    for r in removed {
                        qs.retain(|s| s.name != r);
                        if !qr.contains(&r) {
                            qr.push(r);
                        }
                    }
                    for site in sites {
                        qr.retain(|r| *r != site.name);
                        match qs.iter_mut().find(|s| s.name == site.name) {
                            Some(s) => *s = site,
                            None => qs.push(site),
                        }
                    }
                }
                _ => {}
            }
            (None, size(q) - before)
        }
        other => (Some(other), 0),
    }
}

#[derive(Debug, Default)]
struct State {
    commands: VecDeque<Command>,
    command_bytes: usize,
    data: Vec<u8>,
    /// Datagram bytes queued since the driver's last take, per session (session, bytes): a
    /// handful of entries, scanned linearly; its capacity is kept across takes.
    queued: Vec<(u32, usize)>,
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
            if matches!(c, Command::Close { .. } | Command::Enrolled { .. }) {
                s.closing = true;
            }
            let (c, delta) = fold_inventory(&mut s.commands, c);
            s.command_bytes = s.command_bytes.saturating_add_signed(delta);
            if let Some(c) = c {
                s.command_bytes += c.approx_size();
                if s.command_bytes > MAX_COMMAND_BYTES {
                    s.killed = true;
                } else {
                    s.commands.push_back(c);
                }
            }
            ends = s.closing || s.killed;
        }
        self.notify.notify_one();
        if ends {
            self.closing.notify_one();
        }
    }

    /// Queues one datagram of `session` as a data frame; `false` if there is no room for it
    /// (dropped): the link's buffer is full, or the session used its share of it (see the
    /// module's documentation).
    pub fn push_data(&self, session: u32, datagram: &[u8]) -> bool {
        let was_empty;
        {
            let mut s = self.state();
            let size = frame::HEADER_LEN + 4 + datagram.len();
            if s.killed || s.data.len() + size > MAX_DATA_BYTES {
                return false;
            }
            let i = match s.queued.iter().position(|(id, _)| *id == session) {
                Some(i) => i,
                None => {
                    s.queued.push((session, 0));
                    s.queued.len() - 1
                }
            };
            let share = (MAX_DATA_BYTES - RESERVE_BYTES) / s.queued.len();
            // Each session's first datagram of a turn fits (if the link has room): many
            // sessions in one turn still move. The buffer's last RESERVE_BYTES take only
            // sessions that queued little this turn (INTERACTIVE_BYTES): however many sessions
            // flood, a quiet one's requests still get in.
            let used = s.queued[i].1;
            if used > 0
                && (used + size > share
                    || (s.data.len() + size > MAX_DATA_BYTES - RESERVE_BYTES
                        && used + size > INTERACTIVE_BYTES))
            {
                return false;
            }
            s.queued[i].1 += size;
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
        s.queued.clear();
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

    /// Sessions of the frames in a taken buffer, in order.
    fn sessions_in(data: &[u8]) -> Vec<u32> {
        let mut d = frame::FrameDecoder::new();
        d.push(data);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame_ref().expect("frame") {
            match f {
                frame::FrameRef::Data { session, .. } => out.push(session),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[test]
    fn a_flooding_session_leaves_room_for_another() {
        let o = Outbox::default();
        let bulk = [1u8; 1400];
        // Session 1 floods until it is refused, many times over.
        let mut flooded = 0;
        for _ in 0..10_000 {
            if o.push_data(1, &bulk) {
                flooded += 1;
            }
        }
        assert!(
            flooded * (frame::HEADER_LEN + 4 + 1400) <= MAX_DATA_BYTES - RESERVE_BYTES,
            "one session took {flooded} datagrams"
        );
        // Session 2's small datagrams (a ping, a click) still get in, turn after turn.
        for turn in 0..3 {
            for i in 0..10 {
                assert!(
                    o.push_data(2, &[2u8; 84]),
                    "turn {turn}: session 2's datagram {i} was dropped behind session 1"
                );
            }
            let (mut cmds, mut data) = (Vec::new(), Vec::new());
            o.take(&mut cmds, &mut data);
            let order = sessions_in(&data);
            assert_eq!(order.iter().filter(|s| **s == 2).count(), 10);
            for _ in 0..10_000 {
                o.push_data(1, &bulk);
            }
        }
    }

    #[test]
    fn two_flooding_sessions_leave_room_for_a_third() {
        let o = Outbox::default();
        let bulk = [1u8; 1400];
        // Session 1 floods alone (it gets the most a session may take), then session 2 joins.
        for _ in 0..10_000 {
            o.push_data(1, &bulk);
        }
        for _ in 0..10_000 {
            o.push_data(2, &bulk);
        }
        // Session 3's small datagrams still get in.
        for i in 0..10 {
            assert!(
                o.push_data(3, &[3u8; 500]),
                "session 3's datagram {i} was dropped behind two flooding sessions"
            );
        }
    }

    #[test]
    fn sessions_sending_at_once_share_the_link() {
        let o = Outbox::default();
        let dg = [0u8; 1400];
        // Session 1 offers ten times what session 2 does, interleaved, past the link's room.
        let (mut got1, mut got2) = (0usize, 0usize);
        for i in 0..3_000 {
            if o.push_data(1, &dg) {
                got1 += 1;
            }
            if i % 10 == 0 && o.push_data(2, &dg) {
                got2 += 1;
            }
        }
        let (mut cmds, mut data) = (Vec::new(), Vec::new());
        o.take(&mut cmds, &mut data);
        assert!(data.len() <= MAX_DATA_BYTES);
        let order = sessions_in(&data);
        assert_eq!(order.len(), got1 + got2);
        // Session 2 asked for 300 datagrams and got its half of the link (less the reserve);
        // session 1 got no more than its half.
        let half = (MAX_DATA_BYTES - RESERVE_BYTES) / 2 / (frame::HEADER_LEN + 4 + 1400);
        assert!(got2 >= half - 1, "session 2 got {got2} of {half}");
        assert!(got1 <= half, "session 1 got {got1} of {half}");
        // Many sessions in one turn: each one's first datagram moves.
        let o = Outbox::default();
        for s in 0..1_000 {
            assert!(o.push_data(s, &[0u8; 100]), "session {s}");
        }
    }

    fn site(name: &str, online: bool) -> pinhole_proto::SiteView {
        pinhole_proto::SiteView {
            name: name.into(),
            domain: "d".into(),
            online,
            agents: Vec::new(),
        }
    }

    #[test]
    fn commands_overflowing_kill_the_link() {
        let o = Outbox::default();
        let big = Command::Enrolled {
            link: 1,
            certificate: vec![0; frame::MAX_CONTROL / 4],
            ca: Vec::new(),
        };
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

    /// A technician that reads slowly while thousands of sites reconnect holds one inventory's
    /// worth, not one inventory per change (the gateway grew to 1.5 GB of queued inventories).
    #[test]
    fn inventory_pushes_to_a_slow_link_are_folded_not_queued() {
        let o = Outbox::default();
        let whole: Vec<_> = (0..2_000)
            .map(|i| site(&format!("s{i:04}"), false))
            .collect();
        let one = Command::Inventory {
            link: 1,
            sites: whole.clone(),
            update: true,
        }
        .approx_size();
        for _ in 0..100 {
            o.push_command(Command::Inventory {
                link: 1,
                sites: whole.clone(),
                update: true,
            });
        }
        // Then each site comes online, one change at a time, and one leaves.
        for i in 0..2_000 {
            o.push_command(Command::InventoryChanges {
                link: 1,
                sites: vec![site(&format!("s{i:04}"), true)],
                removed: Vec::new(),
            });
        }
        o.push_command(Command::InventoryChanges {
            link: 1,
            sites: Vec::new(),
            removed: vec!["s0007".into()],
        });
        o.push_command(Command::Send {
            link: 1,
            message: Box::new(pinhole_proto::Message::Heartbeat),
        });
        assert!(
            o.state().command_bytes <= one + 1024,
            "{} queued bytes for one inventory of {one}",
            o.state().command_bytes
        );
        let (mut cmds, mut data) = (Vec::new(), Vec::new());
        assert!(!o.take(&mut cmds, &mut data), "the link was not ended");
        assert_eq!(cmds.len(), 2, "one inventory and the other command");
        let Command::Inventory { sites, .. } = &cmds[0] else {
            panic!("{:?}", cmds[0]);
        };
        assert_eq!(sites.len(), 1_999);
        assert!(sites.iter().all(|s| s.online && s.name != "s0007"));
        // Changes with nothing queued are queued; more changes merge into them.
        o.push_command(Command::InventoryChanges {
            link: 1,
            sites: vec![site("a", true), site("b", true)],
            removed: Vec::new(),
        });
        o.push_command(Command::InventoryChanges {
            link: 1,
            sites: vec![site("a", false), site("c", true)],
            removed: vec!["b".into()],
        });
        cmds.clear();
        o.take(&mut cmds, &mut data);
        assert_eq!(
            cmds,
            [Command::InventoryChanges {
                link: 1,
                sites: vec![site("a", false), site("c", true)],
                removed: vec!["b".into()],
            }]
        );
    }
}
