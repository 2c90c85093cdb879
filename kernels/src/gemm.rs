//! bf16 matrix products on the tensor cores with fused epilogues: CPU reference, emulation
//! launcher and GPU launcher with the same parameters, and their tests. Three kernel files
//! compute the same products ([`GemmPath`]): `cuda/gemm.cu` (`mma.sync`, any GPU from sm_80),
//! `cuda/gemm_wgmma.cu` (Hopper's `wgmma`, tiles copied by the threads),
//! `cuda/gemm_wgmma_tma.cu` (`wgmma`, tiles copied by the tensor copy engine) and
//! `cuda/gemm_ws.cu` (`wgmma` and TMA, persistent and warp-specialised).
//!
//! `C(m, n) = epilogue(Σ_k A(m, k)·B(k, n))` per batch, fp32 accumulation, with the operands
//! stored as a linear layer's training step has them ([`GemmLayout`]):
//!
//! | layout | A stored | B stored | use |
//! |---|---|---|---|
//! | `Forward` | (M, K) | (N, K) | `Y = X·Wᵀ + b` |
//! | `InputGrad` | (M, K) | (K, N) | `dX = dY·W` |
//! | `WeightGrad` | (K, M) | (K, N) | `dW = dYᵀ·X`, `db = Σ_tokens dY` |
//!
//! Epilogue, in order: `+ bias[n]`, activation ([`Activation`]), `+ residual(m, n)`, then the
//! store as bf16 or fp32 ([`GemmOut`]). The residual's buffer can instead receive the
//! pre-activation, or supply a saved one whose activation derivative scales the product
//! ([`Aux`]): a linear layer and its activation, forward and backward, in one pass each. With
//! `WeightGrad`, `dbias(m) = Σ_k A(k, m)` is reduced in the same pass (fp32, overwritten). All matrices are contiguous; batch `z` of each starts
//! at `z · rows · cols`; `bias` is shared by the batches, `dbias` is (batch, M).

use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{Step, P};
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::{KernelFile, GEMM, GEMM_WGMMA, GEMM_WGMMA_TMA, GEMM_WS};
use crate::testing::bf16_bits;
use crate::tma::MapSpec;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

/// Block tile of the kernel in m and n (`GEMM_BM`, `GEMM_BN` in `gemm.cu`).
const TILE_M: usize = 128;
const TILE_N: usize = 64;
/// Threads per block and dynamic shared memory per block (`GEMM_SMEM_BYTES`).
const THREADS: u32 = 128;
const SMEM_BYTES: u32 = 3 * (128 * 40 + 64 * 40) * 2;
// The launchers do not raise the 48 KiB default limit of dynamic shared memory.
const _: () = assert!(SMEM_BYTES <= 48 * 1024);
/// The wgmma kernel (`gemm_wgmma.cu`): block tile 128 × 128, two warpgroups, four stages of
/// two 16 KiB operand tiles (`WG_SMEM_BYTES`; the GPU launcher opts in above 48 KiB).
const WG_TILE: usize = 128;
const WG_THREADS: u32 = 256;
const WG_SMEM_BYTES: u32 = 4 * 2 * 128 * 64 * 2;
/// The TMA kernels (`gemm_wgmma_tma.cu`): the same tiles and stages, plus four mbarriers and
/// room to align the tiles to 1024 bytes (`WT_SMEM_BYTES`).
const WT_SMEM_BYTES: u32 = WG_SMEM_BYTES + 4 * 8 + 1024;
/// The warp-specialised kernels (`gemm_ws.cu`): block tile 128 × 256, three warpgroups, four
/// stages of a 16 KiB A tile and a 32 KiB B tile, eight mbarriers and the alignment room
/// (`WS_SMEM_BYTES`).
const WS_TILE_N: usize = 256;
const WS_THREADS: u32 = 384;
const WS_SMEM_BYTES: u32 = 4 * (128 + 256) * 64 * 2 + 8 * 8 + 1024;

#[cfg(test)]
thread_local! {
    /// Tests cap the persistent grid so that small products still give a block several tiles.
    static WS_GRID_CAP: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Which tensor-core instruction a product runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPath {
    /// `mma.sync` m16n8k16 (`gemm.cu`, sm_80 and newer), every layout.
    #[default]
    MmaSync,
    /// Hopper's warpgroup `wgmma` (`gemm_wgmma.cu`, sm_90a only), every layout: operands
    /// stored with M or N contiguous are read through the instruction's transpose flags.
    Wgmma,
    /// `wgmma` with the operand tiles copied by the tensor copy engine (`gemm_wgmma_tma.cu`,
    /// sm_90a only). Operands the engine cannot copy (a row length that is not a multiple of
    /// 8, an address off a 16-byte boundary) take `Wgmma`, with the same results.
    WgmmaTma,
    /// `wgmma` and TMA in a persistent, warp-specialised kernel on 128 × 256 tiles
    /// (`gemm_ws.cu`, sm_90a only): one block per multiprocessor ([`TUNED_SMS`]), a producer
    /// warpgroup copying tiles while two consumer warpgroups multiply. Operands the copy
    /// engine cannot take run on `Wgmma`, with the same results.
    WgmmaWs,
}

impl GemmPath {
    /// `mma`, `wgmma`, `tma` or `ws`: the names `MMKD_GEMM_PATH` takes and reports use.
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::MmaSync => "mma",
            GemmPath::Wgmma => "wgmma",
            GemmPath::WgmmaTma => "tma",
            GemmPath::WgmmaWs => "ws",
        }
    }
    /// Whether the path copies its operands with the tensor copy engine (tensor maps).
    fn uses_maps(self) -> bool {
        matches!(self, GemmPath::WgmmaTma | GemmPath::WgmmaWs)
    }
}

/// How A and B are stored; see the module table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmLayout {
    /// A (M, K), B (N, K): `Y = X·Wᵀ`.
    Forward,
    /// A (M, K), B (K, N): `dX = dY·W`.
    InputGrad,
    /// A (K, M), B (K, N): `dW = dYᵀ·X`, optionally with the bias gradient.
    WeightGrad,
}

impl GemmLayout {
    fn entry(self) -> &'static str {
        match self {
            GemmLayout::Forward => "gemm_fwd",
            GemmLayout::InputGrad => "gemm_dgrad",
            GemmLayout::WeightGrad => "gemm_wgrad",
        }
    }
    fn wgmma_entry(self) -> &'static str {
        match self {
            GemmLayout::Forward => "gemm_fwd_wgmma",
            GemmLayout::InputGrad => "gemm_dgrad_wgmma",
            GemmLayout::WeightGrad => "gemm_wgrad_wgmma",
        }
    }
    fn tma_entry(self) -> &'static str {
        match self {
            GemmLayout::Forward => "gemm_fwd_tma",
            GemmLayout::InputGrad => "gemm_dgrad_tma",
            GemmLayout::WeightGrad => "gemm_wgrad_tma",
        }
    }
    fn ws_entry(self) -> &'static str {
        match self {
            GemmLayout::Forward => "gemm_fwd_ws",
            GemmLayout::InputGrad => "gemm_dgrad_ws",
            GemmLayout::WeightGrad => "gemm_wgrad_ws",
        }
    }
}

/// The activation applied after the bias (`mmkd_act` in `cuda/prelude.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// GELU, erf form (BERT): `v Φ(v)`.
    Gelu,
    /// QuickGELU (CLIP): `v · sigmoid(1.702 v)`.
    QuickGelu,
}

impl Activation {
    fn code(self) -> i32 {
        match self {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::QuickGelu => 2,
        }
    }
    fn apply(self, v: f64) -> f64 {
        match self {
            Activation::None => v,
            Activation::Gelu => {
                0.5 * v * (1.0 + crate::elementwise::erf(v / std::f64::consts::SQRT_2))
            }
            Activation::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        }
    }
    /// d/dv of [`Activation::apply`].
    fn grad(self, v: f64) -> f64 {
        match self {
            Activation::None => 1.0,
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + crate::elementwise::erf(v / std::f64::consts::SQRT_2));
                cdf + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            Activation::QuickGelu => {
                let s = 1.0 / (1.0 + (-1.702 * v).exp());
                s + 1.702 * v * s * (1.0 - s)
            }
        }
    }
}

/// What the epilogue's fourth buffer (`aux`, bf16 in C's shape (batch, M, N)) is: the
/// `GEMM_AUX_*` modes of `cuda/prelude.cuh`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuxUse {
    /// Absent.
    #[default]
    None,
    /// A residual, added after the activation.
    Residual,
    /// Written: the pre-activation `Σ + bias`, rounded to bf16; C is the activation of that
    /// rounded value (what a separate activation kernel reading it would give).
    SavePre,
    /// Read: a pre-activation u saved by `SavePre`; `C = Σ · act'(u)`, no bias. The input
    /// gradient of a layer whose output went through the activation.
    ActGrad,
}

impl AuxUse {
    /// The mode bits the kernels add to the activation code.
    fn code(self) -> i32 {
        match self {
            AuxUse::None | AuxUse::Residual => 0,
            AuxUse::SavePre => 4,
            AuxUse::ActGrad => 8,
        }
    }
}

/// The `aux` buffer of a launcher call with its use ([`AuxUse`]); `T` is `[bf16]` on the CPU
/// and the emulation, `CudaSlice<u16>` on a GPU.
#[derive(Debug)]
pub enum Aux<'a, T: ?Sized> {
    /// No aux buffer.
    None,
    /// `+ residual(m, n)` after the activation.
    Residual(&'a T),
    /// Receives the pre-activation.
    SavePre(&'a mut T),
    /// A saved pre-activation whose activation derivative scales the product.
    ActGrad(&'a T),
}

impl<T: ?Sized> Aux<'_, T> {
    /// Which use this is.
    pub fn usage(&self) -> AuxUse {
        match self {
            Aux::None => AuxUse::None,
            Aux::Residual(_) => AuxUse::Residual,
            Aux::SavePre(_) => AuxUse::SavePre,
            Aux::ActGrad(_) => AuxUse::ActGrad,
        }
    }
    fn buf(&self) -> Option<&T> {
        match self {
            Aux::None => None,
            Aux::Residual(t) | Aux::ActGrad(t) => Some(t),
            Aux::SavePre(t) => Some(t),
        }
    }
}

/// Sizes and layout of one (batched) product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// How A and B are stored.
    pub layout: GemmLayout,
    /// Independent products in one launch (≥ 1).
    pub batch: usize,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The reduced dimension.
    pub k: usize,
    /// The activation of the epilogue.
    pub act: Activation,
}

