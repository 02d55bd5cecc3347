//! A shard's own io_uring ring, for what monoio's ops cannot do: accepts
//! into direct descriptors, multishot receives into a shared provided-buffer
//! ring, and sends, shutdowns and closes on fixed files.
//!
//! The ring is driven from the shard's monoio runtime by two tasks
//! ([`Ring::spawn_drivers`]): a *reaper* that waits (through monoio) for the
//! ring's fd to become readable, which it does while completions are
//! waiting, and hands every completion to its owner; and a *submitter*,
//! woken by the first submission of a loop turn and queued behind every task
//! that was ready, which submits everything pushed meanwhile with one
//! `io_uring_enter`.
//!
//! Completions are routed by `user_data`: a one-shot op's slab key, a
//! connection's receive state (tagged [`RECV_TAG`]), or [`IGNORE`] for ops
//! nobody waits on (shutdown, close, cancel).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::num::NonZeroI32;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use super::bufring::BufRing;
use super::socket::Recv;

/// `user_data` of ops whose completion nobody waits for.
const IGNORE: u64 = u64::MAX;
/// `user_data` tag of a connection's multishot receive (the rest is its key).
const RECV_TAG: u64 = 1 << 62;
/// `user_data` tag of the cancel of a connection's receive (the rest is its key).
const CANCEL_TAG: u64 = 1 << 61;
/// `user_data` tag of a connection's shutdown (the rest is its key).
const SHUT_TAG: u64 = 1 << 60;

/// Buffers one connection may hold (received, not yet read by its task)
/// before its multishot receive is cancelled (multishot only: a one-shot
/// receive holds at most one). A connection that is not read (its output
/// is over its cap, or its task is slow) would otherwise take the shared
/// ring's buffers one arrival after another; past this it is re-armed only
/// once its task read what it holds, and meanwhile its peer's TCP window
/// fills, as on the poll path. A cancel cannot stop a receive the kernel
/// is busy re-issuing on a socket with a backlog (it answers `ENOENT`), so
/// each multishot receive also ends by itself after [`MAX_HELD`] buffers'
/// worth of bytes (`IORING_RECV_MSHOT_LIM`, see [`Ring::mshot_limit`]): on
/// a backlog every receive fills a whole buffer, so that is at most
/// `MAX_HELD` buffers; a trickle of small arrivals each reaches user space
/// (one task-work run per kernel entry), where the cancel does land.
const MAX_HELD: usize = 4;

/// Completion queue entries (16 bytes each): a mass close (a sweep timing
/// out thousands of sockets) posts a shutdown, an EOF and a close for each
/// at once; what does not fit goes to the kernel's slower overflow list.
const CQ_MIN: u32 = 4096;
/// The kernel's largest completion queue.
const CQ_MAX: u32 = 65536;

/// Slots of a ring's file table kept beyond connections and handshakes:
/// sockets whose close is still in flight (a slot frees when its close
/// completes) and sockets being handed to another shard.
pub const FILE_TABLE_SLACK: usize = 64;

/// `IORING_OP_FIXED_FD_INSTALL` (kernel 6.8), not in io-uring 0.6.
const OP_FIXED_FD_INSTALL: u8 = 54;
/// `IORING_FILE_INDEX_ALLOC`: a files update that picks free slots itself.
const FILE_INDEX_ALLOC: i32 = -1;

/// How a shard's ring is set up.
#[derive(Debug, Clone, Copy)]
pub struct RingSetup {
    /// Submission queue entries (completion queue: four times as many, at
    /// least [`CQ_MIN`]).
    pub entries: u32,
    /// Slots of the sparse fixed-file table (at most RLIMIT_NOFILE).
    pub files: u32,
    /// Receive buffers in the provided-buffer ring (a power of two).
    pub buffers: u16,
    /// Bytes per receive buffer.
    pub buffer_bytes: usize,
    /// Arm multishot receives (one SQE per connection serves many
    /// arrivals) rather than one buffer-select receive per arrival. Only
    /// where the kernel caps a multishot receive's bytes
    /// (`IORING_RECV_MSHOT_LIM`, 6.17): elsewhere the one-shot receive is
    /// used, since an uncapped one lets a flooder take the whole buffer
    /// ring (`server.recv_multishot`).
    pub multishot: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (`server.uring_coop_taskrun`): completion
    /// work runs at the shard's next kernel entry instead of interrupting
    /// it. Without it, a receive retried by task work the moment data
    /// arrives spins on the socket lock that the sender's softirq on the
    /// other core still holds (36% of the shard's CPU in
    /// `__pv_queued_spin_lock_slowpath` in a 100-connection echo profile).
    pub coop_taskrun: bool,
}

