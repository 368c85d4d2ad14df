//! The link over a real serial device: a pseudo-terminal pair (openpty through
//! `serialport::TTYPort::pair`). `LinkOutput` opens the slave side by path, as `flsl-onboard
//! --serial` does; a reader on the master side gets every wire frame, byte for byte. Then the
//! device vanishes (master closed): writes fail, frames are counted as lost, nothing panics;
//! once a device is back at the same path (a symlink, as udev gives `/dev/serial/by-id/...`),
//! the output reopens it within a second and frames flow again.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use flsl_runtime::onboard::output::{LinkOutput, LinkTarget};
use flsl_runtime::wire::{self, Body, Frame, MAX_ENCODED_LEN, Object};
use serialport::{SerialPort, TTYPort};

fn frame(i: u32) -> Frame {
    let objects = (0..(i % 5)).map(|k| Object {
        bbox: [0.01 * k as f32, 0.02 * i as f32 % 1.0, 0.5, 0.9],
        class: k as u16,
        score: 0.5 + 0.01 * k as f32,
        track_id: i * 10 + k,
    });
    Frame::from_objects(objects)
}

/// A pty pair whose slave is reachable at `link` (a symlink); returns the master.
fn pty_at(link: &Path) -> TTYPort {
    let (master, slave) = TTYPort::pair().expect("openpty");
    let name = slave.name().expect("the slave pty has a name");
    drop(slave); // LinkOutput opens it by path, as a real device.
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&name, link).unwrap();
    master
}

/// Reads from `master` until `n` complete frames (0x00-delimited) arrived or `timeout`.
fn read_frames(master: &mut TTYPort, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
    master.set_timeout(Duration::from_millis(50)).unwrap();
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |b: &[u8]| b.split(|&x| x == 0).filter(|c| !c.is_empty()).count();
    while complete(&bytes) < n && start.elapsed() < timeout {
        match master.read(&mut buf) {
            Ok(k) => bytes.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            // A master whose slave is not open (yet) reads EIO (the writer reopens it later).
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    bytes.split(|&x| x == 0).filter(|c| !c.is_empty()).map(<[u8]>::to_vec).collect()
}

/// Decodes a received chunk and checks that re-encoding it gives the same bytes.
fn decode_exact(chunk: &[u8]) -> wire::Message {
    let mut c = chunk.to_vec();
    let msg = wire::decode_chunk(&mut c).expect("a CRC-valid wire frame");
    let mut again = [0u8; MAX_ENCODED_LEN];
    let n = wire::encode(&msg, &mut again).unwrap();
    assert_eq!(
        &again[1..n - 1],
        chunk,
        "byte-exact: the chunk is the encoding of what it decodes to"
    );
    msg
}

#[test]
fn wire_frames_cross_a_pty_byte_exact_and_survive_the_device_vanishing() {
    let dir = std::env::temp_dir().join(format!("flsl-pty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("ttyFLSL");
    let mut master = pty_at(&link);
    let mut out =
        LinkOutput::open(LinkTarget::Serial { path: link.to_string_lossy().into(), baud: 921_600 })
            .unwrap();

    // 40 frames while a reader drains the master (a pty buffers only a few KiB).
    const N: u32 = 40;
    let reader = std::thread::spawn(move || {
        let chunks = read_frames(&mut master, N as usize, Duration::from_secs(20));
        (master, chunks)
    });
    for i in 0..N {
        out.send(frame(i)).unwrap();
    }
    let (master, chunks) = reader.join().unwrap();
    assert_eq!(chunks.len(), N as usize, "every frame arrived");
    for (i, c) in chunks.iter().enumerate() {
        let msg = decode_exact(c);
        assert_eq!(msg.seq, i as u32);
        match msg.body {
            Body::Frame(f) => assert_eq!(f.objects, frame(i as u32).objects, "frame {i}"),
            other => panic!("frame {i}: {other:?}"),
        }
    }
    assert_eq!((out.transport.sent, out.transport.lost), (u64::from(N), 0));
    let bytes: usize = chunks.iter().map(|c| c.len() + 2).sum();
    assert_eq!(
        out.transport.bytes, bytes as u64,
        "bytes counted = bytes received (with delimiters)"
    );

    // The device vanishes: the next writes fail, are counted as lost, and do not panic.
    drop(master);
    let _ = std::fs::remove_file(&link);
    for i in 0..3 {
        out.send(frame(N + i)).unwrap();
    }
    assert_eq!(out.transport.sent, u64::from(N));
    assert!(out.transport.lost >= 1, "the failed write is counted");

    // It comes back at the same path: within a second (plus a write), frames flow again.
    let mut master = pty_at(&link);
    let reader = std::thread::spawn(move || read_frames(&mut master, 1, Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = N + 3;
    while out.transport.sent == u64::from(N) && Instant::now() < deadline {
        out.send(frame(i)).unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(out.transport.sent, u64::from(N) + 1, "reopened after the device came back");
    let chunks = reader.join().unwrap();
    let msg = decode_exact(&chunks[0]);
    assert_eq!(msg.seq, i - 1, "sequence numbers went on counting through the outage");
    let _ = std::fs::remove_dir_all(&dir);
}

/// MAVLink over a serial device (`--mavlink serial:DEV:BAUD`): the byte stream through the
/// pty parses as CRC-valid MAVLink 2 messages with the rectangle of the locked track.
#[test]
fn mavlink_over_a_pty_parses_as_mavlink_2() {
    use flsl_runtime::detect::{FrameBox, FrameResult};
    use flsl_runtime::onboard::mavlink::{MavlinkConfig, MavlinkOutput};
    use mavlink::dialects::common::MavMessage;
    use mavlink::{MavlinkReader, MavlinkVersion};

    let dir = std::env::temp_dir().join(format!("flsl-pty-mav-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("ttyMAV");
    let mut master = pty_at(&link);
    let mut out =
        MavlinkOutput::open(&format!("serial:{}:57600", link.display()), MavlinkConfig::default())
            .unwrap();
    let t0 = Instant::now();
    let r = FrameResult {
        size: [400, 300],
        tracks: vec![FrameBox {
            bbox: [100.0, 75.0, 200.0, 150.0],
            class: 0,
            score: 0.8,
            track_id: 5,
        }],
        ..FrameResult::default()
    };
    for i in 0..5u64 {
        out.on_frame(&r, t0 + Duration::from_millis(100 * i)).unwrap();
    }
    let sent = out.transport.sent;
    assert_eq!(sent, 6, "one heartbeat and five tracking statuses");
    master.set_timeout(Duration::from_millis(200)).unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while bytes.len() < out.transport.bytes as usize && Instant::now() < deadline {
        if let Ok(k) = master.read(&mut buf) {
            bytes.extend_from_slice(&buf[..k]);
        }
    }
    assert_eq!(bytes.len() as u64, out.transport.bytes);
    let mut reader = MavlinkReader::new(&bytes[..]);
    let mut rects = Vec::new();
    for _ in 0..sent {
        let (h, m) = reader
            .read_message::<MavMessage>(MavlinkVersion::V2)
            .expect("a CRC-valid MAVLink 2 message");
        assert_eq!((h.system_id, h.component_id), (1, 100));
        if let MavMessage::CAMERA_TRACKING_IMAGE_STATUS(s) = m {
            rects.push([s.rec_top_x, s.rec_top_y, s.rec_bottom_x, s.rec_bottom_y]);
        }
    }
    assert_eq!(rects, vec![[0.25, 0.25, 0.5, 0.5]; 5]);
    let _ = std::fs::remove_dir_all(&dir);
}
