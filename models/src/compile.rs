//! The plan compiler: ONNX and a folder of calibration images in, a verified int8 plan out.
//!
//! 1. Import the ONNX graph (BatchNorm folded) and read its manifest.
//! 2. Decode and preprocess the calibration images exactly as the runtime does.
//! 3. Calibrate every activation (two passes), quantise, fuse, plan the arena, encode the plan.
//! 4. Load the plan back and run it next to tract's float model on the same images: top-1
//!    agreement, and accuracy of both when the images sit in class folders named as labels.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kestrel_backend::{Backend, PreprocessSpec, MAX_BANDS};
use kestrel_eval::Split;
use kestrel_host::decode_image;
use kestrel_ops::int16::Width;
use kestrel_ops::table::KernelTable;
use kestrel_plan::cpu::Int8Cpu;
use kestrel_plan::plan::{DetectorHeader, PlanHeader};
use kestrel_plan::program::{OwnedProgram, ProgramError};
use kestrel_runtime::detect::{Detection, Detections};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use kestrel_runtime::step::DetectorConfig;
use kestrel_runtime::FrameGeometry;
use serde::Serialize;

use crate::calibrate::{ActivationQuant, Calibrator, ChannelMeans, Method};
use crate::graph::{Graph, ImportError, Op};
use crate::quantize::{bias_corrected, QuantizedGraph};
use crate::{ModelError, ZooModel};

/// Why a plan could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The model or its manifest.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The ONNX graph.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The calibration folder cannot be read.
    #[error("calibration folder {}: cannot read: {reason}", path.display())]
    CalibrationUnreadable {
        /// The folder.
        path: PathBuf,
        /// The I/O error (in the message, not the error's source: printed once).
        reason: std::io::Error,
    },
    /// The calibration folder holds no images (in the chosen split).
    #[error("calibration folder {} has no PNG or JPEG images{detail}", path.display())]
    CalibrationEmpty {
        /// The folder.
        path: PathBuf,
        /// The split, when one was chosen.
        detail: String,
    },
    /// Not one calibration image could be used.
    #[error("none of the {tried} calibration images could be used; first: {first}")]
    NoUsableImages {
        /// Images tried.
        tried: usize,
        /// The first failure.
        first: String,
    },
    /// The plan written does not load (a compiler bug, reported rather than shipped).
    #[error("the compiled plan does not load: {0}")]
    Plan(#[from] ProgramError),
    /// The float reference failed.
    #[error("tract reference: {0}")]
    Reference(String),
}

/// Compiler settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// How activation ranges are chosen. `None`: each of [`RANGE_METHODS`], the plan closest
    /// to tract's on the calibration images written ([`RangeTrial`]).
    pub method: Option<Method>,
    /// At most this many calibration images, spread evenly over the folder.
    pub max_images: usize,
    /// Which split of the calibration folder to use.
    pub split: Split,
    /// A function table (Sigmoid, SiLU, HardSwish...) whose int8 output adds at least this
    /// relative RMS error (its [`LayerError::added`] in an all-int8 plan; 0 takes every
    /// table) is kept at 16 bits,
    /// where every reader of it is a Conv, GlobalAveragePool or Mul: they read the function's
    /// input codes through a 16-bit table instead. `None`: every activation int8.
    pub widen_above: Option<f64>,
    /// Where the (possibly widened) int8 plan's output is at least this relative RMS error
    /// away from tract's on the calibration images, a plan with 16-bit activations
    /// ([`QuantizedGraph::build_16_bit`]) is tried and kept if it agrees with tract at least
    /// as often and its output's error is at least [`Options::min_error_reduction`] lower.
    /// `None`: never.
    pub int16_above: Option<f64>,
    /// How much lower (relative) a wider plan's output error against tract's must be than the
    /// int8 plan's for the compiler to write it ([`MIN_ERROR_REDUCTION`]; 0: any closer plan).
    pub min_error_reduction: f64,
    /// Verify plans whose biases are corrected for the mean error of the int8 weights and
    /// inputs ([`crate::quantize::bias_corrected`]; the inputs' means estimated, or measured on
    /// the plan) and write the closest where it agrees with tract nearly as often
    /// ([`AGREEMENT_SLACK`]) and is closer than the uncorrected plan ([`BiasCorrectionTrial`];
    /// a 16-bit plan takes the weights' term only). `false`: the model's own biases.
    pub bias_correction: bool,
}

/// The range methods the compiler tries when none is named: percentile clipping (it gives the
/// outlier-free bulk of most networks' tensors more resolution), the observed minimum and
/// maximum, and the least squared error per tensor. Each suits some networks: on 2,000
/// training chips none was calibrated on, the fine-tuned MobileNetV3-small's output error was
/// 0.066 with percentile ranges against 0.095 and 0.072, resnet18's 0.028 against 0.020 and
/// 0.019 (BENCHMARKS.md).
pub const RANGE_METHODS: [Method; 3] = [Method::Percentile(0.01), Method::MinMax, Method::Mse];

/// [`Options::widen_above`]'s default: a table adding 1% relative RMS error or more.
pub const WIDEN_ABOVE: f64 = 0.01;

/// [`Options::int16_above`]'s default: an int8 output 15% (relative RMS) away from float.
/// The suite's other models sit at 4 to 8%, the fine-tuned EfficientNet-B0 at 30%
/// (BENCHMARKS.md); 16-bit layers run the generic kernels, so they are for models int8 fails.
pub const INT16_ABOVE: f64 = 0.15;

impl Default for Options {
    fn default() -> Self {
        Self {
            method: None,
            max_images: 200,
            split: Split::All,
            widen_above: Some(WIDEN_ABOVE),
            int16_above: Some(INT16_ABOVE),
            min_error_reduction: MIN_ERROR_REDUCTION,
            bias_correction: true,
        }
    }
}

