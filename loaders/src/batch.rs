//! The batch pipeline: a deterministic shuffled order per (seed, epoch), sharded by rank,
//! resumable from a [`Cursor`], with batches assembled on worker threads into one contiguous,
//! 64-byte-aligned buffer per batch (ready for a single device copy).
//!
//! Every random choice (order, crop, flip, teacher) is a pure function of (seed, epoch,
//! sample), so a resumed run — or a run with a different number of workers — produces
//! exactly the same batches.
//!
//! ```no_run
//! # use mmkd_loaders::{Dataset, batch::{BatchLoader, BatchConfig}};
//! # fn main() -> anyhow::Result<()> {
//! let ds = std::sync::Arc::new(Dataset::open("data/train".as_ref())?);
//! let mut loader = BatchLoader::new(ds, BatchConfig { batch_size: 64, ..BatchConfig::default() })?;
//! while let Some(b) = loader.next_batch()? {
//!     let images = b.images_f32().unwrap(); // (B, 3, S, S)
//!     let tokens = b.tokens();              // (B, L)
//!     let _ = (images, tokens, loader.cursor());
//! }
//! # Ok(()) }
//! ```

use crate::dataset::{Dataset, Tower, PROJ_DIM};
use anyhow::{bail, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

/// CLIP's image normalisation constants (OpenAI CLIP / open_clip).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's image standard deviations.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Element type of the image tensor in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageDtype {
    /// Normalised with the batch config's mean and std.
    F32,
    /// Normalised, rounded to bf16.
    Bf16,
    /// Raw pixel values 0–255 of the crop (bilinear samples rounded to nearest), for a
    /// consumer that normalises on its own side (the device step): a quarter of f32's bytes.
    U8,
}

/// Which distillation targets a batch carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherMode {
    /// No teacher targets (stage 1).
    None,
    /// One teacher per sample, drawn uniformly from its available ones: `[B, 512]` image and
    /// text targets plus the chosen teacher index `[B]` (`-1` when none is available).
    One,
    /// All teachers: `[B, T, 512]` image and text targets plus the availability mask `[B, T]`.
    All,
}

/// Random-resized-crop + horizontal-flip settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Range of the crop's area as a fraction of the image.
    pub scale: (f32, f32),
    /// Range of the crop's aspect ratio (width / height).
    pub ratio: (f32, f32),
    /// Probability of a horizontal flip.
    pub flip: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            scale: (0.5, 1.0),
            ratio: (0.75, 4.0 / 3.0),
            flip: 0.5,
        }
    }
}

/// Configuration of a [`BatchLoader`].
#[derive(Clone, Debug)]
pub struct BatchConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Shuffle the order each epoch (otherwise dataset order).
    pub shuffle: bool,
    /// Number of epochs to produce; `next_batch` returns `None` after the last.
    pub epochs: u64,
    /// Drop the last, smaller batch of each epoch.
    pub drop_last: bool,
    /// This process's rank and the number of ranks (data parallel).
    pub rank: usize,
    pub world_size: usize,
    /// Worker threads (0 = build batches on the calling thread).
    pub workers: usize,
    /// Batches built ahead of the consumer.
    pub prefetch: usize,
    pub image_dtype: ImageDtype,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Augmentation (off by default: the reference trains on the stored images).
    pub augment: Option<Augment>,
    /// Output image side (defaults to the stored size).
    pub output_size: Option<usize>,
    /// Pad tokens only to the longest caption of the batch instead of the full context.
    pub pad_to_longest: bool,
    pub teachers: TeacherMode,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 32,
            seed: 0,
            shuffle: true,
            epochs: 1,
            drop_last: false,
            rank: 0,
            world_size: 1,
            workers: 2,
            prefetch: 4,
            image_dtype: ImageDtype::F32,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            augment: None,
            output_size: None,
            pad_to_longest: false,
            teachers: TeacherMode::One,
        }
    }
}

/// Position in the stream: the next batch starts at `position` (samples of this rank already
/// consumed) of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

/// Byte offsets of each tensor inside [`Batch::as_bytes`] (all multiples of 64; absent
/// tensors have length 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub images: (usize, usize),
    pub tokens: (usize, usize),
    pub lengths: (usize, usize),
    pub attention_mask: (usize, usize),
    pub teacher_image: (usize, usize),
    pub teacher_text: (usize, usize),
    pub teacher_mask: (usize, usize),
    pub teacher_index: (usize, usize),
    pub labels: (usize, usize),
    pub indices: (usize, usize),
}

