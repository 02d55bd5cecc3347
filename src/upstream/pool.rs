//! One upstream's pool of HTTP/1.1 keep-alive connections, on the upstream
//! thread (single-threaded: `Rc`/`RefCell`, no locks).
//!
//! Accounting is exact: `total = idle + out + connecting` never exceeds
//! `max_connections`. A call takes an idle connection (newest first, so
//! the coldest age out), or a *slot* to open one if the pool is below its
//! maximum, or queues (FIFO) until `acquire_timeout_ms`. A connection given
//! back, or a slot freed by a broken one, goes straight to the first live
//! waiter (a [`Grant`] that finds its waiter gone gives itself back), so
//! nothing can be lost between a release and a timed-out waiter.
//!
//! The maintenance tick reaps idle connections past `idle_timeout_ms` down
//! to `min_connections`, retires those past `max_lifetime_ms` (busy ones
//! when they come back), refills to the minimum, reports checkouts held
//! past `leak_detection_ms`, and publishes the gauges. Health checks `GET`
//! every idle connection and replace those that fail.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::oneshot;

use super::breaker::{Breaker, Permit};
use super::stats::{Closed, Outcome, PoolStats};
use super::{Failure, Response};
use crate::config::UpstreamConfig;

/// One open connection.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    created: Instant,
}

/// What a waiter is handed: a connection, or the right to open one.
enum Item {
    Conn(Conn),
    Slot,
}

