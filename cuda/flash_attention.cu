// Causal self-attention on tensor cores for bf16 activations, in FlashAttention-2's scheme: the
// T×T scores and probabilities never reach global memory. Forward keeps, per query row, only
// the log-sum-exp of its scaled scores; backward recomputes each tile of probabilities from it.
//
// Layouts as in attention.cu: qkv [B, T, 3C] (head h of token t at t·3C + part·C + h·HS), out
// and dout [B, T, C]; lse and delta [B·NH, T] in f32.
//
// A block of FLASH_THREADS threads (4 warps) owns 64 rows of one head, a warp 16 of them, held
// in registers as mma.sync.m16n8k16 fragments (bf16 operands, f32 accumulation). The other
// operand comes through shared memory, 64 rows at a time.
//
//   forward:  S = scale·Q·Kᵀ tile by tile, with a running row maximum m and sum l,
//             O = Σ exp(S − m)·V / l,  lse = m + log l
//   delta:    D = rowsum(dO ⊙ O)
//   dQ:       per query tile, over key tiles:  P = exp(S − lse),  dP = dO·Vᵀ,
//             dS = P ⊙ (dP − D),  dQ += scale·dS·K
//   dK, dV:   per key tile, over query tiles (the same P and dS, transposed):
//             dV += Pᵀ·dO,  dK += scale·dSᵀ·Q
//
// Register fragments (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4):
//   A (16×16, 4 u32 of two bf16): rows g and g+8, column pairs 2t and 2t+8, in the order
//     (g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8)
//   B (16×8, 2 u32): column g, row pairs 2t and 2t+8
//   C (16×8, 4 f32): (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// so the C fragments of two neighbouring 8-column tiles are, rounded, an A fragment: the
// probabilities go from one product into the next without leaving registers.

#define FLASH_THREADS 128
#define FLASH_TILE 64

// Two bf16 in one u32, the lower index in the low half (the mma operand format).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)bf16_bits(lo) | ((u32)bf16_bits(hi) << 16);
}

#ifndef PIPIT_HOST_EMULATION
// d += a·b for the warp: a 16×16 bf16 A fragment, b (b0, b1) a 16×8 B fragment, d 16×8 f32.
__device__ __forceinline__ void mma_16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Words per row of a shared tile: HS/2 pairs and 4 words of padding, which puts the rows a
// fragment load touches at once in different banks and keeps rows 16-byte aligned.
template <int HS>
struct FlashTile {
    static constexpr int W = HS / 2 + 4;
};

// Rows r0..r0+15 of one head (row r at base + r·stride) as A fragments over its HS columns;
// rows at or past seq are zeros.
template <int HS>
__device__ __forceinline__ void load_rows(
    u32 (&a)[HS / 16][4], const bf16* base, u64 stride, u32 r0, u32 seq) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 ra = r0 + g, rb = r0 + g + 8;
    const u32* pa = (const u32*)(base + (u64)(ra < seq ? ra : 0) * stride);
    const u32* pb = (const u32*)(base + (u64)(rb < seq ? rb : 0) * stride);
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        a[kk][0] = ra < seq ? pa[kk * 8 + t] : 0u;
        a[kk][1] = rb < seq ? pb[kk * 8 + t] : 0u;
        a[kk][2] = ra < seq ? pa[kk * 8 + 4 + t] : 0u;
        a[kk][3] = rb < seq ? pb[kk * 8 + 4 + t] : 0u;
    }
}

// Four u32 (eight bf16) moved as one 16-byte access.
struct alignas(16) u32x4 {
    u32 x, y, z, w;
};

// Rows r0..r0+63 of one head into a shared tile, by the whole block, 16 bytes per access (a
// head's row starts on a 16-byte boundary: HS, C and so every offset are multiples of 8
// elements); rows past seq are zeros.
template <int HS>
__device__ __forceinline__ void load_tile(
    u32* tile, const bf16* base, u64 stride, u32 r0, u32 seq) {
    constexpr int W = FlashTile<HS>::W, QUADS = HS / 8;
    for (u32 i = threadIdx.x; i < FLASH_TILE * QUADS; i += FLASH_THREADS) {
        u32 r = i / QUADS, c = i % QUADS;
        u32x4 v = {0u, 0u, 0u, 0u};
        if (r0 + r < seq) {
            v = ((const u32x4*)(base + (u64)(r0 + r) * stride))[c];
        }
        *(u32x4*)(tile + r * W + 4 * c) = v;
    }
}

