//! GPU timing of the GEMM ([`crate::gemm`]) and attention ([`crate::attention`]) kernels at
//! the student model's shapes, the same cases as `tools/torch_gemm_attn_bench.py`, so one GPU
//! run puts both side by side. Each run first checks every kernel against its CPU reference on
//! fresh random inputs and reports the errors with the times.
//!
//! Times are the median of `iters` launches measured with CUDA events after `warmup` launches,
//! on random (never zero) inputs. Nothing here runs without a GPU: the entry point is
//! `cargo bench -p mmkd-benches --bench gemm_attn` (or its executable in the GPU bundle).

use crate::attention::{self, AttnShape, HEAD_DIM};
use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::gemm::{self, Activation, GemmCheck, GemmLayout, GemmOutCuda, GemmPath, GemmShape};
use crate::testing::{bf16_bits, f32_to_f64, fresh_seed, random_bf16, rel_err, rng};
use anyhow::{anyhow, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use serde::Serialize;
use std::sync::Arc;

/// Model sizes (DESIGN.md §2): width 768, 12 heads, MLP ratio 4, joint space 512.
const WIDTH: usize = 768;
const HEADS: usize = 12;
const IMAGE_TOKENS: usize = 197;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    /// Samples per batch (M = batch · tokens).
    pub batch: usize,
    /// Padded caption length of the text tower.
    pub context: usize,
    /// Untimed launches before timing.
    pub warmup: usize,
    /// Timed samples (each of several back-to-back launches); the median is reported.
    pub iters: usize,
    /// The GEMM paths to check and time (those this device lacks are skipped).
    pub paths: &'static [GemmPath],
    /// Whether to check and time the attention kernels too.
    pub attention: bool,
}

impl Default for BenchConfig {
    /// Every case on `mma.sync` and (sm_90) `wgmma`, and attention. The TMA feed runs apart
    /// ([`BenchConfig::tma`]), so a fault there cannot take the others' results with it.
    fn default() -> Self {
        BenchConfig {
            batch: 256,
            context: 256,
            warmup: 3,
            iters: 20,
            paths: &[GemmPath::MmaSync, GemmPath::Wgmma],
            attention: true,
        }
    }
}

impl BenchConfig {
    /// The GEMM on `wgmma` fed by the tensor copy engine (sm_90), alone.
    pub fn tma() -> Self {
        BenchConfig {
            paths: &[GemmPath::WgmmaTma],
            attention: false,
            ..BenchConfig::default()
        }
    }
    /// The persistent, warp-specialised GEMM (sm_90), alone.
    pub fn ws() -> Self {
        BenchConfig {
            paths: &[GemmPath::WgmmaWs],
            attention: false,
            ..BenchConfig::default()
        }
    }
}

/// One timed case.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRecord {
    /// "gemm" or "attention".
    pub kind: &'static str,
    /// "image" or "text".
    pub tower: &'static str,
    /// Layer (GEMM) or "masked"/"plain" (attention).
    pub layer: String,
    /// fwd, dgrad, wgrad and, on sm_90, the same as fwd_wgmma, dgrad_wgmma, wgrad_wgmma (the
    /// products the blocks run there) and fwd_tma, dgrad_tma, wgrad_tma (their operands copied
    /// by TMA), fwd_ws, dgrad_ws, wgrad_ws (the persistent warp-specialised kernels) for a
    /// GEMM, and `wgrad_<path>-split<S>` for a weight gradient split S ways
    /// along K as the training step runs it; fwd, fwd+bwd for attention.
    pub layout: String,
    /// The product's M, N, K (GEMM) or B·H, L, 64 (attention).
    pub dims: [usize; 3],
    /// Floating-point operations of the case (minimal count).
    pub flops: f64,
    /// Median time, ms.
    pub median_ms: f64,
    /// flops / median time, TFLOP/s.
    pub tflops: f64,
}

