//! `synth`: deterministic, procedural biomedical-flavoured data in the MMKD-CLIP release layout,
//! so the main job needs no downloads and the real importer is what reads it.
//!
//! Each sample has a modality (x-ray-, histology-, fundus- or dermoscopy-like texture) and a
//! finding (none, focal lesion, scattered spots, streaks) drawn as a subtle, noisy overlay (spots
//! and streaks keep a minimum size in pixels so small images still show them); the class is the
//! (modality, finding) pair. Captions are templated, and like real ones most of them do not
//! state the finding, while the expert teachers' features encode it. Synthetic teachers
//! embed every sample in a shared 512-d latent around a class prototype: cleanly on the
//! modalities they are expert in, noisily (and sometimes with a confused finding) elsewhere.
//! A teacher's image and text embeddings of one sample share a sample-specific component, as
//! paired embeddings of a real CLIP do. Projected features have norms in [1.6, 2.4] as in the
//! release; raw features are a fixed linear image of the latent at the teacher's native width,
//! normalised to unit length.

use crate::pt::{self, PtDtype, PtTensor};
use anyhow::{Context, Result};
use image::ImageEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::f32::consts::PI;
use std::path::{Path, PathBuf};

/// Options of [`synth`].
#[derive(Clone, Debug, Serialize)]
pub struct SynthOptions {
    pub out: PathBuf,
    /// Samples in `OUT/train`.
    pub train: usize,
    /// Samples in `OUT/eval` (held out, same classes and teachers).
    pub eval: usize,
    /// Side of the written images in pixels (pack resizes them).
    pub image_size: usize,
    pub seed: u64,
    /// Peak intensity change (0..255 scale) of the finding overlay; per-pixel noise is about
    /// ±7 plus a textured ±7, so the default 70 is clearly visible to a small ViT at 64 px.
    pub finding_amplitude: f32,
}

impl SynthOptions {
    /// Defaults: 2000 train, 500 eval, 256 px images, seed 0.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        SynthOptions {
            out: out.into(),
            train: 2000,
            eval: 500,
            image_size: 256,
            seed: 0,
            finding_amplitude: 70.0,
        }
    }
}

/// What [`synth`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SynthSummary {
    pub train_dir: PathBuf,
    pub eval_dir: PathBuf,
    pub train: usize,
    pub eval: usize,
    pub classes: Vec<String>,
    pub teachers: Vec<(String, usize)>,
    pub seconds: f64,
}

/// Modalities: (caption phrase, short name).
pub const MODALITIES: [&str; 4] = [
    "chest x-ray",
    "histopathology slide",
    "retinal fundus photograph",
    "dermoscopy image",
];
/// Finding phrases per modality, indexed by finding kind (none, focal, spots, streaks).
pub const FINDINGS: [[&str; 4]; 4] = [
    [
        "clear lungs",
        "a pulmonary nodule",
        "miliary opacities",
        "linear atelectasis",
    ],
    [
        "normal tissue",
        "a tumor nest",
        "lymphocytic infiltrate",
        "fibrotic bands",
    ],
    [
        "a healthy retina",
        "a choroidal lesion",
        "scattered drusen",
        "retinal hemorrhage streaks",
    ],
    [
        "benign skin",
        "a pigmented nodule",
        "scattered globules",
        "radial streaks",
    ],
];
/// Zero-shot prompt templates (`{}` is the class name).
pub const TEMPLATES: [&str; 3] = ["{}.", "a biomedical image of {}.", "this image shows {}."];
/// Synthetic teachers: (name, native width, availability probability, expert modalities).
pub const TEACHERS: [(&str, usize, f64, &[usize]); 4] = [
    ("BiomedCLIP", 512, 0.8, &[0, 1, 2]),
    ("PMCCLIP", 768, 0.6, &[0, 3]),
    ("QuiltNet", 512, 0.5, &[1]),
    ("UniMedCLIP", 768, 0.7, &[0, 2, 3]),
];
const LATENT: usize = 512;

/// Class index of (modality, finding).
pub fn class_index(modality: usize, finding: usize) -> usize {
    modality * 4 + finding
}

