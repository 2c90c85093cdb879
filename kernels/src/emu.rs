//! The emulation backend: kernels compiled from the same `.cu` sources by the host C++
//! compiler (see `build.rs` and `cuda/mmkd_emu.h`) and run on the CPU with CUDA's execution
//! semantics. Slow, and meant for small sizes: every launch runs each block's threads as fibers.
//!
//! Adding a kernel: list its entry points in the `emu_kernels!` table below (and any test
//! variant declared in its `.cu` file by a `// mmkd-emu-variant: NAME MACRO` line).

use crate::launch::{Arg, LaunchShape};
use anyhow::{bail, Result};
use std::ffi::{c_char, c_void, CStr};

/// Launch geometry as the C++ side reads it (`mmkd_emu::LaunchCfg`).
#[repr(C)]
struct EmuLaunchCfg {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

type EmuEntry = unsafe extern "C" fn(*const EmuLaunchCfg, *mut *mut c_void) -> *const c_char;

macro_rules! emu_kernels {
    ($($name:literal => $sym:ident,)*) => {
        extern "C" {
            $(fn $sym(cfg: *const EmuLaunchCfg, args: *mut *mut c_void) -> *const c_char;)*
            fn mmkd_emu_set_schedule(mode: i32, seed: u64, eager_copies: i32);
            fn mmkd_emu_poison(ptr: *const c_void, bytes: usize, on: i32);
        }
        /// Every emulated entry point: `kernel` or `variant:kernel`.
        const EMU_TABLE: &[(&str, EmuEntry)] = &[$(($name, $sym),)*];
    };
}

emu_kernels! {
    "layernorm_fwd" => mmkd_emu_layernorm_fwd,
    "layernorm_fwd_rows" => mmkd_emu_layernorm_fwd_rows,
    "layernorm_bwd_rows" => mmkd_emu_layernorm_bwd_rows,
    "layernorm_bwd" => mmkd_emu_layernorm_bwd,
    "layernorm_bwd_reduce" => mmkd_emu_layernorm_bwd_reduce,
    "broken_index:layernorm_fwd" => mmkd_emu_broken_index_layernorm_fwd,
    "broken_barrier:layernorm_fwd" => mmkd_emu_broken_barrier_layernorm_fwd,
    "frag_mma_direct" => mmkd_emu_frag_mma_direct,
    "frag_mma_ldmatrix" => mmkd_emu_frag_mma_ldmatrix,
    "frag_ldmatrix_dump" => mmkd_emu_frag_ldmatrix_dump,
    "frag_wgmma" => mmkd_emu_frag_wgmma,
    "frag_wgmma_mn" => mmkd_emu_frag_wgmma_mn,
    "gemm_fwd_ws" => mmkd_emu_gemm_fwd_ws,
    "gemm_dgrad_ws" => mmkd_emu_gemm_dgrad_ws,
    "gemm_wgrad_ws" => mmkd_emu_gemm_wgrad_ws,
    "no_empty_wait:gemm_fwd_ws" => mmkd_emu_no_empty_wait_gemm_fwd_ws,
    "no_empty_wait:gemm_dgrad_ws" => mmkd_emu_no_empty_wait_gemm_dgrad_ws,
    "no_empty_wait:gemm_wgrad_ws" => mmkd_emu_no_empty_wait_gemm_wgrad_ws,
    "early_release:gemm_fwd_ws" => mmkd_emu_early_release_gemm_fwd_ws,
    "early_release:gemm_dgrad_ws" => mmkd_emu_early_release_gemm_dgrad_ws,
    "early_release:gemm_wgrad_ws" => mmkd_emu_early_release_gemm_wgrad_ws,
    "gemm_fwd_wgmma" => mmkd_emu_gemm_fwd_wgmma,
    "gemm_dgrad_wgmma" => mmkd_emu_gemm_dgrad_wgmma,
    "gemm_wgrad_wgmma" => mmkd_emu_gemm_wgrad_wgmma,
    "gemm_fwd_tma" => mmkd_emu_gemm_fwd_tma,
    "gemm_dgrad_tma" => mmkd_emu_gemm_dgrad_tma,
    "gemm_wgrad_tma" => mmkd_emu_gemm_wgrad_tma,
    "no_wait:gemm_fwd_tma" => mmkd_emu_no_wait_gemm_fwd_tma,
    "short_tx:gemm_wgrad_tma" => mmkd_emu_short_tx_gemm_wgrad_tma,
    "no_init_fence:gemm_dgrad_tma" => mmkd_emu_no_init_fence_gemm_dgrad_tma,
    "broken_wait:gemm_fwd_wgmma" => mmkd_emu_broken_wait_gemm_fwd_wgmma,
    "broken_wait:gemm_wgrad_wgmma" => mmkd_emu_broken_wait_gemm_wgrad_wgmma,
    "ahead3:gemm_fwd_wgmma" => mmkd_emu_ahead3_gemm_fwd_wgmma,
    "ahead3:gemm_wgrad_wgmma" => mmkd_emu_ahead3_gemm_wgrad_wgmma,
    "no_proxy_fence:gemm_fwd_wgmma" => mmkd_emu_no_proxy_fence_gemm_fwd_wgmma,
    "no_proxy_fence:gemm_dgrad_wgmma" => mmkd_emu_no_proxy_fence_gemm_dgrad_wgmma,
    "no_proxy_fence:gemm_wgrad_wgmma" => mmkd_emu_no_proxy_fence_gemm_wgrad_wgmma,
    "no_wgmma_fence:gemm_fwd_wgmma" => mmkd_emu_no_wgmma_fence_gemm_fwd_wgmma,
    "no_wgmma_fence:gemm_dgrad_wgmma" => mmkd_emu_no_wgmma_fence_gemm_dgrad_wgmma,
    "no_wgmma_fence:gemm_wgrad_wgmma" => mmkd_emu_no_wgmma_fence_gemm_wgrad_wgmma,
    "early_read:frag_wgmma" => mmkd_emu_early_read_frag_wgmma,
    "emu_warp_ops" => mmkd_emu_emu_warp_ops,
    "emu_exit_before_barrier" => mmkd_emu_emu_exit_before_barrier,
    "emu_shfl_after_exit" => mmkd_emu_emu_shfl_after_exit,
    "emu_cp_async_order" => mmkd_emu_emu_cp_async_order,
    "emu_copy_n" => mmkd_emu_emu_copy_n,
    "emu_smem_n" => mmkd_emu_emu_smem_n,
    "emu_local_n" => mmkd_emu_emu_local_n,
    "mtl_normalize_f32" => mmkd_emu_mtl_normalize_f32,
    "mtl_normalize_bf16" => mmkd_emu_mtl_normalize_bf16,
    "mtl_targets_f32" => mmkd_emu_mtl_targets_f32,
    "mtl_targets_bf16" => mmkd_emu_mtl_targets_bf16,
    "mtl_row_stats" => mmkd_emu_mtl_row_stats,
    "mtl_grad_rows" => mmkd_emu_mtl_grad_rows,
    "mtl_row_stats_tc" => mmkd_emu_mtl_row_stats_tc,
    "mtl_grad_rows_tc" => mmkd_emu_mtl_grad_rows_tc,
    "mtl_finish" => mmkd_emu_mtl_finish,
    "mtl_reduce" => mmkd_emu_mtl_reduce,
    "grad_sumsq" => mmkd_emu_grad_sumsq,
    "grad_norm_finish" => mmkd_emu_grad_norm_finish,
    "adamw_step" => mmkd_emu_adamw_step,
    "image_normalize" => mmkd_emu_image_normalize,
    "cast_f32_bf16" => mmkd_emu_cast_f32_bf16,
    "cast_bf16_f32" => mmkd_emu_cast_bf16_f32,
    "axpby_f32" => mmkd_emu_axpby_f32,
    "axpby_bf16" => mmkd_emu_axpby_bf16,
    "embedding_gather" => mmkd_emu_embedding_gather,
    "embedding_scatter_add" => mmkd_emu_embedding_scatter_add,
    "act_fwd" => mmkd_emu_act_fwd,
    "act_bwd" => mmkd_emu_act_bwd,
    "softmax_rows" => mmkd_emu_softmax_rows,
    "broken_online:mtl_normalize_f32" => mmkd_emu_broken_online_mtl_normalize_f32,
    "broken_online:mtl_normalize_bf16" => mmkd_emu_broken_online_mtl_normalize_bf16,
    "broken_online:mtl_targets_f32" => mmkd_emu_broken_online_mtl_targets_f32,
    "broken_online:mtl_targets_bf16" => mmkd_emu_broken_online_mtl_targets_bf16,
    "broken_online:mtl_row_stats" => mmkd_emu_broken_online_mtl_row_stats,
    "broken_online:mtl_grad_rows" => mmkd_emu_broken_online_mtl_grad_rows,
    "broken_online:mtl_row_stats_tc" => mmkd_emu_broken_online_mtl_row_stats_tc,
    "broken_online:mtl_grad_rows_tc" => mmkd_emu_broken_online_mtl_grad_rows_tc,
    "broken_online:mtl_finish" => mmkd_emu_broken_online_mtl_finish,
    "broken_online:mtl_reduce" => mmkd_emu_broken_online_mtl_reduce,
    "broken_frag:mtl_normalize_f32" => mmkd_emu_broken_frag_mtl_normalize_f32,
    "broken_frag:mtl_normalize_bf16" => mmkd_emu_broken_frag_mtl_normalize_bf16,
    "broken_frag:mtl_targets_f32" => mmkd_emu_broken_frag_mtl_targets_f32,
    "broken_frag:mtl_targets_bf16" => mmkd_emu_broken_frag_mtl_targets_bf16,
    "broken_frag:mtl_row_stats" => mmkd_emu_broken_frag_mtl_row_stats,
    "broken_frag:mtl_grad_rows" => mmkd_emu_broken_frag_mtl_grad_rows,
    "broken_frag:mtl_row_stats_tc" => mmkd_emu_broken_frag_mtl_row_stats_tc,
    "broken_frag:mtl_grad_rows_tc" => mmkd_emu_broken_frag_mtl_grad_rows_tc,
    "broken_frag:mtl_finish" => mmkd_emu_broken_frag_mtl_finish,
    "broken_frag:mtl_reduce" => mmkd_emu_broken_frag_mtl_reduce,
    "gemm_fwd" => mmkd_emu_gemm_fwd,
    "gemm_dgrad" => mmkd_emu_gemm_dgrad,
    "gemm_wgrad" => mmkd_emu_gemm_wgrad,
    "gemm_splitk_reduce" => mmkd_emu_gemm_splitk_reduce,
    "broken_wait:gemm_fwd" => mmkd_emu_broken_wait_gemm_fwd,
    "broken_wait:gemm_dgrad" => mmkd_emu_broken_wait_gemm_dgrad,
    "broken_wait:gemm_wgrad" => mmkd_emu_broken_wait_gemm_wgrad,
    "attn_fwd" => mmkd_emu_attn_fwd,
    "attn_bwd_dkdv" => mmkd_emu_attn_bwd_dkdv,
    "attn_bwd_dq" => mmkd_emu_attn_bwd_dq,
    "broken_rescale:attn_fwd" => mmkd_emu_broken_rescale_attn_fwd,
    "no_refill_barrier:attn_fwd" => mmkd_emu_no_refill_barrier_attn_fwd,
}

/// True when the emulated kernels are instrumented with AddressSanitizer (built with
/// `MMKD_EMU_SANITIZE=address`, run by `tools/emu-sanitize.sh`): a kernel's access outside
/// every buffer, or into memory marked off limits with [`guard_host`], fails its launch with
/// an error naming the block and thread.
pub const SANITIZED: bool = cfg!(mmkd_emu_asan);

/// Marks `bytes` bytes at `ptr` off limits to emulated kernels (a no-op unless
/// [`SANITIZED`]). Host memory between the buffers of one allocation, such as the slack after
/// an arena region, is guarded this way, so a kernel that overruns its region into the next
/// fails under the sanitizer instead of reading the neighbour.
///
/// # Safety
/// The range must lie inside one live allocation and be [`unguard_host`]ed before that
/// allocation is freed or reused by code that may touch it.
pub unsafe fn guard_host(ptr: *const u8, bytes: usize) {
    // SAFETY: only updates the sanitizer's shadow of memory the caller owns.
    unsafe { mmkd_emu_poison(ptr.cast(), bytes, 1) }
}

/// Undoes [`guard_host`] for `bytes` bytes at `ptr`.
///
/// # Safety
/// As for [`guard_host`].
pub unsafe fn unguard_host(ptr: *const u8, bytes: usize) {
    // SAFETY: as above.
    unsafe { mmkd_emu_poison(ptr.cast(), bytes, 0) }
}

/// The order in which the scheduler resumes the threads of a block. Results of a correct
/// kernel do not depend on it; a race usually does, so tests run more than one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Thread 0 first (the default, unless `MMKD_EMU_SCHEDULE` says otherwise).
    Forward,
    /// The last thread first.
    Reverse,
    /// A shuffled order per block, reproducible from the seed.
    Shuffled(u64),
    /// Always the first runnable thread: warp 0 runs as far ahead of the others as the
    /// barriers allow (the orders above advance every warp about one warp operation per
    /// round), so a shared buffer refilled without a barrier shows, with
    /// [`Emu::with_eager_copies`], as a wrong result.
    Greedy,
}

