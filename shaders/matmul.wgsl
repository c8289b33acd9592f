// Tiled matrix product and the bias gradient.
//
// matmul: out[m×n] = op(a)·op(b) (+ bias[n]) (+ out). Each workgroup computes a 64×64 tile of
// `out` with 16×16 invocations, each holding a 4×4 block of accumulators. The contracted
// dimension is walked in steps of 16: every step stages a 64×16 slice of op(a) and a 16×64
// slice of op(b) in workgroup memory, so each element read from storage is reused 64 times.
// Invocation (x, y) owns rows y, y+16, y+32, y+48 and columns x, x+16, x+32, x+48 of the tile,
// so neighbouring invocations touch neighbouring columns when reading the staged slice of
// op(b) and when writing `out`.
//
// The operands are strided sub-matrices (leading dimensions lda, ldb, ldo), which lets the
// host cut a product that exceeds one storage binding into windows. The transposes are
// pipeline constants, so each of the four layouts compiles to its own branch-free loop.
//
// bias_backward: dbias[j] += Σ_rows dout[row, j]; 64 columns per workgroup, four invocations
// per column splitting the rows, summed in workgroup memory.

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

// Staged slices, both indexed [kk * TILE + i]: row kk of the slice, element i of the tile.
var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;

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

@compute @workgroup_size(16, 16)
fn matmul(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wid.y * TILE;
    let col0 = wid.x * TILE;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // 1024 elements per slice, four per invocation; the index order follows the stored
        // layout so that consecutive invocations read consecutive addresses.
        for (var s = 0u; s < 4u; s++) {
            let e = li + s * 256u;
            if TRANS_A {
                let r = e % TILE;
                let kk = e / TILE;
                a_tile[kk * TILE + r] = load_a(row0 + r, k0 + kk);
            } else {
                let kk = e % BK;
                let r = e / BK;
                a_tile[kk * TILE + r] = load_a(row0 + r, k0 + kk);
            }
            if TRANS_B {
                let kk = e % BK;
                let c = e / BK;
                b_tile[kk * TILE + c] = load_b(k0 + kk, col0 + c);
            } else {
                let c = e % TILE;
                let kk = e / TILE;
                b_tile[kk * TILE + c] = load_b(k0 + kk, col0 + c);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let ao = kk * TILE + lid.y;
            let bo = kk * TILE + lid.x;
            let bv = vec4<f32>(b_tile[bo], b_tile[bo + 16u], b_tile[bo + 32u], b_tile[bo + 48u]);
            acc0 = fma(vec4<f32>(a_tile[ao]), bv, acc0);
            acc1 = fma(vec4<f32>(a_tile[ao + 16u]), bv, acc1);
            acc2 = fma(vec4<f32>(a_tile[ao + 32u]), bv, acc2);
            acc3 = fma(vec4<f32>(a_tile[ao + 48u]), bv, acc3);
        }
        workgroupBarrier();
    }

    store_row(row0 + lid.y, col0 + lid.x, acc0);
    store_row(row0 + lid.y + 16u, col0 + lid.x, acc1);
    store_row(row0 + lid.y + 32u, col0 + lid.x, acc2);
    store_row(row0 + lid.y + 48u, col0 + lid.x, acc3);
}

// Writes the four accumulators of one row: columns col, col+16, col+32, col+48.
fn store_row(row: u32, col: u32, acc: vec4<f32>) {
    if row >= p.m {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let c = col + 16u * j;
        if c < p.n {
            var v = acc[j];
            if p.has_bias != 0u {
                v += bias[p.base_bias + c];
            }
            let idx = p.base_out + row * p.ldo + c;
            if p.accumulate != 0u {
                v += out[idx];
            }
            out[idx] = v;
        }
    }
}

var<workgroup> partial: array<f32, 256>;

// Column sums: `out` is dbias (base_out), `a` is dout [m rows × n columns] (base_a, lda).
@compute @workgroup_size(64, 4)
fn bias_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let c = wid.x * 64u + lid.x;
    var sum = 0.0;
    if c < p.n {
        for (var r = lid.y; r < p.m; r += 4u) {
            sum += a[p.base_a + r * p.lda + c];
        }
    }
    partial[lid.y * 64u + lid.x] = sum;
    workgroupBarrier();
    if lid.y == 0u && c < p.n {
        let total = partial[lid.x] + partial[64u + lid.x] + partial[128u + lid.x] + partial[192u + lid.x];
        out[p.base_out + c] += total;
    }
}
