//! The board image's input stream and its host model (issue 18).
//!
//! [`scenario`] writes a recorded link: heartbeats, detection frames of objects moving across
//! the image, a target-selection command, a flipped byte (CRC error), garbage, a truncated
//! frame, a dropped frame, a burst of line noise without delimiters (overflow), and a 900 ms
//! outage that trips the 500 ms fail-safe before the link recovers. The bytes are plain wire
//! frames (`flsl_runtime::wire::encode`) with `0x00` idle bytes for silence, so a recording
//! of the real onboard binary can take their place.
//!
//! The model is `firmware/board/src/harness.rs` itself, included below: the image runs the
//! same replay loop on the board, so the two reports must be equal line for line
//! (`scripts/firmware-qemu.sh` checks that in qemu).
//!
//! `FLSL_BOARD_OUT=DIR cargo test --release -p flsl-firmware --test board_stream` writes
//! `DIR/stream.bin` and `DIR/expected.txt` (the model's report); with
//! `FLSL_BOARD_STREAM=FILE` the stream is read from FILE instead of generated.

#[allow(dead_code)]
#[path = "../board/src/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::convert::Infallible;

use embedded_io::{ErrorType, Read};
use flsl_firmware::wire::{Body, Frame, MAX_ENCODED_LEN, Message, Object, Selection, encode};
use harness::{End, bytes_due};

/// The sender: appends encoded messages at given link times, idle bytes in between.
struct Link {
    bytes: Vec<u8>,
    seq: u32,
    /// Sequence numbers sent but never decodable.
    undelivered: u32,
}

impl Link {
    fn new() -> Self {
        Self { bytes: Vec::new(), seq: 0, undelivered: 0 }
    }

    /// Idle line (`0x00`) up to the byte time of `t_ms`; nothing if the link is already past it.
    fn idle_until(&mut self, t_ms: u32) {
        let due = usize::try_from(bytes_due(t_ms)).unwrap();
        if self.bytes.len() < due {
            self.bytes.resize(due, 0);
        }
    }

    fn encoded(&mut self, t_ms: u32, body: Body) -> Vec<u8> {
        let message = Message { seq: self.seq, timestamp_us: u64::from(t_ms) * 1_000, body };
        self.seq += 1;
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode(&message, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn send(&mut self, t_ms: u32, body: Body) {
        self.idle_until(t_ms);
        let bytes = self.encoded(t_ms, body);
        self.bytes.extend_from_slice(&bytes);
    }

    /// Sends the message with `corrupt` applied to its encoding; it will not be decoded.
    fn send_corrupted(&mut self, t_ms: u32, body: Body, corrupt: impl FnOnce(&mut Vec<u8>)) {
        self.idle_until(t_ms);
        let mut bytes = self.encoded(t_ms, body);
        corrupt(&mut bytes);
        self.bytes.extend_from_slice(&bytes);
        self.undelivered += 1;
    }

    /// A message that never reaches the line.
    fn drop_message(&mut self, t_ms: u32, body: Body) {
        let _ = self.encoded(t_ms, body);
        self.undelivered += 1;
    }

    fn raw(&mut self, t_ms: u32, bytes: &[u8]) {
        self.idle_until(t_ms);
        self.bytes.extend_from_slice(bytes);
    }
}

/// xorshift32: reproducible garbage without a dependency.
struct Noise(u32);

impl Noise {
    fn byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 24) as u8
    }
}

fn object(cx: f32, cy: f32, class: u16, score: f32, track_id: u32) -> Object {
    let (w, h) = (0.08, 0.12);
    Object {
        bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
        class,
        score,
        track_id,
    }
}

/// Positions of the COBS code bytes of an encoded message (`0x00 cobs 0x00`).
fn cobs_code_positions(encoded: &[u8]) -> Vec<usize> {
    let mut codes = Vec::new();
    let mut i = 1;
    while i + 1 < encoded.len() {
        codes.push(i);
        i += usize::from(encoded[i]);
    }
    codes
}

/// Flips a payload bit in the middle of an encoded message (not a COBS code byte), so the
/// chunk still decodes as COBS and fails its CRC.
fn flip_payload_bit(bytes: &mut [u8]) {
    let codes = cobs_code_positions(bytes);
    let at = (bytes.len() / 2..bytes.len() - 1).find(|i| !codes.contains(i)).unwrap();
    bytes[at] ^= if bytes[at] == 0x01 { 0x02 } else { 0x01 };
}

