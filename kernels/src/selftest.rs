//! `mmkd selftest`: every memory-bound kernel against its CPU reference on fresh random inputs
//! with poisoned outputs, on the emulation or a GPU; on a GPU each is then timed with CUDA
//! events (warm-up, median of many launches) and reported as achieved GB/s (and TFLOP/s for
//! the loss) beside the H200's ceilings and a device-to-device copy measured in the same run.
//! On a GPU it ends with the check of each GEMM path the device has
//! ([`crate::gemm::check_path_cuda`]), the one the training step runs before using a path.

use crate::adamw::{self, AdamWConfig};
use crate::device::Gpu;
use crate::elementwise;
use crate::emu::Emu;
use crate::exec::{self, Backend, DevBuf, HostBuf, Step};
use crate::gemm::{self, GemmCheck, GemmPath};
use crate::image_norm::{self, ImageNormConfig};
use crate::mt_loss::{self, IclScale, LossConfig, LossInputs, TeacherMode};
use crate::testing::{fresh_seed, rel_err, rng};
use anyhow::{anyhow, Context, Result};
use half::bf16;
use rand::Rng;
use serde::Serialize;

/// H200 HBM3e copy bandwidth, bytes read + written per second (datasheet-level lead).
pub const H200_COPY_GBPS: f64 = 4300.0;
/// H200 dense bf16 tensor-core rate.
pub const H200_BF16_TFLOPS: f64 = 790.0;

/// Where the self-test runs.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// The CPU emulation (correctness only, small sizes).
    Emu,
    /// A GPU (correctness, then timing).
    Gpu(&'a Gpu),
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    /// Kernel and size.
    pub name: String,
    /// Worst relative error over the checked outputs (null for timing-only sizes).
    pub rel_err: Option<f64>,
    /// The tolerance it was held to.
    pub tolerance: Option<f64>,
    /// Passed (always true for timing-only sizes whose outputs were all finite).
    pub passed: bool,
    /// Failure message, if any.
    pub error: Option<String>,
    /// Median time per call, ms (GPU only).
    pub median_ms: Option<f64>,
    /// Bytes the call must move (each input read once, each output written once).
    pub bytes: f64,
    /// Floating-point operations of the call (0 for pure data movement).
    pub flops: f64,
    /// bytes / median time.
    pub gbps: Option<f64>,
    /// flops / median time.
    pub tflops: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `emu` or the GPU's name and architecture.
    pub device: String,
    /// Device-to-device copy bandwidth measured in this run (bytes read + written), GB/s.
    pub measured_copy_gbps: Option<f64>,
    /// The datasheet ceilings quoted beside the figures.
    pub ceiling_copy_gbps: f64,
    /// See [`H200_BF16_TFLOPS`].
    pub ceiling_bf16_tflops: f64,
    /// One entry per kernel and size.
    pub cases: Vec<CaseReport>,
}

impl Report {
    /// True when every case passed.
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed)
    }
    /// A fixed-width table.
    pub fn render(&self) -> String {
        let mut s = format!("self-test on {}\n", self.device);
        s += &format!(
            "{:<58} {:>10} {:>7} {:>10} {:>9} {:>9}\n",
            "kernel", "rel err", "ok", "median ms", "GB/s", "TFLOP/s"
        );
        for c in &self.cases {
            s += &c.render();
        }
        s += &format!(
            "ceilings: copy {:.0} GB/s (datasheet){}, bf16 dense {:.0} TFLOP/s (datasheet)\n",
            self.ceiling_copy_gbps,
            self.measured_copy_gbps.map_or(String::new(), |m| format!(
                ", {m:.0} GB/s measured here (device copy)"
            )),
            self.ceiling_bf16_tflops
        );
        s
    }
}

impl CaseReport {
    /// The case's row of [`Report::render`] (and its error on a second line).
    pub fn render(&self) -> String {
        let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
        let mut s = format!(
            "{:<58} {:>10} {:>7} {:>10} {:>9} {:>9}\n",
            self.name,
            self.rel_err.map_or("-".into(), |e| format!("{e:.2e}")),
            if self.passed { "ok" } else { "FAIL" },
            f(self.median_ms, 4),
            f(self.gbps, 1),
            f(self.tflops, 2)
        );
        if let Some(e) = &self.error {
            s += &format!("    {e}\n");
        }
        s
    }
}

