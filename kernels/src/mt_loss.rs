//! The combined multi-teacher distillation loss (`cuda/mt_loss.cu`, DESIGN.md §2): CPU
//! reference (f64), emulation launcher and GPU launcher with the same parameters, and tests.
//!
//! Inputs: student image/text features `[N, D]` (fp32 or bf16, unnormalised), teacher targets
//! `[N, T, D]` per modality, the availability mask `[N, T]` (u8) and, in `random` mode, the drawn
//! teacher per sample `pick [N]`. Outputs: `dimage`, `dtext` `[N, D]` (fp32, w.r.t. the
//! unnormalised features) and `out[8]` = task, fd, icl, total, d total/d s (raw logit scale),
//! d total/d ℓ (learned icl scale, else 0), samples without a usable teacher, 0. The kernels
//! need an fp32 scratch of [`scratch_len`] elements; no N×N matrix is ever stored.
//!
//! **CLIP mode** (`t == 0`, stage 1): the loss is the symmetric CLIP loss alone (task; fd = icl
//! = 0, total = task, d total/d ℓ = 0), the gradients are those of the CLIP loss, and no teacher
//! work runs: the plan has no targets step and no student–teacher passes. Only the student
//! features are read; the teacher, mask and `pick` inputs are ignored (empty slices, or null
//! buffer slots in [`plan`]) whatever the teacher mode, and the scratch shrinks accordingly.

use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{self, Backend, DevArgs, Step, P};
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::MT_LOSS;
use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;

/// Which teachers a sample is distilled from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherMode {
    /// One teacher per sample, `pick[i]` (drawn by the loader among the available ones).
    Random,
    /// The average of the available teachers (renormalised under `l2`).
    Mean,
    /// Every available teacher, each sample's terms divided by its teacher count.
    All,
}

/// How the icl scale `c` is obtained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IclScale {
    /// `c` multiplied in directly (the released reference: ln(1/0.07)).
    Const(f32),
    /// A learned `ℓ` with `c = e^ℓ`; `out[5]` is d total/d ℓ.
    Learned(f32),
}

/// Shape and switches of one loss evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// Batch size N.
    pub n: usize,
    /// Teacher slots T in the `[N, T, D]` targets; 0 selects CLIP mode (no teachers).
    pub t: usize,
    /// Feature width D.
    pub d: usize,
    /// Teacher mode.
    pub mode: TeacherMode,
    /// Normalise every teacher row first (`teacher_norm = l2`); false uses them as stored.
    pub teacher_l2: bool,
    /// The raw logit-scale parameter `s` (the task logits use `e^s`).
    pub logit_scale: f32,
    /// The icl scale.
    pub icl: IclScale,
    /// λ, the weight of fd.
    pub fd_weight: f32,
}

/// Largest D: the gradient kernel keeps (1 + 8) rows of D floats in shared memory (≤ 48 KiB).
pub const MAX_D: usize = 1024;
const THREADS: u32 = 256;
/// Largest D of the tensor-core path: its gradient pass keeps 16 rows of D floats in shared
/// memory (≤ 48 KiB).
const TC_MAX_D: usize = 768;
const WARPS: usize = 8;

impl LossConfig {
    /// True in CLIP mode (`t == 0`): the task term alone, no teacher input is read.
    pub fn is_clip(&self) -> bool {
        self.t == 0
    }
    /// Teacher slots K of the student–teacher passes (0 in CLIP mode).
    fn slots(&self) -> usize {
        if self.is_clip() {
            0
        } else if self.mode == TeacherMode::All {
            self.t
        } else {
            1
        }
    }
    fn validate(&self) -> Result<()> {
        ensure!(
            self.n > 0 && self.d > 0,
            "mt_loss: empty shape N={} T={} D={} (N and D must be positive; T = 0 is CLIP mode)",
            self.n,
            self.t,
            self.d
        );
        ensure!(self.d <= MAX_D, "mt_loss: D = {} exceeds {MAX_D}", self.d);
        ensure!(
            self.n <= 65_535,
            "mt_loss: N = {} exceeds the grid limit 65535",
            self.n
        );
        Arg::int("mt_loss N*T*D", self.n * self.t * self.d)?;
        Arg::int("mt_loss 2*K*N*D", 2 * self.slots() * self.n * self.d)?;
        Ok(())
    }
    fn icl_c(&self) -> f32 {
        match self.icl {
            IclScale::Const(c) => c,
            IclScale::Learned(l) => l.exp(),
        }
    }
}

/// Offsets (in f32) of the scratch sections.
struct Layout {
    xhat: usize,
    norms: usize,
    tgt: usize,
    w: usize,
    keep: usize,
    bad: usize,
    st_task: usize,
    st_icl: usize,
    dxhat: usize,
    ds_task: usize,
    dc: usize,
    fd: usize,
    len: usize,
}

/// Whether the tensor-core passes run: bf16 inputs, D a multiple of 16 and ≤ [`TC_MAX_D`].
fn uses_tc(c: &LossConfig, suffix: &str) -> bool {
    suffix == "bf16" && c.d.is_multiple_of(16) && c.d <= TC_MAX_D
}

/// Partials S of the gradient pass: the tensor-core pass splits its (slot, column tile) pairs
/// over S blocks per row tile so that ~512 warps run; the fp32 pass has one block per row.
fn splits(c: &LossConfig, tc: bool) -> usize {
    if tc {
        (512 / c.n.div_ceil(16)).clamp(1, 16)
    } else {
        1
    }
}

/// The sections, in order. CLIP mode (K = 0) has no targets, weights, keep flags, icl
/// statistics, teacher counts or d/dc partials.
fn layout(c: &LossConfig, sp: usize) -> Layout {
    let (n, d, k) = (c.n, c.d, c.slots());
    let teachers = usize::from(k > 0);
    let sizes = [
        2 * n * d,
        2 * n,
        2 * k * n * d,
        k * n,
        k * n,
        teachers * n,
        2 * n * 3,
        2 * k * n * 3,
        2 * sp * n * d,
        sp * n,
        teachers * sp * n,
        2 * n,
    ];
    let mut off = [0usize; 12];
    let mut acc = 0;
    for (o, s) in off.iter_mut().zip(sizes) {
        *o = acc;
        acc += s;
    }
    Layout {
        xhat: off[0],
        norms: off[1],
        tgt: off[2],
        w: off[3],
        keep: off[4],
        bad: off[5],
        st_task: off[6],
        st_icl: off[7],
        dxhat: off[8],
        ds_task: off[9],
        dc: off[10],
        fd: off[11],
        len: acc,
    }
}

/// Elements of the fp32 scratch the kernels need for `cfg` with inputs of type `F`. With S the
/// gradient partials (1 on the fp32 path, up to 16 on the tensor-core one) and K the teacher
/// slots: 2ND(1 + S + K) + N(11 + 8K + 2S) with teachers, 2ND(1 + S) + N(10 + S) in CLIP mode
/// (K = 0).
pub fn scratch_len<F: LossElem>(cfg: &LossConfig) -> usize {
    scratch_len_for(cfg, F::SUFFIX)
}

/// [`scratch_len`] by kernel suffix (`f32` or `bf16`).
pub fn scratch_len_for(cfg: &LossConfig, suffix: &str) -> usize {
    let tc = uses_tc(cfg, suffix);
    layout(cfg, splits(cfg, tc)).len
}

/// The loss components and scalar gradients, as read from `out[8]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossResult {
    /// ½ (CE rows + CE columns) of the student–student logits.
    pub task: f32,
    /// Feature MSE (0 in CLIP mode).
    pub fd: f32,
    /// The student–teacher cross-entropies (0 in CLIP mode).
    pub icl: f32,
    /// task + λ fd + icl (task in CLIP mode).
    pub total: f32,
    /// d total / d s.
    pub dlogit_scale: f32,
    /// d total / d ℓ for a learned icl scale, else (and in CLIP mode) 0.
    pub dicl_scale: f32,
}

