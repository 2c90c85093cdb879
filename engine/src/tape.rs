//! Reverse-mode autograd over a tape of coarse ops.
//!
//! Forward: every op appends one `Node` holding its output value and what its backward needs
//! (input `Var`s, parameter views, small saved statistics). Backward walks the nodes in reverse,
//! seeds the gradients the caller hands in, and *adds* (`+=`) parameter gradients into the
//! store's flat gradient buffer — adding, not assigning, so several backward passes (gradient
//! accumulation, two towers sharing nothing, a parameter used twice) sum correctly. A node's value
//! and saved data are freed as soon as its own backward has run, because only later nodes read an
//! earlier node's value and those have all been processed by then. After `backward` the tape is
//! empty and can be reused.

use crate::error::{EngineError, Result};
use crate::ops;
use crate::params::ParamStore;
use crate::tensor::{Device, Tensor};

/// Handle to a value recorded on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(pub(crate) usize);

/// What an op saved for its backward; one variant per op file.
pub(crate) enum Op {
    /// A constant or a value recorded without gradient (inference mode, freed nodes).
    Leaf,
    /// A leaf that takes a gradient (the input of a recomputed block).
    Input,
    Linear(ops::linear::Saved),
    LayerNorm(ops::layer_norm::Saved),
    Gelu(ops::gelu::Saved),
    QuickGelu(ops::quick_gelu::Saved),
    Relu(ops::relu::Saved),
    Dropout(ops::dropout::Saved),
    Attention(ops::attention::Saved),
    CrossEntropy(ops::cross_entropy::Saved),
    Embedding(ops::embedding::Saved),
    PatchEmbed(ops::patch_embed::Saved),
    Add(ops::add::Saved),
    AddParam(ops::add::SavedParam),
    ClsPos(ops::cls_pos::Saved),
    L2Normalize(ops::l2_normalize::Saved),
    Reduce(ops::reduce::Saved),
    PackRows(ops::pack_rows::Saved),
    Reshape(ops::reshape::Saved),
    Transpose(ops::reshape::SavedT),
    MatmulNt(ops::matmul::Saved),
    Scale(ops::scale::Saved),
    ScaleExp(ops::scale::SavedExp),
    Recompute(ops::recompute::Saved),
}

pub(crate) struct Node {
    pub(crate) value: Vec<f32>,
    pub(crate) shape: Vec<usize>,
    pub(crate) needs_grad: bool,
    pub(crate) op: Op,
}

/// Gradient buffers of the nodes during one backward pass, allocated on first use.
pub(crate) struct Grads(Vec<Option<Vec<f32>>>);

impl Grads {
    /// The gradient buffer of `v`, zero-filled on first use.
    pub(crate) fn of(&mut self, nodes: &[Node], v: Var) -> &mut [f32] {
        let n = nodes[v.0].value.len();
        self.0[v.0].get_or_insert_with(|| vec![0.0; n])
    }

    /// Adds `dx` to the gradient of `v`. The first contribution becomes the buffer as it is,
    /// which saves zero-filling a fresh one and adding into it.
    pub(crate) fn add(&mut self, v: Var, dx: Vec<f32>) {
        match &mut self.0[v.0] {
            Some(buf) => ops::add::accumulate(buf, &dx),
            slot => *slot = Some(dx),
        }
    }

    /// [`Grads::add`] of a borrowed contribution: copied if it is the first.
    pub(crate) fn add_slice(&mut self, v: Var, dx: &[f32]) {
        match &mut self.0[v.0] {
            Some(buf) => ops::add::accumulate(buf, dx),
            slot => *slot = Some(dx.to_vec()),
        }
    }
}

