// Layernorm over the last dimension (epsilon 1e-5, population variance), forward and backward.
//
// layernorm_forward: one block per row. The mean first, then the variance from the centred
// values (which loses less precision than E[x²] − E[x]²); the row's mean and 1/std are saved.
//
// layernorm_backward: one block per row, overwriting dinp:
//   g = dout·w,  n = (x − mean)·rstd
//   dinp = rstd·(g − mean(g) − n·mean(g·n))
//
// layernorm_param_partials: stage 1 of the parameter gradients, column sums over rows of
// dout·n (dweight) and dout (dbias), laid out like column_partial_sums in matmul.cu;
// column_sums_finish then adds them to dweight and dbias.
//
// Under mixed precision the output (forward) and the output gradient (backward) are bf16;
// the input, statistics, parameters and their gradients stay f32.

#define LAYERNORM_EPS 1e-5f

template <typename T>
__device__ void layernorm_forward_impl(
    T* out, float* mean, float* rstd, const float* inp, const float* weight,
    const float* bias, u32 rows, u32 channels) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = inp + (u64)row * channels;
    T* y = out + (u64)row * channels;
    float s = 0.0f;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        s += x[c];
    }
    float m = block_sum(s, scratch) / (float)channels;
    float v = 0.0f;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        float d = x[c] - m;
        v += d * d;
    }
    float var = block_sum(v, scratch) / (float)channels;
    float r = 1.0f / sqrtf(var + LAYERNORM_EPS);
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        put(y + c, (x[c] - m) * r * weight[c] + bias[c]);
    }
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward(
    float* out, float* mean, float* rstd, const float* inp, const float* weight,
    const float* bias, u32 rows, u32 channels) {
    layernorm_forward_impl(out, mean, rstd, inp, weight, bias, rows, channels);
}
extern "C" __global__ void layernorm_forward_bf16(
    bf16* out, float* mean, float* rstd, const float* inp, const float* weight,
    const float* bias, u32 rows, u32 channels) {
    layernorm_forward_impl(out, mean, rstd, inp, weight, bias, rows, channels);
}

template <typename T>
__device__ void layernorm_backward_impl(
    float* dinp, const T* dout, const float* inp, const float* weight,
    const float* mean, const float* rstd, u32 rows, u32 channels) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = inp + (u64)row * channels;
    const T* dy = dout + (u64)row * channels;
    float* dx = dinp + (u64)row * channels;
    float m = mean[row];
    float r = rstd[row];
    float sg = 0.0f;
    float sgn = 0.0f;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        float g = f32_of(dy[c]) * weight[c];
        sg += g;
        sgn += g * (x[c] - m) * r;
    }
    float g_mean = block_sum(sg, scratch) / (float)channels;
    float gn_mean = block_sum(sgn, scratch) / (float)channels;
    for (u32 c = threadIdx.x; c < channels; c += PIPIT_BLOCK) {
        float g = f32_of(dy[c]) * weight[c];
        float n = (x[c] - m) * r;
        dx[c] = r * (g - g_mean - n * gn_mean);
    }
}

extern "C" __global__ void layernorm_backward(
    float* dinp, const float* dout, const float* inp, const float* weight,
    const float* mean, const float* rstd, u32 rows, u32 channels) {
    layernorm_backward_impl(dinp, dout, inp, weight, mean, rstd, rows, channels);
}
extern "C" __global__ void layernorm_backward_bf16(
    float* dinp, const bf16* dout, const float* inp, const float* weight,
    const float* mean, const float* rstd, u32 rows, u32 channels) {
    layernorm_backward_impl(dinp, dout, inp, weight, mean, rstd, rows, channels);
}

// Grid: (ceil(channels / 32), chunks); block: (32, 8).
template <typename T>
__device__ void layernorm_param_partials_impl(
    float* partial_weight, float* partial_bias, const T* dout, const float* inp,
    const float* mean, const float* rstd, u32 rows, u32 channels, u32 chunk_rows) {
    __shared__ float tile_w[8][33];
    __shared__ float tile_b[8][33];
    u32 col = blockIdx.x * 32 + threadIdx.x;
    u32 r0 = blockIdx.y * chunk_rows;
    u32 r1 = min(r0 + chunk_rows, rows);
    float sw = 0.0f;
    float sb = 0.0f;
    if (col < channels) {
        for (u32 r = r0 + threadIdx.y; r < r1; r += 8) {
            u64 at = (u64)r * channels + col;
            float dy = f32_of(dout[at]);
            sw += dy * (inp[at] - mean[r]) * rstd[r];
            sb += dy;
        }
    }
    tile_w[threadIdx.y][threadIdx.x] = sw;
    tile_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && col < channels) {
        float tw = 0.0f;
        float tb = 0.0f;
        for (int y = 0; y < 8; y++) {
            tw += tile_w[y][threadIdx.x];
            tb += tile_b[y][threadIdx.x];
        }
        u64 at = (u64)blockIdx.y * channels + col;
        partial_weight[at] = tw;
        partial_bias[at] = tb;
    }
}

extern "C" __global__ void layernorm_param_partials(
    float* partial_weight, float* partial_bias, const float* dout, const float* inp,
    const float* mean, const float* rstd, u32 rows, u32 channels, u32 chunk_rows) {
    layernorm_param_partials_impl(
        partial_weight, partial_bias, dout, inp, mean, rstd, rows, channels, chunk_rows);
}
extern "C" __global__ void layernorm_param_partials_bf16(
    float* partial_weight, float* partial_bias, const bf16* dout, const float* inp,
    const float* mean, const float* rstd, u32 rows, u32 channels, u32 chunk_rows) {
    layernorm_param_partials_impl(
        partial_weight, partial_bias, dout, inp, mean, rstd, rows, channels, chunk_rows);
}
