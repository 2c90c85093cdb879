//! LayerNorm fused with the residual add (`cuda/layernorm.cu`): CPU reference, emulation
//! launcher and GPU launcher, all with the same parameters, and their tests.
//!
//! Forward: `s = x + r` (stored, bf16), `y = (s − mean)·rstd·gamma + beta` (bf16), `mean`,
//! `rstd` (fp32, per row). Backward: `ds` (bf16, the gradient of both `x` and `r`, plus the
//! residual-path gradient `dres` when given), `dgamma`, `dbeta` (fp32, overwritten). The
//! backward reduces dgamma/dbeta through a caller-provided scratch of per-block partials
//! ([`backward_scratch_len`]) in a fixed order, so reruns are bit-identical.

use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{Step, P};
use crate::launch::{check_len, Arg, LaunchShape};
use crate::registry::LAYERNORM;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

/// Rows and columns of a LayerNorm and its epsilon.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LnShape {
    /// Rows (tokens).
    pub n: usize,
    /// Columns (channels), normalised over.
    pub c: usize,
    /// Added to the variance before the square root.
    pub eps: f32,
}

/// The most backward blocks of `layernorm_bwd`; each owns a slice of rows and one row of
/// partials.
const BWD_MAX_BLOCKS: usize = 256;
/// The most warps of `layernorm_bwd_rows` (4 per block); each owns a slice of rows and one row
/// of partials. Enough rows in flight to keep the device's memory busy.
const BWD_ROWS_MAX_WARPS: usize = 1024;
/// Dynamic shared memory of the backward (2·C floats) must fit the default 48 KiB.
const MAX_C: usize = 48 * 1024 / 8;

impl LnShape {
    fn validate(&self) -> Result<()> {
        ensure!(self.n > 0 && self.c > 0, "layernorm: empty shape {self:?}");
        ensure!(
            self.c <= MAX_C,
            "layernorm: C = {} exceeds the supported {MAX_C}",
            self.c
        );
        ensure!(
            self.eps > 0.0 && self.eps.is_finite(),
            "layernorm: eps must be positive, got {}",
            self.eps
        );
        Arg::int("layernorm N", self.n)?;
        Arg::int("layernorm N*C", self.n * self.c)?;
        Ok(())
    }
    /// Threads per block: one warp per 32 columns, at most 256 (kernels need a multiple of 32).
    fn threads(&self) -> u32 {
        (self.c.div_ceil(32) * 32).clamp(32, 256) as u32
    }
    /// Rows of backward partials, G: the blocks of `layernorm_bwd`, or the warps of
    /// `layernorm_bwd_rows` (a multiple of 4), each summing rows g, g + G, ...
    fn bwd_blocks(&self) -> usize {
        if self.warp_rows() {
            4 * self.n.div_ceil(4).min(BWD_ROWS_MAX_WARPS / 4)
        } else {
            self.n.min(BWD_MAX_BLOCKS)
        }
    }
    /// Whether forward and backward run `layernorm_fwd_rows` and `layernorm_bwd_rows` (one
    /// warp per row, the row in registers, 16-byte accesses): C a multiple of 256 up to 1024.
    fn warp_rows(&self) -> bool {
        self.c.is_multiple_of(256) && self.c <= 1024
    }
    /// The forward's kernel and launch.
    fn fwd_kernel(&self) -> (&'static str, LaunchShape) {
        if self.warp_rows() {
            let grid = self.n.div_ceil(4) as u32;
            ("layernorm_fwd_rows", LaunchShape::linear(grid, 128, 0))
        } else {
            (
                "layernorm_fwd",
                LaunchShape::linear(self.n as u32, self.threads(), 0),
            )
        }
    }
    /// The backward's kernel and launch: `layernorm_bwd_rows` where the forward takes
    /// `layernorm_fwd_rows`, else `layernorm_bwd`.
    fn bwd_kernel(&self) -> (&'static str, LaunchShape) {
        if self.warp_rows() {
            let blocks = (self.bwd_blocks() / 4) as u32;
            ("layernorm_bwd_rows", LaunchShape::linear(blocks, 128, 0))
        } else {
            let shape = LaunchShape::linear(
                self.bwd_blocks() as u32,
                self.threads(),
                (2 * self.c * 4) as u32,
            );
            ("layernorm_bwd", shape)
        }
    }
    fn reduce_launch(&self) -> LaunchShape {
        LaunchShape::linear((2 * self.c).div_ceil(32) as u32, 256, 0)
    }
}

/// Length in f32 of the backward's scratch: (G, 2, C) partials.
pub fn backward_scratch_len(sh: LnShape) -> usize {
    sh.bwd_blocks() * 2 * sh.c
}

impl LnShape {
    /// The forward as a plan ([`crate::exec`]) over the buffer slots
    /// `[x, r, gamma, beta, s, y, mean, rstd]`. The caller guarantees the lengths
    /// [`layernorm_forward_cpu`] checks.
    pub fn forward_plan(&self) -> Result<Vec<Step>> {
        self.plan_fwd(true)
    }

    /// `y = LayerNorm(x)` without a residual, as a plan over the same slots as
    /// [`LnShape::forward_plan`]; slots `r` and `s` are passed as null (the backward then
    /// takes x where it takes s).
    pub fn norm_plan(&self) -> Result<Vec<Step>> {
        self.plan_fwd(false)
    }

    fn plan_fwd(&self, residual: bool) -> Result<Vec<Step>> {
        self.validate()?;
        let mut args: Vec<P> = (0..8)
            .map(|i| match (residual, i) {
                (false, 1 | 4) => P::Null,
                _ => P::Buf(i),
            })
            .collect();
        // `validate` has checked that N·C fits an `int`.
        args.extend([P::I32(self.c as i32), P::F32(self.eps)]);
        if self.warp_rows() {
            args.push(P::I32(self.n as i32));
        }
        let (kernel, shape) = self.fwd_kernel();
        Ok(vec![Step {
            file: &LAYERNORM,
            kernel,
            shape,
            args,
        }])
    }

