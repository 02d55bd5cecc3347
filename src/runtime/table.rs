//! The shard's slab connection table and the connection id that indexes it.
//!
//! Only the owning shard thread touches its table. A [`ConnId`] packs shard,
//! slot and a generation: the generation is a per-table counter stamped on
//! every insert, so an id kept after its connection closed can never reach a
//! newer connection that reuses the slot.

use std::os::fd::RawFd;
use std::time::Instant;

use slab::Slab;
use tungstenite::protocol::WebSocketContext;

use crate::config::MAX_SLOTS_PER_SHARD;
use crate::transport::boundary::Boundary;
use crate::transport::socket::{shutdown, SharedStream};

/// Bits of a [`ConnId`] for the slot (4M connections per shard).
pub const SLOT_BITS: u32 = 22;
/// Bits of a [`ConnId`] for the shard (1024 shards).
pub const SHARD_BITS: u32 = 10;
const GEN_BITS: u32 = 32;
// The configuration's limit on slots is what the id can address.
const _: () = assert!(1 << SLOT_BITS == MAX_SLOTS_PER_SHARD);

/// Shard (10 bits) | slot (22 bits) | generation (32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// Packs the three parts. `shard` and `slot` must fit their bits.
    pub fn new(shard: usize, slot: usize, generation: u32) -> Self {
        debug_assert!(shard < (1 << SHARD_BITS) && slot < (1 << SLOT_BITS));
        ConnId(((shard as u64) << (SLOT_BITS + GEN_BITS)) | ((slot as u64) << GEN_BITS) | generation as u64)
    }

    /// The owning shard.
    pub fn shard(self) -> usize {
        (self.0 >> (SLOT_BITS + GEN_BITS)) as usize
    }

    /// The slab slot.
    pub fn slot(self) -> usize {
        ((self.0 >> GEN_BITS) & ((1 << SLOT_BITS) - 1)) as usize
    }

    /// The generation stamped at insert.
    pub fn generation(self) -> u32 {
        self.0 as u32
    }

    /// The packed value (for tables keyed by plain integers).
    pub fn raw(self) -> u64 {
        self.0
    }

    /// An id from [`ConnId::raw`].
    pub fn from_raw(raw: u64) -> Self {
        ConnId(raw)
    }
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the HTTP request.
    Http,
    /// Upgraded; messages flow.
    Open,
    /// We sent a close frame (or are about to); waiting for the peer's or the deadline.
    Closing,
}

/// An instant in 8 bytes (a `std::time::Instant` takes 16, in every
/// connection's entry): nanoseconds since the process first asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Stamp {
    /// `t` as a stamp (instants before the epoch count as the epoch).
    pub fn from_instant(t: Instant) -> Stamp {
        Stamp(t.saturating_duration_since(epoch()).as_nanos() as u64)
    }

    /// The instant again.
    pub fn instant(self) -> Instant {
        epoch() + std::time::Duration::from_nanos(self.0)
    }

    /// Time since.
    pub fn elapsed(self) -> std::time::Duration {
        self.instant().elapsed()
    }
}

