//! Admission limits and access rules over real sockets, each asserting the
//! exact status, close code or error code and the metric that counted it:
//!
//! 1. open connections per client address (`limits.max_connections_per_ip`),
//!    refused 429 at accept, before the request is read;
//! 2. new connections per second per address (`limits.connection_rate_per_ip`),
//!    refused 429 with `Retry-After`;
//! 3. handshake slots per address and per shard (`limits.max_handshakes_*`):
//!    past an address's share a socket is closed at once; a full shard
//!    evicts the heaviest address's oldest pending socket for a newcomer;
//! 4. `server.allowed_origins` (403);
//! 5. `/metrics` and `/cluster` only on `server.admin_listen` when
//!    `server.public_internal_endpoints` is off, and no upgrades there;
//! 6. the PROXY protocol (v2 binary, v1 text) from a trusted proxy sets the
//!    address the limits apply to; a malformed one is 400; from anyone else
//!    it is not honoured;
//! 7. `X-Forwarded-For` likewise, and ignored without trusted proxies;
//! 8. `/ws` rules: publishing needs a join, and the message rate answers
//!    `rate_limited`, then closes 1008 after `limits.rate_limit_strikes`.
//!
//! Nodes that limit per address serve `/metrics` on their internal listener
//! (no limits apply there), so that reading a metric is not itself a
//! connection that counts. Sources other than 127.0.0.1 are other loopback
//! addresses (127.0.0.0/8), bound before connecting.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use socket2::{Domain, Socket, Type};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

const UPGRADE_HEADERS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// The signature that opens a PROXY protocol v2 header.
const PROXY_V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// A node with an internal listener: `node.addr` is that listener (so the
/// `NodeProc` metric helpers read there), `client` the client port.
struct Limited {
    node: NodeProc,
    client: SocketAddr,
}

