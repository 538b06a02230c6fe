//! Turn a region of a frame into a model input: crop, resize, normalise per band, lay out NCHW.

use kestrel_backend::{PreprocessSpec, ResizeRule};

use crate::frame::{FrameView, Sample};

/// A rectangle in frame pixels. It may extend past the right and bottom edges of the frame;
/// pixels outside the frame are padded with the band mean, which normalises to zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
}

impl Region {
    /// The whole of a `width` x `height` frame.
    pub fn whole(width: u32, height: u32) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }
}

/// Why a frame region could not be turned into a model input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PreprocessError {
    /// The frame has a different number of bands than the model takes.
    BandCount {
        /// Bands in the frame.
        frame: u16,
        /// Bands the model takes.
        model: usize,
    },
    /// The region is empty or lies wholly outside the frame.
    Region,
    /// A sample is NaN or infinite (a float sensor's fault): the input would be meaningless.
    NotFinite,
    /// The input buffer is not the model's input size.
    InputLength {
        /// Values the model takes.
        expected: usize,
        /// Values in the buffer.
        got: usize,
    },
}

impl core::fmt::Display for PreprocessError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BandCount { frame, model } => {
                write!(f, "image has {frame} band(s), the model takes {model}")
            }
            Self::Region => f.write_str("region is empty or outside the frame"),
            Self::NotFinite => f.write_str("the frame holds NaN or infinite samples"),
            Self::InputLength { expected, got } => {
                write!(
                    f,
                    "input buffer holds {got} values, the model takes {expected}"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PreprocessError {}

/// Fill `input` (NCHW, `spec.input_len()` values) from `region` of `frame`, scaled to the model's
/// input size by `spec.resize()` and normalised per band.
pub fn prepare_input<S: Sample>(
    frame: FrameView<'_, S>,
    region: Region,
    spec: &PreprocessSpec,
    input: &mut [f32],
) -> Result<(), PreprocessError> {
    let g = frame.geometry();
    if usize::from(g.bands) != spec.bands() {
        return Err(PreprocessError::BandCount {
            frame: g.bands,
            model: spec.bands(),
        });
    }
    if region.width == 0 || region.height == 0 || region.x >= g.width || region.y >= g.height {
        return Err(PreprocessError::Region);
    }
    if input.len() != spec.input_len() {
        return Err(PreprocessError::InputLength {
            expected: spec.input_len(),
            got: input.len(),
        });
    }
    let (out_w, out_h) = (spec.width(), spec.height());
    let plane = out_w * out_h;
    let rule = spec.resize();
    let x_axis = Axis::new(region.x, region.width, out_w);
    let y_axis = Axis::new(region.y, region.height, out_h);
    let mut finite = true;
    let mut span = [0.0; SPAN];
    // Separable: each source row a band needs is resampled along x once per chunk of output
    // columns and kept while consecutive output rows blend it, then rows blend along y. The
    // arithmetic per output value is the same as blending its four samples directly.
    // `input` holds exactly `bands` planes of `plane` values (checked above).
    for (band, out_plane) in input.chunks_exact_mut(plane.max(1)).enumerate() {
        let (mean, std) = (spec.mean(band), spec.std(band));
        // Each value blends samples (or the mean, outside the frame) with weights summing to
        // 1, so it is within the samples' magnitude, and its normalised value within this
        // bound: where the bound is finite, no value can be NaN or infinite, and checking
        // each (a fifth of the preprocessing's time) is left out.
        let bound = 2.0 * (S::MAX_MAGNITUDE + mean.abs()) / std.abs();
        let check = !bound.is_finite();
        for first in (0..out_w).step_by(CHUNK) {
            let columns = ColumnSources::new(&x_axis, rule, first, (out_w - first).min(CHUNK));
            let mut rows = RowCache::new();
            for (oy, out_row) in out_plane.chunks_exact_mut(out_w.max(1)).enumerate() {
                let (y0, y1, wy) = y_axis.source(oy, rule);
                let (top, bottom) = rows.rows(y0, y1, |y, row| {
                    columns.resample(frame, y, band, mean, &mut span, row);
                });
                let out = out_row
                    .get_mut(first..first + columns.len)
                    .unwrap_or_default();
                let cells = out.iter_mut().zip(top).zip(bottom);
                if check {
                    for ((cell, &t), &b) in cells {
                        *cell = (t * (1.0 - wy) + b * wy - mean) / std;
                        finite &= cell.is_finite();
                    }
                } else {
                    for ((cell, &t), &b) in cells {
                        *cell = (t * (1.0 - wy) + b * wy - mean) / std;
                    }
                }
            }
        }
    }
    if !finite {
        return Err(PreprocessError::NotFinite);
    }
    Ok(())
}

/// Output columns resampled together: bounds the stack this needs (about 3.5 KB).
const CHUNK: usize = 128;

/// Source columns a chunk converts to floats once before blending (an upscale, or a downscale
/// by up to 2, reads no more); a chunk reading a wider span reads each sample where it blends.
const SPAN: usize = 2 * CHUNK + 2;

/// Where each output column of a chunk reads the source row, and the blend weight.
struct ColumnSources {
    x0: [u32; CHUNK],
    x1: [u32; CHUNK],
    weight: [f32; CHUNK],
    len: usize,
    /// The first source column any output column reads, and how many follow up to the last.
    first_source: u32,
    sources: usize,
}

impl ColumnSources {
    fn new(axis: &Axis, rule: ResizeRule, first: usize, len: usize) -> Self {
        let mut sources = Self {
            x0: [0; CHUNK],
            x1: [0; CHUNK],
            weight: [0.0; CHUNK],
            len,
            first_source: 0,
            sources: 0,
        };
        let slots = sources
            .x0
            .iter_mut()
            .zip(&mut sources.x1)
            .zip(&mut sources.weight);
        for (((x0_slot, x1_slot), weight_slot), o) in slots.zip(first..first + len) {
            let (x0, x1, w) = axis.source(o, rule);
            // Columns past u32 lie outside any frame (its width is a u32): padding either way.
            *x0_slot = u32::try_from(x0).unwrap_or(u32::MAX);
            *x1_slot = u32::try_from(x1).unwrap_or(u32::MAX);
            *weight_slot = w;
        }
        let read = sources
            .x0
            .iter()
            .take(len)
            .chain(sources.x1.iter().take(len));
        let (first, last) = read.fold((u32::MAX, 0), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        sources.first_source = first;
        sources.sources = (last.saturating_sub(first) as usize).saturating_add(1);
        sources
    }

    /// Source row `y` of `band` blended along x into `out`; the band mean outside the frame.
    fn resample<S: Sample>(
        &self,
        frame: FrameView<'_, S>,
        y: usize,
        band: usize,
        mean: f32,
        span: &mut [f32; SPAN],
        out: &mut [f32; CHUNK],
    ) {
        let g = frame.geometry();
        let (width, bands) = (g.width as usize, usize::from(g.bands));
        let row = if y < g.height as usize {
            frame
                .samples()
                .get(y * width * bands..(y + 1) * width * bands)
                .unwrap_or_default()
        } else {
            &[]
        };
        // Inside the frame's width the index is inside its row (no overflow on a 32-bit target).
        let sample = |x: u32| {
            let x = x as usize;
            let inside = (x < width).then(|| row.get(x * bands + band)).flatten();
            inside.map_or(mean, |s| s.to_f32())
        };
        let sources = self.x0.iter().zip(&self.x1).zip(&self.weight);
        let cells = out.iter_mut().zip(sources).take(self.len);
        if self.sources > SPAN {
            for (cell, ((&x0, &x1), &w)) in cells {
                *cell = sample(x0) * (1.0 - w) + sample(x1) * w;
            }
            return;
        }
        // An upscale reads each sample for several output columns: convert the span once.
        let first = self.first_source;
        for (offset, slot) in (0u32..).zip(span.iter_mut().take(self.sources)) {
            *slot = sample(first.wrapping_add(offset));
        }
        let at = |x: u32| span.get(x.wrapping_sub(first) as usize).copied();
        for (cell, ((&x0, &x1), &w)) in cells {
            *cell = at(x0).unwrap_or(mean) * (1.0 - w) + at(x1).unwrap_or(mean) * w;
        }
    }
}

/// Two source rows resampled along x, with the frame rows they hold.
struct RowCache {
    slots: [CachedRow; 2],
}

struct CachedRow {
    row: Option<usize>,
    values: [f32; CHUNK],
}

impl RowCache {
    fn new() -> Self {
        let empty = || CachedRow {
            row: None,
            values: [0.0; CHUNK],
        };
        Self {
            slots: [empty(), empty()],
        }
    }

    /// Source rows `y0` and `y1` resampled, each by `resample` only if not already held.
    fn rows(
        &mut self,
        y0: usize,
        y1: usize,
        mut resample: impl FnMut(usize, &mut [f32; CHUNK]),
    ) -> (&[f32; CHUNK], &[f32; CHUNK]) {
        let [first, second] = &mut self.slots;
        // A slot already holding a needed row keeps it.
        let swap = first.row != Some(y0) && (second.row == Some(y0) || first.row == Some(y1));
        let (top, bottom) = if swap {
            (second, first)
        } else {
            (first, second)
        };
        if top.row != Some(y0) {
            resample(y0, &mut top.values);
            top.row = Some(y0);
        }
        if y1 == y0 {
            return (&top.values, &top.values);
        }
        if bottom.row != Some(y1) {
            resample(y1, &mut bottom.values);
            bottom.row = Some(y1);
        }
        (&top.values, &bottom.values)
    }
}

/// Maps output pixel positions along one axis to source positions inside a region.
struct Axis {
    start: usize,
    len: usize,
    scale: f32,
    identity: bool,
}

impl Axis {
    fn new(start: u32, len: u32, out_len: usize) -> Self {
        let len = len as usize;
        Self {
            start: start as usize,
            len,
            scale: len as f32 / out_len as f32,
            identity: len == out_len,
        }
    }

    /// The two source positions to blend for output position `o`, and the weight of the second.
    #[inline]
    fn source(&self, o: usize, rule: ResizeRule) -> (usize, usize, f32) {
        if self.identity {
            return (self.start + o, self.start + o, 0.0);
        }
        let last = self.len - 1;
        match rule {
            ResizeRule::Nearest => {
                let s = (((o as f32 + 0.5) * self.scale) as usize).min(last);
                (self.start + s, self.start + s, 0.0)
            }
            ResizeRule::Bilinear => {
                let s = ((o as f32 + 0.5) * self.scale - 0.5).clamp(0.0, last as f32);
                let s0 = s as usize;
                let s1 = (s0 + 1).min(last);
                (self.start + s0, self.start + s1, s - s0 as f32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FrameGeometry;

    fn spec(size: usize, bands: usize, resize: ResizeRule) -> PreprocessSpec {
        PreprocessSpec::new(
            size,
            size,
            &[10.0; 16][..bands],
            &[2.0; 16][..bands],
            resize,
        )
        .unwrap()
    }

    /// Each output value from its four source samples directly, as the separable code must give.
    fn blend_directly<S: Sample>(
        frame: FrameView<'_, S>,
        region: Region,
        spec: &PreprocessSpec,
    ) -> Vec<f32> {
        let (out_w, out_h) = (spec.width(), spec.height());
        let x_axis = Axis::new(region.x, region.width, out_w);
        let y_axis = Axis::new(region.y, region.height, out_h);
        let raw = |x, y, band| {
            frame
                .get(x, y, band)
                .map_or(spec.mean(band), Sample::to_f32)
        };
        let mut out = vec![0.0; spec.input_len()];
        for band in 0..spec.bands() {
            for oy in 0..out_h {
                let (y0, y1, wy) = y_axis.source(oy, spec.resize());
                for ox in 0..out_w {
                    let (x0, x1, wx) = x_axis.source(ox, spec.resize());
                    let top = raw(x0, y0, band) * (1.0 - wx) + raw(x1, y0, band) * wx;
                    let bottom = raw(x0, y1, band) * (1.0 - wx) + raw(x1, y1, band) * wx;
                    let value = top * (1.0 - wy) + bottom * wy;
                    out[(band * out_h + oy) * out_w + ox] = spec.normalise(band, value);
                }
            }
        }
        out
    }

    /// Integer samples skip the per-value check only where no value can overflow: a standard
    /// deviation so small that some do is still refused, as are a float frame's NaN samples.
    #[test]
    fn values_that_are_not_finite_are_refused_with_or_without_the_per_value_check() {
        let geometry = FrameGeometry {
            width: 4,
            height: 4,
            bands: 1,
        };
        let bytes = [255u8; 16];
        let frame = FrameView::new(geometry, &bytes[..]).unwrap();
        let whole = Region::whole(4, 4);
        let tiny = PreprocessSpec::new(8, 8, &[10.0], &[1e-38], ResizeRule::Bilinear).unwrap();
        let mut input = vec![0.0; tiny.input_len()];
        assert_eq!(
            prepare_input(frame, whole, &tiny, &mut input),
            Err(PreprocessError::NotFinite)
        );
        let usual = spec(8, 1, ResizeRule::Bilinear);
        assert_eq!(prepare_input(frame, whole, &usual, &mut input), Ok(()));
        assert!(input.iter().all(|v| *v == (255.0 - 10.0) / 2.0));
        let mut floats = [1.0f32; 16];
        floats[5] = f32::NAN;
        let frame = FrameView::new(geometry, &floats[..]).unwrap();
        assert_eq!(
            prepare_input(frame, whole, &usual, &mut input),
            Err(PreprocessError::NotFinite)
        );
    }

    #[test]
    fn separable_resize_matches_blending_four_samples_bit_for_bit() {
        // Up- and downscaling, identity, regions past the edges, widths past one chunk.
        let (width, height, bands) = (150u32, 37u32, 3u16);
        let samples: Vec<u16> = (0..width * height * u32::from(bands))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 20) as u16)
            .collect();
        let geometry = FrameGeometry {
            width,
            height,
            bands,
        };
        let frame = FrameView::new(geometry, &samples).unwrap();
        let regions = [
            Region::whole(width, height),
            Region {
                x: 3,
                y: 5,
                width: 20,
                height: 9,
            },
            Region {
                x: 140,
                y: 30,
                width: 40,
                height: 40,
            },
            Region {
                x: 0,
                y: 0,
                width: 1,
                height: 1,
            },
            // Wider than a chunk's converted span: each sample read where it blends.
            Region {
                x: 10,
                y: 2,
                width: 1000,
                height: 30,
            },
        ];
        let sizes = [(224, 224), (300, 7), (16, 16), (150, 37), (1, 1)];
        let mean = [90.0, 2000.0, 4095.5];
        let std = [3.0, 700.0, 0.25];
        for rule in [ResizeRule::Bilinear, ResizeRule::Nearest] {
            for (w, h) in sizes {
                let spec = PreprocessSpec::new(w, h, &mean, &std, rule).unwrap();
                for region in regions {
                    let mut input = vec![f32::NAN; spec.input_len()];
                    prepare_input(frame, region, &spec, &mut input).unwrap();
                    let expected = blend_directly(frame, region, &spec);
                    let same = input
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rule:?} {w}x{h} {region:?}");
                }
            }
        }
    }

    #[test]
    fn identity_crop_normalises_into_nchw() {
        // 3x2 frame, 2 bands: band 0 = x + 10 * y, band 1 = 100.
        let mut samples = [0u8; 12];
        for y in 0..2 {
            for x in 0..3 {
                samples[(y * 3 + x) * 2] = (x + 10 * y) as u8;
                samples[(y * 3 + x) * 2 + 1] = 100;
            }
        }
        let frame = FrameView::new(
            FrameGeometry {
                width: 3,
                height: 2,
                bands: 2,
            },
            &samples,
        )
        .unwrap();
        let spec = spec(2, 2, ResizeRule::Bilinear);
        let mut input = [0.0; 8];
        prepare_input(
            frame,
            Region {
                x: 1,
                y: 0,
                width: 2,
                height: 2,
            },
            &spec,
            &mut input,
        )
        .unwrap();
        // band 0 raw values 1, 2, 11, 12 -> (v - 10) / 2; band 1 all (100 - 10) / 2.
        assert_eq!(input, [-4.5, -4.0, 0.5, 1.0, 45.0, 45.0, 45.0, 45.0]);
    }

    #[test]
    fn pads_outside_the_frame_with_zero() {
        let samples = [30u8; 4];
        let frame = FrameView::new(
            FrameGeometry {
                width: 2,
                height: 2,
                bands: 1,
            },
            &samples,
        )
        .unwrap();
        let mut input = [1.0; 9];
        prepare_input(
            frame,
            Region::whole(3, 3),
            &spec(3, 1, ResizeRule::Nearest),
            &mut input,
        )
        .unwrap();
        assert_eq!(input, [10.0, 10.0, 0.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn bilinear_downscale_averages_pixel_pairs() {
        // 4x1 -> 2x1 halves: half-pixel centres land between source pixels 0,1 and 2,3.
        let samples = [10u16, 20, 30, 50];
        let frame = FrameView::new(
            FrameGeometry {
                width: 4,
                height: 1,
                bands: 1,
            },
            &samples,
        )
        .unwrap();
        let spec = PreprocessSpec::new(2, 1, &[0.0], &[1.0], ResizeRule::Bilinear).unwrap();
        let mut input = [0.0; 2];
        prepare_input(frame, Region::whole(4, 1), &spec, &mut input).unwrap();
        assert_eq!(input, [15.0, 40.0]);
        let nearest = PreprocessSpec::new(2, 1, &[0.0], &[1.0], ResizeRule::Nearest).unwrap();
        prepare_input(frame, Region::whole(4, 1), &nearest, &mut input).unwrap();
        assert_eq!(input, [20.0, 50.0]);
    }

    #[test]
    fn rejects_band_mismatch_bad_region_and_buffer() {
        let samples = [0u8; 16];
        let frame = FrameView::new(
            FrameGeometry {
                width: 2,
                height: 2,
                bands: 4,
            },
            &samples,
        )
        .unwrap();
        let spec = spec(2, 3, ResizeRule::Bilinear);
        let mut input = [0.0; 12];
        let whole = Region::whole(2, 2);
        assert_eq!(
            prepare_input(frame, whole, &spec, &mut input),
            Err(PreprocessError::BandCount { frame: 4, model: 3 })
        );
        let frame = FrameView::new(
            FrameGeometry {
                width: 2,
                height: 2,
                bands: 3,
            },
            &samples,
        )
        .unwrap();
        let outside = Region {
            x: 2,
            y: 0,
            width: 2,
            height: 2,
        };
        assert_eq!(
            prepare_input(frame, outside, &spec, &mut input),
            Err(PreprocessError::Region)
        );
        assert_eq!(
            prepare_input(frame, whole, &spec, &mut input[..5]),
            Err(PreprocessError::InputLength {
                expected: 12,
                got: 5
            })
        );
    }
}
