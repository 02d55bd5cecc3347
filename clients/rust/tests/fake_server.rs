//! The client against a scripted WebSocket server (tokio-tungstenite, in the test): the
//! test plays the node message by message, so it can send what a real node sends only in
//! rare situations (a `reconnect` hint to another address, a preemption) and check the
//! client's exact answer: the close, the wait, where it reconnects, and the `since` it
//! resumes with.

mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ringside_client::{Backoff, Cause, Client, ClientConfig, Event, ServerMsg, StopReason};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::wait_event;

/// One accepted connection of the fake node.
struct Conn {
    ws: WebSocketStream<TcpStream>,
    at: Instant,
}

impl Conn {
    async fn send(&mut self, v: Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    /// The next text message as JSON, or the close code (`Err`).
    async fn recv(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await.expect("client silent");
            match m {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                _ => return Err(None),
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        let _ = self.ws.send(Message::Close(Some(frame))).await;
        while let Some(Ok(_)) = self.ws.next().await {}
    }

    async fn welcome(&mut self, id: &str, node: &str) {
        self.send(json!({"type":"welcome","client_id":id,"node":node,"shard":0})).await;
    }
}

/// A fake node: every accepted upgrade is handed to the test.
struct Fake {
    url: String,
    conns: mpsc::Receiver<Conn>,
}

impl Fake {
    async fn start() -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", l.local_addr().unwrap());
        let (tx, conns) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let at = Instant::now();
                if let Ok(ws) = tokio_tungstenite::accept_async(s).await {
                    let _ = tx.send(Conn { ws, at }).await;
                }
            }
        });
        Fake { url, conns }
    }

    async fn accept(&mut self) -> Conn {
        tokio::time::timeout(Duration::from_secs(10), self.conns.recv()).await.expect("no connection").unwrap()
    }

    async fn no_connection_within(&mut self, d: Duration) {
        if let Ok(Some(c)) = tokio::time::timeout(d, self.conns.recv()).await {
            panic!("unexpected reconnect {:?} after stop", c.at);
        }
    }
}

fn quick_backoff() -> Backoff {
    Backoff { base: Duration::from_millis(50), cap: Duration::from_millis(400), ..Backoff::default() }
}

/// On a hint the client closes normally, waits `after_ms`, connects to the hinted URL and
/// re-joins its room with the last offset it saw.
#[tokio::test]
async fn hint_to_another_node_is_followed_and_rooms_resume() {
    let mut a = Fake::start().await;
    let mut b = Fake::start().await;
    let mut cfg = ClientConfig::new(a.url.clone());
    cfg.backoff = quick_backoff();
    let (client, mut events) = Client::start(cfg).unwrap();

    let mut c = a.accept().await;
    c.welcome("c1", "a").await;
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    let join = tokio::spawn({
        let client = client.clone();
        async move { client.join("feed").await }
    });
    assert_eq!(c.recv().await.unwrap(), json!({"type":"join","room":"feed"}));
    c.send(json!({"type":"joined","room":"feed","offset":5,"epoch":"E1"})).await;
    assert_eq!(join.await.unwrap().unwrap().offset, Some(5));
    c.send(json!({"type":"message","room":"feed","from":"p","data":6,"offset":6})).await;
    c.send(json!({"type":"reconnect","url":b.url,"after_ms":300,"reason":"drain"})).await;
    // The client closes normally (1000) after the hint.
    assert_eq!(c.recv().await, Err(Some(1000)));
    let closed_at = Instant::now();

    let ev = wait_event(&mut events, Duration::from_secs(5), |e| matches!(e, Event::Reconnecting { .. })).await;
    assert_eq!(
        ev,
        Event::Reconnecting {
            attempt: 0,
            delay: Duration::from_millis(300),
            url: b.url.clone(),
            cause: Cause::Hint("drain".into())
        }
    );
    let mut c2 = b.accept().await;
    assert!(c2.at.duration_since(closed_at) >= Duration::from_millis(300), "did not wait after_ms");
    c2.welcome("c1", "b").await;
    // Resume: since = the last offset received (6), with the epoch of its joined.
    assert_eq!(c2.recv().await.unwrap(), json!({"type":"join","room":"feed","since":{"offset":6,"epoch":"E1"}}));
    c2.send(json!({"type":"message","room":"feed","from":"p","data":6,"offset":6})).await; // overlap: dropped
    c2.send(json!({"type":"message","room":"feed","from":"p","data":7,"offset":7})).await;
    c2.send(json!({"type":"joined","room":"feed","offset":7,"epoch":"E1","recovered":true})).await;
    let got = wait_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, Event::Message(ServerMsg::Message { offset: Some(7), .. }))
    })
    .await;
    assert!(matches!(got, Event::Message(ServerMsg::Message { .. })));
    let resumed =
        wait_event(&mut events, Duration::from_secs(5), |e| matches!(e, Event::Message(ServerMsg::Joined { .. })))
            .await;
    assert!(matches!(resumed, Event::Message(ServerMsg::Joined { recovered: Some(true), .. })));
    assert_eq!(client.stats().duplicates_dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(client.stats().hints_followed.load(std::sync::atomic::Ordering::Relaxed), 1);
    client.close().await;
}

