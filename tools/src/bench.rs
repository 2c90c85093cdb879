//! `mmkd bench train`: times the engine's training step on synthetic in-memory batches of a
//! config's shapes and reports samples/s, the step split into data / forward / backward /
//! optimiser, peak memory, model FLOPs per sample and model-FLOPs utilisation, as one JSON
//! object shared with `tools/torch_reference.py` (same flags, same synthetic shapes, same
//! caption lengths), so the two can be compared side by side.
//!
//! The step is the trainer's single-pass step (`trainer::accumulate_gradients` without
//! micro-batches, then the optimiser part of `trainer::train`), called piece by piece so that
//! each piece can be timed; the arithmetic is the same. The fused loss returns its own gradient,
//! so the loss is timed as part of the forward. On the CPU the benchmark always runs one pass
//! over the whole batch; on the kernels (`--device cuda|emu`) `train.micro_batch` and
//! `train.checkpointing` take effect as in training, and the JSON reports both.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mmkd_engine::checkpoint::{write_tensors, NamedTensor};
use mmkd_engine::flops::batch_flops;
use mmkd_engine::loss::{
    clip_loss, distill_loss, pick_random_teacher_seeded, DistillConfig, IclScale, LossParts,
    TeacherMode, TeacherTargets,
};
use mmkd_engine::optim::{clip_grad_norm, cosine_lr, grad_norm, AdamW, AdamWConfig};
use mmkd_engine::trainer::{load_configs, TrainConfig};
use mmkd_engine::{ClipModel, Device, ModelConfig, Tape, Tensor};
use mmkd_loaders::batch::{CLIP_MEAN, CLIP_STD};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::kstep::KernelTrainer;
use mmkd_engine::cuda::{packed_rows, KernelStep, KernelTarget, Section, ICL_SCALE};

/// Bf16 dense peak of an H200 as measured for this project (issue 6: about 790 TFLOP/s); the
/// default MFU denominator on CUDA.
pub const H200_BF16_PEAK_TFLOPS: f64 = 790.0;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Throughput benchmarks (JSON in the shape `tools/torch_reference.py` also writes).
    #[command(subcommand)]
    Bench(BenchKind),
}

#[derive(Subcommand)]
pub enum BenchKind {
    /// Time the stage-1 or stage-2 training step on synthetic batches of the config's shapes.
    Train(TrainBenchArgs),
    /// Train the same weights on the same batches on the CPU and on the kernels (GPU or
    /// emulation) and compare the loss curves step by step.
    Parity(ParityArgs),
    /// The device arena of the training step for a config and batch, section by section,
    /// without allocating it (weights, gradients, AdamW moments, activations kept for
    /// backward, scratch, index tables).
    Memory(MemoryArgs),
}

#[derive(Args, Debug)]
pub struct MemoryArgs {
    /// Model config TOML.
    #[arg(long)]
    config: PathBuf,
    /// Stage (stage 2 adds the teacher targets).
    #[arg(long, value_enum, default_value = "kd")]
    stage: BenchStage,
    /// Samples per step.
    #[arg(long)]
    batch: usize,
    /// Teacher slots of the stage-2 targets `[N, T, D]`.
    #[arg(long, default_value_t = 8)]
    teachers: usize,
    /// Activation checkpointing: each block keeps only its output and recomputes the rest
    /// in the backward.
    #[arg(long)]
    checkpointing: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Overrides `key=value` of the config.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Caption batches drawn for the text rows the step runs on (`bench train`'s first ones).
    #[arg(long, default_value_t = 20)]
    caption_batches: usize,
    #[command(flatten)]
    captions: CaptionArgs,
}

/// The caption lengths of the synthetic batches.
#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Median caption length in tokens (default: a quarter of the context length).
    #[arg(long)]
    caption_median: Option<f64>,
    /// Spread σ of the log-normal caption-length distribution.
    #[arg(long, default_value_t = 0.6)]
    caption_sigma: f64,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The synthetic batches of `bench train` and `bench parity`.
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Teacher slots of the synthetic stage-2 targets `[N, T, D]`.
    #[arg(long, default_value_t = 8)]
    teachers: usize,
    #[command(flatten)]
    captions: CaptionArgs,
}

#[derive(Args, Debug)]
pub struct ParityArgs {
    /// Model config TOML (an optional `[train]` table supplies the loss and optimiser settings).
    #[arg(long)]
    config: PathBuf,
    /// Stage.
    #[arg(long, value_enum, default_value = "kd")]
    stage: BenchStage,
    /// Samples per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Steps of both runs.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Where the kernels run: cuda, cuda:N or emu (the CPU emulation; small configs only).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Largest relative difference of a step's total loss.
    #[arg(long, default_value_t = 2e-2)]
    tol: f64,
    #[command(flatten)]
    data: SynthArgs,
    /// Also write the curves and the verdict as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Overrides `key=value` of the config (as `mmkd train --set`).
    #[arg(long = "set")]
    sets: Vec<String>,
}

