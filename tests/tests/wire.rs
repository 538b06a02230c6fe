//! Kestrel's CCSDS telemetry read by software nobody here wrote: the Python `spacepackets`
//! package (PyPI) finds every packet in a capture, with the APIDs, sequence counts, lengths and
//! ECSS CRCs Kestrel wrote, and the corrupt one's CRC fails there too. And the README's message
//! table is the code's.
//!
//! The python comes from `KESTREL_WIRE_PYTHON` (set by `.ci/run`, which installs spacepackets
//! into a virtual environment), else `.venv/bin/python`; without spacepackets the test says it
//! skipped and why.

use std::path::{Path, PathBuf};
use std::process::Command;

use kestrel_wire::ccsds::{Decoder, Framer};
use kestrel_wire::command::COMMANDS;
use kestrel_wire::message::{
    Classification, CommandAck, Detections, Event, Health, Ranked, RejectReason, Severity,
    Telemetry, WireBox, MESSAGES,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A python that imports spacepackets, or why there is none.
fn python() -> Result<PathBuf, String> {
    let candidate = std::env::var_os("KESTREL_WIRE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    match Command::new(&candidate)
        .args(["-c", "import spacepackets, fastcrc"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(candidate),
        Ok(o) => Err(format!(
            "{} cannot import spacepackets: {}",
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
            latency_p50_us: 3_000,
            latency_p99_us: 4_000,
            temperature_mc: Some(41_500),
            power_mw: Some(9_800),
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
    ]
}

#[test]
fn python_spacepackets_reads_the_capture_as_kestrel_wrote_it() {
    let python = match python() {
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
    let mut capture = Vec::new();
    for (i, packet) in packets.iter().enumerate() {
        let mut packet = packet.clone();
        if i == corrupt_index {
            packet[10] ^= 0x01;
        }
        capture.extend_from_slice(&packet);
        if i == 2 {
            capture.extend_from_slice(&[0x00, 0xff, 0x55]);
        }
    }
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
        assert_eq!(p["sequence"].as_u64(), Some((i / 5) as u64), "packet {i}");
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

/// The cells of the table rows of `section` that start with `start`; code spans around a whole
/// cell (the ids) are unwrapped.
fn table_rows(section: &str, start: &str) -> Vec<Vec<String>> {
    section
        .lines()
        .take_while(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(start))
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
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("## Telemetry")
        .nth(1)
        .and_then(|s| s.split("| command id |").next())
        .expect("a Telemetry section in the README");
    let rows = table_rows(section, "| `0x");
    assert_eq!(rows.len(), MESSAGES.len(), "one row per message");
    for (row, info) in rows.iter().zip(MESSAGES) {
        assert_eq!(row[1], format!("{:#06x}", info.id as u16));
        assert_eq!(row[2], info.name);
        assert_eq!(row[3], info.version.to_string());
        assert_eq!(row[4], format!("{:#05x}", info.apid));
        assert_eq!(row[5], info.meaning);
    }
}

/// The README's command table lists exactly the code's commands: id, name, version, meaning.
#[test]
fn the_readme_command_table_is_the_codes() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("| command id |")
        .nth(1)
        .expect("the command table");
    let rows = table_rows(section, "| `0x8");
    assert_eq!(rows.len(), COMMANDS.len(), "one row per command");
    for (row, info) in rows.iter().zip(COMMANDS) {
        assert_eq!(row[1], format!("{:#06x}", info.id as u16));
        assert_eq!(row[2], info.name);
        assert_eq!(row[3], info.version.to_string());
        assert_eq!(row[4], info.meaning);
    }
}
