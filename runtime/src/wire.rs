//! The link wire format between the companion computer and the microcontroller.
//!
//! The companion computer (running `flsl detect`) sends one [`Message`] per detection frame,
//! plus heartbeats and target-selection commands, over a serial link.
//! This module is the only definition of that format; both sides compile it.
//!
//! # Layout (version 1)
//!
//! Every message is a little-endian byte string, followed by its CRC, COBS-encoded and
//! wrapped in `0x00` delimiters:
//!
//! ```text
//! wire     := 0x00  cobs(raw)  0x00
//! raw      := header body crc
//! header   := version:u8 (= 1)  kind:u8  seq:u32  timestamp_us:u64            (14 bytes)
//! body     := frame | heartbeat | select                           (depends on kind)
//! frame    := kind 1: flags:u8  count:u8  object*count             (2 + 26 * count bytes)
//! object   := x0:f32 y0:f32 x1:f32 y1:f32  class:u16  score:f32  track_id:u32   (26 bytes)
//! heartbeat:= kind 2: (empty)
//! select   := kind 3: mode:u8 (0 = auto, 1 = track)  track_id:u32              (5 bytes)
//! crc      := CRC-32/ISO-HDLC (zlib) of header + body, u32                     (4 bytes)
//! ```
//!
//! - `seq` counts messages of every kind on the link, wrapping at `u32::MAX`, so the
//!   receiver can count lost messages.
//! - `timestamp_us` is the sender's monotonic clock (for frames: the capture time).
//! - Boxes are normalized image coordinates `[x0, y0, x1, y1]`, the top-left corner
//!   `(x0, y0)` and the bottom-right corner `(x1, y1)`, with `(0, 0)` the top-left
//!   and `(1, 1)` the bottom-right corner of the image (x to the right, y down).
//! - Flags bit 0 ([`Frame::overflow`]) says the sender had more than [`MAX_OBJECTS`]
//!   objects and sent only the first [`MAX_OBJECTS`]; the other bits are reserved and
//!   must be zero.
//! - Floats travel as IEEE-754 bit patterns and are not validated: NaN is possible and
//!   consumers must cope with it.
//!
//! The leading delimiter terminates whatever garbage preceded the message, so a message
//! sent after line noise is still received.
//!
//! # Decoding
//!
//! [`Accumulator`] takes bytes in any chunking, returns one [`Message`] or [`DecodeError`]
//! per delimited chunk together with the unread input, and resynchronizes on the next
//! delimiter after garbage, a bad CRC or an over-long chunk.
//! It never panics and never allocates; its memory is fixed at compile time.
//!
//! ```
//! use flsl_runtime::wire::{encode, Accumulator, Body, FeedResult, Message, MAX_ENCODED_LEN};
//!
//! let mut buf = [0u8; MAX_ENCODED_LEN];
//! let n = encode(&Message::heartbeat(7, 1_000), &mut buf).unwrap();
//!
//! let mut acc = Accumulator::<{ flsl_runtime::wire::ACCUMULATOR_LEN }>::new();
//! match acc.feed(&buf[..n]) {
//!     FeedResult::Message { message, remaining } => {
//!         assert_eq!(message.seq, 7);
//!         assert_eq!(message.body, Body::Heartbeat);
//!         assert!(remaining.is_empty());
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

mod accumulator;
mod cobs;
mod crc;

use core::fmt;

pub use accumulator::{Accumulator, FeedResult};
pub use cobs::max_encoded_len as cobs_max_encoded_len;
pub use crc::crc32;

/// The wire format version this module speaks.
pub const VERSION: u8 = 1;

/// The most objects one [`Frame`] carries.
pub const MAX_OBJECTS: usize = 32;

/// Bytes of the common header (version, kind, seq, timestamp).
pub const HEADER_LEN: usize = 14;

/// Bytes of one encoded [`Object`].
pub const OBJECT_LEN: usize = 26;

/// Bytes of the trailing CRC.
pub const CRC_LEN: usize = 4;

