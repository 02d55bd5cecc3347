//! Counters, gauges and HDR histograms, rendered as Prometheus text.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; `/metrics`
//! (served by whichever shard the scrape lands on) only reads. Counters are
//! single-writer atomics bumped with a plain load+store (no locked RMW on the
//! hot path). The HDR histograms sit behind a mutex that only the owner and
//! the scraper ever take: uncontended, and off the delivery path (it is taken
//! once per handshake and once per closed connection).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::error::{close, ClientError, Rejection};

/// A counter with one writer thread and any number of readers.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The io driver a shard ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DriverKind {
    /// Not started yet.
    Unknown = 0,
    /// io_uring.
    IoUring = 1,
    /// epoll (fallback or chosen).
    Epoll = 2,
}

impl DriverKind {
    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Unknown => "unknown",
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// Handshake latency histogram bounds: 1 µs .. 60 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

/// One shard's metrics.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Sockets accepted by this shard's listener.
    pub accepted: Counter,
    /// Sockets this shard passed to another because it was full.
    pub handed_off: Counter,
    /// Sockets this shard took from another.
    pub adopted: Counter,
    /// Successful upgrades.
    pub upgraded: Counter,
    /// Refusals by [`Rejection`].
    pub rejected: [Counter; Rejection::ALL.len()],
    /// Closes by code: [`close::ALL`], then `none` (no close frame), then
    /// `other` (a client code not in the list).
    pub closed: [Counter; close::ALL.len() + 2],
    /// `/ws` errors answered, by [`ClientError`].
    pub client_errors: [Counter; ClientError::ALL.len()],
    /// WebSocket data messages received.
    pub messages_in: Counter,
    /// Bytes read from sockets.
    pub bytes_in: Counter,
    /// Messages queued to connections.
    pub messages_out: Counter,
    /// Bytes written to sockets.
    pub bytes_out: Counter,
    /// Messages sent to other shards' mailboxes.
    pub cross_shard_sent: Counter,
    /// Messages received from the mailbox.
    pub cross_shard_received: Counter,
    /// Messages lost because a mailbox was full.
    pub mailbox_full: Counter,
    /// Messages dropped by the `drop` slow-consumer policy.
    pub send_queue_dropped: Counter,
    /// Connections closed by the `close` slow-consumer policy.
    pub slow_consumer_closed: Counter,
    /// Server pings sent.
    pub pings_sent: Counter,
    /// Slotted connections (the shard's load, read for least-loaded selection).
    pub connections: AtomicUsize,
    /// Upgraded connections right now.
    pub websockets: AtomicUsize,
    /// Overflow sockets (held only to answer HTTP).
    pub overflow: AtomicUsize,
    /// Connections holding a tungstenite frame reader (and its read buffer),
    /// as of the last sweep.
    pub frame_readers: AtomicUsize,
    /// Slots configured for this shard.
    pub capacity: AtomicUsize,
    /// The io driver in use.
    pub driver: AtomicU8,
    /// Accept → 101 written, µs.
    pub handshake_us: Mutex<Histogram<u64>>,
    /// Accept → close of upgraded connections, ms.
    pub lifetime_ms: Mutex<Histogram<u64>>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            accepted: Counter::default(),
            handed_off: Counter::default(),
            adopted: Counter::default(),
            upgraded: Counter::default(),
            rejected: Default::default(),
            closed: Default::default(),
            client_errors: Default::default(),
            messages_in: Counter::default(),
            bytes_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_out: Counter::default(),
            cross_shard_sent: Counter::default(),
            cross_shard_received: Counter::default(),
            mailbox_full: Counter::default(),
            send_queue_dropped: Counter::default(),
            slow_consumer_closed: Counter::default(),
            pings_sent: Counter::default(),
            connections: AtomicUsize::new(0),
            websockets: AtomicUsize::new(0),
            overflow: AtomicUsize::new(0),
            frame_readers: AtomicUsize::new(0),
            capacity: AtomicUsize::new(0),
            driver: AtomicU8::new(0),
            handshake_us: Mutex::new(new_histogram()),
            lifetime_ms: Mutex::new(Histogram::new_with_bounds(1, 30 * 24 * 3_600_000, 2).expect("static bounds")),
        }
    }
}

