//! One shard: a monoio runtime on its own thread, pinned to one core, with
//! its own SO_REUSEPORT listener, slab table, room index and client
//! directory. Other threads reach it only through its mailbox.
//!
//! Everything here runs on the shard thread; `RefCell` borrows are never held
//! across an `.await`.

pub mod accept;
pub mod mailbox;
pub mod table;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::io::Canceller;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig as WsConfig, WebSocketContext};

use crate::config::{Config, SlowConsumerPolicy};
use crate::error::{ClientError, Rejection, SendOutcome};
use crate::metrics::ShardMetrics;
use crate::rooms::Rooms;
use crate::ws::stream::shutdown;
use crate::ws::Io;
use mailbox::{MailboxError, MailboxSender, ShardMsg};
use table::{ConnId, Phase, Table};

/// What every shard (and the main thread) shares: configuration, identity,
/// and each shard's mailbox and metrics. Nothing here is locked on the
/// delivery path.
pub struct NodeShared {
    /// Effective configuration.
    pub config: Config,
    /// This node's id.
    pub node_id: String,
    /// URL clients use to reach this node.
    pub advertise_url: String,
    /// Slots per shard after the fd-limit cap.
    pub capacity_per_shard: usize,
    /// One handle per shard, index = shard id.
    pub shards: Vec<ShardHandle>,
    /// Set once on SIGTERM/SIGINT.
    pub draining: AtomicBool,
    /// Unix seconds at start.
    pub started_at: u64,
    /// The Redis side, when `cluster.redis_url` is set.
    pub cluster: Option<crate::cluster::ClusterHandle>,
}

/// Another shard as seen from outside: its mailbox and its metrics.
pub struct ShardHandle {
    /// Where to send it messages.
    pub mailbox: MailboxSender,
    /// Its counters (read-only from other threads).
    pub metrics: ShardMetrics,
}

impl NodeShared {
    /// The shard that keeps `client_id`'s directory entry.
    pub fn home_shard(&self, client_id: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut h);
        (h.finish() % self.shards.len() as u64) as usize
    }

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
}

/// One shard's state, owned by its thread.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// What all shards share.
    pub node: Arc<NodeShared>,
    /// Connections.
    pub table: RefCell<Table>,
    /// Room index.
    pub rooms: RefCell<Rooms>,
    /// Client ids whose home is this shard → their live connection.
    pub directory: RefCell<HashMap<Arc<str>, ConnId>>,
    /// The one read buffer all of this shard's connections share.
    pub read_buf: RefCell<Box<[u8]>>,
    /// tungstenite settings for new contexts.
    pub ws_config: WsConfig,
    /// Set when draining started.
    pub draining: Cell<bool>,
    /// Cancels the pending accept on shutdown.
    pub accept_cancel: RefCell<Option<Canceller>>,
    epoch: Instant,
    id_counter: Cell<u64>,
}

/// Size of the shared read buffer: one recv takes at most this much.
const READ_BUF: usize = 64 * 1024;

impl Shard {
    /// A new shard state.
    pub fn new(id: usize, node: Arc<NodeShared>) -> Rc<Self> {
        let w = &node.config.websocket;
        let ws_config = WsConfig::default()
            .read_buffer_size(w.read_buffer_bytes)
            .write_buffer_size(0)
            .max_write_buffer_size(usize::MAX)
            .max_message_size(Some(w.max_message_bytes))
            .max_frame_size(Some(w.max_frame_bytes));
        Rc::new(Shard {
            id,
            table: RefCell::new(Table::with_capacity(
                id,
                node.capacity_per_shard + node.config.server.overflow_per_shard,
            )),
            rooms: RefCell::new(Rooms::default()),
            // Sized once for every slot: growing a large table mid-run costs a
            // copy and, with mimalloc, commits a fresh region each time.
            directory: RefCell::new(HashMap::with_capacity(node.capacity_per_shard)),
            read_buf: RefCell::new(vec![0u8; READ_BUF].into_boxed_slice()),
            ws_config,
            draining: Cell::new(false),
            accept_cancel: RefCell::new(None),
            epoch: Instant::now(),
            id_counter: Cell::new(0),
            node,
        })
    }

