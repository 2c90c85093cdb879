//! Fused scaled-dot-product attention, head dim 64, forward and backward (`cuda/attention.cu`):
//! CPU reference, emulation launcher and GPU launcher with the same parameters, and their tests.
//!
//! Tensors are token-major bf16: token i of sequence b in row row0(b) + i, head h in its
//! columns h·64 .. h·64 + 64. The row pitch is free ([`AttnShape::qkv_pitch`] for q, k, v
//! and their gradients, [`AttnShape::o_pitch`] for o and do), so q, k and v can be column views
//! of one projection. `lse` and the backward's scratch `delta` are token-major (rows, H) fp32.
//!
//! Where the sequences lie. Padded (`AttnShape::varlen` = `None`): B·L rows, row0(b) = b·L,
//! L query rows each, and `seqlens` (B) the valid keys of each sequence (every key when
//! `None`). Packed ([`AttnShape::varlen`] = the number of rows): the sequences lie back to
//! back, and `seqlens` (3·B) holds their valid keys, then their first rows, then their query
//! rows (the rows past the keys are queries only: filler that rounds a packed batch up to a
//! tile); rows of no sequence are neither read nor written.
//!
//! Query row i of sequence b attends to key j when `j < kvlen(b)` and, with `causal`,
//! `j ≤ i`. A row with no key (`kvlen(b) = 0`) gets `o = 0`, `lse = −inf` and zero gradients,
//! never a NaN.
//!
//! Forward: `o = softmax(scale·q·kᵀ)·v`, `lse = log Σ exp(scale·q·kᵀ)`. Backward (from `o`,
//! `lse` and `do`): `dq`, `dk`, `dv`, each overwritten; the probabilities are recomputed from
//! `lse`, `delta = rowsum(do ∘ o)` is written to the caller's scratch first.

use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{Step, P};
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::ATTENTION;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

/// The head dimension the kernels are written for.
pub const HEAD_DIM: usize = 64;
const TILE: usize = 64;
const THREADS: u32 = 128;
/// Dynamic shared memory (`ATTN_SMEM_BYTES`, `ATTN_DQ_SMEM_BYTES`, `ATTN_DKDV_SMEM_BYTES`).
const PITCH_TILE_BYTES: u32 = (64 * 72 * 2) as u32;
const FWD_SMEM: u32 = 5 * PITCH_TILE_BYTES;
const DQ_SMEM: u32 = 4 * PITCH_TILE_BYTES;
const DKDV_SMEM: u32 = 4 * PITCH_TILE_BYTES + 4 * 64 * 4;
// The launchers do not raise the 48 KiB default limit of dynamic shared memory.
const _: () = assert!(FWD_SMEM <= 48 * 1024 && DQ_SMEM <= 48 * 1024 && DKDV_SMEM <= 48 * 1024);

/// Sizes and options of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    /// Sequences B.
    pub batch: usize,
    /// Heads per sequence H.
    pub heads: usize,
    /// Tokens per sequence L (queries and keys).
    pub len: usize,
    /// Key j is hidden from query i when j > i.
    pub causal: bool,
    /// Multiplies q·kᵀ (usually 1/√64).
    pub scale: f32,
    /// Elements from one token's row to the next in q, k, v, dq, dk and dv: H·64 when each is
    /// its own (B·L, H·64) tensor, 3·H·64 for column views of a packed (B·L, 3·H·64) one.
    pub qkv_pitch: usize,
    /// Elements from one token's row to the next in o and do.
    pub o_pitch: usize,
    /// Packed sequences of variable length in this many rows, placed by the `seqlens` table
    /// (see the module docs); `None`: B sequences of L rows.
    pub varlen: Option<usize>,
}

impl AttnShape {
    /// Separate (B·L, H·64) tensors: both pitches H·64.
    pub fn packed(batch: usize, heads: usize, len: usize, causal: bool, scale: f32) -> Self {
        AttnShape {
            batch,
            heads,
            len,
            causal,
            scale,
            qkv_pitch: heads * HEAD_DIM,
            o_pitch: heads * HEAD_DIM,
            varlen: None,
        }
    }
    /// Rows of the tensors: B·L, or the packed rows.
    pub fn total_rows(&self) -> usize {
        self.varlen.unwrap_or(self.batch * self.len)
    }
    /// Entries of the `seqlens` table: B, or 3·B when packed.
    pub fn table_len(&self) -> usize {
        if self.varlen.is_some() {
            3 * self.batch
        } else {
            self.batch
        }
    }
    fn bh(&self) -> usize {
        self.batch * self.heads
    }
    /// The head columns of a token-major tensor of row pitch `pitch`, widened, in (B·H, L, 64)
    /// order: what a comparison of two results looks at (the columns between rows are not
    /// the kernels'). Padded shapes; packed ones need their table ([`AttnShape::seq_columns`]).
    pub fn head_columns(&self, t: &[bf16], pitch: usize) -> Vec<f64> {
        Seqs::new(self, None).widen(t, pitch)
    }
    /// As [`AttnShape::head_columns`], with the `seqlens` table that places packed sequences
    /// (rows past a sequence's query rows are zeros); the table and `t` are checked.
    pub fn seq_columns(
        &self,
        t: &[bf16],
        pitch: usize,
        seqlens: Option<&[i32]>,
    ) -> Result<Vec<f64>> {
        self.validate()?;
        check_seqlens(self, seqlens)?;
        let span = (self.total_rows() - 1) * pitch + self.heads * HEAD_DIM;
        check_len("attention columns", "t", t.len(), span)?;
        Ok(Seqs::new(self, seqlens).widen(t, pitch))
    }
    /// Elements a tensor of row pitch `pitch` spans from its first element: the last row
    /// ends at its last head.
    pub fn span(&self, pitch: usize) -> usize {
        (self.total_rows() - 1) * pitch + self.heads * HEAD_DIM
    }
    fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0 && self.heads > 0 && self.len > 0 && self.total_rows() > 0,
            "attention: empty shape {self:?}"
        );
        for (name, p) in [("qkv_pitch", self.qkv_pitch), ("o_pitch", self.o_pitch)] {
            // cp.async copies 16-byte chunks of each row.
            ensure!(
                p >= self.heads * HEAD_DIM && p % 8 == 0,
                "attention: {name} {p} must be a multiple of 8 and at least H·64 = {}",
                self.heads * HEAD_DIM
            );
            Arg::int("attention pitch", p)?;
        }
        ensure!(
            self.scale.is_finite(),
            "attention: scale must be finite, got {}",
            self.scale
        );
        ensure!(
            self.bh() <= 65535,
            "attention: B·H = {} exceeds the launch grid (65535)",
            self.bh()
        );
        Arg::int("attention B·H·L·64", self.bh() * self.len * HEAD_DIM)?;
        // Row offsets are computed in 64 bits, but the table holds them as `int`.
        Arg::int("attention rows", self.total_rows())?;
        Arg::int("attention rows·H", self.total_rows() * self.heads)?;
        Ok(())
    }
    /// Entries of `lse` and `delta`: one per row and head.
    fn rows(&self) -> usize {
        self.total_rows() * self.heads
    }
    fn tiles(&self) -> LaunchShape {
        LaunchShape {
            grid: [self.len.div_ceil(TILE) as u32, self.bh() as u32, 1],
            block: [THREADS, 1, 1],
            shared_bytes: 0,
        }
    }
    fn with_smem(&self, bytes: u32) -> LaunchShape {
        LaunchShape {
            shared_bytes: bytes,
            ..self.tiles()
        }
    }
    fn tail_args(&self) -> Result<[Arg; 7]> {
        Ok([
            Arg::int("attention H", self.heads)?,
            Arg::int("attention L", self.len)?,
            Arg::int("attention qkv pitch", self.qkv_pitch)?,
            Arg::int("attention o pitch", self.o_pitch)?,
            Arg::F32(self.scale),
            Arg::I32(i32::from(self.causal)),
            Arg::I32(i32::from(self.varlen.is_some())),
        ])
    }
}

impl AttnShape {
    /// H, L, qkv pitch, o pitch, scale, causal, varlen. `validate` has checked that B·H·L·64
    /// and the pitches fit an `int`, so H and L do.
    fn tail_params(&self) -> [P; 7] {
        [
            P::I32(self.heads as i32),
            P::I32(self.len as i32),
            P::I32(self.qkv_pitch as i32),
            P::I32(self.o_pitch as i32),
            P::F32(self.scale),
            P::I32(i32::from(self.causal)),
            P::I32(i32::from(self.varlen.is_some())),
        ]
    }

