//! One preallocated block of memory per model: a [`Layout`] (the table of named regions with
//! their byte offsets) and an [`Arena`] that owns the bytes, on the host for the emulation or
//! as one device allocation on a GPU. Kernels see a region as `base + offset`, so the same
//! launch plan runs on either backend and a step allocates nothing.

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};
use half::bf16;
use mmkd_kernels::device::DtohSynced;
use mmkd_kernels::exec::{self, Backend, Step};
use mmkd_kernels::testing::BF16_POISON;
use mmkd_kernels::{Emu, Gpu};
use std::collections::HashMap;
use std::sync::Arc;

/// Byte alignment of every region: more than the 16 bytes `cp.async` and `ldmatrix` need, and
/// the granularity of the device allocator, so offsets keep coalesced rows.
pub const ALIGN: usize = 256;
/// Regions reserve a multiple of this many elements, so fp32 and bf16 regions of the same
/// length occupy 512 and 256 bytes per unit and sections of either type are gap-free.
pub const PAD_ELEMS: usize = 128;

/// True for the sections whose regions kernels only address one by one, never as one span
/// (activations, scratch and tables; the parameter sections are cast, clipped and updated
/// whole). Under the instrumented emulation ([`mmkd_kernels::emu::SANITIZED`]) each of their
/// regions is followed by a guard of [`PAD_ELEMS`] elements besides its padding, and the bytes
/// between its last element and the next region are off limits, so a kernel that overruns a
/// region fails its launch (an overrun longer than the guard still reaches the neighbour
/// before the launch fails).
fn guarded(section: Section) -> bool {
    matches!(section, Section::Acts | Section::Scratch | Section::Tables)
}

/// Elements reserved for a region of `len` elements in `section`.
fn reserve(section: Section, len: usize) -> usize {
    let guard = if mmkd_kernels::emu::SANITIZED && guarded(section) {
        PAD_ELEMS
    } else {
        0
    };
    len.div_ceil(PAD_ELEMS) * PAD_ELEMS + guard
}

/// What a region holds; regions of one section are added back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    /// fp32 master weights (what the optimiser updates).
    Params,
    /// bf16 working copies of the weights, element for element in the order of `Params`.
    ParamsBf16,
    /// fp32 parameter gradients.
    Grads,
    /// Activations kept from the forward for the backward, and the block's inputs/outputs.
    Acts,
    /// Gradients of activations and per-step scratch.
    Scratch,
    /// Optimiser state kept across steps: the fp32 AdamW moments, element for element in the
    /// order of `Params`.
    Optim,
    /// Tables written once per shape or batch: gather indices, sequence lengths, constants.
    Tables,
}

/// Element type of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (raw bits on the device).
    Bf16,
    /// 32-bit signed integer.
    I32,
    /// Unsigned byte (masks).
    U8,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::Bf16 => 2,
            Dtype::U8 => 1,
        }
    }
}

/// One named region of the arena.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Unique name, e.g. `param.attn.in_proj_weight` or `act.qkv`.
    pub name: String,
    /// Which section it belongs to.
    pub section: Section,
    /// Element type.
    pub dtype: Dtype,
    /// Elements in use.
    pub len: usize,
    /// Elements reserved (`len` rounded up to [`PAD_ELEMS`], plus a guard under the
    /// instrumented emulation); the padding stays zero.
    pub reserved: usize,
    /// Byte offset from the arena's base, a multiple of [`ALIGN`].
    pub offset: usize,
}

impl Region {
    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.reserved * self.dtype.bytes()
    }
}

/// Index of a region in its [`Layout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionId(usize);

/// Order of the sections in a [`Layout::grouped`] table.
const SECTION_ORDER: [Section; 7] = [
    Section::Params,
    Section::ParamsBf16,
    Section::Grads,
    Section::Optim,
    Section::Acts,
    Section::Scratch,
    Section::Tables,
];

/// The table of regions: names, types, lengths and byte offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    regions: Vec<Region>,
    by_name: HashMap<String, usize>,
    bytes: usize,
    /// Sections are kept whole whatever the order of `add` (offsets move as regions arrive).
    grouped: bool,
}

