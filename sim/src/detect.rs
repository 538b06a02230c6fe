//! Detection in `sim`: scoring a COCO folder (`sim eval --task detect`), the default run's
//! detection pass over the committed sample scenes, and drawing boxes (`sim replay`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use kestrel_backend::Backend;
use kestrel_eval::coco::{self, Scored, Truth};
use kestrel_eval::Split;
use kestrel_hal::{FrameGeometry, FrameSource};
use kestrel_host::{decode_image, HostClock};
use kestrel_runtime::detect::Detections;
use kestrel_runtime::frame::{FrameView, Sample};
use kestrel_runtime::health::{ErrorKind, Health};
use kestrel_runtime::step::{DetectorConfig, DetectorStep, FrameStep};
use serde::Serialize;

use crate::eval::{Failure, Latency, Progress};
use crate::faults::{FaultyFolder, Marks};
use crate::{load_model, LoadedModel, ModelArgs};
use kestrel_backend::Scrub;
use kestrel_payload::downlink::{self, Downlink, DownlinkArgs, DownlinkReport, LedgerReport};
use kestrel_runtime::threaded::FrameFailure;
use kestrel_wire::message::ProductKind::Thumbnail;

/// Detections kept per tile before merging (a 512-pixel tile of NWPU VHR-10 holds at most
/// about 70 objects).
pub const TILE_CAP: usize = 128;
/// Detections kept per frame after merging; more are counted as overflow.
pub const FRAME_CAP: usize = 1024;

pub type FrameDetections = Detections<FRAME_CAP>;

/// A detector model on its backend, with the buffers its step borrows.
pub struct Detector {
    pub loaded: LoadedModel,
    pub config: DetectorConfig,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl Detector {
    /// Load `args.model` and check it is a detector.
    pub fn load(args: &ModelArgs) -> anyhow::Result<Self> {
        let loaded = load_model(args)?;
        let Some(config) = loaded.model.detector_config() else {
            bail!(
                "model {} is a {} model, not a detector",
                loaded.model.origin,
                loaded.model.manifest.task
            );
        };
        let spec = loaded.model.preprocess_spec()?;
        let (input, output) = (
            vec![0.0; spec.input_len()],
            vec![0.0; loaded.backend.output_len()],
        );
        Ok(Self {
            loaded,
            config,
            input,
            output,
        })
    }

    /// The step over this detector's backend, reporting boxes from `score_threshold` up.
    pub fn step(
        &mut self,
        score_threshold: f32,
    ) -> anyhow::Result<DetectorStep<'_, &mut (dyn Backend + Send + 'static), TILE_CAP>> {
        let config = DetectorConfig {
            score_threshold,
            ..self.config
        };
        let spec = self.loaded.model.preprocess_spec()?;
        Ok(DetectorStep::new(
            self.loaded.backend.as_mut(),
            spec,
            config,
            &mut self.input,
            &mut self.output,
        )?)
    }
}

pub struct EvalOptions {
    pub model: ModelArgs,
    /// A folder with `images/` and `annotations_coco.json`.
    pub dataset: PathBuf,
    pub split: Split,
    pub report: Option<PathBuf>,
    /// Lowest score kept for the precision-recall curve.
    pub score_threshold: f32,
    pub downlink: DownlinkArgs,
    /// Faults to inject: the frame faults into the images, the backend faults and upsets
    /// into the model's backend (the link's are `sim hil`'s).
    pub faults: Option<kestrel_runtime::faults::FaultSpec>,
    /// Frames between scrubs of the loaded plan (0: never).
    pub scrub_every: u32,
}

/// A detector's boxes against a COCO folder's.
#[derive(Serialize)]
pub struct CocoScores {
    /// Ground-truth objects in the images scored.
    pub objects: usize,
    /// COCO mAP at IoU 0.5, 0..1.
    pub map50: f64,
    /// COCO mAP over IoU 0.50:0.05:0.95, 0..1.
    pub map50_95: f64,
    /// AP at IoU 0.5 per class (null: no ground truth of that class in these images).
    pub per_class_ap50: serde_json::Map<String, serde_json::Value>,
}

/// Score `scored` against the boxes of `images` of `dataset`.
pub fn coco_scores(
    dataset: &coco::Dataset,
    images: &[&coco::Image],
    scored: &[Scored],
) -> CocoScores {
    let ids: Vec<u64> = images.iter().map(|i| i.id).collect();
    let truths: Vec<Truth> = dataset
        .truths
        .iter()
        .filter(|t| ids.contains(&t.image))
        .copied()
        .collect();
    let categories: Vec<u64> = dataset.categories.iter().map(|c| c.0).collect();
    let summary = coco::evaluate(&truths, scored, &categories);
    let mut per_class_ap50 = serde_json::Map::new();
    for (id, name) in &dataset.categories {
        let ap = summary.per_category_ap50.get(id).copied().flatten();
        per_class_ap50.insert(name.clone(), ap.into());
    }
    CocoScores {
        objects: truths.len(),
        map50: summary.map50,
        map50_95: summary.map50_95,
        per_class_ap50,
    }
}

