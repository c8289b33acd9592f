// What the matrix products need besides cuBLAS: the bias broadcast and column sums.
//
// A product with a bias runs as: bias_rows writes (or adds) the bias into every row of out,
// then cuBLAS adds the product with beta = 1. So out = op(a)·op(b) + bias, and with
// accumulation out = old + bias + op(a)·op(b).
//
// Column sums (the bias gradient, and layernorm's parameter gradients in layernorm.cu) run in
// two stages so that they are deterministic without atomics: blocks of 32 columns × 8 row
// lanes each sum one chunk of rows into `partial[chunk, col]`, then column_sums_finish adds
// the chunks of each column in chunk order to the accumulator.

// out[r, c] = bias[c] (or out[r, c] + bias[c] when accumulate != 0), for `n` = rows · cols.
// The bias is f32; a bf16 output holds it rounded, and cuBLAS adds the product to that.
template <typename T>
__device__ void bias_rows_impl(T* out, const float* bias, u32 cols, u32 accumulate, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float b = bias[i % cols];
        put(out + i, accumulate ? f32_of(out[i]) + b : b);
    }
}

extern "C" __global__ void bias_rows(float* out, const float* bias, u32 cols, u32 accumulate, u64 n) {
    bias_rows_impl(out, bias, cols, accumulate, n);
}
extern "C" __global__ void bias_rows_bf16(bf16* out, const float* bias, u32 cols, u32 accumulate, u64 n) {
    bias_rows_impl(out, bias, cols, accumulate, n);
}

// Stage 1 of dbias: partial[chunk, col] = Σ x[r, col] over the chunk's rows.
// Grid: (ceil(cols / 32), chunks); block: (32, 8).
template <typename T>
__device__ void column_partial_sums_impl(
    float* partial, const T* x, u32 rows, u32 cols, u32 chunk_rows) {
    __shared__ float tile[8][33];
    u32 col = blockIdx.x * 32 + threadIdx.x;
    u32 r0 = blockIdx.y * chunk_rows;
    u32 r1 = min(r0 + chunk_rows, rows);
    float s = 0.0f;
    if (col < cols) {
        for (u32 r = r0 + threadIdx.y; r < r1; r += 8) {
            s += f32_of(x[(u64)r * cols + col]);
        }
    }
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float total = 0.0f;
        for (int y = 0; y < 8; y++) {
            total += tile[y][threadIdx.x];
        }
        partial[(u64)blockIdx.y * cols + col] = total;
    }
}

extern "C" __global__ void column_partial_sums(
    float* partial, const float* x, u32 rows, u32 cols, u32 chunk_rows) {
    column_partial_sums_impl(partial, x, rows, cols, chunk_rows);
}
extern "C" __global__ void column_partial_sums_bf16(
    float* partial, const bf16* x, u32 rows, u32 cols, u32 chunk_rows) {
    column_partial_sums_impl(partial, x, rows, cols, chunk_rows);
}

// Stage 2: acc[col] += Σ_chunk partial[chunk, col], chunks in order. One thread per column.
extern "C" __global__ void column_sums_finish(float* acc, const float* partial, u32 chunks, u32 cols) {
    u64 col = global_index();
    if (col >= cols) {
        return;
    }
    float s = 0.0f;
    for (u32 c = 0; c < chunks; c++) {
        s += partial[(u64)c * cols + col];
    }
    acc[col] += s;
}
