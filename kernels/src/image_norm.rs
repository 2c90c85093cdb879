//! Image normalisation on the device (`cuda/image_norm.cu`): u8 `[B, 3, H, W]` crops →
//! `(x / 255 − mean_c) / std_c` as bf16, with an optional per-sample horizontal flip. CPU
//! reference, emulation and GPU launchers with the same parameters, and tests.

use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{self, stride_shape, Backend, DevArgs, Step, P};
use crate::launch::{check_len, Arg};
use crate::registry::IMAGE_NORM;
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// Batch geometry and the per-channel statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageNormConfig {
    /// Images B.
    pub b: usize,
    /// Height H.
    pub h: usize,
    /// Width W.
    pub w: usize,
    /// Per-channel mean (of x / 255).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (of x / 255), all > 0.
    pub std: [f32; 3],
}

/// CLIP's image statistics (open_clip `OPENAI_DATASET_MEAN` / `_STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// See [`CLIP_MEAN`].
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ImageNormConfig {
    fn len(&self) -> usize {
        self.b * 3 * self.h * self.w
    }
    fn check(&self, src: usize, flip: Option<usize>, dst: usize) -> Result<()> {
        ensure!(self.len() > 0, "image_normalize: empty batch {self:?}");
        ensure!(
            self.std.iter().all(|s| *s > 0.0 && s.is_finite()),
            "image_normalize: std must be positive, got {:?}",
            self.std
        );
        Arg::int("image_normalize B*3*H*W", self.len())?;
        check_len("image_normalize", "src", src, self.len())?;
        if let Some(f) = flip {
            check_len("image_normalize", "flip", f, self.b)?;
        }
        check_len("image_normalize", "dst", dst, self.len())
    }
    /// Slots 0 src, 1 flip (or null), 2 dst.
    fn plan(&self, flip: bool) -> Vec<Step> {
        let sc = |c: usize| P::F32(1.0 / (255.0 * self.std[c]));
        let bi = |c: usize| P::F32(-self.mean[c] / self.std[c]);
        vec![Step {
            file: &IMAGE_NORM,
            kernel: "image_normalize",
            shape: stride_shape(self.len()),
            args: vec![
                P::Buf(0),
                if flip { P::Buf(1) } else { P::Null },
                P::Buf(2),
                sc(0),
                sc(1),
                sc(2),
                bi(0),
                bi(1),
                bi(2),
                P::I32(self.b as i32),
                P::I32(self.h as i32),
                P::I32(self.w as i32),
            ],
        }]
    }
}

/// CPU reference (f64 arithmetic).
pub fn image_normalize_cpu(
    cfg: &ImageNormConfig,
    src: &[u8],
    flip: Option<&[u8]>,
    dst: &mut [bf16],
) -> Result<()> {
    cfg.check(src.len(), flip.map(|f| f.len()), dst.len())?;
    let (h, w) = (cfg.h, cfg.w);
    for b in 0..cfg.b {
        let fl = flip.is_some_and(|f| f[b] != 0);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let xs = if fl { w - 1 - x } else { x };
                    let base = ((b * 3 + c) * h + y) * w;
                    let v = (f64::from(src[base + xs]) / 255.0 - f64::from(cfg.mean[c]))
                        / f64::from(cfg.std[c]);
                    dst[base + x] = bf16::from_f64(v);
                }
            }
        }
    }
    Ok(())
}

/// The kernel under the emulation; same parameters as [`image_normalize_cpu`].
pub fn image_normalize_emu(
    emu: &Emu,
    cfg: &ImageNormConfig,
    src: &[u8],
    flip: Option<&[u8]>,
    dst: &mut [bf16],
) -> Result<()> {
    cfg.check(src.len(), flip.map(|f| f.len()), dst.len())?;
    let ptrs = [
        src.as_ptr() as u64,
        flip.map_or(0, |f| f.as_ptr() as u64),
        dst.as_mut_ptr() as u64,
    ];
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Emu(emu), &cfg.plan(flip.is_some()), &ptrs) }
}

/// The kernel on a GPU; same parameters as [`image_normalize_cpu`], device buffers.
pub fn image_normalize_cuda(
    gpu: &Gpu,
    cfg: &ImageNormConfig,
    src: &CudaSlice<u8>,
    flip: Option<&CudaSlice<u8>>,
    dst: &mut CudaSlice<u16>,
) -> Result<()> {
    cfg.check(src.len(), flip.map(|f| f.len()), dst.len())?;
    let mut a = DevArgs::new(gpu.stream());
    a.r(src);
    match flip {
        Some(f) => a.r(f),
        None => a.null(),
    }
    a.w(dst);
    // SAFETY: lengths checked above.
    unsafe { exec::run(Backend::Gpu(gpu), &cfg.plan(flip.is_some()), &a.ptrs) }
}

/// The launch plan (slots 0 src, 1 flip or null, 2 dst), for the self-test.
pub fn plan(cfg: &ImageNormConfig, flip: bool) -> Vec<Step> {
    cfg.plan(flip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bf16_to_f64, fresh_seed, rel_err, rng, BF16_POISON};
    use rand::Rng;

    #[test]
    fn matches_reference_with_and_without_flip() {
        for (b, h, w) in [(1, 1, 1), (2, 3, 5), (3, 7, 16), (2, 17, 31)] {
            let seed = fresh_seed();
            let mut r = rng(seed);
            let cfg = ImageNormConfig {
                b,
                h,
                w,
                mean: CLIP_MEAN,
                std: CLIP_STD,
            };
            let src: Vec<u8> = (0..cfg.len()).map(|_| r.gen()).collect();
            let flip: Vec<u8> = (0..b).map(|i| (i % 2) as u8).collect();
            for f in [None, Some(flip.as_slice())] {
                let (mut want, mut got) =
                    (vec![BF16_POISON; cfg.len()], vec![BF16_POISON; cfg.len()]);
                image_normalize_cpu(&cfg, &src, f, &mut want).unwrap();
                image_normalize_emu(&Emu::default(), &cfg, &src, f, &mut got).unwrap();
                let e = rel_err(&bf16_to_f64(&got), &bf16_to_f64(&want));
                assert!(
                    e <= 1e-2,
                    "B={b} H={h} W={w} flip={} seed {seed}: {e}",
                    f.is_some()
                );
            }
        }
    }

    #[test]
    fn flip_mirrors_rows() {
        let cfg = ImageNormConfig {
            b: 1,
            h: 1,
            w: 3,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        let src = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut out = vec![BF16_POISON; 9];
        image_normalize_emu(&Emu::default(), &cfg, &src, Some(&[1]), &mut out).unwrap();
        let v: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
        assert_eq!(v, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 9.0, 8.0, 7.0]);
        let e = image_normalize_emu(&Emu::default(), &cfg, &src[..8], None, &mut out).unwrap_err();
        assert!(format!("{e}").contains("`src` holds 8"), "{e}");
    }
}
