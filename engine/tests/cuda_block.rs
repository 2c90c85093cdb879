//! The CUDA block (`mmkd_engine::cuda`) against the engine's own CPU block on the tape: output,
//! input gradient and every parameter gradient, run through the emulation of the CUDA sources
//! (and on a GPU when one is present). Random weights and inputs lie on the bf16 grid, so the
//! comparison measures the bf16 activations of the kernels, not the rounding of the inputs.

use half::bf16;
use mmkd_engine::cuda::arena::ALIGN;
use mmkd_engine::cuda::{
    packed_rows, param_specs, Arena, BatchRows, BlockDims, CudaBlock, Dtype, Layout, PackedSeq,
    Section,
};
use mmkd_engine::{Activation, NormPlacement, ParamStore, Tape, TransformerBlock, WLayout};
use mmkd_kernels::gemm::GemmPath;
use mmkd_kernels::testing::{fresh_seed, rel_err, rng};
use mmkd_kernels::{Device, DeviceRequest, Emu, Schedule};
use rand::Rng;
use std::sync::Arc;

/// Relative error bound of bf16 activations against the f32 reference.
const TOL: f64 = 2e-2;
const PREFIX: &str = "blk";

fn dims(norm: NormPlacement, act: Activation, len: usize) -> BlockDims {
    BlockDims {
        width: 128,
        heads: 2,
        hidden: 512,
        act,
        norm,
        eps: 1e-5,
        batch: 2,
        len,
        recompute: false,
        gemm: GemmPath::MmaSync,
    }
}

/// `n` values uniform in [lo, hi), rounded to bf16 and kept as f32.
fn on_grid(g: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(g.gen_range(lo..hi)).to_f32())
        .collect()
}

/// Overwrites every block parameter in `ps` with random bf16-grid values: gains near 1,
/// biases small, weights about 1/√fan_in.
fn randomise(ps: &mut ParamStore, d: &BlockDims, g: &mut impl Rng) {
    for (name, shape) in param_specs(d) {
        let id = ps.require(&format!("{PREFIX}.{name}")).unwrap();
        let n: usize = shape.iter().product();
        let v = if name.starts_with("ln_") && name.ends_with("weight") {
            on_grid(g, n, 0.6, 1.4)
        } else if shape.len() == 1 {
            on_grid(g, n, -0.2, 0.2)
        } else {
            let b = 1.7 / (shape[1] as f32).sqrt();
            on_grid(g, n, -b, b)
        };
        ps.value_mut(id).copy_from_slice(&v);
    }
}

/// A store holding the block's parameters under [`PREFIX`], random.
fn random_store(d: &BlockDims, g: &mut impl Rng) -> ParamStore {
    let mut ps = ParamStore::new();
    for (name, shape) in param_specs(d) {
        ps.add(&format!("{PREFIX}.{name}"), &shape, |_| {}).unwrap();
    }
    randomise(&mut ps, d, g);
    ps
}

