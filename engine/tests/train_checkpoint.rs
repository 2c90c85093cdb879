//! Checkpoint directories: round trip, pruning, atomicity leftovers, clear errors.

use mmkd_engine::checkpoint::{self, TrainerState};
use mmkd_engine::ParamStore;

fn store(seed: f32) -> ParamStore {
    let mut p = ParamStore::new();
    p.add("visual.proj", &[3, 2], |x| {
        x.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = seed + i as f32 * 0.1)
    })
    .unwrap();
    p.add("logit_scale", &[], |x| x[0] = 2.5).unwrap();
    p
}

fn state(step: u64) -> TrainerState {
    TrainerState {
        step,
        epoch: 1,
        cursor: serde_json::json!({"epoch": 1, "offset": 96}),
        rng: serde_json::json!([1, 2, 3]),
        config: serde_json::json!({"lr": 1e-3}),
    }
}

#[test]
fn save_load_round_trip_and_keep_last_m() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let p = store(0.3);
    let m: Vec<f32> = (0..7).map(|i| i as f32 * 0.5).collect();
    let v: Vec<f32> = (0..7).map(|i| i as f32 * 0.25 + 1e-9).collect();
    for step in [10, 20, 30, 40] {
        checkpoint::save(&root, &p, Some((&m, &v)), &state(step), 2).unwrap();
    }
    let all = checkpoint::list(&root).unwrap();
    assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![30, 40]);
    let latest = checkpoint::latest(&root).unwrap().unwrap();
    assert!(latest.ends_with("step-00000040"));

    let mut q = store(9.0);
    let (mut m2, mut v2) = (vec![0.0; 7], vec![0.0; 7]);
    let st = checkpoint::load(&latest, &mut q, Some((&mut m2, &mut v2))).unwrap();
    assert_eq!(st, state(40));
    assert_eq!(q.data(), p.data());
    assert_eq!(m2, m);
    assert_eq!(v2, v);
}

#[test]
fn leftover_tmp_directory_is_ignored_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let p = store(0.0);
    checkpoint::save(&root, &p, None, &state(5), 3).unwrap();
    // A crash mid-save leaves a .tmp directory: it is not a checkpoint.
    let stale = root.join("step-00000006.tmp");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    assert!(checkpoint::latest(&root)
        .unwrap()
        .unwrap()
        .ends_with("step-00000005"));
    checkpoint::save(&root, &p, None, &state(7), 3).unwrap();
    assert!(!stale.exists());
    assert_eq!(checkpoint::list(&root).unwrap().len(), 2);
}

#[test]
fn corrupt_weights_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = store(0.0);
    let ck = checkpoint::save(dir.path(), &p, None, &state(1), 1).unwrap();
    std::fs::write(ck.join("model.safetensors"), b"not a safetensors file").unwrap();
    let mut q = store(0.0);
    let err = checkpoint::load(&ck, &mut q, None).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // Missing optimiser state is reported by key.
    let ck = checkpoint::save(dir.path(), &p, None, &state(2), 1).unwrap();
    let (mut m, mut v) = (vec![0.0; 7], vec![0.0; 7]);
    let err = checkpoint::load(&ck, &mut q, Some((&mut m, &mut v)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("optim.safetensors"), "{err}");
}
