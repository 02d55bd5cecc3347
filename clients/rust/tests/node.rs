//! The client against real `ringside` nodes (and two nodes sharing a real `redis-server`):
//! a node killed and restarted mid-stream (backoff observed, rooms resumed, nothing lost
//! within history), a drain hint followed to the peer, 4000 stops, token refresh ahead of
//! `exp` and after 4003, and the pool's cap, timeout and replacement.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ringside_client::{
    Auth, Backoff, Cause, Client, ClientConfig, Error, Event, Events, Pool, PoolConfig, ServerMsg, StopReason,
};
use serde_json::json;

/// Every event of a client, recorded by a reader task.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Event>>>);

impl Log {
    fn spawn(mut events: Events) -> Log {
        let log = Log::default();
        let l = log.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                l.0.lock().unwrap().push(e);
            }
        });
        log
    }

    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|e| f(e)).count()
    }

    /// Offsets of the room messages received, in order.
    fn offsets(&self) -> Vec<u64> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Message(ServerMsg::Message { offset, .. }) => *offset,
                _ => None,
            })
            .collect()
    }

    fn dump(&self) -> String {
        format!("{:#?}", self.0.lock().unwrap())
    }
}

/// Publishes 1, 2, 3, ... to `room` every 10 ms until stopped; returns the count sent.
struct Publisher {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    client: Client,
}

impl Publisher {
    async fn start(url: &str, room: &str) -> Publisher {
        let mut cfg = ClientConfig::new(url);
        cfg.client_id = Some("publisher".into());
        let (client, events) = Client::start(cfg).unwrap();
        Log::spawn(events);
        client.wait_connected(Duration::from_secs(10)).await.unwrap();
        client.join(room).await.unwrap();
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, n, c, room) = (stop.clone(), sent.clone(), client.clone(), room.to_string());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let i = n.load(Ordering::Relaxed) + 1;
                c.publish(&room, json!(i)).await.expect("publisher lost its node");
                n.store(i, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Publisher { stop, sent, task, client }
    }

    /// Stops, publishes one last message (so that a loss of the one before it shows as a
    /// gap to the subscriber), and returns the room's last offset as the node says it
    /// (leave and join again: `joined` carries it), whatever publishes were refused.
    async fn stop(self, room: &str) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.client.publish(room, json!("last")).await.unwrap();
        self.client.leave(room).await.unwrap();
        let last = self.client.join(room).await.unwrap().offset.expect("a room with history");
        assert!(last > self.sent.load(Ordering::Relaxed) / 2, "most publishes were refused");
        last
    }
}

fn cluster_settings<'a>(redis: &'a str, id: &'a str) -> Vec<&'a str> {
    vec!["--redis", redis, "--node-id", id]
}

const CLUSTER: &[&str] =
    &["cluster.sync_interval_ms=200", "rooms.history_size=2000", "websocket.sweep_interval_ms=100"];

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Node `a` is killed mid-stream while `b` keeps publishing through Redis; the client
/// backs off (attempts counted, delays within the ceilings) until `a` is back on the
/// same port, re-joins with `since`, and ends up with every offset exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_and_restarted_mid_stream_loses_nothing() {
    let redis = Redis::start();
    let url = redis.url();
    let (ua, ub) = (url.clone(), url.clone());
    let a = blocking(move || Node::start_on(free_port(), &cluster_settings(&ua, "a"), CLUSTER)).await;
    let b = blocking(move || Node::start_on(free_port(), &cluster_settings(&ub, "b"), CLUSTER)).await;

    let mut cfg = ClientConfig::new(a.url());
    cfg.client_id = Some("sub".into());
    cfg.backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_millis(800), ..Backoff::default() };
    let (sub, events) = Client::start(cfg).unwrap();
    let log = Log::spawn(events);
    sub.wait_connected(Duration::from_secs(10)).await.unwrap();
    sub.join("feed").await.unwrap();

    let publisher = Publisher::start(&b.url(), "feed").await;
    assert!(eventually(Duration::from_secs(10), || log.offsets().len() >= 20).await, "{}", log.dump());

    let a = Arc::new(Mutex::new(a));
    let a2 = a.clone();
    blocking(move || a2.lock().unwrap().kill()).await;
    // While a is down: connects fail and each retry waits a backoff delay.
    let failed = |e: &Event| matches!(e, Event::ConnectFailed { .. });
    assert!(eventually(Duration::from_secs(20), || log.count(failed) >= 3).await, "{}", log.dump());
    let a2 = a.clone();
    blocking(move || a2.lock().unwrap().restart()).await;

    let reconnected = |e: &Event| matches!(e, Event::Connected { reconnect: true, .. });
    assert!(eventually(Duration::from_secs(20), || log.count(reconnected) == 1).await, "{}", log.dump());
    let recovered = |e: &Event| matches!(e, Event::Message(ServerMsg::Joined { recovered: Some(true), .. }));
    assert!(eventually(Duration::from_secs(10), || log.count(recovered) == 1).await, "{}", log.dump());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = publisher.stop("feed").await;
    assert!(eventually(Duration::from_secs(10), || log.offsets().last() == Some(&sent)).await, "{}", log.dump());

    assert_eq!(log.offsets(), (1..=sent).collect::<Vec<_>>(), "lost or duplicated offsets");
    let delays: Vec<(u32, Duration)> = log
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, delay, cause: Cause::Backoff, .. } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect();
    // attempt 0 after the drop, then 1, 2, 3, ... while refused; each within its ceiling.
    assert!(delays.len() >= 3, "{delays:?}");
    for (i, (attempt, delay)) in delays.iter().enumerate() {
        assert_eq!(*attempt as usize, i, "{delays:?}");
        let ceiling = Duration::from_millis(100 * (1 << (*attempt).min(3)) as u64).min(Duration::from_millis(800));
        assert!(*delay <= ceiling, "{delays:?}");
    }
    sub.close().await;
}

