//! Gradient checks (f64 central differences) and known values of the training losses.

use mmkd_engine::loss::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// Asserts `analytic ≈ numeric` elementwise: |a − n| ≤ 1e-6 · max(|a|, |n|, 1).
fn assert_close(what: &str, a: &[f64], num: &[f64]) {
    assert_eq!(a.len(), num.len());
    for (i, (x, y)) in a.iter().zip(num).enumerate() {
        let tol = 1e-6 * x.abs().max(y.abs()).max(1.0);
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: analytic {x} numeric {y}"
        );
    }
}

/// Central difference of `f` w.r.t. each element of `x`.
fn numeric(x: &[f64], f: &dyn Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = x[i];
            x[i] = v + h;
            let p = f(&x);
            x[i] = v - h;
            let m = f(&x);
            x[i] = v;
            (p - m) / (2.0 * h)
        })
        .collect()
}

#[test]
fn clip_gradient_check() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (n, d) = (5, 4);
    let img = randn(&mut rng, n * d);
    let txt = randn(&mut rng, n * d);
    let s = 1.3;
    let (_, g) = clip_loss_f64(&img, &txt, s, n, d).unwrap();
    let f_img = |x: &[f64]| clip_loss_f64(x, &txt, s, n, d).unwrap().0;
    let f_txt = |x: &[f64]| clip_loss_f64(&img, x, s, n, d).unwrap().0;
    let f_s = |x: &[f64]| clip_loss_f64(&img, &txt, x[0], n, d).unwrap().0;
    assert_close("image", &g.image, &numeric(&img, &f_img));
    assert_close("text", &g.text, &numeric(&txt, &f_txt));
    assert_close("s", &[g.logit_scale], &numeric(&[s], &f_s));
}

#[test]
fn clip_known_values() {
    // Identical features everywhere: every logit equal, so each CE is ln N.
    let (n, d) = (4, 3);
    let x = vec![1.0; n * d];
    let (l, g) = clip_loss_f64(&x, &x, 2.0, n, d).unwrap();
    assert!((l - (n as f64).ln()).abs() < 1e-12, "{l}");
    assert!(g.logit_scale.abs() < 1e-12);
    // Orthonormal matched pairs with a large scale: loss ≈ N·exp(−e^s)-ish → tiny.
    let mut e = vec![0.0; 9];
    for i in 0..3 {
        e[i * 3 + i] = 2.0; // unnormalised: the loss normalises
    }
    let (l, _) = clip_loss_f64(&e, &e, 100f64.ln(), 3, 3).unwrap();
    let want = (1.0 + 2.0 * (-100f64).exp()).ln();
    assert!((l - want).abs() < 1e-12, "{l} vs {want}");
}

struct Case {
    n: usize,
    t: usize,
    d: usize,
    mask: Vec<bool>,
}

fn check_distill(cfg: DistillConfig, case: &Case, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (n, t, d) = (case.n, case.t, case.d);
    let img = randn(&mut rng, n * d);
    let txt = randn(&mut rng, n * d);
    // Teacher norms around 2 to exercise teacher_norm.
    let ti: Vec<f64> = randn(&mut rng, n * t * d).iter().map(|v| 2.0 * v).collect();
    let tt: Vec<f64> = randn(&mut rng, n * t * d).iter().map(|v| 2.0 * v).collect();
    let s = 0.7;
    let tg = TeacherTargets {
        image: &ti,
        text: &tt,
        mask: &case.mask,
        teachers: t,
    };
    let (parts, g) = distill_loss_f64(&img, &txt, s, &tg, &cfg, n, d).unwrap();
    assert!(parts.is_finite());
    assert!((parts.total - (parts.task + cfg.fd_weight * parts.fd + parts.icl)).abs() < 1e-12);
    let total = |a: &[f64], b: &[f64], s: f64, c: &DistillConfig| {
        distill_loss_f64(a, b, s, &tg, c, n, d).unwrap().0.total
    };
    assert_close(
        "image",
        &g.image,
        &numeric(&img, &|x| total(x, &txt, s, &cfg)),
    );
    assert_close(
        "text",
        &g.text,
        &numeric(&txt, &|x| total(&img, x, s, &cfg)),
    );
    assert_close(
        "s",
        &[g.logit_scale],
        &numeric(&[s], &|x| total(&img, &txt, x[0], &cfg)),
    );
    match cfg.icl_scale {
        IclScale::Const(_) => assert!(g.icl_scale.is_none()),
        IclScale::Learned(l) => {
            let f = |x: &[f64]| {
                let c = DistillConfig {
                    icl_scale: IclScale::Learned(x[0]),
                    ..cfg
                };
                total(&img, &txt, s, &c)
            };
            assert_close("icl scale", &[g.icl_scale.unwrap()], &numeric(&[l], &f));
        }
    }
}

#[test]
fn distill_gradient_checks_all_switches() {
    let single = Case {
        n: 4,
        t: 1,
        d: 3,
        mask: vec![true; 4],
    };
    // Sample 1 lacks teacher 0, sample 3 lacks teacher 2, sample 0 lacks teacher 1.
    let multi = Case {
        n: 4,
        t: 3,
        d: 3,
        mask: vec![
            true, false, true, false, true, true, true, true, true, true, true, false,
        ],
    };
    let mut seed = 10;
    for norm in [TeacherNorm::L2, TeacherNorm::None] {
        for icl in [IclScale::Const(REFERENCE_ICL_SCALE), IclScale::Learned(0.9)] {
            for (mode, case) in [
                (TeacherMode::Random, &single),
                (TeacherMode::Mean, &multi),
                (TeacherMode::All, &multi),
                (TeacherMode::All, &single),
            ] {
                let cfg = DistillConfig {
                    fd_weight: 50.0,
                    icl_scale: icl,
                    teacher_norm: norm,
                    teacher_mode: mode,
                };
                seed += 1;
                check_distill(cfg, case, seed);
            }
        }
    }
}