/// The dataset's category id for each of the model's labels, matched by name; an error when
/// none matches.
pub fn categories_of(
    dataset: &coco::Dataset,
    folder: &Path,
    labels: &[String],
) -> anyhow::Result<Vec<Option<u64>>> {
    let category_of: Vec<Option<u64>> = labels
        .iter()
        .map(|l| {
            dataset
                .categories
                .iter()
                .find(|(_, name)| name == l)
                .map(|c| c.0)
        })
        .collect();
    if category_of.iter().all(Option::is_none) {
        bail!(
            "{}: none of the dataset's categories ({}) is one of the model's labels ({})",
            folder.display(),
            dataset
                .categories
                .iter()
                .map(|c| c.1.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            labels.join(", ")
        );
    }
    Ok(category_of)
}

/// The images of `dataset` in `split`; an error when there are none.
pub fn split_images<'d>(
    dataset: &'d coco::Dataset,
    folder: &Path,
    split: Split,
) -> anyhow::Result<Vec<&'d coco::Image>> {
    let images: Vec<&coco::Image> = dataset
        .images
        .iter()
        .filter(|i| {
            let name = i.path.file_name().map(|n| n.to_string_lossy());
            name.is_some_and(|n| split.contains(&n))
        })
        .collect();
    if images.is_empty() {
        bail!("{}: no images in the {split:?} split", folder.display());
    }
    Ok(images)
}

#[derive(Serialize)]
struct Report {
    model: String,
    model_origin: String,
    backend: String,
    #[serde(flatten)]
    backend_use: crate::BackendUse,
    plan_load_ms: Option<f64>,
    dataset: String,
    split: String,
    /// Images scored (a failed image keeps its ground truth: its objects count as missed).
    images: usize,
    #[serde(flatten)]
    scores: CocoScores,
    /// The model's mAP@0.5 on its validation split by this same measure (tiled as here), with
    /// its int8 plan and with float, from its manifest (null where it has none).
    model_validation_map50: Option<f64>,
    model_float_validation_map50: Option<f64>,
    score_threshold: f32,
    nms_iou: f32,
    tile: [usize; 2],
    tile_overlap: u32,
    /// Tiles run, over all frames.
    tiles: usize,
    /// Detections reported, over all frames.
    detections: usize,
    /// Detections dropped because a tile's or frame's list was full.
    overflow: u64,
    /// Per frame: preprocessing, every tile through the model, decoding and merging.
    latency_us: Latency,
    elapsed_s: f64,
    errors: serde_json::Map<String, serde_json::Value>,
    /// Images that could not be decoded or run.
    failures: Vec<Failure>,
    /// Annotations left out or clipped, and images missing on disk, each with the reason.
    skipped: Vec<String>,
    /// The telemetry: detections from the model's reporting threshold up, with a crop of each;
    /// bytes made and sent, the data-reduction ratio, the queue's counts.
    downlink: DownlinkReport,
    /// How every accepted frame ended.
    ledger: LedgerReport,
    /// Scrubbing of the loaded model.
    scrub: crate::eval::ScrubReport,
    /// What was injected (null without `--faults`).
    faults: Option<crate::faults::FaultsReport>,
    /// With `--faults`: mAP@0.5 over the images delivered that no fault touched.
    map50_clean: Option<f64>,
}

/// A frame's samples as its source delivered them: 8-bit from image files, float from a
/// faulty sensor (which may put NaN in them).
enum Samples {
    U8(Vec<u8>),
    F32(Vec<f32>),
    /// Too large to hold ([`WHOLE_IMAGE_SAMPLES`]): read by rows as the detector runs.
    Scene(PathBuf),
}

/// A frame delivered to the detector eval.
struct Delivered {
    geometry: FrameGeometry,
    samples: Samples,
    /// A fault damaged it on purpose (it is left out of `map50_clean`).
    damaged: bool,
}

impl Delivered {
    /// Bytes as the sensor delivered them.
    fn bytes(&self) -> u64 {
        let g = self.geometry;
        match &self.samples {
            Samples::U8(s) => s.len() as u64,
            Samples::F32(s) => 4 * s.len() as u64,
            Samples::Scene(_) => u64::from(g.width) * u64::from(g.height) * u64::from(g.bands),
        }
    }