impl Layout {
    /// An empty table whose regions are placed in the order they are added; the regions of
    /// one section must then be added one after another.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table for several components (a tower of blocks): regions may be added in
    /// any order of sections, and each section is kept contiguous, the sections in the order
    /// params, bf16 params, grads, optimiser state, activations, scratch, tables; inside a section, regions lie
    /// in the order they were added. Offsets are final once the last region is added.
    pub fn grouped() -> Self {
        Layout {
            grouped: true,
            ..Self::default()
        }
    }

    /// Appends a region of `len` elements at the next aligned offset of its section. Names
    /// are unique; unless the table is [`Layout::grouped`], the regions of one section must
    /// be added one after another.
    pub fn add(
        &mut self,
        name: &str,
        section: Section,
        dtype: Dtype,
        len: usize,
    ) -> Result<RegionId> {
        ensure!(len > 0, "arena region `{name}`: empty");
        ensure!(
            !self.by_name.contains_key(name),
            "arena region `{name}` added twice"
        );
        if let (false, Some(last)) = (self.grouped, self.regions.last()) {
            ensure!(
                last.section == section || self.regions.iter().all(|r| r.section != section),
                "arena region `{name}`: section {section:?} was interrupted by {:?}",
                last.section
            );
        }
        let reserved = reserve(section, len);
        let offset = self.bytes.div_ceil(ALIGN) * ALIGN;
        let r = Region {
            name: name.to_string(),
            section,
            dtype,
            len,
            reserved,
            offset,
        };
        self.bytes = offset + r.bytes();
        self.by_name.insert(name.to_string(), self.regions.len());
        self.regions.push(r);
        if self.grouped {
            self.regroup();
        }
        Ok(RegionId(self.regions.len() - 1))
    }

    /// Recomputes every offset section by section ([`Layout::grouped`]).
    fn regroup(&mut self) {
        let mut at = 0usize;
        for s in SECTION_ORDER {
            for r in self.regions.iter_mut().filter(|r| r.section == s) {
                r.offset = at.div_ceil(ALIGN) * ALIGN;
                at = r.offset + r.bytes();
            }
        }
        self.bytes = at;
    }

    /// True when `self` holds every region of `prefix` under the same id, name, section,
    /// type and length (offsets may differ): plans built on `prefix` are valid on `self`.
    pub fn extends(&self, prefix: &Layout) -> bool {
        self.regions.len() >= prefix.regions.len()
            && self.regions.iter().zip(&prefix.regions).all(|(a, b)| {
                a.name == b.name && a.section == b.section && a.dtype == b.dtype && a.len == b.len
            })
    }

    /// The region of `id`.
    pub fn region(&self, id: RegionId) -> &Region {
        &self.regions[id.0]
    }

    /// Looks a region up by name.
    pub fn id(&self, name: &str) -> Option<RegionId> {
        self.by_name.get(name).map(|&i| RegionId(i))
    }

    /// Every region, in the order added (offset order unless [`Layout::grouped`]).
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes (the size of the one allocation).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Byte offset and byte length of a section (its regions are contiguous); `None` when the
    /// section has no region.
    pub fn section_span(&self, section: Section) -> Option<(usize, usize)> {
        let mut it = self.regions.iter().filter(|r| r.section == section);
        let first = it.next()?;
        let end = it.next_back().unwrap_or(first);
        Some((first.offset, end.offset + end.bytes() - first.offset))
    }

    /// Bytes per section, for reports.
    pub fn section_bytes(&self, section: Section) -> usize {
        self.section_span(section).map_or(0, |(_, b)| b)
    }
}

/// A 256-byte aligned unit of host memory, so host regions are aligned as device ones are.
#[repr(C, align(256))]
#[derive(Clone, Copy)]
struct Chunk([u8; ALIGN]);

enum Mem {
    /// Host memory run by the emulation.
    Host { emu: Emu, buf: Vec<Chunk> },
    /// One device allocation, and the staging of regions filled on a copy stream. Fields drop
    /// in order: the staging first, which waits for copies in flight, then the memory they
    /// write (freed on the compute stream, which does not wait for the copy stream), then the
    /// device (its modules, which launches still queued may use).
    Device {
        staging: Staging,
        buf: CudaSlice<u8>,
        gpu: Arc<Gpu>,
    },
}

