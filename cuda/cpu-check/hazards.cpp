// Kernels with deliberate synchronisation errors, to check that the kernel emulation
// (emulate.h) shows them: tests/cuda_emulated.rs runs each case in every
// PIPIT_EMULATED_CUDA_ORDER and says in which orders the error must show.
//
//     hazards neighbour   # a thread reads its neighbour's shared value without a barrier
//     between-warps       # a warp overwrites a slot another warp may still be reading
//     early-exit          # a thread leaves before a __syncthreads the others wait at
//     shuffle-short       # a lane leaves before a shuffle its warp waits at
//
// A race prints "N wrong" (0 when the order hid it); a deadlock aborts with the emulation's
// line naming the barrier.
#include "emulate.h"

#define FULL_MASK 0xffffffffu

constexpr unsigned kThreads = 256;

// Reads s[t - 1] with no __syncthreads after the writes: right only when thread t - 1 ran
// first.
__global__ void neighbour(float* out) {
    __shared__ float s[kThreads];
    unsigned t = threadIdx.x;
    s[t] = float(t);
    out[t] = t ? s[t - 1] : -1.0f;
}

// Sums over the block twice through one scratch array, as block_sum does, but without the
// barrier before the second writes: a warp that runs ahead overwrites its slot while other
// warps still read the first sum.
__global__ void between_warps(float* out) {
    __shared__ float scratch[kThreads / 32];
    unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
    float sums[2];
    for (int round = 0; round < 2; round++) {
        float v = float(round + 1);
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
        if (lane == 0) scratch[warp] = v;
        __syncthreads();
        float total = 0.0f;
        for (unsigned w = 0; w < kThreads / 32; w++) total += scratch[w];
        sums[round] = total;
    }
    out[t] = sums[0];
}

__global__ void early_exit(float* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_short(float* out) {
    if (threadIdx.x == 40) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, 1.0f, 1);
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: hazards neighbour|between-warps|early-exit|shuffle-short\n");
        return 2;
    }
    std::vector<float> out(kThreads);
    dim3 grid, block;
    block.x = kThreads;
    std::string which = argv[1];
    unsigned wrong = 0;
    if (which == "neighbour") {
        launch(grid, block, 0, neighbour, out.data());
        for (unsigned t = 1; t < kThreads; t++) wrong += out[t] != float(t - 1);
    } else if (which == "between-warps") {
        launch(grid, block, 0, between_warps, out.data());
        for (unsigned t = 0; t < kThreads; t++) wrong += out[t] != float(kThreads);
    } else if (which == "early-exit") {
        launch(grid, block, 0, early_exit, out.data());
    } else if (which == "shuffle-short") {
        launch(grid, block, 0, shuffle_short, out.data());
    } else {
        std::fprintf(stderr, "unknown case %s\n", argv[1]);
        return 2;
    }
    std::printf("%u wrong\n", wrong);
    return 0;
}
