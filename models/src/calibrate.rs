//! Activation calibration: choose each tensor's int8 range from the float values the graph
//! produces on calibration images.
//!
//! Two passes over the images: the first finds every tensor's min and max, the second fills a
//! fixed-range histogram per tensor, from which min-max, percentile or entropy (KL divergence,
//! as TensorRT does) picks the range. Ranges always include zero, so zero is exact in int8.

/// Bins per tensor histogram.
pub const BINS: usize = 2048;

/// How a tensor's range is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// The observed minimum and maximum.
    MinMax,
    /// Clip the given percentage of values at each end, e.g. `0.01` keeps 99.98% inside.
    Percentile(f64),
    /// The range whose int8 rendering of the histogram loses least information (KL divergence).
    Entropy,
    /// The range whose int8 rendering of the values has the least squared error: rounding
    /// inside it, clipping outside.
    Mse,
}

/// Asymmetric int8 parameters of one tensor: `real = scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationQuant {
    /// Real value of one int8 step.
    pub scale: f32,
    /// The int8 code of real zero.
    pub zero_point: i8,
}

impl ActivationQuant {
    /// Parameters covering `[lo, hi]` (widened to include zero) with 256 levels. A tiny range
    /// gets a tiny scale (randomly initialised or badly conditioned models have activations of
    /// 1e-8 and less, and the scales of neighbouring layers must stay in proportion for the
    /// requantisation between them to be representable); only an empty one (a tensor that is
    /// always zero) gets 1.0.
    pub fn from_range(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        if !(hi - lo > 0.0 && (hi - lo) / 255.0 > 0.0) {
            return Self {
                scale: 1.0,
                zero_point: 0,
            };
        }
        let scale = (hi - lo) / 255.0;
        let zero_point = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i8;
        Self { scale, zero_point }
    }

    /// The code of `real` on this grid, clamped to int8.
    pub fn code(self, real: f32) -> i8 {
        ((real / self.scale).round() + f32::from(self.zero_point)).clamp(-128.0, 127.0) as i8
    }

    /// The real value int8 carries for `real`: rounded to the grid, clipped to its range.
    pub fn represented(self, real: f32) -> f32 {
        self.scale * (f32::from(self.code(real)) - f32::from(self.zero_point))
    }
}

#[derive(Clone, Debug)]
struct Tensor {
    min: f32,
    max: f32,
    bins: Vec<u64>,
    /// Values exactly zero (ReLU outputs, padding): exact in int8 whatever the range.
    zeros: u64,
}

/// Collects statistics of every tensor of a graph over calibration images.
#[derive(Clone, Debug)]
pub struct Calibrator {
    tensors: Vec<Tensor>,
    histograms_started: bool,
}

impl Calibrator {
    /// Statistics for `tensors` tensors (a graph's value count).
    pub fn new(tensors: usize) -> Self {
        let empty = Tensor {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            bins: Vec::new(),
            zeros: 0,
        };
        Self {
            tensors: vec![empty; tensors],
            histograms_started: false,
        }
    }

    /// First pass: widen each tensor's min and max with one image's values (by tensor id).
    pub fn observe_range(&mut self, values: &[Vec<f32>]) {
        for (t, v) in self.tensors.iter_mut().zip(values) {
            for &x in v.iter().filter(|x| x.is_finite()) {
                t.min = t.min.min(x);
                t.max = t.max.max(x);
            }
        }
    }

    /// Second pass: count one image's values into each tensor's histogram over the range
    /// found in the first pass (widened to include zero).
    pub fn observe_histogram(&mut self, values: &[Vec<f32>]) {
        if !self.histograms_started {
            for t in &mut self.tensors {
                t.bins = vec![0; BINS];
            }
            self.histograms_started = true;
        }
        for (t, v) in self.tensors.iter_mut().zip(values) {
            let (lo, hi) = (t.min.min(0.0), t.max.max(0.0));
            if hi <= lo {
                continue;
            }
            let width = (hi - lo) / BINS as f32;
            for &x in v.iter().filter(|x| x.is_finite()) {
                let bin = (((x - lo) / width) as usize).min(BINS - 1);
                t.bins[bin] += 1;
                t.zeros += u64::from(x == 0.0);
            }
        }
    }

