//! The trainer: stage 1 (CLIP) and stage 2 (multi-teacher distillation) over packed shards.
//!
//! One optimiser step:
//! 1. the batch's features are computed — in one recorded forward, or, with gradient
//!    accumulation, micro-batch by micro-batch *without* a graph and cached;
//! 2. the loss runs on the whole batch (so every contrastive term sees all `B` negatives) and
//!    returns `dL/d(features)`;
//! 3. the gradient reaches the weights: directly by backward, or by re-running each
//!    micro-batch's forward with a graph and seeding its backward with its rows of the cached
//!    feature gradient (gradients add up in the store's buffer);
//! 4. a non-finite loss or gradient stops the run before anything is applied or saved;
//! 5. clip the global gradient norm, AdamW with the warm-up + cosine rate, clamp the logit scale.
//!
//! Everything random (batch order, teacher draws) is a pure function of the data seed and the
//! position, and the update is deterministic, so resuming from a checkpoint's weights, moments
//! and cursor reproduces the uninterrupted run bit for bit.

use crate::checkpoint::{self, TrainerState};
use crate::config::ModelConfig;
use crate::cuda::{Images, KernelStep, KernelTarget};
use crate::loss::{
    clip_loss, distill_loss, DistillConfig, IclScale, LossParts, TeacherMode, TeacherNorm,
    TeacherTargets, REFERENCE_ICL_SCALE,
};
use crate::model::ClipModel;
use crate::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};
use crate::tape::Tape;
use crate::tensor::Tensor;
use anyhow::{anyhow, bail, Context, Result};
use mmkd_kernels::image_norm::{image_normalize_cpu, ImageNormConfig, CLIP_MEAN, CLIP_STD};
use mmkd_loaders::batch::{
    Batch, BatchConfig, BatchLoader, Cursor, ImageDtype, TeacherMode as LoadMode,
};
use mmkd_loaders::Dataset;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 1: CLIP loss only.
    Clip,
    /// Stage 2: `task + λ·fd + icl`.
    Kd,
}

/// Training hyper-parameters: the `[train]` table of the config file, each key overridable with
/// `--set key=value`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples per optimiser step (the contrastive batch).
    pub batch_size: usize,
    /// Samples per forward/backward pass; `0` or `batch_size` means no accumulation. The
    /// features of every pass are gathered first, so the loss is the whole batch's (on the
    /// kernels too, where the towers' activations are sized for one pass).
    pub micro_batch: usize,
    /// Passes over the data.
    pub epochs: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub beta1: f64,
    /// AdamW β₂.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Global gradient-norm clip (`0` = off).
    pub grad_clip: f64,
    /// Checkpoint every this many steps (and at the end).
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Data order / teacher-draw seed.
    pub seed: u64,
    /// Loader worker threads.
    pub workers: usize,
    /// λ of the fd term (stage 2).
    pub fd_weight: f64,
    /// `"const"` (the reference's `c` multiplied in) or `"learned"` (stored as `ln c`).
    pub icl_scale: String,
    /// Value of `c` in `const` mode; initial `c` in `learned` mode.
    pub icl_scale_value: f64,
    /// `l2` or `none`.
    pub teacher_norm: TeacherNorm,
    /// `random`, `mean` or `all`.
    pub teacher_mode: TeacherMode,
    /// Activation checkpointing: each transformer block keeps only its input and recomputes
    /// the rest in backward (less memory, one more forward per block).
    pub checkpointing: bool,
    /// Fault injection for tests of the non-finite guard: at this step the student's image
    /// features are poisoned with a NaN. Never set in real runs.
    pub fault_nan_at_step: Option<u64>,
    /// Stop after this many optimiser steps in this invocation (tests; `None` = run to the end).
    pub stop_after: Option<u64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            micro_batch: 0,
            epochs: 1,
            lr: 5e-5,
            warmup: 2000,
            weight_decay: 0.2,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            grad_clip: 1.0,
            save_every: 100,
            keep_last: 2,
            seed: 0,
            workers: 2,
            fd_weight: 50.0,
            icl_scale: "const".into(),
            icl_scale_value: REFERENCE_ICL_SCALE,
            teacher_norm: TeacherNorm::L2,
            teacher_mode: TeacherMode::Random,
            checkpointing: false,
            fault_nan_at_step: None,
            stop_after: None,
        }
    }
}

