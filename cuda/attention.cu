// Causal multi-head self-attention, forward and backward, straightforward and exact: the
// probabilities are materialised in att [B, NH, T, T], as the Backend trait requires.
//
// Layouts: qkv [B, T, 3C] with q, k, v side by side and heads contiguous inside each (head h
// of token t starts at t·3C + part·C + h·hs); out and dout [B, T, C]. A "row" is one (b, h,
// query t), numbered (b·NH + h)·T + t, which is also where its probabilities start in att
// (times T). Scores are q·k·scale with scale = 1/√hs; query t attends to keys 0..=t.
//
// attention_forward, one block per row: the row's scores in shared memory, their max and sum,
// the probabilities in place (and into att, zeros above the diagonal), then
// out[t] = Σ_j p[j]·v[j] with one thread per head dimension walking j in order.
//
// Backward, in two kernels so that every element of dqkv has exactly one writer:
//   attention_backward_query, one block per row t:
//     datt[j] = dout[t]·v[j],  dpre[t,j] = att[t,j]·(datt[j] − Σ_i att[t,i]·datt[i])·scale
//     dq[t]   = Σ_j dpre[t,j]·k[j]
//   attention_backward_key_value, one block per key column j:
//     dk[j]   = Σ_{t≥j} dpre[t,j]·q[t],  dv[j] = Σ_{t≥j} att[t,j]·dout[t]
// dpre is an f32 scratch buffer shaped like att; only its causal part is written and read.
//
// Every kernel is a template over T, the type of qkv, att, out and their gradients: float, or
// bf16 under mixed precision (instantiations *_bf16). Scores, sums and dpre are f32 always.

// Where row `row` sits: its sequence b, head h and query t.
struct AttentionRow {
    u64 b;
    u32 h;
    u32 t;
};

__device__ __forceinline__ AttentionRow attention_row(u64 row, u32 seq, u32 heads) {
    AttentionRow r;
    r.t = (u32)(row % seq);
    u64 bh = row / seq;
    r.h = (u32)(bh % heads);
    r.b = bh / heads;
    return r;
}

