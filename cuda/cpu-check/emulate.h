// Host emulation of the few CUDA features pipit's kernels use, so they can be checked on a
// machine without a GPU (scripts/cuda-cpu-check.sh, scripts/cuda-cpu-backend.sh). Blocks run
// one after another on the calling thread; a block's CUDA threads are fibers (coroutines with
// their own stacks) that switch only at barriers, so __syncthreads and warp shuffles cost a
// context switch, not an OS thread's wake-up. __shared__ arrays are statics, shared by the
// block running; warp shuffles go through a per-warp exchange buffer. A barrier that some
// threads never reach is reported and aborts instead of hanging.
// PIPIT_EMULATED_CUDA_ORDER=reverse runs the blocks last first, and in each block the warps
// last first, each as far as it can go (to a __syncthreads or its end) before the next one
// starts, its lanes last first between warp barriers; =shuffle does the same in orders drawn
// afresh for each block (seeded, so a run repeats). By default blocks, and threads between
// barriers, run first to last, so warps move in step. Results that change with the order show
// a missing barrier: a thread reading what another writes, in shared or global memory, before
// both have passed one; a warp running ahead of the others finds one between warps.
// Slow, and blind to timing, occupancy and memory-model effects: a check of arithmetic,
// indexing and synchronisation, not a substitute for the GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
struct dim3 { unsigned x = 1, y = 1, z = 1; };
// Plain globals: a launch runs on one OS thread, and launches never overlap.
dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// ---- Fibers: one per CUDA thread of the block running.
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *from, and
// resumes the stack `to` (saved by emu_switch itself, or laid out by emu_run_block).
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif
struct EmuFiber {
    bool done = false;
    unsigned long long block_wait = ~0ull;  // the __syncthreads phase it waits in, if any
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
};
struct EmuScheduler {
    // 32 KiB a fiber, plus three cache lines so the stacks' tops do not all share a cache set.
    static constexpr size_t kStack = 32 * 1024 + 3 * 64;
    std::vector<EmuFiber> fibers;
    std::unique_ptr<char[]> stacks;
    size_t stack_count = 0;
    EmuFiber main;  // the launching thread, resumed when every fiber is done
    // Warp by warp (PIPIT_EMULATED_CUDA_ORDER=reverse or shuffle): the warps in the order they
    // run, each warp's threads in theirs, and the running thread's place in both.
    std::vector<unsigned> warp_order;
    std::vector<std::vector<unsigned>> lane_order;
    unsigned warp_pos = 0, lane_pos = 0;
    const unsigned long long* block_phase = nullptr;  // the __syncthreads barrier's phase
    bool started = false;  // whether a fiber runs (else the launching thread does)
    unsigned current = 0, live = 0;
    unsigned long long progress = 0;  // arrivals at barriers and fibers finished
    unsigned long long progress_at_round = 0;
    const std::function<void()>* body = nullptr;
};
EmuScheduler emu_scheduler;
inline EmuScheduler& emu_sched() { return emu_scheduler; }
inline void emu_jump(EmuFiber& from, EmuFiber& to) {
#if defined(__x86_64__)
    emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from.ctx, &to.ctx);
