//! The CUDA backend of the engine, built on the kernels of `mmkd-kernels`: one preallocated
//! [`arena::Arena`] per model with a table of named regions, and launch plans over it that run
//! unchanged under the CPU emulation (host arena) or on a GPU (one device allocation).
//!
//! So far: one transformer block ([`block::CudaBlock`]), the whole image tower
//! ([`tower::CudaImageTower`]) and the whole text tower ([`text::CudaTextTower`]), forward and
//! backward, and the whole stage-2 training step of the student ([`student::CudaStudent`]:
//! both towers, the fused multi-teacher loss, gradient clipping and AdamW in one arena).

pub mod arena;
pub mod block;
pub mod student;
pub mod text;
pub mod tower;

pub use arena::{Arena, Dtype, Layout, Region, RegionId, Section};
pub use block::{param_specs, BlockDims, CudaBlock};
pub use student::{CudaStudent, StepReport, StudentBatch, StudentSetup};
pub use text::{CudaTextTower, ParamSlice, TextTowerDims};
pub use tower::{CudaImageTower, ImageTowerDims};
