//! `echo`: N connections exchange B-byte messages with an echo endpoint for D
//! seconds, K in flight per connection (closed loop) or on a fixed total
//! messages/s schedule (open loop). Every echo is compared byte for byte with
//! what was sent; the round trip is recorded from the actual send and from the
//! intended send.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::{close_conn, open_conn, pace, spawn, wait_until};
use crate::clock::{mono_us, secs_us, to_instant};
use crate::net::Ws;
use crate::schedule::Schedule;
use crate::worker::CtxRef;

/// Open-loop sends a connection may have unanswered before it stops sending and
/// counts the rest as `failures.backlog` (bounds client memory if the server stalls).
const MAX_PENDING: usize = 10_000;

/// Runs this worker's share of the echo scenario.
pub async fn run(ctx: CtxRef) {
    let p = ctx.p().clone();
    let sched = Schedule::new(ctx.task.start_us, p.rate, ctx.task.index as u64, p.workers as u64, p.conns);
    let mine = sched.len();
    let (go_tx, go_rx) = watch::channel(0u64);
    let mut tasks = Vec::new();
    pace(sched, |_, k, intended| {
        tasks.push(spawn(conn_task(ctx.clone(), k, intended, go_rx.clone())));
    })
    .await;
    wait_until(ctx.timeout() * 2 + Duration::from_secs(1), || {
        let st = ctx.stats.borrow();
        st.get("connections.established") + st.get("connections.failed") >= mine
    })
    .await;
    let go = ctx.barrier("connected").await;
    let _ = go_tx.send(go);
    for t in tasks {
        let _ = t.await;
    }
}

/// The payload of message `seq` on connection `k`: printable ASCII, so the same
/// bytes are valid as text or binary, and different per connection and message.
pub fn payload(k: u64, seq: u64, size: usize) -> Vec<u8> {
    let base = (k.wrapping_mul(31) + seq.wrapping_mul(7)) as usize;
    (0..size).map(|i| b'a' + ((base + i) % 26) as u8).collect()
}

async fn conn_task(ctx: CtxRef, k: u64, intended: u64, mut go: watch::Receiver<u64>) {
    let Some(mut ws) = open_conn(&ctx, k, intended).await else {
        return;
    };
    let go_us = match go.wait_for(|g| *g > 0).await {
        Ok(g) => *g,
        Err(_) => return,
    };
    let mut conn = EchoConn::new(&ctx, k, go_us);
    let res = if ctx.p().msg_rate > 0.0 { conn.open_loop(&mut ws).await } else { conn.closed_loop(&mut ws).await };
    let lost = conn.pending.len() as u64;
    {
        let mut st = ctx.stats.borrow_mut();
        st.add("messages.lost", lost);
        if let Err(reason) = res {
            st.fail(reason, false);
        }
    }
    if res.is_ok() {
        close_conn(&ctx, ws).await;
    } else {
        ctx.open.set(ctx.open.get() - 1);
    }
}

/// One connection's message loop state.
struct EchoConn<'a> {
    ctx: &'a CtxRef,
    k: u64,
    go_us: u64,
    end_us: u64,
    seq: u64,
    /// Sent and unanswered: (seq, intended send, actual send), in send order.
    pending: VecDeque<(u64, u64, u64)>,
}

impl<'a> EchoConn<'a> {
    fn new(ctx: &'a CtxRef, k: u64, go_us: u64) -> Self {
        Self { ctx, k, go_us, end_us: go_us + secs_us(ctx.p().duration), seq: 0, pending: VecDeque::new() }
    }

    fn message(&self, seq: u64) -> Message {
        let bytes = payload(self.k, seq, self.ctx.p().size);
        if self.ctx.p().text {
            Message::text(String::from_utf8(bytes).expect("payload is ASCII"))
        } else {
            Message::binary(bytes)
        }
    }

