//! Starting a node: listeners, shards (one thread and one runtime each,
//! pinned), the fd-limit cap on capacity, the optional cluster thread, and
//! the drain on shutdown.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, DriverChoice};
use crate::metrics::{DriverKind, ShardMetrics};
use crate::shard::mailbox::{mailbox, MailboxReceiver, ShardMsg};
use crate::shard::{NodeShared, Shard, ShardHandle};

/// fds a node keeps for itself besides connections: per shard a listener,
/// a ring, two wake sockets; plus stdio, the cluster thread's sockets and
/// slack for /proc reads.
const FD_RESERVE_BASE: usize = 64;
const FD_RESERVE_PER_SHARD: usize = 8;

/// A running node.
pub struct Node {
    shared: Arc<NodeShared>,
    threads: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Node {
    /// Validates `config`, binds, and starts every shard.
    pub fn start(config: Config) -> io::Result<Node> {
        config.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = match config.server.shards {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let capacity = capacity_per_shard(&config, n);
        let listeners = bind_all(config.server.listen, n, config.server.backlog)?;
        let local_addr = listeners[0].local_addr()?;
        let node_id = match config.server.node_id.as_str() {
            "" => format!("node-{:08x}", fastrand::u32(..)),
            id => id.to_string(),
        };
        let advertise_url = match config.server.advertise_url.as_str() {
            "" => format!("ws://{local_addr}/ws"),
            url => url.to_string(),
        };
        let mut handles = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mailbox(config.server.mailbox_capacity)?;
            let metrics = ShardMetrics::default();
            metrics.capacity.store(capacity, Ordering::Relaxed);
            handles.push(ShardHandle { mailbox: tx, metrics });
            receivers.push(rx);
        }
        let (cluster, cluster_rx) = crate::cluster::handle(&config);
        let shared = Arc::new(NodeShared {
            started_at: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            config,
            node_id,
            advertise_url,
            capacity_per_shard: capacity,
            shards: handles,
            draining: AtomicBool::new(false),
            cluster,
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(n + 1);
        for (i, (listener, rx)) in listeners.into_iter().zip(receivers).enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ringside-shard-{i}"))
                    .spawn(move || run_shard(i, shared, listener, rx, ready))?,
            );
        }
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a shard thread died while starting")),
            }
        }
        if let Some(rx) = cluster_rx {
            threads.push(crate::cluster::spawn(shared.clone(), rx)?);
        }
        eprintln!(
            "ringside: node {} listening on {local_addr} with {n} shard(s), {capacity} slots each",
            shared.node_id
        );
        Ok(Node { shared, threads, local_addr })
    }

    /// The address the shards listen on (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the shards share (metrics, config).
    pub fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// Drains: stop accepting, close every connection with 1001, and wait
    /// up to `shutdown.drain_timeout_ms` for the shards to finish.
    pub fn shutdown(self) {
        let timeout = Duration::from_millis(self.shared.config.shutdown.drain_timeout_ms);
        let deadline = Instant::now() + timeout;
        self.shared.draining.store(true, Ordering::Release);
        for s in &self.shared.shards {
            while s.mailbox.send(ShardMsg::Shutdown).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Some(c) = &self.shared.cluster {
            c.shutdown();
        }
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Slots per shard: the configured number, capped so that all shards fit
/// under RLIMIT_NOFILE (raised to its hard limit first).
fn capacity_per_shard(config: &Config, shards: usize) -> usize {
    let wanted = config.server.max_connections_per_shard;
    let Some(nofile) = raise_nofile() else { return wanted };
    let reserve = FD_RESERVE_BASE + shards * (FD_RESERVE_PER_SHARD + config.server.overflow_per_shard);
    let fit = (nofile.saturating_sub(reserve) / shards).max(1);
    if fit < wanted {
        eprintln!(
            "ringside: RLIMIT_NOFILE is {nofile}: capping server.max_connections_per_shard from {wanted} to {fit} \
             ({shards} shard(s), {reserve} fds reserved); raise LimitNOFILE (see tuning/) for more"
        );
        return fit;
    }
    wanted
}

/// Raises the soft open-files limit to the hard one; returns the soft limit.
fn raise_nofile() -> Option<usize> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur as usize)
}

