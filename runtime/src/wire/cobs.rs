//! Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999).
//!
//! COBS rewrites a byte string so that it contains no `0x00`, at a cost of at most one byte
//! per 254 bytes plus one; `0x00` is then free to delimit frames on the wire.
//! The encoder streams into a caller buffer; the decoder works in place.
//! Neither allocates nor panics: every access is bounds-checked and fails with an error.

/// The largest COBS encoding of `len` input bytes (without any delimiter).
///
/// One code byte starts every block of at most 254 data bytes, and the encoder always starts
/// a new block after a full one, so the bound is `len + len / 254 + 1`.
pub const fn max_encoded_len(len: usize) -> usize {
    len.saturating_add(len / 254).saturating_add(1)
}

/// The encoder ran out of output space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutOfSpace;

/// Streaming COBS encoder writing into a caller buffer.
pub(crate) struct Encoder<'a> {
    out: &'a mut [u8],
    /// Where the code byte of the current block goes.
    code_at: usize,
    /// Where the next data byte goes.
    pos: usize,
}

impl<'a> Encoder<'a> {
    /// Starts an encoding at the beginning of `out`.
    pub(crate) fn new(out: &'a mut [u8]) -> Result<Self, OutOfSpace> {
        if out.is_empty() {
            return Err(OutOfSpace);
        }
        Ok(Self { out, code_at: 0, pos: 1 })
    }

    /// Encodes one input byte.
    #[inline]
    pub(crate) fn push(&mut self, byte: u8) -> Result<(), OutOfSpace> {
        if byte == 0 {
            return self.close_block();
        }
        *self.out.get_mut(self.pos).ok_or(OutOfSpace)? = byte;
        self.pos = self.pos.checked_add(1).ok_or(OutOfSpace)?;
        if self.block_len()? == 0xFF {
            self.close_block()?;
        }
        Ok(())
    }

    /// Encodes a slice of input bytes.
    pub(crate) fn extend(&mut self, bytes: &[u8]) -> Result<(), OutOfSpace> {
        bytes.iter().try_for_each(|&b| self.push(b))
    }

    /// Writes the code byte of the current block and reserves the next one.
    fn close_block(&mut self) -> Result<(), OutOfSpace> {
        self.write_code()?;
        self.code_at = self.pos;
        // Reserve the next code byte.
        if self.pos >= self.out.len() {
            return Err(OutOfSpace);
        }
        self.pos = self.pos.checked_add(1).ok_or(OutOfSpace)?;
        Ok(())
    }

    /// Code byte plus data bytes of the current block: 1..=255 by construction.
    fn block_len(&self) -> Result<usize, OutOfSpace> {
        self.pos.checked_sub(self.code_at).ok_or(OutOfSpace)
    }

    fn write_code(&mut self) -> Result<(), OutOfSpace> {
        let code = u8::try_from(self.block_len()?).map_err(|_| OutOfSpace)?;
        *self.out.get_mut(self.code_at).ok_or(OutOfSpace)? = code;
        Ok(())
    }

    /// Finishes the encoding and returns its length.
    pub(crate) fn finish(mut self) -> Result<usize, OutOfSpace> {
        self.write_code()?;
        Ok(self.pos)
    }
}

/// Invalid COBS data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Invalid;

/// Decodes a COBS chunk (no `0x00` delimiters) in place and returns the decoded length.
///
/// The decoded bytes occupy `buf[..len]`. Fails on a `0x00` inside the chunk or on a code
/// byte that points past the end of the chunk.
pub(crate) fn decode_in_place(buf: &mut [u8]) -> Result<usize, Invalid> {
    let len = buf.len();
    let mut read = 0;
    let mut write = 0;
    while read < len {
        let code = *buf.get(read).ok_or(Invalid)?;
        if code == 0 {
            return Err(Invalid);
        }
        read = read.checked_add(1).ok_or(Invalid)?;
        let run = usize::from(code).saturating_sub(1);
        let end = read.checked_add(run).ok_or(Invalid)?;
        if end > len {
            return Err(Invalid);
        }
        // `write < read` always holds, so this copies towards the front.
        for i in read..end {
            let byte = *buf.get(i).ok_or(Invalid)?;
            if byte == 0 {
                return Err(Invalid);
            }
            *buf.get_mut(write).ok_or(Invalid)? = byte;
            write = write.checked_add(1).ok_or(Invalid)?;
        }
        read = end;
        // A block shorter than 254 bytes stands for its data followed by a zero, except
        // for the last block, whose zero is the delimiter itself.
        if code != 0xFF && read < len {
            *buf.get_mut(write).ok_or(Invalid)? = 0;
            write = write.checked_add(1).ok_or(Invalid)?;
        }
    }
    Ok(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(input: &[u8], out: &mut [u8]) -> Result<usize, OutOfSpace> {
        let mut enc = Encoder::new(out)?;
        enc.extend(input)?;
        enc.finish()
    }

    fn round_trip(input: &[u8]) {
        let mut out = [0u8; 1200];
        let n = encode(input, &mut out).unwrap();
        assert!(n <= max_encoded_len(input.len()), "len {n} for {}", input.len());
        assert!(!out[..n].contains(&0), "encoded data contains a zero");
        let m = decode_in_place(&mut out[..n]).unwrap();
        assert_eq!(&out[..m], input);
    }

    #[test]
    fn known_vectors() {
        // Vectors from the COBS paper / Wikipedia.
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[0x01]),
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (input, expected) in cases {
            let mut out = [0u8; 16];
            let n = encode(input, &mut out).unwrap();
            assert_eq!(&out[..n], *expected, "input {input:02x?}");
            round_trip(input);
        }
    }

    #[test]
    fn long_runs_round_trip() {
        for len in [253, 254, 255, 256, 508, 509, 1000] {
            let data: [u8; 1000] = core::array::from_fn(|i| (i % 255) as u8 + 1);
            round_trip(&data[..len]);
            let zeros = [0u8; 1000];
            round_trip(&zeros[..len]);
        }
    }

    #[test]
    fn encoder_reports_small_buffer() {
        let mut out = [0u8; 4];
        assert_eq!(encode(&[1, 2, 3, 4, 5], &mut out), Err(OutOfSpace));
        assert_eq!(encode(&[], &mut []), Err(OutOfSpace));
        let mut exact = [0u8; 6];
        assert_eq!(encode(&[1, 2, 3, 4, 5], &mut exact), Ok(6));
    }

    #[test]
    fn decoder_rejects_bad_input() {
        // Code points past the end.
        assert_eq!(decode_in_place(&mut [0x05, 0x11]), Err(Invalid));
        // Zero inside the chunk.
        assert_eq!(decode_in_place(&mut [0x03, 0x00, 0x11]), Err(Invalid));
        assert_eq!(decode_in_place(&mut [0x00]), Err(Invalid));
        // The empty chunk decodes to nothing.
        assert_eq!(decode_in_place(&mut []), Ok(0));
    }
}
