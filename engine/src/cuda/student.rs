//! The whole stage-2 training step of the student over one [`Arena`]: the image tower, the text
//! tower, the logit scale, the fused multi-teacher loss (`mt_loss`), the global gradient norm
//! with clipping and AdamW with fp32 masters and moments, all as launch plans over one table.
//!
//! Layout. Both towers are laid out with `in_layout` in one [`Layout::grouped`] table, then the
//! logit scale (a one-element parameter), the loss buffers, the AdamW moments (section
//! [`Section::Optim`]) and the per-element weight-decay mask. Every parameter has its fp32
//! master, bf16 copy and fp32 gradient at the same element index of the three sections, so the
//! norm and AdamW run once over whole sections, and AdamW writes the bf16 copy the next
//! forward reads (no separate cast after the first).
//!
//! Text length. The text tower packs each pass's valid tokens back to back
//! ([`CudaTextTower::set_batch`]): a caption costs its own tokens, not the batch's longest or
//! the context (`text_len`, the longest caption a batch may hold, sizes the arena).
//!
//! One step, in the order the host queues it ([`CudaStudent::step`]):
//! 1. per pass of `micro_batch` samples (one pass without micro-batches): the pass's tokens
//!    packed and written, its crops normalised on the device from a staged region (or its
//!    images written from host values), both towers' forward, and with several passes the
//!    features copied into the batch's rows;
//! 2. the teacher targets, mask and picks staged on the copy stream (they go beside the
//!    forward, not before it), then the fused loss, which waits for them;
//! 3. per pass, the feature gradients seeding both towers' backward (with several passes each
//!    first runs its forward again, and the gradients are summed); during the first pass the
//!    next batch's crops are staged;
//! 4. the global gradient norm with clipping, AdamW, the logit-scale clamp.
//!
//! Host traffic per step. Raw crops and the loss's inputs travel through pinned buffers on a
//! second stream ([`Arena::stage_u8`]); the text tower's index tables (about 1 MB at batch
//! 256) are copied directly. The loss plan takes the logit scale as a launch argument, so the
//! scale is read back (4 bytes) and clamped to `[0, ln 100]` on the host after each update;
//! the loss components (8 floats) and the gradient norm (2 floats) are read back before the
//! backward and before the update, so a non-finite loss or gradient stops the step before any
//! weight changes, as the CPU trainer does.

use super::arena::{Arena, Dtype, Layout, RegionId, Section};
use super::block::{cast_weights, Buf, Planner};
use super::text::{CudaTextTower, TextTowerDims};
use super::tower::{CudaImageTower, ImageTowerDims};
use crate::config::ModelConfig;
use crate::loss::distill::{DistillConfig, IclScale, TeacherMode, TeacherNorm};
use crate::optim::{AdamWConfig, LOGIT_SCALE_MAX};
use crate::params::{ParamId, ParamStore};
use anyhow::{anyhow, bail, ensure, Result};
use half::bf16;
use mmkd_kernels::adamw::{adamw_plan, norm_plan, norm_scratch_len, AdamWConfig as KAdamW};
use mmkd_kernels::elementwise::Ew;
use mmkd_kernels::exec::Step;
use mmkd_kernels::gemm::GemmPath;
use mmkd_kernels::image_norm::{self, ImageNormConfig, CLIP_MEAN, CLIP_STD};
use mmkd_kernels::mt_loss::{self, LossConfig, LossResult};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// The model's name of the logit-scale parameter.
pub const LOGIT_SCALE: &str = "logit_scale";
/// The trainer's name of the learned icl scale `ℓ` (`c = e^ℓ`).
pub const ICL_SCALE: &str = "icl_scale";

/// Shapes and switches of a [`CudaStudent`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StudentSetup {
    /// Pairs per batch N.
    pub batch: usize,
    /// The longest token length of a batch (at most the text context): it sizes the arena;
    /// each batch runs on its own valid tokens, packed.
    pub text_len: usize,
    /// Teacher slots T of the `[N, T, D]` targets; 0 trains stage 1 (the CLIP loss alone,
    /// `loss` is then not read).
    pub teachers: usize,
    /// The distillation loss's switches. A learned icl scale is a parameter of the arena
    /// (the model's store must then hold [`ICL_SCALE`]).
    pub loss: DistillConfig,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Global gradient-norm bound (≤ 0: no clipping).
    pub grad_clip: f64,
    /// Activation checkpointing: every transformer block recomputes its forward in the
    /// backward and keeps only its output ([`super::block::BlockDims::recompute`]).
    pub recompute: bool,
    /// The tensor-core instruction of the blocks' products ([`super::block::BlockDims::gemm`]).
    pub gemm: GemmPath,
    /// Samples per forward/backward pass (gradient accumulation): the towers are sized for
    /// it and run each step as `batch / micro_batch` passes, the loss on the whole batch.
    /// 0 or `batch`: one pass. Must divide `batch`.
    pub micro_batch: usize,
}

/// A batch's images.
#[derive(Clone, Copy, Debug)]
pub enum Images<'a> {
    /// Normalised values `(N, C, S, S)`, converted to bf16 on the host.
    F32(&'a [f32]),
    /// Raw crops `(N, 3, S, S)`, normalised on the device with CLIP's statistics (half the
    /// bytes of bf16 to copy, no host conversion).
    U8(&'a [u8]),
    /// The oldest crops staged with [`CudaStudent::stage_pixels`] and not used yet.
    Staged,
}

impl Images<'_> {
    fn len(&self) -> Option<usize> {
        match self {
            Images::F32(v) => Some(v.len()),
            Images::U8(v) => Some(v.len()),
            Images::Staged => None,
        }
    }
}

