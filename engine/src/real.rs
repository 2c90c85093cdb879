//! `Real`: the scalar types the CPU kernels are generic over. The model runs in `f32`; gradient
//! checks run the very same kernels in `f64`.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// 1/√(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// A floating-point scalar the CPU kernels can run on (`f32` and `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// Converts from `f64` (rounding for `f32`).
    fn from_f64(v: f64) -> Self;
    /// Widens to `f64`.
    fn to_f64(self) -> f64;
    /// e^self.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// The standard normal distribution's Φ(self) and φ(self) together (GELU's derivative needs
    /// both): `Φ(x) = ½(1 + erf(x/√2))`, `φ(x) = e^{−x²/2}/√(2π)`.
    fn normal_cdf_pdf(self) -> (Self, Self) {
        let h = Self::from_f64(0.5);
        let cdf =
            h * (Self::one() + (self * Self::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = Self::from_f64(FRAC_1_SQRT_2PI) * (-h * self * self).exp();
        (cdf, pdf)
    }
    /// Larger of two values.
    fn max(self, o: Self) -> Self;
    /// Zero.
    fn zero() -> Self {
        Self::default()
    }
    /// One.
    fn one() -> Self {
        Self::from_f64(1.0)
    }
}

impl Real for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    // Inlined so the elementwise loops calling them vectorise (see `exp_f32`).
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    // One exponential for both: erf's tail at x/√2 needs e^{−x²/2}, which is φ's.
    #[inline(always)]
    fn normal_cdf_pdf(self) -> (Self, Self) {
        let e = exp_f32(-0.5 * self * self);
        let z = self * std::f32::consts::FRAC_1_SQRT_2;
        (
            0.5 * (1.0 + erf_f32_given_exp(z, e)),
            FRAC_1_SQRT_2PI as f32 * e,
        )
    }
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
}

impl Real for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
}

// The f32 model's exponentials and error functions sit in elementwise loops (softmax, GELU and
// its derivative, QuickGELU). The C library's `expf` and `libm::erff` are opaque calls with
// branches, so those loops ran one element at a time: GELU's backward alone was 14% of a tiny
// CPU step. The two functions below use only arithmetic, bit casts and selects, which the
// compiler vectorises. `f64` (the gradient checks) keeps the library functions.

/// e^x in f32 without a library call: `x = k·ln 2 + r`, |r| ≤ ln 2 / 2, `e^r` by its Taylor
/// series to r⁷ (truncation ≤ 4e-9 relative), `2^k` built in the exponent bits. Within 1.5 ulp
/// of the exact value (tested). Results below f32's smallest normal number are 0 (x < −87.33),
/// and x > 88.37 gives +∞ (the exact value overflows from 88.72); NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.33;
    const HI: f32 = 88.37;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k·LN2_HI is exact for the |k| ≤ 127 reached here (Cody and Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a library call.
    const ROUND: f32 = 12_582_912.0;
    // `clamp` keeps NaN (unlike `max`/`min`), so NaN passes through to the result.
    let xc = x.clamp(LO, HI);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // k ∈ [−126, 127] after the clamp, a normal exponent; NaN casts to 0.
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// erf(x) in f32 without a library call. |x| < 1: the Maclaurin series to x²³ (truncation
/// < 1e-10 relative). |x| ≥ 1: Abramowitz and Stegun 7.1.26, `1 − t(a₁ + … + a₅t⁴)·e^{−x²}`
/// with `t = 1/(1 + p|x|)`, absolute error ≤ 1.5e-7 where |erf| ≥ 0.84; in all, within 3e-7 relative
/// (tested). Both branches are
/// computed and one is selected, which keeps the loop vectorisable. Odd; ±1 for large |x|; NaN
/// stays NaN.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    erf_f32_given_exp(x, exp_f32(-x * x))
}

