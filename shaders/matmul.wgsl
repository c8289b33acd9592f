// Tiled matrix product and the bias gradient.
//
// matmul: out[m×n] = op(a)·op(b) (+ bias[n]) (+ out). Each workgroup computes a 64×64 tile of
// `out` with 8×8 invocations, each holding an 8×8 block of accumulators. The contracted
// dimension is walked in steps of 16: every step stages a 64×16 slice of op(a) and a 16×64
// slice of op(b) in workgroup memory, so each element read from storage is reused 64 times.
// Invocation (x, y) owns rows 4y..4y+3 and 32+4y..32+4y+3 and the same columns with x; per
// step of the contraction it reads two vec4 of each slice and does 64 multiply-adds. Large
// per-invocation blocks keep barriers and loads rare, which matters most on CPU Vulkan
// drivers (lavapipe), where each barrier switches coroutines and each load is a loop over
// SIMD lanes.
//
// Staging reads storage element by element with bounds checks, so any size, layout and
// alignment works. The operands are strided sub-matrices (leading dimensions lda, ldb, ldo),
// which lets the host cut a product that exceeds one storage binding into windows. The
// transposes are pipeline constants, so each of the four layouts compiles without branches.
//
// matmul_rows: the same product for a few rows (decoding multiplies one token's row at a
// time), one invocation per output element walking the contracted dimension: the tiles would
// compute 64 rows to keep one. Each element is the same chain of fused multiply-adds in the
// same order as in the tiled kernel, so both give the same bits.
//
// bias_backward: dbias[j] += Σ_rows dout[row, j], one invocation per column.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldo: u32,
    base_a: u32,
    base_b: u32,
    base_out: u32,
    base_bias: u32,
    accumulate: u32,
    has_bias: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;
// vec4 slots per staged row of 64 elements.
const TILE4: u32 = 16u;

// Staged slices, both [kk][i] with i along the tile as vec4: row kk of the slice, elements
// 4·i .. 4·i+3 of the tile. Reading them as vec4 keeps the inner loop at four loads for 64
// multiply-adds per invocation.
var<workgroup> a_tile: array<vec4<f32>, 256>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

// acc[2·R + C]: row R of this invocation's eight, columns 4·x.. (C = 0) or 32 + 4·x.. (C = 1).
var<private> acc: array<vec4<f32>, 16>;

fn load_a(row: u32, kk: u32) -> f32 {
    if row >= p.m || kk >= p.k {
        return 0.0;
    }
    if TRANS_A {
        return a[p.base_a + kk * p.lda + row];
    }
    return a[p.base_a + row * p.lda + kk];
}

fn load_b(kk: u32, col: u32) -> f32 {
    if kk >= p.k || col >= p.n {
        return 0.0;
    }
    if TRANS_B {
        return b[p.base_b + col * p.ldb + kk];
    }
    return b[p.base_b + kk * p.ldb + col];
}

// Stages vec4 slot `slot` (of 256) of both slices for the step starting at k0, visiting
// slots in the order of the stored layout so neighbouring invocations read neighbouring
// addresses.
fn stage(slot: u32, k0: u32, row0: u32, col0: u32) {
    var kk: u32;
    var i4: u32;
    if TRANS_A {
        i4 = slot % TILE4;
        kk = slot / TILE4;
    } else {
        kk = slot % BK;
        i4 = slot / BK;
    }
    let r = row0 + 4u * i4;
    a_tile[kk * TILE4 + i4] = vec4<f32>(
        load_a(r, k0 + kk),
        load_a(r + 1u, k0 + kk),
        load_a(r + 2u, k0 + kk),
        load_a(r + 3u, k0 + kk),
    );
    if TRANS_B {
        kk = slot % BK;
        i4 = slot / BK;
    } else {
        i4 = slot % TILE4;
        kk = slot / TILE4;
    }
    let c = col0 + 4u * i4;
    b_tile[kk * TILE4 + i4] = vec4<f32>(
        load_b(k0 + kk, c),
        load_b(k0 + kk, c + 1u),
        load_b(k0 + kk, c + 2u),
        load_b(k0 + kk, c + 3u),
    );
}

// One contracted index of the staged slices: 64 multiply-adds.
fn step(kk: u32, x: u32, y: u32) {
    let a0 = a_tile[kk * TILE4 + y];
    let a1 = a_tile[kk * TILE4 + y + 8u];
    let b0 = b_tile[kk * TILE4 + x];
    let b1 = b_tile[kk * TILE4 + x + 8u];
    acc[0] = fma(vec4<f32>(a0.x), b0, acc[0]);
    acc[1] = fma(vec4<f32>(a0.x), b1, acc[1]);
    acc[2] = fma(vec4<f32>(a0.y), b0, acc[2]);
    acc[3] = fma(vec4<f32>(a0.y), b1, acc[3]);
    acc[4] = fma(vec4<f32>(a0.z), b0, acc[4]);
    acc[5] = fma(vec4<f32>(a0.z), b1, acc[5]);
    acc[6] = fma(vec4<f32>(a0.w), b0, acc[6]);
    acc[7] = fma(vec4<f32>(a0.w), b1, acc[7]);
    acc[8] = fma(vec4<f32>(a1.x), b0, acc[8]);
    acc[9] = fma(vec4<f32>(a1.x), b1, acc[9]);
    acc[10] = fma(vec4<f32>(a1.y), b0, acc[10]);
    acc[11] = fma(vec4<f32>(a1.y), b1, acc[11]);
    acc[12] = fma(vec4<f32>(a1.z), b0, acc[12]);
    acc[13] = fma(vec4<f32>(a1.z), b1, acc[13]);
    acc[14] = fma(vec4<f32>(a1.w), b0, acc[14]);
    acc[15] = fma(vec4<f32>(a1.w), b1, acc[15]);
}

