// Softmax cross-entropy over the vocabulary and its logits gradient, one block per row, with a
// stable log-sum-exp (the row's maximum is subtracted before exponentiating).
//
//   loss[r]     = (max − x[target]) + log Σ exp(x − max)
//   dlogits[r]  = scale · (softmax(x) − onehot(target))
//
// The host checks targets before launching; a target outside the vocabulary still never reads
// past the row (the loss, or the whole gradient row, becomes NaN instead).

// The maximum of a row and the sum of exp(x − max), identical in every thread of the block.
__device__ void row_max_and_sum(const float* x, u32 vocab, float* scratch, float* max_out, float* sum_out) {
    float m = pipit_neg_inf();
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        m = fmaxf(m, x[i]);
    }
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        s += expf(x[i] - m);
    }
    *max_out = m;
    *sum_out = block_sum(s, scratch);
}

extern "C" __global__ void cross_entropy_forward(
    float* losses, const float* logits, const u32* targets, u32 rows, u32 vocab) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = logits + (u64)row * vocab;
    float m;
    float s;
    row_max_and_sum(x, vocab, scratch, &m, &s);
    if (threadIdx.x == 0) {
        u32 t = targets[row];
        losses[row] = t < vocab ? (m - x[t]) + logf(s) : pipit_nan();
    }
}

extern "C" __global__ void cross_entropy_backward(
    float* dlogits, const float* logits, const u32* targets, float scale, u32 rows, u32 vocab) {
    __shared__ float scratch[PIPIT_WARPS];
    u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const float* x = logits + (u64)row * vocab;
    float* d = dlogits + (u64)row * vocab;
    float m;
    float s;
    row_max_and_sum(x, vocab, scratch, &m, &s);
    u32 t = targets[row];
    bool valid = t < vocab;
    for (u32 i = threadIdx.x; i < vocab; i += PIPIT_BLOCK) {
        float p = expf(x[i] - m) / s;
        float onehot = i == t ? 1.0f : 0.0f;
        d[i] = valid ? scale * (p - onehot) : pipit_nan();
    }
}