    /// This shard's metrics.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.shards[self.id].metrics
    }

    /// Milliseconds since the shard started (coarse clock for timers).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Microseconds since the shard started (ping stamps).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A fresh tungstenite context (allocated on first need only).
    pub fn new_context(&self) -> Box<WebSocketContext> {
        Box::new(WebSocketContext::new(Role::Server, Some(self.ws_config)))
    }

    /// A generated client id: 10 random hex digits (unique with overwhelming
    /// odds across nodes) followed by the shard and a per-shard counter in hex
    /// (certain on this node).
    pub fn generate_client_id(&self) -> String {
        let n = self.id_counter.get().wrapping_add(1);
        self.id_counter.set(n);
        format!("{:010x}{:x}{:x}", fastrand::u64(..) >> 24, self.id, n)
    }

    /// Sends to shard `to` (this one included: its own mailbox keeps order).
    pub fn send_to(&self, to: usize, msg: ShardMsg) -> Result<(), MailboxError> {
        let r = self.node.shards[to].mailbox.send(msg);
        match r {
            Ok(()) => self.metrics().cross_shard_sent.inc(),
            Err(_) => self.metrics().mailbox_full.inc(),
        }
        r
    }

    /// Offers `len` bytes, written by `write`, to connection `id`'s send queue.
    /// The size check comes first, so a full queue costs no copy.
    pub fn offer(self: &Rc<Self>, id: ConnId, len: usize, write: impl FnOnce(&mut Vec<u8>)) -> SendOutcome {
        let policy = self.node.config.websocket.slow_consumer;
        let cap = self.node.config.websocket.send_queue_bytes;
        let mut table = self.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return SendOutcome::Gone };
        if c.phase != Phase::Open {
            return SendOutcome::Closed;
        }
        if c.queued() + len > cap && c.queued() > 0 {
            drop(table);
            return match policy {
                SlowConsumerPolicy::Drop => {
                    self.metrics().send_queue_dropped.inc();
                    SendOutcome::Dropped
                }
                SlowConsumerPolicy::Close => {
                    self.metrics().slow_consumer_closed.inc();
                    self.start_close(id, crate::error::close::POLICY, "send queue full: reading too slowly", true);
                    SendOutcome::Closed
                }
            };
        }
        write(&mut c.out);
        self.metrics().messages_out.inc();
        self.kick_writer(id, c);
        SendOutcome::Queued
    }

    /// Queues a pre-built frame.
    pub fn send_frame(self: &Rc<Self>, id: ConnId, frame: &[u8]) -> SendOutcome {
        self.offer(id, frame.len(), |out| out.extend_from_slice(frame))
    }

    /// Frames `payload` as text and queues it.
    pub fn send_text(self: &Rc<Self>, id: ConnId, payload: &str) -> SendOutcome {
        self.offer(id, payload.len() + 10, |out| crate::protocol::push_text_frame(out, payload.as_bytes()))
    }

    /// Queues an error message and counts it.
    pub fn send_error(self: &Rc<Self>, id: ConnId, e: ClientError) {
        self.metrics().client_errors[e.index()].inc();
        self.send_text(id, &crate::protocol::error(e, crate::protocol::error_text(e)));
    }

    /// Starts a writer for `c` unless one is running.
    pub fn kick_writer(self: &Rc<Self>, id: ConnId, c: &mut table::Conn) {
        if c.writing || c.out.is_empty() {
            return;
        }
        let Some(stream) = c.stream.clone() else { return };
        c.writing = true;
        monoio::spawn(crate::ws::session::write_loop(self.clone(), id, stream));
    }

    /// Sends a close frame (`code`, `reason`) and moves `id` to `Closing`;
    /// `discard` drops what was queued (a slow reader would never get it).
    pub fn start_close(self: &Rc<Self>, id: ConnId, code: u16, reason: &'static str, discard: bool) {
        let close_timeout = self.node.config.websocket.close_timeout_ms;
        let now = self.now_ms();
        let mut table = self.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        match c.phase {
            Phase::Open => {}
            Phase::Http => {
                // Not upgraded: nothing to say in WebSocket terms.
                c.phase = Phase::Closing;
                c.close_deadline_ms = now;
                shutdown(c.fd, libc::SHUT_RDWR);
                return;
            }
            Phase::Closing => return,
        }
        c.phase = Phase::Closing;
        c.close_code = code;
        c.close_deadline_ms = now + close_timeout;
        if discard {
            c.out.clear();
        }
        let ctx = c.ctx.get_or_insert_with(|| self.new_context());
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let mut io = Io { input: &[], out: &mut c.out };
        if ctx.close(&mut io, Some(frame)).is_err() {
            crate::protocol::push_close_frame(&mut c.out, code, reason);
        }
        if c.out.is_empty() {
            shutdown(c.fd, libc::SHUT_RDWR);
        }
        self.kick_writer(id, c);
    }

    /// Removes a finished connection and everything that points at it.
    pub fn remove_conn(self: &Rc<Self>, id: ConnId) {
        let Some(c) = self.table.borrow_mut().remove(id) else { return };
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        if !c.slotted {
            m.overflow.fetch_sub(1, Ordering::Relaxed);
        }
        if c.phase != Phase::Http && c.upgraded {
            m.websockets.fetch_sub(1, Ordering::Relaxed);
            m.record_close(c.close_code);
            m.record_lifetime(c.accepted_at.elapsed().as_millis() as u64);
        }
        let mut emptied = Vec::new();
        {
            let mut rooms = self.rooms.borrow_mut();
            for room in &c.rooms {
                if rooms.leave(room, id) {
                    emptied.push(room.clone());
                }
            }
        }
        if let Some(cluster) = &self.node.cluster {
            for room in emptied {
                cluster.room_interest(self.id, &room, false);
            }
        }
        if let Some(client_id) = c.client_id {
            if let Some(cluster) = &self.node.cluster {
                cluster.conn_closed(&client_id);
            }
            let _ = self.send_to(self.node.home_shard(&client_id), ShardMsg::Unregister { client_id, conn: id });
        }
    }

    /// Delivers a room frame to local members except `origin`.
    pub fn deliver_room(self: &Rc<Self>, room: &str, frame: &Bytes, origin: Option<ConnId>) {
        let rooms = self.rooms.borrow();
        for &member in rooms.members(room).iter().filter(|m| Some(**m) != origin) {
            // The outcome is counted inside offer (drops, slow-consumer closes).
            self.send_frame(member, frame);
        }
    }

    /// Handles one mailbox message. Returns false on `Shutdown`.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) -> bool {
        self.metrics().cross_shard_received.inc();
        match msg {
            ShardMsg::Adopt { stream, accepted_at } => {
                self.metrics().adopted.inc();
                match monoio::net::TcpStream::from_std(stream) {
                    Ok(s) => accept::start_conn(self, s, accepted_at),
                    Err(e) => eprintln!("ringside: shard {}: adopt failed: {e}", self.id),
                }
            }
            ShardMsg::Room { room, frame, origin } => {
                self.deliver_room(&room, &frame, origin);
            }
            ShardMsg::Register { client_id, conn } => {
                let old = self.directory.borrow_mut().insert(client_id, conn);
                if let Some(old) = old.filter(|o| *o != conn) {
                    let kick = ShardMsg::Kick {
                        conn: old,
                        code: crate::error::close::REPLACED,
                        reason: "replaced by a newer connection with the same client_id",
                    };
                    let _ = self.send_to(old.shard(), kick);
                }
            }
            ShardMsg::Unregister { client_id, conn } => {
                let mut dir = self.directory.borrow_mut();
                if dir.get(&client_id) == Some(&conn) {
                    dir.remove(&client_id);
                }
            }
            ShardMsg::DirectRoute { to, frame, reply_to } => self.route_direct(to, frame, reply_to),
            ShardMsg::Deliver { conn, frame } => {
                self.send_frame(conn, &frame);
            }
            ShardMsg::UnknownClient { conn, to: _ } => self.send_error(conn, ClientError::UnknownClient),
            ShardMsg::Kick { conn, code, reason } => self.start_close(conn, code, reason, false),
            ShardMsg::Shutdown => return false,
        }
        true
    }

    fn route_direct(self: &Rc<Self>, to: Arc<str>, frame: Bytes, reply_to: Option<ConnId>) {
        let target = self.directory.borrow().get(&to).copied();
        match (target, reply_to) {
            (Some(conn), _) if conn.shard() == self.id => {
                self.send_frame(conn, &frame);
            }
            (Some(conn), _) => {
                let _ = self.send_to(conn.shard(), ShardMsg::Deliver { conn, frame });
            }
            (None, Some(from)) => match &self.node.cluster {
                Some(cluster) => cluster.direct(to, frame, from),
                None => {
                    let _ = self.send_to(from.shard(), ShardMsg::UnknownClient { conn: from, to });
                }
            },
            (None, None) => {}
        }
    }

    /// Starts draining: no more accepts, every connection closed with 1001.
    pub fn begin_drain(self: &Rc<Self>) {
        self.draining.set(true);
        if let Some(c) = self.accept_cancel.borrow_mut().take() {
            c.cancel();
        }
        // Sockets still in their HTTP request finish it: /ready and upgrades
        // get 503 draining (bounded by the handshake timeout). Open
        // WebSockets get 1001.
        let ids: Vec<ConnId> =
            self.table.borrow_mut().iter_mut().filter(|(_, c)| c.phase != Phase::Http).map(|(id, _)| id).collect();
        for id in ids {
            self.start_close(id, crate::error::close::GOING_AWAY, "server shutting down", false);
        }
    }

    /// Timers: handshake timeout, server pings, idle timeout, close deadline.
    pub fn sweep(self: &Rc<Self>) {
        let w = &self.node.config.websocket;
        let handshake_timeout = Duration::from_millis(self.node.config.server.handshake_timeout_ms);
        let now = self.now_ms();
        let mut pings = Vec::new();
        let mut idle = Vec::new();
        let mut readers = 0;
        {
            let mut table = self.table.borrow_mut();
            for (id, c) in table.iter_mut() {
                let quiet = now.saturating_sub(c.last_rx_ms);
                let reader_idle = c.ctx.as_ref().is_some_and(|ctx| ctx.can_write()) && c.boundary.at_rest();
                if c.phase == Phase::Open && quiet >= w.sweep_interval_ms && reader_idle {
                    // Quiet at a frame boundary: give the read buffer back.
                    c.ctx = None;
                }
                readers += c.ctx.is_some() as usize;
                match c.phase {
                    Phase::Http if c.accepted_at.elapsed() > handshake_timeout => {
                        self.metrics().rejected[Rejection::HandshakeTimeout.index()].inc();
                        c.phase = Phase::Closing;
                        c.close_deadline_ms = now;
                        shutdown(c.fd, libc::SHUT_RDWR);
                    }
                    Phase::Open if quiet > w.idle_timeout_ms => idle.push(id),
                    Phase::Open if quiet > w.ping_interval_ms && !c.ping_sent => {
                        c.ping_sent = true;
                        pings.push(id);
                    }
                    Phase::Closing if now > c.close_deadline_ms => shutdown(c.fd, libc::SHUT_RDWR),
                    _ => {}
                }
            }
        }
        self.metrics().frame_readers.store(readers, Ordering::Relaxed);
        if let Some(cluster) = &self.node.cluster {
            pings.extend(self.sample(cluster));
        }
        for id in pings {
            let stamp = self.now_us();
            if self.offer(id, 10, |out| crate::protocol::ping_frame(out, stamp)) == SendOutcome::Queued {
                self.metrics().pings_sent.inc();
            }
        }
        for id in idle {
            self.start_close(id, crate::error::close::IDLE_TIMEOUT, "idle timeout: no data or pong", true);
        }
    }
}

