//! `ClipModel`: the student — a ViT image tower and a BERT-like (or CLIP-style causal) text tower,
//! each ending in a projection to the joint width, plus the learnable logit scale. All weights
//! live in one [`ParamStore`] under open_clip / Hugging Face names; the towers hold only
//! [`ParamView`]s into it, resolved once at construction.

use crate::config::{Activation, ModelConfig, NormPlacement, Pooling};
use crate::error::{EngineError, Result};
use crate::ops::linear::WLayout;
use crate::ops::recompute::BlockFn;
use crate::params::{ParamId, ParamStore, ParamView};
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Views of one transformer block's parameters.
#[derive(Clone, Copy, Debug)]
struct BlockParams {
    ln1: (ParamView, ParamView),
    qkv_w: ParamView,
    qkv_b: ParamView,
    out_w: ParamView,
    out_b: ParamView,
    ln2: (ParamView, ParamView),
    fc_w: ParamView,
    fc_b: ParamView,
    proj_w: ParamView,
    proj_b: ParamView,
}

/// Geometry shared by the blocks of one tower for one batch.
#[derive(Clone, Debug)]
struct BlockGeom {
    width: usize,
    hidden: usize,
    heads: usize,
    act: Activation,
    norm: NormPlacement,
    eps: f64,
    lengths: Option<Arc<Vec<usize>>>,
    causal: bool,
    /// The tower runs on the valid tokens only, packed as rows `(T, W)`, the attention too
    /// (`lengths` places the sequences).
    packed: bool,
}

/// Where a batch's valid tokens sit in its padded `(B, L)` layout: the flat padded row
/// (`b · L + t`) of each packed row, sequence by sequence; `None` when nothing is padded
/// (packing would only copy).
fn packed_rows(lengths: &[usize], len: usize) -> Option<Vec<usize>> {
    lengths.iter().any(|&n| n < len).then(|| {
        (0..lengths.len())
            .flat_map(|b| (0..lengths[b]).map(move |t| b * len + t))
            .collect()
    })
}

/// One transformer block on `x (B, L, W)`, or on its valid tokens `(T, W)` when packed.
fn block_forward(
    t: &mut Tape,
    p: &ParamStore,
    x: Var,
    b: &BlockParams,
    g: &BlockGeom,
) -> Result<Var> {
    let attn = |t: &mut Tape, h: Var| -> Result<Var> {
        // (B, L, 3W), or (T, 3W) when packed
        let qkv = t.linear(p, h, b.qkv_w, Some(b.qkv_b), WLayout::OutIn, 3 * g.width)?;
        let lengths = g.lengths.as_deref().map(|v| &v[..]);
        let a = match (g.packed, lengths) {
            (true, Some(n)) => t.attention_packed(qkv, g.heads, n, g.causal)?, // (T, W)
            _ => t.attention(qkv, g.heads, lengths, g.causal)?,                // (B, L, W)
        };
        t.linear(p, a, b.out_w, Some(b.out_b), WLayout::OutIn, g.width)
    };
    let mlp = |t: &mut Tape, h: Var| -> Result<Var> {
        let u = t.linear(p, h, b.fc_w, Some(b.fc_b), WLayout::OutIn, g.hidden)?; // (B, L, Hm)
        let u = match g.act {
            Activation::QuickGelu => t.quick_gelu(u)?,
            Activation::Gelu => t.gelu(u)?,
        };
        t.linear(p, u, b.proj_w, Some(b.proj_b), WLayout::OutIn, g.width) // (B, L, W)
    };
    match g.norm {
        NormPlacement::Pre => {
            let h = t.layer_norm(p, x, b.ln1.0, b.ln1.1, g.eps)?;
            let a = attn(t, h)?;
            let x = t.add(x, a)?;
            let h = t.layer_norm(p, x, b.ln2.0, b.ln2.1, g.eps)?;
            let m = mlp(t, h)?;
            t.add(x, m)
        }
        NormPlacement::Post => {
            let a = attn(t, x)?;
            let s = t.add(x, a)?;
            let x = t.layer_norm(p, s, b.ln1.0, b.ln1.1, g.eps)?;
            let m = mlp(t, x)?;
            let s = t.add(x, m)?;
            t.layer_norm(p, s, b.ln2.0, b.ln2.1, g.eps)
        }
    }
}

