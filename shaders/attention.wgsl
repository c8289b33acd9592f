// Causal multi-head self-attention, forward and backward.
//
// Layouts: qkv [B, T, 3C] with q, k, v side by side and heads contiguous inside each;
// out [B, T, C]; att [B, NH, T, T] holds the softmax probabilities (zero above the diagonal).
// A "unit" is one (sequence, head) pair, numbered b·NH + h; the host may bind a window of
// units [unit0, unit0 + units) when the tensors exceed one storage binding. Every kernel runs
// one workgroup per (unit, row).
//
// attention_forward: scores q·k·scale for t2 ≤ t go into the att row, then a max and a sum
// reduction turn them into probabilities in place; after a storage barrier the invocations
// switch to head dimensions and form out = Σ att·v.
//
// Backward, with dout [B, T, C] and D[t] = Σ_d dout[t,d]·out[t,d] = Σ_j att[t,j]·datt[t,j]
// (so the softmax backward needs no second pass over a row):
//   dpre[t,j] = att[t,j]·(dout[t]·v[j] − D[t])
//   dq[t] = scale·Σ_j dpre[t,j]·k[j]      dk[j] = scale·Σ_t dpre[t,j]·q[t]
//   dv[j] = Σ_t att[t,j]·dout[t]
// attention_backward_d computes D (recomputing out from att and v) into a scratch buffer,
// attention_backward_dq walks a query row, attention_backward_dkv walks a key column; both
// stage 64 entries of dpre at a time in workgroup memory and overwrite their part of dqkv.

struct Params {
    units: u32,
    seq: u32,
    channels: u32,
    heads: u32,
    head_size: u32,
    unit0: u32,
    batch0: u32,
    base_out: u32,
    base_att: u32,
    base_qkv: u32,
    base_dout: u32,
    base_scratch: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Forward: out. Backward: dqkv.
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> att: array<f32>;
@group(0) @binding(3) var<storage, read> qkv: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>;
@group(0) @binding(6) var<storage, read> att_in: array<f32>;

const WG: u32 = 64u;

var<workgroup> red: array<f32, WG>;
var<workgroup> sh_a: array<f32, WG>;
var<workgroup> sh_b: array<f32, WG>;

// Where one workgroup's (unit, row) lives.
struct Row {
    // Unit index inside the bound window.
    lu: u32,
    // Row (query or key position) inside the sequence.
    t: u32,
    // Head.
    h: u32,
    // Start of token (b, 0)'s qkv row for this head's q, relative to the bound window.
    qkv0: u32,
    // Start of token (b, 0)'s out / dout row for this head, relative to a [T, C] window origin.
    tok0: u32,
}

fn locate(wid: vec3<u32>, nwg: vec3<u32>) -> Row {
    let g = wid.y * nwg.x + wid.x;
    var r: Row;
    r.lu = g / p.seq;
    r.t = g % p.seq;
    let unit = p.unit0 + r.lu;
    let b = unit / p.heads - p.batch0;
    r.h = unit % p.heads;
    r.qkv0 = b * p.seq * 3u * p.channels + r.h * p.head_size;
    r.tok0 = b * p.seq * p.channels + r.h * p.head_size;
    return r;
}

fn q_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[p.base_qkv + r.qkv0 + t * 3u * p.channels + d];
}

fn k_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[p.base_qkv + r.qkv0 + t * 3u * p.channels + p.channels + d];
}

fn v_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[p.base_qkv + r.qkv0 + t * 3u * p.channels + 2u * p.channels + d];
}

fn dout_at(r: Row, t: u32, d: u32) -> f32 {
    return dout[p.base_dout + r.tok0 + t * p.channels + d];
}

// Index of att[t, j] of this unit inside the bound att window.
fn att_index(r: Row, t: u32, j: u32) -> u32 {
    return p.base_att + (r.lu * p.seq + t) * p.seq + j;
}

// dout[t] · v[j] for this head.
fn dout_dot_v(r: Row, t: u32, j: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < p.head_size; d++) {
        s += dout_at(r, t, d) * v_at(r, j, d);
    }
    return s;
}

