//! One transformer block, forward and backward, as launch plans over one [`Arena`]: the
//! open_clip pre-norm block (`x + attn(LN1(x))`, then `+ MLP(LN2(x))`) or the BERT post-norm
//! block (`LN1(x + attn(x))`, then `LN2(h + MLP(h))`), the MLP with QuickGELU or erf GELU.
//!
//! Every op is a kernel of `mmkd-kernels`: GEMMs with fused bias, residual and activation
//! epilogues (the output projection and the MLP's second layer add the residual stream and
//! store the sum the next LayerNorm reads; the MLP's first layer stores its pre-activation
//! beside its output, and the input gradient reaching it comes out through the activation's
//! derivative; the weight gradients reduce the bias gradient in the same pass), the fused
//! attention with a key-padding mask, LayerNorm (its backward fused with the residual
//! gradient's add), and the weight cast. Activations are bf16; master weights, gradients,
//! LayerNorm statistics and the attention's log-sum-exp are fp32.
//!
//! Heads. The attention kernel reads token-major tensors at any row pitch: q, k and v are the
//! three column blocks of the QKV projection's `(B·L, 3·W)` output (pitch 3·W, head h in
//! columns h·64.. of its block), it writes o as the `(B·L, W)` input of the output
//! projection, and its backward writes dq, dk and dv into the column blocks of one
//! `(B·L, 3·W)` gradient that the QKV weight and input gradients read. No head is ever
//! transposed or copied; only the key lengths (one per sequence) are rewritten per batch.
//!
//! Stacks. [`CudaBlock::in_layout`] adds a block to a shared [`Layout::grouped`] table under
//! a name prefix, reading the previous block's output as its input and writing its input
//! gradient into the previous block's output gradient; the towers build on it. A block built
//! with the same dims as the one before it shares that block's scratch and constant tables
//! (one backward runs at a time), the output gradients alternating between two buffers.
//!
//! Hopper. With `BlockDims::gemm` = `Wgmma` every product of the block runs on `wgmma`: the
//! forward, the input gradients `dX = dY·W` and the weight gradients `dW = dYᵀ·X` with their
//! bias gradients, the operands read as stored (through the instruction's transpose flags).
//!
//! Checkpointing. With `BlockDims::recompute` the backward plan starts with the forward again:
//! the blocks of a stack then keep only their outputs and share one set of every other
//! activation, which the recomputation refills block by block.
//!
//! Variable length. `BlockDims::len` is the longest padded length: it sizes every region. A
//! batch padded to a shorter length L uses the first B·L rows of each `(B·L, ·)` region (every
//! op of the block runs on the same m = B·L rows, so they form one contiguous prefix), with
//! plans built for that L ([`CudaBlock::set_padded_lengths`]). The kernels take their shapes
//! as launch arguments, so a plan for another length is only a new list of launches.
//!
//! Packed sequences. A batch may instead lie back to back in m rows with no padding at all
//! ([`CudaBlock::set_packed`]): every op but the attention is row-wise, so it runs on the m
//! rows as they are, and the attention reads each sequence's rows through a table of first
//! rows and lengths (`AttnShape::varlen`). The GEMMs then do no work on pad tokens. m is a
//! multiple of [`PACKED_ROW_TILE`] (or all B·L rows), which bounds the plans a run builds;
//! the rows past the tokens are filler queries of the last sequence (defined values whose
//! gradients are zero, as pad tokens are).
//!
//! Gradients are overwritten by each backward (the kernels store, they do not accumulate).

use super::arena::{Arena, Dtype, Layout, RegionId, Section};
use crate::config::{Activation, NormPlacement};
use anyhow::{anyhow, bail, ensure, Result};
use mmkd_kernels::attention::{AttnShape, HEAD_DIM};
use mmkd_kernels::elementwise::{Ew, ScatterTables};
use mmkd_kernels::exec::{Step, P};
use mmkd_kernels::gemm::{
    choose_split_k, Activation as Epilogue, AuxUse, GemmLayout, GemmOpts, GemmPath, GemmShape,
    TUNED_SMS,
};
use mmkd_kernels::layernorm::{backward_scratch_len, LnShape};
use std::sync::{Mutex, OnceLock};

/// A packed batch runs on a multiple of this many rows (or on all B·L): its last sequence gets
/// up to `PACKED_ROW_TILE − 1` filler rows. One attention tile.
pub const PACKED_ROW_TILE: usize = 64;

/// The rows a packed batch of `tokens` valid tokens runs on when at most `cap` rows are
/// there: `tokens` rounded up to [`PACKED_ROW_TILE`], or all `cap` when that is fewer (the
/// filler stays under a tile either way, since `tokens ≤ cap`).
pub fn packed_rows(tokens: usize, cap: usize) -> usize {
    tokens
        .max(1)
        .div_ceil(PACKED_ROW_TILE)
        .saturating_mul(PACKED_ROW_TILE)
        .min(cap)
}

/// The plan slot of a packed batch of `m` rows out of at most `cap` ([`packed_rows`] gives
/// only these counts): ⌈m / [`PACKED_ROW_TILE`]⌉ − 1, one per count, as only `cap` itself may
/// be no multiple of the tile. `what` names the caller in the error.
pub(super) fn packed_slot(what: &str, m: usize, cap: usize) -> Result<usize> {
    ensure!(
        (1..=cap).contains(&m) && (m.is_multiple_of(PACKED_ROW_TILE) || m == cap),
        "{what}: a packed batch of {m} rows; it needs a multiple of {PACKED_ROW_TILE} rows up \
         to {cap}, or all {cap}"
    );
    Ok(m.div_ceil(PACKED_ROW_TILE) - 1)
}

/// One sequence of a packed batch ([`CudaBlock::set_packed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedSeq {
    /// Its first row.
    pub row0: usize,
    /// Its rows: its tokens, then any filler rows (queries only, never keys).
    pub rows: usize,
    /// Its valid tokens, the keys every row of it attends to (at most `rows`).
    pub keys: usize,
}

/// The rows a batch runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchRows {
    /// B sequences padded to L tokens: the first B·L rows.
    Padded(usize),
    /// Sequences packed back to back in the first m rows.
    Packed(usize),
}

