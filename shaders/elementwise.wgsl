// Elementwise kernels: fill, out = a + b, acc += x; and chunk sums (gradient clipping's
// sum of squares, reduced in passes).
//
// One invocation per element. The grid may be two-dimensional (at most 65535 workgroups per
// dimension), so the flat workgroup index is rebuilt from `workgroup_id` and `num_workgroups`.
// `base_*` are element offsets inside each bound window: the host binds sub-ranges at offsets
// aligned to the device's storage alignment and passes the remainder here.

struct Params {
    n: u32,
    base_out: u32,
    base_a: u32,
    base_b: u32,
    value: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

const WG: u32 = 256u;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

@compute @workgroup_size(256)
fn fill(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    out[p.base_out + i] = p.value;
}

@compute @workgroup_size(256)
fn add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    out[p.base_out + i] = a[p.base_a + i] + b[p.base_b + i];
}

@compute @workgroup_size(256)
fn add_assign(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    out[p.base_out + i] += a[p.base_a + i];
}

// out[i] = Σ a[j]² over chunk i (elements i·CHUNK up to the window's n), or Σ a[j] when
// p.value is 0 (a later pass adding up partial sums); each chunk summed in order, so the
// same input gives the same bits.
const CHUNK: u32 = 64u;

@compute @workgroup_size(256)
fn chunk_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    let start = i * CHUNK;
    if start >= p.n {
        return;
    }
    let end = min(start + CHUNK, p.n);
    var s = 0.0;
    for (var j = start; j < end; j++) {
        let x = a[p.base_a + j];
        s += select(x, x * x, p.value != 0.0);
    }
    out[p.base_out + i] = s;
}
