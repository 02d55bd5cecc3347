//! Priority classes over real sockets (`[priority]`, with the class taken
//! from a signed token's `class` claim): one-shard nodes with a few slots,
//! so that capacity is small and exact.
//!
//! 1. Reservations (`priority.reserved_*`, the seed's `can_accept` rule): a
//!    class may take a free slot only while more are free than the unused
//!    reservations of the classes above it; a refused upgrade waits
//!    `priority.wait_ms_<class>`, then gets 503 with `Retry-After`
//!    (`ringside_priority_refused_total{class}`); a used reservation no
//!    longer holds anything back.
//! 2. Preemption: on a full node an upgrade preempts the least recently
//!    active connection of the lowest class below its own: a `preempted`
//!    notice (`reconnect_delay_ms` = `priority.preempt_reconnect_delay_ms`),
//!    then close 4004, and the newcomer's 101 only once that close completed
//!    (`ringside_priority_preempted_total{class}`); nothing is below `low`.
//! 3. Waiting: an upgrade that found no slot gets the one a close frees
//!    (woken at once, not at a sweep; `ringside_priority_wait_seconds`);
//!    waiters are served higher classes first, not in arrival order; a
//!    critical is never preempted; a wait also ends (503) 250 ms before
//!    `server.handshake_timeout_ms` (the socket is still a pending handshake).
//! 4. `ringside_priority_connections{class}` follows what is connected, and
//!    `priority.default_class` applies to clients without a token.
//!
//! A `GET /metrics` takes no WebSocket slot, so the metrics stay readable on
//! a full node. The tests use a multi-threaded runtime: upgrades that wait
//! run as spawned tasks while the test body polls the metrics (blocking).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// The node's HS256 secret (at least 32 bytes).
const SECRET: &str = "priority-tests-hs256-secret-0123456789abcdef";

/// `server.retry_after_secs` of every token node here (not the default 5).
const RETRY_AFTER: &str = "7";

/// Class labels, in the order of [`expect_classes`]' array.
const CLASSES: [&str; 4] = ["low", "normal", "high", "critical"];

/// A signed token for client id `sub`, with a `class` claim unless `None`.
fn token(sub: &str, class: Option<&str>) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let mut claims = json!({"sub": sub, "exp": exp, "rooms": ["*"]});
    if let Some(c) = class {
        claims["class"] = json!(c);
    }
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// A one-shard token node with `slots` WebSocket slots and `settings`
/// (`key=value`, each passed with `--set`).
fn start(slots: usize, settings: &[&str]) -> NodeProc {
    let cap = format!("server.max_connections_per_shard={slots}");
    let secret = format!("auth.hmac_secret={SECRET}");
    let retry = format!("server.retry_after_secs={RETRY_AFTER}");
    let mut args = vec!["--shards", "1", "--set", cap.as_str(), "--set", "auth.mode=token", "--set", secret.as_str()];
    args.extend(["--set", retry.as_str()]);
    for s in settings {
        args.extend(["--set", *s]);
    }
    NodeProc::start(&args)
}

/// How an upgrade ended.
enum Outcome {
    /// 101.
    Open(Box<Ws>),
    /// An HTTP answer other than 101.
    Refused { status: u16, retry_after: Option<String> },
    /// No HTTP answer (the socket was closed, or nothing came in 20 s).
    Failed(String),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Open(_) => f.write_str("Open (101)"),
            Outcome::Refused { status, retry_after } => write!(f, "Refused {status} (Retry-After {retry_after:?})"),
            Outcome::Failed(e) => write!(f, "Failed: {e}"),
        }
    }
}

/// Upgrades to `url` with `Authorization: Bearer <tok>`; the outcome and
/// when it came.
async fn attempt(url: String, tok: String) -> (Outcome, Instant) {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {tok}").parse().unwrap());
    let r = tokio::time::timeout(Duration::from_secs(20), tokio_tungstenite::connect_async(req)).await;
    let at = Instant::now();
    let outcome = match r {
        Err(_) => Outcome::Failed("no answer within 20 s".into()),
        Ok(Ok((ws, resp))) => {
            assert_eq!(resp.status(), 101);
            Outcome::Open(Box::new(ws))
        }
        Ok(Err(tungstenite::Error::Http(resp))) => Outcome::Refused {
            status: resp.status().as_u16(),
            retry_after: resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string),
        },
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
    };
    (outcome, at)
}

