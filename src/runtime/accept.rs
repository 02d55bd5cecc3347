//! The shard's SO_REUSEPORT listener, its accept loop, and where a new
//! socket goes: this shard if it has a free slot, else the least-loaded
//! shard that has one, else an overflow entry here that only answers HTTP
//! (503 + Retry-After for upgrades).

use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use monoio::io::Canceller;
use monoio::net::{TcpListener, TcpStream};

use super::mailbox::ShardMsg;
use super::shard::Shard;
use super::table::Conn;
use super::App;
use crate::transport::http::Rejection;
use crate::transport::socket::SharedStream;

/// Accepts until the shard drains.
pub async fn accept_loop<A: App>(shard: Rc<Shard<A>>, listener: TcpListener) {
    loop {
        let canceller = Canceller::new();
        let handle = canceller.handle();
        *shard.accept_cancel.borrow_mut() = Some(canceller);
        if shard.draining.get() {
            return;
        }
        match listener.cancelable_accept(handle).await {
            Ok((stream, _peer)) => on_accept(&shard, stream),
            Err(_) if shard.draining.get() => return,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning;
                // the kernel keeps the queue meanwhile.
                tracing::warn!(shard = shard.id, error = %e, "accept failed; retrying in 10 ms");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Routes a freshly accepted socket.
fn on_accept<A: App>(shard: &Rc<Shard<A>>, stream: TcpStream) {
    let now = Instant::now();
    shard.metrics().accepted.inc();
    if shard.table.borrow().slotted() < shard.node.capacity_per_shard {
        return start_conn(shard, stream, now);
    }
    if let Some(target) = shard.node.least_loaded_with_room(shard.id) {
        let fd = stream.into_raw_fd();
        // SAFETY: `fd` was just released by monoio and is owned by nobody else.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        match shard.send_msg(target, ShardMsg::Adopt { stream: std_stream, accepted_at: now }) {
            Ok(()) => {
                shard.metrics().handed_off.inc();
                return;
            }
            Err(_) => {
                // Mailbox full: the message (and its socket) came back as an
                // error and was dropped, closing the socket.
                shard.metrics().rejected[Rejection::Full.index()].inc();
                return;
            }
        }
    }
    start_conn(shard, stream, now);
}

/// Puts `stream` in the table (a slot if one is free, else overflow) and
/// starts its session.
pub fn start_conn<A: App>(shard: &Rc<Shard<A>>, stream: TcpStream, accepted_at: Instant) {
    let cfg = &shard.node.config.server;
    let m = shard.metrics();
    let slotted = shard.table.borrow().slotted() < shard.node.capacity_per_shard;
    if !slotted && m.overflow.load(Ordering::Relaxed) >= cfg.overflow_per_shard {
        m.rejected[Rejection::Full.index()].inc();
        return; // dropping the stream closes it
    }
    let _ = stream.set_nodelay(true);
    let stream = Rc::new(SharedStream::new(stream));
    let mut conn = Conn::new(stream.fd(), slotted, shard.now_ms(), accepted_at);
    conn.stream = Some(stream.clone());
    let id = shard.table.borrow_mut().insert(conn);
    if slotted {
        m.connections.store(shard.table.borrow().slotted(), Ordering::Relaxed);
    } else {
        m.overflow.fetch_add(1, Ordering::Relaxed);
    }
    monoio::spawn(super::session::run(shard.clone(), stream, id));
}