/// One correctness check against the CPU reference.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRecord {
    /// What was compared.
    pub name: String,
    /// Norm-wise relative error (infinite when a NaN came out).
    pub rel_err: f64,
    /// Whether it is within the tolerance (1e-2 bf16, 1e-4 fp32).
    pub passed: bool,
    /// The seed of the inputs.
    pub seed: u64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Device name and architecture.
    pub device: String,
    /// Correctness checks, run first.
    pub checks: Vec<CheckRecord>,
    /// Timed cases.
    pub cases: Vec<BenchRecord>,
}

impl BenchReport {
    /// True when every correctness check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// A short table: checks, then one line per timed case.
    pub fn render(&self) -> String {
        let mut s = format!("device: {}\n", self.device);
        for c in &self.checks {
            let verdict = if c.passed { "ok" } else { "FAILED" };
            s += &format!("check {verdict:6} rel_err {:.2e}  {}\n", c.rel_err, c.name);
        }
        for c in &self.cases {
            s += &format!(
                "{:9} {:5} {:8} {:7} {:?}: {:9.4} ms  {:7.1} TFLOP/s\n",
                c.kind, c.tower, c.layer, c.layout, c.dims, c.median_ms, c.tflops
            );
        }
        s
    }
}

/// (tower, layer, M, N, K) of `Y (M, N) = X (M, K) · W (N, K)ᵀ`, as in the PyTorch script.
pub fn gemm_cases(
    batch: usize,
    context: usize,
) -> Vec<(&'static str, &'static str, usize, usize, usize)> {
    let mut out = Vec::new();
    for (tower, m) in [("image", batch * IMAGE_TOKENS), ("text", batch * context)] {
        for (layer, n, k) in [
            ("qkv", 3 * WIDTH, WIDTH),
            ("attn_out", WIDTH, WIDTH),
            ("mlp_up", 4 * WIDTH, WIDTH),
            ("mlp_down", WIDTH, 4 * WIDTH),
        ] {
            out.push((tower, layer, m, n, k));
        }
    }
    out.push(("image", "proj", batch, 512, WIDTH));
    out
}

/// `n` random bf16 values on the device: a 64 Ki random block repeated, cheap at any size.
fn device_random(st: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<u16>> {
    let block: Vec<u16> = random_bf16(&mut rng(seed), 1 << 16, -1.0, 1.0)
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let host: Vec<u16> = block.iter().copied().cycle().take(n).collect();
    st.clone_htod(&host)
        .map_err(|e| anyhow!("copying {n} values to the GPU: {e:?}"))
}

fn device_buf<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    st: &Arc<CudaStream>,
    n: usize,
) -> Result<CudaSlice<T>> {
    st.alloc_zeros::<T>(n)
        .map_err(|e| anyhow!("allocating {n} elements on the GPU: {e:?}"))
}

/// Median milliseconds per call of `f`: [`crate::selftest::time_gpu`] with `cfg.warmup` and
/// `cfg.iters` samples.
fn time_ms(gpu: &Gpu, cfg: &BenchConfig, f: impl FnMut() -> Result<()>) -> Result<f64> {
    crate::selftest::time_gpu(gpu, cfg.warmup, cfg.iters, f)
}

fn from_bits(v: Vec<u16>) -> Vec<bf16> {
    v.into_iter().map(bf16::from_bits).collect()
}

/// GEMM, every layout, at a small odd size against [`gemm::gemm_cpu`].
/// The (layout, path) pairs of `cfg` this device runs: `mma.sync` everywhere, the `wgmma`
/// paths on sm_90 only.
fn paths(gpu: &Gpu, cfg: &BenchConfig) -> Vec<(GemmLayout, GemmPath)> {
    let layouts = [
        GemmLayout::Forward,
        GemmLayout::InputGrad,
        GemmLayout::WeightGrad,
    ];
    cfg.paths
        .iter()
        .filter(|&&p| p == GemmPath::MmaSync || gpu.capability == (9, 0))
        .flat_map(|&p| layouts.map(|l| (l, p)))
        .collect()
}

