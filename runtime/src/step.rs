//! One frame (or tile) through preprocessing, the backend and postprocessing, with no allocation.

use kestrel_backend::{Backend, BackendError, PreprocessSpec};
use kestrel_plan::plan::PlanHeader;

use crate::classify::{classify, Classification, PostprocessError};
use crate::detect::{DetectError, Detections, Head};
use crate::frame::{FrameView, Sample};
use crate::health::{ErrorKind, Health};
use crate::preprocess::{prepare_input, PreprocessError, Region};
use crate::tile::{TileError, TileGrid};
use crate::MonotonicClock;

/// Why a frame could not be classified or searched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StepError {
    /// The frame does not fit the model.
    Preprocess(PreprocessError),
    /// The backend failed.
    Backend(BackendError),
    /// The model output is unusable.
    Postprocess(PostprocessError),
    /// The frame cannot be tiled (empty, or the overlap does not fit the tile).
    Tiles(TileError),
    /// The detector head is unusable.
    Detect(DetectError),
}

impl StepError {
    /// The health counter this error is counted under.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Preprocess(_) => ErrorKind::Frame,
            Self::Backend(_) => ErrorKind::Backend,
            Self::Postprocess(_) | Self::Detect(_) => ErrorKind::Output,
            Self::Tiles(_) => ErrorKind::Frame,
        }
    }
}

impl core::fmt::Display for StepError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Preprocess(e) => write!(f, "{e}"),
            Self::Backend(e) => write!(f, "{e}"),
            Self::Postprocess(e) => write!(f, "{e}"),
            Self::Tiles(e) => write!(f, "{e}"),
            Self::Detect(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for StepError {}

/// Why a [`ClassifierStep`] or [`DetectorStep`] could not be set up: the buffers or spec do not fit the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SetupError {
    /// Values the backend takes per input.
    pub backend_input: usize,
    /// Values the preprocessing spec produces.
    pub spec_input: usize,
    /// Length of the input buffer supplied.
    pub input_buffer: usize,
    /// Values the backend produces per output.
    pub backend_output: usize,
    /// Length of the output buffer supplied.
    pub output_buffer: usize,
}

impl SetupError {
    /// Whether `spec`, `input` and `output` fit `backend` (and `also` holds).
    fn check(
        backend: &impl Backend,
        spec: &PreprocessSpec,
        input: &[f32],
        output: &[f32],
        also: bool,
    ) -> Result<(), Self> {
        let fits = backend.input_len() == spec.input_len()
            && input.len() == spec.input_len()
            && output.len() == backend.output_len()
            && !output.is_empty()
            && also;
        if fits {
            return Ok(());
        }
        Err(SetupError {
            backend_input: backend.input_len(),
            spec_input: spec.input_len(),
            input_buffer: input.len(),
            backend_output: backend.output_len(),
            output_buffer: output.len(),
        })
    }
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "buffers do not fit the model: backend takes {} inputs (spec {}, buffer {}) and \
             produces {} outputs (buffer {})",
            self.backend_input,
            self.spec_input,
            self.input_buffer,
            self.backend_output,
            self.output_buffer
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SetupError {}

/// Classifies frames with one backend into caller-owned input and output buffers.
///
/// The built-in EuroSAT plan on the int8 CPU executor, classifying a frame (a flat 64x64 RGB
/// frame here; a camera's or a file's in flight):
///
/// ```
/// use kestrel_backend::Backend;
/// use kestrel_hal::FrameGeometry;
/// use kestrel_plan::cpu::Int8Cpu;
/// use kestrel_runtime::frame::FrameView;
/// use kestrel_runtime::preprocess::Region;
/// use kestrel_runtime::step::ClassifierStep;
///
/// let backend = Int8Cpu::from_bytes(kestrel_zoo::EUROSAT_RGB.plan)?;
/// // The plan's header says how frames become model inputs, and what the classes are.
/// let header = backend.program().header();
/// let spec = header.preprocess_spec()?;
/// let labels: Vec<String> = header.labels().map(String::from).collect();
///
/// let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
/// let mut step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
///
/// let geometry = FrameGeometry { width: 64, height: 64, bands: 3 };
/// let samples = [40u8, 70, 120].repeat(64 * 64);
/// let frame = FrameView::new(geometry, &samples)?;
/// let result = step.classify(frame, Region::whole(64, 64))?;
/// let label = &labels[usize::from(result.class())];
/// assert!((0.0..=1.0).contains(&result.confidence()), "{label}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ClassifierStep<'buf, B> {
    backend: B,
    spec: PreprocessSpec,
    input: &'buf mut [f32],
    output: &'buf mut [f32],
}