/// One pre-LN open_clip transformer block on its own (benchmarks, experiments): parameters
/// under `prefix` in a store, CLIP initialisation.
pub struct TransformerBlock {
    params: BlockParams,
    geom: BlockGeom,
}

impl TransformerBlock {
    /// Adds an open_clip `ResidualAttentionBlock`'s parameters to `ps` under `prefix` and
    /// returns the block (`layers` only scales the initialisation, as in CLIP).
    #[allow(clippy::too_many_arguments)]
    pub fn open_clip(
        ps: &mut ParamStore,
        prefix: &str,
        width: usize,
        heads: usize,
        mlp_ratio: f64,
        act: Activation,
        layers: usize,
        seed: u64,
    ) -> Result<Self> {
        let hidden = (mlp_ratio * width as f64) as usize;
        if heads == 0 || !width.is_multiple_of(heads) || hidden == 0 {
            return Err(EngineError::Config(format!(
                "block `{prefix}`: width {width}, heads {heads}, mlp_ratio {mlp_ratio}"
            )));
        }
        let mut init = Init(ChaCha8Rng::seed_from_u64(seed));
        let params = add_block(
            ps,
            &mut init,
            prefix,
            BlockNaming::OpenClip,
            width,
            hidden,
            layers,
        )?;
        let geom = BlockGeom {
            width,
            hidden,
            heads,
            act,
            norm: NormPlacement::Pre,
            eps: 1e-5,
            lengths: None,
            causal: false,
            packed: false,
        };
        Ok(TransformerBlock { params, geom })
    }

    /// Applies the block to `x (B, L, W)`.
    pub fn forward(&self, tape: &mut Tape, ps: &ParamStore, x: Var) -> Result<Var> {
        block_forward(tape, ps, x, &self.params, &self.geom)
    }
}

struct VisionParams {
    class_embedding: ParamView,
    positional_embedding: ParamView,
    proj: ParamView,
    conv1: ParamView,
    ln_pre: (ParamView, ParamView),
    blocks: Vec<BlockParams>,
    ln_post: (ParamView, ParamView),
}

struct TextParams {
    word: ParamView,
    position: ParamView,
    token_type: ParamView,
    emb_ln: (ParamView, ParamView),
    blocks: Vec<BlockParams>,
    ln_final: Option<(ParamView, ParamView)>,
    proj0: ParamView,
    proj2: ParamView,
}

/// Seeded initialisers (Box–Muller normals, uniforms).
struct Init(ChaCha8Rng);

impl Init {
    fn normal(&mut self, std: f64) -> impl FnMut(&mut [f32]) + '_ {
        move |s: &mut [f32]| {
            for v in s.iter_mut() {
                let u1: f64 = self.0.gen_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = self.0.gen();
                *v = (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                    as f32;
            }
        }
    }
    fn uniform(&mut self, bound: f64) -> impl FnMut(&mut [f32]) + '_ {
        move |s: &mut [f32]| {
            for v in s.iter_mut() {
                *v = self.0.gen_range(-bound..bound) as f32;
            }
        }
    }
}

fn zeros(_: &mut [f32]) {}
fn ones(s: &mut [f32]) {
    s.iter_mut().for_each(|v| *v = 1.0);
}

/// Names of one block's parameters, in layout order, and how to initialise them.
enum BlockNaming {
    /// open_clip `ResidualAttentionBlock` under `prefix` (`visual.transformer.resblocks.{i}`).
    OpenClip,
    /// Hugging Face `BertLayer` under `prefix` (`text.transformer.encoder.layer.{i}`).
    Bert,
}

