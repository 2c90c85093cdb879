//! The benchmark's training step on the project's kernels ([`KernelStep`]: one
//! `CudaStudent` over one arena), on a GPU (`--device cuda`) or under the CPU emulation of the
//! same CUDA sources (`--device emu`, slow: small configs only). It takes the same
//! [`StepInputs`] as the CPU trainer and follows the same learning-rate schedule, so
//! `mmkd bench parity` can run both on identical batches and compare their loss curves.

use crate::bench::{StepInputs, StepTimes};
use anyhow::Result;
use mmkd_engine::cuda::{Images, KernelStep, KernelTarget, Section, StudentBatch};
use mmkd_engine::loss::{DistillConfig, LossParts};
use mmkd_engine::optim::cosine_lr;
use mmkd_engine::trainer::TrainConfig;
use mmkd_engine::ClipModel;
use std::time::Instant;

/// The device step with the trainer's schedule.
pub struct KernelTrainer {
    inner: KernelStep,
    /// Batches staged ahead (0 before the first step, then 1).
    staged: usize,
    train: TrainConfig,
    step: u64,
    total_steps: u64,
}

impl KernelTrainer {
    /// Lays out the arena for batches of `batch` pairs with up to the config's context length
    /// of tokens and `slots` teacher slots (0 for stage 1; 1 in random-teacher mode, where the
    /// benchmark hands over the drawn teacher as the CPU trainer gets it), and loads `model`'s
    /// weights (with `icl_scale` when stage 2 learns it).
    pub fn new(
        target: &KernelTarget,
        model: &ClipModel,
        train: &TrainConfig,
        distill: DistillConfig,
        batch: usize,
        slots: usize,
        total_steps: u64,
    ) -> Result<Self> {
        let inner = KernelStep::new(
            target,
            &model.config,
            train,
            distill,
            batch,
            slots,
            &model.params,
        )?;
        Ok(KernelTrainer {
            inner,
            staged: 0,
            train: train.clone(),
            step: 0,
            total_steps,
        })
    }

    /// Bytes of the arena (weights, gradients, moments, activations, scratch and tables).
    pub fn arena_bytes(&self) -> usize {
        self.inner.layout().bytes()
    }

    /// Bytes of the arena's activation section (what the forward keeps for backward).
    pub fn activation_bytes(&self) -> usize {
        self.inner.layout().section_bytes(Section::Acts)
    }

    /// The tensor-core instruction the step's products run on.
    pub fn gemm_path(&self) -> mmkd_kernels::gemm::GemmPath {
        self.inner.gemm_path()
    }

    /// One step on `inp` at the schedule's learning rate; adds the time of its parts to `t`
    /// (staging and the upload count as data).
    ///
    /// With `pixels` (the batch's raw u8 crops, 3 channels; `inp.images` may then be absent), the step
    /// runs as a training loop with a prefetching loader would: the crops are normalised on
    /// the device, and the next batch's crops are staged while the step's backward computes
    /// (the synthetic crops are the same every step). Without, the normalised values are
    /// converted and copied on the host.
    pub fn step(
        &mut self,
        inp: &StepInputs,
        pixels: Option<&[u8]>,
        t: &mut StepTimes,
    ) -> Result<LossParts> {
        let t0 = Instant::now();
        let images = match pixels {
            Some(p) => {
                if self.staged == 0 {
                    self.inner.stage_pixels(p)?;
                    self.staged += 1;
                }
                Images::Staged
            }
            None => Images::F32(inp.images()?.as_f32()?),
        };
        t.data += t0.elapsed().as_secs_f64();
        let mask: Vec<u8> = inp.t_mask.iter().map(|&m| u8::from(m)).collect();
        let batch = StudentBatch {
            images,
            tokens: inp.tokens.as_u32()?,
            lengths: &inp.lengths,
            teacher_image: &inp.t_image,
            teacher_text: &inp.t_text,
            mask: &mask,
            pick: None,
            // The next step's crops.
            stage_next: pixels,
        };
        let lr = cosine_lr(
            self.step,
            self.train.lr,
            self.train.warmup,
            self.total_steps,
        );
        let r = self.inner.step_batch(&batch, lr)?;
        self.step += 1;
        t.data += r.phases.upload;
        t.forward += r.phases.forward;
        t.backward += r.phases.backward;
        t.optimizer += r.phases.update;
        t.text_rows = r.text_rows;
        Ok(LossParts {
            task: r.loss.task as f64,
            fd: r.loss.fd as f64,
            icl: r.loss.icl as f64,
            total: r.loss.total as f64,
        })
    }
}
