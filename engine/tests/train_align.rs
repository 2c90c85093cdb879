//! Teacher alignment: the ReLU and dropout backward against finite differences, and the
//! autoencoder learning to reconstruct the raw teacher features of a small synthetic dataset.

use mmkd_engine::align::{AlignConfig, AlignModel, LATENT};
use mmkd_engine::ops::{dropout, relu};
use mmkd_loaders::{pack, synth, Dataset, PackOptions, SourceFormat, SynthOptions};

fn numeric(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = xp[i];
            xp[i] = v + h;
            let fp = f(&xp);
            xp[i] = v - h;
            let fm = f(&xp);
            xp[i] = v;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let s: f64 = a.iter().map(|x| x * x).sum::<f64>();
    assert!(s > 1e-8, "vacuous gradient");
    (d / s).sqrt()
}

#[test]
fn relu_and_dropout_backward() {
    // Inputs kept away from 0, where ReLU has no derivative.
    let x: Vec<f64> = (0..12).map(|i| ((i * 7 % 12) as f64 - 5.5) / 4.0).collect();
    let g: Vec<f64> = (0..12).map(|i| ((i * 5 % 7) as f64 - 3.0) / 3.0).collect();
    let m: Vec<f64> = (0..12)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.25 })
        .collect();

    let mut dx = vec![0.0; 12];
    relu::backward_cpu(&x, &g, &mut dx);
    let num = numeric(&x, &|v| {
        let mut y = vec![0.0; 12];
        relu::forward(v, &mut y);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    });
    assert!(rel_err(&dx, &num) < 1e-6, "relu");
    assert!(dx.iter().zip(&x).all(|(d, v)| *v > 0.0 || *d == 0.0));

    let mut dx = vec![0.0; 12];
    dropout::backward_cpu(&m, &g, &mut dx);
    let num = numeric(&x, &|v| {
        let mut y = vec![0.0; 12];
        dropout::forward(v, &m, &mut y);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    });
    assert!(rel_err(&dx, &num) < 1e-6, "dropout");
}

fn tiny_dataset(root: &std::path::Path) -> Dataset {
    let mut so = SynthOptions::new(root.join("raw"));
    so.train = 40;
    so.eval = 4;
    so.image_size = 32;
    so.seed = 5;
    let syn = synth(&so).unwrap();
    let out = root.join("packed");
    let mut po = PackOptions::new(
        SourceFormat::MmkdClip,
        syn.train_dir.display().to_string(),
        &out,
    );
    po.image_size = 16;
    po.context_length = 16;
    po.vocab_size = 200;
    pack(&po).unwrap();
    Dataset::open(&out).unwrap()
}

