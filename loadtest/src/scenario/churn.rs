//! `churn`: connect/upgrade/close cycles at R per second for D seconds, to find
//! leaks (compare the server's fds and RSS before and after) and to measure
//! establishment while connections come and go. `--conns` caps the cycles in
//! progress at once; a cycle that would exceed it is skipped and counted as
//! `failures.client_backlog`, never silently dropped.

use std::time::Duration;

use super::{close_conn, open_conn, pace, spawn, wait_until};
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Runs this worker's share of the churn scenario.
pub async fn run(ctx: CtxRef) {
    let p = ctx.p().clone();
    let total = Schedule::events_in(p.rate, p.duration);
    let sched = Schedule::new(ctx.task.start_us, p.rate, ctx.task.index as u64, p.workers as u64, total);
    let cap = p.conns.div_ceil(p.workers as u64) as i64;
    let in_progress = std::rc::Rc::new(std::cell::Cell::new(0i64));
    pace(sched, |_, k, intended| {
        if in_progress.get() >= cap {
            ctx.stats.borrow_mut().fail("client_backlog", false);
            return;
        }
        in_progress.set(in_progress.get() + 1);
        let (ctx, inp) = (ctx.clone(), in_progress.clone());
        spawn(async move {
            if let Some(ws) = open_conn(&ctx, k, intended).await {
                close_conn(&ctx, ws).await;
            }
            inp.set(inp.get() - 1);
        });
    })
    .await;
    wait_until(ctx.timeout() * 3 + Duration::from_secs(1), || in_progress.get() == 0).await;
}
