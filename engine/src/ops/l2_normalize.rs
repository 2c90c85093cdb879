//! Row-wise L2 normalisation: `y = x / max(‖x‖, ε)` over the last dimension (ε = 1e-12, as
//! `F.normalize`).
//! Backward (for ‖x‖ > ε): `dx += (dy − y (y·dy)) / ‖x‖`.

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

const EPS: f64 = 1e-12;

/// CPU forward; row norms into `norms (N)`.
pub fn forward<T: Real>(x: &[T], d: usize, y: &mut [T], norms: &mut [T]) {
    for ((yr, xr), n) in y
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(norms.iter_mut())
    {
        let mut s = T::zero();
        for &v in xr {
            s += v * v;
        }
        let nv = s.sqrt().max(T::from_f64(EPS));
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v / nv;
        }
        *n = nv;
    }
}

/// CPU backward from the output `y` and the norms.
pub fn backward_cpu<T: Real>(y: &[T], norms: &[T], dy: &[T], d: usize, dx: &mut [T]) {
    for (((dxr, yr), gr), &n) in dx
        .chunks_exact_mut(d)
        .zip(y.chunks_exact(d))
        .zip(dy.chunks_exact(d))
        .zip(norms)
    {
        let clamped = n <= T::from_f64(EPS);
        let mut dot = T::zero();
        for i in 0..d {
            dot += yr[i] * gr[i];
        }
        for i in 0..d {
            // Below ε the op is x/ε, a plain scaling.
            let proj = if clamped { T::zero() } else { yr[i] * dot };
            dxr[i] += (gr[i] - proj) / n;
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    d: usize,
    norms: Vec<f32>,
}

impl Tape {
    /// L2-normalises the rows of `x (..., D)`.
    pub fn l2_normalize(&mut self, x: Var) -> Result<Var> {
        self.check_var("l2_normalize", x)?;
        let shape = self.shape(x).to_vec();
        let d = *shape.last().unwrap_or(&0);
        if d == 0 {
            return shape_err("l2_normalize", format!("x {shape:?}"));
        }
        self.dispatch("l2_normalize")?;
        let n = self.value(x).len() / d;
        let (mut y, mut norms) = (vec![0.0f32; n * d], vec![0.0f32; n]);
        forward(self.value(x), d, &mut y, &mut norms);
        let ng = self.needs_grad(x);
        Ok(self.push(y, shape, ng, Op::L2Normalize(Saved { x, d, norms })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], y: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(y, &s.norms, dy, s.d, g.of(nodes, s.x));
    }
}
