//! Classifier postprocessing: softmax, top-k and confidence.

use heapless::Vec;

/// Classes reported per classification, best first.
pub const TOP_K: usize = 3;

/// One class and its probability.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ranked {
    /// Index into the model's labels.
    pub class: u16,
    /// Softmax probability, 0..1.
    pub probability: f32,
}

/// The result of classifying one frame or tile.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Classification {
    /// Up to [`TOP_K`] classes, most probable first; never empty.
    pub top: Vec<Ranked, TOP_K>,
}

impl Classification {
    /// The most probable class.
    pub fn class(&self) -> u16 {
        self.top.first().map_or(0, |r| r.class)
    }

    /// Probability of the most probable class.
    pub fn confidence(&self) -> f32 {
        self.top.first().map_or(0.0, |r| r.probability)
    }
}

/// Why model outputs could not be turned into a classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PostprocessError {
    /// The model produced no values.
    Empty,
    /// More classes than a `u16` index holds.
    TooManyClasses,
    /// A logit is NaN or infinite (corrupt weights, corrupt input or a failing device).
    NonFinite {
        /// Index of the first bad value.
        index: usize,
    },
}

impl core::fmt::Display for PostprocessError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("model produced no outputs"),
            Self::TooManyClasses => f.write_str("model produced more than 65535 classes"),
            Self::NonFinite { index } => write!(f, "model output {index} is not finite"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PostprocessError {}

/// Replace logits with their softmax probabilities (numerically stable: shifted by the maximum).
pub fn softmax_in_place(values: &mut [f32]) -> Result<(), PostprocessError> {
    if values.is_empty() {
        return Err(PostprocessError::Empty);
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(PostprocessError::NonFinite { index });
    }
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in values.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    // sum >= 1 because the maximum contributes exp(0).
    for v in values.iter_mut() {
        *v /= sum;
    }
    Ok(())
}

/// Softmax the logits in place and rank the best [`TOP_K`] classes; ties go to the lower index.
pub fn classify(logits: &mut [f32]) -> Result<Classification, PostprocessError> {
    if logits.len() > usize::from(u16::MAX) {
        return Err(PostprocessError::TooManyClasses);
    }
    softmax_in_place(logits)?;
    let mut top: Vec<Ranked, TOP_K> = Vec::new();
    for (class, &probability) in logits.iter().enumerate() {
        let candidate = Ranked {
            class: class as u16,
            probability,
        };
        let position = top
            .iter()
            .position(|r| probability > r.probability)
            .unwrap_or(top.len());
        if position < TOP_K {
            if top.is_full() {
                top.pop();
            }
            // Cannot fail: there is room after the pop, and position <= len.
            let _ = top.insert(position, candidate);
        }
    }
    Ok(Classification { top })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let mut v = [1000.0, 1000.0, -1000.0];
        softmax_in_place(&mut v).unwrap();
        assert!((v[0] - 0.5).abs() < 1e-6 && (v[1] - 0.5).abs() < 1e-6 && v[2] == 0.0);
    }

    #[test]
    fn ranks_top_k_best_first() {
        let mut logits = [0.0, 3.0, 1.0, 2.0, 3.0];
        let c = classify(&mut logits).unwrap();
        let classes: heapless::Vec<u16, TOP_K> = c.top.iter().map(|r| r.class).collect();
        assert_eq!(classes.as_slice(), &[1, 4, 3]);
        assert_eq!(c.class(), 1);
        assert!((c.confidence() - logits[1]).abs() < 1e-7);
        let mut one = [5.0];
        assert_eq!(classify(&mut one).unwrap().confidence(), 1.0);
    }

    #[test]
    fn rejects_empty_and_non_finite() {
        assert_eq!(classify(&mut []), Err(PostprocessError::Empty));
        assert_eq!(
            classify(&mut [0.0, f32::NAN]),
            Err(PostprocessError::NonFinite { index: 1 })
        );
        assert_eq!(
            classify(&mut [f32::INFINITY]),
            Err(PostprocessError::NonFinite { index: 0 })
        );
    }
}
