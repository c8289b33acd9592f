// The CUDA driver, NVRTC, cuBLAS and NCCL entry points pipit's CUDA backend calls, emulated on
// the host, so the backend's own Rust code (cudarc calls, launch shapes, buffer sizes, the
// order of copies, NCCL groups) runs end to end on a machine without a GPU
// (scripts/cuda-cpu-backend.sh builds this file as libcuda.so, libnvrtc.so, libcublas.so and
// libnccl.so and runs the CUDA cases of the test suites against it).
//
// - Device memory is host memory. Fresh allocations are filled with 0xff bytes (NaN in f32 and
//   bf16), so a kernel that reads what nobody wrote shows it. Every copy, memset and GEMM
//   operand must lie inside a live allocation, every kernel pointer argument must point into
//   one, and freeing anything else is an error: out-of-bounds copies and double frees fail
//   loudly instead of corrupting. Each allocation ends against a guard page, so a kernel that
//   reads or writes past the end of its buffer stops there with a line naming it; freed
//   memory stays inaccessible for a while, so work that touches it after the free (on a stream
//   nothing made wait) stops the same way.
// - Every stream is a worker thread running its queue in order, so streams run side by side;
//   events mark points in a queue and cuStreamWaitEvent makes a stream's worker wait for one.
//   Work that is ordered only by the host's timing can then go wrong, as on a GPU, and does so
//   more often with PIPIT_EMULATED_CUDA_JITTER=1. Events record the host clock.
// - NVRTC "compiles" by building the program with g++ against emulate.h into a shared object
//   (cached by the source's hash); modules load it with dlopen, and cuLaunchKernel runs the
//   kernel through emulate.h's launch() on its stream, one kernel at a time process-wide.
// - cuBLAS's strided batched GEMM is a plain loop, accumulating in double.
// - PIPIT_EMULATED_GPUS=N shows N GPUs (default 1). NCCL communicators span processes
//   through files beside this library: a group's sends are written, and its receives waited
//   for, on the group's stream. Two ranks on one GPU fail once all have joined, as with NCCL.
//
// Set PIPIT_EMULATED_CUDA_TRACE=1 to log every call that is not plain arithmetic.
#include <dlfcn.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <random>
#include <thread>
#include <chrono>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <string>
#include <vector>

#ifndef PIPIT_EMULATE_DIR
#error "build with -DPIPIT_EMULATE_DIR=\"<folder of emulate.h>\""
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Shared state and helpers

bool tracing() {
    static bool on = [] {
        const char* v = std::getenv("PIPIT_EMULATED_CUDA_TRACE");
        return v && *v && std::strcmp(v, "0") != 0;
    }();
    return on;
}

// One line on stderr: "[emulated cuda] <kind><message>".
void say(const char* kind, const char* fmt, std::va_list args) {
    std::fprintf(stderr, "[emulated cuda] %s", kind);
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
}

void trace(const char* fmt, ...) {
    if (!tracing()) return;
    std::va_list args;
    va_start(args, fmt);
    say("", fmt, args);
    va_end(args);
}

// An error worth a line on stderr even without tracing: the backend did something a GPU would
// have refused or faulted on.
void complain(const char* fmt, ...) {
    std::va_list args;
    va_start(args, fmt);
    say("error: ", fmt, args);
    va_end(args);
}

// How many GPUs the emulation shows: PIPIT_EMULATED_GPUS (1 to 8), else 1.
constexpr int kMaxDevices = 8;
int device_count() {
    static int n = [] {
        const char* v = std::getenv("PIPIT_EMULATED_GPUS");
        int k = v ? std::atoi(v) : 1;
        return k < 1 ? 1 : k > kMaxDevices ? kMaxDevices : k;
    }();
    return n;
}
constexpr size_t kTotalMemory = size_t(80) << 30;

// Each allocation is its own mapping, placed so that it ends 16 bytes or less before a page
// that may not be touched (and starts a page after another): a kernel that reads or writes
// past the end of its buffer faults there, and the SIGSEGV handler below names the kernel and
// the allocation. The start stays 16-byte aligned, as wide vector loads need; an overrun that
// stays inside the rounding to 16 bytes goes unseen, and so does an underrun that stays within
// the page before the start (readable, and zero).
struct Allocation {
    uintptr_t start;
    size_t bytes;   // as asked for
    char* mapping;  // guard page, the allocation's pages, guard page
    size_t mapped;
};

std::mutex memory_lock;
std::map<uintptr_t, Allocation> allocations;  // by start
size_t allocated = 0;

size_t page_size() {
    static size_t n = size_t(sysconf(_SC_PAGESIZE));
    return n;
}

void* allocate(size_t bytes) {
    if (bytes > kTotalMemory) return nullptr;  // more than the emulated GPU has
    size_t page = page_size();
    size_t body = (std::max<size_t>(bytes, 1) + 15) & ~size_t(15);
    size_t pages = (body + page - 1) / page * page;
    size_t mapped = pages + 2 * page;
    void* m = mmap(nullptr, mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        complain("mapping %zu bytes for a device allocation: %s", mapped, std::strerror(errno));
        return nullptr;
    }
    char* mapping = static_cast<char*>(m);
    if (mprotect(mapping + page, pages, PROT_READ | PROT_WRITE) != 0) {
        complain("making a device allocation accessible: %s", std::strerror(errno));
        munmap(m, mapped);
        return nullptr;
    }
    char* p = mapping + page + pages - body;
    std::memset(p, 0xff, bytes);
    std::lock_guard<std::mutex> g(memory_lock);
    allocations[uintptr_t(p)] = Allocation{uintptr_t(p), bytes, mapping, mapped};
    allocated += bytes;
    return p;
}