    /// An RGB picture of it, to cut products from (float samples clamped to 8 bits); none of an
    /// image too large to hold.
    fn picture(&self) -> Option<image::RgbImage> {
        let g = self.geometry;
        match &self.samples {
            Samples::U8(s) => Some(downlink::rgb_image(s, g.width, g.height, g.bands)),
            Samples::F32(s) => {
                let bytes: Vec<u8> = s.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect();
                Some(downlink::rgb_image(&bytes, g.width, g.height, g.bands))
            }
            Samples::Scene(_) => None,
        }
    }
}

/// The frames of a detector eval, in the split's order: each image decoded, or, with frame
/// faults on, delivered as a faulty sensor would (damaged, cut short, the wrong size, NaN,
/// dropped, with stale capture times, which are rejected as the flight pipeline's
/// `monotonic_capture` rejects them). There is no queue here: a burst overflows nothing.
enum Frames<'a> {
    Clean {
        images: &'a [&'a coco::Image],
        next: usize,
    },
    Faulty {
        source: Box<FaultyFolder>,
        buffer: Vec<f32>,
        marks: Arc<Mutex<Marks>>,
        last_capture_us: Option<u64>,
    },
}

impl Frames<'_> {
    /// The next frame: the index of its image and the frame or why it failed; `None` at the
    /// end.
    fn next(&mut self) -> Option<(usize, Result<Delivered, FrameFailure<String>>)> {
        match self {
            Self::Clean { images, next } => {
                let index = *next;
                let image = images.get(index)?;
                *next += 1;
                if let Some(geometry) = too_large_to_hold(&image.path) {
                    let samples = Samples::Scene(image.path.clone());
                    let delivered = Delivered {
                        geometry,
                        samples,
                        damaged: false,
                    };
                    return Some((index, Ok(delivered)));
                }
                let delivered = decode_image(&image.path)
                    .map(|d| Delivered {
                        geometry: d.geometry,
                        samples: Samples::U8(d.samples),
                        damaged: false,
                    })
                    .map_err(|e| FrameFailure::Source(e.reason));
                Some((index, delivered))
            }
            Self::Faulty {
                source,
                buffer,
                marks,
                last_capture_us,
            } => {
                let frame = source.next_frame(buffer);
                let (index, damaged) = {
                    let marks = marks.lock().unwrap_or_else(|p| p.into_inner());
                    let sequence = marks.file_of.len().checked_sub(1)?;
                    let damaged = marks.damaged.contains(&(sequence as u64));
                    (*marks.file_of.get(sequence)?, damaged)
                };
                let frame = match frame {
                    Ok(None) => return None,
                    Ok(Some(frame)) => frame,
                    Err(e) => return Some((index, Err(FrameFailure::Source(e.reason)))),
                };
                let capture_us = frame.meta.capture_us;
                if let Some(previous_us) = last_capture_us.filter(|&p| capture_us <= p) {
                    let stale = FrameFailure::Timestamp {
                        previous_us,
                        capture_us,
                    };
                    return Some((index, Err(stale)));
                }
                *last_capture_us = Some(capture_us);
                let count = frame.geometry.sample_count().unwrap_or(0).min(buffer.len());
                let samples = buffer.get(..count).unwrap_or_default().to_vec();
                Some((
                    index,
                    Ok(Delivered {
                        geometry: frame.geometry,
                        samples: Samples::F32(samples),
                        damaged,
                    }),
                ))
            }
        }
    }
}

/// Run `step` on one frame's samples; its latency, or why it failed.
/// The geometry of the image at `path` when it has more than [`WHOLE_IMAGE_SAMPLES`] samples
/// (from its header).
fn too_large_to_hold(path: &Path) -> Option<FrameGeometry> {
    let reader = kestrel_host::SceneReader::open(path, &Default::default()).ok()?;
    let g = reader.geometry();
    let samples = u64::from(g.width) * u64::from(g.height) * u64::from(g.bands);
    (samples > WHOLE_IMAGE_SAMPLES).then_some(g)
}

fn detect_frame<S: Sample, B: Backend>(
    step: &mut DetectorStep<'_, B, TILE_CAP>,
    geometry: FrameGeometry,
    samples: &[S],
    clock: &HostClock,
    health: &mut Health,
    found: &mut FrameDetections,
) -> Result<u64, FrameFailure<String>> {
    let view = FrameView::new(geometry, samples).map_err(|e| {
        health.record_error(ErrorKind::Frame);
        FrameFailure::Frame(e)
    })?;
    step.process(view, clock, health, found)
        .map_err(FrameFailure::Step)
}

/// Images of more samples than this are read a band of rows at a time by the detector eval,
/// never whole (replay reads every image so): memory then follows their width, not their area.
/// Below it, an image is decoded whole, so that its objects can be cut out as products.
const WHOLE_IMAGE_SAMPLES: u64 = 1 << 26;