impl TrainConfig {
    /// The distillation switches.
    pub fn distill(&self) -> Result<DistillConfig> {
        let icl_scale = match self.icl_scale.as_str() {
            "const" => IclScale::Const(self.icl_scale_value),
            "learned" => IclScale::Learned(self.icl_scale_value.ln()),
            other => bail!("train.icl_scale: `{other}` is not `const` or `learned`"),
        };
        Ok(DistillConfig {
            fd_weight: self.fd_weight,
            icl_scale,
            teacher_norm: self.teacher_norm,
            teacher_mode: self.teacher_mode,
        })
    }
}

/// A model config plus a training config, read from one TOML file (the model keys at the top
/// level, the training keys in an optional `[train]` table) with `key=value` overrides
/// (`train.lr=1e-3`, `lr=1e-3` or `model.embed_dim=512` / `vision.layers=1`).
pub fn load_configs(path: &Path, sets: &[String]) -> Result<(ModelConfig, TrainConfig)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut train = match doc.remove("train") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => bail!("{}: `train` must be a table", path.display()),
        None => toml::Table::new(),
    };
    // Optional keys are absent from the serialised defaults: list them explicitly.
    let mut train_keys: Vec<String> = toml::Table::try_from(TrainConfig::default())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    train_keys.extend(["fault_nan_at_step".to_string(), "stop_after".to_string()]);
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set `{s}`: expected key=value"))?;
        let value = parse_value(v);
        let key = k.trim();
        if let Some(rest) = key.strip_prefix("train.") {
            train.insert(rest.to_string(), value);
        } else if train_keys.iter().any(|t| t == key) {
            train.insert(key.to_string(), value);
        } else {
            let key = key.strip_prefix("model.").unwrap_or(key);
            set_path(&mut doc, key, value).with_context(|| format!("--set `{s}`"))?;
        }
    }
    let origin = path.display().to_string();
    let model = ModelConfig::from_toml_str(&toml::to_string(&doc)?, &origin)?;
    let train: TrainConfig = toml::Value::Table(train)
        .try_into()
        .with_context(|| format!("{origin}: [train]"))?;
    if train.batch_size == 0 {
        bail!("train.batch_size must be positive");
    }
    let micro = if train.micro_batch == 0 {
        train.batch_size
    } else {
        train.micro_batch
    };
    if !train.batch_size.is_multiple_of(micro) {
        bail!(
            "train.micro_batch ({micro}) must divide train.batch_size ({})",
            train.batch_size
        );
    }
    Ok((model, train))
}

/// TOML scalar from a command-line string: integer, float, bool, else string.
fn parse_value(v: &str) -> toml::Value {
    let v = v.trim();
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(f) = v.parse::<f64>() {
        toml::Value::Float(f)
    } else if let Ok(b) = v.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(v.to_string())
    }
}

fn set_path(doc: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().context("empty key")?;
    let mut t = doc;
    for p in parts {
        t = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("`{p}` is not a table"))?;
    }
    // Floats given as integers (`lr=1`) stay valid for float keys.
    let value = match (t.get(last), value) {
        (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, v) => v,
    };
    t.insert(last.to_string(), value);
    Ok(())
}

/// Everything one `train` run needs.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Stage.
    pub stage: Stage,
    /// Packed dataset directory.
    pub data: PathBuf,
    /// Run directory (checkpoints, metrics.jsonl).
    pub out: PathBuf,
    /// Initial weights: a checkpoint directory or a `.safetensors` file.
    pub init: Option<PathBuf>,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Student config.
    pub model: ModelConfig,
    /// Training config.
    pub train: TrainConfig,
    /// Run the step on the project's kernels (a GPU, or their CPU emulation) instead of the
    /// engine's CPU backend.
    pub kernels: Option<KernelTarget>,
}

