//! The backend proxy and its pools against a real HTTP backend this project
//! did not write (Python's standard-library threading HTTP server,
//! tests/python/upstream_backend.py): connect allow / deny / rewrite, RPC
//! round trips and errors, the publish proxy, disconnect notices, pool
//! exhaustion, idle reaping, lifetime rotation, min refill, health checks,
//! a killed and restarted backend (breaker open, probe, closed; local
//! traffic unaffected), leak detection, and the dashboard in headless
//! Chromium.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The Python backend, killed on drop.
struct Backend {
    _proc: KillOnDrop,
    port: u16,
}

impl Backend {
    fn start(port: u16) -> Backend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/upstream_backend.py");
        let mut child = Command::new("python3")
            .args([script, "--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 must be installed (scripts/test installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port =
            line.trim().strip_prefix("PORT ").unwrap_or_else(|| panic!("backend said {line:?}")).parse().unwrap();
        Backend { _proc: KillOnDrop(child), port }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn get(&self, path: &str) -> Value {
        let (status, text) = try_get(self.addr(), path).expect("backend answers");
        assert_eq!(status, 200, "{text}");
        body_json(&text)
    }

    fn post(&self, path: &str) {
        let (status, _) = raw_request(
            self.addr(),
            &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200);
    }
}

fn body_json(text: &str) -> Value {
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A node with `toml` as its config file, its admin listener on a free port.
fn node(name: &str, toml: &str, extra: &[&str]) -> (NodeProc, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("ringside-upstream-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    std::fs::write(&file, toml).unwrap();
    let mut args = vec!["--config".to_string(), file.display().to_string()];
    args.extend(["--set".into(), "server.admin_listen=127.0.0.1:0".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = NodeProc::start(&refs);
    let admin = logged_addr(&node.log, "internal endpoints");
    (node, admin)
}

fn upstream(port: u16, knobs: &str) -> String {
    format!("[[upstream]]\nname = \"app\"\nurl = \"http://127.0.0.1:{port}\"\n{knobs}\n")
}

fn pools(admin: SocketAddr) -> Value {
    let (status, text) = try_get(admin, "/pools").expect("admin answers");
    assert_eq!(status, 200, "{text}");
    body_json(&text)
}

fn pool(admin: SocketAddr) -> Value {
    pools(admin)["pools"][0].clone()
}

/// Polls `/pools` until `ok(pool)` holds (generous: the machine is shared).
fn until(admin: SocketAddr, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let p = pool(admin);
        if ok(&p) {
            return p;
        }
        assert!(Instant::now() < end, "never: {what}; last /pools: {p:#}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

async fn rpc(ws: &mut Ws, id: u64, method: &str, data: Value) -> Value {
    send_json(ws, json!({"type": "rpc", "id": id, "method": method, "data": data})).await;
    loop {
        let m = next_json(ws).await;
        if m["id"] == id {
            return m;
        }
    }
}

async fn wait_for(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let m = next_json(ws).await;
        if m["type"] == ty {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_proxy_allows_denies_and_rewrites_with_publish_proxy_and_disconnects() {
    let b = Backend::start(0);
    let toml = format!(
        "{}[proxy]\nconnect = \"app\"\ndisconnect = \"app\"\ndisconnect_flush_ms = 50\n\
         [[proxy.publish]]\nrooms = \"moderated\"\nupstream = \"app\"\n",
        upstream(b.port, "")
    );
    let (n, _admin) = node("connect", &toml, &[]);
    // Allowed: the backend names the client (over the id it asked for),
    // puts it in "lobby", gives it a class and welcome data.
    let mut alice = connect(&n.url("/ws?user=alice&client_id=mallory")).await;
    let w = next_json(&mut alice).await;
    assert_eq!((w["type"].as_str(), w["client_id"].as_str()), (Some("welcome"), Some("alice")), "{w}");
    assert_eq!(w["data"]["greeting"], "hello alice");
    assert_eq!(w["data"]["addr"], "127.0.0.1");
    assert_eq!(next_json(&mut alice).await, json!({"type": "joined", "room": "lobby"}));
    // Denied: 403 with the backend's code and reason.
    let (_s, head) = raw_upgrade(n.addr, "/ws?user=banned", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // No opinion: the client's own id stands (allow_client_ids is on).
    let (mut bob, _) = rooms_client(&n, "bob").await;
    // The publish proxy rewrites, or rejects.
    for ws in [&mut alice, &mut bob] {
        send_json(ws, json!({"type": "join", "room": "moderated"})).await;
        assert_eq!(wait_for(ws, "joined").await["room"], "moderated");
    }
    send_json(&mut alice, json!({"type": "publish", "room": "moderated", "data": {"text": "hi"}})).await;
    let m = wait_for(&mut bob, "message").await;
    assert_eq!(m["data"], json!({"text": "HI", "by": "alice"}), "{m}");
    send_json(&mut alice, json!({"type": "publish", "room": "moderated", "data": {"text": "bad words"}})).await;
    let e = wait_for(&mut alice, "error").await;
    assert_eq!(e["code"], "publish_rejected", "{e}");
    assert!(e["message"].as_str().unwrap().contains("moderated"), "{e}");
    expect_silence(&mut bob, 300).await;
    // Disconnect notices arrive in batches.
    drop(alice);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = b.get("/control/disconnects");
        if seen.as_array().unwrap().iter().any(|d| d["client_id"] == "alice") {
            break;
        }
        assert!(Instant::now() < end, "no disconnect notice for alice: {seen}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n.metric("ringside_connections_rejected_total{reason=\"connect_denied\",status=\"403\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_round_trips_and_errors() {
    let b = Backend::start(0);
    let toml =
        format!("{}[[proxy.rpc]]\nmethods = \"app.*\"\nupstream = \"app\"\n", upstream(b.port, "retry_attempts = 1"));
    let (n, admin) = node("rpc", &toml, &[]);
    let (mut ws, _) = rooms_client(&n, "carol").await;
    let r = rpc(&mut ws, 1, "app.echo", json!({"x": [1, 2]})).await;
    assert_eq!(r, json!({"type": "rpc_result", "id": 1, "data": {"echo": {"x": [1, 2]}, "client_id": "carol"}}));
    for i in 0..20u64 {
        let r = rpc(&mut ws, 100 + i, "app.add", json!([i, 1])).await;
        assert_eq!(r["data"], i + 1, "{r}");
    }
    let r = rpc(&mut ws, 2, "app.fail", json!(null)).await;
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("rpc_failed")), "{r}");
    assert_eq!(r["backend"], json!({"code": "boom", "reason": "failed on purpose"}));
    let r = rpc(&mut ws, 3, "app.crash", json!(null)).await;
    assert_eq!(r["code"], "rpc_failed", "{r}");
    let r = rpc(&mut ws, "4".parse().unwrap(), "other.thing", json!(null)).await;
    assert_eq!(r["code"], "rpc_failed", "no route: {r}");
    // Keep-alive: 23 calls, one connection (min 1, calls one at a time).
    let p = pool(admin);
    assert_eq!(p["created"], 1, "{p:#}");
    assert!(b.get("/control/stats")["accepted"].as_u64().unwrap() <= 2);
    assert_eq!(p["requests"]["ok"], 21 + 1, "echo, 20 adds and the fail answer (a 200): {p:#}");
    assert_eq!(p["requests"]["server_error"], 1);
    assert!(p["retries"].as_u64().unwrap() >= 1, "the 500 was retried: {p:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_queues_then_times_out_never_past_max() {
    let b = Backend::start(0);
    let knobs = "min_connections = 0\nmax_connections = 2\nacquire_timeout_ms = 1000\nrequest_timeout_ms = 8000\nretry_attempts = 0";
    let toml = format!("{}[[proxy.rpc]]\nmethods = \"*\"\nupstream = \"app\"\n", upstream(b.port, knobs));
    let (n, admin) = node("exhaust", &toml, &[]);
    let (mut c1, _) = rooms_client(&n, "c1").await;
    let (mut c2, _) = rooms_client(&n, "c2").await;
    // Waits: 6 calls of 200 ms on 2 connections all get through in turn.
    for i in 0..6u64 {
        send_json(&mut c1, json!({"type": "rpc", "id": i, "method": "slow", "data": {"ms": 200}})).await;
    }
    for _ in 0..6 {
        assert_eq!(wait_for(&mut c1, "rpc_result").await["data"], "slept");
    }
    // Then timeouts: 20 calls of 2.5 s; two get the connections, the other
    // 18 wait the acquire timeout (1 s) and are refused.
    for (k, ws) in [&mut c1, &mut c2].into_iter().enumerate() {
        for i in 0..10u64 {
            let id = 100 + 10 * k as u64 + i;
            send_json(ws, json!({"type": "rpc", "id": id, "method": "slow", "data": {"ms": 2500}})).await;
        }
    }
    until(admin, "calls pending for a connection", |p| p["pending"].as_u64().unwrap() >= 1);
    let (mut ok, mut refused) = (0, 0);
    for ws in [&mut c1, &mut c2] {
        for _ in 0..10 {
            let m = loop {
                let m = next_json(ws).await;
                if m["type"] == "rpc_result" || m["type"] == "error" {
                    break m;
                }
            };
            match m["type"].as_str() {
                Some("rpc_result") => ok += 1,
                _ => {
                    assert_eq!(m["code"], "backend_unavailable", "{m}");
                    refused += 1;
                }
            }
        }
    }
    assert_eq!((ok, refused), (2, 18));
    let p = pool(admin);
    assert_eq!(p["requests"]["acquire_timeout"], 18, "{p:#}");
    assert!(p["total"].as_u64().unwrap() <= 2);
    assert!(b.get("/control/stats")["max_open"].as_u64().unwrap() <= 2, "the backend never saw more than 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reaping_lifetime_rotation_and_min_refill() {
    let b = Backend::start(0);
    let knobs = "min_connections = 1\nmax_connections = 5\nidle_timeout_ms = 300\nmax_lifetime_ms = 1500";
    let toml = format!("{}[[proxy.rpc]]\nmethods = \"*\"\nupstream = \"app\"\n", upstream(b.port, knobs));
    let (n, admin) = node("reap", &toml, &[]);
    // Min refill: one connection opens with no traffic at all.
    until(admin, "min_connections opened", |p| p["total"] == 1 && p["idle"] == 1);
    let (mut ws, _) = rooms_client(&n, "dave").await;
    for i in 0..5u64 {
        send_json(&mut ws, json!({"type": "rpc", "id": i, "method": "slow", "data": {"ms": 400}})).await;
    }
    for _ in 0..5 {
        wait_for(&mut ws, "rpc_result").await;
    }
    assert_eq!(b.get("/control/stats")["max_open"], 5, "five at once");
    // Idle reaping back to the minimum.
    let p = until(admin, "reaped to min", |p| p["total"] == 1 && p["closed"]["idle"].as_u64().unwrap() >= 3);
    assert!(p["created"].as_u64().unwrap() >= 5);
    // Lifetime rotation: calls keep one connection busy; it is retired
    // past 1.5 s and replaced.
    let created = p["created"].as_u64().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let mut i = 100;
    loop {
        assert_eq!(rpc(&mut ws, i, "echo", json!(i)).await["type"], "rpc_result");
        i += 1;
        let p = pool(admin);
        if p["closed"]["lifetime"].as_u64().unwrap() >= 1 && p["created"].as_u64().unwrap() > created {
            break;
        }
        assert!(Instant::now() < end, "no lifetime rotation: {p:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until(admin, "refilled after rotation", |p| p["total"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_fails_and_recovers() {
    let b = Backend::start(0);
    let knobs = "min_connections = 2\nhealth_check_interval_ms = 150\ncircuit_breaker_cooldown_ms = 300";
    let (_n, admin) = node("health", &upstream(b.port, knobs), &[]);
    until(admin, "two healthy connections", |p| p["total"] == 2 && p["healthy"] == true);
    b.post("/control/health?fail=1");
    let p = until(admin, "unhealthy", |p| p["healthy"] == false && p["health_check_failures"].as_u64().unwrap() >= 1);
    let alerts = pools(admin)["alerts"].clone();
    assert!(alerts.as_array().unwrap().iter().any(|a| a["type"] == "unhealthy"), "{alerts} {p}");
    let before = p["created"].as_u64().unwrap();
    b.post("/control/health?fail=0");
    let p = until(admin, "healthy again", |p| p["healthy"] == true && p["breaker"] == "closed");
    assert!(p["created"].as_u64().unwrap() > before || p["closed"]["error"].as_u64().unwrap() >= 1, "{p:#}");
    until(admin, "connections replaced", |p| p["total"] == 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_opens_the_breaker_and_local_traffic_goes_on() {
    let b = Backend::start(0);
    let port = b.port;
    let knobs = "circuit_breaker_threshold = 3\ncircuit_breaker_cooldown_ms = 500\nretry_attempts = 0\nhealth_check_path = \"\"";
    let toml = format!(
        "{}[proxy]\nconnect = \"app\"\n[[proxy.rpc]]\nmethods = \"*\"\nupstream = \"app\"\n",
        upstream(port, knobs)
    );
    let (n, admin) = node("kill", &toml, &[]);
    let (mut a, _) = rooms_client(&n, "ann").await;
    let (mut z, _) = rooms_client(&n, "zed").await;
    for ws in [&mut a, &mut z] {
        send_json(ws, json!({"type": "join", "room": "local"})).await;
        wait_for(ws, "joined").await;
    }
    assert_eq!(rpc(&mut a, 1, "echo", json!(1)).await["type"], "rpc_result");
    drop(b);
    // Failing calls open the breaker; then calls fail fast.
    let end = Instant::now() + Duration::from_secs(20);
    let mut i = 10;
    loop {
        let r = rpc(&mut a, i, "echo", json!(i)).await;
        assert_eq!(r["code"], "backend_unavailable", "{r}");
        i += 1;
        if pool(admin)["breaker"] == "open" {
            break;
        }
        assert!(Instant::now() < end, "breaker never opened");
    }
    let r = rpc(&mut a, i, "echo", json!(0)).await;
    assert_eq!(r["code"], "backend_unavailable");
    assert!(pool(admin)["requests"]["circuit_open"].as_u64().unwrap() >= 1 || pool(admin)["breaker"] == "half_open");
    // Everything local keeps working: rooms, direct, echo.
    send_json(&mut a, json!({"type": "publish", "room": "local", "data": "still here"})).await;
    assert_eq!(wait_for(&mut z, "message").await["data"], "still here");
    send_json(&mut z, json!({"type": "direct", "to": "ann", "data": 7})).await;
    assert_eq!(wait_for(&mut a, "direct").await["data"], 7);
    // A new upgrade cannot be asked about: 503 with Retry-After.
    let (_s, head) = raw_upgrade(n.addr, "/ws?user=newcomer", "");
    assert!(head.starts_with("HTTP/1.1 503") && head.contains("Retry-After:"), "{head}");
    // Restarted on the same port: the half-open probe closes the breaker.
    let _b2 = Backend::start(port);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let r = rpc(&mut a, i, "echo", json!(i)).await;
        i += 1;
        if r["type"] == "rpc_result" {
            break;
        }
        assert!(Instant::now() < end, "never recovered: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pool(admin)["breaker"], "closed");
    let mut c = connect(&n.url("/ws?user=newcomer")).await;
    assert_eq!(next_json(&mut c).await["client_id"], "newcomer");
    send_json(&mut a, json!({"type": "publish", "room": "local", "data": "after"})).await;
    assert_eq!(wait_for(&mut z, "message").await["data"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_held_past_leak_detection_is_counted_and_logged() {
    let b = Backend::start(0);
    let knobs = "leak_detection_ms = 300\nrequest_timeout_ms = 5000";
    let toml = format!("{}[[proxy.rpc]]\nmethods = \"*\"\nupstream = \"app\"\n", upstream(b.port, knobs));
    let (n, admin) = node("leak", &toml, &[]);
    let (mut ws, _) = rooms_client(&n, "erin").await;
    assert_eq!(rpc(&mut ws, 1, "echo", json!(1)).await["type"], "rpc_result");
    assert_eq!(pool(admin)["leaks"], 0, "a quick call is no leak");
    assert_eq!(rpc(&mut ws, 2, "slow", json!({"ms": 1200})).await["data"], "slept");
    assert_eq!(pool(admin)["leaks"], 1);
    assert!(n.log.lock().unwrap().iter().any(|l| l.contains("leak_detection_ms")), "logged");
    assert!(n.metric("ringside_upstream_leaks_total{upstream=\"app\"}") >= 1.0);
}

#[test]
fn dashboard_renders_shards_and_pools_in_headless_chromium() {
    let b = Backend::start(0);
    let (_n, admin) = node("dash", &upstream(b.port, ""), &["--set", "server.shards=2"]);
    until(admin, "pool open", |p| p["total"] == 1);
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
            &format!("http://{admin}/dashboard"),
        ])
        .output()
        .expect("chromium must be installed (scripts/test installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains(r#"<span class="pool-name">app</span>"#), "pool row missing: {dom}");
    assert_eq!(dom.matches(r#"<tr class="shard">"#).count(), 2, "two shard rows: {dom}");
    assert!(dom.contains("2 shard(s), 1 pool(s)"), "{dom}");
    assert!(dom.contains(r#"class="breaker closed""#), "{dom}");
}

const SECRET: &str = "upstream-tests-hs256-secret-0123456789abcdef";

fn token(sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"sub": sub, "exp": exp, "rooms": ["*"]}), &key)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_backend_sees_claims_and_a_dead_one_falls_back_to_the_token() {
    let b = Backend::start(0);
    let port = b.port;
    let toml = format!(
        "[auth]\nmode = \"token\"\nhmac_secret = \"{SECRET}\"\n[proxy]\nconnect = \"app\"\nconnect_fallback = \"token\"\n{}",
        upstream(port, "retry_attempts = 0\nhealth_check_path = \"\"")
    );
    let (n, admin) = node("fallback", &toml, &[]);
    // Up: the backend gets the verified claims and names the client.
    let mut ws = connect(&n.url(&format!("/ws?user=frank&token={}", token("u-frank")))).await;
    let w = next_json(&mut ws).await;
    assert_eq!(w["client_id"], "frank", "{w}");
    assert_eq!(w["data"]["claims"]["sub"], "u-frank");
    // Without a token the backend is not even asked: 401.
    let (_s, head) = raw_upgrade(n.addr, "/ws?user=frank", "");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Down: admitted on the token alone, as its sub.
    drop(b);
    let mut ws = connect(&n.url(&format!("/ws?user=gina&token={}", token("u-gina")))).await;
    let w = next_json(&mut ws).await;
    assert_eq!(w["client_id"], "u-gina", "{w}");
    assert!(w.get("data").is_none());
    assert!(n.metric("ringside_connect_fallbacks_total") >= 1.0);
    assert!(pool(admin)["requests"]["connect_error"].as_u64().unwrap() >= 1);
}