/// Regions filled from the host through pinned buffers on a second stream, so the copy of the
/// next batch overlaps the compute of the current one (GPU only; created on first use).
#[derive(Default)]
struct Staging {
    copy: Option<Arc<CudaStream>>,
    regions: HashMap<RegionId, Staged>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // A copy out of the pinned buffer may still be in flight: it must end before the
        // buffer is freed.
        let _ = self.copied.synchronize();
    }
}

/// One staged region's pinned host buffer and its two events.
struct Staged {
    pinned: PinnedHostSlice<u8>,
    /// Recorded on the copy stream once the copy into the region is done.
    copied: CudaEvent,
    /// Recorded on the compute stream once the last plan that read the region is done.
    consumed: CudaEvent,
}

/// The memory of a [`Layout`], zeroed at creation, and the backend that runs plans on it.
pub struct Arena {
    layout: Layout,
    mem: Mem,
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let (true, Mem::Host { buf, .. }) = (mmkd_kernels::emu::SANITIZED, &self.mem) {
            // SAFETY: the whole buffer, still alive; the allocator may reuse it next.
            unsafe { mmkd_kernels::emu::unguard_host(buf.as_ptr().cast(), buf.len() * ALIGN) };
        }
    }
}

impl Arena {
    /// Host memory for `layout`, run by the emulation `emu`.
    pub fn host(layout: Layout, emu: Emu) -> Self {
        let buf = vec![Chunk([0; ALIGN]); layout.bytes().div_ceil(ALIGN)];
        let arena = Arena {
            layout,
            mem: Mem::Host { emu, buf },
        };
        if mmkd_kernels::emu::SANITIZED {
            arena.guard_host_slack();
        }
        arena
    }

    /// Marks, in host memory, the bytes after each guarded region's last element up to the
    /// next region (or the end) off limits to the instrumented kernels.
    fn guard_host_slack(&self) {
        let Mem::Host { buf, .. } = &self.mem else {
            return;
        };
        let total = buf.len() * ALIGN;
        let mut starts: Vec<usize> = self.layout.regions.iter().map(|r| r.offset).collect();
        starts.sort_unstable();
        for r in self.layout.regions.iter().filter(|r| guarded(r.section)) {
            let end = r.offset + r.len * r.dtype.bytes();
            let next = starts
                .iter()
                .copied()
                .find(|&o| o > r.offset)
                .unwrap_or(total);
            if next > end {
                // SAFETY: [end, next) lies inside `buf`, which `Drop` unguards before freeing.
                unsafe {
                    mmkd_kernels::emu::guard_host(buf.as_ptr().cast::<u8>().add(end), next - end)
                };
            }
        }
    }

    /// One zeroed device allocation for `layout` on `gpu`.
    pub fn device(layout: Layout, gpu: Arc<Gpu>) -> Result<Self> {
        let n = layout.bytes().div_ceil(ALIGN) * ALIGN;
        let buf = gpu
            .stream()
            .alloc_zeros::<u8>(n)
            .map_err(|e| anyhow!("allocating the {n}-byte arena on the device: {e:?}"))?;
        Ok(Arena {
            layout,
            mem: Mem::Device {
                gpu,
                buf,
                staging: Staging::default(),
            },
        })
    }

    /// The table this arena was made for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// True for device memory.
    pub fn is_device(&self) -> bool {
        matches!(self.mem, Mem::Device { .. })
    }

