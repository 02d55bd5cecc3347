//! The Redis broker: cluster awareness through Redis, on its own thread.
//!
//! Shards never wait on Redis: they hand events to [`RedisBroker`] (a
//! bounded, non-blocking queue; a full queue drops the event and counts it)
//! and the cluster thread does the Redis work. What comes back from other
//! nodes goes to the application's [`Sink`], which routes it to shards
//! through their ordinary mailboxes.
//!
//! [`worker`] is the loop; [`state`] what it remembers about this node;
//! [`registry`] the node and pool entries; [`keys`] every key, channel and
//! message format; [`breaker`] the circuit breaker; [`backend`] the narrow
//! store interface, implemented by [`redis_backend`] (Redis or Redis
//! Cluster) and, in unit tests, by an in-memory store double. docs/cluster.md
//! describes the keys, messages and failure behaviour.

pub mod backend;
pub mod breaker;
pub mod keys;
#[cfg(test)]
mod memory;
pub mod queue;
pub mod redis_backend;
pub mod registry;
pub mod state;
pub mod worker;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::{Broker, SampleEntry, Sink};
use crate::config::{ClusterConfig, ReconnectVia};
use crate::prom::{Kind, Text};
use crate::runtime::table::ConnId;

/// Events from shards to the cluster thread.
#[derive(Debug)]
pub enum ClusterCmd {
    /// A `/ws` client connected on `shard` as `conn`.
    ConnOpened {
        /// Client id.
        client_id: Arc<str>,
        /// Its connection.
        conn: ConnId,
        /// Sessions the client may keep in the cluster.
        keep: usize,
        /// Not generated here (gets affinity).
        named: bool,
    },
    /// A `/ws` client disconnected.
    ConnClosed {
        /// Client id.
        client_id: Arc<str>,
        /// Its connection.
        conn: ConnId,
    },
    /// The first local member joined `room` on `shard` (`on`), or the last left.
    RoomInterest {
        /// Shard.
        shard: usize,
        /// Room.
        room: Arc<str>,
        /// Joined (true) or emptied (false).
        on: bool,
    },
    /// A local client published: forward to other nodes.
    Publish {
        /// Room.
        room: Arc<str>,
        /// The `{"type":"message",...}` JSON text.
        payload: String,
    },
    /// A message of a room with history (see [`Broker::publish_ordered`]).
    PublishOrdered {
        /// Room.
        room: Arc<str>,
        /// The message JSON up to its offset.
        prefix: String,
        /// The publisher.
        origin: ConnId,
        /// Messages kept.
        size: usize,
        /// Age kept, ms.
        ttl_ms: u64,
    },
    /// A join of a room with history (see [`Broker::recover`]).
    Recover {
        /// Room.
        room: Arc<str>,
        /// The joining connection.
        conn: ConnId,
        /// Its last (offset, epoch).
        since: Option<(u64, Box<str>)>,
        /// Age kept, ms.
        ttl_ms: u64,
    },
    /// A client became present in a room on this node, or stopped being.
    PresenceChanged {
        /// Room.
        room: Arc<str>,
        /// Client id.
        client: Arc<str>,
        /// Present now.
        on: bool,
    },
    /// `conn` asks who is in `room` across the cluster.
    PresenceQuery {
        /// Room.
        room: Arc<str>,
        /// Who asks.
        conn: ConnId,
    },
    /// A direct message whose target is not on this node.
    Direct {
        /// Target client id.
        to: Arc<str>,
        /// The ready frame for the target.
        frame: Bytes,
        /// The sender (told `unknown_client` if nobody has `to`).
        from: ConnId,
        /// `to` has sessions here too, which already got it.
        delivered_here: bool,
    },
    /// A shard's periodic sample of its connections.
    Sample {
        /// Shard.
        shard: usize,
        /// Sampled connections.
        entries: Vec<SampleEntry>,
    },
    /// A client was asked to move to node `target` (drain, rebalance).
    Moved {
        /// Client id.
        client_id: Arc<str>,
        /// Target node ("" = unknown, through the balancer).
        target: String,
        /// `drain` or `rebalance`.
        reason: &'static str,
    },
    /// Zero-disconnect upgrade, old process: a new process took this
    /// node's id over; from now on nothing is written to the registry, and
    /// the stop does not deregister.
    HandedOver,
    /// Zero-disconnect upgrade, new process, before sessions arrive: hold
    /// room subscriptions until `ResumeFloors` (at most [`worker::RESUME_HOLD`]).
    ResumeExpected,
    /// Zero-disconnect upgrade, new process: where the sessions that came
    /// over stood in rooms with history, (room, epoch, lowest offset):
    /// fetched from there once each room is subscribed.
    ResumeFloors {
        /// One per room.
        floors: Vec<(String, String, u64)>,
    },
    /// Stop: deregister and exit.
    Shutdown,
}

