// A check of the emulated libraries' guard pages (libraries.cpp): a kernel that writes one float
// past the end of its buffer must be stopped, with a line naming it, while the same kernel
// kept inside the buffer runs; so must a kernel whose buffer another stream freed before it ran. Built and run by tests/cuda_emulated.rs against the libcuda.so
// that scripts/cuda-cpu-backend.sh builds; the driver calls are declared here, as pipit ships
// no CUDA headers.
//
//     overrun inside   # fills the buffer, prints "inside: ok", exits 0
//     overrun past     # writes one float past the end: the process aborts
//     overrun freed    # a second stream frees the buffer while the kernel's stream waits for
//                      # it to: the kernel then writes into freed memory, and the process aborts
#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>

extern "C" {
int cuInit(unsigned);
int cuDeviceGet(int*, int);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuMemAlloc_v2(unsigned long long*, size_t);
int cuMemFreeAsync(unsigned long long, void*);
int cuStreamCreate(void**, unsigned);
int cuLaunchHostFunc(void*, void (*)(void*), void*);
int cuMemcpyDtoH_v2(void*, unsigned long long, size_t);
int cuCtxSynchronize();
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   void*, void**, void**);
int nvrtcCreateProgram(void**, const char*, const char*, int, const char* const*, const char* const*);
int nvrtcCompileProgram(void*, int, const char* const*);
int nvrtcGetPTXSize(void*, size_t*);
int nvrtcGetPTX(void*, char*);
}

// Writes i into out[i] for i < n: n elements of a 1,024-float buffer.
static const char* kProgram = R"(
extern "C" __global__ void fill_index(float* out, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)i;
}
)";

// Host functions: the first holds up its stream until the second has run on another.
static void wait_for(void* flag) {
    while (!static_cast<std::atomic<bool>*>(flag)->load()) std::this_thread::yield();
}
static void raise_flag(void* flag) { static_cast<std::atomic<bool>*>(flag)->store(true); }

static int fail(const char* what, int code) {
    std::fprintf(stderr, "%s failed: %d\n", what, code);
    return 1;
}

int main(int argc, char** argv) {
    const char* mode = argc > 1 ? argv[1] : "inside";
    bool past = std::strcmp(mode, "past") == 0, freed = std::strcmp(mode, "freed") == 0;
    int r, device;
    void* ctx;
    if ((r = cuInit(0)) || (r = cuDeviceGet(&device, 0)) || (r = cuDevicePrimaryCtxRetain(&ctx, device)) ||
        (r = cuCtxSetCurrent(ctx)))
        return fail("context", r);
    void* prog;
    size_t size;
    if ((r = nvrtcCreateProgram(&prog, kProgram, "overrun.cu", 0, nullptr, nullptr)) ||
        (r = nvrtcCompileProgram(prog, 0, nullptr)) || (r = nvrtcGetPTXSize(prog, &size)))
        return fail("nvrtc", r);
    char image[4096];
    if (size > sizeof image || (r = nvrtcGetPTX(prog, image))) return fail("nvrtcGetPTX", r);
    void *module, *kernel;
    if ((r = cuModuleLoadData(&module, image)) || (r = cuModuleGetFunction(&kernel, module, "fill_index")))
        return fail("module", r);
    const unsigned floats = 1024;
    unsigned long long buffer;
    if ((r = cuMemAlloc_v2(&buffer, floats * sizeof(float)))) return fail("cuMemAlloc", r);
    unsigned n = past ? floats + 1 : floats;
    void* args[] = {&buffer, &n};
    void *stream = nullptr, *other = nullptr;
    std::atomic<bool> freed_first{false};
    if (freed && ((r = cuStreamCreate(&stream, 0)) || (r = cuStreamCreate(&other, 0)) ||
                  (r = cuLaunchHostFunc(stream, wait_for, &freed_first))))
        return fail("streams", r);
    if ((r = cuLaunchKernel(kernel, 5, 1, 1, 256, 1, 1, 0, stream, args, nullptr))) return fail("launch", r);
    // Nothing orders this free after the kernel: a GPU may run it first, and here it does.
    if (freed && ((r = cuMemFreeAsync(buffer, other)) || (r = cuLaunchHostFunc(other, raise_flag, &freed_first))))
        return fail("cuMemFreeAsync", r);
    if ((r = cuCtxSynchronize())) return fail("synchronize", r);
    float host[floats];
    if ((r = cuMemcpyDtoH_v2(host, buffer, sizeof host))) return fail("cuMemcpyDtoH", r);
    for (unsigned i = 0; i < floats; i++)
        if (host[i] != float(i)) return fail("the buffer's contents", int(i));
    std::printf("%s: ok\n", mode);
    return 0;
}
