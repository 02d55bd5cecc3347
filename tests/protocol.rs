//! The wire behaviour of `/echo` and `/ws` across shards, with
//! tokio-tungstenite as the client.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn echo_text_binary_empty_and_large() {
    let node = NodeProc::start(&[
        "--shards",
        "2",
        "--set",
        "websocket.max_message_bytes=2097152",
        "--set",
        "websocket.max_frame_bytes=2097152",
    ]);
    let mut ws = connect(&node.url("/echo")).await;
    let big: String = (0..1_048_576).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let msgs = vec![
        Message::Text("hello".into()),
        Message::Binary(vec![0u8, 1, 2, 255].into()),
        Message::Text("".into()),
        Message::Binary(Vec::new().into()),
        Message::Text("ünïcødé ✓".into()),
        Message::Text(big.clone().into()),
        Message::Binary(big.clone().into_bytes().into()),
    ];
    for (i, m) in msgs.into_iter().enumerate() {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert!(back == m, "message {i} ({} bytes) came back as {:.100}", m.len(), format!("{back:?}"));
    }
    // Many in flight, order kept.
    for i in 0..500 {
        ws.feed(Message::Text(format!("m{i}").into())).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..500 {
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back, Message::Text(format!("m{i}").into()));
    }
    ws.close(None).await.unwrap();
}

/// Opens clients until both shards have at least `per_shard` of them.
async fn clients_on_both_shards(node: &NodeProc, prefix: &str, per_shard: usize) -> Vec<(Ws, String, u64)> {
    let mut out = Vec::new();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for i in 0..400 {
        let id = format!("{prefix}{i}");
        let (ws, w) = rooms_client(node, &id).await;
        let shard = w["shard"].as_u64().unwrap();
        *counts.entry(shard).or_default() += 1;
        out.push((ws, id, shard));
        if counts.len() == 2 && counts.values().all(|c| *c >= per_shard) {
            return out;
        }
    }
    panic!("SO_REUSEPORT never spread clients over both shards: {counts:?}");
}

#[tokio::test]
async fn rooms_span_shards_sender_excluded_leave_stops_delivery() {
    let node = NodeProc::start(&["--shards", "2"]);
    let mut clients = clients_on_both_shards(&node, "m", 3).await;
    for (ws, _, _) in clients.iter_mut() {
        send_json(ws, json!({"type":"join","room":"lobby"})).await;
        assert_eq!(next_json(ws).await, json!({"type":"joined","room":"lobby"}));
    }
    // Publish from one client on each shard; everyone else gets exactly one copy.
    let publishers: Vec<usize> = [0u64, 1].iter().map(|s| clients.iter().position(|c| c.2 == *s).unwrap()).collect();
    for (k, &p) in publishers.iter().enumerate() {
        let from = clients[p].1.clone();
        send_json(&mut clients[p].0, json!({"type":"publish","room":"lobby","data":{"k":k,"s":"x"}})).await;
        for (i, (ws, _, _)) in clients.iter_mut().enumerate() {
            if i == p {
                continue;
            }
            let m = next_json(ws).await;
            assert_eq!(m, json!({"type":"message","room":"lobby","from":from,"data":{"k":k,"s":"x"}}));
        }
        expect_silence(&mut clients[p].0, 200).await;
    }
    for (ws, _, _) in clients.iter_mut() {
        expect_silence(ws, 50).await; // no duplicates
    }
    // Leave: the leaver gets nothing more, the rest still do.
    let leaver = publishers[1];
    send_json(&mut clients[leaver].0, json!({"type":"leave","room":"lobby"})).await;
    assert_eq!(next_json(&mut clients[leaver].0).await, json!({"type":"left","room":"lobby"}));
    send_json(&mut clients[publishers[0]].0, json!({"type":"publish","room":"lobby","data":1})).await;
    for (i, (ws, _, _)) in clients.iter_mut().enumerate() {
        if i == leaver || i == publishers[0] {
            expect_silence(ws, 300).await;
        } else {
            assert_eq!(next_json(ws).await["data"], 1);
        }
    }
    assert!(node.metric_sum("ringside_cross_shard_sent_total") >= 2.0);
}

#[tokio::test]
async fn publish_order_is_kept_per_publisher_across_shards() {
    let node = NodeProc::start(&["--shards", "2"]);
    let mut clients = clients_on_both_shards(&node, "o", 1).await;
    for (ws, _, _) in clients.iter_mut() {
        send_json(ws, json!({"type":"join","room":"seq"})).await;
        next_json(ws).await;
    }
    let p = clients.iter().position(|c| c.2 == 0).unwrap();
    for n in 0..300 {
        clients[p]
            .0
            .feed(Message::Text(json!({"type":"publish","room":"seq","data":n}).to_string().into()))
            .await
            .unwrap();
    }
    clients[p].0.flush().await.unwrap();
    for (i, (ws, _, _)) in clients.iter_mut().enumerate() {
        if i != p {
            for n in 0..300 {
                assert_eq!(next_json(ws).await["data"], n);
            }
        }
    }
}

#[tokio::test]
async fn direct_across_shards_and_unknown_target() {
    let node = NodeProc::start(&["--shards", "2"]);
    let mut clients = clients_on_both_shards(&node, "d", 1).await;
    let a = clients.iter().position(|c| c.2 == 0).unwrap();
    let b = clients.iter().position(|c| c.2 == 1).unwrap();
    let (a_id, b_id) = (clients[a].1.clone(), clients[b].1.clone());
    send_json(&mut clients[a].0, json!({"type":"direct","to":b_id,"data":{"hi":true}})).await;
    assert_eq!(next_json(&mut clients[b].0).await, json!({"type":"direct","from":a_id,"data":{"hi":true}}));
    send_json(&mut clients[b].0, json!({"type":"direct","to":a_id,"data":[1,2]})).await;
    assert_eq!(next_json(&mut clients[a].0).await, json!({"type":"direct","from":b_id,"data":[1,2]}));
    send_json(&mut clients[a].0, json!({"type":"direct","to":"nobody-here","data":1})).await;
    let e = next_json(&mut clients[a].0).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unknown_client")));
}

