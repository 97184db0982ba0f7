// The CUDA a kernel file needs, for the host C++ compiler: the CPU emulation of tests/helpers/kernel_emulation.py
// compiles the exact kernel source (qlorakit.kernels.sources.kernel_source) with `g++ -include` this file and
// runs every thread of every block on the CPU.
//
// Execution model. Blocks are spread over OS threads. Within a block each CUDA thread is a fiber (ucontext)
// with its own stack; the block's fibers run one at a time on one OS thread, in a shuffled order, each until
// it finishes or reaches a barrier. __syncthreads() waits for every thread of the block that has not exited; a warp
// primitive (__shfl*_sync, __syncwarp, votes) waits for every live lane of the warp, exchanging values through
// per-warp slots. Between barriers any interleaving is a valid CUDA schedule for race-free code, so a kernel
// whose result depends on the order found here is wrong on the GPU too. A barrier that can never complete
// (a thread waiting while the others exited or wait elsewhere) fails the launch with a message, as a hang
// would on the GPU.
//
// __shared__ variables are per-OS-thread statics, i.e. one instance per running block. Dynamic shared memory
// (extern __shared__) is not supported. Floating point: IEEE float/double without fused multiply-add
// contraction (the build uses -ffp-contract=off) and without flush-to-zero, so qk_mul_rn etc. round exactly as
// the PTX of cuda/qlorakit_device.cuh does.

#pragma once

#define QLORAKIT_HOST_EMULATION 1

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- vector types and built-in index variables

#define QK_VEC2(name, T, align)                                                        \
    struct alignas(align) name {                                                       \
        T x, y;                                                                        \
    };                                                                                 \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define QK_VEC4(name, T, align)                                                        \
    struct alignas(align) name {                                                       \
        T x, y, z, w;                                                                  \
    };                                                                                 \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

QK_VEC2(uchar2, unsigned char, 2)
QK_VEC4(uchar4, unsigned char, 4)
QK_VEC2(ushort2, unsigned short, 4)
QK_VEC4(ushort4, unsigned short, 8)
QK_VEC2(int2, int, 8)
QK_VEC4(int4, int, 16)
QK_VEC2(uint2, unsigned int, 8)
QK_VEC4(uint4, unsigned int, 16)
QK_VEC2(float2, float, 8)
QK_VEC4(float4, float, 16)
QK_VEC2(double2, double, 16)
QK_VEC2(longlong2, long long, 16)
QK_VEC2(ulonglong2, unsigned long long, 16)

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- bit casts and arithmetic intrinsics

template <class To, class From>
inline To qk_bit_cast(From from) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
    To to;
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

inline unsigned int __float_as_uint(float x) { return qk_bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return qk_bit_cast<float>(x); }
inline int __float_as_int(float x) { return qk_bit_cast<int>(x); }
inline float __int_as_float(int x) { return qk_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return qk_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return qk_bit_cast<double>(x); }

// Host float arithmetic is IEEE round-to-nearest-even; with contraction off each of these rounds once.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : a); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// CUDA's same-type min/max overloads (a mixed-type call is ambiguous here: better an error than a silent
// conversion that the device would not do).
#define QK_MINMAX(T)                                      \
    inline T min(T a, T b) { return b < a ? b : a; }      \
    inline T max(T a, T b) { return a < b ? b : a; }
QK_MINMAX(int)
QK_MINMAX(unsigned int)
QK_MINMAX(long long)
QK_MINMAX(unsigned long long)
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- what cuda/qlorakit_device.cuh implements in PTX on the device

inline float qk_mul_rn(float a, float b) { return a * b; }
inline float qk_add_rn(float a, float b) { return a + b; }

// cvt.rn.bf16.f32: round to nearest-even on the upper 16 bits; NaN stays NaN (quiet).
inline unsigned short qk_f32_to_bf16(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

// cvt.rn.f16.f32: round to nearest-even, with half subnormals, overflow to infinity.
inline unsigned short qk_f32_to_f16(float x) {
    const unsigned int u = __float_as_uint(x);
    const unsigned int sign = (u >> 16) & 0x8000u;
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);  // NaN
    if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a <= 0x33000000u) return static_cast<unsigned short>(sign);           // <= 2^-25 rounds to 0
    if (a < 0x38800000u) {  // below 2^-14: a half subnormal, units of 2^-24
        const unsigned int exponent = a >> 23;
        const unsigned int mantissa = (a & 0x7fffffu) | 0x800000u;
        const unsigned int shift = 126u - exponent;  // 14..24
        unsigned int q = mantissa >> shift;
        const unsigned int rest = mantissa & ((1u << shift) - 1u);
        const unsigned int half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (q & 1u))) ++q;
        return static_cast<unsigned short>(sign | q);
    }
    unsigned int r = a - (112u << 23);  // rebias the exponent (127 -> 15)
    r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return static_cast<unsigned short>(sign | r);
}

