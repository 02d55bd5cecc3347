//! Two (or three) ringside nodes and one real `redis-server`: cross-node
//! rooms, direct messages, the registry and its TTLs, affinity hints, a
//! SIGKILLed node, and a Redis outage. Each test owns its Redis and nodes on
//! free ports; the sync interval is 200 ms.

mod cluster_common;

use std::time::{Duration, Instant};

use cluster_common::*;
use serde_json::{json, Value};

const QUIET: Duration = Duration::from_millis(600);

/// redis-server must be there: `redis_available` installs it or panics (a
/// cluster test never skips).
macro_rules! need_redis {
    () => {
        assert!(redis_available(), "redis-server is missing");
    };
}

/// Waits until both nodes subscribed `room`.
async fn both_subscribed(redis: &Redis, room: &str, n: i64) {
    let r = redis_conn(&redis.url()).await;
    let ch = format!("ringside:room:{room}");
    let ok = eventually(Duration::from_secs(5), || {
        let ch = ch.clone();
        let mut r = r.clone();
        async move { numsub(&mut r, &ch).await == n }
    })
    .await;
    assert!(ok, "{ch} never had {n} subscribers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_span_nodes_both_ways_exactly_once_without_the_sender() {
    need_redis!();
    let redis = Redis::start();
    let (a, b) = (Node::start("ra", &redis.url()), Node::start("rb", &redis.url()));
    let mut a1 = Client::connect(&a, "a1").await;
    let mut a2 = Client::connect(&a, "a2").await;
    let mut b1 = Client::connect(&b, "b1").await;
    let mut b2 = Client::connect(&b, "b2").await;
    for c in [&mut a1, &mut a2, &mut b1, &mut b2] {
        c.join("r").await;
    }
    both_subscribed(&redis, "r", 2).await;
    for i in 0..5 {
        a1.publish("r", json!({"from_a": i})).await;
    }
    let want: Vec<_> = (0..5).map(|i| json!({"from_a": i})).collect();
    assert_eq!(room_data(&a2.drain(QUIET).await), want, "local member on a");
    assert_eq!(room_data(&b1.drain(QUIET).await), want, "remote member on b, once each, in order");
    assert_eq!(room_data(&b2.drain(QUIET).await), want);
    assert!(room_data(&a1.drain(QUIET).await).is_empty(), "the sender does not get its own message");
    for i in 0..5 {
        b2.publish("r", json!({"from_b": i})).await;
    }
    let want: Vec<_> = (0..5).map(|i| json!({"from_b": i})).collect();
    for c in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(room_data(&c.drain(QUIET).await), want, "client {}", c.id);
    }
    assert!(room_data(&b2.drain(QUIET).await).is_empty());
    // The last local member leaving unsubscribes the node.
    b1.close().await;
    b2.close().await;
    both_subscribed(&redis, "r", 1).await;
    a1.publish("r", json!("after")).await;
    assert_eq!(room_data(&a2.drain(QUIET).await), vec![json!("after")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_cross_nodes_and_unknown_targets_are_reported() {
    need_redis!();
    let redis = Redis::start();
    let (a, b) = (Node::start("da", &redis.url()), Node::start("db", &redis.url()));
    // Wait until each node sees the other in the registry.
    assert!(
        eventually(Duration::from_secs(5), || async {
            a.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2
        })
        .await
    );
    let mut alice = Client::connect(&a, "alice").await;
    let mut bob = Client::connect(&b, "bob").await;
    // Straight away: bob's conn key is written in the next batch, the sender's node waits for it.
    alice.direct("bob", json!({"hi": 1})).await;
    let got = bob.recv().await.expect("direct across nodes");
    assert_eq!(got, json!({"type": "direct", "from": "alice", "data": {"hi": 1}}));
    bob.direct("alice", json!("back")).await;
    let got = alice.recv().await.expect("and back");
    assert_eq!(got["data"], "back");
    let t0 = Instant::now();
    alice.direct("nobody", json!(1)).await;
    let err = alice.recv().await.expect("an error for an unknown target");
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "unknown_client", "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2), "unknown answered in {:?}", t0.elapsed());
    assert!(bob.drain(QUIET).await.is_empty(), "no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_redis_connection_but_not_forever() {
    need_redis!();
    let redis = Redis::start();
    // Connected: ready as soon as it reached Redis, long before its 30 s wait.
    let a = Node::start_with("ra", &redis.url(), &["cluster.ready_wait_ms=30000"]);
    let ready = eventually(Duration::from_secs(15), || async { a.get_status("/ready").0 == 200 }).await;
    assert!(ready, "not ready though connected: {}", a.get("/ready"));
    assert_eq!(a.get_status("/ready").1["status"], "ready");
    // Nothing at its Redis address: "connecting" (503) until cluster.ready_wait_ms.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let b = Node::start_with("rb", &dead, &["cluster.ready_wait_ms=6000"]);
    let (code, body) = b.get_status("/ready");
    if started.elapsed() < Duration::from_millis(5500) {
        assert_eq!((code, body["status"].as_str()), (503, Some("connecting")), "{body}");
    }
    let up = eventually(Duration::from_secs(10), || async { b.get_status("/ready").0 == 200 }).await;
    assert!(up, "still not ready long after cluster.ready_wait_ms: {}", b.get("/ready"));
    assert!(started.elapsed() >= Duration::from_millis(6000), "ready before the wait ran out without Redis");
    // Local traffic is served either way.
    let mut c = Client::connect(&b, "local").await;
    c.send(json!({"type": "echo", "data": 1})).await;
    assert_eq!(c.recv().await.expect("echo")["data"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_keys_carry_the_documented_fields_and_ttls() {
    need_redis!();
    let redis = Redis::start();
    let (a, b) = (Node::start("ka", &redis.url()), Node::start("kb", &redis.url()));
    let mut r = redis_conn(&redis.url()).await;
    let mut carol = Client::connect(&a, "carol").await;
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
    let node: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg("ringside:node:ka").query_async(&mut r).await.unwrap();
    for f in [
        "url",
        "shards",
        "connections",
        "capacity",
        "utilization",
        "handshake_p99_us",
        "health",
        "version",
        "started_at",
    ] {
        assert!(node.contains_key(f), "node hash lacks {f}: {node:?}");
    }
    assert_eq!(node["url"], format!("ws://{}/ws", a.addr));
    assert_eq!(node["connections"], "1");
    assert_eq!(node["health"], "ok");
    let r2 = r.clone();
    let pttl = |key: &'static str| {
        let mut r = r2.clone();
        async move { redis::cmd("PTTL").arg(key).query_async::<i64>(&mut r).await.unwrap() }
    };
    let ttl = pttl("ringside:node:ka").await;
    assert!(ttl > 0 && ttl <= 3 * INTERVAL_MS as i64, "node TTL {ttl} ms");
    for shard in 0..2 {
        let pool: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(format!("ringside:pool:ka:{shard}")).query_async(&mut r).await.unwrap();
        for f in ["current", "max", "utilization", "health"] {
            assert!(pool.contains_key(f), "pool {shard} lacks {f}: {pool:?}");
        }
    }
    let ttl = pttl("ringside:pool:ka:1").await;
    assert!(ttl > 0 && ttl <= 3 * INTERVAL_MS as i64, "pool TTL {ttl} ms");
    let conn: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg("ringside:conn:carol").query_async(&mut r).await.unwrap();
    assert_eq!(conn.get("node").map(String::as_str), Some("ka"), "{conn:?}");
    assert_eq!(conn.get("shard"), Some(&carol.welcome["shard"].to_string()));
    assert!(conn.contains_key("connected_at"));
    let ttl = pttl("ringside:conn:carol").await;
    assert!(ttl > 0 && ttl <= 30 * INTERVAL_MS as i64, "conn TTL {ttl} ms");
    let aff: Option<String> = redis::cmd("GET").arg("ringside:affinity:carol").query_async(&mut r).await.unwrap();
    assert_eq!(aff.as_deref(), Some("ka"));
    let ttl = pttl("ringside:affinity:carol").await;
    assert!(ttl > 1_700_000 && ttl <= 1_800_000, "affinity TTL {ttl} ms (30 minutes)");
    let view = b.get_json("/cluster");
    let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 2, "{view}");
    assert!(nodes
        .iter()
        .all(|n| n["url"].is_string() && n["utilization"].is_number() && n["handshake_p99_us"].is_number()));
    assert_eq!(view["least_loaded"]["node"], "kb", "kb has no connections: {view}");
    // The sample: shards ping sampled connections; once carol has answered
    // (her client answers while it is read), her entry carries a round trip.
    assert!(carol.drain(Duration::from_millis(500)).await.is_empty());
    let sampled = eventually(Duration::from_secs(3), || {
        let mut r = r.clone();
        async move {
            let raw: Option<String> = redis::cmd("GET").arg("ringside:sample:ka").query_async(&mut r).await.unwrap();
            let entries: Vec<serde_json::Value> = raw.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
            entries
                .iter()
                .any(|e| e["client_id"] == "carol" && e["rtt_us"].as_u64().unwrap_or(0) > 0 && e["age_ms"].is_u64())
        }
    })
    .await;
    assert!(sampled, "ringside:sample:ka never showed carol with a measured round trip");
    assert!(pttl("ringside:sample:ka").await > 0, "the sample key expires by itself");
    // Leaving deletes the conn key in the next batch; affinity stays.
    carol.close().await;
    let gone = eventually(Duration::from_secs(2), || {
        let mut r = r.clone();
        async move { redis::cmd("EXISTS").arg("ringside:conn:carol").query_async::<i64>(&mut r).await.unwrap() == 0 }
    })
    .await;
    assert!(gone, "conn key not removed after the client left");
    assert!(pttl("ringside:affinity:carol").await > 1_700_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_on_another_node_gets_an_affinity_hint_and_is_served() {
    need_redis!();
    let redis = Redis::start();
    let (a, b) = (Node::start("fa", &redis.url()), Node::start("fb", &redis.url()));
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2
        })
        .await
    );
    let dan = Client::connect(&a, "dan").await;
    dan.close().await;
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS)).await;
    let mut dan = Client::connect(&b, "dan").await;
    let hint = dan.recv().await.expect("affinity hint");
    assert_eq!(hint, json!({"type": "affinity", "node": "fa", "url": format!("ws://{}/ws", a.addr)}));
    dan.send(json!({"type": "echo", "data": 7})).await;
    assert_eq!(dan.recv().await.expect("served")["data"], 7);
    // Back on its affinity node: no hint.
    dan.close().await;
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS)).await;
    let mut dan = Client::connect(&b, "dan").await;
    assert!(dan.drain(QUIET).await.is_empty(), "no hint on the affinity node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_expires_and_its_clients_work_elsewhere() {
    need_redis!();
    let redis = Redis::start();
    let mut a = Node::start("xa", &redis.url());
    let b = Node::start("xb", &redis.url());
    let c = Node::start("xc", &redis.url());
    let r = redis_conn(&redis.url()).await;
    let mut erin = Client::connect(&a, "erin").await;
    erin.join("r").await;
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS)).await;
    a.kill();
    let killed = Instant::now();
    let gone = eventually(Duration::from_secs(3), || {
        let mut r = r.clone();
        async move { redis::cmd("EXISTS").arg("ringside:node:xa").query_async::<i64>(&mut r).await.unwrap() == 0 }
    })
    .await;
    let took = killed.elapsed();
    assert!(gone && took <= Duration::from_millis(3 * INTERVAL_MS + 1000), "node key gone after {took:?}");
    assert!(erin.recv_within(Duration::from_secs(1)).await.is_none(), "erin's socket died with xa");
    // The survivors' views drop xa at their next registry read.
    let ok = eventually(Duration::from_secs(3), || async {
        b.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    assert!(ok, "xb's view still lists xa: {}", b.get("/cluster"));
    // erin reconnects to xb (no hint: its affinity node is dead); rooms and direct messages work there.
    let mut erin = Client::connect(&b, "erin").await;
    erin.join("r").await;
    let mut frank = Client::connect(&c, "frank").await;
    frank.join("r").await;
    both_subscribed(&redis, "r", 2).await;
    frank.publish("r", json!("hello erin")).await;
    let m = erin.recv().await.expect("room message on the new node");
    assert_eq!(m["data"], "hello erin");
    frank.direct("erin", json!("psst")).await;
    let m = erin.recv().await.expect("direct on the new node");
    assert_eq!(m, json!({"type": "direct", "from": "frank", "data": "psst"}));
    // The conn hash follows at xb's next sync (directs route by the sessions set).
    let moved = eventually(Duration::from_secs(2), || {
        let mut r = r.clone();
        async move {
            let conn: Option<String> =
                redis::cmd("HGET").arg("ringside:conn:erin").arg("node").query_async(&mut r).await.unwrap();
            conn.as_deref() == Some("xb")
        }
    })
    .await;
    assert!(moved, "ringside:conn:erin still names xa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_leaves_local_traffic_alone_and_recovers() {
    need_redis!();
    let mut redis = Redis::start();
    let (a, b) = (Node::start("oa", &redis.url()), Node::start("ob", &redis.url()));
    let mut a1 = Client::connect(&a, "a1").await;
    let mut a2 = Client::connect(&a, "a2").await;
    let mut b1 = Client::connect(&b, "b1").await;
    for c in [&mut a1, &mut a2, &mut b1] {
        c.join("r").await;
    }
    both_subscribed(&redis, "r", 2).await;
    redis.stop();
    assert!(eventually(Duration::from_secs(3), || async { a.breaker() != "closed" && b.breaker() != "closed" }).await);
    // Local traffic during the outage: rooms, echo, connects.
    for i in 0..20 {
        a1.publish("r", json!(i)).await;
    }
    let want: Vec<_> = (0..20).map(|i| json!(i)).collect();
    assert_eq!(room_data(&a2.drain(QUIET).await), want, "local delivery untouched");
    assert!(room_data(&b1.drain(QUIET).await).is_empty(), "nothing crosses while Redis is down");
    // The publisher is told, once per publish: its message did not reach the other nodes.
    let told = a1.drain(QUIET).await;
    assert_eq!(told.len(), 20, "{told:?}");
    assert!(told.iter().all(|e| e["code"] == "unavailable"), "{told:?}");
    // No subscription is confirmed while Redis is away, and /ready says so.
    assert_eq!(a.get_json("/ready")["cluster"]["unconfirmed_rooms"], 1, "{}", a.get("/ready"));
    let mut a3 = Client::connect(&a, "a3").await;
    a3.send(json!({"type": "echo", "data": "still here"})).await;
    assert_eq!(a3.recv().await.expect("echo")["data"], "still here");
    // Cross-node direct fails fast, and says why: b1 may well be online.
    let t0 = Instant::now();
    a1.direct("b1", json!(1)).await;
    let err = a1.recv().await.expect("an answer while Redis is down");
    assert_eq!(err["code"], "unavailable", "never unknown_client because Redis is away");
    assert!(t0.elapsed() < Duration::from_millis(500), "fail fast took {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    let back = Instant::now();
    let (ta, tb) = (a.wait_closed(Duration::from_secs(8)).await, b.wait_closed(Duration::from_secs(8)).await);
    assert!(ta.is_some() && tb.is_some(), "breakers closed: {ta:?} {tb:?}");
    assert!(back.elapsed() < Duration::from_secs(5), "back after {:?}", back.elapsed());
    // Re-registered: node keys, conn keys, room subscriptions (confirmed).
    both_subscribed(&redis, "r", 2).await;
    let confirmed =
        eventually(Duration::from_secs(2), || async { a.get_json("/ready")["cluster"]["unconfirmed_rooms"] == 0 })
            .await;
    assert!(confirmed, "{}", a.get("/ready"));
    let mut r = redis_conn(&redis.url()).await;
    let ok = eventually(Duration::from_secs(2), || {
        let mut r = r.clone();
        async move {
            let n: i64 = redis::cmd("EXISTS")
                .arg("ringside:node:oa")
                .arg("ringside:node:ob")
                .arg("ringside:conn:b1")
                .arg("ringside:conn:a3")
                .query_async(&mut r)
                .await
                .unwrap_or(0);
            n == 4
        }
    })
    .await;
    assert!(ok, "keys not re-registered");
    assert!(a.metric("ringside_cluster_reregistrations_total") >= 1.0);
    a1.publish("r", json!("after")).await;
    assert_eq!(room_data(&b1.drain(QUIET).await), vec![json!("after")], "cross-node delivery is back");
    b1.direct("a1", json!("hi again")).await;
    let m = a1.recv().await.expect("direct after recovery");
    assert_eq!(m["data"], "hi again");
    let _ = numsub(&mut r, "x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_per_client_across_nodes_the_newest_replaces_the_other_with_4000() {
    need_redis!();
    let redis = Redis::start();
    let (a, b) = (Node::start("sa", &redis.url()), Node::start("sb", &redis.url()));
    // Both nodes must see each other live before a replacement can cross.
    let both = || async { a.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2 };
    assert!(eventually(Duration::from_secs(5), both).await, "{}", a.get("/cluster"));
    let mut old = Client::connect(&a, "zed").await;
    let mut peer = Client::connect(&a, "yan").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut new = Client::connect(&b, "zed").await;
    assert_eq!(old.close_code(Duration::from_secs(3)).await, Some(4000), "the older session, on the other node");
    // The replacement is counted on both sides.
    assert!(
        eventually(Duration::from_secs(2), || async { b.metric("ringside_cluster_sessions_replaced_total") >= 1.0 })
            .await
    );
    assert_eq!(a.metric("ringside_cluster_remote_replacements_total"), 1.0);
    // The newest lives on and gets direct messages from the other node.
    peer.direct("zed", json!("still here?")).await;
    let m = new.recv().await.expect("direct to the surviving session");
    assert_eq!(m, json!({"type": "direct", "from": "yan", "data": "still here?"}));
    let r = redis_conn(&redis.url()).await;
    let ok = eventually(Duration::from_secs(2), || {
        let mut r = r.clone();
        async move {
            let m: Vec<String> =
                redis::cmd("ZRANGE").arg("ringside:sessions:zed").arg(0).arg(-1).query_async(&mut r).await.unwrap();
            m.len() == 1 && m[0].starts_with("sb|")
        }
    })
    .await;
    assert!(ok, "the sessions set keeps only sb's session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sessions_per_client_span_nodes_all_get_directs_and_the_oldest_goes_first() {
    need_redis!();
    let redis = Redis::start();
    let set = ["auth.sessions_per_client=2"];
    let (a, b) = (Node::start_with("ta", &redis.url(), &set), Node::start_with("tb", &redis.url(), &set));
    let both = || async { a.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2 };
    assert!(eventually(Duration::from_secs(5), both).await, "{}", a.get("/cluster"));
    let mut tab_a = Client::connect(&a, "uma").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tab_b = Client::connect(&b, "uma").await;
    let mut sender = Client::connect(&a, "vic").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Sent on a, where one tab is: that tab gets it locally, the other across.
    sender.direct("uma", json!(1)).await;
    let want = json!({"type": "direct", "from": "vic", "data": 1});
    assert_eq!(tab_a.recv().await, Some(want.clone()), "tab on the sender's node");
    assert_eq!(tab_b.recv().await, Some(want), "tab on the other node");
    assert!(tab_a.drain(QUIET).await.is_empty() && tab_b.drain(Duration::ZERO).await.is_empty(), "once each");
    // A third tab (on b) replaces the oldest, which is on a.
    let mut tab_b2 = Client::connect(&b, "uma").await;
    assert_eq!(tab_a.close_code(Duration::from_secs(3)).await, Some(4000));
    sender.direct("uma", json!(2)).await;
    let want = json!({"type": "direct", "from": "vic", "data": 2});
    assert_eq!(tab_b.recv().await, Some(want.clone()));
    assert_eq!(tab_b2.recv().await, Some(want));
    assert!(sender.drain(QUIET).await.is_empty(), "no unknown_client");
}

/// Joins `room` (with `since`): the messages before the `joined`, and the `joined`.
async fn join_since(c: &mut Client, room: &str, since: Option<(u64, &str)>) -> (Vec<Value>, Value) {
    let mut msg = json!({"type": "join", "room": room});
    if let Some((offset, epoch)) = since {
        msg["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send(msg).await;
    let mut before = Vec::new();
    loop {
        let m = c.recv().await.expect("an answer to the join");
        if m["type"] == "joined" {
            return (before, m);
        }
        before.push(m);
    }
}

/// The next `n` room messages' offsets and data.
async fn ordered(c: &mut Client, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = c.recv().await.unwrap_or_else(|| panic!("{} of {n} messages", out.len()));
        assert_eq!(m["type"], "message", "{m}");
        out.push((m["offset"].as_u64().expect("offset"), m["data"].clone()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rooms_have_one_order_across_nodes_and_recover_on_another_node_after_a_kill() {
    need_redis!();
    let redis = Redis::start();
    let set = ["rooms.history_size=1000"];
    let (mut a, b) = (Node::start_with("ha", &redis.url(), &set), Node::start_with("hb", &redis.url(), &set));
    let mut sub_a = Client::connect(&a, "sa").await;
    let mut sub_b = Client::connect(&b, "sb").await;
    let (_, ja) = join_since(&mut sub_a, "h", None).await;
    let (_, jb) = join_since(&mut sub_b, "h", None).await;
    assert_eq!((ja["offset"].as_u64(), &ja["epoch"]), (Some(0), &jb["epoch"]), "{ja} {jb}");
    let epoch = ja["epoch"].as_str().unwrap().to_string();
    both_subscribed(&redis, "h", 2).await;
    let mut pa = Client::connect(&a, "pa").await;
    let mut pb = Client::connect(&b, "pb").await;
    join_since(&mut pa, "h", None).await;
    join_since(&mut pb, "h", None).await;
    // Publishers on both nodes at once.
    let (p1, p2) = (&mut pa, &mut pb);
    tokio::join!(
        async {
            for i in 0..50 {
                p1.publish("h", json!(["a", i])).await;
            }
        },
        async {
            for i in 0..50 {
                p2.publish("h", json!(["b", i])).await;
            }
        }
    );
    let got_a = ordered(&mut sub_a, 100).await;
    let got_b = ordered(&mut sub_b, 100).await;
    assert_eq!(got_a.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=100).collect::<Vec<u64>>());
    assert_eq!(got_a, got_b, "one order on both nodes");
    // pa gets pb's 50 but none of its own.
    let own = ordered(&mut pa, 50).await;
    assert!(own.iter().all(|m| m.1[0] == "b"));
    // sub_a's node dies; 20 more are published on b; sub_a comes back on b.
    a.kill();
    for i in 0..20 {
        pb.publish("h", json!(["after", i])).await;
    }
    // All 20 numbered (sub_b has them) before sub_a comes back.
    assert_eq!(ordered(&mut sub_b, 20).await.last().map(|m| m.0), Some(120));
    let mut back = Client::connect(&b, "sa").await;
    let (missed, joined) = join_since(&mut back, "h", Some((100, &epoch))).await;
    let missed: Vec<u64> = missed.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(missed, (101..=120).collect::<Vec<u64>>(), "what it missed, from Redis");
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(true), Some(120)), "{joined}");
    pb.publish("h", json!("live")).await;
    assert_eq!(ordered(&mut back, 1).await[0].0, 121);
    assert!(back.drain(QUIET).await.is_empty(), "nothing twice");
    // An epoch Redis never gave: not recovered.
    let mut other = Client::connect(&b, "sc").await;
    let (m, j) = join_since(&mut other, "h", Some((3, "feedbeef"))).await;
    assert!(m.is_empty() && j["recovered"] == false, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_across_nodes_while_publishing_goes_on_has_no_gap_and_no_duplicate() {
    need_redis!();
    let redis = Redis::start();
    let set = ["rooms.history_size=5000"];
    let (a, b) = (Node::start_with("ra2", &redis.url(), &set), Node::start_with("rb2", &redis.url(), &set));
    let mut sub = Client::connect(&a, "w").await;
    let (_, j) = join_since(&mut sub, "busy", None).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    let mut pubs = [Client::connect(&a, "p1").await, Client::connect(&b, "p2").await];
    for p in pubs.iter_mut() {
        join_since(p, "busy", None).await;
    }
    for p in pubs.iter_mut() {
        for i in 0..10 {
            p.publish("busy", json!(i)).await;
        }
    }
    let first = ordered(&mut sub, 20).await;
    assert_eq!(first.last().map(|m| m.0), Some(20));
    sub.close().await;
    let sends = pubs.iter_mut().map(|p| async move {
        for i in 0..200 {
            p.publish("busy", json!(i)).await;
        }
    });
    let rejoin = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut c = Client::connect(&b, "w").await;
        let (missed, joined) = join_since(&mut c, "busy", Some((20, &epoch))).await;
        (c, missed, joined)
    };
    let (_, (mut c, missed, joined)) = tokio::join!(futures_util::future::join_all(sends), rejoin);
    assert_eq!(joined["recovered"], true, "{joined}");
    let at = joined["offset"].as_u64().unwrap();
    let missed: Vec<u64> = missed.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(missed, (21..=at).collect::<Vec<u64>>());
    let rest: Vec<u64> = ordered(&mut c, (420 - at) as usize).await.into_iter().map(|m| m.0).collect();
    assert_eq!(rest, (at + 1..=420).collect::<Vec<u64>>(), "live after the answer: none lost, none twice");
    assert!(c.drain(QUIET).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_publish_during_a_redis_outage_answers_unavailable() {
    need_redis!();
    let mut redis = Redis::start();
    let set = ["rooms.history_size=10"];
    let a = Node::start_with("ua", &redis.url(), &set);
    let mut c = Client::connect(&a, "u").await;
    join_since(&mut c, "h", None).await;
    redis.stop();
    assert!(eventually(Duration::from_secs(3), || async { a.breaker() != "closed" }).await);
    c.publish("h", json!(1)).await;
    let e = c.recv().await.expect("an answer");
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
}

/// `{"type":"presence","room":R}`'s client list.
async fn presence_of(c: &mut Client, room: &str) -> Vec<String> {
    c.send(json!({"type": "presence", "room": room})).await;
    loop {
        let m = c.recv().await.expect("a presence answer");
        if m["type"] == "presence" {
            return m["clients"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_events_cross_and_a_killed_node_drops_out() {
    need_redis!();
    let redis = Redis::start();
    let set = ["rooms.presence_events=p.*"];
    let (a, mut b) = (Node::start_with("pa", &redis.url(), &set), Node::start_with("pb", &redis.url(), &set));
    let both = || async { a.get_json("/cluster")["nodes"].as_array().map_or(0, Vec::len) == 2 };
    assert!(eventually(Duration::from_secs(5), both).await);
    let mut ann = Client::connect(&a, "ann").await;
    ann.join("p.room").await;
    both_subscribed(&redis, "p.room", 1).await;
    let mut ben = Client::connect(&b, "ben").await;
    ben.join("p.room").await;
    // ann (on a) hears ben joining on b.
    let ev = ann.recv().await.expect("presence_join across nodes");
    assert_eq!(ev, json!({"type": "presence_join", "room": "p.room", "client_id": "ben"}));
    let mut view = Vec::new();
    for _ in 0..20 {
        view = presence_of(&mut ann, "p.room").await;
        if view == ["ann", "ben"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view, ["ann", "ben"], "both nodes' members");
    // b dies: its entries go within its registry TTL (3 intervals).
    b.kill();
    let killed = Instant::now();
    loop {
        view = presence_of(&mut ann, "p.room").await;
        if view == ["ann"] || killed.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(view, ["ann"], "ben's entry outlived b by {:?}", killed.elapsed());
    assert!(killed.elapsed() <= Duration::from_millis(4 * INTERVAL_MS + 1000), "{:?}", killed.elapsed());
    drop(ben);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_subscription_missed_is_fetched_from_the_stream_before_newer_ones() {
    need_redis!();
    let redis = Redis::start();
    let set = ["rooms.history_size=100"];
    let (a, b) = (Node::start_with("ga", &redis.url(), &set), Node::start_with("gb", &redis.url(), &set));
    let mut member = Client::connect(&a, "m").await;
    join_since(&mut member, "g", None).await;
    both_subscribed(&redis, "g", 1).await;
    let mut publisher = Client::connect(&b, "p").await;
    join_since(&mut publisher, "g", None).await;
    both_subscribed(&redis, "g", 2).await;
    publisher.publish("g", json!("first")).await;
    assert_eq!(ordered(&mut member, 1).await[0], (1, json!("first")));
    // A message numbered and kept but never heard on the channel (as if the
    // subscription had dropped it): offset 2 exists only in the stream.
    let mut r = redis_conn(&redis.url()).await;
    let lost = json!({"type": "message", "room": "g", "from": "ghost", "data": "lost", "offset": 2}).to_string();
    let _: i64 = redis::cmd("HINCRBY")
        .arg("ringside:seq:{ringside:room:g}")
        .arg("last")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("ringside:history:{ringside:room:g}")
        .arg("*")
        .arg("o")
        .arg(2)
        .arg("m")
        .arg(&lost)
        .query_async(&mut r)
        .await
        .unwrap();
    // The next one (3) shows the gap: node ga fetches 2 first.
    publisher.publish("g", json!("third")).await;
    assert_eq!(ordered(&mut member, 2).await, vec![(2, json!("lost")), (3, json!("third"))]);
    assert!(member.drain(QUIET).await.is_empty(), "nothing twice");
    let m: Vec<String> = a.get("/metrics").lines().filter(|l| l.contains("history")).map(String::from).collect();
    assert_eq!(a.metric("ringside_cluster_history_repaired_total"), 2.0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_history_visibly_never_silently() {
    need_redis!();
    let mut redis = Redis::start();
    let set = ["rooms.history_size=100"];
    let (a, b) = (Node::start_with("za", &redis.url(), &set), Node::start_with("zb", &redis.url(), &set));
    let mut member = Client::connect(&a, "m").await;
    let (_, joined) = join_since(&mut member, "z", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    let mut publisher = Client::connect(&b, "p").await;
    join_since(&mut publisher, "z", None).await;
    both_subscribed(&redis, "z", 2).await;
    for i in 0..3 {
        publisher.publish("z", json!(i)).await;
    }
    assert_eq!(ordered(&mut member, 3).await.last().map(|m| m.0), Some(3));
    // Redis comes back empty (no persistence): the room's history and epoch are gone.
    redis.stop();
    redis.restart();
    for n in [&a, &b] {
        assert!(n.wait_closed(Duration::from_secs(10)).await.is_some(), "breaker closes again");
    }
    both_subscribed(&redis, "z", 2).await;
    let mut sent = false;
    for _ in 0..20 {
        publisher.publish("z", json!("after")).await;
        if let Some(m) = member.recv_within(Duration::from_millis(300)).await {
            // The offsets start over: the jump backwards is the client's sign to resync.
            assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(1), &json!("after")), "{m}");
            sent = true;
            break;
        }
    }
    assert!(sent, "no message after the restart");
    let mut late = Client::connect(&a, "late").await;
    let (missed, j) = join_since(&mut late, "z", Some((3, &epoch))).await;
    assert!(missed.is_empty() && j["recovered"] == false && j["epoch"] != epoch.as_str(), "{j}");
    assert!(a.metric("ringside_cluster_history_gaps_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_keeps_in_redis_comes_back_after_it_is_lost() {
    need_redis!();
    let redis = Redis::start();
    // A full rewrite every 5 intervals (1 s) instead of 60.
    let a = Node::start_with("ka2", &redis.url(), &["cluster.reconcile_intervals=5"]);
    let mut c = Client::connect(&a, "kept").await;
    c.join("kr").await;
    let r = redis_conn(&redis.url()).await;
    let present = |key: &'static str| {
        let r = r.clone();
        move || {
            let mut r = r.clone();
            async move { redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut r).await.unwrap() == 1 }
        }
    };
    let keys = ["ringside:conn:kept", "ringside:sessions:kept", "ringside:presence:{ringside:room:kr}"];
    for k in keys {
        assert!(eventually(Duration::from_secs(3), present(k)).await, "{k} written");
    }
    // Lost in Redis (a failover to a replica that missed them, a hand edit).
    let mut w = r.clone();
    let _: i64 = redis::cmd("DEL").arg(&keys[..]).query_async(&mut w).await.unwrap();
    for k in keys {
        assert!(eventually(Duration::from_secs(4), present(k)).await, "{k} came back");
    }
    drop(c);
}