// Tree reduction of `red`, by max or by sum; every invocation gets the result.
fn reduce(lid: u32, take_max: bool) -> f32 {
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lid < s {
            if take_max {
                red[lid] = max(red[lid], red[lid + s]);
            } else {
                red[lid] += red[lid + s];
            }
        }
    }
    workgroupBarrier();
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn attention_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.y * nwg.x + wid.x >= p.units * p.seq {
        return;
    }
    let r = locate(wid, nwg);
    let t = r.t;

    var mx = -3.4e38;
    for (var j = lid; j <= t; j += WG) {
        var s = 0.0;
        for (var d = 0u; d < p.head_size; d++) {
            s += q_at(r, t, d) * k_at(r, j, d);
        }
        s *= p.scale;
        att[att_index(r, t, j)] = s;
        mx = max(mx, s);
    }
    red[lid] = mx;
    mx = reduce(lid, true);

    var sum = 0.0;
    for (var j = lid; j <= t; j += WG) {
        let e = exp(att[att_index(r, t, j)] - mx);
        att[att_index(r, t, j)] = e;
        sum += e;
    }
    red[lid] = sum;
    let inv = 1.0 / reduce(lid, false);

    for (var j = lid; j < p.seq; j += WG) {
        let i = att_index(r, t, j);
        if j <= t {
            att[i] *= inv;
        } else {
            att[i] = 0.0;
        }
    }
    // Each invocation wrote a strided share of the row; the sums below read all of it.
    storageBarrier();

    for (var d = lid; d < p.head_size; d += WG) {
        var o = 0.0;
        for (var j = 0u; j <= t; j++) {
            o += att[att_index(r, t, j)] * v_at(r, j, d);
        }
        out[p.base_out + r.tok0 + t * p.channels + d] = o;
    }
}

@compute @workgroup_size(64)
fn attention_backward_d(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.y * nwg.x + wid.x >= p.units * p.seq {
        return;
    }
    let r = locate(wid, nwg);
    let t = r.t;
    var part = 0.0;
    for (var d = lid; d < p.head_size; d += WG) {
        var o = 0.0;
        for (var j = 0u; j <= t; j++) {
            o += att_in[att_index(r, t, j)] * v_at(r, j, d);
        }
        part += o * dout_at(r, t, d);
    }
    red[lid] = part;
    let total = reduce(lid, false);
    if lid == 0u {
        scratch[p.base_scratch + r.lu * p.seq + t] = total;
    }
}

@compute @workgroup_size(64)
fn attention_backward_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.y * nwg.x + wid.x >= p.units * p.seq {
        return;
    }
    let r = locate(wid, nwg);
    let t = r.t;
    let dt = scratch[p.base_scratch + r.lu * p.seq + t];
    for (var dc = 0u; dc < p.head_size; dc += WG) {
        let d = dc + lid;
        var acc = 0.0;
        for (var tile = 0u; tile <= t; tile += WG) {
            let j = tile + lid;
            var dp = 0.0;
            if j <= t {
                dp = att_in[att_index(r, t, j)] * (dout_dot_v(r, t, j) - dt);
            }
            sh_a[lid] = dp;
            workgroupBarrier();
            if d < p.head_size {
                let count = min(WG, t + 1u - tile);
                for (var i = 0u; i < count; i++) {
                    acc += sh_a[i] * k_at(r, tile + i, d);
                }
            }
            workgroupBarrier();
        }
        if d < p.head_size {
            out[p.base_out + r.qkv0 + t * 3u * p.channels + d] = p.scale * acc;
        }
    }
}

@compute @workgroup_size(64)
fn attention_backward_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if wid.y * nwg.x + wid.x >= p.units * p.seq {
        return;
    }
    let r = locate(wid, nwg);
    // This workgroup owns key / value position s and sums over the queries t ≥ s.
    let s = r.t;
    for (var dc = 0u; dc < p.head_size; dc += WG) {
        let d = dc + lid;
        var dk = 0.0;
        var dv = 0.0;
        for (var tile = s; tile < p.seq; tile += WG) {
            let t = tile + lid;
            var a = 0.0;
            var dp = 0.0;
            if t < p.seq {
                a = att_in[att_index(r, t, s)];
                dp = a * (dout_dot_v(r, t, s) - scratch[p.base_scratch + r.lu * p.seq + t]);
            }
            sh_a[lid] = a;
            sh_b[lid] = dp;
            workgroupBarrier();
            if d < p.head_size {
                let count = min(WG, p.seq - tile);
                for (var i = 0u; i < count; i++) {
                    dk += sh_b[i] * q_at(r, tile + i, d);
                    dv += sh_a[i] * dout_at(r, tile + i, d);
                }
            }
            workgroupBarrier();
        }
        if d < p.head_size {
            let o = p.base_out + r.qkv0 + s * 3u * p.channels;
            out[o + p.channels + d] = p.scale * dk;
            out[o + 2u * p.channels + d] = dv;
        }
    }
}