/// Sizes of one block and of the batch it runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockDims {
    /// Model width W (a multiple of 64: heads are 64 wide).
    pub width: usize,
    /// Heads H = W / 64.
    pub heads: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// MLP activation.
    pub act: Activation,
    /// Pre-norm (open_clip) or post-norm (BERT).
    pub norm: NormPlacement,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Sequences B per batch.
    pub batch: usize,
    /// Tokens L per sequence: the longest padded length, which sizes the arena (a batch may
    /// be padded to any length up to it).
    pub len: usize,
    /// Activation checkpointing: the backward first recomputes the block's forward from its
    /// input, so that the blocks of a stack keep only their outputs between the two passes
    /// and share one set of the other activations, at the cost of one more forward.
    pub recompute: bool,
    /// The tensor-core instruction of the block's products: by default `Wgmma` on an sm_90 GPU
    /// or under the emulation, else `MmaSync` (see `KernelTarget::gemm_path`).
    pub gemm: GemmPath,
}

impl BlockDims {
    /// Tokens per batch at the longest length, B·L.
    pub fn tokens(&self) -> usize {
        self.batch * self.len
    }

    /// The most rows one sequence of a packed batch may have: the longest length and the
    /// filler of a tile. The attention's grid covers it.
    pub fn packed_rows_cap(&self) -> usize {
        self.len + PACKED_ROW_TILE - 1
    }

    /// The (out, in) shapes of the block's four weights: QKV, output projection, MLP in and
    /// out. Their gradients are the products split along the tokens ([`GemmOpts::split_k`]).
    fn weight_shapes(&self) -> [(usize, usize); 4] {
        let (w, f) = (self.width, self.hidden);
        [(3 * w, w), (w, w), (f, w), (w, f)]
    }

    /// The split of K for the gradient of an (out, in) weight over `tokens` tokens
    /// ([`choose_split_k`], tuned for [`TUNED_SMS`]), halved until its workspace fits `cap`
    /// fp32 elements; and that workspace's length.
    pub(super) fn weight_grad_split(
        &self,
        (out, inp): (usize, usize),
        tokens: usize,
        cap: usize,
    ) -> (usize, usize) {
        let sh = GemmShape {
            layout: GemmLayout::WeightGrad,
            batch: 1,
            m: out,
            n: inp,
            k: tokens,
            act: Epilogue::None,
        };
        let mut s = choose_split_k(&sh, self.gemm, TUNED_SMS);
        while s > 1 && sh.split_workspace_len(s) > cap {
            s /= 2;
        }
        (s, sh.split_workspace_len(s))
    }

    /// fp32 elements of the split-K workspace the block's weight gradients need at the
    /// longest length (0: none splits).
    fn split_workspace_len(&self) -> usize {
        self.weight_shapes()
            .into_iter()
            .map(|wsh| self.weight_grad_split(wsh, self.tokens(), usize::MAX).1)
            .max()
            .unwrap_or(0)
    }
}

/// The block's parameters: open_clip names (relative to the block) and shapes, in arena order.
pub fn param_specs(d: &BlockDims) -> Vec<(&'static str, Vec<usize>)> {
    let (w, f) = (d.width, d.hidden);
    vec![
        ("ln_1.weight", vec![w]),
        ("ln_1.bias", vec![w]),
        ("attn.in_proj_weight", vec![3 * w, w]),
        ("attn.in_proj_bias", vec![3 * w]),
        ("attn.out_proj.weight", vec![w, w]),
        ("attn.out_proj.bias", vec![w]),
        ("ln_2.weight", vec![w]),
        ("ln_2.bias", vec![w]),
        ("mlp.c_fc.weight", vec![f, w]),
        ("mlp.c_fc.bias", vec![f]),
        ("mlp.c_proj.weight", vec![w, f]),
        ("mlp.c_proj.bias", vec![w]),
    ]
}

/// A buffer slot of a plan: a region, an element offset into it, and the elements the
/// kernel touches from there.
#[derive(Clone, Copy)]
pub(super) struct Buf {
    pub(super) id: RegionId,
    pub(super) off: usize,
    pub(super) need: usize,
    /// The kernel runs on past the region's end through the rest of its section (the
    /// section-wide weight cast).
    pub(super) span: bool,
}

/// The table regions of one embedding scatter-add ([`Ew::ScatterAdd`]): the segment tables
/// ([`ScatterTables`]) of up to `n` rows into a table of `v` rows, which the host writes with
/// the index table they are built from.
#[derive(Clone, Copy, Debug)]
pub(super) struct ScatterRegions {
    order: RegionId,
    starts: RegionId,
    targets: RegionId,
    v: usize,
}

impl ScatterRegions {
    /// Adds the regions `{prefix}.order`, `.starts` and `.targets` to the tables section.
    pub(super) fn add(lay: &mut Layout, prefix: &str, n: usize, v: usize) -> Result<Self> {
        let u = n.min(v);
        let mut add = |what: &str, len: usize| {
            lay.add(
                &format!("{prefix}.{what}"),
                Section::Tables,
                Dtype::I32,
                len,
            )
        };
        Ok(ScatterRegions {
            order: add("order", n)?,
            starts: add("starts", u + 1)?,
            targets: add("targets", u)?,
            v,
        })
    }

    /// Rows of the table the scatter-add writes into.
    pub(super) fn table_rows(&self) -> usize {
        self.v
    }

    /// The scatter-add of the first `m` rows of `dout` (row width `c`) into `dtable`.
    pub(super) fn plan(
        &self,
        pl: &mut Planner<'_>,
        steps: &mut Vec<Step>,
        m: usize,
        c: usize,
        dout: Option<Buf>,
        dtable: Option<Buf>,
    ) -> Result<()> {
        let u = m.min(self.v);
        let buf = |id, need| {
            Some(Buf {
                id,
                off: 0,
                need,
                span: false,
            })
        };
        pl.add(
            steps,
            Ew::ScatterAdd { n: m, v: self.v, c }.plan()?,
            &[
                dout,
                buf(self.order, m),
                buf(self.starts, u + 1),
                buf(self.targets, u),
                dtable,
            ],
        )
    }

    /// Writes the tables of `idx` (row i adds into table row `idx[i]`) at the start of the
    /// regions; entries past them are never read by the plan of `idx.len()` rows.
    pub(super) fn write(&self, arena: &mut Arena, idx: &[i32]) -> Result<()> {
        let t = ScatterTables::new(idx, self.v)?;
        for (id, mut v) in [
            (self.order, t.order),
            (self.starts, t.starts),
            (self.targets, t.targets),
        ] {
            v.resize(arena.layout().region(id).len, 0);
            arena.write_i32(id, &v)?;
        }
        Ok(())
    }
}

