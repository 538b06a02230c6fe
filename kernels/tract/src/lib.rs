//! The tract float backend: runs an ONNX model on the CPU through tract-onnx.
//!
//! It is the fallback that runs any model the zoo ships, and the float reference that int8 plans
//! are checked against. Its own crate, so that nothing in a flight build depends on tract.
#![deny(missing_docs)]

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use kestrel_backend::{Backend, BackendError};

type Runnable = Arc<TypedRunnableModel>;

/// Why a model could not be loaded. The message names the model file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file at that path.
    #[error("{origin}: model file not found")]
    Missing {
        /// The path that was tried.
        origin: String,
    },
    /// The file exists but could not be read.
    #[error("{origin}: cannot read model file: {reason}")]
    Unreadable {
        /// The path that was tried.
        origin: String,
        /// The I/O error (in the message, not the error's source: printed once).
        reason: std::io::Error,
    },
    /// The bytes are not an ONNX model tract can load and optimise.
    #[error("{origin}: not a usable ONNX model: {reason}")]
    Malformed {
        /// The path or name of the model.
        origin: String,
        /// tract's explanation, on one line.
        reason: String,
    },
    /// The model's declared input shape differs from the one its manifest promises.
    #[error("{origin}: model input shape {found:?} does not match the manifest's {expected:?}")]
    InputShape {
        /// The path or name of the model.
        origin: String,
        /// Shape from the manifest.
        expected: Vec<usize>,
        /// Shape declared by the ONNX graph.
        found: Vec<usize>,
    },
}

/// An ONNX model optimised by tract for one fixed input shape.
pub struct TractBackend {
    model: Runnable,
    input_shape: Vec<usize>,
    output_len: usize,
    last_error: Option<String>,
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("input_shape", &self.input_shape)
            .field("output_len", &self.output_len)
            .finish()
    }
}

impl TractBackend {
    /// Load the ONNX file at `path`, expecting an input of `input_shape` (e.g. `[1, 3, 64, 64]`).
    pub fn from_file(path: &Path, input_shape: &[usize]) -> Result<Self, LoadError> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing {
                origin: origin.clone(),
            },
            _ => LoadError::Unreadable {
                origin: origin.clone(),
                reason: source,
            },
        })?;
        Self::from_bytes(&origin, &bytes, input_shape)
    }

    /// Load an ONNX model from memory; `origin` names it in errors.
    pub fn from_bytes(
        origin: &str,
        bytes: &[u8],
        input_shape: &[usize],
    ) -> Result<Self, LoadError> {
        Self::from_bytes_up_to(origin, bytes, input_shape, &[])
    }

    /// As [`TractBackend::from_bytes`], the model's output being the values named `outputs`
    /// (ONNX tensor names), flattened and concatenated in that order, and nothing after them
    /// run; none named: the model's own output. A YOLO model runs up to its raw head so.
    pub fn from_bytes_up_to(
        origin: &str,
        bytes: &[u8],
        input_shape: &[usize],
        outputs: &[String],
    ) -> Result<Self, LoadError> {
        let malformed = |e: TractError| LoadError::Malformed {
            origin: origin.to_string(),
            reason: one_line(&e),
        };
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(malformed)?;
        if let Some(found) = declared_input_shape(&model) {
            if found != input_shape {
                return Err(LoadError::InputShape {
                    origin: origin.to_string(),
                    expected: input_shape.to_vec(),
                    found,
                });
            }
        }
        model
            .set_input_fact(0, f32::fact(input_shape).into())
            .map_err(malformed)?;
        if !outputs.is_empty() {
            model.select_outputs_by_name(outputs).map_err(malformed)?;
        }
        let typed = model.into_optimized().map_err(malformed)?;
        let lengths = (0..typed.outputs.len()).map(|ix| {
            typed.output_fact(ix).ok().and_then(|fact| {
                fact.shape
                    .as_concrete()
                    .map(|dims| dims.iter().product::<usize>())
            })
        });
        let output_len = lengths
            .sum::<Option<usize>>()
            .ok_or_else(|| LoadError::Malformed {
                origin: origin.to_string(),
                reason: "output shape is not fixed".to_string(),
            })?;
        let model = typed.into_runnable().map_err(malformed)?;
        Ok(Self {
            model,
            input_shape: input_shape.to_vec(),
            output_len,
            last_error: None,
        })
    }

    /// tract's message for the last failed [`Backend::run`], if any.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// The input shape the ONNX graph declares, when every dimension is a fixed number.
