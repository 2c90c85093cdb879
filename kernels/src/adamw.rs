//! AdamW over all parameters in one launch and the global gradient norm (`cuda/adamw.cu`):
//! CPU reference, emulation and GPU launchers with the same parameters, and tests.
//!
//! [`grad_norm_cpu`]/`_emu`/`_cuda` write `norm_out[2]` = ‖g‖ and the clip coefficient
//! `min(1, max_norm / (‖g‖ + 1e-6))`; [`adamw_cpu`]/`_emu`/`_cuda` take that buffer (or none)
//! and apply the clipped, bias-corrected, decoupled-weight-decay update to fp32 master weights
//! and moments, writing a bf16 copy of the weights when asked.

use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{self, stride_shape, Backend, DevArgs, Step, P};
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::ADAMW;
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay (applied where the decay mask is non-zero).
    pub weight_decay: f32,
    /// The step number t ≥ 1 (for the bias corrections).
    pub step: u32,
}

impl AdamWConfig {
    fn bias_corrections(&self) -> Result<(f32, f32)> {
        ensure!(self.step >= 1, "adamw: step must be ≥ 1, got {}", self.step);
        let t = self.step as i32;
        Ok((1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t)))
    }
}

/// Blocks of the first norm pass; its partials are summed in order by the second.
const NORM_BLOCKS: usize = 1024;

/// Expands per-segment decay flags (`(length, decays)` in parameter order) into the
/// per-element mask the kernel reads.
pub fn decay_mask_from_segments(segments: &[(usize, bool)]) -> Vec<u8> {
    let mut m = Vec::with_capacity(segments.iter().map(|s| s.0).sum());
    for &(len, decays) in segments {
        m.extend(std::iter::repeat_n(u8::from(decays), len));
    }
    m
}

/// The norm's launches; slots 0 g, 1 norm_out, 2 scratch.
pub fn norm_plan(p: usize, max_norm: f32) -> Result<Vec<Step>> {
    ensure!(p > 0, "grad_norm: no parameters");
    let pi = match Arg::int("grad_norm P", p)? {
        Arg::I32(v) => v,
        _ => unreachable!("Arg::int returns I32"),
    };
    let g = NORM_BLOCKS.min(p.div_ceil(256));
    Ok(vec![
        Step {
            file: &ADAMW,
            kernel: "grad_sumsq",
            shape: LaunchShape::linear(g as u32, 256, 0),
            args: vec![P::Buf(0), P::Buf(2), P::I32(pi)],
        },
        Step {
            file: &ADAMW,
            kernel: "grad_norm_finish",
            shape: LaunchShape::linear(1, 256, 0),
            args: vec![P::Buf(2), P::Buf(1), P::I32(g as i32), P::F32(max_norm)],
        },
    ])
}

/// Elements of the scratch the norm needs.
pub fn norm_scratch_len(p: usize) -> usize {
    NORM_BLOCKS.min(p.div_ceil(256)).max(1)
}

/// CPU reference of the gradient norm (f64 sum); `scratch` only checked.
pub fn grad_norm_cpu(
    g: &[f32],
    max_norm: f32,
    norm_out: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    check_len("grad_norm", "norm_out", norm_out.len(), 2)?;
    check_len(
        "grad_norm",
        "scratch",
        scratch.len(),
        norm_scratch_len(g.len()),
    )?;
    ensure!(!g.is_empty(), "grad_norm: no parameters");
    let n = g
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    norm_out[0] = n as f32;
    norm_out[1] = if max_norm > 0.0 {
        (f64::from(max_norm) / (n + 1e-6)).min(1.0) as f32
    } else {
        1.0
    };
    Ok(())
}

