//! Switching the active model without a restart (the `switch_model` command): a backend whose
//! model another thread can replace. The new model is loaded and checked by the caller, off the
//! inference thread; [`SwitchHandle::switch_to`] refuses one whose input or output does not fit
//! the pipeline's buffers, and the swap itself happens between two frames, so no frame runs
//! half on one model and half on the other.

use std::boxed::Box;
use std::sync::{Arc, Mutex};

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

/// A model ready to take over.
type Pending = Arc<Mutex<Option<Box<dyn Backend + Send>>>>;

/// A backend whose model can be replaced between frames through its [`SwitchHandle`].
pub struct SwitchableBackend {
    active: Box<dyn Backend + Send>,
    pending: Pending,
}

/// Replaces the model of a [`SwitchableBackend`] from any thread.
#[derive(Clone)]
pub struct SwitchHandle {
    pending: Pending,
    input_len: usize,
    output_len: usize,
}

/// Why a model cannot take over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchError {
    /// Its input or output length differs from the active model's.
    Shape {
        /// The active model's (input, output) lengths.
        expected: (usize, usize),
        /// The new model's.
        got: (usize, usize),
    },
}

impl core::fmt::Display for SwitchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Shape { expected, got } => write!(
                f,
                "the new model takes {} inputs and gives {} outputs; the pipeline's buffers are for {} and {}",
                got.0, got.1, expected.0, expected.1
            ),
        }
    }
}

impl std::error::Error for SwitchError {}

impl SwitchableBackend {
    /// `active` as a switchable backend, and the handle that switches it.
    pub fn new(active: Box<dyn Backend + Send>) -> (Self, SwitchHandle) {
        let pending: Pending = Arc::new(Mutex::new(None));
        let handle = SwitchHandle {
            pending: Arc::clone(&pending),
            input_len: active.input_len(),
            output_len: active.output_len(),
        };
        (Self { active, pending }, handle)
    }
}

impl SwitchHandle {
    /// Make `backend` the active model from the next frame on.
    pub fn switch_to(&self, backend: Box<dyn Backend + Send>) -> Result<(), SwitchError> {
        let got = (backend.input_len(), backend.output_len());
        let expected = (self.input_len, self.output_len);
        if got != expected {
            return Err(SwitchError::Shape { expected, got });
        }
        // A poisoned lock only means another switch panicked part-way; the slot is still a
        // plain Option, so take it over.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *pending = Some(backend);
        Ok(())
    }
}

impl Backend for SwitchableBackend {
    fn name(&self) -> &'static str {
        self.active.name()
    }

    fn input_len(&self) -> usize {
        self.active.input_len()
    }

    fn output_len(&self) -> usize {
        self.active.output_len()
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        let next = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(next) = next {
            self.active = next;
        }
        self.active.run(input, output)
    }

    fn scrub(&mut self) -> Scrub {
        self.active.scrub()
    }

    fn restore(&mut self) -> Result<(), BackendError> {
        self.active.restore()
    }

    fn upset(&mut self, upset: Upset) -> Landed {
        self.active.upset(upset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes its `value` to every output.
    struct Constant {
        value: f32,
        input_len: usize,
    }

    impl Backend for Constant {
        fn name(&self) -> &'static str {
            "constant"
        }
        fn input_len(&self) -> usize {
            self.input_len
        }
        fn output_len(&self) -> usize {
            2
        }
        fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
            self.check_lengths(input, output)?;
            output.fill(self.value);
            Ok(())
        }
    }

    #[test]
    fn a_switch_takes_effect_at_the_next_frame_and_a_misfit_is_refused() {
        let (mut backend, handle) = SwitchableBackend::new(Box::new(Constant {
            value: 1.0,
            input_len: 3,
        }));
        let (input, mut output) = ([0.0; 3], [0.0; 2]);
        backend.run(&input, &mut output).unwrap();
        assert_eq!(output, [1.0; 2]);
        let other = std::thread::spawn(move || {
            handle.switch_to(Box::new(Constant {
                value: 2.0,
                input_len: 3,
            }))?;
            handle.switch_to(Box::new(Constant {
                value: 3.0,
                input_len: 4,
            }))
        });
        assert_eq!(
            other.join().unwrap(),
            Err(SwitchError::Shape {
                expected: (3, 2),
                got: (4, 2)
            })
        );
        backend.run(&input, &mut output).unwrap();
        assert_eq!(output, [2.0; 2], "the fitting model took over");
    }
}
