//! Softmax cross-entropy over logits, mean over rows.
//! `logits (N, C)`, `targets (N)` → scalar `L = 1/N Σ_n [logsumexp(z_n) − z_n[t_n]]`.
//! Backward: `dz_n += dL/N · (softmax(z_n) − onehot(t_n))` (softmax saved, `(N, C)`).

use crate::error::{shape_err, EngineError, Result};
use crate::real::Real;
use crate::tape::{Grads, Node, Op, Tape, Var};

/// CPU forward: returns the mean loss and writes the row softmax into `probs (N, C)`.
pub fn forward<T: Real>(logits: &[T], targets: &[u32], c: usize, probs: &mut [T]) -> T {
    let n = targets.len();
    let mut total = T::zero();
    for r in 0..n {
        let z = &logits[r * c..(r + 1) * c];
        let p = &mut probs[r * c..(r + 1) * c];
        let mut mx = z[0];
        for &v in z {
            mx = mx.max(v);
        }
        let mut sum = T::zero();
        for (pi, &v) in p.iter_mut().zip(z) {
            *pi = (v - mx).exp();
            sum += *pi;
        }
        for pi in p.iter_mut() {
            *pi = *pi / sum;
        }
        total += sum.ln() + mx - z[targets[r] as usize];
    }
    total / T::from_f64(n as f64)
}

/// CPU backward: `dlogits += dloss / N · (probs − onehot)`.
pub fn backward_cpu<T: Real>(probs: &[T], targets: &[u32], c: usize, dloss: T, dlogits: &mut [T]) {
    let s = dloss / T::from_f64(targets.len() as f64);
    for (r, &t) in targets.iter().enumerate() {
        for j in 0..c {
            let oh = if j == t as usize { T::one() } else { T::zero() };
            dlogits[r * c + j] += s * (probs[r * c + j] - oh);
        }
    }
}

pub(crate) struct Saved {
    logits: Var,
    targets: Vec<u32>,
    c: usize,
    probs: Vec<f32>,
}

impl Saved {
    pub(crate) fn bytes(&self) -> usize {
        self.probs.len() * 4
    }
}

impl Tape {
    /// Mean cross-entropy of `logits (N, C)` against class ids `targets (N)`; a scalar `[1]`.
    pub fn cross_entropy(&mut self, logits: Var, targets: &[u32]) -> Result<Var> {
        self.check_var("cross_entropy", logits)?;
        let s = self.shape(logits).to_vec();
        if s.len() != 2 || s[0] != targets.len() || s[0] == 0 || s[1] == 0 {
            return shape_err(
                "cross_entropy",
                format!("logits {s:?} with {} targets", targets.len()),
            );
        }
        if let Some((i, &t)) = targets
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= s[1])
        {
            return Err(EngineError::Input(format!(
                "cross_entropy: target {t} at row {i} is not below the {} classes",
                s[1]
            )));
        }
        self.dispatch("cross_entropy")?;
        let mut probs = vec![0.0f32; s[0] * s[1]];
        let loss = forward(self.value(logits), targets, s[1], &mut probs);
        let ng = self.needs_grad(logits);
        let saved = Saved {
            logits,
            targets: targets.to_vec(),
            c: s[1],
            probs,
        };
        Ok(self.push(vec![loss], vec![1], ng, Op::CrossEntropy(saved)))
    }
}

pub(crate) fn backward(s: &Saved, dy: &[f32], nodes: &[Node], g: &mut Grads) {
    if nodes[s.logits.0].needs_grad {
        backward_cpu(&s.probs, &s.targets, s.c, dy[0], g.of(nodes, s.logits));
    }
}
