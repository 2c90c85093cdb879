//! End-to-end tests of `mmkd train`, `eval`, `report` and `demo` on the real binary: resume after
//! a real SIGKILL is bit-identical, a NaN stops the run without touching the last checkpoint,
//! and the quick demo runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MMKD: &str = env!("CARGO_BIN_EXE_mmkd");

/// A very small student whose joint width matches the teachers' projected 512-d targets.
const CONFIG: &str = r#"
embed_dim = 512
seed = 1
[vision]
image_size = 16
patch_size = 8
width = 32
layers = 1
heads = 2
mlp_ratio = 2.0
act = "quick_gelu"
[text]
vocab_size = 1024
context_length = 32
width = 32
layers = 1
heads = 2
mlp_ratio = 2.0
act = "gelu"
norm = "post"
causal = false
pooling = "cls"
[train]
batch_size = 16
micro_batch = 8
epochs = 6
lr = 0.001
warmup = 3
save_every = 2
keep_last = 2
workers = 2
"#;

fn run(args: &[&str]) -> Output {
    Command::new(MMKD).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Synthesised and packed once per test binary: (root, train dir, eval dir, config file).
fn data() -> &'static (PathBuf, PathBuf, PathBuf, PathBuf) {
    static DATA: OnceLock<(PathBuf, PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DATA.get_or_init(|| {
        // Under the target directory and one fixed name, removed first, so that repeated runs
        // reuse one copy (a static is never dropped, so nothing here could remove it at exit).
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("train-cli");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let raw = root.join("raw");
        let r = raw.to_str().unwrap();
        ok(
            run(&[
                "synth",
                "--out",
                r,
                "--train",
                "64",
                "--eval",
                "40",
                "--image-size",
                "32",
            ]),
            "synth",
        );
        let train = root.join("train");
        let eval = root.join("eval");
        ok(
            run(&[
                "pack",
                "--format",
                "mmkd-clip",
                "--input",
                &format!("{r}/train"),
                "--out",
                train.to_str().unwrap(),
                "--image-size",
                "16",
                "--context-length",
                "32",
                "--vocab-size",
                "1024",
                "--no-progress",
            ]),
            "pack train",
        );
        ok(
            run(&[
                "pack",
                "--format",
                "mmkd-clip",
                "--input",
                &format!("{r}/eval"),
                "--out",
                eval.to_str().unwrap(),
                "--image-size",
                "16",
                "--context-length",
                "32",
                "--tokenizer",
                train.join("tokenizer.json").to_str().unwrap(),
                "--no-progress",
            ]),
            "pack eval",
        );
        let cfg = root.join("tiny-test.toml");
        std::fs::write(&cfg, CONFIG).unwrap();
        (root, train, eval, cfg)
    })
}

fn train_cmd(out: &Path, extra: &[&str]) -> Command {
    train_stage(out, "kd", extra)
}

fn train_stage(out: &Path, stage: &str, extra: &[&str]) -> Command {
    let (_, train, _, cfg) = data();
    let mut c = Command::new(MMKD);
    c.args(["train", "--quiet", "--stage", stage, "--config"])
        .arg(cfg)
        .arg("--data")
        .arg(train)
        .arg("--out")
        .arg(out)
        .args(extra);
    c
}

fn final_weights(run: &Path) -> Vec<u8> {
    let ck = run.join("checkpoints");
    let mut dirs: Vec<_> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".tmp"))
        .collect();
    dirs.sort();
    std::fs::read(dirs.last().unwrap().join("model.safetensors")).unwrap()
}

