//! A packed dataset: a folder holding `manifest.json`, its shards and `tokenizer.json`.
//!
//! [`Dataset::open`] validates every shard against the manifest once; afterwards every
//! accessor reads straight from the memory maps (images and token ids without copying).

use crate::shard::{Dtype, SectionInfo, Shard};
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Name of the manifest file inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the tokenizer file stored beside the shards.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Width of the projected (aligned) teacher features.
pub const PROJ_DIM: usize = 512;
/// Most teachers a dataset can hold (availability is a 64-bit mask per sample).
pub const MAX_TEACHERS: usize = 64;

/// Storage type of teacher features in the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    #[default]
    F16,
    Bf16,
    F32,
}

impl FeatureDtype {
    /// The shard element type.
    pub fn dtype(self) -> Dtype {
        match self {
            FeatureDtype::F16 => Dtype::F16,
            FeatureDtype::Bf16 => Dtype::Bf16,
            FeatureDtype::F32 => Dtype::F32,
        }
    }
    /// Appends `v` in this type to `out`.
    pub fn push(self, out: &mut Vec<u8>, v: &[f32]) {
        for &x in v {
            match self {
                FeatureDtype::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                FeatureDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                FeatureDtype::F32 => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
    }
    /// Decodes `out.len()` values stored in this type from `bytes`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            FeatureDtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            FeatureDtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            FeatureDtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }
    /// Bytes per value.
    pub fn size(self) -> usize {
        self.dtype().size()
    }
}

impl std::str::FromStr for FeatureDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f16" => FeatureDtype::F16,
            "bf16" => FeatureDtype::Bf16,
            "f32" => FeatureDtype::F32,
            _ => bail!("feature dtype {s:?}: expected f16, bf16 or f32"),
        })
    }
}

/// One teacher as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub name: String,
    /// Native width of its raw features.
    pub raw_dim: usize,
    /// Number of samples for which it is available.
    pub available: u64,
}

/// One shard as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub num_samples: u64,
    pub bytes: u64,
}

/// The JSON manifest of a whole dataset (see `FORMAT.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub num_samples: u64,
    pub image_size: usize,
    pub channels: usize,
    /// `"u16"` or `"u32"`.
    pub token_dtype: String,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Tokenizer file beside the shards.
    pub tokenizer: String,
    pub feature_dtype: FeatureDtype,
    pub proj_dim: usize,
    /// Teachers in the order of the `T` axis.
    pub teachers: Vec<TeacherInfo>,
    /// Whether the shards carry a `labels` section.
    pub has_labels: bool,
    /// Class names indexed by label (may be empty).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Zero-shot prompt templates with `{}` for the class name (may be empty).
    #[serde(default)]
    pub templates: Vec<String>,
    pub shards: Vec<ShardEntry>,
    /// Where the data came from (importer and input).
    pub source: serde_json::Value,
    /// The options `pack` ran with.
    pub params: serde_json::Value,
    /// Counts gathered while packing (truncations, mismatches, skips).
    pub stats: serde_json::Value,
}

/// Format name written in every manifest.
pub const MANIFEST_FORMAT: &str = "mmkd-shards";

impl Manifest {
    /// Reads `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let p = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("reading manifest {}", p.display()))?;
        let m: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing manifest {}", p.display()))?;
        if m.format != MANIFEST_FORMAT || m.version != crate::shard::VERSION {
            bail!(
                "manifest {}: format {} v{}, expected {MANIFEST_FORMAT} v{}",
                p.display(),
                m.format,
                m.version,
                crate::shard::VERSION
            );
        }
        Ok(m)
    }
    /// Token element type.
    pub fn token_type(&self) -> Result<Dtype> {
        match self.token_dtype.as_str() {
            "u16" => Ok(Dtype::U16),
            "u32" => Ok(Dtype::U32),
            t => bail!("manifest token_dtype {t:?}: expected u16 or u32"),
        }
    }
}

/// Table entries of one shard, resolved once at open.
struct Part {
    shard: Shard,
    start: u64,
    n: u64,
    images: SectionInfo,
    tokens: SectionInfo,
    token_lens: SectionInfo,
    avail: SectionInfo,
    labels: Option<SectionInfo>,
    proj_img: Option<SectionInfo>,
    proj_txt: Option<SectionInfo>,
    raw_img: Vec<SectionInfo>,
    raw_txt: Vec<SectionInfo>,
    str_offsets: SectionInfo,
    str_data: SectionInfo,
}

/// Which tower a teacher feature belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tower {
    Image,
    Text,
}

