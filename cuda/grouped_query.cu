// Grouped-query attention's key/value sharing, around the packed attention of attention.cu:
// `heads` query heads of size d share `kv_heads` key/value heads (group = heads / kv_heads).
//
// pack_qkv: qkv [rows, 3·H·d] from q [rows, H·d] and k, v [rows, KV·d]; query head h reads
// key/value head h / group. One thread per element of qkv.
//
// unpack_qkv_grad: the inverse's gradient. dq is dqkv's first third; dk and dv sum, in head
// order, the gradients of the group's query heads. One thread per element of dk (and dv).
//
// Every operand is T: float, or bf16 under mixed precision.

template <typename T>
__device__ void pack_qkv_impl(
    T* qkv, const T* q, const T* k, const T* v, u32 heads, u32 kv_heads, u32 d, u64 n) {
    u64 qw = (u64)heads * d;
    u64 kw = (u64)kv_heads * d;
    u32 group = heads / kv_heads;
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        u64 r = i / (3 * qw);
        u64 col = i % (3 * qw);
        u64 part = col / qw;
        u64 w = col % qw;
        if (part == 0) {
            qkv[i] = q[r * qw + w];
        } else {
            u64 src = r * kw + (w / d / group) * d + w % d;
            qkv[i] = part == 1 ? k[src] : v[src];
        }
    }
}

template <typename T>
__device__ void unpack_qkv_grad_impl(
    T* dq, T* dk, T* dv, const T* dqkv, u32 heads, u32 kv_heads, u32 d, u64 rows) {
    u64 qw = (u64)heads * d;
    u64 kw = (u64)kv_heads * d;
    u32 group = heads / kv_heads;
    for (u64 i = global_index(); i < rows * qw; i += grid_stride()) {
        u64 r = i / qw;
        dq[i] = dqkv[r * 3 * qw + i % qw];
    }
    for (u64 i = global_index(); i < rows * kw; i += grid_stride()) {
        u64 r = i / kw;
        u64 w = i % kw;
        u64 first = (w / d) * group * d + w % d;
        const T* row = dqkv + r * 3 * qw;
        float sk = 0.0f;
        float sv = 0.0f;
        for (u32 g = 0; g < group; g++) {
            sk += f32_of(row[qw + first + (u64)g * d]);
            sv += f32_of(row[2 * qw + first + (u64)g * d]);
        }
        put(dk + i, sk);
        put(dv + i, sv);
    }
}

extern "C" __global__ void pack_qkv(
    float* qkv, const float* q, const float* k, const float* v, u32 heads, u32 kv_heads, u32 d,
    u64 n) {
    pack_qkv_impl(qkv, q, k, v, heads, kv_heads, d, n);
}
extern "C" __global__ void pack_qkv_bf16(
    bf16* qkv, const bf16* q, const bf16* k, const bf16* v, u32 heads, u32 kv_heads, u32 d,
    u64 n) {
    pack_qkv_impl(qkv, q, k, v, heads, kv_heads, d, n);
}
extern "C" __global__ void unpack_qkv_grad(
    float* dq, float* dk, float* dv, const float* dqkv, u32 heads, u32 kv_heads, u32 d,
    u64 rows) {
    unpack_qkv_grad_impl(dq, dk, dv, dqkv, heads, kv_heads, d, rows);
}
extern "C" __global__ void unpack_qkv_grad_bf16(
    bf16* dq, bf16* dk, bf16* dv, const bf16* dqkv, u32 heads, u32 kv_heads, u32 d, u64 rows) {
    unpack_qkv_grad_impl(dq, dk, dv, dqkv, heads, kv_heads, d, rows);
}
