//! Room history on one node: each room with history has one sequencer, on
//! the room's home shard, which gives every message its offset, keeps the
//! last messages (bounded in count, bytes and age) and answers recoveries.
//!
//! One total order per room: every publish to a room with history goes to
//! its home shard first, which numbers it and sends the framed message to
//! every shard. Mailboxes are FIFO per sender, so each shard sees a room's
//! messages in offset order, and a recovery answer (sent by the home shard
//! after the messages it covers) arrives after every message it includes:
//! the member's shard only has to hold the member back from live delivery
//! until the answer comes (see `Edge::deliver_room`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

/// One kept message.
struct Entry {
    offset: u64,
    frame: Bytes,
    at_ms: u64,
}

/// One room's sequence and kept messages.
struct Log {
    epoch: Arc<str>,
    /// Offset of the last message (0: none yet in this epoch).
    last: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Shard clock of the last append or recovery (idle logs are dropped).
    touched_ms: u64,
}

/// The bounds of one room's history.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Messages kept.
    pub size: usize,
    /// Age limit, ms.
    pub ttl_ms: u64,
    /// Bytes kept in the room.
    pub max_bytes: usize,
}

/// What a recovery answers.
#[derive(Debug)]
pub struct Replay {
    /// The messages after the client's offset, in order.
    pub frames: Vec<Bytes>,
    /// Whether every missed message is in `frames` (false: the client
    /// resyncs: the epoch changed or the gap left the history).
    pub recovered: bool,
    /// The room's offset now (the last message's).
    pub offset: u64,
    /// The room's epoch.
    pub epoch: Arc<str>,
}

/// One room's log on its way to another process (zero-disconnect upgrade).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Exported {
    /// Room.
    pub room: String,
    /// Its epoch.
    pub epoch: String,
    /// Offset of its last message.
    pub last: u64,
    /// Kept messages: (offset, frame bytes, age in ms).
    pub entries: Vec<(u64, Vec<u8>, u64)>,
}

/// The sequencers of the rooms whose home is this shard.
#[derive(Default)]
pub struct History {
    logs: HashMap<Arc<str>, Log>,
    bytes: usize,
    messages: usize,
}

fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", fastrand::u64(..)).as_str())
}

impl History {
    fn log(&mut self, room: &str, now_ms: u64) -> &mut Log {
        if !self.logs.contains_key(room) {
            let log = Log { epoch: new_epoch(), last: 0, entries: VecDeque::new(), bytes: 0, touched_ms: now_ms };
            self.logs.insert(Arc::from(room), log);
        }
        let log = self.logs.get_mut(room).expect("inserted");
        log.touched_ms = now_ms;
        log
    }

    /// Numbers the next message of `room`, frames it with `frame_at(offset)`
    /// and keeps it under `p` and the shard's `shard_budget` bytes (the
    /// room's own oldest messages make room; past that the message is not
    /// kept and the room's history starts over). Returns the frame.
    pub fn append(
        &mut self,
        room: &str,
        p: Policy,
        shard_budget: usize,
        now_ms: u64,
        frame_at: impl FnOnce(u64) -> Bytes,
    ) -> Bytes {
        let budget_left = shard_budget.saturating_sub(self.bytes);
        let log = self.log(room, now_ms);
        log.last += 1;
        let frame = frame_at(log.last);
        let len = frame.len();
        let mut freed = (0usize, 0usize); // (bytes, messages) dropped
        let pop = |log: &mut Log, freed: &mut (usize, usize)| {
            if let Some(e) = log.entries.pop_front() {
                log.bytes -= e.frame.len();
                freed.0 += e.frame.len();
                freed.1 += 1;
            }
        };
        while !log.entries.is_empty() && (log.entries.len() >= p.size || log.bytes + len > p.max_bytes) {
            pop(log, &mut freed);
        }
        while !log.entries.is_empty() && len > budget_left + freed.0 {
            pop(log, &mut freed);
        }
        let keep = p.size > 0 && len <= p.max_bytes && len <= budget_left + freed.0;
        if keep {
            log.entries.push_back(Entry { offset: log.last, frame: frame.clone(), at_ms: now_ms });
            log.bytes += len;
        } else {
            // Not kept: the log must not have a hole, so it starts over
            // empty after this offset (recoveries from before it fail).
            while !log.entries.is_empty() {
                pop(log, &mut freed);
            }
        }
        self.bytes = self.bytes + if keep { len } else { 0 } - freed.0;
        self.messages = self.messages + keep as usize - freed.1;
        frame
    }

