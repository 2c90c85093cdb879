//! `mmkd bench train` on the real binary: the JSON report has every field, finite and
//! consistent with itself and with the analytic FLOP count; a CUDA request without a GPU is a
//! clear error.

use std::path::PathBuf;
use std::process::{Command, Output};

const MMKD: &str = env!("CARGO_BIN_EXE_mmkd");

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.toml")
}

fn run(args: &[&str]) -> Output {
    Command::new(MMKD).args(args).output().unwrap()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    let x = v
        .get(key)
        .and_then(|x| x.as_f64())
        .unwrap_or_else(|| panic!("`{key}` missing or not a number in {v}"));
    assert!(x.is_finite(), "`{key}` = {x}");
    x
}

fn bench(stage: &str, extra: &[&str]) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!(
        "mmkd-bench-cli-{}-{stage}-{}",
        std::process::id(),
        extra.join("_").replace(['=', '.', '/'], "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let cfg = tiny();
    let mut args = vec![
        "bench",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--stage",
        stage,
        "--batch",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(
        out.status.success(),
        "bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(file, printed, "the file and stdout disagree");
    std::fs::remove_dir_all(&dir).unwrap();
    file
}

fn check_report(v: &serde_json::Value, stage: &str) {
    assert_eq!(v["engine"], "mmkd");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["stage"], stage);
    assert!(v["config"].as_str().unwrap().ends_with("tiny.toml"));
    assert_eq!(v["batch"], 8);
    assert_eq!(v["steps"], 2);
    let ms = &v["ms_per_step"];
    let parts: Vec<f64> = ["data", "forward", "backward", "optimizer"]
        .iter()
        .map(|k| num(ms, k))
        .collect();
    assert!(parts.iter().all(|&p| p >= 0.0), "{ms}");
    assert!(
        parts[1] > 0.0 && parts[2] > 0.0,
        "forward/backward not timed: {ms}"
    );
    let total = num(ms, "total");
    let sum: f64 = parts.iter().sum();
    assert!(
        (total - sum).abs() <= 1e-6 * total.max(1.0),
        "{total} vs {sum}"
    );
    let sps = num(v, "samples_per_s");
    let want = 8.0 / (total / 1e3);
    assert!((sps - want).abs() <= 1e-6 * want, "{sps} vs {want}");
    assert!(num(v, "peak_mem_bytes") > 1e6, "{v}");
    // At least the image tower's residual stream (17 tokens × width 64, f32) per block.
    assert!(
        num(v, "activation_bytes_per_sample") > (2 * 17 * 64 * 4) as f64,
        "{v}"
    );
    assert!(num(v, "last_loss") > 0.0);

    // FLOPs per sample lie between the counts for the shortest and the longest caption.
    let fps = num(v, "flops_per_sample");
    let cfg = mmkd_engine::ModelConfig::from_file(&tiny()).unwrap();
    let lo = mmkd_engine::flops::flops_per_sample(&cfg, 2.0);
    let hi = mmkd_engine::flops::flops_per_sample(&cfg, 32.0);
    assert!(lo < fps && fps < hi, "{lo} < {fps} < {hi}");
    let tok = num(v, "text_tokens_per_sample");
    assert!((2.0..=32.0).contains(&tok));
    // The tape runs on the valid tokens, packed.
    assert_eq!(num(v, "text_rows_per_sample"), tok, "{v}");
    // Achieved FLOP/s = FLOPs per sample × samples/s.
    let tf = num(v, "achieved_tflops");
    assert!(
        (tf - fps * sps / 1e12).abs() <= 1e-9 * tf.max(1e-12),
        "{tf}"
    );
}

#[test]
fn kd_report_is_complete_and_consistent() {
    let v = bench("kd", &["--peak-tflops", "1.5"]);
    check_report(&v, "kd");
    let mfu = num(&v, "mfu");
    let want = num(&v, "achieved_tflops") / 1.5;
    assert!((mfu - want).abs() <= 1e-9 * want, "{mfu} vs {want}");
}

#[test]
fn clip_report_without_peak_has_null_mfu() {
    let v = bench("clip", &["--set", "train.lr=1e-4"]);
    check_report(&v, "clip");
    assert!(v["mfu"].is_null(), "{v}");
}

#[test]
fn all_teachers_mode_runs() {
    let v = bench("kd", &["--set", "teacher_mode=all", "--teachers", "3"]);
    check_report(&v, "kd");
    assert_eq!(v["teacher_mode"], "all");
}

#[test]
fn cuda_without_gpu_is_a_clear_error() {
    let cfg = tiny();
    let out = run(&[
        "bench",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--stage",
        "kd",
        "--batch",
        "4",
        "--steps",
        "1",
        "--device",
        "cuda",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if mmkd_kernels::device::probe_driver().is_ok() {
        eprintln!("a CUDA driver is present: the no-GPU error is not checked here");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no CUDA driver"), "{err}");
}

/// `MMKD_GEMM_PATH` picks the products' path: the tensor-copy (TMA) feed and the persistent
/// warp-specialised kernels give the loss of the default wgmma path bit for bit (the same
/// products), and an unknown name is refused.
#[test]
fn gemm_path_override_is_honoured() {
    let cfg = tiny();
    let args = [
        "bench",
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--stage",
        "kd",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--device",
        "emu",
    ];
    let mut losses = Vec::new();
    for path in ["wgmma", "tma", "ws"] {
        let out = Command::new(MMKD)
            .args(args)
            .env("MMKD_GEMM_PATH", path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{path}: {err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["gemm_path"], path);
        losses.push(num(&v, "last_loss"));
    }
    assert_eq!(losses[0], losses[1], "{losses:?}");
    assert_eq!(losses[0], losses[2], "{losses:?}");
    let out = Command::new(MMKD)
        .args(args)
        .env("MMKD_GEMM_PATH", "fast")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("MMKD_GEMM_PATH"),
        "{err}"
    );
}

/// The kernel step under the emulation reports like the CPU one, with the arena's size and
/// the text run at the longest caption rounded up to the kernels' tile.
#[test]
fn emulated_kernel_step_reports() {
    let cfg = tiny();
    for stage in ["kd", "clip"] {
        let out = run(&[
            "bench",
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--stage",
            stage,
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "emu",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["device"], "emu");
        assert_eq!(v["stage"], stage);
        // The emulation runs the path an sm_90 GPU takes.
        assert_eq!(v["gemm_path"], "wgmma");
        let ms = &v["ms_per_step"];
        let parts: Vec<f64> = ["data", "forward", "backward", "optimizer"]
            .iter()
            .map(|k| num(ms, k))
            .collect();
        assert!(parts.iter().all(|&p| p > 0.0), "{ms}");
        let total = num(ms, "total");
        assert!(
            (total - parts.iter().sum::<f64>()).abs() <= 1e-6 * total,
            "{ms}"
        );
        // At least the fp32 masters, gradients and both moments of the model's parameters.
        let model = mmkd_engine::ModelConfig::from_file(&cfg).unwrap();
        let params = mmkd_engine::ClipModel::new(&model)
            .unwrap()
            .params
            .data()
            .len();
        assert!(num(&v, "arena_bytes") > (16 * params) as f64, "{v}");
        assert!(num(&v, "activation_bytes_per_sample") > 0.0, "{v}");
        // The valid tokens packed, each pass's rounded up to a 64-row tile, at most the
        // context's rows.
        let (tok, rows) = (
            num(&v, "text_tokens_per_sample"),
            num(&v, "text_rows_per_sample"),
        );
        assert!(rows >= tok && rows <= 32.0, "{v}");
        assert!(num(&v, "last_loss") > 0.0, "{v}");
    }
}

/// Activation checkpointing on the kernels: the same step (same loss, bit for bit) with a
/// smaller activation section, reported as such.
#[test]
fn emulated_kernel_step_with_checkpointing() {
    let cfg = tiny();
    let c = cfg.to_str().unwrap();
    let runs: Vec<serde_json::Value> = [&[][..], &["--checkpointing"][..]]
        .iter()
        .map(|extra| {
            let mut args = vec![
                "bench", "train", "--config", c, "--stage", "kd", "--batch", "4", "--steps", "2",
                "--warmup", "0", "--device", "emu",
            ];
            args.extend_from_slice(extra);
            let out = run(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{extra:?}: {err}");
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    assert_eq!(runs[0]["checkpointing"], false);
    assert_eq!(runs[1]["checkpointing"], true);
    assert!(num(&runs[0], "last_loss") > 0.0);
    assert_eq!(runs[0]["last_loss"], runs[1]["last_loss"]);
    let acts = |v: &serde_json::Value| num(v, "activation_bytes_per_sample");
    assert!(acts(&runs[1]) < acts(&runs[0]), "{} {}", runs[0], runs[1]);
}

/// `bench parity` under the emulation: the CPU and kernel curves agree within the default
/// tolerance, and a tolerance below bf16 precision makes the same run fail (the comparison is
/// live), with the curve still written.
#[test]
fn emulated_parity_agrees_and_a_tight_tolerance_fails() {
    let cfg = tiny();
    let dir = std::env::temp_dir().join(format!("mmkd-bench-emu-parity-{}", std::process::id()));
    // Stage 2 with all teachers: the kernels' `all` mode against the CPU's.
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("parity.json");
    let out = run(&[
        "bench",
        "parity",
        "--config",
        cfg.to_str().unwrap(),
        "--device",
        "emu",
        "--batch",
        "4",
        "--steps",
        "3",
        "--set",
        "teacher_mode=all",
        "--tol",
        "1e-9",
        "--json",
        json.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the loss curves differ"), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(v["pass"], false);
    assert_eq!(v["gemm_path"], "wgmma");
    let worst = num(&v, "max_rel_total");
    assert!(worst > 1e-9 && worst < 2e-2, "{v}");
    let curve = v["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 3);
    let mut totals = Vec::new();
    for row in curve {
        let (c, k) = (num(&row["cpu"], "total"), num(&row["kernels"], "total"));
        assert!(c > 0.0 && k > 0.0, "{row}");
        assert!(num(row, "rel_total") <= worst);
        totals.push(c);
    }
    // The steps see different batches and updated weights: the curve is not one value.
    assert!(totals.windows(2).any(|w| w[0] != w[1]), "{totals:?}");
}

#[test]
fn bad_arguments_are_refused() {
    let cfg = tiny();
    let c = cfg.to_str().unwrap();
    let out = run(&[
        "bench", "train", "--config", c, "--stage", "kd", "--batch", "0", "--steps", "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch"));
    let out = run(&[
        "bench",
        "train",
        "--config",
        "/nonexistent/cfg.toml",
        "--stage",
        "kd",
        "--batch",
        "2",
        "--steps",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cfg.toml"));
}

#[test]
fn save_parity_writes_weights_batch_and_loss() {
    let dir = std::env::temp_dir().join(format!("mmkd-bench-parity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let v = bench(
        "kd",
        &[
            "--set",
            "teacher_mode=all",
            "--teachers",
            "3",
            "--save-parity",
            dir.to_str().unwrap(),
        ],
    );
    let cfg = mmkd_engine::ModelConfig::from_file(&tiny()).unwrap();
    // The weights are the initial ones (the first step's update comes after the save).
    let mut fresh = mmkd_engine::ClipModel::new(&cfg).unwrap();
    let init = fresh.params.data().to_vec();
    fresh
        .params
        .load_safetensors(&dir.join("model.safetensors"))
        .unwrap();
    assert_eq!(fresh.params.data(), &init[..]);

    let t = mmkd_engine::checkpoint::read_tensors(&dir.join("batch.safetensors")).unwrap();
    let (n, d) = (8usize, cfg.embed_dim);
    assert_eq!(t["images"].0, vec![n, 3, 32, 32]);
    let lengths = &t["lengths"].1;
    let l = t["tokens"].0[1];
    assert_eq!(t["tokens"].0[0], n);
    assert_eq!(l as f32, lengths.iter().cloned().fold(0.0, f32::max));
    assert_eq!(t["teacher_image"].0, vec![n, 3, d]);
    assert_eq!(t["teacher_mask"].0, vec![n, 3]);
    // Padding tokens are zero; every sample has a teacher.
    for (i, &len) in lengths.iter().enumerate() {
        assert!(t["tokens"].1[i * l + len as usize..(i + 1) * l]
            .iter()
            .all(|&x| x == 0.0));
        assert!(t["teacher_mask"].1[i * 3..i * 3 + 3].contains(&1.0));
    }
    // The recorded loss is the first (warm-up) step's: finite, with every stage-2 term.
    let loss: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("loss.json")).unwrap()).unwrap();
    let (task, fd, icl, total) = (
        num(&loss, "task"),
        num(&loss, "fd"),
        num(&loss, "icl"),
        num(&loss, "total"),
    );
    assert!(task > 0.0 && fd > 0.0 && icl > 0.0);
    assert!((total - (task + 50.0 * fd + icl)).abs() < 1e-9 * total);
    assert!(num(&v, "last_loss") > 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench parity` under the emulation for stage 1, for a learned icl scale (stage 2, a
/// learning rate large enough that ℓ moves) and with activation checkpointing on both sides:
/// each follows the CPU within the default tolerance.
#[test]
fn emulated_parity_of_stage_1_and_a_learned_icl_scale() {
    let cfg = tiny();
    let c = cfg.to_str().unwrap();
    for extra in [
        &["--stage", "clip"][..],
        &[
            "--stage",
            "kd",
            "--set",
            "icl_scale=learned",
            "--set",
            "lr=0.02",
            "--set",
            "warmup=0",
        ][..],
        &["--stage", "kd", "--set", "checkpointing=true"][..],
    ] {
        let mut args = vec![
            "bench", "parity", "--config", c, "--device", "emu", "--batch", "4", "--steps", "3",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {err}");
        assert!(err.contains("parity: pass"), "{err}");
    }
}

/// `mmkd bench memory` on the tiny config at batch 8 with `extra` flags; its JSON.
fn memory_report(extra: &[&str]) -> serde_json::Value {
    let cfg = tiny();
    let mut args = vec![
        "bench",
        "memory",
        "--config",
        cfg.to_str().unwrap(),
        "--batch",
        "8",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{extra:?}: {err}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `bench memory` builds the step's table without allocating it: the sections add up to the
/// arena (within the alignment gaps), and checkpointing and micro-batches shrink the
/// activations; a micro-batch that does not divide the batch is refused.
#[test]
fn memory_report_adds_up_and_shrinks_with_checkpointing_and_micro_batches() {
    let cfg = tiny();
    let c = cfg.to_str().unwrap();
    let report = memory_report;
    let plain = report(&[]);
    let sum: f64 = plain["sections"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let arena = num(&plain, "arena_bytes");
    assert!(sum <= arena && arena - sum < 7.0 * 256.0, "{plain}");
    let acts = |v: &serde_json::Value| num(&v["sections"], "activations");
    let ckpt = report(&["--checkpointing"]);
    assert_eq!(ckpt["checkpointing"], true);
    assert!(acts(&ckpt) < acts(&plain), "{ckpt}");
    let micro = report(&["--set", "micro_batch=4"]);
    assert!(acts(&micro) < acts(&plain), "{micro}");
    let out = run(&[
        "bench",
        "memory",
        "--config",
        c,
        "--batch",
        "8",
        "--set",
        "micro_batch=3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("divide"));
}

/// `bench memory` counts the rows the kernels' text tower runs on at `bench train`'s caption
/// lengths: the valid tokens packed per pass and rounded up to a 64-row tile (at most the
/// batch's B·context rows), against padding each batch to its longest caption.
#[test]
fn memory_report_counts_the_packed_text_rows() {
    let cfg = tiny();
    let c = cfg.to_str().unwrap();
    let rows = |extra: &[&str]| memory_report(extra)["text_rows"].clone();
    // Every caption 30 tokens of the tiny config's 32: 240 tokens a batch, packed into all
    // 8 · 32 = 256 rows (the next tile, 256, is the cap), padded to 30 a row.
    let fixed = rows(&["--caption-median", "30", "--caption-sigma", "0"]);
    assert_eq!(num(&fixed, "tokens_per_sample"), 30.0, "{fixed}");
    assert_eq!(num(&fixed, "padded_rows_per_sample"), 30.0, "{fixed}");
    assert_eq!(num(&fixed, "packed_rows_per_sample"), 32.0, "{fixed}");
    assert_eq!(
        num(&fixed, "flops_per_sample"),
        num(&fixed, "padded_flops_per_sample")
    );
    // The default log-normal lengths: filler under one tile per pass, padding to the longest.
    for (extra, passes) in [(&[][..], 1.0), (&["--set", "micro_batch=4"][..], 2.0)] {
        let v = rows(extra);
        let (tok, packed) = (
            num(&v, "tokens_per_sample"),
            num(&v, "packed_rows_per_sample"),
        );
        let padded = num(&v, "padded_rows_per_sample");
        assert!(tok >= 2.0 && packed >= tok, "{extra:?}: {v}");
        assert!(packed - tok < passes * 64.0 / 8.0, "{extra:?}: {v}");
        assert!(padded >= tok && padded <= 32.0, "{extra:?}: {v}");
        let (f, fp) = (
            num(&v, "flops_per_sample"),
            num(&v, "padded_flops_per_sample"),
        );
        assert!(f > 0.0 && fp >= f, "{extra:?}: {v}");
    }
    let out = run(&[
        "bench",
        "memory",
        "--config",
        c,
        "--batch",
        "8",
        "--caption-batches",
        "0",
    ]);
    assert!(!out.status.success());
}
