//! Patch embedding: a convolution with stride = kernel = p and no bias, computed as a GEMM.
//! `img (B, C, H, W)` → im2col `X (B·P, C·p·p)` with `P = (H/p)(W/p)` patches in row-major
//! order and columns ordered `(c, ky, kx)` like `conv1.weight (D, C, p, p)`;
//! `y (B, P, D) = X · Wᵀ`. Backward: `dW += dyᵀ · X` (images take no gradient).

use crate::error::{shape_err, Result};
use crate::ops::linear::{self, WLayout};
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Op, Tape, Var};
use rayon::prelude::*;

/// im2col of a `(B, C, H, W)` image batch into `(B·P, C·p·p)`.
pub fn im2col<T: Real>(img: &[T], b: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<T> {
    let (gh, gw) = (h / p, w / p);
    let k = c * p * p;
    let mut cols = vec![T::zero(); b * gh * gw * k];
    cols.par_chunks_mut(k).enumerate().for_each(|(row, out)| {
        let (bi, pi) = (row / (gh * gw), row % (gh * gw));
        let (py, px) = (pi / gw, pi % gw);
        for ci in 0..c {
            for ky in 0..p {
                let src = ((bi * c + ci) * h + py * p + ky) * w + px * p;
                let dst = (ci * p + ky) * p;
                out[dst..dst + p].copy_from_slice(&img[src..src + p]);
            }
        }
    });
    cols
}

/// CPU forward: returns `(y (B·P, D), cols)`.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    img: &[T],
    weight: &[T],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    p: usize,
    d: usize,
) -> (Vec<T>, Vec<T>) {
    let cols = im2col(img, b, c, h, w, p);
    let n = b * (h / p) * (w / p);
    let mut y = vec![T::zero(); n * d];
    linear::forward(&cols, weight, None, WLayout::OutIn, n, c * p * p, d, &mut y);
    (y, cols)
}

pub(crate) struct Saved {
    cols: Vec<f32>,
    weight: ParamView,
    n: usize,
    k: usize,
    d: usize,
}

impl Saved {
    pub(crate) fn bytes(&self) -> usize {
        self.cols.len() * 4
    }
}

impl Tape {
    /// Patch embedding of `img (B, C, H, W)` with `weight (D, C, p, p)` → `(B, P, D)`.
    pub fn patch_embed(
        &mut self,
        params: &ParamStore,
        img: &[f32],
        img_shape: [usize; 4],
        weight: ParamView,
        patch: usize,
        d: usize,
    ) -> Result<Var> {
        let [b, c, h, w] = img_shape;
        if patch == 0
            || h % patch != 0
            || w % patch != 0
            || img.len() != b * c * h * w
            || weight.len != d * c * patch * patch
        {
            return shape_err(
                "patch_embed",
                format!(
                    "image {img_shape:?} ({} values), patch {patch}, weight {} elements for width {d}",
                    img.len(),
                    weight.len
                ),
            );
        }
        self.dispatch("patch_embed")?;
        let (y, cols) = forward(img, params.slice(weight), b, c, h, w, patch, d);
        let np = (h / patch) * (w / patch);
        let k = c * patch * patch;
        let cols = if self.is_recording() {
            cols
        } else {
            Vec::new()
        };
        let s = Saved {
            cols,
            weight,
            n: b * np,
            k,
            d,
        };
        Ok(self.push(y, vec![b, np, d], true, Op::PatchEmbed(s)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], p: &mut ParamStore) {
    let (data, grad) = p.data_and_grad_mut();
    let w = &data[s.weight.offset..s.weight.offset + s.weight.len];
    let dw = &mut grad[s.weight.offset..s.weight.offset + s.weight.len];
    linear::backward_cpu(
        &s.cols,
        w,
        dy,
        WLayout::OutIn,
        s.n,
        s.k,
        s.d,
        None,
        dw,
        None,
    );
}
