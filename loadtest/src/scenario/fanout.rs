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

use futures_util::StreamExt;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use super::rooms::{self, join, round_robin, Incoming, Layout, Phase, Stamp};
use super::{close_conn, open_conn};
use crate::clock::mono_us;
use crate::worker::CtxRef;

/// Name of room `r` (fits the protocol's 1-128 of `[A-Za-z0-9_.:-]`).
pub fn room_name(r: u64) -> String {
    format!("lt-room-{r}")
}

/// Runs this worker's share of the fanout scenario.
pub async fn run(ctx: CtxRef) {
    let layout = Layout { room: room_name, publisher_target: round_robin };
    rooms::drive(ctx, layout, subscriber).await;
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
    /// The lowest sequence number of `publisher` below `end` that was not seen.
    pub fn first_missing(&self, publisher: u64, end: u64) -> Option<u64> {
        let bits = self.bits.get(publisher as usize).map_or(&[][..], |b| &b[..]);
        (0..end).find(|s| bits.get((s / 64) as usize).is_none_or(|w| w & (1 << (s % 64)) == 0))
    }

    /// How many distinct sequence numbers of `publisher` were seen.
    pub fn count(&self, publisher: u64) -> u64 {
        self.bits.get(publisher as usize).map_or(0, |b| b.iter().map(|w| u64::from(w.count_ones())).sum())
    }

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

async fn subscriber(ctx: CtxRef, j: u64, intended: u64, mut phase: Phase) {
    let ws = open_conn(&ctx, j, intended).await;
    let room = room_name(j % ctx.p().rooms);
    let joined = rooms::first_join(&ctx, ws, |mut ws| async {
        let r = join(&ctx, &mut ws, &room).await;
        (ws, r)
    })
    .await;
    phase.settled();
    let Some(mut ws) = joined else { return };
    ctx.stats.borrow_mut().add(&format!("fanout.room.{}.subs", j % ctx.p().rooms), 1);
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            _ = phase.stop.wait_for(|s| *s) => break,
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
        assert_eq!((s.count(2), s.count(0), s.count(9)), (4, 1, 0));
        assert_eq!(s.first_missing(2, 7), Some(1));
        assert_eq!(s.first_missing(2, 1), None);
        assert_eq!(s.first_missing(9, 3), Some(0));
    }
}
