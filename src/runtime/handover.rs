//! Zero-disconnect upgrade, the runtime's part: a shard of the old process
//! freezes (stops accepting and stops reading, each connection at a frame
//! boundary), waits at a barrier until every message other shards sent it
//! before they froze has arrived, then hands every open WebSocket over:
//! a duplicate of its socket, what it had queued for the peer and the
//! application's state, to the node's upgrade thread, which passes them to
//! the new process. A shard of the new process resumes each one: a table
//! entry in the open phase and a reader, with the queued bytes written
//! first. The peer sees neither a close nor a gap: bytes it sends meanwhile
//! wait in the kernel's socket buffer, which both processes share.
//!
//! A direct descriptor (`server.io = "direct"`) first stops receiving (what
//! its ring had received and nobody read goes along as input) and is
//! installed as a real fd for the handover; the new process, if it serves
//! the direct path too, puts it back into its own ring's file table and
//! closes the fd, so neither process needs an fd per connection for longer
//! than one batch. A permessage-deflate connection moves with what it
//! agreed (no context takeover: there is no zlib state to move).
//!
//! Bounds: a shard has at most [`MAX_IN_FLIGHT`] connections handed to the
//! upgrade thread and not yet sent (each holds an fd and its queued bytes).
//!
//! What cannot move now (a frame or message half read past the deadline, a
//! socket that could not be detached) gets a reconnect hint (reason
//! `upgrade`) and 1001, as in a drain.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::shard::Shard;
use super::table::{Conn, ConnId, Phase};
use super::App;
use crate::config::Class;
use crate::transport::close;
use crate::transport::socket::SharedStream;

/// One connection on its way to the new process.
#[derive(Debug)]
pub struct Handed {
    /// The shard it was on (the new process resumes it on the same index).
    pub shard: usize,
    /// A duplicate of its socket.
    pub fd: OwnedFd,
    /// Its client address (the peer's, or what a trusted proxy said).
    pub client: IpAddr,
    /// Priority class.
    pub class: Class,
    /// Bytes queued for the peer, not yet written.
    pub out: Vec<u8>,
    /// Bytes of a frame still arriving (read here, not yet handled), then
    /// whatever was received and not yet read.
    pub input: Vec<u8>,
    /// permessage-deflate as agreed at the upgrade: (server window bits,
    /// whether the client named them) ([`crate::transport::deflate::Agreed::to_parts`]).
    pub deflate: Option<(u8, bool)>,
    /// The application's state ([`App::on_handover`]).
    pub app: Vec<u8>,
}

/// What a shard sends the upgrade thread.
#[derive(Debug)]
pub enum Item {
    /// A connection.
    Conn(Handed),
    /// Application state of the shard that is not a connection's (room
    /// histories), one blob each ([`App::handover_shard`]).
    Shared(Vec<u8>),
    /// Every `Shared` item of the sending shard was sent (its connections follow):
    /// the new process restores all shard state before any connection.
    SharedEnd,
    /// The shard is done: `moved` connections went over, `closed` could not.
    Done {
        /// Shard.
        shard: usize,
        /// Handed over.
        moved: usize,
        /// Hinted and closed instead.
        closed: usize,
    },
}

/// Barrier rounds: a message sent before a shard froze can cause another
/// (a publish → its room's home shard → every shard), so a shard hands over
/// only after this many rounds of markers from every other shard.
pub const ROUNDS: u8 = 3;

/// How long a shard waits for its connections to come to rest.
pub const REST_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections a shard has handed to the upgrade thread that it has
/// not sent yet (each holds an fd and its queued output).
pub const MAX_IN_FLIGHT: usize = 512;

/// How many connections a shard detaches at once.
const BATCH: usize = 128;

/// Where a shard of the old process hands its connections.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// To the upgrade thread.
    pub tx: crossbeam_channel::Sender<Item>,
    /// Connections sent on `tx` and not yet passed on (the thread
    /// decrements it): the shard waits while it is at [`MAX_IN_FLIGHT`].
    pub in_flight: Arc<AtomicUsize>,
}