    /// The backward as a plan over the buffer slots
    /// `[dy, s, gamma, mean, rstd, dres, ds, dgamma, dbeta, scratch]` (`scratch` holds
    /// [`backward_scratch_len`] floats); without `dres` slot 5 is passed as null. Same contract
    /// as [`LnShape::forward_plan`].
    pub fn backward_plan(&self, dres: bool) -> Result<Vec<Step>> {
        self.validate()?;
        let (n, c, g) = (
            P::I32(self.n as i32),
            P::I32(self.c as i32),
            P::I32(self.bwd_blocks() as i32),
        );
        let bwd = vec![
            P::Buf(0),
            P::Buf(1),
            P::Buf(2),
            P::Buf(3),
            P::Buf(4),
            if dres { P::Buf(5) } else { P::Null },
            P::Buf(6),
            P::Buf(9),
            n,
            c,
        ];
        let red = vec![P::Buf(9), P::Buf(7), P::Buf(8), g, c];
        let step = |kernel, shape, args| Step {
            file: &LAYERNORM,
            kernel,
            shape,
            args,
        };
        let (kernel, shape) = self.bwd_kernel();
        Ok(vec![
            step(kernel, shape, bwd),
            step("layernorm_bwd_reduce", self.reduce_launch(), red),
        ])
    }
}

/// Lengths of x, r, gamma, beta, s, y, mean, rstd; r and s both given or both absent.
fn check_fwd_lens(sh: LnShape, lens: [Option<usize>; 8]) -> Result<()> {
    sh.validate()?;
    ensure!(
        lens[1].is_some() == lens[4].is_some(),
        "layernorm_fwd: the sum s is stored exactly when a residual r is given"
    );
    let (nc, c, n) = (sh.n * sh.c, sh.c, sh.n);
    let names = ["x", "r", "gamma", "beta", "s", "y", "mean", "rstd"];
    for ((name, have), need) in names.iter().zip(lens).zip([nc, nc, c, c, nc, nc, n, n]) {
        if let Some(have) = have {
            check_len("layernorm_fwd", name, have, need)?;
        }
    }
    Ok(())
}

fn check_bwd_lens(sh: LnShape, lens: [usize; 9], has_dres: bool) -> Result<()> {
    sh.validate()?;
    let (nc, c, n) = (sh.n * sh.c, sh.c, sh.n);
    let names = [
        "dy", "s", "gamma", "mean", "rstd", "dres", "ds", "dgamma", "dbeta",
    ];
    let needs = [nc, nc, c, n, n, if has_dres { nc } else { 0 }, nc, c, c];
    for ((name, have), need) in names.iter().zip(lens).zip(needs) {
        check_len("layernorm_bwd", name, have, need)?;
    }
    Ok(())
}

fn fwd_args(sh: LnShape, p: [Arg; 8]) -> Result<Vec<Arg>> {
    let mut a = p.to_vec();
    a.push(Arg::int("layernorm C", sh.c)?);
    a.push(Arg::F32(sh.eps));
    if sh.warp_rows() {
        a.push(Arg::int("layernorm N", sh.n)?);
    }
    Ok(a)
}

// ------------------------------------------------------------------------------------------
// CPU reference
// ------------------------------------------------------------------------------------------

/// CPU reference of the forward, statistics in f64. Without `r` (and `s`), `y = LN(x)`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_cpu(
    sh: LnShape,
    x: &[bf16],             // (N, C)
    r: Option<&[bf16]>,     // (N, C)
    gamma: &[bf16],         // (C)
    beta: &[bf16],          // (C)
    s: Option<&mut [bf16]>, // (N, C) out: x + r, given exactly with r
    y: &mut [bf16],         // (N, C) out
    mean: &mut [f32],       // (N) out
    rstd: &mut [f32],       // (N) out
) -> Result<()> {
    check_fwd_lens(
        sh,
        [
            Some(x.len()),
            r.map(|v| v.len()),
            Some(gamma.len()),
            Some(beta.len()),
            s.as_ref().map(|v| v.len()),
            Some(y.len()),
            Some(mean.len()),
            Some(rstd.len()),
        ],
    )?;
    let c = sh.c;
    let mut sum = x.to_vec();
    if let (Some(r), Some(s)) = (r, s) {
        for (i, v) in sum.iter_mut().enumerate() {
            *v = bf16::from_f32(x[i].to_f32() + r[i].to_f32());
            s[i] = *v;
        }
    }
    let s = sum;
    for n in 0..sh.n {
        let row = n * c..(n + 1) * c;
        let mu = s[row.clone()]
            .iter()
            .map(|v| f64::from(v.to_f32()))
            .sum::<f64>()
            / c as f64;
        let var = s[row.clone()]
            .iter()
            .map(|v| (f64::from(v.to_f32()) - mu).powi(2))
            .sum::<f64>()
            / c as f64;
        let rs = 1.0 / (var + f64::from(sh.eps)).sqrt();
        for (j, i) in row.enumerate() {
            let xhat = (f64::from(s[i].to_f32()) - mu) * rs;
            y[i] =
                bf16::from_f64(xhat * f64::from(gamma[j].to_f32()) + f64::from(beta[j].to_f32()));
        }
        mean[n] = mu as f32;
        rstd[n] = rs as f32;
    }
    Ok(())
}