/// Output, input gradient and parameter gradients (in `param_specs` order).
struct Run {
    y: Vec<f64>,
    dx: Vec<f64>,
    grads: Vec<Vec<f64>>,
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The engine's block on the tape, composed from the same tape ops as `model.rs`'s block
/// (which has no key-padding switch on its public type).
fn cpu_block(ps: &mut ParamStore, d: &BlockDims, lengths: &[usize], x: &[f32], dy: &[f32]) -> Run {
    let p = |name: &str| ps.view(ps.require(&format!("{PREFIX}.{name}")).unwrap());
    let (w, f) = (d.width, d.hidden);
    let (ln1g, ln1b, ln2g, ln2b) = (
        p("ln_1.weight"),
        p("ln_1.bias"),
        p("ln_2.weight"),
        p("ln_2.bias"),
    );
    let (wqkv, bqkv, wo, bo) = (
        p("attn.in_proj_weight"),
        p("attn.in_proj_bias"),
        p("attn.out_proj.weight"),
        p("attn.out_proj.bias"),
    );
    let (w1, b1, w2, b2) = (
        p("mlp.c_fc.weight"),
        p("mlp.c_fc.bias"),
        p("mlp.c_proj.weight"),
        p("mlp.c_proj.bias"),
    );
    let eps = f64::from(d.eps);
    let mut t = Tape::new();
    let xv = t.input(x.to_vec(), &[d.batch, d.len, w]).unwrap();
    let store: &ParamStore = ps;
    let attn = |t: &mut Tape, h| {
        let qkv = t
            .linear(store, h, wqkv, Some(bqkv), WLayout::OutIn, 3 * w)
            .unwrap();
        let a = t.attention(qkv, d.heads, Some(lengths), false).unwrap();
        t.linear(store, a, wo, Some(bo), WLayout::OutIn, w).unwrap()
    };
    let mlp = |t: &mut Tape, h| {
        let u = t.linear(store, h, w1, Some(b1), WLayout::OutIn, f).unwrap();
        let u = match d.act {
            Activation::QuickGelu => t.quick_gelu(u).unwrap(),
            Activation::Gelu => t.gelu(u).unwrap(),
        };
        t.linear(store, u, w2, Some(b2), WLayout::OutIn, w).unwrap()
    };
    let yv = match d.norm {
        NormPlacement::Pre => {
            let h = t.layer_norm(store, xv, ln1g, ln1b, eps).unwrap();
            let a = attn(&mut t, h);
            let x1 = t.add(xv, a).unwrap();
            let h = t.layer_norm(store, x1, ln2g, ln2b, eps).unwrap();
            let m = mlp(&mut t, h);
            t.add(x1, m).unwrap()
        }
        NormPlacement::Post => {
            let a = attn(&mut t, xv);
            let s = t.add(xv, a).unwrap();
            let h = t.layer_norm(store, s, ln1g, ln1b, eps).unwrap();
            let m = mlp(&mut t, h);
            let s = t.add(h, m).unwrap();
            t.layer_norm(store, s, ln2g, ln2b, eps).unwrap()
        }
    };
    let y = widen(t.value(yv));
    ps.zero_grad();
    let dx = t.backward_collect(ps, &[(yv, dy)], &[xv]).unwrap();
    Run {
        y,
        dx: widen(&dx[0]),
        grads: grads_of(ps, d),
    }
}

fn grads_of(ps: &ParamStore, d: &BlockDims) -> Vec<Vec<f64>> {
    param_specs(d)
        .iter()
        .map(|(name, _)| widen(ps.grad_of(ps.require(&format!("{PREFIX}.{name}")).unwrap())))
        .collect()
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// The CUDA block on `arena`: masters from `ps`, every output, gradient, activation and
/// scratch region poisoned with NaN first.
fn cuda_block(
    block: &CudaBlock,
    arena: &mut Arena,
    ps: &ParamStore,
    lengths: &[usize],
    x: &[f32],
    dy: &[f32],
) -> Run {
    let len = block.dims().len;
    cuda_block_at(block, arena, ps, len, lengths, x, dy)
}

/// [`cuda_block`] on a batch padded to `len` tokens (at most the block's longest): `x` and
/// `dy` hold B·`len` rows, the rest of their regions stays NaN, and `y`, `dx` are read back
/// from the first B·`len` rows.
fn cuda_block_at(
    block: &CudaBlock,
    arena: &mut Arena,
    ps: &ParamStore,
    len: usize,
    lengths: &[usize],
    x: &[f32],
    dy: &[f32],
) -> Run {
    let d = *block.dims();
    load_and_poison(block, arena, ps);
    if len == d.len {
        block.set_lengths(arena, lengths).unwrap();
    } else {
        block.set_padded_lengths(arena, len, lengths).unwrap();
    }
    assert_eq!(block.padded_len(), Some(len));
    assert_eq!(
        (x.len(), dy.len()),
        (d.batch * len * d.width, d.batch * len * d.width)
    );
    run_rows(block, arena, x, dy)
}

/// Writes the masters from `ps` and poisons every output, gradient, activation and scratch
/// region with NaN.
fn load_and_poison(block: &CudaBlock, arena: &mut Arena, ps: &ParamStore) {
    for (name, _) in param_specs(block.dims()) {
        let id = ps.require(&format!("{PREFIX}.{name}")).unwrap();
        arena
            .write_f32(block.param(name).unwrap(), ps.value(id))
            .unwrap();
    }
    let layout = arena.layout().clone();
    for r in layout.regions() {
        let float = r.dtype != Dtype::I32;
        if float && matches!(r.section, Section::Grads | Section::Acts | Section::Scratch) {
            arena.poison(layout.id(&r.name).unwrap()).unwrap();
        }
    }
}

/// Forward and backward of the selected batch on the rows `x` and `dy` hold (the rest of the
/// input and output gradient NaN); the output and input gradient of those rows and the
/// parameter gradients.
fn run_rows(block: &CudaBlock, arena: &mut Arena, x: &[f32], dy: &[f32]) -> Run {
    let d = *block.dims();
    let n = x.len();
    let nan_tail = |v: &[f32]| {
        let mut v = bf(v);
        v.resize(d.tokens() * d.width, bf16::NAN);
        v
    };
    arena.write_bf16(block.input(), &nan_tail(x)).unwrap();
    arena
        .write_bf16(block.output_grad(), &nan_tail(dy))
        .unwrap();
    block.forward(arena).unwrap();
    block.backward(arena).unwrap();
    let f = |v: Vec<bf16>| {
        v[..n]
            .iter()
            .map(|x| f64::from(x.to_f32()))
            .collect::<Vec<_>>()
    };
    let y = f(arena.read_bf16(block.output()).unwrap());
    let dx = f(arena.read_bf16(block.input_grad()).unwrap());
    let grads = param_specs(&d)
        .iter()
        .map(|(name, _)| widen(&arena.read_f32(block.grad(name).unwrap()).unwrap()))
        .collect();
    Run { y, dx, grads }
}

/// Every error of `got` against `want`, printed; the largest returned.
fn compare(what: &str, d: &BlockDims, got: &Run, want: &Run, seed: u64) -> f64 {
    let mut rows = vec![
        ("y", rel_err(&got.y, &want.y)),
        ("dx", rel_err(&got.dx, &want.dx)),
    ];
    for ((name, _), (g, w)) in param_specs(d).iter().zip(got.grads.iter().zip(&want.grads)) {
        rows.push((name, rel_err(g, w)));
    }
    let worst = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    eprintln!("{what} (seed {seed}): max rel err {worst:.3e}");
    for (name, e) in &rows {
        eprintln!("  {name:<24} {e:.3e}");
    }
    for (name, e) in &rows {
        assert!(
            *e <= TOL,
            "{what} seed {seed}: `{name}` rel err {e:.3e} > {TOL:e}"
        );
    }
    worst
}

fn check_against_tape(norm: NormPlacement, act: Activation, len: usize, lengths: &[usize]) {
    check_path_against_tape(norm, act, len, lengths, GemmPath::MmaSync);
}

fn check_path_against_tape(
    norm: NormPlacement,
    act: Activation,
    len: usize,
    lengths: &[usize],
    gemm: GemmPath,
) {
    let d = BlockDims {
        gemm,
        ..dims(norm, act, len)
    };
    let seed = fresh_seed();
    let mut g = rng(seed);
    let mut ps = random_store(&d, &mut g);
    let n = d.tokens() * d.width;
    let x = on_grid(&mut g, n, -2.0, 2.0);
    let dy = on_grid(&mut g, n, -1.0, 1.0);
    let want = cpu_block(&mut ps, &d, lengths, &x, &dy);
    let block = CudaBlock::new(d).unwrap();
    let mut arena = Arena::host(block.layout().clone(), Emu::default());
    let got = cuda_block(&block, &mut arena, &ps, lengths, &x, &dy);
    compare(
        &format!("{norm:?}/{act:?} L={len} lengths={lengths:?}, {gemm:?}, emulation"),
        &d,
        &got,
        &want,
        seed,
    );
}

/// The open_clip ViT block (pre-norm, QuickGELU), odd length, key padding.
#[test]
fn pre_norm_quick_gelu_block_matches_tape_with_padding() {
    check_against_tape(NormPlacement::Pre, Activation::QuickGelu, 37, &[37, 23]);
}

/// The BERT block (post-norm, erf GELU), odd length, key padding.
#[test]
fn post_norm_gelu_block_matches_tape_with_padding() {
    check_against_tape(NormPlacement::Post, Activation::Gelu, 17, &[9, 17]);
}

/// Both blocks with every product on Hopper's wgmma (the path an sm_90 GPU takes).
#[test]
fn blocks_on_the_wgmma_path_match_tape() {
    check_path_against_tape(
        NormPlacement::Pre,
        Activation::QuickGelu,
        37,
        &[37, 23],
        GemmPath::Wgmma,
    );
    check_path_against_tape(
        NormPlacement::Post,
        Activation::Gelu,
        17,
        &[9, 17],
        GemmPath::Wgmma,
    );
    // The same launches on both paths, every product a wgmma kernel on the Hopper path: four
    // in the forward, eight in the backward (input and weight gradient per linear layer).
    let d = dims(NormPlacement::Pre, Activation::QuickGelu, 9);
    let mma = CudaBlock::new(d).unwrap().kernel_names();
    let wg = CudaBlock::new(BlockDims {
        gemm: GemmPath::Wgmma,
        ..d
    })
    .unwrap()
    .kernel_names();
    let gemms = |v: &[&str], wgmma: bool| {
        v.iter()
            .filter(|k| k.starts_with("gemm_") && k.ends_with("_wgmma") == wgmma)
            .count()
    };
    for (m, w) in [(&mma.0, &wg.0), (&mma.1, &wg.1)] {
        assert_eq!(m.len(), w.len(), "{m:?} {w:?}");
        assert_eq!(gemms(w, false), 0, "{w:?}");
        assert_eq!(gemms(w, true), gemms(m, false), "{m:?} {w:?}");
    }
    assert_eq!((gemms(&wg.0, true), gemms(&wg.1, true)), (4, 8));
}

/// Both blocks on `path` against the tape, and every product of the block on a kernel whose
/// name ends in `suffix` (4 in the forward, 8 in the backward).
fn check_map_path(path: GemmPath, suffix: &str) {
    check_path_against_tape(
        NormPlacement::Pre,
        Activation::QuickGelu,
        37,
        &[37, 23],
        path,
    );
    check_path_against_tape(NormPlacement::Post, Activation::Gelu, 17, &[9, 17], path);
    let d = dims(NormPlacement::Pre, Activation::QuickGelu, 9);
    let names = CudaBlock::new(BlockDims { gemm: path, ..d })
        .unwrap()
        .kernel_names();
    let count = |v: &[&str]| v.iter().filter(|k| k.ends_with(suffix)).count();
    assert_eq!((count(&names.0), count(&names.1)), (4, 8), "{names:?}");
}

/// Both blocks with every product on wgmma fed by the tensor copy engine (`MMKD_GEMM_PATH=tma`
/// on an sm_90 GPU): the same plans with tensor maps in place of the operand pointers.
#[test]
fn blocks_on_the_tma_path_match_tape() {
    check_map_path(GemmPath::WgmmaTma, "_tma");
}

/// Both blocks with every product on the persistent warp-specialised kernels
/// (`MMKD_GEMM_PATH=ws` on an sm_90 GPU): the same plans with tensor maps and the `_ws` kernels.
#[test]
fn blocks_on_the_ws_path_match_tape() {
    check_map_path(GemmPath::WgmmaWs, "_ws");
}

/// With 512 tokens the weight gradients of a narrow block leave most of a 132-multiprocessor
/// GPU idle, so each one is split two ways along the tokens (partial products, then their
/// reduction): the plan says so, and the gradients still match the tape, on the three wgmma
/// paths.
#[test]
fn weight_gradients_split_along_the_tokens_match_tape() {
    for gemm in [GemmPath::Wgmma, GemmPath::WgmmaTma, GemmPath::WgmmaWs] {
        let d = BlockDims {
            width: 64,
            heads: 1,
            hidden: 256,
            gemm,
            ..dims(NormPlacement::Pre, Activation::QuickGelu, 256)
        };
        let block = CudaBlock::new(d).unwrap();
        let (fwd, bwd) = block.kernel_names();
        let reduces = |v: &[&str]| v.iter().filter(|k| **k == "gemm_splitk_reduce").count();
        assert_eq!((reduces(&fwd), reduces(&bwd)), (0, 4), "{bwd:?}");
        let seed = fresh_seed();
        let mut g = rng(seed);
        let mut ps = random_store(&d, &mut g);
        let n = d.tokens() * d.width;
        let x = on_grid(&mut g, n, -2.0, 2.0);
        let dy = on_grid(&mut g, n, -1.0, 1.0);
        let lengths = [256, 201];
        let want = cpu_block(&mut ps, &d, &lengths, &x, &dy);
        let mut arena = Arena::host(block.layout().clone(), Emu::default());
        let got = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);
        compare(
            &format!("split K, {gemm:?}, emulation"),
            &d,
            &got,
            &want,
            seed,
        );
        // The same block on a batch padded to 160 (320 tokens: chunks of 160 are below the
        // shortest a split hands out, so nothing splits) and back: each length has its plan.
        let short = BlockDims { len: 160, ..d };
        assert!(
            !block
                .kernel_names_at(160)
                .unwrap()
                .1
                .contains(&"gemm_splitk_reduce"),
            "{gemm:?}"
        );
        let n = short.tokens() * short.width;
        let x = on_grid(&mut g, n, -2.0, 2.0);
        let dy = on_grid(&mut g, n, -1.0, 1.0);
        let lengths = [160, 97];
        let want = cpu_block(&mut ps, &short, &lengths, &x, &dy);
        let got = cuda_block_at(&block, &mut arena, &ps, 160, &lengths, &x, &dy);
        compare(
            &format!("split K, {gemm:?}, L=160 of 256, emulation"),
            &short,
            &got,
            &want,
            seed,
        );
    }
}

/// One block sized for 37 tokens runs batches padded to 20 and then to 9 (the first B·L rows
/// of its regions, the rest NaN), each against the tape on exactly that length, for both norm
/// placements.
#[test]
fn shorter_padded_lengths_match_tape() {
    for (norm, act) in [
        (NormPlacement::Pre, Activation::QuickGelu),
        (NormPlacement::Post, Activation::Gelu),
    ] {
        let longest = dims(norm, act, 37);
        let seed = fresh_seed();
        let mut g = rng(seed);
        let mut ps = random_store(&longest, &mut g);
        let block = CudaBlock::new(longest).unwrap();
        let mut arena = Arena::host(block.layout().clone(), Emu::default());
        for (len, lengths) in [(20, [20, 13]), (9, [4, 9])] {
            let d = BlockDims { len, ..longest };
            let n = d.tokens() * d.width;
            let x = on_grid(&mut g, n, -2.0, 2.0);
            let dy = on_grid(&mut g, n, -1.0, 1.0);
            let want = cpu_block(&mut ps, &d, &lengths, &x, &dy);
            let got = cuda_block_at(&block, &mut arena, &ps, len, &lengths, &x, &dy);
            compare(
                &format!("{norm:?}/{act:?} L={len} of 37, lengths={lengths:?}, emulation"),
                &d,
                &got,
                &want,
                seed,
            );
        }
    }
}

/// The block on a packed batch ([`CudaBlock::set_packed`]): `x` and `dy` hold its m rows.
/// Returns the output and input gradient rows and the parameter gradients.
fn cuda_block_packed(
    block: &CudaBlock,
    arena: &mut Arena,
    ps: &ParamStore,
    seqs: &[PackedSeq],
    x: &[f32],
    dy: &[f32],
) -> Run {
    load_and_poison(block, arena, ps);
    let m = x.len() / block.dims().width;
    block.set_packed(arena, m, seqs).unwrap();
    assert_eq!(block.batch_rows(), BatchRows::Packed(m));
    assert_eq!(block.padded_len(), None);
    run_rows(block, arena, x, dy)
}

/// A packed batch (the valid tokens back to back, two filler rows after the last sequence)
/// gives each valid token the output and input gradient the padded batch gives it, bit for
/// bit (every op is row-wise but the attention, which sees the same keys), and the same
/// parameter gradients up to the order of their sums, when the padding's output gradient is
/// zero; the filler rows stay finite. Both norm placements, on both product paths.
#[test]
fn packed_batch_matches_the_padded_batch() {
    for (norm, act, gemm) in [
        (NormPlacement::Post, Activation::Gelu, GemmPath::MmaSync),
        (NormPlacement::Pre, Activation::QuickGelu, GemmPath::Wgmma),
    ] {
        let d = BlockDims {
            batch: 3,
            gemm,
            ..dims(norm, act, 40)
        };
        let lengths = [40, 17, 5];
        let seed = fresh_seed();
        let mut g = rng(seed);
        let ps = random_store(&d, &mut g);
        let w = d.width;
        let n = d.tokens() * w;
        let x = on_grid(&mut g, n, -2.0, 2.0);
        let mut dy = on_grid(&mut g, n, -1.0, 1.0);
        for (b, &len) in lengths.iter().enumerate() {
            dy[(b * d.len + len) * w..(b + 1) * d.len * w].fill(0.0);
        }
        let block = CudaBlock::new(d).unwrap();
        let mut arena = Arena::host(block.layout().clone(), Emu::default());
        let padded = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);

        // 62 valid rows, rounded up to 64: the last sequence takes the 2 filler rows.
        let m = 64;
        let (mut px, mut pdy, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        for (b, &len) in lengths.iter().enumerate() {
            seqs.push(PackedSeq {
                row0: px.len() / w,
                rows: len,
                keys: len,
            });
            px.extend_from_slice(&x[b * d.len * w..(b * d.len + len) * w]);
            pdy.extend_from_slice(&dy[b * d.len * w..(b * d.len + len) * w]);
        }
        let filler = m - px.len() / w;
        seqs[2].rows += filler;
        px.extend(on_grid(&mut g, filler * w, -2.0, 2.0));
        pdy.resize(m * w, 0.0);
        let packed = cuda_block_packed(&block, &mut arena, &ps, &seqs, &px, &pdy);

        let ctx = format!("{norm:?}/{act:?} {gemm:?}, seed {seed}");
        let valid =
            |r: &[f64], b: usize, len: usize| r[b * d.len * w..(b * d.len + len) * w].to_vec();
        for (b, (s, &len)) in seqs.iter().zip(&lengths).enumerate() {
            let rows = s.row0 * w..(s.row0 + len) * w;
            assert!(
                packed.y[rows.clone()] == valid(&padded.y, b, len)[..],
                "{ctx}: y of sequence {b}"
            );
            assert!(
                packed.dx[rows] == valid(&padded.dx, b, len)[..],
                "{ctx}: dx of sequence {b}"
            );
        }
        assert!(
            packed.y.iter().chain(&packed.dx).all(|v| v.is_finite()),
            "{ctx}: a filler row is not finite"
        );
        for ((name, _), (gp, gd)) in param_specs(&d)
            .iter()
            .zip(packed.grads.iter().zip(&padded.grads))
        {
            let e = rel_err(gp, gd);
            assert!(e <= 1e-5, "{ctx}: gradient of `{name}` differs by {e:.3e}");
        }
        // Rejected tables: a gap, an overlap, rows past the cap or the batch, more keys than
        // rows, a wrong count, and a row count that is neither a tile multiple nor B·L.
        let at = |row0, rows, keys| PackedSeq { row0, rows, keys };
        let ok = [at(0, 40, 40), at(40, 17, 17), at(57, 7, 5)];
        block.set_packed(&mut arena, 64, &ok).unwrap();
        for (bad, m) in [
            (vec![at(0, 40, 40), at(41, 17, 17), at(58, 6, 5)], 64),
            (vec![at(0, 40, 40), at(39, 18, 17), at(57, 7, 5)], 64),
            (vec![at(0, 40, 40), at(40, 17, 18), at(57, 7, 5)], 64),
            (vec![at(0, 40, 40), at(40, 17, 17), at(57, 15, 5)], 64),
            (vec![at(0, 40, 40), at(40, 17, 17)], 64),
            (vec![at(0, 40, 40), at(40, 17, 17), at(57, 13, 5)], 70),
            (vec![at(0, 40, 40), at(40, 40, 40), at(80, 48, 40)], 128),
        ] {
            assert!(
                block.set_packed(&mut arena, m, &bad).is_err(),
                "{ctx}: accepted {bad:?} in {m} rows"
            );
        }
        // All B·L = 120 rows is a batch too (not a multiple of 64), with up to 63 filler rows.
        let full = [at(0, 40, 40), at(40, 40, 40), at(80, 40, 40)];
        block.set_packed(&mut arena, 120, &full).unwrap();
        let long = [at(0, 40, 40), at(40, 40, 40), at(80, 103, 40)];
        assert!(block.set_packed(&mut arena, 183, &long).is_err());
    }
}

/// Packed row counts: the tokens rounded up to a 64-row tile, capped at the block's rows.
#[test]
fn packed_row_counts_round_up_to_the_tile_within_the_cap() {
    for (tokens, cap, want) in [
        (1, 120, 64),
        (64, 120, 64),
        (65, 120, 120),
        (62, 120, 64),
        (130, 1000, 192),
        (7, 48, 48),
    ] {
        assert_eq!(packed_rows(tokens, cap), want, "{tokens} tokens, cap {cap}");
    }
}

/// The comparison can fail: the same block run without the key-padding mask the reference
/// applies must be far off (padding changes every query of the padded sequence).
#[test]
fn ignoring_the_padding_fails_the_comparison() {
    let d = dims(NormPlacement::Pre, Activation::QuickGelu, 17);
    let seed = fresh_seed();
    let mut g = rng(seed);
    let mut ps = random_store(&d, &mut g);
    let n = d.tokens() * d.width;
    let x = on_grid(&mut g, n, -2.0, 2.0);
    let dy = on_grid(&mut g, n, -1.0, 1.0);
    let want = cpu_block(&mut ps, &d, &[17, 5], &x, &dy);
    let block = CudaBlock::new(d).unwrap();
    let mut arena = Arena::host(block.layout().clone(), Emu::default());
    let got = cuda_block(&block, &mut arena, &ps, &[17, 17], &x, &dy);
    let (ey, edx) = (rel_err(&got.y, &want.y), rel_err(&got.dx, &want.dx));
    assert!(
        ey > 5.0 * TOL && edx > 5.0 * TOL,
        "seed {seed}: unmasked run passed (y {ey:.3e}, dx {edx:.3e})"
    );
}

/// A second step on the same arena (gradients overwritten, not accumulated) and a run with
/// the emulation's threads resumed in reverse order give bit-identical results.
#[test]
fn reruns_are_bit_identical() {
    let d = dims(NormPlacement::Post, Activation::QuickGelu, 17);
    let seed = fresh_seed();
    let mut g = rng(seed);
    let ps = random_store(&d, &mut g);
    let n = d.tokens() * d.width;
    let x = on_grid(&mut g, n, -2.0, 2.0);
    let dy = on_grid(&mut g, n, -1.0, 1.0);
    let lengths = [11, 17];
    let block = CudaBlock::new(d).unwrap();
    let mut arena = Arena::host(block.layout().clone(), Emu::default());
    let first = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);
    let again = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);
    let rev = Emu::default().with_schedule(Schedule::Reverse);
    let mut arena = Arena::host(block.layout().clone(), rev);
    let reversed = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);
    for (what, r) in [("second step", &again), ("reverse schedule", &reversed)] {
        assert!(r.y == first.y && r.dx == first.dx, "{what}, seed {seed}");
        assert!(
            r.grads == first.grads,
            "{what}: gradients differ, seed {seed}"
        );
    }
}

