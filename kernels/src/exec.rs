//! Launch plans for the memory-bound kernels (loss, AdamW, image normalisation, elementwise):
//! each op describes its launches once as [`Step`]s whose pointer arguments name buffer slots,
//! and the same plan runs under the emulation (host pointers) or on a GPU (device pointers).
//! The self-test ([`crate::selftest`]) runs plans on host-owned [`HostBuf`]s on either backend
//! and times them on a GPU.

use crate::device::DtohSynced;
use crate::device::Gpu;
use crate::emu::Emu;
use crate::launch::{Arg, LaunchShape};
use crate::registry::KernelFile;
use crate::testing::bf16_bits;
use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use half::bf16;
use std::sync::Arc;

/// One kernel parameter of a plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum P {
    /// The pointer in slot `i` of the call's buffer list.
    Buf(usize),
    /// The pointer in slot `i` advanced by `off` elements of 4 bytes (fp32 scratch sections).
    At(usize, usize),
    /// A null pointer (optional buffer left out).
    Null,
    /// An `int`.
    I32(i32),
    /// A `float`.
    F32(f32),
    /// A tensor map of the tensor in slot `i` (encoded for the backend at each run).
    Map(usize, crate::tma::MapSpec),
}

/// One launch of a plan.
#[derive(Clone, Debug)]
pub struct Step {
    /// The file the kernel lives in.
    pub file: &'static KernelFile,
    /// The kernel's name.
    pub kernel: &'static str,
    /// Grid, block and dynamic shared memory.
    pub shape: LaunchShape,
    /// Parameters in order.
    pub args: Vec<P>,
}

/// Where a plan runs.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    /// The CPU emulation of the CUDA sources.
    Emu(&'a Emu),
    /// A CUDA device.
    Gpu(&'a Gpu),
}

/// Runs `steps` in order with `ptrs[i]` as buffer slot `i`.
///
/// # Safety
/// Every slot must point at memory of the backend (host for the emulation, device for a GPU)
/// large enough for what the kernels touch; the op launchers check lengths before calling this.
pub unsafe fn run(backend: Backend<'_>, steps: &[Step], ptrs: &[u64]) -> Result<()> {
    // The arguments go through one buffer on the stack: a training step runs plans without
    // allocating (an `Arg` is 256 bytes: it can hold a tensor map).
    let mut buf = [Arg::Ptr(0); MAX_ARGS];
    for s in steps {
        ensure!(
            s.args.len() <= MAX_ARGS,
            "{}: {} parameters, more than the {MAX_ARGS} a plan step may pass",
            s.kernel,
            s.args.len()
        );
        let slot = |i: usize| {
            ptrs.get(i).copied().ok_or_else(|| {
                anyhow!(
                    "{}: plan names buffer slot {i}, {} given",
                    s.kernel,
                    ptrs.len()
                )
            })
        };
        for (dst, a) in buf.iter_mut().zip(&s.args) {
            *dst = match *a {
                P::Buf(i) => Arg::Ptr(slot(i)?),
                P::At(i, off) => Arg::Ptr(slot(i)? + 4 * off as u64),
                P::Map(i, spec) => {
                    let p = slot(i)?;
                    Arg::Map(match backend {
                        Backend::Emu(_) => spec.emulated(p)?,
                        Backend::Gpu(_) => spec.encode(p)?,
                    })
                }
                P::Null => Arg::Ptr(0),
                P::I32(v) => Arg::I32(v),
                P::F32(v) => Arg::F32(v),
            };
        }
        let args = &buf[..s.args.len()];
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match backend {
                Backend::Emu(e) => e.launch(s.kernel, s.shape, args)?,
                Backend::Gpu(g) => g.launch(s.file, s.kernel, s.shape, args)?,
            }
        }
    }
    Ok(())
}

/// The most parameters a plan step passes ([`run`]'s stack buffer); the widest kernels, the
/// persistent GEMMs, take 18.
pub const MAX_ARGS: usize = 24;

/// A grid-stride launch over `n` elements: 256 threads, at most 4096 blocks.
pub fn stride_shape(n: usize) -> LaunchShape {
    LaunchShape::linear(n.div_ceil(256).clamp(1, 4096) as u32, 256, 0)
}

/// Device pointers of typed slices, with cudarc's access guards held until the launch is done.
pub struct DevArgs<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
    /// The pointers, in the order they were added (the plan's buffer slots).
    pub ptrs: Vec<u64>,
}

