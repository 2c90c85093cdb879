//! The kernel sources, embedded in the binary, and what each needs.
//!
//! Adding a kernel file: put `cuda/<name>.cu` next to the others (it includes `prelude.cuh`
//! first and ends each kernel with `MMKD_EXPORT(kernel)`), add a [`KernelFile`] constant here
//! and list it in [`KERNEL_FILES`]. `build.rs` picks the file up for the emulation by itself.

/// The prelude every kernel source includes.
pub const PRELUDE: &str = include_str!("../cuda/prelude.cuh");

/// The oldest architecture a kernel file compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinArch {
    /// Ampere and newer (mma.sync, ldmatrix, cp.async): sm_80, sm_90.
    Sm80,
    /// Hopper's arch-specific target (wgmma, setmaxnreg): sm_90a only.
    Sm90a,
}

/// One `.cu` file: its name, embedded source and the kernels it defines.
#[derive(Debug)]
pub struct KernelFile {
    /// Short name, also the file stem (`layernorm` for `cuda/layernorm.cu`).
    pub name: &'static str,
    /// The source as written (`#include "prelude.cuh"` not yet expanded).
    pub source: &'static str,
    /// Kernel entry points (`MMKD_KERNEL` functions).
    pub entries: &'static [&'static str],
    /// Oldest architecture the file compiles for.
    pub min_arch: MinArch,
    /// Kernels that must show tensor-core instructions (HMMA/HGMMA) in their SASS; the compile
    /// gate fails when they are missing or the SASS cannot be read.
    pub tensor_core_entries: &'static [&'static str],
    /// Kernels that must show tensor copies (UTMALDG) in their SASS, checked the same way.
    pub tma_entries: &'static [&'static str],
}

impl KernelFile {
    /// The source with the prelude pasted in place of its include, as NVRTC compiles it.
    pub fn expanded_source(&self) -> String {
        self.source.replacen("#include \"prelude.cuh\"", PRELUDE, 1)
    }
}

/// LayerNorm fused with the residual add, forward and backward.
pub const LAYERNORM: KernelFile = KernelFile {
    name: "layernorm",
    source: include_str!("../cuda/layernorm.cu"),
    entries: &[
        "layernorm_fwd",
        "layernorm_fwd_rows",
        "layernorm_bwd",
        "layernorm_bwd_rows",
        "layernorm_bwd_reduce",
    ],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &[],
    tma_entries: &[],
};

/// One-warp kernels that test the matrix-fragment instructions.
pub const FRAGMENT_TEST: KernelFile = KernelFile {
    name: "fragment_test",
    source: include_str!("../cuda/fragment_test.cu"),
    entries: &["frag_mma_direct", "frag_mma_ldmatrix", "frag_ldmatrix_dump"],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &["frag_mma_direct", "frag_mma_ldmatrix"],
    tma_entries: &[],
};

/// The three products on Hopper's `wgmma`, same parameters and epilogues as `gemm.cu`'s.
pub const GEMM_WGMMA: KernelFile = KernelFile {
    name: "gemm_wgmma",
    source: include_str!("../cuda/gemm_wgmma.cu"),
    entries: &["gemm_fwd_wgmma", "gemm_dgrad_wgmma", "gemm_wgrad_wgmma"],
    min_arch: MinArch::Sm90a,
    tensor_core_entries: &["gemm_fwd_wgmma", "gemm_dgrad_wgmma", "gemm_wgrad_wgmma"],
    tma_entries: &[],
};

/// The three products on `wgmma` with the operand tiles copied by the tensor copy engine (TMA).
pub const GEMM_WGMMA_TMA: KernelFile = KernelFile {
    name: "gemm_wgmma_tma",
    source: include_str!("../cuda/gemm_wgmma_tma.cu"),
    entries: &["gemm_fwd_tma", "gemm_dgrad_tma", "gemm_wgrad_tma"],
    min_arch: MinArch::Sm90a,
    tensor_core_entries: &["gemm_fwd_tma", "gemm_dgrad_tma", "gemm_wgrad_tma"],
    tma_entries: &["gemm_fwd_tma", "gemm_dgrad_tma", "gemm_wgrad_tma"],
};

/// The three products on `wgmma`, persistent and warp-specialised: a TMA producer warpgroup
/// and two consumer warpgroups on 128 × 256 tiles.
pub const GEMM_WS: KernelFile = KernelFile {
    name: "gemm_ws",
    source: include_str!("../cuda/gemm_ws.cu"),
    entries: &["gemm_fwd_ws", "gemm_dgrad_ws", "gemm_wgrad_ws"],
    min_arch: MinArch::Sm90a,
    tensor_core_entries: &["gemm_fwd_ws", "gemm_dgrad_ws", "gemm_wgrad_ws"],
    tma_entries: &["gemm_fwd_ws", "gemm_dgrad_ws", "gemm_wgrad_ws"],
};

/// One warpgroup through `wgmma` (Hopper): tests the emulation's descriptors and layouts.
pub const WGMMA_TEST: KernelFile = KernelFile {
    name: "wgmma_test",
    source: include_str!("../cuda/wgmma_test.cu"),
    entries: &["frag_wgmma", "frag_wgmma_mn"],
    min_arch: MinArch::Sm90a,
    tensor_core_entries: &["frag_wgmma", "frag_wgmma_mn"],
    tma_entries: &[],
};

