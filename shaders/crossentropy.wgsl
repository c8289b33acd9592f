// Softmax cross-entropy over the vocabulary, forward and backward; one workgroup per row.
//
// Each invocation walks its strided share of the row keeping a running maximum and a sum of
// exponentials rescaled to that maximum (the online log-sum-exp), so no exponential ever
// overflows; the workgroup then merges the (max, sum) pairs in workgroup memory.
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

@group(0) @binding(0) var<uniform> p: Params;
// Forward: losses [rows]. Backward: dlogits [rows, vocab].
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;

const WG: u32 = 256u;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;

// Merges two partial log-sum-exp states (max, Σ exp(x − max)).
fn merge(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
    let m = max(m1, m2);
    return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}

// Returns (max, Σ exp(x − max)) of the row starting at `x0`, for every invocation.
fn row_lse(x0: u32, lid: u32) -> vec2<f32> {
    // -3.4e38 instead of -inf: exp(-inf - -inf) would be NaN for invocations that saw nothing.
    var mx = -3.4e38;
    var sum = 0.0;
    for (var i = lid; i < p.vocab; i += WG) {
        let x = logits[x0 + i];
        if x > mx {
            sum = sum * exp(mx - x) + 1.0;
            mx = x;
        } else {
            sum += exp(x - mx);
        }
    }
    red_max[lid] = mx;
    red_sum[lid] = sum;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lid < s {
            let merged = merge(red_max[lid], red_sum[lid], red_max[lid + s], red_sum[lid + s]);
            red_max[lid] = merged.x;
            red_sum[lid] = merged.y;
        }
    }
    workgroupBarrier();
    return vec2<f32>(red_max[0], red_sum[0]);
}

@compute @workgroup_size(256)
fn cross_entropy_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let x0 = p.base_logits + row * p.vocab;
    let lse = row_lse(x0, lid);
    if lid == 0u {
        let t = targets[p.base_targets + row];
        var loss = bitcast<f32>(0x7fc00000u);
        if t < p.vocab {
            loss = lse.x + log(lse.y) - logits[x0 + t];
        }
        out[p.base_out + row] = loss;
    }
}

@compute @workgroup_size(256)
fn cross_entropy_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= p.rows {
        return;
    }
    let x0 = p.base_logits + row * p.vocab;
    let lse = row_lse(x0, lid);
    let inv_sum = 1.0 / lse.y;
    let t = targets[p.base_targets + row];
    let o0 = p.base_out + row * p.vocab;
    for (var i = lid; i < p.vocab; i += WG) {
        var g = exp(logits[x0 + i] - lse.x) * inv_sum;
        if i == t {
            g -= 1.0;
        }
        out[o0 + i] = p.scale * g;
    }
}
