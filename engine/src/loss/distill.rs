//! Stage-2 multi-teacher distillation loss (MMKD-CLIP), one fused function over all teachers.
//!
//! Student: `Î = normalize(image)`, `T̂ = normalize(text)` `[N, D]`, logit scale `s`.
//! Teachers: targets `U_I`, `U_T` `[N, T, D]` with availability mask `m` `[N, T]`; `k_i = Σ_t m_it`
//! (every sample needs at least one teacher) and row weights `w_it = m_it / (k_i N)`.
//!
//! ```text
//! task = ½ [ CE(e^s Î T̂ᵀ, diag) + CE(e^s T̂ Îᵀ, diag) ]                          (see clip.rs)
//! fd   = Σ_t Σ_i w_it [ ‖Î_i − U_I[i,t]‖² + ‖T̂_i − U_T[i,t]‖² ] / D
//! icl  = ½ Σ_t Σ_i w_it [ CE_i(c Î U_T[:,t]ᵀ) + CE_i(c T̂ U_I[:,t]ᵀ) ]
//! total = task + λ · fd + icl
//! ```
//!
//! where `CE_i(z)` is `−log softmax(z_i)_i` over the columns `j` with `m_jt = 1` (a sample
//! without teacher `t` is neither a positive nor a negative for `t`). With one teacher per sample
//! (`T = 1`, all available) `w_i = 1/N` and this is exactly the reference:
//! `fd = MSE(I, t_I) + MSE(T, t_T)`, `icl = ½ [CE(c I t_Tᵀ) + CE(c T t_Iᵀ)]`.
//!
//! Teacher modes: `random` takes `T = 1` targets (the loader draws one available teacher per
//! sample each time it loads it; [`pick_random_teacher`] does the same on a `[N, T, D]` tensor);
//! `mean` averages the available teachers per sample (after `teacher_norm`) and, under `l2`,
//! renormalises the average; `all` uses every available teacher with the weights above, i.e.
//! summed over the teachers and divided by their count.
//!
//! `c` (the icl scale): `const` multiplies the value in directly as the released reference does
//! (its learnable `c` is never handed to the optimiser); `learned` stores `ℓ = ln c` and uses
//! `c = e^ℓ`, returning `dtotal/dℓ`. Targets receive no gradient.
//!
//! Backward (per normalised student row): `dfd/dÎ_i = Σ_t w_it · 2 (Î_i − U_I[i,t]) / D`; the
//! icl rows follow `rows::contrastive`; the sum goes back through the normalisation.

use super::clip::clip_normalized;
use super::rows::{contrastive, normalize, normalize_backward};
use super::{check_len, narrow, widen, LossParts};
use crate::error::{EngineError, Result};
use rand::Rng;

/// The released reference's icl scale: `ln(1/0.07)`, multiplied in directly.
pub const REFERENCE_ICL_SCALE: f64 = 2.659_260_036_932_778;

/// How the icl scale `c` is obtained.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IclScale {
    /// A constant multiplied in directly (reference: [`REFERENCE_ICL_SCALE`]).
    Const(f64),
    /// A learned parameter stored as its logarithm `ℓ`; `c = e^ℓ`.
    Learned(f64),
}

/// Normalisation applied to the teacher targets before the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherNorm {
    /// L2-normalise each teacher row (the loss's assumption).
    #[default]
    L2,
    /// Use the targets as stored (reproduces the released data, whose norms are 1.6–2.4).
    None,
}

/// Which teachers a sample is distilled from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherMode {
    /// One available teacher per sample, drawn when the sample is loaded (the paper).
    #[default]
    Random,
    /// The average of the available teachers.
    Mean,
    /// Every available teacher, summed and divided by their count.
    All,
}

/// Switches of the distillation loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillConfig {
    /// λ, the weight of `fd` (reference 50).
    pub fd_weight: f64,
    /// The icl scale `c`.
    pub icl_scale: IclScale,
    /// Teacher target normalisation.
    pub teacher_norm: TeacherNorm,
    /// Teacher mode.
    pub teacher_mode: TeacherMode,
}

impl Default for DistillConfig {
    /// The reference behaviour with normalised targets.
    fn default() -> Self {
        DistillConfig {
            fd_weight: 50.0,
            icl_scale: IclScale::Const(REFERENCE_ICL_SCALE),
            teacher_norm: TeacherNorm::L2,
            teacher_mode: TeacherMode::Random,
        }
    }
}

/// Teacher targets `[N, T, D]` (image and text) with the availability mask `[N, T]`.
#[derive(Clone, Copy, Debug)]
pub struct TeacherTargets<'a, F> {
    /// Teacher image features `[N, T, D]`.
    pub image: &'a [F],
    /// Teacher text features `[N, T, D]`.
    pub text: &'a [F],
    /// `mask[i * T + t]`: teacher `t` is available for sample `i`.
    pub mask: &'a [bool],
    /// `T`, the number of teacher slots.
    pub teachers: usize,
}