/// What the compiler did and measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// Calibration method of the plan written.
    pub method: String,
    /// The range methods compared, where none was named ([`Options::method`]).
    pub ranges: Vec<RangeTrial>,
    /// The plan with bias correction against the plan without
    /// ([`crate::quantize::bias_corrected`]), unless [`Options::bias_correction`] is off.
    pub bias_correction: Option<BiasCorrectionTrial>,
    /// Images calibrated and verified on.
    pub calibration_images: usize,
    /// Images that could not be used, with the reason.
    pub skipped: Vec<String>,
    /// Int8 program steps.
    pub steps: usize,
    /// Bytes of the plan file.
    pub plan_bytes: usize,
    /// Bytes of activation arena the plan needs.
    pub arena_bytes: usize,
    /// Bits of each output code: 16 for a classifier's logits where the layers writing them
    /// have 16-bit kernels, else 8.
    pub output_bits: usize,
    /// Classifiers: the fraction of images where the plan's top-1 equals tract's.
    pub top1_agreement: Option<f64>,
    /// Detectors: of the boxes tract's head gives on the calibration images (decoded at the
    /// manifest's threshold and suppressed, a tile each), the fraction the plan's head gives
    /// too: the same class, IoU at least 0.5.
    pub box_agreement: Option<f64>,
    /// Detectors: the boxes tract's head gives on the calibration images.
    pub float_boxes: usize,
    /// RMS of (plan output - tract output) over the RMS of tract's output, over all images:
    /// how far the int8 plan's raw output is from float (what a detector's head is judged by).
    pub output_rel_rms: f64,
    /// tract's top-1 accuracy, when the images are labelled.
    pub float_top1: Option<f64>,
    /// The plan's top-1 accuracy, when the images are labelled.
    pub int8_top1: Option<f64>,
    /// `int8_top1 - float_top1` in percentage points.
    pub delta_points: Option<f64>,
    /// Wall time of the whole compile.
    pub seconds: f64,
    /// How far each layer's int8 output is from the float graph's, in program order: where the
    /// quantisation error comes from.
    pub layers: Vec<LayerError>,
    /// The function tables kept at 16 bits ([`Options::widen_above`]), each with the error its
    /// int8 output added in the all-int8 plan.
    pub widened: Vec<LayerError>,
    /// How the plan with the chosen tables at 16 bits compared with the all-int8 plan, when
    /// any were chosen.
    pub widening: Option<WideningTrial>,
    /// The trial of 16-bit activations ([`Options::int16_above`]), where one was made.
    pub int16: Option<Int16Trial>,
}

/// [`Options::min_error_reduction`]'s default. How much lower (relative) a wider plan's output
/// error against tract's must be than the int8 plan's for the compiler to write it: the wider
/// layers are slower (16-bit-input layers run the generic kernels on the CPU: YOLOv8n at 640
/// kept one Sigmoid at 16 bits for an error 0.1275 -> 0.1274 and its next Conv took 133 ms of
/// the plan's 177), so a plan closer by a hair is not worth them.
pub const MIN_ERROR_REDUCTION: f64 = 0.05;

/// The all-int8 plan against the plan with some function tables at 16 bits, on the
/// calibration images: the wider plan is kept only where it is closer to float
/// ([`Options::min_error_reduction`]).
#[derive(Clone, Debug, Serialize)]
pub struct WideningTrial {
    /// Tables chosen to be kept at 16 bits.
    pub tables: usize,
    /// Top-1 (classifiers) or box (detectors) agreement with tract: all-int8, then wider.
    pub agreement: [f64; 2],
    /// Output relative RMS error against tract: all-int8, then wider.
    pub output_rel_rms: [f64; 2],
    /// Whether the wider plan is the one written: it agrees with tract nearly as often
    /// ([`AGREEMENT_SLACK`]) and its output's error is at least
    /// [`Options::min_error_reduction`] lower.
    pub kept: bool,
}

/// The plan with the model's biases against two plans with corrected biases
/// ([`crate::quantize::bias_corrected`]), all with the chosen ranges, on the calibration
/// images: the int8 inputs' channel means estimated (the float values rounded to their int8
/// grids), or measured on the plan itself, layer by layer (`measured_bias_correction`).
/// Of the corrected plans that agree with tract nearly as often as the uncorrected one
/// ([`AGREEMENT_SLACK`]) and are closer, the closest is written: correction costs nothing at
/// run time.
#[derive(Clone, Debug, Serialize)]
pub struct BiasCorrectionTrial {
    /// Top-1 (classifiers) or box (detectors) agreement with tract: the model's biases, then
    /// corrected by estimated means, then by measured means.
    pub agreement: [f64; 3],
    /// Output relative RMS error against tract, in the same order.
    pub output_rel_rms: [f64; 3],
    /// Which plan is written: 0 the model's biases, 1 estimated, 2 measured.
    pub written: usize,
}

/// Calibration images at most over which `measured_bias_correction` measures a plan's
/// channel means, once per layer with weights (a plan run per image and layer: the fine-tuned
/// MobileNetV2-64's 53 layers on 200 images took its compile from 17 s to 47 s). On 64 images,
/// the class-spread sample, ShuffleNet's and MobileNetV3-small's measured plans verified no
/// closer than their uncorrected ones; on 200 both did.
pub const MEASURED_MEAN_IMAGES: usize = 200;

/// The plan calibrated by one of [`RANGE_METHODS`], on the calibration images. The plan written
/// is, of those that agree with tract nearly as often as the first method's
/// ([`AGREEMENT_SLACK`]), the one whose output is closest to tract's.
#[derive(Clone, Debug, Serialize)]
pub struct RangeTrial {
    /// The method.
    pub method: String,
    /// Top-1 (classifiers) or box (detectors) agreement with tract.
    pub agreement: f64,
    /// Output relative RMS error against tract.
    pub output_rel_rms: f64,
    /// Whether this is the int8 plan carried on: to the wider trials, and written unless one
    /// of them is.
    pub kept: bool,
    /// Why no plan could be built with these ranges, where it could not.
    pub failed: Option<String>,
}