fn metric_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn sigkill_then_resume_is_bit_identical() {
    let (root, ..) = data();
    let reference = root.join("ref");
    let out = ok(
        train_cmd(&reference, &[]).output().unwrap(),
        "reference run",
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = summary["steps"].as_u64().unwrap();
    assert_eq!(steps, 24, "64 samples / 16 × 6 epochs");
    let want = final_weights(&reference);

    // Kill at several points: early (maybe before any checkpoint), after a checkpoint appears,
    // and later; each resumed run must end bit-identical to the uninterrupted one.
    for (k, wait_for) in [None, Some("step-00000002"), Some("step-00000008")]
        .iter()
        .enumerate()
    {
        let dir = root.join(format!("killed-{k}"));
        let mut child = train_cmd(&dir, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        match wait_for {
            // As soon as the run has opened its metrics (a whole run can take well under a
            // second on a fast machine, so a fixed delay may miss it).
            None => {
                while !dir.join("metrics.jsonl").exists() && t0.elapsed() < Duration::from_secs(120)
                {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Some(name) => {
                while !dir.join("checkpoints").join(name).exists()
                    && t0.elapsed() < Duration::from_secs(120)
                {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // std's Child::kill sends SIGKILL on Unix.
        let _ = child.kill();
        let status = child.wait().unwrap();
        eprintln!("kill point {k}: {status:?} after {:?}", t0.elapsed());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "kill point {k}: the run ended before the kill"
        );
        ok(
            train_cmd(&dir, &["--resume"]).output().unwrap(),
            "resumed run",
        );
        assert!(
            final_weights(&dir) == want,
            "kill point {k}: weights differ after resume"
        );
        assert_eq!(
            metric_steps(&dir),
            (1..=steps).collect::<Vec<_>>(),
            "kill point {k}"
        );
    }
}

#[test]
fn nan_stops_the_run_and_leaves_the_last_checkpoint_untouched() {
    let (root, ..) = data();
    let clean = root.join("clean-2");
    ok(
        train_cmd(&clean, &["--set", "stop_after=2"])
            .output()
            .unwrap(),
        "clean run",
    );
    let bad = root.join("nan");
    let out = train_cmd(&bad, &["--set", "fault_nan_at_step=3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at step 3") && err.contains("task") && err.contains("fd"),
        "{err}"
    );
    assert!(err.contains("step-00000002"), "{err}");
    let ck = bad.join("checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["step-00000002".to_string()]);
    let a = std::fs::read(ck.join("step-00000002/model.safetensors")).unwrap();
    let b = std::fs::read(clean.join("checkpoints/step-00000002/model.safetensors")).unwrap();
    assert!(a == b, "the last good checkpoint changed");
    assert_eq!(metric_steps(&bad), vec![1, 2]);
}

#[test]
fn eval_and_report_commands() {
    let (root, _, eval, cfg) = data();
    let run_dir = root.join("eval-run");
    ok(
        train_stage(&run_dir, "clip", &["--set", "epochs=1"])
            .output()
            .unwrap(),
        "train",
    );
    let ck = run_dir.join("checkpoints/step-00000004");
    let out = ok(
        Command::new(MMKD)
            .args(["eval", "--config"])
            .arg(cfg)
            .arg("--ckpt")
            .arg(&ck)
            .arg("--data")
            .arg(eval)
            .output()
            .unwrap(),
        "eval",
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top1 = r["zero_shot"]["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));
    assert_eq!(r["samples"], 40);
    let out = ok(
        Command::new(MMKD)
            .args(["eval", "--teacher", "BiomedCLIP", "--data"])
            .arg(eval)
            .output()
            .unwrap(),
        "teacher eval",
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["retrieval"]["i2t"][0].as_f64().unwrap() > 0.5, "{r}");
    let out = Command::new(MMKD)
        .args(["eval", "--teacher", "Nobody", "--data"])
        .arg(eval)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no teacher `Nobody`"));
    let out = ok(
        Command::new(MMKD)
            .arg("report")
            .arg(&run_dir)
            .output()
            .unwrap(),
        "report",
    );
    let png = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn quick_demo_runs_end_to_end() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-test");
    let _ = std::fs::remove_dir_all(&dir);
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = ok(
        Command::new(MMKD)
            .current_dir(ws)
            .args(["demo", "--quick", "--out"])
            .arg(&dir)
            .output()
            .unwrap(),
        "demo --quick",
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("| student stage 1 |") && s.contains("| student stage 2 |"),
        "{s}"
    );
    assert!(dir.join("run-stage2/report.png").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn align_writes_a_dataset_that_stage_2_trains_on() {
    let (root, train, eval, cfg) = data();
    let aligned = root.join("aligned-train");
    let out = ok(
        run(&[
            "align",
            "--quiet",
            "--data",
            train.to_str().unwrap(),
            "--out",
            aligned.to_str().unwrap(),
            "--steps",
            "8",
            "--hidden",
            "32",
            "--batch-size",
            "16",
        ]),
        "align",
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"], 8);
    let losses = report["reconstruction_mse"].as_array().unwrap();
    assert!(!losses.is_empty());
    assert!(losses
        .iter()
        .all(|t| t["image"].as_f64().unwrap().is_finite() && t["samples"].as_u64().unwrap() > 0));
    assert!(aligned.join("align.safetensors").is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(aligned.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["params"]["reprojected"]["steps"], 8);
    // The held-out split gets the same projection from the saved weights, without training.
    let aligned_eval = root.join("aligned-eval");
    let weights = aligned.join("align.safetensors");
    let out = ok(
        run(&[
            "align",
            "--quiet",
            "--data",
            eval.to_str().unwrap(),
            "--out",
            aligned_eval.to_str().unwrap(),
            "--weights",
            weights.to_str().unwrap(),
            "--hidden",
            "32",
        ]),
        "align with --weights",
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["steps"], 0);
    // Mismatched widths are a clear error, not a panic.
    let bad = run(&[
        "align",
        "--data",
        eval.to_str().unwrap(),
        "--out",
        root.join("aligned-bad").to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--hidden",
        "48",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--hidden must match"));
    // Stage 2 trains on the aligned targets.
    let run_dir = root.join("kd-aligned");
    let mut c = Command::new(MMKD);
    c.args(["train", "--quiet", "--stage", "kd", "--config"])
        .arg(cfg)
        .arg("--data")
        .arg(&aligned)
        .arg("--out")
        .arg(&run_dir)
        .args(["--set", "epochs=1", "--set", "icl_scale=learned"]);
    ok(c.output().unwrap(), "train kd on aligned data");
    let steps = metric_steps(&run_dir);
    assert_eq!(steps.len(), 4, "64 samples in batches of 16");
    // The run directory stands for its newest checkpoint, whose learned icl scale is not part
    // of the student.
    let out = ok(
        run(&[
            "eval",
            "--config",
            cfg.to_str().unwrap(),
            "--ckpt",
            run_dir.to_str().unwrap(),
            "--data",
            aligned_eval.to_str().unwrap(),
        ]),
        "eval of a learned-icl stage-2 run",
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&s[s.find('{').unwrap()..]).unwrap();
    assert!(report["zero_shot"]["top1"].as_f64().unwrap().is_finite());
}

/// Reads `metrics.jsonl`'s total losses.
fn metric_totals(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["total"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `mmkd train --device emu`: the kernels' training step (stage 2, all teachers) under the
/// emulation follows the CPU run's losses; a run stopped at a checkpoint and resumed ends
/// bit-identical to the uninterrupted one (weights and AdamW moments come back from the
/// arena in the CPU order and go back in); a NaN stops it before the step is applied.
#[test]
fn kernel_training_follows_cpu_resumes_exactly_and_stops_on_nan() {
    let (root, ..) = data();
    // 64-wide heads for the attention kernels; the whole batch in one pass.
    let sets = [
        "--set",
        "vision.width=64",
        "--set",
        "vision.heads=1",
        "--set",
        "text.width=64",
        "--set",
        "text.heads=1",
        "--set",
        "train.micro_batch=0",
        "--set",
        "teacher_mode=all",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = sets.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let cpu = root.join("kern-cpu");
    ok(
        train_cmd(&cpu, &with(&["--set", "stop_after=4"]))
            .output()
            .unwrap(),
        "cpu run",
    );
    let full = root.join("kern-full");
    ok(
        train_cmd(&full, &with(&["--set", "stop_after=4", "--device", "emu"]))
            .output()
            .unwrap(),
        "emulated run",
    );
    let (c, k) = (metric_totals(&cpu), metric_totals(&full));
    eprintln!("total loss per step: cpu {c:?}, kernels {k:?}");
    assert_eq!(k.len(), 4);
    for (i, (a, b)) in c.iter().zip(&k).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(rel < 2e-2, "step {}: cpu {a}, kernels {b}", i + 1);
    }
    // The weights moved and came back from the arena.
    assert!(final_weights(&full) != final_weights(&cpu));

    // Gradient accumulation on the kernels (two passes of 8): the curve of the one-pass run.
    let micro = root.join("kern-micro");
    let mut args = with(&["--set", "stop_after=4", "--device", "emu"]);
    args.extend_from_slice(&["--set", "train.micro_batch=8"]);
    ok(
        train_cmd(&micro, &args).output().unwrap(),
        "accumulating run",
    );
    let m = metric_totals(&micro);
    eprintln!("total loss per step: kernels in two passes {m:?}");
    assert_eq!(m.len(), 4);
    for (i, (a, b)) in k.iter().zip(&m).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs(),
            "step {}: {a} vs {b}",
            i + 1
        );
    }

    let split = root.join("kern-split");
    for extra in [&[][..], &["--resume"][..]] {
        let mut args = with(&["--set", "stop_after=2", "--device", "emu"]);
        args.extend_from_slice(extra);
        ok(train_cmd(&split, &args).output().unwrap(), "split run");
    }
    assert_eq!(metric_steps(&split), vec![1, 2, 3, 4]);
    assert!(
        final_weights(&split) == final_weights(&full),
        "a resumed kernel run differs from the uninterrupted one"
    );

    let bad = root.join("kern-nan");
    let out = train_cmd(
        &bad,
        &with(&["--set", "fault_nan_at_step=3", "--device", "emu"]),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step 3") && err.contains("non-finite") && err.contains("step-00000002"),
        "{err}"
    );
    assert_eq!(metric_steps(&bad), vec![1, 2]);
}
