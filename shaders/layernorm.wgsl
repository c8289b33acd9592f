// Layernorm over the last dimension (epsilon 1e-5), forward and backward.
//
// layernorm_forward: one workgroup per row. The mean and the variance are two reductions in
// workgroup memory (the variance from the centred values, which loses less precision than
// E[x²] − E[x]²); the row's mean and 1/std are saved for backward.
//
// layernorm_backward: one workgroup per row overwrites dinp:
//   dnorm = w·dout,  xhat = (x − mean)·rstd
//   dinp  = rstd·(dnorm − mean(dnorm) − xhat·mean(dnorm·xhat))
//
// layernorm_param_backward: the parameter gradients are column sums over rows,
// dweight[c] += Σ dout·xhat and dbias[c] += Σ dout; 64 columns per workgroup and four
// invocations per column splitting the rows, so no two workgroups write the same element.

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

const WG: u32 = 128u;
const EPS: f32 = 1e-5;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;

// Sums red_a (and red_b) over the workgroup; every invocation gets the totals.
fn reduce2(lid: u32) -> vec2<f32> {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lid < s {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
        }
    }
    workgroupBarrier();
    let total = vec2<f32>(red_a[0], red_b[0]);
    // Keep the next reduction from overwriting the totals before everyone has read them.
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(128)
fn layernorm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let c = p.channels;
    let x0 = p.base_inp + row * c;

    var sum = 0.0;
    for (var i = lid; i < c; i += WG) {
        sum += inp[x0 + i];
    }
    red_a[lid] = sum;
    red_b[lid] = 0.0;
    let mu = reduce2(lid).x / f32(c);

    var sq = 0.0;
    for (var i = lid; i < c; i += WG) {
        let d = inp[x0 + i] - mu;
        sq += d * d;
    }
    red_a[lid] = sq;
    red_b[lid] = 0.0;
    let s = 1.0 / sqrt(reduce2(lid).x / f32(c) + EPS);

    let o0 = p.base_out + row * c;
    for (var i = lid; i < c; i += WG) {
        let xhat = (inp[x0 + i] - mu) * s;
        out[o0 + i] = xhat * weight[p.base_weight + i] + bias[p.base_bias + i];
    }
    if lid == 0u {
        mean[p.base_mean + row] = mu;
        rstd[p.base_rstd + row] = s;
    }
}

@compute @workgroup_size(128)
fn layernorm_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let c = p.channels;
    let x0 = p.base_inp + row * c;
    let d0 = p.base_dout + row * c;
    let mu = mean[p.base_mean + row];
    let s = rstd[p.base_rstd + row];

    var sum_dnorm = 0.0;
    var sum_dnorm_xhat = 0.0;
    for (var i = lid; i < c; i += WG) {
        let dnorm = weight[p.base_weight + i] * dout[d0 + i];
        sum_dnorm += dnorm;
        sum_dnorm_xhat += dnorm * (inp[x0 + i] - mu) * s;
    }
    red_a[lid] = sum_dnorm;
    red_b[lid] = sum_dnorm_xhat;
    let sums = reduce2(lid) / f32(c);

    let o0 = p.base_out + row * c;
    for (var i = lid; i < c; i += WG) {
        let dnorm = weight[p.base_weight + i] * dout[d0 + i];
        let xhat = (inp[x0 + i] - mu) * s;
        out[o0 + i] = s * (dnorm - sums.x - xhat * sums.y);
    }
}

var<workgroup> part_w: array<f32, 256>;
var<workgroup> part_b: array<f32, 256>;

@compute @workgroup_size(64, 4)
fn layernorm_param_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let col = wid.x * 64u + lid.x;
    let c = p.channels;
    var dw = 0.0;
    var db = 0.0;
    if col < c {
        for (var r = lid.y; r < p.rows; r += 4u) {
            let g = dout[p.base_dout + r * c + col];
            let xhat = (inp[p.base_inp + r * c + col] - mean[p.base_mean + r]) * rstd[p.base_rstd + r];
            dw += g * xhat;
            db += g;
        }
    }
    let slot = lid.y * 64u + lid.x;
    part_w[slot] = dw;
    part_b[slot] = db;
    workgroupBarrier();
    if lid.y == 0u && col < c {
        out[p.base_out + col] += part_w[lid.x] + part_w[64u + lid.x] + part_w[128u + lid.x] + part_w[192u + lid.x];
        out2[p.base_bias + col] += part_b[lid.x] + part_b[64u + lid.x] + part_b[128u + lid.x] + part_b[192u + lid.x];
    }
}
