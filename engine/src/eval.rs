//! Evaluation on plain feature arrays: zero-shot classification, retrieval, linear probe.
//!
//! All functions take row-major `f32` features and L2-normalise them where the metric needs
//! cosine similarity; they know nothing about the model, so a teacher's stored features are
//! evaluated exactly like the student's.

use crate::ops::matmul::{gemm, Mat};
use anyhow::{bail, Result};

/// Zero-shot classification metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ZeroShot {
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy (top-C when there are fewer than 5 classes).
    pub top5: f64,
    /// Mean per-class recall over the classes present.
    pub balanced_accuracy: f64,
    /// Macro one-vs-rest ROC AUC over the classes with both positives and negatives.
    pub macro_auc: f64,
}

/// Retrieval recalls (fractions in [0, 1]).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Retrieval {
    /// Image → text recall@1, @5, @10.
    pub i2t: [f64; 3],
    /// Text → image recall@1, @5, @10.
    pub t2i: [f64; 3],
}

/// Linear-probe result.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Probe {
    /// Test accuracy with the chosen regularisation.
    pub accuracy: f64,
    /// The L2 weight chosen on the validation split.
    pub l2: f64,
    /// Validation accuracy at that weight.
    pub val_accuracy: f64,
}

/// Rows of `x` `[n, d]` scaled to unit length (zero rows stay zero).
pub fn normalize_rows(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for r in out.chunks_exact_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|v| *v /= n);
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// CLIP's prompt ensembling: `text` holds `[C, P, d]` embeddings (C classes × P templates); each
/// is normalised, averaged over the templates and renormalised into a `[C, d]` classifier.
pub fn ensemble_classes(
    text: &[f32],
    classes: usize,
    templates: usize,
    d: usize,
) -> Result<Vec<f32>> {
    if text.len() != classes * templates * d || templates == 0 {
        bail!(
            "class text embeddings: {} values for {classes} classes × {templates} templates × {d}",
            text.len()
        );
    }
    let t = normalize_rows(text, d);
    let mut out = vec![0.0; classes * d];
    for c in 0..classes {
        for p in 0..templates {
            let r = &t[(c * templates + p) * d..(c * templates + p + 1) * d];
            out[c * d..(c + 1) * d]
                .iter_mut()
                .zip(r)
                .for_each(|(o, v)| *o += v);
        }
    }
    Ok(normalize_rows(&out, d))
}

/// Zero-shot metrics of `images` `[n, d]` against the class classifier `[C, d]` with labels in
/// `0..C` (samples labelled `< 0` are skipped).
pub fn zero_shot(images: &[f32], classifier: &[f32], labels: &[i32], d: usize) -> Result<ZeroShot> {
    let c = classifier.len() / d;
    if images.len() != labels.len() * d || c == 0 {
        bail!(
            "zero-shot: {} image values for {} labels of width {d}",
            images.len(),
            labels.len()
        );
    }
    let im = normalize_rows(images, d);
    let scores: Vec<Vec<f32>> = im
        .chunks_exact(d)
        .map(|x| classifier.chunks_exact(d).map(|w| dot(x, w)).collect())
        .collect();
    classification_metrics(&scores, labels)
}

/// Top-1/top-5/balanced accuracy/macro AUC from per-sample class scores.
pub fn classification_metrics(scores: &[Vec<f32>], labels: &[i32]) -> Result<ZeroShot> {
    let c = scores.first().map(|s| s.len()).unwrap_or(0);
    let valid: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 0).collect();
    if valid.is_empty() {
        bail!("no labelled samples to evaluate");
    }
    if let Some(&i) = valid.iter().find(|&&i| labels[i] as usize >= c) {
        bail!(
            "sample {i} has label {} but there are {c} classes",
            labels[i]
        );
    }
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut per_class = vec![(0usize, 0usize); c];
    for &i in &valid {
        let y = labels[i] as usize;
        let s = &scores[i];
        // Rank of the true class: classes scoring strictly higher (ties count in its favour).
        let rank = s.iter().filter(|&&v| v > s[y]).count();
        top1 += (rank == 0) as usize;
        top5 += (rank < 5) as usize;
        per_class[y].1 += 1;
        per_class[y].0 += (rank == 0) as usize;
    }
    let present: Vec<&(usize, usize)> = per_class.iter().filter(|p| p.1 > 0).collect();
    let balanced =
        present.iter().map(|p| p.0 as f64 / p.1 as f64).sum::<f64>() / present.len() as f64;
    // One-vs-rest AUC of each class's score column.
    let aucs: Vec<f64> = (0..c)
        .filter_map(|k| {
            let (mut pos, mut neg) = (Vec::new(), Vec::new());
            for &i in &valid {
                let v = scores[i][k];
                if labels[i] as usize == k {
                    pos.push(v)
                } else {
                    neg.push(v)
                }
            }
            (!pos.is_empty() && !neg.is_empty()).then(|| auc(&pos, &neg))
        })
        .collect();
    let n = valid.len() as f64;
    Ok(ZeroShot {
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        balanced_accuracy: balanced,
        macro_auc: if aucs.is_empty() {
            f64::NAN
        } else {
            aucs.iter().sum::<f64>() / aucs.len() as f64
        },
    })
}