/// One batch in one contiguous buffer; dropping it hands the buffer back to its loader for
/// reuse (see [`BatchLoader::recycle`]). Shapes (B = `size`, S = `image_size`,
/// L = `token_len`, T = `num_teachers`):
/// - images: `f32` or `bf16` `(B, 3, S, S)`, normalised
/// - tokens: `u32 (B, L)`, padded with 0; lengths: `u32 (B)`; attention_mask: `u8 (B, L)`, 1 = token
/// - teacher targets, by mode: One: image/text `f32 (B, 512)`, teacher_index `i32 (B)`;
///   All: image/text `f32 (B, T, 512)`, teacher_mask `u8 (B, T)`
/// - labels: `i32 (B)` (-1 = none); indices: `u64 (B)` dataset indices
#[derive(Clone, Debug)]
pub struct Batch {
    pub size: usize,
    pub image_size: usize,
    pub token_len: usize,
    pub num_teachers: usize,
    pub image_dtype: ImageDtype,
    pub teachers: TeacherMode,
    /// Where this batch starts, and the cursor after it.
    pub start: Cursor,
    pub next: Cursor,
    pub layout: BatchLayout,
    buf: Vec<u64>,
    /// Where the buffer goes when the batch is dropped, so the next batch reuses it.
    pool: Option<Sender<Vec<u64>>>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Reusing a buffer avoids faulting ~20 MB of fresh pages in per batch; when the pool
        // is full or its loader is gone the buffer is simply freed.
        if let Some(pool) = self.pool.take() {
            let _ = pool.try_send(std::mem::take(&mut self.buf));
        }
    }
}

impl Batch {
    /// The whole buffer, for one device copy; tensors at the offsets in `layout`.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.buf)
    }
    fn view<T: bytemuck::Pod>(&self, r: (usize, usize)) -> &[T] {
        // Offsets are multiples of 64 within a u64-aligned buffer, so the cast cannot fail.
        bytemuck::cast_slice(&self.as_bytes()[r.0..r.0 + r.1])
    }
    /// Images `(B, 3, S, S)` when the dtype is f32.
    pub fn images_f32(&self) -> Option<&[f32]> {
        (self.image_dtype == ImageDtype::F32).then(|| self.view(self.layout.images))
    }
    /// Images `(B, 3, S, S)` when the dtype is bf16.
    pub fn images_bf16(&self) -> Option<&[bf16]> {
        (self.image_dtype == ImageDtype::Bf16).then(|| self.view(self.layout.images))
    }
    /// Raw crops `(B, 3, S, S)` when the dtype is u8.
    pub fn images_u8(&self) -> Option<&[u8]> {
        (self.image_dtype == ImageDtype::U8).then(|| self.view(self.layout.images))
    }
    /// Token ids `(B, L)`.
    pub fn tokens(&self) -> &[u32] {
        self.view(self.layout.tokens)
    }
    /// Caption lengths `(B)`.
    pub fn lengths(&self) -> &[u32] {
        self.view(self.layout.lengths)
    }
    /// 1 for real tokens, 0 for padding, `(B, L)`.
    pub fn attention_mask(&self) -> &[u8] {
        self.view(self.layout.attention_mask)
    }
    /// Teacher image targets: `(B, 512)` (One) or `(B, T, 512)` (All); empty for None.
    pub fn teacher_image(&self) -> &[f32] {
        self.view(self.layout.teacher_image)
    }
    /// Teacher text targets, shaped as [`Batch::teacher_image`].
    pub fn teacher_text(&self) -> &[f32] {
        self.view(self.layout.teacher_text)
    }
    /// Availability `(B, T)` (All only).
    pub fn teacher_mask(&self) -> &[u8] {
        self.view(self.layout.teacher_mask)
    }
    /// Chosen teacher per sample `(B)`, -1 when none (One only).
    pub fn teacher_index(&self) -> &[i32] {
        self.view(self.layout.teacher_index)
    }
    /// Class labels `(B)`.
    pub fn labels(&self) -> &[i32] {
        self.view(self.layout.labels)
    }
    /// Dataset indices `(B)`.
    pub fn indices(&self) -> &[u64] {
        self.view(self.layout.indices)
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of one sample in one epoch, for a given purpose.
fn sample_rng(seed: u64, epoch: u64, index: u64, purpose: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed, epoch), index), purpose))
}

