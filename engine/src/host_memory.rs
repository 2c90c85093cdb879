//! How the process's allocator treats the CPU tape's buffers.
//!
//! A CPU training step allocates every activation in the forward pass and frees them all at the
//! end of the backward pass, and the next step allocates the same sizes again. With glibc's
//! defaults that memory goes back to the kernel at each step's end: the top of the heap is
//! trimmed once more than twice the mmap threshold lies free there, and each buffer larger than
//! the threshold is its own mapping, unmapped on free. The next step then takes a page fault on
//! every fresh 4 KiB page, and each unmapping flushes the other threads' TLBs. On the tiny
//! config at batch 64 that was about a third of the step's time (`perf`: page faults, TLB
//! shootdowns and page-table locks), and fixing the thresholds made the step ≈1.5× faster
//! (`BENCHMARKS.md`, "Training step on CPU against PyTorch").

/// Largest mmap threshold glibc accepts on 64-bit targets (half its 64 MiB heap size): buffers up
/// to this size come from the heap, whose freed memory is reused without faults.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the top of the heap kept rather than returned to the kernel: a step's worth of
/// activations for the configurations trained on the CPU.
pub const TRIM_THRESHOLD: usize = 1 << 30;
/// Extra memory taken whenever the heap grows, so that a growing forward pass asks the kernel
/// for memory a few times rather than once per activation.
pub const TOP_PAD: usize = 64 << 20;

/// Makes the allocator keep memory the tape frees for the next step instead of returning it to
/// the kernel (see the module docs). Process-wide; call it once at start-up, before the worker
/// threads allocate. Returns whether the settings were applied: only with glibc, and never when
/// the user set any `MALLOC_*_` tunable of glibc's in the environment, which then wins.
pub fn keep_freed_memory() -> bool {
    if std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k.starts_with("MALLOC_") && k.ends_with('_') || k == "GLIBC_TUNABLES"
    }) {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    let settings = [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ];
    settings.iter().all(|&(param, value)| {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only adjusts the allocator's parameters; it is safe to call at any time
        // and reports a rejected value by returning 0.
        unsafe { libc::mallopt(param, value) == 1 }
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_settings() {
        // A value past glibc's limits (an mmap threshold above 32 MiB) is refused.
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(apply(), "mallopt refused a setting");
        }
    }
}
