//! CRC-32/ISO-HDLC (the CRC of zlib, Ethernet and PNG), table driven.
//!
//! Parameters: polynomial 0x04C11DB7 (reflected 0xEDB88320), init 0xFFFFFFFF, reflected
//! input and output, final XOR 0xFFFFFFFF; check value `crc32(b"123456789") == 0xCBF43926`.
//! It is the CRC that Python's `zlib.crc32` computes, so host tooling can verify frames
//! without this crate.

/// The reflected polynomial.
const POLY: u32 = 0xEDB8_8320;

/// 256-entry lookup table (1 KiB of flash), built at compile time.
const TABLE: [u32; 256] = make_table();

#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    reason = "evaluated at compile time"
)]
const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { POLY ^ (crc >> 1) } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Incremental CRC-32 state.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Crc32(u32);

impl Crc32 {
    /// A fresh CRC.
    pub(crate) const fn new() -> Self {
        Self(0xFFFF_FFFF)
    }

    /// Adds one byte.
    #[inline]
    #[allow(clippy::indexing_slicing, reason = "a u8 index into a 256-entry table cannot panic")]
    pub(crate) fn update_byte(&mut self, byte: u8) {
        // The index is a `u8`, so it is always inside the 256-entry table.
        self.0 = TABLE[usize::from(self.0 as u8 ^ byte)] ^ (self.0 >> 8);
    }

    /// Adds a slice of bytes.
    #[inline]
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.update_byte(byte);
        }
    }

    /// The final CRC value.
    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32/ISO-HDLC of `bytes` (the same value as zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(bytes);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn empty_input() {
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn incremental_matches_one_shot() {
        let data = b"The quick brown fox jumps over the lazy dog";
        let mut crc = Crc32::new();
        let (a, b) = data.split_at(17);
        crc.update(a);
        crc.update(b);
        assert_eq!(crc.finish(), crc32(data));
        assert_eq!(crc32(data), 0x414F_A339);
    }
}
