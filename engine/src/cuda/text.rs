//! The BERT text tower of the student, forward and backward, as launch plans over one
//! [`Arena`]: word, position and token-type (type 0) embeddings, the embeddings LayerNorm,
//! the blocks ([`CudaBlock`], post-norm BERT or pre-norm with `ln_final`) with key padding,
//! pooling of one row per sequence (`[CLS]` or the last valid token) and the two-layer
//! bias-free projection `width → (width + embed)/2 → GELU → embed`.
//!
//! Embeddings. Gathers read the word rows of the token ids and the position rows; the bf16
//! sum of the two meets the token-type row inside the LayerNorm kernel (its fused residual).
//! The backward clears the three fp32 gradient tables (an axpby with zero coefficients, which
//! reads nothing, so no zero table as large as the vocabulary is needed) and scatter-adds the
//! LayerNorm's input gradient into them.
//!
//! Names. The arena stores the blocks under the [`super::block::param_specs`] names with the
//! query, key and value packed as the attention kernel reads them; [`CudaTextTower::param_map`]
//! says where each Hugging Face `BertLayer` tensor lies in them.
//!
//! Packed tokens. `TextTowerDims::block.len` is the longest caption and sizes the arena;
//! [`CudaTextTower::set_batch`] takes token ids `(B, L)` for any L up to it with each row's
//! length, and packs the valid tokens back to back: the embeddings, every block
//! ([`CudaBlock::set_packed`]) and the pooling run on those rows only, so a short caption costs
//! its own tokens, not the batch's longest. The rows are rounded up to
//! [`PACKED_ROW_TILE`](super::block::PACKED_ROW_TILE) with filler rows at the end (the `[PAD]` token at position 0, queries
//! of the last caption: defined values, never pooled, so their gradients are zero), which bounds
//! the distinct row counts, each planned once, to B·L / 64.
//!
//! Gradients are overwritten by each backward.

use super::arena::{Arena, Dtype, Layout, RegionId, Section};
use super::block::{
    cast_weights, packed_rows, packed_slot, BlockDims, Buf, CudaBlock, PackedSeq, Planner,
    ScatterRegions,
};
use crate::config::{ModelConfig, NormPlacement, Pooling};
use anyhow::{anyhow, bail, ensure, Result};
use mmkd_kernels::elementwise::Ew;
use mmkd_kernels::exec::Step;
use mmkd_kernels::gemm::{Activation as Epilogue, AuxUse, GemmLayout, GemmOpts, GemmShape};
use mmkd_kernels::layernorm::{backward_scratch_len, LnShape};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Sizes of the text tower and of the batch it runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TextTowerDims {
    /// Vocabulary rows of the word embedding.
    pub vocab: usize,
    /// Rows of the position embedding (the longest context).
    pub context: usize,
    /// Rows of the token-type embedding (only row 0 is used).
    pub type_vocab: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Hidden width of the projection MLP.
    pub proj_hidden: usize,
    /// Output width.
    pub embed: usize,
    /// Which row of each sequence is projected.
    pub pooling: Pooling,
    /// One block's sizes; `len` is the longest caption a batch may hold (at most `context`),
    /// which sizes the arena (B·len rows).
    pub block: BlockDims,
}

impl TextTowerDims {
    /// The text tower of `config` for batches of `batch` captions of at most `len` tokens.
    pub fn from_config(config: &ModelConfig, batch: usize, len: usize) -> Result<Self> {
        let t = &config.text;
        ensure!(
            !t.causal,
            "text tower: causal attention is not supported by the CUDA backend yet"
        );
        Ok(TextTowerDims {
            vocab: t.vocab_size,
            context: t.context_length,
            type_vocab: t.type_vocab_size,
            layers: t.layers,
            proj_hidden: config.text_proj_hidden(),
            embed: config.embed_dim,
            pooling: t.pooling,
            block: BlockDims {
                width: t.width,
                heads: t.heads,
                hidden: (t.mlp_ratio * t.width as f64) as usize,
                act: t.act,
                norm: t.norm,
                eps: t.ln_eps as f32,
                batch,
                len,
                recompute: false,
                gemm: mmkd_kernels::gemm::GemmPath::MmaSync,
            },
        })
    }