/// The teacher drawn for `index` in `epoch`: uniform over the set bits of `avail`, or `None`.
pub fn choose_teacher(seed: u64, epoch: u64, index: u64, avail: u64) -> Option<usize> {
    let n = avail.count_ones();
    if n == 0 {
        return None;
    }
    let k = sample_rng(seed, epoch, index, 2).gen_range(0..n);
    let mut a = avail;
    for _ in 0..k {
        a &= a - 1;
    }
    Some(a.trailing_zeros() as usize)
}

/// The dataset indices of `epoch` this rank sees, in order.
pub fn epoch_order(n: u64, cfg: &BatchConfig, epoch: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    if cfg.shuffle {
        let mut r = ChaCha8Rng::seed_from_u64(mix(mix(cfg.seed, epoch), 1));
        for i in (1..v.len()).rev() {
            let j = r.gen_range(0..=i);
            v.swap(i, j);
        }
    }
    // Every rank gets the same count, so collective steps stay in lock-step.
    let per_rank = n / cfg.world_size as u64;
    v.into_iter()
        .skip(cfg.rank)
        .step_by(cfg.world_size)
        .take(per_rank as usize)
        .collect()
}

struct Job {
    seq: u64,
    start: Cursor,
    next: Cursor,
    epoch: u64,
    indices: Vec<u64>,
}

/// Streams batches of a [`Dataset`]; see the module documentation.
pub struct BatchLoader {
    ds: Arc<Dataset>,
    cfg: Arc<BatchConfig>,
    cursor: Cursor,
    order: Option<(u64, Vec<u64>)>,
    /// Cursor at which the next job will be planned.
    plan_cursor: Cursor,
    next_seq: u64,
    want_seq: u64,
    job_tx: Option<Sender<Job>>,
    res_rx: Option<Receiver<(u64, Result<Batch>)>>,
    ready: BTreeMap<u64, Result<Batch>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pool: Pool,
    /// Scratch of the calling thread when there are no workers.
    scratch: Scratch,
}

/// Buffers of dropped batches, waiting to be reused (lock-free channel, shared by workers).
#[derive(Clone)]
struct Pool {
    tx: Sender<Vec<u64>>,
    rx: Receiver<Vec<u64>>,
}

impl Pool {
    fn new(cap: usize) -> Self {
        let (tx, rx) = bounded(cap);
        Pool { tx, rx }
    }

    /// A buffer of `words` u64, reusing a pooled one when it is large enough. Only the
    /// first `keep` bytes (which the caller overwrites completely) may hold stale data; the
    /// rest is zero, as in a fresh buffer.
    fn take(&self, words: usize, keep: usize) -> Vec<u64> {
        match self.rx.try_recv() {
            Ok(mut v) if v.capacity() >= words => {
                v.truncate(words);
                let old = v.len();
                v.resize(words, 0);
                let from = (keep / 8).min(old);
                v[from..old].fill(0);
                v
            }
            _ => vec![0u64; words],
        }
    }
}