    /// The messages of `room` after `since` (`(offset, epoch)`), or just the
    /// room's position when `since` is `None` (`recovered` is then true).
    pub fn since(&mut self, room: &str, since: Option<(u64, &str)>, ttl_ms: u64, now_ms: u64) -> Replay {
        self.expire_room(room, ttl_ms, now_ms);
        let log = self.log(room, now_ms);
        let (offset, epoch) = (log.last, log.epoch.clone());
        let Some((from, their_epoch)) = since else {
            return Replay { frames: Vec::new(), recovered: true, offset, epoch };
        };
        let first_kept = log.entries.front().map_or(log.last + 1, |e| e.offset);
        let whole = &*epoch == their_epoch && from <= log.last && from + 1 >= first_kept;
        let frames = if whole {
            log.entries.iter().filter(|e| e.offset > from).map(|e| e.frame.clone()).collect()
        } else {
            Vec::new()
        };
        Replay { frames, recovered: whole, offset, epoch }
    }

    fn expire_room(&mut self, room: &str, ttl_ms: u64, now_ms: u64) {
        let Some(log) = self.logs.get_mut(room) else { return };
        while log.entries.front().is_some_and(|e| e.at_ms + ttl_ms <= now_ms) {
            let e = log.entries.pop_front().expect("front");
            log.bytes -= e.frame.len();
            self.bytes -= e.frame.len();
            self.messages -= 1;
        }
    }

    /// Drops expired messages (`ttl_of(room)` ms) and forgets rooms that
    /// have kept nothing for `idle_ms` (their next message starts a new epoch).
    pub fn sweep(&mut self, now_ms: u64, idle_ms: u64, ttl_of: impl Fn(&str) -> u64) {
        let rooms: Vec<Arc<str>> = self.logs.keys().cloned().collect();
        for room in rooms {
            self.expire_room(&room, ttl_of(&room), now_ms);
        }
        self.logs.retain(|_, l| !l.entries.is_empty() || l.touched_ms + idle_ms > now_ms);
    }

    /// Every room's log, to move to another process: (room, epoch, last
    /// offset, kept messages as (offset, frame, age ms)).
    pub fn export(&self, now_ms: u64) -> Vec<Exported> {
        self.logs
            .iter()
            .map(|(room, l)| Exported {
                room: room.to_string(),
                epoch: l.epoch.to_string(),
                last: l.last,
                entries: l
                    .entries
                    .iter()
                    .map(|e| (e.offset, e.frame.to_vec(), now_ms.saturating_sub(e.at_ms)))
                    .collect(),
            })
            .collect()
    }

    /// Takes over a room's log from another process (replacing any here).
    pub fn import(&mut self, x: Exported, now_ms: u64) {
        if let Some(old) = self.logs.remove(x.room.as_str()) {
            self.bytes -= old.bytes;
            self.messages -= old.entries.len();
        }
        let mut log = Log {
            epoch: Arc::from(x.epoch.as_str()),
            last: x.last,
            entries: VecDeque::with_capacity(x.entries.len()),
            bytes: 0,
            touched_ms: now_ms,
        };
        for (offset, frame, age) in x.entries {
            log.bytes += frame.len();
            log.entries.push_back(Entry { offset, frame: Bytes::from(frame), at_ms: now_ms.saturating_sub(age) });
        }
        self.bytes += log.bytes;
        self.messages += log.entries.len();
        self.logs.insert(Arc::from(x.room.as_str()), log);
    }

