//! Wider vectors for the CPU's elementwise loops, chosen at run time.
//!
//! The crate is built for the x86-64 baseline (SSE2, 4 floats per vector) so that one binary
//! runs everywhere. [`wide`] runs a loop compiled again for AVX-512 (16 floats) or AVX2 (8)
//! when the CPU has it.
//! Only the vector width changes: Rust never fuses a multiply and an add on its own, so the
//! results are the same IEEE operations in the same order, bit for bit, on every path.
//! [`lane_sum`] gives reductions the independent adds that vectorising needs.

use crate::real::Real;

/// Runs `f`, compiled for AVX-512 or AVX2 when the CPU supports it. `f` should be the whole
/// loop (called once per chunk, not per element) and marked `#[inline(always)]`: it is inlined
/// into a function with those target features and vectorised there.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { wide_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { wide_avx2(f) };
        }
    }
    f()
}

/// Partial sums [`lane_sum`] keeps, whatever the vector width: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// `Σ f(i)` over `i < n`, in [`LANES`] interleaved partial sums added pairwise at the end.
/// A sequential sum is a chain of dependent adds, one per add latency; these vectorise. The
/// order is fixed, independent of the CPU, so every path of [`wide`] gives the same bits; it
/// differs from the sequential sum by rounding only. Call it inside [`wide`] for the wide adds.
#[inline(always)]
pub fn lane_sum<T: Real>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::zero(); LANES];
    let full = n - n % LANES;
    let mut i = 0;
    while i < full {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(i + j);
        }
        i += LANES;
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            let v = acc[j + w];
            acc[j] += v;
        }
    }
    let mut tail = acc[0];
    for i in full..n {
        tail += f(i);
    }
    tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn wide_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sum_is_the_sum() {
        for n in [0, 1, 5, 15, 16, 17, 64, 100, 769] {
            // Integers: every order gives the exact sum.
            let exact: f64 = (0..n).map(|i| (i * i % 97) as f64).sum();
            assert_eq!(lane_sum(n, |i| (i * i % 97) as f64), exact, "n = {n}");
            assert_eq!(
                lane_sum(n, |i| (i * i % 97) as f32),
                exact as f32,
                "n = {n}"
            );
            // Non-integers: within rounding of the f64 sum.
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).sin()).collect();
            let want: f64 = v.iter().map(|&x| x as f64).sum();
            let got = wide(
                #[inline(always)]
                || lane_sum(n, |i| v[i]),
            );
            assert!(
                (got as f64 - want).abs() <= 1e-6 * (1.0 + n as f64),
                "n = {n}"
            );
        }
    }

    /// Work with selects, divisions and the crate's exp and erf, as the engine's loops have.
    #[inline(always)]
    fn body(x: &[f32]) -> Vec<f32> {
        x.iter()
            .map(|&v| v * crate::real::erf_f32(v) + crate::real::exp_f32(-v) / (1.0 + v * v))
            .collect()
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        let x: Vec<f32> = (0..1037).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let plain = body(&x);
        let mut paths = vec![wide(
            #[inline(always)]
            || body(&x),
        )];
        #[cfg(target_arch = "x86_64")]
        {
            // Each path this CPU has, whichever `wide` picks.
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: checked just above.
                paths.push(unsafe {
                    wide_avx2(
                        #[inline(always)]
                        || body(&x),
                    )
                });
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: checked just above.
                paths.push(unsafe {
                    wide_avx512(
                        #[inline(always)]
                        || body(&x),
                    )
                });
            }
        }
        for widened in &paths {
            for (a, b) in plain.iter().zip(widened) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }
}