// Elements (r, d) and (r + 1, d) of a shared tile as one B-fragment register.
template <int HS>
__device__ __forceinline__ u32 tile_column_pair(const u32* tile, u32 r, u32 d) {
    constexpr int W = FlashTile<HS>::W;
    const unsigned short* e = (const unsigned short*)tile;
    return (u32)e[r * 2 * W + d] | ((u32)e[(r + 1) * 2 * W + d] << 16);
}

// s[j] = A·Bᵀ for the warp's 16 rows `a` against rows 8j..8j+7 of a shared tile: the 16×64
// products of rows with rows (Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ).
template <int HS>
__device__ __forceinline__ void rows_times_tile(
    float (&s)[8][4], const u32 (&a)[HS / 16][4], const u32* tile) {
    constexpr int W = FlashTile<HS>::W;
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) {
            const u32* p = tile + (j * 8 + g) * W + kk * 8 + t;
            mma_16816(s[j], a[kk], p[0], p[4]);
        }
    }
}

// acc += P·tile for P the warp's 16×64 C fragments `p` (rounded to bf16) and the 64×HS shared
// tile (P·V, dS·K, Pᵀ·dO, dSᵀ·Q).
template <int HS>
__device__ __forceinline__ void probs_times_tile(
    float (&acc)[HS / 8][4], const float (&p)[8][4], const u32* tile) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const u32 a[4] = {
            pack_bf16(p[2 * kk][0], p[2 * kk][1]),
            pack_bf16(p[2 * kk][2], p[2 * kk][3]),
            pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]),
            pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]),
        };
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            mma_16816(
                acc[n],
                a,
                tile_column_pair<HS>(tile, kk * 16 + 2 * t, n * 8 + g),
                tile_column_pair<HS>(tile, kk * 16 + 2 * t + 8, n * 8 + g));
        }
    }
}

// Max and sum over the four lanes that hold one row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_MASK, v, 2);
}

// Writes the warp's 16×HS accumulator rows r0.. (times `scale`) into a token-major layout
// (row r at base + r·stride), skipping rows past seq.
template <int HS>
__device__ __forceinline__ void store_rows(
    bf16* base, u64 stride, u32 r0, u32 seq, const float (&acc)[HS / 8][4], float scale0,
    float scale1) {
    const u32 lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 rows[2] = {r0 + g, r0 + g + 8};
    const float scales[2] = {scale0, scale1};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (rows[r] >= seq) {
            continue;
        }
        u32* dst = (u32*)(base + (u64)rows[r] * stride);
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            dst[n * 4 + t] =
                pack_bf16(acc[n][2 * r] * scales[r], acc[n][2 * r + 1] * scales[r]);
        }
    }
}

// Block (x, y): query tile gridDim.x − 1 − x (the longest rows start first) of head y = b·NH + h.
template <int HS>
__device__ void flash_forward_impl(
    bf16* out, float* lse, const bf16* qkv, u32 seq, u32 heads, float scale) {
    alignas(16) __shared__ u32 ks[FLASH_TILE * FlashTile<HS>::W];
    alignas(16) __shared__ u32 vs[FLASH_TILE * FlashTile<HS>::W];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 qt = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    const u32 b = bh / heads, h = bh % heads, c = heads * HS;
    const u64 stride = 3ull * c;
    const bf16* head = qkv + (u64)b * seq * stride + h * HS;
    const u32 r0 = qt * FLASH_TILE + warp * 16;
    const u32 rows[2] = {r0 + g, r0 + g + 8};

    u32 q[HS / 16][4];
    load_rows<HS>(q, head, stride, r0, seq);
    float o[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    }
    float m[2] = {pipit_neg_inf(), pipit_neg_inf()}, l[2] = {0.0f, 0.0f};

    for (u32 kt = 0; kt <= qt; kt++) {
        __syncthreads();
        load_tile<HS>(ks, head + c, stride, kt * FLASH_TILE, seq);
        load_tile<HS>(vs, head + 2 * c, stride, kt * FLASH_TILE, seq);
        __syncthreads();
        float s[8][4];
        rows_times_tile<HS>(s, q, ks);
        float mx[2] = {pipit_neg_inf(), pipit_neg_inf()};
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 key = kt * FLASH_TILE + j * 8 + 2 * t + (e & 1);
                const int r = e >> 1;
                s[j][e] = key <= rows[r] && key < seq ? s[j][e] * scale : pipit_neg_inf();
                mx[r] = fmaxf(mx[r], s[j][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const float mnew = fmaxf(m[r], quad_max(mx[r]));
            // Key 0 is in every row's first tile, so mnew is finite from then on.
            alpha[r] = expf(m[r] - mnew);
            m[r] = mnew;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[j][e] = expf(s[j][e] - m[e >> 1]);
                l[e >> 1] += s[j][e];
            }
        }
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        probs_times_tile<HS>(o, s, vs);
    }
    l[0] = quad_sum(l[0]);
    l[1] = quad_sum(l[1]);
    store_rows<HS>(out + (u64)b * seq * c + h * HS, c, r0, seq, o, 1.0f / l[0], 1.0f / l[1]);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (t == 0 && rows[r] < seq) {
            lse[(u64)bh * seq + rows[r]] = m[r] + logf(l[r]);
        }
    }
}

