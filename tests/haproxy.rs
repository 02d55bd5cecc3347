//! A real `haproxy` running the shipped tuning/haproxy/haproxy.cfg in front
//! of two nodes and a real `redis-server`. The file is adapted only in
//! ports, paths and privilege (no `user`/`group`/`chroot`, log to stdout, the
//! stats socket in a temp dir) and in the fd-bound `maxconn` (the file's own
//! note: with 20,000 fds per process HAProxy cannot raise its limit to what
//! maxconn 100,000 needs). Checked through HAProxy: the client address
//! carried by PROXY v2 (per-address limits apply to the real clients),
//! stickiness by client id, agent-check weights that follow a node's load,
//! and a drain: the node's clients get a hint, come back through HAProxy
//! and land on the other node, as do new clients.

mod cluster_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

struct Haproxy {
    child: Child,
    port: u16,
    socket: PathBuf,
    _dir: TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    /// The shipped file, adapted, in front of `n1` and `n2` (n3 points at a
    /// port nobody serves: it stays DOWN, as a dead node would).
    fn start(n1: SocketAddr, agent1: u16, n2: SocketAddr, agent2: u16) -> Haproxy {
        let have = Command::new("haproxy").arg("-v").output().is_ok_and(|o| o.status.success());
        assert!(have, "haproxy is missing: run scripts/test, which installs it");
        let dir = TempDir::new("haproxy");
        let socket = dir.0.join("admin.sock");
        let port = free_port();
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/haproxy/haproxy.cfg"))
            .expect("tuning/haproxy/haproxy.cfg");
        let mut cfg = String::new();
        for line in shipped.lines() {
            let t = line.trim_start();
            if t.starts_with("user ") || t.starts_with("group ") || t.starts_with("chroot ") {
                continue;
            }
            let line = line
                .replace("log /dev/log local0", "log stdout format raw local0")
                .replace("/run/haproxy/admin.sock", &socket.display().to_string())
                .replace("maxconn 100000", "maxconn 9000")
                .replace("maxconn 90000", "maxconn 8000")
                .replace("bind :8080", &format!("bind 127.0.0.1:{port}"))
                .replace("bind 127.0.0.1:8404", &format!("bind 127.0.0.1:{}", free_port()))
                .replace("127.0.0.1:8081 agent-port 9081", &format!("{n1} agent-port {agent1}"))
                .replace("127.0.0.1:8082 agent-port 9082", &format!("{n2} agent-port {agent2}"))
                .replace(
                    "127.0.0.1:8083 agent-port 9083",
                    &format!("127.0.0.1:{} agent-port {}", free_port(), free_port()),
                );
            cfg.push_str(&line);
            cfg.push('\n');
        }
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("haproxy: {line}");
            }
        });
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy { child, port, socket, _dir: dir }
    }

    /// `show stat` for backend `ringside`'s server `name`: (status, weight).
    fn server(&self, name: &str) -> (String, u32) {
        let mut s = UnixStream::connect(&self.socket).expect("stats socket");
        s.write_all(b"show stat\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let mut lines = out.lines();
        let head: Vec<&str> = lines.next().unwrap_or("").trim_start_matches("# ").split(',').collect();
        let col = |n: &str| head.iter().position(|h| *h == n).expect("column");
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() > col("weight") && f[0] == "ringside" && f[1] == name {
                return (f[col("status")].to_string(), f[col("weight")].parse().unwrap_or(0));
            }
        }
        panic!("no server {name} in: {out}");
    }

    async fn until(&self, what: &str, mut ok: impl FnMut(&Haproxy) -> bool) {
        let end = Instant::now() + Duration::from_secs(15);
        while !ok(self) {
            assert!(Instant::now() < end, "{what}: n1 {:?}, n2 {:?}", self.server("n1"), self.server("n2"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A `/ws` client for `id` from source address `src`, to `port` (HAProxy or a node).
async fn connect_from(src: &str, port: u16, id: &str) -> Result<(Ws, Value), String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let stream = sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.map_err(|e| e.to_string())?;
    let url = format!("ws://127.0.0.1:{port}/ws?client_id={id}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(|e| e.to_string())?;
    let welcome = next_text(&mut ws, Duration::from_secs(5)).await.ok_or("no welcome")?;
    Ok((ws, welcome))
}

async fn next_text(ws: &mut Ws, within: Duration) -> Option<Value> {
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).ok(),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_carries_addresses_sticks_weighs_and_drains() {
    assert!(redis_available());
    let redis = Redis::start();
    let node = |id: &str| {
        Node::start_with(
            id,
            &redis.url(),
            &[
                "server.trusted_proxies=127.0.0.1",
                "limits.max_connections_per_ip=1",
                "server.max_connections_per_shard=20",
                "server.agent_listen=127.0.0.1:0",
                "cluster.reconnect_via=balancer",
                "shutdown.drain_timeout_ms=20000",
                "shutdown.reconnect_spread_ms=500",
            ],
        )
    };
    let (mut a, b) = (node("a"), node("b"));
    let agent_a = logged_addr(&a.log, "agent-check").port();
    let agent_b = logged_addr(&b.log, "agent-check").port();
    let hap = Haproxy::start(a.addr, agent_a, b.addr, agent_b);
    hap.until("both nodes up with agent weights", |h| {
        let (s1, w1) = h.server("n1");
        let (s2, w2) = h.server("n2");
        s1 == "UP" && s2 == "UP" && w1 > 0 && w2 > 0
    })
    .await;

    // PROXY v2: three clients from three addresses, each node allows one
    // per address. Seen as HAProxy's one address, every one after the first
    // would be refused. Two real addresses can share a hashed bucket
    // (src/runtime/limits.rs) and so one slot: such an address is skipped,
    // and the node must have refused exactly those.
    let mut via = Vec::new();
    let mut shared_bucket = 0.0;
    for last in 2..=12u8 {
        if via.len() == 3 {
            break;
        }
        let (src, id) = (format!("127.0.0.{last}"), format!("x{last}"));
        match connect_from(&src, hap.port, &id).await {
            Ok((ws, welcome)) => {
                assert_eq!(welcome["type"], "welcome", "{welcome}");
                via.push((src, id, welcome["node"].as_str().unwrap().to_string(), ws));
            }
            Err(e) if e.contains("429") => shared_bucket += 1.0,
            Err(e) => panic!("upgrade through haproxy from {src}: {e}"),
        }
    }
    assert_eq!(via.len(), 3, "PROXY v2 addresses not told apart ({shared_bucket} refusals)");
    assert_eq!(
        a.metric_sum("ringside_connections_rejected_total") + b.metric_sum("ringside_connections_rejected_total"),
        shared_bucket
    );

    // Stickiness by client id: each comes back to its node.
    for (src, id, home, ws) in via.iter_mut() {
        let _ = ws.close(None).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut again = None;
        for _ in 0..20 {
            // The old session may still hold this address's one slot for a moment.
            match connect_from(src, hap.port, id).await {
                Ok(c) => {
                    again = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let (new_ws, welcome) = again.expect("reconnect through haproxy");
        assert_eq!(welcome["node"].as_str(), Some(home.as_str()), "{id} did not stick to {home}");
        *ws = new_ws;
    }

    // Agent weights follow load: 20 direct clients on a (of its 40 slots).
    // The per-address table is hashed (src/runtime/limits.rs): two addresses
    // may share a bucket and so one slot, and then the second gets 429. Such
    // an address is skipped for the next one; any other error fails.
    let mut load = Vec::new();
    let mut shared_bucket = 0;
    for last in 1..=254u8 {
        if load.len() == 20 {
            break;
        }
        match connect_from(&format!("127.0.1.{last}"), a.addr.port(), &format!("load{last}")).await {
            Ok((ws, _)) => load.push(ws),
            Err(e) if e.contains("429") => shared_bucket += 1,
            Err(e) => panic!("load client from 127.0.1.{last}: {e}"),
        }
    }
    assert_eq!(load.len(), 20, "only {} load clients ({shared_bucket} addresses shared a bucket)", load.len());
    hap.until("n1's weight falls with its load, n2's stays high", |h| h.server("n1").1 <= 55 && h.server("n2").1 >= 85)
        .await;

    // Drain a: its clients get a hint to come back through HAProxy; they
    // and new clients land on b.
    a.signal(15);
    let on_a: Vec<usize> = (0..via.len()).filter(|&i| via[i].2 == "a").collect();
    for &i in &on_a {
        let hint = next_text(&mut via[i].3, Duration::from_secs(10)).await.expect("drain hint");
        assert_eq!(
            (hint["type"].as_str(), hint["reason"].as_str(), hint["url"].as_str()),
            (Some("reconnect"), Some("drain"), Some(""))
        );
    }
    hap.until("n1 out of rotation (agent drain, then /ready 503)", |h| h.server("n1").0 != "UP").await;
    // Sources from here on: 127.0.0.20 and up, moving on past one that
    // shares a hashed bucket with a client b already holds (429).
    let mut next_src = 20u8;
    let fresh = loop {
        match connect_from(&format!("127.0.0.{next_src}"), hap.port, "newcomer").await {
            Err(e) if e.contains("429") && next_src < 40 => next_src += 1,
            other => break other.expect("new client through haproxy").1,
        }
    };
    assert_eq!(fresh["node"], "b", "a new client went to the draining node");
    for &i in &on_a {
        let id = via[i].1.clone();
        let _ = via[i].3.close(None).await;
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            // Sticky to a until HAProxy marks it DOWN: a's 503s, then b.
            match connect_from(&format!("127.0.0.{next_src}"), hap.port, &id).await {
                Ok((_, w)) if w["node"] == "b" => break,
                Err(e) if e.contains("429") && next_src < 60 => next_src += 1,
                _ => {}
            }
            assert!(Instant::now() < end, "{id} never reached b through haproxy");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(load);
    a.kill();
}
