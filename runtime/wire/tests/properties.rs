//! Property tests: every message type, with arbitrary field values, round-trips through both
//! framings; and bounded runs of the fuzz harnesses (`kestrel_wire::fuzzing`, the same code the
//! `cargo fuzz` targets run) over arbitrary bytes and over real streams with bytes changed.
//! Crashes `cargo fuzz` finds are kept in `fuzz/regressions/` and replayed here.

use kestrel_wire::ccsds::{Decoder, Framer};
use kestrel_wire::fuzzing;
use kestrel_wire::mavlink::{Incoming, MavlinkDecoder, MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{
    Classification, CommandAck, Detections, Event, Health, LedgerCounts, ProductKind, ProductPart,
    Ranked, RejectReason, Severity, Telemetry, WireBox, DROP_REASONS, EVENT_ARGS, MAX_BOXES,
    PART_BYTES, REJECT_REASONS, TOP_K,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn severity() -> impl Strategy<Value = Severity> {
    prop_oneof![
        Just(Severity::Info),
        Just(Severity::Warning),
        Just(Severity::Error),
        Just(Severity::Fatal)
    ]
}

fn reason() -> impl Strategy<Value = Option<RejectReason>> {
    prop_oneof![
        Just(None),
        Just(Some(RejectReason::Malformed)),
        Just(Some(RejectReason::UnknownCommand)),
        Just(Some(RejectReason::OutOfRange)),
        Just(Some(RejectReason::StaleSequence)),
        Just(Some(RejectReason::Failed)),
    ]
}

fn kind() -> impl Strategy<Value = ProductKind> {
    prop_oneof![
        Just(ProductKind::DetectionCrop),
        Just(ProductKind::Thumbnail),
        Just(ProductKind::ClassMap)
    ]
}

/// Scores are finite here so that messages compare equal; NaN is the fuzz harnesses' part.
fn score() -> impl Strategy<Value = f32> {
    -1.0e6f32..1.0e6
}

fn message() -> impl Strategy<Value = Telemetry> {
    let ranked = (any::<u16>(), score()).prop_map(|(class, score)| Ranked { class, score });
    let wire_box = (score(), score(), score(), score(), any::<u16>(), score()).prop_map(
        |(x, y, w, h, class, score)| WireBox {
            x,
            y,
            w,
            h,
            class,
            score,
        },
    );
    prop_oneof![
        (
            any::<u32>(),
            any::<u64>(),
            any::<u16>(),
            any::<u16>(),
            score(),
            vec(ranked, 0..=TOP_K)
        )
            .prop_map(|(frame, capture_us, tile, class, score, top)| {
                Telemetry::Classification(Classification {
                    frame,
                    capture_us,
                    tile,
                    class,
                    score,
                    top: top.into_iter().collect(),
                })
            }),
        (
            any::<u32>(),
            any::<u64>(),
            vec(wire_box, 0..=MAX_BOXES),
            any::<u32>()
        )
            .prop_map(|(frame, capture_us, boxes, left_out)| {
                Telemetry::Detections(Detections {
                    frame,
                    capture_us,
                    boxes: boxes.into_iter().collect(),
                    left_out,
                })
            }),
        (
            any::<[u64; 4]>(),
            any::<[u64; 6]>(),
            any::<(u16, u32, u32)>(),
            any::<(Option<i32>, Option<u32>, u16, [u32; 3])>(),
            any::<([u64; 3], [u64; DROP_REASONS], [u64; REJECT_REASONS])>()
        )
            .prop_map(
                |(
                    counts,
                    errors,
                    (queue_depth, p50, p99),
                    (t, p, dq, dd),
                    (l, dropped, rejected),
                )| {
                    Telemetry::Health(Health {
                        uptime_us: counts[0],
                        frames_in: counts[1],
                        frames_done: counts[2],
                        frames_dropped: counts[3],
                        errors,
                        queue_depth,
                        downlink_queue: dq,
                        downlink_dropped: dd,
                        latency_p50_us: p50,
                        latency_p99_us: p99,
                        temperature_mc: t,
                        power_mw: p,
                        ledger: LedgerCounts {
                            accepted: l[0],
                            sent: l[1],
                            queued: l[2],
                            dropped,
                            rejected,
                        },
                    })
                }
            ),
        (any::<u16>(), severity(), any::<[i32; EVENT_ARGS]>())
            .prop_map(|(id, severity, args)| Telemetry::Event(Event { id, severity, args })),
        (any::<u16>(), any::<u16>(), reason()).prop_map(|(command, sequence, rejected)| {
            Telemetry::CommandAck(CommandAck {
                command,
                sequence,
                rejected,
            })
        }),
        (
            any::<(u32, u32, u16, u16, u16)>(),
            kind(),
            vec(any::<u8>(), 0..=PART_BYTES)
        )
            .prop_map(|((product, frame, class, part, parts), kind, data)| {
                Telemetry::ProductPart(ProductPart {
                    product,
                    frame,
                    kind,
                    class,
                    part,
                    parts,
                    data: data.into_iter().collect(),
                })
            }),
    ]
}

/// A real stream of both framings' bytes to mutate.
fn sample_stream(mavlink: bool) -> Vec<u8> {
    let messages = [
        Telemetry::Event(Event {
            id: 3,
            severity: Severity::Warning,
            args: [1, -2, 3],
        }),
        Telemetry::Detections(Detections {
            frame: 5,
            capture_us: 9,
            boxes: (0..20)
                .map(|i| WireBox {
                    x: i as f32,
                    y: 1.0,
                    w: 2.0,
                    h: 3.0,
                    class: i,
                    score: 0.5,
                })
                .collect(),
            left_out: 0,
        }),
    ];
    let (mut ccsds, mut mav) = (Framer::new(), MavlinkFramer::new(1, COMPONENT_ID));
    let (mut scratch, mut out) = ([0u8; 4096], [0u8; 8192]);
    let mut stream = Vec::new();
    for m in &messages {
        let len = if mavlink {
            mav.frame(m, &mut scratch, &mut out).unwrap()
        } else {
            ccsds.frame(m, &mut out).unwrap().len()
        };
        stream.extend_from_slice(&out[..len]);
    }
    stream
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips_through_both_framings(messages in vec(message(), 1..6)) {
        let (mut ccsds, mut mav) = (Framer::new(), MavlinkFramer::new(1, COMPONENT_ID));
        let (mut scratch, mut out) = ([0u8; 4096], [0u8; 16384]);
        let (mut packets, mut frames) = (Vec::new(), Vec::new());
        for m in &messages {
            let mut encoded = [0u8; 4096];
            let decoded = Telemetry::decode(m.encode(&mut encoded).unwrap()).unwrap();
            prop_assert_eq!(&decoded, m);
            packets.extend_from_slice(ccsds.frame(m, &mut out).unwrap());
            let len = mav.frame(m, &mut scratch, &mut out).unwrap();
            frames.extend_from_slice(&out[..len]);
        }
        let (mut decoder, mut at, mut back) = (Decoder::new(), 0, Vec::new());
        while let Some((packet, used)) = decoder.next(&packets[at..]) {
            at += used;
            back.push(packet.message.unwrap());
        }
        prop_assert_eq!(&back, &messages);
        prop_assert_eq!(decoder.stats.sequence_gaps, 0);
        let (mut decoder, mut at, mut back) = (MavlinkDecoder::<4096>::new(), 0, Vec::new());
        while let Some((frame, used)) = decoder.next(&frames[at..]) {
            at += used;
            if let Incoming::Telemetry(message) = frame.incoming {
                back.push(message.unwrap());
            }
        }
        // An event's STATUSTEXT carries exactly its id, severity and arguments.
        prop_assert_eq!(&back, &messages);
        prop_assert_eq!(decoder.lost_messages, 0);
    }

    #[test]
    fn arbitrary_bytes_never_break_a_parser(bytes in vec(any::<u8>(), 0..600)) {
        fuzzing::ccsds_stream(&bytes);
        fuzzing::mavlink_stream(&bytes);
        fuzzing::command(&bytes);
        fuzzing::telemetry(&bytes);
    }

    #[test]
    fn arbitrary_frame_headers_never_break_the_frame_link(
        mut bytes in vec(any::<u8>(), 72..100),
        magic in any::<bool>(),
    ) {
        if magic {
            bytes[..5].copy_from_slice(b"KFRM\x01");
        }
        fuzzing::frame_header(&bytes);
    }

    #[test]
    fn real_streams_with_bytes_changed_never_break_a_parser(
        changes in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        mavlink in any::<bool>(),
    ) {
        let mut stream = sample_stream(mavlink);
        for (at, byte) in changes {
            let at = at.index(stream.len());
            stream[at] = byte;
        }
        stream.truncate(cut.index(stream.len() + 1).max(1));
        if mavlink {
            fuzzing::mavlink_stream(&stream);
        } else {
            fuzzing::ccsds_stream(&stream);
        }
    }
}

/// Every input `cargo fuzz` found that once broke a harness, replayed.
#[test]
fn fuzz_regressions_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let Ok(targets) = std::fs::read_dir(&dir) else {
        return; // none found yet
    };
    for target in targets {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        for case in std::fs::read_dir(&target).unwrap() {
            let bytes = std::fs::read(case.unwrap().path()).unwrap();
            match name.as_str() {
                "ccsds_stream" => fuzzing::ccsds_stream(&bytes),
                "mavlink_stream" => fuzzing::mavlink_stream(&bytes),
                "command" => fuzzing::command(&bytes),
                "telemetry" => fuzzing::telemetry(&bytes),
                "frame_header" => fuzzing::frame_header(&bytes),
                other => panic!("fuzz/regressions/{other}: no such target"),
            }
        }
    }
}