    fn host_bytes(buf: &mut [Chunk]) -> &mut [u8] {
        // SAFETY: `Chunk` is a plain byte array; the slice covers exactly the vector's memory.
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * ALIGN) }
    }

    fn checked(&self, id: RegionId, dtype: Dtype, len: usize) -> Result<&Region> {
        let r = self
            .layout
            .regions
            .get(id.0)
            .ok_or_else(|| anyhow!("arena: region {} is not in this layout", id.0))?;
        ensure!(
            r.dtype == dtype,
            "arena region `{}` holds {:?}, {dtype:?} given",
            r.name,
            r.dtype
        );
        ensure!(
            r.len == len,
            "arena region `{}` holds {} elements, {len} given",
            r.name,
            r.len
        );
        Ok(r)
    }

    fn write_bytes(&mut self, id: RegionId, dtype: Dtype, len: usize, src: &[u8]) -> Result<()> {
        let off = self.checked(id, dtype, len)?.offset;
        match &mut self.mem {
            Mem::Host { buf, .. } => {
                Self::host_bytes(buf)[off..off + src.len()].copy_from_slice(src);
            }
            Mem::Device { gpu, buf, .. } => {
                let mut dst = buf.slice_mut(off..off + src.len());
                gpu.stream()
                    .memcpy_htod(src, &mut dst)
                    .map_err(|e| anyhow!("copy to arena region {}: {e:?}", id.0))?;
            }
        }
        Ok(())
    }

    fn read_bytes(&mut self, id: RegionId, dtype: Dtype, len: usize) -> Result<Vec<u8>> {
        let r = self.checked(id, dtype, len)?;
        let (off, n, name) = (r.offset, r.len * r.dtype.bytes(), r.name.clone());
        match &mut self.mem {
            Mem::Host { buf, .. } => Ok(Self::host_bytes(buf)[off..off + n].to_vec()),
            Mem::Device { gpu, buf, .. } => gpu
                .stream()
                .dtoh_synced(&buf.slice(off..off + n))
                .map_err(|e| anyhow!("copy from arena region `{name}`: {e:?}")),
        }
    }

    /// Writes a whole fp32 region.
    pub fn write_f32(&mut self, id: RegionId, v: &[f32]) -> Result<()> {
        self.write_bytes(id, Dtype::F32, v.len(), bytemuck::cast_slice(v))
    }

    /// Writes a whole bf16 region.
    pub fn write_bf16(&mut self, id: RegionId, v: &[bf16]) -> Result<()> {
        let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
        self.write_bytes(id, Dtype::Bf16, v.len(), bytemuck::cast_slice(&bits))
    }

    /// Writes a whole i32 region.
    pub fn write_i32(&mut self, id: RegionId, v: &[i32]) -> Result<()> {
        self.write_bytes(id, Dtype::I32, v.len(), bytemuck::cast_slice(v))
    }

    /// Writes a whole u8 region.
    pub fn write_u8(&mut self, id: RegionId, v: &[u8]) -> Result<()> {
        self.write_bytes(id, Dtype::U8, v.len(), v)
    }

    /// Reads a whole fp32 region (waits for the device).
    pub fn read_f32(&mut self, id: RegionId) -> Result<Vec<f32>> {
        let len = self.layout.region(id).len;
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(
            id,
            Dtype::F32,
            len,
        )?))
    }

    /// Reads a whole bf16 region (waits for the device).
    pub fn read_bf16(&mut self, id: RegionId) -> Result<Vec<bf16>> {
        let len = self.layout.region(id).len;
        let bits: Vec<u16> =
            bytemuck::pod_collect_to_vec(&self.read_bytes(id, Dtype::Bf16, len)?);
        Ok(bits.into_iter().map(bf16::from_bits).collect())
    }

    /// Reads a whole i32 region (waits for the device).
    pub fn read_i32(&mut self, id: RegionId) -> Result<Vec<i32>> {
        let len = self.layout.region(id).len;
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(
            id,
            Dtype::I32,
            len,
        )?))
    }

    /// Overwrites a float region with NaN (the poison tests write into outputs before a run).
    pub fn poison(&mut self, id: RegionId) -> Result<()> {
        let r = self.layout.region(id).clone();
        match r.dtype {
            Dtype::F32 => self.write_f32(id, &vec![f32::NAN; r.len]),
            Dtype::Bf16 => self.write_bf16(id, &vec![BF16_POISON; r.len]),
            Dtype::I32 | Dtype::U8 => {
                bail!("arena region `{}`: integers have no NaN", r.name)
            }
        }
    }

    /// Runs `steps` with buffer slot `i` pointing at `slots[i] = (region, element offset)`.
    ///
    /// # Safety
    /// Every kernel of `steps` must stay inside the regions its slots name, from the given
    /// offset on (the plan builders check their shapes against the regions).
    pub unsafe fn run(&mut self, steps: &[Step], slots: &[(RegionId, usize)]) -> Result<()> {
        let base = match &mut self.mem {
            Mem::Host { buf, .. } => buf.as_mut_ptr() as u64,
            // The guard is released at once: every launch and copy goes to the one stream.
            Mem::Device { gpu, buf, .. } => buf.device_ptr(gpu.stream()).0,
        };
        let mut ptrs = Vec::with_capacity(slots.len());
        for &(id, off) in slots {
            let r =
                self.layout.regions.get(id.0).ok_or_else(|| {
                    anyhow!("arena: slot names region {} outside the layout", id.0)
                })?;
            ensure!(
                off < r.len,
                "arena region `{}`: offset {off} past its {} elements",
                r.name,
                r.len
            );
            ptrs.push(base + (r.offset + off * r.dtype.bytes()) as u64);
        }
        let backend = match &self.mem {
            Mem::Host { emu, .. } => Backend::Emu(emu),
            Mem::Device { gpu, .. } => Backend::Gpu(gpu),
        };
        // SAFETY: forwarded from this function's contract; the pointers lie inside the arena.
        unsafe { exec::run(backend, steps, &ptrs) }
    }

    /// Fills the u8 region `id` with `src` asynchronously: on a GPU, `src` goes into the
    /// region's pinned host buffer (after the previous copy out of it is done) and from there
    /// to the device on the copy stream, which first waits until the last plan that read the
    /// region ([`Arena::run_staged`]) is done. Under the emulation it is a plain write.
    /// Stage into two regions in turn to overlap a batch's copy with the previous step.
    pub fn stage_u8(&mut self, id: RegionId, src: &[u8]) -> Result<()> {
        self.stage_bytes(id, Dtype::U8, src.len(), src)
    }

    /// [`Arena::stage_u8`] for a whole fp32 region. [`Arena::write_f32`] copies from pageable
    /// memory on the compute stream, behind every launch queued there; this returns once `v`
    /// is in the region's pinned buffer, and the copy engine moves it while those launches
    /// run.
    pub fn stage_f32(&mut self, id: RegionId, v: &[f32]) -> Result<()> {
        self.stage_bytes(id, Dtype::F32, v.len(), bytemuck::cast_slice(v))
    }

    /// [`Arena::stage_f32`] for an i32 region.
    pub fn stage_i32(&mut self, id: RegionId, v: &[i32]) -> Result<()> {
        self.stage_bytes(id, Dtype::I32, v.len(), bytemuck::cast_slice(v))
    }

    fn stage_bytes(&mut self, id: RegionId, dtype: Dtype, len: usize, src: &[u8]) -> Result<()> {
        let off = self.checked(id, dtype, len)?.offset;
        let (gpu, buf, staging) = match &mut self.mem {
            Mem::Host { .. } => return self.write_bytes(id, dtype, len, src),
            Mem::Device { gpu, buf, staging } => (gpu, buf, staging),
        };
        let ctx = gpu.context();
        let err = |what: &str, e: cudarc::driver::DriverError| {
            anyhow!("staging arena region {}: {what}: {e:?}", id.0)
        };
        if staging.copy.is_none() {
            let copy = ctx.new_stream().map_err(|e| err("copy stream", e))?;
            // The arena's zero fill (and anything else queued on the compute stream) comes
            // before the first copy into it: a non-blocking stream is not ordered after the
            // compute stream by itself.
            copy.join(gpu.stream())
                .map_err(|e| err("ordering the copy stream", e))?;
            staging.copy = Some(copy);
        }
        let copy = staging
            .copy
            .as_ref()
            .ok_or_else(|| anyhow!("no copy stream"))?;
        let st = match staging.regions.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // SAFETY: the buffer is fully written below before any copy reads it.
                let pinned = unsafe { ctx.alloc_pinned::<u8>(src.len()) }
                    .map_err(|e| err("pinned allocation", e))?;
                let copied = ctx.new_event(None).map_err(|e| err("event", e))?;
                let consumed = ctx.new_event(None).map_err(|e| err("event", e))?;
                e.insert(Staged {
                    pinned,
                    copied,
                    consumed,
                })
            }
        };
        // The previous copy out of the pinned buffer must be done before it is overwritten.
        st.copied
            .synchronize()
            .map_err(|e| err("waiting for the last copy", e))?;
        st.pinned
            .as_mut_slice()
            .map_err(|e| err("pinned buffer", e))?
            .copy_from_slice(src);
        copy.wait(&st.consumed)
            .map_err(|e| err("waiting for the last reader", e))?;
        // The pointer is taken through the compute stream, whose guard is released at once as
        // in `run`: a guard on the copy stream would make the next compute-stream write to the
        // arena wait for this copy.
        let base = buf.device_ptr(gpu.stream()).0;
        let pinned = st.pinned.as_slice().map_err(|e| err("pinned buffer", e))?;
        // SAFETY: the destination lies inside the arena (checked above); the pinned source
        // stays alive and unwritten until `copied` has been reached (waited for above on the
        // next call, and before the arena is dropped).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(base + off as u64, pinned, copy.cu_stream())
        }
        .map_err(|e| err("copy", e))?;
        st.copied.record(copy).map_err(|e| err("event", e))?;
        Ok(())
    }

    /// [`Arena::run`] for a plan that reads the staged regions `staged`: the compute stream
    /// first waits for their copies, and marks them read afterwards (so the next
    /// [`Arena::stage_u8`] into them waits for this plan).
    ///
    /// # Safety
    /// As [`Arena::run`].
    pub unsafe fn run_staged(
        &mut self,
        steps: &[Step],
        slots: &[(RegionId, usize)],
        staged: &[RegionId],
    ) -> Result<()> {
        if let Mem::Device { gpu, staging, .. } = &self.mem {
            for id in staged {
                if let Some(st) = staging.regions.get(id) {
                    gpu.stream()
                        .wait(&st.copied)
                        .map_err(|e| anyhow!("waiting for staged region {}: {e:?}", id.0))?;
                }
            }
        }
        // SAFETY: forwarded from this function's contract.
        let ran = unsafe { self.run(steps, slots) };
        // Marked read even when a launch failed: some of the plan's kernels may be queued, and
        // the next copy into the region must wait for them.
        if let Mem::Device { gpu, staging, .. } = &self.mem {
            for id in staged {
                if let Some(st) = staging.regions.get(id) {
                    st.consumed
                        .record(gpu.stream())
                        .map_err(|e| anyhow!("marking staged region {}: {e:?}", id.0))?;
                }
            }
        }
        ran
    }

    /// Waits until every launch on the arena's backend is done (a no-op on the host).
    pub fn synchronize(&self) -> Result<()> {
        match &self.mem {
            Mem::Host { .. } => Ok(()),
            Mem::Device { gpu, .. } => gpu
                .stream()
                .synchronize()
                .map_err(|e| anyhow!("waiting for the device: {e:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmkd_kernels::elementwise::Ew;

    /// Under the instrumented emulation (`tools/emu-sanitize.sh`), a kernel that runs past
    /// its region into the next one fails; in bounds, the same plan runs.
    #[test]
    fn overrunning_a_region_fails_under_the_sanitizer() {
        if !mmkd_kernels::emu::SANITIZED {
            eprintln!(
                "skipped: the emulation is not instrumented (tools/emu-sanitize.sh runs this test)"
            );
            return;
        }
        for (len, section) in [(256, Section::Acts), (300, Section::Scratch)] {
            let mut lay = Layout::new();
            let x = lay.add("x", section, Dtype::F32, len).unwrap();
            let y = lay.add("y", section, Dtype::F32, len).unwrap();
            let mut arena = Arena::host(lay, Emu::default());
            arena.write_f32(x, &vec![1.0; len]).unwrap();
            let copy = |n: usize| Ew::AxpbyF32 { n, a: 1.0, b: 0.0 }.plan().unwrap();
            // SAFETY: `len` elements lie inside both regions.
            unsafe { arena.run(&copy(len), &[(x, 0), (y, 0)]) }.unwrap();
            assert_eq!(arena.read_f32(y).unwrap(), vec![1.0; len]);
            // SAFETY: the probe: one element past both regions, into their guards.
            let e = unsafe { arena.run(&copy(len + 1), &[(x, 0), (y, 0)]) }
                .unwrap_err()
                .to_string();
            assert!(e.contains("use-after-poison"), "{len}: {e}");
        }
    }
}
