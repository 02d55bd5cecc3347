//! Broker: what crosses nodes, behind one trait. [`memory`] serves a single
//! node (and any number of nodes in one process, for tests); [`redis`]
//! serves a cluster through Redis on its own thread.
//!
//! The broker moves opaque payloads and keeps the cluster's registry; it
//! builds no WebSocket frame and reads no shard state. What arrives from
//! other nodes it hands to a [`Sink`], which the application implements
//! (framing the payload and routing it to its shards); what it needs to know
//! about this node it asks the sink for ([`Sink::local`]).
//!
//! Every call on [`Broker`] returns at once: a broker never makes a shard
//! wait.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::prom::Text;
use crate::runtime::table::ConnId;

/// Cross-node operations, called from shard threads.
pub trait Broker: Send + Sync {
    /// A `/ws` client connected as `conn`; it may keep `keep` sessions in
    /// the whole cluster (`auth.sessions_per_client`): past that, the oldest
    /// elsewhere are told to close through their node's [`Sink::replaced`].
    /// Called from the client's home shard, in the order its directory
    /// registered the sessions, so that the cluster's "oldest" and the
    /// node's agree.
    /// `named`: the id came from a token or the client; only named ids get
    /// session affinity (a generated id never reconnects).
    fn conn_opened(&self, client_id: &Arc<str>, conn: ConnId, keep: usize, named: bool);
    /// A `/ws` client's connection `conn` closed (or was replaced).
    fn conn_closed(&self, client_id: &Arc<str>, conn: ConnId);
    /// The first local member joined `room` on `shard` (`on`), or the last left.
    fn room_interest(&self, shard: usize, room: &str, on: bool);
    /// A local client published `payload` (a `message` envelope) to `room`:
    /// deliver it to the other nodes' members.
    /// False when it cannot reach the other nodes now (Redis unreachable):
    /// the publisher is told (`unavailable`) instead of a silent drop.
    fn publish(&self, room: Arc<str>, payload: &str) -> bool;
    /// A direct message (`frame`, ready for the target) for the target's
    /// sessions on other nodes. `delivered_here`: the target also has
    /// sessions on this node, which already got it; otherwise `from` is told
    /// `unknown_client` through the sink if nobody has it.
    fn direct(&self, to: Arc<str>, frame: Bytes, from: ConnId, delivered_here: bool);
    /// True when this broker gives rooms with history one order across
    /// nodes ([`Broker::publish_ordered`], [`Broker::recover`]); otherwise
    /// the application numbers them on the node.
    fn orders_rooms(&self) -> bool {
        false
    }
    /// A message of a room with history: number it, keep it (`size`
    /// messages, `ttl_ms`) and deliver it to every node, this one included,
    /// through [`Sink::room_ordered`] in one order. `prefix` is the message
    /// JSON up to its offset: `{"type":"message",...,"offset":` (the broker
    /// appends the number and `}`). False when it could not even be queued;
    /// a later failure is told to `origin` through [`Sink::unavailable`].
    fn publish_ordered(&self, _room: Arc<str>, _prefix: String, _origin: ConnId, _size: usize, _ttl_ms: u64) -> bool {
        false
    }
    /// `conn` joins a room with history: answer through [`Sink::recovered`]
    /// with the room's position and, for `since` (offset, epoch), the kept
    /// messages after it.
    fn recover(&self, _room: Arc<str>, _conn: ConnId, _since: Option<(u64, Box<str>)>, _ttl_ms: u64) {}
    /// `client` is now present in `room` on this node (`on`: its first
    /// session here joined) or no longer (its last left).
    fn presence_changed(&self, _room: &str, _client: &Arc<str>, _on: bool) {}
    /// Answers `conn` who is in `room` across the cluster, through
    /// [`Sink::presence`]; false when this broker has no cluster view (the
    /// node answers from its own).
    fn presence(&self, _room: Arc<str>, _conn: ConnId) -> bool {
        false
    }
    /// Where a client asked to leave this node should go: the least-loaded
    /// live peer's node id and `url`; the url is "" (the same address,
    /// through the balancer) alone or with `cluster.reconnect_via = "balancer"`.
    fn reconnect_target(&self) -> (String, String) {
        (String::new(), String::new())
    }
    /// A client of this node was asked to move to `target` (node id, "" when
    /// unknown) for `reason` (`drain`, `rebalance`): its affinity now points
    /// there, and the move is counted.
    fn moved(&self, _client_id: &Arc<str>, _target: &str, _reason: &'static str) {}
    /// How many connections per shard the broker wants in each sample (0 = none).
    fn sample_size(&self) -> usize;
    /// A shard's periodic sample of its connections.
    fn sample(&self, shard: usize, entries: Vec<SampleEntry>);
    /// The broker's state for `/ready` (`None` for a single node).
    fn ready_json(&self) -> Option<serde_json::Value>;
    /// The `/cluster` body: live nodes and the least-loaded one.
    fn cluster_json(&self) -> serde_json::Value;
    /// The broker's Prometheus families.
    fn render_metrics(&self, t: &mut Text);
    /// Deregister and stop (graceful shutdown).
    fn shutdown(&self);
    /// Zero-disconnect upgrade, old process: a new process on the same node
    /// id took the clients over; write nothing more about this node, and do
    /// not deregister it at the stop.
    fn handed_over(&self) {}
    /// Whether the node is ready as far as the broker goes: a cluster node
    /// that has not reached Redis yet since its start (within
    /// `cluster.ready_wait_ms`) is not, so that a balancer does not send it
    /// clients whose rooms it cannot serve across nodes yet.
    fn ready(&self) -> bool {
        true
    }
    /// Zero-disconnect upgrade, new process, before the first handed-over
    /// session arrives: room subscriptions wait for [`Broker::resume_floors`]
    /// (sessions join their rooms as they arrive, and a room subscribed
    /// before the lowest position is known would be fetched from too late).
    fn resume_expected(&self) {}
    /// Zero-disconnect upgrade, new process, before any handed-over session
    /// resumes: the lowest (room, epoch, offset) they had got in each room
    /// with history; what came after is fetched once the room is subscribed.
    /// Always called once after [`Broker::resume_expected`], even with none.
    fn resume_floors(&self, _floors: Vec<(String, String, u64)>) {}
}

/// Where a broker delivers what comes from other nodes. Implemented by the
/// application; each method returns false when the message could not be
/// handed to a shard (a full mailbox), which the broker counts.
pub trait Sink: Send + Sync + 'static {
    /// A room message published on another node.
    fn room(&self, room: &str, payload: &str) -> bool;
    /// A direct message for `to`, who is connected to this node.
    fn direct(&self, to: &str, frame: &[u8]) -> bool;
    /// `from`'s direct message to `to` found nobody.
    fn unknown_client(&self, from: ConnId, to: Arc<str>) -> bool;
    /// `conn`, a session of `client_id` on this node, was replaced by a
    /// newer session elsewhere (past `auth.sessions_per_client`): close it.
    /// Ignored unless `conn` is still that client's session here.
    fn replaced(&self, client_id: &str, conn: ConnId) -> bool;
    /// `conn`'s affinity node is another live one, reachable at `url`.
    fn affinity(&self, conn: ConnId, node: &str, url: &str) -> bool;
    /// Rebalancing: ask up to `count` of this node's least recently active
    /// clients to move to node `target` at `url` ("" = through the
    /// balancer). False when no shard could be told.
    fn rebalance(&self, _count: usize, _target: &str, _url: &str) -> bool {
        false
    }
    /// This node's own figures, for the registry.
    fn local(&self) -> LocalNode;
    /// A message of a room with history, numbered `offset` by the cluster;
    /// `origin` is the publisher when it is on this node (it gets no copy).
    fn room_ordered(&self, _room: &str, _offset: u64, _payload: &str, _origin: Option<ConnId>) -> bool {
        true
    }
    /// The answer to [`Broker::recover`] for `conn`.
    fn recovered(&self, _room: &str, _conn: ConnId, _r: Recovery) -> bool {
        true
    }
    /// The answer to [`Broker::presence`]: the client ids in `room`.
    fn presence(&self, _room: &str, _conn: ConnId, _clients: Vec<String>) -> bool {
        true
    }
    /// Redis could not be asked for `origin`'s message: an ordered publish
    /// failed, or a direct message's target could not be looked up.
    fn unavailable(&self, _origin: ConnId) -> bool {
        true
    }
}