impl<'buf, B: Backend> ClassifierStep<'buf, B> {
    /// Check that `spec`, `input` and `output` fit `backend` and build the step.
    pub fn new(
        backend: B,
        spec: PreprocessSpec,
        input: &'buf mut [f32],
        output: &'buf mut [f32],
    ) -> Result<Self, SetupError> {
        SetupError::check(&backend, &spec, input, output, true)?;
        Ok(Self {
            backend,
            spec,
            input,
            output,
        })
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The preprocessing applied to every region.
    pub fn spec(&self) -> &PreprocessSpec {
        &self.spec
    }

    /// Classify `region` of `frame`.
    pub fn classify<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        region: Region,
    ) -> Result<Classification, StepError> {
        prepare_input(frame, region, &self.spec, self.input).map_err(StepError::Preprocess)?;
        self.backend
            .run(self.input, self.output)
            .map_err(StepError::Backend)?;
        classify(self.output).map_err(StepError::Postprocess)
    }

    /// Classify a whole frame and return it with its latency in microseconds from `clock`,
    /// counting the result in `health` (done with that latency, or an error by kind). The
    /// caller counts `frames_in` when it accepts the frame.
    pub fn process<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
    ) -> Result<(Classification, u64), StepError> {
        let started = clock.now_us();
        let g = frame.geometry();
        match self.classify(frame, Region::whole(g.width, g.height)) {
            Ok(c) => {
                let latency_us = clock.now_us().saturating_sub(started);
                health.record_done(latency_us);
                Ok((c, latency_us))
            }
            Err(e) => {
                health.record_error(e.kind());
                Err(e)
            }
        }
    }
}

/// How a detector's head is read and its tiles merged.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DetectorConfig {
    /// The head's kind, shape and meaning.
    pub head: Head,
    /// Lowest class score reported.
    pub score_threshold: f32,
    /// Same-class boxes overlapping a better one by more than this IoU are suppressed.
    pub nms_iou: f32,
    /// Pixels shared by neighbouring tiles; objects up to this size lie whole in some tile.
    pub tile_overlap: u32,
    /// A same-class box this much inside a better one (intersection over its own area) is a
    /// piece of it cut off by a tile edge, and is dropped.
    pub seam_containment: f32,
    /// Most detections of one class a frame reports (the best ones); the rest are counted as
    /// overflow.
    pub max_per_class: usize,
}

impl DetectorConfig {
    /// The detector's postprocessing as its plan states it, so that a board needs nothing but
    /// the plan; `None` for a classifier's plan. The head scores one class per label.
    pub fn from_plan(header: &PlanHeader<'_>) -> Option<Self> {
        let d = header.detector?;
        let [_, _, height, width] = header.input_shape;
        let head = Head::from_header(&d.head, height, width, header.labels().count());
        Some(Self {
            head,
            score_threshold: d.score_threshold,
            nms_iou: d.nms_iou,
            tile_overlap: d.tile_overlap,
            seam_containment: d.seam_containment,
            max_per_class: usize::from(d.max_per_class),
        })
    }
}

