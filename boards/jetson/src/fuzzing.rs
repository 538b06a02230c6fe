//! Fuzz harnesses for what the flight binary reads from outside, shared by the `cargo fuzz`
//! targets `spool_file` and `flight_config` (`fuzz/` at the repository root) and the bounded
//! runs in `tests/tests/fuzz_corpus.rs`, so both check the same things. Each takes arbitrary
//! bytes and panics only if an invariant breaks. The spool parses nothing itself: each file
//! goes through the host board's image decoder (`kestrel_host::fuzzing::image_decode`), so
//! `spool_file` checks what the spool adds, the file's way through its folders.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kestrel_hal::FrameSource;

use crate::config::{FlightConfig, SourceConfig};
use crate::spool::{SpoolError, SpoolOptions, SpoolSource};

/// Samples of the frame buffer `spool_file` hands the spool (a 64 x 64 RGBA frame): larger
/// images go to `failed/`, as on a board.
pub const SPOOL_FRAME_BUFFER: usize = 64 * 64 * 4;

/// `bytes` as a configuration file (invalid UTF-8 replaced, as a text editor would show it): an
/// accepted configuration is in the ranges `FlightConfig::parse` promises; nothing panics.
pub fn flight_config(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let Ok(config) = FlightConfig::parse(&text) else {
        return;
    };
    assert!(config.pipeline.queue_depth > 0);
    assert!(config.pipeline.stall_s.is_finite() && config.pipeline.stall_s > 0.0);
    assert!(config.health.interval_s.is_finite() && config.health.interval_s >= 0.0);
    assert!(["auto", "int8-cpu", "tract", "cuda"].contains(&config.model.backend.as_str()));
    if let SourceConfig::Spool { settle_s, .. } = config.source {
        assert!(settle_s.is_finite() && settle_s >= 0.0);
        assert!(config.pipeline.drop_policy == "block");
    }
}

/// A spool folder of its own under the system's temporary folder, removed when dropped.
struct TempSpool(PathBuf);

impl TempSpool {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kestrel-fuzz-spool-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempSpool {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The names in `folder`, sorted.
fn names(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(folder)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `bytes` as a file dropped into a spool: the spool delivers it as the frame the host decoder
/// makes of it and moves it to `done/`, or reports it and moves it to `failed/` with a reason
/// beside it. Either way the file is never lost, nor left behind, nor delivered twice.
pub fn spool_file(bytes: &[u8]) {
    const NAME: &str = "frame.img";
    let spool = TempSpool::new();
    let dir = &spool.0;
    let written = fs::create_dir_all(dir).and_then(|()| fs::write(dir.join(NAME), bytes));
    assert!(
        written.is_ok(),
        "cannot write {}: {written:?}",
        dir.display()
    );
    let options = SpoolOptions {
        settle: Duration::ZERO,
        poll: Duration::from_millis(1),
        stop_when_empty: true,
    };
    let source = SpoolSource::open(dir, options);
    assert!(source.is_ok(), "{source:?}");
    let Ok(mut source) = source else {
        return;
    };
    let mut buffer = vec![0u8; SPOOL_FRAME_BUFFER];
    let first = source.next_frame(&mut buffer);
    let expected = kestrel_host::decode_image_bytes(Path::new(NAME), bytes)
        .ok()
        .filter(|image| image.samples.len() <= buffer.len());
    let delivered = match (&first, &expected) {
        (Ok(Some(frame)), Some(image)) => {
            assert!(frame.geometry == image.geometry, "the decoder's geometry");
            assert!(
                buffer.get(..image.samples.len()) == Some(&image.samples[..]),
                "the decoder's samples"
            );
            assert!(frame.meta.sequence == 0);
            true
        }
        (Err(SpoolError::Frame { path, reason }), None) => {
            assert!(path == &dir.join("failed").join(NAME), "{}", path.display());
            assert!(!reason.is_empty());
            false
        }
        (first, expected) => panic!(
            "the spool said {first:?} of a file the decoder makes {:?} of",
            expected.as_ref().map(|image| image.geometry)
        ),
    };
    let second = source.next_frame(&mut buffer);
    assert!(
        matches!(second, Ok(None)),
        "one file, one frame: {second:?}"
    );
    let (done, failed) = (names(&dir.join("done")), names(&dir.join("failed")));
    if delivered {
        assert!(done == [NAME] && failed.is_empty(), "{done:?} {failed:?}");
    } else {
        let reason = format!("{NAME}.reason");
        assert!(
            done.is_empty() && failed == [NAME, reason.as_str()],
            "{done:?} {failed:?}"
        );
    }
    assert!(names(&dir.join("processing")).is_empty());
    assert!(
        names(dir) == ["done", "failed", "processing"],
        "{:?}",
        names(dir)
    );
}
