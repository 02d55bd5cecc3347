//! Attacks on the node over real sockets, each asserting its bound:
//!
//! 1. a ping flood from a client that never reads (its pongs must not pile
//!    up: policy `close` closes it, policy `drop` stops reading it);
//! 2. an empty-pong flood on a shard must not starve its neighbour nor the
//!    sweeper;
//! 3. frames announced large but never finished cost what arrived, not what
//!    was announced; they time out (1008) and share a shard budget (1013);
//! 4. a slow-loris of half-sent upgrade requests is dropped at the
//!    handshake timeout while real clients still get in.
//!
//! Timings are generous: the machine running these may be small and busy.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tokio_tungstenite::tungstenite::Message;

const MIB: u64 = 1 << 20;

/// Held for writing by the floods and the slow loris, which each keep a
/// core busy and assert times: they run one at a time, and not while a
/// lighter test (held for reading) runs, so that what one measures is not
/// another's load on this 2-core machine.
static FLOOD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
const UPGRADE_HEAD: &[u8] = b"Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// The node's RSS once start-up is over (a sweep run, /metrics served).
fn settled_rss(node: &NodeProc) -> u64 {
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..4 {
        node.get("/metrics");
    }
    rss_bytes(node.child.id())
}

/// A TCP socket from `source` (port 0) to `addr`, its receive buffer set to
/// `rcvbuf` bytes before connecting when given (so the window stays small).
fn tcp_from(source: Ipv4Addr, addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.bind(&SocketAddr::new(IpAddr::V4(source), 0).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

/// Upgrades `s` to a WebSocket on `path`; only the response head is
/// consumed (it is found with `peek` first).
fn upgrade(mut s: TcpStream, path: &str) -> TcpStream {
    s.write_all(&[format!("GET {path} HTTP/1.1\r\n").as_bytes(), UPGRADE_HEAD].concat()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 1024];
    let len = loop {
        let n = s.peek(&mut head).unwrap();
        assert!(n > 0, "closed during the upgrade");
        match head[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => break at + 4,
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    s.read_exact(&mut head[..len]).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head[..len]));
    s
}

/// The first `sent` payload bytes of a masked binary frame announcing `announced`.
fn partial_frame(announced: usize, sent: usize) -> Vec<u8> {
    let mut f = client_frame(0x2, true, &vec![0xab; announced], true);
    f.truncate(f.len() - announced + sent);
    f
}

/// What a look at a socket's input (without waiting or consuming) shows.
#[derive(Debug, PartialEq)]
enum Input {
    /// Open, nothing to read.
    Nothing,
    /// Bytes wait to be read.
    Data,
    /// EOF or an error: the peer closed it.
    Closed,
}

fn look(s: &TcpStream) -> Input {
    s.set_nonblocking(true).unwrap();
    let got = match s.peek(&mut [0u8; 1]) {
        Ok(0) => Input::Closed,
        Ok(_) => Input::Data,
        Err(e) if e.kind() == ErrorKind::WouldBlock => Input::Nothing,
        Err(_) => Input::Closed,
    };
    s.set_nonblocking(false).unwrap();
    got
}

/// Reads one server close frame (unmasked: 0x88, length, code, reason)
/// and returns its code.
fn read_close_frame(s: &mut TcpStream) -> u16 {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("no close frame");
    assert_eq!(h[0], 0x88, "expected a close frame, got {h:02x?}");
    let mut body = vec![0u8; (h[1] & 0x7f) as usize];
    s.read_exact(&mut body).unwrap();
    assert!(body.len() >= 2, "close frame without a code");
    u16::from_be_bytes([body[0], body[1]])
}

/// Reads (and discards) until EOF or an error; false if `within` passed first.
fn reaches_eof(s: &mut TcpStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < end {
        s.set_read_timeout(Some(end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Writes `pattern` (whole frames) over and over while `go()` says so and
/// the connection holds, never splitting a frame across a retry. Returns the
/// bytes written and whether the connection broke.
fn flood(s: &mut TcpStream, pattern: &[u8], mut go: impl FnMut() -> bool) -> (u64, bool) {
    s.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
    let (mut pos, mut total) = (0, 0u64);
    while go() {
        match s.write(&pattern[pos..]) {
            Ok(0) => return (total, true),
            Ok(n) => {
                total += n as u64;
                pos = (pos + n) % pattern.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return (total, true),
        }
    }
    (total, false)
}

/// What a ping flood left behind.
struct PingFlood {
    node: NodeProc,
    sock: TcpStream,
    rss_growth: u64,
    broke: bool,
}

/// Attack 1: a client with a tiny receive window upgrades to /echo, sends
/// ~100 KB of echo it never reads, then streams 125-byte pings for 5 s.
fn ping_flood(extra: &[&str]) -> PingFlood {
    let _one_at_a_time = FLOOD.blocking_write();
    // A write the peer never takes applies the slow-consumer policy after
    // websocket.write_timeout_ms (short here; 10 s by default).
    let node = NodeProc::start(&[&["--shards", "1", "--set", "websocket.write_timeout_ms=1500"], extra].concat());
    let pid = node.child.id();
    let rss0 = settled_rss(&node);
    let mut sock = upgrade(tcp_from(Ipv4Addr::LOCALHOST, node.addr, Some(4096)), "/echo");
    for _ in 0..10 {
        sock.write_all(&client_frame(0x2, true, &[7u8; 10_000], true)).unwrap();
    }
    // The pings start once the echo is out of the node's hands (in kernel
    // buffers): the pongs alone must then be bounded.
    sum_reaching(&node, "ringside_bytes_sent_total", 100_000.0);
    let pings = client_frame(0x9, true, &[b'p'; 125], true).repeat(64);
    let mut peak = rss0;
    let mut last_sample = Instant::now();
    let until = Instant::now() + Duration::from_secs(5);
    let (sent, broke) = flood(&mut sock, &pings, || {
        if last_sample.elapsed() > Duration::from_millis(50) {
            peak = peak.max(rss_bytes(pid));
            last_sample = Instant::now();
        }
        Instant::now() < until
    });
    peak = peak.max(rss_bytes(pid));
    assert!(sent > 1_000_000 || broke, "the flood hardly started: {sent} bytes");
    PingFlood { node, sock, rss_growth: peak - rss0, broke }
}

/// `ringside_send_queue_bytes` over shards, once a sweep has run since the flood.
fn settled_send_queue(node: &NodeProc) -> f64 {
    std::thread::sleep(Duration::from_millis(1500));
    node.metric_sum("ringside_send_queue_bytes")
}

const SEND_QUEUE_DEFAULT: f64 = 256.0 * 1024.0;

#[test]
fn ping_flood_without_reading_is_closed_and_memory_stays_bounded() {
    let PingFlood { node, mut sock, rss_growth, broke } = ping_flood(&[]);
    assert!(rss_growth < 64 * MIB, "node RSS grew by {} MiB during the flood", rss_growth / MIB);
    assert!(
        node.eventually_metric("ringside_slow_consumer_closed_total{shard=\"0\"}", 1.0),
        "the flooder was not closed as a slow consumer (flood broke: {broke})"
    );
    assert!(reaches_eof(&mut sock, Duration::from_secs(15)), "the flooder's socket was never closed");
    let queued = settled_send_queue(&node);
    assert!(queued <= SEND_QUEUE_DEFAULT + 128.0 * 1024.0, "send queues hold {queued} bytes");
}

#[test]
fn ping_flood_without_reading_under_drop_policy_pauses_reading() {
    let PingFlood { node, sock, rss_growth, broke } = ping_flood(&["--set", "websocket.slow_consumer=drop"]);
    assert!(rss_growth < 64 * MIB, "node RSS grew by {} MiB during the flood", rss_growth / MIB);
    assert!(!broke, "policy drop must keep the connection");
    assert_ne!(look(&sock), Input::Closed, "policy drop must keep the connection");
    assert!(node.metric_sum("ringside_read_paused_total") > 0.0, "reading the flooder was never paused");
    assert_eq!(node.metric_sum("ringside_slow_consumer_closed_total"), 0.0);
    assert_eq!(node.metric_sum("ringside_websockets_open"), 1.0);
    let queued = settled_send_queue(&node);
    assert!(queued <= SEND_QUEUE_DEFAULT + 128.0 * 1024.0, "send queues hold {queued} bytes");
}

/// The p50 and max of `samples`.
fn p50_max(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pong_flood_starves_neither_neighbour_nor_sweeper() {
    empty_pong_flood(&[]).await;
}

/// The same on the epoll driver: the fair yield must not depend on the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pong_flood_starves_nobody_on_epoll_either() {
    empty_pong_flood(&["--driver", "epoll"]).await;
}

async fn empty_pong_flood(extra: &[&str]) {
    let _one_at_a_time = FLOOD.write().await;
    let node = NodeProc::start(&[&["--shards", "1", "--set", "server.handshake_timeout_ms=1000"], extra].concat());
    let addr = node.addr;
    let mut neighbour = connect(&node.url("/echo")).await;
    let mut flooder = raw_ws(addr, "/echo");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let pongs = client_frame(0xA, true, b"", true).repeat(10_000);
    let flood_thread = std::thread::spawn(move || flood(&mut flooder, &pongs, || !stop2.load(Ordering::Relaxed)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A socket that never sends its request: the sweeper must drop it.
    let loris = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let closed = reaches_eof(&mut s, Duration::from_secs(5));
        (closed, start.elapsed())
    });
    let mut rtts = Vec::new();
    let end = Instant::now() + Duration::from_secs(4);
    let mut i = 0;
    while Instant::now() < end {
        let text = format!("round trip {i}");
        let t0 = Instant::now();
        neighbour.send(Message::Text(text.clone().into())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), neighbour.next()).await;
        let got = got.unwrap_or_else(|_| panic!("round trip {i}: no echo within 5 s during the flood"));
        rtts.push(t0.elapsed());
        let got = got.expect("the neighbour's stream ended").expect("the neighbour's socket failed");
        assert_eq!(got, Message::Text(text.into()));
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (closed, after) = loris.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (flooded, broke) = flood_thread.join().unwrap();
    assert!(flooded > 4 * MIB && !broke, "the flood: {flooded} bytes, broke: {broke}");
    let (p50, max) = p50_max(&mut rtts);
    assert!(rtts.len() >= 20, "only {} round trips in 4 s", rtts.len());
    // A debug build parses a 64 KiB read of empty pongs in ~10-20 ms: the
    // neighbour waits for about one such turn, on a loaded machine two.
    assert!(p50 < Duration::from_millis(100), "neighbour p50 {p50:?} during the flood");
    assert!(max < Duration::from_secs(1), "neighbour max {max:?} during the flood");
    assert!(closed && after < Duration::from_millis(3500), "silent socket dropped: {closed} after {after:?}");
    assert!(node.metric("ringside_connections_rejected_total{reason=\"handshake_timeout\",status=\"408\"}") >= 1.0);
}

/// Polls (up to 5 s) until the sum of `name` is at least `want`; its last value.
fn sum_reaching(node: &NodeProc, name: &str, want: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let v = node.metric_sum(name);
        if v >= want || Instant::now() > end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

const BIG_FRAMES: [&str; 2] = ["--set", "websocket.max_frame_bytes=65536"];

#[test]
fn unfinished_frames_cost_what_arrived_not_what_was_announced() {
    let _not_during_a_flood = FLOOD.blocking_read();
    let node = NodeProc::start(&[&["--shards", "2"], &BIG_FRAMES[..]].concat());
    let pid = node.child.id();
    let rss0 = settled_rss(&node);
    let part = partial_frame(65_000, 16);
    let mut conns: Vec<TcpStream> = (0..300).map(|_| raw_ws(node.addr, "/echo")).collect();
    for s in &mut conns {
        s.write_all(&part).unwrap();
    }
    // Measured before any more /metrics requests (rendering them costs a
    // shard some memory of its own the first time).
    std::thread::sleep(Duration::from_millis(1200));
    let growth = rss_bytes(pid).saturating_sub(rss0);
    // What was announced would be 300 × 65,000 B = 19 MiB. Allowed: 8 KiB
    // per connection, plus one 2 MiB transparent huge page that the
    // allocator may happen to touch (RSS moves in those steps with THP on).
    assert!(growth < 300 * 8 * 1024 + (2 << 20), "RSS grew {} KiB for 300 connections", growth / 1024);
    // The gauge is written by each shard's sweep (once a second).
    let held = sum_reaching(&node, "ringside_unfinished_bytes", 300.0 * 16.0);
    assert!((300.0 * 16.0..300.0 * 64.0).contains(&held), "unfinished bytes {held}");
    for s in &conns {
        assert_eq!(look(s), Input::Nothing, "a connection with an unfinished frame was closed early");
    }
}

#[test]
fn stalled_frame_is_closed_1008_after_the_message_timeout() {
    let _not_during_a_flood = FLOOD.blocking_read();
    let args = [&["--shards", "1", "--set", "websocket.message_timeout_ms=1500"], &BIG_FRAMES[..]].concat();
    let node = NodeProc::start(&args);
    let mut s = raw_ws(node.addr, "/echo");
    s.write_all(&partial_frame(65_000, 16)).unwrap();
    let t0 = Instant::now();
    assert_eq!(read_close_frame(&mut s), 1008);
    let after = t0.elapsed();
    assert!(after < Duration::from_secs(5), "closed after {after:?}");
    assert!(after >= Duration::from_millis(1400), "closed before the timeout, after {after:?}");
    assert!(node.metric_sum("ringside_message_timeouts_total") >= 1.0);
}

#[test]
fn shard_budget_for_unfinished_frames_closes_the_one_that_overflows_it() {
    let _not_during_a_flood = FLOOD.blocking_read();
    let budget = ["--set", "websocket.max_unfinished_bytes_per_shard=70000"];
    let node = NodeProc::start(&[&["--shards", "1"], &budget[..], &BIG_FRAMES[..]].concat());
    let mut first = raw_ws(node.addr, "/echo");
    first.write_all(&partial_frame(65_000, 60_000)).unwrap();
    assert!(node.eventually_metric("ringside_unfinished_bytes{shard=\"0\"}", 60_000.0), "first frame not held");
    let mut second = raw_ws(node.addr, "/echo");
    second.write_all(&partial_frame(65_000, 20_000)).unwrap();
    assert_eq!(read_close_frame(&mut second), 1013);
    assert_eq!(look(&first), Input::Nothing, "the connection within the budget was closed");
    assert!(node.eventually_metric_eq("ringside_unfinished_budget_closed_total", 1.0));
    // The first one still completes its frame and gets it echoed.
    first.write_all(&partial_frame(65_000, 65_000)[60_000 + 8..]).unwrap();
    let mut echo = vec![0u8; 4 + 65_000];
    first.read_exact(&mut echo).unwrap();
    assert_eq!(echo[..4], [0x82, 126, 0xfd, 0xe8], "echo header");
    assert!(echo[4..].iter().all(|b| *b == 0xab));
    assert_eq!(node.metric_sum("ringside_unfinished_budget_closed_total"), 1.0);
}

const LORIS: usize = 2000;
const LORIS_SOURCES: usize = 20;

/// Opens `LORIS` sockets from 127.0.0.2.. that each send half a request head.
fn slow_loris(addr: SocketAddr) -> Vec<TcpStream> {
    (0..LORIS)
        .map(|i| {
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % LORIS_SOURCES) as u8);
            let mut s = tcp_from(source, addr, None);
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect()
}

fn count(socks: &[TcpStream], state: Input) -> usize {
    socks.iter().filter(|s| look(s) == state).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_upgrades_time_out_while_real_clients_get_in() {
    let _one_at_a_time = FLOOD.write().await;
    // Sockets from 20 addresses, 100 each: under the per-address share of
    // pending handshakes; the per-shard bound is raised above the 2,000 so
    // that every one of them meets the timeout.
    let limits = ["--set", "limits.max_handshakes_per_shard=4096", "--set", "limits.max_handshakes_per_ip=128"];
    let node =
        NodeProc::start(&[&["--shards", "2", "--set", "server.handshake_timeout_ms=1500"], &limits[..]].concat());
    let addr = node.addr;
    let socks = tokio::task::spawn_blocking(move || slow_loris(addr)).await.unwrap();
    let opened = Instant::now();
    let t0 = Instant::now();
    let (mut ws, _) = rooms_client(&node, "real").await;
    send_json(&mut ws, json!({"type":"join","room":"lobby"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    let join = t0.elapsed();
    let pending = count(&socks, Input::Nothing);
    assert!(join < Duration::from_secs(2), "join took {join:?} during the slow-loris");
    assert!(pending >= LORIS / 2, "only {pending} half-open requests were pending during the join");
    let socks = tokio::task::spawn_blocking(move || {
        while opened.elapsed() < Duration::from_secs(5) && count(&socks, Input::Closed) < LORIS {
            std::thread::sleep(Duration::from_millis(100));
        }
        socks
    })
    .await
    .unwrap();
    let closed = count(&socks, Input::Closed);
    assert_eq!(closed, LORIS, "{closed} of {LORIS} half-open requests dropped after {:?}", opened.elapsed());
    let series = "ringside_connections_rejected_total{reason=\"handshake_timeout\",status=\"408\"}";
    assert!(node.metric(series) >= LORIS as f64, "{series} = {}", node.metric(series));
    // The real client was not touched.
    send_json(&mut ws, json!({"type":"ping","id":"still"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "pong");
}
