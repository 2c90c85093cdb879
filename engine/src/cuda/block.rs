//! One transformer block, forward and backward, as launch plans over one [`Arena`]: the
//! open_clip pre-norm block (`x + attn(LN1(x))`, then `+ MLP(LN2(x))`) or the BERT post-norm
//! block (`LN1(x + attn(x))`, then `LN2(h + MLP(h))`), the MLP with QuickGELU or erf GELU.
//!
//! Every op is a kernel of `mmkd-kernels`: GEMMs with fused bias and residual epilogues (the
//! weight gradients with the bias gradient reduced in the same pass), the fused attention with
//! a key-padding mask, LayerNorm fused with the residual add, and the elementwise kernels for
//! the activation, the weight cast and the head split/merge. Activations are bf16; master
//! weights, gradients, LayerNorm statistics and the attention's log-sum-exp are fp32.
//!
//! Heads. The attention kernel takes `(Z, L, 64)` tensors. The QKV projection writes
//! `(B·L, 3·W)`; an embedding-gather with 64-wide rows and a fixed index table permutes it
//! into `(3, H, B, L, 64)`, so attention runs with `Z = H·B` "sequences" of one head each and
//! the key lengths repeated per head. Gathers with the inverse tables merge the heads back and
//! carry the gradients the other way.
//!
//! Stacks. [`CudaBlock::in_layout`] adds a block to a shared [`Layout::grouped`] table under
//! a name prefix, reading the previous block's output as its input and writing its input
//! gradient into the previous block's output gradient; the towers build on it.
//!
//! Gradients are overwritten by each backward (the kernels store, they do not accumulate).

use super::arena::{Arena, Dtype, Layout, RegionId, Section};
use crate::config::{Activation, NormPlacement};
use anyhow::{anyhow, bail, ensure, Result};
use mmkd_kernels::attention::{AttnShape, HEAD_DIM};
use mmkd_kernels::elementwise::{Act, Ew};
use mmkd_kernels::exec::{Step, P};
use mmkd_kernels::gemm::{Activation as Epilogue, GemmLayout, GemmOpts, GemmShape};
use mmkd_kernels::layernorm::{backward_scratch_len, LnShape};

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
    /// Tokens L per sequence (the padded length).
    pub len: usize,
}