// Freed allocations keep their addresses for a while, inaccessible and without memory behind
// them, so work that still touches one (a kernel on another stream that was not made to wait,
// say) faults and is named too, instead of reading whatever reused the address.
std::deque<Allocation> quarantine;
size_t quarantined = 0;  // bytes of address space
constexpr size_t kQuarantineEntries = 4096;
constexpr size_t kQuarantineBytes = size_t(64) << 30;

bool release(uintptr_t p) {
    std::lock_guard<std::mutex> g(memory_lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return false;
    Allocation a = it->second;
    allocated -= a.bytes;
    allocations.erase(it);
    madvise(a.mapping, a.mapped, MADV_DONTNEED);
    mprotect(a.mapping, a.mapped, PROT_NONE);
    quarantine.push_back(a);
    quarantined += a.mapped;
    while (quarantine.size() > kQuarantineEntries || quarantined > kQuarantineBytes) {
        munmap(quarantine.front().mapping, quarantine.front().mapped);
        quarantined -= quarantine.front().mapped;
        quarantine.pop_front();
    }
    return true;
}

// What this thread is running for the device now (a kernel, a copy, a GEMM, an NCCL group),
// for the fault handler's message. (Not initial-exec: a library loaded with dlopen has no room
// for that. A thread that set it has its block already, so the handler's read allocates nothing.)
thread_local const char* current_task = nullptr;

void run_as(const char* what, const std::function<void()>& task) {
    const char* before = current_task;
    current_task = what;
    task();
    current_task = before;
}

struct sigaction previous_segv;

// A fault inside one of the allocations' mappings (live, or freed and kept aside) is device
// work touching memory outside its buffer, or after its free: say what the faulting thread ran
// (current_task), at which byte of which allocation, then abort. Any other fault goes to the
// handler that was there before (Rust's, which reports stack overflows).
void on_segv(int sig, siginfo_t* info, void* context) {
    uintptr_t at = uintptr_t(info->si_addr);
    bool locked = false;
    for (int i = 0; i < 1000 && !(locked = memory_lock.try_lock()); i++) sched_yield();
    if (locked) {
        // The allocation (live, or freed and kept aside) whose mapping holds the address.
        auto report = [&](const Allocation& a, bool freed) {
            const char* what = current_task ? current_task : "host code";
            char line[512];
            long offset = long(at) - long(a.start);
            int n = std::snprintf(line, sizeof line,
                                  "[emulated cuda] error: %s touched byte %ld of the %zu-byte "
                                  "allocation at 0x%zx, %s\n",
                                  what, offset, a.bytes, size_t(a.start),
                                  freed ? "after it was freed" : "outside it");
            if (n > 0) (void)!write(2, line, size_t(std::min<int>(n, sizeof line - 1)));
            std::abort();
        };
        auto holds = [at](const Allocation& a) {
            return at >= uintptr_t(a.mapping) && at < uintptr_t(a.mapping) + a.mapped;
        };
        for (auto& [start, a] : allocations) {
            if (holds(a)) report(a, false);
        }
        for (auto a = quarantine.rbegin(); a != quarantine.rend(); ++a) {
            if (holds(*a)) report(*a, true);
        }
        memory_lock.unlock();
    }
    if (previous_segv.sa_handler == SIG_DFL || previous_segv.sa_handler == SIG_IGN) {
        signal(sig, SIG_DFL);  // returning faults again, now fatally
    } else if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(sig, info, context);
    } else {
        previous_segv.sa_handler(sig);
    }
}

__attribute__((constructor)) void install_segv_handler() {
    struct sigaction a = {};
    a.sa_sigaction = on_segv;
    a.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&a.sa_mask);
    sigaction(SIGSEGV, &a, &previous_segv);
}

// Whether [p, p + bytes) lies inside one live device allocation.
bool inside(uintptr_t p, size_t bytes) {
    std::lock_guard<std::mutex> g(memory_lock);
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + bytes <= it->first + it->second.bytes;
}

// Whether p is the start of a live device allocation (what may be freed).
bool is_allocation(uintptr_t p) {
    std::lock_guard<std::mutex> g(memory_lock);
    return allocations.count(p) != 0;
}

bool check_range(const char* what, uintptr_t p, size_t bytes) {
    if (bytes == 0 || inside(p, bytes)) return true;
    complain("%s: %zu bytes at 0x%zx are not inside one device allocation", what, bytes, size_t(p));
    return false;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// The 64-bit FNV-1a hash of a text: names the compiled module in the cache.
uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

// The folder holding this library: compiled modules are cached there.
std::string own_folder() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&own_folder), &info) && info.dli_fname) {
        std::string path = info.dli_fname;
        auto slash = path.rfind('/');
        if (slash != std::string::npos) return path.substr(0, slash);
    }
    return "/tmp";
}

// ---------------------------------------------------------------------------------------------
// Modules: the program built by g++ against emulate.h

// Entry points every built module exports (see module_source).
typedef void* (*BindKernel)(unsigned, unsigned, unsigned, unsigned, unsigned, void**);
typedef BindKernel (*FindKernel)(const char*);
typedef void (*RunLaunch)(void*);
typedef void (*SetPointerCheck)(bool (*)(const void*));

struct Module {
    void* handle;
    FindKernel find;
    RunLaunch run;
};

struct Function {
    std::string name, label;  // label: "kernel <name>"
    BindKernel bind;
    RunLaunch run;
};

// Pointer arguments of a kernel must point into a live allocation (or be null).
bool kernel_pointer_ok(const void* p) { return p == nullptr || inside(uintptr_t(p), 1); }

