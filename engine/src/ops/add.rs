//! Residual add and broadcast parameter add.
//! `add`: `y = a + b` (same shape); backward `da += dy`, `db += dy`.
//! `add_param`: `x` viewed `(N, T)`, `y[n] = x[n] + p[0..T]` (positional / token-type
//! embeddings broadcast over the batch); backward `dx += dy`, `dp[0..T] += Σ_n dy[n]`.

use crate::error::{shape_err, Result};
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};
use rayon::prelude::*;

/// CPU forward of `add`.
pub fn forward<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    y.par_iter_mut()
        .zip(a.par_iter().zip(b.par_iter()))
        .for_each(|(o, (&x, &z))| *o = x + z);
}

/// `dst += src`, elementwise.
pub fn accumulate<T: Real>(dst: &mut [T], src: &[T]) {
    dst.par_iter_mut()
        .zip(src.par_iter())
        .for_each(|(d, &s)| *d += s);
}

/// CPU forward of `add_param`.
pub fn forward_param<T: Real>(x: &[T], p: &[T], y: &mut [T]) {
    let t = p.len();
    y.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .for_each(|(yr, xr)| {
            for i in 0..t {
                yr[i] = xr[i] + p[i];
            }
        });
}

/// CPU backward of `add_param` for the parameter: `dp += Σ_n dy[n]`.
pub fn backward_param_cpu<T: Real>(dy: &[T], dp: &mut [T]) {
    let t = dp.len();
    for row in dy.chunks_exact(t) {
        for (d, &g) in dp.iter_mut().zip(row) {
            *d += g;
        }
    }
}

pub(crate) struct Saved {
    a: Var,
    b: Var,
}

pub(crate) struct SavedParam {
    x: Var,
    p: ParamView,
}

impl Tape {
    /// `a + b`, same shapes.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.check_var("add", a)?;
        self.check_var("add", b)?;
        if self.shape(a) != self.shape(b) {
            return shape_err("add", format!("{:?} + {:?}", self.shape(a), self.shape(b)));
        }
        self.dispatch("add")?;
        let mut y = vec![0.0f32; self.value(a).len()];
        forward(self.value(a), self.value(b), &mut y);
        let ng = self.needs_grad(a) || self.needs_grad(b);
        let shape = self.shape(a).to_vec();
        Ok(self.push(y, shape, ng, Op::Add(Saved { a, b })))
    }

    /// `x + p` with the parameter range `p` (T elements) broadcast over `x` viewed `(N, T)`.
    pub fn add_param(&mut self, params: &ParamStore, x: Var, p: ParamView) -> Result<Var> {
        self.check_var("add_param", x)?;
        let n = self.value(x).len();
        if p.len == 0 || !n.is_multiple_of(p.len) {
            return shape_err(
                "add_param",
                format!(
                    "x {:?} is not a whole number of {}-element rows",
                    self.shape(x),
                    p.len
                ),
            );
        }
        self.dispatch("add_param")?;
        let mut y = vec![0.0f32; n];
        forward_param(self.value(x), params.slice(p), &mut y);
        let shape = self.shape(x).to_vec();
        Ok(self.push(y, shape, true, Op::AddParam(SavedParam { x, p })))
    }
}

pub(crate) fn backward(s: &Saved, dy: Vec<f32>, nodes: &[Node], g: &mut Grads) {
    match (nodes[s.a.0].needs_grad, nodes[s.b.0].needs_grad) {
        (true, true) => {
            g.add_slice(s.a, &dy);
            g.add(s.b, dy);
        }
        (true, false) => g.add(s.a, dy),
        (false, true) => g.add(s.b, dy),
        (false, false) => {}
    }
}

pub(crate) fn backward_param(
    s: &SavedParam,
    dy: Vec<f32>,
    nodes: &[Node],
    g: &mut Grads,
    p: &mut ParamStore,
) {
    backward_param_cpu(&dy, &mut p.grad_mut()[s.p.offset..s.p.offset + s.p.len]);
    if nodes[s.x.0].needs_grad {
        g.add(s.x, dy);
    }
}