/// One connection's state. Kept small: an idle connection costs this entry
/// plus its reader task, and nothing else (no read buffer, no context).
pub struct Conn<S> {
    /// Generation stamped at insert.
    pub generation: u32,
    /// The socket, for `shutdown(2)` from the sweeper or a kick.
    pub fd: RawFd,
    /// Current phase.
    pub phase: Phase,
    /// Holds one of the shard's WebSocket slots (taken at the upgrade;
    /// before it, the socket holds a handshake slot instead).
    pub slotted: bool,
    /// The client's address: the peer's, or the one a trusted proxy gave.
    pub client: std::net::IpAddr,
    /// Counts toward the per-address limits while it lives.
    pub ip_guard: Option<super::limits::IpGuard>,
    /// The socket peer is a trusted proxy.
    pub via_proxy: bool,
    /// From a trusted proxy, and its PROXY header (if any) not yet read.
    pub proxy_pending: bool,
    /// Came in on the internal listener.
    pub admin: bool,
    /// Priority class (set when it takes its slot).
    pub class: crate::config::Class,
    /// When accepted (handshake latency, handshake timeout, lifetime).
    pub accepted_at: Stamp,
    /// Last time anything arrived from the peer (ms since shard epoch).
    pub last_rx_ms: u64,
    /// A server ping is outstanding.
    pub ping_sent: bool,
    /// Round trip of the last answered server ping, µs (0 = none yet).
    pub rtt_us: u32,
    /// Deadline for the peer's close reply (ms since shard epoch), in `Closing`.
    pub close_deadline_ms: u64,
    /// The application's per-connection state.
    pub app: S,
    /// Frame reader, created on the first inbound byte after the upgrade
    /// and dropped again when the connection rests at a frame boundary.
    pub ctx: Option<Box<WebSocketContext>>,
    /// Where the inbound byte stream stands relative to frames.
    /// `None` at rest (whole frames only, no fragmented message open): a
    /// resting boundary is a fresh one, and the many idle connections then
    /// pay 8 bytes for it instead of 48.
    pub boundary: Option<Box<Boundary>>,
    /// Bytes of a frame still arriving (tungstenite gets whole frames only);
    /// boxed, so that the many connections without one pay 8 bytes.
    pub partial: Option<Box<Vec<u8>>>,
    /// What this connection holds unfinished (partial frame + open
    /// fragmented message), as counted in the shard's total.
    pub unfinished_bytes: u32,
    /// When the unfinished frame or message started (ms since shard epoch), 0 = none.
    pub unfinished_since_ms: u64,
    /// Bytes queued for the socket, not yet handed to the kernel.
    pub out: Vec<u8>,
    /// Bytes in the write currently in flight (a write is at most the send
    /// queue's cap, far below 4 GiB).
    pub inflight: u32,
    /// When the write in flight started (ms since shard epoch).
    pub write_started_ms: u64,
    /// A writer is running (inline in the reader or as its own task).
    pub writing: bool,
    /// The socket, shared with the writer task.
    pub stream: Option<SharedStream>,
    /// Counted as an open WebSocket (for gauges and close metrics).
    pub upgraded: bool,
    /// Being detached for a handover to a new process.
    pub handing: bool,
    /// The sweep asks its (direct-path) reader to retire at its next wait.
    pub retire: bool,
    /// No reader task: an idle waker starts one ([`super::idle`]).
    pub retired: bool,
    /// Close code we sent or will send (for metrics), 0 = none.
    pub close_code: u16,
    /// permessage-deflate, when the upgrade accepted it: where the inbound
    /// compressed message stands (no zlib state: that is the shard's).
    pub deflate: Option<Box<crate::transport::deflate::Inbound>>,
}

impl<S: Default> Conn<S> {
    /// A freshly accepted socket.
    pub fn new(fd: RawFd, slotted: bool, now_ms: u64, accepted_at: Instant) -> Self {
        Conn {
            generation: 0,
            fd,
            phase: Phase::Http,
            slotted,
            client: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            ip_guard: None,
            via_proxy: false,
            proxy_pending: false,
            admin: false,
            class: crate::config::Class::Normal,
            accepted_at: Stamp::from_instant(accepted_at),
            last_rx_ms: now_ms,
            ping_sent: false,
            rtt_us: 0,
            close_deadline_ms: 0,
            app: S::default(),
            ctx: None,
            boundary: None,
            partial: None,
            unfinished_bytes: 0,
            unfinished_since_ms: 0,
            out: Vec::new(),
            inflight: 0,
            write_started_ms: 0,
            writing: false,
            stream: None,
            upgraded: false,
            handing: false,
            retire: false,
            retired: false,
            close_code: 0,
            deflate: None,
        }
    }
}

impl<S> Conn<S> {
    /// Moves to `Closing` with a deadline for the peer's close reply. `code`
    /// (0 = none) is the close code sent or received, for metrics. Once
    /// closing, later calls change nothing.
    pub fn closing(&mut self, deadline_ms: u64, code: u16) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        self.close_deadline_ms = deadline_ms;
        if code != 0 {
            self.close_code = code;
        }
    }

    /// Gives up on the socket now: `Closing` with the deadline passed, and
    /// `shutdown(2)` both ways, which wakes a parked reader (it sees EOF) and
    /// fails a write in flight.
    pub fn abort(&mut self, now_ms: u64) {
        self.phase = Phase::Closing;
        self.close_deadline_ms = now_ms;
        self.shut(libc::SHUT_RDWR);
    }

    /// `shutdown(2)` on its socket, whichever path it is on.
    pub fn shut(&self, how: libc::c_int) {
        match &self.stream {
            Some(s) => s.shutdown(how),
            None => shutdown(self.fd, how),
        }
    }

    /// The key its handshake slot is held under: the socket peer, or behind
    /// a trusted proxy (whose clients all share its address, and whose real
    /// addresses are not known before the header) a key of its own.
    pub fn handshake_key(&self, id: ConnId) -> std::net::IpAddr {
        if !self.via_proxy {
            return self.client;
        }
        let r = id.raw();
        let seg = |s: u32| ((r >> s) & 0xffff) as u16;
        // The IPv6 documentation range, which no client has.
        std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0x0db8, 0, 0, seg(48), seg(32), seg(16), seg(0)))
    }

    /// Open with nothing queued or being written: what a reader may retire
    /// on (the sweep asks, the reader checks again when it would wait).
    pub fn open_and_flushed(&self) -> bool {
        self.phase == Phase::Open && !self.writing && self.out.is_empty()
    }

    /// Bytes queued or in flight.
    pub fn queued(&self) -> usize {
        self.out.len() + self.inflight as usize
    }
}