/// An [`Item`] in flight to a waiter; dropped unclaimed, it gives itself back.
struct Grant {
    pool: Rc<Pool>,
    item: Option<Item>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(i) = self.item.take() {
            self.pool.give(i);
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Checkout {
    since: Instant,
    reported: bool,
}

#[derive(Default)]
struct State {
    idle: VecDeque<Idle>,
    /// Connections checked out (leases and grants in flight).
    out: usize,
    /// Connections being opened (slots held).
    connecting: usize,
    waiters: VecDeque<oneshot::Sender<Grant>>,
    checkouts: slab::Slab<Checkout>,
}

impl State {
    fn total(&self) -> usize {
        self.idle.len() + self.out + self.connecting
    }
}

/// A pool and its breaker.
pub struct Pool {
    /// The upstream's settings.
    pub cfg: UpstreamConfig,
    authority: String,
    /// Its numbers (shared with the shards).
    pub stats: Arc<PoolStats>,
    st: RefCell<State>,
    breaker: RefCell<Breaker>,
    /// No refill before this (after a failed connect).
    refill_after: Cell<Instant>,
}

/// A checked-out connection. Dropped, it goes back to the pool, or is
/// closed if it broke, timed out or is past its lifetime.
pub struct Lease {
    pool: Rc<Pool>,
    conn: Option<Conn>,
    key: usize,
    reusable: bool,
    /// Give it back with this idle time (a health check is not a use).
    keep_since: Option<Instant>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        pool.st.borrow_mut().checkouts.try_remove(self.key);
        let Some(conn) = self.conn.take() else { return };
        let now = Instant::now();
        if !self.reusable {
            pool.discard(conn, Closed::Error);
        } else if now >= conn.created + ms(pool.cfg.max_lifetime_ms) {
            pool.discard(conn, Closed::Lifetime);
        } else if conn.send.is_closed() {
            pool.discard(conn, Closed::Remote);
        } else {
            pool.give_back(conn, self.keep_since.unwrap_or(now));
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Pool {
    /// An empty pool for `cfg` (the tick opens `min_connections`).
    pub fn new(cfg: UpstreamConfig) -> Rc<Pool> {
        let authority = cfg.authority().unwrap_or_default().to_string();
        let stats = Arc::new(PoolStats::new(&cfg.name, &cfg.url, cfg.min_connections, cfg.max_connections));
        let now = Instant::now();
        let breaker = Breaker::new(cfg.circuit_breaker_threshold, ms(cfg.circuit_breaker_cooldown_ms), now);
        Rc::new(Pool {
            cfg,
            authority,
            stats,
            st: RefCell::default(),
            breaker: RefCell::new(breaker),
            refill_after: Cell::new(now),
        })
    }

    fn publish(&self) {
        let st = self.st.borrow();
        let s = &self.stats;
        s.total.store(st.total(), Ordering::Relaxed);
        s.active.store(st.out, Ordering::Relaxed);
        s.idle.store(st.idle.len(), Ordering::Relaxed);
        drop(st);
        s.set_breaker(self.breaker.borrow_mut().state(Instant::now()));
    }

    /// Hands `item` (counted in `out` or `connecting`) to the first live
    /// waiter, or puts it back.
    fn give(self: &Rc<Self>, mut item: Item) {
        loop {
            let Some(tx) = self.st.borrow_mut().waiters.pop_front() else { break };
            match tx.send(Grant { pool: self.clone(), item: Some(item) }) {
                Ok(()) => return self.publish(),
                Err(mut g) => item = g.item.take().expect("the grant was just made with an item"),
            }
        }
        let mut st = self.st.borrow_mut();
        match item {
            Item::Conn(conn) => {
                st.out -= 1;
                st.idle.push_back(Idle { conn, since: Instant::now() });
            }
            Item::Slot => st.connecting -= 1,
        }
        drop(st);
        self.publish();
    }

    fn give_back(self: &Rc<Self>, conn: Conn, since: Instant) {
        let waiting = !self.st.borrow().waiters.is_empty();
        if waiting {
            return self.give(Item::Conn(conn));
        }
        let mut st = self.st.borrow_mut();
        st.out -= 1;
        // Back where it was in idle order when its idle time is kept.
        let at = st.idle.iter().position(|i| i.since > since).unwrap_or(st.idle.len());
        st.idle.insert(at, Idle { conn, since });
        drop(st);
        self.publish();
    }

    /// Closes a checked-out connection; a waiter gets its slot.
    fn discard(self: &Rc<Self>, conn: Conn, why: Closed) {
        drop(conn);
        self.stats.record_closed(why);
        let mut st = self.st.borrow_mut();
        st.out -= 1;
        let waiting = !st.waiters.is_empty();
        if waiting {
            st.connecting += 1;
        }
        drop(st);
        if waiting {
            self.give(Item::Slot);
        } else {
            self.publish();
        }
    }

    /// An idle connection, or a slot to open one, without waiting.
    fn try_take(&self) -> Option<Item> {
        let now = Instant::now();
        let mut st = self.st.borrow_mut();
        while let Some(i) = st.idle.pop_back() {
            if now >= i.conn.created + ms(self.cfg.max_lifetime_ms) {
                self.stats.record_closed(Closed::Lifetime);
            } else if i.conn.send.is_closed() {
                self.stats.record_closed(Closed::Remote);
            } else {
                st.out += 1;
                return Some(Item::Conn(i.conn));
            }
        }
        if st.total() < self.cfg.max_connections && st.waiters.is_empty() {
            st.connecting += 1;
            return Some(Item::Slot);
        }
        None
    }

    /// Waits for a connection until `deadline`.
    pub async fn acquire(self: &Rc<Self>, deadline: Instant) -> Result<Lease, Failure> {
        let started = Instant::now();
        let item = match self.try_take() {
            Some(i) => i,
            None => self.wait(deadline).await?,
        };
        self.publish();
        let conn = match item {
            Item::Conn(c) => c,
            Item::Slot => self.open_on_slot(deadline).await?,
        };
        if let Ok(mut h) = self.stats.acquire_us.lock() {
            let _ = h.record(started.elapsed().as_micros().max(1) as u64);
        }
        let key = self.st.borrow_mut().checkouts.insert(Checkout { since: Instant::now(), reported: false });
        Ok(Lease { pool: self.clone(), conn: Some(conn), key, reusable: true, keep_since: None })
    }

    async fn wait(self: &Rc<Self>, deadline: Instant) -> Result<Item, Failure> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.st.borrow_mut();
            // Waiters that timed out stay queued until a release skips
            // them; sweep them now and then so the queue stays bounded by
            // the calls waiting now.
            if st.waiters.len() >= 64 && st.waiters.len().is_power_of_two() {
                st.waiters.retain(|t| !t.is_closed());
            }
            st.waiters.push_back(tx);
        }
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let got = tokio::time::timeout_at(deadline.into(), rx).await;
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        match got {
            Ok(Ok(mut g)) => Ok(g.item.take().expect("a grant carries its item until claimed")),
            _ => Err(Failure::AcquireTimeout),
        }
    }

    /// Opens a connection on a slot this call holds.
    async fn open_on_slot(self: &Rc<Self>, deadline: Instant) -> Result<Conn, Failure> {
        let got = tokio::time::timeout_at(deadline.into(), self.connect()).await;
        match got {
            Ok(Ok(conn)) => {
                let mut st = self.st.borrow_mut();
                st.connecting -= 1;
                st.out += 1;
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.give(Item::Slot);
                Err(e)
            }
            Err(_) => {
                self.give(Item::Slot);
                Err(Failure::AcquireTimeout)
            }
        }
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        let stream = tokio::net::TcpStream::connect(self.authority.as_str()).await.map_err(|e| {
            tracing::debug!(upstream = %self.cfg.name, error = %e, "connect failed");
            Failure::Connect
        })?;
        let _ = stream.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(stream);
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|_| Failure::Connect)?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        self.stats.created.fetch_add(1, Ordering::Relaxed);
        Ok(Conn { send, created: Instant::now() })
    }

    /// Sends one request on `lease` within `timeout`. A failure or timeout
    /// leaves the connection unusable (it is closed when the lease drops).
    pub async fn send(
        &self,
        lease: &mut Lease,
        get: bool,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, Failure> {
        let max = self.cfg.max_response_bytes;
        let authority = self.authority.as_str();
        let Some(conn) = lease.conn.as_mut() else { return Err(Failure::Io) };
        let exchange = async {
            conn.send.ready().await.map_err(|_| Failure::Io)?;
            let method = if get { hyper::Method::GET } else { hyper::Method::POST };
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, authority)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .map_err(|_| Failure::Io)?;
            let res = conn.send.send_request(req).await.map_err(|_| Failure::Io)?;
            let status = res.status().as_u16();
            let body = Limited::new(res.into_body(), max).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    Failure::TooLarge
                } else {
                    Failure::Io
                }
            })?;
            Ok(Response { status, body: body.to_bytes() })
        };
        let res = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        };
        if res.is_err() {
            lease.reusable = false;
        }
        res
    }

    /// One call: breaker, acquire, send, retries with exponential backoff
    /// and jitter, all before `deadline` if given.
    pub async fn call(
        self: &Rc<Self>,
        get: bool,
        path: &str,
        body: Bytes,
        deadline: Option<Instant>,
    ) -> Result<Response, Failure> {
        let started = Instant::now();
        let cfg = &self.cfg;
        let mut attempt = 0u32;
        let res = loop {
            let now = Instant::now();
            let permit = self.breaker.borrow_mut().permit(now);
            if permit == Permit::Refused {
                break Err(Failure::CircuitOpen);
            }
            let acquire_by =
                deadline.map_or(now + ms(cfg.acquire_timeout_ms), |d| d.min(now + ms(cfg.acquire_timeout_ms)));
            let res = match self.acquire(acquire_by).await {
                Err(Failure::AcquireTimeout) => {
                    self.breaker.borrow_mut().abandon(permit);
                    break Err(Failure::AcquireTimeout);
                }
                Err(e) => Err(e),
                Ok(mut lease) => {
                    let left = deadline.map_or(ms(cfg.request_timeout_ms), |d| {
                        d.saturating_duration_since(Instant::now()).min(ms(cfg.request_timeout_ms))
                    });
                    self.send(&mut lease, get, path, body.clone(), left).await
                }
            };
            let failed = match &res {
                Ok(r) => r.status >= 500,
                Err(_) => true,
            };
            {
                let mut b = self.breaker.borrow_mut();
                if failed {
                    b.failure(Instant::now());
                } else {
                    b.success();
                }
            }
            self.publish();
            let retryable = failed && !matches!(res, Err(Failure::TooLarge));
            if !retryable || attempt >= cfg.retry_attempts {
                break res;
            }
            attempt += 1;
            let delay = backoff(cfg.retry_delay_ms, attempt, fastrand::f64());
            if deadline.is_some_and(|d| Instant::now() + delay >= d) {
                break res;
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        };
        self.stats.record(outcome(&res));
        if res.is_ok() {
            if let Ok(mut h) = self.stats.request_us.lock() {
                let _ = h.record(started.elapsed().as_micros().max(1) as u64);
            }
        }
        res
    }

    /// Reaps, retires, refills, reports leaks, publishes. Called every tick.
    pub fn maintain(self: &Rc<Self>, now: Instant) {
        let cfg = &self.cfg;
        {
            let mut st = self.st.borrow_mut();
            let mut keep = VecDeque::with_capacity(st.idle.len());
            let mut surplus = st.total().saturating_sub(cfg.min_connections);
            // Oldest-idle first: the front is the coldest.
            while let Some(i) = st.idle.pop_front() {
                if now >= i.conn.created + ms(cfg.max_lifetime_ms) {
                    self.stats.record_closed(Closed::Lifetime);
                } else if i.conn.send.is_closed() {
                    self.stats.record_closed(Closed::Remote);
                } else if surplus > 0 && now >= i.since + ms(cfg.idle_timeout_ms) {
                    self.stats.record_closed(Closed::Idle);
                    surplus -= 1;
                } else {
                    keep.push_back(i);
                }
            }
            st.idle = keep;
            if cfg.leak_detection_ms > 0 {
                for (_, c) in st.checkouts.iter_mut() {
                    if !c.reported && now >= c.since + ms(cfg.leak_detection_ms) {
                        c.reported = true;
                        self.stats.leaks.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            upstream = %cfg.name, held_ms = now.duration_since(c.since).as_millis() as u64,
                            "upstream connection checked out longer than leak_detection_ms ({} ms)", cfg.leak_detection_ms
                        );
                    }
                }
            }
        }
        self.serve_waiters();
        self.refill(now);
        self.publish();
    }

    /// Gives waiters the slots that closed connections left (a waiter only
    /// queues when the pool is full, so this is a safety net).
    fn serve_waiters(self: &Rc<Self>) {
        loop {
            {
                let mut st = self.st.borrow_mut();
                st.waiters.retain(|t| !t.is_closed());
                if st.waiters.is_empty() || st.total() >= self.cfg.max_connections {
                    return;
                }
                st.connecting += 1;
            }
            self.give(Item::Slot);
        }
    }

    /// Opens connections up to `min_connections` (not while the breaker is
    /// not closed, nor right after a failed attempt).
    fn refill(self: &Rc<Self>, now: Instant) {
        if now < self.refill_after.get() || self.breaker.borrow_mut().state(now) != super::breaker::State::Closed {
            return;
        }
        loop {
            {
                let mut st = self.st.borrow_mut();
                if st.total() >= self.cfg.min_connections || !st.waiters.is_empty() {
                    return;
                }
                st.connecting += 1;
            }
            let pool = self.clone();
            tokio::task::spawn_local(async move {
                let deadline = Instant::now() + ms(pool.cfg.acquire_timeout_ms.max(pool.cfg.request_timeout_ms));
                match pool.open_on_slot(deadline).await {
                    Ok(conn) => pool.give(Item::Conn(conn)),
                    Err(_) => {
                        let wait = ms(pool.cfg.retry_delay_ms.max(100) * 4);
                        pool.refill_after.set(Instant::now() + wait);
                        pool.breaker.borrow_mut().failure(Instant::now());
                        pool.publish();
                    }
                }
            });
        }
    }

    /// Checks every idle connection (and, with none idle and room to open
    /// one, a fresh one) with `GET health_check_path`; a failing one is
    /// closed (the refill replaces it). Returns when all were checked.
    pub async fn health_check(self: &Rc<Self>) {
        let cfg = &self.cfg;
        if cfg.health_check_path.is_empty() {
            return;
        }
        let permit = self.breaker.borrow_mut().permit(Instant::now());
        if permit == Permit::Refused {
            return;
        }
        let idle: Vec<Idle> = {
            let mut st = self.st.borrow_mut();
            let v: Vec<Idle> = st.idle.drain(..).collect();
            st.out += v.len();
            v
        };
        let mut leases = Vec::with_capacity(idle.len().max(1));
        for i in idle {
            let key = self.st.borrow_mut().checkouts.insert(Checkout { since: Instant::now(), reported: false });
            leases.push(Lease {
                pool: self.clone(),
                conn: Some(i.conn),
                key,
                reusable: true,
                keep_since: Some(i.since),
            });
        }
        if leases.is_empty() {
            let busy = self.st.borrow().total() >= cfg.max_connections;
            if busy {
                self.breaker.borrow_mut().abandon(permit);
                return; // every connection is working: that is evidence enough
            }
            match self.acquire(Instant::now() + ms(cfg.acquire_timeout_ms)).await {
                Ok(l) => leases.push(l),
                Err(_) => return self.health_result(false, permit),
            }
        }
        let mut all_ok = true;
        for mut lease in leases {
            let r = self.send(&mut lease, true, &cfg.health_check_path, Bytes::new(), ms(cfg.request_timeout_ms)).await;
            let ok = matches!(&r, Ok(resp) if resp.status < 500);
            if !ok {
                lease.reusable = false;
                all_ok = false;
                self.stats.health_check_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.health_result(all_ok, permit);
    }

    fn health_result(&self, ok: bool, permit: Permit) {
        self.stats.healthy.store(ok, Ordering::Relaxed);
        let mut b = self.breaker.borrow_mut();
        match (ok, permit) {
            (true, _) => b.success(),
            (false, _) => b.failure(Instant::now()),
        }
        drop(b);
        self.publish();
    }
}

/// The wait before retry `attempt` (1-based): `base * 2^(attempt-1)`,
/// times a jitter factor from 0.5 to 1.5 (`r` in 0..1).
pub fn backoff(base_ms: u64, attempt: u32, r: f64) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(16));
    Duration::from_micros((exp as f64 * 1000.0 * (0.5 + r)) as u64)
}

/// The outcome a call's result is counted as.
pub fn outcome(r: &Result<Response, Failure>) -> Outcome {
    match r {
        Ok(resp) if resp.status >= 500 => Outcome::ServerError,
        Ok(resp) if resp.status >= 400 => Outcome::ClientError,
        Ok(_) => Outcome::Ok,
        Err(f) => f.outcome(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter() {
        assert_eq!(backoff(50, 1, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(50, 2, 0.5), Duration::from_millis(100));
        assert_eq!(backoff(50, 3, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(50, 3, 1.0), Duration::from_millis(300));
    }
}
