//! Rebalancing between two nodes through a real `redis-server` (seed 000's
//! rule): a node above `cluster.rebalance_high` while a live peer is below
//! `cluster.rebalance_low` asks ceil((current − capacity × 0.8) / 2) of its
//! least recently active clients to move, with a `reconnect` hint naming
//! the peer; their affinity is rewritten to it; one that does not leave is
//! closed 1001 after `cluster.migrate_grace_ms`; the moves are counted.

mod cluster_common;

use std::time::Duration;

use cluster_common::*;
use redis::AsyncCommands;
use serde_json::{json, Value};

fn labeled(node: &Node, series: &str) -> f64 {
    node.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn ping(c: &mut Client) {
    c.send(json!({"type": "ping", "id": "x"})).await;
    let m = c.recv().await.expect("pong");
    assert_eq!(m["type"], "pong", "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_moves_its_least_active_clients_to_an_idle_peer() {
    assert!(redis_available());
    let redis = Redis::start();
    // 2 shards × 20 slots = 40. High 0.925: 37 clients (0.925) do not
    // trigger, the 38th does: ceil((38 − 32) / 2) = 3 clients move.
    let settings = [
        "server.max_connections_per_shard=20",
        "cluster.rebalance_high=0.925",
        "cluster.migrate_grace_ms=1500",
        // No sampling pings: their pongs would count as activity.
        "cluster.sample_size=0",
    ];
    let a = Node::start_with("a", &redis.url(), &settings);
    let b = Node::start_with("b", &redis.url(), &settings);
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.get_json("/cluster")["nodes"].as_array().map(|n| n.len()) == Some(2)
        })
        .await,
        "a never saw b"
    );
    let mut clients = Vec::new();
    for i in 0..37 {
        clients.push(Client::connect(&a, &format!("c{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Everyone but c0, c1, c2 is active again: those three are the least active.
    for c in clients.iter_mut().skip(3) {
        ping(c).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    clients.push(Client::connect(&a, "c37").await);

    let b_url = format!("ws://{}/ws", b.addr);
    for c in clients.iter_mut().take(3) {
        let hint = c.recv_within(Duration::from_secs(5)).await.unwrap_or_else(|| panic!("{} got no hint", c.id));
        assert_eq!((hint["type"].as_str(), hint["reason"].as_str()), (Some("reconnect"), Some("rebalance")), "{hint}");
        assert_eq!(hint["url"], Value::from(b_url.clone()), "{hint}");
        assert!(hint["after_ms"].as_u64().is_some_and(|ms| ms <= 1000), "{hint}");
    }
    // Four others leave: a is back under the threshold, no second batch.
    let rest = clients.split_off(3);
    let (leaving, mut staying) = {
        let mut r = rest;
        let staying = r.split_off(4);
        (r, staying)
    };
    for c in leaving {
        c.close().await;
    }
    for c in staying.iter_mut() {
        assert!(c.drain(Duration::from_millis(20)).await.is_empty(), "{} was asked to move too", c.id);
    }
    // c0 and c1 follow the hint to b; c2 ignores it and is closed after the grace.
    let mut moved = clients;
    let c2 = moved.pop().unwrap();
    for c in moved {
        let id = c.id.clone();
        c.close().await;
        let there = Client::connect(&b, &id).await;
        assert_eq!(there.welcome["node"], "b");
    }
    let mut c2 = c2;
    assert_eq!(c2.close_code(Duration::from_secs(5)).await, Some(1001));
    // The affinity of the one that was closed names b, not a.
    let mut r = redis_conn(&redis.url()).await;
    assert!(
        eventually(Duration::from_secs(3), || {
            let mut r = r.clone();
            async move { r.get::<_, Option<String>>("ringside:affinity:c2").await.ok().flatten().as_deref() == Some("b") }
        })
        .await,
        "affinity of c2: {:?}",
        r.get::<_, Option<String>>("ringside:affinity:c2").await
    );
    let series = r#"ringside_cluster_failover_total{from="a",to="b",reason="rebalance"}"#;
    assert_eq!(labeled(&a, series), 3.0);
    // Past grace + settle + interval: room for a wrong second batch.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(a.metric("ringside_cluster_rebalances_total"), 1.0);
    assert_eq!(labeled(&a, series), 3.0);
}
