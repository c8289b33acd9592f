// Token + position embedding, forward and backward.
//
// The host may cut the work into windows: sequences [b0, b1) (so positions restart at 0 in
// every window) and vocabulary rows [v0, v1) of the token table, when the table is larger
// than one storage binding. Tokens outside the bound vocabulary window are skipped, so every
// window of the table is visited once and each token's row is added exactly once.
//
// embedding_forward: one invocation per output element. The first vocabulary window writes
// wpe[t] (+ its table row); later windows add their table rows to what is there.
// embedding_backward_wte: one invocation per channel walks the positions in order, adding
// dout[i] to dwte[tokens[i]]; repeated tokens are summed by the same invocation, so the
// result is deterministic without atomics.
// embedding_backward_wpe: one invocation per (position, channel) sums over the sequences.

struct Params {
    positions: u32,
    seq: u32,
    channels: u32,
    v0: u32,
    v1: u32,
    first: u32,
    base_out: u32,
    base_tokens: u32,
    base_table: u32,
    base_wpe: u32,
    base_dout: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Forward: out. Backward: dwte or dwpe.
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read> wpe: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn embedding_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= p.positions * p.channels {
        return;
    }
    let i = idx / p.channels;
    let c = idx % p.channels;
    let t = i % p.seq;
    let o = p.base_out + idx;
    var v: f32;
    if p.first != 0u {
        v = wpe[p.base_wpe + t * p.channels + c];
    } else {
        v = out[o];
    }
    let tok = tokens[p.base_tokens + i];
    if tok >= p.v0 && tok < p.v1 {
        v += table[p.base_table + (tok - p.v0) * p.channels + c];
    }
    out[o] = v;
}

@compute @workgroup_size(64)
fn embedding_backward_wte(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x * 64u + lid;
    if c >= p.channels {
        return;
    }
    for (var i = 0u; i < p.positions; i++) {
        let tok = tokens[p.base_tokens + i];
        if tok >= p.v0 && tok < p.v1 {
            out[p.base_out + (tok - p.v0) * p.channels + c] += dout[p.base_dout + i * p.channels + c];
        }
    }
}

@compute @workgroup_size(256)
fn embedding_backward_wpe(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= p.seq * p.channels {
        return;
    }
    let sequences = p.positions / p.seq;
    var sum = 0.0;
    for (var b = 0u; b < sequences; b++) {
        sum += dout[p.base_dout + b * p.seq * p.channels + idx];
    }
    out[p.base_out + idx] += sum;
}