/// Which loss the step trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchStage {
    /// Stage 1: CLIP loss.
    Clip,
    /// Stage 2: multi-teacher distillation.
    Kd,
}

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    /// Model config TOML (an optional `[train]` table supplies the loss and optimiser settings).
    #[arg(long)]
    config: PathBuf,
    /// Stage.
    #[arg(long, value_enum)]
    stage: BenchStage,
    /// Samples per step.
    #[arg(long)]
    batch: usize,
    /// Timed steps.
    #[arg(long)]
    steps: usize,
    /// Untimed warm-up steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Also write the JSON result to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Peak FLOP/s of the device in TFLOP/s for the MFU figure (default on CUDA: the H200 bf16
    /// dense figure; on the CPU no MFU is reported unless this is given).
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[command(flatten)]
    data: SynthArgs,
    /// Recompute each transformer block during backward (activation checkpointing).
    #[arg(long)]
    checkpointing: bool,
    /// Write the initial weights (DIR/model.safetensors), the first batch
    /// (DIR/batch.safetensors) and the engine's loss on it (DIR/loss.json) for
    /// `tools/torch_reference.py --parity-weights --parity-batch`.
    #[arg(long)]
    save_parity: Option<PathBuf>,
    /// Overrides `key=value` of the config (as `mmkd train --set`).
    #[arg(long = "set")]
    sets: Vec<String>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Bench(BenchKind::Train(a)) => bench_train(&a),
        BenchCommand::Bench(BenchKind::Parity(a)) => bench_parity(&a),
        BenchCommand::Bench(BenchKind::Memory(a)) => bench_memory(&a),
    }
}

/// SplitMix64, also implemented by `tools/torch_reference.py`: both tools draw the same caption
/// lengths from the same seed, so they time the same amount of text work.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A uniform double in `[0, 1)` from the top 53 bits (exact in both languages).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Caption lengths of `batch` rows: log-normal around `median` with spread `sigma` (biomedical
/// figure captions have a long right tail), the normal deviate approximated by a sum of twelve
/// uniforms so that only additions and one `exp` are involved, clamped to `2..=context`
/// (`[CLS]` and `[SEP]` at least).
pub fn caption_lengths(
    rng: &mut SplitMix64,
    batch: usize,
    median: f64,
    sigma: f64,
    context: usize,
) -> Vec<usize> {
    (0..batch)
        .map(|_| {
            let mut z = -6.0;
            for _ in 0..12 {
                z += rng.next_f64();
            }
            let n = (median * (sigma * z).exp()).floor();
            (n.max(2.0) as usize).min(context.max(2))
        })
        .collect()
}

/// Synthetic raw data: `u8` images, full-context token rows and teacher targets, built once;
/// each step assembles a model batch from them (that assembly is the timed "data" part).
struct Synthetic {
    batch: usize,
    channels: usize,
    image_size: usize,
    /// `(B, C, S, S)` u8.
    images_u8: Vec<u8>,
    /// `(B, context)` token ids, `[CLS]`-like id first.
    tokens: Vec<u32>,
    context: usize,
    /// Teacher targets `[N, T, D]` (unit-norm rows) and availability `[N, T]`.
    teacher_image: Vec<f32>,
    teacher_text: Vec<f32>,
    mask: Vec<bool>,
    teachers: usize,
}

fn unit_rows(rng: &mut SplitMix64, rows: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..rows * d)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect();
    for r in v.chunks_exact_mut(d) {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= n);
    }
    v
}

impl Synthetic {
    /// The raw crops for the kernels' on-device normalisation (3-channel images only).
    fn pixels(&self) -> Option<&[u8]> {
        (self.channels == 3).then_some(self.images_u8.as_slice())
    }

    fn new(cfg: &ModelConfig, batch: usize, teachers: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x5EED_DA7A);
        let s = cfg.vision.image_size;
        let c = cfg.vision.channels;
        let images_u8 = (0..batch * c * s * s)
            .map(|_| (rng.next_u64() >> 56) as u8)
            .collect();
        let ctx = cfg.text.context_length;
        let vocab = cfg.text.vocab_size as u64;
        let tokens = (0..batch * ctx)
            .map(|i| {
                if i % ctx == 0 {
                    // A fixed class-token id, as a tokenizer's [CLS].
                    (2 % vocab) as u32
                } else {
                    (rng.next_u64() % vocab) as u32
                }
            })
            .collect();
        let d = cfg.embed_dim;
        let teacher_image = unit_rows(&mut rng, batch * teachers, d);
        let teacher_text = unit_rows(&mut rng, batch * teachers, d);
        // Each teacher is available for about three samples in four; every sample has one.
        let mut mask: Vec<bool> = (0..batch * teachers)
            .map(|_| rng.next_f64() < 0.75)
            .collect();
        for i in 0..batch {
            if !mask[i * teachers..(i + 1) * teachers].iter().any(|&m| m) {
                mask[i * teachers + (rng.next_u64() % teachers as u64) as usize] = true;
            }
        }
        Synthetic {
            batch,
            channels: c,
            image_size: s,
            images_u8,
            tokens,
            context: ctx,
            teacher_image,
            teacher_text,
            mask,
            teachers,
        }
    }
}