/// Times of the scenario (virtual ms of the byte clock).
const FIRST_HEARTBEAT_MS: u32 = 300;
const FRAME_PERIOD_MS: u32 = 40;
const FIRST_FRAME_MS: u32 = 340;
const FRAMES: u32 = 50;
const SELECT_MS: u32 = 1_520;
const OUTAGE_FROM_MS: u32 = FIRST_FRAME_MS + (FRAMES - 1) * FRAME_PERIOD_MS;
const RESUME_MS: u32 = OUTAGE_FROM_MS + 900;
/// Messages the sender numbered during the outage (none reached the line).
const OUTAGE_MESSAGES: u32 = 22;
const RESUMED_FRAMES: u32 = 15;
const END_MS: u32 = RESUME_MS + 40 + RESUMED_FRAMES * FRAME_PERIOD_MS + 200;

/// Field of view of the gimbal camera, degrees (the controller's defaults are tuned for it).
const FOV_DEG: (f32, f32) = (60.0, 45.0);

/// Where the gimbal points (pan, tilt degrees) once the firmware has taken `stream`: the
/// model's last report line.
fn gimbal_after(stream: &[u8]) -> (f32, f32) {
    let (report, _) = model(stream);
    let lines = parse(&report);
    let last = lines.last().unwrap();
    (last.num("pan_deg") as f32, last.num("tilt_deg") as f32)
}

/// An object at world direction (`pan`, `tilt`) degrees as the gimbal camera pointing at
/// `gimbal` sees it (x to the right, y down, tilt positive up); `None` out of view.
fn seen(
    world: (f32, f32),
    gimbal: (f32, f32),
    class: u16,
    score: f32,
    track_id: u32,
) -> Option<Object> {
    let cx = 0.5 + (world.0 - gimbal.0) / FOV_DEG.0;
    let cy = 0.5 - (world.1 - gimbal.1) / FOV_DEG.1;
    ((0.0..1.0).contains(&cx) && (0.0..1.0).contains(&cy))
        .then(|| object(cx, cy, class, score, track_id))
}

/// The recorded stream and the number of messages that can never be decoded.
///
/// The camera rides on the gimbal, so what it sees depends on where the firmware pointed it:
/// each frame is made from the model's gimbal angles at its capture time (closed loop).
fn scenario() -> (Vec<u8>, u32) {
    let mut link = Link::new();
    let mut noise = Noise(0x2545_F491);
    link.send(FIRST_HEARTBEAT_MS, Body::Heartbeat);

    let mut selected = false;
    for k in 0..FRAMES {
        let t = FIRST_FRAME_MS + k * FRAME_PERIOD_MS;
        if !selected && t > SELECT_MS {
            // The operator picks track 7 while the higher-scoring track 3 is in view.
            link.send(SELECT_MS, Body::Select(Selection::Track(7)));
            selected = true;
        }
        link.idle_until(t);
        let gimbal = gimbal_after(&link.bytes);
        let u = k as f32 / (FRAMES - 1) as f32;
        // Track 7 (class 1: raises the alert) crosses from left to right, rising; its score
        // dips below the alert threshold (0.5) but stays above min_score (0.3).
        let score7 = if (14..=17).contains(&k) { 0.45 } else { 0.8 };
        let mut objects: Vec<Object> = [
            seen((-25.0 + 50.0 * u, -8.0 + 14.0 * u), gimbal, 1, score7, 7),
            // Below min_score: never followed.
            seen((-10.0, -15.0), gimbal, 0, 0.2, 12),
        ]
        .into_iter()
        .flatten()
        .collect();
        // Track 3 (class 0) scores higher for a while: auto selection switches to it.
        if (20..=37).contains(&k) {
            objects.extend(seen((-5.0, 6.0), gimbal, 0, 0.92, 3));
        }
        let body = Body::Frame(Frame::from_objects(objects));
        match k {
            8 => link.send_corrupted(t, body, |bytes| flip_payload_bit(bytes)),
            11 => {
                let garbage: Vec<u8> =
                    (0..37).map(|i| if i == 18 { 0 } else { noise.byte() | 1 }).collect();
                link.raw(t - 10, &garbage);
                link.send(t, body);
            }
            24 => link.send_corrupted(t, body, |bytes| bytes.truncate(30)),
            27 => link.drop_message(t, body),
            33 => {
                // Line noise longer than any chunk, without delimiters: an overflow.
                let burst: Vec<u8> = (0..1_000).map(|_| noise.byte() | 0x80).collect();
                link.raw(t - 90, &burst);
                link.send(t, body);
            }
            _ => link.send(t, body),
        }
    }

    // Outage: the link goes silent (the sender keeps numbering what it tries to send).
    for _ in 0..OUTAGE_MESSAGES {
        link.drop_message(OUTAGE_FROM_MS, Body::Heartbeat);
    }
    link.send(RESUME_MS, Body::Heartbeat);
    for k in 0..RESUMED_FRAMES {
        let t = RESUME_MS + 40 + k * FRAME_PERIOD_MS;
        link.idle_until(t);
        let gimbal = gimbal_after(&link.bytes);
        let objects = seen((20.0 - 0.5 * k as f32, 5.0), gimbal, 1, 0.85, 7);
        link.send(t, Body::Frame(Frame::from_objects(objects)));
    }
    link.idle_until(END_MS);
    (link.bytes, link.undelivered)
}

