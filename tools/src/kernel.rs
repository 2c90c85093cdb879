//! Kernel subcommands: `mmkd kernels check` (the NVRTC compile gate) and `mmkd selftest`
//! (every memory-bound kernel against its CPU reference, then timed, on a GPU or the emulation).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mmkd_kernels::nvrtc::write_atomic;
use mmkd_kernels::{check, selftest, DeviceRequest, Gpu};
use std::path::PathBuf;

/// Commands about the CUDA kernels.
#[derive(Subcommand)]
pub enum KernelCommand {
    /// CUDA kernels: compile gate and reports.
    #[command(subcommand)]
    Kernels(KernelsCommand),
    /// Run every memory-bound kernel against its CPU reference on fresh random inputs with
    /// poisoned outputs; on a GPU, then time each with CUDA events (median of many) and print
    /// GB/s and TFLOP/s beside the H200 ceilings. Fails when any kernel misses its tolerance.
    Selftest(SelftestArgs),
}

/// Options of `mmkd selftest`.
#[derive(Args)]
pub struct SelftestArgs {
    /// `cuda`, `cuda:N` (a GPU; an error without the NVIDIA driver) or `emu` (the CPU emulation
    /// of the same CUDA sources, small sizes, no timing).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timed launches per kernel on a GPU (after 3 warm-up launches).
    #[arg(long, default_value_t = 50)]
    iters: usize,
}

/// `mmkd kernels ...`
#[derive(Subcommand)]
pub enum KernelsCommand {
    /// Compile every kernel with NVRTC; with ptxas/cuobjdump on PATH, report registers,
    /// shared memory, stack, spills and tensor-core instructions. Fails when a kernel does not
    /// compile, warns or spills.
    Check(CheckArgs),
}

/// Options of `mmkd kernels check`.
#[derive(Args)]
pub struct CheckArgs {
    /// Target architecture (sm_80, sm_86, sm_89, sm_90, sm_90a); default: sm_90, or sm_90a for
    /// kernels that need it.
    #[arg(long)]
    arch: Option<String>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: KernelCommand) -> Result<()> {
    match cmd {
        KernelCommand::Kernels(KernelsCommand::Check(a)) => run_check(a),
        KernelCommand::Selftest(a) => run_selftest(a),
    }
}

fn run_selftest(a: SelftestArgs) -> Result<()> {
    // Each case's row goes to stderr as it completes, and with --json the report so far is
    // saved after each case: a case that hangs or faults the device keeps the ones before it.
    let mut progress = |r: &selftest::Report| -> Result<()> {
        if let Some(c) = r.cases.last() {
            eprint!("{}", c.render());
        }
        if let Some(path) = &a.json {
            write_atomic(path, &serde_json::to_vec_pretty(r)?)?;
        }
        Ok(())
    };
    let report = match a.device.as_str() {
        "emu" => selftest::run_reporting(selftest::Target::Emu, 0, &mut progress)?,
        other => {
            let req: DeviceRequest = other.parse()?;
            let DeviceRequest::Cuda(n) = req else {
                bail!("selftest runs on `cuda`, `cuda:N` or `emu`, not `{other}`");
            };
            let gpu = Gpu::new(n)?;
            selftest::run_reporting(selftest::Target::Gpu(&gpu), a.iters, &mut progress)?
        }
    };
    print!("{}", report.render());
    if let Some(path) = &a.json {
        write_atomic(path, &serde_json::to_vec_pretty(&report)?)?;
    }
    let failed: Vec<&str> = report
        .cases
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("selftest failed for: {}", failed.join(", "));
    }
    Ok(())
}

fn run_check(a: CheckArgs) -> Result<()> {
    let report = check::check_all(a.arch.as_deref()).context("kernel compile gate")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", check::render(&report));
    }
    if !report.passed() {
        let failed: Vec<&str> = report
            .files
            .iter()
            .filter(|f| !f.failures.is_empty())
            .map(|f| f.file.as_str())
            .collect();
        bail!("kernel compile gate failed for: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver `--device cuda` is the clear error; with one this test does nothing
    /// (the GPU run is `tools/gpu-check.sh`'s job).
    #[test]
    fn selftest_on_cuda_without_driver_is_a_clear_error() {
        if mmkd_kernels::device::probe_driver().is_ok() {
            return;
        }
        let e = run_selftest(SelftestArgs {
            device: "cuda".into(),
            json: None,
            iters: 1,
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("no CUDA driver found"), "{e:#}");
        let e = run_selftest(SelftestArgs {
            device: "cpu".into(),
            json: None,
            iters: 1,
        })
        .unwrap_err();
        assert!(format!("{e}").contains("not `cpu`"), "{e}");
    }

    /// `mmkd selftest --device emu --json FILE`: passes and writes a report naming every kernel.
    #[test]
    fn selftest_on_emulation_passes_and_writes_json() {
        let dir = std::env::temp_dir().join(format!("mmkd-selftest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("selftest.json");
        run_selftest(SelftestArgs {
            device: "emu".into(),
            json: Some(path.clone()),
            iters: 0,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let names: Vec<&str> = v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for k in [
            "mt_loss",
            "adamw_step",
            "grad_norm",
            "image_normalize",
            "softmax_rows",
        ] {
            assert!(
                names.iter().any(|n| n.starts_with(k)),
                "{k} missing from {names:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
