//! The PyTorch reference (`tools/torch_reference.py`) against mmkd on the same weights and
//! batch (`mmkd bench train --save-parity`): the loss parts agree, and the reference's packed
//! text layout (`--text-layout packed`, the valid tokens back to back as mmkd runs them) gives
//! its padded layout's loss. Runs where `python3` imports `torch` (point `PYTHONPATH` at an
//! install); elsewhere, CI included, each test says it was skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

const MMKD: &str = env!("CARGO_BIN_EXE_mmkd");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have_torch() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3 cannot import torch (set PYTHONPATH to a PyTorch install)");
    }
    ok
}

type Parts = [f64; 4];

fn parts(v: &serde_json::Value) -> Parts {
    ["task", "fd", "icl", "total"].map(|k| {
        let x = v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("`{k}` missing in {v}"));
        assert!(x.is_finite(), "`{k}` = {x}");
        x
    })
}

/// mmkd's loss on a saved batch, and the reference's on the same weights and batch in both
/// text layouts.
fn losses(name: &str, stage: &str, batch: &str, sets: &[&str]) -> (Parts, Parts, Parts) {
    let dir = std::env::temp_dir().join(format!("mmkd-torch-parity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = repo().join("configs/tiny.toml");
    let cfg = cfg.to_str().unwrap();
    let set_args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
    let mut args = vec![
        "bench",
        "train",
        "--config",
        cfg,
        "--stage",
        stage,
        "--batch",
        batch,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--save-parity",
    ];
    args.push(dir.to_str().unwrap());
    args.extend(&set_args);
    let out = Command::new(MMKD).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "mmkd {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let mmkd = parts(&read(&dir.join("loss.json")));
    let reference = |layout: &str| -> Parts {
        let script = repo().join("tools/torch_reference.py");
        let (w, b) = (dir.join("model.safetensors"), dir.join("batch.safetensors"));
        let out = Command::new("python3")
            .arg(&script)
            .args(["--config", cfg, "--stage", stage, "--text-layout", layout])
            .args(["--parity-weights", w.to_str().unwrap()])
            .args(["--parity-batch", b.to_str().unwrap()])
            .args(&set_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "torch_reference.py ({layout}):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        parts(&serde_json::from_slice(&out.stdout).unwrap())
    };
    let (padded, packed) = (reference("padded"), reference("packed"));
    let _ = std::fs::remove_dir_all(&dir);
    (mmkd, padded, packed)
}

fn assert_parity(name: &str, (mmkd, padded, packed): (Parts, Parts, Parts)) {
    for i in 0..4 {
        // The reference runs in f64, mmkd's tape in f32.
        let tol = 1e-5 * mmkd[i].abs().max(1.0);
        assert!(
            (mmkd[i] - padded[i]).abs() <= tol,
            "{name}: part {i}: mmkd {} against PyTorch {}",
            mmkd[i],
            padded[i]
        );
        // Both layouts do the same arithmetic per caption; only summation order may differ.
        let tol = 1e-12 * padded[i].abs().max(1.0);
        assert!(
            (packed[i] - padded[i]).abs() <= tol,
            "{name}: part {i}: packed {} against padded {}",
            packed[i],
            padded[i]
        );
    }
}

#[test]
fn stage_2_loss_matches_pytorch_in_both_text_layouts() {
    if !have_torch() {
        return;
    }
    assert_parity("kd", losses("kd", "kd", "4", &[]));
}

/// A causal, pre-LN text tower pooled at its last token: the packed reference must find each
/// caption's last row and keep the causal mask within each caption.
#[test]
fn causal_pre_ln_eot_tower_matches_pytorch_in_both_text_layouts() {
    if !have_torch() {
        return;
    }
    let sets = ["text.causal=true", "text.pooling=eot", "text.norm=pre"];
    assert_parity("clip-causal", losses("clip", "clip", "6", &sets));
}