/// ROC AUC = P(score of a positive > score of a negative), ties counting ½ (Mann–Whitney).
pub fn auc(pos: &[f32], neg: &[f32]) -> f64 {
    let mut sorted_neg = neg.to_vec();
    sorted_neg.sort_by(|a, b| a.total_cmp(b));
    let mut wins = 0.0;
    for &p in pos {
        let below = sorted_neg.partition_point(|&v| v < p);
        let upto = sorted_neg.partition_point(|&v| v <= p);
        wins += below as f64 + 0.5 * (upto - below) as f64;
    }
    wins / (pos.len() as f64 * neg.len() as f64)
}

/// Retrieval between `images` `[ni, d]` and `texts` `[nt, d]`, where `text_image[t]` is the
/// image caption `t` belongs to (several captions per image allowed). Image → text counts a hit
/// when any of the image's captions is in the top k.
pub fn retrieval(
    images: &[f32],
    texts: &[f32],
    text_image: &[usize],
    d: usize,
) -> Result<Retrieval> {
    let ni = images.len() / d;
    let nt = texts.len() / d;
    if text_image.len() != nt || ni == 0 || nt == 0 {
        bail!(
            "retrieval: {nt} captions but {} caption→image links, {ni} images",
            text_image.len()
        );
    }
    if let Some(t) = text_image.iter().position(|&i| i >= ni) {
        bail!(
            "retrieval: caption {t} points at image {} of {ni}",
            text_image[t]
        );
    }
    let im = normalize_rows(images, d);
    let tx = normalize_rows(texts, d);
    let sim = |i: usize, t: usize| dot(&im[i * d..(i + 1) * d], &tx[t * d..(t + 1) * d]);
    let ks = [1usize, 5, 10];
    let mut i2t = [0.0; 3];
    let mut t2i = [0.0; 3];
    for i in 0..ni {
        let s: Vec<f32> = (0..nt).map(|t| sim(i, t)).collect();
        // Best-ranked own caption: number of other captions strictly above it.
        let best = (0..nt)
            .filter(|&t| text_image[t] == i)
            .map(|t| s.iter().filter(|&&v| v > s[t]).count())
            .min();
        if let Some(r) = best {
            for (h, &k) in i2t.iter_mut().zip(&ks) {
                *h += (r < k) as u8 as f64;
            }
        }
    }
    let with_caption = (0..ni).filter(|i| text_image.contains(i)).count().max(1) as f64;
    for (t, &own) in text_image.iter().enumerate() {
        let s: Vec<f32> = (0..ni).map(|i| sim(i, t)).collect();
        let r = s.iter().filter(|&&v| v > s[own]).count();
        for (h, &k) in t2i.iter_mut().zip(&ks) {
            *h += (r < k) as u8 as f64;
        }
    }
    i2t.iter_mut().for_each(|v| *v /= with_caption);
    t2i.iter_mut().for_each(|v| *v /= nt as f64);
    Ok(Retrieval { i2t, t2i })
}

