//! Stage-1 CLIP loss, symmetric, with the learnable logit scale.
//!
//! With `Î = normalize(image)`, `T̂ = normalize(text)` (`[N, D]`) and the raw parameter `s`:
//!
//! ```text
//! L    = e^s · Î T̂ᵀ                                   (N, N)
//! task = ½ [ CE(L, diag) + CE(Lᵀ, diag) ]             CE = mean over rows of −log softmax
//! ```
//!
//! Backward: with `P` the row softmax of `L` and `Q` the row softmax of `Lᵀ`,
//! `dtask/dL = (P − 1) / 2N + ((Q − 1) / 2N)ᵀ`; then `dÎ = e^s dL T̂`, `dT̂ = e^s dLᵀ Î`,
//! `ds = Σ dL ⊙ L`, and `dÎ`, `dT̂` go back through the normalisation.

use super::rows::{contrastive, normalize, normalize_backward};
use super::{check_len, narrow, widen};
use crate::error::Result;

/// Gradients of the CLIP loss (same element type as the call that produced them).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipGrads<F> {
    /// dtask/d(image) `[N, D]`, w.r.t. the unnormalised features.
    pub image: Vec<F>,
    /// dtask/d(text) `[N, D]`.
    pub text: Vec<F>,
    /// dtask/ds for the raw logit-scale parameter `s`.
    pub logit_scale: F,
}

/// The CLIP loss in `f64` on unnormalised `image`, `text` `[n, d]` and the raw logit scale.
pub fn clip_loss_f64(
    image: &[f64],
    text: &[f64],
    logit_scale: f64,
    n: usize,
    d: usize,
) -> Result<(f64, ClipGrads<f64>)> {
    check_len("image", image.len(), n * d, "[N, D]")?;
    check_len("text", text.len(), n * d, "[N, D]")?;
    let (ih, inorm) = normalize(image, d);
    let (th, tnorm) = normalize(text, d);
    let (task, dih, dth, ds) = clip_normalized(&ih, &th, logit_scale, n, d);
    Ok((
        task,
        ClipGrads {
            image: normalize_backward(&ih, &inorm, &dih, d),
            text: normalize_backward(&th, &tnorm, &dth, d),
            logit_scale: ds,
        },
    ))
}

/// The CLIP loss on `f32` features (computed in `f64`).
pub fn clip_loss(
    image: &[f32],
    text: &[f32],
    logit_scale: f32,
    n: usize,
    d: usize,
) -> Result<(f64, ClipGrads<f32>)> {
    let (l, g) = clip_loss_f64(&widen(image), &widen(text), logit_scale as f64, n, d)?;
    Ok((
        l,
        ClipGrads {
            image: narrow(&g.image),
            text: narrow(&g.text),
            logit_scale: g.logit_scale as f32,
        },
    ))
}

/// The symmetric loss on already-normalised rows; returns the loss and the gradients w.r.t. the
/// normalised rows and `s`.
pub(crate) fn clip_normalized(
    ih: &[f64],
    th: &[f64],
    s: f64,
    n: usize,
    d: usize,
) -> (f64, Vec<f64>, Vec<f64>, f64) {
    let scale = s.exp();
    let w = vec![0.5 / n as f64; n];
    let keep = vec![true; n];
    // Image → text rows, then text → image rows (the transposed logits).
    let (l1, g1) = contrastive(ih, th, scale, &w, &keep, d);
    let (l2, g2) = contrastive(th, ih, scale, &w, &keep, d);
    let dih: Vec<f64> = g1.da.iter().zip(&g2.db).map(|(a, b)| a + b).collect();
    let dth: Vec<f64> = g1.db.iter().zip(&g2.da).map(|(a, b)| a + b).collect();
    // d/ds of f(e^s) = e^s · df/dscale.
    (l1 + l2, dih, dth, scale * (g1.dscale + g2.dscale))
}
