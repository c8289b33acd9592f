// One AdamW update, as PyTorch's torch.optim.AdamW, one parameter per thread, from the
// gradient times grad_scale (1, or less when gradients are clipped to a global norm):
//   m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²
//   p −= lr·(m̂ / (√v̂ + eps) + weight_decay·p),  m̂ = m / bc1,  v̂ = v / bc2
// The bias corrections bc1 = 1 − β1^step and bc2 = 1 − β2^step come from the host.

extern "C" __global__ void adamw(
    float* param, const float* grad, float* m, float* v,
    float lr, float beta1, float beta2, float eps, float weight_decay,
    float bc1, float bc2, float grad_scale, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = grad[i] * grad_scale;
        float p = param[i];
        float m_new = beta1 * m[i] + (1.0f - beta1) * g;
        float v_new = beta2 * v[i] + (1.0f - beta2) * g * g;
        float update = (m_new / bc1) / (sqrtf(v_new / bc2) + eps) + weight_decay * p;
        param[i] = p - lr * update;
        m[i] = m_new;
        v[i] = v_new;
    }
}

// The squared norm behind gradient clipping, in two stages that sum in a fixed order, so a
// gradient gives the same bits every run.
// Stage 1: partial[b] = Σ x[i]² over the elements block b visits in its grid-stride loop.
extern "C" __global__ void sum_squares_partial(float* partial, const float* x, u64 n) {
    __shared__ float scratch[PIPIT_WARPS];
    float s = 0.0f;
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        s += x[i] * x[i];
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
    }
}

// Stage 2: out[slot] = Σ partial[b], blocks in order, by one thread.
extern "C" __global__ void sum_squares_finish(float* out, const float* partial, u32 blocks, u64 slot) {
    if (global_index() == 0) {
        float s = 0.0f;
        for (u32 b = 0; b < blocks; b++) {
            s += partial[b];
        }
        out[slot] = s;
    }
}