impl ShardMetrics {
    /// Counts a close with `code` (0 = no close frame).
    pub fn record_close(&self, code: u16) {
        let i = match code {
            0 => close::ALL.len(),
            c => close::ALL.iter().position(|k| *k == c).unwrap_or(close::ALL.len() + 1),
        };
        self.closed[i].inc();
    }

    /// Records one handshake latency.
    pub fn record_handshake(&self, micros: u64) {
        if let Ok(mut h) = self.handshake_us.lock() {
            h.saturating_record(micros.max(1));
        }
    }

    /// Records one connection lifetime.
    pub fn record_lifetime(&self, millis: u64) {
        if let Ok(mut h) = self.lifetime_ms.lock() {
            h.saturating_record(millis.max(1));
        }
    }

    /// The driver in use.
    pub fn driver(&self) -> DriverKind {
        match self.driver.load(Ordering::Relaxed) {
            1 => DriverKind::IoUring,
            2 => DriverKind::Epoll,
            _ => DriverKind::Unknown,
        }
    }
}

/// Bucket bounds (seconds) for connection latency, from seed 000, with
/// finer steps under 1 ms where this node lives.
const LATENCY_BUCKETS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Bucket bounds (seconds) for connection duration, from seed 000.
const DURATION_BUCKETS: [f64; 11] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0];

/// What the renderer needs from the node besides shard metrics.
pub struct NodeView<'a> {
    /// Node id label.
    pub node_id: &'a str,
    /// Per-shard metrics, index = shard.
    pub shards: Vec<&'a ShardMetrics>,
    /// Per-shard mailbox depth.
    pub mailbox_depth: Vec<usize>,
    /// The node is draining.
    pub draining: bool,
    /// Extra lines (cluster state), already in Prometheus text.
    pub extra: String,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP ringside_{name} {help}\n# TYPE ringside_{name} {kind}");
}

fn per_shard(out: &mut String, v: &NodeView, name: &str, kind: &str, help: &str, f: impl Fn(&ShardMetrics) -> u64) {
    header(out, name, kind, help);
    for (i, m) in v.shards.iter().enumerate() {
        let _ = writeln!(out, "ringside_{name}{{shard=\"{i}\"}} {}", f(m));
    }
}

fn histogram(out: &mut String, name: &str, help: &str, shard: usize, h: &Histogram<u64>, unit: f64, buckets: &[f64]) {
    let _ = help;
    for b in buckets {
        let bound = (b / unit) as u64;
        let n = if h.is_empty() { 0 } else { h.count_between(0, bound) };
        let _ = writeln!(out, "ringside_{name}_bucket{{shard=\"{shard}\",le=\"{b}\"}} {n}");
    }
    let _ = writeln!(out, "ringside_{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {}", h.len());
    let sum = h.mean() * h.len() as f64 * unit;
    let _ = writeln!(out, "ringside_{name}_sum{{shard=\"{shard}\"}} {sum}");
    let _ = writeln!(out, "ringside_{name}_count{{shard=\"{shard}\"}} {}", h.len());
}

