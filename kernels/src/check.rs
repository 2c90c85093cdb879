//! The compile gate: every kernel file through NVRTC (PTX for the virtual architecture), then,
//! when the tools are on `PATH`, `ptxas -v` for registers, shared memory, stack and spills and
//! `cuobjdump -sass` for tensor-core instructions.
//!
//! A kernel fails the gate when its file does not compile, NVRTC or ptxas warns, it spills, or
//! its PTX declares an ISA version newer than the CUDA 13.0 driver loads.

use crate::nvrtc::{self, Output, MAX_PTX_VERSION};
use crate::registry::{KernelFile, MinArch, KERNEL_FILES};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Resource use of one kernel, from `ptxas -v` (and SASS when available).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct KernelReport {
    /// Kernel entry point.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory, bytes.
    pub shared_bytes: u32,
    /// Stack frame, bytes.
    pub stack_bytes: u32,
    /// Spill stores, bytes.
    pub spill_store_bytes: u32,
    /// Spill loads, bytes.
    pub spill_load_bytes: u32,
    /// HMMA instructions in the SASS (None when cuobjdump was not run).
    pub hmma: Option<u32>,
    /// HGMMA (wgmma) instructions in the SASS.
    pub hgmma: Option<u32>,
    /// UTMALDG (tensor copy) instructions in the SASS.
    pub tma: Option<u32>,
}

/// One kernel file's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileReport {
    /// Kernel file name.
    pub file: String,
    /// Architecture compiled for.
    pub arch: String,
    /// PTX ISA version of NVRTC's output, e.g. "9.0".
    pub ptx_version: String,
    /// NVRTC's and ptxas' warnings (empty when clean).
    pub warnings: Vec<String>,
    /// Per kernel, when ptxas ran.
    pub kernels: Vec<KernelReport>,
    /// Why the file fails the gate (empty when it passes).
    pub failures: Vec<String>,
    /// Set when the file was not compiled for this architecture (needs a newer one).
    pub skipped: Option<String>,
    /// Why the SASS columns are empty although cuobjdump is on PATH (e.g. nvdisasm missing).
    pub sass_note: Option<String>,
}

/// The whole gate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// NVRTC library used and its version.
    pub nvrtc: String,
    /// ptxas used, if any.
    pub ptxas: Option<String>,
    /// cuobjdump used, if any.
    pub cuobjdump: Option<String>,
    /// Per kernel file.
    pub files: Vec<FileReport>,
}

