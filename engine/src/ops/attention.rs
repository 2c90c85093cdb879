//! Fused multi-head self-attention core (after the QKV projection, before the output one).
//!
//! Input `qkv (B, L, 3W)` packed as `[Q | K | V]` along the last axis, each split into `H` heads
//! of width `d = W/H` (open_clip `in_proj` and BERT query/key/value order). Output `o (B, L, W)`.
//! Or packed sequences (`AttnSpec::packed`): `qkv (T, 3W)` holds the B sequences' tokens back
//! to back, `lengths[b]` rows each, and `o` is `(T, W)`; no row is padding, so no work is.
//! Per batch `b` and head `h`:
//!   `S = Q Kᵀ / √d + M` (L, L), where `M` is −∞ at keys `j ≥ len[b]` (key padding) and at
//!   `j > i` (causal);  `P = softmax_rows(S)`;  `O = P V`.
//! A row whose keys are all masked has `P = 0` and output zero (never NaN).
//! Backward (P saved, `(B, H, L, L)`):
//!   `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dP ∘ P))`,
//!   `dQ = dS K / √d`, `dK = dSᵀ Q / √d`.
//! Work is parallel over the batch; each batch item owns its slab of `o`, `P` and `dqkv`, so
//! there are no write races. Keys and values past a sequence's length are never read (a masked
//! probability is exactly 0, but 0 · NaN is NaN), and the products skip them.

use crate::error::{shape_err, EngineError, Result};
use crate::ops::matmul::{gemm, Mat};
use crate::real::Real;
use crate::simd::wide;
use crate::tape::{Grads, Node, Op, Tape, Var};
use rayon::prelude::*;

/// Attention geometry and masking.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    /// Batch size B.
    pub batch: usize,
    /// Sequence length L.
    pub len: usize,
    /// Number of heads H.
    pub heads: usize,
    /// Model width W (= H · d).
    pub width: usize,
    /// Valid keys per batch item (key-padding mask); `None` = all L keys valid.
    pub lengths: Option<Vec<usize>>,
    /// Mask keys after the query position.
    pub causal: bool,
    /// The sequences lie back to back, `lengths[b]` rows each (at most `len`), instead of `len`
    /// rows each.
    pub packed: bool,
}

/// One sequence's rows of `qkv`, `o` and `dqkv`, and its block of the saved probabilities.
struct Slab {
    row0: usize,
    rows: usize,
    valid: usize,
    /// First element of its `(H, rows, rows)` probabilities.
    p0: usize,
}

impl AttnSpec {
    fn valid(&self, b: usize) -> usize {
        self.lengths
            .as_ref()
            .map_or(self.len, |l| l[b].min(self.len))
    }

    /// Rows of `qkv` and `o`: B·L, or the sum of the lengths when packed.
    pub fn rows(&self) -> usize {
        if self.packed {
            (0..self.batch).map(|b| self.valid(b)).sum()
        } else {
            self.batch * self.len
        }
    }

    /// Elements of the saved probabilities: `(B, H, L, L)`, or `(H, n, n)` per sequence of
    /// n rows when packed.
    pub fn probs_len(&self) -> usize {
        self.slabs()
            .iter()
            .map(|s| self.heads * s.rows * s.rows)
            .sum()
    }

    fn slabs(&self) -> Vec<Slab> {
        let (mut row0, mut p0) = (0, 0);
        (0..self.batch)
            .map(|b| {
                let valid = self.valid(b);
                let rows = if self.packed { valid } else { self.len };
                let s = Slab {
                    row0,
                    rows,
                    valid,
                    p0,
                };
                row0 += rows;
                p0 += self.heads * rows * rows;
                s
            })
            .collect()
    }
}

/// Splits `buf` into consecutive disjoint pieces of `sizes` elements (each sequence's own
/// rows, so the sequences run in parallel without write races).
fn split_mut<T>(mut buf: &mut [T], sizes: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in sizes {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = tail;
    }
    out
}

/// Softmax of the masked, scaled score rows of one (batch, head) in place. The exponentials
/// and the sum are separate loops so that the first vectorises (the sum keeps its order).
#[inline(always)]
fn softmax_rows<T: Real>(p: &mut [T], l: usize, valid: usize, causal: bool, scale: T) {
    for i in 0..l {
        let row = &mut p[i * l..(i + 1) * l];
        let end = if causal { valid.min(i + 1) } else { valid };
        if end == 0 {
            row.iter_mut().for_each(|v| *v = T::zero());
            continue;
        }
        let mut mx = row[0] * scale;
        for v in &row[..end] {
            mx = mx.max(*v * scale);
        }
        for v in &mut row[..end] {
            *v = (*v * scale - mx).exp();
        }
        let mut sum = T::zero();
        for v in &row[..end] {
            sum += *v;
        }
        let inv = T::one() / sum;
        for v in &mut row[..end] {
            *v *= inv;
        }
        row[end..].iter_mut().for_each(|v| *v = T::zero());
    }
}

