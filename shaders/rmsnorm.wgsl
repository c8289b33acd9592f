// RMSNorm over the last dimension (as Llama), forward and backward.
//
// The row kernels follow layernorm.wgsl: 64 invocations per workgroup, LANES of them per row
// (a pipeline constant), combining partial sums with a tree reduction in workgroup memory.
//
// rmsnorm_forward:  rstd = 1/sqrt(mean(x²) + eps),  out = w·(x·rstd); rstd is saved per row.
//
// rmsnorm_backward overwrites dinp:
//   xhat = x·rstd,  dinp = rstd·(w·dout − xhat·mean(w·dout·xhat))
//
// rmsnorm_param_backward: dweight[c] += Σ_rows dout·xhat, one invocation per channel walking
// the rows in order, so no two invocations write the same element.

struct Params {
    rows: u32,
    channels: u32,
    base_out: u32,
    base_rstd: u32,
    base_inp: u32,
    base_weight: u32,
    base_dout: u32,
    // The epsilon's f32 bits.
    eps_bits: u32,
}

override LANES: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
// Forward: out. Backward: dinp. Parameter backward: dweight.
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(3) var<storage, read> inp: array<f32>;
@group(0) @binding(4) var<storage, read> weight: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;

const WG: u32 = 64u;

var<workgroup> red: array<f32, WG>;

struct Slot {
    row: u32,
    valid: bool,
    lane: u32,
}

fn slot(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Slot {
    let row = (wid.y * nwg.x + wid.x) * (WG / LANES) + lid / LANES;
    return Slot(min(row, p.rows - 1u), row < p.rows, lid % LANES);
}

// Sums `v` over the LANES invocations of a row; every one of them gets the total.
fn row_sum(v: f32, lid: u32, lane: u32) -> f32 {
    if LANES == 1u {
        return v;
    }
    red[lid] = v;
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lane < s {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    let total = red[lid - lane];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn rmsnorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = slot(wid, nwg, lid);
    let c = p.channels;
    let x0 = p.base_inp + s.row * c;
    var sq = 0.0;
    for (var i = s.lane; i < c; i += LANES) {
        let x = inp[x0 + i];
        sq += x * x;
    }
    let r = 1.0 / sqrt(row_sum(sq, lid, s.lane) / f32(c) + bitcast<f32>(p.eps_bits));
    if !s.valid {
        return;
    }
    let o0 = p.base_out + s.row * c;
    for (var i = s.lane; i < c; i += LANES) {
        out[o0 + i] = weight[p.base_weight + i] * (inp[x0 + i] * r);
    }
    if s.lane == 0u {
        rstd[p.base_rstd + s.row] = r;
    }
}

@compute @workgroup_size(64)
fn rmsnorm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = slot(wid, nwg, lid);
    let c = p.channels;
    let x0 = p.base_inp + s.row * c;
    let d0 = p.base_dout + s.row * c;
    let r = rstd[p.base_rstd + s.row];
    var dot = 0.0;
    for (var i = s.lane; i < c; i += LANES) {
        dot += weight[p.base_weight + i] * dout[d0 + i] * inp[x0 + i] * r;
    }
    let mean_dot = row_sum(dot, lid, s.lane) / f32(c);
    if !s.valid {
        return;
    }
    let o0 = p.base_out + s.row * c;
    for (var i = s.lane; i < c; i += LANES) {
        let xhat = inp[x0 + i] * r;
        out[o0 + i] = r * (weight[p.base_weight + i] * dout[d0 + i] - xhat * mean_dot);
    }
}

@compute @workgroup_size(64)
fn rmsnorm_param_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let col = wid.x * WG + lid;
    let c = p.channels;
    if col >= c {
        return;
    }
    var dw = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let xhat = inp[p.base_inp + r * c + col] * rstd[p.base_rstd + r];
        dw += dout[p.base_dout + r * c + col] * xhat;
    }
    out[p.base_out + col] += dw;
}