/// What a one-shot op keeps alive until the kernel is done with it.
pub enum Hold {
    /// Nothing.
    None,
    /// The bytes a send reads.
    Buf(Vec<u8>),
    /// The address an accept writes.
    Addr(Box<AddrBuf>),
    /// The fd a files update installs; the kernel writes the slot it chose back.
    Fd(Box<RawFd>),
}

/// Where an accept writes the peer's address.
pub struct AddrBuf {
    /// The address.
    pub storage: libc::sockaddr_storage,
    /// Its length (in: capacity, out: used).
    pub len: libc::socklen_t,
}

enum OpState {
    Waiting(Option<Waker>),
    Done(i32),
    Orphan,
}

struct Op {
    state: OpState,
    hold: Hold,
}

/// Buffers a connection received and has not read yet, oldest first:
/// (buffer id, length). The one-shot receive (the default) holds at most
/// one, so the first lives inline and only a multishot receive's second and
/// later ones (at most [`MAX_HELD`]) take a heap allocation; an idle
/// connection then holds none (a `VecDeque` keeps its allocation after the
/// first push: 32 bytes per connection that ever received), and the rest is
/// boxed so that its 32-byte header is not in every connection's state.
#[derive(Default, Debug)]
struct Held {
    first: Option<(u16, u32)>,
    // Boxed on purpose: 8 bytes in every connection's state instead of the
    // 32 of an inline `VecDeque`, which only multishot receives ever use.
    #[allow(clippy::box_collection)]
    rest: Option<Box<VecDeque<(u16, u32)>>>,
}

impl Held {
    fn push_back(&mut self, b: (u16, u32)) {
        if self.first.is_none() {
            self.first = Some(b);
        } else {
            self.rest.get_or_insert_with(Box::default).push_back(b);
        }
    }

    fn front(&self) -> Option<&(u16, u32)> {
        self.first.as_ref()
    }

    fn pop_front(&mut self) -> Option<(u16, u32)> {
        let b = self.first.take();
        if let Some(rest) = &mut self.rest {
            self.first = rest.pop_front();
            if rest.is_empty() {
                self.rest = None;
            }
        }
        b
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |r| r.len())
    }

    /// Empties it, giving the buffer ids in order.
    fn take_ids(&mut self) -> Vec<u16> {
        self.take_ids_with_len().into_iter().map(|(b, _)| b).collect()
    }

    /// Empties it, giving (buffer id, length) in order.
    fn take_ids_with_len(&mut self) -> Vec<(u16, u32)> {
        let rest = self.rest.take().map(|r| *r).unwrap_or_default();
        self.first.take().into_iter().chain(rest).collect()
    }
}

/// One connection's multishot receive and what it brought.
#[derive(Default)]
struct RecvState {
    slot: u32,
    /// Buffers received and not yet read.
    queue: Held,
    /// Bytes of the front buffer already read (a buffer is at most 1 MiB).
    offset: u32,
    armed: bool,
    cancelling: bool,
    starved: bool,
    eof: bool,
    shut_rd: bool,
    /// The receive's error (an errno, never 0).
    err: Option<NonZeroI32>,
    closed: bool,
    /// Shutdowns in flight. The kernel runs a shutdown from its worker
    /// threads and looks its fixed file up only then, so the slot must not
    /// be closed (and reused by the next accept, whose socket the late
    /// shutdown would hit) until they completed.
    shutdowns: u16,
    /// Handles to it ([`crate::transport::socket::DirectStream`] clones):
    /// the last one to go closes it.
    handles: u16,
    close_sent: bool,
    waker: Option<Waker>,
}

/// Counters a shard exports.
#[derive(Default, Debug, Clone, Copy)]
pub struct RingStats {
    /// Multishot receives that ended for want of a buffer (`ENOBUFS`) and were re-armed.
    pub enobufs: u64,
    /// `io_uring_enter` calls made to submit.
    pub submits: u64,
    /// Receive SQEs pushed (one per arrival on the one-shot path; one per
    /// `MAX_HELD` buffers' worth, or per cancel, on the multishot path).
    pub recv_arms: u64,
    /// Completions reaped.
    pub completions: u64,
}

/// A shard's raw ring. Single-threaded: it lives in an `Rc` on its shard.
pub struct Ring {
    uring: RefCell<IoUring>,
    ops: RefCell<Slab<Op>>,
    recvs: RefCell<Slab<RecvState>>,
    bufs: BufRing,
    held: Cell<usize>,
    starved: RefCell<VecDeque<usize>>,
    dirty: Cell<bool>,
    submitter: RefCell<Option<Waker>>,
    scratch: Cell<Vec<(u64, i32, u32)>>,
    stats: Cell<RingStats>,
    /// Bytes after which a multishot receive ends by itself; 0: one-shot
    /// receives (multishot not asked for, or the kernel cannot cap it).
    mshot_bytes: u32,
}

