//! One shard: a monoio runtime on its own thread, pinned to one core, with
//! its own SO_REUSEPORT listener, slab table and application state. Other
//! threads reach it only through its mailbox.
//!
//! Everything here runs on the shard thread; `RefCell` borrows are never held
//! across an `.await`, nor while the application runs.

use std::cell::{Cell, RefCell, RefMut};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use monoio::io::Canceller;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig as WsConfig, WebSocketContext};

use super::limits::{HandshakeSlots, Refusal};
use super::mailbox::{MailboxError, ShardMsg};
use super::metrics::ShardMetrics;
use super::priority::Waiters;
use super::table::{Conn, ConnId, Phase, Table};
use super::{accept, App, Conns, NodeState, Peer, Sampled, SendOutcome};
use crate::config::SlowConsumerPolicy;
use crate::transport::close;
use crate::transport::deflate::Codec;
use crate::transport::frame::{self, Io};
use crate::transport::http::Rejection;

/// One shard's state, owned by its thread.
pub struct Shard<A: App> {
    /// Shard index.
    pub id: usize,
    /// What all shards share.
    pub node: Arc<NodeState<A::Msg>>,
    /// Connections.
    pub table: RefCell<Table<A::Conn>>,
    /// The application this shard serves.
    pub app: A,
    /// The one read buffer all of this shard's connections share.
    pub read_buf: RefCell<Box<[u8]>>,
    /// tungstenite settings for new contexts.
    pub ws_config: WsConfig,
    /// Set when draining started.
    pub draining: Cell<bool>,
    /// Set at the end of a drain: the accept loops return.
    pub accepting_stopped: Cell<bool>,
    /// Set when a handover to a new process starts: readers stop reading.
    pub frozen: Cell<bool>,
    /// Handover barrier markers received, per round.
    pub barriers: RefCell<[usize; super::handover::ROUNDS as usize]>,
    /// Readers waiting for their connection's writer to finish (before a
    /// lingering close, or over the send cap): few at a time, so kept here
    /// rather than a waker's 16 bytes in every connection's entry.
    pub flush_wakers: RefCell<std::collections::HashMap<ConnId, std::task::Waker>>,
    /// New process: adoptions of handed-over sockets still running.
    pub adopting: Cell<usize>,
    /// New process: connections taken in, waiting for `ShardMsg::ResumeAll`.
    pub parked: RefCell<Vec<super::handover::Parked>>,
    /// Cancels the pending accept on shutdown.
    pub accept_cancel: RefCell<Option<Canceller>>,
    /// Cancels the internal listener's pending accept on shutdown.
    pub admin_cancel: RefCell<Option<Canceller>>,
    /// The shard's own ring when it serves the direct socket path.
    pub ring: std::cell::OnceCell<Rc<crate::transport::uring::Ring>>,
    /// The listener the direct accepts wait on (-1: none), for cancelling them.
    pub direct_listener: Cell<std::os::fd::RawFd>,
    /// Sockets that have not finished their upgrade.
    pub handshakes: RefCell<HandshakeSlots>,
    /// Upgrades waiting for a slot.
    pub waiters: RefCell<Waiters>,
    /// Bytes held in unfinished frames and messages, all connections.
    pub unfinished: Cell<usize>,
    /// permessage-deflate's zlib state for all the shard's connections,
    /// created on first use.
    codec: RefCell<Option<Box<Codec>>>,
    epoch: Instant,
}

/// Size of the shared read buffer: one recv takes at most this much.
const READ_BUF: usize = 64 * 1024;