/// One kernel call to check and/or time.
struct Case {
    name: String,
    bufs: Vec<HostBuf>,
    steps: Vec<Step>,
    /// (slot, reference, tolerance); empty: timing only (outputs must be finite).
    expect: Vec<(usize, HostBuf, f64)>,
    /// Slots whose values must be finite after the run (timing-only sizes).
    finite: Vec<usize>,
    bytes: f64,
    flops: f64,
}

fn loss_cfg(n: usize, t: usize, d: usize, mode: TeacherMode) -> LossConfig {
    LossConfig {
        n,
        t,
        d,
        mode,
        teacher_l2: true,
        logit_scale: (1.0f32 / 0.07).ln(),
        icl: IclScale::Const(2.659_26),
        fd_weight: 50.0,
    }
}

/// Bytes and flops of the fused loss at `cfg` with `elem` bytes per input element: inputs read
/// once, gradients written once (the scratch traffic is extra, and counted by the timing).
fn loss_cost(cfg: &LossConfig, elem: usize) -> (f64, f64) {
    let (n, t, d) = (cfg.n as f64, cfg.t as f64, cfg.d as f64);
    let k = if cfg.mode == TeacherMode::All { t } else { 1.0 };
    let bytes = elem as f64 * (2.0 * n * d + 2.0 * n * t * d) + n * t + 2.0 * 4.0 * n * d;
    // Dot products of D: task 2 stats + 2 grad passes, icl 2K stats + 2K grad passes,
    // each pass N² dots, plus the gradient's axpy of D per pair.
    let dots = (4.0 + 4.0 * k) * n * n;
    (bytes, dots * 2.0 * d + (2.0 + 2.0 * k) * n * n * 2.0 * d)
}

fn loss_case<F: mt_loss::LossElem + Copy>(
    cfg: LossConfig,
    seed: u64,
    check: bool,
    wrap: fn(Vec<F>) -> HostBuf,
    conv: fn(f32) -> F,
) -> Result<Case> {
    let mut g = rng(seed);
    let (n, t, d) = (cfg.n, cfg.t, cfg.d);
    let mut mask: Vec<u8> = (0..n * t).map(|_| u8::from(g.gen_bool(0.6))).collect();
    let mut pick = vec![0i32; n];
    // CLIP mode (t = 0) draws no teachers.
    for i in (0..n).filter(|_| t > 0) {
        let k = g.gen_range(0..t);
        mask[i * t + k] = 1;
        pick[i] = k as i32;
    }
    let mut rv = |len: usize| {
        (0..len)
            .map(|_| conv(g.gen_range(-1.0f32..1.0)))
            .collect::<Vec<F>>()
    };
    let (image, text, ti, tt) = (rv(n * d), rv(n * d), rv(n * t * d), rv(n * t * d));
    let random = cfg.mode == TeacherMode::Random;
    let scratch = mt_loss::scratch_len::<F>(&cfg);
    let mut expect = Vec::new();
    if check {
        let (mut di, mut dt, mut out) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; 8]);
        let inp = LossInputs {
            image: &image,
            text: &text,
            teacher_image: &ti,
            teacher_text: &tt,
            mask: &mask,
            pick: random.then_some(pick.as_slice()),
        };
        mt_loss::mt_loss_cpu(
            &cfg,
            &inp,
            &mut di,
            &mut dt,
            &mut out,
            &mut vec![0.0; scratch],
        )?;
        let tol = if std::mem::size_of::<F>() == 4 {
            1e-4
        } else {
            1e-2
        };
        expect = vec![
            (6, HostBuf::F32(di), tol),
            (7, HostBuf::F32(dt), tol),
            (8, HostBuf::F32(out), tol),
        ];
    }
    let (bytes, flops) = loss_cost(&cfg, std::mem::size_of::<F>());
    let suffix = F::SUFFIX;
    let mut outs = [
        HostBuf::F32(vec![0.0; n * d]),
        HostBuf::F32(vec![0.0; n * d]),
        HostBuf::F32(vec![0.0; 8]),
        HostBuf::F32(vec![0.0; scratch]),
    ];
    outs.iter_mut().for_each(HostBuf::poison);
    // CLIP mode reads no teacher buffers; one element keeps every upload non-empty.
    let (ti, tt, mask) = if t == 0 {
        (vec![conv(0.0)], vec![conv(0.0)], vec![0u8])
    } else {
        (ti, tt, mask)
    };
    let mut bufs = vec![
        wrap(image),
        wrap(text),
        wrap(ti),
        wrap(tt),
        HostBuf::U8(mask),
        HostBuf::I32(if random { pick } else { vec![0] }),
    ];
    bufs.extend(outs);
    Ok(Case {
        name: if cfg.is_clip() {
            format!("mt_loss {suffix} clip N={n} D={d}")
        } else {
            format!("mt_loss {suffix} {:?} N={n} T={t} D={d}", cfg.mode)
        },
        bufs,
        steps: mt_loss::plan(&cfg, suffix)?,
        expect,
        finite: vec![6, 7, 8],
        bytes,
        flops,
    })
}

