//! Helpers for kernel tests: random inputs, poisoned outputs, norm-wise error.

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A bf16 NaN with all mantissa bits set: the poison written into outputs before a run.
pub const BF16_POISON: bf16 = bf16::from_bits(0x7fff);

/// A seeded generator; tests draw a fresh seed per case from `fresh_seed`.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A seed that differs between runs (time and process id), printed by tests on failure;
/// `MMKD_TEST_SEED=N` replays a printed seed.
pub fn fresh_seed() -> u64 {
    if let Some(s) = std::env::var("MMKD_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// `n` values uniform in [lo, hi), rounded to bf16.
pub fn random_bf16(rng: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(lo..hi)))
        .collect()
}

/// `n` values uniform in [lo, hi).
pub fn random_f32(rng: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// ‖out − ref‖ / ‖ref‖ in f64; infinite when any output is NaN or infinite (NaN never passes)
/// or the lengths differ. With ‖ref‖ = 0 it is ‖out‖.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (o, r) in out.iter().zip(reference) {
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The raw bits of bf16 values, as the device buffers hold them (no copy).
pub fn bf16_bits(v: &[bf16]) -> &[u16] {
    bytemuck::cast_slice(v)
}

/// Widens bf16 values for [`rel_err`].
pub fn bf16_to_f64(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// Widens f32 values for [`rel_err`].
pub fn f32_to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_rejects_nan_and_measures_error() {
        assert_eq!(rel_err(&[1.0, f64::NAN], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        let e = rel_err(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((e - 0.5 / (3.0f64 * 3.0 + 4.5 * 4.5).sqrt()).abs() < 1e-12);
        assert!(BF16_POISON.is_nan());
    }
}
