//! The open_clip image tower, forward and backward, as launch plans over one [`Arena`]:
//! patch embedding without bias, class token, learned positional embedding, `ln_pre`, pre-norm
//! blocks ([`CudaBlock`] stacked in one [`Layout::grouped`] table), `ln_post` on the class
//! token and the bias-free projection to the joint space.
//!
//! Patch embedding. The image `(B, C, H, W)` is a table of `P`-wide pixel rows, so im2col is
//! an embedding gather with a fixed index table: row `((b·np + p)·C + c)·P + ky` of the patch
//! matrix `(B·np, C·P·P)` is pixel row `((b·C + c)·H + gy·P + ky)·(W/P) + gx`. A GEMM against
//! `conv1.weight` (`(width, C·P·P)`, the conv kernel flattened) gives the patch tokens.
//!
//! Class token and positions. The patch tokens and the class embedding share one token table
//! (`B·np + 1` rows, the class token last); a gather puts them in sequence order, a second one
//! repeats the positional rows per image, and the `ln_pre` kernel adds the two (its fused
//! residual). The backward reverses the gathers with scatter-adds into fp32: the class row
//! collects the gradient of every image, the positional table that of every position.
//!
//! Head. A gather picks the class rows of the last block's output; `ln_post` normalises them
//! and a GEMM with `visual.proj` (`(width, embed_dim)`, used as `x·P`)
//! gives fp32 features. The backward writes the class rows' gradient and zeros elsewhere into
//! the last block's output gradient with one gather from a table whose last row is zero.
//!
//! Gradients are overwritten by each backward.

use super::arena::{Arena, Dtype, Layout, RegionId, Section};
use super::block::{cast_weights, BlockDims, Buf, CudaBlock, Planner, ScatterRegions};
use crate::config::{ModelConfig, NormPlacement};
use anyhow::{anyhow, ensure, Result};
use mmkd_kernels::elementwise::Ew;
use mmkd_kernels::exec::Step;
use mmkd_kernels::gemm::{Activation as Epilogue, GemmLayout, GemmOpts, GemmShape};
use mmkd_kernels::layernorm::{backward_scratch_len, LnShape};

/// Sizes of the image tower and of the batch it runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageTowerDims {
    /// Square image side in pixels.
    pub image: usize,
    /// Square patch side (conv kernel and stride).
    pub patch: usize,
    /// Input channels.
    pub channels: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Output width (`visual.proj` is `(width, embed)`).
    pub embed: usize,
    /// One block's sizes; `len` is `1 + (image/patch)²` and `norm` pre-norm.
    pub block: BlockDims,
}

impl ImageTowerDims {
    /// The image tower of `config` for batches of `batch` images.
    pub fn from_config(config: &ModelConfig, batch: usize) -> Result<Self> {
        let v = &config.vision;
        ensure!(
            v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
            "image tower: image {} is not a multiple of patch {}",
            v.image_size,
            v.patch_size
        );
        let g = v.image_size / v.patch_size;
        Ok(ImageTowerDims {
            image: v.image_size,
            patch: v.patch_size,
            channels: v.channels,
            layers: v.layers,
            embed: config.embed_dim,
            block: BlockDims {
                width: v.width,
                heads: v.heads,
                hidden: (v.mlp_ratio * v.width as f64) as usize,
                act: v.act,
                norm: NormPlacement::Pre,
                eps: v.ln_eps as f32,
                batch,
                len: 1 + g * g,
                recompute: false,
                gemm: mmkd_kernels::gemm::GemmPath::MmaSync,
            },
        })
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        let g = self.image / self.patch;
        g * g
    }