// delta[bh·T + t] = Σ_i dout[b, t, h·hs + i]·out[b, t, h·hs + i]: one warp per row, 8 per block.
__device__ void flash_delta_impl(
    float* delta, const bf16* out, const bf16* dout, u32 seq, u32 heads, u32 hs, u64 rows) {
    const u64 row = (u64)blockIdx.x * (PIPIT_BLOCK / 32) + (threadIdx.x >> 5);
    if (row >= rows) {
        return;
    }
    const u32 lane = threadIdx.x & 31;
    const u64 bh = row / seq, tok = row % seq;
    const u64 at = ((bh / heads) * seq + tok) * heads * hs + (bh % heads) * hs;
    const u32* o = (const u32*)(out + at);
    const u32* d = (const u32*)(dout + at);
    float sum = 0.0f;
    for (u32 i = lane; i < hs / 2; i += 32) {
        const float o0 = __uint_as_float(o[i] << 16), o1 = __uint_as_float(o[i] & 0xffff0000u);
        const float d0 = __uint_as_float(d[i] << 16), d1 = __uint_as_float(d[i] & 0xffff0000u);
        sum += o0 * d0 + o1 * d1;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
        delta[row] = sum;
    }
}

// Block (x, y): query tile gridDim.x − 1 − x of head y; writes the q part of dqkv.
template <int HS>
__device__ void flash_backward_dq_impl(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    alignas(16) __shared__ u32 ks[FLASH_TILE * FlashTile<HS>::W];
    alignas(16) __shared__ u32 vs[FLASH_TILE * FlashTile<HS>::W];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 qt = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y;
    const u32 b = bh / heads, h = bh % heads, c = heads * HS;
    const u64 stride = 3ull * c;
    const bf16* head = qkv + (u64)b * seq * stride + h * HS;
    const u32 r0 = qt * FLASH_TILE + warp * 16;
    const u32 rows[2] = {r0 + g, r0 + g + 8};

    u32 q[HS / 16][4], dy[HS / 16][4];
    load_rows<HS>(q, head, stride, r0, seq);
    load_rows<HS>(dy, dout + (u64)b * seq * c + h * HS, c, r0, seq);
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lse_r[r] = rows[r] < seq ? lse[(u64)bh * seq + rows[r]] : 0.0f;
        delta_r[r] = rows[r] < seq ? delta[(u64)bh * seq + rows[r]] : 0.0f;
    }
    float dq[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    }

    for (u32 kt = 0; kt <= qt; kt++) {
        __syncthreads();
        load_tile<HS>(ks, head + c, stride, kt * FLASH_TILE, seq);
        load_tile<HS>(vs, head + 2 * c, stride, kt * FLASH_TILE, seq);
        __syncthreads();
        float p[8][4], ds[8][4];
        rows_times_tile<HS>(p, q, ks);
        rows_times_tile<HS>(ds, dy, vs);
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 key = kt * FLASH_TILE + j * 8 + 2 * t + (e & 1);
                const int r = e >> 1;
                const bool live = key <= rows[r] && key < seq && rows[r] < seq;
                p[j][e] = live ? expf(p[j][e] * scale - lse_r[r]) : 0.0f;
                ds[j][e] = p[j][e] * (ds[j][e] - delta_r[r]);
            }
        }
        probs_times_tile<HS>(dq, ds, ks);
    }
    store_rows<HS>(dqkv + (u64)b * seq * stride + h * HS, stride, r0, seq, dq, scale, scale);
}

