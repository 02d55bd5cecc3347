//! Connection runtime: shards, the slab table, mailboxes, timers, byte
//! budgets and the one close path. It drives the [`crate::transport`] and
//! serves an [`App`], which it knows only through that trait.
//!
//! - [`shard`]: one shard's state and the operations on connections
//!   (offer, close, remove), implementing [`Conns`] for the application.
//! - [`session`]: one connection's life: HTTP head, upgrade, read loop,
//!   writer, lingering close.
//! - [`accept`]: the SO_REUSEPORT accept loop and hand-off to the least
//!   loaded shard.
//! - [`sweep`]: the per-shard timer sweep.
//! - [`table`], [`mailbox`], [`metrics`]: the slab, the cross-shard
//!   channel, and the single-writer counters.

pub mod accept;

/// What returns a shard thread's freed memory to the system (the binary's
/// allocator sets it: [`set_heap_collect`]); `None` in library use.
static HEAP_COLLECT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Installs `f`, called on a shard thread after its idle readers retired:
/// an allocator that purges freed pages only while its thread allocates
/// (mimalloc) would otherwise keep a quiet shard's freed pages resident.
pub fn set_heap_collect(f: fn()) {
    let _ = HEAP_COLLECT.set(f);
}

fn collect_heap() {
    if let Some(f) = HEAP_COLLECT.get() {
        f();
    }
}
pub mod handover;
pub mod idle;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod priority;
pub mod session;
pub mod shard;
pub mod sweep;
pub mod table;
pub mod thread;

use std::sync::atomic::{AtomicBool, Ordering};

use tungstenite::Message;

use crate::config::Config;
use crate::transport::http::Rejection;
use mailbox::{MailboxError, MailboxSender};
use metrics::ShardMetrics;
use table::ConnId;

/// What happened to a message offered to a connection's send queue.
/// Backpressure is a return value, never a silent drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued; it will be written in order.
    Queued,
    /// The queue was full and the policy is `drop`: this message is lost for
    /// this connection (counted).
    Dropped,
    /// The queue was full and the policy is `close`: the connection is being
    /// closed with 1008. Also returned for a connection that is already closing.
    Closed,
    /// No such connection (closed, or a stale id).
    Gone,
}

/// The application's answer to a request head.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The head is not complete yet: read more.
    NeedMore,
    /// Send these bytes, then close. `rejected` says why, if it is a refusal.
    Respond {
        /// A complete HTTP response.
        bytes: Vec<u8>,
        /// The refusal reason (counted), or `None` for a served endpoint.
        rejected: Option<Rejection>,
    },
    /// Upgrade: send `response` (the 101), then speak WebSocket, once a
    /// slot is free for `class` (waiting or preempting if need be).
    Upgrade {
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the head; anything after belongs to the WebSocket.
        consumed: usize,
        /// The connection's priority class.
        class: crate::config::Class,
    },
    /// Not yet: await this (the application is asking someone, without
    /// blocking the shard), then call `on_request` again with the same
    /// head. Bounded by the handshake timeout: past it the upgrade is
    /// answered 503 without asking again.
    Wait(Deferred),
}

/// A future the runtime awaits before asking the application again.
pub struct Deferred(pub std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>);

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}

impl PartialEq for Deferred {
    /// Two waits are never the same.
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The client address (the proxy's PROXY header already applied).
    pub client: std::net::IpAddr,
    /// The socket peer is a trusted proxy (`X-Forwarded-For` may be believed).
    pub via_proxy: bool,
    /// Accepted on `server.admin_listen`.
    pub admin: bool,
}

/// One connection as the sweeper sampled it (for the cluster sample).
#[derive(Debug, Clone, Copy)]
pub struct Sampled {
    /// The connection.
    pub id: ConnId,
    /// Age, ms.
    pub age_ms: u64,
    /// Bytes queued or in flight.
    pub queued_bytes: usize,
    /// Last ping round trip, µs (0 = none yet).
    pub rtt_us: u32,
    /// A server ping is outstanding.
    pub ping_outstanding: bool,
}

/// What the runtime calls on the application. One value per shard, owned by
/// the shard thread. Every hook gets the narrow [`Conns`] interface, so the
/// application can be driven in unit tests by an in-memory implementation.
pub trait App: Sized + 'static {
    /// What other shards and threads send this application (rooms, directs).
    type Msg: Send + mailbox::Weigh + 'static;
    /// Per-connection application state, kept in the connection's table entry.
    type Conn: Default + 'static;

