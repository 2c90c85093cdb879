//! Teacher alignment (DESIGN.md §2 "Alignment into one space"): a multi-teacher autoencoder that
//! maps every teacher's raw features into one shared 512-d latent.
//!
//! Per teacher `t` one linear layer in (`raw_dim → 512`) and one out (`512 → raw_dim`), used by
//! both towers so that a teacher's image and text features stay in one joint space; shared
//! per-tower encoders (`512 → h → h`: linear, ReLU, dropout, linear) and decoders
//! (`h → h → 512`: linear, ReLU, linear). Training adds Gaussian noise to the inputs and
//! reconstructs the clean features (MSE). The distillation targets are the outputs of the
//! per-teacher *input* layers, computed without noise or dropout.
//!
//! Alongside the reconstruction, an NT-Xent term (temperature τ, the reference's 0.07) pulls the
//! latents of one sample from different teachers together: for every tower and every pair of
//! teachers, a symmetric cross-entropy over the batch's cosine similarities divided by τ, with the
//! same sample as the positive and the other samples as negatives. Without it the per-teacher
//! input layers are free to place each teacher anywhere in the latent, and a student drawing one
//! teacher at random per sample would chase inconsistent targets.

use crate::error::{EngineError, Result};
use crate::ops::linear::WLayout;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::{write_atomic, ParamStore, ParamView};
use crate::tape::{Tape, Var};
use mmkd_loaders::{Dataset, Tower};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// Width of the shared latent space (the projected target width).
pub const LATENT: usize = 512;

/// Hyper-parameters of [`AlignModel::train`].
#[derive(Clone, Debug, PartialEq)]
pub struct AlignConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Hidden width `h` of the shared encoders and decoders.
    pub hidden: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// Seed of the initialisation, batch draws, noise and dropout masks.
    pub seed: u64,
    /// Samples drawn (with replacement) per step.
    pub batch_size: usize,
    /// Dropout probability after the encoders' ReLU.
    pub dropout: f32,
    /// Standard deviation of the Gaussian input noise while training.
    pub noise: f32,
    /// Decoupled weight decay of AdamW (weights only).
    pub weight_decay: f64,
    /// Weight of the cross-teacher NT-Xent term (`0` = reconstruction only).
    pub ntxent_weight: f64,
    /// NT-Xent temperature τ.
    pub temperature: f64,
}

/// The losses of one alignment step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct AlignStepLoss {
    /// Mean reconstruction MSE over the present (teacher, tower) pairs.
    pub recon: f64,
    /// Mean NT-Xent over the (tower, teacher pair) combinations present in the batch (`0` when
    /// no sample has two teachers or the term is off).
    pub ntxent: f64,
    /// `recon + ntxent_weight · ntxent`.
    pub total: f64,
}

impl Default for AlignConfig {
    fn default() -> Self {
        AlignConfig {
            steps: 1000,
            hidden: 1024,
            lr: 1e-3,
            seed: 0,
            batch_size: 256,
            dropout: 0.2,
            noise: 0.01,
            weight_decay: 1e-4,
            ntxent_weight: 1.0,
            temperature: 0.07,
        }
    }
}

/// Reconstruction MSE of one teacher (mean over elements of the samples where it is available).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TeacherLoss {
    /// Teacher name from the manifest.
    pub name: String,
    /// Samples evaluated.
    pub samples: u64,
    /// Image-tower MSE.
    pub image: f64,
    /// Text-tower MSE.
    pub text: f64,
}

/// Two linear layers of a shared encoder or decoder.
struct Mlp {
    w1: ParamView,
    b1: ParamView,
    w2: ParamView,
    b2: ParamView,
    out1: usize,
    out2: usize,
}

/// The multi-teacher autoencoder and its parameters.
pub struct AlignModel {
    /// All weights (names `teacher.{t}.in.weight`, `encoder.image.fc1.weight`, ...).
    pub params: ParamStore,
    dims: Vec<usize>,
    names: Vec<String>,
    ins: Vec<(ParamView, ParamView)>,
    outs: Vec<(ParamView, ParamView)>,
    enc: [Mlp; 2],
    dec: [Mlp; 2],
}

const TOWERS: [(Tower, &str); 2] = [(Tower::Image, "image"), (Tower::Text, "text")];

