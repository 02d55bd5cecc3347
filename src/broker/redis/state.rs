//! What the cluster thread remembers about this node, independent of Redis:
//! which clients are connected here (and which of their conn keys are
//! written), which rooms have local members on which shards, which room
//! channels are subscribed, and the latest connection samples.
//!
//! Events only change this state; the worker turns the accumulated changes
//! into one batch of writes per sync interval, so a client that connects
//! and leaves within one interval costs no conn-key write at all.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::backend::Op;
use super::keys;
use crate::broker::SampleEntry;
use crate::runtime::table::ConnId;

/// Closes remembered while Redis is away, at most; beyond this the conn keys
/// are left to their TTL (readers also check that the named node is live).
const MAX_PENDING_CLOSES: usize = 200_000;
/// Clients (conn keys, with their sessions after a reconnect) and presence
/// entries written per interval at most; the rest wait for the next ones.
pub const FLUSH_CLIENTS: usize = 2_000;
/// Entries kept in `ringside:sample:{node}` at most.
pub const MAX_SAMPLE: usize = 256;

/// A client connected to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalClient {
    /// Its live sessions here (a reconnect may overlap the old one): the
    /// connection's raw id and its score in the cluster's sessions set.
    pub sessions: Vec<(u64, u64)>,
    /// Shard of the newest connection.
    pub shard: usize,
    /// Unix seconds of the newest connection.
    pub connected_at: u64,
    /// Its conn key has been written.
    pub written: bool,
    /// Its id is not generated: it gets session affinity.
    pub named: bool,
}

/// Writes taken for one flush, given back with [`State::restore`] if it failed.
#[derive(Debug, Default)]
pub struct Flush {
    /// The ops to run.
    pub ops: Vec<Op>,
    closes: Vec<Arc<str>>,
    affinity: Vec<Arc<str>>,
}

/// Node-local cluster state.
#[derive(Debug, Default)]
pub struct State {
    /// Clients connected here.
    pub clients: HashMap<Arc<str>, LocalClient>,
    dirty_open: HashSet<Arc<str>>,
    dirty_close: HashSet<Arc<str>>,
    affinity_dirty: HashSet<Arc<str>>,
    /// Clients asked to move → the node their affinity now names.
    moved_to: HashMap<Arc<str>, String>,
    interest: HashMap<Arc<str>, BTreeSet<usize>>,
    subscribed: HashSet<Arc<str>>,
    dirty_rooms: HashSet<Arc<str>>,
    samples: HashMap<usize, Vec<SampleEntry>>,
    /// Rewrite every local session into the sessions sets (after a reconnect).
    resync_sessions: bool,
    /// Rooms → clients present in them on this node.
    presence: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Rewrite every local presence entry (after a reconnect).
    resync_presence: bool,
    /// Rooms whose presence entries are still to be rewritten.
    presence_resync: Vec<Arc<str>>,
}

fn slice_of(client_id: &str, rounds: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client_id.hash(&mut h);
    h.finish() % rounds
}

impl State {
    /// A client connected as `conn` at `now_secs`; `score` orders it among
    /// the client's sessions in the cluster.
    /// Only a `named` client (its id from a token or itself) gets affinity.
    pub fn conn_opened(&mut self, client_id: Arc<str>, conn: ConnId, score: u64, now_secs: u64, named: bool) {
        let shard = conn.shard();
        let e = self.clients.entry(client_id.clone()).or_insert(LocalClient {
            sessions: Vec::new(),
            shard,
            connected_at: now_secs,
            written: false,
            named,
        });
        e.sessions.push((conn.raw(), score));
        e.shard = shard;
        e.connected_at = now_secs;
        self.dirty_close.remove(&client_id);
        self.dirty_open.insert(client_id.clone());
        if e.named {
            self.affinity_dirty.insert(client_id);
        }
    }

    /// `client_id` was asked to move to node `target`: its affinity points
    /// there from the next flush on (and stays so when it leaves here).
    pub fn moved(&mut self, client_id: Arc<str>, target: String) {
        let Some(e) = self.clients.get(&client_id) else { return };
        if !e.named || target.is_empty() {
            return;
        }
        if self.moved_to.len() < MAX_PENDING_CLOSES {
            self.moved_to.insert(client_id.clone(), target);
            self.affinity_dirty.insert(client_id);
        }
    }