/// The int8 plan against one with 16-bit activations on the calibration images.
#[derive(Clone, Debug, Serialize)]
pub struct Int16Trial {
    /// Tensors at 16 bits in the trial plan (0 where it could not be built).
    pub tensors: usize,
    /// Top-1 (classifiers) or box (detectors) agreement with tract: int8, then 16-bit.
    pub agreement: [f64; 2],
    /// Output relative RMS error against tract: int8, then 16-bit.
    pub output_rel_rms: [f64; 2],
    /// Whether the 16-bit plan is the one written.
    pub kept: bool,
    /// Why no 16-bit plan could be built, where it could not.
    pub failed: Option<String>,
}

/// How many fewer calibration images (or boxes) a plan may agree with tract on than another
/// and still be written for a lower output error. The error is measured on every value of every
/// image; one image's top-1 flipping, of a few hundred, is noise. Measured on the fine-tuned
/// MobileNetV2 with 16-bit logits and 200 calibration chips: mse's ranges agree on 197 against
/// percentile's 198 (output error 0.0426 against 0.0457); with biases corrected by measured
/// means, on 196 against the uncorrected plan's 197 (0.0379 against 0.0426; by estimated means
/// 198, 0.0403). Without slack
/// percentile's ranges and estimated means were written: 1,946 of 2,000 held-out training
/// chips agreed with tract; with it, mse's and measured means: 1,966.
pub const AGREEMENT_SLACK: usize = 1;

/// A plan's outputs against tract's on the calibration images.
struct Verification {
    agree: usize,
    float_right: usize,
    int8_right: usize,
    labelled: usize,
    float_boxes: usize,
    boxes_matched: usize,
    error_squares: f64,
    float_squares: f64,
    images: usize,
    detector: bool,
}

impl Verification {
    /// Top-1 agreement (classifiers) or the fraction of tract's boxes found (detectors).
    fn agreement(&self) -> f64 {
        if self.detector {
            self.boxes_matched as f64 / self.float_boxes.max(1) as f64
        } else {
            self.agree as f64 / self.images.max(1) as f64
        }
    }

    fn output_rel_rms(&self) -> f64 {
        (self.error_squares / self.float_squares.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Images (classifiers) or boxes (detectors) where the plan agrees with tract.
    fn agreeing(&self) -> usize {
        if self.detector {
            self.boxes_matched
        } else {
            self.agree
        }
    }

    /// Agrees with tract on at most [`AGREEMENT_SLACK`] fewer images (or boxes) than
    /// `agreeing`, another plan's count.
    fn agrees_nearly_as_often(&self, agreeing: usize) -> bool {
        self.agreeing() + AGREEMENT_SLACK >= agreeing
    }

    /// Agrees with tract nearly as often ([`Verification::agrees_nearly_as_often`]), and its
    /// output's error is at least `reduction` (relative) lower.
    fn closer_than(&self, other: &Self, reduction: f64) -> bool {
        self.agrees_nearly_as_often(other.agreeing())
            && self.output_rel_rms() < other.output_rel_rms()
            && self.output_rel_rms() <= (1.0 - reduction) * other.output_rel_rms()
    }
}

/// Run `plan` on every input and compare with tract's `float_outputs`.
fn verify(
    plan: &[u8],
    inputs: &[(Vec<f32>, Option<usize>)],
    float_outputs: &[Vec<f32>],
    detector: Option<&DetectorConfig>,
) -> Result<Verification, CompileError> {
    let mut int8 = Int8Cpu::from_bytes(plan)?;
    let mut int8_out = vec![0.0; int8.output_len()];
    let mut v = Verification {
        agree: 0,
        float_right: 0,
        int8_right: 0,
        labelled: 0,
        float_boxes: 0,
        boxes_matched: 0,
        error_squares: 0.0,
        float_squares: 0.0,
        images: inputs.len(),
        detector: detector.is_some(),
    };
    for ((input, label), float_out) in inputs.iter().zip(float_outputs) {
        int8.run(input, &mut int8_out)
            .map_err(|e| CompileError::Reference(format!("plan: {e}")))?;
        for (f, q) in float_out.iter().zip(&int8_out) {
            v.error_squares += f64::from(q - f).powi(2);
            v.float_squares += f64::from(*f).powi(2);
        }
        if let Some(config) = detector {
            let float_found = tile_boxes(config, float_out)?;
            v.float_boxes += float_found.len();
            v.boxes_matched += matched_boxes(&float_found, &tile_boxes(config, &int8_out)?);
            continue;
        }
        let (f, q) = (argmax(float_out), argmax(&int8_out));
        v.agree += usize::from(f == q);
        if let Some(label) = label {
            v.labelled += 1;
            v.float_right += usize::from(f == *label);
            v.int8_right += usize::from(q == *label);
        }
    }
    Ok(v)
}

/// Verification images the per-layer errors are measured on: the float graph's interpreter is
/// slow on large models, and the errors settle long before this.
pub const LAYER_ERROR_IMAGES: usize = 16;

/// The quantisation error at one layer's output, over the first [`LAYER_ERROR_IMAGES`]
/// verification images.
#[derive(Clone, Debug, Serialize)]
pub struct LayerError {
    /// The ONNX node (the first of those fused into the layer).
    pub node: String,
    /// The int8 operator.
    pub op: &'static str,
    /// RMS of (dequantised int8 output - float output) over the RMS of the float output: the
    /// error accumulated up to here.
    pub rel_rms: f64,
    /// `rel_rms` minus the largest of its inputs': the error this layer adds.
    pub added: f64,
}

/// One image of a calibration folder.
pub struct CalibrationImage {
    /// Where it is.
    pub path: PathBuf,
    /// Its class folder's index among the model's labels, if it is in one.
    pub label: Option<usize>,
}

/// Images directly in `dir` and in its sub-folders (one level: class folders); a sub-folder
/// named as a label labels its images.
pub fn calibration_images(
    dir: &Path,
    labels: &[String],
    split: Split,
) -> Result<Vec<CalibrationImage>, CompileError> {
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::CalibrationUnreadable {
            path,
            reason: source,
        }
    };
    let list = |dir: &Path| -> Result<Vec<PathBuf>, CompileError> {
        let mut paths = std::fs::read_dir(dir)
            .map_err(unreadable(dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable(dir))?;
        paths.sort();
        Ok(paths)
    };
    let is_image = |p: &Path| {
        p.is_file()
            && p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| split.contains(n))
    };
    let mut images = Vec::new();
    for path in list(dir)? {
        if path.is_dir() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let label = labels.iter().position(|l| Some(l) == name.as_ref());
            for file in list(&path)?.into_iter().filter(|p| is_image(p)) {
                images.push(CalibrationImage { path: file, label });
            }
        } else if is_image(&path) {
            images.push(CalibrationImage { path, label: None });
        }
    }
    if images.is_empty() {
        return Err(CompileError::CalibrationEmpty {
            path: dir.to_path_buf(),
            detail: match split {
                Split::All => String::new(),
                other => format!(" in the {other:?} split"),
            },
        });
    }
    Ok(images)
}

