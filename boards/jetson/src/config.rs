//! `kestrel-flight`'s configuration: one TOML file. Every table and key is known: an unknown
//! one, a wrong type or a value out of range refuses the start with the key and the reason.

use std::path::{Path, PathBuf};

use kestrel_payload::downlink::DownlinkArgs;

use crate::v4l2::PixelFormat;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlightConfig {
    /// The model to run.
    pub model: ModelConfig,
    /// Where frames come from.
    pub source: SourceConfig,
    /// The inference queue.
    #[serde(default)]
    pub pipeline: PipelineSettings,
    /// Telemetry and commands: framing, link, budget, priorities, model slots.
    #[serde(default)]
    pub downlink: DownlinkArgs,
    /// The hardware watchdog, if the board has one.
    pub watchdog: Option<WatchdogConfig>,
    /// Periodic health telemetry.
    #[serde(default)]
    pub health: HealthConfig,
    /// Fault injection, for hardware-in-the-loop campaigns only: a spec as `sim --faults`
    /// takes (`all`, `backend_error=0.01,upset_model=0.005`). The backend faults and upsets
    /// are injected here on the board; the frame and link faults by `sim hil --faults`.
    pub faults: Option<String>,
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A zoo name (built in: `eurosat-rgb`, `nwpu-vhr10`), or a model folder, `model.onnx` or
    /// `manifest.json` beside its `model.plan`.
    pub name: String,
    /// `auto` (the plan on the CPU when there is one), `int8-cpu`, `tract` or `cuda`.
    #[serde(default = "auto")]
    pub backend: String,
    /// Lowest score reported: a detector's boxes, or a classifier's results (default: every
    /// classification, and the detector's own reporting threshold from its manifest).
    pub score_threshold: Option<f32>,
    /// After a failover, frames between tries of the preferred backend (0: never go back).
    #[serde(default = "retry_frames")]
    pub failover_retry_frames: u64,
    /// Frames between scrubs of the loaded plan against its CRCs (0: never). A corrupt plan
    /// is restored from its golden copy and the frames since the last clean scrub run again.
    #[serde(default = "scrub_frames")]
    pub scrub_frames: u32,
    /// Triple-modular redundancy: run the preferred backend three times per inference and vote
    /// on each output value, outvoting an upset in one run, at three times the inference cost.
    #[serde(default)]
    pub tmr: bool,
    /// With `tmr`: vote only the inferences whose first run makes a high-priority product (a
    /// classifier's top class, or a class a detector finds, among these labels); the others run
    /// once. Empty: every inference is voted.
    #[serde(default)]
    pub tmr_classes: Vec<String>,
    /// Seconds the preferred backend may take over one inference: past it the call is a
    /// hang, the frame runs on the next backend, and the stuck backend is restarted in-process
    /// on a new worker. Under `pipeline.stall_s`, so the stage recovers before the watchdogs
    /// starve. 0: the backend runs on the inference thread, unsupervised (saving the hand-off
    /// to its worker; a hang then stalls the stage until the watchdogs restart the board).
    #[serde(default = "deadline_s")]
    pub deadline_s: f64,
}

fn deadline_s() -> f64 {
    2.0
}

fn retry_frames() -> u64 {
    100
}

fn scrub_frames() -> u32 {
    32
}

fn auto() -> String {
    "auto".into()
}

/// `[source]`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Image files dropped into a spool directory.
    Spool {
        /// The spool directory (`processing/`, `done/` and `failed/` are made inside).
        path: PathBuf,
        /// Seconds a file must be unchanged before it is taken.
        #[serde(default = "settle_s")]
        settle_s: f64,
    },
    /// A V4L2 camera (a build with the `v4l2` feature).
    V4l2 {
        /// The device, e.g. `/dev/video0`.
        device: PathBuf,
        /// Frame width in pixels.
        width: u32,
        /// Frame height in pixels.
        height: u32,
        /// Pixel format: `YUYV` (the default), `MJPG`, `RGB3` or `GREY`.
        #[serde(default = "yuyv")]
        format: String,
        /// Driver buffers mapped for streaming.
        #[serde(default = "camera_buffers")]
        buffers: u32,
        /// Seconds to wait for each frame before it is reported missing.
        #[serde(default = "camera_timeout_s")]
        timeout_s: f64,
    },
    /// Frames over TCP from a test bench (hardware in the loop).
    FrameLink {
        /// Address to listen on, e.g. `0.0.0.0:5600`.
        listen: String,
        /// Seconds to wait for the bench to connect, and for each frame after.
        #[serde(default = "link_timeout_s")]
        timeout_s: f64,
    },
}

fn settle_s() -> f64 {
    0.2
}

fn yuyv() -> String {
    "YUYV".into()
}