    /// The chosen int8 parameters of every tensor, by id.
    pub fn finish(&self, method: Method) -> Vec<ActivationQuant> {
        self.tensors
            .iter()
            .map(|t| {
                // No finite value was ever observed (min and max still at their start).
                if t.min > t.max {
                    return ActivationQuant::from_range(0.0, 0.0);
                }
                let (lo, hi) = (t.min.min(0.0), t.max.max(0.0));
                let (lo, hi) = match method {
                    Method::MinMax => (lo, hi),
                    _ if t.bins.iter().all(|&c| c == 0) => (lo, hi),
                    Method::Percentile(p) => percentile_range(&t.bins, lo, hi, p),
                    Method::Entropy => entropy_range(&t.bins, lo, hi),
                    Method::Mse => mse_range(&t.bins, t.zeros, lo, hi),
                };
                ActivationQuant::from_range(lo, hi)
            })
            .collect()
    }
}

fn edge(lo: f32, hi: f32, bin: usize) -> f32 {
    lo + (hi - lo) * bin as f32 / BINS as f32
}

fn percentile_range(bins: &[u64], lo: f32, hi: f32, clip_percent: f64) -> (f32, f32) {
    let total: u64 = bins.iter().sum();
    let clip = (total as f64 * clip_percent / 100.0) as u64;
    let mut seen = 0;
    let low_bin = bins.iter().position(|&c| {
        seen += c;
        seen > clip
    });
    seen = 0;
    let high_bin = bins.iter().rposition(|&c| {
        seen += c;
        seen > clip
    });
    match (low_bin, high_bin) {
        (Some(l), Some(h)) if l <= h => (edge(lo, hi, l), edge(lo, hi, h + 1)),
        _ => (lo, hi),
    }
}

/// KL divergence between the histogram clipped to its first `end` bins (outliers folded into
/// the last one) and the same rendered with `levels` quantisation levels.
fn kl_divergence(bins: &[u64], end: usize, levels: usize) -> f64 {
    let mut reference: Vec<f64> = bins[..end].iter().map(|&c| c as f64).collect();
    reference[end - 1] += bins[end..].iter().map(|&c| c as f64).sum::<f64>();
    let mut rendered = vec![0.0; end];
    for level in 0..levels {
        let (start, stop) = (
            level * end / levels,
            ((level + 1) * end / levels).max(level * end / levels + 1),
        );
        let stop = stop.min(end);
        let slice = &bins[start..stop];
        let nonzero = slice.iter().filter(|&&c| c > 0).count();
        if nonzero == 0 {
            continue;
        }
        let share = slice.iter().sum::<u64>() as f64 / nonzero as f64;
        for (q, &c) in rendered[start..stop].iter_mut().zip(slice) {
            if c > 0 {
                *q = share;
            }
        }
    }
    let (p_total, q_total) = (reference.iter().sum::<f64>(), rendered.iter().sum::<f64>());
    reference
        .iter()
        .zip(&rendered)
        .filter(|(p, _)| **p > 0.0)
        .map(|(p, q)| {
            let (p, q) = (p / p_total, (q / q_total).max(1e-12));
            p * (p / q).ln()
        })
        .sum()
}

