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
//! What cannot move now (a frame or message half read past the deadline,
//! permessage-deflate, the direct socket path) gets a reconnect hint
//! (reason `upgrade`) and 1001, as in a drain.

use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
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
    /// Bytes of a frame still arriving (read here, not yet handled).
    pub input: Vec<u8>,
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

/// Whether `c` is of a kind that can move: open, a plain fd (not a direct
/// descriptor), no compression state.
pub fn movable_kind<S>(c: &Conn<S>) -> bool {
    c.phase == Phase::Open && c.deflate.is_none() && c.stream.as_ref().is_some_and(|s| s.fd() >= 0)
}

/// Whether `c` can be handed over now: of a movable kind, no fragmented
/// message open (a frame still arriving is fine: its bytes go along), no
/// write in flight.
pub fn at_rest<S>(c: &Conn<S>) -> bool {
    movable_kind(c) && c.boundary.movable() && !c.writing
}

impl<A: App> Shard<A> {
    /// `ShardMsg::Handover`: freeze, wait for rest and the barrier, hand over.
    pub(super) async fn hand_over(self: Rc<Self>, tx: crossbeam_channel::Sender<Item>) {
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
        loop {
            let ids: Vec<ConnId> =
                self.table.borrow_mut().iter_mut().filter(|(_, c)| at_rest(c)).map(|(id, _)| id).collect();
            for id in ids {
                if let Some(h) = self.take_for_handover(id) {
                    moved += 1;
                    let _ = tx.send(Item::Conn(h));
                }
            }
            // Writing (a ping, a late message), or the application's state
            // is not ready to move (an answer outstanding).
            let waiting = self.table.borrow_mut().iter_mut().any(|(_, c)| movable_kind(c));
            if !waiting || Instant::now() >= deadline {
                break;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        let rest: Vec<ConnId> =
            self.table.borrow_mut().iter_mut().filter(|(_, c)| c.phase == Phase::Open).map(|(id, _)| id).collect();
        for id in rest {
            closed += 1;
            self.app.on_upgrade_close(&self, id);
            self.start_close(id, close::GOING_AWAY, "server upgrading: reconnect", false);
            // Its reader stopped at the freeze: one lingers for the close.
            if let Some(stream) = self.table.borrow().get(id).and_then(|c| c.stream.clone()) {
                monoio::spawn(super::session::resumed(self.clone(), stream, id));
            }
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

    /// Takes `id` out of the table for the new process, without a close:
    /// its socket is duplicated (the copy goes over; ours closes with the
    /// entry) and its slot and gauges are released.
    fn take_for_handover(self: &Rc<Self>, id: ConnId) -> Option<Handed> {
        let fd = {
            let table = self.table.borrow();
            let c = table.get(id)?;
            if !at_rest(c) {
                return None;
            }
            c.stream.as_ref().map(|s| s.fd())?
        };
        let app = self.app.on_handover(self, id)?;
        // SAFETY: `fd` is this connection's open socket; dup gives a new
        // descriptor owned by nobody else.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return None;
        }
        // SAFETY: just created, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        let mut c = self.table.borrow_mut().remove(id)?;
        self.unfinished.set(self.unfinished.get() - c.unfinished_bytes);
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        if c.slotted {
            self.node.classes.sub(c.class);
        }
        if c.upgraded {
            m.websockets.fetch_sub(1, Ordering::Relaxed);
        }
        m.handed_over.inc();
        let input = c.partial.take().map(|b| *b).unwrap_or_default();
        let out = std::mem::take(&mut c.out);
        let handed = Handed { shard: self.id, fd, client: c.client, class: c.class, out, input, app };
        // The entry's socket closes when its last holder lets go; the reader
        // (parked on readability, or already gone) never reads it again.
        drop(c);
        Some(handed)
    }

    /// `ShardMsg::Resume` in the new process: an open connection from the
    /// old one. False when it cannot be taken (no slot): it is closed 1013.
    pub(super) fn resume(self: &Rc<Self>, h: Handed) -> bool {
        let stream = std::net::TcpStream::from(h.fd);
        let _ = stream.set_nonblocking(true);
        let stream = match monoio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "cannot adopt a handed-over socket");
                return false;
            }
        };
        let stream = Rc::new(SharedStream::new(stream));
        let mut conn = Conn::new(stream.fd(), false, self.now_ms(), Instant::now());
        conn.stream = Some(stream.clone());
        conn.client = h.client;
        conn.class = h.class;
        conn.phase = Phase::Open;
        conn.upgraded = true;
        conn.out = h.out;
        let input = h.input;
        let h_app = h.app;
        let id = self.table.borrow_mut().insert(conn);
        if !self.table.borrow_mut().take_slot(id, self.node.capacity_per_shard) {
            self.start_close(id, close::TRY_AGAIN_LATER, "server busy: no slot after the upgrade", true);
            monoio::spawn(super::session::resumed(self.clone(), stream, id));
            return false;
        }
        self.node.classes.add(h.class);
        let m = self.metrics();
        m.connections.store(self.table.borrow().slotted(), Ordering::Relaxed);
        m.websockets.fetch_add(1, Ordering::Relaxed);
        m.resumed.inc();
        self.app.on_resume(self, id, &h_app);
        if !input.is_empty() {
            // The frame the old process had begun reading: it continues here.
            super::session::feed(self, id, &input);
        }
        monoio::spawn(super::session::resumed(self.clone(), stream, id));
        true
    }
}