/// [`attempt`] for client `sub` of `class` on `/ws`, as a task (it may wait).
fn spawn_attempt(node: &NodeProc, sub: &str, class: Option<&str>) -> JoinHandle<(Outcome, Instant)> {
    tokio::spawn(attempt(node.url("/ws"), token(sub, class)))
}

/// The result of a spawned [`attempt`] (20 s at most).
async fn finish(task: JoinHandle<(Outcome, Instant)>, who: &str) -> (Outcome, Instant) {
    tokio::time::timeout(Duration::from_secs(25), task)
        .await
        .unwrap_or_else(|_| panic!("{who}: the upgrade task did not finish"))
        .unwrap()
}

/// The open socket of `outcome`, after its welcome (client id `sub`).
async fn expect_open(outcome: Outcome, sub: &str) -> Ws {
    let mut ws = match outcome {
        Outcome::Open(ws) => *ws,
        other => panic!("{sub}: expected 101, got {other:?}"),
    };
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{sub}: {welcome}");
    assert_eq!(welcome["client_id"], sub, "{sub}: {welcome}");
    ws
}

/// Asserts a 503 with the node's `Retry-After`.
fn expect_503(outcome: &Outcome, who: &str) {
    match outcome {
        Outcome::Refused { status: 503, retry_after } => {
            assert_eq!(retry_after.as_deref(), Some(RETRY_AFTER), "{who}: Retry-After")
        }
        other => panic!("{who}: expected 503, got {other:?}"),
    }
}

/// A `/ws` client `sub` of `class` that gets its slot at once.
async fn open(node: &NodeProc, sub: &str, class: Option<&str>) -> Ws {
    let (outcome, _) = attempt(node.url("/ws"), token(sub, class)).await;
    expect_open(outcome, sub).await
}

/// An upgrade that must wait and be refused: 503 with `Retry-After`, no
/// sooner than `wait_ms` (its class's `priority.wait_ms_<class>`) and well
/// before the handshake timeout.
async fn expect_refused_after_wait(node: &NodeProc, sub: &str, class: &str, wait_ms: u64) {
    let t = Instant::now();
    let (outcome, at) = attempt(node.url("/ws"), token(sub, Some(class))).await;
    expect_503(&outcome, sub);
    let waited = at - t;
    assert!(
        waited >= Duration::from_millis(wait_ms - 10),
        "{sub}: refused after {waited:?}, before its {wait_ms} ms wait"
    );
    assert!(waited < Duration::from_millis(wait_ms + 3000), "{sub}: refused only after {waited:?}");
}

/// Closes from the client side and reads to the end, so that the node frees
/// the slot at once (it lingers until the peer's EOF).
async fn hang_up(mut ws: Ws) {
    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// Sends a `/ws` ping and reads its pong: the connection was active now.
async fn touch(ws: &mut Ws) {
    send_json(ws, json!({"type": "ping", "id": 1})).await;
    let pong = next_json(ws).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

/// Reads the `preempted` notice and then, as the very next frame, close
/// 4004; when the close came.
async fn expect_preempted(ws: &mut Ws, delay_ms: u64, who: &str) -> Instant {
    let notice = next_json(ws).await;
    assert_eq!(notice["type"], "preempted", "{who}: {notice}");
    assert_eq!(notice["reconnect_delay_ms"], delay_ms, "{who}: {notice}");
    assert!(notice["reason"].as_str().is_some_and(|r| !r.is_empty()), "{who}: {notice}");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: no close after the preempted notice"))
            .unwrap_or_else(|| panic!("{who}: stream ended without a close frame"))
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(Some(f)) => {
                assert_eq!(u16::from(f.code), 4004, "{who}: close {f:?}");
                return Instant::now();
            }
            other => panic!("{who}: expected close 4004 right after the notice, got {other:?}"),
        }
    }
}

/// One sample of `text` (exact series), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

/// `ringside_priority_<family>{class="<class>"}`.
fn by_class(family: &str, class: &str) -> String {
    format!("ringside_priority_{family}{{class=\"{class}\"}}")
}

