//! Scoring a labelled chip folder through the threaded pipeline: `sim`, `sim run`, `sim eval`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kestrel_eval::dataset::{scan_labelled, LabelledImage};
use kestrel_eval::Split;
use kestrel_host::{decode_image, FolderSource, HostClock, ImageError};
use kestrel_runtime::classify::Classification;
use kestrel_runtime::health::ErrorKind;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, FrameFailure, Outcome, PipelineConfig};
use serde::Serialize;

use crate::faults::{with_backend_faults, FaultsReport, FaultyFolder, Marks};
use crate::{load_model, BackendChoice, DropArg, LoadedModel, ModelArgs, PipelineArgs};
use kestrel_payload::command::Pausable;
use kestrel_payload::downlink::LedgerReport;
use kestrel_payload::downlink::{self, Downlink, DownlinkArgs, DownlinkReport};
use kestrel_payload::percentile;
use kestrel_runtime::health::ScrubStats;
use kestrel_runtime::tmr::Guard;
use kestrel_wire::message::ProductKind;
use std::sync::{Arc, Mutex};

/// Largest frame the chip pipeline accepts (samples): 1024 x 1024 RGBA. Larger images are
/// counted as frame errors; `sim replay` tiles big scenes instead.
const MAX_FRAME_SAMPLES: usize = 1024 * 1024 * 4;

pub struct Options {
    pub model: ModelArgs,
    pub dataset: PathBuf,
    pub split: Split,
    pub pipeline: PipelineArgs,
    pub report: Option<PathBuf>,
    pub downlink: DownlinkArgs,
}

impl Options {
    /// The default run: the committed sample, built-in model, best backend.
    pub fn sample(dataset: PathBuf) -> Self {
        Self {
            model: ModelArgs::new(models::DEFAULT_MODEL.to_string(), BackendChoice::Auto),
            dataset,
            split: Split::All,
            pipeline: PipelineArgs {
                queue_depth: 4,
                drop_policy: DropArg::Block,
                frame_rate: 0.0,
                faults: None,
                scrub_every: 32,
                tmr: false,
                tmr_classes: Vec::new(),
                deadline_ms: crate::faults::DEADLINE.as_millis() as u64,
            },
            report: None,
            downlink: DownlinkArgs::default(),
        }
    }
}

/// Per-frame latency in microseconds.
#[derive(Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub mean: f64,
}

impl Latency {
    /// Of latencies sorted ascending.
    pub fn of_sorted(sorted: &[u64]) -> Self {
        Self {
            p50: percentile(sorted, 50.0),
            p99: percentile(sorted, 99.0),
            mean: sorted.iter().sum::<u64>() as f64 / sorted.len().max(1) as f64,
        }
    }
}

/// A file that could not be used, and why.
#[derive(Serialize)]
pub struct Failure {
    pub file: String,
    pub reason: String,
}

#[derive(Serialize)]
struct Report {
    model: String,
    model_origin: String,
    backend: String,
    #[serde(flatten)]
    backend_use: crate::BackendUse,
    /// Milliseconds to parse, verify and prepare the int8 plan (null on tract).
    plan_load_ms: Option<f64>,
    dataset: String,
    split: String,
    labels: Vec<String>,
    /// Images offered to the pipeline.
    images: usize,
    /// Images that produced a classification.
    classified: u64,
    #[serde(flatten)]
    scores: ClassScores,
    latency_us: Latency,
    throughput_fps: f64,
    elapsed_s: f64,
    dropped: u64,
    errors: serde_json::Map<String, serde_json::Value>,
    failures: Vec<Failure>,
    /// The telemetry: bytes made and sent, the data-reduction ratio, the queue's counts.
    downlink: DownlinkReport,
    /// How every accepted frame ended: sent, queued, dropped by reason, rejected by reason.
    ledger: LedgerReport,
    /// Correct / classified, over the frames no fault damaged on purpose.
    top1_clean: f64,
    /// Frames `top1_clean` is over.
    clean_classified: u64,
    /// Scrubbing of the loaded model.
    scrub: ScrubReport,
    /// What was injected, and how the payload responded (null without `--faults`).
    faults: Option<FaultsReport>,
}

