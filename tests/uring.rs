//! The direct socket path (`server.io = "direct"`: io_uring direct
//! descriptors, receives into a provided-buffer ring shared per shard)
//! beside the poll path and the epoll driver: the same protocol on each, no
//! process fd per connection on the direct path (so one node holds more
//! WebSockets than its RLIMIT_NOFILE), and an empty buffer ring that delays
//! receives but loses nothing.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The node could not use io_uring (a kernel or sandbox without it). That
/// fails the test: the machines this suite runs on have io_uring, and a
/// direct-path test that passed on the poll path would prove nothing. Only
/// with `RINGSIDE_ALLOW_NO_URING=1` (a kernel known to lack it) is the
/// direct-path part skipped, loudly.
fn no_uring(node: &NodeProc) -> bool {
    let fell_back = node.log.lock().unwrap().iter().any(|l| l.contains("FALLING BACK"));
    if fell_back {
        assert!(
            std::env::var("RINGSIDE_ALLOW_NO_URING").is_ok_and(|v| v == "1"),
            "io_uring is not available here (the node fell back to poll); set RINGSIDE_ALLOW_NO_URING=1 to skip the direct-path tests on such a kernel"
        );
        eprintln!("\n!!!!!!!! SKIPPED: io_uring is not available (RINGSIDE_ALLOW_NO_URING=1) !!!!!!!!\n");
    }
    fell_back
}

fn path_is(node: &NodeProc, path: &str) -> bool {
    (0..2).all(|s| node.metric(&format!("ringside_shard_socket_path_info{{shard=\"{s}\",path=\"{path}\"}}")) == 1.0)
}

/// Echo (small, empty, and one of many TCP segments), then rooms
/// and direct messages on /ws.
async fn serves_the_protocol(node: &NodeProc) {
    let mut ws = connect(&node.url("/echo")).await;
    let big: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for m in [Message::Text("a".into()), Message::Text("".into()), Message::Binary(big.into())] {
        ws.send(m.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), m);
    }
    let (mut a, _) = rooms_client(node, "ua").await;
    let (mut b, _) = rooms_client(node, "ub").await;
    send_json(&mut a, json!({"type":"join","room":"r"})).await;
    assert_eq!(next_json(&mut a).await["type"], "joined");
    send_json(&mut b, json!({"type":"join","room":"r"})).await;
    assert_eq!(next_json(&mut b).await["type"], "joined");
    send_json(&mut a, json!({"type":"publish","room":"r","data":{"n":1}})).await;
    let got = next_json(&mut b).await;
    assert_eq!(got["data"]["n"], 1, "{got}");
    send_json(&mut b, json!({"type":"direct","to":"ua","data":2})).await;
    loop {
        let m = next_json(&mut a).await;
        if m["type"] == "direct" {
            assert_eq!(m["data"], 2);
            break;
        }
    }
}

/// Opens `n` /echo WebSockets and keeps them.
async fn open_echoes(node: &NodeProc, n: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(connect(&node.url("/echo")).await);
    }
    out
}

