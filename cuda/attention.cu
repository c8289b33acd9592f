// Causal multi-head self-attention around cuBLAS: the products run as strided batched GEMMs
// over the B·NH heads, and these kernels do the rest — moving heads in and out of the
// [B, T, ·C] layouts, and the causal softmax forward and backward.
//
// Layouts: qkv [B, T, 3C] with q, k, v side by side and heads contiguous inside each (head h
// of token t starts at t·3C + part·C + h·hs); out and dout [B, T, C]. The products work on
// head-major copies [B·NH, T, hs]; scores and their gradients are [B·NH, T, T] in f32, and the
// probabilities att [B·NH, T, T] (zeros above the diagonal) are kept for backward.
//
//   forward:  S = Q·Kᵀ,  P = softmax(scale·S) row by row over keys 0..=t,  Y = P·V
//   backward: dP = dY·Vᵀ,  dV = Pᵀ·dY,  dS = scale·P⊙(dP − Σ_j P⊙dP),  dQ = dS·K,  dK = dSᵀ·Q
//
// Every kernel is a template over T, the activations' type: float, or bf16 under mixed
// precision (entry points *_bf16).

// Where element idx of a head-major [B·NH, T, hs] tensor sits in a token-major [B, T, stride]
// one, whose heads start at column `offset`: (b·T + t)·stride + offset + h·hs + i.
__device__ __forceinline__ u64 token_major(
    u64 idx, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset) {
    u64 i = idx % hs;
    u64 t = (idx / hs) % seq;
    u64 bh = idx / ((u64)hs * seq);
    return ((bh / heads) * seq + t) * stride + offset + (bh % heads) * hs + i;
}

// dst[bh, t, i] = src at token_major(...), for the n = B·NH·T·hs elements of dst.
template <typename T>
__device__ void heads_split_impl(
    T* dst, const T* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    for (u64 idx = global_index(); idx < n; idx += grid_stride()) {
        dst[idx] = src[token_major(idx, seq, heads, hs, stride, offset)];
    }
}

// The inverse of heads_split: scatter [B·NH, T, hs] back into a [B, T, stride] layout.
template <typename T>
__device__ void heads_merge_impl(
    T* dst, const T* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    for (u64 idx = global_index(); idx < n; idx += grid_stride()) {
        dst[token_major(idx, seq, heads, hs, stride, offset)] = src[idx];
    }
}

// One block per row r = bh·T + t: att[r, j] = softmax(scale·scores[r, 0..=t])[j] for j ≤ t, and
// 0 above the diagonal.
template <typename T>
__device__ void causal_softmax_impl(T* att, const float* scores, u32 seq, float scale, u64 rows) {
    __shared__ float scratch[PIPIT_WARPS];
    u64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    u32 t = (u32)(row % seq);
    const float* s = scores + row * seq;
    T* p = att + row * seq;
    float m = pipit_neg_inf();
    for (u32 j = threadIdx.x; j <= t; j += PIPIT_BLOCK) {
        m = fmaxf(m, scale * s[j]);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (u32 j = threadIdx.x; j <= t; j += PIPIT_BLOCK) {
        sum += expf(scale * s[j] - m);
    }
    sum = block_sum(sum, scratch);
    for (u32 j = threadIdx.x; j < seq; j += PIPIT_BLOCK) {
        put(p + j, j <= t ? expf(scale * s[j] - m) / sum : 0.0f);
    }
}

// One block per row: dscores[r, j] = scale·att[r, j]·(datt[r, j] − Σ_i att[r, i]·datt[r, i]) for
// j ≤ t, 0 above the diagonal (the gradient of the unscaled scores).
template <typename T>
__device__ void causal_softmax_backward_impl(
    T* dscores, const T* att, const float* datt, u32 seq, float scale, u64 rows) {
    __shared__ float scratch[PIPIT_WARPS];
    u64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    u32 t = (u32)(row % seq);
    const T* p = att + row * seq;
    const float* dp = datt + row * seq;
    T* ds = dscores + row * seq;
    float pd = 0.0f;
    for (u32 j = threadIdx.x; j <= t; j += PIPIT_BLOCK) {
        pd += f32_of(p[j]) * dp[j];
    }
    pd = block_sum(pd, scratch);
    for (u32 j = threadIdx.x; j < seq; j += PIPIT_BLOCK) {
        put(ds + j, j <= t ? scale * f32_of(p[j]) * (dp[j] - pd) : 0.0f);
    }
}

extern "C" __global__ void heads_split(
    float* dst, const float* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    heads_split_impl(dst, src, seq, heads, hs, stride, offset, n);
}
extern "C" __global__ void heads_split_bf16(
    bf16* dst, const bf16* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    heads_split_impl(dst, src, seq, heads, hs, stride, offset, n);
}
extern "C" __global__ void heads_merge(
    float* dst, const float* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    heads_merge_impl(dst, src, seq, heads, hs, stride, offset, n);
}
extern "C" __global__ void heads_merge_bf16(
    bf16* dst, const bf16* src, u32 seq, u32 heads, u32 hs, u32 stride, u32 offset, u64 n) {
    heads_merge_impl(dst, src, seq, heads, hs, stride, offset, n);
}
extern "C" __global__ void causal_softmax(
    float* att, const float* scores, u32 seq, float scale, u64 rows) {
    causal_softmax_impl(att, scores, seq, scale, rows);
}
extern "C" __global__ void causal_softmax_bf16(
    bf16* att, const float* scores, u32 seq, float scale, u64 rows) {
    causal_softmax_impl(att, scores, seq, scale, rows);
}
extern "C" __global__ void causal_softmax_backward(
    float* dscores, const float* att, const float* datt, u32 seq, float scale, u64 rows) {
    causal_softmax_backward_impl(dscores, att, datt, seq, scale, rows);
}
extern "C" __global__ void causal_softmax_backward_bf16(
    bf16* dscores, const bf16* att, const float* datt, u32 seq, float scale, u64 rows) {
    causal_softmax_backward_impl(dscores, att, datt, seq, scale, rows);
}
