//! The CUDA backend of the engine, built on the kernels of `mmkd-kernels`: one preallocated
//! [`arena::Arena`] per model with a table of named regions, and launch plans over it that run
//! unchanged under the CPU emulation (host arena) or on a GPU (one device allocation).
//!
//! So far: one transformer block ([`block::CudaBlock`]), the whole image tower
//! ([`tower::CudaImageTower`]) and the whole text tower ([`text::CudaTextTower`]), forward and
//! backward.

pub mod arena;
pub mod block;
pub mod text;
pub mod tower;

pub use arena::{Arena, Dtype, Layout, Region, RegionId, Section};
pub use block::{param_specs, BlockDims, CudaBlock};
pub use text::{CudaTextTower, ParamSlice, TextTowerDims};
pub use tower::{CudaImageTower, ImageTowerDims};
