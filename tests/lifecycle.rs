//! Capacity, backpressure, timers and shutdown, observed from outside.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn full_shard_hands_off_then_all_full_gets_503() {
    let node = NodeProc::start(&["--shards", "2", "--set", "server.max_connections_per_shard=3"]);
    let mut clients = Vec::new();
    let mut shards = [0; 2];
    for i in 0..6 {
        let (ws, w) = rooms_client(&node, &format!("cap{i}")).await;
        shards[w["shard"].as_u64().unwrap() as usize] += 1;
        clients.push(ws);
    }
    assert_eq!(shards, [3, 3], "a full shard must pass sockets to the one with room");
    let (s, body) = node.get("/ready");
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("\"status\":\"full\""));
    let req = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (s, text) = raw_request(node.addr, req);
    assert_eq!(s, 503, "{text}");
    assert!(text.contains("Retry-After: "));
    assert!(node.metric("ringside_connections_rejected_total{reason=\"full\",status=\"503\"}") >= 1.0);
    // Sockets each shard's listener took beyond its 3 slots must have been
    // handed off (the hash is the kernel's, so the split varies). The
    // plain HTTP requests made so far (six, counting these) are accepted
    // sockets too, kept as overflow once every slot is taken.
    let accepted = |s: usize| node.metric(&format!("ringside_connections_accepted_total{{shard=\"{s}\"}}"));
    let (a0, a1) = (accepted(0), accepted(1));
    let failover = node.metric_sum("ringside_websocket_pool_failover_total");
    let excess = |a: f64| (a - 3.0).max(0.0);
    assert!(failover <= excess(a0) + excess(a1), "failover {failover}, accepted {a0}/{a1}");
    assert!(failover >= excess(a0 - 6.0) + excess(a1 - 6.0), "failover {failover}, accepted {a0}/{a1}");
    assert_eq!(node.get("/health").0, 200, "health answers even when full");
    // A slot frees up: upgrades work again.
    clients.pop().unwrap().close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_ws, _) = rooms_client(&node, "again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_hits_its_cap_without_hurting_a_fast_one() {
    let node = NodeProc::start(&["--shards", "2", "--set", "websocket.send_queue_bytes=65536"]);
    let (mut fast, _) = rooms_client(&node, "fast").await;
    let (mut publisher, _) = rooms_client(&node, "pub").await;
    send_json(&mut publisher, json!({"type":"join","room":"flood"})).await;
    next_json(&mut publisher).await;
    // The slow reader: joins, then never reads again.
    let mut slow = raw_ws(node.addr, "/ws?client_id=slow");
    slow.write_all_frames(&[client_frame(0x1, true, br#"{"type":"join","room":"flood"}"#, true)]);
    send_json(&mut fast, json!({"type":"join","room":"flood"})).await;
    next_json(&mut fast).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payload = "x".repeat(8000);
    let n = 2000; // 16 MB: far beyond socket buffers + the 64 KiB queue
                  // The fast reader acknowledges what it got; the publisher stays within a
                  // window of it, so "fast" means "reads as fast as messages come".
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let got2 = got.clone();
    let reader = tokio::spawn(async move {
        for i in 0..n {
            let m = next_json(&mut fast).await;
            assert_eq!(m["data"]["n"], i);
            got2.store(i + 1, std::sync::atomic::Ordering::Release);
        }
    });
    for i in 0..n {
        while i - got.load(std::sync::atomic::Ordering::Acquire) > 4 {
            assert!(!reader.is_finished(), "the fast reader stopped (closed or timed out)");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let text = json!({"type":"publish","room":"flood","data":{"n":i,"p":payload}}).to_string();
        publisher.send(Message::Text(text.into())).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), reader).await.unwrap().unwrap();
    assert_eq!(node.metric_sum("ringside_slow_consumer_closed_total"), 1.0);
    // The slow reader finds its queue cut off with a 1008 close after what the kernel buffered.
    let code = tokio::task::spawn_blocking(move || raw_close_code(&mut slow)).await.unwrap();
    assert!(code == 1008 || code == 0, "slow reader got {code}");
    let rss = rss_kib(node.child.id());
    assert!(rss < 200 * 1024, "server RSS {rss} KiB: the slow reader's backlog was not capped");
}

#[tokio::test]
async fn drop_policy_drops_and_counts() {
    let node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "websocket.send_queue_bytes=16384",
        "--set",
        "websocket.slow_consumer=drop",
    ]);
    let (mut publisher, _) = rooms_client(&node, "pub").await;
    send_json(&mut publisher, json!({"type":"join","room":"r"})).await;
    next_json(&mut publisher).await;
    let mut slow = raw_ws(node.addr, "/ws?client_id=slow");
    slow.write_all_frames(&[client_frame(0x1, true, br#"{"type":"join","room":"r"}"#, true)]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payload = "y".repeat(8000);
    for i in 0..1500 {
        publisher
            .feed(Message::Text(json!({"type":"publish","room":"r","data":{"n":i,"p":payload}}).to_string().into()))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    send_json(&mut publisher, json!({"type":"ping","id":"done"})).await;
    assert_eq!(next_json(&mut publisher).await["type"], "pong");
    assert!(node.metric_sum("ringside_send_queue_dropped_total") > 0.0);
    assert_eq!(node.metric_sum("ringside_slow_consumer_closed_total"), 0.0);
    assert_eq!(node.metric_sum("ringside_websockets_open"), 2.0, "drop policy keeps the connection");
}

#[tokio::test]
async fn sigterm_closes_everyone_with_1001_and_exits_zero() {
    let mut node = NodeProc::start(&["--shards", "2", "--set", "shutdown.drain_timeout_ms=3000"]);
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(connect(&node.url(if i % 2 == 0 { "/echo" } else { "/ws" })).await);
    }
    let t0 = Instant::now();
    node.signal(SIGTERM);
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws, Duration::from_secs(5)).await, 1001);
    }
    assert_eq!(node.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(4), "exit within the drain timeout");
    assert!(std::net::TcpStream::connect(node.addr).is_err(), "no longer accepting");
}

#[tokio::test]
async fn sigint_with_a_silent_peer_still_exits_within_drain_timeout() {
    let mut node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "shutdown.drain_timeout_ms=1500",
        "--set",
        "websocket.close_timeout_ms=60000",
    ]);
    // A raw peer that never answers the close frame.
    let _silent = raw_ws(node.addr, "/echo");
    let t0 = Instant::now();
    node.signal(SIGINT);
    assert_eq!(node.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(t0.elapsed() < Duration::from_millis(2500), "took {:?}", t0.elapsed());
}

