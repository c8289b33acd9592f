// GELU with the tanh approximation (as GPT-2), forward and backward.
//
//   gelu(x)  = 0.5·x·(1 + tanh(u)),  u = sqrt(2/π)·(x + 0.044715·x³)
//   gelu'(x) = 0.5·(1 + tanh(u)) + 0.5·x·(1 − tanh²(u))·sqrt(2/π)·(1 + 3·0.044715·x²)
//
// `u` is clamped before tanh: some drivers build tanh from exp, which overflows for large
// arguments, and tanh(±10) is already ±1 in f32.

struct Params {
    n: u32,
    base_out: u32,
    base_inp: u32,
    base_dout: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> inp: array<f32>;
@group(0) @binding(3) var<storage, read> dout: array<f32>;

const WG: u32 = 256u;
const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const COEF: f32 = 0.044715;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn tanh_inner(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
    return tanh(clamp(u, -10.0, 10.0));
}

@compute @workgroup_size(256)
fn gelu_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let x = inp[p.base_inp + i];
    out[p.base_out + i] = 0.5 * x * (1.0 + tanh_inner(x));
}

@compute @workgroup_size(256)
fn gelu_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let x = inp[p.base_inp + i];
    let th = tanh_inner(x);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
    let grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
    out[p.base_out + i] = grad * dout[p.base_dout + i];
}
