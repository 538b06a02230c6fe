//! `kestrel-flight` end to end: real EuroSAT chips dropped into a spool while it runs, one
//! corrupt file among them; SIGTERM drains the queue and sends a last health snapshot; the
//! capture decodes on the ground to one classification per good chip, matching the labels.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kestrel_wire::ccsds::Decoder;
use kestrel_wire::message::Telemetry;

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sim/sample/eurosat-rgb")
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(folder: &Path) -> usize {
    std::fs::read_dir(folder).map_or(0, |d| d.count())
}

#[test]
fn a_spool_run_ends_on_sigterm_with_every_file_accounted_for_and_a_last_health_packet() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let capture = dir.path().join("telemetry.ccsds");
    let config = dir.path().join("flight.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nname = \"eurosat-rgb\"\n\n[source]\nkind = \"spool\"\npath = {:?}\nsettle_s = 0.0\n\n[downlink]\nlink = \"file:{}\"\n\n[health]\ninterval_s = 0.0\n",
            spool.display().to_string(),
            capture.display()
        ),
    )
    .unwrap();
    std::fs::create_dir(&spool).unwrap();
    let mut flight = Command::new(env!("CARGO_BIN_EXE_kestrel-flight"))
        .args(["--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the spool folders", Duration::from_secs(20), || {
        spool.join("done").is_dir()
    });

    // Twelve chips of two classes, written the spool way (a dot name, then a rename), and one
    // corrupt file.
    let mut labels = Vec::new();
    for class in ["Forest", "SeaLake"] {
        let mut chips: Vec<PathBuf> = std::fs::read_dir(sample().join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        chips.sort();
        for chip in chips.iter().take(6) {
            let name = chip.file_name().unwrap().to_string_lossy().into_owned();
            let hidden = spool.join(format!(".{name}"));
            std::fs::copy(chip, &hidden).unwrap();
            std::fs::rename(&hidden, spool.join(&name)).unwrap();
            labels.push(class);
        }
    }
    std::fs::write(spool.join("broken.jpg"), b"\xff\xd8\xff not a jpeg").unwrap();
    wait_for("every file handled", Duration::from_secs(60), || {
        count(&spool.join("done")) >= 12 && count(&spool.join("failed")) >= 2
    });

    let terminated = Command::new("kill")
        .args(["-TERM", &flight.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let started = Instant::now();
    let status = flight.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut flight.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGTERM took too long"
    );
    assert!(log.contains("stopped: 13 frames in, 12 done"), "{log}");

    assert_eq!(count(&spool.join("done")), 12);
    assert_eq!(count(&spool.join("failed")), 2, "broken.jpg and its reason");
    assert_eq!(count(&spool.join("processing")), 0);

    let bytes = std::fs::read(&capture).unwrap();
    let (mut decoder, mut at, mut messages) = (Decoder::new(), 0, Vec::new());
    while let Some((packet, used)) = decoder.next(&bytes[at..]) {
        at += used;
        messages.push(packet.message.unwrap());
    }
    assert_eq!(decoder.stats.sequence_gaps, 0);
    let classes: Vec<u16> = messages
        .iter()
        .filter_map(|m| match m {
            Telemetry::Classification(c) => Some(c.class),
            _ => None,
        })
        .collect();
    assert_eq!(classes.len(), 12);
    // EuroSAT's label order: Forest is class 1, SeaLake class 9. The files were taken oldest
    // first, so in the order written.
    let expected: Vec<u16> = labels
        .iter()
        .map(|l| if *l == "Forest" { 1 } else { 9 })
        .collect();
    let right = classes
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a == b)
        .count();
    assert!(right >= 11, "{classes:?} against {expected:?}");
    let Some(Telemetry::Health(health)) = messages.last() else {
        panic!("the last packet is not health: {:?}", messages.last());
    };
    assert_eq!((health.frames_in, health.frames_done), (13, 12));
    assert_eq!(health.errors.iter().sum::<u64>(), 1, "the corrupt file");
}

#[test]
fn a_bad_configuration_is_refused_with_the_key_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flight.toml");
    std::fs::write(
        &config,
        "[model]\nname = \"eurosat-rgb\"\n[source]\nkind = \"spool\"\npath = \"/tmp/x\"\nsettle = 1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel-flight"))
        .args(["--config", config.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `settle`"), "{stderr}");
    for example in ["flight-desktop.toml", "flight-jetson.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(example);
        let out = Command::new(env!("CARGO_BIN_EXE_kestrel-flight"))
            .args(["--config", path.to_str().unwrap(), "--check"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_camera_that_is_not_there_stops_the_start_with_the_device_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("camera.toml");
    std::fs::write(
        &config,
        "[model]\nname = \"eurosat-rgb\"\n[source]\nkind = \"v4l2\"\ndevice = \"/dev/video-kestrel-absent\"\nwidth = 640\nheight = 480\n[pipeline]\ndrop_policy = \"drop-oldest\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel-flight"))
        .args(["--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = if cfg!(feature = "v4l2") {
        "/dev/video-kestrel-absent: cannot open"
    } else {
        "built without V4L2 capture"
    };
    assert!(stderr.contains(why), "{stderr}");
}