#[tokio::test]
async fn direct_path_serves_the_protocol_without_a_process_fd_per_connection() {
    // Small receive buffers: the large echo spans fifteen of them.
    let node =
        NodeProc::start(&["--shards", "2", "--set", "server.io=direct", "--set", "server.recv_buffer_bytes=4096"]);
    if no_uring(&node) {
        return;
    }
    assert!(path_is(&node, "direct"), "both shards should serve the direct path");
    serves_the_protocol(&node).await;
    let before = fd_count(node.child.id());
    let mut held = open_echoes(&node, 100).await;
    let after = fd_count(node.child.id());
    assert!(after < before + 10, "100 direct WebSockets took process fds: {before} -> {after}");
    for ws in &mut held {
        ws.send(Message::Text("still".into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("still".into()));
    }
}

/// Idle direct-path connections hold no reader task: after a quiet sweep
/// interval every reader retires, and whatever arrives next (a message, a
/// server close answered by the client, a client close) starts one again.
/// The room member that idled still gets a publish; the idle timeout's
/// close reaches a retired connection and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_direct_readers_retire_and_come_back_for_what_arrives() {
    const N: usize = 200;
    let node = NodeProc::start(&[
        "--shards",
        "2",
        "--set",
        "server.io=direct",
        "--set",
        "websocket.sweep_interval_ms=100",
        "--set",
        "websocket.ping_interval_ms=2000",
        "--set",
        "websocket.idle_timeout_ms=2500",
    ]);
    if no_uring(&node) {
        return;
    }
    let mut held = open_echoes(&node, N).await;
    let (mut member, _) = rooms_client(&node, "idle-member").await;
    send_json(&mut member, json!({"type":"join","room":"quiet"})).await;
    assert_eq!(next_json(&mut member).await["type"], "joined");
    let retired = |n: &NodeProc| n.metric_sum("ringside_readers_retired_total");
    let t0 = std::time::Instant::now();
    while retired(&node) < (N + 1) as f64 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(retired(&node) >= (N + 1) as f64, "readers retired: {}", retired(&node));
    // A publish from another connection reaches the retired member (first:
    // the member reads nothing else, so it must come well within the idle
    // timeout).
    let (mut publisher, _) = rooms_client(&node, "idle-publisher").await;
    send_json(&mut publisher, json!({"type":"join","room":"quiet"})).await;
    assert_eq!(next_json(&mut publisher).await["type"], "joined");
    send_json(&mut publisher, json!({"type":"publish","room":"quiet","data":7})).await;
    let m = next_json(&mut member).await;
    assert_eq!((m["type"].as_str(), m["data"].as_i64()), (Some("message"), Some(7)), "{m}");
    // Every retired connection still echoes (a reader starts for the data).
    for (i, ws) in held.iter_mut().enumerate() {
        ws.send(Message::Text("back".into())).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        assert!(matches!(&m, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "back"), "echo {i}: {m:?}");
    }
    assert!(node.metric_sum("ringside_readers_restarted_total") >= N as f64);
    // A client close on a retired connection completes the handshake.
    let mut first = held.remove(0);
    tokio::time::sleep(Duration::from_millis(400)).await; // retired again
    first.close(None).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = first.next().await {} });
    assert!(closed.await.is_ok(), "the client's close was answered");
    // Nobody reads for a while: the server's ping (at 2 s of silence) goes
    // unanswered, and the idle timeout (2.5 s) closes the rest with 4001; the
    // client's answer to that close on a retired connection frees the slot.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for mut ws in held {
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                other => panic!("no close: {other:?}"),
            }
        };
        assert_eq!(code, Some(4001));
        let end = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} });
        assert!(end.await.is_ok(), "the close handshake ended");
    }
    drop((member, publisher));
    let t0 = std::time::Instant::now();
    while node.metric_sum("ringside_websockets_open") > 0.0 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.metric_sum("ringside_websockets_open"), 0.0, "every slot freed");
}

#[tokio::test]
async fn poll_path_serves_the_same_protocol_with_an_fd_per_connection() {
    let node = NodeProc::start(&["--shards", "2", "--set", "server.io=poll"]);
    assert!(path_is(&node, "poll"), "server.io=poll must not use direct descriptors");
    serves_the_protocol(&node).await;
    let before = fd_count(node.child.id());
    let _held = open_echoes(&node, 100).await;
    let after = fd_count(node.child.id());
    assert!(after >= before + 90, "the poll path should hold an fd per socket: {before} -> {after}");
}