/// A room's position and what a recovery replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The room's epoch (`none` when the store could not be asked).
    pub epoch: String,
    /// Its last offset.
    pub offset: u64,
    /// Every message after the client's `since` is in `messages`.
    pub recovered: bool,
    /// Those messages' JSON, in order.
    pub messages: Vec<String>,
    /// The join asked for recovery (`recovered` goes into `joined`).
    pub asked: bool,
}

/// This node as the registry describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalNode {
    /// Node id.
    pub node_id: String,
    /// URL clients use to reach it.
    pub url: String,
    /// Slotted connections per shard.
    pub shard_connections: Vec<usize>,
    /// Slots per shard.
    pub capacity_per_shard: usize,
    /// Upgrade latency p99, µs.
    pub handshake_p99_us: u64,
    /// Draining for shutdown.
    pub draining: bool,
    /// Unix seconds at start.
    pub started_at: u64,
    /// Connections per priority class (low, normal, high, critical).
    pub class_connections: [usize; 4],
}

impl LocalNode {
    /// Slotted connections in all.
    pub fn connections(&self) -> usize {
        self.shard_connections.iter().sum()
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.capacity_per_shard * self.shard_connections.len()
    }

    /// Every shard is full.
    pub fn full(&self) -> bool {
        self.shard_connections.iter().all(|c| *c >= self.capacity_per_shard)
    }
}

/// One sampled connection.
#[derive(Debug, Clone, Serialize)]
pub struct SampleEntry {
    /// Client id (or `echo` for /echo connections).
    pub client_id: String,
    /// Shard.
    pub shard: usize,
    /// Connection age, ms.
    pub age_ms: u64,
    /// Bytes queued for sending.
    pub queued_bytes: usize,
    /// Last measured ping round trip, µs (0 = not measured yet).
    pub rtt_us: u64,
}