/// One batch on the host: images `(N, C, S, S)`, token ids `(N, L)` (any
/// `1 ≤ L ≤ text_len`) with the valid length of each row, teacher targets `[N, T, D]` per
/// modality with availability `[N, T]` and, in random-teacher mode, the drawn slot of each
/// sample.
#[derive(Clone, Copy, Debug)]
pub struct StudentBatch<'a> {
    /// Images, `(N, C, S, S)`.
    pub images: Images<'a>,
    /// Token ids, `(N, L)` with `1 ≤ L ≤ text_len`.
    pub tokens: &'a [u32],
    /// Valid tokens per row, each in `1..=L`.
    pub lengths: &'a [usize],
    /// Teacher image targets `[N, T, D]`.
    pub teacher_image: &'a [f32],
    /// Teacher text targets `[N, T, D]`.
    pub teacher_text: &'a [f32],
    /// Availability `[N, T]`, non-zero = available.
    pub mask: &'a [u8],
    /// The drawn slot per sample (random-teacher mode only).
    pub pick: Option<&'a [i32]>,
    /// Raw crops of the next batch, staged ([`CudaStudent::stage_pixels`]) once this step's
    /// backward is launched: their host copy into the pinned buffer runs while the device
    /// computes, so a training loop does not wait for it.
    pub stage_next: Option<&'a [u8]>,
}

/// What one applied step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Loss components of the batch, before the update.
    pub loss: LossResult,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// The logit scale after the update and the clamp.
    pub logit_scale: f32,
    /// The learned icl scale's `ℓ` after the update (`None` for a constant).
    pub icl_log_scale: Option<f32>,
    /// The rows the text tower ran on, over the step's passes: the valid tokens, each pass's
    /// rounded up to [`super::block::PACKED_ROW_TILE`].
    pub text_rows: usize,
    /// Host wall time of the step's parts.
    pub phases: StepPhases,
}

/// Seconds of host wall time per part of a step, each ending at a point where the host waits
/// for the device anyway (a read-back), so no synchronisation is added to measure them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepPhases {
    /// The batch checked and its crops staged (the logit scale read back).
    pub upload: f64,
    /// Both towers' forward (each pass's tokens and images loaded first), the staging of the
    /// teacher targets beside it, and the loss, up to reading the loss back.
    pub forward: f64,
    /// Both towers' backward and the gradient norm, up to reading it back.
    pub backward: f64,
    /// AdamW and the logit-scale clamp.
    pub update: f64,
}

/// Where one model parameter lies: `len` elements from element `offset` of the master region
/// `param` (the gradient, bf16 copy and moments sit at the same index of their sections).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slice {
    name: String,
    param: RegionId,
    offset: usize,
    len: usize,
}

#[derive(Clone, Copy)]
struct Regions {
    logit_scale: RegionId,
    logit_scale_bf16: RegionId,
    logit_grad: RegionId,
    /// The learned icl scale's master and gradient.
    icl: Option<(RegionId, RegionId)>,
    m: RegionId,
    v: RegionId,
    decay: RegionId,
    /// The teacher targets and mask (none in CLIP mode).
    teacher_image: Option<RegionId>,
    teacher_text: Option<RegionId>,
    mask: Option<RegionId>,
    pick: Option<RegionId>,
    dimage: RegionId,
    dtext: RegionId,
    out: RegionId,
    loss_scratch: RegionId,
    norm_out: RegionId,
    norm_scratch: RegionId,
    /// With several passes per step: the whole batch's image and text features `[N, D]`
    /// (fp32), gathered from the passes for the loss.
    features: Option<(RegionId, RegionId)>,
    /// With several passes per step: the gradients of the passes before the last, summed (the
    /// towers' kernels overwrite their gradients), laid out as the gradient section.
    grad_sum: Option<RegionId>,
}

/// The student's arena layout, its plans and the optimiser's step count.
pub struct CudaStudent {
    setup: StudentSetup,
    layout: Layout,
    image: CudaImageTower,
    text: CudaTextTower,
    r: Regions,
    /// Samples per pass (the towers' batch).
    micro: usize,
    slices: Vec<Slice>,
    /// Elements of the parameter section (padding included).
    numel: usize,
    loss_cfg: LossConfig,
    steps: u32,
    /// Two u8 staging regions for raw crops (3-channel images only), used in turn.
    pixels: Option<[RegionId; 2]>,
    /// Staged regions not yet normalised, oldest first.
    staged: VecDeque<RegionId>,
    /// The staging region the next [`CudaStudent::stage_pixels`] fills.
    next_stage: usize,
}

/// The kernel's teacher mode for the engine's.
fn kernel_mode(m: TeacherMode) -> mt_loss::TeacherMode {
    match m {
        TeacherMode::Random => mt_loss::TeacherMode::Random,
        TeacherMode::Mean => mt_loss::TeacherMode::Mean,
        TeacherMode::All => mt_loss::TeacherMode::All,
    }
}