#[tokio::test]
async fn epoll_driver_falls_back_to_the_poll_path() {
    let node = NodeProc::start(&["--shards", "2", "--driver", "epoll", "--set", "server.io=direct"]);
    assert!(path_is(&node, "poll"), "with epoll there is no ring for direct descriptors");
    serves_the_protocol(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_buffer_ring_delays_receives_but_loses_nothing() {
    // Two buffers for the whole shard: 64 clients sending at once run it
    // dry. The send queue is large enough that a client reading its echoes
    // while it still sends is never a slow consumer (that is not under test).
    let ring = ["--set", "server.recv_buffers=2", "--set", "server.recv_buffer_bytes=4096"];
    let queue = ["--set", "websocket.send_queue_bytes=8388608"];
    let node = NodeProc::start(&[&["--shards", "1", "--set", "server.io=direct"], &ring[..], &queue[..]].concat());
    if no_uring(&node) {
        return;
    }
    let url = node.url("/echo");
    let mut tasks = Vec::new();
    for c in 0..64u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let ws = connect(&url).await;
            let (mut tx, mut rx) = ws.split();
            let msgs: Vec<Vec<u8>> =
                (0..40u32).map(|i| (0..(i * 997 + c * 13) % 20_000).map(|j| (j ^ i ^ c) as u8).collect()).collect();
            let sent = msgs.clone();
            let writer = tokio::spawn(async move {
                for m in sent {
                    tx.send(Message::Binary(m.into())).await.unwrap();
                }
                tx
            });
            for (i, want) in msgs.iter().enumerate() {
                let got = tokio::time::timeout(Duration::from_secs(20), rx.next())
                    .await
                    .unwrap_or_else(|_| panic!("client {c}: echo {i} never came"))
                    .unwrap()
                    .unwrap();
                assert_eq!(got.into_data().as_ref(), &want[..], "client {c}: echo {i} differs");
            }
            drop(writer.await.unwrap());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        node.eventually_metric("ringside_recv_buffers_exhausted_total{shard=\"0\"}", 1.0),
        "the buffer ring never ran dry: the test did not test recovery"
    );
    assert_eq!(node.metric_sum("ringside_websockets_open"), 0.0, "connections were lost");
}

/// One echo round trip on a raw upgraded socket.
fn echo_once(s: &mut std::net::TcpStream, text: &[u8]) -> bool {
    if s.write_all(&client_frame(0x1, true, text, true)).is_err() {
        return false;
    }
    let mut head = [0u8; 2];
    let mut body = vec![0u8; text.len()];
    s.read_exact(&mut head).is_ok()
        && head == [0x81, text.len() as u8]
        && s.read_exact(&mut body).is_ok()
        && body == text
}

#[test]
fn direct_descriptors_hold_more_websockets_than_the_fd_limit() {
    const LIMIT: u64 = 256;
    const HELD: usize = 300;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringside"));
    cmd.args(["--listen", "127.0.0.1:0", "--shards", "2", "--set", "server.pin_cores=false"]).args([
        "--set",
        "server.io=direct",
        "--set",
        "limits.max_handshakes_per_shard=16",
    ]);
    // SAFETY: setrlimit is async-signal-safe; the child lowers its own
    // limit (soft and hard, so the node cannot raise it) before exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: LIMIT as libc::rlim_t, rlim_max: LIMIT as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let node = NodeProc::start_command(cmd);
    if no_uring(&node) {
        return;
    }
    let pid = node.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert!(line.split_whitespace().any(|w| w == LIMIT.to_string()), "{line}");
    let mut socks: Vec<_> = (0..HELD).map(|_| raw_ws(node.addr, "/echo")).collect();
    assert!(node.eventually_metric_eq("ringside_websockets_open", HELD as f64), "not every upgrade went through");
    let mut alive = 0;
    for (i, s) in socks.iter_mut().enumerate() {
        alive += echo_once(s, format!("hi {i}").as_bytes()) as usize;
    }
    assert_eq!(alive, HELD, "WebSockets that did not echo");
    let fds = fd_count(pid);
    assert!(fds < LIMIT as usize, "{fds} fds open");
    assert!(fds + 100 < HELD, "{HELD} WebSockets on {fds} fds: they are not direct descriptors");
}