impl LossResult {
    /// Reads `out[8]`; an error when a sample had no usable teacher.
    pub fn from_out(out: &[f32]) -> Result<LossResult> {
        ensure!(
            out.len() >= 8,
            "mt_loss: out holds {} values, 8 expected",
            out.len()
        );
        if out[6] != 0.0 {
            bail!(
                "mt_loss: {} sample(s) have no usable teacher (none available in the mask, or \
                 `pick` out of range or unavailable)",
                out[6]
            );
        }
        Ok(LossResult {
            task: out[0],
            fd: out[1],
            icl: out[2],
            total: out[3],
            dlogit_scale: out[4],
            dicl_scale: out[5],
        })
    }
}

/// Input element types: fp32 or bf16 (host side).
pub trait LossElem: Copy {
    /// Kernel name suffix.
    const SUFFIX: &'static str;
    /// The value in f64.
    fn f64(self) -> f64;
}
impl LossElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn f64(self) -> f64 {
        f64::from(self)
    }
}
impl LossElem for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn f64(self) -> f64 {
        f64::from(self.to_f32())
    }
}

/// Input element types on the device: `f32`, or `u16` holding bf16 bits.
pub trait DevLossElem: DeviceRepr {
    /// Kernel name suffix.
    const SUFFIX: &'static str;
}
impl DevLossElem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl DevLossElem for u16 {
    const SUFFIX: &'static str = "bf16";
}

/// The loss inputs. In CLIP mode (`t == 0`) only `image` and `text` are read: the teacher
/// slices and the mask may be empty, and `pick` is ignored.
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a, F> {
    /// Student image features `[N, D]`.
    pub image: &'a [F],
    /// Student text features `[N, D]`.
    pub text: &'a [F],
    /// Teacher image targets `[N, T, D]`.
    pub teacher_image: &'a [F],
    /// Teacher text targets `[N, T, D]`.
    pub teacher_text: &'a [F],
    /// Availability `[N, T]`, non-zero = available.
    pub mask: &'a [u8],
    /// The drawn teacher per sample `[N]` (random mode only).
    pub pick: Option<&'a [i32]>,
}

fn check_lens(cfg: &LossConfig, lens: [usize; 9], has_pick: bool) -> Result<()> {
    cfg.validate()?;
    let (n, t, d) = (cfg.n, cfg.t, cfg.d);
    // CLIP mode reads no teacher input: `pick` is ignored like the (empty) teacher buffers.
    ensure!(
        cfg.is_clip() || (cfg.mode == TeacherMode::Random) == has_pick,
        "mt_loss: `pick` is needed in random mode and only there (mode {:?})",
        cfg.mode
    );
    let names = [
        "image",
        "text",
        "teacher_image",
        "teacher_text",
        "mask",
        "pick",
        "dimage",
        "dtext",
        "out",
    ];
    let pick = if has_pick && !cfg.is_clip() { n } else { 0 };
    let needs = [
        n * d,
        n * d,
        n * t * d,
        n * t * d,
        n * t,
        pick,
        n * d,
        n * d,
        8,
    ];
    for ((name, have), need) in names.iter().zip(lens).zip(needs) {
        check_len("mt_loss", name, have, need)?;
    }
    Ok(())
}

/// The launches, with buffer slots 0 image, 1 text, 2 teacher_image, 3 teacher_text, 4 mask,
/// 5 pick (or null), 6 dimage, 7 dtext, 8 out, 9 scratch. In CLIP mode (`cfg.t == 0`) no step
/// names slots 2–5 (they may be null): slots 0, 1 are read, 6, 7, 8 written, 9 is the scratch.
pub fn plan(cfg: &LossConfig, suffix: &str) -> Result<Vec<Step>> {
    cfg.validate()?;
    let tc = uses_tc(cfg, suffix);
    let sp = splits(cfg, tc);
    let l = layout(cfg, sp);
    let (n, d, k) = (cfg.n, cfg.d, cfg.slots());
    let (ni, di, ki) = (n as i32, d as i32, k as i32);
    let nd = n * d;
    let s = 9; // scratch slot
    let (norm_k, tgt_k) = match suffix {
        "f32" => ("mtl_normalize_f32", "mtl_targets_f32"),
        "bf16" => ("mtl_normalize_bf16", "mtl_targets_bf16"),
        _ => bail!("mt_loss: unknown input type `{suffix}`"),
    };
    let rows2 = LaunchShape {
        grid: [n as u32, 2, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    };
    let stats_shape = |slots: usize| LaunchShape {
        grid: [n as u32, slots as u32, 1],
        block: [THREADS, 1, 1],
        shared_bytes: (d * 4) as u32,
    };
    let grad_shape = LaunchShape::linear(n as u32, THREADS, ((1 + WARPS) * d * 4) as u32);
    // bf16 inputs take the tensor-core logit passes (operands rounded to bf16, as the inputs
    // already were); fp32 inputs keep fp32 arithmetic throughout.
    let (stats_k, grad_k) = if tc {
        ("mtl_row_stats_tc", "mtl_grad_rows_tc")
    } else {
        ("mtl_row_stats", "mtl_grad_rows")
    };
    let tiles = n.div_ceil(16) as u32;
    let stats_shape = |slots: usize| {
        if tc {
            LaunchShape {
                grid: [tiles, slots as u32, 1],
                block: [32, 1, 1],
                shared_bytes: 0,
            }
        } else {
            stats_shape(slots)
        }
    };
    let grad_shape = if tc {
        LaunchShape {
            grid: [tiles, sp as u32, 1],
            block: [32, 1, 1],
            shared_bytes: (16 * d * 4) as u32,
        }
    } else {
        grad_shape
    };
    let mode = match cfg.mode {
        TeacherMode::Random => 0,
        TeacherMode::Mean => 1,
        TeacherMode::All => 2,
    };
    let e_s = cfg.logit_scale.exp();
    let c = cfg.icl_c();
    let w_task = 0.5 / n as f32;
    let step = |kernel: &'static str, shape: LaunchShape, args: Vec<P>| Step {
        file: &MT_LOSS,
        kernel,
        shape,
        args,
    };
    let (ih, th) = (P::At(s, l.xhat), P::At(s, l.xhat + nd));
    let (ti, tt) = (P::At(s, l.tgt), P::At(s, l.tgt + k * nd));
    let (keep, w) = (P::At(s, l.keep), P::At(s, l.w));
    let st_t = |y: usize| P::At(s, l.st_task + y * n * 3);
    let st_i = |y: usize| P::At(s, l.st_icl + y * k * n * 3);
    let dxh = |y: usize| P::At(s, l.dxhat + y * sp * nd);
    let (fw, sc) = (P::F32, P::F32);
    let clip = cfg.is_clip();
    // CLIP mode: no fd, icl or teacher-count sections; λ = 0 keeps total = task even for a
    // non-finite λ in the config.
    let lambda = if clip { 0.0 } else { cfg.fd_weight };
    let normalize = step(
        norm_k,
        rows2,
        vec![
            P::Buf(0),
            P::Buf(1),
            ih,
            P::At(s, l.norms),
            P::I32(ni),
            P::I32(di),
        ],
    );
    let targets = step(
        tgt_k,
        rows2,
        vec![
            P::Buf(2),
            P::Buf(3),
            P::Buf(4),
            if cfg.mode == TeacherMode::Random {
                P::Buf(5)
            } else {
                P::Null
            },
            ti,
            w,
            keep,
            P::At(s, l.bad),
            P::I32(ni),
            P::I32(cfg.t as i32),
            P::I32(di),
            P::I32(mode),
            P::I32(i32::from(cfg.teacher_l2)),
        ],
    );
    // task: rows of Î T̂ᵀ, then rows of T̂ Îᵀ (its columns)
    let task_stats = [(ih, th, 0), (th, ih, 1)].map(|(a, b, y)| {
        step(
            stats_k,
            stats_shape(1),
            vec![
                a,
                b,
                P::Null,
                P::Null,
                st_t(y),
                fw(w_task),
                sc(e_s),
                P::I32(ni),
                P::I32(di),
            ],
        )
    });
    // icl: Î against teacher text, T̂ against teacher image, weight ½ w
    let icl_stats = [(ih, tt, 0), (th, ti, 1)].map(|(a, b, y)| {
        step(
            stats_k,
            stats_shape(k),
            vec![
                a,
                b,
                keep,
                w,
                st_i(y),
                fw(0.5),
                sc(c),
                P::I32(ni),
                P::I32(di),
            ],
        )
    });
    // Both task gradient passes overwrite their dx̂ partials; only the first one's d/ds is kept
    // (the second one's equals it: Σ_ij g_ij z_ij over the transposed matrix).
    let task_grads =
        [(ih, th, 0, P::At(s, l.ds_task)), (th, ih, 1, P::Null)].map(|(a, b, y, dscale)| {
            step(
                grad_k,
                grad_shape,
                vec![
                    a,
                    b,
                    P::Null,
                    P::Null,
                    st_t(y),
                    st_t(1 - y),
                    dxh(y),
                    dscale,
                    fw(w_task),
                    sc(e_s),
                    P::I32(ni),
                    P::I32(di),
                    P::I32(1),
                    P::I32(0),
                ],
            )
        });
    // icl gradients add to the task's dx̂; d/dc is overwritten by the first, added by the second.
    let icl_grads = [(ih, tt, 0, 1), (th, ti, 1, 3)].map(|(a, b, y, acc)| {
        step(
            grad_k,
            grad_shape,
            vec![
                a,
                b,
                keep,
                w,
                st_i(y),
                P::Null,
                dxh(y),
                P::At(s, l.dc),
                fw(0.5),
                sc(c),
                P::I32(ni),
                P::I32(di),
                P::I32(ki),
                P::I32(acc),
            ],
        )
    });
    let teacher = |p: P| if clip { P::Null } else { p };
    let finish = step(
        "mtl_finish",
        rows2,
        vec![
            ih,
            P::At(s, l.norms),
            teacher(ti),
            teacher(w),
            dxh(0),
            P::At(s, l.fd),
            P::Buf(6),
            P::Buf(7),
            fw(lambda),
            P::I32(ni),
            P::I32(di),
            P::I32(ki),
            P::I32(sp as i32),
        ],
    );
    let reduce = step(
        "mtl_reduce",
        LaunchShape::linear(1, THREADS, 0),
        vec![
            st_t(0),
            teacher(st_i(0)),
            P::At(s, l.fd),
            P::At(s, l.ds_task),
            teacher(P::At(s, l.dc)),
            teacher(P::At(s, l.bad)),
            P::Buf(8),
            fw(lambda),
            sc(e_s),
            sc(c),
            P::I32(i32::from(!clip && matches!(cfg.icl, IclScale::Learned(_)))),
            P::I32(ni),
            P::I32(ki),
            P::I32(sp as i32),
        ],
    );
    let mut steps = vec![normalize];
    if !clip {
        steps.push(targets);
    }
    steps.extend(task_stats);
    if !clip {
        steps.extend(icl_stats);
    }
    steps.extend(task_grads);
    if !clip {
        steps.extend(icl_grads);
    }
    steps.extend([finish, reduce]);
    Ok(steps)
}