fn adamw_cases(p: usize, seed: u64, check: bool) -> Result<Vec<Case>> {
    let mut g = rng(seed);
    let rv = |g: &mut rand_chacha::ChaCha8Rng, lo: f32, hi: f32| {
        (0..p).map(|_| g.gen_range(lo..hi)).collect::<Vec<f32>>()
    };
    let (p0, gr) = (rv(&mut g, -1.0, 1.0), rv(&mut g, -2.0, 2.0));
    let (m0, v0) = (rv(&mut g, -0.1, 0.1), rv(&mut g, 0.0, 0.01));
    let decay: Vec<u8> = (0..p).map(|_| u8::from(g.gen_bool(0.8))).collect();
    let cfg = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.2,
        step: 7,
    };
    let ns = adamw::norm_scratch_len(p);
    let mut norm = vec![f32::NAN; 2];
    let (mut ex_n, mut ex_s) = (Vec::new(), Vec::new());
    // The reference norm also feeds the step's reference, so the step is checked on its own.
    adamw::grad_norm_cpu(&gr, 1.0, &mut norm, &mut vec![0.0; ns])?;
    if check {
        ex_n.push((1, HostBuf::F32(norm.clone()), 1e-4));
        let (mut pa, mut ma, mut va, mut ba) =
            (p0.clone(), m0.clone(), v0.clone(), vec![bf16::ZERO; p]);
        adamw::adamw_cpu(
            &cfg,
            &mut pa,
            &gr,
            &mut ma,
            &mut va,
            Some(&mut ba),
            Some(&decay),
            Some(&norm),
        )?;
        ex_s = vec![
            (0, HostBuf::F32(pa), 1e-4),
            (2, HostBuf::F32(ma), 1e-4),
            (3, HostBuf::F32(va), 1e-4),
            (4, HostBuf::Bf16(ba), 1e-2),
        ];
    }
    let mut nbufs = vec![
        HostBuf::F32(gr.clone()),
        HostBuf::F32(vec![0.0; 2]),
        HostBuf::F32(vec![0.0; ns]),
    ];
    nbufs[1].poison();
    nbufs[2].poison();
    let mut bf = HostBuf::Bf16(vec![bf16::ZERO; p]);
    bf.poison();
    let sbufs = vec![
        HostBuf::F32(p0),
        HostBuf::F32(gr),
        HostBuf::F32(m0),
        HostBuf::F32(v0),
        bf,
        HostBuf::U8(decay),
        HostBuf::F32(norm),
    ];
    let pf = p as f64;
    Ok(vec![
        Case {
            name: format!("grad_norm P={p}"),
            bufs: nbufs,
            steps: adamw::norm_plan(p, 1.0)?,
            expect: ex_n,
            finite: vec![1],
            bytes: 4.0 * pf,
            flops: 2.0 * pf,
        },
        Case {
            name: format!("adamw_step P={p}"),
            bufs: sbufs,
            steps: adamw::adamw_plan(&cfg, p, [true, true, true])?,
            expect: ex_s,
            finite: vec![0, 4],
            // read p g m v decay, write p m v bf16
            bytes: pf * (4.0 * 4.0 + 1.0 + 3.0 * 4.0 + 2.0),
            flops: 0.0,
        },
    ])
}

