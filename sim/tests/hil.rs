//! `sim hil` against a real `kestrel-flight` on loopback (the classifier on the committed
//! EuroSAT sample, the detector on two NWPU VHR-10 scenes, with crops of what it found): every
//! frame's result comes back over the telemetry, equals the in-process run's, and is scored;
//! and against a board that
//! disconnects or falls silent mid-run, which is reported with the frames affected, in bounded
//! time, with the report still written.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `kestrel-flight`: the one `KESTREL_FLIGHT_BIN` names, else built now so that the test never
/// runs a stale one. `.ci/run` names the one its workspace build made for kestrel-jetson's own
/// tests: building it again here resolves the dependencies' features for one package, not the
/// workspace, and recompiled part of the tree (about two minutes of a cold CI run).
fn flight_binary() -> PathBuf {
    if let Some(built) = std::env::var_os("KESTREL_FLIGHT_BIN") {
        let built = PathBuf::from(built);
        assert!(built.is_file(), "KESTREL_FLIGHT_BIN {}", built.display());
        return built;
    }
    let features = std::env::var("KESTREL_FLIGHT_FEATURES").unwrap_or_default();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "kestrel-jetson",
            "--bin",
            "kestrel-flight",
            "--features",
            &features,
        ])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "kestrel-flight builds");
    let sim = PathBuf::from(env!("CARGO_BIN_EXE_sim"));
    sim.with_file_name("kestrel-flight")
}

/// A port free on loopback now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A flight configuration for `model` on frame-link and telemetry ports of its own.
fn config(dir: &Path, model: &str, framing: &str) -> (PathBuf, u16) {
    config_on(dir, model, framing, free_port())
}

