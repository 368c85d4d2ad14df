//! Wire format throughput: encoding and stream decoding of full 32-object frames.
//!
//! `cargo bench -p flsl-runtime --bench wire -- --measurement-time 2`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use flsl_runtime::wire::{
    ACCUMULATOR_LEN, Accumulator, FeedResult, Frame, MAX_ENCODED_LEN, MAX_OBJECTS, Message, Object,
    encode,
};
use std::hint::black_box;

/// Frames in the decode stream.
const FRAMES: usize = 64;

fn frame(seq: u32) -> Message {
    let objects = (0..MAX_OBJECTS as u32).map(|i| {
        let f = (i as f32 + seq as f32 * 0.01) / 40.0;
        Object {
            bbox: [f, f * 0.5, f + 0.05, f * 0.5 + 0.1],
            class: (i % 7) as u16,
            score: 1.0 - f,
            track_id: i + 1,
        }
    });
    Message::frame(seq, u64::from(seq) * 33_333, Frame::from_objects(objects))
}

fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; MAX_ENCODED_LEN];
    for seq in 0..FRAMES as u32 {
        let n = encode(&frame(seq), &mut buf).expect("MAX_ENCODED_LEN fits every message");
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn bench_wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");

    let msg = frame(1);
    let mut buf = [0u8; MAX_ENCODED_LEN];
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_frame_32", |b| {
        b.iter(|| encode(black_box(&msg), black_box(&mut buf)).expect("fits"))
    });

    let bytes = stream();
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("decode_stream_64x32", |b| {
        b.iter_batched_ref(
            Accumulator::<ACCUMULATOR_LEN>::new,
            |acc| {
                let mut input = black_box(bytes.as_slice());
                let mut frames = 0usize;
                loop {
                    match acc.feed(input) {
                        FeedResult::Consumed => break,
                        FeedResult::Message { message, remaining } => {
                            black_box(&message);
                            frames += 1;
                            input = remaining;
                        }
                        FeedResult::Error { remaining, .. } => input = remaining,
                    }
                }
                assert_eq!(frames, FRAMES);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