/// Class names, indexed by label.
pub fn class_names() -> Vec<String> {
    let mut v = Vec::new();
    for (m, fs) in MODALITIES.iter().zip(FINDINGS.iter()) {
        for f in fs {
            v.push(format!("{m} with {f}"));
        }
    }
    v
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 finaliser: decorrelates nearby seeds.
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn gauss(r: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = r.gen_range(1e-7f32..1.0);
    let u2: f32 = r.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

fn unit(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| gauss(r)).collect();
    normalize(&mut v);
    v
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Fixed parameters shared by both splits.
struct World {
    protos: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
    /// Per teacher: for each raw dimension, (latent index a, latent index b, weight of b, sign).
    raw_maps: Vec<Vec<(usize, usize, f32, f32)>>,
}

impl World {
    fn new(seed: u64) -> World {
        let mut r = ChaCha8Rng::seed_from_u64(mix(seed, 0xC1A5));
        let mods: Vec<Vec<f32>> = (0..4).map(|_| unit(&mut r, LATENT)).collect();
        let mut protos = Vec::new();
        for m in mods.iter() {
            for _ in 0..4 {
                let f = unit(&mut r, LATENT);
                let mut p: Vec<f32> = m.iter().zip(&f).map(|(a, b)| 0.6 * a + 0.8 * b).collect();
                normalize(&mut p);
                protos.push(p);
            }
        }
        let biases = TEACHERS.iter().map(|_| unit(&mut r, LATENT)).collect();
        let raw_maps = TEACHERS
            .iter()
            .map(|&(_, w, _, _)| {
                (0..w)
                    .map(|j| {
                        (
                            j % LATENT,
                            r.gen_range(0..LATENT),
                            if j < LATENT { 0.3 } else { 1.0 },
                            if r.gen::<bool>() { 1.0 } else { -1.0 },
                        )
                    })
                    .collect()
            })
            .collect();
        World {
            protos,
            biases,
            raw_maps,
        }
    }
}

/// Writes `OUT/train` and `OUT/eval` (each `meta.jsonl`, `images/`, `features/`, `classes.txt`,
/// `templates.txt`) plus `OUT/classes.txt` and `OUT/templates.txt`.
pub fn synth(opts: &SynthOptions) -> Result<SynthSummary> {
    let t0 = std::time::Instant::now();
    if opts.image_size < 32 {
        anyhow::bail!(
            "synth image size {} is too small (at least 32)",
            opts.image_size
        );
    }
    let world = World::new(opts.seed);
    let classes = class_names();
    let class_txt = classes.join("\n") + "\n";
    let tmpl_txt = TEMPLATES.join("\n") + "\n";
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    std::fs::write(opts.out.join("classes.txt"), &class_txt)?;
    std::fs::write(opts.out.join("templates.txt"), &tmpl_txt)?;
    let mut dirs = Vec::new();
    for (split, n, salt) in [("train", opts.train, 1u64), ("eval", opts.eval, 2u64)] {
        let dir = opts.out.join(split);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("classes.txt"), &class_txt)?;
        std::fs::write(dir.join("templates.txt"), &tmpl_txt)?;
        let lines: Vec<String> = (0..n)
            .into_par_iter()
            .map(|i| {
                write_sample(
                    &dir,
                    split,
                    i,
                    mix(opts.seed, salt) ^ i as u64,
                    opts,
                    &world,
                )
            })
            .collect::<Result<_>>()?;
        let mut meta = lines.join("\n");
        meta.push('\n');
        crate::shard::write_atomic(&dir.join("meta.jsonl"), meta.as_bytes())?;
        dirs.push(dir);
    }
    Ok(SynthSummary {
        train_dir: dirs[0].clone(),
        eval_dir: dirs[1].clone(),
        train: opts.train,
        eval: opts.eval,
        classes,
        teachers: TEACHERS.iter().map(|t| (t.0.to_string(), t.1)).collect(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn write_sample(
    dir: &Path,
    split: &str,
    i: usize,
    seed: u64,
    opts: &SynthOptions,
    world: &World,
) -> Result<String> {
    let size = opts.image_size;
    let mut r = ChaCha8Rng::seed_from_u64(mix(seed, 0x5A11));
    let modality = r.gen_range(0..4usize);
    let finding = r.gen_range(0..4usize);
    let class = class_index(modality, finding);
    let (img, loc) = render(&mut r, modality, finding, size, opts.finding_amplitude);
    let caption = caption(&mut r, modality, finding, loc);
    let folder = format!("{split}{:04}", i / 500);
    let id = format!("{split}-{i:06}");
    let imgrel = format!("images/{folder}/{id}.jpg");
    let imgpath = dir.join(&imgrel);
    if let Some(p) = imgpath.parent() {
        std::fs::create_dir_all(p)?;
    }
    let mut jpg = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90);
    if modality == 0 {
        // X-rays are stored as single-channel JPEGs, as real ones usually are.
        let gray: Vec<u8> = img.chunks_exact(3).map(|p| p[0]).collect();
        enc.write_image(
            &gray,
            size as u32,
            size as u32,
            image::ExtendedColorType::L8,
        )
        .context("encoding image")?;
    } else {
        enc.write_image(
            &img,
            size as u32,
            size as u32,
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding image")?;
    }
    std::fs::write(&imgpath, &jpg).with_context(|| format!("writing {}", imgpath.display()))?;

    // Teacher availability: independent draws, at least one teacher per sample.
    let mut avail: Vec<usize> = (0..TEACHERS.len())
        .filter(|&t| r.gen_bool(TEACHERS[t].2))
        .collect();
    if avail.is_empty() {
        avail.push(r.gen_range(0..TEACHERS.len()));
    }
    let shared = unit(&mut r, LATENT);
    let mut proj = Vec::new();
    let mut raw = Vec::new();
    for &t in &avail {
        let (name, width, _, expert) = TEACHERS[t];
        let is_expert = expert.contains(&modality);
        let k = if !is_expert && r.gen_bool(0.35) {
            class_index(modality, r.gen_range(0..4))
        } else {
            class
        };
        let sigma = if is_expert { 0.3 } else { 1.0 };
        for tower in ["img", "txt"] {
            let n = unit(&mut r, LATENT);
            let mut z: Vec<f32> = (0..LATENT)
                .map(|j| {
                    world.protos[k][j]
                        + 0.25 * world.biases[t][j]
                        + sigma * (0.5 * shared[j] + 0.85 * n[j])
                })
                .collect();
            normalize(&mut z);
            let norm = r.gen_range(1.6f32..2.4);
            let p: Vec<f32> = z.iter().map(|x| x * norm).collect();
            let mut w: Vec<f32> = world.raw_maps[t]
                .iter()
                .map(|&(a, b, wb, s)| s * (z[a] + wb * z[b]))
                .collect();
            normalize(&mut w);
            debug_assert_eq!(w.len(), width);
            let key = format!("{name}_{tower}");
            proj.push((
                key.clone(),
                PtTensor {
                    dtype: PtDtype::F32,
                    shape: vec![LATENT],
                    data: p,
                },
            ));
            raw.push((
                key,
                PtTensor {
                    dtype: PtDtype::F32,
                    shape: vec![width],
                    data: w,
                },
            ));
        }
    }
    let fdir = dir.join("features").join(&folder).join(&id);
    std::fs::create_dir_all(&fdir)?;
    std::fs::write(
        fdir.join("clips_project_output.pt"),
        pt::write_pt_bytes("archive", &proj, false)?,
    )?;
    std::fs::write(
        fdir.join("clips_output.pt"),
        pt::write_pt_bytes("archive", &raw, false)?,
    )?;
    let names: Vec<&str> = avail.iter().map(|&t| TEACHERS[t].0).collect();
    Ok(serde_json::json!({
        "folderid": folder, "id": id, "imgpath": imgrel, "metapath": format!("meta/{folder}/{id}.json"),
        "txt": caption, "available_clips": names, "label": class,
    })
    .to_string())
}

/// Generic captions per modality: they name the modality (or not even that) but not the finding.
const GENERIC: [[&str; 3]; 4] = [
    [
        "chest radiograph, PA view.",
        "chest x-ray.",
        "portable study, frontal projection.",
    ],
    [
        "histology image, H&E stain.",
        "histopathology slide.",
        "tissue section, 20x.",
    ],
    [
        "retinal fundus photograph.",
        "fundus image, macula centred.",
        "colour photograph of the eye.",
    ],
    [
        "dermoscopy image.",
        "dermoscopic view of a skin lesion.",
        "skin lesion, polarised light.",
    ],
];

/// Caption of a sample. As in real figure captions and reports, most do not state the finding:
/// 30% name it (with its location), 15% are vague (normal or "an abnormality"), 55% are
/// generic and name only the modality, or nothing but the acquisition.
fn caption(r: &mut ChaCha8Rng, modality: usize, finding: usize, loc: &str) -> String {
    let m = MODALITIES[modality];
    let f = FINDINGS[modality][finding];
    let lead = ["", "representative ", "routine ", "follow-up "][r.gen_range(0..4)];
    let tail = [
        "",
        " quality is adequate.",
        " compare with prior study.",
        " no further comment.",
    ][r.gen_range(0..4)];
    let kind: f64 = r.gen();
    let body = if kind >= 0.45 {
        GENERIC[modality][r.gen_range(0..3)].to_string()
    } else if kind >= 0.30 {
        if finding == 0 {
            format!("{lead}{m}, unremarkable.")
        } else {
            format!("{lead}{m} with an abnormality in the {loc} region.")
        }
    } else if finding == 0 {
        match r.gen_range(0..3) {
            0 => format!("{lead}{m} showing {f}."),
            1 => format!("{lead}{m}: {f}, no focal abnormality."),
            _ => format!("{f} on this {m}."),
        }
    } else {
        match r.gen_range(0..3) {
            0 => format!("{lead}{m} showing {f} in the {loc} region."),
            1 => format!("{lead}{m}: {f}, {loc}."),
            _ => format!("{f} seen in the {loc} area of this {m}."),
        }
    };
    format!("{body}{tail}").trim().to_string()
}

/// Smooth value noise: a `g × g` random grid bilinearly upsampled to `size × size`.
fn value_noise(r: &mut ChaCha8Rng, g: usize, size: usize) -> Vec<f32> {
    let grid: Vec<f32> = (0..(g + 1) * (g + 1))
        .map(|_| r.gen::<f32>() * 2.0 - 1.0)
        .collect();
    let mut out = vec![0f32; size * size];
    let s = g as f32 / size as f32;
    for y in 0..size {
        let fy = y as f32 * s;
        let y0 = fy as usize;
        let ty = fy - y0 as f32;
        for x in 0..size {
            let fx = x as f32 * s;
            let x0 = fx as usize;
            let tx = fx - x0 as f32;
            let a = grid[y0 * (g + 1) + x0] * (1.0 - tx) + grid[y0 * (g + 1) + x0 + 1] * tx;
            let b =
                grid[(y0 + 1) * (g + 1) + x0] * (1.0 - tx) + grid[(y0 + 1) * (g + 1) + x0 + 1] * tx;
            out[y * size + x] = a * (1.0 - ty) + b * ty;
        }
    }
    out
}

/// Renders an interleaved RGB image and the finding's location word.
fn render(
    r: &mut ChaCha8Rng,
    modality: usize,
    finding: usize,
    size: usize,
    amp: f32,
) -> (Vec<u8>, &'static str) {
    let sz = size as f32;
    let low = value_noise(r, 4, size);
    let mid = value_noise(r, 16, size);
    let high = value_noise(r, 48.min(size / 2), size);
    // Base texture per modality, as (r, g, b) in 0..255 floats.
    let mut px = vec![[0f32; 3]; size * size];
    let phase: f32 = r.gen_range(0.0..std::f32::consts::TAU);
    for y in 0..size {
        for x in 0..size {
            let k = y * size + x;
            let (u, v) = (x as f32 / sz - 0.5, y as f32 / sz - 0.5);
            px[k] = match modality {
                0 => {
                    // Bright mediastinum, two darker lung fields, faint rib bands.
                    let lung = (-(((u.abs() - 0.2) / 0.16).powi(2) + (v / 0.33).powi(2))).exp();
                    let ribs = 0.5 + 0.5 * (v * 40.0 + phase + 3.0 * u * u).sin();
                    let g =
                        170.0 - 90.0 * lung + 18.0 * ribs * lung + 25.0 * low[k] + 10.0 * mid[k]
                            - 40.0 * v;
                    [g, g, g]
                }
                1 => {
                    // Pink stroma with purple nuclei where high-frequency noise peaks.
                    let nuc = ((high[k] + 0.3 * mid[k]) - 0.45).max(0.0) * 4.0;
                    let nuc = nuc.min(1.0);
                    [
                        225.0 - 90.0 * nuc + 15.0 * low[k],
                        170.0 - 100.0 * nuc + 15.0 * mid[k],
                        200.0 - 30.0 * nuc + 10.0 * low[k],
                    ]
                }
                2 => {
                    // Orange disc with a dark rim, a bright optic disc and wavy vessels.
                    let d = (u * u + v * v).sqrt();
                    let rim = ((0.48 - d) * 20.0).clamp(0.0, 1.0);
                    let od = (-((u - 0.18).powi(2) + v * v) / 0.004).exp();
                    let vessel = (-(((v - 0.08 * (u * 9.0 + phase).sin()).abs() * 60.0).powi(2)))
                        .exp()
                        + (-(((u + 0.1 * (v * 7.0 + phase).cos()).abs() * 60.0).powi(2))).exp();
                    let b = rim * (1.0 - 0.3 * d);
                    [
                        b * (200.0 + 50.0 * od - 60.0 * vessel + 15.0 * low[k]),
                        b * (90.0 + 120.0 * od - 40.0 * vessel + 10.0 * mid[k]),
                        b * (40.0 + 100.0 * od),
                    ]
                }
                _ => {
                    // Skin tone with a central brown lesion of irregular border.
                    let d = (u * u + v * v).sqrt() + 0.08 * low[k];
                    let les = ((0.25 - d) * 25.0).clamp(0.0, 1.0);
                    [
                        215.0 - 90.0 * les + 12.0 * mid[k],
                        170.0 - 90.0 * les + 10.0 * mid[k],
                        150.0 - 80.0 * les + 10.0 * high[k],
                    ]
                }
            };
        }
    }
    // Finding overlay: a faint change of intensity in a mask; its colour direction depends on
    // the modality so it reads as the right kind of finding.
    let dir: [f32; 3] = match modality {
        0 => [1.0, 1.0, 1.0],
        1 => [-0.6, -1.0, -0.2],
        2 => [0.8, -0.6, -0.4],
        _ => [-1.0, -0.8, -0.7],
    };
    let cx = r.gen_range(0.25f32..0.75) * sz;
    let cy = r.gen_range(0.25f32..0.75) * sz;
    let loc = match (cx < sz / 2.0, cy < sz / 2.0) {
        (true, true) => "upper left",
        (false, true) => "upper right",
        (true, false) => "lower left",
        (false, false) => "lower right",
    };
    let mut add = |k: usize, w: f32| {
        for c in 0..3 {
            px[k][c] += amp * w * dir[c];
        }
    };
    match finding {
        1 => {
            let rad = sz * r.gen_range(0.07f32..0.11);
            blob(size, cx, cy, rad, &mut add);
        }
        2 => {
            for _ in 0..14 {
                let x = r.gen_range(0.1f32..0.9) * sz;
                let y = r.gen_range(0.1f32..0.9) * sz;
                blob(size, x, y, (sz * 0.022).max(2.2), &mut add);
            }
        }
        3 => {
            let a: f32 = r.gen_range(0.0..PI);
            let (s, c) = a.sin_cos();
            let spacing = (sz * 0.07).max(5.0);
            let width = (sz * 0.012).max(1.3);
            for y in 0..size {
                for x in 0..size {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let along = dx * c + dy * s;
                    let across = -dx * s + dy * c;
                    if along.abs() > sz * 0.22 || across.abs() > spacing * 1.5 + width {
                        continue;
                    }
                    let m = (across / spacing).round();
                    let d = (across - m * spacing).abs();
                    add(y * size + x, (1.0 - d / width).max(0.0));
                }
            }
        }
        _ => {}
    }
    // Per-pixel noise keeps the finding subtle.
    let mut out = vec![0u8; size * size * 3];
    for (k, p) in px.iter().enumerate() {
        let n = 14.0 * (high[k] * 0.5 + r.gen::<f32>() - 0.5);
        for c in 0..3 {
            out[3 * k + c] = (p[c] + n).clamp(0.0, 255.0) as u8;
        }
    }
    (out, loc)
}

fn blob(size: usize, cx: f32, cy: f32, rad: f32, add: &mut impl FnMut(usize, f32)) {
    let x0 = (cx - rad).max(0.0) as usize;
    let x1 = ((cx + rad) as usize + 1).min(size);
    let y0 = (cy - rad).max(0.0) as usize;
    let y1 = ((cy + rad) as usize + 1).min(size);
    for y in y0..y1 {
        for x in x0..x1 {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() / rad;
            if d < 1.0 {
                add(y * size + x, 1.0 - d * d);
            }
        }
    }
}