/// The autograd tape. `Tape::new()` records for backward; `Tape::no_grad()` only computes values
/// (evaluation, feature caching).
pub struct Tape {
    pub(crate) nodes: Vec<Node>,
    device: Device,
    record: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    /// A recording tape on the CPU.
    pub fn new() -> Self {
        Self::on(Device::Cpu, true)
    }
    /// A non-recording tape on the CPU: ops compute values only and keep nothing for backward.
    pub fn no_grad() -> Self {
        Self::on(Device::Cpu, false)
    }
    /// A tape whose ops run on `device`; `record` selects training or inference mode. Ops on a
    /// device without a launcher return [`EngineError::NoLauncher`].
    pub fn on(device: Device, record: bool) -> Self {
        Tape {
            nodes: Vec::new(),
            device,
            record,
        }
    }
    /// Device the ops run on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Whether ops record what backward needs.
    pub fn is_recording(&self) -> bool {
        self.record
    }
    /// Number of nodes currently on the tape.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    /// Whether the tape holds no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    /// Bytes held for backward: node values plus the larger saved buffers (attention
    /// probabilities, im2col patches, softmax and LayerNorm statistics).
    pub fn activation_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                let saved = match &n.op {
                    Op::Attention(s) => s.bytes(),
                    Op::PatchEmbed(s) => s.bytes(),
                    Op::LayerNorm(s) => s.bytes(),
                    Op::CrossEntropy(s) => s.bytes(),
                    _ => 0,
                };
                n.value.len() * 4 + saved
            })
            .sum()
    }

    /// Records a constant (no gradient flows into it).
    pub fn constant(&mut self, value: Vec<f32>, shape: &[usize]) -> Result<Var> {
        self.leaf(value, shape, false)
    }
    /// Records a leaf whose gradient backward can return (see [`Tape::backward_collect`]).
    pub fn input(&mut self, value: Vec<f32>, shape: &[usize]) -> Result<Var> {
        self.leaf(value, shape, true)
    }
    /// Records an `f32` tensor as a constant.
    pub fn constant_tensor(&mut self, t: &Tensor) -> Result<Var> {
        self.constant(t.as_f32()?.to_vec(), t.shape())
    }
    fn leaf(&mut self, value: Vec<f32>, shape: &[usize], grad: bool) -> Result<Var> {
        let n: usize = shape.iter().product();
        if n != value.len() {
            return crate::error::shape_err(
                "leaf",
                format!(
                    "shape {shape:?} holds {n} elements but {} were given",
                    value.len()
                ),
            );
        }
        self.nodes.push(Node {
            value,
            shape: shape.to_vec(),
            needs_grad: grad,
            op: if grad { Op::Input } else { Op::Leaf },
        });
        Ok(Var(self.nodes.len() - 1))
    }

    /// Value of a recorded node (row-major, `f32`).
    pub fn value(&self, v: Var) -> &[f32] {
        &self.nodes[v.0].value
    }
    /// Shape of a recorded node.
    pub fn shape(&self, v: Var) -> &[usize] {
        &self.nodes[v.0].shape
    }
    /// Moves a node's value out, leaving it empty (the node must not be used afterwards).
    pub fn take_value(&mut self, v: Var) -> Vec<f32> {
        std::mem::take(&mut self.nodes[v.0].value)
    }
    /// Copies a node's value out as a tensor.
    pub fn tensor(&self, v: Var) -> Result<Tensor> {
        Tensor::from_f32(self.nodes[v.0].value.clone(), &self.nodes[v.0].shape)
    }

    /// Fails with a clear error unless the tape runs on a device that has a launcher for `op`.
    /// Each op calls this at its dispatch point; a CUDA launcher is added there, beside the CPU
    /// code, in the op's own file.
    pub(crate) fn dispatch(&self, op: &'static str) -> Result<()> {
        match self.device {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(EngineError::NoLauncher {
                op,
                device: self.device.to_string(),
            }),
        }
    }
    pub(crate) fn needs_grad(&self, v: Var) -> bool {
        self.nodes[v.0].needs_grad
    }
    /// Appends an op's output. Without recording the saved data is dropped at once.
    pub(crate) fn push(
        &mut self,
        value: Vec<f32>,
        shape: Vec<usize>,
        needs_grad: bool,
        op: Op,
    ) -> Var {
        debug_assert_eq!(value.len(), shape.iter().product::<usize>());
        let (needs_grad, op) = if self.record {
            (needs_grad, op)
        } else {
            (false, Op::Leaf)
        };
        self.nodes.push(Node {
            value,
            shape,
            needs_grad,
            op,
        });
        Var(self.nodes.len() - 1)
    }
    pub(crate) fn check_var(&self, op: &'static str, v: Var) -> Result<()> {
        if v.0 >= self.nodes.len() {
            return crate::error::shape_err(op, format!("variable {} is not on this tape", v.0));
        }
        Ok(())
    }

    /// Backward pass: seeds `dL/d(var)` for each `(var, grad)` pair (same length as the var's
    /// value), propagates to every parameter and adds the results into `params`' gradient
    /// buffer. The tape is emptied afterwards.
    pub fn backward(&mut self, params: &mut ParamStore, seeds: &[(Var, &[f32])]) -> Result<()> {
        self.backward_collect(params, seeds, &[]).map(|_| ())
    }

    /// Like [`Tape::backward`], and also returns the gradients of the leaves `wanted` (recorded
    /// with [`Tape::input`]), zero where nothing flowed.
    pub fn backward_collect(
        &mut self,
        params: &mut ParamStore,
        seeds: &[(Var, &[f32])],
        wanted: &[Var],
    ) -> Result<Vec<Vec<f32>>> {
        if !self.record {
            return Err(EngineError::Input(
                "backward on a no-grad tape: nothing was recorded".into(),
            ));
        }
        let mut grads = Grads(vec![None; self.nodes.len()]);
        for &(v, g) in seeds {
            self.check_var("backward", v)?;
            let n = self.nodes[v.0].value.len();
            if g.len() != n {
                return crate::error::shape_err(
                    "backward",
                    format!(
                        "seed gradient has {} elements but the variable has {n}",
                        g.len()
                    ),
                );
            }
            grads.add_slice(v, g);
        }
        for v in wanted {
            self.check_var("backward", *v)?;
        }
        let device = self.device;
        for i in (0..self.nodes.len()).rev() {
            if matches!(self.nodes[i].op, Op::Leaf | Op::Input) {
                continue;
            }
            let op = std::mem::replace(&mut self.nodes[i].op, Op::Leaf);
            if let Some(dy) = grads.0[i].take() {
                let nodes = &self.nodes;
                let g = &mut grads;
                match &op {
                    Op::Leaf | Op::Input => {}
                    Op::Linear(s) => ops::linear::backward(s, &dy, nodes, g, params),
                    Op::LayerNorm(s) => ops::layer_norm::backward(s, &dy, nodes, g, params),
                    Op::Gelu(s) => ops::gelu::backward(s, &dy, nodes, g),
                    Op::QuickGelu(s) => ops::quick_gelu::backward(s, &dy, nodes, g),
                    Op::Relu(s) => ops::relu::backward(s, &dy, nodes, g),
                    Op::Dropout(s) => ops::dropout::backward(s, &dy, nodes, g),
                    Op::Attention(s) => ops::attention::backward(s, &dy, nodes, g),
                    Op::CrossEntropy(s) => ops::cross_entropy::backward(s, &dy, nodes, g),
                    Op::Embedding(s) => ops::embedding::backward(s, &dy, params),
                    Op::PatchEmbed(s) => ops::patch_embed::backward(s, &dy, params),
                    Op::Add(s) => ops::add::backward(s, dy, nodes, g),
                    Op::AddParam(s) => ops::add::backward_param(s, dy, nodes, g, params),
                    Op::ClsPos(s) => ops::cls_pos::backward(s, &dy, nodes, g, params),
                    Op::L2Normalize(s) => {
                        ops::l2_normalize::backward(s, &dy, &nodes[i].value, nodes, g)
                    }
                    Op::Reduce(s) => ops::reduce::backward(s, &dy, nodes, g),
                    Op::PackRows(s) => ops::pack_rows::backward_pack(s, &dy, nodes, g),
                    Op::Reshape(s) => ops::reshape::backward(s, dy, nodes, g),
                    Op::Transpose(s) => ops::reshape::backward_t(s, &dy, nodes, g),
                    Op::MatmulNt(s) => ops::matmul::backward(s, &dy, nodes, g),
                    Op::Scale(s) => ops::scale::backward(s, &dy, nodes, g),
                    Op::ScaleExp(s) => {
                        ops::scale::backward_exp(s, &dy, &nodes[i].value, nodes, g, params)
                    }
                    Op::Recompute(s) => ops::recompute::backward(s, &dy, device, nodes, g, params)?,
                }
            }
            // Nothing earlier reads this node: free its activation now.
            self.nodes[i].value = Vec::new();
        }
        let out = wanted
            .iter()
            .map(|v| {
                grads.0[v.0]
                    .take()
                    .unwrap_or_else(|| vec![0.0; self.nodes[v.0].value.len()])
            })
            .collect();
        self.nodes.clear();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value reached along several paths gets the sum of their gradients, whichever path's
    /// contribution arrives first (taken over as the buffer) and whichever are added to it.
    #[test]
    fn gradients_of_shared_values_sum_over_every_path() {
        let mut ps = ParamStore::new();
        let mut t = Tape::new();
        let x = t.input(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let c = t.constant(vec![5.0; 4], &[2, 2]).unwrap();
        let twice = t.add(x, x).unwrap(); // dx: 2
        let flat = t.reshape(x, &[4]).unwrap();
        let back = t.reshape(flat, &[2, 2]).unwrap(); // dx: 1 more
        let s = t.add(twice, back).unwrap();
        let y = t.add(s, c).unwrap(); // the constant takes no gradient
        let seed = [0.5f32, -1.0, 2.0, 0.25];
        let dx = t.backward_collect(&mut ps, &[(y, &seed)], &[x]).unwrap();
        let want: Vec<f32> = seed.iter().map(|g| 3.0 * g).collect();
        assert_eq!(dx[0], want);
        // The seed's own buffer is not aliased by what was handed back.
        assert_eq!(seed, [0.5, -1.0, 2.0, 0.25]);
    }

    #[test]
    fn two_seeds_on_one_value_add() {
        let mut ps = ParamStore::new();
        let mut t = Tape::new();
        let x = t.input(vec![1.0, 2.0], &[2]).unwrap();
        let y = t.reshape(x, &[1, 2]).unwrap();
        let dx = t
            .backward_collect(&mut ps, &[(y, &[1.0, 2.0]), (y, &[10.0, 20.0])], &[x])
            .unwrap();
        assert_eq!(dx[0], vec![11.0, 22.0]);
    }
}
