//! Operating the binary as a process: a stderr nobody reads any more
//! (`ringside 2>&1 | head -1`), a shard that cannot start, an address that
//! another node already serves. Each test runs the real `ringside` binary
//! and looks only at what an operator sees: exit codes, stderr, sockets.
//! (A panicking shard is tests/ops_fault.rs: it needs a test-only feature.)

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_ringside");

/// A pipe, both ends close-on-exec (so no other child a parallel test
/// spawns keeps the read end open): (read end, write end).
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors this code owns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Starts `ringside <args>` with stdout and stderr both going into `write`,
/// as `ringside 2>&1 | …` does. Only the child keeps the write end.
fn spawn_into(write: OwnedFd, args: &[&str]) -> KillOnDrop {
    let out = write.try_clone().unwrap();
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(write))
        .spawn()
        .expect("spawn ringside");
    KillOnDrop(child)
}

/// Runs `ringside <args>` to its end (killing it and failing after
/// `within`): its status and its stderr.
fn run_to_exit(args: &[&str], within: Duration) -> (ExitStatus, String) {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringside"),
    );
    let mut stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_status(&mut child.0, within);
    let Some(status) = status else {
        drop(child); // kill it, so the reader sees EOF
        panic!("ringside {args:?} still running after {within:?}; stderr: {}", reader.join().unwrap());
    };
    (status, reader.join().unwrap())
}

/// One echo round trip over `/echo` with tokio-tungstenite.
async fn echo_once(addr: SocketAddr, text: &str) {
    let mut ws = connect(&format!("ws://{addr}/echo")).await;
    ws.send(Message::Text(text.into())).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("echo timed out");
    assert_eq!(got.unwrap().unwrap(), Message::Text(text.into()));
    ws.close(None).await.unwrap();
}

fn addr_of(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn alive(node: &mut KillOnDrop) -> bool {
    node.0.try_wait().unwrap().is_none()
}

#[tokio::test]
async fn closed_stderr_after_the_first_line_neither_stops_nor_kills_the_node() {
    let port = free_port();
    let addr = addr_of(port);
    let listen = addr.to_string();
    let (read, write) = pipe();
    let mut node = spawn_into(write, &["--listen", &listen, "--shards", "2"]);
    // `| head -1`: one line, then the reader goes away.
    let mut reader = BufReader::new(read);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "no log line at all before EOF");
    drop(reader);

    assert!(wait_healthy(addr, Duration::from_secs(20)), "node never answered /health; first line: {first}");
    // (Ours answered, not whoever might have taken the free port first.)
    assert!(alive(&mut node), "the node exited");
    assert_eq!(try_get(addr, "/health").map(|r| r.0), Some(200));
    echo_once(addr, "still here").await;
    // More traffic: many connections opened and closed, plain and WebSocket.
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(connect(&format!("ws://{addr}/echo")).await);
        assert_eq!(try_get(addr, &format!("/metrics?{i}")).map(|r| r.0), Some(200));
    }
    for mut ws in clients {
        ws.close(None).await.unwrap();
    }
    assert!(alive(&mut node), "the node died while serving with a closed stderr");
    echo_once(addr, "after the churn").await;

    // SIGTERM: the drain logs (to nobody) and the node exits 0.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    let status = wait_status(&mut node.0, Duration::from_secs(10)).expect("no exit within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?} (a signal means a log write killed it)");
}

#[test]
fn stderr_closed_before_the_node_is_listening_still_starts_and_drains() {
    let port = free_port();
    let addr = addr_of(port);
    let listen = addr.to_string();
    let (read, write) = pipe();
    // The read end is gone before the node writes a single byte: every log
    // line, "ringside starting" included, meets a broken pipe.
    drop(read);
    // JSON lines here (text in the test above): both formats write the same way.
    let mut node = spawn_into(write, &["--listen", &listen, "--shards", "2", "--log-format", "json"]);
    assert!(wait_healthy(addr, Duration::from_secs(10)), "node did not come up with a closed stderr");
    assert!(alive(&mut node));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.0.id() as i32, libc::SIGTERM) };
    let status = wait_status(&mut node.0, Duration::from_secs(10)).expect("no exit within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[test]
fn a_ring_the_kernel_refuses_fails_the_start_with_exit_1_and_one_clear_line() {
    // Valid for the configuration (a power of two >= 8), but above the
    // kernel's IORING_MAX_ENTRIES (32768) without IORING_SETUP_CLAMP, so
    // io_uring_setup fails with EINVAL on every shard.
    let t0 = Instant::now();
    let (status, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0", "--shards", "2", "--driver", "io_uring", "--set", "server.ring_entries=65536"],
        Duration::from_secs(15),
    );
    assert_eq!(status.code(), Some(1), "{status:?}; stderr: {stderr}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let line = stderr.lines().find(|l| l.contains("failed to start")).unwrap_or_else(|| panic!("stderr: {stderr}"));
    assert!(line.contains("shard ") && line.contains("io_uring"), "not clear: {line}");
    assert!(!stderr.contains("listening on"), "reported listening although a shard failed: {stderr}");
    assert!(!stderr.contains("panic"), "{stderr}");
}

#[test]
fn ring_entries_the_kernel_accepts_start_fine() {
    // The control for the test above: the largest ring io_uring allows
    // (or epoll on a kernel without io_uring: driver auto) starts.
    let node = NodeProc::start(&["--shards", "1", "--set", "server.ring_entries=32768"]);
    assert_eq!(node.get("/health").0, 200);
}

#[test]
fn a_second_node_on_a_served_address_exits_1_and_the_first_keeps_every_connection() {
    let first = NodeProc::start(&["--shards", "2"]);
    let listen = first.addr.to_string();
    let accepted = "ringside_connections_accepted_total";
    let before = first.metric_sum(accepted);
    let t0 = Instant::now();
    let (status, stderr) = run_to_exit(&["--listen", &listen, "--shards", "2"], Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{status:?}; stderr: {stderr}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(stderr.contains("address in use"), "stderr: {stderr}");
    assert!(!stderr.contains("listening on"), "{stderr}");
    // Every new connection reaches the first node: 20 /health plus the
    // /metrics read below (each read counts itself or neither does).
    for _ in 0..20 {
        assert_eq!(first.get("/health").0, 200);
    }
    let after = first.metric_sum(accepted);
    assert_eq!(after - before, 21.0, "accepted {before} -> {after}: connections went elsewhere");
}

#[test]
fn an_address_another_program_holds_is_refused_with_exit_1() {
    // Not a ringside listener but any socket bound without SO_REUSEPORT:
    // the probe bind is what refuses, whoever holds the port.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_exit(&["--listen", &listen], Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{status:?}; stderr: {stderr}");
    assert!(stderr.contains("address in use"), "stderr: {stderr}");
}

#[test]
fn two_nodes_on_port_zero_both_start_on_their_own_ports() {
    let a = NodeProc::start(&["--shards", "2"]);
    let b = NodeProc::start(&["--shards", "2"]);
    assert_ne!(a.addr.port(), b.addr.port());
    let before =
        (a.metric_sum("ringside_connections_accepted_total"), b.metric_sum("ringside_connections_accepted_total"));
    for _ in 0..5 {
        assert_eq!(a.get("/health").0, 200);
    }
    let after =
        (a.metric_sum("ringside_connections_accepted_total"), b.metric_sum("ringside_connections_accepted_total"));
    assert_eq!(after.0 - before.0, 6.0, "a's connections: {before:?} -> {after:?}");
    assert_eq!(after.1 - before.1, 1.0, "b got a's connections: {before:?} -> {after:?}");
}