fn method_name(method: Method) -> String {
    match method {
        Method::MinMax => "minmax".into(),
        Method::Percentile(p) => format!("percentile {p}%"),
        Method::Entropy => "entropy".into(),
        Method::Mse => "mse".into(),
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |m| m.0)
}

/// The model's input tensor for the calibration image at `path`: decoded and preprocessed,
/// cut to what the model calibrates on (a classifier the whole image, a detector its centre
/// tile).
pub fn calibration_input(
    model: &ZooModel,
    spec: &PreprocessSpec,
    path: &Path,
) -> Result<Vec<f32>, String> {
    let decoded = decode_image(path).map_err(|e| e.to_string())?;
    let g = decoded.geometry;
    let view = FrameView::new(g, &decoded.samples).map_err(|e| e.to_string())?;
    let mut input = vec![0.0; spec.input_len()];
    prepare_input(view, calibration_region(model, spec, g), spec, &mut input)
        .map_err(|e| e.to_string())?;
    Ok(input)
}

/// What of a calibration image the model sees: a classifier the whole image resized to its
/// input; a detector, which runs on tiles at the image's own scale, the centre tile.
fn calibration_region(model: &ZooModel, spec: &PreprocessSpec, image: FrameGeometry) -> Region {
    if model.manifest.task != "detect" {
        return Region::whole(image.width, image.height);
    }
    let (width, height) = (spec.width() as u32, spec.height() as u32);
    Region {
        x: image.width.saturating_sub(width) / 2,
        y: image.height.saturating_sub(height) / 2,
        width,
        height,
    }
}

/// A detector head's boxes, decoded and suppressed as `DetectorStep` does for one tile.
fn tile_boxes(config: &DetectorConfig, head: &[f32]) -> Result<Vec<Detection>, CompileError> {
    let mut found = Detections::<4096>::new();
    config
        .head
        .decode(head, config.score_threshold, &mut found)
        .map_err(|e| CompileError::Reference(e.to_string()))?;
    found.suppress(config.nms_iou);
    Ok(found.as_slice().to_vec())
}

/// How many of `reference`'s boxes `other` has too: the same class and IoU at least 0.5, each
/// of `other`'s boxes matched once (to its best remaining overlap).
fn matched_boxes(reference: &[Detection], other: &[Detection]) -> usize {
    let mut used = vec![false; other.len()];
    let mut matched = 0;
    for r in reference {
        let best = other
            .iter()
            .enumerate()
            .filter(|&(i, o)| !used[i] && o.class == r.class && o.iou(r) >= 0.5)
            .max_by(|a, b| a.1.iou(r).total_cmp(&b.1.iou(r)));
        if let Some((i, _)) = best {
            used[i] = true;
            matched += 1;
        }
    }
    matched
}

/// Encode `program` as a plan for `model`: its name, ONNX hash, preprocessing and labels, and a
/// detector's postprocessing.
pub fn encode(model: &ZooModel, program: &QuantizedGraph) -> Result<Vec<u8>, ImportError> {
    let p = &model.manifest.preprocess;
    let mut mean = [0.0; MAX_BANDS];
    let mut std = [1.0; MAX_BANDS];
    mean[..p.mean.len()].copy_from_slice(&p.mean);
    std[..p.std.len()].copy_from_slice(&p.std);
    let labels = model.manifest.labels.join("\n");
    let shape = &model.manifest.input.shape;
    let detector = match &model.manifest.detector {
        None => None,
        Some(d) => Some(DetectorHeader {
            head: d
                .head_header(shape[2], shape[3])
                .map_err(|reason| ImportError::Malformed {
                    node: "manifest".into(),
                    reason,
                })?,
            score_threshold: d.score_threshold,
            nms_iou: d.nms_iou,
            tile_overlap: d.tile_overlap,
            seam_containment: d.seam_containment,
            max_per_class: d.max_per_class,
        }),
    };
    // Shapes, quantisation and the arena are filled in from the program by `to_plan`.
    let header = PlanHeader {
        name: &model.manifest.name,
        onnx_sha256: &model.manifest.onnx_sha256,
        input_shape: [shape[0], shape[1], shape[2], shape[3]].map(|d| d as u32),
        output_len: 0,
        bands: p.mean.len() as u8,
        mean,
        std,
        resize: u8::from(p.resize != "nearest"),
        labels: &labels,
        arena_size: 0,
        output_tensor: 0,
        input_scale: 1.0,
        input_zero_point: 0,
        output_scale: 1.0,
        output_zero_point: 0,
        output_softmax: false,
        detector,
    };
    program.to_plan(&header)
}