fn image_case(b: usize, seed: u64, check: bool) -> Result<Case> {
    let cfg = ImageNormConfig {
        b,
        h: 224,
        w: 224,
        mean: image_norm::CLIP_MEAN,
        std: image_norm::CLIP_STD,
    };
    let len = b * 3 * 224 * 224;
    let mut g = rng(seed);
    let src: Vec<u8> = (0..len).map(|_| g.gen()).collect();
    let flip: Vec<u8> = (0..b).map(|_| u8::from(g.gen_bool(0.5))).collect();
    let mut expect = Vec::new();
    if check {
        let mut want = vec![bf16::ZERO; len];
        image_norm::image_normalize_cpu(&cfg, &src, Some(&flip), &mut want)?;
        expect.push((2, HostBuf::Bf16(want), 1e-2));
    }
    let mut out = HostBuf::Bf16(vec![bf16::ZERO; len]);
    out.poison();
    Ok(Case {
        name: format!("image_normalize B={b} 3x224x224 flip"),
        bufs: vec![HostBuf::U8(src), HostBuf::U8(flip), out],
        steps: image_norm::plan(&cfg, true),
        expect,
        finite: vec![2],
        bytes: 3.0 * len as f64,
        flops: 0.0,
    })
}

/// LayerNorm on (N, C): the forward with the residual add, the forward without one, and the
/// backward with a residual-path gradient; the forward's statistics and the backward's inputs
/// come from the CPU reference. Bytes: each (N, C) bf16 tensor read or written once.
fn ln_cases(n: usize, c: usize, seed: u64, check: bool) -> Result<Vec<Case>> {
    use crate::layernorm::{
        backward_scratch_len, layernorm_backward_cpu, layernorm_forward_cpu, LnShape,
    };
    use crate::testing::random_bf16;
    let sh = LnShape { n, c, eps: 1e-5 };
    let nc = n * c;
    let mut g = rng(seed);
    let x = random_bf16(&mut g, nc, 0.5, 3.0);
    let r = random_bf16(&mut g, nc, -1.0, 1.0);
    let gamma = random_bf16(&mut g, c, 0.5, 1.5);
    let beta = random_bf16(&mut g, c, -0.5, 0.5);
    let dy = random_bf16(&mut g, nc, -1.0, 1.0);
    let dres = random_bf16(&mut g, nc, -0.5, 0.5);
    // The reference forward (with the residual) gives the backward's s, mean and rstd.
    let (mut s, mut y) = (vec![bf16::ZERO; nc], vec![bf16::ZERO; nc]);
    let (mut mean, mut rstd) = (vec![0.0f32; n], vec![0.0f32; n]);
    layernorm_forward_cpu(
        sh,
        &x,
        Some(&r),
        &gamma,
        &beta,
        Some(&mut s),
        &mut y,
        &mut mean,
        &mut rstd,
    )?;
    let bf = |v: &[bf16]| HostBuf::Bf16(v.to_vec());
    let poisoned = |b: HostBuf| {
        let mut b = b;
        b.poison();
        b
    };
    let mut out = Vec::new();

    // Forward with the residual: slots [x, r, gamma, beta, s, y, mean, rstd].
    let mut expect = Vec::new();
    if check {
        expect = vec![
            (4, bf(&s), 1e-2),
            (5, bf(&y), 1e-2),
            (6, HostBuf::F32(mean.clone()), 1e-4),
            (7, HostBuf::F32(rstd.clone()), 1e-4),
        ];
    }
    out.push(Case {
        name: format!("layernorm_fwd +residual N={n} C={c}"),
        bufs: vec![
            bf(&x),
            bf(&r),
            bf(&gamma),
            bf(&beta),
            poisoned(bf(&s)),
            poisoned(bf(&y)),
            poisoned(HostBuf::F32(mean.clone())),
            poisoned(HostBuf::F32(rstd.clone())),
        ],
        steps: sh.forward_plan()?,
        expect,
        finite: vec![4, 5, 6, 7],
        bytes: (4 * nc * 2) as f64,
        flops: 0.0,
    });

    // Forward without a residual (slots r and s unused).
    let mut expect = Vec::new();
    if check {
        let mut y0 = vec![bf16::ZERO; nc];
        let (mut m0, mut r0) = (vec![0.0f32; n], vec![0.0f32; n]);
        layernorm_forward_cpu(sh, &x, None, &gamma, &beta, None, &mut y0, &mut m0, &mut r0)?;
        expect = vec![(5, bf(&y0), 1e-2), (6, HostBuf::F32(m0), 1e-4)];
    }
    let one = || HostBuf::Bf16(vec![bf16::ZERO; 1]);
    out.push(Case {
        name: format!("layernorm_fwd N={n} C={c}"),
        bufs: vec![
            bf(&x),
            one(),
            bf(&gamma),
            bf(&beta),
            one(),
            poisoned(bf(&y)),
            poisoned(HostBuf::F32(mean.clone())),
            poisoned(HostBuf::F32(rstd.clone())),
        ],
        steps: sh.norm_plan()?,
        expect,
        finite: vec![5, 6, 7],
        bytes: (2 * nc * 2) as f64,
        flops: 0.0,
    });

    // Backward with dres: slots [dy, s, gamma, mean, rstd, dres, ds, dgamma, dbeta, scratch].
    let part = backward_scratch_len(sh);
    let mut expect = Vec::new();
    if check {
        let mut ds = vec![bf16::ZERO; nc];
        let (mut dg, mut db, mut p) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; part]);
        layernorm_backward_cpu(
            sh,
            &dy,
            &s,
            &gamma,
            &mean,
            &rstd,
            Some(&dres),
            &mut ds,
            &mut dg,
            &mut db,
            &mut p,
        )?;
        expect = vec![
            (6, bf(&ds), 1e-2),
            (7, HostBuf::F32(dg), 1e-4),
            (8, HostBuf::F32(db), 1e-4),
        ];
    }
    out.push(Case {
        name: format!("layernorm_bwd +dres N={n} C={c}"),
        bufs: vec![
            bf(&dy),
            bf(&s),
            bf(&gamma),
            HostBuf::F32(mean),
            HostBuf::F32(rstd),
            bf(&dres),
            poisoned(bf(&dy)),
            poisoned(HostBuf::F32(vec![0.0; c])),
            poisoned(HostBuf::F32(vec![0.0; c])),
            poisoned(HostBuf::F32(vec![0.0; part])),
        ],
        steps: sh.backward_plan(true)?,
        expect,
        finite: vec![6, 7, 8],
        bytes: (4 * nc * 2) as f64,
        flops: 0.0,
    });
    Ok(out)
}

