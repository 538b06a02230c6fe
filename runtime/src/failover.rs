//! Backend failover: a chain of backends for one model, in order of preference (CUDA, then the
//! int8 plan on the CPU, then tract). A frame the active backend fails on with a device fault
//! ([`BackendError::is_device_fault`]: out of memory, a failed launch, a lost device) is run
//! again on the next one, so no frame is lost to the fault; the chain then stays on that backend
//! and tries the preferred one again every `retry_every` frames, coming back to it when it runs
//! a frame. Each change is reported to the caller's `on_change` (an event on the telemetry).
//! Errors of the input (its length) are not device faults and are returned as they are.

use std::boxed::Box;
use std::time::Instant;
use std::vec::Vec;

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

/// A change of the active backend.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Failover {
    /// `from` failed with `error` and the frame was run again on `to`.
    FailedOver {
        /// The chain index that failed.
        from: usize,
        /// The one that took over.
        to: usize,
        /// Why.
        error: BackendError,
        /// From the failed call's start to the frame done on `to`, microseconds.
        recovery_us: u64,
    },
    /// The preferred backend ran a frame again and is active again.
    Restored {
        /// The index that was active until now.
        from: usize,
    },
    /// A scrub found backend `index`'s model corrupt; `restored`: reloaded from its golden copy.
    Corrupt {
        /// Its place in the chain.
        index: usize,
        /// Whether the restore succeeded.
        restored: bool,
    },
}

/// Why a chain cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// No backend given.
    Empty,
    /// Backend `index` takes or gives a different number of values from the first.
    Shape {
        /// Its place in the chain.
        index: usize,
    },
}

impl core::fmt::Display for ChainError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("a failover chain needs at least one backend"),
            Self::Shape { index } => write!(
                f,
                "backend {index} of the failover chain has another input or output size than the first"
            ),
        }
    }
}

impl std::error::Error for ChainError {}

/// What the chain has done, for health and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailoverStats {
    /// Frames run again on a later backend after a device fault.
    pub failovers: u64,
    /// Returns to the preferred backend.
    pub restorations: u64,
    /// Frames that failed on every backend.
    pub exhausted: u64,
}

/// Backends for one model, in order of preference, as one [`Backend`].
pub struct FailoverBackend {
    chain: Vec<Box<dyn Backend + Send>>,
    active: usize,
    retry_every: u64,
    since_failover: u64,
    on_change: Box<dyn FnMut(Failover) + Send>,
    /// What it has done.
    pub stats: FailoverStats,
}

impl FailoverBackend {
    /// `chain`, best first, all for the same model; the preferred one is tried again every
    /// `retry_every` frames after a failover (0: never).
    pub fn new(
        chain: Vec<Box<dyn Backend + Send>>,
        retry_every: u64,
        on_change: Box<dyn FnMut(Failover) + Send>,
    ) -> Result<Self, ChainError> {
        let first = chain.first().ok_or(ChainError::Empty)?;
        let shape = (first.input_len(), first.output_len());
        if let Some(index) = chain
            .iter()
            .position(|b| (b.input_len(), b.output_len()) != shape)
        {
            return Err(ChainError::Shape { index });
        }
        Ok(Self {
            chain,
            active: 0,
            retry_every,
            since_failover: 0,
            on_change,
            stats: FailoverStats::default(),
        })
    }

    /// The index of the backend now running frames.
    pub fn active(&self) -> usize {
        self.active
    }

    /// The name of the backend at `index` of the chain.
    pub fn name_of(&self, index: usize) -> Option<&'static str> {
        self.chain.get(index).map(|b| b.name())
    }

    /// Try the preferred backend on this frame, if it is time; true when it ran it.
    fn try_preferred(&mut self, input: &[f32], output: &mut [f32]) -> bool {
        if self.active == 0 || self.retry_every == 0 || self.since_failover < self.retry_every {
            return false;
        }
        self.since_failover = 0;
        let Some(preferred) = self.chain.first_mut() else {
            return false;
        };
        if preferred.run(input, output).is_err() {
            return false;
        }
        let from = self.active;
        self.active = 0;
        self.stats.restorations += 1;
        (self.on_change)(Failover::Restored { from });
        true
    }
}

