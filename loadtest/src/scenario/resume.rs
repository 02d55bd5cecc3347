//! `resume`: fanout in rooms with history, where subscribers survive losing
//! their connection. Each subscriber remembers the room's epoch and the last
//! offset it got; when its connection drops (the server closed it, a node was
//! killed, or `--drop-at` dropped it on purpose) it reconnects, to the next
//! `--url` first, and joins again with `since`, expecting the missed messages
//! replayed and then `joined` with `recovered: true`. Every offset after the
//! subscriber's first join must arrive exactly once: the expected count is the
//! fanout one (subscribers x publishes per room; all joins finish before the
//! first publish), and offsets classify each arrival as new, duplicate or out
//! of order.
//!
//! Rooms are `lt-hist-<r>` so a node can give history to them alone
//! (`[[rooms.history_rules]] pattern = "lt-hist-*"`) or to every room
//! (`rooms.history_size`). Publishers (fanout's) go to URL `pid mod count` and
//! do not reconnect: put the node that stays up first.
//!
//! Counters: `recovery.drops`, `recovery.reconnect_attempts`,
//! `recovery.reconnect_failed`, `recovery.rejoined` (recovered), `messages.replayed`;
//! histograms: `recovery` (drop seen to `joined` after the re-join), `replay_delivery`
//! (publish to arrival of replayed messages), `delivery` (live ones);
//! `min.first_drop_us` / `max.last_back_us` (monotonic) give the time until
//! every dropped subscriber was back.

use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::fanout::{publisher, Arrival, Seen, Stamp};
use super::{close_conn, open_conn, pace, spawn, wait_until};
use crate::clock::{mono_us, secs_us, sleep_until_us};
use crate::net::{client_config, establish, source_addr, Ws};
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Name of history room `r`.
pub fn room_name(r: u64) -> String {
    format!("lt-hist-{r}")
}

/// Runs this worker's share of the resume scenario.
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
        let f = subscriber(ctx.clone(), j, intended, go_rx.clone(), stop_rx.clone(), settled.clone());
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

/// A room message with its offset, parsed without owned strings.
#[derive(Debug, Deserialize)]
struct Delivery<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    data: Stamp,
    offset: Option<u64>,
}

/// The frames a joining subscriber looks at.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    ty: String,
    room: Option<String>,
    offset: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
    code: Option<String>,
}

/// What one subscriber knows about its room.
#[derive(Debug, Default)]
pub struct Position {
    /// The room's offset at the first join: everything after it must arrive.
    pub base: u64,
    /// Highest offset received (the `since` of the next join).
    pub last: u64,
    /// The room's epoch from the first `joined`.
    pub epoch: String,
    seen: Seen,
}

impl Position {
    /// Notes offset `o`, relative to the first join; an offset at or below the base
    /// cannot be one this subscriber should get again, so it counts as a duplicate.
    pub fn note(&mut self, o: u64) -> Arrival {
        if o <= self.base {
            return Arrival::Duplicate;
        }
        let a = self.seen.note(0, o - self.base - 1);
        self.last = self.last.max(o);
        a
    }
}

/// Handles one text frame on a joined connection: a room message is checked against
/// the position and counted; `replayed` says whether it came before `joined`.
fn on_frame(ctx: &CtxRef, pos: &mut Position, text: &str, replayed: bool) {
    let now = mono_us();
    let mut st = ctx.stats.borrow_mut();
    let (stamp, offset) = match serde_json::from_str::<Delivery>(text) {
        Ok(d) if d.ty == "message" => (d.data, d.offset),
        _ => match serde_json::from_str::<Reply>(text).map(|r| r.ty) {
            Ok(t) if t == "error" => return st.fail("server_error", false),
            Ok(t) if t != "message" => return,
            _ => return st.fail("bad_message", false),
        },
    };
    let Some(o) = offset else {
        return st.fail("no_offset", false);
    };
    match pos.note(o) {
        Arrival::Duplicate => return st.add("messages.duplicates", 1),
        Arrival::OutOfOrder => st.add("messages.out_of_order", 1),
        Arrival::New => {}
    }
    st.add("messages.received", 1);
    if replayed {
        st.add("messages.replayed", 1);
        st.record("replay_delivery", now.saturating_sub(stamp.t));
    } else {
        st.record_pair("delivery", now.saturating_sub(stamp.t), now.saturating_sub(stamp.i));
    }
}

