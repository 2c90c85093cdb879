//! Launchers and tests for `cuda/wgmma_test.cu`: the emulation's `wgmma` (m64n128k16, bf16
//! operands in shared memory through no-swizzle descriptors, K-major and MN-major, fp32
//! accumulators) against a plain matrix product, and its deferred completion.
//!
//! Both kernels compute the same `D = A·Bᵀ + C`; [`FragKernel`] says how the operands are
//! stored in global and shared memory.

use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::emu::Emu;
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::WGMMA_TEST;
use crate::testing::bf16_bits;
use anyhow::Result;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::bf16;

/// One warpgroup and the two staged operands.
const GROUP: LaunchShape = LaunchShape {
    grid: [1, 1, 1],
    block: [128, 1, 1],
    shared_bytes: 6144,
};

/// The two test kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragKernel {
    /// `frag_wgmma`: A (64, 16) and B (128, 16) row-major, K-major in shared memory.
    KMajor,
    /// `frag_wgmma_mn`: Aᵀ (16, 64) and Bᵀ (16, 128) row-major, MN-major in shared memory
    /// (the instruction's transpose flags set).
    MnMajor,
}

impl FragKernel {
    /// The entry point.
    pub fn entry(self) -> &'static str {
        match self {
            FragKernel::KMajor => "frag_wgmma",
            FragKernel::MnMajor => "frag_wgmma_mn",
        }
    }
    /// A (64, 16) and B (128, 16) as this kernel reads them from global memory.
    fn stage(self, a: &[bf16], b: &[bf16]) -> (Vec<bf16>, Vec<bf16>) {
        match self {
            FragKernel::KMajor => (a.to_vec(), b.to_vec()),
            FragKernel::MnMajor => (transpose(a, 64, 16), transpose(b, 128, 16)),
        }
    }
}

/// The (cols, rows) transpose of a row-major (rows, cols) matrix.
fn transpose(v: &[bf16], rows: usize, cols: usize) -> Vec<bf16> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
        .collect()
}

/// `D = A·Bᵀ + C` for A (64, 16), B (128, 16) row-major, C and D (64, 128), in f64.
pub fn wgmma_reference(a: &[bf16], b: &[bf16], c: &[f32]) -> Vec<f64> {
    let mut d = vec![0.0f64; 64 * 128];
    for i in 0..64 {
        for j in 0..128 {
            let dot: f64 = (0..16)
                .map(|k| f64::from(a[i * 16 + k].to_f32()) * f64::from(b[j * 16 + k].to_f32()))
                .sum();
            d[i * 128 + j] = f64::from(c[i * 128 + j]) + dot;
        }
    }
    d
}

fn check(a: &[bf16], b: &[bf16], c: &[f32], d: usize) -> Result<()> {
    for (n, have, need) in [
        ("A", a.len(), 64 * 16),
        ("B", b.len(), 128 * 16),
        ("C", c.len(), 64 * 128),
        ("D", d, 64 * 128),
    ] {
        check_len("frag_wgmma", n, have, need)?;
    }
    Ok(())
}

/// `kernel` (or a test variant of it, `variant:frag_wgmma`) under the emulation; `a` and `b`
/// are A (64, 16) and B (128, 16) row-major, whatever the kernel's storage.
pub fn wgmma_emu(
    emu: &Emu,
    kernel: FragKernel,
    variant: Option<&str>,
    a: &[bf16],
    b: &[bf16],
    c: &[f32],
    d: &mut [f32],
) -> Result<()> {
    check(a, b, c, d.len())?;
    let (a, b) = kernel.stage(a, b);
    // 16-byte copies need 16-byte aligned sources.
    let (a16, b16) = (aligned(&a), aligned(&b));
    let args = [
        Arg::Ptr(a16.as_ptr() as u64),
        Arg::Ptr(b16.as_ptr() as u64),
        Arg::host(c),
        Arg::host_mut(d),
    ];
    let name = match variant {
        Some(v) => format!("{v}:{}", kernel.entry()),
        None => kernel.entry().to_string(),
    };
    // SAFETY: lengths checked above; the aligned copies outlive the launch.
    unsafe { emu.launch(&name, GROUP, &args) }
}

/// `kernel` on a GPU (sm_90a only); `d` comes back through the host.
pub fn wgmma_gpu(
    gpu: &Gpu,
    kernel: FragKernel,
    a: &[bf16],
    b: &[bf16],
    c: &[f32],
    d: &mut [f32],
) -> Result<()> {
    check(a, b, c, d.len())?;
    let (a, b) = kernel.stage(a, b);
    let s = gpu.stream();
    let da = driver(s.clone_htod(bf16_bits(&a)), "copy A")?;
    let db = driver(s.clone_htod(bf16_bits(&b)), "copy B")?;
    let dc = driver(s.clone_htod(c), "copy C")?;
    let mut dd = driver(s.clone_htod(&vec![f32::NAN; d.len()]), "alloc D")?;
    {
        let (pa, _ga) = da.device_ptr(s);
        let (pb, _gb) = db.device_ptr(s);
        let (pc, _gc) = dc.device_ptr(s);
        let (pd, _gd) = dd.device_ptr_mut(s);
        let args = [Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::Ptr(pd)];
        // SAFETY: every buffer holds what the kernel reads or writes at this fixed shape.
        unsafe { gpu.launch(&WGMMA_TEST, kernel.entry(), GROUP, &args)? };
    }
    d.copy_from_slice(&driver(s.dtoh_synced(&dd), "copy D back")?);
    Ok(())
}