/// Renders every metric of the node in Prometheus text format 0.0.4.
pub fn render(v: &NodeView) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let load = |m: &ShardMetrics| m.connections.load(Ordering::Relaxed) as u64;
    per_shard(
        &mut out,
        v,
        "websocket_pool_connections_total",
        "gauge",
        "Connections holding a slot, per shard (pool).",
        load,
    );
    header(&mut out, "websocket_pool_utilization_ratio", "gauge", "Slots in use / slots, per shard.");
    for (i, m) in v.shards.iter().enumerate() {
        let cap = m.capacity.load(Ordering::Relaxed).max(1) as f64;
        let _ = writeln!(out, "ringside_websocket_pool_utilization_ratio{{shard=\"{i}\"}} {}", load(m) as f64 / cap);
    }
    per_shard(&mut out, v, "websocket_pool_capacity", "gauge", "Slots per shard.", |m| {
        m.capacity.load(Ordering::Relaxed) as u64
    });
    per_shard(&mut out, v, "websockets_open", "gauge", "Upgraded WebSocket connections.", |m| {
        m.websockets.load(Ordering::Relaxed) as u64
    });
    per_shard(&mut out, v, "overflow_sockets", "gauge", "Sockets held past capacity only to answer HTTP.", |m| {
        m.overflow.load(Ordering::Relaxed) as u64
    });
    per_shard(
        &mut out,
        v,
        "frame_readers",
        "gauge",
        "Connections holding a frame reader and its read buffer (last sweep); quiet ones give theirs back.",
        |m| m.frame_readers.load(Ordering::Relaxed) as u64,
    );
    header(&mut out, "shard_driver_info", "gauge", "The io driver each shard runs (1 = in use).");
    for (i, m) in v.shards.iter().enumerate() {
        let _ = writeln!(out, "ringside_shard_driver_info{{shard=\"{i}\",driver=\"{}\"}} 1", m.driver().name());
    }
    per_shard(&mut out, v, "connections_accepted_total", "counter", "Sockets accepted.", |m| m.accepted.get());
    per_shard(&mut out, v, "connections_upgraded_total", "counter", "Successful WebSocket upgrades.", |m| {
        m.upgraded.get()
    });
    header(
        &mut out,
        "websocket_pool_failover_total",
        "counter",
        "Sockets passed from a full shard to the least-loaded one.",
    );
    for (i, m) in v.shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringside_websocket_pool_failover_total{{from_pool=\"{i}\",reason=\"full\"}} {}",
            m.handed_off.get()
        );
    }
    header(
        &mut out,
        "connections_rejected_total",
        "counter",
        "Requests refused, by reason (status in docs/protocol.md).",
    );
    for r in Rejection::ALL {
        let n: u64 = v.shards.iter().map(|m| m.rejected[r.index()].get()).sum();
        let _ = writeln!(
            out,
            "ringside_connections_rejected_total{{reason=\"{}\",status=\"{}\"}} {n}",
            r.label(),
            r.status()
        );
    }
    header(
        &mut out,
        "connections_closed_total",
        "counter",
        "WebSocket closes by the close code that ended them (none = no close frame, other = a client code not listed).",
    );
    let labels = close::ALL.iter().map(|c| c.to_string()).chain(["none".to_string(), "other".to_string()]);
    for (i, code) in labels.enumerate() {
        let n: u64 = v.shards.iter().map(|m| m.closed[i].get()).sum();
        let _ = writeln!(out, "ringside_connections_closed_total{{code=\"{code}\"}} {n}");
    }
    header(&mut out, "client_errors_total", "counter", "Errors answered on /ws, by code; the connection stays open.");
    for e in ClientError::ALL {
        let n: u64 = v.shards.iter().map(|m| m.client_errors[e.index()].get()).sum();
        let _ = writeln!(out, "ringside_client_errors_total{{code=\"{}\"}} {n}", e.code());
    }
    per_shard(&mut out, v, "messages_received_total", "counter", "WebSocket data messages received.", |m| {
        m.messages_in.get()
    });
    per_shard(&mut out, v, "messages_sent_total", "counter", "Messages queued to connections.", |m| {
        m.messages_out.get()
    });
    per_shard(&mut out, v, "bytes_received_total", "counter", "Bytes read from sockets.", |m| m.bytes_in.get());
    per_shard(&mut out, v, "bytes_sent_total", "counter", "Bytes written to sockets.", |m| m.bytes_out.get());
    per_shard(&mut out, v, "cross_shard_sent_total", "counter", "Messages sent to other shards.", |m| {
        m.cross_shard_sent.get()
    });
    per_shard(&mut out, v, "connections_adopted_total", "counter", "Sockets taken over from a full shard.", |m| {
        m.adopted.get()
    });
    per_shard(&mut out, v, "cross_shard_received_total", "counter", "Messages taken from this shard's mailbox.", |m| {
        m.cross_shard_received.get()
    });
    per_shard(
        &mut out,
        v,
        "mailbox_full_total",
        "counter",
        "Cross-shard messages this shard could not deliver (the target mailbox was full).",
        |m| m.mailbox_full.get(),
    );
    header(&mut out, "mailbox_depth", "gauge", "Messages waiting in each shard's mailbox.");
    for (i, d) in v.mailbox_depth.iter().enumerate() {
        let _ = writeln!(out, "ringside_mailbox_depth{{shard=\"{i}\"}} {d}");
    }
    per_shard(
        &mut out,
        v,
        "send_queue_dropped_total",
        "counter",
        "Messages dropped for slow readers (policy drop).",
        |m| m.send_queue_dropped.get(),
    );
    per_shard(
        &mut out,
        v,
        "slow_consumer_closed_total",
        "counter",
        "Connections closed 1008 for slow reading (policy close).",
        |m| m.slow_consumer_closed.get(),
    );
    per_shard(&mut out, v, "pings_sent_total", "counter", "Server pings sent to quiet clients.", |m| {
        m.pings_sent.get()
    });
    header(&mut out, "websocket_connection_latency_seconds", "histogram", "Accept to 101 written.");
    for (i, m) in v.shards.iter().enumerate() {
        if let Ok(h) = m.handshake_us.lock() {
            histogram(&mut out, "websocket_connection_latency_seconds", "", i, &h, 1e-6, &LATENCY_BUCKETS);
        }
    }
    header(&mut out, "websocket_connection_duration_seconds", "histogram", "Accept to close, of upgraded connections.");
    for (i, m) in v.shards.iter().enumerate() {
        if let Ok(h) = m.lifetime_ms.lock() {
            histogram(&mut out, "websocket_connection_duration_seconds", "", i, &h, 1e-3, &DURATION_BUCKETS);
        }
    }
    header(&mut out, "draining", "gauge", "1 while the node drains for shutdown.");
    let _ = writeln!(out, "ringside_draining {}", v.draining as u8);
    header(&mut out, "node_info", "gauge", "Node identity and version.");
    let _ = writeln!(out, "ringside_node_info{{node=\"{}\",version=\"{}\"}} 1", v.node_id, env!("CARGO_PKG_VERSION"));
    out.push_str(&v.extra);
    out
}

