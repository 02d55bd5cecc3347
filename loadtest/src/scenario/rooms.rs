//! What the rooms scenarios (`fanout`, `resume`, `storm`) share: the phases of a run
//! (publishers and subscribers connect and join, a barrier, publishing for
//! `--duration`, listening `--drain` more, stop), the publisher, the plain `join`,
//! and the stamp publishers put in every message.
//!
//! Each scenario supplies its room names, where publishers connect, and its
//! subscriber task; [`drive`] runs the rest the same way for all three, so the
//! expected delivery count (`fanout.room.<r>.subs` x `fanout.room.<r>.sent`) means
//! the same everywhere.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{close_conn, open_conn_to, pace, spawn, wait_until};
use crate::clock::{mono_us, secs_us, sleep_until_us, to_instant};
use crate::net::Ws;
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// How a rooms scenario lays its connections out.
#[derive(Clone, Copy)]
pub struct Layout {
    /// Name of room `r`.
    pub room: fn(u64) -> String,
    /// Target index (into `--url`) of publisher `pid`, given the number of targets.
    pub publisher_target: fn(u64, usize) -> usize,
}

/// Round-robin over the targets: connection `k` goes to URL `k mod count`.
pub fn round_robin(k: u64, targets: usize) -> usize {
    (k % targets as u64) as usize
}

/// The run's phase signals, as a subscriber or publisher sees them.
#[derive(Clone)]
pub struct Phase {
    /// The go time (monotonic us) once every worker is at the barrier; 0 before.
    pub go: watch::Receiver<u64>,
    /// Set when the run stops (after `--duration` + `--drain`).
    pub stop: watch::Receiver<bool>,
    settled: Rc<Cell<u64>>,
}

impl Phase {
    /// Tells the barrier this connection has finished joining (or given up).
    pub fn settled(&self) {
        self.settled.set(self.settled.get() + 1);
    }
}

