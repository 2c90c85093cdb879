//! PyTorch `.pt` checkpoints holding a dict of 1-D (or small N-D) tensors, as the MMKD-CLIP
//! release stores teacher features.
//!
//! A `.pt` file is a zip archive `<prefix>/data.pkl`, `<prefix>/byteorder`, `<prefix>/data/<key>`
//! (raw little-endian storages) and `<prefix>/version`. The pickle is *interpreted*, never
//! executed: [`read_pt`] knows only the opcodes and globals this format uses (dict, OrderedDict,
//! `torch._utils._rebuild_tensor_v2`, float32/float16/bfloat16 storages as persistent ids) and
//! rejects everything else with an error naming the file. [`write_pt`] writes the same layout
//! with a protocol-2 pickle, opcode for opcode as `torch.save` does.

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;

/// Storage element type of a tensor in a `.pt` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtDtype {
    F32,
    F16,
    Bf16,
}

impl PtDtype {
    fn storage_name(self) -> &'static str {
        match self {
            PtDtype::F32 => "FloatStorage",
            PtDtype::F16 => "HalfStorage",
            PtDtype::Bf16 => "BFloat16Storage",
        }
    }
    fn size(self) -> usize {
        match self {
            PtDtype::F32 => 4,
            PtDtype::F16 | PtDtype::Bf16 => 2,
        }
    }
}

/// One tensor read from (or to be written to) a `.pt` file; values are widened to `f32`
/// exactly (every f16/bf16 value is representable in f32).
#[derive(Clone, Debug, PartialEq)]
pub struct PtTensor {
    pub dtype: PtDtype,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Largest storage a `.pt` file may declare (elements); guards allocations on corrupt input.
const MAX_NUMEL: u64 = 1 << 28;
/// Largest pickle stack / memo we accept; real files need a few dozen entries.
const MAX_STACK: usize = 1 << 16;

#[derive(Clone, Debug)]
enum Val {
    None,
    Bool,
    Int(i64),
    Str(String),
    Tuple(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Mark,
    Rebuild,
    OrderedDictCls,
    StorageType(PtDtype),
    Storage {
        dtype: PtDtype,
        key: String,
        numel: u64,
    },
    Tensor {
        dtype: PtDtype,
        key: String,
        numel: u64,
        offset: u64,
        size: Vec<u64>,
        stride: Vec<u64>,
    },
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .p
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| anyhow!("pickle ends early at byte {}", self.p))?;
        let s = &self.b[self.p..end];
        self.p = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.b[self.p..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("unterminated GLOBAL at byte {}", self.p))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| anyhow!("GLOBAL name is not UTF-8"))?
            .to_string();
        self.p += n + 1;
        Ok(s)
    }
}

fn pop_mark(stack: &mut Vec<Val>) -> Result<Vec<Val>> {
    let m = stack
        .iter()
        .rposition(|v| matches!(v, Val::Mark))
        .ok_or_else(|| anyhow!("MARK missing"))?;
    let items = stack.split_off(m + 1);
    stack.pop();
    Ok(items)
}

fn pop(stack: &mut Vec<Val>) -> Result<Val> {
    match stack.pop() {
        Some(Val::Mark) | None => bail!("stack underflow"),
        Some(v) => Ok(v),
    }
}

fn as_u64(v: &Val, what: &str) -> Result<u64> {
    match v {
        Val::Int(i) if *i >= 0 => Ok(*i as u64),
        _ => bail!("{what}: expected a non-negative integer, got {v:?}"),
    }
}

fn int_tuple(v: &Val, what: &str) -> Result<Vec<u64>> {
    match v {
        Val::Tuple(items) => items.iter().map(|x| as_u64(x, what)).collect(),
        _ => bail!("{what}: expected a tuple of integers"),
    }
}

fn reduce(f: Val, args: Val) -> Result<Val> {
    let args = match args {
        Val::Tuple(a) => a,
        other => bail!("REDUCE arguments must be a tuple, got {other:?}"),
    };
    match f {
        Val::OrderedDictCls => {
            if !args.is_empty() {
                bail!("OrderedDict() with arguments is not supported");
            }
            Ok(Val::Dict(Vec::new()))
        }
        Val::Rebuild => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 || args.len() > 7 {
                bail!(
                    "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                    args.len()
                );
            }
            let (dtype, key, numel) = match &args[0] {
                Val::Storage { dtype, key, numel } => (*dtype, key.clone(), *numel),
                other => {
                    bail!("_rebuild_tensor_v2: first argument must be a storage, got {other:?}")
                }
            };
            let offset = as_u64(&args[1], "storage offset")?;
            let size = int_tuple(&args[2], "tensor size")?;
            let stride = int_tuple(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                bail!("tensor size {size:?} and stride {stride:?} differ in rank");
            }
            Ok(Val::Tensor {
                dtype,
                key,
                numel,
                offset,
                size,
                stride,
            })
        }
        other => bail!("REDUCE on a value that is not an allowed callable: {other:?}"),
    }
}