/// A hint with an empty URL means the same address; a close 1001 arriving before the
/// client's own close does not turn it into a backoff reconnect.
#[tokio::test]
async fn hint_with_empty_url_reconnects_to_the_same_address() {
    let mut a = Fake::start().await;
    let mut cfg = ClientConfig::new(a.url.clone());
    cfg.backoff = Backoff { base: Duration::from_secs(20), ..Backoff::default() }; // a backoff would be slow
    let (client, mut events) = Client::start(cfg).unwrap();
    let mut c = a.accept().await;
    c.welcome("c2", "a").await;
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    c.send(json!({"type":"reconnect","url":"","after_ms":100,"reason":"upgrade"})).await;
    c.close(1001, "server shutting down").await;
    let mut c2 = a.accept().await;
    c2.welcome("c2", "a").await;
    let ev = wait_event(&mut events, Duration::from_secs(5), |e| matches!(e, Event::Reconnecting { .. })).await;
    assert!(matches!(ev, Event::Reconnecting { cause: Cause::Hint(ref r), .. } if r == "upgrade"), "{ev:?}");
    client.close().await;
}

/// `preempted` then 4004: the client waits the given delay (plus jitter) and moves to the
/// next endpoint.
#[tokio::test]
async fn preempted_waits_its_delay_and_moves_on() {
    let mut a = Fake::start().await;
    let mut b = Fake::start().await;
    let mut cfg = ClientConfig::with_urls(vec![a.url.clone(), b.url.clone()]);
    cfg.backoff = quick_backoff();
    let (client, _events) = Client::start(cfg).unwrap();
    let mut c = a.accept().await;
    c.welcome("c3", "a").await;
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    c.send(json!({"type":"preempted","reason":"full","reconnect_delay_ms":400})).await;
    let sent = Instant::now();
    c.close(4004, "preempted").await;
    let c2 = b.accept().await;
    assert!(c2.at.duration_since(sent) >= Duration::from_millis(400));
    client.close().await;
}

/// 1008 and 4000 stop the client: no reconnect.
#[tokio::test]
async fn policy_close_stops() {
    let mut a = Fake::start().await;
    let mut cfg = ClientConfig::new(a.url.clone());
    cfg.backoff = quick_backoff();
    let (client, mut events) = Client::start(cfg).unwrap();
    let mut c = a.accept().await;
    c.welcome("c4", "a").await;
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    c.close(1008, "message rate limit exceeded").await;
    let ev = wait_event(&mut events, Duration::from_secs(5), |e| matches!(e, Event::Stopped(_))).await;
    assert_eq!(ev, Event::Stopped(StopReason::CloseCode { code: 1008, reason: "message rate limit exceeded".into() }));
    a.no_connection_within(Duration::from_millis(600)).await;
    assert!(client.publish("r", json!(1)).await.unwrap_err().ends_client());
}