/// Compile `model` into plan bytes, calibrating and verifying on the images in `calibration`.
/// `progress` is told about each phase.
pub fn compile(
    model: &ZooModel,
    calibration: &Path,
    options: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<u8>, Report), CompileError> {
    let started = Instant::now();
    let graph = model.graph()?;
    let spec = model.preprocess_spec().map_err(|e| ModelError::Manifest {
        origin: model.origin.clone(),
        reason: e.to_string(),
    })?;
    let all = calibration_images(calibration, &model.manifest.labels, options.split)?;
    let stride = (all.len() / options.max_images.max(1)).max(1);
    let chosen: Vec<&CalibrationImage> = all
        .iter()
        .step_by(stride)
        .take(options.max_images)
        .collect();

    progress(&format!("decoding {} calibration images", chosen.len()));
    let mut skipped = Vec::new();
    let mut inputs = Vec::new();
    for image in &chosen {
        match calibration_input(model, &spec, &image.path) {
            Ok(tensor) => inputs.push((tensor, image.label)),
            Err(reason) => skipped.push(format!("{}: {reason}", image.path.display())),
        }
    }
    if inputs.is_empty() {
        return Err(CompileError::NoUsableImages {
            tried: chosen.len(),
            first: skipped.first().cloned().unwrap_or_default(),
        });
    }

    progress("calibrating activations (two passes over the float graph)");
    let mut calibrator = Calibrator::new(graph.shapes.len());
    for (input, _) in &inputs {
        calibrator.observe_range(&graph.run_f32(input));
    }
    for (input, _) in &inputs {
        calibrator.observe_histogram(&graph.run_f32(input));
    }
    let detector = model.detector_config();
    // Min-max ranges: of 16-bit values, and of a classifier's logits, which are 16-bit in
    // every plan (a detector's head stays int8: the GPU's peak search reads its codes).
    let minmax = calibrator.finish(Method::MinMax);
    let logits = detector.is_none().then_some(minmax.as_slice());
    let build = |graph: &Graph, params: &[ActivationQuant]| {
        QuantizedGraph::build_widened(graph, params, &BTreeSet::new(), logits)
    };
    let mut method = options.method.unwrap_or(RANGE_METHODS[0]);
    let mut params = calibrator.finish(method);
    let mut program = build(&graph, &params)?;
    let mut plan = encode(model, &program)?;

    progress("verifying the plan against tract on the calibration images");
    let mut float = model
        .tract_backend()
        .map_err(|e| CompileError::Reference(e.to_string()))?;
    let mut float_outputs = Vec::with_capacity(inputs.len());
    for (input, _) in &inputs {
        let mut out = vec![0.0; float.output_len()];
        float
            .run(input, &mut out)
            .map_err(|e| CompileError::Reference(e.to_string()))?;
        float_outputs.push(out);
    }
    let verify = |plan: &[u8]| verify(plan, &inputs, &float_outputs, detector.as_ref());
    let mut verified = verify(&plan)?;
    let mut ranges = Vec::new();
    if options.method.is_none() {
        ranges.push(RangeTrial {
            method: method_name(method),
            agreement: verified.agreement(),
            output_rel_rms: verified.output_rel_rms(),
            kept: true,
            failed: None,
        });
        let baseline = verified.agreeing();
        for other in RANGE_METHODS.into_iter().skip(1) {
            progress(&format!(
                "verifying a plan calibrated by {} instead",
                method_name(other)
            ));
            let mut trial = RangeTrial {
                method: method_name(other),
                agreement: 0.0,
                output_rel_rms: f64::INFINITY,
                kept: false,
                failed: None,
            };
            let other_params = calibrator.finish(other);
            let built =
                build(&graph, &other_params).and_then(|p| encode(model, &p).map(|plan| (p, plan)));
            match built {
                Ok((other_program, other_plan)) => {
                    let v = verify(&other_plan)?;
                    (trial.agreement, trial.output_rel_rms) = (v.agreement(), v.output_rel_rms());
                    trial.kept = v.agrees_nearly_as_often(baseline)
                        && v.output_rel_rms() < verified.output_rel_rms();
                    if trial.kept {
                        ranges.iter_mut().for_each(|t| t.kept = false);
                        (method, params) = (other, other_params);
                        (program, plan, verified) = (other_program, other_plan, v);
                    }
                }
                Err(e) => trial.failed = Some(e.to_string()),
            }
            ranges.push(trial);
        }
    }
    // The graph the plans are quantised from: `graph`, or with its biases corrected for the
    // mean error of the int8 weights and inputs where that brings the plan closer to tract.
    let mut source = Cow::Borrowed(&graph);
    // The float graph's channel means over the calibration images, where biases are corrected.
    let mut float_means = None;
    let mut bias_correction = None;
    if options.bias_correction {
        progress("verifying plans with biases corrected for the mean error of int8 weights and inputs: estimated means");
        let all: Vec<&Vec<f32>> = inputs.iter().map(|(input, _)| input).collect();
        let (float, estimated) = channel_means(&graph, &params, &all);
        let mut trial = BiasCorrectionTrial {
            agreement: [verified.agreement(); 3],
            output_rel_rms: [verified.output_rel_rms(); 3],
            written: 0,
        };
        // Spread evenly over the calibration images, which come class by class (a whole
        // stride would take the first classes only from 201 to 399 images).
        let count = inputs.len().min(MEASURED_MEAN_IMAGES);
        let images: Vec<&Vec<f32>> = (0..count)
            .map(|i| &inputs[i * inputs.len() / count].0)
            .collect();
        // The same means where the measured correction takes every image.
        let subset = (images.len() < all.len()).then(|| channel_means(&graph, &params, &images));
        let (subset_float, subset_estimated) = subset
            .as_ref()
            .map_or((&float, &estimated), |(f, e)| (f, e));
        let candidates = [
            Ok(bias_corrected(&graph, &float, &estimated)),
            measured_bias_correction(
                model,
                &graph,
                |corrected| build(corrected, &params),
                &images,
                [subset_float, subset_estimated],
                &mut *progress,
            ),
        ];
        let mut best = None;
        for (index, candidate) in candidates.into_iter().enumerate() {
            let built = candidate.and_then(|corrected| {
                let program = build(&corrected, &params)?;
                let plan = encode(model, &program)?;
                Ok((corrected, program, plan))
            });
            // A candidate that cannot be built (a bias out of the accumulator's range) is not
            // written; the uncorrected plan stands.
            let Ok((corrected, corrected_program, corrected_plan)) = built else {
                continue;
            };
            let v = verify(&corrected_plan)?;
            trial.agreement[index + 1] = v.agreement();
            trial.output_rel_rms[index + 1] = v.output_rel_rms();
            let closest = best.as_ref().map_or(&verified, |(_, _, _, b)| b);
            if v.agrees_nearly_as_often(verified.agreeing())
                && v.output_rel_rms() < closest.output_rel_rms()
            {
                trial.written = index + 1;
                best = Some((corrected, corrected_program, corrected_plan, v));
            }
        }
        if let Some((corrected, corrected_program, corrected_plan, v)) = best {
            source = Cow::Owned(corrected);
            (program, plan, verified) = (corrected_program, corrected_plan, v);
        }
        bias_correction = Some(trial);
        float_means = Some(float);
    }
    let sample = || {
        inputs
            .iter()
            .map(|(input, _)| input)
            .take(LAYER_ERROR_IMAGES)
    };
    progress("measuring each layer's error against the float graph");
    let mut layers = layer_errors(&graph, &program, &plan, sample())?;
    let mut widened = Vec::new();
    let mut widening = None;
    if let Some(threshold) = options.widen_above {
        let candidates: Vec<LayerError> = layers
            .iter()
            // A table whose output is no further from float than its input adds nothing.
            .filter(|layer| layer.op == "Lut" && layer.added.max(0.0) >= threshold)
            .cloned()
            .collect();
        let names = candidates.iter().map(|l| l.node.clone()).collect();
        let wide_program = QuantizedGraph::build_widened(&source, &params, &names, logits)?;
        // A table whose readers cannot take 16 bits is still a step of the program.
        let still_int8: BTreeSet<&str> =
            wide_program.steps.iter().map(|s| s.name.as_str()).collect();
        let chosen: Vec<LayerError> = candidates
            .into_iter()
            .filter(|l| !still_int8.contains(l.node.as_str()))
            .collect();
        if !chosen.is_empty() {
            progress("verifying the plan with those tables at 16 bits");
            let wide_plan = encode(model, &wide_program)?;
            let wide = verify(&wide_plan)?;
            let trial = WideningTrial {
                tables: chosen.len(),
                agreement: [verified.agreement(), wide.agreement()],
                output_rel_rms: [verified.output_rel_rms(), wide.output_rel_rms()],
                kept: wide.closer_than(&verified, options.min_error_reduction),
            };
            if trial.kept {
                progress("measuring each layer's error with those tables at 16 bits");
                layers = layer_errors(&graph, &wide_program, &wide_plan, sample())?;
                (program, plan, verified) = (wide_program, wide_plan, wide);
                widened = chosen;
            }
            widening = Some(trial);
        }
    }
    let mut int16 = None;
    if let Some(threshold) = options
        .int16_above
        .filter(|&t| verified.output_rel_rms() >= t)
    {
        progress(&format!(
            "the int8 output is {:.3} (relative RMS) from float, at least {threshold}: verifying a plan with 16-bit activations",
            verified.output_rel_rms()
        ));
        let mut trial = Int16Trial {
            tensors: 0,
            agreement: [verified.agreement(); 2],
            output_rel_rms: [verified.output_rel_rms(); 2],
            kept: false,
            failed: None,
        };
        // 16-bit activations carry the float means (to 1/65,536 of their range): only the
        // int8 weights' mean error is left to correct.
        let weights_corrected = match &float_means {
            Some(float) => Cow::Owned(bias_corrected(&graph, float, float)),
            None => Cow::Borrowed(&graph),
        };
        // A classifier's logits 16-bit as well; a detector's head int8 (GPU peak search).
        let wide_output = detector.is_none();
        let built = QuantizedGraph::build_16_bit(&weights_corrected, &params, &minmax, wide_output)
            .and_then(|p| encode(model, &p).map(|plan| (p, plan)));
        match built {
            Ok((wide_program, wide_plan)) => {
                let wide = verify(&wide_plan)?;
                trial.tensors = wide_program.wide.iter().filter(|&&w| w).count();
                trial.agreement[1] = wide.agreement();
                trial.output_rel_rms[1] = wide.output_rel_rms();
                trial.kept =
                    trial.tensors > 0 && wide.closer_than(&verified, options.min_error_reduction);
                if trial.kept {
                    progress("measuring each layer's error with 16-bit activations");
                    layers = layer_errors(&graph, &wide_program, &wide_plan, sample())?;
                    (program, plan, verified) = (wide_program, wide_plan, wide);
                    widened.clear();
                }
            }
            Err(e) => trial.failed = Some(e.to_string()),
        }
        int16 = Some(trial);
    }
    let v = &verified;
    let accuracy = |right: usize| (v.labelled > 0).then(|| right as f64 / v.labelled as f64);
    let (float_top1, int8_top1) = (accuracy(v.float_right), accuracy(v.int8_right));
    let written = OwnedProgram::new(&plan)?;
    let report = Report {
        model: model.manifest.name.clone(),
        method: method_name(method),
        ranges,
        bias_correction,
        calibration_images: inputs.len(),
        skipped,
        steps: program.steps.len(),
        plan_bytes: plan.len(),
        arena_bytes: written.program().arena_size(),
        output_bits: 8 * written.program().output_width().bytes(),
        top1_agreement: (!v.detector).then(|| v.agreement()),
        box_agreement: v.detector.then(|| v.agreement()),
        float_boxes: v.float_boxes,
        output_rel_rms: v.output_rel_rms(),
        float_top1,
        int8_top1,
        delta_points: float_top1.zip(int8_top1).map(|(f, q)| 100.0 * (q - f)),
        seconds: started.elapsed().as_secs_f64(),
        layers,
        widened,
        widening,
        int16,
    };
    Ok((plan, report))
}

