//! Kestrel's telemetry read by software nobody here wrote:
//! - the Python `spacepackets` package (PyPI) finds every CCSDS packet in a capture, with the
//!   APIDs, sequence counts, lengths and ECSS CRCs Kestrel wrote, and the corrupt one's CRC
//!   fails there too;
//! - pymavlink (PyPI) reads every MAVLink 2 frame with the sequence numbers, ids, CRCs and
//!   fields Kestrel wrote, and the commands pymavlink packs are accepted by Kestrel's decoder.
//!
//! And the README's message and command tables are the code's.
//!
//! The python comes from `KESTREL_WIRE_PYTHON` (set by `.ci/run`, which installs spacepackets
//! and pymavlink into a virtual environment), else `.venv/bin/python`; without them a test says
//! it skipped and why.

use std::path::{Path, PathBuf};
use std::process::Command;

use kestrel_wire::ccsds::{Decoder, Framer};
use kestrel_wire::command::COMMANDS;
use kestrel_wire::mavlink::{Incoming, MavlinkDecoder, MavlinkFramer, COMPONENT_ID};
use kestrel_wire::message::{
    Classification, CommandAck, Detections, Event, Health, ProductKind, ProductPart, Ranked,
    RejectReason, Severity, Telemetry, WireBox, EVENTS, MESSAGES,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A python that imports `modules`, or why there is none.
fn python(modules: &str) -> Result<PathBuf, String> {
    let candidate = std::env::var_os("KESTREL_WIRE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    match Command::new(&candidate)
        .args(["-c", &format!("import {modules}")])
        .output()
    {
        Ok(o) if o.status.success() => Ok(candidate),
        Ok(o) => Err(format!(
            "{} cannot import {modules}: {}",
            candidate.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{}: {e}", candidate.display())),
    }
}

fn messages() -> Vec<Telemetry> {
    vec![
        Telemetry::Classification(Classification {
            frame: 7,
            capture_us: 1_000_000,
            tile: 0,
            class: 8,
            score: 0.97,
            top: heapless::Vec::from_slice(&[Ranked {
                class: 8,
                score: 0.97,
            }])
            .unwrap(),
        }),
        Telemetry::Detections(Detections {
            frame: 8,
            capture_us: 1_100_000,
            boxes: (0..12)
                .map(|i| WireBox {
                    x: 10.0 * i as f32,
                    y: 5.0,
                    w: 30.0,
                    h: 12.5,
                    class: i % 3,
                    score: 0.9,
                })
                .collect(),
            left_out: 0,
        }),
        Telemetry::Health(Health {
            uptime_us: 5_000_000,
            frames_in: 9,
            frames_done: 9,
            frames_dropped: 0,
            errors: [0; 6],
            queue_depth: 0,
            downlink_queue: 3,
            downlink_dropped: [0, 2, 0],
            latency_p50_us: 3_000,
            latency_p99_us: 4_000,
            temperature_mc: Some(41_500),
            power_mw: Some(9_800),
            ..Health::default()
        }),
        Telemetry::Event(Event {
            id: 0x0101,
            severity: Severity::Info,
            args: [1, 2, 3],
        }),
        Telemetry::CommandAck(CommandAck {
            command: 0x8001,
            sequence: 3,
            rejected: Some(RejectReason::OutOfRange),
        }),
        Telemetry::ProductPart(ProductPart {
            product: 1,
            frame: 8,
            kind: ProductKind::DetectionCrop,
            class: 2,
            part: 0,
            parts: 1,
            data: (0..700).map(|i| (i % 256) as u8).collect(),
        }),
    ]
}

/// `units` (packets or frames) one after another, with one bit flipped in unit `corrupt.0` at
/// byte `corrupt.1`, and `noise.1` after unit `noise.0`.
fn capture_of(units: &[Vec<u8>], corrupt: (usize, usize), noise: (usize, &[u8])) -> Vec<u8> {
    let mut capture = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        let mut unit = unit.clone();
        if i == corrupt.0 {
            unit[corrupt.1] ^= 0x01;
        }
        capture.extend_from_slice(&unit);
        if i == noise.0 {
            capture.extend_from_slice(noise.1);
        }
    }
    capture
}

#[test]
fn python_spacepackets_reads_the_capture_as_kestrel_wrote_it() {
    let python = match python("spacepackets, fastcrc") {
        Ok(python) => python,
        Err(why) => {
            eprintln!("SKIPPED: no python with spacepackets ({why}); bash .ci/run installs it");
            return;
        }
    };
    // Two rounds of every message, noise between two packets, one packet with a flipped bit.
    let mut framer = Framer::new();
    let mut buf = [0u8; 2048];
    let sent = [messages(), messages()].concat();
    let packets: Vec<Vec<u8>> = sent
        .iter()
        .map(|m| framer.frame(m, &mut buf).unwrap().to_vec())
        .collect();
    let corrupt_index = 6;
    let capture = capture_of(&packets, (corrupt_index, 10), (2, &[0x00, 0xff, 0x55]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capture.ccsds");
    std::fs::write(&path, &capture).unwrap();

    let apids: Vec<String> = MESSAGES.iter().map(|m| m.apid.to_string()).collect();
    let out = Command::new(python)
        .arg(root().join("tests/wire/check_ccsds.py"))
        .arg(&path)
        .args(&apids)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = theirs["packets"].as_array().unwrap();
    assert_eq!(found.len(), packets.len(), "{theirs}");
    for (i, (p, ours)) in found.iter().zip(&packets).enumerate() {
        let info = sent[i].id().info();
        assert_eq!(p["apid"].as_u64(), Some(u64::from(info.apid)), "packet {i}");
        let round = i / messages().len();
        assert_eq!(p["sequence"].as_u64(), Some(round as u64), "packet {i}");
        assert_eq!(p["seq_flags"].as_u64(), Some(0b11), "unsegmented");
        assert_eq!(p["tm"].as_bool(), Some(true));
        assert_eq!(p["length"].as_u64(), Some(ours.len() as u64));
        assert_eq!(
            p["crc_ok"].as_bool(),
            Some(i != corrupt_index),
            "packet {i}"
        );
        if i != corrupt_index {
            let data = &ours[6..ours.len() - 2];
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(p["data"].as_str(), Some(hex.as_str()));
        }
    }

    // Kestrel's own decoder agrees: every packet but the corrupt one, the noise skipped.
    let mut decoder = Decoder::new();
    let (mut decoded, mut at) = (Vec::new(), 0);
    while let Some((packet, used)) = decoder.next(&capture[at..]) {
        decoded.push(packet.message.unwrap());
        at += used;
    }
    let mut expected = sent.clone();
    expected.remove(corrupt_index);
    assert_eq!(decoded, expected);
    assert_eq!(decoder.stats.crc_failures, 1);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn pymavlink_reads_the_capture_as_kestrel_wrote_it_and_packs_commands_kestrel_accepts() {
    let python = match python("pymavlink") {
        Ok(python) => python,
        Err(why) => {
            eprintln!("SKIPPED: no python with pymavlink ({why}); bash .ci/run installs it");
            return;
        }
    };
    // A heartbeat, every message, noise, every message again with one frame's bit flipped.
    let mut framer = MavlinkFramer::new(1, COMPONENT_ID);
    let (mut scratch, mut out) = ([0u8; 4096], [0u8; 16384]);
    let sent = [messages(), messages()].concat();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let len = framer.heartbeat(&mut out).unwrap();
    frames.push(out[..len].to_vec());
    for m in &sent {
        let len = framer.frame(m, &mut scratch, &mut out).unwrap();
        // Split the bytes into frames by their length byte.
        let mut at = 0;
        while at < len {
            let frame_len = 12 + usize::from(out[at + 1]);
            frames.push(out[at..at + frame_len].to_vec());
            at += frame_len;
        }
    }
    let corrupt = frames.len() - 3;
    // Noise without MAVLink 2's start byte: pymavlink, like any MAVLink parser, would take a
    // false 0xfd for a frame start and lose the frames its length covers (Kestrel's decoder
    // steps one byte on; its own tests cover that case).
    let capture = capture_of(&frames, (corrupt, 11), (3, &[0x00, 0xaa, 0x55]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capture.mavlink");
    std::fs::write(&path, &capture).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(&python)
            .arg(root().join("tests/wire/check_mavlink.py"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let stdout = run(&["decode".as_ref(), path.as_os_str()]);
    let theirs: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(theirs["version"].as_str(), Some("2.0"));
    // The noise, and the corrupt frame's CRC.
    let bad: Vec<&str> = theirs["bad_data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(bad.len(), 2, "{theirs}");
    assert_eq!(
        bad.iter().filter(|r| r.contains("CRC")).count(),
        1,
        "{bad:?}"
    );
    let found = theirs["messages"].as_array().unwrap();
    let good: Vec<(usize, &Vec<u8>)> = frames
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != corrupt)
        .collect();
    assert_eq!(found.len(), good.len(), "{theirs}");
    let (mut joined, mut next_index) = (Vec::new(), None);
    let mut theirs_decoded = Vec::new();
    for (m, (i, ours)) in found.iter().zip(&good) {
        assert_eq!(m["sequence"].as_u64(), Some(*i as u64), "frame {i}");
        assert_eq!(m["system"].as_u64(), Some(1));
        assert_eq!(m["component"].as_u64(), Some(u64::from(COMPONENT_ID)));
        match m["type"].as_str().unwrap() {
            "HEARTBEAT" => {
                assert_eq!(
                    m["mavtype"].as_u64(),
                    Some(18),
                    "MAV_TYPE_ONBOARD_CONTROLLER"
                );
                assert_eq!(m["autopilot"].as_u64(), Some(8), "MAV_AUTOPILOT_INVALID");
                assert_eq!(m["system_status"].as_u64(), Some(4), "MAV_STATE_ACTIVE");
            }
            "STATUSTEXT" => {
                assert_eq!(m["text"].as_str(), Some("kestrel 0101: 1 2 3"));
                assert_eq!(m["severity"].as_u64(), Some(6), "MAV_SEVERITY_INFO");
                theirs_decoded.push(Telemetry::Event(Event {
                    id: 0x0101,
                    severity: Severity::Info,
                    args: [1, 2, 3],
                }));
            }
            "TUNNEL" => {
                assert_eq!(m["payload_type"].as_u64(), Some(0));
                let payload = m["payload"].as_str().unwrap();
                // The frame's payload after TUNNEL's 5 field bytes; MAVLink 2 dropped its
                // trailing zeros on the wire and the reader puts them back.
                let mut ours_payload = ours[15..10 + usize::from(ours[1])].to_vec();
                ours_payload.resize(payload.len() / 2, 0);
                assert_eq!(payload, hex(&ours_payload), "frame {i}");
                let bytes: Vec<u8> = (0..payload.len() / 2)
                    .map(|k| u8::from_str_radix(&payload[2 * k..2 * k + 2], 16).unwrap())
                    .collect();
                assert_eq!(bytes[0], b'T');
                let (index, last) = (bytes[2] & 0x7f, bytes[2] & 0x80 != 0);
                if index == 0 {
                    joined.clear();
                    next_index = Some(0);
                }
                if next_index == Some(index) {
                    joined.extend_from_slice(&bytes[3..]);
                    next_index = Some(index + 1);
                } else {
                    next_index = None; // a segment is missing: the message is lost
                }
                if last && next_index.is_some() {
                    theirs_decoded.push(Telemetry::decode(&joined).unwrap());
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    // Everything but the message whose frame was corrupt, as pymavlink saw it.
    let lost = theirs_decoded.len();
    assert_eq!(lost, sent.len() - 1);

    // Kestrel's decoder agrees, counting the corrupt frame and the message it lost.
    let mut decoder: MavlinkDecoder<4096> = MavlinkDecoder::new();
    let (mut ours_decoded, mut at) = (Vec::new(), 0);
    while let Some((frame, used)) = decoder.next(&capture[at..]) {
        if let Incoming::Telemetry(message) = frame.incoming {
            ours_decoded.push(message.unwrap());
        }
        at += used;
    }
    decoder.finish(&capture[at..]);
    assert_eq!(ours_decoded, theirs_decoded);
    assert_eq!(decoder.stats.crc_failures, 1);
    assert_eq!(decoder.lost_messages, 1);
    assert_eq!(decoder.stats.sequence_gaps, 1);

    // Commands pymavlink packs as a ground station would are accepted on board.
    let commands = [
        kestrel_wire::Command::SetScoreThreshold { threshold: 0.4 },
        kestrel_wire::Command::Pause,
    ];
    let mut encoded = Vec::new();
    for (i, c) in commands.iter().enumerate() {
        let mut buf = [0u8; 64];
        encoded.push(hex(c.encode(10 + i as u16, &mut buf).unwrap()));
    }
    let command_path = dir.path().join("commands.mavlink");
    let mut args: Vec<&std::ffi::OsStr> = vec!["command".as_ref(), command_path.as_os_str()];
    args.extend(encoded.iter().map(std::ffi::OsStr::new));
    run(&args);
    let stream = std::fs::read(&command_path).unwrap();
    let (mut decoder, mut gate, mut at) = (
        MavlinkDecoder::<256>::new(),
        kestrel_wire::CommandGate::new(),
        0,
    );
    let mut accepted = Vec::new();
    while let Some((frame, used)) = decoder.next(&stream[at..]) {
        at += used;
        assert_eq!((frame.system_id, frame.component_id), (255, 190));
        let Incoming::Command { bytes, target } = frame.incoming else {
            panic!("not a command: {frame:?}");
        };
        assert_eq!(target, (1, COMPONENT_ID));
        accepted.push(gate.accept(&bytes).unwrap().0);
    }
    assert_eq!(accepted, commands);
}

/// The cells of the rows of the README table whose header starts with `header`; code spans
/// around a whole cell (the ids) are unwrapped.
fn table_rows(header: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = readme
        .split(header)
        .nth(1)
        .unwrap_or_else(|| panic!("a README table headed {header}"));
    table
        .lines()
        .skip(2) // the rest of the header row, and the separator
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .map(|c| {
                    let c = c.trim();
                    let whole_span =
                        c.starts_with('`') && c.ends_with('`') && c.matches('`').count() == 2;
                    if whole_span { c.trim_matches('`') } else { c }.to_string()
                })
                .collect()
        })
        .collect()
}

/// The README's message table lists exactly the code's messages: id, name, version, APID.
#[test]
fn the_readme_message_table_is_the_codes() {
    let rows = table_rows("| id | name | version | APID |");
    assert_eq!(rows.len(), MESSAGES.len(), "one row per message");
    for (row, info) in rows.iter().zip(MESSAGES) {
        assert_eq!(row[1], format!("{:#06x}", info.id as u16));
        assert_eq!(row[2], info.name);
        assert_eq!(row[3], info.version.to_string());
        assert_eq!(row[4], format!("{:#05x}", info.apid));
        assert_eq!(row[5], info.meaning);
    }
}

/// The README's event table lists exactly the code's events: id, name, severity, meaning.
#[test]
fn the_readme_event_table_is_the_codes() {
    let rows = table_rows("| event id |");
    assert_eq!(rows.len(), EVENTS.len(), "one row per event");
    for (row, info) in rows.iter().zip(EVENTS) {
        assert_eq!(row[1], format!("{:#06x}", info.id as u16));
        assert_eq!(row[2], info.name);
        assert_eq!(row[3], format!("{:?}", info.severity).to_lowercase());
        assert_eq!(row[4], info.meaning);
    }
}

/// The README's command table lists exactly the code's commands: id, name, version, meaning.
#[test]
fn the_readme_command_table_is_the_codes() {
    let rows = table_rows("| command id |");
    assert_eq!(rows.len(), COMMANDS.len(), "one row per command");
    for (row, info) in rows.iter().zip(COMMANDS) {
        assert_eq!(row[1], format!("{:#06x}", info.id as u16));
        assert_eq!(row[2], info.name);
        assert_eq!(row[3], info.version.to_string());
        assert_eq!(row[4], info.meaning);
    }
}
