//! The scenarios and what they share: paced connection opening with
//! timing and failure accounting, clean closing, and waiting for stragglers.

mod churn;
mod connect;
mod echo;
mod fanout;
mod resume;
mod rooms;
mod storm;

use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::clock::{mono_us, sleep_until_us};
use crate::net::{client_config, establish, source_addr, Ws};
use crate::params::Scenario;
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Runs the worker's share of its task's scenario.
pub async fn run(ctx: CtxRef) {
    match ctx.p().scenario {
        Scenario::Connect => connect::run(ctx).await,
        Scenario::Echo => echo::run(ctx).await,
        Scenario::Fanout => fanout::run(ctx).await,
        Scenario::Churn => churn::run(ctx).await,
        Scenario::Resume => resume::run(ctx).await,
        Scenario::Storm => storm::run(ctx).await,
    }
}

/// Opens global connection `k` (target and source address chosen round-robin by `k`),
/// intended to start at `intended_us`; records `connect`/`upgrade` (actual and
/// intended) and counts it as attempted and established or failed.
pub async fn open_conn(ctx: &CtxRef, k: u64, intended_us: u64) -> Option<Ws> {
    open_conn_to(ctx, (k % ctx.targets.len() as u64) as usize, k, intended_us).await
}

/// [`open_conn`] to target `t` (an index into `--url`) instead of `k mod count`.
pub async fn open_conn_to(ctx: &CtxRef, t: usize, k: u64, intended_us: u64) -> Option<Ws> {
    let target = &ctx.targets[t];
    let source = source_addr(&target.addr, ctx.p().sources, k);
    ctx.stats.borrow_mut().add("connections.attempted", 1);
    let cfg = client_config(ctx.p().size + 1024);
    match establish(target, source, ctx.timeout(), cfg).await {
        Ok((ws, t)) => {
            let mut st = ctx.stats.borrow_mut();
            st.add("connections.established", 1);
            // How late the client itself started (timer granularity, a busy worker):
            // the part of the `_from_intended` figures that is the harness's own doing.
            st.record("schedule_lag", t.started_us.saturating_sub(intended_us));
            st.record_pair("connect", t.tcp_us - t.started_us, t.tcp_us.saturating_sub(intended_us));
            st.record_pair("upgrade", t.upgraded_us - t.started_us, t.upgraded_us.saturating_sub(intended_us));
            ctx.open.set(ctx.open.get() + 1);
            Some(ws)
        }
        Err(reason) => {
            ctx.stats.borrow_mut().fail(reason, true);
            None
        }
    }
}

/// Closes cleanly: sends a Close frame and reads until the server's Close (or EOF)
/// within the timeout. Counts `connections.closed_clean` or `failures.close_timeout`.
pub async fn close_conn(ctx: &CtxRef, mut ws: Ws) {
    let clean = tokio::time::timeout(ctx.timeout(), async {
        if ws.send(Message::Close(None)).await.is_err() {
            return false;
        }
        while let Some(m) = ws.next().await {
            if m.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    ctx.open.set(ctx.open.get() - 1);
    match clean {
        Ok(true) => ctx.stats.borrow_mut().add("connections.closed_clean", 1),
        Ok(false) => ctx.stats.borrow_mut().fail("close_error", false),
        Err(_) => ctx.stats.borrow_mut().fail("close_timeout", false),
    }
}

/// Follows `sched`: at each intended time calls `spawn(n, global_index, intended_us)`.
/// If the pacer falls behind it catches up at once; the intended times stay on
/// the schedule, so lateness shows in the `_from_intended` histograms.
pub async fn pace(sched: Schedule, mut spawn: impl FnMut(u64, u64, u64)) {
    if sched.is_empty() {
        return;
    }
    for n in 0..sched.len() {
        let at = sched.intended_us(n);
        sleep_until_us(at).await;
        spawn(n, sched.global_index(n), at);
    }
}

/// Waits until `done()` holds, polling every 20 ms, for at most `limit`.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = mono_us() + limit.as_micros() as u64;
    while !done() {
        if mono_us() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Spawns a task on the worker's `LocalSet`.
pub fn spawn<F: Future<Output = ()> + 'static>(f: F) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(f)
}