fn driver<T, E: std::fmt::Debug>(r: std::result::Result<T, E>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("frag_wgmma: {what}: {e:?}"))
}

fn aligned(v: &[bf16]) -> Vec<u128> {
    let mut out = vec![0u128; (v.len() * 2).div_ceil(16)];
    bytemuck::cast_slice_mut::<u128, u8>(&mut out)[..v.len() * 2]
        .copy_from_slice(bytemuck::cast_slice(v));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_to_f64, fresh_seed, random_bf16, random_f32, rel_err, rng};

    fn inputs(seed: u64) -> (Vec<bf16>, Vec<bf16>, Vec<f32>) {
        let mut r = rng(seed);
        (
            random_bf16(&mut r, 64 * 16, -2.0, 2.0),
            random_bf16(&mut r, 128 * 16, -2.0, 2.0),
            random_f32(&mut r, 64 * 128, -1.0, 1.0),
        )
    }

    /// The accumulator layout and the descriptor decoding give `A·Bᵀ + C`, for every element,
    /// with both operands K-major and both MN-major.
    #[test]
    fn wgmma_matches_a_plain_matrix_product() {
        for kernel in [FragKernel::KMajor, FragKernel::MnMajor] {
            for _ in 0..2 {
                let seed = fresh_seed();
                let (a, b, c) = inputs(seed);
                let mut d = vec![f32::NAN; 64 * 128];
                wgmma_emu(&Emu::default(), kernel, None, &a, &b, &c, &mut d).unwrap();
                assert!(d.iter().all(|x| x.is_finite()), "seed {seed}: NaN left");
                let e = rel_err(&f32_to_f64(&d), &wgmma_reference(&a, &b, &c));
                assert!(e <= 1e-6, "{kernel:?} seed {seed}: wgmma rel err {e}");
            }
        }
    }

    /// Reading an MN-major operand as K-major (or the reverse) scrambles it: the emulation's
    /// two addressings differ on the test's layouts, so each test above can fail.
    #[test]
    fn the_two_majors_are_told_apart() {
        let seed = fresh_seed();
        let (a, b, c) = inputs(seed);
        let want = wgmma_reference(&a, &b, &c);
        // Undo the staging transpose, so frag_wgmma_mn receives A's and B's K-major storage
        // and its transpose flags read them the other way round.
        let (at, bt) = (transpose(&a, 16, 64), transpose(&b, 16, 128));
        let mut d = vec![f32::NAN; 64 * 128];
        wgmma_emu(
            &Emu::default(),
            FragKernel::MnMajor,
            None,
            &at,
            &bt,
            &c,
            &mut d,
        )
        .unwrap();
        let e = rel_err(&f32_to_f64(&d), &want);
        assert!(e > 0.1, "seed {seed}: misread operands gave rel err {e}");
    }

    /// Accumulators read before `wgmma_wait` hold the values from before the product.
    #[test]
    fn accumulators_read_before_the_wait_are_stale() {
        let seed = fresh_seed();
        let (a, b, c) = inputs(seed);
        let mut d = vec![f32::NAN; 64 * 128];
        wgmma_emu(
            &Emu::default(),
            FragKernel::KMajor,
            Some("early_read"),
            &a,
            &b,
            &c,
            &mut d,
        )
        .unwrap();
        assert_eq!(d, c, "seed {seed}: an early read saw the product");
    }

    /// The same products on a GPU with sm_90a (skipped without one).
    #[test]
    fn gpu_wgmma_matches_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto) {
            Ok(crate::device::Device::Cuda(g)) if g.capability == (9, 0) => g,
            _ => {
                eprintln!("no sm_90 GPU: the wgmma GPU test is skipped");
                return;
            }
        };
        for kernel in [FragKernel::KMajor, FragKernel::MnMajor] {
            let seed = fresh_seed();
            let (a, b, c) = inputs(seed);
            let mut d = vec![f32::NAN; 64 * 128];
            wgmma_gpu(&gpu, kernel, &a, &b, &c, &mut d).unwrap();
            let e = rel_err(&f32_to_f64(&d), &wgmma_reference(&a, &b, &c));
            assert!(e <= 1e-5, "{kernel:?} seed {seed}: GPU wgmma rel err {e}");
        }
    }
}