/// Each value's channel means over `images` in the float graph, and as int8 carries them with
/// `params` (the float values rounded to their grids): [`ChannelMeans`], by value id.
fn channel_means(
    graph: &Graph,
    params: &[ActivationQuant],
    images: &[&Vec<f32>],
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let (mut float, mut int8) = (
        ChannelMeans::new(&graph.shapes),
        ChannelMeans::new(&graph.shapes),
    );
    for image in images {
        let values = graph.run_f32(image);
        float.observe(&values);
        int8.observe_as_int8(&values, params);
    }
    (float.means(), int8.means())
}

/// `graph` with its biases corrected ([`bias_corrected`]) for the channel means its int8 plan's
/// layers actually read, measured on the plan over `images`: layer by layer in order, each
/// from the plan with every layer before it already corrected, so that a layer also takes up
/// the mean its input drifted by through the rounding and clipping upstream. `[float,
/// estimated]` are [`channel_means`] over the same images; the int8 means of inputs no step
/// writes whole stay estimated. `build` quantises a corrected graph as the plan is.
fn measured_bias_correction(
    model: &ZooModel,
    graph: &Graph,
    build: impl Fn(&Graph) -> Result<QuantizedGraph, ImportError>,
    images: &[&Vec<f32>],
    [float_means, estimated]: [&Vec<Vec<f64>>; 2],
    progress: &mut dyn FnMut(&str),
) -> Result<Graph, CompileError> {
    let mut int8 = estimated.clone();
    let mut corrected = bias_corrected(graph, float_means, &int8);
    let mut measured = vec![false; graph.shapes.len()];
    let inputs: Vec<usize> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv { .. } | Op::Gemm { .. }))
        .filter_map(|n| n.inputs.first().copied())
        .collect();
    for (done, &input) in inputs.iter().enumerate() {
        if std::mem::replace(&mut measured[input], true) {
            continue;
        }
        if done % 10 == 0 {
            progress(&format!(
                "measured means: layer {} of {}",
                done + 1,
                inputs.len()
            ));
        }
        let program = build(&corrected)?;
        let plan = encode(model, &program)?;
        let means = plan_channel_means(graph, &program, &plan, images.iter().copied())?;
        if let Some(Some(mean)) = means.into_iter().nth(input) {
            int8[input] = mean;
            corrected = bias_corrected(graph, float_means, &int8);
        }
    }
    Ok(corrected)
}

