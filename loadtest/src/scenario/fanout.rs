//! `fanout`: N subscribers join rooms on `/ws`, P publishers publish at R/s in
//! total; subscribers record delivery latency (the send time travels in the
//! payload; all processes share `CLOCK_MONOTONIC`) and count what they got.
//!
//! Subscriber j joins room `j mod rooms`; publish k (global, `k mod P` is its
//! publisher) goes to room `k mod rooms`. Workers count subscribers joined and
//! publishes sent per room (`fanout.room.<r>.subs` / `.sent`), so the parent
//! computes expected deliveries exactly: sum over rooms of subs x sent.
//! Publishers join every room first (the node refuses a publish from a
//! non-member by default: `rooms.publish_requires_join`); the publisher
//! itself is never sent its own messages, and what other publishers send it
//! is read and ignored, so the expected count is subscribers only.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{close_conn, open_conn, pace, spawn, wait_until};
use crate::clock::{mono_us, secs_us, sleep_until_us, to_instant};
use crate::net::Ws;
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Name of room `r` (fits the protocol's 1-128 of `[A-Za-z0-9_.:-]`).
pub fn room_name(r: u64) -> String {
    format!("lt-room-{r}")
}

/// Runs this worker's share of the fanout scenario.
pub async fn run(ctx: CtxRef) {
    let p = ctx.p().clone();
    let (w, i) = (p.workers as u64, ctx.task.index as u64);
    let (go_tx, go_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let settled = Rc::new(Cell::new(0u64));
    let mut tasks = Vec::new();
    let pubs = Schedule::new(ctx.task.start_us, 0.0, i, w, p.publishers);
    for n in 0..pubs.len() {
        let pid = pubs.global_index(n);
        let f = publisher(ctx.clone(), pid, go_rx.clone(), stop_rx.clone(), settled.clone(), room_name);
        tasks.push(spawn(f));
    }
    let subs = Schedule::new(ctx.task.start_us, p.rate, i, w, p.conns);
    pace(subs, |_, j, intended| {
        let f = subscriber(ctx.clone(), j, intended, stop_rx.clone(), settled.clone());
        tasks.push(spawn(f));
    })
    .await;
    let mine = subs.len() + pubs.len();
    wait_until(ctx.timeout() * 3 + Duration::from_secs(1), || settled.get() >= mine).await;
    let go = ctx.barrier("subscribed").await;
    let _ = go_tx.send(go);
    sleep_until_us(go + secs_us(p.duration) + secs_us(p.drain)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

/// Delivered `data` as publishers write it.
#[derive(Debug, Deserialize)]
pub(super) struct Stamp {
    /// Publisher id.
    pub p: u64,
    /// Publisher-local sequence number.
    pub s: u64,
    /// Actual send time, monotonic us.
    pub t: u64,
    /// Intended send time, monotonic us.
    pub i: u64,
}

/// The server frames a subscriber cares about (join replies, errors).
#[derive(Debug, Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    ty: String,
    room: Option<String>,
}

/// A delivery, parsed straight into its stamp: at 100k deliveries/s on a shared
/// 2-core machine the client's parsing cost shows up in the latency it measures,
/// so no intermediate `serde_json::Value` and no owned strings.
#[derive(Debug, Deserialize)]
struct Delivery<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    data: Stamp,
}

/// Per-subscriber bookkeeping of what arrived from each publisher.
#[derive(Debug, Default)]
pub struct Seen {
    bits: Vec<Vec<u64>>,
    highest: Vec<Option<u64>>,
}

/// What one delivery was, relative to what came before.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// First time, in order.
    New,
    /// First time, but after a higher sequence from the same publisher.
    OutOfOrder,
    /// Already seen.
    Duplicate,
}

impl Seen {
    /// Notes delivery `(publisher, seq)` and classifies it.
    pub fn note(&mut self, publisher: u64, seq: u64) -> Arrival {
        let p = publisher as usize;
        if self.bits.len() <= p {
            self.bits.resize_with(p + 1, Vec::new);
            self.highest.resize(p + 1, None);
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let bits = &mut self.bits[p];
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            return Arrival::Duplicate;
        }
        bits[word] |= 1 << bit;
        let prev = self.highest[p];
        self.highest[p] = Some(prev.map_or(seq, |h| h.max(seq)));
        match prev {
            Some(h) if seq < h => Arrival::OutOfOrder,
            _ => Arrival::New,
        }
    }
}

async fn subscriber(ctx: CtxRef, j: u64, intended: u64, mut stop: watch::Receiver<bool>, settled: Rc<Cell<u64>>) {
    let ws = open_conn(&ctx, j, intended).await;
    let room = room_name(j % ctx.p().rooms);
    let joined = match ws {
        Some(mut ws) => match join(&ctx, &mut ws, &room).await {
            Ok(()) => Some(ws),
            Err(reason) => {
                ctx.stats.borrow_mut().fail(reason, false);
                ctx.open.set(ctx.open.get() - 1);
                None
            }
        },
        None => None,
    };
    settled.set(settled.get() + 1);
    let Some(mut ws) = joined else { return };
    ctx.stats.borrow_mut().add(&format!("fanout.room.{}.subs", j % ctx.p().rooms), 1);
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => on_delivery(&ctx, &mut seen, t.as_str()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    ctx.open.set(ctx.open.get() - 1);
                    ctx.stats.borrow_mut().fail("closed_early", false);
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    close_conn(&ctx, ws).await;
}

/// Sends `join` and waits for `joined` (skipping `welcome` and anything else).
async fn join(ctx: &CtxRef, ws: &mut Ws, room: &str) -> Result<(), &'static str> {
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

fn on_delivery(ctx: &CtxRef, seen: &mut Seen, text: &str) {
    let now = mono_us();
    let mut st = ctx.stats.borrow_mut();
    let stamp = match serde_json::from_str::<Delivery>(text) {
        Ok(d) if d.ty == "message" => d.data,
        _ => match serde_json::from_str::<Incoming>(text).map(|i| i.ty) {
            Ok(t) if t == "error" => return st.fail("server_error", false),
            Ok(t) if t != "message" => return,
            _ => return st.fail("bad_message", false),
        },
    };
    match seen.note(stamp.p, stamp.s) {
        Arrival::Duplicate => return st.add("messages.duplicates", 1),
        Arrival::OutOfOrder => st.add("messages.out_of_order", 1),
        Arrival::New => {}
    }
    st.add("messages.received", 1);
    st.record_pair("delivery", now.saturating_sub(stamp.t), now.saturating_sub(stamp.i));
}

/// Publisher `pid`: joins every room (named by `name`), waits for the go time, then
/// publishes its share of the schedule; publish k goes to room `k mod rooms`.
pub(super) async fn publisher(
    ctx: CtxRef,
    pid: u64,
    mut go: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    settled: Rc<Cell<u64>>,
    name: fn(u64) -> String,
) {
    let Some(mut ws) = open_conn(&ctx, pid, mono_us()).await else {
        settled.set(settled.get() + 1);
        return;
    };
    // One join at a time, each answered before the next: joins of rooms with
    // history are limited per connection (`rooms.max_pending_joins`). Settled
    // (for the barrier) once all are joined.
    for r in 0..ctx.p().rooms {
        if let Err(reason) = join(&ctx, &mut ws, &name(r)).await {
            settled.set(settled.get() + 1);
            ctx.stats.borrow_mut().fail(reason, false);
            ctx.open.set(ctx.open.get() - 1);
            return;
        }
    }
    settled.set(settled.get() + 1);
    let go_us = match go.wait_for(|g| *g > 0).await {
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
                let msg = serde_json::json!({"type": "publish", "room": name(room), "data": data});
                if ws.send(Message::text(msg.to_string())).await.is_err() {
                    break;
                }
                let mut st = ctx.stats.borrow_mut();
                st.add("messages.sent", 1);
                st.add(&format!("fanout.room.{room}.sent"), 1);
                n += 1;
            }
            _ = stop.wait_for(|s| *s) => return close_conn(&ctx, ws).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_classifies_new_duplicate_out_of_order() {
        let mut s = Seen::default();
        assert_eq!(s.note(2, 0), Arrival::New);
        assert_eq!(s.note(2, 5), Arrival::New);
        assert_eq!(s.note(2, 3), Arrival::OutOfOrder);
        assert_eq!(s.note(2, 3), Arrival::Duplicate);
        assert_eq!(s.note(0, 200), Arrival::New);
        assert_eq!(s.note(2, 6), Arrival::New);
    }
}
