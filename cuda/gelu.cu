// GELU with GPT-2's tanh approximation, forward and backward:
//   gelu(x)  = ½·x·(1 + tanh(u)),  u = √(2/π)·(x + 0.044715·x³)
//   gelu'(x) = ½·(1 + tanh(u)) + ½·x·(1 − tanh²(u))·√(2/π)·(1 + 3·0.044715·x²)
// Every operand is T: float, or bf16 under mixed precision.

#define GELU_SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f

template <typename T>
__device__ void gelu_forward_impl(T* out, const T* inp, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float x = f32_of(inp[i]);
        float u = GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        put(out + i, 0.5f * x * (1.0f + tanhf(u)));
    }
}

// dinp = gelu'(inp) · dout (overwrites dinp).
template <typename T>
__device__ void gelu_backward_impl(T* dinp, const T* inp, const T* dout, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        float x = f32_of(inp[i]);
        float u = GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
        float th = tanhf(u);
        float du = GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
        float grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
        put(dinp + i, grad * f32_of(dout[i]));
    }
}

extern "C" __global__ void gelu_forward(float* out, const float* inp, u64 n) {
    gelu_forward_impl(out, inp, n);
}
extern "C" __global__ void gelu_forward_bf16(bf16* out, const bf16* inp, u64 n) {
    gelu_forward_impl(out, inp, n);
}
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, u64 n) {
    gelu_backward_impl(dinp, inp, dout, n);
}
extern "C" __global__ void gelu_backward_bf16(bf16* dinp, const bf16* inp, const bf16* dout, u64 n) {
    gelu_backward_impl(dinp, inp, dout, n);
}