/// On sm_90: one warpgroup's `wgmma` with K-major and with MN-major operands against a plain
/// product ([`crate::wgmma_test`]), so a failing GEMM check can be told from a misread layout.
fn check_wgmma_fragments(gpu: &Gpu, out: &mut Vec<CheckRecord>) -> Result<()> {
    use crate::testing::random_f32;
    use crate::wgmma_test::{wgmma_gpu, wgmma_reference, FragKernel};
    if gpu.capability != (9, 0) {
        return Ok(());
    }
    for kernel in [FragKernel::KMajor, FragKernel::MnMajor] {
        let seed = fresh_seed();
        let mut g = rng(seed);
        let a = random_bf16(&mut g, 64 * 16, -2.0, 2.0);
        let b = random_bf16(&mut g, 128 * 16, -2.0, 2.0);
        let c = random_f32(&mut g, 64 * 128, -1.0, 1.0);
        let mut d = vec![f32::NAN; 64 * 128];
        wgmma_gpu(gpu, kernel, &a, &b, &c, &mut d)?;
        let e = rel_err(&f32_to_f64(&d), &wgmma_reference(&a, &b, &c));
        out.push(CheckRecord {
            name: format!("{} (one wgmma, {kernel:?})", kernel.entry()),
            rel_err: e,
            passed: e <= 1e-5,
            seed,
        });
    }
    Ok(())
}

fn check_gemm(gpu: &Gpu, cfg: &BenchConfig, out: &mut Vec<CheckRecord>) -> Result<()> {
    for (layout, path) in paths(gpu, cfg) {
        let c = gemm::check_cuda(gpu, path, layout)?;
        out.push(CheckRecord {
            name: format!("gemm {layout:?} {path:?} {:?}", c.shape),
            rel_err: c.rel_err,
            passed: c.rel_err <= GemmCheck::TOL,
            seed: c.seed,
        });
        if let Some(e) = c.dbias_rel_err {
            out.push(CheckRecord {
                name: format!("gemm dbias {path:?} {:?}", c.shape),
                rel_err: e,
                passed: e <= GemmCheck::DBIAS_TOL,
                seed: c.seed,
            });
        }
    }
    Ok(())
}

