//! Packing the valid tokens of a padded batch into consecutive rows.
//!
//! `pack_rows`: `x (N, D)` (leading dims flattened), `idx (T)` distinct rows → `y (T, D)`,
//! `y[i] = x[idx[i]]`; backward `dx[idx[i]] += dy[i]`.
//!
//! Token pooling is `pack_rows` of one row per sequence (the class token, the end of text).
//! The text tower runs its blocks on the packed rows only (the attention through
//! [`Tape::attention_packed`]), so a caption pays for its own tokens and not for the padding up
//! to the batch's longest.

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU gather: `y[i] = x[idx[i]]`, rows of `d`.
pub fn gather<T: Real>(x: &[T], idx: &[usize], d: usize, y: &mut [T]) {
    for (yr, &r) in y.chunks_exact_mut(d).zip(idx) {
        yr.copy_from_slice(&x[r * d..(r + 1) * d]);
    }
}

/// CPU scatter-add: `y[idx[i]] += x[i]`, rows of `d`.
pub fn scatter_add<T: Real>(x: &[T], idx: &[usize], d: usize, y: &mut [T]) {
    for (xr, &r) in x.chunks_exact(d).zip(idx) {
        for (o, &v) in y[r * d..(r + 1) * d].iter_mut().zip(xr) {
            *o += v;
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    idx: Vec<usize>,
    d: usize,
}

impl Tape {
    fn check_rows(&self, what: &'static str, x: Var, idx: &[usize], rows: usize) -> Result<()> {
        let mut seen = vec![false; rows];
        for &r in idx {
            if r >= rows || std::mem::replace(&mut seen[r], true) {
                return shape_err(
                    what,
                    format!(
                        "row {r} of {rows} is out of range or repeated (x {:?})",
                        self.shape(x)
                    ),
                );
            }
        }
        Ok(())
    }

    /// Rows `idx` of `x (…, D)` (leading dims flattened, distinct rows) → `(idx.len(), D)`.
    pub fn pack_rows(&mut self, x: Var, idx: &[usize]) -> Result<Var> {
        self.check_var("pack_rows", x)?;
        let d = *self.shape(x).last().unwrap_or(&0);
        if d == 0 {
            return shape_err("pack_rows", format!("x {:?}", self.shape(x)));
        }
        let n = self.value(x).len() / d;
        self.check_rows("pack_rows", x, idx, n)?;
        self.dispatch("pack_rows")?;
        let mut y = vec![0.0f32; idx.len() * d];
        gather(self.value(x), idx, d, &mut y);
        let ng = self.needs_grad(x);
        let saved = Saved {
            x,
            idx: idx.to_vec(),
            d,
        };
        Ok(self.push(y, vec![idx.len(), d], ng, Op::PackRows(saved)))
    }
}

pub(crate) fn backward_pack(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.x.0].needs_grad {
        scatter_add(dy, &s.idx, s.d, g.of(nodes, s.x));
    }
}

#[cfg(test)]
mod tests {
    use crate::params::ParamStore;
    use crate::tape::Tape;

    #[test]
    fn pack_keeps_the_rows_and_scatters_their_gradient_back() {
        let mut t = Tape::new();
        let x = t
            .input((1..=12).map(|v| v as f32).collect(), &[2, 3, 2])
            .unwrap();
        let p = t.pack_rows(x, &[1, 3, 4]).unwrap();
        assert_eq!(t.shape(p), &[3, 2]);
        assert_eq!(t.value(p), &[3.0, 4.0, 7.0, 8.0, 9.0, 10.0]);
        let seed: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let mut ps = ParamStore::new();
        let dx = t.backward_collect(&mut ps, &[(p, &seed)], &[x]).unwrap();
        assert_eq!(
            dx[0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]
        );
    }

    #[test]
    fn bad_rows_are_errors() {
        let mut t = Tape::new();
        let x = t.input(vec![0.0; 8], &[4, 2]).unwrap();
        assert!(t.pack_rows(x, &[0, 4]).is_err());
        assert!(t.pack_rows(x, &[1, 1]).is_err());
        t.pack_rows(x, &[2, 0]).unwrap();
    }
}
