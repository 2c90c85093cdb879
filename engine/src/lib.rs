//! mmkd-engine: tensors, devices, the autograd tape, ops, the student model, and training.
//!
//! # Training-step API (the contract the trainer codes against)
//!
//! ```no_run
//! use mmkd_engine::{ClipModel, ModelConfig, Tape, Tensor};
//! # fn main() -> mmkd_engine::Result<()> {
//! let cfg = ModelConfig::from_file(std::path::Path::new("configs/tiny.toml"))?;
//! let mut model = ClipModel::new(&cfg)?;
//! let images = Tensor::from_f32(vec![0.0; 8 * 3 * 32 * 32], &[8, 3, 32, 32])?; // f32 (B,3,H,W)
//! let tokens = Tensor::from_u32(vec![1; 8 * 16], &[8, 16])?;                   // u32 (B,L)
//! let lengths = vec![16usize; 8];                                               // valid tokens per row
//!
//! let mut tape = Tape::new();                                  // recording tape (CPU)
//! let img = model.encode_image(&mut tape, &images)?;          // Var, (B, embed_dim), unnormalised
//! let txt = model.encode_text(&mut tape, &tokens, &lengths)?; // Var, (B, embed_dim), unnormalised
//! let img_feats: &[f32] = tape.value(img);                     // row-major B × embed_dim
//! # let (grad_img, grad_txt) = (vec![0.0f32; img_feats.len()], vec![0.0f32; 8 * 32]);
//! // ... the loss, on plain slices, yields dL/dimg and dL/dtxt ...
//! model.params.zero_grad();                                    // gradients ACCUMULATE (+=)
//! tape.backward(&mut model.params, &[(img, &grad_img), (txt, &grad_txt)])?; // tape is emptied
//! let s = model.logit_scale();                                 // logit scale s (use exp(s))
//! let ls = model.logit_scale_id();                             // its gradient: the caller adds
//! model.params.grad_of_mut(ls)[0] += 0.0;                      //   dL/ds itself
//! // optimiser over model.params.data_and_grad_mut(), per-parameter rows in
//! // model.params.infos() (name, shape, offset, len; ParamInfo::decays() for weight decay);
//! model.clamp_logit_scale();                                   // s ∈ [0, ln 100]
//! # let _ = s; Ok(()) }
//! ```
//!
//! * No-grad inference: `Tape::no_grad()` with the same `encode_*` calls, or
//!   `model.embed_images(&images)` / `model.embed_texts(&tokens, &lengths)` → `Tensor` (B, J).
//! * Activation checkpointing: `model.set_checkpointing(true)` (each transformer block is
//!   recomputed during backward).
//! * Weights: `model.params.save_safetensors(path)` / `load_safetensors(path)` (open_clip /
//!   Hugging Face names, shapes checked by name).
//! * Devices: `Tape::on(Device::Cuda(0), true)` makes every op return
//!   `EngineError::NoLauncher` until the CUDA launchers land; nothing panics.
//! * The CLIP loss on the tape (`model.clip_loss(&mut tape, img, txt)`) exists for tests and
//!   cross-checks.
//! * CPU speed: call `host_memory::keep_freed_memory()` once at start-up and run the training
//!   loop inside `cpu_pool::run_on_pool(|| ...)`, as the `mmkd` binary does; the ops are
//!   correct without either, only slower.

pub mod config;
pub mod cpu_pool;
pub mod cuda;
pub mod error;
pub mod flops;
pub mod host_memory;
pub mod model;
pub mod ops;
pub mod params;
pub mod real;
pub mod simd;
pub mod tape;
pub mod tensor;

pub use config::{Activation, ModelConfig, NormPlacement, Pooling, TextConfig, VisionConfig};
pub use error::{EngineError, Result};
pub use model::{ClipModel, TransformerBlock};
pub use ops::linear::WLayout;
pub use ops::reduce::Reduction;
pub use params::{ParamId, ParamInfo, ParamStore, ParamView};
pub use tape::{Tape, Var};
pub use tensor::{DType, Device, Storage, Tensor};

// --- training: losses, optimiser, checkpoints, evaluation, alignment, trainer ---
pub mod align;
pub mod checkpoint;
pub mod eval;
pub mod loss;
pub mod optim;
pub mod trainer;