impl CudaStudent {
    /// Lays out one arena for the student of `config` and the step of `setup`.
    pub fn new(config: &ModelConfig, setup: StudentSetup) -> Result<Self> {
        let n = setup.batch;
        let micro = match setup.micro_batch {
            0 => n,
            m => m,
        };
        ensure!(
            n > 0 && micro <= n && n.is_multiple_of(micro),
            "cuda student: a micro-batch of {micro} does not divide the batch of {n}"
        );
        ensure!(
            setup.grad_clip.is_finite(),
            "cuda student: gradient clip {} is not finite",
            setup.grad_clip
        );
        let clip = setup.teachers == 0;
        // A learned ℓ is read from the arena at each step; the value here is a placeholder.
        let (icl, learned) = match setup.loss.icl_scale {
            _ if clip => (mt_loss::IclScale::Const(0.0), false),
            IclScale::Const(c) => (mt_loss::IclScale::Const(c as f32), false),
            IclScale::Learned(l) => (mt_loss::IclScale::Learned(l as f32), true),
        };
        let loss_cfg = LossConfig {
            n,
            t: setup.teachers,
            d: config.embed_dim,
            mode: kernel_mode(setup.loss.teacher_mode),
            teacher_l2: setup.loss.teacher_norm == TeacherNorm::L2,
            logit_scale: 0.0,
            icl,
            fd_weight: setup.loss.fd_weight as f32,
        };
        let mut lay = Layout::grouped();
        let mut image_dims = ImageTowerDims::from_config(config, micro)?;
        image_dims.block.recompute = setup.recompute;
        image_dims.block.gemm = setup.gemm;
        let mut text_dims = TextTowerDims::from_config(config, micro, setup.text_len)?;
        text_dims.block.recompute = setup.recompute;
        text_dims.block.gemm = setup.gemm;
        let image = CudaImageTower::in_layout(image_dims, &mut lay)?;
        let text = CudaTextTower::in_layout(text_dims, &mut lay)?;
        let (f32l, u8l) = (Dtype::F32, Dtype::U8);
        let logit_scale = lay.add("param.logit_scale", Section::Params, f32l, 1)?;
        let logit_scale_bf16 = lay.add("bf16.logit_scale", Section::ParamsBf16, Dtype::Bf16, 1)?;
        let logit_grad = lay.add("grad.logit_scale", Section::Grads, f32l, 1)?;
        let pixels = {
            let d = image.dims();
            let len = n * d.channels * d.image * d.image;
            if d.channels == 3 {
                Some([
                    lay.add("table.input.pixels0", Section::Tables, u8l, len)?,
                    lay.add("table.input.pixels1", Section::Tables, u8l, len)?,
                ])
            } else {
                None
            }
        };
        let icl_regions = if learned {
            let p = lay.add("param.icl_scale", Section::Params, f32l, 1)?;
            lay.add("bf16.icl_scale", Section::ParamsBf16, Dtype::Bf16, 1)?;
            let g = lay.add("grad.icl_scale", Section::Grads, f32l, 1)?;
            Some((p, g))
        } else {
            None
        };
        let numel = check_twins(&lay)?;
        let (t, d) = (loss_cfg.t, loss_cfg.d);
        let (a, s, tb) = (Section::Acts, Section::Scratch, Section::Tables);
        let pick = if !clip && loss_cfg.mode == mt_loss::TeacherMode::Random {
            Some(lay.add("table.loss.pick", tb, Dtype::I32, n)?)
        } else {
            None
        };
        // CLIP mode reads no teacher buffers: they get no region.
        let teacher = |lay: &mut Layout, name: &str, sec: Section, dt: Dtype, len: usize| {
            (!clip).then(|| lay.add(name, sec, dt, len)).transpose()
        };
        let r = Regions {
            logit_scale,
            logit_scale_bf16,
            logit_grad,
            icl: icl_regions,
            m: lay.add("optim.m", Section::Optim, f32l, numel)?,
            v: lay.add("optim.v", Section::Optim, f32l, numel)?,
            decay: lay.add("table.optim.decay", tb, u8l, numel)?,
            teacher_image: teacher(&mut lay, "act.loss.teacher_image", a, f32l, n * t * d)?,
            teacher_text: teacher(&mut lay, "act.loss.teacher_text", a, f32l, n * t * d)?,
            mask: teacher(&mut lay, "table.loss.mask", tb, u8l, n * t)?,
            pick,
            dimage: lay.add("scratch.loss.dimage", s, f32l, n * d)?,
            dtext: lay.add("scratch.loss.dtext", s, f32l, n * d)?,
            out: lay.add("scratch.loss.out", s, f32l, 8)?,
            loss_scratch: lay.add(
                "scratch.loss.partials",
                s,
                f32l,
                mt_loss::scratch_len_for(&loss_cfg, "f32"),
            )?,
            norm_out: lay.add("scratch.optim.norm", s, f32l, 2)?,
            norm_scratch: lay.add(
                "scratch.optim.norm_partials",
                s,
                f32l,
                norm_scratch_len(numel),
            )?,
            features: if micro < n {
                Some((
                    lay.add("act.loss.image_features", a, f32l, n * d)?,
                    lay.add("act.loss.text_features", a, f32l, n * d)?,
                ))
            } else {
                None
            },
            grad_sum: if micro < n {
                Some(lay.add("scratch.optim.grad_sum", s, f32l, numel)?)
            } else {
                None
            },
        };
        let mut slices: Vec<Slice> = image
            .param_names()
            .into_iter()
            .map(|name| {
                let param = image.param(&name)?;
                let len = lay.region(param).len;
                Ok(Slice {
                    name,
                    param,
                    offset: 0,
                    len,
                })
            })
            .collect::<Result<_>>()?;
        slices.extend(text.param_map().into_iter().map(|p| Slice {
            name: p.name,
            param: p.param,
            offset: p.offset,
            len: p.len,
        }));
        slices.push(Slice {
            name: LOGIT_SCALE.to_string(),
            param: logit_scale,
            offset: 0,
            len: 1,
        });
        if let Some((param, _)) = icl_regions {
            slices.push(Slice {
                name: ICL_SCALE.to_string(),
                param,
                offset: 0,
                len: 1,
            });
        }
        Ok(CudaStudent {
            setup,
            layout: lay,
            image,
            text,
            r,
            slices,
            numel,
            loss_cfg,
            micro,
            steps: 0,
            pixels,
            staged: VecDeque::new(),
            next_stage: 0,
        })
    }

