//! Fixed-point requantisation: the only arithmetic that turns an int32 accumulator into the next
//! layer's int8, with no float at run time.
//!
//! A real scale factor `s` is stored as a 31-bit multiplier `m` in `[2^30, 2^31)` and a shift so
//! that `s = m * 2^(shift - 31)`. Applying it is one 64-bit multiply, an add of half, and an
//! arithmetic right shift: round half toward positive infinity. Every executor (generic, SIMD,
//! CUDA) must implement exactly this, so that integer results are bit-identical.

/// A real multiplier in fixed point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Requant {
    /// In `[2^30, 2^31)`.
    pub multiplier: i32,
    /// In `[-31, 30]`: the value is scaled by `multiplier * 2^(shift - 31)`.
    pub shift: i8,
}

impl Requant {
    /// Smallest shift: scales down to 2^-32.
    pub const MIN_SHIFT: i8 = -31;
    /// Largest shift: scales up to just below 2^30.
    pub const MAX_SHIFT: i8 = 30;

    /// The smallest scale, 2^-32: it maps every `i32` to 0 (`|acc| · 2^-32 <= 1/2`, and the
    /// one tie, `-2^31`, rounds up to 0), as every smaller positive scale does exactly.
    pub const SMALLEST: Self = Self {
        multiplier: 1 << 30,
        shift: Self::MIN_SHIFT,
    };

    /// The fixed-point form of `real`, or `None` when it is not finite and positive or reaches
    /// 2^30. Below 2^-32 it is [`Requant::SMALLEST`], which gives the same result, 0, for
    /// every accumulator (a right shift of 62 already leaves nothing of the 62-bit product).
    #[cfg(feature = "std")]
    pub fn from_real(real: f64) -> Option<Self> {
        if !real.is_finite() || real <= 0.0 {
            return None;
        }
        if real < 2f64.powi(-32) {
            return Some(Self::SMALLEST);
        }
        // real = fraction * 2^exponent with fraction in [0.5, 1).
        let mut exponent = real.log2().floor() as i32 + 1;
        let mut fraction = real / 2f64.powi(exponent);
        if fraction >= 1.0 {
            fraction /= 2.0;
            exponent += 1;
        } else if fraction < 0.5 {
            fraction *= 2.0;
            exponent -= 1;
        }
        let mut multiplier = (fraction * 2f64.powi(31)).round() as i64;
        if multiplier == 1 << 31 {
            multiplier /= 2;
            exponent += 1;
        }
        let shift = i8::try_from(exponent).ok()?;
        if !(Self::MIN_SHIFT..=Self::MAX_SHIFT).contains(&shift) {
            return None;
        }
        Some(Self {
            multiplier: multiplier as i32,
            shift,
        })
    }

    /// The real value this stands for.
    #[cfg(feature = "std")]
    pub fn to_real(self) -> f64 {
        f64::from(self.multiplier) * 2f64.powi(i32::from(self.shift) - 31)
    }

    /// `round(acc * scale)`, ties toward positive infinity, saturated to `i32`.
    #[inline]
    pub fn apply(self, acc: i32) -> i32 {
        // Clamped so a hand-made (not compiler-made) value cannot overflow or panic.
        let right = (31 - i32::from(self.shift.clamp(Self::MIN_SHIFT, Self::MAX_SHIFT))) as u32;
        let product = i64::from(acc) * i64::from(self.multiplier);
        let rounded = (product + (1i64 << (right - 1))) >> right;
        rounded.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
    }
}

