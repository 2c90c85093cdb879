//! ViT token assembly: prepend the class token and add the positional embedding.
//! `x (B, P, D)`, `cls (D)`, `pos (1+P, D)` → `y (B, 1+P, D)`:
//! `y[b, 0] = cls + pos[0]`, `y[b, 1+i] = x[b, i] + pos[1+i]`.
//! Backward: `dx[b, i] += dy[b, 1+i]`, `dcls += Σ_b dy[b, 0]`, `dpos += Σ_b dy[b]`.

use crate::error::{shape_err, Result};
use crate::ops::split2;
use crate::params::{ParamStore, ParamView};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward.
pub fn forward<T: Real>(x: &[T], cls: &[T], pos: &[T], b: usize, p: usize, d: usize, y: &mut [T]) {
    let t = (p + 1) * d;
    for bi in 0..b {
        let yb = &mut y[bi * t..(bi + 1) * t];
        for i in 0..d {
            yb[i] = cls[i] + pos[i];
        }
        let xb = &x[bi * p * d..(bi + 1) * p * d];
        for (j, (o, &v)) in yb[d..].iter_mut().zip(xb).enumerate() {
            *o = v + pos[d + j];
        }
    }
}

/// CPU backward; `dx` optional.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu<T: Real>(
    dy: &[T],
    b: usize,
    p: usize,
    d: usize,
    dx: Option<&mut [T]>,
    dcls: &mut [T],
    dpos: &mut [T],
) {
    let t = (p + 1) * d;
    for bi in 0..b {
        let dyb = &dy[bi * t..(bi + 1) * t];
        for i in 0..d {
            dcls[i] += dyb[i];
        }
        for (o, &g) in dpos.iter_mut().zip(dyb) {
            *o += g;
        }
    }
    if let Some(dx) = dx {
        for bi in 0..b {
            let src = &dy[bi * t + d..(bi + 1) * t];
            for (o, &g) in dx[bi * p * d..(bi + 1) * p * d].iter_mut().zip(src) {
                *o += g;
            }
        }
    }
}

pub(crate) struct Saved {
    x: Var,
    cls: ParamView,
    pos: ParamView,
    b: usize,
    p: usize,
    d: usize,
}

impl Tape {
    /// `x (B, P, D)` → `(B, 1+P, D)` with class token `cls (D)` and positions `pos (1+P, D)`.
    pub fn cls_pos(
        &mut self,
        params: &ParamStore,
        x: Var,
        cls: ParamView,
        pos: ParamView,
    ) -> Result<Var> {
        self.check_var("cls_pos", x)?;
        let s = self.shape(x).to_vec();
        if s.len() != 3 || cls.len != s[2] || pos.len != (s[1] + 1) * s[2] {
            return shape_err(
                "cls_pos",
                format!(
                    "x {s:?}, class token {} and positions {} elements",
                    cls.len, pos.len
                ),
            );
        }
        self.dispatch("cls_pos")?;
        let (b, p, d) = (s[0], s[1], s[2]);
        let mut y = vec![0.0f32; b * (p + 1) * d];
        forward(
            self.value(x),
            params.slice(cls),
            params.slice(pos),
            b,
            p,
            d,
            &mut y,
        );
        let saved = Saved {
            x,
            cls,
            pos,
            b,
            p,
            d,
        };
        Ok(self.push(y, vec![b, p + 1, d], true, Op::ClsPos(saved)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads, p: &mut ParamStore) {
    let (dcls, dpos) = split2(p.grad_mut(), s.cls, s.pos);
    let dx = if nodes[s.x.0].needs_grad {
        Some(g.of(nodes, s.x))
    } else {
        None
    };
    backward_cpu(dy, s.b, s.p, s.d, dx, dcls, dpos);
}
