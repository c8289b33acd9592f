// RMSNorm over the last dimension (eps from the model's config), forward and backward, as
// transformers' Llama computes it: the mean square in f32, then y = w·(x·rstd).
//
// rmsnorm_forward: one block per row; the row's 1/rms is saved for backward.
//
// rmsnorm_backward: one block per row, overwriting dinp:
//   g = dout·w,  n = x·rstd,  dinp = rstd·(g − n·mean(g·n))
//
// rmsnorm_weight_partials: stage 1 of the weight gradient, column sums over rows of dout·n,
// laid out like column_partial_sums in matmul.cu; column_sums_finish then adds them to
// dweight.
//
// Under mixed precision the output (forward) and the output gradient (backward) are bf16;
// the input, rstd, the weight and its gradient stay f32 (as layernorm.cu).

template <typename T>
__device__ void rmsnorm_forward_impl(
    T* out, float* rstd, const float* inp, const float* weight, u32 rows, u32 channels,
    float eps) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = inp + (u64)row * channels;
    T* y = out + (u64)row * channels;
    float s = 0.0f;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        s += x[c] * x[c];
    }
    float r = 1.0f / sqrtf(block_sum(s, scratch) / (float)channels + eps);
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        put(y + c, weight[c] * (x[c] * r));
    }
    if (threadIdx.x == 0) {
        rstd[row] = r;
    }
}

extern "C" __global__ void rmsnorm_forward(
    float* out, float* rstd, const float* inp, const float* weight, u32 rows, u32 channels,
    float eps) {
    rmsnorm_forward_impl(out, rstd, inp, weight, rows, channels, eps);
}
extern "C" __global__ void rmsnorm_forward_bf16(
    bf16* out, float* rstd, const float* inp, const float* weight, u32 rows, u32 channels,
    float eps) {
    rmsnorm_forward_impl(out, rstd, inp, weight, rows, channels, eps);
}

template <typename T>
__device__ void rmsnorm_backward_impl(
    float* dinp, const T* dout, const float* inp, const float* weight, const float* rstd,
    u32 rows, u32 channels) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = inp + (u64)row * channels;
    const T* dy = dout + (u64)row * channels;
    float* dx = dinp + (u64)row * channels;
    float r = rstd[row];
    float sgn = 0.0f;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        sgn += f32_of(dy[c]) * weight[c] * x[c] * r;
    }
    float gn_mean = block_sum(sgn, scratch) / (float)channels;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        float g = f32_of(dy[c]) * weight[c];
        dx[c] = r * (g - x[c] * r * gn_mean);
    }
}

extern "C" __global__ void rmsnorm_backward(
    float* dinp, const float* dout, const float* inp, const float* weight, const float* rstd,
    u32 rows, u32 channels) {
    rmsnorm_backward_impl(dinp, dout, inp, weight, rstd, rows, channels);
}
extern "C" __global__ void rmsnorm_backward_bf16(
    float* dinp, const bf16* dout, const float* inp, const float* weight, const float* rstd,
    u32 rows, u32 channels) {
    rmsnorm_backward_impl(dinp, dout, inp, weight, rstd, rows, channels);
}

// Grid: (ceil(channels / 32), chunks); block: (32, 8).
template <typename T>
__device__ void rmsnorm_weight_partials_impl(
    float* partial, const T* dout, const float* inp, const float* rstd, u32 rows,
    u32 channels, u32 chunk_rows) {
    __shared__ float tile[8][33];
    u32 col = blockIdx.x * 32 + threadIdx.x;
    u32 r0 = blockIdx.y * chunk_rows;
    u32 r1 = min(r0 + chunk_rows, rows);
    float sw = 0.0f;
    if (col < channels) {
        for (u32 r = r0 + threadIdx.y; r < r1; r += 8) {
            u64 at = (u64)r * channels + col;
            sw += f32_of(dout[at]) * inp[at] * rstd[r];
        }
    }
    tile[threadIdx.y][threadIdx.x] = sw;
    __syncthreads();
    if (threadIdx.y == 0 && col < channels) {
        float t = 0.0f;
        for (int y = 0; y < 8; y++) {
            t += tile[y][threadIdx.x];
        }
        partial[(u64)blockIdx.y * channels + col] = t;
    }
}

extern "C" __global__ void rmsnorm_weight_partials(
    float* partial, const float* dout, const float* inp, const float* rstd, u32 rows,
    u32 channels, u32 chunk_rows) {
    rmsnorm_weight_partials_impl(partial, dout, inp, rstd, rows, channels, chunk_rows);
}
extern "C" __global__ void rmsnorm_weight_partials_bf16(
    float* partial, const bf16* dout, const float* inp, const float* rstd, u32 rows,
    u32 channels, u32 chunk_rows) {
    rmsnorm_weight_partials_impl(partial, dout, inp, rstd, rows, channels, chunk_rows);
}