    /// Bytes kept on this shard.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages kept on this shard.
    pub fn messages(&self) -> usize {
        self.messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { size: 3, ttl_ms: 1000, max_bytes: 1 << 20 };

    fn add(h: &mut History, room: &str, now: u64) -> u64 {
        let mut got = 0;
        h.append(room, P, usize::MAX, now, |o| {
            got = o;
            Bytes::from(format!("m{o}"))
        });
        got
    }

    fn texts(r: &Replay) -> Vec<String> {
        r.frames.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect()
    }

    #[test]
    fn offsets_grow_and_recovery_gives_what_was_missed() {
        let mut h = History::default();
        assert_eq!((add(&mut h, "r", 0), add(&mut h, "r", 0), add(&mut h, "other", 0)), (1, 2, 1));
        let now = h.since("r", None, 1000, 0);
        assert_eq!((now.offset, now.recovered, now.frames.len()), (2, true, 0));
        let e = now.epoch.clone();
        add(&mut h, "r", 1);
        let r = h.since("r", Some((2, &e)), 1000, 1);
        assert_eq!((texts(&r), r.recovered, r.offset), (vec!["m3".to_string()], true, 3));
        let r = h.since("r", Some((3, &e)), 1000, 1);
        assert!(r.recovered && r.frames.is_empty(), "nothing missed");
        assert!(!h.since("r", Some((1, "other-epoch")), 1000, 1).recovered);
        assert!(!h.since("r", Some((9, &e)), 1000, 1).recovered, "an offset from the future");
    }

    #[test]
    fn a_gap_past_the_kept_messages_is_not_recovered() {
        let mut h = History::default();
        for _ in 0..5 {
            add(&mut h, "r", 0);
        }
        let e = h.since("r", None, 1000, 0).epoch;
        // Kept: 3, 4, 5. From 2 the client misses 3..5: all kept.
        assert_eq!(texts(&h.since("r", Some((2, &e)), 1000, 0)), ["m3", "m4", "m5"]);
        // From 1 it missed 2, which is gone.
        let r = h.since("r", Some((1, &e)), 1000, 0);
        assert!(!r.recovered && r.frames.is_empty());
        assert_eq!(h.messages(), 3);
    }

    #[test]
    fn age_bytes_and_the_shard_budget_bound_what_is_kept() {
        let mut h = History::default();
        add(&mut h, "r", 0);
        add(&mut h, "r", 500);
        let e = h.since("r", None, 1000, 500).epoch;
        // At 1200 the first is older than the 1000 ms TTL.
        let r = h.since("r", Some((0, &e)), 1000, 1200);
        assert!(!r.recovered, "message 1 expired");
        assert_eq!(texts(&h.since("r", Some((1, &e)), 1000, 1200)), ["m2"]);
        // Per room bytes: 2-byte frames, 5 bytes allowed: two kept.
        let small = Policy { size: 100, ttl_ms: 1000, max_bytes: 5 };
        let mut h = History::default();
        for _ in 0..4 {
            h.append("b", small, usize::MAX, 0, |o| Bytes::from(format!("m{o}")));
        }
        assert_eq!((h.messages(), h.bytes()), (2, 4));
        // Shard budget: a message that cannot be kept empties the room's
        // history (no hole), and a recovery from before it fails.
        let mut h = History::default();
        h.append("c", P, 4, 0, |_| Bytes::from_static(b"aa"));
        h.append("c", P, 4, 0, |_| Bytes::from_static(b"bb"));
        h.append("c", P, 4, 0, |_| Bytes::from_static(b"ccccc"));
        let e = h.since("c", None, 1000, 0).epoch;
        assert_eq!(h.messages(), 0);
        assert!(!h.since("c", Some((2, &e)), 1000, 0).recovered);
        assert!(h.since("c", Some((3, &e)), 1000, 0).recovered);
    }

    #[test]
    fn an_idle_empty_room_is_forgotten_and_comes_back_with_a_new_epoch() {
        let mut h = History::default();
        add(&mut h, "r", 0);
        let e1 = h.since("r", None, 1000, 0).epoch;
        h.sweep(5000, 2000, |_| 1000);
        assert_eq!(h.messages(), 0);
        let again = h.since("r", Some((1, &e1)), 1000, 5000);
        assert!(!again.recovered && again.epoch != e1 && again.offset == 0);
    }
}
