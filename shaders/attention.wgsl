// Causal multi-head self-attention, forward and backward.
//
// Layouts: qkv [B, T, 3C] with q, k, v side by side and heads contiguous inside each;
// out [B, T, C]; att [B, NH, T, T] holds the softmax probabilities (zero above the diagonal).
// A "unit" is one (sequence, head) pair, numbered b·NH + h; the host may bind a window of
// units [unit0, unit0 + units) when the tensors exceed one storage binding.
//
// Every kernel works on rows: one (unit, query) row, or one (unit, key) column for dk and dv.
// A workgroup of 64 invocations takes 64 / LANES rows, LANES invocations per row (a pipeline
// constant, a power of two up to 64). The lanes of a row split its positions; sums over
// positions are combined in workgroup memory. GPUs use many lanes per row; CPU drivers
// (lavapipe) use one, where the barriers are skipped (each would switch coroutines).
// Head dimensions are handled CHUNK at a time in per-invocation accumulators.
//
// Forward: scores q·k·scale for j ≤ t go into the att row, a max and a sum turn them into
// probabilities in place, then out[t] = Σ_j att[t,j]·v[j].
//
// Backward, with dout [B, T, C] and D[t] = Σ_j att[t,j]·(dout[t]·v[j]) (= dout[t]·out[t], so
// the softmax backward needs no second pass over a row):
//   dpre[t,j] = att[t,j]·(dout[t]·v[j] − D[t])
//   dq[t] = scale·Σ_j dpre[t,j]·k[j]      dk[j] = scale·Σ_t dpre[t,j]·q[t]
//   dv[j] = Σ_t att[t,j]·dout[t]
// attention_backward_d writes D to a scratch buffer, attention_backward_dq walks query rows,
// attention_backward_dkv walks key columns; both overwrite their part of dqkv.
//
// Decoding: p.seq new tokens per sequence follow p.past tokens whose keys and values sit in a
// cache [B, capacity, 2, C] (each position's key, then its value). kv_cache_write copies the
// new tokens' k and v from qkv into it (bound as out); attention_decode then runs the forward's
// steps for each new row t against cache positions 0..=past + t (the cache bound as att_in),
// its scores in scratch [units, seq, capacity].

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
    // Decoding only: tokens already cached, positions per sequence, and the cache's window.
    past: u32,
    capacity: u32,
    base_cache: u32,
}

override LANES: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
// Forward: out. Backward: dqkv.
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> att: array<f32>;
@group(0) @binding(3) var<storage, read> qkv: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
@group(0) @binding(5) var<storage, read_write> scratch: array<f32>;
@group(0) @binding(6) var<storage, read> att_in: array<f32>;

const WG: u32 = 64u;
const CHUNK: u32 = 64u;

// Per-lane partial accumulators, [invocation][CHUNK]; also the scalar reductions' slots.
var<workgroup> gather: array<f32, 4096>;

// One row's place: the unit inside the bound window, the position, the head, and where the
// sequence starts in the qkv and out/dout windows (this head's first element).
struct Row {
    valid: bool,
    lane: u32,
    lu: u32,
    t: u32,
    qkv0: u32,
    tok0: u32,
    // Decoding: this head's first element of the sequence's cache.
    cache0: u32,
}

fn locate(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Row {
    let g = (wid.y * nwg.x + wid.x) * (WG / LANES) + lid / LANES;
    let rows = p.units * p.seq;
    // Invocations past the last row shadow it: they join the reductions and write nothing.
    let gc = min(g, rows - 1u);
    var r: Row;
    r.valid = g < rows;
    r.lane = lid % LANES;
    r.lu = gc / p.seq;
    r.t = gc % p.seq;
    let unit = p.unit0 + r.lu;
    let b = unit / p.heads - p.batch0;
    let h = unit % p.heads;
    r.qkv0 = p.base_qkv + b * p.seq * 3u * p.channels + h * p.head_size;
    r.tok0 = b * p.seq * p.channels + h * p.head_size;
    r.cache0 = p.base_cache + b * p.capacity * 2u * p.channels + h * p.head_size;
    return r;
}

fn q_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[r.qkv0 + t * 3u * p.channels + d];
}

fn k_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[r.qkv0 + t * 3u * p.channels + p.channels + d];
}

fn v_at(r: Row, t: u32, d: u32) -> f32 {
    return qkv[r.qkv0 + t * 3u * p.channels + 2u * p.channels + d];
}

fn dout_at(r: Row, t: u32, d: u32) -> f32 {
    return dout[p.base_dout + r.tok0 + t * p.channels + d];
}

// Index of att[t, j] of this row's unit inside the bound att window.
fn att_index(r: Row, t: u32, j: u32) -> u32 {
    return p.base_att + (r.lu * p.seq + t) * p.seq + j;
}