/// Attention forward and backward at L = 197 with key padding (one sequence fully padded),
/// with and without the causal mask, and on packed sequences of variable length (the text
/// tower's layout: one with filler rows past its keys), against the CPU references; q, k, v
/// and their gradients at the pitch of the engine's QKV projection, o and do at a pitch that
/// is not a multiple of 64.
fn check_attention(gpu: &Gpu, out: &mut Vec<CheckRecord>) -> Result<()> {
    let st = gpu.stream();
    let heads = 2;
    let padded = |causal| AttnShape {
        qkv_pitch: 3 * heads * HEAD_DIM,
        o_pitch: heads * HEAD_DIM + 8,
        ..AttnShape::packed(3, heads, 197, causal, 0.125)
    };
    // Packed: keys, then first rows, then rows of three sequences in 190 rows.
    let packed = AttnShape {
        varlen: Some(190),
        ..padded(false)
    };
    let cases = [
        (padded(false), vec![197, 120, 0]),
        (padded(true), vec![197, 120, 0]),
        (packed, vec![120, 1, 60, 0, 120, 121, 120, 1, 69]),
    ];
    for (sh, sl) in cases {
        let seed = fresh_seed();
        let mut g = rng(seed);
        let (e, eo) = (sh.span(sh.qkv_pitch), sh.span(sh.o_pitch));
        let r = sh.total_rows() * sh.heads;
        let [q, k, v] = [0; 3].map(|_| random_bf16(&mut g, e, -2.0, 2.0));
        let d_o = random_bf16(&mut g, eo, -2.0, 2.0);
        let (mut o, mut lse) = (vec![bf16::ZERO; eo], vec![0.0f32; r]);
        attention::attention_forward_cpu(&sh, &q, &k, &v, Some(&sl), &mut o, &mut lse)?;
        let [mut dq, mut dk, mut dv] = [0; 3].map(|_| vec![bf16::ZERO; e]);
        let mut delta = vec![0.0f32; r];
        attention::attention_backward_cpu(
            &sh,
            &q,
            &k,
            &v,
            &o,
            &lse,
            &d_o,
            Some(&sl),
            &mut dq,
            &mut dk,
            &mut dv,
            &mut delta,
        )?;
        let up = |x: &[bf16]| st.clone_htod(bf16_bits(x)).map_err(|e| anyhow!("{e:?}"));
        let (gq, gk, gv, gdo, go_ref) = (up(&q)?, up(&k)?, up(&v)?, up(&d_o)?, up(&o)?);
        let glse_ref = st.clone_htod(&lse).map_err(|e| anyhow!("{e:?}"))?;
        let gsl = st.clone_htod(&sl).map_err(|e| anyhow!("{e:?}"))?;
        let poison = vec![0x7fffu16; e];
        let mut go = st
            .clone_htod(&vec![0x7fffu16; eo])
            .map_err(|e| anyhow!("{e:?}"))?;
        let mut glse = device_buf::<f32>(st, r)?;
        attention::attention_forward_cuda(gpu, &sh, &gq, &gk, &gv, Some(&gsl), &mut go, &mut glse)?;
        let mut gdq = st.clone_htod(&poison).map_err(|e| anyhow!("{e:?}"))?;
        let mut gdk = st.clone_htod(&poison).map_err(|e| anyhow!("{e:?}"))?;
        let mut gdv = st.clone_htod(&poison).map_err(|e| anyhow!("{e:?}"))?;
        let mut gdelta = device_buf::<f32>(st, r)?;
        attention::attention_backward_cuda(
            gpu,
            &sh,
            &gq,
            &gk,
            &gv,
            &go_ref,
            &glse_ref,
            &gdo,
            Some(&gsl),
            &mut gdq,
            &mut gdk,
            &mut gdv,
            &mut gdelta,
        )?;
        // The sequences' head columns only: the columns between them keep their poison.
        let cols = |t: &[bf16], pitch| sh.seq_columns(t, pitch, Some(&sl));
        let down = |d: &CudaSlice<u16>, pitch| -> Result<Vec<f64>> {
            cols(
                &from_bits(st.dtoh_synced(d).map_err(|e| anyhow!("{e:?}"))?),
                pitch,
            )
        };
        let (p, po) = (sh.qkv_pitch, sh.o_pitch);
        for (name, got, want) in [
            ("o", down(&go, po)?, cols(&o, po)?),
            ("dq", down(&gdq, p)?, cols(&dq, p)?),
            ("dk", down(&gdk, p)?, cols(&dk, p)?),
            ("dv", down(&gdv, p)?, cols(&dv, p)?),
        ] {
            let e = rel_err(&got, &want);
            out.push(CheckRecord {
                name: format!("attention {name} {sh:?} seqlens {sl:?}"),
                rel_err: e,
                passed: e <= 1e-2,
                seed,
            });
        }
    }
    Ok(())
}

