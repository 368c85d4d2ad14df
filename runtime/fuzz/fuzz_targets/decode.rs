//! Fuzzes the link wire decoder with arbitrary bytes.
//!
//! Checks: no panic; the stream decoder gives the same results whether the input arrives
//! at once or byte by byte; every decoded message re-encodes to a chunk that decodes to
//! the same bytes again (so the decoder accepts nothing the encoder cannot produce).
#![no_main]

use flsl_runtime::wire::{
    Accumulator, DecodeError, FeedResult, FrameAccumulator, MAX_ENCODED_LEN, Message, decode_chunk,
    encode,
};
use libfuzzer_sys::fuzz_target;

/// Outcome of one chunk, comparable without float equality (NaN payloads).
#[derive(Debug, PartialEq)]
enum Outcome {
    Message([u8; MAX_ENCODED_LEN], usize),
    Error(DecodeError),
}

fn outcome(r: Result<Message, DecodeError>) -> Outcome {
    match r {
        Ok(m) => {
            let mut buf = [0u8; MAX_ENCODED_LEN];
            let n = encode(&m, &mut buf).expect("MAX_ENCODED_LEN fits every message");
            // Round trip: the re-encoded chunk decodes to the same encoding.
            let again =
                decode_chunk(&mut buf.clone()[1..n - 1]).expect("re-encoded message decodes");
            let mut buf2 = [0u8; MAX_ENCODED_LEN];
            let n2 = encode(&again, &mut buf2).expect("fits");
            assert_eq!(buf[..n], buf2[..n2]);
            Outcome::Message(buf, n)
        }
        Err(e) => Outcome::Error(e),
    }
}

fn feed_all<const N: usize>(acc: &mut Accumulator<N>, mut input: &[u8], out: &mut Vec<Outcome>) {
    loop {
        match acc.feed(input) {
            FeedResult::Consumed => return,
            FeedResult::Message { message, remaining } => {
                out.push(outcome(Ok(message)));
                input = remaining;
            }
            FeedResult::Error { error, remaining } => {
                out.push(outcome(Err(error)));
                input = remaining;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut whole = Vec::new();
    feed_all(&mut FrameAccumulator::new(), data, &mut whole);

    let mut bytewise = Vec::new();
    let mut acc = FrameAccumulator::new();
    for &b in data {
        if let Some(r) = acc.push(b) {
            bytewise.push(outcome(r));
        }
    }
    assert_eq!(whole, bytewise);

    // The single-chunk entry point on the raw input.
    let mut copy = data.to_vec();
    let _ = outcome(decode_chunk(&mut copy));
});