/// Every object in the image at `path`, read a band of rows at a time (the rows one tile row
/// needs), into `found`; each row goes to `on_row` as it is read and the tiles done so far to
/// `on_tiles`. The same boxes as [`DetectorStep::detect`] on the whole image.
fn detect_streamed<B: Backend>(
    step: &mut DetectorStep<'_, B, TILE_CAP>,
    path: &Path,
    scan: &kestrel_host::ScanOptions,
    found: &mut FrameDetections,
    mut on_row: impl FnMut(u32, &[u8]),
    mut on_tiles: impl FnMut(usize),
) -> Result<FrameGeometry, FrameFailure<String>> {
    let source = |e: kestrel_host::ImageError| FrameFailure::Source(e.reason);
    let reader = kestrel_host::SceneReader::open(path, scan).map_err(source)?;
    let g = reader.geometry();
    let grid = step.tiles(g.width, g.height).map_err(FrameFailure::Step)?;
    let mut strip = kestrel_host::SceneStrip::new(reader);
    found.clear();
    let columns = grid.columns() as usize;
    for row in 0..grid.rows() {
        let Some(first) = grid.tile(row as usize * columns) else {
            break;
        };
        strip
            .cover(first.y, first.height, &mut on_row)
            .map_err(source)?;
        let (resident, samples, top) = strip.resident();
        let view = FrameView::new(resident, samples).map_err(FrameFailure::Frame)?;
        step.detect_tile_row(view, top, &grid, row, found)
            .map_err(FrameFailure::Step)?;
        on_tiles((row as usize + 1) * columns);
    }
    strip.finish(&mut on_row).map_err(source)?;
    step.finish_frame(g.width, g.height, found);
    Ok(g)
}

/// [`detect_streamed`] for the eval: its latency from `clock`, counted in `health` as
/// [`DetectorStep::process`] counts a frame.
fn detect_scene<B: Backend>(
    step: &mut DetectorStep<'_, B, TILE_CAP>,
    path: &Path,
    clock: &HostClock,
    health: &mut Health,
    found: &mut FrameDetections,
) -> Result<u64, FrameFailure<String>> {
    use kestrel_hal::MonotonicClock;
    let started = clock.now_us();
    let scan = kestrel_host::ScanOptions::default();
    match detect_streamed(step, path, &scan, found, |_, _| {}, |_| {}) {
        Ok(_) => {
            let latency = clock.now_us().saturating_sub(started);
            health.record_done(latency);
            Ok(latency)
        }
        Err(failure) => {
            health.record_error(match &failure {
                FrameFailure::Step(e) => e.kind(),
                FrameFailure::Source(_) => ErrorKind::Source,
                _ => ErrorKind::Frame,
            });
            Err(failure)
        }
    }
}

