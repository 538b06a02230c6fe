//! Kestrel's model tools: loading zoo models with their manifests for the simulator and the tests,
//! and the plan compiler (`cargo run -p models -- compile`). Flight code uses neither: it embeds
//! a plan from `kestrel-zoo`, whose header says everything a board needs.
//!
//! Each model lives in `models/zoo/<name>/` as `model.onnx` plus `manifest.json` (labels, input
//! shape, preprocessing, dataset, split, validation accuracy, sha256 of the ONNX) and its
//! `model.plan`. The built-in models come from `kestrel-zoo`, so a binary needs no files to run
//! them; a model on disk is loaded from its folder, its `model.onnx` or its `manifest.json`.
#![deny(missing_docs)]

pub mod arena;
pub mod calibrate;
pub mod compile;
pub mod graph;
pub mod quantize;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use kestrel_backend::{Backend, PreprocessSpec, ResizeRule, SpecError};
use kestrel_plan::cpu::Int8Cpu;
use kestrel_plan::plan::{HeadHeader, PlanError};
use kestrel_plan::program::{OwnedProgram, ProgramError};
use kestrel_runtime::detect::{Head, MAX_YOLO_SCALES};
use kestrel_runtime::step::DetectorConfig;
use kestrel_tract::{LoadError, TractBackend};

use graph::{Graph, ImportError};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The model `sim` uses when none is named.
pub const DEFAULT_MODEL: &str = "eurosat-rgb";
/// The detector of `sim`'s default detection pass.
pub const DEFAULT_DETECTOR: &str = "nwpu-vhr10";

/// Names of the built-in models (the `kestrel-zoo` crate's).
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    kestrel_zoo::ALL.into_iter().map(|b| b.name)
}

/// A model's manifest (`manifest.json`); fields the runtime does not use are kept for reports.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    /// Zoo name, e.g. `eurosat-rgb`.
    pub name: String,
    /// `classify` or `detect`.
    pub task: String,
    /// Class names in output order.
    pub labels: Vec<String>,
    /// Input tensor.
    pub input: TensorInfo,
    /// Preprocessing the model was trained with.
    pub preprocess: PreprocessInfo,
    /// Dataset and licence.
    #[serde(default)]
    pub dataset: String,
    /// Rule for the train/validation split.
    #[serde(default)]
    pub split: String,
    /// Top-1 on the validation split, 0..1, measured by the training script.
    #[serde(default)]
    pub validation_top1: f64,
    /// Hex sha256 of `model.onnx`.
    pub onnx_sha256: String,
    /// How a detector's head is read and its tiles merged (task `detect` only).
    #[serde(default)]
    pub detector: Option<DetectorInfo>,
    /// The compiled plan's scores, where the manifest has them.
    #[serde(default)]
    pub plan: Option<PlanInfo>,
}

/// What the manifest says of the model's compiled plan. For a detector, mAP@0.5 as `sim eval`
/// measures it (tiled as in flight, on the validation split): the one mAP definition Kestrel
/// quotes and compares against.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PlanInfo {
    /// With the int8 plan.
    #[serde(default)]
    pub validation_map50: Option<f64>,
    /// With the float model (tract), on the same images and tiles.
    #[serde(default)]
    pub float_validation_map50: Option<f64>,
}