inline unsigned int qk_pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned int>(qk_f32_to_bf16(lo)) | (static_cast<unsigned int>(qk_f32_to_bf16(hi)) << 16);
}

inline unsigned int qk_pack_f16x2(float lo, float hi) {
    return static_cast<unsigned int>(qk_f32_to_f16(lo)) | (static_cast<unsigned int>(qk_f32_to_f16(hi)) << 16);
}

inline float qk_f16_to_f32(unsigned short h) {
    const unsigned int sign = static_cast<unsigned int>(h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1fu;
    const unsigned int mantissa = h & 0x3ffu;
    if (exponent == 0) {
        const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // exact
        return __uint_as_float(sign | __float_as_uint(magnitude));
    }
    if (exponent == 31) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// ---- the runtime: fibers, barriers, warp exchange

namespace qlorakit_emu {

enum class State { Ready, WaitBlock, WaitWarp, Done };

struct Fiber {
    ucontext_t context;
    State state;
    uint3 index;
    unsigned int linear;
};

struct Warp {
    unsigned long long slots[32];
};

struct Worker {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    char* stacks = nullptr;
    size_t stack_bytes = 0;
    size_t stacks_len = 0;
    unsigned int current = 0;
    std::string* error = nullptr;
    void (*entry)(void*) = nullptr;
    void* entry_arg = nullptr;
};

inline thread_local Worker* worker = nullptr;

constexpr size_t kStackBytes = 256 * 1024;

inline Fiber& self() { return worker->fibers[worker->current]; }
inline unsigned int lane_id() { return self().linear & 31u; }
inline Warp& own_warp() { return worker->warps[self().linear >> 5]; }

// Records the launch's first error (reported when the launch returns; the kernel runs on).
inline void fail(const std::string& message) {
    if (worker->error->empty()) *worker->error = message;
}

inline void wait(State state) {
    Fiber& fiber = self();
    fiber.state = state;
    swapcontext(&fiber.context, &worker->scheduler);
}

inline void fiber_main() {
    worker->entry(worker->entry_arg);
    self().state = State::Done;  // uc_link returns to the scheduler
}

// Runs one block: every fiber until it is done, releasing barriers once all their live threads arrived.
// Fibers run in a shuffled order (seeded by the block index, so runs repeat): a missing barrier, where a
// thread reads what another has not written yet, then shows up whatever the threads' numbering.
inline bool run_block(Worker& w, unsigned int threads, unsigned long long block, std::string& error) {
    const unsigned int warps = (threads + 31u) / 32u;
    std::vector<unsigned int> order(threads);
    std::iota(order.begin(), order.end(), 0u);
    std::mt19937_64 random(block * 0x9e3779b97f4a7c15ull + 1u);
    std::shuffle(order.begin(), order.end(), random);
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = w.fibers[t];
        f.linear = t;
        f.index = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
        f.state = State::Ready;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = w.stacks + t * w.stack_bytes + static_cast<size_t>(getpagesize());
        f.context.uc_stack.ss_size = w.stack_bytes - static_cast<size_t>(getpagesize());
        f.context.uc_link = &w.scheduler;
        makecontext(&f.context, fiber_main, 0);
    }
    unsigned int done = 0;
    while (done < threads) {
        bool ran = false;
        for (unsigned int t : order) {
            if (w.fibers[t].state != State::Ready) continue;
            w.current = t;
            threadIdx = w.fibers[t].index;
            swapcontext(&w.scheduler, &w.fibers[t].context);  // back when it waits or has finished
            ran = true;
            if (w.fibers[t].state == State::Done) ++done;
        }
        if (done == threads) break;
        bool released = false;
        unsigned int at_block = 0;
        for (unsigned int t = 0; t < threads; ++t) at_block += w.fibers[t].state == State::WaitBlock;
        if (at_block > 0 && at_block == threads - done) {
            for (unsigned int t = 0; t < threads; ++t)
                if (w.fibers[t].state == State::WaitBlock) w.fibers[t].state = State::Ready;
            released = true;
        }
        for (unsigned int k = 0; k < warps && !released; ++k) {
            const unsigned int begin = k * 32u, end = std::min(threads, begin + 32u);
            unsigned int live = 0, waiting = 0;
            for (unsigned int t = begin; t < end; ++t) {
                live += w.fibers[t].state != State::Done;
                waiting += w.fibers[t].state == State::WaitWarp;
            }
            if (waiting > 0 && waiting == live) {
                for (unsigned int t = begin; t < end; ++t)
                    if (w.fibers[t].state == State::WaitWarp) w.fibers[t].state = State::Ready;
                released = true;
            }
        }
        if (!ran && !released) {
            error = "deadlock: threads wait at a barrier that the other threads of their block or warp never reach";
            return false;
        }
    }
    return true;
}

inline void prepare(Worker& w, unsigned int threads) {
    const size_t page = static_cast<size_t>(getpagesize());
    w.stack_bytes = kStackBytes;
    w.stacks_len = w.stack_bytes * threads;
    void* memory = mmap(nullptr, w.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) {
        w.stacks = nullptr;
        return;
    }
    w.stacks = static_cast<char*>(memory);
    // A guard page below each stack: an overflow faults instead of corrupting the neighbour's stack.
    for (unsigned int t = 0; t < threads; ++t) mprotect(w.stacks + t * w.stack_bytes, page, PROT_NONE);
    w.fibers.assign(threads, Fiber{});
    w.warps.assign((threads + 31u) / 32u, Warp{});
}

inline void release(Worker& w) {
    if (w.stacks != nullptr) munmap(w.stacks, w.stacks_len);
    w.stacks = nullptr;
}

struct Launch {
    dim3 grid, block;
    void (*entry)(void*);
    void* entry_arg;
};

// Runs blocks first, first + stride, ... of the grid on the calling OS thread.
inline void run_blocks(const Launch& launch, unsigned long long first, unsigned long long stride, std::string& error) {
    const unsigned int threads = launch.block.x * launch.block.y * launch.block.z;
    Worker w;
    prepare(w, threads);
    if (w.stacks == nullptr) {
        error = "could not allocate fiber stacks";
        return;
    }
    w.entry = launch.entry;
    w.entry_arg = launch.entry_arg;
    w.error = &error;
    worker = &w;
    gridDim = launch.grid;
    blockDim = launch.block;
    const unsigned long long blocks =
        static_cast<unsigned long long>(launch.grid.x) * launch.grid.y * launch.grid.z;
    for (unsigned long long b = first; b < blocks && error.empty(); b += stride) {
        blockIdx = uint3{static_cast<unsigned int>(b % launch.grid.x),
                         static_cast<unsigned int>((b / launch.grid.x) % launch.grid.y),
                         static_cast<unsigned int>(b / (static_cast<unsigned long long>(launch.grid.x) * launch.grid.y))};
        if (!run_block(w, threads, b, error)) break;
    }
    worker = nullptr;
    release(w);
}

template <class... P, size_t... I>
inline void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<P>*>(args[I])...);
}