// The program as a C++ translation unit: emulate.h, the program, and for every kernel a
// trampoline that unpacks cuLaunchKernel's argument array by the kernel's own parameter types.
std::string module_source(const std::string& program) {
    std::string src = "#include \"emulate.h\"\n" + program + "\n";
    src += R"(
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>
static bool (*emu_pointer_ok)(const void*) = nullptr;
template <class A> static bool emu_arg_ok(const A& a) {
    if constexpr (std::is_pointer_v<A>) return !emu_pointer_ok || emu_pointer_ok((const void*)a);
    else return true;
}
#include <functional>
#include <tuple>
// The launch as a closure holding copies of the arguments (cuLaunchKernel's argument array is
// gone once it returns; the stream runs the launch later).
template <class... A, std::size_t... I>
static void* emu_bind(void (*f)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by,
                      unsigned shared, void** p, std::index_sequence<I...>) {
    bool ok = (emu_arg_ok(*static_cast<std::decay_t<A>*>(p[I])) && ...);
    if (!ok) { std::fprintf(stderr, "[emulated cuda] error: a pointer argument is outside every device allocation\n"); std::abort(); }
    auto args = std::make_tuple(*static_cast<std::decay_t<A>*>(p[I])...);
    return new std::function<void()>([=] {
        dim3 g, b; g.x = gx; g.y = gy; b.x = bx; b.y = by;
        std::apply([&](auto... a) { launch(g, b, shared, f, a...); }, args);
    });
}
template <class... A>
static void* emu_entry(void (*f)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by,
                       unsigned shared, void** p) {
    return emu_bind(f, gx, gy, bx, by, shared, p, std::index_sequence_for<A...>{});
}
typedef void* (*emu_kernel_t)(unsigned, unsigned, unsigned, unsigned, unsigned, void**);
struct emu_named { const char* name; emu_kernel_t run; };
static const emu_named emu_kernels[] = {
)";
    std::regex kernel(R"(extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\()");
    std::set<std::string> seen;
    for (auto it = std::sregex_iterator(program.begin(), program.end(), kernel);
         it != std::sregex_iterator(); ++it) {
        std::string name = (*it)[1];
        if (!seen.insert(name).second) continue;
        src += "    {\"" + name + "\", [](unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned s, void** p) { return emu_entry(" +
               name + ", gx, gy, bx, by, s, p); }},\n";
    }
    src += R"(};
extern "C" emu_kernel_t pipit_emulated_find(const char* name) {
    for (const auto& k : emu_kernels) if (std::strcmp(k.name, name) == 0) return k.run;
    return nullptr;
}
extern "C" void pipit_emulated_pointer_check(bool (*ok)(const void*)) { emu_pointer_ok = ok; }
extern "C" void pipit_emulated_run(void* launch) {
    auto* f = static_cast<std::function<void()>*>(launch);
    (*f)();
    delete f;
}
)";
    return src;
}

// Builds the program into a shared object (or finds it built), returning its path, or the
// compiler's messages in `log`.
bool build_module(const std::string& program, std::string& path, std::string& log) {
    std::string source = module_source(program), emulation;
    // The cache key covers emulate.h too, so a changed emulation rebuilds the module.
    if (FILE* e = std::fopen(PIPIT_EMULATE_DIR "/emulate.h", "r")) {
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, e)) > 0) emulation.append(buf, n);
        std::fclose(e);
    }
    char name[64];
    std::snprintf(name, sizeof name, "/kernels-%016llx", (unsigned long long)fnv1a(emulation + source));
    path = own_folder() + name + ".so";
    if (access(path.c_str(), R_OK) == 0) return true;
    // Processes starting at once may build the same module: each writes and compiles files of
    // its own, and the rename into place is atomic.
    static std::atomic<int> builds{0};
    std::string tmp = path + "." + std::to_string(getpid()) + "-" + std::to_string(builds++) + ".tmp";
    std::string cpp = tmp + ".cpp";
    FILE* f = std::fopen(cpp.c_str(), "w");
    if (!f) { log = "cannot write " + cpp; return false; }
    std::fwrite(source.data(), 1, source.size(), f);
    std::fclose(f);
    std::string out = tmp + ".log";
    std::string cmd = "g++ -std=c++20 -O1 -fPIC -shared -pthread -w -I'" PIPIT_EMULATE_DIR "' -o '" + tmp +
                      "' '" + cpp + "' > '" + out + "' 2>&1";
    trace("building the kernels: %s", cmd.c_str());
    int status = std::system(cmd.c_str());
    if (status != 0) {
        FILE* l = std::fopen(out.c_str(), "r");
        char buf[4096];
        size_t n;
        while (l && (n = std::fread(buf, 1, sizeof buf, l)) > 0) log.append(buf, n);
        if (l) std::fclose(l);
        std::remove(tmp.c_str());
        return false;
    }
    std::remove(cpp.c_str());
    std::remove(out.c_str());
    return std::rename(tmp.c_str(), path.c_str()) == 0;
}

std::mutex launch_lock;  // emulate.h keeps a launch's shape in globals: one kernel at a time

// ---------------------------------------------------------------------------------------------
// Streams and events

// A stream is a worker thread running its queue in order, so streams really run side by side
// and an order that only the host's timing gave shows up as wrong numbers (more often with
// PIPIT_EMULATED_CUDA_JITTER=1, which sleeps up to half a millisecond before each task).
// Events mark a point in a stream's queue; a stream told to wait for one waits in its worker.
std::mutex streams_lock;
std::condition_variable streams_moved;  // any task finished, any event reached

struct Stream;
std::set<Stream*> streams;

bool jitter() {
    static bool on = [] {
        const char* v = std::getenv("PIPIT_EMULATED_CUDA_JITTER");
        return v && *v && std::strcmp(v, "0") != 0;
    }();
    return on;
}

