//! The small kernels (`cuda/elementwise.cu`): casts, axpby, embedding gather and scatter-add,
//! GELU/QuickGELU forward and backward, row softmax. Each is an [`Ew`] value
//! naming the op and its sizes; [`ew_cpu`], [`ew_emu`] and [`ew_cuda`] run it on the same
//! buffer list (slots in the order `Ew::slots` documents), so one test body checks all of
//! them.

use crate::device::Gpu;
use crate::emu::Emu;
use crate::exec::{self, stride_shape, Backend, DevBuf, HostBuf, Step, P};
use crate::launch::{Arg, LaunchShape};
use crate::registry::ELEMENTWISE;
use anyhow::{bail, ensure, Result};
use half::bf16;

/// Activation kinds of `act_fwd` / `act_bwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// x Φ(x) (erf form, as BERT).
    Gelu,
    /// x σ(1.702 x) (open_clip's QuickGELU).
    QuickGelu,
}

/// One small op with its sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ew {
    /// `[x f32 (n), y bf16 (n)]`: y = bf16(x).
    CastF32Bf16 { n: usize },
    /// `[x bf16 (n), y f32 (n)]`: y = x.
    CastBf16F32 { n: usize },
    /// `[x f32 (n), y f32 (n)]`: y = a x + b y; x is not read when a = 0, y not when b = 0,
    /// so with a = b = 0 it clears y (x may then be y itself).
    AxpbyF32 { n: usize, a: f32, b: f32 },
    /// `[x bf16 (n), y bf16 (n)]`: y = a x + b y, read as [`Ew::AxpbyF32`].
    AxpbyBf16 { n: usize, a: f32, b: f32 },
    /// `[table bf16 (v, c), idx i32 (n), out bf16 (n, c), bad i32 (1)]`.
    Gather { n: usize, v: usize, c: usize },
    /// `[dout bf16 (n, c), order i32 (n), starts i32 (u + 1), targets i32 (u), dtable f32
    /// (v, c)]` with u = min(n, v): dtable += the rows of dout by table row, summed in a fixed
    /// order through the segment tables of [`ScatterTables`] (no float atomics).
    ScatterAdd { n: usize, v: usize, c: usize },
    /// `[x bf16 (n), y bf16 (n)]`.
    ActFwd { n: usize, act: Act },
    /// `[x bf16 (n), dy bf16 (n), dx bf16 (n)]`.
    ActBwd { n: usize, act: Act },
    /// `[x bf16 (r, c), y bf16 (r, c)]`: y = softmax(scale · x) per row.
    Softmax { r: usize, c: usize, scale: f32 },
}

#[derive(Clone, Copy, PartialEq)]
enum Ty {
    F32,
    Bf16,
    I32,
}

impl Ew {
    /// Element type and length of each buffer slot.
    fn slots(&self) -> Vec<(Ty, usize)> {
        use Ty::*;
        match *self {
            Ew::CastF32Bf16 { n } => vec![(F32, n), (Bf16, n)],
            Ew::CastBf16F32 { n } => vec![(Bf16, n), (F32, n)],
            Ew::AxpbyF32 { n, .. } => vec![(F32, n), (F32, n)],
            Ew::AxpbyBf16 { n, .. } | Ew::ActFwd { n, .. } => vec![(Bf16, n), (Bf16, n)],
            Ew::Gather { n, v, c } => vec![(Bf16, v * c), (I32, n), (Bf16, n * c), (I32, 1)],
            Ew::ScatterAdd { n, v, c } => {
                let u = n.min(v);
                vec![
                    (Bf16, n * c),
                    (I32, n),
                    (I32, u + 1),
                    (I32, u),
                    (F32, v * c),
                ]
            }
            Ew::ActBwd { n, .. } => vec![(Bf16, n), (Bf16, n), (Bf16, n)],
            Ew::Softmax { r, c, .. } => vec![(Bf16, r * c), (Bf16, r * c)],
        }
    }

