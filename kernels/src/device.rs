//! Device selection and the GPU backend.
//!
//! cudarc's driver loader panics when `libcuda` is missing, so [`probe_driver`] opens
//! `libcuda.so.1` itself first and turns its absence into an error. [`Device::select`] maps
//! `cpu`, `cuda[:N]` and `auto` to a device: `cuda` without a driver is an error, `auto` falls
//! back to the CPU.

use crate::launch::{Arg, LaunchShape};
use crate::nvrtc::{self, Nvrtc, Output};
use crate::registry::{KernelFile, MinArch, KERNEL_FILES};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::CStr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// What the user asked for (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The CPU backend.
    Cpu,
    /// CUDA device `N` (`cuda` is `cuda:0`); an error when there is none.
    Cuda(usize),
    /// CUDA device 0 when a driver and a device are present, else the CPU.
    Auto,
}

impl FromStr for DeviceRequest {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "auto" => Ok(DeviceRequest::Auto),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceRequest::Cuda(n)),
                _ => bail!("unknown device `{s}`: expected cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

/// A selected device.
#[derive(Clone)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// A CUDA GPU.
    Cuda(Arc<Gpu>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(g) => write!(f, "cuda:{} ({}, {})", g.ordinal, g.name, g.arch),
        }
    }
}

impl Device {
    /// Resolves a request; never panics when the driver or the device is absent.
    pub fn select(req: DeviceRequest) -> Result<Device> {
        match req {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(n) => Ok(Device::Cuda(Arc::new(Gpu::new(n)?))),
            // Fall back only when there is no GPU to use; a GPU that is present but cannot be
            // used (NVRTC missing, context creation failing) is an error, not a silent CPU run.
            DeviceRequest::Auto => {
                if probe_driver().is_err() || CudaContext::device_count().map_or(true, |n| n < 1) {
                    return Ok(Device::Cpu);
                }
                Ok(Device::Cuda(Arc::new(Gpu::new(0)?)))
            }
        }
    }
}

/// Checks that the CUDA driver library can be loaded, without letting cudarc panic.
pub fn probe_driver() -> Result<()> {
    // SAFETY: dlopen/dlerror with a valid C string; a successful handle stays open, as cudarc
    // will open the same library again.
    unsafe {
        let h = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if h.is_null() {
            let e = libc::dlerror();
            let msg = if e.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            };
            bail!("no CUDA driver found: libcuda.so.1 could not be loaded ({msg})");
        }
        if !cudarc::driver::sys::is_culib_present() {
            bail!("no CUDA driver found: libcuda.so.1 loaded but cudarc cannot open it");
        }
    }
    Ok(())
}

/// The driver API version the GPU backend is built for (`cuDriverGetVersion`'s encoding):
/// cudarc's CUDA 13.0 bindings and NVRTC 13 cubins.
const BUILT_FOR_CUDA: std::ffi::c_int = 13000;

/// Checks the driver's CUDA version. cudarc resolves driver functions when first called, so
/// on a driver without one of them the call would panic mid-run: a driver older than CUDA 12
/// is refused up front, and a CUDA 12 driver is used with a warning (what it lacks of 13.0
/// shows as an error or that panic when reached).
fn check_driver_version() -> Result<()> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library was opened by `probe_driver`; `v` is a valid out pointer.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        bail!("the CUDA driver does not report its version ({r:?})");
    }
    let (major, minor) = (v / 1000, (v % 1000) / 10);
    if major < 12 {
        bail!(
            "the NVIDIA driver supports CUDA {major}.{minor}; mmkd's GPU backend is built for \
             CUDA 13.0 and needs a driver for CUDA 13.0 or newer"
        );
    }
    if v < BUILT_FOR_CUDA {
        eprintln!(
            "warning: the NVIDIA driver supports CUDA {major}.{minor}; mmkd's GPU backend is \
             built for CUDA 13.0 and may fail on this driver"
        );
    }
    Ok(())
}

/// Copies from the device into a new host vector and returns once they are there. A copy into
/// pageable memory "might be synchronous" with respect to the host by the driver's documented
/// semantics (cudarc does not wait after it), so the stream is synchronised before the vector
/// is read.
pub trait DtohSynced {
    /// `src` on the host, the copy complete.
    fn dtoh_synced<T: cudarc::driver::DeviceRepr, S: cudarc::driver::DevicePtr<T>>(
        &self,
        src: &S,
    ) -> std::result::Result<Vec<T>, cudarc::driver::DriverError>;
}

impl DtohSynced for Arc<CudaStream> {
    fn dtoh_synced<T: cudarc::driver::DeviceRepr, S: cudarc::driver::DevicePtr<T>>(
        &self,
        src: &S,
    ) -> std::result::Result<Vec<T>, cudarc::driver::DriverError> {
        let v = self.clone_dtoh(src)?;
        self.synchronize()?;
        Ok(v)
    }
}