    /// Queues the next message (without flushing) with its intended start.
    async fn feed(&mut self, ws: &mut Ws, intended: u64) -> Result<(), &'static str> {
        let msg = self.message(self.seq);
        self.pending.push_back((self.seq, intended, mono_us()));
        self.seq += 1;
        ws.feed(msg).await.map_err(|_| "closed_early")?;
        self.ctx.stats.borrow_mut().add("messages.sent", 1);
        Ok(())
    }

    /// Checks one incoming message against the oldest pending one and records it.
    fn receive(&mut self, m: Message) -> Result<bool, &'static str> {
        let (text, data) = match m {
            Message::Text(t) => (true, t.as_bytes().to_vec()),
            Message::Binary(b) => (false, b.to_vec()),
            Message::Close(_) => return Err("closed_early"),
            _ => return Ok(false),
        };
        let now = mono_us();
        let Some((seq, intended, actual)) = self.pending.pop_front() else {
            self.ctx.stats.borrow_mut().add("messages.unexpected", 1);
            return Err("mismatch");
        };
        let mut st = self.ctx.stats.borrow_mut();
        st.add("messages.received", 1);
        if text != self.ctx.p().text || data != payload(self.k, seq, self.ctx.p().size) {
            st.add("messages.mismatched", 1);
            st.fail("mismatch", false);
        }
        st.record_pair("rtt", now - actual, now.saturating_sub(intended));
        Ok(true)
    }

    /// Reads the next data message, bounded by the timeout.
    async fn next(&mut self, ws: &mut Ws) -> Result<bool, &'static str> {
        match tokio::time::timeout(self.ctx.timeout(), ws.next()).await {
            Err(_) => Err("timeout"),
            Ok(None) | Ok(Some(Err(_))) => Err("closed_early"),
            Ok(Some(Ok(m))) => self.receive(m),
        }
    }

    /// K in flight: every echo received before the end triggers the next send.
    async fn closed_loop(&mut self, ws: &mut Ws) -> Result<(), &'static str> {
        crate::clock::sleep_until_us(self.go_us).await;
        for _ in 0..self.ctx.p().in_flight {
            self.feed(ws, mono_us()).await?;
        }
        ws.flush().await.map_err(|_| "closed_early")?;
        while !self.pending.is_empty() {
            if self.next(ws).await? && mono_us() < self.end_us {
                let now = mono_us();
                self.feed(ws, now).await?;
                ws.flush().await.map_err(|_| "closed_early")?;
            }
        }
        Ok(())
    }

    /// Fixed rate: message m of this connection is due at go + (k + m*N)/rate.
    async fn open_loop(&mut self, ws: &mut Ws) -> Result<(), &'static str> {
        let p = self.ctx.p();
        let total = Schedule::events_in(p.msg_rate, p.duration);
        let sched = Schedule::new(self.go_us, p.msg_rate, self.k, p.conns, total);
        let mut n = 0;
        while n < sched.len() {
            let due = sched.intended_us(n);
            tokio::select! {
                _ = tokio::time::sleep_until(to_instant(due)) => {
                    while n < sched.len() && sched.intended_us(n) <= mono_us() {
                        if self.pending.len() >= MAX_PENDING {
                            self.ctx.stats.borrow_mut().fail("backlog", false);
                        } else {
                            self.feed(ws, sched.intended_us(n)).await?;
                        }
                        n += 1;
                    }
                    ws.flush().await.map_err(|_| "closed_early")?;
                }
                m = ws.next() => match m {
                    None | Some(Err(_)) => return Err("closed_early"),
                    Some(Ok(m)) => { self.receive(m)?; }
                }
            }
        }
        while !self.pending.is_empty() {
            self.next(ws).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_ascii_sized_and_distinct() {
        let a = payload(1, 2, 64);
        assert_eq!(a.len(), 64);
        assert!(a.iter().all(|b| b.is_ascii_lowercase()));
        assert_ne!(a, payload(1, 3, 64));
        assert_ne!(a, payload(2, 2, 64));
        assert!(payload(0, 0, 0).is_empty());
    }
}