/// Serves a byte slice in reads of the given sizes (cycled), as a UART delivers whatever
/// arrived.
struct Chunked<'a> {
    bytes: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl ErrorType for Chunked<'_> {
    type Error = Infallible;
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// The model's report of `stream`.
fn model(stream: &[u8]) -> (String, harness::Outcome) {
    let mut report = String::new();
    let outcome = harness::run(stream, &mut report);
    (report, outcome)
}

/// One report line: time, why, and its `key=value` fields.
struct Line {
    t: u32,
    why: String,
    fields: HashMap<String, String>,
}

impl Line {
    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map_or("", String::as_str)
    }

    fn num(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap_or(f64::NAN)
    }

    fn int(&self, key: &str) -> u64 {
        self.get(key).parse().unwrap()
    }
}

fn parse(report: &str) -> Vec<Line> {
    report
        .lines()
        .map(|line| {
            let mut words = line.split(' ');
            let t = words.next().unwrap().strip_prefix("t=").unwrap().parse().unwrap();
            let why = words.next().unwrap().to_string();
            let fields = words
                .map(|w| {
                    let (k, v) = w.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            Line { t, why, fields }
        })
        .collect()
}

#[test]
fn replay_follows_fails_safe_and_recovers() {
    let (stream, undelivered) = scenario();
    let (report, outcome) = model(&stream);
    let lines = parse(&report);
    let last = lines.last().unwrap();

    assert_eq!(outcome.end, End::Eof, "{report}");
    assert_eq!(outcome.bytes, stream.len() as u64);
    assert_eq!(last.why, "end:eof");
    assert_eq!(last.int("rx"), stream.len() as u64, "every byte decoded");
    // Every message the sender put on the line whole was decoded.
    assert_eq!(last.int("frames"), u64::from(FRAMES + RESUMED_FRAMES - 3));
    assert_eq!(last.int("hb"), 2);
    assert_eq!(last.int("selects"), 1);
    assert_eq!(last.int("lost"), u64::from(undelivered));
    assert!(last.int("crc") >= 1, "{report}");
    assert!(last.int("overflows") >= 1, "{report}");
    assert!(last.int("malformed") >= 1, "{report}");

    let at = |t: u32| lines.iter().rfind(|l| l.t <= t).unwrap();
    let first = |pred: &dyn Fn(&Line) -> bool| lines.iter().find(|l| pred(l)).map(|l| l.t);

    // Waiting until the first heartbeat, then up.
    assert_eq!(at(FIRST_HEARTBEAT_MS - 1).get("link"), "waiting");
    let up = first(&|l| l.get("link") == "up").unwrap();
    assert!((FIRST_HEARTBEAT_MS..FIRST_HEARTBEAT_MS + 10).contains(&up), "{up}");

    // Follows track 7 and raises the alert (class 1): the gimbal first turns left and down
    // to it (it starts at -25, -8 degrees), then pans right and tilts up with it, and ends
    // within a few degrees of it (25, 6).
    let t7 = first(&|l| l.get("target") == "7").unwrap();
    assert_eq!(at(t7).get("alert"), "1");
    let (early, late) = (at(600), at(OUTAGE_FROM_MS));
    assert!(early.num("pan_deg") < -10.0 && early.num("tilt_deg") < -3.0, "{report}");
    assert!(early.num("pan") < 1_450.0 && early.num("tilt") < 1_500.0, "{report}");
    assert!((late.num("pan_deg") - 25.0).abs() < 5.0, "{report}");
    assert!(late.num("tilt_deg") > 3.0 && late.num("pan") > 1_600.0, "{report}");
    // The score dip drops the alert, then it comes back.
    let dip = FIRST_FRAME_MS + 15 * FRAME_PERIOD_MS;
    assert_eq!(at(dip).get("alert"), "0", "{report}");
    assert_eq!(at(dip + 4 * FRAME_PERIOD_MS).get("alert"), "1", "{report}");

    // Auto selection switches to the higher-scoring track 3, the command brings back 7.
    let t3 = first(&|l| l.get("target") == "3").unwrap();
    assert!(t3 > t7 && t3 < SELECT_MS, "{t3}");
    let sel = first(&|l| l.get("sel") == "track:7").unwrap();
    assert!((SELECT_MS..SELECT_MS + 10).contains(&sel), "{sel}");
    assert_eq!(at(SELECT_MS + 2 * FRAME_PERIOD_MS).get("target"), "7");

    // Outage: the fail-safe engages 500 ms after the last message, centres and drops the alert.
    let lost = first(&|l| l.get("link") == "lost").unwrap();
    assert!((OUTAGE_FROM_MS + 500..OUTAGE_FROM_MS + 520).contains(&lost), "{lost}");
    let l = at(lost);
    assert_eq!((l.get("alert"), l.get("target")), ("0", "-"));
    let centred = at(RESUME_MS - 1);
    assert_eq!((centred.int("pan"), centred.int("tilt")), (1_500, 1_500));
    assert_eq!(centred.get("link"), "lost");

    // Recovery: up again, following track 7 (the selection survived), alert back on.
    let back = at(RESUME_MS + 100);
    assert_eq!((back.get("link"), back.get("target"), back.get("alert")), ("up", "7", "1"));
    assert!(at(END_MS).num("pan_deg") > 5.0, "{report}");
}

#[test]
fn replay_is_independent_of_read_chunking() {
    // The board's UART hands over whatever arrived; the report must not depend on it.
    let (stream, _) = scenario();
    let (whole, _) = model(&stream);
    for sizes in [vec![1], vec![3, 64, 1, 17, 200], vec![usize::MAX]] {
        let mut report = String::new();
        harness::run(Chunked { bytes: &stream, sizes: sizes.clone(), next: 0 }, &mut report);
        assert_eq!(report, whole, "chunk sizes {sizes:?}");
    }
}

#[test]
fn replay_survives_random_bytes() {
    let mut noise = Noise(7);
    let stream: Vec<u8> = (0..20_000).map(|_| noise.byte()).collect();
    let (report, outcome) = model(&stream);
    assert_eq!(outcome.end, End::Eof);
    assert_eq!(outcome.bytes, 20_000);
    assert!(report.lines().last().unwrap().starts_with("t=1737 end:eof"), "{report}");
}

/// Writes the stream and the model's report for `scripts/firmware-qemu.sh`.
#[test]
fn board_files() {
    let Some(dir) = std::env::var_os("FLSL_BOARD_OUT") else {
        eprintln!("FLSL_BOARD_OUT not set: no files written");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stream = match std::env::var_os("FLSL_BOARD_STREAM") {
        Some(path) => std::fs::read(path).unwrap(),
        None => scenario().0,
    };
    let (report, _) = model(&stream);
    std::fs::write(dir.join("stream.bin"), &stream).unwrap();
    std::fs::write(dir.join("expected.txt"), &report).unwrap();
    eprintln!(
        "wrote {} ({} bytes) and {} ({} lines)",
        dir.join("stream.bin").display(),
        stream.len(),
        dir.join("expected.txt").display(),
        report.lines().count()
    );
}