    /// Values per patch, `C·P·P`.
    pub fn patch_values(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    /// Images per batch.
    pub fn batch(&self) -> usize {
        self.block.batch
    }
}

/// The tower's own parameters, open_clip names, in arena order (the blocks follow).
fn own_params(d: &ImageTowerDims) -> Vec<(&'static str, usize)> {
    let w = d.block.width;
    vec![
        ("visual.conv1.weight", w * d.patch_values()),
        ("visual.class_embedding", w),
        ("visual.positional_embedding", d.block.len * w),
        ("visual.ln_pre.weight", w),
        ("visual.ln_pre.bias", w),
        ("visual.ln_post.weight", w),
        ("visual.ln_post.bias", w),
        ("visual.proj", w * d.embed),
    ]
}

/// Index of a tower parameter in [`own_params`] order.
#[derive(Clone, Copy)]
enum Tp {
    Conv = 0,
    Cls,
    Pos,
    PreG,
    PreB,
    PostG,
    PostB,
    Proj,
}

/// The block prefix of layer `i`, as open_clip names it.
fn block_prefix(i: usize) -> String {
    format!("visual.transformer.resblocks.{i}.")
}

/// Regions of the tower outside its blocks.
struct Regions {
    image: RegionId,
    patches: RegionId,
    tokens: RegionId,
    x0: RegionId,
    pos_rows: RegionId,
    s_pre: RegionId,
    mean_pre: RegionId,
    rstd_pre: RegionId,
    cls: RegionId,
    h_post: RegionId,
    mean_post: RegionId,
    rstd_post: RegionId,
    features: RegionId,
    dfeatures: RegionId,
    dh_post: RegionId,
    dcls: RegionId,
    ds_pre: RegionId,
    dtokens: RegionId,
    dpatch: RegionId,
    part_pre: RegionId,
    part_post: RegionId,
    im2col: RegionId,
    token_rows: RegionId,
    pos_index: RegionId,
    /// The segment tables of the backward's two scatter-adds: into the token rows (patches
    /// and the shared class token) and into the positional embedding.
    token_scatter: ScatterRegions,
    pos_scatter: ScatterRegions,
    cls_rows: RegionId,
    dy_rows: RegionId,
    bad: RegionId,
    /// The split-K workspace of the patch embedding's weight gradient: the blocks' (free once
    /// their backward is done) where it is large enough, else its own; absent without a split.
    split: Option<RegionId>,
}

/// The image tower's arena layout and its plans.
pub struct CudaImageTower {
    dims: ImageTowerDims,
    /// The table as it stood when the tower was planned; an arena must [`Layout::extends`] it.
    layout: Layout,
    /// The forward starts with the section-wide weight cast (standalone towers only).
    cast: bool,
    params: Vec<RegionId>,
    grads: Vec<RegionId>,
    blocks: Vec<CudaBlock>,
    r: Regions,
    slots: Vec<(RegionId, usize)>,
    /// Weight cast, patch embedding, class token, positions, `ln_pre`.
    embed_fwd: Vec<Step>,
    /// Class rows, `ln_post`, projection.
    head_fwd: Vec<Step>,
    head_bwd: Vec<Step>,
    embed_bwd: Vec<Step>,
}

impl CudaImageTower {
    /// Lays out one arena for the whole tower and builds its plans; the forward starts by
    /// casting the fp32 master weights to bf16.
    pub fn new(dims: ImageTowerDims) -> Result<Self> {
        let mut lay = Layout::grouped();
        Self::build(dims, &mut lay, true)
    }

    /// Adds the tower's regions to a shared `layout` (made with [`Layout::grouped`]) and builds
    /// its plans over it. The forward does not cast the weights: the owner of the layout keeps
    /// the bf16 copy current (one cast of the whole parameter section, or the optimiser's bf16
    /// output).
    pub fn in_layout(dims: ImageTowerDims, layout: &mut Layout) -> Result<Self> {
        Self::build(dims, layout, false)
    }

