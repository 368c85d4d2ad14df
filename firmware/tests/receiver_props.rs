//! Property tests of the link receiver (issue 7):
//!
//! - random bytes, in random chunks, never make it panic (at least 100 000 random chunks
//!   in total, counted and asserted);
//! - valid messages interleaved with random garbage are all recovered, in order;
//! - corrupting bytes of a valid stream loses at most the messages it touched.
//!
//! The runs use an explicit `TestRunner` so the total count can be asserted after all
//! cases ran; `PROPTEST_CASES` does not change them.

mod common;

use common::{ChunkReader, push_encoded};
use flsl_firmware::Error;
use flsl_firmware::link::LinkReceiver;
use flsl_firmware::wire::{Frame, MAX_OBJECTS, Message, Object, Selection};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::cell::Cell;

/// Cases of the random-bytes property.
const RANDOM_CASES: u32 = 2_000;
/// Chunks per case: 2 000 x 64 = 128 000 random inputs.
const CHUNKS_PER_CASE: usize = 64;
/// The floor for random inputs.
const MIN_RANDOM_INPUTS: usize = 100_000;

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Bytes biased towards the delimiter and COBS code bytes, so chunks are short enough to
/// reach the COBS, CRC and parsing stages instead of only overflowing.
fn wire_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        12 => any::<u8>(),
        3 => Just(0u8),
        1 => 1u8..16,
    ]
}

/// Drains the receiver until end of stream.
fn receive_all(rx: &mut LinkReceiver<ChunkReader<'_>>) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        match rx.receive() {
            Ok(m) => out.push(m),
            Err(Error::EndOfStream) => return out,
            Err(Error::Read(never)) => match never {},
            Err(Error::Output(e)) => panic!("receiver never writes outputs: {e}"),
        }
    }
}

#[test]
fn random_chunks_never_panic() {
    let chunks = prop::collection::vec(prop::collection::vec(wire_byte(), 0..96), CHUNKS_PER_CASE);
    // `TestRunner::run` takes an `Fn`, hence the cells.
    let inputs = Cell::new(0usize);
    let bytes = Cell::new(0usize);
    let resyncs = Cell::new(0u64);
    runner(RANDOM_CASES)
        .run(&chunks, |chunks| {
            let mut rx = LinkReceiver::new(ChunkReader::new(&chunks));
            receive_all(&mut rx);
            let stats = *rx.stats();
            prop_assert_eq!(stats.bytes as usize, chunks.iter().map(Vec::len).sum::<usize>());
            prop_assert_eq!(stats.resyncs, stats.crc_errors + stats.overflows + stats.malformed);
            resyncs.set(resyncs.get() + u64::from(stats.resyncs));
            bytes.set(bytes.get() + stats.bytes as usize);
            // Each non-empty chunk is one `read` result handed to the receiver.
            inputs.set(inputs.get() + rx.release().chunks_read);
            Ok(())
        })
        .unwrap();
    let (inputs, bytes, resyncs) = (inputs.get(), bytes.get(), resyncs.get());
    println!(
        "random_chunks_never_panic: {inputs} random chunks ({bytes} bytes, {resyncs} resyncs) without a panic"
    );
    assert!(inputs >= MIN_RANDOM_INPUTS, "only {inputs} random inputs");
}

fn finite_object() -> impl Strategy<Value = Object> {
    (prop::array::uniform4(-0.5f32..1.5), any::<u16>(), 0f32..1.0, any::<u32>())
        .prop_map(|(bbox, class, score, track_id)| Object { bbox, class, score, track_id })
}

/// A message body; `seq` and `timestamp_us` are set by the caller.
fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        4 => (prop::collection::vec(finite_object(), 0..=MAX_OBJECTS + 4))
            .prop_map(|objects| Message::frame(0, 0, Frame::from_objects(objects))),
        1 => Just(Message::heartbeat(0, 0)),
        1 => prop::option::of(any::<u32>()).prop_map(|id| {
            Message::select(0, 0, id.map_or(Selection::Auto, Selection::Track))
        }),
    ]
}

/// Splits `bytes` at the given cut lengths (cycled), as a UART driver might.
fn chop(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &cut in cuts.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at(cut.clamp(1, rest.len()));
        out.push(head.to_vec());
        rest = tail;
    }
    out
}

#[test]
fn messages_between_garbage_are_all_recovered() {
    let strategy = (
        prop::collection::vec((prop::collection::vec(wire_byte(), 0..300), any_message()), 1..10),
        prop::collection::vec(wire_byte(), 0..300),
        prop::collection::vec(1usize..200, 1..16),
    );
    let recovered = Cell::new(0usize);
    runner(512)
        .run(&strategy, |(pairs, tail, cuts)| {
            let mut stream = Vec::new();
            let mut sent = Vec::new();
            for (seq, (garbage, mut msg)) in pairs.into_iter().enumerate() {
                stream.extend_from_slice(&garbage);
                msg.seq = seq as u32;
                msg.timestamp_us = seq as u64 * 33_333;
                push_encoded(&mut stream, &msg);
                sent.push(msg);
            }
            stream.extend_from_slice(&tail);
            let chunks = chop(&stream, &cuts);
            let mut rx = LinkReceiver::new(ChunkReader::new(&chunks));
            let got = receive_all(&mut rx);
            prop_assert_eq!(&got, &sent);
            prop_assert_eq!(rx.stats().lost, 0);
            recovered.set(recovered.get() + got.len());
            Ok(())
        })
        .unwrap();
    println!("messages_between_garbage_are_all_recovered: {} messages recovered", recovered.get());
}

#[test]
fn corruption_only_loses_the_messages_it_touches() {
    let strategy = (
        prop::collection::vec(any_message(), 2..8),
        prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        prop::collection::vec(1usize..200, 1..16),
    );
    runner(512)
        .run(&strategy, |(msgs, flips, cuts)| {
            let mut stream = Vec::new();
            let mut spans = Vec::new();
            let mut sent = Vec::new();
            for (seq, mut msg) in msgs.into_iter().enumerate() {
                msg.seq = seq as u32;
                let start = stream.len();
                push_encoded(&mut stream, &msg);
                spans.push(start..stream.len());
                sent.push(msg);
            }
            let mut hit = vec![false; sent.len()];
            for (index, xor) in &flips {
                let at = index.index(stream.len());
                stream[at] ^= xor;
                for (i, span) in spans.iter().enumerate() {
                    if span.contains(&at) {
                        hit[i] = true;
                    }
                }
            }
            let chunks = chop(&stream, &cuts);
            let mut rx = LinkReceiver::new(ChunkReader::new(&chunks));
            let got = receive_all(&mut rx);
            // Every untouched message arrives; nothing arrives that was not sent.
            for (msg, &touched) in sent.iter().zip(&hit) {
                if !touched {
                    prop_assert!(got.contains(msg), "lost untouched message seq {}", msg.seq);
                }
            }
            for msg in &got {
                prop_assert!(sent.contains(msg), "spurious message {:?}", msg);
            }
            Ok(())
        })
        .unwrap();
}
