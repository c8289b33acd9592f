// Shared by every kernel file: integer types, constants and deterministic block reductions.
//
// NVRTC compiles these sources without the CUDA headers (CUDA 13 moved them, and pipit ships
// no toolkit), so the little the headers would give is written here. The host concatenates
// this file and the layer files into one program, each preceded by a #line marker, so
// compiler messages name the file and line they come from.
//
// Every reduction combines values in an order fixed by the launch shape alone: a warp
// butterfly, then the warps' partial results summed one after another. The same inputs
// therefore give the same bits on every run, which float atomics would not.

typedef unsigned int u32;
typedef unsigned long long u64;

// Threads per block of every kernel that uses block_sum / block_max; the host launches
// exactly this many (see `ROW_BLOCK` in kernels.rs).
#define PIPIT_BLOCK 256
#define PIPIT_WARPS (PIPIT_BLOCK / 32)
#define FULL_MASK 0xffffffffu

// bfloat16, stored as its 16 bits: the upper half of an f32. Kernels read it as f32 (f32_of)
// and store through put(), which rounds to nearest even, so every kernel computes in f32
// whatever its operands' type. Templated kernels take T = float or bf16 for the operands
// that mixed precision keeps in bf16; the host launches the instantiation named *_bf16.
struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float f32_of(float v) { return v; }
__device__ __forceinline__ float f32_of(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }

// v rounded to the nearest bf16, ties to even; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short bf16_bits(float v) {
    u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((x >> 16) | 0x0040u);
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}

__device__ __forceinline__ void put(float* p, float v) { *p = v; }
__device__ __forceinline__ void put(bf16* p, float v) { p->bits = bf16_bits(v); }

__device__ __forceinline__ float pipit_nan() { return __int_as_float(0x7fffffff); }
__device__ __forceinline__ float pipit_neg_inf() { return __int_as_float(0xff800000); }

// Index of this thread in a one-dimensional grid, and the grid's stride, for grid-stride loops.
__device__ __forceinline__ u64 global_index() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ u64 grid_stride() { return (u64)gridDim.x * blockDim.x; }

// Butterfly sum over a warp: every lane ends with the same value (a + b and b + a round alike).
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over a block of PIPIT_BLOCK threads; every thread must call it and every thread gets
// the same result. `scratch` holds PIPIT_WARPS floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    // A previous call's readers may still be reading scratch.
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        scratch[threadIdx.x >> 5] = v;
    }
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < PIPIT_WARPS; w++) {
        total += scratch[w];
    }
    return total;
}

// Maximum over a block of PIPIT_BLOCK threads, with block_sum's calling rules.
__device__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
        scratch[threadIdx.x >> 5] = v;
    }
    __syncthreads();
    float best = scratch[0];
    for (int w = 1; w < PIPIT_WARPS; w++) {
        best = fmaxf(best, scratch[w]);
    }
    return best;
}