    /// Indices of the slots the op writes.
    pub fn outputs(&self) -> &'static [usize] {
        match self {
            Ew::Gather { .. } => &[2, 3],
            Ew::ScatterAdd { .. } => &[4],
            Ew::ActBwd { .. } => &[2],
            _ => &[1],
        }
    }

    /// Bytes the op must move through memory (each input read once, each output written once).
    pub fn bytes(&self) -> usize {
        let s = self.slots();
        let b = |t: Ty| if t == Ty::Bf16 { 2 } else { 4 };
        let mut total: usize = s.iter().map(|(t, l)| b(*t) * l).sum();
        match *self {
            // y is read as well as written
            Ew::AxpbyF32 { n, .. } => total += 4 * n,
            Ew::AxpbyBf16 { n, .. } => total += 2 * n,
            // only the gathered rows of the table are read; dtable rows are read and written
            Ew::Gather { n, v, c } => total = total - 2 * v * c + 2 * n * c,
            Ew::ScatterAdd { n, v, c } => total = total - 4 * v * c + 8 * n.min(v) * c,
            _ => {}
        }
        total
    }

    /// A short name for reports.
    pub fn name(&self) -> String {
        match self {
            Ew::CastF32Bf16 { n } => format!("cast_f32_bf16 n={n}"),
            Ew::CastBf16F32 { n } => format!("cast_bf16_f32 n={n}"),
            Ew::AxpbyF32 { n, .. } => format!("axpby_f32 n={n}"),
            Ew::AxpbyBf16 { n, .. } => format!("axpby_bf16 n={n}"),
            Ew::Gather { n, v, c } => format!("embedding_gather n={n} v={v} c={c}"),
            Ew::ScatterAdd { n, v, c } => format!("embedding_scatter_add n={n} v={v} c={c}"),
            Ew::ActFwd { n, act } => format!("act_fwd {act:?} n={n}"),
            Ew::ActBwd { n, act } => format!("act_bwd {act:?} n={n}"),
            Ew::Softmax { r, c, .. } => format!("softmax_rows r={r} c={c}"),
        }
    }

    fn validate(&self) -> Result<()> {
        for (_, len) in self.slots() {
            ensure!(len > 0, "{}: empty shape", self.name());
            Arg::int("elementwise length", len)?;
        }
        Ok(())
    }

    fn check_host(&self, bufs: &[HostBuf]) -> Result<()> {
        self.validate()?;
        let want = self.slots();
        ensure!(
            bufs.len() == want.len(),
            "{}: {} buffers given, {} expected",
            self.name(),
            bufs.len(),
            want.len()
        );
        for (i, ((t, len), b)) in want.iter().zip(bufs).enumerate() {
            let ok = matches!(
                (t, b),
                (Ty::F32, HostBuf::F32(_))
                    | (Ty::Bf16, HostBuf::Bf16(_))
                    | (Ty::I32, HostBuf::I32(_))
            );
            ensure!(ok, "{}: buffer {i} has the wrong element type", self.name());
            ensure!(
                b.len() >= *len,
                "{}: buffer {i} holds {} elements, the shape needs {len}",
                self.name(),
                b.len()
            );
        }
        Ok(())
    }

    /// The launches (see the slot order on each variant).
    pub fn plan(&self) -> Result<Vec<Step>> {
        self.validate()?;
        let step = |kernel, shape, args| Step {
            file: &ELEMENTWISE,
            kernel,
            shape,
            args,
        };
        let i = |v: usize| P::I32(v as i32);
        let actk = |a: Act| P::I32(if a == Act::Gelu { 0 } else { 1 });
        Ok(vec![match *self {
            Ew::CastF32Bf16 { n } => step(
                "cast_f32_bf16",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), i(n)],
            ),
            Ew::CastBf16F32 { n } => step(
                "cast_bf16_f32",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), i(n)],
            ),
            Ew::AxpbyF32 { n, a, b } => step(
                "axpby_f32",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), P::F32(a), P::F32(b), i(n)],
            ),
            Ew::AxpbyBf16 { n, a, b } => step(
                "axpby_bf16",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), P::F32(a), P::F32(b), i(n)],
            ),
            Ew::Gather { n, v, c } => step(
                "embedding_gather",
                LaunchShape::linear(n as u32, 128, 0),
                vec![P::Buf(0), P::Buf(1), P::Buf(2), P::Buf(3), i(v), i(c)],
            ),
            Ew::ScatterAdd { n, v, c } => step(
                "embedding_scatter_add",
                LaunchShape {
                    grid: [n.min(v) as u32, c.div_ceil(SCATTER_COLS) as u32, 1],
                    block: [256, 1, 1],
                    shared_bytes: 0,
                },
                vec![P::Buf(0), P::Buf(1), P::Buf(2), P::Buf(3), P::Buf(4), i(c)],
            ),
            Ew::ActFwd { n, act } => step(
                "act_fwd",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), i(n), actk(act)],
            ),
            Ew::ActBwd { n, act } => step(
                "act_bwd",
                stride_shape(n),
                vec![P::Buf(0), P::Buf(1), P::Buf(2), i(n), actk(act)],
            ),
            Ew::Softmax { r, c, scale } => {
                let t = (c.div_ceil(32) * 32).clamp(32, 256) as u32;
                step(
                    "softmax_rows",
                    LaunchShape::linear(r as u32, t, 0),
                    vec![P::Buf(0), P::Buf(1), i(c), P::F32(scale)],
                )
            }
        }])
    }
}

