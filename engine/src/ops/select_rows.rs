//! Token pooling: pick one row per batch item. `x (B, L, D)`, `rows (B)` → `y (B, D)`,
//! `y[b] = x[b, rows[b]]` (class token: row 0; end-of-text: the last valid position).
//! Backward: `dx[b, rows[b]] += dy[b]`.

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward.
pub fn forward<T: Real>(x: &[T], rows: &[usize], l: usize, d: usize, y: &mut [T]) {
    for (b, (yr, &r)) in y.chunks_exact_mut(d).zip(rows).enumerate() {
        let s = (b * l + r) * d;
        yr.copy_from_slice(&x[s..s + d]);
    }
}

/// CPU backward.
pub fn backward_cpu<T: Real>(dy: &[T], rows: &[usize], l: usize, d: usize, dx: &mut [T]) {
    for (b, (gr, &r)) in dy.chunks_exact(d).zip(rows).enumerate() {
        let s = (b * l + r) * d;
        for (o, &g) in dx[s..s + d].iter_mut().zip(gr) {
            *o += g;
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    rows: Vec<usize>,
    l: usize,
    d: usize,
}

impl Tape {
    /// Row `rows[b]` of each `x[b]` for `x (B, L, D)` → `(B, D)`.
    pub fn select_rows(&mut self, x: Var, rows: &[usize]) -> Result<Var> {
        self.check_var("select_rows", x)?;
        let s = self.shape(x).to_vec();
        if s.len() != 3 || rows.len() != s[0] || rows.iter().any(|&r| r >= s[1]) {
            return shape_err("select_rows", format!("x {s:?} with rows {rows:?}"));
        }
        self.dispatch("select_rows")?;
        let (b, l, d) = (s[0], s[1], s[2]);
        let mut y = vec![0.0f32; b * d];
        forward(self.value(x), rows, l, d, &mut y);
        let ng = self.needs_grad(x);
        let saved = Saved {
            x,
            rows: rows.to_vec(),
            l,
            d,
        };
        Ok(self.push(y, vec![b, d], ng, Op::SelectRows(saved)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        backward_cpu(dy, &s.rows, s.l, s.d, g.of(nodes, s.x));
    }
}
