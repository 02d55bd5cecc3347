//! Helpers for the client's integration tests: the workspace's real `ringside` binary
//! (found beside the test executable, `<target>/debug/ringside`, which `cargo test
//! --workspace` builds), started on a chosen or free port and restartable on the same
//! one, a real `redis-server`, HS256 tokens, and waiting for events.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringside_client::{Event, Events};

/// The HS256 secret of token-mode nodes.
pub const SECRET: &str = "client-tests-secret-0123456789abcdef-0123456789";

/// `<target>/debug/ringside`, or a clear failure.
pub fn ringside_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RINGSIDE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/debug/deps/<test> -> <target>/debug/ringside
    let bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("ringside")).expect("target dir");
    assert!(
        bin.exists(),
        "the server binary {} is missing: run `cargo test --workspace` (or `cargo build --bin ringside` first)",
        bin.display()
    );
    bin
}

/// A port free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A ringside process on a fixed port; killed on drop.
pub struct Node {
    child: Option<Child>,
    /// Its address.
    pub addr: SocketAddr,
    args: Vec<String>,
    /// Its stderr lines.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `ringside` on a free port with `--set` settings (`k=v`).
    pub fn start(settings: &[&str]) -> Node {
        Node::start_on(free_port(), &[], settings)
    }

    /// Starts on `port` with extra CLI args and `--set` settings.
    pub fn start_on(port: u16, args: &[&str], settings: &[&str]) -> Node {
        let mut all: Vec<String> =
            ["--shards", "2", "--set", "server.pin_cores=false", "--set", "auth.allow_client_ids=true"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        all.extend(args.iter().map(|s| s.to_string()));
        for kv in settings {
            all.push("--set".into());
            all.push(kv.to_string());
        }
        let mut n =
            Node { child: None, addr: SocketAddr::from(([127, 0, 0, 1], port)), args: all, log: Arc::default() };
        n.restart();
        n
    }

    /// (Re)starts the process on the same port and waits until `/health` answers
    /// (and, with `--redis`, until `/ready` shows the cluster connected: a room
    /// joined before that is answered epoch "none" and cannot be recovered).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        let listen = self.addr.to_string();
        let mut child = Command::new(ringside_bin())
            .args(["--listen", &listen])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringside");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let clustered = self.args.iter().any(|a| a == "--redis");
            let up = if clustered {
                self.try_get("/ready").is_some_and(|(s, body)| s == 200 && body.contains("\"redis\":\"closed\""))
            } else {
                self.try_get("/health").is_some_and(|(s, _)| s == 200)
            };
            if up {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ringside exited {st}: {:?}", self.log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        panic!("ringside did not start on {}: {:?}", self.addr, self.log.lock().unwrap());
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (drain); returns once the process exited.
    pub fn terminate(&mut self, within: Duration) {
        let Some(mut c) = self.child.take() else { return };
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + within;
        while Instant::now() < end {
            if c.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("ringside did not exit within {within:?} of SIGTERM");
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// `ws://addr/ws`
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// GET `path`: (status, whole response), `None` when nothing answers.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        Some((text.get(9..12)?.parse().ok()?, text))
    }

    /// Sum of a metric's series.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let Some((_, text)) = self.try_get("/metrics") else { return 0.0 };
        text.lines()
            .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` on a free port, no persistence; killed on drop.
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Redis {
    /// Starts one; fails the test when `redis-server` is missing (scripts/test installs it).
    pub fn start() -> Redis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: run scripts/test, which installs it");
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HS256 token for `sub`, valid `secs` from now, every room allowed.
pub fn token(sub: &str, secs: u64) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + secs;
    let claims = serde_json::json!({"sub": sub, "exp": exp, "rooms": ["*"]});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Settings of a token-mode node.
pub fn token_settings() -> Vec<String> {
    vec!["auth.mode=token".into(), format!("auth.hmac_secret={SECRET}"), "auth.leeway_secs=0".into()]
}

/// Reads events until `pred` matches one (returned) or `within` passes (panics, listing
/// what came).
pub async fn wait_event<F: FnMut(&Event) -> bool>(events: &mut Events, within: Duration, mut pred: F) -> Event {
    let end = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(end, events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(e)) => seen.push(e),
            Ok(None) => panic!("event stream ended; saw {seen:#?}"),
            Err(_) => panic!("no matching event within {within:?}; saw {seen:#?}"),
        }
    }
}

/// Polls `cond` every 20 ms until true or `within` passes.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut cond: F) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
