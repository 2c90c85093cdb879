//! The CUDA image and text towers (`mmkd_engine::cuda::{CudaImageTower, CudaTextTower}`)
//! against the engine's own `ClipModel::encode_image` / `encode_text` on the tape: features
//! and every parameter gradient of the tower, from one seed gradient of the features, run
//! through the emulation of the CUDA sources (and on a GPU when one is present). Weights,
//! inputs and the seed lie on the bf16 grid, so the comparison measures the bf16 activations
//! of the kernels. Every gradient, activation and scratch region is poisoned with NaN first.

use half::bf16;
use mmkd_engine::cuda::{
    Arena, CudaImageTower, CudaTextTower, Dtype, ImageTowerDims, RegionId, Section, TextTowerDims,
    TEXT_FILLER_ID,
};
use mmkd_engine::{ClipModel, ModelConfig, NormPlacement, Pooling, Tape, Tensor};
use mmkd_kernels::testing::{fresh_seed, rel_err, rng};
use mmkd_kernels::{Device, DeviceRequest, Emu};
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;

/// Relative error bound of bf16 activations against the f32 reference.
const TOL: f64 = 2e-2;
const BATCH: usize = 2;

/// A tiny student whose towers have 64-wide heads (the attention kernel's width).
fn config() -> ModelConfig {
    config_sized(32, 8, 2)
}

/// [`config`] with another image tower: image side, patch side and blocks.
fn config_sized(image: usize, patch: usize, layers: usize) -> ModelConfig {
    let src = format!(
        r#"
embed_dim = 64
seed = 0

[vision]
image_size = {image}
patch_size = {patch}
width = 128
layers = {layers}
heads = 2
mlp_ratio = 4.0
act = "quick_gelu"

[text]
vocab_size = 64
context_length = 16
width = 128
layers = 2
heads = 2
mlp_ratio = 4.0
act = "gelu"
norm = "post"
causal = false
pooling = "cls"
"#
    );
    ModelConfig::from_toml_str(&src, "cuda_tower test config").unwrap()
}

/// `n` values uniform in [lo, hi), rounded to bf16 and kept as f32.
fn on_grid(g: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(g.gen_range(lo..hi)).to_f32())
        .collect()
}

/// Overwrites every image-tower parameter with random bf16-grid values: gains near 1,
/// biases and embeddings small, matrices about 1/√fan_in.
fn randomise(m: &mut ClipModel, names: &[String], g: &mut impl Rng) {
    for name in names {
        let id = m.params.require(name).unwrap();
        let shape = m.params.info(id).shape.clone();
        let n: usize = shape.iter().product();
        let gain = name.contains("ln_") || name.contains("LayerNorm");
        let v = if gain && name.ends_with("weight") {
            on_grid(g, n, 0.6, 1.4)
        } else if shape.len() == 1 || name.contains("embedding") {
            on_grid(g, n, -0.5, 0.5)
        } else {
            let fan_in: usize = if name == "visual.proj" {
                shape[0]
            } else {
                shape[1..].iter().product()
            };
            let b = 1.7 / (fan_in as f32).sqrt();
            on_grid(g, n, -b, b)
        };
        m.params.value_mut(id).copy_from_slice(&v);
    }
}