// The loops over staging slots, contracted indices and output columns are written out:
// lavapipe stops every invocation after 65535 loop iterations in total, so only the walk
// over the contracted dimension may loop (the host keeps it below that).
@compute @workgroup_size(8, 8)
fn matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    let x = lid.x;
    let y = lid.y;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        stage(li, k0, row0, col0);
        stage(li + 64u, k0, row0, col0);
        stage(li + 128u, k0, row0, col0);
        stage(li + 192u, k0, row0, col0);
        workgroupBarrier();
        step(0u, x, y);
        step(1u, x, y);
        step(2u, x, y);
        step(3u, x, y);
        step(4u, x, y);
        step(5u, x, y);
        step(6u, x, y);
        step(7u, x, y);
        step(8u, x, y);
        step(9u, x, y);
        step(10u, x, y);
        step(11u, x, y);
        step(12u, x, y);
        step(13u, x, y);
        step(14u, x, y);
        step(15u, x, y);
        workgroupBarrier();
    }

    // Rows 4y .. 4y+3 come from a0, rows 32 + 4y .. from a1.
    let r0 = row0 + 4u * y;
    let r1 = r0 + 32u;
    let c0 = col0 + 4u * x;
    let c1 = c0 + 32u;
    store4(r0, c0, acc[0]);
    store4(r0, c1, acc[1]);
    store4(r0 + 1u, c0, acc[2]);
    store4(r0 + 1u, c1, acc[3]);
    store4(r0 + 2u, c0, acc[4]);
    store4(r0 + 2u, c1, acc[5]);
    store4(r0 + 3u, c0, acc[6]);
    store4(r0 + 3u, c1, acc[7]);
    store4(r1, c0, acc[8]);
    store4(r1, c1, acc[9]);
    store4(r1 + 1u, c0, acc[10]);
    store4(r1 + 1u, c1, acc[11]);
    store4(r1 + 2u, c0, acc[12]);
    store4(r1 + 2u, c1, acc[13]);
    store4(r1 + 3u, c0, acc[14]);
    store4(r1 + 3u, c1, acc[15]);
}

// Writes one output element (bias and accumulation applied) when it is inside the product.
fn store1(row: u32, col: u32, value: f32) {
    if row >= p.m || col >= p.n {
        return;
    }
    var v = value;
    if p.has_bias != 0u {
        v += bias[p.base_bias + col];
    }
    let idx = p.base_out + row * p.ldo + col;
    if p.accumulate != 0u {
        v += out[idx];
    }
    out[idx] = v;
}

// Writes columns col .. col+3 of one output row.
fn store4(row: u32, col: u32, v: vec4<f32>) {
    store1(row, col, v.x);
    store1(row, col + 1u, v.y);
    store1(row, col + 2u, v.z);
    store1(row, col + 3u, v.w);
}

@compute @workgroup_size(64)
fn matmul_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * 64u + lid;
    if idx >= p.m * p.n {
        return;
    }
    let row = idx / p.n;
    let col = idx % p.n;
    // Inside the product, so the loads need no bounds checks: step along the contracted
    // dimension by each operand's stride.
    var ia: u32;
    var sa: u32;
    if TRANS_A {
        ia = p.base_a + row;
        sa = p.lda;
    } else {
        ia = p.base_a + row * p.lda;
        sa = 1u;
    }
    var ib: u32;
    var sb: u32;
    if TRANS_B {
        ib = p.base_b + col * p.ldb;
        sb = 1u;
    } else {
        ib = p.base_b + col;
        sb = p.ldb;
    }
    var acc = 0.0;
    for (var kk = 0u; kk < p.k; kk++) {
        acc = fma(a[ia], b[ib], acc);
        ia += sa;
        ib += sb;
    }
    store1(row, col, acc);
}

// Column sums: `out` is dbias (base_out), `a` is dout [m rows × n columns] (base_a, lda).
// One invocation per column walks the rows in order: no barriers, no shared writes.
@compute @workgroup_size(64)
fn bias_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x * 64u + lid;
    if c >= p.n {
        return;
    }
    var sum = 0.0;
    for (var r = 0u; r < p.m; r++) {
        sum += a[p.base_a + r * p.lda + c];
    }
    out[p.base_out + c] += sum;
}
