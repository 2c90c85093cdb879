//! Wider vectors for the CPU's elementwise loops, chosen at run time.
//!
//! The crate is built for the x86-64 baseline (SSE2, 4 floats per vector) so that one binary
//! runs everywhere. [`wide`] runs a loop compiled again for AVX-512 (16 floats) or AVX2 (8)
//! when the CPU has it.
//! Only the vector width changes: Rust never fuses a multiply and an add on its own, so the
//! results are the same IEEE operations in the same order, bit for bit, on every path.

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
