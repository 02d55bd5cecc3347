//! Node: configuration in, a running node out. Wires the layers together:
//! listeners and the fd budget ([`listen`]), the shared node state, the
//! application per shard, the broker (in memory, or Redis when
//! `cluster.redis_url` is set), the shard threads, and the drain.

pub mod agent;
pub mod listen;
pub mod upgrade;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::app::auth::Verifier;
use crate::app::{AppMsg, Delivery, Edge, EdgeShared};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, Sink};
use crate::config::{AuthMode, Config, ConfigError, DriverChoice, IoChoice};
use crate::runtime::limits::{IpLimits, IpTable};
use crate::runtime::mailbox::{mailbox, ShardMsg};
use crate::runtime::metrics::ShardMetrics;
use crate::runtime::{thread, NodeState, ShardHandle};
use crate::transport::proxy::Trusted;

/// A running node.
pub struct Node {
    state: Arc<NodeState<AppMsg>>,
    shared: Arc<EdgeShared>,
    threads: Vec<JoinHandle<()>>,
    cluster_thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
}

impl Node {
    /// Validates `config`, binds, and starts every shard. Returns once every
    /// shard is serving, or the first shard's reason for not starting.
    pub fn start(config: Config) -> io::Result<Node> {
        Node::start_inherited(config, None)
    }

    /// [`Node::start`], on listeners taken over from a running process
    /// (`--upgrade-from`) when `inherited` is given; then asks that process
    /// for its connections.
    pub fn start_inherited(mut config: Config, inherited: Option<upgrade::Inherited>) -> io::Result<Node> {
        if let Some(inh) = inherited.as_ref().filter(|i| !i.node_id.is_empty()) {
            // The clients' keys in the cluster name the node: it stays the same.
            config.server.node_id = inh.node_id.clone();
        }
        config.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = match config.server.shards {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        check(&config).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let s = &config.server;
        let handshakes = config.limits.max_handshakes_per_shard;
        let direct = s.io == IoChoice::Direct && s.driver != DriverChoice::Epoll;
        let capacity = listen::capacity_per_shard(s.max_connections_per_shard, handshakes, n, direct);
        let (listeners, mut admin, agent_listener, inherited) = match inherited {
            Some(mut inh) => {
                let public = std::mem::take(&mut inh.public);
                for l in &public {
                    l.set_nonblocking(true)?;
                }
                if let Some(a) = &inh.admin {
                    a.set_nonblocking(true)?;
                }
                (public, inh.admin.take(), inh.agent.take(), Some(inh))
            }
            None => {
                let public = listen::bind_all(s.listen, n, s.backlog)?;
                let admin = match s.admin_listen.as_str() {
                    "" => None,
                    a => Some(listen::bind_admin(a.parse().map_err(|_| io::Error::other("server.admin_listen"))?)?),
                };
                (public, admin, None, None)
            }
        };
        let local_addr = listeners[0].local_addr()?;
        let old = upgrade::OldListeners {
            public: listeners.iter().map(|l| l.as_raw_fd()).collect(),
            admin: admin.as_ref().map(|l| l.as_raw_fd()),
            agent: None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let (state, receivers) = node_state(config, n, capacity, local_addr)?;
        let hash_key = std::collections::hash_map::RandomState::new();
        let sink: Arc<dyn Sink> = Arc::new(Delivery::new(state.clone(), hash_key.clone()));
        let mut threads = Vec::with_capacity(n);
        let mut cluster_thread = None;
        let broker: Arc<dyn Broker> = if state.config.cluster.redis_url.is_empty() {
            Arc::new(MemoryBroker::alone(sink))
        } else {
            let (b, t) = RedisBroker::start(&state.config.cluster, &state.node_id, sink)?;
            cluster_thread = Some(t);
            Arc::new(b)
        };
        let mut shared = EdgeShared::new(broker, n, hash_key);
        if state.config.auth.mode == AuthMode::Token {
            let v = Verifier::new(&state.config.auth).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            shared.verifier = Some(Arc::new(v));
        }
        shared.backend = crate::app::backend::Backend::start(state.clone())?;
        let shared = Arc::new(shared);
        let (ready_tx, ready_rx) = mpsc::channel();
        for (i, (public, rx)) in listeners.into_iter().zip(receivers).enumerate() {
            let listener = thread::Listeners { public, admin: admin.take() };
            let (state, shared, ready) = (state.clone(), shared.clone(), ready_tx.clone());
            let make_app = move || Edge::new(i, shared, capacity);
            let t = std::thread::Builder::new()
                .name(format!("ringside-shard-{i}"))
                .spawn(move || thread::run(i, state, make_app, listener, rx, ready))?;
            threads.push(t);
        }
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a shard thread died while starting")),
            }
        }
        tracing::info!(
            node = %state.node_id, addr = %local_addr, shards = n, slots_per_shard = capacity,
            "listening on {local_addr} with {n} shard(s), {capacity} slots each"
        );
        if let Some(a) = admin_addr {
            tracing::info!(addr = %a, "internal endpoints (/metrics, /cluster) listening on {a}");
        }
        let mut old = old;
        if !state.config.server.agent_listen.is_empty() {
            let listener = match agent_listener {
                Some(l) => l,
                None => std::net::TcpListener::bind(
                    state
                        .config
                        .server
                        .agent_listen
                        .parse::<SocketAddr>()
                        .map_err(|_| io::Error::other("server.agent_listen"))?,
                )?,
            };
            old.agent = Some(listener.as_raw_fd());
            let a = agent::start(listener, state.clone())?;
            tracing::info!(addr = %a, "HAProxy agent-check listening on {a}");
        }
        if let Some(inh) = inherited {
            upgrade::take_over(inh, state.clone(), shared.clone())?;
            tracing::info!("upgrade: serving the inherited listeners; taking the connections over");
        }
        if !state.config.server.upgrade_socket.is_empty() {
            let path = std::path::PathBuf::from(&state.config.server.upgrade_socket);
            upgrade::serve(path.clone(), state.clone(), shared.clone(), old)?;
            tracing::info!(path = %path.display(), "zero-disconnect upgrades: ringside --upgrade-from {}", path.display());
        }
        Ok(Node { state, shared, threads, cluster_thread, local_addr })
    }

