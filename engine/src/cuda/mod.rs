//! The CUDA backend of the engine, built on the kernels of `mmkd-kernels`: one preallocated
//! [`arena::Arena`] per model with a table of named regions, and launch plans over it that run
//! unchanged under the CPU emulation (host arena) or on a GPU (one device allocation).
//!
//! From the bottom up: one transformer block ([`block::CudaBlock`]), the image tower
//! ([`tower::CudaImageTower`]) and the text tower ([`text::CudaTextTower`]), forward and
//! backward, and the training step of the student for both stages ([`student::CudaStudent`]:
//! both towers, the fused multi-teacher loss, gradient clipping and AdamW in one arena), which
//! [`train_step::KernelStep`] drives for `mmkd train --device cuda`. [`target::KernelTarget`]
//! picks the backend and checks the GEMM path on the device first. The text side runs on each
//! batch's valid tokens, packed ([`text::CudaTextTower::set_batch`]); the arena is sized for
//! the longest captions.

pub mod arena;
pub mod block;
pub mod student;
pub mod target;
pub mod text;
pub mod tower;
pub mod train_step;

pub use arena::{Arena, Dtype, Layout, Region, RegionId, Section};
pub use block::{
    packed_rows, param_specs, BatchRows, BlockDims, CudaBlock, PackedSeq, PACKED_ROW_TILE,
};
pub use student::{
    CudaStudent, Images, StepPhases, StepReport, StudentBatch, StudentSetup, ICL_SCALE, LOGIT_SCALE,
};
pub use target::KernelTarget;
pub use text::{CudaTextTower, ParamSlice, TextTowerDims, TEXT_FILLER_ID};
pub use tower::{CudaImageTower, ImageTowerDims};
pub use train_step::KernelStep;
