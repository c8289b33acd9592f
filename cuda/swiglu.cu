// SwiGLU's gate, elementwise, forward and backward:
//   out   = silu(g)·u,  silu(g) = g·σ(g)
//   dgate = dout·u·σ(g)·(1 + g·(1 − σ(g))),  dup = dout·silu(g)
// Every operand is T: float, or bf16 under mixed precision.

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_forward_impl(T* out, const T* gate, const T* up, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = f32_of(gate[i]);
        put(out + i, g * sigmoid(g) * f32_of(up[i]));
    }
}

template <typename T>
__device__ void swiglu_backward_impl(
    T* dgate, T* dup, const T* gate, const T* up, const T* dout, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float g = f32_of(gate[i]);
        float sig = sigmoid(g);
        float dy = f32_of(dout[i]);
        put(dgate + i, dy * f32_of(up[i]) * sig * (1.0f + g * (1.0f - sig)));
        put(dup + i, dy * g * sig);
    }
}

extern "C" __global__ void swiglu_forward(float* out, const float* gate, const float* up, u64 n) {
    swiglu_forward_impl(out, gate, up, n);
}
extern "C" __global__ void swiglu_forward_bf16(bf16* out, const bf16* gate, const bf16* up, u64 n) {
    swiglu_forward_impl(out, gate, up, n);
}
extern "C" __global__ void swiglu_backward(
    float* dgate, float* dup, const float* gate, const float* up, const float* dout, u64 n) {
    swiglu_backward_impl(dgate, dup, gate, up, dout, n);
}
extern "C" __global__ void swiglu_backward_bf16(
    bf16* dgate, bf16* dup, const bf16* gate, const bf16* up, const bf16* dout, u64 n) {
    swiglu_backward_impl(dgate, dup, gate, up, dout, n);
}