/// One step's model inputs.
pub(crate) struct StepInputs {
    /// The crops normalised on the host; absent when the step normalises the raw u8 crops on
    /// the device itself (see [`assemble`]).
    pub(crate) images: Option<Tensor>,
    pub(crate) tokens: Tensor,
    pub(crate) lengths: Vec<usize>,
    /// Targets handed to the loss: `[N, T', D]` and mask `[N, T']` (`T' = 1` in random mode).
    pub(crate) t_image: Vec<f32>,
    pub(crate) t_text: Vec<f32>,
    pub(crate) t_mask: Vec<bool>,
    pub(crate) t_slots: usize,
}

impl StepInputs {
    /// The host-normalised crops.
    pub(crate) fn images(&self) -> Result<&Tensor> {
        self.images
            .as_ref()
            .ok_or_else(|| anyhow!("the batch was assembled without host-normalised images"))
    }
}

/// Assembles a batch as the loader hands it over: images normalised with CLIP's statistics
/// (only `with_images`: the kernel step takes the u8 crops and normalises them on the device,
/// and host work it would throw away must not count as its data time), tokens padded to the
/// longest caption, one teacher drawn per sample in random mode.
fn assemble(
    syn: &Synthetic,
    lengths: Vec<usize>,
    stage: BenchStage,
    mode: TeacherMode,
    d: usize,
    step_seed: u64,
    with_images: bool,
) -> Result<StepInputs> {
    let (b, s) = (syn.batch, syn.image_size);
    let plane = s * s;
    let images = if with_images {
        let mut images = vec![0f32; syn.images_u8.len()];
        for (k, (o, &p)) in images.iter_mut().zip(&syn.images_u8).enumerate() {
            // CLIP's statistics are per RGB channel; a config with other channels reuses them.
            let c = (k / plane) % syn.channels % 3;
            *o = (p as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
        Some(Tensor::from_f32(images, &[b, syn.channels, s, s])?)
    } else {
        None
    };
    let l = lengths.iter().copied().max().unwrap_or(1);
    let mut tokens = vec![0u32; b * l];
    for (i, &n) in lengths.iter().enumerate() {
        tokens[i * l..i * l + n].copy_from_slice(&syn.tokens[i * syn.context..i * syn.context + n]);
    }
    let tokens = Tensor::from_u32(tokens, &[b, l])?;
    let (t_image, t_text, t_mask, t_slots) = match (stage, mode) {
        (BenchStage::Clip, _) => (Vec::new(), Vec::new(), Vec::new(), 0),
        (BenchStage::Kd, TeacherMode::Random) => {
            let all = TeacherTargets {
                image: &syn.teacher_image,
                text: &syn.teacher_text,
                mask: &syn.mask,
                teachers: syn.teachers,
            };
            let (ti, tt) = pick_random_teacher_seeded(&all, b, d, step_seed)?;
            (ti, tt, vec![true; b], 1)
        }
        (BenchStage::Kd, _) => (
            syn.teacher_image.clone(),
            syn.teacher_text.clone(),
            syn.mask.clone(),
            syn.teachers,
        ),
    };
    Ok(StepInputs {
        images,
        tokens,
        lengths,
        t_image,
        t_text,
        t_mask,
        t_slots,
    })
}

/// Seconds spent in each part of one step, and what the forward kept for backward.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StepTimes {
    pub(crate) data: f64,
    pub(crate) forward: f64,
    pub(crate) backward: f64,
    pub(crate) optimizer: f64,
    /// Bytes the tape held for backward after the forward (`Tape::activation_bytes`).
    pub(crate) activation_bytes: usize,
    /// The rows the text tower ran on: the valid tokens, packed (the kernels round each
    /// pass's up to their row tile).
    pub(crate) text_rows: usize,
}

/// The model, optimiser and loss settings of a benchmark run.
struct Trainer {
    model: ClipModel,
    opt: AdamW,
    train: TrainConfig,
    distill: DistillConfig,
    icl_id: Option<mmkd_engine::ParamId>,
    device: Device,
    stage: BenchStage,
    step: u64,
    total_steps: u64,
}

impl Trainer {
    /// One training step on `inp`; returns the loss and adds the forward / backward /
    /// optimiser times to `t`.
    fn step(&mut self, inp: &StepInputs, t: &mut StepTimes) -> Result<LossParts> {
        let j = self.model.config.embed_dim;
        let n = inp.lengths.len();
        let t0 = Instant::now();
        let mut tape = Tape::on(self.device, true);
        let vi = self.model.encode_image(&mut tape, inp.images()?)?;
        let vt = self
            .model
            .encode_text(&mut tape, &inp.tokens, &inp.lengths)?;
        let s = self.model.logit_scale();
        let (fi, ft) = (tape.value(vi), tape.value(vt));
        let (parts, d_image, d_text, d_s, d_icl) = match self.stage {
            BenchStage::Clip => {
                let (task, g) = clip_loss(fi, ft, s, n, j)?;
                let parts = LossParts {
                    task,
                    fd: 0.0,
                    icl: 0.0,
                    total: task,
                };
                (parts, g.image, g.text, g.logit_scale, None)
            }
            BenchStage::Kd => {
                let cfg = match (self.icl_id, self.distill.icl_scale) {
                    (Some(id), IclScale::Learned(_)) => DistillConfig {
                        icl_scale: IclScale::Learned(self.model.params.value(id)[0] as f64),
                        ..self.distill
                    },
                    _ => self.distill,
                };
                let targets = TeacherTargets {
                    image: &inp.t_image,
                    text: &inp.t_text,
                    mask: &inp.t_mask,
                    teachers: inp.t_slots,
                };
                let (parts, g) = distill_loss(fi, ft, s, &targets, &cfg, n, j)?;
                (parts, g.image, g.text, g.logit_scale, g.icl_scale)
            }
        };
        let t1 = Instant::now();
        // Measured outside the timed parts.
        t.activation_bytes = tape.activation_bytes();
        // The tape packs the valid tokens (`ClipModel::encode_text`).
        t.text_rows = inp.lengths.iter().sum();
        let t1b = Instant::now();
        self.model.params.zero_grad();
        tape.backward(&mut self.model.params, &[(vi, &d_image), (vt, &d_text)])?;
        let t2 = Instant::now();
        let ls = self.model.logit_scale_id();
        self.model.params.grad_of_mut(ls)[0] += d_s;
        if let (Some(id), Some(g)) = (self.icl_id, d_icl) {
            self.model.params.grad_of_mut(id)[0] += g;
        }
        let gnorm = grad_norm(self.model.params.grad());
        if !parts.is_finite() || !gnorm.is_finite() {
            bail!(
                "non-finite loss or gradient at benchmark step {}: total {}, grad norm {gnorm}",
                self.step + 1,
                parts.total
            );
        }
        clip_grad_norm(self.model.params.grad_mut(), self.train.grad_clip);
        let lr = cosine_lr(
            self.step,
            self.train.lr,
            self.train.warmup,
            self.total_steps,
        );
        self.opt.step(&mut self.model.params, lr);
        self.model.clamp_logit_scale();
        self.step += 1;
        let t3 = Instant::now();
        t.forward += (t1 - t0).as_secs_f64();
        t.backward += (t2 - t1b).as_secs_f64();
        t.optimizer += (t3 - t2).as_secs_f64();
        Ok(parts)
    }
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_vm_hwm(&status).context("/proc/self/status has no VmHWM line")
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut it = line["VmHWM:".len()..].split_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => Some(v * 1024),
        _ => None,
    }
}

