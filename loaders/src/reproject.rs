//! A copy of a packed dataset with new projected teacher targets: how `mmkd align` hands its
//! 512-d targets to the trainer. Every section except `proj_img`/`proj_txt` is copied byte for
//! byte (so images, tokens and raw features stay identical); the new targets are stored in the
//! source's feature type, zero where a teacher is unavailable. Shards and the manifest are written
//! atomically, the manifest last, so an interrupted run never leaves a readable half-dataset.

use crate::dataset::{Dataset, Manifest, ShardEntry, MANIFEST_FILE, PROJ_DIM, TOKENIZER_FILE};
use crate::shard::{write_atomic, ShardWriter};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// New projected targets, `[N, T, 512]` row-major, in dataset order.
pub struct Projected<'a> {
    /// Image-tower targets.
    pub image: &'a [f32],
    /// Text-tower targets.
    pub text: &'a [f32],
}

/// Writes `out` as a copy of `src` whose projected targets are `proj`, and records `note` (what
/// produced them) under `params.reprojected` in the new manifest. `out` must not be `src`.
pub fn write_reprojected(
    src: &Dataset,
    out: &Path,
    proj: &Projected<'_>,
    note: serde_json::Value,
) -> Result<Manifest> {
    let m = src.manifest();
    let (n, t) = (src.len() as usize, m.teachers.len());
    let want = n * t * PROJ_DIM;
    for (name, v) in [("image", proj.image), ("text", proj.text)] {
        if v.len() != want {
            bail!(
                "projected {name} targets for {}: {} values, expected N·T·{PROJ_DIM} = \
                 {n}·{t}·{PROJ_DIM} = {want}",
                src.dir().display(),
                v.len()
            );
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "projected {name} targets for {}: non-finite value at sample {}, teacher {}",
                src.dir().display(),
                i / (t * PROJ_DIM),
                i / PROJ_DIM % t
            );
        }
    }
    if t == 0 {
        bail!("{}: the manifest lists no teachers", src.dir().display());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(src.dir(), out) {
        bail!(
            "{}: the reprojected dataset must go to a new folder, not over its source",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let fd = m.feature_dtype;
    let row = t * PROJ_DIM;
    let mut shards = Vec::with_capacity(m.shards.len());
    let mut start = 0usize;
    for e in &m.shards {
        let shard = src.shard(&e.file)?;
        let k = e.num_samples as usize;
        let mut w = ShardWriter::new(e.num_samples);
        for s in shard.sections() {
            match s.name.as_str() {
                "proj_img" | "proj_txt" => {
                    let v = if s.name == "proj_img" {
                        proj.image
                    } else {
                        proj.text
                    };
                    let mut bytes = Vec::with_capacity(k * row * fd.size());
                    for i in start..start + k {
                        let avail = src.available(i as u64)?;
                        for tt in 0..t {
                            let o = (i * t + tt) * PROJ_DIM;
                            if avail >> tt & 1 == 1 {
                                fd.push(&mut bytes, &v[o..o + PROJ_DIM]);
                            } else {
                                fd.push(&mut bytes, &[0.0; PROJ_DIM]);
                            }
                        }
                    }
                    w.add(&s.name, s.dtype, &s.shape, bytes)?;
                }
                _ => w.add(&s.name, s.dtype, &s.shape, shard.section_bytes(s).to_vec())?,
            }
        }
        let bytes = w.finish(&out.join(&e.file))?;
        shards.push(ShardEntry {
            file: e.file.clone(),
            num_samples: e.num_samples,
            bytes,
        });
        start += k;
    }
    let tok = src.dir().join(&m.tokenizer);
    if tok.exists() {
        let b = std::fs::read(&tok).with_context(|| format!("reading {}", tok.display()))?;
        write_atomic(&out.join(TOKENIZER_FILE), &b)?;
    }
    let mut params = m.params.clone();
    if let serde_json::Value::Object(o) = &mut params {
        o.insert("reprojected".into(), note);
    } else {
        params = serde_json::json!({ "packed": params, "reprojected": note });
    }
    let manifest = Manifest {
        shards,
        tokenizer: TOKENIZER_FILE.into(),
        params,
        source: serde_json::json!({ "reprojected_from": src.dir().display().to_string(),
            "source": m.source }),
        ..m.clone()
    };
    write_atomic(
        &out.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pack, synth, PackOptions, SourceFormat, SynthOptions, Tower};

    #[test]
    fn reprojected_copy_keeps_everything_but_the_targets() {
        let dir = tempfile::tempdir().unwrap();
        let mut so = SynthOptions::new(dir.path().join("raw"));
        so.train = 37;
        so.eval = 1;
        so.image_size = 32;
        let syn = synth(&so).unwrap();
        let src_dir = dir.path().join("packed");
        let mut po = PackOptions::new(
            SourceFormat::MmkdClip,
            syn.train_dir.display().to_string(),
            &src_dir,
        );
        po.image_size = 32;
        po.context_length = 16;
        po.vocab_size = 300;
        po.shard_size = 256 * 1024; // bytes: several shards, the last one short
        po.progress = false;
        pack(&po).unwrap();
        let src = Dataset::open(&src_dir).unwrap();
        let (n, t) = (src.len() as usize, src.num_teachers());
        let image: Vec<f32> = (0..n * t * PROJ_DIM)
            .map(|i| (i % 97) as f32 * 0.01)
            .collect();
        let text: Vec<f32> = image.iter().map(|x| -x).collect();
        let out = dir.path().join("aligned");
        let proj = Projected {
            image: &image,
            text: &text,
        };
        write_reprojected(&src, &out, &proj, serde_json::json!({"by": "test"})).unwrap();
        let dst = Dataset::open(&out).unwrap();
        assert_eq!(dst.len(), src.len());
        assert_eq!(dst.manifest().shards.len(), src.manifest().shards.len());
        assert!(dst.manifest().shards.len() > 1);
        assert_eq!(dst.manifest().params["reprojected"]["by"], "test");
        let mut got = vec![0f32; PROJ_DIM];
        for i in 0..n as u64 {
            let (a, b) = (src.sample(i).unwrap(), dst.sample(i).unwrap());
            assert_eq!(a.image, b.image);
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.caption, b.caption);
            assert_eq!(a.raw_image, b.raw_image);
            assert_eq!(a.label, b.label);
            for tt in 0..t {
                dst.proj_into(i, tt, Tower::Text, &mut got).unwrap();
                let o = (i as usize * t + tt) * PROJ_DIM;
                if a.available >> tt & 1 == 1 {
                    // Stored in the source's feature type (f16 by default).
                    let fd = src.manifest().feature_dtype;
                    let mut bytes = Vec::new();
                    fd.push(&mut bytes, &text[o..o + PROJ_DIM]);
                    let mut want = vec![0f32; PROJ_DIM];
                    fd.decode(&bytes, &mut want);
                    assert_eq!(got, want);
                } else {
                    assert!(got.iter().all(|&x| x == 0.0));
                }
            }
        }
        // Wrong sizes, NaN and writing over the source are refused.
        let short = Projected {
            image: &image[1..],
            text: &text,
        };
        let e = write_reprojected(&src, &dir.path().join("x"), &short, serde_json::Value::Null);
        assert!(e.unwrap_err().to_string().contains("expected N·T·512"));
        let mut bad = image.clone();
        bad[PROJ_DIM * t * 3 + 5] = f32::NAN;
        let nan = Projected {
            image: &bad,
            text: &text,
        };
        let e = write_reprojected(&src, &dir.path().join("y"), &nan, serde_json::Value::Null);
        assert!(e.unwrap_err().to_string().contains("sample 3, teacher 0"));
        let e = write_reprojected(&src, &src_dir, &proj, serde_json::Value::Null);
        assert!(e.unwrap_err().to_string().contains("new folder"));
    }
}
