//! Reconnect storm: N `ringside-client` clients on one node, the node killed (SIGKILL)
//! and restarted on the same port, every client reconnecting by its own backoff. Reports
//! the reconnect-time distribution (HDR histogram, kill → welcome; also from the moment
//! each client noticed the loss), the connect
//! attempts the clients made, and the connect rate the node saw (its
//! `ringside_connections_accepted_total` / `_upgraded_total`, polled every 100 ms on the
//! internal listener, which has no per-address limits). Run with jitter on and off to
//! compare (scripts/bench-storm does both and writes results/). `--mode drain` is the
//! planned restart instead: two nodes sharing a `redis-server`, SIGTERM on the first,
//! whose drain hints send every client to the second (whose counters are polled).
//!
//! `cargo run --release -p ringside-client --example storm -- --node-bin target/release/ringside --clients 10000 --jitter on --out DIR`

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use ringside_client::{Backoff, Client, ClientConfig, Event};

#[derive(Parser, Debug)]
struct Args {
    /// The ringside binary (a release build).
    #[arg(long)]
    node_bin: String,
    /// Clients.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Full jitter on or off.
    #[arg(long, default_value = "on")]
    jitter: String,
    /// Backoff base (ms).
    #[arg(long, default_value_t = 500)]
    base_ms: u64,
    /// Backoff cap (ms).
    #[arg(long, default_value_t = 30_000)]
    cap_ms: u64,
    /// How long the node stays down before the restart (ms).
    #[arg(long, default_value_t = 1000)]
    down_ms: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) the clients spread over.
    #[arg(long, default_value_t = 50)]
    sources: u8,
    /// Node shards.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Give up waiting for the reconnects after this (s).
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
    /// `kill`: SIGKILL the node and restart it after `down_ms` (clients back off).
    /// `drain`: two nodes sharing a `redis-server`; SIGTERM the first: its drain hints send
    /// every client to the second (the rates are the second node's).
    #[arg(long, default_value = "kill")]
    mode: String,
    /// Output directory (summary.json, reconnect.hgrm, node-rate.csv).
    #[arg(long)]
    out: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

struct NodeProc {
    bin: String,
    extra: Vec<String>,
    port: u16,
    admin: u16,
    shards: u32,
    child: Option<Child>,
}

