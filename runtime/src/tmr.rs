//! Triple-modular redundancy: a model run three times on the same input and each output value
//! voted, so that an upset striking one run (a flipped activation, which no checksum sees) is
//! outvoted by the other two. It costs three inferences per frame; `RELIABILITY.md` has the
//! measured cost and what it recovers.

use std::vec::Vec;

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

/// What the votes found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Votes {
    /// Inferences voted on.
    pub inferences: u64,
    /// Of those, inferences where the three runs disagreed somewhere (an upset outvoted, or
    /// three different values, for which the median is taken).
    pub disagreements: u64,
}

/// `inner`, run three times per inference and voted value by value.
pub struct TmrBackend<B> {
    inner: B,
    runs: [Vec<f32>; 2],
    /// What the votes found, shared with whoever reports it.
    pub votes: std::sync::Arc<std::sync::Mutex<Votes>>,
}

impl<B: Backend> TmrBackend<B> {
    /// `inner` under triple-modular redundancy.
    pub fn new(inner: B) -> Self {
        let len = inner.output_len();
        Self {
            runs: [std::vec![0.0; len], std::vec![0.0; len]],
            inner,
            votes: std::sync::Arc::default(),
        }
    }
}

/// The value at least two of three agree on, bit for bit; else the median.
fn vote(a: f32, b: f32, c: f32) -> f32 {
    if a.to_bits() == b.to_bits() || a.to_bits() == c.to_bits() {
        a
    } else if b.to_bits() == c.to_bits() {
        b
    } else {
        a.max(b).min(a.min(b).max(c))
    }
}

impl<B: Backend> Backend for TmrBackend<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn input_len(&self) -> usize {
        self.inner.input_len()
    }

    fn output_len(&self) -> usize {
        self.inner.output_len()
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        let [second, third] = &mut self.runs;
        self.inner.run(input, output)?;
        self.inner.run(input, second)?;
        self.inner.run(input, third)?;
        let mut disagreed = false;
        for ((a, b), c) in output.iter_mut().zip(second.iter()).zip(third.iter()) {
            disagreed |= a.to_bits() != b.to_bits() || a.to_bits() != c.to_bits();
            *a = vote(*a, *b, *c);
        }
        let mut votes = self.votes.lock().unwrap_or_else(|p| p.into_inner());
        votes.inferences += 1;
        votes.disagreements += u64::from(disagreed);
        Ok(())
    }

    fn scrub(&mut self) -> Scrub {
        self.inner.scrub()
    }

    fn restore(&mut self) -> Result<(), BackendError> {
        self.inner.restore()
    }

    fn upset(&mut self, upset: Upset) -> Landed {
        self.inner.upset(upset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs its input plus the call number on the calls listed, its input otherwise.
    struct Glitchy {
        calls: usize,
        glitches: Vec<usize>,
    }

    impl Backend for Glitchy {
        fn name(&self) -> &'static str {
            "glitchy"
        }
        fn input_len(&self) -> usize {
            3
        }
        fn output_len(&self) -> usize {
            3
        }
        fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
            let glitch = self.glitches.contains(&self.calls);
            self.calls += 1;
            for (o, i) in output.iter_mut().zip(input) {
                *o = *i + if glitch { 100.0 } else { 0.0 };
            }
            Ok(())
        }
    }

    #[test]
    fn one_run_in_three_going_wrong_is_outvoted() {
        let mut tmr = TmrBackend::new(Glitchy {
            calls: 0,
            glitches: vec![1, 3, 7, 8],
        });
        let mut output = [0.0; 3];
        // Calls 0-2: the second glitches; 3-5: the first; 6-8: two of three glitch alike,
        // and the vote goes with them (TMR corrects one fault, not two).
        tmr.run(&[1.0, 2.0, 3.0], &mut output).unwrap();
        assert_eq!(output, [1.0, 2.0, 3.0]);
        tmr.run(&[1.0, 2.0, 3.0], &mut output).unwrap();
        assert_eq!(output, [1.0, 2.0, 3.0]);
        tmr.run(&[1.0, 2.0, 3.0], &mut output).unwrap();
        assert_eq!(output, [101.0, 102.0, 103.0]);
        assert_eq!(
            *tmr.votes.lock().unwrap(),
            Votes {
                inferences: 3,
                disagreements: 3
            }
        );
        assert_eq!(vote(1.0, 5.0, 3.0), 3.0, "no two agree: the median");
    }
}