// Dynamic shared memory: head_size + seq floats (the row's query, then its scores).
template <typename T>
__device__ void attention_forward_impl(
    T* out, T* att, const T* qkv, u32 seq, u32 channels, u32 heads, float scale, u64 rows) {
    extern __shared__ float shared[];
    __shared__ float scratch[PIPIT_WARPS];
    u64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    AttentionRow r = attention_row(row, seq, heads);
    u32 hs = channels / heads;
    float* q = shared;
    float* p = shared + hs;
    u64 stride = 3 * (u64)channels;
    const T* base = qkv + r.b * seq * stride + (u64)r.h * hs;
    const T* q_row = base + r.t * stride;
    for (u32 i = threadIdx.x; i < hs; i += PIPIT_BLOCK) {
        q[i] = f32_of(q_row[i]);
    }
    __syncthreads();

    float m = pipit_neg_inf();
    for (u32 j = threadIdx.x; j <= r.t; j += PIPIT_BLOCK) {
        const T* k = base + j * stride + channels;
        float s = 0.0f;
        for (u32 i = 0; i < hs; i++) {
            s += q[i] * f32_of(k[i]);
        }
        s *= scale;
        p[j] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (u32 j = threadIdx.x; j <= r.t; j += PIPIT_BLOCK) {
        float e = expf(p[j] - m);
        p[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    T* a = att + row * seq;
    for (u32 j = threadIdx.x; j < seq; j += PIPIT_BLOCK) {
        float prob = j <= r.t ? p[j] / sum : 0.0f;
        if (j <= r.t) {
            p[j] = prob;
        }
        put(a + j, prob);
    }
    // Every thread reads the whole row below.
    __syncthreads();

    T* o = out + (r.b * seq + r.t) * channels + (u64)r.h * hs;
    for (u32 i = threadIdx.x; i < hs; i += PIPIT_BLOCK) {
        float acc = 0.0f;
        for (u32 j = 0; j <= r.t; j++) {
            acc += p[j] * f32_of(base[j * stride + 2 * (u64)channels + i]);
        }
        put(o + i, acc);
    }
}

// Dynamic shared memory: head_size floats (the row's output gradient).
template <typename T>
__device__ void attention_backward_query_impl(
    T* dqkv, float* dpre, const T* dout, const T* qkv, const T* att,
    u32 seq, u32 channels, u32 heads, float scale, u64 rows) {
    extern __shared__ float shared[];
    __shared__ float scratch[PIPIT_WARPS];
    u64 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    float* dy = shared;
    AttentionRow r = attention_row(row, seq, heads);
    u32 hs = channels / heads;
    u64 stride = 3 * (u64)channels;
    const T* base = qkv + r.b * seq * stride + (u64)r.h * hs;
    const T* g = dout + (r.b * seq + r.t) * channels + (u64)r.h * hs;
    for (u32 i = threadIdx.x; i < hs; i += PIPIT_BLOCK) {
        dy[i] = f32_of(g[i]);
    }
    __syncthreads();

    const T* p = att + row * seq;
    float* d = dpre + row * seq;
    float pd = 0.0f;
    for (u32 j = threadIdx.x; j <= r.t; j += PIPIT_BLOCK) {
        const T* v = base + j * stride + 2 * (u64)channels;
        float da = 0.0f;
        for (u32 i = 0; i < hs; i++) {
            da += dy[i] * f32_of(v[i]);
        }
        d[j] = da;
        pd += f32_of(p[j]) * da;
    }
    pd = block_sum(pd, scratch);
    for (u32 j = threadIdx.x; j <= r.t; j += PIPIT_BLOCK) {
        d[j] = f32_of(p[j]) * (d[j] - pd) * scale;
    }
    // Every thread reads the whole dpre row below.
    __syncthreads();

    T* dq = dqkv + (r.b * seq + r.t) * stride + (u64)r.h * hs;
    for (u32 i = threadIdx.x; i < hs; i += PIPIT_BLOCK) {
        float acc = 0.0f;
        for (u32 j = 0; j <= r.t; j++) {
            acc += d[j] * f32_of(base[j * stride + channels + i]);
        }
        put(dq + i, acc);
    }
}

// One block per key column (b, h, j), numbered like rows; any block size.
template <typename T>
__device__ void attention_backward_key_value_impl(
    T* dqkv, const float* dpre, const T* dout, const T* qkv, const T* att,
    u32 seq, u32 channels, u32 heads, u64 columns) {
    u64 column = blockIdx.x;
    if (column >= columns) {
        return;
    }
    AttentionRow r = attention_row(column, seq, heads);
    u32 j = r.t;
    u32 hs = channels / heads;
    u64 stride = 3 * (u64)channels;
    const T* base = qkv + r.b * seq * stride + (u64)r.h * hs;
    const T* g = dout + r.b * seq * channels + (u64)r.h * hs;
    // Start of this (b, h) plane of att and dpre.
    u64 plane = (column - j) * seq;
    T* dk = dqkv + (r.b * seq + j) * stride + channels + (u64)r.h * hs;
    T* dv = dk + channels;
    for (u32 i = threadIdx.x; i < hs; i += blockDim.x) {
        float ak = 0.0f;
        float av = 0.0f;
        for (u32 t = j; t < seq; t++) {
            u64 at = plane + (u64)t * seq + j;
            ak += dpre[at] * f32_of(base[t * stride + i]);
            av += f32_of(att[at]) * f32_of(g[(u64)t * channels + i]);
        }
        put(dk + i, ak);
        put(dv + i, av);
    }
}

extern "C" __global__ void attention_forward(
    float* out, float* att, const float* qkv, u32 seq, u32 channels, u32 heads, float scale,
    u64 rows) {
    attention_forward_impl(out, att, qkv, seq, channels, heads, scale, rows);
}
extern "C" __global__ void attention_forward_bf16(
    bf16* out, bf16* att, const bf16* qkv, u32 seq, u32 channels, u32 heads, float scale,
    u64 rows) {
    attention_forward_impl(out, att, qkv, seq, channels, heads, scale, rows);
}
extern "C" __global__ void attention_backward_query(
    float* dqkv, float* dpre, const float* dout, const float* qkv, const float* att,
    u32 seq, u32 channels, u32 heads, float scale, u64 rows) {
    attention_backward_query_impl(dqkv, dpre, dout, qkv, att, seq, channels, heads, scale, rows);
}
extern "C" __global__ void attention_backward_query_bf16(
    bf16* dqkv, float* dpre, const bf16* dout, const bf16* qkv, const bf16* att,
    u32 seq, u32 channels, u32 heads, float scale, u64 rows) {
    attention_backward_query_impl(dqkv, dpre, dout, qkv, att, seq, channels, heads, scale, rows);
}
extern "C" __global__ void attention_backward_key_value(
    float* dqkv, const float* dpre, const float* dout, const float* qkv, const float* att,
    u32 seq, u32 channels, u32 heads, u64 columns) {
    attention_backward_key_value_impl(dqkv, dpre, dout, qkv, att, seq, channels, heads, columns);
}
extern "C" __global__ void attention_backward_key_value_bf16(
    bf16* dqkv, const float* dpre, const bf16* dout, const bf16* qkv, const bf16* att,
    u32 seq, u32 channels, u32 heads, u64 columns) {
    attention_backward_key_value_impl(dqkv, dpre, dout, qkv, att, seq, channels, heads, columns);
}