/// Runs this worker's share of a rooms scenario: its publishers (who join every room
/// and then publish on the schedule), its subscribers (`subscriber(ctx, j, intended,
/// phase)` at `--rate`), the `subscribed` barrier, and the stop after
/// `--duration` + `--drain`.
pub async fn drive<S, F>(ctx: CtxRef, layout: Layout, mut subscriber: S)
where
    S: FnMut(CtxRef, u64, u64, Phase) -> F,
    F: Future<Output = ()> + 'static,
{
    let p = ctx.p().clone();
    let (w, i) = (p.workers as u64, ctx.task.index as u64);
    let (go_tx, go) = watch::channel(0u64);
    let (stop_tx, stop) = watch::channel(false);
    let phase = Phase { go, stop, settled: Rc::new(Cell::new(0)) };
    let mut tasks = Vec::new();
    let pubs = Schedule::new(ctx.task.start_us, 0.0, i, w, p.publishers);
    for n in 0..pubs.len() {
        tasks.push(spawn(publisher(ctx.clone(), pubs.global_index(n), layout, phase.clone())));
    }
    let subs = Schedule::new(ctx.task.start_us, p.rate, i, w, p.conns);
    pace(subs, |_, j, intended| tasks.push(spawn(subscriber(ctx.clone(), j, intended, phase.clone())))).await;
    let mine = subs.len() + pubs.len();
    wait_until(ctx.timeout() * 3 + Duration::from_secs(1), || phase.settled.get() >= mine).await;
    let go_us = ctx.barrier("subscribed").await;
    let _ = go_tx.send(go_us);
    sleep_until_us(go_us + secs_us(p.duration) + secs_us(p.drain)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

/// Delivered `data` as publishers write it.
#[derive(Debug, Deserialize)]
pub struct Stamp {
    /// Publisher id.
    pub p: u64,
    /// Publisher-local sequence number.
    pub s: u64,
    /// Actual send time, monotonic us.
    pub t: u64,
    /// Intended send time, monotonic us.
    pub i: u64,
}

/// The server frames a plain join looks at (join replies, errors).
#[derive(Debug, Deserialize)]
pub struct Incoming {
    /// Frame type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Room of a `joined`.
    pub room: Option<String>,
}

/// A subscriber's first join: `ws` (if it opened) joined by `join`, or `None`
/// with the failure counted and the connection no longer counted open.
pub async fn first_join<'a, F>(ctx: &CtxRef, ws: Option<Ws>, join: impl FnOnce(Ws) -> F) -> Option<Ws>
where
    F: Future<Output = (Ws, Result<(), &'static str>)> + 'a,
{
    let (ws, r) = join(ws?).await;
    match r {
        Ok(()) => Some(ws),
        Err(reason) => {
            ctx.stats.borrow_mut().fail(reason, false);
            ctx.open.set(ctx.open.get() - 1);
            None
        }
    }
}

/// Sends `join` and waits for `joined` (skipping `welcome` and anything else).
pub async fn join(ctx: &CtxRef, ws: &mut Ws, room: &str) -> Result<(), &'static str> {
    let msg = serde_json::json!({"type": "join", "room": room}).to_string();
    ws.send(Message::text(msg)).await.map_err(|_| "closed_early")?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let Ok(inc) = serde_json::from_str::<Incoming>(t.as_str()) else {
                        continue;
                    };
                    match inc.ty.as_str() {
                        "joined" if inc.room.as_deref() == Some(room) => return Ok(()),
                        "error" => return Err("join_error"),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Err("closed_early"),
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(ctx.timeout(), wait).await.unwrap_or(Err("timeout"))
}

/// Publisher `pid`: joins every room, waits for the go time, then publishes its share
/// of the schedule; publish k goes to room `k mod rooms`. It does not reconnect: a
/// lost publisher is `failures.closed_early`.
async fn publisher(ctx: CtxRef, pid: u64, layout: Layout, mut phase: Phase) {
    let target = (layout.publisher_target)(pid, ctx.targets.len());
    let Some(mut ws) = open_conn_to(&ctx, target, pid, mono_us()).await else {
        phase.settled();
        return;
    };
    // One join at a time, each answered before the next: joins of rooms with
    // history are limited per connection (`rooms.max_pending_joins`). Settled
    // (for the barrier) once all are joined.
    for r in 0..ctx.p().rooms {
        if let Err(reason) = join(&ctx, &mut ws, &(layout.room)(r)).await {
            phase.settled();
            ctx.stats.borrow_mut().fail(reason, false);
            ctx.open.set(ctx.open.get() - 1);
            return;
        }
    }
    phase.settled();
    let go_us = match phase.go.wait_for(|g| *g > 0).await {
        Ok(g) => *g,
        Err(_) => return,
    };
    let p = ctx.p().clone();
    let total = Schedule::events_in(p.msg_rate, p.duration);
    let sched = Schedule::new(go_us, p.msg_rate, pid, p.publishers, total);
    let pad = "x".repeat(p.size);
    let mut n = 0;
    loop {
        // A disabled select! branch still builds its future, so keep `due` finite.
        let due = if n < sched.len() { sched.intended_us(n) } else { mono_us() + 3_600_000_000 };
        tokio::select! {
            _ = tokio::time::sleep_until(to_instant(due)), if n < sched.len() => {
                let k = sched.global_index(n);
                let room = k % p.rooms;
                let data = serde_json::json!({"p": pid, "s": n, "t": mono_us(), "i": due, "x": pad});
                let msg = serde_json::json!({"type": "publish", "room": (layout.room)(room), "data": data});
                if ws.send(Message::text(msg.to_string())).await.is_err() {
                    break;
                }
                let mut st = ctx.stats.borrow_mut();
                st.add("messages.sent", 1);
                st.add(&format!("fanout.room.{room}.sent"), 1);
                n += 1;
            }
            _ = phase.stop.wait_for(|s| *s) => return close_conn(&ctx, ws).await,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"error\"") => {
                    ctx.stats.borrow_mut().fail("publish_error", false);
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
    }
    ctx.open.set(ctx.open.get() - 1);
    ctx.stats.borrow_mut().fail("closed_early", false);
}
