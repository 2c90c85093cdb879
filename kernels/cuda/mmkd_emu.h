// mmkd_emu.h: the host side of prelude.cuh. Runs CUDA kernels on the CPU.
//
// Execution model (details and limits in kernels/README.md):
//   - Blocks of a grid run one after another on the calling OS thread, so `__shared__` is
//     `static thread_local` storage: shared by the threads of the running block, private to the
//     OS thread (tests launching in parallel do not collide).
//   - The threads of a block are fibers (ucontext) on that OS thread. A fiber runs until it must
//     wait: at `__syncthreads`, or at a warp-wide operation (shuffle, vote, __syncwarp, ldmatrix,
//     mma) until every lane named in the mask has arrived. The order fibers are resumed in is
//     deterministic (forward, reverse, or a seeded shuffle), so a race shows the same way every run.
//   - A barrier counts the threads still running (exited threads do not hold it up). When no fiber
//     can run and some have not finished (a barrier in divergent code, a warp op whose lanes
//     exited), the launch fails with a message instead of hanging.
//   - cp.async copies are deferred until the wait that covers their commit group, so reading the
//     destination too early reads stale data, as it can on the hardware.
#ifndef MMKD_EMU_H
#define MMKD_EMU_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct dim3 {
    unsigned x, y, z;
};
struct uint4 {
    unsigned x, y, z, w;
};

namespace mmkd_emu {

/// Launch geometry as passed from Rust (`#[repr(C)] EmuLaunch`).
struct LaunchCfg {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
};

/// Runs `body(ctx)` as every thread of every block of `cfg`. Returns null on success, else a
/// message that stays valid until the next launch on this OS thread.
const char* run_grid(const LaunchCfg* cfg, void (*body)(void*), void* ctx);

// Per-thread view of the running launch (set by the scheduler before resuming a fiber).
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_smem();

void sync_threads();
/// Deposits `n` words (n <= 8) for this lane, waits for the lanes of `mask`, and returns the
/// 32 x 8 words every lane deposited. `tag` names the operation, so lanes at different warp
/// operations are reported as divergence rather than mixed.
const uint32_t (*warp_exchange(int tag, unsigned mask, const uint32_t* words, int n))[8];
unsigned lane_id();
[[noreturn]] void fail(const char* msg);

// Deferred asynchronous copies (cp.async).
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait(int pending_allowed);
void cp_async_wait_all();
// A generic-proxy write of `bytes` at `p` (a 16-byte store; cp.async copies as they land): in
// dynamic shared memory it must pass a fence.proxy.async of its thread before a wgmma reads it.
void generic_write(const void* p, int bytes);
void fence_proxy_async();
void wgmma_fence();

enum Tag { TAG_SYNCWARP = 1, TAG_SHFL, TAG_VOTE, TAG_LDMATRIX, TAG_MMA, TAG_WGMMA };

template <typename... A, std::size_t... I>
void call_kernel(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

/// The emulation's counterpart of cuLaunchKernel: `args[i]` points at the i-th parameter.
template <typename... A>
const char* launch_packed(void (*k)(A...), const LaunchCfg* cfg, void** args) {
    struct Ctx {
        void (*k)(A...);
        void** args;
    } ctx{k, args};
    return run_grid(
        cfg,
        [](void* p) {
            Ctx* c = static_cast<Ctx*>(p);
            call_kernel(c->k, c->args, std::index_sequence_for<A...>{});
        },
        &ctx);
}

template <typename T>
inline uint32_t to_word(T v) {
    static_assert(sizeof(T) == 4, "warp shuffles are emulated for 4-byte types");
    uint32_t w;
    std::memcpy(&w, &v, 4);
    return w;
}
template <typename T>
inline T from_word(uint32_t w) {
    T v;
    std::memcpy(&v, &w, 4);
    return v;
}

// Shuffle with CUDA's source-lane rules; an out-of-range or absent source returns the own value.
template <typename T>
inline T shfl(unsigned mask, T v, int src) {
    uint32_t w = to_word(v);
    auto snap = warp_exchange(TAG_SHFL, mask, &w, 1);
    if (src < 0 || src > 31 || !((mask >> src) & 1u)) return v;
    return from_word<T>(snap[src][0]);
}

}  // namespace mmkd_emu

#define threadIdx (::mmkd_emu::thread_idx())
#define blockIdx (::mmkd_emu::block_idx())
#define blockDim (::mmkd_emu::block_dim())
#define gridDim (::mmkd_emu::grid_dim())

#define MMKD_KERNEL static  // internal: Rust reaches it through MMKD_EXPORT
#define MMKD_DEVICE static inline
#define __device__ inline
#define __global__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define MMKD_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::mmkd_emu::dynamic_smem())
#ifndef MMKD_EMU_SYMBOL
#define MMKD_EMU_SYMBOL(kernel) mmkd_emu_##kernel
#endif
#define MMKD_EXPORT(kernel)                                                                  \
    extern "C" const char* MMKD_EMU_SYMBOL(kernel)(const ::mmkd_emu::LaunchCfg* cfg,       \
                                                   void** args) {                           \
        return ::mmkd_emu::launch_packed(kernel, cfg, args);                                \
    }

typedef unsigned short mmkd_bf16;

static inline void __syncthreads() { ::mmkd_emu::sync_threads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::mmkd_emu::warp_exchange(::mmkd_emu::TAG_SYNCWARP, mask, nullptr, 0);
}

template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = (int)::mmkd_emu::lane_id();
    int base = lane & ~(width - 1);
    return ::mmkd_emu::shfl(mask, v, base + (src & (width - 1)));
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = (int)::mmkd_emu::lane_id();
    int src = lane ^ lane_mask;
    // A source outside the own width-group returns the own value.
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return ::mmkd_emu::shfl(mask, v, src);
}
template <typename T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)::mmkd_emu::lane_id();
    int src = ((lane & (width - 1)) + (int)delta >= width) ? lane : lane + (int)delta;
    return ::mmkd_emu::shfl(mask, v, src);
}
template <typename T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)::mmkd_emu::lane_id();
    int src = ((lane & (width - 1)) < (int)delta) ? lane : lane - (int)delta;
    return ::mmkd_emu::shfl(mask, v, src);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    uint32_t w = pred ? 1u : 0u;
    auto snap = ::mmkd_emu::warp_exchange(::mmkd_emu::TAG_VOTE, mask, &w, 1);
    unsigned out = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && snap[l][0]) out |= 1u << l;
    return out;
}
static inline int __all_sync(unsigned mask, int pred) {
    return __ballot_sync(mask, pred) == (mask & __ballot_sync(mask, 1));
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

// Fibers of one block never run at the same time, so a plain read-modify-write is atomic.
static inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}
static inline int atomicAdd(int* p, int v) {
    int old = *p;
    *p = old + v;
    return old;
}
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}