fn ew_cases(n: usize, rows: usize, cols: usize, seed: u64, check: bool) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for (k, op) in elementwise::sample_ops(n, rows, cols)
        .into_iter()
        .enumerate()
    {
        let bufs = elementwise::random_buffers(&op, &mut rng(seed ^ k as u64));
        let mut expect = Vec::new();
        if check {
            let mut want = bufs.clone();
            elementwise::ew_cpu(&op, &mut want)?;
            for &o in op.outputs() {
                let tol = elementwise::tolerance(&op, &want[o]);
                expect.push((o, want[o].clone(), tol));
            }
        }
        out.push(Case {
            name: op.name(),
            bufs,
            steps: op.plan()?,
            expect,
            finite: op.outputs().to_vec(),
            bytes: op.bytes() as f64,
            flops: 0.0,
        });
    }
    Ok(out)
}

/// The cases: small ones under the emulation; on a GPU, checked sizes and then the sizes that
/// matter (ViT-B/16 activations 197 × 256 × 768, loss N = 1024, T = 8, D = 512) timed.
fn cases(gpu: bool) -> Result<Vec<Case>> {
    let seed = fresh_seed();
    let mut v = Vec::new();
    let (ln, lt, ld) = if gpu { (128, 8, 512) } else { (24, 3, 48) };
    for mode in [TeacherMode::Random, TeacherMode::Mean, TeacherMode::All] {
        v.push(loss_case::<f32>(
            loss_cfg(ln, lt, ld, mode),
            seed,
            true,
            HostBuf::F32,
            |x| x,
        )?);
    }
    v.push(loss_case::<bf16>(
        loss_cfg(ln + 1, lt, ld, TeacherMode::All),
        seed,
        true,
        HostBuf::Bf16,
        bf16::from_f32,
    )?);
    // Stage 1: the CLIP loss alone (no teachers).
    v.push(loss_case::<bf16>(
        loss_cfg(ln + 3, 0, ld, TeacherMode::All),
        seed,
        true,
        HostBuf::Bf16,
        bf16::from_f32,
    )?);
    v.extend(adamw_cases(if gpu { 1 << 20 } else { 5000 }, seed, true)?);
    v.push(image_case(if gpu { 8 } else { 1 }, seed, true)?);
    // LayerNorm: a width the one-warp-per-row forward takes and one it does not.
    let ln_rows = if gpu { 300 } else { 5 };
    v.extend(ln_cases(ln_rows, 768, seed, true)?);
    v.extend(ln_cases(ln_rows, 100, seed, true)?);
    if gpu {
        v.extend(ew_cases(1 << 20, 1000, 768, seed, true)?);
        v.push(loss_case::<bf16>(
            loss_cfg(1024, 8, 512, TeacherMode::All),
            seed,
            false,
            HostBuf::Bf16,
            bf16::from_f32,
        )?);
        v.push(loss_case::<f32>(
            loss_cfg(1024, 8, 512, TeacherMode::All),
            seed,
            false,
            HostBuf::F32,
            |x| x,
        )?);
        v.push(loss_case::<bf16>(
            loss_cfg(1024, 1, 512, TeacherMode::Random),
            seed,
            false,
            HostBuf::Bf16,
            bf16::from_f32,
        )?);
        v.extend(adamw_cases(150_000_000, seed, false)?);
        v.push(image_case(256, seed, false)?);
        v.extend(ln_cases(197 * 256, 768, seed, false)?);
        v.extend(ew_cases(197 * 256 * 768, 256 * 64, 768, seed, false)?);
    } else {
        v.extend(ew_cases(999, 7, 65, seed, true)?);
    }
    Ok(v)
}