    /// Packed sequences are placed by the table: a plan without one would read nothing.
    fn check_plan_table(&self, seqlens: bool) -> Result<()> {
        ensure!(
            seqlens || self.varlen.is_none(),
            "attention: packed sequences need the seqlens table"
        );
        Ok(())
    }

    /// The forward as a plan ([`crate::exec`]) over the buffer slots
    /// `[q, k, v, seqlens, o, lse]`; without `seqlens` slot 3 is passed as null. The caller
    /// guarantees the buffer lengths and the table [`attention_forward_cpu`] checks.
    pub fn forward_plan(&self, seqlens: bool) -> Result<Vec<Step>> {
        self.validate()?;
        self.check_plan_table(seqlens)?;
        let mut args = vec![
            P::Buf(0),
            P::Buf(1),
            P::Buf(2),
            if seqlens { P::Buf(3) } else { P::Null },
            P::Buf(4),
            P::Buf(5),
        ];
        args.extend(self.tail_params());
        Ok(vec![Step {
            file: &ATTENTION,
            kernel: "attn_fwd",
            shape: self.with_smem(FWD_SMEM),
            args,
        }])
    }

    /// The backward as a plan over the buffer slots
    /// `[q, k, v, o, lse, do, seqlens, dq, dk, dv, delta]` (`delta` is scratch, (rows, H)
    /// fp32); without `seqlens` slot 6 is passed as null. Same contract as
    /// [`AttnShape::forward_plan`].
    pub fn backward_plan(&self, seqlens: bool) -> Result<Vec<Step>> {
        self.validate()?;
        self.check_plan_table(seqlens)?;
        let sl = if seqlens { P::Buf(6) } else { P::Null };
        let ins = [
            P::Buf(0),
            P::Buf(1),
            P::Buf(2),
            P::Buf(5),
            P::Buf(4),
            P::Buf(10),
            sl,
        ];
        let mut dkdv = ins.to_vec();
        dkdv.extend([P::Buf(8), P::Buf(9)]);
        dkdv.extend(self.tail_params());
        // attn_bwd_dq also reads o and stores D (slot 10) for attn_bwd_dkdv.
        let mut dq = vec![
            P::Buf(0),
            P::Buf(1),
            P::Buf(2),
            P::Buf(3),
            P::Buf(5),
            P::Buf(4),
            P::Buf(10),
            sl,
            P::Buf(7),
        ];
        dq.extend(self.tail_params());
        let step = |kernel, shape, args| Step {
            file: &ATTENTION,
            kernel,
            shape,
            args,
        };
        Ok(vec![
            step("attn_bwd_dq", self.with_smem(DQ_SMEM), dq),
            step("attn_bwd_dkdv", self.with_smem(DKDV_SMEM), dkdv),
        ])
    }
}

/// Checks a host-side `seqlens` table: padded, one key count per sequence in `0..=L`; packed,
/// the key counts, first rows and query rows of sequences that lie in order, without overlap,
/// inside the rows, with `kvlen ≤ qlen ≤ L`.
fn check_seqlens(sh: &AttnShape, seqlens: Option<&[i32]>) -> Result<()> {
    let Some(s) = seqlens else {
        ensure!(
            sh.varlen.is_none(),
            "attention: packed sequences need the seqlens table"
        );
        return Ok(());
    };
    ensure!(
        s.len() == sh.table_len(),
        "attention: seqlens holds {} entries, the batch of {} sequences needs {}",
        s.len(),
        sh.batch,
        sh.table_len()
    );
    let b = sh.batch;
    let mut end = 0i64;
    for i in 0..b {
        let kv = i64::from(s[i]);
        let q = if sh.varlen.is_some() {
            i64::from(s[2 * b + i])
        } else {
            sh.len as i64
        };
        ensure!(
            (0..=q).contains(&kv),
            "attention: sequence {i} has {kv} keys, outside 0..={q}"
        );
        if sh.varlen.is_some() {
            let row0 = i64::from(s[b + i]);
            ensure!(
                q <= sh.len as i64,
                "attention: sequence {i} has {q} query rows, more than L = {}",
                sh.len
            );
            ensure!(
                row0 >= end && row0 + q <= sh.total_rows() as i64,
                "attention: sequence {i} at rows {row0}..{} overlaps the one before (ending at \
                 {end}) or runs past the {} rows",
                row0 + q,
                sh.total_rows()
            );
            end = row0 + q;
        }
    }
    Ok(())
}

/// Where each sequence lies, from a checked table: (first row, query rows, valid keys).
/// The callers index only `0..len` of a table `check_seqlens` accepted.
fn sequences(sh: &AttnShape, seqlens: Option<&[i32]>) -> Vec<(usize, usize, usize)> {
    let b = sh.batch;
    (0..b)
        .map(|i| match (sh.varlen, seqlens) {
            (Some(_), Some(s)) => (s[b + i] as usize, s[2 * b + i] as usize, s[i] as usize),
            // Packed without a table: no rows (only `seq_columns` can get here).
            (Some(_), None) => (0, 0, 0),
            (None, s) => (i * sh.len, sh.len, s.map_or(sh.len, |s| s[i] as usize)),
        })
        .collect()
}

/// Forward buffer lengths: q, k, v, o, lse.
fn check_fwd(sh: &AttnShape, lens: [usize; 5]) -> Result<()> {
    sh.validate()?;
    let (e, eo, r) = (sh.span(sh.qkv_pitch), sh.span(sh.o_pitch), sh.rows());
    for ((name, have), need) in ["q", "k", "v", "o", "lse"]
        .iter()
        .zip(lens)
        .zip([e, e, e, eo, r])
    {
        check_len("attn_fwd", name, have, need)?;
    }
    Ok(())
}

