// Fills, conversions, residual adds and gradient accumulation: one element per thread in
// grid-stride loops over `n` elements.

template <typename T>
__device__ void fill_impl(T* out, float value, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        put(out + i, value);
    }
}

extern "C" __global__ void fill_f32(float* out, float value, u64 n) { fill_impl(out, value, n); }
extern "C" __global__ void fill_bf16(bf16* out, float value, u64 n) { fill_impl(out, value, n); }

// out = in, converted between f32 and bf16.
template <typename TO, typename TI>
__device__ void convert_impl(TO* out, const TI* in, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        put(out + i, f32_of(in[i]));
    }
}

extern "C" __global__ void convert_f32_to_bf16(bf16* out, const float* in, u64 n) {
    convert_impl(out, in, n);
}
extern "C" __global__ void convert_bf16_to_f32(float* out, const bf16* in, u64 n) {
    convert_impl(out, in, n);
}

// out = a + b; under mixed precision b is a bf16 matmul output added to the f32 residual.
template <typename T>
__device__ void add_impl(float* out, const float* a, const T* b, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        out[i] = a[i] + f32_of(b[i]);
    }
}

extern "C" __global__ void add_f32(float* out, const float* a, const float* b, u64 n) {
    add_impl(out, a, b, n);
}
extern "C" __global__ void add_f32_bf16(float* out, const float* a, const bf16* b, u64 n) {
    add_impl(out, a, b, n);
}

// acc += x
extern "C" __global__ void add_assign_f32(float* acc, const float* x, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        acc[i] += x[i];
    }
}
