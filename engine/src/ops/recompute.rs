//! Activation checkpointing: run a block (e.g. one transformer block) without keeping its
//! internal activations, and recompute them during backward.
//! Forward: `y = f(x)` on a non-recording sub-tape; only `x` and `f` are kept.
//! Backward: record `f(x)` again on a fresh sub-tape, backpropagate `dy` through it (parameter
//! gradients land in the store as usual) and add the sub-tape's `dx` into `x`'s gradient.

use crate::error::{shape_err, Result};
use crate::params::ParamStore;
use crate::tape::{Grads, Node, Op, Tape, Var};
use crate::tensor::Device;
use std::sync::Arc;

/// A block that can be replayed: builds its ops on the given tape from input `x`.
pub type BlockFn = Arc<dyn Fn(&mut Tape, &ParamStore, Var) -> Result<Var> + Send + Sync>;

pub(crate) struct Saved {
    x: Var,
    f: BlockFn,
}

impl Tape {
    /// Applies `f` to `x`, keeping only `x` for backward (activation checkpointing). On a
    /// non-recording tape this is a plain call.
    pub fn checkpoint(&mut self, params: &ParamStore, x: Var, f: BlockFn) -> Result<Var> {
        self.check_var("checkpoint", x)?;
        if !self.is_recording() {
            return f(self, params, x);
        }
        let mut sub = Tape::on(self.device(), false);
        let xi = sub.input(self.value(x).to_vec(), self.shape(x))?;
        let y = f(&mut sub, params, xi)?;
        let shape = sub.shape(y).to_vec();
        let value = std::mem::take(&mut sub.nodes[y.0].value);
        if value.is_empty() && !shape.contains(&0) {
            return shape_err("checkpoint", "block returned a freed value");
        }
        Ok(self.push(value, shape, true, Op::Recompute(Saved { x, f })))
    }
}

pub(crate) fn backward(
    s: &Saved,
    dy: &[f32],
    device: Device,
    nodes: &[Node],
    g: &mut Grads,
    p: &mut ParamStore,
) -> Result<()> {
    let mut sub = Tape::on(device, true);
    let x = &nodes[s.x.0];
    let xi = sub.input(x.value.clone(), &x.shape)?;
    let y = (s.f)(&mut sub, p, xi)?;
    let dx = sub.backward_collect(p, &[(y, dy)], &[xi])?;
    if x.needs_grad {
        if let Some(dx) = dx.into_iter().next() {
            g.add(s.x, dx);
        }
    }
    Ok(())
}
