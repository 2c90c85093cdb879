//! Matrix products.
//!
//! `gemm`: the one CPU matmul every op uses, `C (+)= A · B` over strided operands, through the
//! `gemm` crate (multithreaded over rayon for large shapes, single-threaded inside ops that are
//! already parallel over batch or heads).
//!
//! `matmul_nt` op: `Y = A · Bᵀ` for two tape variables, `A (M, K)`, `B (N, K)`, `Y (M, N)`
//! (e.g. CLIP logits `I · Tᵀ`).
//! Backward: `dA += dY · B`, `dB += dYᵀ · A`.

use crate::error::{shape_err, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// A strided read-only matrix operand: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    /// Backing slice.
    pub data: &'a [T],
    /// Row stride in elements.
    pub rs: usize,
    /// Column stride in elements.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `(rows, cols)` matrix.
    pub fn rm(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `(rows, cols)` matrix, without moving data.
    pub fn rm_t(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `C (m, n) = [C +] A (m, k) · B (k, n)`, with `C` row-major of row stride `c_rs`.
/// `accumulate` adds into `C` (gradients accumulate); `parallel` lets the gemm crate use the
/// rayon pool (off inside already-parallel loops, to avoid oversubscription).
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [T],
    c_rs: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds are checked here so the unsafe call below only ever sees in-range strides.
    assert!(a.fits(m, k) && b.fits(k, n), "gemm operand out of bounds");
    assert!(
        (m - 1) * c_rs + n <= c.len(),
        "gemm destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_rs..r * c_rs + n]
                    .iter_mut()
                    .for_each(|x| *x = T::zero());
            }
        }
        return;
    }
    let par = if parallel && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index (r*rs + c*cs) reached for r<m/k, c<k/n lies inside the slices (checked
    // above); the destination does not alias the (shared) operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// CPU forward: `y (M, N) = a (M, K) · bᵀ`, `b (N, K)`.
pub fn nt_forward<T: Real>(a: &[T], b: &[T], m: usize, n: usize, k: usize, y: &mut [T]) {
    gemm(m, n, k, y, n, Mat::rm(a, k), Mat::rm_t(b, k), false, true);
}

/// CPU backward: `da += dy · b`, `db += dyᵀ · a`.
#[allow(clippy::too_many_arguments)]
pub fn nt_backward<T: Real>(
    a: &[T],
    b: &[T],
    dy: &[T],
    m: usize,
    n: usize,
    k: usize,
    da: Option<&mut [T]>,
    db: Option<&mut [T]>,
) {
    if let Some(da) = da {
        gemm(m, k, n, da, k, Mat::rm(dy, n), Mat::rm(b, k), true, true);
    }
    if let Some(db) = db {
        gemm(n, k, m, db, k, Mat::rm_t(dy, n), Mat::rm(a, k), true, true);
    }
}

/// Saved for backward: the two operands and the sizes.
pub(crate) struct Saved {
    a: Var,
    b: Var,
    m: usize,
    n: usize,
    k: usize,
}

impl Tape {
    /// `A (M, K) · Bᵀ` with `B (N, K)`: returns `(M, N)`.
    pub fn matmul_nt(&mut self, a: Var, b: Var) -> Result<Var> {
        self.check_var("matmul_nt", a)?;
        self.check_var("matmul_nt", b)?;
        let (sa, sb) = (self.shape(a), self.shape(b));
        if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[1] {
            return shape_err(
                "matmul_nt",
                format!("need (M,K)·(N,K)ᵀ, got {sa:?} and {sb:?}"),
            );
        }
        let (m, k, n) = (sa[0], sa[1], sb[0]);
        self.dispatch("matmul_nt")?;
        let mut y = vec![0.0f32; m * n];
        nt_forward(self.value(a), self.value(b), m, n, k, &mut y);
        let ng = self.needs_grad(a) || self.needs_grad(b);
        Ok(self.push(y, vec![m, n], ng, Op::MatmulNt(Saved { a, b, m, n, k })))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    let (a, b) = (&nodes[s.a.0].value, &nodes[s.b.0].value);
    // Separate passes: `a` and `b` may be the same variable.
    if nodes[s.a.0].needs_grad {
        nt_backward(a, b, dy, s.m, s.n, s.k, Some(g.of(nodes, s.a)), None);
    }
    if nodes[s.b.0].needs_grad {
        nt_backward(a, b, dy, s.m, s.n, s.k, None, Some(g.of(nodes, s.b)));
    }
}