/// Backward buffer lengths: q, k, v, o, lse, do, dq, dk, dv, delta.
fn check_bwd(sh: &AttnShape, lens: [usize; 10]) -> Result<()> {
    sh.validate()?;
    let (e, eo, r) = (sh.span(sh.qkv_pitch), sh.span(sh.o_pitch), sh.rows());
    let names = ["q", "k", "v", "o", "lse", "do", "dq", "dk", "dv", "delta"];
    for ((name, have), need) in names.iter().zip(lens).zip([e, e, e, eo, r, eo, e, e, e, r]) {
        check_len("attn_bwd", name, have, need)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// CPU reference
// ------------------------------------------------------------------------------------------

/// The sequences of a call with the table they were placed by (checked): what the f64 code
/// and the layout conversions index.
struct Seqs<'a> {
    sh: &'a AttnShape,
    /// (first row, query rows, valid keys) per sequence.
    seq: Vec<(usize, usize, usize)>,
}

impl<'a> Seqs<'a> {
    fn new(sh: &'a AttnShape, seqlens: Option<&[i32]>) -> Self {
        Seqs {
            sh,
            seq: sequences(sh, seqlens),
        }
    }

    /// Query rows of head-sequence bh.
    fn qlen(&self, bh: usize) -> usize {
        self.seq[bh / self.sh.heads].1
    }

    /// The token-major row of head-sequence bh's row i.
    fn row(&self, bh: usize, i: usize) -> usize {
        self.seq[bh / self.sh.heads].0 + i
    }

    /// Index in a token-major tensor of pitch `pitch` of element c of bh's row i.
    fn at(&self, pitch: usize, bh: usize, i: usize, c: usize) -> usize {
        self.row(bh, i) * pitch + (bh % self.sh.heads) * HEAD_DIM + c
    }

    /// Index in a token-major (rows, H) statistic of bh's row i.
    fn stat(&self, bh: usize, i: usize) -> usize {
        self.row(bh, i) * self.sh.heads + bh % self.sh.heads
    }

    /// A token-major tensor widened into the (B·H, L, 64) layout the f64 code works in; the
    /// rows past a sequence's query rows are zeros.
    fn widen(&self, t: &[bf16], pitch: usize) -> Vec<f64> {
        let (l, d) = (self.sh.len, HEAD_DIM);
        let mut out = vec![0.0; self.sh.bh() * l * d];
        for bh in 0..self.sh.bh() {
            for i in 0..self.qlen(bh) {
                for c in 0..d {
                    out[(bh * l + i) * d + c] = f64::from(t[self.at(pitch, bh, i, c)].to_f32());
                }
            }
        }
        out
    }

    /// Writes the sequences' rows of a (B·H, L, 64) f64 tensor into a token-major bf16 one;
    /// everything else (the columns beyond H·64, rows of no sequence) is left as it is.
    fn narrow(&self, src: &[f64], dst: &mut [bf16], pitch: usize) {
        let (l, d) = (self.sh.len, HEAD_DIM);
        for bh in 0..self.sh.bh() {
            for i in 0..self.qlen(bh) {
                for c in 0..d {
                    dst[self.at(pitch, bh, i, c)] = bf16::from_f64(src[(bh * l + i) * d + c]);
                }
            }
        }
    }

    /// A token-major (rows, H) statistic as (B·H, L) f64 (zeros past the query rows).
    fn widen_stat(&self, t: &[f32]) -> Vec<f64> {
        let l = self.sh.len;
        let mut out = vec![0.0; self.sh.bh() * l];
        for bh in 0..self.sh.bh() {
            for i in 0..self.qlen(bh) {
                out[bh * l + i] = f64::from(t[self.stat(bh, i)]);
            }
        }
        out
    }

    /// Writes the sequences' rows of a (B·H, L) f64 statistic into a token-major fp32 one.
    fn narrow_stat(&self, src: &[f64], dst: &mut [f32]) {
        let l = self.sh.len;
        for bh in 0..self.sh.bh() {
            for i in 0..self.qlen(bh) {
                dst[self.stat(bh, i)] = src[bh * l + i] as f32;
            }
        }
    }

    fn visible(&self, bh: usize, i: usize, j: usize) -> bool {
        j < self.seq[bh / self.sh.heads].2 && (!self.sh.causal || j <= i)
    }
}

/// f64 forward on (B·H, L, 64) inputs: (o, lse) of every query row.
fn forward_f64(ss: &Seqs, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let sh = ss.sh;
    let (l, d) = (sh.len, HEAD_DIM);
    let mut o = vec![0.0; sh.bh() * l * d];
    let mut lse = vec![f64::NEG_INFINITY; sh.bh() * l];
    for bh in 0..sh.bh() {
        let base = bh * l * d;
        for i in 0..ss.qlen(bh) {
            let keys: Vec<usize> = (0..l).filter(|&j| ss.visible(bh, i, j)).collect();
            if keys.is_empty() {
                continue;
            }
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let dot: f64 = (0..d)
                        .map(|c| q[base + i * d + c] * k[base + j * d + c])
                        .sum();
                    dot * f64::from(sh.scale)
                })
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            lse[bh * l + i] = mx + sum.ln();
            for (&j, sj) in keys.iter().zip(&s) {
                let p = (sj - mx).exp() / sum;
                for c in 0..d {
                    o[base + i * d + c] += p * v[base + j * d + c];
                }
            }
        }
    }
    (o, lse)
}

/// f64 backward on (B·H, L, 64) inputs, probabilities from `lse`: (dq, dk, dv, delta).
#[allow(clippy::too_many_arguments)]
fn backward_f64(
    ss: &Seqs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    o: &[f64],
    lse: &[f64],
    d_o: &[f64],
) -> [Vec<f64>; 4] {
    let sh = ss.sh;
    let (l, d) = (sh.len, HEAD_DIM);
    let scale = f64::from(sh.scale);
    let e = sh.bh() * l * d;
    let (mut dq, mut dk, mut dv) = (vec![0.0; e], vec![0.0; e], vec![0.0; e]);
    let mut delta = vec![0.0; sh.bh() * l];
    for bh in 0..sh.bh() {
        let base = bh * l * d;
        let row =
            |t: &[f64], i: usize| -> Vec<f64> { t[base + i * d..base + (i + 1) * d].to_vec() };
        for i in 0..ss.qlen(bh) {
            let (qi, doi) = (row(q, i), row(d_o, i));
            let di: f64 = doi.iter().zip(row(o, i)).map(|(a, b)| a * b).sum();
            delta[bh * l + i] = di;
            for j in (0..l).filter(|&j| ss.visible(bh, i, j)) {
                let (kj, vj) = (row(k, j), row(v, j));
                let s: f64 = qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                let p = (s - lse[bh * l + i]).exp();
                let dp: f64 = doi.iter().zip(&vj).map(|(a, b)| a * b).sum();
                let ds = p * (dp - di);
                for c in 0..d {
                    dq[base + i * d + c] += scale * ds * kj[c];
                    dk[base + j * d + c] += scale * ds * qi[c];
                    dv[base + j * d + c] += p * doi[c];
                }
            }
        }
    }
    [dq, dk, dv, delta]
}

/// CPU reference of the forward, in f64. Only the head columns of the sequences' rows of `o`
/// and `lse` are written.
pub fn attention_forward_cpu(
    sh: &AttnShape,
    q: &[bf16],              // (rows, qkv_pitch)
    k: &[bf16],              // (rows, qkv_pitch)
    v: &[bf16],              // (rows, qkv_pitch)
    seqlens: Option<&[i32]>, // (B), or (3·B) packed
    o: &mut [bf16],          // (rows, o_pitch) out
    lse: &mut [f32],         // (rows, H) out
) -> Result<()> {
    check_fwd(sh, [q.len(), k.len(), v.len(), o.len(), lse.len()])?;
    check_seqlens(sh, seqlens)?;
    let ss = Seqs::new(sh, seqlens);
    let p = sh.qkv_pitch;
    let (of, lf) = forward_f64(&ss, &ss.widen(q, p), &ss.widen(k, p), &ss.widen(v, p));
    ss.narrow(&of, o, sh.o_pitch);
    ss.narrow_stat(&lf, lse);
    Ok(())
}

/// CPU reference of the backward, in f64; probabilities from the given `lse`. Only the head
/// columns of the sequences' rows of the gradients and `delta` are written.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_cpu(
    sh: &AttnShape,
    q: &[bf16],              // (rows, qkv_pitch)
    k: &[bf16],              // (rows, qkv_pitch)
    v: &[bf16],              // (rows, qkv_pitch)
    o: &[bf16],              // (rows, o_pitch) from the forward
    lse: &[f32],             // (rows, H) from the forward
    d_o: &[bf16],            // (rows, o_pitch)
    seqlens: Option<&[i32]>, // (B), or (3·B) packed
    dq: &mut [bf16],         // (rows, qkv_pitch) out
    dk: &mut [bf16],         // (rows, qkv_pitch) out
    dv: &mut [bf16],         // (rows, qkv_pitch) out
    delta: &mut [f32],       // (rows, H) out: rowsum(do ∘ o)
) -> Result<()> {
    check_bwd(
        sh,
        [
            q.len(),
            k.len(),
            v.len(),
            o.len(),
            lse.len(),
            d_o.len(),
            dq.len(),
            dk.len(),
            dv.len(),
            delta.len(),
        ],
    )?;
    check_seqlens(sh, seqlens)?;
    let ss = Seqs::new(sh, seqlens);
    let (p, po) = (sh.qkv_pitch, sh.o_pitch);
    let [gq, gk, gv, dl] = backward_f64(
        &ss,
        &ss.widen(q, p),
        &ss.widen(k, p),
        &ss.widen(v, p),
        &ss.widen(o, po),
        &ss.widen_stat(lse),
        &ss.widen(d_o, po),
    );
    for (dst, src) in [(dq, gq), (dk, gk), (dv, gv)] {
        ss.narrow(&src, dst, p);
    }
    ss.narrow_stat(&dl, delta);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Emulation
// ------------------------------------------------------------------------------------------

/// The forward kernel under the emulation; same parameters as [`attention_forward_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_emu(
    emu: &Emu,
    sh: &AttnShape,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    seqlens: Option<&[i32]>,
    o: &mut [bf16],
    lse: &mut [f32],
) -> Result<()> {
    check_fwd(sh, [q.len(), k.len(), v.len(), o.len(), lse.len()])?;
    check_seqlens(sh, seqlens)?;
    let mut args = vec![
        Arg::host(q),
        Arg::host(k),
        Arg::host(v),
        seqlens.map_or(Arg::Ptr(0), Arg::host),
        Arg::host_mut(o),
        Arg::host_mut(lse),
    ];
    args.extend(sh.tail_args()?);
    // SAFETY: every buffer was checked against the shape the kernel indexes, and the table.
    unsafe { emu.launch("attn_fwd", sh.with_smem(FWD_SMEM), &args) }
}