#[tokio::test]
async fn echo_ping_generated_ids_and_errors_keep_connection_open() {
    let node = NodeProc::start(&[
        "--shards",
        "2",
        "--set",
        "rooms.max_payload_bytes=100",
        "--set",
        "rooms.max_rooms_per_connection=2",
    ]);
    let mut ws = connect(&node.url("/ws")).await;
    let w = next_json(&mut ws).await;
    let id = w["client_id"].as_str().unwrap();
    assert!(
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert!(w["node"].is_string() && w["shard"].is_u64());
    send_json(&mut ws, json!({"type":"echo","data":{"a":[1,"two",null]}})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"echo","data":{"a":[1,"two",null]}}));
    send_json(&mut ws, json!({"type":"ping","id":"x1"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":"x1"}));
    let cases = [
        (Message::Text("not json".into()), "bad_json"),
        (Message::Text(r#"{"type":"fly"}"#.into()), "unknown_type"),
        (Message::Text(r#"{"type":"join"}"#.into()), "missing_field"),
        (Message::Text(r#"{"type":"join","room":"has space"}"#.into()), "bad_room"),
        (Message::Text(format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(129)).into()), "bad_room"),
        (Message::Text(r#"{"type":"direct","to":"bad id!"}"#.into()), "bad_client_id"),
        (Message::Text(format!(r#"{{"type":"publish","room":"r","data":"{}"}}"#, "x".repeat(200)).into()), "too_large"),
        (Message::Binary(vec![1, 2, 3].into()), "binary_not_supported"),
    ];
    for (msg, code) in cases {
        ws.send(msg).await.unwrap();
        let e = next_json(&mut ws).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    for r in ["a", "b"] {
        send_json(&mut ws, json!({"type":"join","room":r})).await;
        next_json(&mut ws).await;
    }
    send_json(&mut ws, json!({"type":"join","room":"c"})).await;
    assert_eq!(next_json(&mut ws).await["code"], "too_many_rooms");
    // Still open and working after all of that.
    send_json(&mut ws, json!({"type":"ping","id":2})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"pong","id":2}));
    assert_eq!(node.metric("ringside_client_errors_total{code=\"bad_room\"}"), 2.0);
    assert_eq!(node.metric("ringside_client_errors_total{code=\"too_many_rooms\"}"), 1.0);
}

#[tokio::test]
async fn same_client_id_replaces_the_older_connection() {
    let node = NodeProc::start(&["--shards", "2"]);
    let (mut old, _) = rooms_client(&node, "dup").await;
    let (mut new, _) = rooms_client(&node, "dup").await;
    assert_eq!(close_code(&mut old, Duration::from_secs(5)).await, 4000);
    // Direct messages now reach the new one.
    let (mut other, _) = rooms_client(&node, "other").await;
    send_json(&mut other, json!({"type":"direct","to":"dup","data":"x"})).await;
    assert_eq!(next_json(&mut new).await["data"], "x");
    // The replaced connection closing later does not unregister the new one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_json(&mut other, json!({"type":"direct","to":"dup","data":"y"})).await;
    assert_eq!(next_json(&mut new).await["data"], "y");
    assert!(node.eventually_metric("ringside_connections_closed_total{code=\"4000\"}", 1.0));
}

#[tokio::test]
async fn client_id_from_header() {
    let node = NodeProc::start(&["--shards", "1"]);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = node.url("/ws").into_client_request().unwrap();
    req.headers_mut().insert("X-Client-Id", "from_header".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_json(&mut ws).await["client_id"], "from_header");
}

#[tokio::test]
async fn health_ready_metrics() {
    let node = NodeProc::start(&["--shards", "2", "--node-id", "n-test"]);
    let (s, body) = node.get("/health");
    assert_eq!(s, 200);
    assert!(body.ends_with("ok\n"));
    let (s, body) = node.get("/ready");
    assert_eq!(s, 200);
    assert!(body.contains("\"status\":\"ready\""), "{body}");
    let mut ws = connect(&node.url("/echo")).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let (s, text) = node.get("/metrics");
    assert_eq!(s, 200);
    assert!(text.contains("Content-Type: text/plain; version=0.0.4"));
    for needle in [
        "ringside_websocket_pool_connections_total{shard=\"0\"}",
        "ringside_websocket_pool_utilization_ratio{shard=\"1\"}",
        "ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"0.05\"}",
        "ringside_shard_driver_info{shard=\"0\",driver=\"io_uring\"} 1",
        "ringside_connections_rejected_total{reason=\"upgrade_required\",status=\"426\"}",
        "ringside_connections_closed_total{code=\"1001\"}",
        "ringside_node_info{node=\"n-test\"",
        "# TYPE ringside_websocket_connection_latency_seconds histogram",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    assert_eq!(node.metric_sum("ringside_websockets_open"), 1.0);
    assert!(node.metric_sum("ringside_websocket_connection_latency_seconds_count") >= 1.0);
    assert!(node.metric_sum("ringside_messages_received_total") >= 1.0);
    let (s, body) = node.get("/cluster");
    assert_eq!(s, 200);
    assert!(body.contains("\"least_loaded\""));
}
