//! Model-level tests: configs, the tape API, checkpointing, weights exchange, the NumPy
//! reference forward and the overfitting run.

use mmkd_engine::{ClipModel, Device, EngineError, ModelConfig, Tape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tiny() -> ModelConfig {
    ModelConfig::from_file(&repo().join("configs/tiny.toml")).expect("tiny.toml")
}

/// A batch of `b` random images and token rows of length `l` with varied valid lengths.
fn batch(cfg: &ModelConfig, b: usize, l: usize, seed: u64) -> (Tensor, Tensor, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v = &cfg.vision;
    let n = b * v.channels * v.image_size * v.image_size;
    let img: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let toks: Vec<u32> = (0..b * l)
        .map(|_| rng.gen_range(0..cfg.text.vocab_size as u32))
        .collect();
    let lengths: Vec<usize> = (0..b).map(|i| 1 + (i * 5 + 3) % l).collect();
    (
        Tensor::from_f32(img, &[b, v.channels, v.image_size, v.image_size]).unwrap(),
        Tensor::from_u32(toks, &[b, l]).unwrap(),
        lengths,
    )
}

fn variant(mut cfg: ModelConfig) -> ModelConfig {
    // Every switch flipped: GELU vision, pre-LN causal text with end-of-text pooling.
    cfg.vision.act = mmkd_engine::Activation::Gelu;
    cfg.text.norm = mmkd_engine::NormPlacement::Pre;
    cfg.text.causal = true;
    cfg.text.pooling = mmkd_engine::Pooling::Eot;
    cfg.text.act = mmkd_engine::Activation::QuickGelu;
    cfg.seed = 7;
    cfg
}

#[test]
fn configs_load_and_bad_configs_name_the_key() {
    let t = tiny();
    assert_eq!(t.num_patches(), 16);
    let big = ModelConfig::from_file(&repo().join("configs/vit-b16-biomedbert.toml")).unwrap();
    assert_eq!(
        (
            big.vision.width,
            big.text.width,
            big.embed_dim,
            big.text_proj_hidden()
        ),
        (768, 768, 512, 640)
    );
    let src = std::fs::read_to_string(repo().join("configs/tiny.toml")).unwrap();
    let cases = [
        (
            src.replace("embed_dim = 32", "embed_dim = 32\nbogus = 1"),
            "bogus",
        ),
        (
            src.replace(
                "heads = 1\nmlp_ratio = 4.0\nact = \"quick_gelu\"",
                "heads = 3\nmlp_ratio = 4.0\nact = \"quick_gelu\"",
            ),
            "vision.heads",
        ),
        (
            src.replace("image_size = 32", "image_size = 36"),
            "vision.image_size",
        ),
        (src.replace("act = \"gelu\"", "act = \"relu\""), "relu"),
        (
            src.replace("vocab_size = 1024", "vocab_size = 0"),
            "text.vocab_size",
        ),
    ];
    for (text, key) in cases {
        let e = ModelConfig::from_toml_str(&text, "case.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(key) && e.contains("case.toml"),
            "error `{e}` should name `{key}`"
        );
    }
    let e = t.check_tokenizer_vocab(30522).unwrap_err().to_string();
    assert!(e.contains("text.vocab_size"), "{e}");
    t.check_tokenizer_vocab(1000).unwrap();
}

#[test]
fn parameter_names_follow_open_clip_and_bert() {
    let m = ClipModel::new(&tiny()).unwrap();
    for name in [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual.transformer.resblocks.0.attn.out_proj.weight",
        "visual.transformer.resblocks.0.ln_1.weight",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.transformer.resblocks.0.mlp.c_proj.weight",
        "visual.ln_post.bias",
        "visual.proj",
        "logit_scale",
        "text.transformer.embeddings.word_embeddings.weight",
        "text.transformer.encoder.layer.1.attention.self.value.bias",
        "text.proj.0.weight",
        "text.proj.2.weight",
    ] {
        assert!(m.params.id(name).is_some(), "missing {name}");
    }
    let info = m.params.info(m.params.id("visual.proj").unwrap());
    assert_eq!(info.shape, vec![64, 32]);
    assert!(info.decays());
    assert!(!m.params.info(m.logit_scale_id()).decays());
    assert!(!m
        .params
        .info(m.params.id("visual.ln_pre.weight").unwrap())
        .decays());
    assert!((m.logit_scale() - (1.0f32 / 0.07).ln()).abs() < 1e-6);
    // Layout is contiguous and complete.
    let total: usize = m.params.infos().iter().map(|i| i.len).sum();
    assert_eq!(total, m.params.numel());
    // Same seed, same weights; different seed, different weights.
    assert_eq!(
        ClipModel::new(&tiny()).unwrap().params.data(),
        m.params.data()
    );
    let mut c2 = tiny();
    c2.seed = 1;
    assert_ne!(ClipModel::new(&c2).unwrap().params.data(), m.params.data());
}

#[test]
fn cuda_device_is_a_clear_error_not_a_panic() {
    let cfg = tiny();
    let m = ClipModel::new(&cfg).unwrap();
    let (img, _, _) = batch(&cfg, 2, 8, 0);
    let mut tape = Tape::on(Device::Cuda(0), true);
    match m.encode_image(&mut tape, &img) {
        Err(EngineError::NoLauncher { op, device }) => {
            assert_eq!(device, "cuda:0");
            assert!(!op.is_empty());
        }
        other => panic!("expected NoLauncher, got {:?}", other.map(|_| ())),
    }
    assert!(img.to_device(Device::Cuda(0)).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = tiny();
    let m = ClipModel::new(&cfg).unwrap();
    let mut tape = Tape::new();
    let wrong = Tensor::from_f32(vec![0.0; 2 * 3 * 16 * 16], &[2, 3, 16, 16]).unwrap();
    assert!(m.encode_image(&mut tape, &wrong).is_err());
    let toks = Tensor::from_u32(vec![5000, 1, 2, 3], &[2, 2]).unwrap();
    let e = m
        .encode_text(&mut tape, &toks, &[2, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("5000"), "{e}");
    let toks = Tensor::from_u32(vec![0, 1, 2, 3], &[2, 2]).unwrap();
    assert!(m.encode_text(&mut tape, &toks, &[0, 2]).is_err());
    assert!(m.encode_text(&mut tape, &toks, &[3, 2]).is_err());
    assert!(m.encode_text(&mut tape, &toks, &[2]).is_err());
}

/// Recording and non-recording tapes compute the same features; gradients with activation
/// checkpointing equal those without.
#[test]
fn no_grad_and_checkpointing_agree() {
    for cfg in [tiny(), variant(tiny())] {
        let mut m = ClipModel::new(&cfg).unwrap();
        let (img, toks, lens) = batch(&cfg, 4, 12, 3);
        let grads = |m: &mut ClipModel| {
            let mut tape = Tape::new();
            let i = m.encode_image(&mut tape, &img).unwrap();
            let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
            let l = m.clip_loss(&mut tape, i, t).unwrap();
            let (fi, ft) = (tape.value(i).to_vec(), tape.value(t).to_vec());
            m.params.zero_grad();
            tape.backward(&mut m.params, &[(l, &[1.0])]).unwrap();
            assert!(tape.is_empty(), "the graph must not be kept after backward");
            (fi, ft, m.params.grad().to_vec())
        };
        let (fi, ft, g0) = grads(&mut m);
        assert!(g0.iter().all(|v| v.is_finite()) && g0.iter().any(|&v| v != 0.0));
        assert_eq!(m.embed_images(&img).unwrap().as_f32().unwrap(), &fi[..]);
        assert_eq!(
            m.embed_texts(&toks, &lens).unwrap().as_f32().unwrap(),
            &ft[..]
        );
        m.set_checkpointing(true);
        let (fi2, ft2, g1) = grads(&mut m);
        assert_eq!((fi, ft), (fi2, ft2));
        let diff = g0
            .iter()
            .zip(&g1)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = g0.iter().map(|a| a.abs()).fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-6 * scale,
            "checkpointed gradients differ by {diff} (scale {scale})"
        );
    }
}

/// Gradients accumulate across backward passes and the tape's parameter gradients agree with
/// a directional finite difference of the whole model's loss (f32, so a loose tolerance; the
/// tight f64 checks are per op in gradcheck.rs).
#[test]
fn whole_model_gradient_matches_directional_difference() {
    for cfg in [tiny(), variant(tiny())] {
        let mut m = ClipModel::new(&cfg).unwrap();
        let (img, toks, lens) = batch(&cfg, 4, 10, 9);
        let loss = |m: &ClipModel| {
            let mut tape = Tape::no_grad();
            let i = m.encode_image(&mut tape, &img).unwrap();
            let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
            let l = m.clip_loss(&mut tape, i, t).unwrap();
            tape.value(l)[0] as f64
        };
        let mut tape = Tape::new();
        let i = m.encode_image(&mut tape, &img).unwrap();
        let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
        let l = m.clip_loss(&mut tape, i, t).unwrap();
        tape.backward(&mut m.params, &[(l, &[1.0])]).unwrap();
        let g = m.params.grad().to_vec();
        // Accumulation: a second identical pass doubles the gradient.
        let mut tape = Tape::new();
        let i = m.encode_image(&mut tape, &img).unwrap();
        let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
        let l = m.clip_loss(&mut tape, i, t).unwrap();
        tape.backward(&mut m.params, &[(l, &[1.0])]).unwrap();
        for (a, b) in m.params.grad().iter().zip(&g) {
            assert!((a - 2.0 * b).abs() <= 1e-6 * (1.0 + b.abs()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let u: Vec<f32> = (0..g.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let analytic: f64 = g
            .iter()
            .zip(&u)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        let h = 1e-3f32;
        let base = m.params.data().to_vec();
        let shifted = |m: &mut ClipModel, s: f32| {
            for ((p, b), d) in m.params.data_mut().iter_mut().zip(&base).zip(&u) {
                *p = b + s * d;
            }
            loss(m)
        };
        let numeric = (shifted(&mut m, h) - shifted(&mut m, -h)) / (2.0 * h as f64);
        let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs());
        assert!(
            rel < 2e-2,
            "directional derivative: analytic {analytic}, numeric {numeric}, rel {rel}"
        );
    }
}

/// The text tower runs on the valid tokens only (packed); a padded batch must give each
/// caption the features and the parameter gradients it gets alone, unpadded, for both
/// poolings and both norm placements.
#[test]
fn padded_batch_matches_each_caption_alone() {
    for cfg in [tiny(), variant(tiny())] {
        let mut model = ClipModel::new(&cfg).unwrap();
        let (_, toks, lens) = batch(&cfg, 3, 12, 11);
        assert!(lens.iter().any(|&n| n < 12), "no padding: {lens:?}");
        let j = cfg.embed_dim;
        let seed: Vec<f32> = (0..3 * j)
            .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let mut tape = Tape::new();
        let f = model.encode_text(&mut tape, &toks, &lens).unwrap();
        let batched = tape.value(f).to_vec();
        model.params.zero_grad();
        tape.backward(&mut model.params, &[(f, &seed)]).unwrap();
        let g_batched = model.params.grad().to_vec();
        model.params.zero_grad();
        let all = toks.as_u32().unwrap();
        for (i, &n) in lens.iter().enumerate() {
            let one = Tensor::from_u32(all[i * 12..i * 12 + n].to_vec(), &[1, n]).unwrap();
            let mut t = Tape::new();
            let f1 = model.encode_text(&mut t, &one, &[n]).unwrap();
            let (got, want) = (t.value(f1), &batched[i * j..(i + 1) * j]);
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "caption {i}: {a} vs {b}"
                );
            }
            t.backward(&mut model.params, &[(f1, &seed[i * j..(i + 1) * j])])
                .unwrap();
        }
        let g_alone = model.params.grad();
        let scale = g_alone.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (k, (a, b)) in g_batched.iter().zip(g_alone).enumerate() {
            assert!((a - b).abs() <= 1e-4 * scale, "gradient {k}: {a} vs {b}");
        }
    }
}

#[test]
fn safetensors_round_trip_and_shape_errors() {
    let cfg = tiny();
    let m = ClipModel::new(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    m.params.save_safetensors(&path).unwrap();
    let mut c2 = cfg.clone();
    c2.seed = 5;
    let mut m2 = ClipModel::new(&c2).unwrap();
    assert_ne!(m2.params.data(), m.params.data());
    m2.params.load_safetensors(&path).unwrap();
    assert_eq!(m2.params.data(), m.params.data());
    let mut c3 = cfg.clone();
    c3.embed_dim = 16;
    let mut m3 = ClipModel::new(&c3).unwrap();
    let e = m3.params.load_safetensors(&path).unwrap_err().to_string();
    assert!(
        e.contains("visual.proj") && e.contains("w.safetensors"),
        "{e}"
    );
    std::fs::write(&path, b"garbage").unwrap();
    assert!(m2.params.load_safetensors(&path).is_err());
}

fn write_inputs(path: &Path, img: &Tensor, toks: &Tensor, lens: &[usize]) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let lens64: Vec<i64> = lens.iter().map(|&v| v as i64).collect();
    let views = vec![
        (
            "images",
            TensorView::new(
                Dtype::F32,
                img.shape().to_vec(),
                bytemuck::cast_slice(img.as_f32().unwrap()),
            )
            .unwrap(),
        ),
        (
            "tokens",
            TensorView::new(
                Dtype::U32,
                toks.shape().to_vec(),
                bytemuck::cast_slice(toks.as_u32().unwrap()),
            )
            .unwrap(),
        ),
        (
            "lengths",
            TensorView::new(Dtype::I64, vec![lens.len()], bytemuck::cast_slice(&lens64)).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The engine's f32 forward matches an independent NumPy implementation (float64) of both
/// towers, both projections and the CLIP loss to 1e-5 relative.
#[test]
fn matches_numpy_reference() {
    let script = repo().join("tools/reference/model_ref.py");
    for (k, cfg) in [tiny(), variant(tiny())].into_iter().enumerate() {
        let m = ClipModel::new(&cfg).unwrap();
        let (img, toks, lens) = batch(&cfg, 5, 11, 20 + k as u64);
        let dir = tempfile::tempdir().unwrap();
        m.params
            .save_safetensors(&dir.path().join("weights.safetensors"))
            .unwrap();
        write_inputs(&dir.path().join("inputs.safetensors"), &img, &toks, &lens);
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| {
                panic!("could not run python3 (needed with numpy for this test): {e}")
            });
        assert!(
            out.status.success(),
            "{} failed (python3 with numpy is required; CI puts numpy on PYTHONPATH):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("ref.json")).unwrap()).unwrap();
        let flat = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
                .collect()
        };
        let mut tape = Tape::new();
        let i = m.encode_image(&mut tape, &img).unwrap();
        let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
        let l = m.clip_loss(&mut tape, i, t).unwrap();
        let ei = max_rel(tape.value(i), &flat(&r["img"]));
        let et = max_rel(tape.value(t), &flat(&r["txt"]));
        let rl = r["loss"].as_f64().unwrap();
        let el = (tape.value(l)[0] as f64 - rl).abs() / rl.abs();
        eprintln!("numpy reference, config {k}: rel err img {ei:e}, txt {et:e}, loss {el:e}");
        assert!(
            ei <= 1e-5,
            "config {k}: image features differ from NumPy by {ei:e}"
        );
        assert!(
            et <= 1e-5,
            "config {k}: text features differ from NumPy by {et:e}"
        );
        assert!(
            el <= 1e-5,
            "config {k}: loss {} vs NumPy {rl}: {el:e}",
            tape.value(l)[0]
        );
    }
}

/// The tiny model memorises one batch of 8 pairs: CLIP loss below 0.05 with plain Adam.
#[test]
fn overfits_one_batch() {
    let cfg = tiny();
    let mut m = ClipModel::new(&cfg).unwrap();
    let (img, toks, lens) = batch(&cfg, 8, 16, 42);
    let n = m.params.numel();
    let (mut m1, mut m2) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (lr, b1, b2) = (2e-3f32, 0.9f32, 0.999f32);
    let mut last = f32::INFINITY;
    let mut first = None;
    let mut steps = 0;
    for step in 1..=300 {
        steps = step;
        let mut tape = Tape::new();
        let i = m.encode_image(&mut tape, &img).unwrap();
        let t = m.encode_text(&mut tape, &toks, &lens).unwrap();
        let l = m.clip_loss(&mut tape, i, t).unwrap();
        last = tape.value(l)[0];
        first.get_or_insert(last);
        if last < 0.05 {
            break;
        }
        m.params.zero_grad();
        tape.backward(&mut m.params, &[(l, &[1.0])]).unwrap();
        let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        let (p, g) = m.params.data_and_grad_mut();
        for k in 0..n {
            m1[k] = b1 * m1[k] + (1.0 - b1) * g[k];
            m2[k] = b2 * m2[k] + (1.0 - b2) * g[k] * g[k];
            p[k] -= lr * (m1[k] / c1) / ((m2[k] / c2).sqrt() + 1e-8);
        }
        m.clamp_logit_scale();
    }
    eprintln!("overfit: loss {first:?} -> {last} in {steps} steps");
    assert!(
        first.unwrap() > 1.0,
        "initial loss {first:?} should be near ln 8"
    );
    assert!(last < 0.05, "loss after training {last} (from {first:?})");
}

/// With checkpointing the tape keeps only block inputs: less activation memory after forward.
#[test]
fn checkpointing_reduces_activation_memory() {
    let cfg = tiny();
    let mut m = ClipModel::new(&cfg).unwrap();
    let (img, toks, lens) = batch(&cfg, 4, 16, 4);
    let bytes = |m: &ClipModel| {
        let mut tape = Tape::new();
        m.encode_image(&mut tape, &img).unwrap();
        m.encode_text(&mut tape, &toks, &lens).unwrap();
        tape.activation_bytes()
    };
    let full = bytes(&m);
    m.set_checkpointing(true);
    let ckpt = bytes(&m);
    assert!(ckpt * 2 < full, "checkpointed {ckpt} bytes vs {full} bytes");
}
