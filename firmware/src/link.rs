//! Link receiver: serial bytes in, [`Message`]s out, with link statistics.
//!
//! [`LinkDecoder`] wraps the wire format's [`FrameAccumulator`] and counts what happens on
//! the link; feed it from an interrupt or DMA buffer.
//! [`LinkReceiver`] owns an [`embedded_io::Read`] serial port (embedded-hal 1.0 has no serial
//! traits; HALs implement embedded-io for their UARTs) and a small read buffer.
//!
//! Neither allocates; their size is fixed at compile time (see the crate README).

use embedded_io::{Read, ReadReady};
use flsl_runtime::wire::{Body, DecodeError, FeedResult, FrameAccumulator, Message};

use crate::error::Error;

/// Bytes read from the serial port per `read` call.
pub const RX_CHUNK: usize = 64;

/// A sequence jump larger than this is taken as a sender restart, not as lost messages.
const MAX_SEQ_GAP: u32 = 1 << 16;

/// Counters of everything the receiver saw. All counters wrap at `u32::MAX`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LinkStats {
    /// Bytes taken from the serial port.
    pub bytes: u32,
    /// Valid detection frames.
    pub frames: u32,
    /// Valid heartbeats.
    pub heartbeats: u32,
    /// Valid target-selection commands.
    pub selects: u32,
    /// Chunks dropped for a CRC mismatch.
    pub crc_errors: u32,
    /// Chunks dropped because they were longer than the accumulator (garbage or a lost
    /// delimiter).
    pub overflows: u32,
    /// Chunks dropped as malformed: bad COBS, too short, wrong version, kind or length.
    pub malformed: u32,
    /// Times the decoder dropped a chunk and restarted at the next delimiter; the sum of
    /// `crc_errors`, `overflows` and `malformed`.
    pub resyncs: u32,
    /// Valid frames whose sender set the overflow flag (more than 32 objects).
    pub object_overflows: u32,
    /// Messages missing from the sequence numbering (sent but never decoded).
    pub lost: u32,
}

/// Decodes a byte stream into messages and keeps [`LinkStats`]. Owns no I/O.
#[derive(Clone, Debug, Default)]
pub struct LinkDecoder {
    acc: FrameAccumulator,
    stats: LinkStats,
    last_seq: Option<u32>,
}

impl LinkDecoder {
    /// A decoder with zeroed statistics.
    pub const fn new() -> Self {
        Self {
            acc: FrameAccumulator::new(),
            stats: LinkStats {
                bytes: 0,
                frames: 0,
                heartbeats: 0,
                selects: 0,
                crc_errors: 0,
                overflows: 0,
                malformed: 0,
                resyncs: 0,
                object_overflows: 0,
                lost: 0,
            },
            last_seq: None,
        }
    }

    /// The statistics so far.
    pub const fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Drops a partially received chunk, e.g. after a UART framing or overrun error.
    pub fn reset(&mut self) {
        if self.acc.buffered() > 0 {
            self.stats.resyncs = self.stats.resyncs.wrapping_add(1);
        }
        self.acc.reset();
    }

    /// Feeds `bytes` until the first decoded message; returns it (if any) and the unread
    /// rest of `bytes`, which must be fed next.
    ///
    /// Rejected chunks are counted and skipped, so `None` means all of `bytes` was consumed.
    pub fn feed<'a>(&mut self, mut bytes: &'a [u8]) -> (Option<Message>, &'a [u8]) {
        loop {
            let before = bytes.len();
            let (message, remaining) = match self.acc.feed(bytes) {
                FeedResult::Consumed => (None, &[][..]),
                FeedResult::Message { message, remaining } => (Some(message), remaining),
                FeedResult::Error { error, remaining } => {
                    self.count_error(error);
                    bytes = remaining;
                    self.count_bytes(before.saturating_sub(remaining.len()));
                    continue;
                }
            };
            self.count_bytes(before.saturating_sub(remaining.len()));
            if let Some(message) = &message {
                self.count_message(message);
            }
            return (message, remaining);
        }
    }

    fn count_bytes(&mut self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.stats.bytes = self.stats.bytes.wrapping_add(n);
    }

    fn count_error(&mut self, error: DecodeError) {
        let s = &mut self.stats;
        s.resyncs = s.resyncs.wrapping_add(1);
        match error {
            DecodeError::Crc => s.crc_errors = s.crc_errors.wrapping_add(1),
            DecodeError::Overflow => s.overflows = s.overflows.wrapping_add(1),
            _ => s.malformed = s.malformed.wrapping_add(1),
        }
        debug!("link: dropped chunk: {}", error);
    }

    fn count_message(&mut self, message: &Message) {
        let s = &mut self.stats;
        match &message.body {
            Body::Frame(frame) => {
                s.frames = s.frames.wrapping_add(1);
                if frame.overflow {
                    s.object_overflows = s.object_overflows.wrapping_add(1);
                    warn!("link: sender dropped objects beyond capacity (seq {})", message.seq);
                }
            }
            Body::Heartbeat => s.heartbeats = s.heartbeats.wrapping_add(1),
            Body::Select(_) => s.selects = s.selects.wrapping_add(1),
        }
        if let Some(last) = self.last_seq {
            let gap = message.seq.wrapping_sub(last).wrapping_sub(1);
            if gap > 0 && gap <= MAX_SEQ_GAP {
                s.lost = s.lost.wrapping_add(gap);
                trace!("link: {} messages lost before seq {}", gap, message.seq);
            }
        }
        self.last_seq = Some(message.seq);
    }
}

