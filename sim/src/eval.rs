//! Scoring a labelled chip folder through the threaded pipeline: `sim`, `sim run`, `sim eval`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use kestrel_eval::dataset::{scan_labelled, LabelledImage};
use kestrel_eval::Split;
use kestrel_host::{decode_image, FolderSource, HostClock};
use kestrel_runtime::health::ErrorKind;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, FrameFailure, PipelineConfig};
use serde::Serialize;

use crate::{load_model, BackendChoice, DropArg, LoadedModel, ModelArgs, PipelineArgs};
use kestrel_payload::command::Pausable;
use kestrel_payload::downlink::{self, Downlink, DownlinkArgs, DownlinkReport};
use kestrel_payload::percentile;
use kestrel_wire::message::ProductKind;

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
            model: ModelArgs {
                model: models::DEFAULT_MODEL.to_string(),
                backend: BackendChoice::Auto,
            },
            dataset,
            split: Split::All,
            pipeline: PipelineArgs {
                queue_depth: 4,
                drop_policy: DropArg::Block,
                frame_rate: 0.0,
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
}

/// A classifier's answers against the labels, counted as they come.
pub struct Confusion {
    /// Rows are the true class, columns the predicted class.
    rows: Vec<Vec<u64>>,
    correct: u64,
}

/// What [`Confusion`] comes to over a set of labelled images.
#[derive(Serialize)]
pub struct ClassScores {
    /// Correct / images: a failed, dropped or lost image counts as wrong.
    pub top1: f64,
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
    }

    /// Correct answers so far.
    pub fn correct(&self) -> u64 {
        self.correct
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
            per_class,
            confusion: self.rows,
        }
    }
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
    let LoadedModel {
        model,
        backend,
        plan_load_ms,
        switch,
    } = load_model(&opts.model)?;
    let labels = model.manifest.labels.clone();
    let spec = model.preprocess_spec().context("model preprocessing")?;
    let images = scan_labelled(&opts.dataset, &labels, opts.split)?;
    let backend_name = backend.name();
    eprintln!(
        "sim: {} images from {} ({:?} split), model {} ({}), backend {}",
        images.len(),
        opts.dataset.display(),
        opts.split,
        model.manifest.name,
        model.origin,
        backend_name
    );

    let mut downlink = Downlink::new(&opts.downlink, &labels)?;
    let slots = crate::model_slots(&opts.model, &opts.downlink.slots, &model)?;
    downlink.listen_for_commands(slots, switch, &[ProductKind::Thumbnail])?;
    let mut source = FolderSource::new(images.iter().map(|i| i.path.clone()).collect());
    if opts.pipeline.frame_rate > 0.0 {
        source = source.paced(Duration::from_secs_f64(1.0 / opts.pipeline.frame_rate));
    }
    let source = Pausable {
        inner: source,
        controls: downlink.controls(),
    };
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
    let config = PipelineConfig {
        queue_depth: opts.pipeline.queue_depth,
        drop_policy: DropPolicy::from(opts.pipeline.drop_policy),
        max_frame_samples: MAX_FRAME_SAMPLES,
    };

    let mut confusion = Confusion::new(labels.len());
    let mut latencies = Vec::with_capacity(images.len());
    let mut failures = Vec::new();
    let mut done = 0;
    let mut progress = Progress::new(images.len());
    let clock = HostClock::default();
    let started = Instant::now();
    let health = run_pipeline(source, step, &clock, config, |outcome| {
        done += 1;
        downlink.frame_in(outcome.frame_bytes);
        let Some(image) = images.get(outcome.sequence as usize) else {
            return;
        };
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
                confusion.record(image.label, c.class());
                latencies.push(outcome.latency_us);
                None
            }
            Err(FrameFailure::Dropped) => None,
            Err(FrameFailure::Source(e)) => Some(e.reason),
            Err(failure) => Some(failure.to_string()),
        };
        if let Some(reason) = reason {
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
        let pct = 100.0 * confusion.correct() as f64 / done.max(1) as f64;
        progress.update(done, &format!("top-1 so far {pct:5.1}%"));
    });
    let elapsed = started.elapsed().as_secs_f64();

    latencies.sort_unstable();
    let uptime_us = (elapsed * 1e6) as u64;
    let downlink = downlink.finish(downlink::health_message(&health, &latencies, uptime_us));
    let mut errors = serde_json::Map::new();
    for kind in ErrorKind::ALL {
        errors.insert(kind.name().to_string(), health.errors(kind).into());
    }
    let report = Report {
        model: model.manifest.name.clone(),
        model_origin: model.origin.clone(),
        backend: backend_name.to_string(),
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
    };
    print_summary(&report, model.manifest.validation_top1);
    if let Some(path) = &opts.report {
        crate::eval::write_report(path, &report)?;
    }
    Ok(())
}

fn print_summary(r: &Report, validation_top1: f64) {
    let errors: u64 = r.errors.values().filter_map(|v| v.as_u64()).sum();
    println!(
        "frames      {} ({} classified, {} dropped, {} errors)",
        r.images, r.classified, r.dropped, errors
    );
    println!(
        "top-1       {:.2}% ({} split of {}; the model's validation top-1 is {:.2}%)",
        100.0 * r.scores.top1,
        r.split,
        r.dataset,
        100.0 * validation_top1
    );
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
