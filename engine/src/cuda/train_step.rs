//! `mmkd train` on the kernels: one [`CudaStudent`] over one arena takes the loader's batches,
//! and the weights and AdamW moments come back to the host only for checkpoints (in the CPU
//! trainer's order, so a checkpoint written on either backend resumes on the other).

use super::arena::{Arena, Layout};
use super::student::{CudaStudent, Images, StepReport, StudentBatch, StudentSetup};
use super::target::KernelTarget;
use crate::config::ModelConfig;
use crate::loss::distill::{DistillConfig, TeacherMode};
use crate::optim::AdamWConfig;
use crate::params::ParamStore;
use crate::trainer::TrainConfig;
use anyhow::{ensure, Result};
use mmkd_kernels::gemm::GemmPath;
use mmkd_loaders::batch::{Batch, TeacherMode as LoadMode};

/// The student's setup for a run's shapes.
fn setup(
    model: &ModelConfig,
    distill: DistillConfig,
    adamw: AdamWConfig,
    grad_clip: f64,
    batch: usize,
    slots: usize,
) -> StudentSetup {
    // A drawn teacher arrives as the only slot: the kernel's `all` mode over one slot is the
    // random mode's loss (weight 1 per sample).
    let loss = match distill.teacher_mode {
        TeacherMode::Random => DistillConfig {
            teacher_mode: TeacherMode::All,
            ..distill
        },
        _ => distill,
    };
    StudentSetup {
        batch,
        text_len: model.text.context_length,
        teachers: slots,
        loss,
        adamw,
        grad_clip,
        recompute: false,
        gemm: GemmPath::MmaSync,
        micro_batch: 0,
    }
}

/// The device step of a training run.
pub struct KernelStep {
    student: CudaStudent,
    arena: Arena,
    target: KernelTarget,
}

impl KernelStep {
    /// Lays out the arena for batches of `batch` pairs (tokens up to the config's context
    /// length) and `slots` teacher slots (0 for stage 1, 1 when the loader draws one teacher
    /// per sample, else the dataset's teacher count), and loads `params` (which hold
    /// `icl_scale` when the distillation's icl scale is learned).
    pub fn new(
        target: &KernelTarget,
        model: &ModelConfig,
        train: &TrainConfig,
        distill: DistillConfig,
        batch: usize,
        slots: usize,
        params: &ParamStore,
    ) -> Result<Self> {
        let adamw = AdamWConfig {
            beta1: train.beta1,
            beta2: train.beta2,
            eps: train.eps,
            weight_decay: train.weight_decay,
        };
        let s = StudentSetup {
            recompute: train.checkpointing,
            gemm: target.checked_gemm_path()?,
            micro_batch: train.micro_batch,
            ..setup(model, distill, adamw, train.grad_clip, batch, slots)
        };
        let mut student = CudaStudent::new(model, s)?;
        let mut arena = target.arena(student.layout().clone())?;
        student.load_params(&mut arena, params)?;
        Ok(KernelStep {
            student,
            arena,
            target: target.clone(),
        })
    }

    /// The arena's table for these shapes on an sm_90 GPU (with activation checkpointing under
    /// `recompute`, passes of `micro_batch` samples when it is not 0), built without allocating
    /// anything.
    pub fn layout_for(
        model: &ModelConfig,
        distill: DistillConfig,
        batch: usize,
        slots: usize,
        recompute: bool,
        micro_batch: usize,
    ) -> Result<Layout> {
        // Sized for the path of an H100/H200 (wgmma).
        let s = StudentSetup {
            recompute,
            micro_batch,
            gemm: GemmPath::Wgmma,
            ..setup(model, distill, AdamWConfig::default(), 0.0, batch, slots)
        };
        Ok(CudaStudent::new(model, s)?.layout().clone())
    }

    /// Where the step runs.
    pub fn target(&self) -> &KernelTarget {
        &self.target
    }

    /// The tensor-core instruction the step's products run on (after the check of
    /// [`KernelTarget::checked_gemm_path`]).
    pub fn gemm_path(&self) -> GemmPath {
        self.student.gemm_path()
    }

    /// The arena's table of regions.
    pub fn layout(&self) -> &Layout {
        self.student.layout()
    }

    /// Stages raw crops for a later step with [`Images::Staged`] (see
    /// [`CudaStudent::stage_pixels`]).
    pub fn stage_pixels(&mut self, pixels: &[u8]) -> Result<()> {
        self.student.stage_pixels(&mut self.arena, pixels)
    }

    /// One optimiser step on a batch already in the student's form.
    pub fn step_batch(&mut self, batch: &StudentBatch<'_>, lr: f64) -> Result<StepReport> {
        self.student.step(&mut self.arena, batch, lr)
    }

    /// One optimiser step on a loader batch whose images are `images`: the loader's crops
    /// staged earlier ([`Images::Staged`]), or given here (for example with a fault
    /// injected into them). `next`: the following batch's crops, staged while this step's
    /// backward runs ([`StudentBatch::stage_next`]).
    pub fn step(
        &mut self,
        batch: &Batch,
        images: Images<'_>,
        next: Option<&[u8]>,
        lr: f64,
    ) -> Result<StepReport> {
        let lengths: Vec<usize> = batch.lengths().iter().map(|&l| l as usize).collect();
        let mask: Vec<u8> = match batch.teachers {
            LoadMode::None => Vec::new(),
            LoadMode::One => batch
                .teacher_index()
                .iter()
                .map(|&k| u8::from(k >= 0))
                .collect(),
            LoadMode::All => batch.teacher_mask().to_vec(),
        };
        let sb = StudentBatch {
            images,
            tokens: batch.tokens(),
            lengths: &lengths,
            teacher_image: batch.teacher_image(),
            teacher_text: batch.teacher_text(),
            mask: &mask,
            pick: None,
            stage_next: next,
        };
        self.step_batch(&sb, lr)
    }

    /// Copies the fp32 masters into `params` and the AdamW moments into `m`, `v` (the store's
    /// element order, as `optim::AdamW` keeps them).
    pub fn save_to(&mut self, params: &mut ParamStore, m: &mut [f32], v: &mut [f32]) -> Result<()> {
        self.student.read_params(&mut self.arena, params)?;
        self.student.read_moments(&mut self.arena, params, m, v)
    }

    /// Loads weights, moments and the optimiser step count (a resumed run).
    pub fn load_from(
        &mut self,
        params: &ParamStore,
        m: &[f32],
        v: &[f32],
        step: u64,
    ) -> Result<()> {
        ensure!(
            step <= u32::MAX as u64,
            "step {step} is beyond the device optimiser's step counter"
        );
        self.student.load_params(&mut self.arena, params)?;
        self.student
            .load_moments(&mut self.arena, params, m, v, step as u32)
    }
}