impl<'a> DevArgs<'a> {
    /// An empty list on `stream`.
    pub fn new(stream: &'a CudaStream) -> Self {
        DevArgs {
            stream,
            guards: Vec::new(),
            ptrs: Vec::new(),
        }
    }
    /// Adds a buffer the kernels read.
    pub fn r<T>(&mut self, s: &'a CudaSlice<T>) {
        let (p, g) = s.device_ptr(self.stream);
        self.ptrs.push(p);
        self.guards.push(g);
    }
    /// Adds a buffer the kernels write.
    pub fn w<T>(&mut self, s: &'a mut CudaSlice<T>) {
        let (p, g) = s.device_ptr_mut(self.stream);
        self.ptrs.push(p);
        self.guards.push(g);
    }
    /// Adds an absent optional buffer (a null pointer).
    pub fn null(&mut self) {
        self.ptrs.push(0);
    }
}

/// A host buffer of one of the element types the kernels take.
#[derive(Clone, Debug, PartialEq)]
pub enum HostBuf {
    /// fp32.
    F32(Vec<f32>),
    /// bf16.
    Bf16(Vec<bf16>),
    /// Bytes (images, masks).
    U8(Vec<u8>),
    /// Indices.
    I32(Vec<i32>),
}

impl HostBuf {
    /// The host address of the first element.
    pub fn host_ptr(&mut self) -> u64 {
        match self {
            HostBuf::F32(v) => v.as_mut_ptr() as u64,
            HostBuf::Bf16(v) => v.as_mut_ptr() as u64,
            HostBuf::U8(v) => v.as_mut_ptr() as u64,
            HostBuf::I32(v) => v.as_mut_ptr() as u64,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostBuf::F32(v) => v.len(),
            HostBuf::Bf16(v) => v.len(),
            HostBuf::U8(v) => v.len(),
            HostBuf::I32(v) => v.len(),
        }
    }
    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes it occupies.
    pub fn bytes(&self) -> usize {
        self.len()
            * match self {
                HostBuf::F32(_) | HostBuf::I32(_) => 4,
                HostBuf::Bf16(_) => 2,
                HostBuf::U8(_) => 1,
            }
    }
    /// The values widened to f64 (for `testing::rel_err`).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            HostBuf::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostBuf::Bf16(v) => v.iter().map(|x| f64::from(x.to_f32())).collect(),
            HostBuf::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostBuf::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }
    /// Overwrites every element with NaN (float types) or an out-of-range marker (integers).
    pub fn poison(&mut self) {
        match self {
            HostBuf::F32(v) => v.fill(f32::NAN),
            HostBuf::Bf16(v) => v.fill(crate::testing::BF16_POISON),
            HostBuf::U8(v) => v.fill(0xff),
            HostBuf::I32(v) => v.fill(i32::MIN),
        }
    }
}

/// A device copy of a [`HostBuf`].
pub enum DevBuf {
    /// fp32.
    F32(CudaSlice<f32>),
    /// bf16 as raw bits.
    U16(CudaSlice<u16>),
    /// Bytes.
    U8(CudaSlice<u8>),
    /// Indices.
    I32(CudaSlice<i32>),
}

impl DevBuf {
    /// Uploads `h`.
    pub fn upload(st: &Arc<CudaStream>, h: &HostBuf) -> Result<DevBuf> {
        let e = |e| anyhow!("copy to the device: {e:?}");
        Ok(match h {
            HostBuf::F32(v) => DevBuf::F32(st.clone_htod(v).map_err(e)?),
            HostBuf::Bf16(v) => DevBuf::U16(st.clone_htod(bf16_bits(v)).map_err(e)?),
            HostBuf::U8(v) => DevBuf::U8(st.clone_htod(v).map_err(e)?),
            HostBuf::I32(v) => DevBuf::I32(st.clone_htod(v).map_err(e)?),
        })
    }
    /// Copies the contents back into a host buffer of the same type.
    pub fn download(&self, st: &Arc<CudaStream>) -> Result<HostBuf> {
        let e = |e| anyhow!("copy from the device: {e:?}");
        Ok(match self {
            DevBuf::F32(d) => HostBuf::F32(st.dtoh_synced(d).map_err(e)?),
            DevBuf::U16(d) => HostBuf::Bf16(
                st.dtoh_synced(d)
                    .map_err(e)?
                    .into_iter()
                    .map(bf16::from_bits)
                    .collect(),
            ),
            DevBuf::U8(d) => HostBuf::U8(st.dtoh_synced(d).map_err(e)?),
            DevBuf::I32(d) => HostBuf::I32(st.dtoh_synced(d).map_err(e)?),
        })
    }
    /// The device address. The guard is released at once: every launch and copy of the
    /// self-test goes to the one stream, which orders them.
    pub fn device_ptr(&self, st: &CudaStream) -> u64 {
        match self {
            DevBuf::F32(d) => d.device_ptr(st).0,
            DevBuf::U16(d) => d.device_ptr(st).0,
            DevBuf::U8(d) => d.device_ptr(st).0,
            DevBuf::I32(d) => d.device_ptr(st).0,
        }
    }
}