    /// The address the shards listen on (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the shards share (metrics, config).
    pub fn state(&self) -> &Arc<NodeState<AppMsg>> {
        &self.state
    }

    /// Drains (docs/design.md, "Drain"): `/ready` and upgrades answer 503 at
    /// once, open WebSockets get a reconnect hint spread over
    /// `shutdown.reconnect_spread_ms`, those still open at 3/4 of
    /// `shutdown.drain_timeout_ms` get 1001; waits up to the drain timeout
    /// for the shards to finish, then stops the cluster thread (which keeps
    /// routing for the shards until then). Logs one summary line.
    pub fn shutdown(self) {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.state.config.shutdown.drain_timeout_ms);
        let deadline = started + timeout;
        let open = self.state.connections();
        let handed_over = self.state.handed_over.load(Ordering::Acquire);
        self.state.draining.store(true, Ordering::Release);
        // After a handover the shards stop by themselves, empty.
        for s in self.state.shards.iter().filter(|_| !handed_over) {
            while s.mailbox.send(ShardMsg::Shutdown).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut left = 0;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                left += 1;
            }
        }
        self.shared.broker.shutdown();
        if let Some(t) = self.cluster_thread {
            // It deregisters the node; bounded by the Redis response timeout.
            let until = Instant::now().max(deadline) + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let remaining = self.state.connections();
        let sum = |f: fn(&crate::runtime::metrics::ShardMetrics) -> u64| -> u64 {
            self.state.shards.iter().map(|s| f(&s.metrics)).sum()
        };
        let hinted = sum(|m| m.drain_hinted.get());
        let closed = sum(|m| m.drain_closed.get());
        let gone = (open as u64).saturating_sub(closed + remaining as u64);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if handed_over {
            let moved = sum(|m| m.handed_over.get());
            tracing::info!(
                handed_over = moved,
                connections_left = remaining,
                elapsed_ms,
                "upgrade: stopped after handing {moved} connection(s) to the new process, {remaining} left"
            );
            return;
        }
        tracing::info!(
            connections_at_start = open,
            hinted,
            left_on_their_own = gone,
            closed_1001 = closed,
            connections_left = remaining,
            threads_left = left,
            elapsed_ms,
            "drain finished in {elapsed_ms} ms: {open} connection(s); {hinted} hinted, {gone} left on their own, \
             {closed} closed with 1001, {remaining} still open"
        );
    }
}

/// Checks what `Config::validate` cannot (settings parsed by a layer above
/// the configuration): `server.trusted_proxies`, and the `[auth]` keys (files
/// are read, keys parsed).
pub fn check(config: &Config) -> Result<(), ConfigError> {
    Trusted::parse_list(&config.server.trusted_proxies).map_err(|e| ConfigError::new("server.trusted_proxies", e))?;
    if config.auth.mode == AuthMode::Token {
        // The verifier's errors start with the key at fault.
        Verifier::new(&config.auth).map_err(|e| {
            let (key, why) = e.split_once(": ").unwrap_or(("auth", e.as_str()));
            ConfigError::new(key, why)
        })?;
    }
    Ok(())
}

type Receivers = Vec<crate::runtime::mailbox::MailboxReceiver<AppMsg>>;

/// The state every shard shares, and each shard's mailbox receiver.
fn node_state(
    config: Config,
    n: usize,
    capacity: usize,
    local_addr: SocketAddr,
) -> io::Result<(Arc<NodeState<AppMsg>>, Receivers)> {
    let node_id = match config.server.node_id.as_str() {
        "" => format!("node-{:08x}", fastrand::u32(..)),
        id => id.to_string(),
    };
    let advertise_url = match config.server.advertise_url.as_str() {
        "" => format!("ws://{local_addr}/ws"),
        url => url.to_string(),
    };
    let mut shards = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mailbox(config.server.mailbox_capacity, config.websocket.mailbox_bytes)?;
        let metrics = ShardMetrics::default();
        metrics.capacity.store(capacity, Ordering::Relaxed);
        shards.push(ShardHandle { mailbox: tx, metrics });
        receivers.push(rx);
    }
    let l = &config.limits;
    let ip_table = (l.max_connections_per_ip > 0 || l.connection_rate_per_ip > 0.0).then(|| {
        Arc::new(IpTable::new(IpLimits {
            max_connections_per_ip: l.max_connections_per_ip,
            connection_rate_per_ip: l.connection_rate_per_ip,
            connection_burst_per_ip: l.connection_burst_per_ip,
        }))
    });
    let trusted = Trusted::parse_list(&config.server.trusted_proxies).unwrap_or_default();
    let started_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let state = NodeState {
        config,
        node_id,
        advertise_url,
        capacity_per_shard: capacity,
        shards,
        draining: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
        started_at,
        ip_table,
        trusted,
        classes: Default::default(),
    };
    Ok((Arc::new(state), receivers))
}