/// Where a benchmark runs the training step.
enum Target {
    /// The engine's CPU backend (the tape and its ops).
    Cpu,
    /// The project's kernels over one arena: a GPU, or their CPU emulation.
    Kernels(KernelTarget),
}

/// Resolves `--device` ([`KernelTarget::resolve`]): the CPU backend unless it names the
/// kernels on a GPU or under the emulation.
fn resolve_target(req: &str) -> Result<Target> {
    Ok(match KernelTarget::resolve(req)? {
        Some(k) => Target::Kernels(k),
        None => Target::Cpu,
    })
}

impl Target {
    fn label(&self) -> String {
        match self {
            Target::Cpu => Device::Cpu.to_string(),
            Target::Kernels(k) => k.label(),
        }
    }
}

/// The step of either backend.
enum Stepper {
    Cpu(Box<Trainer>),
    Kernels(Box<KernelTrainer>),
}

impl Stepper {
    /// One step; the kernels take the raw crops `pixels` when given (see
    /// [`KernelTrainer::step`]).
    fn step(
        &mut self,
        inp: &StepInputs,
        pixels: Option<&[u8]>,
        t: &mut StepTimes,
    ) -> Result<LossParts> {
        match self {
            Stepper::Cpu(c) => c.step(inp, t),
            Stepper::Kernels(k) => k.step(inp, pixels, t),
        }
    }
}

/// What both backends are built from: the configs, the loss, and the model's initial weights.
struct Setup {
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    distill: DistillConfig,
    stage: BenchStage,
    total_steps: u64,
}

impl Setup {
    fn load(
        config: &Path,
        sets: &[String],
        batch: usize,
        stage: BenchStage,
        total_steps: u64,
    ) -> Result<Self> {
        let mut sets = sets.to_vec();
        sets.push(format!("train.batch_size={batch}"));
        let (mcfg, tcfg) = load_configs(config, &sets)?;
        let distill = tcfg.distill()?;
        Ok(Setup {
            mcfg,
            tcfg,
            distill,
            stage,
            total_steps,
        })
    }

    /// The model at its seeded initial weights (the same weights on every call), with the
    /// learned icl scale `ℓ` as an extra parameter when stage 2 learns it.
    fn model(&self) -> Result<ClipModel> {
        let mut model = ClipModel::new(&self.mcfg)?;
        if let (BenchStage::Kd, IclScale::Learned(l)) = (self.stage, self.distill.icl_scale) {
            model.params.add(ICL_SCALE, &[], |x| x[0] = l as f32)?;
        }
        Ok(model)
    }