/// Scrubs of the loaded model against its CRCs.
#[derive(Serialize)]
pub struct ScrubReport {
    pub every_frames: u32,
    pub scrubs: u64,
    pub corrupt: u64,
    pub restored: u64,
    pub restore_failures: u64,
    /// Frames run again after a restore, and those whose answer changed.
    pub reruns: u64,
    pub corrected: u64,
    /// Microseconds per scrub, mean and longest.
    pub mean_us: f64,
    pub max_us: u64,
}

impl ScrubReport {
    pub fn new(every_frames: u32, s: &ScrubStats, corrected: u64) -> Self {
        Self {
            every_frames,
            scrubs: s.scrubs,
            corrupt: s.corrupt,
            restored: s.restored,
            restore_failures: s.restore_failures,
            reruns: s.reruns,
            corrected,
            mean_us: s.scrub_us as f64 / s.scrubs.max(1) as f64,
            max_us: s.max_scrub_us,
        }
    }
}

/// A classifier's answers against the labels, counted as they come.
pub struct Confusion {
    /// Rows are the true class, columns the predicted class.
    rows: Vec<Vec<u64>>,
    correct: u64,
    /// Images with an answer.
    answered: u64,
}

/// What [`Confusion`] comes to over a set of labelled images.
#[derive(Serialize)]
pub struct ClassScores {
    /// Correct / images: a failed, dropped or lost image counts as wrong.
    pub top1: f64,
    /// Correct / images answered: the model's accuracy on what it classified, with what was
    /// dropped, failed or lost left out (and counted in the report beside it).
    pub top1_classified: f64,
    /// Recall per class (correct / images of that class).
    pub per_class: serde_json::Map<String, serde_json::Value>,
    /// Rows are the true class, columns the predicted class, in label order.
    pub confusion: Vec<Vec<u64>>,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            rows: vec![vec![0; classes]; classes],
            correct: 0,
            answered: 0,
        }
    }

    /// An image of class `truth` classified as `predicted`.
    pub fn record(&mut self, truth: usize, predicted: u16) {
        let last = self.rows.len().saturating_sub(1);
        let predicted = usize::from(predicted).min(last);
        if let Some(cell) = self.rows.get_mut(truth).and_then(|r| r.get_mut(predicted)) {
            *cell += 1;
        }
        self.correct += u64::from(predicted == truth);
        self.answered += 1;
    }

    /// The scores over `images` (each counted, answered or not), by `labels`.
    pub fn scores(self, images: &[LabelledImage], labels: &[String]) -> ClassScores {
        let mut per_class = serde_json::Map::new();
        for (i, label) in labels.iter().enumerate() {
            let total = images.iter().filter(|im| im.label == i).count();
            let right = self.rows.get(i).and_then(|r| r.get(i)).copied();
            if let (true, Some(right)) = (total > 0, right) {
                per_class.insert(label.clone(), (right as f64 / total as f64).into());
            }
        }
        ClassScores {
            top1: self.correct as f64 / images.len().max(1) as f64,
            top1_classified: self.correct as f64 / self.answered.max(1) as f64,
            per_class,
            confusion: self.rows,
        }
    }
}