    /// The node `client_id`'s affinity should name: its move target, or `me`.
    pub fn affinity_node<'a>(&'a self, client_id: &str, me: &'a str) -> &'a str {
        self.moved_to.get(client_id).map(|t| t.as_str()).unwrap_or(me)
    }

    /// A client's connection `conn` closed.
    pub fn conn_closed(&mut self, client_id: Arc<str>, conn: ConnId) {
        let Some(e) = self.clients.get_mut(&client_id) else { return };
        e.sessions.retain(|(c, _)| *c != conn.raw());
        let named = e.named;
        if e.sessions.is_empty() {
            let written = e.written;
            self.clients.remove(&client_id);
            self.dirty_open.remove(&client_id);
            if written && self.dirty_close.len() < MAX_PENDING_CLOSES {
                self.dirty_close.insert(client_id.clone());
            }
        }
        // Affinity is "refreshed on activity": leaving is the last activity,
        // so its TTL counts from here.
        if named {
            self.affinity_dirty.insert(client_id);
        }
    }

    /// True if `client_id` is connected here.
    #[cfg(test)]
    pub fn is_local(&self, client_id: &str) -> bool {
        self.clients.contains_key(client_id)
    }

    /// After a reconnect to Redis: every conn key is written again.
    pub fn mark_all_dirty(&mut self) {
        self.reconcile();
        self.subscribed.clear();
        self.dirty_rooms.extend(self.interest.keys().cloned());
    }

    /// The periodic full rewrite of what this node keeps in Redis (conn
    /// keys, sessions, presence), in the usual chunks: whatever drifted
    /// (a key deleted by hand, a write lost with a failover to a replica
    /// that had not received it) is repaired within one round of chunks.
    pub fn reconcile(&mut self) {
        self.dirty_open.extend(self.clients.keys().cloned());
        self.resync_sessions = true;
        self.resync_presence = true;
    }

    /// Takes this interval's conn, affinity and refresh writes. `tick`
    /// selects which slice of live conn keys gets its TTL refreshed.
    pub fn take_flush(&mut self, me: &str, conn_ttl_ms: u64, affinity_ttl_ms: u64, tick: u64) -> Flush {
        let mut f = Flush::default();
        // At most FLUSH_CLIENTS conn keys per interval: after a reconnect
        // every client is dirty, and one pipeline of all of them could
        // outlast the response timeout and be retried forever.
        let opened: HashSet<Arc<str>> = self.dirty_open.iter().take(FLUSH_CLIENTS).cloned().collect();
        self.dirty_open.retain(|c| !opened.contains(c));
        let resyncing = self.resync_sessions;
        if self.dirty_open.is_empty() {
            self.resync_sessions = false;
        }
        for cid in &opened {
            // Re-registering after a reconnect: the client's sessions too.
            if let Some(c) = self.clients.get(cid).filter(|_| resyncing) {
                for &(conn, score) in &c.sessions {
                    let (key, member) = (keys::sessions(cid), keys::session_member(me, conn));
                    f.ops.push(Op::SessionOpen { key, member, score, ttl_ms: conn_ttl_ms });
                }
            }
            if let Some(c) = self.clients.get_mut(cid) {
                c.written = true;
                let fields = vec![
                    ("node", me.to_string()),
                    ("shard", c.shard.to_string()),
                    ("connected_at", c.connected_at.to_string()),
                ];
                f.ops.push(Op::HSet { key: keys::conn(cid), fields, ttl_ms: conn_ttl_ms });
            }
        }
        let slice = tick % keys::REFRESH_ROUNDS;
        for (cid, c) in &self.clients {
            if c.written && slice_of(cid, keys::REFRESH_ROUNDS) == slice && !opened.contains(cid) {
                f.ops.push(Op::Expire { key: keys::conn(cid), ttl_ms: conn_ttl_ms });
                f.ops.push(Op::Expire { key: keys::sessions(cid), ttl_ms: conn_ttl_ms });
            }
        }
        self.presence_flush(me, conn_ttl_ms, slice, &mut f.ops);
        for cid in self.dirty_close.drain() {
            f.ops.push(Op::DelIfNode { key: keys::conn(&cid), node: me.to_string() });
            f.closes.push(cid);
        }
        for cid in self.affinity_dirty.drain() {
            let node = self.moved_to.get(&cid).map(|t| t.as_str()).unwrap_or(me);
            f.ops.push(Op::Set { key: keys::affinity(&cid), value: node.as_bytes().to_vec(), ttl_ms: affinity_ttl_ms });
            if !self.clients.contains_key(&cid) {
                self.moved_to.remove(&cid); // it left: nothing will write it again
            }
            f.affinity.push(cid);
        }
        f
    }

