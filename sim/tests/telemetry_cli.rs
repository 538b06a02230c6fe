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

/// Detector eval on the sample with telemetry to `capture`; its report's `downlink`.
fn eval(dir: &Path, framing: &str, capture: &Path, extra: &[&str]) -> serde_json::Value {
    let report = dir.join(format!("report-{framing}.json"));
    let link = format!("file:{}", capture.display());
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
        &link,
    ];
    args.extend_from_slice(extra);
    sim(&args);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    report["downlink"].clone()
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
fn what_sim_sends_is_what_the_ground_decodes_in_both_framings() {
    let dir = tempfile::tempdir().unwrap();
    for framing in ["ccsds", "mavlink"] {
        let capture = dir.path().join(format!("capture.{framing}"));
        let downlink = eval(dir.path(), framing, &capture, &[]);
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
}

#[test]
fn a_pass_budget_sends_the_most_valuable_first_and_stays_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("capture.ccsds");
    let budget = 30_000u64;
    let downlink = eval(
        dir.path(),
        "ccsds",
        &capture,
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
fn a_damaged_capture_loses_only_the_products_it_cut_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    for framing in ["ccsds", "mavlink"] {
        let capture = dir.path().join(format!("capture.{framing}"));
        let downlink = eval(dir.path(), framing, &capture, &[]);
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
}
