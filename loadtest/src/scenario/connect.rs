//! `connect`: open N connections at R/s, hold them S seconds, then check every
//! one is alive (a Ping answered by its Pong) and close them cleanly.
//!
//! Held connections keep a read pending so server pings are answered and a
//! server-side close is noticed (`closed_early`) instead of discovered late.

use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{close_conn, open_conn, pace, spawn, wait_until};
use crate::clock::{mono_us, secs_us, sleep_until_us};
use crate::net::Ws;
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Runs this worker's share of the connect scenario.
pub async fn run(ctx: CtxRef) {
    let p = ctx.p().clone();
    let w = p.workers as u64;
    let sched = Schedule::new(ctx.task.start_us, p.rate, ctx.task.index as u64, w, p.conns);
    let mine = sched.len();
    let (go_tx, go_rx) = watch::channel(false);
    let go_tx = Rc::new(go_tx);
    let mut tasks = Vec::with_capacity(mine as usize);
    pace(sched, |_, k, intended| {
        tasks.push(spawn(conn_task(ctx.clone(), k, intended, go_rx.clone())));
    })
    .await;
    // All of this worker's attempts resolve within one timeout of the last start.
    let limit = ctx.timeout() * 2 + Duration::from_secs(1);
    wait_until(limit, || {
        let st = ctx.stats.borrow();
        st.get("connections.established") + st.get("connections.failed") >= mine
    })
    .await;
    // The global schedule's last start, then the hold.
    let last = sched.at_global(p.conns.saturating_sub(1));
    sleep_until_us(last + secs_us(p.hold)).await;
    let go = ctx.barrier("held").await;
    sleep_until_us(go).await;
    let _ = go_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

async fn conn_task(ctx: CtxRef, k: u64, intended: u64, mut go: watch::Receiver<bool>) {
    let Some(mut ws) = open_conn(&ctx, k, intended).await else {
        return;
    };
    loop {
        tokio::select! {
            _ = go.wait_for(|g| *g) => break,
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    ctx.open.set(ctx.open.get() - 1);
                    ctx.stats.borrow_mut().fail("closed_early", false);
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    if check_alive(&ctx, &mut ws, k).await {
        ctx.stats.borrow_mut().add("connections.alive_at_end", 1);
        close_conn(&ctx, ws).await;
    } else {
        ctx.open.set(ctx.open.get() - 1);
    }
}

/// Sends a Ping carrying `k` and waits for the matching Pong; counts a failure if not.
async fn check_alive(ctx: &CtxRef, ws: &mut Ws, k: u64) -> bool {
    let payload = k.to_be_bytes().to_vec();
    let t0 = mono_us();
    let res = tokio::time::timeout(ctx.timeout(), async {
        ws.send(Message::Ping(payload.clone().into())).await.map_err(|_| "closed_early")?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) if p[..] == payload[..] => return Ok(()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Err("closed_early"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    match res {
        Ok(Ok(())) => {
            ctx.stats.borrow_mut().record("ping", mono_us() - t0);
            true
        }
        Ok(Err(reason)) => {
            ctx.stats.borrow_mut().fail(reason, false);
            false
        }
        Err(_) => {
            ctx.stats.borrow_mut().fail("timeout", false);
            false
        }
    }
}