    /// `client` is present in `room` here (`on`) or no longer.
    pub fn presence_changed(&mut self, room: &Arc<str>, client: &Arc<str>, on: bool) {
        if on {
            self.presence.entry(room.clone()).or_default().insert(client.clone());
        } else if let Some(set) = self.presence.get_mut(room) {
            set.remove(client);
            if set.is_empty() {
                self.presence.remove(room);
            }
        }
    }

    /// Clients present in `room` on this node.
    pub fn present(&self, room: &str) -> Vec<String> {
        self.presence.get(room).map(|s| s.iter().map(|c| c.to_string()).collect()).unwrap_or_default()
    }

    /// The presence writes of this interval: TTL refreshes for a slice of
    /// the rooms, and after a reconnect every entry, FLUSH_CLIENTS at most
    /// per interval.
    fn presence_flush(&mut self, me: &str, ttl_ms: u64, slice: u64, ops: &mut Vec<Op>) {
        if std::mem::take(&mut self.resync_presence) {
            self.presence_resync = self.presence.keys().cloned().collect();
        }
        let mut budget = FLUSH_CLIENTS;
        while budget > 0 {
            let Some(room) = self.presence_resync.pop() else { break };
            let Some(clients) = self.presence.get(&room) else { continue };
            for c in clients {
                let (field, value) = (format!("{c}|{me}"), "1".to_string());
                ops.push(Op::HSetField { key: keys::presence(&room), field, value, ttl_ms });
            }
            budget = budget.saturating_sub(clients.len());
        }
        for room in self.presence.keys() {
            if slice_of(room, keys::REFRESH_ROUNDS) == slice {
                ops.push(Op::Expire { key: keys::presence(room), ttl_ms });
            }
        }
    }

    /// Gives back the closes and affinity writes of a flush that failed.
    pub fn restore(&mut self, f: Flush) {
        for cid in f.closes {
            if !self.clients.contains_key(&cid) && self.dirty_close.len() < MAX_PENDING_CLOSES {
                self.dirty_close.insert(cid);
            }
        }
        self.affinity_dirty.extend(f.affinity);
    }

    /// Shard `shard`'s first member joined `room` (`on`) or its last left.
    pub fn room_interest(&mut self, room: Arc<str>, shard: usize, on: bool) {
        let set = self.interest.entry(room.clone()).or_default();
        if on {
            set.insert(shard);
        } else {
            set.remove(&shard);
        }
        if set.is_empty() {
            self.interest.remove(&room);
        }
        self.dirty_rooms.insert(room);
    }

    #[cfg(test)]
    /// Shards with members in `room`.
    pub fn interested_shards(&self, room: &str) -> usize {
        self.interest.get(room).map_or(0, BTreeSet::len)
    }

    /// Rooms to subscribe and to unsubscribe so that subscriptions match
    /// interest. The caller reports what succeeded with [`State::subscribed`].
    pub fn room_changes(&mut self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let mut on = Vec::new();
        let mut off = Vec::new();
        for room in self.dirty_rooms.drain() {
            match (self.interest.contains_key(&room), self.subscribed.contains(&room)) {
                (true, false) => on.push(room),
                (false, true) => off.push(room),
                _ => {}
            }
        }
        (on, off)
    }

    /// Records that `rooms` are now subscribed (`on`) or not.
    pub fn subscribed(&mut self, rooms: &[Arc<str>], on: bool) {
        for r in rooms {
            if on {
                self.subscribed.insert(r.clone());
            } else {
                self.subscribed.remove(r);
            }
        }
    }

    /// Marks rooms whose subscription change failed, to retry later.
    pub fn retry_rooms(&mut self, rooms: impl IntoIterator<Item = Arc<str>>) {
        self.dirty_rooms.extend(rooms);
    }

    /// Number of subscribed room channels.
    pub fn subscribed_count(&self) -> usize {
        self.subscribed.len()
    }

    /// Rooms with local members whose subscription is not confirmed yet
    /// (delivery from other nodes is off for them until it is).
    pub fn unconfirmed_count(&self) -> usize {
        self.interest.keys().filter(|r| !self.subscribed.contains(*r)).count()
    }

