//! GELU (exact, erf form, as BERT uses): `y = x · Φ(x) = ½ x (1 + erf(x/√2))`.
//! Backward: `dx += dy · (Φ(x) + x · φ(x))`, `φ(x) = exp(−x²/2)/√(2π)`.

use crate::error::Result;
use crate::real::Real;
use crate::simd::wide;
use crate::tape::{Grads, Node, Op, Tape, Var};
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// CPU forward, elementwise.
pub fn forward<T: Real>(x: &[T], y: &mut [T]) {
    let h = T::from_f64(0.5);
    let s = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            wide(
                #[inline(always)]
                || {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = h * v * (T::one() + (v * s).erf());
                    }
                },
            )
        });
}

/// CPU backward, elementwise, accumulated into `dx`.
pub fn backward_cpu<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| {
            wide(
                #[inline(always)]
                || {
                    for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        let (cdf, pdf) = v.normal_cdf_pdf();
                        *d += g * (cdf + v * pdf);
                    }
                },
            )
        });
}

pub(crate) struct Saved {
    x: Var,
}

impl Tape {
    /// Exact GELU, elementwise.
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.check_var("gelu", x)?;
        self.dispatch("gelu")?;
        let mut y = vec![0.0f32; self.value(x).len()];
        forward(self.value(x), &mut y);
        let (shape, ng) = (self.shape(x).to_vec(), self.needs_grad(x));
        Ok(self.push(y, shape, ng, Op::Gelu(Saved { x })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(&nodes[s.x.0].value, dy, g.of(nodes, s.x));
    }
}