impl BatchLoader {
    /// A loader over `ds` starting at epoch 0, position 0.
    pub fn new(ds: Arc<Dataset>, cfg: BatchConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            bail!("batch config: batch_size and world_size must be positive and rank < world_size (got {}, {}, {})", cfg.batch_size, cfg.world_size, cfg.rank);
        }
        if let Some(a) = &cfg.augment {
            if !(a.scale.0 > 0.0
                && a.scale.0 <= a.scale.1
                && a.scale.1 <= 1.0
                && a.ratio.0 > 0.0
                && a.ratio.0 <= a.ratio.1
                && (0.0..=1.0).contains(&a.flip))
            {
                bail!("augment settings out of range: {a:?}");
            }
        }
        if cfg.output_size == Some(0) || cfg.std.iter().any(|&s| s <= 0.0) {
            bail!("output size and std must be positive");
        }
        let cfg = Arc::new(cfg);
        // Every buffer alive at once: prefetched, in flight, held by the consumer, spare.
        let pool = Pool::new(cfg.prefetch.max(1) + 2 * cfg.workers + 2);
        let mut threads = Vec::new();
        let (mut job_tx, mut res_rx) = (None, None);
        if cfg.workers > 0 {
            let (jt, jr) = bounded::<Job>(cfg.prefetch.max(1));
            let (rt, rr) = bounded::<(u64, Result<Batch>)>(cfg.prefetch.max(1) + cfg.workers);
            for _ in 0..cfg.workers {
                let (jr, rt, ds, cfg) = (jr.clone(), rt.clone(), ds.clone(), cfg.clone());
                let pool = pool.clone();
                threads.push(std::thread::spawn(move || {
                    let mut scratch = Scratch::default();
                    while let Ok(job) = jr.recv() {
                        let b = build_batch(&ds, &cfg, &job, &pool, &mut scratch);
                        if rt.send((job.seq, b)).is_err() {
                            break;
                        }
                    }
                }));
            }
            job_tx = Some(jt);
            res_rx = Some(rr);
        }
        Ok(BatchLoader {
            ds,
            cfg,
            cursor: Cursor::default(),
            order: None,
            plan_cursor: Cursor::default(),
            next_seq: 0,
            want_seq: 0,
            job_tx,
            res_rx,
            ready: BTreeMap::new(),
            threads,
            pool,
            scratch: Scratch::default(),
        })
    }

    /// Hands `batch`'s buffer back for reuse by a later batch. Dropping a batch does the
    /// same; this only makes the hand-back explicit at the call site.
    pub fn recycle(&self, batch: Batch) {
        drop(batch);
    }

    /// Samples this rank sees per epoch.
    pub fn samples_per_epoch(&self) -> u64 {
        self.ds.len() / self.cfg.world_size as u64
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> u64 {
        let n = self.samples_per_epoch();
        let b = self.cfg.batch_size as u64;
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Where the next batch starts; save it with a checkpoint and [`BatchLoader::seek`] to resume.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Moves to `c`; batches already prefetched are discarded.
    pub fn seek(&mut self, c: Cursor) -> Result<()> {
        if c.position > self.samples_per_epoch() {
            bail!(
                "cursor position {} is past the {} samples of an epoch",
                c.position,
                self.samples_per_epoch()
            );
        }
        // Wait for in-flight batches so none of them is mistaken for a new one.
        if let Some(rx) = &self.res_rx {
            while self.want_seq + (self.ready.len() as u64) < self.next_seq {
                let (s, b) = rx
                    .recv()
                    .map_err(|_| anyhow::anyhow!("batch workers stopped"))?;
                self.ready.insert(s, b);
            }
        }
        self.ready.clear();
        self.want_seq = self.next_seq;
        self.cursor = c;
        self.plan_cursor = c;
        Ok(())
    }

    /// The next batch, or `None` after the last epoch.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.job_tx.is_none() {
            return match self.plan_job() {
                Some(job) => {
                    let b = build_batch(&self.ds, &self.cfg, &job, &self.pool, &mut self.scratch)?;
                    self.cursor = b.next;
                    Ok(Some(b))
                }
                None => Ok(None),
            };
        }
        while self.next_seq - self.want_seq < self.cfg.prefetch.max(1) as u64 {
            let Some(job) = self.plan_job() else { break };
            if let Some(tx) = &self.job_tx {
                tx.send(job)
                    .map_err(|_| anyhow::anyhow!("batch workers stopped"))?;
            }
        }
        if self.want_seq == self.next_seq {
            return Ok(None);
        }
        loop {
            if let Some(b) = self.ready.remove(&self.want_seq) {
                self.want_seq += 1;
                let b = b?;
                self.cursor = b.next;
                return Ok(Some(b));
            }
            let rx = self
                .res_rx
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no workers"))?;
            let (s, b) = rx
                .recv()
                .map_err(|_| anyhow::anyhow!("batch workers stopped"))?;
            self.ready.insert(s, b);
        }
    }

    fn plan_job(&mut self) -> Option<Job> {
        let per_epoch = self.samples_per_epoch();
        let b = self.cfg.batch_size as u64;
        let mut c = self.plan_cursor;
        loop {
            if c.epoch >= self.cfg.epochs {
                return None;
            }
            let remaining = per_epoch - c.position.min(per_epoch);
            if remaining == 0 || (self.cfg.drop_last && remaining < b) {
                c = Cursor {
                    epoch: c.epoch + 1,
                    position: 0,
                };
                continue;
            }
            break;
        }
        if self.order.as_ref().map(|o| o.0) != Some(c.epoch) {
            self.order = Some((c.epoch, epoch_order(self.ds.len(), &self.cfg, c.epoch)));
        }
        let order = &self.order.as_ref()?.1;
        let end = (c.position + b).min(per_epoch);
        let indices = order[c.position as usize..end as usize].to_vec();
        let next = Cursor {
            epoch: c.epoch,
            position: end,
        };
        self.plan_cursor = next;
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(Job {
            seq,
            start: c,
            next,
            epoch: c.epoch,
            indices,
        })
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.job_tx = None;
        self.res_rx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn region(off: &mut usize, bytes: usize) -> (usize, usize) {
    let r = (*off, bytes);
    *off = (*off + bytes).div_ceil(64) * 64;
    r
}

/// Per-thread reusable memory for building batches, so the per-sample work allocates nothing.
#[derive(Default)]
struct Scratch {
    lens: Vec<usize>,
    tokens: Vec<u32>,
    feature: Vec<f32>,
    image: ImageScratch,
}

/// Builds one batch for the indices of `job` into a (possibly reused) buffer from `pool`.
fn build_batch(
    ds: &Dataset,
    cfg: &BatchConfig,
    job: &Job,
    pool: &Pool,
    scratch: &mut Scratch,
) -> Result<Batch> {
    let b = job.indices.len();
    let src = ds.image_size();
    let s = cfg.output_size.unwrap_or(src);
    let ctx = ds.context_length();
    let nt = ds.num_teachers();
    let Scratch {
        lens,
        tokens: tokbuf,
        feature: tmp,
        image: iscratch,
    } = scratch;
    lens.clear();
    for &i in &job.indices {
        lens.push(ds.token_len(i)?);
    }
    let l = if cfg.pad_to_longest {
        lens.iter().copied().max().unwrap_or(0).max(1)
    } else {
        ctx
    };
    let isz = match cfg.image_dtype {
        ImageDtype::F32 => 4,
        ImageDtype::Bf16 => 2,
        ImageDtype::U8 => 1,
    };
    let mut off = 0;
    let mut lay = BatchLayout {
        images: region(&mut off, b * 3 * s * s * isz),
        tokens: region(&mut off, b * l * 4),
        lengths: region(&mut off, b * 4),
        attention_mask: region(&mut off, b * l),
        ..Default::default()
    };
    match cfg.teachers {
        TeacherMode::None => {}
        TeacherMode::One => {
            lay.teacher_image = region(&mut off, b * PROJ_DIM * 4);
            lay.teacher_text = region(&mut off, b * PROJ_DIM * 4);
            lay.teacher_index = region(&mut off, b * 4);
        }
        TeacherMode::All => {
            lay.teacher_image = region(&mut off, b * nt * PROJ_DIM * 4);
            lay.teacher_text = region(&mut off, b * nt * PROJ_DIM * 4);
            lay.teacher_mask = region(&mut off, b * nt);
        }
    }
    lay.labels = region(&mut off, b * 4);
    lay.indices = region(&mut off, b * 8);
    // The images (offset 0) are overwritten completely; everything after them starts zeroed.
    let mut buf = pool.take(off / 8, lay.images.1);
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
    tokbuf.resize(ctx, 0);
    tmp.resize(PROJ_DIM, 0.0);
    // (x / 255 - mean) / std as one multiply-add per value.
    // Raw crops keep pixel values: the identity.
    let norm: [(f32, f32); 3] = match cfg.image_dtype {
        ImageDtype::U8 => [(1.0, 0.0); 3],
        _ => std::array::from_fn(|c| (1.0 / (255.0 * cfg.std[c]), -cfg.mean[c] / cfg.std[c])),
    };
    for (k, &i) in job.indices.iter().enumerate() {
        let img = ds.image(i)?;
        let aug = cfg
            .augment
            .as_ref()
            .map(|a| (a, sample_rng(cfg.seed, job.epoch, i, 1)));
        let dst = &mut bytes
            [lay.images.0 + k * 3 * s * s * isz..lay.images.0 + (k + 1) * 3 * s * s * isz];
        match cfg.image_dtype {
            ImageDtype::F32 => render_into::<f32>(
                img,
                src,
                s,
                aug,
                &norm,
                bytemuck::cast_slice_mut(dst),
                iscratch,
            ),
            ImageDtype::Bf16 => render_into::<bf16>(
                img,
                src,
                s,
                aug,
                &norm,
                bytemuck::cast_slice_mut(dst),
                iscratch,
            ),
            ImageDtype::U8 => render_into::<u8>(img, src, s, aug, &norm, dst, iscratch),
        }
        ds.tokens_into(i, tokbuf)?;
        let n = lens[k].min(l);
        {
            let t: &mut [u32] = bytemuck::cast_slice_mut(
                &mut bytes[lay.tokens.0 + k * l * 4..lay.tokens.0 + (k + 1) * l * 4],
            );
            t[..n].copy_from_slice(&tokbuf[..n]);
        }
        bytes[lay.lengths.0 + 4 * k..lay.lengths.0 + 4 * k + 4]
            .copy_from_slice(&(n as u32).to_le_bytes());
        bytes[lay.attention_mask.0 + k * l..lay.attention_mask.0 + k * l + n].fill(1);
        let avail = ds.available(i)?;
        match cfg.teachers {
            TeacherMode::None => {}
            TeacherMode::One => {
                let choice = choose_teacher(cfg.seed, job.epoch, i, avail);
                if let Some(t) = choice {
                    for (tower, r) in [
                        (Tower::Image, lay.teacher_image),
                        (Tower::Text, lay.teacher_text),
                    ] {
                        ds.proj_into(i, t, tower, tmp)?;
                        bytes[r.0 + k * PROJ_DIM * 4..r.0 + (k + 1) * PROJ_DIM * 4]
                            .copy_from_slice(bytemuck::cast_slice(tmp));
                    }
                }
                let v = choice.map_or(-1, |t| t as i32);
                bytes[lay.teacher_index.0 + 4 * k..lay.teacher_index.0 + 4 * k + 4]
                    .copy_from_slice(&v.to_le_bytes());
            }
            TeacherMode::All => {
                for t in 0..nt {
                    let on = (avail >> t) & 1 == 1;
                    bytes[lay.teacher_mask.0 + k * nt + t] = on as u8;
                    if on {
                        for (tower, r) in [
                            (Tower::Image, lay.teacher_image),
                            (Tower::Text, lay.teacher_text),
                        ] {
                            ds.proj_into(i, t, tower, tmp)?;
                            let o = r.0 + (k * nt + t) * PROJ_DIM * 4;
                            bytes[o..o + PROJ_DIM * 4].copy_from_slice(bytemuck::cast_slice(tmp));
                        }
                    }
                }
            }
        }
        bytes[lay.labels.0 + 4 * k..lay.labels.0 + 4 * k + 4]
            .copy_from_slice(&ds.label(i)?.to_le_bytes());
        bytes[lay.indices.0 + 8 * k..lay.indices.0 + 8 * k + 8].copy_from_slice(&i.to_le_bytes());
    }
    Ok(Batch {
        size: b,
        image_size: s,
        token_len: l,
        num_teachers: nt,
        image_dtype: cfg.image_dtype,
        teachers: cfg.teachers,
        start: job.start,
        next: job.next,
        layout: lay,
        buf,
        pool: Some(pool.tx.clone()),
    })
}

/// An element type images can be written in.
pub trait Pixel: Copy + bytemuck::Pod {
    fn from_f32(x: f32) -> Self;
}

impl Pixel for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Pixel for u8 {
    /// Rounds to nearest (halves up) and saturates to 0..=255 (NaN gives 0).
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        (x + 0.5) as u8
    }
}

