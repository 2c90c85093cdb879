//! Training losses as fused functions on plain slices, each with its analytic backward.
//!
//! The student towers return *unnormalised* features `[N, D]`; every loss here normalises them
//! itself and returns gradients with respect to the unnormalised features (through the L2
//! normalisation), so the trainer can seed the tape's backward with them directly. The math runs
//! in `f64` internally (the `*_f64` entry points are what the gradient checks exercise); the `f32`
//! entry points convert at the boundary.
//!
//! - [`clip`]: the stage-1 symmetric CLIP loss with the learnable logit scale `exp(s)`.
//! - [`distill`]: the stage-2 multi-teacher loss `task + λ·fd + icl` over a `[N, T, D]` target
//!   tensor and its availability mask.

pub mod clip;
pub mod distill;
mod rows;

pub use clip::{clip_loss, clip_loss_f64, ClipGrads};
pub use distill::{
    distill_loss, distill_loss_f64, pick_random_teacher, pick_random_teacher_seeded, DistillConfig,
    DistillGrads, IclScale, TeacherMode, TeacherNorm, TeacherTargets, REFERENCE_ICL_SCALE,
};

use crate::error::{EngineError, Result};

/// Loss components of one step. Stage 1 has `fd = icl = 0` and `total = task`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossParts {
    /// Student CLIP loss.
    pub task: f64,
    /// Feature distillation term (unweighted mean squared error, image + text).
    pub fd: f64,
    /// Interactive contrastive term (student vs. teacher, both directions, averaged).
    pub icl: f64,
    /// `task + fd_weight · fd + icl`.
    pub total: f64,
}

impl LossParts {
    /// Whether every component is finite.
    pub fn is_finite(&self) -> bool {
        self.task.is_finite()
            && self.fd.is_finite()
            && self.icl.is_finite()
            && self.total.is_finite()
    }
}

fn check_len(what: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got != want {
        return Err(EngineError::Shape {
            op: "loss",
            msg: format!("{what} has {got} elements; expected {want} ({shape})"),
        });
    }
    Ok(())
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}