/// Each value's channel means as `plan` carries them (its codes dequantised), over `inputs`,
/// by value id: the input, the values a step writes whole, and the Concats whose parts are
/// written in place; `None` for the others (views, values fused away).
fn plan_channel_means<'i>(
    graph: &Graph,
    program: &QuantizedGraph,
    plan: &[u8],
    inputs: impl Iterator<Item = &'i Vec<f32>>,
) -> Result<Vec<Option<Vec<f64>>>, CompileError> {
    let mut means = ChannelMeans::new(&graph.shapes);
    let mut seen = vec![false; graph.shapes.len()];
    run_plan(program, plan, inputs, |_, held| {
        let mut values = vec![Vec::new(); graph.shapes.len()];
        for (value, real) in held {
            seen[value] = true;
            values[value] = real;
        }
        means.observe(&values);
    })?;
    let mut means: Vec<Option<Vec<f64>>> = means
        .means()
        .into_iter()
        .zip(&seen)
        .map(|(mean, &seen)| seen.then_some(mean))
        .collect();
    // A Concat whose parts were all written in place: its channels are its parts', in order.
    for node in graph.nodes.iter().filter(|n| matches!(n.op, Op::Concat)) {
        if means[node.output].is_none() {
            let parts: Option<Vec<Vec<f64>>> =
                node.inputs.iter().map(|&i| means[i].clone()).collect();
            let channels = graph.shapes[node.output].get(1).copied();
            means[node.output] = parts
                .map(|parts| parts.concat())
                .filter(|all| Some(all.len()) == channels);
        }
    }
    Ok(means)
}