/// Requantise an accumulator to int8: scale, add the output zero point, clamp to
/// `[min, max]` (the activation range: `[-128, 127]`, or from the zero point up for a fused ReLU).
#[inline]
pub fn requantize_i8(acc: i32, requant: Requant, zero_point: i32, min: i8, max: i8) -> i8 {
    // `max` then `min`, as the vector kernels clamp: a range a corrupt plan inverted
    // (`min > max`) gives `max` where `clamp` would panic.
    requant
        .apply(acc)
        .saturating_add(zero_point)
        .max(i32::from(min))
        .min(i32::from(max)) as i8
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn round_trips_real_multipliers() {
        let mut real = 3e-10;
        while real < 1e9 {
            let q = Requant::from_real(real).unwrap();
            assert!(
                (1 << 30..1i64 << 31).contains(&i64::from(q.multiplier)),
                "{real}: {q:?}"
            );
            assert!(
                (q.to_real() - real).abs() / real < 1e-9,
                "{real} became {}",
                q.to_real()
            );
            real *= 1.37;
        }
        assert_eq!(
            Requant::from_real(0.5),
            Some(Requant {
                multiplier: 1 << 30,
                shift: 0
            })
        );
        assert_eq!(
            Requant::from_real(1.0),
            Some(Requant {
                multiplier: 1 << 30,
                shift: 1
            })
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e9] {
            assert_eq!(Requant::from_real(bad), None, "{bad}");
        }
    }

    /// Scales below 2^-32 round every accumulator to 0, exactly as the real scale would.
    #[test]
    fn scales_below_the_range_give_zero_exactly() {
        let extremes = [i32::MIN, i32::MIN + 1, -1, 0, 1, i32::MAX - 1, i32::MAX];
        for real in [
            2f64.powi(-32),
            2f64.powi(-33),
            3e-13,
            1e-30,
            1e-300,
            f64::MIN_POSITIVE,
        ] {
            let q = Requant::from_real(real).unwrap();
            assert!(q.to_real() <= 2f64.powi(-32), "{real}: {q:?}");
            for acc in extremes {
                let exact = (f64::from(acc) * real + 0.5).floor();
                assert_eq!(f64::from(q.apply(acc)), exact, "{acc} * {real}");
                assert_eq!(q.apply(acc), 0, "{acc} * {real}");
            }
        }
        // Just above the range's floor, results are no longer all 0.
        let q = Requant::from_real(2f64.powi(-31)).unwrap();
        assert_eq!(q.apply(i32::MAX), 1);
    }

    #[test]
    fn rounds_half_up_exactly() {
        let half = Requant::from_real(0.5).unwrap();
        let cases = [
            (1, 1),
            (-1, 0),
            (3, 2),
            (-3, -1),
            (2, 1),
            (0, 0),
            (i32::MAX, 1 << 30),
            (i32::MIN, -(1 << 30)),
        ];
        for (acc, expected) in cases {
            assert_eq!(half.apply(acc), expected, "{acc} * 0.5");
        }
        let big = Requant::from_real(1000.0).unwrap();
        assert_eq!(big.apply(i32::MAX), i32::MAX, "saturates");
        assert_eq!(big.apply(i32::MIN), i32::MIN, "saturates");
    }

    #[test]
    fn matches_the_real_product_within_half_a_step() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..100_000 {
            let acc = (next() as i32) >> (next() % 24);
            let real = 2f64.powf(-((next() % 3000) as f64) / 100.0);
            let q = Requant::from_real(real).unwrap();
            let exact = f64::from(acc) * q.to_real();
            let got = f64::from(q.apply(acc));
            assert!(
                (got - exact).abs() <= 0.5 + 1e-6,
                "{acc} * {real}: {got} vs {exact}"
            );
            if (exact - exact.floor() - 0.5).abs() > 1e-6 {
                assert_eq!(got, exact.round(), "{acc} * {real}");
            }
        }
    }

    #[test]
    fn requantize_clamps_to_the_activation_range() {
        let q = Requant::from_real(0.25).unwrap();
        assert_eq!(requantize_i8(400, q, -10, -128, 127), 90);
        assert_eq!(requantize_i8(4000, q, -10, -128, 127), 127);
        assert_eq!(requantize_i8(-4000, q, -10, -128, 127), -128);
        assert_eq!(
            requantize_i8(-400, q, -10, -10, 127),
            -10,
            "fused ReLU clamps at the zero point"
        );
        let odd = Requant {
            multiplier: 1,
            shift: 100,
        };
        assert_eq!(
            odd.apply(5),
            3,
            "an out-of-range shift is clamped to 30, not a panic"
        );
    }
}