/// Starts `ringside --shards <shards> --set server.admin_listen=127.0.0.1:0 <args>`.
fn start_limited(shards: &str, args: &[&str]) -> Limited {
    let mut all = vec!["--shards", shards, "--set", "server.admin_listen=127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut node = NodeProc::start(&all);
    let client = node.addr;
    node.addr = admin_addr(&node);
    Limited { node, client }
}

/// The internal listener's address, from the node's start-up log.
fn admin_addr(node: &NodeProc) -> SocketAddr {
    logged_addr(&node.log, "internal endpoints")
}

/// 127.0.0.`n`.
fn lo(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// A TCP connection to `to` from `source` (the port is the kernel's).
fn dial(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A WebSocket upgrade request for `path` with `extra` header lines.
fn upgrade_req(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}{extra}\r\n").into_bytes()
}

/// A plain GET.
fn get_req(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

/// The node's answer on one connection: the status, the response head,
/// and the socket, kept open (after a 101) as long as the reply lives.
struct Reply {
    status: u16,
    head: String,
    _sock: TcpStream,
}

impl Reply {
    /// Asserts the status; the reply, for chaining.
    fn expect(self, status: u16) -> Reply {
        assert_eq!(self.status, status, "{}", self.head);
        self
    }

    /// A header's value (name case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `bytes` on `sock` (nothing when empty) and reads the response head.
fn exchange(mut sock: TcpStream, bytes: &[u8]) -> Reply {
    // A refusal at accept may already be on its way: a failed write still
    // leaves the answer to read.
    let _ = sock.write_all(bytes);
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, head, _sock: sock }
}

/// A new connection from `source` that sends `bytes`; the answer.
fn send_from(source: Ipv4Addr, to: SocketAddr, bytes: &[u8]) -> Reply {
    exchange(dial(source, to), bytes)
}

/// An upgrade to `/echo` from `source` with `extra` header lines.
fn upgrade_from(source: Ipv4Addr, to: SocketAddr, extra: &str) -> Reply {
    send_from(source, to, &upgrade_req("/echo", extra))
}

/// Retries an upgrade from `source` until it is accepted (a slot given
/// back at close is freed a moment after the client's close).
fn eventually_upgrades(source: Ipv4Addr, to: SocketAddr) -> Reply {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = upgrade_from(source, to, "");
        if r.status == 101 || Instant::now() > end {
            return r.expect(101);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rejection counter for `reason` and `status`.
fn rejected(reason: &str, status: u16) -> String {
    format!("ringside_connections_rejected_total{{reason=\"{reason}\",status=\"{status}\"}}")
}

/// Asserts that `series` reaches exactly `want` (polled: counters move a
/// moment before or after the client sees the answer).
fn assert_counted(node: &NodeProc, series: &str, want: f64) {
    node.eventually_metric(series, want);
    assert_eq!(node.metric(series), want, "{series}");
}

/// Asserts that the sum of `name` over its series settles at `want`.
fn assert_sum(node: &NodeProc, name: &str, want: f64) {
    assert!(node.eventually_metric_eq(name, want), "{name} = {}, want {want}", node.metric_sum(name));
}

/// Waits up to `within` for input on `s`: true when the node closed it
/// (EOF or reset), false when it stays open and silent.
fn closed(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    match s.read(&mut [0u8; 256]) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected {n} bytes on a silent socket"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(_) => true,
    }
}

/// Asserts that every socket in `socks` is still open.
fn assert_open(socks: &mut [TcpStream], what: &str) {
    for (i, s) in socks.iter_mut().enumerate() {
        assert!(!closed(s, Duration::from_millis(100)), "{what} #{i} was closed");
    }
}

#[test]
fn connections_per_address_are_capped_at_accept() {
    let n = start_limited("2", &["--set", "limits.max_connections_per_ip=3"]);
    let mut held: Vec<Reply> = (0..3).map(|_| upgrade_from(lo(1), n.client, "").expect(101)).collect();
    // The 4th is answered at accept: it gets its 429 without sending a byte.
    let refused = send_from(lo(1), n.client, b"").expect(429);
    let retry: u32 = refused.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1, "{}", refused.head);
    assert_counted(&n.node, &rejected("too_many_connections_per_ip", 429), 1.0);
    // Another address is not affected.
    let _other = upgrade_from(lo(2), n.client, "").expect(101);
    // Closing one gives its place back.
    drop(held.pop());
    held.push(eventually_upgrades(lo(1), n.client));
    assert_sum(&n.node, "ringside_websockets_open", 4.0);
}

#[test]
fn connection_rate_per_address_is_refused_with_retry_after() {
    let n =
        start_limited("1", &["--set", "limits.connection_rate_per_ip=1", "--set", "limits.connection_burst_per_ip=2"]);
    // Connected back to back, so that all three reach the node well within
    // the second a token takes to refill.
    let socks: Vec<TcpStream> = (0..3).map(|_| dial(lo(1), n.client)).collect();
    let replies: Vec<Reply> = socks.into_iter().map(|s| exchange(s, &upgrade_req("/echo", ""))).collect();
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [101, 101, 429], "{}", replies[2].head);
    let retry: u64 = replies[2].header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry >= 1, "{}", replies[2].head);
    assert_counted(&n.node, &rejected("connection_rate_per_ip", 429), 1.0);
    // Another address has its own bucket; after Retry-After this one has a token again.
    upgrade_from(lo(2), n.client, "").expect(101);
    std::thread::sleep(Duration::from_secs(retry) + Duration::from_millis(100));
    upgrade_from(lo(1), n.client, "").expect(101);
    assert_counted(&n.node, &rejected("connection_rate_per_ip", 429), 1.0);
}

/// Silent sockets from `source`, each seen pending by the node (in order)
/// before the next is opened.
fn pending_from(n: &Limited, source: Ipv4Addr, count: usize, pending_before: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|i| {
            let s = dial(source, n.client);
            assert_sum(&n.node, "ringside_handshakes_pending", (pending_before + i + 1) as f64);
            s
        })
        .collect()
}