impl Pixel for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(f32_to_bf16_bits(x))
    }
}

/// `f32` → `bf16` bits, rounding to nearest even; NaN stays a quiet NaN of the same sign and
/// payload top. Bit-identical to `half::bf16::from_f32`, but branch-free so that the pixel
/// loops vectorise.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// Reusable memory of [`render_into`]: interpolation taps and horizontally resampled rows.
#[derive(Default)]
struct ImageScratch {
    /// Per output column: left source column, right source column, weight of the right one
    /// (separate arrays so the horizontal pass can load them as vectors).
    x0: Vec<u32>,
    x1: Vec<u32>,
    wx: Vec<f32>,
    /// Per output row: top source row, bottom source row, weight of the bottom one.
    ys: Vec<(u32, u32, f32)>,
    /// One source row as `f32`.
    line: Vec<f32>,
    /// Horizontally resampled source rows of one channel, `s` values each.
    rows: Vec<f32>,
}

/// Writes the normalised planar image `(3, s, s)` of a `(3, src, src)` u8 image into `out`,
/// through a random resized crop and flip when `aug` is given (bilinear sampling).
/// `norm[c]` = (scale, bias) maps a pixel value v to `v * scale + bias`; `scratch` is reused.
pub fn render_image<T: Pixel>(
    img: &[u8],
    src: usize,
    s: usize,
    aug: Option<(&Augment, ChaCha8Rng)>,
    norm: &[(f32, f32); 3],
    out: &mut [T],
    scratch: &mut Vec<f32>,
) {
    let mut sc = ImageScratch {
        rows: std::mem::take(scratch),
        ..Default::default()
    };
    render_into(img, src, s, aug, norm, out, &mut sc);
    *scratch = sc.rows;
}