static inline float __uint_as_float(unsigned u) { return ::mmkd_emu::from_word<float>(u); }
static inline unsigned __float_as_uint(float f) { return ::mmkd_emu::to_word(f); }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// __expf and __logf: glibc declares them (float exp/log) already.
static inline float __fdividef(float a, float b) { return a / b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline float max(float a, float b) { return std::fmax(a, b); }

static inline float bf16_to_f32(mmkd_bf16 h) { return __uint_as_float(((unsigned)h) << 16); }
// Round to nearest, ties to even; NaN stays a (quiet) NaN, as cvt.rn.bf16.f32 does.
static inline mmkd_bf16 f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (mmkd_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (mmkd_bf16)(u >> 16);
}
static inline float f16_to_f32(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}
static inline unsigned short f32_to_f16(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}

struct mmkd_u32x4 {
    unsigned x, y, z, w;
};
static inline mmkd_u32x4 load_u32x4(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::mmkd_emu::fail("load_u32x4: address not 16-byte aligned");
    mmkd_u32x4 v;
    std::memcpy(&v, p, 16);
    return v;
}
static inline void store_u32x4(void* p, mmkd_u32x4 v) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ::mmkd_emu::fail("store_u32x4: address not 16-byte aligned");
    std::memcpy(p, &v, 16);
    ::mmkd_emu::generic_write(p, 16);
}

namespace mmkd_emu {
void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]);
void ldmatrix(int count, bool trans, unsigned* r, const void* row);
}  // namespace mmkd_emu

static inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    ::mmkd_emu::mma_m16n8k16_bf16(d, a, b, c);
}
static inline void ldmatrix_x1(unsigned r[1], const void* row) { ::mmkd_emu::ldmatrix(1, false, r, row); }
static inline void ldmatrix_x2(unsigned r[2], const void* row) { ::mmkd_emu::ldmatrix(2, false, r, row); }
static inline void ldmatrix_x4(unsigned r[4], const void* row) { ::mmkd_emu::ldmatrix(4, false, r, row); }
static inline void ldmatrix_x1_trans(unsigned r[1], const void* row) { ::mmkd_emu::ldmatrix(1, true, r, row); }
static inline void ldmatrix_x2_trans(unsigned r[2], const void* row) { ::mmkd_emu::ldmatrix(2, true, r, row); }
static inline void ldmatrix_x4_trans(unsigned r[4], const void* row) { ::mmkd_emu::ldmatrix(4, true, r, row); }