/// Circuit-breaker state, as shown in /metrics and /ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Redis answers; cross-node operations flow.
    Closed = 0,
    /// Redis failed; cross-node operations fail fast until the next probe.
    Open = 1,
    /// Probing whether Redis is back.
    HalfOpen = 2,
}

impl BreakerState {
    /// Label.
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// From the stored byte.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// What the cluster thread publishes for the rest of the node to read.
#[derive(Debug, Default)]
pub struct ClusterStatus {
    /// [`BreakerState`] as u8.
    pub breaker: AtomicU8,
    /// Events dropped because the queue to the cluster thread was full.
    pub dropped_events: AtomicU64,
    /// Redis commands issued.
    pub redis_commands: AtomicU64,
    /// Redis errors seen.
    pub redis_errors: AtomicU64,
    /// Times the node re-registered after Redis came back.
    pub reregistrations: AtomicU64,
    /// Room messages received from other nodes.
    pub remote_room_messages: AtomicU64,
    /// Direct messages received from other nodes.
    pub remote_direct_messages: AtomicU64,
    /// Messages published to other nodes.
    pub published: AtomicU64,
    /// Room messages not forwarded to other nodes (breaker open or Redis failed).
    pub publish_dropped: AtomicU64,
    /// Direct messages sent to another node's inbox.
    pub directs_sent: AtomicU64,
    /// Direct messages answered `unknown_client` by the cluster thread
    /// (nobody has the target, or Redis is away: fail fast).
    pub directs_unknown: AtomicU64,
    /// Affinity hints sent to clients.
    pub affinity_hints: AtomicU64,
    /// Messages for shards refused because a mailbox was full.
    pub mailbox_full: AtomicU64,
    /// Round trips to Redis (pipelines and subscription changes).
    pub redis_batches: AtomicU64,
    /// Room channels subscribed now.
    pub subscribed_rooms: AtomicU64,
    /// Rooms with local members whose subscription is not confirmed (no
    /// delivery from other nodes until it is).
    pub unconfirmed_rooms: AtomicU64,
    /// Sessions this node told to close (here or elsewhere) because a newer
    /// one took the client past `auth.sessions_per_client` in the cluster.
    pub sessions_replaced: AtomicU64,
    /// Replacement notices received from other nodes.
    pub remote_replacements: AtomicU64,
    /// Direct messages answered `unavailable` (Redis could not be asked).
    pub directs_unavailable: AtomicU64,
    /// Messages of rooms with history that the subscription missed and the
    /// node fetched from the room's stream.
    pub history_repaired: AtomicU64,
    /// Gaps in rooms with history that could not be repaired (the history
    /// was lost or trimmed): members see a jump in the offsets.
    pub history_gaps: AtomicU64,
    /// Messages from Redis dropped because the incoming queue was full.
    pub incoming_dropped: AtomicU64,
    /// The last `/cluster` view: live nodes from the registry (JSON).
    pub nodes_json: Mutex<serde_json::Value>,
    /// The least-loaded healthy peer (node id, url) from the last view
    /// (empty when none).
    pub peer: Mutex<(String, String)>,
    /// Clients asked to move, by (target node, reason).
    pub moves: Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
    /// Rebalances started by this node.
    pub rebalances: AtomicU64,
    /// The cluster thread has reached Redis at least once.
    pub connected_once: std::sync::atomic::AtomicBool,
}

/// The shards' side of the cluster thread.
pub struct RedisBroker {
    tx: queue::Tx<ClusterCmd>,
    sample_size: usize,
    via: ReconnectVia,
    me: String,
    /// `/ready` waits for the first connection until this instant at most.
    ready_by: std::time::Instant,
    /// Shared status.
    pub status: Arc<ClusterStatus>,
}

/// Bytes of data commands (publishes, directs, samples) waiting for the
/// cluster thread at most; past it they are refused and counted
/// (`ringside_cluster_dropped_events_total`). 64 MiB: a full second of 64 KiB
/// publishes at 1,000/s while Redis stalls.
pub const QUEUE_BYTES: usize = 64 << 20;
/// Bytes of messages from Redis waiting for the cluster thread at most.
pub const INCOMING_BYTES: usize = 64 << 20;

impl ClusterCmd {
    /// Its weight in the queue: data is bounded, control never refused.
    fn weight(&self) -> Option<usize> {
        match self {
            ClusterCmd::Publish { room, payload } => Some(room.len() + payload.len() + 64),
            ClusterCmd::PublishOrdered { room, prefix, .. } => Some(room.len() + prefix.len() + 64),
            // One per join of a room with history (rooms.max_pending_joins per connection).
            ClusterCmd::Recover { .. } => None,
            // One per presence change; queries one per request (the
            // message rate limit bounds those).
            ClusterCmd::PresenceChanged { .. } | ClusterCmd::PresenceQuery { .. } => None,
            ClusterCmd::Direct { to, frame, .. } => Some(to.len() + frame.len() + 64),
            ClusterCmd::Sample { entries, .. } => Some(entries.len() * 96 + 64),
            ClusterCmd::ConnOpened { .. }
            | ClusterCmd::ConnClosed { .. }
            | ClusterCmd::RoomInterest { .. }
            | ClusterCmd::Moved { .. }
            | ClusterCmd::HandedOver
            | ClusterCmd::ResumeExpected
            | ClusterCmd::ResumeFloors { .. }
            | ClusterCmd::Shutdown => None,
        }
    }
}

impl RedisBroker {
    /// Starts the cluster thread for node `node_id` (its first work is to
    /// connect; until then cross-node operations fail fast).
    pub fn start(
        config: &ClusterConfig,
        node_id: &str,
        sink: Arc<dyn Sink>,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = queue::queue(QUEUE_BYTES);
        let status = Arc::new(ClusterStatus::default());
        let broker = RedisBroker {
            tx,
            sample_size: config.sample_size,
            via: config.reconnect_via,
            me: node_id.to_string(),
            ready_by: std::time::Instant::now() + std::time::Duration::from_millis(config.ready_wait_ms),
            status: status.clone(),
        };
        let (config, me) = (config.clone(), node_id.to_string());
        let thread = std::thread::Builder::new()
            .name("ringside-cluster".into())
            .spawn(move || worker::run(config, me, sink, status, rx))?;
        Ok((broker, thread))
    }