/// Sends `join` (with `since` once the subscriber has a position) and reads until
/// `joined`, handling replayed messages on the way. A re-join that does not answer
/// `recovered: true` is a `not_recovered` failure; the position then restarts at
/// the new offset so the rest of the run is still checked.
async fn join(ctx: &CtxRef, ws: &mut Ws, room: &str, pos: &mut Position, first: bool) -> Result<(), &'static str> {
    let msg = if first {
        serde_json::json!({"type": "join", "room": room})
    } else {
        serde_json::json!({"type": "join", "room": room, "since": {"offset": pos.last, "epoch": pos.epoch}})
    };
    ws.send(Message::text(msg.to_string())).await.map_err(|_| "closed_early")?;
    let wait = async {
        loop {
            let t = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Err("closed_early"),
                Some(Ok(_)) => continue,
            };
            if t.as_str().contains("\"message\"") {
                on_frame(ctx, pos, t.as_str(), true);
                continue;
            }
            let Ok(r) = serde_json::from_str::<Reply>(t.as_str()) else { continue };
            match r.ty.as_str() {
                "joined" if r.room.as_deref() == Some(room) => return Ok(r),
                "error" => {
                    let code = r.code.unwrap_or_default();
                    return Err(if code == "rate_limited" { "join_rate_limited" } else { "join_error" });
                }
                _ => {}
            }
        }
    };
    let r = tokio::time::timeout(ctx.timeout(), wait).await.unwrap_or(Err("timeout"))?;
    let (Some(offset), Some(epoch)) = (r.offset, r.epoch) else {
        return Err("no_history");
    };
    if first {
        *pos = Position { base: offset, last: offset, epoch, seen: Seen::default() };
        return Ok(());
    }
    let mut st = ctx.stats.borrow_mut();
    if r.recovered != Some(true) || epoch != pos.epoch {
        st.fail("not_recovered", false);
        *pos = Position { base: offset, last: offset, epoch, seen: Seen::default() };
    } else if offset > pos.last {
        // Recovered, yet the answer's position is past what was replayed.
        st.add("messages.gap_at_rejoin", offset - pos.last);
    }
    Ok(())
}