fn compare(c: &Case, got: &[HostBuf]) -> (Option<f64>, Option<f64>, Option<String>) {
    if c.expect.is_empty() {
        let bad = c
            .finite
            .iter()
            .find(|&&s| got[s].to_f64().iter().any(|v| !v.is_finite()));
        return (
            None,
            None,
            bad.map(|s| format!("output slot {s} has non-finite values")),
        );
    }
    let (mut worst, mut tol, mut err) = (0.0f64, 0.0f64, None);
    for (slot, want, t) in &c.expect {
        let e = rel_err(&got[*slot].to_f64(), &want.to_f64());
        if e > *t && err.is_none() {
            err = Some(format!("output slot {slot}: rel err {e:.3e} > {t:e}"));
        }
        if e >= worst {
            worst = e;
            tol = *t;
        }
    }
    (Some(worst), Some(tol), err)
}

fn run_emu(c: &mut Case) -> Result<Vec<HostBuf>> {
    let ptrs: Vec<u64> = c.bufs.iter_mut().map(HostBuf::host_ptr).collect();
    let emu = Emu::default();
    // SAFETY: every buffer was sized for its plan by the case builder.
    unsafe { exec::run(Backend::Emu(&emu), &c.steps, &ptrs)? };
    Ok(c.bufs.clone())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds a sample of back-to-back calls aims at (see [`time_gpu`]).
const SAMPLE_MS: f64 = 1.0;
/// Most calls in one sample.
const MAX_REPS: usize = 64;

/// Median GPU milliseconds per call of `f`, timed with CUDA events: `warmup` calls, then
/// `samples` samples of `reps` calls queued back to back between one pair of events, `reps`
/// chosen from one timed call so that a sample lasts about `SAMPLE_MS`. A pair of events
/// around a single call would time the host's launch latency too (the GPU is idle when the
/// first event is reached); queued calls hide it behind the previous call's work, except
/// when the host cannot launch as fast as the GPU runs, which then is the real rate.
/// `tools/torch_*_bench.py` time PyTorch the same way.
pub fn time_gpu(
    gpu: &Gpu,
    warmup: usize,
    samples: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let st = gpu.stream();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let event = || {
        st.record_event(flags)
            .map_err(|e| anyhow!("cuEventRecord: {e:?}"))
    };
    let mut sample = |reps: usize| -> Result<f64> {
        let a = event()?;
        for _ in 0..reps {
            f()?;
        }
        let b = event()?;
        let ms = a
            .elapsed_ms(&b)
            .map_err(|e| anyhow!("cuEventElapsedTime (a kernel failed?): {e:?}"))?;
        Ok(f64::from(ms) / reps as f64)
    };
    for _ in 0..warmup {
        sample(1)?;
    }
    let one = sample(1)?;
    let reps = ((SAMPLE_MS / one.max(1e-6)).ceil() as usize).clamp(1, MAX_REPS);
    let mut ms = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        ms.push(sample(reps)?);
    }
    Ok(median(ms))
}

