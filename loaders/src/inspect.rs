//! `inspect`: a dataset's manifest, counts and one sample, as a stable JSON-able report.

use crate::dataset::{Dataset, Manifest, Tower};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;

/// One sample as `inspect` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SampleReport {
    pub index: u64,
    pub id: String,
    pub caption: String,
    pub label: i32,
    pub class_name: Option<String>,
    pub tokens: Vec<u32>,
    pub available_teachers: Vec<String>,
    /// Per available teacher: name, projected image/text features, their L2 norms, raw width.
    pub features: Vec<FeatureReport>,
    /// Mean of each image channel (0..255).
    pub image_channel_means: [f64; 3],
}

/// One teacher's features of one sample.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureReport {
    pub teacher: String,
    pub proj_image: Vec<f32>,
    pub proj_text: Vec<f32>,
    pub proj_image_norm: f32,
    pub proj_text_norm: f32,
    pub raw_dim: usize,
    pub raw_image_norm: f32,
    pub raw_text_norm: f32,
}

/// What `inspect` reports.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub dir: String,
    pub manifest: Manifest,
    pub checksums_verified: bool,
    /// Samples per label (index = label), when labelled.
    pub label_counts: Vec<u64>,
    pub sample: Option<SampleReport>,
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Opens `dir` (verifying checksums when `verify`) and reports on it and on `sample`.
pub fn inspect(dir: &Path, sample: Option<u64>, verify: bool) -> Result<InspectReport> {
    let ds = Dataset::open_with(dir, verify)?;
    let m = ds.manifest().clone();
    let mut label_counts = vec![0u64; m.classes.len()];
    if m.has_labels {
        for i in 0..ds.len() {
            let l = ds.label(i)?;
            if l >= 0 && (l as usize) < label_counts.len() {
                label_counts[l as usize] += 1;
            }
        }
    }
    let sample = match sample {
        None => None,
        Some(i) => {
            let s = ds.sample(i)?;
            let mut features = Vec::new();
            let mut names = Vec::new();
            for (t, ti) in m.teachers.iter().enumerate() {
                if s.available >> t & 1 == 0 {
                    continue;
                }
                names.push(ti.name.clone());
                let ri = ds.raw(i, t, Tower::Image)?;
                let rt = ds.raw(i, t, Tower::Text)?;
                features.push(FeatureReport {
                    teacher: ti.name.clone(),
                    proj_image_norm: norm(&s.proj_image[t]),
                    proj_text_norm: norm(&s.proj_text[t]),
                    proj_image: s.proj_image[t].clone(),
                    proj_text: s.proj_text[t].clone(),
                    raw_dim: ti.raw_dim,
                    raw_image_norm: norm(&ri),
                    raw_text_norm: norm(&rt),
                });
            }
            let plane = s.image.len() / 3;
            let mut means = [0f64; 3];
            for (c, m) in means.iter_mut().enumerate() {
                *m = s.image[c * plane..(c + 1) * plane]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    / plane.max(1) as f64;
            }
            Some(SampleReport {
                index: i,
                class_name: usize::try_from(s.label)
                    .ok()
                    .and_then(|l| m.classes.get(l).cloned()),
                id: s.id,
                caption: s.caption,
                label: s.label,
                tokens: s.tokens,
                available_teachers: names,
                features,
                image_channel_means: means,
            })
        }
    };
    Ok(InspectReport {
        dir: dir.display().to_string(),
        manifest: m,
        checksums_verified: verify,
        label_counts,
        sample,
    })
}