struct Stream {
    std::condition_variable has_work;  // this worker's own, so a push wakes it alone
    std::deque<std::function<void()>> queue;
    unsigned long long enqueued = 0, done = 0;
    Stream() {
        std::thread([this] { work(); }).detach();
        std::lock_guard<std::mutex> g(streams_lock);
        streams.insert(this);
    }
    void push(std::function<void()> task) {
        std::lock_guard<std::mutex> g(streams_lock);
        queue.push_back(std::move(task));
        enqueued++;
        has_work.notify_one();
    }
    // Waits until everything enqueued so far has run.
    void drain() {
        std::unique_lock<std::mutex> g(streams_lock);
        unsigned long long until = enqueued;
        streams_moved.wait(g, [&] { return done >= until; });
    }
    void work() {
        thread_local std::mt19937 rng(std::random_device{}());
        for (;;) {
            std::function<void()> task;
            {
                std::unique_lock<std::mutex> g(streams_lock);
                has_work.wait(g, [&] { return !queue.empty(); });
                task = std::move(queue.front());
                queue.pop_front();
            }
            if (jitter()) usleep(rng() % 500);
            task();
            std::lock_guard<std::mutex> g(streams_lock);
            done++;
            streams_moved.notify_all();
        }
    }
};

// Everything every stream was given so far has run (what the legacy default stream and the
// synchronous calls wait for).
void drain_all() {
    std::vector<Stream*> all;
    {
        std::lock_guard<std::mutex> g(streams_lock);
        all.assign(streams.begin(), streams.end());
    }
    for (Stream* s : all) s->drain();
}

// Runs `task` on stream `s` in order, or at once after every stream's work when `s` is the
// default stream (null). `what` names it in a fault's message ("kernel x", "cuMemcpyDtoD").
void enqueue(void* s, const char* what, std::function<void()> task) {
    if (s) {
        static_cast<Stream*>(s)->push([what, task = std::move(task)] { run_as(what, task); });
    } else {
        drain_all();
        run_as(what, task);
    }
}

// One cuEventRecord: reached when its stream runs it. Waits hold the record itself, not the
// event, since an event may be destroyed (and its address reused) while a wait is queued.
struct Mark {
    bool reached = false;
    double at_ms = 0;
};
struct Event {
    std::shared_ptr<Mark> latest;  // null until recorded
};

bool reached(const std::shared_ptr<Mark>& m) { return !m || m->reached; }

// Host allocations made by cuMemHostAlloc (page-locked on a GPU): copies into them are
// asynchronous; copies into other host memory finish before the call returns, as CUDA does.
std::mutex pinned_lock;
std::map<uintptr_t, size_t> pinned;
bool is_pinned(const void* p) {
    std::lock_guard<std::mutex> g(pinned_lock);
    auto it = pinned.upper_bound(uintptr_t(p));
    if (it == pinned.begin()) return false;
    --it;
    return uintptr_t(p) < it->first + it->second;
}

}  // namespace

// =============================================================================================
// The driver API

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

static int the_context[kMaxDevices];

