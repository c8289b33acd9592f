// One AdamW update, as PyTorch's torch.optim.AdamW, one parameter per thread:
//   m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²
//   p −= lr·(m̂ / (√v̂ + eps) + weight_decay·p),  m̂ = m / bc1,  v̂ = v / bc2
// The bias corrections bc1 = 1 − β1^step and bc2 = 1 − β2^step come from the host.

extern "C" __global__ void adamw(
    float* param, const float* grad, float* m, float* v,
    float lr, float beta1, float beta2, float eps, float weight_decay,
    float bc1, float bc2, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = grad[i];
        float p = param[i];
        float m_new = beta1 * m[i] + (1.0f - beta1) * g;
        float v_new = beta2 * v[i] + (1.0f - beta2) * g * g;
        float update = (m_new / bc1) / (sqrtf(v_new / bc2) + eps) + weight_decay * p;
        param[i] = p - lr * update;
        m[i] = m_new;
        v[i] = v_new;
    }
}
