//! Shared helpers for the integration tests: start a real `ringside`
//! process on port 0, talk to it with tokio-tungstenite (a client this
//! project did not write) or with raw sockets for malformed input.

#![allow(dead_code)]

mod logged;
#[allow(unused_imports)]
pub use logged::logged_addr;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client socket.
pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcp>>;

/// A node process; killed on drop.
pub struct NodeProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NodeProc {
    /// Starts `ringside --listen 127.0.0.1:0 <args>` and waits for its address.
    /// Client-chosen ids are allowed (`auth.allow_client_ids`): the tests
    /// name their clients; tests of the default use `start_command`.
    pub fn start(args: &[&str]) -> NodeProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringside"));
        cmd.args(["--listen", "127.0.0.1:0", "--set", "auth.allow_client_ids=true"]).args(args);
        NodeProc::start_command(cmd)
    }

    /// Starts `cmd` (a `ringside` command line that logs "listening on")
    /// with stdout discarded and stderr collected, and waits for its address.
    pub fn start_command(mut cmd: Command) -> NodeProc {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn ringside");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(addr);
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("ringside did not start: {:?}", log.lock().unwrap())
        });
        NodeProc { child, addr: addr.parse().unwrap(), log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc_kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for exit, returning the exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A plain HTTP GET; returns (status, headers+body text).
    pub fn get(&self, path: &str) -> (u16, String) {
        raw_request(self.addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// Value of one metric line (exact label set), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).map(|v| v.parse().unwrap()))
            .unwrap_or(0.0)
    }

    /// Polls until `series` reaches `want` (closes are counted when the
    /// close handshake finishes, a moment after the client sees the frame).
    pub fn eventually_metric(&self, series: &str, want: f64) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.metric(series) >= want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Polls until the sum of `name` over its series equals `want`.
    pub fn eventually_metric_eq(&self, name: &str, want: f64) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.metric_sum(name) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sum over every series of a metric name.
    pub fn metric_sum(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process killed (and reaped) on drop, whatever the test did.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `child` until it exits or `within` passes; the full status, so an
/// exit by signal is seen too (`ExitStatusExt::signal`).
pub fn wait_status(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound to 0, let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain GET that returns `None` (instead of panicking) when nothing
/// accepts or the connection breaks before a status line.
pub fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok())?;
    Some((status, text))
}

/// Polls `GET /health` on `addr` until it answers 200 or `within` passes.
pub fn wait_healthy(addr: SocketAddr, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if matches!(try_get(addr, "/health"), Some((200, _))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGTERM: i32 = 15;
pub const SIGINT: i32 = 2;

/// Sends raw bytes, reads until the server closes; returns (status, text).
pub fn raw_request(addr: SocketAddr, req: &str) -> (u16, String) {
    raw_bytes(addr, req.as_bytes())
}

pub fn raw_bytes(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Connects a tokio-tungstenite client.
pub async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// Next text message as JSON, within 5 s (pings are skipped).
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("stream ended")
            .expect("websocket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent invalid JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Asserts nothing arrives within `ms`.
pub async fn expect_silence(ws: &mut Ws, ms: u64) {
    if let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(ms), ws.next()).await {
        panic!("expected silence, got {m:?}");
    }
}

pub async fn send_json(ws: &mut Ws, v: serde_json::Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Reads until the close frame; returns its code (0 if closed without one).
pub async fn close_code(ws: &mut Ws, within: Duration) -> u16 {
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => panic!("no close within {within:?}"),
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)).unwrap_or(1005),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return 0,
        }
    }
}

/// A `/ws` client and its welcome.
pub async fn rooms_client(node: &NodeProc, id: &str) -> (Ws, serde_json::Value) {
    let mut ws = connect(&node.url(&format!("/ws?client_id={id}"))).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["client_id"], id);
    (ws, welcome)
}

/// A raw, completed WebSocket upgrade over std TCP (for malformed frames).
pub fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let (s, head) = raw_upgrade(addr, path, "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Sends an upgrade request for `path` with `extra` header lines (each
/// ending in `\r\n`) over std TCP; the socket and the response head.
pub fn raw_upgrade(addr: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

/// A masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads server frames from a raw socket until a close frame; returns its code.
pub fn raw_close_code(s: &mut TcpStream) -> u16 {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let mut i = 0;
    while i + 2 <= all.len() {
        let op = all[i] & 0x0f;
        let mut len = (all[i + 1] & 0x7f) as usize;
        let mut p = i + 2;
        if len == 126 {
            len = u16::from_be_bytes([all[p], all[p + 1]]) as usize;
            p += 2;
        } else if len == 127 {
            len = u64::from_be_bytes(all[p..p + 8].try_into().unwrap()) as usize;
            p += 8;
        }
        if op == 8 {
            return if len >= 2 { u16::from_be_bytes([all[p], all[p + 1]]) } else { 1005 };
        }
        i = p + len;
    }
    0
}