/// A detector's head and postprocessing, from the training script.
#[derive(Clone, Debug, Deserialize)]
pub struct DetectorInfo {
    /// `centernet` (the default: Kestrel's own detector) or `yolo` (an ultralytics YOLOv8
    /// export, compiled up to its raw head).
    #[serde(default = "centernet")]
    pub head: String,
    /// CenterNet: input pixels per head cell.
    #[serde(default)]
    pub stride: usize,
    /// CenterNet: head cells that a predicted box size of 1.0 stands for.
    #[serde(default)]
    pub wh_scale: f32,
    /// YOLO: bins of each box side's distribution (ultralytics' `reg_max`).
    #[serde(default = "yolo_reg_max")]
    pub reg_max: usize,
    /// YOLO: input pixels per cell of each scale, in the head's order.
    #[serde(default = "yolo_strides")]
    pub strides: Vec<usize>,
    /// Lowest score reported in telemetry and drawn by `sim replay`.
    pub score_threshold: f32,
    /// Same-class IoU above which the weaker box is suppressed.
    pub nms_iou: f32,
    /// Pixels shared by neighbouring tiles of a large frame.
    pub tile_overlap: u32,
    /// Intersection over its own area above which a same-class box inside a better one is
    /// taken for a piece cut off by a tile edge.
    pub seam_containment: f32,
    /// Most detections of one class a frame reports.
    pub max_per_class: u16,
    /// mAP@0.5 of the float model on whole (untiled) validation images, as the training script
    /// measures it to pick its epoch: provenance only. The figure `sim` compares against is
    /// [`PlanInfo`]'s, tiled as in flight.
    #[serde(default)]
    pub validation_map50: f64,
}

fn centernet() -> String {
    "centernet".into()
}

/// ultralytics' defaults for a P3-P5 head.
fn yolo_reg_max() -> usize {
    16
}

fn yolo_strides() -> Vec<usize> {
    vec![8, 16, 32]
}

impl DetectorInfo {
    /// The head as a plan states it, checked against a `height` x `width` input.
    pub fn head_header(&self, height: usize, width: usize) -> Result<HeadHeader, String> {
        let to_u16 = |what: &str, v: usize| {
            u16::try_from(v).map_err(|_| format!("detector {what} {v} does not fit a plan"))
        };
        let head = match self.head.as_str() {
            "centernet" => HeadHeader::CenterNet {
                stride: to_u16("stride", self.stride)?,
                wh_scale: self.wh_scale,
            },
            "yolo" => {
                let mut strides = [0; MAX_YOLO_SCALES];
                if self.strides.len() > MAX_YOLO_SCALES {
                    return Err(format!(
                        "a YOLO head of {} scales (at most {MAX_YOLO_SCALES})",
                        self.strides.len()
                    ));
                }
                for (slot, &s) in strides.iter_mut().zip(&self.strides) {
                    *slot = to_u16("stride", s)?;
                }
                HeadHeader::Yolo {
                    reg_max: to_u16("reg_max", self.reg_max)?,
                    strides,
                }
            }
            other => {
                return Err(format!(
                    "unknown detector head {other:?} (centernet or yolo)"
                ))
            }
        };
        head.check(height as u32, width as u32)
            .map_err(|e| match e {
                PlanError::DetectorStride(0) => {
                    "a YOLO head needs strides and reg_max above 0".into()
                }
                PlanError::DetectorStride(s) => {
                    format!("detector stride {s} does not divide the {width}x{height} input")
                }
                other => other.to_string(),
            })?;
        Ok(head)
    }
}

/// Shape and layout of the input tensor.
#[derive(Clone, Debug, Deserialize)]
pub struct TensorInfo {
    /// Dimensions, e.g. `[1, 3, 64, 64]`.
    pub shape: Vec<usize>,
    /// Only `NCHW` is supported.
    pub layout: String,
}

/// Per-band normalisation and resize rule.
#[derive(Clone, Debug, Deserialize)]
pub struct PreprocessInfo {
    /// `bilinear` or `nearest`.
    pub resize: String,
    /// Per-band mean in raw sample units.
    pub mean: Vec<f32>,
    /// Per-band standard deviation in raw sample units.
    pub std: Vec<f32>,
}

