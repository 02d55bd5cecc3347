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
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::fanout::{Arrival, Seen};
use super::rooms::{self, round_robin, Layout, Phase, Stamp};
use super::{close_conn, open_conn_to};
use crate::clock::{mono_us, secs_us, sleep_until_us};
use crate::net::{client_config, establish, source_addr, Established, Target, Ws};
use crate::worker::CtxRef;

/// Name of history room `r`.
pub fn room_name(r: u64) -> String {
    format!("lt-hist-{r}")
}

/// Runs this worker's share of the resume scenario: subscriber j starts on URL
/// `j mod count`, publishers on `pid mod count`.
pub async fn run(ctx: CtxRef) {
    let layout = Layout { room: room_name, publisher_target: round_robin };
    rooms::drive(ctx, layout, |ctx: CtxRef, j, intended, phase| {
        let first = round_robin(j, ctx.targets.len());
        subscriber(ctx, j, intended, first, phase)
    })
    .await;
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
    url: Option<String>,
    after_ms: Option<u64>,
}

/// A `reconnect` hint: wait `after_ms`, then connect to `url` (empty: the next
/// `--url`). See docs/protocol.md, "Reconnect hints".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// Where to go; empty = the same address (here: the next `--url`).
    pub url: String,
    /// How long to wait first, capped at [`MAX_AFTER_MS`].
    pub after_ms: u64,
}

/// The longest `after_ms` a subscriber honours (the protocol promises 0-1,000 ms; a
/// larger value is the server's bug, not a reason to sit out the run).
pub const MAX_AFTER_MS: u64 = 10_000;

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

    /// Offsets between the base and the highest one received that never arrived: a
    /// message lost in the middle of the stream (what is missing at the end shows
    /// only in the expected count).
    pub fn holes(&self) -> u64 {
        (self.last - self.base).saturating_sub(self.seen.count(0))
    }

    /// The first offset in a hole, if any.
    pub fn first_hole(&self) -> Option<u64> {
        self.seen.first_missing(0, self.last - self.base).map(|s| self.base + 1 + s)
    }
}