/// Runs the checks, then times every case. Fails only on CUDA errors; failed checks are in
/// the report (the caller decides what to do with them).
pub fn run(gpu: &Gpu, cfg: &BenchConfig) -> Result<BenchReport> {
    let mut checks = Vec::new();
    if cfg.paths.contains(&GemmPath::Wgmma) {
        check_wgmma_fragments(gpu, &mut checks)?;
    }
    check_gemm(gpu, cfg, &mut checks)?;
    if cfg.attention {
        check_attention(gpu, &mut checks)?;
    }
    let run_paths: Vec<GemmPath> = cfg
        .paths
        .iter()
        .copied()
        .filter(|&p| p == GemmPath::MmaSync || gpu.capability == (9, 0))
        .collect();
    let st = gpu.stream();
    let mut cases = Vec::new();
    for (i, (tower, layer, m, n, k)) in gemm_cases(cfg.batch, cfg.context).into_iter().enumerate() {
        let seed = i as u64 + 1;
        let x = device_random(st, m * k, seed)?; // (M, K): X, and B of the weight gradient
        let w = device_random(st, n * k, seed + 100)?; // (N, K)
        let dy = device_random(st, m * n, seed + 200)?; // (M, N)
        let bias = device_random(st, n, seed + 300)?;
        let mut y = device_buf::<u16>(st, m * n)?;
        let mut dx = device_buf::<u16>(st, m * k)?;
        let mut dw = device_buf::<f32>(st, n * k)?;
        let mut db = device_buf::<f32>(st, n)?;
        let flops = 2.0 * (m * n * k) as f64;
        let shape = |layout, m, n, k, act| GemmShape {
            layout,
            batch: 1,
            m,
            n,
            k,
            act,
        };
        let act = if tower == "image" {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let mut timed = Vec::new();
        // Each layout on each path of this device: Y = X·Wᵀ, dX = dY·W, dW = dYᵀ·X (+ db).
        let fwd = shape(GemmLayout::Forward, m, n, k, act);
        let dgrad = shape(GemmLayout::InputGrad, m, k, n, Activation::None);
        let wgrad = shape(GemmLayout::WeightGrad, n, k, m, Activation::None);
        for &path in &run_paths {
            let names = match path {
                GemmPath::MmaSync => ["fwd", "dgrad", "wgrad"],
                GemmPath::Wgmma => ["fwd_wgmma", "dgrad_wgmma", "wgrad_wgmma"],
                GemmPath::WgmmaTma => ["fwd_tma", "dgrad_tma", "wgrad_tma"],
                GemmPath::WgmmaWs => ["fwd_ws", "dgrad_ws", "wgrad_ws"],
            };
            let t = time_ms(gpu, cfg, || {
                gemm::gemm_cuda_on(
                    gpu,
                    path,
                    &fwd,
                    &x,
                    &w,
                    Some(&bias),
                    gemm::Aux::None,
                    GemmOutCuda::Bf16(&mut y),
                    None,
                )
            })?;
            timed.push((names[0].to_string(), t));
            let t = time_ms(gpu, cfg, || {
                gemm::gemm_cuda_on(
                    gpu,
                    path,
                    &dgrad,
                    &dy,
                    &w,
                    None,
                    gemm::Aux::None,
                    GemmOutCuda::Bf16(&mut dx),
                    None,
                )
            })?;
            timed.push((names[1].to_string(), t));
            let t = time_ms(gpu, cfg, || {
                gemm::gemm_cuda_on(
                    gpu,
                    path,
                    &wgrad,
                    &dy,
                    &x,
                    None,
                    gemm::Aux::None,
                    GemmOutCuda::F32(&mut dw),
                    Some(&mut db),
                )
            })?;
            timed.push((names[2].to_string(), t));
            // The weight gradient as the training step runs it: split along the tokens where
            // that fills the GPU (`gemm::choose_split_k`), the reduction included in the time.
            let split = gemm::choose_split_k(&wgrad, path, gemm::TUNED_SMS);
            if split > 1 {
                let plan = wgrad.plan(gemm::GemmOpts {
                    out_f32: true,
                    dbias: true,
                    path,
                    split_k: split,
                    ..gemm::GemmOpts::default()
                })?;
                let mut ws = device_buf::<f32>(st, wgrad.split_workspace_len(split))?;
                let t = time_ms(gpu, cfg, || {
                    let (pa, _ga) = dy.device_ptr(st);
                    let (pb, _gb) = x.device_ptr(st);
                    let (pc, _gc) = dw.device_ptr_mut(st);
                    let (pdb, _gdb) = db.device_ptr_mut(st);
                    let (pws, _gws) = ws.device_ptr_mut(st);
                    // SAFETY: the buffers have the lengths of the plan's shape (slots 2, 3 unused).
                    unsafe {
                        crate::exec::run(
                            crate::exec::Backend::Gpu(gpu),
                            &plan,
                            &[pa, pb, 0, 0, pc, pdb, pws],
                        )
                    }
                })?;
                timed.push((format!("wgrad_{}-split{split}", path.name()), t));
            }
        }
        for (layout, t) in timed {
            cases.push(BenchRecord {
                kind: "gemm",
                tower,
                layer: layer.to_string(),
                layout,
                dims: [m, n, k],
                flops,
                median_ms: t,
                tflops: flops / (t * 1e-3) / 1e12,
            });
        }
    }
    let attention_towers: &[(&'static str, usize)] = if cfg.attention {
        &[("image", IMAGE_TOKENS), ("text", cfg.context)]
    } else {
        &[]
    };
    for &(tower, len) in attention_towers {
        // q, k, v and their gradients at the pitch of the engine's packed projection.
        let sh = AttnShape {
            qkv_pitch: 3 * HEADS * HEAD_DIM,
            ..AttnShape::packed(cfg.batch, HEADS, len, false, 0.125)
        };
        let (bh, e, eo) = (
            cfg.batch * HEADS,
            sh.span(sh.qkv_pitch),
            sh.span(sh.o_pitch),
        );
        let q = device_random(st, e, 1)?;
        let k = device_random(st, e, 2)?;
        let v = device_random(st, e, 3)?;
        let d_o = device_random(st, eo, 4)?;
        let mut o = device_buf::<u16>(st, eo)?;
        let mut lse = device_buf::<f32>(st, bh * len)?;
        let mut dq = device_buf::<u16>(st, e)?;
        let mut dk = device_buf::<u16>(st, e)?;
        let mut dv = device_buf::<u16>(st, e)?;
        let mut delta = device_buf::<f32>(st, bh * len)?;
        let mut g = rng(7);
        let lens: Vec<i32> = (0..cfg.batch)
            .map(|_| rand::Rng::gen_range(&mut g, len / 2..=len) as i32)
            .collect();
        let gl = st.clone_htod(&lens).map_err(|e| anyhow!("{e:?}"))?;
        let fl = 4.0 * (bh * len * len * HEAD_DIM) as f64;
        for (name, sl) in [("plain", None), ("masked", Some(&gl))] {
            let t_f = time_ms(gpu, cfg, || {
                attention::attention_forward_cuda(gpu, &sh, &q, &k, &v, sl, &mut o, &mut lse)
            })?;
            let t_fb = time_ms(gpu, cfg, || {
                attention::attention_forward_cuda(gpu, &sh, &q, &k, &v, sl, &mut o, &mut lse)?;
                attention::attention_backward_cuda(
                    gpu, &sh, &q, &k, &v, &o, &lse, &d_o, sl, &mut dq, &mut dk, &mut dv, &mut delta,
                )
            })?;
            // Minimal counts: forward two products, backward five.
            for (layout, t, f) in [("fwd", t_f, fl), ("fwd+bwd", t_fb, 3.5 * fl)] {
                cases.push(BenchRecord {
                    kind: "attention",
                    tower,
                    layer: name.to_string(),
                    layout: layout.to_string(),
                    dims: [bh, len, HEAD_DIM],
                    flops: f,
                    median_ms: t,
                    tflops: f / (t * 1e-3) / 1e12,
                });
            }
        }
    }
    Ok(BenchReport {
        device: format!("{} ({})", gpu.name, gpu.arch),
        checks,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The case list is the one the PyTorch script times (tools/torch_gemm_attn_bench.py).
    #[test]
    fn cases_match_the_pytorch_script() {
        let script = include_str!("../../tools/torch_gemm_attn_bench.py");
        let c = gemm_cases(256, 256);
        assert_eq!(c.len(), 9);
        assert_eq!(c[0], ("image", "qkv", 256 * 197, 2304, 768));
        assert_eq!(c[7], ("text", "mlp_down", 256 * 256, 768, 3072));
        for (_, layer, ..) in &c {
            assert!(
                script.contains(&format!("\"{layer}\"")),
                "{layer} not in the script"
            );
        }
    }
}
