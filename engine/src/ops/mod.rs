//! The ops: one file each, with the math, the CPU code (generic over [`crate::real::Real`] so the
//! gradient checks run it in `f64`), the tape method and the backward. Each tape method calls
//! `Tape::dispatch` at its device dispatch point; CUDA launchers are added there.

pub mod add;
pub mod attention;
pub mod cls_pos;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod l2_normalize;
pub mod layer_norm;
pub mod linear;
pub mod matmul;
pub mod pack_rows;
pub mod patch_embed;
pub mod quick_gelu;
pub mod recompute;
pub mod reduce;
pub mod relu;
pub mod reshape;
pub mod scale;

use crate::params::ParamView;

/// Two disjoint parameter-gradient ranges of the flat buffer, both mutable.
pub(crate) fn split2(buf: &mut [f32], a: ParamView, b: ParamView) -> (&mut [f32], &mut [f32]) {
    if a.offset < b.offset {
        let (lo, hi) = buf.split_at_mut(b.offset);
        (&mut lo[a.offset..a.offset + a.len], &mut hi[..b.len])
    } else {
        let (lo, hi) = buf.split_at_mut(a.offset);
        (&mut hi[..a.len], &mut lo[b.offset..b.offset + b.len])
    }
}