    fn pre(&self) -> bool {
        self.block.norm == NormPlacement::Pre
    }
}

const EMB: &str = "text.transformer.embeddings";

/// The token id of the filler rows that round a packed batch up to its rows: `[PAD]`, id 0 of
/// the vocabulary, at position 0.
pub const TEXT_FILLER_ID: u32 = 0;

/// The tower's own parameters (Hugging Face / open_clip names, lengths) in arena order.
fn own_params(d: &TextTowerDims) -> Vec<(String, usize)> {
    let (w, ph) = (d.block.width, d.proj_hidden);
    let mut v = vec![
        (format!("{EMB}.word_embeddings.weight"), d.vocab * w),
        (format!("{EMB}.position_embeddings.weight"), d.context * w),
        (
            format!("{EMB}.token_type_embeddings.weight"),
            d.type_vocab * w,
        ),
        (format!("{EMB}.LayerNorm.weight"), w),
        (format!("{EMB}.LayerNorm.bias"), w),
        ("text.proj.0.weight".to_string(), ph * w),
        ("text.proj.2.weight".to_string(), d.embed * ph),
    ];
    if d.pre() {
        v.push(("text.ln_final.weight".to_string(), w));
        v.push(("text.ln_final.bias".to_string(), w));
    }
    v
}

/// Index of a tower parameter in [`own_params`] order.
#[derive(Clone, Copy)]
enum Tp {
    Word = 0,
    Pos,
    Type,
    EmbG,
    EmbB,
    Proj0,
    Proj2,
    FinalG,
    FinalB,
}

fn block_prefix(i: usize) -> String {
    format!("text.transformer.encoder.layer.{i}.")
}

/// Where one parameter of the model lies in the arena: `len` elements of the fp32 master (and
/// of the gradient) from element `offset` of the regions `param` and `grad`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSlice {
    /// The model's name of the tensor.
    pub name: String,
    /// Master region.
    pub param: RegionId,
    /// Gradient region.
    pub grad: RegionId,
    /// First element inside the regions.
    pub offset: usize,
    /// Elements.
    pub len: usize,
}

struct Regions {
    x0: RegionId,
    pos_rows: RegionId,
    type_rows: RegionId,
    s_emb: RegionId,
    mean_emb: RegionId,
    rstd_emb: RegionId,
    pooled: RegionId,
    /// Pre-norm only: `ln_final` of the pooled rows (y, mean, rstd).
    fin: Option<[RegionId; 3]>,
    u: RegionId,
    g: RegionId,
    features: RegionId,
    dfeatures: RegionId,
    du: RegionId,
    dpooled: RegionId,
    dfin: RegionId,
    ds_emb: RegionId,
    part_emb: RegionId,
    part_fin: RegionId,
    tokens: RegionId,
    pos_index: RegionId,
    type_index: RegionId,
    /// The segment tables of the backward's scatter-adds into the word, position and token
    /// type embeddings, written with each batch.
    scatters: [ScatterRegions; 3],
    pool_rows: RegionId,
    dy_rows: RegionId,
    bad: RegionId,
}

/// The tower's own plans (the blocks keep theirs) for one packed row count.
struct Plans {
    slots: Vec<(RegionId, usize)>,
    embed_fwd: Vec<Step>,
    head_fwd: Vec<Step>,
    head_bwd: Vec<Step>,
    embed_bwd: Vec<Step>,
}

/// The text tower's arena layout and its plans.
pub struct CudaTextTower {
    dims: TextTowerDims,
    /// The table as it stood when the tower was planned; an arena must [`Layout::extends`] it.
    layout: Layout,
    /// The forward starts with the section-wide weight cast (standalone towers only).
    cast: bool,
    params: Vec<RegionId>,
    grads: Vec<RegionId>,
    blocks: Vec<CudaBlock>,
    r: Regions,
    /// Plans per packed row count m (entry ⌈m / [`PACKED_ROW_TILE`](super::block::PACKED_ROW_TILE)⌉ − 1), built on first
    /// use, as the blocks do theirs.
    plans: Vec<OnceLock<Plans>>,
    /// The packed rows of the batch set last.
    rows: AtomicUsize,
}