/// [`render_image`] with all scratch memory supplied by the caller.
fn render_into<T: Pixel>(
    img: &[u8],
    src: usize,
    s: usize,
    aug: Option<(&Augment, ChaCha8Rng)>,
    norm: &[(f32, f32); 3],
    out: &mut [T],
    scratch: &mut ImageScratch,
) {
    let full = (0.0, 0.0, src as f32, src as f32);
    let Some((a, mut r)) = aug else {
        if s == src {
            copy_normalised(img, s, false, norm, out);
        } else {
            sample_crop(img, src, s, full, false, norm, out, scratch);
        }
        return;
    };
    // Random resized crop as torchvision draws it: area and log-uniform aspect, ten tries,
    // then the whole image.
    let area = (src * src) as f32;
    let mut rect = full;
    for _ in 0..10 {
        let target = area * r.gen_range(a.scale.0..=a.scale.1);
        let logr = r.gen_range(a.ratio.0.ln()..=a.ratio.1.ln());
        let ar = logr.exp();
        let w = (target * ar).sqrt();
        let h = (target / ar).sqrt();
        if w <= src as f32 && h <= src as f32 {
            let x = r.gen_range(0.0..=(src as f32 - w));
            let y = r.gen_range(0.0..=(src as f32 - h));
            rect = (x, y, w, h);
            break;
        }
    }
    let flip = r.gen::<f32>() < a.flip;
    if rect == full && s == src {
        // Bilinear sampling of the whole image at its own size lands exactly on the source
        // pixels (all weights 0), so a copy gives the same values.
        copy_normalised(img, s, flip, norm, out);
    } else {
        sample_crop(img, src, s, rect, flip, norm, out, scratch);
    }
}

