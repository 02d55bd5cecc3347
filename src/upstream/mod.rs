//! Upstream: outbound HTTP to the application behind the node (its
//! connect, RPC, publish and disconnect handlers), through one keep-alive
//! connection pool per `[[upstream]]`.
//!
//! Shards never wait on a backend: a call is a message to the upstream
//! thread (a bounded queue; full answers at once), and its answer comes
//! back through the reply closure the caller gave, which posts it to the
//! caller's mailbox. The thread runs a current-thread tokio runtime with
//! hyper's HTTP/1.1 client connections, one [`pool::Pool`] per upstream,
//! so `max_connections` is exactly what a backend sees from the node.
//!
//! [`pool`] is the pool (acquire, leases, reaping, health checks, calls),
//! [`breaker`] its circuit breaker, [`stats`] seed 002's `PoolMetrics`
//! and the alerts, [`worker`] the thread. This layer knows nothing of
//! shards, connections or the protocol (docs/design.md, "Upstreams").

pub mod breaker;
pub mod pool;
pub mod stats;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::config::UpstreamConfig;
use crate::prom::{Kind, Text};
use stats::{Outcome, PoolStats};

/// Why a call got no answer from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection within `acquire_timeout_ms` (the pool is exhausted or
    /// opening one took too long).
    AcquireTimeout,
    /// The breaker is open.
    CircuitOpen,
    /// The call queue (`proxy.queue_capacity`) is full.
    QueueFull,
    /// The backend refused or did not accept a TCP connection.
    Connect,
    /// The request ran past `request_timeout_ms`.
    Timeout,
    /// The connection broke, or the answer was not HTTP.
    Io,
    /// The answer was larger than `max_response_bytes`.
    TooLarge,
}

impl Failure {
    /// The outcome counted for it.
    pub fn outcome(self) -> Outcome {
        match self {
            Failure::AcquireTimeout => Outcome::AcquireTimeout,
            Failure::CircuitOpen => Outcome::CircuitOpen,
            Failure::QueueFull => Outcome::QueueFull,
            Failure::Connect => Outcome::ConnectError,
            Failure::Timeout => Outcome::Timeout,
            Failure::Io => Outcome::IoError,
            Failure::TooLarge => Outcome::TooLarge,
        }
    }

    /// A short reason for clients and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::AcquireTimeout => "no backend connection free in time",
            Failure::CircuitOpen => "backend circuit open after repeated failures",
            Failure::QueueFull => "backend call queue full",
            Failure::Connect => "backend refused the connection",
            Failure::Timeout => "backend did not answer in time",
            Failure::Io => "backend connection failed",
            Failure::TooLarge => "backend answer too large",
        }
    }
}

/// A backend's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Body (at most `max_response_bytes`).
    pub body: Bytes,
}

/// Where a call's result goes; runs on the upstream thread (or at once on
/// the caller's, when the queue is full): it must only post a message.
pub type Reply = Box<dyn FnOnce(Result<Response, Failure>) + Send>;

/// One call: `POST path` with a JSON body.
pub struct Call {
    /// Request path.
    pub path: String,
    /// JSON body.
    pub body: Bytes,
    /// Give up (retries included) by then, if set.
    pub deadline: Option<Instant>,
    /// The answer.
    pub reply: Reply,
}

/// A stream of notices sent in batches (the disconnect notices).
#[derive(Debug, Clone)]
pub struct NoticeSpec {
    /// Index of the upstream.
    pub pool: usize,
    /// Request path.
    pub path: String,
    /// The body is `{"<key>":[items...]}`.
    pub key: String,
    /// Items per POST at most.
    pub batch: usize,
    /// A partial batch leaves after this, ms.
    pub flush_ms: u64,
    /// Items waiting at most; more are dropped.
    pub queue: usize,
}

/// Counts of one notice stream.
#[derive(Debug, Default)]
pub struct NoticeStats {
    /// Items delivered (the backend answered below 500).
    pub sent: AtomicU64,
    /// Items dropped (queue full, or the POST failed after its retries).
    pub dropped: AtomicU64,
    /// POSTs made.
    pub batches: AtomicU64,
}

enum Cmd {
    Call { pool: usize, call: Call },
    Notice { target: usize, item: String },
}

/// The node's side of the upstream thread: cheap to share, never blocks.
pub struct Upstreams {
    tx: tokio::sync::mpsc::Sender<Cmd>,
    pools: Vec<Arc<PoolStats>>,
    notices: Vec<(NoticeSpec, Arc<NoticeStats>)>,
}

impl Upstreams {
    /// Starts the upstream thread for `upstreams`, with a call queue of
    /// `queue` and the notice streams `notices`.
    pub fn start(upstreams: &[UpstreamConfig], notices: Vec<NoticeSpec>, queue: usize) -> std::io::Result<Upstreams> {
        let (tx, rx) = tokio::sync::mpsc::channel(queue.max(1));
        let notices: Vec<_> = notices.into_iter().map(|n| (n, Arc::new(NoticeStats::default()))).collect();
        let pools = worker::spawn(upstreams.to_vec(), notices.clone(), rx)?;
        Ok(Upstreams { tx, pools, notices })
    }

    /// The index of upstream `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// Queues `call` on upstream `pool`; a full queue answers it at once
    /// (`QueueFull`), on this thread.
    pub fn call(&self, pool: usize, call: Call) {
        if let Err(e) = self.tx.try_send(Cmd::Call { pool, call }) {
            let (tokio::sync::mpsc::error::TrySendError::Full(cmd)
            | tokio::sync::mpsc::error::TrySendError::Closed(cmd)) = e;
            if let Cmd::Call { pool, call } = cmd {
                if let Some(p) = self.pools.get(pool) {
                    p.record(Outcome::QueueFull);
                }
                (call.reply)(Err(Failure::QueueFull));
            }
        }
    }

    /// Queues a notice for stream `target`; dropped (counted) when full.
    pub fn notice(&self, target: usize, item: String) {
        if self.tx.try_send(Cmd::Notice { target, item }).is_err() {
            if let Some((_, s)) = self.notices.get(target) {
                s.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Every pool's numbers, in config order.
    pub fn pools(&self) -> &[Arc<PoolStats>] {
        &self.pools
    }

    /// The pools and notice streams as `/pools` shows them.
    pub fn json(&self) -> Value {
        let pools: Vec<Value> = self.pools.iter().map(|p| p.json()).collect();
        let notices: Vec<Value> = self
            .notices
            .iter()
            .map(|(n, s)| {
                json!({"upstream": self.pools.get(n.pool).map(|p| p.name.as_str()), "path": n.path,
                    "sent": s.sent.load(Ordering::Relaxed), "dropped": s.dropped.load(Ordering::Relaxed),
                    "batches": s.batches.load(Ordering::Relaxed)})
            })
            .collect();
        json!({"pools": pools, "notices": notices})
    }

    /// The `ringside_upstream_*` families.
    pub fn render(&self, t: &mut Text) {
        stats::render(t, &self.pools);
        if self.notices.is_empty() {
            return;
        }
        t.family("upstream_notices_total", Kind::Counter, "Batched notices (disconnects) by outcome.");
        for (n, s) in &self.notices {
            let name = self.pools.get(n.pool).map(|p| p.name.as_str()).unwrap_or("");
            for (outcome, v) in [("sent", &s.sent), ("dropped", &s.dropped)] {
                t.sample(
                    "upstream_notices_total",
                    &[("upstream", &name), ("path", &n.path), ("outcome", &outcome)],
                    v.load(Ordering::Relaxed),
                );
            }
        }
    }
}