fn camera_buffers() -> u32 {
    4
}

fn camera_timeout_s() -> f64 {
    2.0
}

fn link_timeout_s() -> f64 {
    30.0
}

/// `[pipeline]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSettings {
    /// Frames that may wait for inference.
    pub queue_depth: usize,
    /// `block` (the default), `drop-newest` or `drop-oldest`. A spool must block: its files
    /// wait on disk, and a dropped one would be marked done without a result.
    pub drop_policy: String,
    /// The largest frame taken, pixels (width x height); larger ones are counted as errors.
    pub max_frame_pixels: usize,
    /// Seconds inference or output may spend on one frame before it counts as stalled: the
    /// watchdogs (hardware and systemd's) are then no longer fed, and the board restarts.
    pub stall_s: f64,
    /// Reject a frame whose capture time is not after the previous one's (a stuck or
    /// glitching sensor clock). Off by default: a spool's files carry no capture time.
    pub monotonic_capture: bool,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            queue_depth: 4,
            drop_policy: "block".into(),
            max_frame_pixels: 4096 * 4096,
            stall_s: 30.0,
            monotonic_capture: false,
        }
    }
}

/// `[watchdog]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// The device, normally `/dev/watchdog`.
    pub device: PathBuf,
    /// Seconds between feeds.
    #[serde(default = "feed_s")]
    pub feed_s: f64,
}

fn feed_s() -> f64 {
    1.0
}

/// `[health]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds between health snapshots (0: only on request and at the end).
    pub interval_s: f64,
    /// Thermal zones' folder (`/sys/class/thermal`); the hottest goes into health.
    pub thermal: Option<PathBuf>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_s: 10.0,
            thermal: None,
        }
    }
}

/// Why a configuration was refused: the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// The key and what is wrong with it.
    pub reason: String,
}