/// SIGTERM on `a`: the client gets the drain hint naming `b`, closes, waits `after_ms`,
/// connects to `b` (not its configured `a`), resumes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hint_moves_the_client_to_the_peer() {
    let redis = Redis::start();
    let url = redis.url();
    let (ua, ub) = (url.clone(), url.clone());
    let drain = ["shutdown.reconnect_spread_ms=300", "shutdown.drain_timeout_ms=4000"];
    let settings: Vec<&str> = CLUSTER.iter().chain(drain.iter()).copied().collect();
    let s2 = settings.clone();
    let mut a = blocking(move || Node::start_on(free_port(), &cluster_settings(&ua, "a"), &settings)).await;
    let b = blocking(move || Node::start_on(free_port(), &cluster_settings(&ub, "b"), &s2)).await;
    let b_url = b.url();
    let peer = b.addr.to_string();
    assert!(
        eventually(Duration::from_secs(10), || a.try_get("/cluster").is_some_and(|(_, t)| t.contains(&peer))).await
    );

    let mut cfg = ClientConfig::new(a.url());
    cfg.client_id = Some("mover".into());
    let (sub, events) = Client::start(cfg).unwrap();
    let log = Log::spawn(events);
    sub.wait_connected(Duration::from_secs(10)).await.unwrap();
    sub.join("moving").await.unwrap();
    let publisher = Publisher::start(&b.url(), "moving").await;
    assert!(eventually(Duration::from_secs(10), || log.offsets().len() >= 10).await);

    a.sigterm();
    let moved = |e: &Event| matches!(e, Event::Connected { reconnect: true, url, .. } if *url == b_url);
    assert!(eventually(Duration::from_secs(15), || log.count(moved) == 1).await, "{}", log.dump());
    let hinted = |e: &Event| matches!(e, Event::Message(ServerMsg::Reconnect { reason, url, .. }) if reason == "drain" && *url == b_url);
    assert_eq!(log.count(hinted), 1, "{}", log.dump());
    assert_eq!(log.count(|e| matches!(e, Event::Reconnecting { cause: Cause::Hint(_), .. })), 1);
    let recovered = |e: &Event| matches!(e, Event::Message(ServerMsg::Joined { recovered: Some(true), .. }));
    assert!(eventually(Duration::from_secs(10), || log.count(recovered) == 1).await, "{}", log.dump());
    let sent = publisher.stop("moving").await;
    assert!(eventually(Duration::from_secs(10), || log.offsets().last() == Some(&sent)).await, "{}", log.dump());
    assert_eq!(log.offsets(), (1..=sent).collect::<Vec<_>>(), "lost or duplicated offsets");
    // It left on its own: no 1001, no backoff reconnect.
    assert_eq!(log.count(|e| matches!(e, Event::Disconnected { code: Some(1001), .. })), 0, "{}", log.dump());
    blocking(move || a.terminate(Duration::from_secs(10))).await;
    sub.close().await;
}

