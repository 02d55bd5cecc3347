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
use crate::broker::{Recovery, Sink};
use crate::config::ClusterConfig;
use crate::runtime::table::ConnId;

/// Events handled per batch at most (one or two round trips each).
pub const MAX_BATCH: usize = 1024;
/// Direct messages waiting for their target's conn key at most; beyond
/// this, the sender is told `unknown_client` at once.
const MAX_PENDING_DIRECTS: usize = 4096;
/// Most rooms an upgrade hands floors over for (one entry per room with
/// history that a handed-over session was in).
const MAX_RESUME_FLOORS: usize = 65_536;
/// Longest a new process holds its room subscriptions back waiting for the
/// handed-over sessions' floors (the upgrade thread sends them once the old
/// process is done, or gone; this only bounds a thread that never does).
pub const RESUME_HOLD: Duration = Duration::from_secs(30);
/// Affinity lookups of new connections are gathered this long into one
/// round trip: at 2,000 connects/s that is ~100 round trips/s instead of
/// 2,000, for a hint that arrives at most 10 ms later (publishes and direct
/// messages do not wait; they take the waiting lookups along).
const AFFINITY_GATHER: Duration = Duration::from_millis(10);

/// After a batch's grace, the time its last closes may take (the close
/// handshake's default timeout, 2 s, and a margin) before the registry
/// shows them gone and the next batch to the same peer may start.
pub const MIGRATE_SETTLE_MS: u64 = 3_000;

/// Seed 000's rule: how many clients an overloaded node moves,
/// ceil((current − capacity × 0.8) / 2), 0 when at or under 80 %.
pub fn rebalance_count(current: u64, capacity: u64) -> usize {
    let over = current as f64 - capacity as f64 * 0.8;
    if over <= 0.0 {
        0
    } else {
        (over / 2.0).ceil() as usize
    }
}

/// Runs until [`ClusterCmd::Shutdown`] (or until every handle is gone).
pub fn run(config: ClusterConfig, me: String, sink: Arc<dyn Sink>, status: Arc<ClusterStatus>, rx: Rx<ClusterCmd>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return tracing::error!(error = %e, "cluster: cannot start its runtime; running alone"),
    };
    let connector = match super::redis_backend::RedisConnector::new(&config.redis_url, config.redis_mode) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cluster: bad Redis URL; running alone"),
    };
    rt.block_on(Worker::new(config, me, sink, status, connector).run(rx));
}

/// A direct message whose target's node is being looked up.
#[derive(Clone)]
struct PendingDirect {
    to: Arc<str>,
    frame: Bytes,
    from: ConnId,
    /// The target's sessions here already got it: never `unknown_client`.
    delivered_here: bool,
    deadline: Instant,
}

/// A join of a room with history: (room, connection, since, ttl ms).
type PendingRecover = (Arc<str>, ConnId, Option<(u64, Box<str>)>, u64);

