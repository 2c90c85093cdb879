//! Inverted dropout with a caller-drawn mask: `y = x · m`, where `m` holds `0` for dropped
//! elements and `1/(1−p)` for kept ones (so evaluation needs no rescaling). The caller draws the
//! mask from its own seeded generator, which keeps runs reproducible. Backward: `dx += dy · m`.

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward, elementwise.
pub fn forward<T: Real>(x: &[T], m: &[T], y: &mut [T]) {
    for ((o, &v), &k) in y.iter_mut().zip(x).zip(m) {
        *o = v * k;
    }
}

/// CPU backward, elementwise, accumulated into `dx`.
pub fn backward_cpu<T: Real>(m: &[T], dy: &[T], dx: &mut [T]) {
    for ((d, &k), &g) in dx.iter_mut().zip(m).zip(dy) {
        *d += g * k;
    }
}

pub(crate) struct Saved {
    x: Var,
    mask: Vec<f32>,
}

impl Tape {
    /// `x · mask`, elementwise; `mask` has one scale per element of `x`.
    pub fn dropout(&mut self, x: Var, mask: Vec<f32>) -> Result<Var> {
        self.check_var("dropout", x)?;
        if mask.len() != self.value(x).len() {
            return shape_err(
                "dropout",
                format!("mask of {} for x {:?}", mask.len(), self.shape(x)),
            );
        }
        self.dispatch("dropout")?;
        let mut y = vec![0.0f32; mask.len()];
        forward(self.value(x), &mask, &mut y);
        let (shape, ng) = (self.shape(x).to_vec(), self.needs_grad(x));
        Ok(self.push(y, shape, ng, Op::Dropout(Saved { x, mask })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(&s.mask, dy, g.of(nodes, s.x));
    }
}