#endif
}
// The order of blocks and threads PIPIT_EMULATED_CUDA_ORDER asks for (forward by default).
enum class EmuOrder { forward, reverse, shuffle };
inline EmuOrder emu_order() {
    static EmuOrder order = [] {
        const char* v = std::getenv("PIPIT_EMULATED_CUDA_ORDER");
        if (!v || !*v || std::strcmp(v, "forward") == 0) return EmuOrder::forward;
        if (std::strcmp(v, "reverse") == 0) return EmuOrder::reverse;
        if (std::strcmp(v, "shuffle") == 0) return EmuOrder::shuffle;
        std::fprintf(stderr, "PIPIT_EMULATED_CUDA_ORDER must be forward, reverse or shuffle, got %s\n", v);
        std::abort();
    }();
    return order;
}
std::mt19937 emu_rng(20261129);
[[noreturn]] inline void emu_deadlock(const char* who) {
    std::fprintf(stderr, "emulated CUDA: block (%u, %u): %s wait at a barrier the others never reach\n",
                 blockIdx.x, blockIdx.y, who);
    std::abort();
}
inline void emu_resume(EmuFiber& from, unsigned t) {
    EmuScheduler& s = emu_sched();
    s.started = true;
    s.current = t;
    threadIdx.x = t % blockDim.x;
    threadIdx.y = t / blockDim.x;
    emu_jump(from, s.fibers[t]);
}
// Thread by thread: switches from the running fiber straight to the next one not done, in
// thread order, wrapping round. A whole round in which no fiber arrived at a barrier or
// finished means the rest wait for threads that will never come: that is reported, and aborts.
inline void emu_next_thread(EmuFiber& from) {
    EmuScheduler& s = emu_sched();
    unsigned n = s.fibers.size(), t = s.current;
    do {
        t = !s.started || t + 1 == n ? 0 : t + 1;
        if (t == 0) {
            if (s.progress == s.progress_at_round) emu_deadlock("threads");
            s.progress_at_round = s.progress;
        }
    } while (s.fibers[t].done);
    // The one fiber left waits at a barrier: nobody else can complete it.
    if (s.started && t == s.current) emu_deadlock("a thread");
    emu_resume(from, t);
}
// Warp by warp: the running warp's next lane that can run (not done, not waiting at
// __syncthreads), wrapping round its lanes; once none can, the first lane that can of the next
// warp. A round of a warp's lanes without progress means lanes wait at a warp barrier for
// lanes gone to __syncthreads or finished; no lane able to run anywhere means the rest wait at
// __syncthreads for threads that have finished. Both are reported, and abort.
inline void emu_next_warp(EmuFiber& from) {
    EmuScheduler& s = emu_sched();
    auto can_run = [&](unsigned t) {
        const EmuFiber& f = s.fibers[t];
        return !f.done && f.block_wait != *s.block_phase;
    };
    if (s.started) {
        const std::vector<unsigned>& lanes = s.lane_order[s.warp_order[s.warp_pos]];
        unsigned m = lanes.size();
        for (unsigned k = 1; k <= m; k++) {
            unsigned l = (s.lane_pos + k) % m;
            if (l == 0) {
                if (s.progress == s.progress_at_round) emu_deadlock("lanes of a warp");
                s.progress_at_round = s.progress;
            }
            if (can_run(lanes[l])) {
                s.lane_pos = l;
                emu_resume(from, lanes[l]);
                return;
            }
        }
    }
    unsigned warps = s.warp_order.size();
    for (unsigned k = 0; k < warps; k++) {
        unsigned w = s.started ? (s.warp_pos + 1 + k) % warps : k;
        const std::vector<unsigned>& lanes = s.lane_order[s.warp_order[w]];
        for (unsigned l = 0; l < lanes.size(); l++) {
            if (can_run(lanes[l])) {
                s.warp_pos = w;
                s.lane_pos = l;
                s.progress_at_round = s.progress - 1;
                emu_resume(from, lanes[l]);
                return;
            }
        }
    }
    emu_deadlock("threads");
}
// Leaves the running fiber for the next one, or for the launching thread once none is left.
inline void emu_yield() {
    EmuScheduler& s = emu_sched();
    EmuFiber& from = s.started ? s.fibers[s.current] : s.main;
    if (s.live == 0) {
        emu_jump(from, s.main);
    } else if (emu_order() != EmuOrder::forward) {
        emu_next_warp(from);
    } else {
        emu_next_thread(from);
    }
}
[[noreturn]] inline void emu_fiber_main() {
    EmuScheduler& s = emu_sched();
    (*s.body)();
    s.fibers[s.current].done = true;
    s.live--;
    s.progress++;
    emu_yield();
    std::abort();  // a finished fiber is never resumed
}
// Runs `body` once per CUDA thread of one block of `n` threads, each a fiber switching at
// barriers.
inline void emu_run_block(unsigned n, const std::function<void()>& body) {
    EmuScheduler& s = emu_sched();
    if (s.stack_count < n) {
        s.stacks.reset(new char[n * EmuScheduler::kStack]);
        s.stack_count = n;
    }
    s.fibers.assign(n, EmuFiber{});
    s.body = &body;
    for (unsigned t = 0; t < n; t++) {
        EmuFiber& f = s.fibers[t];
        char* base = s.stacks.get() + size_t(t) * EmuScheduler::kStack;
#if defined(__x86_64__)
        // Six zeroed registers, then emu_fiber_main as the return address, then a slot where
        // its own return address would be, leaving the stack as a call would.
        uintptr_t top = (uintptr_t(base) + EmuScheduler::kStack) & ~uintptr_t(15);
        void** sp = reinterpret_cast<void**>(top - 64);
        for (int i = 0; i < 6; i++) sp[i] = nullptr;
        sp[6] = reinterpret_cast<void*>(&emu_fiber_main);
        sp[7] = nullptr;
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = base;
        f.ctx.uc_stack.ss_size = EmuScheduler::kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())emu_fiber_main, 0);
