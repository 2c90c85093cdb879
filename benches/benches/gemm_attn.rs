//! GPU timing of the tensor-core GEMM and the fused attention at the student model's shapes,
//! after a correctness check of each against its CPU reference (see
//! `mmkd_kernels::gemm_attn_bench`). The PyTorch side of the comparison is
//! `tools/torch_gemm_attn_bench.py`, with the same cases.
//!
//! Run: `cargo bench -p mmkd-benches --bench gemm_attn` (JSON to `$MMKD_BENCH_JSON` when set;
//! `MMKD_BENCH_GEMM_PATH=tma` runs the TMA-fed GEMM alone, `=ws` the persistent
//! warp-specialised one).
//! Without a GPU it says so and exits successfully; a failed check exits with an error.

use anyhow::{bail, Context, Result};
use mmkd_kernels::gemm_attn_bench::{run, BenchConfig};
use mmkd_kernels::{Device, DeviceRequest};

fn main() -> Result<()> {
    // MMKD_BENCH_GEMM_PATH=tma or ws: the GEMM fed by the tensor copy engine, or the
    // persistent warp-specialised one, alone (a separate process, so a fault there leaves the
    // other results standing).
    let cfg = match std::env::var("MMKD_BENCH_GEMM_PATH").ok().as_deref() {
        None | Some("") => BenchConfig::default(),
        Some("tma") => BenchConfig::tma(),
        Some("ws") => BenchConfig::ws(),
        Some(other) => bail!("MMKD_BENCH_GEMM_PATH must be `tma`, `ws` or unset, got `{other}`"),
    };
    let gpu = match Device::select(DeviceRequest::Auto)? {
        Device::Cuda(g) => g,
        Device::Cpu => {
            println!("no GPU: gemm_attn benchmark not run");
            return Ok(());
        }
    };
    let report = run(&gpu, &cfg)?;
    print!("{}", report.render());
    if let Ok(path) = std::env::var("MMKD_BENCH_JSON") {
        std::fs::write(&path, report.to_json()?).with_context(|| format!("writing {path}"))?;
    }
    if !report.passed() {
        bail!("a GEMM or attention kernel disagrees with its CPU reference (see the checks above)");
    }
    Ok(())
}
