//! Helpers for the cluster integration tests: a real `redis-server` (or a
//! 3+3 Redis Cluster through scripts/redis-cluster) on free ports, ringside
//! node processes, tokio-tungstenite clients, and a Redis client to read
//! the registry. Every process is started here and killed by its own handle.
#![allow(dead_code)]

#[path = "../common/logged.rs"]
mod logged;
#[allow(unused_imports)]
pub use logged::logged_addr;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The sync interval the tests run nodes with.
pub const INTERVAL_MS: u64 = 200;

/// True when `redis-server` is usable; tries `apt-get install` once if not,
/// and fails the test when it cannot be had (scripts/test installs it: a
/// cluster test that passed without Redis would prove nothing).
pub fn redis_available() -> bool {
    let ok = || Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
    if ok() {
        return true;
    }
    let _ = Command::new("apt-get").args(["install", "-y", "redis-server", "redis-tools"]).status();
    if ok() {
        return true;
    }
    panic!("redis-server is missing and could not be installed: run scripts/test, which installs it");
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ringside-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `redis-server` process.
pub struct Redis {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: TempDir,
}

impl Redis {
    /// Starts one on a free port, no persistence.
    pub fn start() -> Redis {
        let dir = TempDir::new("redis");
        let mut r = Redis { child: None, port: free_port(), dir };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: nothing saved, every connection reset).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .current_dir(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        assert!(wait_port(self.port, Duration::from_secs(5)), "redis-server did not start on {}", self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A 3 masters + 3 replicas Redis Cluster started by scripts/redis-cluster.
pub struct RedisCluster {
    dir: TempDir,
    /// First port (ports base..base+5).
    pub base: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster")
}

impl RedisCluster {
    /// Starts it on six consecutive free ports; `None` if the script failed.
    pub fn start() -> Option<RedisCluster> {
        let dir = TempDir::new("rcluster");
        for _ in 0..5 {
            let base = 20000 + (free_port() % 20000);
            if (0..6).any(|i| TcpListener::bind(("127.0.0.1", base + i)).is_err()) {
                continue;
            }
            let st = Command::new(script()).args(["start", &dir.0.display().to_string(), &base.to_string()]).status();
            if st.is_ok_and(|s| s.success()) {
                return Some(RedisCluster { dir, base });
            }
            let _ = Command::new(script()).args(["stop", &dir.0.display().to_string(), &base.to_string()]).status();
        }
        None
    }

    /// The three master URLs, comma-separated (cluster mode).
    pub fn urls(&self) -> String {
        (0..3).map(|i| format!("redis://127.0.0.1:{}", self.base + i)).collect::<Vec<_>>().join(",")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ =
            Command::new(script()).args(["stop", &self.dir.0.display().to_string(), &self.base.to_string()]).status();
    }
}

/// A ringside node process.
pub struct Node {
    child: Child,
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Everything it wrote on stderr.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `ringside` with `id`, `redis_url` and the test interval.
    pub fn start(id: &str, redis_url: &str) -> Node {
        Node::start_with(id, redis_url, &[])
    }

    /// [`Node::start`] with more `--set key=value` settings.
    pub fn start_with(id: &str, redis_url: &str, settings: &[&str]) -> Node {
        Node::start_args(id, redis_url, settings, &[])
    }

    /// [`Node::start_with`] with more command-line arguments.
    pub fn start_args(id: &str, redis_url: &str, settings: &[&str], args: &[&str]) -> Node {
        let interval = format!("cluster.sync_interval_ms={INTERVAL_MS}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringside"))
            .args(["--listen", "127.0.0.1:0", "--shards", "2", "--node-id", id, "--redis", redis_url])
            .args(["--set", &interval, "--set", "server.pin_cores=false", "--set", "websocket.sweep_interval_ms=100"])
            .args(["--set", "auth.allow_client_ids=true"])
            .args(settings.iter().flat_map(|kv| ["--set", kv]))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringside");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on ") {
                    let rest = &line[i + 13..];
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).expect("node did not print its address");
        let node = Node { child, id: id.to_string(), addr: addr.parse().expect("address"), log };
        // Until its cluster thread reaches Redis a node answers cross-node
        // operations "unavailable" (a join: epoch "none"). Tests start from a
        // connected node; one whose Redis is down on purpose waits 3 s here.
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && node.breaker() != "closed" {
            std::thread::sleep(Duration::from_millis(10));
        }
        node
    }

    /// Sends signal `sig` (15: SIGTERM, a drain).
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Waits up to `within` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET path` body.
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(self.addr) else { return String::new() };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }

    /// `GET path`: the status code and the body as JSON.
    pub fn get_status(&self, path: &str) -> (u16, Value) {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(self.addr) else { return (0, Value::Null) };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `GET path` as JSON.
    pub fn get_json(&self, path: &str) -> Value {
        serde_json::from_str(self.get(path).trim()).unwrap_or(Value::Null)
    }

    /// The breaker state from /ready.
    pub fn breaker(&self) -> String {
        self.get_json("/ready")["cluster"]["redis"].as_str().unwrap_or("").to_string()
    }

    /// One counter from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of every series of `name`, with or without labels.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until the breaker is closed; the time it took.
    pub async fn wait_closed(&self, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.breaker() == "closed" {
                return Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `/ws` client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TokioTcp>>,
    /// Its client id.
    pub id: String,
    /// The welcome message.
    pub welcome: Value,
}

impl Client {
    /// Connects to `node` as `client_id` and reads the welcome.
    pub async fn connect(node: &Node, client_id: &str) -> Client {
        let url = format!("ws://{}/ws?client_id={client_id}", node.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        let mut c = Client { ws, id: client_id.to_string(), welcome: Value::Null };
        c.welcome = c.recv().await.expect("welcome");
        assert_eq!(c.welcome["type"], "welcome", "{}", c.welcome);
        c
    }

    /// Sends a JSON message.
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    /// The next JSON message within 3 s.
    pub async fn recv(&mut self) -> Option<Value> {
        self.recv_within(Duration::from_secs(3)).await
    }

    /// The next JSON message within `d`.
    pub async fn recv_within(&mut self, d: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??.ok()?;
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).ok();
            }
        }
    }

    /// Every message that arrives within `d`.
    pub async fn drain(&mut self, d: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + d;
        let mut out = Vec::new();
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            if let Message::Text(t) = msg {
                if let Ok(v) = serde_json::from_str(t.as_str()) {
                    out.push(v);
                }
            }
        }
        out
    }

    /// The close code the server sends within `d` (skipping other messages).
    pub async fn close_code(&mut self, d: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?? {
                Ok(Message::Close(f)) => return Some(f.map(|f| u16::from(f.code)).unwrap_or(1005)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Joins `room` and waits for the ack.
    pub async fn join(&mut self, room: &str) {
        self.send(json!({"type": "join", "room": room})).await;
        let ack = self.recv().await.expect("join ack");
        assert_eq!(ack["type"], "joined", "{ack}");
    }

    /// Publishes `data` to `room`.
    pub async fn publish(&mut self, room: &str, data: Value) {
        self.send(json!({"type": "publish", "room": room, "data": data})).await;
    }

    /// Sends `data` directly to client `to`.
    pub async fn direct(&mut self, to: &str, data: Value) {
        self.send(json!({"type": "direct", "to": to, "data": data})).await;
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while self.ws.next().await.is_some() {} }).await;
    }
}

/// A Redis connection for reading the registry.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).expect("url").get_multiplexed_async_connection().await.expect("redis connect")
}

/// Waits until `check` holds, polling every 25 ms; false on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Subscribers of `channel` (PUBSUB NUMSUB).
pub async fn numsub(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let r: redis::RedisResult<(String, i64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(conn).await;
    r.map(|(_, n)| n).unwrap_or(-1)
}

/// The `data` of every `message` in `msgs`.
pub fn room_data(msgs: &[Value]) -> Vec<Value> {
    msgs.iter().filter(|m| m["type"] == "message").map(|m| m["data"].clone()).collect()
}