/// [`config`] with the board's frame link on port `frames`.
fn config_on(dir: &Path, model: &str, framing: &str, frames: u16) -> (PathBuf, u16) {
    let telemetry = free_port();
    let path = dir.join(format!("{model}-{framing}.toml"));
    std::fs::write(
        &path,
        format!(
            "[model]\nname = \"{model}\"\n\
             [source]\nkind = \"frame-link\"\nlisten = \"127.0.0.1:{frames}\"\ntimeout_s = 20\n\
             [downlink]\ntelemetry = \"{framing}\"\nlink = \"tcp://127.0.0.1:{telemetry}\"\n\
             [health]\ninterval_s = 0.5\n"
        ),
    )
    .unwrap();
    (path, frames)
}

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sim"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("sim runs")
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_spawned_board_classifies_every_frame_as_the_in_process_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let flight = flight_binary();
    for framing in ["ccsds", "mavlink"] {
        let (config, _) = config(dir.path(), "eurosat-rgb", framing);
        let out_path = dir.path().join(format!("hil-{framing}.json"));
        let out = sim(&[
            "hil",
            "--spawn",
            flight.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--report",
            out_path.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{framing}: {stderr}");
        let r = report(&out_path);
        let link = &r["link"];
        assert_eq!(r["images"], 300, "{framing}");
        assert_eq!(link["frames_sent"], 300, "{framing}");
        assert_eq!(link["results_received"], 300, "{framing}");
        assert_eq!(link["lost"], 0, "{framing}");
        assert_eq!(link["telemetry"]["crc_failures"], 0, "{framing}");
        assert_eq!(link["telemetry"]["sequence_gaps"], 0, "{framing}");
        assert_eq!(link["board_exit"], "exit status: 0", "{framing}");
        assert_eq!(link["board_health"]["frames_done"], 300, "{framing}");
        assert!(link["rtt_us"]["p50"].as_u64().unwrap() > 0);
        let compared = &r["in_process"];
        assert_eq!(compared["compared"], 300, "{framing}");
        assert_eq!(compared["mismatches"], 0, "{framing}: {compared}");
        // The scores are the board's: the committed sample's known top-1.
        let top1 = r["top1"].as_f64().unwrap();
        assert!(top1 > 0.95, "{framing}: top-1 {top1}");
        let confusion: u64 = r["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(confusion, 300);
    }
}

#[test]
fn a_spawned_board_detects_as_the_in_process_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config(dir.path(), "nwpu-vhr10", "ccsds");
    let out_path = dir.path().join("hil-detect.json");
    let out = sim(&[
        "hil",
        "--spawn",
        flight_binary().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--limit",
        "2",
        "--report",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out_path);
    assert_eq!(r["link"]["results_received"], 2);
    assert_eq!(r["in_process"]["compared"], 2);
    assert_eq!(r["in_process"]["mismatches"], 0, "{}", r["in_process"]);
    assert!(r["objects"].as_u64().unwrap() > 10);
    // The board cut a crop of each box it reported from the frame, and they all arrived.
    let products = &r["link"]["telemetry"]["products"];
    assert!(products["complete"].as_u64().unwrap() >= 2, "{products}");
    assert_eq!(products["lost"], 0, "{products}");
    let map50 = r["map50"].as_f64().unwrap();
    assert!(map50 > 0.3, "mAP@0.5 {map50}");
}

/// A board listening on `listener` that takes `take` frames, answers none, then hangs up
/// (`hang_up`) or stays connected and silent.
fn fake_board(listener: TcpListener, telemetry: u16, take: usize, hang_up: bool) {
    let started = Instant::now();
    let _telemetry = loop {
        match TcpStream::connect(("127.0.0.1", telemetry)) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (mut link, _) = listener.accept().unwrap();
    // A 64x64 RGB chip is 72 header bytes and 12,288 samples.
    let mut frame = vec![0u8; 72 + 64 * 64 * 3];
    for _ in 0..take {
        link.read_exact(&mut frame).unwrap();
    }
    if !hang_up {
        // Take every frame, never answer, and hold the telemetry open past the bench's
        // patience.
        let mut sink = Vec::new();
        let _ = link.read_to_end(&mut sink);
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn a_board_that_hangs_up_or_falls_silent_is_reported_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    for hang_up in [true, false] {
        // The board's port is bound before the configuration names it: a port found free
        // and bound later can be taken in between by another test.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (config, frames) = config_on(dir.path(), "eurosat-rgb", "ccsds", port);
        let text = std::fs::read_to_string(&config).unwrap();
        let telemetry: u16 = text
            .split("tcp://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        let board = std::thread::spawn(move || fake_board(listener, telemetry, 3, hang_up));
        let out_path = dir.path().join("hil-fault.json");
        let started = Instant::now();
        let board_address = format!("tcp://127.0.0.1:{frames}");
        let out = sim(&[
            "hil",
            "--board",
            &board_address,
            "--config",
            config.to_str().unwrap(),
            "--timeout-s",
            "1",
            "--no-compare",
            "--report",
            out_path.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "hang_up {hang_up}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(20));
        board.join().unwrap();
        let r = report(&out_path);
        let link = &r["link"];
        assert_eq!(link["results_received"], 0, "{link}");
        let sent = link["frames_sent"].as_u64().unwrap();
        assert_eq!(link["lost"].as_u64().unwrap(), sent);
        let ended = link["ended"].as_str().unwrap();
        if hang_up {
            // The socket's buffers take a few frames more than the board read.
            assert!((3..300).contains(&sent), "{sent} sent");
            assert!(ended.contains("stopped taking frames"), "{ended}");
        } else {
            assert_eq!(sent, 300);
            assert!(ended.contains("sent nothing for 1s"), "{ended}");
        }
        assert!(stderr.contains("did not end cleanly"), "{stderr}");
    }
}

/// The short soak `.ci/run` runs (the README gives the long one): every fault at once, frames
/// and telemetry damaged on the links, backend faults and upsets on the board, 1,200 frames.
/// The board's ledger balances, its memory does not grow, and top-1 over the frames no fault
/// touched stays within 1 point of a clean run.
#[test]
fn a_soak_with_every_fault_balances_its_ledger_and_spares_the_clean_frames() {
    let dir = tempfile::tempdir().unwrap();
    let clean_path = dir.path().join("clean.json");
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb");
    let clean = sim(&[
        "eval",
        "--dataset",
        sample.to_str().unwrap(),
        "--report",
        clean_path.to_str().unwrap(),
    ]);
    assert!(clean.status.success());
    let clean_top1 = report(&clean_path)["top1"].as_f64().unwrap();

    let (config, _) = config(dir.path(), "eurosat-rgb", "ccsds");
    let out_path = dir.path().join("soak.json");
    // Built (or found built) before the clock starts: a cold build, or one waiting on cargo's
    // lock behind the other tests' builds, is not the soak's time.
    let flight = flight_binary();
    let started = Instant::now();
    let out = sim(&[
        "hil",
        "--spawn",
        flight.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--faults",
        "all,backend_error=0.01,upset_model=0.01,seed=3",
        "--repeat",
        "4",
        "--rate",
        "300",
        "--report",
        out_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(120),
        "bounded in time: {elapsed:?}"
    );
    let r = report(&out_path);
    let ledger = &r["ledger"];
    assert_eq!(ledger["unaccounted"], 0, "{ledger}");
    let accepted = ledger["accepted"].as_u64().unwrap();
    let sent = r["link"]["frames_sent"].as_u64().unwrap();
    assert!(
        accepted <= sent && accepted > sent * 9 / 10,
        "{accepted} of {sent}"
    );
    let damaged = r["faults"]["damaged_frames"].as_u64().unwrap();
    assert!(damaged > 10, "faults were injected: {}", r["faults"]);
    let events = &r["board_events"];
    assert!(
        events["backend_failover"].as_u64().unwrap_or(0) > 0,
        "{events}"
    );
    // Commands went up with bits flipped; the board executed none of those, and answered
    // undamaged ones (sim hil itself fails the run if a damaged one was executed).
    let commands = &r["faults"]["commands"];
    assert!(commands["damaged"].as_u64().unwrap() > 0, "{commands}");
    assert_eq!(commands["damaged_accepted"], 0, "{commands}");
    assert!(commands["accepted"].as_u64().unwrap() > 0, "{commands}");
    assert!(
        events["model_corrupt"].as_u64().unwrap_or(0) > 0,
        "{events}"
    );
    let top1_clean = r["top1_clean"].as_f64().unwrap();
    assert!(
        (top1_clean - clean_top1).abs() <= 0.01,
        "top-1 on the untouched frames {top1_clean}, clean {clean_top1}"
    );
    let rss = &r["board_rss_kb"];
    assert!(rss["samples"].as_u64().unwrap() >= 2, "{rss}");
    assert!(
        rss["growth"].as_i64().unwrap() < 16 * 1024,
        "memory grew: {rss}"
    );
}

/// A stage that stalls starves the watchdog, and a hung backend is restarted before it can:
/// the ingest stage stalls (`stage_stall`) past `stall_s` and the source's own wait, is
/// reported, and the hardware watchdog (here a file standing in for `/dev/watchdog`) goes
/// unfed until it moves again; backend hangs far longer than `stall_s` are cut at
/// `deadline_s`, the frame runs on the fallback and the backend is restarted in-process, so the
/// inference stage never stalls. No frame is lost, and the watchdog is stopped cleanly at the
/// end.
#[test]
fn a_stalled_stage_starves_the_watchdog_and_a_hung_backend_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config(dir.path(), "eurosat-rgb", "ccsds");
    let watchdog = dir.path().join("watchdog");
    std::fs::write(&watchdog, b"").unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("timeout_s = 20", "timeout_s = 1")
        .replace("[source]", "deadline_s = 0.5\n[source]");
    std::fs::write(
        &config,
        format!(
            "{text}[pipeline]\nstall_s = 1.0\n[watchdog]\ndevice = \"{}\"\nfeed_s = 0.02\n",
            watchdog.display()
        ),
    )
    .unwrap();
    let out_path = dir.path().join("stall.json");
    let out = sim(&[
        "hil",
        "--spawn",
        flight_binary().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--faults",
        "stage_stall=0.01,stall_ms=2500,backend_hang=0.01,hang_ms=5000,seed=4",
        "--limit",
        "200",
        "--report",
        out_path.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the ingest stage has been on one frame"),
        "{stderr}"
    );
    assert!(stderr.contains("every stage is moving again"), "{stderr}");
    assert!(
        !stderr.contains("the inference stage has been on one frame"),
        "a hung backend is restarted before its stage stalls: {stderr}"
    );
    let r = report(&out_path);
    assert_eq!(r["ledger"]["unaccounted"], 0);
    assert_eq!(
        r["ledger"]["sent"], 200,
        "no frame lost to the stalls and hangs: {}",
        r["ledger"]
    );
    let events = &r["board_events"];
    assert!(
        events["backend_failover"].as_u64().unwrap_or(0) > 0,
        "{events}"
    );
    assert!(
        events["backend_restarted"].as_u64().unwrap_or(0) > 0,
        "{events}"
    );
    let commands = &r["faults"]["commands"];
    assert!(commands["accepted"].as_u64().unwrap() > 0, "{commands}");
    let fed = std::fs::read(&watchdog).unwrap();
    assert!(fed.len() > 10, "fed {} times", fed.len());
    assert_eq!(fed.last(), Some(&b'V'), "stopped cleanly at the end");
}
