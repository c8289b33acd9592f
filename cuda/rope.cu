// Rotary position embedding (RoPE) as transformers' Llama applies it, on x [B, T, H, d]:
//   y[.., j]       = x[j]·cos − x[j + d/2]·sin
//   y[.., j + d/2] = x[j + d/2]·cos + x[j]·sin        for j < d/2,
// with cos and sin of position t at frequency j read from the host's table
// [T, d/2, 2] (`Rope::cos_sin`, f32 angles as transformers computes them). `sign` = −1
// rotates by minus the angle: the inverse, which is also the backward.
//
// One thread per (vector, j) pair, n = B·T·H·d/2 of them; T is the activations' type.

template <typename T>
__device__ void rope_impl(
    T* out, const T* inp, const float* table, u32 seq, u32 heads, u32 half, float sign,
    u64 n) {
    for (u64 p = global_index(); p < n; p += grid_stride()) {
        u64 vec = p / half;
        u32 j = (u32)(p % half);
        u32 t = (u32)((vec / heads) % seq);
        float c = table[2 * ((u64)t * half + j)];
        float s = sign * table[2 * ((u64)t * half + j) + 1];
        const T* x = inp + vec * 2 * half;
        T* y = out + vec * 2 * half;
        float x1 = f32_of(x[j]);
        float x2 = f32_of(x[j + half]);
        put(y + j, x1 * c - x2 * s);
        put(y + j + half, x2 * c + x1 * s);
    }
}

extern "C" __global__ void rope(
    float* out, const float* inp, const float* table, u32 seq, u32 heads, u32 half,
    float sign, u64 n) {
    rope_impl(out, inp, table, seq, heads, half, sign, n);
}
extern "C" __global__ void rope_bf16(
    bf16* out, const bf16* inp, const float* table, u32 seq, u32 heads, u32 half, float sign,
    u64 n) {
    rope_impl(out, inp, table, seq, heads, half, sign, n);
}
