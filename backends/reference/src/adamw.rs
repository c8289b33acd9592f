//! One AdamW update, as PyTorch's `torch.optim.AdamW`.

use pipit_engine::backend::AdamW;

/// From `g = grad_scale · grad`: `m = β1·m + (1−β1)·g`, `v = β2·v + (1−β2)·g²`, then with
/// bias-corrected `m̂`, `v̂`: `p −= lr·(m̂/(√v̂ + eps) + weight_decay·p)`.
pub(crate) fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
    let c1 = 1.0 - b1.powf(hp.step as f64);
    let c2 = 1.0 - b2.powf(hp.step as f64);
    let (lr, eps, wd) = (hp.lr as f64, hp.eps as f64, hp.weight_decay as f64);
    for (((p, &g), m), v) in param
        .iter_mut()
        .zip(grad)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        let g = g as f64 * hp.grad_scale as f64;
        let m_new = b1 * *m as f64 + (1.0 - b1) * g;
        let v_new = b2 * *v as f64 + (1.0 - b2) * g * g;
        let update = (m_new / c1) / ((v_new / c2).sqrt() + eps) + wd * *p as f64;
        *p = (*p as f64 - lr * update) as f32;
        *m = m_new as f32;
        *v = v_new as f32;
    }
}
