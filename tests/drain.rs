//! The drain on SIGTERM, over real sockets with tokio-tungstenite: `/ready`
//! answers 503 at once and for as long as the drain lasts (the listener
//! stays open), upgrades are refused 503, every `/ws` client gets a
//! `reconnect` hint (reason `drain`) at a time spread over
//! `shutdown.reconnect_spread_ms`, those that follow it leave on their own,
//! the rest (and `/echo`, which has no hints) get 1001 at 3/4 of the drain,
//! and one log line sums it up.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Reads until the `reconnect` hint; returns it and when it came.
async fn hint(ws: &mut Ws) -> (Value, Instant) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no hint within 10 s")
            .expect("stream ended before the hint")
            .expect("websocket error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "reconnect" {
                return (v, Instant::now());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hints_spread_then_closes_the_rest_with_1001_and_sums_up() {
    drain_with("poll").await;
}

/// The same on the direct socket path (io_uring direct descriptors, whose
/// accepts are cancelled differently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_socket_path_drains_the_same_way() {
    drain_with("direct").await;
}

/// HAProxy's agent check: one line, then the socket closes.
fn agent_says(port: u16) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("agent port");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn drain_with(io: &str) {
    let io = format!("server.io={io}");
    let mut node = NodeProc::start(&[
        "--set",
        "server.agent_listen=127.0.0.1:0",
        "--set",
        "server.max_connections_per_shard=50",
        "--shards",
        "2",
        "--set",
        &io,
        "--set",
        "server.pin_cores=false",
        "--set",
        "shutdown.drain_timeout_ms=4000",
        "--set",
        "shutdown.reconnect_spread_ms=1500",
    ]);
    let agent_port = logged_addr(&node.log, "agent-check").port();
    let mut readers = Vec::new();
    for i in 0..20 {
        let (mut c, welcome) = rooms_client(&node, &format!("c{i}")).await;
        assert_eq!(welcome["type"], "welcome");
        // Each client reads on its own task, so a hint's time is its arrival.
        readers.push(tokio::spawn(async move {
            let h = hint(&mut c).await;
            (c, h)
        }));
    }
    let mut echo = [connect(&node.url("/echo")).await, connect(&node.url("/echo")).await];
    assert_eq!(node.get("/ready").0, 200);
    // 22 of 100 slots used: at most 78 % of the weight (less if the last
    // second's handshakes were slow; at least a tenth of that).
    let up = agent_says(agent_port);
    let pct: u32 = up.strip_prefix("up ").and_then(|r| r.strip_suffix("%\n")).and_then(|n| n.parse().ok()).expect(&up);
    assert!((7..=78).contains(&pct), "{up}");

    let t0 = Instant::now();
    node.signal(SIGTERM);
    // /ready: 503 at once, and still 503 (not refused) well into the drain.
    assert!(eventually(|| node.get("/ready").0 == 503), "/ready did not turn 503");
    assert_eq!(agent_says(agent_port), "drain\n");
    // An upgrade during the drain: 503 draining.
    let (_s, head) = raw_upgrade(node.addr, "/ws?client_id=late", "");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");

    let mut hints = Vec::new();
    let mut ws = Vec::new();
    for r in readers {
        let (c, h) = r.await.unwrap();
        ws.push(c);
        hints.push(h);
    }
    for (h, _) in &hints {
        assert_eq!(h["reason"], "drain", "{h}");
        assert_eq!(h["url"], "", "no cluster: same address, through the balancer");
        let after = h["after_ms"].as_u64().expect("after_ms");
        assert!(after <= 1000, "{h}");
    }
    let first = hints.iter().map(|(_, t)| *t).min().unwrap();
    let last = hints.iter().map(|(_, t)| *t).max().unwrap();
    assert!(last - first >= Duration::from_millis(450), "hints not spread: {:?}", last - first);
    assert_eq!(node.get("/ready").0, 503, "still answering 503 after the spread");

    // Half follow the hint (close themselves); the others and /echo get 1001.
    let (follow, ignore) = ws.split_at_mut(10);
    for c in follow.iter_mut() {
        c.close(None).await.unwrap();
    }
    for c in ignore.iter_mut().chain(echo.iter_mut()) {
        assert_eq!(close_code(c, Duration::from_secs(6)).await, 1001);
    }
    assert!(t0.elapsed() >= Duration::from_millis(2500), "1001 came before 3/4 of the drain");
    assert_eq!(node.wait_exit(Duration::from_secs(6)), Some(0));
    let log = node.log.lock().unwrap().join("\n");
    let line = log.lines().find(|l| l.contains("drain finished")).unwrap_or_else(|| panic!("no summary: {log}"));
    for want in ["22 connection(s)", "20 hinted", "10 left on their own", "12 closed with 1001", "0 still open"] {
        assert!(line.contains(want), "{want:?} missing from {line}");
    }
}

fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
