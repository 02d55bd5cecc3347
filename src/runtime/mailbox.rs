//! Messages between shards (the runtime's own and, generic, the
//! application's), and how a sleeping shard is woken.
//!
//! Each shard owns one crossbeam channel (lock-free MPMC list queue) and one
//! wake socket pair. Messages for connections (room and direct frames) are
//! *data*: bounded in count and in bytes, refused past either. Everything
//! else (register, unregister, kick, adopt, shutdown) is *control*: never
//! refused, so a directory entry is never left stale and a kick never lost;
//! control messages are O(1) per connection event, so they are bounded by
//! the connections themselves. One channel keeps all of them in one FIFO
//! order (a register is handled before a direct message sent after it). A sender pushes, then flips the shard's
//! `wake_pending` flag; only the sender that flips it from false to true
//! writes one byte to the wake socket. The shard's mailbox task waits for
//! that socket to become readable through the io driver (an io_uring
//! PollAdd, or epoll), drains the byte, clears the flag, then drains the
//! channel in a batch. No lock, no busy polling, no timer tick: an idle
//! shard costs nothing, and a busy one pays one syscall per batch.

use std::io::{self, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// What a message costs its destination's mailbox.
pub trait Weigh {
    /// `Some(bytes)` for data (bounded, may be refused), `None` for control
    /// (never refused).
    fn weight(&self) -> Option<usize>;
}

/// Bookkeeping bytes charged to every data message besides its payload.
pub const MESSAGE_OVERHEAD: usize = 64;

use super::table::ConnId;

/// A message for a shard: the runtime's own, or one for its application.
#[derive(Debug)]
pub enum ShardMsg<M> {
    /// A socket accepted by a full shard, handed to this one (least loaded).
    Adopt {
        /// The accepted socket.
        stream: std::net::TcpStream,
        /// When it was accepted (handshake latency counts from here).
        accepted_at: Instant,
        /// Its peer address.
        peer: std::net::IpAddr,
    },
    /// For the application ([`super::App::on_mail`]).
    App(M),
    /// Close `conn` with `code` (for example: a newer connection took its client id).
    Kick {
        /// Connection to close.
        conn: ConnId,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// Start draining: refuse upgrades, hint open WebSockets to reconnect
    /// elsewhere, then close the rest with 1001.
    Shutdown,
    /// The drain is over: leave the mailbox loop (sent by the shard to itself).
    Stop,
    /// Zero-disconnect upgrade (old process): freeze and hand every open
    /// WebSocket to the upgrade thread ([`super::handover`]).
    Handover {
        /// Where the connections go.
        out: super::handover::Outbox,
    },
    /// A handover barrier marker from another shard.
    Barrier {
        /// Round, from 1.
        round: u8,
    },
    /// Zero-disconnect upgrade (new process): a connection of the old one,
    /// taken in and parked until [`ShardMsg::ResumeAll`].
    Resume {
        /// Its socket and state.
        handed: Box<super::handover::Handed>,
    },
    /// Zero-disconnect upgrade (new process): everything came over; the
    /// parked connections start.
    ResumeAll,
}

impl<M: Weigh> Weigh for ShardMsg<M> {
    fn weight(&self) -> Option<usize> {
        match self {
            ShardMsg::App(m) => m.weight(),
            ShardMsg::Adopt { .. }
            | ShardMsg::Kick { .. }
            | ShardMsg::Shutdown
            | ShardMsg::Stop
            | ShardMsg::Handover { .. }
            | ShardMsg::Barrier { .. }
            | ShardMsg::Resume { .. }
            | ShardMsg::ResumeAll => None,
        }
    }
}

/// Why a message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxError {
    /// The mailbox holds `server.mailbox_capacity` data messages or
    /// `websocket.mailbox_bytes` bytes of them already.
    Full,
    /// The shard has exited.
    Closed,
}

/// The sending side of one shard's mailbox; shared by every thread.
pub struct MailboxSender<M> {
    tx: Sender<ShardMsg<M>>,
    data_msgs: AtomicUsize,
    data_bytes: AtomicUsize,
    max_msgs: usize,
    max_bytes: usize,
    wake_pending: AtomicBool,
    wake_tx: StdUnixStream,
}

/// The receiving side, owned by the shard.
pub struct MailboxReceiver<M> {
    /// Messages.
    pub rx: Receiver<ShardMsg<M>>,
    /// Read end of the wake socket.
    pub wake_rx: StdUnixStream,
}

/// A new mailbox taking at most `max_msgs` data messages of `max_bytes` in all.
pub fn mailbox<M>(max_msgs: usize, max_bytes: usize) -> io::Result<(MailboxSender<M>, MailboxReceiver<M>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (wake_tx, wake_rx) = StdUnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    let sender = MailboxSender {
        tx,
        data_msgs: AtomicUsize::new(0),
        data_bytes: AtomicUsize::new(0),
        max_msgs,
        max_bytes,
        wake_pending: AtomicBool::new(false),
        wake_tx,
    };
    Ok((sender, MailboxReceiver { rx, wake_rx }))
}

impl<M: Weigh> MailboxSender<M> {
    /// Pushes `msg` and wakes the shard if it may be asleep. Never blocks.
    /// Data past the budget is refused (and handed back to the caller's
    /// accounting as `Full`); control always goes in.
    pub fn send(&self, msg: ShardMsg<M>) -> Result<(), MailboxError> {
        let weight = msg.weight();
        if let Some(w) = weight {
            // Reserve first, then check: concurrent senders never overshoot.
            let bytes = w + MESSAGE_OVERHEAD;
            let n = self.data_msgs.fetch_add(1, Ordering::AcqRel);
            let b = self.data_bytes.fetch_add(bytes, Ordering::AcqRel);
            if n >= self.max_msgs || b + bytes > self.max_bytes {
                self.release(bytes);
                return Err(MailboxError::Full);
            }
        }
        if let Err(TrySendError::Disconnected(m) | TrySendError::Full(m)) = self.tx.try_send(msg) {
            if let Some(w) = m.weight() {
                self.release(w + MESSAGE_OVERHEAD);
            }
            return Err(MailboxError::Closed);
        }
        self.wake();
        Ok(())
    }

    /// Called by the shard for every message it takes: frees its budget.
    pub fn received(&self, msg: &ShardMsg<M>) {
        if let Some(w) = msg.weight() {
            self.release(w + MESSAGE_OVERHEAD);
        }
    }

    fn release(&self, bytes: usize) {
        self.data_msgs.fetch_sub(1, Ordering::AcqRel);
        self.data_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl<M> MailboxSender<M> {
    /// Bytes of data messages waiting (for metrics).
    pub fn queued_bytes(&self) -> usize {
        self.data_bytes.load(Ordering::Relaxed)
    }

    /// Wakes the shard's mailbox task (coalesced: one byte per batch).
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer means a wake-up is already pending: fine.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    /// Called by the shard after draining the wake socket and before
    /// draining the channel, so that no message can slip between the two.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Messages waiting (for metrics).
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// True when no message waits.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A data message of `n` bytes.
    #[derive(Debug)]
    struct Data(usize);
    impl Weigh for Data {
        fn weight(&self) -> Option<usize> {
            Some(self.0)
        }
    }

    #[test]
    fn wakes_once_per_batch_and_bounds_data_but_never_control() {
        let (tx, rx) = mailbox::<Data>(16, 1 << 20).unwrap();
        for _ in 0..3 {
            tx.send(ShardMsg::Shutdown).unwrap();
        }
        let mut buf = [0u8; 8];
        assert_eq!((&rx.wake_rx).read(&mut buf).unwrap(), 1, "one byte for three sends");
        tx.clear_wake();
        assert_eq!(rx.rx.try_iter().count(), 3);
        tx.send(ShardMsg::App(Data(10))).unwrap();
        assert_eq!((&rx.wake_rx).read(&mut buf).unwrap(), 1, "woken again after clear");
        for _ in 0..15 {
            tx.send(ShardMsg::App(Data(10))).unwrap();
        }
        assert_eq!(tx.send(ShardMsg::App(Data(10))), Err(MailboxError::Full), "16 data messages at most");
        tx.send(ShardMsg::Shutdown).expect("control is never refused");
        let taken: Vec<_> = rx.rx.try_iter().collect();
        taken.iter().for_each(|m| tx.received(m));
        assert_eq!((taken.len(), tx.queued_bytes()), (17, 0));
    }

    #[test]
    fn bytes_bound_data_messages() {
        let (tx, _rx) = mailbox::<Data>(1000, 10_000).unwrap();
        tx.send(ShardMsg::App(Data(6_000))).unwrap();
        assert_eq!(tx.send(ShardMsg::App(Data(6_000))), Err(MailboxError::Full));
        tx.send(ShardMsg::App(Data(1_000))).unwrap();
        assert_eq!(tx.queued_bytes(), 7_000 + 2 * MESSAGE_OVERHEAD);
    }
}