/// Refuse a report path that cannot be written before a long run makes the results: the file
/// is opened for appending (created, and removed again, where it was not there), so a missing
/// or read-only folder is found now rather than after the run.
pub fn check_report_path(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("--report {}: cannot write there", path.display()))?;
    if !existed {
        // Nothing was written: the run writes the report when it has one.
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Write `report` as pretty JSON to `path`, and say so.
pub fn write_report(path: &std::path::Path, report: &impl Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n")
        .with_context(|| format!("{}: cannot write report", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Progress on stderr: a rewritten line on a terminal, four lines otherwise.
pub struct Progress {
    total: usize,
    pub terminal: bool,
    last: Instant,
    next_line: usize,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            terminal: std::io::stderr().is_terminal(),
            last: Instant::now(),
            next_line: 0,
        }
    }

    pub fn update(&mut self, done: usize, status: &str) {
        if self.terminal {
            if self.last.elapsed() > Duration::from_millis(200) || done == self.total {
                eprint!("\r[{done:>6}/{}] {status}", self.total);
                self.last = Instant::now();
            }
            if done == self.total {
                eprintln!();
            }
        } else if done >= self.next_line {
            eprintln!("[{done:>6}/{}] {status}", self.total);
            self.next_line += (self.total / 4).max(1);
        }
    }
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    check_report_path(opts.report.as_deref())?;
    let LoadedModel {
        model,
        backend,
        plan_load_ms,
        switch,
        backend_use,
    } = load_model(&opts.model)?;
    if model.manifest.task != "classify" {
        bail!(
            "{} is a detector: this replays a classifier over labelled chips (a folder per \
             class); score a detector with `sim eval --model {} --dataset COCO_FOLDER`, run it \
             on images with `sim replay --model {} --images PATH`",
            model.manifest.name,
            opts.model.model,
            opts.model.model
        );
    }
    let labels = model.manifest.labels.clone();
    let spec = model.preprocess_spec().context("model preprocessing")?;
    let images = scan_labelled(&opts.dataset, &labels, opts.split)?;
    let faults = opts
        .pipeline
        .faults
        .as_deref()
        .map(crate::faults::load_spec)
        .transpose()?;
    let backend_name = backend.name();
    let guard = opts
        .pipeline
        .tmr
        .then(|| Guard::for_classes(&opts.pipeline.tmr_classes, &labels, None))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--tmr-classes: {e}"))?;
    let (backend, mut fault_watch) = with_backend_faults(
        &model,
        backend,
        faults.as_ref(),
        guard,
        crate::rebuild_backend(&opts.model),
        Duration::from_millis(opts.pipeline.deadline_ms),
    )?;
    eprintln!(
        "sim: {} images from {} ({:?} split), model {} ({}), backend {}{}",
        images.len(),
        opts.dataset.display(),
        opts.split,
        model.manifest.name,
        model.origin,
        backend_name,
        faults
            .as_ref()
            .map_or(String::new(), |f| format!(", faults {}", f.describe()))
    );

    let mut downlink = Downlink::new(&opts.downlink, &labels)?;
    let slots = crate::model_slots(&opts.model, &opts.downlink.slots, &model)?;
    downlink.listen_for_commands(slots, switch, &[ProductKind::Thumbnail])?;
    let interval = (opts.pipeline.frame_rate > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / opts.pipeline.frame_rate));
    let files: Vec<PathBuf> = images.iter().map(|i| i.path.clone()).collect();
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
    let config = PipelineConfig {
        queue_depth: opts.pipeline.queue_depth,
        drop_policy: DropPolicy::from(opts.pipeline.drop_policy),
        max_frame_samples: MAX_FRAME_SAMPLES,
        scrub_every: opts.pipeline.scrub_every,
        monotonic_capture: true,
    };

    // Each image's answer (a re-run after a scrub replaces the first), scored at the end.
    let mut answers: Vec<Option<u16>> = vec![None; images.len()];
    let mut corrected = 0;
    let marks = Arc::new(Mutex::new(Marks::default()));
    let mut latencies = Vec::with_capacity(images.len());
    let mut failures = Vec::new();
    let mut done = 0;
    let mut correct = 0u64;
    let mut progress = Progress::new(images.len());
    let clock = HostClock::default();
    let started = Instant::now();
    let faulty = faults.is_some();
    let controls = downlink.controls();
    let mut handle = |outcome: Outcome<ImageError, Classification>| {
        let file = if faulty {
            let marks = marks.lock().unwrap_or_else(|p| p.into_inner());
            marks.file_of.get(outcome.sequence as usize).copied()
        } else {
            Some(outcome.sequence as usize)
        };
        let Some((file, image)) = file.and_then(|f| Some((f, images.get(f)?))) else {
            return;
        };
        if outcome.rerun {
            // The frame ran again on a restored model: its answer is the new one, and a
            // changed answer goes down again.
            if let Ok(c) = &outcome.result {
                if answers[file] != Some(c.class()) {
                    corrected += 1;
                    correct -= u64::from(answers[file] == Some(image.label as u16));
                    correct += u64::from(c.class() == image.label as u16);
                    answers[file] = Some(c.class());
                    downlink.correction(outcome.sequence, c);
                }
            }
            return;
        }
        done += 1;
        downlink.frame_in(outcome.frame_bytes);
        let reason = match outcome.result {
            Ok(c) => {
                downlink.classification(outcome.sequence, 0, &c);
                if downlink.wants(outcome.sequence, ProductKind::Thumbnail) {
                    if let Ok(frame) = decode_image(&image.path) {
                        let g = frame.geometry;
                        let rgb = kestrel_payload::downlink::rgb_image(
                            &frame.samples,
                            g.width,
                            g.height,
                            g.bands,
                        );
                        downlink.thumbnail(outcome.sequence, &rgb);
                    }
                }
                answers[file] = Some(c.class());
                correct += u64::from(c.class() == image.label as u16);
                latencies.push(outcome.latency_us);
                None
            }
            Err(failure) => {
                downlink.frame_failed(&failure);
                match failure {
                    FrameFailure::Dropped => None,
                    FrameFailure::Source(e) => Some(e.reason),
                    failure => Some(failure.to_string()),
                }
            }
        };
        if let Some(reason) = reason.filter(|_| !faulty) {
            eprintln!(
                "{}warning: {}: {reason}",
                if progress.terminal { "\r" } else { "" },
                image.path.display()
            );
            failures.push(Failure {
                file: image.path.display().to_string(),
                reason,
            });
        }
        let pct = 100.0 * correct as f64 / done.max(1) as f64;
        progress.update(done, &format!("top-1 so far {pct:5.1}%"));
    };
    let health = match &faults {
        Some(spec) => {
            let source = FaultyFolder::new(files, spec, interval, Arc::clone(&marks));
            let source = Pausable {
                inner: source,
                controls,
            };
            run_pipeline(source, step, &clock, config, &mut handle)
        }
        None => {
            let mut source = FolderSource::new(files);
            if let Some(interval) = interval {
                source = source.paced(interval);
            }
            let source = Pausable {
                inner: source,
                controls,
            };
            run_pipeline(source, step, &clock, config, &mut handle)
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    // Frames the source never delivered (dropouts) are not frames the payload accepted.
    let marks = std::mem::take(&mut *marks.lock().unwrap_or_else(|p| p.into_inner()));
    let delivered: Vec<usize> = if faulty {
        marks.file_of
    } else {
        (0..images.len()).collect()
    };
    let damaged = marks.damaged;

    latencies.sort_unstable();
    let uptime_us = (elapsed * 1e6) as u64;
    let downlink = downlink.finish(downlink::health_message(&health, &latencies, uptime_us));
    let ledger = LedgerReport::from(&downlink.ledger);
    let mut errors = serde_json::Map::new();
    for kind in ErrorKind::ALL {
        errors.insert(kind.name().to_string(), health.errors(kind).into());
    }
    let mut confusion = Confusion::new(labels.len());
    let (mut clean, mut clean_correct) = (0u64, 0u64);
    for (sequence, &file) in delivered.iter().enumerate() {
        let (Some(image), Some(Some(answer))) = (images.get(file), answers.get(file)) else {
            continue;
        };
        if !damaged.contains(&(sequence as u64)) {
            clean += 1;
            clean_correct += u64::from(*answer == image.label as u16);
        }
    }
    for (image, answer) in images.iter().zip(&answers) {
        if let Some(answer) = answer {
            confusion.record(image.label, *answer);
        }
    }
    let faults_report = match (&faults, fault_watch.take()) {
        (None, Some(watch)) => Some(FaultsReport::new(
            &Default::default(),
            &Default::default(),
            0,
            0,
            Some(watch),
        )),
        (Some(spec), watch) => Some(FaultsReport::new(
            spec,
            &marks.injected,
            damaged.len() as u64,
            images.len().saturating_sub(delivered.len()) as u64,
            watch,
        )),
        (None, _) => None,
    };
    let report = Report {
        model: model.manifest.name.clone(),
        model_origin: model.origin.clone(),
        backend: backend_name.to_string(),
        backend_use,
        plan_load_ms,
        dataset: opts.dataset.display().to_string(),
        split: format!("{:?}", opts.split).to_lowercase(),
        scores: confusion.scores(&images, &labels),
        labels,
        images: images.len(),
        classified: health.frames_done,
        latency_us: Latency::of_sorted(&latencies),
        throughput_fps: health.frames_done as f64 / elapsed.max(1e-9),
        elapsed_s: elapsed,
        dropped: health.frames_dropped,
        errors,
        failures,
        downlink,
        ledger,
        top1_clean: clean_correct as f64 / clean.max(1) as f64,
        clean_classified: clean,
        scrub: ScrubReport::new(opts.pipeline.scrub_every, &health.scrub, corrected),
        faults: faults_report,
    };
    print_summary(&report, model.manifest.validation_top1);
    if let Some(path) = &opts.report {
        crate::eval::write_report(path, &report)?;
    }
    Ok(())
}

/// The upsets injected (with `--faults`) and what scrubbing found, a line each.
pub fn print_upsets_and_scrub(faults: Option<&FaultsReport>, scrub: &ScrubReport) {
    if let Some(t) = faults.and_then(|f| f.tmr.as_ref()) {
        println!(
            "tmr         {} inferences voted ({} with runs disagreeing), {} run once (not high-priority)",
            t.inferences, t.disagreements, t.single
        );
    }
    if let Some(u) = faults.and_then(|f| f.upsets.as_ref()) {
        println!(
            "upsets      model: {} in checked memory ({} found by scrubs), {} in padding; {} in activations",
            u.model_checked, u.model_found, u.model_unchecked, u.activations
        );
    }
    if scrub.scrubs > 0 {
        println!(
            "scrub       every {} frames: {} scrubs ({:.0} us mean, {} us max), {} corrupt, {} restored, {} frames re-run, {} results corrected",
            scrub.every_frames,
            scrub.scrubs,
            scrub.mean_us,
            scrub.max_us,
            scrub.corrupt,
            scrub.restored,
            scrub.reruns,
            scrub.corrected
        );
    }
}

/// One line: how every accepted frame ended.
pub fn print_ledger(l: &LedgerReport) {
    let nonzero = |m: &std::collections::BTreeMap<&'static str, u64>| {
        let parts: Vec<String> = m
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    };
    println!(
        "ledger      {} accepted = {} sent + {} queued + dropped ({}) + rejected ({}){}",
        l.accepted,
        l.sent,
        l.queued,
        nonzero(&l.dropped),
        nonzero(&l.rejected),
        if l.unaccounted == 0 {
            String::new()
        } else {
            format!("; {} UNACCOUNTED", l.unaccounted)
        }
    );
}

fn print_summary(r: &Report, validation_top1: f64) {
    let errors: u64 = r.errors.values().filter_map(|v| v.as_u64()).sum();
    println!(
        "frames      {} ({} classified, {} dropped, {} errors)",
        r.images, r.classified, r.dropped, errors
    );
    println!(
        "top-1       {:.2}% of the {} frames classified ({} split of {}; the model's validation top-1 is {:.2}%)",
        100.0 * r.scores.top1_classified,
        r.classified,
        r.split,
        r.dataset,
        100.0 * validation_top1
    );
    if r.classified < r.images as u64 {
        // Dropped and failed frames have no answer: not the model's accuracy, but the run's.
        println!(
            "            {:.2}% of all {} frames, counting the {} not classified as wrong",
            100.0 * r.scores.top1,
            r.images,
            r.images as u64 - r.classified
        );
    }
    println!(
        "latency     p50 {:.2} ms, p99 {:.2} ms per frame ({} backend: preprocess + model + postprocess)",
        r.latency_us.p50 as f64 / 1000.0,
        r.latency_us.p99 as f64 / 1000.0,
        r.backend
    );
    if let Some(ms) = r.plan_load_ms {
        println!("plan load   {ms:.2} ms (parse, CRC check, verify, arena)");
    }
    println!(
        "throughput  {:.1} frames/s over {:.2} s",
        r.throughput_fps, r.elapsed_s
    );
    downlink::print_summary(&r.downlink);
    print_ledger(&r.ledger);
    if let Some(f) = &r.faults {
        println!(
            "faults      {}: {} frames damaged on purpose, {} never delivered; top-1 on the rest {:.2}% ({} frames)",
            f.spec,
            f.damaged_frames,
            f.dropouts,
            100.0 * r.top1_clean,
            r.clean_classified
        );
        if let Some(fo) = &f.failover {
            println!(
                "failover    {} failovers (recovery p50 {:.2} ms, max {:.2} ms), {} returns to the preferred backend",
                fo.failovers,
                fo.recovery_us_p50 as f64 / 1e3,
                fo.recovery_us_max as f64 / 1e3,
                fo.restorations
            );
        }
    }
    print_upsets_and_scrub(r.faults.as_ref(), &r.scrub);
    if errors > 0 {
        let by_kind: Vec<String> = r
            .errors
            .iter()
            .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("errors      {}", by_kind.join(", "));
    }
}