/// Against `model.rs`'s `TransformerBlock` itself (open_clip init and names, no padding).
#[test]
fn matches_the_engine_transformer_block() {
    let d = dims(NormPlacement::Pre, Activation::QuickGelu, 17);
    let seed = fresh_seed();
    let mut g = rng(seed);
    let mut ps = ParamStore::new();
    let tb = TransformerBlock::open_clip(
        &mut ps,
        PREFIX,
        d.width,
        d.heads,
        d.hidden as f64 / d.width as f64,
        Activation::QuickGelu,
        12,
        seed,
    )
    .unwrap();
    randomise(&mut ps, &d, &mut g);
    let n = d.tokens() * d.width;
    let x = on_grid(&mut g, n, -2.0, 2.0);
    let dy = on_grid(&mut g, n, -1.0, 1.0);
    let mut t = Tape::new();
    let xv = t.input(x.clone(), &[d.batch, d.len, d.width]).unwrap();
    let yv = tb.forward(&mut t, &ps, xv).unwrap();
    let y = widen(t.value(yv));
    ps.zero_grad();
    let dx = t.backward_collect(&mut ps, &[(yv, &dy)], &[xv]).unwrap();
    let want = Run {
        y,
        dx: widen(&dx[0]),
        grads: grads_of(&ps, &d),
    };
    let block = CudaBlock::new(d).unwrap();
    let mut arena = Arena::host(block.layout().clone(), Emu::default());
    let full = vec![d.len; d.batch];
    let got = cuda_block(&block, &mut arena, &ps, &full, &x, &dy);
    compare("TransformerBlock, emulation", &d, &got, &want, seed);
}

