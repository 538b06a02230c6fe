//! `--faults`: a labelled folder replayed as a faulty sensor would deliver it (damaged and
//! truncated files, wrong-size frames, NaN samples, dropouts, bad timestamps, bursts), and the
//! model's backend made to fail (errors, hangs, a lost device, upsets), each fault counted and
//! each deliberately damaged frame marked so accuracy can be scored on the clean ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use kestrel_backend::Backend;
use kestrel_hal::{Frame, FrameGeometry, FrameMeta, FrameSource};
use kestrel_host::{decode_image_bytes, ImageError};
use kestrel_runtime::failover::{Failover, FailoverBackend};
use kestrel_runtime::faults::{Draws, Fault, FaultSpec};
use kestrel_runtime::supervise::{preferred, Factory, PreferredWatch, Restart, Unbuilt};
use kestrel_runtime::tmr::{Guard, Votes};
use models::ZooModel;
use serde::Serialize;

/// `--faults` as given: `all`, a spec (`corrupt=0.05,seed=3`), or a TOML file of the same keys.
pub fn load_spec(arg: &str) -> anyhow::Result<FaultSpec> {
    let path = Path::new(arg);
    if !path.is_file() {
        return FaultSpec::parse(arg).with_context(|| format!("--faults {arg}"));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--faults {}: cannot read", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("--faults {}: not TOML", path.display()))?;
    let items = table.into_iter().map(|(key, value)| {
        let value = match value {
            toml::Value::String(s) => s,
            other => other.to_string(),
        };
        (key, value)
    });
    FaultSpec::from_items(items).with_context(|| format!("--faults {}", path.display()))
}

/// Frames the pipeline saw that a fault damaged on purpose, by the pipeline's sequence, and
/// each pipeline sequence's file index.
#[derive(Default)]
pub struct Marks {
    /// Deliberately damaged frames (excluded from `top1_clean`).
    pub damaged: BTreeSet<u64>,
    /// File index of each frame the pipeline was handed, in its order.
    pub file_of: Vec<usize>,
    /// Faults injected, by name.
    pub injected: BTreeMap<&'static str, u64>,
}

/// A folder of image files delivered as float frames with the source faults of a spec.
pub struct FaultyFolder {
    files: Vec<PathBuf>,
    next: usize,
    spec: FaultSpec,
    draws: Draws,
    interval: Option<Duration>,
    last_frame: Option<Instant>,
    burst_left: u32,
    started: Instant,
    last_capture_us: u64,
    marks: Arc<Mutex<Marks>>,
}

impl FaultyFolder {
    /// `files` with `spec`'s source faults, paced at `interval` when given (a burst ignores
    /// the pacing); what was done is recorded in `marks`.
    pub fn new(
        files: Vec<PathBuf>,
        spec: &FaultSpec,
        interval: Option<Duration>,
        marks: Arc<Mutex<Marks>>,
    ) -> Self {
        Self {
            files,
            next: 0,
            spec: spec.clone(),
            draws: Draws::new(spec.seed, 1),
            interval,
            last_frame: None,
            burst_left: 0,
            started: Instant::now(),
            last_capture_us: 0,
            marks,
        }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `fault` strikes now; counted if it does.
    fn strikes(&mut self, fault: Fault) -> bool {
        let hit = self.draws.chance(self.spec.rate(fault));
        if hit {
            *self.marks().injected.entry(fault.name()).or_default() += 1;
        }
        hit
    }

    fn pace(&mut self) {
        if self.burst_left > 0 {
            self.burst_left -= 1;
        } else if self.strikes(Fault::Burst) {
            self.burst_left = self.spec.burst_len.saturating_sub(1);
        } else if let (Some(interval), Some(last)) = (self.interval, self.last_frame) {
            if let Some(remaining) = interval.checked_sub(last.elapsed()) {
                std::thread::sleep(remaining);
            }
        }
        self.last_frame = Some(Instant::now());
    }

    /// The file's bytes, damaged or cut short when a fault strikes; whether one did.
    fn read(&mut self, path: &Path) -> Result<(Vec<u8>, bool), ImageError> {
        let mut bytes =
            std::fs::read(path).map_err(|e| ImageError::new(path, format!("cannot open: {e}")))?;
        if self.strikes(Fault::Corrupt) {
            // A burst of damage past the first bytes, as a bad sector or a dropped packet
            // leaves it: sometimes undecodable, sometimes a garbled image.
            let header = bytes.len() / 8;
            self.draws.damage(&mut bytes, header);
            return Ok((bytes, true));
        }
        if self.strikes(Fault::Truncated) {
            let keep = self.draws.below(bytes.len() as u64) as usize;
            bytes.truncate(keep);
            return Ok((bytes, true));
        }
        Ok((bytes, false))
    }

    /// A capture time after the last one, or, when the fault strikes, the last one again or
    /// one before it.
    fn capture_us(&mut self) -> (u64, bool) {
        let now = (self.started.elapsed().as_micros() as u64).max(self.last_capture_us + 1);
        if self.last_capture_us > 0 && self.strikes(Fault::Timestamp) {
            return (self.draws.stale_time(self.last_capture_us), true);
        }
        self.last_capture_us = now;
        (now, false)
    }
}

impl FrameSource<f32> for FaultyFolder {
    type Error = ImageError;

    fn next_frame(&mut self, buffer: &mut [f32]) -> Result<Option<Frame>, ImageError> {
        let index = loop {
            let Some(_) = self.files.get(self.next) else {
                return Ok(None);
            };
            let index = self.next;
            self.next += 1;
            // A dropout: the sensor never delivers this frame.
            if !self.strikes(Fault::Dropout) {
                break index;
            }
        };
        let path = self.files[index].clone();
        self.pace();
        let sequence = {
            let mut marks = self.marks();
            marks.file_of.push(index);
            marks.file_of.len() as u64 - 1
        };
        let (bytes, damaged) = self.read(&path)?;
        if damaged {
            self.marks().damaged.insert(sequence);
        }
        let image = decode_image_bytes(&path, &bytes)?;
        let (capture_us, stale) = self.capture_us();
        let g = image.geometry;
        let target = buffer.get_mut(..image.samples.len()).ok_or_else(|| {
            ImageError::new(
                &path,
                format!(
                    "{}x{}x{} image exceeds the frame buffer",
                    g.width, g.height, g.bands
                ),
            )
        })?;
        for (out, &sample) in target.iter_mut().zip(&image.samples) {
            *out = f32::from(sample);
        }
        let mut bad = stale || damaged;
        if self.strikes(Fault::NotFinite) {
            // A float sensor's bad pixels: a NaN or an infinity in about one sample in a hundred.
            let len = target.len() as u64;
            for _ in 0..(len / 100).max(1) {
                let at = self.draws.below(len) as usize;
                let value =
                    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][self.draws.below(3) as usize];
                if let Some(s) = target.get_mut(at) {
                    *s = value;
                }
            }
            bad = true;
        }
        let mut geometry = g;
        if self.strikes(Fault::WrongSize) {
            // The same bytes under the wrong shape: one band three times as wide, or no rows.
            geometry = if self.draws.below(2) == 0 {
                FrameGeometry {
                    width: g.width * u32::from(g.bands),
                    height: g.height,
                    bands: 1,
                }
            } else {
                FrameGeometry { height: 0, ..g }
            };
            bad = true;
        }
        if bad {
            self.marks().damaged.insert(sequence);
        }
        Ok(Some(Frame {
            geometry,
            meta: FrameMeta {
                sequence: index as u64,
                capture_us,
                ..FrameMeta::default()
            },
        }))
    }
}

/// What the faulty backend injected and the failover chain did, watched while a run goes.
pub struct FaultWatch {
    watch: PreferredWatch,
    changes: Arc<Mutex<Vec<Failover>>>,
}

/// Frames after a failover before the preferred backend is tried again.
const RETRY_EVERY: u64 = 25;

/// How long the preferred backend may take over one inference before it is a hang, unless
/// `--deadline-ms` says otherwise (as `[model] deadline_s` in `kestrel-flight`).
pub const DEADLINE: Duration = Duration::from_secs(2);

/// `backend` with `faults`' backend faults injected (under triple-modular redundancy for the
/// inferences `tmr` guards: each of the three runs meets its own faults), on a supervised worker (a call past
/// `deadline` is a hang, and `rebuild` makes its replacement), first in a failover chain whose
/// fallback is the model's float graph on tract; `backend` as it is when no backend fault is
/// on and no `tmr` is asked for.
pub fn with_backend_faults(
    model: &ZooModel,
    backend: Box<dyn Backend + Send>,
    faults: Option<&FaultSpec>,
    tmr: Option<Guard>,
    rebuild: Factory,
    deadline: Duration,
) -> anyhow::Result<(Box<dyn Backend + Send>, Option<FaultWatch>)> {
    if !faults.is_some_and(FaultSpec::any_backend) && tmr.is_none() {
        return Ok((backend, None));
    }
    let on_restart = Box::new(|r: Restart| {
        eprintln!(
            "warning: the backend hung past its deadline; restart {} {}",
            r.count,
            if r.loaded {
                "loaded the model"
            } else {
                "FAILED"
            }
        )
    });
    let (preferred, watch) = preferred(backend, rebuild, faults, tmr, Some(deadline), on_restart)?;
    let fallback = model
        .tract_backend()
        .context("the failover chain's fallback (tract)")?;
    let changes = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&changes);
    let chain = FailoverBackend::new(
        vec![preferred, Box::new(fallback)],
        RETRY_EVERY,
        Box::new(move |change| sink.lock().unwrap_or_else(|p| p.into_inner()).push(change)),
    )?;
    Ok((Box::new(chain), Some(FaultWatch { watch, changes })))
}

