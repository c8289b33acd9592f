// Softmax cross-entropy over the vocabulary and its logits gradient, one block per row, with a
// stable log-sum-exp (the row's maximum is subtracted before exponentiating).
//
//   loss[r]     = (max − x[target]) + log Σ exp(x − max)
//   dlogits[r]  = scale · (softmax(x) − onehot(target))
//
// The host checks targets before launching; a target outside the vocabulary still never reads
// past the row (the loss, or the whole gradient row, becomes NaN instead). Under mixed
// precision the logits and their gradient are bf16; the losses stay f32.

// The maximum of a row and the sum of exp(x − max), identical in every thread of the block.
template <typename T>
__device__ void row_max_and_sum(const T* x, u32 vocab, float* scratch, float* max_out, float* sum_out) {
    float m = pipit_neg_inf();
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        m = fmaxf(m, f32_of(x[i]));
    }
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        s += expf(f32_of(x[i]) - m);
    }
    *max_out = m;
    *sum_out = block_sum(s, scratch);
}

template <typename T>
__device__ void cross_entropy_forward_impl(
    float* losses, const T* logits, const u32* targets, u32 rows, u32 vocab) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const T* x = logits + (u64)row * vocab;
    float m;
    float s;
    row_max_and_sum(x, vocab, scratch, &m, &s);
    if (threadIdx.x == 0) {
        u32 t = targets[row];
        losses[row] = t < vocab ? (m - f32_of(x[t])) + logf(s) : pipit_nan();
    }
}

extern "C" __global__ void cross_entropy_forward(
    float* losses, const float* logits, const u32* targets, u32 rows, u32 vocab) {
    cross_entropy_forward_impl(losses, logits, targets, rows, vocab);
}
extern "C" __global__ void cross_entropy_forward_bf16(
    float* losses, const bf16* logits, const u32* targets, u32 rows, u32 vocab) {
    cross_entropy_forward_impl(losses, logits, targets, rows, vocab);
}

template <typename T>
__device__ void cross_entropy_backward_impl(
    T* dlogits, const T* logits, const u32* targets, float scale, u32 rows, u32 vocab) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const T* x = logits + (u64)row * vocab;
    T* d = dlogits + (u64)row * vocab;
    float m;
    float s;
    row_max_and_sum(x, vocab, scratch, &m, &s);
    u32 t = targets[row];
    bool valid = t < vocab;
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        float p = expf(f32_of(x[i]) - m) / s;
        float onehot = i == t ? 1.0f : 0.0f;
        put(d + i, valid ? scale * (p - onehot) : pipit_nan());
    }
}

extern "C" __global__ void cross_entropy_backward(
    float* dlogits, const float* logits, const u32* targets, float scale, u32 rows, u32 vocab) {
    cross_entropy_backward_impl(dlogits, logits, targets, scale, rows, vocab);
}
extern "C" __global__ void cross_entropy_backward_bf16(
    bf16* dlogits, const bf16* logits, const u32* targets, float scale, u32 rows, u32 vocab) {
    cross_entropy_backward_impl(dlogits, logits, targets, scale, rows, vocab);
}
