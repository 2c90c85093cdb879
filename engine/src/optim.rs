//! AdamW over the flat parameter buffer, the learning-rate schedule, gradient-norm clipping and
//! the logit-scale clamp.
//!
//! AdamW (decoupled weight decay, PyTorch's update order), at step `t` (1-based) with
//! learning rate `η`:
//!
//! ```text
//! p ← p · (1 − η·λ)               only where the parameter decays (ParamInfo::decays)
//! m ← β₁ m + (1 − β₁) g
//! v ← β₂ v + (1 − β₂) g²
//! p ← p − η · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! The moments live in two flat buffers with the parameters' layout, so checkpoints store them by
//! parameter name. The per-element loop runs in a fixed order: results are bit-reproducible.

use crate::params::ParamStore;

/// AdamW hyper-parameters (open_clip's defaults for ViT-B/16).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

/// AdamW state: first and second moments over the flat buffer, the step count, and which
/// ranges decay.
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// First moments (same layout as the parameters).
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// Steps applied so far.
    pub t: u64,
    /// (offset, len, decays) per parameter, from the store's table.
    ranges: Vec<(usize, usize, bool)>,
}

impl AdamW {
    /// Zeroed moments for every parameter of `params`; decay decided by each parameter's
    /// name and shape ([`crate::ParamInfo::decays`]).
    pub fn new(params: &ParamStore, cfg: AdamWConfig) -> Self {
        let n = params.numel();
        AdamW {
            cfg,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
            ranges: params
                .infos()
                .iter()
                .map(|i| (i.offset, i.len, i.decays()))
                .collect(),
        }
    }

    /// Applies one update with learning rate `lr` from the gradients in `params`.
    pub fn step(&mut self, params: &mut ParamStore, lr: f64) {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step = (lr / bc1) as f32;
        let inv_bc2 = (1.0 / bc2) as f32;
        let eps = c.eps as f32;
        let (data, grad) = params.data_and_grad_mut();
        for &(off, len, decays) in &self.ranges {
            let shrink = if decays {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let r = off..off + len;
            let (p, g) = (&mut data[r.clone()], &grad[r.clone()]);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r]);
            for i in 0..len {
                p[i] *= shrink;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                p[i] -= step * m[i] / ((v[i] * inv_bc2).sqrt() + eps);
            }
        }
    }
}

/// Learning rate at `step` (0-based): linear warm-up to `base` over `warmup` steps
/// (`base·(step+1)/warmup`, as open_clip), then half a cosine from `base` down to 0 at `total`.
pub fn cosine_lr(step: u64, base: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let e = (step - warmup) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * (e / span).min(1.0)).cos()) * base
}

/// Global L2 norm of the gradient buffer (accumulated in `f64`).
pub fn grad_norm(grad: &[f32]) -> f64 {
    grad.iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales the gradients so their global norm is at most `max_norm` (no-op when `max_norm ≤ 0`
/// or the norm is already below). Returns the norm before clipping.
pub fn clip_grad_norm(grad: &mut [f32], max_norm: f64) -> f64 {
    let n = grad_norm(grad);
    if max_norm > 0.0 && n > max_norm {
        // PyTorch's clip_grad_norm_: coefficient max_norm / (norm + 1e-6).
        let k = (max_norm / (n + 1e-6)) as f32;
        grad.iter_mut().for_each(|g| *g *= k);
    }
    n
}

/// Upper bound of the logit scale: `ln 100`.
pub const LOGIT_SCALE_MAX: f32 = 4.605_170_2;

/// Clamps every parameter named `*logit_scale*` into `[0, ln 100]` (after each step).
pub fn clamp_logit_scale(params: &mut ParamStore) {
    let ids: Vec<_> = params
        .infos()
        .iter()
        .enumerate()
        .filter(|(_, i)| i.name.contains("logit_scale"))
        .map(|(k, _)| crate::params::ParamId(k))
        .collect();
    for id in ids {
        params
            .value_mut(id)
            .iter_mut()
            .for_each(|v| *v = v.clamp(0.0, LOGIT_SCALE_MAX));
    }
}