/// Multinomial logistic regression (softmax + bias) on `x` `[n, d]`, full-batch gradient descent
/// with Adam for a fixed number of iterations; returns weights `[classes, d + 1]`.
///
/// Each iteration is two matrix products in f64 (the logits `X Wᵀ` and the gradient `Pᵀ X`,
/// with `P` the softmax less the one-hot labels, over n), not per-sample loops.
pub fn fit_logistic(
    x: &[f32],
    y: &[i32],
    d: usize,
    classes: usize,
    l2: f64,
    iters: usize,
) -> Vec<f64> {
    let n = y.len();
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let stride = d + 1;
    let w_len = classes * stride;
    let mut w = vec![0.0f64; w_len];
    let (mut m, mut v) = (vec![0.0f64; w_len], vec![0.0f64; w_len]);
    let (b1, b2, lr, eps) = (0.9, 0.999, 0.05, 1e-8);
    let mut g = vec![0.0f64; w_len];
    let mut p = vec![0.0f64; n * classes];
    let inv_n = 1.0 / n as f64;
    for it in 1..=iters {
        // P (n, classes) = X (n, d) · W[:, ..d]ᵀ; W's rows are d + 1 long (weights, then bias).
        let wt = Mat {
            data: &w,
            rs: 1,
            cs: stride,
        };
        gemm(
            n,
            classes,
            d,
            &mut p,
            classes,
            Mat::rm(&xd, d),
            wt,
            false,
            true,
        );
        for (i, row) in p.chunks_exact_mut(classes).enumerate() {
            for (c, z) in row.iter_mut().enumerate() {
                *z += w[c * stride + d];
            }
            softmax(row);
            row[y[i] as usize] -= 1.0;
            row.iter_mut().for_each(|z| *z *= inv_n);
        }
        // g[:, ..d] = Pᵀ (classes, n) · X (n, d); the bias gradients are P's column sums.
        gemm(
            classes,
            d,
            n,
            &mut g,
            stride,
            Mat::rm_t(&p, classes),
            Mat::rm(&xd, d),
            false,
            true,
        );
        for c in 0..classes {
            g[c * stride + d] = p.chunks_exact(classes).map(|row| row[c]).sum();
            for k in 0..d {
                g[c * stride + k] += l2 * w[c * stride + k];
            }
        }
        let (bc1, bc2) = (
            1.0 - f64::powi(b1, it as i32),
            1.0 - f64::powi(b2, it as i32),
        );
        for k in 0..w_len {
            m[k] = b1 * m[k] + (1.0 - b1) * g[k];
            v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
            w[k] -= lr * (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps);
        }
    }
    w
}

fn logits(w: &[f64], x: &[f32], d: usize, out: &mut [f64]) {
    for (c, o) in out.iter_mut().enumerate() {
        let wc = &w[c * (d + 1)..(c + 1) * (d + 1)];
        *o = wc[d]
            + wc[..d]
                .iter()
                .zip(x)
                .map(|(a, &b)| a * b as f64)
                .sum::<f64>();
    }
}

fn softmax(p: &mut [f64]) {
    let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = p
        .iter_mut()
        .map(|v| {
            *v = (*v - m).exp();
            *v
        })
        .sum();
    p.iter_mut().for_each(|v| *v /= s);
}

/// Accuracy of logistic weights on `x`, `y`.
pub fn logistic_accuracy(w: &[f64], x: &[f32], y: &[i32], d: usize, classes: usize) -> f64 {
    let mut p = vec![0.0; classes];
    let hits = (0..y.len())
        .filter(|&i| {
            logits(w, &x[i * d..(i + 1) * d], d, &mut p);
            let arg = (0..classes).fold(0, |b, c| if p[c] > p[b] { c } else { b });
            arg == y[i] as usize
        })
        .count();
    hits as f64 / y.len().max(1) as f64
}