    /// Stages one batch of raw crops `(N, 3, S, S)` into the next of two staging regions: on a
    /// GPU the copy runs on a second stream (see [`Arena::stage_u8`]), so staging batch k+1
    /// before running step k overlaps its copy with step k. A step with [`Images::Staged`]
    /// normalises the oldest staged batch on the device. At most two can wait.
    pub fn stage_pixels(&mut self, arena: &mut Arena, pixels: &[u8]) -> Result<()> {
        self.check_arena(arena)?;
        stage_into(
            self.pixels,
            self.image.dims().channels,
            &mut self.staged,
            &mut self.next_stage,
            arena,
            pixels,
        )
    }

    /// Normalises the crops of pass `pass` (rows `pass·micro ..`) of the staged region `id`
    /// into the image tower's input (bf16).
    fn normalize_rows(&self, arena: &mut Arena, id: RegionId, pass: usize) -> Result<()> {
        let d = self.image.dims();
        let cfg = ImageNormConfig {
            b: self.micro,
            h: d.image,
            w: d.image,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        };
        let per = d.channels * d.image * d.image;
        let mut pl = Planner {
            layout: &self.layout,
            slots: Vec::new(),
        };
        let mut steps = Vec::new();
        pl.add(
            &mut steps,
            image_norm::plan(&cfg, false),
            &[
                self.buf(id, pass * self.micro * per, self.micro * per, false),
                None,
                self.whole(self.image.images()),
            ],
        )?;
        // SAFETY: the arena has this student's layout; the planner checked every slot.
        unsafe { arena.run_staged(&steps, &pl.slots, &[id]) }
    }

    /// The tensor-core instruction of the towers' products.
    pub fn gemm_path(&self) -> GemmPath {
        self.setup.gemm
    }

    /// The arena layout; make the arena with `Arena::host(student.layout().clone(), emu)` or
    /// `Arena::device(student.layout().clone(), gpu)`.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The image tower inside the student's layout.
    pub fn image_tower(&self) -> &CudaImageTower {
        &self.image
    }

    /// The text tower inside the student's layout.
    pub fn text_tower(&self) -> &CudaTextTower {
        &self.text
    }