    fn build(dims: ImageTowerDims, lay: &mut Layout, cast: bool) -> Result<Self> {
        let d = dims;
        let bd = d.block;
        ensure!(
            d.patch > 0 && d.image.is_multiple_of(d.patch) && d.channels > 0 && d.layers > 0,
            "image tower: bad shape {d:?}"
        );
        ensure!(
            d.embed > 0 && bd.len == 1 + d.patches() && bd.norm == NormPlacement::Pre,
            "image tower: the blocks must be pre-norm over 1 + {} tokens, got {bd:?}",
            d.patches()
        );
        let (w, b, l, np, k) = (bd.width, bd.batch, bd.len, d.patches(), d.patch_values());
        let m = b * l;
        let own = own_params(&d);
        let (mut params, mut grads) = (Vec::new(), Vec::new());
        for (name, n) in &own {
            params.push(lay.add(&format!("param.{name}"), Section::Params, Dtype::F32, *n)?);
            lay.add(
                &format!("bf16.{name}"),
                Section::ParamsBf16,
                Dtype::Bf16,
                *n,
            )?;
            grads.push(lay.add(&format!("grad.{name}"), Section::Grads, Dtype::F32, *n)?);
        }
        let mut blocks: Vec<CudaBlock> = Vec::with_capacity(d.layers);
        for i in 0..d.layers {
            let blk = CudaBlock::in_layout(bd, lay, &block_prefix(i), blocks.last())?;
            blocks.push(blk);
        }
        // The patch embedding's weight is as small as a block's output projection and its K
        // (B·patches) as long, so its gradient splits along the tokens too.
        let patch_split = bd.weight_grad_split((w, k), b * np, usize::MAX).1;
        let blocks_split = blocks
            .first()
            .and_then(CudaBlock::split_workspace)
            .filter(|&id| lay.region(id).len >= patch_split);
        let token_scatter = ScatterRegions::add(lay, "table.visual.token_scatter", m, b * np + 1)?;
        let pos_scatter = ScatterRegions::add(lay, "table.visual.pos_scatter", m, l)?;
        let (bfl, f32l) = (Dtype::Bf16, Dtype::F32);
        let mut add = |sec: Section, kind: &str, name: &str, dt: Dtype, n: usize| {
            lay.add(&format!("{kind}.visual.{name}"), sec, dt, n)
        };
        let (a, s, t) = (Section::Acts, Section::Scratch, Section::Tables);
        let ln_m = LnShape {
            n: m,
            c: w,
            eps: bd.eps,
        };
        let ln_b = LnShape { n: b, ..ln_m };
        let r = Regions {
            image: add(a, "act", "image", bfl, b * d.channels * d.image * d.image)?,
            patches: add(a, "act", "patches", bfl, b * np * k)?,
            tokens: add(a, "act", "tokens", bfl, (b * np + 1) * w)?,
            x0: add(a, "act", "x0", bfl, m * w)?,
            pos_rows: add(a, "act", "pos_rows", bfl, m * w)?,
            s_pre: add(a, "act", "ln_pre.s", bfl, m * w)?,
            mean_pre: add(a, "act", "ln_pre.mean", f32l, m)?,
            rstd_pre: add(a, "act", "ln_pre.rstd", f32l, m)?,
            cls: add(a, "act", "cls", bfl, b * w)?,
            h_post: add(a, "act", "ln_post.y", bfl, b * w)?,
            mean_post: add(a, "act", "ln_post.mean", f32l, b)?,
            rstd_post: add(a, "act", "ln_post.rstd", f32l, b)?,
            features: add(a, "act", "features", f32l, b * d.embed)?,
            dfeatures: add(s, "scratch", "dfeatures", bfl, b * d.embed)?,
            dh_post: add(s, "scratch", "dh_post", bfl, b * w)?,
            dcls: add(s, "scratch", "dcls", bfl, (b + 1) * w)?,
            ds_pre: add(s, "scratch", "ds_pre", bfl, m * w)?,
            dtokens: add(s, "scratch", "dtokens", f32l, (b * np + 1) * w)?,
            dpatch: add(s, "scratch", "dpatch", bfl, b * np * w)?,
            part_pre: add(
                s,
                "scratch",
                "ln_pre.partials",
                f32l,
                backward_scratch_len(ln_m),
            )?,
            part_post: add(
                s,
                "scratch",
                "ln_post.partials",
                f32l,
                backward_scratch_len(ln_b),
            )?,
            im2col: add(
                t,
                "table",
                "im2col",
                Dtype::I32,
                b * np * d.channels * d.patch,
            )?,
            token_rows: add(t, "table", "token_rows", Dtype::I32, m)?,
            pos_index: add(t, "table", "pos_rows", Dtype::I32, m)?,
            token_scatter,
            pos_scatter,
            cls_rows: add(t, "table", "cls_rows", Dtype::I32, b)?,
            dy_rows: add(t, "table", "dy_rows", Dtype::I32, m)?,
            bad: add(t, "table", "bad_index_count", Dtype::I32, 1)?,
            split: match (patch_split, blocks_split) {
                (0, _) => None,
                (_, Some(id)) => Some(id),
                (n, None) => Some(add(s, "scratch", "splitk", f32l, n)?),
            },
        };
        let mut tower = CudaImageTower {
            dims,
            layout: lay.clone(),
            cast,
            params,
            grads,
            blocks,
            r,
            slots: Vec::new(),
            embed_fwd: Vec::new(),
            head_fwd: Vec::new(),
            head_bwd: Vec::new(),
            embed_bwd: Vec::new(),
        };
        tower.build_plans()?;
        Ok(tower)
    }