/// Linear probe on frozen, L2-normalised features: fits on `train`, picks the L2 weight from a
/// grid by accuracy on `val`, reports accuracy on `test`. Each split is `(features, labels)`.
pub fn linear_probe(
    train: (&[f32], &[i32]),
    val: (&[f32], &[i32]),
    test: (&[f32], &[i32]),
    d: usize,
    classes: usize,
) -> Result<Probe> {
    for (name, (x, y)) in [("train", train), ("val", val), ("test", test)] {
        if x.len() != y.len() * d || y.is_empty() {
            bail!(
                "linear probe {name} split: {} values for {} labels of width {d}",
                x.len(),
                y.len()
            );
        }
        if let Some(i) = y.iter().position(|&l| l < 0 || l as usize >= classes) {
            bail!(
                "linear probe {name} split: sample {i} has label {} outside 0..{classes}",
                y[i]
            );
        }
    }
    let (tx, vx, sx) = (
        normalize_rows(train.0, d),
        normalize_rows(val.0, d),
        normalize_rows(test.0, d),
    );
    let mut best: Option<(f64, f64)> = None;
    for l2 in [1e-5, 1e-4, 1e-3, 1e-2, 1e-1] {
        let w = fit_logistic(&tx, train.1, d, classes, l2, 200);
        let acc = logistic_accuracy(&w, &vx, val.1, d, classes);
        if best.is_none_or(|(a, _)| acc > a) {
            best = Some((acc, l2));
        }
    }
    let (val_accuracy, l2) = best.unwrap_or((0.0, 1e-3));
    let w = fit_logistic(&tx, train.1, d, classes, l2, 200);
    Ok(Probe {
        accuracy: logistic_accuracy(&w, &sx, test.1, d, classes),
        l2,
        val_accuracy,
    })
}

// ---- evaluation of a student or a teacher on a packed, labelled dataset ----

use crate::model::ClipModel;
use crate::tensor::Tensor;
use mmkd_loaders::batch::{BatchConfig, BatchLoader, TeacherMode as LoadMode};
use mmkd_loaders::{Dataset, Tower};

/// The three headline numbers plus the detail behind them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Who was evaluated (`student` or a teacher name).
    pub name: String,
    /// Samples used.
    pub samples: usize,
    /// Zero-shot metrics.
    pub zero_shot: ZeroShot,
    /// How the class classifier was built (prompt ensemble, or caption class means for teachers
    /// whose text encoders are not available).
    pub zero_shot_protocol: String,
    /// Retrieval.
    pub retrieval: Retrieval,
    /// Linear probe.
    pub probe: Probe,
}

/// Features of a dataset: image and text rows, labels.
pub struct Features {
    /// `[n, d]` image features.
    pub image: Vec<f32>,
    /// `[n, d]` caption features.
    pub text: Vec<f32>,
    /// Labels (`-1` = none).
    pub labels: Vec<i32>,
    /// Width.
    pub dim: usize,
}

/// Student features of every sample of `ds`, in dataset order.
pub fn student_features(
    model: &ClipModel,
    ds: &std::sync::Arc<Dataset>,
    batch: usize,
) -> Result<Features> {
    let cfg = BatchConfig {
        batch_size: batch,
        shuffle: false,
        epochs: 1,
        drop_last: false,
        workers: 1,
        output_size: Some(model.config.vision.image_size),
        teachers: LoadMode::None,
        ..BatchConfig::default()
    };
    let mut loader = BatchLoader::new(ds.clone(), cfg)?;
    let (mut image, mut text, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(b) = loader.next_batch()? {
        let s = b.image_size;
        let imgs = b
            .images_f32()
            .ok_or_else(|| anyhow::anyhow!("batch images are not f32"))?;
        let im = Tensor::from_f32(imgs.to_vec(), &[b.size, 3, s, s])?;
        let tok = Tensor::from_u32(b.tokens().to_vec(), &[b.size, b.token_len])?;
        let len: Vec<usize> = b.lengths().iter().map(|&l| l as usize).collect();
        image.extend_from_slice(model.embed_images(&im)?.as_f32()?);
        text.extend_from_slice(model.embed_texts(&tok, &len)?.as_f32()?);
        labels.extend_from_slice(b.labels());
    }
    Ok(Features {
        image,
        text,
        labels,
        dim: model.config.embed_dim,
    })
}

/// Student text embeddings of every (class, template) prompt, `[C, P, d]`, tokenised with the
/// dataset's tokenizer.
pub fn prompt_features(model: &ClipModel, ds: &Dataset) -> Result<(Vec<f32>, usize, usize)> {
    let m = ds.manifest();
    let templates: Vec<String> = if m.templates.is_empty() {
        vec!["{}".into()]
    } else {
        m.templates.clone()
    };
    if m.classes.is_empty() {
        bail!(
            "{}: the manifest lists no classes; zero-shot needs class names",
            ds.dir().display()
        );
    }
    let tok = mmkd_loaders::tokenizer::load(&ds.tokenizer_path())?;
    let ctx = model.config.text.context_length.min(ds.context_length());
    let mut rows = Vec::new();
    for c in &m.classes {
        for t in &templates {
            rows.push(mmkd_loaders::tokenizer::encode(&tok, &t.replace("{}", c), ctx)?.0);
        }
    }
    let mut out = Vec::new();
    for chunk in rows.chunks(64) {
        let l = chunk.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; chunk.len() * l];
        for (i, r) in chunk.iter().enumerate() {
            ids[i * l..i * l + r.len()].copy_from_slice(r);
        }
        let lens: Vec<usize> = chunk.iter().map(|r| r.len()).collect();
        let t = Tensor::from_u32(ids, &[chunk.len(), l])?;
        out.extend_from_slice(model.embed_texts(&t, &lens)?.as_f32()?);
    }
    Ok((out, m.classes.len(), templates.len()))
}