/// The gradient norm under the emulation; same parameters as [`grad_norm_cpu`].
pub fn grad_norm_emu(
    emu: &Emu,
    g: &[f32],
    max_norm: f32,
    norm_out: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    check_len("grad_norm", "norm_out", norm_out.len(), 2)?;
    check_len(
        "grad_norm",
        "scratch",
        scratch.len(),
        norm_scratch_len(g.len()),
    )?;
    let steps = norm_plan(g.len(), max_norm)?;
    let ptrs = [
        g.as_ptr() as u64,
        norm_out.as_mut_ptr() as u64,
        scratch.as_mut_ptr() as u64,
    ];
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Emu(emu), &steps, &ptrs) }
}

/// The gradient norm on a GPU; same parameters as [`grad_norm_cpu`], device buffers.
pub fn grad_norm_cuda(
    gpu: &Gpu,
    g: &CudaSlice<f32>,
    max_norm: f32,
    norm_out: &mut CudaSlice<f32>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("grad_norm", "norm_out", norm_out.len(), 2)?;
    check_len(
        "grad_norm",
        "scratch",
        scratch.len(),
        norm_scratch_len(g.len()),
    )?;
    let steps = norm_plan(g.len(), max_norm)?;
    let mut a = DevArgs::new(gpu.stream());
    a.r(g);
    a.w(norm_out);
    a.w(scratch);
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Gpu(gpu), &steps, &a.ptrs) }
}

/// The step's launch; slots 0 p, 1 g, 2 m, 3 v, 4 p_bf16 (or null), 5 decay (or null),
/// 6 norm (or null).
pub fn adamw_plan(cfg: &AdamWConfig, p: usize, has: [bool; 3]) -> Result<Vec<Step>> {
    let (bc1, bc2) = cfg.bias_corrections()?;
    let opt = |on: bool, slot: usize| if on { P::Buf(slot) } else { P::Null };
    let pn = match Arg::int("adamw P", p)? {
        Arg::I32(v) => v,
        _ => unreachable!("Arg::int returns I32"),
    };
    Ok(vec![Step {
        file: &ADAMW,
        kernel: "adamw_step",
        shape: stride_shape(p),
        args: vec![
            P::Buf(0),
            P::Buf(1),
            P::Buf(2),
            P::Buf(3),
            opt(has[0], 4),
            opt(has[1], 5),
            opt(has[2], 6),
            P::I32(pn),
            P::F32(cfg.lr),
            P::F32(cfg.beta1),
            P::F32(cfg.beta2),
            P::F32(cfg.eps),
            P::F32(cfg.weight_decay),
            P::F32(bc1),
            P::F32(bc2),
        ],
    }])
}

fn check_step(p: usize, lens: [usize; 6]) -> Result<()> {
    ensure!(p > 0, "adamw: no parameters");
    let names = ["g", "m", "v", "p_bf16", "decay", "norm"];
    for (i, (name, have)) in names.iter().zip(lens).enumerate() {
        let need = match i {
            3 | 4 if have == usize::MAX => continue,
            5 if have == usize::MAX => continue,
            5 => 2,
            _ => p,
        };
        check_len("adamw", name, have, need)?;
    }
    Ok(())
}

/// CPU reference of one step (f64 arithmetic, stored as f32/bf16).
#[allow(clippy::too_many_arguments)]
pub fn adamw_cpu(
    cfg: &AdamWConfig,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    p_bf16: Option<&mut [bf16]>,
    decay: Option<&[u8]>,
    norm: Option<&[f32]>,
) -> Result<()> {
    let none = usize::MAX;
    check_step(
        p.len(),
        [
            g.len(),
            m.len(),
            v.len(),
            p_bf16.as_ref().map_or(none, |b| b.len()),
            decay.map_or(none, |d| d.len()),
            norm.map_or(none, |n| n.len()),
        ],
    )?;
    let (bc1, bc2) = cfg.bias_corrections()?;
    let clip = norm.map_or(1.0, |n| f64::from(n[1]));
    let (b1, b2) = (f64::from(cfg.beta1), f64::from(cfg.beta2));
    let (lr, wd, eps) = (
        f64::from(cfg.lr),
        f64::from(cfg.weight_decay),
        f64::from(cfg.eps),
    );
    let mut out_bf16 = p_bf16;
    for e in 0..p.len() {
        let gr = clip * f64::from(g[e]);
        let mut w = f64::from(p[e]);
        if decay.is_none_or(|d| d[e] != 0) {
            w -= lr * wd * w;
        }
        let mm = b1 * f64::from(m[e]) + (1.0 - b1) * gr;
        let vv = b2 * f64::from(v[e]) + (1.0 - b2) * gr * gr;
        w -= lr * (mm / f64::from(bc1)) / ((vv / f64::from(bc2)).sqrt() + eps);
        m[e] = mm as f32;
        v[e] = vv as f32;
        p[e] = w as f32;
        if let Some(b) = out_bf16.as_deref_mut() {
            b[e] = bf16::from_f32(p[e]);
        }
    }
    Ok(())
}