CUresult cuGetErrorString(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "no error"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument (emulated CUDA)"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory (emulated CUDA)"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal (emulated CUDA)"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "device kernel image is invalid (emulated CUDA)"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "invalid resource handle (emulated CUDA)"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found (emulated CUDA)"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "unspecified launch failure (emulated CUDA)"; break;
        default: *s = "unknown error (emulated CUDA)"; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) { return cuGetErrorString(e, s); }

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int* n) { *n = device_count(); return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, size_t(len), "pipit host emulation");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = kTotalMemory; return CUDA_SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;             // max threads per block
        case 8: *v = 48 * 1024; break;        // shared memory per block
        case 10: *v = 32; break;              // warp size
        case 16: *v = 132; break;             // multiprocessors
        case 75: *v = 9; break;               // compute capability (an H100/H200's)
        case 76: *v = 0; break;
        case 97: *v = 227 * 1024; break;      // opt-in shared memory per block
        case 115: *v = 1; break;              // memory pools supported
        default:
            trace("cuDeviceGetAttribute(%d): answering 0", attribute);
            *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) { *ctx = &the_context[d]; return CUDA_SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
static thread_local void* current_context = nullptr;
CUresult cuCtxSetCurrent(void* ctx) { current_context = ctx; return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = current_context; return CUDA_SUCCESS; }
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = current_context ? int(static_cast<int*>(current_context) - the_context) : 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { drain_all(); return CUDA_SUCCESS; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(memory_lock);
    *total = kTotalMemory;
    *free_bytes = allocated < kTotalMemory ? kTotalMemory - allocated : 0;
    return CUDA_SUCCESS;
}

// Streams are never destroyed: their workers may still hold them (the queue is drained first,
// as cuStreamDestroy lets pending work finish).
CUresult cuStreamCreate(void** s, unsigned) { *s = new Stream; return CUDA_SUCCESS; }
CUresult cuStreamCreateWithPriority(void** s, unsigned, int) { return cuStreamCreate(s, 0); }
CUresult cuStreamDestroy_v2(void* s) {
    if (s) static_cast<Stream*>(s)->drain();
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* s) {
    if (s) static_cast<Stream*>(s)->drain();
    else drain_all();
    return CUDA_SUCCESS;
}
CUresult cuStreamQuery(void* s) {
    if (!s) return CUDA_SUCCESS;
    auto* st = static_cast<Stream*>(s);
    std::lock_guard<std::mutex> g(streams_lock);
    return st->done >= st->enqueued ? CUDA_SUCCESS : 600;  // CUDA_ERROR_NOT_READY
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    std::shared_ptr<Mark> mark;
    {
        std::lock_guard<std::mutex> g(streams_lock);
        mark = static_cast<Event*>(e)->latest;  // the latest record when the wait is enqueued
    }
    enqueue(s, "cuStreamWaitEvent", [mark] {
        std::unique_lock<std::mutex> g(streams_lock);
        streams_moved.wait(g, [&] { return reached(mark); });
    });
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(void* s, void (*f)(void*), void* data) {
    enqueue(s, "a host function", [f, data] { f(data); });
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(void** e, unsigned) { *e = new Event; return CUDA_SUCCESS; }
CUresult cuEventDestroy_v2(void* e) {
    std::lock_guard<std::mutex> g(streams_lock);
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* e, void* s) {
    auto mark = std::make_shared<Mark>();
    {
        std::lock_guard<std::mutex> g(streams_lock);
        static_cast<Event*>(e)->latest = mark;
    }
    enqueue(s, "cuEventRecord", [mark] {
        std::lock_guard<std::mutex> g(streams_lock);
        mark->at_ms = now_ms();
        mark->reached = true;
        streams_moved.notify_all();
    });
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
    std::unique_lock<std::mutex> g(streams_lock);
    std::shared_ptr<Mark> mark = static_cast<Event*>(e)->latest;
    streams_moved.wait(g, [&] { return reached(mark); });
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(void* e) {
    std::lock_guard<std::mutex> g(streams_lock);
    return reached(static_cast<Event*>(e)->latest) ? CUDA_SUCCESS : 600;  // CUDA_ERROR_NOT_READY
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    std::lock_guard<std::mutex> g(streams_lock);
    auto ma = static_cast<Event*>(a)->latest, mb = static_cast<Event*>(b)->latest;
    if (!ma || !mb) return CUDA_ERROR_INVALID_HANDLE;
    if (!ma->reached || !mb->reached) return 600;  // CUDA_ERROR_NOT_READY
    *ms = float(mb->at_ms - ma->at_ms);
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

// Memory
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = allocate(bytes);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = CUdeviceptr(m);
    trace("alloc %zu bytes at 0x%llx", bytes, *p);
    return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
static CUresult free_now(CUdeviceptr p) {
    trace("free 0x%llx", p);
    if (release(uintptr_t(p))) return CUDA_SUCCESS;
    complain("freeing 0x%llx, which is not a live allocation", p);
    return CUDA_ERROR_INVALID_VALUE;
}
// cuMemFree waits for the device's work; cuMemFreeAsync frees in stream order.
CUresult cuMemFree_v2(CUdeviceptr p) {
    drain_all();
    return free_now(p);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    if (!is_allocation(uintptr_t(p))) return free_now(p);  // the error, at once
    enqueue(s, "cuMemFreeAsync", [p] { free_now(p); });
    return CUDA_SUCCESS;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    if (!*p) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(pinned_lock);
    pinned[uintptr_t(*p)] = bytes ? bytes : 1;
    return CUDA_SUCCESS;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    drain_all();
    {
        std::lock_guard<std::mutex> g(pinned_lock);
        pinned.erase(uintptr_t(p));
    }
    std::free(p);
    return CUDA_SUCCESS;
}
CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
CUresult cuMemHostUnregister(void*) { return CUDA_SUCCESS; }

CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) { *pool = &the_context[d]; return CUDA_SUCCESS; }
CUresult cuMemPoolSetAttribute(void*, int, void*) { return CUDA_SUCCESS; }
CUresult cuMemPoolGetAttribute(void*, int, void* v) { std::memset(v, 0, 8); return CUDA_SUCCESS; }
CUresult cuMemPoolTrimTo(void*, size_t) { return CUDA_SUCCESS; }

// Memsets and copies are checked when enqueued and done in stream order; the synchronous
// forms wait for every stream first. A host source is copied when the call is made (CUDA
// stages pageable memory then too); a copy into pageable host memory is done before the call
// returns.
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* s) {
    if (!check_range("cuMemsetD8", uintptr_t(p), n)) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, "cuMemsetD8", [=] { std::memset(reinterpret_cast<void*>(p), v, n); });
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) { return cuMemsetD8Async(p, v, n, nullptr); }
CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, void* s) {
    if (!check_range("cuMemsetD32", uintptr_t(p), n * 4)) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, "cuMemsetD32", [=] {
        auto* w = reinterpret_cast<unsigned*>(p);
        for (size_t i = 0; i < n; i++) w[i] = v;
    });
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32_v2(CUdeviceptr p, unsigned v, size_t n) { return cuMemsetD32Async(p, v, n, nullptr); }

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    if (!check_range("cuMemcpyHtoD destination", uintptr_t(dst), n)) return CUDA_ERROR_INVALID_VALUE;
    auto data = std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + n);
    enqueue(s, "cuMemcpyHtoD", [dst, data] { std::memcpy(reinterpret_cast<void*>(dst), data->data(), data->size()); });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr); }
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    if (!check_range("cuMemcpyDtoH source", uintptr_t(src), n)) return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, "cuMemcpyDtoH", [=] { std::memcpy(dst, reinterpret_cast<void*>(src), n); });
    if (s && !is_pinned(dst)) static_cast<Stream*>(s)->drain();
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    if (!check_range("cuMemcpyDtoD destination", uintptr_t(dst), n) ||
        !check_range("cuMemcpyDtoD source", uintptr_t(src), n))
        return CUDA_ERROR_INVALID_VALUE;
    enqueue(s, "cuMemcpyDtoD", [=] { std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n); });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); }
CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n, void* s) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, s);
}
CUresult cuMemcpyPeer(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n) { return cuMemcpyDtoD_v2(dst, src, n); }

// Modules and launches. The "image" is what nvrtcGetPTX returned: a line naming the built
// shared object.
static const char kImagePrefix[] = "// pipit emulated module: ";