/// The longest raw message (header + body + CRC, before COBS): a full frame.
pub const MAX_RAW_LEN: usize = HEADER_LEN + 2 + MAX_OBJECTS * OBJECT_LEN + CRC_LEN;

/// The longest COBS chunk between two delimiters; the capacity an [`Accumulator`] needs.
pub const ACCUMULATOR_LEN: usize = cobs::max_encoded_len(MAX_RAW_LEN);

/// The longest encoded message including both delimiters; a sufficient [`encode`] buffer.
pub const MAX_ENCODED_LEN: usize = ACCUMULATOR_LEN + 2;

/// An [`Accumulator`] sized for every valid message.
pub type FrameAccumulator = Accumulator<ACCUMULATOR_LEN>;

/// Frame flag: the sender dropped objects beyond [`MAX_OBJECTS`].
const FLAG_OVERFLOW: u8 = 0x01;

/// Message kind bytes.
const KIND_FRAME: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_SELECT: u8 = 3;

/// Selection mode bytes.
const SELECT_AUTO: u8 = 0;
const SELECT_TRACK: u8 = 1;

/// One detected or tracked object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// Box `[x0, y0, x1, y1]` in normalized image coordinates (see the [module docs](self)).
    pub bbox: [f32; 4],
    /// Class index of the detector's label map.
    pub class: u16,
    /// Confidence in `[0, 1]` (not validated; may be NaN).
    pub score: f32,
    /// Track identity, stable across frames; [`Object::UNTRACKED`] for a bare detection.
    pub track_id: u32,
}

impl Object {
    /// The `track_id` of a detection that is not (yet) part of a track.
    pub const UNTRACKED: u32 = 0;

    /// The box centre `(x, y)` in normalized image coordinates.
    pub fn center(&self) -> (f32, f32) {
        let [x0, y0, x1, y1] = self.bbox;
        ((x0 + x1) * 0.5, (y0 + y1) * 0.5)
    }

    fn write(&self, out: &mut impl Sink) -> Result<(), EncodeError> {
        for v in self.bbox {
            out.put(&v.to_le_bytes())?;
        }
        out.put(&self.class.to_le_bytes())?;
        out.put(&self.score.to_le_bytes())?;
        out.put(&self.track_id.to_le_bytes())
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let bbox = [r.f32()?, r.f32()?, r.f32()?, r.f32()?];
        Ok(Self { bbox, class: r.u16()?, score: r.f32()?, track_id: r.u32()? })
    }
}

/// The objects of one detection frame.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Frame {
    /// The sender had more than [`MAX_OBJECTS`] objects and sent only the first ones
    /// (in its priority order, normally by descending score).
    pub overflow: bool,
    /// The objects, at most [`MAX_OBJECTS`].
    pub objects: heapless::Vec<Object, MAX_OBJECTS>,
}

impl Frame {
    /// An empty frame.
    pub const fn new() -> Self {
        Self { overflow: false, objects: heapless::Vec::new() }
    }

    /// Appends `object`; when the frame is full, sets [`Frame::overflow`] and returns the
    /// object back.
    pub fn push(&mut self, object: Object) -> Result<(), Object> {
        self.objects.push(object).inspect_err(|_| self.overflow = true)
    }

    /// A frame of the first [`MAX_OBJECTS`] objects of `objects`, with
    /// [`Frame::overflow`] set when there were more.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut frame = Self::new();
        for object in objects {
            if frame.push(object).is_err() {
                break;
            }
        }
        frame
    }
}

/// Which track the firmware should follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Selection {
    /// Follow the highest-scoring object of each frame.
    #[default]
    Auto,
    /// Follow the object with this track id; hold position while it is not visible.
    Track(u32),
}

/// The payload of a [`Message`].
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "no_std without alloc: a frame cannot be boxed")]
pub enum Body {
    /// Detections and tracks of one camera frame.
    Frame(Frame),
    /// Link keep-alive, sent when there is nothing else to send.
    Heartbeat,
    /// Operator command: which target to follow.
    Select(Selection),
}

