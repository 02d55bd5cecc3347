//! Presence on one node, over real sockets with tokio-tungstenite: who is
//! in a room (across shards), and `presence_join` / `presence_leave` for
//! rooms in `rooms.presence_events` when a client id's first session joins
//! and its last leaves.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn join(ws: &mut Ws, room: &str) {
    send_json(ws, json!({"type": "join", "room": room})).await;
    let m = next_json(ws).await;
    assert_eq!(m["type"], "joined", "{m}");
}

/// Within `ms`, at most a `presence_join` about `client` arrives.
async fn no_event_but_maybe(ws: &mut Ws, ms: u64, client: &str) {
    let end = tokio::time::Instant::now() + std::time::Duration::from_millis(ms);
    while let Ok(Some(m)) = tokio::time::timeout_at(end, ws.next()).await {
        let Message::Text(t) = m.expect("websocket error") else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(v, json!({"type": "presence_join", "room": "ev.1", "client_id": client}));
    }
}

async fn who(ws: &mut Ws, room: &str) -> Value {
    send_json(ws, json!({"type": "presence", "room": room})).await;
    let m = next_json(ws).await;
    assert_eq!((m["type"].as_str(), m["room"].as_str()), (Some("presence"), Some(room)), "{m}");
    m["clients"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_clients_across_shards_and_events_follow_first_and_last_sessions() {
    let node = NodeProc::start(&[
        "--shards",
        "4",
        "--set",
        "server.pin_cores=false",
        "--set",
        "rooms.presence_events=ev.*",
        "--set",
        "auth.sessions_per_client=2",
    ]);
    let (mut a, _) = rooms_client(&node, "amy").await;
    let (mut b, _) = rooms_client(&node, "bo").await;
    join(&mut a, "ev.1").await;
    join(&mut b, "ev.1").await;
    assert_eq!(next_json(&mut a).await, json!({"type": "presence_join", "room": "ev.1", "client_id": "bo"}));
    // Nothing about itself. amy's join, ordered on the room's home shard,
    // may still reach bo, who joined right after it (docs/protocol.md).
    no_event_but_maybe(&mut b, 150, "amy").await;
    // A second session of amy (another tab): present already, no event.
    let (mut a2, _) = rooms_client(&node, "amy").await;
    join(&mut a2, "ev.1").await;
    expect_silence(&mut b, 150).await;
    assert_eq!(who(&mut b, "ev.1").await, json!(["amy", "bo"]));
    // One of amy's sessions leaves: still present. The last: presence_leave.
    send_json(&mut a, json!({"type": "leave", "room": "ev.1"})).await;
    assert_eq!(next_json(&mut a).await["type"], "left");
    expect_silence(&mut b, 150).await;
    drop(a2);
    assert_eq!(next_json(&mut b).await, json!({"type": "presence_leave", "room": "ev.1", "client_id": "amy"}));
    assert_eq!(who(&mut b, "ev.1").await, json!(["bo"]));
    // A room outside presence_events: the query works, no events.
    let (mut c, _) = rooms_client(&node, "cy").await;
    join(&mut b, "quiet").await;
    join(&mut c, "quiet").await;
    expect_silence(&mut b, 150).await;
    assert_eq!(who(&mut c, "quiet").await, json!(["bo", "cy"]));
    assert_eq!(who(&mut c, "nobody.here").await, json!([]));
    // A bad room name is an error, the connection stays.
    send_json(&mut c, json!({"type": "presence", "room": "no spaces"})).await;
    assert_eq!(next_json(&mut c).await["code"], "bad_room");
}