/// Row-normalise helper for the hand computation.
fn norm_rows(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(move |v| v / n).collect::<Vec<_>>()
        })
        .collect()
}

fn ce_diag(a: &[f64], b: &[f64], c: f64, n: usize, d: usize) -> f64 {
    let mut l = 0.0;
    for i in 0..n {
        let z: Vec<f64> = (0..n)
            .map(|j| c * (0..d).map(|k| a[i * d + k] * b[j * d + k]).sum::<f64>())
            .collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        l += lse - z[i];
    }
    l / n as f64
}

#[test]
fn distill_matches_hand_formula_single_teacher() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, d) = (3, 4);
    let img = randn(&mut rng, n * d);
    let txt = randn(&mut rng, n * d);
    let ti = randn(&mut rng, n * d);
    let tt = randn(&mut rng, n * d);
    let mask = vec![true; n];
    let tg = TeacherTargets {
        image: &ti,
        text: &tt,
        mask: &mask,
        teachers: 1,
    };
    let cfg = DistillConfig {
        teacher_norm: TeacherNorm::None,
        ..DistillConfig::default()
    };
    let (p, _) = distill_loss_f64(&img, &txt, 1.0, &tg, &cfg, n, d).unwrap();
    let (i, t) = (norm_rows(&img, d), norm_rows(&txt, d));
    let mse = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>() / (n * d) as f64
    };
    let fd = mse(&i, &ti) + mse(&t, &tt);
    let c = REFERENCE_ICL_SCALE;
    let icl = 0.5 * (ce_diag(&i, &tt, c, n, d) + ce_diag(&t, &ti, c, n, d));
    let e = 1f64.exp();
    let task = 0.5 * (ce_diag(&i, &t, e, n, d) + ce_diag(&t, &i, e, n, d));
    assert!((p.fd - fd).abs() < 1e-12);
    assert!((p.icl - icl).abs() < 1e-12);
    assert!((p.task - task).abs() < 1e-12);
    assert!((p.total - (task + 50.0 * fd + icl)).abs() < 1e-10);
}

#[test]
fn modes_agree_when_teachers_are_identical() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (n, t, d) = (4, 2, 3);
    let img = randn(&mut rng, n * d);
    let txt = randn(&mut rng, n * d);
    let ti1 = randn(&mut rng, n * d);
    let tt1 = randn(&mut rng, n * d);
    // Two identical slots, both available: mean and all must equal the single-teacher loss.
    let dup = |x: &[f64]| -> Vec<f64> {
        x.chunks(d)
            .flat_map(|r| r.iter().chain(r.iter()).copied().collect::<Vec<_>>())
            .collect()
    };
    let (ti2, tt2) = (dup(&ti1), dup(&tt1));
    let m1 = vec![true; n];
    let m2 = vec![true; n * t];
    let one = TeacherTargets {
        image: &ti1,
        text: &tt1,
        mask: &m1,
        teachers: 1,
    };
    let two = TeacherTargets {
        image: &ti2,
        text: &tt2,
        mask: &m2,
        teachers: t,
    };
    let base = DistillConfig::default();
    let (p1, g1) = distill_loss_f64(&img, &txt, 0.5, &one, &base, n, d).unwrap();
    for mode in [TeacherMode::Mean, TeacherMode::All] {
        let cfg = DistillConfig {
            teacher_mode: mode,
            ..base
        };
        let (p2, g2) = distill_loss_f64(&img, &txt, 0.5, &two, &cfg, n, d).unwrap();
        assert!((p1.total - p2.total).abs() < 1e-12, "{mode:?}");
        for (a, b) in g1.image.iter().zip(&g2.image) {
            assert!((a - b).abs() < 1e-12);
        }
    }
    // Random mode refuses several slots; a draw over them gives the single-teacher targets.
    assert!(distill_loss_f64(&img, &txt, 0.5, &two, &base, n, d).is_err());
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let (pi, pt) = pick_random_teacher(&two, n, d, &mut r).unwrap();
    assert_eq!(pi, ti1);
    assert_eq!(pt, tt1);
}

#[test]
fn sample_without_teacher_is_an_error() {
    let (n, d) = (2, 2);
    let x = vec![1.0, 0.0, 0.0, 1.0];
    let mask = vec![true, false];
    let tg = TeacherTargets {
        image: &x,
        text: &x,
        mask: &mask,
        teachers: 1,
    };
    let err = distill_loss_f64(&x, &x, 0.0, &tg, &DistillConfig::default(), n, d).unwrap_err();
    assert!(err.to_string().contains("sample 1"), "{err}");
}

#[test]
fn f32_entry_points_match_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (n, d) = (3, 4);
    let img = randn(&mut rng, n * d);
    let txt = randn(&mut rng, n * d);
    let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (l64, g64) = clip_loss_f64(
        &f(&img).iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &f(&txt).iter().map(|&v| v as f64).collect::<Vec<_>>(),
        0.5,
        n,
        d,
    )
    .unwrap();
    let (l32, g32) = clip_loss(&f(&img), &f(&txt), 0.5, n, d).unwrap();
    assert_eq!(l64, l32);
    assert_eq!(g32.image, f(&g64.image));
}