    /// A request head arrived (possibly incomplete: `head` is everything read
    /// so far). Route it, answer it or accept the upgrade.
    fn on_request<C: Conns<Self>>(&self, cx: &C, id: ConnId, head: &[u8]) -> Answer;
    /// The upgrade was accepted; the 101 is queued and not yet written, so
    /// whatever this queues goes out in the same write.
    fn on_open<C: Conns<Self>>(&self, cx: &C, id: ConnId);
    /// A complete text or binary message arrived.
    fn on_message<C: Conns<Self>>(&self, cx: &C, id: ConnId, msg: Message);
    /// The connection is gone (after the close); its state is handed back.
    fn on_close<C: Conns<Self>>(&self, cx: &C, id: ConnId, state: Self::Conn);
    /// A message from the mailbox.
    fn on_mail<C: Conns<Self>>(&self, cx: &C, msg: Self::Msg);
    /// Once per sweep, after the timers. Returns connections to ping now.
    fn on_sweep<C: Conns<Self>>(&self, cx: &C) -> Vec<ConnId>;
    /// `id` is preempted for an upgrade of a higher class: tell it, then
    /// close it (4004).
    fn on_preempt<C: Conns<Self>>(&self, cx: &C, id: ConnId);
    /// The node drains and it is `id`'s turn: queue a reconnect hint if the
    /// connection's protocol has one (true), or do nothing (false; it gets
    /// 1001 at the end of the drain).
    fn on_drain<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> bool;
    /// Upgrade (old process): `id` moves to the new process; its state as
    /// bytes for [`App::on_resume`], or `None` when it cannot move yet (an
    /// answer is outstanding: asked again a moment later; past the
    /// handover's deadline it is hinted and closed). Nothing is torn down:
    /// this process ends.
    fn on_handover<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> Option<Vec<u8>>;
    /// Upgrade (new process): `id` arrived from the old process with
    /// `state` (from [`App::on_handover`]); restore it, quietly (the peer
    /// saw nothing happen).
    fn on_resume<C: Conns<Self>>(&self, cx: &C, id: ConnId, state: &[u8]);
    /// Upgrade (old process): the shard's own state that must move too
    /// (room histories), one blob each, for the new process's application.
    fn handover_shard<C: Conns<Self>>(&self, cx: &C) -> Vec<Vec<u8>>;
    /// Upgrade (old process): `id` cannot move; tell it (hint), it is
    /// closed 1001 next.
    fn on_upgrade_close<C: Conns<Self>>(&self, cx: &C, id: ConnId);
}