fn q_dot_k(r: Row, t: u32, j: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < p.head_size; d++) {
        s += q_at(r, t, d) * k_at(r, j, d);
    }
    return s;
}

fn dout_dot_v(r: Row, t: u32, j: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < p.head_size; d++) {
        s += dout_at(r, t, d) * v_at(r, j, d);
    }
    return s;
}

// Sum (or max) of `v` over the lanes of a row; every lane gets the result.
fn row_reduce(v: f32, lid: u32, lane: u32, take_max: bool) -> f32 {
    if LANES == 1u {
        return v;
    }
    gather[lid] = v;
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lane < s {
            if take_max {
                gather[lid] = max(gather[lid], gather[lid + s]);
            } else {
                gather[lid] += gather[lid + s];
            }
        }
    }
    workgroupBarrier();
    let total = gather[lid - lane];
    workgroupBarrier();
    return total;
}

// Makes each lane's accumulators visible to the other lanes of its row.
fn publish(lid: u32, acc: ptr<function, array<f32, CHUNK>>) {
    if LANES == 1u {
        return;
    }
    workgroupBarrier();
    for (var i = 0u; i < CHUNK; i++) {
        gather[lid * CHUNK + i] = (*acc)[i];
    }
    workgroupBarrier();
}

// Dimension `i` of the row's accumulators summed over its lanes (after `publish`).
fn lane_total(lid: u32, lane: u32, i: u32, acc: ptr<function, array<f32, CHUNK>>) -> f32 {
    if LANES == 1u {
        return (*acc)[i];
    }
    let first = (lid - lane) * CHUNK;
    var s = 0.0;
    for (var l = 0u; l < LANES; l++) {
        s += gather[first + l * CHUNK + i];
    }
    return s;
}

@compute @workgroup_size(64)
fn attention_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = locate(wid, nwg, lid);
    let t = r.t;

    var mx = -3.4e38;
    for (var j = r.lane; j <= t; j += LANES) {
        let s = p.scale * q_dot_k(r, t, j);
        if r.valid {
            att[att_index(r, t, j)] = s;
        }
        mx = max(mx, s);
    }
    mx = row_reduce(mx, lid, r.lane, true);

    var sum = 0.0;
    for (var j = r.lane; j <= t; j += LANES) {
        // Each lane reads back only the scores it wrote itself.
        let e = exp(att[att_index(r, t, j)] - mx);
        if r.valid {
            att[att_index(r, t, j)] = e;
        }
        sum += e;
    }
    let inv = 1.0 / row_reduce(sum, lid, r.lane, false);

    if r.valid {
        for (var j = r.lane; j < p.seq; j += LANES) {
            let i = att_index(r, t, j);
            if j <= t {
                att[i] *= inv;
            } else {
                att[i] = 0.0;
            }
        }
    }
    if LANES > 1u {
        // The lanes read each other's probabilities below.
        storageBarrier();
    }

    for (var dc = 0u; dc < p.head_size; dc += CHUNK) {
        let n = min(CHUNK, p.head_size - dc);
        var acc: array<f32, CHUNK>;
        for (var j = r.lane; j <= t; j += LANES) {
            let a = att[att_index(r, t, j)];
            for (var i = 0u; i < n; i++) {
                acc[i] += a * v_at(r, j, dc + i);
            }
        }
        publish(lid, &acc);
        if r.valid {
            for (var i = r.lane; i < n; i += LANES) {
                out[p.base_out + r.tok0 + t * p.channels + dc + i] = lane_total(lid, r.lane, i, &acc);
            }
        }
    }
}

@compute @workgroup_size(64)
fn attention_backward_d(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = locate(wid, nwg, lid);
    let t = r.t;
    var part = 0.0;
    for (var j = r.lane; j <= t; j += LANES) {
        part += att_in[att_index(r, t, j)] * dout_dot_v(r, t, j);
    }
    let total = row_reduce(part, lid, r.lane, false);
    if r.valid && r.lane == 0u {
        scratch[p.base_scratch + r.lu * p.seq + t] = total;
    }
}

@compute @workgroup_size(64)
fn attention_backward_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = locate(wid, nwg, lid);
    let t = r.t;
    let dt = scratch[p.base_scratch + r.lu * p.seq + t];
    for (var dc = 0u; dc < p.head_size; dc += CHUNK) {
        let n = min(CHUNK, p.head_size - dc);
        var acc: array<f32, CHUNK>;
        for (var j = r.lane; j <= t; j += LANES) {
            let dp = att_in[att_index(r, t, j)] * (dout_dot_v(r, t, j) - dt);
            for (var i = 0u; i < n; i++) {
                acc[i] += dp * k_at(r, j, dc + i);
            }
        }
        publish(lid, &acc);
        if r.valid {
            for (var i = r.lane; i < n; i += LANES) {
                out[r.qkv0 - p.base_qkv + p.base_out + t * 3u * p.channels + dc + i] =
                    p.scale * lane_total(lid, r.lane, i, &acc);
            }
        }
    }
}

