//! NVRTC: finding the library, compiling the embedded sources, and the on-disk cache.
//!
//! cudarc's dynamic loader searches library *names* only and panics when none loads. So the
//! library is located here first (`MMKD_NVRTC_PATH`, then the CUDA toolkit and the NVIDIA
//! wheels PyTorch and pip install), opened with `dlopen`, and only then handed to cudarc: its
//! search includes the soname (`libnvrtc.so.13`), which the dynamic linker resolves to the
//! library already loaded. NVRTC in turn opens `libnvrtc-builtins` by name, so that one is
//! preloaded from the same directory. Nothing here panics when NVRTC is missing: it is an error.

use crate::registry::KernelFile;
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The newest PTX ISA a CUDA 13.0 driver loads (PTX ISA 9.0 shipped with CUDA 13.0).
pub const MAX_PTX_VERSION: (u32, u32) = (9, 0);

/// A loaded NVRTC. Only [`load`] makes one (cudarc's NVRTC calls panic unless the library is
/// loaded), hence `non_exhaustive`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Nvrtc {
    /// The file that was loaded.
    pub path: PathBuf,
    /// NVRTC's version (major, minor).
    pub version: (i32, i32),
    /// Directory of the CUDA headers passed as `-I`, when one was found.
    pub include_dir: Option<PathBuf>,
}

/// What to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// PTX for a virtual architecture (`compute_90`), as the compile gate feeds `ptxas`.
    Ptx,
    /// Machine code for a real architecture (`sm_90`), as the GPU backend loads it.
    Cubin,
}

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text or cubin bytes.
    pub image: Vec<u8>,
    /// NVRTC's log (warnings); empty when clean.
    pub log: String,
    /// Whether the image came from the disk cache.
    pub cached: bool,
}

fn candidate_paths() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = std::env::var_os(var) {
            v.push(PathBuf::from(&dir).join("lib64/libnvrtc.so.13"));
            v.push(PathBuf::from(&dir).join("lib64/libnvrtc.so"));
        }
    }
    for dir in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda-13.0/lib64",
        "/usr/lib/x86_64-linux-gnu",
    ] {
        v.push(Path::new(dir).join("libnvrtc.so.13"));
        v.push(Path::new(dir).join("libnvrtc.so"));
    }
    // NVIDIA wheels: `nvidia/cu13/lib` (CUDA 13 layout) and `nvidia/cuda_nvrtc/lib` (older).
    let mut site = vec![
        "/usr/lib/python3*/site-packages".to_string(),
        "/usr/lib/python3*/dist-packages".to_string(),
        "/usr/local/lib/python3*/site-packages".to_string(),
        "/usr/local/lib/python3*/dist-packages".to_string(),
        "/opt/conda/lib/python3*/site-packages".to_string(),
    ];
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        site.push(format!(
            "{}/.local/lib/python3*/site-packages",
            home.display()
        ));
        v.push(home.join(".cache/mmkd-ci/cuda/nvidia/cu13/lib/libnvrtc.so.13"));
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        site.push(format!(
            "{}/lib/python3*/site-packages",
            PathBuf::from(venv).display()
        ));
    }
    for pattern in site {
        for tail in [
            "nvidia/cu13/lib/libnvrtc.so.13",
            "nvidia/cuda_nvrtc/lib/libnvrtc.so.13",
        ] {
            if let Ok(paths) = glob::glob(&format!("{pattern}/{tail}")) {
                v.extend(paths.flatten());
            }
        }
    }
    v
}

fn dlopen_global(path: &Path) -> Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| anyhow!("NVRTC path {} contains a NUL byte", path.display()))?;
    // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process
    // (NVRTC stays loaded, as cudarc expects).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a message owned by libc or null.
        let e = unsafe { libc::dlerror() };
        let msg = if e.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null dlerror results are NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(e) }
                .to_string_lossy()
                .into_owned()
        };
        bail!("cannot load NVRTC from {}: {msg}", path.display());
    }
    Ok(())
}