// Block (x, y): key tile x of head y (the first tiles have the most queries, and start first);
// writes the k and v parts of dqkv.
template <int HS>
__device__ void flash_backward_dkdv_impl(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    alignas(16) __shared__ u32 qs[FLASH_TILE * FlashTile<HS>::W];
    alignas(16) __shared__ u32 dys[FLASH_TILE * FlashTile<HS>::W];
    __shared__ float lse_s[FLASH_TILE];
    __shared__ float delta_s[FLASH_TILE];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 kt = blockIdx.x, bh = blockIdx.y;
    const u32 b = bh / heads, h = bh % heads, c = heads * HS;
    const u64 stride = 3ull * c;
    const bf16* head = qkv + (u64)b * seq * stride + h * HS;
    const bf16* dhead = dout + (u64)b * seq * c + h * HS;
    const u32 k0 = kt * FLASH_TILE + warp * 16;
    const u32 keys[2] = {k0 + g, k0 + g + 8};

    u32 kf[HS / 16][4], vf[HS / 16][4];
    load_rows<HS>(kf, head + c, stride, k0, seq);
    load_rows<HS>(vf, head + 2 * c, stride, k0, seq);
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }

    for (u32 qt = kt; qt < gridDim.x; qt++) {
        __syncthreads();
        load_tile<HS>(qs, head, stride, qt * FLASH_TILE, seq);
        load_tile<HS>(dys, dhead, c, qt * FLASH_TILE, seq);
        for (u32 i = threadIdx.x; i < FLASH_TILE; i += FLASH_THREADS) {
            const u32 row = qt * FLASH_TILE + i;
            lse_s[i] = row < seq ? lse[(u64)bh * seq + row] : 0.0f;
            delta_s[i] = row < seq ? delta[(u64)bh * seq + row] : 0.0f;
        }
        __syncthreads();
        // Transposed: rows are this warp's keys, columns the tile's queries.
        float p[8][4], ds[8][4];
        rows_times_tile<HS>(p, kf, qs);
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 col = j * 8 + 2 * t + (e & 1), query = qt * FLASH_TILE + col;
                const u32 key = keys[e >> 1];
                const bool live = key <= query && query < seq && key < seq;
                p[j][e] = live ? expf(p[j][e] * scale - lse_s[col]) : 0.0f;
            }
        }
        probs_times_tile<HS>(dv, p, dys);
        rows_times_tile<HS>(ds, vf, dys);
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                ds[j][e] = p[j][e] * (ds[j][e] - delta_s[j * 8 + 2 * t + (e & 1)]);
            }
        }
        probs_times_tile<HS>(dk, ds, qs);
    }
    bf16* dhead_qkv = dqkv + (u64)b * seq * stride + h * HS;
    store_rows<HS>(dhead_qkv + c, stride, k0, seq, dk, scale, scale);
    store_rows<HS>(dhead_qkv + 2 * c, stride, k0, seq, dv, 1.0f, 1.0f);
}

extern "C" __global__ void flash_delta(
    float* delta, const bf16* out, const bf16* dout, u32 seq, u32 heads, u32 hs, u64 rows) {
    flash_delta_impl(delta, out, dout, seq, heads, hs, rows);
}

// Entry points per head size (16, 32, 64 or 128): the fragments live in registers,
// so their sizes are compile-time constants.
extern "C" __global__ void flash_forward_hs16(
    bf16* out, float* lse, const bf16* qkv, u32 seq, u32 heads, float scale) {
    flash_forward_impl<16>(out, lse, qkv, seq, heads, scale);
}
extern "C" __global__ void flash_forward_hs32(
    bf16* out, float* lse, const bf16* qkv, u32 seq, u32 heads, float scale) {
    flash_forward_impl<32>(out, lse, qkv, seq, heads, scale);
}
extern "C" __global__ void flash_forward_hs64(
    bf16* out, float* lse, const bf16* qkv, u32 seq, u32 heads, float scale) {
    flash_forward_impl<64>(out, lse, qkv, seq, heads, scale);
}
extern "C" __global__ void flash_forward_hs128(
    bf16* out, float* lse, const bf16* qkv, u32 seq, u32 heads, float scale) {
    flash_forward_impl<128>(out, lse, qkv, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dq_hs16(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dq_impl<16>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dq_hs32(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dq_impl<32>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dq_hs64(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dq_impl<64>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dq_hs128(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dq_impl<128>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dkdv_hs16(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dkdv_impl<16>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dkdv_hs32(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dkdv_impl<32>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dkdv_hs64(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dkdv_impl<64>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
extern "C" __global__ void flash_backward_dkdv_hs128(
    bf16* dqkv, const bf16* qkv, const bf16* dout, const float* lse, const float* delta, u32 seq,
    u32 heads, float scale) {
    flash_backward_dkdv_impl<128>(dqkv, qkv, dout, lse, delta, seq, heads, scale);
}