/// Normalises an `s × s` planar image without resampling (mirrored when `flip`), through a
/// per-channel table of the 256 possible output values.
fn copy_normalised<T: Pixel>(
    img: &[u8],
    s: usize,
    flip: bool,
    norm: &[(f32, f32); 3],
    out: &mut [T],
) {
    for (c, &(scale, bias)) in norm.iter().enumerate() {
        let lut: [T; 256] = std::array::from_fn(|v| T::from_f32(v as f32 * scale + bias));
        let plane = &img[c * s * s..(c + 1) * s * s];
        let o = &mut out[c * s * s..(c + 1) * s * s];
        for (orow, irow) in o.chunks_exact_mut(s).zip(plane.chunks_exact(s)) {
            if flip {
                for (d, &v) in orow.iter_mut().zip(irow.iter().rev()) {
                    *d = lut[v as usize];
                }
            } else {
                for (d, &v) in orow.iter_mut().zip(irow) {
                    *d = lut[v as usize];
                }
            }
        }
    }
}

/// Bilinear taps of `n` output samples over `[start, start + len)` of a `src`-long axis:
/// (left index, right index, weight of the right one).
fn tap(k: usize, n: usize, src: usize, start: f32, len: f32) -> (u32, u32, f32) {
    let f = (start + (k as f32 + 0.5) * len / n as f32 - 0.5).clamp(0.0, (src - 1) as f32);
    let i0 = f as usize;
    let i1 = (i0 + 1).min(src - 1);
    (i0 as u32, i1 as u32, f - i0 as f32)
}

