//! Messages between shards (the runtime's own and, generic, the
//! application's), and how a sleeping shard is woken.
//!
//! Each shard owns one bounded crossbeam channel (lock-free MPMC array queue)
//! and one wake socket pair. A sender pushes, then flips the shard's
//! `wake_pending` flag; only the sender that flips it from false to true
//! writes one byte to the wake socket. The shard's mailbox task waits for
//! that socket to become readable through the io driver (an io_uring
//! PollAdd, or epoll), drains the byte, clears the flag, then drains the
//! channel in a batch. No lock, no busy polling, no timer tick: an idle
//! shard costs nothing, and a busy one pays one syscall per batch.

use std::io::{self, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};

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
    /// Start draining: stop accepting, close everything with 1001.
    Shutdown,
}

/// Why a message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxError {
    /// The mailbox holds `server.mailbox_capacity` messages already.
    Full,
    /// The shard has exited.
    Closed,
}

/// The sending side of one shard's mailbox; shared by every thread.
pub struct MailboxSender<M> {
    tx: Sender<ShardMsg<M>>,
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

/// A new mailbox of `capacity` messages.
pub fn mailbox<M>(capacity: usize) -> io::Result<(MailboxSender<M>, MailboxReceiver<M>)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let (wake_tx, wake_rx) = StdUnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    wake_rx.set_nonblocking(true)?;
    Ok((MailboxSender { tx, wake_pending: AtomicBool::new(false), wake_tx }, MailboxReceiver { rx, wake_rx }))
}

impl<M> MailboxSender<M> {
    /// Pushes `msg` and wakes the shard if it may be asleep. Never blocks.
    pub fn send(&self, msg: ShardMsg<M>) -> Result<(), MailboxError> {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(MailboxError::Full),
            Err(TrySendError::Disconnected(_)) => return Err(MailboxError::Closed),
        }
        self.wake();
        Ok(())
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

    #[test]
    fn wakes_once_per_batch_and_reports_full() {
        let (tx, rx) = mailbox::<()>(16).unwrap();
        for _ in 0..3 {
            tx.send(ShardMsg::Shutdown).unwrap();
        }
        let mut buf = [0u8; 8];
        assert_eq!((&rx.wake_rx).read(&mut buf).unwrap(), 1, "one byte for three sends");
        tx.clear_wake();
        assert_eq!(rx.rx.try_iter().count(), 3);
        tx.send(ShardMsg::Shutdown).unwrap();
        assert_eq!((&rx.wake_rx).read(&mut buf).unwrap(), 1, "woken again after clear");
        for _ in 0..15 {
            tx.send(ShardMsg::Shutdown).unwrap();
        }
        assert_eq!(tx.send(ShardMsg::Shutdown), Err(MailboxError::Full));
    }
}