/// The backward kernels under the emulation; same parameters as [`attention_backward_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_emu(
    emu: &Emu,
    sh: &AttnShape,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    o: &[bf16],
    lse: &[f32],
    d_o: &[bf16],
    seqlens: Option<&[i32]>,
    dq: &mut [bf16],
    dk: &mut [bf16],
    dv: &mut [bf16],
    delta: &mut [f32],
) -> Result<()> {
    check_bwd(
        sh,
        [
            q.len(),
            k.len(),
            v.len(),
            o.len(),
            lse.len(),
            d_o.len(),
            dq.len(),
            dk.len(),
            dv.len(),
            delta.len(),
        ],
    )?;
    check_seqlens(sh, seqlens)?;
    let sl = seqlens.map_or(Arg::Ptr(0), Arg::host);
    // attn_bwd_dq stores D, which attn_bwd_dkdv then reads.
    let mut dqa = vec![
        Arg::host(q),
        Arg::host(k),
        Arg::host(v),
        Arg::host(o),
        Arg::host(d_o),
        Arg::host(lse),
        Arg::host_mut(delta),
        sl,
        Arg::host_mut(dq),
    ];
    dqa.extend(sh.tail_args()?);
    let mut dkdv = vec![
        Arg::host(q),
        Arg::host(k),
        Arg::host(v),
        Arg::host(d_o),
        Arg::host(lse),
        Arg::host(delta),
        sl,
        Arg::host_mut(dk),
        Arg::host_mut(dv),
    ];
    dkdv.extend(sh.tail_args()?);
    // SAFETY: every buffer was checked against the shape the kernels index, and the table.
    unsafe {
        emu.launch("attn_bwd_dq", sh.with_smem(DQ_SMEM), &dqa)?;
        emu.launch("attn_bwd_dkdv", sh.with_smem(DKDV_SMEM), &dkdv)
    }
}

// ------------------------------------------------------------------------------------------
// GPU launchers (bf16 buffers as raw u16 bits)
// ------------------------------------------------------------------------------------------

/// Checks a device `seqlens` table: its length, and for packed sequences its contents
/// (read back: the kernels take first rows as they are, and a row outside the buffers, or two
/// sequences on the same rows, would be an access out of bounds or a race). Padded lengths
/// need no read: the kernels clamp them to `0..=L`.
fn check_device_table(
    gpu: &Gpu,
    kernel: &str,
    sh: &AttnShape,
    seqlens: Option<&CudaSlice<i32>>,
) -> Result<()> {
    match seqlens {
        Some(s) => {
            check_len(kernel, "seqlens", s.len(), sh.table_len())?;
            if sh.varlen.is_some() {
                let host = gpu
                    .stream()
                    .dtoh_synced(s)
                    .map_err(|e| anyhow::anyhow!("{kernel}: reading the seqlens table: {e:?}"))?;
                check_seqlens(sh, Some(&host[..sh.table_len()]))?;
            }
            Ok(())
        }
        None => sh.check_plan_table(false),
    }
}