/// A standard normal draw (Box–Muller), so no extra distribution crate is needed.
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn add_linear(
    p: &mut ParamStore,
    rng: &mut ChaCha8Rng,
    name: &str,
    inp: usize,
    out: usize,
) -> Result<(ParamView, ParamView)> {
    // PyTorch's nn.Linear default: U(−1/√fan_in, 1/√fan_in) for weight and bias.
    let a = 1.0 / (inp as f32).sqrt();
    let mut fill = |s: &mut [f32]| s.iter_mut().for_each(|v| *v = rng.gen_range(-a..a));
    let w = p.add(&format!("{name}.weight"), &[out, inp], &mut fill)?;
    let b = p.add(&format!("{name}.bias"), &[out], &mut fill)?;
    Ok((p.view(w), p.view(b)))
}

fn add_mlp(
    p: &mut ParamStore,
    rng: &mut ChaCha8Rng,
    name: &str,
    inp: usize,
    mid: usize,
    out: usize,
) -> Result<Mlp> {
    let (w1, b1) = add_linear(p, rng, &format!("{name}.fc1"), inp, mid)?;
    let (w2, b2) = add_linear(p, rng, &format!("{name}.fc2"), mid, out)?;
    Ok(Mlp {
        w1,
        b1,
        w2,
        b2,
        out1: mid,
        out2: out,
    })
}

/// Per-(teacher, tower) batch: the clean rows and the sample positions they belong to.
struct Rows {
    data: Vec<f32>,
    pos: Vec<usize>,
}

fn gather(ds: &Dataset, idx: &[u64], t: usize, tower: Tower, dim: usize) -> Result<Rows> {
    let mut data = Vec::new();
    let mut pos = Vec::new();
    for (k, &i) in idx.iter().enumerate() {
        let avail = ds.available(i).map_err(|e| data_err(ds, i, e))?;
        if avail >> t & 1 == 1 {
            let v = ds.raw(i, t, tower).map_err(|e| data_err(ds, i, e))?;
            if v.len() != dim {
                return Err(EngineError::Input(format!(
                    "{}: sample {i}, teacher {t}: raw feature of width {}, manifest says {dim}",
                    ds.dir().display(),
                    v.len()
                )));
            }
            data.extend_from_slice(&v);
            pos.push(k);
        }
    }
    Ok(Rows { data, pos })
}

fn data_err(ds: &Dataset, i: u64, e: anyhow::Error) -> EngineError {
    EngineError::Input(format!("{}: sample {i}: {e:#}", ds.dir().display()))
}

