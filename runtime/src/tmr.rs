//! Triple-modular redundancy: a model run three times on the same input and each output value
//! voted, so that an upset striking one run (a flipped activation, which no checksum sees) is
//! outvoted by the other two. It costs three inferences per frame, or, guarding high-priority
//! products only ([`Guard::Priority`]), three for those and one for the rest; `RELIABILITY.md`
//! has the measured cost and what it recovers.

use std::vec::Vec;

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};

use crate::detect::Head;

/// Which inferences are run three times and voted.
#[derive(Clone, Debug, PartialEq)]
pub enum Guard {
    /// Every one.
    Every,
    /// Those whose first run makes a high-priority product: a classification whose top class
    /// is one of `classes`, or, for a detector's head (`head`), one of `classes` scoring at
    /// least the threshold somewhere. The others keep their single run. The first run decides,
    /// so an upset that hides a priority product in it goes unvoted; one that makes a product
    /// look like a priority one is voted out.
    Priority {
        /// Class indices.
        classes: Vec<usize>,
        /// A detector's head and its reporting threshold; `None`: a classifier.
        head: Option<(Head, f32)>,
    },
}

impl Guard {
    /// The guard for `classes` named among `labels` (none named: every inference), with a
    /// detector's head layout and reporting threshold; an unknown name is an error that names
    /// it and the labels there are.
    pub fn for_classes(
        classes: &[std::string::String],
        labels: &[std::string::String],
        head: Option<(Head, f32)>,
    ) -> Result<Self, std::string::String> {
        if classes.is_empty() {
            return Ok(Self::Every);
        }
        let indices = classes
            .iter()
            .map(|name| {
                labels.iter().position(|l| l == name).ok_or_else(|| {
                    std::format!(
                        "no class {name:?} in this model (its classes: {})",
                        labels.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<usize>, _>>()?;
        Ok(Self::Priority {
            classes: indices,
            head,
        })
    }

    /// Whether `output` (a first run's) is to be voted.
    fn wants_vote(&self, output: &[f32]) -> bool {
        let Self::Priority { classes, head } = self else {
            return true;
        };
        match head {
            None => {
                let top = output
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                top.is_some_and(|t| classes.contains(&t))
            }
            Some((head, threshold)) => classes
                .iter()
                .any(|&c| head.class_scores(output, c, *threshold)),
        }
    }
}

/// What the votes found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Votes {
    /// Inferences run once: not high-priority under [`Guard::Priority`].
    pub single: u64,
    /// Inferences voted on.
    pub inferences: u64,
    /// Of those, inferences where the three runs disagreed somewhere (an upset outvoted, or
    /// three different values, for which the median is taken).
    pub disagreements: u64,
}

/// `inner`, run three times per inference and voted value by value.
pub struct TmrBackend<B> {
    inner: B,
    guard: Guard,
    runs: [Vec<f32>; 2],
    /// What the votes found, shared with whoever reports it.
    pub votes: std::sync::Arc<std::sync::Mutex<Votes>>,
}

impl<B: Backend> TmrBackend<B> {
    /// `inner` under triple-modular redundancy, every inference voted.
    pub fn new(inner: B) -> Self {
        Self::guarding(inner, Guard::Every)
    }

    /// `inner` under triple-modular redundancy for the inferences `guard` picks.
    pub fn guarding(inner: B, guard: Guard) -> Self {
        let len = inner.output_len();
        Self {
            runs: [std::vec![0.0; len], std::vec![0.0; len]],
            inner,
            guard,
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
        if !self.guard.wants_vote(output) {
            self.votes.lock().unwrap_or_else(|p| p.into_inner()).single += 1;
            return Ok(());
        }
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
    use crate::detect::HeadLayout;

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
                single: 0,
                inferences: 3,
                disagreements: 3
            }
        );
        assert_eq!(vote(1.0, 5.0, 3.0), 3.0, "no two agree: the median");
    }

    #[test]
    fn a_priority_guard_votes_only_priority_products() {
        // A classifier whose class 2 is high-priority: the input is its output, so the top
        // class is the input's largest value.
        let guard = Guard::Priority {
            classes: vec![2],
            head: None,
        };
        let mut tmr = TmrBackend::guarding(
            Glitchy {
                calls: 0,
                glitches: vec![2],
            },
            guard,
        );
        let mut output = [0.0; 3];
        tmr.run(&[3.0, 1.0, 0.0], &mut output).unwrap();
        assert_eq!(output, [3.0, 1.0, 0.0], "class 0: one run");
        // Calls 1-3, the second glitching: voted out.
        tmr.run(&[0.0, 1.0, 3.0], &mut output).unwrap();
        assert_eq!(output, [0.0, 1.0, 3.0], "class 2: voted");
        assert_eq!(
            *tmr.votes.lock().unwrap(),
            Votes {
                single: 1,
                inferences: 1,
                disagreements: 1
            }
        );

        // A detector head of 2 classes on 1x2 cells: class 1 is high-priority.
        let layout = HeadLayout {
            classes: 2,
            height: 1,
            width: 2,
            stride: 1.0,
            wh_scale: 1.0,
        };
        let guard = Guard::Priority {
            classes: vec![1],
            head: Some((Head::CenterNet(layout), 0.5)),
        };
        let mut head = vec![0.0; layout.len()];
        head[0] = 0.9;
        assert!(!guard.wants_vote(&head), "only class 0 scores");
        head[3] = 0.6;
        assert!(
            guard.wants_vote(&head),
            "class 1 scores 0.6 in its second cell"
        );
        assert!(Guard::Every.wants_vote(&head));
    }
}
