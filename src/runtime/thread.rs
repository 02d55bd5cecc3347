//! A shard thread's body: pin it, build its io driver (io_uring, falling back
//! to epoll only when allowed), then run the shard's top-level future:
//! accept loop, sweeper and mailbox until `Shutdown`, then the drain.
//!
//! The thread reports ready only once everything that can fail at start
//! (the ring, the listener, the wake socket) has succeeded, so a node never
//! serves with a shard that did not start.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use super::mailbox::MailboxReceiver;
use super::metrics::DriverKind;
use super::shard::Shard;
use super::{accept, App, NodeState};
use crate::config::{DriverChoice, IoChoice};
use crate::transport::socket::{recv, Recv};
use crate::transport::uring::{Ring, RingSetup, FILE_TABLE_SLACK};

/// Mailbox messages handled before the mailbox task lets the shard's other
/// tasks run: large enough that a busy fan-out pays one yield per few hundred
/// deliveries, small enough that a reader waits for at most a fraction of a
/// millisecond.
const MAILBOX_BATCH: usize = 256;

/// What a shard thread reports once it started (or why it could not).
pub type Ready = mpsc::Sender<io::Result<()>>;

/// A shard's listening sockets.
pub struct Listeners {
    /// Its SO_REUSEPORT share of the client port.
    pub public: std::net::TcpListener,
    /// The internal listener (`server.admin_listen`), on one shard only.
    pub admin: Option<std::net::TcpListener>,
}

/// The body of shard `id`'s thread, serving the application `make_app`
/// builds on this thread (its state is the shard's own, never `Send`).
pub fn run<A: App>(
    id: usize,
    node: Arc<NodeState<A::Msg>>,
    make_app: impl FnOnce() -> A,
    listener: Listeners,
    rx: MailboxReceiver<A::Msg>,
    ready: Ready,
) {
    let cfg = &node.config.server;
    let core = if cfg.pin_cores { pin(id) } else { None };
    let core_txt = core.map(|c| format!("core {c}")).unwrap_or_else(|| "unpinned".into());
    let metrics = &node.shards[id].metrics;
    let app = make_app();
    if cfg.driver != DriverChoice::Epoll {
        match uring_runtime(cfg.ring_entries, cfg.uring_coop_taskrun) {
            Ok(mut rt) => {
                metrics.driver.store(DriverKind::IoUring as u8, Ordering::Relaxed);
                tracing::info!(shard = id, driver = "io_uring", core = %core_txt, "shard io_uring driver, {core_txt}");
                return rt.block_on(shard_main(Shard::new(id, node.clone(), app), listener, rx, ready, true));
            }
            Err(e) if cfg.driver == DriverChoice::IoUring => {
                let _ = ready.send(Err(io::Error::new(e.kind(), format!("shard {id}: cannot create an io_uring ring of {} entries: {e} (the kernel allows at most 32768; io_uring may also be disabled)", cfg.ring_entries))));
                return;
            }
            Err(e) => tracing::warn!(
                shard = id, error = %e, entries = cfg.ring_entries,
                "cannot create an io_uring ring; FALLING BACK to epoll"
            ),
        }
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            metrics.driver.store(DriverKind::Epoll as u8, Ordering::Relaxed);
            tracing::info!(shard = id, driver = "epoll", core = %core_txt, "shard epoll driver, {core_txt}");
            rt.block_on(shard_main(Shard::new(id, node.clone(), app), listener, rx, ready, false));
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), format!("shard {id}: no io driver: {e}"))));
        }
    }
}

fn pin(id: usize) -> Option<usize> {
    let ids = core_affinity::get_core_ids()?;
    let c = *ids.get(id % ids.len().max(1))?;
    core_affinity::set_for_current(c).then_some(c.id)
}