    /// Optimiser steps applied so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    fn check_arena(&self, arena: &Arena) -> Result<()> {
        ensure!(
            arena.layout() == &self.layout,
            "the arena was not made from this student's layout"
        );
        Ok(())
    }

    /// Element index of `slice` inside the parameter section.
    fn section_index(&self, s: &Slice) -> Result<usize> {
        let (start, _) = self
            .layout
            .section_span(Section::Params)
            .ok_or_else(|| anyhow!("cuda student: no parameters"))?;
        Ok((self.layout.region(s.param).offset - start) / 4 + s.offset)
    }

    /// Copies every parameter of `store` (the model's names) into the fp32 masters and their
    /// bf16 copies, writes the weight-decay mask from the store's decay rule, zeros the AdamW
    /// moments and the step count, and writes the towers' fixed tables. Every parameter of the
    /// store must have a place in the arena and every place a parameter.
    pub fn load_params(&mut self, arena: &mut Arena, store: &ParamStore) -> Result<()> {
        self.check_arena(arena)?;
        ensure!(
            store.infos().len() == self.slices.len(),
            "cuda student: the model has {} parameters, the arena {}",
            store.infos().len(),
            self.slices.len()
        );
        let mut regions: HashMap<RegionId, Vec<f32>> = HashMap::new();
        let mut filled: HashMap<RegionId, usize> = HashMap::new();
        let mut decay = vec![0u8; self.numel];
        for s in &self.slices {
            let id = store_id(store, s)?;
            let info = store.info(id);
            let len = self.layout.region(s.param).len;
            let buf = regions.entry(s.param).or_insert_with(|| vec![0.0; len]);
            buf[s.offset..s.offset + s.len].copy_from_slice(store.value(id));
            *filled.entry(s.param).or_default() += s.len;
            let at = self.section_index(s)?;
            decay[at..at + s.len].fill(u8::from(info.decays()));
        }
        for (id, v) in &regions {
            let name = &self.layout.region(*id).name;
            ensure!(
                filled[id] == v.len(),
                "cuda student: region `{name}` is only partly covered by the model's parameters"
            );
            arena.write_f32(*id, v)?;
        }
        ensure!(
            regions.len()
                == self
                    .layout
                    .regions()
                    .iter()
                    .filter(|r| r.section == Section::Params)
                    .count(),
            "cuda student: some master regions have no model parameter"
        );
        arena.write_u8(self.r.decay, &decay)?;
        arena.write_f32(self.r.m, &vec![0.0; self.numel])?;
        arena.write_f32(self.r.v, &vec![0.0; self.numel])?;
        self.image.write_tables(arena)?;
        // The first forward reads the bf16 copy; AdamW keeps it current afterwards.
        let mut pl = Planner {
            layout: &self.layout,
            slots: Vec::new(),
        };
        let mut cast = Vec::new();
        cast_weights(&mut pl, &mut cast)?;
        // SAFETY: the arena has this student's layout; the planner checked every slot.
        unsafe { arena.run(&cast, &pl.slots)? };
        self.steps = 0;
        Ok(())
    }

    /// Copies the fp32 masters back into `store` (the model's names).
    pub fn read_params(&self, arena: &mut Arena, store: &mut ParamStore) -> Result<()> {
        self.check_arena(arena)?;
        let mut cache: HashMap<RegionId, Vec<f32>> = HashMap::new();
        for s in &self.slices {
            let id = store_id(store, s)?;
            let v = match cache.entry(s.param) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(arena.read_f32(s.param)?),
            };
            store
                .value_mut(id)
                .copy_from_slice(&v[s.offset..s.offset + s.len]);
        }
        Ok(())
    }

    /// The logit scale's fp32 master.
    pub fn logit_scale(&self, arena: &mut Arena) -> Result<f32> {
        self.check_arena(arena)?;
        Ok(arena.read_f32(self.r.logit_scale)?[0])
    }

    /// Checks one batch and stages its raw crops. The towers' inputs are written per pass
    /// ([`CudaStudent::load_pass`]), what the loss reads once the forward is queued
    /// ([`CudaStudent::stage_targets`]).
    fn write_batch<'a>(&mut self, arena: &mut Arena, b: &StudentBatch<'a>) -> Result<Prepared<'a>> {
        let c = self.loss_cfg;
        let max = self.setup.text_len;
        let l = b.tokens.len() / c.n;
        ensure!(
            b.tokens.len().is_multiple_of(c.n) && (1..=max).contains(&l),
            "cuda student: {} token ids are not a batch of {} rows of 1..={max} tokens",
            b.tokens.len(),
            c.n
        );
        ensure!(
            b.lengths.len() == c.n,
            "cuda student: {} text lengths for a batch of {}",
            b.lengths.len(),
            c.n
        );
        if let Some((i, &n)) = b.lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > l) {
            bail!("cuda student: text length {n} of row {i} is not in 1..={l}");
        }
        let id = self.image.dims();
        let want = c.n * id.channels * id.image * id.image;
        if let Some(got) = b.images.len() {
            ensure!(
                got == want,
                "cuda student: {got} image values, {want} expected for a batch of {}",
                c.n
            );
        }
        if let (Images::Staged, true) = (b.images, self.staged.is_empty()) {
            bail!("cuda student: the batch names staged images but none are staged");
        }
        let targets = c.n * c.t * c.d;
        ensure!(
            b.teacher_image.len() == targets && b.teacher_text.len() == targets,
            "cuda student: teacher targets of {} and {} values, [{}, {}, {}] expected",
            b.teacher_image.len(),
            b.teacher_text.len(),
            c.n,
            c.t,
            c.d
        );
        ensure!(
            b.mask.len() == c.n * c.t,
            "cuda student: a mask of {} values, [{}, {}] expected",
            b.mask.len(),
            c.n,
            c.t
        );
        let pick = match (self.r.pick, b.pick) {
            (Some(id), Some(p)) => {
                ensure!(
                    p.len() == c.n,
                    "cuda student: {} teacher picks for a batch of {}",
                    p.len(),
                    c.n
                );
                Some((id, p))
            }
            (None, None) => None,
            (Some(_), None) => bail!("cuda student: random-teacher mode needs `pick`"),
            (None, Some(_)) => bail!("cuda student: `pick` is only read in random-teacher mode"),
        };
        // Two staging regions: the step's own crops, while it runs, and those queued after
        // them are all there is room for. A third batch would overwrite one still needed (with
        // several passes each pass normalises the step's crops again).
        ensure!(
            !matches!(b.images, Images::U8(_)) || self.staged.is_empty(),
            "cuda student: crops given with the batch while {} staged batch(es) wait (the \
             step would take the oldest); use `Images::Staged`",
            self.staged.len()
        );
        let (busy, waiting) = match b.images {
            Images::F32(_) => (0, self.staged.len()),
            Images::U8(_) => (1, 0),
            Images::Staged => (1, self.staged.len().saturating_sub(1)),
        };
        ensure!(
            b.stage_next.is_none() || busy + waiting < 2,
            "cuda student: `stage_next` needs a free staging region, but {waiting} staged \
             batch(es) wait beside this step's; run a step without it first"
        );
        let images = match b.images {
            Images::F32(v) => Source::Host(v),
            Images::U8(p) => {
                self.stage_pixels(arena, p)?;
                Source::Staged(self.pop_staged()?)
            }
            Images::Staged => Source::Staged(self.pop_staged()?),
        };
        Ok(Prepared {
            len: l,
            tokens: b.tokens,
            lengths: b.lengths,
            images,
            teacher_image: b.teacher_image,
            teacher_text: b.teacher_text,
            mask: b.mask,
            pick: pick.map(|(_, p)| p),
        })
    }

    /// Stages what only the loss reads (teacher targets, mask, picks) and returns their
    /// regions, for the loss to wait on. Called once the forward passes are queued: on a GPU
    /// the copies then run beside them instead of before them.
    fn stage_targets(&self, arena: &mut Arena, b: &Prepared<'_>) -> Result<Vec<RegionId>> {
        let mut staged = Vec::new();
        if let (Some(ti), Some(tt), Some(m)) =
            (self.r.teacher_image, self.r.teacher_text, self.r.mask)
        {
            arena.stage_f32(ti, b.teacher_image)?;
            arena.stage_f32(tt, b.teacher_text)?;
            arena.stage_u8(m, b.mask)?;
            staged.extend([ti, tt, m]);
        }
        if let (Some(id), Some(p)) = (self.r.pick, b.pick) {
            arena.stage_i32(id, p)?;
            staged.push(id);
        }
        Ok(staged)
    }

    /// The oldest staged crops.
    fn pop_staged(&mut self) -> Result<RegionId> {
        self.staged
            .pop_front()
            .ok_or_else(|| anyhow!("cuda student: no staged images"))
    }

    /// Writes the inputs of pass `pass` (rows `pass·micro ..` of the batch) into the towers.
    fn load_pass(&self, arena: &mut Arena, b: &Prepared<'_>, pass: usize) -> Result<()> {
        let m = self.micro;
        let rows = pass * m..(pass + 1) * m;
        match b.images {
            Source::Host(v) => {
                let per = v.len() / self.loss_cfg.n;
                let img: Vec<bf16> = v[rows.start * per..rows.end * per]
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect();
                arena.write_bf16(self.image.images(), &img)?;
            }
            Source::Staged(id) => self.normalize_rows(arena, id, pass)?,
        }
        let l = b.len;
        self.text.set_batch(
            arena,
            &b.tokens[rows.start * l..rows.end * l],
            &b.lengths[rows],
        )
    }

    fn buf(&self, id: RegionId, off: usize, need: usize, span: bool) -> Option<Buf> {
        Some(Buf {
            id,
            off,
            need,
            span,
        })
    }

    fn whole(&self, id: RegionId) -> Option<Buf> {
        self.buf(id, 0, self.layout.region(id).len, false)
    }

    /// The first region of `section`, addressed through the whole section.
    fn section(&self, section: Section) -> Result<Option<Buf>> {
        let first = self
            .layout
            .regions()
            .iter()
            .find(|r| r.section == section)
            .and_then(|r| self.layout.id(&r.name))
            .ok_or_else(|| anyhow!("cuda student: no {section:?} section"))?;
        Ok(self.buf(first, 0, self.numel, true))
    }

    /// One training step on `batch` with learning rate `lr`: forward of both towers, the loss,
    /// the backward, the global-norm clip, AdamW (masters, moments and the bf16 copy) and the
    /// logit-scale clamp. A non-finite loss or gradient norm is an error and leaves the
    /// weights, the moments and the step count as they were.
    pub fn step(
        &mut self,
        arena: &mut Arena,
        batch: &StudentBatch<'_>,
        lr: f64,
    ) -> Result<StepReport> {
        self.check_arena(arena)?;
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "cuda student: learning rate {lr} is not a finite non-negative number"
        );
        let t0 = Instant::now();
        let prep = self.write_batch(arena, batch)?;
        let mut text_rows = 0;
        let s = arena.read_f32(self.r.logit_scale)?[0];
        let icl = match self.r.icl {
            Some((p, _)) => mt_loss::IclScale::Learned(arena.read_f32(p)?[0]),
            None => self.loss_cfg.icl,
        };
        let t1 = Instant::now();
        let r = self.r;
        let (n, d, m) = (self.loss_cfg.n, self.loss_cfg.d, self.micro);
        let passes = n / m;
        let mut pl = Planner {
            layout: &self.layout,
            slots: Vec::new(),
        };

        // Forward. With several passes, each pass's features go to its rows of the batch's.
        for pass in 0..passes {
            self.load_pass(arena, &prep, pass)?;
            text_rows += self.text.batch_rows();
            self.image.forward(arena)?;
            self.text.forward(arena)?;
            if let Some((fi, ft)) = r.features {
                let mut gather = Vec::new();
                for (src, dst) in [(self.image.features(), fi), (self.text.features(), ft)] {
                    pl.add(
                        &mut gather,
                        copy_f32(m * d)?,
                        &[self.whole(src), self.buf(dst, pass * m * d, m * d, false)],
                    )?;
                }
                // SAFETY: the arena has this student's layout; the planner checked every slot.
                unsafe { arena.run(&gather, &pl.slots)? };
            }
        }
        let staged = self.stage_targets(arena, &prep)?;
        let (fimage, ftext) = r
            .features
            .unwrap_or((self.image.features(), self.text.features()));
        let cfg = LossConfig {
            logit_scale: s,
            icl,
            ..self.loss_cfg
        };
        let mut loss = Vec::new();
        pl.add(
            &mut loss,
            mt_loss::plan(&cfg, "f32")?,
            &[
                self.whole(fimage),
                self.whole(ftext),
                r.teacher_image.and_then(|id| self.whole(id)),
                r.teacher_text.and_then(|id| self.whole(id)),
                r.mask.and_then(|id| self.whole(id)),
                r.pick.and_then(|p| self.whole(p)),
                self.whole(r.dimage),
                self.whole(r.dtext),
                self.whole(r.out),
                self.whole(r.loss_scratch),
            ],
        )?;
        // SAFETY: the arena has this student's layout; the planner checked every slot.
        unsafe { arena.run_staged(&loss, &pl.slots, &staged)? };
        let out = LossResult::from_out(&arena.read_f32(r.out)?)?;
        let t2 = Instant::now();
        let parts = [
            out.task,
            out.fd,
            out.icl,
            out.total,
            out.dlogit_scale,
            out.dicl_scale,
        ];
        if parts.iter().any(|v| !v.is_finite()) {
            bail!(
                "cuda student: non-finite loss at step {}: task {}, fd {}, icl {}, total {}; \
                 the step was not applied",
                self.steps + 1,
                out.task,
                out.fd,
                out.icl,
                out.total
            );
        }

        // Backward, pass by pass: the pass's rows of the feature gradients, as bf16, seed the
        // towers. With several passes each first runs its forward again (the activations are
        // the last pass's) and the gradients, which the towers' kernels overwrite, are summed.
        let grads = self.section(Section::Grads)?;
        for pass in 0..passes {
            let mut seed = Vec::new();
            for (src, dst) in [
                (r.dimage, self.image.features_grad()),
                (r.dtext, self.text.features_grad()),
            ] {
                pl.add(
                    &mut seed,
                    Ew::CastF32Bf16 { n: m * d }.plan()?,
                    &[self.buf(src, pass * m * d, m * d, false), self.whole(dst)],
                )?;
            }
            if r.features.is_some() {
                self.load_pass(arena, &prep, pass)?;
                self.image.forward(arena)?;
                self.text.forward(arena)?;
            }
            // SAFETY: as above.
            unsafe { arena.run(&seed, &pl.slots)? };
            self.image.backward(arena)?;
            self.text.backward(arena)?;
            if let (0, Some(p)) = (pass, batch.stage_next) {
                let channels = self.image.dims().channels;
                let (staged, next) = (&mut self.staged, &mut self.next_stage);
                stage_into(self.pixels, channels, staged, next, arena, p)?;
            }
            if let Some(g) = r.grad_sum {
                // The sum so far: the first pass's gradients copied, later ones added; the last
                // pass adds the sum into its own gradients instead, where the update reads.
                let (src, dst) = if pass + 1 < passes {
                    (grads, self.whole(g))
                } else {
                    (self.whole(g), grads)
                };
                let add = Ew::AxpbyF32 {
                    n: self.numel,
                    a: 1.0,
                    b: if pass == 0 { 0.0 } else { 1.0 },
                };
                let mut sum = Vec::new();
                pl.add(&mut sum, add.plan()?, &[src, dst])?;
                // SAFETY: as above.
                unsafe { arena.run(&sum, &pl.slots)? };
            }
        }
        let mut fin = Vec::new();
        // out[4] = d total / d s, out[5] = d total / d ℓ (a learned icl scale), written after
        // the sum (which leaves stale values in their slots).
        let scalars = std::iter::once((4, r.logit_grad)).chain(r.icl.map(|(_, g)| (5, g)));
        for (at, grad) in scalars {
            pl.add(
                &mut fin,
                copy_f32(1)?,
                &[self.buf(r.out, at, 1, false), self.whole(grad)],
            )?;
        }
        // SAFETY: as above.
        unsafe { arena.run(&fin, &pl.slots)? };

        let mut norm = Vec::new();
        pl.add(
            &mut norm,
            norm_plan(self.numel, self.setup.grad_clip as f32)?,
            &[
                self.section(Section::Grads)?,
                self.whole(r.norm_out),
                self.whole(r.norm_scratch),
            ],
        )?;
        // SAFETY: as above.
        unsafe { arena.run(&norm, &pl.slots)? };
        let grad_norm = arena.read_f32(r.norm_out)?[0];
        let t3 = Instant::now();
        ensure!(
            grad_norm.is_finite(),
            "cuda student: non-finite gradient norm at step {}; the step was not applied",
            self.steps + 1
        );

        let a = self.setup.adamw;
        let kcfg = KAdamW {
            lr: lr as f32,
            beta1: a.beta1 as f32,
            beta2: a.beta2 as f32,
            eps: a.eps as f32,
            weight_decay: a.weight_decay as f32,
            step: self.steps + 1,
        };
        let mut update = Vec::new();
        pl.add(
            &mut update,
            adamw_plan(&kcfg, self.numel, [true, true, true])?,
            &[
                self.section(Section::Params)?,
                self.section(Section::Grads)?,
                self.whole(r.m),
                self.whole(r.v),
                self.section(Section::ParamsBf16)?,
                self.whole(r.decay),
                self.whole(r.norm_out),
            ],
        )?;
        // SAFETY: as above.
        unsafe { arena.run(&update, &pl.slots)? };
        self.steps += 1;

        let s_new = arena.read_f32(r.logit_scale)?[0];
        let clamped = s_new.clamp(0.0, LOGIT_SCALE_MAX);
        if clamped != s_new {
            arena.write_f32(r.logit_scale, &[clamped])?;
            arena.write_bf16(r.logit_scale_bf16, &[bf16::from_f32(clamped)])?;
        }
        let phases = StepPhases {
            upload: (t1 - t0).as_secs_f64(),
            forward: (t2 - t1).as_secs_f64(),
            backward: (t3 - t2).as_secs_f64(),
            update: t3.elapsed().as_secs_f64(),
        };
        Ok(StepReport {
            loss: out,
            grad_norm,
            logit_scale: clamped,
            icl_log_scale: match r.icl {
                Some((p, _)) => Some(arena.read_f32(p)?[0]),
                None => None,
            },
            text_rows,
            phases,
        })
    }
}