CUresult cuModuleLoadData(void** module, const void* image) {
    const char* text = static_cast<const char*>(image);
    size_t prefix = sizeof kImagePrefix - 1;
    if (std::strncmp(text, kImagePrefix, prefix) != 0) {
        complain("cuModuleLoadData: the image did not come from the emulated NVRTC");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    std::string path(text + prefix);
    while (!path.empty() && (path.back() == '\n' || path.back() == '\0')) path.pop_back();
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        complain("loading %s: %s", path.c_str(), dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto find = reinterpret_cast<FindKernel>(dlsym(handle, "pipit_emulated_find"));
    auto check = reinterpret_cast<SetPointerCheck>(dlsym(handle, "pipit_emulated_pointer_check"));
    auto run = reinterpret_cast<RunLaunch>(dlsym(handle, "pipit_emulated_run"));
    if (!find || !check || !run) return CUDA_ERROR_INVALID_IMAGE;
    check(kernel_pointer_ok);
    *module = new Module{handle, find, run};
    trace("loaded %s", path.c_str());
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void* module) { delete static_cast<Module*>(module); return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    auto* m = static_cast<Module*>(module);
    BindKernel bind = m->find(name);
    if (!bind) return CUDA_ERROR_NOT_FOUND;
    *f = new Function{name, std::string("kernel ") + name, bind, m->run};
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attribute, void*) {
    switch (attribute) {
        case 0: *v = 1024; break;  // max threads per block
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }
CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
    auto* fn = static_cast<Function*>(f);
    if (extra) { complain("%s: launched with `extra`, which the emulation does not take", fn->name.c_str()); return CUDA_ERROR_NOT_SUPPORTED; }
    if (gz != 1 || bz != 1) { complain("%s: a z dimension (grid %u, block %u) the emulation does not take", fn->name.c_str(), gz, bz); return CUDA_ERROR_NOT_SUPPORTED; }
    if (gx == 0 || gy == 0 || bx == 0 || by == 0 || bx > 1024 || by > 1024 || bx * by > 1024 ||
        gy > 65535 || gx > 0x7fffffffu) {
        complain("%s: invalid launch shape grid (%u, %u), block (%u, %u)", fn->name.c_str(), gx, gy, bx, by);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (shared > 227 * 1024) { complain("%s: %u bytes of dynamic shared memory", fn->name.c_str(), shared); return CUDA_ERROR_INVALID_VALUE; }
    trace("launch %s grid (%u, %u) block (%u, %u) shared %u", fn->name.c_str(), gx, gy, bx, by, shared);
    void* bound = fn->bind(gx, gy, bx, by, shared, params);
    RunLaunch run = fn->run;
    enqueue(stream, fn->label.c_str(), [run, bound] {  // functions are never freed
        std::lock_guard<std::mutex> g(launch_lock);
        run(bound);
    });
    return CUDA_SUCCESS;
}

// =============================================================================================
// NVRTC

typedef int nvrtcResult;
struct Program {
    std::string source, image, log;
};

const char* nvrtcGetErrorString(nvrtcResult r) {
    return r == 0 ? "NVRTC_SUCCESS" : r == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR (emulated)";
}
nvrtcResult nvrtcVersion(int* major, int* minor) { *major = 13; *minor = 0; return 0; }
nvrtcResult nvrtcCreateProgram(void** prog, const char* src, const char*, int headers, const char* const*,
                               const char* const*) {
    if (headers != 0) return 3;  // NVRTC_ERROR_INVALID_INPUT: pipit passes no headers
    *prog = new Program{src, "", ""};
    return 0;
}
nvrtcResult nvrtcDestroyProgram(void** prog) { delete static_cast<Program*>(*prog); *prog = nullptr; return 0; }
nvrtcResult nvrtcCompileProgram(void* prog, int n, const char* const* options) {
    auto* p = static_cast<Program*>(prog);
    for (int i = 0; i < n; i++) trace("nvrtc option %s", options[i]);
    std::string path;
    if (!build_module(p->source, path, p->log)) return 6;  // NVRTC_ERROR_COMPILATION
    p->image = std::string(kImagePrefix) + path + "\n";
    return 0;
}
nvrtcResult nvrtcGetPTXSize(void* prog, size_t* n) { *n = static_cast<Program*>(prog)->image.size() + 1; return 0; }
nvrtcResult nvrtcGetPTX(void* prog, char* out) {
    auto* p = static_cast<Program*>(prog);
    std::memcpy(out, p->image.c_str(), p->image.size() + 1);
    return 0;
}
nvrtcResult nvrtcGetProgramLogSize(void* prog, size_t* n) { *n = static_cast<Program*>(prog)->log.size() + 1; return 0; }
nvrtcResult nvrtcGetProgramLog(void* prog, char* out) {
    auto* p = static_cast<Program*>(prog);
    std::memcpy(out, p->log.c_str(), p->log.size() + 1);
    return 0;
}

// =============================================================================================
// cuBLAS

typedef int cublasStatus_t;
struct Blas {
    void* stream = nullptr;
};

cublasStatus_t cublasCreate_v2(void** h) { *h = new Blas; return 0; }
cublasStatus_t cublasDestroy_v2(void* h) { delete static_cast<Blas*>(h); return 0; }
cublasStatus_t cublasSetStream_v2(void* h, void* s) { static_cast<Blas*>(h)->stream = s; return 0; }
cublasStatus_t cublasGetStream_v2(void* h, void** s) { *s = static_cast<Blas*>(h)->stream; return 0; }
cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
cublasStatus_t cublasGetMathMode(void*, int* m) { *m = 0; return 0; }
cublasStatus_t cublasSetPointerMode_v2(void*, int mode) { return mode == 0 ? 0 : 15; }
const char* cublasGetStatusString(cublasStatus_t s) { return s == 0 ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_ERROR (emulated)"; }
const char* cublasGetStatusName(cublasStatus_t s) { return cublasGetStatusString(s); }

static float load_as_f32(const void* base, int type, long long i) {
    if (type == 0) return static_cast<const float*>(base)[i];
    unsigned bits = unsigned(static_cast<const unsigned short*>(base)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static void store_from_f32(void* base, int type, long long i, float v) {
    if (type == 0) { static_cast<float*>(base)[i] = v; return; }
    unsigned x;
    std::memcpy(&x, &v, 4);
    unsigned short bits;
    if ((x & 0x7fffffffu) > 0x7f800000u) bits = (unsigned short)((x >> 16) | 0x40u);
    else bits = (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    static_cast<unsigned short*>(base)[i] = bits;
}

// Column-major C = alpha·op(A)·op(B) + beta·C for each of `batch` operand triples; C is not
// read when beta is 0, as cuBLAS promises.
cublasStatus_t cublasGemmStridedBatchedEx(void* handle, int ta, int tb, int m, int n, int k, const void* alpha,
                                          const void* A, int at, int lda, long long sa, const void* B, int bt,
                                          int ldb, long long sb, const void* beta, void* C, int ct, int ldc,
                                          long long sc, int batch, int compute, int) {
    if (compute != 68 && compute != 69) { complain("GEMM compute type %d (pipit asks for CUBLAS_COMPUTE_32F)", compute); return 15; }
    for (int t : {at, bt, ct})
        if (t != 0 && t != 14) { complain("GEMM data type %d", t); return 15; }
    if (m < 0 || n < 0 || k < 0 || batch < 0) return 7;
    int a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
    if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m)) {
        complain("GEMM leading dimensions lda %d ldb %d ldc %d for m %d n %d k %d", lda, ldb, ldc, m, n, k);
        return 7;
    }
    if (m == 0 || n == 0 || batch == 0) return 0;
    size_t ea = at ? 2 : 4, eb = bt ? 2 : 4, ec = ct ? 2 : 4;
    auto span = [](long long stride, int batch, int ld, int rows, int cols) {
        return size_t((batch - 1) * stride + (long long)ld * (cols - 1) + rows);
    };
    if ((k > 0 && (!check_range("GEMM operand A", uintptr_t(A), span(sa, batch, lda, a_rows, a_cols) * ea) ||
                   !check_range("GEMM operand B", uintptr_t(B), span(sb, batch, ldb, b_rows, b_cols) * eb))) ||
        !check_range("GEMM operand C", uintptr_t(C), span(sc, batch, ldc, m, n) * ec))
        return 7;
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    enqueue(static_cast<Blas*>(handle)->stream, "cublasGemmStridedBatchedEx", [=] {
    for (int b = 0; b < batch; b++)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double acc = 0;
                for (int l = 0; l < k; l++) {
                    long long ia = ta ? l + (long long)i * lda : i + (long long)l * lda;
                    long long ib = tb ? j + (long long)l * ldb : l + (long long)j * ldb;
                    acc += double(load_as_f32(A, at, b * sa + ia)) * load_as_f32(B, bt, b * sb + ib);
                }
                long long ic = b * sc + i + (long long)j * ldc;
                double v = al * acc;
                if (be != 0) v += double(be) * load_as_f32(C, ct, ic);
                store_from_f32(C, ct, ic, float(v));
            }
    });
    return 0;
}

// =============================================================================================
// NCCL

typedef int ncclResult_t;
struct ncclUniqueId {
    char internal[128];
};
struct Pending {
    bool send;
    int peer;
    uintptr_t buffer;
    size_t bytes;
    void* stream;
};
// A communicator. Ranks are processes (or threads) meeting through files beside this library,
// named by the unique id: "<id>-rank<r>" says rank r joined and on which GPU, and "<id>-<from>to<to>-<n>" is
// the n-th message between two ranks, written whole under another name and renamed into place.
struct Comm {
    int ranks, rank, device;
    std::string tag;
    std::atomic<bool> aborted{false}, failed{false};
    std::vector<unsigned long long> sent, received;  // messages so far, per peer
};

static thread_local int group_depth = 0;
static thread_local std::vector<std::pair<Comm*, Pending>> pending;

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case 0: return "no error";
        case 2: return "unhandled system error (emulated NCCL)";
        case 4: return "invalid argument (emulated NCCL)";
        case 5: return "invalid usage (emulated NCCL)";
        case 6: return "remote process exited or there was a network error (emulated NCCL)";
        default: return "error (emulated NCCL)";
    }
}
const char* ncclGetLastError(void*) { return ""; }
ncclResult_t ncclGetVersion(int* v) { *v = 22800; return 0; }
ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    std::memset(id->internal, 0, sizeof id->internal);
    static std::atomic<int> made{0};
    std::snprintf(id->internal, sizeof id->internal, "pipit-emulated-nccl-%d-%lld-%d", int(getpid()),
                  (long long)now_ms(), made++);
    return 0;
}

static std::string slurp(const std::string& path) {
    std::string text;
    if (FILE* f = std::fopen(path.c_str(), "rb")) {
        char buf[1 << 16];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
        std::fclose(f);
    }
    return text;
}
static bool put_file(const std::string& path, const void* data, size_t bytes) {
    std::string tmp = path + ".part";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) return false;
    bool ok = std::fwrite(data, 1, bytes, f) == bytes;
    ok = std::fclose(f) == 0 && ok;
    return ok && std::rename(tmp.c_str(), path.c_str()) == 0;
}