/// The handshake p99 across shards, µs (for `/cluster` and the Redis registry).
pub fn handshake_p99_us(shards: &[&ShardMetrics]) -> u64 {
    let mut all = new_histogram();
    for m in shards {
        if let Ok(h) = m.handshake_us.lock() {
            let _ = all.add(&*h);
        }
    }
    if all.is_empty() {
        0
    } else {
        all.value_at_quantile(0.99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histogram_buckets_cumulatively() {
        let m = ShardMetrics::default();
        m.record_handshake(300);
        m.record_handshake(3_000);
        m.record_handshake(30_000);
        m.record_close(close::GOING_AWAY);
        m.record_close(4242);
        m.rejected[Rejection::Full.index()].inc();
        let text = render(&NodeView {
            node_id: "n1",
            shards: vec![&m],
            mailbox_depth: vec![0],
            draining: false,
            extra: String::new(),
        });
        assert!(
            text.contains("ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"0.005\"} 2"));
        assert!(text.contains("ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"+Inf\"} 3"));
        assert!(text.contains("ringside_websocket_connection_latency_seconds_count{shard=\"0\"} 3"));
        assert!(text.contains("ringside_connections_closed_total{code=\"1001\"} 1"));
        assert!(text.contains("ringside_connections_closed_total{code=\"other\"} 1"));
        assert!(text.contains("ringside_connections_rejected_total{reason=\"full\",status=\"503\"} 1"));
        assert!((handshake_p99_us(&[&m]) as i64 - 30_000).abs() < 100);
    }

    #[test]
    fn counter_adds() {
        let c = Counter::default();
        c.inc();
        c.add(4);
        assert_eq!(c.get(), 5);
    }
}