/// The layout: regions aligned, disjoint, inside the allocation; sections contiguous and
/// disjoint; the fp32 and bf16 weight sections element for element alike.
#[test]
fn arena_layout_is_disjoint_and_aligned() {
    for norm in [NormPlacement::Pre, NormPlacement::Post] {
        let d = BlockDims {
            len: 197,
            batch: 3,
            ..dims(norm, Activation::Gelu, 1)
        };
        let block = CudaBlock::new(d).unwrap();
        let lay = block.layout();
        let regs = lay.regions();
        assert!(regs.len() > 40, "{} regions", regs.len());
        let mut by_offset: Vec<_> = regs.iter().collect();
        by_offset.sort_by_key(|r| r.offset);
        for r in regs {
            assert_eq!(r.offset % ALIGN, 0, "`{}` at {}", r.name, r.offset);
            assert!(r.reserved >= r.len && r.len > 0, "`{}`", r.name);
            assert!(
                r.offset + r.bytes() <= lay.bytes(),
                "`{}` ends outside",
                r.name
            );
        }
        for pair in by_offset.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.offset + a.bytes() <= b.offset,
                "`{}` [{}, {}) overlaps `{}` at {}",
                a.name,
                a.offset,
                a.offset + a.bytes(),
                b.name,
                b.offset
            );
        }
        let sections = [
            Section::Params,
            Section::ParamsBf16,
            Section::Grads,
            Section::Acts,
            Section::Scratch,
            Section::Tables,
        ];
        for s in sections {
            let (start, len) = lay.section_span(s).unwrap();
            for r in regs {
                let inside = r.offset >= start && r.offset + r.bytes() <= start + len;
                let outside = r.offset + r.bytes() <= start || r.offset >= start + len;
                assert!(
                    if r.section == s { inside } else { outside },
                    "`{}` ({:?}) against section {s:?} [{start}, {})",
                    r.name,
                    r.section,
                    start + len
                );
            }
        }
        assert_eq!(
            lay.section_bytes(Section::Params) / 4,
            lay.section_bytes(Section::ParamsBf16) / 2
        );
        // Attention reads the heads where the projection wrote them and the LayerNorms need
        // no zero residual: the only table is the key lengths, one per sequence.
        let tables: Vec<_> = regs
            .iter()
            .filter(|r| r.section == Section::Tables)
            .map(|r| (r.name.as_str(), r.dtype, r.len))
            .collect();
        assert_eq!(
            tables,
            [("table.seqlens", Dtype::I32, 3 * d.batch)],
            "{norm:?}"
        );
        // Each parameter has a master, a bf16 copy and a gradient of its own length.
        for (name, shape) in param_specs(&d) {
            let n: usize = shape.iter().product();
            for prefix in ["param", "bf16", "grad"] {
                let id = lay.id(&format!("{prefix}.{name}")).unwrap();
                assert_eq!(lay.region(id).len, n, "{prefix}.{name}");
            }
        }
    }
}

