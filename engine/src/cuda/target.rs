//! Where the kernels of a training step run: a CUDA device, or the CPU emulation of the same
//! CUDA sources (slow; for tests and small configs). Parsed from the same `--device` strings
//! as the rest of the command line, with `emu` added.

use super::arena::{Arena, Layout};
use anyhow::{anyhow, bail, Result};
use mmkd_kernels::device::{Device as KDevice, DeviceRequest, Gpu};
use mmkd_kernels::emu::Emu;
use mmkd_kernels::gemm::{GemmCheck, GemmPath};
use std::sync::Arc;

/// A backend for [`Arena`]s.
#[derive(Clone)]
pub enum KernelTarget {
    /// A CUDA device.
    Gpu(Arc<Gpu>),
    /// The CPU emulation of the CUDA sources.
    Emu,
}

impl std::fmt::Debug for KernelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl KernelTarget {
    /// Resolves a `--device` string: `emu` is the emulation, `cuda`/`cuda:N` a GPU (an error
    /// without a driver or device), `auto` a GPU when one is usable; `cpu` and `auto` without a
    /// GPU give `None` (the engine's CPU backend).
    pub fn resolve(device: &str) -> Result<Option<KernelTarget>> {
        if device == "emu" {
            return Ok(Some(KernelTarget::Emu));
        }
        let req: DeviceRequest = device
            .parse()
            .map_err(|e: anyhow::Error| e.context("`emu` runs the kernels under emulation"))?;
        Ok(match KDevice::select(req)? {
            KDevice::Cpu => None,
            KDevice::Cuda(g) => Some(KernelTarget::Gpu(g)),
        })
    }

    /// [`mmkd_kernels::Gpu::profiler_capture`] on a GPU; nothing under the emulation.
    pub fn profiler_capture(&self, on: bool) -> Result<()> {
        match self {
            KernelTarget::Gpu(g) => g.profiler_capture(on),
            KernelTarget::Emu => Ok(()),
        }
    }

    /// `cuda:N` or `emu`, for reports.
    pub fn label(&self) -> String {
        match self {
            KernelTarget::Gpu(g) => format!("cuda:{}", g.ordinal),
            KernelTarget::Emu => "emu".into(),
        }
    }

    /// The tensor-core instruction of the blocks' products: `wgmma` on an sm_90 GPU (Hopper)
    /// and under the emulation (which so runs what an H100/H200 runs), `mma.sync` on other
    /// GPUs. `MMKD_GEMM_PATH=mma`, `=wgmma`, `=tma` (wgmma with the operands copied by the
    /// tensor copy engine) or `=ws` (the persistent warp-specialised wgmma kernels) overrides
    /// the choice (the last three need sm_90).
    pub fn gemm_path(&self) -> Result<GemmPath> {
        let hopper = match self {
            KernelTarget::Gpu(g) => g.capability == (9, 0),
            KernelTarget::Emu => true,
        };
        let hopper_only = |p: GemmPath, name: &str| {
            if hopper {
                Ok(p)
            } else {
                Err(anyhow!(
                    "MMKD_GEMM_PATH={name} needs an sm_90 GPU; {} is not one",
                    self.label()
                ))
            }
        };
        match std::env::var("MMKD_GEMM_PATH").ok().as_deref() {
            None | Some("") => Ok(if hopper {
                GemmPath::Wgmma
            } else {
                GemmPath::MmaSync
            }),
            Some("mma") => Ok(GemmPath::MmaSync),
            Some("wgmma") => hopper_only(GemmPath::Wgmma, "wgmma"),
            Some("tma") => hopper_only(GemmPath::WgmmaTma, "tma"),
            Some("ws") => hopper_only(GemmPath::WgmmaWs, "ws"),
            Some(other) => Err(anyhow!(
                "MMKD_GEMM_PATH must be `mma`, `wgmma`, `tma` or `ws`, got `{other}`"
            )),
        }
    }