/// One message on the link.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Link sequence number: +1 per message of any kind, wrapping.
    pub seq: u32,
    /// Sender timestamp in microseconds (monotonic; for frames, the capture time).
    pub timestamp_us: u64,
    /// The payload.
    pub body: Body,
}

impl Message {
    /// A frame message.
    pub const fn frame(seq: u32, timestamp_us: u64, frame: Frame) -> Self {
        Self { seq, timestamp_us, body: Body::Frame(frame) }
    }

    /// A heartbeat message.
    pub const fn heartbeat(seq: u32, timestamp_us: u64) -> Self {
        Self { seq, timestamp_us, body: Body::Heartbeat }
    }

    /// A target-selection message.
    pub const fn select(seq: u32, timestamp_us: u64, selection: Selection) -> Self {
        Self { seq, timestamp_us, body: Body::Select(selection) }
    }

    /// Bytes of the raw encoding (header + body + CRC, before COBS).
    pub fn raw_len(&self) -> usize {
        let body = match &self.body {
            // At most MAX_OBJECTS objects: no overflow is possible; saturate anyway.
            Body::Frame(frame) => frame.objects.len().saturating_mul(OBJECT_LEN).saturating_add(2),
            Body::Heartbeat => 0,
            Body::Select(_) => 5,
        };
        body.saturating_add(HEADER_LEN + CRC_LEN)
    }

    /// Buffer size [`encode`] needs for this message (an upper bound, both delimiters
    /// included); never more than [`MAX_ENCODED_LEN`].
    pub fn encoded_len_max(&self) -> usize {
        cobs::max_encoded_len(self.raw_len()).saturating_add(2)
    }

    fn kind(&self) -> u8 {
        match self.body {
            Body::Frame(_) => KIND_FRAME,
            Body::Heartbeat => KIND_HEARTBEAT,
            Body::Select(_) => KIND_SELECT,
        }
    }

    fn write_raw(&self, out: &mut impl Sink) -> Result<(), EncodeError> {
        out.put(&[VERSION, self.kind()])?;
        out.put(&self.seq.to_le_bytes())?;
        out.put(&self.timestamp_us.to_le_bytes())?;
        match &self.body {
            Body::Frame(frame) => {
                let flags = if frame.overflow { FLAG_OVERFLOW } else { 0 };
                // At most MAX_OBJECTS (32), so it always fits a u8.
                let count = u8::try_from(frame.objects.len())
                    .map_err(|_| EncodeError::BufferTooSmall { needed: MAX_ENCODED_LEN })?;
                out.put(&[flags, count])?;
                frame.objects.iter().try_for_each(|o| o.write(out))
            }
            Body::Heartbeat => Ok(()),
            Body::Select(Selection::Auto) => {
                out.put(&[SELECT_AUTO])?;
                out.put(&0u32.to_le_bytes())
            }
            Body::Select(Selection::Track(id)) => {
                out.put(&[SELECT_TRACK])?;
                out.put(&id.to_le_bytes())
            }
        }
    }
}

/// Encoding failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The output buffer is shorter than [`Message::encoded_len_max`].
    BufferTooSmall {
        /// The buffer length that is always enough for this message.
        needed: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => {
                write!(f, "encode buffer too small: {needed} bytes needed")
            }
        }
    }
}

impl core::error::Error for EncodeError {}

/// Encodes `message` into `out` (delimiters, COBS and CRC included) and returns the number
/// of bytes written; send exactly `out[..n]`.
///
/// `out` must hold at least [`Message::encoded_len_max`] bytes; [`MAX_ENCODED_LEN`] always
/// suffices.
pub fn encode(message: &Message, out: &mut [u8]) -> Result<usize, EncodeError> {
    let needed = message.encoded_len_max();
    let too_small = EncodeError::BufferTooSmall { needed };
    if out.len() < needed {
        return Err(too_small);
    }
    let (first, rest) = out.split_first_mut().ok_or(too_small)?;
    *first = 0;
    let mut sink =
        CobsSink { enc: cobs::Encoder::new(rest).map_err(|_| too_small)?, crc: crc::Crc32::new() };
    message.write_raw(&mut sink)?;
    let crc = sink.crc.finish();
    sink.enc.extend(&crc.to_le_bytes()).map_err(|_| too_small)?;
    let n = sink.enc.finish().map_err(|_| too_small)?;
    *rest.get_mut(n).ok_or(too_small)? = 0;
    Ok(n.saturating_add(2))
}