#[test]
fn layout_and_block_errors_are_reported() {
    let mut lay = Layout::new();
    lay.add("a", Section::Acts, Dtype::F32, 3).unwrap();
    assert!(lay.add("a", Section::Acts, Dtype::F32, 3).is_err());
    assert!(lay.add("z", Section::Acts, Dtype::F32, 0).is_err());
    lay.add("b", Section::Scratch, Dtype::Bf16, 5).unwrap();
    let e = lay.add("c", Section::Acts, Dtype::F32, 1).unwrap_err();
    assert!(format!("{e}").contains("interrupted"), "{e}");

    let bad_width = BlockDims {
        width: 96,
        ..dims(NormPlacement::Pre, Activation::Gelu, 5)
    };
    assert!(CudaBlock::new(bad_width).is_err());
    let d = dims(NormPlacement::Pre, Activation::Gelu, 5);
    let block = CudaBlock::new(d).unwrap();
    let other = CudaBlock::new(BlockDims { len: 7, ..d }).unwrap();
    let mut arena = Arena::host(other.layout().clone(), Emu::default());
    assert!(block.forward(&mut arena).is_err());
    let mut arena = Arena::host(block.layout().clone(), Emu::default());
    assert!(block.set_lengths(&mut arena, &[5]).is_err());
    assert!(block.set_lengths(&mut arena, &[5, 6]).is_err());
    // Padded lengths within 1..=5, the sequence lengths within the padded one.
    assert!(block.set_padded_lengths(&mut arena, 0, &[0, 0]).is_err());
    assert!(block.set_padded_lengths(&mut arena, 6, &[5, 5]).is_err());
    assert!(block.set_padded_lengths(&mut arena, 3, &[4, 1]).is_err());
    block.set_padded_lengths(&mut arena, 3, &[3, 1]).unwrap();
    assert_eq!(block.padded_len(), Some(3));
    assert!(arena.write_f32(block.input(), &[0.0; 4]).is_err());
}