@compute @workgroup_size(64)
fn attention_backward_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = locate(wid, nwg, lid);
    // This row is key / value position s; it sums over the queries t ≥ s.
    let s = r.t;
    let o = r.qkv0 - p.base_qkv + p.base_out + s * 3u * p.channels;
    for (var dc = 0u; dc < p.head_size; dc += CHUNK) {
        let n = min(CHUNK, p.head_size - dc);
        var acc_k: array<f32, CHUNK>;
        var acc_v: array<f32, CHUNK>;
        for (var t = s + r.lane; t < p.seq; t += LANES) {
            let a = att_in[att_index(r, t, s)];
            let dp = a * (dout_dot_v(r, t, s) - scratch[p.base_scratch + r.lu * p.seq + t]);
            for (var i = 0u; i < n; i++) {
                acc_k[i] += dp * q_at(r, t, dc + i);
                acc_v[i] += a * dout_at(r, t, dc + i);
            }
        }
        publish(lid, &acc_k);
        if r.valid {
            for (var i = r.lane; i < n; i += LANES) {
                out[o + p.channels + dc + i] = p.scale * lane_total(lid, r.lane, i, &acc_k);
            }
        }
        publish(lid, &acc_v);
        if r.valid {
            for (var i = r.lane; i < n; i += LANES) {
                out[o + 2u * p.channels + dc + i] = lane_total(lid, r.lane, i, &acc_v);
            }
        }
    }
}

@compute @workgroup_size(64)
fn kv_cache_write(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // p.units counts sequences here: one invocation per element of the new keys and values.
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    let width = 2u * p.channels;
    if idx >= p.units * p.seq * width {
        return;
    }
    let row = idx / width;
    let e = idx % width;
    let b = row / p.seq;
    let t = row % p.seq;
    out[p.base_out + (b * p.capacity + p.past + t) * width + e] =
        qkv[p.base_qkv + row * 3u * p.channels + p.channels + e];
}

fn cached_k(r: Row, j: u32, d: u32) -> f32 {
    return att_in[r.cache0 + j * 2u * p.channels + d];
}

fn cached_v(r: Row, j: u32, d: u32) -> f32 {
    return att_in[r.cache0 + j * 2u * p.channels + p.channels + d];
}

// Index of the score of new row t against cache position j.
fn score_index(r: Row, t: u32, j: u32) -> u32 {
    return p.base_scratch + (r.lu * p.seq + t) * p.capacity + j;
}

@compute @workgroup_size(64)
fn attention_decode(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = locate(wid, nwg, lid);
    if LANES == 1u && !r.valid {
        // Without lanes to reduce over there is no barrier to join: shadows may leave.
        return;
    }
    let t = r.t;
    let last = p.past + t;

    var mx = -3.4e38;
    for (var j = r.lane; j <= last; j += LANES) {
        var dot = 0.0;
        for (var d = 0u; d < p.head_size; d++) {
            dot += q_at(r, t, d) * cached_k(r, j, d);
        }
        let s = p.scale * dot;
        if r.valid {
            scratch[score_index(r, t, j)] = s;
        }
        mx = max(mx, s);
    }
    mx = row_reduce(mx, lid, r.lane, true);

    var sum = 0.0;
    for (var j = r.lane; j <= last; j += LANES) {
        // Each lane reads back only the scores it wrote itself.
        let e = exp(scratch[score_index(r, t, j)] - mx);
        if r.valid {
            scratch[score_index(r, t, j)] = e;
        }
        sum += e;
    }
    let inv = 1.0 / row_reduce(sum, lid, r.lane, false);

    for (var dc = 0u; dc < p.head_size; dc += CHUNK) {
        let n = min(CHUNK, p.head_size - dc);
        var acc: array<f32, CHUNK>;
        for (var j = r.lane; j <= last; j += LANES) {
            let a = scratch[score_index(r, t, j)] * inv;
            for (var i = 0u; i < n; i++) {
                acc[i] += a * cached_v(r, j, dc + i);
            }
        }
        publish(lid, &acc);
        if r.valid {
            for (var i = r.lane; i < n; i += LANES) {
                out[p.base_out + r.tok0 + t * p.channels + dc + i] = lane_total(lid, r.lane, i, &acc);
            }
        }
    }
}