    /// The CPU trainer from `model` (with activation checkpointing when the train config
    /// asks for it).
    fn cpu(&self, mut model: ClipModel) -> Result<Trainer> {
        model.set_checkpointing(self.tcfg.checkpointing);
        let icl_id = model.params.id(ICL_SCALE);
        let t = &self.tcfg;
        let opt = AdamW::new(
            &model.params,
            AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
        );
        Ok(Trainer {
            model,
            opt,
            train: t.clone(),
            distill: self.distill,
            icl_id,
            device: Device::Cpu,
            stage: self.stage,
            step: 0,
            total_steps: self.total_steps,
        })
    }

    /// The kernel trainer from `model` for batches of `batch` with `teachers` synthetic
    /// teachers.
    fn kernels(
        &self,
        target: &KernelTarget,
        model: &ClipModel,
        batch: usize,
        teachers: usize,
    ) -> Result<KernelTrainer> {
        KernelTrainer::new(
            target,
            model,
            &self.tcfg,
            self.distill,
            batch,
            self.slots(teachers),
            self.total_steps,
        )
    }

    /// Teacher slots of the loss's targets: one in random mode (the drawn teacher), else all.
    fn slots(&self, teachers: usize) -> usize {
        match (self.stage, self.distill.teacher_mode) {
            (BenchStage::Clip, _) => 0,
            (BenchStage::Kd, TeacherMode::Random) => 1,
            (BenchStage::Kd, _) => teachers,
        }
    }
}

/// The caption lengths of a run's batches, drawn in order ([`caption_lengths`]).
struct CaptionDraws {
    rng: SplitMix64,
    median: f64,
    sigma: f64,
    context: usize,
}

impl CaptionArgs {
    /// The draws for a text tower of `context` tokens (median: a quarter of it by default).
    fn draws(&self, context: usize) -> Result<CaptionDraws> {
        let sigma = self.caption_sigma;
        if !(sigma >= 0.0 && sigma.is_finite()) {
            bail!("--caption-sigma must be a finite number ≥ 0");
        }
        let median = self.caption_median.unwrap_or(context as f64 / 4.0);
        if !(median >= 1.0 && median.is_finite()) {
            bail!("--caption-median must be a finite number ≥ 1");
        }
        Ok(CaptionDraws {
            rng: SplitMix64::new(self.seed),
            median,
            sigma,
            context,
        })
    }
}

impl CaptionDraws {
    /// The next batch's `batch` lengths.
    fn next(&mut self, batch: usize) -> Vec<usize> {
        caption_lengths(&mut self.rng, batch, self.median, self.sigma, self.context)
    }
}

