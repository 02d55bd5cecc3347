//! The cluster thread's loop: a current-thread tokio runtime that turns
//! shard events into batched Redis work, forwards what other nodes publish
//! to the shards' mailboxes, keeps the registry fresh once per interval, and
//! runs the circuit breaker.
//!
//! Nothing here is on a shard's path: shards only push events into a
//! bounded queue. A batch is whatever waited in that queue (up to
//! [`MAX_BATCH`]), so under load more events share one round trip.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::queue::{self, Budget, Rx};
use bytes::Bytes;

use super::backend::{Backend, ClusterError, Connector, Incoming, Op, Reply};
use super::breaker::Breaker;
use super::registry::{self, NodeInfo};
use super::state::State;
use super::{keys, ClusterCmd, ClusterStatus};
use crate::broker::Sink;
use crate::config::ClusterConfig;
use crate::runtime::table::ConnId;

/// Events handled per batch at most (one or two round trips each).
pub const MAX_BATCH: usize = 1024;
/// Direct messages waiting for their target's conn key at most; beyond
/// this, the sender is told `unknown_client` at once.
const MAX_PENDING_DIRECTS: usize = 4096;
/// Affinity lookups of new connections are gathered this long into one
/// round trip: at 2,000 connects/s that is ~100 round trips/s instead of
/// 2,000, for a hint that arrives at most 10 ms later (publishes and direct
/// messages do not wait; they take the waiting lookups along).
const AFFINITY_GATHER: Duration = Duration::from_millis(10);

/// Runs until [`ClusterCmd::Shutdown`] (or until every handle is gone).
pub fn run(config: ClusterConfig, me: String, sink: Arc<dyn Sink>, status: Arc<ClusterStatus>, rx: Rx<ClusterCmd>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return tracing::error!(error = %e, "cluster: cannot start its runtime; running alone"),
    };
    let connector = match super::redis_backend::RedisConnector::new(&config.redis_url) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cluster: bad Redis URL; running alone"),
    };
    rt.block_on(Worker::new(config, me, sink, status, connector).run(rx));
}

/// A direct message whose target's node is being looked up.
struct PendingDirect {
    to: Arc<str>,
    frame: Bytes,
    from: ConnId,
    deadline: Instant,
}

/// The cluster thread's state.
pub struct Worker<C: Connector> {
    config: ClusterConfig,
    sink: Arc<dyn Sink>,
    status: Arc<ClusterStatus>,
    connector: C,
    conn: Option<C::Conn>,
    /// Set when the incoming channel must be replaced (`Some(None)`: dropped).
    swap_incoming: Option<Option<Rx<Incoming>>>,
    breaker: Breaker,
    state: State,
    me: String,
    interval: Duration,
    ticks: u64,
    live: HashMap<String, NodeInfo>,
    retries: VecDeque<PendingDirect>,
    opened: Vec<(Arc<str>, ConnId)>,
    opened_due: Instant,
    ever_connected: bool,
    /// The incoming queue's budget, kept across reconnects.
    incoming: std::sync::Arc<Budget>,
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

async fn recv_incoming(rx: &mut Option<Rx<Incoming>>) -> Incoming {
    match rx {
        Some(rx) => rx.recv().await.unwrap_or(Incoming::Disconnected),
        None => std::future::pending().await,
    }
}

impl<C: Connector> Worker<C> {
    /// A worker for node `me` using `connector`, delivering to `sink` and
    /// reporting into `status`.
    pub fn new(
        config: ClusterConfig,
        me: String,
        sink: Arc<dyn Sink>,
        status: Arc<ClusterStatus>,
        connector: C,
    ) -> Self {
        Self {
            me,
            interval: Duration::from_millis(config.sync_interval_ms),
            status,
            connector,
            conn: None,
            swap_incoming: None,
            breaker: Breaker::new(Instant::now()),
            state: State::default(),
            ticks: 0,
            live: HashMap::new(),
            retries: VecDeque::new(),
            opened: Vec::new(),
            opened_due: Instant::now(),
            ever_connected: false,
            incoming: Budget::new(super::INCOMING_BYTES),
            config,
            sink,
        }
    }

