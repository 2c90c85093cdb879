//! Feature vectors from `.npy` and `.safetensors` files, as the manifest importer reads them.

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use std::path::Path;

/// Reads a 1-D feature vector (or a `[1, W]` array) as `f32`. `.safetensors` paths may name a
/// tensor after `#` (`feats.safetensors#image`); without one the file must hold exactly one.
pub fn load_vector(spec: &str, base: &Path) -> Result<Vec<f32>> {
    let (file, key) = match spec.rsplit_once('#') {
        Some((f, k)) if f.ends_with(".safetensors") => (f, Some(k)),
        _ => (spec, None),
    };
    let path = base.join(file);
    let bytes =
        std::fs::read(&path).with_context(|| format!("reading feature file {}", path.display()))?;
    if file.ends_with(".npy") {
        read_npy(&bytes).with_context(|| format!("feature file {}", path.display()))
    } else if file.ends_with(".safetensors") {
        read_safetensors(&bytes, key).with_context(|| format!("feature file {}", path.display()))
    } else {
        bail!(
            "feature file {}: expected .npy or .safetensors",
            path.display()
        )
    }
}

fn check_vector_shape(shape: &[usize]) -> Result<usize> {
    match shape {
        [w] => Ok(*w),
        [1, w] => Ok(*w),
        _ => bail!("expected a vector (shape [W] or [1, W]), got shape {shape:?}"),
    }
}

/// Parses a little-endian, C-order `.npy` array of f32, f16 or f64.
pub fn read_npy(bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file (bad magic)");
    }
    let major = bytes[6];
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!(".npy header truncated");
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!(".npy version {v} not supported"),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or_else(|| anyhow!(".npy header truncated"))?;
    let header = std::str::from_utf8(header).map_err(|_| anyhow!(".npy header is not text"))?;
    let field = |name: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{name}'"))
            .ok_or_else(|| anyhow!(".npy header lacks {name}"))?;
        let rest = &header[at + name.len() + 2..];
        Ok(rest.trim_start().trim_start_matches(':').trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .get(1..4)
        .ok_or_else(|| anyhow!(".npy descr malformed"))?;
    if field("fortran_order")?.starts_with("True") {
        bail!(".npy in Fortran order is not supported");
    }
    let shape_txt = field("shape")?;
    let close = shape_txt
        .find(')')
        .ok_or_else(|| anyhow!(".npy shape malformed"))?;
    let shape: Vec<usize> = shape_txt[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| anyhow!(".npy shape entry {s:?} is not a number"))
        })
        .collect::<Result<_>>()?;
    let w = check_vector_shape(&shape)?;
    let data = &bytes[hstart + hlen..];
    let (size, conv): (usize, fn(&[u8]) -> f32) = match descr {
        "<f4" => (4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        "<f2" => (2, |c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        "<f8" => (8, |c| {
            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
        }),
        d => bail!(".npy dtype {d} not supported (float32, float16 or float64 little-endian)"),
    };
    if data.len() != w * size {
        bail!(
            ".npy data has {} bytes, shape {shape:?} needs {}",
            data.len(),
            w * size
        );
    }
    Ok(data.chunks_exact(size).map(conv).collect())
}

/// Reads one tensor (F32, F16 or BF16) from a `.safetensors` file.
pub fn read_safetensors(bytes: &[u8], key: Option<&str>) -> Result<Vec<f32>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("invalid safetensors: {e}"))?;
    let name = match key {
        Some(k) => k.to_string(),
        None => {
            let names = st.names();
            if names.len() != 1 {
                bail!(
                    "holds {} tensors; name one with file.safetensors#name",
                    names.len()
                );
            }
            names[0].to_string()
        }
    };
    let t = st
        .tensor(&name)
        .map_err(|e| anyhow!("tensor {name}: {e}"))?;
    check_vector_shape(t.shape())?;
    let d = t.data();
    Ok(match t.dtype() {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("tensor {name}: dtype {other:?} not supported"),
    })
}