/// CPU reference of the backward, sums in f64. Row `n` contributes to partial row `n % G` of
/// `scratch`, as in the kernel, so the partials can be compared too.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_cpu(
    sh: LnShape,
    dy: &[bf16],           // (N, C)
    s: &[bf16],            // (N, C)
    gamma: &[bf16],        // (C)
    mean: &[f32],          // (N)
    rstd: &[f32],          // (N)
    dres: Option<&[bf16]>, // (N, C)
    ds: &mut [bf16],       // (N, C) out
    dgamma: &mut [f32],    // (C) out
    dbeta: &mut [f32],     // (C) out
    scratch: &mut [f32],   // (G, 2, C) out
) -> Result<()> {
    let lens = [
        dy.len(),
        s.len(),
        gamma.len(),
        mean.len(),
        rstd.len(),
        dres.map_or(0, |d| d.len()),
        ds.len(),
        dgamma.len(),
        dbeta.len(),
    ];
    check_bwd_lens(sh, lens, dres.is_some())?;
    check_len(
        "layernorm_bwd",
        "scratch",
        scratch.len(),
        backward_scratch_len(sh),
    )?;
    let (c, g) = (sh.c, sh.bwd_blocks());
    let mut part = vec![0.0f64; g * 2 * c];
    for n in 0..sh.n {
        let (mu, rs) = (f64::from(mean[n]), f64::from(rstd[n]));
        let xhat = |j: usize| (f64::from(s[n * c + j].to_f32()) - mu) * rs;
        let gv = |j: usize| f64::from(dy[n * c + j].to_f32()) * f64::from(gamma[j].to_f32());
        let mg = (0..c).map(gv).sum::<f64>() / c as f64;
        let mgx = (0..c).map(|j| gv(j) * xhat(j)).sum::<f64>() / c as f64;
        let p = &mut part[(n % g) * 2 * c..(n % g + 1) * 2 * c];
        for j in 0..c {
            let mut v = rs * (gv(j) - mg - xhat(j) * mgx);
            if let Some(d) = dres {
                v += f64::from(d[n * c + j].to_f32());
            }
            ds[n * c + j] = bf16::from_f64(v);
            let d = f64::from(dy[n * c + j].to_f32());
            p[j] += d * xhat(j);
            p[c + j] += d;
        }
    }
    for j in 0..c {
        dgamma[j] = (0..g).map(|b| part[b * 2 * c + j]).sum::<f64>() as f32;
        dbeta[j] = (0..g).map(|b| part[b * 2 * c + c + j]).sum::<f64>() as f32;
    }
    for (o, v) in scratch.iter_mut().zip(&part) {
        *o = *v as f32;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Emulation launchers
// ------------------------------------------------------------------------------------------

/// The forward kernel under the emulation; same parameters as [`layernorm_forward_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_emu(
    emu: &Emu,
    sh: LnShape,
    x: &[bf16],
    r: Option<&[bf16]>,
    gamma: &[bf16],
    beta: &[bf16],
    s: Option<&mut [bf16]>,
    y: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    check_fwd_lens(
        sh,
        [
            Some(x.len()),
            r.map(|v| v.len()),
            Some(gamma.len()),
            Some(beta.len()),
            s.as_ref().map(|v| v.len()),
            Some(y.len()),
            Some(mean.len()),
            Some(rstd.len()),
        ],
    )?;
    let ptrs = [
        Arg::host(x),
        r.map_or(Arg::Ptr(0), Arg::host),
        Arg::host(gamma),
        Arg::host(beta),
        s.map_or(Arg::Ptr(0), Arg::host_mut),
        Arg::host_mut(y),
        Arg::host_mut(mean),
        Arg::host_mut(rstd),
    ];
    let (kernel, shape) = sh.fwd_kernel();
    // SAFETY: every buffer was checked against the shape the kernel indexes.
    unsafe { emu.launch(kernel, shape, &fwd_args(sh, ptrs)?) }
}

/// The backward kernels under the emulation; same parameters as [`layernorm_backward_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_emu(
    emu: &Emu,
    sh: LnShape,
    dy: &[bf16],
    s: &[bf16],
    gamma: &[bf16],
    mean: &[f32],
    rstd: &[f32],
    dres: Option<&[bf16]>,
    ds: &mut [bf16],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    scratch: &mut [f32],
) -> Result<()> {
    let lens = [
        dy.len(),
        s.len(),
        gamma.len(),
        mean.len(),
        rstd.len(),
        dres.map_or(0, |d| d.len()),
        ds.len(),
        dgamma.len(),
        dbeta.len(),
    ];
    check_bwd_lens(sh, lens, dres.is_some())?;
    check_len(
        "layernorm_bwd",
        "scratch",
        scratch.len(),
        backward_scratch_len(sh),
    )?;
    let bwd = [
        Arg::host(dy),
        Arg::host(s),
        Arg::host(gamma),
        Arg::host(mean),
        Arg::host(rstd),
        dres.map_or(Arg::Ptr(0), Arg::host),
        Arg::host_mut(ds),
        Arg::host_mut(scratch),
        Arg::int("layernorm N", sh.n)?,
        Arg::int("layernorm C", sh.c)?,
    ];
    let red = [
        Arg::host(scratch),
        Arg::host_mut(dgamma),
        Arg::host_mut(dbeta),
        Arg::int("layernorm G", sh.bwd_blocks())?,
        Arg::int("layernorm C", sh.c)?,
    ];
    let (kernel, shape) = sh.bwd_kernel();
    // SAFETY: every buffer was checked against the shape the kernels index.
    unsafe {
        emu.launch(kernel, shape, &bwd)?;
        emu.launch("layernorm_bwd_reduce", sh.reduce_launch(), &red)
    }
}

// ------------------------------------------------------------------------------------------
// GPU launchers (bf16 buffers as raw u16 bits)
// ------------------------------------------------------------------------------------------

