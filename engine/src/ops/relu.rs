//! ReLU: `y = max(x, 0)`. Backward: `dx += dy · [x > 0]` (the subgradient at 0 is taken as 0).

use crate::error::Result;
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward, elementwise.
pub fn forward<T: Real>(x: &[T], y: &mut [T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if v > T::zero() { v } else { T::zero() };
    }
}

/// CPU backward, elementwise, accumulated into `dx`.
pub fn backward_cpu<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        if v > T::zero() {
            *d += g;
        }
    }
}

pub(crate) struct Saved {
    x: Var,
}

impl Tape {
    /// ReLU, elementwise.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.check_var("relu", x)?;
        self.dispatch("relu")?;
        let mut y = vec![0.0f32; self.value(x).len()];
        forward(self.value(x), &mut y);
        let (shape, ng) = (self.shape(x).to_vec(), self.needs_grad(x));
        Ok(self.push(y, shape, ng, Op::Relu(Saved { x })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(&nodes[s.x.0].value, dy, g.of(nodes, s.x));
    }
}