/// An io_uring runtime. With `coop`, the ring is set up with COOP_TASKRUN and
/// SINGLE_ISSUER: completions are picked up when the shard next enters the
/// kernel instead of by an inter-processor interrupt, which a profile of the
/// echo path showed costing ~15% of the shard's CPU. Kernels older than 6.0
/// refuse these flags; then the plain ring is used.
fn uring_runtime(entries: u32, coop: bool) -> io::Result<monoio::Runtime<monoio::time::TimeDriver<IoUringDriver>>> {
    if coop {
        let mut urb = io_uring::IoUring::builder();
        urb.setup_coop_taskrun().setup_single_issuer();
        let rt = RuntimeBuilder::<IoUringDriver>::new().uring_builder(urb).with_entries(entries).enable_timer().build();
        if rt.is_ok() {
            return rt;
        }
    }
    RuntimeBuilder::<IoUringDriver>::new().with_entries(entries).enable_timer().build()
}

/// The shard's client listener, on the socket path it serves.
enum Public {
    Poll(monoio::net::TcpListener),
    Direct(Rc<Ring>, Rc<std::net::TcpListener>),
}

/// A shard's top-level future: accept loop, sweeper, mailbox, then drain.
/// `uring`: the runtime is io_uring, so the direct path is possible.
async fn shard_main<A: App>(
    shard: Rc<Shard<A>>,
    listeners: Listeners,
    rx: MailboxReceiver<A::Msg>,
    ready: Ready,
    uring: bool,
) {
    let ring = if uring && shard.node.config.server.io == IoChoice::Direct { direct_ring(&shard) } else { None };
    let public = match ring {
        Some(r) => Ok(Public::Direct(r, Rc::new(listeners.public))),
        None => monoio::net::TcpListener::from_std(listeners.public).map(Public::Poll),
    };
    let started = public.and_then(|l| {
        let admin = listeners.admin.map(monoio::net::TcpListener::from_std).transpose()?;
        let wake_fd = std::os::fd::AsRawFd::as_raw_fd(&rx.wake_rx);
        let wake = monoio::net::UnixStream::from_std(rx.wake_rx)?;
        Ok(((l, admin), wake, wake_fd))
    });
    let ((listener, admin), wake, wake_fd) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ =
                ready.send(Err(io::Error::new(e.kind(), format!("shard {}: listener or wake socket: {e}", shard.id))));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    match listener {
        Public::Poll(l) => {
            monoio::spawn(accept::accept_loop(shard.clone(), l, accept::Listener::Public));
        }
        Public::Direct(ring, l) => {
            for _ in 0..accept::DIRECT_ACCEPTS {
                monoio::spawn(accept::accept_direct(shard.clone(), ring.clone(), l.clone()));
            }
            monoio::spawn(super::idle::dispatch(shard.clone()));
        }
    }
    if let Some(admin) = admin {
        monoio::spawn(accept::accept_loop(shard.clone(), admin, accept::Listener::Admin));
    }
    monoio::spawn(sweeper(shard.clone()));
    mailbox_loop(&shard, wake, wake_fd, rx.rx).await;
}

/// Waits on the wake socket and drains the mailbox in batches until `Stop`
/// (sent by the shard's [`drain`] when it is over).
async fn mailbox_loop<A: App>(
    shard: &Rc<Shard<A>>,
    wake: monoio::net::UnixStream,
    wake_fd: std::os::fd::RawFd,
    rx: crossbeam_channel::Receiver<super::mailbox::ShardMsg<A::Msg>>,
) {
    let sender = &shard.node.shards[shard.id].mailbox;
    let mut scratch = [0u8; 64];
    loop {
        if wake.readable(false).await.is_err() {
            return;
        }
        while let Ok(Recv::Data(_)) = recv(wake_fd, &mut scratch) {}
        sender.clear_wake();
        let mut handled = 0usize;
        while let Ok(msg) = rx.try_recv() {
            sender.received(&msg);
            if !shard.handle(msg) {
                return;
            }
            handled += 1;
            // Bounded batches: a full mailbox does not keep the shard's
            // connections (or its timers) waiting for thousands of messages.
            if handled % MAILBOX_BATCH == 0 {
                super::session::yield_now().await;
            }
        }
    }
}