/// Entropy calibration on the side of zero that holds the bulk of the range: the clip point
/// with the least KL divergence between the values and their int8 rendering.
fn entropy_range(bins: &[u64], lo: f32, hi: f32) -> (f32, f32) {
    let zero_bin = (((0.0 - lo) / (hi - lo)) * BINS as f32).round() as usize;
    if zero_bin != 0 {
        // Values on both sides of zero: keep the range found by min-max rather than guess how
        // to split the levels; percentile is the method for such tensors.
        return (lo, hi);
    }
    let levels = 255;
    let best = (levels..=BINS)
        .step_by(16)
        .chain(std::iter::once(BINS))
        .map(|end| (end, kl_divergence(bins, end, levels)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(BINS, |(end, _)| end);
    (lo, edge(lo, hi, best))
}

/// Range ends [`mse_range`] tries: every this many bins (and the histogram's own ends).
const MSE_GRID: usize = 8;

/// The range with the least squared error over the histogram's values: each value inside it
/// off by a uniform rounding error (a step squared over 12) but the `zeros` values exactly
/// zero, which int8 holds exactly, and each outside by its distance to the nearer end (a bin's
/// values at its centre). Both ends are searched on a grid of [`MSE_GRID`] bins, each on its
/// side of zero.
fn mse_range(bins: &[u64], zeros: u64, lo: f32, hi: f32) -> (f32, f32) {
    let width = (f64::from(hi) - f64::from(lo)) / BINS as f64;
    let at = |edge: usize| f64::from(lo) + edge as f64 * width;
    // Running sums of count, count * value and count * value^2, bin by bin.
    let mut sums = vec![[0.0f64; 3]; BINS + 1];
    for (b, &count) in bins.iter().enumerate() {
        let (n, x) = (count as f64, at(b) + 0.5 * width);
        let [c, cx, cxx] = sums[b];
        sums[b + 1] = [c + n, cx + n * x, cxx + n * x * x];
    }
    // Squared distance of the values in bins `from..to` to `end`.
    let clipped = |from: usize, to: usize, end: f64| {
        let [c, cx, cxx] = [0, 1, 2].map(|i| sums[to][i] - sums[from][i]);
        (cxx - 2.0 * end * cx + end * end * c).max(0.0)
    };
    let error = |low: usize, high: usize| {
        let (a, b) = (at(low), at(high));
        let step = (b - a) / 255.0;
        let inside = sums[high][0] - sums[low][0] - zeros as f64;
        inside.max(0.0) * step * step / 12.0 + clipped(0, low, a) + clipped(high, BINS, b)
    };
    // Edges at or below zero for the low end, at or above it for the high end.
    let zero = -f64::from(lo) / width;
    let lows = (0..=(zero.floor() as usize).min(BINS)).step_by(MSE_GRID);
    let highs: Vec<usize> = ((zero.ceil() as usize).min(BINS)..=BINS)
        .step_by(MSE_GRID)
        .chain(std::iter::once(BINS))
        .collect();
    let best = lows
        .flat_map(|low| highs.iter().map(move |&high| (low, high)))
        .filter(|&(low, high)| high > low)
        .map(|(low, high)| ((low, high), error(low, high)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some(((low, high), _)) => (at(low) as f32, at(high) as f32),
        None => (lo, hi),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_means_average_each_channel_over_pixels_and_images() {
        // Two tensors: a [1, 2, 1, 2] image and a [1, 3] vector.
        let mut means = ChannelMeans::new(&[vec![1, 2, 1, 2], vec![1, 3]]);
        means.observe(&[vec![1.0, 3.0, 10.0, 20.0], vec![1.0, 2.0, 3.0]]);
        means.observe(&[vec![3.0, 5.0, 0.0, 0.0], vec![3.0, 2.0, 1.0]]);
        assert_eq!(means.means(), [vec![3.0, 7.5], vec![2.0, 2.0, 2.0]]);
        // As int8 carries them on a grid of step 2 from -256 to 254 (zero point 0): 1.0 and
        // 3.0 round to 2.0 and 4.0 (half away from zero); 300 clips to 254.
        let step2 = ActivationQuant {
            scale: 2.0,
            zero_point: 0,
        };
        let mut int8 = ChannelMeans::new(&[vec![1, 1, 1, 3]]);
        int8.observe_as_int8(&[vec![1.0, 3.0, 300.0]], &[step2]);
        assert_eq!(int8.means(), [vec![(2.0 + 4.0 + 254.0) / 3.0]]);
    }

    fn calibrated(values: Vec<f32>, method: Method) -> (f32, f32) {
        let mut c = Calibrator::new(1);
        let images = vec![values];
        c.observe_range(&images);
        c.observe_histogram(&images);
        let q = c.finish(method)[0];
        (
            q.scale * (-128.0 - f32::from(q.zero_point)),
            q.scale * (127.0 - f32::from(q.zero_point)),
        )
    }

    /// Non-negative, heavy-tailed values like a ReLU output: most below 1, a few near 100.
    fn relu_like() -> Vec<f32> {
        let mut state = 12345u64;
        let mut values: Vec<f32> = (0..200_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                -u.max(1e-7).ln() * 0.3
            })
            .collect();
        values.extend([100.0, 95.0, 90.0]);
        values
    }

    #[test]
    fn zero_is_exact_and_ranges_cover_the_data() {
        let q = ActivationQuant::from_range(-1.0, 3.0);
        let real = |code: f32| q.scale * (code - f32::from(q.zero_point));
        assert!(
            (real(-128.0) + 1.0).abs() <= q.scale && (real(127.0) - 3.0).abs() <= q.scale,
            "{q:?}"
        );
        assert_eq!(
            ActivationQuant::from_range(0.0, 0.0),
            ActivationQuant {
                scale: 1.0,
                zero_point: 0
            }
        );
        assert_eq!(
            ActivationQuant::from_range(0.0, 2.55).zero_point,
            -128,
            "non-negative: all codes above zero"
        );
        // No absolute floor: a range of 1e-8 gets a scale of 1e-8 / 255, not 1.0.
        let tiny = ActivationQuant::from_range(-0.5e-8, 0.5e-8);
        assert!((tiny.scale - 1e-8 / 255.0).abs() < 1e-15, "{tiny:?}");
        assert!(tiny.zero_point.abs() <= 1, "{tiny:?}");
    }

    #[test]
    fn min_max_keeps_outliers_and_the_others_clip_them() {
        let (lo, hi) = calibrated(relu_like(), Method::MinMax);
        assert!(lo.abs() < 1e-6 && (hi - 100.0).abs() < 0.5, "{lo} {hi}");
        let (_, hi) = calibrated(relu_like(), Method::Percentile(0.01));
        assert!(
            hi > 2.0 && hi < 10.0,
            "percentile clips the three outliers: {hi}"
        );
        let (_, hi) = calibrated(relu_like(), Method::Entropy);
        assert!(hi > 1.0 && hi < 50.0, "entropy clips the outliers: {hi}");
    }

    #[test]
    fn mse_ranges_round_the_values_with_the_least_squared_error() {
        // The values' own squared error through int8 codes of the range each method picks.
        let squared_error = |values: &[f32], method| {
            let mut c = Calibrator::new(1);
            let images = vec![values.to_vec()];
            c.observe_range(&images);
            c.observe_histogram(&images);
            let q = c.finish(method)[0];
            values
                .iter()
                .map(|&x| {
                    let code = (x / q.scale + f32::from(q.zero_point))
                        .round()
                        .clamp(-128.0, 127.0);
                    f64::from(x - q.scale * (code - f32::from(q.zero_point))).powi(2)
                })
                .sum::<f64>()
        };
        let mut two_sided = relu_like();
        for (i, x) in two_sided.iter_mut().enumerate().step_by(3) {
            *x = -*x * if i % 2 == 0 { 0.5 } else { 2.0 };
        }
        // Half of a ReLU's outputs are zero: exact in int8, whatever the range.
        let mut zero_heavy = relu_like();
        zero_heavy.extend(std::iter::repeat_n(0.0, 400_000));
        for values in [relu_like(), two_sided, zero_heavy] {
            let mse = squared_error(&values, Method::Mse);
            for other in [Method::MinMax, Method::Percentile(0.01), Method::Entropy] {
                let theirs = squared_error(&values, other);
                // The search's grid and the histogram's bins: within 2%.
                assert!(mse <= 1.02 * theirs, "mse {mse} against {other:?} {theirs}");
            }
        }
    }

    #[test]
    fn uniform_data_keeps_its_full_range_under_every_method() {
        let values: Vec<f32> = (0..100_000).map(|i| i as f32 / 1000.0).collect();
        for method in [
            Method::MinMax,
            Method::Percentile(0.01),
            Method::Entropy,
            Method::Mse,
        ] {
            let (_, hi) = calibrated(values.clone(), method);
            assert!(hi > 95.0, "{method:?} clipped uniform data to {hi}");
        }
    }
}

/// The mean of every channel of every tensor over calibration images (NCHW or `[N, F]`,
/// batch 1), for [`crate::quantize::bias_corrected`].
#[derive(Clone, Debug)]
pub struct ChannelMeans {
    sums: Vec<Vec<f64>>,
    /// Values per channel in one image: the product of the dimensions after the channels.
    plane: Vec<usize>,
    images: usize,
}

impl ChannelMeans {
    /// Sums for tensors of these shapes (a graph's, by value id).
    pub fn new(shapes: &[Vec<usize>]) -> Self {
        Self {
            sums: shapes
                .iter()
                .map(|s| vec![0.0; s.get(1).copied().unwrap_or(1)])
                .collect(),
            plane: shapes
                .iter()
                .map(|s| s.iter().skip(2).product::<usize>().max(1))
                .collect(),
            images: 0,
        }
    }

    /// Add one image's values (by tensor id).
    pub fn observe(&mut self, values: &[Vec<f32>]) {
        self.observe_mapped(values, |_, x| x);
    }

    /// Add one image's values as int8 carries them with `params` (by tensor id): what a
    /// plan's layers read in place of the float values.
    pub fn observe_as_int8(&mut self, values: &[Vec<f32>], params: &[ActivationQuant]) {
        self.observe_mapped(values, |tensor, x| {
            params.get(tensor).map_or(x, |q| q.represented(x))
        });
    }

    fn observe_mapped(&mut self, values: &[Vec<f32>], map: impl Fn(usize, f32) -> f32) {
        let tensors = self.sums.iter_mut().zip(&self.plane).zip(values);
        for (tensor, ((sums, &plane), v)) in tensors.enumerate() {
            for (sum, channel) in sums.iter_mut().zip(v.chunks(plane)) {
                *sum += channel
                    .iter()
                    .filter(|x| x.is_finite())
                    .map(|&x| f64::from(map(tensor, x)))
                    .sum::<f64>()
                    / plane as f64;
            }
        }
        self.images += 1;
    }

    /// Each tensor's channel means, by tensor id (zeros before any image).
    pub fn means(&self) -> Vec<Vec<f64>> {
        let images = self.images.max(1) as f64;
        self.sums
            .iter()
            .map(|sums| sums.iter().map(|s| s / images).collect())
            .collect()
    }
}

/// Symmetric int8 weights of one layer, one scale per output channel, and its biases.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeights {
    /// Row-major like the float weights, in `[-127, 127]` (-128 unused, so negation is exact).
    pub values: Vec<i8>,
    /// Real value of one step, per output channel.
    pub scales: Vec<f32>,
    /// Per output channel, in the accumulator's scale (`input_scale * scale`).
    pub bias: Vec<i32>,
}

/// The largest bias, in accumulator steps, a channel's weight scale allows: half the int32
/// accumulator, which leaves the other half to the products (127 · 255 per input value: 2^27
/// even for 4,096 of them).
const MAX_BIAS_STEPS: f64 = (1u32 << 30) as f64;

/// Quantise `weights`, whose leading dimension is `channels` output channels, each to its own
/// symmetric scale, and `bias` into each channel's accumulator scale (`input_scale` times the
/// channel's). A channel's scale is `max |w| / 127`, or larger where its bias would not fit
/// in `MAX_BIAS_STEPS`: a channel whose weights are tiny beside its bias (a BatchNorm with a
/// scale near 0 folded into it) keeps its bias and rounds its weights toward zero, rather than
/// saturating the bias. A channel with neither weights nor bias gets scale 1.
pub fn quantize_weights_per_channel(
    weights: &[f32],
    channels: usize,
    bias: &[f32],
    input_scale: f32,
) -> QuantizedWeights {
    let per_channel = weights.len() / channels.max(1);
    let mut values = Vec::with_capacity(weights.len());
    let mut scales = Vec::with_capacity(channels);
    let mut biases = Vec::with_capacity(channels);
    for (c, channel) in weights
        .chunks(per_channel.max(1))
        .take(channels)
        .enumerate()
    {
        let b = f64::from(bias.get(c).copied().unwrap_or(0.0));
        let max = channel.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let for_bias = (b.abs() / (f64::from(input_scale) * MAX_BIAS_STEPS)) as f32;
        let scale = (max / 127.0).max(for_bias);
        let scale = if scale > 0.0 && scale.is_finite() {
            scale
        } else {
            1.0
        };
        values.extend(
            channel
                .iter()
                .map(|w| (w / scale).round().clamp(-127.0, 127.0) as i8),
        );
        let steps = (b / (f64::from(input_scale) * f64::from(scale))).round();
        biases.push(steps.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32);
        scales.push(scale);
    }
    QuantizedWeights {
        values,
        scales,
        bias: biases,
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;

    #[test]
    fn per_channel_weights_use_the_full_range_of_each_channel() {
        let weights = [0.6, -1.0, 0.25, 0.012, -0.02, 0.005, 0.0, 0.0, 0.0];
        let q = quantize_weights_per_channel(&weights, 3, &[0.0; 3], 0.01);
        assert_eq!(q.values, vec![76, -127, 32, 76, -127, 32, 0, 0, 0]);
        assert_eq!(q.scales[2], 1.0);
        for (i, (&w, &v)) in weights.iter().zip(&q.values).enumerate() {
            let scale = q.scales[i / 3];
            assert!(
                (w - scale * f32::from(v)).abs() <= scale / 2.0 + 1e-9,
                "weight {i}"
            );
        }
    }

    #[test]
    fn biases_land_in_the_accumulator_scale() {
        let weights = [0.1 * 127.0, 0.05 * 127.0];
        let q = quantize_weights_per_channel(&weights, 2, &[0.5, -0.25], 0.01);
        assert_eq!(q.bias, vec![500, -500]);
    }

    /// A channel whose weights are tiny beside its bias (BatchNorm's scale near 0, folded in)
    /// widens its weight scale so the bias fits the accumulator, instead of saturating it: the
    /// bias survives to within a step, the weights round to 0.
    #[test]
    fn a_bias_too_large_for_tiny_weights_widens_the_scale() {
        let (input_scale, bias) = (0.02f32, [0.7f32, -3.0, 1e30]);
        let weights = [1e-12, -2e-12, 1e-13, 0.0, 5e-14, 0.0];
        let q = quantize_weights_per_channel(&weights, 3, &bias, input_scale);
        for (c, &b) in bias.iter().enumerate() {
            // Within the f32 scale's rounding of the bound.
            let steps = f64::from(q.bias[c].unsigned_abs());
            assert!(steps <= MAX_BIAS_STEPS * (1.0 + 1e-6), "{q:?}");
            let real = f64::from(q.bias[c]) * f64::from(input_scale) * f64::from(q.scales[c]);
            let step = f64::from(input_scale) * f64::from(q.scales[c]);
            assert!(
                (real - f64::from(b)).abs() <= step,
                "channel {c}: {real} for {b}"
            );
        }
        assert_eq!(q.values, vec![0; 6]);
    }
}
