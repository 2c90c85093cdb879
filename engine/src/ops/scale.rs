//! Scaling. `scale`: `y = c · x` for a constant c (backward `dx += c · dy`).
//! `scale_exp`: `y = e^s · x` for a scalar parameter s (CLIP's logit scale);
//! backward `dx += e^s dy`, `ds += Σ dy ∘ y`.

use crate::error::{shape_err, Result};
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward.
pub fn forward<T: Real>(x: &[T], c: T, y: &mut [T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = c * v;
    }
}

/// CPU backward for the input: `dx += c · dy`.
pub fn backward_cpu<T: Real>(dy: &[T], c: T, dx: &mut [T]) {
    for (d, &g) in dx.iter_mut().zip(dy) {
        *d += c * g;
    }
}

/// CPU backward of `scale_exp` for the parameter: `Σ dy ∘ y`.
pub fn backward_exp_param<T: Real>(dy: &[T], y: &[T]) -> T {
    let mut s = T::zero();
    for (&g, &v) in dy.iter().zip(y) {
        s += g * v;
    }
    s
}

pub(crate) struct Saved {
    x: Var,
    c: f32,
}

pub(crate) struct SavedExp {
    x: Var,
    s: ParamView,
    c: f32,
}

impl Tape {
    /// `c · x`.
    pub fn scale(&mut self, x: Var, c: f32) -> Result<Var> {
        self.check_var("scale", x)?;
        self.dispatch("scale")?;
        let mut y = vec![0.0f32; self.value(x).len()];
        forward(self.value(x), c, &mut y);
        let (shape, ng) = (self.shape(x).to_vec(), self.needs_grad(x));
        Ok(self.push(y, shape, ng, Op::Scale(Saved { x, c })))
    }

    /// `exp(s) · x` for a one-element parameter `s`.
    pub fn scale_exp(&mut self, params: &ParamStore, x: Var, s: ParamView) -> Result<Var> {
        self.check_var("scale_exp", x)?;
        if s.len != 1 {
            return shape_err(
                "scale_exp",
                format!("scale parameter has {} elements", s.len),
            );
        }
        self.dispatch("scale_exp")?;
        let c = params.slice(s)[0].exp();
        let mut y = vec![0.0f32; self.value(x).len()];
        forward(self.value(x), c, &mut y);
        let shape = self.shape(x).to_vec();
        Ok(self.push(y, shape, true, Op::ScaleExp(SavedExp { x, s, c })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(dy, s.c, g.of(nodes, s.x));
    }
}

pub(crate) fn backward_exp(
    s: &SavedExp,
    dy: &[f32],
    y: &[f32],
    nodes: &[Node],
    g: &mut Grads,
    p: &mut ParamStore,
) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(dy, s.c, g.of(nodes, s.x));
    }
    p.grad_mut()[s.s.offset] += backward_exp_param(dy, y);
}