impl AlignModel {
    /// A seeded model for teachers named `names` with raw widths `dims`.
    pub fn new(names: &[String], dims: &[usize], hidden: usize, seed: u64) -> Result<Self> {
        if names.len() != dims.len() || dims.is_empty() || dims.contains(&0) || hidden == 0 {
            return Err(EngineError::Config(format!(
                "alignment needs at least one teacher with a non-zero width and hidden > 0 \
                 (teachers {names:?}, widths {dims:?}, hidden {hidden})"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = ParamStore::new();
        let mut ins = Vec::new();
        let mut outs = Vec::new();
        for (t, &d) in dims.iter().enumerate() {
            ins.push(add_linear(
                &mut p,
                &mut rng,
                &format!("teacher.{t}.in"),
                d,
                LATENT,
            )?);
            outs.push(add_linear(
                &mut p,
                &mut rng,
                &format!("teacher.{t}.out"),
                LATENT,
                d,
            )?);
        }
        let mut mlp = |p: &mut ParamStore, n: &str, a, b, c| add_mlp(p, &mut rng, n, a, b, c);
        let enc = [
            mlp(&mut p, "encoder.image", LATENT, hidden, hidden)?,
            mlp(&mut p, "encoder.text", LATENT, hidden, hidden)?,
        ];
        let dec = [
            mlp(&mut p, "decoder.image", hidden, hidden, LATENT)?,
            mlp(&mut p, "decoder.text", hidden, hidden, LATENT)?,
        ];
        Ok(AlignModel {
            params: p,
            dims: dims.to_vec(),
            names: names.to_vec(),
            ins,
            outs,
            enc,
            dec,
        })
    }

    /// A model shaped for the teachers of `ds`'s manifest.
    pub fn for_dataset(ds: &Dataset, hidden: usize, seed: u64) -> Result<Self> {
        let ts = &ds.manifest().teachers;
        let names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
        let dims: Vec<usize> = ts.iter().map(|t| t.raw_dim).collect();
        Self::new(&names, &dims, hidden, seed)
    }

    fn mlp(
        &self,
        tape: &mut Tape,
        m: &Mlp,
        x: Var,
        dropout: Option<(&mut ChaCha8Rng, f32)>,
    ) -> Result<Var> {
        let p = &self.params;
        let h = tape.linear(p, x, m.w1, Some(m.b1), WLayout::OutIn, m.out1)?;
        let mut h = tape.relu(h)?;
        if let Some((rng, prob)) = dropout {
            let keep = 1.0 / (1.0 - prob);
            let mask = (0..tape.value(h).len())
                .map(|_| if rng.gen::<f32>() < prob { 0.0 } else { keep })
                .collect();
            h = tape.dropout(h, mask)?;
        }
        tape.linear(p, h, m.w2, Some(m.b2), WLayout::OutIn, m.out2)
    }

    /// Records teacher `t`, tower `k` on `tape`: returns (projected latent, reconstruction).
    /// `train` carries the generator and dropout probability while training.
    fn forward(
        &self,
        tape: &mut Tape,
        t: usize,
        k: usize,
        x: Vec<f32>,
        train: Option<(&mut ChaCha8Rng, f32)>,
    ) -> Result<(Var, Var)> {
        let p = &self.params;
        let n = x.len() / self.dims[t];
        let x = tape.constant(x, &[n, self.dims[t]])?;
        let (wi, bi) = self.ins[t];
        let z = tape.linear(p, x, wi, Some(bi), WLayout::OutIn, LATENT)?;
        let e = self.mlp(tape, &self.enc[k], z, train)?;
        let r = self.mlp(tape, &self.dec[k], e, None)?;
        let (wo, bo) = self.outs[t];
        let y = tape.linear(p, r, wo, Some(bo), WLayout::OutIn, self.dims[t])?;
        Ok((z, y))
    }

    /// Trains on `ds` with AdamW; `progress(step, losses)` is called after every step.
    /// Deterministic for a seed.
    pub fn train(
        &mut self,
        ds: &Dataset,
        cfg: &AlignConfig,
        progress: &mut dyn FnMut(usize, AlignStepLoss),
    ) -> Result<()> {
        let n = ds.len();
        if n == 0 {
            return Err(EngineError::Input(format!(
                "{}: dataset is empty",
                ds.dir().display()
            )));
        }
        if cfg.batch_size == 0 {
            return Err(EngineError::Config(
                "alignment: batch size must be > 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(EngineError::Config(format!(
                "alignment: dropout {} must be in [0, 1)",
                cfg.dropout
            )));
        }
        let weight_ok = cfg.ntxent_weight >= 0.0 && cfg.ntxent_weight.is_finite();
        let temperature_ok = cfg.temperature > 0.0 && cfg.temperature.is_finite();
        if !(weight_ok && temperature_ok) {
            return Err(EngineError::Config(format!(
                "alignment: NT-Xent weight {} must be ≥ 0 and temperature {} > 0",
                cfg.ntxent_weight, cfg.temperature
            )));
        }
        if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
            return Err(EngineError::Config(format!(
                "alignment: learning rate {} must be positive",
                cfg.lr
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut opt = AdamW::new(
            &self.params,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        );
        for step in 0..cfg.steps {
            let idx: Vec<u64> = (0..cfg.batch_size).map(|_| rng.gen_range(0..n)).collect();
            let mut tape = Tape::new();
            let mut seeds: Vec<(Var, Vec<f32>)> = Vec::new();
            let mut losses = Vec::new();
            // Per (teacher, tower): the latent, its batch positions and its values.
            let mut latents: Vec<(usize, usize, Var, Vec<usize>)> = Vec::new();
            for t in 0..self.dims.len() {
                for (k, &(tower, _)) in TOWERS.iter().enumerate() {
                    let rows = gather(ds, &idx, t, tower, self.dims[t])?;
                    if rows.pos.is_empty() {
                        continue;
                    }
                    let noisy = rows
                        .data
                        .iter()
                        .map(|&v| v + cfg.noise * gaussian(&mut rng))
                        .collect();
                    let (z, y) =
                        self.forward(&mut tape, t, k, noisy, Some((&mut rng, cfg.dropout)))?;
                    latents.push((t, k, z, rows.pos.clone()));
                    let diff: Vec<f32> = tape
                        .value(y)
                        .iter()
                        .zip(&rows.data)
                        .map(|(a, b)| a - b)
                        .collect();
                    let mse =
                        diff.iter().map(|d| (*d as f64).powi(2)).sum::<f64>() / diff.len() as f64;
                    losses.push(mse);
                    seeds.push((y, diff));
                }
            }
            // L = mean over the present (teacher, tower) pairs of their MSE.
            let pairs = seeds.len() as f32;
            for (_, d) in seeds.iter_mut() {
                let c = 2.0 / (d.len() as f32 * pairs);
                d.iter_mut().for_each(|v| *v *= c);
            }
            let recon = losses.iter().sum::<f64>() / losses.len() as f64;
            let ntxent = if cfg.ntxent_weight > 0.0 {
                self.ntxent(&tape, &latents, cfg, &mut seeds)?
            } else {
                0.0
            };
            let loss = recon + cfg.ntxent_weight * ntxent;
            if !loss.is_finite() {
                return Err(EngineError::Input(format!(
                    "alignment: non-finite loss {loss} at step {step}; lower --lr"
                )));
            }
            self.params.zero_grad();
            let refs: Vec<(Var, &[f32])> = seeds.iter().map(|(v, d)| (*v, d.as_slice())).collect();
            tape.backward(&mut self.params, &refs)?;
            opt.step(&mut self.params, cfg.lr);
            progress(
                step,
                AlignStepLoss {
                    recon,
                    ntxent,
                    total: loss,
                },
            );
        }
        Ok(())
    }

    /// The cross-teacher NT-Xent of one batch: returns its mean over the (tower, teacher pair)
    /// combinations that share at least two samples, and appends the weighted gradients of the
    /// latents to `seeds`.
    fn ntxent(
        &self,
        tape: &Tape,
        latents: &[(usize, usize, Var, Vec<usize>)],
        cfg: &AlignConfig,
        seeds: &mut Vec<(Var, Vec<f32>)>,
    ) -> Result<f64> {
        let scale = (1.0 / cfg.temperature).ln() as f32;
        let mut grads: Vec<Vec<f32>> = latents
            .iter()
            .map(|(_, _, z, _)| vec![0.0; tape.value(*z).len()])
            .collect();
        let mut terms = Vec::new();
        for a in 0..latents.len() {
            for b in a + 1..latents.len() {
                let (ta, ka, za, pa) = &latents[a];
                let (tb, kb, zb, pb) = &latents[b];
                if ka != kb || ta == tb {
                    continue;
                }
                // Rows of a and b holding the same batch position.
                let pairs: Vec<(usize, usize)> = pa
                    .iter()
                    .enumerate()
                    .filter_map(|(ra, p)| pb.binary_search(p).ok().map(|rb| (ra, rb)))
                    .collect();
                if pairs.len() < 2 {
                    continue;
                }
                let rows = |v: Var, pick: &dyn Fn(&(usize, usize)) -> usize| -> Vec<f32> {
                    let x = tape.value(v);
                    pairs
                        .iter()
                        .flat_map(|p| x[pick(p) * LATENT..(pick(p) + 1) * LATENT].iter().copied())
                        .collect()
                };
                let xa = rows(*za, &|p| p.0);
                let xb = rows(*zb, &|p| p.1);
                let (l, g) = crate::loss::clip_loss(&xa, &xb, scale, pairs.len(), LATENT)?;
                terms.push((l, pairs, g.image, g.text, a, b));
            }
        }
        if terms.is_empty() {
            return Ok(0.0);
        }
        let w = (cfg.ntxent_weight / terms.len() as f64) as f32;
        let mut sum = 0.0;
        for (l, pairs, ga, gb, a, b) in &terms {
            sum += l;
            for (r, &(ra, rb)) in pairs.iter().enumerate() {
                let src = r * LATENT..(r + 1) * LATENT;
                for (d, s) in grads[*a][ra * LATENT..(ra + 1) * LATENT]
                    .iter_mut()
                    .zip(&ga[src.clone()])
                {
                    *d += w * s;
                }
                for (d, s) in grads[*b][rb * LATENT..(rb + 1) * LATENT]
                    .iter_mut()
                    .zip(&gb[src])
                {
                    *d += w * s;
                }
            }
        }
        for ((_, _, z, _), g) in latents.iter().zip(grads) {
            seeds.push((*z, g));
        }
        Ok(sum / terms.len() as f64)
    }

    /// Projects samples `0..limit` (all when `None`) without noise or dropout, in chunks of
    /// `chunk`. Returns the per-teacher reconstruction MSE and the projections
    /// (`image`, `text`: `[N, T, 512]`, zero where unavailable; `mask`: `[N, T]` of 0/1).
    pub fn project(&self, ds: &Dataset, limit: Option<u64>, chunk: usize) -> Result<Projection> {
        let n = limit.map_or(ds.len(), |l| l.min(ds.len())) as usize;
        let nt = self.dims.len();
        let mut out = Projection {
            n,
            teachers: nt,
            image: vec![0.0; n * nt * LATENT],
            text: vec![0.0; n * nt * LATENT],
            mask: vec![0.0; n * nt],
            losses: Vec::new(),
        };
        let mut sums = vec![[0.0f64; 2]; nt];
        let mut counts = vec![0u64; nt];
        for start in (0..n).step_by(chunk.max(1)) {
            let idx: Vec<u64> = (start..(start + chunk.max(1)).min(n))
                .map(|i| i as u64)
                .collect();
            for t in 0..nt {
                for (k, &(tower, _)) in TOWERS.iter().enumerate() {
                    let rows = gather(ds, &idx, t, tower, self.dims[t])?;
                    if rows.pos.is_empty() {
                        continue;
                    }
                    let mut tape = Tape::no_grad();
                    let (z, y) = self.forward(&mut tape, t, k, rows.data.clone(), None)?;
                    sums[t][k] += tape
                        .value(y)
                        .iter()
                        .zip(&rows.data)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>();
                    if k == 0 {
                        counts[t] += rows.pos.len() as u64;
                    }
                    let dst = if k == 0 {
                        &mut out.image
                    } else {
                        &mut out.text
                    };
                    for (r, &p) in rows.pos.iter().enumerate() {
                        let s = start + p;
                        let o = (s * nt + t) * LATENT;
                        dst[o..o + LATENT]
                            .copy_from_slice(&tape.value(z)[r * LATENT..(r + 1) * LATENT]);
                        out.mask[s * nt + t] = 1.0;
                    }
                }
            }
        }
        out.losses = (0..nt)
            .map(|t| {
                let el = (counts[t] * self.dims[t] as u64).max(1) as f64;
                TeacherLoss {
                    name: self.names[t].clone(),
                    samples: counts[t],
                    image: sums[t][0] / el,
                    text: sums[t][1] / el,
                }
            })
            .collect();
        Ok(out)
    }
}

/// Projected targets of a dataset and the reconstruction losses measured while projecting.
#[derive(Clone, Debug)]
pub struct Projection {
    /// Samples.
    pub n: usize,
    /// Teachers (`T`).
    pub teachers: usize,
    /// `[N, T, 512]` image targets, zero where the teacher is unavailable.
    pub image: Vec<f32>,
    /// `[N, T, 512]` text targets.
    pub text: Vec<f32>,
    /// `[N, T]`, 1 where the teacher is available.
    pub mask: Vec<f32>,
    /// Per-teacher reconstruction MSE.
    pub losses: Vec<TeacherLoss>,
}

impl Projection {
    /// Writes `image`, `text` (`[N, T, 512]` f32) and `mask` (`[N, T]` f32) to a safetensors
    /// file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let werr = |msg: String| EngineError::Weights {
            path: path.to_path_buf(),
            msg,
        };
        let (n, t) = (self.n, self.teachers);
        let tensors = [
            ("image", vec![n, t, LATENT], &self.image),
            ("text", vec![n, t, LATENT], &self.text),
            ("mask", vec![n, t], &self.mask),
        ];
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(data.as_slice()),
                )
                .map(|v| (name.to_string(), v))
                .map_err(|e| werr(format!("tensor `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::tensor::serialize(views, None).map_err(|e| werr(e.to_string()))?;
        write_atomic(path, &bytes)
    }
}