impl GemmShape {
    fn validate(&self) -> Result<()> {
        ensure!(
            self.batch > 0 && self.m > 0 && self.n > 0 && self.k > 0,
            "gemm: empty shape {self:?}"
        );
        ensure!(
            self.batch <= 65535 && self.m.div_ceil(TILE_M) <= 65535,
            "gemm: {self:?} exceeds the launch grid (batch and M/128 ≤ 65535)"
        );
        for (what, v) in [
            ("M*K", self.m * self.k),
            ("N*K", self.n * self.k),
            ("M*N", self.m * self.n),
            ("batch*M*K", self.batch * self.m * self.k),
            ("batch*N*K", self.batch * self.n * self.k),
            ("batch*M*N", self.batch * self.m * self.n),
        ] {
            Arg::int(&format!("gemm {what}"), v)?;
        }
        Ok(())
    }
    /// Elements of A, B and C over all batches.
    fn lens(&self) -> (usize, usize, usize) {
        let b = self.batch;
        (
            b * self.m * self.k,
            b * self.n * self.k,
            b * self.m * self.n,
        )
    }
    /// The tensor maps of A and B for the TMA kernels, when the copy engine can take both:
    /// a K-major operand, stored (rows, K), in boxes of 128 rows × 64 k; an MN-major one,
    /// stored (K, rows), in boxes of 64 k × 64 rows.
    pub fn map_specs(&self) -> Option<(MapSpec, MapSpec)> {
        self.map_specs_for(GemmPath::WgmmaTma)
    }
    /// [`GemmShape::map_specs`] for the kernels of `path` (`WgmmaWs`: a K-major B in boxes of
    /// 256 rows); `None` for the paths without tensor maps.
    fn map_specs_for(&self, path: GemmPath) -> Option<(MapSpec, MapSpec)> {
        let b_rows = match path {
            GemmPath::WgmmaTma => 128,
            GemmPath::WgmmaWs => WS_TILE_N as u32,
            _ => return None,
        };
        let (lda, ldb, _) = self.leading();
        let spec = |kmajor: bool, rows: usize, ld: usize, tile_rows: u32| {
            let (r, c, box_rows) = if kmajor {
                (rows, self.k, tile_rows)
            } else {
                (self.k, rows, 64)
            };
            MapSpec {
                batch: self.batch,
                rows: r,
                cols: c,
                ld,
                batch_stride: rows * self.k,
                box_rows,
                box_cols: 64,
            }
        };
        let a = spec(self.layout != GemmLayout::WeightGrad, self.m, lda, 128);
        let b = spec(self.layout == GemmLayout::Forward, self.n, ldb, b_rows);
        (a.supported() && b.supported()).then_some((a, b))
    }
    /// The path that runs: `WgmmaTma` and `WgmmaWs` become `Wgmma` where the copy engine
    /// cannot take the operands (`aligned`: both start on a 16-byte boundary).
    fn effective(&self, path: GemmPath, aligned: bool) -> GemmPath {
        if path.uses_maps() && (!aligned || self.map_specs_for(path).is_none()) {
            return GemmPath::Wgmma;
        }
        path
    }
    /// The kernel file, entry point and launch of this product on `path` (after
    /// [`GemmShape::effective`]).
    fn kernel(&self, path: GemmPath) -> (&'static KernelFile, &'static str, LaunchShape) {
        if path == GemmPath::WgmmaWs {
            // Persistent: one block per multiprocessor, each looping over tiles.
            let tiles = self.batch * self.m.div_ceil(WG_TILE) * self.n.div_ceil(WS_TILE_N);
            #[allow(unused_mut)]
            let mut ctas = TUNED_SMS as u32;
            #[cfg(test)]
            if let Some(cap) = WS_GRID_CAP.with(|c| c.get()) {
                ctas = cap;
            }
            let launch = LaunchShape {
                grid: [(tiles as u32).min(ctas), 1, 1],
                block: [WS_THREADS, 1, 1],
                shared_bytes: WS_SMEM_BYTES,
            };
            return (&GEMM_WS, self.layout.ws_entry(), launch);
        }
        if path != GemmPath::MmaSync {
            let mut launch = LaunchShape {
                grid: [
                    self.n.div_ceil(WG_TILE) as u32,
                    self.m.div_ceil(WG_TILE) as u32,
                    self.batch as u32,
                ],
                block: [WG_THREADS, 1, 1],
                shared_bytes: WG_SMEM_BYTES,
            };
            if path == GemmPath::WgmmaTma {
                launch.shared_bytes = WT_SMEM_BYTES;
                return (&GEMM_WGMMA_TMA, self.layout.tma_entry(), launch);
            }
            return (&GEMM_WGMMA, self.layout.wgmma_entry(), launch);
        }
        let launch = LaunchShape {
            grid: [
                self.n.div_ceil(TILE_N) as u32,
                self.m.div_ceil(TILE_M) as u32,
                self.batch as u32,
            ],
            block: [THREADS, 1, 1],
            shared_bytes: SMEM_BYTES,
        };
        (&GEMM, self.layout.entry(), launch)
    }
    /// Row lengths of the stored A, B and C.
    fn leading(&self) -> (usize, usize, usize) {
        match self.layout {
            GemmLayout::Forward => (self.k, self.k, self.n),
            GemmLayout::InputGrad => (self.k, self.n, self.n),
            GemmLayout::WeightGrad => (self.m, self.n, self.n),
        }
    }
}

/// The output buffer of the CPU and emulated launchers: bf16 or fp32, (batch, M, N).
#[derive(Debug)]
pub enum GemmOut<'a> {
    /// Rounded to bf16.
    Bf16(&'a mut [bf16]),
    /// Kept in fp32.
    F32(&'a mut [f32]),
}

impl GemmOut<'_> {
    fn len(&self) -> usize {
        match self {
            GemmOut::Bf16(s) => s.len(),
            GemmOut::F32(s) => s.len(),
        }
    }
}

/// The output buffer of the GPU launcher: bf16 (as raw bits) or fp32, (batch, M, N).
#[derive(Debug)]
pub enum GemmOutCuda<'a> {
    /// Rounded to bf16.
    Bf16(&'a mut CudaSlice<u16>),
    /// Kept in fp32.
    F32(&'a mut CudaSlice<f32>),
}

/// Buffer lengths in parameter order: a, b, bias, aux, out, dbias; and the options' rules.
fn check_lens(sh: &GemmShape, aux: AuxUse, lens: [Option<usize>; 6]) -> Result<()> {
    sh.validate()?;
    let kernel = sh.layout.entry();
    ensure!(
        lens[5].is_none() || sh.layout == GemmLayout::WeightGrad,
        "{kernel}: a bias gradient is reduced only by the WeightGrad layout"
    );
    if matches!(aux, AuxUse::SavePre | AuxUse::ActGrad) {
        ensure!(
            sh.act != Activation::None,
            "{kernel}: {aux:?} needs an activation"
        );
    }
    ensure!(
        aux != AuxUse::ActGrad || lens[2].is_none(),
        "{kernel}: ActGrad takes no bias (the derivative scales the bare product)"
    );
    let (la, lb, lc) = sh.lens();
    let names = ["a", "b", "bias", "aux", "out", "dbias"];
    let needs = [la, lb, sh.n, lc, lc, sh.batch * sh.m];
    for ((name, have), need) in names.iter().zip(lens).zip(needs) {
        if let Some(have) = have {
            check_len(kernel, name, have, need)?;
        }
    }
    Ok(())
}

/// The kernel's parameters after the six pointers (`path`: the one that runs; the
/// persistent kernels also take the batch count).
fn scalar_args(sh: &GemmShape, aux: AuxUse, out_f32: bool, path: GemmPath) -> Result<Vec<Arg>> {
    let (lda, ldb, ldc) = sh.leading();
    let (m, n, k) = (sh.m, sh.n, sh.k);
    let mut args = vec![
        Arg::int("gemm M", m)?,
        Arg::int("gemm N", n)?,
        Arg::int("gemm K", k)?,
        Arg::int("gemm lda", lda)?,
        Arg::int("gemm ldb", ldb)?,
        Arg::int("gemm ldc", ldc)?,
        Arg::int("gemm A stride", m * k)?,
        Arg::int("gemm B stride", n * k)?,
        Arg::int("gemm C stride", m * n)?,
        Arg::I32(sh.act.code() | aux.code()),
        Arg::I32(i32::from(out_f32)),
    ];
    if path == GemmPath::WgmmaWs {
        args.push(Arg::int("gemm batch", sh.batch)?);
    }
    Ok(args)
}

/// Which optional buffers a planned product uses (see [`GemmShape::plan`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GemmOpts {
    /// `+ bias[n]` from slot 2.
    pub bias: bool,
    /// What slot 3 is ([`AuxUse`]).
    pub aux: AuxUse,
    /// Store C in fp32 (else bf16).
    pub out_f32: bool,
    /// Reduce the bias gradient into slot 5 (`WeightGrad` only).
    pub dbias: bool,
    /// The tensor-core instruction.
    pub path: GemmPath,
    /// Split K (`WeightGrad` only, 0 or 1: no split): the product runs as `split_k` partial
    /// products over consecutive chunks of K into the fp32 workspace of slot 6
    /// ([`GemmShape::split_workspace_len`]), then one pass adds them up in a fixed order. It
    /// fills the GPU when a weight gradient has few output tiles and many tokens
    /// ([`choose_split_k`]).
    pub split_k: usize,
}

/// The multiprocessor count the engine gives [`choose_split_k`], and the grid of the
/// persistent `WgmmaWs` kernels: an H100/H200 SXM's 132, the chips the training step is tuned
/// for. Any count gives correct products; only the speed depends on it (on a GPU with fewer
/// multiprocessors the surplus persistent blocks wait for a second wave), and a fixed count
/// keeps the arena's layout, and so the plans the emulation tests, identical to what the GPU
/// runs.
pub const TUNED_SMS: usize = 132;

/// The shortest chunk of K a split hands to one partial product: below it the partials'
/// traffic outweighs the tiles gained.
pub const SPLIT_K_MIN_CHUNK: usize = 256;

/// Split counts [`choose_split_k`] considers.
const SPLIT_K_CANDIDATES: [usize; 5] = [2, 4, 8, 16, 32];

/// The split of K for a product on a GPU with `sms` multiprocessors: 1 (none) unless a
/// `WeightGrad` of one batch whose output tiles leave multiprocessors idle runs faster, by a
/// simple model, as partial products plus a reduction.
///
/// The model: tiles run in waves of `sms` × (blocks resident per multiprocessor), each tile's
/// time proportional to its k tiles (64 of K) at the bf16 tensor rate of one multiprocessor
/// (about 790 TFLOP/s / 132); a split adds its partials' traffic (written once, read once) at
/// about 4.3 TB/s. A split is taken only when it saves at least 10% by that model. Example,
/// ViT-B/16 at batch 256 (K = 50 432 tokens) on wgmma: the 768 × 768 output projection has
/// 36 tiles of 128 × 128 and takes 16 chunks; the MLP's 3072 × 768 takes 8.
pub fn choose_split_k(sh: &GemmShape, path: GemmPath, sms: usize) -> usize {
    if sh.layout != GemmLayout::WeightGrad || sh.batch != 1 || sms == 0 {
        return 1;
    }
    // Block tile and blocks per multiprocessor: gemm.cu (46 KiB of shared memory, 128
    // threads) fits 4; the wgmma kernels (128 KiB) one.
    let (tm, tn, per_sm) = match path {
        GemmPath::MmaSync => (TILE_M, TILE_N, 4),
        GemmPath::Wgmma | GemmPath::WgmmaTma => (WG_TILE, WG_TILE, 1),
        GemmPath::WgmmaWs => (WG_TILE, WS_TILE_N, 1),
    };
    let tiles = sh.m.div_ceil(tm) * sh.n.div_ceil(tn);
    let slots = sms * per_sm;
    // Seconds: a k tile of one block (the chip's bf16 rate shared by its multiprocessors and
    // their resident blocks), and a byte of device memory.
    use crate::selftest::{H200_BF16_TFLOPS, H200_COPY_GBPS};
    let k_tile =
        2.0 * (tm * tn * 64) as f64 / (H200_BF16_TFLOPS * 1e12 / TUNED_SMS as f64) * per_sm as f64;
    let byte = 1.0 / (H200_COPY_GBPS * 1e9);
    let cost = |s: usize| {
        let waves = (tiles * s).div_ceil(slots) as f64;
        let partials = if s > 1 {
            2.0 * (s * (sh.m * sh.n + sh.m) * 4) as f64 * byte
        } else {
            0.0
        };
        waves * (sh.k / s).div_ceil(64) as f64 * k_tile + partials
    };
    let mut best = (1, cost(1));
    for s in SPLIT_K_CANDIDATES {
        if !sh.k.is_multiple_of(s) || !(sh.k / s).is_multiple_of(8) || sh.k / s < SPLIT_K_MIN_CHUNK
        {
            continue;
        }
        let c = cost(s);
        if c < best.1 {
            best = (s, c);
        }
    }
    if best.1 <= 0.9 * cost(1) {
        best.0
    } else {
        1
    }
}

impl GemmShape {
    /// fp32 elements of the workspace (slot 6) that a plan splitting K `split_k` ways needs:
    /// the partial products, (split_k, M, N), then the partial bias gradients, (split_k, M).
    /// 0 without a split.
    pub fn split_workspace_len(&self, split_k: usize) -> usize {
        if split_k > 1 {
            split_k * (self.m * self.n + self.m)
        } else {
            0
        }
    }