static inline void cp_async_16(void* dst, const void* src) { ::mmkd_emu::cp_async(dst, src, 16); }
static inline void cp_async_8(void* dst, const void* src) { ::mmkd_emu::cp_async(dst, src, 8); }
static inline void cp_async_4(void* dst, const void* src) { ::mmkd_emu::cp_async(dst, src, 4); }
static inline void cp_async_commit() { ::mmkd_emu::cp_async_commit(); }
template <int N>
static inline void cp_async_wait() {
    ::mmkd_emu::cp_async_wait(N);
}
static inline void cp_async_wait_all() { ::mmkd_emu::cp_async_wait_all(); }

// wgmma: deferred like cp.async, until the wait that covers its commit group, so accumulators
// read early are stale and shared memory overwritten early is what the product reads.
namespace mmkd_emu {
uint64_t smem_offset(const void* p);
void wgmma_issue(float* d, uint64_t desc_a, uint64_t desc_b, int mn_a, int mn_b, int n);
void wgmma_commit();
void wgmma_wait(int pending_allowed);
}  // namespace mmkd_emu
// A shared-memory address for alignment arithmetic: the host address's low bits (the
// emulation's swizzles and alignment checks use host addresses too).
static inline unsigned smem_addr(const void* p) { return (unsigned)reinterpret_cast<uintptr_t>(p); }
static inline unsigned long long wgmma_desc(const void* smem, unsigned lbo_bytes, unsigned sbo_bytes) {
    return (unsigned long long)(::mmkd_emu::smem_offset(smem) >> 4) |
           ((unsigned long long)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo_bytes >> 4) & 0x3FFFu) << 32);
}
static inline unsigned long long wgmma_desc_sw128(const void* smem, unsigned lbo_bytes,
                                                  unsigned sbo_bytes) {
    return wgmma_desc(smem, lbo_bytes, sbo_bytes) | (1ull << 62);
}

// mbarrier and tensor copies (TMA): see mmkd_emu.cpp.
struct mmkd_tensor_map {
    alignas(128) unsigned long long opaque[16];
};
#define __grid_constant__
namespace mmkd_emu {
void mbarrier_init(uint64_t* bar, unsigned count);
void fence_barrier_init();
void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes);
void mbarrier_arrive(uint64_t* bar);
void mbarrier_wait(uint64_t* bar, unsigned parity);
void tma_load_3d(void* dst, const void* map, int c0, int c1, int c2, uint64_t* bar);
}  // namespace mmkd_emu
static inline void mbarrier_init(unsigned long long* bar, unsigned count) {
    ::mmkd_emu::mbarrier_init(reinterpret_cast<uint64_t*>(bar), count);
}
static inline void fence_barrier_init() { ::mmkd_emu::fence_barrier_init(); }
static inline void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    ::mmkd_emu::mbarrier_arrive_expect_tx(reinterpret_cast<uint64_t*>(bar), bytes);
}
static inline void mbarrier_arrive(unsigned long long* bar) {
    ::mmkd_emu::mbarrier_arrive(reinterpret_cast<uint64_t*>(bar));
}
// The register budget is the hardware's business: nothing to emulate.
template <int N>
static inline void setmaxnreg_inc() {}
template <int N>
static inline void setmaxnreg_dec() {}
static inline void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    ::mmkd_emu::mbarrier_wait(reinterpret_cast<uint64_t*>(bar), parity);
}
static inline void tma_load_3d(void* dst, const mmkd_tensor_map* map, int c0, int c1, int c2,
                               unsigned long long* bar) {
    ::mmkd_emu::tma_load_3d(dst, map, c0, c1, c2, reinterpret_cast<uint64_t*>(bar));
}
static inline void wgmma_fence() { ::mmkd_emu::wgmma_fence(); }
static inline void fence_proxy_async() { ::mmkd_emu::fence_proxy_async(); }
static inline void note_generic_write(const void* p, int bytes) { ::mmkd_emu::generic_write(p, bytes); }
static inline void wgmma_hold(float*) {}
template <int N>
static inline void wgmma_hold_n(float*) {}
static inline void wgmma_commit() { ::mmkd_emu::wgmma_commit(); }
template <int N>
static inline void wgmma_wait() {
    ::mmkd_emu::wgmma_wait(N);
}
template <int TA = 0, int TB = 0>
static inline void wgmma_m64n128k16_bf16(float d[64], unsigned long long desc_a, unsigned long long desc_b) {
    static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "imm-trans is 0 or 1");
    ::mmkd_emu::wgmma_issue(d, desc_a, desc_b, TA, TB, 128);
}
template <int TA = 0, int TB = 0>
static inline void wgmma_m64n256k16_bf16(float d[128], unsigned long long desc_a, unsigned long long desc_b) {
    static_assert((TA == 0 || TA == 1) && (TB == 0 || TB == 1), "imm-trans is 0 or 1");
    ::mmkd_emu::wgmma_issue(d, desc_a, desc_b, TA, TB, 256);
}

#endif  // MMKD_EMU_H