impl<A: App> Shard<A> {
    /// A new shard state serving `app`.
    pub fn new(id: usize, node: Arc<NodeState<A::Msg>>, app: A) -> Rc<Self> {
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
                node.capacity_per_shard + node.config.limits.max_handshakes_per_shard,
            )),
            app,
            read_buf: RefCell::new(vec![0u8; READ_BUF].into_boxed_slice()),
            ws_config,
            draining: Cell::new(false),
            accepting_stopped: Cell::new(false),
            frozen: Cell::new(false),
            barriers: RefCell::new([0; super::handover::ROUNDS as usize]),
            adopting: Cell::new(0),
            flush_wakers: RefCell::default(),
            parked: RefCell::new(Vec::new()),
            accept_cancel: RefCell::new(None),
            admin_cancel: RefCell::new(None),
            ring: std::cell::OnceCell::new(),
            direct_listener: Cell::new(-1),
            handshakes: RefCell::new(HandshakeSlots::new(
                node.config.limits.max_handshakes_per_shard,
                node.config.limits.max_handshakes_per_ip,
            )),
            waiters: RefCell::new(Waiters::default()),
            unfinished: Cell::new(0),
            codec: RefCell::new(None),
            epoch: Instant::now(),
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

    /// The shard's permessage-deflate codec (created on first use).
    pub fn codec(&self) -> RefMut<'_, Codec> {
        let level = self.node.config.websocket.deflate_level;
        RefMut::map(self.codec.borrow_mut(), |c| &mut **c.get_or_insert_with(|| Box::new(Codec::new(level))))
    }

    /// Copies the codec's totals into this shard's metrics (by the sweep).
    pub fn publish_deflate_stats(&self) {
        let Ok(codec) = self.codec.try_borrow() else { return };
        let Some(s) = codec.as_ref().map(|c| c.stats) else { return };
        let totals = [s.inflated, s.compressed, s.reused, s.plain_bytes, s.wire_bytes];
        for (counter, v) in self.metrics().deflate.iter().zip(totals) {
            counter.set(v);
        }
    }

    /// A fresh tungstenite context (allocated on first need only).
    pub fn new_context(&self) -> Box<WebSocketContext> {
        Box::new(WebSocketContext::new(Role::Server, Some(self.ws_config)))
    }

    /// Sends a runtime message to shard `to`, counting the outcome.
    pub fn send_msg(&self, to: usize, msg: ShardMsg<A::Msg>) -> Result<(), MailboxError> {
        let r = self.node.shards[to].mailbox.send(msg);
        match r {
            Ok(()) => self.metrics().cross_shard_sent.inc(),
            Err(_) => self.metrics().mailbox_full.inc(),
        }
        r
    }

    /// Starts a writer for `c` unless one is running.
    pub fn kick_writer(self: &Rc<Self>, id: ConnId, c: &mut Conn<A::Conn>) {
        if c.writing || c.out.is_empty() {
            return;
        }
        let Some(stream) = c.stream.clone() else { return };
        c.writing = true;
        monoio::spawn(super::session::write_loop(self.clone(), id, stream));
    }

    /// The one close path: sends a close frame (`code`, `reason`) and moves
    /// `id` to `Closing`; `discard` drops what was queued (a slow reader would
    /// never get it). A socket still in its HTTP phase is shut down instead.
    pub fn start_close(self: &Rc<Self>, id: ConnId, code: u16, reason: &'static str, discard: bool) {
        let deadline = self.now_ms() + self.node.config.websocket.close_timeout_ms;
        let mut table = self.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        match c.phase {
            Phase::Open => {}
            // Not upgraded: nothing to say in WebSocket terms.
            Phase::Http => return c.abort(self.now_ms()),
            Phase::Closing => return,
        }
        c.closing(deadline, code);
        if discard {
            c.out.clear();
        }
        let ctx = c.ctx.get_or_insert_with(|| self.new_context());
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let mut io = Io { input: &[], out: &mut c.out };
        if ctx.close(&mut io, Some(frame)).is_err() {
            frame::push_close(&mut c.out, code, reason);
        }
        if c.out.is_empty() {
            c.abort(self.now_ms());
        }
        self.kick_writer(id, c);
    }

    /// Removes a finished connection and hands its state to the application.
    pub fn remove_conn(self: &Rc<Self>, id: ConnId) {
        let Some(c) = self.table.borrow_mut().remove(id) else { return };
        if let Some(w) = self.flush_wakers.borrow_mut().remove(&id) {
            w.wake();
        }
        self.unfinished.set(self.unfinished.get() - c.unfinished_bytes as usize);
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        if c.slotted {
            self.node.classes.sub(c.class);
            self.waiters.borrow_mut().wake_first();
        } else {
            self.handshakes.borrow_mut().release(c.handshake_key(id), id.raw());
            m.handshakes.store(self.handshakes.borrow().len(), Ordering::Relaxed);
        }
        if c.phase != Phase::Http && c.upgraded {
            m.websockets.fetch_sub(1, Ordering::Relaxed);
            m.record_close(c.close_code);
            m.record_lifetime(c.accepted_at.elapsed().as_millis() as u64);
        }
        self.app.on_close(self, id, c.app);
    }

    /// Handles one mailbox message. Returns false on `Stop` (the drain is over).
    pub fn handle(self: &Rc<Self>, msg: ShardMsg<A::Msg>) -> bool {
        self.metrics().cross_shard_received.inc();
        match msg {
            ShardMsg::Adopt { stream, accepted_at, peer } => {
                self.metrics().adopted.inc();
                match monoio::net::TcpStream::from_std(stream) {
                    Ok(s) => accept::start_conn(self, s, accepted_at, peer, accept::Listener::Public),
                    Err(e) => tracing::warn!(shard = self.id, error = %e, "adopting a socket failed"),
                }
            }
            ShardMsg::App(m) => self.app.on_mail(self, m),
            ShardMsg::Kick { conn, code, reason } => self.start_close(conn, code, reason, false),
            ShardMsg::Shutdown => {
                if !self.draining.get() {
                    monoio::spawn(super::thread::drain(self.clone()));
                }
            }
            ShardMsg::Stop => return false,
            ShardMsg::Handover { out } => {
                if !self.frozen.get() && !self.draining.get() {
                    monoio::spawn(self.clone().hand_over(out));
                }
            }
            ShardMsg::Barrier { round } => {
                if let Some(n) = self.barriers.borrow_mut().get_mut(round as usize - 1) {
                    *n += 1;
                }
            }
            ShardMsg::Resume { handed } => {
                self.adopting.set(self.adopting.get() + 1);
                monoio::spawn(self.clone().adopt(*handed));
            }
            ShardMsg::ResumeAll { restored } => {
                monoio::spawn(self.clone().resume_parked(restored));
            }
        }
        true
    }

    /// Applies the per-address limits to `id` as coming from `ip`; a
    /// connection is counted once (later calls only update its address).
    pub fn admit_ip(&self, id: ConnId, ip: std::net::IpAddr) -> Result<(), (Rejection, u32)> {
        let Some(table) = &self.node.ip_table else { return Ok(()) };
        let guard = table.admit(ip, table.now_ms());
        let mut conns = self.table.borrow_mut();
        let Some(c) = conns.get_mut(id) else { return Ok(()) };
        if c.ip_guard.is_some() {
            return Ok(());
        }
        match guard {
            Ok(g) => {
                c.ip_guard = Some(g);
                Ok(())
            }
            Err(Refusal::TooManyConnections) => Err((Rejection::TooManyConnections, 1)),
            Err(Refusal::RateLimited { retry_after_secs }) => Err((Rejection::RateLimited, retry_after_secs)),
        }
    }

    /// Starts draining: upgrades and `/ready` answer 503 from now on; the
    /// listeners stay open (a balancer's check gets its 503 instead of a
    /// refused connection) until [`Shard::stop_accepting`].
    pub fn begin_drain(self: &Rc<Self>) {
        self.draining.set(true);
    }

    /// The end of a drain: no more accepts, every open WebSocket closed
    /// with 1001. Returns how many got the close.
    pub fn stop_accepting(self: &Rc<Self>) -> usize {
        self.cancel_accepts();
        // Sockets still in their HTTP request finish it: /ready and upgrades
        // get 503 draining (bounded by the handshake timeout). Open
        // WebSockets get 1001.
        let ids: Vec<ConnId> =
            self.table.borrow_mut().iter_mut().filter(|(_, c)| c.phase == Phase::Open).map(|(id, _)| id).collect();
        for &id in &ids {
            self.start_close(id, close::GOING_AWAY, "server shutting down", false);
        }
        ids.len()
    }

    /// Stops the accept loops (the listeners themselves stay open until
    /// the process exits: a new process may be serving them).
    pub fn cancel_accepts(&self) {
        self.accepting_stopped.set(true);
        if let Some(c) = self.accept_cancel.borrow_mut().take() {
            c.cancel();
        }
        if let Some(c) = self.admin_cancel.borrow_mut().take() {
            c.cancel();
        }
        if let (Some(ring), fd) = (self.ring.get(), self.direct_listener.get()) {
            if fd >= 0 {
                ring.cancel_fd(fd);
            }
        }
    }

    /// Open WebSockets (upgraded, not closing).
    pub fn open_websockets(&self) -> Vec<ConnId> {
        self.table.borrow_mut().iter_mut().filter(|(_, c)| c.phase == Phase::Open).map(|(id, _)| id).collect()
    }

    /// Whether any WebSocket is open (upgraded, not closing); no allocation.
    pub fn has_open_websockets(&self) -> bool {
        self.table.borrow_mut().iter_mut().any(|(_, c)| c.phase == Phase::Open)
    }

    /// Whether `id` is an open WebSocket (upgraded, not closing).
    pub fn is_open(&self, id: ConnId) -> bool {
        self.table.borrow().get(id).is_some_and(|c| c.phase == Phase::Open)
    }
}