fn global(module: &str, name: &str) -> Result<Val> {
    Ok(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Val::Rebuild,
        ("collections", "OrderedDict") => Val::OrderedDictCls,
        ("torch", "FloatStorage") => Val::StorageType(PtDtype::F32),
        ("torch", "HalfStorage") => Val::StorageType(PtDtype::F16),
        ("torch", "BFloat16Storage") => Val::StorageType(PtDtype::Bf16),
        _ => bail!("global {module}.{name} is not allowed"),
    })
}

/// Interprets a pickle, returning the top-level object. Only the opcodes torch.save emits for
/// a dict of tensors are accepted.
fn unpickle(bytes: &[u8]) -> Result<Val> {
    let mut r = Reader { b: bytes, p: 0 };
    let mut stack: Vec<Val> = Vec::new();
    let mut memo: HashMap<u32, Val> = HashMap::new();
    loop {
        if stack.len() > MAX_STACK || memo.len() > MAX_STACK {
            bail!("pickle too large (stack or memo over {MAX_STACK} entries)");
        }
        let at = r.p;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    bail!("unsupported pickle protocol {proto}");
                }
            }
            b'}' => stack.push(Val::Dict(Vec::new())),
            b')' => stack.push(Val::Tuple(Vec::new())),
            b'(' => stack.push(Val::Mark),
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool),
            0x89 => stack.push(Val::Bool),
            b'K' => stack.push(Val::Int(r.u8()? as i64)),
            b'M' => stack.push(Val::Int(r.u16()? as i64)),
            b'J' => stack.push(Val::Int(r.u32()? as i32 as i64)),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = r.u8()? as usize;
                if n > 8 {
                    bail!("LONG1 of {n} bytes does not fit 64 bits");
                }
                let b = r.take(n)?;
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Val::Int(v));
            }
            b'X' => {
                let n = r.u32()? as usize;
                let s = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| anyhow!("string at byte {at} is not UTF-8"))?;
                stack.push(Val::Str(s.to_string()));
            }
            0x8c => {
                let n = r.u8()? as usize;
                let s = std::str::from_utf8(r.take(n)?)
                    .map_err(|_| anyhow!("string at byte {at} is not UTF-8"))?;
                stack.push(Val::Str(s.to_string()));
            }
            b'q' => {
                let k = r.u8()? as u32;
                let v = stack
                    .last()
                    .ok_or_else(|| anyhow!("BINPUT on an empty stack"))?
                    .clone();
                memo.insert(k, v);
            }
            b'r' => {
                let k = r.u32()?;
                let v = stack
                    .last()
                    .ok_or_else(|| anyhow!("LONG_BINPUT on an empty stack"))?
                    .clone();
                memo.insert(k, v);
            }
            0x94 => {
                let k = memo.len() as u32;
                let v = stack
                    .last()
                    .ok_or_else(|| anyhow!("MEMOIZE on an empty stack"))?
                    .clone();
                memo.insert(k, v);
            }
            b'h' => {
                let k = r.u8()? as u32;
                stack.push(
                    memo.get(&k)
                        .cloned()
                        .ok_or_else(|| anyhow!("BINGET of unknown memo {k}"))?,
                );
            }
            b'j' => {
                let k = r.u32()?;
                stack.push(
                    memo.get(&k)
                        .cloned()
                        .ok_or_else(|| anyhow!("LONG_BINGET of unknown memo {k}"))?,
                );
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(global(&module, &name)?);
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Val::Tuple(items));
            }
            0x85 => {
                let a = pop(&mut stack)?;
                stack.push(Val::Tuple(vec![a]));
            }
            0x86 => {
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Val::Tuple(vec![a, b]));
            }
            0x87 => {
                let c = pop(&mut stack)?;
                let b = pop(&mut stack)?;
                let a = pop(&mut stack)?;
                stack.push(Val::Tuple(vec![a, b, c]));
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let items = match pid {
                    Val::Tuple(items) => items,
                    other => bail!("persistent id must be a tuple, got {other:?}"),
                };
                match items.as_slice() {
                    [Val::Str(tag), Val::StorageType(dtype), Val::Str(key), Val::Str(_location), numel]
                        if tag == "storage" =>
                    {
                        let numel = as_u64(numel, "storage numel")?;
                        if numel > MAX_NUMEL {
                            bail!("storage of {numel} elements exceeds the limit {MAX_NUMEL}");
                        }
                        stack.push(Val::Storage {
                            dtype: *dtype,
                            key: key.clone(),
                            numel,
                        });
                    }
                    _ => bail!("unsupported persistent id {items:?}"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(reduce(f, args)?);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Val::Dict(d)) => d.push((k, v)),
                    _ => bail!("SETITEM on a value that is not a dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                if items.len() % 2 != 0 {
                    bail!("SETITEMS with an odd number of items");
                }
                match stack.last_mut() {
                    Some(Val::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => bail!("SETITEMS on a value that is not a dict"),
                }
            }
            b'.' => return pop(&mut stack),
            other => bail!("opcode 0x{other:02x} at byte {at} is not allowed"),
        }
    }
}

