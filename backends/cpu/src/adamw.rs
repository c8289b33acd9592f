//! One AdamW update, as PyTorch's `torch.optim.AdamW`, in f32.

use pipit_engine::backend::AdamW;

use crate::math::wide;
use crate::threads::{rows, SharedMut};

/// Elements per block handed to a thread.
const CHUNK: usize = 1 << 14;

/// From `g = grad_scale · grad`: `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`, then with
/// bias-corrected `m̂`, `v̂`: `p −= lr·(m̂/(√v̂ + eps) + weight_decay·p)`.
pub(crate) fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let (b1, b2) = (hp.beta1, hp.beta2);
    let c1 = (1.0 - f64::from(b1).powf(f64::from(hp.step))) as f32;
    let c2 = (1.0 - f64::from(b2).powf(f64::from(hp.step))) as f32;
    let (lr, eps, wd, gs) = (hp.lr, hp.eps, hp.weight_decay, hp.grad_scale);
    let row = CHUNK.min(param.len()).max(1);
    // The moments travel with the parameters: cut them the same way.
    let (m, v) = (SharedMut(m.as_mut_ptr()), SharedMut(v.as_mut_ptr()));
    rows(param, row, CHUNK * 8, |first, p| {
        let at = first * row;
        let g = &grad[at..][..p.len()];
        // SAFETY: block `first` of `param` and the same range of `m` and `v` belong to this
        // call alone (the blocks do not overlap), and `m`, `v` are as long as `param`.
        let (m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(m.at(at), p.len()),
                std::slice::from_raw_parts_mut(v.at(at), p.len()),
            )
        };
        wide(|| {
            for i in 0..p.len() {
                let g = g[i] * gs;
                let m_new = b1 * m[i] + (1.0 - b1) * g;
                let v_new = b2 * v[i] + (1.0 - b2) * g * g;
                let update = (m_new / c1) / ((v_new / c2).sqrt() + eps) + wd * p[i];
                p[i] -= lr * update;
                m[i] = m_new;
                v[i] = v_new;
            }
        })
    });
}