/// Why a model could not be found, read or used. Messages name the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Not a zoo name and no such file or folder.
    #[error(
        "{origin}: no such model (not a file, a folder, or one of the built-in models: {builtins})"
    )]
    NotFound {
        /// What was asked for.
        origin: String,
        /// The built-in names.
        builtins: String,
    },
    /// An ONNX file or folder without the manifest every model needs beside its ONNX.
    #[error(
        "{}: not found: a model needs a manifest.json beside its model.onnx, with its name, task \
         (classify or detect), labels (in output order), input (name, shape [1, C, H, W], \
         layout NCHW), preprocess (bands, resize, mean and std per band, on samples in 0..255) \
         and onnx_sha256 (of model.onnx); a detector adds its head; \
         models/zoo/eurosat-rgb/manifest.json is a classifier's",
        path.display()
    )]
    NoManifest {
        /// Where the manifest was looked for.
        path: PathBuf,
    },
    /// A file of the model could not be read.
    #[error("{}: cannot read: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not the error's source: printed once).
        reason: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected form, or describes an unusable input.
    #[error("{origin}: invalid manifest: {reason}")]
    Manifest {
        /// The manifest file.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The ONNX bytes do not match the manifest's sha256: corrupt or replaced.
    #[error("{origin}: sha256 {actual} does not match the manifest's {expected} (corrupt or replaced model file)")]
    Checksum {
        /// The ONNX file.
        origin: String,
        /// From the manifest.
        expected: String,
        /// Of the bytes read.
        actual: String,
    },
    /// tract could not load the model.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The int8 plan does not load.
    #[error("{origin}: {reason}")]
    Plan {
        /// The plan file.
        origin: String,
        /// Why (in the message, not the error's source: printed once).
        reason: ProgramError,
    },
    /// The plan states other labels, preprocessing or detector postprocessing than the
    /// manifest: a board running the plan alone would behave differently from `sim`.
    #[error("{origin}: the plan's {what} differs from the manifest's; recompile it with `cargo run -p models -- compile`")]
    PlanDisagrees {
        /// The plan file.
        origin: String,
        /// `labels`, `preprocessing` or `detector`.
        what: &'static str,
    },
    /// The model's output does not fit what its manifest says it is: a classifier with another
    /// number of classes, a detector with another head.
    #[error("{origin}: the model gives {got} output values, but {expected}; fix the manifest or export the model again")]
    DoesNotFit {
        /// The model.
        origin: String,
        /// Output values the model gives.
        got: usize,
        /// What the manifest asks for.
        expected: String,
    },
    /// The plan was compiled from another ONNX file than the manifest names.
    #[error("{origin}: plan was compiled from ONNX sha256 {plan}, the manifest's model is {manifest}; recompile it with `cargo run -p models -- compile`")]
    StalePlan {
        /// The plan file.
        origin: String,
        /// sha256 in the plan.
        plan: String,
        /// sha256 in the manifest.
        manifest: String,
    },
}

/// A model's task, classes and input preprocessing: see [`ZooModel::shape`].
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    task: String,
    labels: Vec<String>,
    spec: Option<PreprocessSpec>,
}

impl ModelShape {
    /// Whether `other` can take the place of a model of this shape, or why not.
    pub fn admits(&self, other: &ZooModel) -> Result<(), String> {
        let theirs = other.shape();
        if theirs.task != self.task || theirs.labels != self.labels {
            return Err(format!(
                "{} is a {} model for other classes",
                other.origin, theirs.task
            ));
        }
        if theirs.spec != self.spec {
            return Err(format!("{} wants other input preprocessing", other.origin));
        }
        Ok(())
    }
}