/// Whether `c` is of a kind that can move: open, with a socket, no
/// compressed message open.
pub fn movable_kind<S>(c: &Conn<S>) -> bool {
    c.phase == Phase::Open && c.deflate.as_ref().is_none_or(|d| d.at_rest()) && c.stream.is_some()
}

/// Whether `c` can be handed over now: of a movable kind, no fragmented
/// message open (a frame still arriving is fine: its bytes go along), no
/// write in flight.
pub fn at_rest<S>(c: &Conn<S>) -> bool {
    movable_kind(c) && c.boundary.as_ref().is_none_or(|b| b.movable()) && !c.writing
}

impl<A: App> Shard<A> {
    /// `ShardMsg::Handover`: freeze, wait for rest and the barrier, hand over.
    pub(super) async fn hand_over(self: Rc<Self>, out: Outbox) {
        let tx = &out.tx;
        self.frozen.set(true);
        self.cancel_accepts();
        let n = self.node.shards.len();
        let start = Instant::now();
        // Readers stop reading now (`Shard::frozen`); wait for writes in
        // flight and for handshakes and closes to end (bounded).
        self.wait_rest(start, |c| match c.phase {
            Phase::Open => movable_kind(c) && !at_rest(c),
            Phase::Http | Phase::Closing => true,
        })
        .await;
        // Barrier: markers to every other shard, one round after another.
        for round in 1..=ROUNDS {
            for to in (0..n).filter(|&s| s != self.id) {
                let _ = self.node.shards[to].mailbox.send(super::mailbox::ShardMsg::Barrier { round });
            }
            while self.barriers.borrow()[round as usize - 1] < n - 1 && start.elapsed() < REST_TIMEOUT * 2 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let (mut moved, mut closed) = (0, 0);
        for blob in self.app.handover_shard(&self) {
            let _ = tx.send(Item::Shared(blob));
        }
        let _ = tx.send(Item::SharedEnd);
        // Hand over what is at rest; what is writing (a ping, a late
        // message) gets a moment more.
        let deadline = Instant::now() + REST_TIMEOUT;
        'passes: loop {
            let ids: Vec<ConnId> =
                self.table.borrow_mut().iter_mut().filter(|(_, c)| at_rest(c)).map(|(id, _)| id).collect();
            let mut progress = false;
            for batch in ids.chunks(BATCH) {
                // Bounded: at most MAX_IN_FLIGHT on their way (fds held);
                // an upgrade thread that stopped passing them on ends it.
                while out.in_flight.load(Ordering::Acquire) >= MAX_IN_FLIGHT {
                    if Instant::now() >= deadline {
                        break 'passes;
                    }
                    monoio::time::sleep(Duration::from_millis(1)).await;
                }
                let results = futures_util::future::join_all(batch.iter().map(|&id| self.hand_one(id))).await;
                for (&id, r) in batch.iter().zip(results) {
                    match r {
                        HandOne::Moved(h) => {
                            moved += 1;
                            progress = true;
                            out.in_flight.fetch_add(1, Ordering::AcqRel);
                            let _ = tx.send(Item::Conn(*h));
                        }
                        HandOne::Failed => {
                            progress = true;
                            closed += usize::from(self.cannot_move(id));
                        }
                        HandOne::NotYet | HandOne::Gone => {}
                    }
                }
            }
            if progress {
                continue;
            }
            // Writing (a ping, a late message), or the application's state
            // is not ready to move (an answer outstanding).
            let waiting = self.table.borrow_mut().iter_mut().any(|(_, c)| movable_kind(c) && !c.handing);
            if !waiting || Instant::now() >= deadline {
                break 'passes;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let rest: Vec<ConnId> =
            self.table.borrow_mut().iter_mut().filter(|(_, c)| c.phase == Phase::Open).map(|(id, _)| id).collect();
        for id in rest {
            closed += usize::from(self.cannot_move(id));
        }
        let _ = tx.send(Item::Done { shard: self.id, moved, closed });
        // What could not move closes as usual; then the shard stops.
        let end = Instant::now() + Duration::from_millis(self.node.config.websocket.close_timeout_ms + 500);
        while !self.table.borrow().is_empty() && Instant::now() < end {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = self.node.shards[self.id].mailbox.send(super::mailbox::ShardMsg::Stop);
    }

    async fn wait_rest(&self, start: Instant, busy: impl Fn(&Conn<A::Conn>) -> bool) {
        while start.elapsed() < REST_TIMEOUT && self.table.borrow_mut().iter_mut().any(|(_, c)| busy(c)) {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Hands `id` over if it can go now: its application state first (not
    /// ready: try again later, nothing touched), then its socket detached
    /// (an fd of its own, and what was received and not yet read), then,
    /// once no write is in flight, the entry taken out of the table.
    async fn hand_one(self: &Rc<Self>, id: ConnId) -> HandOne {
        let stream = {
            let mut table = self.table.borrow_mut();
            let Some(c) = table.get_mut(id) else { return HandOne::Gone };
            if !at_rest(c) {
                return HandOne::NotYet;
            }
            c.stream.clone()
        };
        let Some(stream) = stream else { return HandOne::Gone };
        if self.app.on_handover(self, id).is_none() {
            return HandOne::NotYet;
        }
        if let Some(c) = self.table.borrow_mut().get_mut(id) {
            c.handing = true;
        }
        let detached = stream.detach().await;
        // A write that started meanwhile (a ping, a room message): the new
        // process must write after it, so it ends here first.
        let end = Instant::now() + Duration::from_secs(1);
        while self.table.borrow().get(id).is_some_and(|c| c.writing) && Instant::now() < end {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        if let Some(c) = self.table.borrow_mut().get_mut(id) {
            c.handing = false;
        }
        match detached {
            Ok((fd, read)) => match self.take_for_handover(id, fd, read) {
                Some(h) => HandOne::Moved(Box::new(h)),
                None => HandOne::Failed,
            },
            Err(e) => {
                tracing::debug!(shard = self.id, error = %e, "upgrade: a socket could not be detached");
                HandOne::Failed
            }
        }
    }

    /// An open connection that does not go (detaching failed, it never
    /// came to rest, or it became busy meanwhile): hinted and closed 1001;
    /// its reader stopped at the freeze, so one lingers for the close.
    /// False when it was no longer open.
    fn cannot_move(self: &Rc<Self>, id: ConnId) -> bool {
        let stream = {
            let mut table = self.table.borrow_mut();
            let Some(c) = table.get_mut(id) else { return false };
            c.handing = false;
            if c.phase != Phase::Open {
                return false;
            }
            c.stream.clone()
        };
        self.app.on_upgrade_close(self, id);
        self.start_close(id, close::GOING_AWAY, "server upgrading: reconnect", false);
        if let Some(stream) = stream {
            monoio::spawn(super::session::resumed(self.clone(), stream, id));
        }
        true
    }

    /// Takes `id` out of the table for the new process, without a close:
    /// `fd` (its socket's own copy) goes over with `read` (received, not
    /// yet read) after any frame it had begun; its slot and gauges are
    /// released and our copy of the socket closes with the entry.
    fn take_for_handover(self: &Rc<Self>, id: ConnId, fd: OwnedFd, read: Vec<u8>) -> Option<Handed> {
        if !self.table.borrow().get(id).is_some_and(at_rest) {
            return None;
        }
        let app = self.app.on_handover(self, id)?;
        let mut c = self.table.borrow_mut().remove(id)?;
        self.unfinished.set(self.unfinished.get() - c.unfinished_bytes as usize);
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        if c.slotted {
            self.node.classes.sub(c.class);
        }
        if c.upgraded {
            m.websockets.fetch_sub(1, Ordering::Relaxed);
        }
        m.handed_over.inc();
        let mut input = c.partial.take().map(|b| *b).unwrap_or_default();
        input.extend_from_slice(&read);
        let out = std::mem::take(&mut c.out);
        let deflate = c.deflate.as_ref().and_then(|d| d.agreed).map(|a| a.to_parts());
        let handed = Handed { shard: self.id, fd, client: c.client, class: c.class, out, input, deflate, app };
        // The entry's socket closes when its last holder lets go; the reader
        // (parked on readability, or already gone) never reads it again.
        drop(c);
        Some(handed)
    }

    /// `ShardMsg::Resume` in the new process: an open connection from the
    /// old one, parked (a table entry and a slot, no reader, no
    /// application state) until `ShardMsg::ResumeAll`. On the direct path
    /// its socket goes into this shard's ring and the fd is closed.
    pub(super) async fn adopt(self: Rc<Self>, h: Handed) {
        let stream = match self.ring.get() {
            Some(ring) => SharedStream::direct_from_fd(ring, h.fd).await,
            None => adopt_poll(h.fd),
        };
        self.adopting.set(self.adopting.get() - 1);
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "cannot adopt a handed-over socket");
                self.metrics().rejected[crate::transport::http::Rejection::Full.index()].inc();
                return;
            }
        };
        let mut conn = Conn::new(stream.fd(), false, self.now_ms(), Instant::now());
        conn.stream = Some(stream.clone());
        conn.client = h.client;
        conn.class = h.class;
        conn.phase = Phase::Open;
        conn.upgraded = true;
        conn.out = h.out;
        if let Some(a) = h.deflate.and_then(|(bits, named)| crate::transport::deflate::Agreed::from_parts(bits, named))
        {
            conn.deflate = Some(Box::new(crate::transport::deflate::Inbound::new(a)));
        }
        let id = self.table.borrow_mut().insert(conn);
        if !self.table.borrow_mut().take_slot(id, self.node.capacity_per_shard) {
            self.start_close(id, close::TRY_AGAIN_LATER, "server busy: no slot after the upgrade", true);
            monoio::spawn(super::session::resumed(self.clone(), stream, id));
            return;
        }
        self.node.classes.add(h.class);
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        m.websockets.fetch_add(1, Ordering::Relaxed);
        self.parked.borrow_mut().push(Parked { id, app: h.app, input: h.input });
    }

    /// `ShardMsg::ResumeAll`: every connection came over. Once the last
    /// adoption finished, the parked ones get their application state back
    /// (rooms, directory). Only when every shard has done so do they read
    /// (their begun frame first) and write what they had queued: a client
    /// resumed and read on one shard would otherwise publish to a room whose
    /// members on another shard are not back in it yet, and they would miss
    /// that message (the storm harness saw exactly that, one offset per room).
    pub(super) async fn resume_parked(self: Rc<Self>, restored: Arc<AtomicUsize>) {
        while self.adopting.get() > 0 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let parked = std::mem::take(&mut *self.parked.borrow_mut());
        for p in &parked {
            self.metrics().resumed.inc();
            self.app.on_resume(&self, p.id, &p.app);
        }
        restored.fetch_add(1, Ordering::AcqRel);
        let n = self.node.shards.len();
        let end = Instant::now() + REST_TIMEOUT;
        while restored.load(Ordering::Acquire) < n && Instant::now() < end {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        for p in parked {
            let Some(stream) = self.table.borrow().get(p.id).and_then(|c| c.stream.clone()) else { continue };
            if !p.input.is_empty() {
                // The frame the old process had begun reading: it continues here.
                super::session::feed(&self, p.id, &p.input);
            }
            monoio::spawn(super::session::resumed(self.clone(), stream, p.id));
        }
    }
}

/// What became of one connection picked for the handover.
enum HandOne {
    Moved(Box<Handed>),
    /// Not at rest, or its application state cannot move yet.
    NotYet,
    /// Could not be detached or taken: it is hinted and closed.
    Failed,
    /// Closed meanwhile.
    Gone,
}

/// A connection that came over, waiting for `ShardMsg::ResumeAll`.
#[derive(Debug)]
pub struct Parked {
    id: ConnId,
    app: Vec<u8>,
    input: Vec<u8>,
}

/// A handed-over fd served through monoio (the poll path).
fn adopt_poll(fd: OwnedFd) -> std::io::Result<SharedStream> {
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(SharedStream::new(monoio::net::TcpStream::from_std(stream)?))
}
