//! Property tests of the link wire format: encode/decode round trips for arbitrary messages
//! (any f32 bit pattern included), and decoding arbitrary bytes never panics.

use flsl_runtime::wire::{
    Body, FeedResult, Frame, FrameAccumulator, MAX_ENCODED_LEN, MAX_OBJECTS, Message, Object,
    Selection, decode_chunk, decode_raw, encode,
};
use proptest::prelude::*;

fn any_object() -> impl Strategy<Value = Object> {
    (any::<[u32; 4]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
        |(b, class, s, track_id)| Object {
            bbox: b.map(f32::from_bits),
            class,
            score: f32::from_bits(s),
            track_id,
        },
    )
}

fn any_message() -> impl Strategy<Value = Message> {
    let body = prop_oneof![
        (any::<bool>(), prop::collection::vec(any_object(), 0..=MAX_OBJECTS)).prop_map(
            |(overflow, objs)| {
                let mut frame = Frame::from_objects(objs);
                frame.overflow = overflow;
                Body::Frame(frame)
            }
        ),
        Just(Body::Heartbeat),
        Just(Body::Select(Selection::Auto)),
        any::<u32>().prop_map(|id| Body::Select(Selection::Track(id))),
    ];
    (any::<u32>(), any::<u64>(), body).prop_map(|(seq, timestamp_us, body)| Message {
        seq,
        timestamp_us,
        body,
    })
}

/// Compares floats by bit pattern, so NaN payloads count as equal.
fn same(a: &Message, b: &Message) -> bool {
    let bits = |o: &Object| (o.bbox.map(f32::to_bits), o.class, o.score.to_bits(), o.track_id);
    a.seq == b.seq
        && a.timestamp_us == b.timestamp_us
        && match (&a.body, &b.body) {
            (Body::Frame(x), Body::Frame(y)) => {
                x.overflow == y.overflow
                    && x.objects.len() == y.objects.len()
                    && x.objects.iter().zip(&y.objects).all(|(p, q)| bits(p) == bits(q))
            }
            (x, y) => x == y,
        }
}

/// Drains `input` through `acc`, collecting messages; returns (messages, errors).
fn drain(acc: &mut FrameAccumulator, mut input: &[u8], out: &mut Vec<Message>) -> usize {
    let mut errors = 0;
    loop {
        match acc.feed(input) {
            FeedResult::Consumed => return errors,
            FeedResult::Message { message, remaining } => {
                out.push(message);
                input = remaining;
            }
            FeedResult::Error { remaining, .. } => {
                errors += 1;
                input = remaining;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(msg in any_message()) {
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let n = encode(&msg, &mut buf).unwrap();
        prop_assert!(n <= msg.encoded_len_max());
        prop_assert_eq!(buf[0], 0);
        prop_assert_eq!(buf[n - 1], 0);
        prop_assert!(!buf[1..n - 1].contains(&0));
        let back = decode_chunk(&mut buf[1..n - 1]).unwrap();
        prop_assert!(same(&back, &msg), "{:?} != {:?}", back, msg);
    }

    #[test]
    fn round_trip_in_any_chunking(msgs in prop::collection::vec(any_message(), 1..6), cuts in prop::collection::vec(1usize..300, 1..20)) {
        let mut stream = Vec::new();
        let mut buf = [0u8; MAX_ENCODED_LEN];
        for m in &msgs {
            let n = encode(m, &mut buf).unwrap();
            stream.extend_from_slice(&buf[..n]);
        }
        let mut acc = FrameAccumulator::new();
        let mut got = Vec::new();
        let mut rest = stream.as_slice();
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at((*cut).min(rest.len()));
            prop_assert_eq!(drain(&mut acc, head, &mut got), 0);
            rest = tail;
        }
        prop_assert_eq!(got.len(), msgs.len());
        for (g, m) in got.iter().zip(&msgs) {
            prop_assert!(same(g, m));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut acc = FrameAccumulator::new();
        let mut out = Vec::new();
        drain(&mut acc, &bytes, &mut out);
        let mut copy = bytes.clone();
        let _ = decode_chunk(&mut copy);
        let _ = decode_raw(&bytes);
    }
}
