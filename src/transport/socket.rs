//! One socket shared by a connection's reader and its writer, on either
//! socket path (`server.io`):
//!
//! - *poll*: a plain fd. The reader waits for readability (an io_uring
//!   PollAdd with no buffer, or epoll), then copies what arrived with one
//!   non-blocking `recv(2)`; the writer hands owned buffers to monoio's
//!   `send` ops.
//! - *direct*: an io_uring direct descriptor in the shard's own ring
//!   ([`super::uring`]): a multishot receive fills buffers of the shard's
//!   provided-buffer ring as data arrives, and reading copies one of them
//!   out; sends, shutdowns and the close go to the ring on the fixed file.
//!
//! Either way an idle connection pins no buffer, and one read takes at most
//! one arrival's worth.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRent;
use monoio::net::TcpStream;

use super::uring::Ring;

/// A connection's socket, shared by its reader and its writer: a handle
/// (cloning it counts a reference). A poll stream is monoio's 80 bytes in
/// an `Rc`; a direct stream is 16 bytes inline whose references the ring
/// counts, so an idle direct connection allocates nothing for its socket.
#[derive(Clone)]
pub enum SharedStream {
    /// A plain fd served through monoio.
    Poll(Rc<PollStream>),
    /// A direct descriptor in the shard's ring.
    Direct(DirectStream),
}

impl SharedStream {
    /// Wraps an accepted plain stream.
    pub fn new(stream: TcpStream) -> Self {
        SharedStream::Poll(Rc::new(PollStream::new(stream)))
    }

    /// Wraps a direct descriptor.
    pub fn direct(stream: DirectStream) -> Self {
        SharedStream::Direct(stream)
    }

    /// The socket's fd; -1 for a direct descriptor (which has none).
    pub fn fd(&self) -> RawFd {
        match self {
            SharedStream::Poll(p) => p.fd(),
            SharedStream::Direct(_) => -1,
        }
    }

    /// Whether an idle reader may end and leave the wait to a waker of its
    /// own (the direct path: readiness is a completion in the shard's ring,
    /// which wakes whatever waker was registered; monoio's readiness wait
    /// is an op that lives as long as its future).
    pub fn can_retire(&self) -> bool {
        matches!(self, SharedStream::Direct(_))
    }

    /// Wakes the reader waiting on this socket (direct path), so that it
    /// looks at its connection's state again.
    pub fn wake_reader(&self) {
        if let SharedStream::Direct(d) = self {
            d.ring.wake(d.key());
        }
    }

    /// Waits until the socket has data (or EOF, or an error) to read.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            SharedStream::Poll(p) => p.readable().await,
            SharedStream::Direct(d) => d.readable().await,
        }
    }

    /// One read of what arrived, without waiting: at most `buf.len()` bytes.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        match self {
            SharedStream::Poll(p) => recv(p.fd(), buf),
            SharedStream::Direct(d) => d.ring.try_recv(d.key(), buf),
        }
    }

    /// Writes all of `buf` and gives the buffer back.
    pub async fn write_all(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            SharedStream::Poll(p) => p.write_all(buf).await,
            SharedStream::Direct(d) => d.write_all(buf).await,
        }
    }

    /// For handing the socket to another process: a real fd of its own for
    /// it, and the bytes that were received and not yet read (the direct
    /// path's buffers; the poll path reads nothing ahead). A poll stream's
    /// fd is duplicated; a direct stream stops receiving for good and its
    /// descriptor is installed as an fd (`IORING_OP_FIXED_FD_INSTALL`).
    /// Either way this stream is only good for dropping afterwards.
    pub async fn detach(&self) -> io::Result<(OwnedFd, Vec<u8>)> {
        match self {
            SharedStream::Poll(p) => {
                // SAFETY: plain syscall on this stream's open fd.
                let dup = unsafe { libc::fcntl(p.fd(), libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: just created, owned by nobody else.
                Ok((unsafe { OwnedFd::from_raw_fd(dup) }, Vec::new()))
            }
            SharedStream::Direct(d) => {
                let bytes = d.ring.detach_recv(d.key(), Duration::from_secs(1)).await?;
                let fd = d.ring.install_fd(d.slot).await?;
                // SAFETY: the install gave us a new fd that nobody else owns.
                Ok((unsafe { OwnedFd::from_raw_fd(fd) }, bytes))
            }
        }
    }

    /// A direct stream for a socket that came as a real fd (from another
    /// process): the fd goes into `ring`'s file table and is closed.
    pub async fn direct_from_fd(ring: &Rc<Ring>, fd: OwnedFd) -> io::Result<Self> {
        let slot = ring.register_fd(fd.as_raw_fd()).await?;
        drop(fd);
        Ok(SharedStream::direct(DirectStream::new(ring.clone(), slot)))
    }

    /// `shutdown(2)`: wakes a reader parked in [`SharedStream::readable`]
    /// (it sees EOF, unless `how` is `SHUT_WR`) and fails a write in flight.
    pub fn shutdown(&self, how: libc::c_int) {
        match self {
            SharedStream::Poll(p) => shutdown(p.fd(), how),
            SharedStream::Direct(d) => {
                d.ring.shutdown(d.key(), d.slot, how);
                if how != libc::SHUT_WR {
                    d.ring.shut_read(d.key());
                }
            }
        }
    }
}

/// A monoio stream that the reader and the writer of one connection share.
///
/// This is the same shape as monoio's own `OwnedReadHalf`/`OwnedWriteHalf`
/// (an `Rc<UnsafeCell<TcpStream>>`): both halves live on the one shard
/// thread, and neither method keeps a reference into the stream while it is
/// suspended, since monoio's ops hold their own clone of the fd.
/// The fd is read from the stream rather than kept beside it: every
/// connection holds one of these while it lives (docs/design.md, "Reading
/// without pinning memory").
pub struct PollStream {
    inner: UnsafeCell<TcpStream>,
}

impl PollStream {
    fn new(stream: TcpStream) -> Self {
        PollStream { inner: UnsafeCell::new(stream) }
    }

    fn fd(&self) -> RawFd {
        // SAFETY: see the type's doc; a shared borrow for the duration of the call.
        unsafe { &*self.inner.get() }.as_raw_fd()
    }

    async fn readable(&self) -> io::Result<()> {
        // SAFETY: see the type's doc; the shared borrow only builds the op.
        let stream = unsafe { &*self.inner.get() };
        stream.readable(false).await
    }

    async fn write_all(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let total = buf.len();
        let mut done = 0;
        while done < total {
            let op = {
                // SAFETY: see the type's doc. `TcpStream::write` builds and
                // submits its op eagerly with its own clone of the fd; the
                // exclusive borrow is not used after this block.
                let stream = unsafe { &mut *self.inner.get() };
                stream.write(buf.slice(done..))
            };
            let (res, slice) = op.await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(total), buf)
    }
}

/// A socket accepted as a direct descriptor: slot `slot` of the shard
/// ring's file table. It takes no process fd. A handle: clones share the
/// socket (the ring counts them); dropping the last one cancels its
/// receive and closes the slot.
pub struct DirectStream {
    ring: Rc<Ring>,
    slot: u32,
    /// Its key among the ring's receives (a slab index below the file table's size).
    recv: u32,
}

impl DirectStream {
    /// Takes ownership of the direct descriptor in `slot`.
    pub fn new(ring: Rc<Ring>, slot: u32) -> Self {
        let recv = ring.open_recv(slot) as u32;
        DirectStream { ring, slot, recv }
    }

    fn key(&self) -> usize {
        self.recv as usize
    }

    async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.ring.poll_readable(self.key(), cx)).await
    }

    async fn write_all(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let total = buf.len();
        let mut done = 0;
        while done < total {
            let (res, b) = self.ring.send(self.slot, buf, done).await;
            buf = b;
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(slot = self.slot, error = %e, done, total, "direct send failed");
                    return (Err(e), buf);
                }
            }
        }
        (Ok(total), buf)
    }

    /// A real fd for the same socket (for handing it to another shard),
    /// consuming this stream (its slot is closed; the fd stays open).
    pub async fn into_fd(self) -> io::Result<RawFd> {
        self.ring.install_fd(self.slot).await
    }
}