    fn build_plans(&mut self) -> Result<()> {
        let d = self.dims;
        let bd = d.block;
        let (w, b, l, np, k, e) = (
            bd.width,
            bd.batch,
            bd.len,
            d.patches(),
            d.patch_values(),
            d.embed,
        );
        let m = b * l;
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
        let whole = |id: RegionId| part(id, 0, lay.region(id).len);
        let bf16_of = |p: Tp| -> Result<RegionId> {
            let name = &lay.region(self.params[p as usize]).name;
            lay.id(&format!("bf16.{}", &name["param.".len()..]))
                .ok_or_else(|| anyhow!("image tower: no bf16 copy of `{name}`"))
        };
        let wt = |p: Tp| -> Result<Option<Buf>> { Ok(whole(bf16_of(p)?)) };
        let gr = |p: Tp| whole(self.grads[p as usize]);
        let gemm = |layout, mm, n, kk| GemmShape {
            layout,
            batch: 1,
            m: mm,
            n,
            k: kk,
            act: Epilogue::None,
        };
        // Every product (the patch embedding, M = B·patches, its weight gradient over the
        // patches, the projection) takes the blocks' path.
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
        let first = self
            .blocks
            .first()
            .ok_or_else(|| anyhow!("image tower without blocks"))?;
        let last = self
            .blocks
            .last()
            .ok_or_else(|| anyhow!("image tower without blocks"))?;
        let (fwd, hfwd) = (&mut self.embed_fwd, &mut self.head_fwd);
        let (hbwd, bwd) = (&mut self.head_bwd, &mut self.embed_bwd);

        // ---- forward: embedding ----
        if self.cast {
            cast_weights(&mut pl, fwd)?;
        }
        let rows = b * np * d.channels * d.patch;
        let pix_rows = b * d.channels * d.image * d.image / d.patch;
        pl.add(
            fwd,
            Ew::Gather {
                n: rows,
                v: pix_rows,
                c: d.patch,
            }
            .plan()?,
            &[whole(r.image), whole(r.im2col), whole(r.patches), bad],
        )?;
        pl.add(
            fwd,
            gemm(GemmLayout::Forward, b * np, w, k).plan(plain)?,
            &[
                whole(r.patches),
                wt(Tp::Conv)?,
                None,
                None,
                part(r.tokens, 0, b * np * w),
                None,
            ],
        )?;
        pl.add(
            fwd,
            Ew::AxpbyBf16 {
                n: w,
                a: 1.0,
                b: 0.0,
            }
            .plan()?,
            &[wt(Tp::Cls)?, part(r.tokens, b * np * w, w)],
        )?;
        pl.add(
            fwd,
            Ew::Gather {
                n: m,
                v: b * np + 1,
                c: w,
            }
            .plan()?,
            &[whole(r.tokens), whole(r.token_rows), whole(r.x0), bad],
        )?;
        pl.add(
            fwd,
            Ew::Gather { n: m, v: l, c: w }.plan()?,
            &[wt(Tp::Pos)?, whole(r.pos_index), whole(r.pos_rows), bad],
        )?;
        pl.add(
            fwd,
            ln_m.forward_plan()?,
            &[
                whole(r.x0),
                whole(r.pos_rows),
                wt(Tp::PreG)?,
                wt(Tp::PreB)?,
                whole(r.s_pre),
                whole(first.input()),
                whole(r.mean_pre),
                whole(r.rstd_pre),
            ],
        )?;

        // ---- forward: head ----
        pl.add(
            hfwd,
            Ew::Gather { n: b, v: m, c: w }.plan()?,
            &[whole(last.output()), whole(r.cls_rows), whole(r.cls), bad],
        )?;
        pl.add(
            hfwd,
            ln_b.norm_plan()?,
            &[
                whole(r.cls),
                None,
                wt(Tp::PostG)?,
                wt(Tp::PostB)?,
                None,
                whole(r.h_post),
                whole(r.mean_post),
                whole(r.rstd_post),
            ],
        )?;
        pl.add(
            hfwd,
            gemm(GemmLayout::InputGrad, b, e, w).plan(f32_out)?,
            &[
                whole(r.h_post),
                wt(Tp::Proj)?,
                None,
                None,
                whole(r.features),
                None,
            ],
        )?;

        // ---- backward: head ----
        // dh_post = dF·Pᵀ (P stored (width, embed) is the Forward layout's (N, K) operand).
        pl.add(
            hbwd,
            gemm(GemmLayout::Forward, b, w, e).plan(plain)?,
            &[
                whole(r.dfeatures),
                wt(Tp::Proj)?,
                None,
                None,
                whole(r.dh_post),
                None,
            ],
        )?;
        pl.add(
            hbwd,
            gemm(GemmLayout::WeightGrad, w, e, b).plan(f32_out)?,
            &[
                whole(r.h_post),
                whole(r.dfeatures),
                None,
                None,
                gr(Tp::Proj),
                None,
            ],
        )?;
        pl.add(
            hbwd,
            ln_b.backward_plan(false)?,
            &[
                whole(r.dh_post),
                whole(r.cls),
                wt(Tp::PostG)?,
                whole(r.mean_post),
                whole(r.rstd_post),
                None,
                part(r.dcls, 0, b * w),
                gr(Tp::PostG),
                gr(Tp::PostB),
                whole(r.part_post),
            ],
        )?;
        // The zero row that every non-class token's gradient is gathered from (a = b = 0
        // clears it without reading anything).
        let dcls_zero = part(r.dcls, b * w, w);
        pl.add(
            hbwd,
            Ew::AxpbyBf16 {
                n: w,
                a: 0.0,
                b: 0.0,
            }
            .plan()?,
            &[dcls_zero, dcls_zero],
        )?;
        pl.add(
            hbwd,
            Ew::Gather {
                n: m,
                v: b + 1,
                c: w,
            }
            .plan()?,
            &[
                whole(r.dcls),
                whole(r.dy_rows),
                whole(last.output_grad()),
                bad,
            ],
        )?;

        // ---- backward: embedding ----
        pl.add(
            bwd,
            ln_m.backward_plan(false)?,
            &[
                whole(first.input_grad()),
                whole(r.s_pre),
                wt(Tp::PreG)?,
                whole(r.mean_pre),
                whole(r.rstd_pre),
                None,
                whole(r.ds_pre),
                gr(Tp::PreG),
                gr(Tp::PreB),
                whole(r.part_pre),
            ],
        )?;
        let ntok = (b * np + 1) * w;
        // Cleared, then the token rows' gradients added.
        pl.add(
            bwd,
            Ew::AxpbyF32 {
                n: ntok,
                a: 0.0,
                b: 0.0,
            }
            .plan()?,
            &[whole(r.dtokens), whole(r.dtokens)],
        )?;
        r.token_scatter
            .plan(&mut pl, bwd, m, w, whole(r.ds_pre), whole(r.dtokens))?;
        pl.add(
            bwd,
            Ew::AxpbyF32 {
                n: l * w,
                a: 0.0,
                b: 0.0,
            }
            .plan()?,
            &[gr(Tp::Pos), gr(Tp::Pos)],
        )?;
        r.pos_scatter
            .plan(&mut pl, bwd, m, w, whole(r.ds_pre), gr(Tp::Pos))?;
        pl.add(
            bwd,
            Ew::AxpbyF32 {
                n: w,
                a: 1.0,
                b: 0.0,
            }
            .plan()?,
            &[part(r.dtokens, b * np * w, w), gr(Tp::Cls)],
        )?;
        pl.add(
            bwd,
            Ew::CastF32Bf16 { n: b * np * w }.plan()?,
            &[part(r.dtokens, 0, b * np * w), whole(r.dpatch)],
        )?;
        // Split along the patches where the model says it pays ([`Regions::split`]).
        let cap = r.split.map_or(0, |id| lay.region(id).len);
        let (split_k, ws) = bd.weight_grad_split((w, k), b * np, cap);
        let work = match r.split {
            Some(id) if split_k > 1 => part(id, 0, ws),
            _ => None,
        };
        pl.add(
            bwd,
            gemm(GemmLayout::WeightGrad, w, k, b * np).plan(GemmOpts { split_k, ..f32_out })?,
            &[
                whole(r.dpatch),
                whole(r.patches),
                None,
                None,
                gr(Tp::Conv),
                None,
                work,
            ],
        )?;
        self.slots = pl.slots;
        Ok(())
    }

