//! Stream decoder: collects COBS chunks between `0x00` delimiters and decodes them.
//!
//! The idea follows postcard's `CobsAccumulator`: `feed` returns the unread part of its
//! input with every result, so the caller never loses bytes and never has to guess chunk
//! boundaries.

use super::{DecodeError, Message, decode_chunk};

/// What [`Accumulator::feed`] found.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "no allocation here: the message is returned by value"
)]
pub enum FeedResult<'a> {
    /// All input was consumed without completing a chunk; feed more.
    Consumed,
    /// A chunk decoded to a message; `remaining` is the input after its delimiter.
    Message {
        /// The decoded message.
        message: Message,
        /// Unread input; feed it next.
        remaining: &'a [u8],
    },
    /// A chunk was rejected and dropped; decoding restarts at the delimiter that ended it.
    Error {
        /// Why it was rejected.
        error: DecodeError,
        /// Unread input; feed it next.
        remaining: &'a [u8],
    },
}

/// Resynchronizing stream decoder with a fixed `N`-byte chunk buffer.
///
/// Use [`FrameAccumulator`](super::FrameAccumulator) (`N` = [`ACCUMULATOR_LEN`](super::ACCUMULATOR_LEN)),
/// which fits every valid message; a smaller `N` rejects long messages as
/// [`DecodeError::Overflow`].
/// Empty chunks (consecutive delimiters) are skipped silently.
#[derive(Clone, Debug)]
pub struct Accumulator<const N: usize> {
    buf: [u8; N],
    len: usize,
    /// The current chunk did not fit; drop bytes until the next delimiter.
    overflowed: bool,
}

impl<const N: usize> Default for Accumulator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Accumulator<N> {
    /// An empty accumulator.
    pub const fn new() -> Self {
        Self { buf: [0; N], len: 0, overflowed: false }
    }

    /// Bytes of the current, incomplete chunk held so far.
    pub const fn buffered(&self) -> usize {
        self.len
    }

