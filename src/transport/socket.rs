//! One socket shared by a connection's reader and its writer.
//!
//! The reader waits for readability (an io_uring PollAdd with no buffer, so
//! an idle connection pins no memory) and then copies what arrived with one
//! non-blocking `recv(2)` into the shard's single read buffer. The writer
//! hands owned buffers to the ring (`send` ops, batched by the driver into
//! one `io_uring_enter` per loop turn).

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use monoio::buf::IoBuf;
use monoio::io::AsyncWriteRent;
use monoio::net::TcpStream;

/// A monoio stream that the reader and the writer of one connection share.
///
/// This is the same shape as monoio's own `OwnedReadHalf`/`OwnedWriteHalf`
/// (an `Rc<UnsafeCell<TcpStream>>`): both halves live on the one shard
/// thread, and neither method keeps a reference into the stream while it is
/// suspended, since monoio's ops hold their own clone of the fd.
pub struct SharedStream {
    inner: UnsafeCell<TcpStream>,
    fd: RawFd,
}

impl SharedStream {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream) -> Self {
        let fd = stream.as_raw_fd();
        SharedStream { inner: UnsafeCell::new(stream), fd }
    }

    /// The socket's fd.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Waits until the socket has data (or EOF, or an error) to read.
    pub async fn readable(&self) -> io::Result<()> {
        // SAFETY: see the type's doc; the shared borrow only builds the op.
        let stream = unsafe { &*self.inner.get() };
        stream.readable(false).await
    }

    /// Writes all of `buf` through the driver and gives the buffer back.
    pub async fn write_all(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
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

/// `shutdown(2)`: wakes a reader parked in [`SharedStream::readable`]
/// (it sees EOF) and fails a write in flight.
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: plain syscall on an fd this shard owns; errors are irrelevant
    // (the socket may already be gone from the peer's side).
    unsafe {
        libc::shutdown(fd, how);
    }
}