/// Score a detector on a COCO folder: every image of the split through the tiled detector,
/// COCO mAP against its boxes, a summary on stdout and, if asked, a JSON report.
pub fn evaluate(opts: &EvalOptions) -> anyhow::Result<()> {
    crate::eval::check_report_path(opts.report.as_deref())?;
    let dataset = coco::load(&opts.dataset)?;
    let images = split_images(&dataset, &opts.dataset, opts.split)?;
    let mut detector = Detector::load(&opts.model)?;
    let labels = detector.loaded.model.manifest.labels.clone();
    let category_of = categories_of(&dataset, &opts.dataset, &labels)?;
    let backend_name = detector.loaded.backend.name();
    let plan_load_ms = detector.loaded.plan_load_ms;
    let backend_use = detector.loaded.backend_use.clone();
    let model_name = detector.loaded.model.manifest.name.clone();
    let model_origin = detector.loaded.model.origin.clone();
    let plan_info = detector
        .loaded
        .model
        .manifest
        .plan
        .clone()
        .unwrap_or_default();
    // The downlink reports what the model would report in flight, not the long tail mAP needs.
    let report_threshold = detector.config.score_threshold;
    let config = DetectorConfig {
        score_threshold: opts.score_threshold,
        ..detector.config
    };
    let spec = detector.loaded.model.preprocess_spec()?;
    let mut downlink = Downlink::new(&opts.downlink, &labels)?;
    let switch = detector.loaded.switch.clone();
    let slots = crate::model_slots(&opts.model, &opts.downlink.slots, &detector.loaded.model)?;
    downlink.listen_for_commands(slots, switch, &[Thumbnail])?;
    let controls = downlink.controls();
    eprintln!(
        "sim: detecting in {} images of {} ({:?} split), model {} ({}), backend {}, {}x{} tiles overlapping by {} px",
        images.len(),
        opts.dataset.display(),
        opts.split,
        model_name,
        model_origin,
        backend_name,
        spec.width(),
        spec.height(),
        config.tile_overlap
    );

    let fault_watch = crate::faults::inject_in_place(
        &detector.loaded.model,
        &mut detector.loaded.backend,
        opts.faults.as_ref(),
        crate::rebuild_backend(&opts.model),
        crate::faults::DEADLINE,
    )?;
    let marks = Arc::new(Mutex::new(Marks::default()));
    let mut frames = match opts.faults.as_ref().filter(|f| f.any_frame()) {
        Some(spec) => {
            // A buffer for the largest image of the split, read from the headers.
            let largest = images
                .iter()
                .filter_map(|i| kestrel_host::image_size(&i.path).ok())
                .map(|(w, h)| w as usize * h as usize * 4)
                .max()
                .unwrap_or(0);
            let paths = images.iter().map(|i| i.path.clone()).collect();
            Frames::Faulty {
                source: Box::new(FaultyFolder::new(paths, spec, None, Arc::clone(&marks))),
                buffer: vec![0.0; largest],
                marks: Arc::clone(&marks),
                last_capture_us: None,
            }
        }
        None => Frames::Clean {
            images: &images,
            next: 0,
        },
    };
    let mut damaged_images = BTreeSet::new();
    let mut step = detector.step(opts.score_threshold)?;
    let mut found = FrameDetections::new();
    let clock = HostClock::default();
    let mut health = Health::default();
    let mut latencies = Vec::with_capacity(images.len());
    // Each image's boxes: a re-run after a scrub found the plan corrupt replaces them.
    let mut scored_by_image: Vec<Vec<Scored>> = vec![Vec::new(); images.len()];
    let mut since_scrub: Vec<usize> = Vec::new();
    let mut corrected = 0u64;
    let mut failures = Vec::new();
    let (mut tiles, mut overflow) = (0, 0u64);
    let mut progress = Progress::new(images.len());
    let started = Instant::now();
    // Boxes of `found` on `image`, as scored.
    let boxes = |image: &coco::Image, found: &FrameDetections| -> Vec<Scored> {
        found
            .as_slice()
            .iter()
            .filter_map(|d| {
                let category = (*category_of.get(usize::from(d.class))?)?;
                Some(Scored {
                    image: image.id,
                    category,
                    bbox: [d.x, d.y, d.w, d.h].map(f64::from),
                    score: f64::from(d.score),
                })
            })
            .collect()
    };
    // What goes down: the boxes from the model's reporting threshold up.
    let reported = |found: &FrameDetections| -> Vec<_> {
        found
            .as_slice()
            .iter()
            .filter(|d| d.score >= report_threshold)
            .copied()
            .collect()
    };
    while let Some((done, delivered)) = frames.next() {
        controls.wait_while_paused();
        let Some(image) = images.get(done) else {
            continue;
        };
        health.frames_in += 1;
        let delivered = match delivered {
            Ok(delivered) => delivered,
            Err(failure) => {
                health.record_error(match failure {
                    FrameFailure::Timestamp { .. } => ErrorKind::Timestamp,
                    _ => ErrorKind::Source,
                });
                downlink.frame_in(0);
                downlink.frame_failed(&failure);
                eprintln!("warning: {}: {failure}", image.path.display());
                failures.push(Failure {
                    file: image.path.display().to_string(),
                    reason: failure.to_string(),
                });
                if opts.faults.is_some() {
                    damaged_images.insert(done);
                }
                continue;
            }
        };
        if delivered.damaged {
            damaged_images.insert(done);
        }
        downlink.frame_in(delivered.bytes());
        let g = delivered.geometry;
        tiles += step.tiles(g.width, g.height).map_or(0, |t| t.len());
        let processed = match &delivered.samples {
            Samples::U8(samples) => {
                detect_frame(&mut step, g, samples, &clock, &mut health, &mut found)
            }
            Samples::F32(samples) => {
                detect_frame(&mut step, g, samples, &clock, &mut health, &mut found)
            }
            Samples::Scene(path) => detect_scene(&mut step, path, &clock, &mut health, &mut found),
        };
        match processed {
            Ok(latency) => {
                latencies.push(latency);
                overflow += u64::from(found.overflow());
                scored_by_image[done] = boxes(image, &found);
                let reported = reported(&found);
                let frame = done as u64;
                let thumbnail = downlink.wants(frame, Thumbnail);
                let picture = (thumbnail || !reported.is_empty())
                    .then(|| delivered.picture())
                    .flatten();
                downlink.detections(frame, &reported, picture.as_ref());
                if let Some(picture) = picture.as_ref().filter(|_| thumbnail) {
                    downlink.thumbnail(frame, picture);
                }
            }
            Err(failure) => {
                downlink.frame_failed(&failure);
                eprintln!("warning: {}: {failure}", image.path.display());
                failures.push(Failure {
                    file: image.path.display().to_string(),
                    reason: failure.to_string(),
                });
            }
        }
        since_scrub.push(done);
        let last = done + 1 == images.len();
        if opts.scrub_every > 0 && (since_scrub.len() >= opts.scrub_every as usize || last) {
            // As the threaded pipeline does: a corrupt plan is restored and the frames since
            // the last clean scrub run again, their boxes replacing the first ones.
            for attempt in 0..=3 {
                let at = Instant::now();
                let found_corrupt = FrameStep::<FrameDetections>::backend(&mut step)
                    .map(|b| b.scrub())
                    == Some(Scrub::Corrupt);
                let took = at.elapsed().as_micros() as u64;
                health.scrub.scrubs += 1;
                health.scrub.scrub_us += took;
                health.scrub.max_scrub_us = health.scrub.max_scrub_us.max(took);
                if !found_corrupt {
                    break;
                }
                health.scrub.corrupt += 1;
                let restored =
                    FrameStep::<FrameDetections>::backend(&mut step).map(|b| b.restore());
                if !matches!(restored, Some(Ok(()))) {
                    health.scrub.restore_failures += 1;
                    break;
                }
                health.scrub.restored += 1;
                if attempt == 3 {
                    break;
                }
                // A frame damaged on purpose keeps its first result: the file on disk is not
                // what the sensor delivered.
                for &again in since_scrub.iter().filter(|i| !damaged_images.contains(i)) {
                    let Some(image) = images.get(again) else {
                        continue;
                    };
                    health.scrub.reruns += 1;
                    let rerun = if too_large_to_hold(&image.path).is_some() {
                        let (clock, mut health) = (&clock, Health::default());
                        detect_scene(&mut step, &image.path, clock, &mut health, &mut found).is_ok()
                    } else {
                        let Ok(decoded) = decode_image(&image.path) else {
                            continue;
                        };
                        let Ok(view) = FrameView::new(decoded.geometry, &decoded.samples) else {
                            continue;
                        };
                        step.process(view, &clock, &mut Health::default(), &mut found)
                            .is_ok()
                    };
                    if rerun {
                        let rerun = boxes(image, &found);
                        if rerun != scored_by_image[again] {
                            corrected += 1;
                            scored_by_image[again] = rerun;
                            downlink.detections_correction(again as u64, &reported(&found));
                        }
                    }
                }
            }
            since_scrub.clear();
        }
        let so_far: usize = scored_by_image.iter().map(Vec::len).sum();
        progress.update(done + 1, &format!("{so_far} detections so far"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let uptime_us = (elapsed * 1e6) as u64;
    let downlink = downlink.finish(downlink::health_message(&health, &latencies, uptime_us));
    let scored: Vec<Scored> = scored_by_image.into_iter().flatten().collect();
    let ledger = LedgerReport::from(&downlink.ledger);
    let marks = marks.lock().unwrap_or_else(|p| p.into_inner());
    let delivered: BTreeSet<usize> = match &frames {
        Frames::Faulty { .. } => marks.file_of.iter().copied().collect(),
        Frames::Clean { .. } => (0..images.len()).collect(),
    };
    let faults = opts.faults.as_ref().map(|spec| {
        crate::faults::FaultsReport::new(
            spec,
            &marks.injected,
            damaged_images.len() as u64,
            (images.len() - delivered.len()) as u64,
            fault_watch,
        )
    });
    // mAP over the images delivered that no fault touched.
    let map50_clean = opts.faults.as_ref().map(|_| {
        let clean: Vec<&coco::Image> = images
            .iter()
            .enumerate()
            .filter(|(i, _)| delivered.contains(i) && !damaged_images.contains(i))
            .map(|(_, image)| *image)
            .collect();
        let ids: BTreeSet<u64> = clean.iter().map(|i| i.id).collect();
        let kept: Vec<Scored> = scored
            .iter()
            .filter(|s| ids.contains(&s.image))
            .cloned()
            .collect();
        coco_scores(&dataset, &clean, &kept).map50
    });

    let scores = coco_scores(&dataset, &images, &scored);
    let mut errors = serde_json::Map::new();
    for kind in ErrorKind::ALL {
        errors.insert(kind.name().to_string(), health.errors(kind).into());
    }
    let report = Report {
        model: model_name,
        model_origin,
        backend: backend_name.to_string(),
        backend_use,
        plan_load_ms,
        dataset: opts.dataset.display().to_string(),
        split: format!("{:?}", opts.split).to_lowercase(),
        images: images.len(),
        scores,
        model_validation_map50: plan_info.validation_map50,
        model_float_validation_map50: plan_info.float_validation_map50,
        score_threshold: config.score_threshold,
        nms_iou: config.nms_iou,
        tile: [spec.width(), spec.height()],
        tile_overlap: config.tile_overlap,
        tiles,
        detections: scored.len(),
        overflow,
        latency_us: Latency::of_sorted(&latencies),
        elapsed_s: elapsed,
        errors,
        failures,
        skipped: dataset.skipped,
        downlink,
        ledger,
        scrub: crate::eval::ScrubReport::new(opts.scrub_every, &health.scrub, corrected),
        faults,
        map50_clean,
    };
    print_summary(&report);
    if let Some(path) = &opts.report {
        crate::eval::write_report(path, &report)?;
    }
    Ok(())
}

fn print_summary(r: &Report) {
    println!(
        "frames      {} ({} tiles of {}x{}, {} failed), {} objects in the annotations",
        r.images,
        r.tiles,
        r.tile[0],
        r.tile[1],
        r.failures.len(),
        r.scores.objects
    );
    let reference = match (r.model_validation_map50, r.model_float_validation_map50) {
        (Some(int8), Some(float)) => format!(
            "; the model's validation mAP@0.5, tiled as here, is {int8:.3} int8, {float:.3} float"
        ),
        (Some(map), None) | (None, Some(map)) => {
            format!("; the model's validation mAP@0.5, tiled as here, is {map:.3}")
        }
        (None, None) => String::new(),
    };
    println!(
        "mAP         {:.3} at IoU 0.5, {:.3} at 0.50:0.95 ({} split of {}{reference})",
        r.scores.map50, r.scores.map50_95, r.split, r.dataset
    );
    let per_class: Vec<String> = r
        .scores
        .per_class_ap50
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|v| format!("{k} {v:.2}")))
        .collect();
    println!("AP50        {}", per_class.join(", "));
    println!(
        "latency     p50 {:.1} ms, p99 {:.1} ms per frame ({} backend: tiles, model, decoding, merging)",
        r.latency_us.p50 as f64 / 1000.0,
        r.latency_us.p99 as f64 / 1000.0,
        r.backend
    );
    println!(
        "detections  {} at score >= {} ({} over capacity)",
        r.detections, r.score_threshold, r.overflow
    );
    downlink::print_summary(&r.downlink);
    crate::eval::print_ledger(&r.ledger);
    if let (Some(f), Some(clean)) = (&r.faults, r.map50_clean) {
        println!(
            "faults      {}: {} frames damaged on purpose, {} never delivered; mAP@0.5 on the rest {clean:.3}",
            f.spec, f.damaged_frames, f.dropouts
        );
    }
    crate::eval::print_upsets_and_scrub(r.faults.as_ref(), &r.scrub);
    if !r.skipped.is_empty() {
        println!(
            "skipped     {} annotation problem(s), listed in the report",
            r.skipped.len()
        );
    }
}

/// `sim replay` with a detector: each image's boxes drawn into `<out>/<stem>.boxes.png` and
/// listed in `<out>/<stem>.detections.json`.
pub fn replay(
    args: &crate::ReplayArgs,
    files: &[PathBuf],
    downlink: &mut Downlink,
) -> anyhow::Result<usize> {
    let model = &args.model;
    let mut detector = Detector::load(model)?;
    let switch = detector.loaded.switch.clone();
    let slots = crate::model_slots(model, &downlink.args().slots, &detector.loaded.model)?;
    downlink.listen_for_commands(slots, switch, &[Thumbnail])?;
    let controls = downlink.controls();
    let labels = detector.loaded.model.manifest.labels.clone();
    let model_name = detector.loaded.model.manifest.name.clone();
    let threshold = detector.config.score_threshold;
    let mut step = detector.step(threshold)?;
    println!("legend: {}", crate::draw::legend(&labels));
    let mut found = FrameDetections::new();
    let mut failed = 0;
    for (frame, path) in files.iter().enumerate() {
        controls.wait_while_paused();
        let result = replay_image(path, &mut step, &labels, &model_name, args, &mut found);
        match result {
            Ok((raw_bytes, picture, factor)) => {
                let frame = frame as u64;
                downlink.frame_in(raw_bytes);
                // Crops of the objects need the image at full resolution.
                let full = (factor == 1).then_some(&picture);
                downlink.detections(frame, found.as_slice(), full);
                if downlink.wants(frame, Thumbnail) {
                    downlink.thumbnail(frame, &picture);
                }
            }
            Err(e) => {
                eprintln!("warning: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(failed)
}

/// `<image>.detections.json`: which image, its size, the box convention, and the boxes.
#[derive(Serialize)]
struct DetectionsJson<'a> {
    image: String,
    width: u32,
    height: u32,
    model: &'a str,
    /// How `bbox` reads (COCO's convention).
    bbox_format: &'static str,
    detections: Vec<DetectionJson<'a>>,
}

#[derive(Serialize)]
struct DetectionJson<'a> {
    label: &'a str,
    class: u16,
    score: f32,
    /// `[x, y, width, height]` in image pixels.
    bbox: [f32; 4],
}

fn replay_image<B: Backend>(
    path: &Path,
    step: &mut DetectorStep<'_, B, TILE_CAP>,
    labels: &[String],
    model_name: &str,
    args: &crate::ReplayArgs,
    found: &mut FrameDetections,
) -> anyhow::Result<(u64, image::RgbImage, u32)> {
    use crate::scene::{shrink_factor, Progress, Shrunk};
    let started = Instant::now();
    let scan = crate::replay::scan_options(args);
    let g = kestrel_host::SceneReader::open(path, &scan)?.geometry();
    let tiles = step.tiles(g.width, g.height)?.len();
    let mut shrunk = Shrunk::new(g, shrink_factor(g.width, g.height, args.map_side));
    let mut progress = Progress::new(path.display().to_string(), tiles);
    detect_streamed(
        step,
        path,
        &scan,
        found,
        |y, samples| shrunk.push_row(y, samples),
        |done| progress.update(done),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let factor = shrunk.factor();
    let plain = shrunk.into_image();
    let mut picture = plain.clone();
    let scale = 1.0 / factor as f32;
    let drawn: Vec<_> = found
        .as_slice()
        .iter()
        .map(|d| kestrel_runtime::detect::Detection {
            x: d.x * scale,
            y: d.y * scale,
            w: d.w * scale,
            h: d.h * scale,
            ..*d
        })
        .collect();
    crate::draw::detections(&mut picture, &drawn, labels);
    let png = crate::replay::output_path(&args.out, path, "boxes.png");
    picture
        .save(&png)
        .with_context(|| format!("{}: cannot write", png.display()))?;
    let detections: Vec<DetectionJson> = found
        .as_slice()
        .iter()
        .map(|d| DetectionJson {
            label: labels.get(usize::from(d.class)).map_or("?", String::as_str),
            class: d.class,
            score: d.score,
            bbox: [d.x, d.y, d.w, d.h],
        })
        .collect();
    let list = DetectionsJson {
        image: path.display().to_string(),
        width: g.width,
        height: g.height,
        model: model_name,
        bbox_format:
            "[x, y, width, height] in pixels, (x, y) the top-left corner, from the image's top-left",
        detections,
    };
    let json = crate::replay::output_path(&args.out, path, "detections.json");
    std::fs::write(&json, serde_json::to_string_pretty(&list)? + "\n")
        .with_context(|| format!("{}: cannot write", json.display()))?;
    let mut counts = vec![0usize; labels.len()];
    for d in found.as_slice() {
        if let Some(n) = counts.get_mut(usize::from(d.class)) {
            *n += 1;
        }
    }
    let mix: Vec<String> = counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{} {n}", labels[c]))
        .collect();
    println!(
        "{}: {}x{}, {tiles} tile(s): {} object(s) ({}) [{:.0} ms] -> {}{}",
        path.display(),
        g.width,
        g.height,
        found.as_slice().len(),
        if mix.is_empty() {
            "none".to_string()
        } else {
            mix.join(", ")
        },
        started.elapsed().as_secs_f64() * 1000.0,
        png.display(),
        if factor > 1 {
            format!(", drawn 1:{factor}")
        } else {
            String::new()
        }
    );
    let raw_bytes = u64::from(g.width) * u64::from(g.height) * u64::from(g.bands);
    Ok((raw_bytes, plain, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendChoice;

    /// Read a band of rows at a time or decoded whole, a scene gives the same boxes, bit for
    /// bit, and every row is handed over once.
    #[test]
    fn a_scene_read_by_rows_gives_the_boxes_of_the_whole_image() {
        let scene = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/nwpu-vhr10/images/017.jpg");
        let args = ModelArgs::new(models::DEFAULT_DETECTOR.into(), BackendChoice::Int8Cpu);
        let mut detector = Detector::load(&args).unwrap();
        let mut step = detector.step(0.05).unwrap();
        let image = decode_image(&scene).unwrap();
        let view = FrameView::new(image.geometry, &image.samples).unwrap();
        let mut whole = FrameDetections::new();
        step.detect(view, &mut whole).unwrap();

        let mut by_rows = FrameDetections::new();
        let (mut rows, mut tiles) = (Vec::new(), 0);
        let scan = kestrel_host::ScanOptions::default();
        let g = detect_streamed(
            &mut step,
            &scene,
            &scan,
            &mut by_rows,
            |y, _| rows.push(y),
            |done| tiles = done,
        )
        .unwrap();
        assert_eq!(g, image.geometry);
        assert!(whole.as_slice().len() > 10, "{}", whole.as_slice().len());
        assert_eq!(whole.as_slice(), by_rows.as_slice());
        assert_eq!(rows, (0..g.height).collect::<Vec<_>>());
        assert_eq!(tiles, step.tiles(g.width, g.height).unwrap().len());
    }
}