/// Connection refused and dropped sockets: backoff with attempts counted, capped, and
/// `max_attempts` gives up.
#[tokio::test]
async fn backoff_gives_up_after_max_attempts() {
    let port = common::free_port(); // nothing listens there
    let mut cfg = ClientConfig::new(format!("ws://127.0.0.1:{port}/ws"));
    cfg.backoff = Backoff {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(80),
        max_attempts: Some(4),
        jitter: true,
    };
    let (client, mut events) = Client::start(cfg).unwrap();
    let mut delays = Vec::new();
    loop {
        match events.recv_timeout(Duration::from_secs(10)).await.expect("events") {
            Event::Reconnecting { attempt, delay, cause: Cause::Backoff, .. } => delays.push((attempt, delay)),
            Event::Stopped(r) => {
                assert!(matches!(r, StopReason::GaveUp { attempts: 4, .. }), "{r:?}");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(delays.iter().map(|d| d.0).collect::<Vec<_>>(), [1, 2, 3]);
    let ceilings = [40, 80, 80]; // attempt n waits up to min(cap, base × 2^n)
    for ((_, d), c) in delays.iter().zip(ceilings) {
        assert!(d.as_millis() <= c, "{d:?} above the ceiling {c}");
    }
    assert!(client.wait_connected(Duration::from_secs(1)).await.is_err());
}

/// A gap in a room's offsets (5, 6, then 8): the client drops 8, leaves and joins again
/// with `since` 6, and the replay's 7 and 8 are delivered in order; live messages that
/// arrive before the `joined` are dropped (the replay has them).
#[tokio::test]
async fn a_gap_in_offsets_is_recovered_by_rejoining_with_since() {
    let mut a = Fake::start().await;
    let (client, mut events) = Client::start(ClientConfig::new(a.url.clone())).unwrap();
    let mut c = a.accept().await;
    c.welcome("g1", "a").await;
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    let join = tokio::spawn({
        let client = client.clone();
        async move { client.join("feed").await }
    });
    assert_eq!(c.recv().await.unwrap()["type"], "join");
    c.send(json!({"type":"joined","room":"feed","offset":4,"epoch":"E"})).await;
    join.await.unwrap().unwrap();
    for o in [5, 6, 8] {
        c.send(json!({"type":"message","room":"feed","from":"p","data":o,"offset":o})).await;
    }
    assert_eq!(c.recv().await.unwrap(), json!({"type":"leave","room":"feed"}));
    assert_eq!(c.recv().await.unwrap(), json!({"type":"join","room":"feed","since":{"offset":6,"epoch":"E"}}));
    c.send(json!({"type":"message","room":"feed","from":"p","data":9,"offset":9})).await; // before left: dropped
    c.send(json!({"type":"left","room":"feed"})).await;
    for o in [7, 8, 9] {
        c.send(json!({"type":"message","room":"feed","from":"p","data":o,"offset":o})).await;
    }
    c.send(json!({"type":"joined","room":"feed","offset":9,"epoch":"E","recovered":true})).await;
    c.send(json!({"type":"message","room":"feed","from":"p","data":10,"offset":10})).await;
    let mut got = Vec::new();
    while got.last() != Some(&10) {
        match events.recv_timeout(Duration::from_secs(5)).await.expect("events") {
            Event::Message(ServerMsg::Message { offset: Some(o), .. }) => got.push(o),
            Event::Message(ServerMsg::Left { .. }) => panic!("the gap's leave reached the application"),
            _ => {}
        }
    }
    assert_eq!(got, [5, 6, 7, 8, 9, 10]);
    assert_eq!(client.stats().gaps_recovered.load(std::sync::atomic::Ordering::Relaxed), 1);
    client.close().await;
}
