//! A pool of clients across endpoints (seed 001's `ClientConnectionPool`): at most
//! `max_connections_per_host` per endpoint, [`Pool::acquire`] that waits up to
//! `acquire_timeout` when all are busy, release on drop, [`PoolStats`], and connections
//! found stopped (4000, 1008, given up, ...) dropped and replaced by fresh ones.
//!
//! Pooled connections suit request-style use (publish, direct, echo, presence). Their
//! events are buffered per connection ([`PooledClient::events`]); what a user left
//! unread is discarded when the connection goes back to the pool.

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::client::{Client, ClientConfig, ConnState, Events};
use crate::error::{Error, Result};

/// Pool settings. Defaults: 8 per host, acquire timeout 5 s.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Endpoints (`ws://host:port/ws`); each pooled connection talks to one of them.
    pub endpoints: Vec<String>,
    /// Connections per endpoint, busy and idle together. Default 8.
    pub max_connections_per_host: usize,
    /// How long `acquire` waits for a free connection (including connecting a new one). Default 5 s.
    pub acquire_timeout: Duration,
    /// Settings of each connection; its `urls` are replaced by the connection's endpoint.
    pub client: ClientConfig,
}

impl PoolConfig {
    /// Defaults for `endpoints`.
    pub fn new(endpoints: Vec<String>) -> PoolConfig {
        let client = ClientConfig::with_urls(endpoints.clone());
        PoolConfig { endpoints, max_connections_per_host: 8, acquire_timeout: Duration::from_secs(5), client }
    }
}

/// Counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Connections held (active + idle).
    pub total: usize,
    /// Acquired, not yet released (connecting ones included).
    pub active: usize,
    /// In the pool, free.
    pub idle: usize,
    /// `acquire` calls waiting.
    pub pending: usize,
    /// Connections dropped as unhealthy since the start.
    pub replaced: u64,
}

struct Entry {
    client: Client,
    events: Events,
}

struct Host {
    url: String,
    idle: Vec<Entry>,
    active: usize,
}

struct State {
    hosts: Vec<Host>,
    pending: usize,
    replaced: u64,
    closed: bool,
}

struct Inner {
    cfg: PoolConfig,
    state: Mutex<State>,
    released: Notify,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What `acquire` found.
enum Take {
    Idle(usize, Entry),
    Create(usize, String),
    Wait,
}

impl Pool {
    /// An empty pool (connections are made on demand).
    pub fn new(cfg: PoolConfig) -> Result<Pool> {
        if cfg.endpoints.is_empty() || cfg.max_connections_per_host == 0 {
            return Err(Error::Config("a pool needs endpoints and max_connections_per_host >= 1".into()));
        }
        let hosts = cfg.endpoints.iter().map(|u| Host { url: u.clone(), idle: Vec::new(), active: 0 }).collect();
        let state = Mutex::new(State { hosts, pending: 0, replaced: 0, closed: false });
        Ok(Pool { inner: Arc::new(Inner { cfg, state, released: Notify::new() }) })
    }

    /// Counts now.
    pub fn stats(&self) -> PoolStats {
        let s = self.inner.lock();
        let active = s.hosts.iter().map(|h| h.active).sum();
        let idle = s.hosts.iter().map(|h| h.idle.len()).sum();
        PoolStats { total: active + idle, active, idle, pending: s.pending, replaced: s.replaced }
    }

    /// A connected client, waiting up to `acquire_timeout` for one to be free (or made).
    pub async fn acquire(&self) -> Result<PooledClient> {
        let deadline = Instant::now() + self.inner.cfg.acquire_timeout;
        self.inner.lock().pending += 1;
        let got = self.acquire_until(deadline).await;
        self.inner.lock().pending -= 1;
        got
    }

