//! Zero-disconnect upgrade of a cluster node, over real sockets and a real
//! redis-server: node A (with `server.upgrade_socket`) and node B share a
//! room with history; a publisher on B publishes throughout; A is replaced
//! by `ringside --upgrade-from`. Asserted: A's members see no close and get
//! every offset exactly once (what was published while they moved is
//! fetched from Redis), the new process carries A's node id, each client's
//! sessions set names the new connection only, and a direct message from B
//! still reaches a client that moved.

mod cluster_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster_common::*;
use serde_json::{json, Value};

const MEMBERS: usize = 60;
const HIST: &str = "rooms.history_size=100000";

/// Collects the room's offsets until it has `want` of them or stays silent
/// for 10 s; `Err` on anything but messages of room `h`.
async fn collect(mut c: Client, stop: Arc<AtomicBool>, want: Arc<AtomicU64>) -> (Client, Result<Vec<u64>, String>) {
    let mut offsets = Vec::new();
    let mut silent_since = std::time::Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) && offsets.len() as u64 >= want.load(Ordering::Relaxed) {
            return (c, Ok(offsets));
        }
        // Short waits, so that the end condition is seen without a message.
        let Some(m) = c.recv_within(Duration::from_millis(100)).await else {
            if silent_since.elapsed() < Duration::from_secs(10) {
                continue;
            }
            let last = offsets.last().copied();
            return (c, Err(format!("silent or closed after {} messages (last {last:?})", offsets.len())));
        };
        silent_since = std::time::Instant::now();
        match m["type"].as_str() {
            Some("message") if m["room"] == "h" => offsets.push(m["offset"].as_u64().unwrap_or(0)),
            _ => return (c, Err(format!("unexpected {m}"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_is_upgraded_without_a_close_a_loss_or_a_stale_session() {
    let redis = Redis::start();
    let dir = TempDir::new("upgrade-cluster");
    let sock = format!("server.upgrade_socket={}", dir.0.join("a.sock").display());
    let sock2 = format!("server.upgrade_socket={}", dir.0.join("a2.sock").display());
    let mut a = Node::start_with("ua", &redis.url(), &[HIST, &sock]);
    let b = Node::start_with("ub", &redis.url(), &[HIST]);
    let mut r = redis_conn(&redis.url()).await;
    let session_members = |r: &mut redis::aio::MultiplexedConnection, id: String| {
        let mut r = r.clone();
        async move {
            let m: Vec<String> = redis::cmd("ZRANGE")
                .arg(format!("ringside:sessions:{id}"))
                .arg(0)
                .arg(-1)
                .query_async(&mut r)
                .await
                .unwrap_or_default();
            m
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let want = Arc::new(AtomicU64::new(u64::MAX));
    let mut tasks = Vec::new();
    let mut before = Vec::new();
    // A few connections come and go first: connection ids carry a per-shard
    // generation, so the new process's ids for the same clients differ.
    for i in 0..10 {
        Client::connect(&a, &format!("w{i}")).await.close().await;
    }
    for i in 0..MEMBERS {
        let mut c = Client::connect(&a, &format!("m{i}")).await;
        c.join("h").await;
        tasks.push(tokio::spawn(collect(c, stop.clone(), want.clone())));
    }
    for i in 0..MEMBERS {
        let id = format!("m{i}");
        assert!(
            eventually(Duration::from_secs(10), || {
                let f = session_members(&mut r, id.clone());
                async move { f.await.len() == 1 }
            })
            .await
        );
        before.push(session_members(&mut r, id).await[0].clone());
    }
    assert!(before.iter().all(|m| m.starts_with("ua|")), "{before:?}");

    let mut publisher = Client::connect(&b, "publisher").await;
    publisher.join("h").await;
    let pub_stop = stop.clone();
    let publishing = tokio::spawn(async move {
        let mut sent = 0u64;
        while !pub_stop.load(Ordering::Relaxed) {
            publisher.publish("h", json!(sent)).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (publisher, sent)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sock_path = dir.0.join("a.sock").display().to_string();
    let new = Node::start_args("ua", &redis.url(), &[HIST, &sock2], &["--upgrade-from", &sock_path]);
    let code = tokio::task::spawn_blocking(move || a.wait_exit(Duration::from_secs(20))).await.unwrap();
    assert_eq!(code, Some(0), "the old process exits 0 once empty");
    // The old process exits once it sent "done"; the new one logs it a moment later.
    let took_over = eventually(Duration::from_secs(5), || {
        let done = new.log.lock().unwrap().iter().any(|l| l.contains("upgrade done"));
        async move { done }
    });
    assert!(took_over.await, "the new process took over");
    tokio::time::sleep(Duration::from_millis(700)).await; // publishing on, to the new process

    stop.store(true, Ordering::Relaxed);
    let (mut publisher, sent) = publishing.await.unwrap();
    // The publisher's own round trip: its publishes were all handled.
    publisher.send(json!({"type": "ping", "id": "end"})).await;
    while let Some(m) = publisher.recv().await {
        if m["type"] == "pong" {
            break;
        }
    }
    want.store(sent, Ordering::Relaxed);
    let mut moved = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (c, got) = t.await.unwrap();
        let offsets = got.unwrap_or_else(|e| panic!("m{i}: {e} (sent {sent})"));
        let first = offsets.first().copied().unwrap_or(0);
        let want: Vec<u64> = (first..first + sent).collect();
        assert_eq!(offsets, want, "m{i}: every offset exactly once, in order");
        moved.push(c);
    }
    assert!(sent > 100, "the publisher kept publishing: {sent}");
    let resumed: f64 = new
        .get("/metrics")
        .lines()
        .filter(|l| l.starts_with("ringside_upgrade_resumed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(resumed, MEMBERS as f64);

    // Sessions: one member each, the new process's connection (same node id).
    for (i, old) in before.iter().enumerate() {
        let id = format!("m{i}");
        let ok = eventually(Duration::from_secs(10), || {
            let f = session_members(&mut r, id.clone());
            let old = old.clone();
            async move {
                let m = f.await;
                m.len() == 1 && m[0].starts_with("ua|") && m[0] != old
            }
        })
        .await;
        assert!(ok, "{id}: sessions {:?} (was {old})", session_members(&mut r, id.clone()).await);
    }
    // The node is still registered, under its id.
    let live = b.get_json("/cluster");
    let nodes: Vec<&str> =
        live["nodes"].as_array().map(|a| a.iter().filter_map(|n| n["node"].as_str()).collect()).unwrap_or_default();
    assert!(nodes.contains(&"ua") && nodes.contains(&"ub"), "{live}");

    // A direct message from B still finds a client that moved.
    publisher.direct("m0", json!("after")).await;
    let m = moved[0].recv_within(Duration::from_secs(5)).await;
    assert_eq!(m.as_ref().map(|m| m["data"].clone()), Some(Value::from("after")), "{m:?}");
    for c in moved {
        c.close().await;
    }
}
