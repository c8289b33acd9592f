// AdamW update, PyTorch style: bias-corrected moments and decoupled weight decay, from the
// gradient times grad_scale (1, or less when gradients are clipped to a global norm).
//
//   m = β1·m + (1−β1)·g        v = β2·v + (1−β2)·g²
//   p -= lr·( (m/bc1) / (sqrt(v/bc2) + eps) + wd·p ),   bc1 = 1−β1^t, bc2 = 1−β2^t
//
// The host computes the bias corrections in f64 once per step.

struct Params {
    n: u32,
    base_param: u32,
    base_grad: u32,
    base_m: u32,
    base_v: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    grad_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn adamw(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= p.n {
        return;
    }
    let g = grad[p.base_grad + i] * p.grad_scale;
    let m_new = p.beta1 * m[p.base_m + i] + (1.0 - p.beta1) * g;
    let v_new = p.beta2 * v[p.base_v + i] + (1.0 - p.beta2) * g * g;
    m[p.base_m + i] = m_new;
    v[p.base_v + i] = v_new;
    let m_hat = m_new / p.bias_correction1;
    let v_hat = v_new / p.bias_correction2;
    let w = param[p.base_param + i];
    param[p.base_param + i] = w - p.lr * (m_hat / (sqrt(v_hat) + p.eps) + p.weight_decay * w);
}