/// Reads a `.pt` file holding a dict (or OrderedDict) from string keys to tensors, in file order.
pub fn read_pt(path: &Path) -> Result<Vec<(String, PtTensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    read_pt_bytes(&bytes)
        .with_context(|| format!("{}: not a valid tensor-dict .pt file", path.display()))
}

/// Like [`read_pt`], from bytes already in memory.
pub fn read_pt_bytes(bytes: &[u8]) -> Result<Vec<(String, PtTensor)>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).context("not a zip archive")?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no <name>/data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        f.take(64)
            .read_to_string(&mut s)
            .context("reading byteorder")?;
        if s.trim() != "little" {
            bail!("byteorder {:?} is not supported (only little)", s.trim());
        }
    }
    let pkl = read_entry(&mut zip, &pkl_name, 64 << 20)?;
    let top = unpickle(&pkl)?;
    let items = match top {
        Val::Dict(d) => d,
        other => bail!("top-level object must be a dict, got {other:?}"),
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let key = match k {
            Val::Str(s) => s,
            other => bail!("dict key must be a string, got {other:?}"),
        };
        let Val::Tensor {
            dtype,
            key: skey,
            numel,
            offset,
            size,
            stride,
        } = v
        else {
            bail!("value of {key:?} is not a tensor");
        };
        let raw = read_entry(
            &mut zip,
            &format!("{prefix}data/{skey}"),
            MAX_NUMEL as usize * 4,
        )?;
        if raw.len() as u64 != numel * dtype.size() as u64 {
            bail!(
                "{key}: storage {skey} has {} bytes, expected {} elements of {} bytes",
                raw.len(),
                numel,
                dtype.size()
            );
        }
        let count = size
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| anyhow!("{key}: size overflows"))?;
        if count > numel {
            bail!("{key}: tensor of {count} elements does not fit its storage of {numel}");
        }
        // Largest element index touched, checked against the storage before any read.
        let mut last = offset;
        for (&d, &s) in size.iter().zip(&stride) {
            if d > 0 {
                last = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| anyhow!("{key}: stride overflows"))?;
            }
        }
        if count > 0 && last >= numel {
            bail!("{key}: view (offset {offset}, size {size:?}, stride {stride:?}) reaches past its storage of {numel}");
        }
        let elem = |i: u64| -> f32 {
            let o = i as usize * dtype.size();
            match dtype {
                PtDtype::F32 => f32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]),
                PtDtype::F16 => f16::from_le_bytes([raw[o], raw[o + 1]]).to_f32(),
                PtDtype::Bf16 => bf16::from_le_bytes([raw[o], raw[o + 1]]).to_f32(),
            }
        };
        let mut data = Vec::with_capacity(count as usize);
        let mut idx = vec![0u64; size.len()];
        for _ in 0..count {
            let lin = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<u64>();
            data.push(elem(lin));
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out.push((
            key,
            PtTensor {
                dtype,
                shape: size.iter().map(|&d| d as usize).collect(),
                data,
            },
        ));
    }
    Ok(out)
}

fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: usize,
) -> Result<Vec<u8>> {
    let f = zip
        .by_name(name)
        .with_context(|| format!("archive entry {name} missing"))?;
    if f.size() as usize > limit {
        bail!(
            "archive entry {name} is {} bytes, over the limit {limit}",
            f.size()
        );
    }
    let mut v = Vec::with_capacity(f.size() as usize);
    f.take(limit as u64 + 1)
        .read_to_end(&mut v)
        .with_context(|| format!("reading archive entry {name}"))?;
    Ok(v)
}

struct Pickler {
    out: Vec<u8>,
    memo: u32,
}

impl Pickler {
    fn put(&mut self) {
        if self.memo < 256 {
            self.out.extend_from_slice(&[b'q', self.memo as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&self.memo.to_le_bytes());
        }
        self.memo += 1;
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put();
    }
    fn int(&mut self, v: usize) {
        if v < 256 {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        }
    }
    fn int_tuple(&mut self, v: &[usize]) {
        match v.len() {
            0 => self.out.push(b')'),
            1..=3 => {
                for &x in v {
                    self.int(x);
                }
                self.out.push([0x85, 0x86, 0x87][v.len() - 1]);
            }
            _ => {
                self.out.push(b'(');
                for &x in v {
                    self.int(x);
                }
                self.out.push(b't');
            }
        }
        if !v.is_empty() {
            self.put();
        }
    }
}

/// Writes a `.pt` file holding a dict (or, with `ordered`, an OrderedDict) of contiguous tensors,
/// in the layout `torch.save` produces (protocol-2 pickle, one storage per tensor, storages
/// 64-byte aligned and stored uncompressed). The write is atomic.
pub fn write_pt(path: &Path, tensors: &[(String, PtTensor)], ordered: bool) -> Result<()> {
    let bytes = write_pt_bytes(
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("archive"),
        tensors,
        ordered,
    )?;
    crate::shard::write_atomic(path, &bytes)
}

/// Builds the bytes of a `.pt` archive; `prefix` names its top folder (torch uses `archive`
/// in recent versions and the file stem in older ones; readers accept either).
pub fn write_pt_bytes(
    prefix: &str,
    tensors: &[(String, PtTensor)],
    ordered: bool,
) -> Result<Vec<u8>> {
    let mut p = Pickler {
        out: vec![0x80, 2],
        memo: 0,
    };
    if ordered {
        p.out.extend_from_slice(b"ccollections\nOrderedDict\n");
        p.put();
        p.out.push(b')');
        p.out.push(b'R');
    } else {
        p.out.push(b'}');
    }
    p.put();
    if !tensors.is_empty() {
        p.out.push(b'(');
    }
    for (i, (name, t)) in tensors.iter().enumerate() {
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            bail!(
                "tensor {name}: shape {:?} needs {numel} values, got {}",
                t.shape,
                t.data.len()
            );
        }
        p.str(name);
        p.out
            .extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
        p.put();
        p.out.extend_from_slice(b"((");
        p.str("storage");
        p.out
            .extend_from_slice(format!("ctorch\n{}\n", t.dtype.storage_name()).as_bytes());
        p.put();
        p.str(&i.to_string());
        p.str("cpu");
        p.int(numel);
        p.out.push(b't');
        p.put();
        p.out.push(b'Q');
        p.int(0);
        p.int_tuple(&t.shape);
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        p.int_tuple(&stride);
        p.out.push(0x89);
        p.out.extend_from_slice(b"ccollections\nOrderedDict\n");
        p.put();
        p.out.push(b')');
        p.out.push(b'R');
        p.put();
        p.out.push(b't');
        p.put();
        p.out.push(b'R');
        p.put();
    }
    if !tensors.is_empty() {
        p.out.push(b'u');
    }
    p.out.push(b'.');

    let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let aligned = opts.with_alignment(64);
    zw.start_file(format!("{prefix}/data.pkl"), opts)?;
    zw.write_all(&p.out)?;
    zw.start_file(format!("{prefix}/byteorder"), opts)?;
    zw.write_all(b"little")?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        zw.start_file(format!("{prefix}/data/{i}"), aligned)?;
        let mut buf = Vec::with_capacity(t.data.len() * t.dtype.size());
        for &x in &t.data {
            match t.dtype {
                PtDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                PtDtype::F16 => buf.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                PtDtype::Bf16 => buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
            }
        }
        zw.write_all(&buf)?;
    }
    zw.start_file(format!("{prefix}/version"), opts)?;
    zw.write_all(b"3\n")?;
    Ok(zw.finish()?.into_inner())
}