template <class... P>
struct Bound {
    void (*kernel)(P...);
    void** args;
    static void invoke(void* self) {
        auto* bound = static_cast<Bound*>(self);
        call(bound->kernel, bound->args, std::index_sequence_for<P...>{});
    }
};

// Parameter kinds reported to Python so it can check the arguments: 0 pointer, 1 signed integer,
// 2 unsigned integer, 3 floating point, 4 anything else.
template <class T>
constexpr int kind() {
    return std::is_pointer<T>::value          ? 0
           : std::is_floating_point<T>::value ? 3
           : std::is_signed<T>::value         ? 1
           : std::is_unsigned<T>::value       ? 2
                                              : 4;
}

template <class... P>
inline int describe(void (*)(P...), int* kinds, int* sizes, int capacity) {
    const int k[] = {kind<P>()..., 0};
    const int s[] = {static_cast<int>(sizeof(P))..., 0};
    const int count = static_cast<int>(sizeof...(P));
    for (int i = 0; i < count && i < capacity; ++i) {
        kinds[i] = k[i];
        sizes[i] = s[i];
    }
    return count;
}

// CUDA's kernelParams convention: args[i] points to the value of parameter i.
template <class... P>
inline int launch(void (*kernel)(P...), const unsigned int* grid, const unsigned int* block, void** args,
                  unsigned int shared_mem, int workers, char* message, int message_len) {
    if (shared_mem != 0) {
        std::snprintf(message, message_len, "dynamic shared memory is not emulated");
        return 1;
    }
    Bound<P...> bound{kernel, args};
    Launch launch{dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, &Bound<P...>::invoke, &bound};
    const unsigned long long blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    const unsigned int n = static_cast<unsigned int>(std::max(1ull, std::min<unsigned long long>(workers, blocks)));
    std::vector<std::string> errors(n);
    std::vector<std::thread> threads;
    for (unsigned int i = 1; i < n; ++i) threads.emplace_back(run_blocks, std::cref(launch), i, n, std::ref(errors[i]));
    run_blocks(launch, 0, n, errors[0]);
    for (auto& t : threads) t.join();
    for (const auto& e : errors) {
        if (!e.empty()) {
            std::snprintf(message, message_len, "%s", e.c_str());
            return 1;
        }
    }
    return 0;
}

}  // namespace qlorakit_emu