impl Clone for DirectStream {
    fn clone(&self) -> Self {
        self.ring.retain_recv(self.key());
        DirectStream { ring: self.ring.clone(), slot: self.slot, recv: self.recv }
    }
}

impl Drop for DirectStream {
    fn drop(&mut self) {
        // The last handle closes the slot too, after any shutdown still in flight.
        self.ring.close_recv(self.key());
    }
}

/// What one non-blocking read gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// `n` bytes arrived.
    Data(usize),
    /// Nothing to read right now.
    WouldBlock,
    /// The peer closed its side (or the socket was shut down).
    Eof,
}

/// One non-blocking `recv(2)` into `buf`.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` writable bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n > 0 {
            return Ok(Recv::Data(n as usize));
        }
        if n == 0 {
            return Ok(Recv::Eof);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(Recv::WouldBlock),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// `shutdown(2)` on a plain fd: wakes a reader parked on its readability
/// (it sees EOF) and fails a write in flight.
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    if fd < 0 {
        return;
    }
    // SAFETY: plain syscall on an fd this shard owns; errors are irrelevant
    // (the socket may already be gone from the peer's side).
    unsafe {
        libc::shutdown(fd, how);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};

    use super::*;

    #[test]
    fn a_poll_stream_is_no_larger_than_monoios_stream() {
        // Every connection holds one while it lives: a handle of two words,
        // and behind it only its own path's state.
        assert!(std::mem::size_of::<SharedStream>() <= 24);
        assert_eq!(std::mem::size_of::<PollStream>(), std::mem::size_of::<TcpStream>());
        assert_eq!(std::mem::size_of::<DirectStream>(), 16);
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    async fn exercise(server: std::net::TcpStream, mut peer: std::net::TcpStream) {
        let server_fd = server.as_raw_fd();
        let s = SharedStream::new(TcpStream::from_std(server).unwrap());
        assert_eq!(s.fd(), server_fd);
        let mut buf = [0u8; 64];
        assert_eq!(s.try_recv(&mut buf).unwrap(), Recv::WouldBlock);
        peer.write_all(b"hello").unwrap();
        s.readable().await.unwrap();
        assert_eq!(s.try_recv(&mut buf).unwrap(), Recv::Data(5));
        assert_eq!(&buf[..5], b"hello");
        let (res, back) = s.write_all(b"world".to_vec()).await;
        assert_eq!((res.unwrap(), back.len()), (5, 5));
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
        s.shutdown(libc::SHUT_RDWR);
        s.readable().await.unwrap();
        assert_eq!(s.try_recv(&mut buf).unwrap(), Recv::Eof);
        let _ = peer.shutdown(Shutdown::Both);
    }

    /// The poll path over a real socket pair, on both monoio drivers: the fd
    /// it reports is the socket's, `readable` + `try_recv` get what the peer
    /// sent, `write_all` reaches the peer, and `shutdown` wakes a reader with EOF.
    #[test]
    fn poll_stream_reads_writes_and_shuts_down_a_real_socket() {
        let (server, peer) = pair();
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap().block_on(exercise(server, peer));
        let (server, peer) = pair();
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build().unwrap().block_on(exercise(server, peer));
    }
}
