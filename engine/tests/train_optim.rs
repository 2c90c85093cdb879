//! AdamW, the schedule, clipping and the clamp against hand-computed values.

use mmkd_engine::optim::*;
use mmkd_engine::ParamStore;

fn store() -> ParamStore {
    let mut p = ParamStore::new();
    p.add("visual.proj", &[2, 2], |x| {
        x.copy_from_slice(&[1.0, -2.0, 0.5, 3.0])
    })
    .unwrap();
    p.add("visual.ln_post.bias", &[2], |x| {
        x.copy_from_slice(&[0.25, -0.25])
    })
    .unwrap();
    p.add("logit_scale", &[], |x| x[0] = 4.5).unwrap();
    p
}

/// The AdamW update written out in f64 for one element.
fn reference(p0: f64, grads: &[f64], lrs: &[f64], decays: bool, c: AdamWConfig) -> f64 {
    let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
    for (t, (&g, &lr)) in grads.iter().zip(lrs).enumerate() {
        let t = (t + 1) as i32;
        if decays {
            p *= 1.0 - lr * c.weight_decay;
        }
        m = c.beta1 * m + (1.0 - c.beta1) * g;
        v = c.beta2 * v + (1.0 - c.beta2) * g * g;
        p -= lr * (m / (1.0 - c.beta1.powi(t))) / ((v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps);
    }
    p
}

#[test]
fn adamw_matches_hand_computation_and_skips_decay_on_gains_and_scales() {
    let mut p = store();
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(&p, cfg);
    let g1 = [0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5];
    let g2 = [-0.05f32, 0.4, 0.3, 2.0, 0.0, -0.5, 0.25];
    let lrs = [1e-2, 5e-3];
    let p0: Vec<f64> = p.data().iter().map(|&v| v as f64).collect();
    for (g, lr) in [(&g1, lrs[0]), (&g2, lrs[1])] {
        p.grad_mut().copy_from_slice(g);
        opt.step(&mut p, lr);
    }
    // First step alone: m̂ = g, v̂ = g², so the move is lr·g/(|g|+ε) ≈ lr·sign(g).
    let decays = [true, true, true, true, false, false, false];
    for i in 0..7 {
        let want = reference(p0[i], &[g1[i] as f64, g2[i] as f64], &lrs, decays[i], cfg);
        let got = p.data()[i] as f64;
        assert!(
            (got - want).abs() < 1e-6 * want.abs().max(1.0),
            "[{i}] {got} vs {want}"
        );
    }
    // The weight at index 3 had zero gradient at step 1: only decay moved it then.
    assert_eq!(opt.t, 2);
    // Bias and logit scale: no decay; check against the decaying formula to see it matters.
    let with_decay = reference(p0[6], &[1.0 * g1[6] as f64, g2[6] as f64], &lrs, true, cfg);
    assert!((p.data()[6] as f64 - with_decay).abs() > 1e-4);
}

#[test]
fn cosine_schedule_with_warmup() {
    let (base, warm, total) = (1e-3, 10, 110);
    assert!((cosine_lr(0, base, warm, total) - 1e-4).abs() < 1e-15);
    assert!((cosine_lr(9, base, warm, total) - 1e-3).abs() < 1e-15);
    assert!((cosine_lr(10, base, warm, total) - 1e-3).abs() < 1e-15);
    // Half-way through the decay: cos(π/2) = 0 → base/2.
    assert!((cosine_lr(60, base, warm, total) - 5e-4).abs() < 1e-15);
    assert!(cosine_lr(110, base, warm, total).abs() < 1e-15);
    assert!(cosine_lr(500, base, warm, total).abs() < 1e-15);
    // No warm-up: starts at base.
    assert!((cosine_lr(0, base, 0, total) - base).abs() < 1e-15);
}

#[test]
fn gradient_norm_clipping() {
    let mut g = vec![3.0f32, 4.0];
    let n = clip_grad_norm(&mut g, 1.0);
    assert_eq!(n, 5.0);
    let k = 1.0 / (5.0 + 1e-6);
    assert!((g[0] as f64 - 3.0 * k).abs() < 1e-7 && (g[1] as f64 - 4.0 * k).abs() < 1e-7);
    let mut g = vec![0.3f32, 0.4];
    assert!((clip_grad_norm(&mut g, 1.0) - 0.5).abs() < 1e-7);
    assert_eq!(g, vec![0.3, 0.4]);
}

#[test]
fn logit_scale_clamped_to_zero_and_ln_100() {
    let mut p = store();
    let id = p.id("logit_scale").unwrap();
    p.value_mut(id)[0] = 7.0;
    clamp_logit_scale(&mut p);
    assert!((p.value(id)[0] - 100f32.ln()).abs() < 1e-6);
    p.value_mut(id)[0] = -1.0;
    clamp_logit_scale(&mut p);
    assert_eq!(p.value(id)[0], 0.0);
    // Other parameters untouched.
    assert_eq!(p.data()[0], 1.0);
}