// ---- synchronization and warp primitives

inline void __syncthreads() { qlorakit_emu::wait(qlorakit_emu::State::WaitBlock); }

inline unsigned int __activemask() {
    using namespace qlorakit_emu;
    const unsigned int base = self().linear & ~31u;
    unsigned int mask = 0;
    for (unsigned int l = 0; l < 32 && base + l < worker->fibers.size(); ++l)
        if (worker->fibers[base + l].state != State::Done) mask |= 1u << l;
    return mask;
}

// Every live lane publishes its value, waits for the warp, reads the source lane's value, waits again (so no
// lane overwrites its slot before all have read).
// A lane named in a warp primitive's mask must take part: one that has exited is an error on the GPU too.
inline void check_mask(unsigned int mask) {
    using namespace qlorakit_emu;
    const unsigned int base = self().linear & ~31u;
    for (unsigned int l = 0; l < 32; ++l) {
        if (!(mask & (1u << l))) continue;
        if (base + l >= worker->fibers.size() || worker->fibers[base + l].state == State::Done) {
            fail("warp primitive with mask " + std::to_string(mask) + ": lane " + std::to_string(l) +
                 " of warp " + std::to_string(base / 32) + " has exited or does not exist");
            return;
        }
    }
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    qlorakit_emu::wait(qlorakit_emu::State::WaitWarp);
    check_mask(mask);
}

template <class T>
inline T qk_exchange(unsigned int mask, T value, unsigned int source_lane) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
    using namespace qlorakit_emu;
    Warp& warp = own_warp();
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    warp.slots[lane_id()] = bits;
    wait(State::WaitWarp);
    check_mask(mask);  // after the barrier: every lane that will ever arrive has
    bits = warp.slots[source_lane & 31u];
    wait(State::WaitWarp);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

template <class T>
inline T __shfl_sync(unsigned int mask, T value, int src_lane, int width = 32) {
    const unsigned int lane = qlorakit_emu::lane_id();
    const unsigned int base = lane & ~static_cast<unsigned int>(width - 1);
    return qk_exchange(mask, value, base + (static_cast<unsigned int>(src_lane) & static_cast<unsigned int>(width - 1)));
}

template <class T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
    const unsigned int lane = qlorakit_emu::lane_id();
    const unsigned int target = lane ^ static_cast<unsigned int>(lane_mask);
    const unsigned int base = lane & ~static_cast<unsigned int>(width - 1);
    return qk_exchange(mask, value, target - base < static_cast<unsigned int>(width) ? target : lane);
}

template <class T>
inline T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
    const unsigned int lane = qlorakit_emu::lane_id();
    const unsigned int in_segment = lane & static_cast<unsigned int>(width - 1);
    return qk_exchange(mask, value, in_segment + delta < static_cast<unsigned int>(width) ? lane + delta : lane);
}

template <class T>
inline T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
    const unsigned int lane = qlorakit_emu::lane_id();
    const unsigned int in_segment = lane & static_cast<unsigned int>(width - 1);
    return qk_exchange(mask, value, in_segment >= delta ? lane - delta : lane);
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    using namespace qlorakit_emu;
    Warp& warp = own_warp();
    warp.slots[lane_id()] = predicate ? 1u : 0u;
    wait(State::WaitWarp);
    check_mask(mask);
    const unsigned int base = self().linear & ~31u;
    unsigned int ballot = 0;
    for (unsigned int l = 0; l < 32 && base + l < worker->fibers.size(); ++l)
        if (worker->fibers[base + l].state != State::Done && warp.slots[l]) ballot |= 1u << l;
    wait(State::WaitWarp);
    return ballot;
}

inline int __any_sync(unsigned int mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned int mask, int predicate) {
    return __ballot_sync(mask, predicate) == __ballot_sync(mask, 1);
}

// ---- atomics (blocks may run on different OS threads)

template <class T>
inline T qk_atomic_add(T* address, T value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline int atomicAdd(int* a, int v) { return qk_atomic_add(a, v); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return qk_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return qk_atomic_add(a, v); }
template <class F, class U>
inline F qk_atomic_add_float(F* address, F value) {
    U* bits = reinterpret_cast<U*>(address);
    U old = __atomic_load_n(bits, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(bits, &old, qk_bit_cast<U>(qk_bit_cast<F>(old) + value), false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return qk_bit_cast<F>(old);
}
inline float atomicAdd(float* a, float v) { return qk_atomic_add_float<float, unsigned int>(a, v); }
inline double atomicAdd(double* a, double v) { return qk_atomic_add_float<double, unsigned long long>(a, v); }
template <class T>
inline T qk_atomic_max(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
inline int atomicMax(int* a, int v) { return qk_atomic_max(a, v); }
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return qk_atomic_max(a, v); }