    /// The sizes the tower was built for.
    pub fn dims(&self) -> &ImageTowerDims {
        &self.dims
    }

    /// The arena layout; make the arena with `Arena::host(tower.layout().clone(), emu)` or
    /// `Arena::device(tower.layout().clone(), gpu)`.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The kernels of the backward after the blocks' (the embedding's gradients), in launch
    /// order.
    pub fn embed_backward_kernels(&self) -> Vec<&'static str> {
        self.embed_bwd.iter().map(|s| s.kernel).collect()
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[CudaBlock] {
        &self.blocks
    }

    /// Open_clip names of every parameter of the tower (its own, then each block's).
    pub fn param_names(&self) -> Vec<String> {
        let mut v: Vec<String> = own_params(&self.dims)
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        for i in 0..self.dims.layers {
            for (n, _) in super::block::param_specs(&self.dims.block) {
                v.push(format!("{}{n}", block_prefix(i)));
            }
        }
        v
    }

    fn named(&self, kind: &str, name: &str) -> Result<RegionId> {
        self.layout
            .id(&format!("{kind}.{name}"))
            .ok_or_else(|| anyhow!("image tower has no parameter `{name}`"))
    }

    /// The fp32 master region of parameter `name` (an open_clip name, [`Self::param_names`]).
    pub fn param(&self, name: &str) -> Result<RegionId> {
        self.named("param", name)
    }

