//! Link receiver tests: byte streams fed as `&[u8]` (embedded-io implements `Read` for
//! slices) and as arbitrary chunks; counters; the `Follower` main-loop glue with mocks.

mod common;

use core::convert::Infallible;
use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as Pin};
use embedded_hal_mock::eh1::pwm::{Mock as PwmMock, Transaction as Pwm};
use embedded_io::{ErrorKind, ErrorType, Read, ReadReady};
use flsl_firmware::control::LinkState;
use flsl_firmware::link::{LinkDecoder, LinkStats};
use flsl_firmware::wire::{Body, DecodeError, Frame, Message, Object, Selection, decode_chunk};
use flsl_firmware::{Controller, ControllerConfig, Error, Follower, LinkReceiver};

use common::{ChunkReader, encoded, push_encoded};

fn object(i: u32) -> Object {
    let f = i as f32 / 40.0;
    Object {
        bbox: [f, f, f + 0.1, f + 0.1],
        class: (i % 3) as u16,
        score: 0.5 + f / 4.0,
        track_id: i,
    }
}

fn frame(seq: u32, n: u32) -> Message {
    Message::frame(seq, u64::from(seq) * 33_333, Frame::from_objects((0..n).map(object)))
}

/// Receives until end of stream.
fn receive_all<R: Read>(rx: &mut LinkReceiver<R>) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        match rx.receive() {
            Ok(m) => out.push(m),
            Err(Error::EndOfStream) => return out,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
}

/// `msg` encoded, with one bit flipped so that the chunk fails its CRC (not its COBS).
fn crc_corrupted(msg: &Message) -> Vec<u8> {
    let good = encoded(msg);
    for i in (1..good.len() - 1).rev() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        if bad[i] != 0
            && decode_chunk(&mut bad[1..good.len() - 1].to_vec()) == Err(DecodeError::Crc)
        {
            return bad;
        }
    }
    panic!("no single-bit CRC corruption found");
}

#[test]
fn slice_stream_round_trips_every_kind() {
    let sent = [
        frame(0, 3),
        Message::heartbeat(1, 40_000),
        Message::select(2, 50_000, Selection::Track(5)),
        frame(3, 32),
    ];
    let mut bytes = Vec::new();
    for m in &sent {
        push_encoded(&mut bytes, m);
    }
    let mut rx = LinkReceiver::new(bytes.as_slice());
    assert_eq!(receive_all(&mut rx), sent);
    let s = *rx.stats();
    assert_eq!(
        s,
        LinkStats {
            bytes: bytes.len() as u32,
            frames: 2,
            heartbeats: 1,
            selects: 1,
            ..LinkStats::default()
        }
    );
}

#[test]
fn garbage_crc_errors_and_overflows_are_counted_and_survived() {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&[0x13; 2_000]); // longer than the accumulator: overflow
    push_encoded(&mut bytes, &frame(0, 2));
    bytes.extend_from_slice(&crc_corrupted(&frame(1, 4))); // CRC error
    bytes.extend_from_slice(&[0x42, 0x99, 0x07]); // malformed garbage
    push_encoded(&mut bytes, &frame(2, 1));
    push_encoded(&mut bytes, &frame(5, 0)); // seq 3 and 4 lost

    let mut rx = LinkReceiver::new(bytes.as_slice());
    let got: Vec<u32> = receive_all(&mut rx).iter().map(|m| m.seq).collect();
    assert_eq!(got, [0, 2, 5]);
    let s = rx.stats();
    assert_eq!((s.frames, s.overflows, s.crc_errors, s.malformed, s.resyncs), (3, 1, 1, 1, 3));
    assert_eq!(s.lost, 3, "seq 1 (corrupted), 3 and 4");
    assert_eq!(s.bytes, bytes.len() as u32);
}

#[test]
fn any_chunking_gives_the_same_messages() {
    let sent: Vec<Message> = (0..6).map(|i| frame(i, i * 5)).collect();
    let mut bytes = Vec::new();
    for m in &sent {
        push_encoded(&mut bytes, m);
    }
    for size in [1, 2, 3, 7, 63, 64, 65, 500, bytes.len()] {
        let chunks: Vec<Vec<u8>> = bytes.chunks(size).map(<[u8]>::to_vec).collect();
        let mut rx = LinkReceiver::new(ChunkReader::new(&chunks));
        assert_eq!(receive_all(&mut rx), sent, "chunk size {size}");
    }
}