/// A tokio-tungstenite client on `path` over a socket from `source`.
async fn ws_from(source: Ipv4Addr, to: SocketAddr, path: &str) -> Ws {
    let std = dial(source, to);
    std.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(std).unwrap();
    let url = format!("ws://{to}{path}");
    let (ws, resp) =
        tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)).await.expect("upgrade from a fresh address");
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn handshake_slots_bound_addresses_and_evict_the_heaviest() {
    let n = start_limited(
        "1",
        &[
            "--set",
            "limits.max_handshakes_per_ip=5",
            "--set",
            "limits.max_handshakes_per_shard=8",
            // Silent sockets must outlive the test, not the handshake timeout.
            "--set",
            "server.handshake_timeout_ms=60000",
        ],
    );
    let limit = rejected("handshake_limit", 503);
    let mut first = pending_from(&n, lo(1), 5, 0);
    // Past the address's share: closed at once, without an answer.
    let mut sixth = dial(lo(1), n.client);
    assert!(closed(&mut sixth, Duration::from_secs(5)), "the 6th pending socket of one address stayed open");
    assert_counted(&n.node, &limit, 1.0);
    assert_sum(&n.node, "ringside_handshakes_pending", 5.0);
    assert_open(&mut first, "127.0.0.1 socket");
    // Other addresses fill the shard's 8 slots.
    let mut others = pending_from(&n, lo(3), 2, 5);
    others.extend(pending_from(&n, lo(4), 1, 7));
    // One more: the heaviest address (127.0.0.1) loses its oldest.
    let mut newcomer = vec![dial(lo(5), n.client)];
    assert!(closed(&mut first[0], Duration::from_secs(5)), "the oldest socket of the heaviest address was kept");
    assert_counted(&n.node, &limit, 2.0);
    assert_sum(&n.node, "ringside_handshakes_pending", 8.0);
    assert_open(&mut first[1..], "127.0.0.1 socket");
    assert_open(&mut others, "127.0.0.3/.4 socket");
    assert_open(&mut newcomer, "127.0.0.5 socket");
    // A real client still gets in (evicting 127.0.0.1's next oldest) and is served.
    let mut ws = ws_from(lo(6), n.client, "/echo").await;
    ws.send(Message::Text("through a full handshake table".into())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("no echo").unwrap().unwrap();
    assert_eq!(echoed, Message::Text("through a full handshake table".into()));
    assert!(closed(&mut first[1], Duration::from_secs(5)), "the next oldest of 127.0.0.1 was kept");
    assert_open(&mut first[2..], "127.0.0.1 socket");
    assert_counted(&n.node, &limit, 3.0);
    // The upgraded client left the handshake table: 7 pending, never over 8.
    assert_sum(&n.node, "ringside_handshakes_pending", 7.0);
    assert_open(&mut others, "127.0.0.3/.4 socket");
}

#[test]
fn only_allowed_origins_may_upgrade() {
    let node = NodeProc::start(&["--shards", "1", "--set", "server.allowed_origins=https://ok.example"]);
    let _ok = upgrade_from(lo(1), node.addr, "Origin: https://ok.example\r\n").expect(101);
    upgrade_from(lo(1), node.addr, "Origin: https://evil.example\r\n").expect(403);
    let _plain = upgrade_from(lo(1), node.addr, "").expect(101);
    assert_counted(&node, &rejected("origin_not_allowed", 403), 1.0);
}

#[test]
fn internal_endpoints_only_on_the_internal_listener() {
    let n = start_limited("1", &["--set", "server.public_internal_endpoints=false"]);
    for (path, status) in [("/metrics", 404), ("/cluster", 404), ("/health", 200), ("/ready", 200)] {
        let r = send_from(lo(1), n.client, &get_req(path));
        assert_eq!(r.status, status, "client port {path}: {}", r.head);
    }
    let (status, text) = n.node.get("/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("ringside_node_info{"), "{text}");
    // No WebSockets on the internal listener.
    send_from(lo(1), n.node.addr, &upgrade_req("/ws", "")).expect(404);
    assert_counted(&n.node, &rejected("not_found", 404), 3.0);
}

/// A PROXY v2 header: `ver_cmd` (0x21: version 2, PROXY), TCP over IPv4,
/// from `src` to 127.0.0.1.
fn proxy_v2(ver_cmd: u8, src: [u8; 4]) -> Vec<u8> {
    let mut h = PROXY_V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[ver_cmd, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&40_000u16.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

/// A PROXY v1 header for a client at `src`.
fn proxy_v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 5000 80\r\n").into_bytes()
}

/// An upgrade from 127.0.0.1 behind `header`.
fn proxied(to: SocketAddr, header: &[u8]) -> Reply {
    send_from(lo(1), to, &[header, &upgrade_req("/echo", "")].concat())
}

/// The options of a node that trusts `proxies` and allows one connection per address.
fn one_per_address(proxies: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["--set".into(), "limits.max_connections_per_ip=1".into()];
    if !proxies.is_empty() {
        args.extend(["--set".into(), format!("server.trusted_proxies={proxies}")]);
    }
    args
}

fn start_one_per_address(proxies: &str) -> Limited {
    let args = one_per_address(proxies);
    start_limited("1", &args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn proxy_protocol_from_a_trusted_proxy_sets_the_limited_address() {
    let n = start_one_per_address("127.0.0.1");
    let too_many = rejected("too_many_connections_per_ip", 429);
    let _a = proxied(n.client, &proxy_v2(0x21, [203, 0, 113, 7])).expect(101);
    // The limit applies to the address in the header, not to the proxy's.
    proxied(n.client, &proxy_v2(0x21, [203, 0, 113, 7])).expect(429);
    assert_counted(&n.node, &too_many, 1.0);
    let _b = proxied(n.client, &proxy_v2(0x21, [203, 0, 113, 8])).expect(101);
    // Version nibble 1: malformed.
    proxied(n.client, &proxy_v2(0x11, [203, 0, 113, 9])).expect(400);
    assert_counted(&n.node, &rejected("bad_proxy_header", 400), 1.0);
    // v1 text works the same way.
    let _c = proxied(n.client, &proxy_v1("198.51.100.1")).expect(101);
    proxied(n.client, &proxy_v1("198.51.100.1")).expect(429);
    assert_counted(&n.node, &too_many, 2.0);
    assert_sum(&n.node, "ringside_websockets_open", 3.0);
}

#[test]
fn proxy_protocol_from_an_untrusted_peer_is_not_honoured() {
    let n = start_limited("1", &["--set", "server.trusted_proxies=10.0.0.0/8"]);
    // The header is read as the request line: malformed HTTP.
    proxied(n.client, &proxy_v1("198.51.100.1")).expect(400);
    proxied(n.client, &proxy_v2(0x21, [203, 0, 113, 7])).expect(400);
    assert_counted(&n.node, &rejected("malformed", 400), 2.0);
    assert_counted(&n.node, &rejected("bad_proxy_header", 400), 0.0);
}

/// An upgrade from 127.0.0.1 saying it forwards for `client`.
fn forwarded(to: SocketAddr, client: &str) -> Reply {
    upgrade_from(lo(1), to, &format!("X-Forwarded-For: {client}\r\n"))
}

#[test]
fn forwarded_for_from_a_trusted_proxy_sets_the_limited_address() {
    let n = start_one_per_address("127.0.0.1");
    let _a = forwarded(n.client, "198.51.100.9").expect(101);
    let refused = forwarded(n.client, "198.51.100.9").expect(429);
    assert!(refused.header("retry-after").is_some(), "{}", refused.head);
    let _b = forwarded(n.client, "198.51.100.10").expect(101);
    assert_counted(&n.node, &rejected("too_many_connections_per_ip", 429), 1.0);
}

#[test]
fn forwarded_for_is_ignored_without_trusted_proxies() {
    let n = start_one_per_address("");
    let _a = forwarded(n.client, "198.51.100.9").expect(101);
    // The socket address counts: 127.0.0.1 already holds its one.
    forwarded(n.client, "198.51.100.10").expect(429);
    assert_counted(&n.node, &rejected("too_many_connections_per_ip", 429), 1.0);
}

/// Sends `count` pings (ids `from..from+count`) in one write.
async fn ping_burst(ws: &mut Ws, from: u32, count: u32) {
    for id in from..from + count {
        ws.feed(Message::Text(json!({"type": "ping", "id": id}).to_string().into())).await.unwrap();
    }
    ws.flush().await.unwrap();
}

#[tokio::test]
async fn ws_publish_needs_a_join_and_message_rate_is_enforced() {
    let node = NodeProc::start(&[
        "--shards",
        "1",
        "--set",
        "limits.messages_per_second=5",
        "--set",
        "limits.message_burst=5",
        "--set",
        "limits.rate_limit_strikes=20",
    ]);
    let (mut loner, _) = rooms_client(&node, "loner").await;
    send_json(&mut loner, json!({"type": "publish", "room": "lobby", "data": "hi"})).await;
    let err = next_json(&mut loner).await;
    assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("error"), Some("not_joined")), "{err}");
    send_json(&mut loner, json!({"type": "ping", "id": "still here"})).await;
    assert_eq!(next_json(&mut loner).await, json!({"type": "pong", "id": "still here"}));
    assert_counted(&node, "ringside_client_errors_total{code=\"not_joined\"}", 1.0);

    let (mut flooder, _) = rooms_client(&node, "flooder").await;
    ping_burst(&mut flooder, 0, 15).await;
    let mut pongs = Vec::new();
    let mut limited = 0;
    for _ in 0..15 {
        let m = next_json(&mut flooder).await;
        match (m["type"].as_str(), m["code"].as_str()) {
            (Some("pong"), _) => pongs.push(m["id"].as_u64().unwrap()),
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!((pongs, limited), (vec![0, 1, 2, 3, 4], 10));
    assert_counted(&node, "ringside_client_errors_total{code=\"rate_limited\"}", 10.0);
    // Still open: the next message is answered (pong or rate_limited), not closed.
    send_json(&mut flooder, json!({"type": "ping", "id": 99})).await;
    let m = next_json(&mut flooder).await;
    assert!(m["type"] == "pong" || m["code"] == "rate_limited", "{m}");
    assert_eq!(node.metric_sum("ringside_rate_limit_closed_total"), 0.0);
    // Far past the strikes: closed 1008, counted once.
    ping_burst(&mut flooder, 100, 100).await;
    assert_eq!(close_code(&mut flooder, Duration::from_secs(10)).await, 1008);
    assert_sum(&node, "ringside_rate_limit_closed_total", 1.0);
    // The other client was not touched.
    send_json(&mut loner, json!({"type": "ping", "id": 2})).await;
    assert_eq!(next_json(&mut loner).await, json!({"type": "pong", "id": 2}));
}