/// Finds objects in frames of any size with one detector backend: the frame is cut into
/// model-sized tiles that overlap by [`DetectorConfig::tile_overlap`] (a frame smaller than a
/// tile is padded with the band mean), each tile is decoded and suppressed, and the boxes are
/// mapped back to frame pixels and merged across seams. Allocates nothing per frame.
///
/// The built-in NWPU VHR-10 plan on the int8 CPU executor (compiled here, not run: a 512x512
/// tile is 1.4 G multiply-adds; `cargo run -p models --example detect_scene` runs it):
///
/// ```no_run
/// use kestrel_backend::Backend;
/// use kestrel_hal::FrameGeometry;
/// use kestrel_plan::cpu::Int8Cpu;
/// use kestrel_runtime::detect::Detections;
/// use kestrel_runtime::frame::FrameView;
/// use kestrel_runtime::step::{DetectorConfig, DetectorStep};
///
/// let backend = Int8Cpu::from_bytes(kestrel_zoo::NWPU_VHR10.plan)?;
/// let header = backend.program().header();
/// let spec = header.preprocess_spec()?;
/// let config = DetectorConfig::from_plan(header).ok_or("not a detector")?;
///
/// let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
/// // At most 128 boxes per tile before merging.
/// let mut step = DetectorStep::<_, 128>::new(backend, spec, config, &mut input, &mut output)?;
///
/// let geometry = FrameGeometry { width: 1024, height: 768, bands: 3 };
/// let samples = vec![90u8; 1024 * 768 * 3];
/// let mut found = Detections::<1024>::new();
/// step.detect(FrameView::new(geometry, &samples)?, &mut found)?;
/// for d in found.as_slice() {
///     // Frame pixels, (x, y) the top-left corner; best first.
///     println!("class {} score {:.2} at ({}, {}) {}x{}", d.class, d.score, d.x, d.y, d.w, d.h);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DetectorStep<'buf, B, const TILE_CAP: usize> {
    backend: B,
    spec: PreprocessSpec,
    config: DetectorConfig,
    input: &'buf mut [f32],
    output: &'buf mut [f32],
    tile: Detections<TILE_CAP>,
}