impl Ring {
    /// Creates the ring, its sparse file table and its buffer ring.
    pub fn new(setup: RingSetup) -> io::Result<Rc<Ring>> {
        let cq = (setup.entries * 4).clamp(CQ_MIN, CQ_MAX);
        let mut b = IoUring::builder();
        b.setup_cqsize(cq).setup_single_issuer();
        if setup.coop_taskrun {
            b.setup_coop_taskrun();
        }
        let mut uring = match b.build(setup.entries) {
            Ok(u) => u,
            // Kernels before 5.19 know no COOP_TASKRUN: a plain ring then.
            Err(_) if setup.coop_taskrun => {
                IoUring::builder().setup_cqsize(cq).setup_single_issuer().build(setup.entries)?
            }
            Err(e) => return Err(e),
        };
        uring.submitter().register_files_sparse(setup.files)?;
        let bufs = BufRing::new(&uring, 0, setup.buffers, setup.buffer_bytes)?;
        let mshot_bytes = if setup.multishot {
            match Self::mshot_limit(&mut uring, &bufs) {
                Ok(true) => (setup.buffer_bytes * MAX_HELD).min(u32::MAX as usize) as u32,
                res => {
                    tracing::warn!(
                        result = ?res,
                        "server.recv_multishot: this kernel cannot cap a multishot receive's bytes \
                         (IORING_RECV_MSHOT_LIM, Linux 6.17); using one-shot receives"
                    );
                    0
                }
            }
        } else {
            0
        };
        Ok(Rc::new(Ring {
            uring: RefCell::new(uring),
            ops: RefCell::new(Slab::new()),
            // One per direct descriptor at most: sized once, so that it never
            // doubles (a doubling copies it and, until the allocator gives the
            // old block back, holds both; untouched capacity costs no RSS).
            recvs: RefCell::new(Slab::with_capacity(setup.files as usize)),
            bufs,
            held: Cell::new(0),
            starved: RefCell::new(VecDeque::new()),
            dirty: Cell::new(false),
            submitter: RefCell::new(None),
            scratch: Cell::new(Vec::new()),
            stats: Cell::new(RingStats::default()),
            mshot_bytes,
        }))
    }