/// One record of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Optimiser steps applied (this record's step is the one just applied).
    pub step: u64,
    /// Epoch of the data cursor.
    pub epoch: u64,
    /// Learning rate used.
    pub lr: f64,
    /// Loss components.
    pub task: f64,
    /// fd (unweighted).
    pub fd: f64,
    /// icl.
    pub icl: f64,
    /// `task + λ fd + icl`.
    pub total: f64,
    /// Logit scale `s` after the step (the model uses `exp(s)`).
    pub logit_scale: f64,
    /// icl scale `c` in use.
    pub icl_scale: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples per second of this step (data wait included).
    pub samples_per_s: f64,
    /// Seconds spent waiting for the batch.
    pub data_wait_s: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    /// Steps applied in total (including before a resume).
    pub steps: u64,
    /// Final checkpoint directory.
    pub checkpoint: PathBuf,
    /// Last step's record, if a step ran.
    pub last: Option<StepRecord>,
}

/// The loss of one batch on cached features: components and feature gradients.
pub struct BatchLoss {
    /// Components.
    pub parts: LossParts,
    /// dL/d(image features) `[B, J]`.
    pub d_image: Vec<f32>,
    /// dL/d(text features) `[B, J]`.
    pub d_text: Vec<f32>,
    /// dL/ds.
    pub d_logit_scale: f32,
    /// dL/d ln c when learned.
    pub d_icl_scale: Option<f32>,
}

/// A loss over whole-batch (image, text) features `[B, J]`: components and feature gradients.
pub type FeatureLoss<'a> = dyn FnMut(&[f32], &[f32]) -> Result<BatchLoss> + 'a;

/// The inputs of one batch in model form.
pub struct BatchInputs {
    /// `(B, 3, S, S)` normalised images.
    pub images: Vec<f32>,
    /// Image side.
    pub image_size: usize,
    /// `(B, L)` token ids.
    pub tokens: Vec<u32>,
    /// `L`.
    pub token_len: usize,
    /// Valid tokens per row.
    pub lengths: Vec<usize>,
    /// `B`.
    pub size: usize,
}

impl BatchInputs {
    /// Copies a loader batch's images, tokens and lengths.
    pub fn from_batch(b: &Batch) -> Result<Self> {
        let images = b
            .images_f32()
            .context("batch images are not f32 (the CPU trainer needs image_dtype F32)")?
            .to_vec();
        Ok(BatchInputs {
            images,
            image_size: b.image_size,
            tokens: b.tokens().to_vec(),
            token_len: b.token_len,
            lengths: b.lengths().iter().map(|&l| l as usize).collect(),
            size: b.size,
        })
    }

    /// Rows `r` as model tensors.
    fn slice(&self, r: std::ops::Range<usize>) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let per = 3 * self.image_size * self.image_size;
        let n = r.len();
        let img = Tensor::from_f32(
            self.images[r.start * per..r.end * per].to_vec(),
            &[n, 3, self.image_size, self.image_size],
        )?;
        let tok = Tensor::from_u32(
            self.tokens[r.start * self.token_len..r.end * self.token_len].to_vec(),
            &[n, self.token_len],
        )?;
        Ok((img, tok, self.lengths[r].to_vec()))
    }
}