    async fn acquire_until(&self, deadline: Instant) -> Result<PooledClient> {
        loop {
            let notified = self.inner.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.take()? {
                Take::Idle(host, entry) => return Ok(self.wrap(host, entry)),
                Take::Create(host, url) => return self.create(host, url, deadline).await,
                Take::Wait => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(Error::PoolTimeout);
                    }
                }
            }
        }
    }

    /// Under the lock: a healthy idle connection, else a slot for a new one, else wait.
    fn take(&self) -> Result<Take> {
        let mut s = self.inner.lock();
        if s.closed {
            return Err(Error::PoolClosed);
        }
        let mut dropped = 0;
        for (i, host) in s.hosts.iter_mut().enumerate() {
            while let Some(entry) = host.idle.pop() {
                if entry.client.is_connected() {
                    host.active += 1;
                    s.replaced += dropped;
                    return Ok(Take::Idle(i, entry));
                }
                // Stopped, or lost its node and still reconnecting: replace it.
                dropped += 1;
                retire(entry);
            }
        }
        s.replaced += dropped;
        let cap = self.inner.cfg.max_connections_per_host;
        let best =
            s.hosts.iter().enumerate().filter(|(_, h)| h.active + h.idle.len() < cap).min_by_key(|(_, h)| h.active);
        match best.map(|(i, _)| i) {
            Some(i) => {
                s.hosts[i].active += 1;
                Ok(Take::Create(i, s.hosts[i].url.clone()))
            }
            None => Ok(Take::Wait),
        }
    }

    async fn create(&self, host: usize, url: String, deadline: Instant) -> Result<PooledClient> {
        let mut cfg = self.inner.cfg.client.clone();
        cfg.urls = vec![url];
        let made = Client::start(cfg);
        let (client, events) = match made {
            Ok(pair) => pair,
            Err(e) => {
                self.give_back_slot(host);
                return Err(e);
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match client.wait_connected(left).await {
            Ok(()) => Ok(self.wrap(host, Entry { client, events })),
            Err(e) => {
                self.give_back_slot(host);
                retire(Entry { client, events });
                Err(if e == Error::Timeout { Error::PoolTimeout } else { e })
            }
        }
    }

    fn give_back_slot(&self, host: usize) {
        self.inner.lock().hosts[host].active -= 1;
        self.inner.released.notify_one();
    }

    fn wrap(&self, host: usize, entry: Entry) -> PooledClient {
        PooledClient { entry: Some(entry), host, pool: self.inner.clone() }
    }

    /// Closes idle connections and refuses further acquires; busy ones close on release.
    pub fn close(&self) {
        let mut s = self.inner.lock();
        s.closed = true;
        for h in &mut s.hosts {
            h.idle.drain(..).for_each(retire);
        }
        drop(s);
        self.inner.released.notify_waiters();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still consistent enough
        // to keep serving; poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, host: usize, mut entry: Entry) {
        while entry.events.try_recv().is_some() {}
        let mut s = self.lock();
        s.hosts[host].active -= 1;
        if s.closed || matches!(entry.client.state(), ConnState::Stopped(_)) {
            if !s.closed {
                s.replaced += 1;
            }
            drop(s);
            retire(entry);
        } else {
            s.hosts[host].idle.push(entry);
            drop(s);
        }
        self.released.notify_one();
    }
}

/// Closes a connection in the background (dropping the last handle closes it too; this
/// sends the close frame first).
fn retire(entry: Entry) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move { entry.client.close().await });
    }
}

/// An acquired connection; goes back to the pool when dropped.
pub struct PooledClient {
    entry: Option<Entry>,
    host: usize,
    pool: Arc<Inner>,
}

impl PooledClient {
    /// This connection's events (what the server sent besides answers).
    pub fn events(&mut self) -> &mut Events {
        &mut self.entry.as_mut().expect("present until drop").events
    }

    /// The endpoint it talks to.
    pub fn endpoint(&self) -> String {
        self.pool.lock().hosts[self.host].url.clone()
    }
}

impl Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.entry.as_ref().expect("present until drop").client
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.pool.release(self.host, entry);
        }
    }
}

impl std::fmt::Debug for PooledClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledClient").field("endpoint", &self.endpoint()).field("client", &**self).finish()
    }
}