/// [`with_backend_faults`] on a backend held in place (a detector's).
pub fn inject_in_place(
    model: &ZooModel,
    backend: &mut Box<dyn Backend + Send>,
    faults: Option<&FaultSpec>,
    rebuild: Factory,
    deadline: Duration,
) -> anyhow::Result<Option<FaultWatch>> {
    if !faults.is_some_and(FaultSpec::any_backend) {
        return Ok(None);
    }
    let taken = std::mem::replace(backend, Box::new(Unbuilt));
    let (wrapped, watch) = with_backend_faults(model, taken, faults, None, rebuild, deadline)?;
    *backend = wrapped;
    Ok(watch)
}

/// Failovers and returns, and the time from a failure to the frame done on the fallback.
#[derive(Serialize)]
pub struct FailoverReport {
    pub failovers: u64,
    pub restorations: u64,
    pub recovery_us_p50: u64,
    pub recovery_us_max: u64,
}

/// Upsets injected, and how many of those in checked memory a scrub found.
#[derive(Serialize)]
pub struct UpsetReport {
    /// Flips in the plan's CRC-covered bytes.
    pub model_checked: u64,
    /// Flips in the plan's padding, which nothing reads or checks.
    pub model_unchecked: u64,
    /// Checked flips a scrub found (each followed by a restore).
    pub model_found: u64,
    /// found / checked.
    pub detection_rate: f64,
    /// Flips in the activations between layers (no scrub can see them).
    pub activations: u64,
}