impl Shard {
    /// Reports a random sample of open connections (age, queue, last ping
    /// round trip) to the cluster thread, and returns those to ping now so
    /// the next sample has a fresh round trip.
    fn sample(&self, cluster: &crate::cluster::ClusterHandle) -> Vec<ConnId> {
        let k = self.node.config.cluster.sample_size;
        if k == 0 {
            return Vec::new();
        }
        // Reservoir sampling: one pass, k entries, uniform.
        let mut picked: Vec<(ConnId, crate::cluster::SampleEntry)> = Vec::with_capacity(k);
        let mut seen = 0usize;
        let mut table = self.table.borrow_mut();
        for (id, c) in table.iter_mut() {
            if c.phase != Phase::Open {
                continue;
            }
            seen += 1;
            let slot =
                if picked.len() < k { Some(picked.len()) } else { Some(fastrand::usize(..seen)).filter(|i| *i < k) };
            let Some(slot) = slot else { continue };
            let entry = crate::cluster::SampleEntry {
                client_id: c.client_id.as_deref().unwrap_or("echo").to_string(),
                shard: self.id,
                age_ms: c.accepted_at.elapsed().as_millis() as u64,
                queued_bytes: c.queued(),
                rtt_us: c.rtt_us as u64,
            };
            if slot == picked.len() {
                picked.push((id, entry));
            } else {
                picked[slot] = (id, entry);
            }
        }
        let ids = picked.iter().map(|(id, _)| *id).filter(|id| table.get(*id).is_some_and(|c| !c.ping_sent)).collect();
        drop(table);
        cluster.sample(self.id, picked.into_iter().map(|(_, e)| e).collect());
        ids
    }
}

/// The node's answers as one connection sees them: a socket kept past
/// capacity (overflow) is refused as full, whatever the shard's own state.
pub struct ConnView<'a> {
    /// The shard serving the connection.
    pub shard: &'a Shard,
    /// The connection holds no slot.
    pub overflow: bool,
}

impl crate::ws::handshake::Responder for ConnView<'_> {
    fn endpoint(&self, e: crate::ws::handshake::Endpoint) -> (u16, &'static str, String) {
        crate::http::endpoint(&self.shard.node, e)
    }

    fn admission(&self) -> Option<Rejection> {
        if self.shard.draining.get() || self.shard.node.is_draining() {
            Some(Rejection::Draining)
        } else if self.overflow {
            Some(Rejection::Full)
        } else {
            None
        }
    }

    fn retry_after(&self) -> u32 {
        self.shard.node.config.server.retry_after_secs
    }
}
