//! Room history and recovery on one node, over real sockets with
//! tokio-tungstenite: offsets in one order per room across shards, `joined`
//! with offset and epoch, recovery after a reconnect with no gap and no
//! duplicate (also while others keep publishing), and the answers when the
//! gap cannot be recovered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A node with 4 shards and history on every room (`size` messages).
fn node(size: usize) -> NodeProc {
    let size = format!("rooms.history_size={size}");
    NodeProc::start(&["--shards", "4", "--set", "server.pin_cores=false", "--set", &size])
}

/// Joins `room` (with `since`, if given): the messages delivered before the
/// `joined`, and the `joined`.
async fn join(ws: &mut Ws, room: &str, since: Option<(u64, &str)>) -> (Vec<Value>, Value) {
    let mut msg = json!({"type": "join", "room": room});
    if let Some((offset, epoch)) = since {
        msg["since"] = json!({"offset": offset, "epoch": epoch});
    }
    send_json(ws, msg).await;
    let mut before = Vec::new();
    loop {
        let m = next_json(ws).await;
        if m["type"] == "joined" {
            return (before, m);
        }
        before.push(m);
    }
}

async fn publish(ws: &mut Ws, room: &str, data: Value) {
    send_json(ws, json!({"type": "publish", "room": room, "data": data})).await;
}

/// The next `n` room messages (fails on anything else).
async fn messages(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = next_json(ws).await;
        assert_eq!(m["type"], "message", "{m}");
        out.push(m);
    }
    out
}

/// Waits until `room`'s sequencer has handed out offset `want`: a probe
/// client joins and leaves until its `joined` says so. A publish is sent
/// without an answer and goes to the room's home shard; a later join from
/// another shard reaches it through another mailbox, so the test must not
/// assume the publishes got there first.
async fn sequenced(node: &NodeProc, room: &str, want: u64) {
    let (mut probe, _) = rooms_client(node, "sequenced-probe").await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, joined) = join(&mut probe, room, None).await;
        send_json(&mut probe, json!({"type": "leave", "room": room})).await;
        while next_json(&mut probe).await["type"] != "left" {}
        let at = joined["offset"].as_u64().unwrap_or_else(|| panic!("no offset: {joined}"));
        if at >= want {
            return;
        }
        assert!(Instant::now() < end, "{room} at offset {at}, never {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn offsets(ms: &[Value]) -> Vec<u64> {
    ms.iter().map(|m| m["offset"].as_u64().unwrap_or_else(|| panic!("no offset: {m}"))).collect()
}

