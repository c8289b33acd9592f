// Host emulation of the few CUDA features pipit's kernels use, so they can be checked on a
// machine without a GPU (scripts/cuda-cpu-check.sh): blocks run one after another, each
// block's threads as std::threads with real barriers, __shared__ arrays as statics (shared by
// the threads of the block running), warp shuffles through a per-warp exchange buffer.
// Slow, and blind to timing, occupancy and memory-model effects: a check of arithmetic,
// indexing and synchronisation, not a substitute for the GPU.
#include <barrier>
#include <thread>
#include <vector>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* emu_block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
float emu_warp_buf[64][32];
std::vector<float> emu_dyn;
float* emu_dyn_shared;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int off) {
    unsigned tid = threadIdx.x + threadIdx.y * blockDim.x;
    unsigned w = tid / 32, lane = tid % 32;
    emu_warp_buf[w][lane] = v;
    emu_warp_barriers[w]->arrive_and_wait();
    float other = emu_warp_buf[w][lane ^ off];
    emu_warp_barriers[w]->arrive_and_wait();
    return other;
}
// mma.sync.m16n8k16 (bf16 operands, f32 accumulation) for cuda/flash_attention.cu: every lane
// posts its fragments, then computes its four outputs from the whole warp's, using the PTX
// ISA's fragment layout (g = lane / 4, t = lane % 4): A element (r, k) in lane (r % 8)·4 +
// (k % 8) / 2, register r / 8 + 2·(k / 8); B element (k, n) in lane n·4 + (k % 8) / 2,
// register k / 8; the low half of a register holds the even index; C (g, 2t + e) and
// (g + 8, 2t + e) in registers e and 2 + e.
#define PIPIT_HOST_EMULATION 1
unsigned emu_mma_a[64][32][4], emu_mma_b[64][32][2];
inline float emu_half(unsigned reg, unsigned k) {
    return __uint_as_float(k % 2 ? reg & 0xffff0000u : reg << 16);
}
inline void mma_16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    unsigned tid = threadIdx.x + threadIdx.y * blockDim.x;
    unsigned w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) emu_mma_a[w][lane][i] = a[i];
    emu_mma_b[w][lane][0] = b0; emu_mma_b[w][lane][1] = b1;
    emu_warp_barriers[w]->arrive_and_wait();
    for (unsigned e = 0; e < 4; e++) {
        unsigned r = g + 8 * (e / 2), n = 2 * t + e % 2;
        float acc = d[e];
        for (unsigned k = 0; k < 16; k++)
            acc += emu_half(emu_mma_a[w][(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k) *
                   emu_half(emu_mma_b[w][n * 4 + (k % 8) / 2][k / 8], k);
        d[e] = acc;
    }
    emu_warp_barriers[w]->arrive_and_wait();
}
template <class F, class... A>
void launch(dim3 grid, dim3 block, unsigned shared, F f, A... args) {
    gridDim = grid; blockDim = block;
    unsigned n = block.x * block.y;
    emu_dyn.assign(shared / 4 + 1, NAN);
    emu_dyn_shared = emu_dyn.data();
    for (unsigned by = 0; by < grid.y; by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            std::barrier<> bar(n);
            emu_block_barrier = &bar;
            emu_warp_barriers.clear();
            for (unsigned w = 0; w < (n + 31) / 32; w++)
                emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < n; t++)
                ts.emplace_back([&, t] {
                    blockIdx.x = bx; blockIdx.y = by;
                    threadIdx.x = t % block.x; threadIdx.y = t / block.x;
                    f(args...);
                });
            for (auto& t : ts) t.join();
        }
}