// As NCCL does, a rank waits until all have joined; ranks sharing a GPU then fail with
// ncclInvalidUsage, NCCL's answer to two ranks on one GPU.
ncclResult_t ncclCommInitRank(void** comm, int ranks, ncclUniqueId id, int rank) {
    if (ranks < 1 || rank < 0 || rank >= ranks) return 4;
    int device = 0;
    cuCtxGetDevice(&device);
    auto* c = new Comm;
    c->ranks = ranks;
    c->rank = rank;
    c->device = device;
    c->tag = own_folder() + "/" + std::string(id.internal, strnlen(id.internal, sizeof id.internal));
    c->sent.assign(ranks, 0);
    c->received.assign(ranks, 0);
    if (ranks > 1) {
        auto joined = [&](int r) { return c->tag + "-rank" + std::to_string(r); };
        std::string mine = std::to_string(device);
        put_file(joined(rank), mine.data(), mine.size());
        trace("ncclCommInitRank: rank %d of %d (GPU %d) waits for the others", rank, ranks, device);
        std::set<int> devices;
        for (int r = 0; r < ranks; r++) {
            while (access(joined(r).c_str(), F_OK) != 0) usleep(20000);
            if (!devices.insert(std::atoi(slurp(joined(r)).c_str())).second) {
                complain("ncclCommInitRank: two ranks on GPU %s (NCCL: duplicate GPU detected)",
                         slurp(joined(r)).c_str());
                delete c;
                return 5;
            }
        }
    }
    *comm = c;
    return 0;
}
// Join files stay (beside the library, in the build folder): a rank still joining may need
// to read the file of one that has already finished.
ncclResult_t ncclCommAbort(void* comm) { static_cast<Comm*>(comm)->aborted = true; return 0; }
ncclResult_t ncclCommDestroy(void* comm) { delete static_cast<Comm*>(comm); return 0; }
ncclResult_t ncclCommFinalize(void*) { return 0; }
ncclResult_t ncclCommGetAsyncError(void* comm, ncclResult_t* r) {
    auto* c = static_cast<Comm*>(comm);
    *r = c->failed ? 6 : c->aborted ? 2 : 0;
    return 0;
}
ncclResult_t ncclCommCount(void* comm, int* n) { *n = static_cast<Comm*>(comm)->ranks; return 0; }
ncclResult_t ncclCommUserRank(void* comm, int* r) { *r = static_cast<Comm*>(comm)->rank; return 0; }

