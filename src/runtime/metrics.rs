//! The runtime's counters, gauges and HDR histograms, per shard, and their
//! Prometheus families.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; `/metrics`
//! (served by whichever shard the scrape lands on) only reads. Counters are
//! single-writer atomics bumped with a plain load+store (no locked RMW on the
//! hot path). The HDR histograms sit behind a mutex that only the owner and
//! the scraper ever take: uncontended, and off the delivery path (it is taken
//! once per handshake and once per closed connection).

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::prom::{Kind, Text};
use crate::transport::close;
use crate::transport::http::Rejection;

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

    /// Sets the value (a total kept elsewhere). Only the owning shard calls this.
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
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
/// An empty latency histogram (µs, 1 µs to 60 s, 3 significant digits), as the shards keep.
pub fn new_histogram() -> Histogram<u64> {
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
    /// Upgrade: connections handed to the new process.
    pub handed_over: Counter,
    /// Upgrade: connections taken over from the old process.
    pub resumed: Counter,
    /// Idle direct-path readers that ended (their connection waits without a task).
    pub readers_retired: Counter,
    /// Readers started again for retired connections.
    pub readers_restarted: Counter,
    /// Drain: open WebSockets that got a reconnect hint.
    pub drain_hinted: Counter,
    /// Drain: WebSockets still open at its end, closed with 1001.
    pub drain_closed: Counter,
    /// Connections closed 1013 because the shard's unfinished-bytes budget was spent.
    pub unfinished_closed: Counter,
    /// Connections closed 1008 because a frame or message did not complete in time.
    pub message_timeouts: Counter,
    /// Times a connection's reading was paused because its output was over the cap.
    pub read_paused: Counter,
    /// permessage-deflate: the shard codec's totals, as of the last sweep.
    pub deflate: [Counter; 5],
    /// Receives that found the shard's provided-buffer ring empty (direct
    /// path; re-armed once buffers came back), as of the last sweep.
    pub recv_buffers_exhausted: Counter,
    /// The shard serves the direct socket path (1) or the poll path (0).
    pub direct_io: AtomicU8,
    /// Bytes held in unfinished frames and fragmented messages (gauge).
    pub unfinished_bytes: AtomicUsize,
    /// Bytes queued for sending, all connections (gauge, as of the last sweep).
    pub queued_bytes: AtomicUsize,
    /// Connections preempted, by their class.
    pub preempted: [Counter; 4],
    /// Upgrades refused 503 after waiting (or with the queue full), by class.
    pub class_refused: [Counter; 4],
    /// Upgrades waiting for a slot now.
    pub waiting: AtomicUsize,
    /// Time upgrades waited for a slot, µs, by class.
    pub waits_us: [Mutex<Histogram<u64>>; 4],
    /// Slotted connections (the shard's load, read for least-loaded selection).
    pub connections: AtomicUsize,
    /// Upgraded connections right now.
    pub websockets: AtomicUsize,
    /// Sockets that have not finished their upgrade (handshake slots in use).
    pub handshakes: AtomicUsize,
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
            handed_over: Counter::default(),
            resumed: Counter::default(),
            readers_retired: Counter::default(),
            readers_restarted: Counter::default(),
            drain_hinted: Counter::default(),
            drain_closed: Counter::default(),
            unfinished_closed: Counter::default(),
            message_timeouts: Counter::default(),
            read_paused: Counter::default(),
            deflate: Default::default(),
            recv_buffers_exhausted: Counter::default(),
            direct_io: AtomicU8::new(0),
            unfinished_bytes: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            preempted: Default::default(),
            class_refused: Default::default(),
            waiting: AtomicUsize::new(0),
            waits_us: std::array::from_fn(|_| Mutex::new(new_histogram())),
            connections: AtomicUsize::new(0),
            websockets: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
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

    /// Records how long an upgrade of `class` waited for its slot.
    pub fn record_wait(&self, class: crate::config::Class, micros: u64) {
        if let Ok(mut h) = self.waits_us[class.index()].lock() {
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

fn per_shard(
    t: &mut Text,
    shards: &[&ShardMetrics],
    name: &str,
    kind: Kind,
    help: &str,
    f: impl Fn(&ShardMetrics) -> u64,
) {
    t.family(name, kind, help);
    for (i, m) in shards.iter().enumerate() {
        t.sample(name, &[("shard", &i)], f(m));
    }
}

fn summed<const N: usize>(shards: &[&ShardMetrics], f: impl Fn(&ShardMetrics) -> &[Counter; N], i: usize) -> u64 {
    shards.iter().map(|m| f(m)[i].get()).sum()
}

/// Renders the runtime's metrics of every shard; `mailbox_depth[i]` is
/// shard `i`'s waiting messages and bytes of data messages.
pub fn render(t: &mut Text, shards: &[&ShardMetrics], mailbox_depth: &[(usize, usize)]) {
    use Kind::{Counter as C, Gauge as G};
    let load = |m: &ShardMetrics| m.connections.load(Ordering::Relaxed) as u64;
    let help = "Connections holding a slot, per shard (pool).";
    per_shard(t, shards, "websocket_pool_connections_total", G, help, load);
    t.family("websocket_pool_utilization_ratio", G, "Slots in use / slots, per shard.");
    for (i, m) in shards.iter().enumerate() {
        let cap = m.capacity.load(Ordering::Relaxed).max(1) as f64;
        t.sample("websocket_pool_utilization_ratio", &[("shard", &i)], load(m) as f64 / cap);
    }
    let gauge = |a: &AtomicUsize| a.load(Ordering::Relaxed) as u64;
    per_shard(t, shards, "websocket_pool_capacity", G, "Slots per shard.", |m| gauge(&m.capacity));
    per_shard(t, shards, "websockets_open", G, "Upgraded WebSocket connections.", |m| gauge(&m.websockets));
    let help = "Sockets that have not finished their upgrade (handshake slots in use, apart from WebSocket slots).";
    per_shard(t, shards, "handshakes_pending", G, help, |m| gauge(&m.handshakes));
    let help = "Connections holding a frame reader and its read buffer (last sweep); quiet ones give theirs back.";
    per_shard(t, shards, "frame_readers", G, help, |m| gauge(&m.frame_readers));
    t.family("shard_driver_info", G, "The io driver each shard runs (1 = in use).");
    for (i, m) in shards.iter().enumerate() {
        t.sample("shard_driver_info", &[("shard", &i), ("driver", &m.driver().name())], 1);
    }
    per_shard(t, shards, "connections_accepted_total", C, "Sockets accepted.", |m| m.accepted.get());
    per_shard(t, shards, "connections_upgraded_total", C, "Successful WebSocket upgrades.", |m| m.upgraded.get());
    let help = "Sockets passed from a full shard to the least-loaded one.";
    t.family("websocket_pool_failover_total", C, help);
    for (i, m) in shards.iter().enumerate() {
        t.sample("websocket_pool_failover_total", &[("from_pool", &i), ("reason", &"full")], m.handed_off.get());
    }
    let help = "Requests refused, by reason (status in docs/protocol.md).";
    t.family("connections_rejected_total", C, help);
    for r in Rejection::ALL {
        let n = summed(shards, |m| &m.rejected, r.index());
        t.sample("connections_rejected_total", &[("reason", &r.label()), ("status", &r.status())], n);
    }
    let help =
        "WebSocket closes by the close code that ended them (none = no close frame, other = a client code not listed).";
    t.family("connections_closed_total", C, help);
    let labels = close::ALL.iter().map(|c| c.to_string()).chain(["none".to_string(), "other".to_string()]);
    for (i, code) in labels.enumerate() {
        t.sample("connections_closed_total", &[("code", &code)], summed(shards, |m| &m.closed, i));
    }
    let help = "WebSocket data messages received.";
    per_shard(t, shards, "messages_received_total", C, help, |m| m.messages_in.get());
    per_shard(t, shards, "messages_sent_total", C, "Messages queued to connections.", |m| m.messages_out.get());
    per_shard(t, shards, "bytes_received_total", C, "Bytes read from sockets.", |m| m.bytes_in.get());
    per_shard(t, shards, "bytes_sent_total", C, "Bytes written to sockets.", |m| m.bytes_out.get());
    let help = "Messages sent to other shards.";
    per_shard(t, shards, "cross_shard_sent_total", C, help, |m| m.cross_shard_sent.get());
    let help = "Sockets taken over from a full shard.";
    per_shard(t, shards, "connections_adopted_total", C, help, |m| m.adopted.get());
    let help = "Messages taken from this shard's mailbox.";
    per_shard(t, shards, "cross_shard_received_total", C, help, |m| m.cross_shard_received.get());
    let help = "Cross-shard messages this shard could not deliver (the target mailbox was full).";
    per_shard(t, shards, "mailbox_full_total", C, help, |m| m.mailbox_full.get());
    let help = "Bytes of data messages (room and direct frames) waiting in each shard's mailbox.";
    for (name, help, pick) in
        [("mailbox_depth", "Messages waiting in each shard's mailbox.", 0), ("mailbox_bytes", help, 1)]
    {
        t.family(name, G, help);
        for (i, (d, b)) in mailbox_depth.iter().enumerate() {
            t.sample(name, &[("shard", &i)], if pick == 0 { d } else { b });
        }
    }
    let help = "Messages dropped for slow readers (policy drop).";
    per_shard(t, shards, "send_queue_dropped_total", C, help, |m| m.send_queue_dropped.get());
    let help = "Connections closed 1008 for slow reading (policy close).";
    per_shard(t, shards, "slow_consumer_closed_total", C, help, |m| m.slow_consumer_closed.get());
    per_shard(t, shards, "pings_sent_total", C, "Server pings sent to quiet clients.", |m| m.pings_sent.get());
    per_shard(t, shards, "upgrade_handed_over_total", C, "Upgrade: connections handed to the new process.", |m| {
        m.handed_over.get()
    });
    per_shard(t, shards, "upgrade_resumed_total", C, "Upgrade: connections taken over from the old process.", |m| {
        m.resumed.get()
    });
    let help = "Idle direct-path readers retired: their connection waits with no task.";
    per_shard(t, shards, "readers_retired_total", C, help, |m| m.readers_retired.get());
    let help = "Readers started again for retired connections (data, EOF or a close arrived).";
    per_shard(t, shards, "readers_restarted_total", C, help, |m| m.readers_restarted.get());
    per_shard(t, shards, "drain_hinted_total", C, "Drain: open WebSockets sent a reconnect hint.", |m| {
        m.drain_hinted.get()
    });
    per_shard(t, shards, "drain_closed_total", C, "Drain: WebSockets still open at its end, closed with 1001.", |m| {
        m.drain_closed.get()
    });
    let help = "Connections closed 1013: the shard's budget for unfinished frames and messages was spent.";
    per_shard(t, shards, "unfinished_budget_closed_total", C, help, |m| m.unfinished_closed.get());
    let help = "Connections closed 1008: a frame or message did not complete within websocket.message_timeout_ms.";
    per_shard(t, shards, "message_timeouts_total", C, help, |m| m.message_timeouts.get());
    let help = "Times reading a connection was paused on its own output: over websocket.send_queue_bytes, an inline write that waited 100 ms or more, or (policy drop) a write stuck past websocket.write_timeout_ms.";
    per_shard(t, shards, "read_paused_total", C, help, |m| m.read_paused.get());
    for (i, (name, help)) in [
        ("deflate_inflated_total", "permessage-deflate: compressed messages received and inflated."),
        ("deflate_compressed_total", "permessage-deflate: messages sent compressed (fan-out copies included)."),
        ("deflate_reused_total", "permessage-deflate: compressed messages copied from the shard's last output (room fan-out) instead of compressed again."),
        ("deflate_plain_bytes_total", "permessage-deflate: payload bytes of the messages sent compressed, before compression."),
        ("deflate_wire_bytes_total", "permessage-deflate: payload bytes of the messages sent compressed, after compression."),
    ]
    .into_iter()
    .enumerate()
    {
        per_shard(t, shards, name, C, help, |m| m.deflate[i].get());
    }
    let help = "Receives (direct path) that found the shard's receive-buffer ring empty and were re-armed once buffers came back (as of the last sweep).";
    per_shard(t, shards, "recv_buffers_exhausted_total", C, help, |m| m.recv_buffers_exhausted.get());
    t.family("shard_socket_path_info", G, "The socket path each shard serves (server.io; 1 = in use).");
    for (i, m) in shards.iter().enumerate() {
        let path = if m.direct_io.load(Ordering::Relaxed) == 1 { "direct" } else { "poll" };
        t.sample("shard_socket_path_info", &[("shard", &i), ("path", &path)], 1);
    }
    let help = "Bytes held in unfinished frames and fragmented messages (as of the last sweep).";
    per_shard(t, shards, "unfinished_bytes", G, help, |m| gauge(&m.unfinished_bytes));
    let help = "Bytes queued for sending on all connections, including writes in flight (as of the last sweep).";
    per_shard(t, shards, "send_queue_bytes", G, help, |m| gauge(&m.queued_bytes));
    let name = "websocket_connection_latency_seconds";
    t.family(name, Kind::Histogram, "Accept to 101 written.");
    for (i, m) in shards.iter().enumerate() {
        if let Ok(h) = m.handshake_us.lock() {
            t.histogram(name, &[("shard", &i)], &h, 1e-6, &LATENCY_BUCKETS);
        }
    }
    let name = "websocket_connection_duration_seconds";
    t.family(name, Kind::Histogram, "Accept to close, of upgraded connections.");
    for (i, m) in shards.iter().enumerate() {
        if let Ok(h) = m.lifetime_ms.lock() {
            t.histogram(name, &[("shard", &i)], &h, 1e-3, &DURATION_BUCKETS);
        }
    }
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
        let mut t = Text::default();
        render(&mut t, &[&m], &[(0, 0)]);
        let text = t.finish();
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