#[test]
fn alignment_learns_and_writes_masked_targets() {
    let dir = tempfile::tempdir().unwrap();
    let ds = tiny_dataset(dir.path());
    let nt = ds.num_teachers();
    assert!(nt >= 2, "synthetic data has several teachers");
    let cfg = AlignConfig {
        steps: 60,
        hidden: 32,
        lr: 2e-3,
        seed: 9,
        batch_size: 16,
        ..AlignConfig::default()
    };
    let mut model = AlignModel::for_dataset(&ds, cfg.hidden, cfg.seed).unwrap();
    let before = model.project(&ds, None, 16).unwrap();
    let mut seen = Vec::new();
    model
        .train(&ds, &cfg, &mut |s, l| seen.push((s, l.total)))
        .unwrap();
    assert_eq!(seen.len(), cfg.steps);
    assert!(seen.iter().all(|(_, l)| l.is_finite()));
    let after = model.project(&ds, None, 16).unwrap();

    for (b, a) in before.losses.iter().zip(&after.losses) {
        assert!(a.samples > 0, "teacher {} has samples", a.name);
        eprintln!(
            "{}: n={} image {:.5} -> {:.5}, text {:.5} -> {:.5}",
            a.name, a.samples, b.image, a.image, b.text, a.text
        );
        for (x, y, tower) in [(b.image, a.image, "image"), (b.text, a.text, "text")] {
            assert!(
                y < 0.5 * x,
                "teacher {} {tower}: loss {x} -> {y}, expected to halve",
                a.name
            );
        }
    }

    // Same seed, same run: bit-identical projections.
    let mut again = AlignModel::for_dataset(&ds, cfg.hidden, cfg.seed).unwrap();
    again.train(&ds, &cfg, &mut |_, _| {}).unwrap();
    assert_eq!(again.project(&ds, None, 7).unwrap().image, after.image);

    // The file: shapes, mask from the availability bits, zeros where unavailable.
    let path = dir.path().join("projected.safetensors");
    after.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let n = ds.len() as usize;
    let f32s = |name: &str, shape: &[usize]| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
        bytemuck::pod_collect_to_vec(t.data())
    };
    let image = f32s("image", &[n, nt, LATENT]);
    let text = f32s("text", &[n, nt, LATENT]);
    let mask = f32s("mask", &[n, nt]);
    let mut unavailable = 0;
    for i in 0..n {
        let bits = ds.available(i as u64).unwrap();
        for t in 0..nt {
            let on = bits >> t & 1 == 1;
            assert_eq!(mask[i * nt + t], if on { 1.0 } else { 0.0 });
            let o = (i * nt + t) * LATENT;
            for v in [&image, &text] {
                let row = &v[o..o + LATENT];
                assert_eq!(row.iter().any(|x| *x != 0.0), on, "sample {i} teacher {t}");
            }
            unavailable += usize::from(!on);
        }
    }
    assert!(unavailable > 0, "the mask test needs some missing teachers");
}

/// Mean cosine similarity between the image latents of different teachers for the same sample.
fn cross_teacher_agreement(p: &mmkd_engine::align::Projection) -> f64 {
    let (n, nt) = (p.n, p.teachers);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for i in 0..n {
        for a in 0..nt {
            for b in a + 1..nt {
                if p.mask[i * nt + a] == 0.0 || p.mask[i * nt + b] == 0.0 {
                    continue;
                }
                let ra = &p.image[(i * nt + a) * LATENT..(i * nt + a + 1) * LATENT];
                let rb = &p.image[(i * nt + b) * LATENT..(i * nt + b + 1) * LATENT];
                let dot: f64 = ra.iter().zip(rb).map(|(x, y)| (x * y) as f64).sum();
                let na: f64 = ra.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
                let nb: f64 = rb.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt();
                sum += dot / (na * nb).max(1e-12);
                count += 1;
            }
        }
    }
    sum / count.max(1) as f64
}

#[test]
fn ntxent_pulls_teachers_of_one_sample_together() {
    let dir = tempfile::tempdir().unwrap();
    let ds = tiny_dataset(dir.path());
    let base = AlignConfig {
        steps: 40,
        hidden: 32,
        lr: 2e-3,
        seed: 3,
        batch_size: 16,
        ..AlignConfig::default()
    };
    let run = |w: f64| {
        let cfg = AlignConfig {
            ntxent_weight: w,
            ..base.clone()
        };
        let mut m = AlignModel::for_dataset(&ds, cfg.hidden, cfg.seed).unwrap();
        let mut last = None;
        m.train(&ds, &cfg, &mut |_, l| last = Some(l)).unwrap();
        let l = last.unwrap();
        assert!(l.recon.is_finite() && l.ntxent.is_finite());
        if w == 0.0 {
            assert_eq!(l.ntxent, 0.0);
        } else {
            assert!(l.ntxent > 0.0);
            assert!((l.total - (l.recon + w * l.ntxent)).abs() < 1e-9);
        }
        cross_teacher_agreement(&m.project(&ds, None, 16).unwrap())
    };
    let (plain, contrastive) = (run(0.0), run(1.0));
    eprintln!(
        "cross-teacher cosine: reconstruction only {plain:.3}, with NT-Xent {contrastive:.3}"
    );
    assert!(
        contrastive > plain + 0.2 && contrastive > 0.5,
        "NT-Xent should align the teachers: {plain:.3} -> {contrastive:.3}"
    );
}