/// Columns of one `embedding_scatter_add` block (`SCATTER_COLS` in `elementwise.cu`).
const SCATTER_COLS: usize = 64;

/// The segment tables of [`Ew::ScatterAdd`] for `n` row indices into a table of `v` rows: the
/// rows sorted by table row (stably), and for each table row that some row names, its segment
/// of the sorted list. Built on the host from indices it knows (the towers' index tables), so
/// the device adds each table row's gradients in one fixed order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScatterTables {
    /// `(n)`: the row indices sorted by table row, ascending within a table row.
    pub order: Vec<i32>,
    /// `(u + 1)`, u = min(n, v): segment s is `order[starts[s] .. starts[s + 1]]`; unused
    /// segments are empty at the end.
    pub starts: Vec<i32>,
    /// `(u)`: each segment's table row, −1 for the unused ones.
    pub targets: Vec<i32>,
}

impl ScatterTables {
    /// The tables of `idx` (row i adds into table row `idx[i]`); an index outside `0..v` is
    /// an error naming the row.
    pub fn new(idx: &[i32], v: usize) -> Result<ScatterTables> {
        let n = idx.len();
        Arg::int("scatter rows", n)?;
        let mut count = vec![0usize; v];
        for (i, &k) in idx.iter().enumerate() {
            ensure!(
                k >= 0 && (k as usize) < v,
                "scatter: row {i} names table row {k}, outside 0..{v}"
            );
            count[k as usize] += 1;
        }
        let u = n.min(v);
        let (mut starts, mut targets) = (Vec::with_capacity(u + 1), Vec::with_capacity(u));
        let mut first = vec![0usize; v];
        let mut at = 0usize;
        for (t, &c) in count.iter().enumerate() {
            first[t] = at;
            if c > 0 {
                starts.push(at as i32);
                targets.push(t as i32);
                at += c;
            }
        }
        let mut order = vec![0i32; n];
        for (i, &k) in idx.iter().enumerate() {
            let slot = &mut first[k as usize];
            order[*slot] = i as i32;
            *slot += 1;
        }
        starts.resize(u + 1, n as i32);
        targets.resize(u, -1);
        Ok(ScatterTables {
            order,
            starts,
            targets,
        })
    }
}

fn gelu(x: f64, act: Act) -> (f64, f64) {
    match act {
        Act::Gelu => {
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (x * cdf, cdf + x * pdf)
        }
        Act::QuickGelu => {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            (x * s, s + 1.702 * x * s * (1.0 - s))
        }
    }
}