/// Loads `libnvrtc-builtins` from beside `lib` first when it is there: NVRTC opens it by
/// name at compile time, and a wheel's directory is not on the loader's search path.
fn load_with_builtins(lib: &Path) -> Result<()> {
    if let Some(dir) = lib.parent() {
        let mut builtins: Vec<PathBuf> =
            glob::glob(&format!("{}/libnvrtc-builtins.so.*", dir.display()))
                .map(|g| g.flatten().collect())
                .unwrap_or_default();
        // The plain builtins, not the `.alt` variant.
        builtins.retain(|p| !p.to_string_lossy().contains(".alt."));
        builtins.sort();
        if let Some(b) = builtins.last() {
            dlopen_global(b)?;
        }
    }
    dlopen_global(lib)
}

fn find_include_dir(lib: &Path) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MMKD_CUDA_INCLUDE") {
        return Some(PathBuf::from(dir));
    }
    let beside = lib.parent()?.parent()?.join("include");
    if beside.join("cuda_runtime.h").exists() || beside.join("cuda_bf16.h").exists() {
        return Some(beside);
    }
    let sys = Path::new("/usr/local/cuda/include");
    sys.exists().then(|| sys.to_path_buf())
}

/// Loads NVRTC once per process (see the module docs for the search order).
pub fn load() -> Result<&'static Nvrtc> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    NVRTC
        .get_or_init(|| load_uncached().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn load_uncached() -> Result<Nvrtc> {
    let path = match std::env::var_os("MMKD_NVRTC_PATH") {
        Some(p) => {
            let p = PathBuf::from(p);
            load_with_builtins(&p).context("MMKD_NVRTC_PATH is set")?;
            p
        }
        None => {
            let candidates = candidate_paths();
            let found = candidates
                .iter()
                .find(|p| p.exists() && load_with_builtins(p).is_ok());
            match found {
                Some(p) => p.clone(),
                None => bail!(
                    "NVRTC not found: set MMKD_NVRTC_PATH to libnvrtc.so (searched CUDA_HOME, \
                     /usr/local/cuda, and the nvidia wheels in site-packages, {} paths)",
                    candidates.len()
                ),
            }
        }
    };
    // SAFETY: only probes whether a library loads under cudarc's candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "NVRTC at {} loaded, but not under a name cudarc looks for (libnvrtc.so.13): \
             is it CUDA 13?",
            path.display()
        );
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above); the out-pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("nvrtcVersion failed: {e:?}"))?;
    let include_dir = find_include_dir(&path);
    Ok(Nvrtc {
        path,
        version: (major, minor),
        include_dir,
    })
}

/// Where compiled images are cached: `MMKD_KERNEL_CACHE`, else `$XDG_CACHE_HOME/mmkd/kernels`,
/// else `~/.cache/mmkd/kernels`; `None` when none can be named.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("MMKD_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("mmkd/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mmkd/kernels"))
}

impl Nvrtc {
    /// The options passed for `arch` (`sm_90`, `sm_90a`, `sm_80`) and `out`.
    pub fn options(&self, arch: &str, out: Output) -> Vec<String> {
        let target = match out {
            Output::Ptx => arch.replacen("sm_", "compute_", 1),
            Output::Cubin => arch.to_string(),
        };
        let mut o = vec![
            format!("--gpu-architecture={target}"),
            "--std=c++17".to_string(),
            "--generate-line-info".to_string(),
            "-default-device".to_string(),
        ];
        if let Some(inc) = &self.include_dir {
            o.push(format!("--include-path={}", inc.display()));
        }
        o
    }

    /// Compiles `file` for `arch`, through the disk cache. The cache key hashes the expanded
    /// source, the options (which name the architecture) and NVRTC's version.
    pub fn compile(&self, file: &KernelFile, arch: &str, out: Output) -> Result<Compiled> {
        self.compile_in(file, arch, out, cache_dir().as_deref())
    }

