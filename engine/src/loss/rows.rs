//! Row helpers shared by the losses: L2 normalisation with its backward, and cross-entropy of a
//! score matrix against its diagonal with an optional column mask.

use crate::ops::matmul::{gemm, Mat};

/// `F.normalize`'s floor on the norm: `x / max(‖x‖, EPS)`.
const EPS: f64 = 1e-12;

/// Normalises each row of `x` `[N, D]`; returns the normalised rows and each row's divisor
/// `max(‖x_i‖, EPS)`.
pub(crate) fn normalize(x: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = x.to_vec();
    let mut norms = Vec::with_capacity(x.len() / d.max(1));
    for row in out.chunks_exact_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(EPS);
        row.iter_mut().for_each(|v| *v /= n);
        norms.push(n);
    }
    (out, norms)
}

/// Backward of [`normalize`]: given `g = dL/dx̂`, returns `dL/dx = (g − x̂ (g·x̂)) / ‖x‖` per row.
/// (Below the floor the divisor is constant and the map is linear: `dL/dx = g / EPS`.)
pub(crate) fn normalize_backward(xhat: &[f64], norms: &[f64], g: &[f64], d: usize) -> Vec<f64> {
    let mut out = vec![0.0; g.len()];
    for (i, (o, (gr, xr))) in out
        .chunks_exact_mut(d)
        .zip(g.chunks_exact(d).zip(xhat.chunks_exact(d)))
        .enumerate()
    {
        let n = norms[i];
        if n <= EPS {
            o.iter_mut().zip(gr).for_each(|(o, g)| *o = g / n);
            continue;
        }
        let dot: f64 = gr.iter().zip(xr).map(|(a, b)| a * b).sum();
        for ((o, g), x) in o.iter_mut().zip(gr).zip(xr) {
            *o = (g - x * dot) / n;
        }
    }
    out
}

/// Cross-entropy of one row of logits `z` against target column `target`, restricted to the
/// columns where `keep` is true. Returns the loss and writes `softmax − onehot` (zero on dropped
/// columns) into `dz`, the gradient of the loss with respect to `z`.
pub(crate) fn ce_row(
    z: &[f64],
    keep: impl Fn(usize) -> bool,
    target: usize,
    dz: &mut [f64],
) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for (j, &v) in z.iter().enumerate() {
        if keep(j) && v > m {
            m = v;
        }
    }
    let mut sum = 0.0;
    for (j, &v) in z.iter().enumerate() {
        dz[j] = if keep(j) { (v - m).exp() } else { 0.0 };
        sum += dz[j];
    }
    dz.iter_mut().for_each(|p| *p /= sum);
    dz[target] -= 1.0;
    // −log softmax(z)_target = logsumexp(z) − z_target.
    m + sum.ln() - z[target]
}

/// Gradients returned by [`contrastive`].
pub(crate) struct ContrastiveGrads {
    /// dL/da `[N, D]`.
    pub(crate) da: Vec<f64>,
    /// dL/db `[N, D]`.
    pub(crate) db: Vec<f64>,
    /// dL/dscale.
    pub(crate) dscale: f64,
}

/// `L = Σ_i w_i · CE(scale · a_i Bᵀ, i)` over rows `a_i` of `a` `[N, D]` against the rows of `b`
/// `[N, D]`, where only the columns `j` with `keep[j]` enter the softmax and rows with `w_i = 0`
/// are skipped. With `w_i = 1/N` and everything kept this is the mean cross-entropy against the
/// diagonal used by CLIP. Gradients: with `p_ij` the masked softmax and `G_ij = w_i (p_ij − δ_ij)`,
/// `dL/da_i = scale Σ_j G_ij b_j`, `dL/db_j = scale Σ_i G_ij a_i`, `dL/dscale = Σ_ij G_ij a_i·b_j`.
///
/// The N² dot products and both gradients are three matrix products (`S = A Bᵀ`,
/// `dA = scale·G B`, `dB = scale·Gᵀ A`) rather than scalar loops; `dscale` uses `S` itself, not
/// `sim / scale`, so it stays exact when the scale is 0. Rows of `b` in dropped columns are
/// never read.
pub(crate) fn contrastive(
    a: &[f64],
    b: &[f64],
    scale: f64,
    w: &[f64],
    keep: &[bool],
    d: usize,
) -> (f64, ContrastiveGrads) {
    let n = w.len();
    // Dropped columns must not reach the products at all: their rows of `b` (a teacher's slot
    // where it has no features) may hold anything, and 0 · NaN is NaN.
    let kept_b;
    let b = if keep.iter().all(|&k| k) {
        b
    } else {
        kept_b = b
            .chunks_exact(d)
            .zip(keep)
            .flat_map(|(row, &k)| row.iter().map(move |&v| if k { v } else { 0.0 }))
            .collect::<Vec<f64>>();
        &kept_b[..]
    };
    let mut dots = vec![0.0; n * n];
    gemm(
        n,
        n,
        d,
        &mut dots,
        n,
        Mat::rm(a, d),
        Mat::rm_t(b, d),
        false,
        true,
    );
    let mut loss = 0.0;
    let mut dscale = 0.0;
    // scale · G, the left operand of both gradient products.
    let mut sg = vec![0.0; n * n];
    let mut sim = vec![0.0; n];
    let mut g = vec![0.0; n];
    for i in 0..n {
        if w[i] == 0.0 {
            continue;
        }
        let si = &dots[i * n..(i + 1) * n];
        for (j, z) in sim.iter_mut().enumerate() {
            *z = if keep[j] { scale * si[j] } else { 0.0 };
        }
        loss += w[i] * ce_row(&sim, |j| keep[j], i, &mut g);
        for j in 0..n {
            let gij = w[i] * g[j];
            dscale += gij * si[j];
            sg[i * n + j] = scale * gij;
        }
    }
    let mut da = vec![0.0; n * d];
    let mut db = vec![0.0; n * d];
    gemm(
        n,
        d,
        n,
        &mut da,
        d,
        Mat::rm(&sg, n),
        Mat::rm(b, d),
        false,
        true,
    );
    gemm(
        n,
        d,
        n,
        &mut db,
        d,
        Mat::rm_t(&sg, n),
        Mat::rm(a, d),
        false,
        true,
    );
    (loss, ContrastiveGrads { da, db, dscale })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_columns_are_never_read() {
        let (n, d) = (5, 3);
        let a: Vec<f64> = (0..n * d)
            .map(|i| ((i * 37) % 11) as f64 / 11.0 - 0.4)
            .collect();
        let mut b: Vec<f64> = (0..n * d)
            .map(|i| ((i * 53) % 13) as f64 / 13.0 - 0.5)
            .collect();
        let keep = [true, false, true, true, false];
        let w = [0.2, 0.0, 0.2, 0.2, 0.0];
        for j in [1, 4] {
            b[j * d..(j + 1) * d].iter_mut().for_each(|v| *v = 0.0);
        }
        let (l0, g0) = contrastive(&a, &b, 2.5, &w, &keep, d);
        for j in [1, 4] {
            b[j * d..(j + 1) * d].iter_mut().for_each(|v| *v = f64::NAN);
        }
        let (l1, g1) = contrastive(&a, &b, 2.5, &w, &keep, d);
        assert!(l0.is_finite() && l0 > 0.0);
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert_eq!(g0.dscale.to_bits(), g1.dscale.to_bits());
        for (x, y) in g0.da.iter().zip(&g1.da).chain(g0.db.iter().zip(&g1.db)) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
    }
}