    /// [`KernelTarget::gemm_path`], checked on a GPU before use
    /// ([`mmkd_kernels::gemm::check_path_cuda`]: each layout against the CPU reference). A
    /// `wgmma` path that fails (or whose launch fails) is reported on stderr and replaced by
    /// `mma.sync` if that one passes; when `mma.sync` fails too (the epilogue is shared code),
    /// or it was the path and fails, this is an error: a run never trains on wrong products. A
    /// fault inside a kernel loses the context, so after one the error says to rerun on
    /// `mma.sync` (`MMKD_GEMM_PATH=mma`) instead of checking it in a dead context.
    /// The emulation is the reference semantics and is not checked.
    pub fn checked_gemm_path(&self) -> Result<GemmPath> {
        let path = self.gemm_path()?;
        let KernelTarget::Gpu(g) = self else {
            return Ok(path);
        };
        choose_gemm_path(path, &self.label(), |p| {
            mmkd_kernels::gemm::check_path_cuda(g, p)
        })
    }

    /// A zeroed arena for `layout` on this backend.
    pub fn arena(&self, layout: Layout) -> Result<Arena> {
        match self {
            KernelTarget::Gpu(g) => Arena::device(layout, g.clone()),
            KernelTarget::Emu => Ok(Arena::host(layout, Emu::default())),
        }
    }

    /// Device memory in use on the GPU (every context on it), in bytes; `None` under the
    /// emulation.
    pub fn device_used_bytes(&self) -> Result<Option<u64>> {
        match self {
            KernelTarget::Gpu(g) => {
                let (free, total) = g
                    .context()
                    .mem_get_info()
                    .map_err(|e| anyhow!("cuMemGetInfo failed: {e:?}"))?;
                Ok(Some(total.saturating_sub(free) as u64))
            }
            KernelTarget::Emu => Ok(None),
        }
    }
}

/// Why `path` fails its check (`check`: the GEMM checks of one path), or `None` when it passes.
fn check_failure(
    path: GemmPath,
    check: &impl Fn(GemmPath) -> Result<Vec<GemmCheck>>,
) -> Option<String> {
    match check(path) {
        Ok(cs) => cs.iter().find(|c| !c.passed()).map(|c| {
            format!(
                "{:?} (split K {}): relative error {:.2e}, bias gradient {:?}, against the CPU reference",
                c.shape.layout, c.split_k, c.rel_err, c.dbias_rel_err
            )
        }),
        Err(e) => Some(format!("{e:#}")),
    }
}

/// True when `error` names a CUDA error that leaves the context unusable (a fault inside a
/// kernel: every later call in the process fails with it), or a kernel that never finished.
fn context_lost(error: &str) -> bool {
    mmkd_kernels::Gpu::is_hang(error)
        || [
            "CUDA_ERROR_ILLEGAL_ADDRESS",
            "CUDA_ERROR_MISALIGNED_ADDRESS",
            "CUDA_ERROR_ILLEGAL_INSTRUCTION",
            "CUDA_ERROR_INVALID_ADDRESS_SPACE",
            "CUDA_ERROR_INVALID_PC",
            "CUDA_ERROR_HARDWARE_STACK_ERROR",
            "CUDA_ERROR_LAUNCH_FAILED",
            "CUDA_ERROR_LAUNCH_TIMEOUT",
            "CUDA_ERROR_ASSERT",
        ]
        .iter()
        .any(|c| error.contains(c))
}