/// 4000: the older session stops and does not come back to evict the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_session_stops() {
    let node = blocking(|| Node::start(&[])).await;
    let mut cfg = ClientConfig::new(node.url());
    cfg.client_id = Some("twin".into());
    cfg.backoff.base = Duration::from_millis(50);
    let (old, old_events) = Client::start(cfg.clone()).unwrap();
    let old_log = Log::spawn(old_events);
    old.wait_connected(Duration::from_secs(10)).await.unwrap();
    let (new, new_events) = Client::start(cfg).unwrap();
    let new_log = Log::spawn(new_events);
    new.wait_connected(Duration::from_secs(10)).await.unwrap();
    let stopped = |e: &Event| *e == Event::Stopped(StopReason::Replaced);
    assert!(eventually(Duration::from_secs(10), || old_log.count(stopped) == 1).await, "{}", old_log.dump());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(new_log.count(|e| matches!(e, Event::Disconnected { .. })), 0, "{}", new_log.dump());
    assert_eq!(old_log.count(|e| matches!(e, Event::Connected { .. })), 1);
    assert!(matches!(old.join("x").await, Err(Error::Stopped(StopReason::Replaced))));
    assert!(new.ping().await.is_ok());
}

/// Token mode: a client with a callback refreshes ahead of `exp` and is never closed; one
/// that does not refresh ahead gets 4003, fetches a new token and reconnects; one with a
/// fixed token stops at 4003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_refresh_ahead_or_after_4003() {
    let settings: Vec<String> =
        token_settings().into_iter().chain(["websocket.sweep_interval_ms=100".to_string()]).collect();
    let node = blocking(move || Node::start(&settings.iter().map(String::as_str).collect::<Vec<_>>())).await;
    let calls = Arc::new(AtomicU64::new(0));
    let minted = |sub: &'static str, calls: Arc<AtomicU64>| {
        Auth::callback(move || {
            calls.fetch_add(1, Ordering::Relaxed);
            async move { Some(token(sub, 3)) }
        })
    };

    let mut ahead = ClientConfig::new(node.url());
    ahead.auth = minted("ahead", Arc::new(AtomicU64::new(0)));
    ahead.refresh_ahead = Some(0.5);
    let (c1, e1) = Client::start(ahead).unwrap();
    let log1 = Log::spawn(e1);

    let mut late = ClientConfig::new(node.url());
    late.auth = minted("late", calls.clone());
    late.refresh_ahead = None;
    late.backoff.base = Duration::from_millis(50);
    let (c2, e2) = Client::start(late).unwrap();
    let log2 = Log::spawn(e2);

    let mut fixed = ClientConfig::new(node.url());
    fixed.auth = Auth::Static(token("fixed", 2));
    let (c3, e3) = Client::start(fixed).unwrap();
    let log3 = Log::spawn(e3);

    for c in [&c1, &c2, &c3] {
        c.wait_connected(Duration::from_secs(10)).await.unwrap();
    }
    c2.join("r").await.unwrap();
    let expired = |e: &Event| matches!(e, Event::Disconnected { code: Some(4003), .. });
    assert!(eventually(Duration::from_secs(15), || log2.count(expired) >= 1).await, "{}", log2.dump());
    let back = |e: &Event| matches!(e, Event::Connected { reconnect: true, .. });
    assert!(eventually(Duration::from_secs(10), || log2.count(back) >= 1).await, "{}", log2.dump());
    assert!(calls.load(Ordering::Relaxed) >= 2);
    let rejoined = |e: &Event| matches!(e, Event::Message(ServerMsg::Joined { room, .. }) if room == "r");
    assert!(eventually(Duration::from_secs(10), || log2.count(rejoined) >= 1).await, "{}", log2.dump());

    assert!(
        eventually(Duration::from_secs(10), || log3.count(|e| *e == Event::Stopped(StopReason::NoToken)) == 1).await
    );
    assert_eq!(log3.count(expired), 1);

    // "ahead" outlives two token lifetimes on one connection.
    let refreshed = || c1.stats().refreshes.load(Ordering::Relaxed) >= 2;
    assert!(eventually(Duration::from_secs(10), refreshed).await, "{}", log1.dump());
    assert_eq!(log1.count(|e| matches!(e, Event::Disconnected { .. })), 0, "{}", log1.dump());
    assert!(c1.ping().await.is_ok());
    // A refresh with another client's token is refused and the connection stays.
    // (`rate_limited` when it comes within auth.min_refresh_interval_ms of the client's own.)
    let mut refused = c1.refresh(&token("someone-else", 60)).await;
    for _ in 0..3 {
        if !matches!(&refused, Err(Error::Server { code: ringside_client::ErrorCode::RateLimited, .. })) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        refused = c1.refresh(&token("someone-else", 60)).await;
    }
    assert!(matches!(refused, Err(Error::Server { code: ringside_client::ErrorCode::Forbidden, .. })), "{refused:?}");
}