/// Gradients of the distillation loss w.r.t. the student side.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillGrads<F> {
    /// dtotal/d(image) `[N, D]`, w.r.t. the unnormalised features.
    pub image: Vec<F>,
    /// dtotal/d(text) `[N, D]`.
    pub text: Vec<F>,
    /// dtotal/ds for the raw logit-scale parameter.
    pub logit_scale: F,
    /// dtotal/dℓ when the icl scale is learned (`None` for a constant).
    pub icl_scale: Option<F>,
}

/// Draws one available teacher per sample from `[N, T, D]` targets; returns `[N, D]` image and
/// text targets. Errors name the sample that has no teacher.
pub fn pick_random_teacher<F: Copy>(
    t: &TeacherTargets<'_, F>,
    n: usize,
    d: usize,
    rng: &mut impl Rng,
) -> Result<(Vec<F>, Vec<F>)> {
    let tt = t.teachers;
    check_targets(t, n, d)?;
    let mut img = Vec::with_capacity(n * d);
    let mut txt = Vec::with_capacity(n * d);
    for i in 0..n {
        let avail: Vec<usize> = (0..tt).filter(|&k| t.mask[i * tt + k]).collect();
        if avail.is_empty() {
            return Err(no_teacher(i));
        }
        let k = avail[rng.gen_range(0..avail.len())];
        let o = (i * tt + k) * d;
        img.extend_from_slice(&t.image[o..o + d]);
        txt.extend_from_slice(&t.text[o..o + d]);
    }
    Ok((img, txt))
}

