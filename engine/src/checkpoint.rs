//! Checkpoints: one directory per checkpoint, written atomically, the last M kept.
//!
//! ```text
//! RUN_DIR/checkpoints/step-00000120/
//!     model.safetensors   weights, open_clip names from the ParamStore table (f32)
//!     optim.safetensors   AdamW moments: `m.<name>`, `v.<name>` (f32)
//!     state.json          TrainerState: step, epoch, data cursor, RNG states, config
//! ```
//!
//! A checkpoint is first written to `step-XXXXXXXX.tmp/` (every file fsynced, then the directory),
//! renamed into place, and the parent directory fsynced; a crash at any point leaves either the
//! previous set of checkpoints or the new one complete, never a half-written directory under a
//! final name. Leftover `.tmp` directories are ignored and removed by the next save.

use crate::error::{EngineError, Result};
use crate::params::ParamStore;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Trainer state saved beside the weights; everything needed to continue bit-identically.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimiser steps applied so far.
    pub step: u64,
    /// Epoch the data cursor is in.
    pub epoch: u64,
    /// The data loader's resumable cursor (its own serialised form).
    pub cursor: serde_json::Value,
    /// RNG states (the trainer's generators, serialised).
    pub rng: serde_json::Value,
    /// The resolved training configuration.
    pub config: serde_json::Value,
}

/// A named `f32` tensor: shape and row-major values.
pub type NamedTensor = (Vec<usize>, Vec<f32>);

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Serialises named `f32` tensors to safetensors bytes.
pub fn tensors_to_bytes(tensors: &BTreeMap<String, NamedTensor>, path: &Path) -> Result<Vec<u8>> {
    let werr = |msg: String| EngineError::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let views = tensors
        .iter()
        .map(|(name, (shape, data))| {
            let n: usize = shape.iter().product();
            if n != data.len() {
                return Err(werr(format!(
                    "tensor `{name}`: shape {shape:?} holds {n} elements, {} given",
                    data.len()
                )));
            }
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .map(|v| (name.clone(), v))
            .map_err(|e| werr(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, None).map_err(|e| werr(e.to_string()))
}

/// Writes named `f32` tensors to a safetensors file atomically (temp file, fsync, rename).
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, NamedTensor>) -> Result<()> {
    let bytes = tensors_to_bytes(tensors, path)?;
    write_file_synced(path, &bytes)
}

/// Reads every tensor of a safetensors file as `f32` (F32, F64, F16, BF16, U8 and BOOL
/// accepted and converted).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let werr = |msg: String| EngineError::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| werr(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let raw = t.data();
        use safetensors::Dtype as D;
        let vals: Vec<f32> = match t.dtype() {
            D::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            D::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            D::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            D::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            D::U8 | D::BOOL => raw.iter().map(|&b| b as f32).collect(),
            other => {
                return Err(werr(format!(
                    "tensor `{name}` has dtype {other:?}; expected F32, F64, F16, BF16, U8 or BOOL"
                )))
            }
        };
        out.insert(name, (t.shape().to_vec(), vals));
    }
    Ok(out)
}

/// Writes `bytes` to `path` through `path.tmp`, fsyncs it and renames it into place.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Fsyncs a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .map_err(io_err(dir))?;
    d.sync_all().map_err(io_err(dir))
}

fn write_plain(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Name of the checkpoint directory of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// What a checkpoint holds when loaded back.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Trainer state.
    pub state: TrainerState,
}

/// Saves a checkpoint of `params`, the optimiser moments (`m`, `v`, same layout as the params)
/// and `state` under `root/step-XXXXXXXX`, atomically; then deletes all but the newest `keep`
/// checkpoints. Returns the checkpoint's directory.
pub fn save(
    root: &Path,
    params: &ParamStore,
    moments: Option<(&[f32], &[f32])>,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    remove_stale_tmp(root)?;
    let name = checkpoint_name(state.step);
    let fin = root.join(&name);
    let tmp = root.join(format!("{name}.tmp"));
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let model = tmp.join("model.safetensors");
    params.save_safetensors(&model)?;
    if let Some((m, v)) = moments {
        let mut t = BTreeMap::new();
        for info in params.infos() {
            let r = info.offset..info.offset + info.len;
            t.insert(
                format!("m.{}", info.name),
                (info.shape.clone(), m[r.clone()].to_vec()),
            );
            t.insert(
                format!("v.{}", info.name),
                (info.shape.clone(), v[r].to_vec()),
            );
        }
        let p = tmp.join("optim.safetensors");
        write_plain(&p, &tensors_to_bytes(&t, &p)?)?;
    }
    let p = tmp.join("state.json");
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| EngineError::Input(format!("cannot serialise trainer state: {e}")))?;
    write_plain(&p, &json)?;
    sync_dir(&tmp)?;
    if fin.exists() {
        // Same step saved again (e.g. the end-of-run save right after a periodic one).
        std::fs::remove_dir_all(&fin).map_err(io_err(&fin))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
    sync_dir(root)?;
    prune(root, keep)?;
    Ok(fin)
}

fn remove_stale_tmp(root: &Path) -> Result<()> {
    for e in std::fs::read_dir(root).map_err(io_err(root))? {
        let p = e.map_err(io_err(root))?.path();
        if p.extension().is_some_and(|x| x == "tmp") && p.is_dir() {
            std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Complete checkpoints under `root`, oldest first, as (step, directory).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(root).map_err(io_err(root))? {
        let p = e.map_err(io_err(root))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if p.join("state.json").is_file() && p.join("model.safetensors").is_file() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let all = list(root)?;
    let n = all.len().saturating_sub(keep.max(1));
    for (_, p) in &all[..n] {
        std::fs::remove_dir_all(p).map_err(io_err(p))?;
    }
    Ok(())
}

/// Loads a checkpoint directory into `params` (weights) and, when given, the moment buffers.
/// Returns the trainer state.
pub fn load(
    dir: &Path,
    params: &mut ParamStore,
    moments: Option<(&mut [f32], &mut [f32])>,
) -> Result<TrainerState> {
    params.load_safetensors(&dir.join("model.safetensors"))?;
    if let Some((m, v)) = moments {
        let p = dir.join("optim.safetensors");
        let t = read_tensors(&p)?;
        for info in params.infos() {
            for (prefix, buf) in [("m", &mut *m), ("v", &mut *v)] {
                let key = format!("{prefix}.{}", info.name);
                let (shape, vals) = t.get(&key).ok_or_else(|| EngineError::Weights {
                    path: p.clone(),
                    msg: format!("optimiser state `{key}` is missing"),
                })?;
                if shape != &info.shape {
                    return Err(EngineError::Weights {
                        path: p.clone(),
                        msg: format!("`{key}` has shape {shape:?}, expected {:?}", info.shape),
                    });
                }
                buf[info.offset..info.offset + info.len].copy_from_slice(vals);
            }
        }
    }
    read_state(dir)
}

/// Reads `state.json` of a checkpoint directory.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("state.json");
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    serde_json::from_slice(&bytes).map_err(|e| EngineError::Weights {
        path: p.clone(),
        msg: format!("trainer state is not valid: {e}"),
    })
}
