//! The cluster smoke test against a local Redis Cluster of 3 masters + 3
//! replicas (scripts/redis-cluster): registry keys spread over the slots,
//! rooms across nodes over sharded pub/sub in both directions, direct
//! messages through the inboxes, and the affinity hint.

mod cluster_common;

use std::time::Duration;

use cluster_common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_three_plus_three_redis_cluster() {
    // Panics (never skips) when redis-server is missing and cannot be installed.
    assert!(redis_available());
    let cluster = RedisCluster::start().expect("scripts/redis-cluster start failed");
    let urls = cluster.urls();
    // One seed is enough in cluster mode: node ca gets only the first URL.
    let mode = ["cluster.redis_mode=cluster"];
    let seed = urls.split(',').next().unwrap().to_string();
    let (a, b) = (Node::start_with("ca", &seed, &mode), Node::start_with("cb", &urls, &mode));
    let both = eventually(Duration::from_secs(8), || async {
        a.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2
            && b.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    assert!(both, "registry over the cluster: {} / {}", a.get("/cluster"), b.get("/cluster"));
    assert_eq!(a.breaker(), "closed");
    // Registry keys live on whichever master owns their slot.
    let client = redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>()).expect("cluster client");
    let mut r = client.get_async_connection().await.expect("cluster connect");
    let ttl: i64 = redis::cmd("PTTL").arg("ringside:node:ca").query_async(&mut r).await.expect("pttl");
    assert!(ttl > 0 && ttl <= 3 * INTERVAL_MS as i64, "node TTL {ttl}");

    let mut a1 = Client::connect(&a, "a1").await;
    let mut a2 = Client::connect(&a, "a2").await;
    let mut b1 = Client::connect(&b, "b1").await;
    for c in [&mut a1, &mut a2, &mut b1] {
        c.join("lobby").await;
    }
    // Sharded subscriptions are not visible to PUBSUB NUMSUB: probe until b1 hears a1.
    let mut heard = false;
    for i in 0..40 {
        a1.publish("lobby", json!({"probe": i})).await;
        if b1.recv_within(Duration::from_millis(100)).await.is_some_and(|m| m["type"] == "message") {
            heard = true;
            break;
        }
    }
    assert!(heard, "b never heard a over SSUBSCRIBE");
    let _ = a2.drain(Duration::from_millis(300)).await;
    let _ = b1.drain(Duration::from_millis(300)).await;
    for i in 0..5 {
        b1.publish("lobby", json!(i)).await;
    }
    let want: Vec<_> = (0..5).map(|i| json!(i)).collect();
    assert_eq!(room_data(&a1.drain(Duration::from_millis(600)).await), want);
    assert_eq!(room_data(&a2.drain(Duration::from_millis(600)).await), want);
    assert!(room_data(&b1.drain(Duration::from_millis(600)).await).is_empty(), "sender excluded");
    for i in 0..5 {
        a2.publish("lobby", json!({"a": i})).await;
    }
    let want: Vec<_> = (0..5).map(|i| json!({"a": i})).collect();
    assert_eq!(room_data(&b1.drain(Duration::from_millis(600)).await), want, "exactly once");
    assert_eq!(room_data(&a1.drain(Duration::from_millis(600)).await), want);

    a1.direct("b1", json!("over the cluster")).await;
    let m = b1.recv().await.expect("direct across nodes");
    assert_eq!(m, json!({"type": "direct", "from": "a1", "data": "over the cluster"}));

    a2.close().await;
    // The affinity key is written in the node's next batch; wait for it
    // rather than for a fixed time (a loaded CI box can be slow).
    let pinned = eventually(Duration::from_secs(5), || {
        let mut r = r.clone();
        async move {
            let v: Option<String> =
                redis::cmd("GET").arg("ringside:affinity:a2").query_async(&mut r).await.ok().flatten();
            v.as_deref() == Some("ca")
        }
    })
    .await;
    assert!(pinned, "ringside:affinity:a2 never named ca");
    // The hint names a node only while the registry shows it live. On a
    // loaded 2-core box a node can miss its 3-interval TTL for a moment and
    // drop out of the view; wait until cb sees ca, and allow a retry.
    let mut hint = None;
    for _ in 0..3 {
        let both = eventually(Duration::from_secs(5), || async {
            b.get_json("/cluster")["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["node"] == "ca"))
        })
        .await;
        assert!(both, "cb never saw ca live: {}", b.get("/cluster"));
        let mut a2 = Client::connect(&b, "a2").await;
        hint = a2.recv_within(Duration::from_secs(3)).await;
        if hint.is_some() {
            break;
        }
        a2.close().await;
        // cb took the affinity over when a2 connected there: give it back to ca.
        tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
        let _: () = redis::cmd("SET").arg("ringside:affinity:a2").arg("ca").query_async(&mut r).await.expect("set");
    }
    let hint = hint.unwrap_or_else(|| {
        let metrics: Vec<String> =
            b.get("/metrics").lines().filter(|l| l.starts_with("ringside_cluster")).map(str::to_string).collect();
        panic!("no affinity hint in 3 tries; node cb /cluster {} metrics {metrics:?}", b.get("/cluster"))
    });
    assert_eq!(hint["type"], "affinity");
    assert_eq!(hint["node"], "ca");

    // Rooms with history on the cluster: the numbering script and the
    // room's sharded channel share a slot (hash tag), one order on both nodes.
    let set = ["rooms.history_size=100", "cluster.redis_mode=cluster"];
    let (ha, hb) = (Node::start_with("hca", &urls, &set), Node::start_with("hcb", &urls, &set));
    // Until a node reaches Redis its joins answer epoch "none" (Redis away).
    for n in [&ha, &hb] {
        assert!(n.wait_closed(Duration::from_secs(10)).await.is_some(), "{} never reached the cluster", n.id);
    }
    let mut pa = Client::connect(&ha, "hpa").await;
    let mut sb = Client::connect(&hb, "hsb").await;
    pa.send(json!({"type": "join", "room": "hist.x"})).await;
    assert!(pa.recv().await.is_some_and(|m| m["type"] == "joined" && m["offset"] == 0));
    sb.send(json!({"type": "join", "room": "hist.x"})).await;
    let joined = sb.recv().await.expect("joined");
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    let mut heard = 0;
    for i in 0..40 {
        pa.publish("hist.x", json!(i)).await;
        if let Some(m) = sb.recv_within(Duration::from_millis(100)).await {
            heard = m["offset"].as_u64().expect("offset");
            break;
        }
    }
    assert!(heard > 0, "hcb never heard hca's history room");
    let _ = sb.drain(Duration::from_millis(300)).await;
    for i in 0..10 {
        pa.publish("hist.x", json!({"n": i})).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A fresh client on hcb recovers the last ten from the cluster's stream.
    let mut late = Client::connect(&hb, "hlate").await;
    let since = heard;
    late.send(json!({"type": "join", "room": "hist.x", "since": {"offset": since, "epoch": epoch}})).await;
    let mut offsets = Vec::new();
    let joined = loop {
        let m = late.recv().await.expect("recovery");
        if m["type"] == "joined" {
            break m;
        }
        offsets.push(m["offset"].as_u64().expect("offset"));
    };
    if joined["recovered"] != true {
        let warn = |n: &Node| -> Vec<String> {
            n.log.lock().unwrap().iter().filter(|l| l.contains("WARN") || l.contains("ERROR")).cloned().collect()
        };
        panic!("{joined} since {since} epoch {epoch}; hcb: {:?}; hca: {:?}", warn(&hb), warn(&ha));
    }
    let last = joined["offset"].as_u64().unwrap();
    assert_eq!(offsets, (since + 1..=last).collect::<Vec<u64>>(), "contiguous from the stream");
    assert!(last >= since + 10);
}