    /// [`Nvrtc::compile`] with an explicit cache directory (`None`: no cache).
    pub fn compile_in(
        &self,
        file: &KernelFile,
        arch: &str,
        out: Output,
        cache: Option<&Path>,
    ) -> Result<Compiled> {
        let src = file.expanded_source();
        let opts = self.options(arch, out);
        let key = {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(src.as_bytes());
            for o in &opts {
                h.update(o.as_bytes());
                h.update(&[0]);
            }
            h.update(format!("{:?}", self.version).as_bytes());
            h.digest128()
        };
        let ext = match out {
            Output::Ptx => "ptx",
            Output::Cubin => "cubin",
        };
        let cached = cache.map(|d| d.join(format!("{}-{arch}-{key:032x}.{ext}", file.name)));
        if let Some(p) = &cached {
            // A file that is not a whole image (another writer's leftovers, a full disk) is
            // ignored and rewritten.
            if let Some(image) = std::fs::read(p).ok().filter(|i| whole_image(i, out)) {
                return Ok(Compiled {
                    image,
                    log: String::new(),
                    cached: true,
                });
            }
        }
        let compiled = self.compile_uncached(file, &src, &opts, out)?;
        if let Some(p) = &cached {
            // A cache that cannot be written only costs a recompile next time.
            let _ = write_atomic(p, &compiled.image);
        }
        Ok(compiled)
    }

    /// Compiles `file` for `arch` without the cache, so NVRTC's log (warnings) is always seen.
    pub fn compile_fresh(&self, file: &KernelFile, arch: &str, out: Output) -> Result<Compiled> {
        self.compile_uncached(file, &file.expanded_source(), &self.options(arch, out), out)
    }

    fn compile_uncached(
        &self,
        file: &KernelFile,
        src: &str,
        opts: &[String],
        out: Output,
    ) -> Result<Compiled> {
        use cudarc::nvrtc::{result, sys};
        let csrc =
            CString::new(src).map_err(|_| anyhow!("{}.cu contains a NUL byte", file.name))?;
        let cname =
            CString::new(format!("{}.cu", file.name)).map_err(|_| anyhow!("bad kernel name"))?;
        let prog = result::create_program(&csrc, Some(&cname))
            .map_err(|e| anyhow!("nvrtcCreateProgram({}.cu): {e:?}", file.name))?;
        // SAFETY: `prog` is a live program until destroyed at the end of this block.
        let res = unsafe {
            let compiled = result::compile_program(prog, opts);
            let log = result::get_program_log(prog)
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                    String::from_utf8_lossy(&bytes).trim().to_string()
                })
                .unwrap_or_default();
            let image = match compiled {
                Err(e) => Err(anyhow!(
                    "NVRTC failed to compile {}.cu ({e:?}) with {opts:?}:\n{log}",
                    file.name
                )),
                Ok(()) => match out {
                    Output::Ptx => result::get_ptx(prog)
                        .map(|p| p.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect())
                        .map_err(|e| anyhow!("nvrtcGetPTX({}.cu): {e:?}", file.name)),
                    Output::Cubin => {
                        let mut size = 0usize;
                        sys::nvrtcGetCUBINSize(prog, &mut size)
                            .result()
                            .map_err(|e| anyhow!("nvrtcGetCUBINSize({}.cu): {e:?}", file.name))?;
                        let mut buf = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
                            .result()
                            .map_err(|e| anyhow!("nvrtcGetCUBIN({}.cu): {e:?}", file.name))?;
                        Ok(buf)
                    }
                },
            };
            let _ = result::destroy_program(prog);
            image.map(|image| Compiled {
                image,
                log,
                cached: false,
            })
        };
        res
    }
}

/// The `.version` a PTX text declares, e.g. (9, 0).
pub fn ptx_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))?;
    let (a, b) = line.trim().split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// True when `image` looks like a complete NVRTC output: a 64-bit ELF file whose section