/// The same comparison on a GPU, with the arena as one device allocation.
#[test]
fn gpu_block_matches_tape_when_present() {
    let gpu = match Device::select(DeviceRequest::Auto).unwrap() {
        Device::Cuda(g) => g,
        Device::Cpu => {
            eprintln!("no CUDA driver or device: the GPU block test is skipped");
            return;
        }
    };
    for (norm, act, len, lengths) in [
        (
            NormPlacement::Pre,
            Activation::QuickGelu,
            197,
            vec![197, 150],
        ),
        (NormPlacement::Post, Activation::Gelu, 77, vec![77, 31]),
    ] {
        let d = dims(norm, act, len);
        let seed = fresh_seed();
        let mut g = rng(seed);
        let mut ps = random_store(&d, &mut g);
        let n = d.tokens() * d.width;
        let x = on_grid(&mut g, n, -2.0, 2.0);
        let dy = on_grid(&mut g, n, -1.0, 1.0);
        let want = cpu_block(&mut ps, &d, &lengths, &x, &dy);
        let block = CudaBlock::new(d).unwrap();
        let mut arena = Arena::device(block.layout().clone(), Arc::clone(&gpu)).unwrap();
        let got = cuda_block(&block, &mut arena, &ps, &lengths, &x, &dy);
        compare(
            &format!("{norm:?}/{act:?} L={len}, GPU"),
            &d,
            &got,
            &want,
            seed,
        );
    }
}
