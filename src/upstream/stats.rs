//! Seed 002's `PoolMetrics` for one upstream pool: written by the upstream
//! thread only (relaxed atomics, one writer), read by any shard serving
//! `/pools` or `/metrics`. Also the seed's alerts, computed when read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::breaker::State;
use crate::prom::{Kind, Text};

/// How a call ended (one count per call, after its retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Ok,
    /// 4xx: the backend answered and refused; not a pool failure.
    ClientError,
    /// 5xx after the retries.
    ServerError,
    /// The request ran past `request_timeout_ms`.
    Timeout,
    /// No TCP connection could be made.
    ConnectError,
    /// The connection broke mid-request, or the answer was not HTTP.
    IoError,
    /// The answer was larger than `max_response_bytes`.
    TooLarge,
    /// No connection within `acquire_timeout_ms`.
    AcquireTimeout,
    /// The breaker was open.
    CircuitOpen,
    /// The upstream thread's queue (`proxy.queue_capacity`) was full.
    QueueFull,
}

impl Outcome {
    /// Every outcome, in counter order.
    pub const ALL: [Outcome; 10] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::ServerError,
        Outcome::Timeout,
        Outcome::ConnectError,
        Outcome::IoError,
        Outcome::TooLarge,
        Outcome::AcquireTimeout,
        Outcome::CircuitOpen,
        Outcome::QueueFull,
    ];

    /// The label in `/pools` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::IoError => "io_error",
            Outcome::TooLarge => "too_large",
            Outcome::AcquireTimeout => "acquire_timeout",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::QueueFull => "queue_full",
        }
    }

    /// Counts toward the failure rate (everything but an answer below 500).
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::ClientError)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a connection was closed by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Idle past `idle_timeout_ms` while above `min_connections`.
    Idle,
    /// Older than `max_lifetime_ms`.
    Lifetime,
    /// Broken, timed out, or failed a health check.
    Error,
    /// The backend closed it.
    Remote,
}

impl Closed {
    /// Every reason, in counter order.
    pub const ALL: [Closed; 4] = [Closed::Idle, Closed::Lifetime, Closed::Error, Closed::Remote];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Closed::Idle => "idle",
            Closed::Lifetime => "lifetime",
            Closed::Error => "error",
            Closed::Remote => "remote",
        }
    }
}

/// The failure-rate alert looks at this much recent history.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One pool's numbers.
#[derive(Debug)]
pub struct PoolStats {
    /// The upstream's name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// `min_connections`.
    pub min: usize,
    /// `max_connections`.
    pub max: usize,
    /// Open connections (idle + active + being opened).
    pub total: AtomicUsize,
    /// Checked out by a call.
    pub active: AtomicUsize,
    /// Open and unused.
    pub idle: AtomicUsize,
    /// Calls waiting for a connection.
    pub pending: AtomicUsize,
    requests: [AtomicU64; Outcome::ALL.len()],
    /// Attempts after the first.
    pub retries: AtomicU64,
    /// Failed health checks.
    pub health_check_failures: AtomicU64,
    /// The last health check (or, without checks, the last attempt) succeeded.
    pub healthy: AtomicBool,
    breaker: AtomicU8,
    /// Checkouts held past `leak_detection_ms`.
    pub leaks: AtomicU64,
    /// Connections opened.
    pub created: AtomicU64,
    closed: [AtomicU64; Closed::ALL.len()],
    /// Time to get a connection, µs (calls that got one).
    pub acquire_us: Mutex<Histogram<u64>>,
    /// Whole call, µs (calls that got an answer).
    pub request_us: Mutex<Histogram<u64>>,
    /// (when, requests, failures) samples for the failure-rate alert.
    window: Mutex<VecDeque<(Instant, u64, u64)>>,
}

fn histogram() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds"))
}