fn run_gpu(gpu: &Gpu, c: &Case, iters: usize) -> Result<(Vec<HostBuf>, Option<f64>)> {
    let st = gpu.stream();
    let dev: Vec<DevBuf> = c
        .bufs
        .iter()
        .map(|b| DevBuf::upload(st, b))
        .collect::<Result<_>>()?;
    let ptrs: Vec<u64> = dev.iter().map(|d| d.device_ptr(st)).collect();
    // SAFETY: every device buffer is a copy of a host buffer sized for the plan.
    unsafe { exec::run(Backend::Gpu(gpu), &c.steps, &ptrs)? };
    gpu.finish_within(
        &format!("selftest case `{}`", c.name),
        crate::device::CHECK_HANG_LIMIT,
    )?;
    let got: Vec<HostBuf> = dev.iter().map(|d| d.download(st)).collect::<Result<_>>()?;
    let t = if iters > 0 {
        // SAFETY: as above; reruns overwrite (or, for in-place updates, advance) the outputs.
        Some(time_gpu(gpu, 3, iters, || unsafe {
            exec::run(Backend::Gpu(gpu), &c.steps, &ptrs)
        })?)
    } else {
        None
    };
    Ok((got, t))
}

fn measure_copy(gpu: &Gpu) -> Result<f64> {
    let st = gpu.stream();
    let n = 256usize << 20; // 1 GiB of f32
    let src = st
        .alloc_zeros::<f32>(n)
        .map_err(|e| anyhow!("alloc: {e:?}"))?;
    let mut dst = st
        .alloc_zeros::<f32>(n)
        .map_err(|e| anyhow!("alloc: {e:?}"))?;
    let ms = time_gpu(gpu, 2, 10, || {
        st.memcpy_dtod(&src, &mut dst)
            .map_err(|e| anyhow!("copy: {e:?}"))
    })?;
    Ok(2.0 * 4.0 * n as f64 / (ms * 1e-3) / 1e9)
}

/// Runs the self-test. `iters` timed launches per case on a GPU (0: no timing).
pub fn run(target: Target<'_>, iters: usize) -> Result<Report> {
    run_reporting(target, iters, &mut |_| Ok(()))
}

