//! mmkd-kernels: the CUDA kernels of mmkd, their CPU references, and the toolchain that
//! builds and checks them without a GPU.
//!
//! One source, three builds (see `kernels/README.md`):
//! - [`nvrtc`]: the `.cu` files, embedded ([`registry`]), compiled at run time by NVRTC for the
//!   device's architecture and cached on disk; [`device`] loads and launches them through cudarc.
//! - [`check`]: the compile gate behind `mmkd kernels check` (registers, shared memory, spills,
//!   tensor-core instructions per kernel).
//! - [`emu`]: the same files compiled by the host C++ compiler and run on the CPU with CUDA's
//!   execution semantics, which is how CI runs the kernels.
//!
//! Each op file (e.g. [`layernorm`]) holds the CPU reference, the emulation launcher and the GPU
//! launcher with the same parameters, and the tests that compare them.

pub mod adamw;
pub mod attention;
pub mod check;
pub mod device;
pub mod elementwise;
pub mod emu;
pub mod exec;
pub mod fragment;
pub mod gemm;
pub mod gemm_attn_bench;
pub mod image_norm;
pub mod launch;
pub mod layernorm;
pub mod mt_loss;
pub mod nvrtc;
pub mod registry;
pub mod selftest;
pub mod testing;
pub mod tma;
pub mod wgmma_test;

pub use device::{Device, DeviceRequest, Gpu};
pub use emu::{Emu, Schedule};
pub use launch::{Arg, LaunchShape};
