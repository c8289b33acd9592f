// SwiGLU's gate (as Llama's MLP), forward and backward, one element per invocation.
//
//   out   = silu(gate)·up,  silu(x) = x·σ(x)
//   dgate = dout·up·σ(x)·(1 + x·(1 − σ(x)))
//   dup   = dout·silu(gate)

struct Params {
    n: u32,
    base_out: u32,
    base_a: u32,
    base_b: u32,
    base_c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
// Forward: gate, up. Gate gradient: gate, up, dout. Up gradient: gate, dout.
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> c: array<f32>;

const WG: u32 = 256u;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(256)
fn swiglu_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let x = a[p.base_a + i];
    out[p.base_out + i] = x * sigmoid(x) * b[p.base_b + i];
}

@compute @workgroup_size(256)
fn swiglu_backward_gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let x = a[p.base_a + i];
    let s = sigmoid(x);
    out[p.base_out + i] = c[p.base_c + i] * b[p.base_b + i] * s * (1.0 + x * (1.0 - s));
}

@compute @workgroup_size(256)
fn swiglu_backward_up(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let x = a[p.base_a + i];
    out[p.base_out + i] = b[p.base_b + i] * x * sigmoid(x);
}