/// A model ready to be handed to a backend.
#[derive(Debug)]
pub struct ZooModel {
    /// Its manifest.
    pub manifest: Manifest,
    /// Where it came from: `builtin:<name>` or the ONNX path.
    pub origin: String,
    onnx: Cow<'static, [u8]>,
    plan: Option<(String, Cow<'static, [u8]>)>,
}

impl ZooModel {
    /// Load a built-in model by name, or a model from a folder, an ONNX file (with
    /// `manifest.json` beside it) or a manifest file (with `model.onnx` beside it).
    ///
    /// ```
    /// use kestrel_backend::Backend;
    ///
    /// let model = models::ZooModel::load("eurosat-rgb")?;
    /// assert_eq!(model.manifest.labels.len(), 10);
    /// let spec = model.preprocess_spec()?;
    /// assert_eq!((spec.width(), spec.height(), spec.bands()), (64, 64, 3));
    /// // Its compiled plan on the int8 CPU executor (tract runs the ONNX where there is none).
    /// let backend = model.int8_backend()?.expect("a built-in model has a plan");
    /// assert_eq!(backend.output_len(), 10);
    ///
    /// let e = models::ZooModel::load("no/such/model").unwrap_err();
    /// assert!(e.to_string().contains("no/such/model"), "{e}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(name_or_path: &str) -> Result<Self, ModelError> {
        if let Some(b) = kestrel_zoo::find(name_or_path) {
            let origin = format!("builtin:{}", b.name);
            let mut model = Self::from_parts(b.manifest, &origin, Cow::Borrowed(b.onnx), &origin)?;
            model.plan = Some((format!("{origin}/model.plan"), Cow::Borrowed(b.plan)));
            return Ok(model);
        }
        let path = Path::new(name_or_path);
        let (manifest_path, onnx_path) = if path.is_dir() {
            (path.join("manifest.json"), path.join("model.onnx"))
        } else if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            (path.to_path_buf(), path.with_file_name("model.onnx"))
        } else if path.is_file() {
            (path.with_file_name("manifest.json"), path.to_path_buf())
        } else {
            return Err(ModelError::NotFound {
                origin: name_or_path.to_string(),
                builtins: builtin_names().collect::<Vec<_>>().join(", "),
            });
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ModelError::Unreadable {
                path: p.to_path_buf(),
                reason: source,
            })
        };
        if !manifest_path.exists() {
            return Err(ModelError::NoManifest {
                path: manifest_path,
            });
        }
        let manifest_bytes = read(&manifest_path)?;
        let manifest_text = String::from_utf8_lossy(&manifest_bytes);
        let onnx = read(&onnx_path)?;
        let mut model = Self::from_parts(
            &manifest_text,
            &manifest_path.display().to_string(),
            Cow::Owned(onnx),
            &onnx_path.display().to_string(),
        )?;
        let plan_path = onnx_path.with_file_name("model.plan");
        if plan_path.exists() {
            model.plan = Some((
                plan_path.display().to_string(),
                Cow::Owned(read(&plan_path)?),
            ));
        }
        Ok(model)
    }

    fn from_parts(
        manifest_json: &str,
        manifest_origin: &str,
        onnx: Cow<'static, [u8]>,
        origin: &str,
    ) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::Manifest {
            origin: manifest_origin.to_string(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_str(manifest_json).map_err(|e| invalid(e.to_string()))?;
        if manifest.input.layout != "NCHW"
            || manifest.input.shape.len() != 4
            || manifest.input.shape[0] != 1
        {
            return Err(invalid(format!(
                "input must be NCHW with batch 1, found {} {:?}",
                manifest.input.layout, manifest.input.shape
            )));
        }
        let channels = manifest.input.shape[1];
        if manifest.preprocess.mean.len() != channels {
            return Err(invalid(format!(
                "{} per-band means for an input of {channels} channels",
                manifest.preprocess.mean.len()
            )));
        }
        if manifest.labels.is_empty() {
            return Err(invalid("no labels".to_string()));
        }
        match (manifest.task.as_str(), &manifest.detector) {
            ("classify", _) => {}
            ("detect", None) => {
                return Err(invalid("task detect without a detector section".into()))
            }
            ("detect", Some(d)) => {
                let [h, w] = [manifest.input.shape[2], manifest.input.shape[3]];
                d.head_header(h, w).map_err(invalid)?;
                if d.tile_overlap as usize >= h.min(w) {
                    return Err(invalid(format!(
                        "tile overlap {} is not smaller than the {w}x{h} input",
                        d.tile_overlap
                    )));
                }
            }
            (other, _) => {
                return Err(invalid(format!(
                    "unknown task {other:?} (classify or detect)"
                )))
            }
        }
        let actual = hex(&Sha256::digest(&onnx));
        if !actual.eq_ignore_ascii_case(&manifest.onnx_sha256) {
            return Err(ModelError::Checksum {
                origin: origin.to_string(),
                expected: manifest.onnx_sha256.clone(),
                actual,
            });
        }
        let model = Self {
            manifest,
            origin: origin.to_string(),
            onnx,
            plan: None,
        };
        model
            .preprocess_spec()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(model)
    }

    /// The runtime's preprocessing contract for this model.
    pub fn preprocess_spec(&self) -> Result<PreprocessSpec, SpecError> {
        let shape = &self.manifest.input.shape;
        let p = &self.manifest.preprocess;
        let resize = if p.resize == "nearest" {
            ResizeRule::Nearest
        } else {
            ResizeRule::Bilinear
        };
        PreprocessSpec::new(shape[3], shape[2], &p.mean, &p.std, resize)
    }

    /// The detector's head layout and postprocessing, or `None` for a classifier.
    pub fn detector_config(&self) -> Option<DetectorConfig> {
        let d = self.manifest.detector.as_ref()?;
        let [_, _, height, width] = self.manifest.input.shape[..] else {
            return None;
        };
        // Checked at load.
        let head = d.head_header(height, width).ok()?;
        Some(DetectorConfig {
            head: Head::from_header(
                &head,
                height as u32,
                width as u32,
                self.manifest.labels.len(),
            ),
            score_threshold: d.score_threshold,
            nms_iou: d.nms_iou,
            tile_overlap: d.tile_overlap,
            seam_containment: d.seam_containment,
            max_per_class: usize::from(d.max_per_class),
        })
    }

    /// The ONNX bytes, verified against the manifest.
    pub fn onnx(&self) -> &[u8] {
        &self.onnx
    }

    /// The ONNX values the model's output is made of: none (the graph's own output) but for a
    /// YOLO detector, whose raw head ([`graph::yolo_head_outputs`]) is compiled and run, not
    /// the decoding that ultralytics exports after it.
    pub fn head_outputs(&self) -> Result<Vec<String>, ImportError> {
        match &self.manifest.detector {
            Some(d) if d.head == "yolo" => graph::yolo_head_outputs(&self.onnx),
            _ => Ok(Vec::new()),
        }
    }

    /// The float graph the compiler quantises: up to the [`ZooModel::head_outputs`].
    pub fn graph(&self) -> Result<Graph, ImportError> {
        Graph::from_onnx_up_to(&self.onnx, &self.head_outputs()?)
    }

    /// The model on the tract float backend, up to the [`ZooModel::head_outputs`]; refused when
    /// its output does not fit the manifest.
    pub fn tract_backend(&self) -> Result<TractBackend, ModelError> {
        let outputs = self.head_outputs().map_err(|e| LoadError::Malformed {
            origin: self.origin.clone(),
            reason: e.to_string(),
        })?;
        let backend = TractBackend::from_bytes_up_to(
            &self.origin,
            &self.onnx,
            &self.manifest.input.shape,
            &outputs,
        )?;
        self.check_fits(backend.output_len())?;
        Ok(backend)
    }

    /// That a backend giving `output_len` values fits the manifest: one per label for a
    /// classifier, the head's for a detector. Checked at load, so that a mismatch is one error
    /// naming it, not every frame failing.
    pub fn check_fits(&self, output_len: usize) -> Result<(), ModelError> {
        let expected = match self.detector_config() {
            Some(d) if d.head.len() != output_len => Some(match d.head {
                Head::CenterNet(l) => format!(
                    "its manifest's detector head ({} classes plus 4 box channels on {}x{} cells) has {}",
                    l.classes, l.height, l.width, l.len()
                ),
                Head::Yolo(l) => format!(
                    "its manifest's YOLO head ({} classes plus 4 x {} box bins per cell, strides {:?}, on a {}x{} input) has {}",
                    l.classes, l.reg_max, self.manifest.detector.as_ref().map(|d| &d.strides), l.width, l.height, l.len()
                ),
            }),
            Some(_) => None,
            None if self.manifest.labels.len() != output_len => Some(format!(
                "its manifest lists {} classes",
                self.manifest.labels.len()
            )),
            None => None,
        };
        match expected {
            Some(expected) => Err(ModelError::DoesNotFit {
                origin: self.origin.clone(),
                got: output_len,
                expected,
            }),
            None => Ok(()),
        }
    }
}