/// Stored projected features of teacher `name` for the samples where it is available.
pub fn teacher_features(ds: &Dataset, name: &str) -> Result<Features> {
    let m = ds.manifest();
    let t = m
        .teachers
        .iter()
        .position(|x| x.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = m.teachers.iter().map(|x| x.name.as_str()).collect();
            anyhow::anyhow!(
                "{}: no teacher `{name}` (have {names:?})",
                ds.dir().display()
            )
        })?;
    let d = m.proj_dim;
    let (mut image, mut text, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0.0f32; d];
    for i in 0..ds.len() {
        if ds.available(i)? & (1 << t) == 0 {
            continue;
        }
        ds.proj_into(i, t, Tower::Image, &mut buf)?;
        image.extend_from_slice(&buf);
        ds.proj_into(i, t, Tower::Text, &mut buf)?;
        text.extend_from_slice(&buf);
        labels.push(ds.label(i)?);
    }
    Ok(Features {
        image,
        text,
        labels,
        dim: d,
    })
}

/// The deterministic split of the evaluation samples: by position modulo 10, 0–4 probe-train,
/// 5–6 probe-validation, 7–9 test (zero-shot and retrieval use every sample).
pub fn split_of(position: usize) -> usize {
    match position % 10 {
        0..=4 => 0,
        5..=6 => 1,
        _ => 2,
    }
}

/// Zero-shot, retrieval and linear probe on `f`. `classifier` is `[C, d]`; `None` builds it
/// from the class means of the probe-train split's caption features (for teachers, whose text
/// encoders are not at hand).
pub fn evaluate(
    name: &str,
    f: &Features,
    classifier: Option<Vec<f32>>,
    classes: usize,
) -> Result<Report> {
    let d = f.dim;
    let n = f.labels.len();
    if n == 0 {
        bail!("{name}: no samples to evaluate");
    }
    let (classifier, protocol) = match classifier {
        Some(c) => (c, "prompt ensemble (classes × templates)".to_string()),
        None => {
            let t = normalize_rows(&f.text, d);
            let mut c = vec![0.0f32; classes * d];
            for i in (0..n).filter(|&i| split_of(i) == 0 && f.labels[i] >= 0) {
                let y = f.labels[i] as usize;
                c[y * d..(y + 1) * d]
                    .iter_mut()
                    .zip(&t[i * d..(i + 1) * d])
                    .for_each(|(o, v)| *o += v);
            }
            (
                normalize_rows(&c, d),
                "class means of probe-train caption features".to_string(),
            )
        }
    };
    let zero_shot = zero_shot(&f.image, &classifier, &f.labels, d)?;
    let links: Vec<usize> = (0..n).collect();
    let retrieval = retrieval(&f.image, &f.text, &links, d)?;
    let pick = |s: usize| {
        let idx: Vec<usize> = (0..n)
            .filter(|&i| split_of(i) == s && f.labels[i] >= 0)
            .collect();
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| f.image[i * d..(i + 1) * d].to_vec())
            .collect();
        let y: Vec<i32> = idx.iter().map(|&i| f.labels[i]).collect();
        (x, y)
    };
    let (a, b, c) = (pick(0), pick(1), pick(2));
    let probe = linear_probe((&a.0, &a.1), (&b.0, &b.1), (&c.0, &c.1), d, classes)?;
    Ok(Report {
        name: name.to_string(),
        samples: n,
        zero_shot,
        zero_shot_protocol: protocol,
        retrieval,
        probe,
    })
}