// ------------------------------------------------------------------------------------------
// CPU reference (f64)
// ------------------------------------------------------------------------------------------

const EPS: f64 = 1e-12;

/// One prepared teacher slot: image targets, text targets `[N, D]`, row weights, column keep.
type Slot = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<bool>);

fn normalize(x: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = x.to_vec();
    let mut norms = Vec::new();
    for r in out.chunks_exact_mut(d) {
        let nrm = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(EPS);
        r.iter_mut().for_each(|v| *v /= nrm);
        norms.push(nrm);
    }
    (out, norms)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// dL/dz of `Σ_i w_i CE_i(scale · a_i Bᵀ)` over kept columns, as a dense `[N, N]` matrix, and
/// the loss. Rows of weight 0 contribute nothing.
fn ce_grad(
    a: &[f64],
    b: &[f64],
    scale: f64,
    w: &[f64],
    keep: &[bool],
    d: usize,
) -> (f64, Vec<f64>) {
    let n = w.len();
    let mut g = vec![0.0; n * n];
    let mut loss = 0.0;
    for i in (0..n).filter(|&i| w[i] != 0.0) {
        let z: Vec<f64> = (0..n)
            .map(|j| scale * dot(&a[i * d..(i + 1) * d], &b[j * d..(j + 1) * d]))
            .collect();
        let m = (0..n)
            .filter(|&j| keep[j])
            .map(|j| z[j])
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = (0..n).filter(|&j| keep[j]).map(|j| (z[j] - m).exp()).sum();
        loss += w[i] * (m + sum.ln() - z[i]);
        for j in (0..n).filter(|&j| keep[j]) {
            g[i * n + j] = w[i] * ((z[j] - m).exp() / sum - if i == j { 1.0 } else { 0.0 });
        }
    }
    (loss, g)
}

/// CPU reference: the same parameters as [`mt_loss_emu`]; computed in f64 and written as f32.
/// `scratch` is checked for length like the kernels' but not used.
pub fn mt_loss_cpu<F: LossElem>(
    cfg: &LossConfig,
    inp: &LossInputs<'_, F>,
    dimage: &mut [f32],
    dtext: &mut [f32],
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    check_all(
        cfg,
        inp,
        dimage.len(),
        dtext.len(),
        out.len(),
        scratch.len(),
    )?;
    let (n, tt, d) = (cfg.n, cfg.t, cfg.d);
    let wide = |v: &[F]| v.iter().map(|x| x.f64()).collect::<Vec<f64>>();
    let (ih, inorm) = normalize(&wide(inp.image), d);
    let (th, tnorm) = normalize(&wide(inp.text), d);
    let (ui, ut) = (wide(inp.teacher_image), wide(inp.teacher_text));
    let avail = |i: usize, k: usize| inp.mask[i * tt + k] != 0;
    let count = |i: usize| (0..tt).filter(|&k| avail(i, k)).count();
    let teacher_row = |u: &[f64], i: usize, k: usize| -> Vec<f64> {
        let r = u[(i * tt + k) * d..(i * tt + k + 1) * d].to_vec();
        if cfg.teacher_l2 {
            normalize(&r, d).0
        } else {
            r
        }
    };
    // Slots: (image targets, text targets, row weights, column keep), each [N, D] / [N]. CLIP
    // mode has none, which leaves the task term alone.
    let mut slots: Vec<Slot> = Vec::new();
    match cfg.mode {
        _ if cfg.is_clip() => {}
        TeacherMode::Random => {
            let pick = inp.pick.unwrap_or(&[]);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (i, &p) in pick.iter().enumerate().take(n) {
                let ok = p >= 0 && (p as usize) < tt && avail(i, p as usize);
                ensure!(
                    ok,
                    "mt_loss: sample {i}: pick {p} is not an available teacher"
                );
                a.extend(teacher_row(&ui, i, p as usize));
                b.extend(teacher_row(&ut, i, p as usize));
            }
            slots.push((a, b, vec![1.0 / n as f64; n], vec![true; n]));
        }
        TeacherMode::Mean => {
            let (mut a, mut b) = (vec![0.0; n * d], vec![0.0; n * d]);
            for i in 0..n {
                let c = count(i);
                ensure!(c > 0, "mt_loss: sample {i} has no available teacher");
                for k in (0..tt).filter(|&k| avail(i, k)) {
                    for (e, (x, y)) in teacher_row(&ui, i, k)
                        .iter()
                        .zip(teacher_row(&ut, i, k))
                        .enumerate()
                    {
                        a[i * d + e] += x / c as f64;
                        b[i * d + e] += y / c as f64;
                    }
                }
            }
            if cfg.teacher_l2 {
                a = normalize(&a, d).0;
                b = normalize(&b, d).0;
            }
            slots.push((a, b, vec![1.0 / n as f64; n], vec![true; n]));
        }
        TeacherMode::All => {
            if let Some(i) = (0..n).find(|&i| count(i) == 0) {
                bail!("mt_loss: sample {i} has no available teacher");
            }
            for k in 0..tt {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for i in 0..n {
                    a.extend(teacher_row(&ui, i, k));
                    b.extend(teacher_row(&ut, i, k));
                }
                let w = (0..n)
                    .map(|i| {
                        if avail(i, k) {
                            1.0 / (count(i) * n) as f64
                        } else {
                            0.0
                        }
                    })
                    .collect();
                slots.push((a, b, w, (0..n).map(|i| avail(i, k)).collect()));
            }
        }
    }
    let e_s = f64::from(cfg.logit_scale).exp();
    let c = f64::from(cfg.icl_c());
    let lambda = f64::from(cfg.fd_weight);
    let all = vec![true; n];
    let half = vec![0.5 / n as f64; n];
    // task: row CE of S = Î T̂ᵀ and of Sᵀ; dL/dS_ij = g1_ij + g2_ji.
    let (l1, g1) = ce_grad(&ih, &th, e_s, &half, &all, d);
    let (l2, g2) = ce_grad(&th, &ih, e_s, &half, &all, d);
    let task = l1 + l2;
    let mut gi = vec![0.0; n * d];
    let mut gt = vec![0.0; n * d];
    let mut ds = 0.0;
    for i in 0..n {
        for j in 0..n {
            let g = g1[i * n + j] + g2[j * n + i];
            let s = dot(&ih[i * d..(i + 1) * d], &th[j * d..(j + 1) * d]);
            ds += g * s;
            for e in 0..d {
                gi[i * d + e] += e_s * g * th[j * d + e];
                gt[j * d + e] += e_s * g * ih[i * d + e];
            }
        }
    }
    let (mut fd, mut icl, mut dc) = (0.0, 0.0, 0.0);
    for (ti, tx, w, keep) in &slots {
        let hw: Vec<f64> = w.iter().map(|v| 0.5 * v).collect();
        for (x, u, gx) in [(&ih, tx, &mut gi), (&th, ti, &mut gt)] {
            let (l, g) = ce_grad(x, u, c, &hw, keep, d);
            icl += l;
            for i in 0..n {
                for j in 0..n {
                    let gij = g[i * n + j];
                    if gij == 0.0 {
                        continue;
                    }
                    dc += gij * dot(&x[i * d..(i + 1) * d], &u[j * d..(j + 1) * d]);
                    for e in 0..d {
                        gx[i * d + e] += c * gij * u[j * d + e];
                    }
                }
            }
        }
        for i in (0..n).filter(|&i| w[i] != 0.0) {
            let f = w[i] / d as f64;
            for e in i * d..(i + 1) * d {
                let (ri, rt) = (ih[e] - ti[e], th[e] - tx[e]);
                fd += f * (ri * ri + rt * rt);
                gi[e] += lambda * 2.0 * f * ri;
                gt[e] += lambda * 2.0 * f * rt;
            }
        }
    }
    for (xh, nrm, g, dx) in [(&ih, &inorm, &gi, dimage), (&th, &tnorm, &gt, dtext)] {
        for (i, &nv) in nrm.iter().enumerate() {
            let r = i * d..(i + 1) * d;
            let p = dot(&g[r.clone()], &xh[r.clone()]);
            for e in r {
                let v = if nv <= EPS {
                    g[e] / nv
                } else {
                    (g[e] - xh[e] * p) / nv
                };
                dx[e] = v as f32;
            }
        }
    }
    let vals = [
        task,
        fd,
        icl,
        task + lambda * fd + icl,
        e_s * ds,
        if matches!(cfg.icl, IclScale::Learned(_)) {
            c * dc
        } else {
            0.0
        },
        0.0,
        0.0,
    ];
    for (o, v) in out.iter_mut().zip(vals) {
        *o = v as f32;
    }
    Ok(())
}

fn check_all<F: LossElem>(
    cfg: &LossConfig,
    inp: &LossInputs<'_, F>,
    dimage: usize,
    dtext: usize,
    out: usize,
    scratch: usize,
) -> Result<()> {
    check_lens(
        cfg,
        [
            inp.image.len(),
            inp.text.len(),
            inp.teacher_image.len(),
            inp.teacher_text.len(),
            inp.mask.len(),
            inp.pick.map_or(0, |p| p.len()),
            dimage,
            dtext,
            out,
        ],
        inp.pick.is_some(),
    )?;
    check_len("mt_loss", "scratch", scratch, scratch_len::<F>(cfg))
}

// ------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------

/// The kernels under the emulation; same parameters as [`mt_loss_cpu`]. A sample without a
/// usable teacher is an error (after the run, from `out[6]`).
pub fn mt_loss_emu<F: LossElem>(
    emu: &Emu,
    cfg: &LossConfig,
    inp: &LossInputs<'_, F>,
    dimage: &mut [f32],
    dtext: &mut [f32],
    out: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    check_all(
        cfg,
        inp,
        dimage.len(),
        dtext.len(),
        out.len(),
        scratch.len(),
    )?;
    let steps = plan(cfg, F::SUFFIX)?;
    // CLIP mode hands the kernels null teacher slots: nothing may read them.
    let teacher = |p: u64| if cfg.is_clip() { 0 } else { p };
    let ptrs = [
        inp.image.as_ptr() as u64,
        inp.text.as_ptr() as u64,
        teacher(inp.teacher_image.as_ptr() as u64),
        teacher(inp.teacher_text.as_ptr() as u64),
        teacher(inp.mask.as_ptr() as u64),
        teacher(inp.pick.map_or(0, |p| p.as_ptr() as u64)),
        dimage.as_mut_ptr() as u64,
        dtext.as_mut_ptr() as u64,
        out.as_mut_ptr() as u64,
        scratch.as_mut_ptr() as u64,
    ];
    // SAFETY: every buffer was checked against the shape the kernels index.
    unsafe { exec::run(Backend::Emu(emu), &steps, &ptrs)? };
    LossResult::from_out(out).map(|_| ())
}

/// Device-side inputs of [`mt_loss_cuda`] (`E` = `f32`, or `u16` holding bf16). In CLIP mode
/// (`t == 0`) only `image` and `text` are read; the teacher fields may be any slices (they are
/// passed to the kernels as null).
pub struct DevLossInputs<'a, E: DevLossElem> {
    /// Student image features `[N, D]`.
    pub image: &'a CudaSlice<E>,
    /// Student text features `[N, D]`.
    pub text: &'a CudaSlice<E>,
    /// Teacher image targets `[N, T, D]`.
    pub teacher_image: &'a CudaSlice<E>,
    /// Teacher text targets `[N, T, D]`.
    pub teacher_text: &'a CudaSlice<E>,
    /// Availability `[N, T]`.
    pub mask: &'a CudaSlice<u8>,
    /// The drawn teacher per sample (random mode).
    pub pick: Option<&'a CudaSlice<i32>>,
}