impl ZooModel {
    /// What another model must share with this one to take its place between two frames
    /// (the `switch_model` command): task, classes and input preprocessing.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            task: self.manifest.task.clone(),
            labels: self.manifest.labels.clone(),
            spec: self.preprocess_spec().ok(),
        }
    }

    /// Whether the model has a compiled int8 plan (`model.plan` beside the ONNX).
    pub fn has_plan(&self) -> bool {
        self.plan.is_some()
    }

    /// The model's plan file, or `None` when it has none. It must parse, must have been
    /// compiled from this model's ONNX, and must state the manifest's labels, preprocessing and
    /// detector postprocessing (a board reads them from the plan alone).
    pub fn plan_bytes(&self) -> Result<Option<&[u8]>, ModelError> {
        let Some((origin, bytes)) = &self.plan else {
            return Ok(None);
        };
        let owned = OwnedProgram::new(bytes).map_err(|source| ModelError::Plan {
            origin: origin.clone(),
            reason: source,
        })?;
        let compiled_from = owned.program().header().onnx_sha256;
        if !compiled_from.eq_ignore_ascii_case(&self.manifest.onnx_sha256) {
            return Err(ModelError::StalePlan {
                origin: origin.clone(),
                plan: compiled_from.to_string(),
                manifest: self.manifest.onnx_sha256.clone(),
            });
        }
        let header = owned.program().header();
        let disagrees = |what| ModelError::PlanDisagrees {
            origin: origin.clone(),
            what,
        };
        if !header
            .labels()
            .eq(self.manifest.labels.iter().map(String::as_str))
        {
            return Err(disagrees("labels"));
        }
        if header.preprocess_spec().ok() != self.preprocess_spec().ok() {
            return Err(disagrees("preprocessing"));
        }
        if DetectorConfig::from_plan(header) != self.detector_config() {
            return Err(disagrees("detector"));
        }
        Ok(Some(bytes))
    }

    /// The model's plan on the int8 CPU backend, or `None` when it has no plan (checked as
    /// [`ZooModel::plan_bytes`] does).
    pub fn int8_backend(&self) -> Result<Option<Int8Cpu>, ModelError> {
        let Some(bytes) = self.plan_bytes()? else {
            return Ok(None);
        };
        let backend = Int8Cpu::from_bytes(bytes).map_err(|source| ModelError::Plan {
            origin: self
                .plan
                .as_ref()
                .map(|(o, _)| o.clone())
                .unwrap_or_default(),
            reason: source,
        })?;
        self.check_fits(backend.output_len())?;
        Ok(Some(backend))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in detector's manifest with `edit` applied, loaded without its ONNX.
    fn detector_manifest(edit: impl FnOnce(&mut serde_json::Value)) -> ModelError {
        let mut manifest: serde_json::Value =
            serde_json::from_str(include_str!("../zoo/nwpu-vhr10/manifest.json")).unwrap();
        edit(&mut manifest);
        let text = manifest.to_string();
        ZooModel::from_parts(&text, "manifest.json", Cow::Borrowed(&[]), "model.onnx").unwrap_err()
    }

    #[test]
    fn detector_manifests_are_checked() {
        let reason = |e: ModelError| match e {
            ModelError::Manifest { reason, .. } => reason,
            other => panic!("{other}"),
        };
        let missing = detector_manifest(|m| {
            m.as_object_mut().unwrap().remove("detector");
        });
        assert_eq!(reason(missing), "task detect without a detector section");
        let stride = detector_manifest(|m| m["detector"]["stride"] = 3.into());
        assert!(reason(stride).contains("stride 3 does not divide"));
        let overlap = detector_manifest(|m| m["detector"]["tile_overlap"] = 512.into());
        assert!(reason(overlap).contains("tile overlap 512"));
        let task = detector_manifest(|m| m["task"] = "segment".into());
        assert!(reason(task).contains("unknown task"));
        // Untouched, the manifest passes every check and only the (absent) ONNX is refused.
        assert!(matches!(
            detector_manifest(|_| {}),
            ModelError::Checksum { .. }
        ));
    }

    #[test]
    fn the_built_in_detector_reads_its_head_layout() {
        let model = ZooModel::load(DEFAULT_DETECTOR).unwrap();
        let Head::CenterNet(layout) = model.detector_config().unwrap().head else {
            panic!("the built-in detector is a CenterNet");
        };
        assert_eq!(layout.classes, 10);
        assert_eq!((layout.height, layout.width), (128, 128));
        assert_eq!(layout.len(), 14 * 128 * 128);
        assert!(ZooModel::load(DEFAULT_MODEL)
            .unwrap()
            .detector_config()
            .is_none());
    }

    /// What a board reads from a zoo plan alone is what `sim` reads from the manifest.
    #[test]
    fn the_zoo_plans_state_their_own_labels_preprocessing_and_detector() {
        for name in [DEFAULT_MODEL, DEFAULT_DETECTOR] {
            let model = ZooModel::load(name).unwrap();
            let owned = OwnedProgram::new(model.plan_bytes().unwrap().unwrap()).unwrap();
            let header = owned.program().header();
            assert!(header
                .labels()
                .eq(model.manifest.labels.iter().map(String::as_str)));
            assert_eq!(
                header.preprocess_spec().unwrap(),
                model.preprocess_spec().unwrap()
            );
            assert_eq!(DetectorConfig::from_plan(header), model.detector_config());
        }
        assert!(ZooModel::load(DEFAULT_DETECTOR)
            .unwrap()
            .detector_config()
            .is_some());
    }

    /// A bare ONNX file, or a folder holding only one, is refused with what a manifest needs;
    /// a plan that is not one is refused once, its reason said once (no repeated cause).
    #[test]
    fn a_model_without_a_manifest_or_with_a_broken_plan_says_why_once() {
        let dir = tempfile::tempdir().unwrap();
        let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo/eurosat-rgb");
        std::fs::copy(zoo.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
        for path in [dir.path().to_path_buf(), dir.path().join("model.onnx")] {
            let error = ZooModel::load(path.to_str().unwrap()).err().unwrap();
            assert!(matches!(error, ModelError::NoManifest { .. }), "{error}");
            let text = format!("{:#}", anyhow::Error::from(error));
            assert!(
                text.contains("needs a manifest.json") && text.contains("labels"),
                "{text}"
            );
        }
        std::fs::copy(zoo.join("manifest.json"), dir.path().join("manifest.json")).unwrap();
        std::fs::write(dir.path().join("model.plan"), [0u8; 4096]).unwrap();
        let model = ZooModel::load(dir.path().to_str().unwrap()).unwrap();
        let error = anyhow::Error::from(model.plan_bytes().unwrap_err());
        let text = format!("{error:#}");
        assert!(text.contains("bad magic"), "{text}");
        assert_eq!(text.matches("bad magic").count(), 1, "{text}");
    }

    /// A manifest edited after compiling (a new score threshold) no longer matches its plan.
    #[test]
    fn a_plan_that_disagrees_with_its_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo/nwpu-vhr10");
        for file in ["model.onnx", "model.plan"] {
            std::fs::copy(zoo.join(file), dir.path().join(file)).unwrap();
        }
        let mut manifest: serde_json::Value =
            serde_json::from_str(include_str!("../zoo/nwpu-vhr10/manifest.json")).unwrap();
        manifest["detector"]["score_threshold"] = 0.5.into();
        std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
        let model = ZooModel::load(dir.path().to_str().unwrap()).unwrap();
        let error = model.plan_bytes().unwrap_err();
        assert!(
            matches!(
                error,
                ModelError::PlanDisagrees {
                    what: "detector",
                    ..
                }
            ),
            "{error}"
        );
    }
}
