// Layernorm over the last dimension (epsilon 1e-5), forward and backward.
//
// Row kernels run 64 invocations per workgroup with LANES invocations per row (a pipeline
// constant, a power of two up to 64), so one workgroup covers 64 / LANES rows. The LANES
// invocations of a row split its channels and combine their partial sums with a tree
// reduction in workgroup memory. GPUs use many lanes per row; CPU drivers (lavapipe) use one,
// which skips the barriers entirely: there every barrier is a coroutine switch per SIMD group.
//
// layernorm_forward: mean, then the variance from the centred values (which loses less
// precision than E[x²] − E[x]²); the row's mean and 1/std are saved for backward.
//
// layernorm_backward overwrites dinp:
//   dnorm = w·dout,  xhat = (x − mean)·rstd
//   dinp  = rstd·(dnorm − mean(dnorm) − xhat·mean(dnorm·xhat))
//
// layernorm_param_backward: the parameter gradients are column sums over rows,
// dweight[c] += Σ dout·xhat and dbias[c] += Σ dout, one invocation per channel walking the
// rows in order, so no two invocations write the same element.

struct Params {
    rows: u32,
    channels: u32,
    base_out: u32,
    base_mean: u32,
    base_rstd: u32,
    base_inp: u32,
    base_weight: u32,
    base_bias: u32,
    base_dout: u32,
}

override LANES: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
// Forward: out. Backward: dinp. Parameter backward: dweight.
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
// Parameter backward only: dbias.
@group(0) @binding(2) var<storage, read_write> out2: array<f32>;
@group(0) @binding(3) var<storage, read_write> mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> rstd: array<f32>;
@group(0) @binding(5) var<storage, read> inp: array<f32>;
@group(0) @binding(6) var<storage, read> weight: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;
@group(0) @binding(8) var<storage, read> dout: array<f32>;

const WG: u32 = 64u;
const EPS: f32 = 1e-5;

var<workgroup> red: array<vec2<f32>, WG>;

// Where an invocation works: its row (clamped to a valid one, so inactive invocations still
// take part in the reductions) and its lane within the row.
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
fn row_sum(v: vec2<f32>, lid: u32, lane: u32) -> vec2<f32> {
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
    // Keep the next reduction from overwriting the total before everyone has read it.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn layernorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = slot(wid, nwg, lid);
    let c = p.channels;
    let x0 = p.base_inp + s.row * c;

    var sum = 0.0;
    for (var i = s.lane; i < c; i += LANES) {
        sum += inp[x0 + i];
    }
    let mu = row_sum(vec2<f32>(sum, 0.0), lid, s.lane).x / f32(c);

    var sq = 0.0;
    for (var i = s.lane; i < c; i += LANES) {
        let d = inp[x0 + i] - mu;
        sq += d * d;
    }
    let r = 1.0 / sqrt(row_sum(vec2<f32>(sq, 0.0), lid, s.lane).x / f32(c) + EPS);

    if !s.valid {
        return;
    }
    let o0 = p.base_out + s.row * c;
    for (var i = s.lane; i < c; i += LANES) {
        let xhat = (inp[x0 + i] - mu) * r;
        out[o0 + i] = xhat * weight[p.base_weight + i] + bias[p.base_bias + i];
    }
    if s.lane == 0u {
        mean[p.base_mean + s.row] = mu;
        rstd[p.base_rstd + s.row] = r;
    }
}

@compute @workgroup_size(64)
fn layernorm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = slot(wid, nwg, lid);
    let c = p.channels;
    let x0 = p.base_inp + s.row * c;
    let d0 = p.base_dout + s.row * c;
    let mu = mean[p.base_mean + s.row];
    let r = rstd[p.base_rstd + s.row];

    var sums = vec2<f32>(0.0);
    for (var i = s.lane; i < c; i += LANES) {
        let dnorm = weight[p.base_weight + i] * dout[d0 + i];
        sums += vec2<f32>(dnorm, dnorm * (inp[x0 + i] - mu) * r);
    }
    let means = row_sum(sums, lid, s.lane) / f32(c);

    if !s.valid {
        return;
    }
    let o0 = p.base_out + s.row * c;
    for (var i = s.lane; i < c; i += LANES) {
        let dnorm = weight[p.base_weight + i] * dout[d0 + i];
        let xhat = (inp[x0 + i] - mu) * r;
        out[o0 + i] = r * (dnorm - means.x - xhat * means.y);
    }
}

@compute @workgroup_size(64)
fn layernorm_param_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let col = wid.x * WG + lid;
    let c = p.channels;
    if col >= c {
        return;
    }
    var dw = 0.0;
    var db = 0.0;
    for (var r = 0u; r < p.rows; r++) {
        let g = dout[p.base_dout + r * c + col];
        let xhat = (inp[p.base_inp + r * c + col] - mean[p.base_mean + r]) * rstd[p.base_rstd + r];
        dw += g * xhat;
        db += g;
    }
    out[p.base_out + col] += dw;
    out2[p.base_bias + col] += db;
}
