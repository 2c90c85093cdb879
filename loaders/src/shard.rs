//! One shard file: a fixed header, a section table, and 64-byte-aligned sections, each with
//! its own xxh3-64 checksum. The byte layout is documented in `loaders/FORMAT.md`.
//!
//! [`ShardWriter`] writes a shard atomically (temporary file, fsync, rename); [`Shard`] maps
//! one read-only and hands out typed, zero-copy views of its sections.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

/// First eight bytes of every shard.
pub const MAGIC: [u8; 8] = *b"MMKDSHRD";
/// Format version written by this crate and the only one it reads.
pub const VERSION: u32 = 1;
/// Alignment of every section's start, in bytes.
pub const ALIGN: u64 = 64;
/// Size of the fixed header, in bytes.
pub const HEADER_LEN: usize = 64;
/// Size of one section-table entry, in bytes.
pub const ENTRY_LEN: usize = 96;
/// Longest section name (ASCII, zero-padded in the table).
pub const NAME_LEN: usize = 24;
/// Upper bound on the number of sections, so a corrupt count cannot ask for a huge table.
pub const MAX_SECTIONS: u32 = 4096;

/// Element type of a section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    U16,
    U32,
    U64,
    I32,
    F16,
    Bf16,
    F32,
}

impl Dtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 => 8,
        }
    }
    fn code(self) -> u32 {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 => 2,
            Dtype::U32 => 3,
            Dtype::U64 => 4,
            Dtype::I32 => 5,
            Dtype::F16 => 6,
            Dtype::Bf16 => 7,
            Dtype::F32 => 8,
        }
    }
    fn from_code(c: u32) -> Option<Dtype> {
        Some(match c {
            1 => Dtype::U8,
            2 => Dtype::U16,
            3 => Dtype::U32,
            4 => Dtype::U64,
            5 => Dtype::I32,
            6 => Dtype::F16,
            7 => Dtype::Bf16,
            8 => Dtype::F32,
            _ => return None,
        })
    }
}

/// Where one section lives and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    pub name: String,
    pub dtype: Dtype,
    /// Up to four dimensions; unused trailing ones are absent.
    pub shape: Vec<u64>,
    pub offset: u64,
    pub len: u64,
    pub checksum: u64,
}

/// Builds a shard in memory, then writes it atomically with [`ShardWriter::finish`].
pub struct ShardWriter {
    sections: Vec<(String, Dtype, Vec<u64>, Vec<u8>)>,
    num_samples: u64,
}

impl ShardWriter {
    /// A writer for a shard holding `num_samples` samples.
    pub fn new(num_samples: u64) -> Self {
        ShardWriter {
            sections: Vec::new(),
            num_samples,
        }
    }