/// Run `plan` on each of `inputs` and hand `each` the input with every value the plan holds
/// whole, by value id, as real values (its codes dequantised): the quantised input, then each
/// step's output once complete (a Concat not written in place fills its output a part, a step,
/// at a time).
fn run_plan<'i>(
    program: &QuantizedGraph,
    plan: &[u8],
    inputs: impl Iterator<Item = &'i Vec<f32>>,
    mut each: impl FnMut(&'i Vec<f32>, Vec<(usize, Vec<f32>)>),
) -> Result<(), CompileError> {
    let owned = OwnedProgram::new(plan)?;
    let plan_program = owned.program();
    let outputs: Vec<usize> = plan_program
        .steps()
        .map(|step| step.map(|s| usize::from(s.output)))
        .collect::<Result<_, _>>()?;
    let mut kernels = KernelTable::for_this_cpu(&plan_program.convs(), &plan_program.convs16());
    let mut arena = vec![0i8; plan_program.arena_size()];
    let real = |value: usize, codes: &[i8]| -> Vec<f32> {
        let q = program.params[value];
        let width = if program.wide[value] {
            Width::I16
        } else {
            Width::I8
        };
        (0..codes.len() / width.bytes())
            .map(|i| q.scale * (width.load(codes, i) as f32 - f32::from(q.zero_point)))
            .collect()
    };
    for input in inputs {
        let mut held = Vec::new();
        plan_program.quantize_input(input, &mut arena)?;
        if let Some(codes) = plan_program.tensor(0).and_then(|r| arena.get(r)) {
            held.push((0, real(0, codes)));
        }
        plan_program.run_observed(&mut arena, &mut kernels, |index, codes| {
            let value = outputs[index];
            if outputs.get(index + 1) != Some(&value) {
                held.push((value, real(value, codes)));
            }
        })?;
        each(input, held);
    }
    Ok(())
}

/// Each layer's relative RMS error against the float graph (see [`LayerError`]), from the
/// plan run on `inputs` one step at a time.
fn layer_errors<'i>(
    graph: &Graph,
    program: &QuantizedGraph,
    plan: &[u8],
    inputs: impl Iterator<Item = &'i Vec<f32>>,
) -> Result<Vec<LayerError>, CompileError> {
    // Squared error and squared float value, per value id.
    let mut sums = vec![(0.0f64, 0.0f64); graph.shapes.len()];
    let mut seen = vec![false; graph.shapes.len()];
    run_plan(program, plan, inputs, |input, held| {
        let float = graph.run_f32(input);
        for (value, real) in held {
            seen[value] = true;
            let (error, reference) = &mut sums[value];
            for (&r, &f) in real.iter().zip(&float[value]) {
                *error += f64::from(r - f).powi(2);
                *reference += f64::from(f).powi(2);
            }
        }
    })?;
    // A Concat whose parts were all written in place has no step of its own: its error is
    // its parts'.
    for (part, place) in program.in_place.iter().enumerate() {
        if let Some((concat, _)) = *place {
            if !seen[concat] {
                let (error, reference) = sums[part];
                sums[concat].0 += error;
                sums[concat].1 += reference;
            }
        }
    }
    let rel = |value: usize| {
        let (error, reference) = sums[value];
        (error / reference.max(f64::MIN_POSITIVE)).sqrt()
    };
    Ok(program
        .steps
        .iter()
        .map(|step| {
            let before = step.inputs.iter().map(|&i| rel(i)).fold(0.0, f64::max);
            LayerError {
                node: step.name.clone(),
                op: step.layer.kind(),
                rel_rms: rel(step.output),
                added: rel(step.output) - before,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The zoo's EuroSAT classifier on 40 of the committed chips (every 7th, across the
    /// classes), with percentile ranges calibrated on them.
    fn zoo_classifier() -> (ZooModel, Graph, Vec<ActivationQuant>, Vec<Vec<f32>>) {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let model = ZooModel::load(here.join("zoo/eurosat-rgb").to_str().unwrap()).unwrap();
        let graph = model.graph().unwrap();
        let spec = model.preprocess_spec().unwrap();
        let sample = here.join("../sim/sample/eurosat-rgb");
        let images: Vec<Vec<f32>> = calibration_images(&sample, &model.manifest.labels, Split::All)
            .unwrap()
            .iter()
            .step_by(7)
            .take(40)
            .map(|image| calibration_input(&model, &spec, &image.path).unwrap())
            .collect();
        let mut calibrator = Calibrator::new(graph.shapes.len());
        let runs: Vec<_> = images.iter().map(|i| graph.run_f32(i)).collect();
        runs.iter().for_each(|v| calibrator.observe_range(v));
        runs.iter().for_each(|v| calibrator.observe_histogram(v));
        let params = calibrator.finish(Method::Percentile(0.01));
        (model, graph, params, images)
    }

    #[test]
    fn measured_correction_cancels_the_mean_error_of_the_plans_layers() {
        // At every Conv or Gemm output the plan holds (no activation fused into it: the
        // residual blocks' second convolutions, the logits), on the images the means were
        // measured on: the root mean square over channels of (plan's mean - float's mean).
        let (model, graph, params, images) = zoo_classifier();
        let images: Vec<&Vec<f32>> = images.iter().collect();
        let (float, estimated) = channel_means(&graph, &params, &images);
        let layers: Vec<usize> = graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Conv { .. } | Op::Gemm { .. }))
            .map(|n| n.output)
            .collect();
        let mean_errors = |graph: &Graph| {
            let program = QuantizedGraph::build(graph, &params).unwrap();
            let plan = encode(&model, &program).unwrap();
            let means = plan_channel_means(graph, &program, &plan, images.iter().copied());
            let means = means.unwrap();
            layers
                .iter()
                .filter_map(|&layer| {
                    let plan = means[layer].as_ref()?;
                    let squares = plan.iter().zip(&float[layer]).map(|(p, f)| (p - f).powi(2));
                    Some((squares.sum::<f64>() / plan.len() as f64).sqrt())
                })
                .collect::<Vec<f64>>()
        };
        let means = [&float, &estimated];
        let build = |g: &Graph| QuantizedGraph::build(g, &params);
        let corrected =
            measured_bias_correction(&model, &graph, build, &images, means, &mut |_| {}).unwrap();
        let (before, after) = (mean_errors(&graph), mean_errors(&corrected));
        eprintln!("channel mean errors at the layers the plan holds: {before:.4?} -> {after:.4?}");
        assert!(before.len() >= 4, "{before:?}");
        let total = |errors: &[f64]| errors.iter().sum::<f64>();
        assert!(
            total(&after) < 0.5 * total(&before),
            "{before:?} -> {after:?}"
        );
    }
}
