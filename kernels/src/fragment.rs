//! Launchers and tests for `cuda/fragment_test.cu`: the emulation's `mma.sync` m16n8k16 and
//! `ldmatrix` against a plain matrix product and against the PTX ISA's fragment tables.

use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::emu::Emu;
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::FRAGMENT_TEST;
use crate::testing::bf16_bits;
use anyhow::{anyhow, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::bf16;

const WARP: LaunchShape = LaunchShape {
    grid: [1, 1, 1],
    block: [32, 1, 1],
    shared_bytes: 0,
};

/// `D = A·B + C` for A (16, 16), B (16, 8) row-major, C and D (16, 8) f32, in f64.
pub fn mma_reference(a: &[bf16], b: &[bf16], c: &[f32]) -> Vec<f64> {
    let mut d = vec![0.0f64; 16 * 8];
    for i in 0..16 {
        for j in 0..8 {
            let mut acc = f64::from(c[i * 8 + j]);
            for k in 0..16 {
                acc += f64::from(a[i * 16 + k].to_f32()) * f64::from(b[k * 8 + j].to_f32());
            }
            d[i * 8 + j] = acc;
        }
    }
    d
}

/// `frag_mma_direct` under the emulation: fragments built per the PTX ISA tables.
pub fn mma_direct_emu(emu: &Emu, a: &[bf16], b: &[bf16], c: &[f32], d: &mut [f32]) -> Result<()> {
    for (n, have, need) in [
        ("A", a.len(), 256),
        ("B", b.len(), 128),
        ("C", c.len(), 128),
        ("D", d.len(), 128),
    ] {
        check_len("frag_mma_direct", n, have, need)?;
    }
    let args = [Arg::host(a), Arg::host(b), Arg::host(c), Arg::host_mut(d)];
    // SAFETY: lengths checked above.
    unsafe { emu.launch("frag_mma_direct", WARP, &args) }
}

/// `frag_mma_ldmatrix` under the emulation: operands through cp.async and ldmatrix; `bt` is
/// B transposed, (8, 16). Both outputs must equal A·B + C.
pub fn mma_ldmatrix_emu(
    emu: &Emu,
    a: &[bf16],
    b: &[bf16],
    bt: &[bf16],
    c: &[f32],
    d1: &mut [f32],
    d2: &mut [f32],
) -> Result<()> {
    for (n, have, need) in [
        ("A", a.len(), 256),
        ("B", b.len(), 128),
        ("Bt", bt.len(), 128),
        ("C", c.len(), 128),
        ("D1", d1.len(), 128),
        ("D2", d2.len(), 128),
    ] {
        check_len("frag_mma_ldmatrix", n, have, need)?;
    }
    // cp.async of 16 bytes needs 16-byte aligned sources: copy into aligned buffers.
    let (a16, b16, bt16) = (aligned(a), aligned(b), aligned(bt));
    let args = [
        Arg::Ptr(a16.as_ptr() as u64),
        Arg::Ptr(b16.as_ptr() as u64),
        Arg::Ptr(bt16.as_ptr() as u64),
        Arg::host(c),
        Arg::host_mut(d1),
        Arg::host_mut(d2),
    ];
    // SAFETY: lengths checked above; the aligned copies live until the launch returns.
    unsafe { emu.launch("frag_mma_ldmatrix", WARP, &args) }
}

/// `frag_ldmatrix_dump` under the emulation: raw registers of the six ldmatrix forms.
pub fn ldmatrix_dump_emu(emu: &Emu, m: &[bf16], out: &mut [u32]) -> Result<()> {
    check_len("frag_ldmatrix_dump", "M", m.len(), 256)?;
    check_len("frag_ldmatrix_dump", "out", out.len(), 6 * 32 * 4)?;
    let args = [Arg::host(m), Arg::host_mut(out)];
    // SAFETY: lengths checked above.
    unsafe { emu.launch("frag_ldmatrix_dump", WARP, &args) }
}

// GPU launchers. These are test kernels, so they take host slices and do the copies
// themselves: the same parameters as the emulation launchers, ready for a device self-test.

fn driver<T>(r: std::result::Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

/// `frag_mma_direct` on a GPU; same parameters as [`mma_direct_emu`].
pub fn mma_direct_cuda(gpu: &Gpu, a: &[bf16], b: &[bf16], c: &[f32], d: &mut [f32]) -> Result<()> {
    for (n, have, need) in [
        ("A", a.len(), 256),
        ("B", b.len(), 128),
        ("C", c.len(), 128),
        ("D", d.len(), 128),
    ] {
        check_len("frag_mma_direct", n, have, need)?;
    }
    let st = gpu.stream();
    let da = driver(st.clone_htod(bf16_bits(&a[..256])), "copy A")?;
    let db = driver(st.clone_htod(bf16_bits(&b[..128])), "copy B")?;
    let dc = driver(st.clone_htod(&c[..128]), "copy C")?;
    let mut dd = driver(st.clone_htod(&vec![f32::NAN; 128]), "alloc D")?;
    {
        let (pa, _ga) = da.device_ptr(st);
        let (pb, _gb) = db.device_ptr(st);
        let (pc, _gc) = dc.device_ptr(st);
        let (pd, _gd) = dd.device_ptr_mut(st);
        // SAFETY: four device buffers of the sizes the kernel indexes.
        unsafe {
            gpu.launch(
                &FRAGMENT_TEST,
                "frag_mma_direct",
                WARP,
                &[pa, pb, pc, pd].map(Arg::Ptr),
            )?
        };
    }
    d[..128].copy_from_slice(&driver(st.dtoh_synced(&dd), "copy D back")?);
    Ok(())
}

/// `frag_mma_ldmatrix` on a GPU; same parameters as [`mma_ldmatrix_emu`].
pub fn mma_ldmatrix_cuda(
    gpu: &Gpu,
    a: &[bf16],
    b: &[bf16],
    bt: &[bf16],
    c: &[f32],
    d1: &mut [f32],
    d2: &mut [f32],
) -> Result<()> {
    for (n, have, need) in [
        ("A", a.len(), 256),
        ("B", b.len(), 128),
        ("Bt", bt.len(), 128),
        ("C", c.len(), 128),
        ("D1", d1.len(), 128),
        ("D2", d2.len(), 128),
    ] {
        check_len("frag_mma_ldmatrix", n, have, need)?;
    }
    let st = gpu.stream();
    let da = driver(st.clone_htod(bf16_bits(&a[..256])), "copy A")?;
    let db = driver(st.clone_htod(bf16_bits(&b[..128])), "copy B")?;
    let dbt = driver(st.clone_htod(bf16_bits(&bt[..128])), "copy Bt")?;
    let dc = driver(st.clone_htod(&c[..128]), "copy C")?;
    let mut dd1 = driver(st.clone_htod(&vec![f32::NAN; 128]), "alloc D1")?;
    let mut dd2 = driver(st.clone_htod(&vec![f32::NAN; 128]), "alloc D2")?;
    {
        let (pa, _ga) = da.device_ptr(st);
        let (pb, _gb) = db.device_ptr(st);
        let (pbt, _gbt) = dbt.device_ptr(st);
        let (pc, _gc) = dc.device_ptr(st);
        let (p1, _g1) = dd1.device_ptr_mut(st);
        let (p2, _g2) = dd2.device_ptr_mut(st);
        // SAFETY: device buffers of the sizes the kernel indexes (allocations are 256-byte aligned).
        unsafe {
            gpu.launch(
                &FRAGMENT_TEST,
                "frag_mma_ldmatrix",
                WARP,
                &[pa, pb, pbt, pc, p1, p2].map(Arg::Ptr),
            )?
        };
    }
    d1[..128].copy_from_slice(&driver(st.dtoh_synced(&dd1), "copy D1 back")?);
    d2[..128].copy_from_slice(&driver(st.dtoh_synced(&dd2), "copy D2 back")?);
    Ok(())
}

/// `frag_ldmatrix_dump` on a GPU; same parameters as [`ldmatrix_dump_emu`].
pub fn ldmatrix_dump_cuda(gpu: &Gpu, m: &[bf16], out: &mut [u32]) -> Result<()> {
    check_len("frag_ldmatrix_dump", "M", m.len(), 256)?;
    check_len("frag_ldmatrix_dump", "out", out.len(), 6 * 32 * 4)?;
    let st = gpu.stream();
    let dm = driver(st.clone_htod(bf16_bits(&m[..256])), "copy M")?;
    let mut dout = driver(st.clone_htod(&vec![0u32; 6 * 32 * 4]), "alloc out")?;
    {
        let (pm, _gm) = dm.device_ptr(st);
        let (po, _go) = dout.device_ptr_mut(st);
        // SAFETY: device buffers of the sizes the kernel indexes.
        unsafe {
            gpu.launch(
                &FRAGMENT_TEST,
                "frag_ldmatrix_dump",
                WARP,
                &[Arg::Ptr(pm), Arg::Ptr(po)],
            )?
        };
    }
    out[..6 * 32 * 4].copy_from_slice(&driver(st.dtoh_synced(&dout), "copy out back")?);
    Ok(())
}

/// A copy of `v` starting on a 16-byte boundary (as device allocations do).
fn aligned(v: &[bf16]) -> Vec<u128> {
    let mut out = vec![0u128; (v.len() * 2).div_ceil(16)];
    bytemuck::cast_slice_mut::<u128, u8>(&mut out)[..v.len() * 2]
        .copy_from_slice(bytemuck::cast_slice(v));
    out
}

/// The registers the PTX ISA says lane `lane` receives from `ldmatrix .x{count}` (`trans` for
/// `.trans`) when lane L points at row L of `m` (32 rows of 8 bf16; matrix i = rows 8i..8i+7).
pub fn ldmatrix_expected(m: &[bf16], count: usize, trans: bool, lane: usize) -> [u32; 4] {
    let mut r = [0u32; 4];
    let (g, t) = (lane / 4, lane % 4);
    for (i, reg) in r.iter_mut().enumerate().take(count) {
        let at = |row: usize, col: usize| u32::from(m[(8 * i + row) * 8 + col].to_bits());
        let (lo, hi) = if trans {
            (at(2 * t, g), at(2 * t + 1, g))
        } else {
            (at(g, 2 * t), at(g, 2 * t + 1))
        };
        *reg = lo | (hi << 16);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_to_f64, fresh_seed, random_bf16, random_f32, rel_err, rng};

    fn inputs(seed: u64) -> (Vec<bf16>, Vec<bf16>, Vec<bf16>, Vec<f32>) {
        let mut r = rng(seed);
        let a = random_bf16(&mut r, 256, -2.0, 2.0);
        let b = random_bf16(&mut r, 128, -2.0, 2.0);
        let mut bt = vec![bf16::ZERO; 128];
        for k in 0..16 {
            for n in 0..8 {
                bt[n * 16 + k] = b[k * 8 + n];
            }
        }
        let c = random_f32(&mut r, 128, -1.0, 1.0);
        (a, b, bt, c)
    }

    #[test]
    fn mma_fragments_match_a_plain_matrix_product() {
        for _ in 0..3 {
            let seed = fresh_seed();
            let (a, b, _, c) = inputs(seed);
            let mut d = vec![f32::NAN; 128];
            mma_direct_emu(&Emu::default(), &a, &b, &c, &mut d).unwrap();
            let e = rel_err(&f32_to_f64(&d), &mma_reference(&a, &b, &c));
            assert!(e <= 1e-6, "seed {seed}: mma rel err {e}");
        }
    }

    #[test]
    fn ldmatrix_and_cp_async_feed_mma_correctly() {
        let seed = fresh_seed();
        let (a, b, bt, c) = inputs(seed);
        let (mut d1, mut d2) = (vec![f32::NAN; 128], vec![f32::NAN; 128]);
        mma_ldmatrix_emu(&Emu::default(), &a, &b, &bt, &c, &mut d1, &mut d2).unwrap();
        let reference = mma_reference(&a, &b, &c);
        let (e1, e2) = (
            rel_err(&f32_to_f64(&d1), &reference),
            rel_err(&f32_to_f64(&d2), &reference),
        );
        assert!(
            e1 <= 1e-6 && e2 <= 1e-6,
            "seed {seed}: ldmatrix x2 {e1}, x2.trans {e2}"
        );
    }

    #[test]
    fn ldmatrix_registers_follow_the_ptx_tables() {
        let seed = fresh_seed();
        let m = random_bf16(&mut rng(seed), 256, -4.0, 4.0);
        let mut out = vec![0xdead_beefu32; 6 * 32 * 4];
        ldmatrix_dump_emu(&Emu::default(), &m, &mut out).unwrap();
        for (v, (count, trans)) in [
            (1, false),
            (2, false),
            (4, false),
            (1, true),
            (2, true),
            (4, true),
        ]
        .into_iter()
        .enumerate()
        {
            for lane in 0..32 {
                let got = &out[(v * 32 + lane) * 4..(v * 32 + lane + 1) * 4];
                assert_eq!(
                    got,
                    ldmatrix_expected(&m, count, trans, lane),
                    "seed {seed}: x{count} trans={trans} lane {lane}"
                );
            }
        }
    }

    /// The same layout checks on a GPU when one is present: the hardware is the final word on
    /// the fragment tables the emulation follows.
    #[test]
    fn gpu_fragments_match_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto).unwrap() {
            crate::device::Device::Cuda(g) => g,
            crate::device::Device::Cpu => {
                eprintln!("no GPU: fragment GPU test not run");
                return;
            }
        };
        let seed = fresh_seed();
        let (a, b, bt, c) = inputs(seed);
        let reference = mma_reference(&a, &b, &c);
        let mut d = vec![f32::NAN; 128];
        mma_direct_cuda(&gpu, &a, &b, &c, &mut d).unwrap();
        assert!(
            rel_err(&f32_to_f64(&d), &reference) <= 1e-5,
            "seed {seed}: GPU mma"
        );
        let (mut d1, mut d2) = (vec![f32::NAN; 128], vec![f32::NAN; 128]);
        mma_ldmatrix_cuda(&gpu, &a, &b, &bt, &c, &mut d1, &mut d2).unwrap();
        assert!(
            rel_err(&f32_to_f64(&d1), &reference) <= 1e-5,
            "seed {seed}: GPU ldmatrix x2"
        );
        assert!(
            rel_err(&f32_to_f64(&d2), &reference) <= 1e-5,
            "seed {seed}: GPU ldmatrix x2.trans"
        );
        let m = random_bf16(&mut rng(seed), 256, -4.0, 4.0);
        let (mut gpu_out, mut emu_out) = (vec![0u32; 768], vec![0u32; 768]);
        ldmatrix_dump_cuda(&gpu, &m, &mut gpu_out).unwrap();
        ldmatrix_dump_emu(&Emu::default(), &m, &mut emu_out).unwrap();
        assert_eq!(
            gpu_out, emu_out,
            "seed {seed}: ldmatrix registers differ between GPU and emulation"
        );
    }

    /// A layout mistake must show: swapping two A registers changes the product.
    #[test]
    fn reference_detects_a_wrong_fragment_layout() {
        let (a, b, _, c) = inputs(fresh_seed());
        let mut swapped = a.clone();
        for i in 0..8 {
            for k in 0..8 {
                swapped.swap(i * 16 + k, i * 16 + k + 8);
            }
        }
        let e = rel_err(&mma_reference(&swapped, &b, &c), &mma_reference(&a, &b, &c));
        assert!(e > 1e-2, "{e}");
    }
}