    /// Adds one section; `data` holds `shape.iter().product()` elements of `dtype`.
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[u64], data: Vec<u8>) -> Result<()> {
        if name.is_empty() || name.len() > NAME_LEN || !name.is_ascii() {
            bail!("section name {name:?} must be 1..={NAME_LEN} ASCII bytes");
        }
        if shape.len() > 4 {
            bail!("section {name}: at most 4 dimensions, got {}", shape.len());
        }
        let elems: u64 = shape.iter().product();
        if elems * dtype.size() as u64 != data.len() as u64 {
            bail!(
                "section {name}: shape {shape:?} of {dtype:?} needs {} bytes, got {}",
                elems * dtype.size() as u64,
                data.len()
            );
        }
        if self.sections.iter().any(|s| s.0 == name) {
            bail!("section {name} added twice");
        }
        self.sections
            .push((name.to_string(), dtype, shape.to_vec(), data));
        Ok(())
    }

    /// Total size of the file this writer would produce.
    pub fn file_len(&self) -> u64 {
        let mut off = align_up((HEADER_LEN + ENTRY_LEN * self.sections.len()) as u64);
        for s in &self.sections {
            off = align_up(off + s.3.len() as u64);
        }
        off
    }

    /// Writes the shard to `path` atomically: `path` + `.tmp`, fsync, rename, fsync of the folder.
    /// Sections are streamed to the file, so peak memory stays at the sections themselves.
    /// Returns the number of bytes written.
    pub fn finish(self, path: &Path) -> Result<u64> {
        let head = self.head();
        let total = self.file_len();
        write_atomic_with(path, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&head)?;
            let mut off = head.len() as u64;
            let zeros = [0u8; ALIGN as usize];
            for s in &self.sections {
                w.write_all(&s.3)?;
                off += s.3.len() as u64;
                let pad = align_up(off) - off;
                w.write_all(&zeros[..pad as usize])?;
                off += pad;
            }
            w.flush()?;
            Ok(())
        })?;
        Ok(total)
    }

    /// The complete shard image in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head();
        for s in &self.sections {
            out.extend_from_slice(&s.3);
            out.resize(align_up(out.len() as u64) as usize, 0);
        }
        out
    }

    /// Header and section table, padded to the first section.
    fn head(&self) -> Vec<u8> {
        let n = self.sections.len();
        let table_end = (HEADER_LEN + ENTRY_LEN * n) as u64;
        let total = self.file_len();
        let mut out = vec![0u8; align_up(table_end) as usize];
        let mut off = align_up(table_end);
        for (i, (name, dtype, shape, data)) in self.sections.iter().enumerate() {
            let e = &mut out[HEADER_LEN + i * ENTRY_LEN..HEADER_LEN + (i + 1) * ENTRY_LEN];
            e[..name.len()].copy_from_slice(name.as_bytes());
            e[24..28].copy_from_slice(&dtype.code().to_le_bytes());
            e[28..32].copy_from_slice(&(shape.len() as u32).to_le_bytes());
            for (d, v) in shape.iter().enumerate() {
                e[32 + 8 * d..40 + 8 * d].copy_from_slice(&v.to_le_bytes());
            }
            e[64..72].copy_from_slice(&off.to_le_bytes());
            e[72..80].copy_from_slice(&(data.len() as u64).to_le_bytes());
            e[80..88].copy_from_slice(&xxh3_64(data).to_le_bytes());
            off = align_up(off + data.len() as u64);
        }
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.num_samples.to_le_bytes());
        out[24..32].copy_from_slice(&total.to_le_bytes());
        // The header checksum covers the header (with this field zero) and the whole table,
        // so a flipped bit in an offset or a length is caught before any section is touched.
        let h = xxh3_64(&out[..table_end as usize]);
        out[32..40].copy_from_slice(&h.to_le_bytes());
        out
    }
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Writes `bytes` to `path` through a temporary file in the same folder, fsyncs it, renames it
/// into place and fsyncs the folder, so a reader sees either nothing or the whole file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill` writing into the temporary file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut f).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                // Folder fsync makes the rename durable; some filesystems refuse it, which is harmless.
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A read-only, memory-mapped shard whose header and table have been validated.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    num_samples: u64,
    sections: Vec<SectionInfo>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("num_samples", &self.num_samples)
            .finish()
    }
}