/// Handles one text frame on a joined connection: a room message is checked against
/// the position and counted; `replayed` says whether it came before `joined`. A
/// `reconnect` hint is returned for the caller to follow.
fn on_frame(ctx: &CtxRef, pos: &mut Position, text: &str, replayed: bool) -> Option<Hint> {
    let now = mono_us();
    let (stamp, offset) = match serde_json::from_str::<Delivery>(text) {
        Ok(d) if d.ty == "message" => (d.data, d.offset),
        _ => return on_control(ctx, text),
    };
    let mut st = ctx.stats.borrow_mut();
    let Some(o) = offset else {
        st.fail("no_offset", false);
        return None;
    };
    match pos.note(o) {
        Arrival::Duplicate => {
            st.add("messages.duplicates", 1);
            return None;
        }
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
    None
}

/// A frame that is not a room message: a hint is returned, an error counted.
fn on_control(ctx: &CtxRef, text: &str) -> Option<Hint> {
    let mut st = ctx.stats.borrow_mut();
    match serde_json::from_str::<Reply>(text) {
        Ok(r) if r.ty == "reconnect" => {
            Some(Hint { url: r.url.unwrap_or_default(), after_ms: r.after_ms.unwrap_or(0).min(MAX_AFTER_MS) })
        }
        Ok(r) if r.ty == "error" => {
            st.fail("server_error", false);
            None
        }
        Ok(r) if r.ty != "message" => None,
        _ => {
            st.fail("bad_message", false);
            None
        }
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
                // A hint inside a join is not followed: the close that comes after it
                // is, as a lost connection.
                let _ = on_frame(ctx, pos, t.as_str(), true);
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

/// Where a subscriber is connected: the `--url` index the round-robin continues
/// from, and the address (a hint may name a node that is not in `--url`).
struct At {
    target: usize,
    addr: SocketAddr,
}

/// Sleeps `d` unless the run stops first (then `false`).
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Reconnects after a drop, until a connection is joined again or the run stops
/// (`None`). After a hint: wait its `after_ms`, then its URL (empty: the next
/// `--url`), once; the hint's wait replaces the backoff. Otherwise, or when that
/// fails: the next URL, round-robin, with backoff.
async fn reconnect(
    ctx: &CtxRef,
    j: u64,
    at: &mut At,
    room: &str,
    pos: &mut Position,
    stop: &mut watch::Receiver<bool>,
    hint: Option<Hint>,
) -> Option<Ws> {
    let n = ctx.targets.len();
    let seed = mix(j ^ mono_us());
    let mut attempt = 0u32;
    if let Some(h) = hint {
        if !pause(Duration::from_millis(h.after_ms), stop).await {
            return None;
        }
        let t = hinted_target(ctx, &h.url, at);
        if let Some(ws) = try_join(ctx, j, &t, room, pos).await {
            at.addr = t.addr;
            return Some(ws);
        }
        attempt = 1;
    }
    loop {
        let delay = Duration::from_micros(backoff_us(ctx.p().reconnect_jitter, seed, attempt));
        if !pause(delay, stop).await {
            return None;
        }
        attempt += 1;
        at.target = (at.target + 1) % n;
        let t = ctx.targets[at.target].clone();
        if let Some(ws) = try_join(ctx, j, &t, room, pos).await {
            at.addr = t.addr;
            return Some(ws);
        }
    }
}

/// The target a hint names: its URL, or the next `--url` when it is empty (or does not
/// parse: counted as `recovery.bad_hint_url`). The round-robin continues from the
/// `--url` at the same address, if there is one.
fn hinted_target(ctx: &CtxRef, url: &str, at: &mut At) -> Target {
    let next = |at: &mut At| {
        at.target = (at.target + 1) % ctx.targets.len();
        ctx.targets[at.target].clone()
    };
    if url.is_empty() {
        return next(at);
    }
    match Target::parse(url) {
        Ok(t) => {
            ctx.stats.borrow_mut().add("recovery.hints_with_url", 1);
            if let Some(i) = ctx.targets.iter().position(|x| x.addr == t.addr) {
                at.target = i;
            }
            t
        }
        Err(_) => {
            ctx.stats.borrow_mut().add("recovery.bad_hint_url", 1);
            next(at)
        }
    }
}

/// One reconnect attempt to `t`: connect, then re-join with `since`. Counts the
/// attempt, its failure by reason, and for an established one its upgrade time
/// (`reconnect_upgrade`) and its 100 ms slot (see [`note_reconnected`]).
async fn try_join(ctx: &CtxRef, j: u64, t: &Target, room: &str, pos: &mut Position) -> Option<Ws> {
    ctx.stats.borrow_mut().add("recovery.reconnect_attempts", 1);
    let cfg = client_config(ctx.p().size + 1024);
    match establish(t, source_addr(&t.addr, ctx.p().sources, j), ctx.timeout(), cfg).await {
        Ok((mut ws, e)) => {
            note_reconnected(ctx, e);
            match join(ctx, &mut ws, room, pos, false).await {
                Ok(()) => return Some(ws),
                Err(reason) => ctx.stats.borrow_mut().add(&format!("recovery.rejoin_failed.{reason}"), 1),
            }
        }
        Err(reason) => ctx.stats.borrow_mut().add(&format!("recovery.reconnect_failed.{reason}"), 1),
    }
    ctx.stats.borrow_mut().add("recovery.reconnect_failed", 1);
    None
}

/// Width of the slots reconnects are counted in, microseconds.
pub const SLOT_US: u64 = 100_000;

/// Counts an established reconnect in its 100 ms slot since the schedule's start
/// (`recovery.reconnected_100ms.<slot>`, summed exactly across workers, which share
/// the start time), and records its TCP-start-to-101 time.
fn note_reconnected(ctx: &CtxRef, e: Established) {
    let slot = e.upgraded_us.saturating_sub(ctx.task.start_us) / SLOT_US;
    let mut st = ctx.stats.borrow_mut();
    st.add(&format!("recovery.reconnected_100ms.{slot}"), 1);
    st.record("reconnect_upgrade", e.upgraded_us - e.started_us);
}

/// Follows a hint: closes normally (1000) as the protocol asks, reading what still
/// comes (room messages count as usual) until the server's close or EOF. A close
/// that does not finish cleanly within `--timeout` is `recovery.hint_close_unclean`
/// (not a failure: the re-join with `since` recovers what it missed).
async fn leave(ctx: &CtxRef, mut ws: Ws, pos: &mut Position) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    let clean = tokio::time::timeout(ctx.timeout(), async {
        if ws.send(Message::Close(Some(frame))).await.is_err() {
            return false;
        }
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let _ = on_frame(ctx, pos, t.as_str(), false);
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    })
    .await;
    if clean != Ok(true) {
        ctx.stats.borrow_mut().add("recovery.hint_close_unclean", 1);
    }
}

/// Why the live loop of a subscriber ended.
enum End {
    /// The run is over.
    Stop,
    /// `--drop-at`: dropped on purpose.
    Dropped,
    /// A `reconnect` hint.
    Hinted(Hint),
    /// The server's close frame, without a hint first.
    Closed,
    /// EOF or an error (a killed node, a reset).
    Lost,
}

/// Subscriber `j`: connects to target `first`, joins its room, then follows the
/// room; whenever the connection ends (hint, close, loss, `--drop-at`) it reconnects
/// and re-joins with `since`. Public to the crate's scenarios (storm puts every
/// subscriber on the first URL).
pub(super) async fn subscriber(ctx: CtxRef, j: u64, intended: u64, first: usize, mut phase: Phase) {
    let p = ctx.p().clone();
    let room = room_name(j % p.rooms);
    let mut pos = Position::default();
    let ws = open_conn_to(&ctx, first, j, intended).await;
    let ws = rooms::first_join(&ctx, ws, |mut ws| async {
        let r = join(&ctx, &mut ws, &room, &mut pos, true).await;
        (ws, r)
    })
    .await;
    phase.settled();
    let Some(mut ws) = ws else { return };
    ctx.stats.borrow_mut().add(&format!("fanout.room.{}.subs", j % p.rooms), 1);
    let first_addr = ctx.targets[first].addr;
    let mut at = At { target: first, addr: first_addr };
    let mut drop_pending = p.drop_at > 0.0 && j.is_multiple_of(2);
    let mut go = phase.go.clone();
    let drop_at = async move {
        let g = match go.wait_for(|g| *g > 0).await {
            Ok(g) => *g,
            Err(_) => return std::future::pending().await,
        };
        sleep_until_us(g + secs_us(p.drop_at)).await;
    };
    tokio::pin!(drop_at);
    loop {
        let end = tokio::select! {
            _ = phase.stop.wait_for(|s| *s) => End::Stop,
            _ = &mut drop_at, if drop_pending => End::Dropped,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => match on_frame(&ctx, &mut pos, t.as_str(), false) {
                    Some(h) => End::Hinted(h),
                    None => continue,
                },
                Some(Ok(Message::Close(_))) => End::Closed,
                Some(Err(_)) | None => End::Lost,
                Some(Ok(_)) => continue,
            },
        };
        let dropped = mono_us();
        let hint = match end {
            End::Stop => break,
            End::Hinted(h) => {
                ctx.stats.borrow_mut().add("recovery.hints", 1);
                leave(&ctx, ws, &mut pos).await;
                Some(h)
            }
            other => {
                let what = match other {
                    End::Dropped => "recovery.dropped_on_purpose",
                    End::Closed => "recovery.server_closes",
                    _ => "recovery.abrupt_closes",
                };
                drop_pending &= !matches!(other, End::Dropped);
                ctx.stats.borrow_mut().add(what, 1);
                // Dropping the stream closes the socket without a close frame.
                drop(ws);
                None
            }
        };
        ctx.open.set(ctx.open.get() - 1);
        {
            let mut st = ctx.stats.borrow_mut();
            st.add("recovery.drops", 1);
            st.min("first_drop_us", dropped);
        }
        match reconnect(&ctx, j, &mut at, &room, &mut pos, &mut phase.stop, hint).await {
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
    {
        let mut st = ctx.stats.borrow_mut();
        if at.addr != first_addr {
            st.add("recovery.ended_elsewhere", 1);
        }
        let holes = pos.holes();
        if holes > 0 {
            // Per room too, with the lowest missing offset: where in the stream it was.
            let r = j % p.rooms;
            st.add("messages.offset_holes", holes);
            st.add("messages.subscribers_with_holes", 1);
            st.add(&format!("holes.room.{r}.subscribers"), 1);
            st.min(&format!("holes.room.{r}.first_offset"), pos.first_hole().unwrap_or(0));
            st.max(&format!("holes.room.{r}.last_offset"), pos.first_hole().unwrap_or(0));
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
        assert_eq!(p.holes(), 0);
        assert_eq!(p.note(46), Arrival::New);
        assert_eq!(p.holes(), 2, "44 and 45 never came");
        assert_eq!(p.first_hole(), Some(44));
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