/// CPU forward. `probs` (`AttnSpec::probs_len`) receives P when given (training); otherwise a
/// scratch buffer per sequence is used.
pub fn forward<T: Real>(qkv: &[T], spec: &AttnSpec, out: &mut [T], probs: Option<&mut [T]>) {
    let (w, h) = (spec.width, spec.heads);
    let d = w / h;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    let slabs = spec.slabs();
    let body = |sl: &Slab, ob: &mut [T], pb: &mut [T], per_head: bool| {
        let (l, valid) = (sl.rows, sl.valid);
        if l == 0 {
            return; // a packed sequence of no tokens
        }
        let xb = &qkv[sl.row0 * 3 * w..(sl.row0 + l) * 3 * w];
        for hd in 0..h {
            let p = if per_head {
                &mut pb[hd * l * l..(hd + 1) * l * l]
            } else {
                &mut pb[..]
            };
            let q = Mat {
                data: &xb[hd * d..],
                rs: 3 * w,
                cs: 1,
            };
            let kt = Mat {
                data: &xb[w + hd * d..],
                rs: 1,
                cs: 3 * w,
            };
            // Scores of the valid keys only; softmax_rows zeroes the columns past them.
            gemm(l, valid, d, p, l, q, kt, false, false);
            wide(
                #[inline(always)]
                || softmax_rows(p, l, valid, spec.causal, scale),
            );
            let v = Mat {
                data: &xb[2 * w + hd * d..],
                rs: 3 * w,
                cs: 1,
            };
            gemm(
                l,
                d,
                valid,
                &mut ob[hd * d..],
                w,
                Mat::rm(p, l),
                v,
                false,
                false,
            );
        }
    };
    let outs = split_mut(out, slabs.iter().map(|s| s.rows * w));
    match probs {
        Some(pr) => {
            let ps = split_mut(pr, slabs.iter().map(|s| h * s.rows * s.rows));
            outs.into_par_iter()
                .zip(ps)
                .zip(&slabs)
                .for_each(|((ob, pb), sl)| body(sl, ob, pb, true))
        }
        None => outs.into_par_iter().zip(&slabs).for_each(|(ob, sl)| {
            let mut scratch = vec![T::zero(); sl.rows * sl.rows];
            body(sl, ob, &mut scratch, false)
        }),
    }
}

/// CPU backward: accumulates into `dqkv` (the shape of `qkv`).
pub fn backward_cpu<T: Real>(qkv: &[T], probs: &[T], dout: &[T], spec: &AttnSpec, dqkv: &mut [T]) {
    let (w, h) = (spec.width, spec.heads);
    let d = w / h;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    let slabs = spec.slabs();
    split_mut(dqkv, slabs.iter().map(|s| s.rows * 3 * w))
        .into_par_iter()
        .zip(&slabs)
        .for_each(|(dxb, sl)| {
            let (l, valid) = (sl.rows, sl.valid);
            if l == 0 {
                return;
            }
            let xb = &qkv[sl.row0 * 3 * w..(sl.row0 + l) * 3 * w];
            let dob = &dout[sl.row0 * w..(sl.row0 + l) * w];
            let mut ds = vec![T::zero(); l * l];
            for hd in 0..h {
                let p = &probs[sl.p0 + hd * l * l..sl.p0 + (hd + 1) * l * l];
                let dout_h = Mat {
                    data: &dob[hd * d..],
                    rs: w,
                    cs: 1,
                };
                // dV (valid, d) += Pᵀ dO; a padded key's gradients stay zero.
                gemm(
                    valid,
                    d,
                    l,
                    &mut dxb[2 * w + hd * d..],
                    3 * w,
                    Mat::rm_t(p, l),
                    dout_h,
                    true,
                    false,
                );
                // dP (L, valid) = dO Vᵀ
                let vt = Mat {
                    data: &xb[2 * w + hd * d..],
                    rs: 1,
                    cs: 3 * w,
                };
                gemm(l, valid, d, &mut ds, l, dout_h, vt, false, false);
                // dS = P ∘ (dP − rowsum(dP ∘ P)), with the 1/√d of S folded in.
                for i in 0..l {
                    let (pr, dr) = (&p[i * l..i * l + valid], &mut ds[i * l..i * l + valid]);
                    let mut dot = T::zero();
                    for j in 0..valid {
                        dot += pr[j] * dr[j];
                    }
                    for j in 0..valid {
                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                    }
                }
                // dQ (L, d) += dS K ;  dK (L, d) += dSᵀ Q
                let k = Mat {
                    data: &xb[w + hd * d..],
                    rs: 3 * w,
                    cs: 1,
                };
                gemm(
                    l,
                    d,
                    valid,
                    &mut dxb[hd * d..],
                    3 * w,
                    Mat::rm(&ds, l),
                    k,
                    true,
                    false,
                );
                let q = Mat {
                    data: &xb[hd * d..],
                    rs: 3 * w,
                    cs: 1,
                };
                gemm(
                    valid,
                    d,
                    l,
                    &mut dxb[w + hd * d..],
                    3 * w,
                    Mat::rm_t(&ds, l),
                    q,
                    true,
                    false,
                );
            }
        });
}