    /// Keeps shard `shard`'s latest sample (at most `max` entries).
    pub fn sample(&mut self, shard: usize, mut entries: Vec<SampleEntry>, max: usize) {
        entries.truncate(max);
        self.samples.insert(shard, entries);
    }

    /// The sample key's value: every shard's latest entries, bounded.
    pub fn sample_json(&self) -> Option<String> {
        if self.samples.is_empty() {
            return None;
        }
        let mut shards: Vec<_> = self.samples.iter().collect();
        shards.sort_by_key(|(s, _)| **s);
        let all: Vec<&SampleEntry> = shards.into_iter().flat_map(|(_, v)| v.iter()).take(MAX_SAMPLE).collect();
        serde_json::to_string(&all).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn c(n: usize) -> ConnId {
        ConnId::new(n % 2, n, 1)
    }

    #[test]
    fn short_lived_clients_cost_no_conn_write() {
        let mut s = State::default();
        s.conn_opened(cid("a"), c(0), 1, 1, true);
        s.conn_closed(cid("a"), c(0));
        let f = s.take_flush("n1", 1000, 9000, 0);
        assert_eq!(f.ops.len(), 1, "only the affinity write: {:?}", f.ops);
        assert!(matches!(&f.ops[0], Op::Set { key, .. } if key == "ringside:affinity:a"));
    }

    #[test]
    fn written_clients_are_deleted_conditionally_and_overlaps_counted() {
        let mut s = State::default();
        s.conn_opened(cid("a"), c(1), 1, 1, true);
        let f = s.take_flush("n1", 1000, 9000, 0);
        assert!(f.ops.iter().any(|o| matches!(o, Op::HSet { key, .. } if key == "ringside:conn:a")));
        // Reconnect overlaps: the old connection's close must not delete.
        s.conn_opened(cid("a"), c(2), 2, 2, true);
        s.conn_closed(cid("a"), c(1));
        assert!(s.is_local("a"));
        s.conn_closed(cid("a"), c(1));
        assert!(s.is_local("a"), "a repeated close is ignored");
        s.conn_closed(cid("a"), c(2));
        assert!(!s.is_local("a"));
        let f = s.take_flush("n1", 1000, 9000, 1);
        assert!(f.ops.contains(&Op::DelIfNode { key: "ringside:conn:a".into(), node: "n1".into() }));
        // A failed flush gives its close back.
        s.restore(f);
        let f = s.take_flush("n1", 1000, 9000, 2);
        assert!(f.ops.contains(&Op::DelIfNode { key: "ringside:conn:a".into(), node: "n1".into() }));
    }

    #[test]
    fn live_keys_are_refreshed_once_per_round() {
        let mut s = State::default();
        for i in 0..100 {
            s.conn_opened(cid(&format!("c{i}")), c(i), 1, 1, true);
        }
        let _ = s.take_flush("n1", 1000, 9000, 0);
        let mut refreshed = 0;
        for tick in 1..=keys::REFRESH_ROUNDS {
            let f = s.take_flush("n1", 1000, 9000, tick);
            refreshed += f.ops.iter().filter(|o| matches!(o, Op::Expire { .. })).count();
        }
        assert_eq!(refreshed, 200, "conn and sessions keys");
    }

    #[test]
    fn re_registration_goes_in_bounded_chunks() {
        let mut s = State::default();
        let n = FLUSH_CLIENTS * 2 + 5;
        for i in 0..n {
            s.conn_opened(cid(&format!("c{i}")), c(i), i as u64, 1, true);
            s.presence_changed(&cid("room"), &cid(&format!("c{i}")), true);
        }
        let _ = s.take_flush("n1", 1000, 9000, 0);
        let _ = s.take_flush("n1", 1000, 9000, 1);
        let _ = s.take_flush("n1", 1000, 9000, 2);
        s.mark_all_dirty();
        let count = |f: &Flush| {
            let conns = f.ops.iter().filter(|o| matches!(o, Op::HSet { .. })).count();
            let sessions = f.ops.iter().filter(|o| matches!(o, Op::SessionOpen { .. })).count();
            let presence = f.ops.iter().filter(|o| matches!(o, Op::HSetField { .. })).count();
            (conns, sessions, presence)
        };
        let mut total = (0, 0, 0);
        for tick in 0..5 {
            let f = s.take_flush("n1", 1000, 9000, 10 + tick);
            let (a, b, p) = count(&f);
            assert!(a <= FLUSH_CLIENTS && b <= FLUSH_CLIENTS, "tick {tick}: {a} conn keys, {b} sessions");
            total = (total.0 + a, total.1 + b, total.2 + p);
        }
        assert_eq!(total.0, n, "every conn key rewritten");
        assert_eq!(total.1, n, "every session rewritten");
        assert_eq!(total.2, n, "every presence entry rewritten (one room: one chunk)");
    }

    #[test]
    fn a_reconcile_rewrites_keys_without_touching_subscriptions() {
        let mut s = State::default();
        s.conn_opened(cid("a"), c(1), 10, 1, true);
        s.presence_changed(&cid("r"), &cid("a"), true);
        s.room_interest(cid("r"), 0, true);
        let (on, _) = s.room_changes();
        s.subscribed(&on, true);
        let _ = s.take_flush("n1", 1000, 9000, 0);
        s.reconcile();
        let f = s.take_flush("n1", 1000, 9000, 1);
        let has = |pred: &dyn Fn(&Op) -> bool| f.ops.iter().any(pred);
        assert!(has(&|o| matches!(o, Op::HSet { key, .. } if key == "ringside:conn:a")));
        assert!(has(&|o| matches!(o, Op::SessionOpen { .. })));
        assert!(has(&|o| matches!(o, Op::HSetField { field, .. } if field == "a|n1")));
        assert_eq!(s.room_changes(), (vec![], vec![]), "subscriptions stay");
        assert_eq!(s.unconfirmed_count(), 0);
    }

    #[test]
    fn a_reconnect_rewrites_every_local_session() {
        let mut s = State::default();
        s.conn_opened(cid("a"), c(1), 10, 1, true);
        s.conn_opened(cid("a"), c(2), 11, 1, true);
        s.conn_opened(cid("b"), c(3), 12, 1, true);
        let opens = |f: &Flush| f.ops.iter().filter(|o| matches!(o, Op::SessionOpen { .. })).count();
        assert_eq!(opens(&s.take_flush("n1", 1000, 9000, 0)), 0, "opens are written by the worker at once");
        s.mark_all_dirty();
        let f = s.take_flush("n1", 1000, 9000, 1);
        assert_eq!(opens(&f), 3);
        assert!(!s.resync_sessions, "all rewritten in one interval");
        assert!(f.ops.contains(&Op::SessionOpen {
            key: "ringside:sessions:a".into(),
            member: format!("n1|{}", c(2).raw()),
            score: 11,
            ttl_ms: 1000
        }));
        assert_eq!(opens(&s.take_flush("n1", 1000, 9000, 2)), 0);
    }

    #[test]
    fn subscriptions_follow_shard_interest() {
        let mut s = State::default();
        let r = cid("r");
        s.room_interest(r.clone(), 0, true);
        s.room_interest(r.clone(), 1, true);
        assert_eq!(s.interested_shards("r"), 2);
        let (on, off) = s.room_changes();
        assert_eq!((on.len(), off.len()), (1, 0));
        s.subscribed(&on, true);
        s.room_interest(r.clone(), 0, false);
        assert_eq!(s.room_changes(), (vec![], vec![]), "shard 1 still has members");
        s.room_interest(r.clone(), 1, false);
        s.room_interest(r.clone(), 1, true);
        s.room_interest(r.clone(), 1, false);
        let (on, off) = s.room_changes();
        assert_eq!((on.len(), off.len()), (0, 1));
        s.subscribed(&off, false);
        s.room_interest(r.clone(), 0, true);
        s.subscribed(std::slice::from_ref(&r), true);
        s.mark_all_dirty();
        assert_eq!(s.room_changes().0, vec![r], "resubscribed after a reconnect");
    }

    #[test]
    fn samples_are_bounded() {
        let mut s = State::default();
        let e = SampleEntry { client_id: "c".into(), shard: 0, age_ms: 1, queued_bytes: 0, rtt_us: 0 };
        s.sample(0, vec![e.clone(); 50], 16);
        for shard in 1..40 {
            s.sample(shard, vec![e.clone(); 16], 16);
        }
        let v: Vec<serde_json::Value> = serde_json::from_str(&s.sample_json().unwrap()).unwrap();
        assert_eq!(v.len(), MAX_SAMPLE);
    }
}
