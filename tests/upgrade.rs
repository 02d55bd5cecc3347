//! Zero-disconnect upgrade over real sockets: a node with
//! `server.upgrade_socket`, clients that keep talking (echo round trips in
//! order, a room with history getting a steady stream), and a second
//! process started with `--upgrade-from` that takes the listeners and every
//! open WebSocket. Asserted: no client sees a close, every echo comes back
//! in order, every member gets every room offset exactly once, the old
//! process exits 0, the new one counts every connection it took over and
//! serves new clients.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 1000;
const MEMBERS: usize = 100;

struct Seen {
    echoes: u64,
    offsets: Vec<u64>,
    closed: Option<String>,
}

/// One client: echo round trips one at a time until `stop`; a member of
/// room `h` also collects the offsets of its messages.
async fn talk(mut ws: Ws, member: bool, stop: Arc<AtomicBool>, expected: Arc<AtomicU64>) -> Seen {
    let mut seen = Seen { echoes: 0, offsets: Vec::new(), closed: None };
    let mut next = 0u64;
    let mut echoing = true;
    let mut silent_since = Instant::now();
    send_json(&mut ws, json!({"type": "echo", "data": next})).await;
    loop {
        if !echoing && (!member || seen.offsets.len() as u64 >= expected.load(Ordering::Relaxed)) {
            break;
        }
        // Short waits, so that the end condition is seen without a message.
        let m = match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            Ok(Some(Ok(m))) => {
                silent_since = Instant::now();
                m
            }
            Ok(Some(Err(e))) => {
                seen.closed = Some(format!("error {e}"));
                return seen;
            }
            Ok(None) => {
                seen.closed = Some("stream ended".into());
                return seen;
            }
            Err(_) if silent_since.elapsed() < Duration::from_secs(10) => continue,
            Err(_) => {
                let (n, last) = (seen.offsets.len(), seen.offsets.last().copied());
                let missing: Vec<u64> = (1..=last.unwrap_or(0)).filter(|o| !seen.offsets.contains(o)).collect();
                seen.closed = Some(format!(
                    "silent for 10 s after {} echoes, {n} messages, last {last:?}, missing {missing:?}",
                    seen.echoes
                ));
                return seen;
            }
        };
        let v: Value = match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(f) => {
                seen.closed = Some(format!("close {f:?}"));
                return seen;
            }
            _ => continue,
        };
        match v["type"].as_str() {
            Some("echo") => {
                assert_eq!(v["data"].as_u64(), Some(next), "echo out of order");
                seen.echoes += 1;
                if stop.load(Ordering::Relaxed) {
                    echoing = false;
                    continue;
                }
                next += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                send_json(&mut ws, json!({"type": "echo", "data": next})).await;
            }
            Some("message") if member => seen.offsets.push(v["offset"].as_u64().unwrap()),
            _ => panic!("unexpected {v}"),
        }
    }
    let _ = ws.close(None).await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_over_every_websocket_without_a_close_or_a_loss() {
    upgrade_with("poll").await;
}

/// The same on io_uring direct descriptors: each socket is installed as an
/// fd only to be passed, and the new process puts it back into its own
/// ring, so it holds no fd per connection afterwards either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_descriptors_are_taken_over_too_and_hold_no_fd_afterwards() {
    upgrade_with("direct").await;
}

/// Open fds of process `pid`.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