/// Bilinear resampling of `rect` = (x, y, w, h) of the source to `s × s`, separably: each
/// source row the crop touches is resampled horizontally once into scratch, then output
/// rows are blended from two of those (a contiguous, vectorisable loop). Uses AVX2 (whose
/// gathers vectorise the horizontal pass) when the CPU has it; the arithmetic is the same
/// IEEE operations in the same order either way, so the output is bit-identical.
#[allow(clippy::too_many_arguments)]
fn sample_crop<T: Pixel>(
    img: &[u8],
    src: usize,
    s: usize,
    rect: (f32, f32, f32, f32),
    flip: bool,
    norm: &[(f32, f32); 3],
    out: &mut [T],
    scratch: &mut ImageScratch,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { sample_crop_avx2(img, src, s, rect, flip, norm, out, scratch) };
        return;
    }
    sample_crop_generic(img, src, s, rect, flip, norm, out, scratch);
}

/// [`sample_crop_generic`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn sample_crop_avx2<T: Pixel>(
    img: &[u8],
    src: usize,
    s: usize,
    rect: (f32, f32, f32, f32),
    flip: bool,
    norm: &[(f32, f32); 3],
    out: &mut [T],
    scratch: &mut ImageScratch,
) {
    sample_crop_generic(img, src, s, rect, flip, norm, out, scratch);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sample_crop_generic<T: Pixel>(
    img: &[u8],
    src: usize,
    s: usize,
    rect: (f32, f32, f32, f32),
    flip: bool,
    norm: &[(f32, f32); 3],
    out: &mut [T],
    scratch: &mut ImageScratch,
) {
    let (rx, ry, rw, rh) = rect;
    let ImageScratch {
        x0,
        x1,
        wx,
        ys,
        line,
        rows,
    } = scratch;
    x0.clear();
    x1.clear();
    wx.clear();
    for k in 0..s {
        let (a, b, w) = tap(if flip { s - 1 - k } else { k }, s, src, rx, rw);
        x0.push(a);
        x1.push(b);
        wx.push(w);
    }
    ys.clear();
    ys.extend((0..s).map(|k| tap(k, s, src, ry, rh)));
    // Columns and rows are monotone, so the touched source pixels are one rectangle.
    let (xlo, xhi) = (x0.iter().min(), x1.iter().max());
    let (xlo, xhi) = (
        xlo.copied().unwrap_or(0) as usize,
        xhi.copied().unwrap_or(0) as usize,
    );
    for x in x0.iter_mut().chain(x1.iter_mut()) {
        *x -= xlo as u32;
    }
    let width = xhi - xlo + 1;
    line.resize(width, 0.0);
    let ylo = ys[0].0 as usize;
    let nrows = ys[s - 1].1 as usize - ylo + 1;
    rows.resize(nrows * s, 0.0);
    let (x0, x1, wx) = (&x0[..s], &x1[..s], &wx[..s]);
    for (c, &(scale, bias)) in norm.iter().enumerate() {
        let p = &img[c * src * src..(c + 1) * src * src];
        for (r, trow) in rows.chunks_exact_mut(s).enumerate() {
            let srow = &p[(ylo + r) * src + xlo..(ylo + r) * src + xlo + width];
            for (l, &v) in line.iter_mut().zip(srow) {
                *l = v as f32;
            }
            let line = &line[..width];
            let last = width - 1;
            for k in 0..s {
                // The taps lie inside `line` already; the `min` only lets the compiler drop
                // the bounds checks so the loop vectorises.
                let (a, b) = (
                    line[(x0[k] as usize).min(last)],
                    line[(x1[k] as usize).min(last)],
                );
                trow[k] = a + (b - a) * wx[k];
            }
        }
        let o = &mut out[c * s * s..(c + 1) * s * s];
        for (orow, &(y0, y1, wy)) in o.chunks_exact_mut(s).zip(ys.iter()) {
            let (y0, y1) = (y0 as usize - ylo, y1 as usize - ylo);
            let t0 = &rows[y0 * s..(y0 + 1) * s];
            let t1 = &rows[y1 * s..(y1 + 1) * s];
            // Normalisation is affine, so applying it after interpolation is exact.
            for ((d, &a), &b) in orow.iter_mut().zip(t0).zip(t1) {
                *d = T::from_f32((a + (b - a) * wy) * scale + bias);
            }
        }
    }
}