/// Triple-modular redundancy's votes.
#[derive(Serialize)]
pub struct TmrReport {
    /// Inferences run once: not high-priority under `--tmr-classes`.
    pub single: u64,
    pub inferences: u64,
    pub disagreements: u64,
}

/// What `--faults` injected, and how the payload responded.
#[derive(Serialize)]
pub struct FaultsReport {
    /// The spec, written back in full.
    pub spec: String,
    /// Faults injected, by name.
    pub injected: BTreeMap<String, u64>,
    /// Frames the pipeline was handed that a fault damaged on purpose.
    pub damaged_frames: u64,
    /// Frames the sensor never delivered.
    pub dropouts: u64,
    pub failover: Option<FailoverReport>,
    pub upsets: Option<UpsetReport>,
    /// Under `--tmr`: inferences voted, and those whose three runs disagreed.
    pub tmr: Option<TmrReport>,
    /// The preferred backend's worker: calls past the deadline, and restarts.
    pub supervision: Option<SupervisionReport>,
}

/// What supervision of the preferred backend saw.
#[derive(Serialize)]
pub struct SupervisionReport {
    /// Calls not answered within `--deadline-ms`.
    pub hangs: u64,
    /// Workers that ended when their backend panicked.
    pub deaths: u64,
    /// Fresh workers started after a hang or a death.
    pub restarts: u64,
    /// Restarts that could not build a backend.
    pub restart_failures: u64,
}