/// A batch checked and written except for what each pass loads ([`CudaStudent::load_pass`]).
struct Prepared<'a> {
    /// The token length of the rows (the longest caption or more).
    len: usize,
    /// Token ids `(N, len)`.
    tokens: &'a [u32],
    /// Valid tokens per row.
    lengths: &'a [usize],
    /// Where the images come from.
    images: Source<'a>,
    /// Teacher targets `[N, T, D]` (image, text) and the availability mask `[N, T]`.
    teacher_image: &'a [f32],
    teacher_text: &'a [f32],
    mask: &'a [u8],
    /// The drawn slot per sample (random-teacher mode).
    pick: Option<&'a [i32]>,
}

/// The images of a batch: host values, or crops in a staged region.
#[derive(Clone, Copy)]
enum Source<'a> {
    Host(&'a [f32]),
    Staged(RegionId),
}

/// The parameter of `store` that fills slice `s` of the arena, of the slice's length.
fn store_id(store: &ParamStore, s: &Slice) -> Result<ParamId> {
    let id = store
        .id(&s.name)
        .ok_or_else(|| anyhow!("cuda student: the model has no parameter `{}`", s.name))?;
    let n = store.info(id).len;
    ensure!(
        n == s.len,
        "cuda student: parameter `{}` has {n} elements, the arena holds {}",
        s.name,
        s.len
    );
    Ok(id)
}