    /// What a split of K asks of the product: the plain fp32 weight gradient of one batch
    /// (the partials carry no epilogue), and chunks of equal length whose starts stay
    /// 16-byte aligned.
    fn check_split(&self, opts: &GemmOpts) -> Result<()> {
        let s = opts.split_k;
        ensure!(
            self.layout == GemmLayout::WeightGrad && self.batch == 1,
            "gemm: split K needs the WeightGrad layout and one batch, got {self:?}"
        );
        ensure!(
            !opts.bias && opts.aux == AuxUse::None && self.act == Activation::None && opts.out_f32,
            "gemm: split K takes no bias, aux or activation and stores fp32 ({opts:?})"
        );
        ensure!(
            self.k.is_multiple_of(s) && (self.k / s).is_multiple_of(8),
            "gemm: split K {s} of K = {} needs equal chunks that are multiples of 8",
            self.k
        );
        Ok(())
    }

    /// The launch as a plan ([`crate::exec`]) over the buffer slots
    /// `[a, b, bias, aux, out, dbias]`; slots of absent options are passed as null.
    /// The caller guarantees the lengths [`gemm_cpu`] checks.
    ///
    /// With [`GemmOpts::split_k`] > 1 the plan has two steps and a seventh slot, the fp32
    /// workspace of [`GemmShape::split_workspace_len`]: the partial products (the batched
    /// kernel over the chunks of K, which are consecutive rows of A and B) and
    /// `gemm_splitk_reduce`, which stores their sums in slot 4 and the bias gradient in slot 5.
    pub fn plan(&self, opts: GemmOpts) -> Result<Vec<Step>> {
        if opts.split_k > 1 {
            return self.plan_split(opts);
        }
        // Only the shape and the options' rules are checked here: slots carry no lengths.
        check_lens(
            self,
            opts.aux,
            [
                None,
                None,
                opts.bias.then_some(self.n),
                None,
                None,
                opts.dbias.then_some(self.batch * self.m),
            ],
        )?;
        let slot = |on: bool, i: usize| if on { P::Buf(i) } else { P::Null };
        // Arena regions are 256-byte aligned: the maps' alignment is checked when they are
        // encoded, at each run.
        let path = self.effective(opts.path, true);
        let (pa, pb) = match self.map_specs_for(path) {
            Some((a, b)) => (P::Map(0, a), P::Map(1, b)),
            None => (P::Buf(0), P::Buf(1)),
        };
        let mut args = vec![
            pa,
            pb,
            slot(opts.bias, 2),
            slot(opts.aux != AuxUse::None, 3),
            P::Buf(4),
            slot(opts.dbias, 5),
        ];
        for a in scalar_args(self, opts.aux, opts.out_f32, path)? {
            match a {
                Arg::I32(v) => args.push(P::I32(v)),
                other => anyhow::bail!("gemm: unexpected scalar argument {other:?}"),
            }
        }
        let (file, kernel, shape) = self.kernel(path);
        Ok(vec![Step {
            file,
            kernel,
            shape,
            args,
        }])
    }
}

impl GemmShape {
    fn plan_split(&self, opts: GemmOpts) -> Result<Vec<Step>> {
        self.check_split(&opts)?;
        let s = opts.split_k;
        let part = GemmShape {
            batch: s,
            k: self.k / s,
            ..*self
        };
        let mut steps = part.plan(GemmOpts { split_k: 1, ..opts })?;
        let mn = self.m * self.n;
        // The partials go to the workspace: C of chunk z at z·M·N, its bias sums after all
        // of them.
        steps[0].args[4] = P::Buf(6);
        if opts.dbias {
            steps[0].args[5] = P::At(6, s * mn);
        }
        let work = (mn / 4).max(self.m);
        steps.push(Step {
            file: &GEMM,
            kernel: "gemm_splitk_reduce",
            shape: LaunchShape::linear(work.div_ceil(256).clamp(1, 4096) as u32, 256, 0),
            args: vec![
                P::Buf(6),
                P::Buf(4),
                if opts.dbias { P::Buf(5) } else { P::Null },
                // The partial products' plan has checked that split·M·N fits an int.
                P::I32(mn as i32),
                P::I32(self.m as i32),
                P::I32(s as i32),
            ],
        });
        Ok(steps)
    }
}

// ------------------------------------------------------------------------------------------
// CPU reference
// ------------------------------------------------------------------------------------------