impl PoolStats {
    /// Zeroed numbers for pool `name`.
    pub fn new(name: &str, url: &str, min: usize, max: usize) -> Self {
        PoolStats {
            name: name.into(),
            url: url.into(),
            min,
            max,
            total: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            requests: Default::default(),
            retries: AtomicU64::new(0),
            health_check_failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            breaker: AtomicU8::new(0),
            leaks: AtomicU64::new(0),
            created: AtomicU64::new(0),
            closed: Default::default(),
            acquire_us: histogram(),
            request_us: histogram(),
            window: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a finished call.
    pub fn record(&self, o: Outcome) {
        self.requests[o.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Calls that ended with `o`.
    pub fn requests(&self, o: Outcome) -> u64 {
        self.requests[o.index()].load(Ordering::Relaxed)
    }

    /// Counts a closed connection.
    pub fn record_closed(&self, why: Closed) {
        self.closed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed for `why`.
    pub fn closed(&self, why: Closed) -> u64 {
        self.closed[why as usize].load(Ordering::Relaxed)
    }

    /// Sets the breaker gauge.
    pub fn set_breaker(&self, s: State) {
        self.breaker.store(s.code(), Ordering::Relaxed);
    }

    /// The breaker state last published.
    pub fn breaker(&self) -> State {
        State::from_code(self.breaker.load(Ordering::Relaxed))
    }

    fn totals(&self) -> (u64, u64) {
        let all: u64 = Outcome::ALL.iter().map(|o| self.requests(*o)).sum();
        let failed: u64 = Outcome::ALL.iter().filter(|o| o.is_failure()).map(|o| self.requests(*o)).sum();
        (all, failed)
    }

    /// Takes a failure-rate sample (the upstream thread, about once a second).
    pub fn tick(&self, now: Instant) {
        let (all, failed) = self.totals();
        if let Ok(mut w) = self.window.lock() {
            w.push_back((now, all, failed));
            while w.len() > 2 && w.front().is_some_and(|(t, _, _)| now.duration_since(*t) > WINDOW) {
                w.pop_front();
            }
        }
    }

    /// Failed share of the calls of the last [`WINDOW`] (0 with none).
    pub fn failure_rate(&self) -> f64 {
        let (all, failed) = self.totals();
        let (a0, f0) = self.window.lock().ok().and_then(|w| w.front().map(|(_, a, f)| (*a, *f))).unwrap_or((0, 0));
        let (n, f) = (all.saturating_sub(a0), failed.saturating_sub(f0));
        if n == 0 {
            0.0
        } else {
            f as f64 / n as f64
        }
    }

    /// Active connections over `max_connections`: how close the pool is to
    /// refusing (the seed divides by total; a pool that may still grow is
    /// not near its limit just because all it has open is busy).
    pub fn utilization(&self) -> f64 {
        self.active.load(Ordering::Relaxed) as f64 / self.max.max(1) as f64
    }

    /// The seed's alerts: utilization > 0.9, failure rate > 5%, unhealthy
    /// (a failed health check, or the breaker not closed).
    pub fn alerts(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let u = self.utilization();
        if u > 0.9 {
            out.push(json!({"type": "high_utilization", "severity": "warning",
                "message": format!("High utilization: {:.1}%", u * 100.0)}));
        }
        let f = self.failure_rate();
        if f > 0.05 {
            out.push(json!({"type": "high_failure_rate", "severity": "critical",
                "message": format!("High failure rate: {:.1}%", f * 100.0)}));
        }
        if !self.is_healthy() {
            out.push(json!({"type": "unhealthy", "severity": "critical",
                "message": format!("Pool unhealthy (breaker {})", self.breaker().name())}));
        }
        out
    }

    /// Healthy: the last check passed and the breaker is closed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.breaker() == State::Closed
    }

    /// The pool as `/pools` shows it.
    pub fn json(&self) -> Value {
        let q = |h: &Mutex<Histogram<u64>>| -> Value {
            let Ok(h) = h.lock() else { return Value::Null };
            json!({"count": h.len(), "p50_us": h.value_at_quantile(0.5), "p95_us": h.value_at_quantile(0.95),
                "p99_us": h.value_at_quantile(0.99), "max_us": h.max()})
        };
        let requests: serde_json::Map<String, Value> =
            Outcome::ALL.iter().map(|o| (o.name().to_string(), json!(self.requests(*o)))).collect();
        let closed: serde_json::Map<String, Value> =
            Closed::ALL.iter().map(|c| (c.name().to_string(), json!(self.closed(*c)))).collect();
        let ld = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        json!({
            "name": self.name, "url": self.url,
            "min": self.min, "max": self.max,
            "total": ld(&self.total), "active": ld(&self.active), "idle": ld(&self.idle), "pending": ld(&self.pending),
            "utilization": self.utilization(),
            "acquire_wait": q(&self.acquire_us), "latency": q(&self.request_us),
            "requests": requests, "retries": self.retries.load(Ordering::Relaxed),
            "failure_rate": self.failure_rate(),
            "health_check_failures": self.health_check_failures.load(Ordering::Relaxed),
            "healthy": self.is_healthy(),
            "breaker": self.breaker().name(),
            "leaks": self.leaks.load(Ordering::Relaxed),
            "created": self.created.load(Ordering::Relaxed), "closed": closed,
            "alerts": self.alerts(),
        })
    }
}

/// Bucket bounds (seconds) for acquire waits and call latencies.
const BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A family rendered by reading one number per pool: name, help, reader.
type Family<T> = (&'static str, &'static str, fn(&PoolStats) -> T);

/// The `ringside_upstream_*` families, one label set per pool.
pub fn render(t: &mut Text, pools: &[std::sync::Arc<PoolStats>]) {
    if pools.is_empty() {
        return;
    }
    let gauges: [Family<usize>; 6] = [
        ("upstream_connections", "Open connections (idle + active + opening).", |p| p.total.load(Ordering::Relaxed)),
        ("upstream_active", "Connections checked out by a call.", |p| p.active.load(Ordering::Relaxed)),
        ("upstream_idle", "Open, unused connections.", |p| p.idle.load(Ordering::Relaxed)),
        ("upstream_pending", "Calls waiting for a connection.", |p| p.pending.load(Ordering::Relaxed)),
        ("upstream_max_connections", "upstream.max_connections.", |p| p.max),
        ("upstream_healthy", "1 when the last health check passed and the breaker is closed.", |p| {
            p.is_healthy() as usize
        }),
    ];
    for (name, help, f) in gauges {
        t.family(name, Kind::Gauge, help);
        for p in pools {
            t.sample(name, &[("upstream", &p.name)], f(p));
        }
    }
    t.family("upstream_breaker_state", Kind::Gauge, "1 for the breaker's current state.");
    for p in pools {
        for s in State::ALL {
            t.sample(
                "upstream_breaker_state",
                &[("upstream", &p.name), ("state", &s.name())],
                (p.breaker() == s) as u8,
            );
        }
    }
    t.family("upstream_requests_total", Kind::Counter, "Calls by how they ended (after retries).");
    for p in pools {
        for o in Outcome::ALL {
            t.sample("upstream_requests_total", &[("upstream", &p.name), ("outcome", &o.name())], p.requests(o));
        }
    }
    let counters: [Family<u64>; 4] = [
        ("upstream_retries_total", "Attempts after a call's first.", |p| p.retries.load(Ordering::Relaxed)),
        ("upstream_health_check_failures_total", "Failed health checks.", |p| {
            p.health_check_failures.load(Ordering::Relaxed)
        }),
        ("upstream_leaks_total", "Checkouts held past upstream.leak_detection_ms.", |p| {
            p.leaks.load(Ordering::Relaxed)
        }),
        ("upstream_connections_created_total", "Connections opened.", |p| p.created.load(Ordering::Relaxed)),
    ];
    for (name, help, f) in counters {
        t.family(name, Kind::Counter, help);
        for p in pools {
            t.sample(name, &[("upstream", &p.name)], f(p));
        }
    }
    t.family("upstream_connections_closed_total", Kind::Counter, "Connections closed by the pool, by reason.");
    for p in pools {
        for c in Closed::ALL {
            t.sample("upstream_connections_closed_total", &[("upstream", &p.name), ("reason", &c.name())], p.closed(c));
        }
    }
    for (name, help, pick) in [
        ("upstream_acquire_seconds", "Time a call waited for a connection.", 0),
        ("upstream_request_seconds", "Time from a call's start to its answer.", 1),
    ] {
        t.family(name, Kind::Histogram, help);
        for p in pools {
            let h = if pick == 0 { &p.acquire_us } else { &p.request_us };
            if let Ok(h) = h.lock() {
                t.histogram(name, &[("upstream", &p.name)], &h, 1e-6, &BUCKETS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_follow_the_seed_thresholds() {
        let p = PoolStats::new("a", "http://x:1", 1, 10);
        let t0 = Instant::now();
        p.tick(t0);
        assert!(p.alerts().is_empty());
        p.active.store(10, Ordering::Relaxed);
        for _ in 0..94 {
            p.record(Outcome::Ok);
        }
        for _ in 0..6 {
            p.record(Outcome::Timeout);
        }
        let kinds: Vec<String> = p.alerts().iter().map(|a| a["type"].as_str().unwrap().to_string()).collect();
        assert_eq!(kinds, ["high_utilization", "high_failure_rate"]);
        p.set_breaker(State::Open);
        assert_eq!(p.alerts().len(), 3);
        assert_eq!(p.json()["breaker"], "open");
        assert_eq!(p.json()["requests"]["timeout"], 6);
        // The window moves on: old failures stop counting.
        p.tick(t0 + Duration::from_secs(30));
        p.tick(t0 + Duration::from_secs(91));
        p.tick(t0 + Duration::from_secs(92));
        assert_eq!(p.failure_rate(), 0.0);
    }
}