/// One step's gradient into `model.params.grad` (zeroed first), with `micro`-sized passes and
/// the loss on the whole batch. `loss` maps (image features, text features) `[B, J]` to the loss
/// and its feature gradients. Returns the loss.
pub fn accumulate_gradients(
    model: &mut ClipModel,
    inputs: &BatchInputs,
    micro: usize,
    loss: &mut FeatureLoss<'_>,
) -> Result<BatchLoss> {
    let b = inputs.size;
    let j = model.config.embed_dim;
    let micro = if micro == 0 || micro >= b { b } else { micro };
    model.params.zero_grad();
    if micro == b {
        let (img, tok, len) = inputs.slice(0..b)?;
        let mut tape = Tape::new();
        let vi = model.encode_image(&mut tape, &img)?;
        let vt = model.encode_text(&mut tape, &tok, &len)?;
        let out = loss(tape.value(vi), tape.value(vt))?;
        if out.parts.is_finite() {
            tape.backward(&mut model.params, &[(vi, &out.d_image), (vt, &out.d_text)])?;
        }
        return Ok(out);
    }
    // Pass 1: features of every micro-batch, no graph kept.
    let (mut fi, mut ft) = (Vec::with_capacity(b * j), Vec::with_capacity(b * j));
    for s in (0..b).step_by(micro) {
        let e = (s + micro).min(b);
        let (img, tok, len) = inputs.slice(s..e)?;
        fi.extend_from_slice(model.embed_images(&img)?.as_f32()?);
        ft.extend_from_slice(model.embed_texts(&tok, &len)?.as_f32()?);
    }
    let out = loss(&fi, &ft)?;
    if !out.parts.is_finite() {
        return Ok(out);
    }
    // Pass 2: re-run each micro-batch with a graph, seeded with its rows of the gradient.
    for s in (0..b).step_by(micro) {
        let e = (s + micro).min(b);
        let (img, tok, len) = inputs.slice(s..e)?;
        let mut tape = Tape::new();
        let vi = model.encode_image(&mut tape, &img)?;
        let vt = model.encode_text(&mut tape, &tok, &len)?;
        tape.backward(
            &mut model.params,
            &[
                (vi, &out.d_image[s * j..e * j]),
                (vt, &out.d_text[s * j..e * j]),
            ],
        )?;
    }
    Ok(out)
}

/// The loss of one loader batch for `stage`, as a closure over features.
fn batch_loss(
    stage: Stage,
    cfg: &DistillConfig,
    batch: &Batch,
    s: f32,
    j: usize,
    fi: &[f32],
    ft: &[f32],
) -> Result<BatchLoss> {
    let n = batch.size;
    match stage {
        Stage::Clip => {
            let (task, g) = clip_loss(fi, ft, s, n, j)?;
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
        }
        Stage::Kd => {
            let (ti, tt) = (batch.teacher_image(), batch.teacher_text());
            let mask: Vec<bool> = match batch.teachers {
                LoadMode::One => batch.teacher_index().iter().map(|&k| k >= 0).collect(),
                LoadMode::All => batch.teacher_mask().iter().map(|&m| m != 0).collect(),
                LoadMode::None => bail!("stage 2 batch carries no teacher targets"),
            };
            let slots = mask.len() / n.max(1);
            if ti.len() != n * slots * j {
                bail!(
                    "teacher targets are {}-d but the student's joint width is {j}: set \
                     model.embed_dim to the dataset's projected width",
                    ti.len() / (n * slots).max(1)
                );
            }
            let t = TeacherTargets {
                image: ti,
                text: tt,
                mask: &mask,
                teachers: slots,
            };
            let (parts, g) = distill_loss(fi, ft, s, &t, cfg, n, j)
                .with_context(|| format!("batch starting at {:?}", batch.start))?;
            Ok(BatchLoss {
                parts,
                d_image: g.image,
                d_text: g.text,
                d_logit_scale: g.logit_scale,
                d_icl_scale: g.icl_scale,
            })
        }
    }
}

/// Loads initial weights from a safetensors file, a checkpoint directory, or a run directory
/// (its newest checkpoint).
pub fn load_init(model: &mut ClipModel, init: &Path) -> Result<()> {
    let file = if init.is_dir() && !init.join("model.safetensors").exists() {
        let root = init.join("checkpoints");
        match checkpoint::latest(&root)? {
            Some(dir) => dir.join("model.safetensors"),
            None => bail!(
                "{}: neither a checkpoint (no model.safetensors) nor a run directory with \
                 checkpoints/step-*",
                init.display()
            ),
        }
    } else if init.is_dir() {
        init.join("model.safetensors")
    } else {
        init.to_path_buf()
    };
    // A stage-2 run with a learned icl scale stores it beside the student's weights.
    model
        .params
        .load_safetensors_except(&file, &["icl_scale"])
        .with_context(|| format!("loading initial weights from {}", file.display()))
}

