//! Where a CPU training step runs: on one of rayon's worker threads, not beside them.
//!
//! The CPU ops split their work with rayon (the `gemm` crate's products, the row loops of the
//! element-wise ops and LayerNorm). A parallel region started from a thread outside rayon's pool
//! is queued for the workers while the caller blocks on a lock, and when the region ends the
//! workers spin and yield for a while before they sleep, looking for more. A step is hundreds of
//! such regions with serial stretches between them, so each region paid a hand-off through the
//! kernel, and during the serial stretches the caller shared the cores with as many spinning
//! workers as there are cores. Run on a worker, the step is itself one of the pool's threads:
//! a region's first half runs in place and only one core's worth of threads is ever runnable.
//! On two cores that made the tiny config's step ≈1.3× faster (`BENCHMARKS.md`, "Training step
//! on CPU against PyTorch").

/// Stack of each worker when this module starts the global pool: the size of a main thread's
/// (rayon's default is 2 MiB), since a whole command runs on one of them.
pub const WORKER_STACK: usize = 8 << 20;

/// Runs `f` on a worker thread of rayon's global pool and returns its result; the calling thread
/// waits. Called from a worker already, `f` runs in place. Panics in `f` propagate to the caller.
/// Starts the global pool with [`WORKER_STACK`]-sized stacks unless it is running already (its
/// size then stays as it is; `RAYON_NUM_THREADS` still sets the number of workers).
pub fn run_on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // An error only means the global pool exists already, which is as good.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK)
        .build_global();
    // `scope` runs its body on a worker of the global pool when called from outside it.
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_worker_and_returns_the_result() {
        assert!(rayon::current_thread_index().is_none());
        let (idx, v) = run_on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(idx.is_some(), "the closure did not run on a pool worker");
        assert_eq!(v, 42);
        // Nested: already on a worker, runs in place.
        let nested = run_on_pool(|| {
            let outer = rayon::current_thread_index();
            (outer, run_on_pool(rayon::current_thread_index))
        });
        assert_eq!(nested.0, nested.1);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| run_on_pool(|| panic!("inside the pool")));
        assert!(r.is_err());
    }
}