/// One SO_REUSEPORT listener per shard on the same address (port 0 is
/// resolved by the first and reused by the rest).
fn bind_all(addr: SocketAddr, n: usize, backlog: u32) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        s.listen(backlog.min(i32::MAX as u32) as i32)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// The body of a shard thread.
fn run_shard(
    id: usize,
    shared: Arc<NodeShared>,
    listener: std::net::TcpListener,
    rx: MailboxReceiver,
    ready: mpsc::Sender<io::Result<()>>,
) {
    let cfg = &shared.config.server;
    let mut core = None;
    if cfg.pin_cores {
        if let Some(ids) = core_affinity::get_core_ids() {
            let c = ids[id % ids.len()];
            if core_affinity::set_for_current(c) {
                core = Some(c.id);
            }
        }
    }
    let entries = cfg.ring_entries;
    let want = cfg.driver;
    let metrics = &shared.shards[id].metrics;
    let core_txt = core.map(|c| format!("core {c}")).unwrap_or_else(|| "unpinned".into());
    if want != DriverChoice::Epoll {
        match uring_runtime(entries, cfg.uring_coop_taskrun) {
            Ok(mut rt) => {
                metrics.driver.store(DriverKind::IoUring as u8, Ordering::Relaxed);
                eprintln!("ringside: shard {id}: io_uring driver, {core_txt}");
                let _ = ready.send(Ok(()));
                rt.block_on(shard_main(Shard::new(id, shared.clone()), listener, rx));
                return;
            }
            Err(e) if want == DriverChoice::IoUring => {
                let _ = ready.send(Err(io::Error::new(e.kind(), format!("shard {id}: io_uring unavailable: {e}"))));
                return;
            }
            Err(e) => eprintln!("ringside: shard {id}: io_uring unavailable ({e}); FALLING BACK to epoll"),
        }
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            metrics.driver.store(DriverKind::Epoll as u8, Ordering::Relaxed);
            eprintln!("ringside: shard {id}: epoll driver, {core_txt}");
            let _ = ready.send(Ok(()));
            rt.block_on(shard_main(Shard::new(id, shared.clone()), listener, rx));
        }
        Err(e) => {
            let _ = ready.send(Err(io::Error::new(e.kind(), format!("shard {id}: no io driver: {e}"))));
        }
    }
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

/// A shard's top-level future: accept loop, sweeper, mailbox, then drain.
async fn shard_main(shard: Rc<Shard>, listener: std::net::TcpListener, rx: MailboxReceiver) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return eprintln!("ringside: shard {}: listener: {e}", shard.id),
    };
    monoio::spawn(crate::shard::accept::accept_loop(shard.clone(), listener));
    monoio::spawn(sweeper(shard.clone()));
    mailbox_loop(&shard, rx).await;
    drain(&shard).await;
}

/// Waits on the wake socket and drains the mailbox in batches until `Shutdown`.
async fn mailbox_loop(shard: &Rc<Shard>, rx: MailboxReceiver) {
    let wake_fd = std::os::fd::AsRawFd::as_raw_fd(&rx.wake_rx);
    let wake = match monoio::net::UnixStream::from_std(rx.wake_rx) {
        Ok(w) => w,
        Err(e) => return eprintln!("ringside: shard {}: wake socket: {e}", shard.id),
    };
    let sender = &shard.node.shards[shard.id].mailbox;
    let mut scratch = [0u8; 64];
    loop {
        if wake.readable(false).await.is_err() {
            return;
        }
        while let Ok(crate::ws::stream::Recv::Data(_)) = crate::ws::stream::recv(wake_fd, &mut scratch) {}
        sender.clear_wake();
        while let Ok(msg) = rx.rx.try_recv() {
            if !shard.handle(msg) {
                return;
            }
        }
    }
}

async fn sweeper(shard: Rc<Shard>) {
    let every = Duration::from_millis(shard.node.config.websocket.sweep_interval_ms);
    loop {
        monoio::time::sleep(every).await;
        shard.sweep();
    }
}

/// Closes everything with 1001 and waits for the table to empty, forcing
/// sockets shut shortly before the drain deadline.
async fn drain(shard: &Rc<Shard>) {
    let timeout = Duration::from_millis(shard.node.config.shutdown.drain_timeout_ms);
    let start = Instant::now();
    shard.begin_drain();
    let force_at = timeout.saturating_sub(timeout / 5);
    let mut forced = false;
    while !shard.table.borrow().is_empty() && start.elapsed() < timeout {
        if !forced && start.elapsed() >= force_at {
            forced = true;
            for (_, c) in shard.table.borrow_mut().iter_mut() {
                crate::ws::stream::shutdown(c.fd, libc::SHUT_RDWR);
            }
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}
