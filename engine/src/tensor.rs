//! `Tensor`: a shaped buffer with a dtype and a device. Inputs enter the engine as tensors
//! (images `f32 [B,3,H,W]`, token ids `u32 [B,L]`); the tape hands values back as tensors.

use crate::error::{EngineError, Result};
use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float: activations and master weights on the CPU.
    F32,
    /// 64-bit float: CPU only, used by gradient checks.
    F64,
    /// bfloat16 storage.
    BF16,
    /// IEEE half storage.
    F16,
    /// Unsigned 32-bit integers: token ids and class labels.
    U32,
}

/// Where a tensor lives and where an op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The host CPU (always available).
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Host storage of a tensor, one variant per dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f64` elements.
    F64(Vec<f64>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
    /// `f16` elements.
    F16(Vec<f16>),
    /// `u32` elements.
    U32(Vec<u32>),
}

impl Storage {
    fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::U32(v) => v.len(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::U32(_) => DType::U32,
        }
    }
}

/// A contiguous row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    storage: Storage,
    shape: Vec<usize>,
    device: Device,
}

impl Tensor {
    /// Wraps host storage with a shape; fails when the element count does not match.
    pub fn new(storage: Storage, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != storage.len() {
            return Err(EngineError::Shape {
                op: "Tensor::new",
                msg: format!(
                    "shape {shape:?} holds {n} elements but {} were given",
                    storage.len()
                ),
            });
        }
        Ok(Tensor {
            storage,
            shape: shape.to_vec(),
            device: Device::Cpu,
        })
    }
    /// An `f32` tensor on the CPU.
    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Self> {
        Self::new(Storage::F32(data), shape)
    }
    /// A `u32` tensor on the CPU (token ids, labels).
    pub fn from_u32(data: Vec<u32>, shape: &[usize]) -> Result<Self> {
        Self::new(Storage::U32(data), shape)
    }
    /// Shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    /// Device the tensor lives on.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.storage.len()
    }
    /// Host storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// The elements as `f32`, or an error naming the actual dtype.
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            s => Err(EngineError::Input(format!(
                "expected an f32 tensor, got {:?}",
                s.dtype()
            ))),
        }
    }
    /// The elements as `u32`, or an error naming the actual dtype.
    pub fn as_u32(&self) -> Result<&[u32]> {
        match &self.storage {
            Storage::U32(v) => Ok(v),
            s => Err(EngineError::Input(format!(
                "expected a u32 tensor, got {:?}",
                s.dtype()
            ))),
        }
    }
    /// Converts floating-point storage to another floating dtype (rounding to nearest).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let wide: Vec<f64> = match &self.storage {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F64(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::U32(_) => {
                return Err(EngineError::Input(
                    "cannot convert a u32 tensor to a float dtype".into(),
                ))
            }
        };
        let storage = match dtype {
            DType::F32 => Storage::F32(wide.iter().map(|&x| x as f32).collect()),
            DType::F64 => Storage::F64(wide),
            DType::BF16 => Storage::BF16(wide.iter().map(|&x| bf16::from_f64(x)).collect()),
            DType::F16 => Storage::F16(wide.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::U32 => {
                return Err(EngineError::Input(
                    "cannot convert a float tensor to u32".into(),
                ))
            }
        };
        Ok(Tensor {
            storage,
            shape: self.shape.clone(),
            device: self.device,
        })
    }
    /// Moves the tensor to a device. Only the CPU backend exists so far: asking for CUDA is an
    /// error, not a panic.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(self.clone()),
            Device::Cuda(_) => Err(EngineError::NoLauncher {
                op: "to_device",
                device: device.to_string(),
            }),
        }
    }
}
