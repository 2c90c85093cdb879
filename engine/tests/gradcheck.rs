//! Every op's backward against central finite differences, in f64, on random inputs.
//! Each check builds `L(inputs) = Σ G ∘ op(inputs)` with a random upstream gradient `G`,
//! runs the op's backward with `dy = G`, and compares with `(L(x+h) − L(x−h)) / 2h` for every
//! input element: ‖analytic − numeric‖ / max(‖analytic‖, ‖numeric‖) ≤ 1e-6.

use mmkd_engine::ops::attention::{self, AttnSpec};
use mmkd_engine::ops::linear::WLayout;
use mmkd_engine::ops::reduce::Reduction;
use mmkd_engine::ops::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn rv(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` around `x`.
fn numeric(x: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let v = xp[i];
            xp[i] = v + H;
            let fp = f(&xp);
            xp[i] = v - H;
            let fm = f(&xp);
            xp[i] = v;
            (fp - fm) / (2.0 * H)
        })
        .collect()
}

fn assert_close(what: &str, analytic: &[f64], numeric: &[f64]) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: length");
    let diff: f64 = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n).powi(2))
        .sum::<f64>()
        .sqrt();
    let na = analytic.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nn = numeric.iter().map(|a| a * a).sum::<f64>().sqrt();
    let scale = na.max(nn);
    assert!(
        scale > 1e-8,
        "{what}: gradient is identically zero, the check would be vacuous"
    );
    let rel = diff / scale;
    assert!(rel <= TOL, "{what}: relative error {rel:e} > {TOL:e}");
}

#[test]
fn linear_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(n, k, m, layout, bias) in &[
        (1, 1, 1, WLayout::OutIn, true),
        (3, 5, 4, WLayout::OutIn, true),
        (7, 6, 3, WLayout::InOut, false),
        (2, 9, 8, WLayout::InOut, true),
    ] {
        let (x, w, b, g) = (
            rv(&mut rng, n * k),
            rv(&mut rng, m * k),
            rv(&mut rng, m),
            rv(&mut rng, n * m),
        );
        let run = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; n * m];
            linear::forward(x, w, bias.then_some(b), layout, n, k, m, &mut y);
            dot(&y, &g)
        };
        let (mut dx, mut dw, mut db) = (vec![0.0; n * k], vec![0.0; m * k], vec![0.0; m]);
        linear::backward_cpu(
            &x,
            &w,
            &g,
            layout,
            n,
            k,
            m,
            Some(&mut dx),
            &mut dw,
            bias.then_some(&mut db[..]),
        );
        let tag = format!("linear {n}x{k}->{m} {layout:?} bias={bias}");
        assert_close(
            &format!("{tag} dx"),
            &dx,
            &numeric(&x, &mut |v| run(v, &w, &b)),
        );
        assert_close(
            &format!("{tag} dW"),
            &dw,
            &numeric(&w, &mut |v| run(&x, v, &b)),
        );
        if bias {
            assert_close(
                &format!("{tag} db"),
                &db,
                &numeric(&b, &mut |v| run(&x, &w, v)),
            );
        }
    }
}

#[test]
fn layer_norm_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for &(n, d) in &[(1, 2), (4, 7), (9, 16)] {
        let (x, ga, be, g) = (
            rv(&mut rng, n * d),
            rv(&mut rng, d),
            rv(&mut rng, d),
            rv(&mut rng, n * d),
        );
        let run = |x: &[f64], ga: &[f64], be: &[f64]| {
            let (mut y, mut m, mut r) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
            layer_norm::forward(x, ga, be, d, 1e-5, &mut y, &mut m, &mut r);
            dot(&y, &g)
        };
        let (mut y, mut m, mut r) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        layer_norm::forward(&x, &ga, &be, d, 1e-5, &mut y, &mut m, &mut r);
        let (mut dx, mut dg, mut db) = (vec![0.0; n * d], vec![0.0; d], vec![0.0; d]);
        layer_norm::backward_cpu(&x, &ga, &m, &r, &g, d, Some(&mut dx), &mut dg, &mut db);
        assert_close(
            "layer_norm dx",
            &dx,
            &numeric(&x, &mut |v| run(v, &ga, &be)),
        );
        assert_close(
            "layer_norm dgamma",
            &dg,
            &numeric(&ga, &mut |v| run(&x, v, &be)),
        );
        assert_close(
            "layer_norm dbeta",
            &db,
            &numeric(&be, &mut |v| run(&x, &ga, v)),
        );
    }
}

#[test]
fn activations_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for n in [1usize, 17, 300] {
        let x: Vec<f64> = rv(&mut rng, n).iter().map(|v| v * 4.0).collect();
        let g = rv(&mut rng, n);
        let mut dx = vec![0.0; n];
        gelu::backward_cpu(&x, &g, &mut dx);
        let num = numeric(&x, &mut |v| {
            let mut y = vec![0.0; n];
            gelu::forward(v, &mut y);
            dot(&y, &g)
        });
        assert_close("gelu", &dx, &num);
        let mut dx = vec![0.0; n];
        quick_gelu::backward_cpu(&x, &g, &mut dx);
        let num = numeric(&x, &mut |v| {
            let mut y = vec![0.0; n];
            quick_gelu::forward(v, &mut y);
            dot(&y, &g)
        });
        assert_close("quick_gelu", &dx, &num);
    }
}

fn attention_case(rng: &mut ChaCha8Rng, spec: AttnSpec) {
    let (r, w) = (spec.rows(), spec.width);
    let qkv: Vec<f64> = rv(rng, r * 3 * w).iter().map(|v| v * 2.0).collect();
    let g = rv(rng, r * w);
    let mut out = vec![0.0; r * w];
    let mut probs = vec![0.0; spec.probs_len()];
    attention::forward(&qkv, &spec, &mut out, Some(&mut probs));
    assert!(
        out.iter().all(|v| v.is_finite()),
        "attention output not finite for {spec:?}"
    );
    // Outputs without a probs buffer (inference path) are identical.
    let mut out2 = vec![0.0; r * w];
    attention::forward(&qkv, &spec, &mut out2, None);
    assert_eq!(out, out2, "inference path differs for {spec:?}");
    let mut dq = vec![0.0; qkv.len()];
    attention::backward_cpu(&qkv, &probs, &g, &spec, &mut dq);
    assert!(dq.iter().all(|v| v.is_finite()));
    let num = numeric(&qkv, &mut |v| {
        let mut o = vec![0.0; r * w];
        attention::forward(v, &spec, &mut o, None);
        dot(&o, &g)
    });
    assert_close(&format!("attention {spec:?}"), &dq, &num);
}

#[test]
fn attention_backward_masks_on_and_off() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (b, l, heads, width) in [(1, 1, 1, 2), (2, 5, 2, 8), (3, 4, 3, 6)] {
        for causal in [false, true] {
            for padded in [false, true] {
                let lengths = padded.then(|| (0..b).map(|i| 1 + (i * 2) % l).collect());
                attention_case(
                    &mut rng,
                    AttnSpec {
                        batch: b,
                        len: l,
                        heads,
                        width,
                        lengths,
                        causal,
                        packed: false,
                    },
                );
            }
        }
    }
    // Packed sequences of 3, 1, 0 and 4 tokens back to back (8 rows).
    for causal in [false, true] {
        attention_case(
            &mut rng,
            AttnSpec {
                batch: 4,
                len: 4,
                heads: 2,
                width: 8,
                lengths: Some(vec![3, 1, 0, 4]),
                causal,
                packed: true,
            },
        );
    }
}

/// Packed sequences give each token the output the padded batch gives it, to the last bit,
/// and the same gradient when the padding's output gradient is zero (up to the order of the
/// sums, whose length differs): the padded rows' work is skipped, not approximated.
#[test]
fn packed_attention_matches_the_padded_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (b, l, heads, w) = (3, 5, 2, 8);
    let lengths = vec![5, 2, 3];
    for causal in [false, true] {
        let padded = AttnSpec {
            batch: b,
            len: l,
            heads,
            width: w,
            lengths: Some(lengths.clone()),
            causal,
            packed: false,
        };
        let packed = AttnSpec {
            packed: true,
            ..padded.clone()
        };
        let qkv = rv(&mut rng, b * l * 3 * w);
        let mut g = rv(&mut rng, b * l * w);
        let rows: Vec<usize> = (0..b)
            .flat_map(|i| (0..lengths[i]).map(move |t| i * l + t))
            .collect();
        for r in (0..b * l).filter(|r| !rows.contains(r)) {
            g[r * w..(r + 1) * w].fill(0.0);
        }
        let pick = |v: &[f64], d: usize| -> Vec<f64> {
            rows.iter()
                .flat_map(|&r| v[r * d..(r + 1) * d].to_vec())
                .collect()
        };
        let run = |spec: &AttnSpec, qkv: &[f64], g: &[f64]| {
            let mut out = vec![0.0; spec.rows() * w];
            let mut probs = vec![0.0; spec.probs_len()];
            attention::forward(qkv, spec, &mut out, Some(&mut probs));
            let mut d = vec![0.0; qkv.len()];
            attention::backward_cpu(qkv, &probs, g, spec, &mut d);
            (out, d)
        };
        let (o_pad, d_pad) = run(&padded, &qkv, &g);
        let (o_pk, d_pk) = run(&packed, &pick(&qkv, 3 * w), &pick(&g, w));
        assert_eq!(o_pk, pick(&o_pad, w), "causal {causal}: output");
        let d_want = pick(&d_pad, 3 * w);
        let worst = d_pk
            .iter()
            .zip(&d_want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-14, "causal {causal}: gradient off by {worst:e}");
        assert!(packed.probs_len() < padded.probs_len());
    }
}

/// Keys and values past a sequence's length are never read: NaN there leaves the output and
/// the gradient as they were with finite values, and the padded keys' gradients are zero.
#[test]
fn attention_never_reads_padded_keys() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for causal in [false, true] {
        let (b, l, heads, width) = (2, 6, 2, 8);
        let spec = AttnSpec {
            batch: b,
            len: l,
            heads,
            width,
            lengths: Some(vec![4, 1]),
            causal,
            packed: false,
        };
        let run = |qkv: &[f64]| {
            let mut out = vec![0.0; b * l * width];
            let mut probs = vec![0.0; b * heads * l * l];
            attention::forward(qkv, &spec, &mut out, Some(&mut probs));
            let g: Vec<f64> = (0..out.len()).map(|i| ((i * 7) % 5) as f64 - 2.0).collect();
            let mut dqkv = vec![0.0; qkv.len()];
            attention::backward_cpu(qkv, &probs, &g, &spec, &mut dqkv);
            (out, dqkv)
        };
        let clean = rv(&mut rng, b * l * 3 * width);
        let mut dirty = clean.clone();
        for (bi, &len) in [4usize, 1].iter().enumerate() {
            for t in len..l {
                let row = (bi * l + t) * 3 * width;
                // K and V columns of every head of a padded token.
                dirty[row + width..row + 3 * width].fill(f64::NAN);
            }
        }
        let (o1, d1) = run(&clean);
        let (o2, d2) = run(&dirty);
        assert_eq!(o1, o2, "causal {causal}: output");
        assert!(
            d2.iter().all(|v| v.is_finite()),
            "causal {causal}: NaN in the gradient"
        );
        assert_eq!(d1, d2, "causal {causal}: gradient");
        for (bi, &len) in [4usize, 1].iter().enumerate() {
            for t in len..l {
                let row = (bi * l + t) * 3 * width;
                assert!(d1[row + width..row + 3 * width].iter().all(|&v| v == 0.0));
            }
        }
    }
}

#[test]
fn attention_fully_masked_rows_are_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // Item 1 has no valid key: its output and gradient must be exactly zero, never NaN.
    let spec = AttnSpec {
        batch: 2,
        len: 3,
        heads: 2,
        width: 4,
        lengths: Some(vec![2, 0]),
        causal: true,
        packed: false,
    };
    let qkv = rv(&mut rng, 2 * 3 * 12);
    let mut out = vec![0.0; 2 * 3 * 4];
    let mut probs = vec![0.0; 2 * 2 * 9];
    attention::forward(&qkv, &spec, &mut out, Some(&mut probs));
    assert!(
        out[12..].iter().all(|&v| v == 0.0),
        "masked item output {:?}",
        &out[12..]
    );
    assert!(out[..12].iter().any(|&v| v != 0.0));
    let g = rv(&mut rng, 24);
    let mut dq = vec![0.0; qkv.len()];
    attention::backward_cpu(&qkv, &probs, &g, &spec, &mut dq);
    assert!(dq[36..].iter().all(|&v| v == 0.0));
    attention_case(&mut rng, spec);
}

#[test]
fn cross_entropy_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (n, c) in [(1, 2), (4, 5), (8, 8)] {
        let z: Vec<f64> = rv(&mut rng, n * c).iter().map(|v| v * 5.0).collect();
        let t: Vec<u32> = (0..n).map(|i| (i * 3 % c) as u32).collect();
        let up = 0.7;
        let mut p = vec![0.0; n * c];
        cross_entropy::forward(&z, &t, c, &mut p);
        let mut dz = vec![0.0; n * c];
        cross_entropy::backward_cpu(&p, &t, c, up, &mut dz);
        let num = numeric(&z, &mut |v| {
            let mut p = vec![0.0; n * c];
            up * cross_entropy::forward(v, &t, c, &mut p)
        });
        assert_close("cross_entropy", &dz, &num);
    }
}

#[test]
fn embedding_backward_with_repeated_ids() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (v, d) = (5, 3);
    let ids = [0u32, 4, 4, 2, 0, 0];
    let table = rv(&mut rng, v * d);
    let g = rv(&mut rng, ids.len() * d);
    let mut dt = vec![0.0; v * d];
    embedding::backward_cpu(&ids, &g, d, &mut dt);
    let num = numeric(&table, &mut |t| {
        let mut y = vec![0.0; ids.len() * d];
        embedding::forward(&ids, t, d, &mut y);
        dot(&y, &g)
    });
    assert_close("embedding", &dt, &num);
}

#[test]
fn patch_embed_backward_and_conv_semantics() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (b, c, h, w, p, d) = (2, 3, 4, 6, 2, 5);
    let img = rv(&mut rng, b * c * h * w);
    let wt = rv(&mut rng, d * c * p * p);
    let (y, cols) = patch_embed::forward(&img, &wt, b, c, h, w, p, d);
    // Direct convolution as the oracle of the forward.
    let (gh, gw) = (h / p, w / p);
    for bi in 0..b {
        for py in 0..gh {
            for px in 0..gw {
                for o in 0..d {
                    let mut s = 0.0;
                    for ci in 0..c {
                        for ky in 0..p {
                            for kx in 0..p {
                                s += img[((bi * c + ci) * h + py * p + ky) * w + px * p + kx]
                                    * wt[((o * c + ci) * p + ky) * p + kx];
                            }
                        }
                    }
                    let got = y[((bi * gh * gw) + py * gw + px) * d + o];
                    assert!((got - s).abs() < 1e-12, "conv mismatch {got} vs {s}");
                }
            }
        }
    }
    let g = rv(&mut rng, y.len());
    let mut dw = vec![0.0; wt.len()];
    linear::backward_cpu(
        &cols,
        &wt,
        &g,
        WLayout::OutIn,
        b * gh * gw,
        c * p * p,
        d,
        None,
        &mut dw,
        None,
    );
    let num = numeric(&wt, &mut |v| {
        dot(&patch_embed::forward(&img, v, b, c, h, w, p, d).0, &g)
    });
    assert_close("patch_embed dW", &dw, &num);
}

#[test]
fn add_and_add_param_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, t) = (4, 6);
    let (x, pp, g) = (rv(&mut rng, n * t), rv(&mut rng, t), rv(&mut rng, n * t));
    let run = |x: &[f64], pp: &[f64]| {
        let mut y = vec![0.0; n * t];
        add::forward_param(x, pp, &mut y);
        dot(&y, &g)
    };
    let mut dp = vec![0.0; t];
    add::backward_param_cpu(&g, &mut dp);
    assert_close("add_param dp", &dp, &numeric(&pp, &mut |v| run(&x, v)));
    assert_close("add_param dx", &g, &numeric(&x, &mut |v| run(v, &pp)));
    let b2 = rv(&mut rng, n * t);
    let num = numeric(&x, &mut |v| {
        let mut y = vec![0.0; n * t];
        add::forward(v, &b2, &mut y);
        dot(&y, &g)
    });
    let mut dx = vec![0.0; n * t];
    add::accumulate(&mut dx, &g);
    assert_close("add da", &dx, &num);
}

#[test]
fn cls_pos_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (b, p, d) = (3, 4, 5);
    let (x, cls, pos, g) = (
        rv(&mut rng, b * p * d),
        rv(&mut rng, d),
        rv(&mut rng, (p + 1) * d),
        rv(&mut rng, b * (p + 1) * d),
    );
    let run = |x: &[f64], c: &[f64], q: &[f64]| {
        let mut y = vec![0.0; b * (p + 1) * d];
        cls_pos::forward(x, c, q, b, p, d, &mut y);
        dot(&y, &g)
    };
    let (mut dx, mut dc, mut dp) = (vec![0.0; x.len()], vec![0.0; d], vec![0.0; pos.len()]);
    cls_pos::backward_cpu(&g, b, p, d, Some(&mut dx), &mut dc, &mut dp);
    assert_close("cls_pos dx", &dx, &numeric(&x, &mut |v| run(v, &cls, &pos)));
    assert_close(
        "cls_pos dcls",
        &dc,
        &numeric(&cls, &mut |v| run(&x, v, &pos)),
    );
    assert_close(
        "cls_pos dpos",
        &dp,
        &numeric(&pos, &mut |v| run(&x, &cls, v)),
    );
}

#[test]
fn l2_normalize_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (n, d) in [(1, 1), (3, 4), (8, 32)] {
        let (x, g) = (rv(&mut rng, n * d), rv(&mut rng, n * d));
        let (mut y, mut norms) = (vec![0.0; n * d], vec![0.0; n]);
        l2_normalize::forward(&x, d, &mut y, &mut norms);
        let mut dx = vec![0.0; n * d];
        l2_normalize::backward_cpu(&y, &norms, &g, d, &mut dx);
        let num = numeric(&x, &mut |v| {
            let (mut y, mut nn) = (vec![0.0; n * d], vec![0.0; n]);
            l2_normalize::forward(v, d, &mut y, &mut nn);
            dot(&y, &g)
        });
        if d == 1 {
            // x/|x| is locally constant in 1-D: the gradient is exactly zero.
            assert!(dx.iter().all(|v| v.abs() < 1e-12) && num.iter().all(|v| v.abs() < 1e-6));
        } else {
            assert_close("l2_normalize", &dx, &num);
        }
    }
}

#[test]
fn reductions_select_transpose_matmul_scale_backward() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let x = rv(&mut rng, 12);
    for r in [Reduction::Sum, Reduction::Mean] {
        let mut dx = vec![0.0; 12];
        reduce::backward_cpu(0.3, r, &mut dx);
        assert_close(
            "reduce",
            &dx,
            &numeric(&x, &mut |v| 0.3 * reduce::forward(v, r)),
        );
    }
    // pack_rows: x (6 rows of 2) rows [4, 0, 5].
    let idx = [4usize, 0, 5];
    let g = rv(&mut rng, 6);
    let mut dx = vec![0.0; 12];
    pack_rows::scatter_add(&g, &idx, 2, &mut dx);
    let num = numeric(&x, &mut |v| {
        let mut y = vec![0.0; 6];
        pack_rows::gather(v, &idx, 2, &mut y);
        dot(&y, &g)
    });
    assert_close("pack_rows", &dx, &num);
    // transpose (3, 4)
    let g = rv(&mut rng, 12);
    let mut dx = vec![0.0; 12];
    reshape::transpose(&g, 4, 3, &mut dx, true);
    let num = numeric(&x, &mut |v| {
        let mut y = vec![0.0; 12];
        reshape::transpose(v, 3, 4, &mut y, false);
        dot(&y, &g)
    });
    assert_close("transpose", &dx, &num);
    // matmul_nt: a (3, 4), b (5, 4)
    for (m, n, k) in [(1, 1, 1), (3, 5, 4), (8, 8, 16)] {
        let (a, b, g) = (
            rv(&mut rng, m * k),
            rv(&mut rng, n * k),
            rv(&mut rng, m * n),
        );
        let run = |a: &[f64], b: &[f64]| {
            let mut y = vec![0.0; m * n];
            matmul::nt_forward(a, b, m, n, k, &mut y);
            dot(&y, &g)
        };
        let (mut da, mut db) = (vec![0.0; m * k], vec![0.0; n * k]);
        matmul::nt_backward(&a, &b, &g, m, n, k, Some(&mut da), Some(&mut db));
        assert_close("matmul_nt da", &da, &numeric(&a, &mut |v| run(v, &b)));
        assert_close("matmul_nt db", &db, &numeric(&b, &mut |v| run(&a, v)));
    }
    // scale_exp: y = e^s x ; ds = Σ dy∘y, dx = e^s dy
    let (s, g) = (0.4f64, rv(&mut rng, 12));
    let run = |x: &[f64], s: f64| {
        let mut y = vec![0.0; 12];
        scale::forward(x, s.exp(), &mut y);
        dot(&y, &g)
    };
    let mut y = vec![0.0; 12];
    scale::forward(&x, s.exp(), &mut y);
    let ds = scale::backward_exp_param(&g, &y);
    assert_close(
        "scale_exp ds",
        &[ds],
        &numeric(&[s], &mut |v| run(&x, v[0])),
    );
    let mut dx = vec![0.0; 12];
    scale::backward_cpu(&g, s.exp(), &mut dx);
    assert_close("scale_exp dx", &dx, &numeric(&x, &mut |v| run(v, s)));
}
