//! Application: what the node says over WebSocket and HTTP. The `/ws` rooms
//! protocol (join, leave, publish, direct, echo, ping), `/echo`, and the
//! plain endpoints, written against the runtime's narrow [`Conns`]
//! interface so that it runs without sockets in unit tests.
//!
//! One [`Edge`] per shard owns that shard's room index and the directory
//! entries of the client ids whose home is that shard. Cross-shard work goes
//! through the mailbox as [`AppMsg`]; cross-node work through the
//! [`Broker`], whose deliveries come back through [`Delivery`].

pub mod auth;
pub mod backend;
pub mod dashboard;
pub mod directory;
pub mod endpoints;
pub mod handover;
pub mod history;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod rooms;
mod ws;

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use directory::Directory;
use tungstenite::Message;

use crate::broker::{Broker, LocalNode, Sink};
use crate::runtime::limits::TokenBucket;
use crate::runtime::table::ConnId;
use crate::runtime::{Answer, App, Conns, Deferred, NodeState};
use crate::transport::frame;
use http::Route;
use metrics::AppMetrics;
use protocol::ClientError;
use rooms::Rooms;

/// A message for a shard's application.
#[derive(Debug)]
pub enum AppMsg {
    /// A room message published elsewhere: deliver the pre-framed bytes to
    /// local members of `room`, except `origin`.
    Room {
        /// Room name.
        room: Arc<str>,
        /// A complete WebSocket text frame.
        frame: Bytes,
        /// The publisher (excluded). `None` when it came from another node.
        origin: Option<ConnId>,
        /// Its offset in a room with history (0: none).
        offset: u64,
    },
    /// Sent to a client id's home shard: register `conn` as its live connection.
    Register {
        /// Client id.
        client_id: Arc<str>,
        /// Its connection.
        conn: ConnId,
        /// The id came from a token or the client (not generated here).
        named: bool,
    },
    /// Sent to the home shard when a connection with a client id closes.
    Unregister {
        /// Client id.
        client_id: Arc<str>,
        /// The connection that closed (ignored if a newer one replaced it).
        conn: ConnId,
    },
    /// Sent to the home shard of `to`: route a direct message.
    DirectRoute {
        /// Target client id.
        to: Arc<str>,
        /// A complete WebSocket text frame for the target.
        frame: Bytes,
        /// The sender, told `unknown_client` if `to` is connected nowhere.
        /// `None` when it came from another node.
        reply_to: Option<ConnId>,
    },
    /// Deliver a pre-framed message to one connection of this shard.
    Deliver {
        /// Target connection.
        conn: ConnId,
        /// A complete WebSocket frame.
        frame: Bytes,
    },
    /// Tell `conn` that the cluster's store could not be asked for its
    /// message (error `unavailable`).
    Unavailable {
        /// The sender.
        conn: ConnId,
    },
    /// Tell `conn` that its direct message found no one.
    UnknownClient {
        /// The sender.
        conn: ConnId,
    },
    /// Sent to a client id's home shard: a newer session on another node
    /// replaced `conn` (past `auth.sessions_per_client`).
    Replaced {
        /// Client id.
        client_id: Arc<str>,
        /// The replaced session.
        conn: ConnId,
    },
    /// To a room's home shard: number and keep a message of a room with
    /// history, then send it to every shard.
    Sequence {
        /// Room.
        room: Arc<str>,
        /// Publisher's client id.
        from: Arc<str>,
        /// Raw JSON data.
        data: Box<str>,
        /// The publisher (excluded from delivery).
        origin: ConnId,
    },
    /// To a room's home shard: `conn` joins a room with history; answer with
    /// its position and the messages after `since`.
    Recover {
        /// Room.
        room: Arc<str>,
        /// The joining connection.
        conn: ConnId,
        /// The client's last (offset, epoch), if it asked for recovery.
        since: Option<(u64, Box<str>)>,
    },
    /// From a room's home shard: the answer to [`AppMsg::Recover`].
    Replay {
        /// Room.
        room: Arc<str>,
        /// The joining connection.
        conn: ConnId,
        /// What to send it.
        replay: Box<history::Replay>,
        /// Whether it asked for recovery (`recovered` is then in `joined`).
        asked: bool,
    },
    /// To a room's home shard: `client`'s session `conn` joined (`on`) or left the room.
    PresenceChange {
        /// Room.
        room: Arc<str>,
        /// Client id.
        client: Arc<str>,
        /// Joined or left.
        on: bool,
        /// The session (a joiner gets no event about itself).
        conn: ConnId,
        /// Count it, announce nothing (a session resumed after an upgrade).
        quiet: bool,
    },
    /// To a room's home shard: `conn` asks who is in the room.
    PresenceQuery {
        /// Room.
        room: Arc<str>,
        /// Who asks.
        conn: ConnId,
    },
    /// Upgrade (new process): a room's history from the old process, for
    /// its home shard.
    RestoreHistory {
        /// The room's log.
        history: Box<history::Exported>,
    },
    /// A backend's answer (connect, rpc, publish) for a connection of this shard.
    Backend(Box<backend::Answered>),
    /// Rebalancing: ask up to `count` of this shard's least recently active
    /// clients to move to node `target` at `url`.
    Migrate {
        /// How many.
        count: usize,
        /// Target node id.
        target: Arc<str>,
        /// Its URL ("" = through the balancer).
        url: Arc<str>,
    },
    /// Close `conn` with `code` (a newer connection took its client id).
    Kick {
        /// Connection to close.
        conn: ConnId,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
}

impl crate::runtime::mailbox::Weigh for AppMsg {
    fn weight(&self) -> Option<usize> {
        match self {
            AppMsg::Room { frame, .. } | AppMsg::DirectRoute { frame, .. } | AppMsg::Deliver { frame, .. } => {
                Some(frame.len())
            }
            AppMsg::Sequence { data, .. } => Some(data.len() + 64),
            // Replies to a join (at most rooms.max_pending_joins per
            // connection, each bounded by rooms.history_max_bytes): never refused.
            AppMsg::Recover { .. } | AppMsg::Replay { .. } => None,
            AppMsg::Register { .. }
            | AppMsg::Unregister { .. }
            | AppMsg::UnknownClient { .. }
            | AppMsg::Unavailable { .. }
            | AppMsg::PresenceChange { .. }
            | AppMsg::PresenceQuery { .. }
            | AppMsg::Replaced { .. }
            // Bounded by proxy.max_in_flight_per_connection per connection
            // (and one connect per pending upgrade).
            | AppMsg::Backend(_)
            | AppMsg::Migrate { .. }
            | AppMsg::RestoreHistory { .. }
            | AppMsg::Kick { .. } => None,
        }
    }
}

/// What the application keeps per connection.
#[derive(Debug, Default)]
pub struct Session {
    /// Endpoint, once upgraded.
    pub route: Route,
    /// Client id on `/ws`.
    pub client_id: Option<Arc<str>>,
    /// Rooms joined on `/ws`.
    pub rooms: Joined,
    /// Message rate (`limits.messages_per_second`), created on the first message.
    pub rate: Option<Box<TokenBucket>>,
    /// What the token allows (`auth.mode = "token"`); `None`: everything.
    pub grants: Option<Box<Grants>>,
    /// Joins of rooms with history waiting for their home shard's answer.
    pub pending_joins: u8,
    /// The client id came from its token or the client, not from this node
    /// (only such ids get session affinity: a generated one never comes back).
    pub named: bool,
    /// RPCs and proxied publishes waiting for the backend.
    pub in_flight: u8,
    /// What the connect backend said to do on open (rooms, welcome data).
    pub connect: Option<Box<backend::Grant>>,
}

/// The rooms a session joined: 8 bytes while it has none (every idle
/// connection holds one), a `Vec` once it joins.
#[derive(Debug, Default, Clone)]
// Boxed on purpose: 8 bytes in every session instead of a `Vec`'s 24.
#[allow(clippy::box_collection)]
pub struct Joined(Option<Box<Vec<Rc<str>>>>);

impl Joined {
    /// Adds `room`.
    pub fn push(&mut self, room: Rc<str>) {
        self.0.get_or_insert_with(Box::default).push(room);
    }