/// The shard's own ring for the direct path, with its drivers running; None
/// (the poll path, logged) when it cannot be set up.
fn direct_ring<A: App>(shard: &Rc<Shard<A>>) -> Option<Rc<Ring>> {
    let cfg = &shard.node.config;
    let wanted = shard.node.capacity_per_shard + cfg.limits.max_handshakes_per_shard + FILE_TABLE_SLACK;
    let setup = RingSetup {
        entries: cfg.server.ring_entries,
        files: wanted.min(nofile()).min(u32::MAX as usize) as u32,
        buffers: cfg.server.recv_buffers as u16,
        buffer_bytes: cfg.server.recv_buffer_bytes,
        multishot: cfg.server.recv_multishot,
        coop_taskrun: cfg.server.uring_coop_taskrun,
    };
    let started = Ring::new(setup).and_then(|r| r.spawn_drivers().map(|()| r));
    match started {
        Ok(r) => {
            tracing::info!(
                shard = shard.id,
                files = setup.files,
                buffers = setup.buffers,
                "shard socket path: direct descriptors"
            );
            let _ = shard.ring.set(r.clone());
            shard.metrics().direct_io.store(1, Ordering::Relaxed);
            Some(r)
        }
        Err(e) => {
            tracing::warn!(shard = shard.id, error = %e, "cannot set up the direct socket path; FALLING BACK to poll");
            None
        }
    }
}

/// The soft RLIMIT_NOFILE: the kernel's cap on one ring's file table.
fn nofile() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscall on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur as usize
}

async fn sweeper<A: App>(shard: Rc<Shard<A>>) {
    let every = Duration::from_millis(shard.node.config.websocket.sweep_interval_ms);
    let mut retired = 0;
    loop {
        monoio::time::sleep(every).await;
        // Readers that retired since the last sweep freed their tasks: the
        // allocator gets to purge those pages now (the shard may stay quiet).
        let now = shard.metrics().readers_retired.get();
        if now != retired {
            retired = now;
            super::collect_heap();
        }
        shard.sweep();
    }
}

/// The drain of one shard (`ShardMsg::Shutdown`), while the mailbox keeps
/// being served: upgrades answer 503 at once; open WebSockets get their
/// reconnect hint at times spread evenly, in random order, over
/// `shutdown.reconnect_spread_ms`; at 3/4 of `shutdown.drain_timeout_ms`
/// (or once every WebSocket has left) the listeners close and whatever is
/// still open gets 1001; sockets are forced shut at 19/20 and the mailbox
/// loop stops when the table is empty or the time is up.
pub(super) async fn drain<A: App>(shard: Rc<Shard<A>>) {
    let cfg = &shard.node.config.shutdown;
    let timeout = Duration::from_millis(cfg.drain_timeout_ms);
    let spread = Duration::from_millis(cfg.spread_ms());
    let start = Instant::now();
    shard.begin_drain();
    let m = shard.metrics();
    let mut order = shard.open_websockets();
    fastrand::shuffle(&mut order);
    let n = order.len().max(1) as u32;
    let tick = Duration::from_millis(5);
    for (i, id) in order.iter().enumerate() {
        let due = start + spread * i as u32 / n;
        while Instant::now() < due {
            monoio::time::sleep(tick.min(due - Instant::now())).await;
        }
        if shard.is_open(*id) && shard.app.on_drain(&shard, *id) {
            m.drain_hinted.inc();
        }
    }
    let close_at = timeout / 4 * 3;
    while start.elapsed() < close_at && shard.has_open_websockets() {
        monoio::time::sleep(tick * 4).await;
    }
    let closed = shard.stop_accepting();
    m.drain_closed.add(closed as u64);
    let force_at = timeout - timeout / 20;
    let mut forced = false;
    while !shard.table.borrow().is_empty() && start.elapsed() < timeout {
        if !forced && start.elapsed() >= force_at {
            forced = true;
            for (_, c) in shard.table.borrow_mut().iter_mut() {
                c.shut(libc::SHUT_RDWR);
            }
        }
        monoio::time::sleep(tick).await;
    }
    let own = &shard.node.shards[shard.id].mailbox;
    let _ = own.send(super::mailbox::ShardMsg::Stop);
}