    /// Whether this kernel ends a multishot receive after the bytes given
    /// in `sqe->optlen` (`IORING_RECV_MSHOT_LIM`, Linux 6.17); older ones
    /// ignore the field. Asked of a fresh ring (before its drivers run) on a
    /// socket pair holding 2 bytes, with a cap of 1: a capped receive
    /// ends after its first read (6.18 reads both bytes, the cap is checked
    /// after each read), without `IORING_CQE_F_MORE`; an uncapped one stays
    /// armed (and is cancelled here).
    fn mshot_limit(uring: &mut IoUring, bufs: &BufRing) -> io::Result<bool> {
        let mut fds = [0; 2];
        // SAFETY: plain syscall filling a local array.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned here; they close on drop.
        let (a, b) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: writes 2 bytes from a local array to our own socket.
        if unsafe { libc::write(b.as_raw_fd(), b"ab".as_ptr().cast(), 2) } != 2 {
            return Err(io::Error::last_os_error());
        }
        let sqe = with_optlen(opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), bufs.group()).build(), 1);
        // SAFETY: the SQE points at no memory of ours (the buffer ring's
        // mappings live as long as the ring).
        unsafe { uring.submission().push(&sqe.user_data(1)) }.map_err(|_| io::Error::other("probe: SQ full"))?;
        uring.submit_and_wait(1)?;
        let first = uring.completion().next().map(|c| (c.result(), c.flags()));
        let capped = matches!(first, Some((n, f)) if n > 0 && !cqueue::more(f));
        let mut pending = first.is_some_and(|(_, f)| cqueue::more(f));
        if let Some(bid) = first.and_then(|(_, f)| cqueue::buffer_select(f)) {
            bufs.give_back(bid);
        }
        if pending {
            // Uncapped: the receive is still armed; cancel it and wait for its end.
            let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
            // SAFETY: as above.
            unsafe { uring.submission().push(&cancel) }.map_err(|_| io::Error::other("probe: SQ full"))?;
            while pending {
                uring.submit_and_wait(1)?;
                for c in uring.completion() {
                    if c.user_data() == 1 {
                        pending = cqueue::more(c.flags());
                        if let Some(bid) = cqueue::buffer_select(c.flags()) {
                            bufs.give_back(bid);
                        }
                    }
                }
            }
        }
        Ok(capped)
    }

    /// Counters so far.
    pub fn stats(&self) -> RingStats {
        self.stats.get()
    }

    /// Starts the reaper and the submitter on the current monoio runtime
    /// (which must be an io_uring one: the reaper's wait is a PollAdd).
    pub fn spawn_drivers(self: &Rc<Self>) -> io::Result<()> {
        // SAFETY: `dup` of our own ring fd; the copy is owned by the stream below.
        let fd = unsafe { libc::dup(self.uring.borrow().as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns. monoio only
        // polls it (PollAdd for POLLIN, which a ring reports while it has
        // completions) and closes it on drop; it is never read as a socket.
        let waitable = monoio::net::UnixStream::from_std(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) })?;
        let me = self.clone();
        monoio::spawn(async move {
            loop {
                if let Err(e) = waitable.readable(false).await {
                    tracing::error!(error = %e, "waiting on the direct ring failed");
                    return;
                }
                me.reap();
            }
        });
        let me = self.clone();
        monoio::spawn(async move {
            loop {
                std::future::poll_fn(|cx| {
                    if me.dirty.get() {
                        return Poll::Ready(());
                    }
                    *me.submitter.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                })
                .await;
                me.submit();
                me.reap();
            }
        });
        Ok(())
    }

    /// Pushes `sqe`; it is submitted at the end of this loop turn.
    fn push(&self, sqe: squeue::Entry) {
        loop {
            {
                let mut u = self.uring.borrow_mut();
                // SAFETY: every pointer an SQE carries is kept alive by its
                // op's `Hold` (or the ring's buffer mappings) until completion.
                if unsafe { u.submission().push(&sqe) }.is_ok() {
                    break;
                }
            }
            self.submit(); // full: submit what is queued now
        }
        if !self.dirty.replace(true) {
            if let Some(w) = self.submitter.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn submit(&self) {
        self.dirty.set(false);
        let mut st = self.stats.get();
        st.submits += 1;
        self.stats.set(st);
        loop {
            match self.uring.borrow().submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: completions overflowed; reap, then retry.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                _ => return,
            }
            self.reap();
        }
    }

    /// Hands every waiting completion to its owner.
    pub fn reap(&self) {
        loop {
            let mut batch = self.scratch.take();
            {
                let mut u = self.uring.borrow_mut();
                batch.extend(u.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            }
            if batch.is_empty() {
                self.scratch.set(batch);
                // Completions that did not fit the CQ wait in the kernel's
                // overflow list: only an enter with GETEVENTS (which
                // `submit` adds when the ring says so) moves them into the
                // CQ. Meanwhile the ring fd polls readable with nothing to
                // reap, so without this the reaper would spin and the ops
                // behind them (accepts, receives) stall.
                if self.uring.borrow_mut().submission().cq_overflow() {
                    self.submit();
                    continue;
                }
                break;
            }
            let mut st = self.stats.get();
            st.completions += batch.len() as u64;
            self.stats.set(st);
            for &(ud, res, flags) in &batch {
                self.complete(ud, res, flags);
            }
            batch.clear();
            self.scratch.set(batch);
        }
        self.rearm_starved(self.bufs.count().saturating_sub(self.held.get()));
    }

    fn complete(&self, ud: u64, res: i32, flags: u32) {
        if ud == IGNORE {
            return;
        }
        if ud & RECV_TAG != 0 {
            return self.complete_recv((ud & !RECV_TAG) as usize, res, flags);
        }
        if ud & CANCEL_TAG != 0 {
            return self.complete_cancel((ud & !CANCEL_TAG) as usize, res);
        }
        if ud & SHUT_TAG != 0 {
            let key = (ud & !SHUT_TAG) as usize;
            if let Some(st) = self.recvs.borrow_mut().get_mut(key) {
                st.shutdowns = st.shutdowns.saturating_sub(1);
            }
            return self.finish(key);
        }
        let mut ops = self.ops.borrow_mut();
        let Some(op) = ops.get_mut(ud as usize) else { return };
        match std::mem::replace(&mut op.state, OpState::Done(res)) {
            OpState::Waiting(Some(w)) => w.wake(),
            OpState::Orphan => {
                let op = ops.remove(ud as usize);
                if let Hold::Addr(_) = op.hold {
                    // An accept nobody waits for any more: close its socket.
                    if res >= 0 {
                        drop(ops);
                        self.close_slot(res as u32);
                    }
                }
            }
            _ => {}
        }
    }

    fn complete_recv(&self, key: usize, res: i32, flags: u32) {
        let mut recvs = self.recvs.borrow_mut();
        let Some(st) = recvs.get_mut(key) else { return };
        let more = cqueue::more(flags);
        let mut give_back = None;
        if let Some(bid) = cqueue::buffer_select(flags) {
            if res > 0 && !st.closed {
                st.queue.push_back((bid, res as u32));
                self.held.set(self.held.get() + 1);
            } else {
                give_back = Some(bid);
            }
        }
        match res {
            0 => st.eof = true,
            r if r > 0 => {}
            r if r == -libc::ENOBUFS => {
                if !st.closed {
                    st.starved = true;
                    self.starved.borrow_mut().push_back(key);
                    let mut s = self.stats.get();
                    s.enobufs += 1;
                    self.stats.set(s);
                }
            }
            r if r == -libc::ECANCELED => {}
            r => {
                tracing::debug!(key, slot = st.slot, error = r, "direct receive failed");
                st.err = NonZeroI32::new(-r)
            }
        }
        if !more {
            st.armed = false;
            st.cancelling = false;
        }
        let closed = st.closed;
        let cancel = !closed && st.armed && !st.cancelling && st.queue.len() >= MAX_HELD;
        if cancel {
            st.cancelling = true;
        }
        let waker = if closed { None } else { st.waker.take() };
        drop(recvs);
        if closed && !more {
            self.finish(key);
        }
        if let Some(bid) = give_back {
            self.bufs.give_back(bid);
        }
        if cancel {
            self.push(cancel_sqe(key, CANCEL_TAG | key as u64));
        }
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// A cancel that found nothing to cancel: a multishot receive that
    /// keeps finding data is re-issued from task work rather than parked,
    /// and the kernel then does not find it (`ENOENT`/`EALREADY`). If it is
    /// still armed, the next buffer it fills asks again; a closed
    /// connection's receive (which keeps its socket open) is asked again at once.
    fn complete_cancel(&self, key: usize, res: i32) {
        if res >= 0 {
            return;
        }
        let again = match self.recvs.borrow_mut().get_mut(key) {
            // Closed or being detached: it must end (a detach waits for
            // it); a busy multishot receive is found on a later try.
            Some(st) if st.armed && (st.closed || st.shut_rd) => true,
            Some(st) => {
                st.cancelling = false;
                false
            }
            None => false,
        };
        if again {
            self.push(cancel_sqe(key, CANCEL_TAG | key as u64));
        }
    }

    /// Re-arms up to `n` receives that ran out of buffers.
    fn rearm_starved(&self, n: usize) {
        for _ in 0..n {
            let Some(key) = self.starved.borrow_mut().pop_front() else { return };
            let slot = {
                let mut recvs = self.recvs.borrow_mut();
                match recvs.get_mut(key) {
                    Some(st) if st.starved && !st.closed => {
                        st.starved = false;
                        st.slot
                    }
                    _ => continue,
                }
            };
            self.arm(key, slot);
        }
    }

    fn arm(&self, key: usize, slot: u32) {
        if let Some(st) = self.recvs.borrow_mut().get_mut(key) {
            st.armed = true;
        }
        let fd = types::Fixed(slot);
        let mut st = self.stats.get();
        st.recv_arms += 1;
        self.stats.set(st);
        let sqe = if self.mshot_bytes > 0 {
            with_optlen(opcode::RecvMulti::new(fd, self.bufs.group()).build(), self.mshot_bytes)
        } else {
            // Length 0: the selected buffer's. The buffer is picked when
            // data arrives, so a connection waiting here holds none.
            let recv = opcode::Recv::new(fd, std::ptr::null_mut(), 0).buf_group(self.bufs.group());
            recv.build().flags(squeue::Flags::BUFFER_SELECT)
        };
        self.push(sqe.user_data(RECV_TAG | key as u64));
    }

    /// Starts tracking receives for the socket in `slot`; returns its key.
    pub fn open_recv(&self, slot: u32) -> usize {
        self.recvs.borrow_mut().insert(RecvState { slot, handles: 1, ..Default::default() })
    }

    /// One more handle to `key` (a clone of its stream).
    pub fn retain_recv(&self, key: usize) {
        if let Some(st) = self.recvs.borrow_mut().get_mut(key) {
            st.handles = st.handles.checked_add(1).expect("fewer than 65536 handles to one socket");
        }
    }

    /// Ready once `key` has bytes, EOF or an error to report (arming its
    /// multishot receive if it is not).
    pub fn poll_readable(&self, key: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let slot = {
            let mut recvs = self.recvs.borrow_mut();
            let Some(st) = recvs.get_mut(key) else { return Poll::Ready(Ok(())) };
            if !st.queue.is_empty() || st.eof || st.shut_rd || st.err.is_some() {
                return Poll::Ready(Ok(()));
            }
            match &st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.waker = Some(cx.waker().clone()),
            }
            if st.armed || st.starved {
                return Poll::Pending;
            }
            st.slot
        };
        self.arm(key, slot);
        Poll::Pending
    }

    /// Copies at most `buf.len()` bytes of what `key` received (one buffer's
    /// worth at most) into `buf`.
    pub fn try_recv(&self, key: usize, buf: &mut [u8]) -> io::Result<Recv> {
        let mut recvs = self.recvs.borrow_mut();
        let Some(st) = recvs.get_mut(key) else { return Ok(Recv::Eof) };
        let Some(&(bid, len)) = st.queue.front() else {
            return match (st.shut_rd || st.eof, st.err) {
                (true, _) => Ok(Recv::Eof),
                (false, Some(e)) => Err(io::Error::from_raw_os_error(e.get())),
                (false, None) => Ok(Recv::WouldBlock),
            };
        };
        let n = buf.len().min((len - st.offset) as usize);
        buf[..n].copy_from_slice(self.bufs.bytes(bid, st.offset as usize, n));
        st.offset += n as u32;
        if st.offset == len {
            st.queue.pop_front();
            st.offset = 0;
            // Re-armed now rather than when the task next waits: what
            // arrives meanwhile is then already here when it looks again,
            // as a cached readiness is on epoll, so a busy connection reads
            // without suspending and the session's fairness (a yield per
            // read, a park every few) applies to it. Still one buffer at most.
            let rearm = st.queue.is_empty() && !st.armed && !st.starved && !st.eof && !st.shut_rd && st.err.is_none();
            let slot = st.slot;
            drop(recvs);
            self.return_buffer(bid);
            if rearm {
                self.arm(key, slot);
            }
        }
        Ok(Recv::Data(n))
    }

    fn return_buffer(&self, bid: u16) {
        self.held.set(self.held.get() - 1);
        self.bufs.give_back(bid);
        self.rearm_starved(1);
    }

    /// Wakes the waker `key` registered, if any (its reader looks again).
    pub fn wake(&self, key: usize) {
        let waker = self.recvs.borrow_mut().get_mut(key).and_then(|st| st.waker.take());
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Marks `key` shut for reading: its reader sees EOF once it read what
    /// had arrived.
    pub fn shut_read(&self, key: usize) {
        let waker = match self.recvs.borrow_mut().get_mut(key) {
            Some(st) => {
                st.shut_rd = true;
                st.waker.take()
            }
            None => None,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Lets go of one handle to `key`; with the last one it stops tracking
    /// it: its buffers go back, its receive is cancelled, its slot is closed
    /// (once its shutdowns completed).
    pub fn close_recv(&self, key: usize) {
        let (bids, cancel) = {
            let mut recvs = self.recvs.borrow_mut();
            let Some(st) = recvs.get_mut(key) else { return };
            st.handles = st.handles.saturating_sub(1);
            if st.handles > 0 {
                return;
            }
            let bids = st.queue.take_ids();
            st.closed = true;
            st.waker = None;
            let cancel = st.armed && !st.cancelling;
            (bids, cancel)
        };
        for bid in bids {
            self.return_buffer(bid);
        }
        if cancel {
            self.push(cancel_sqe(key, CANCEL_TAG | key as u64));
        }
        self.finish(key);
    }

    /// For a closed `key`: closes its slot once no shutdown is in flight,
    /// and forgets it once its receive has ended too.
    fn finish(&self, key: usize) {
        let close = {
            let mut recvs = self.recvs.borrow_mut();
            let Some(st) = recvs.get_mut(key) else { return };
            if !st.closed {
                return;
            }
            let close = (st.shutdowns == 0 && !st.close_sent).then_some(st.slot);
            if close.is_some() {
                st.close_sent = true;
            }
            if st.close_sent && !st.armed {
                recvs.remove(key);
            }
            close
        };
        if let Some(slot) = close {
            self.close_slot(slot);
        }
    }

    /// `shutdown(2)` on `key`'s socket (in `slot`).
    pub fn shutdown(&self, key: usize, slot: u32, how: libc::c_int) {
        if let Some(st) = self.recvs.borrow_mut().get_mut(key) {
            st.shutdowns += 1;
        }
        self.push(opcode::Shutdown::new(types::Fixed(slot), how).build().user_data(SHUT_TAG | key as u64));
    }

    /// Closes the socket in `slot` (frees the slot).
    pub fn close_slot(&self, slot: u32) {
        self.push(opcode::Close::new(types::Fixed(slot)).build().user_data(IGNORE));
    }

    /// Cancels every op on the (plain) fd `fd`, e.g. a listener's accepts.
    pub fn cancel_fd(&self, fd: RawFd) {
        let b = types::CancelBuilder::fd(types::Fd(fd)).all();
        self.push(opcode::AsyncCancel2::new(b).build().user_data(IGNORE));
    }

    /// Runs `sqe` and waits for its result; `hold` lives until the kernel is done.
    pub fn op(self: &Rc<Self>, sqe: squeue::Entry, hold: Hold) -> OpFuture {
        let key = self.ops.borrow_mut().insert(Op { state: OpState::Waiting(None), hold });
        self.push(sqe.user_data(key as u64));
        OpFuture { ring: self.clone(), key, done: false }
    }

    /// Accepts one connection on `listener` into a direct descriptor.
    pub async fn accept(self: &Rc<Self>, listener: RawFd) -> io::Result<(u32, std::net::SocketAddr)> {
        let mut addr = Box::new(AddrBuf {
            // SAFETY: all-zero is a valid sockaddr_storage.
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        });
        let sqe = opcode::Accept::new(
            types::Fd(listener),
            (&mut addr.storage as *mut libc::sockaddr_storage).cast(),
            &mut addr.len,
        )
        // No SOCK_CLOEXEC: the kernel refuses it with a direct slot (a
        // direct descriptor is not in the fd table to begin with).
        .file_index(Some(types::DestinationSlot::auto_target()))
        .build();
        let (res, hold) = self.op(sqe, Hold::Addr(addr)).await;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        let peer = match hold {
            Hold::Addr(a) => sockaddr_to_std(&a.storage),
            _ => None,
        };
        match peer {
            Some(p) => Ok((res as u32, p)),
            None => {
                self.close_slot(res as u32);
                Err(io::Error::new(io::ErrorKind::InvalidData, "accept gave no inet address"))
            }
        }
    }

    /// Installs the direct descriptor in `slot` as a real fd (the slot
    /// stays; close it separately). `IORING_OP_FIXED_FD_INSTALL`.
    pub async fn install_fd(self: &Rc<Self>, slot: u32) -> io::Result<RawFd> {
        let mut sqe = opcode::Nop::new().build();
        // SAFETY: `Entry` is `repr(C)` over the kernel's 64-byte SQE; we set
        // the opcode (byte 0), IOSQE_FIXED_FILE (byte 1) and the fd (bytes
        // 4..8); every other field stays zero, as the kernel requires
        // (install_fd_flags 0 = O_CLOEXEC).
        unsafe {
            let raw = &mut *(&mut sqe as *mut squeue::Entry).cast::<[u8; 64]>();
            raw[0] = OP_FIXED_FD_INSTALL;
            raw[1] = squeue::Flags::FIXED_FILE.bits();
            raw[4..8].copy_from_slice(&(slot as i32).to_ne_bytes());
        }
        let (res, _) = self.op(sqe, Hold::None).await;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(res)
    }

    /// Puts the real fd `fd` into a free slot of the file table
    /// (`IORING_OP_FILES_UPDATE` with `IORING_FILE_INDEX_ALLOC`) and returns
    /// the slot. The table holds its own reference: the caller closes `fd`.
    pub async fn register_fd(self: &Rc<Self>, fd: RawFd) -> io::Result<u32> {
        let cell = Box::new(fd);
        let ptr: *const RawFd = &*cell;
        // The kernel writes the chosen slot through `ptr` (a heap cell that
        // the op holds until it completes).
        let sqe = opcode::FilesUpdate::new(ptr, 1).offset(FILE_INDEX_ALLOC).build();
        let (res, hold) = self.op(sqe, Hold::Fd(cell)).await;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        match hold {
            Hold::Fd(slot) if res == 1 && *slot >= 0 => Ok(*slot as u32),
            _ => Err(io::Error::other("files update installed nothing")),
        }
    }

    /// Stops receiving on `key` for good, to hand its socket to another
    /// process: no receive is armed again, the one armed is cancelled, and
    /// once it has ended, what was received and not yet read comes back
    /// (the new owner reads it first). Its reader, if parked, is woken and
    /// sees the socket shut. Bounded: gives up waiting after `timeout`.
    pub async fn detach_recv(&self, key: usize, timeout: std::time::Duration) -> io::Result<Vec<u8>> {
        let (waker, cancel) = {
            let mut recvs = self.recvs.borrow_mut();
            let Some(st) = recvs.get_mut(key) else { return Ok(Vec::new()) };
            st.shut_rd = true;
            st.starved = false;
            let cancel = st.armed && !st.cancelling;
            if cancel {
                st.cancelling = true;
            }
            (st.waker.take(), cancel)
        };
        if let Some(w) = waker {
            w.wake();
        }
        if cancel {
            self.push(cancel_sqe(key, CANCEL_TAG | key as u64));
        }
        let end = std::time::Instant::now() + timeout;
        while self.recvs.borrow().get(key).is_some_and(|st| st.armed) {
            if std::time::Instant::now() >= end {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "receive did not end"));
            }
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (bytes, bids) = {
            let mut recvs = self.recvs.borrow_mut();
            let Some(st) = recvs.get_mut(key) else { return Ok(Vec::new()) };
            if let Some(e) = st.err {
                return Err(io::Error::from_raw_os_error(e.get()));
            }
            let mut bytes = Vec::new();
            let mut skip = st.offset as usize;
            let bids = st.queue.take_ids_with_len();
            for &(bid, len) in &bids {
                bytes.extend_from_slice(self.bufs.bytes(bid, skip, len as usize - skip));
                skip = 0;
            }
            st.offset = 0;
            (bytes, bids)
        };
        for (bid, _) in bids {
            self.return_buffer(bid);
        }
        Ok(bytes)
    }

    /// Sends `buf[from..]` on the socket in `slot`; gives the buffer back.
    pub async fn send(self: &Rc<Self>, slot: u32, buf: Vec<u8>, from: usize) -> (io::Result<usize>, Vec<u8>) {
        let len = (buf.len() - from).min(u32::MAX as usize) as u32;
        // SAFETY: `from <= buf.len()`; the Vec's heap block does not move
        // when the Vec moves into the op's hold.
        let ptr = unsafe { buf.as_ptr().add(from) };
        let sqe = opcode::Send::new(types::Fixed(slot), ptr, len).flags(libc::MSG_NOSIGNAL).build();
        let (res, hold) = self.op(sqe, Hold::Buf(buf)).await;
        let buf = match hold {
            Hold::Buf(b) => b,
            _ => Vec::new(),
        };
        if res < 0 {
            return (Err(io::Error::from_raw_os_error(-res)), buf);
        }
        (Ok(res as usize), buf)
    }
}

/// `sqe` with `optlen` (bytes 44..48 of the kernel's SQE) set: for a
/// multishot receive, the bytes after which it ends (`IORING_RECV_MSHOT_LIM`).
fn with_optlen(mut sqe: squeue::Entry, optlen: u32) -> squeue::Entry {
    // SAFETY: `Entry` is `repr(C)` over the kernel's 64-byte SQE; `optlen`
    // is the u32 at offset 44 (the union with `splice_fd_in`/`file_index`,
    // which a receive does not use).
    unsafe {
        let raw = &mut *(&mut sqe as *mut squeue::Entry).cast::<[u8; 64]>();
        raw[44..48].copy_from_slice(&optlen.to_ne_bytes());
    }
    sqe
}

fn cancel_sqe(key: usize, ud: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(RECV_TAG | key as u64).build().user_data(ud)
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some((ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some((ip, u16::from_be(a.sin6_port)).into())
        }
        _ => None,
    }
}

/// A one-shot op in flight: its result and what it held.
pub struct OpFuture {
    ring: Rc<Ring>,
    key: usize,
    done: bool,
}

impl Future for OpFuture {
    type Output = (i32, Hold);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut ops = self.ring.ops.borrow_mut();
        let op = ops.get_mut(self.key).expect("op in flight");
        match &mut op.state {
            OpState::Done(res) => {
                let res = *res;
                let op = ops.remove(self.key);
                drop(ops);
                self.done = true;
                Poll::Ready((res, op.hold))
            }
            OpState::Waiting(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            OpState::Orphan => unreachable!("polled after drop"),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ops = self.ring.ops.borrow_mut();
        let finished = match ops.get_mut(self.key) {
            Some(op) if matches!(op.state, OpState::Done(_)) => true,
            Some(op) => {
                op.state = OpState::Orphan;
                false
            }
            None => false,
        };
        if finished {
            let op = ops.remove(self.key);
            drop(ops);
            // A finished accept nobody took: close its socket.
            if let (Hold::Addr(_), OpState::Done(res)) = (&op.hold, &op.state) {
                if *res >= 0 {
                    self.ring.close_slot(*res as u32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Held;

    #[test]
    fn held_buffers_come_out_in_order_and_one_takes_no_allocation() {
        let mut h = Held::default();
        assert!(h.is_empty() && h.front().is_none() && h.pop_front().is_none());
        h.push_back((7, 100));
        assert_eq!((h.len(), h.front()), (1, Some(&(7, 100))));
        assert!(h.rest.is_none(), "the one-shot receive's single buffer is inline");
        for b in [(8, 1), (9, 2), (10, 3)] {
            h.push_back(b);
        }
        assert_eq!(h.len(), 4);
        assert_eq!(h.pop_front(), Some((7, 100)));
        assert_eq!(h.front(), Some(&(8, 1)));
        h.push_back((11, 4));
        assert_eq!([h.pop_front(), h.pop_front()], [Some((8, 1)), Some((9, 2))]);
        assert_eq!(h.pop_front(), Some((10, 3)));
        assert!(h.rest.is_none(), "emptied past the first: the allocation is given back");
        assert_eq!(h.pop_front(), Some((11, 4)));
        assert!(h.is_empty());
        for b in [(1, 1), (2, 2), (3, 3)] {
            h.push_back(b);
        }
        assert_eq!(h.take_ids(), vec![1, 2, 3]);
        assert!(h.is_empty() && h.rest.is_none());
    }

    #[test]
    fn receive_state_stays_small() {
        // One per connection on the direct path, in the ring's slab.
        assert!(std::mem::size_of::<super::RecvState>() <= 64, "{}", std::mem::size_of::<super::RecvState>());
    }
}