/// Collects plans of single ops, renumbering each op's slots into one shared slot list.
pub(super) struct Planner<'a> {
    pub(super) layout: &'a Layout,
    pub(super) slots: Vec<(RegionId, usize)>,
}

impl Planner<'_> {
    fn slot(&mut self, b: Buf) -> Result<usize> {
        let r = self.layout.region(b.id);
        let avail = if b.span {
            let (start, bytes) = self
                .layout
                .section_span(r.section)
                .ok_or_else(|| anyhow!("arena section {:?} is empty", r.section))?;
            (start + bytes - r.offset) / r.dtype.bytes()
        } else {
            r.len
        };
        ensure!(
            b.off + b.need <= avail,
            "block plan: region `{}` offers {avail} elements, an op needs {} from offset {}",
            r.name,
            b.need,
            b.off
        );
        let key = (b.id, b.off);
        Ok(match self.slots.iter().position(|&s| s == key) {
            Some(i) => i,
            None => {
                self.slots.push(key);
                self.slots.len() - 1
            }
        })
    }

    /// Appends `plan` (whose slot `i` is `bufs[i]`; `None` where the op leaves it null).
    pub(super) fn add(
        &mut self,
        out: &mut Vec<Step>,
        plan: Vec<Step>,
        bufs: &[Option<Buf>],
    ) -> Result<()> {
        let mut map = Vec::with_capacity(bufs.len());
        for b in bufs {
            map.push(b.map(|b| self.slot(b)).transpose()?);
        }
        for mut s in plan {
            for a in &mut s.args {
                let local = match *a {
                    P::Buf(i) | P::At(i, _) | P::Map(i, _) => i,
                    _ => continue,
                };
                let global = map.get(local).copied().flatten().ok_or_else(|| {
                    anyhow!("{}: plan slot {local} has no buffer in the block", s.kernel)
                })?;
                *a = match *a {
                    P::At(_, off) => P::At(global, off),
                    P::Map(_, spec) => P::Map(global, spec),
                    _ => P::Buf(global),
                };
            }
            out.push(s);
        }
        Ok(())
    }
}

/// Index of one parameter in [`param_specs`] order.
#[derive(Clone, Copy)]
enum Pm {
    Ln1G = 0,
    Ln1B,
    Wqkv,
    Bqkv,
    Wo,
    Bo,
    Ln2G,
    Ln2B,
    W1,
    B1,
    W2,
    B2,
}

/// The activations a block keeps from its forward for its backward (see the module docs for
/// the head layout).
#[derive(Clone, Copy)]
struct Kept {
    /// Post-norm only: the residual stream after the attention, x + attention output.
    s1: Option<RegionId>,
    /// LN1's output: the attention's input (pre) or the MLP's (post).
    h1: RegionId,
    mean1: RegionId,
    rstd1: RegionId,
    /// The packed projection `(B·L, 3·W)`: attention's q, k and v.
    qkv: RegionId,
    lse: RegionId,
    o: RegionId,
    /// Pre: x + attention output (LN2's input and the MLP's residual); post: h1 + MLP.
    s2: RegionId,
    /// Pre-norm only: LN2's output, the MLP's input.
    h2: Option<RegionId>,
    mean2: RegionId,
    rstd2: RegionId,
    u: RegionId,
    f: RegionId,
}

/// Per-pass scratch: the gradients of the activations inside the block, and the reduction
/// partials.
#[derive(Clone, Copy)]
struct Scratch {
    du: RegionId,
    dh2: RegionId,
    ds2: RegionId,
    dh1: RegionId,
    ds1: RegionId,
    d_o: RegionId,
    /// dq, dk, dv as the column blocks of one `(B·L, 3·W)` gradient.
    dqkv: RegionId,
    delta: RegionId,
    ln_part: RegionId,
    /// The partial weight gradients of a product split along the tokens; absent when no
    /// weight gradient of the block splits.
    split: Option<RegionId>,
}

/// Every region the block's plans touch besides its weights.
#[derive(Clone, Copy)]
struct Acts {
    /// Input and output, bf16 (B·L, W).
    x: RegionId,
    y: RegionId,
    /// Output and input gradients.
    dy: RegionId,
    dx: RegionId,
    k: Kept,
    s: Scratch,
}

/// Per-batch tables: the attention's sequence table, (3·B) int: the key length of each
/// sequence, then (packed batches) its first row and its rows.
struct Tables {
    seqlens: RegionId,
    /// False when the table is the previous block's (a twin), which writes it.
    own_seqlens: bool,
}

/// The forward and backward plans of one batch shape, over their own slot list.
struct Plans {
    slots: Vec<(RegionId, usize)>,
    forward: Vec<Step>,
    backward: Vec<Step>,
}

/// One block's arena layout and its forward and backward plans.
pub struct CudaBlock {
    dims: BlockDims,
    /// The table as it stood when the block was planned (the whole table for a standalone
    /// block); an arena must [`Layout::extends`] it.
    layout: Layout,
    /// The forward starts with the section-wide weight cast (standalone blocks only).
    cast: bool,
    /// Post-norm (BERT) rather than pre-norm.
    post: bool,
    params: Vec<RegionId>,
    /// The bf16 copies of `params`, read by the kernels.
    bf: Vec<RegionId>,
    grads: Vec<RegionId>,
    acts: Acts,
    tables: Tables,
    /// Plans per padded length (entry L − 1), each built on first use. Lazily rather than
    /// for every length up front: a block accepts any length up to `dims.len` (256 for the
    /// BERT context, times 12 blocks), while a training run pads to multiples of the text
    /// tile and so asks for a handful; building one costs only the planning of its launches
    /// (no compilation: shapes are launch arguments). The longest is built with the block.
    plans: Vec<OnceLock<Plans>>,
    /// Plans per packed row count m (entry ⌈m / [`PACKED_ROW_TILE`]⌉ − 1), built on first use.
    packed_plans: Vec<OnceLock<Plans>>,
    /// The batch shape selected last.
    sel: Mutex<BatchRows>,
}

impl CudaBlock {
    /// Lays out an arena of its own for `dims` and builds both plans; the forward starts by
    /// casting the fp32 master weights to bf16.
    pub fn new(dims: BlockDims) -> Result<Self> {
        let mut lay = Layout::new();
        Self::build(dims, &mut lay, "", None, true)
    }