    fn ms(&self, intervals: u64) -> u64 {
        self.interval.as_millis() as u64 * intervals
    }

    /// The loop.
    pub async fn run(mut self, mut rx: Rx<ClusterCmd>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval((self.interval / 4).max(Duration::from_millis(10)));
        let mut incoming: Option<Rx<Incoming>> = None;
        self.publish_view();
        loop {
            let reconnect_at = tokio::time::Instant::from_std(self.breaker.next_attempt());
            let disconnected = self.conn.is_none();
            let retrying = !self.retries.is_empty();
            let gathering = !self.opened.is_empty();
            let opened_due = tokio::time::Instant::from_std(self.opened_due);
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let mut batch = vec![cmd];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Some(c) => batch.push(c),
                            None => break,
                        }
                    }
                    if self.handle_batch(batch).await {
                        break;
                    }
                }
                msg = recv_incoming(&mut incoming) => self.on_incoming(msg),
                _ = tick.tick() => self.on_tick().await,
                _ = retry.tick(), if retrying => self.retry_directs().await,
                _ = tokio::time::sleep_until(reconnect_at), if disconnected => self.reconnect().await,
                _ = tokio::time::sleep_until(opened_due), if gathering => {
                    let opened = std::mem::take(&mut self.opened);
                    if self.connected() {
                        self.lookups(Vec::new(), opened, Vec::new()).await;
                    }
                }
            }
            if let Some(new) = self.swap_incoming.take() {
                incoming = new;
            }
        }
        self.deregister().await;
    }

    fn connected(&self) -> bool {
        self.conn.is_some() && self.breaker.is_closed()
    }

    /// Handles one batch of shard events; true on `Shutdown`.
    async fn handle_batch(&mut self, batch: Vec<ClusterCmd>) -> bool {
        let mut publishes = Vec::new();
        let mut directs = Vec::new();
        let mut stop = false;
        let now_secs = unix_secs();
        let deadline = Instant::now() + self.interval * 2 + Duration::from_millis(100);
        for cmd in batch {
            match cmd {
                ClusterCmd::ConnOpened { client_id, conn } => {
                    self.state.conn_opened(client_id.clone(), conn.shard(), now_secs);
                    if self.opened.is_empty() {
                        self.opened_due = Instant::now() + AFFINITY_GATHER;
                    }
                    self.opened.push((client_id, conn));
                }
                ClusterCmd::ConnClosed { client_id } => self.state.conn_closed(client_id),
                ClusterCmd::RoomInterest { shard, room, on } => self.state.room_interest(room, shard, on),
                ClusterCmd::Publish { room, payload } => publishes.push(Op::Publish {
                    channel: keys::room_channel(&room),
                    payload: keys::encode_room(&self.me, &payload),
                }),
                ClusterCmd::Direct { to, frame, from } => directs.push(PendingDirect { to, frame, from, deadline }),
                ClusterCmd::Sample { shard, entries } => self.state.sample(shard, entries, self.config.sample_size),
                ClusterCmd::Shutdown => stop = true,
            }
        }
        if !self.connected() {
            add(&self.status.publish_dropped, publishes.len() as u64);
            directs.into_iter().for_each(|d| self.unknown(d.from, d.to));
            self.opened.clear();
            return stop;
        }
        if !publishes.is_empty() || !directs.is_empty() {
            let opened = std::mem::take(&mut self.opened);
            self.lookups(publishes, opened, directs).await;
        }
        self.sync_rooms().await;
        stop
    }

    /// Publishes, affinity lookups and direct lookups of one batch, in one round trip.
    async fn lookups(&mut self, mut ops: Vec<Op>, opened: Vec<(Arc<str>, ConnId)>, directs: Vec<PendingDirect>) {
        let n_pub = ops.len();
        ops.extend(opened.iter().map(|(cid, _)| Op::Get { key: keys::affinity(cid) }));
        ops.extend(directs.iter().map(|d| Op::HGet { key: keys::conn(&d.to), field: "node" }));
        if ops.is_empty() {
            return;
        }
        let replies = match self.exec(&ops).await {
            Ok(r) => r,
            Err(_) => {
                add(&self.status.publish_dropped, n_pub as u64);
                directs.into_iter().for_each(|d| self.unknown(d.from, d.to));
                return;
            }
        };
        add(&self.status.published, n_pub as u64);
        let mut it = replies.into_iter().skip(n_pub);
        for (_, conn) in opened {
            let node = it.next().and_then(Reply::into_str);
            self.affinity_hint(conn, node);
        }
        let mut routes = Vec::new();
        for d in directs {
            let node = it.next().and_then(Reply::into_str);
            self.route_or_retry(d, node, &mut routes);
        }
        self.send_directs(routes).await;
    }

    /// Tells `conn` that its affinity node is another live one.
    fn affinity_hint(&self, conn: ConnId, node: Option<String>) {
        let Some(node) = node.filter(|n| *n != self.me) else { return };
        let Some(info) = self.live.get(&node) else { return };
        add(&self.status.affinity_hints, 1);
        let delivered = self.sink.affinity(conn, &node, &info.url);
        self.count_delivery(delivered);
    }

    fn route_or_retry(&mut self, d: PendingDirect, node: Option<String>, routes: &mut Vec<(String, PendingDirect)>) {
        match node {
            Some(n) if n != self.me && self.live.contains_key(&n) => routes.push((n, d)),
            // Not written yet (conn keys are batched), or stale: wait a little.
            _ => self.retry_or_unknown(d),
        }
    }

    /// Looks `d`'s target up again later, until its deadline.
    fn retry_or_unknown(&mut self, d: PendingDirect) {
        if Instant::now() < d.deadline && self.retries.len() < MAX_PENDING_DIRECTS {
            self.retries.push_back(d);
        } else {
            self.unknown(d.from, d.to);
        }
    }

    async fn send_directs(&mut self, routes: Vec<(String, PendingDirect)>) {
        if routes.is_empty() {
            return;
        }
        let ops: Vec<Op> = routes
            .iter()
            .map(|(node, d)| Op::Publish {
                channel: keys::inbox_channel(node),
                payload: keys::encode_direct(&self.me, &d.to, &d.frame),
            })
            .collect();
        match self.exec(&ops).await {
            Ok(replies) => {
                for ((_, d), r) in routes.into_iter().zip(replies) {
                    match r {
                        // Nobody listens on that inbox: the node just died and
                        // the client may be reconnecting elsewhere; look again.
                        Reply::Int(0) => self.retry_or_unknown(d),
                        _ => add(&self.status.directs_sent, 1),
                    }
                }
            }
            Err(_) => routes.into_iter().for_each(|(_, d)| self.unknown(d.from, d.to)),
        }
    }

    async fn retry_directs(&mut self) {
        let pending: Vec<PendingDirect> = self.retries.drain(..).collect();
        if !self.connected() {
            return pending.into_iter().for_each(|d| self.unknown(d.from, d.to));
        }
        self.lookups(Vec::new(), Vec::new(), pending).await;
    }

    fn unknown(&self, from: ConnId, to: Arc<str>) {
        add(&self.status.directs_unknown, 1);
        let delivered = self.sink.unknown_client(from, to);
        self.count_delivery(delivered);
    }

    /// Counts a message the sink could not hand to a shard (full mailbox).
    fn count_delivery(&self, delivered: bool) {
        if !delivered {
            add(&self.status.mailbox_full, 1);
        }
    }

    /// A message from another node (or the connection dropping).
    fn on_incoming(&mut self, msg: Incoming) {
        let (channel, payload) = match msg {
            Incoming::Message { channel, payload } => (channel, payload),
            Incoming::Disconnected => {
                return self.fail(ClusterError::Command("subscription connection dropped".into()))
            }
        };
        if let Some(room) = channel.strip_prefix(keys::ROOM_CHANNEL) {
            let Some((origin, body)) = keys::decode_room(&payload) else { return };
            if origin == self.me {
                return; // our own publish, already delivered locally
            }
            add(&self.status.remote_room_messages, 1);
            let delivered = self.sink.room(room, body);
            self.count_delivery(delivered);
        } else if channel.starts_with(keys::INBOX_CHANNEL) {
            let Some((_, to, frame)) = keys::decode_direct(&payload) else { return };
            add(&self.status.remote_direct_messages, 1);
            let delivered = self.sink.direct(to, frame);
            self.count_delivery(delivered);
        }
    }

    /// Once per interval: registry, pools, conn keys, sample, then read the live nodes.
    async fn on_tick(&mut self) {
        self.ticks += 1;
        if !self.connected() {
            return self.publish_view();
        }
        let local = self.sink.local();
        let me = registry::self_info(&local);
        let mut ops = registry::register_ops(&local, &me, self.ms(keys::NODE_TTL_INTERVALS));
        let affinity_ms = self.config.affinity_ttl_secs * 1000;
        let mut flush = self.state.take_flush(&self.me, self.ms(keys::CONN_TTL_INTERVALS), affinity_ms, self.ticks);
        ops.append(&mut flush.ops);
        if let Some(json) = self.state.sample_json() {
            let ttl_ms = self.ms(keys::NODE_TTL_INTERVALS);
            ops.push(Op::Set { key: keys::sample(&self.me), value: json.into_bytes(), ttl_ms });
        }
        ops.push(Op::SMembers { key: keys::NODES_SET.into() });
        let ids = match self.exec(&ops).await {
            Ok(mut r) => match r.pop() {
                Some(Reply::List(ids)) => ids,
                _ => Vec::new(),
            },
            Err(_) => return self.state.restore(flush),
        };
        self.read_nodes(ids).await;
        self.sync_rooms().await;
    }

    /// Reads every registered node's hash; drops the expired ones from the set.
    async fn read_nodes(&mut self, ids: Vec<String>) {
        let ops: Vec<Op> = ids.iter().map(|id| Op::HGetAll { key: keys::node(id) }).collect();
        let Ok(replies) = self.exec(&ops).await else { return };
        let mut live = HashMap::new();
        let mut gone = Vec::new();
        for (id, r) in ids.into_iter().zip(replies) {
            match r {
                Reply::Map(h) => match registry::parse_node(&id, &h) {
                    Some(info) => drop(live.insert(id, info)),
                    None => gone.push(Op::SRem { key: keys::NODES_SET.into(), member: id }),
                },
                _ => continue,
            }
        }
        self.live = live;
        self.publish_view();
        if !gone.is_empty() {
            let _ = self.exec(&gone).await;
        }
    }

    /// Subscribes and unsubscribes room channels to match local interest.
    async fn sync_rooms(&mut self) {
        let (on, off) = self.state.room_changes();
        if on.is_empty() && off.is_empty() {
            return;
        }
        let Some(conn) = self.conn.as_mut() else { return self.state.retry_rooms(on.into_iter().chain(off)) };
        let chans = |rooms: &[Arc<str>]| rooms.iter().map(|r| keys::room_channel(r)).collect::<Vec<_>>();
        add(&self.status.redis_commands, (on.len() + off.len()) as u64);
        add(&self.status.redis_batches, 1);
        let r = match conn.subscribe(&chans(&on)).await {
            Ok(()) => {
                self.state.subscribed(&on, true);
                conn.unsubscribe(&chans(&off)).await.map(|()| self.state.subscribed(&off, false))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.state.retry_rooms(on.into_iter().chain(off));
            self.fail(e);
        }
    }

    /// Runs `ops` in one round trip, counting commands; a failure opens the breaker.
    async fn exec(&mut self, ops: &[Op]) -> Result<Vec<Reply>, ClusterError> {
        let Some(conn) = self.conn.as_mut() else { return Err(ClusterError::Command("not connected".into())) };
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        add(&self.status.redis_commands, ops.iter().map(Op::commands).sum());
        add(&self.status.redis_batches, 1);
        let r = conn.exec(ops).await;
        if let Err(e) = &r {
            self.fail(e.clone());
        }
        r
    }

    /// Redis failed: open the breaker, drop the connection, fail what waits.
    fn fail(&mut self, e: ClusterError) {
        add(&self.status.redis_errors, 1);
        if self.conn.take().is_some() {
            tracing::warn!(error = %e, "Redis down: breaker open, cross-node operations fail fast until it is back");
            self.swap_incoming = Some(None);
            self.breaker.on_failure(Instant::now());
        }
        let pending: Vec<PendingDirect> = self.retries.drain(..).collect();
        pending.into_iter().for_each(|d| self.unknown(d.from, d.to));
        self.publish_view();
    }

    /// One reconnect attempt (the breaker says when); on success the node
    /// re-registers itself, its pools, its connections and its rooms.
    async fn reconnect(&mut self) {
        if !self.breaker.begin_attempt(Instant::now()) {
            return;
        }
        self.publish_view();
        let (tx, rx) = queue::queue_with(self.incoming.clone());
        let mut conn = match self.connector.connect(tx).await {
            Ok(c) => c,
            Err(e) => {
                add(&self.status.redis_errors, 1);
                if self.breaker.failures() == 0 {
                    tracing::warn!(error = %e, "Redis unreachable; retrying with backoff");
                }
                self.breaker.on_failure(Instant::now());
                return self.publish_view();
            }
        };
        add(&self.status.redis_commands, 1);
        if let Err(e) = conn.subscribe(&[keys::inbox_channel(&self.me)]).await {
            add(&self.status.redis_errors, 1);
            tracing::warn!(error = %e, "Redis: inbox subscribe failed");
            self.breaker.on_failure(Instant::now());
            return self.publish_view();
        }
        self.conn = Some(conn);
        self.swap_incoming = Some(Some(rx));
        self.breaker.on_success();
        self.state.mark_all_dirty();
        if !self.ever_connected {
            tracing::info!(node = %self.me, "Redis up");
        }
        if self.ever_connected {
            add(&self.status.reregistrations, 1);
            tracing::info!("Redis is back; re-registering");
        }
        self.ever_connected = true;
        self.on_tick().await;
    }

    /// Graceful stop: remove this node's keys and its clients' conn keys.
    async fn deregister(&mut self) {
        if !self.connected() {
            return;
        }
        let mut ops = registry::deregister_ops(&self.me, self.sink.local().shard_connections.len());
        let affinity_ms = self.config.affinity_ttl_secs * 1000;
        for cid in self.state.clients.keys() {
            ops.push(Op::DelIfNode { key: keys::conn(cid), node: self.me.clone() });
            ops.push(Op::Set { key: keys::affinity(cid), value: self.me.as_bytes().to_vec(), ttl_ms: affinity_ms });
        }
        let _ = self.exec(&ops).await;
    }

    /// Publishes the breaker state and the `/cluster` view.
    fn publish_view(&self) {
        let dropped = self.incoming.dropped.load(Ordering::Relaxed);
        self.status.incoming_dropped.store(dropped, Ordering::Relaxed);
        self.status.breaker.store(self.breaker.state() as u8, Ordering::Relaxed);
        self.status.subscribed_rooms.store(self.state.subscribed_count() as u64, Ordering::Relaxed);
        let redis = self.breaker.state().name();
        let view = if self.connected() && !self.live.is_empty() {
            let mut nodes: Vec<NodeInfo> = self.live.values().cloned().collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            registry::cluster_json(&self.me, redis, &nodes, false)
        } else {
            registry::cluster_json(&self.me, redis, &[registry::self_info(&self.sink.local())], true)
        };
        if let Ok(mut v) = self.status.nodes_json.lock() {
            *v = view;
        }
    }
}

#[cfg(test)]
mod tests;