pub(crate) struct Saved {
    qkv: Var,
    spec: AttnSpec,
    probs: Vec<f32>,
}

impl Saved {
    pub(crate) fn bytes(&self) -> usize {
        self.probs.len() * 4
    }
}

impl Tape {
    /// Multi-head attention over `qkv (B, L, 3W)` → `(B, L, W)`. `lengths` (one per batch
    /// item, at most L) masks padded keys; `causal` masks future keys.
    pub fn attention(
        &mut self,
        qkv: Var,
        heads: usize,
        lengths: Option<&[usize]>,
        causal: bool,
    ) -> Result<Var> {
        self.check_var("attention", qkv)?;
        let s = self.shape(qkv).to_vec();
        if s.len() != 3 {
            return shape_err("attention", format!("qkv must be (B, L, 3W), got {s:?}"));
        }
        if let Some(lens) = lengths {
            if lens.len() != s[0] {
                return Err(EngineError::Input(format!(
                    "attention: {} lengths for a batch of {}",
                    lens.len(),
                    s[0]
                )));
            }
        }
        let spec = AttnSpec {
            batch: s[0],
            len: s[1],
            heads,
            width: s[2] / 3,
            lengths: lengths.map(|l| l.to_vec()),
            causal,
            packed: false,
        };
        self.attention_of(qkv, s[2], spec)
    }

    /// Multi-head attention over packed sequences: `qkv (T, 3W)` holds sequence b's
    /// `lengths[b]` tokens after those of the sequences before it (T = Σ lengths) → `(T, W)`.
    /// The same result, row for row, as [`Tape::attention`] on the padded batch, without the
    /// padding's rows or work.
    pub fn attention_packed(
        &mut self,
        qkv: Var,
        heads: usize,
        lengths: &[usize],
        causal: bool,
    ) -> Result<Var> {
        self.check_var("attention_packed", qkv)?;
        let s = self.shape(qkv).to_vec();
        let total: usize = lengths.iter().sum();
        if s.len() != 2 || s[0] != total || lengths.is_empty() {
            return shape_err(
                "attention_packed",
                format!(
                    "qkv must be (T, 3W) with T = {total}, the sum of {} lengths, got {s:?}",
                    lengths.len()
                ),
            );
        }
        let spec = AttnSpec {
            batch: lengths.len(),
            len: lengths.iter().copied().max().unwrap_or(0),
            heads,
            width: s[1] / 3,
            lengths: Some(lengths.to_vec()),
            causal,
            packed: true,
        };
        self.attention_of(qkv, s[1], spec)
    }

    /// Checks the heads against the `3W` columns, runs the forward and records the op.
    fn attention_of(&mut self, qkv: Var, cols: usize, spec: AttnSpec) -> Result<Var> {
        let heads = spec.heads;
        if !cols.is_multiple_of(3) || heads == 0 || !(cols / 3).is_multiple_of(heads) {
            return shape_err(
                "attention",
                format!("{cols} qkv columns are not 3W with W divisible by {heads} heads"),
            );
        }
        self.dispatch("attention")?;
        let rows = spec.rows();
        let mut out = vec![0.0f32; rows * spec.width];
        let record = self.is_recording();
        let mut probs = if record {
            vec![0.0f32; spec.probs_len()]
        } else {
            Vec::new()
        };
        forward(
            self.value(qkv),
            &spec,
            &mut out,
            record.then_some(&mut probs[..]),
        );
        let shape = if spec.packed {
            vec![rows, spec.width]
        } else {
            vec![spec.batch, spec.len, spec.width]
        };
        let ng = self.needs_grad(qkv);
        Ok(self.push(out, shape, ng, Op::Attention(Saved { qkv, spec, probs })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.qkv.0].needs_grad {
        let x = &nodes[s.qkv.0].value;
        backward_cpu(x, &s.probs, dy, &s.spec, g.of(nodes, s.qkv));
    }
}
