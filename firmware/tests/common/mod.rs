//! Shared test helpers: a chunked `embedded_io` reader and message encoding.

#![allow(dead_code)]

use core::convert::Infallible;
use embedded_io::{ErrorType, Read, ReadReady};
use flsl_firmware::wire::{MAX_ENCODED_LEN, Message, encode};

/// Serves `chunks` one `read` call at a time (a read never crosses a chunk boundary), the
/// way a UART driver hands over whatever arrived since the last call.
pub struct ChunkReader<'a> {
    chunks: &'a [Vec<u8>],
    chunk: usize,
    offset: usize,
    /// Non-empty chunks handed out so far.
    pub chunks_read: usize,
}

impl<'a> ChunkReader<'a> {
    pub fn new(chunks: &'a [Vec<u8>]) -> Self {
        Self { chunks, chunk: 0, offset: 0, chunks_read: 0 }
    }

    /// Every byte has been read.
    pub fn is_drained(&self) -> bool {
        self.chunks.iter().skip(self.chunk).map(Vec::len).sum::<usize>() <= self.offset
    }
}

impl ErrorType for ChunkReader<'_> {
    type Error = Infallible;
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        while let Some(chunk) = self.chunks.get(self.chunk) {
            let rest = &chunk[self.offset..];
            if rest.is_empty() {
                self.chunk += 1;
                self.offset = 0;
                continue;
            }
            if self.offset == 0 {
                self.chunks_read += 1;
            }
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.offset += n;
            return Ok(n);
        }
        Ok(0)
    }
}

impl ReadReady for ChunkReader<'_> {
    /// Ready while data is left; once drained the port just goes quiet, as a UART does
    /// (`read` would report end of stream).
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(!self.is_drained())
    }
}

/// Appends the wire encoding of `msg` to `out`.
pub fn push_encoded(out: &mut Vec<u8>, msg: &Message) {
    let mut buf = [0u8; MAX_ENCODED_LEN];
    let n = encode(msg, &mut buf).expect("MAX_ENCODED_LEN fits every message");
    out.extend_from_slice(&buf[..n]);
}

/// The wire encoding of `msg`.
pub fn encoded(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    push_encoded(&mut out, msg);
    out
}