impl<'buf, B: Backend, const TILE_CAP: usize> DetectorStep<'buf, B, TILE_CAP> {
    /// Check that `spec`, the head layout and the buffers fit `backend`, and build the step.
    pub fn new(
        backend: B,
        spec: PreprocessSpec,
        config: DetectorConfig,
        input: &'buf mut [f32],
        output: &'buf mut [f32],
    ) -> Result<Self, SetupError> {
        let head_fits = config.head.len() == backend.output_len();
        SetupError::check(&backend, &spec, input, output, head_fits)?;
        Ok(Self {
            backend,
            spec,
            config,
            input,
            output,
            tile: Detections::new(),
        })
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The tiles this step would cut a `width` x `height` frame into.
    pub fn tiles(&self, width: u32, height: u32) -> Result<TileGrid, StepError> {
        TileGrid::new(
            width,
            height,
            self.spec.width() as u32,
            self.spec.height() as u32,
            self.config.tile_overlap,
        )
        .map_err(StepError::Tiles)
    }

    /// Every object in `frame`, in frame pixels, best first, into `found` (cleared first).
    /// Detections that did not fit a tile's or the frame's list are counted in
    /// [`Detections::overflow`].
    pub fn detect<S: Sample, const N: usize>(
        &mut self,
        frame: FrameView<'_, S>,
        found: &mut Detections<N>,
    ) -> Result<(), StepError> {
        found.clear();
        let g = frame.geometry();
        let grid = self.tiles(g.width, g.height)?;
        for row in 0..grid.rows() {
            self.detect_tile_row(frame, 0, &grid, row, found)?;
        }
        self.finish_frame(g.width, g.height, found);
        Ok(())
    }

    /// The tiles of tile row `row` of `grid` (this step's tiles of the whole frame), from
    /// `rows`: the frame's rows from `top` down, at least those the tile row covers that are
    /// inside the frame. Their detections are added to `found` in frame pixels; after the last
    /// tile row, [`DetectorStep::finish_frame`] merges them. For frames read a band of rows at
    /// a time; [`DetectorStep::detect`] is this over the whole frame.
    pub fn detect_tile_row<S: Sample, const N: usize>(
        &mut self,
        rows: FrameView<'_, S>,
        top: u32,
        grid: &TileGrid,
        row: u32,
        found: &mut Detections<N>,
    ) -> Result<(), StepError> {
        let c = self.config;
        let columns = grid.columns() as usize;
        for column in 0..columns {
            let Some(region) = grid.tile(row as usize * columns + column) else {
                break;
            };
            let local = Region {
                y: region
                    .y
                    .checked_sub(top)
                    .ok_or(StepError::Preprocess(PreprocessError::Region))?,
                ..region
            };
            prepare_input(rows, local, &self.spec, self.input).map_err(StepError::Preprocess)?;
            self.backend
                .run(self.input, self.output)
                .map_err(StepError::Backend)?;
            c.head
                .decode(self.output, c.score_threshold, &mut self.tile)
                .map_err(StepError::Detect)?;
            self.tile.suppress(c.nms_iou);
            found.add_from_tile(&self.tile, region.x as f32, region.y as f32, 1.0);
        }
        Ok(())
    }

    /// Merge the tile rows' detections of a `width` x `height` frame across seams, clip them to
    /// the frame, and keep each class's best.
    pub fn finish_frame<const N: usize>(&self, width: u32, height: u32, found: &mut Detections<N>) {
        let c = self.config;
        found.merge_tiles(c.nms_iou, c.seam_containment);
        found.clip_to(width as f32, height as f32);
        found.keep_per_class(c.max_per_class);
        if found.overflow() > 0 {
            warn!(
                "detections: {} boxes beyond the lists' capacity or the per-class cap were dropped",
                found.overflow()
            );
        }
    }

    /// [`DetectorStep::detect`], returning the latency in microseconds from `clock` and
    /// counting the frame in `health` (done, or an error by kind).
    pub fn process<S: Sample, const N: usize>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
        found: &mut Detections<N>,
    ) -> Result<u64, StepError> {
        let started = clock.now_us();
        match self.detect(frame, found) {
            Ok(()) => {
                let latency_us = clock.now_us().saturating_sub(started);
                health.record_done(latency_us);
                Ok(latency_us)
            }
            Err(e) => {
                health.record_error(e.kind());
                Err(e)
            }
        }
    }
}

/// A step that turns one whole frame into one result of type `Out`: what the threaded pipeline
/// runs, whichever model it is. [`ClassifierStep`] gives a [`Classification`];
/// [`DetectorStep`] gives the frame's [`Detections`] (up to `N`).
pub trait FrameStep<Out> {
    /// Process `frame`, count it in `health` (done with its latency, or an error by kind), and
    /// return the result with its latency in microseconds from `clock`.
    fn process_frame<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
    ) -> Result<(Out, u64), StepError>;

    /// The backend, to scrub and restore the model it holds (`None`: a step without one).
    fn backend(&mut self) -> Option<&mut dyn Backend> {
        None
    }
}

impl<B: Backend> FrameStep<Classification> for ClassifierStep<'_, B> {
    fn process_frame<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
    ) -> Result<(Classification, u64), StepError> {
        self.process(frame, clock, health)
    }

    fn backend(&mut self) -> Option<&mut dyn Backend> {
        Some(&mut self.backend)
    }
}

impl<B: Backend, const TILE_CAP: usize, const N: usize> FrameStep<Detections<N>>
    for DetectorStep<'_, B, TILE_CAP>
{
    fn process_frame<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
    ) -> Result<(Detections<N>, u64), StepError> {
        let mut found = Detections::new();
        let latency_us = self.process(frame, clock, health, &mut found)?;
        Ok((found, latency_us))
    }

    fn backend(&mut self) -> Option<&mut dyn Backend> {
        Some(&mut self.backend)
    }
}