/// [`run`], calling `progress` with the report so far after each case: a caller can save
/// partial results, so that a case that hangs or faults the device (a first run on new
/// hardware) cannot cost the ones before it.
pub fn run_reporting(
    target: Target<'_>,
    iters: usize,
    progress: &mut dyn FnMut(&Report) -> Result<()>,
) -> Result<Report> {
    let gpu = matches!(target, Target::Gpu(_));
    let mut report = Report {
        device: match target {
            Target::Emu => "emu (CPU emulation of the CUDA sources)".into(),
            Target::Gpu(g) => format!("cuda:{} {} ({})", g.ordinal, g.name, g.arch),
        },
        measured_copy_gbps: None,
        ceiling_copy_gbps: H200_COPY_GBPS,
        ceiling_bf16_tflops: H200_BF16_TFLOPS,
        cases: Vec::new(),
    };
    if let Target::Gpu(g) = target {
        if iters > 0 {
            report.measured_copy_gbps =
                Some(measure_copy(g).context("measuring the copy ceiling")?);
        }
    }
    for mut c in cases(gpu)? {
        let res = match target {
            Target::Emu => run_emu(&mut c).map(|g| (g, None)),
            Target::Gpu(g) => run_gpu(g, &c, iters),
        };
        let mut r = CaseReport {
            name: c.name.clone(),
            rel_err: None,
            tolerance: None,
            passed: false,
            error: None,
            median_ms: None,
            bytes: c.bytes,
            flops: c.flops,
            gbps: None,
            tflops: None,
        };
        match res {
            Err(e) => r.error = Some(format!("{e:#}")),
            Ok((got, t)) => {
                let (e, tol, msg) = compare(&c, &got);
                r.rel_err = e;
                r.tolerance = tol;
                r.passed = msg.is_none();
                r.error = msg;
                if let Some(ms) = t {
                    r.median_ms = Some(ms);
                    r.gbps = Some(c.bytes / (ms * 1e-3) / 1e9);
                    r.tflops = (c.flops > 0.0).then(|| c.flops / (ms * 1e-3) / 1e12);
                }
            }
        }
        // A hung kernel keeps the GPU: every later case would wait out its limit too.
        let hung = r.error.as_deref().is_some_and(Gpu::is_hang);
        report.cases.push(r);
        progress(&report)?;
        if hung {
            return Ok(report);
        }
    }
    // On a GPU, each GEMM path it has (mma.sync; on sm_90 wgmma, then wgmma fed by TMA, last
    // because a fault there may leave the device unusable): the check the training step runs
    // before using a path, so the first GPU run says early whether the Hopper layouts hold.
    if let Target::Gpu(g) = target {
        let mut paths = vec![GemmPath::MmaSync];
        if g.capability == (9, 0) {
            paths.extend([GemmPath::Wgmma, GemmPath::WgmmaTma, GemmPath::WgmmaWs]);
        }
        for path in paths {
            let (rel_err, error) = match gemm::check_path_cuda(g, path) {
                Ok(cs) => {
                    let worst = cs.iter().map(|c| c.rel_err).fold(0.0, f64::max);
                    let failed: Vec<String> = cs
                        .iter()
                        .filter(|c| !c.passed())
                        .map(|c| format!("{c:?}"))
                        .collect();
                    (Some(worst), (!failed.is_empty()).then(|| failed.join("; ")))
                }
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            report.cases.push(CaseReport {
                name: format!(
                    "gemm path {}: 3 layouts, M 200 N 192 K 264, and the weight gradient split 2 ways along K 528",
                    path.name()
                ),
                rel_err,
                tolerance: Some(GemmCheck::TOL),
                passed: error.is_none(),
                error,
                median_ms: None,
                bytes: 0.0,
                flops: 0.0,
                gbps: None,
                tflops: None,
            });
            progress(&report)?;
            if report
                .cases
                .last()
                .and_then(|c| c.error.as_deref())
                .is_some_and(Gpu::is_hang)
            {
                break;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `--device emu` path end to end: every case passes, and a corrupted result fails.
    #[test]
    fn emulated_selftest_passes_and_can_fail() {
        // The progress callback sees the report grow by one case at a time.
        let mut seen = Vec::new();
        let r = run_reporting(Target::Emu, 0, &mut |r: &Report| {
            seen.push(r.cases.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (1..=r.cases.len()).collect::<Vec<_>>());
        assert!(r.passed(), "{}", r.render());
        assert!(r.cases.len() >= 18, "{}", r.cases.len());
        let mut c = image_case(1, 3, true).unwrap();
        let mut got = run_emu(&mut c).unwrap();
        if let HostBuf::Bf16(v) = &mut got[2] {
            v[100] = bf16::from_f32(1e3);
        }
        assert!(compare(&c, &got).2.is_some());
    }
}