static size_t nccl_size(int type) {
    switch (type) {
        case 0: case 1: case 10: case 11: return 1;
        case 6: case 9: return 2;
        case 4: case 5: case 8: return 8;
        default: return 4;
    }
}

static std::string message(const Comm& c, int from, int to, unsigned long long n) {
    return c.tag + "-" + std::to_string(from) + "to" + std::to_string(to) + "-" + std::to_string(n);
}

// Carries out a group's operations, on their stream: every send is written first, then every
// receive waits for its message (in the order posted per peer, as NCCL pairs them). A receive
// gives up after PIPIT_EMULATED_NCCL_TIMEOUT seconds (default 60) or when the communicator is
// aborted, and the communicator reports the failure (ncclCommGetAsyncError).
static ncclResult_t run_group(std::vector<std::pair<Comm*, Pending>>& ops) {
    for (auto& [c, op] : ops) {
        if (c->aborted) return 2;
        if (!op.send) continue;
        std::string path = message(*c, c->rank, op.peer, c->sent[op.peer]++);
        if (!put_file(path, reinterpret_cast<void*>(op.buffer), op.bytes)) {
            complain("ncclSend: cannot write %s", path.c_str());
            return 2;
        }
    }
    static double limit_ms = [] {
        const char* v = std::getenv("PIPIT_EMULATED_NCCL_TIMEOUT");
        return (v ? std::atof(v) : 60.0) * 1e3;
    }();
    for (auto& [c, op] : ops) {
        if (op.send) continue;
        std::string path = message(*c, op.peer, c->rank, c->received[op.peer]++);
        double start = now_ms();
        while (access(path.c_str(), F_OK) != 0) {
            if (c->aborted) return 2;
            if (now_ms() - start > limit_ms) {
                complain("ncclRecv: nothing from rank %d after %.0f s", op.peer, limit_ms / 1e3);
                return 6;
            }
            usleep(2000);
        }
        std::string data = slurp(path);
        std::remove(path.c_str());
        if (data.size() != op.bytes) {
            complain("ncclRecv of %zu bytes met ncclSend of %zu bytes", op.bytes, data.size());
            return 5;
        }
        std::memcpy(reinterpret_cast<void*>(op.buffer), data.data(), data.size());
    }
    return 0;
}

// Runs the group's operations on their stream (the first's: pipit puts a group on one).
static ncclResult_t enqueue_group(std::vector<std::pair<Comm*, Pending>> ops) {
    if (ops.empty()) return 0;
    for (auto& [c, op] : ops)
        if (c->aborted) return 2;
    void* stream = ops.front().second.stream;
    enqueue(stream, "an NCCL group", [ops]() mutable {
        if (run_group(ops) != 0)
            for (auto& entry : ops) entry.first->failed = true;
    });
    return 0;
}

ncclResult_t ncclGroupStart() { group_depth++; return 0; }
ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) return 5;
    if (--group_depth > 0) return 0;
    std::vector<std::pair<Comm*, Pending>> ops;
    ops.swap(pending);
    return enqueue_group(std::move(ops));
}

static ncclResult_t post(bool send, const void* buf, size_t count, int type, int peer, void* comm, void* stream) {
    auto* c = static_cast<Comm*>(comm);
    if (c->aborted) return 2;
    if (peer < 0 || peer >= c->ranks) { complain("peer %d in a communicator of %d ranks", peer, c->ranks); return 4; }
    size_t bytes = count * nccl_size(type);
    if (!check_range(send ? "ncclSend buffer" : "ncclRecv buffer", uintptr_t(buf), bytes)) return 4;
    Pending op{send, peer, uintptr_t(buf), bytes, stream};
    if (group_depth > 0) {
        pending.push_back({c, op});
        return 0;
    }
    if (peer == c->rank) {
        complain("%s to self outside a group: NCCL would hang", send ? "ncclSend" : "ncclRecv");
        return 5;
    }
    return enqueue_group({{c, op}});
}
ncclResult_t ncclSend(const void* buf, size_t count, int type, int peer, void* comm, void* stream) {
    return post(true, buf, count, type, peer, comm, stream);
}
ncclResult_t ncclRecv(void* buf, size_t count, int type, int peer, void* comm, void* stream) {
    return post(false, buf, count, type, peer, comm, stream);
}

}  // extern "C"