#[test]
fn handshake_timeout_drops_silent_sockets() {
    let node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "server.handshake_timeout_ms=300",
        "--set",
        "websocket.sweep_interval_ms=50",
    ]);
    let mut s = std::net::TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(node.metric("ringside_connections_rejected_total{reason=\"handshake_timeout\",status=\"408\"}"), 1.0);
}

#[tokio::test]
async fn server_pings_keep_live_peers_and_close_dead_ones() {
    let node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "websocket.ping_interval_ms=200",
        "--set",
        "websocket.idle_timeout_ms=700",
        "--set",
        "websocket.sweep_interval_ms=50",
    ]);
    // tokio-tungstenite answers pings while it is being polled.
    let mut live = connect(&node.url("/echo")).await;
    let live_task = tokio::spawn(async move {
        let mut pings = 0;
        let end = tokio::time::Instant::now() + Duration::from_millis(1800);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, live.next()).await {
            if let Message::Ping(_) = m {
                pings += 1;
            }
        }
        live.send(Message::Text("alive".into())).await.unwrap();
        (pings, live.next().await.unwrap().unwrap())
    });
    // A raw peer that never answers.
    let mut dead = raw_ws(node.addr, "/echo");
    let t0 = Instant::now();
    let code = tokio::task::spawn_blocking(move || raw_close_code(&mut dead)).await.unwrap();
    assert_eq!(code, 4001);
    assert!(t0.elapsed() < Duration::from_secs(3));
    let (pings, echo) = live_task.await.unwrap();
    assert!(pings >= 1, "server sent no ping");
    assert_eq!(echo, Message::Text("alive".into()));
    assert!(node.metric_sum("ringside_pings_sent_total") >= 2.0);
}

#[tokio::test]
async fn quiet_connections_give_their_frame_reader_back_and_keep_working() {
    let node = NodeProc::start(&["--shards", "2", "--set", "websocket.sweep_interval_ms=50"]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut ws = connect(&node.url("/echo")).await;
        ws.send(Message::Text(format!("hello {i}").into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(format!("hello {i}").into()));
        clients.push(ws);
    }
    // A fragmented message left open: its reader must survive the sweeps.
    let mut raw = raw_ws(node.addr, "/echo");
    std::io::Write::write_all(&mut raw, &client_frame(0x1, false, b"part one, ", true)).unwrap();
    // Quiet for a few sweeps: every reader at a frame boundary is released;
    // the one in the middle of a fragmented message is kept.
    assert!(node.eventually_metric_eq("ringside_frame_readers", 1.0), "readers not released");
    std::io::Write::write_all(&mut raw, &client_frame(0x0, true, b"part two", true)).unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut raw, &mut buf).unwrap();
    assert_eq!(&buf[2..n], b"part one, part two", "the open message survived the sweeps");
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::Binary(vec![i as u8; 3000].into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Binary(vec![i as u8; 3000].into()));
    }
}

#[tokio::test]
async fn epoll_driver_serves_the_same_protocol() {
    let node = NodeProc::start(&["--shards", "2", "--driver", "epoll"]);
    let mut ws = connect(&node.url("/echo")).await;
    for m in ["a", "bb", ""] {
        ws.send(Message::Text(m.into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text(m.into()));
    }
    let (mut a, _) = rooms_client(&node, "ea").await;
    let (mut b, _) = rooms_client(&node, "eb").await;
    send_json(&mut a, json!({"type":"direct","to":"eb","data":1})).await;
    assert_eq!(next_json(&mut b).await["data"], 1);
    assert_eq!(node.metric("ringside_shard_driver_info{shard=\"1\",driver=\"epoll\"}"), 1.0);
    assert!(node.log.lock().unwrap().iter().any(|l| l.contains("epoll driver")));
}

#[test]
fn check_config_names_the_offending_key_and_examples_are_valid() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringside"))
        .args(["--check-config", "--set", "websocket.ping_interval_ms=5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("websocket.ping_interval_ms"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringside"))
        .args(["--check-config"])
        .env("RINGSIDE_SERVER_BACKLOG", "zero")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.backlog"));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringside"))
            .args(["--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        seen += 1;
    }
    assert!(seen >= 3, "development, production and test examples");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

trait WriteFrames {
    fn write_all_frames(&mut self, frames: &[Vec<u8>]);
}

impl WriteFrames for std::net::TcpStream {
    fn write_all_frames(&mut self, frames: &[Vec<u8>]) {
        use std::io::Write;
        for f in frames {
            self.write_all(f).unwrap();
        }
        // Shrink the receive window so the backlog builds on the server side quickly.
        let _ = self.set_nonblocking(false);
    }
}