/// The slab of one shard.
pub struct Table<S> {
    shard: usize,
    slab: Slab<Conn<S>>,
    next_generation: u32,
    slotted: usize,
}

impl<S> Table<S> {
    /// An empty table with room for `capacity` entries reserved up front
    /// (address space only: pages become resident as slots are used), so
    /// that growing never copies the table mid-burst.
    pub fn with_capacity(shard: usize, capacity: usize) -> Self {
        Table { shard, slab: Slab::with_capacity(capacity), next_generation: 1, slotted: 0 }
    }

    /// Inserts and returns the new id.
    pub fn insert(&mut self, mut conn: Conn<S>) -> ConnId {
        conn.generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        if conn.slotted {
            self.slotted += 1;
        }
        let generation = conn.generation;
        let slot = self.slab.insert(conn);
        ConnId::new(self.shard, slot, generation)
    }

    /// The connection if `id` is still current.
    pub fn get(&self, id: ConnId) -> Option<&Conn<S>> {
        self.slab.get(id.slot()).filter(|c| c.generation == id.generation())
    }

    /// Mutable access if `id` is still current.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn<S>> {
        self.slab.get_mut(id.slot()).filter(|c| c.generation == id.generation())
    }

    /// Removes if `id` is still current.
    pub fn remove(&mut self, id: ConnId) -> Option<Conn<S>> {
        self.get(id)?;
        let conn = self.slab.remove(id.slot());
        if conn.slotted {
            self.slotted -= 1;
        }
        Some(conn)
    }

    /// Gives `id` a WebSocket slot if fewer than `capacity` are taken.
    pub fn take_slot(&mut self, id: ConnId, capacity: usize) -> bool {
        let free = self.slotted < capacity;
        let Some(c) = self.slab.get_mut(id.slot()).filter(|c| c.generation == id.generation()) else { return false };
        if c.slotted {
            return true;
        }
        if !free {
            return false;
        }
        c.slotted = true;
        self.slotted += 1;
        true
    }

    /// Takes `id`'s slot away (a preempted connection that is still
    /// closing); true if it held one.
    pub fn release_slot(&mut self, id: ConnId) -> bool {
        let Some(c) = self.slab.get_mut(id.slot()).filter(|c| c.generation == id.generation()) else { return false };
        if !c.slotted {
            return false;
        }
        c.slotted = false;
        self.slotted -= 1;
        true
    }

    /// Connections holding a slot.
    pub fn slotted(&self) -> usize {
        self.slotted
    }

    /// All entries, including overflow sockets.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Iterates with ids.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut Conn<S>)> {
        let shard = self.shard;
        self.slab.iter_mut().map(move |(slot, c)| (ConnId::new(shard, slot, c.generation), c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = Table<()>;

    #[test]
    fn id_round_trips() {
        let id = ConnId::new(1023, (1 << SLOT_BITS) - 1, u32::MAX);
        assert_eq!((id.shard(), id.slot(), id.generation()), (1023, (1 << SLOT_BITS) - 1, u32::MAX));
        let id = ConnId::new(3, 17, 9);
        assert_eq!((id.shard(), id.slot(), id.generation()), (3, 17, 9));
    }

    #[test]
    fn stale_id_cannot_reach_new_connection_in_same_slot() {
        let mut t = T::with_capacity(2, 0);
        let a = t.insert(Conn::new(10, true, 0, Instant::now()));
        assert!(t.remove(a).is_some());
        let b = t.insert(Conn::new(11, true, 0, Instant::now()));
        assert_eq!(a.slot(), b.slot(), "slab reuses the slot");
        assert!(t.get(a).is_none());
        assert!(t.get_mut(a).is_none());
        assert!(t.remove(a).is_none());
        assert_eq!(t.get(b).unwrap().fd, 11);
        assert_eq!(t.slotted(), 1);
    }

    #[test]
    fn overflow_entries_do_not_take_slots() {
        let mut t = T::with_capacity(0, 0);
        let a = t.insert(Conn::new(1, false, 0, Instant::now()));
        t.insert(Conn::new(2, true, 0, Instant::now()));
        assert_eq!((t.len(), t.slotted()), (2, 1));
        t.remove(a);
        assert_eq!((t.len(), t.slotted()), (1, 1));
    }
}