/// Features and parameter gradients (in `param_names` order).
struct Run {
    features: Vec<f64>,
    grads: Vec<Vec<f64>>,
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn cpu_tower(m: &mut ClipModel, names: &[String], img: &[f32], dfeat: &[f32]) -> Run {
    let v = m.config.vision.clone();
    let t = Tensor::from_f32(
        img.to_vec(),
        &[BATCH, v.channels, v.image_size, v.image_size],
    )
    .unwrap();
    let mut tape = Tape::new();
    let f = m.encode_image(&mut tape, &t).unwrap();
    let features = widen(tape.value(f));
    m.params.zero_grad();
    tape.backward(&mut m.params, &[(f, dfeat)]).unwrap();
    let grads = names
        .iter()
        .map(|n| widen(m.params.grad_of(m.params.require(n).unwrap())))
        .collect();
    Run { features, grads }
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Loads the masters, poisons every gradient, activation and scratch region with NaN, writes
/// the tables, images and seed.
fn poison_all(arena: &mut Arena) {
    let layout = arena.layout().clone();
    for r in layout.regions() {
        let float = r.dtype != Dtype::I32;
        if float && matches!(r.section, Section::Grads | Section::Acts | Section::Scratch) {
            arena.poison(layout.id(&r.name).unwrap()).unwrap();
        }
    }
}

fn prepare(tower: &CudaImageTower, arena: &mut Arena, m: &ClipModel, img: &[f32], dfeat: &[f32]) {
    for name in tower.param_names() {
        let id = m.params.require(&name).unwrap();
        arena
            .write_f32(tower.param(&name).unwrap(), m.params.value(id))
            .unwrap();
    }
    poison_all(arena);
    tower.write_tables(arena).unwrap();
    arena.write_bf16(tower.images(), &bf(img)).unwrap();
    arena.write_bf16(tower.features_grad(), &bf(dfeat)).unwrap();
}

fn cuda_run(tower: &CudaImageTower, arena: &mut Arena) -> Run {
    tower.forward(arena).unwrap();
    tower.backward(arena).unwrap();
    let features = widen(&arena.read_f32(tower.features()).unwrap());
    let grads = tower
        .param_names()
        .iter()
        .map(|n| widen(&arena.read_f32(tower.grad(n).unwrap()).unwrap()))
        .collect();
    assert_eq!(
        tower.bad_index_count(arena).unwrap(),
        0,
        "an index table indexed out of range"
    );
    Run { features, grads }
}

/// Every error, printed; the rows returned.
fn errors(names: &[String], got: &Run, want: &Run) -> Vec<(String, f64)> {
    let mut rows = vec![(
        "features".to_string(),
        rel_err(&got.features, &want.features),
    )];
    for (name, (g, w)) in names.iter().zip(got.grads.iter().zip(&want.grads)) {
        rows.push((name.clone(), rel_err(g, w)));
    }
    rows
}

/// Every row of [`errors`] within [`TOL`].
fn assert_within_tol(seed: u64, rows: &[(String, f64)]) {
    for (name, e) in rows {
        assert!(*e <= TOL, "seed {seed}: `{name}` rel err {e:.3e} > {TOL:e}");
    }
}

fn report(what: &str, seed: u64, rows: &[(String, f64)]) -> f64 {
    let worst = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    eprintln!("{what} (seed {seed}): max rel err {worst:.3e}");
    for (name, e) in rows {
        eprintln!("  {name:<52} {e:.3e}");
    }
    worst
}

struct Case {
    model: ClipModel,
    names: Vec<String>,
    tower: CudaImageTower,
    img: Vec<f32>,
    dfeat: Vec<f32>,
    want: Run,
    seed: u64,
}

fn case() -> Case {
    case_with(config())
}

fn case_with(cfg: ModelConfig) -> Case {
    let dims = ImageTowerDims::from_config(&cfg, BATCH).unwrap();
    let tower = CudaImageTower::new(dims).unwrap();
    let names = tower.param_names();
    let mut model = ClipModel::new(&cfg).unwrap();
    // The tower covers every image-tower parameter of the model, and nothing else.
    let mut visual: Vec<String> = model
        .params
        .infos()
        .iter()
        .map(|i| i.name.clone())
        .filter(|n| n.starts_with("visual."))
        .collect();
    let mut sorted = names.clone();
    visual.sort();
    sorted.sort();
    assert_eq!(sorted, visual);
    let seed = fresh_seed();
    let mut g = rng(seed);
    randomise(&mut model, &names, &mut g);
    let v = &cfg.vision;
    let img = on_grid(
        &mut g,
        BATCH * v.channels * v.image_size * v.image_size,
        -1.5,
        1.5,
    );
    let dfeat = on_grid(&mut g, BATCH * cfg.embed_dim, -1.0, 1.0);
    let want = cpu_tower(&mut model, &names, &img, &dfeat);
    Case {
        model,
        names,
        tower,
        img,
        dfeat,
        want,
        seed,
    }
}

/// Features and every gradient of the image tower match the tape; then a positional table
/// shifted by one row (a wrong offset) must break the comparison.
#[test]
fn image_tower_matches_tape_and_a_wrong_position_offset_fails() {
    let c = case();
    let mut arena = Arena::host(c.tower.layout().clone(), Emu::default());
    prepare(&c.tower, &mut arena, &c.model, &c.img, &c.dfeat);
    let got = cuda_run(&c.tower, &mut arena);
    let rows = errors(&c.names, &got, &c.want);
    report("image tower, emulation", c.seed, &rows);
    assert_within_tol(c.seed, &rows);

    // Position t of every image reads row t+1 of the positional table (row 0 for the last).
    prepare(&c.tower, &mut arena, &c.model, &c.img, &c.dfeat);
    let id = arena
        .layout()
        .id("table.visual.pos_rows")
        .expect("positional index table");
    let l = c.tower.dims().block.len;
    let shifted: Vec<i32> = (0..BATCH * l).map(|r| ((r % l + 1) % l) as i32).collect();
    arena.write_i32(id, &shifted).unwrap();
    let bad = cuda_run(&c.tower, &mut arena);
    let rows = errors(&c.names, &bad, &c.want);
    let worst = report("image tower, positions shifted by one", c.seed, &rows);
    assert!(
        worst > 10.0 * TOL,
        "seed {}: a shifted positional table still matched (max rel err {worst:.3e})",
        c.seed
    );
    let feat = rows[0].1;
    assert!(
        feat > TOL,
        "features unaffected by shifted positions: {feat:.3e}"
    );
}

/// 512 patch tokens: the patch embedding's weight gradient is split along the tokens in the
/// blocks' workspace (as the blocks' own are, over 514 tokens), and every gradient still
/// matches the tape.
#[test]
fn image_tower_with_split_weight_gradients_matches_tape() {
    let c = case_with(config_sized(64, 4, 1));
    let kernels = c.tower.embed_backward_kernels();
    assert_eq!(
        kernels.last(),
        Some(&"gemm_splitk_reduce"),
        "the patch embedding's weight gradient did not split: {kernels:?}"
    );
    let mut arena = Arena::host(c.tower.layout().clone(), Emu::default());
    prepare(&c.tower, &mut arena, &c.model, &c.img, &c.dfeat);
    let got = cuda_run(&c.tower, &mut arena);
    let rows = errors(&c.names, &got, &c.want);
    report("image tower, 512 patch tokens, emulation", c.seed, &rows);
    assert_within_tol(c.seed, &rows);
}

#[test]
fn tower_rejects_bad_shapes_and_foreign_arenas() {
    let cfg = config();
    let dims = ImageTowerDims::from_config(&cfg, BATCH).unwrap();
    let mut wrong_len = dims;
    wrong_len.block.len += 1;
    assert!(CudaImageTower::new(wrong_len).is_err());
    let mut no_layers = dims;
    no_layers.layers = 0;
    assert!(CudaImageTower::new(no_layers).is_err());
    let tower = CudaImageTower::new(dims).unwrap();
    let other = CudaImageTower::new(ImageTowerDims::from_config(&cfg, BATCH + 1).unwrap()).unwrap();
    let mut arena = Arena::host(other.layout().clone(), Emu::default());
    assert!(tower.forward(&mut arena).is_err());
    assert!(tower.write_tables(&mut arena).is_err());
    assert!(tower.param("visual.nonexistent").is_err());
    // Block regions live under open_clip names in the one table.
    let lay = tower.layout();
    // No zero tables: LayerNorms without a residual take none, and buffers are cleared by an
    // axpby with zero coefficients, which reads nothing.
    assert!(lay.regions().iter().all(|r| !r.name.ends_with(".zero")));
    for i in 0..dims.layers {
        let name = format!("grad.visual.transformer.resblocks.{i}.attn.in_proj_weight");
        assert!(lay.id(&name).is_some(), "{name}");
    }
    // One allocation, sections whole and in order.
    let mut ends = Vec::new();
    for s in [
        Section::Params,
        Section::ParamsBf16,
        Section::Grads,
        Section::Acts,
        Section::Scratch,
        Section::Tables,
    ] {
        let (start, len) = lay.section_span(s).unwrap();
        for r in lay.regions().iter().filter(|r| r.section == s) {
            assert!(
                r.offset >= start && r.offset + r.bytes() <= start + len,
                "{}",
                r.name
            );
        }
        ends.push((start, start + len));
    }
    assert!(ends.windows(2).all(|p| p[0].1 <= p[1].0), "{ends:?}");
    assert_eq!(
        lay.section_bytes(Section::Params) / 4,
        lay.section_bytes(Section::ParamsBf16) / 2
    );
}

/// The same comparison on a GPU, with the arena as one device allocation.
#[test]
fn gpu_image_tower_matches_tape_when_present() {
    let gpu = match Device::select(DeviceRequest::Auto).unwrap() {
        Device::Cuda(g) => g,
        Device::Cpu => {
            eprintln!("no CUDA driver or device: the GPU image tower test is skipped");
            return;
        }
    };
    let c = case();
    let mut arena = Arena::device(c.tower.layout().clone(), Arc::clone(&gpu)).unwrap();
    prepare(&c.tower, &mut arena, &c.model, &c.img, &c.dfeat);
    let got = cuda_run(&c.tower, &mut arena);
    let rows = errors(&c.names, &got, &c.want);
    report("image tower, GPU", c.seed, &rows);
    assert_within_tol(c.seed, &rows);
}

// ---- text tower ----

const TEXT_LEN: usize = 11;
const TEXT_LENGTHS: [usize; BATCH] = [11, 6];

/// The arena's gradient regions of the text tower, each with the model tensors packed in it
/// (`(name, offset, len)`): query, key and value share one region. Gradients are compared
/// per region, as the block test compares the packed projection: the key bias alone has an
/// exact gradient of zero (softmax ignores a shift shared by all keys), so a relative error
/// of its bf16 rounding noise means nothing.
type Groups = Vec<(RegionId, String, Vec<(String, usize, usize)>)>;

fn groups(tower: &CudaTextTower) -> Groups {
    let mut out: Groups = Vec::new();
    for p in tower.param_map() {
        let slice = (p.name.clone(), p.offset, p.len);
        match out.iter_mut().find(|g| g.0 == p.grad) {
            Some(g) => g.2.push(slice),
            None => {
                let name = tower.layout().region(p.grad).name["grad.".len()..].to_string();
                out.push((p.grad, name, vec![slice]));
            }
        }
    }
    out
}

struct TextCase {
    model: ClipModel,
    tower: CudaTextTower,
    groups: Groups,
    names: Vec<String>,
    tokens: Vec<u32>,
    dfeat: Vec<f32>,
    want: Run,
    seed: u64,
}

fn text_case(cfg: ModelConfig) -> TextCase {
    let dims = TextTowerDims::from_config(&cfg, BATCH, TEXT_LEN).unwrap();
    let tower = CudaTextTower::new(dims).unwrap();
    let names: Vec<String> = tower.param_map().into_iter().map(|p| p.name).collect();
    let mut model = ClipModel::new(&cfg).unwrap();
    let mut text: Vec<String> = model
        .params
        .infos()
        .iter()
        .map(|i| i.name.clone())
        .filter(|n| n.starts_with("text."))
        .collect();
    let mut sorted = names.clone();
    text.sort();
    sorted.sort();
    assert_eq!(sorted, text);
    let seed = fresh_seed();
    let mut g = rng(seed);
    randomise(&mut model, &names, &mut g);
    let tokens: Vec<u32> = (0..BATCH * TEXT_LEN)
        .map(|_| g.gen_range(0..cfg.text.vocab_size as u32))
        .collect();
    let dfeat = on_grid(&mut g, BATCH * cfg.embed_dim, -1.0, 1.0);
    let groups = groups(&tower);
    let want = tape_text(&mut model, &tower, &groups, &tokens, &TEXT_LENGTHS, &dfeat);
    let names = groups.iter().map(|g| g.1.clone()).collect();
    TextCase {
        model,
        tower,
        groups,
        names,
        tokens,
        dfeat,
        want,
        seed,
    }
}

/// The tape's text features of token ids `(BATCH, L)` and the gradients, per arena region of
/// `groups`, from the seed `dfeat`.
fn tape_text(
    model: &mut ClipModel,
    tower: &CudaTextTower,
    groups: &Groups,
    tokens: &[u32],
    lengths: &[usize],
    dfeat: &[f32],
) -> Run {
    let t = Tensor::from_u32(tokens.to_vec(), &[BATCH, tokens.len() / BATCH]).unwrap();
    let mut tape = Tape::new();
    let f = model.encode_text(&mut tape, &t, lengths).unwrap();
    let features = widen(tape.value(f));
    model.params.zero_grad();
    tape.backward(&mut model.params, &[(f, dfeat)]).unwrap();
    let grads = groups
        .iter()
        .map(|(id, _, slices)| {
            let mut v = vec![f64::NAN; tower.layout().region(*id).len];
            for (n, off, len) in slices {
                let g = model.params.grad_of(model.params.require(n).unwrap());
                v[*off..off + len].copy_from_slice(&widen(g));
            }
            assert!(v.iter().all(|x| x.is_finite()), "a gradient left uncovered");
            v
        })
        .collect();
    Run { features, grads }
}

/// Loads the masters from `model`, poisons the outputs and scratch, writes the batch (token
/// ids `(BATCH, L)`) and the seed.
fn text_load(
    tower: &CudaTextTower,
    model: &ClipModel,
    arena: &mut Arena,
    tokens: &[u32],
    lengths: &[usize],
    dfeat: &[f32],
) {
    let map = tower.param_map();
    let mut masters: HashMap<_, Vec<f32>> = HashMap::new();
    for p in &map {
        let n = arena.layout().region(p.param).len;
        let v = masters.entry(p.param).or_insert_with(|| vec![f32::NAN; n]);
        let id = model.params.require(&p.name).unwrap();
        v[p.offset..p.offset + p.len].copy_from_slice(model.params.value(id));
    }
    for (id, v) in &masters {
        assert!(v.iter().all(|x| x.is_finite()), "a master left unwritten");
        arena.write_f32(*id, v).unwrap();
    }
    poison_all(arena);
    tower.set_batch(arena, tokens, lengths).unwrap();
    arena.write_bf16(tower.features_grad(), &bf(dfeat)).unwrap();
}

fn text_prepare(c: &TextCase, arena: &mut Arena) {
    text_load(
        &c.tower,
        &c.model,
        arena,
        &c.tokens,
        &TEXT_LENGTHS,
        &c.dfeat,
    );
}

fn tower_run(tower: &CudaTextTower, groups: &Groups, arena: &mut Arena) -> Run {
    tower.forward(arena).unwrap();
    tower.backward(arena).unwrap();
    let features = widen(&arena.read_f32(tower.features()).unwrap());
    let grads = groups
        .iter()
        .map(|(id, _, _)| widen(&arena.read_f32(*id).unwrap()))
        .collect();
    assert_eq!(tower.bad_index_count(arena).unwrap(), 0);
    Run { features, grads }
}

fn text_run(c: &TextCase, arena: &mut Arena) -> Run {
    tower_run(&c.tower, &c.groups, arena)
}

fn check_text(what: &str, cfg: ModelConfig) {
    let c = text_case(cfg);
    let mut arena = Arena::host(c.tower.layout().clone(), Emu::default());
    text_prepare(&c, &mut arena);
    let got = text_run(&c, &mut arena);
    let rows = errors(&c.names, &got, &c.want);
    report(&format!("text tower {what}, emulation"), c.seed, &rows);
    assert_within_tol(c.seed, &rows);

    // Position t of every sequence reads row t+1 of the position table.
    text_prepare(&c, &mut arena);
    let id = arena.layout().id("table.text.pos_rows").unwrap();
    let shifted: Vec<i32> = (0..BATCH * TEXT_LEN)
        .map(|r| (r % TEXT_LEN + 1) as i32)
        .collect();
    arena.write_i32(id, &shifted).unwrap();
    let bad = text_run(&c, &mut arena);
    let rows = errors(&c.names, &bad, &c.want);
    let worst = report(
        &format!("text tower {what}, positions shifted"),
        c.seed,
        &rows,
    );
    assert!(
        worst > 10.0 * TOL && rows[0].1 > TOL,
        "seed {}: shifted positions still matched (max rel err {worst:.3e})",
        c.seed
    );
}

/// BERT: post-norm blocks, GELU, `[CLS]` pooling, key padding; then a wrong position offset
/// must break the comparison.
#[test]
fn bert_text_tower_matches_tape_and_a_wrong_position_offset_fails() {
    check_text("post-norm/CLS", config());
}

/// The other switches: pre-norm blocks with `ln_final`, QuickGELU, last-token pooling.
#[test]
fn pre_norm_last_token_text_tower_matches_tape() {
    let mut cfg = config();
    cfg.text.norm = NormPlacement::Pre;
    cfg.text.pooling = Pooling::Eot;
    cfg.text.act = mmkd_engine::Activation::QuickGelu;
    check_text("pre-norm/last token", cfg);
}

#[test]
fn text_tower_rejects_bad_batches() {
    let cfg = config();
    let tower =
        CudaTextTower::new(TextTowerDims::from_config(&cfg, BATCH, TEXT_LEN).unwrap()).unwrap();
    let mut arena = Arena::host(tower.layout().clone(), Emu::default());
    let toks = vec![1u32; BATCH * TEXT_LEN];
    assert!(tower.set_batch(&mut arena, &toks, &[11, 0]).is_err());
    assert!(tower.set_batch(&mut arena, &toks, &[12, 3]).is_err());
    assert!(tower.set_batch(&mut arena, &toks[1..], &[11, 3]).is_err());
    let mut wrong = toks.clone();
    wrong[5] = cfg.text.vocab_size as u32;
    assert!(tower.set_batch(&mut arena, &wrong, &[11, 3]).is_err());
    // Rows longer than the arena's longest length, or empty, are refused; shorter ones run.
    let long = vec![1u32; BATCH * (TEXT_LEN + 1)];
    assert!(tower.set_batch(&mut arena, &long, &[11, 3]).is_err());
    assert!(tower.set_batch(&mut arena, &[], &[]).is_err());
    assert!(tower.set_batch(&mut arena, &[], &[1, 1]).is_err());
    tower
        .set_batch(&mut arena, &toks[..BATCH * 4], &[4, 3])
        .unwrap();
    assert_eq!(tower.batch_rows(), tower.packed_rows(7));
    // Ids past a row's length are never read, so they need not be words.
    let mut past = toks[..BATCH * 4].to_vec();
    past[3] = u32::MAX;
    tower.set_batch(&mut arena, &past, &[3, 3]).unwrap();
    assert!(tower
        .set_batch(&mut arena, &toks[..BATCH * 4], &[5, 3])
        .is_err());
    assert!(
        TextTowerDims::from_config(&cfg, BATCH, cfg.text.context_length + 1)
            .and_then(CudaTextTower::new)
            .is_err()
    );
    let mut causal = cfg.clone();
    causal.text.causal = true;
    assert!(TextTowerDims::from_config(&causal, BATCH, TEXT_LEN).is_err());
}

// ---- variable text length ----

/// The longest length the variable-length tower is built for (its arena's size).
const MAX_LEN: usize = 24;

/// One tower of longest length `MAX_LEN` (context 32) and a random model for it.
struct VarCase {
    model: ClipModel,
    tower: CudaTextTower,
    groups: Groups,
    names: Vec<String>,
    g: rand_chacha::ChaCha8Rng,
    seed: u64,
}

fn var_case() -> VarCase {
    let mut cfg = config();
    cfg.text.context_length = 32;
    let tower =
        CudaTextTower::new(TextTowerDims::from_config(&cfg, BATCH, MAX_LEN).unwrap()).unwrap();
    let names: Vec<String> = tower.param_map().into_iter().map(|p| p.name).collect();
    let mut model = ClipModel::new(&cfg).unwrap();
    let seed = fresh_seed();
    let mut g = rng(seed);
    randomise(&mut model, &names, &mut g);
    let groups = groups(&tower);
    let names = groups.iter().map(|g| g.1.clone()).collect();
    VarCase {
        model,
        tower,
        groups,
        names,
        g,
        seed,
    }
}

/// Token ids `(BATCH, l)`: random words within each row's length, `[PAD]` after it.
fn var_tokens(g: &mut impl Rng, vocab: usize, l: usize, lengths: &[usize]) -> Vec<u32> {
    (0..BATCH * l)
        .map(|i| {
            if i % l < lengths[i / l] {
                g.gen_range(1..vocab as u32)
            } else {
                TEXT_FILLER_ID
            }
        })
        .collect()
}

/// `tokens` `(BATCH, l)` padded with `[PAD]` to `(BATCH, to)`.
fn pad_rows(tokens: &[u32], l: usize, to: usize) -> Vec<u32> {
    let mut out = vec![TEXT_FILLER_ID; BATCH * to];
    for (dst, src) in out.chunks_exact_mut(to).zip(tokens.chunks_exact(l)) {
        dst[..l].copy_from_slice(src);
    }
    out
}

/// One tower and one arena (sized for `MAX_LEN`) run batches of length 5, 24 and 13 in turn
/// (the plans switch with each batch), each against the tape run on exactly that length.
#[test]
fn text_tower_runs_batches_of_different_lengths_against_the_tape() {
    let mut c = var_case();
    let vocab = c.model.config.text.vocab_size;
    let embed = c.model.config.embed_dim;
    let mut arena = Arena::host(c.tower.layout().clone(), Emu::default());
    for (l, lengths) in [(5, [5, 2]), (MAX_LEN, [MAX_LEN, 17]), (13, [9, 13])] {
        let tokens = var_tokens(&mut c.g, vocab, l, &lengths);
        let dfeat = on_grid(&mut c.g, BATCH * embed, -1.0, 1.0);
        let want = tape_text(&mut c.model, &c.tower, &c.groups, &tokens, &lengths, &dfeat);
        text_load(&c.tower, &c.model, &mut arena, &tokens, &lengths, &dfeat);
        let total = lengths.iter().sum();
        assert_eq!(c.tower.batch_rows(), c.tower.packed_rows(total));
        let got = tower_run(&c.tower, &c.groups, &mut arena);
        let rows = errors(&c.names, &got, &want);
        report(
            &format!("text tower L={l} of at most {MAX_LEN}, lengths {lengths:?}"),
            c.seed,
            &rows,
        );
        for (name, e) in &rows {
            assert!(
                *e <= TOL,
                "seed {}: L={l}: `{name}` rel err {e:.3e} > {TOL:e}",
                c.seed
            );
        }
    }
}

/// The tower packs the valid tokens, so how far a batch of short captions (longest 5) is
/// padded makes no difference at all: padded to 5, to 16 or to the longest length, it runs on
/// the same rows with the same result, bit for bit, and matches the tape on 5 tokens.
/// Treating the padding as words (every length set to the padded length) must change the
/// features: the lengths are what leave the padding out.
#[test]
fn the_padded_length_of_a_batch_changes_nothing() {
    let mut c = var_case();
    let vocab = c.model.config.text.vocab_size;
    let embed = c.model.config.embed_dim;
    let lengths = [5, 3];
    let l = 5;
    let tokens = var_tokens(&mut c.g, vocab, l, &lengths);
    let dfeat = on_grid(&mut c.g, BATCH * embed, -1.0, 1.0);
    let want = tape_text(&mut c.model, &c.tower, &c.groups, &tokens, &lengths, &dfeat);
    let mut arena = Arena::host(c.tower.layout().clone(), Emu::default());

    let mut runs = Vec::new();
    for to in [l, 16, MAX_LEN] {
        let padded = pad_rows(&tokens, l, to);
        text_load(&c.tower, &c.model, &mut arena, &padded, &lengths, &dfeat);
        assert_eq!(c.tower.batch_rows(), c.tower.packed_rows(8));
        let got = tower_run(&c.tower, &c.groups, &mut arena);
        let rows = errors(&c.names, &got, &want);
        report(
            &format!("text tower, lengths {lengths:?} padded to {to}, against the tape"),
            c.seed,
            &rows,
        );
        for (name, e) in &rows {
            assert!(
                *e <= TOL,
                "seed {}: padded to {to}: `{name}` rel err {e:.3e} > {TOL:e}",
                c.seed
            );
        }
        runs.push(got);
    }
    for (to, run) in [16, MAX_LEN].iter().zip(&runs[1..]) {
        assert!(
            run.features == runs[0].features && run.grads == runs[0].grads,
            "seed {}: padding to {to} changed the result",
            c.seed
        );
    }

    let padded = pad_rows(&tokens, l, MAX_LEN);
    text_load(
        &c.tower,
        &c.model,
        &mut arena,
        &padded,
        &[MAX_LEN; BATCH],
        &dfeat,
    );
    let unmasked = tower_run(&c.tower, &c.groups, &mut arena);
    let feat = rel_err(&unmasked.features, &runs[2].features);
    eprintln!("text tower, padding unmasked: features rel err {feat:.3e}");
    assert!(
        feat > 5.0 * TOL,
        "seed {}: unmasked padding left the features within {feat:.3e}",
        c.seed
    );
}

/// The BERT tower on a GPU, with the arena as one device allocation.
#[test]
fn gpu_text_tower_matches_tape_when_present() {
    let gpu = match Device::select(DeviceRequest::Auto).unwrap() {
        Device::Cuda(g) => g,
        Device::Cpu => {
            eprintln!("no CUDA driver or device: the GPU text tower test is skipped");
            return;
        }
    };
    let c = text_case(config());
    let mut arena = Arena::device(c.tower.layout().clone(), Arc::clone(&gpu)).unwrap();
    text_prepare(&c, &mut arena);
    let got = text_run(&c, &mut arena);
    let rows = errors(&c.names, &got, &c.want);
    report("text tower post-norm/CLS, GPU", c.seed, &rows);
    assert_within_tol(c.seed, &rows);
}

// ---- activation checkpointing and shared regions ----

/// Every fp32 gradient region of an arena, by name.
fn grads_by_name(arena: &mut Arena) -> Vec<(String, Vec<f32>)> {
    let lay = arena.layout().clone();
    lay.regions()
        .iter()
        .filter(|r| r.section == Section::Grads)
        .map(|r| {
            (
                r.name.clone(),
                arena.read_f32(lay.id(&r.name).unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Features and gradients of a tower run, compared bit for bit.
fn assert_same(
    what: &str,
    seed: u64,
    a: &(Vec<f32>, Vec<(String, Vec<f32>)>),
    b: &(Vec<f32>, Vec<(String, Vec<f32>)>),
) {
    assert!(a.0.iter().all(|x| x.is_finite()), "{what}: NaN features");
    assert_eq!(a.0, b.0, "seed {seed}: {what}: features differ");
    assert_eq!(a.1.len(), b.1.len());
    for ((na, ga), (nb, gb)) in a.1.iter().zip(&b.1) {
        assert_eq!(na, nb);
        assert!(ga.iter().all(|x| x.is_finite()), "{what}: NaN in {na}");
        assert!(ga == gb, "seed {seed}: {what}: gradient {na} differs");
    }
}

/// Three blocks per tower, so that the stack's two alternating output-gradient buffers are
/// each used twice. With the blocks recomputing their forward in the backward (one set of
/// activations shared by the stack), both towers give bit-for-bit the features and gradients
/// of the towers that keep every block's activations, which match the tape; and their
/// activation sections are smaller. Everything is NaN-poisoned before each run, so a block
/// whose backward read another block's activations (a missing recompute) would show.
#[test]
fn recomputing_blocks_match_stored_activations_bit_for_bit() {
    let mut cfg = config();
    cfg.vision.layers = 3;
    cfg.text.layers = 3;
    let seed = fresh_seed();
    let mut g = rng(seed);

    // Image tower.
    let mut kept_dims = ImageTowerDims::from_config(&cfg, BATCH).unwrap();
    let mut model = ClipModel::new(&cfg).unwrap();
    let kept = CudaImageTower::new(kept_dims).unwrap();
    let names = kept.param_names();
    randomise(&mut model, &names, &mut g);
    let v = &cfg.vision;
    let img = on_grid(
        &mut g,
        BATCH * v.channels * v.image_size * v.image_size,
        -1.5,
        1.5,
    );
    let dfeat = on_grid(&mut g, BATCH * cfg.embed_dim, -1.0, 1.0);
    let want = cpu_tower(&mut model, &names, &img, &dfeat);
    kept_dims.block.recompute = true;
    let recomputed = CudaImageTower::new(kept_dims).unwrap();
    let mut runs = Vec::new();
    for tower in [&kept, &recomputed] {
        let mut arena = Arena::host(tower.layout().clone(), Emu::default());
        prepare(tower, &mut arena, &model, &img, &dfeat);
        let got = cuda_run(tower, &mut arena);
        let rows = errors(&names, &got, &want);
        let worst = report("image tower, 3 blocks", seed, &rows);
        assert!(worst <= TOL, "seed {seed}: image tower rel err {worst:.3e}");
        let feats = arena.read_f32(tower.features()).unwrap();
        runs.push((feats, grads_by_name(&mut arena)));
    }
    assert_same("image tower recompute", seed, &runs[1], &runs[0]);
    let acts = |t: &CudaImageTower| t.layout().section_bytes(Section::Acts);
    eprintln!(
        "image tower activations: {} bytes kept, {} recomputed",
        acts(&kept),
        acts(&recomputed)
    );
    assert!(acts(&recomputed) * 2 < acts(&kept));

    // Text tower (post-norm).
    let mut dims = TextTowerDims::from_config(&cfg, BATCH, TEXT_LEN).unwrap();
    let kept = CudaTextTower::new(dims).unwrap();
    let names: Vec<String> = kept.param_map().into_iter().map(|p| p.name).collect();
    randomise(&mut model, &names, &mut g);
    let tokens: Vec<u32> = (0..BATCH * TEXT_LEN)
        .map(|_| g.gen_range(0..cfg.text.vocab_size as u32))
        .collect();
    let dfeat = on_grid(&mut g, BATCH * cfg.embed_dim, -1.0, 1.0);
    dims.block.recompute = true;
    let recomputed = CudaTextTower::new(dims).unwrap();
    let mut runs = Vec::new();
    for tower in [&kept, &recomputed] {
        let gr = groups(tower);
        let want = tape_text(&mut model, tower, &gr, &tokens, &TEXT_LENGTHS, &dfeat);
        let mut arena = Arena::host(tower.layout().clone(), Emu::default());
        text_load(tower, &model, &mut arena, &tokens, &TEXT_LENGTHS, &dfeat);
        let got = tower_run(tower, &gr, &mut arena);
        let names: Vec<String> = gr.iter().map(|g| g.1.clone()).collect();
        let worst = report("text tower, 3 blocks", seed, &errors(&names, &got, &want));
        assert!(worst <= TOL, "seed {seed}: text tower rel err {worst:.3e}");
        let feats = arena.read_f32(tower.features()).unwrap();
        runs.push((feats, grads_by_name(&mut arena)));
    }
    assert_same("text tower recompute", seed, &runs[1], &runs[0]);
    let acts = |t: &CudaTextTower| t.layout().section_bytes(Section::Acts);
    assert!(acts(&recomputed) * 2 < acts(&kept));
}