/// [`pick_random_teacher`] with a ChaCha8 generator seeded by `seed` (reproducible draws).
pub fn pick_random_teacher_seeded<F: Copy>(
    t: &TeacherTargets<'_, F>,
    n: usize,
    d: usize,
    seed: u64,
) -> Result<(Vec<F>, Vec<F>)> {
    use rand::SeedableRng;
    pick_random_teacher(t, n, d, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
}

fn no_teacher(i: usize) -> EngineError {
    EngineError::Input(format!("sample {i} has no available teacher in the mask"))
}

fn check_targets<F>(t: &TeacherTargets<'_, F>, n: usize, d: usize) -> Result<()> {
    if t.teachers == 0 {
        return Err(EngineError::Input(
            "teacher targets have T = 0 slots".into(),
        ));
    }
    check_len(
        "teacher image",
        t.image.len(),
        n * t.teachers * d,
        "[N, T, D]",
    )?;
    check_len(
        "teacher text",
        t.text.len(),
        n * t.teachers * d,
        "[N, T, D]",
    )?;
    check_len("teacher mask", t.mask.len(), n * t.teachers, "[N, T]")
}

/// Per-teacher targets `[N, D]`, row weights and column mask, after mode and normalisation.
struct Prepared {
    img: Vec<Vec<f64>>,
    txt: Vec<Vec<f64>>,
    w: Vec<Vec<f64>>,
    keep: Vec<Vec<bool>>,
}

fn prepare(
    t: &TeacherTargets<'_, f64>,
    cfg: &DistillConfig,
    n: usize,
    d: usize,
) -> Result<Prepared> {
    check_targets(t, n, d)?;
    let tt = t.teachers;
    let counts: Vec<usize> = (0..n)
        .map(|i| (0..tt).filter(|&k| t.mask[i * tt + k]).count())
        .collect();
    if let Some(i) = counts.iter().position(|&c| c == 0) {
        return Err(no_teacher(i));
    }
    // Slot k as a contiguous [N, D] block, normalised per row if asked.
    let slot = |src: &[f64], k: usize| -> Vec<f64> {
        let mut out = Vec::with_capacity(n * d);
        for i in 0..n {
            let o = (i * tt + k) * d;
            out.extend_from_slice(&src[o..o + d]);
        }
        match cfg.teacher_norm {
            TeacherNorm::L2 => normalize(&out, d).0,
            TeacherNorm::None => out,
        }
    };
    let all_kept = vec![true; n];
    match cfg.teacher_mode {
        TeacherMode::Random => {
            if tt != 1 {
                return Err(EngineError::Input(format!(
                    "teacher mode `random` takes one drawn teacher per sample ([N, D] targets) \
                     but {tt} slots were given; draw one first (pick_random_teacher)"
                )));
            }
            Ok(Prepared {
                img: vec![slot(t.image, 0)],
                txt: vec![slot(t.text, 0)],
                w: vec![vec![1.0 / n as f64; n]],
                keep: vec![all_kept],
            })
        }
        TeacherMode::Mean => {
            let mut img = vec![0.0; n * d];
            let mut txt = vec![0.0; n * d];
            for k in 0..tt {
                let (si, st) = (slot(t.image, k), slot(t.text, k));
                for i in (0..n).filter(|&i| t.mask[i * tt + k]) {
                    let inv = 1.0 / counts[i] as f64;
                    for e in i * d..(i + 1) * d {
                        img[e] += si[e] * inv;
                        txt[e] += st[e] * inv;
                    }
                }
            }
            if cfg.teacher_norm == TeacherNorm::L2 {
                img = normalize(&img, d).0;
                txt = normalize(&txt, d).0;
            }
            Ok(Prepared {
                img: vec![img],
                txt: vec![txt],
                w: vec![vec![1.0 / n as f64; n]],
                keep: vec![all_kept],
            })
        }
        TeacherMode::All => {
            let mut p = Prepared {
                img: Vec::new(),
                txt: Vec::new(),
                w: Vec::new(),
                keep: Vec::new(),
            };
            for k in 0..tt {
                let keep: Vec<bool> = (0..n).map(|i| t.mask[i * tt + k]).collect();
                if !keep.iter().any(|&b| b) {
                    continue;
                }
                p.img.push(slot(t.image, k));
                p.txt.push(slot(t.text, k));
                p.w.push(
                    (0..n)
                        .map(|i| {
                            if keep[i] {
                                1.0 / (counts[i] * n) as f64
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                );
                p.keep.push(keep);
            }
            Ok(p)
        }
    }
}

/// The distillation loss in `f64`. `image`, `text` are the unnormalised student features
/// `[n, d]`, `logit_scale` the raw parameter `s`.
pub fn distill_loss_f64(
    image: &[f64],
    text: &[f64],
    logit_scale: f64,
    targets: &TeacherTargets<'_, f64>,
    cfg: &DistillConfig,
    n: usize,
    d: usize,
) -> Result<(LossParts, DistillGrads<f64>)> {
    check_len("image", image.len(), n * d, "[N, D]")?;
    check_len("text", text.len(), n * d, "[N, D]")?;
    let p = prepare(targets, cfg, n, d)?;
    let (ih, inorm) = normalize(image, d);
    let (th, tnorm) = normalize(text, d);
    let (task, mut dih, mut dth, ds) = clip_normalized(&ih, &th, logit_scale, n, d);

    let c = match cfg.icl_scale {
        IclScale::Const(c) => c,
        IclScale::Learned(l) => l.exp(),
    };
    let lambda = cfg.fd_weight;
    let (mut fd, mut icl, mut dc) = (0.0, 0.0, 0.0);
    for k in 0..p.w.len() {
        let w = &p.w[k];
        // fd: weighted squared distances; gradient 2 w (x̂ − u) / D, scaled by λ.
        for i in (0..n).filter(|&i| w[i] > 0.0) {
            let f = w[i] / d as f64;
            for e in i * d..(i + 1) * d {
                let (ri, rt) = (ih[e] - p.img[k][e], th[e] - p.txt[k][e]);
                fd += f * (ri * ri + rt * rt);
                dih[e] += lambda * 2.0 * f * ri;
                dth[e] += lambda * 2.0 * f * rt;
            }
        }
        // icl: student image vs. teacher text, student text vs. teacher image, each halved.
        let half: Vec<f64> = w.iter().map(|v| 0.5 * v).collect();
        let (l1, g1) = contrastive(&ih, &p.txt[k], c, &half, &p.keep[k], d);
        let (l2, g2) = contrastive(&th, &p.img[k], c, &half, &p.keep[k], d);
        icl += l1 + l2;
        dc += g1.dscale + g2.dscale;
        dih.iter_mut().zip(&g1.da).for_each(|(o, v)| *o += v);
        dth.iter_mut().zip(&g2.da).for_each(|(o, v)| *o += v);
    }
    let parts = LossParts {
        task,
        fd,
        icl,
        total: task + lambda * fd + icl,
    };
    let grads = DistillGrads {
        image: normalize_backward(&ih, &inorm, &dih, d),
        text: normalize_backward(&th, &tnorm, &dth, d),
        logit_scale: ds,
        icl_scale: match cfg.icl_scale {
            IclScale::Const(_) => None,
            IclScale::Learned(_) => Some(c * dc),
        },
    };
    Ok((parts, grads))
}

/// The distillation loss on `f32` features and targets (computed in `f64`).
pub fn distill_loss(
    image: &[f32],
    text: &[f32],
    logit_scale: f32,
    targets: &TeacherTargets<'_, f32>,
    cfg: &DistillConfig,
    n: usize,
    d: usize,
) -> Result<(LossParts, DistillGrads<f32>)> {
    let (ti, tt) = (widen(targets.image), widen(targets.text));
    let t64 = TeacherTargets {
        image: &ti,
        text: &tt,
        mask: targets.mask,
        teachers: targets.teachers,
    };
    let (parts, g) = distill_loss_f64(
        &widen(image),
        &widen(text),
        logit_scale as f64,
        &t64,
        cfg,
        n,
        d,
    )?;
    Ok((
        parts,
        DistillGrads {
            image: narrow(&g.image),
            text: narrow(&g.text),
            logit_scale: g.logit_scale as f32,
            icl_scale: g.icl_scale.map(|v| v as f32),
        },
    ))
}