/// A session opened here, waiting for its sessions-set write.
struct Opened {
    client_id: Arc<str>,
    conn: ConnId,
    keep: usize,
    score: u64,
    named: bool,
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
    /// Rebalance targets with a batch in flight → until when.
    moving: HashMap<String, Instant>,
    /// When the last rebalance batch started: at most one a second, so
    /// `cluster.migrate_rate` bounds the moves per second whatever the
    /// interval and however many peers have room.
    last_rebalance: Option<Instant>,
    retries: VecDeque<PendingDirect>,
    opened: Vec<Opened>,
    opened_due: Instant,
    /// Orders sessions opened here within one millisecond.
    session_seq: u64,
    /// Base and counter of ordered publishes' sequence numbers.
    publish_base: u64,
    publish_seq: u64,
    /// Rooms with history seen on the subscription: (epoch, last offset
    /// forwarded). Duplicates are dropped; a gap is repaired from the
    /// room's stream before anything newer is forwarded.
    ordered: HashMap<Arc<str>, (String, u64)>,
    /// Rooms with history nothing was forwarded for yet, since their
    /// subscription started: the lowest offset a join's recovery answered
    /// (every local member has what lies up to it). The first message off the
    /// subscription is checked against it, so one the new subscription
    /// missed (published between the answer and the SUBSCRIBE) is fetched.
    recovered_floor: HashMap<Arc<str>, (String, u64)>,
    /// Rooms whose gap is being repaired: (room, epoch, last forwarded).
    repairs: Vec<(Arc<str>, String, u64)>,
    /// After a zero-disconnect upgrade: rooms with history → (epoch, lowest
    /// offset the sessions that came over had got), repaired from there
    /// once subscribed. Bounded by [`MAX_RESUME_FLOORS`].
    resume_floors: HashMap<Arc<str>, (String, u64)>,
    /// A zero-disconnect upgrade is bringing sessions in: no room is
    /// subscribed until their floors arrived (or this deadline passed), so
    /// that each room's repair starts from the lowest of them.
    hold_rooms_until: Option<Instant>,
    /// The node id was taken over by a new process: no registry writes.
    handed_over: bool,
    /// Prompt writes (`ZREM`s of closed sessions, presence entries), sent
    /// with the next round trip.
    closes: Vec<Op>,
    ever_connected: bool,
    /// The incoming queue's budget, kept across reconnects.
    incoming: std::sync::Arc<Budget>,
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh epoch for a room's history: 16 hex digits.
fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
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
            moving: HashMap::new(),
            last_rebalance: None,
            retries: VecDeque::new(),
            opened: Vec::new(),
            opened_due: Instant::now(),
            session_seq: 0,
            publish_base: unix_secs() * 1_000_000,
            publish_seq: 0,
            closes: Vec::new(),
            ordered: HashMap::new(),
            recovered_floor: HashMap::new(),
            repairs: Vec::new(),
            resume_floors: HashMap::new(),
            hold_rooms_until: None,
            handed_over: false,
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
                msg = recv_incoming(&mut incoming) => {
                    self.on_incoming(msg);
                    self.repair().await;
                }
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
        let mut ordered = Vec::new();
        let mut recovers = Vec::new();
        let mut queries = Vec::new();
        let mut stop = false;
        let now_secs = unix_secs();
        let deadline = Instant::now() + self.interval * 2 + Duration::from_millis(100);
        for cmd in batch {
            match cmd {
                ClusterCmd::ConnOpened { client_id, conn, keep, named } => {
                    let score = self.next_score();
                    self.state.conn_opened(client_id.clone(), conn, score, now_secs, named);
                    if self.opened.is_empty() {
                        self.opened_due = Instant::now() + AFFINITY_GATHER;
                    }
                    self.opened.push(Opened { client_id, conn, keep, score, named });
                }
                ClusterCmd::ConnClosed { client_id, conn } => {
                    let (key, member) = (keys::sessions(&client_id), keys::session_member(&self.me, conn.raw()));
                    self.state.conn_closed(client_id, conn);
                    if self.closes.len() < MAX_PENDING_DIRECTS * 16 {
                        self.closes.push(Op::ZRem { key, member });
                    }
                }
                ClusterCmd::RoomInterest { shard, room, on } => self.state.room_interest(room, shard, on),
                ClusterCmd::Publish { room, payload } => publishes.push(Op::Publish {
                    channel: keys::room_channel(&room),
                    payload: keys::encode_room(&self.me, &payload),
                }),
                ClusterCmd::PublishOrdered { room, prefix, origin, size, ttl_ms } => {
                    let op = Op::HistoryPublish {
                        seq: keys::history_seq(&room),
                        stream: keys::history_stream(&room),
                        channel: keys::room_channel(&room),
                        header: keys::ordered_header(&self.me, origin.raw()),
                        prefix,
                        size,
                        ttl_ms,
                        new_epoch: new_epoch(),
                        node: self.me.clone(),
                        node_seq: self.next_publish_seq(),
                    };
                    ordered.push((op, origin));
                }
                ClusterCmd::Recover { room, conn, since, ttl_ms } => recovers.push((room, conn, since, ttl_ms)),
                ClusterCmd::PresenceChanged { room, client, on } => {
                    self.state.presence_changed(&room, &client, on);
                    let (key, field) = (keys::presence(&room), format!("{client}|{}", self.me));
                    let ttl_ms = self.ms(keys::CONN_TTL_INTERVALS);
                    if self.closes.len() < MAX_PENDING_DIRECTS * 16 {
                        self.closes.push(match on {
                            true => Op::HSetField { key, field, value: "1".into(), ttl_ms },
                            false => Op::HDel { key, field },
                        });
                    }
                }
                ClusterCmd::PresenceQuery { room, conn } => queries.push((room, conn)),
                ClusterCmd::Direct { to, frame, from, delivered_here } => {
                    directs.push(PendingDirect { to, frame, from, delivered_here, deadline })
                }
                ClusterCmd::Sample { shard, entries } => self.state.sample(shard, entries, self.config.sample_size),
                ClusterCmd::Moved { client_id, target, reason } => {
                    if let Ok(mut m) = self.status.moves.lock() {
                        *m.entry((target.clone(), reason)).or_insert(0) += 1;
                    }
                    self.state.moved(client_id, target);
                }
                ClusterCmd::HandedOver => self.handed_over = true,
                ClusterCmd::ResumeExpected => self.hold_rooms_until = Some(Instant::now() + RESUME_HOLD),
                ClusterCmd::ResumeFloors { floors } => {
                    // Subscribed at the end of this batch, repaired from these.
                    self.hold_rooms_until = None;
                    for (room, epoch, offset) in floors {
                        if self.resume_floors.len() >= MAX_RESUME_FLOORS {
                            break;
                        }
                        let e = self.resume_floors.entry(Arc::from(room)).or_insert((epoch.clone(), offset));
                        if e.0 == epoch {
                            e.1 = e.1.min(offset);
                        }
                    }
                }
                ClusterCmd::Shutdown => stop = true,
            }
        }
        self.history(ordered, recovers).await;
        self.presence_queries(queries).await;
        if !self.connected() {
            add(&self.status.publish_dropped, publishes.len() as u64);
            directs.into_iter().for_each(|d| self.unreachable(d));
            self.opened.clear();
            self.closes.clear();
            return stop;
        }
        if !publishes.is_empty() || !directs.is_empty() || !self.closes.is_empty() {
            let opened = std::mem::take(&mut self.opened);
            self.lookups(publishes, opened, directs).await;
        }
        self.sync_rooms().await;
        stop
    }

    /// Publishes, session writes, affinity lookups and direct lookups of one
    /// batch, in one round trip.
    async fn lookups(&mut self, mut ops: Vec<Op>, opened: Vec<Opened>, directs: Vec<PendingDirect>) {
        let n_pub = ops.len();
        let closes = std::mem::take(&mut self.closes);
        let n_writes = n_pub + closes.len();
        ops.extend(closes);
        let ttl_ms = self.ms(keys::CONN_TTL_INTERVALS);
        for o in &opened {
            // A generated id has no affinity to look up.
            if o.named {
                ops.push(Op::Get { key: keys::affinity(&o.client_id) });
            }
            let (key, member) = (keys::sessions(&o.client_id), keys::session_member(&self.me, o.conn.raw()));
            ops.push(Op::SessionOpen { key, member, score: o.score, ttl_ms });
        }
        ops.extend(directs.iter().map(|d| Op::ZRange { key: keys::sessions(&d.to) }));
        if ops.is_empty() {
            return;
        }
        let replies = match self.exec(&ops).await {
            Ok(r) => r,
            Err(_) => {
                add(&self.status.publish_dropped, n_pub as u64);
                directs.into_iter().for_each(|d| self.unreachable(d));
                return;
            }
        };
        add(&self.status.published, n_pub as u64);
        let mut it = replies.into_iter().skip(n_writes);
        let mut follow = Vec::new();
        for o in opened {
            let node = if o.named { it.next().and_then(Reply::into_str) } else { None };
            self.affinity_hint(o.conn, node);
            if let Some(Reply::List(members)) = it.next() {
                self.enforce_sessions(&o, members, &mut follow);
            }
        }
        let mut routes = Vec::new();
        for d in directs {
            let members = match it.next() {
                Some(Reply::List(m)) => m,
                _ => Vec::new(),
            };
            self.route_or_retry(d, members, &mut routes);
        }
        if !follow.is_empty() {
            let _ = self.exec(&follow).await;
        }
        self.send_directs(routes).await;
    }

    /// After `o` opened: closes the client's oldest live sessions past
    /// `o.keep` in the whole cluster (here through the sink, elsewhere
    /// through their node's inbox) and forgets members of dead nodes.
    fn enforce_sessions(&mut self, o: &Opened, members: Vec<String>, follow: &mut Vec<Op>) {
        let key = keys::sessions(&o.client_id);
        let mut live = Vec::with_capacity(members.len());
        for m in members {
            match keys::parse_session_member(&m) {
                Some((node, conn)) if node == self.me || self.live.contains_key(node) => {
                    live.push((node.to_string(), conn, m))
                }
                _ => follow.push(Op::ZRem { key: key.clone(), member: m }),
            }
        }
        let past = live.len().saturating_sub(o.keep.max(1));
        for (node, conn, member) in live.into_iter().take(past) {
            if conn == o.conn.raw() && node == self.me {
                continue; // never the session that just opened
            }
            add(&self.status.sessions_replaced, 1);
            if node == self.me {
                let delivered = self.sink.replaced(&o.client_id, ConnId::from_raw(conn));
                self.count_delivery(delivered);
            } else {
                let payload = keys::encode_replace(&self.me, &o.client_id, conn);
                follow.push(Op::Publish { channel: keys::inbox_channel(&node), payload });
            }
            follow.push(Op::ZRem { key: key.clone(), member });
        }
    }

    /// The next ordered publish's sequence number: seconds at start × 10⁶
    /// plus a counter, so a restarted node (same id) continues above its
    /// previous numbers, within the 2⁵³ that Lua compares exactly.
    fn next_publish_seq(&mut self) -> u64 {
        self.publish_seq += 1;
        self.publish_base + self.publish_seq
    }

    /// A sessions-set score: unix ms × 1000 plus a sequence, so that the
    /// sessions this node opens keep their order within a millisecond.
    fn next_score(&mut self) -> u64 {
        let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.session_seq = (self.session_seq + 1) % 1000;
        ms * 1000 + self.session_seq
    }

    /// Ordered publishes and recoveries of rooms with history, in one round
    /// trip. While it runs nothing from the subscription is forwarded, so
    /// a recovery's answer reaches the member's shard before any message
    /// numbered after it (the shard drops the ones it already covers).
    async fn history(&mut self, ordered: Vec<(Op, ConnId)>, recovers: Vec<PendingRecover>) {
        if ordered.is_empty() && recovers.is_empty() {
            return;
        }
        let mut ops: Vec<Op> = ordered.iter().map(|(op, _)| op.clone()).collect();
        ops.extend(recovers.iter().map(|(room, _, since, ttl_ms)| Op::HistoryRecover {
            seq: keys::history_seq(room),
            stream: keys::history_stream(room),
            since: since.as_ref().map(|(o, e)| (*o, e.to_string())),
            ttl_ms: *ttl_ms,
            new_epoch: new_epoch(),
        }));
        let replies = if self.connected() { self.exec(&ops).await.ok() } else { None };
        let mut replies = replies.map(Vec::into_iter);
        for (_, origin) in &ordered {
            match replies.as_mut().and_then(Iterator::next) {
                Some(Reply::Int(_)) => add(&self.status.published, 1),
                _ => {
                    add(&self.status.publish_dropped, 1);
                    let told = self.sink.unavailable(*origin);
                    self.count_delivery(told);
                }
            }
        }
        for (room, conn, since, _) in recovers {
            let asked = since.is_some();
            let r = match replies.as_mut().and_then(Iterator::next) {
                Some(Reply::Recovery(epoch, offset, recovered, messages)) => {
                    if !self.ordered.contains_key(&room) && !epoch.is_empty() {
                        let floor = self.recovered_floor.entry(room.clone()).or_insert((epoch.clone(), offset));
                        *floor = if floor.0 == epoch {
                            (epoch.clone(), floor.1.min(offset))
                        } else {
                            (epoch.clone(), offset)
                        };
                    }
                    Recovery { epoch, offset, recovered, messages, asked }
                }
                // Redis away: the join stands, nothing can be recovered.
                _ => Recovery { epoch: "none".into(), offset: 0, recovered: false, messages: Vec::new(), asked },
            };
            let delivered = self.sink.recovered(&room, conn, r);
            self.count_delivery(delivered);
        }
    }

    /// Answers presence queries from the rooms' hashes, skipping (and
    /// removing) entries of nodes that are not live: a node that died drops
    /// out within its registry TTL (3 intervals).
    async fn presence_queries(&mut self, queries: Vec<(Arc<str>, ConnId)>) {
        if queries.is_empty() {
            return;
        }
        let ops: Vec<Op> = queries.iter().map(|(room, _)| Op::HGetAll { key: keys::presence(room) }).collect();
        let replies = if self.connected() { self.exec(&ops).await.ok() } else { None };
        let mut replies = replies.map(Vec::into_iter);
        let mut stale = Vec::new();
        for (room, conn) in queries {
            let mut clients = Vec::new();
            if let Some(Reply::Map(h)) = replies.as_mut().and_then(Iterator::next) {
                for field in h.into_keys() {
                    match field.rsplit_once('|') {
                        Some((c, node)) if node == self.me || self.live.contains_key(node) => {
                            clients.push(c.to_string())
                        }
                        _ => stale.push(Op::HDel { key: keys::presence(&room), field }),
                    }
                }
            } else {
                // Redis away: this node's own view.
                clients = self.state.present(&room);
            }
            let delivered = self.sink.presence(&room, conn, clients);
            self.count_delivery(delivered);
        }
        if !stale.is_empty() {
            let _ = self.exec(&stale).await;
        }
    }

    /// Tells `conn` that its affinity node is another live one.
    fn affinity_hint(&self, conn: ConnId, node: Option<String>) {
        let Some(node) = node.filter(|n| *n != self.me) else { return };
        let Some(info) = self.live.get(&node) else { return };
        add(&self.status.affinity_hints, 1);
        let delivered = self.sink.affinity(conn, &node, &info.url);
        self.count_delivery(delivered);
    }

    /// Routes `d` to every live node other than this one that has a session
    /// of its target; with none, looks again later (the sessions write may
    /// not have landed yet) unless the target's sessions here got it.
    fn route_or_retry(
        &mut self,
        d: PendingDirect,
        members: Vec<String>,
        routes: &mut Vec<(String, PendingDirect, bool)>,
    ) {
        let mut nodes: Vec<&str> = members
            .iter()
            .filter_map(|m| keys::parse_session_member(m).map(|(n, _)| n))
            .filter(|n| *n != self.me && self.live.contains_key(*n))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        match nodes.len() {
            0 if d.delivered_here => {}
            0 => self.retry_or_unknown(d),
            1 => routes.push((nodes[0].to_string(), d, true)),
            _ => routes.extend(nodes.into_iter().map(|n| (n.to_string(), d.clone(), false))),
        }
    }

    /// Looks `d`'s target up again later, until its deadline.
    fn retry_or_unknown(&mut self, d: PendingDirect) {
        if Instant::now() < d.deadline && self.retries.len() < MAX_PENDING_DIRECTS {
            self.retries.push_back(d);
        } else {
            self.unknown_unless_delivered(d);
        }
    }

    fn unknown_unless_delivered(&self, d: PendingDirect) {
        if !d.delivered_here {
            self.unknown(d.from, d.to);
        }
    }

    /// Redis could not be asked: the target may well be online elsewhere,
    /// so the sender hears `unavailable`, never `unknown_client`.
    fn unreachable(&self, d: PendingDirect) {
        if !d.delivered_here {
            add(&self.status.directs_unavailable, 1);
            let told = self.sink.unavailable(d.from);
            self.count_delivery(told);
        }
    }

    /// `routes`: (node, message, sole target). A message whose sole target
    /// turns out to have no listener is looked up again; one of several
    /// copies is not (the others arrived, and a retry would repeat them).
    async fn send_directs(&mut self, routes: Vec<(String, PendingDirect, bool)>) {
        if routes.is_empty() {
            return;
        }
        let ops: Vec<Op> = routes
            .iter()
            .map(|(node, d, _)| Op::Publish {
                channel: keys::inbox_channel(node),
                payload: keys::encode_direct(&self.me, &d.to, &d.frame),
            })
            .collect();
        match self.exec(&ops).await {
            Ok(replies) => {
                for ((_, d, sole), r) in routes.into_iter().zip(replies) {
                    match r {
                        // Nobody listens on that inbox: the node just died and
                        // the client may be reconnecting elsewhere; look again.
                        Reply::Int(0) if sole && !d.delivered_here => self.retry_or_unknown(d),
                        Reply::Int(0) => {}
                        _ => add(&self.status.directs_sent, 1),
                    }
                }
            }
            Err(_) => routes.into_iter().filter(|r| r.2).for_each(|(_, d, _)| self.unreachable(d)),
        }
    }

    async fn retry_directs(&mut self) {
        let pending: Vec<PendingDirect> = self.retries.drain(..).collect();
        if !self.connected() {
            return pending.into_iter().for_each(|d| self.unreachable(d));
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
            let Some((origin, msg)) = keys::decode_room_msg(&payload) else { return };
            let delivered = match msg {
                // Our own publish, already delivered locally.
                keys::RoomMsg::Plain(_) if origin == self.me => return,
                keys::RoomMsg::Plain(body) => {
                    add(&self.status.remote_room_messages, 1);
                    self.sink.room(room, body)
                }
                // Ordered messages reach every node, the origin too (that
                // is their only delivery); the publisher gets no copy.
                keys::RoomMsg::Ordered(conn, epoch, offset, body) => {
                    if !self.in_order(room, epoch, offset) {
                        return;
                    }
                    let origin = (origin == self.me).then(|| ConnId::from_raw(conn));
                    self.sink.room_ordered(room, offset, body, origin)
                }
            };
            self.count_delivery(delivered);
        } else if channel.starts_with(keys::INBOX_CHANNEL) {
            let delivered = match keys::decode_inbox(&payload) {
                Some(keys::Inbox::Direct(to, frame)) => {
                    add(&self.status.remote_direct_messages, 1);
                    self.sink.direct(to, frame)
                }
                Some(keys::Inbox::Replace(client_id, conn)) => {
                    add(&self.status.remote_replacements, 1);
                    self.sink.replaced(client_id, ConnId::from_raw(conn))
                }
                None => return,
            };
            self.count_delivery(delivered);
        }
    }

    /// Whether an ordered message is the next of its room: a duplicate (an
    /// offset already forwarded) is dropped; a gap (the subscription lost
    /// messages) holds the room back until [`Worker::repair`] fetched them.
    fn in_order(&mut self, room: &str, epoch: &str, offset: u64) -> bool {
        if self.repairs.iter().any(|(r, _, _)| &**r == room) {
            return false; // the repair fetches this one too
        }
        match self.ordered.get_mut(room) {
            Some((e, last)) if e == epoch && offset <= *last => false,
            Some((e, last)) if e == epoch && offset > *last + 1 => {
                self.repairs.push((Arc::from(room), e.clone(), *last));
                false
            }
            Some(entry) => {
                if entry.0 != epoch {
                    // The room's history was lost in Redis: what went before cannot be fetched.
                    add(&self.status.history_gaps, 1);
                }
                *entry = (epoch.to_string(), offset);
                true
            }
            None => {
                match self.recovered_floor.remove(room) {
                    Some((e, floor)) if e == epoch && offset <= floor => {
                        self.recovered_floor.insert(Arc::from(room), (e, floor));
                        return false; // every member here has it
                    }
                    Some((e, floor)) if e == epoch && offset > floor + 1 => {
                        self.repairs.push((Arc::from(room), e, floor));
                        return false;
                    }
                    _ => {}
                }
                self.ordered.insert(Arc::from(room), (epoch.to_string(), offset));
                true
            }
        }
    }

    /// Fetches what the subscription missed in rooms with history (a gap,
    /// or the time it was away) and forwards it in order.
    async fn repair(&mut self) {
        if self.repairs.is_empty() || !self.connected() {
            return;
        }
        let repairs = std::mem::take(&mut self.repairs);
        let ops: Vec<Op> = repairs
            .iter()
            .map(|(room, epoch, last)| Op::HistoryRecover {
                seq: keys::history_seq(room),
                stream: keys::history_stream(room),
                since: Some((*last, epoch.clone())),
                ttl_ms: 0,
                new_epoch: String::new(),
            })
            .collect();
        let Ok(replies) = self.exec(&ops).await else {
            // Redis failed again: the next message (or reconnect) retries.
            return;
        };
        for ((room, _, last), r) in repairs.into_iter().zip(replies) {
            let Reply::Recovery(epoch, now, recovered, messages) = r else { continue };
            if recovered {
                add(&self.status.history_repaired, messages.len() as u64);
                for (i, m) in messages.iter().enumerate() {
                    let delivered = self.sink.room_ordered(&room, last + 1 + i as u64, m, None);
                    self.count_delivery(delivered);
                }
            } else {
                add(&self.status.history_gaps, 1);
            }
            self.ordered.insert(room, (epoch, now));
        }
    }

    /// Once per interval: registry, pools, conn keys, sample, then read the live nodes.
    async fn on_tick(&mut self) {
        self.ticks += 1;
        if self.handed_over {
            return; // the new process writes this node's keys now
        }
        if !self.connected() {
            return self.publish_view();
        }
        if self.ticks % self.config.reconcile_intervals.max(1) == 0 {
            self.state.reconcile();
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
        self.rebalance();
    }

    /// Seed 000's rebalancing, once per interval: above
    /// `cluster.rebalance_high` with a live healthy peer below
    /// `cluster.rebalance_low`, ask ceil((current − capacity × 0.8) / 2)
    /// clients (at most `cluster.migrate_rate`) to move to the least loaded
    /// such peer. One batch in flight per target: the next waits for the
    /// grace period, [`MIGRATE_SETTLE_MS`] and an interval (the registry
    /// then shows the moves).
    fn rebalance(&mut self) {
        let c = &self.config;
        let local = self.sink.local();
        if c.rebalance_high >= 1.0 || local.draining {
            return;
        }
        let me = registry::self_info(&local);
        let now = Instant::now();
        self.moving.retain(|_, until| *until > now);
        if me.utilization <= c.rebalance_high
            || self.last_rebalance.is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let peers: Vec<NodeInfo> = self
            .live
            .values()
            .filter(|n| n.node != self.me && n.utilization < c.rebalance_low && !self.moving.contains_key(&n.node))
            .cloned()
            .collect();
        let Some(target) = registry::least_loaded(&peers) else { return };
        let want = rebalance_count(me.connections, me.capacity).min(c.migrate_rate as usize);
        let url = c.reconnect_via.hint_url(&target.url);
        if want > 0 && self.sink.rebalance(want, &target.node, url) {
            tracing::info!(
                to = %target.node, count = want, utilization = me.utilization,
                "rebalancing: asking {want} client(s) to move to {}", target.node
            );
            add(&self.status.rebalances, 1);
            self.last_rebalance = Some(now);
            let busy = Duration::from_millis(c.migrate_grace_ms + MIGRATE_SETTLE_MS + c.sync_interval_ms);
            self.moving.insert(target.node.clone(), now + busy);
        }
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
        if let Some(until) = self.hold_rooms_until {
            if Instant::now() < until {
                return; // the upgrade's floors first
            }
            tracing::warn!("upgrade: no session floors after {RESUME_HOLD:?}; subscribing rooms without them");
            self.hold_rooms_until = None;
        }
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
                // Back on a room with history: fetch what was published
                // meanwhile (or, after an upgrade, since the sessions that
                // came over last got something).
                for room in &on {
                    if let Some((epoch, last)) = self.resume_floors.remove(room) {
                        self.repairs.push((room.clone(), epoch, last));
                    } else if let Some((epoch, last)) = self.ordered.get(room) {
                        self.repairs.push((room.clone(), epoch.clone(), *last));
                    }
                }
                for room in &off {
                    self.ordered.remove(room);
                    self.recovered_floor.remove(room);
                }
                conn.unsubscribe(&chans(&off)).await.map(|()| self.state.subscribed(&off, false))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.state.retry_rooms(on.into_iter().chain(off));
            self.fail(e);
            return;
        }
        self.status.subscribed_rooms.store(self.state.subscribed_count() as u64, Ordering::Relaxed);
        self.status.unconfirmed_rooms.store(self.state.unconfirmed_count() as u64, Ordering::Relaxed);
        self.repair().await;
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
            // The subscriptions went with the connection: no room is
            // confirmed until it is subscribed again (/ready says so).
            self.state.mark_all_dirty();
        }
        let pending: Vec<PendingDirect> = self.retries.drain(..).collect();
        pending.into_iter().for_each(|d| self.unreachable(d));
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
        self.status.connected_once.store(true, Ordering::Relaxed);
        self.on_tick().await;
    }

    /// Graceful stop: remove this node's keys and its clients' conn keys.
    async fn deregister(&mut self) {
        if !self.connected() || self.handed_over {
            return;
        }
        let mut ops = registry::deregister_ops(&self.me, self.sink.local().shard_connections.len());
        let affinity_ms = self.config.affinity_ttl_secs * 1000;
        for cid in self.state.clients.keys() {
            ops.push(Op::DelIfNode { key: keys::conn(cid), node: self.me.clone() });
            let node = self.state.affinity_node(cid, &self.me).as_bytes().to_vec();
            ops.push(Op::Set { key: keys::affinity(cid), value: node, ttl_ms: affinity_ms });
        }
        let _ = self.exec(&ops).await;
    }

    /// Publishes the breaker state and the `/cluster` view.
    fn publish_view(&self) {
        let dropped = self.incoming.dropped.load(Ordering::Relaxed);
        self.status.incoming_dropped.store(dropped, Ordering::Relaxed);
        self.status.breaker.store(self.breaker.state() as u8, Ordering::Relaxed);
        self.status.subscribed_rooms.store(self.state.subscribed_count() as u64, Ordering::Relaxed);
        self.status.unconfirmed_rooms.store(self.state.unconfirmed_count() as u64, Ordering::Relaxed);
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
        let peers: Vec<NodeInfo> = if self.connected() {
            self.live.values().filter(|n| n.node != self.me && !n.url.is_empty()).cloned().collect()
        } else {
            Vec::new()
        };
        let peer = registry::least_loaded(&peers).map(|n| (n.node.clone(), n.url.clone())).unwrap_or_default();
        if let Ok(mut p) = self.status.peer.lock() {
            *p = peer;
        }
    }
}

#[cfg(test)]
mod tests;
