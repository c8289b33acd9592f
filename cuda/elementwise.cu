// Fills, residual adds and gradient accumulation: one element per thread in grid-stride
// loops over `n` elements.

extern "C" __global__ void fill_f32(float* out, float value, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        out[i] = value;
    }
}

// out = a + b
extern "C" __global__ void add_f32(float* out, const float* a, const float* b, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        out[i] = a[i] + b[i];
    }
}

// acc += x
extern "C" __global__ void add_assign_f32(float* acc, const float* x, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        acc[i] += x[i];
    }
}