/// Parses and validates a shard image held in memory; `what` names it in errors.
/// Checks magic, version, header checksum, every section's bounds and alignment, and (when
/// `verify` is set) every section's checksum.
pub fn parse_sections(bytes: &[u8], what: &str, verify: bool) -> Result<(u64, Vec<SectionInfo>)> {
    if bytes.len() < HEADER_LEN {
        bail!(
            "{what}: not a shard: {} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        );
    }
    if bytes[0..8] != MAGIC {
        bail!(
            "{what}: not a shard: bad magic {:?}, expected {:?}",
            &bytes[0..8],
            MAGIC
        );
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let version = u32_at(8);
    if version != VERSION {
        bail!("{what}: unsupported shard version {version}, this build reads version {VERSION}");
    }
    let n = u32_at(12);
    if n > MAX_SECTIONS {
        bail!("{what}: section count {n} exceeds the limit {MAX_SECTIONS}");
    }
    let num_samples = u64_at(16);
    let total = u64_at(24);
    if total != bytes.len() as u64 {
        bail!(
            "{what}: truncated or extended: header says {total} bytes, file has {}",
            bytes.len()
        );
    }
    let table_end = HEADER_LEN + ENTRY_LEN * n as usize;
    if table_end > bytes.len() {
        bail!(
            "{what}: section table ends at byte {table_end}, past the end of the file ({} bytes)",
            bytes.len()
        );
    }
    let stored = u64_at(32);
    let mut head = bytes[..table_end].to_vec();
    head[32..40].fill(0);
    if xxh3_64(&head) != stored {
        bail!("{what}: header checksum mismatch (header or section table corrupted)");
    }
    let mut sections = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let e = HEADER_LEN + i * ENTRY_LEN;
        let raw_name = &bytes[e..e + NAME_LEN];
        let end = raw_name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        let name = std::str::from_utf8(&raw_name[..end])
            .ok()
            .filter(|s| !s.is_empty() && s.is_ascii())
            .with_context(|| format!("{what}: section {i} has an invalid name"))?
            .to_string();
        let dtype = Dtype::from_code(u32_at(e + 24)).with_context(|| {
            format!(
                "{what}: section {name}: unknown dtype code {}",
                u32_at(e + 24)
            )
        })?;
        let ndim = u32_at(e + 28) as usize;
        if ndim > 4 {
            bail!("{what}: section {name}: {ndim} dimensions, at most 4 allowed");
        }
        let shape: Vec<u64> = (0..ndim).map(|d| u64_at(e + 32 + 8 * d)).collect();
        let offset = u64_at(e + 64);
        let len = u64_at(e + 72);
        let checksum = u64_at(e + 80);
        let elems = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let want = elems.and_then(|x| x.checked_mul(dtype.size() as u64));
        if want != Some(len) {
            bail!("{what}: section {name}: shape {shape:?} of {dtype:?} does not match its length {len}");
        }
        if offset % ALIGN != 0 || offset < table_end as u64 {
            bail!("{what}: section {name}: offset {offset} is misaligned or inside the header");
        }
        match offset.checked_add(len) {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => bail!("{what}: section {name}: bytes {offset}+{len} run past the end of the file ({} bytes)", bytes.len()),
        }
        if verify && xxh3_64(&bytes[offset as usize..(offset + len) as usize]) != checksum {
            bail!("{what}: section {name}: checksum mismatch (data corrupted)");
        }
        if sections.iter().any(|s: &SectionInfo| s.name == name) {
            bail!("{what}: section {name} appears twice");
        }
        sections.push(SectionInfo {
            name,
            dtype,
            shape,
            offset,
            len,
            checksum,
        });
    }
    Ok((num_samples, sections))
}

impl Shard {
    /// Maps and validates the shard at `path`; `verify_checksums` also hashes every section.
    pub fn open(path: &Path, verify_checksums: bool) -> Result<Shard> {
        let f = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
        // SAFETY: the map is read-only; shards are written once through a rename and never
        // modified in place, so the bytes do not change while mapped.
        let map = unsafe { Mmap::map(&f) }
            .with_context(|| format!("mapping shard {}", path.display()))?;
        let what = format!("shard {}", path.display());
        let (num_samples, sections) = parse_sections(&map, &what, verify_checksums)?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            num_samples,
            sections,
        })
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of samples the header declares.
    pub fn num_samples(&self) -> u64 {
        self.num_samples
    }
    /// The section table.
    pub fn sections(&self) -> &[SectionInfo] {
        &self.sections
    }
    /// Table entry of a section, if present.
    pub fn info(&self, name: &str) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// Raw bytes of the section a table entry describes.
    pub fn section_bytes(&self, s: &SectionInfo) -> &[u8] {
        &self.map[s.offset as usize..(s.offset + s.len) as usize]
    }

    /// Raw bytes of a section.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let s = self
            .info(name)
            .with_context(|| format!("shard {}: missing section {name}", self.path.display()))?;
        Ok(&self.map[s.offset as usize..(s.offset + s.len) as usize])
    }

    /// A typed view of a section, checking its dtype and shape.
    pub fn typed<T: bytemuck::Pod>(&self, name: &str, dtype: Dtype, shape: &[u64]) -> Result<&[T]> {
        let s = self
            .info(name)
            .with_context(|| format!("shard {}: missing section {name}", self.path.display()))?;
        if s.dtype != dtype || s.shape != shape {
            bail!(
                "shard {}: section {name} is {:?} {:?}, expected {:?} {:?}",
                self.path.display(),
                s.dtype,
                s.shape,
                dtype,
                shape
            );
        }
        bytemuck::try_cast_slice(self.bytes(name)?)
            .map_err(|e| anyhow::anyhow!("shard {}: section {name}: {e}", self.path.display()))
    }
}