impl NodeProc {
    fn start(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--shards", &self.shards.to_string()])
            .args(["--set", &format!("server.admin_listen=127.0.0.1:{}", self.admin)])
            .args(["--set", "server.pin_cores=false", "--log", "warn"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringside");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while get(self.admin, "/health").is_none() {
            assert!(Instant::now() < end, "node did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn sigterm(&self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Shared measurements.
#[derive(Default)]
struct Shared {
    /// Disconnect seen by the client → welcome (ms).
    hist: Mutex<Option<Histogram<u64>>>,
    /// Reconnect completion times after the kill (ms), for the client-side timeline.
    done_at: Mutex<Vec<u64>>,
    reconnected: AtomicU64,
    /// Reconnect waits that came from a `reconnect` hint.
    hinted: AtomicU64,
    attempts_failed: AtomicU64,
    connected_first: AtomicU64,
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    std::fs::create_dir_all(&args.out).expect("out dir");
    let drain = args.mode == "drain";
    let redis = drain.then(start_redis);
    let cluster = |id: &str| match &redis {
        Some((_, port)) => ["--redis", &format!("redis://127.0.0.1:{port}"), "--node-id", id]
            .iter()
            .map(|s| s.to_string())
            .chain(["--set".into(), "cluster.sync_interval_ms=200".into()])
            .collect(),
        None => Vec::new(),
    };
    let new_node = |extra| NodeProc {
        bin: args.node_bin.clone(),
        extra,
        port: free_port(),
        admin: free_port(),
        shards: args.shards,
        child: None,
    };
    let mut node = new_node(cluster("a"));
    node.start();
    // Drain mode: the peer the hints name; its counters are the ones polled.
    let mut peer = drain.then(|| new_node(cluster("b")));
    if let Some(p) = peer.as_mut() {
        p.start();
        let want = format!("127.0.0.1:{}", p.port);
        let end = Instant::now() + Duration::from_secs(20);
        while !get(node.admin, "/cluster").is_some_and(|t| t.contains(&want)) {
            assert!(Instant::now() < end, "the nodes did not see each other");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let url = format!("ws://127.0.0.1:{}/ws", node.port);
    let shared = Arc::new(Shared {
        hist: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000, 3).unwrap())),
        ..Default::default()
    });
    let kill_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let backoff = Backoff {
        base: Duration::from_millis(args.base_ms),
        cap: Duration::from_millis(args.cap_ms),
        max_attempts: None,
        jitter: args.jitter == "on",
    };

    // Connect everyone, paced (1,000 per 100 ms), so the first connect is not the storm.
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let mut cfg = ClientConfig::new(url.clone());
        cfg.backoff = backoff.clone();
        cfg.event_capacity = 64;
        cfg.read_buffer_bytes = 4096;
        cfg.local_addr = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % args.sources.max(1) as usize) as u8)));
        let (client, mut events) = Client::start(cfg).expect("client");
        let sh = shared.clone();
        let kill = kill_at.clone();
        tokio::spawn(async move {
            let mut lost: Option<Instant> = None;
            let debug = i == 0 && std::env::var_os("STORM_DEBUG").is_some();
            while let Some(ev) = events.recv().await {
                if debug {
                    eprintln!("client 0: {ev:?}");
                }
                match ev {
                    Event::Connected { reconnect: false, .. } => {
                        sh.connected_first.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Disconnected { .. } => lost = lost.or(Some(Instant::now())),
                    Event::Reconnecting { cause: ringside_client::Cause::Hint(_), .. } => {
                        sh.hinted.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::ConnectFailed { .. } => {
                        sh.attempts_failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Connected { reconnect: true, .. } => {
                        let now = Instant::now();
                        if let Some(t) = lost.take() {
                            let ms = now.duration_since(t).as_millis() as u64;
                            if let Some(h) = sh.hist.lock().unwrap().as_mut() {
                                let _ = h.record(ms.max(1));
                            }
                        }
                        let k = *kill.lock().unwrap();
                        if let Some(k) = k {
                            sh.done_at.lock().unwrap().push(now.duration_since(k).as_millis() as u64);
                        }
                        sh.reconnected.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        clients.push(client);
        if i % 1000 == 999 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let end = Instant::now() + Duration::from_secs(60);
    while shared.connected_first.load(Ordering::Relaxed) < args.clients as u64 {
        assert!(Instant::now() < end, "only {} connected", shared.connected_first.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} clients connected; {} the node", args.clients, if drain { "draining" } else { "killing" });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Poll the node's counters every 100 ms (after the restart: a new process from 0).
    let samples: Arc<Mutex<Vec<(u64, f64, f64)>>> = Arc::default();
    let admin = peer.as_ref().map_or(node.admin, |p| p.admin);
    let t0 = Instant::now();
    *kill_at.lock().unwrap() = Some(t0);
    if drain {
        node.sigterm();
    } else {
        node.kill();
    }
    let poll = {
        let samples = samples.clone();
        let sh = shared.clone();
        let n = args.clients as u64;
        std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut all_since: Option<Instant> = None;
            // Until everyone is back (plus 1 s, so the last window is seen), or the timeout.
            while all_since.is_none_or(|t| t.elapsed() < Duration::from_secs(1))
                && t0.elapsed() < Duration::from_secs(args.timeout_s)
            {
                if all_since.is_none() && sh.reconnected.load(Ordering::Relaxed) >= n {
                    all_since = Some(Instant::now());
                }
                if let Some(text) = get(admin, "/metrics") {
                    let acc = metric_sum(&text, "ringside_connections_accepted_total");
                    let upg = metric_sum(&text, "ringside_connections_upgraded_total");
                    samples.lock().unwrap().push((t0.elapsed().as_millis() as u64, acc, upg));
                }
                next += Duration::from_millis(100);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        })
    };
    let (mut restart_ms, mut up_ms) = (0, 0);
    if !drain {
        tokio::time::sleep(Duration::from_millis(args.down_ms)).await;
        restart_ms = t0.elapsed().as_millis() as u64;
        tokio::task::block_in_place(|| node.start());
        up_ms = t0.elapsed().as_millis() as u64;
        // The new process counts from 0 when it starts listening.
        samples.lock().unwrap().push((restart_ms, 0.0, 0.0));
        eprintln!("node restarted at {restart_ms} ms, serving at {up_ms} ms");
    }
    let _ = tokio::task::spawn_blocking(move || poll.join()).await;
    let wall_ms = t0.elapsed().as_millis() as u64;
    // Drain mode: the peer had every client already; count only the rise after the SIGTERM.
    let first = samples.lock().unwrap().first().copied();
    if let (Some(_), Some(first)) = (&peer, first) {
        for s in samples.lock().unwrap().iter_mut() {
            (s.1, s.2) = (s.1 - first.1, s.2 - first.2);
        }
    }
    report(&args, &shared, &samples.lock().unwrap(), restart_ms, up_ms, wall_ms);
    drop(clients);
    drop(peer.take());
    if let Some((mut child, _)) = redis {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A `redis-server` on a free port (drain mode).
fn start_redis() -> (Child, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

fn report(args: &Args, sh: &Shared, samples: &[(u64, f64, f64)], restart_ms: u64, up_ms: u64, wall_ms: u64) {
    let mut samples = samples.to_vec();
    samples.sort_by_key(|s| s.0);
    let samples = &samples[..];
    let detect = sh.hist.lock().unwrap().take().unwrap();
    // Kill → welcome (ms): the outage each client saw, whatever its driver's delay in noticing.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000, 3).unwrap();
    for &ms in sh.done_at.lock().unwrap().iter() {
        let _ = hist.record(ms.max(1));
    }
    let reconnected = sh.reconnected.load(Ordering::Relaxed);
    // Peak rates over 100 ms windows and over 1 s windows (from the node's counters).
    let rate = |col: usize, window: usize| -> f64 {
        samples
            .windows(window + 1)
            .map(|w| {
                let (a, b) = (&w[0], &w[window]);
                let (va, vb) = if col == 1 { (a.1, b.1) } else { (a.2, b.2) };
                let dt = (b.0 - a.0) as f64 / 1000.0;
                if vb >= va && dt > 0.0 {
                    (vb - va) / dt
                } else {
                    0.0
                }
            })
            .fold(0.0, f64::max)
    };
    let mut csv = String::from("ms_after_kill,accepted_total,upgraded_total\n");
    for (t, a, u) in samples {
        csv.push_str(&format!("{t},{a},{u}\n"));
    }
    std::fs::write(format!("{}/node-rate.csv", args.out), csv).unwrap();
    let mut hgrm = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in hist.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 { 1.0 / (1.0 - q) } else { f64::INFINITY };
        hgrm.push_str(&format!(
            "{:12.3} {:14.12} {:10} {:14.2}\n",
            v.value_iterated_to() as f64,
            q,
            v.count_since_last_iteration(),
            inv
        ));
    }
    std::fs::write(format!("{}/reconnect-ms.hgrm", args.out), hgrm).unwrap();
    let mut done = sh.done_at.lock().unwrap().clone();
    done.sort_unstable();
    let last_ms = done.last().copied().unwrap_or(0);
    // Completed reconnects per window, from the clients' side (finer than the node's 100 ms polls).
    let peak = |window_ms: u64| -> f64 {
        let mut best = 0usize;
        let mut lo = 0;
        for hi in 0..done.len() {
            while done[hi] - done[lo] >= window_ms {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best as f64 * 1000.0 / window_ms as f64
    };
    let summary = serde_json::json!({
        "clients": args.clients,
        "mode": args.mode,
        "jitter": args.jitter == "on",
        "followed_hints": sh.hinted.load(Ordering::Relaxed),
        "backoff": {"base_ms": args.base_ms, "cap_ms": args.cap_ms},
        "down_ms": args.down_ms,
        "node_restarted_at_ms": restart_ms,
        "node_serving_at_ms": up_ms,
        "reconnected": reconnected,
        "all_reconnected_at_ms_after_kill": last_ms,
        "failed_connect_attempts": sh.attempts_failed.load(Ordering::Relaxed),
        "reconnect_ms_from_detection": {
            "p50": detect.value_at_quantile(0.5), "p99": detect.value_at_quantile(0.99), "max": detect.max(),
        },
        "reconnect_ms": {
            "p50": hist.value_at_quantile(0.5), "p90": hist.value_at_quantile(0.9),
            "p99": hist.value_at_quantile(0.99), "p999": hist.value_at_quantile(0.999), "max": hist.max(),
            "min": hist.min(), "mean": hist.mean().round(),
        },
        "node_peak_upgrades_per_s_100ms": rate(2, 1).round(),
        "node_peak_accepts_per_s_100ms": rate(1, 1).round(),
        "node_peak_upgrades_per_s_1s": rate(2, 10).round(),
        "node_peak_accepts_per_s_1s": rate(1, 10).round(),
        "client_peak_welcomes_per_s_10ms": peak(10).round(),
        "client_peak_welcomes_per_s_100ms": peak(100).round(),
        "metric_samples": samples.len(),
        "wall_ms": wall_ms,
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    std::fs::write(format!("{}/summary.json", args.out), &text).unwrap();
    println!("{text}");
}
