//! What a model expects of its input: the contract between a model's manifest (or plan header)
//! and the runtime's preprocessing.

/// Most bands a model input may have (Sentinel-2 L1C has 13).
pub const MAX_BANDS: usize = 16;

/// How a frame region is scaled to the model's input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ResizeRule {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear with half-pixel centres (PyTorch `align_corners=False`), no antialiasing.
    Bilinear,
}

/// Why a preprocessing spec was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SpecError {
    /// Width, height or band count is zero.
    Empty,
    /// More bands than [`MAX_BANDS`].
    TooManyBands(usize),
    /// `mean` and `std` have different lengths.
    BandCountMismatch {
        /// Entries in `mean`.
        mean: usize,
        /// Entries in `std`.
        std: usize,
    },
    /// A standard deviation is zero, negative or not finite, or a mean is not finite.
    BadNormalisation {
        /// The band.
        band: usize,
    },
}

impl core::fmt::Display for SpecError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("input width, height and band count must be non-zero"),
            Self::TooManyBands(n) => write!(f, "{n} bands, at most {MAX_BANDS} are supported"),
            Self::BandCountMismatch { mean, std } => {
                write!(f, "{mean} means but {std} standard deviations")
            }
            Self::BadNormalisation { band } => {
                write!(
                    f,
                    "band {band}: mean must be finite and std finite and positive"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SpecError {}

/// The model's input size and per-band normalisation: `input = (sample - mean) / std`, with
/// samples in their raw units (0..255 for u8 imagery), laid out NCHW.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PreprocessSpec {
    width: usize,
    height: usize,
    bands: usize,
    mean: [f32; MAX_BANDS],
    std: [f32; MAX_BANDS],
    resize: ResizeRule,
}

impl PreprocessSpec {
    /// A spec for a `width` x `height` input with one (mean, std) pair per band.
    pub fn new(
        width: usize,
        height: usize,
        mean: &[f32],
        std: &[f32],
        resize: ResizeRule,
    ) -> Result<Self, SpecError> {
        let bands = mean.len();
        if width == 0 || height == 0 || bands == 0 {
            return Err(SpecError::Empty);
        }
        if bands > MAX_BANDS {
            return Err(SpecError::TooManyBands(bands));
        }
        if std.len() != bands {
            return Err(SpecError::BandCountMismatch {
                mean: bands,
                std: std.len(),
            });
        }
        let mut spec = Self {
            width,
            height,
            bands,
            mean: [0.0; MAX_BANDS],
            std: [0.0; MAX_BANDS],
            resize,
        };
        let slots = spec.mean.iter_mut().zip(spec.std.iter_mut());
        for (band, ((&m, &s), (mean_slot, std_slot))) in mean.iter().zip(std).zip(slots).enumerate()
        {
            if !m.is_finite() || !s.is_finite() || s <= 0.0 {
                return Err(SpecError::BadNormalisation { band });
            }
            *mean_slot = m;
            *std_slot = s;
        }
        Ok(spec)
    }

    /// Input width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Input height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }
    /// Bands (input channels).
    pub fn bands(&self) -> usize {
        self.bands
    }
    /// How regions are scaled to the input size.
    pub fn resize(&self) -> ResizeRule {
        self.resize
    }
    /// Values in one input tensor.
    pub fn input_len(&self) -> usize {
        self.width * self.height * self.bands
    }
    /// Mean of `band` in raw sample units (0 for a band the model does not have).
    #[inline]
    pub fn mean(&self, band: usize) -> f32 {
        self.mean.get(band).copied().unwrap_or(0.0)
    }
    /// Standard deviation of `band` in raw sample units (1 for a band the model does not have).
    #[inline]
    pub fn std(&self, band: usize) -> f32 {
        self.std.get(band).copied().unwrap_or(1.0)
    }
    /// Normalise one raw sample of `band` (0 for a band the model does not have). A division,
    /// not a product with `1 / std`: rounded as training pipelines round `(x - mean) / std`.
    #[inline]
    pub fn normalise(&self, band: usize, sample: f32) -> f32 {
        match (self.mean.get(band), self.std.get(band)) {
            (Some(mean), Some(std)) if *std > 0.0 => (sample - mean) / std,
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_specs() {
        let r = ResizeRule::Bilinear;
        assert_eq!(
            PreprocessSpec::new(0, 4, &[0.0], &[1.0], r),
            Err(SpecError::Empty)
        );
        assert_eq!(
            PreprocessSpec::new(4, 4, &[], &[], r),
            Err(SpecError::Empty)
        );
        assert_eq!(
            PreprocessSpec::new(4, 4, &[0.0; 17], &[1.0; 17], r),
            Err(SpecError::TooManyBands(17))
        );
        assert_eq!(
            PreprocessSpec::new(4, 4, &[0.0, 0.0], &[1.0], r),
            Err(SpecError::BandCountMismatch { mean: 2, std: 1 })
        );
        assert_eq!(
            PreprocessSpec::new(4, 4, &[0.0, 0.0], &[1.0, 0.0], r),
            Err(SpecError::BadNormalisation { band: 1 })
        );
        assert_eq!(
            PreprocessSpec::new(4, 4, &[f32::NAN], &[1.0], r),
            Err(SpecError::BadNormalisation { band: 0 })
        );
    }

    #[test]
    fn normalises_per_band() {
        let spec =
            PreprocessSpec::new(2, 2, &[10.0, 100.0], &[2.0, 50.0], ResizeRule::Nearest).unwrap();
        assert_eq!(spec.input_len(), 8);
        assert_eq!(spec.normalise(0, 14.0), 2.0);
        assert_eq!(spec.normalise(1, 50.0), -1.0);
    }
}
