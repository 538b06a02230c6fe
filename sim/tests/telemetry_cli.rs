//! `sim eval --telemetry ... --link file:...` then `sim decode` on the capture, on the committed
//! NWPU VHR-10 sample scenes: everything the report says was sent is decoded on the ground
//! (messages, whole PNG crops), the budget holds, and a damaged capture's losses are counted,
//! product by product.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nwpu() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/nwpu-vhr10")
}

fn sim(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(args)
        .output()
        .expect("sim runs");
    assert!(
        out.status.success(),
        "sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Detector eval on the sample with telemetry to `link`; its report's `downlink`.
fn eval(dir: &Path, framing: &str, link: &str, extra: &[&str]) -> serde_json::Value {
    let report = dir.join(format!("report-{framing}.json"));
    let dataset = nwpu();
    let mut args = vec![
        "eval",
        "--model",
        "nwpu-vhr10",
        "--dataset",
        dataset.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--telemetry",
        framing,
        "--link",
        link,
    ];
    args.extend_from_slice(extra);
    sim(&args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    report["downlink"].clone()
}

/// `--link` for a capture file.
fn file_link(capture: &Path) -> String {
    format!("file:{}", capture.display())
}

/// `sim decode` on `capture`: its JSON lines, the last being the stats.
fn decode(capture: &Path, framing: &str, products: &Path) -> Vec<serde_json::Value> {
    let out = sim(&[
        "decode",
        capture.to_str().unwrap(),
        "--telemetry",
        framing,
        "--products",
        products.to_str().unwrap(),
    ]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count(lines: &[serde_json::Value], name: &str) -> usize {
    lines
        .iter()
        .filter(|l| l["message"]["type"] == name)
        .count()
}

#[test]
fn what_sim_sends_over_ccsds_is_what_the_ground_decodes() {
    sent_is_decoded("ccsds");
}

#[test]
fn what_sim_sends_over_mavlink_is_what_the_ground_decodes() {
    sent_is_decoded("mavlink");
}

fn sent_is_decoded(framing: &str) {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join(format!("capture.{framing}"));
    let downlink = eval(dir.path(), framing, &file_link(&capture), &[]);
    let sent = downlink["sent_bytes"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(&capture).unwrap().len(), sent);
    assert!(downlink["raw_bytes"].as_u64().unwrap() > 10_000_000);
    let ratio = downlink["reduction_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 0.1, "{downlink}");
    let products = downlink["products"].as_u64().unwrap();
    assert!(products > 20, "{downlink}");
    assert_eq!(downlink["queue"]["refused_too_large"], 0, "{downlink}");

    let products_dir = dir.path().join(format!("products-{framing}"));
    let lines = decode(&capture, framing, &products_dir);
    let stats = &lines.last().unwrap()["stats"];
    for counter in [
        "sequence_gaps",
        "crc_failures",
        "truncated",
        "unknown_ids",
        "malformed",
    ] {
        assert_eq!(stats[counter], 0, "{framing} {counter}: {stats}");
    }
    assert_eq!(stats["products"]["complete"].as_u64(), Some(products));
    assert_eq!(stats["products"]["lost"], 0);
    // One detections message per scene, one health snapshot.
    assert_eq!(count(&lines, "detections"), 7, "{framing}");
    assert_eq!(count(&lines, "health"), 1);
    // Every product is a PNG that decodes to a crop of at most 64 pixels a side.
    let pngs: Vec<_> = std::fs::read_dir(&products_dir).unwrap().collect();
    assert_eq!(pngs.len() as u64, products);
    for png in pngs {
        let crop = image::open(png.unwrap().path()).unwrap();
        assert!(crop.width() <= 64 && crop.height() <= 64);
    }
}

#[test]
fn a_pass_budget_sends_the_most_valuable_first_and_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture.ccsds");
    let budget = 30_000u64;
    let downlink = eval(
        dir.path(),
        "ccsds",
        &file_link(&capture),
        &["--downlink-budget", "30000", "--priority", "ship=5"],
    );
    let sent = downlink["sent_bytes"].as_u64().unwrap();
    assert!(sent <= budget && sent > budget / 2, "{downlink}");
    assert!(downlink["left_in_queue"].as_u64().unwrap() > 0);
    let lines = decode(&capture, "ccsds", &dir.path().join("products"));
    // Health goes first; then results by value per byte.
    assert_eq!(lines[0]["message"]["type"], "health");
    assert_eq!(lines.last().unwrap()["stats"]["products"]["lost"], 0);
}

#[test]
fn a_damaged_ccsds_capture_loses_only_the_products_it_cut_and_counts_them() {
    damaged_capture_loses_only_what_was_cut("ccsds");
}

#[test]
fn a_damaged_mavlink_capture_loses_only_the_products_it_cut_and_counts_them() {
    damaged_capture_loses_only_what_was_cut("mavlink");
}

fn damaged_capture_loses_only_what_was_cut(framing: &str) {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join(format!("capture.{framing}"));
    let downlink = eval(dir.path(), framing, &file_link(&capture), &[]);
    let products = downlink["products"].as_u64().unwrap();
    let mut bytes = std::fs::read(&capture).unwrap();
    // Cut 100 bytes out of the middle, flip a bit a quarter of the way in, and cut the end.
    let middle = bytes.len() / 2;
    bytes.drain(middle..middle + 100);
    let quarter = bytes.len() / 4;
    bytes[quarter] ^= 0x08;
    bytes.truncate(bytes.len() - 5);
    let damaged = dir.path().join(format!("damaged.{framing}"));
    std::fs::write(&damaged, &bytes).unwrap();
    let lines = decode(&damaged, framing, &dir.path().join(format!("p-{framing}")));
    let stats = &lines.last().unwrap()["stats"];
    let complete = stats["products"]["complete"].as_u64().unwrap();
    let lost = stats["products"]["lost"].as_u64().unwrap();
    // At most the two damaged places cost a product each (the cut end is the health
    // packet); the rest arrive whole.
    assert!((1..=2).contains(&lost), "{framing}: {stats}");
    assert!(complete >= products - 2, "{framing}: {stats}");
    assert_eq!(stats["truncated"], 1, "{framing}: {stats}");
    let failures = stats["crc_failures"].as_u64().unwrap();
    let gaps = stats["sequence_gaps"].as_u64().unwrap();
    assert!(failures >= 1 && gaps >= 2, "{framing}: {stats}");
}

/// `sim decode tcp://...` listening on a free port with `commands` to send, started; its port.
fn ground_station(framing: &str, commands: &[&str]) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let source = format!("tcp://127.0.0.1:{port}");
    (ground_station_on(&source, framing, commands, &[]), port)
}

/// `sim decode SOURCE` with `commands` to send, started once it listens.
fn ground_station_on(
    source: &str,
    framing: &str,
    commands: &[&str],
    extra: &[&str],
) -> std::process::Child {
    use std::io::BufRead;
    let mut args = vec![
        "decode".to_string(),
        source.to_string(),
        "--telemetry".into(),
        framing.into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    for c in commands {
        args.extend(["--command".to_string(), c.to_string()]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it listens.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        let line = lines.next().expect("sim decode starts").unwrap();
        if line.contains("listening") || line.contains("taking datagrams") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

fn lines_of(child: std::process::Child) -> Vec<serde_json::Value> {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn fields<'a>(lines: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["message"]["type"] == name)
        .map(|l| &l["message"]["fields"])
        .collect()
}

#[test]
fn commands_over_ccsds_pause_switch_and_reconfigure_a_running_classifier() {
    let (ground, port) = ground_station(
        "ccsds",
        &[
            "pause",
            "report_health",
            "set_score_threshold 0.9",
            "request_product 250 thumbnail",
            "switch_model 1",
            "resume",
        ],
    );
    let link = format!("tcp://127.0.0.1:{port}");
    sim(&["run", "--link", &link, "--slot", "1=eurosat-rgb"]);
    let lines = lines_of(ground);
    let acks = fields(&lines, "command_ack");
    assert_eq!(acks.len(), 6, "{acks:?}");
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack["sequence"], i + 1);
        assert_eq!(ack["rejected"], serde_json::Value::Null, "{ack}");
    }
    let events: Vec<u64> = fields(&lines, "event")
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect();
    assert_eq!(events, [3, 2, 4], "paused, model_switched, resumed");
    assert_eq!(fields(&lines, "health").len(), 2, "asked for, and the last");
    let thumbnail = lines
        .iter()
        .find(|l| l["kind"] == "thumbnail")
        .expect("the thumbnail asked for");
    assert_eq!(thumbnail["frame"], 250);
    // Long after the commands arrived, only classifications scoring 0.9 or more are sent.
    let late: Vec<f64> = fields(&lines, "classification")
        .iter()
        .filter(|c| c["frame"].as_u64().unwrap() > 200)
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|s| *s >= 0.9),
        "{late:?}"
    );
}

#[test]
fn commands_over_mavlink_set_the_threshold_and_bad_ones_are_refused_with_an_event() {
    let (ground, port) = ground_station(
        "mavlink",
        &[
            "set_score_threshold 0.7",
            "switch_model 2",
            "switch_model 9",
            "set_downlink_budget 0 1",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let link = format!("tcp://127.0.0.1:{port}");
    eval(dir.path(), "mavlink", &link, &["--slot", "2=eurosat-rgb"]);
    let lines = lines_of(ground);
    let rejected: Vec<&serde_json::Value> = fields(&lines, "command_ack")
        .iter()
        .map(|a| &a["rejected"])
        .collect();
    assert_eq!(
        rejected,
        [
            &serde_json::Value::Null,
            &serde_json::json!("failed"),
            &serde_json::json!("out_of_range"),
            &serde_json::json!("out_of_range")
        ]
    );
    // Each refusal raised command_rejected with the command, its sequence and the reason code.
    let events: Vec<&serde_json::Value> = fields(&lines, "event")
        .into_iter()
        .filter(|e| e["id"] == 1)
        .map(|e| &e["args"])
        .collect();
    assert_eq!(
        events,
        [
            &serde_json::json!([0x8002, 2, 5]),
            &serde_json::json!([0x8002, 3, 3]),
            &serde_json::json!([0x8004, 4, 3])
        ]
    );
    // The first scene may have run before the threshold arrived; the rest did not.
    let detections = fields(&lines, "detections");
    assert_eq!(detections.len(), 7);
    for d in &detections[1..] {
        for b in d["boxes"].as_array().unwrap() {
            assert!(b["score"].as_f64().unwrap() >= 0.7, "{b}");
        }
    }
}

#[test]
fn telemetry_and_commands_cross_udp() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let link = format!("udp://127.0.0.1:{port}");
    let ground = ground_station_on(
        &link,
        "ccsds",
        &["report_health", "set_score_threshold 0.9"],
        &["--idle-s", "1"],
    );
    // Paced, so that the commands (sent when the first datagram arrives) land mid-run.
    sim(&["run", "--link", &link, "--frame-rate", "200"]);
    let lines = lines_of(ground);
    let acks = fields(&lines, "command_ack");
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(acks.iter().all(|a| a["rejected"].is_null()), "{acks:?}");
    assert_eq!(fields(&lines, "health").len(), 2, "asked for, and the last");
    let stats = &lines.last().unwrap()["stats"];
    assert_eq!(stats["sequence_gaps"], 0, "{stats}");
    assert_eq!(stats["crc_failures"], 0, "{stats}");
    let classified = fields(&lines, "classification");
    let late: Vec<f64> = classified
        .iter()
        .filter(|c| c["frame"].as_u64().unwrap() > 200)
        .map(|c| c["score"].as_f64().unwrap())
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|s| *s >= 0.9),
        "{late:?}"
    );
    assert!(classified.len() > late.len());
}
