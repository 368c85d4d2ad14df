//! Receiver throughput on the host: full 32-object frames (the worst case, 858 bytes each)
//! through `LinkReceiver` over an `embedded_io::Read` byte slice, 64 bytes per read, as on
//! the MCU.
//!
//! `cargo bench -p flsl-firmware --bench receiver -- --measurement-time 2`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flsl_firmware::link::LinkReceiver;
use flsl_firmware::wire::{Frame, MAX_ENCODED_LEN, MAX_OBJECTS, Message, Object, encode};
use std::hint::black_box;

/// Frames in the stream.
const FRAMES: usize = 256;

fn stream(objects: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_ENCODED_LEN];
    for seq in 0..FRAMES as u32 {
        let objs = (0..objects as u32).map(|i| {
            let f = (i as f32 + seq as f32 * 0.01) / 40.0;
            Object {
                bbox: [f, f * 0.5, f + 0.05, f * 0.5 + 0.1],
                class: (i % 7) as u16,
                score: 1.0 - f,
                track_id: i + 1,
            }
        });
        let msg = Message::frame(seq, u64::from(seq) * 33_333, Frame::from_objects(objs));
        let n = encode(&msg, &mut buf).expect("MAX_ENCODED_LEN fits every message");
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn receive_all(bytes: &[u8]) -> usize {
    let mut rx = LinkReceiver::new(bytes);
    let mut frames = 0;
    // The slice reports end of stream once drained.
    while let Ok(message) = rx.receive() {
        black_box(&message);
        frames += 1;
    }
    frames
}

fn bench_receiver(c: &mut Criterion) {
    let mut group = c.benchmark_group("receiver");
    for objects in [MAX_OBJECTS, 4] {
        let bytes = stream(objects);
        assert_eq!(receive_all(&bytes), FRAMES);
        group.throughput(Throughput::Elements(FRAMES as u64));
        group.bench_function(format!("frames_{objects}_objects"), |b| {
            b.iter(|| receive_all(black_box(&bytes)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_receiver);
criterion_main!(benches);
