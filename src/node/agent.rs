//! HAProxy's agent-check protocol on `server.agent_listen`: every TCP
//! connection gets one line, `up N%` or `drain`, and is closed, so that
//! HAProxy weighs this node by what it actually has left.
//!
//! The weight (0-100) is the node's live headroom:
//!
//! ```text
//! weight = 100 × free_slots / slots × shard_factor × latency_factor
//! shard_factor   = 1/2 when any shard is full (its accepts cost a hand-off), else 1
//! latency_factor = min(1, 25 ms / p99) of the handshakes of the last window
//!                  (1 s or more), at least 0.1; 1 without handshakes in it
//! ```
//!
//! A draining node answers `drain` (HAProxy then sends it no new clients but
//! sticky ones, which the node answers 503 until the `/ready` check marks it
//! down). The agent runs on its own thread and never reads from the peer:
//! it writes at most a few bytes with a 1 s send timeout, so a peer that
//! never reads costs one socket buffer for a second, and no shard is touched.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::app::AppMsg;
use crate::runtime::NodeState;

/// Handshake p99 at or under this keeps the full weight.
pub const LATENCY_TARGET_US: u64 = 25_000;
/// The latency window is refreshed at most this often.
const WINDOW: Duration = Duration::from_secs(1);

/// What the agent answers, from the node's numbers.
pub fn reply(draining: bool, shard_conns: &[usize], per_shard: usize, recent_p99_us: Option<u64>) -> String {
    if draining {
        return "drain\n".into();
    }
    format!("up {}%\n", weight(shard_conns, per_shard, recent_p99_us))
}

/// The weight, 0-100 (see the module doc).
pub fn weight(shard_conns: &[usize], per_shard: usize, recent_p99_us: Option<u64>) -> u32 {
    let slots = (shard_conns.len() * per_shard).max(1) as f64;
    let used: usize = shard_conns.iter().map(|&c| c.min(per_shard)).sum();
    let headroom = 1.0 - used as f64 / slots;
    let shard_factor = if shard_conns.iter().any(|&c| c >= per_shard) { 0.5 } else { 1.0 };
    let latency_factor = match recent_p99_us {
        Some(p) if p > LATENCY_TARGET_US => (LATENCY_TARGET_US as f64 / p as f64).max(0.1),
        _ => 1.0,
    };
    (100.0 * headroom * shard_factor * latency_factor).round().clamp(0.0, 100.0) as u32
}

/// Serves `listener` on a thread named `ringside-agent` for the life of the
/// process.
pub fn start(listener: TcpListener, state: Arc<NodeState<AppMsg>>) -> io::Result<SocketAddr> {
    listener.set_nonblocking(false)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("ringside-agent".into()).spawn(move || serve(listener, state))?;
    Ok(local)
}

fn serve(listener: TcpListener, state: Arc<NodeState<AppMsg>>) {
    let mut window = Window::default();
    loop {
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd on the stack.
        let ready = unsafe { libc::poll(&mut pfd, 1, WINDOW.as_millis() as i32) };
        let p99 = window.recent_p99(&state);
        if ready <= 0 {
            continue;
        }
        // Take what is queued; each answer is a few bytes.
        match listener.accept() {
            Ok((stream, _)) => answer(stream, &state, p99),
            Err(e) => {
                tracing::warn!(error = %e, "agent accept failed; retrying in 100 ms");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(mut stream: TcpStream, state: &NodeState<AppMsg>, p99: Option<u64>) {
    let conns: Vec<usize> = state.shards.iter().map(|s| s.metrics.connections.load(Ordering::Relaxed)).collect();
    let line = reply(state.is_draining(), &conns, state.capacity_per_shard, p99);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// The handshakes since the last refresh: the cumulative histograms of the
/// shards, minus what they held at the previous one.
#[derive(Default)]
struct Window {
    previous: Option<Histogram<u64>>,
    at: Option<Instant>,
    p99: Option<u64>,
}

impl Window {
    fn recent_p99(&mut self, state: &NodeState<AppMsg>) -> Option<u64> {
        if self.at.is_some_and(|t| t.elapsed() < WINDOW) {
            return self.p99;
        }
        let mut now = crate::runtime::metrics::new_histogram();
        for m in state.metrics() {
            if let Ok(h) = m.handshake_us.lock() {
                let _ = now.add(&*h);
            }
        }
        let mut delta = now.clone();
        let fresh = match &self.previous {
            Some(prev) if prev.len() <= now.len() => delta.subtract(prev).is_ok(),
            _ => true,
        };
        self.p99 = (fresh && !delta.is_empty()).then(|| delta.value_at_quantile(0.99));
        self.previous = Some(now);
        self.at = Some(Instant::now());
        self.p99
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_follows_free_slots_full_shards_and_latency() {
        assert_eq!(weight(&[0, 0], 10, None), 100);
        assert_eq!(weight(&[5, 5], 10, None), 50);
        assert_eq!(weight(&[10, 0], 10, None), 25, "a full shard halves it");
        assert_eq!(weight(&[10, 10], 10, None), 0);
        assert_eq!(weight(&[0, 0], 10, Some(LATENCY_TARGET_US)), 100);
        assert_eq!(weight(&[0, 0], 10, Some(2 * LATENCY_TARGET_US)), 50);
        assert_eq!(weight(&[0, 0], 10, Some(1_000 * LATENCY_TARGET_US)), 10, "at least a tenth");
        assert_eq!(reply(false, &[2, 3], 10, None), "up 75%\n");
        assert_eq!(reply(true, &[0], 10, None), "drain\n");
    }
}
