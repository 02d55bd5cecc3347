//! WebSocket on top of a monoio socket: the upgrade ([`handshake`]), the
//! connection's read/write life ([`session`]) and the shared socket
//! ([`stream`]).

pub mod boundary;
pub mod handshake;
pub mod session;
pub mod stream;

use std::io::{self, Read, Write};

use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// The in-memory stream tungstenite reads from and writes to: input is the
/// bytes one `recv` brought (then `WouldBlock`), output goes straight into the
/// connection's send queue.
pub struct Io<'a> {
    /// Bytes not yet consumed by tungstenite.
    pub input: &'a [u8],
    /// The connection's send queue.
    pub out: &'a mut Vec<u8>,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Appends an unmasked, final binary frame holding `payload` to `out`.
pub fn push_binary_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
    out.reserve(payload.len() + 10);
    header.format(payload.len() as u64, out).expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
}