/// One step under the emulation; same parameters as [`adamw_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn adamw_emu(
    emu: &Emu,
    cfg: &AdamWConfig,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    p_bf16: Option<&mut [bf16]>,
    decay: Option<&[u8]>,
    norm: Option<&[f32]>,
) -> Result<()> {
    let none = usize::MAX;
    check_step(
        p.len(),
        [
            g.len(),
            m.len(),
            v.len(),
            p_bf16.as_ref().map_or(none, |b| b.len()),
            decay.map_or(none, |d| d.len()),
            norm.map_or(none, |n| n.len()),
        ],
    )?;
    let steps = adamw_plan(
        cfg,
        p.len(),
        [p_bf16.is_some(), decay.is_some(), norm.is_some()],
    )?;
    let ptrs = [
        p.as_mut_ptr() as u64,
        g.as_ptr() as u64,
        m.as_mut_ptr() as u64,
        v.as_mut_ptr() as u64,
        p_bf16.map_or(0, |b| b.as_mut_ptr() as u64),
        decay.map_or(0, |d| d.as_ptr() as u64),
        norm.map_or(0, |n| n.as_ptr() as u64),
    ];
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Emu(emu), &steps, &ptrs) }
}

/// One step on a GPU; same parameters as [`adamw_cpu`], device buffers (`p_bf16` as u16 bits).
#[allow(clippy::too_many_arguments)]
pub fn adamw_cuda(
    gpu: &Gpu,
    cfg: &AdamWConfig,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    p_bf16: Option<&mut CudaSlice<u16>>,
    decay: Option<&CudaSlice<u8>>,
    norm: Option<&CudaSlice<f32>>,
) -> Result<()> {
    let none = usize::MAX;
    check_step(
        p.len(),
        [
            g.len(),
            m.len(),
            v.len(),
            p_bf16.as_ref().map_or(none, |b| b.len()),
            decay.map_or(none, |d| d.len()),
            norm.map_or(none, |n| n.len()),
        ],
    )?;
    let steps = adamw_plan(
        cfg,
        p.len(),
        [p_bf16.is_some(), decay.is_some(), norm.is_some()],
    )?;
    let mut a = DevArgs::new(gpu.stream());
    a.w(p);
    a.r(g);
    a.w(m);
    a.w(v);
    match p_bf16 {
        Some(b) => a.w(b),
        None => a.null(),
    }
    match decay {
        Some(d) => a.r(d),
        None => a.null(),
    }
    match norm {
        Some(n) => a.r(n),
        None => a.null(),
    }
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Gpu(gpu), &steps, &a.ptrs) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        bf16_to_f64, f32_to_f64, fresh_seed, random_f32, rel_err, rng, BF16_POISON,
    };
    use rand::Rng;

    fn cfg(step: u32) -> AdamWConfig {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
            step,
        }
    }

    #[test]
    fn norm_matches_reference() {
        for p in [1usize, 255, 257, 1000, 300_001] {
            let seed = fresh_seed();
            let g = random_f32(&mut rng(seed), p, -1.0, 1.0);
            let s = norm_scratch_len(p);
            for max_norm in [0.0f32, 1.0, 1e9] {
                let (mut o0, mut o1) = (vec![f32::NAN; 2], vec![f32::NAN; 2]);
                grad_norm_cpu(&g, max_norm, &mut o0, &mut vec![f32::NAN; s]).unwrap();
                grad_norm_emu(
                    &Emu::default(),
                    &g,
                    max_norm,
                    &mut o1,
                    &mut vec![f32::NAN; s],
                )
                .unwrap();
                let e = rel_err(&f32_to_f64(&o1), &f32_to_f64(&o0));
                assert!(
                    e <= 1e-4,
                    "P={p} max_norm={max_norm} seed {seed}: {o1:?} vs {o0:?}"
                );
            }
        }
    }

    #[test]
    fn step_matches_reference_over_several_steps() {
        for p in [1usize, 33, 1000, 4099] {
            let seed = fresh_seed();
            let mut r = rng(seed);
            let p0 = random_f32(&mut r, p, -1.0, 1.0);
            let decay: Vec<u8> = (0..p).map(|_| u8::from(r.gen_bool(0.7))).collect();
            let (mut pa, mut ma, mut va) = (p0.clone(), vec![0.0f32; p], vec![0.0f32; p]);
            let (mut pb, mut mb, mut vb) = (p0.clone(), vec![0.0f32; p], vec![0.0f32; p]);
            for t in 1..=3u32 {
                let g = random_f32(&mut r, p, -2.0, 2.0);
                let s = norm_scratch_len(p);
                let (mut na, mut nb) = (vec![f32::NAN; 2], vec![f32::NAN; 2]);
                grad_norm_cpu(&g, 5.0, &mut na, &mut vec![0.0; s]).unwrap();
                grad_norm_emu(&Emu::default(), &g, 5.0, &mut nb, &mut vec![0.0; s]).unwrap();
                let (mut ba, mut bb) = (vec![BF16_POISON; p], vec![BF16_POISON; p]);
                let dm = (t != 2).then_some(decay.as_slice());
                adamw_cpu(
                    &cfg(t),
                    &mut pa,
                    &g,
                    &mut ma,
                    &mut va,
                    Some(&mut ba),
                    dm,
                    Some(&na),
                )
                .unwrap();
                adamw_emu(
                    &Emu::default(),
                    &cfg(t),
                    &mut pb,
                    &g,
                    &mut mb,
                    &mut vb,
                    Some(&mut bb),
                    dm,
                    Some(&nb),
                )
                .unwrap();
                for (name, x, y) in [("p", &pb, &pa), ("m", &mb, &ma), ("v", &vb, &va)] {
                    let e = rel_err(&f32_to_f64(x), &f32_to_f64(y));
                    assert!(e <= 1e-4, "P={p} t={t} seed {seed}: {name} err {e}");
                }
                let e = rel_err(&bf16_to_f64(&bb), &bf16_to_f64(&ba));
                assert!(e <= 1e-2, "P={p} t={t} seed {seed}: bf16 copy err {e}");
            }
            // The update moved the weights: the comparison is not of two untouched copies. (A
            // single parameter's three updates can cancel to nearly nothing; many cannot.)
            let moved = rel_err(&f32_to_f64(&pb), &f32_to_f64(&p0));
            assert!(
                p == 1 || moved > 1e-4,
                "P={p} seed {seed}: moved by {moved}"
            );
        }
    }

    #[test]
    fn decay_mask_and_errors() {
        assert_eq!(
            decay_mask_from_segments(&[(2, true), (1, false), (3, true)]),
            vec![1, 1, 0, 1, 1, 1]
        );
        let mut p = vec![1.0f32; 4];
        let e = adamw_emu(
            &Emu::default(),
            &cfg(0),
            &mut p,
            &[0.0; 4],
            &mut [0.0; 4],
            &mut [0.0; 4],
            None,
            None,
            None,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("step must be"), "{e}");
        let e = adamw_cpu(
            &cfg(1),
            &mut p,
            &[0.0; 3],
            &mut [0.0; 4],
            &mut [0.0; 4],
            None,
            None,
            None,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("`g` holds 3"), "{e}");
    }
}