/// What [`Gpu::finish_within`]'s error says of a kernel that did not end in time.
const HUNG: &str = "a kernel never finished";

/// How long a correctness check's kernels (the GEMM path checks, a selftest case) may run
/// before [`Gpu::finish_within`] calls them hung: they take microseconds to milliseconds, so
/// only a kernel that never ends reaches it.
pub const CHECK_HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// A CUDA device with its stream, NVRTC and a cache of loaded modules (one per kernel file).
pub struct Gpu {
    /// Device ordinal.
    pub ordinal: usize,
    /// Device name as the driver reports it.
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// The real architecture kernels are compiled for (`sm_90`, `sm_80`, ...).
    pub arch: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    nvrtc: &'static Nvrtc,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded kernels by file and entry, each with the dynamic shared memory it has been
    /// allowed so far: a launch then costs a lookup, no allocation and no attribute call.
    functions: Mutex<HashMap<&'static str, HashMap<String, Loaded>>>,
}

/// A loaded kernel and the dynamic shared memory limit set on it.
#[derive(Clone)]
struct Loaded {
    f: CudaFunction,
    smem_limit: u32,
}

impl Gpu {
    /// Opens device `ordinal`; a clear error when the driver, the device or NVRTC is missing.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        probe_driver()?;
        check_driver_version()?;
        let count = CudaContext::device_count()
            .map_err(|e| anyhow!("cuInit/cuDeviceGetCount failed: {e:?}"))?;
        if ordinal >= count.max(0) as usize {
            bail!("CUDA device {ordinal} requested, the driver reports {count} device(s)");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("creating a context on CUDA device {ordinal}: {e:?}"))?;
        let capability = ctx
            .compute_capability()
            .map_err(|e| anyhow!("reading the compute capability: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let nvrtc = nvrtc::load().context("the GPU backend compiles its kernels at run time")?;
        let stream = ctx.default_stream();
        let gpu = Gpu {
            ordinal,
            name,
            capability,
            arch: format!("sm_{}{}", capability.0, capability.1),
            ctx,
            stream,
            nvrtc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        };
        gpu.warm_kernel_cache();
        Ok(gpu)
    }

    /// Compiles every kernel file this device runs into the disk cache, all files at once, so
    /// that the first process on a machine does not compile them one at a time as launches
    /// reach them (the Hopper GEMM files alone take ptxas seconds each). Without a cache
    /// directory this would compile twice and is skipped. Failures are left for the launch
    /// that needs the file, which reports them with its context.
    fn warm_kernel_cache(&self) {
        if nvrtc::cache_dir().is_none() {
            return;
        }
        std::thread::scope(|s| {
            for f in KERNEL_FILES {
                if let Ok(arch) = self.arch_for(f) {
                    let nv = self.nvrtc;
                    s.spawn(move || {
                        let _ = nv.compile(f, &arch, Output::Cubin);
                    });
                }
            }
        });
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// True when `error` (with its context chain) says a kernel hung ([`Gpu::finish_within`]):
    /// the GPU is then unusable for the rest of the process.
    pub fn is_hang(error: &str) -> bool {
        error.contains(HUNG)
    }

    /// Waits until the work queued on the stream so far is done, or fails once `limit` has
    /// passed: a kernel that never ends (a wait on an mbarrier whose arrivals never come, say)
    /// becomes an error naming `what` instead of a hang. After such an error the kernel still
    /// occupies the GPU, so the process cannot use it any more.
    pub fn finish_within(&self, what: &str, limit: std::time::Duration) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| anyhow!("{what}: recording an event: {e:?}"))?;
        let t0 = std::time::Instant::now();
        loop {
            match done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => bail!("{what}: {e:?}"),
            }
            if t0.elapsed() > limit {
                let msg = format!(
                    "{what}: {HUNG} within {} s (a deadlock?); the GPU is unusable for the rest \
                     of this process",
                    limit.as_secs()
                );
                // Said at once: tearing the context down later may wait for the hung kernel,
                // and the error would then never be printed.
                eprintln!("error: {msg}");
                bail!("{msg}");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Starts (`on`) or stops what a profiler attached with a capture range on the CUDA
    /// profiler API records (`nsys profile --capture-range=cudaProfilerApi`, `ncu
    /// --profile-from-start off`); without such a profiler it does nothing.
    pub fn profiler_capture(&self, on: bool) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let r = if on {
            cudarc::driver::profiler_start()
        } else {
            cudarc::driver::profiler_stop()
        };
        r.map_err(|e| anyhow!("cuProfiler{}: {e:?}", if on { "Start" } else { "Stop" }))
    }

    /// The context (for allocations and copies).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The architecture `file` is compiled for on this device.
    pub fn arch_for(&self, file: &KernelFile) -> Result<String> {
        match file.min_arch {
            MinArch::Sm80 if self.capability.0 >= 8 => Ok(self.arch.clone()),
            MinArch::Sm90a if self.capability == (9, 0) => Ok("sm_90a".into()),
            _ => bail!(
                "{}.cu needs {:?}, device {} is {}",
                file.name,
                file.min_arch,
                self.name,
                self.arch
            ),
        }
    }

    /// `entry` of `file`, loaded (and the file compiled) on first use, with dynamic shared
    /// memory of at least `smem` bytes allowed.
    fn function(&self, file: &'static KernelFile, entry: &str, smem: u32) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| anyhow!("function cache poisoned"))?;
        if let Some(k) = cache.get_mut(file.name).and_then(|m| m.get_mut(entry)) {
            allow_smem(&self.ctx, k, file, entry, smem)?;
            return Ok(k.f.clone());
        }
        let module = {
            let mut mods = self
                .modules
                .lock()
                .map_err(|_| anyhow!("module cache poisoned"))?;
            match mods.get(file.name) {
                Some(m) => m.clone(),
                None => {
                    let arch = self.arch_for(file)?;
                    let cubin = self.nvrtc.compile(file, &arch, Output::Cubin)?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(cubin.image))
                        .map_err(|e| anyhow!("loading {}.cu ({arch}): {e:?}", file.name))?;
                    mods.insert(file.name, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(entry)
            .map_err(|e| anyhow!("{}.cu has no kernel `{entry}`: {e:?}", file.name))?;
        // Without opting in, a launch gets 48 KiB of shared memory less the kernel's static
        // shared memory; the driver says how much that leaves.
        let limit = f
            .get_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            )
            .map_err(|e| anyhow!("{}::{entry}: reading its shared memory limit: {e:?}", file.name))?;
        let mut k = Loaded {
            f,
            smem_limit: u32::try_from(limit).unwrap_or(0),
        };
        allow_smem(&self.ctx, &mut k, file, entry, smem)?;
        let f = k.f.clone();
        cache
            .entry(file.name)
            .or_default()
            .insert(entry.to_string(), k);
        Ok(f)
    }

    /// Launches `entry` of `file` on the stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number and type, and every pointer
    /// must be a device allocation large enough for what the kernel touches at this shape.
    pub unsafe fn launch(
        &self,
        file: &'static KernelFile,
        entry: &str,
        shape: LaunchShape,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.function(file, entry, shape.shared_bytes)?;
        // The builder borrows the values from `args`, which outlive it.
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Map(m) => b.arg(m),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (shape.grid[0], shape.grid[1], shape.grid[2]),
            block_dim: (shape.block[0], shape.block[1], shape.block[2]),
            shared_mem_bytes: shape.shared_bytes,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { b.launch(cfg) }.map_err(|e| anyhow!("launching {}::{entry}: {e:?}", file.name))?;
        Ok(())
    }
}

/// Above its default limit (48 KiB less its static shared memory) a kernel must opt in to
/// more dynamic shared memory before its launch; the limit is raised once per kernel to the
/// largest amount asked for.
fn allow_smem(
    ctx: &CudaContext,
    k: &mut Loaded,
    file: &KernelFile,
    entry: &str,
    smem: u32,
) -> Result<()> {
    if smem > k.smem_limit {
        // Unlike a launch, setting an attribute does not make the context current.
        ctx.bind_to_thread()
            .map_err(|e| anyhow!("making the CUDA context current: {e:?}"))?;
        k.f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| {
            anyhow!(
                "{}::{entry}: raising the dynamic shared memory limit to {smem} bytes: {e:?}",
                file.name
            )
        })?;
        k.smem_limit = smem;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_requests() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert!("gpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
    }

    /// Without a driver (CI, this machine) `cuda` is an error that says so and `auto` is the
    /// CPU; with one, both give a GPU. Either way nothing panics.
    #[test]
    fn selection_without_driver_is_an_error_not_a_panic() {
        match probe_driver() {
            Err(e) => {
                let msg = format!("{:#}", Device::select(DeviceRequest::Cuda(0)).unwrap_err());
                assert!(msg.contains("no CUDA driver found"), "{msg}");
                assert!(
                    matches!(Device::select(DeviceRequest::Auto).unwrap(), Device::Cpu),
                    "{e}"
                );
            }
            Ok(()) => eprintln!("a CUDA driver is present: the no-driver path is not exercised"),
        }
        assert!(matches!(
            Device::select(DeviceRequest::Cpu).unwrap(),
            Device::Cpu
        ));
    }
}
