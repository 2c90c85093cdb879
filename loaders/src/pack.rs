//! `pack`: import a source (MMKD-CLIP release layout, JSONL manifest, or webdataset tars) into
//! checksummed shards plus `manifest.json` and `tokenizer.json`.
//!
//! Records are listed first (cheap: metadata only) so the teacher set, their widths, the class
//! list and the tokenizer are fixed before any shard is written; then records are prepared in
//! parallel chunks (decode, resize, read features, tokenise) and appended in input order.

use crate::dataset::{
    FeatureDtype, Manifest, ShardEntry, TeacherInfo, MANIFEST_FILE, MANIFEST_FORMAT, MAX_TEACHERS,
    PROJ_DIM, TOKENIZER_FILE,
};
use crate::shard::{write_atomic, Dtype, ShardWriter};
use crate::{features, image_proc, pt, tokenizer};
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Source layout read by [`pack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// `meta.jsonl` + images + `features/<folderid>/<id>/clips_*.pt` (DESIGN.md §3).
    MmkdClip,
    /// A JSONL file: `image`, `caption`, `teachers: [{name, image, text}]`, optional `label`.
    Manifest,
    /// Webdataset tars: `<key>.jpg|png` with `<key>.txt` or `<key>.json`.
    Wds,
}

impl std::str::FromStr for SourceFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "mmkd-clip" => SourceFormat::MmkdClip,
            "manifest" => SourceFormat::Manifest,
            "wds" => SourceFormat::Wds,
            _ => bail!("format {s:?}: expected mmkd-clip, manifest or wds"),
        })
    }
}

/// Options of [`pack`].
#[derive(Clone, Debug, Serialize)]
pub struct PackOptions {
    pub format: SourceFormat,
    /// Root folder (mmkd-clip), JSONL file (manifest), or folder / glob of `.tar` (wds).
    pub input: String,
    pub out: PathBuf,
    /// Stored image side in pixels.
    pub image_size: usize,
    /// Token context length.
    pub context_length: usize,
    /// A `tokenizer.json` to use; without one a WordPiece vocabulary is trained.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size when training.
    pub vocab_size: usize,
    pub feature_dtype: FeatureDtype,
    /// Target shard size in bytes.
    pub shard_size: u64,
    /// Skip bad records (counted by reason, listed in `skipped.jsonl`) instead of stopping.
    pub skip_bad: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl PackOptions {
    /// Defaults: 224 px, context 256, trained vocabulary of 30522, f16 features, 1 GiB shards.
    pub fn new(format: SourceFormat, input: impl Into<String>, out: impl Into<PathBuf>) -> Self {
        PackOptions {
            format,
            input: input.into(),
            out: out.into(),
            image_size: 224,
            context_length: 256,
            tokenizer: None,
            vocab_size: 30522,
            feature_dtype: FeatureDtype::F16,
            shard_size: 1 << 30,
            skip_bad: false,
            progress: false,
        }
    }
}

/// What [`pack`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PackSummary {
    pub out: PathBuf,
    pub records: u64,
    pub num_samples: u64,
    pub num_shards: usize,
    pub bytes: u64,
    pub teachers: Vec<TeacherInfo>,
    pub vocab_size: usize,
    pub truncated: u64,
    pub availability_mismatches: u64,
    /// Skipped records by reason (only with `skip_bad`).
    pub skipped: BTreeMap<String, u64>,
    pub seconds: f64,
}

/// Why a record was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reason {
    Record,
    Image,
    Pt,
    Feature,
    NonFinite,
    Width,
    NoTeacher,
    Utf8,
    EmptyCaption,
    Label,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Reason::Record => "bad_record",
            Reason::Image => "bad_image",
            Reason::Pt => "bad_pt",
            Reason::Feature => "bad_feature_file",
            Reason::NonFinite => "non_finite_feature",
            Reason::Width => "wrong_width",
            Reason::NoTeacher => "no_available_teacher",
            Reason::Utf8 => "invalid_utf8",
            Reason::EmptyCaption => "empty_caption",
            Reason::Label => "bad_label",
        }
    }
}

struct Bad {
    reason: Reason,
    msg: String,
}

fn bad<T>(reason: Reason, msg: impl Into<String>) -> std::result::Result<T, Bad> {
    Err(Bad {
        reason,
        msg: msg.into(),
    })
}

/// Where a record's teacher features come from.
enum TeacherSrc {
    None,
    /// The folder holding `clips_output.pt` and `clips_project_output.pt`, and `available_clips`.
    Pt {
        dir: PathBuf,
        available: Vec<String>,
    },
    /// Manifest entries: (name, projected image, projected text, raw image, raw text).
    Files(Vec<FeatSpec>),
}

struct FeatSpec {
    name: String,
    image: serde_json::Value,
    text: serde_json::Value,
    raw_image: Option<serde_json::Value>,
    raw_text: Option<serde_json::Value>,
}

enum ImageSrc {
    Path(PathBuf),
    Bytes(Vec<u8>),
    Missing,
}

/// A listed record, before its heavy data is read.
struct Record {
    origin: String,
    id: String,
    /// `Err` holds a problem found while listing (bad JSON, invalid UTF-8, ...).
    caption: std::result::Result<String, (Reason, String)>,
    image: ImageSrc,
    teachers: TeacherSrc,
    label: Option<serde_json::Value>,
}

/// One available teacher of a record: (index, projected image, projected text, raw image, raw text).
type TeacherFeats = (usize, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// A record ready for a shard.
struct Prepared {
    id: String,
    caption: String,
    image: Vec<u8>,
    tokens: Vec<u32>,
    truncated: bool,
    avail: u64,
    mismatch: bool,
    label: i32,
    /// Per available teacher: (index, proj image, proj text, raw image, raw text).
    feats: Vec<TeacherFeats>,
}

/// Everything fixed before preparing records.
struct Plan {
    teachers: Vec<String>,
    raw_dims: Vec<usize>,
    classes: Vec<String>,
    templates: Vec<String>,
    has_labels: bool,
}

/// Packs `opts.input` into `opts.out`. By default the first bad record stops the run with an
/// error naming its file and record; with `skip_bad` bad records are skipped and listed.
pub fn pack(opts: &PackOptions) -> Result<PackSummary> {
    let t0 = Instant::now();
    if opts.image_size == 0 || opts.context_length < 2 || opts.shard_size == 0 {
        bail!("image size, context length (>= 2) and shard size must be positive");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    clear_previous(&opts.out)?;

    let (records, base) = match opts.format {
        SourceFormat::MmkdClip => list_mmkd_clip(Path::new(&opts.input))?,
        SourceFormat::Manifest => list_manifest(Path::new(&opts.input))?,
        SourceFormat::Wds => (list_wds(&opts.input, false)?, PathBuf::new()),
    };
    let plan = make_plan(opts, &records, &base)?;

    let tok = match &opts.tokenizer {
        Some(p) => tokenizer::load(p)?,
        None => {
            let caps: Vec<&str> = records
                .iter()
                .filter_map(|r| r.caption.as_ref().ok().map(String::as_str))
                .collect();
            tokenizer::train_wordpiece(caps.into_iter(), opts.vocab_size)?
        }
    };
    let vocab = tok.get_vocab_size(true);
    let token_dtype = if vocab <= 1 << 16 {
        Dtype::U16
    } else {
        Dtype::U32
    };
    tokenizer::save(&tok, &opts.out.join(TOKENIZER_FILE))?;

    let bar = if opts.progress {
        indicatif::ProgressBar::new(records.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} records ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let nt = plan.teachers.len();
    let mut builder = ShardBuilder::new(opts, &plan, token_dtype);
    let mut shards: Vec<ShardEntry> = Vec::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut skipped_lines = String::new();
    let mut avail_counts = vec![0u64; nt];
    let (mut truncated, mut mismatches, mut total_bytes, mut n_samples) = (0u64, 0u64, 0u64, 0u64);
    let n_records = records.len() as u64;

    // Wds image bytes are only read now, chunk by chunk, to keep memory bounded.
    let wds_bytes = opts.format == SourceFormat::Wds;
    let mut wds_iter = if wds_bytes {
        Some(WdsStream::new(&opts.input)?)
    } else {
        None
    };
    const CHUNK: usize = 256;
    let mut pos = 0usize;
    while pos < records.len() {
        let end = (pos + CHUNK).min(records.len());
        let mut chunk: Vec<&Record> = records[pos..end].iter().collect();
        let fetched: Vec<Record>;
        if let Some(it) = wds_iter.as_mut() {
            fetched = it.take(end - pos)?;
            chunk = fetched.iter().collect();
        }
        let prepared: Vec<std::result::Result<Prepared, Bad>> = chunk
            .par_iter()
            .map(|r| prepare(r, opts, &plan, &tok, &base))
            .collect();
        for (r, p) in chunk.iter().zip(prepared) {
            bar.inc(1);
            match p {
                Ok(p) => {
                    truncated += p.truncated as u64;
                    mismatches += p.mismatch as u64;
                    for (t, c) in avail_counts.iter_mut().enumerate() {
                        *c += (p.avail >> t) & 1;
                    }
                    builder.push(p);
                    n_samples += 1;
                    if builder.bytes() >= opts.shard_size {
                        let e = builder.flush(&opts.out, shards.len())?;
                        total_bytes += e.bytes;
                        shards.push(e);
                    }
                }
                Err(b) => {
                    if !opts.skip_bad {
                        bar.abandon();
                        bail!("{}: {} ({})", r.origin, b.msg, b.reason.name());
                    }
                    *skipped.entry(b.reason.name().to_string()).or_default() += 1;
                    let line = serde_json::json!({"record": r.origin, "id": r.id, "reason": b.reason.name(), "error": b.msg});
                    skipped_lines.push_str(&line.to_string());
                    skipped_lines.push('\n');
                }
            }
        }
        pos = end;
    }
    bar.finish_and_clear();
    if builder.n > 0 || shards.is_empty() {
        let e = builder.flush(&opts.out, shards.len())?;
        total_bytes += e.bytes;
        shards.push(e);
    }
    if opts.skip_bad {
        write_atomic(&opts.out.join("skipped.jsonl"), skipped_lines.as_bytes())?;
    }
    let teachers: Vec<TeacherInfo> = plan
        .teachers
        .iter()
        .zip(&plan.raw_dims)
        .zip(&avail_counts)
        .map(|((n, &d), &a)| TeacherInfo {
            name: n.clone(),
            raw_dim: d,
            available: a,
        })
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: crate::shard::VERSION,
        num_samples: n_samples,
        image_size: opts.image_size,
        channels: 3,
        token_dtype: if token_dtype == Dtype::U16 {
            "u16".into()
        } else {
            "u32".into()
        },
        context_length: opts.context_length,
        vocab_size: vocab,
        tokenizer: TOKENIZER_FILE.into(),
        feature_dtype: opts.feature_dtype,
        proj_dim: PROJ_DIM,
        teachers: teachers.clone(),
        has_labels: plan.has_labels,
        classes: plan.classes.clone(),
        templates: plan.templates.clone(),
        shards: shards.clone(),
        source: serde_json::json!({"format": opts.format, "input": opts.input}),
        params: serde_json::to_value(opts)?,
        stats: serde_json::json!({"records": n_records, "truncated_captions": truncated, "availability_mismatches": mismatches, "skipped": skipped}),
    };
    // The manifest is written last: until it exists the folder is not a dataset.
    write_atomic(
        &opts.out.join(MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(PackSummary {
        out: opts.out.clone(),
        records: n_records,
        num_samples: n_samples,
        num_shards: shards.len(),
        bytes: total_bytes,
        teachers,
        vocab_size: vocab,
        truncated,
        availability_mismatches: mismatches,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Removes the manifest (first) and shards of an earlier pack into the same folder, so the
/// folder never mixes runs.
fn clear_previous(out: &Path) -> Result<()> {
    let m = out.join(MANIFEST_FILE);
    if m.exists() {
        std::fs::remove_file(&m).with_context(|| format!("removing old {}", m.display()))?;
    }
    for e in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("shard-") && (name.ends_with(".mmkd") || name.ends_with(".mmkd.tmp")) {
            std::fs::remove_file(&p).with_context(|| format!("removing old {}", p.display()))?;
        }
    }
    Ok(())
}

/// File name of shard `k`.
pub fn shard_name(k: usize) -> String {
    format!("shard-{k:05}.mmkd")
}

struct ShardBuilder {
    n: u64,
    size: usize,
    ctx: usize,
    fd: FeatureDtype,
    token_dtype: Dtype,
    raw_dims: Vec<usize>,
    has_labels: bool,
    images: Vec<u8>,
    tokens: Vec<u8>,
    lens: Vec<u8>,
    avail: Vec<u8>,
    labels: Vec<u8>,
    proj_img: Vec<u8>,
    proj_txt: Vec<u8>,
    raw_img: Vec<Vec<u8>>,
    raw_txt: Vec<Vec<u8>>,
    offsets: Vec<u64>,
    strings: Vec<u8>,
}

impl ShardBuilder {
    fn new(opts: &PackOptions, plan: &Plan, token_dtype: Dtype) -> Self {
        let nt = plan.teachers.len();
        ShardBuilder {
            n: 0,
            size: opts.image_size,
            ctx: opts.context_length,
            fd: opts.feature_dtype,
            token_dtype,
            raw_dims: plan.raw_dims.clone(),
            has_labels: plan.has_labels,
            images: Vec::new(),
            tokens: Vec::new(),
            lens: Vec::new(),
            avail: Vec::new(),
            labels: Vec::new(),
            proj_img: Vec::new(),
            proj_txt: Vec::new(),
            raw_img: vec![Vec::new(); nt],
            raw_txt: vec![Vec::new(); nt],
            offsets: vec![0],
            strings: Vec::new(),
        }
    }

    fn bytes(&self) -> u64 {
        (self.images.len()
            + self.tokens.len()
            + self.proj_img.len() * 2
            + self.raw_img.iter().map(Vec::len).sum::<usize>() * 2
            + self.strings.len()) as u64
    }

    fn push(&mut self, p: Prepared) {
        let nt = self.raw_dims.len();
        self.images.extend_from_slice(&p.image);
        for k in 0..self.ctx {
            let id = p.tokens.get(k).copied().unwrap_or(0);
            match self.token_dtype {
                Dtype::U16 => self.tokens.extend_from_slice(&(id as u16).to_le_bytes()),
                _ => self.tokens.extend_from_slice(&id.to_le_bytes()),
            }
        }
        self.lens
            .extend_from_slice(&(p.tokens.len() as u32).to_le_bytes());
        self.avail.extend_from_slice(&p.avail.to_le_bytes());
        self.labels.extend_from_slice(&p.label.to_le_bytes());
        let zeros = vec![0f32; PROJ_DIM.max(self.raw_dims.iter().copied().max().unwrap_or(0))];
        for t in 0..nt {
            let f = p.feats.iter().find(|f| f.0 == t);
            let w = self.raw_dims[t];
            match f {
                Some((_, pi, pt, ri, rt)) => {
                    self.fd.push(&mut self.proj_img, pi);
                    self.fd.push(&mut self.proj_txt, pt);
                    self.fd.push(&mut self.raw_img[t], ri);
                    self.fd.push(&mut self.raw_txt[t], rt);
                }
                None => {
                    self.fd.push(&mut self.proj_img, &zeros[..PROJ_DIM]);
                    self.fd.push(&mut self.proj_txt, &zeros[..PROJ_DIM]);
                    self.fd.push(&mut self.raw_img[t], &zeros[..w]);
                    self.fd.push(&mut self.raw_txt[t], &zeros[..w]);
                }
            }
        }
        for s in [&p.id, &p.caption] {
            self.strings.extend_from_slice(s.as_bytes());
            self.offsets.push(self.strings.len() as u64);
        }
        self.n += 1;
    }

    fn flush(&mut self, out: &Path, k: usize) -> Result<ShardEntry> {
        let n = self.n;
        let s = self.size as u64;
        let nt = self.raw_dims.len() as u64;
        let mut w = ShardWriter::new(n);
        w.add(
            "images",
            Dtype::U8,
            &[n, 3, s, s],
            std::mem::take(&mut self.images),
        )?;
        w.add(
            "tokens",
            self.token_dtype,
            &[n, self.ctx as u64],
            std::mem::take(&mut self.tokens),
        )?;
        w.add(
            "token_lens",
            Dtype::U32,
            &[n],
            std::mem::take(&mut self.lens),
        )?;
        w.add("avail", Dtype::U64, &[n], std::mem::take(&mut self.avail))?;
        let labels = std::mem::take(&mut self.labels);
        if self.has_labels {
            w.add("labels", Dtype::I32, &[n], labels)?;
        }
        let fd = self.fd.dtype();
        let pi = std::mem::take(&mut self.proj_img);
        let pt = std::mem::take(&mut self.proj_txt);
        if nt > 0 {
            w.add("proj_img", fd, &[n, nt, PROJ_DIM as u64], pi)?;
            w.add("proj_txt", fd, &[n, nt, PROJ_DIM as u64], pt)?;
        }
        for t in 0..nt as usize {
            let d = self.raw_dims[t] as u64;
            w.add(
                &format!("raw_img.{t}"),
                fd,
                &[n, d],
                std::mem::take(&mut self.raw_img[t]),
            )?;
            w.add(
                &format!("raw_txt.{t}"),
                fd,
                &[n, d],
                std::mem::take(&mut self.raw_txt[t]),
            )?;
        }
        let offs: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        w.add("str_offsets", Dtype::U64, &[2 * n + 1], offs)?;
        let strings = std::mem::take(&mut self.strings);
        w.add("str_data", Dtype::U8, &[strings.len() as u64], strings)?;
        let name = shard_name(k);
        let bytes = w.finish(&out.join(&name))?;
        self.n = 0;
        self.offsets = vec![0];
        Ok(ShardEntry {
            file: name,
            num_samples: n,
            bytes,
        })
    }
}

fn read_lines(path: &Path) -> Result<Vec<Vec<u8>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let mut l = line.with_context(|| format!("reading {}", path.display()))?;
        if l.last() == Some(&b'\r') {
            l.pop();
        }
        out.push(l);
    }
    Ok(out)
}

/// Parses one JSONL line; problems become a record-level error so `--skip-bad` can skip it.
fn parse_line(
    raw: &[u8],
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, (Reason, String)> {
    let text = std::str::from_utf8(raw)
        .map_err(|e| (Reason::Utf8, format!("line is not valid UTF-8 ({e})")))?;
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err((Reason::Record, "line is not a JSON object".into())),
        Err(e) => Err((Reason::Record, format!("invalid JSON: {e}"))),
    }
}

fn str_field(
    m: &serde_json::Map<String, serde_json::Value>,
    k: &str,
) -> std::result::Result<String, (Reason, String)> {
    match m.get(k) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        _ => Err((
            Reason::Record,
            format!("field {k:?} missing or not a string"),
        )),
    }
}

fn check_caption(c: String) -> std::result::Result<String, (Reason, String)> {
    if c.trim().is_empty() {
        Err((Reason::EmptyCaption, "caption is empty".into()))
    } else {
        Ok(c)
    }
}

fn list_mmkd_clip(root: &Path) -> Result<(Vec<Record>, PathBuf)> {
    let meta = root.join("meta.jsonl");
    let lines = read_lines(&meta)?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let origin = format!("{} line {}", meta.display(), i + 1);
        let rec = match parse_line(raw) {
            Ok(m) => {
                let parts = (|| {
                    let folder = str_field(&m, "folderid")?;
                    let id = str_field(&m, "id")?;
                    let img = str_field(&m, "imgpath")?;
                    let txt = str_field(&m, "txt")?;
                    let avail = match m.get("available_clips") {
                        Some(serde_json::Value::Array(a)) => a
                            .iter()
                            .map(|v| v.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>(),
                        _ => None,
                    }
                    .ok_or((
                        Reason::Record,
                        "field \"available_clips\" missing or not a list of names".into(),
                    ))?;
                    Ok((folder, id, img, txt, avail))
                })();
                match parts {
                    Ok((folder, id, img, txt, available)) => {
                        if Path::new(&folder).components().count() != 1
                            || Path::new(&id).components().count() != 1
                        {
                            Record {
                                origin,
                                id,
                                caption: Err((
                                    Reason::Record,
                                    "folderid and id must be single path components".into(),
                                )),
                                image: ImageSrc::Missing,
                                teachers: TeacherSrc::None,
                                label: None,
                            }
                        } else {
                            Record {
                                origin,
                                caption: check_caption(txt),
                                image: ImageSrc::Path(root.join(&img)),
                                teachers: TeacherSrc::Pt {
                                    dir: root.join("features").join(&folder).join(&id),
                                    available,
                                },
                                label: m.get("label").cloned(),
                                id,
                            }
                        }
                    }
                    Err(e) => Record {
                        origin,
                        id: String::new(),
                        caption: Err(e),
                        image: ImageSrc::Missing,
                        teachers: TeacherSrc::None,
                        label: None,
                    },
                }
            }
            Err(e) => Record {
                origin,
                id: String::new(),
                caption: Err(e),
                image: ImageSrc::Missing,
                teachers: TeacherSrc::None,
                label: None,
            },
        };
        out.push(rec);
    }
    Ok((out, root.to_path_buf()))
}

fn list_manifest(file: &Path) -> Result<(Vec<Record>, PathBuf)> {
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let lines = read_lines(file)?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, raw) in lines.iter().enumerate() {
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let origin = format!("{} line {}", file.display(), i + 1);
        let parsed = parse_line(raw).and_then(|m| {
            let image = str_field(&m, "image")?;
            let caption = str_field(&m, "caption")?;
            let id = str_field(&m, "id").unwrap_or_else(|_| format!("{}", i + 1));
            let mut specs = Vec::new();
            if let Some(ts) = m.get("teachers") {
                let arr = ts
                    .as_array()
                    .ok_or((Reason::Record, "\"teachers\" must be a list".to_string()))?;
                for t in arr {
                    let name = t
                        .get("name")
                        .and_then(|v| v.as_str())
                        .ok_or((Reason::Record, "teacher entry lacks \"name\"".to_string()))?;
                    let get = |k: &str| t.get(k).cloned();
                    specs.push(FeatSpec {
                        name: name.to_string(),
                        image: get("image")
                            .ok_or((Reason::Record, format!("teacher {name} lacks \"image\"")))?,
                        text: get("text")
                            .ok_or((Reason::Record, format!("teacher {name} lacks \"text\"")))?,
                        raw_image: get("raw_image"),
                        raw_text: get("raw_text"),
                    });
                }
            }
            Ok((id, image, caption, specs, m.get("label").cloned()))
        });
        out.push(match parsed {
            Ok((id, image, caption, specs, label)) => Record {
                origin,
                id,
                caption: check_caption(caption),
                image: ImageSrc::Path(base.join(image)),
                teachers: TeacherSrc::Files(specs),
                label,
            },
            Err(e) => Record {
                origin,
                id: String::new(),
                caption: Err(e),
                image: ImageSrc::Missing,
                teachers: TeacherSrc::None,
                label: None,
            },
        });
    }
    Ok((out, base))
}

/// The `.tar` files named by a folder or a glob, sorted.
fn wds_files(input: &str) -> Result<Vec<PathBuf>> {
    let p = Path::new(input);
    let mut files: Vec<PathBuf> = if p.is_dir() {
        std::fs::read_dir(p)
            .with_context(|| format!("listing {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .collect()
    } else {
        glob::glob(input)
            .with_context(|| format!("bad glob {input:?}"))?
            .filter_map(|g| g.ok())
            .collect()
    };
    files.sort();
    if files.is_empty() {
        bail!("no .tar files match {input:?}");
    }
    Ok(files)
}

/// Streams webdataset records from the tars, in order.
struct WdsStream {
    files: Vec<PathBuf>,
    next_file: usize,
    pending: std::collections::VecDeque<Record>,
}

impl WdsStream {
    fn new(input: &str) -> Result<Self> {
        Ok(WdsStream {
            files: wds_files(input)?,
            next_file: 0,
            pending: Default::default(),
        })
    }
    fn take(&mut self, n: usize) -> Result<Vec<Record>> {
        while self.pending.len() < n && self.next_file < self.files.len() {
            let f = self.files[self.next_file].clone();
            self.next_file += 1;
            self.pending.extend(read_tar(&f, true)?);
        }
        Ok(self.pending.drain(..n.min(self.pending.len())).collect())
    }
}

fn list_wds(input: &str, with_images: bool) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for f in wds_files(input)? {
        out.extend(read_tar(&f, with_images)?);
    }
    Ok(out)
}

/// Reads one tar; entries sharing a key (name up to the first dot of the base name) form a record.
fn read_tar(path: &Path, with_images: bool) -> Result<Vec<Record>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut groups: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
    for e in ar
        .entries()
        .with_context(|| format!("reading tar {}", path.display()))?
    {
        let mut e = e.with_context(|| format!("reading tar {}", path.display()))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()
            .with_context(|| format!("tar {}: bad entry name", path.display()))?
            .to_string_lossy()
            .to_string();
        let (dir, base) = name
            .rsplit_once('/')
            .map(|(d, b)| (format!("{d}/"), b.to_string()))
            .unwrap_or((String::new(), name.clone()));
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let key = format!("{dir}{stem}");
        let ext = ext.to_ascii_lowercase();
        let wanted = matches!(ext.as_str(), "txt" | "json")
            || (with_images && matches!(ext.as_str(), "jpg" | "jpeg" | "png"));
        let mut data = Vec::new();
        if wanted {
            e.read_to_end(&mut data)
                .with_context(|| format!("tar {}: reading {name}", path.display()))?;
        } else if !matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
            continue;
        }
        if groups.last().map(|g| &g.0) != Some(&key) {
            groups.push((key.clone(), BTreeMap::new()));
        }
        if let Some(g) = groups.last_mut() {
            g.1.insert(ext, data);
        }
    }
    let mut out = Vec::with_capacity(groups.len());
    for (key, files) in groups {
        let origin = format!("{} key {key}", path.display());
        let caption = if let Some(t) = files.get("txt") {
            std::str::from_utf8(t)
                .map(str::to_string)
                .map_err(|e| (Reason::Utf8, format!("{key}.txt is not valid UTF-8 ({e})")))
                .and_then(check_caption)
        } else if let Some(j) = files.get("json") {
            match parse_line(j) {
                Ok(m) => ["caption", "txt", "text"]
                    .iter()
                    .find_map(|k| m.get(*k).and_then(|v| v.as_str()).map(str::to_string))
                    .ok_or((Reason::Record, format!("{key}.json has no caption field")))
                    .and_then(check_caption),
                Err((r, msg)) => Err((r, format!("{key}.json: {msg}"))),
            }
        } else {
            Err((
                Reason::Record,
                format!("{key} has no .txt or .json caption"),
            ))
        };
        let img = ["jpg", "jpeg", "png"].iter().find_map(|e| files.get(*e));
        let image = match img {
            Some(b) if with_images => ImageSrc::Bytes(b.clone()),
            Some(_) => ImageSrc::Path(PathBuf::new()),
            None => ImageSrc::Missing,
        };
        out.push(Record {
            origin,
            id: key,
            caption,
            image,
            teachers: TeacherSrc::None,
            label: None,
        });
    }
    Ok(out)
}

fn read_text_lines(path: &Path) -> Result<Vec<String>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let t = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(t.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn make_plan(opts: &PackOptions, records: &[Record], base: &Path) -> Result<Plan> {
    let mut names = BTreeSet::new();
    for r in records {
        match &r.teachers {
            TeacherSrc::Pt { available, .. } => names.extend(available.iter().cloned()),
            TeacherSrc::Files(specs) => names.extend(specs.iter().map(|s| s.name.clone())),
            TeacherSrc::None => {}
        }
    }
    let teachers: Vec<String> = names.into_iter().collect();
    if teachers.len() > MAX_TEACHERS {
        bail!(
            "{} teachers found; at most {MAX_TEACHERS} are supported",
            teachers.len()
        );
    }
    // Native widths: from the first record whose raw features for a teacher can be read.
    let mut raw_dims = vec![0usize; teachers.len()];
    let mut known = vec![false; teachers.len()];
    for r in records {
        if known.iter().all(|&k| k) {
            break;
        }
        match &r.teachers {
            TeacherSrc::Pt { dir, available } => {
                if !available.iter().any(|a| {
                    teachers
                        .iter()
                        .position(|t| t == a)
                        .is_some_and(|k| !known[k])
                }) {
                    continue;
                }
                if let Ok(items) = pt::read_pt(&dir.join("clips_output.pt")) {
                    for (k, t) in teachers.iter().enumerate() {
                        if let Some((_, v)) = items.iter().find(|(n, _)| *n == format!("{t}_img")) {
                            if !known[k] {
                                raw_dims[k] = v.data.len();
                                known[k] = true;
                            }
                        }
                    }
                }
            }
            TeacherSrc::Files(specs) => {
                for s in specs {
                    let Some(k) = teachers.iter().position(|t| *t == s.name) else {
                        continue;
                    };
                    if known[k] {
                        continue;
                    }
                    let v = s.raw_image.as_ref().unwrap_or(&s.image);
                    if let Ok(x) = feature_value(v, base) {
                        raw_dims[k] = x.len();
                        known[k] = true;
                    }
                }
            }
            TeacherSrc::None => {}
        }
    }
    if !opts.skip_bad {
        if let Some(k) = known.iter().position(|&k| !k) {
            bail!(
                "teacher {}: no record has readable raw features to fix its width",
                teachers[k]
            );
        }
    }
    let root = match opts.format {
        SourceFormat::MmkdClip => PathBuf::from(&opts.input),
        _ => base.to_path_buf(),
    };
    let mut classes = read_text_lines(&root.join("classes.txt"))?;
    let templates = read_text_lines(&root.join("templates.txt"))?;
    let has_labels = records.iter().any(|r| r.label.is_some());
    if classes.is_empty() {
        let mut names = BTreeSet::new();
        let mut max_int = -1i64;
        for r in records {
            match &r.label {
                Some(serde_json::Value::String(s)) => {
                    names.insert(s.clone());
                }
                Some(serde_json::Value::Number(n)) => {
                    max_int = max_int.max(n.as_i64().unwrap_or(-1))
                }
                _ => {}
            }
        }
        if !names.is_empty() && max_int >= 0 {
            bail!("labels mix names and numbers and there is no classes.txt to relate them");
        }
        classes = if names.is_empty() {
            (0..=max_int).map(|i| format!("class {i}")).collect()
        } else {
            names.into_iter().collect()
        };
    }
    Ok(Plan {
        teachers,
        raw_dims,
        classes,
        templates,
        has_labels,
    })
}

fn feature_value(v: &serde_json::Value, base: &Path) -> Result<Vec<f32>> {
    match v {
        serde_json::Value::String(s) => features::load_vector(s, base),
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| anyhow!("inline feature holds a non-number"))
            })
            .collect(),
        _ => bail!("feature must be a file path or an inline array"),
    }
}

fn check_vec(v: &[f32], want: usize, what: &str) -> std::result::Result<(), Bad> {
    if v.len() != want {
        return bad(
            Reason::Width,
            format!("{what}: width {}, expected {want}", v.len()),
        );
    }
    if let Some(k) = v.iter().position(|x| !x.is_finite()) {
        return bad(
            Reason::NonFinite,
            format!("{what}: element {k} is {}", v[k]),
        );
    }
    Ok(())
}

fn prepare(
    r: &Record,
    opts: &PackOptions,
    plan: &Plan,
    tok: &Tokenizer,
    base: &Path,
) -> std::result::Result<Prepared, Bad> {
    let caption = match &r.caption {
        Ok(c) => c.clone(),
        Err((reason, msg)) => return bad(*reason, msg.clone()),
    };
    let label = match &r.label {
        None | Some(serde_json::Value::Null) => -1,
        Some(serde_json::Value::Number(n)) => match n.as_i64() {
            Some(i) if i >= -1 && i < plan.classes.len() as i64 => i as i32,
            _ => {
                return bad(
                    Reason::Label,
                    format!("label {n} is outside 0..{}", plan.classes.len()),
                )
            }
        },
        Some(serde_json::Value::String(s)) => match plan.classes.iter().position(|c| c == s) {
            Some(i) => i as i32,
            None => return bad(Reason::Label, format!("label {s:?} is not a known class")),
        },
        Some(v) => {
            return bad(
                Reason::Label,
                format!("label {v} must be a number or a class name"),
            )
        }
    };
    let mut feats = Vec::new();
    let mut avail = 0u64;
    let mut mismatch = false;
    match &r.teachers {
        TeacherSrc::None => {}
        TeacherSrc::Pt { dir, available } => {
            let pp = dir.join("clips_project_output.pt");
            let rp = dir.join("clips_output.pt");
            let proj = pt::read_pt(&pp).map_err(|e| Bad {
                reason: Reason::Pt,
                msg: format!("{e:#}"),
            })?;
            let raw = pt::read_pt(&rp).map_err(|e| Bad {
                reason: Reason::Pt,
                msg: format!("{e:#}"),
            })?;
            let find = |items: &[(String, pt::PtTensor)], k: &str| {
                items
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| t.data.clone())
            };
            let mut present = BTreeSet::new();
            for (n, _) in proj.iter().chain(raw.iter()) {
                if let Some(t) = n.strip_suffix("_img").or_else(|| n.strip_suffix("_txt")) {
                    present.insert(t.to_string());
                }
            }
            let listed: BTreeSet<String> = available.iter().cloned().collect();
            for (k, t) in plan.teachers.iter().enumerate() {
                if !listed.contains(t) {
                    continue;
                }
                let (ki, kt) = (format!("{t}_img"), format!("{t}_txt"));
                let (Some(pi), Some(ptx), Some(ri), Some(rt)) = (
                    find(&proj, &ki),
                    find(&proj, &kt),
                    find(&raw, &ki),
                    find(&raw, &kt),
                ) else {
                    continue;
                };
                check_vec(&pi, PROJ_DIM, &format!("{} key {ki}", pp.display()))?;
                check_vec(&ptx, PROJ_DIM, &format!("{} key {kt}", pp.display()))?;
                check_vec(&ri, plan.raw_dims[k], &format!("{} key {ki}", rp.display()))?;
                check_vec(&rt, plan.raw_dims[k], &format!("{} key {kt}", rp.display()))?;
                avail |= 1 << k;
                feats.push((k, pi, ptx, ri, rt));
            }
            mismatch = listed != present || feats.len() != listed.len();
            if avail == 0 {
                return bad(Reason::NoTeacher, format!("no teacher is both listed in available_clips {available:?} and present in {}", dir.display()));
            }
        }
        TeacherSrc::Files(specs) => {
            for s in specs {
                let Some(k) = plan.teachers.iter().position(|t| *t == s.name) else {
                    continue;
                };
                let load = |v: &serde_json::Value, what: &str| {
                    feature_value(v, base).map_err(|e| Bad {
                        reason: Reason::Feature,
                        msg: format!("teacher {} {what}: {e:#}", s.name),
                    })
                };
                let pi = load(&s.image, "image")?;
                let ptx = load(&s.text, "text")?;
                let ri = match &s.raw_image {
                    Some(v) => load(v, "raw_image")?,
                    None => pi.clone(),
                };
                let rt = match &s.raw_text {
                    Some(v) => load(v, "raw_text")?,
                    None => ptx.clone(),
                };
                check_vec(&pi, PROJ_DIM, &format!("teacher {} image", s.name))?;
                check_vec(&ptx, PROJ_DIM, &format!("teacher {} text", s.name))?;
                check_vec(
                    &ri,
                    plan.raw_dims[k],
                    &format!("teacher {} raw image", s.name),
                )?;
                check_vec(
                    &rt,
                    plan.raw_dims[k],
                    &format!("teacher {} raw text", s.name),
                )?;
                if avail & (1 << k) == 0 {
                    avail |= 1 << k;
                    feats.push((k, pi, ptx, ri, rt));
                }
            }
            if !plan.teachers.is_empty() && avail == 0 {
                return bad(Reason::NoTeacher, "no teacher features listed");
            }
        }
    }
    let image = match &r.image {
        ImageSrc::Path(p) => {
            let bytes = std::fs::read(p).map_err(|e| Bad {
                reason: Reason::Image,
                msg: format!("image {}: {e}", p.display()),
            })?;
            image_proc::prepare_image(&bytes, opts.image_size, &format!("image {}", p.display()))
        }
        ImageSrc::Bytes(b) => {
            image_proc::prepare_image(b, opts.image_size, &format!("image of {}", r.id))
        }
        ImageSrc::Missing => return bad(Reason::Image, "record has no image"),
    }
    .map_err(|e| Bad {
        reason: Reason::Image,
        msg: format!("{e:#}"),
    })?;
    let (tokens, truncated) =
        tokenizer::encode(tok, &caption, opts.context_length).map_err(|e| Bad {
            reason: Reason::Record,
            msg: format!("{e:#}"),
        })?;
    Ok(Prepared {
        id: r.id.clone(),
        caption,
        image,
        tokens,
        truncated,
        avail,
        mismatch,
        label,
        feats,
    })
}