/// erf by its Taylor series (|x| < 3) or the continued fraction of erfc, to ~1e-13: std has no
/// erf, and the reference must not share the kernel's libm.
pub(crate) fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (mut term, mut sum, mut k) = (a, a, 0.0f64);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -a * a / k;
            sum += term / (2.0 * k + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(a) = exp(−a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

/// CPU reference on host buffers (f64 arithmetic).
pub fn ew_cpu(op: &Ew, bufs: &mut [HostBuf]) -> Result<()> {
    op.check_host(bufs)?;
    let f = |b: &HostBuf| b.to_f64();
    let (inp, out) = bufs.split_at_mut(1);
    let x = f(&inp[0]);
    let put = |b: &mut HostBuf, e: usize, v: f64| match b {
        HostBuf::F32(o) => o[e] = v as f32,
        HostBuf::Bf16(o) => o[e] = bf16::from_f64(v),
        HostBuf::I32(o) => o[e] = v as i32,
        HostBuf::U8(o) => o[e] = v as u8,
    };
    match *op {
        Ew::CastF32Bf16 { n } | Ew::CastBf16F32 { n } => {
            (0..n).for_each(|e| put(&mut out[0], e, x[e]))
        }
        Ew::AxpbyF32 { n, a, b } | Ew::AxpbyBf16 { n, a, b } => {
            let y = f(&out[0]);
            for e in 0..n {
                let xa = if a == 0.0 { 0.0 } else { f64::from(a) * x[e] };
                let yb = if b == 0.0 { 0.0 } else { f64::from(b) * y[e] };
                put(&mut out[0], e, xa + yb);
            }
        }
        Ew::Gather { n, v, c } => {
            let HostBuf::I32(idx) = out[0].clone() else {
                bail!("idx must be i32")
            };
            let mut acc = vec![0.0; n * c];
            let mut bad = 0;
            for (r, &k) in idx.iter().enumerate().take(n) {
                let ok = k >= 0 && (k as usize) < v;
                bad += i32::from(!ok);
                for j in 0..c {
                    acc[r * c + j] = if ok { x[k as usize * c + j] } else { 0.0 };
                }
            }
            for (e, &val) in acc.iter().enumerate() {
                put(&mut out[1], e, val);
            }
            let HostBuf::I32(b) = &mut out[2] else {
                bail!("bad must be i32")
            };
            b[0] += bad;
        }
        Ew::ScatterAdd { n, v, c } => {
            let (HostBuf::I32(order), HostBuf::I32(starts), HostBuf::I32(targets)) =
                (&out[0], &out[1], &out[2])
            else {
                bail!("the scatter tables must be i32")
            };
            // Each row's table row, from the tables (checked, so a bad table is an error
            // here rather than a wrong reference).
            let mut row_of = vec![None; n];
            for (s, &t) in targets.iter().enumerate().take(n.min(v)) {
                let (a, b) = (starts[s], starts[s + 1]);
                ensure!(
                    0 <= a && a <= b && b as usize <= n,
                    "scatter tables: segment {s} spans {a}..{b} of {n} rows"
                );
                if t < 0 {
                    continue;
                }
                ensure!(
                    (t as usize) < v,
                    "scatter tables: segment {s} targets row {t} of {v}"
                );
                for &r in &order[a as usize..b as usize] {
                    let slot = row_of.get_mut(r as usize).ok_or_else(|| {
                        anyhow::anyhow!("scatter tables: row {r} of {n} in segment {s}")
                    })?;
                    ensure!(slot.is_none(), "scatter tables: row {r} in two segments");
                    *slot = Some(t as usize);
                }
            }
            let mut acc = f(&out[3]);
            for (r, t) in row_of.iter().enumerate() {
                if let Some(t) = *t {
                    for j in 0..c {
                        acc[t * c + j] += x[r * c + j];
                    }
                }
            }
            for (e, &val) in acc.iter().enumerate() {
                put(&mut out[3], e, val);
            }
        }
        Ew::ActFwd { n, act } => (0..n).for_each(|e| put(&mut out[0], e, gelu(x[e], act).0)),
        Ew::ActBwd { n, act } => {
            let dy = f(&out[0]);
            (0..n).for_each(|e| put(&mut out[1], e, gelu(x[e], act).1 * dy[e]));
        }
        Ew::Softmax { r, c, scale } => {
            for row in 0..r {
                let z: Vec<f64> = (0..c).map(|j| f64::from(scale) * x[row * c + j]).collect();
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                (0..c).for_each(|j| put(&mut out[0], row * c + j, (z[j] - m).exp() / s));
            }
        }
    }
    Ok(())
}

/// The kernel under the emulation; same parameters as [`ew_cpu`].
pub fn ew_emu(emu: &Emu, op: &Ew, bufs: &mut [HostBuf]) -> Result<()> {
    op.check_host(bufs)?;
    let ptrs: Vec<u64> = bufs.iter_mut().map(|b| b.host_ptr()).collect();
    // SAFETY: types and lengths checked against the op.
    unsafe { exec::run(Backend::Emu(emu), &op.plan()?, &ptrs) }
}

/// The kernel on a GPU; same parameters as [`ew_cpu`], device buffers.
pub fn ew_cuda(gpu: &Gpu, op: &Ew, bufs: &[DevBuf]) -> Result<()> {
    op.validate()?;
    let want = op.slots();
    ensure!(
        bufs.len() == want.len(),
        "{}: {} buffers given, {} expected",
        op.name(),
        bufs.len(),
        want.len()
    );
    for (i, ((t, len), b)) in want.iter().zip(bufs).enumerate() {
        let have = match (t, b) {
            (Ty::F32, DevBuf::F32(d)) => d.len(),
            (Ty::Bf16, DevBuf::U16(d)) => d.len(),
            (Ty::I32, DevBuf::I32(d)) => d.len(),
            _ => bail!(
                "{}: device buffer {i} has the wrong element type",
                op.name()
            ),
        };
        ensure!(
            have >= *len,
            "{}: device buffer {i} holds {have} elements, the shape needs {len}",
            op.name()
        );
    }
    let ptrs: Vec<u64> = bufs.iter().map(|b| b.device_ptr(gpu.stream())).collect();
    // SAFETY: types and lengths checked against the op; one stream orders every access.
    unsafe { exec::run(Backend::Gpu(gpu), &op.plan()?, &ptrs) }
}

/// Fresh random inputs for `op` (outputs poisoned, except read-modify-write ones set to
/// random values and the error counter to 0). Indices include out-of-range ones.
pub fn random_buffers(op: &Ew, rng: &mut impl rand::Rng) -> Vec<HostBuf> {
    let mut bufs: Vec<HostBuf> = op
        .slots()
        .into_iter()
        .map(|(t, len)| match t {
            Ty::F32 => HostBuf::F32((0..len).map(|_| rng.gen_range(-3.0f32..3.0)).collect()),
            Ty::Bf16 => HostBuf::Bf16(
                (0..len)
                    .map(|_| bf16::from_f32(rng.gen_range(-3.0f32..3.0)))
                    .collect(),
            ),
            Ty::I32 => HostBuf::I32(vec![0; len]),
        })
        .collect();
    match *op {
        Ew::Gather { n, v, .. } => {
            // Repeated rows, and one bad index when n > 2.
            let idx: Vec<i32> = (0..n)
                .map(|r| {
                    if r == 1 && n > 2 {
                        v as i32
                    } else {
                        rng.gen_range(0..v as i32)
                    }
                })
                .collect();
            bufs[1] = HostBuf::I32(idx);
            bufs[2].poison();
        }
        Ew::ScatterAdd { n, v, .. } => {
            // Repeated rows (they must add up); rows of the table no index names keep their
            // values.
            let idx: Vec<i32> = (0..n).map(|_| rng.gen_range(0..v as i32)).collect();
            let t = ScatterTables::new(&idx, v).expect("indices drawn below v");
            bufs[1] = HostBuf::I32(t.order);
            bufs[2] = HostBuf::I32(t.starts);
            bufs[3] = HostBuf::I32(t.targets);
        }
        Ew::AxpbyF32 { b, .. } | Ew::AxpbyBf16 { b, .. } if b == 0.0 => bufs[1].poison(),
        Ew::AxpbyF32 { .. } | Ew::AxpbyBf16 { .. } => {}
        Ew::ActBwd { .. } => bufs[2].poison(),
        _ => bufs[1].poison(),
    }
    bufs
}

/// The ops the tests and the self-test run, at a given size scale.
pub fn sample_ops(n: usize, rows: usize, cols: usize) -> Vec<Ew> {
    vec![
        Ew::CastF32Bf16 { n },
        Ew::CastBf16F32 { n },
        Ew::AxpbyF32 {
            n,
            a: 0.5,
            b: -1.25,
        },
        Ew::AxpbyF32 { n, a: 2.0, b: 0.0 },
        Ew::AxpbyBf16 { n, a: 0.5, b: 1.5 },
        Ew::Gather {
            n: rows,
            v: rows.div_ceil(2) + 1,
            c: cols,
        },
        Ew::ScatterAdd {
            n: rows,
            v: rows.div_ceil(2) + 1,
            c: cols,
        },
        Ew::ActFwd { n, act: Act::Gelu },
        Ew::ActFwd {
            n,
            act: Act::QuickGelu,
        },
        Ew::ActBwd { n, act: Act::Gelu },
        Ew::ActBwd {
            n,
            act: Act::QuickGelu,
        },
        Ew::Softmax {
            r: rows,
            c: cols,
            scale: 0.125,
        },
    ]
}

/// Tolerance of an output: 1e-4 for fp32 results of fp32 arithmetic, 1e-2 when bf16 is involved,
/// 0 for copies (indices).
pub fn tolerance(op: &Ew, out: &HostBuf) -> f64 {
    match (op, out) {
        (Ew::AxpbyF32 { .. } | Ew::CastBf16F32 { .. }, HostBuf::F32(_)) => 1e-4,
        (Ew::ScatterAdd { .. }, HostBuf::F32(_)) => 1e-4,
        (_, HostBuf::I32(_)) => 0.0,
        _ => 1e-2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fresh_seed, rel_err, rng};

    #[test]
    fn every_op_matches_reference_at_several_sizes() {
        for (n, rows, cols) in [(1, 1, 1), (37, 5, 33), (1000, 9, 100), (4097, 3, 300)] {
            for op in sample_ops(n, rows, cols) {
                let seed = fresh_seed();
                let bufs = random_buffers(&op, &mut rng(seed));
                let (mut want, mut got) = (bufs.clone(), bufs);
                ew_cpu(&op, &mut want).unwrap();
                ew_emu(&Emu::default(), &op, &mut got).unwrap();
                for &o in op.outputs() {
                    let e = rel_err(&got[o].to_f64(), &want[o].to_f64());
                    assert!(
                        e <= tolerance(&op, &want[o]),
                        "{} seed {seed}: slot {o} err {e}",
                        op.name()
                    );
                }
            }
        }
    }

    #[test]
    fn reference_derivatives_and_erf() {
        assert!((erf(0.5) - 0.520_499_877_813_046_5).abs() < 1e-13);
        assert!((erf(-3.5) + 0.999_999_256_901_627_7).abs() < 1e-13);
        for act in [Act::Gelu, Act::QuickGelu] {
            for x in [-2.5, -0.3, 0.0, 0.7, 3.1] {
                let h = 1e-6;
                let num = (gelu(x + h, act).0 - gelu(x - h, act).0) / (2.0 * h);
                assert!((num - gelu(x, act).1).abs() < 1e-7, "{act:?} {x}");
            }
        }
    }

    /// a = b = 0 clears y whatever it and x hold (NaN included), with x the same buffer as
    /// y: the kernels read neither.
    #[test]
    fn axpby_with_zero_coefficients_clears_without_reading() {
        use crate::exec::{run, Backend};
        for op in [
            Ew::AxpbyF32 {
                n: 37,
                a: 0.0,
                b: 0.0,
            },
            Ew::AxpbyBf16 {
                n: 37,
                a: 0.0,
                b: 0.0,
            },
        ] {
            let mut y = match op {
                Ew::AxpbyF32 { .. } => HostBuf::F32(vec![f32::NAN; 37]),
                _ => HostBuf::Bf16(vec![bf16::NAN; 37]),
            };
            let p = y.host_ptr();
            // SAFETY: one buffer of n elements in both slots; x is not read when a = 0.
            unsafe { run(Backend::Emu(&Emu::default()), &op.plan().unwrap(), &[p, p]) }.unwrap();
            assert_eq!(y.to_f64(), vec![0.0; 37], "{}", op.name());
            let mut bufs = vec![y.clone(), y];
            ew_cpu(&op, &mut bufs).unwrap();
            assert_eq!(bufs[1].to_f64(), vec![0.0; 37], "{} reference", op.name());
        }
    }

    /// Rows grouped by table row, each group in row order; unused segments empty at the end;
    /// an index outside the table is an error naming its row.
    #[test]
    fn scatter_tables_group_rows_by_table_row_in_order() {
        let t = ScatterTables::new(&[2, 0, 2, 2, 0], 4).unwrap();
        assert_eq!(t.order, vec![1, 4, 0, 2, 3]);
        assert_eq!(t.starts, vec![0, 2, 5, 5, 5]);
        assert_eq!(t.targets, vec![0, 2, -1, -1]);
        let t = ScatterTables::new(&[1, 1], 9).unwrap();
        assert_eq!((t.starts, t.targets), (vec![0, 2, 2], vec![1, -1]));
        let e = ScatterTables::new(&[0, 4], 4).unwrap_err();
        assert!(format!("{e}").contains("row 1 names table row 4"), "{e}");
        // The reference refuses tables that do not partition the rows.
        let op = Ew::ScatterAdd { n: 3, v: 2, c: 4 };
        let mut bufs = random_buffers(&op, &mut rng(3));
        bufs[1] = HostBuf::I32(vec![0, 0, 2]);
        assert!(ew_cpu(&op, &mut bufs).is_err());
    }

    #[test]
    fn bad_indices_are_counted_and_types_checked() {
        let op = Ew::Gather { n: 3, v: 2, c: 4 };
        let mut bufs = random_buffers(&op, &mut rng(5));
        bufs[1] = HostBuf::I32(vec![0, 7, -1]);
        ew_emu(&Emu::default(), &op, &mut bufs).unwrap();
        assert_eq!(bufs[3], HostBuf::I32(vec![2]));
        bufs[0] = HostBuf::F32(vec![0.0; 8]);
        assert!(ew_emu(&Emu::default(), &op, &mut bufs).is_err());
    }
}