/// The kernels on a GPU; same parameters as [`mt_loss_cpu`], device buffers. Read `out` back
/// and pass it to [`LossResult::from_out`] to see the values (and missing-teacher errors).
pub fn mt_loss_cuda<E: DevLossElem>(
    gpu: &Gpu,
    cfg: &LossConfig,
    inp: &DevLossInputs<'_, E>,
    dimage: &mut CudaSlice<f32>,
    dtext: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    check_lens(
        cfg,
        [
            inp.image.len(),
            inp.text.len(),
            inp.teacher_image.len(),
            inp.teacher_text.len(),
            inp.mask.len(),
            inp.pick.map_or(0, |p| p.len()),
            dimage.len(),
            dtext.len(),
            out.len(),
        ],
        inp.pick.is_some(),
    )?;
    check_len(
        "mt_loss",
        "scratch",
        scratch.len(),
        scratch_len_for(cfg, E::SUFFIX),
    )?;
    let steps = plan(cfg, E::SUFFIX)?;
    let mut a = DevArgs::new(gpu.stream());
    a.r(inp.image);
    a.r(inp.text);
    if cfg.is_clip() {
        // No step names the teacher slots in CLIP mode.
        (0..4).for_each(|_| a.null());
    } else {
        a.r(inp.teacher_image);
        a.r(inp.teacher_text);
        a.r(inp.mask);
        match inp.pick {
            Some(p) => a.r(p),
            None => a.null(),
        }
    }
    a.w(dimage);
    a.w(dtext);
    a.w(out);
    a.w(scratch);
    // SAFETY: every buffer was checked against the shape the kernels index.
    unsafe { exec::run(Backend::Gpu(gpu), &steps, &a.ptrs) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{f32_to_f64, fresh_seed, random_f32, rel_err, rng};
    use rand::Rng;

    pub(crate) struct Case<F> {
        pub cfg: LossConfig,
        pub image: Vec<F>,
        pub text: Vec<F>,
        pub ti: Vec<F>,
        pub tt: Vec<F>,
        pub mask: Vec<u8>,
        pub pick: Option<Vec<i32>>,
    }

    impl<F: LossElem> Case<F> {
        fn inputs(&self) -> LossInputs<'_, F> {
            LossInputs {
                image: &self.image,
                text: &self.text,
                teacher_image: &self.ti,
                teacher_text: &self.tt,
                mask: &self.mask,
                pick: self.pick.as_deref(),
            }
        }
    }

    fn case_f32(cfg: LossConfig, seed: u64) -> Case<f32> {
        let mut g = rng(seed);
        let (n, t, d) = (cfg.n, cfg.t, cfg.d);
        let mut mask: Vec<u8> = (0..n * t).map(|_| u8::from(g.gen_bool(0.6))).collect();
        for i in 0..n {
            let k = g.gen_range(0..t);
            mask[i * t + k] = 1; // every sample has one teacher at least
        }
        let pick = (cfg.mode == TeacherMode::Random).then(|| {
            (0..n)
                .map(|i| {
                    let av: Vec<usize> = (0..t).filter(|&k| mask[i * t + k] != 0).collect();
                    av[g.gen_range(0..av.len())] as i32
                })
                .collect()
        });
        Case {
            cfg,
            image: random_f32(&mut g, n * d, -1.0, 1.0),
            text: random_f32(&mut g, n * d, -1.0, 1.0),
            ti: random_f32(&mut g, n * t * d, -1.0, 1.0),
            tt: random_f32(&mut g, n * t * d, -1.0, 1.0),
            mask,
            pick,
        }
    }

    fn to_bf16(c: &Case<f32>) -> Case<bf16> {
        let b = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<bf16>>();
        Case {
            cfg: c.cfg,
            image: b(&c.image),
            text: b(&c.text),
            ti: b(&c.ti),
            tt: b(&c.tt),
            mask: c.mask.clone(),
            pick: c.pick.clone(),
        }
    }

    /// (dimage, dtext, out) of a backend run, outputs poisoned first.
    type Run = (Vec<f32>, Vec<f32>, Vec<f32>);

    fn run<F: LossElem>(c: &Case<F>, emu: Option<&Emu>) -> Result<Run> {
        let (n, d) = (c.cfg.n, c.cfg.d);
        let mut di = vec![f32::NAN; n * d];
        let mut dt = vec![f32::NAN; n * d];
        let mut out = vec![f32::NAN; 8];
        let mut scratch = vec![f32::NAN; scratch_len::<F>(&c.cfg)];
        match emu {
            Some(e) => mt_loss_emu(
                e,
                &c.cfg,
                &c.inputs(),
                &mut di,
                &mut dt,
                &mut out,
                &mut scratch,
            )?,
            None => mt_loss_cpu(
                &c.cfg,
                &c.inputs(),
                &mut di,
                &mut dt,
                &mut out,
                &mut scratch,
            )?,
        }
        Ok((di, dt, out))
    }

    /// Worst relative error: the gradients, and each of the six values separately (a small
    /// component must not hide behind a large one).
    fn err(got: &Run, want: &Run) -> f64 {
        err_ds(got, want, 0.0)
    }

    /// [`err`] with d/ds measured against at least `ds_scale` (the magnitude of its terms).
    fn err_ds(got: &Run, want: &Run, ds_scale: f64) -> f64 {
        let mut e = rel_err(&f32_to_f64(&got.0), &f32_to_f64(&want.0))
            .max(rel_err(&f32_to_f64(&got.1), &f32_to_f64(&want.1)));
        for k in 0..6 {
            let (g, w) = (f64::from(got.2[k]), f64::from(want.2[k]));
            let scale = if k == 4 {
                w.abs().max(ds_scale)
            } else {
                w.abs()
            };
            let r = if g.is_finite() {
                (g - w).abs() / scale.max(1e-3)
            } else {
                f64::INFINITY
            };
            e = e.max(r);
        }
        e
    }

    fn cfg(n: usize, t: usize, d: usize, mode: TeacherMode) -> LossConfig {
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

    #[test]
    fn fp32_path_matches_reference_in_every_mode() {
        let shapes = [(1, 1, 5), (3, 2, 33), (7, 3, 64), (12, 4, 100)];
        for (n, t, d) in shapes {
            for mode in [TeacherMode::Random, TeacherMode::Mean, TeacherMode::All] {
                for (l2, icl) in [
                    (true, IclScale::Const(2.659)),
                    (false, IclScale::Learned(0.7)),
                ] {
                    let mut cf = cfg(n, t, d, mode);
                    cf.teacher_l2 = l2;
                    cf.icl = icl;
                    let seed = fresh_seed();
                    let c = case_f32(cf, seed);
                    let want = run(&c, None).unwrap();
                    let got = run(&c, Some(&Emu::default())).unwrap();
                    let e = err(&got, &want);
                    assert!(
                        e <= 1e-4,
                        "{cf:?} seed {seed}: rel err {e}\n got {:?}\nwant {:?}",
                        got.2,
                        want.2
                    );
                }
            }
        }
    }

    /// bf16 inputs within 1e-2. d/ds is measured against the magnitude of its terms, as in
    /// [`clip_mode_matches_reference_and_direct_formula`]: it is the task term's alone, which
    /// cancels, and the tensor-core path rounds the logits' operands to bf16 (seen: 0.2001
    /// against 0.1972, 1.5%, where the terms sum to far more).
    #[test]
    fn bf16_inputs_match_reference() {
        for (n, t, d) in [(5, 3, 48), (9, 2, 130), (17, 4, 64)] {
            for mode in [TeacherMode::Random, TeacherMode::All] {
                let seed = fresh_seed();
                let c = to_bf16(&case_f32(cfg(n, t, d, mode), seed));
                let want = run(&c, None).unwrap();
                let got = run(&c, Some(&Emu::default())).unwrap();
                let (_, mag) = clip_direct_run(&c);
                let e = err_ds(&got, &want, mag);
                assert!(
                    e <= 1e-2,
                    "N={n} T={t} D={d} {mode:?} seed {seed}: rel err {e}"
                );
            }
        }
        // bf16 inputs are widened exactly: the error stays at fp32 level too.
        let c = to_bf16(&case_f32(cfg(6, 2, 40, TeacherMode::Mean), 7));
        let e = err(
            &run(&c, Some(&Emu::default())).unwrap(),
            &run(&c, None).unwrap(),
        );
        assert!(e <= 1e-4, "{e}");
    }

    /// T = 1, pick 0, λ = 0 and c = 0 leave the CLIP loss: check it against a closed form
    /// computed here from scratch for N = 2 (task = ½ Σ softplus of the logit differences).
    #[test]
    fn clip_special_case_has_the_closed_form() {
        let mut cf = cfg(2, 1, 3, TeacherMode::Random);
        cf.fd_weight = 0.0;
        cf.icl = IclScale::Const(0.0);
        cf.logit_scale = 0.3;
        let c = Case {
            cfg: cf,
            image: vec![1.0f32, 0.0, 0.0, 0.0, 2.0, 0.0],
            text: vec![0.6f32, 0.8, 0.0, 0.0, 0.0, 3.0],
            ti: vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0],
            tt: vec![1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0],
            mask: vec![1, 1],
            pick: Some(vec![0, 0]),
        };
        // Î = e1, e2; T̂ = (0.6, 0.8, 0), e3: S = [[0.6, 0], [0.8, 0]] · e^s.
        let k = 0.3f64.exp();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let s = [[0.6 * k, 0.0], [0.8 * k, 0.0]];
        let rows = sp(s[0][1] - s[0][0]) + sp(s[1][0] - s[1][1]);
        let cols = sp(s[1][0] - s[0][0]) + sp(s[0][1] - s[1][1]);
        let task = 0.5 * (rows / 2.0 + cols / 2.0);
        for emu in [None, Some(&Emu::default())] {
            let (_, _, out) = run(&c, emu).unwrap();
            assert!(
                (f64::from(out[0]) - task).abs() < 1e-6,
                "{emu:?}: {} vs {task}",
                out[0]
            );
            // c = 0: every icl row is uniform over N = 2 columns, so icl = ln 2.
            assert!((f64::from(out[2]) - 2f64.ln()).abs() < 1e-6, "{}", out[2]);
            assert!((f64::from(out[3]) - task - 2f64.ln()).abs() < 1e-6);
        }
    }

    /// The reference's gradients against central differences of its own loss (f64 inputs
    /// through f32 storage, so a coarse step and tolerance).
    #[test]
    fn reference_gradients_are_the_derivative() {
        let seed = fresh_seed();
        for mode in [TeacherMode::All, TeacherMode::Mean] {
            let mut cf = cfg(4, 3, 6, mode);
            cf.icl = IclScale::Learned(0.9);
            cf.fd_weight = 3.0;
            let c = case_f32(cf, seed);
            let (di, _, out) = run(&c, None).unwrap();
            let h = 1e-3f32;
            for idx in [0usize, 7, 13, 23] {
                let mut p = Case {
                    image: c.image.clone(),
                    ..clone_case(&c)
                };
                p.image[idx] += h;
                let mut m = Case {
                    image: c.image.clone(),
                    ..clone_case(&c)
                };
                m.image[idx] -= h;
                let num = (run(&p, None).unwrap().2[3] - run(&m, None).unwrap().2[3]) / (2.0 * h);
                assert!(
                    (num - di[idx]).abs() <= 2e-2 * num.abs().max(1.0),
                    "{mode:?} seed {seed} dimage[{idx}]: {} vs {num}",
                    di[idx]
                );
            }
            let mut cp = clone_case(&c);
            cp.cfg.logit_scale += h;
            let mut cm = clone_case(&c);
            cm.cfg.logit_scale -= h;
            let num = (run(&cp, None).unwrap().2[3] - run(&cm, None).unwrap().2[3]) / (2.0 * h);
            assert!(
                (num - out[4]).abs() <= 2e-2 * num.abs().max(1.0),
                "ds: {} vs {num}",
                out[4]
            );
            let (mut cp, mut cm) = (clone_case(&c), clone_case(&c));
            cp.cfg.icl = IclScale::Learned(0.9 + h);
            cm.cfg.icl = IclScale::Learned(0.9 - h);
            let num = (run(&cp, None).unwrap().2[3] - run(&cm, None).unwrap().2[3]) / (2.0 * h);
            assert!(
                (num - out[5]).abs() <= 2e-2 * num.abs().max(1.0),
                "dl: {} vs {num}",
                out[5]
            );
        }
    }

    fn clone_case(c: &Case<f32>) -> Case<f32> {
        Case {
            cfg: c.cfg,
            image: c.image.clone(),
            text: c.text.clone(),
            ti: c.ti.clone(),
            tt: c.tt.clone(),
            mask: c.mask.clone(),
            pick: c.pick.clone(),
        }
    }

    /// bf16 inputs with D % 16 == 0 take the tensor-core passes; the rest the fp32 ones.
    #[test]
    fn plan_picks_tensor_cores_for_bf16_only() {
        let names = |c: &LossConfig, sfx| -> Vec<&str> {
            plan(c, sfx).unwrap().iter().map(|s| s.kernel).collect()
        };
        let c = cfg(8, 2, 64, TeacherMode::All);
        assert!(names(&c, "bf16").contains(&"mtl_grad_rows_tc"));
        assert!(!names(&c, "f32").iter().any(|k| k.ends_with("_tc")));
        let c = cfg(8, 2, 40, TeacherMode::All);
        assert!(!names(&c, "bf16").iter().any(|k| k.ends_with("_tc")));
    }

    /// The tensor-core passes round the normalised rows to bf16: their error is bf16-sized,
    /// not fp32-sized (so the 1e-2 comparison above is not vacuous) and not larger.
    #[test]
    fn tensor_core_error_is_bf16_sized() {
        let seed = fresh_seed();
        let c = to_bf16(&case_f32(cfg(40, 3, 96, TeacherMode::All), seed));
        let e = err(
            &run(&c, Some(&Emu::default())).unwrap(),
            &run(&c, None).unwrap(),
        );
        eprintln!("tensor-core path, N=40 T=3 D=96: worst rel err {e:.2e} (seed {seed})");
        assert!(e > 1e-6 && e <= 1e-2, "seed {seed}: {e}");
    }

    #[test]
    fn missing_teacher_is_an_error_on_both_paths() {
        let mut c = case_f32(cfg(4, 2, 8, TeacherMode::All), 3);
        c.mask[2 * 2] = 0;
        c.mask[2 * 2 + 1] = 0;
        let e = run(&c, None).unwrap_err();
        assert!(format!("{e}").contains("sample 2"), "{e}");
        let e = run(&c, Some(&Emu::default())).unwrap_err();
        assert!(format!("{e}").contains("1 sample(s)"), "{e}");
        let mut c = case_f32(cfg(4, 2, 8, TeacherMode::Random), 3);
        c.pick.as_mut().unwrap()[1] = 5;
        assert!(run(&c, None).is_err());
        assert!(run(&c, Some(&Emu::default())).is_err());
    }

    #[test]
    fn broken_online_softmax_fails_the_comparison() {
        let seed = fresh_seed();
        let mut c = case_f32(cfg(16, 2, 32, TeacherMode::All), seed);
        // Rows of growing logits make the running max move, which the bug mishandles.
        for (i, v) in c.image.iter_mut().enumerate() {
            *v += (i % 32) as f32 * 0.1;
        }
        let want = run(&c, None).unwrap();
        let got = run(&c, Some(&Emu::variant("broken_online"))).unwrap();
        assert!(
            err(&got, &want) > 1e-4,
            "seed {seed}: the broken variant passed"
        );
    }

    #[test]
    fn broken_fragment_layout_fails_the_comparison() {
        let seed = fresh_seed();
        let c = to_bf16(&case_f32(cfg(20, 2, 32, TeacherMode::All), seed));
        let want = run(&c, None).unwrap();
        let got = run(&c, Some(&Emu::variant("broken_frag"))).unwrap();
        assert!(
            err(&got, &want) > 1e-2,
            "seed {seed}: the broken variant passed"
        );
    }

    /// Several row tiles and split partials (N = 70: 5 tiles, S = 16) on the tensor-core path.
    #[test]
    fn tensor_core_partials_sum_correctly() {
        let seed = fresh_seed();
        let c = to_bf16(&case_f32(cfg(70, 2, 16, TeacherMode::All), seed));
        assert_eq!(splits(&c.cfg, true), 16);
        let e = err(
            &run(&c, Some(&Emu::default())).unwrap(),
            &run(&c, None).unwrap(),
        );
        assert!(e <= 1e-2, "seed {seed}: {e}");
    }

    #[test]
    fn result_does_not_depend_on_thread_order() {
        let c = case_f32(cfg(9, 3, 40, TeacherMode::All), fresh_seed());
        let first = run(&c, Some(&Emu::default())).unwrap();
        let again = run(
            &c,
            Some(&Emu::default().with_schedule(crate::emu::Schedule::Reverse)),
        )
        .unwrap();
        assert_eq!(first, again);
    }

    #[test]
    fn wrong_lengths_and_shapes_are_errors() {
        let mut c = case_f32(cfg(3, 2, 8, TeacherMode::Mean), 1);
        c.text.pop();
        assert!(format!("{}", run(&c, None).unwrap_err()).contains("`text` holds 23"));
        let c = case_f32(cfg(3, 2, 2000, TeacherMode::Mean), 1);
        assert!(run(&c, Some(&Emu::default())).is_err());
    }

    // ---- CLIP mode (t == 0) --------------------------------------------------------------

    /// A CLIP-mode case: random features, no teacher input at all, a random logit scale in
    /// [0, ln 100] (the clamp range, so saturated softmax rows occur too).
    fn clip_case(n: usize, d: usize, seed: u64) -> Case<f32> {
        let mut g = rng(seed);
        let mut cf = cfg(n, 0, d, TeacherMode::Random);
        cf.logit_scale = g.gen_range(0.0f32..4.6);
        Case {
            cfg: cf,
            image: random_f32(&mut g, n * d, -1.0, 1.0),
            text: random_f32(&mut g, n * d, -1.0, 1.0),
            ti: Vec::new(),
            tt: Vec::new(),
            mask: Vec::new(),
            pick: None,
        }
    }

    /// The CLIP loss written out on its own in f64, sharing nothing with the reference:
    /// (task, d/d image, d/d text, d/d s, Σ |terms of d/ds|) w.r.t. the unnormalised features
    /// and the raw scale. With L = e^s Î T̂ᵀ, P / Q the row softmax of L / Lᵀ:
    /// dL = ((P − I) + (Q − I)ᵀ) / 2N and d/ds = Σ dL ⊙ L.
    fn clip_direct(
        image: &[f64],
        text: &[f64],
        s: f64,
        n: usize,
        d: usize,
    ) -> (f64, Vec<f64>, Vec<f64>, f64, f64) {
        let unit = |x: &[f64]| {
            let norms: Vec<f64> = x
                .chunks(d)
                .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12))
                .collect();
            let u: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(e, v)| v / norms[e / d])
                .collect();
            (u, norms)
        };
        let (a, na) = unit(image);
        let (b, nb) = unit(text);
        let scale = s.exp();
        let l: Vec<f64> = (0..n * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                scale * (0..d).map(|e| a[i * d + e] * b[j * d + e]).sum::<f64>()
            })
            .collect();
        let lse = |v: Vec<f64>| {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let row: Vec<f64> = (0..n)
            .map(|i| lse((0..n).map(|j| l[i * n + j]).collect()))
            .collect();
        let col: Vec<f64> = (0..n)
            .map(|j| lse((0..n).map(|i| l[i * n + j]).collect()))
            .collect();
        let h = 0.5 / n as f64;
        let task = (0..n)
            .map(|i| h * (row[i] - l[i * n + i]) + h * (col[i] - l[i * n + i]))
            .sum::<f64>();
        let (mut da, mut db) = (vec![0.0; n * d], vec![0.0; n * d]);
        let (mut ds, mut ds_mag) = (0.0, 0.0);
        for i in 0..n {
            for j in 0..n {
                let z = l[i * n + j];
                let eye = if i == j { 1.0 } else { 0.0 };
                let gz = h * ((z - row[i]).exp() - eye) + h * ((z - col[j]).exp() - eye);
                ds += gz * z;
                ds_mag += (gz * z).abs();
                for e in 0..d {
                    da[i * d + e] += scale * gz * b[j * d + e];
                    db[j * d + e] += scale * gz * a[i * d + e];
                }
            }
        }
        // Back through x̂ = x / ‖x‖: (g − x̂ (g·x̂)) / ‖x‖.
        let back = |u: &[f64], nrm: &[f64], g: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; n * d];
            for (i, nv) in nrm.iter().enumerate() {
                let r = i * d..(i + 1) * d;
                let p: f64 = r.clone().map(|e| g[e] * u[e]).sum();
                for e in r {
                    out[e] = (g[e] - u[e] * p) / nv;
                }
            }
            out
        };
        (task, back(&a, &na, &da), back(&b, &nb, &db), ds, ds_mag)
    }

    /// The direct formula as a [`Run`] (gradients and `out` rounded to f32), and the magnitude
    /// Σ |dL_ij L_ij| of the terms of d/ds.
    fn clip_direct_run<F: LossElem>(c: &Case<F>) -> (Run, f64) {
        let wide = |v: &[F]| v.iter().map(|x| x.f64()).collect::<Vec<f64>>();
        let (n, d) = (c.cfg.n, c.cfg.d);
        let s = f64::from(c.cfg.logit_scale);
        let (task, di, dt, ds, mag) = clip_direct(&wide(&c.image), &wide(&c.text), s, n, d);
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let t = task as f32;
        let out = vec![t, 0.0, 0.0, t, ds as f32, 0.0, 0.0, 0.0];
        ((f(di), f(dt), out), mag)
    }

    /// The direct formula's gradients against central differences of its own loss (all f64).
    #[test]
    fn clip_direct_gradient_is_the_derivative() {
        let seed = fresh_seed();
        let mut g = rng(seed);
        let (n, d) = (5, 7);
        let x: Vec<f64> = (0..2 * n * d).map(|_| g.gen_range(-1.0..1.0)).collect();
        let s = 1.3;
        let (_, di, dt, ds, _) = clip_direct(&x[..n * d], &x[n * d..], s, n, d);
        let loss = |x: &[f64], s: f64| clip_direct(&x[..n * d], &x[n * d..], s, n, d).0;
        let h = 1e-6;
        let analytic: Vec<f64> = di.iter().chain(&dt).cloned().collect();
        for (idx, want) in analytic.iter().enumerate() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[idx] += h;
            m[idx] -= h;
            let num = (loss(&p, s) - loss(&m, s)) / (2.0 * h);
            assert!(
                (num - want).abs() <= 1e-7,
                "seed {seed} [{idx}]: {want} vs {num}"
            );
        }
        let num = (loss(&x, s + h) - loss(&x, s - h)) / (2.0 * h);
        assert!((num - ds).abs() <= 1e-7, "seed {seed} ds: {ds} vs {num}");
    }

    /// t == 0 on the kernels (emulation, outputs poisoned) against the f64 reference and the
    /// direct formula: fp32 inputs within 1e-4, bf16 within 1e-2, at odd and even N and D.
    /// d/ds = Σ dL ⊙ L cancels (it nears 0 where the scale is at its optimum), so its error is
    /// taken relative to the magnitude of its terms Σ |dL ⊙ L| when that is larger: the
    /// tensor-core path rounds the logits' operands to bf16, which bounds d/ds only that way.
    /// fp32 inputs also pass the plain measure.
    #[test]
    fn clip_mode_matches_reference_and_direct_formula() {
        let shapes = [(1, 64), (5, 100), (33, 512), (33, 64), (5, 512)];
        for (n, d) in shapes {
            let seed = fresh_seed();
            let c32 = clip_case(n, d, seed);
            let cb = to_bf16(&c32);
            let (e32, eb) = (check_clip(&c32, 1e-4, seed), check_clip(&cb, 1e-2, seed));
            eprintln!("CLIP N={n} D={d}: worst rel err fp32 {e32:.2e}, bf16 {eb:.2e}");
        }
    }

    /// Runs `c` on the kernels and the reference and compares both with the direct formula;
    /// returns the kernels' worst error.
    fn check_clip<F: LossElem>(c: &Case<F>, tol: f64, seed: u64) -> f64 {
        let (direct, mag) = clip_direct_run(c);
        let want = run(c, None).unwrap();
        let got = run(c, Some(&Emu::default())).unwrap();
        let what = format!(
            "{} N={} D={} s={} seed {seed}",
            F::SUFFIX,
            c.cfg.n,
            c.cfg.d,
            c.cfg.logit_scale
        );
        let e_ref = err(&want, &direct);
        assert!(e_ref <= 1e-6, "{what}: reference vs direct {e_ref}");
        let e = err_ds(&got, &want, mag).max(err_ds(&got, &direct, mag));
        assert!(
            e <= tol,
            "{what}: rel err {e}\n got {:?}\nwant {:?}",
            got.2,
            want.2
        );
        if F::SUFFIX == "f32" {
            let plain = err(&got, &want).max(err(&got, &direct));
            assert!(plain <= tol, "{what}: rel err {plain} (plain measure)");
        }
        // No teacher terms at all: exact zeros, total = task, nothing flagged.
        for r in [&got, &want] {
            assert_eq!(&r.2[1..3], &[0.0, 0.0], "{what}: fd, icl {:?}", r.2);
            assert_eq!(r.2[3], r.2[0], "{what}: total != task");
            assert_eq!(&r.2[5..8], &[0.0, 0.0, 0.0], "{what}: {:?}", r.2);
        }
        e
    }

    /// The task term and d/ds do not depend on the teachers: a t == 0 run gives bit for bit the
    /// task and d/ds of teacher runs on the same features, and with λ = 0, c = 0 the teacher
    /// runs' gradients are the CLIP ones.
    #[test]
    fn clip_mode_equals_task_part_of_teacher_runs() {
        let seed = fresh_seed();
        for mode in [TeacherMode::Random, TeacherMode::Mean, TeacherMode::All] {
            let mut teach = case_f32(cfg(9, 3, 64, mode), seed);
            teach.cfg.logit_scale = 2.2;
            let mut clip = clip_case(9, 64, seed);
            clip.cfg.logit_scale = 2.2;
            clip.image.clone_from(&teach.image);
            clip.text.clone_from(&teach.text);
            let (tb, cb) = (to_bf16(&teach), to_bf16(&clip));
            for emu in [None, Some(&Emu::default())] {
                let pairs: [(Run, Run, &str); 2] = [
                    (run(&clip, emu).unwrap(), run(&teach, emu).unwrap(), "f32"),
                    (run(&cb, emu).unwrap(), run(&tb, emu).unwrap(), "bf16"),
                ];
                for (c, t, sfx) in pairs {
                    let what = format!("{mode:?} {sfx} emu={} seed {seed}", emu.is_some());
                    assert!(t.2[1] > 0.0 && t.2[2] > 0.0, "{what}: {:?}", t.2);
                    assert_eq!(c.2[0], t.2[0], "{what}: task");
                    assert_eq!(c.2[4], t.2[4], "{what}: d/ds");
                }
            }
            // λ = 0 and c = 0 leave every teacher gradient at zero (icl logits all 0).
            teach.cfg.fd_weight = 0.0;
            teach.cfg.icl = IclScale::Const(0.0);
            let emu = Emu::default();
            for (c, t) in [
                (
                    run(&clip, Some(&emu)).unwrap(),
                    run(&teach, Some(&emu)).unwrap(),
                ),
                (
                    run(&to_bf16(&clip), Some(&emu)).unwrap(),
                    run(&to_bf16(&teach), Some(&emu)).unwrap(),
                ),
            ] {
                let e = rel_err(&f32_to_f64(&c.0), &f32_to_f64(&t.0))
                    .max(rel_err(&f32_to_f64(&c.1), &f32_to_f64(&t.1)));
                assert!(e <= 1e-6, "{mode:?} seed {seed}: gradients differ by {e}");
            }
        }
    }

    /// The plan of CLIP mode: no targets step, no student–teacher pass, no teacher slot named;
    /// the scratch shrinks to 2ND(1 + S) + N(10 + S).
    #[test]
    fn clip_plan_skips_teacher_work() {
        for (n, d, sfx) in [(7, 64, "f32"), (7, 64, "bf16"), (40, 100, "bf16")] {
            let c = cfg(n, 0, d, TeacherMode::All);
            let steps = plan(&c, sfx).unwrap();
            let names: Vec<&str> = steps.iter().map(|s| s.kernel).collect();
            let tc = uses_tc(&c, sfx);
            let (st, gr) = if tc {
                ("mtl_row_stats_tc", "mtl_grad_rows_tc")
            } else {
                ("mtl_row_stats", "mtl_grad_rows")
            };
            let norm = if sfx == "f32" {
                "mtl_normalize_f32"
            } else {
                "mtl_normalize_bf16"
            };
            assert_eq!(
                names,
                [norm, st, st, gr, gr, "mtl_finish", "mtl_reduce"],
                "{sfx} D={d}"
            );
            for s in &steps {
                for a in &s.args {
                    assert!(
                        !matches!(a, P::Buf(2..=5) | P::At(2..=5, _)),
                        "{}: names a teacher slot: {a:?}",
                        s.kernel
                    );
                }
            }
            let sp = splits(&c, tc);
            assert_eq!(
                scratch_len_for(&c, sfx),
                2 * n * d * (1 + sp) + n * (10 + sp)
            );
            let k = 3;
            let t = cfg(n, k, d, TeacherMode::All);
            assert_eq!(
                scratch_len_for(&t, sfx),
                2 * n * d * (1 + sp + k) + n * (11 + 8 * k + 2 * sp)
            );
            let with_teacher: Vec<&str> = plan(&t, sfx).unwrap().iter().map(|s| s.kernel).collect();
            assert_eq!(with_teacher.len(), 12);
        }
        assert!(plan(&cfg(0, 0, 8, TeacherMode::Random), "f32").is_err());
        assert!(plan(&cfg(4, 0, 0, TeacherMode::Random), "f32").is_err());
    }

    /// CLIP mode ignores whatever teacher input it is handed, in any mode, with or without pick.
    #[test]
    fn clip_mode_ignores_teacher_inputs() {
        let seed = fresh_seed();
        let base = clip_case(6, 24, seed);
        let want = run(&base, None).unwrap();
        let full = case_f32(cfg(6, 2, 24, TeacherMode::Random), seed);
        for mode in [TeacherMode::Random, TeacherMode::Mean, TeacherMode::All] {
            for pick in [None, full.pick.clone()] {
                let mut c = clip_case(6, 24, seed);
                c.cfg.mode = mode;
                c.ti.clone_from(&full.ti);
                c.tt.clone_from(&full.tt);
                c.mask.clone_from(&full.mask);
                c.pick = pick;
                assert_eq!(run(&c, None).unwrap(), want, "{mode:?} seed {seed}");
            }
        }
        let got = run(&base, Some(&Emu::default())).unwrap();
        assert!(err(&got, &want) <= 1e-4, "seed {seed}");
    }

    /// The deliberately broken kernels fail the CLIP-mode comparison too (the task passes use
    /// the same online softmax and, for bf16, the same fragment code).
    #[test]
    fn broken_kernels_fail_in_clip_mode() {
        let seed = fresh_seed();
        let mut c = clip_case(16, 32, seed);
        c.cfg.logit_scale = 3.0;
        for (i, v) in c.image.iter_mut().enumerate() {
            *v += (i % 32) as f32 * 0.1;
        }
        let want = run(&c, None).unwrap();
        let got = run(&c, Some(&Emu::variant("broken_online"))).unwrap();
        assert!(
            err(&got, &want) > 1e-4,
            "seed {seed}: the broken online softmax passed"
        );
        let c = to_bf16(&clip_case(20, 32, seed));
        let want = run(&c, None).unwrap();
        let got = run(&c, Some(&Emu::variant("broken_frag"))).unwrap();
        assert!(
            err(&got, &want) > 1e-2,
            "seed {seed}: the broken fragment layout passed"
        );
    }
}