/// Kernels that pin down the emulation's warp and memory semantics.
pub const EMU_TEST: KernelFile = KernelFile {
    name: "emu_test",
    source: include_str!("../cuda/emu_test.cu"),
    entries: &[
        "emu_warp_ops",
        "emu_exit_before_barrier",
        "emu_shfl_after_exit",
        "emu_cp_async_order",
        "emu_copy_n",
        "emu_smem_n",
        "emu_local_n",
    ],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &[],
    tma_entries: &[],
};

/// The multi-teacher distillation loss (forward and backward, fused; no N×N matrix stored).
pub const MT_LOSS: KernelFile = KernelFile {
    name: "mt_loss",
    source: include_str!("../cuda/mt_loss.cu"),
    entries: &[
        "mtl_normalize_f32",
        "mtl_normalize_bf16",
        "mtl_targets_f32",
        "mtl_targets_bf16",
        "mtl_row_stats",
        "mtl_grad_rows",
        "mtl_row_stats_tc",
        "mtl_grad_rows_tc",
        "mtl_finish",
        "mtl_reduce",
    ],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &["mtl_row_stats_tc", "mtl_grad_rows_tc"],
    tma_entries: &[],
};

/// AdamW over all parameters and the global gradient norm.
pub const ADAMW: KernelFile = KernelFile {
    name: "adamw",
    source: include_str!("../cuda/adamw.cu"),
    entries: &["grad_sumsq", "grad_norm_finish", "adamw_step"],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &[],
    tma_entries: &[],
};

/// u8 crops to normalised bf16, with the horizontal flip.
pub const IMAGE_NORM: KernelFile = KernelFile {
    name: "image_norm",
    source: include_str!("../cuda/image_norm.cu"),
    entries: &["image_normalize"],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &[],
    tma_entries: &[],
};

/// Casts, axpby, embedding gather/scatter-add, GELU/QuickGELU, row softmax.
pub const ELEMENTWISE: KernelFile = KernelFile {
    name: "elementwise",
    source: include_str!("../cuda/elementwise.cu"),
    entries: &[
        "cast_f32_bf16",
        "cast_bf16_f32",
        "axpby_f32",
        "axpby_bf16",
        "embedding_gather",
        "embedding_scatter_add",
        "act_fwd",
        "act_bwd",
        "softmax_rows",
    ],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &[],
    tma_entries: &[],
};

/// Tensor-core GEMM with fused epilogues: forward, input-gradient and weight-gradient layouts.
pub const GEMM: KernelFile = KernelFile {
    name: "gemm",
    source: include_str!("../cuda/gemm.cu"),
    entries: &["gemm_fwd", "gemm_dgrad", "gemm_wgrad", "gemm_splitk_reduce"],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &["gemm_fwd", "gemm_dgrad", "gemm_wgrad"],
    tma_entries: &[],
};

/// Fused attention (head dim 64), forward and backward.
pub const ATTENTION: KernelFile = KernelFile {
    name: "attention",
    source: include_str!("../cuda/attention.cu"),
    entries: &["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"],
    min_arch: MinArch::Sm80,
    tensor_core_entries: &["attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"],
    tma_entries: &[],
};

/// Every kernel file, in the order `mmkd kernels check` reports them.
pub const KERNEL_FILES: &[&KernelFile] = &[
    &LAYERNORM,
    &FRAGMENT_TEST,
    &WGMMA_TEST,
    &EMU_TEST,
    &MT_LOSS,
    &ADAMW,
    &IMAGE_NORM,
    &ELEMENTWISE,
    &GEMM,
    &GEMM_WGMMA,
    &GEMM_WGMMA_TMA,
    &GEMM_WS,
    &ATTENTION,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kernel `src` defines with its parameter count (commas of its parameter list).
    fn kernel_params(src: &str) -> Vec<(String, usize)> {
        kernel_names(src)
            .into_iter()
            .map(|name| {
                let at = src.find(&format!("{name}(")).unwrap_or(0) + name.len() + 1;
                let list = src[at..].split(')').next().unwrap_or("");
                (
                    name,
                    list.split(',').filter(|p| !p.trim().is_empty()).count(),
                )
            })
            .collect()
    }

    /// The names of the kernels `src` defines: `MMKD_KERNEL void NAME(`, with an optional
    /// `__launch_bounds__(...)` before the name.
    fn kernel_names(src: &str) -> Vec<String> {
        src.split("MMKD_KERNEL void ")
            .skip(1)
            .map(|rest| {
                let mut rest = rest.trim_start();
                if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
                    rest = r
                        .split_once(')')
                        .map_or("", |(_, after)| after)
                        .trim_start();
                }
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_file_includes_the_prelude_and_exports_its_entries() {
        for f in KERNEL_FILES {
            let src = f.expanded_source();
            assert!(
                !src.contains("#include \"prelude.cuh\""),
                "{}: prelude not expanded",
                f.name
            );
            assert!(src.contains("MMKD_PRELUDE_CUH"), "{}", f.name);
            let defined = kernel_names(f.source);
            // Every kernel's parameters fit the buffer plans are launched through.
            for (name, params) in kernel_params(f.source) {
                assert!(
                    params <= crate::exec::MAX_ARGS,
                    "{}: {name} takes {params} parameters, more than exec::MAX_ARGS",
                    f.name
                );
            }
            for e in f.entries {
                assert!(
                    defined.iter().any(|d| d == e),
                    "{}: no kernel {e} ({defined:?})",
                    f.name
                );
                assert!(
                    f.source.contains(&format!("MMKD_EXPORT({e})")),
                    "{}: {e} not exported",
                    f.name
                );
            }
        }
    }
}