#endif
    }
    if (emu_order() != EmuOrder::forward) {
        unsigned warps = (n + 31) / 32;
        s.warp_order.resize(warps);
        std::iota(s.warp_order.begin(), s.warp_order.end(), 0u);
        s.lane_order.resize(warps);
        for (unsigned w = 0; w < warps; w++) {
            s.lane_order[w].resize(std::min(32u, n - w * 32));
            std::iota(s.lane_order[w].begin(), s.lane_order[w].end(), w * 32);
        }
        auto arrange = [](auto& v) {
            if (emu_order() == EmuOrder::reverse) std::reverse(v.begin(), v.end());
            else std::shuffle(v.begin(), v.end(), emu_rng);
        };
        arrange(s.warp_order);
        for (auto& lanes : s.lane_order) arrange(lanes);
    }
    s.live = n;
    s.started = false;  // the launching thread; its first yield starts the first fiber
    s.progress_at_round = s.progress - 1;
    emu_yield();
}
// A barrier among `expected` fibers of the running block: the block's __syncthreads, or a
// warp's (its shuffles and mma.sync).
struct EmuBarrier {
    unsigned expected = 0, arrived = 0;
    unsigned long long phase = 0;
    bool whole_block = false;
    void arrive_and_wait() {
        EmuScheduler& s = emu_sched();
        unsigned long long mine = phase;
        s.progress++;
        if (++arrived == expected) {
            arrived = 0;
            phase++;
            return;
        }
        EmuFiber& me = s.fibers[s.current];
        if (whole_block) me.block_wait = mine;
        while (phase == mine) emu_yield();
        me.block_wait = ~0ull;
    }
};
EmuBarrier emu_block_barrier;
std::vector<EmuBarrier> emu_warp_barriers;
// Exchange buffers of warp shuffles and mma.sync, two per warp: an exchange writes the one
// its warp barrier's phase parity picks, then waits once. A lane cannot reach the exchange
// after next (the same buffer) before every lane has passed the next barrier, and so has read
// this one, so one barrier per exchange is enough.
float emu_warp_buf[2][64][32];
std::vector<float> emu_dyn;
float* emu_dyn_shared;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { emu_block_barrier.arrive_and_wait(); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int off) {
    unsigned tid = threadIdx.x + threadIdx.y * blockDim.x;
    unsigned w = tid / 32, lane = tid % 32;
    unsigned p = emu_warp_barriers[w].phase & 1;
    emu_warp_buf[p][w][lane] = v;
    emu_warp_barriers[w].arrive_and_wait();
    return emu_warp_buf[p][w][lane ^ off];
}
// mma.sync.m16n8k16 (bf16 operands, f32 accumulation) for cuda/flash_attention.cu: every lane
// posts its fragments, then computes its four outputs from the whole warp's, using the PTX
// ISA's fragment layout (g = lane / 4, t = lane % 4): A element (r, k) in lane (r % 8)·4 +
// (k % 8) / 2, register r / 8 + 2·(k / 8); B element (k, n) in lane n·4 + (k % 8) / 2,
// register k / 8; the low half of a register holds the even index; C (g, 2t + e) and
// (g + 8, 2t + e) in registers e and 2 + e.
#define PIPIT_HOST_EMULATION 1
unsigned emu_mma_a[2][64][32][4], emu_mma_b[2][64][32][2];
inline float emu_half(unsigned reg, unsigned k) {
    return __uint_as_float(k % 2 ? reg & 0xffff0000u : reg << 16);
}
inline void mma_16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    unsigned tid = threadIdx.x + threadIdx.y * blockDim.x;
    unsigned w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    unsigned p = emu_warp_barriers[w].phase & 1;
    for (int i = 0; i < 4; i++) emu_mma_a[p][w][lane][i] = a[i];
    emu_mma_b[p][w][lane][0] = b0; emu_mma_b[p][w][lane][1] = b1;
    emu_warp_barriers[w].arrive_and_wait();
    for (unsigned e = 0; e < 4; e++) {
        unsigned r = g + 8 * (e / 2), n = 2 * t + e % 2;
        float acc = d[e];
        for (unsigned k = 0; k < 16; k++)
            acc += emu_half(emu_mma_a[p][w][(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k) *
                   emu_half(emu_mma_b[p][w][n * 4 + (k % 8) / 2][k / 8], k);
        d[e] = acc;
    }
}
template <class F, class... A>
void launch(dim3 grid, dim3 block, unsigned shared, F f, A... args) {
    gridDim = grid; blockDim = block;
    unsigned n = block.x * block.y;
    emu_block_barrier = EmuBarrier{n, 0, 0, true};
    emu_sched().block_phase = &emu_block_barrier.phase;
    emu_warp_barriers.assign((n + 31) / 32, EmuBarrier{});
    for (unsigned w = 0; w < emu_warp_barriers.size(); w++) emu_warp_barriers[w].expected = std::min(32u, n - w * 32);
    std::function<void()> body = [&] { f(args...); };
    unsigned long long count = (unsigned long long)grid.x * grid.y;
    std::vector<unsigned long long> shuffled;
    if (emu_order() == EmuOrder::shuffle) {
        shuffled.resize(count);
        std::iota(shuffled.begin(), shuffled.end(), 0ull);
        std::shuffle(shuffled.begin(), shuffled.end(), emu_rng);
    }
    for (unsigned long long i = 0; i < count; i++) {
        unsigned long long b = emu_order() == EmuOrder::forward ? i
                               : emu_order() == EmuOrder::reverse ? count - 1 - i
                                                                   : shuffled[i];
        blockIdx.x = unsigned(b % grid.x);
        blockIdx.y = unsigned(b / grid.x);
        // Each block finds its dynamic shared memory as NaN, not as the last block left it.
        emu_dyn.assign(shared / 4 + 1, NAN);
        emu_dyn_shared = emu_dyn.data();
        emu_run_block(n, body);
    }
}