    /// The fp32 gradient region of parameter `name`.
    pub fn grad(&self, name: &str) -> Result<RegionId> {
        self.named("grad", name)
    }

    /// The input images, bf16 `(B, C, H, W)`.
    pub fn images(&self) -> RegionId {
        self.r.image
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
            "the arena was not made from this image tower's layout"
        );
        Ok(())
    }

    /// Writes the index tables the tower reads (once per arena).
    pub fn write_tables(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        let d = &self.dims;
        let (b, l, np, p, c) = (d.batch(), d.block.len, d.patches(), d.patch, d.channels);
        let (g, h) = (d.image / p, d.image);
        let idx = |v: usize| v as i32;
        // Patch-matrix row ((bi·np + pi)·C + ci)·P + ky ← pixel row ((bi·C + ci)·H + y)·g + gx.
        let mut im2col = Vec::with_capacity(b * np * c * p);
        for bi in 0..b {
            for pi in 0..np {
                let (gy, gx) = (pi / g, pi % g);
                for ci in 0..c {
                    for ky in 0..p {
                        im2col.push(idx(((bi * c + ci) * h + gy * p + ky) * g + gx));
                    }
                }
            }
        }
        // Sequence row (bi, t): the class token (last table row) at t = 0, else patch t-1.
        let token_rows: Vec<i32> = (0..b * l)
            .map(|r| {
                let (bi, t) = (r / l, r % l);
                idx(if t == 0 { b * np } else { bi * np + t - 1 })
            })
            .collect();
        let pos_rows: Vec<i32> = (0..b * l).map(|r| idx(r % l)).collect();
        let cls_rows: Vec<i32> = (0..b).map(|bi| idx(bi * l)).collect();
        // Output-gradient row (bi, t): the class gradient of image bi at t = 0, else the zero row.
        let dy_rows: Vec<i32> = (0..b * l)
            .map(|r| idx(if r % l == 0 { r / l } else { b }))
            .collect();
        let r = &self.r;
        arena.write_i32(r.im2col, &im2col)?;
        arena.write_i32(r.token_rows, &token_rows)?;
        arena.write_i32(r.pos_index, &pos_rows)?;
        r.token_scatter.write(arena, &token_rows)?;
        r.pos_scatter.write(arena, &pos_rows)?;
        arena.write_i32(r.cls_rows, &cls_rows)?;
        arena.write_i32(r.dy_rows, &dy_rows)?;
        arena.write_i32(r.bad, &[0])?;
        for blk in &self.blocks {
            blk.set_lengths(arena, &vec![l; b])?;
        }
        Ok(())
    }

    /// Out-of-range gather indices seen so far (0 unless a table is wrong; the blocks gather
    /// nothing).
    pub fn bad_index_count(&self, arena: &mut Arena) -> Result<i32> {
        self.check_arena(arena)?;
        Ok(arena.read_i32(self.r.bad)?[0])
    }

    /// Forward: casts the master weights to bf16 (standalone towers), then computes the features from the images.
    pub fn forward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        // SAFETY: the arena has this tower's layout and every slot was checked against its
        // region when the plans were built.
        unsafe { arena.run(&self.embed_fwd, &self.slots)? };
        for blk in &self.blocks {
            blk.forward(arena)?;
        }
        // SAFETY: as above.
        unsafe { arena.run(&self.head_fwd, &self.slots) }
    }

    /// Backward from `features_grad`: every parameter gradient (overwritten). Uses the
    /// activations of the last [`CudaImageTower::forward`].
    pub fn backward(&self, arena: &mut Arena) -> Result<()> {
        self.check_arena(arena)?;
        // SAFETY: as in `forward`.
        unsafe { arena.run(&self.head_bwd, &self.slots)? };
        for blk in self.blocks.iter().rev() {
            blk.backward(arena)?;
        }
        // SAFETY: as in `forward`.
        unsafe { arena.run(&self.embed_bwd, &self.slots) }
    }
}