/// Handle for launching emulated kernels. `Emu::default()` runs the normal build of each
/// kernel; [`Emu::variant`] selects a test variant built from the same source with a macro.
#[derive(Clone, Copy, Debug, Default)]
pub struct Emu {
    variant: Option<&'static str>,
    schedule: Option<Schedule>,
    eager_copies: bool,
}

impl Emu {
    /// The variant `name` (from a `mmkd-emu-variant` line) of every kernel that has one.
    pub fn variant(name: &'static str) -> Self {
        Emu {
            variant: Some(name),
            ..Emu::default()
        }
    }

    /// The same handle with a fixed thread schedule (else `MMKD_EMU_SCHEDULE` or forward).
    pub fn with_schedule(self, schedule: Schedule) -> Self {
        Emu {
            schedule: Some(schedule),
            ..self
        }
    }

    /// The same handle with every `cp.async` landing when it is issued rather than at the
    /// wait that covers it (the default, which makes a read before the wait see stale data).
    /// Landing early makes a refill of a buffer that another warp still reads (a missing
    /// barrier) change what it reads; a correct kernel gives the same results both ways.
    pub fn with_eager_copies(self) -> Self {
        Emu {
            eager_copies: true,
            ..self
        }
    }

    /// Runs `kernel` over `shape` with `args` (the kernel's parameters, in order).
    ///
    /// # Safety
    /// Every `Arg::Ptr` must point at host memory large enough for what the kernel reads and
    /// writes at this shape; the typed launchers (e.g. `layernorm::layernorm_forward_emu`)
    /// check lengths and are safe.
    pub unsafe fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()> {
        let key = match self.variant {
            Some(v) => format!("{v}:{kernel}"),
            None => kernel.to_string(),
        };
        let Some(&(_, entry)) = EMU_TABLE.iter().find(|(n, _)| *n == key) else {
            bail!("emulation: no kernel `{key}` in the emulation table (kernels/src/emu.rs)");
        };
        // Each scalar parameter lives in its own 8-byte slot; the C++ side reads it as its own
        // type. A tensor map is read in place (128 bytes, aligned as the C++ type).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => u64::from(v as u32),
                Arg::U32(v) => u64::from(v),
                Arg::F32(v) => u64::from(v.to_bits()),
                Arg::Map(_) => 0,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .zip(args)
            .map(|(s, a)| match a {
                // The kernel copies the map out and never writes through this pointer.
                Arg::Map(m) => m as *const _ as *mut c_void,
                _ => s as *mut u64 as *mut c_void,
            })
            .collect();
        let cfg = EmuLaunchCfg {
            grid: shape.grid,
            block: shape.block,
            shared_bytes: shape.shared_bytes,
        };
        let (mode, seed) = match self.schedule {
            None => (-1, 0),
            Some(Schedule::Forward) => (0, 0),
            Some(Schedule::Reverse) => (1, 0),
            Some(Schedule::Shuffled(s)) => (2, s),
            Some(Schedule::Greedy) => (3, 0),
        };
        // SAFETY: the schedule setter only stores thread-local values; `entry` reads
        // `ptrs.len()` parameter slots, each valid for the kernel's parameter type (4 or 8
        // bytes, little-endian), and the pointers are valid per this function's contract.
        let err = unsafe {
            mmkd_emu_set_schedule(mode, seed, i32::from(self.eager_copies));
            let e = entry(&cfg, ptrs.as_mut_ptr());
            mmkd_emu_set_schedule(-1, 0, 0);
            e
        };
        if err.is_null() {
            Ok(())
        } else {
            // SAFETY: a non-null return is a NUL-terminated message owned by this OS thread.
            let msg = unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            bail!("emulated kernel `{key}` failed: {msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::Arg;

    fn block(n: u32, shared: u32) -> LaunchShape {
        LaunchShape::linear(1, n, shared)
    }

    #[test]
    fn warp_operations_follow_cuda_semantics() {
        let mut out = vec![-1i32; 64 * 10];
        // SAFETY: out holds 64 x 10 ints, as the kernel writes.
        unsafe { Emu::default().launch("emu_warp_ops", block(64, 0), &[Arg::host_mut(&mut out)]) }
            .unwrap();
        for t in 0..64i32 {
            let (lane, base) = (t % 32, t - t % 32);
            let o = &out[t as usize * 10..t as usize * 10 + 10];
            let ballot = (0..32)
                .filter(|l| l % 3 == 0)
                .fold(0u32, |m, l| m | (1 << l)) as i32;
            let want = [
                base + (lane * 7) % 32,
                t ^ 5,
                if lane + 3 < 32 { t + 3 } else { t },
                if lane >= 2 { t - 2 } else { t },
                (t & !7) + 1,
                t,
                ballot,
                i32::from(base == 32),
                i32::from(base == 0),
                1,
            ];
            assert_eq!(o, want, "thread {t}");
        }
    }

    #[test]
    fn exited_threads_do_not_hold_a_barrier() {
        let mut out = vec![-1i32; 64];
        // SAFETY: out holds 64 ints.
        unsafe {
            Emu::default().launch(
                "emu_exit_before_barrier",
                block(64, 0),
                &[Arg::host_mut(&mut out)],
            )
        }
        .unwrap();
        assert_eq!(out[0], -1);
        for (t, v) in out.iter().enumerate().skip(1) {
            assert_eq!(*v, ((t % 63) + 1) as i32, "thread {t}");
        }
    }

    #[test]
    fn a_warp_op_missing_a_lane_is_an_error_not_a_hang() {
        let mut out = vec![0i32; 32];
        // SAFETY: out holds 32 ints.
        let e = unsafe {
            Emu::default().launch(
                "emu_shfl_after_exit",
                block(32, 0),
                &[Arg::host_mut(&mut out)],
            )
        }
        .unwrap_err();
        assert!(format!("{e}").contains("deadlock"), "{e}");
        // The next launch on this thread works: no state leaks from the failed one.
        let mut ok = vec![-1i32; 64];
        // SAFETY: as above.
        unsafe {
            Emu::default().launch(
                "emu_exit_before_barrier",
                block(64, 0),
                &[Arg::host_mut(&mut ok)],
            )
        }
        .unwrap();
        assert_eq!(ok[1], 2);
    }

    #[test]
    fn cp_async_lands_only_at_its_wait() {
        let src: Vec<f32> = (0..64).map(|i| i as f32 + 0.5).collect();
        let mut out = vec![0.0f32; 96];
        let args = [Arg::host(&src), Arg::host_mut(&mut out)];
        // SAFETY: src holds 64 floats, out 96, shared memory 256 bytes.
        unsafe { Emu::default().launch("emu_cp_async_order", block(32, 256), &args) }.unwrap();
        assert!(
            out[..32].iter().all(|v| v.is_nan()),
            "read before the wait saw the copy"
        );
        assert_eq!(&out[32..64], &src[..32]);
        assert_eq!(&out[64..96], &src[32..64]);
    }

    #[test]
    fn out_of_bounds_accesses_fail_under_the_sanitizer() {
        if !SANITIZED {
            eprintln!(
                "skipped: the emulation is not instrumented (tools/emu-sanitize.sh runs this test)"
            );
            return;
        }
        let x: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let mut y = vec![f32::NAN; 41];
        let copy = |y: &mut [f32], n: i32| {
            let args = [Arg::host(&x), Arg::host_mut(y), Arg::I32(n)];
            // SAFETY: the sanitizer's own probe: with n = 41 the kernel reads one float past
            // x, into the allocator's guard, which the instrumented build reports.
            unsafe { Emu::default().launch("emu_copy_n", block(32, 0), &args) }
        };
        copy(&mut y, 40).unwrap();
        assert_eq!(&y[..40], &x[..]);
        let e = copy(&mut y, 41).unwrap_err().to_string();
        assert!(e.contains("heap-buffer-overflow"), "{e}");
        assert!(
            e.contains("thread (8,0,0)"),
            "the report names the thread: {e}"
        );

        let mut out = vec![f32::NAN; 41];
        let smem = |out: &mut [f32], n: i32, floats: u32| {
            let args = [Arg::host_mut(out), Arg::I32(n)];
            // SAFETY: as above, for dynamic shared memory one float too small.
            unsafe { Emu::default().launch("emu_smem_n", block(32, 4 * floats), &args) }
        };
        smem(&mut out, 41, 41).unwrap();
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
        let e = smem(&mut out, 41, 40).unwrap_err().to_string();
        assert!(e.contains("use-after-poison"), "{e}");

        // A thread's local array, read past its end after the thread was suspended at a
        // barrier and resumed: the guards of its stack frame survive the switches.
        let local = |i: i32| {
            let mut out = vec![0.0f32; 64];
            let args = [Arg::host_mut(&mut out), Arg::I32(i)];
            // SAFETY: as above; i = 8 reads one past the kernel's local array.
            unsafe { Emu::default().launch("emu_local_n", block(64, 0), &args) }.map(|()| out)
        };
        assert_eq!(local(7).unwrap()[5], 12.0);
        let e = local(8).unwrap_err().to_string();
        assert!(
            e.contains("stack-buffer-overflow") && e.contains("READ of size 4"),
            "{e}"
        );

        // Guarded host memory inside one allocation: the first 40 floats of a 48 stay usable.
        let big = vec![0.5f32; 48];
        let tail = big[40..].as_ptr().cast::<u8>();
        // SAFETY: the 32 bytes after the 40th float lie inside `big`, unguarded below.
        unsafe { guard_host(tail, 32) };
        let run = |n: i32| {
            let mut y = vec![0.0f32; 48];
            let args = [Arg::host(&big), Arg::host_mut(&mut y), Arg::I32(n)];
            // SAFETY: `big` holds 48 floats; past 40 they are guarded, which is the probe.
            unsafe { Emu::default().launch("emu_copy_n", block(32, 0), &args) }
        };
        let inside = run(40);
        let past = run(41);
        // SAFETY: as above.
        unsafe { unguard_host(tail, 32) };
        inside.unwrap();
        let e = past.unwrap_err().to_string();
        assert!(e.contains("use-after-poison"), "{e}");
    }

    #[test]
    fn invalid_launches_and_unknown_kernels_are_errors() {
        let mut out = vec![0i32; 64];
        // SAFETY: the launch is rejected before the kernel runs.
        let e = unsafe {
            Emu::default().launch("emu_warp_ops", block(2048, 0), &[Arg::host_mut(&mut out)])
        }
        .unwrap_err();
        assert!(format!("{e}").contains("invalid launch"), "{e}");
        // SAFETY: no kernel runs.
        let e = unsafe { Emu::default().launch("no_such_kernel", block(32, 0), &[]) }.unwrap_err();
        assert!(format!("{e}").contains("no kernel `no_such_kernel`"), "{e}");
    }
}