/// Polls (5 s) until `series` reads exactly `want`; panics with what it read.
fn settle(node: &NodeProc, series: &str, want: f64) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, text) = node.get("/metrics");
        assert_eq!(status, 200, "GET /metrics");
        let got = sample(&text, series);
        if got == Some(want) {
            return;
        }
        if Instant::now() >= end {
            panic!("{series} is {got:?}, expected {want}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls (5 s) until `ringside_priority_connections` reads `want` (low,
/// normal, high, critical).
fn expect_classes(node: &NodeProc, want: [u32; 4], when: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = node.get("/metrics");
        let got = CLASSES.map(|c| sample(&text, &by_class("connections", c)));
        if got == want.map(|n| Some(f64::from(n))) {
            return;
        }
        if Instant::now() >= end {
            panic!("{when}: connections per class (low, normal, high, critical) are {got:?}, expected {want:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shard's waiting upgrades, `ringside_priority_waiting{shard="0"}`.
const WAITING: &str = "ringside_priority_waiting{shard=\"0\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_hold_free_slots_for_the_higher_classes() {
    let node = start(
        10,
        &[
            "priority.reserved_critical=0.1",
            "priority.reserved_high=0.2",
            "priority.wait_ms_low=300",
            "priority.wait_ms_normal=300",
            "priority.wait_ms_high=300",
        ],
    );
    // 10 slots: floor(10 × 0.1) = 1 for critical, floor(10 × 0.2) = 2 for high.
    for (class, n) in [("low", 0.0), ("normal", 0.0), ("high", 2.0), ("critical", 1.0)] {
        settle(&node, &by_class("reserved", class), n);
    }
    let mut normals = Vec::new();
    for i in 0..7 {
        normals.push(open(&node, &format!("n{i}"), Some("normal")).await);
    }
    expect_classes(&node, [0, 7, 0, 0], "7 normal");

    // 3 free, all 3 held back (1 critical + 2 high unused): the 8th normal
    // waits its 300 ms (the node is not full: nobody is preempted), then 503.
    expect_refused_after_wait(&node, "n7", "normal", 300).await;
    settle(&node, &by_class("refused_total", "normal"), 1.0);
    // Low is held back the same way.
    expect_refused_after_wait(&node, "l0", "low", 300).await;
    settle(&node, &by_class("refused_total", "low"), 1.0);
    settle(&node, &by_class("preempted_total", "normal"), 0.0);
    settle(&node, WAITING, 0.0);

    // High may take its own 2, not critical's 1.
    let h0 = open(&node, "h0", Some("high")).await;
    let h1 = open(&node, "h1", Some("high")).await;
    expect_classes(&node, [0, 7, 2, 0], "7 normal, 2 high");
    expect_refused_after_wait(&node, "h2", "high", 300).await;
    settle(&node, &by_class("refused_total", "high"), 1.0);
    // Normal still may not: the last free slot is critical's.
    expect_refused_after_wait(&node, "n8", "normal", 300).await;
    settle(&node, &by_class("refused_total", "normal"), 2.0);

    // Critical takes the last slot.
    let c0 = open(&node, "c0", Some("critical")).await;
    expect_classes(&node, [0, 7, 2, 1], "full: 7 normal, 2 high, 1 critical");

    // Every reservation used: a slot that frees goes to anyone, a normal too.
    hang_up(normals.remove(0)).await;
    expect_classes(&node, [0, 6, 2, 1], "a normal left");
    let n9 = open(&node, "n9", Some("normal")).await;
    expect_classes(&node, [0, 7, 2, 1], "a normal took the freed slot");
    for c in CLASSES {
        settle(&node, &by_class("preempted_total", c), 0.0);
    }
    drop((h0, h1, c0, n9, normals));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_takes_the_least_recently_active_of_the_lowest_class_below() {
    const DELAY: u64 = 1234;
    let delay = format!("priority.preempt_reconnect_delay_ms={DELAY}");
    let node = start(4, &[delay.as_str(), "priority.wait_ms_low=300"]);
    let gap = Duration::from_millis(50);
    let mut low_a = open(&node, "low_a", Some("low")).await;
    tokio::time::sleep(gap).await;
    let mut low_b = open(&node, "low_b", Some("low")).await;
    tokio::time::sleep(gap).await;
    let mut norm_a = open(&node, "norm_a", Some("normal")).await;
    tokio::time::sleep(gap).await;
    let mut norm_b = open(&node, "norm_b", Some("normal")).await;
    tokio::time::sleep(gap).await;
    // The older low and the newer normal speak: the least recently active
    // low is the newer low_b, the least recently active normal the older
    // norm_a (neither oldest-first nor newest-first picks both).
    touch(&mut low_a).await;
    tokio::time::sleep(gap).await;
    touch(&mut norm_b).await;
    expect_classes(&node, [2, 2, 0, 0], "full: 2 low, 2 normal");

    // A critical: low_b gets the notice, then 4004.
    let crit1 = spawn_attempt(&node, "crit1", Some("critical"));
    expect_preempted(&mut low_b, DELAY, "low_b").await;
    settle(&node, &by_class("preempted_total", "low"), 1.0);
    // Its slot is handed over at once: the critical does not wait for
    // low_b's close to complete (low_b keeps its socket open, unread, and
    // could hold it until the close deadline).
    let (outcome, _) = finish(crit1, "crit1").await;
    let crit1 = expect_open(outcome, "crit1").await;
    expect_classes(&node, [1, 2, 0, 1], "crit1 in place of low_b, whose close is still pending");
    drop(low_b);
    expect_silence(&mut low_a, 100).await;
    expect_silence(&mut norm_a, 100).await;
    expect_silence(&mut norm_b, 100).await;

    // Another critical: the other low goes (a low before any normal).
    let crit2 = spawn_attempt(&node, "crit2", Some("critical"));
    expect_preempted(&mut low_a, DELAY, "low_a").await;
    drop(low_a);
    let (outcome, _) = finish(crit2, "crit2").await;
    let crit2 = expect_open(outcome, "crit2").await;
    settle(&node, &by_class("preempted_total", "low"), 2.0);
    expect_classes(&node, [0, 2, 0, 2], "crit2 in place of low_a");

    // A high: the least recently active normal goes.
    let high = spawn_attempt(&node, "high", Some("high"));
    expect_preempted(&mut norm_a, DELAY, "norm_a").await;
    drop(norm_a);
    let (outcome, _) = finish(high, "high").await;
    let high = expect_open(outcome, "high").await;
    settle(&node, &by_class("preempted_total", "normal"), 1.0);
    expect_classes(&node, [0, 1, 1, 2], "high in place of norm_a");
    expect_silence(&mut norm_b, 100).await;

    // A low: nothing is below it; it waits, then 503.
    expect_refused_after_wait(&node, "low_c", "low", 300).await;
    settle(&node, &by_class("refused_total", "low"), 1.0);
    expect_silence(&mut norm_b, 100).await;
    expect_classes(&node, [0, 1, 1, 2], "after the refused low");
    for (class, n) in [("low", 2.0), ("normal", 1.0), ("high", 0.0), ("critical", 0.0)] {
        settle(&node, &by_class("preempted_total", class), n);
    }
    settle(&node, "ringside_connections_closed_total{code=\"4004\"}", 3.0);
    drop((crit1, crit2, high, norm_b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_upgrade_gets_the_slot_a_close_frees() {
    // Sweeps (which also wake waiters) only every 5 s: a waiter woken only
    // by a sweep would time out first.
    let node = start(2, &["priority.wait_ms_normal=3000", "websocket.sweep_interval_ms=5000"]);
    let a = open(&node, "a", Some("normal")).await;
    let b = open(&node, "b", Some("normal")).await;
    expect_classes(&node, [0, 2, 0, 0], "full");
    let waiter = spawn_attempt(&node, "c", Some("normal"));
    settle(&node, WAITING, 1.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "the waiting upgrade was answered while the node was full");
    let closed = Instant::now();
    hang_up(a).await;
    let (outcome, at) = finish(waiter, "c").await;
    let c = expect_open(outcome, "c").await;
    let after = at - closed;
    assert!(after < Duration::from_secs(1), "the waiter got the freed slot only {after:?} after the close");
    expect_classes(&node, [0, 2, 0, 0], "c in place of a");
    settle(&node, WAITING, 0.0);
    settle(&node, &by_class("refused_total", "normal"), 0.0);
    let (_, text) = node.get("/metrics");
    let count = sample(&text, "ringside_priority_wait_seconds_count{class=\"normal\"}").unwrap();
    let sum = sample(&text, "ringside_priority_wait_seconds_sum{class=\"normal\"}").unwrap();
    assert!(count >= 1.0, "wait count {count}");
    // It waited at least the 500 ms before the close.
    assert!(sum >= 0.45, "wait sum {sum} s");
    drop((b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_by_class_then_arrival_and_a_critical_is_never_preempted() {
    let node =
        start(1, &["priority.wait_ms_critical=300", "priority.wait_ms_high=3000", "priority.wait_ms_normal=3000"]);
    let crit = open(&node, "crit", Some("critical")).await;
    // Not even another critical preempts a critical.
    expect_refused_after_wait(&node, "crit2", "critical", 300).await;
    settle(&node, &by_class("refused_total", "critical"), 1.0);
    settle(&node, &by_class("preempted_total", "critical"), 0.0);
    expect_classes(&node, [0, 0, 0, 1], "the first critical stays");

    // A normal waits, then a high; neither can preempt the critical.
    let t_normal = Instant::now();
    let normal = spawn_attempt(&node, "norm", Some("normal"));
    settle(&node, WAITING, 1.0);
    let high = spawn_attempt(&node, "high", Some("high"));
    settle(&node, WAITING, 2.0);
    assert!(!normal.is_finished() && !high.is_finished(), "a waiter was answered while the node was full");

    // The slot frees: the high gets it, though the normal came first.
    hang_up(crit).await;
    let (outcome, _) = finish(high, "high").await;
    let high = expect_open(outcome, "high").await;
    expect_classes(&node, [0, 0, 1, 0], "the high took the slot");
    assert!(!normal.is_finished(), "the normal was answered before its wait ended");
    // The normal waits out its 3 s, then 503.
    let (outcome, at) = finish(normal, "norm").await;
    expect_503(&outcome, "norm");
    let waited = at - t_normal;
    assert!(waited >= Duration::from_millis(2990), "the normal was refused after {waited:?}, before its wait ended");
    settle(&node, &by_class("refused_total", "normal"), 1.0);
    settle(&node, &by_class("refused_total", "high"), 0.0);
    settle(&node, WAITING, 0.0);
    for c in CLASSES {
        settle(&node, &by_class("preempted_total", c), 0.0);
    }
    drop(high);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_is_bounded_by_the_handshake_timeout() {
    // The wait ends 250 ms before the handshake timeout (1 s from accept),
    // long before the class's 10 s, and is answered 503 in time: the sweep
    // never has to drop the socket without an answer.
    let node = start(1, &["priority.wait_ms_normal=10000", "server.handshake_timeout_ms=1000"]);
    let a = open(&node, "a", Some("normal")).await;
    let t = Instant::now();
    let (outcome, at) = attempt(node.url("/ws"), token("b", Some("normal"))).await;
    let waited = at - t;
    expect_503(&outcome, &format!("b (after {waited:?})"));
    assert!(waited >= Duration::from_millis(740), "refused after {waited:?}, before handshake timeout - 250 ms");
    assert!(waited < Duration::from_secs(3), "refused only after {waited:?} (its own wait is 10 s)");
    settle(&node, &by_class("refused_total", "normal"), 1.0);
    settle(&node, "ringside_connections_rejected_total{reason=\"full\",status=\"503\"}", 1.0);
    settle(&node, WAITING, 0.0);
    // Answered, so never dropped by the handshake timeout (sweeps run every second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    settle(&node, "ringside_connections_rejected_total{reason=\"handshake_timeout\",status=\"408\"}", 0.0);
    expect_classes(&node, [0, 1, 0, 0], "a stays");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_class_gauges_follow_the_connections() {
    let node = start(8, &[]);
    let (_, text) = node.get("/metrics");
    for family in ["connections", "reserved", "preempted_total", "refused_total"] {
        for c in CLASSES {
            assert!(sample(&text, &by_class(family, c)).is_some(), "no {}", by_class(family, c));
        }
    }
    for c in CLASSES {
        let series = format!("ringside_priority_wait_seconds_count{{class=\"{c}\"}}");
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    expect_classes(&node, [0, 0, 0, 0], "empty");
    let low = open(&node, "low", Some("low")).await;
    let norm = open(&node, "norm", Some("normal")).await;
    // A token without a `class` claim is normal.
    let plain = open(&node, "plain", None).await;
    let high = open(&node, "high", Some("high")).await;
    let crit = open(&node, "crit", Some("critical")).await;
    expect_classes(&node, [1, 2, 1, 1], "one of each, two normal");
    hang_up(norm).await;
    hang_up(high).await;
    expect_classes(&node, [1, 1, 0, 1], "a normal and the high left");
    hang_up(crit).await;
    hang_up(low).await;
    expect_classes(&node, [0, 1, 0, 0], "only the classless one left");
    hang_up(plain).await;
    expect_classes(&node, [0, 0, 0, 0], "all gone");
    // Nothing waited (every slot was free).
    let (_, text) = node.get("/metrics");
    for c in CLASSES {
        let series = format!("ringside_priority_wait_seconds_count{{class=\"{c}\"}}");
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }

    // Without tokens every client is `priority.default_class`.
    let anon = NodeProc::start(&["--shards", "1", "--set", "priority.default_class=high"]);
    let (x, _) = rooms_client(&anon, "x").await;
    let (y, _) = rooms_client(&anon, "y").await;
    expect_classes(&anon, [0, 0, 2, 0], "two anonymous clients");
    drop((x, y));
}