impl<A: App> Conns<A> for Rc<Shard<A>> {
    fn shard_id(&self) -> usize {
        self.id
    }

    fn node(&self) -> &NodeState<A::Msg> {
        &self.node
    }

    fn offer(&self, id: ConnId, len: usize, write: impl FnOnce(&mut Vec<u8>)) -> SendOutcome {
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
                    self.start_close(id, close::POLICY, "send queue full: reading too slowly", true);
                    SendOutcome::Closed
                }
            };
        }
        match c.deflate.as_ref().map_or(0, |d| d.server_bits()) {
            0 => write(&mut c.out),
            bits => {
                let min = self.node.config.websocket.deflate_min_bytes;
                self.codec().compress_with(bits, min, &mut c.out, write);
            }
        }
        self.metrics().messages_out.inc();
        self.kick_writer(id, c);
        SendOutcome::Queued
    }

    fn close(&self, id: ConnId, code: u16, reason: &'static str) {
        self.start_close(id, code, reason, false);
    }

    fn send_to(&self, to: usize, msg: A::Msg) -> Result<(), MailboxError> {
        self.send_msg(to, ShardMsg::App(msg))
    }

    fn state<R>(&self, id: ConnId, f: impl FnOnce(&mut A::Conn) -> R) -> Option<R> {
        self.table.borrow_mut().get_mut(id).map(|c| f(&mut c.app))
    }

    fn admission(&self, _id: ConnId) -> Option<Rejection> {
        // Capacity is decided when the upgrade takes its slot (by class,
        // waiting or preempting: `session::admit_slot`).
        (self.draining.get() || self.node.is_draining()).then_some(Rejection::Draining)
    }

    fn now_ms(&self) -> u64 {
        Shard::now_ms(self)
    }

    fn peer(&self, id: ConnId) -> Option<Peer> {
        self.table.borrow().get(id).map(|c| Peer { client: c.client, via_proxy: c.via_proxy, admin: c.admin })
    }

    fn admit_ip(&self, id: ConnId, ip: std::net::IpAddr) -> Result<(), (Rejection, u32)> {
        Shard::admit_ip(self, id, ip)
    }

    fn sample(&self, k: usize) -> Vec<Sampled> {
        self.sample_open(k)
    }

    fn least_active(&self, k: usize, keep: impl Fn(&A::Conn) -> bool) -> Vec<ConnId> {
        self.least_active_open(k, keep)
    }
}
