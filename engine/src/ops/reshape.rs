//! Shape ops. `reshape`: same elements, new shape (backward: `dx += dy`).
//! `transpose`: `x (M, N)` → `y (N, M)`, `y[j, i] = x[i, j]` (backward: `dx += dyᵀ`).

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU transpose of a row-major `(m, n)` matrix into `y (n, m)`, accumulating when asked.
pub fn transpose<T: Real>(x: &[T], m: usize, n: usize, y: &mut [T], accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            if accumulate {
                y[j * m + i] += x[i * n + j];
            } else {
                y[j * m + i] = x[i * n + j];
            }
        }
    }
}

pub(crate) struct Saved {
    x: Var,
}

pub(crate) struct SavedT {
    x: Var,
    m: usize,
    n: usize,
}

impl Tape {
    /// Same values, new shape (element counts must match).
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        self.check_var("reshape", x)?;
        if shape.iter().product::<usize>() != self.value(x).len() {
            return shape_err("reshape", format!("{:?} → {shape:?}", self.shape(x)));
        }
        self.dispatch("reshape")?;
        let y = self.value(x).to_vec();
        let ng = self.needs_grad(x);
        Ok(self.push(y, shape.to_vec(), ng, Op::Reshape(Saved { x })))
    }

    /// Transpose of a 2-D `x (M, N)`.
    pub fn transpose(&mut self, x: Var) -> Result<Var> {
        self.check_var("transpose", x)?;
        let s = self.shape(x).to_vec();
        if s.len() != 2 {
            return shape_err("transpose", format!("expects 2-D, got {s:?}"));
        }
        self.dispatch("transpose")?;
        let (m, n) = (s[0], s[1]);
        let mut y = vec![0.0f32; m * n];
        transpose(self.value(x), m, n, &mut y, false);
        let ng = self.needs_grad(x);
        Ok(self.push(y, vec![n, m], ng, Op::Transpose(SavedT { x, m, n })))
    }
}

pub(crate) fn backward(s: &Saved, dy: Vec<f32>, nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        g.add(s.x, dy);
    }
}

pub(crate) fn backward_t(s: &SavedT, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        transpose(dy, s.n, s.m, g.of(nodes, s.x), true);
    }
}
