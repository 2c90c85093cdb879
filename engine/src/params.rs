//! `ParamStore`: every parameter of a model in ONE contiguous `f32` buffer, gradients in a second
//! buffer with the identical layout, and a table of (name, shape, offset). Ops address parameters
//! by offset (a [`ParamView`]), so the hot path does no name look-ups and no copies; optimisers run
//! over the flat buffers.

use crate::error::{EngineError, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Index of a parameter in its store's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// A contiguous range of the flat parameter buffer: one parameter, or several parameters laid out
/// back to back (e.g. BERT's query, key and value weights viewed as one packed `[3W, W]` matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamView {
    /// First element in the flat buffer.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

/// One row of the parameter table.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    /// Stable name (open_clip / Hugging Face style), e.g. `visual.conv1.weight`.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// First element in the flat buffers.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
}

impl ParamInfo {
    /// Whether weight decay applies, by open_clip's rule: not on tensors with fewer than two
    /// dimensions (gains, biases, class embedding) nor on anything named like a norm, a bias or
    /// the logit scale.
    pub fn decays(&self) -> bool {
        let n = &self.name;
        !(self.shape.len() < 2
            || n.contains("bias")
            || n.contains("logit_scale")
            || n.contains(".ln_")
            || n.contains("LayerNorm")
            || n.contains("layer_norm"))
    }
    /// The parameter's range as a view.
    pub fn view(&self) -> ParamView {
        ParamView {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// All parameters and their gradients, each in one allocation.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    data: Vec<f32>,
    grad: Vec<f32>,
    infos: Vec<ParamInfo>,
    by_name: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a parameter filled by `init` (which receives the zeroed slice). Names must be
    /// unique.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        init: impl FnOnce(&mut [f32]),
    ) -> Result<ParamId> {
        if self.by_name.contains_key(name) {
            return Err(EngineError::Config(format!(
                "duplicate parameter name `{name}`"
            )));
        }
        let len: usize = shape.iter().product();
        let offset = self.data.len();
        self.data.resize(offset + len, 0.0);
        self.grad.resize(offset + len, 0.0);
        init(&mut self.data[offset..offset + len]);
        let id = self.infos.len();
        self.infos.push(ParamInfo {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset,
            len,
        });
        self.by_name.insert(name.to_string(), id);
        Ok(ParamId(id))
    }

    /// Looks a parameter up by name (not for the hot path).
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).map(|&i| ParamId(i))
    }
    /// Looks a parameter up by name, with an error naming it when absent.
    pub fn require(&self, name: &str) -> Result<ParamId> {
        self.id(name)
            .ok_or_else(|| EngineError::Input(format!("no parameter named `{name}`")))
    }
    /// Table row of a parameter.
    pub fn info(&self, id: ParamId) -> &ParamInfo {
        &self.infos[id.0]
    }
    /// The whole table, in layout order.
    pub fn infos(&self) -> &[ParamInfo] {
        &self.infos
    }
    /// View of one parameter.
    pub fn view(&self, id: ParamId) -> ParamView {
        self.infos[id.0].view()
    }
    /// View spanning parameters `ids`, which must be adjacent in layout order.
    pub fn span(&self, ids: &[ParamId]) -> Result<ParamView> {
        let first = ids
            .first()
            .ok_or_else(|| EngineError::Input("empty parameter span".into()))?;
        let mut end = self.infos[first.0].offset;
        for id in ids {
            let info = &self.infos[id.0];
            if info.offset != end {
                return Err(EngineError::Input(format!(
                    "parameter `{}` is not adjacent to the previous one in the span",
                    info.name
                )));
            }
            end += info.len;
        }
        let offset = self.infos[first.0].offset;
        Ok(ParamView {
            offset,
            len: end - offset,
        })
    }
    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// The flat parameter buffer.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// The flat parameter buffer, mutable (optimiser updates).
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    /// The flat gradient buffer (same layout as `data`).
    pub fn grad(&self) -> &[f32] {
        &self.grad
    }
    /// The flat gradient buffer, mutable.
    pub fn grad_mut(&mut self) -> &mut [f32] {
        &mut self.grad
    }
    /// Both buffers at once (an optimiser reads gradients while writing parameters).
    pub fn data_and_grad_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.data, &mut self.grad)
    }
    /// Values of one parameter.
    pub fn value(&self, id: ParamId) -> &[f32] {
        let i = &self.infos[id.0];
        &self.data[i.offset..i.offset + i.len]
    }
    /// Values of one parameter, mutable.
    pub fn value_mut(&mut self, id: ParamId) -> &mut [f32] {
        let (o, l) = (self.infos[id.0].offset, self.infos[id.0].len);
        &mut self.data[o..o + l]
    }
    /// Gradient of one parameter.
    pub fn grad_of(&self, id: ParamId) -> &[f32] {
        let i = &self.infos[id.0];
        &self.grad[i.offset..i.offset + i.len]
    }
    /// Gradient of one parameter, mutable.
    pub fn grad_of_mut(&mut self, id: ParamId) -> &mut [f32] {
        let (o, l) = (self.infos[id.0].offset, self.infos[id.0].len);
        &mut self.grad[o..o + l]
    }
    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
    }
    pub(crate) fn slice(&self, v: ParamView) -> &[f32] {
        &self.data[v.offset..v.offset + v.len]
    }

    /// Writes all parameters to a safetensors file (f32, names and shapes from the table). The
    /// write is atomic: a temporary file beside the target is synced, then renamed.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let werr = |msg: String| EngineError::Weights {
            path: path.to_path_buf(),
            msg,
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .infos
            .iter()
            .map(|i| {
                let bytes: &[u8] = bytemuck::cast_slice(&self.data[i.offset..i.offset + i.len]);
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    i.shape.clone(),
                    bytes,
                )
                .map(|v| (i.name.clone(), v))
                .map_err(|e| werr(format!("tensor `{}`: {e}", i.name)))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::tensor::serialize(views, None).map_err(|e| werr(e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Loads every parameter from a safetensors file. Each stored tensor must exist in the table
    /// with the same shape, and every table entry must be present; f32, f16 and bf16 files are
    /// accepted (converted to f32).
    pub fn load_safetensors(&mut self, path: &Path) -> Result<()> {
        self.load_safetensors_except(path, &[])
    }

    /// Like [`ParamStore::load_safetensors`], but tensors named in `skip` may be in the file
    /// without being parameters here (e.g. the trainer's learned icl scale when a stage-2
    /// checkpoint is loaded as a plain student).
    pub fn load_safetensors_except(&mut self, path: &Path, skip: &[&str]) -> Result<()> {
        let werr = |msg: String| EngineError::Weights {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| werr(e.to_string()))?;
        for name in st.names() {
            if !self.by_name.contains_key(name) && !skip.contains(&name) {
                return Err(werr(format!(
                    "tensor `{name}` is not a parameter of this model"
                )));
            }
        }
        for i in 0..self.infos.len() {
            let info = self.infos[i].clone();
            let t = st
                .tensor(&info.name)
                .map_err(|_| werr(format!("parameter `{}` is missing", info.name)))?;
            if t.shape() != info.shape.as_slice() {
                return Err(werr(format!(
                    "parameter `{}` has shape {:?} in the file but {:?} in the model",
                    info.name,
                    t.shape(),
                    info.shape
                )));
            }
            let dst = &mut self.data[info.offset..info.offset + info.len];
            let raw = t.data();
            match t.dtype() {
                safetensors::Dtype::F32 => {
                    for (d, c) in dst.iter_mut().zip(raw.chunks_exact(4)) {
                        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                safetensors::Dtype::BF16 => {
                    for (d, c) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                        *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
                safetensors::Dtype::F16 => {
                    for (d, c) in dst.iter_mut().zip(raw.chunks_exact(2)) {
                        *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
                other => {
                    return Err(werr(format!(
                        "parameter `{}` has dtype {other:?}; expected F32, F16 or BF16",
                        info.name
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}
