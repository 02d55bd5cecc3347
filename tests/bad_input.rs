//! Bad input gets a clear answer (status or close code, and a reason),
//! is counted by reason in /metrics, and harms nobody else.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[test]
fn http_refusals_have_exact_statuses_and_are_counted() {
    let node = NodeProc::start(&["--shards", "2"]);
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("GARBAGE\r\n\r\n".into(), 400, "malformed", ""),
        ("GET /ws HTTP/1.1\r\nBad Header\r\n\r\n".into(), 400, "malformed", ""),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".into(), 426, "upgrade_required", "Upgrade: websocket"),
        (
            format!("GET /ws HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Version: 8\r\n\r\n"),
            426,
            "bad_websocket_version",
            "Sec-WebSocket-Version: 13",
        ),
        (format!("GET /ws HTTP/1.1\r\n{UPGRADE}\r\n"), 426, "bad_websocket_version", "Sec-WebSocket-Version: 13"),
        (
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n".into(),
            400,
            "bad_websocket_key",
            "",
        ),
        (format!("GET /ws HTTP/1.0\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n\r\n"), 400, "bad_http_version", ""),
        (
            format!("POST /ws HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n\r\n"),
            405,
            "method_not_allowed",
            "Allow: GET",
        ),
        (
            format!("GET /ws?client_id=bad%21 HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n\r\n"),
            400,
            "bad_client_id",
            "",
        ),
        ("GET /nowhere HTTP/1.1\r\n\r\n".into(), 404, "not_found", ""),
        (format!("GET /ws HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000)), 431, "header_too_large", ""),
    ];
    for (req, status, reason, header) in &cases {
        let (got, text) = raw_request(node.addr, req);
        assert_eq!(got, *status, "{req:?} -> {text}");
        assert!(text.contains(header), "{text}");
        assert!(text.contains(&format!("{reason}: ")), "reason missing in body: {text}");
    }
    for (_, status, reason, _) in &cases {
        let series = format!("ringside_connections_rejected_total{{reason=\"{reason}\",status=\"{status}\"}}");
        assert!(node.metric(&series) >= 1.0, "{series} not counted");
    }
}

/// Each case: (frames to send, expected close code, metrics code label).
fn violation_cases() -> Vec<(Vec<u8>, u16)> {
    let mut big = client_frame(0x1, true, &vec![b'a'; 70_000], true);
    big.truncate(20); // the header alone announces 70,000 bytes > max_frame_bytes
    vec![
        (client_frame(0x1, true, b"unmasked", false), 1002),
        (client_frame(0x3, true, b"reserved opcode", true), 1002),
        (client_frame(0x9, false, b"fragmented ping", true), 1002),
        (client_frame(0x0, true, b"continuation first", true), 1002),
        (client_frame(0x1, true, &[0xff, 0xfe, 0x80], true), 1007),
        (big, 1009),
        ([client_frame(0x1, false, &[0xe2, 0x82], true), client_frame(0x0, true, &[0x28], true)].concat(), 1007),
    ]
}

#[tokio::test]
async fn protocol_violations_close_with_the_right_code_and_harm_nobody() {
    let node = NodeProc::start(&["--shards", "1"]);
    // A healthy client on the same (single) shard keeps working throughout.
    let mut good = connect(&node.url("/echo")).await;
    for path in ["/echo", "/ws"] {
        for (frames, code) in violation_cases() {
            let head = frames[..frames.len().min(8)].to_vec();
            let addr = node.addr;
            let path2 = path.to_string();
            let got = tokio::task::spawn_blocking(move || {
                let mut s = raw_ws(addr, &path2);
                s.write_all(&frames).unwrap();
                raw_close_code(&mut s)
            })
            .await
            .unwrap();
            assert_eq!(got, code, "{path} frames {head:02x?}");
            good.send(Message::Text("still here".into())).await.unwrap();
            assert_eq!(good.next().await.unwrap().unwrap(), Message::Text("still here".into()));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(node.eventually_metric("ringside_connections_closed_total{code=\"1002\"}", 8.0));
    assert!(node.eventually_metric("ringside_connections_closed_total{code=\"1007\"}", 4.0));
    assert!(node.eventually_metric("ringside_connections_closed_total{code=\"1009\"}", 2.0));
}

#[tokio::test]
async fn message_over_max_size_closes_1009() {
    let node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "websocket.max_message_bytes=4096",
        "--set",
        "websocket.max_frame_bytes=1024",
        "--set",
        "rooms.max_payload_bytes=1000",
    ]);
    // Fragments each under max_frame_bytes, together over max_message_bytes.
    let addr = node.addr;
    let code = tokio::task::spawn_blocking(move || {
        let mut s = raw_ws(addr, "/echo");
        s.write_all(&client_frame(0x2, false, &[0u8; 1000], true)).unwrap();
        for _ in 0..4 {
            s.write_all(&client_frame(0x0, false, &[0u8; 1000], true)).unwrap();
        }
        s.write_all(&client_frame(0x0, true, &[0u8; 1000], true)).unwrap();
        raw_close_code(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(code, 1009);
    let mut ws = connect(&node.url("/echo")).await;
    ws.send(Message::Binary(vec![7u8; 2000].into())).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1009);
}

#[test]
fn abrupt_disconnects_and_half_requests_do_not_stall_the_shard() {
    let node = NodeProc::start(&["--shards", "1"]);
    for _ in 0..50 {
        let mut s = std::net::TcpStream::connect(node.addr).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost").unwrap();
        drop(s);
        let mut s = raw_ws(node.addr, "/echo");
        s.write_all(&client_frame(0x1, true, b"half", true)[..4]).unwrap();
        drop(s);
    }
    assert_eq!(node.get("/health").0, 200);
}