    /// A broker whose queue the caller drains (unit tests drive the worker).
    #[cfg(test)]
    pub fn detached(sample_size: usize) -> (Self, queue::Rx<ClusterCmd>) {
        let (tx, rx) = queue::queue(QUEUE_BYTES);
        let status = Arc::new(ClusterStatus::default());
        let ready_by = std::time::Instant::now();
        (RedisBroker { tx, sample_size, via: ReconnectVia::Peer, me: "test".into(), ready_by, status }, rx)
    }

    /// Queues `cmd` for the cluster thread; false (counted) when refused.
    fn send(&self, cmd: ClusterCmd) -> bool {
        let w = cmd.weight();
        let queued = self.tx.send(cmd, w);
        if !queued {
            self.status.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// The breaker state.
    pub fn breaker(&self) -> BreakerState {
        BreakerState::from_u8(self.status.breaker.load(Ordering::Relaxed))
    }
}

impl Broker for RedisBroker {
    fn conn_opened(&self, client_id: &Arc<str>, conn: ConnId, keep: usize, named: bool) {
        self.send(ClusterCmd::ConnOpened { client_id: client_id.clone(), conn, keep, named });
    }

    fn conn_closed(&self, client_id: &Arc<str>, conn: ConnId) {
        self.send(ClusterCmd::ConnClosed { client_id: client_id.clone(), conn });
    }

    fn room_interest(&self, shard: usize, room: &str, on: bool) {
        self.send(ClusterCmd::RoomInterest { shard, room: Arc::from(room), on });
    }

    fn publish(&self, room: Arc<str>, payload: &str) -> bool {
        // While the breaker is open the cluster thread would drop it.
        self.breaker() == BreakerState::Closed && self.send(ClusterCmd::Publish { room, payload: payload.to_string() })
    }

    fn direct(&self, to: Arc<str>, frame: Bytes, from: ConnId, delivered_here: bool) {
        self.send(ClusterCmd::Direct { to, frame, from, delivered_here });
    }

    fn orders_rooms(&self) -> bool {
        true
    }

    fn presence_changed(&self, room: &str, client: &Arc<str>, on: bool) {
        self.send(ClusterCmd::PresenceChanged { room: Arc::from(room), client: client.clone(), on });
    }

    fn presence(&self, room: Arc<str>, conn: ConnId) -> bool {
        self.send(ClusterCmd::PresenceQuery { room, conn })
    }

    fn publish_ordered(&self, room: Arc<str>, prefix: String, origin: ConnId, size: usize, ttl_ms: u64) -> bool {
        self.send(ClusterCmd::PublishOrdered { room, prefix, origin, size, ttl_ms })
    }

    fn recover(&self, room: Arc<str>, conn: ConnId, since: Option<(u64, Box<str>)>, ttl_ms: u64) {
        self.send(ClusterCmd::Recover { room, conn, since, ttl_ms });
    }

    fn sample_size(&self) -> usize {
        self.sample_size
    }

    fn reconnect_target(&self) -> (String, String) {
        let (node, url) = self.status.peer.lock().map(|p| p.clone()).unwrap_or_default();
        let url = self.via.hint_url(&url).to_string();
        (node, url)
    }

    fn moved(&self, client_id: &Arc<str>, target: &str, reason: &'static str) {
        self.send(ClusterCmd::Moved { client_id: client_id.clone(), target: target.to_string(), reason });
    }

    fn sample(&self, shard: usize, entries: Vec<SampleEntry>) {
        self.send(ClusterCmd::Sample { shard, entries });
    }

    fn shutdown(&self) {
        let _ = self.tx.send(ClusterCmd::Shutdown, None);
    }

    fn handed_over(&self) {
        let _ = self.tx.send(ClusterCmd::HandedOver, None);
    }

    fn ready(&self) -> bool {
        self.status.connected_once.load(Ordering::Relaxed) || std::time::Instant::now() >= self.ready_by
    }

    fn resume_expected(&self) {
        let _ = self.tx.send(ClusterCmd::ResumeExpected, None);
    }

    fn resume_floors(&self, floors: Vec<(String, String, u64)>) {
        let _ = self.tx.send(ClusterCmd::ResumeFloors { floors }, None);
    }

    fn ready_json(&self) -> Option<serde_json::Value> {
        let s = &self.status;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(serde_json::json!({
            "redis": self.breaker().name(),
            "dropped_events": g(&s.dropped_events),
            "redis_commands": g(&s.redis_commands),
            "redis_errors": g(&s.redis_errors),
            "reregistrations": g(&s.reregistrations),
            "subscribed_rooms": g(&s.subscribed_rooms),
            "unconfirmed_rooms": g(&s.unconfirmed_rooms),
        }))
    }

    fn cluster_json(&self) -> serde_json::Value {
        self.status.nodes_json.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn render_metrics(&self, t: &mut Text) {
        let s = &self.status;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let help = "Redis circuit breaker: 0 closed, 1 open, 2 half-open.";
        t.family("cluster_breaker_state", Kind::Gauge, help).sample(
            "cluster_breaker_state",
            &[("state", &self.breaker().name())],
            self.breaker() as u8,
        );
        for (name, help, v) in [
            ("cluster_dropped_events_total", "Events not sent to the cluster thread (queue full).", &s.dropped_events),
            ("cluster_redis_commands_total", "Redis commands issued.", &s.redis_commands),
            ("cluster_redis_errors_total", "Redis errors.", &s.redis_errors),
            ("cluster_reregistrations_total", "Re-registrations after Redis returned.", &s.reregistrations),
            ("cluster_remote_room_messages_total", "Room messages from other nodes.", &s.remote_room_messages),
            ("cluster_remote_direct_messages_total", "Direct messages from other nodes.", &s.remote_direct_messages),
            ("cluster_published_total", "Room messages published to other nodes.", &s.published),
            ("cluster_publish_dropped_total", "Room messages not forwarded (Redis away).", &s.publish_dropped),
            ("cluster_directs_sent_total", "Direct messages sent to other nodes.", &s.directs_sent),
            ("cluster_directs_unknown_total", "Direct messages answered unknown_client.", &s.directs_unknown),
            (
                "cluster_sessions_replaced_total",
                "Sessions replaced by a newer one in the cluster (told by this node).",
                &s.sessions_replaced,
            ),
            (
                "cluster_remote_replacements_total",
                "Replacement notices received from other nodes.",
                &s.remote_replacements,
            ),
            (
                "cluster_directs_unavailable_total",
                "Direct messages answered unavailable: Redis could not be asked.",
                &s.directs_unavailable,
            ),
            (
                "cluster_history_repaired_total",
                "Messages of rooms with history missed by the subscription and fetched from the stream.",
                &s.history_repaired,
            ),
            (
                "cluster_history_gaps_total",
                "Gaps in rooms with history that could not be repaired (offsets jump).",
                &s.history_gaps,
            ),
            ("cluster_affinity_hints_total", "Affinity hints sent to clients.", &s.affinity_hints),
            (
                "cluster_rebalances_total",
                "Rebalances this node started (a batch of clients asked to move).",
                &s.rebalances,
            ),
            ("cluster_mailbox_full_total", "Messages for shards refused by a full mailbox.", &s.mailbox_full),
            ("cluster_redis_batches_total", "Round trips to Redis.", &s.redis_batches),
            (
                "cluster_incoming_dropped_total",
                "Messages from Redis dropped: the queue to the cluster thread was over its byte budget.",
                &s.incoming_dropped,
            ),
        ] {
            t.single(name, Kind::Counter, help, g(v));
        }
        t.single("cluster_subscribed_rooms", Kind::Gauge, "Room channels subscribed.", g(&s.subscribed_rooms));
        let help = "Rooms with local members whose subscription is not confirmed: no delivery from other nodes yet.";
        t.single("cluster_unconfirmed_rooms", Kind::Gauge, help, g(&s.unconfirmed_rooms));
        let help = "Clients asked to move to another node (the seed's pool failover, per node): from, to, reason.";
        t.family("cluster_failover_total", Kind::Counter, help);
        if let Ok(moves) = s.moves.lock() {
            for ((to, reason), n) in moves.iter() {
                t.sample("cluster_failover_total", &[("from", &self.me), ("to", to), ("reason", reason)], n);
            }
        }
    }
}
