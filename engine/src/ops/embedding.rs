//! Embedding lookup: `ids (N)`, table `E (V, D)` → `y (N, D)`, `y[n] = E[ids[n]]`.
//! Backward: `dE[ids[n]] += dy[n]` (a scatter-add: repeated ids accumulate).

use crate::error::{shape_err, EngineError, Result};
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Op, Tape, Var};

/// CPU forward.
pub fn forward<T: Real>(ids: &[u32], table: &[T], d: usize, y: &mut [T]) {
    for (row, &id) in y.chunks_exact_mut(d).zip(ids) {
        let s = id as usize * d;
        row.copy_from_slice(&table[s..s + d]);
    }
}

/// CPU backward (sequential: repeated ids would race in parallel).
pub fn backward_cpu<T: Real>(ids: &[u32], dy: &[T], d: usize, dtable: &mut [T]) {
    for (row, &id) in dy.chunks_exact(d).zip(ids) {
        let s = id as usize * d;
        for (t, &g) in dtable[s..s + d].iter_mut().zip(row) {
            *t += g;
        }
    }
}

pub(crate) struct Saved {
    ids: Vec<u32>,
    table: ParamView,
    d: usize,
}

impl Tape {
    /// Looks up rows of the `(V, D)` table `table` for `ids`, shaped `out_shape` (… , D).
    pub fn embedding(
        &mut self,
        params: &ParamStore,
        ids: &[u32],
        table: ParamView,
        d: usize,
        out_shape: &[usize],
    ) -> Result<Var> {
        if d == 0
            || !table.len.is_multiple_of(d)
            || out_shape.iter().product::<usize>() != ids.len() * d
        {
            return shape_err(
                "embedding",
                format!(
                    "{} ids, width {d}, table {} elements, out {out_shape:?}",
                    ids.len(),
                    table.len
                ),
            );
        }
        let v = table.len / d;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(EngineError::Input(format!(
                "embedding: id {id} at position {i} is outside the vocabulary of {v}"
            )));
        }
        self.dispatch("embedding")?;
        let mut y = vec![0.0f32; ids.len() * d];
        forward(ids, params.slice(table), d, &mut y);
        let s = Saved {
            ids: ids.to_vec(),
            table,
            d,
        };
        Ok(self.push(y, out_shape.to_vec(), true, Op::Embedding(s)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], p: &mut ParamStore) {
    let g = &mut p.grad_mut()[s.table.offset..s.table.offset + s.table.len];
    backward_cpu(&s.ids, dy, s.d, g);
}