/// [`erf_f32`] with `e = e^{−x²}` supplied (its tail's exponential), for callers that have it.
#[inline(always)]
pub fn erf_f32_given_exp(x: f32, e: f32) -> f32 {
    // 2/√π · (−1)ⁿ / (n!(2n + 1)), n = 0..11.
    const C: [f32; 12] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_978,
        -8.548_327e-4,
        1.205_533_3e-4,
        -1.492_565e-5,
        1.646_211_4e-6,
        -1.636_584_5e-7,
        1.480_719_3e-8,
        -1.229_055_5e-9,
    ];
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let a = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    let x2 = x * x;
    let mut s = C[11];
    for &c in C[..11].iter().rev() {
        s = s * x2 + c;
    }
    let small = x * s;
    let t = 1.0 / (1.0 + P * a);
    let mut q = A[4];
    for &c in A[..4].iter().rev() {
        q = q * t + c;
    }
    let tail = 1.0 - t * q * e;
    // Copy x's sign onto the tail (|erf| is even in the bits below the sign).
    let large = f32::from_bits(tail.to_bits() | (x.to_bits() & 0x8000_0000));
    if a < 1.0 {
        small
    } else {
        large
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between an f32 and the exact value.
    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    /// Every 97th f32 bit pattern in [lo, hi] (both signs when lo < 0), plus the ends.
    fn sweep(lo: f32, hi: f32) -> Vec<f32> {
        let mut v = vec![lo, hi, 0.0, -0.0];
        for bits in (0u32..0x7f80_0000).step_by(97) {
            let f = f32::from_bits(bits);
            for x in [f, -f] {
                if x >= lo && x <= hi {
                    v.push(x);
                }
            }
        }
        v
    }

    #[test]
    fn exp_is_within_one_and_a_half_ulp() {
        let mut worst = (0.0, 0.0f32);
        for x in sweep(-87.33, 88.37) {
            let exact = (x as f64).exp();
            if exact < f32::MIN_POSITIVE as f64 {
                continue;
            }
            let u = ulps(exp_f32(x), exact);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(
            worst.0 <= 1.5,
            "exp_f32({}) is {} ulp off",
            worst.1,
            worst.0
        );
    }

    #[test]
    fn exp_edges() {
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
    }

    #[test]
    fn erf_is_accurate() {
        let mut worst_rel = (0.0, 0.0f32);
        for x in sweep(-10.0, 10.0) {
            let exact = libm::erf(x as f64);
            let got = erf_f32(x) as f64;
            if exact.abs() < f32::MIN_POSITIVE as f64 {
                // Subnormal results carry fewer significant bits; only the size is checked.
                assert!((got - exact).abs() < 1e-44, "erf_f32({x}) = {got}");
                continue;
            }
            let rel = (got - exact).abs() / exact.abs();
            if rel > worst_rel.0 {
                worst_rel = (rel, x);
            }
        }
        // 1.5e-7 absolute where |erf| ≥ 0.84, and the f32 rounding of the parts.
        assert!(
            worst_rel.0 <= 3e-7,
            "erf_f32({}) is {:e} relative off",
            worst_rel.1,
            worst_rel.0
        );
    }

    #[test]
    fn normal_cdf_pdf_is_accurate() {
        let (mut worst_cdf, mut worst_pdf) = (0.0f64, 0.0f64);
        for x in sweep(-12.0, 12.0) {
            let (c, p) = x.normal_cdf_pdf();
            let (wc, wp) = (x as f64).normal_cdf_pdf();
            // Φ to within 3e-7 absolute (it lies in [0, 1]); φ relative, where it is normal,
            // in units of its condition: rounding x²/2 to f32 alone moves e^{−x²/2} by up to
            // 2⁻²⁴·x²/2 relative.
            worst_cdf = worst_cdf.max((c as f64 - wc).abs());
            if wp > f32::MIN_POSITIVE as f64 {
                let cond = 1.0 + 0.5 * (x as f64).powi(2);
                worst_pdf = worst_pdf.max((p as f64 - wp).abs() / wp / cond);
            }
        }
        assert!(worst_cdf <= 3e-7, "Φ off by {worst_cdf:e}");
        assert!(
            worst_pdf <= 2.5e-7,
            "φ off by {worst_pdf:e} relative per unit of x²/2"
        );
        let (c, p) = f32::NAN.normal_cdf_pdf();
        assert!(c.is_nan() && p.is_nan());
        assert_eq!(f32::INFINITY.normal_cdf_pdf(), (1.0, 0.0));
        assert_eq!(f32::NEG_INFINITY.normal_cdf_pdf(), (0.0, 0.0));
    }

    #[test]
    fn erf_edges() {
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf_f32(0.0), 0.0);
        assert_eq!(erf_f32(-3.0), -erf_f32(3.0));
    }
}