/// The forward kernel on a GPU; same parameters as [`layernorm_forward_cpu`], device buffers.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_cuda(
    gpu: &Gpu,
    sh: LnShape,
    x: &CudaSlice<u16>,
    r: Option<&CudaSlice<u16>>,
    gamma: &CudaSlice<u16>,
    beta: &CudaSlice<u16>,
    s: Option<&mut CudaSlice<u16>>,
    y: &mut CudaSlice<u16>,
    mean: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    check_fwd_lens(
        sh,
        [
            Some(x.len()),
            r.map(|v| v.len()),
            Some(gamma.len()),
            Some(beta.len()),
            s.as_ref().map(|v| v.len()),
            Some(y.len()),
            Some(mean.len()),
            Some(rstd.len()),
        ],
    )?;
    let st = gpu.stream();
    let (px, _gx) = x.device_ptr(st);
    let (pr, _gr) = match r {
        Some(r) => {
            let (p, g) = r.device_ptr(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (pg, _gg) = gamma.device_ptr(st);
    let (pb, _gb) = beta.device_ptr(st);
    let (ps, _gs) = match s {
        Some(s) => {
            let (p, g) = s.device_ptr_mut(st);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (py, _gy) = y.device_ptr_mut(st);
    let (pm, _gm) = mean.device_ptr_mut(st);
    let (pv, _gv) = rstd.device_ptr_mut(st);
    let ptrs = [px, pr, pg, pb, ps, py, pm, pv].map(Arg::Ptr);
    let (kernel, shape) = sh.fwd_kernel();
    // SAFETY: every buffer was checked against the shape the kernel indexes.
    unsafe { gpu.launch(&LAYERNORM, kernel, shape, &fwd_args(sh, ptrs)?) }
}

/// The backward kernels on a GPU; same parameters as [`layernorm_backward_cpu`], device buffers.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_cuda(
    gpu: &Gpu,
    sh: LnShape,
    dy: &CudaSlice<u16>,
    s: &CudaSlice<u16>,
    gamma: &CudaSlice<u16>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dres: Option<&CudaSlice<u16>>,
    ds: &mut CudaSlice<u16>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    let lens = [
        dy.len(),
        s.len(),
        gamma.len(),
        mean.len(),
        rstd.len(),
        dres.map_or(0, |d| d.len()),
        ds.len(),
        dgamma.len(),
        dbeta.len(),
    ];
    check_bwd_lens(sh, lens, dres.is_some())?;
    check_len(
        "layernorm_bwd",
        "scratch",
        scratch.len(),
        backward_scratch_len(sh),
    )?;
    let st = gpu.stream();
    let (pdy, _a) = dy.device_ptr(st);
    let (ps, _b) = s.device_ptr(st);
    let (pg, _c) = gamma.device_ptr(st);
    let (pm, _d) = mean.device_ptr(st);
    let (pr, _e) = rstd.device_ptr(st);
    let dres_ptr = dres.map(|d| d.device_ptr(st));
    let (pds, _f) = ds.device_ptr_mut(st);
    let (pdg, _g) = dgamma.device_ptr_mut(st);
    let (pdb, _h) = dbeta.device_ptr_mut(st);
    let (pp, _i) = scratch.device_ptr_mut(st);
    let bwd = [
        Arg::Ptr(pdy),
        Arg::Ptr(ps),
        Arg::Ptr(pg),
        Arg::Ptr(pm),
        Arg::Ptr(pr),
        Arg::Ptr(dres_ptr.as_ref().map_or(0, |(p, _)| *p)),
        Arg::Ptr(pds),
        Arg::Ptr(pp),
        Arg::int("layernorm N", sh.n)?,
        Arg::int("layernorm C", sh.c)?,
    ];
    let red = [
        Arg::Ptr(pp),
        Arg::Ptr(pdg),
        Arg::Ptr(pdb),
        Arg::int("layernorm G", sh.bwd_blocks())?,
        Arg::int("layernorm C", sh.c)?,
    ];
    let (kernel, shape) = sh.bwd_kernel();
    // SAFETY: every buffer was checked against the shape the kernels index.
    unsafe {
        gpu.launch(&LAYERNORM, kernel, shape, &bwd)?;
        gpu.launch(&LAYERNORM, "layernorm_bwd_reduce", sh.reduce_launch(), &red)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DtohSynced;
    use crate::emu::Schedule;
    use crate::testing::bf16_bits;
    use crate::testing::{
        bf16_to_f64, f32_to_f64, fresh_seed, random_bf16, rel_err, rng, BF16_POISON,
    };

    /// Sizes: odd and even C, C below one warp, C not a multiple of the block, N = 1.
    /// Odd and aligned sizes; C = 256, 512, 768, 1024 take the one-warp-per-row forward
    /// (`layernorm_fwd_rows`), with N not a multiple of its 4 rows per block.
    const SHAPES: &[(usize, usize)] = &[
        (1, 7),
        (3, 33),
        (5, 64),
        (4, 257),
        (2, 768),
        (9, 130),
        (7, 256),
        (6, 512),
        (5, 1024),
    ];

    struct FwdOut {
        s: Vec<bf16>,
        y: Vec<bf16>,
        mean: Vec<f32>,
        rstd: Vec<f32>,
    }

    fn poisoned_fwd(sh: LnShape) -> FwdOut {
        let nc = sh.n * sh.c;
        FwdOut {
            s: vec![BF16_POISON; nc],
            y: vec![BF16_POISON; nc],
            mean: vec![f32::NAN; sh.n],
            rstd: vec![f32::NAN; sh.n],
        }
    }

    /// Worst relative error over the forward outputs, bf16 and fp32 paths separately.
    fn fwd_errors(got: &FwdOut, want: &FwdOut) -> (f64, f64) {
        let bf = rel_err(&bf16_to_f64(&got.s), &bf16_to_f64(&want.s))
            .max(rel_err(&bf16_to_f64(&got.y), &bf16_to_f64(&want.y)));
        let fp = rel_err(&f32_to_f64(&got.mean), &f32_to_f64(&want.mean))
            .max(rel_err(&f32_to_f64(&got.rstd), &f32_to_f64(&want.rstd)));
        (bf, fp)
    }

    struct FwdIn {
        x: Vec<bf16>,
        r: Vec<bf16>,
        gamma: Vec<bf16>,
        beta: Vec<bf16>,
    }

    fn fwd_inputs(sh: LnShape, seed: u64) -> FwdIn {
        let mut g = rng(seed);
        let nc = sh.n * sh.c;
        // An offset in x keeps the mean away from zero, so a wrong mean shows.
        FwdIn {
            x: random_bf16(&mut g, nc, 0.5, 3.0),
            r: random_bf16(&mut g, nc, -1.0, 1.0),
            gamma: random_bf16(&mut g, sh.c, 0.5, 1.5),
            beta: random_bf16(&mut g, sh.c, -0.5, 0.5),
        }
    }

    /// The forward plan's slots `[x, r, gamma, beta, s, y, mean, rstd]` on host buffers,
    /// the outputs poisoned.
    fn fwd_slots(sh: LnShape, i: &FwdIn) -> [crate::exec::HostBuf; 8] {
        use crate::exec::HostBuf;
        let nc = sh.n * sh.c;
        [
            HostBuf::Bf16(i.x.clone()),
            HostBuf::Bf16(i.r.clone()),
            HostBuf::Bf16(i.gamma.clone()),
            HostBuf::Bf16(i.beta.clone()),
            HostBuf::Bf16(vec![BF16_POISON; nc]),
            HostBuf::Bf16(vec![BF16_POISON; nc]),
            HostBuf::F32(vec![f32::NAN; sh.n]),
            HostBuf::F32(vec![f32::NAN; sh.n]),
        ]
    }

    fn run_fwd(emu: &Emu, sh: LnShape, i: &FwdIn) -> (FwdOut, FwdOut) {
        let mut want = poisoned_fwd(sh);
        layernorm_forward_cpu(
            sh,
            &i.x,
            Some(&i.r),
            &i.gamma,
            &i.beta,
            Some(&mut want.s),
            &mut want.y,
            &mut want.mean,
            &mut want.rstd,
        )
        .unwrap();
        let mut got = poisoned_fwd(sh);
        layernorm_forward_emu(
            emu,
            sh,
            &i.x,
            Some(&i.r),
            &i.gamma,
            &i.beta,
            Some(&mut got.s),
            &mut got.y,
            &mut got.mean,
            &mut got.rstd,
        )
        .unwrap();
        (got, want)
    }

    #[test]
    fn forward_matches_reference() {
        for &(n, c) in SHAPES {
            let sh = LnShape { n, c, eps: 1e-5 };
            let seed = fresh_seed();
            let (got, want) = run_fwd(&Emu::default(), sh, &fwd_inputs(sh, seed));
            let (bf, fp) = fwd_errors(&got, &want);
            assert!(
                bf <= 1e-2 && fp <= 1e-4,
                "N={n} C={c} seed {seed}: bf16 err {bf}, fp32 err {fp}"
            );
        }
    }

    #[test]
    fn forward_result_does_not_depend_on_thread_order() {
        // One block per row (C = 100) and one warp per row (C = 256).
        for c in [100, 256] {
            let sh = LnShape { n: 3, c, eps: 1e-5 };
            let seed = fresh_seed();
            let i = fwd_inputs(sh, seed);
            let (first, _) = run_fwd(&Emu::default(), sh, &i);
            for sched in [Schedule::Reverse, Schedule::Shuffled(seed)] {
                let (got, _) = run_fwd(&Emu::default().with_schedule(sched), sh, &i);
                assert_eq!(got.y, first.y, "C={c} {sched:?}");
                assert_eq!(got.mean, first.mean, "C={c} {sched:?}");
            }
        }
    }

    /// The one-warp-per-row forward with operands off a 16-byte boundary (x, r and s one
    /// element in) takes its element path, with and without the residual: the reference's
    /// results, and the same as the aligned run.
    #[test]
    fn rows_forward_handles_misaligned_rows() {
        let sh = LnShape {
            n: 5,
            c: 512,
            eps: 1e-5,
        };
        assert_eq!(sh.fwd_kernel().0, "layernorm_fwd_rows");
        let seed = fresh_seed();
        let i = fwd_inputs(sh, seed);
        let (aligned, want) = run_fwd(&Emu::default(), sh, &i);
        let shift = |v: &[bf16]| {
            let mut o = vec![bf16::ZERO; v.len() + 1];
            o[1..].copy_from_slice(v);
            o
        };
        let (x1, r1) = (shift(&i.x), shift(&i.r));
        let mut got = poisoned_fwd(sh);
        let mut s1 = vec![BF16_POISON; sh.n * sh.c + 1];
        layernorm_forward_emu(
            &Emu::default(),
            sh,
            &x1[1..],
            Some(&r1[1..]),
            &i.gamma,
            &i.beta,
            Some(&mut s1[1..]),
            &mut got.y,
            &mut got.mean,
            &mut got.rstd,
        )
        .unwrap();
        got.s = s1[1..].to_vec();
        let (bf, fp) = fwd_errors(&got, &want);
        assert!(bf <= 1e-2 && fp <= 1e-4, "seed {seed}: {bf} {fp}");
        assert_eq!((&got.s, &got.y), (&aligned.s, &aligned.y), "seed {seed}");
        // Without the residual, from the misaligned x.
        let mut y = vec![BF16_POISON; sh.n * sh.c];
        let (mut m, mut r) = (vec![f32::NAN; sh.n], vec![f32::NAN; sh.n]);
        layernorm_forward_emu(
            &Emu::default(),
            sh,
            &x1[1..],
            None,
            &i.gamma,
            &i.beta,
            None,
            &mut y,
            &mut m,
            &mut r,
        )
        .unwrap();
        let mut want_y = vec![BF16_POISON; sh.n * sh.c];
        let (mut wm, mut wr) = (vec![f32::NAN; sh.n], vec![f32::NAN; sh.n]);
        layernorm_forward_cpu(
            sh,
            &i.x,
            None,
            &i.gamma,
            &i.beta,
            None,
            &mut want_y,
            &mut wm,
            &mut wr,
        )
        .unwrap();
        let e = rel_err(&bf16_to_f64(&y), &bf16_to_f64(&want_y));
        assert!(e <= 1e-2, "seed {seed}: {e}");
    }

    /// The deliberately broken variants, built from the same source with a macro, must fail
    /// the same comparison the real kernel passes.
    #[test]
    fn broken_variants_fail_the_comparison() {
        let sh = LnShape {
            n: 4,
            c: 96,
            eps: 1e-5,
        };
        let seed = fresh_seed();
        let i = fwd_inputs(sh, seed);
        let (got, want) = run_fwd(&Emu::variant("broken_index"), sh, &i);
        let (bf, fp) = fwd_errors(&got, &want);
        assert!(
            bf > 1e-2 || fp > 1e-4,
            "seed {seed}: off-by-one passed (bf16 {bf}, fp32 {fp})"
        );
        for sched in [Schedule::Forward, Schedule::Reverse] {
            let (got, want) = run_fwd(&Emu::variant("broken_barrier").with_schedule(sched), sh, &i);
            let (bf, fp) = fwd_errors(&got, &want);
            assert!(
                bf > 1e-2 || fp > 1e-4,
                "seed {seed} {sched:?}: missing barrier passed (bf16 {bf}, fp32 {fp})"
            );
        }
    }

    #[test]
    fn backward_matches_reference() {
        // Include N > BWD_MAX_BLOCKS once, so blocks own several rows, and N above the 1024
        // warps of the one-warp-per-row backward, so warps do too.
        let shapes: Vec<(usize, usize)> = SHAPES
            .iter()
            .copied()
            .chain([(300, 31), (1100, 256)])
            .collect();
        for (n, c) in shapes {
            let sh = LnShape { n, c, eps: 1e-5 };
            let seed = fresh_seed();
            let i = fwd_inputs(sh, seed);
            let mut f = poisoned_fwd(sh);
            layernorm_forward_cpu(
                sh,
                &i.x,
                Some(&i.r),
                &i.gamma,
                &i.beta,
                Some(&mut f.s),
                &mut f.y,
                &mut f.mean,
                &mut f.rstd,
            )
            .unwrap();
            let mut g = rng(seed ^ 1);
            let dy = random_bf16(&mut g, n * c, -1.0, 1.0);
            let dres = random_bf16(&mut g, n * c, -0.5, 0.5);
            for with_dres in [false, true] {
                let dr = with_dres.then_some(dres.as_slice());
                let out = |sh: LnShape| {
                    (
                        vec![BF16_POISON; n * c],
                        vec![f32::NAN; c],
                        vec![f32::NAN; c],
                        vec![f32::NAN; backward_scratch_len(sh)],
                    )
                };
                let (mut ds0, mut dg0, mut db0, mut p0) = out(sh);
                layernorm_backward_cpu(
                    sh, &dy, &f.s, &i.gamma, &f.mean, &f.rstd, dr, &mut ds0, &mut dg0, &mut db0,
                    &mut p0,
                )
                .unwrap();
                let (mut ds1, mut dg1, mut db1, mut p1) = out(sh);
                layernorm_backward_emu(
                    &Emu::default(),
                    sh,
                    &dy,
                    &f.s,
                    &i.gamma,
                    &f.mean,
                    &f.rstd,
                    dr,
                    &mut ds1,
                    &mut dg1,
                    &mut db1,
                    &mut p1,
                )
                .unwrap();
                let e_ds = rel_err(&bf16_to_f64(&ds1), &bf16_to_f64(&ds0));
                let e_dg = rel_err(&f32_to_f64(&dg1), &f32_to_f64(&dg0));
                let e_db = rel_err(&f32_to_f64(&db1), &f32_to_f64(&db0));
                let e_p = rel_err(&f32_to_f64(&p1), &f32_to_f64(&p0));
                assert!(
                    e_ds <= 1e-2 && e_dg <= 1e-4 && e_db <= 1e-4 && e_p <= 1e-4,
                    "N={n} C={c} dres={with_dres} seed {seed}: ds {e_ds}, dgamma {e_dg}, dbeta {e_db}, partials {e_p}"
                );
            }
        }
    }

    /// Without a residual the forward normalises x itself and stores no sum: against the
    /// reference, and bit-identical to the forward with a zero residual (whose stored sum is
    /// x); the plan passes null for r and s. A residual without a sum to store, or the
    /// reverse, is refused.
    #[test]
    fn forward_without_residual_normalises_x() {
        use crate::exec::{run, Backend, HostBuf};
        let emu = Emu::default();
        for &(n, c) in SHAPES {
            let sh = LnShape { n, c, eps: 1e-5 };
            let seed = fresh_seed();
            let i = fwd_inputs(sh, seed);
            let bare = |e: Option<&Emu>| {
                let mut o = poisoned_fwd(sh);
                let (x, g, b) = (&i.x, &i.gamma, &i.beta);
                let (y, mean, rstd) = (&mut o.y, &mut o.mean, &mut o.rstd);
                match e {
                    Some(e) => layernorm_forward_emu(e, sh, x, None, g, b, None, y, mean, rstd),
                    None => layernorm_forward_cpu(sh, x, None, g, b, None, y, mean, rstd),
                }
                .unwrap();
                o.s = i.x.clone();
                o
            };
            let (want, got) = (bare(None), bare(Some(&emu)));
            let (bf, fp) = fwd_errors(&got, &want);
            assert!(
                bf <= 1e-2 && fp <= 1e-4,
                "N={n} C={c} seed {seed}: {bf} {fp}"
            );
            let zero = FwdIn {
                r: vec![bf16::ZERO; n * c],
                x: i.x.clone(),
                gamma: i.gamma.clone(),
                beta: i.beta.clone(),
            };
            let (with_zero, _) = run_fwd(&emu, sh, &zero);
            assert_eq!(with_zero.s, i.x, "N={n} C={c} seed {seed}: x + 0");
            assert_eq!(with_zero.y, got.y, "N={n} C={c} seed {seed}: y");
            assert_eq!(with_zero.rstd, got.rstd, "N={n} C={c} seed {seed}: rstd");
            let one = || HostBuf::Bf16(vec![BF16_POISON; 1]);
            let mut f = [
                HostBuf::Bf16(i.x.clone()),
                one(),
                HostBuf::Bf16(i.gamma.clone()),
                HostBuf::Bf16(i.beta.clone()),
                one(),
                HostBuf::Bf16(vec![BF16_POISON; n * c]),
                HostBuf::F32(vec![f32::NAN; n]),
                HostBuf::F32(vec![f32::NAN; n]),
            ];
            let ptrs: Vec<u64> = f.iter_mut().map(|b| b.host_ptr()).collect();
            // SAFETY: x, gamma, beta, y, mean and rstd have the shape's lengths; the plan
            // passes null for the one-element r and s slots.
            unsafe { run(Backend::Emu(&emu), &sh.norm_plan().unwrap(), &ptrs) }.unwrap();
            assert_eq!(f[5], HostBuf::Bf16(got.y.clone()), "planned y, seed {seed}");
            assert_eq!(
                f[7],
                HostBuf::F32(got.rstd.clone()),
                "planned rstd, seed {seed}"
            );
        }
        let sh = LnShape {
            n: 2,
            c: 8,
            eps: 1e-5,
        };
        let i = fwd_inputs(sh, 3);
        let mut o = poisoned_fwd(sh);
        let e = layernorm_forward_cpu(
            sh,
            &i.x,
            Some(&i.r),
            &i.gamma,
            &i.beta,
            None,
            &mut o.y,
            &mut o.mean,
            &mut o.rstd,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("exactly when a residual"), "{e}");
        let e = layernorm_forward_emu(
            &emu,
            sh,
            &i.x,
            None,
            &i.gamma,
            &i.beta,
            Some(&mut o.s),
            &mut o.y,
            &mut o.mean,
            &mut o.rstd,
        )
        .unwrap_err();
        assert!(format!("{e}").contains("exactly when a residual"), "{e}");
    }

    /// The plans run the same launches as the emulation launchers: bit-identical results.
    #[test]
    fn plans_match_launchers() {
        use crate::exec::{run, Backend, HostBuf};
        let emu = Emu::default();
        let sh = LnShape {
            n: 7,
            c: 96,
            eps: 1e-5,
        };
        let seed = fresh_seed();
        let i = fwd_inputs(sh, seed);
        let (want, _) = run_fwd(&emu, sh, &i);
        let nc = sh.n * sh.c;
        let mut f = fwd_slots(sh, &i);
        let ptrs: Vec<u64> = f.iter_mut().map(|b| b.host_ptr()).collect();
        // SAFETY: the buffers have the lengths the shape needs.
        unsafe { run(Backend::Emu(&emu), &sh.forward_plan().unwrap(), &ptrs) }.unwrap();
        assert_eq!(f[5], HostBuf::Bf16(want.y.clone()), "seed {seed}");
        assert_eq!(f[7], HostBuf::F32(want.rstd.clone()), "seed {seed}");
        let mut g = rng(seed ^ 1);
        let dy = random_bf16(&mut g, nc, -1.0, 1.0);
        let dres = random_bf16(&mut g, nc, -0.5, 0.5);
        let (mut ds, mut dg, mut db) = (vec![BF16_POISON; nc], vec![0.0; sh.c], vec![0.0; sh.c]);
        let mut part = vec![0.0; backward_scratch_len(sh)];
        layernorm_backward_emu(
            &emu,
            sh,
            &dy,
            &want.s,
            &i.gamma,
            &want.mean,
            &want.rstd,
            Some(&dres),
            &mut ds,
            &mut dg,
            &mut db,
            &mut part,
        )
        .unwrap();
        let mut b = vec![
            HostBuf::Bf16(dy),
            HostBuf::Bf16(want.s.clone()),
            HostBuf::Bf16(i.gamma.clone()),
            HostBuf::F32(want.mean.clone()),
            HostBuf::F32(want.rstd.clone()),
            HostBuf::Bf16(dres),
            HostBuf::Bf16(vec![BF16_POISON; nc]),
            HostBuf::F32(vec![f32::NAN; sh.c]),
            HostBuf::F32(vec![f32::NAN; sh.c]),
            HostBuf::F32(vec![f32::NAN; backward_scratch_len(sh)]),
        ];
        let ptrs: Vec<u64> = b.iter_mut().map(|x| x.host_ptr()).collect();
        // SAFETY: as above.
        unsafe { run(Backend::Emu(&emu), &sh.backward_plan(true).unwrap(), &ptrs) }.unwrap();
        assert_eq!(b[6], HostBuf::Bf16(ds), "seed {seed}");
        assert_eq!(b[7], HostBuf::F32(dg), "seed {seed}");
        assert_eq!(b[8], HostBuf::F32(db), "seed {seed}");
    }

    /// The one-warp-per-row forward through its plan (which passes N) gives the launcher's
    /// results bit for bit, with and without the residual.
    #[test]
    fn rows_plan_matches_launcher() {
        use crate::exec::{run, Backend, HostBuf};
        let emu = Emu::default();
        let sh = LnShape {
            n: 6,
            c: 512,
            eps: 1e-5,
        };
        assert_eq!(sh.forward_plan().unwrap()[0].kernel, "layernorm_fwd_rows");
        let seed = fresh_seed();
        let i = fwd_inputs(sh, seed);
        let (want, _) = run_fwd(&emu, sh, &i);
        let nc = sh.n * sh.c;
        for residual in [true, false] {
            let mut f = fwd_slots(sh, &i);
            let ptrs: Vec<u64> = f.iter_mut().map(|b| b.host_ptr()).collect();
            let plan = if residual {
                sh.forward_plan()
            } else {
                sh.norm_plan()
            }
            .unwrap();
            // SAFETY: the buffers have the lengths the shape needs.
            unsafe { run(Backend::Emu(&emu), &plan, &ptrs) }.unwrap();
            let mut y = vec![BF16_POISON; nc];
            let (mut m, mut r) = (vec![f32::NAN; sh.n], vec![f32::NAN; sh.n]);
            if residual {
                y.clone_from(&want.y);
                r.clone_from(&want.rstd);
            } else {
                layernorm_forward_emu(
                    &emu, sh, &i.x, None, &i.gamma, &i.beta, None, &mut y, &mut m, &mut r,
                )
                .unwrap();
            }
            assert_eq!(f[5], HostBuf::Bf16(y), "residual {residual} seed {seed}");
            assert_eq!(f[7], HostBuf::F32(r), "residual {residual} seed {seed}");
        }
    }

    /// The CPU reference itself against central differences of an f64 LayerNorm, so the
    /// emulated kernels are compared with something known to be the gradient.
    #[test]
    fn reference_backward_is_the_gradient() {
        let sh = LnShape {
            n: 2,
            c: 5,
            eps: 1e-5,
        };
        let seed = fresh_seed();
        let i = fwd_inputs(sh, seed);
        let mut f = poisoned_fwd(sh);
        layernorm_forward_cpu(
            sh,
            &i.x,
            Some(&i.r),
            &i.gamma,
            &i.beta,
            Some(&mut f.s),
            &mut f.y,
            &mut f.mean,
            &mut f.rstd,
        )
        .unwrap();
        let dy = random_bf16(&mut rng(seed ^ 2), 10, -1.0, 1.0);
        let (mut ds, mut dg, mut db, mut p) = (
            vec![bf16::ZERO; 10],
            vec![0.0; 5],
            vec![0.0; 5],
            vec![0.0; backward_scratch_len(sh)],
        );
        layernorm_backward_cpu(
            sh, &dy, &f.s, &i.gamma, &f.mean, &f.rstd, None, &mut ds, &mut dg, &mut db, &mut p,
        )
        .unwrap();
        // L = Σ dy · LN(s) in f64, as a function of s and gamma.
        let loss = |s: &[f64], gm: &[f64]| -> f64 {
            let mut l = 0.0;
            for n in 0..2 {
                let row = &s[n * 5..n * 5 + 5];
                let mu = row.iter().sum::<f64>() / 5.0;
                let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / 5.0;
                let rs = 1.0 / (var + 1e-5).sqrt();
                for j in 0..5 {
                    l += f64::from(dy[n * 5 + j].to_f32())
                        * ((row[j] - mu) * rs * gm[j] + f64::from(i.beta[j].to_f32()));
                }
            }
            l
        };
        let s0: Vec<f64> = bf16_to_f64(&f.s);
        let g0: Vec<f64> = bf16_to_f64(&i.gamma);
        let h = 1e-6;
        for k in 0..10 {
            let (mut sp, mut sm) = (s0.clone(), s0.clone());
            sp[k] += h;
            sm[k] -= h;
            let num = (loss(&sp, &g0) - loss(&sm, &g0)) / (2.0 * h);
            let got = f64::from(ds[k].to_f32());
            assert!(
                (num - got).abs() <= 1e-2 * num.abs().max(1.0),
                "ds[{k}]: {got} vs {num} (seed {seed})"
            );
        }
        for j in 0..5 {
            let (mut gp, mut gm) = (g0.clone(), g0.clone());
            gp[j] += h;
            gm[j] -= h;
            let num = (loss(&s0, &gp) - loss(&s0, &gm)) / (2.0 * h);
            assert!(
                (num - f64::from(dg[j])).abs() <= 1e-5 * num.abs().max(1.0),
                "dgamma[{j}]: {} vs {num}",
                dg[j]
            );
        }
    }

    /// The same comparison on a GPU when one is present (`Device::select(Auto)`); on a machine
    /// without a driver this test only checks that selection falls back to the CPU.
    #[test]
    fn gpu_matches_reference_when_present() {
        let gpu = match crate::device::Device::select(crate::device::DeviceRequest::Auto).unwrap() {
            crate::device::Device::Cuda(g) => g,
            crate::device::Device::Cpu => {
                eprintln!("no GPU: layernorm GPU test not run");
                return;
            }
        };
        let st = gpu.stream().clone();
        let from_bits = |v: Vec<u16>| v.into_iter().map(bf16::from_bits).collect::<Vec<bf16>>();
        for &(n, c) in SHAPES {
            let sh = LnShape { n, c, eps: 1e-5 };
            let seed = fresh_seed();
            let i = fwd_inputs(sh, seed);
            let mut want = poisoned_fwd(sh);
            layernorm_forward_cpu(
                sh,
                &i.x,
                Some(&i.r),
                &i.gamma,
                &i.beta,
                Some(&mut want.s),
                &mut want.y,
                &mut want.mean,
                &mut want.rstd,
            )
            .unwrap();
            let poison = poisoned_fwd(sh);
            let (x, r) = (
                st.clone_htod(bf16_bits(&i.x)).unwrap(),
                st.clone_htod(bf16_bits(&i.r)).unwrap(),
            );
            let (g, b) = (
                st.clone_htod(bf16_bits(&i.gamma)).unwrap(),
                st.clone_htod(bf16_bits(&i.beta)).unwrap(),
            );
            let (mut s, mut y) = (
                st.clone_htod(bf16_bits(&poison.s)).unwrap(),
                st.clone_htod(bf16_bits(&poison.y)).unwrap(),
            );
            let (mut m, mut v) = (
                st.clone_htod(&poison.mean).unwrap(),
                st.clone_htod(&poison.rstd).unwrap(),
            );
            layernorm_forward_cuda(
                &gpu,
                sh,
                &x,
                Some(&r),
                &g,
                &b,
                Some(&mut s),
                &mut y,
                &mut m,
                &mut v,
            )
            .unwrap();
            let got = FwdOut {
                s: from_bits(st.dtoh_synced(&s).unwrap()),
                y: from_bits(st.dtoh_synced(&y).unwrap()),
                mean: st.dtoh_synced(&m).unwrap(),
                rstd: st.dtoh_synced(&v).unwrap(),
            };
            let (bf, fp) = fwd_errors(&got, &want);
            assert!(
                bf <= 1e-2 && fp <= 1e-4,
                "GPU N={n} C={c} seed {seed}: bf16 {bf}, fp32 {fp}"
            );

            let dy = random_bf16(&mut rng(seed ^ 1), n * c, -1.0, 1.0);
            let len = backward_scratch_len(sh);
            let (mut ds0, mut dg0, mut db0, mut p0) = (
                vec![BF16_POISON; n * c],
                vec![f32::NAN; c],
                vec![f32::NAN; c],
                vec![f32::NAN; len],
            );
            layernorm_backward_cpu(
                sh, &dy, &want.s, &i.gamma, &want.mean, &want.rstd, None, &mut ds0, &mut dg0,
                &mut db0, &mut p0,
            )
            .unwrap();
            let ddy = st.clone_htod(bf16_bits(&dy)).unwrap();
            let mut dds = st.clone_htod(bf16_bits(&vec![BF16_POISON; n * c])).unwrap();
            let (mut ddg, mut ddb) = (
                st.clone_htod(&vec![f32::NAN; c]).unwrap(),
                st.clone_htod(&vec![f32::NAN; c]).unwrap(),
            );
            let mut dp = st.clone_htod(&vec![f32::NAN; len]).unwrap();
            layernorm_backward_cuda(
                &gpu, sh, &ddy, &s, &g, &m, &v, None, &mut dds, &mut ddg, &mut ddb, &mut dp,
            )
            .unwrap();
            let e_ds = rel_err(
                &bf16_to_f64(&from_bits(st.dtoh_synced(&dds).unwrap())),
                &bf16_to_f64(&ds0),
            );
            let e_dg = rel_err(
                &f32_to_f64(&st.dtoh_synced(&ddg).unwrap()),
                &f32_to_f64(&dg0),
            );
            let e_db = rel_err(
                &f32_to_f64(&st.dtoh_synced(&ddb).unwrap()),
                &f32_to_f64(&db0),
            );
            assert!(
                e_ds <= 1e-2 && e_dg <= 1e-4 && e_db <= 1e-4,
                "GPU N={n} C={c} seed {seed}: ds {e_ds}, dgamma {e_dg}, dbeta {e_db}"
            );
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let sh = LnShape {
            n: 2,
            c: 8,
            eps: 1e-5,
        };
        let i = fwd_inputs(sh, 1);
        let mut o = poisoned_fwd(sh);
        o.y.pop();
        let e = layernorm_forward_emu(
            &Emu::default(),
            sh,
            &i.x,
            Some(&i.r),
            &i.gamma,
            &i.beta,
            Some(&mut o.s),
            &mut o.y,
            &mut o.mean,
            &mut o.rstd,
        )
        .unwrap_err();
        assert!(
            format!("{e}").contains("`y` holds 15 elements, the shape needs 16"),
            "{e}"
        );
    }
}