impl CudaTextTower {
    /// Lays out one arena for the whole tower and builds its plans; the forward starts by
    /// casting the fp32 master weights to bf16.
    pub fn new(dims: TextTowerDims) -> Result<Self> {
        let mut lay = Layout::grouped();
        Self::build(dims, &mut lay, true)
    }

    /// Adds the tower's regions to a shared `layout` (made with [`Layout::grouped`]) and builds
    /// its plans over it. The forward does not cast the weights: the owner of the layout keeps
    /// the bf16 copy current (one cast of the whole parameter section, or the optimiser's bf16
    /// output).
    pub fn in_layout(dims: TextTowerDims, layout: &mut Layout) -> Result<Self> {
        Self::build(dims, layout, false)
    }

    fn build(dims: TextTowerDims, lay: &mut Layout, cast: bool) -> Result<Self> {
        let d = dims;
        let bd = d.block;
        ensure!(
            d.vocab > 0 && d.type_vocab > 0 && d.layers > 0 && d.proj_hidden > 0 && d.embed > 0,
            "text tower: empty shape {d:?}"
        );
        ensure!(
            bd.len > 0 && bd.len <= d.context,
            "text tower: longest caption {} is not in 1..={}",
            bd.len,
            d.context
        );
        let (w, b, l, ph) = (bd.width, bd.batch, bd.len, d.proj_hidden);
        let m = b * l;
        let (mut params, mut grads) = (Vec::new(), Vec::new());
        for (name, n) in own_params(&d) {
            params.push(lay.add(&format!("param.{name}"), Section::Params, Dtype::F32, n)?);
            lay.add(&format!("bf16.{name}"), Section::ParamsBf16, Dtype::Bf16, n)?;
            grads.push(lay.add(&format!("grad.{name}"), Section::Grads, Dtype::F32, n)?);
        }
        let mut blocks: Vec<CudaBlock> = Vec::with_capacity(d.layers);
        for i in 0..d.layers {
            let blk = CudaBlock::in_layout(bd, lay, &block_prefix(i), blocks.last())?;
            blocks.push(blk);
        }
        let scatters = [
            ScatterRegions::add(lay, "table.text.word_scatter", m, d.vocab)?,
            ScatterRegions::add(lay, "table.text.pos_scatter", m, d.context)?,
            ScatterRegions::add(lay, "table.text.type_scatter", m, d.type_vocab)?,
        ];
        let (bfl, f32l, i32l) = (Dtype::Bf16, Dtype::F32, Dtype::I32);
        let mut add = |sec: Section, kind: &str, name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("{kind}.text.{name}"), sec, dt, n)
        };
        let (a, s, t) = (Section::Acts, Section::Scratch, Section::Tables);
        let ln_m = LnShape {
            n: m,
            c: w,
            eps: bd.eps,
        };
        let ln_b = LnShape { n: b, ..ln_m };
        let fin = if d.pre() {
            Some([
                add(a, "act", "ln_final.y", bfl, b * w)?,
                add(a, "act", "ln_final.mean", f32l, b)?,
                add(a, "act", "ln_final.rstd", f32l, b)?,
            ])
        } else {
            None
        };
        let r = Regions {
            x0: add(a, "act", "x0", bfl, m * w)?,
            pos_rows: add(a, "act", "pos_rows", bfl, m * w)?,
            type_rows: add(a, "act", "type_rows", bfl, m * w)?,
            s_emb: add(a, "act", "emb.s", bfl, m * w)?,
            mean_emb: add(a, "act", "emb.mean", f32l, m)?,
            rstd_emb: add(a, "act", "emb.rstd", f32l, m)?,
            pooled: add(a, "act", "pooled", bfl, b * w)?,
            fin,
            u: add(a, "act", "proj.u", bfl, b * ph)?,
            g: add(a, "act", "proj.g", bfl, b * ph)?,
            features: add(a, "act", "features", f32l, b * d.embed)?,
            dfeatures: add(s, "scratch", "dfeatures", bfl, b * d.embed)?,
            du: add(s, "scratch", "proj.du", bfl, b * ph)?,
            dpooled: add(s, "scratch", "dpooled", bfl, (b + 1) * w)?,
            dfin: add(s, "scratch", "dfinal", bfl, b * w)?,
            ds_emb: add(s, "scratch", "ds_emb", bfl, m * w)?,
            part_emb: add(
                s,
                "scratch",
                "emb.partials",
                f32l,
                backward_scratch_len(ln_m),
            )?,
            part_fin: add(
                s,
                "scratch",
                "final.partials",
                f32l,
                backward_scratch_len(ln_b),
            )?,
            tokens: add(t, "table", "tokens", i32l, m)?,
            pos_index: add(t, "table", "pos_rows", i32l, m)?,
            type_index: add(t, "table", "type_rows", i32l, m)?,
            scatters,
            pool_rows: add(t, "table", "pool_rows", i32l, b)?,
            dy_rows: add(t, "table", "dy_rows", i32l, m)?,
            bad: add(t, "table", "bad_index_count", i32l, 1)?,
        };
        let tower = CudaTextTower {
            dims,
            layout: lay.clone(),
            cast,
            params,
            grads,
            blocks,
            r,
            plans: (0..=packed_slot("text tower", m, m)?)
                .map(|_| OnceLock::new())
                .collect(),
            rows: AtomicUsize::new(m),
        };
        tower.plans(m)?;
        Ok(tower)
    }

    /// The rows a batch of `tokens` valid tokens is packed into: a multiple of
    /// [`PACKED_ROW_TILE`](super::block::PACKED_ROW_TILE), or all B·L rows when that is fewer.
    pub fn packed_rows(&self, tokens: usize) -> usize {
        packed_rows(tokens, self.dims.block.tokens())
    }

    /// The tower's plans for `m` packed rows, built on first use.
    fn plans(&self, m: usize) -> Result<&Plans> {
        let cell = &self.plans[packed_slot("text tower", m, self.dims.block.tokens())?];
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let p = self.build_plans(m)?;
        Ok(cell.get_or_init(|| p))
    }

    /// The embedding, pooling and projection plans for a batch packed into `m` rows: every
    /// per-token op runs on the first m rows of its regions.
    fn build_plans(&self, m: usize) -> Result<Plans> {
        let d = self.dims;
        let bd = d.block;
        let (w, b, ph, e) = (bd.width, bd.batch, d.proj_hidden, d.embed);
        let lay = &self.layout;
        let r = &self.r;
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
        // Regions of fixed size (weights, gradients, per-sequence rows) are used whole.
        let whole = |id: RegionId| part(id, 0, lay.region(id).len);
        // The first m·per_row elements of a `(B·L, per_row)` region: the planner checks that
        // the region (sized for the longest length) holds them.
        let rows = |id: RegionId, per_row: usize| part(id, 0, m * per_row);
        let wt = |p: Tp| -> Result<Option<Buf>> {
            let id = *self
                .params
                .get(p as usize)
                .ok_or_else(|| anyhow!("text tower: parameter {} missing", p as usize))?;
            let name = &lay.region(id).name;
            let bf = lay
                .id(&format!("bf16.{}", &name["param.".len()..]))
                .ok_or_else(|| anyhow!("text tower: no bf16 copy of `{name}`"))?;
            Ok(whole(bf))
        };
        let gr = |p: Tp| whole(self.grads[p as usize]);
        let gemm = |layout, mm, n, kk| GemmShape {
            layout,
            batch: 1,
            m: mm,
            n,
            k: kk,
            act: Epilogue::None,
        };
        // The head's products take the blocks' path.
        let plain = GemmOpts {
            path: self.dims.block.gemm,
            ..GemmOpts::default()
        };
        let f32_out = GemmOpts {
            out_f32: true,
            ..plain
        };
        let ln_m = LnShape {
            n: m,
            c: w,
            eps: bd.eps,
        };
        let ln_b = LnShape { n: b, ..ln_m };
        let bad = whole(r.bad);
        let (first, last) = match (self.blocks.first(), self.blocks.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => bail!("text tower without blocks"),
        };
        let (mut embed_fwd, mut head_fwd) = (Vec::new(), Vec::new());
        let (mut head_bwd, mut embed_bwd) = (Vec::new(), Vec::new());
        let (fwd, hfwd) = (&mut embed_fwd, &mut head_fwd);
        let (hbwd, bwd) = (&mut head_bwd, &mut embed_bwd);
        let gather = |n, v| Ew::Gather { n, v, c: w };

        // ---- forward: embeddings ----
        if self.cast {
            cast_weights(&mut pl, fwd)?;
        }
        pl.add(
            fwd,
            gather(m, d.vocab).plan()?,
            &[wt(Tp::Word)?, rows(r.tokens, 1), rows(r.x0, w), bad],
        )?;
        pl.add(
            fwd,
            gather(m, d.context).plan()?,
            &[wt(Tp::Pos)?, rows(r.pos_index, 1), rows(r.pos_rows, w), bad],
        )?;
        pl.add(
            fwd,
            gather(m, d.type_vocab).plan()?,
            &[
                wt(Tp::Type)?,
                rows(r.type_index, 1),
                rows(r.type_rows, w),
                bad,
            ],
        )?;
        pl.add(
            fwd,
            Ew::AxpbyBf16 {
                n: m * w,
                a: 1.0,
                b: 1.0,
            }
            .plan()?,
            &[rows(r.pos_rows, w), rows(r.x0, w)],
        )?;
        pl.add(
            fwd,
            ln_m.forward_plan()?,
            &[
                rows(r.x0, w),
                rows(r.type_rows, w),
                wt(Tp::EmbG)?,
                wt(Tp::EmbB)?,
                rows(r.s_emb, w),
                rows(first.input(), w),
                rows(r.mean_emb, 1),
                rows(r.rstd_emb, 1),
            ],
        )?;

        // ---- forward: pooling and projection ----
        pl.add(
            hfwd,
            gather(b, m).plan()?,
            &[
                rows(last.output(), w),
                whole(r.pool_rows),
                whole(r.pooled),
                bad,
            ],
        )?;
        let proj_in = match r.fin {
            Some([fy, fm, fr]) => {
                pl.add(
                    hfwd,
                    ln_b.norm_plan()?,
                    &[
                        whole(r.pooled),
                        None,
                        wt(Tp::FinalG)?,
                        wt(Tp::FinalB)?,
                        None,
                        whole(fy),
                        whole(fm),
                        whole(fr),
                    ],
                )?;
                fy
            }
            None => r.pooled,
        };
        // u = proj_in·Proj0ᵀ saved for the backward, g = GELU(u), in one pass.
        let gelu = |layout, mm, n, kk| GemmShape {
            act: Epilogue::Gelu,
            ..gemm(layout, mm, n, kk)
        };
        pl.add(
            hfwd,
            gelu(GemmLayout::Forward, b, ph, w).plan(GemmOpts {
                aux: AuxUse::SavePre,
                ..plain
            })?,
            &[
                whole(proj_in),
                wt(Tp::Proj0)?,
                None,
                whole(r.u),
                whole(r.g),
                None,
            ],
        )?;
        pl.add(
            hfwd,
            gemm(GemmLayout::Forward, b, e, ph).plan(f32_out)?,
            &[
                whole(r.g),
                wt(Tp::Proj2)?,
                None,
                None,
                whole(r.features),
                None,
            ],
        )?;

        // ---- backward: projection and pooling ----
        // du = (dfeatures·Proj2) ∘ GELU'(u).
        pl.add(
            hbwd,
            gelu(GemmLayout::InputGrad, b, ph, e).plan(GemmOpts {
                aux: AuxUse::ActGrad,
                ..plain
            })?,
            &[
                whole(r.dfeatures),
                wt(Tp::Proj2)?,
                None,
                whole(r.u),
                whole(r.du),
                None,
            ],
        )?;
        pl.add(
            hbwd,
            gemm(GemmLayout::WeightGrad, e, ph, b).plan(f32_out)?,
            &[
                whole(r.dfeatures),
                whole(r.g),
                None,
                None,
                gr(Tp::Proj2),
                None,
            ],
        )?;
        pl.add(
            hbwd,
            gemm(GemmLayout::WeightGrad, ph, w, b).plan(f32_out)?,
            &[whole(r.du), whole(proj_in), None, None, gr(Tp::Proj0), None],
        )?;
        // The pooled rows' gradient goes to rows 0..B of `dpooled` (row B is cleared below).
        let dpool = part(r.dpooled, 0, b * w);
        let dproj_in = if r.fin.is_some() {
            whole(r.dfin)
        } else {
            dpool
        };
        pl.add(
            hbwd,
            gemm(GemmLayout::InputGrad, b, w, ph).plan(plain)?,
            &[whole(r.du), wt(Tp::Proj0)?, None, None, dproj_in, None],
        )?;
        if let Some([_, fm, fr]) = r.fin {
            pl.add(
                hbwd,
                ln_b.backward_plan(false)?,
                &[
                    whole(r.dfin),
                    whole(r.pooled),
                    wt(Tp::FinalG)?,
                    whole(fm),
                    whole(fr),
                    None,
                    dpool,
                    gr(Tp::FinalG),
                    gr(Tp::FinalB),
                    whole(r.part_fin),
                ],
            )?;
        }
        // Row B of `dpooled` is cleared (a = b = 0 reads nothing).
        let dzero = part(r.dpooled, b * w, w);
        pl.add(
            hbwd,
            Ew::AxpbyBf16 {
                n: w,
                a: 0.0,
                b: 0.0,
            }
            .plan()?,
            &[dzero, dzero],
        )?;
        pl.add(
            hbwd,
            gather(m, b + 1).plan()?,
            &[
                whole(r.dpooled),
                rows(r.dy_rows, 1),
                rows(last.output_grad(), w),
                bad,
            ],
        )?;

        // ---- backward: embeddings ----
        pl.add(
            bwd,
            ln_m.backward_plan(false)?,
            &[
                rows(first.input_grad(), w),
                rows(r.s_emb, w),
                wt(Tp::EmbG)?,
                rows(r.mean_emb, 1),
                rows(r.rstd_emb, 1),
                None,
                rows(r.ds_emb, w),
                gr(Tp::EmbG),
                gr(Tp::EmbB),
                part(r.part_emb, 0, backward_scratch_len(ln_m)),
            ],
        )?;
        // In the order of `r.scatters`.
        for (p, scatter) in [Tp::Word, Tp::Pos, Tp::Type].into_iter().zip(&r.scatters) {
            // Cleared (a = b = 0 reads nothing: the gradient may hold anything), then the
            // rows' gradients added.
            pl.add(
                bwd,
                Ew::AxpbyF32 {
                    n: scatter.table_rows() * w,
                    a: 0.0,
                    b: 0.0,
                }
                .plan()?,
                &[gr(p), gr(p)],
            )?;
            scatter.plan(&mut pl, bwd, m, w, rows(r.ds_emb, w), gr(p))?;
        }
        Ok(Plans {
            slots: pl.slots,
            embed_fwd,
            head_fwd,
            head_bwd,
            embed_bwd,
        })
    }

    /// The sizes the tower was built for.
    pub fn dims(&self) -> &TextTowerDims {
        &self.dims
    }

    /// The arena layout; make the arena with `Arena::host(tower.layout().clone(), emu)` or
    /// `Arena::device(tower.layout().clone(), gpu)`.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where every parameter of the model's text tower lies in the arena, under the model's
    /// names (Hugging Face `BertLayer` names for the blocks, whatever their norm placement).
    pub fn param_map(&self) -> Vec<ParamSlice> {
        let mut v: Vec<ParamSlice> = own_params(&self.dims)
            .into_iter()
            .zip(self.params.iter().zip(&self.grads))
            .map(|((name, len), (&param, &grad))| ParamSlice {
                name,
                param,
                grad,
                offset: 0,
                len,
            })
            .collect();
        let w = self.dims.block.width;
        for (i, blk) in self.blocks.iter().enumerate() {
            let pre = block_prefix(i);
            for (spec, shape) in super::block::param_specs(&self.dims.block) {
                let (Ok(param), Ok(grad)) = (blk.param(spec), blk.grad(spec)) else {
                    continue;
                };
                let len: usize = shape.iter().product();
                let one = |name: String, offset: usize, len: usize| ParamSlice {
                    name,
                    param,
                    grad,
                    offset,
                    len,
                };
                let packed = match spec {
                    "attn.in_proj_weight" => Some(("weight", w * w)),
                    "attn.in_proj_bias" => Some(("bias", w)),
                    _ => None,
                };
                if let Some((kind, n)) = packed {
                    for (j, qkv) in ["query", "key", "value"].iter().enumerate() {
                        v.push(one(format!("{pre}attention.self.{qkv}.{kind}"), j * n, n));
                    }
                    continue;
                }
                let hf = match spec {
                    "ln_1.weight" => "attention.output.LayerNorm.weight",
                    "ln_1.bias" => "attention.output.LayerNorm.bias",
                    "attn.out_proj.weight" => "attention.output.dense.weight",
                    "attn.out_proj.bias" => "attention.output.dense.bias",
                    "ln_2.weight" => "output.LayerNorm.weight",
                    "ln_2.bias" => "output.LayerNorm.bias",
                    "mlp.c_fc.weight" => "intermediate.dense.weight",
                    "mlp.c_fc.bias" => "intermediate.dense.bias",
                    "mlp.c_proj.weight" => "output.dense.weight",
                    _ => "output.dense.bias",
                };
                v.push(one(format!("{pre}{hf}"), 0, len));
            }
        }
        v
    }

    /// The features, fp32 `(B, embed)`, written by the forward.
    pub fn features(&self) -> RegionId {
        self.r.features
    }

    /// The gradient arriving at the features, bf16 `(B, embed)`, read by the backward.
    pub fn features_grad(&self) -> RegionId {
        self.r.dfeatures
    }

    fn check_arena(&self, arena: &Arena) -> Result<()> {
        ensure!(
            arena.layout().extends(&self.layout),
            "the arena was not made from this text tower's layout"
        );
        Ok(())
    }

    /// Writes a batch: token ids `(B, L)` row-major for any L in 1..=`dims().block.len` and
    /// the valid length of each row (1..=L; the ids past it are not read). The valid tokens
    /// are packed back to back into [`CudaTextTower::packed_rows`] rows (see the module docs),
    /// selected for the next forward and backward, with every index table derived from them.
    pub fn set_batch(&self, arena: &mut Arena, tokens: &[u32], lengths: &[usize]) -> Result<()> {
        self.check_arena(arena)?;
        let d = &self.dims;
        let (b, max) = (d.block.batch, d.block.len);
        ensure!(
            lengths.len() == b,
            "text tower: {} lengths for a batch of {b}",
            lengths.len()
        );
        let l = tokens.len() / b;
        ensure!(
            tokens.len().is_multiple_of(b) && (1..=max).contains(&l),
            "text tower: {} token ids are not a batch of {b} rows of 1..={max} tokens",
            tokens.len()
        );
        if let Some((i, &n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > l) {
            bail!("text tower: length {n} of row {i} is not in 1..={l}");
        }
        let valid = |i: usize| &tokens[i * l..i * l + lengths[i]];
        for i in 0..b {
            if let Some((j, &t)) = valid(i)
                .iter()
                .enumerate()
                .find(|(_, &t)| t as usize >= d.vocab)
            {
                bail!(
                    "text tower: token {t} at position {j} of row {i} is outside the vocabulary \
                     of {}",
                    d.vocab
                );
            }
        }
        let total: usize = lengths.iter().sum();
        let m = self.packed_rows(total);
        // Row b − 1 takes the filler rows: at most PACKED_ROW_TILE − 1 (total ≥ B·L − (B·L
        // mod 64) when m is capped), which `packed_rows_cap` allows.
        let mut seqs = Vec::with_capacity(b);
        let mut row0 = 0;
        for (i, &n) in lengths.iter().enumerate() {
            let rows = if i + 1 == b { m - row0 } else { n };
            seqs.push(PackedSeq {
                row0,
                rows,
                keys: n,
            });
            row0 += rows;
        }
        // Every plan of this batch is built (and checked) before anything is written.
        self.plans(m)?;
        for blk in &self.blocks {
            blk.prepare_packed(m)?;
        }
        let idx = |v: usize| v as i32;
        let mut tok = Vec::with_capacity(m);
        let mut pos = Vec::with_capacity(m);
        for (i, &n) in lengths.iter().enumerate() {
            tok.extend(valid(i).iter().map(|&t| t as i32));
            pos.extend((0..n).map(idx));
        }
        // Filler: `[PAD]` at position 0.
        tok.resize(m, TEXT_FILLER_ID as i32);
        pos.resize(m, 0);
        let pool: Vec<usize> = seqs
            .iter()
            .map(|s| match d.pooling {
                Pooling::Cls => s.row0,
                Pooling::Eot => s.row0 + s.keys - 1,
            })
            .collect();
        // Output-gradient row r: the pooled gradient of its sequence, else the zero row B.
        let mut dy_rows = vec![idx(b); m];
        for (i, &p) in pool.iter().enumerate() {
            dy_rows[p] = idx(i);
        }
        // The backward's scatter-adds read segment tables built from the same indices.
        let types = vec![0; m];
        for (scatter, idx) in self.r.scatters.iter().zip([&tok, &pos, &types]) {
            scatter.write(arena, idx)?;
        }
        // `(B·L)` tables are written whole: past the m entries of this batch they hold index 0
        // (in range, never read).
        let r = &self.r;
        let mut rows = |id: RegionId, mut v: Vec<i32>| -> Result<()> {
            v.resize(self.layout.region(id).len, 0);
            arena.write_i32(id, &v)
        };
        rows(r.tokens, tok)?;
        rows(r.pos_index, pos)?;
        rows(r.type_index, types)?;
        rows(r.dy_rows, dy_rows)?;
        arena.write_i32(r.pool_rows, &pool.into_iter().map(idx).collect::<Vec<_>>())?;
        arena.write_i32(r.bad, &[0])?;
        for blk in &self.blocks {
            blk.set_packed(arena, m, &seqs)?;
        }
        self.rows.store(m, Ordering::Relaxed);
        Ok(())
    }

    /// The rows the current batch is packed into (the last one set; all B·L before any).
    pub fn batch_rows(&self) -> usize {
        self.rows.load(Ordering::Relaxed)
    }

    /// Out-of-range gather indices seen so far (the blocks gather nothing).
    pub fn bad_index_count(&self, arena: &mut Arena) -> Result<i32> {
        self.check_arena(arena)?;
        Ok(arena.read_i32(self.r.bad)?[0])
    }

    /// Forward on the batch's packed rows: casts the master weights to bf16 (standalone
    /// towers), then computes the features of the batch.
    pub fn forward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        let p = self.plans(self.batch_rows())?;
        // SAFETY: the arena has this tower's layout and every slot was checked against its
        // region when the plans were built.
        unsafe { arena.run(&p.embed_fwd, &p.slots)? };
        for blk in &self.blocks {
            blk.forward(arena)?;
        }
        // SAFETY: as above.
        unsafe { arena.run(&p.head_fwd, &p.slots) }
    }

    /// Backward from `features_grad`: every parameter gradient (overwritten). Uses the
    /// activations of the last [`CudaTextTower::forward`].
    pub fn backward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        let p = self.plans(self.batch_rows())?;
        // SAFETY: as in `forward`.
        unsafe { arena.run(&p.head_bwd, &p.slots)? };
        for blk in self.blocks.iter().rev() {
            blk.backward(arena)?;
        }
        // SAFETY: as in `forward`.
        unsafe { arena.run(&p.embed_bwd, &p.slots) }
    }
}