impl CheckReport {
    /// True when no file fails.
    pub fn passed(&self) -> bool {
        self.files.iter().all(|f| f.failures.is_empty())
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Parses `ptxas -v` output into per-kernel reports.
pub fn parse_ptxas(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(KernelReport {
                kernel: name.to_string(),
                ..Default::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = num_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = num_before(line, "registers").unwrap_or(0);
                k.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Per function in `cuobjdump -sass` output: its name and its HMMA, HGMMA and UTMALDG counts.
pub fn count_tensor_ops(sass: &str) -> Vec<(String, u32, u32, u32)> {
    let mut out: Vec<(String, u32, u32, u32)> = Vec::new();
    for line in sass.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            out.push((name.trim().to_string(), 0, 0, 0));
        } else if let Some(f) = out.last_mut() {
            if line.contains("HGMMA") {
                f.2 += 1;
            } else if line.contains("HMMA") {
                f.1 += 1;
            } else if line.contains("UTMALDG") {
                f.3 += 1;
            }
        }
    }
    out
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<(bool, String)> {
    let o = cmd.output().with_context(|| format!("running {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok((o.status.success(), text))
}

fn check_file(
    file: &KernelFile,
    arch: &str,
    ptxas: Option<&Path>,
    cuobjdump: Option<&Path>,
    tmp: &Path,
) -> Result<FileReport> {
    let mut r = FileReport {
        file: file.name.to_string(),
        arch: arch.to_string(),
        ..Default::default()
    };
    if file.min_arch == MinArch::Sm90a && arch != "sm_90a" {
        r.skipped = Some(format!("needs sm_90a, checking {arch}"));
        return Ok(r);
    }
    let nv = nvrtc::load()?;
    let compiled = match nv.compile_fresh(file, arch, Output::Ptx) {
        Ok(c) => c,
        Err(e) => {
            r.failures.push(format!("{e:#}"));
            return Ok(r);
        }
    };
    if !compiled.log.is_empty() {
        r.warnings.push(format!("nvrtc: {}", compiled.log));
        r.failures.push("NVRTC warnings".into());
    }
    let ptx = String::from_utf8(compiled.image)
        .map_err(|_| anyhow!("{}: PTX is not UTF-8", file.name))?;
    match nvrtc::ptx_version(&ptx) {
        Some(v) => {
            r.ptx_version = format!("{}.{}", v.0, v.1);
            if v > MAX_PTX_VERSION {
                r.failures.push(format!(
                    "PTX {}.{} is newer than the CUDA 13.0 driver loads (9.0)",
                    v.0, v.1
                ));
            }
        }
        None => r.failures.push("PTX without a .version line".into()),
    }
    let Some(ptxas) = ptxas else { return Ok(r) };
    let ptx_path = tmp.join(format!("{}.ptx", file.name));
    let cubin = tmp.join(format!("{}.cubin", file.name));
    std::fs::write(&ptx_path, &ptx).with_context(|| format!("writing {}", ptx_path.display()))?;
    let (ok, log) = run_tool(
        Command::new(ptxas)
            .arg(format!("-arch={arch}"))
            .args([
                "-v",
                "--warn-on-spills",
                "--warn-on-local-memory-usage",
                "-o",
            ])
            .arg(&cubin)
            .arg(&ptx_path),
        "ptxas",
    )?;
    if !ok {
        r.failures.push(format!("ptxas failed:\n{log}"));
        return Ok(r);
    }
    for w in log.lines().filter(|l| l.contains("warning")) {
        r.warnings.push(format!("ptxas: {}", w.trim()));
        r.failures.push("ptxas warnings".into());
    }
    r.kernels = parse_ptxas(&log);
    for k in &r.kernels {
        if k.spill_store_bytes > 0 || k.spill_load_bytes > 0 {
            r.failures.push(format!(
                "{} spills ({} B stores, {} B loads)",
                k.kernel, k.spill_store_bytes, k.spill_load_bytes
            ));
        }
    }
    for e in file.entries {
        if !r.kernels.iter().any(|k| k.kernel == *e) {
            r.failures.push(format!("ptxas reported no kernel `{e}`"));
        }
    }
    if let Some(objdump) = cuobjdump {
        let (ok, sass) = run_tool(Command::new(objdump).arg("-sass").arg(&cubin), "cuobjdump")?;
        if !ok {
            // A missing disassembler is a tool problem, not a kernel's; it fails the gate only
            // for files that must show tensor-core instructions (below).
            let why = sass
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            r.sass_note = Some(format!("cuobjdump -sass failed: {}", why.trim()));
        } else {
            let counts = count_tensor_ops(&sass);
            for k in &mut r.kernels {
                let c = counts.iter().find(|c| c.0 == k.kernel);
                k.hmma = Some(c.map_or(0, |c| c.1));
                k.hgmma = Some(c.map_or(0, |c| c.2));
                k.tma = Some(c.map_or(0, |c| c.3));
            }
        }
    }
    for k in r
        .kernels
        .iter()
        .filter(|k| file.tensor_core_entries.contains(&k.kernel.as_str()))
    {
        {
            match (k.hmma, k.hgmma) {
                (Some(a), Some(b)) if a + b > 0 => {}
                (Some(_), Some(_)) => r
                    .failures
                    .push(format!("{}: no HMMA/HGMMA in the SASS", k.kernel)),
                _ => r.failures.push(format!(
                    "{}: SASS unavailable, tensor-core use unchecked",
                    k.kernel
                )),
            }
        }
    }
    for k in r
        .kernels
        .iter()
        .filter(|k| file.tma_entries.contains(&k.kernel.as_str()))
    {
        match k.tma {
            Some(n) if n > 0 => {}
            Some(_) => r.failures.push(format!(
                "{}: no UTMALDG (tensor copy) in the SASS",
                k.kernel
            )),
            None => r.failures.push(format!(
                "{}: SASS unavailable, tensor-copy use unchecked",
                k.kernel
            )),
        }
    }
    Ok(r)
}

/// The architecture a file is checked for when none is given: sm_90, or sm_90a for files that
/// need Hopper's arch-specific instructions.
pub fn default_arch(file: &KernelFile) -> &'static str {
    match file.min_arch {
        MinArch::Sm80 => "sm_90",
        MinArch::Sm90a => "sm_90a",
    }
}

/// Runs the gate for `arch` (`sm_80`, `sm_86`, `sm_89`, `sm_90` or `sm_90a`), or for each
/// file's [`default_arch`] when `None`.
pub fn check_all(arch: Option<&str>) -> Result<CheckReport> {
    if let Some(a) = arch {
        if !["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"].contains(&a) {
            bail!("unsupported architecture `{a}`: expected sm_80, sm_86, sm_89, sm_90 or sm_90a");
        }
    }
    let nv = nvrtc::load()?;
    let ptxas = on_path("ptxas");
    let cuobjdump = ptxas.as_ref().and(on_path("cuobjdump"));
    let tmp = tempdir()?;
    let mut report = CheckReport {
        nvrtc: format!("{} ({}.{})", nv.path.display(), nv.version.0, nv.version.1),
        ptxas: ptxas.as_ref().map(|p| p.display().to_string()),
        cuobjdump: cuobjdump.as_ref().map(|p| p.display().to_string()),
        files: Vec::new(),
    };
    // One thread per file: the files are independent (each writes its own PTX and cubin in
    // `tmp`), and a Hopper GEMM file alone keeps ptxas busy for seconds.
    let results: Vec<Result<FileReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = KERNEL_FILES
            .iter()
            .map(|f| {
                let a = arch.unwrap_or_else(|| default_arch(f));
                let (ptxas, cuobjdump, tmp) = (ptxas.as_deref(), cuobjdump.as_deref(), &tmp);
                s.spawn(move || check_file(f, a, ptxas, cuobjdump, tmp))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a kernel check thread panicked")))
            })
            .collect()
    });
    let _ = std::fs::remove_dir_all(&tmp);
    for r in results {
        report.files.push(r?);
    }
    Ok(report)
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("mmkd-kernels-check-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// The human-readable table `mmkd kernels check` prints.
pub fn render(report: &CheckReport) -> String {
    let mut s = format!(
        "nvrtc: {}\nptxas: {}\ncuobjdump: {}\n",
        report.nvrtc,
        report
            .ptxas
            .as_deref()
            .unwrap_or("not on PATH (no register/spill report)"),
        report
            .cuobjdump
            .as_deref()
            .unwrap_or("not on PATH (no SASS report)")
    );
    s += &format!(
        "{:<14} {:<26} {:>4} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>4}  status\n",
        "file", "kernel", "regs", "smem", "stack", "spillS", "spillL", "hmma", "hgmma", "tma"
    );
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
    for f in &report.files {
        let status = if let Some(why) = &f.skipped {
            format!("skipped ({why})")
        } else if f.failures.is_empty() {
            format!("ok (PTX {})", f.ptx_version)
        } else {
            format!("FAIL: {}", f.failures.join("; "))
        };
        if f.kernels.is_empty() {
            s += &format!("{:<14} {:<26} {status}\n", f.file, "-");
        }
        for k in &f.kernels {
            s += &format!(
                "{:<14} {:<26} {:>4} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>4}  {status}\n",
                f.file,
                k.kernel,
                k.registers,
                k.shared_bytes,
                k.stack_bytes,
                k.spill_store_bytes,
                k.spill_load_bytes,
                opt(k.hmma),
                opt(k.hgmma),
                opt(k.tma)
            );
        }
        for w in &f.warnings {
            s += &format!("  warning: {w}\n");
        }
        if let Some(n) = &f.sass_note {
            s += &format!("  note: {n}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With NVRTC present, a file that does not compile and one that only warns both fail the
    /// gate, and a clean file passes.
    #[test]
    fn gate_fails_on_errors_and_warnings() {
        if nvrtc::load().is_err() {
            eprintln!("NVRTC not found: skipping the gate test");
            return;
        }
        let file = |name: &'static str, source: &'static str| KernelFile {
            name,
            source,
            entries: &["k"],
            min_arch: MinArch::Sm80,
            tensor_core_entries: &[],
            tma_entries: &[],
        };
        let tmp = tempdir().unwrap();
        let bad = file(
            "bad",
            "#include \"prelude.cuh\"\nMMKD_KERNEL void k(int* o) { o[0] = ; }\n",
        );
        let warn = file(
            "warn",
            "#include \"prelude.cuh\"\nMMKD_KERNEL void k(int* o) { int unused = 3; o[0] = 1; }\n",
        );
        let clean = file(
            "clean",
            "#include \"prelude.cuh\"\nMMKD_KERNEL void k(int* o) { o[threadIdx.x] = 1; }\n",
        );
        let r = check_file(&bad, "sm_90", None, None, &tmp).unwrap();
        assert!(
            r.failures.iter().any(|f| f.contains("NVRTC failed")),
            "{:?}",
            r.failures
        );
        let r = check_file(&warn, "sm_90", None, None, &tmp).unwrap();
        assert!(
            r.failures.iter().any(|f| f.contains("NVRTC warnings")),
            "{:?} {:?}",
            r.failures,
            r.warnings
        );
        let r = check_file(&clean, "sm_90", None, None, &tmp).unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        // A kernel that must show tensor copies fails without them, and when its SASS cannot
        // be read (both need ptxas; CI has it on PATH).
        let claims_tma = KernelFile {
            tma_entries: &["k"],
            ..clean
        };
        if let Some(ptxas) = on_path("ptxas") {
            let r = check_file(&claims_tma, "sm_90", Some(&ptxas), None, &tmp).unwrap();
            assert!(
                r.failures
                    .iter()
                    .any(|f| f.contains("tensor-copy use unchecked")),
                "{:?}",
                r.failures
            );
            if let Some(objdump) = on_path("cuobjdump") {
                let r =
                    check_file(&claims_tma, "sm_90", Some(&ptxas), Some(&objdump), &tmp).unwrap();
                assert!(
                    r.failures.iter().any(|f| f.contains("no UTMALDG")),
                    "{:?}",
                    r.failures
                );
            }
        } else {
            eprintln!("ptxas not on PATH: the SASS rules of the gate are not exercised");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn parses_ptxas_and_sass() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k1' for 'sm_90'\n\
ptxas info    : Function properties for k1\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
ptxas info    : Function properties for k2\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let r = parse_ptxas(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].registers, r[0].shared_bytes, r[0].stack_bytes),
            (40, 128, 8)
        );
        assert_eq!((r[0].spill_store_bytes, r[0].spill_load_bytes), (4, 12));
        assert_eq!(
            (r[1].kernel.as_str(), r[1].registers, r[1].shared_bytes),
            ("k2", 12, 0)
        );
        let sass = "\tFunction : k1\n  /*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\
  /*0020*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n\tFunction : k2\n  /*0000*/ HGMMA.64x128x16.F32.BF16 gdesc[UR4] ;\n\
  /*0010*/ UTMALDG.3D [UR8], [UR14] ;\n";
        assert_eq!(
            count_tensor_ops(sass),
            vec![("k1".into(), 2, 0, 0), ("k2".into(), 0, 1, 1)]
        );
    }
}