fn add_block(
    ps: &mut ParamStore,
    init: &mut Init,
    prefix: &str,
    naming: BlockNaming,
    w: usize,
    hidden: usize,
    layers: usize,
) -> Result<BlockParams> {
    let n = |s: &str| format!("{prefix}.{s}");
    match naming {
        BlockNaming::OpenClip => {
            // CLIP's init: attention std W^-½, output projections W^-½ (2·layers)^-½,
            // MLP input (2W)^-½.
            let attn_std = (w as f64).powf(-0.5);
            let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
            let fc_std = ((2 * w) as f64).powf(-0.5);
            let ln1g = ps.add(&n("ln_1.weight"), &[w], ones)?;
            let ln1b = ps.add(&n("ln_1.bias"), &[w], zeros)?;
            let qkv_w = ps.add(
                &n("attn.in_proj_weight"),
                &[3 * w, w],
                init.normal(attn_std),
            )?;
            let qkv_b = ps.add(&n("attn.in_proj_bias"), &[3 * w], zeros)?;
            let out_w = ps.add(&n("attn.out_proj.weight"), &[w, w], init.normal(proj_std))?;
            let out_b = ps.add(&n("attn.out_proj.bias"), &[w], zeros)?;
            let ln2g = ps.add(&n("ln_2.weight"), &[w], ones)?;
            let ln2b = ps.add(&n("ln_2.bias"), &[w], zeros)?;
            let fc_w = ps.add(&n("mlp.c_fc.weight"), &[hidden, w], init.normal(fc_std))?;
            let fc_b = ps.add(&n("mlp.c_fc.bias"), &[hidden], zeros)?;
            let pr_w = ps.add(&n("mlp.c_proj.weight"), &[w, hidden], init.normal(proj_std))?;
            let pr_b = ps.add(&n("mlp.c_proj.bias"), &[w], zeros)?;
            Ok(BlockParams {
                ln1: (ps.view(ln1g), ps.view(ln1b)),
                qkv_w: ps.view(qkv_w),
                qkv_b: ps.view(qkv_b),
                out_w: ps.view(out_w),
                out_b: ps.view(out_b),
                ln2: (ps.view(ln2g), ps.view(ln2b)),
                fc_w: ps.view(fc_w),
                fc_b: ps.view(fc_b),
                proj_w: ps.view(pr_w),
                proj_b: ps.view(pr_b),
            })
        }
        BlockNaming::Bert => {
            // BERT's init: every weight N(0, 0.02²), biases 0, LayerNorm 1/0. Query, key and
            // value weights (then biases) are laid out back to back so that one view reads them
            // as the packed (3W, W) matrix the fused attention expects.
            let std = 0.02;
            let q = ps.add(&n("attention.self.query.weight"), &[w, w], init.normal(std))?;
            let k = ps.add(&n("attention.self.key.weight"), &[w, w], init.normal(std))?;
            let v = ps.add(&n("attention.self.value.weight"), &[w, w], init.normal(std))?;
            let qb = ps.add(&n("attention.self.query.bias"), &[w], zeros)?;
            let kb = ps.add(&n("attention.self.key.bias"), &[w], zeros)?;
            let vb = ps.add(&n("attention.self.value.bias"), &[w], zeros)?;
            let out_w = ps.add(
                &n("attention.output.dense.weight"),
                &[w, w],
                init.normal(std),
            )?;
            let out_b = ps.add(&n("attention.output.dense.bias"), &[w], zeros)?;
            let ln1g = ps.add(&n("attention.output.LayerNorm.weight"), &[w], ones)?;
            let ln1b = ps.add(&n("attention.output.LayerNorm.bias"), &[w], zeros)?;
            let fc_w = ps.add(
                &n("intermediate.dense.weight"),
                &[hidden, w],
                init.normal(std),
            )?;
            let fc_b = ps.add(&n("intermediate.dense.bias"), &[hidden], zeros)?;
            let pr_w = ps.add(&n("output.dense.weight"), &[w, hidden], init.normal(std))?;
            let pr_b = ps.add(&n("output.dense.bias"), &[w], zeros)?;
            let ln2g = ps.add(&n("output.LayerNorm.weight"), &[w], ones)?;
            let ln2b = ps.add(&n("output.LayerNorm.bias"), &[w], zeros)?;
            Ok(BlockParams {
                ln1: (ps.view(ln1g), ps.view(ln1b)),
                qkv_w: ps.span(&[q, k, v])?,
                qkv_b: ps.span(&[qb, kb, vb])?,
                out_w: ps.view(out_w),
                out_b: ps.view(out_b),
                ln2: (ps.view(ln2g), ps.view(ln2b)),
                fc_w: ps.view(fc_w),
                fc_b: ps.view(fc_b),
                proj_w: ps.view(pr_w),
                proj_b: ps.view(pr_b),
            })
        }
    }
}

/// The CLIP student.
pub struct ClipModel {
    /// The configuration it was built from.
    pub config: ModelConfig,
    /// All parameters and gradients.
    pub params: ParamStore,
    vision: VisionParams,
    text: TextParams,
    logit_scale: ParamId,
    checkpointing: bool,
}