    /// Removes the room at `i` (the last one takes its place).
    pub fn swap_remove(&mut self, i: usize) -> Rc<str> {
        let v = self.0.as_mut().expect("index of a joined room");
        let r = v.swap_remove(i);
        if v.is_empty() {
            self.0 = None;
        }
        r
    }
}

impl std::ops::Deref for Joined {
    type Target = [Rc<str>];
    fn deref(&self) -> &[Rc<str>] {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

impl<'a> IntoIterator for &'a Joined {
    type Item = &'a Rc<str>;
    type IntoIter = std::slice::Iter<'a, Rc<str>>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// What a connection's token allows, until when.
#[derive(Debug)]
pub struct Grants {
    /// Rooms it may join.
    pub rooms: auth::Patterns,
    /// Rooms it may publish to.
    pub publish: auth::Patterns,
    /// Unix seconds when the token expires (close 4003 unless refreshed).
    pub exp: u64,
    /// Shard clock (ms) of the last `refresh` attempt (0: none yet).
    pub refresh_ms: u64,
}

impl Grants {
    fn of(claims: &auth::Claims) -> Box<Grants> {
        Box::new(Grants {
            rooms: claims.rooms.clone(),
            publish: claims.publish.clone(),
            exp: claims.exp,
            refresh_ms: 0,
        })
    }
}

/// Unix seconds now (token times).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What every shard's application shares: the broker and every shard's
/// application counters.
pub struct EdgeShared {
    /// Cross-node operations.
    pub broker: Arc<dyn Broker>,
    /// Counters, index = shard (each written only by its shard).
    pub metrics: Vec<AppMetrics>,
    /// The key of the home-shard hash, random per node: client ids cannot be
    /// chosen to pile onto one shard.
    pub hash_key: RandomState,
    /// Token verification (`auth.mode = "token"`).
    pub verifier: Option<Arc<auth::Verifier>>,
    /// The application's backends (`[[upstream]]`), if any.
    pub backend: Option<Arc<backend::Backend>>,
}

impl EdgeShared {
    /// Shared state for `shards` shards over `broker`, with the node's hash key.
    pub fn new(broker: Arc<dyn Broker>, shards: usize, hash_key: RandomState) -> Self {
        EdgeShared {
            broker,
            metrics: (0..shards).map(|_| AppMetrics::default()).collect(),
            hash_key,
            verifier: None,
            backend: None,
        }
    }

    /// The shard that keeps `client_id`'s directory entry.
    pub fn home_shard(&self, client_id: &str, shards: usize) -> usize {
        home_shard(&self.hash_key, client_id, shards)
    }
}

/// The shard that keeps `client_id`'s directory entry, under the node's key.
pub fn home_shard(key: &RandomState, client_id: &str, shards: usize) -> usize {
    (key.hash_one(client_id) % shards.max(1) as u64) as usize
}

/// A room's present clients on this node → their sessions in it.
type Present = std::collections::HashMap<Arc<str>, u32>;

/// A member's (room, offset) floors: live messages up to them are dropped.
type Floors = Vec<(Rc<str>, u64)>;

/// Rooms with history → (epoch, last offset delivered live on the shard).
type Positions = std::collections::HashMap<Rc<str>, (Box<str>, u64)>;

/// One shard's application.
pub struct Edge {
    shard: usize,
    shared: Arc<EdgeShared>,
    rooms: RefCell<Rooms>,
    /// Client ids whose home is this shard → their live connection.
    directory: RefCell<Directory>,
    /// Token expiries of this shard's connections: (unix secs, connection).
    /// A refresh adds a later entry; the sweep skips entries that no longer
    /// match the connection's grants.
    expiries: RefCell<std::collections::BTreeSet<(u64, ConnId)>>,
    id_counter: Cell<u64>,
    /// Sequencers of the rooms with history whose home is this shard.
    history: RefCell<history::History>,
    /// Members of rooms with history held back from live delivery until
    /// their join's answer arrives (connection → rooms).
    pending: RefCell<std::collections::HashMap<ConnId, Vec<Rc<str>>>>,
    /// Members recovered through the cluster: (room, offset of the answer);
    /// live messages up to it are dropped (they were in the answer).
    floors: RefCell<std::collections::HashMap<ConnId, Floors>>,
    /// Rooms whose home is this shard → client id → its sessions in the room (this node).
    presence: RefCell<std::collections::HashMap<Arc<str>, Present>>,
    /// Upgrades parked on the connect backend.
    connects: backend::Connects,
    /// Clients asked to move (rebalancing) → shard clock (ms) at which they
    /// are closed if still here.
    moving: RefCell<std::collections::HashMap<ConnId, u64>>,
    /// Rooms with history ordered by the cluster that have members here →
    /// (epoch, last offset delivered live on this shard): where a member
    /// stands when it is handed to a new process (zero-disconnect upgrade).
    positions: RefCell<Positions>,
}

impl Edge {
    /// Shard `shard`'s application; `capacity` presizes the directory (growing
    /// a large table mid-run costs a copy and, with mimalloc, a fresh region).
    pub fn new(shard: usize, shared: Arc<EdgeShared>, capacity: usize) -> Self {
        Edge {
            shard,
            shared,
            rooms: RefCell::new(Rooms::default()),
            directory: RefCell::new(Directory::with_capacity(capacity)),
            expiries: RefCell::default(),
            id_counter: Cell::new(0),
            history: RefCell::default(),
            pending: RefCell::default(),
            floors: RefCell::default(),
            presence: RefCell::default(),
            connects: backend::Connects::default(),
            moving: RefCell::default(),
            positions: RefCell::default(),
        }
    }

    fn broker(&self) -> &dyn Broker {
        &*self.shared.broker
    }

    /// A generated client id: 10 random hex digits (unique with overwhelming
    /// odds across nodes) followed by the shard and a per-shard counter in hex
    /// (certain on this node).
    fn generate_client_id(&self) -> String {
        let n = self.id_counter.get().wrapping_add(1);
        self.id_counter.set(n);
        format!("{:010x}{:x}{:x}", fastrand::u64(..) >> 24, self.shard, n)
    }

    /// Queues an error message and counts it.
    fn send_error<C: Conns<Self>>(&self, cx: &C, id: ConnId, e: ClientError) {
        self.shared.metrics[self.shard].client_errors[e.index()].inc();
        cx.send_text(id, &protocol::error(e, protocol::error_text(e)));
    }

    /// Delivers a room frame to local members except `origin`.
    fn deliver_room<C: Conns<Self>>(&self, cx: &C, room: &str, frame: &Bytes, origin: Option<ConnId>, offset: u64) {
        if offset > 0 {
            // Only rooms the cluster orders have positions: a single node
            // (offsets from its own sequencer) skips hashing the name.
            let mut positions = self.positions.borrow_mut();
            if !positions.is_empty() {
                if let Some(p) = positions.get_mut(room) {
                    p.1 = p.1.max(offset);
                }
            }
        }
        let rooms = self.rooms.borrow();
        let pending = self.pending.borrow();
        let mut floors = self.floors.borrow_mut();
        for &member in rooms.members(room).iter().filter(|m| Some(**m) != origin) {
            // A member whose join is being answered gets this message in
            // the answer (or joined after it): not now.
            if !pending.is_empty() && pending.get(&member).is_some_and(|rs| rs.iter().any(|r| &**r == room)) {
                continue;
            }
            // Just recovered through the cluster: messages up to the answer's
            // offset may still arrive after it; they were in it.
            if offset > 0 && !floors.is_empty() {
                if let Some(fs) = floors.get_mut(&member) {
                    if let Some(i) = fs.iter().position(|(r, _)| &**r == room) {
                        if offset <= fs[i].1 {
                            continue;
                        }
                        fs.swap_remove(i);
                        if fs.is_empty() {
                            floors.remove(&member);
                        }
                    }
                }
            }
            // The outcome is counted inside offer (drops, slow-consumer closes).
            cx.send_frame(member, frame);
        }
    }

    /// On the client's home shard: records `conn` as one of its sessions,
    /// replacing the oldest past `auth.sessions_per_client` here, and tells
    /// the broker (from here, so that the cluster sees this node's sessions
    /// in the order the directory does) to replace the oldest elsewhere.
    fn register<C: Conns<Self>>(&self, cx: &C, client_id: Arc<str>, conn: ConnId, named: bool) {
        let max = cx.node().config.auth.sessions_per_client as usize;
        let replaced = self.directory.borrow_mut().register(client_id.clone(), conn, max);
        for old in replaced {
            self.kick_replaced(cx, old);
        }
        self.broker().conn_opened(&client_id, conn, max, named);
    }

    fn kick_replaced<C: Conns<Self>>(&self, cx: &C, old: ConnId) {
        let reason = "replaced by a newer connection with the same client_id";
        let kick = AppMsg::Kick { conn: old, code: crate::transport::close::REPLACED, reason };
        let _ = cx.send_to(old.shard(), kick);
    }

    /// On the home shard: a newer session on another node replaced `conn`.
    fn replaced_elsewhere<C: Conns<Self>>(&self, cx: &C, client_id: &str, conn: ConnId) {
        let mut dir = self.directory.borrow_mut();
        // A stale notice (the session closed, or its id was reused) is ignored.
        if dir.sessions(client_id).contains(&conn) {
            dir.unregister(client_id, conn);
            drop(dir);
            self.kick_replaced(cx, conn);
        }
    }

    /// The per-connection message rate (`limits.messages_per_second`): a
    /// message past it is answered `rate_limited` (on `/ws`; dropped on
    /// `/echo`), and `limits.rate_limit_strikes` of them close 1008.
    fn within_rate<C: Conns<Self>>(&self, cx: &C, id: ConnId, route: Route) -> bool {
        let l = &cx.node().config.limits;
        if l.messages_per_second <= 0.0 {
            return true;
        }
        let now = cx.now_ms();
        let verdict = cx.state(id, |s| {
            let bucket = s.rate.get_or_insert_with(|| Box::new(TokenBucket::new(l.message_burst, now)));
            (bucket.take(l.messages_per_second, l.message_burst, now), bucket.strikes())
        });
        match verdict {
            Some((true, _)) | None => true,
            Some((false, strikes)) if strikes >= l.rate_limit_strikes => {
                self.shared.metrics[self.shard].rate_limit_closed.inc();
                cx.close(id, crate::transport::close::POLICY, "message rate limit exceeded");
                false
            }
            Some((false, _)) => {
                match route {
                    Route::Rooms => self.send_error(cx, id, ClientError::RateLimited),
                    Route::Echo => {
                        self.shared.metrics[self.shard].client_errors[ClientError::RateLimited.index()].inc()
                    }
                }
                false
            }
        }
    }

    fn route_direct<C: Conns<Self>>(&self, cx: &C, to: Arc<str>, frame: Bytes, reply_to: Option<ConnId>) {
        let targets = self.directory.borrow().sessions(&to);
        // A local sender's message also goes to the target's sessions on
        // other nodes: always when it may have none here, and when it may
        // keep several sessions (tabs on different nodes). With one session
        // per client, a session here means any other is being replaced.
        if let Some(from) = reply_to {
            if targets.is_empty() || cx.node().config.auth.sessions_per_client > 1 {
                self.broker().direct(to, frame.clone(), from, !targets.is_empty());
            }
        }
        // Every live session of the client (browser tabs) gets it.
        for conn in targets {
            if conn.shard() == self.shard {
                cx.send_frame(conn, &frame);
            } else {
                let _ = cx.send_to(conn.shard(), AppMsg::Deliver { conn, frame: frame.clone() });
            }
        }
    }
}

impl Edge {
    /// Closes (4003) the connections whose token expired without a refresh.
    fn expire_tokens<C: Conns<Self>>(&self, cx: &C) {
        // Closed once `exp + leeway < now`, exactly when a verifier would
        // start refusing the token (never early).
        let cut = unix_now().saturating_sub(cx.node().config.auth.leeway_secs);
        let due: Vec<(u64, ConnId)> = {
            let mut ex = self.expiries.borrow_mut();
            let keep = ex.split_off(&(cut, ConnId::from_raw(0)));
            std::mem::replace(&mut *ex, keep).into_iter().collect()
        };
        for (exp, id) in due {
            // A refreshed token has a later expiry: this entry is stale.
            if cx.state(id, |s| s.grants.as_ref().is_some_and(|g| g.exp == exp)) == Some(true) {
                self.shared.metrics[self.shard].tokens_expired.inc();
                cx.close(id, crate::transport::close::TOKEN_EXPIRED, "token expired: refresh, then reconnect");
            }
        }
    }

    /// Rebalancing: hints `count` of the least recently active `/ws`
    /// clients (not already moving) to `target`; each is closed 1001 after
    /// `cluster.migrate_grace_ms` if it has not left by then.
    fn migrate<C: Conns<Self>>(&self, cx: &C, count: usize, target: &str, url: &str) {
        let grace = cx.node().config.cluster.migrate_grace_ms;
        let picked = {
            let moving = self.moving.borrow();
            cx.least_active(count + moving.len(), |s| s.client_id.is_some())
        };
        let deadline = cx.now_ms() + grace;
        let mut moved = 0;
        for id in picked {
            if moved == count {
                break;
            }
            if self.moving.borrow().contains_key(&id) {
                continue;
            }
            let after_ms = fastrand::u64(0..=HINT_JITTER_MS);
            cx.send_text(id, &protocol::reconnect(url, after_ms, protocol::HintReason::Rebalance));
            self.moving.borrow_mut().insert(id, deadline);
            if let Some(Some(client)) = cx.state(id, |s| s.client_id.clone()) {
                self.broker().moved(&client, target, "rebalance");
            }
            moved += 1;
        }
        tracing::info!(shard = self.shard, moved, target, "rebalancing: {moved} client(s) asked to move to {target}");
    }

    /// Closes (1001) the clients asked to move whose grace is over; forgets
    /// those that left.
    fn sweep_moving<C: Conns<Self>>(&self, cx: &C) {
        let now = cx.now_ms();
        let mut due = Vec::new();
        self.moving.borrow_mut().retain(|id, deadline| {
            if cx.state(*id, |_| ()).is_none() {
                return false;
            }
            if *deadline <= now {
                due.push(*id);
                return false;
            }
            true
        });
        for id in due {
            cx.close(id, crate::transport::close::GOING_AWAY, "rebalanced: reconnect to the hinted node");
        }
    }

    /// The `preempted` notice, then close 4004.
    fn preempt<C: Conns<Self>>(&self, cx: &C, id: ConnId) {
        let delay = cx.node().config.priority.preempt_reconnect_delay_ms;
        let reason = "the node is full and a higher-priority client needed the slot";
        cx.send_text(id, &protocol::preempted(reason, delay));
        cx.close(id, crate::transport::close::PREEMPTED, "preempted: reconnect after the delay, possibly elsewhere");
    }
}

impl Edge {
    /// The connect backend's part of an upgrade: `Ok(grant)` to go on,
    /// `Err(answer)` to park the upgrade (asking) or refuse it.
    #[allow(clippy::too_many_arguments)]
    fn connect_verdict<C: Conns<Self>>(
        &self,
        cx: &C,
        id: ConnId,
        pool: usize,
        head: &[u8],
        verdict: Option<backend::Verdict>,
        claims: &Option<auth::Claims>,
        client_id: &Option<String>,
    ) -> Result<Option<Box<backend::Grant>>, Answer> {
        let cfg = &cx.node().config;
        let refuse = |why: crate::transport::http::Rejection, text: &str| Answer::Respond {
            bytes: crate::transport::http::refusal(why, text, cfg.server.retry_after_secs),
            rejected: Some(why),
        };
        match verdict {
            None => {
                let addr = cx.peer(id).map(|p| p.client);
                let body =
                    backend::connect_body(cfg, head, addr, claims.as_ref(), client_id.as_deref(), &cx.node().node_id);
                let wait = self.ask_connect(pool, id, &cfg.proxy.connect_path, body, backend::connect_budget(cfg));
                Err(Answer::Wait(Deferred(Box::pin(wait))))
            }
            Some(backend::Verdict::Allow(g)) => Ok(Some(g)),
            Some(backend::Verdict::Deny(text)) => Err(refuse(
                crate::transport::http::Rejection::ConnectDenied,
                &format!("refused by the application: {text}"),
            )),
            Some(backend::Verdict::Unavailable(why)) => {
                if cfg.proxy.connect_fallback == crate::config::ConnectFallback::Token && claims.is_some() {
                    self.shared.metrics[self.shard].connect_fallbacks.inc();
                    return Ok(None);
                }
                Err(refuse(
                    crate::transport::http::Rejection::BackendUnavailable,
                    &format!("the application cannot be asked now ({why}); retry later"),
                ))
            }
        }
    }
}
/// The most a hint asks a client to wait on top of when it got the hint
/// (hints themselves are spread over `shutdown.reconnect_spread_ms`).
pub const HINT_JITTER_MS: u64 = 1_000;

impl App for Edge {
    type Msg = AppMsg;
    type Conn = Session;

    fn on_request<C: Conns<Self>>(&self, cx: &C, id: ConnId, head: &[u8]) -> Answer {
        // Taken first: whatever is decided below, a verdict is used once.
        let verdict = self.take_verdict(id);
        let max = cx.node().config.server.max_request_bytes;
        let view = endpoints::View { cx, id, shared: &self.shared };
        match http::decide(head, max, &view) {
            http::Decision::NeedMore => Answer::NeedMore,
            http::Decision::Respond { bytes, rejected } => Answer::Respond { bytes, rejected },
            http::Decision::Upgrade { route, client_id, claims, response, consumed } => {
                let grant = match (route, self.connect_pool()) {
                    (Route::Rooms, Some(pool)) => {
                        match self.connect_verdict(cx, id, pool, head, verdict, &claims, &client_id) {
                            Ok(g) => g,
                            Err(answer) => return answer,
                        }
                    }
                    _ => None,
                };
                // With a token the id is its `sub`; without, a chosen id is
                // honoured only when the operator allows it: otherwise anyone
                // could take over another client's id. The connect backend's
                // answer comes before both.
                let chosen = match (&grant, &claims) {
                    (Some(g), _) if g.client_id.is_some() => g.client_id.clone(),
                    (_, Some(c)) => Some(c.sub.to_string()),
                    _ => client_id.filter(|_| cx.node().config.auth.allow_client_ids),
                };
                let named = chosen.is_some();
                let client_id: Option<Arc<str>> = match route {
                    Route::Rooms => Some(chosen.unwrap_or_else(|| self.generate_client_id()).into()),
                    Route::Echo => None,
                };
                let class = grant
                    .as_ref()
                    .and_then(|g| g.class)
                    .or(claims.as_ref().map(|c| c.class))
                    .unwrap_or(cx.node().config.priority.default_class);
                if let Some(c) = &claims {
                    self.expiries.borrow_mut().insert((c.exp, id));
                }
                let grant = grant.filter(|g| !g.rooms.is_empty() || g.data.is_some());
                cx.state(id, |s| {
                    s.route = route;
                    s.client_id = client_id;
                    s.named = named;
                    s.grants = claims.as_ref().map(Grants::of);
                    s.connect = grant;
                });
                Answer::Upgrade { response, consumed, class }
            }
        }
    }

    fn on_open<C: Conns<Self>>(&self, cx: &C, id: ConnId) {
        let Some((Some(cid), named)) = cx.state(id, |s| (s.client_id.clone(), s.named)) else { return };
        let node = cx.node();
        let grant = cx.state(id, |s| s.connect.take()).flatten();
        let data = grant.as_ref().and_then(|g| g.data.as_deref());
        cx.send_text(id, &protocol::welcome_with(&cid, &node.node_id, self.shard, data));
        let home = self.shared.home_shard(&cid, node.shards.len());
        let _ = cx.send_to(home, AppMsg::Register { client_id: cid, conn: id, named });
        // The connect backend's rooms, joined as if the client had asked
        // (its token's grants still apply).
        for room in grant.iter().flat_map(|g| g.rooms.iter()) {
            self.join(cx, id, room, None);
        }
    }

    fn on_message<C: Conns<Self>>(&self, cx: &C, id: ConnId, msg: Message) {
        let route = cx.state(id, |s| s.route).unwrap_or_default();
        if !self.within_rate(cx, id, route) {
            return;
        }
        match (route, msg) {
            (Route::Echo, Message::Text(t)) => {
                cx.send_text(id, t.as_str());
            }
            (Route::Echo, Message::Binary(b)) => {
                cx.offer(id, b.len() + frame::MAX_HEADER, |out| frame::push_data(out, frame::Kind::Binary, &b));
            }
            (Route::Rooms, Message::Text(t)) => self.rooms_message(cx, id, t.as_str()),
            (Route::Rooms, _) => self.send_error(cx, id, ClientError::BinaryNotSupported),
            _ => {}
        }
    }

    fn on_close<C: Conns<Self>>(&self, cx: &C, id: ConnId, state: Session) {
        if let Some(g) = &state.grants {
            self.expiries.borrow_mut().remove(&(g.exp, id));
        }
        let mut emptied = Vec::new();
        {
            let mut rooms = self.rooms.borrow_mut();
            for room in &state.rooms {
                if rooms.leave(room, id) {
                    emptied.push(room.clone());
                }
            }
        }
        if let Some(client) = &state.client_id {
            for room in &state.rooms {
                self.presence_change(cx, room, client, false, id, false);
            }
        }
        for room in emptied {
            self.positions.borrow_mut().remove(&*room);
            self.broker().room_interest(self.shard, &room, false);
        }
        if state.pending_joins > 0 {
            self.pending.borrow_mut().remove(&id);
        }
        if !self.floors.borrow().is_empty() {
            self.floors.borrow_mut().remove(&id);
        }
        if let Some(client_id) = state.client_id {
            self.notify_disconnect(&client_id, id, &cx.node().node_id);
            let home = self.shared.home_shard(&client_id, cx.node().shards.len());
            let _ = cx.send_to(home, AppMsg::Unregister { client_id, conn: id });
        }
    }

    fn on_mail<C: Conns<Self>>(&self, cx: &C, msg: AppMsg) {
        match msg {
            AppMsg::Room { room, frame, origin, offset } => self.deliver_room(cx, &room, &frame, origin, offset),
            AppMsg::Unavailable { conn } => self.send_error(cx, conn, ClientError::Unavailable),
            AppMsg::PresenceChange { room, client, on, conn, quiet } => {
                self.presence_changed(cx, room, client, on, conn, quiet)
            }
            AppMsg::PresenceQuery { room, conn } => self.presence_query(cx, &room, conn),
            AppMsg::Register { client_id, conn, named } => self.register(cx, client_id, conn, named),
            AppMsg::Unregister { client_id, conn } => {
                self.directory.borrow_mut().unregister(&client_id, conn);
                self.broker().conn_closed(&client_id, conn);
            }
            AppMsg::Replaced { client_id, conn } => self.replaced_elsewhere(cx, &client_id, conn),
            AppMsg::DirectRoute { to, frame, reply_to } => self.route_direct(cx, to, frame, reply_to),
            AppMsg::Deliver { conn, frame } => {
                cx.send_frame(conn, &frame);
            }
            AppMsg::UnknownClient { conn } => self.send_error(cx, conn, ClientError::UnknownClient),
            AppMsg::Kick { conn, code, reason } => cx.close(conn, code, reason),
            AppMsg::Backend(a) => self.answered(cx, *a),
            AppMsg::Migrate { count, target, url } => self.migrate(cx, count, &target, &url),
            AppMsg::RestoreHistory { history } => self.restore_history(cx, *history),
            AppMsg::Sequence { room, from, data, origin } => self.sequence(cx, &room, &from, &data, origin),
            AppMsg::Recover { room, conn, since } => self.recover(cx, room, conn, since),
            AppMsg::Replay { room, conn, replay, asked } => self.replayed(cx, &room, conn, *replay, asked),
        }
    }

    fn on_preempt<C: Conns<Self>>(&self, cx: &C, id: ConnId) {
        self.preempt(cx, id);
    }

    fn on_handover<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> Option<Vec<u8>> {
        self.handover_state(cx, id)
    }

    fn on_resume<C: Conns<Self>>(&self, cx: &C, id: ConnId, state: &[u8]) {
        self.resume_state(cx, id, state);
    }

    fn handover_shard<C: Conns<Self>>(&self, cx: &C) -> Vec<Vec<u8>> {
        self.handover_histories(cx)
    }

    fn on_upgrade_close<C: Conns<Self>>(&self, cx: &C, id: ConnId) {
        self.upgrade_hint(cx, id);
    }

    fn on_drain<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> bool {
        // /echo has no messages of its own: it only gets the 1001.
        if cx.state(id, |s| s.client_id.is_some()) != Some(true) {
            return false;
        }
        let spread = cx.node().config.shutdown.spread_ms();
        let after_ms = fastrand::u64(0..=HINT_JITTER_MS.min(spread));
        let (target, url) = self.broker().reconnect_target();
        cx.send_text(id, &protocol::reconnect(&url, after_ms, protocol::HintReason::Drain));
        if let Some(Some(client)) = cx.state(id, |s| s.client_id.clone().filter(|_| s.named)) {
            self.broker().moved(&client, &target, "drain");
        }
        true
    }

    fn on_sweep<C: Conns<Self>>(&self, cx: &C) -> Vec<ConnId> {
        self.expire_tokens(cx);
        if !self.moving.borrow().is_empty() {
            self.sweep_moving(cx);
        }
        self.sweep_history(cx);
        let k = self.broker().sample_size();
        if k == 0 {
            return Vec::new();
        }
        let sampled = cx.sample(k);
        let entries = sampled
            .iter()
            .map(|s| crate::broker::SampleEntry {
                client_id: cx
                    .state(s.id, |st| st.client_id.as_deref().unwrap_or("echo").to_string())
                    .unwrap_or_default(),
                shard: self.shard,
                age_ms: s.age_ms,
                queued_bytes: s.queued_bytes,
                rtt_us: s.rtt_us as u64,
            })
            .collect();
        self.broker().sample(self.shard, entries);
        // Ping those without one outstanding, so the next sample has a fresh round trip.
        sampled.iter().filter(|s| !s.ping_outstanding).map(|s| s.id).collect()
    }
}

/// The application's side of the broker: frames what other nodes send and
/// routes it to the right shards' mailboxes.
pub struct Delivery {
    node: Arc<NodeState<AppMsg>>,
    hash_key: RandomState,
}

impl Delivery {
    /// Delivery into `node`'s shards; `hash_key` is the node's home-shard key.
    pub fn new(node: Arc<NodeState<AppMsg>>, hash_key: RandomState) -> Self {
        Delivery { node, hash_key }
    }

    fn to_shard(&self, shard: usize, msg: AppMsg) -> bool {
        let msg = crate::runtime::mailbox::ShardMsg::App(msg);
        self.node.shards.get(shard).is_some_and(|s| s.mailbox.send(msg).is_ok())
    }
}

impl Sink for Delivery {
    fn room(&self, room: &str, payload: &str) -> bool {
        let frame = frame::text(payload);
        let room: Arc<str> = Arc::from(room);
        let mut all = true;
        for i in 0..self.node.shards.len() {
            all &= self.to_shard(i, AppMsg::Room { room: room.clone(), frame: frame.clone(), origin: None, offset: 0 });
        }
        all
    }

    fn direct(&self, to: &str, frame: &[u8]) -> bool {
        if !protocol::valid_client_id(to) {
            return true; // nobody can have that id: nothing to deliver
        }
        let to: Arc<str> = Arc::from(to);
        let home = home_shard(&self.hash_key, &to, self.node.shards.len());
        self.to_shard(home, AppMsg::DirectRoute { to, frame: Bytes::copy_from_slice(frame), reply_to: None })
    }

    fn unknown_client(&self, from: ConnId, _to: Arc<str>) -> bool {
        self.to_shard(from.shard(), AppMsg::UnknownClient { conn: from })
    }

    fn room_ordered(&self, room: &str, offset: u64, payload: &str, origin: Option<ConnId>) -> bool {
        let frame = frame::text(payload);
        let room: Arc<str> = Arc::from(room);
        let mut all = true;
        for i in 0..self.node.shards.len() {
            let msg = AppMsg::Room { room: room.clone(), frame: frame.clone(), origin, offset };
            all &= self.to_shard(i, msg);
        }
        all
    }

    fn recovered(&self, room: &str, conn: ConnId, r: crate::broker::Recovery) -> bool {
        let replay = history::Replay {
            frames: r.messages.iter().map(|m| frame::text(m)).collect(),
            recovered: r.recovered,
            offset: r.offset,
            epoch: Arc::from(r.epoch.as_str()),
        };
        let msg = AppMsg::Replay { room: Arc::from(room), conn, replay: Box::new(replay), asked: r.asked };
        self.to_shard(conn.shard(), msg)
    }

    fn presence(&self, room: &str, conn: ConnId, mut clients: Vec<String>) -> bool {
        clients.sort_unstable();
        clients.dedup();
        let clients: Vec<Arc<str>> =
            clients.iter().filter(|c| protocol::valid_client_id(c)).map(|c| Arc::from(c.as_str())).collect();
        let frame = frame::text(&protocol::presence(room, &clients));
        self.to_shard(conn.shard(), AppMsg::Deliver { conn, frame })
    }

    fn unavailable(&self, origin: ConnId) -> bool {
        self.to_shard(origin.shard(), AppMsg::Unavailable { conn: origin })
    }

    fn replaced(&self, client_id: &str, conn: ConnId) -> bool {
        if !protocol::valid_client_id(client_id) {
            return true;
        }
        let client_id: Arc<str> = Arc::from(client_id);
        let home = home_shard(&self.hash_key, &client_id, self.node.shards.len());
        self.to_shard(home, AppMsg::Replaced { client_id, conn })
    }

    fn rebalance(&self, count: usize, target: &str, url: &str) -> bool {
        let conns: Vec<usize> =
            self.node.shards.iter().map(|s| s.metrics.connections.load(std::sync::atomic::Ordering::Relaxed)).collect();
        let total: usize = conns.iter().sum();
        if total == 0 || count == 0 {
            return false;
        }
        let (target, url): (Arc<str>, Arc<str>) = (Arc::from(target), Arc::from(url));
        // Each shard's share of the move, by its share of the clients
        // (largest remainders get the rest, so the shares add up to `count`).
        let count = count.min(total);
        let mut shares: Vec<usize> = conns.iter().map(|c| count * c / total).collect();
        let mut by_remainder: Vec<usize> = (0..conns.len()).collect();
        by_remainder.sort_by_key(|&i| std::cmp::Reverse((count * conns[i]) % total));
        let mut left = count - shares.iter().sum::<usize>();
        for i in by_remainder.into_iter().cycle().take(conns.len() * 2) {
            if left == 0 {
                break;
            }
            if shares[i] < conns[i] {
                shares[i] += 1;
                left -= 1;
            }
        }
        let mut told = false;
        for (i, share) in shares.into_iter().enumerate().filter(|(_, s)| *s > 0) {
            told |= self.to_shard(i, AppMsg::Migrate { count: share, target: target.clone(), url: url.clone() });
        }
        told
    }

    fn affinity(&self, conn: ConnId, node: &str, url: &str) -> bool {
        let frame = frame::text(&protocol::affinity(node, url));
        self.to_shard(conn.shard(), AppMsg::Deliver { conn, frame })
    }

    fn local(&self) -> LocalNode {
        let n = &self.node;
        LocalNode {
            node_id: n.node_id.clone(),
            url: n.advertise_url.clone(),
            shard_connections: n
                .shards
                .iter()
                .map(|s| s.metrics.connections.load(std::sync::atomic::Ordering::Relaxed))
                .collect(),
            capacity_per_shard: n.capacity_per_shard,
            handshake_p99_us: crate::runtime::metrics::handshake_p99_us(&n.metrics()),
            draining: n.is_draining(),
            started_at: n.started_at,
            class_connections: n.classes.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests;
