//! What a launch needs, independent of where it runs: geometry and the kernel's parameters.

/// One kernel parameter, by value. Pointers are device addresses on a GPU and host addresses
/// under the emulation; both are 64-bit, as the kernel's pointer parameters are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A pointer parameter (`T*`); 0 is a null pointer.
    Ptr(u64),
    /// An `int` parameter.
    I32(i32),
    /// An `unsigned` parameter.
    U32(u32),
    /// A `float` parameter.
    F32(f32),
    /// A tensor map parameter (`const __grid_constant__ mmkd_tensor_map`), by value.
    Map(crate::tma::TensorMap),
}

impl Arg {
    /// A pointer to the start of a host slice (emulation only).
    pub fn host<T>(s: &[T]) -> Arg {
        Arg::Ptr(s.as_ptr() as u64)
    }
    /// A pointer to the start of a mutable host slice (emulation only).
    pub fn host_mut<T>(s: &mut [T]) -> Arg {
        Arg::Ptr(s.as_mut_ptr() as u64)
    }
    /// Converts a size to an `int` parameter, failing when it does not fit.
    pub fn int(what: &str, v: usize) -> anyhow::Result<Arg> {
        i32::try_from(v)
            .map(Arg::I32)
            .map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernel's int parameter"))
    }
}

/// Grid and block shape plus dynamic shared memory, as in `cuLaunchKernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory per block.
    pub shared_bytes: u32,
}

impl LaunchShape {
    /// A one-dimensional launch: `grid` blocks of `block` threads.
    pub fn linear(grid: u32, block: u32, shared_bytes: u32) -> Self {
        LaunchShape {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            shared_bytes,
        }
    }
}

/// Checks that a buffer holds at least `need` elements; names the kernel and the parameter.
pub fn check_len(kernel: &str, param: &str, have: usize, need: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        have >= need,
        "{kernel}: buffer `{param}` holds {have} elements, the shape needs {need}"
    );
    Ok(())
}