#[test]
fn decoder_feeds_from_an_interrupt_buffer() {
    let bytes = [encoded(&frame(7, 2)), encoded(&Message::heartbeat(8, 0))].concat();
    let mut dec = LinkDecoder::new();
    let mut input = bytes.as_slice();
    let mut seqs = Vec::new();
    loop {
        let (m, rest) = dec.feed(input);
        match m {
            Some(m) => seqs.push(m.seq),
            None => break,
        }
        input = rest;
    }
    assert_eq!(seqs, [7, 8]);
    assert_eq!(dec.stats().heartbeats, 1);
}

/// A serial port whose reads fail, or that has no byte ready.
struct FlakyPort {
    ready: bool,
}

#[derive(Debug, PartialEq)]
struct PortError;

impl core::fmt::Display for PortError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("UART overrun")
    }
}

impl core::error::Error for PortError {}

impl embedded_io::Error for PortError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Other
    }
}

impl ErrorType for FlakyPort {
    type Error = PortError;
}

impl Read for FlakyPort {
    fn read(&mut self, _buf: &mut [u8]) -> Result<usize, PortError> {
        Err(PortError)
    }
}

impl ReadReady for FlakyPort {
    fn read_ready(&mut self) -> Result<bool, PortError> {
        Ok(self.ready)
    }
}

#[test]
fn read_errors_propagate_and_poll_ready_never_blocks() {
    let mut rx = LinkReceiver::new(FlakyPort { ready: false });
    assert_eq!(rx.poll_ready().map(|m| m.is_some()), Ok(false));
    let mut rx = LinkReceiver::new(FlakyPort { ready: true });
    assert_eq!(rx.poll_ready().map(|m| m.is_some()), Err(Error::Read(PortError)));
    assert_eq!(rx.poll().map(|m| m.is_some()), Err(Error::Read(PortError)));
    assert_eq!(Error::<PortError>::Read(PortError).to_string(), "serial read failed: UART overrun");

    let mut empty = LinkReceiver::new(&[0u8; 0][..]);
    assert_eq!(empty.receive().map(|m| m.seq), Err(Error::<Infallible>::EndOfStream));
}

#[test]
fn follower_turns_bytes_into_servo_commands() {
    // One frame with track 9 at x = 0.75 (+9 deg pan, 1550 us), then silence.
    let target = Object { bbox: [0.7, 0.45, 0.8, 0.55], class: 1, score: 0.9, track_id: 9 };
    let bytes = encoded(&Message::frame(0, 0, Frame::from_objects([target])));
    let chunks = vec![bytes];
    let mut cfg = ControllerConfig::new();
    cfg.pan.kd_deg_s = 0.0;
    cfg.tilt.kd_deg_s = 0.0;
    cfg.alert_class = Some(1);
    cfg.link_timeout_ms = 200;

    let pan = PwmMock::new(&[
        Pwm::max_duty_cycle(20_000),
        Pwm::set_duty_cycle(1500),
        Pwm::set_duty_cycle(1550),
        Pwm::set_duty_cycle(1500),
    ]);
    let tilt = PwmMock::new(&[Pwm::max_duty_cycle(20_000), Pwm::set_duty_cycle(1500)]);
    let alert = PinMock::new(&[Pin::set(State::Low), Pin::set(State::High), Pin::set(State::Low)]);
    let controller = Controller::new(cfg, pan, tilt, alert).unwrap();

    let mut follower = Follower::new(LinkReceiver::new(ChunkReader::new(&chunks)), controller);
    let s = follower.step(0).unwrap();
    assert_eq!((s.link, s.target, s.alert), (LinkState::Up, Some(9), true));
    let s = follower.step(100).unwrap();
    assert_eq!(s.pan_duty, 1550);
    assert_eq!(follower.stats().frames, 1);
    // 200 ms without messages: fail-safe.
    let s = follower.step(201).unwrap();
    assert_eq!((s.link, s.alert), (LinkState::Lost, false));
    let s = follower.step(400).unwrap();
    assert_eq!(s.pan_duty, 1500);
    assert!(matches!(follower.controller().status().link, LinkState::Lost));

    let (_, controller) = follower.release();
    let (mut pan, mut tilt, mut alert) = controller.release();
    pan.done();
    tilt.done();
    alert.done();
}

#[test]
fn frames_flagged_overflow_are_counted() {
    let msg = Message::frame(0, 0, Frame::from_objects((0..50).map(object)));
    let Body::Frame(f) = &msg.body else { unreachable!() };
    assert!(f.overflow);
    let bytes = encoded(&msg);
    let mut rx = LinkReceiver::new(bytes.as_slice());
    let got = receive_all(&mut rx);
    assert_eq!(got, [msg]);
    assert_eq!(rx.stats().object_overflows, 1);
}