impl Backend for FailoverBackend {
    fn name(&self) -> &'static str {
        self.name_of(self.active).unwrap_or("failover")
    }

    fn input_len(&self) -> usize {
        self.chain.first().map_or(0, |b| b.input_len())
    }

    fn output_len(&self) -> usize {
        self.chain.first().map_or(0, |b| b.output_len())
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.since_failover = self.since_failover.saturating_add(1);
        if self.try_preferred(input, output) {
            return Ok(());
        }
        let started = Instant::now();
        let mut failed: Option<(usize, BackendError)> = None;
        while let Some(backend) = self.chain.get_mut(self.active) {
            match backend.run(input, output) {
                Ok(()) => {
                    if let Some((from, error)) = failed {
                        self.stats.failovers += 1;
                        self.since_failover = 0;
                        (self.on_change)(Failover::FailedOver {
                            from,
                            to: self.active,
                            error,
                            recovery_us: started.elapsed().as_micros() as u64,
                        });
                    }
                    return Ok(());
                }
                Err(error) if error.is_device_fault() && self.active + 1 < self.chain.len() => {
                    // The first failure is the one reported; a later backend failing too
                    // moves the frame on again.
                    failed.get_or_insert((self.active, error));
                    self.active += 1;
                }
                Err(error) => {
                    if error.is_device_fault() {
                        self.stats.exhausted += 1;
                    }
                    return Err(error);
                }
            }
        }
        Err(BackendError::NotAvailable)
    }

    /// Every backend of the chain is scrubbed, the standby ones too: a fallback must be
    /// intact when it is needed.
    fn scrub(&mut self) -> Scrub {
        self.chain
            .iter_mut()
            .fold(Scrub::Uncovered, |found, b| match (found, b.scrub()) {
                (Scrub::Corrupt, _) | (_, Scrub::Corrupt) => Scrub::Corrupt,
                (Scrub::Clean, _) | (_, Scrub::Clean) => Scrub::Clean,
                _ => Scrub::Uncovered,
            })
    }

    /// Each corrupt backend of the chain is restored, and reported.
    fn restore(&mut self) -> Result<(), BackendError> {
        let mut result = Ok(());
        for (index, backend) in self.chain.iter_mut().enumerate() {
            if backend.scrub() == Scrub::Corrupt {
                let restored = backend.restore();
                (self.on_change)(Failover::Corrupt {
                    index,
                    restored: restored.is_ok(),
                });
                result = result.and(restored);
            }
        }
        result
    }

    /// The active backend takes the upset, or the first one that has such memory.
    fn upset(&mut self, upset: Upset) -> Landed {
        let active = self.active;
        if let Some(landed) = self
            .chain
            .get_mut(active)
            .map(|b| b.upset(upset))
            .filter(|&l| l != Landed::Missed)
        {
            return landed;
        }
        self.chain
            .iter_mut()
            .map(|b| b.upset(upset))
            .find(|&l| l != Landed::Missed)
            .unwrap_or(Landed::Missed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Doubles its input; fails with `error` on the calls listed (counting from 0).
    struct Scripted {
        name: &'static str,
        calls: usize,
        fails: Vec<usize>,
        error: BackendError,
        len: usize,
    }

    impl Scripted {
        fn new(name: &'static str, fails: Vec<usize>, error: BackendError) -> Box<Self> {
            Box::new(Self {
                name,
                calls: 0,
                fails,
                error,
                len: 2,
            })
        }
    }

    impl Backend for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }
        fn input_len(&self) -> usize {
            self.len
        }
        fn output_len(&self) -> usize {
            self.len
        }
        fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
            if input.len() != self.len {
                return Err(BackendError::InputLength {
                    expected: self.len,
                    got: input.len(),
                });
            }
            let call = self.calls;
            self.calls += 1;
            if self.fails.contains(&call) {
                return Err(self.error);
            }
            for (o, i) in output.iter_mut().zip(input) {
                *o = 2.0 * i;
            }
            Ok(())
        }
    }

    fn chain(
        backends: Vec<Box<dyn Backend + Send>>,
        retry_every: u64,
    ) -> (FailoverBackend, Arc<Mutex<Vec<Failover>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let backend = FailoverBackend::new(
            backends,
            retry_every,
            Box::new(move |change| sink.lock().unwrap().push(change)),
        )
        .unwrap();
        (backend, log)
    }

    #[test]
    fn a_device_fault_reruns_the_frame_on_the_next_backend_and_the_preferred_comes_back() {
        let (mut backend, log) = chain(
            vec![
                Scripted::new("cuda", vec![3, 4], BackendError::DeviceLost),
                Scripted::new("int8-cpu", vec![], BackendError::Execution),
            ],
            5,
        );
        let mut output = [0.0; 2];
        for frame in 0..20 {
            backend.run(&[frame as f32, 1.0], &mut output).unwrap();
            assert_eq!(output, [2.0 * frame as f32, 2.0], "frame {frame}");
        }
        let log = log.lock().unwrap();
        assert!(matches!(
            log[0],
            Failover::FailedOver {
                from: 0,
                to: 1,
                error: BackendError::DeviceLost,
                ..
            }
        ));
        // Frame 3 failed over; the preferred was tried again 5 frames later (its 5th call,
        // which fails), then 5 after that, and stayed.
        assert_eq!(log[1], Failover::Restored { from: 1 });
        assert_eq!(log.len(), 2);
        assert_eq!(backend.active(), 0);
        assert_eq!(
            backend.stats,
            FailoverStats {
                failovers: 1,
                restorations: 1,
                exhausted: 0
            }
        );
    }

    #[test]
    fn input_errors_are_not_failed_over_and_an_exhausted_chain_says_why() {
        let (mut backend, log) = chain(
            vec![
                Scripted::new("cuda", vec![0, 1], BackendError::OutOfMemory),
                Scripted::new("int8-cpu", vec![1], BackendError::LaunchFailed),
            ],
            0,
        );
        let mut output = [0.0; 2];
        assert_eq!(
            backend.run(&[1.0], &mut output),
            Err(BackendError::InputLength {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(backend.active(), 0, "a bad input is not the device's fault");
        backend.run(&[1.0, 1.0], &mut output).unwrap();
        assert_eq!(backend.active(), 1, "out of memory: failed over");
        // The fallback fails too and is the last: the frame's error is returned and counted.
        assert_eq!(
            backend.run(&[1.0, 1.0], &mut output),
            Err(BackendError::LaunchFailed)
        );
        assert_eq!(backend.stats.exhausted, 1);
        assert_eq!(log.lock().unwrap().len(), 1, "one failover, no restoration");
        let shapes = FailoverBackend::new(
            vec![
                Scripted::new("a", vec![], BackendError::Execution),
                Box::new(Scripted {
                    len: 3,
                    ..*Scripted::new("b", vec![], BackendError::Execution)
                }),
            ],
            0,
            Box::new(|_| {}),
        );
        assert!(matches!(shapes, Err(ChainError::Shape { index: 1 })));
    }
}