/// 0 or more, and a number (not NaN or infinite).
fn non_negative(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

impl FlightConfig {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let error = |reason: String| ConfigError {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(error)
    }

    /// Parse and check a configuration's text; the key and the reason when it is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// The ranges serde cannot check.
    fn check(&self) -> Result<(), String> {
        let positive = |key: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(format!("{key} = {value}: must be more than 0"))
            }
        };
        if !["auto", "int8-cpu", "tract", "cuda"].contains(&self.model.backend.as_str()) {
            return Err(format!(
                "model.backend = {:?}: must be auto, int8-cpu, tract or cuda",
                self.model.backend
            ));
        }
        if let Some(t) = self
            .model
            .score_threshold
            .filter(|t| !(0.0..=1.0).contains(t))
        {
            return Err(format!("model.score_threshold = {t}: must be from 0 to 1"));
        }
        match &self.source {
            SourceConfig::Spool { settle_s, .. } if !non_negative(*settle_s) => {
                return Err(format!("source.settle_s = {settle_s}: must be 0 or more"));
            }
            SourceConfig::FrameLink { timeout_s, .. } => positive("source.timeout_s", *timeout_s)?,
            SourceConfig::V4l2 {
                width,
                height,
                format,
                buffers,
                timeout_s,
                ..
            } => {
                positive("source.timeout_s", *timeout_s)?;
                let Some(pixels) = PixelFormat::from_fourcc(format.as_bytes()) else {
                    return Err(format!(
                        "source.format = {format:?}: must be YUYV, MJPG, RGB3 or GREY"
                    ));
                };
                if *width == 0 || *height == 0 || (pixels == PixelFormat::Yuyv && width % 2 == 1) {
                    return Err(format!(
                        "source.width, source.height = {width}, {height}: must be more than 0 (and the width even for YUYV)"
                    ));
                }
                if (*width as usize).saturating_mul(*height as usize)
                    > self.pipeline.max_frame_pixels
                {
                    return Err(format!(
                        "source.width x source.height = {width} x {height}: more than pipeline.max_frame_pixels ({})",
                        self.pipeline.max_frame_pixels
                    ));
                }
                if !(1..=32).contains(buffers) {
                    return Err(format!("source.buffers = {buffers}: must be from 1 to 32"));
                }
            }
            SourceConfig::Spool { .. } => {}
        }
        if self.pipeline.queue_depth == 0 {
            return Err("pipeline.queue_depth = 0: must be 1 or more".into());
        }
        if let Some(spec) = &self.faults {
            kestrel_runtime::faults::FaultSpec::parse(spec)
                .map_err(|e| format!("faults = {spec:?}: {e}"))?;
        }
        if !["block", "drop-newest", "drop-oldest"].contains(&self.pipeline.drop_policy.as_str()) {
            return Err(format!(
                "pipeline.drop_policy = {:?}: must be block, drop-newest or drop-oldest",
                self.pipeline.drop_policy
            ));
        }
        if matches!(self.source, SourceConfig::Spool { .. }) && self.pipeline.drop_policy != "block"
        {
            return Err(format!(
                "pipeline.drop_policy = {:?}: a spool source needs \"block\" (its files wait on disk; a dropped one would be marked done without a result)",
                self.pipeline.drop_policy
            ));
        }
        positive("pipeline.stall_s", self.pipeline.stall_s)?;
        if !non_negative(self.model.deadline_s) {
            return Err(format!(
                "model.deadline_s = {}: must be 0 (unsupervised) or more",
                self.model.deadline_s
            ));
        }
        if !self.model.tmr_classes.is_empty() && !self.model.tmr {
            return Err(
                "model.tmr_classes names the products to vote, but model.tmr is off".to_string(),
            );
        }
        if self.model.deadline_s >= self.pipeline.stall_s {
            return Err(format!(
                "model.deadline_s = {} must be under pipeline.stall_s = {}: a hung backend is restarted at its deadline, before the watchdogs starve",
                self.model.deadline_s, self.pipeline.stall_s
            ));
        }
        if let Some(w) = &self.watchdog {
            positive("watchdog.feed_s", w.feed_s)?;
        }
        if !non_negative(self.health.interval_s) {
            return Err(format!(
                "health.interval_s = {}: must be 0 or more",
                self.health.interval_s
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<FlightConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flight.toml");
        std::fs::write(&path, text).unwrap();
        FlightConfig::load(&path)
    }

    const MINIMAL: &str =
        "[model]\nname = \"eurosat-rgb\"\n[source]\nkind = \"spool\"\npath = \"/tmp/s\"\n";

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.model.backend, "auto");
        assert_eq!(c.pipeline.queue_depth, 4);
        assert!(c.watchdog.is_none());
        assert!(c.downlink.link.is_none());
    }

    #[test]
    fn a_camera_source_is_checked_against_its_format_and_the_frame_limit() {
        let camera = |keys: &str| {
            load(&format!(
                "[model]\nname = \"eurosat-rgb\"\n[source]\nkind = \"v4l2\"\ndevice = \"/dev/video0\"\n{keys}"
            ))
        };
        let c = camera("width = 640\nheight = 480\n").unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::V4l2 { ref format, buffers: 4, .. } if format == "YUYV"
        ));
        for (keys, why) in [
            (
                "width = 640\nheight = 480\nformat = \"NV12\"\n",
                "source.format",
            ),
            ("width = 641\nheight = 480\n", "width even"),
            ("width = 0\nheight = 480\n", "more than 0"),
            ("width = 8192\nheight = 8192\n", "max_frame_pixels"),
            ("width = 640\nheight = 480\nbuffers = 0\n", "source.buffers"),
            ("width = 640\n", "height"),
        ] {
            let e = camera(keys).unwrap_err().to_string();
            assert!(e.contains(why), "{keys}: {e}");
        }
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_refused_by_name() {
        for (extra, key) in [
            ("[pipeline]\nqueue_dept = 4\n", "queue_dept"),
            ("[downlink]\nbudget = 10\n", "budget"),
            ("[pipeline]\nqueue_depth = \"four\"\n", "queue_depth"),
            ("[pipeline]\nqueue_depth = 0\n", "pipeline.queue_depth"),
            (
                "[pipeline]\ndrop_policy = \"random\"\n",
                "pipeline.drop_policy",
            ),
            (
                "[pipeline]\ndrop_policy = \"drop-oldest\"\n",
                "a spool source needs",
            ),
            (
                "[watchdog]\ndevice = \"/dev/watchdog\"\nfeed_s = -1\n",
                "watchdog.feed_s",
            ),
            ("[camera]\nfps = 3\n", "camera"),
        ] {
            let e = load(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
            assert!(e.contains("flight.toml"), "{e}");
        }
        let e = load("[model]\nname = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("source"), "{e}");
        let e = load(&MINIMAL.replace("[source]", "score_threshold = 1.5\n[source]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.score_threshold = 1.5"), "{e}");
        // Fault injection is a top-level key, checked as `sim --faults` checks it.
        let e = load(&format!("faults = \"backend_eror=0.1\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("faults") && e.contains("backend_eror"), "{e}");
        let ok = load(&format!("faults = \"all,seed=2\"\n{MINIMAL}")).unwrap();
        assert_eq!(ok.faults.as_deref(), Some("all,seed=2"));
        assert_eq!(
            (ok.model.scrub_frames, ok.pipeline.monotonic_capture),
            (32, false)
        );
        assert_eq!(ok.model.deadline_s, 2.0);
        let e = load(&MINIMAL.replace("[source]", "deadline_s = 40\n[source]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.deadline_s = 40") && e.contains("stall_s"),
            "{e}"
        );
    }
}
