//! The shard's listeners (its SO_REUSEPORT client listener and, on shard 0,
//! the internal one), the accept loop, and where a new socket goes: this
//! shard if it has a free WebSocket slot, else the least-loaded shard that
//! has one, else here (its upgrade gets 503 + Retry-After). Every socket is
//! a pending handshake until it upgrades, bounded apart from WebSocket
//! slots.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use monoio::io::Canceller;
use monoio::net::{TcpListener, TcpStream};

use super::limits::Take;
use super::mailbox::ShardMsg;
use super::shard::Shard;
use super::table::{Conn, ConnId};
use super::App;
use crate::transport::http::Rejection;
use crate::transport::socket::{DirectStream, SharedStream};
use crate::transport::uring::Ring;

/// Which listener a socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The client port (SO_REUSEPORT, one per shard).
    Public,
    /// `server.admin_listen` (shard 0 only): internal endpoints, no limits.
    Admin,
}

/// Accepts until the shard drains.
pub async fn accept_loop<A: App>(shard: Rc<Shard<A>>, listener: TcpListener, kind: Listener) {
    loop {
        let canceller = Canceller::new();
        let handle = canceller.handle();
        match kind {
            Listener::Public => *shard.accept_cancel.borrow_mut() = Some(canceller),
            Listener::Admin => *shard.admin_cancel.borrow_mut() = Some(canceller),
        }
        if shard.accepting_stopped.get() {
            return;
        }
        match listener.cancelable_accept(handle).await {
            Ok((stream, peer)) if kind == Listener::Admin => {
                start_conn(&shard, stream, Instant::now(), peer.ip(), kind)
            }
            Ok((stream, peer)) => on_accept(&shard, stream, peer.ip()),
            Err(_) if shard.accepting_stopped.get() => return,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning;
                // the kernel keeps the queue meanwhile.
                tracing::warn!(shard = shard.id, error = %e, "accept failed; retrying in 10 ms");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Accepts kept in flight on a shard's listener on the direct path: each
/// has its own address buffer (the per-address limits need the peer), and
/// a burst of connections is taken several per loop turn.
pub const DIRECT_ACCEPTS: usize = 4;

/// Accepts into direct descriptors (io_uring, `server.io = direct`) until
/// the shard drains. Run [`DIRECT_ACCEPTS`] of these per listener.
pub async fn accept_direct<A: App>(shard: Rc<Shard<A>>, ring: Rc<Ring>, listener: Rc<std::net::TcpListener>) {
    let fd = listener.as_raw_fd();
    shard.direct_listener.set(fd);
    loop {
        if shard.accepting_stopped.get() {
            return;
        }
        match ring.accept(fd).await {
            Ok((slot, peer)) => on_accept_direct(&shard, DirectStream::new(ring.clone(), slot), peer.ip()),
            Err(_) if shard.accepting_stopped.get() => return,
            Err(e) => {
                // ENFILE: the ring's file table is full; EMFILE/ENOBUFS as
                // below. The kernel keeps the queue meanwhile.
                tracing::warn!(shard = shard.id, error = %e, "direct accept failed; retrying in 10 ms");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// [`on_accept`] for a direct descriptor: a socket handed to another shard
/// first becomes a real fd (`IORING_OP_FIXED_FD_INSTALL`) there served on
/// the poll path.
fn on_accept_direct<A: App>(shard: &Rc<Shard<A>>, stream: DirectStream, peer: IpAddr) {
    let now = Instant::now();
    shard.metrics().accepted.inc();
    if shard.table.borrow().slotted() < shard.node.capacity_per_shard {
        return start_shared(shard, SharedStream::direct(stream), now, peer, Listener::Public);
    }
    let Some(target) = shard.node.least_loaded_with_room(shard.id) else {
        return start_shared(shard, SharedStream::direct(stream), now, peer, Listener::Public);
    };
    let shard = shard.clone();
    monoio::spawn(async move {
        let fd = match stream.into_fd().await {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "cannot install a direct socket as an fd to hand it off");
                return shard.metrics().rejected[Rejection::Full.index()].inc();
            }
        };
        // SAFETY: `fd` was just installed for us and is owned by nobody else.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        match shard.send_msg(target, ShardMsg::Adopt { stream: std_stream, accepted_at: now, peer }) {
            Ok(()) => shard.metrics().handed_off.inc(),
            Err(_) => shard.metrics().rejected[Rejection::Full.index()].inc(),
        }
    });
}

/// Routes a freshly accepted socket: this shard if it has a free WebSocket
/// slot, else the least-loaded shard with one (the socket moves over the
/// mailbox), else this shard (its upgrade will be answered 503).
fn on_accept<A: App>(shard: &Rc<Shard<A>>, stream: TcpStream, peer: IpAddr) {
    let now = Instant::now();
    shard.metrics().accepted.inc();
    if shard.table.borrow().slotted() < shard.node.capacity_per_shard {
        return start_conn(shard, stream, now, peer, Listener::Public);
    }
    if let Some(target) = shard.node.least_loaded_with_room(shard.id) {
        let fd = stream.into_raw_fd();
        // SAFETY: `fd` was just released by monoio and is owned by nobody else.
        let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        match shard.send_msg(target, ShardMsg::Adopt { stream: std_stream, accepted_at: now, peer }) {
            Ok(()) => shard.metrics().handed_off.inc(),
            // Closed shard: the message (and its socket) came back and was dropped.
            Err(_) => shard.metrics().rejected[Rejection::Full.index()].inc(),
        }
        return;
    }
    start_conn(shard, stream, now, peer, Listener::Public)
}

/// Puts `stream` in the table as a pending handshake (bounded apart from
/// WebSocket slots, per shard and per address), applies the per-address
/// limits, and starts its session.
pub fn start_conn<A: App>(shard: &Rc<Shard<A>>, stream: TcpStream, accepted_at: Instant, peer: IpAddr, kind: Listener) {
    let _ = stream.set_nodelay(true);
    start_shared(shard, SharedStream::new(stream), accepted_at, peer, kind)
}

/// [`start_conn`] for a socket on either path. (A direct socket has its
/// TCP_NODELAY from the listener, which accepted sockets inherit.)
fn start_shared<A: App>(
    shard: &Rc<Shard<A>>,
    stream: SharedStream,
    accepted_at: Instant,
    peer: IpAddr,
    kind: Listener,
) {
    let m = shard.metrics();
    let trusted = shard.node.trusted.contains(peer);
    let mut conn = Conn::new(stream.fd(), false, shard.now_ms(), accepted_at);
    conn.stream = Some(stream.clone());
    conn.client = peer;
    conn.admin = kind == Listener::Admin;
    conn.via_proxy = trusted && kind == Listener::Public;
    conn.proxy_pending = conn.via_proxy;
    let id = shard.table.borrow_mut().insert(conn);
    if kind == Listener::Public {
        // Behind a trusted proxy such sockets count toward the shard's
        // total only, each under a key of its own (`Conn::handshake_key`).
        let key = shard.table.borrow().get(id).map(|c| c.handshake_key(id)).unwrap_or(peer);
        let take = shard.handshakes.borrow_mut().try_take(key, id.raw(), shard.now_ms());
        match take {
            Take::Ok => {}
            Take::Full { evict: None } => {
                m.rejected[Rejection::HandshakeLimit.index()].inc();
                shard.table.borrow_mut().remove(id);
                return; // dropping the stream closes it
            }
            Take::Full { evict: Some(old) } => {
                m.rejected[Rejection::HandshakeLimit.index()].inc();
                let now = shard.now_ms();
                if let Some(c) = shard.table.borrow_mut().get_mut(ConnId::from_raw(old)) {
                    c.abort(now);
                }
            }
        }
    }
    m.handshakes.store(shard.handshakes.borrow().len(), Ordering::Relaxed);
    // Behind a trusted proxy the real address is known only from its
    // header; the limits apply then (`Shard::admit_ip`).
    let refusal = if trusted || kind == Listener::Admin { None } else { shard.admit_ip(id, peer).err() };
    monoio::spawn(super::session::run(shard.clone(), stream, id, refusal));
}