impl FaultsReport {
    pub fn new(
        spec: &FaultSpec,
        source: &BTreeMap<&'static str, u64>,
        damaged_frames: u64,
        dropouts: u64,
        watch: Option<FaultWatch>,
    ) -> Self {
        let mut injected: BTreeMap<String, u64> =
            source.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let (mut failover, mut upsets, mut tmr, mut supervision) = (None, None, None, None);
        if let Some(watch) = watch {
            tmr = watch.watch.votes.as_ref().map(|v| {
                let votes: Votes = *v.lock().unwrap_or_else(|p| p.into_inner());
                TmrReport {
                    single: votes.single,
                    inferences: votes.inferences,
                    disagreements: votes.disagreements,
                }
            });
            let b = watch
                .watch
                .injected
                .as_ref()
                .map(|i| *i.lock().unwrap_or_else(|p| p.into_inner()))
                .unwrap_or_default();
            supervision = watch.watch.supervision.as_ref().map(|s| {
                let s = *s.lock().unwrap_or_else(|p| p.into_inner());
                SupervisionReport {
                    hangs: s.hangs,
                    deaths: s.deaths,
                    restarts: s.restarts,
                    restart_failures: s.restart_failures,
                }
            });
            for (fault, n) in [
                (Fault::BackendError, b.errors),
                (Fault::BackendHang, b.hangs),
                (Fault::DeviceLost, b.losses),
                (
                    Fault::UpsetModel,
                    b.model_upsets_checked + b.model_upsets_unchecked,
                ),
                (Fault::UpsetActivations, b.activation_upsets),
            ] {
                if n > 0 {
                    injected.insert(fault.name().to_string(), n);
                }
            }
            let changes = watch.changes.lock().unwrap_or_else(|p| p.into_inner());
            let mut recovery: Vec<u64> = changes
                .iter()
                .filter_map(|c| match c {
                    Failover::FailedOver { recovery_us, .. } => Some(*recovery_us),
                    Failover::Restored { .. } | Failover::Corrupt { .. } => None,
                })
                .collect();
            recovery.sort_unstable();
            failover = Some(FailoverReport {
                failovers: recovery.len() as u64,
                restorations: changes
                    .iter()
                    .filter(|c| matches!(c, Failover::Restored { .. }))
                    .count() as u64,
                recovery_us_p50: kestrel_payload::percentile(&recovery, 50.0),
                recovery_us_max: recovery.last().copied().unwrap_or(0),
            });
            upsets = Some(UpsetReport {
                model_checked: b.model_upsets_checked,
                model_unchecked: b.model_upsets_unchecked,
                model_found: b.model_upsets_found,
                detection_rate: b.model_upsets_found as f64 / b.model_upsets_checked.max(1) as f64,
                activations: b.activation_upsets,
            });
        }
        Self {
            spec: spec.describe(),
            injected,
            damaged_frames,
            dropouts,
            failover,
            upsets,
            tmr,
            supervision,
        }
    }
}