impl BlockDims {
    /// Tokens per batch, B·L.
    pub fn tokens(&self) -> usize {
        self.batch * self.len
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
                    P::Buf(i) | P::At(i, _) => i,
                    _ => continue,
                };
                let global = map.get(local).copied().flatten().ok_or_else(|| {
                    anyhow!("{}: plan slot {local} has no buffer in the block", s.kernel)
                })?;
                *a = match *a {
                    P::At(_, off) => P::At(global, off),
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

/// Activation and scratch regions (see the module docs for the head layout).
struct Acts {
    x: RegionId,
    /// Pre-norm only: the zero residual of LN1 (the fused kernel always adds one).
    zero: Option<RegionId>,
    s1: RegionId,
    h1: RegionId,
    mean1: RegionId,
    rstd1: RegionId,
    qkv: RegionId,
    qkvh: RegionId,
    lse: RegionId,
    oh: RegionId,
    o: RegionId,
    a: RegionId,
    s2: RegionId,
    h2: RegionId,
    mean2: RegionId,
    rstd2: RegionId,
    u: RegionId,
    f: RegionId,
    /// Post-norm only: the MLP output, added to h1 by LN2.
    m: Option<RegionId>,
    y: RegionId,
    dy: RegionId,
    df: RegionId,
    du: RegionId,
    dh2: RegionId,
    ds2: RegionId,
    dh1: RegionId,
    ds1: RegionId,
    d_o: RegionId,
    doh: RegionId,
    dqkvh: RegionId,
    dqkv: RegionId,
    dx: RegionId,
    delta: RegionId,
    ln_part: RegionId,
}

/// Index tables and lengths.
struct Tables {
    split: RegionId,
    merge: RegionId,
    heads: RegionId,
    unsplit: RegionId,
    seqlens: RegionId,
    bad: RegionId,
}

/// One block's arena layout and its forward and backward plans.
pub struct CudaBlock {
    dims: BlockDims,
    /// The table as it stood when the block was planned (the whole table for a standalone
    /// block); an arena must [`Layout::extends`] it.
    layout: Layout,
    /// The forward starts with the section-wide weight cast (standalone blocks only).
    cast: bool,
    params: Vec<RegionId>,
    grads: Vec<RegionId>,
    acts: Acts,
    tables: Tables,
    slots: Vec<(RegionId, usize)>,
    forward: Vec<Step>,
    backward: Vec<Step>,
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
        let x = match prev {
            Some(p) => p.output(),
            None => lay.add(&format!("act.{prefix}x"), Section::Acts, bfl, m * w)?,
        };
        let mut act = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("act.{prefix}{name}"), Section::Acts, dt, n)
        };
        let post = dims.norm == NormPlacement::Post;
        let (s1, h1) = (act("s1", bfl, m * w)?, act("h1", bfl, m * w)?);
        let (mean1, rstd1) = (act("mean1", f32l, m)?, act("rstd1", f32l, m)?);
        let qkvh = act("qkv_heads", bfl, 3 * m * w)?;
        let (lse, oh) = (act("lse", f32l, hd * m)?, act("o_heads", bfl, m * w)?);
        let (o, a) = (act("o", bfl, m * w)?, act("attn_out", bfl, m * w)?);
        let (s2, h2) = (act("s2", bfl, m * w)?, act("h2", bfl, m * w)?);
        let (mean2, rstd2) = (act("mean2", f32l, m)?, act("rstd2", f32l, m)?);
        let (u, fa) = (act("u", bfl, m * f)?, act("f", bfl, m * f)?);
        let mo = if post {
            Some(act("mlp_out", bfl, m * w)?)
        } else {
            None
        };
        let y = act("y", bfl, m * w)?;
        let mut scr = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("scratch.{prefix}{name}"), Section::Scratch, dt, n)
        };
        // The packed projection is only read by the head split, so it is not kept.
        let qkv = scr("qkv", bfl, 3 * m * w)?;
        let dy = scr("dy", bfl, m * w)?;
        let (df, du) = (scr("df", bfl, m * f)?, scr("du", bfl, m * f)?);
        let (dh2, ds2) = (scr("dh2", bfl, m * w)?, scr("ds2", bfl, m * w)?);
        let (dh1, ds1) = (scr("dh1", bfl, m * w)?, scr("ds1", bfl, m * w)?);
        let (d_o, doh) = (scr("do", bfl, m * w)?, scr("do_heads", bfl, m * w)?);
        let (dqkvh, dqkv) = (
            scr("dqkv_heads", bfl, 3 * m * w)?,
            scr("dqkv", bfl, 3 * m * w)?,
        );
        let dx = match prev {
            Some(p) => p.output_grad(),
            None => scr("dx", bfl, m * w)?,
        };
        let delta = scr("attn_delta", f32l, hd * m)?;
        let ln = LnShape {
            n: m,
            c: w,
            eps: dims.eps,
        };
        let ln_part = scr("ln_partials", f32l, backward_scratch_len(ln))?;
        let mut tab = |name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("table.{prefix}{name}"), Section::Tables, dt, n)
        };
        let zero = if post {
            None
        } else {
            Some(tab("zero", bfl, m * w)?)
        };
        let tables = Tables {
            split: tab("split_heads", Dtype::I32, 3 * m * hd)?,
            merge: tab("merge_heads", Dtype::I32, m * hd)?,
            heads: tab("grad_heads", Dtype::I32, m * hd)?,
            unsplit: tab("grad_merge_qkv", Dtype::I32, 3 * m * hd)?,
            seqlens: tab("seqlens", Dtype::I32, hd * dims.batch)?,
            bad: tab("bad_index_count", Dtype::I32, 1)?,
        };
        let acts = Acts {
            x,
            zero,
            s1,
            h1,
            mean1,
            rstd1,
            qkv,
            qkvh,
            lse,
            oh,
            o,
            a,
            s2,
            h2,
            mean2,
            rstd2,
            u,
            f: fa,
            m: mo,
            y,
            dy,
            df,
            du,
            dh2,
            ds2,
            dh1,
            ds1,
            d_o,
            doh,
            dqkvh,
            dqkv,
            dx,
            delta,
            ln_part,
        };
        let mut block = CudaBlock {
            dims,
            layout: lay.clone(),
            cast,
            params,
            grads,
            acts,
            tables,
            slots: Vec::new(),
            forward: Vec::new(),
            backward: Vec::new(),
        };
        block.build_plans(&bf, post)?;
        Ok(block)
    }

    /// Builds the forward (weight cast included) and backward plans.
    fn build_plans(&mut self, bf: &[RegionId], post: bool) -> Result<()> {
        let d = self.dims;
        let (w, hd, fh, m) = (d.width, d.heads, d.hidden, d.tokens());
        let hm = hd * m;
        let lay = &self.layout;
        let (ac, tb) = (&self.acts, &self.tables);
        let mut pl = Planner {
            layout: lay,
            slots: Vec::new(),
        };
        let whole = |id: RegionId| {
            Some(Buf {
                id,
                off: 0,
                need: lay.region(id).len,
                span: false,
            })
        };
        let part = |id: RegionId, off: usize, need: usize| {
            Some(Buf {
                id,
                off,
                need,
                span: false,
            })
        };
        let wt = |p: Pm| whole(bf[p as usize]);
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
        let bias = GemmOpts {
            bias: true,
            ..GemmOpts::default()
        };
        let bias_res = GemmOpts {
            residual: true,
            ..bias
        };
        let wgrad = GemmOpts {
            out_f32: true,
            dbias: true,
            ..GemmOpts::default()
        };
        let plain = GemmOpts::default();
        let with_res = GemmOpts {
            residual: true,
            ..plain
        };
        let attn = AttnShape {
            batch: hd * d.batch,
            heads: 1,
            len: d.len,
            causal: false,
            scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        };
        let act = match d.act {
            Activation::QuickGelu => Act::QuickGelu,
            Activation::Gelu => Act::Gelu,
        };
        let e = HEAD_DIM;
        let gather = |rows: usize| Ew::Gather {
            n: rows,
            v: rows,
            c: e,
        };
        let bad = whole(tb.bad);
        let qkv_view = |id: RegionId, i: usize| part(id, i * hm * e, hm * e);
        let (fwd, bwd) = (&mut self.forward, &mut self.backward);

        // ---- forward ----
        if self.cast {
            cast_weights(&mut pl, fwd)?;
        }
        // Attention input: LN1(x) (pre) or x itself (post).
        let attn_in = if post {
            ac.x
        } else {
            pl.add(
                fwd,
                ln.forward_plan()?,
                &[
                    whole(ac.x),
                    whole(
                        ac.zero
                            .ok_or_else(|| anyhow!("pre-norm block without zero residual"))?,
                    ),
                    wt(Pm::Ln1G),
                    wt(Pm::Ln1B),
                    whole(ac.s1),
                    whole(ac.h1),
                    whole(ac.mean1),
                    whole(ac.rstd1),
                ],
            )?;
            ac.h1
        };
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, 3 * w, w).plan(bias)?,
            &[
                whole(attn_in),
                wt(Pm::Wqkv),
                wt(Pm::Bqkv),
                None,
                whole(ac.qkv),
                None,
            ],
        )?;
        let g = gather(3 * hm);
        pl.add(
            fwd,
            g.plan()?,
            &[whole(ac.qkv), whole(tb.split), whole(ac.qkvh), bad],
        )?;
        pl.add(
            fwd,
            attn.forward_plan(true)?,
            &[
                qkv_view(ac.qkvh, 0),
                qkv_view(ac.qkvh, 1),
                qkv_view(ac.qkvh, 2),
                whole(tb.seqlens),
                whole(ac.oh),
                whole(ac.lse),
            ],
        )?;
        pl.add(
            fwd,
            gather(hm).plan()?,
            &[whole(ac.oh), whole(tb.merge), whole(ac.o), bad],
        )?;
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, w, w).plan(bias)?,
            &[whole(ac.o), wt(Pm::Wo), wt(Pm::Bo), None, whole(ac.a), None],
        )?;
        // Pre: s2 = x + a, h2 = LN2(s2). Post: s1 = x + a, h1 = LN1(s1).
        let (ln_g, ln_b, s, h, mean, rstd) = if post {
            (Pm::Ln1G, Pm::Ln1B, ac.s1, ac.h1, ac.mean1, ac.rstd1)
        } else {
            (Pm::Ln2G, Pm::Ln2B, ac.s2, ac.h2, ac.mean2, ac.rstd2)
        };
        pl.add(
            fwd,
            ln.forward_plan()?,
            &[
                whole(ac.x),
                whole(ac.a),
                wt(ln_g),
                wt(ln_b),
                whole(s),
                whole(h),
                whole(mean),
                whole(rstd),
            ],
        )?;
        let mlp_in = h;
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, m, fh, w).plan(bias)?,
            &[
                whole(mlp_in),
                wt(Pm::W1),
                wt(Pm::B1),
                None,
                whole(ac.u),
                None,
            ],
        )?;
        pl.add(
            fwd,
            Ew::ActFwd { n: m * fh, act }.plan()?,
            &[whole(ac.u), whole(ac.f)],
        )?;
        if let Some(mo) = ac.m {
            pl.add(
                fwd,
                gemm(GemmLayout::Forward, m, w, fh).plan(bias)?,
                &[whole(ac.f), wt(Pm::W2), wt(Pm::B2), None, whole(mo), None],
            )?;
            pl.add(
                fwd,
                ln.forward_plan()?,
                &[
                    whole(ac.h1),
                    whole(mo),
                    wt(Pm::Ln2G),
                    wt(Pm::Ln2B),
                    whole(ac.s2),
                    whole(ac.y),
                    whole(ac.mean2),
                    whole(ac.rstd2),
                ],
            )?;
        } else {
            pl.add(
                fwd,
                gemm(GemmLayout::Forward, m, w, fh).plan(bias_res)?,
                &[
                    whole(ac.f),
                    wt(Pm::W2),
                    wt(Pm::B2),
                    whole(ac.s2),
                    whole(ac.y),
                    None,
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
                    whole(ac.dy),
                    whole(ac.s2),
                    wt(Pm::Ln2G),
                    whole(ac.mean2),
                    whole(ac.rstd2),
                    None,
                    whole(ac.ds2),
                    gr(Pm::Ln2G),
                    gr(Pm::Ln2B),
                    whole(ac.ln_part),
                ],
            )?;
            ac.ds2
        } else {
            ac.dy
        };
        pl.add(
            bwd,
            gemm(GemmLayout::WeightGrad, w, fh, m).plan(wgrad)?,
            &[whole(dmlp), whole(ac.f), None, None, gr(Pm::W2), gr(Pm::B2)],
        )?;
        pl.add(
            bwd,
            gemm(GemmLayout::InputGrad, m, fh, w).plan(plain)?,
            &[whole(dmlp), wt(Pm::W2), None, None, whole(ac.df), None],
        )?;
        pl.add(
            bwd,
            Ew::ActBwd { n: m * fh, act }.plan()?,
            &[whole(ac.u), whole(ac.df), whole(ac.du)],
        )?;
        pl.add(
            bwd,
            gemm(GemmLayout::WeightGrad, fh, w, m).plan(wgrad)?,
            &[
                whole(ac.du),
                whole(mlp_in),
                None,
                None,
                gr(Pm::W1),
                gr(Pm::B1),
            ],
        )?;
        // The gradient reaching the attention output: post, dh1 = du·W1 + ds2, then LN1;
        // pre, dh2 = du·W1, then LN2 with the residual gradient dy added.
        let dattn = if post {
            pl.add(
                bwd,
                gemm(GemmLayout::InputGrad, m, w, fh).plan(with_res)?,
                &[
                    whole(ac.du),
                    wt(Pm::W1),
                    None,
                    whole(ac.ds2),
                    whole(ac.dh1),
                    None,
                ],
            )?;
            pl.add(
                bwd,
                ln.backward_plan(false)?,
                &[
                    whole(ac.dh1),
                    whole(ac.s1),
                    wt(Pm::Ln1G),
                    whole(ac.mean1),
                    whole(ac.rstd1),
                    None,
                    whole(ac.ds1),
                    gr(Pm::Ln1G),
                    gr(Pm::Ln1B),
                    whole(ac.ln_part),
                ],
            )?;
            ac.ds1
        } else {
            pl.add(
                bwd,
                gemm(GemmLayout::InputGrad, m, w, fh).plan(plain)?,
                &[whole(ac.du), wt(Pm::W1), None, None, whole(ac.dh2), None],
            )?;
            pl.add(
                bwd,
                ln.backward_plan(true)?,
                &[
                    whole(ac.dh2),
                    whole(ac.s2),
                    wt(Pm::Ln2G),
                    whole(ac.mean2),
                    whole(ac.rstd2),
                    whole(ac.dy),
                    whole(ac.ds2),
                    gr(Pm::Ln2G),
                    gr(Pm::Ln2B),
                    whole(ac.ln_part),
                ],
            )?;
            ac.ds2
        };
        pl.add(
            bwd,
            gemm(GemmLayout::WeightGrad, w, w, m).plan(wgrad)?,
            &[
                whole(dattn),
                whole(ac.o),
                None,
                None,
                gr(Pm::Wo),
                gr(Pm::Bo),
            ],
        )?;
        pl.add(
            bwd,
            gemm(GemmLayout::InputGrad, m, w, w).plan(plain)?,
            &[whole(dattn), wt(Pm::Wo), None, None, whole(ac.d_o), None],
        )?;
        pl.add(
            bwd,
            gather(hm).plan()?,
            &[whole(ac.d_o), whole(tb.heads), whole(ac.doh), bad],
        )?;
        pl.add(
            bwd,
            attn.backward_plan(true)?,
            &[
                qkv_view(ac.qkvh, 0),
                qkv_view(ac.qkvh, 1),
                qkv_view(ac.qkvh, 2),
                whole(ac.oh),
                whole(ac.lse),
                whole(ac.doh),
                whole(tb.seqlens),
                qkv_view(ac.dqkvh, 0),
                qkv_view(ac.dqkvh, 1),
                qkv_view(ac.dqkvh, 2),
                whole(ac.delta),
            ],
        )?;
        pl.add(
            bwd,
            gather(3 * hm).plan()?,
            &[whole(ac.dqkvh), whole(tb.unsplit), whole(ac.dqkv), bad],
        )?;
        pl.add(
            bwd,
            gemm(GemmLayout::WeightGrad, 3 * w, w, m).plan(wgrad)?,
            &[
                whole(ac.dqkv),
                whole(attn_in),
                None,
                None,
                gr(Pm::Wqkv),
                gr(Pm::Bqkv),
            ],
        )?;
        if post {
            // dx = dqkv·Wqkv + ds1 (the residual around the attention).
            pl.add(
                bwd,
                gemm(GemmLayout::InputGrad, m, w, 3 * w).plan(with_res)?,
                &[
                    whole(ac.dqkv),
                    wt(Pm::Wqkv),
                    None,
                    whole(ac.ds1),
                    whole(ac.dx),
                    None,
                ],
            )?;
        } else {
            pl.add(
                bwd,
                gemm(GemmLayout::InputGrad, m, w, 3 * w).plan(plain)?,
                &[
                    whole(ac.dqkv),
                    wt(Pm::Wqkv),
                    None,
                    None,
                    whole(ac.dh1),
                    None,
                ],
            )?;
            // dx = LN1ᵀ(dh1) + ds2 (the residual around the attention).
            pl.add(
                bwd,
                ln.backward_plan(true)?,
                &[
                    whole(ac.dh1),
                    whole(ac.s1),
                    wt(Pm::Ln1G),
                    whole(ac.mean1),
                    whole(ac.rstd1),
                    whole(ac.ds2),
                    whole(ac.dx),
                    gr(Pm::Ln1G),
                    gr(Pm::Ln1B),
                    whole(ac.ln_part),
                ],
            )?;
        }
        self.slots = pl.slots;
        Ok(())
    }

    /// The sizes the block was built for.
    pub fn dims(&self) -> &BlockDims {
        &self.dims
    }

    /// The arena layout (for a block made by [`CudaBlock::in_layout`], the shared table as
    /// it stood after the block's regions were added); make a standalone block's arena with
    /// `Arena::host(block.layout().clone(), emu)` or `Arena::device(block.layout().clone(), gpu)`.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Launches per forward and per backward.
    pub fn launches(&self) -> (usize, usize) {
        (self.forward.len(), self.backward.len())
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

    /// The count of out-of-range gather indices seen so far (0 unless the tables are wrong).
    pub fn bad_index_count(&self, arena: &mut Arena) -> Result<i32> {
        self.check_arena(arena)?;
        Ok(arena.read_i32(self.tables.bad)?[0])
    }

    fn check_arena(&self, arena: &Arena) -> Result<()> {
        ensure!(
            arena.layout().extends(&self.layout),
            "the arena was not made from this block's layout"
        );
        Ok(())
    }

    /// Writes the head permutation tables and the valid length of each sequence (key
    /// padding: keys at positions ≥ `lengths[b]` are hidden from every query of sequence b).
    pub fn set_lengths(&self, arena: &mut Arena, lengths: &[usize]) -> Result<()> {
        self.check_arena(arena)?;
        let d = &self.dims;
        ensure!(
            lengths.len() == d.batch,
            "cuda block: {} sequence lengths for a batch of {}",
            lengths.len(),
            d.batch
        );
        if let Some((b, &n)) = lengths.iter().enumerate().find(|(_, &n)| n > d.len) {
            bail!(
                "cuda block: sequence {b} has length {n}, the batch is padded to {}",
                d.len
            );
        }
        let (hd, m) = (d.heads, d.tokens());
        let hm = hd * m;
        let idx = |v: usize| v as i32;
        // (3, H, M) rows ← (M, 3, H) rows, and back; (H, M) ← (M, H), and back.
        let split: Vec<i32> = (0..3 * hm).map(|r| idx((r % m) * 3 * hd + r / m)).collect();
        let unsplit: Vec<i32> = (0..3 * hm)
            .map(|r| idx((r % (3 * hd)) * m + r / (3 * hd)))
            .collect();
        let merge: Vec<i32> = (0..hm).map(|r| idx((r % hd) * m + r / hd)).collect();
        let heads: Vec<i32> = (0..hm).map(|r| idx((r % m) * hd + r / m)).collect();
        // Attention sequence z = h·B + b.
        let seqlens: Vec<i32> = (0..hd * d.batch)
            .map(|z| idx(lengths[z % d.batch]))
            .collect();
        let t = &self.tables;
        arena.write_i32(t.split, &split)?;
        arena.write_i32(t.unsplit, &unsplit)?;
        arena.write_i32(t.merge, &merge)?;
        arena.write_i32(t.heads, &heads)?;
        arena.write_i32(t.seqlens, &seqlens)?;
        arena.write_i32(t.bad, &[0])?;
        Ok(())
    }

    /// Forward: casts the master weights to bf16, then computes `y` from `x`.
    pub fn forward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        // SAFETY: the arena has this block's layout and every slot was checked against its
        // region when the plan was built.
        unsafe { arena.run(&self.forward, &self.slots) }
    }

    /// Backward from `output_grad`: parameter gradients (overwritten) and `input_grad`. Uses
    /// the activations of the last [`CudaBlock::forward`].
    pub fn backward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        // SAFETY: as in `forward`.
        unsafe { arena.run(&self.backward, &self.slots) }
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