/// CPU reference: sums and epilogue in f64, one rounding at the store (and, with
/// [`Aux::SavePre`], the one of the saved pre-activation that the activation reads).
#[allow(clippy::too_many_arguments)]
pub fn gemm_cpu(
    sh: &GemmShape,
    a: &[bf16],                    // see the module table
    b: &[bf16],                    // see the module table
    bias: Option<&[bf16]>,         // (N)
    mut aux: Aux<'_, [bf16]>,      // (batch, M, N)
    mut out: GemmOut<'_>,          // (batch, M, N) out
    mut dbias: Option<&mut [f32]>, // (batch, M) out, WeightGrad only
) -> Result<()> {
    check_lens(
        sh,
        aux.usage(),
        [
            Some(a.len()),
            Some(b.len()),
            bias.map(|s| s.len()),
            aux.buf().map(|s| s.len()),
            Some(out.len()),
            dbias.as_ref().map(|s| s.len()),
        ],
    )?;
    let (m, n, k) = (sh.m, sh.n, sh.k);
    let at = |z: usize, i: usize, kk: usize| -> f64 {
        let idx = match sh.layout {
            GemmLayout::Forward | GemmLayout::InputGrad => i * k + kk,
            GemmLayout::WeightGrad => kk * m + i,
        };
        f64::from(a[z * m * k + idx].to_f32())
    };
    let bt = |z: usize, kk: usize, j: usize| -> f64 {
        let idx = match sh.layout {
            GemmLayout::Forward => j * k + kk,
            GemmLayout::InputGrad | GemmLayout::WeightGrad => kk * n + j,
        };
        f64::from(b[z * n * k + idx].to_f32())
    };
    for z in 0..sh.batch {
        for i in 0..m {
            for j in 0..n {
                let mut v: f64 = (0..k).map(|kk| at(z, i, kk) * bt(z, kk, j)).sum();
                if let Some(bias) = bias {
                    v += f64::from(bias[j].to_f32());
                }
                let idx = (z * m + i) * n + j;
                v = match &mut aux {
                    Aux::None => sh.act.apply(v),
                    Aux::Residual(r) => sh.act.apply(v) + f64::from(r[idx].to_f32()),
                    Aux::SavePre(u) => {
                        u[idx] = bf16::from_f64(v);
                        sh.act.apply(f64::from(u[idx].to_f32()))
                    }
                    Aux::ActGrad(u) => v * sh.act.grad(f64::from(u[idx].to_f32())),
                };
                match &mut out {
                    GemmOut::Bf16(o) => o[idx] = bf16::from_f64(v),
                    GemmOut::F32(o) => o[idx] = v as f32,
                }
            }
            if let Some(db) = dbias.as_deref_mut() {
                db[z * m + i] = (0..k).map(|kk| at(z, i, kk)).sum::<f64>() as f32;
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Emulation
// ------------------------------------------------------------------------------------------

/// The kernel under the emulation; same parameters as [`gemm_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_emu(
    emu: &Emu,
    sh: &GemmShape,
    a: &[bf16],
    b: &[bf16],
    bias: Option<&[bf16]>,
    aux: Aux<'_, [bf16]>,
    out: GemmOut<'_>,
    dbias: Option<&mut [f32]>,
) -> Result<()> {
    gemm_emu_on(emu, GemmPath::MmaSync, sh, a, b, bias, aux, out, dbias)
}

/// [`gemm_emu`] on the tensor-core instruction `path`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_emu_on(
    emu: &Emu,
    path: GemmPath,
    sh: &GemmShape,
    a: &[bf16],
    b: &[bf16],
    bias: Option<&[bf16]>,
    aux: Aux<'_, [bf16]>,
    out: GemmOut<'_>,
    dbias: Option<&mut [f32]>,
) -> Result<()> {
    let usage = aux.usage();
    check_lens(
        sh,
        usage,
        [
            Some(a.len()),
            Some(b.len()),
            bias.map(|s| s.len()),
            aux.buf().map(|s| s.len()),
            Some(out.len()),
            dbias.as_ref().map(|s| s.len()),
        ],
    )?;
    let (pc, out_f32) = match out {
        GemmOut::Bf16(o) => (Arg::host_mut(o), false),
        GemmOut::F32(o) => (Arg::host_mut(o), true),
    };
    let (pa, pb) = (a.as_ptr() as u64, b.as_ptr() as u64);
    let path = sh.effective(path, pa % 16 == 0 && pb % 16 == 0);
    let (aa, ab) = match sh.map_specs_for(path) {
        Some((ma, mb)) => (Arg::Map(ma.emulated(pa)?), Arg::Map(mb.emulated(pb)?)),
        None => (Arg::Ptr(pa), Arg::Ptr(pb)),
    };
    let mut args = vec![
        aa,
        ab,
        bias.map_or(Arg::Ptr(0), Arg::host),
        match aux {
            Aux::None => Arg::Ptr(0),
            Aux::Residual(r) | Aux::ActGrad(r) => Arg::host(r),
            Aux::SavePre(u) => Arg::host_mut(u),
        },
        pc,
        dbias.map_or(Arg::Ptr(0), Arg::host_mut),
    ];
    args.extend(scalar_args(sh, usage, out_f32, path)?);
    let (_, kernel, shape) = sh.kernel(path);
    // SAFETY: every buffer was checked against the shape the kernel indexes.
    unsafe { emu.launch(kernel, shape, &args) }
}

// ------------------------------------------------------------------------------------------
// GPU launcher (bf16 buffers as raw u16 bits)
// ------------------------------------------------------------------------------------------

/// The kernel on a GPU; same parameters as [`gemm_cpu`], device buffers.
#[allow(clippy::too_many_arguments)]
pub fn gemm_cuda(
    gpu: &Gpu,
    sh: &GemmShape,
    a: &CudaSlice<u16>,
    b: &CudaSlice<u16>,
    bias: Option<&CudaSlice<u16>>,
    aux: Aux<'_, CudaSlice<u16>>,
    out: GemmOutCuda<'_>,
    dbias: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    gemm_cuda_on(gpu, GemmPath::MmaSync, sh, a, b, bias, aux, out, dbias)
}

/// [`gemm_cuda`] on the tensor-core instruction `path` (`Wgmma` needs an sm_90 device).
#[allow(clippy::too_many_arguments)]
pub fn gemm_cuda_on(
    gpu: &Gpu,
    path: GemmPath,
    sh: &GemmShape,
    a: &CudaSlice<u16>,
    b: &CudaSlice<u16>,
    bias: Option<&CudaSlice<u16>>,
    aux: Aux<'_, CudaSlice<u16>>,
    out: GemmOutCuda<'_>,
    dbias: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let out_len = match &out {
        GemmOutCuda::Bf16(o) => o.len(),
        GemmOutCuda::F32(o) => o.len(),
    };
    let usage = aux.usage();
    check_lens(
        sh,
        usage,
        [
            Some(a.len()),
            Some(b.len()),
            bias.map(|s| s.len()),
            aux.buf().map(|s| s.len()),
            Some(out_len),
            dbias.as_ref().map(|s| s.len()),
        ],
    )?;
    let st = gpu.stream();
    let (pa, _ga) = a.device_ptr(st);
    let (pb, _gb) = b.device_ptr(st);
    let (pbias, _gbias) = match bias {
        Some(s) => {
            let (p, g) = s.device_ptr(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    // Both guards record the access on the stream; the write one for the saved activation.
    let (paux, _gaux, _gaux_mut) = match aux {
        Aux::None => (0, None, None),
        Aux::Residual(s) | Aux::ActGrad(s) => {
            let (p, g) = s.device_ptr(st);
            (p, Some(g), None)
        }
        Aux::SavePre(s) => {
            let (p, g) = s.device_ptr_mut(st);
            (p, None, Some(g))
        }
    };
    let (pc, out_f32, _gc) = match out {
        GemmOutCuda::Bf16(o) => {
            let (p, g) = o.device_ptr_mut(st);
            (p, false, g)
        }
        GemmOutCuda::F32(o) => {
            let (p, g) = o.device_ptr_mut(st);
            (p, true, g)
        }
    };
    let (pdb, _gdb) = match dbias {
        Some(s) => {
            let (p, g) = s.device_ptr_mut(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    let mut args: Vec<Arg> = [pa, pb, pbias, paux, pc, pdb].map(Arg::Ptr).to_vec();
    let path = sh.effective(path, pa % 16 == 0 && pb % 16 == 0);
    if let Some((ma, mb)) = sh.map_specs_for(path) {
        args[0] = Arg::Map(ma.encode(pa)?);
        args[1] = Arg::Map(mb.encode(pb)?);
    }
    args.extend(scalar_args(sh, usage, out_f32, path)?);
    let (file, kernel, shape) = sh.kernel(path);
    // SAFETY: every buffer was checked against the shape the kernel indexes.
    unsafe { gpu.launch(file, kernel, shape, &args) }
}

/// The shape of [`check_cuda`]: two batches of M 200, N 192, K 264 (a tail in every dimension,
/// row lengths the copy engine takes), bias and QuickGELU.
const CHECK_SHAPE: GemmShape = GemmShape {
    layout: GemmLayout::Forward,
    batch: 2,
    m: 200,
    n: 192,
    k: 264,
    act: Activation::QuickGelu,
};

/// One layout on one path checked on a GPU against [`gemm_cpu`] ([`check_cuda`]).
#[derive(Clone, Copy, Debug)]
pub struct GemmCheck {
    /// The product checked.
    pub shape: GemmShape,
    /// The path asked for (at this shape `WgmmaTma` and `WgmmaWs` run their own kernels).
    pub path: GemmPath,
    /// The split of K (1: none; see [`GemmOpts::split_k`]).
    pub split_k: usize,
    /// The seed of the inputs.
    pub seed: u64,
    /// Norm-wise relative error of C, and of the saved pre-activation where the epilogue
    /// writes one: the larger (infinite for a NaN).
    pub rel_err: f64,
    /// The same for the bias gradient (`WeightGrad` only).
    pub dbias_rel_err: Option<f64>,
}

impl GemmCheck {
    /// Tolerance of C (bf16 operands and output).
    pub const TOL: f64 = 1e-2;
    /// Tolerance of the bias gradient (fp32 sums of bf16 values).
    pub const DBIAS_TOL: f64 = 1e-4;
    /// Both within their tolerances.
    pub fn passed(&self) -> bool {
        self.rel_err <= Self::TOL && self.dbias_rel_err.is_none_or(|e| e <= Self::DBIAS_TOL)
    }
}

/// The epilogue [`check_cuda`] runs in `layout`: the ones the training step uses with an
/// activation (the MLP's first layer saving its pre-activation, the input gradient through
/// the activation's derivative), and the weight gradient with its bias gradient.
pub fn check_epilogue(layout: GemmLayout) -> (bool, AuxUse) {
    match layout {
        GemmLayout::Forward => (true, AuxUse::SavePre),
        GemmLayout::InputGrad => (false, AuxUse::ActGrad),
        GemmLayout::WeightGrad => (true, AuxUse::None),
    }
}

/// Runs `layout` on `path` once on `gpu` at `CHECK_SHAPE` with the epilogue of
/// [`check_epilogue`] against [`gemm_cpu`], on fresh random inputs with the outputs poisoned.
/// A path whose products a device gets wrong shows here before anything uses it, and one
/// whose kernels never finish is an error after [`crate::device::CHECK_HANG_LIMIT`].
pub fn check_cuda(gpu: &Gpu, path: GemmPath, layout: GemmLayout) -> Result<GemmCheck> {
    use crate::testing::{bf16_to_f64, f32_to_f64, fresh_seed, random_bf16, rel_err, rng};
    let st = gpu.stream();
    let driver = |e: cudarc::driver::DriverError| anyhow::anyhow!("gemm check: {e:?}");
    let sh = GemmShape {
        layout,
        ..CHECK_SHAPE
    };
    let (with_bias, aux_use) = check_epilogue(layout);
    let seed = fresh_seed();
    let mut g = rng(seed);
    let (la, lb, lc) = sh.lens();
    let (a, b, bias, u) = (
        random_bf16(&mut g, la, -1.0, 1.0),
        random_bf16(&mut g, lb, -1.0, 1.0),
        random_bf16(&mut g, sh.n, -1.0, 1.0),
        random_bf16(&mut g, lc, -3.0, 3.0),
    );
    let wg = layout == GemmLayout::WeightGrad;
    let mut want = vec![bf16::ZERO; lc];
    let mut want_pre = vec![bf16::ZERO; lc];
    let mut wdb = vec![0.0f32; sh.batch * sh.m];
    let cpu_aux = match aux_use {
        AuxUse::SavePre => Aux::SavePre(want_pre.as_mut_slice()),
        AuxUse::ActGrad => Aux::ActGrad(u.as_slice()),
        _ => Aux::None,
    };
    gemm_cpu(
        &sh,
        &a,
        &b,
        with_bias.then_some(bias.as_slice()),
        cpu_aux,
        GemmOut::Bf16(&mut want),
        wg.then_some(wdb.as_mut_slice()),
    )?;
    let da = st.clone_htod(bf16_bits(&a)).map_err(driver)?;
    let db = st.clone_htod(bf16_bits(&b)).map_err(driver)?;
    let dbias = st.clone_htod(bf16_bits(&bias)).map_err(driver)?;
    // ActGrad reads the pre-activation; SavePre overwrites the poison.
    let mut daux = match aux_use {
        AuxUse::ActGrad => st.clone_htod(bf16_bits(&u)),
        _ => st.clone_htod(&vec![0x7fc0u16; lc]),
    }
    .map_err(driver)?;
    let mut dc = st.clone_htod(&vec![0x7fc0u16; lc]).map_err(driver)?;
    let mut ddb = st.clone_htod(&vec![f32::NAN; wdb.len()]).map_err(driver)?;
    let gpu_aux = match aux_use {
        AuxUse::SavePre => Aux::SavePre(&mut daux),
        AuxUse::ActGrad => Aux::ActGrad(&daux),
        _ => Aux::None,
    };
    gemm_cuda_on(
        gpu,
        path,
        &sh,
        &da,
        &db,
        with_bias.then_some(&dbias),
        gpu_aux,
        GemmOutCuda::Bf16(&mut dc),
        wg.then_some(&mut ddb),
    )?;
    gpu.finish_within(
        &format!("gemm check ({}, {layout:?})", path.name()),
        crate::device::CHECK_HANG_LIMIT,
    )?;
    let down = |d: &CudaSlice<u16>| -> Result<Vec<f64>> {
        let v: Vec<bf16> = st
            .dtoh_synced(d)
            .map_err(driver)?
            .into_iter()
            .map(bf16::from_bits)
            .collect();
        Ok(bf16_to_f64(&v))
    };
    let mut err = rel_err(&down(&dc)?, &bf16_to_f64(&want));
    if aux_use == AuxUse::SavePre {
        err = err.max(rel_err(&down(&daux)?, &bf16_to_f64(&want_pre)));
    }
    let dbias_rel_err = if wg {
        let gdb = st.dtoh_synced(&ddb).map_err(driver)?;
        Some(rel_err(&f32_to_f64(&gdb), &f32_to_f64(&wdb)))
    } else {
        None
    };
    Ok(GemmCheck {
        shape: sh,
        path,
        split_k: 1,
        seed,
        rel_err: err,
        dbias_rel_err,
    })
}

/// The weight gradient with its bias gradient split two ways along K on `path`, through its
/// plan (partial products, then the reduction), on `gpu` against [`gemm_cpu`]: fresh random
/// inputs, outputs and workspace poisoned. M 200, N 192, K 528.
pub fn check_split_cuda(gpu: &Gpu, path: GemmPath) -> Result<GemmCheck> {
    use crate::exec::{run, Backend};
    use crate::testing::{f32_to_f64, fresh_seed, random_bf16, rel_err, rng};
    let st = gpu.stream();
    let driver = |e: cudarc::driver::DriverError| anyhow::anyhow!("gemm split check: {e:?}");
    let sh = GemmShape {
        layout: GemmLayout::WeightGrad,
        batch: 1,
        m: CHECK_SHAPE.m,
        n: CHECK_SHAPE.n,
        k: 2 * CHECK_SHAPE.k,
        act: Activation::None,
    };
    let opts = GemmOpts {
        out_f32: true,
        dbias: true,
        path,
        split_k: 2,
        ..GemmOpts::default()
    };
    let seed = fresh_seed();
    let mut g = rng(seed);
    let (la, lb, lc) = sh.lens();
    let (a, b) = (
        random_bf16(&mut g, la, -1.0, 1.0),
        random_bf16(&mut g, lb, -1.0, 1.0),
    );
    let mut want = vec![0.0f32; lc];
    let mut wdb = vec![0.0f32; sh.m];
    gemm_cpu(
        &sh,
        &a,
        &b,
        None,
        Aux::None,
        GemmOut::F32(&mut want),
        Some(&mut wdb),
    )?;
    let da = st.clone_htod(bf16_bits(&a)).map_err(driver)?;
    let db = st.clone_htod(bf16_bits(&b)).map_err(driver)?;
    let mut dc = st.clone_htod(&vec![f32::NAN; lc]).map_err(driver)?;
    let mut ddb = st.clone_htod(&vec![f32::NAN; sh.m]).map_err(driver)?;
    let mut ws = st
        .clone_htod(&vec![f32::NAN; sh.split_workspace_len(2)])
        .map_err(driver)?;
    let plan = sh.plan(opts)?;
    {
        let (pa, _ga) = da.device_ptr(st);
        let (pb, _gb) = db.device_ptr(st);
        let (pc, _gc) = dc.device_ptr_mut(st);
        let (pdb, _gdb) = ddb.device_ptr_mut(st);
        let (pws, _gws) = ws.device_ptr_mut(st);
        // SAFETY: every buffer has the length the plan's shape needs (slots 2 and 3 unused).
        unsafe { run(Backend::Gpu(gpu), &plan, &[pa, pb, 0, 0, pc, pdb, pws])? };
    }
    gpu.finish_within(
        &format!("gemm split check ({})", path.name()),
        crate::device::CHECK_HANG_LIMIT,
    )?;
    let got = st.dtoh_synced(&dc).map_err(driver)?;
    let gdb = st.dtoh_synced(&ddb).map_err(driver)?;
    Ok(GemmCheck {
        shape: sh,
        path,
        split_k: 2,
        seed,
        rel_err: rel_err(&f32_to_f64(&got), &f32_to_f64(&want)),
        dbias_rel_err: Some(rel_err(&f32_to_f64(&gdb), &f32_to_f64(&wdb))),
    })
}

/// [`check_cuda`] for the three layouts on `path`, then [`check_split_cuda`].
pub fn check_path_cuda(gpu: &Gpu, path: GemmPath) -> Result<Vec<GemmCheck>> {
    let mut checks = [
        GemmLayout::Forward,
        GemmLayout::InputGrad,
        GemmLayout::WeightGrad,
    ]
    .into_iter()
    .map(|l| check_cuda(gpu, path, l))
    .collect::<Result<Vec<_>>>()?;
    checks.push(check_split_cuda(gpu, path)?);
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emu::Schedule;
    use crate::testing::{
        bf16_to_f64, f32_to_f64, fresh_seed, random_bf16, rel_err, rng, BF16_POISON,
    };

    const LAYOUTS: [GemmLayout; 3] = [
        GemmLayout::Forward,
        GemmLayout::InputGrad,
        GemmLayout::WeightGrad,
    ];

    /// Inputs of one case; `bias`/`residual` present when the case asks for them.
    struct Case {
        sh: GemmShape,
        a: Vec<bf16>,
        b: Vec<bf16>,
        bias: Option<Vec<bf16>>,
        res: Option<Vec<bf16>>,
        out_f32: bool,
        dbias: bool,
        path: GemmPath,
    }

    fn case(sh: GemmShape, bias: bool, res: bool, out_f32: bool, seed: u64) -> Case {
        let mut g = rng(seed);
        let (la, lb, lc) = sh.lens();
        Case {
            sh,
            a: random_bf16(&mut g, la, -1.0, 1.0),
            b: random_bf16(&mut g, lb, -1.0, 1.0),
            bias: bias.then(|| random_bf16(&mut g, sh.n, -1.0, 1.0)),
            res: res.then(|| random_bf16(&mut g, lc, -1.0, 1.0)),
            out_f32,
            dbias: sh.layout == GemmLayout::WeightGrad,
            path: GemmPath::MmaSync,
        }
    }

    /// Outputs of one run, poisoned before it: C as f64 and the bias gradient.
    fn run(c: &Case, emu: Option<&Emu>) -> (Vec<f64>, Vec<f64>) {
        let (_, _, lc) = c.sh.lens();
        let mut ob = vec![BF16_POISON; lc];
        let mut of = vec![f32::NAN; lc];
        let mut db = vec![f32::NAN; c.sh.batch * c.sh.m];
        let out = if c.out_f32 {
            GemmOut::F32(&mut of)
        } else {
            GemmOut::Bf16(&mut ob)
        };
        let dbias = c.dbias.then_some(db.as_mut_slice());
        let bias = c.bias.as_deref();
        let res = c.res.as_deref().map_or(Aux::None, Aux::Residual);
        match emu {
            Some(e) => gemm_emu_on(e, c.path, &c.sh, &c.a, &c.b, bias, res, out, dbias).unwrap(),
            None => gemm_cpu(&c.sh, &c.a, &c.b, bias, res, out, dbias).unwrap(),
        }
        let outv = if c.out_f32 {
            f32_to_f64(&of)
        } else {
            bf16_to_f64(&ob)
        };
        (outv, if c.dbias { f32_to_f64(&db) } else { Vec::new() })
    }

    /// Errors of the emulated kernel against the reference: (C, dbias).
    fn errors(c: &Case, emu: &Emu) -> (f64, f64) {
        let (want, wdb) = run(c, None);
        let (got, gdb) = run(c, Some(emu));
        (rel_err(&got, &want), rel_err(&gdb, &wdb))
    }

    fn assert_close(c: &Case, emu: &Emu, seed: u64) {
        let (e, edb) = errors(c, emu);
        let tol = if c.out_f32 { 1e-4 } else { 1e-2 };
        assert!(
            e <= tol && edb <= 1e-4,
            "{:?} bias={} res={} f32={} seed {seed}: C err {e}, dbias err {edb}",
            c.sh,
            c.bias.is_some(),
            c.res.is_some(),
            c.out_f32
        );
    }

    /// The values of `v` one element into a larger allocation: `&shifted(v)[1..]` starts
    /// 2 bytes past the allocation's (16-byte aligned) start, so no 16-byte access fits it.
    fn shifted(v: &[bf16]) -> Vec<bf16> {
        let mut o = vec![bf16::ZERO; v.len() + 1];
        o[1..].copy_from_slice(v);
        o
    }

    /// The error the emulation reports for case `c` (no bias, no aux, bf16 out) under the
    /// kernel variant `variant` on `path`; panics when the run succeeds.
    fn variant_error(variant: &'static str, path: GemmPath, c: &Case) -> String {
        let mut out = vec![BF16_POISON; c.sh.lens().2];
        let e = gemm_emu_on(
            &Emu::variant(variant),
            path,
            &c.sh,
            &c.a,
            &c.b,
            None,
            Aux::None,
            GemmOut::Bf16(&mut out),
            None,
        )
        .expect_err(variant);
        format!("{e:#}")
    }

    /// Every layout at aligned, tail and one-row sizes, with each epilogue piece.
    #[test]
    fn all_layouts_match_reference() {
        // (M, N, K, act, bias, residual, f32 out)
        let cases = [
            (1, 64, 64, Activation::None, false, false, false),
            (17, 128, 72, Activation::Gelu, true, false, true),
            (130, 64, 128, Activation::QuickGelu, true, true, false),
            (33, 99, 40, Activation::None, false, true, true),
            (5, 72, 100, Activation::Gelu, true, true, false),
        ];
        for layout in LAYOUTS {
            for &(m, n, k, act, bias, res, f32o) in &cases {
                let sh = GemmShape {
                    layout,
                    batch: 1,
                    m,
                    n,
                    k,
                    act,
                };
                let seed = fresh_seed();
                assert_close(&case(sh, bias, res, f32o, seed), &Emu::default(), seed);
            }
        }
    }

    #[test]
    fn batched_products_match_reference() {
        for layout in LAYOUTS {
            let sh = GemmShape {
                layout,
                batch: 3,
                m: 19,
                n: 64,
                k: 96,
                act: Activation::None,
            };
            let seed = fresh_seed();
            assert_close(&case(sh, true, true, false, seed), &Emu::default(), seed);
        }
    }

    #[test]
    fn result_does_not_depend_on_thread_order() {
        let sh = GemmShape {
            layout: GemmLayout::WeightGrad,
            batch: 1,
            m: 40,
            n: 64,
            k: 100,
            act: Activation::None,
        };
        let seed = fresh_seed();
        assert_order_free(&case(sh, false, false, true, seed), seed);
    }

    /// The same results bit for bit under the reverse, a shuffled and the greedy thread order,
    /// and with the cp.async copies landing when issued (the pipeline refills no stage that a
    /// warp running ahead could still read).
    fn assert_order_free(c: &Case, seed: u64) {
        let first = run(c, Some(&Emu::default()));
        for sched in [
            Schedule::Reverse,
            Schedule::Shuffled(seed),
            Schedule::Greedy,
        ] {
            let got = run(c, Some(&Emu::default().with_schedule(sched)));
            assert_eq!(got, first, "{sched:?} seed {seed}");
            let eager = Emu::default().with_schedule(sched).with_eager_copies();
            assert_eq!(
                run(c, Some(&eager)),
                first,
                "{sched:?}, eager copies, seed {seed}"
            );
        }
    }

    /// Operands that start 2 bytes past a 16-byte boundary cannot go by cp.async: the kernel
    /// must notice and copy element by element (the emulation rejects a misaligned cp.async).
    #[test]
    fn misaligned_operands_take_the_element_path() {
        for layout in LAYOUTS {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 20,
                n: 64,
                k: 64,
                act: Activation::None,
            };
            let seed = fresh_seed();
            let c = case(sh, false, false, false, seed);
            // Same values, shifted by one element inside a larger allocation.
            let (pa, pb) = (shifted(&c.a), shifted(&c.b));
            let (_, _, lc) = sh.lens();
            let mut got = vec![BF16_POISON; lc];
            let mut db = vec![f32::NAN; sh.m];
            let dbias = c.dbias.then_some(db.as_mut_slice());
            gemm_emu(
                &Emu::default(),
                &sh,
                &pa[1..],
                &pb[1..],
                None,
                Aux::None,
                GemmOut::Bf16(&mut got),
                dbias,
            )
            .unwrap();
            let (want, wdb) = run(&c, None);
            let e = rel_err(&bf16_to_f64(&got), &want);
            let edb = if c.dbias {
                rel_err(&f32_to_f64(&db), &wdb)
            } else {
                0.0
            };
            assert!(
                e <= 1e-2 && edb <= 1e-4,
                "{layout:?} seed {seed}: C {e}, dbias {edb}"
            );
        }
    }

    /// Runs case `c` through its plan on host buffers (bias and residual slots filled when
    /// the case has them) and returns C and the bias gradient as [`run`] does.
    fn run_planned(c: &Case, opts: GemmOpts) -> (Vec<f64>, Vec<f64>) {
        use crate::exec::{run as run_plan, Backend, HostBuf};
        let (_, _, lc) = c.sh.lens();
        let one = || vec![bf16::ZERO; 1];
        let mut bufs = [
            HostBuf::Bf16(c.a.clone()),
            HostBuf::Bf16(c.b.clone()),
            HostBuf::Bf16(c.bias.clone().unwrap_or_else(one)),
            HostBuf::Bf16(c.res.clone().unwrap_or_else(one)),
            if c.out_f32 {
                HostBuf::F32(vec![f32::NAN; lc])
            } else {
                HostBuf::Bf16(vec![BF16_POISON; lc])
            },
            HostBuf::F32(vec![f32::NAN; c.sh.batch * c.sh.m]),
            // The split-K workspace, poisoned too: the reduction reads only what the
            // partial products wrote.
            HostBuf::F32(vec![
                f32::NAN;
                c.sh.split_workspace_len(opts.split_k).max(1)
            ]),
        ];
        let ptrs: Vec<u64> = bufs.iter_mut().map(|b| b.host_ptr()).collect();
        let plan = c.sh.plan(opts).unwrap();
        // SAFETY: the buffers have the lengths the shape needs.
        unsafe { run_plan(Backend::Emu(&Emu::default()), &plan, &ptrs) }.unwrap();
        let f64s = |b: &HostBuf| match b {
            HostBuf::Bf16(v) => bf16_to_f64(v),
            HostBuf::F32(v) => f32_to_f64(v),
            other => panic!("output buffer changed type: {other:?}"),
        };
        let db = if c.dbias { f64s(&bufs[5]) } else { Vec::new() };
        (f64s(&bufs[4]), db)
    }

    /// On every path the plan runs the same launch as the emulation launcher, whose kernel
    /// it names: bit-identical results, the bias gradient included.
    #[test]
    fn plan_matches_launcher() {
        for path in [
            GemmPath::MmaSync,
            GemmPath::Wgmma,
            GemmPath::WgmmaTma,
            GemmPath::WgmmaWs,
        ] {
            for layout in LAYOUTS {
                let sh = GemmShape {
                    layout,
                    batch: 1,
                    m: 24,
                    n: 72,
                    k: 64,
                    act: Activation::QuickGelu,
                };
                let seed = fresh_seed();
                let mut c = case(sh, true, true, false, seed);
                c.path = path;
                let opts = GemmOpts {
                    bias: true,
                    aux: AuxUse::Residual,
                    dbias: c.dbias,
                    path,
                    ..GemmOpts::default()
                };
                let kernel = sh.plan(opts).unwrap()[0].kernel;
                let want_kernel = match path {
                    GemmPath::MmaSync => layout.entry(),
                    GemmPath::Wgmma => layout.wgmma_entry(),
                    GemmPath::WgmmaTma => layout.tma_entry(),
                    GemmPath::WgmmaWs => layout.ws_entry(),
                };
                assert_eq!(kernel, want_kernel);
                let got = run_planned(&c, opts);
                assert_eq!(
                    got,
                    run(&c, Some(&Emu::default())),
                    "{path:?} {layout:?} seed {seed}"
                );
            }
        }
        let fwd = GemmShape {
            layout: GemmLayout::Forward,
            batch: 1,
            m: 4,
            n: 8,
            k: 8,
            act: Activation::None,
        };
        let bad = GemmOpts {
            dbias: true,
            ..GemmOpts::default()
        };
        assert!(fwd.plan(bad).is_err());
    }

    /// A weight gradient split along K on every path: the partial products and their
    /// reduction give the reference's C and bias gradient, with the workspace poisoned; M
    /// aligned (the TMA path copies by tensor maps) and not (the element path).
    #[test]
    fn split_k_matches_reference() {
        for path in [
            GemmPath::MmaSync,
            GemmPath::Wgmma,
            GemmPath::WgmmaTma,
            GemmPath::WgmmaWs,
        ] {
            for (m, n, k, split) in [(136, 72, 1024, 4), (37, 130, 512, 2)] {
                let sh = GemmShape {
                    layout: GemmLayout::WeightGrad,
                    batch: 1,
                    m,
                    n,
                    k,
                    act: Activation::None,
                };
                let seed = fresh_seed();
                let mut c = case(sh, false, false, true, seed);
                c.path = path;
                let opts = GemmOpts {
                    out_f32: true,
                    dbias: true,
                    path,
                    split_k: split,
                    ..GemmOpts::default()
                };
                let plan = sh.plan(opts).unwrap();
                assert_eq!(plan.len(), 2);
                assert_eq!(plan[1].kernel, "gemm_splitk_reduce");
                let (got, gdb) = run_planned(&c, opts);
                let (want, wdb) = run(&c, None);
                let (e, edb) = (rel_err(&got, &want), rel_err(&gdb, &wdb));
                assert!(
                    e <= 1e-4 && edb <= 1e-4,
                    "{path:?} {sh:?} split {split} seed {seed}: C err {e}, dbias err {edb}"
                );
            }
        }
    }

    /// What a split refuses, and what the model picks for the paper's student.
    #[test]
    fn split_k_rules_and_choice() {
        let wg = GemmShape {
            layout: GemmLayout::WeightGrad,
            batch: 1,
            m: 768,
            n: 768,
            k: 50432,
            act: Activation::None,
        };
        let ok = GemmOpts {
            out_f32: true,
            dbias: true,
            split_k: 4,
            ..GemmOpts::default()
        };
        assert!(wg.plan(ok).is_ok());
        for (sh, opts) in [
            (
                GemmShape {
                    layout: GemmLayout::InputGrad,
                    ..wg
                },
                GemmOpts { dbias: false, ..ok },
            ),
            (GemmShape { batch: 2, ..wg }, ok),
            (GemmShape { k: 50430, ..wg }, ok),
            (wg, GemmOpts { bias: true, ..ok }),
            (
                wg,
                GemmOpts {
                    out_f32: false,
                    ..ok
                },
            ),
            (
                GemmShape {
                    act: Activation::Gelu,
                    ..wg
                },
                ok,
            ),
        ] {
            assert!(sh.plan(opts).is_err(), "{sh:?} {opts:?}");
        }
        // ViT-B/16 at batch 256 on wgmma: the output projection (36 tiles of 128 × 128 on
        // 132 multiprocessors) and the MLP's weights (144 tiles, two waves) split; the QKV
        // projection (108 tiles, one wave) gains too little.
        let pick = |m, n, path| choose_split_k(&GemmShape { m, n, ..wg }, path, TUNED_SMS);
        assert_eq!(pick(768, 768, GemmPath::Wgmma), 16);
        assert_eq!(pick(3072, 768, GemmPath::Wgmma), 8);
        assert_eq!(pick(768, 3072, GemmPath::WgmmaTma), 8);
        assert_eq!(pick(2304, 768, GemmPath::Wgmma), 1);
        // Forward products, short K and a GPU the tiles fill are never split.
        let fwd = GemmShape {
            layout: GemmLayout::Forward,
            ..wg
        };
        assert_eq!(choose_split_k(&fwd, GemmPath::Wgmma, TUNED_SMS), 1);
        let short = GemmShape { k: 384, ..wg };
        assert_eq!(choose_split_k(&short, GemmPath::Wgmma, TUNED_SMS), 1);
        assert_eq!(choose_split_k(&wg, GemmPath::Wgmma, 4), 1);
    }

    /// The wgmma kernels, every layout (the weight gradient with its bias gradient), at
    /// aligned, tail, one-row and multi-tile sizes, with each epilogue piece, batched, and
    /// under two other thread orders (bit-identical).
    #[test]
    fn wgmma_layouts_match_reference() {
        // (batch, M, N, K, act, bias, residual, f32 out)
        let cases = [
            (1, 1, 128, 64, Activation::None, false, false, false),
            (1, 17, 99, 72, Activation::Gelu, true, false, true),
            (1, 130, 200, 200, Activation::QuickGelu, true, true, false),
            (2, 33, 64, 40, Activation::None, false, true, true),
            (1, 64, 256, 192, Activation::Gelu, true, true, false),
        ];
        check_layouts(GemmPath::Wgmma, &cases, |_| {});
    }

    /// (batch, M, N, K, act, bias, residual, f32 out)
    type LayoutCase = (usize, usize, usize, usize, Activation, bool, bool, bool);

    /// Every layout of every case on `path` against the reference; the second case also
    /// under three other thread orders, with copies landing late and early
    /// (`assert_order_free`); `extra` runs more checks on each case.
    fn check_layouts(path: GemmPath, cases: &[LayoutCase], extra: impl Fn(&Case)) {
        for layout in LAYOUTS {
            for (i, &(batch, m, n, k, act, bias, res, f32o)) in cases.iter().enumerate() {
                let sh = GemmShape {
                    layout,
                    batch,
                    m,
                    n,
                    k,
                    act,
                };
                let seed = fresh_seed();
                let mut c = case(sh, bias, res, f32o, seed);
                c.path = path;
                assert_close(&c, &Emu::default(), seed);
                if i == 1 {
                    assert_order_free(&c, seed);
                }
                extra(&c);
            }
        }
    }

    /// A weight gradient whose rows of C span two tiles and whose k runs over several tiles,
    /// the bias gradient among them: the first column of tiles sums it, the others must not
    /// touch it (poisoned before the run).
    #[test]
    fn wgmma_weight_gradient_reduces_the_bias_over_many_tiles() {
        let sh = GemmShape {
            layout: GemmLayout::WeightGrad,
            batch: 1,
            m: 200,
            n: 136,
            k: 300,
            act: Activation::None,
        };
        let seed = fresh_seed();
        let mut c = case(sh, false, false, true, seed);
        c.path = GemmPath::Wgmma;
        assert_close(&c, &Emu::default(), seed);
    }

    /// Refilling a stage while a wgmma that reads it may still run is a race the emulation
    /// reports: with no wait in the k loop, and with one tile of prefetch too many (the
    /// pipeline's depth is exactly what four stages allow), with K-major and with MN-major
    /// operands. K spans eight tiles.
    #[test]
    fn wgmma_pipeline_races_are_reported() {
        for layout in [GemmLayout::Forward, GemmLayout::WeightGrad] {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 16,
                n: 64,
                k: 512,
                act: Activation::None,
            };
            let seed = fresh_seed();
            let c = case(sh, false, false, false, seed);
            for variant in ["broken_wait", "ahead3"] {
                let e = variant_error(variant, GemmPath::Wgmma, &c);
                assert!(e.contains("unfinished wgmma"), "{layout:?} {variant}: {e}");
            }
            // Misaligned operands go into shared memory by plain stores (the element path),
            // which the emulation checks against unfinished products too.
            let (pa, pb) = (shifted(&c.a), shifted(&c.b));
            let mut out = vec![BF16_POISON; sh.lens().2];
            let e = gemm_emu_on(
                &Emu::variant("ahead3"),
                GemmPath::Wgmma,
                &sh,
                &pa[1..],
                &pb[1..],
                None,
                Aux::None,
                GemmOut::Bf16(&mut out),
                None,
            )
            .expect_err("ahead3 on the element path");
            let e = format!("{e:#}");
            assert!(
                e.contains("store into shared memory that an unfinished wgmma"),
                "{layout:?}: {e}"
            );
        }
    }

    /// Two fences the hardware needs and the emulation checks, on every layout: without
    /// fence.proxy.async the tensor cores may read shared memory before the copies into it
    /// are visible to them; without wgmma.fence a product may start on accumulators other
    /// code still touches.
    #[test]
    fn wgmma_missing_fences_are_reported() {
        for layout in LAYOUTS {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 16,
                n: 64,
                k: 128,
                act: Activation::None,
            };
            let c = case(sh, false, false, false, fresh_seed());
            let e = variant_error("no_proxy_fence", GemmPath::Wgmma, &c);
            assert!(e.contains("fence.proxy.async"), "{layout:?}: {e}");
            let e = variant_error("no_wgmma_fence", GemmPath::Wgmma, &c);
            assert!(e.contains("without a wgmma.fence"), "{layout:?}: {e}");
        }
    }

    /// Operands off a 16-byte boundary take the wgmma kernels' element path, every layout.
    #[test]
    fn wgmma_handles_misaligned_operands() {
        let sh = GemmShape {
            layout: GemmLayout::Forward,
            batch: 1,
            m: 21,
            n: 72,
            k: 64,
            act: Activation::QuickGelu,
        };
        let seed = fresh_seed();
        let want_len = sh.m * sh.n;
        // Same values one element past a 16-byte boundary, every layout.
        for layout in LAYOUTS {
            let mut c = case(GemmShape { layout, ..sh }, true, true, false, seed);
            c.path = GemmPath::Wgmma;
            let (pa, pb) = (shifted(&c.a), shifted(&c.b));
            let mut got = vec![BF16_POISON; want_len];
            let mut db = vec![f32::NAN; sh.m];
            gemm_emu_on(
                &Emu::default(),
                GemmPath::Wgmma,
                &c.sh,
                &pa[1..],
                &pb[1..],
                c.bias.as_deref(),
                c.res.as_deref().map_or(Aux::None, Aux::Residual),
                GemmOut::Bf16(&mut got),
                c.dbias.then_some(db.as_mut_slice()),
            )
            .unwrap();
            let (want, wdb) = run(&c, None);
            let e = rel_err(&bf16_to_f64(&got), &want);
            assert!(
                e <= 1e-2,
                "{layout:?} seed {seed}: misaligned wgmma rel err {e}"
            );
            if c.dbias {
                let e = rel_err(&f32_to_f64(&db), &wdb);
                assert!(e <= 1e-4, "seed {seed}: misaligned wgmma dbias rel err {e}");
            }
        }
    }

    /// The TMA kernels, every layout, at sizes whose row lengths the copy engine takes (M, N
    /// and K multiples of 8, with tails in every dimension), batched, and under two other
    /// thread orders; the results are those of the cp.async wgmma kernels bit for bit.
    #[test]
    fn tma_layouts_match_reference() {
        let cases = [
            (1, 8, 128, 64, Activation::None, false, false, false),
            (1, 24, 104, 72, Activation::Gelu, true, false, true),
            (1, 136, 200, 200, Activation::QuickGelu, true, true, false),
            (2, 40, 64, 40, Activation::None, false, true, true),
            (1, 64, 256, 192, Activation::Gelu, true, true, false),
        ];
        check_layouts(GemmPath::WgmmaTma, &cases, |c| {
            let sh = c.sh;
            assert!(sh.map_specs().is_some(), "{sh:?}");
            let opts = GemmOpts {
                path: GemmPath::WgmmaTma,
                ..GemmOpts::default()
            };
            assert_eq!(sh.plan(opts).unwrap()[0].kernel, sh.layout.tma_entry());
            // The launcher takes the copy engine only for 16-byte aligned operands.
            assert!(
                (c.a.as_ptr() as usize).is_multiple_of(16)
                    && (c.b.as_ptr() as usize).is_multiple_of(16)
            );
            let tma = run(c, Some(&Emu::default()));
            let cp = Case {
                path: GemmPath::Wgmma,
                a: c.a.clone(),
                b: c.b.clone(),
                bias: c.bias.clone(),
                res: c.res.clone(),
                ..*c
            };
            assert_eq!(tma, run(&cp, Some(&Emu::default())), "{sh:?}");
        });
    }

    /// Operands the copy engine cannot take (a row length that is not a multiple of 8, an
    /// address off a 16-byte boundary) run on the cp.async wgmma kernel, with its results, on
    /// both paths that copy by tensor maps.
    #[test]
    fn tma_falls_back_where_the_copy_engine_cannot_copy() {
        for path in [GemmPath::WgmmaTma, GemmPath::WgmmaWs] {
            let sh = GemmShape {
                layout: GemmLayout::InputGrad,
                batch: 1,
                m: 17,
                n: 72,
                k: 99,
                act: Activation::None,
            };
            assert!(sh.map_specs_for(path).is_none());
            let opts = GemmOpts {
                path,
                ..GemmOpts::default()
            };
            assert_eq!(sh.plan(opts).unwrap()[0].kernel, "gemm_dgrad_wgmma");
            let seed = fresh_seed();
            let mut c = case(sh, false, false, false, seed);
            c.path = path;
            assert_close(&c, &Emu::default(), seed);
            // Aligned row lengths, but A one element past a 16-byte boundary.
            let sh = GemmShape { k: 64, ..sh };
            let mut c = case(sh, false, false, false, seed);
            let pa = shifted(&c.a);
            let mut got = vec![BF16_POISON; sh.m * sh.n];
            gemm_emu_on(
                &Emu::default(),
                path,
                &sh,
                &pa[1..],
                &c.b,
                None,
                Aux::None,
                GemmOut::Bf16(&mut got),
                None,
            )
            .unwrap();
            c.path = GemmPath::Wgmma;
            assert_eq!(
                bf16_to_f64(&got),
                run(&c, Some(&Emu::default())).0,
                "{path:?} seed {seed}"
            );
        }
    }

    /// The emulation reports the classic TMA mistakes: reading a tile without waiting on its
    /// mbarrier (the copies never land: the block ends with them in flight), arming the
    /// mbarrier with fewer bytes than the copies bring (on a GPU, a wait that never returns),
    /// and copies completing on barriers whose initialisation was never fenced for them.
    #[test]
    fn tma_pipeline_mistakes_are_reported() {
        for (variant, layout, what) in [
            ("no_wait", GemmLayout::Forward, "no thread waited for"),
            ("short_tx", GemmLayout::WeightGrad, "fewer than expect_tx"),
            (
                "no_init_fence",
                GemmLayout::InputGrad,
                "fence.mbarrier_init",
            ),
        ] {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 16,
                n: 64,
                k: 256,
                act: Activation::None,
            };
            let seed = fresh_seed();
            let c = case(sh, false, false, false, seed);
            let e = variant_error(variant, GemmPath::WgmmaTma, &c);
            assert!(e.contains(what), "{variant}: {e}");
        }
    }

    /// A plan on the TMA path passes tensor maps (built at each run) in place of A and B,
    /// with the launcher's results bit for bit (the weight gradient in fp32 with its bias).
    #[test]
    fn tma_plan_passes_tensor_maps() {
        let sh = GemmShape {
            layout: GemmLayout::WeightGrad,
            batch: 1,
            m: 72,
            n: 136,
            k: 80,
            act: Activation::None,
        };
        let seed = fresh_seed();
        let mut c = case(sh, false, false, true, seed);
        c.path = GemmPath::WgmmaTma;
        let opts = GemmOpts {
            out_f32: true,
            dbias: true,
            path: GemmPath::WgmmaTma,
            ..GemmOpts::default()
        };
        let plan = sh.plan(opts).unwrap();
        assert!(
            matches!(
                (plan[0].args[0], plan[0].args[1]),
                (P::Map(0, _), P::Map(1, _))
            ),
            "{:?}",
            &plan[0].args[..2]
        );
        let got = run_planned(&c, opts);
        assert_eq!(got, run(&c, Some(&Emu::default())), "seed {seed}");
    }

    /// On a GPU, every path it has passes the check the training step runs before using it
    /// (skipped without one).
    #[test]
    fn gpu_paths_pass_their_check_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto) {
            Ok(crate::device::Device::Cuda(g)) => g,
            _ => {
                eprintln!("no GPU: the GEMM path check is skipped");
                return;
            }
        };
        let mut paths = vec![GemmPath::MmaSync];
        if gpu.capability == (9, 0) {
            paths.extend([GemmPath::Wgmma, GemmPath::WgmmaTma]);
        }
        for path in paths {
            for c in check_path_cuda(&gpu, path).unwrap() {
                assert!(c.passed(), "{c:?}");
            }
        }
    }

    /// The check's shape is one the copy engine takes in every layout, so on the TMA path it
    /// checks the TMA kernels and not their fallback.
    #[test]
    fn the_gpu_check_shape_exercises_tma() {
        for layout in LAYOUTS {
            let sh = GemmShape {
                layout,
                ..CHECK_SHAPE
            };
            let opts = GemmOpts {
                bias: true,
                dbias: layout == GemmLayout::WeightGrad,
                path: GemmPath::WgmmaTma,
                ..GemmOpts::default()
            };
            assert_eq!(sh.plan(opts).unwrap()[0].kernel, layout.tma_entry());
            let ws = GemmOpts {
                path: GemmPath::WgmmaWs,
                ..opts
            };
            assert_eq!(sh.plan(ws).unwrap()[0].kernel, layout.ws_entry());
        }
    }

    /// Runs `f` with the persistent kernels' grid capped at `cap` blocks.
    fn with_ws_grid<T>(cap: u32, f: impl FnOnce() -> T) -> T {
        WS_GRID_CAP.with(|c| c.set(Some(cap)));
        let r = f();
        WS_GRID_CAP.with(|c| c.set(None));
        r
    }

    /// The persistent warp-specialised kernels, every layout, at aligned, tail, multi-tile and
    /// batched sizes with each epilogue piece, against the reference and bit for bit against
    /// the cp.async wgmma kernel (the same sums in the same order). The grid is capped at two
    /// blocks, so each block runs several tiles and its stage ring wraps across them.
    #[test]
    fn ws_layouts_match_reference() {
        let cases = [
            (1, 8, 128, 64, Activation::None, false, false, false),
            (1, 24, 104, 72, Activation::Gelu, true, false, true),
            (1, 136, 520, 200, Activation::QuickGelu, true, true, false),
            (2, 264, 64, 328, Activation::None, false, true, true),
            (3, 64, 256, 192, Activation::Gelu, true, true, false),
        ];
        with_ws_grid(2, || {
            check_layouts(GemmPath::WgmmaWs, &cases, |c| {
                let sh = c.sh;
                let opts = GemmOpts {
                    path: GemmPath::WgmmaWs,
                    ..GemmOpts::default()
                };
                assert_eq!(sh.plan(opts).unwrap()[0].kernel, sh.layout.ws_entry());
                // The launcher takes the persistent kernel only for 16-byte aligned operands.
                assert!(
                    (c.a.as_ptr() as usize).is_multiple_of(16)
                        && (c.b.as_ptr() as usize).is_multiple_of(16)
                );
                assert_eq!(sh.effective(GemmPath::WgmmaWs, true), GemmPath::WgmmaWs);
                let ws = run(c, Some(&Emu::default()));
                let cp = Case {
                    path: GemmPath::Wgmma,
                    a: c.a.clone(),
                    b: c.b.clone(),
                    bias: c.bias.clone(),
                    res: c.res.clone(),
                    ..*c
                };
                assert_eq!(ws, run(&cp, Some(&Emu::default())), "{sh:?}");
            });
        });
    }

    /// The persistent grid: one block per multiprocessor at most, none without a tile.
    #[test]
    fn ws_grid_is_persistent() {
        let grid = |m: usize, n: usize, batch: usize| {
            let sh = GemmShape {
                layout: GemmLayout::Forward,
                batch,
                m,
                n,
                k: 768,
                act: Activation::None,
            };
            sh.kernel(GemmPath::WgmmaWs).2.grid
        };
        assert_eq!(grid(50432, 2304, 1), [TUNED_SMS as u32, 1, 1]);
        assert_eq!(grid(256, 512, 1), [4, 1, 1]);
        assert_eq!(grid(256, 512, 3), [12, 1, 1]);
    }

    /// Pipeline mistakes of the warp-specialised kernels fail the emulated launch: a producer
    /// that refills a stage without waiting until the consumers freed it, and consumers that
    /// free a stage before the products reading it are done.
    #[test]
    fn ws_pipeline_mistakes_are_reported() {
        for (variant, layout, what) in [
            (
                "no_empty_wait",
                GemmLayout::Forward,
                "more arrivals than its count",
            ),
            (
                "early_release",
                GemmLayout::InputGrad,
                "TMA into shared memory that an unfinished wgmma reads",
            ),
        ] {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 16,
                n: 64,
                k: 640,
                act: Activation::None,
            };
            let seed = fresh_seed();
            let c = case(sh, false, false, false, seed);
            let e = variant_error(variant, GemmPath::WgmmaWs, &c);
            assert!(e.contains(what), "{variant}: {e}");
        }
    }

    /// The wgmma launch constants are the ones `gemm_wgmma.cu` and `gemm_wgmma_tma.cu` are
    /// written for.
    #[test]
    fn wgmma_launch_constants_match_the_source() {
        let src = GEMM_WGMMA.source;
        for d in [
            "#define WG_BM 128",
            "#define WG_BN 128",
            "#define WG_BK 64",
            "#define WG_STAGES 4",
            "#define WG_THREADS 256",
        ] {
            assert!(src.contains(d), "gemm_wgmma.cu lacks `{d}`");
        }
        assert_eq!((WG_TILE, WG_THREADS), (128, 256));
        assert_eq!(WG_SMEM_BYTES, 4 * 2 * 128 * 64 * 2);
        let src = GEMM_WGMMA_TMA.source;
        for d in [
            "#define WT_BM 128",
            "#define WT_BN 128",
            "#define WT_BK 64",
            "#define WT_STAGES 4",
            "#define WT_THREADS 256",
            "#define WT_SMEM_BYTES (WT_BAR_OFFSET + WT_STAGES * 8 + 1024)",
        ] {
            assert!(src.contains(d), "gemm_wgmma_tma.cu lacks `{d}`");
        }
        assert_eq!(WT_SMEM_BYTES, WG_SMEM_BYTES + 4 * 8 + 1024);
        let src = crate::registry::GEMM_WS.source;
        for d in [
            "#define WS_BM 128",
            "#define WS_BN 256",
            "#define WS_BK 64",
            "#define WS_STAGES 4",
            "#define WS_THREADS 384",
            "#define WS_SMEM_BYTES (WS_BAR_OFFSET + 2 * WS_STAGES * 8 + 1024)",
        ] {
            assert!(src.contains(d), "gemm_ws.cu lacks `{d}`");
        }
        assert_eq!((WS_TILE_N, WS_THREADS), (256, 384));
        assert_eq!(WS_SMEM_BYTES, 4 * (16384 + 32768) + 2 * 4 * 8 + 1024);
    }

    /// The launch constants here are the tile sizes `gemm.cu` is written for.
    #[test]
    fn launch_constants_match_the_source() {
        let src = GEMM.source;
        for d in [
            "#define GEMM_BM 128",
            "#define GEMM_BN 64",
            "#define GEMM_BK 32",
            "#define GEMM_STAGES 3",
            "#define GEMM_THREADS 128",
            "#define GEMM_KPITCH (GEMM_BK + 8)",
        ] {
            assert!(src.contains(d), "gemm.cu lacks `{d}`");
        }
        assert_eq!((TILE_M, TILE_N, THREADS), (128, 64, 128));
        assert_eq!(SMEM_BYTES, 3 * (128 * (32 + 8) + 64 * (32 + 8)) * 2);
    }

    /// Waiting for one cp.async group too few reads a tile before it lands: the comparison
    /// the real kernel passes must fail (K spans several tiles, so the pipeline is exercised).
    #[test]
    fn broken_pipeline_variant_fails() {
        for layout in LAYOUTS {
            let sh = GemmShape {
                layout,
                batch: 1,
                m: 16,
                n: 64,
                k: 128,
                act: Activation::None,
            };
            let seed = fresh_seed();
            let c = case(sh, false, false, false, seed);
            let (e, _) = errors(&c, &Emu::variant("broken_wait"));
            assert!(
                e > 1e-2,
                "{layout:?} seed {seed}: missing wait passed ({e})"
            );
        }
    }

    /// The reference itself on a product small enough to write out: the layouts read the
    /// storage the module table documents.
    #[test]
    fn reference_reads_the_documented_layouts() {
        let v = |x: &[f32]| x.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
        // X (2, 3), W (2 outputs, 3 inputs): Y = X·Wᵀ.
        let x = v(&[1., 2., 3., 4., 5., 6.]);
        let w = v(&[1., 0., -1., 2., 1., 0.]);
        let sh = |layout, m, n, k| GemmShape {
            layout,
            batch: 1,
            m,
            n,
            k,
            act: Activation::None,
        };
        let mut y = vec![0.0f32; 4];
        gemm_cpu(
            &sh(GemmLayout::Forward, 2, 2, 3),
            &x,
            &w,
            Some(&v(&[0.5, -0.5])),
            Aux::None,
            GemmOut::F32(&mut y),
            None,
        )
        .unwrap();
        assert_eq!(y, [-1.5, 3.5, -1.5, 12.5]);
        // dX = dY·W with dY (2, 2) = identity: dX = W.
        let dy = v(&[1., 0., 0., 1.]);
        let mut dx = vec![0.0f32; 6];
        gemm_cpu(
            &sh(GemmLayout::InputGrad, 2, 3, 2),
            &dy,
            &w,
            None,
            Aux::None,
            GemmOut::F32(&mut dx),
            None,
        )
        .unwrap();
        assert_eq!(dx, [1., 0., -1., 2., 1., 0.]);
        // dW = dYᵀ·X with dY = [[1, 0], [1, 1]]: dW = [[5, 7, 9], [4, 5, 6]], db = [2, 1].
        let dy = v(&[1., 0., 1., 1.]);
        let (mut dw, mut db) = (vec![0.0f32; 6], vec![0.0f32; 2]);
        gemm_cpu(
            &sh(GemmLayout::WeightGrad, 2, 3, 2),
            &dy,
            &x,
            None,
            Aux::None,
            GemmOut::F32(&mut dw),
            Some(&mut db),
        )
        .unwrap();
        assert_eq!(dw, [5., 7., 9., 4., 5., 6.]);
        assert_eq!(db, [2., 1.]);
    }

    /// Runs the plan of `sh` with the epilogue `aux` (and a bias when one is given) on `path`
    /// under the emulation: slots `[a, b, bias, aux, out (poisoned), dbias (unused)]`.
    fn planned(
        sh: &GemmShape,
        aux: AuxUse,
        path: GemmPath,
        [a, b, bias, aux_in]: [&[bf16]; 4],
    ) -> Vec<crate::exec::HostBuf> {
        use crate::exec::{run, Backend, HostBuf};
        let (_, _, lc) = sh.lens();
        let opts = GemmOpts {
            bias: !bias.is_empty(),
            aux,
            path,
            ..GemmOpts::default()
        };
        let one = [bf16::ZERO];
        let mut bufs = vec![
            HostBuf::Bf16(a.to_vec()),
            HostBuf::Bf16(b.to_vec()),
            HostBuf::Bf16(if bias.is_empty() { &one } else { bias }.to_vec()),
            HostBuf::Bf16(aux_in.to_vec()),
            HostBuf::Bf16(vec![BF16_POISON; lc]),
            HostBuf::F32(vec![0.0; 1]),
        ];
        let ptrs: Vec<u64> = bufs.iter_mut().map(|b| b.host_ptr()).collect();
        // SAFETY: the callers' buffers have the lengths the shape needs; the unused slots are
        // passed as null.
        unsafe {
            run(
                Backend::Emu(&Emu::default()),
                &sh.plan(opts).unwrap(),
                &ptrs,
            )
        }
        .unwrap();
        bufs
    }

    /// The MLP's fused epilogues on every path: the forward saving its pre-activation (C and
    /// the saved values against the reference, and C bit-identical to the separate activation
    /// kernel run on the saved values), the input gradient through the activation's derivative
    /// (against the reference, and within bf16 of the separate kernels: product, then
    /// `act_bwd`). Plans run the same launches.
    #[test]
    fn fused_activation_epilogues_match_reference() {
        use crate::elementwise::{ew_emu, Act, Ew};
        use crate::exec::HostBuf;
        let emu = Emu::default();
        for path in [GemmPath::MmaSync, GemmPath::Wgmma, GemmPath::WgmmaTma] {
            for (act, ew_act) in [
                (Activation::Gelu, Act::Gelu),
                (Activation::QuickGelu, Act::QuickGelu),
            ] {
                for (m, n, k) in [(37, 72, 64), (130, 136, 200)] {
                    let seed = fresh_seed();
                    let ctx = format!("{path:?} {act:?} M={m} N={n} K={k} seed {seed}");
                    let mut g = rng(seed);
                    // Forward: pre = X·Wᵀ + b saved, f = act(pre).
                    let fwd = GemmShape {
                        layout: GemmLayout::Forward,
                        batch: 1,
                        m,
                        n,
                        k,
                        act,
                    };
                    let (la, lb, lc) = fwd.lens();
                    let x = random_bf16(&mut g, la, -1.0, 1.0);
                    let w = random_bf16(&mut g, lb, -1.0, 1.0);
                    let bias = random_bf16(&mut g, n, -1.0, 1.0);
                    let outs = |e: Option<&Emu>| {
                        let (mut f, mut pre) = (vec![BF16_POISON; lc], vec![BF16_POISON; lc]);
                        let aux = Aux::SavePre(pre.as_mut_slice());
                        let o = GemmOut::Bf16(&mut f);
                        match e {
                            Some(e) => {
                                gemm_emu_on(e, path, &fwd, &x, &w, Some(&bias), aux, o, None)
                            }
                            None => gemm_cpu(&fwd, &x, &w, Some(&bias), aux, o, None),
                        }
                        .unwrap();
                        (f, pre)
                    };
                    let (wf, wpre) = outs(None);
                    let (gf, gpre) = outs(Some(&emu));
                    let ef = rel_err(&bf16_to_f64(&gf), &bf16_to_f64(&wf));
                    let ep = rel_err(&bf16_to_f64(&gpre), &bf16_to_f64(&wpre));
                    assert!(ef <= 1e-2 && ep <= 1e-2, "{ctx}: f {ef}, pre {ep}");
                    let mut sep = vec![
                        HostBuf::Bf16(gpre.clone()),
                        HostBuf::Bf16(vec![BF16_POISON; lc]),
                    ];
                    ew_emu(&emu, &Ew::ActFwd { n: lc, act: ew_act }, &mut sep).unwrap();
                    assert_eq!(
                        sep[1],
                        HostBuf::Bf16(gf.clone()),
                        "{ctx}: f vs act_fwd(pre)"
                    );
                    let bufs = planned(
                        &fwd,
                        AuxUse::SavePre,
                        path,
                        [&x, &w, &bias, &vec![BF16_POISON; lc]],
                    );
                    assert_eq!(bufs[3], HostBuf::Bf16(gpre.clone()), "{ctx}: planned pre");
                    assert_eq!(bufs[4], HostBuf::Bf16(gf.clone()), "{ctx}: planned f");

                    // Input gradient: du = (dF·W2) ∘ act'(pre), dF (M, N2), W2 (N2, N).
                    let n2 = 64 + k % 64;
                    let dgrad = GemmShape {
                        layout: GemmLayout::InputGrad,
                        batch: 1,
                        m,
                        n,
                        k: n2,
                        act,
                    };
                    let (la, lb, _) = dgrad.lens();
                    let df = random_bf16(&mut g, la, -1.0, 1.0);
                    let w2 = random_bf16(&mut g, lb, -1.0, 1.0);
                    let grads = |e: Option<&Emu>, aux: Aux<'_, [bf16]>, sh: &GemmShape| {
                        let mut du = vec![BF16_POISON; lc];
                        let o = GemmOut::Bf16(&mut du);
                        match e {
                            Some(e) => gemm_emu_on(e, path, sh, &df, &w2, None, aux, o, None),
                            None => gemm_cpu(sh, &df, &w2, None, aux, o, None),
                        }
                        .unwrap();
                        du
                    };
                    let want = grads(None, Aux::ActGrad(&gpre), &dgrad);
                    let got = grads(Some(&emu), Aux::ActGrad(&gpre), &dgrad);
                    let e = rel_err(&bf16_to_f64(&got), &bf16_to_f64(&want));
                    assert!(e <= 1e-2, "{ctx}: du {e}");
                    let plain = GemmShape {
                        act: Activation::None,
                        ..dgrad
                    };
                    let dh = grads(Some(&emu), Aux::None, &plain);
                    let mut sep = vec![
                        HostBuf::Bf16(gpre.clone()),
                        HostBuf::Bf16(dh),
                        HostBuf::Bf16(vec![BF16_POISON; lc]),
                    ];
                    ew_emu(&emu, &Ew::ActBwd { n: lc, act: ew_act }, &mut sep).unwrap();
                    let e = rel_err(&bf16_to_f64(&got), &sep[2].to_f64());
                    assert!(e <= 1e-2, "{ctx}: du vs product then act_bwd {e}");
                    let bufs = planned(&dgrad, AuxUse::ActGrad, path, [&df, &w2, &[], &gpre]);
                    assert_eq!(bufs[4], HostBuf::Bf16(got), "{ctx}: planned du");
                }
            }
        }
        // The modes' rules.
        let sh = GemmShape {
            layout: GemmLayout::Forward,
            batch: 1,
            m: 4,
            n: 8,
            k: 8,
            act: Activation::None,
        };
        let save = GemmOpts {
            aux: AuxUse::SavePre,
            ..GemmOpts::default()
        };
        let e = sh.plan(save).unwrap_err();
        assert!(
            format!("{e}").contains("SavePre needs an activation"),
            "{e}"
        );
        let with_bias = GemmOpts {
            bias: true,
            aux: AuxUse::ActGrad,
            ..GemmOpts::default()
        };
        let sh = GemmShape {
            act: Activation::Gelu,
            ..sh
        };
        let e = sh.plan(with_bias).unwrap_err();
        assert!(format!("{e}").contains("ActGrad takes no bias"), "{e}");
    }

    /// The f64 activations' derivatives are the derivatives (central differences).
    #[test]
    fn activation_grad_is_the_derivative() {
        for act in [Activation::Gelu, Activation::QuickGelu, Activation::None] {
            for v in [-3.1, -1.0, -0.2, 0.0, 0.4, 1.7, 2.9] {
                let h = 1e-6;
                let num = (act.apply(v + h) - act.apply(v - h)) / (2.0 * h);
                assert!(
                    (num - act.grad(v)).abs() <= 1e-8,
                    "{act:?} at {v}: {} vs {num}",
                    act.grad(v)
                );
            }
        }
    }

    #[test]
    fn wrong_lengths_and_options_are_errors() {
        let sh = GemmShape {
            layout: GemmLayout::Forward,
            batch: 1,
            m: 4,
            n: 8,
            k: 8,
            act: Activation::None,
        };
        let c = case(sh, false, false, false, 1);
        let mut out = vec![bf16::ZERO; 31];
        let e = gemm_emu(
            &Emu::default(),
            &sh,
            &c.a,
            &c.b,
            None,
            Aux::None,
            GemmOut::Bf16(&mut out),
            None,
        )
        .unwrap_err();
        assert!(
            format!("{e}").contains("`out` holds 31 elements, the shape needs 32"),
            "{e}"
        );
        let mut out = vec![bf16::ZERO; 32];
        let mut db = vec![0.0f32; 4];
        let e = gemm_cpu(
            &sh,
            &c.a,
            &c.b,
            None,
            Aux::None,
            GemmOut::Bf16(&mut out),
            Some(&mut db),
        )
        .unwrap_err();
        assert!(
            format!("{e}").contains("only by the WeightGrad layout"),
            "{e}"
        );
        let empty = GemmShape { m: 0, ..sh };
        assert!(gemm_cpu(
            &empty,
            &[],
            &[],
            None,
            Aux::None,
            GemmOut::Bf16(&mut []),
            None
        )
        .is_err());
    }

    /// The same comparison on a GPU when one is present; without a driver it only checks that
    /// selection falls back to the CPU.
    #[test]
    fn gpu_matches_reference_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto).unwrap() {
            crate::device::Device::Cuda(g) => g,
            crate::device::Device::Cpu => {
                eprintln!("no GPU: gemm GPU test not run");
                return;
            }
        };
        let st = gpu.stream().clone();
        for layout in LAYOUTS {
            for &(m, n, k) in &[(1, 64, 64), (130, 128, 72), (197, 768, 768), (33, 100, 40)] {
                let sh = GemmShape {
                    layout,
                    batch: 2,
                    m,
                    n,
                    k,
                    act: Activation::Gelu,
                };
                let seed = fresh_seed();
                let c = case(sh, true, true, false, seed);
                let (want, wdb) = run(&c, None);
                let (a, b) = (
                    st.clone_htod(bf16_bits(&c.a)).unwrap(),
                    st.clone_htod(bf16_bits(&c.b)).unwrap(),
                );
                let bias = st.clone_htod(bf16_bits(c.bias.as_ref().unwrap())).unwrap();
                let res = st.clone_htod(bf16_bits(c.res.as_ref().unwrap())).unwrap();
                let (_, _, lc) = sh.lens();
                let mut o = st.clone_htod(&vec![BF16_POISON.to_bits(); lc]).unwrap();
                let mut db = st.clone_htod(&vec![f32::NAN; sh.batch * m]).unwrap();
                gemm_cuda(
                    &gpu,
                    &sh,
                    &a,
                    &b,
                    Some(&bias),
                    Aux::Residual(&res),
                    GemmOutCuda::Bf16(&mut o),
                    c.dbias.then_some(&mut db),
                )
                .unwrap();
                let got: Vec<bf16> = st
                    .dtoh_synced(&o)
                    .unwrap()
                    .into_iter()
                    .map(bf16::from_bits)
                    .collect();
                let e = rel_err(&bf16_to_f64(&got), &want);
                let edb = if c.dbias {
                    rel_err(&f32_to_f64(&st.dtoh_synced(&db).unwrap()), &wdb)
                } else {
                    0.0
                };
                assert!(
                    e <= 1e-2 && edb <= 1e-4,
                    "GPU {sh:?} seed {seed}: C {e}, dbias {edb}"
                );
            }
        }
    }
}