    /// Adds the block's regions to a shared `layout` (made with [`Layout::grouped`]) with
    /// every name under `prefix` (`param.{prefix}ln_1.weight`, `act.{prefix}x`, ...), and
    /// builds both plans. With `prev`, the block reads `prev`'s output as its input and its
    /// backward writes the input gradient into `prev`'s output gradient, so a stack of blocks
    /// runs with no copy between them. The forward does not cast the weights: the owner of
    /// the layout casts the whole parameter section once.
    pub fn in_layout(
        dims: BlockDims,
        layout: &mut Layout,
        prefix: &str,
        prev: Option<&CudaBlock>,
    ) -> Result<Self> {
        Self::build(dims, layout, prefix, prev, false)
    }

    fn build(
        dims: BlockDims,
        lay: &mut Layout,
        prefix: &str,
        prev: Option<&CudaBlock>,
        cast: bool,
    ) -> Result<Self> {
        let (w, hd, f) = (dims.width, dims.heads, dims.hidden);
        ensure!(
            hd > 0 && w == hd * HEAD_DIM,
            "cuda block: width {w} with {hd} heads; the attention kernels need heads of {HEAD_DIM}"
        );
        ensure!(
            f > 0 && dims.batch > 0 && dims.len > 0,
            "cuda block: empty shape {dims:?}"
        );
        ensure!(
            dims.eps > 0.0 && dims.eps.is_finite(),
            "cuda block: eps must be positive, got {}",
            dims.eps
        );
        let m = dims.tokens();
        if let Some(p) = prev {
            ensure!(
                p.dims.width == w && p.dims.tokens() == m,
                "cuda block `{prefix}`: the previous block is {:?}, this one {dims:?}",
                p.dims
            );
        }
        let specs = param_specs(&dims);
        let mut params = Vec::new();
        for (name, shape) in &specs {
            let n = shape.iter().product();
            let name = format!("param.{prefix}{name}");
            params.push(lay.add(&name, Section::Params, Dtype::F32, n)?);
        }
        let mut bf = Vec::new();
        for (name, shape) in &specs {
            let n = shape.iter().product();
            let name = format!("bf16.{prefix}{name}");
            bf.push(lay.add(&name, Section::ParamsBf16, Dtype::Bf16, n)?);
        }
        let mut grads = Vec::new();
        for (name, shape) in &specs {
            let n = shape.iter().product();
            let name = format!("grad.{prefix}{name}");
            grads.push(lay.add(&name, Section::Grads, Dtype::F32, n)?);
        }
        let (bfl, f32l) = (Dtype::Bf16, Dtype::F32);
        let post = dims.norm == NormPlacement::Post;
        let x = match prev {
            Some(p) => p.output(),
            None => lay.add(&format!("act.{prefix}x"), Section::Acts, bfl, m * w)?,
        };
        // A block of a stack built like the one before it shares that block's scratch (one
        // backward runs at a time), its constant tables and, under recompute, its kept
        // activations (one block's are live at a time): only its output is its own.
        let twin = prev.filter(|p| p.dims == dims);
        let mut act = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("act.{prefix}{name}"), Section::Acts, dt, n)
        };
        let k = match twin {
            Some(p) if dims.recompute => p.acts.k,
            _ => Kept {
                s1: if post {
                    Some(act("s1", bfl, m * w)?)
                } else {
                    None
                },
                h1: act("h1", bfl, m * w)?,
                mean1: act("mean1", f32l, m)?,
                rstd1: act("rstd1", f32l, m)?,
                qkv: act("qkv", bfl, 3 * m * w)?,
                lse: act("lse", f32l, hd * m)?,
                o: act("o", bfl, m * w)?,
                s2: act("s2", bfl, m * w)?,
                h2: if post {
                    None
                } else {
                    Some(act("h2", bfl, m * w)?)
                },
                mean2: act("mean2", f32l, m)?,
                rstd2: act("rstd2", f32l, m)?,
                u: act("u", bfl, m * f)?,
                f: act("f", bfl, m * f)?,
            },
        };
        let y = act("y", bfl, m * w)?;
        let mut scr = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("scratch.{prefix}{name}"), Section::Scratch, dt, n)
        };
        let ln = LnShape {
            n: m,
            c: w,
            eps: dims.eps,
        };
        let s = match twin {
            Some(p) => p.acts.s,
            None => Scratch {
                du: scr("du", bfl, m * f)?,
                dh2: scr("dh2", bfl, m * w)?,
                ds2: scr("ds2", bfl, m * w)?,
                dh1: scr("dh1", bfl, m * w)?,
                ds1: scr("ds1", bfl, m * w)?,
                d_o: scr("do", bfl, m * w)?,
                dqkv: scr("dqkv", bfl, 3 * m * w)?,
                delta: scr("attn_delta", f32l, hd * m)?,
                ln_part: scr("ln_partials", f32l, backward_scratch_len(ln))?,
                split: match dims.split_workspace_len() {
                    0 => None,
                    n => Some(scr("splitk", f32l, n)?),
                },
            },
        };
        // The output gradients of a run of twins alternate between two buffers: a block reads
        // the one its predecessor writes (that block's own input gradient, free until then)
        // and writes the one its predecessor reads.
        let (dy, dx) = match (twin, prev) {
            (Some(p), _) => (p.acts.dx, p.acts.dy),
            (None, Some(p)) => (scr("dy", bfl, m * w)?, p.output_grad()),
            (None, None) => (scr("dy", bfl, m * w)?, scr("dx", bfl, m * w)?),
        };
        let mut tab = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("table.{prefix}{name}"), Section::Tables, dt, n)
        };
        let tables = Tables {
            seqlens: match twin {
                Some(p) => p.tables.seqlens,
                None => tab("seqlens", Dtype::I32, 3 * dims.batch)?,
            },
            own_seqlens: twin.is_none(),
        };
        let acts = Acts { x, y, dy, dx, k, s };
        let block = CudaBlock {
            dims,
            layout: lay.clone(),
            cast,
            post,
            params,
            bf,
            grads,
            acts,
            tables,
            plans: (0..dims.len).map(|_| OnceLock::new()).collect(),
            packed_plans: (0..=packed_slot("cuda block", dims.tokens(), dims.tokens())?)
                .map(|_| OnceLock::new())
                .collect(),
            sel: Mutex::new(BatchRows::Padded(dims.len)),
        };
        block.plans(BatchRows::Padded(dims.len))?;
        Ok(block)
    }

    /// The plans of a batch shape, built on first use.
    fn plans(&self, rows: BatchRows) -> Result<&Plans> {
        let cap = self.dims.tokens();
        let cell = match rows {
            BatchRows::Padded(len) => self.plans.get(len.wrapping_sub(1)).ok_or_else(|| {
                anyhow!(
                    "cuda block: padded length {len} is not in 1..={}",
                    self.dims.len
                )
            })?,
            BatchRows::Packed(m) => &self.packed_plans[packed_slot("cuda block", m, cap)?],
        };
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let p = self.build_plans(rows)?;
        Ok(cell.get_or_init(|| p))
    }

    /// Builds (once) and checks the plans of a packed batch of `m` rows, so that a caller can
    /// have every error of a batch before it writes anything.
    pub(super) fn prepare_packed(&self, m: usize) -> Result<()> {
        self.plans(BatchRows::Packed(m)).map(|_| ())
    }

    /// Builds the forward (weight cast included) and backward plans for a batch shape: every
    /// op runs on its m rows (B·len padded), the prefix of its regions.
    fn build_plans(&self, shape: BatchRows) -> Result<Plans> {
        let d = self.dims;
        let post = self.post;
        let m = match shape {
            BatchRows::Padded(len) => d.batch * len,
            BatchRows::Packed(m) => m,
        };
        let (w, hd, fh) = (d.width, d.heads, d.hidden);
        let lay = &self.layout;
        let (ac, tb) = (&self.acts, &self.tables);
        let s1 = || ac.k.s1.ok_or_else(|| anyhow!("post-norm block without s1"));
        let h2 = || ac.k.h2.ok_or_else(|| anyhow!("pre-norm block without h2"));
        let mut pl = Planner {
            layout: lay,
            slots: Vec::new(),
        };
        let part = |id: RegionId, off: usize, need: usize| {
            Some(Buf {
                id,
                off,
                need,
                span: false,
            })
        };
        // Regions of fixed size (weights, gradients, per-sequence tables) are used whole.
        let whole = |id: RegionId| part(id, 0, lay.region(id).len);
        // The first m·per_row elements of a `(B·L, per_row)` region: the planner checks that
        // the region (sized for the longest length) holds them.
        let rows = |id: RegionId, per_row: usize| part(id, 0, m * per_row);
        let wt = |p: Pm| whole(self.bf[p as usize]);
        let gr = |p: Pm| whole(self.grads[p as usize]);
        let ln = LnShape {
            n: m,
            c: w,
            eps: d.eps,
        };
        let gemm = |layout, mm, n, k| GemmShape {
            layout,
            batch: 1,
            m: mm,
            n,
            k,
            act: Epilogue::None,
        };
        // dX (M, n) = dY (M, k) · W (k, n) (+ residual) with slots [dY, residual, dX]: the
        // input-gradient layout reads W as stored, on either path.
        let dgrad = |pl: &mut Planner,
                     out: &mut Vec<Step>,
                     (n, k): (usize, usize),
                     wgt: Pm,
                     opts: GemmOpts,
                     [dy, res, dx]: [Option<Buf>; 3]|
         -> Result<()> {
            pl.add(
                out,
                gemm(GemmLayout::InputGrad, m, n, k).plan(opts)?,
                &[dy, wt(wgt), None, res, dx, None],
            )
        };
        let bias = GemmOpts {
            bias: true,
            path: d.gemm,
            ..GemmOpts::default()
        };
        let bias_res = GemmOpts {
            aux: AuxUse::Residual,
            ..bias
        };
        let wgrad = GemmOpts {
            out_f32: true,
            dbias: true,
            path: d.gemm,
            ..GemmOpts::default()
        };
        // dW (o, i) = dYᵀ·X and db = Σ dY over the m tokens, with slots [dY, X, dW, db], split
        // along the tokens where that fills the GPU ([`BlockDims::weight_grad_split`]; the
        // workspace region was sized at the longest length).
        let weight_grad = |pl: &mut Planner,
                           out: &mut Vec<Step>,
                           (o, i): (usize, usize),
                           [dy, x, dw, db]: [Option<Buf>; 4]|
         -> Result<()> {
            let cap = ac.s.split.map_or(0, |id| lay.region(id).len);
            let (split_k, ws) = d.weight_grad_split((o, i), m, cap);
            let work = match ac.s.split {
                Some(id) if split_k > 1 => part(id, 0, ws),
                _ => None,
            };
            pl.add(
                out,
                gemm(GemmLayout::WeightGrad, o, i, m).plan(GemmOpts { split_k, ..wgrad })?,
                &[dy, x, None, None, dw, db, work],
            )
        };
        let plain = GemmOpts {
            path: d.gemm,
            ..GemmOpts::default()
        };
        let with_res = GemmOpts {
            aux: AuxUse::Residual,
            ..plain
        };
        // The MLP's first layer and its activation in one pass each way: the forward stores
        // the pre-activation u (for the backward) and f = act(u); the input gradient of the
        // second layer comes out multiplied by act'(u), i.e. as the gradient of u.
        let mlp_act = match d.act {
            Activation::QuickGelu => Epilogue::QuickGelu,
            Activation::Gelu => Epilogue::Gelu,
        };
        let save_pre = GemmOpts {
            aux: AuxUse::SavePre,
            ..bias
        };
        let act_grad = GemmOpts {
            aux: AuxUse::ActGrad,
            ..plain
        };
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        let attn = match shape {
            BatchRows::Padded(len) => AttnShape {
                qkv_pitch: 3 * w,
                o_pitch: w,
                ..AttnShape::packed(d.batch, hd, len, false, scale)
            },
            // The table places the sequences; L bounds their rows and sizes the grid (tiles
            // past a sequence's rows return at once).
            BatchRows::Packed(m) => AttnShape {
                qkv_pitch: 3 * w,
                o_pitch: w,
                varlen: Some(m),
                ..AttnShape::packed(d.batch, hd, d.packed_rows_cap(), false, scale)
            },
        };
        // q, k or v (i = 0, 1, 2): the i-th W columns of an `(m, 3·W)` region, from its first
        // row's column i·W to the last row's column (i + 1)·W.
        let qkv_view = |id: RegionId, i: usize| part(id, i * w, attn.span(3 * w));
        let (mut forward, mut backward) = (Vec::new(), Vec::new());
        let (fwd, bwd) = (&mut forward, &mut backward);

        // ---- forward ----
        if self.cast {
            cast_weights(&mut pl, fwd)?;
        }
        let cast_steps = fwd.len();
        // Attention input: LN1(x) (pre) or x itself (post).
        let attn_in = if post {
            ac.x
        } else {
            pl.add(
                fwd,
                ln.norm_plan()?,
                &[
                    rows(ac.x, w),
                    None,
                    wt(Pm::Ln1G),
                    wt(Pm::Ln1B),
                    None,
                    rows(ac.k.h1, w),
                    rows(ac.k.mean1, 1),
                    rows(ac.k.rstd1, 1),
                ],
            )?;
            ac.k.h1
        };
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, 3 * w, w).plan(bias)?,
            &[
                rows(attn_in, w),
                wt(Pm::Wqkv),
                wt(Pm::Bqkv),
                None,
                rows(ac.k.qkv, 3 * w),
                None,
            ],
        )?;
        pl.add(
            fwd,
            attn.forward_plan(true)?,
            &[
                qkv_view(ac.k.qkv, 0),
                qkv_view(ac.k.qkv, 1),
                qkv_view(ac.k.qkv, 2),
                whole(tb.seqlens),
                rows(ac.k.o, w),
                rows(ac.k.lse, hd),
            ],
        )?;
        // The residual stream after the attention, s = x + o·Woᵀ + bo, comes out of the
        // projection's epilogue; then pre: h2 = LN2(s2), post: h1 = LN1(s1).
        let (ln_g, ln_b, s, h, mean, rstd) = if post {
            (Pm::Ln1G, Pm::Ln1B, s1()?, ac.k.h1, ac.k.mean1, ac.k.rstd1)
        } else {
            (Pm::Ln2G, Pm::Ln2B, ac.k.s2, h2()?, ac.k.mean2, ac.k.rstd2)
        };
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, w, w).plan(bias_res)?,
            &[
                rows(ac.k.o, w),
                wt(Pm::Wo),
                wt(Pm::Bo),
                rows(ac.x, w),
                rows(s, w),
                None,
            ],
        )?;
        pl.add(
            fwd,
            ln.norm_plan()?,
            &[
                rows(s, w),
                None,
                wt(ln_g),
                wt(ln_b),
                None,
                rows(h, w),
                rows(mean, 1),
                rows(rstd, 1),
            ],
        )?;
        let mlp_in = h;
        pl.add(
            fwd,
            GemmShape {
                act: mlp_act,
                ..gemm(GemmLayout::Forward, m, fh, w)
            }
            .plan(save_pre)?,
            &[
                rows(mlp_in, w),
                wt(Pm::W1),
                wt(Pm::B1),
                rows(ac.k.u, fh),
                rows(ac.k.f, fh),
                None,
            ],
        )?;
        // The MLP output with the residual around it: pre, y = s2 + MLP; post,
        // s2 = h1 + MLP, then y = LN2(s2).
        let (res, out) = if post {
            (ac.k.h1, ac.k.s2)
        } else {
            (ac.k.s2, ac.y)
        };
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, w, fh).plan(bias_res)?,
            &[
                rows(ac.k.f, fh),
                wt(Pm::W2),
                wt(Pm::B2),
                rows(res, w),
                rows(out, w),
                None,
            ],
        )?;
        if post {
            pl.add(
                fwd,
                ln.norm_plan()?,
                &[
                    rows(ac.k.s2, w),
                    None,
                    wt(Pm::Ln2G),
                    wt(Pm::Ln2B),
                    None,
                    rows(ac.y, w),
                    rows(ac.k.mean2, 1),
                    rows(ac.k.rstd2, 1),
                ],
            )?;
        }

        // ---- backward ----
        // The gradient reaching the MLP output (`dmlp`) and the LayerNorm after it.
        let dmlp = if post {
            pl.add(
                bwd,
                ln.backward_plan(false)?,
                &[
                    rows(ac.dy, w),
                    rows(ac.k.s2, w),
                    wt(Pm::Ln2G),
                    rows(ac.k.mean2, 1),
                    rows(ac.k.rstd2, 1),
                    None,
                    rows(ac.s.ds2, w),
                    gr(Pm::Ln2G),
                    gr(Pm::Ln2B),
                    part(ac.s.ln_part, 0, backward_scratch_len(ln)),
                ],
            )?;
            ac.s.ds2
        } else {
            ac.dy
        };
        weight_grad(
            &mut pl,
            bwd,
            (w, fh),
            [rows(dmlp, w), rows(ac.k.f, fh), gr(Pm::W2), gr(Pm::B2)],
        )?;
        // du = (dmlp·W2) ∘ act'(u).
        pl.add(
            bwd,
            GemmShape {
                act: mlp_act,
                ..gemm(GemmLayout::InputGrad, m, fh, w)
            }
            .plan(act_grad)?,
            &[
                rows(dmlp, w),
                wt(Pm::W2),
                None,
                rows(ac.k.u, fh),
                rows(ac.s.du, fh),
                None,
            ],
        )?;
        weight_grad(
            &mut pl,
            bwd,
            (fh, w),
            [rows(ac.s.du, fh), rows(mlp_in, w), gr(Pm::W1), gr(Pm::B1)],
        )?;
        // The gradient reaching the attention output: post, dh1 = du·W1 + ds2, then LN1;
        // pre, dh2 = du·W1, then LN2 with the residual gradient dy added.
        let dattn = if post {
            dgrad(
                &mut pl,
                bwd,
                (w, fh),
                Pm::W1,
                with_res,
                [rows(ac.s.du, fh), rows(ac.s.ds2, w), rows(ac.s.dh1, w)],
            )?;
            pl.add(
                bwd,
                ln.backward_plan(false)?,
                &[
                    rows(ac.s.dh1, w),
                    rows(s1()?, w),
                    wt(Pm::Ln1G),
                    rows(ac.k.mean1, 1),
                    rows(ac.k.rstd1, 1),
                    None,
                    rows(ac.s.ds1, w),
                    gr(Pm::Ln1G),
                    gr(Pm::Ln1B),
                    part(ac.s.ln_part, 0, backward_scratch_len(ln)),
                ],
            )?;
            ac.s.ds1
        } else {
            dgrad(
                &mut pl,
                bwd,
                (w, fh),
                Pm::W1,
                plain,
                [rows(ac.s.du, fh), None, rows(ac.s.dh2, w)],
            )?;
            pl.add(
                bwd,
                ln.backward_plan(true)?,
                &[
                    rows(ac.s.dh2, w),
                    rows(ac.k.s2, w),
                    wt(Pm::Ln2G),
                    rows(ac.k.mean2, 1),
                    rows(ac.k.rstd2, 1),
                    rows(ac.dy, w),
                    rows(ac.s.ds2, w),
                    gr(Pm::Ln2G),
                    gr(Pm::Ln2B),
                    part(ac.s.ln_part, 0, backward_scratch_len(ln)),
                ],
            )?;
            ac.s.ds2
        };
        weight_grad(
            &mut pl,
            bwd,
            (w, w),
            [rows(dattn, w), rows(ac.k.o, w), gr(Pm::Wo), gr(Pm::Bo)],
        )?;
        dgrad(
            &mut pl,
            bwd,
            (w, w),
            Pm::Wo,
            plain,
            [rows(dattn, w), None, rows(ac.s.d_o, w)],
        )?;
        pl.add(
            bwd,
            attn.backward_plan(true)?,
            &[
                qkv_view(ac.k.qkv, 0),
                qkv_view(ac.k.qkv, 1),
                qkv_view(ac.k.qkv, 2),
                rows(ac.k.o, w),
                rows(ac.k.lse, hd),
                rows(ac.s.d_o, w),
                whole(tb.seqlens),
                qkv_view(ac.s.dqkv, 0),
                qkv_view(ac.s.dqkv, 1),
                qkv_view(ac.s.dqkv, 2),
                rows(ac.s.delta, hd),
            ],
        )?;
        weight_grad(
            &mut pl,
            bwd,
            (3 * w, w),
            [
                rows(ac.s.dqkv, 3 * w),
                rows(attn_in, w),
                gr(Pm::Wqkv),
                gr(Pm::Bqkv),
            ],
        )?;
        if post {
            // dx = dqkv·Wqkv + ds1 (the residual around the attention).
            dgrad(
                &mut pl,
                bwd,
                (w, 3 * w),
                Pm::Wqkv,
                with_res,
                [rows(ac.s.dqkv, 3 * w), rows(ac.s.ds1, w), rows(ac.dx, w)],
            )?;
        } else {
            dgrad(
                &mut pl,
                bwd,
                (w, 3 * w),
                Pm::Wqkv,
                plain,
                [rows(ac.s.dqkv, 3 * w), None, rows(ac.s.dh1, w)],
            )?;
            // dx = LN1ᵀ(dh1) + ds2 (the residual around the attention); LN1 normalised x.
            pl.add(
                bwd,
                ln.backward_plan(true)?,
                &[
                    rows(ac.s.dh1, w),
                    rows(ac.x, w),
                    wt(Pm::Ln1G),
                    rows(ac.k.mean1, 1),
                    rows(ac.k.rstd1, 1),
                    rows(ac.s.ds2, w),
                    rows(ac.dx, w),
                    gr(Pm::Ln1G),
                    gr(Pm::Ln1B),
                    part(ac.s.ln_part, 0, backward_scratch_len(ln)),
                ],
            )?;
        }
        if d.recompute {
            // The backward starts by recomputing the forward (weights already cast) from the
            // block's input: same kernels on the same input, so the same activations.
            backward.splice(0..0, forward[cast_steps..].iter().cloned());
        }
        Ok(Plans {
            slots: pl.slots,
            forward,
            backward,
        })
    }

    /// The sizes the block was built for.
    pub fn dims(&self) -> &BlockDims {
        &self.dims
    }

    /// The split-K workspace of the block's weight gradients (shared by its twins); absent
    /// when none splits. Its tower's other weight gradients borrow it once the blocks' backward
    /// is done.
    pub(super) fn split_workspace(&self) -> Option<RegionId> {
        self.acts.s.split
    }

    /// The arena layout (for a block made by [`CudaBlock::in_layout`], the shared table as
    /// it stood after the block's regions were added); make a standalone block's arena with
    /// `Arena::host(block.layout().clone(), emu)` or `Arena::device(block.layout().clone(), gpu)`.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Launches per forward and per backward at the longest length (shorter lengths may
    /// split fewer weight gradients along the tokens, so their backward can have fewer).
    pub fn launches(&self) -> (usize, usize) {
        self.plans
            .last()
            .and_then(OnceLock::get)
            .map_or((0, 0), |p| (p.forward.len(), p.backward.len()))
    }

    /// The kernels of the forward and backward plans at padded length `len` (built now if
    /// they were not), in launch order.
    pub fn kernel_names_at(&self, len: usize) -> Result<(Vec<&'static str>, Vec<&'static str>)> {
        let p = self.plans(BatchRows::Padded(len))?;
        let names = |v: &[Step]| v.iter().map(|s| s.kernel).collect();
        Ok((names(&p.forward), names(&p.backward)))
    }

    /// The kernels of the forward and of the backward plan at the longest length, in launch
    /// order.
    pub fn kernel_names(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        // `new` built these plans, so this cannot fail.
        self.kernel_names_at(self.dims.len).unwrap_or_default()
    }

    /// The shape of the current batch (the last one set; `dims().len` padded before any).
    /// The block, not the arena, holds it: an arena shared by two batches in flight would need
    /// a block each.
    pub fn batch_rows(&self) -> BatchRows {
        // A poisoned lock still holds a whole `BatchRows` (it is only ever assigned).
        *self.sel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The padded length L of the current batch; `None` when it is packed.
    pub fn padded_len(&self) -> Option<usize> {
        match self.batch_rows() {
            BatchRows::Padded(len) => Some(len),
            BatchRows::Packed(_) => None,
        }
    }

    fn select(&self, rows: BatchRows) {
        *self.sel.lock().unwrap_or_else(|e| e.into_inner()) = rows;
    }

    fn spec_index(&self, name: &str) -> Result<usize> {
        param_specs(&self.dims)
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| anyhow!("cuda block has no parameter `{name}`"))
    }

    /// The fp32 master region of parameter `name` (a [`param_specs`] name).
    pub fn param(&self, name: &str) -> Result<RegionId> {
        Ok(self.params[self.spec_index(name)?])
    }

    /// The fp32 gradient region of parameter `name`.
    pub fn grad(&self, name: &str) -> Result<RegionId> {
        Ok(self.grads[self.spec_index(name)?])
    }

    /// The block's input `x`, bf16 (B·L, W).
    pub fn input(&self) -> RegionId {
        self.acts.x
    }

    /// The block's output `y`, bf16 (B·L, W).
    pub fn output(&self) -> RegionId {
        self.acts.y
    }

    /// The gradient arriving at the output, bf16 (B·L, W), read by the backward.
    pub fn output_grad(&self) -> RegionId {
        self.acts.dy
    }

    /// The gradient of the input, bf16 (B·L, W), written by the backward.
    pub fn input_grad(&self) -> RegionId {
        self.acts.dx
    }

    fn check_arena(&self, arena: &Arena) -> Result<()> {
        ensure!(
            arena.layout().extends(&self.layout),
            "the arena was not made from this block's layout"
        );
        Ok(())
    }

    /// Writes the valid length of each sequence (key padding: keys at positions ≥
    /// `lengths[b]` are hidden from every query of sequence b) for a batch padded to the
    /// longest length, `dims().len`.
    pub fn set_lengths(&self, arena: &mut Arena, lengths: &[usize]) -> Result<()> {
        self.set_padded_lengths(arena, self.dims.len, lengths)
    }

    /// Selects a batch padded to `len` tokens per sequence (1..=`dims().len`): the next
    /// [`CudaBlock::forward`] and [`CudaBlock::backward`] run on the first B·`len` rows of the
    /// input, output and every activation. Writes the valid length of each sequence (each at
    /// most `len`; keys at positions ≥ `lengths[b]` are hidden from every query of sequence
    /// b): `heads · batch` integers, the only per-batch upload of the block. A block that shares
    /// the table of the block before it (built alike) leaves the write to that block: set the
    /// lengths of a stack from its first block on.
    pub fn set_padded_lengths(
        &self,
        arena: &mut Arena,
        len: usize,
        lengths: &[usize],
    ) -> Result<()> {
        self.check_arena(arena)?;
        let d = &self.dims;
        ensure!(
            lengths.len() == d.batch,
            "cuda block: {} sequence lengths for a batch of {}",
            lengths.len(),
            d.batch
        );
        if let Some((b, &n)) = lengths.iter().enumerate().find(|(_, &n)| n > len) {
            bail!("cuda block: sequence {b} has length {n}, the batch is padded to {len}");
        }
        // Built (and checked) before anything is written.
        self.plans(BatchRows::Padded(len))?;
        // Lengths are at most `len` ≤ `dims.len`, which the plan's i32 shapes already hold.
        if self.tables.own_seqlens {
            let mut table = vec![0i32; 3 * d.batch];
            for (t, &n) in table.iter_mut().zip(lengths) {
                *t = n as i32;
            }
            arena.write_i32(self.tables.seqlens, &table)?;
        }
        self.select(BatchRows::Padded(len));
        Ok(())
    }

    /// Selects a packed batch: its B sequences lie back to back in the first `m` rows of the
    /// input, output and every activation (`seqs[0]` from row 0, each starting where the one
    /// before ends, the last ending at row m), with no padding; every op runs on those m rows
    /// and the attention reads each sequence's own (see [`PackedSeq`]). `m` is a multiple of
    /// [`PACKED_ROW_TILE`] up to B·L, or B·L; a sequence has at most
    /// [`BlockDims::packed_rows_cap`] rows. Writes the attention's table (3·B integers) as
    /// [`CudaBlock::set_padded_lengths`] writes its lengths: set a stack from its first block on.
    pub fn set_packed(&self, arena: &mut Arena, m: usize, seqs: &[PackedSeq]) -> Result<()> {
        self.check_arena(arena)?;
        let d = &self.dims;
        ensure!(
            seqs.len() == d.batch,
            "cuda block: {} packed sequences for a batch of {}",
            seqs.len(),
            d.batch
        );
        let mut end = 0;
        for (b, s) in seqs.iter().enumerate() {
            ensure!(
                s.row0 == end,
                "cuda block: packed sequence {b} starts at row {}, the one before ends at {end}",
                s.row0
            );
            ensure!(
                s.keys <= s.rows && s.rows <= d.packed_rows_cap(),
                "cuda block: packed sequence {b} has {} keys in {} rows; at most {} rows, \
                 and no more keys than rows",
                s.keys,
                s.rows,
                d.packed_rows_cap()
            );
            end += s.rows;
        }
        ensure!(
            end == m,
            "cuda block: the packed sequences cover {end} rows, the batch has {m}"
        );
        // Built (and checked) before anything is written; m ≤ B·L fits the shapes' i32s.
        self.plans(BatchRows::Packed(m))?;
        if self.tables.own_seqlens {
            let col = |f: fn(&PackedSeq) -> usize| seqs.iter().map(move |s| f(s) as i32);
            let table: Vec<i32> = col(|s| s.keys)
                .chain(col(|s| s.row0))
                .chain(col(|s| s.rows))
                .collect();
            arena.write_i32(self.tables.seqlens, &table)?;
        }
        self.select(BatchRows::Packed(m));
        Ok(())
    }

    /// Forward at the selected padded length: casts the master weights to bf16 (standalone
    /// blocks), then computes `y` from `x`.
    pub fn forward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        let p = self.plans(self.batch_rows())?;
        // SAFETY: the arena has this block's layout and every slot was checked against its
        // region when the plan was built.
        unsafe { arena.run(&p.forward, &p.slots) }
    }

    /// Backward from `output_grad` at the selected padded length: parameter gradients
    /// (overwritten) and `input_grad`. Uses the activations of the last
    /// [`CudaBlock::forward`], or under `dims().recompute` recomputes them from `input`
    /// (which must still hold what that forward read).
    pub fn backward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        let p = self.plans(self.batch_rows())?;
        // SAFETY: as in `forward`.
        unsafe { arena.run(&p.backward, &p.slots) }
    }
}

/// Appends the cast of the whole fp32 parameter section to its bf16 twin (one launch): the
/// two sections hold the same parameters in the same order, element for element.
pub(super) fn cast_weights(pl: &mut Planner, out: &mut Vec<Step>) -> Result<()> {
    let lay = pl.layout;
    let first = |s: Section| {
        lay.regions()
            .iter()
            .position(|r| r.section == s)
            .and_then(|i| lay.id(&lay.regions()[i].name))
            .ok_or_else(|| anyhow!("arena layout has no {s:?} section"))
    };
    let (p0, b0) = (first(Section::Params)?, first(Section::ParamsBf16)?);
    let (_, pbytes) = lay
        .section_span(Section::Params)
        .ok_or_else(|| anyhow!("arena layout has no parameters"))?;
    let n = pbytes / 4;
    let span = |id: RegionId| {
        Some(Buf {
            id,
            off: 0,
            need: n,
            span: true,
        })
    };
    pl.add(out, Ew::CastF32Bf16 { n }.plan()?, &[span(p0), span(b0)])
}