/// `y = x` over `n` fp32 values.
fn copy_f32(n: usize) -> Result<Vec<Step>> {
    Ew::AxpbyF32 { n, a: 1.0, b: 0.0 }.plan()
}

/// Stages `pixels` into the next of the two pixel regions (first in, first out).
fn stage_into(
    regions: Option<[RegionId; 2]>,
    channels: usize,
    staged: &mut VecDeque<RegionId>,
    next: &mut usize,
    arena: &mut Arena,
    pixels: &[u8],
) -> Result<()> {
    let regions = regions.ok_or_else(|| {
        anyhow!("cuda student: raw crops need 3-channel images, the tower has {channels}")
    })?;
    ensure!(
        staged.len() < 2,
        "cuda student: two batches are staged already; run a step first"
    );
    let id = regions[*next];
    arena.stage_u8(id, pixels)?;
    staged.push_back(id);
    *next ^= 1;
    Ok(())
}

/// Checks that the fp32 masters, the bf16 copies and the gradients hold the same parameters in
/// the same order with the same lengths (so one index addresses a parameter in all three);
/// returns the elements of the parameter section.
fn check_twins(lay: &Layout) -> Result<usize> {
    let of = |s: Section, prefix: &str| -> Vec<(String, usize)> {
        lay.regions()
            .iter()
            .filter(|r| r.section == s)
            .map(|r| {
                (
                    r.name.strip_prefix(prefix).unwrap_or(&r.name).to_string(),
                    r.reserved,
                )
            })
            .collect()
    };
    let p = of(Section::Params, "param.");
    ensure!(
        p == of(Section::ParamsBf16, "bf16.") && p == of(Section::Grads, "grad."),
        "cuda student: the parameter, bf16 and gradient sections do not line up"
    );
    Ok(p.iter().map(|x| x.1).sum())
}

