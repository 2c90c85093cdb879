//! `tools/gemm_attn_ratio.py`, which gpu-check runs on the GEMM/attention reports of mmkd and
//! PyTorch, on reports made up here: it must pair the same cases, take mmkd's fastest path
//! per GEMM layout, and give each case the bar of its kind.

use std::path::Path;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/gemm_attn_ratio.py");

fn python() -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import json"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs `{py}` (set PYTHON to another interpreter)"
    );
    py
}

fn write(dir: &Path, name: &str, v: serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p.to_str().unwrap().to_string()
}

fn gemm(layout: &str, ms: f64) -> serde_json::Value {
    serde_json::json!({"kind": "gemm", "tower": "image", "layer": "qkv", "layout": layout,
        "dims": [50432, 2304, 768], "flops": 1.0, "median_ms": ms, "tflops": 1.0})
}

#[test]
fn pairs_cases_takes_the_fastest_path_and_applies_each_bar() {
    let dir = std::env::temp_dir().join(format!("mmkd-ratio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let attn = |layer: &str, layout: &str, ms: f64| {
        serde_json::json!({"kind": "attention", "tower": "image", "layer": layer,
            "layout": layout, "dims": [3072, 197, 64], "flops": 1.0, "median_ms": ms,
            "tflops": 1.0})
    };
    let main = write(
        &dir,
        "main.json",
        serde_json::json!({"device": "x", "checks": [], "cases": [
            gemm("fwd", 1.0), gemm("fwd_wgmma", 0.5), gemm("dgrad", 1.0),
            gemm("dgrad_wgmma", 2.0), attn("plain", "fwd", 0.1), attn("plain", "fwd+bwd", 2.0),
            attn("masked", "fwd+bwd", 3.0)]}),
    );
    // The TMA report of its own process; the wgrad layout is only there.
    let tma = write(
        &dir,
        "tma.json",
        serde_json::json!({"device": "x", "checks": [], "cases": [
            gemm("fwd_tma", 0.4), gemm("wgrad_tma", 1.0)]}),
    );
    // The warp-specialised report: a slower dgrad, and the weight gradient split along K as
    // the main report's process would time it, the fastest wgrad.
    let ws = write(
        &dir,
        "ws.json",
        serde_json::json!({"device": "x", "checks": [], "cases": [
            gemm("dgrad_ws", 3.0), gemm("wgrad_ws", 1.1), gemm("wgrad_wgmma-split16", 0.75)]}),
    );
    let t = |layout: &str, ms: f64| {
        serde_json::json!({"kind": "gemm", "tower": "image", "layer": "qkv", "layout": layout,
            "M": 50432, "N": 2304, "K": 768, "torch_ms": ms})
    };
    let torch = write(
        &dir,
        "torch.json",
        serde_json::json!({"cases": [t("fwd", 0.36), t("dgrad", 0.5), t("wgrad", 0.9),
            {"kind": "attention", "tower": "image", "layout": "bwd", "BH": 3072, "L": 197,
             "torch_ms": 2.5, "torch_masked_ms": 2.7}]}),
    );
    let out_json = dir.join("rows.json");
    let out = Command::new(python())
        .args([
            SCRIPT, "--mmkd", &main, &tma, &ws, "--torch", &torch, "--json",
        ])
        .arg(&out_json)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let find = |needle: &str| {
        rows.iter()
            .find(|r| r["case"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no row for {needle}: {rows:?}"))
            .clone()
    };
    let close = |v: &serde_json::Value, want: f64| {
        let x = v.as_f64().unwrap();
        assert!((x - want).abs() < 1e-9, "{x} vs {want}");
    };
    // fwd: TMA (0.4 ms) is the fastest of three paths: 0.36 / 0.4 = 0.9 >= 0.8.
    let fwd = find("qkv fwd");
    assert_eq!(fwd["best_path"], "tma");
    close(&fwd["ratio"], 0.9);
    assert_eq!(fwd["meets_bar"], true);
    // dgrad: mma.sync (1.0 ms) beats wgmma (2.0 ms): 0.5 / 1.0 misses the bar.
    let dgrad = find("qkv dgrad");
    assert_eq!(dgrad["best_path"], "mma");
    close(&dgrad["ratio"], 0.5);
    assert_eq!(dgrad["meets_bar"], false);
    // wgrad: the split plan (0.75 ms) beats TMA (1.0) and ws (1.1): 0.9 / 0.75 = 1.2.
    let wgrad = find("qkv wgrad");
    assert_eq!(wgrad["best_path"], "wgmma-split16");
    close(&wgrad["ratio"], 1.2);
    // Attention: forward + backward against SDPA's, bar 1.0, with and without the mask.
    let plain = find("fwd+bwd BH=3072 L=197");
    close(&plain["ratio"], 1.25);
    let masked = find("key-padding mask");
    close(&masked["ratio"], 0.9);
    assert_eq!(masked["meets_bar"], false);
    assert_eq!(rows.len(), 5, "{rows:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 of 5 cases meet their bar"), "{text}");
}
