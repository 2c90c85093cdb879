//! Trainer pieces that need no dataset: gradient accumulation equals the large batch, and the
//! config overrides.

use mmkd_engine::loss::clip_loss;
use mmkd_engine::loss::LossParts;
use mmkd_engine::trainer::{accumulate_gradients, load_configs, BatchInputs, BatchLoss};
use mmkd_engine::{ClipModel, ModelConfig};

const TINY: &str = r#"
embed_dim = 16
seed = 3
[vision]
image_size = 16
patch_size = 8
width = 32
layers = 1
heads = 2
mlp_ratio = 2.0
act = "quick_gelu"
[text]
vocab_size = 50
context_length = 8
width = 32
layers = 1
heads = 2
mlp_ratio = 2.0
act = "gelu"
norm = "post"
causal = false
pooling = "cls"
"#;

fn inputs(b: usize) -> BatchInputs {
    let s = 16;
    let images: Vec<f32> = (0..b * 3 * s * s)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let l = 8;
    let tokens: Vec<u32> = (0..b * l).map(|i| (i * 13 % 47) as u32 + 1).collect();
    let lengths: Vec<usize> = (0..b).map(|i| 3 + i % 6).collect();
    BatchInputs {
        images,
        image_size: s,
        tokens,
        token_len: l,
        lengths,
        size: b,
    }
}

fn grads(micro: usize) -> (Vec<f32>, f64) {
    let cfg = ModelConfig::from_toml_str(TINY, "tiny").unwrap();
    let mut model = ClipModel::new(&cfg).unwrap();
    let s = model.logit_scale();
    let b = 8;
    let j = cfg.embed_dim;
    let mut loss = |fi: &[f32], ft: &[f32]| {
        let (task, g) = clip_loss(fi, ft, s, b, j)?;
        Ok(BatchLoss {
            parts: LossParts {
                task,
                fd: 0.0,
                icl: 0.0,
                total: task,
            },
            d_image: g.image,
            d_text: g.text,
            d_logit_scale: g.logit_scale,
            d_icl_scale: None,
        })
    };
    let out = accumulate_gradients(&mut model, &inputs(b), micro, &mut loss).unwrap();
    (model.params.grad().to_vec(), out.parts.total)
}

#[test]
fn accumulation_equals_the_large_batch_gradient() {
    let (full, l_full) = grads(8);
    let nonzero = full.iter().filter(|g| g.abs() > 0.0).count();
    assert!(
        nonzero > full.len() / 2,
        "gradient mostly zero: {nonzero}/{}",
        full.len()
    );
    for micro in [4, 2, 1] {
        let (acc, l) = grads(micro);
        // Same features up to f32 summation order inside the matmuls of a smaller batch.
        assert!(
            (l - l_full).abs() < 1e-6 * l_full,
            "micro {micro}: {l} vs {l_full}"
        );
        let scale = full.iter().fold(0f32, |m, g| m.max(g.abs()));
        for (i, (a, b)) in full.iter().zip(&acc).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale,
                "micro {micro} [{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn config_file_with_train_table_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, format!("{TINY}\n[train]\nlr = 0.01\nbatch_size = 8\n")).unwrap();
    let sets = vec![
        "epochs=3".to_string(),
        "train.micro_batch=4".to_string(),
        "model.embed_dim=24".to_string(),
        "vision.layers=2".to_string(),
        "teacher_mode=all".to_string(),
    ];
    let (m, t) = load_configs(&p, &sets).unwrap();
    assert_eq!(t.lr, 0.01);
    assert_eq!(t.epochs, 3);
    assert_eq!(t.micro_batch, 4);
    assert_eq!(m.embed_dim, 24);
    assert_eq!(m.vision.layers, 2);
    assert_eq!(t.teacher_mode, mmkd_engine::loss::TeacherMode::All);
    let err = load_configs(&p, &["train.bogus=1".to_string()]).unwrap_err();
    assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    let err = load_configs(&p, &["micro_batch=3".to_string()]).unwrap_err();
    assert!(err.to_string().contains("must divide"), "{err}");
}
