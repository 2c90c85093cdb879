//! Tensor maps for Hopper's tensor copy engine (TMA): what a kernel needs to copy a box of a
//! (batch, rows, row length) bf16 tensor into shared memory with one instruction.
//!
//! On a GPU the map is the driver's `CUtensorMap`, encoded on the host by
//! `cuTensorMapEncodeTiled`; under the emulation it is the emulation's own description of the
//! same tensor in the same 128 bytes (`EmuTensorMap` in `cuda/mmkd_emu.cpp`). Kernels take it by
//! value as `const __grid_constant__ mmkd_tensor_map`.

use anyhow::{ensure, Result};

/// The 128 bytes of a tensor map, aligned as CUDA 13's `CUtensorMap`.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMap(pub [u64; 16]);

// SAFETY: a plain 128-byte value with the layout and alignment of the kernel's parameter type.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// A bf16 tensor of `batch` matrices of `rows` × `cols` (row length `ld` ≥ `cols`, matrix
/// stride `batch_stride` elements), copied in boxes of `box_rows` × `box_cols` with the 128-byte
/// swizzle (`box_cols` · 2 = 128 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Matrices.
    pub batch: usize,
    /// Rows of one matrix.
    pub rows: usize,
    /// Columns of one matrix (the contiguous dimension).
    pub cols: usize,
    /// Elements between the starts of two rows.
    pub ld: usize,
    /// Elements between the starts of two matrices.
    pub batch_stride: usize,
    /// Rows per box (≤ 256).
    pub box_rows: u32,
    /// Columns per box: 64 (128 bytes, the swizzle's row).
    pub box_cols: u32,
}

/// Magic of the emulation's tensor maps ("TNSORMAP"; `kTensorMapMagic` in `mmkd_emu.cpp`).
const EMU_MAGIC: u64 = 0x5041_4d52_4f53_4e54;

impl MapSpec {
    /// Whether the engine can copy this tensor at all: 16-byte aligned rows and matrices, box
    /// within the limits. A tensor that fails this needs another copy path.
    pub fn supported(&self) -> bool {
        self.ld.is_multiple_of(8)
            && (self.batch == 1 || self.batch_stride.is_multiple_of(8))
            && self.box_cols == 64
            && (1..=256).contains(&self.box_rows)
            && self.rows > 0
            && self.cols > 0
            && self.ld >= self.cols
            && (self.ld as u64) * 2 < (1 << 40)
            && (self.batch_stride as u64) * 2 < (1 << 40)
    }

    /// Byte strides of dims 1 and 2. With one matrix the second is never stepped; it is given
    /// the value the driver expects of a contiguous tensor.
    fn strides(&self) -> [u64; 2] {
        let row = 2 * self.ld as u64;
        let mat = if self.batch == 1 {
            (row * self.rows as u64).next_multiple_of(16)
        } else {
            2 * self.batch_stride as u64
        };
        [row, mat]
    }

    fn check(&self, addr: u64) -> Result<()> {
        ensure!(self.supported(), "tensor map: unsupported tensor {self:?}");
        ensure!(
            addr.is_multiple_of(16),
            "tensor map: the tensor at {addr:#x} is not 16-byte aligned"
        );
        Ok(())
    }

    /// The emulation's map of the tensor at host address `addr`.
    pub fn emulated(&self, addr: u64) -> Result<TensorMap> {
        self.check(addr)?;
        let [s1, s2] = self.strides();
        let mut m = [0u64; 16];
        m[0] = EMU_MAGIC;
        m[1] = addr;
        m[2] = self.cols as u64;
        m[3] = self.rows as u64;
        m[4] = self.batch as u64;
        m[5] = s1;
        m[6] = s2;
        m[7] = u64::from(self.box_cols) | (u64::from(self.box_rows) << 32);
        m[8] = 128 | (2 << 32); // swizzle bytes, element bytes
        Ok(TensorMap(m))
    }

    /// The driver's map of the tensor at device address `addr` (no device work: the driver
    /// encodes it on the host).
    pub fn encode(&self, addr: u64) -> Result<TensorMap> {
        use cudarc::driver::sys;
        self.check(addr)?;
        let dims = [self.cols as u64, self.rows as u64, self.batch as u64];
        let strides = self.strides();
        let boxes = [self.box_cols, self.box_rows, 1u32];
        let elem_strides = [1u32; 3];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: every array has the length the rank (3) asks for; `map` is writable and
        // aligned as the driver's type; the call only writes the map.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                3,
                addr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        ensure!(
            r == sys::CUresult::CUDA_SUCCESS,
            "cuTensorMapEncodeTiled for {self:?} at {addr:#x}: {r:?}"
        );
        // SAFETY: the driver wrote the map (success above).
        Ok(TensorMap(unsafe { map.assume_init() }.opaque))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MapSpec {
        MapSpec {
            batch: 1,
            rows: 100,
            cols: 72,
            ld: 72,
            batch_stride: 7200,
            box_rows: 128,
            box_cols: 64,
        }
    }

    /// What the copy engine cannot do is refused before any kernel sees it.
    #[test]
    fn unsupported_tensors_are_refused() {
        assert!(spec().supported());
        assert!(!MapSpec { ld: 70, ..spec() }.supported());
        assert!(!MapSpec {
            batch: 2,
            batch_stride: 7201,
            ..spec()
        }
        .supported());
        assert!(!MapSpec {
            box_rows: 300,
            ..spec()
        }
        .supported());
        assert!(spec().emulated(8).is_err());
        let m = spec().emulated(64).unwrap();
        assert_eq!((m.0[0], m.0[1], m.0[5]), (EMU_MAGIC, 64, 144));
    }
}
