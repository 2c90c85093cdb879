//! Builds the emulation library: every `cuda/*.cu` compiled by the host C++ compiler against the
//! host half of the prelude (`cuda/mmkd_emu.h`), plus the fiber runtime (`cuda/mmkd_emu.cpp`).
//!
//! Each `.cu` file is wrapped in its own namespace so helper functions of different files never
//! clash; kernels reach Rust through the `extern "C"` entry points that `MMKD_EXPORT` defines
//! (`mmkd_emu_<kernel>`). A line `// mmkd-emu-variant: NAME MACRO` in a `.cu` file builds it once
//! more with `MACRO` defined, exporting `mmkd_emu_NAME_<kernel>` (used for deliberately broken
//! variants that tests must catch).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cuda = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", cuda.display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .expect("kernels/cuda is readable")
        .map(|e| e.expect("directory entry").path())
        .collect();
    sources.sort();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(&cuda)
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        // Tensor maps are 128-byte aligned by-value parameters; GCC notes an ABI change from
        // 2011 for those, which concerns no caller here.
        .flag_if_supported("-Wno-psabi")
        .file(cuda.join("mmkd_emu.cpp"));
    // `MMKD_EMU_SANITIZE=address` instruments the emulated kernels with AddressSanitizer, so an
    // access past a buffer's end fails the launch (on a GPU it would be an illegal address).
    // The access itself still happens and the thread runs on until it yields. It needs the
    // runtime preloaded and `halt_on_error=0:suppress_equal_pcs=0`, so that every report fails
    // its launch (naming the block and thread) instead of ending the process or being
    // deduplicated: `tools/emu-sanitize.sh` sets them and runs the emulated tests this way.
    println!("cargo:rerun-if-env-changed=MMKD_EMU_SANITIZE");
    println!("cargo::rustc-check-cfg=cfg(mmkd_emu_asan)");
    match std::env::var("MMKD_EMU_SANITIZE").as_deref() {
        Ok("address") => {
            build
                .flag("-fsanitize=address")
                .flag("-fsanitize-recover=address")
                .flag("-fno-omit-frame-pointer")
                .define("MMKD_EMU_ASAN", "1");
            println!("cargo:rustc-link-lib=dylib=asan");
            println!("cargo:rustc-cfg=mmkd_emu_asan");
        }
        Ok("") | Err(_) => {}
        Ok(other) => panic!("MMKD_EMU_SANITIZE={other}: only `address` is supported"),
    }
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().and_then(|e| e.to_str()) != Some("cu") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 file name");
        let text = std::fs::read_to_string(path).expect("kernel source is readable");
        build.file(wrapper(&out, stem, path, None));
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("// mmkd-emu-variant:") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(mac)) = (parts.next(), parts.next()) else {
                    panic!(
                        "{}: malformed `mmkd-emu-variant` line: {line}",
                        path.display()
                    );
                };
                build.file(wrapper(&out, stem, path, Some((name, mac))));
            }
        }
    }
    build.compile("mmkd_emu");
}

/// Writes the translation unit that compiles `path` for the emulation and returns its path.
fn wrapper(out: &Path, stem: &str, path: &Path, variant: Option<(&str, &str)>) -> PathBuf {
    let mut tu = String::new();
    let tag = match variant {
        Some((name, mac)) => {
            writeln!(tu, "#define {mac} 1").unwrap();
            writeln!(tu, "#define MMKD_EMU_SYMBOL(k) mmkd_emu_{name}_##k").unwrap();
            format!("{stem}_{name}")
        }
        None => stem.to_string(),
    };
    writeln!(tu, "#include \"prelude.cuh\"").unwrap();
    writeln!(tu, "namespace mmkd_tu_{tag} {{").unwrap();
    writeln!(tu, "#include \"{}\"", path.display()).unwrap();
    writeln!(tu, "}}").unwrap();
    let file = out.join(format!("emu_{tag}.cpp"));
    std::fs::write(&file, tu).expect("OUT_DIR is writable");
    file
}