/// Pool: at most `max_connections_per_host`, an acquire past it waits and times out, a
/// release hands the connection to a waiter, a stopped connection is replaced, and
/// connections spread over both endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_caps_waits_times_out_and_replaces() {
    let n1 = blocking(|| Node::start(&[])).await;
    let n2 = blocking(|| Node::start(&[])).await;
    let mut cfg = PoolConfig::new(vec![n1.url(), n2.url()]);
    cfg.max_connections_per_host = 1;
    cfg.acquire_timeout = Duration::from_millis(400);
    let pool = Pool::new(cfg).unwrap();

    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_ne!(a.endpoint(), b.endpoint());
    assert_eq!(a.echo(json!("hi")).await.unwrap(), json!("hi"));
    let s = pool.stats();
    assert_eq!((s.total, s.active, s.idle, s.pending), (2, 2, 0, 0));

    // Exhausted: the third waits (pending 1), then times out.
    let p2 = pool.clone();
    let waiter = tokio::spawn(async move { p2.acquire().await.map(|c| c.endpoint()) });
    assert!(eventually(Duration::from_secs(2), || pool.stats().pending == 1).await);
    assert_eq!(waiter.await.unwrap().unwrap_err(), Error::PoolTimeout);
    assert_eq!(pool.stats().pending, 0);

    // A release hands its connection to the one waiting.
    let p2 = pool.clone();
    let waiter = tokio::spawn(async move { p2.acquire().await.map(|c| c.endpoint()) });
    assert!(eventually(Duration::from_secs(2), || pool.stats().pending == 1).await);
    let a_endpoint = a.endpoint();
    drop(a);
    assert_eq!(waiter.await.unwrap().unwrap(), a_endpoint);
    assert_eq!(pool.stats().idle, 1);

    // A connection that stopped is replaced by a fresh one on the next acquire.
    b.close().await;
    drop(b);
    let s = pool.stats();
    assert_eq!((s.total, s.replaced), (1, 1));
    let c = pool.acquire().await.unwrap();
    let d = pool.acquire().await.unwrap();
    assert!(c.is_connected() && d.is_connected());
    assert_eq!(pool.stats().total, 2);
    drop((c, d));
    pool.close();
    assert_eq!(pool.acquire().await.unwrap_err(), Error::PoolClosed);
}

/// RPC through the node's `[[proxy.rpc]]` to a real HTTP backend (the project's Python
/// one): answers matched by id although they come back out of order, and the backend's
/// own error code reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_answers_match_their_calls_in_any_order() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/upstream_backend.py");
    let mut backend = std::process::Command::new("python3")
        .args([script, "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed (scripts/test installs it)");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(backend.stdout.take().unwrap()), &mut line).unwrap();
    let port: u16 =
        line.trim().strip_prefix("PORT ").unwrap_or_else(|| panic!("backend said {line:?}")).parse().unwrap();
    let dir = std::env::temp_dir().join(format!("ringside-client-rpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    let toml = format!(
        "[[upstream]]\nname = \"app\"\nurl = \"http://127.0.0.1:{port}\"\nretry_attempts = 1\n\
         [[proxy.rpc]]\nmethods = \"app.*\"\nupstream = \"app\"\n"
    );
    std::fs::write(&file, toml).unwrap();
    let cfg_path = file.display().to_string();
    let node = blocking(move || Node::start_on(free_port(), &["--config", &cfg_path], &[])).await;

    let mut cfg = ClientConfig::new(node.url());
    cfg.client_id = Some("caller".into());
    let (client, _events) = Client::start(cfg).unwrap();
    client.wait_connected(Duration::from_secs(10)).await.unwrap();
    let order = Mutex::new(Vec::new());
    let (slow, fast) = tokio::join!(
        async {
            let r = client.rpc("app.slow", json!({"ms": 1500})).await;
            order.lock().unwrap().push("slow");
            r
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = client.rpc("app.add", json!([2, 3])).await;
            order.lock().unwrap().push("fast");
            r
        }
    );
    assert_eq!(fast.unwrap(), json!(5));
    assert_eq!(slow.unwrap(), json!("slept"));
    assert_eq!(*order.lock().unwrap(), ["fast", "slow"], "the second call's answer came first");
    let failed = client.rpc("app.fail", json!(null)).await;
    assert!(
        matches!(&failed, Err(Error::Server { code: ringside_client::ErrorCode::RpcFailed, backend: Some(b), .. }) if b["code"] == "boom"),
        "{failed:?}"
    );
    let unrouted = client.rpc("other.thing", json!(null)).await;
    assert!(matches!(unrouted, Err(Error::Server { code: ringside_client::ErrorCode::RpcFailed, .. })), "{unrouted:?}");
    let _ = backend.kill();
    let _ = backend.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
