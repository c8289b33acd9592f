// Rotary position embedding (as Llama, "rotate half"), one element per invocation.
//
// In each head of `head_dim` elements, element j < head_dim/2 pairs with j + head_dim/2 and
// the pair turns by the angle of its token's position and its frequency:
//   out[j]        = x[j]·cos − x[j + half]·sin
//   out[j + half] = x[j + half]·cos + x[j]·sin
// The host computes each position's cos and sin once per call (`table`, [seq, half, 2], as
// transformers computes the angles); `sign` −1 turns the other way (the inverse, which is also
// the backward).

struct Params {
    n: u32,
    base_out: u32,
    base_inp: u32,
    base_table: u32,
    // Elements per token (heads · head_dim).
    width: u32,
    head_dim: u32,
    seq: u32,
    // The token of element 0 of this window, counted from the first of the batch.
    row0: u32,
    // The sign's f32 bits.
    sign_bits: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> inp: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= p.n {
        return;
    }
    let half = p.head_dim / 2u;
    let t = (p.row0 + i / p.width) % p.seq;
    let j = i % p.head_dim;
    let f = j % half;
    let at = p.base_table + (t * half + f) * 2u;
    let c = table[at];
    let s = bitcast<f32>(p.sign_bits) * table[at + 1u];
    let x = inp[p.base_inp + i];
    if j < half {
        out[p.base_out + i] = x * c + (-inp[p.base_inp + i + half]) * s;
    } else {
        out[p.base_out + i] = x * c + inp[p.base_inp + i - half] * s;
    }
}