/// A client connected to the shard `want` (ids are spread over shards by
/// the kernel's hash of the connection, so reconnect until it lands there).
async fn on_shard(node: &NodeProc, id: &str, want: u64) -> Ws {
    for _ in 0..200 {
        let (ws, welcome) = rooms_client(node, id).await;
        if welcome["shard"].as_u64() == Some(want) {
            return ws;
        }
        drop(ws);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never landed on shard {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_per_room_across_shards_with_offsets_and_epoch() {
    let node = node(100);
    let mut subs = Vec::new();
    for s in 0..4 {
        let mut ws = on_shard(&node, &format!("sub{s}"), s).await;
        let (before, joined) = join(&mut ws, "h", None).await;
        assert!(before.is_empty());
        assert_eq!(joined["offset"], 0, "{joined}");
        assert!(joined["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{joined}");
        assert!(joined.get("recovered").is_none(), "no recovery asked: {joined}");
        subs.push((ws, joined["epoch"].clone()));
    }
    assert!(subs.iter().all(|(_, e)| *e == subs[0].1), "one epoch per room");
    // Publishers on every shard, all at once: 4 × 25 messages.
    let mut pubs = Vec::new();
    for s in 0..4 {
        let mut ws = on_shard(&node, &format!("pub{s}"), s).await;
        join(&mut ws, "h", None).await;
        pubs.push(ws);
    }
    let sends = pubs.iter_mut().enumerate().map(|(p, ws)| async move {
        for i in 0..25 {
            publish(ws, "h", json!([p, i])).await;
        }
    });
    futures_util::future::join_all(sends).await;
    let mut orders = Vec::new();
    for (ws, _) in subs.iter_mut() {
        let got = messages(ws, 100).await;
        assert_eq!(offsets(&got), (1..=100).collect::<Vec<u64>>(), "contiguous, in order");
        orders.push(got.iter().map(|m| m["data"].clone()).collect::<Vec<_>>());
        expect_silence(ws, 100).await;
    }
    assert!(orders.iter().all(|o| *o == orders[0]), "every shard's members see the same order");
    // Each publisher's own messages are in its sending order.
    for p in 0..4 {
        let mine: Vec<u64> = orders[0].iter().filter(|d| d[0] == p).map(|d| d[1].as_u64().unwrap()).collect();
        assert_eq!(mine, (0..25).collect::<Vec<u64>>());
    }
    // A publisher does not get its own messages, but gets the others' 75.
    let got = messages(&mut pubs[0], 75).await;
    assert!(got.iter().all(|m| m["data"][0] != 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_since_gets_what_it_missed_then_live_ones_once() {
    let node = node(1000);
    let (mut publisher, _) = rooms_client(&node, "p").await;
    join(&mut publisher, "r", None).await;
    let (mut sub, _) = rooms_client(&node, "s").await;
    let (_, joined) = join(&mut sub, "r", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    for i in 0..5 {
        publish(&mut publisher, "r", json!(i)).await;
    }
    let seen = messages(&mut sub, 5).await;
    let last = *offsets(&seen).last().unwrap();
    assert_eq!(last, 5);
    drop(sub);
    for i in 5..10 {
        publish(&mut publisher, "r", json!(i)).await;
    }
    sequenced(&node, "r", 10).await;
    // Back (possibly on another shard), from offset 5.
    let (mut sub, _) = rooms_client(&node, "s2").await;
    let (missed, joined) = join(&mut sub, "r", Some((last, &epoch))).await;
    assert_eq!(offsets(&missed), vec![6, 7, 8, 9, 10]);
    assert_eq!(missed.iter().map(|m| m["data"].as_u64().unwrap()).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9]);
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(true), Some(10)), "{joined}");
    publish(&mut publisher, "r", json!("live")).await;
    let live = messages(&mut sub, 1).await;
    assert_eq!((live[0]["offset"].as_u64(), &live[0]["data"]), (Some(11), &json!("live")));
    expect_silence(&mut sub, 150).await;
    assert_eq!(node.metric("ringside_room_recoveries_total{outcome=\"recovered\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_while_others_keep_publishing_has_no_gap_and_no_duplicate() {
    let node = node(5000);
    let (mut sub, _) = rooms_client(&node, "watcher").await;
    let (_, joined) = join(&mut sub, "busy", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    let mut pubs = Vec::new();
    for p in 0..3 {
        let (mut ws, _) = rooms_client(&node, &format!("pub{p}")).await;
        join(&mut ws, "busy", None).await;
        pubs.push(ws);
    }
    // 3 × 20 before the subscriber leaves.
    for ws in pubs.iter_mut() {
        for i in 0..20 {
            publish(ws, "busy", json!(i)).await;
        }
    }
    let first = messages(&mut sub, 60).await;
    let last = *offsets(&first).last().unwrap();
    assert_eq!(last, 60);
    drop(sub);
    // The publishers keep going (3 × 300) while the subscriber comes back
    // and recovers: the join lands somewhere in the middle of that stream.
    let sends = pubs.iter_mut().map(|ws| async move {
        for i in 0..300 {
            publish(ws, "busy", json!(i)).await;
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let rejoin = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (mut sub, _) = rooms_client(&node, "watcher2").await;
        let (missed, joined) = join(&mut sub, "busy", Some((last, &epoch))).await;
        (sub, missed, joined)
    };
    let (_, (mut sub, missed, joined)) = tokio::join!(futures_util::future::join_all(sends), rejoin);
    assert_eq!(joined["recovered"], true, "{joined}");
    let at_join = joined["offset"].as_u64().unwrap();
    assert_eq!(offsets(&missed), (last + 1..=at_join).collect::<Vec<u64>>(), "the gap, exactly");
    let rest = messages(&mut sub, (960 - at_join) as usize).await;
    assert_eq!(offsets(&rest), (at_join + 1..=960).collect::<Vec<u64>>(), "then live, none twice, none lost");
    expect_silence(&mut sub, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_that_left_the_history_or_another_epoch_is_not_recovered() {
    let node = node(3);
    let (mut publisher, _) = rooms_client(&node, "p").await;
    let (_, joined) = join(&mut publisher, "small", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    for i in 0..6 {
        publish(&mut publisher, "small", json!(i)).await;
    }
    sequenced(&node, "small", 6).await;
    // Kept: 4, 5, 6. From 3: all of the gap is kept.
    let (mut a, _) = rooms_client(&node, "a").await;
    let (missed, joined) = join(&mut a, "small", Some((3, &epoch))).await;
    assert_eq!((offsets(&missed), joined["recovered"].as_bool()), (vec![4, 5, 6], Some(true)));
    // From 2: message 3 is gone.
    let (mut b, _) = rooms_client(&node, "b").await;
    let (missed, joined) = join(&mut b, "small", Some((2, &epoch))).await;
    assert!(missed.is_empty());
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(false), Some(6)), "{joined}");
    // Another epoch (the node restarted, say): nothing from it applies.
    let (mut c, _) = rooms_client(&node, "c").await;
    let (missed, joined) = join(&mut c, "small", Some((5, "0123abcd"))).await;
    assert!(missed.is_empty() && joined["recovered"] == false, "{joined}");
    assert_eq!(node.metric("ringside_room_recoveries_total{outcome=\"unrecovered\"}"), 2.0);
    // A bad `since` is a bad message; the connection stays.
    send_json(&mut c, json!({"type": "join", "room": "small", "since": {"offset": "x"}})).await;
    assert_eq!(next_json(&mut c).await["code"], "bad_json");
    assert!(node.metric("ringside_room_history_messages") <= 3.0);
}

#[tokio::test]
async fn rooms_without_history_carry_no_offset_and_cannot_recover() {
    // Per-pattern rules come from the config file.
    let path = std::env::temp_dir().join(format!("ringside-history-{}.toml", std::process::id()));
    std::fs::write(&path, "[[rooms.history_rules]]\npattern = \"kept.*\"\nsize = 10\n").unwrap();
    let node = NodeProc::start(&["--shards", "2", "--config", path.to_str().unwrap()]);
    let (mut a, _) = rooms_client(&node, "a").await;
    let (mut b, _) = rooms_client(&node, "b").await;
    for ws in [&mut a, &mut b] {
        let (_, joined) = join(ws, "plain", None).await;
        assert_eq!(joined, json!({"type": "joined", "room": "plain"}));
    }
    publish(&mut a, "plain", json!(1)).await;
    let m = next_json(&mut b).await;
    assert!(m.get("offset").is_none(), "{m}");
    let (_, joined) = join(&mut b, "plain2", Some((1, "abc"))).await;
    assert_eq!(joined["recovered"], false);
    // The pattern's rooms have history.
    let (_, joined) = join(&mut b, "kept.x", None).await;
    assert_eq!(joined["offset"], 0, "{joined}");
    let (_, _) = join(&mut a, "kept.x", None).await;
    publish(&mut a, "kept.x", json!(2)).await;
    assert_eq!(next_json(&mut b).await["offset"], 1);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_the_send_queue_allows_is_refused_not_cut() {
    let node = NodeProc::start(&[
        "--shards",
        "2",
        "--set",
        "rooms.history_size=1000",
        "--set",
        "websocket.send_queue_bytes=8192",
    ]);
    let (mut p, _) = rooms_client(&node, "p").await;
    let (_, j) = join(&mut p, "big", None).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    // 200 messages of ~80 bytes: ~16 KB, more than half of the 8 KiB queue.
    for i in 0..200 {
        publish(&mut p, "big", json!(format!("message {i:04}"))).await;
    }
    sequenced(&node, "big", 200).await;
    let (mut late, _) = rooms_client(&node, "late").await;
    let (missed, joined) = join(&mut late, "big", Some((0, &epoch))).await;
    assert!(missed.is_empty(), "nothing partial: {} messages", missed.len());
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(false), Some(200)), "{joined}");
    // A smaller gap still recovers.
    let (mut near, _) = rooms_client(&node, "near").await;
    let (missed, joined) = join(&mut near, "big", Some((190, &epoch))).await;
    assert_eq!((missed.len(), joined["recovered"].as_bool()), (10, Some(true)));
}
