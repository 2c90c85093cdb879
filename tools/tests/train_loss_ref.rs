//! `mmkd loss` against the independent NumPy implementation in `tools/reference/loss_ref.py` on
//! the same fixed inputs: losses and gradients, for every stage and switch.

use mmkd_engine::checkpoint::{read_tensors, write_tensors, NamedTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mmkd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic values in [-1, 1) (a fixed LCG; the inputs only need to be fixed and varied).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            scale * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

fn write_input(path: &Path, n: usize, t: usize, d: usize, mask: Option<Vec<f32>>) {
    let mut m: BTreeMap<String, NamedTensor> = BTreeMap::new();
    m.insert("image".into(), (vec![n, d], values(1, n * d, 1.0)));
    m.insert("text".into(), (vec![n, d], values(2, n * d, 1.0)));
    m.insert("logit_scale".into(), (vec![], vec![1.7]));
    m.insert("icl_scale".into(), (vec![], vec![0.8]));
    let shape = if t == 1 { vec![n, d] } else { vec![n, t, d] };
    m.insert(
        "teacher_image".into(),
        (shape.clone(), values(3, n * t * d, 2.0)),
    );
    m.insert("teacher_text".into(), (shape, values(4, n * t * d, 2.0)));
    if let Some(mask) = mask {
        m.insert("teacher_mask".into(), (vec![n, t], mask));
    }
    write_tensors(path, &m).unwrap();
}

fn python() -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs `{py}` with numpy (set PYTHON to another interpreter if needed)"
    );
    py
}

fn close(what: &str, a: f64, b: f64) {
    let tol = 1e-6 * a.abs().max(b.abs()).max(1e-3);
    assert!((a - b).abs() <= tol, "{what}: mmkd {a} numpy {b}");
}

fn compare(input: &Path, args: &[&str], dir: &Path, tag: &str) {
    let grads = dir.join(format!("grads-{tag}.safetensors"));
    let out = Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .arg("loss")
        .arg("--in")
        .arg(input)
        .args(args)
        .arg("--grads")
        .arg(&grads)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mmkd loss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/loss_ref.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--in")
        .arg(input)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loss_ref.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["task", "fd", "icl", "total"] {
        close(
            &format!("{tag} {k}"),
            ours[k].as_f64().unwrap(),
            refv[k].as_f64().unwrap(),
        );
    }
    assert!(ours["total"].as_f64().unwrap() > 0.0);
    let g = read_tensors(&grads).unwrap();
    for name in ["image", "text"] {
        let want: Vec<f64> = refv["grads"][name]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        let got = &g[name].1;
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            close(&format!("{tag} d{name}[{i}]"), *a as f64, *b);
        }
    }
    close(
        &format!("{tag} dlogit_scale"),
        g["logit_scale"].1[0] as f64,
        refv["grads"]["logit_scale"].as_f64().unwrap(),
    );
    match refv["grads"].get("icl_scale") {
        Some(v) => close(
            &format!("{tag} dicl"),
            g["icl_scale"].1[0] as f64,
            v.as_f64().unwrap(),
        ),
        None => assert!(!g.contains_key("icl_scale")),
    }
}

#[test]
fn mmkd_loss_matches_numpy_reference() {
    let dir = tmpdir("loss-ref");
    let single = dir.join("single.safetensors");
    write_input(&single, 6, 1, 5, None);
    let multi = dir.join("multi.safetensors");
    let mask: Vec<f32> = vec![
        1., 0., 1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 1., 1., 0., 1.,
    ];
    write_input(&multi, 6, 3, 5, Some(mask));
    compare(&single, &["--stage", "clip"], &dir, "clip");
    compare(&single, &["--stage", "kd"], &dir, "kd-default");
    compare(
        &single,
        &[
            "--stage",
            "kd",
            "--teacher-norm",
            "none",
            "--icl-scale",
            "learned",
            "--fd-weight",
            "3",
        ],
        &dir,
        "kd-none-learned",
    );
    compare(
        &multi,
        &["--stage", "kd", "--teacher-mode", "mean"],
        &dir,
        "kd-mean",
    );
    compare(
        &multi,
        &[
            "--stage",
            "kd",
            "--teacher-mode",
            "all",
            "--icl-scale",
            "1.5",
        ],
        &dir,
        "kd-all",
    );
    compare(
        &multi,
        &[
            "--stage",
            "kd",
            "--teacher-mode",
            "all",
            "--teacher-norm",
            "none",
        ],
        &dir,
        "kd-all-none",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mmkd_loss_rejects_bad_input_with_a_clear_error() {
    let dir = tmpdir("loss-bad");
    let p = dir.join("bad.safetensors");
    let mut m: BTreeMap<String, NamedTensor> = BTreeMap::new();
    m.insert("image".into(), (vec![2, 3], vec![0.5; 6]));
    m.insert("logit_scale".into(), (vec![], vec![1.0]));
    write_tensors(&p, &m).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mmkd"))
        .args(["loss", "--stage", "clip", "--in"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`text` is missing") && err.contains("bad.safetensors"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
