//! Where the kernels of a training step run: a CUDA device, or the CPU emulation of the same
//! CUDA sources (slow; for tests and small configs). Parsed from the same `--device` strings
//! as the rest of the command line, with `emu` added.

use super::arena::{Arena, Layout};
use anyhow::{anyhow, Result};
use mmkd_kernels::device::{Device as KDevice, DeviceRequest, Gpu};
use mmkd_kernels::emu::Emu;
use mmkd_kernels::gemm::GemmPath;
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

    /// `cuda:N` or `emu`, for reports.
    pub fn label(&self) -> String {
        match self {
            KernelTarget::Gpu(g) => format!("cuda:{}", g.ordinal),
            KernelTarget::Emu => "emu".into(),
        }
    }

    /// The tensor-core instruction of the blocks' products: `wgmma` on an sm_90 GPU (Hopper)
    /// and under the emulation (which so runs what an H100/H200 runs), `mma.sync` on other
    /// GPUs. `MMKD_GEMM_PATH=mma`, `=wgmma` or `=tma` (wgmma with the operands copied by the
    /// tensor copy engine) overrides the choice (the last two need sm_90).
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
            Some(other) => Err(anyhow!(
                "MMKD_GEMM_PATH must be `mma`, `wgmma` or `tma`, got `{other}`"
            )),
        }
    }

    /// [`KernelTarget::gemm_path`], checked on a GPU before use: a `wgmma` path whose
    /// products disagree with the CPU reference on this device
    /// ([`mmkd_kernels::gemm::check_path_cuda`]; or whose launch fails) is reported on stderr and replaced by `mma.sync`, so a
    /// training run never trains on wrong products. The emulation is the reference semantics
    /// and is not checked.
    pub fn checked_gemm_path(&self) -> Result<GemmPath> {
        let path = self.gemm_path()?;
        let KernelTarget::Gpu(g) = self else {
            return Ok(path);
        };
        if path == GemmPath::MmaSync {
            return Ok(path);
        }
        let why = match mmkd_kernels::gemm::check_path_cuda(g, path) {
            Ok(cs) => match cs.iter().find(|c| !c.passed()) {
                None => return Ok(path),
                Some(c) => format!(
                    "{:?}: relative error {:.2e}, bias gradient {:?}, against the CPU reference",
                    c.shape.layout, c.rel_err, c.dbias_rel_err
                ),
            },
            Err(e) => format!("{e:#}"),
        };
        eprintln!(
            "warning: the `{}` GEMMs fail their check on {} ({why}); the products run on \
             `mma.sync` instead",
            path.name(),
            self.label()
        );
        Ok(GemmPath::MmaSync)
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