impl ClipModel {
    /// Builds the model with open_clip-style initialisation seeded by `config.seed`.
    pub fn new(config: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let mut ps = ParamStore::new();
        let mut init = Init(ChaCha8Rng::seed_from_u64(config.seed));
        let v = &config.vision;
        let (w, j) = (v.width, config.embed_dim);
        let scale = (w as f64).powf(-0.5);
        let np = config.num_patches();
        let vhidden = (v.mlp_ratio * w as f64) as usize;
        let cls = ps.add("visual.class_embedding", &[w], init.normal(scale))?;
        let pos = ps.add(
            "visual.positional_embedding",
            &[np + 1, w],
            init.normal(scale),
        )?;
        let proj = ps.add("visual.proj", &[w, j], init.normal(scale))?;
        let k = v.channels * v.patch_size * v.patch_size;
        let conv1 = ps.add(
            "visual.conv1.weight",
            &[w, v.channels, v.patch_size, v.patch_size],
            init.uniform((k as f64).powf(-0.5)),
        )?;
        let lpg = ps.add("visual.ln_pre.weight", &[w], ones)?;
        let lpb = ps.add("visual.ln_pre.bias", &[w], zeros)?;
        let mut vblocks = Vec::with_capacity(v.layers);
        for i in 0..v.layers {
            let prefix = format!("visual.transformer.resblocks.{i}");
            vblocks.push(add_block(
                &mut ps,
                &mut init,
                &prefix,
                BlockNaming::OpenClip,
                w,
                vhidden,
                v.layers,
            )?);
        }
        let lqg = ps.add("visual.ln_post.weight", &[w], ones)?;
        let lqb = ps.add("visual.ln_post.bias", &[w], zeros)?;
        let vision = VisionParams {
            class_embedding: ps.view(cls),
            positional_embedding: ps.view(pos),
            proj: ps.view(proj),
            conv1: ps.view(conv1),
            ln_pre: (ps.view(lpg), ps.view(lpb)),
            blocks: vblocks,
            ln_post: (ps.view(lqg), ps.view(lqb)),
        };

        let t = &config.text;
        let tw = t.width;
        let thidden = (t.mlp_ratio * tw as f64) as usize;
        let e = "text.transformer.embeddings";
        let word = ps.add(
            &format!("{e}.word_embeddings.weight"),
            &[t.vocab_size, tw],
            init.normal(0.02),
        )?;
        let position = ps.add(
            &format!("{e}.position_embeddings.weight"),
            &[t.context_length, tw],
            init.normal(0.02),
        )?;
        let ttype = ps.add(
            &format!("{e}.token_type_embeddings.weight"),
            &[t.type_vocab_size, tw],
            init.normal(0.02),
        )?;
        let eg = ps.add(&format!("{e}.LayerNorm.weight"), &[tw], ones)?;
        let eb = ps.add(&format!("{e}.LayerNorm.bias"), &[tw], zeros)?;
        let mut tblocks = Vec::with_capacity(t.layers);
        for i in 0..t.layers {
            let prefix = format!("text.transformer.encoder.layer.{i}");
            tblocks.push(add_block(
                &mut ps,
                &mut init,
                &prefix,
                BlockNaming::Bert,
                tw,
                thidden,
                t.layers,
            )?);
        }
        let ln_final = match t.norm {
            NormPlacement::Pre => {
                let g = ps.add("text.ln_final.weight", &[tw], ones)?;
                let b = ps.add("text.ln_final.bias", &[tw], zeros)?;
                Some((ps.view(g), ps.view(b)))
            }
            NormPlacement::Post => None,
        };
        let ph = config.text_proj_hidden();
        let p0 = ps.add(
            "text.proj.0.weight",
            &[ph, tw],
            init.uniform((tw as f64).powf(-0.5)),
        )?;
        let p2 = ps.add(
            "text.proj.2.weight",
            &[j, ph],
            init.uniform((ph as f64).powf(-0.5)),
        )?;
        let text = TextParams {
            word: ps.view(word),
            position: ps.view(position),
            token_type: ps.view(ttype),
            emb_ln: (ps.view(eg), ps.view(eb)),
            blocks: tblocks,
            ln_final,
            proj0: ps.view(p0),
            proj2: ps.view(p2),
        };
        let ls = config.logit_scale_init as f32;
        let logit_scale = ps.add("logit_scale", &[], |s| s[0] = ls)?;
        Ok(ClipModel {
            config: config.clone(),
            params: ps,
            vision,
            text,
            logit_scale,
            checkpointing: false,
        })
    }

