//! Layer normalisation over the last dimension.
//!
//! Forward, per row `x (D)`: `μ = mean(x)`, `r = 1/sqrt(var(x) + eps)`, `x̂ = (x − μ)·r`,
//! `y = x̂ ∘ γ + β`. Saves `μ, r` per row `(N)`.
//! Backward: `dβ += Σ_rows dy`, `dγ += Σ_rows dy ∘ x̂`, `g = dy ∘ γ`,
//! `dx += r · (g − mean(g) − x̂ · mean(g ∘ x̂))`.

use crate::error::{shape_err, Result};
use crate::ops::split2;
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::simd::{lane_sum, wide};
use crate::tape::{Grads, Node, Op, Tape, Var};
use rayon::prelude::*;

/// CPU forward: `x (N, D)` → `y (N, D)`, row statistics into `mean (N)`, `rstd (N)`.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    d: usize,
    eps: f64,
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
) {
    let inv_d = T::from_f64(1.0 / d as f64);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((yr, xr), (mu, rs))| {
            wide(
                #[inline(always)]
                || {
                    let (xr, gamma, beta) = (&xr[..d], &gamma[..d], &beta[..d]);
                    let m = lane_sum(d, |i| xr[i]) * inv_d;
                    let var = lane_sum(d, |i| (xr[i] - m) * (xr[i] - m));
                    let r = T::one() / (var * inv_d + T::from_f64(eps)).sqrt();
                    for (i, o) in yr.iter_mut().enumerate() {
                        *o = (xr[i] - m) * r * gamma[i] + beta[i];
                    }
                    *mu = m;
                    *rs = r;
                },
            )
        });
}

/// CPU backward; `dx` optional, `dgamma`/`dbeta` accumulated.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu<T: Real>(
    x: &[T],
    gamma: &[T],
    mean: &[T],
    rstd: &[T],
    dy: &[T],
    d: usize,
    dx: Option<&mut [T]>,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let inv_d = T::from_f64(1.0 / d as f64);
    if let Some(dx) = dx {
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .zip(mean.par_iter().zip(rstd.par_iter()))
            .for_each(|((dxr, (xr, dyr)), (&m, &r))| {
                wide(
                    #[inline(always)]
                    || {
                        let (xr, dyr, gamma) = (&xr[..d], &dyr[..d], &gamma[..d]);
                        let mg = lane_sum(d, |i| dyr[i] * gamma[i]) * inv_d;
                        let mgx = lane_sum(d, |i| dyr[i] * gamma[i] * (xr[i] - m) * r) * inv_d;
                        for (i, o) in dxr.iter_mut().enumerate() {
                            let xh = (xr[i] - m) * r;
                            *o += r * (dyr[i] * gamma[i] - mg - xh * mgx);
                        }
                    },
                )
            });
    }
    // Parameter gradients: per-chunk partial sums, then a sequential reduction, so the result
    // does not depend on thread timing.
    let rows = mean.len();
    let chunk = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let partials: Vec<Vec<T>> = (0..rows)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| {
            let mut acc = vec![T::zero(); 2 * d];
            let (dg, db) = acc.split_at_mut(d);
            wide(
                #[inline(always)]
                || {
                    for r in r0..(r0 + chunk).min(rows) {
                        let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
                        let (m, rs) = (mean[r], rstd[r]);
                        for (i, (g, b)) in dg.iter_mut().zip(db.iter_mut()).enumerate() {
                            *g += dyr[i] * (xr[i] - m) * rs;
                            *b += dyr[i];
                        }
                    }
                },
            );
            acc
        })
        .collect();
    for p in partials {
        for i in 0..d {
            dgamma[i] += p[i];
            dbeta[i] += p[d + i];
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    gamma: ParamView,
    beta: ParamView,
    d: usize,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl Saved {
    pub(crate) fn bytes(&self) -> usize {
        (self.mean.len() + self.rstd.len()) * 4
    }
}

impl Tape {
    /// Layer norm of `x (..., D)` with gain `gamma (D)` and bias `beta (D)`.
    pub fn layer_norm(
        &mut self,
        params: &ParamStore,
        x: Var,
        gamma: ParamView,
        beta: ParamView,
        eps: f64,
    ) -> Result<Var> {
        self.check_var("layer_norm", x)?;
        let shape = self.shape(x).to_vec();
        let d = *shape.last().unwrap_or(&0);
        if d == 0 || gamma.len != d || beta.len != d {
            return shape_err(
                "layer_norm",
                format!(
                    "x {shape:?}, gamma {} and beta {} elements",
                    gamma.len, beta.len
                ),
            );
        }
        self.dispatch("layer_norm")?;
        let n = self.value(x).len() / d;
        let mut y = vec![0.0f32; n * d];
        let (mut mean, mut rstd) = (vec![0.0f32; n], vec![0.0f32; n]);
        forward(
            self.value(x),
            params.slice(gamma),
            params.slice(beta),
            d,
            eps,
            &mut y,
            &mut mean,
            &mut rstd,
        );
        let s = Saved {
            x,
            gamma,
            beta,
            d,
            mean,
            rstd,
        };
        Ok(self.push(y, shape, true, Op::LayerNorm(s)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads, p: &mut ParamStore) {
    let (data, grad) = p.data_and_grad_mut();
    let gamma = &data[s.gamma.offset..s.gamma.offset + s.gamma.len];
    let (dg, db) = split2(grad, s.gamma, s.beta);
    let dx = if nodes[s.x.0].needs_grad {
        Some(g.of(nodes, s.x))
    } else {
        None
    };
    let x = &nodes[s.x.0].value;
    backward_cpu(x, gamma, &s.mean, &s.rstd, dy, s.d, dx, dg, db);
}
