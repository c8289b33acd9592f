// Softmax cross-entropy over the vocabulary, forward and backward.
//
// 64 invocations per workgroup with LANES per row (a pipeline constant, a power of two up to
// 64): many on GPUs, one on CPU drivers (lavapipe), where a barrier costs a coroutine switch
// per SIMD group. Each invocation walks its strided share of the row keeping a running
// maximum and a sum of exponentials rescaled to that maximum (the online log-sum-exp), so no
// exponential overflows; the lanes then merge their (max, sum) pairs in workgroup memory.
//
//   forward:  losses[r]  = log Σ exp(x) − x[target] = (max + log sum) − x[target]
//   backward: dlogits[r] = scale·(softmax(x) − onehot(target))
//
// A target outside the vocabulary yields a NaN loss (and no one-hot term) rather than
// reading out of bounds.

struct Params {
    rows: u32,
    vocab: u32,
    base_out: u32,
    base_logits: u32,
    base_targets: u32,
    scale: f32,
}

override LANES: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
// Forward: losses [rows]. Backward: dlogits [rows, vocab].
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;

const WG: u32 = 64u;

var<workgroup> red: array<vec2<f32>, WG>;

// Merges two partial log-sum-exp states (max, Σ exp(x − max)).
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

// (max, Σ exp(x − max)) of the row starting at `x0`, for every lane of the row.
fn row_lse(x0: u32, lid: u32, lane: u32) -> vec2<f32> {
    // -3.4e38 instead of -inf: exp(-inf - -inf) would be NaN for lanes that saw nothing.
    var acc = vec2<f32>(-3.4e38, 0.0);
    for (var i = lane; i < p.vocab; i += LANES) {
        let x = logits[x0 + i];
        if x > acc.x {
            acc = vec2<f32>(x, acc.y * exp(acc.x - x) + 1.0);
        } else {
            acc.y += exp(x - acc.x);
        }
    }
    if LANES == 1u {
        return acc;
    }
    red[lid] = acc;
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lane < s {
            red[lid] = merge(red[lid], red[lid + s]);
        }
    }
    workgroupBarrier();
    return red[lid - lane];
}

// The row of an invocation, clamped so inactive ones still join the reduction.
fn row_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * (WG / LANES) + lid / LANES;
}

@compute @workgroup_size(64)
fn cross_entropy_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = row_of(wid, nwg, lid);
    let r = min(row, p.rows - 1u);
    let lane = lid % LANES;
    let x0 = p.base_logits + r * p.vocab;
    let lse = row_lse(x0, lid, lane);
    if row < p.rows && lane == 0u {
        let t = targets[p.base_targets + r];
        var loss = bitcast<f32>(0x7fc00000u);
        if t < p.vocab {
            loss = lse.x + log(lse.y) - logits[x0 + t];
        }
        out[p.base_out + r] = loss;
    }
}

@compute @workgroup_size(64)
fn cross_entropy_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = row_of(wid, nwg, lid);
    let r = min(row, p.rows - 1u);
    let lane = lid % LANES;
    let x0 = p.base_logits + r * p.vocab;
    let lse = row_lse(x0, lid, lane);
    if row >= p.rows {
        return;
    }
    let inv_sum = 1.0 / lse.y;
    let t = targets[p.base_targets + r];
    let o0 = p.base_out + r * p.vocab;
    for (var i = lane; i < p.vocab; i += LANES) {
        var g = exp(logits[x0 + i] - lse.x) * inv_sum;
        if i == t {
            g -= 1.0;
        }
        out[o0 + i] = p.scale * g;
    }
}