    /// Turns activation checkpointing (recompute each transformer block in backward) on or off.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }
    /// Whether activation checkpointing is on.
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }
    /// Id of the `logit_scale` parameter (a scalar `s`, used as `exp(s)`).
    pub fn logit_scale_id(&self) -> ParamId {
        self.logit_scale
    }
    /// Current logit scale `s` (not exponentiated).
    pub fn logit_scale(&self) -> f32 {
        self.params.value(self.logit_scale)[0]
    }
    /// Clamps `s` to `[0, ln 100]`, as after every optimiser step.
    pub fn clamp_logit_scale(&mut self) {
        let v = &mut self.params.value_mut(self.logit_scale)[0];
        *v = v.clamp(0.0, 100f32.ln());
    }

    fn run_blocks(
        &self,
        tape: &mut Tape,
        mut x: Var,
        blocks: &[BlockParams],
        geom: &BlockGeom,
    ) -> Result<Var> {
        for b in blocks {
            x = if !tape.is_recording() {
                // Inference: run each block on its own tape so its internals are freed at once.
                let mut sub = Tape::on(tape.device(), false);
                let xi = sub.constant(tape.value(x).to_vec(), tape.shape(x))?;
                let y = block_forward(&mut sub, &self.params, xi, b, geom)?;
                let shape = sub.shape(y).to_vec();
                tape.constant(sub.take_value(y), &shape)?
            } else if self.checkpointing {
                let (b, g) = (*b, geom.clone());
                let f: BlockFn = Arc::new(move |t, p, x| block_forward(t, p, x, &b, &g));
                tape.checkpoint(&self.params, x, f)?
            } else {
                block_forward(tape, &self.params, x, b, geom)?
            };
        }
        Ok(x)
    }

    /// Image features `(B, embed_dim)`, not normalised, from `images: f32 (B, C, H, W)`.
    pub fn encode_image(&self, tape: &mut Tape, images: &Tensor) -> Result<Var> {
        let v = &self.config.vision;
        let s = images.shape();
        if s.len() != 4 || s[1] != v.channels || s[2] != v.image_size || s[3] != v.image_size {
            return Err(EngineError::Input(format!(
                "encode_image: images must be (B, {}, {}, {}), got {s:?}",
                v.channels, v.image_size, v.image_size
            )));
        }
        let b = s[0];
        let p = &self.params;
        let vp = &self.vision;
        let x = tape.patch_embed(
            p,
            images.as_f32()?,
            [b, s[1], s[2], s[3]],
            vp.conv1,
            v.patch_size,
            v.width,
        )?; // (B, P, W)
        let x = tape.cls_pos(p, x, vp.class_embedding, vp.positional_embedding)?; // (B, 1+P, W)
        let x = tape.layer_norm(p, x, vp.ln_pre.0, vp.ln_pre.1, v.ln_eps)?;
        let geom = BlockGeom {
            width: v.width,
            hidden: (v.mlp_ratio * v.width as f64) as usize,
            heads: v.heads,
            act: v.act,
            norm: NormPlacement::Pre,
            eps: v.ln_eps,
            lengths: None,
            causal: false,
            packed: false,
        };
        let x = self.run_blocks(tape, x, &vp.blocks, &geom)?;
        let l = tape.shape(x)[1]; // 1 + patches
        let cls: Vec<usize> = (0..b).map(|i| i * l).collect();
        let x = tape.pack_rows(x, &cls)?; // (B, W): class token
        let x = tape.layer_norm(p, x, vp.ln_post.0, vp.ln_post.1, v.ln_eps)?;
        tape.linear(p, x, vp.proj, None, WLayout::InOut, self.config.embed_dim) // (B, J)
    }

    /// Text features `(B, embed_dim)`, not normalised, from token ids `u32 (B, L)` (L at most
    /// `context_length`) and the number of valid tokens of each row (1..=L; the rest is padding
    /// and masked out of attention).
    pub fn encode_text(&self, tape: &mut Tape, tokens: &Tensor, lengths: &[usize]) -> Result<Var> {
        let t = &self.config.text;
        let s = tokens.shape();
        if s.len() != 2 || s[1] == 0 || s[1] > t.context_length {
            return Err(EngineError::Input(format!(
                "encode_text: tokens must be (B, L) with 1 ≤ L ≤ {}, got {s:?}",
                t.context_length
            )));
        }
        let (b, l) = (s[0], s[1]);
        if lengths.len() != b {
            return Err(EngineError::Input(format!(
                "encode_text: {} lengths for a batch of {b}",
                lengths.len()
            )));
        }
        if let Some((i, &n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > l) {
            return Err(EngineError::Input(format!(
                "encode_text: length {n} of row {i} is not in 1..={l}"
            )));
        }
        let p = &self.params;
        let tp = &self.text;
        let w = t.width;
        let x = tape.embedding(p, tokens.as_u32()?, tp.word, w, &[b, l, w])?; // (B, L, W)
        let pos = ParamView {
            offset: tp.position.offset,
            len: l * w,
        };
        let x = tape.add_param(p, x, pos)?;
        let typ0 = ParamView {
            offset: tp.token_type.offset,
            len: w,
        };
        let x = tape.add_param(p, x, typ0)?;
        let x = tape.layer_norm(p, x, tp.emb_ln.0, tp.emb_ln.1, t.ln_eps)?;
        // Every block's work on the valid tokens only: short captions do not pay for the
        // padding.
        let packed = packed_rows(lengths, l);
        let x = match &packed {
            Some(rows) => tape.pack_rows(x, rows)?, // (T, W)
            None => x,
        };
        let geom = BlockGeom {
            width: w,
            hidden: (t.mlp_ratio * w as f64) as usize,
            heads: t.heads,
            act: t.act,
            norm: t.norm,
            eps: t.ln_eps,
            lengths: Some(Arc::new(lengths.to_vec())),
            causal: t.causal,
            packed: packed.is_some(),
        };
        let x = self.run_blocks(tape, x, &tp.blocks, &geom)?;
        let rows: Vec<usize> = match t.pooling {
            Pooling::Cls => vec![0; b],
            Pooling::Eot => lengths.iter().map(|&n| n - 1).collect(),
        };
        // Sequence b's tokens start at b · L, or, packed, at the sum of the lengths before it.
        let starts: Vec<usize> = match &packed {
            Some(_) => lengths
                .iter()
                .scan(0, |acc, &n| {
                    let s = *acc;
                    *acc += n;
                    Some(s)
                })
                .collect(),
            None => (0..b).map(|i| i * l).collect(),
        };
        let at: Vec<usize> = starts.iter().zip(&rows).map(|(s, r)| s + r).collect();
        let mut x = tape.pack_rows(x, &at)?; // (B, W)
        if let Some((g, bb)) = tp.ln_final {
            x = tape.layer_norm(p, x, g, bb, t.ln_eps)?;
        }
        let ph = self.config.text_proj_hidden();
        let h = tape.linear(p, x, tp.proj0, None, WLayout::OutIn, ph)?; // (B, (W+J)/2)
        let h = tape.gelu(h)?;
        tape.linear(p, h, tp.proj2, None, WLayout::OutIn, self.config.embed_dim)
        // (B, J)
    }

    /// Image features without recording a graph (evaluation, feature caching).
    pub fn embed_images(&self, images: &Tensor) -> Result<Tensor> {
        let mut tape = Tape::on(crate::tensor::Device::Cpu, false);
        let v = self.encode_image(&mut tape, images)?;
        tape.tensor(v)
    }
    /// Text features without recording a graph.
    pub fn embed_texts(&self, tokens: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let mut tape = Tape::on(crate::tensor::Device::Cpu, false);
        let v = self.encode_text(&mut tape, tokens, lengths)?;
        tape.tensor(v)
    }

    /// The symmetric CLIP loss on the tape, `½[CE(e^s I Tᵀ, diag) + CE(e^s T Iᵀ, diag)]` with
    /// `I`, `T` the L2-normalised features and `s` this model's logit scale (which receives a
    /// gradient). Used by tests and as a cross-check of the training loss.
    pub fn clip_loss(&self, tape: &mut Tape, img: Var, txt: Var) -> Result<Var> {
        let i = tape.l2_normalize(img)?;
        let t = tape.l2_normalize(txt)?;
        let n = tape.shape(i)[0];
        let logits = tape.matmul_nt(i, t)?; // (N, N)
        let logits = tape.scale_exp(&self.params, logits, self.params.view(self.logit_scale))?;
        let diag: Vec<u32> = (0..n as u32).collect();
        let a = tape.cross_entropy(logits, &diag)?;
        let lt = tape.transpose(logits)?;
        let b = tape.cross_entropy(lt, &diag)?;
        let s = tape.add(a, b)?;
        tape.scale(s, 0.5)
    }
}