/// header table (which the compiler writes last) lies inside it, or PTX that declares its
/// version and ends with the closing brace of its last function.
fn whole_image(image: &[u8], out: Output) -> bool {
    match out {
        Output::Cubin => {
            let le = |at: usize, n: usize| -> Option<u64> {
                let b = image.get(at..at + n)?;
                Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
            };
            let table = (|| {
                let (off, size, count) = (le(0x28, 8)?, le(0x3a, 2)?, le(0x3c, 2)?);
                off.checked_add(size.checked_mul(count)?)
            })();
            image.starts_with(b"\x7fELF\x02")
                && table.is_some_and(|end| end > 0 && end <= image.len() as u64)
        }
        Output::Ptx => {
            image.windows(8).any(|w| w == b".version")
                && image.iter().rev().find(|b| !b.is_ascii_whitespace()) == Some(&b'}')
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a
/// partial file. Each call has its own temporary file, so threads or processes writing the
/// same path at once never write into one another's.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("image"),
        std::process::id(),
        SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_hits_on_the_same_key_and_misses_on_another_arch() {
        let Ok(nv) = load() else {
            eprintln!("NVRTC not found: skipping the cache test");
            return;
        };
        let dir =
            std::env::temp_dir().join(format!("mmkd-nvrtc-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = &crate::registry::LAYERNORM;
        let first = nv
            .compile_in(f, "sm_90", Output::Cubin, Some(&dir))
            .unwrap();
        assert!(!first.cached && !first.image.is_empty());
        // A cubin is an ELF file.
        assert_eq!(&first.image[..4], b"\x7fELF");
        let again = nv
            .compile_in(f, "sm_90", Output::Cubin, Some(&dir))
            .unwrap();
        assert!(again.cached);
        assert_eq!(again.image, first.image);
        let other = nv
            .compile_in(f, "sm_80", Output::Cubin, Some(&dir))
            .unwrap();
        assert!(!other.cached);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        // PTX is cached likewise (it passes the whole-image check).
        let ptx = nv
            .compile_in(f, "compute_90", Output::Ptx, Some(&dir))
            .unwrap();
        assert!(!ptx.cached);
        assert!(
            nv.compile_in(f, "compute_90", Output::Ptx, Some(&dir))
                .unwrap()
                .cached
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cached file that is not a whole image (truncated by a crash or another writer) is
    /// compiled again and rewritten, not handed to the driver.
    #[test]
    fn a_truncated_cache_entry_is_recompiled() {
        let Ok(nv) = load() else {
            eprintln!("NVRTC not found: skipping the cache test");
            return;
        };
        let dir =
            std::env::temp_dir().join(format!("mmkd-nvrtc-trunc-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let f = &crate::registry::ELEMENTWISE;
        let first = nv
            .compile_in(f, "sm_80", Output::Cubin, Some(&dir))
            .unwrap();
        let entry = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        // Cut at the tail, as a writer that stopped half way would leave it.
        std::fs::write(&entry, &first.image[..first.image.len() / 2]).unwrap();
        let again = nv
            .compile_in(f, "sm_80", Output::Cubin, Some(&dir))
            .unwrap();
        assert!(!again.cached, "a truncated cubin was served from the cache");
        assert_eq!(again.image, first.image);
        assert_eq!(std::fs::read(&entry).unwrap(), first.image);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Threads writing one path at once never leave it partial: every read sees one whole
    /// version.
    #[test]
    fn concurrent_atomic_writes_never_leave_a_partial_file() {
        let dir = std::env::temp_dir().join(format!("mmkd-atomic-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("image.bin");
        let versions: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1 << 16]).collect();
        std::thread::scope(|s| {
            for v in &versions {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(path, v).unwrap();
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..200 {
                    if let Ok(got) = std::fs::read(&path) {
                        assert!(
                            versions.contains(&got),
                            "a partial file: {} bytes",
                            got.len()
                        );
                    }
                }
            });
        });
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_ptx_version() {
        assert_eq!(
            ptx_version("//\n.version 9.0\n.target sm_90\n"),
            Some((9, 0))
        );
        assert_eq!(ptx_version(".target sm_90"), None);
    }

    /// Compiles every kernel file when NVRTC is available (CI sets MMKD_NVRTC_PATH); skips
    /// with a message otherwise, since the compile gate (`mmkd kernels check`) is the check
    /// that must fail in CI.
    #[test]
    fn compiles_every_kernel_file_when_nvrtc_is_present() {
        let Ok(nv) = load() else {
            eprintln!("NVRTC not found: skipping the NVRTC compile test");
            return;
        };
        for f in crate::registry::KERNEL_FILES {
            let arch = match f.min_arch {
                crate::registry::MinArch::Sm80 => "sm_90",
                crate::registry::MinArch::Sm90a => "sm_90a",
            };
            let c = nv.compile(f, arch, Output::Ptx).expect("compiles");
            let ptx = String::from_utf8(c.image).expect("PTX is text");
            for e in f.entries {
                assert!(
                    ptx.contains(&format!(".entry {e}(")),
                    "{}: no entry {e}",
                    f.name
                );
            }
            let v = ptx_version(&ptx).expect("PTX has a version");
            assert!(
                v <= MAX_PTX_VERSION,
                "{}: PTX {v:?} is newer than the driver reads",
                f.name
            );
        }
    }
}