    /// Drops the current incomplete chunk (e.g. after the serial port reported a framing
    /// error); decoding restarts at the next delimiter.
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflowed = false;
    }

    /// Feeds bytes in any chunking; returns at the first completed chunk.
    ///
    /// Call again with `remaining` until [`FeedResult::Consumed`].
    pub fn feed<'a>(&mut self, mut input: &'a [u8]) -> FeedResult<'a> {
        loop {
            let Some(at) = input.iter().position(|&b| b == 0) else {
                self.extend(input);
                return FeedResult::Consumed;
            };
            // `at` indexes the delimiter: `chunk` is before it, `remaining` after it.
            let (chunk, rest) = input.split_at_checked(at).unwrap_or((input, &[]));
            let remaining = rest.split_first().map_or(&[][..], |(_delimiter, tail)| tail);
            self.extend(chunk);
            match self.finish_chunk() {
                None => input = remaining,
                Some(Ok(message)) => return FeedResult::Message { message, remaining },
                Some(Err(error)) => return FeedResult::Error { error, remaining },
            }
        }
    }

    /// Feeds one byte; returns a result when it completed a chunk.
    pub fn push(&mut self, byte: u8) -> Option<Result<Message, DecodeError>> {
        if byte == 0 {
            self.finish_chunk()
        } else {
            self.extend(&[byte]);
            None
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        if self.overflowed || bytes.is_empty() {
            return;
        }
        let end = self.len.saturating_add(bytes.len());
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len = end;
            }
            None => {
                self.overflowed = true;
                self.len = 0;
            }
        }
    }

    /// Handles a delimiter.
    fn finish_chunk(&mut self) -> Option<Result<Message, DecodeError>> {
        if self.overflowed {
            self.reset();
            return Some(Err(DecodeError::Overflow));
        }
        if self.len == 0 {
            return None;
        }
        let result = match self.buf.get_mut(..self.len) {
            Some(chunk) => decode_chunk(chunk),
            None => Err(DecodeError::Overflow),
        };
        self.reset();
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Frame, FrameAccumulator, MAX_ENCODED_LEN, encode, tests::object};
    use super::*;

    fn encoded(msg: &Message) -> ([u8; MAX_ENCODED_LEN], usize) {
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode(msg, &mut buf).unwrap();
        (buf, n)
    }

    fn frame(seq: u32, n: u32) -> Message {
        Message::frame(seq, u64::from(seq) * 33_000, Frame::from_objects((0..n).map(object)))
    }

    #[test]
    fn byte_by_byte_and_whole() {
        let msg = frame(1, 5);
        let (buf, n) = encoded(&msg);
        let mut acc = FrameAccumulator::new();
        let mut got = None;
        for &b in &buf[..n] {
            if let Some(r) = acc.push(b) {
                assert!(got.is_none());
                got = Some(r);
            }
        }
        assert_eq!(got, Some(Ok(msg.clone())));

        match acc.feed(&buf[..n]) {
            FeedResult::Message { message, remaining } => {
                assert_eq!(message, msg);
                assert!(remaining.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(acc.buffered(), 0);
    }

    #[test]
    fn resyncs_after_garbage_and_bad_crc() {
        let a = frame(1, 3);
        let b = Message::heartbeat(2, 5);
        let (ea, na) = encoded(&a);
        let (eb, nb) = encoded(&b);
        let mut corrupt = ea;
        corrupt[5] ^= 0x10;
        if corrupt[5] == 0 {
            corrupt[5] = 0x55;
        }

        let mut stream = [0u8; 3 * MAX_ENCODED_LEN + 16];
        let mut len = 0;
        for part in [&[0xAB, 0xCD, 0x01][..], &corrupt[..na], &[7, 7, 7], &ea[..na], &eb[..nb]] {
            stream[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }

        let mut acc = FrameAccumulator::new();
        let mut input = &stream[..len];
        let mut messages = [None, None];
        let mut errors = 0;
        let mut m = 0;
        loop {
            match acc.feed(input) {
                FeedResult::Consumed => break,
                FeedResult::Message { message, remaining } => {
                    messages[m] = Some(message);
                    m += 1;
                    input = remaining;
                }
                FeedResult::Error { error, remaining } => {
                    assert!(matches!(
                        error,
                        DecodeError::Crc | DecodeError::Cobs | DecodeError::Truncated
                    ));
                    errors += 1;
                    input = remaining;
                }
            }
        }
        assert_eq!(messages, [Some(a), Some(b)]);
        // Leading garbage, the corrupted frame, and the garbage after it.
        assert_eq!(errors, 3);
    }

    #[test]
    fn overflow_is_reported_once_then_recovers() {
        let mut acc = Accumulator::<24>::new();
        assert!(matches!(acc.feed(&[1u8; 40]), FeedResult::Consumed));
        match acc.feed(&[0]) {
            FeedResult::Error { error: DecodeError::Overflow, remaining } => {
                assert!(remaining.is_empty())
            }
            other => panic!("{other:?}"),
        }
        let hb = Message::heartbeat(9, 9);
        let (e, n) = encoded(&hb);
        assert!(n - 2 <= 24, "a heartbeat fits 24 bytes");
        match acc.feed(&e[..n]) {
            FeedResult::Message { message, .. } => assert_eq!(message, hb),
            other => panic!("{other:?}"),
        }
        // A frame too long for this accumulator is an overflow, not a panic.
        let (e, n) = encoded(&frame(3, 2));
        assert!(matches!(
            acc.feed(&e[..n]),
            FeedResult::Error { error: DecodeError::Overflow, .. }
        ));
    }

    #[test]
    fn empty_chunks_are_skipped() {
        let mut acc = FrameAccumulator::new();
        assert!(matches!(acc.feed(&[0, 0, 0, 0]), FeedResult::Consumed));
        assert!(acc.push(0).is_none());
    }
}