/// A [`LinkDecoder`] reading from an [`embedded_io::Read`] serial port.
pub struct LinkReceiver<R> {
    reader: R,
    decoder: LinkDecoder,
    rx: [u8; RX_CHUNK],
    /// `rx[start..end]` is read but not yet decoded.
    start: usize,
    end: usize,
}

impl<R: Read> LinkReceiver<R> {
    /// A receiver on `reader`.
    pub const fn new(reader: R) -> Self {
        Self { reader, decoder: LinkDecoder::new(), rx: [0; RX_CHUNK], start: 0, end: 0 }
    }

    /// The statistics so far.
    pub const fn stats(&self) -> &LinkStats {
        self.decoder.stats()
    }

    /// Gives the serial port back.
    pub fn release(self) -> R {
        self.reader
    }

    /// Decodes bytes already read; `None` when they are used up without a message.
    fn decode_buffered(&mut self) -> Option<Message> {
        let pending = self.rx.get(self.start..self.end).unwrap_or_default();
        let (message, remaining) = self.decoder.feed(pending);
        self.start = self.end.saturating_sub(remaining.len());
        message
    }

    /// One `read` call into the read buffer (blocks as the reader does).
    fn fill(&mut self) -> Result<(), Error<R::Error>> {
        let n = self.reader.read(&mut self.rx).map_err(Error::Read)?;
        if n == 0 {
            return Err(Error::EndOfStream);
        }
        self.start = 0;
        self.end = n.min(RX_CHUNK);
        Ok(())
    }

    /// Decodes buffered bytes, or performs one (blocking) read and decodes it.
    ///
    /// `Ok(None)` means no message was completed yet; call again.
    pub fn poll(&mut self) -> Result<Option<Message>, Error<R::Error>> {
        if let Some(message) = self.decode_buffered() {
            return Ok(Some(message));
        }
        self.fill()?;
        Ok(self.decode_buffered())
    }

    /// Blocks until a message arrives.
    ///
    /// A serial port never returns end of stream, so on an MCU this only returns errors
    /// of the port; prefer [`LinkReceiver::poll_ready`] where the link-loss fail-safe must
    /// keep running.
    pub fn receive(&mut self) -> Result<Message, Error<R::Error>> {
        loop {
            if let Some(message) = self.poll()? {
                return Ok(message);
            }
        }
    }
}

impl<R: Read + ReadReady> LinkReceiver<R> {
    /// Never blocks: decodes buffered bytes and reads only while the port has bytes ready,
    /// until a message completes.
    ///
    /// `Ok(None)` means no complete message is available right now.
    pub fn poll_ready(&mut self) -> Result<Option<Message>, Error<R::Error>> {
        loop {
            if let Some(message) = self.decode_buffered() {
                return Ok(Some(message));
            }
            if !self.reader.read_ready().map_err(Error::Read)? {
                return Ok(None);
            }
            self.fill()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flsl_runtime::wire::{Frame, MAX_ENCODED_LEN, encode};

    #[test]
    fn seq_gaps_count_lost_messages() {
        let mut dec = LinkDecoder::new();
        let mut buf = [0u8; MAX_ENCODED_LEN];
        for seq in [10u32, 11, 14, 15, 3] {
            let n = encode(&Message::frame(seq, 0, Frame::new()), &mut buf).unwrap();
            let (m, rest) = dec.feed(&buf[..n]);
            assert_eq!(m.map(|m| m.seq), Some(seq));
            assert!(rest.is_empty());
        }
        // 12 and 13 are lost; the jump back to 3 is a sender restart.
        assert_eq!(dec.stats().lost, 2);
        assert_eq!(dec.stats().frames, 5);
    }

    #[test]
    fn reset_counts_a_resync_only_mid_chunk() {
        let mut dec = LinkDecoder::new();
        dec.reset();
        assert_eq!(dec.stats().resyncs, 0);
        assert_eq!(dec.feed(&[5, 6, 7]).0, None);
        dec.reset();
        assert_eq!(dec.stats().resyncs, 1);
    }
}
