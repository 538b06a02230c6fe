//! What telemetry costs on the flight side: encoding each kind of message, framing it as CCSDS
//! and as MAVLink 2, and the ground's decoding, per message, one thread.
//!
//! `cargo bench -p kestrel-wire --bench wire -- [runs]` prints one JSON line per message kind
//! and step with the median and p90 in nanoseconds over `runs` repeats of a batch, and the
//! bytes on the link. BENCHMARKS.md records the results.

use std::hint::black_box;
use std::time::Instant;

use kestrel_wire::ccsds::{Decoder, Framer};
use kestrel_wire::downlink::{DownlinkQueue, ItemWriter};
use kestrel_wire::mavlink::{MavlinkDecoder, MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{
    Classification, Detections, Event, Health, ProductKind, Ranked, Severity, Telemetry, WireBox,
    MAX_BOXES,
};
use kestrel_wire::product;

/// Repeats timed together, so a timer read costs little.
const BATCH: usize = 200;

fn samples() -> Vec<(&'static str, Vec<Telemetry>)> {
    let classification = Telemetry::Classification(Classification {
        frame: 1234,
        capture_us: 987_654_321,
        tile: 3,
        class: 7,
        score: 0.93,
        top: (0..5)
            .map(|i| Ranked {
                class: i,
                score: 0.2,
            })
            .collect(),
    });
    let detections = |n: usize| {
        Telemetry::Detections(Detections {
            frame: 77,
            capture_us: 5_000_000,
            boxes: (0..n)
                .map(|i| WireBox {
                    x: 10.0 * i as f32,
                    y: 512.5,
                    w: 40.25,
                    h: 38.0,
                    class: (i % 10) as u16,
                    score: 0.5 + i as f32 / 200.0,
                })
                .collect(),
            left_out: 0,
        })
    };
    let health = Telemetry::Health(Health {
        uptime_us: 3_600_000_000,
        frames_in: 100_000,
        frames_done: 99_990,
        frames_dropped: 7,
        errors: [0, 3, 0, 0, 0, 0],
        queue_depth: 2,
        downlink_queue: 12,
        downlink_dropped: [3, 1, 0],
        latency_p50_us: 3_250,
        latency_p99_us: 4_100,
        temperature_mc: Some(48_500),
        power_mw: Some(11_200),
        ..Health::default()
    });
    let event = Telemetry::Event(Event {
        id: 0x0101,
        severity: Severity::Warning,
        args: [12, -1, 4096],
    });
    // A real product: a detection crop PNG (a median one) from `sim eval` on the committed NWPU
    // sample, decoded from its capture.
    let png = include_bytes!("crop.png");
    let parts: Vec<Telemetry> = product::split(1, 77, ProductKind::DetectionCrop, 0, png)
        .expect("parts")
        .map(Telemetry::ProductPart)
        .collect();
    vec![
        ("classification", vec![classification]),
        ("detections (10 boxes)", vec![detections(10)]),
        ("detections (64 boxes)", vec![detections(MAX_BOXES)]),
        ("health", vec![health]),
        ("event", vec![event]),
        ("product (crop PNG, 5.5 KB)", parts),
    ]
}

/// Median and p90 of `runs` batches of `step`, nanoseconds per call.
fn time(runs: usize, mut step: impl FnMut()) -> (f64, f64) {
    let mut per_call: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..BATCH {
                step();
            }
            started.elapsed().as_nanos() as f64 / BATCH as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    (per_call[runs / 2], per_call[runs * 9 / 10])
}

fn report(kind: &str, step: &str, bytes: usize, (median, p90): (f64, f64)) {
    println!(
        "{{\"message\": \"{kind}\", \"step\": \"{step}\", \"link_bytes\": {bytes}, \"median_ns\": {median:.0}, \"p90_ns\": {p90:.0}}}"
    );
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let mut scratch = vec![0u8; 4096];
    let mut out = vec![0u8; 1 << 16];
    for (kind, messages) in samples() {
        let encoded: usize = messages
            .iter()
            .map(|m| m.encode(&mut scratch).expect("encode").len())
            .sum();
        let timing = time(runs, || {
            for m in &messages {
                black_box(m.encode(&mut scratch).expect("encode"));
            }
        });
        report(kind, "encode", encoded, timing);

        let mut framer = Framer::new();
        let mut ccsds = Vec::new();
        for m in &messages {
            ccsds.extend_from_slice(framer.frame(m, &mut out).expect("frame"));
        }
        let timing = time(runs, || {
            for m in &messages {
                black_box(framer.frame(m, &mut out).expect("frame"));
            }
        });
        report(kind, "encode + CCSDS frame", ccsds.len(), timing);

        let mut mav = MavlinkFramer::new(1, COMPONENT_ID);
        let mut mavlink = Vec::new();
        for m in &messages {
            let len = mav.frame(m, &mut scratch, &mut out).expect("frame");
            mavlink.extend_from_slice(&out[..len]);
        }
        let timing = time(runs, || {
            for m in &messages {
                black_box(mav.frame(m, &mut scratch, &mut out).expect("frame"));
            }
        });
        report(kind, "encode + MAVLink 2 frame", mavlink.len(), timing);

        // The queue's path: an item written, offered, framed and sent.
        let mut queue: Box<DownlinkQueue<4, 16384>> = Box::new(DownlinkQueue::new(u32::MAX, 1));
        let mut item = vec![0u8; 16384];
        let timing = time(runs, || {
            let mut writer = ItemWriter::new(&mut item);
            for m in &messages {
                writer.push(m).expect("item");
            }
            queue.offer(writer.bytes(), 1.0);
            black_box(queue.send(0, &mut framer, &mut out).expect("sent"));
        });
        report(kind, "item + queue + CCSDS send", ccsds.len(), timing);

        let timing = time(runs, || {
            let (mut decoder, mut at) = (Decoder::new(), 0);
            while let Some((packet, used)) = decoder.next(&ccsds[at..]) {
                at += used;
                black_box(packet);
            }
        });
        report(kind, "CCSDS decode (ground)", ccsds.len(), timing);
        let mut decoder: Box<MavlinkDecoder<4096>> = Box::new(MavlinkDecoder::new());
        let timing = time(runs, || {
            let mut at = 0;
            while let Some((frame, used)) = decoder.next(&mavlink[at..]) {
                at += used;
                black_box(frame);
            }
        });
        report(kind, "MAVLink 2 decode (ground)", mavlink.len(), timing);
    }
}
