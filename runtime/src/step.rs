//! One frame (or tile) through preprocessing, the backend and postprocessing, with no allocation.

use kestrel_kernels::{Backend, BackendError, PreprocessSpec};

use crate::classify::{classify, Classification, PostprocessError};
use crate::frame::{FrameView, Sample};
use crate::health::{ErrorKind, Health};
use crate::preprocess::{prepare_input, PreprocessError, Region};
use crate::MonotonicClock;

/// Why a frame could not be classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StepError {
    /// The frame does not fit the model.
    Preprocess(PreprocessError),
    /// The backend failed.
    Backend(BackendError),
    /// The model output is unusable.
    Postprocess(PostprocessError),
}

impl StepError {
    /// The health counter this error is counted under.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Preprocess(_) => ErrorKind::Frame,
            Self::Backend(_) => ErrorKind::Backend,
            Self::Postprocess(_) => ErrorKind::Output,
        }
    }
}

impl core::fmt::Display for StepError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Preprocess(e) => write!(f, "{e}"),
            Self::Backend(e) => write!(f, "{e}"),
            Self::Postprocess(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for StepError {}

/// Why a [`ClassifierStep`] could not be set up: the buffers or spec do not fit the backend.
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
        let fits = backend.input_len() == spec.input_len()
            && input.len() == spec.input_len()
            && output.len() == backend.output_len()
            && !output.is_empty();
        if !fits {
            return Err(SetupError {
                backend_input: backend.input_len(),
                spec_input: spec.input_len(),
                input_buffer: input.len(),
                backend_output: backend.output_len(),
                output_buffer: output.len(),
            });
        }
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