/// Everything stored for one sample, owned (for inspection and tests; the batch loader uses
/// the borrowing accessors instead).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub index: u64,
    pub id: String,
    pub caption: String,
    /// `u8 [3, H, W]`.
    pub image: Vec<u8>,
    /// Token ids, `length` of them (padding removed).
    pub tokens: Vec<u32>,
    /// Bit `t` set when teacher `t` is available.
    pub available: u64,
    /// `-1` when unlabelled.
    pub label: i32,
    /// Per teacher: projected image and text features `[512]` (zeros when unavailable).
    pub proj_image: Vec<Vec<f32>>,
    pub proj_text: Vec<Vec<f32>>,
    /// Per teacher: raw image and text features at its native width.
    pub raw_image: Vec<Vec<f32>>,
    pub raw_text: Vec<Vec<f32>>,
}

/// A read-only packed dataset.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    token_dtype: Dtype,
    parts: Vec<Part>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.dir)
            .field("num_samples", &self.manifest.num_samples)
            .finish()
    }
}

impl Dataset {
    /// Opens `dir`, verifying every shard's magic, version, bounds and checksums.
    pub fn open(dir: &Path) -> Result<Dataset> {
        Self::open_with(dir, true)
    }

    /// Opens `dir`; `verify_checksums = false` skips hashing section data (bounds and header
    /// are still checked).
    pub fn open_with(dir: &Path, verify_checksums: bool) -> Result<Dataset> {
        let manifest = Manifest::load(dir)?;
        let token_dtype = manifest.token_type()?;
        let s = manifest.image_size as u64;
        let ctx = manifest.context_length as u64;
        let t = manifest.teachers.len() as u64;
        if manifest.channels != 3
            || manifest.proj_dim != PROJ_DIM
            || manifest.teachers.len() > MAX_TEACHERS
        {
            bail!(
                "manifest in {}: unsupported channels {} / proj_dim {} / {} teachers",
                dir.display(),
                manifest.channels,
                manifest.proj_dim,
                t
            );
        }
        let fd = manifest.feature_dtype.dtype();
        let mut parts = Vec::with_capacity(manifest.shards.len());
        let mut start = 0u64;
        for e in &manifest.shards {
            if e.file.contains('/') || e.file.contains('\\') || e.file.starts_with('.') {
                bail!(
                    "manifest in {}: shard file name {:?} must be a plain file name",
                    dir.display(),
                    e.file
                );
            }
            let path = dir.join(&e.file);
            let shard = Shard::open(&path, verify_checksums)?;
            let n = shard.num_samples();
            if n != e.num_samples {
                bail!(
                    "shard {}: holds {n} samples, manifest says {}",
                    path.display(),
                    e.num_samples
                );
            }
            let need = |name: &str, dtype: Dtype, shape: &[u64]| -> Result<SectionInfo> {
                let info = shard
                    .info(name)
                    .with_context(|| format!("shard {}: missing section {name}", path.display()))?;
                if info.dtype != dtype || info.shape != shape {
                    bail!(
                        "shard {}: section {name} is {:?} {:?}, expected {:?} {:?}",
                        path.display(),
                        info.dtype,
                        info.shape,
                        dtype,
                        shape
                    );
                }
                Ok(info.clone())
            };
            let mut raw_img = Vec::new();
            let mut raw_txt = Vec::new();
            for (i, ti) in manifest.teachers.iter().enumerate() {
                raw_img.push(need(&format!("raw_img.{i}"), fd, &[n, ti.raw_dim as u64])?);
                raw_txt.push(need(&format!("raw_txt.{i}"), fd, &[n, ti.raw_dim as u64])?);
            }
            let str_offsets = need("str_offsets", Dtype::U64, &[2 * n + 1])?;
            let str_data = shard
                .info("str_data")
                .cloned()
                .with_context(|| format!("shard {}: missing section str_data", path.display()))?;
            let part = Part {
                images: need("images", Dtype::U8, &[n, 3, s, s])?,
                tokens: need("tokens", token_dtype, &[n, ctx])?,
                token_lens: need("token_lens", Dtype::U32, &[n])?,
                avail: need("avail", Dtype::U64, &[n])?,
                labels: if manifest.has_labels {
                    Some(need("labels", Dtype::I32, &[n])?)
                } else {
                    None
                },
                proj_img: if t > 0 {
                    Some(need("proj_img", fd, &[n, t, PROJ_DIM as u64])?)
                } else {
                    None
                },
                proj_txt: if t > 0 {
                    Some(need("proj_txt", fd, &[n, t, PROJ_DIM as u64])?)
                } else {
                    None
                },
                raw_img,
                raw_txt,
                str_offsets,
                str_data,
                shard,
                start,
                n,
            };
            validate_part(&part, ctx, t, &path)?;
            parts.push(part);
            start += n;
        }
        if start != manifest.num_samples {
            bail!(
                "manifest in {}: shards hold {start} samples, manifest says {}",
                dir.display(),
                manifest.num_samples
            );
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            token_dtype,
            parts,
        })
    }

    /// The mapped shard named `file` in the manifest.
    pub fn shard(&self, file: &str) -> Result<&Shard> {
        self.manifest
            .shards
            .iter()
            .zip(&self.parts)
            .find(|(e, _)| e.file == file)
            .map(|(_, p)| &p.shard)
            .with_context(|| format!("{}: no shard named {file:?}", self.dir.display()))
    }

    /// The folder this dataset was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.manifest.num_samples
    }
    /// Whether the dataset holds no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of teachers.
    pub fn num_teachers(&self) -> usize {
        self.manifest.teachers.len()
    }
    /// Stored image side in pixels.
    pub fn image_size(&self) -> usize {
        self.manifest.image_size
    }
    /// Token context length.
    pub fn context_length(&self) -> usize {
        self.manifest.context_length
    }
    /// Path of the tokenizer stored beside the shards.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer)
    }

    fn locate(&self, i: u64) -> Result<(&Part, usize)> {
        if i >= self.len() {
            bail!(
                "sample {i} out of range: dataset {} holds {}",
                self.dir.display(),
                self.len()
            );
        }
        let k = self.parts.partition_point(|p| p.start + p.n <= i);
        let p = &self.parts[k];
        Ok((p, (i - p.start) as usize))
    }

    /// The image of sample `i`, `u8 [3, H, W]`, borrowed from the map.
    pub fn image(&self, i: u64) -> Result<&[u8]> {
        let (p, j) = self.locate(i)?;
        let sz = 3 * self.manifest.image_size * self.manifest.image_size;
        Ok(&p.shard.section_bytes(&p.images)[j * sz..(j + 1) * sz])
    }

    /// Number of real tokens of sample `i`.
    pub fn token_len(&self, i: u64) -> Result<usize> {
        let (p, j) = self.locate(i)?;
        let b = &p.shard.section_bytes(&p.token_lens)[4 * j..4 * j + 4];
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// Writes the `context_length` token ids of sample `i` (padding included) into `out`.
    pub fn tokens_into(&self, i: u64, out: &mut [u32]) -> Result<()> {
        let (p, j) = self.locate(i)?;
        let ctx = self.manifest.context_length;
        if out.len() != ctx {
            bail!("tokens_into: buffer of {} for context {ctx}", out.len());
        }
        let b = p.shard.section_bytes(&p.tokens);
        match self.token_dtype {
            Dtype::U16 => {
                for (o, c) in out
                    .iter_mut()
                    .zip(b[2 * j * ctx..2 * (j + 1) * ctx].chunks_exact(2))
                {
                    *o = u16::from_le_bytes([c[0], c[1]]) as u32;
                }
            }
            _ => {
                for (o, c) in out
                    .iter_mut()
                    .zip(b[4 * j * ctx..4 * (j + 1) * ctx].chunks_exact(4))
                {
                    *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Ok(())
    }

    /// The real token ids of sample `i` (without padding).
    pub fn tokens(&self, i: u64) -> Result<Vec<u32>> {
        let mut v = vec![0u32; self.manifest.context_length];
        self.tokens_into(i, &mut v)?;
        v.truncate(self.token_len(i)?);
        Ok(v)
    }

    /// Availability mask of sample `i`: bit `t` set when teacher `t` is available.
    pub fn available(&self, i: u64) -> Result<u64> {
        let (p, j) = self.locate(i)?;
        let b = &p.shard.section_bytes(&p.avail)[8 * j..8 * j + 8];
        Ok(u64::from_le_bytes(b.try_into()?))
    }

    /// Class label of sample `i` (`-1` when unlabelled or the dataset has no labels).
    pub fn label(&self, i: u64) -> Result<i32> {
        let (p, j) = self.locate(i)?;
        match &p.labels {
            Some(l) => {
                let b = &p.shard.section_bytes(l)[4 * j..4 * j + 4];
                Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            None => Ok(-1),
        }
    }

    fn string(&self, i: u64, which: usize) -> Result<&str> {
        let (p, j) = self.locate(i)?;
        let offs = p.shard.section_bytes(&p.str_offsets);
        let at = |k: usize| {
            u64::from_le_bytes(offs[8 * k..8 * k + 8].try_into().unwrap_or([0; 8])) as usize
        };
        let (a, b) = (at(2 * j + which), at(2 * j + which + 1));
        let data = p.shard.section_bytes(&p.str_data);
        std::str::from_utf8(&data[a..b]).with_context(|| {
            format!(
                "shard {}: string of sample {i} is not UTF-8",
                p.shard.path().display()
            )
        })
    }

    /// Id of sample `i`.
    pub fn id(&self, i: u64) -> Result<&str> {
        self.string(i, 0)
    }
    /// Caption of sample `i`.
    pub fn caption(&self, i: u64) -> Result<&str> {
        self.string(i, 1)
    }

    /// Writes teacher `t`'s projected feature `[512]` of sample `i` (zeros when unavailable).
    pub fn proj_into(&self, i: u64, t: usize, tower: Tower, out: &mut [f32]) -> Result<()> {
        let (p, j) = self.locate(i)?;
        let nt = self.num_teachers();
        if t >= nt || out.len() != PROJ_DIM {
            bail!(
                "proj_into: teacher {t} of {nt}, buffer {} of {PROJ_DIM}",
                out.len()
            );
        }
        let sec = match tower {
            Tower::Image => p.proj_img.as_ref(),
            Tower::Text => p.proj_txt.as_ref(),
        };
        let sec = sec.with_context(|| format!("dataset {} has no teachers", self.dir.display()))?;
        let es = self.manifest.feature_dtype.size();
        let row = (j * nt + t) * PROJ_DIM * es;
        self.manifest
            .feature_dtype
            .decode(&p.shard.section_bytes(sec)[row..row + PROJ_DIM * es], out);
        Ok(())
    }

    /// Teacher `t`'s raw feature of sample `i` at its native width.
    pub fn raw(&self, i: u64, t: usize, tower: Tower) -> Result<Vec<f32>> {
        let (p, j) = self.locate(i)?;
        let ti = self
            .manifest
            .teachers
            .get(t)
            .with_context(|| format!("teacher {t} out of range"))?;
        let sec = match tower {
            Tower::Image => &p.raw_img[t],
            Tower::Text => &p.raw_txt[t],
        };
        let es = self.manifest.feature_dtype.size();
        let w = ti.raw_dim;
        let mut out = vec![0f32; w];
        self.manifest.feature_dtype.decode(
            &p.shard.section_bytes(sec)[j * w * es..(j + 1) * w * es],
            &mut out,
        );
        Ok(out)
    }

    /// Everything stored for sample `i`, owned.
    pub fn sample(&self, i: u64) -> Result<Sample> {
        let nt = self.num_teachers();
        let mut proj_image = Vec::with_capacity(nt);
        let mut proj_text = Vec::with_capacity(nt);
        let mut raw_image = Vec::with_capacity(nt);
        let mut raw_text = Vec::with_capacity(nt);
        for t in 0..nt {
            let mut a = vec![0f32; PROJ_DIM];
            let mut b = vec![0f32; PROJ_DIM];
            self.proj_into(i, t, Tower::Image, &mut a)?;
            self.proj_into(i, t, Tower::Text, &mut b)?;
            proj_image.push(a);
            proj_text.push(b);
            raw_image.push(self.raw(i, t, Tower::Image)?);
            raw_text.push(self.raw(i, t, Tower::Text)?);
        }
        Ok(Sample {
            index: i,
            id: self.id(i)?.to_string(),
            caption: self.caption(i)?.to_string(),
            image: self.image(i)?.to_vec(),
            tokens: self.tokens(i)?,
            available: self.available(i)?,
            label: self.label(i)?,
            proj_image,
            proj_text,
            raw_image,
            raw_text,
        })
    }
}

/// Checks the parts of a shard the accessors trust: token lengths within the context, string
/// offsets monotone and inside the string table, availability bits within the teacher count.
fn validate_part(p: &Part, ctx: u64, t: u64, path: &Path) -> Result<()> {
    let lens = p.shard.section_bytes(&p.token_lens);
    for (j, c) in lens.chunks_exact(4).enumerate() {
        let l = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64;
        if l > ctx {
            bail!(
                "shard {}: sample {j} has token length {l} over the context {ctx}",
                path.display()
            );
        }
    }
    let offs = p.shard.section_bytes(&p.str_offsets);
    let data_len = p.str_data.len;
    let mut prev = 0u64;
    for (k, c) in offs.chunks_exact(8).enumerate() {
        let o = u64::from_le_bytes(c.try_into()?);
        if o < prev || o > data_len || (k == 0 && o != 0) {
            bail!(
                "shard {}: string table offset {k} = {o} is out of order or past {data_len}",
                path.display()
            );
        }
        prev = o;
    }
    let mask = if t >= 64 { u64::MAX } else { (1u64 << t) - 1 };
    for (j, c) in p.shard.section_bytes(&p.avail).chunks_exact(8).enumerate() {
        let a = u64::from_le_bytes(c.try_into()?);
        if a & !mask != 0 {
            bail!(
                "shard {}: sample {j} marks a teacher beyond the {t} the manifest lists",
                path.display()
            );
        }
    }
    let data = p.shard.section_bytes(&p.str_data);
    if std::str::from_utf8(data).is_err() {
        bail!("shard {}: string table is not UTF-8", path.display());
    }
    Ok(())
}