fn declared_input_shape(model: &InferenceModel) -> Option<Vec<usize>> {
    let fact = model.input_fact(0).ok()?;
    let dims = fact.shape.concretize()?;
    dims.iter().map(|d| d.to_usize().ok()).collect()
}

fn one_line(e: &TractError) -> String {
    format!("{e:#}").replace('\n', " ")
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    fn output_len(&self) -> usize {
        self.output_len
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        let result = Tensor::from_shape(&self.input_shape, input)
            .and_then(|tensor| self.model.run(tvec!(tensor.into())))
            .and_then(|outputs| {
                let mut rest = &mut output[..];
                for tensor in &outputs {
                    let values = tensor.to_plain_array_view::<f32>()?;
                    let (part, after) = std::mem::take(&mut rest)
                        .split_at_mut_checked(values.len())
                        .ok_or_else(|| TractError::msg("model produced too many values"))?;
                    part.iter_mut()
                        .zip(values.iter())
                        .for_each(|(o, v)| *o = *v);
                    rest = after;
                }
                if !rest.is_empty() {
                    return Err(TractError::msg("model produced too few values"));
                }
                Ok(())
            });
        result.map_err(|e| {
            self.last_error = Some(one_line(&e));
            BackendError::Execution
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zoo_model() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/zoo/eurosat-rgb/model.onnx")
    }

    #[test]
    fn loads_and_runs_the_zoo_classifier() {
        let mut backend = TractBackend::from_file(&zoo_model(), &[1, 3, 64, 64]).unwrap();
        assert_eq!(
            (backend.input_len(), backend.output_len()),
            (3 * 64 * 64, 10)
        );
        let mut output = [f32::NAN; 10];
        backend.run(&[0.0; 3 * 64 * 64], &mut output).unwrap();
        assert!(output.iter().all(|v| v.is_finite()));
        assert_eq!(
            backend.run(&[0.0; 5], &mut output),
            Err(BackendError::InputLength {
                expected: 12288,
                got: 5
            })
        );
        assert_eq!(
            backend.run(&[0.0; 12288], &mut output[..3]),
            Err(BackendError::OutputLength {
                expected: 10,
                got: 3
            })
        );
    }

    #[test]
    fn typed_errors_for_missing_malformed_and_mismatched_models() {
        let missing = TractBackend::from_file(Path::new("/nonexistent/m.onnx"), &[1, 3, 64, 64]);
        assert!(matches!(missing, Err(LoadError::Missing { .. })));
        let dir = TractBackend::from_file(Path::new(env!("CARGO_MANIFEST_DIR")), &[1, 3, 64, 64]);
        assert!(matches!(dir, Err(LoadError::Unreadable { .. })), "{dir:?}");
        let garbage =
            TractBackend::from_bytes("garbage", b"definitely not protobuf", &[1, 3, 64, 64]);
        assert!(
            matches!(garbage, Err(LoadError::Malformed { .. })),
            "{garbage:?}"
        );
        let shape = TractBackend::from_file(&zoo_model(), &[1, 3, 32, 32]).unwrap_err();
        assert_eq!(
            shape.to_string(),
            format!(
                "{}: model input shape [1, 3, 64, 64] does not match the manifest's [1, 3, 32, 32]",
                zoo_model().display()
            )
        );
    }
}