/// Decodes one COBS chunk (the bytes between two `0x00` delimiters, which must not be
/// included) in place; `chunk` is scratch afterwards.
///
/// [`Accumulator`] calls this for every chunk; it is public for tools and fuzzing.
pub fn decode_chunk(chunk: &mut [u8]) -> Result<Message, DecodeError> {
    let len = cobs::decode_in_place(chunk).map_err(|_| DecodeError::Cobs)?;
    let raw = chunk.get(..len).ok_or(DecodeError::Cobs)?;
    decode_raw(raw)
}

/// Decodes a raw message (header + body + CRC, after COBS decoding).
pub fn decode_raw(raw: &[u8]) -> Result<Message, DecodeError> {
    if raw.len() < HEADER_LEN + CRC_LEN {
        return Err(DecodeError::Truncated);
    }
    let (data, crc_bytes) = raw.split_last_chunk::<CRC_LEN>().ok_or(DecodeError::Truncated)?;
    let sent = u32::from_le_bytes(*crc_bytes);
    if crc32(data) != sent {
        return Err(DecodeError::Crc);
    }
    let mut r = Reader { buf: data };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = r.u8()?;
    let seq = r.u32()?;
    let timestamp_us = r.u64()?;
    let body = match kind {
        KIND_FRAME => {
            let flags = r.u8()?;
            if flags & !FLAG_OVERFLOW != 0 {
                return Err(DecodeError::ReservedFlags(flags));
            }
            let count = r.u8()?;
            if usize::from(count) > MAX_OBJECTS {
                return Err(DecodeError::TooManyObjects(count));
            }
            let mut frame = Frame::new();
            frame.overflow = flags & FLAG_OVERFLOW != 0;
            for _ in 0..count {
                frame
                    .objects
                    .push(Object::read(&mut r)?)
                    .map_err(|_| DecodeError::TooManyObjects(count))?;
            }
            Body::Frame(frame)
        }
        KIND_HEARTBEAT => Body::Heartbeat,
        KIND_SELECT => {
            let mode = r.u8()?;
            let id = r.u32()?;
            match mode {
                SELECT_AUTO => Body::Select(Selection::Auto),
                SELECT_TRACK => Body::Select(Selection::Track(id)),
                other => return Err(DecodeError::BadSelection(other)),
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::Length);
    }
    Ok(Message { seq, timestamp_us, body })
}

/// Why a delimited chunk was rejected. In every case the decoder resynchronizes on the
/// next `0x00`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// The chunk was longer than the accumulator (garbage, or a lost delimiter).
    Overflow,
    /// The chunk is not valid COBS.
    Cobs,
    /// Shorter than a header plus CRC.
    Truncated,
    /// The CRC does not match (corrupted bytes).
    Crc,
    /// A wire format version this decoder does not speak.
    UnsupportedVersion(u8),
    /// An unknown message kind.
    UnknownKind(u8),
    /// Reserved frame flag bits are set.
    ReservedFlags(u8),
    /// A frame claims more than [`MAX_OBJECTS`] objects.
    TooManyObjects(u8),
    /// A selection command with an unknown mode.
    BadSelection(u8),
    /// The body length does not match its kind and count.
    Length,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overflow => f.write_str("chunk longer than the accumulator"),
            Self::Cobs => f.write_str("invalid COBS encoding"),
            Self::Truncated => f.write_str("message shorter than header and CRC"),
            Self::Crc => f.write_str("CRC mismatch"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported wire version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k}"),
            Self::ReservedFlags(flags) => write!(f, "reserved frame flags set: {flags:#04x}"),
            Self::TooManyObjects(n) => write!(f, "frame claims {n} objects (max {MAX_OBJECTS})"),
            Self::BadSelection(m) => write!(f, "unknown selection mode {m}"),
            Self::Length => f.write_str("body length does not match the message kind"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Byte sink for the raw encoding.
trait Sink {
    fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError>;
}

/// COBS-encodes and CRCs at once, so encoding needs no scratch buffer.
struct CobsSink<'a> {
    enc: cobs::Encoder<'a>,
    crc: crc::Crc32,
}

impl Sink for CobsSink<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.crc.update(bytes);
        self.enc.extend(bytes).map_err(|_| EncodeError::BufferTooSmall { needed: MAX_ENCODED_LEN })
    }
}

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn array<const K: usize>(&mut self) -> Result<[u8; K], DecodeError> {
        let (head, tail) = self.buf.split_at_checked(K).ok_or(DecodeError::Length)?;
        self.buf = tail;
        head.try_into().map_err(|_| DecodeError::Length)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn object(i: u32) -> Object {
        let f = i as f32 / 64.0;
        Object { bbox: [f, f, f + 0.1, f + 0.2], class: i as u16, score: 1.0 - f, track_id: i + 1 }
    }

    fn full_frame(n: usize) -> Message {
        Message::frame(42, 123_456_789, Frame::from_objects((0..n as u32).map(object)))
    }

    fn encode_vec(msg: &Message) -> ([u8; MAX_ENCODED_LEN], usize) {
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode(msg, &mut buf).unwrap();
        (buf, n)
    }

    #[test]
    fn constants_are_consistent() {
        assert_eq!(MAX_RAW_LEN, 852);
        assert_eq!(ACCUMULATOR_LEN, 856);
        assert_eq!(MAX_ENCODED_LEN, 858);
        assert_eq!(full_frame(MAX_OBJECTS).raw_len(), MAX_RAW_LEN);
        assert_eq!(full_frame(MAX_OBJECTS).encoded_len_max(), MAX_ENCODED_LEN);
    }

    #[test]
    fn round_trip_every_kind() {
        let messages = [
            full_frame(0),
            full_frame(1),
            full_frame(MAX_OBJECTS),
            Message::heartbeat(u32::MAX, u64::MAX),
            Message::select(3, 4, Selection::Auto),
            Message::select(5, 6, Selection::Track(0xDEAD_BEEF)),
        ];
        for msg in &messages {
            let (mut buf, n) = encode_vec(msg);
            assert_eq!(buf[0], 0);
            assert_eq!(buf[n - 1], 0);
            assert!(!buf[1..n - 1].contains(&0));
            assert_eq!(decode_chunk(&mut buf[1..n - 1]).as_ref(), Ok(msg));
        }
    }

    #[test]
    fn heartbeat_bytes_are_stable() {
        // Golden encoding of version 1: changing it breaks deployed firmware.
        let (buf, n) = encode_vec(&Message::heartbeat(1, 2));
        let raw = [1u8, 2, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        let mut chunk = buf;
        let m = cobs::decode_in_place(&mut chunk[1..n - 1]).unwrap();
        assert_eq!(m, 18);
        assert_eq!(&chunk[1..15], &raw);
        assert_eq!(&chunk[15..19], &crc32(&raw).to_le_bytes());
        assert_eq!(&buf[..n], GOLDEN_HEARTBEAT);
    }

    /// `Message::heartbeat(1, 2)` on the wire, cross-checked with Python's `zlib.crc32` and
    /// an independent COBS encoder.
    const GOLDEN_HEARTBEAT: &[u8] =
        &[0, 4, 1, 2, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1, 5, 232, 102, 104, 245, 0];

    #[test]
    fn overflow_flag_round_trips_and_is_never_silent() {
        let msg = Message::frame(1, 1, Frame::from_objects((0..40).map(object)));
        let Body::Frame(frame) = &msg.body else { unreachable!() };
        assert!(frame.overflow);
        assert_eq!(frame.objects.len(), MAX_OBJECTS);
        let (mut buf, n) = encode_vec(&msg);
        let back = decode_chunk(&mut buf[1..n - 1]).unwrap();
        assert_eq!(back, msg);

        let mut f = Frame::new();
        for i in 0..MAX_OBJECTS as u32 {
            f.push(object(i)).unwrap();
        }
        assert!(!f.overflow);
        assert_eq!(f.push(object(99)), Err(object(99)));
        assert!(f.overflow);
    }

    #[test]
    fn encode_rejects_short_buffer() {
        let msg = full_frame(3);
        let mut buf = [0u8; 40];
        assert_eq!(
            encode(&msg, &mut buf),
            Err(EncodeError::BufferTooSmall { needed: msg.encoded_len_max() })
        );
    }

    #[test]
    fn corrupted_bytes_fail_crc() {
        let msg = full_frame(4);
        let (buf, n) = encode_vec(&msg);
        for i in 1..n - 1 {
            for bit in 0..8 {
                let mut b = buf;
                b[i] ^= 1 << bit;
                if b[i] == 0 {
                    continue; // A new delimiter; covered by the accumulator tests.
                }
                assert!(decode_chunk(&mut b[1..n - 1]).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn semantic_errors() {
        fn raw_with_crc(data: &[u8]) -> ([u8; 64], usize) {
            let mut out = [0u8; 64];
            out[..data.len()].copy_from_slice(data);
            out[data.len()..data.len() + 4].copy_from_slice(&crc32(data).to_le_bytes());
            (out, data.len() + 4)
        }
        let header = |version: u8, kind: u8| {
            let mut h = [0u8; 14];
            h[0] = version;
            h[1] = kind;
            h
        };
        let (r, n) = raw_with_crc(&header(2, KIND_HEARTBEAT));
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::UnsupportedVersion(2)));
        let (r, n) = raw_with_crc(&header(1, 9));
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::UnknownKind(9)));

        let mut frame = [0u8; 16];
        frame[..14].copy_from_slice(&header(1, KIND_FRAME));
        frame[14] = 0x02;
        let (r, n) = raw_with_crc(&frame);
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::ReservedFlags(2)));
        frame[14] = 0;
        frame[15] = 33;
        let (r, n) = raw_with_crc(&frame);
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::TooManyObjects(33)));
        frame[15] = 1;
        let (r, n) = raw_with_crc(&frame);
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::Length));

        let mut sel = [0u8; 19];
        sel[..14].copy_from_slice(&header(1, KIND_SELECT));
        sel[14] = 7;
        let (r, n) = raw_with_crc(&sel);
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::BadSelection(7)));

        let mut hb = [0u8; 15];
        hb[..14].copy_from_slice(&header(1, KIND_HEARTBEAT));
        let (r, n) = raw_with_crc(&hb);
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::Length));

        assert_eq!(decode_raw(&[1, 2, 3]), Err(DecodeError::Truncated));
        let (mut r, n) = raw_with_crc(&header(1, KIND_HEARTBEAT));
        r[n - 1] ^= 0x80;
        assert_eq!(decode_raw(&r[..n]), Err(DecodeError::Crc));
    }

    #[test]
    fn nan_scores_pass_through() {
        let mut o = object(1);
        o.score = f32::NAN;
        o.bbox[2] = f32::INFINITY;
        let msg = Message::frame(1, 2, Frame::from_objects([o]));
        let (mut buf, n) = encode_vec(&msg);
        let back = decode_chunk(&mut buf[1..n - 1]).unwrap();
        let Body::Frame(f) = back.body else { unreachable!() };
        assert!(f.objects[0].score.is_nan());
        assert_eq!(f.objects[0].bbox[2], f32::INFINITY);
    }

    #[test]
    fn errors_display() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(DecodeError::Crc.to_string(), "CRC mismatch");
        assert_eq!(DecodeError::TooManyObjects(40).to_string(), "frame claims 40 objects (max 32)");
        assert_eq!(
            EncodeError::BufferTooSmall { needed: 9 }.to_string(),
            "encode buffer too small: 9 bytes needed"
        );
    }
}
