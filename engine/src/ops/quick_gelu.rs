//! QuickGELU (OpenAI CLIP): `y = x · σ(1.702 x)`.
//! Backward: `dx += dy · (σ + 1.702 x σ (1 − σ))`.

use crate::error::Result;
use crate::real::Real;
use crate::simd::wide;
use crate::tape::{Grads, Node, Op, Tape, Var};
use rayon::prelude::*;

const CHUNK: usize = 4096;
const A: f64 = 1.702;

#[inline(always)]
fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
}

/// CPU forward, elementwise.
pub fn forward<T: Real>(x: &[T], y: &mut [T]) {
    let a = T::from_f64(A);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            wide(
                #[inline(always)]
                || {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = v * sigmoid(a * v);
                    }
                },
            )
        });
}

/// CPU backward, elementwise, accumulated into `dx`.
pub fn backward_cpu<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    let a = T::from_f64(A);
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| {
            wide(
                #[inline(always)]
                || {
                    for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        let s = sigmoid(a * v);
                        *d += g * (s + a * v * s * (T::one() - s));
                    }
                },
            )
        });
}

pub(crate) struct Saved {
    x: Var,
}

impl Tape {
    /// QuickGELU, elementwise.
    pub fn quick_gelu(&mut self, x: Var) -> Result<Var> {
        self.check_var("quick_gelu", x)?;
        self.dispatch("quick_gelu")?;
        let mut y = vec![0.0f32; self.value(x).len()];
        forward(self.value(x), &mut y);
        let (shape, ng) = (self.shape(x).to_vec(), self.needs_grad(x));
        Ok(self.push(y, shape, ng, Op::QuickGelu(Saved { x })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(&nodes[s.x.0].value, dy, g.of(nodes, s.x));
    }
}
