// Grouped-query attention's key/value sharing, around the packed attention of attention.wgsl:
// `heads` query heads of `head_dim` elements share `kv_heads` key/value heads
// (group = heads / kv_heads), one element per invocation.
//
//   pack_qkv:    qkv[r, 0·qw + i]  = q[r, i]
//                qkv[r, 1·qw + i]  = k[r, (i / d / group)·d + i % d]   (and v for 2·qw)
//   unpack_dq:   dq[r, i] = dqkv[r, i]
//   unpack_dkv:  dk[r, j] = Σ_g dqkv[r, part·qw + ((j / d)·group + g)·d + j % d], g in order
//                (part 1: keys, 2: values)
// with qw = heads·d and kw = kv_heads·d; each window of rows starts at the bases below.

struct Params {
    n: u32,
    base_out: u32,
    base_a: u32,
    base_b: u32,
    base_c: u32,
    // Query width heads·d, key/value width kv_heads·d, head size d, query heads per group.
    qw: u32,
    kw: u32,
    d: u32,
    group: u32,
    // unpack_dkv: 1 for keys, 2 for values.
    part: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
// pack_qkv: q, k, v. unpack_dq and unpack_dkv: dqkv.
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> c: array<f32>;

const WG: u32 = 256u;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

@compute @workgroup_size(256)
fn pack_qkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let r = i / (3u * p.qw);
    let col = i % (3u * p.qw);
    let part = col / p.qw;
    let w = col % p.qw;
    if part == 0u {
        out[p.base_out + i] = a[p.base_a + r * p.qw + w];
    } else {
        let src = r * p.kw + (w / p.d / p.group) * p.d + w % p.d;
        if part == 1u {
            out[p.base_out + i] = b[p.base_b + src];
        } else {
            out[p.base_out + i] = c[p.base_c + src];
        }
    }
}

@compute @workgroup_size(256)
fn unpack_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    out[p.base_out + i] = a[p.base_a + (i / p.qw) * 3u * p.qw + i % p.qw];
}

@compute @workgroup_size(256)
fn unpack_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = element(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let r = i / p.kw;
    let j = i % p.kw;
    let first = p.base_a + r * 3u * p.qw + p.part * p.qw + (j / p.d) * p.group * p.d + j % p.d;
    var s = 0.0;
    for (var g = 0u; g < p.group; g++) {
        s += a[first + g * p.d];
    }
    out[p.base_out + i] = s;
}