/// What the application may do with the connections of its shard: the only
/// way it reaches the runtime.
pub trait Conns<A: App> {
    /// This shard's index.
    fn shard_id(&self) -> usize;
    /// The node's shared state (config, other shards' mailboxes and gauges).
    fn node(&self) -> &NodeState<A::Msg>;
    /// Offers `len` bytes, written by `write`, to `id`'s send queue; the size
    /// check comes first, so a full queue costs no copy.
    fn offer(&self, id: ConnId, len: usize, write: impl FnOnce(&mut Vec<u8>)) -> SendOutcome;
    /// Starts the close handshake with `code` and `reason`.
    fn close(&self, id: ConnId, code: u16, reason: &'static str);
    /// Sends to shard `to` (this one included: its own mailbox keeps order).
    fn send_to(&self, to: usize, msg: A::Msg) -> Result<(), MailboxError>;
    /// Runs `f` on `id`'s application state, if `id` is current. `f` must not
    /// call back into `Conns` (the table is borrowed while it runs).
    fn state<R>(&self, id: ConnId, f: impl FnOnce(&mut A::Conn) -> R) -> Option<R>;
    /// `Some(reason)` when an upgrade of `id` must be refused now (full, draining).
    fn admission(&self, id: ConnId) -> Option<Rejection>;
    /// Up to `k` open connections, uniformly sampled.
    fn sample(&self, k: usize) -> Vec<Sampled>;
    /// Up to `k` open WebSockets whose state passes `keep`, least recently
    /// active first (rebalancing moves these).
    fn least_active(&self, k: usize, keep: impl Fn(&A::Conn) -> bool) -> Vec<ConnId>;
    /// The shard's coarse clock, ms.
    fn now_ms(&self) -> u64;
    /// The connection's client address, whether it came from a trusted proxy,
    /// and whether it came in on the internal listener.
    fn peer(&self, id: ConnId) -> Option<Peer>;
    /// Applies the per-address limits to `id` as coming from `ip` (once; the
    /// application calls it for connections from a trusted proxy, after
    /// reading `X-Forwarded-For`). `Err((reason, retry_after_secs))` when refused.
    fn admit_ip(&self, id: ConnId, ip: std::net::IpAddr) -> Result<(), (Rejection, u32)>;

    /// Queues a pre-built frame.
    fn send_frame(&self, id: ConnId, frame: &[u8]) -> SendOutcome {
        self.offer(id, frame.len(), |out| out.extend_from_slice(frame))
    }

    /// Frames `payload` as text and queues it.
    fn send_text(&self, id: ConnId, payload: &str) -> SendOutcome {
        let len = payload.len() + crate::transport::frame::MAX_HEADER;
        self.offer(id, len, |out| crate::transport::frame::push_text(out, payload.as_bytes()))
    }
}

/// What every shard (and the main thread) shares: configuration, identity,
/// and each shard's mailbox and metrics. Nothing here is locked on the
/// delivery path.
pub struct NodeState<M> {
    /// Effective configuration.
    pub config: Config,
    /// This node's id.
    pub node_id: String,
    /// URL clients use to reach this node.
    pub advertise_url: String,
    /// Slots per shard after the fd-limit cap.
    pub capacity_per_shard: usize,
    /// One handle per shard, index = shard id.
    pub shards: Vec<ShardHandle<M>>,
    /// Set once on SIGTERM/SIGINT.
    pub draining: AtomicBool,
    /// Set when this process hands its connections to a new one
    /// (zero-disconnect upgrade): its stop is then not a drain.
    pub handed_over: AtomicBool,
    /// Unix seconds at start.
    pub started_at: u64,
    /// Per-address limits shared by all shards (`None` when both are off).
    pub ip_table: Option<std::sync::Arc<limits::IpTable>>,
    /// Peers whose PROXY header and `X-Forwarded-For` are believed.
    pub trusted: crate::transport::proxy::Trusted,
    /// Connections per priority class, node-wide.
    pub classes: priority::ClassCounts,
}

/// A shard as seen from outside: its mailbox and its metrics.
pub struct ShardHandle<M> {
    /// Where to send it messages.
    pub mailbox: MailboxSender<M>,
    /// Its counters (read-only from other threads).
    pub metrics: ShardMetrics,
}

impl<M> NodeState<M> {
    /// The least-loaded shard other than `except` with a free slot.
    pub fn least_loaded_with_room(&self, except: usize) -> Option<usize> {
        self.shards
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != except)
            .map(|(i, s)| (s.metrics.connections.load(Ordering::Relaxed), i))
            .filter(|(load, _)| *load < self.capacity_per_shard)
            .min()
            .map(|(_, i)| i)
    }

    /// True when every shard's slots are taken.
    pub fn all_full(&self) -> bool {
        self.shards.iter().all(|s| s.metrics.connections.load(Ordering::Relaxed) >= self.capacity_per_shard)
    }

    /// True once shutdown started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Total slotted connections.
    pub fn connections(&self) -> usize {
        self.shards.iter().map(|s| s.metrics.connections.load(Ordering::Relaxed)).sum()
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.capacity_per_shard * self.shards.len()
    }

    /// Every shard's metrics.
    pub fn metrics(&self) -> Vec<&ShardMetrics> {
        self.shards.iter().map(|s| &s.metrics).collect()
    }
}