/// The AdamW moments between the arena (section order) and the host (the [`ParamStore`]'s
/// flat order, as `optim::AdamW` keeps them): checkpoints written by either backend resume on
/// the other.
impl CudaStudent {
    /// For every parameter: its element index in the arena's sections and its offset and length
    /// in `store`'s flat buffer; `moments` are the host moments' lengths, which must cover the
    /// store.
    fn moment_map(
        &self,
        store: &ParamStore,
        moments: [usize; 2],
    ) -> Result<Vec<(usize, usize, usize)>> {
        let total = store.data().len();
        ensure!(
            moments == [total; 2],
            "cuda student: moments of {} and {} elements for {total} parameters",
            moments[0],
            moments[1]
        );
        ensure!(
            store.infos().len() == self.slices.len(),
            "cuda student: the model has {} parameters, the arena {}",
            store.infos().len(),
            self.slices.len()
        );
        self.slices
            .iter()
            .map(|s| {
                let info = store.info(store_id(store, s)?);
                Ok((self.section_index(s)?, info.offset, s.len))
            })
            .collect()
    }

    /// Copies the first and second moments into `m` and `v` (each `store.data().len()` long).
    pub fn read_moments(
        &self,
        arena: &mut Arena,
        store: &ParamStore,
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<()> {
        self.check_arena(arena)?;
        let map = self.moment_map(store, [m.len(), v.len()])?;
        let (am, av) = (arena.read_f32(self.r.m)?, arena.read_f32(self.r.v)?);
        for (at, off, len) in map {
            m[off..off + len].copy_from_slice(&am[at..at + len]);
            v[off..off + len].copy_from_slice(&av[at..at + len]);
        }
        Ok(())
    }

    /// Writes the moments `m`, `v` (the store's order) into the arena and sets the optimiser's
    /// step count to `steps` (AdamW's bias correction continues from there).
    pub fn load_moments(
        &mut self,
        arena: &mut Arena,
        store: &ParamStore,
        m: &[f32],
        v: &[f32],
        steps: u32,
    ) -> Result<()> {
        self.check_arena(arena)?;
        let (mut am, mut av) = (vec![0.0f32; self.numel], vec![0.0f32; self.numel]);
        for (at, off, len) in self.moment_map(store, [m.len(), v.len()])? {
            am[at..at + len].copy_from_slice(&m[off..off + len]);
            av[at..at + len].copy_from_slice(&v[off..off + len]);
        }
        arena.write_f32(self.r.m, &am)?;
        arena.write_f32(self.r.v, &av)?;
        self.steps = steps;
        Ok(())
    }
}