fn bench_train(a: &TrainBenchArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be at least 1");
    }
    if a.data.teachers == 0 {
        bail!("--teachers must be at least 1");
    }
    let total = (a.warmup + a.steps) as u64;
    let mut setup = Setup::load(&a.config, &a.sets, a.batch, a.stage, total)?;
    setup.tcfg.checkpointing |= a.checkpointing;
    let (mcfg, distill) = (&setup.mcfg, setup.distill);
    let target = resolve_target(&a.device)?;
    let on_gpu = matches!(target, Target::Kernels(KernelTarget::Gpu(_)));
    let peak_tflops = match (a.peak_tflops, on_gpu) {
        (Some(p), _) if !(p > 0.0 && p.is_finite()) => bail!("--peak-tflops must be positive"),
        (Some(p), _) => Some(p),
        (None, true) => Some(H200_BF16_PEAK_TFLOPS),
        (None, false) => None,
    };
    let mut captions = a.data.captions.draws(mcfg.text.context_length)?;

    // One model: the CPU step trains it, the kernels copy it into their arena and it is
    // dropped (a second copy of ViT-B/16 + BERT's weights and gradients is 1.5 GB).
    let model = setup.model()?;
    if let Some(dir) = &a.save_parity {
        save_parity_weights(dir, &model)?;
    }
    // Device memory in use before the step's arena and kernels exist (the context, and on a
    // GPU whatever else runs there): `peak_mem_bytes` counts what the step added.
    let used_before = match &target {
        Target::Kernels(k) => k.device_used_bytes()?,
        Target::Cpu => None,
    };
    let mut stepper = match &target {
        Target::Cpu => Stepper::Cpu(Box::new(setup.cpu(model)?)),
        Target::Kernels(k) => {
            let kern = setup.kernels(k, &model, a.batch, a.data.teachers)?;
            drop(model);
            Stepper::Kernels(Box::new(kern))
        }
    };
    let syn = Synthetic::new(mcfg, a.batch, a.data.teachers, a.data.captions.seed);

    let mut times = StepTimes::default();
    let mut flops = 0.0;
    let (mut tokens, mut text_rows) = (0usize, 0usize);
    let mut last = LossParts::default();
    let mut act_max = 0usize;
    // On a GPU the timed steps are the capture range of a profiler attached through the CUDA
    // profiler API, so a kernel profile holds steady-state steps only (a step ends with its
    // kernels done: it reads back the clamped logit scale).
    let capture = |on: bool| {
        if let Target::Kernels(k @ KernelTarget::Gpu(_)) = &target {
            if let Err(e) = k.profiler_capture(on) {
                eprintln!("warning: {e:#}");
            }
        }
    };
    for i in 0..a.warmup + a.steps {
        let timed = i >= a.warmup;
        if i == a.warmup {
            capture(true);
        }
        let mut t = StepTimes::default();
        let t0 = Instant::now();
        let lengths = captions.next(a.batch);
        if timed {
            flops += batch_flops(mcfg, &lengths);
            tokens += lengths.iter().sum::<usize>();
        }
        // The kernel step stages the u8 crops and normalises them on the device; the CPU
        // step, a config without three channels and the saved parity inputs need them on
        // the host.
        let with_images = !matches!(stepper, Stepper::Kernels(_))
            || syn.pixels().is_none()
            || (i == 0 && a.save_parity.is_some());
        let inp = assemble(
            &syn,
            lengths,
            a.stage,
            distill.teacher_mode,
            mcfg.embed_dim,
            a.data.captions.seed.wrapping_add(i as u64),
            with_images,
        )?;
        t.data = t0.elapsed().as_secs_f64();
        if let (0, Some(dir)) = (i, &a.save_parity) {
            save_parity_batch(dir, &inp)?;
        }
        last = stepper.step(&inp, syn.pixels(), &mut t)?;
        if let (0, Some(dir)) = (i, &a.save_parity) {
            write_json(
                &dir.join("loss.json"),
                &serde_json::to_string_pretty(&last)?,
            )?;
        }
        if timed {
            times.data += t.data;
            times.forward += t.forward;
            times.backward += t.backward;
            times.optimizer += t.optimizer;
            act_max = act_max.max(t.activation_bytes);
            text_rows += t.text_rows;
        }
        eprintln!(
            "{} step {}/{}: {:.1} ms, loss {:.4}",
            if timed { "timed" } else { "warm-up" },
            if timed { i - a.warmup + 1 } else { i + 1 },
            if timed { a.steps } else { a.warmup },
            (t.data + t.forward + t.backward + t.optimizer) * 1e3,
            last.total
        );
    }
    capture(false);
    let steps = a.steps as f64;
    let ms = |s: f64| s / steps * 1e3;
    let total_s = times.data + times.forward + times.backward + times.optimizer;
    let samples_per_s = (a.batch as f64 * steps) / total_s;
    let flops_per_sample = flops / (a.batch as f64 * steps);
    let achieved = flops / total_s;
    // On the kernels the activations kept for backward are the arena's activation section,
    // sized for the longest caption. The step allocates nothing after its arena, so the
    // device memory it added is its peak; PyTorch reports its allocator's peak of live
    // tensors, which likewise leaves the context out. `device_used_bytes` is the whole
    // device's use at the end, context included, on both sides.
    let (peak_mem, device_used, arena_bytes) = match (&target, &stepper) {
        (Target::Kernels(t), Stepper::Kernels(k)) => {
            act_max = k.activation_bytes();
            let used = t.device_used_bytes()?;
            let added = used.zip(used_before).map(|(u, b)| u.saturating_sub(b));
            (added, used, Some(k.arena_bytes()))
        }
        _ => (Some(peak_rss_bytes()?), None, None),
    };
    let out = serde_json::json!({
        "engine": "mmkd",
        "device": target.label(),
        "config": a.config.display().to_string(),
        "stage": match a.stage { BenchStage::Clip => "clip", BenchStage::Kd => "kd" },
        "batch": a.batch,
        "steps": a.steps,
        "warmup": a.warmup,
        "samples_per_s": samples_per_s,
        "ms_per_step": {
            "data": ms(times.data),
            "forward": ms(times.forward),
            "backward": ms(times.backward),
            "optimizer": ms(times.optimizer),
            "total": ms(total_s),
        },
        "peak_mem_bytes": peak_mem,
        "device_used_bytes": device_used,
        "arena_bytes": arena_bytes,
        "flops_per_sample": flops_per_sample,
        // The largest step's saved activations over its batch (the caption lengths vary).
        "activation_bytes_per_sample": act_max as f64 / a.batch as f64,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_tflops,
        "mfu": peak_tflops.map(|p| achieved / (p * 1e12)),
        "text_tokens_per_sample": tokens as f64 / (a.batch as f64 * steps),
        "text_rows_per_sample": text_rows as f64 / (a.batch as f64 * steps),
        "teacher_mode": format!("{:?}", distill.teacher_mode).to_lowercase(),
        "checkpointing": setup.tcfg.checkpointing,
        "micro_batch": setup.tcfg.micro_batch,
        // The tensor-core instruction the step's products ran on (kernels only).
        "gemm_path": match &stepper {
            Stepper::Kernels(k) => Some(k.gemm_path().name()),
            Stepper::Cpu(_) => None,
        },
        "last_loss": last.total,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &a.json {
        write_json(p, &text)?;
    }
    Ok(())
}

/// `mmkd bench memory`: the arena's table for the step, summed per section.
fn bench_memory(a: &MemoryArgs) -> Result<()> {
    if a.batch == 0 || a.teachers == 0 {
        bail!("--batch and --teachers must be at least 1");
    }
    let setup = Setup::load(&a.config, &a.sets, a.batch, a.stage, 1)?;
    let checkpointing = a.checkpointing || setup.tcfg.checkpointing;
    let lay = KernelStep::layout_for(
        &setup.mcfg,
        setup.distill,
        a.batch,
        setup.slots(a.teachers),
        checkpointing,
        setup.tcfg.micro_batch,
    )?;
    let sections = [
        ("params_f32", Section::Params),
        ("params_bf16", Section::ParamsBf16),
        ("grads_f32", Section::Grads),
        ("adamw_moments", Section::Optim),
        ("activations", Section::Acts),
        ("scratch", Section::Scratch),
        ("tables", Section::Tables),
    ];
    let mut by = serde_json::Map::new();
    for (name, sec) in sections {
        by.insert(name.into(), lay.section_bytes(sec).into());
    }
    let acts = lay.section_bytes(Section::Acts);
    let text = text_rows(&setup.mcfg, a, setup.tcfg.micro_batch)?;
    let out = serde_json::json!({
        "config": a.config.display().to_string(),
        "stage": match a.stage { BenchStage::Clip => "clip", BenchStage::Kd => "kd" },
        "batch": a.batch,
        "checkpointing": checkpointing,
        "text_len": setup.mcfg.text.context_length,
        "arena_bytes": lay.bytes(),
        "sections": by,
        "activation_bytes_per_sample": acts as f64 / a.batch as f64,
        "regions": lay.regions().len(),
        "text_rows": text,
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(p) = &a.json {
        write_json(p, &text)?;
    }
    Ok(())
}

/// The rows the step's text tower runs on at `bench train`'s caption lengths, against padding
/// each batch to its longest caption (what the step did before it packed, and what
/// `tools/torch_reference.py` does): per sample, with the training FLOPs of both
/// (`flops::batch_flops`; the packed rows' filler, under 64 per pass, is not counted).
fn text_rows(mcfg: &ModelConfig, a: &MemoryArgs, micro: usize) -> Result<serde_json::Value> {
    let ctx = mcfg.text.context_length;
    let mut captions = a.captions.draws(ctx)?;
    if a.caption_batches == 0 {
        bail!("--caption-batches must be at least 1");
    }
    let pass = if micro == 0 { a.batch } else { micro };
    let (mut tokens, mut padded, mut packed) = (0usize, 0usize, 0usize);
    let (mut f_tokens, mut f_padded) = (0.0, 0.0);
    for _ in 0..a.caption_batches {
        let lengths = captions.next(a.batch);
        let longest = lengths.iter().copied().max().unwrap_or(0);
        tokens += lengths.iter().sum::<usize>();
        padded += longest * a.batch;
        for p in lengths.chunks(pass) {
            packed += packed_rows(p.iter().sum(), p.len() * ctx);
        }
        f_tokens += batch_flops(mcfg, &lengths);
        f_padded += batch_flops(mcfg, &vec![longest; a.batch]);
    }
    let samples = (a.batch * a.caption_batches) as f64;
    Ok(serde_json::json!({
        "caption_batches": a.caption_batches,
        "tokens_per_sample": tokens as f64 / samples,
        "packed_rows_per_sample": packed as f64 / samples,
        "padded_rows_per_sample": padded as f64 / samples,
        "flops_per_sample": f_tokens / samples,
        "padded_flops_per_sample": f_padded / samples,
    }))
}

/// Relative difference of `b` from `a`, against `|a|` (at least 1e-6).
fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(1e-6)
}

/// `mmkd bench parity`: both backends from the same initial weights, on the same batches
/// with the same schedule; the step's total loss must agree within `--tol` at every step.
fn bench_parity(a: &ParityArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 || a.data.teachers == 0 {
        bail!("--batch, --steps and --teachers must be at least 1");
    }
    if !(a.tol > 0.0 && a.tol.is_finite()) {
        bail!("--tol must be a positive number");
    }
    let target = match resolve_target(&a.device)? {
        Target::Kernels(k) => k,
        Target::Cpu => bail!(
            "`--device {}` resolved to the CPU: parity compares the CPU with the kernels \
             (cuda, cuda:N or emu)",
            a.device
        ),
    };
    let setup = Setup::load(&a.config, &a.sets, a.batch, a.stage, a.steps as u64)?;
    let mcfg = &setup.mcfg;
    let mut captions = a.data.captions.draws(mcfg.text.context_length)?;
    let model = setup.model()?;
    let mut kern = setup.kernels(&target, &model, a.batch, a.data.teachers)?;
    let mut cpu = setup.cpu(model)?;
    let syn = Synthetic::new(mcfg, a.batch, a.data.teachers, a.data.captions.seed);
    let mut rows = Vec::with_capacity(a.steps);
    let mut worst = (0usize, 0.0f64);
    eprintln!(
        "parity: {} on cpu and {} ({} products), batch {}, {} steps, tolerance {:.1e}",
        a.config.display(),
        target.label(),
        kern.gemm_path().name(),
        a.batch,
        a.steps,
        a.tol
    );
    for i in 0..a.steps {
        let lengths = captions.next(a.batch);
        let inp = assemble(
            &syn,
            lengths,
            a.stage,
            setup.distill.teacher_mode,
            mcfg.embed_dim,
            a.data.captions.seed.wrapping_add(i as u64),
            true,
        )?;
        let mut t = StepTimes::default();
        let c = cpu.step(&inp, &mut t)?;
        let k = kern
            .step(&inp, syn.pixels(), &mut t)
            .map_err(|e| e.context(format!("kernel step {} of the parity run", i + 1)))?;
        let rel = rel_diff(c.total, k.total);
        // A non-finite difference is the worst step.
        if rel.is_nan() || rel > worst.1 {
            worst = (i + 1, rel);
        }
        eprintln!(
            "step {:>3}: cpu {:.5}  {} {:.5}  relative {:.2e}",
            i + 1,
            c.total,
            target.label(),
            k.total,
            rel
        );
        rows.push(serde_json::json!({
            "step": i + 1,
            "cpu": c,
            "kernels": k,
            "rel_total": rel,
        }));
    }
    let pass = worst.1 <= a.tol;
    let out = serde_json::json!({
        "config": a.config.display().to_string(),
        "device": target.label(),
        "stage": match a.stage { BenchStage::Clip => "clip", BenchStage::Kd => "kd" },
        "batch": a.batch,
        "steps": a.steps,
        "tol": a.tol,
        "gemm_path": kern.gemm_path().name(),
        "max_rel_total": worst.1,
        "worst_step": worst.0,
        "pass": pass,
        "curve": rows,
    });
    let text = serde_json::to_string_pretty(&out)?;
    if let Some(p) = &a.json {
        write_json(p, &text)?;
    }
    if !pass {
        bail!(
            "the loss curves differ: step {} has relative difference {:.3e} > {:.1e}",
            worst.0,
            worst.1,
            a.tol
        );
    }
    eprintln!(
        "parity: pass, largest relative difference {:.2e} at step {}",
        worst.1, worst.0
    );
    Ok(())
}

/// Writes the weights before the first step of a `--save-parity` run into `dir`
/// (`model.safetensors`).
fn save_parity_weights(dir: &Path, model: &ClipModel) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    model
        .params
        .save_safetensors(&dir.join("model.safetensors"))?;
    Ok(())
}

/// Writes the first step's inputs of a `--save-parity` run (every tensor as f32: images,
/// tokens, lengths, teacher targets and mask) beside its weights (`batch.safetensors`).
fn save_parity_batch(dir: &Path, inp: &StepInputs) -> Result<()> {
    let as_f32 = |v: &[u32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let n = inp.lengths.len();
    let mut t: BTreeMap<String, NamedTensor> = BTreeMap::new();
    t.insert(
        "images".into(),
        (
            inp.images()?.shape().to_vec(),
            inp.images()?.as_f32()?.to_vec(),
        ),
    );
    t.insert(
        "tokens".into(),
        (inp.tokens.shape().to_vec(), as_f32(inp.tokens.as_u32()?)),
    );
    t.insert(
        "lengths".into(),
        (vec![n], inp.lengths.iter().map(|&x| x as f32).collect()),
    );
    if inp.t_slots > 0 {
        let d = inp.t_image.len() / (n * inp.t_slots);
        let shape = vec![n, inp.t_slots, d];
        t.insert("teacher_image".into(), (shape.clone(), inp.t_image.clone()));
        t.insert("teacher_text".into(), (shape, inp.t_text.clone()));
        let mask = inp.t_mask.iter().map(|&m| f32::from(u8::from(m))).collect();
        t.insert("teacher_mask".into(), (vec![n, inp.t_slots], mask));
    }
    write_tensors(&dir.join("batch.safetensors"), &t)?;
    Ok(())
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_json(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{text}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn caption_lengths_stay_in_range_with_a_tail() {
        let mut r = SplitMix64::new(7);
        let l = caption_lengths(&mut r, 4000, 64.0, 0.6, 256);
        assert!(l.iter().all(|&n| (2..=256).contains(&n)));
        let mut s = l.clone();
        s.sort_unstable();
        let med = s[s.len() / 2] as f64;
        assert!((med - 64.0).abs() < 6.0, "median {med}");
        assert!(s[s.len() * 95 / 100] > 120, "no right tail: {s:?}");
    }

    #[test]
    fn vm_hwm_is_parsed_in_bytes() {
        let st = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 10 kB\n";
        assert_eq!(parse_vm_hwm(st), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB\n"), None);
        assert!(peak_rss_bytes().unwrap() > 0);
    }
}
