//! The upstream thread: a current-thread tokio runtime with a `LocalSet`,
//! every pool, their maintenance and health-check timers, the notice
//! batchers, and the loop that turns queued calls into tasks. It exits
//! when every [`super::Upstreams`] handle is gone.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;

use super::pool::Pool;
use super::stats::PoolStats;
use super::{Cmd, NoticeSpec, NoticeStats};
use crate::config::UpstreamConfig;

/// The maintenance tick: fine enough for idle timeouts and leak reports
/// of a few hundred ms, and costs a few µs per pool.
const TICK: Duration = Duration::from_millis(100);

/// Starts the thread; returns each pool's numbers once they exist.
pub fn spawn(
    cfgs: Vec<UpstreamConfig>,
    notices: Vec<(NoticeSpec, Arc<NoticeStats>)>,
    rx: Receiver<Cmd>,
) -> std::io::Result<Vec<Arc<PoolStats>>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("ringside-upstream".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let pools: Vec<Rc<Pool>> = cfgs.into_iter().map(Pool::new).collect();
            let _ = ready_tx.send(Ok(pools.iter().map(|p| p.stats.clone()).collect()));
            for p in &pools {
                tokio::task::spawn_local(maintain(p.clone()));
                tokio::task::spawn_local(health(p.clone()));
            }
            let batchers: Vec<Rc<Batcher>> = notices
                .into_iter()
                .filter_map(|(spec, stats)| {
                    let pool = pools.get(spec.pool)?.clone();
                    Some(Rc::new(Batcher { pool, spec, stats, buf: RefCell::default(), full: Default::default() }))
                })
                .collect();
            for b in &batchers {
                tokio::task::spawn_local(b.clone().run());
            }
            serve(rx, &pools, &batchers).await;
        });
    })?;
    ready_rx.recv().map_err(|_| std::io::Error::other("the upstream thread died while starting"))?
}

async fn serve(mut rx: Receiver<Cmd>, pools: &[Rc<Pool>], batchers: &[Rc<Batcher>]) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Call { pool, call } => {
                let Some(p) = pools.get(pool).cloned() else {
                    (call.reply)(Err(super::Failure::Connect));
                    continue;
                };
                tokio::task::spawn_local(async move {
                    let r = p.call(false, &call.path, call.body, call.deadline).await;
                    (call.reply)(r);
                });
            }
            Cmd::Notice { target, item } => {
                if let Some(b) = batchers.get(target) {
                    b.push(item);
                }
            }
        }
    }
}

async fn maintain(pool: Rc<Pool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    loop {
        tick.tick().await;
        let now = Instant::now();
        pool.maintain(now);
        if now.duration_since(last_sample) >= Duration::from_secs(1) {
            pool.stats.tick(now);
            last_sample = now;
        }
    }
}

async fn health(pool: Rc<Pool>) {
    if pool.cfg.health_check_path.is_empty() {
        return;
    }
    let every = Duration::from_millis(pool.cfg.health_check_interval_ms);
    loop {
        tokio::time::sleep(every).await;
        pool.health_check().await;
    }
}

/// Collects notices and POSTs them in batches, one batch at a time.
struct Batcher {
    pool: Rc<Pool>,
    spec: NoticeSpec,
    stats: Arc<NoticeStats>,
    buf: RefCell<VecDeque<String>>,
    full: tokio::sync::Notify,
}

impl Batcher {
    fn push(&self, item: String) {
        let mut buf = self.buf.borrow_mut();
        if buf.len() >= self.spec.queue {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buf.push_back(item);
        if buf.len() >= self.spec.batch {
            self.full.notify_one();
        }
    }

    async fn run(self: Rc<Self>) {
        let flush = Duration::from_millis(self.spec.flush_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(flush) => {}
                _ = self.full.notified() => {}
            }
            loop {
                let items: Vec<String> = {
                    let mut buf = self.buf.borrow_mut();
                    let n = buf.len().min(self.spec.batch);
                    buf.drain(..n).collect()
                };
                if items.is_empty() {
                    break;
                }
                let n = items.len() as u64;
                let body = format!("{{\"{}\":[{}]}}", self.spec.key, items.join(","));
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                match self.pool.call(false, &self.spec.path, body.into(), None).await {
                    Ok(r) if r.status < 500 => self.stats.sent.fetch_add(n, Ordering::Relaxed),
                    _ => self.stats.dropped.fetch_add(n, Ordering::Relaxed),
                };
                if self.buf.borrow().len() < self.spec.batch {
                    break; // a partial batch waits for the next flush
                }
            }
        }
    }
}
