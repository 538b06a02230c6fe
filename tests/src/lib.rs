//! Helpers shared by the integration tests in `tests/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kestrel_backend::{Backend, BackendError, PreprocessSpec};
use kestrel_hal::{Frame, FrameGeometry, FrameMeta, FrameSource};
use kestrel_host::decode_image;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};

/// The entries of `dir`, sorted by path.
pub fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// The image at `path`, whole, as the runtime prepares a model input from it.
pub fn whole_image_input(path: &Path, spec: &PreprocessSpec) -> Vec<f32> {
    let image = decode_image(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = image.geometry;
    let view = FrameView::new(g, &image.samples).unwrap();
    let mut input = vec![0.0; spec.input_len()];
    prepare_input(view, Region::whole(g.width, g.height), spec, &mut input).unwrap();
    input
}

/// A model that takes `delay` per frame and "classifies" a 2x2 single-band frame by its first
/// sample: class = sample % 4. It fails on frame `fail_on` and panics on frame `panic_on`.
pub struct SlowBackend {
    /// Time per frame.
    pub delay: Duration,
    /// The frame it fails on.
    pub fail_on: Option<u64>,
    /// The frame it panics on.
    pub panic_on: Option<u64>,
}

/// A [`SlowBackend`] of `delay_ms` per frame that never fails.
pub fn slow(delay_ms: u64) -> SlowBackend {
    SlowBackend {
        delay: Duration::from_millis(delay_ms),
        fail_on: None,
        panic_on: None,
    }
}

impl Backend for SlowBackend {
    fn name(&self) -> &'static str {
        "slow-test"
    }
    fn input_len(&self) -> usize {
        4
    }
    fn output_len(&self) -> usize {
        4
    }
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        std::thread::sleep(self.delay);
        let frame = input[0] as u64;
        if self.fail_on == Some(frame) {
            return Err(BackendError::Execution);
        }
        if self.panic_on == Some(frame) {
            panic!("simulated driver crash on frame {frame}");
        }
        output.fill(0.0);
        output[input[0] as usize % 4] = 10.0;
        Ok(())
    }
}

/// `count` frames as fast as the pipeline takes them. Frame `i` carries sample `i`; frames
/// listed in `corrupt` fail at the source, frames in `wrong_bands` have 3 bands instead of 1.
pub struct BurstSource {
    /// The next frame's number.
    pub next: u64,
    /// Frames in all.
    pub count: u64,
    /// Frames that fail at the source.
    pub corrupt: Vec<u64>,
    /// Frames with 3 bands.
    pub wrong_bands: Vec<u64>,
}

impl FrameSource<u8> for BurstSource {
    type Error = String;
    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, String> {
        if self.next == self.count {
            return Ok(None);
        }
        let i = self.next;
        self.next += 1;
        if self.corrupt.contains(&i) {
            return Err(format!("frame {i}: corrupt"));
        }
        let bands = if self.wrong_bands.contains(&i) { 3 } else { 1 };
        buffer[..4 * bands as usize].fill(i as u8);
        Ok(Some(Frame {
            geometry: FrameGeometry {
                width: 2,
                height: 2,
                bands,
            },
            meta: FrameMeta {
                sequence: i,
                capture_us: 1_000 * i,
                ..FrameMeta::default()
            },
        }))
    }
}

/// The index of the largest value (the first of equals; NaN sorts as the largest).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Pieces for building small plans by hand with `ProgramBuilder`: a 2-band 4x4 input header,
/// requantisation and steps.
pub mod plans {
    use kestrel_backend::MAX_BANDS;
    use kestrel_ops::int8::OutputQuant;
    use kestrel_ops::quant::Requant;
    use kestrel_plan::plan::PlanHeader;
    use kestrel_plan::program::{Op, Step};

    /// The whole int8 range, zero point 1.
    pub const FULL: OutputQuant = OutputQuant {
        zero_point: 1,
        min: -128,
        max: 127,
    };

    /// A classifier's header for a `[1, 2, 4, 4]` input and `output_len` values of tensor
    /// `output_tensor`, three labels.
    pub fn header(
        name: &'static str,
        arena_size: u32,
        output_tensor: u16,
        output_len: u32,
    ) -> PlanHeader<'static> {
        PlanHeader {
            name,
            onnx_sha256: "00",
            input_shape: [1, 2, 4, 4],
            output_len,
            bands: 2,
            mean: [0.0; MAX_BANDS],
            std: [1.0; MAX_BANDS],
            resize: 1,
            labels: "a\nb\nc",
            arena_size,
            output_tensor,
            input_scale: 0.05,
            input_zero_point: -3,
            output_scale: 0.1,
            output_zero_point: 2,
            output_softmax: false,
            detector: None,
        }
    }

    /// `real` as a fixed-point requantisation.
    pub fn requant(real: f64) -> Requant {
        Requant::from_real(real).unwrap()
    }

    /// `op` from tensors `inputs` to `output`.
    pub fn step(op: Op, inputs: [u16; 2], output: u16) -> Step {
        Step { op, inputs, output }
    }
}
