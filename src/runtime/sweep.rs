//! Timers: one sweep per shard, every `websocket.sweep_interval_ms`.
//!
//! Per-connection timers would cost a timer-wheel entry per connection and a
//! re-arm per message. Instead the sweep walks the table once: handshake
//! timeout, server ping after `ping_interval_ms` of silence, close 4001 after
//! `idle_timeout_ms`, the close deadline, and freeing idle frame readers;
//! then the application's own per-sweep work (the cluster sample).

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::shard::Shard;
use super::table::{ConnId, Phase};
use super::{App, Sampled, SendOutcome};
use crate::runtime::Conns;
use crate::transport::close;
use crate::transport::frame;
use crate::transport::http::Rejection;

impl<A: App> Shard<A> {
    /// Runs the timers once.
    pub fn sweep(self: &Rc<Self>) {
        let w = &self.node.config.websocket;
        let handshake_timeout = Duration::from_millis(self.node.config.server.handshake_timeout_ms);
        let now = self.now_ms();
        let mut pings = Vec::new();
        let mut idle = Vec::new();
        let mut readers = 0;
        let mut queued = 0;
        let mut stalled = Vec::new();
        let mut blocked = Vec::new();
        let mut retiring = Vec::new();
        {
            let mut table = self.table.borrow_mut();
            for (id, c) in table.iter_mut() {
                let quiet = now.saturating_sub(c.last_rx_ms);
                let reader_idle = c.ctx.as_ref().is_some_and(|ctx| ctx.can_write()) && c.boundary.is_none();
                if c.phase == Phase::Open && quiet >= w.sweep_interval_ms && reader_idle {
                    // Quiet at a frame boundary: give the read buffer back.
                    c.ctx = None;
                }
                readers += c.ctx.is_some() as usize;
                // Quiet for a sweep interval on the direct path: its reader
                // task ends at its next wait (see runtime/idle.rs).
                if quiet >= w.sweep_interval_ms && !c.retired && !c.retire && c.open_and_flushed() {
                    if let Some(s) = c.stream.as_ref().filter(|s| s.can_retire()) {
                        c.retire = true;
                        retiring.push(s.clone());
                    }
                }
                queued += c.queued();
                let stuck = c.inflight > 0 && now.saturating_sub(c.write_started_ms) > w.write_timeout_ms;
                if c.phase == Phase::Open && stuck {
                    match w.slow_consumer {
                        crate::config::SlowConsumerPolicy::Close => blocked.push(id),
                        // Kept open; its reader waits on the write: counted once.
                        crate::config::SlowConsumerPolicy::Drop if c.write_started_ms != u64::MAX => {
                            c.write_started_ms = u64::MAX;
                            self.metrics().read_paused.inc();
                        }
                        crate::config::SlowConsumerPolicy::Drop => {}
                    }
                }
                let since = c.unfinished_since_ms;
                if c.phase == Phase::Open && since != 0 && now.saturating_sub(since) > w.message_timeout_ms {
                    stalled.push(id);
                }
                match c.phase {
                    Phase::Http if c.accepted_at.elapsed() > handshake_timeout => {
                        self.metrics().rejected[Rejection::HandshakeTimeout.index()].inc();
                        c.abort(now);
                    }
                    Phase::Open if quiet > w.idle_timeout_ms => idle.push(id),
                    Phase::Open if quiet > w.ping_interval_ms && !c.ping_sent => {
                        c.ping_sent = true;
                        pings.push(id);
                    }
                    Phase::Closing if now > c.close_deadline_ms => c.shut(libc::SHUT_RDWR),
                    _ => {}
                }
            }
        }
        self.metrics().frame_readers.store(readers, Ordering::Relaxed);
        self.metrics().queued_bytes.store(queued, Ordering::Relaxed);
        self.metrics().unfinished_bytes.store(self.unfinished.get(), Ordering::Relaxed);
        self.publish_deflate_stats();
        if let Some(ring) = self.ring.get() {
            self.metrics().recv_buffers_exhausted.set(ring.stats().enobufs);
        }
        for s in retiring {
            s.wake_reader();
        }
        // Waiters come and go; a burst of them must not keep its map's size.
        let mut waiters = self.flush_wakers.borrow_mut();
        if waiters.is_empty() && waiters.capacity() > 1024 {
            waiters.shrink_to_fit();
        }
        drop(waiters);
        for id in blocked {
            self.metrics().slow_consumer_closed.inc();
            self.start_close(id, close::POLICY, "send blocked: reading too slowly", true);
        }
        for id in stalled {
            self.metrics().message_timeouts.inc();
            self.start_close(id, close::POLICY, "message not completed within websocket.message_timeout_ms", true);
        }
        pings.extend(self.app.on_sweep(self));
        // Slots may have freed on other shards, or reservations been used:
        // every waiting upgrade looks again.
        self.waiters.borrow_mut().wake_all();
        for id in pings {
            self.ping(id);
        }
        for id in idle {
            self.start_close(id, close::IDLE_TIMEOUT, "idle timeout: no data or pong", true);
        }
    }

    /// Sends a server ping stamped with the shard clock (the pong gives the RTT).
    fn ping(self: &Rc<Self>, id: ConnId) {
        let stamp = self.now_us();
        if self.offer(id, frame::PING_LEN, |out| frame::push_ping(out, stamp)) == SendOutcome::Queued {
            self.metrics().pings_sent.inc();
        }
    }

    /// Up to `k` open WebSockets whose application state passes `keep`,
    /// least recently active (last byte from the peer) first.
    pub fn least_active_open(&self, k: usize, keep: impl Fn(&A::Conn) -> bool) -> Vec<ConnId> {
        let mut all: Vec<(u64, ConnId)> = self
            .table
            .borrow_mut()
            .iter_mut()
            .filter(|(_, c)| c.phase == Phase::Open && keep(&c.app))
            .map(|(id, c)| (c.last_rx_ms, id))
            .collect();
        if all.len() > k {
            all.select_nth_unstable_by_key(k, |e| e.0);
            all.truncate(k);
        }
        all.sort_unstable_by_key(|e| e.0);
        all.into_iter().map(|e| e.1).collect()
    }

    /// Up to `k` open connections, uniformly sampled (reservoir sampling:
    /// one pass, k entries).
    pub fn sample_open(&self, k: usize) -> Vec<Sampled> {
        let mut picked: Vec<Sampled> = Vec::with_capacity(k);
        if k == 0 {
            return picked;
        }
        let mut seen = 0usize;
        let mut table = self.table.borrow_mut();
        for (id, c) in table.iter_mut() {
            if c.phase != Phase::Open {
                continue;
            }
            seen += 1;
            let slot =
                if picked.len() < k { Some(picked.len()) } else { Some(fastrand::usize(..seen)).filter(|i| *i < k) };
            let Some(slot) = slot else { continue };
            let entry = Sampled {
                id,
                age_ms: c.accepted_at.elapsed().as_millis() as u64,
                queued_bytes: c.queued(),
                rtt_us: c.rtt_us,
                ping_outstanding: c.ping_sent,
            };
            if slot == picked.len() {
                picked.push(entry);
            } else {
                picked[slot] = entry;
            }
        }
        picked
    }
}
