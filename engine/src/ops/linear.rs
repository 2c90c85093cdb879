//! Linear layer: `y = x · Wᵀ + b`.
//!
//! Shapes: `x (N, K)` (leading dims flattened into N), `y (N, M)`, `b (M)`.
//! `W` is `(M, K)` (PyTorch `nn.Linear` layout, [`WLayout::OutIn`]) or `(K, M)` (open_clip's
//! `visual.proj`, [`WLayout::InOut`]); both are read in place through strides.
//! Backward: `dx += dy · W`, `dW += dyᵀ · x` (or `xᵀ · dy` for InOut), `db += Σ_n dy`.
//! Gradients are added (`+=`) because a parameter may be reached along several paths and
//! gradient accumulation sums several backward passes.

use crate::error::{shape_err, Result};
use crate::ops::matmul::{gemm, Mat};
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// Storage layout of a linear weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WLayout {
    /// `(out, in)`: `nn.Linear.weight`.
    OutIn,
    /// `(in, out)`: `x @ W` projections such as open_clip's `visual.proj`.
    InOut,
}

fn w_as_rhs<T>(w: &[T], layout: WLayout, k: usize, m: usize) -> Mat<'_, T> {
    // Wᵀ viewed as (K, M).
    match layout {
        WLayout::OutIn => Mat::rm_t(w, k),
        WLayout::InOut => Mat::rm(w, m),
    }
}

/// CPU forward.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    layout: WLayout,
    n: usize,
    k: usize,
    m: usize,
    y: &mut [T],
) {
    if let Some(b) = b {
        for row in y.chunks_exact_mut(m) {
            row.copy_from_slice(b);
        }
    }
    product(x, w, b.is_some(), layout, n, k, m, y);
}

/// `y = x · Wᵀ`, or `y += x · Wᵀ` when `add` (a `y` that holds the bias already).
#[allow(clippy::too_many_arguments)]
fn product<T: Real>(
    x: &[T],
    w: &[T],
    add: bool,
    layout: WLayout,
    n: usize,
    k: usize,
    m: usize,
    y: &mut [T],
) {
    gemm(
        n,
        m,
        k,
        y,
        m,
        Mat::rm(x, k),
        w_as_rhs(w, layout, k, m),
        add,
        true,
    );
}

/// CPU backward; each gradient is optional and accumulated.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    layout: WLayout,
    n: usize,
    k: usize,
    m: usize,
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    if let Some(dx) = dx {
        // dx (N, K) += dy (N, M) · W viewed (M, K)
        let wm = match layout {
            WLayout::OutIn => Mat::rm(w, k),
            WLayout::InOut => Mat::rm_t(w, m),
        };
        gemm(n, k, m, dx, k, Mat::rm(dy, m), wm, true, true);
    }
    match layout {
        // dW (M, K) += dyᵀ (M, N) · x (N, K)
        WLayout::OutIn => gemm(m, k, n, dw, k, Mat::rm_t(dy, m), Mat::rm(x, k), true, true),
        // dW (K, M) += xᵀ (K, N) · dy (N, M)
        WLayout::InOut => gemm(k, m, n, dw, m, Mat::rm_t(x, k), Mat::rm(dy, m), true, true),
    }
    if let Some(db) = db {
        for row in dy.chunks_exact(m) {
            for (d, &v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    w: ParamView,
    b: Option<ParamView>,
    layout: WLayout,
    n: usize,
    k: usize,
    m: usize,
}

impl Tape {
    /// `x (..., K)` → `(..., M)` with weight view `w` (`M·K` elements in `layout`) and optional
    /// bias `(M)`.
    pub fn linear(
        &mut self,
        params: &ParamStore,
        x: Var,
        w: ParamView,
        b: Option<ParamView>,
        layout: WLayout,
        out_features: usize,
    ) -> Result<Var> {
        self.check_var("linear", x)?;
        let shape = self.shape(x).to_vec();
        let k = *shape.last().unwrap_or(&0);
        let m = out_features;
        if shape.is_empty() || k == 0 || w.len != m * k || b.is_some_and(|b| b.len != m) {
            return shape_err(
                "linear",
                format!(
                    "x {shape:?}, weight of {} elements, bias {:?}, out {m}",
                    w.len,
                    b.map(|b| b.len)
                ),
            );
        }
        let n = self.value(x).len() / k;
        self.dispatch("linear")?;
        // The output starts as the bias rows (built, not zero-filled and then overwritten).
        let mut y = match b {
            Some(b) => params.slice(b).repeat(n),
            None => vec![0.0f32; n * m],
        };
        let (xv, wv) = (self.value(x), params.slice(w));
        product(xv, wv, b.is_some(), layout, n, k, m, &mut y);
        let mut oshape = shape;
        *oshape.last_mut().expect("non-empty") = m;
        let saved = Saved {
            x,
            w,
            b,
            layout,
            n,
            k,
            m,
        };
        Ok(self.push(y, oshape, true, Op::Linear(saved)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads, p: &mut ParamStore) {
    let (data, grad) = p.data_and_grad_mut();
    let w = &data[s.w.offset..s.w.offset + s.w.len];
    let x = &nodes[s.x.0].value;
    let dx = if nodes[s.x.0].needs_grad {
        Some(g.of(nodes, s.x))
    } else {
        None
    };
    // The weight and bias views never overlap (distinct parameters), so split the buffer.
    let (dw, db) = match s.b {
        Some(b) if b.offset >= s.w.offset + s.w.len => {
            let (lo, hi) = grad.split_at_mut(b.offset);
            (
                &mut lo[s.w.offset..s.w.offset + s.w.len],
                Some(&mut hi[..b.len]),
            )
        }
        Some(b) => {
            let (lo, hi) = grad.split_at_mut(s.w.offset);
            (
                &mut hi[..s.w.len],
                Some(&mut lo[b.offset..b.offset + b.len]),
            )
        }
        None => (&mut grad[s.w.offset..s.w.offset + s.w.len], None),
    };
    backward_cpu(x, w, dy, s.layout, s.n, s.k, s.m, dx, dw, db);
}
