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

// Decoding: `new_tokens` tokens per sequence follow `past` tokens whose keys and values sit in a
// cache [B, capacity, 2, C] (each position's key, then its value). f32 only.

// Copy the new tokens' k and v from qkv [B, new, 3C] into the cache at positions
// past..past + new; one thread per element of n = B·new·2C.
extern "C" __global__ void kv_cache_write(
    float* cache, const float* qkv, u32 new_tokens, u32 past, u32 capacity, u32 channels, u64 n) {
    u64 width = 2 * (u64)channels;
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        u64 row = i / width;
        u64 e = i % width;
        u64 b = row / new_tokens;
        u64 t = row % new_tokens;
        cache[(b * capacity + past + t) * width + e] = qkv[row * 3 * channels + channels + e];
    }
}

// One block per row r = (b·NH + h)·new + t, the new token at position past + t: its scaled
// scores against cache positions 0..=past + t go to scores [rows, capacity], become the softmax
// numerators in place, and out[b, t, h·hs + i] = Σ_j e_j·v_j[i] / Σ_j e_j, the block's threads
// split over channels and positions.
extern "C" __global__ void attention_decode(
    float* out, float* scores, const float* qkv, const float* cache, u32 new_tokens, u32 past,
    u32 capacity, u32 channels, u32 heads, float scale, u64 rows) {
    __shared__ float scratch[PIPIT_WARPS];
    u64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    u32 hs = channels / heads;
    u32 t = (u32)(row % new_tokens);
    u64 bh = row / new_tokens;
    u64 b = bh / heads;
    u32 h = (u32)(bh % heads);
    u32 last = past + t;
    u64 stride = 2 * (u64)channels;
    const float* q = qkv + (b * new_tokens + t) * 3 * channels + h * hs;
    const float* kv = cache + b * capacity * stride + h * hs;
    float* s = scores + row * capacity;
    float m = pipit_neg_inf();
    for (u32 j = threadIdx.x; j <= last; j += PIPIT_BLOCK) {
        const float* k = kv + j * stride;
        float d = 0.0f;
        for (u32 i = 0; i < hs; i++) {
            d += q[i] * k[i];
        }
        s[j] = scale * d;
        m = fmaxf(m, s[j]);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (u32 j = threadIdx.x; j <= last; j += PIPIT_BLOCK) {
        float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    // block_sum synchronizes the block, so every numerator written above is visible below.
    float inv = 1.0f / block_sum(sum, scratch);
    float* o = out + (b * new_tokens + t) * channels + h * hs;
    if (hs > PIPIT_BLOCK) {
        for (u32 i = threadIdx.x; i < hs; i += PIPIT_BLOCK) {
            float acc = 0.0f;
            for (u32 j = 0; j <= last; j++) {
                acc += s[j] * kv[j * stride + channels + i];
            }
            o[i] = acc * inv;
        }
        return;
    }
    // PIPIT_BLOCK / hs groups of hs threads: thread (g, i) sums channel i over the positions
    // j ≡ g (mod groups), and the groups' partial sums are added in group order.
    __shared__ float partial[PIPIT_BLOCK];
    u32 groups = PIPIT_BLOCK / hs;
    u32 i = threadIdx.x % hs;
    u32 g = threadIdx.x / hs;
    float acc = 0.0f;
    if (g < groups) {
        for (u32 j = g; j <= last; j += groups) {
            acc += s[j] * kv[j * stride + channels + i];
        }
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < hs) {
        float total = 0.0f;
        for (u32 k = 0; k < groups; k++) {
            total += partial[k * hs + threadIdx.x];
        }
        o[threadIdx.x] = total * inv;
    }
}
