//! Reductions to a scalar: `sum(x)` and `mean(x)` over all elements → `[1]`.
//! Backward: `dx += dy` (sum) or `dx += dy / n` (mean).

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// Which reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Σ x.
    Sum,
    /// Σ x / n.
    Mean,
}

/// CPU forward.
pub fn forward<T: Real>(x: &[T], r: Reduction) -> T {
    let mut s = T::zero();
    for &v in x {
        s += v;
    }
    match r {
        Reduction::Sum => s,
        Reduction::Mean => s / T::from_f64(x.len() as f64),
    }
}

/// CPU backward.
pub fn backward_cpu<T: Real>(dy: T, r: Reduction, dx: &mut [T]) {
    let g = match r {
        Reduction::Sum => dy,
        Reduction::Mean => dy / T::from_f64(dx.len() as f64),
    };
    dx.iter_mut().for_each(|d| *d += g);
}

pub(crate) struct Saved {
    x: Var,
    r: Reduction,
}

impl Tape {
    /// Sum or mean of all elements of `x`; a scalar `[1]`.
    pub fn reduce(&mut self, x: Var, r: Reduction) -> Result<Var> {
        self.check_var("reduce", x)?;
        if self.value(x).is_empty() {
            return shape_err("reduce", "empty input");
        }
        self.dispatch("reduce")?;
        let v = forward(self.value(x), r);
        let ng = self.needs_grad(x);
        Ok(self.push(vec![v], vec![1], ng, Op::Reduce(Saved { x, r })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(dy[0], s.r, g.of(nodes, s.x));
    }
}