/// Runs training; `on_step` sees every record (progress display). Errors name the step.
pub fn train(
    opts: &TrainOptions,
    on_step: &mut dyn FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    let tc = &opts.train;
    let dcfg = tc.distill()?;
    let ds = Arc::new(
        Dataset::open(&opts.data).with_context(|| format!("opening {}", opts.data.display()))?,
    );
    let micro = if tc.micro_batch == 0 {
        tc.batch_size
    } else {
        tc.micro_batch
    };
    let loader_mode = match (opts.stage, tc.teacher_mode) {
        (Stage::Clip, _) => LoadMode::None,
        (Stage::Kd, TeacherMode::Random) => LoadMode::One,
        (Stage::Kd, _) => LoadMode::All,
    };
    let bcfg = BatchConfig {
        batch_size: tc.batch_size,
        seed: tc.seed,
        shuffle: true,
        epochs: tc.epochs,
        drop_last: true,
        workers: tc.workers,
        output_size: Some(opts.model.vision.image_size),
        // Short captions do not pay for the whole context: the text tower's key-padding mask
        // makes the result independent of the padding.
        pad_to_longest: true,
        teachers: loader_mode,
        // The kernels take raw crops (a quarter of the bytes) and normalise on the device.
        image_dtype: if opts.kernels.is_some() {
            ImageDtype::U8
        } else {
            ImageDtype::F32
        },
        ..BatchConfig::default()
    };
    let mut loader = BatchLoader::new(ds.clone(), bcfg)?;
    let per_epoch = loader.batches_per_epoch();
    if per_epoch == 0 {
        bail!(
            "{}: {} samples give no full batch of {}",
            opts.data.display(),
            ds.len(),
            tc.batch_size
        );
    }
    let total_steps = per_epoch * tc.epochs;

    let mut model = ClipModel::new(&opts.model)?;
    model.set_checkpointing(tc.checkpointing);
    let ckroot = opts.out.join("checkpoints");
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let resume_from = if opts.resume {
        checkpoint::latest(&ckroot)?
    } else {
        None
    };
    if resume_from.is_none() {
        if let Some(init) = &opts.init {
            load_init(&mut model, init)?;
        }
    }
    // The learned icl scale is an extra parameter at the end of the store (ln c).
    let icl_id = match dcfg.icl_scale {
        IclScale::Learned(l) if opts.stage == Stage::Kd => {
            Some(model.params.add("icl_scale", &[], |x| x[0] = l as f32)?)
        }
        _ => None,
    };
    let mut opt = AdamW::new(
        &model.params,
        AdamWConfig {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        },
    );
    let config_json = serde_json::json!({
        "stage": opts.stage, "model": opts.model, "train": tc,
    });
    let mut step = 0u64;
    if let Some(dir) = &resume_from {
        let st = checkpoint::load(dir, &mut model.params, Some((&mut opt.m, &mut opt.v)))?;
        step = st.step;
        opt.t = st.step;
        let cursor: Cursor = serde_json::from_value(st.cursor)
            .with_context(|| format!("{}: data cursor", dir.display()))?;
        loader.seek(cursor)?;
    }
    // On the kernels the weights and moments live in the arena; `model` and `opt` receive
    // them back for each checkpoint.
    let mut kstep = match &opts.kernels {
        None => None,
        Some(target) => {
            let slots = match loader_mode {
                LoadMode::None => 0,
                LoadMode::One => 1,
                LoadMode::All => ds.num_teachers(),
            };
            let mut k = KernelStep::new(
                target,
                &opts.model,
                tc,
                dcfg,
                tc.batch_size,
                slots,
                &model.params,
            )?;
            if resume_from.is_some() {
                k.load_from(&model.params, &opt.m, &opt.v, step)?;
            }
            Some(k)
        }
    };
    let metrics_path = opts.out.join("metrics.jsonl");
    truncate_metrics(&metrics_path, step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let state = |step: u64, cursor: Cursor| -> Result<TrainerState> {
        Ok(TrainerState {
            step,
            epoch: cursor.epoch,
            cursor: serde_json::to_value(cursor)?,
            // Every random choice is a function of (seed, epoch, sample): the seed is the state.
            rng: serde_json::json!({ "data_seed": tc.seed }),
            config: config_json.clone(),
        })
    };
    let j = opts.model.embed_dim;
    let mut last = None;
    let mut ran = 0u64;
    let mut last_saved = resume_from.clone();
    // On the kernels the next batch is fetched before the current step runs, and the step
    // stages its crops (pinned copy, then the device's copy stream) while its own backward
    // computes: the batch and the loader's cursor after it.
    let mut ahead: Option<(Batch, Cursor)> = None;
    loop {
        if tc.stop_after.is_some_and(|n| ran >= n) {
            break;
        }
        let t0 = Instant::now();
        let (batch, cursor) = match ahead.take() {
            Some(b) => b,
            None => {
                let Some(b) = loader.next_batch()? else {
                    break;
                };
                if let Some(k) = kstep.as_mut() {
                    k.stage_pixels(raw_crops(&b)?)?;
                }
                (b, loader.cursor())
            }
        };
        if kstep.is_some() && tc.stop_after.is_none_or(|n| ran + 1 < n) {
            if let Some(b) = loader.next_batch()? {
                ahead = Some((b, loader.cursor()));
            }
        }
        let wait = t0.elapsed().as_secs_f64();
        let poison = tc.fault_nan_at_step == Some(step + 1);
        let lr = cosine_lr(step, tc.lr, tc.warmup, total_steps);
        let not_applied = |what: String| {
            anyhow!(
                "{what}; the step was not applied and the last checkpoint ({}) is unchanged",
                last_saved
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none yet".into())
            )
        };
        let (parts, gnorm, logit_scale, icl_log) = if let Some(k) = kstep.as_mut() {
            // A fault replaces the staged crops by host-normalised images with a NaN (the run
            // stops at this step, so the staged copy is never needed).
            let faulty = if poison {
                let mut v = normalised(&batch)?;
                v[0] = f32::NAN;
                Some(v)
            } else {
                None
            };
            let images = match &faulty {
                Some(v) => Images::F32(v),
                None => Images::Staged,
            };
            let next = match &ahead {
                Some((b, _)) => Some(raw_crops(b)?),
                None => None,
            };
            let r = k.step(&batch, images, next, lr).map_err(|e| {
                not_applied(format!(
                    "step {} on {}: {e:#}",
                    step + 1,
                    k.target().label()
                ))
            })?;
            let l = r.loss;
            let parts = LossParts {
                task: l.task as f64,
                fd: l.fd as f64,
                icl: l.icl as f64,
                total: l.total as f64,
            };
            let icl_log = r.icl_log_scale.map(f64::from);
            (parts, r.grad_norm as f64, r.logit_scale as f64, icl_log)
        } else {
            let inputs = BatchInputs::from_batch(&batch)?;
            let s = model.logit_scale();
            // The learned icl scale is read from the store each step.
            let dcfg_step = match (icl_id, dcfg.icl_scale) {
                (Some(id), IclScale::Learned(_)) => DistillConfig {
                    icl_scale: IclScale::Learned(model.params.value(id)[0] as f64),
                    ..dcfg
                },
                _ => dcfg,
            };
            let mut lossf = |fi: &[f32], ft: &[f32]| -> Result<BatchLoss> {
                if poison {
                    let mut bad = fi.to_vec();
                    bad[0] = f32::NAN;
                    return batch_loss(opts.stage, &dcfg_step, &batch, s, j, &bad, ft);
                }
                batch_loss(opts.stage, &dcfg_step, &batch, s, j, fi, ft)
            };
            let out = accumulate_gradients(&mut model, &inputs, micro, &mut lossf)?;
            let ls = model.logit_scale_id();
            model.params.grad_of_mut(ls)[0] += out.d_logit_scale;
            if let (Some(id), Some(g)) = (icl_id, out.d_icl_scale) {
                model.params.grad_of_mut(id)[0] += g;
            }
            let gnorm = crate::optim::grad_norm(model.params.grad());
            if !out.parts.is_finite() || !gnorm.is_finite() {
                let p = out.parts;
                return Err(not_applied(format!(
                    "non-finite loss or gradient at step {}: task {}, fd {}, icl {}, total {}, \
                     grad norm {gnorm}",
                    step + 1,
                    p.task,
                    p.fd,
                    p.icl,
                    p.total
                )));
            }
            clip_grad_norm(model.params.grad_mut(), tc.grad_clip);
            opt.step(&mut model.params, lr);
            model.clamp_logit_scale();
            let icl_log = icl_id.map(|id| model.params.value(id)[0] as f64);
            (out.parts, gnorm, model.logit_scale() as f64, icl_log)
        };
        step += 1;
        ran += 1;
        let dt = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step,
            epoch: batch.start.epoch,
            lr,
            task: parts.task,
            fd: parts.fd,
            icl: parts.icl,
            total: parts.total,
            logit_scale,
            icl_scale: match (icl_log, dcfg.icl_scale) {
                (Some(l), _) => l.exp(),
                (None, IclScale::Const(c)) => c,
                (None, IclScale::Learned(l)) => l.exp(),
            },
            grad_norm: gnorm,
            samples_per_s: batch.size as f64 / dt.max(1e-9),
            data_wait_s: wait,
        };
        writeln!(metrics, "{}", serde_json::to_string(&rec)?)?;
        metrics.flush()?;
        on_step(&rec, total_steps);
        last = Some(rec);
        if tc.save_every > 0 && step.is_multiple_of(tc.save_every) {
            if let Some(k) = kstep.as_mut() {
                k.save_to(&mut model.params, &mut opt.m, &mut opt.v)?;
            }
            let st = state(step, cursor)?;
            last_saved = Some(checkpoint::save(
                &ckroot,
                &model.params,
                Some((&opt.m, &opt.v)),
                &st,
                tc.keep_last,
            )?);
        }
    }
    // The final save; skipped when the newest checkpoint already holds this step (re-saving
    // would briefly remove it).
    let fin = match last_saved.filter(|p| p.ends_with(checkpoint::checkpoint_name(step))) {
        Some(p) => p,
        None => {
            if let Some(k) = kstep.as_mut() {
                k.save_to(&mut model.params, &mut opt.m, &mut opt.v)?;
            }
            // The loop fetches ahead only for a step it will run: nothing is pending here.
            debug_assert!(ahead.is_none());
            let st = state(step, loader.cursor())?;
            checkpoint::save(
                &ckroot,
                &model.params,
                Some((&opt.m, &opt.v)),
                &st,
                tc.keep_last,
            )?
        }
    };
    Ok(TrainSummary {
        steps: step,
        checkpoint: fin,
        last,
    })
}

/// The raw crops of a batch loaded for the kernels.
fn raw_crops(b: &Batch) -> Result<&[u8]> {
    b.images_u8()
        .context("batch images are not u8 (the kernel trainer needs image_dtype U8)")
}

/// A kernel batch's crops normalised on the host by the device kernel's CPU reference.
fn normalised(b: &Batch) -> Result<Vec<f32>> {
    let raw = raw_crops(b)?;
    let s = b.image_size;
    let cfg = ImageNormConfig {
        b: b.size,
        h: s,
        w: s,
        mean: CLIP_MEAN,
        std: CLIP_STD,
    };
    let mut out = vec![half::bf16::ZERO; raw.len()];
    image_normalize_cpu(&cfg, raw, None, &mut out)?;
    Ok(out.iter().map(|v| v.to_f32()).collect())
}

/// Drops records after `step` from `metrics.jsonl` (a resumed run rewrites them).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<StepRecord>(l)
                .map(|r| r.step <= step)
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_file_synced(path, kept.as_bytes())?;
    Ok(())
}
