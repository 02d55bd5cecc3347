//! A panicking shard takes the whole process down (SIGABRT, after logging
//! the panic), so a supervisor restarts a clean node instead of one serving
//! with a dead shard. Needs the test-only `fault-injection` feature (GET
//! `/__fault/panic` panics the shard serving it); Cargo.toml lists this
//! test with `required-features`, so run it as
//! `cargo test --features fault-injection --test ops_fault`. Built without
//! the feature it would fail (the path answers 404), never pass silently.

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_panicking_shard_aborts_the_process_and_logs_why() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringside"));
    cmd.args(["--listen", "127.0.0.1:0", "--shards", "2"]);
    // SAFETY: setrlimit is async-signal-safe; no core file for the abort.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut node = NodeProc::start_command(cmd);
    let mut ws = connect(&node.url("/echo")).await;
    ws.send(Message::Text("before".into())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("before".into()));

    let addr = node.addr;
    let answer = tokio::task::spawn_blocking(move || try_get(addr, "/__fault/panic")).await.unwrap();
    assert!(answer.is_none(), "the fault path answered instead of panicking: {answer:?}");
    let status = wait_status(&mut node.child, Duration::from_secs(10)).expect("still running 10 s after the panic");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "not aborted: {status:?}");

    // The open WebSocket (on either shard) is gone with the process.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("socket still open");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    // The reader thread may lag the exit a little.
    let log = || node.log.lock().unwrap().join("\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log().contains("aborting") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = log();
    assert!(log.contains("fault injection: /__fault/panic"), "{log}");
    assert!(log.contains("aborting"), "{log}");
    assert!(log.contains("ringside-shard-"), "the log does not name the shard thread: {log}");
}