/// The path [`KernelTarget::checked_gemm_path`] settles on, given the checks of each path on
/// the device `label`.
fn choose_gemm_path(
    path: GemmPath,
    label: &str,
    check: impl Fn(GemmPath) -> Result<Vec<GemmCheck>>,
) -> Result<GemmPath> {
    let Some(why) = check_failure(path, &check) else {
        return Ok(path);
    };
    // A fault inside a kernel (an illegal address, say) leaves the CUDA context unusable, so
    // checking the fallback in this process would only fail too and blame it.
    if path != GemmPath::MmaSync && context_lost(&why) {
        bail!(
            "the `{}` GEMMs faulted on {label} ({why}); the CUDA context is lost: rerun with \
             MMKD_GEMM_PATH=mma to train on the `mma.sync` products",
            path.name()
        );
    }
    if path != GemmPath::MmaSync {
        if let Some(fallback) = check_failure(GemmPath::MmaSync, &check) {
            bail!(
                "the GEMMs fail their check on {label} on both `{}` ({why}) and `mma` \
                 ({fallback}); refusing to train on wrong products",
                path.name()
            );
        }
        eprintln!(
            "warning: the `{}` GEMMs fail their check on {label} ({why}); the products run on \
             `mma.sync` instead",
            path.name()
        );
        return Ok(GemmPath::MmaSync);
    }
    bail!(
        "the `mma` GEMMs fail their check on {label} ({why}); refusing to train on wrong products"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmkd_kernels::gemm::{Activation, GemmLayout, GemmShape};

    fn checks(err: f64) -> Vec<GemmCheck> {
        [
            GemmLayout::Forward,
            GemmLayout::InputGrad,
            GemmLayout::WeightGrad,
        ]
        .into_iter()
        .map(|layout| GemmCheck {
            shape: GemmShape {
                layout,
                batch: 1,
                m: 8,
                n: 8,
                k: 8,
                act: Activation::None,
            },
            path: GemmPath::MmaSync,
            split_k: 1,
            seed: 1,
            rel_err: if layout == GemmLayout::InputGrad {
                err
            } else {
                1e-3
            },
            dbias_rel_err: None,
        })
        .collect()
    }

    /// Passing paths are kept; a failing wgmma path falls back to a passing mma.sync; a
    /// failure of mma.sync, as the path or as the fallback, or a NaN, is an error.
    #[test]
    fn a_failing_path_falls_back_only_to_a_passing_one() {
        let ok = |_: GemmPath| Ok(checks(1e-3));
        assert_eq!(
            choose_gemm_path(GemmPath::Wgmma, "dev", ok).unwrap(),
            GemmPath::Wgmma
        );
        let only_mma = |p: GemmPath| Ok(checks(if p == GemmPath::MmaSync { 1e-3 } else { 0.5 }));
        assert_eq!(
            choose_gemm_path(GemmPath::WgmmaTma, "dev", only_mma).unwrap(),
            GemmPath::MmaSync
        );
        let launch_fails = |p: GemmPath| {
            if p == GemmPath::MmaSync {
                Ok(checks(1e-3))
            } else {
                Err(anyhow!("launch failed"))
            }
        };
        assert_eq!(
            choose_gemm_path(GemmPath::Wgmma, "dev", launch_fails).unwrap(),
            GemmPath::MmaSync
        );
        // A fault, or a kernel that never finishes (`Gpu::finish_within`), loses the context:
        // no fallback is tried in this process.
        for lost in [
            "gemm: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")",
            "gemm check (ws, Forward): a kernel never finished within 20 s",
        ] {
            let check = |p: GemmPath| {
                if p == GemmPath::MmaSync {
                    Ok(checks(1e-3))
                } else {
                    Err(anyhow!("{lost}"))
                }
            };
            let e = choose_gemm_path(GemmPath::WgmmaWs, "dev", check).unwrap_err();
            assert!(format!("{e}").contains("MMKD_GEMM_PATH=mma"), "{lost}: {e}");
        }
        let none = |_: GemmPath| Ok(checks(f64::NAN));
        let e = choose_gemm_path(GemmPath::Wgmma, "dev", none).unwrap_err();
        assert!(format!("{e}").contains("on both `wgmma`"), "{e}");
        let e = choose_gemm_path(GemmPath::MmaSync, "dev", none).unwrap_err();
        assert!(format!("{e}").contains("the `mma` GEMMs fail"), "{e}");
    }
}