/// The forward kernel on a GPU; same parameters as [`attention_forward_cpu`], device buffers.
/// Lengths in `seqlens` outside `0..=L` are clamped by the kernel; a packed table is read back
/// and checked first.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_cuda(
    gpu: &Gpu,
    sh: &AttnShape,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    seqlens: Option<&CudaSlice<i32>>,
    o: &mut CudaSlice<u16>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    check_fwd(sh, [q.len(), k.len(), v.len(), o.len(), lse.len()])?;
    check_device_table(gpu, "attn_fwd", sh, seqlens)?;
    let st = gpu.stream();
    let (pq, _gq) = q.device_ptr(st);
    let (pk, _gk) = k.device_ptr(st);
    let (pv, _gv) = v.device_ptr(st);
    let (ps, _gs) = match seqlens {
        Some(s) => {
            let (p, g) = s.device_ptr(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (po, _go) = o.device_ptr_mut(st);
    let (pl, _gl) = lse.device_ptr_mut(st);
    let mut args: Vec<Arg> = [pq, pk, pv, ps, po, pl].map(Arg::Ptr).to_vec();
    args.extend(sh.tail_args()?);
    // SAFETY: every buffer was checked against the shape the kernel indexes, and the table.
    unsafe { gpu.launch(&ATTENTION, "attn_fwd", sh.with_smem(FWD_SMEM), &args) }
}

/// The backward kernels on a GPU; same parameters as [`attention_backward_cpu`], device
/// buffers; the table is checked as [`attention_forward_cuda`] checks it.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_cuda(
    gpu: &Gpu,
    sh: &AttnShape,
    q: &CudaSlice<u16>,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    o: &CudaSlice<u16>,
    lse: &CudaSlice<f32>,
    d_o: &CudaSlice<u16>,
    seqlens: Option<&CudaSlice<i32>>,
    dq: &mut CudaSlice<u16>,
    dk: &mut CudaSlice<u16>,
    dv: &mut CudaSlice<u16>,
    delta: &mut CudaSlice<f32>,
) -> Result<()> {
    check_bwd(
        sh,
        [
            q.len(),
            k.len(),
            v.len(),
            o.len(),
            lse.len(),
            d_o.len(),
            dq.len(),
            dk.len(),
            dv.len(),
            delta.len(),
        ],
    )?;
    check_device_table(gpu, "attn_bwd", sh, seqlens)?;
    let st = gpu.stream();
    let (pq, _gq) = q.device_ptr(st);
    let (pk, _gk) = k.device_ptr(st);
    let (pv, _gv) = v.device_ptr(st);
    let (po, _go) = o.device_ptr(st);
    let (pl, _gl) = lse.device_ptr(st);
    let (pdo, _gdo) = d_o.device_ptr(st);
    let (ps, _gs) = match seqlens {
        Some(s) => {
            let (p, g) = s.device_ptr(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (pdq, _gdq) = dq.device_ptr_mut(st);
    let (pdk, _gdk) = dk.device_ptr_mut(st);
    let (pdv, _gdv) = dv.device_ptr_mut(st);
    let (pd, _gd) = delta.device_ptr_mut(st);
    // attn_bwd_dq stores D, which attn_bwd_dkdv then reads.
    let mut dqa = [pq, pk, pv, po, pdo, pl, pd, ps, pdq]
        .map(Arg::Ptr)
        .to_vec();
    dqa.extend(sh.tail_args()?);
    let mut dkdv = [pq, pk, pv, pdo, pl, pd, ps, pdk, pdv]
        .map(Arg::Ptr)
        .to_vec();
    dkdv.extend(sh.tail_args()?);
    // SAFETY: every buffer was checked against the shape the kernels index, and the table.
    unsafe {
        gpu.launch(&ATTENTION, "attn_bwd_dq", sh.with_smem(DQ_SMEM), &dqa)?;
        gpu.launch(&ATTENTION, "attn_bwd_dkdv", sh.with_smem(DKDV_SMEM), &dkdv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::Schedule;
    use crate::testing::bf16_bits;
    use crate::testing::{bf16_to_f64, fresh_seed, random_bf16, rel_err, rng, BF16_POISON};

    struct Inputs {
        q: Vec<bf16>,
        k: Vec<bf16>,
        v: Vec<bf16>,
        d_o: Vec<bf16>,
    }

    fn inputs(sh: &AttnShape, seed: u64) -> Inputs {
        let mut g = rng(seed);
        let (e, eo) = (sh.span(sh.qkv_pitch), sh.span(sh.o_pitch));
        // Wide enough that the softmax is far from uniform, so masking errors show.
        Inputs {
            q: random_bf16(&mut g, e, -2.0, 2.0),
            k: random_bf16(&mut g, e, -2.0, 2.0),
            v: random_bf16(&mut g, e, -1.0, 1.0),
            d_o: random_bf16(&mut g, eo, -1.0, 1.0),
        }
    }

    fn shape(batch: usize, heads: usize, len: usize, causal: bool) -> AttnShape {
        AttnShape::packed(batch, heads, len, causal, 0.125)
    }

    /// The engine's layout: q, k, v at the pitch of a packed (B·L, 3·H·64) projection; o and
    /// do at a pitch that is not a multiple of 64, so a kernel assuming H·64 shows.
    fn pitched(batch: usize, heads: usize, len: usize, causal: bool) -> AttnShape {
        AttnShape {
            qkv_pitch: 3 * heads * HEAD_DIM,
            o_pitch: heads * HEAD_DIM + 8,
            ..shape(batch, heads, len, causal)
        }
    }

    /// The elements of a token-major tensor outside its head columns still hold the poison:
    /// a kernel writes its heads and nothing else.
    fn gaps_hold_poison(sh: &AttnShape, t: &[bf16], pitch: usize) -> bool {
        let w = sh.heads * HEAD_DIM;
        t.iter()
            .enumerate()
            .filter(|(i, _)| i % pitch >= w)
            .all(|(_, x)| x.to_bits() == BF16_POISON.to_bits())
    }

    type Fwd = (Vec<bf16>, Vec<f32>);

    fn forward(sh: &AttnShape, i: &Inputs, sl: Option<&[i32]>, emu: Option<&Emu>) -> Fwd {
        let mut o = vec![BF16_POISON; sh.span(sh.o_pitch)];
        let mut lse = vec![f32::NAN; sh.rows()];
        match emu {
            Some(e) => attention_forward_emu(e, sh, &i.q, &i.k, &i.v, sl, &mut o, &mut lse),
            None => attention_forward_cpu(sh, &i.q, &i.k, &i.v, sl, &mut o, &mut lse),
        }
        .unwrap();
        (o, lse)
    }

    /// (dq, dk, dv, delta) from the given forward outputs, the gradients' head columns in
    /// (B·H, L, 64) order; asserts that nothing outside them was written.
    fn backward(
        sh: &AttnShape,
        i: &Inputs,
        f: &Fwd,
        sl: Option<&[i32]>,
        emu: Option<&Emu>,
    ) -> [Vec<f64>; 4] {
        let ([dq, dk, dv], delta) = backward_raw(sh, i, f, sl, emu);
        let p = sh.qkv_pitch;
        for t in [&dq, &dk, &dv] {
            assert!(
                gaps_hold_poison(sh, t, p),
                "{sh:?}: a gradient wrote between heads"
            );
        }
        [
            sh.head_columns(&dq, p),
            sh.head_columns(&dk, p),
            sh.head_columns(&dv, p),
            delta.iter().map(|&x| f64::from(x)).collect(),
        ]
    }

    /// dq, dk, dv and delta as the reference (`emu` = `None`) or the kernels write them into
    /// poisoned buffers.
    fn backward_raw(
        sh: &AttnShape,
        i: &Inputs,
        f: &Fwd,
        sl: Option<&[i32]>,
        emu: Option<&Emu>,
    ) -> ([Vec<bf16>; 3], Vec<f32>) {
        let e = sh.span(sh.qkv_pitch);
        let mut g = [0; 3].map(|_| vec![BF16_POISON; e]);
        let mut delta = vec![f32::NAN; sh.rows()];
        let [dq, dk, dv] = &mut g;
        let (o, lse) = (&f.0, &f.1);
        match emu {
            Some(em) => attention_backward_emu(
                em, sh, &i.q, &i.k, &i.v, o, lse, &i.d_o, sl, dq, dk, dv, &mut delta,
            ),
            None => attention_backward_cpu(
                sh, &i.q, &i.k, &i.v, o, lse, &i.d_o, sl, dq, dk, dv, &mut delta,
            ),
        }
        .unwrap();
        (g, delta)
    }

    /// The plans run the same launches as the emulation launchers: bit-identical results.
    #[test]
    fn plans_match_launchers() {
        use crate::exec::{run, Backend, HostBuf};
        let emu = Emu::default();
        let sh = pitched(2, 2, 37, false);
        let seed = fresh_seed();
        let i = inputs(&sh, seed);
        let sl = [37, 20];
        let f = forward(&sh, &i, Some(&sl), Some(&emu));
        let want = backward(&sh, &i, &f, Some(&sl), Some(&emu));
        let (e, eo, r) = (sh.span(sh.qkv_pitch), sh.span(sh.o_pitch), sh.rows());
        let mut bufs = [
            HostBuf::Bf16(i.q.clone()),
            HostBuf::Bf16(i.k.clone()),
            HostBuf::Bf16(i.v.clone()),
            HostBuf::I32(sl.to_vec()),
            HostBuf::Bf16(vec![BF16_POISON; eo]),
            HostBuf::F32(vec![f32::NAN; r]),
        ];
        let ptrs: Vec<u64> = bufs.iter_mut().map(|b| b.host_ptr()).collect();
        // SAFETY: the buffers have the lengths the shape needs.
        unsafe { run(Backend::Emu(&emu), &sh.forward_plan(true).unwrap(), &ptrs) }.unwrap();
        let HostBuf::Bf16(o) = &bufs[4] else {
            panic!("slot 4 is not bf16")
        };
        // NaN poison between the heads: compare bits.
        assert_eq!(bf16_bits(o), bf16_bits(&f.0), "o, seed {seed}");
        assert_eq!(bufs[5], HostBuf::F32(f.1.clone()), "lse, seed {seed}");
        let mut bwd = vec![
            HostBuf::Bf16(i.q.clone()),
            HostBuf::Bf16(i.k.clone()),
            HostBuf::Bf16(i.v.clone()),
            HostBuf::Bf16(f.0.clone()),
            HostBuf::F32(f.1.clone()),
            HostBuf::Bf16(i.d_o.clone()),
            HostBuf::I32(sl.to_vec()),
            HostBuf::Bf16(vec![BF16_POISON; e]),
            HostBuf::Bf16(vec![BF16_POISON; e]),
            HostBuf::Bf16(vec![BF16_POISON; e]),
            HostBuf::F32(vec![f32::NAN; r]),
        ];
        let ptrs: Vec<u64> = bwd.iter_mut().map(|b| b.host_ptr()).collect();
        // SAFETY: as above.
        unsafe { run(Backend::Emu(&emu), &sh.backward_plan(true).unwrap(), &ptrs) }.unwrap();
        for (slot, w) in [7, 8, 9].into_iter().zip(&want) {
            let HostBuf::Bf16(got) = &bwd[slot] else {
                panic!("slot {slot} is not bf16")
            };
            assert_eq!(
                &sh.head_columns(got, sh.qkv_pitch),
                w,
                "slot {slot}, seed {seed}"
            );
        }
        assert_eq!(bwd[10].to_f64(), want[3], "delta, seed {seed}");
    }

    /// Relative error of lse: −inf exactly where the reference has it, elsewhere norm-wise.
    fn lse_err(got: &[f32], want: &[f32]) -> f64 {
        let mut g = Vec::new();
        let mut w = Vec::new();
        for (&a, &b) in got.iter().zip(want) {
            if b == f32::NEG_INFINITY {
                if a != f32::NEG_INFINITY {
                    return f64::INFINITY;
                }
            } else {
                g.push(f64::from(a));
                w.push(f64::from(b));
            }
        }
        rel_err(&g, &w)
    }

    /// Shapes and key lengths: one token, odd lengths, more than one tile, 197 with padding,
    /// a fully padded sequence, several heads; separate tensors and the engine's pitches.
    fn cases() -> Vec<(AttnShape, Option<Vec<i32>>)> {
        vec![
            (shape(1, 1, 1, false), None),
            (shape(2, 1, 7, true), None),
            (shape(2, 2, 33, false), Some(vec![33, 20])),
            (pitched(2, 3, 33, false), Some(vec![33, 20])),
            (shape(2, 1, 70, true), Some(vec![70, 45])),
            (pitched(2, 2, 70, true), Some(vec![70, 45])),
            (shape(2, 1, 33, true), Some(vec![0, 33])),
            (shape(1, 1, 130, false), None),
            (shape(1, 1, 197, true), Some(vec![150])),
            (pitched(1, 2, 197, false), Some(vec![150])),
        ]
    }

    #[test]
    fn forward_and_backward_match_reference() {
        for (sh, sl) in cases() {
            let seed = fresh_seed();
            let i = inputs(&sh, seed);
            let sl = sl.as_deref();
            let want = forward(&sh, &i, sl, None);
            let got = forward(&sh, &i, sl, Some(&Emu::default()));
            let ctx = format!("{sh:?} seqlens={sl:?} seed {seed}");
            let po = sh.o_pitch;
            assert!(
                gaps_hold_poison(&sh, &got.0, po),
                "{ctx}: o written between heads"
            );
            let eo = rel_err(&sh.head_columns(&got.0, po), &sh.head_columns(&want.0, po));
            let el = lse_err(&got.1, &want.1);
            assert!(eo <= 1e-2 && el <= 1e-4, "{ctx}: o {eo}, lse {el}");
            // Both backwards from the reference forward, so each is judged on its own.
            let gw = backward(&sh, &i, &want, sl, None);
            let gg = backward(&sh, &i, &want, sl, Some(&Emu::default()));
            for (n, (g, w)) in ["dq", "dk", "dv", "delta"].iter().zip(gg.iter().zip(&gw)) {
                let e = rel_err(g, w);
                let tol = if *n == "delta" { 1e-4 } else { 1e-2 };
                assert!(e <= tol, "{ctx}: {n} {e}");
            }
        }
    }

    /// The launch constants here are the ones `attention.cu` is written for.
    #[test]
    fn launch_constants_match_the_source() {
        let src = ATTENTION.source;
        for d in [
            "#define ATTN_D 64",
            "#define ATTN_TILE 64",
            "#define ATTN_THREADS 128",
            "#define ATTN_PITCH (ATTN_D + 8)",
            "#define ATTN_SMEM_BYTES (5 * ATTN_TILE_ELEMS * 2)",
            "#define ATTN_DQ_SMEM_BYTES (4 * ATTN_TILE_ELEMS * 2)",
            "#define ATTN_DKDV_SMEM_BYTES (4 * ATTN_TILE_ELEMS * 2 + 4 * ATTN_TILE * 4)",
        ] {
            assert!(src.contains(d), "attention.cu lacks `{d}`");
        }
        assert_eq!((HEAD_DIM, TILE, THREADS), (64, 64, 128));
        assert_eq!(PITCH_TILE_BYTES, 64 * (64 + 8) * 2);
    }

    /// Keys and values past a sequence's key length are never read: NaN there (a masked key's
    /// probability is exactly 0, and 0 · NaN is NaN) changes nothing, in the output or in any
    /// gradient, and the padded keys' own gradients are zero.
    #[test]
    fn padded_keys_and_values_are_never_read() {
        for (sh, sl) in [
            (pitched(2, 2, 70, false), vec![70, 45]),
            (shape(2, 1, 33, true), vec![20, 1]),
            (shape(1, 1, 130, false), vec![65]),
        ] {
            let seed = fresh_seed();
            let mut i = inputs(&sh, seed);
            let ss = Seqs::new(&sh, None);
            for bh in 0..sh.bh() {
                for j in sl[bh / sh.heads] as usize..sh.len {
                    for c in 0..HEAD_DIM {
                        i.k[ss.at(sh.qkv_pitch, bh, j, c)] = bf16::NAN;
                        i.v[ss.at(sh.qkv_pitch, bh, j, c)] = bf16::NAN;
                    }
                }
            }
            let ctx = format!("{sh:?} seqlens={sl:?} seed {seed}");
            let want = forward(&sh, &i, Some(&sl), None);
            let got = forward(&sh, &i, Some(&sl), Some(&Emu::default()));
            let po = sh.o_pitch;
            let (go, wo) = (sh.head_columns(&got.0, po), sh.head_columns(&want.0, po));
            assert!(go.iter().all(|x| x.is_finite()), "{ctx}: NaN in o");
            let (eo, el) = (rel_err(&go, &wo), lse_err(&got.1, &want.1));
            assert!(eo <= 1e-2 && el <= 1e-4, "{ctx}: o {eo}, lse {el}");
            let gw = backward(&sh, &i, &want, Some(&sl), None);
            let gg = backward(&sh, &i, &want, Some(&sl), Some(&Emu::default()));
            for (n, (g, w)) in ["dq", "dk", "dv"].iter().zip(gg.iter().zip(&gw)) {
                assert!(g.iter().all(|x| x.is_finite()), "{ctx}: NaN in {n}");
                let e = rel_err(g, w);
                assert!(e <= 1e-2, "{ctx}: {n} {e}");
            }
            for (n, g) in ["dk", "dv"].iter().zip(&gg[1..3]) {
                for bh in 0..sh.bh() {
                    let from = (bh * sh.len + sl[bh / sh.heads] as usize) * HEAD_DIM;
                    let to = (bh + 1) * sh.len * HEAD_DIM;
                    assert!(
                        g[from..to].iter().all(|&x| x == 0.0),
                        "{ctx}: {n} of a padded key"
                    );
                }
            }
        }
    }

    /// Packed sequences of variable length (`AttnShape::varlen`): a table of key counts, first
    /// rows and query rows, with rows of no sequence between them, a sequence of filler query
    /// rows past its keys, one of no rows and one longer than a tile.
    fn packed_cases() -> Vec<(AttnShape, Vec<i32>)> {
        let packed = |sh: AttnShape, rows: usize| AttnShape {
            varlen: Some(rows),
            ..sh
        };
        // (kvlen, row0, qlen) per sequence.
        let table = |seqs: &[(i32, i32, i32)]| -> Vec<i32> {
            let mut t: Vec<i32> = seqs.iter().map(|s| s.0).collect();
            t.extend(seqs.iter().map(|s| s.1));
            t.extend(seqs.iter().map(|s| s.2));
            t
        };
        vec![
            (
                packed(pitched(4, 2, 90, false), 190),
                table(&[(37, 0, 37), (1, 40, 1), (0, 41, 0), (70, 100, 90)]),
            ),
            (
                packed(shape(3, 1, 70, true), 140),
                table(&[(9, 3, 9), (66, 12, 66), (20, 80, 60)]),
            ),
        ]
    }

    /// The sequences' rows of a token-major (rows, H) statistic, in (B·H, L) order.
    fn seq_stats(sh: &AttnShape, sl: &[i32], t: &[f32]) -> Vec<f32> {
        let ss = Seqs::new(sh, Some(sl));
        let mut v = Vec::new();
        for bh in 0..sh.bh() {
            for i in 0..ss.qlen(bh) {
                v.push(t[ss.stat(bh, i)]);
            }
        }
        v
    }

    /// Whether row r of a token-major tensor belongs to no sequence.
    fn outside(sh: &AttnShape, sl: &[i32], r: usize) -> bool {
        Seqs::new(sh, Some(sl))
            .seq
            .iter()
            .all(|&(r0, q, _)| r < r0 || r >= r0 + q)
    }

    /// Packed sequences match the reference; the rows between them hold NaN on input (so a
    /// read of one shows) and still hold the poison after every kernel (so a write shows).
    #[test]
    fn packed_sequences_match_reference_and_touch_only_their_rows() {
        for (sh, sl) in packed_cases() {
            let seed = fresh_seed();
            let mut i = inputs(&sh, seed);
            let (p, po) = (sh.qkv_pitch, sh.o_pitch);
            for (t, pitch) in [
                (&mut i.q, p),
                (&mut i.k, p),
                (&mut i.v, p),
                (&mut i.d_o, po),
            ] {
                for (e, x) in t.iter_mut().enumerate() {
                    if outside(&sh, &sl, e / pitch) {
                        *x = bf16::NAN;
                    }
                }
            }
            let ctx = format!("{sh:?} seqlens={sl:?} seed {seed}");
            let cols = |t: &[bf16], pitch| sh.seq_columns(t, pitch, Some(&sl)).unwrap();
            let want = forward(&sh, &i, Some(&sl), None);
            let got = forward(&sh, &i, Some(&sl), Some(&Emu::default()));
            let untouched = |t: &[bf16], pitch: usize| {
                t.iter()
                    .enumerate()
                    .filter(|(e, _)| outside(&sh, &sl, e / pitch))
                    .all(|(_, x)| x.to_bits() == BF16_POISON.to_bits())
            };
            assert!(
                untouched(&got.0, po),
                "{ctx}: o written outside the sequences"
            );
            let go = cols(&got.0, po);
            assert!(go.iter().all(|x| x.is_finite()), "{ctx}: NaN in o");
            let eo = rel_err(&go, &cols(&want.0, po));
            let (gl, wl) = (seq_stats(&sh, &sl, &got.1), seq_stats(&sh, &sl, &want.1));
            let el = lse_err(&gl, &wl);
            assert!(eo <= 1e-2 && el <= 1e-4, "{ctx}: o {eo}, lse {el}");
            let stat_rows = got.1.chunks(sh.heads).enumerate();
            for (r, st) in stat_rows.filter(|(r, _)| outside(&sh, &sl, *r)) {
                assert!(
                    st.iter().all(|x| x.is_nan()),
                    "{ctx}: lse of row {r} written"
                );
            }
            // Both backwards from the reference forward, so each is judged on its own.
            let (wg, wd) = backward_raw(&sh, &i, &want, Some(&sl), None);
            let (g, delta) = backward_raw(&sh, &i, &want, Some(&sl), Some(&Emu::default()));
            for (n, (gt, wt)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&wg)) {
                for (who, t) in [("kernel", gt), ("reference", wt)] {
                    assert!(
                        untouched(t, p),
                        "{ctx}: {who} wrote {n} outside the sequences"
                    );
                    assert!(
                        gaps_hold_poison(&sh, t, p),
                        "{ctx}: {who} wrote {n} between heads"
                    );
                }
                let gc = cols(gt, p);
                assert!(gc.iter().all(|x| x.is_finite()), "{ctx}: NaN in {n}");
                let err = rel_err(&gc, &cols(wt, p));
                assert!(err <= 1e-2, "{ctx}: {n} {err}");
            }
            let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
            let ed = rel_err(
                &to64(seq_stats(&sh, &sl, &delta)),
                &to64(seq_stats(&sh, &sl, &wd)),
            );
            assert!(ed <= 1e-4, "{ctx}: delta {ed}");
        }
    }

    /// A packed sequence gives the rows it gives alone: the same sequence placed at row 0 of a
    /// padded call of its own length, bit for bit (forward) and within rounding (backward,
    /// whose padded call has no filler rows either: qlen = kvlen = L).
    #[test]
    fn packed_sequence_equals_the_sequence_alone() {
        let seed = fresh_seed();
        let (len, row0, heads) = (45usize, 70usize, 2usize);
        let alone = pitched(1, heads, len, false);
        let packed = AttnShape {
            batch: 2,
            len: 64,
            varlen: Some(row0 + len),
            ..alone
        };
        // Sequence 0: 30 rows at row 3 (random); sequence 1: the lone sequence at `row0`.
        let sl = vec![30, len as i32, 3, row0 as i32, 30, len as i32];
        let a = inputs(&alone, seed);
        let mut b = inputs(&packed, seed ^ 1);
        let (p, po) = (alone.qkv_pitch, alone.o_pitch);
        for (dst, src, pitch) in [
            (&mut b.q, &a.q, p),
            (&mut b.k, &a.k, p),
            (&mut b.v, &a.v, p),
            (&mut b.d_o, &a.d_o, po),
        ] {
            dst[row0 * pitch..row0 * pitch + src.len()].copy_from_slice(src);
        }
        let emu = Emu::default();
        let fa = forward(&alone, &a, None, Some(&emu));
        let fb = forward(&packed, &b, Some(&sl), Some(&emu));
        let ctx = format!("seed {seed}");
        let w = heads * HEAD_DIM;
        let rows = |t: &[bf16], pitch: usize, r0: usize| -> Vec<u16> {
            (0..len)
                .flat_map(|r| t[(r0 + r) * pitch..(r0 + r) * pitch + w].to_vec())
                .map(|x| x.to_bits())
                .collect()
        };
        assert!(rows(&fb.0, po, row0) == rows(&fa.0, po, 0), "{ctx}: o");
        assert!(
            fb.1[row0 * heads..(row0 + len) * heads] == fa.1[..],
            "{ctx}: lse"
        );
        let ga = backward(&alone, &a, &fa, None, Some(&emu));
        let (g, _) = backward_raw(&packed, &b, &fb, Some(&sl), Some(&emu));
        for (n, (got, want)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&ga)) {
            // Sequence 1 of the packed columns is the lone sequence's (B·H, L, 64) = (H, len, 64).
            let cols = packed.seq_columns(got, p, Some(&sl)).unwrap();
            let seq1: Vec<f64> = (heads..2 * heads)
                .flat_map(|bh| cols[bh * 64 * HEAD_DIM..(bh * 64 + len) * HEAD_DIM].to_vec())
                .collect();
            assert!(seq1 == *want, "{ctx}: {n} differs from the sequence alone");
        }
    }

    /// A sequence with no valid key: zero output, −inf lse, zero gradients, no NaN anywhere.
    #[test]
    fn fully_masked_rows_are_zero_not_nan() {
        let sh = shape(2, 1, 40, false);
        let i = inputs(&sh, fresh_seed());
        let sl = [0, 40];
        let f = forward(&sh, &i, Some(&sl), Some(&Emu::default()));
        let half = sh.span(sh.o_pitch) / 2;
        assert!(f.0[..half].iter().all(|x| x.to_f32() == 0.0));
        assert!(f.1[..40].iter().all(|&x| x == f32::NEG_INFINITY));
        assert!(f.0[half..].iter().all(|x| x.is_finite()));
        let g = backward(&sh, &i, &f, Some(&sl), Some(&Emu::default()));
        for t in &g[..3] {
            assert!(t[..half].iter().all(|&x| x == 0.0));
            assert!(t.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_order() {
        let sh = shape(1, 1, 70, true);
        let seed = fresh_seed();
        let i = inputs(&sh, seed);
        let sl = [61];
        let f = forward(&sh, &i, Some(&sl), Some(&Emu::default()));
        let g = backward(&sh, &i, &f, Some(&sl), Some(&Emu::default()));
        for sched in [Schedule::Reverse, Schedule::Shuffled(seed)] {
            let e = Emu::default().with_schedule(sched);
            let f2 = forward(&sh, &i, Some(&sl), Some(&e));
            assert_eq!(f2.0, f.0, "{sched:?} seed {seed}");
            assert_eq!(
                backward(&sh, &i, &f, Some(&sl), Some(&e)),
                g,
                "{sched:?} seed {seed}"
            );
        }
    }

    /// Copies landing when issued (`Emu::with_eager_copies`) give the same results as copies
    /// landing at their wait, forward and backward, whatever the thread order, the greedy one
    /// (warp 0 as far ahead as the barriers allow) included. Without the barrier before a
    /// key tile's buffer is refilled, warp 0 runs ahead under the greedy order and refills
    /// the buffer the other warps still read: the forward goes wrong (the round-robin orders
    /// keep the warps in step and miss it).
    #[test]
    fn eager_copies_and_a_greedy_order_catch_a_missing_refill_barrier() {
        let sh = shape(2, 1, 256, false);
        let seed = fresh_seed();
        let i = inputs(&sh, seed);
        let sl = [256, 200];
        let f = forward(&sh, &i, Some(&sl), Some(&Emu::default()));
        let g = backward(&sh, &i, &f, Some(&sl), Some(&Emu::default()));
        for sched in [
            Schedule::Greedy,
            Schedule::Reverse,
            Schedule::Shuffled(seed),
        ] {
            let e = Emu::default().with_schedule(sched).with_eager_copies();
            let what = format!("{sched:?}, eager copies, seed {seed}");
            assert_eq!(forward(&sh, &i, Some(&sl), Some(&e)).0, f.0, "{what}");
            assert_eq!(backward(&sh, &i, &f, Some(&sl), Some(&e)), g, "{what}");
        }
        let broken = Emu::variant("no_refill_barrier")
            .with_schedule(Schedule::Greedy)
            .with_eager_copies();
        let got = forward(&sh, &i, Some(&sl), Some(&broken));
        let e = rel_err(&bf16_to_f64(&got.0), &bf16_to_f64(&f.0));
        assert!(e > 1e-2, "seed {seed}: the missing barrier passed ({e})");
    }

    /// Without the online rescale the forward is right for one key tile only; across two it
    /// must fail the comparison the real kernel passes.
    #[test]
    fn broken_rescale_variant_fails() {
        let sh = shape(1, 1, 128, false);
        let seed = fresh_seed();
        let i = inputs(&sh, seed);
        let want = forward(&sh, &i, None, None);
        let got = forward(&sh, &i, None, Some(&Emu::variant("broken_rescale")));
        let e = rel_err(&bf16_to_f64(&got.0), &bf16_to_f64(&want.0));
        assert!(e > 1e-2, "seed {seed}: missing rescale passed ({e})");
    }

    /// The reference backward against central differences of the f64 forward: the loss
    /// Σ do ∘ o, perturbed in q, k and v, with a padded key and the causal mask.
    #[test]
    fn reference_backward_is_the_gradient() {
        let sh = shape(1, 1, 5, true);
        let seed = fresh_seed();
        let i = inputs(&sh, seed);
        let sl = [4];
        let ss = Seqs::new(&sh, Some(&sl));
        let p = sh.qkv_pitch;
        let (q, k, v, d_o) = (
            ss.widen(&i.q, p),
            ss.widen(&i.k, p),
            ss.widen(&i.v, p),
            ss.widen(&i.d_o, sh.o_pitch),
        );
        let (o, lse) = forward_f64(&ss, &q, &k, &v);
        let [dq, dk, dv, _] = backward_f64(&ss, &q, &k, &v, &o, &lse, &d_o);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (o, _) = forward_f64(&ss, q, k, v);
            o.iter().zip(&d_o).map(|(a, b)| a * b).sum()
        };
        let h = 1e-6;
        let mut g = rng(seed ^ 7);
        for _ in 0..24 {
            let idx = rand::Rng::gen_range(&mut g, 0..q.len());
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                let mut p = [q.clone(), k.clone(), v.clone()];
                let mut m = p.clone();
                p[which][idx] += h;
                m[which][idx] -= h;
                let num = (loss(&p[0], &p[1], &p[2]) - loss(&m[0], &m[1], &m[2])) / (2.0 * h);
                assert!(
                    (num - grad[idx]).abs() <= 1e-6 * num.abs().max(1.0),
                    "tensor {which} [{idx}]: {} vs {num} (seed {seed})",
                    grad[idx]
                );
            }
        }
    }

    #[test]
    fn bad_shapes_and_lengths_are_errors() {
        let sh = shape(2, 1, 8, false);
        let i = inputs(&sh, 1);
        let mut o = vec![bf16::ZERO; sh.span(sh.o_pitch) - 1];
        let mut lse = vec![0.0f32; sh.rows()];
        let e = attention_forward_emu(
            &Emu::default(),
            &sh,
            &i.q,
            &i.k,
            &i.v,
            None,
            &mut o,
            &mut lse,
        )
        .unwrap_err();
        assert!(
            format!("{e}").contains("`o` holds 1023 elements, the shape needs 1024"),
            "{e}"
        );
        let mut o = vec![bf16::ZERO; sh.span(sh.o_pitch)];
        let e = attention_forward_cpu(&sh, &i.q, &i.k, &i.v, Some(&[3, 9]), &mut o, &mut lse)
            .unwrap_err();
        assert!(
            format!("{e}").contains("sequence 1 has 9 keys, outside 0..=8"),
            "{e}"
        );
        let e =
            attention_forward_cpu(&sh, &i.q, &i.k, &i.v, Some(&[3]), &mut o, &mut lse).unwrap_err();
        assert!(format!("{e}").contains("holds 1 entries"), "{e}");
        // Packed sequences in the same 16 rows: kvlen, first row, query rows.
        let packed = AttnShape {
            varlen: Some(16),
            ..sh
        };
        for (table, want) in [
            (
                vec![4, 5, 0, 3, 3, 6],
                "sequence 0 has 4 keys, outside 0..=3",
            ),
            (vec![3, 5, 0, 2, 4, 6], "sequence 1 at rows 2..8 overlaps"),
            (vec![3, 5, 0, 12, 4, 6], "sequence 1 at rows 12..18"),
            (
                vec![3, 5, 0, 4, 9, 6],
                "sequence 0 has 9 query rows, more than L = 8",
            ),
            (
                vec![3, 5, 0, 4],
                "holds 4 entries, the batch of 2 sequences needs 6",
            ),
        ] {
            let e =
                attention_forward_cpu(&packed, &i.q, &i.k, &i.v, Some(&table), &mut o, &mut lse)
                    .unwrap_err();
            assert!(format!("{e}").contains(want), "{table:?}: {e}");
        }
        let e =
            attention_forward_cpu(&packed, &i.q, &i.k, &i.v, None, &mut o, &mut lse).unwrap_err();
        assert!(format!("{e}").contains("need the seqlens table"), "{e}");
        assert!(packed.forward_plan(false).is_err() && packed.backward_plan(false).is_err());
        // Pitches: 16-byte rows for cp.async, and room for every head.
        for (qkv_pitch, o_pitch, want) in [
            (68, 64, "qkv_pitch 68 must be a multiple of 8"),
            (
                64,
                56,
                "o_pitch 56 must be a multiple of 8 and at least H·64 = 64",
            ),
        ] {
            let bad = AttnShape {
                qkv_pitch,
                o_pitch,
                ..sh
            };
            let e =
                attention_forward_cpu(&bad, &i.q, &i.k, &i.v, None, &mut o, &mut lse).unwrap_err();
            assert!(format!("{e}").contains(want), "{e}");
        }
    }

    /// The same comparison on a GPU when one is present, at the image tower's length; without
    /// a driver it only checks that selection falls back to the CPU.
    #[test]
    fn gpu_matches_reference_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto).unwrap() {
            crate::device::Device::Cuda(g) => g,
            crate::device::Device::Cpu => {
                eprintln!("no GPU: attention GPU test not run");
                return;
            }
        };
        let st = gpu.stream().clone();
        let from_bits = |v: Vec<u16>| v.into_iter().map(bf16::from_bits).collect::<Vec<bf16>>();
        let mut all = cases();
        all.push((pitched(4, 3, 197, false), Some(vec![197, 100, 0, 64])));
        for (sh, sl) in all {
            let seed = fresh_seed();
            let i = inputs(&sh, seed);
            let slr = sl.as_deref();
            let want = forward(&sh, &i, slr, None);
            let gw = backward(&sh, &i, &want, slr, None);
            let (dq_, dk_, dv_) = (
                st.clone_htod(bf16_bits(&i.q)).unwrap(),
                st.clone_htod(bf16_bits(&i.k)).unwrap(),
                st.clone_htod(bf16_bits(&i.v)).unwrap(),
            );
            let ddo = st.clone_htod(bf16_bits(&i.d_o)).unwrap();
            let dsl = slr.map(|s| st.clone_htod(s).unwrap());
            let poison = vec![BF16_POISON.to_bits(); sh.span(sh.qkv_pitch)];
            let mut o = st
                .clone_htod(&vec![BF16_POISON.to_bits(); sh.span(sh.o_pitch)])
                .unwrap();
            let mut lse = st.clone_htod(&vec![f32::NAN; sh.rows()]).unwrap();
            attention_forward_cuda(&gpu, &sh, &dq_, &dk_, &dv_, dsl.as_ref(), &mut o, &mut lse)
                .unwrap();
            let go = from_bits(st.dtoh_synced(&o).unwrap());
            let gl = st.dtoh_synced(&lse).unwrap();
            let ctx = format!("GPU {sh:?} seed {seed}");
            let (p, po) = (sh.qkv_pitch, sh.o_pitch);
            assert!(
                gaps_hold_poison(&sh, &go, po),
                "{ctx}: o written between heads"
            );
            let eo = rel_err(&sh.head_columns(&go, po), &sh.head_columns(&want.0, po));
            let el = lse_err(&gl, &want.1);
            assert!(eo <= 1e-2 && el <= 1e-4, "{ctx}: o {eo}, lse {el}");
            // Backward from the reference forward's o and lse.
            let ro = st.clone_htod(bf16_bits(&want.0)).unwrap();
            let rl = st.clone_htod(&want.1).unwrap();
            let (mut gq, mut gk, mut gv) = (
                st.clone_htod(&poison).unwrap(),
                st.clone_htod(&poison).unwrap(),
                st.clone_htod(&poison).unwrap(),
            );
            let mut delta = st.clone_htod(&vec![f32::NAN; sh.rows()]).unwrap();
            attention_backward_cuda(
                &gpu,
                &sh,
                &dq_,
                &dk_,
                &dv_,
                &ro,
                &rl,
                &ddo,
                dsl.as_ref(),
                &mut gq,
                &mut gk,
                &mut gv,
                &mut delta,
            )
            .unwrap();
            for (n, (d, w)) in ["dq", "dk", "dv"]
                .iter()
                .zip([&gq, &gk, &gv].iter().zip(&gw))
            {
                let got = from_bits(st.dtoh_synced(*d).unwrap());
                assert!(
                    gaps_hold_poison(&sh, &got, p),
                    "{ctx}: {n} written between heads"
                );
                let e = rel_err(&sh.head_columns(&got, p), w);
                assert!(e <= 1e-2, "{ctx}: {n} {e}");
            }
        }
    }
}