/// A small deterministic generator for reconnect jitter (splitmix64).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform fraction in [0, 1) from `seed`.
fn frac(seed: u64) -> f64 {
    (mix(seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// Delay before reconnect attempt `attempt` (0 = the first): uniform in
/// [0, jitter] for the first, then equal jitter over 200 ms doubling to 2 s.
pub fn backoff_us(jitter_s: f64, seed: u64, attempt: u32) -> u64 {
    if attempt == 0 {
        return (secs_us(jitter_s) as f64 * frac(seed)) as u64;
    }
    let base = (100_000u64 << attempt.min(5)).min(2_000_000);
    base / 2 + ((base / 2) as f64 * frac(seed ^ u64::from(attempt))) as u64
}

/// Reconnects after a drop: the next URL first, then round-robin, with backoff, until
/// a connection is joined again or the run stops (`None`).
async fn reconnect(
    ctx: &CtxRef,
    j: u64,
    target: &mut usize,
    room: &str,
    pos: &mut Position,
    stop: &mut watch::Receiver<bool>,
) -> Option<Ws> {
    let n = ctx.targets.len();
    let seed = mix(j ^ mono_us());
    let mut attempt = 0u32;
    loop {
        let delay = Duration::from_micros(backoff_us(ctx.p().reconnect_jitter, seed, attempt));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        attempt += 1;
        *target = (*target + 1) % n;
        ctx.stats.borrow_mut().add("recovery.reconnect_attempts", 1);
        let t = &ctx.targets[*target];
        let cfg = client_config(ctx.p().size + 1024);
        match establish(t, source_addr(&t.addr, ctx.p().sources, j), ctx.timeout(), cfg).await {
            Ok((mut ws, _)) => match join(ctx, &mut ws, room, pos, false).await {
                Ok(()) => return Some(ws),
                Err(reason) => ctx.stats.borrow_mut().add(&format!("recovery.rejoin_failed.{reason}"), 1),
            },
            Err(reason) => ctx.stats.borrow_mut().add(&format!("recovery.reconnect_failed.{reason}"), 1),
        }
        ctx.stats.borrow_mut().add("recovery.reconnect_failed", 1);
    }
}

/// Why the live loop of a subscriber ended.
enum End {
    Stop,
    Lost,
    Dropped,
}

async fn subscriber(
    ctx: CtxRef,
    j: u64,
    intended: u64,
    mut go: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    settled: Rc<Cell<u64>>,
) {
    let p = ctx.p().clone();
    let room = room_name(j % p.rooms);
    let mut pos = Position::default();
    let ws = match open_conn(&ctx, j, intended).await {
        Some(mut ws) => match join(&ctx, &mut ws, &room, &mut pos, true).await {
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
    let Some(mut ws) = ws else { return };
    ctx.stats.borrow_mut().add(&format!("fanout.room.{}.subs", j % p.rooms), 1);
    let mut target = (j % ctx.targets.len() as u64) as usize;
    let mut drop_pending = p.drop_at > 0.0 && j.is_multiple_of(2);
    let drop_at = async {
        let g = match go.wait_for(|g| *g > 0).await {
            Ok(g) => *g,
            Err(_) => return std::future::pending().await,
        };
        sleep_until_us(g + secs_us(p.drop_at)).await;
    };
    tokio::pin!(drop_at);
    loop {
        let end = tokio::select! {
            _ = stop.wait_for(|s| *s) => End::Stop,
            _ = &mut drop_at, if drop_pending => End::Dropped,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    on_frame(&ctx, &mut pos, t.as_str(), false);
                    continue;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => End::Lost,
                Some(Ok(_)) => continue,
            },
        };
        match end {
            End::Stop => break,
            End::Lost | End::Dropped => {
                if matches!(end, End::Dropped) {
                    drop_pending = false;
                }
                // Dropping the stream closes the socket without a close frame.
                drop(ws);
                ctx.open.set(ctx.open.get() - 1);
                let dropped = mono_us();
                {
                    let mut st = ctx.stats.borrow_mut();
                    st.add("recovery.drops", 1);
                    st.min("first_drop_us", dropped);
                }
                match reconnect(&ctx, j, &mut target, &room, &mut pos, &mut stop).await {
                    Some(back) => {
                        let now = mono_us();
                        let mut st = ctx.stats.borrow_mut();
                        st.add("recovery.rejoined", 1);
                        st.record("recovery", now - dropped);
                        st.max("last_back_us", now);
                        ctx.open.set(ctx.open.get() + 1);
                        ws = back;
                    }
                    None => {
                        ctx.stats.borrow_mut().fail("not_back", false);
                        return;
                    }
                }
            }
        }
    }
    close_conn(&ctx, ws).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_counts_offsets_after_the_base_once() {
        let mut p = Position { base: 40, last: 40, epoch: "e".into(), seen: Seen::default() };
        assert_eq!(p.note(41), Arrival::New);
        assert_eq!(p.note(43), Arrival::New);
        assert_eq!(p.last, 43);
        assert_eq!(p.note(42), Arrival::OutOfOrder, "a gap filled late");
        assert_eq!(p.note(42), Arrival::Duplicate);
        assert_eq!(p.note(40), Arrival::Duplicate, "the base itself came before the join");
        assert_eq!(p.note(7), Arrival::Duplicate);
        assert_eq!(p.last, 43);
    }

    #[test]
    fn backoff_first_attempt_within_jitter_then_equal_jitter_capped() {
        for seed in 0..200 {
            assert!(backoff_us(1.0, seed, 0) < 1_000_000);
            let b1 = backoff_us(1.0, seed, 1);
            assert!((100_000..200_000).contains(&b1), "{b1}");
            let b9 = backoff_us(1.0, seed, 9);
            assert!((1_000_000..2_000_000).contains(&b9), "{b9}");
        }
        assert_eq!(backoff_us(0.0, 5, 0), 0);
    }
}