async fn upgrade_with(io: &str) {
    let dir = std::env::temp_dir().join(format!("ringside-upgrade-{io}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("up.sock");
    let io = io.to_string();
    let settings = |sock: &std::path::Path| {
        vec![
            "--shards".to_string(),
            "2".into(),
            "--set".into(),
            "server.pin_cores=false".into(),
            "--set".into(),
            format!("server.io={io}"),
            "--set".into(),
            "rooms.history_size=100000".into(),
            "--set".into(),
            format!("server.upgrade_socket={}", sock.display()),
        ]
    };
    let mut old = NodeProc::start(&settings(&sock).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut epoch = Value::Null;
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    for i in 0..CLIENTS {
        let (mut ws, welcome) = rooms_client(&old, &format!("u{i}")).await;
        assert_eq!(welcome["type"], "welcome");
        let member = i < MEMBERS;
        if member {
            send_json(&mut ws, json!({"type": "join", "room": "h"})).await;
            let joined = next_json(&mut ws).await;
            assert_eq!(joined["type"], "joined");
            epoch = joined["epoch"].clone();
        }
        tasks.push(tokio::spawn(talk(ws, member, stop.clone(), expected.clone())));
    }
    // A publisher outside the room's members, at a steady pace, throughout.
    let (mut publisher, _) = rooms_client(&old, "publisher").await;
    send_json(&mut publisher, json!({"type": "join", "room": "h"})).await;
    assert_eq!(next_json(&mut publisher).await["type"], "joined");
    let pub_stop = stop.clone();
    let publishing = tokio::spawn(async move {
        let mut sent = 0u64;
        while !pub_stop.load(Ordering::Relaxed) {
            send_json(&mut publisher, json!({"type": "publish", "room": "h", "data": sent})).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (publisher, sent)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Whoever connects to the upgrade socket takes every client over: the owner's only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600, "upgrade socket mode");
    // The new process, same settings, its own upgrade socket for next time.
    let sock2 = dir.join("up2.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringside"));
    cmd.args(["--listen", &old.addr.to_string(), "--set", "auth.allow_client_ids=true"])
        .args(settings(&sock2))
        .arg("--upgrade-from")
        .arg(&sock);
    let t0 = Instant::now();
    let new = NodeProc::start_command(cmd);
    assert_eq!(new.addr, old.addr, "same address");
    let code = tokio::task::spawn_blocking(move || old.wait_exit(Duration::from_secs(20))).await.unwrap();
    assert_eq!(code, Some(0), "the old process exits 0 once empty");
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await; // talking on, to the new process
    let fds = fds_of(new.child.id());
    if io == "direct" {
        assert!(fds < 100, "direct path: {fds} fds held for {CLIENTS} connections");
    } else {
        assert!(fds > CLIENTS, "poll path: an fd per connection ({fds})");
    }

    stop.store(true, Ordering::Relaxed);
    let (mut publisher, sent) = publishing.await.unwrap();
    // Settle: a round trip of the publisher proves its publishes were handled.
    send_json(&mut publisher, json!({"type": "ping", "id": "end"})).await;
    loop {
        let m = next_json(&mut publisher).await;
        if m["type"] == "pong" {
            break;
        }
        eprintln!("publisher got {m}");
    }
    expected.store(sent, Ordering::Relaxed);
    let mut echoes = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let seen = t.await.unwrap();
        if seen.closed.is_some() {
            let m = new.get("/metrics").1;
            let interesting: Vec<&str> = m
                .lines()
                .filter(|l| {
                    !l.starts_with('#') && (l.contains("dropped") || l.contains("full") || l.contains("resumed"))
                })
                .collect();
            panic!("client u{i}: {:?} (upgrade took {took:?}, sent {sent}) {interesting:#?}", seen.closed);
        }
        assert!(seen.echoes > 0);
        echoes += seen.echoes;
        if i < MEMBERS {
            let want: Vec<u64> = (1..=seen.offsets.len() as u64).collect();
            assert_eq!(seen.offsets, want, "client u{i}: offsets not contiguous from 1");
            assert_eq!(seen.offsets.len() as u64, sent, "u{i}: every message exactly once");
        }
    }
    assert!(echoes > CLIENTS as u64 * 5, "the clients kept talking: {echoes}");
    assert_eq!(new.metric_sum("ringside_upgrade_resumed_total"), CLIENTS as f64 + 1.0);
    // The new process serves new clients, and the room's history moved:
    // a join with since 0 gets everything.
    let (mut late, welcome) = rooms_client(&new, "late").await;
    assert_eq!(welcome["type"], "welcome");
    send_json(&mut late, json!({"type": "join", "room": "h", "since": {"offset": 0, "epoch": epoch}})).await;
    for want in 1..=sent {
        let m = next_json(&mut late).await;
        assert_eq!((m["type"].as_str(), m["offset"].as_u64()), (Some("message"), Some(want)), "{m}");
    }
    let joined = next_json(&mut late).await;
    assert_eq!((joined["type"].as_str(), joined["recovered"].as_bool()), (Some("joined"), Some(true)), "{joined}");
    assert_eq!(joined["epoch"], epoch, "the room's history moved with its epoch");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One message of the upgrade protocol: a 4-byte big-endian length and JSON.
fn frame(v: Value) -> Vec<u8> {
    let body = v.to_string().into_bytes();
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

/// A "new process" that asks for the handover and then reads nothing: the
/// old process's handover stays bounded (at most 512 sockets per shard in
/// flight, so its fds never reach connections + 2 × 512 + a few), the
/// write to the stalled peer times out, and the old process stops instead
/// of hanging with frozen shards. The clients it could not pass on are
/// closed once nobody holds their socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_ends_the_handover_within_bounds() {
    use std::io::{Read, Write};
    const N: usize = 1500;
    let dir = std::env::temp_dir().join(format!("ringside-upgrade-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("up.sock");
    let up = format!("server.upgrade_socket={}", sock.display());
    // The poll path: one fd per connection, so the fds in flight show.
    let mut old =
        NodeProc::start(&["--shards", "2", "--set", "server.pin_cores=false", "--set", "server.io=poll", "--set", &up]);
    let mut clients = Vec::new();
    for i in 0..N {
        clients.push(rooms_client(&old, &format!("s{i}")).await.0);
    }
    let base = fds_of(old.child.id());
    assert!(base > N, "an fd per connection: {base}");

    let mut peer = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    peer.write_all(&frame(json!({"t": "hello", "pid": 1}))).unwrap();
    let mut len = [0u8; 4];
    peer.read_exact(&mut len).unwrap(); // the listeners' fds are dropped with the ancillary data
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    peer.read_exact(&mut body).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["t"], "listeners");
    peer.write_all(&frame(json!({"t": "ready"}))).unwrap();
    // …and reads nothing more. Sample the old process's fds until it exits.
    let pid = old.child.id();
    let (exit, most) = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + Duration::from_secs(40);
        let mut most = 0;
        while Instant::now() < end {
            most = most.max(fds_of(pid));
            if let Some(code) = old.wait_exit(Duration::from_millis(20)) {
                return (Some(code), most);
            }
        }
        (None, most)
    })
    .await
    .unwrap();
    assert_eq!(exit, Some(0), "the old process stops after a failed handover");
    assert!(most <= base + 2 * 512 + 16, "fds in flight bounded: {most} (before {base})");
    // What sits unread in the peer's socket is the peer's; once it lets
    // go, every client's socket is closed.
    drop(peer);
    let mut open = 0;
    for mut ws in clients {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(m)) = ws.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
        open += usize::from(ended.is_err());
    }
    assert_eq!(open, 0, "clients left open");
    let _ = std::fs::remove_dir_all(&dir);
}
