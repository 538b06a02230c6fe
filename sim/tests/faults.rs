//! `sim eval --faults` on the committed EuroSAT sample: each fault alone at a high rate, then
//! all at once. After every scenario the frame ledger balances (every accepted frame sent,
//! queued, dropped with a reason or rejected with a reason), and each fault meets its response:
//! rejected frames carry the fault's reason, backend failures fail over without losing a frame,
//! and every upset in the plan's checked memory is found by a scrub and healed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb")
}

/// `sim eval` on the sample with `faults` (and `extra` flags); its report.
fn eval(faults: Option<&str>, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut args = vec![
        "eval".to_string(),
        "--dataset".into(),
        sample().display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    if let Some(faults) = faults {
        args.extend(["--faults".into(), faults.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{faults:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    check_ledger(faults.unwrap_or("clean"), &report);
    report
}

/// The ledger balances, and agrees with the frames the sensor delivered.
fn check_ledger(scenario: &str, r: &Value) {
    let l = &r["ledger"];
    let sum = |m: &Value| {
        m.as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
    };
    let accepted = l["accepted"].as_u64().unwrap();
    let ended = l["sent"].as_u64().unwrap()
        + l["queued"].as_u64().unwrap()
        + sum(&l["dropped"])
        + sum(&l["rejected"]);
    assert_eq!(
        accepted, ended,
        "{scenario}: the ledger does not balance: {l}"
    );
    assert_eq!(l["unaccounted"], 0, "{scenario}");
    let dropouts = r["faults"]["dropouts"].as_u64().unwrap_or(0);
    assert_eq!(
        accepted + dropouts,
        r["images"].as_u64().unwrap(),
        "{scenario}: every image delivered was accepted"
    );
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The clean run every scenario is compared with, made once for the tests of this file (which
/// run in parallel: each scenario is a `sim eval` of its own).
fn clean() -> &'static Value {
    static CLEAN: OnceLock<Value> = OnceLock::new();
    CLEAN.get_or_init(|| eval(None, &[]))
}

fn clean_top1() -> f64 {
    clean()["top1"].as_f64().unwrap()
}

#[test]
fn the_clean_run_sends_every_frame_and_scrubs() {
    let clean = clean();
    assert_eq!(n(&clean["ledger"]["sent"]), 300);
    assert!(n(&clean["scrub"]["scrubs"]) >= 9, "{}", clean["scrub"]);
}

#[test]
fn damaged_frames_are_rejected_with_their_reason_and_losses_counted() {
    let clean_top1 = clean_top1();
    // Frames damaged on the way in are rejected with the fault's reason.
    for (fault, reason) in [
        ("nan", "not_finite"),
        ("timestamp", "timestamp"),
        ("wrong_size", "frame"),
    ] {
        let r = eval(Some(&format!("{fault}=0.2,seed=5")), &[]);
        let injected = n(&r["faults"]["injected"][fault]);
        assert!(injected > 20, "{fault}: {}", r["faults"]);
        assert_eq!(
            n(&r["ledger"]["rejected"][reason]),
            injected,
            "{fault}: {}",
            r["ledger"]
        );
        assert_eq!(n(&r["faults"]["damaged_frames"]), injected);
        // The frames no fault touched score as they do clean.
        assert!(
            (r["top1_clean"].as_f64().unwrap() - clean_top1).abs() < 0.01,
            "{fault}"
        );
    }

    // Damaged and cut files: rejected by the decoder, or decoded into garbage that is marked
    // and left out of `top1_clean`.
    for fault in ["corrupt", "truncated"] {
        let r = eval(Some(&format!("{fault}=0.2,seed=5")), &[]);
        let injected = n(&r["faults"]["injected"][fault]);
        assert!(injected > 20, "{fault}");
        assert_eq!(n(&r["faults"]["damaged_frames"]), injected, "{fault}");
        assert!(n(&r["ledger"]["rejected"]["source"]) <= injected, "{fault}");
        assert!(
            (r["top1_clean"].as_f64().unwrap() - clean_top1).abs() < 0.01,
            "{fault}"
        );
    }

    // Dropouts never reach the payload (check_ledger counts them out).
    let r = eval(Some("dropout=0.2,seed=5"), &[]);
    assert!(n(&r["faults"]["dropouts"]) > 20);

    // Bursts against a paced, dropping pipeline overflow the queue; each loss is counted.
    let r = eval(
        Some("burst=0.05,burst_len=24,seed=5"),
        &[
            "--frame-rate",
            "100",
            "--drop-policy",
            "drop-newest",
            "--queue-depth",
            "2",
        ],
    );
    assert!(n(&r["faults"]["injected"]["burst"]) > 0);
    assert!(
        n(&r["ledger"]["dropped"]["queue_full"]) > 0,
        "{}",
        r["ledger"]
    );
    // Dropped frames have no answer: the model's accuracy is over the frames it classified,
    // and the run's, with the drops counted wrong, is reported beside it.
    let (top1, classified) = (
        r["top1"].as_f64().unwrap(),
        r["top1_classified"].as_f64().unwrap(),
    );
    assert!(n(&r["classified"]) < n(&r["images"]));
    assert!(
        classified > top1 && classified >= 0.9,
        "{classified} {top1}"
    );
}

#[test]
fn a_failing_backend_fails_over_to_tract_and_loses_no_frame() {
    let clean_top1 = clean_top1();
    // A failing backend: every frame is re-run on tract, none is lost, the preferred backend
    // comes back.
    for (spec, fault) in [
        ("backend_error=0.1,seed=5", "backend_error"),
        ("backend_hang=0.05,hang_ms=30,seed=5", "backend_hang"),
        ("device_lost=0.02,lost_ms=50,seed=5", "device_lost"),
    ] {
        let r = eval(Some(spec), &[]);
        let f = &r["faults"];
        assert!(n(&f["injected"][fault]) > 0, "{spec}: {f}");
        assert!(n(&f["failover"]["failovers"]) > 0, "{spec}: {f}");
        assert!(n(&f["failover"]["restorations"]) > 0, "{spec}: {f}");
        assert_eq!(
            n(&r["ledger"]["sent"]),
            300,
            "{spec}: no frame lost: {}",
            r["ledger"]
        );
        assert!(
            (r["top1"].as_f64().unwrap() - clean_top1).abs() < 0.01,
            "{spec}"
        );
        if fault == "backend_hang" {
            assert!(n(&f["failover"]["recovery_us_max"]) >= 30_000, "{f}");
            assert_eq!(n(&f["supervision"]["hangs"]), 0, "within the deadline: {f}");
        }
    }

    // A hang far past the deadline: the call is cut at the deadline, the frame runs on tract
    // and the backend is restarted on a new worker, with the same faults going on.
    let r = eval(
        Some("backend_hang=0.05,hang_ms=5000,seed=5"),
        &["--deadline-ms", "100"],
    );
    let f = &r["faults"];
    let hangs = n(&f["injected"]["backend_hang"]);
    assert!(hangs >= 2, "{f}");
    assert_eq!(n(&f["supervision"]["hangs"]), hangs, "{f}");
    assert!(n(&f["supervision"]["restarts"]) >= hangs - 1, "{f}");
    assert_eq!(n(&f["supervision"]["restart_failures"]), 0, "{f}");
    let recovery = n(&f["failover"]["recovery_us_max"]);
    assert!(
        (100_000..1_000_000).contains(&recovery),
        "cut at the deadline, not the hang: {f}"
    );
    assert_eq!(n(&r["ledger"]["sent"]), 300, "{}", r["ledger"]);
    assert!((r["top1"].as_f64().unwrap() - clean_top1).abs() < 0.01);
}

#[test]
fn plan_upsets_are_scrubbed_and_activation_upsets_counted() {
    let clean_top1 = clean_top1();
    // Upsets in the loaded plan: each one in checked memory is found by a scrub, the plan is
    // restored from its golden copy and the frames since the last clean scrub run again.
    let r = eval(Some("upset_model=0.1,seed=5"), &["--scrub-every", "8"]);
    let u = &r["faults"]["upsets"];
    assert!(n(&u["model_checked"]) > 10, "{u}");
    assert_eq!(n(&u["model_found"]), n(&u["model_checked"]), "{u}");
    let s = &r["scrub"];
    assert!(
        n(&s["corrupt"]) > 0 && n(&s["restored"]) == n(&s["corrupt"]),
        "{s}"
    );
    assert!(n(&s["reruns"]) >= n(&s["corrupt"]), "{s}");
    assert_eq!(n(&r["ledger"]["sent"]), 300);
    assert!((r["top1"].as_f64().unwrap() - clean_top1).abs() < 0.01);

    // Upsets in the activations: nothing can find them; they are counted, and frames still end.
    let r = eval(Some("upset_activations=0.1,seed=5"), &[]);
    assert!(n(&r["faults"]["upsets"]["activations"]) > 10);
    assert_eq!(n(&r["ledger"]["sent"]), 300);
}

#[test]
fn all_faults_at_once_balance_and_spare_the_clean_frames() {
    let clean_top1 = clean_top1();
    for seed in [1, 2] {
        let r = eval(Some(&format!("all,seed={seed}")), &[]);
        let top1_clean = r["top1_clean"].as_f64().unwrap();
        assert!(
            (top1_clean - clean_top1).abs() <= 0.01,
            "seed {seed}: {top1_clean} against {clean_top1}"
        );
    }
}

#[test]
fn triple_modular_redundancy_outvotes_activation_upsets() {
    let clean = clean_top1();
    let spec = "upset_activations=1,upset_bits=100,seed=5";
    let hit = eval(Some(spec), &[]);
    let voted = eval(Some(spec), &["--tmr"]);
    let hit_top1 = hit["top1"].as_f64().unwrap();
    assert!(
        hit_top1 < clean - 0.03,
        "100 flipped bits per inference cost top-1: {hit_top1}"
    );
    // Every run is hit, so a logit two runs got wrong in different ways can still lose its
    // vote: most, not all, of the loss is won back (RELIABILITY.md: 97.7% to 99.3% by seed).
    let voted_top1 = voted["top1"].as_f64().unwrap();
    assert!(
        voted_top1 >= clean - 0.03 && voted_top1 > hit_top1 + 0.05,
        "{voted_top1}"
    );
    assert_eq!(voted["faults"]["tmr"]["inferences"], 300);
    assert!(n(&voted["faults"]["tmr"]["disagreements"]) > 250);

    // Guarding the high-priority products only: the frames whose first run says Industrial
    // or Residential (the sample's 30 of each) are voted, the others run once.
    let guarded = eval(None, &["--tmr", "--tmr-classes", "Industrial,Residential"]);
    assert_eq!(guarded["top1"].as_f64().unwrap(), clean);
    let t = &guarded["faults"]["tmr"];
    assert_eq!((n(&t["inferences"]), n(&t["single"])), (60, 240), "{t}");
    let out = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(["eval", "--dataset"])
        .arg(sample())
        .args(["--report", "/dev/null", "--tmr", "--tmr-classes", "Airport"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no class \"Airport\"") && stderr.contains("SeaLake"),
        "{stderr}"
    );
}

#[test]
fn bad_fault_specs_are_refused_with_the_item() {
    for (spec, says) in [
        ("corupt=0.1", "corupt"),
        ("nan=1.5", "probability"),
        ("all,seed=x", "seed=x"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sim"))
            .args(["run", "--faults", spec])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec}");
        assert!(stderr.contains(says), "{spec}: {stderr}");
    }
    // A TOML file says the same as a spec.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faults.toml");
    std::fs::write(&file, "nan = 0.2\nseed = 5\n").unwrap();
    let r = eval(Some(file.to_str().unwrap()), &[]);
    let spec = eval(Some("nan=0.2,seed=5"), &[]);
    assert_eq!(r["faults"]["injected"], spec["faults"]["injected"]);
    assert!(r["faults"]["spec"]
        .as_str()
        .unwrap()
        .starts_with("nan=0.2,seed=5"));
}

/// A detector's eval takes the frame faults too: damaged, wrong-size, NaN, stale and dropped
/// frames over the committed NWPU scenes; each accepted frame ends in the ledger, and mAP is
/// also reported over the frames no fault touched.
#[test]
fn a_detector_eval_takes_frame_faults_and_balances_its_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let dataset = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/nwpu-vhr10");
    let out = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args([
            "eval",
            "--model",
            "nwpu-vhr10",
            "--dataset",
            dataset.to_str().unwrap(),
            "--faults",
            "corrupt=0.2,wrong_size=0.2,nan=0.2,timestamp=0.2,dropout=0.15,seed=1",
            "--report",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    check_ledger("detector frame faults", &r);
    let rejected = &r["ledger"]["rejected"];
    for reason in ["frame", "not_finite", "timestamp"] {
        assert!(n(&rejected[reason]) > 0, "{reason}: {rejected}");
    }
    assert!(n(&r["faults"]["damaged_frames"]) >= 3, "{}", r["faults"]);
    assert!(n(&r["faults"]["dropouts"]) > 0, "{}", r["faults"]);
    let clean = r["map50_clean"].as_f64().unwrap();
    assert!(clean > 0.5, "mAP@0.5 over the untouched frames: {clean}");
}
