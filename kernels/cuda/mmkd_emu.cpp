// mmkd_emu.cpp: the fiber scheduler, warp exchange and matrix-fragment emulation behind
// mmkd_emu.h. Compiled once into the emulation library by kernels/build.rs.
#include "mmkd_emu.h"

#include <ucontext.h>

#ifdef MMKD_EMU_ASAN
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <vector>

namespace mmkd_emu {
namespace {

enum State { RUNNABLE, WAIT_BAR, WAIT_WARP, WAIT_MBAR, DONE };

struct Copy {
    void* dst;
    const void* src;
    int bytes;
};

// One wgmma issued by this thread: its accumulators, the two operand descriptors and whether
// each operand is MN-major (imm-trans = 1).
struct Wgmma {
    float* d;
    uint64_t desc_a, desc_b;
    bool mn_a, mn_b;
    int n;  // columns of D: 128 or 256
};

// One tensor copy (TMA) issued and not yet performed: the box, already resolved to its
// elements' sources (null: outside the tensor, zero fill), and where it lands.
struct TmaCopy {
    unsigned char* dst;                // shared memory, the box's first byte
    std::vector<const uint16_t*> src;  // per element, row-major over the box
    bool swizzle128;                   // 128-byte rows stored with the 128-byte swizzle
};

// An mbarrier object (keyed by its shared-memory address): expected arrivals per phase, the
// arrivals still missing, the transaction bytes still expected, completed phases, and the
// tensor copies that complete on it.
struct MBar {
    unsigned count = 0;
    unsigned pending = 0;
    int64_t tx = 0;
    unsigned phase = 0;
    std::vector<TmaCopy> copies;
    // The thread that initialised it, and whether that thread has since run
    // fence.mbarrier_init, which makes the initialisation visible to the tensor copies.
    unsigned init_thread = 0;
    bool init_fenced = false;
};

struct Fiber {
    ucontext_t ctx;
    char* stack;  // kStackBytes, owned by the launch
    dim3 tid;
    unsigned linear;
    State state;
    std::vector<Copy> open;                 // cp.async issued since the last commit
    std::vector<std::vector<Copy>> groups;  // committed, not yet waited for
    std::vector<Wgmma> wg_open;                 // wgmma issued since the last commit
    std::vector<std::vector<Wgmma>> wg_groups;  // committed, not yet waited for
    // Chunks of dynamic shared memory this thread wrote through the generic proxy since its
    // last fence.proxy.async, and whether a wgmma.fence came since its last wgmma wait.
    std::vector<uint32_t> unfenced;
    bool wg_fenced = false;
};

struct Warp {
    unsigned existing;  // lanes that exist (the last warp of a block may be partial)
    unsigned arrived;
    int tag;
    unsigned mask;
    uint32_t deposit[32][8];
    uint32_t snap[32][8];
};

// Fiber order policy: 0 forward, 1 reverse, 2 seeded shuffle (per block): each pass resumes every
// runnable thread once, so the warps of a block advance about one warp operation per pass.
// 3 greedy: always the first runnable thread, so warp 0 runs as far ahead of the others as the
// barriers allow, then warp 1, and so on. `eager_copies`: each cp.async lands when it is issued
// instead of at the wait that covers it.
struct Schedule {
    int mode = -1;
    uint64_t seed = 0;
    bool eager_copies = false;
};

struct Block {
    dim3 bdim, bidx, gdim;
    unsigned nthreads = 0;
    unsigned live = 0;
    unsigned bar_arrived = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<unsigned> order;
    ucontext_t sched{};
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    unsigned char* dyn_smem = nullptr;
    unsigned dyn_bytes = 0;
    // Per 16-byte chunk of dynamic shared memory: wgmma operand reads issued and not yet
    // performed (a cp.async into such a chunk is a write-after-read race).
    std::vector<uint32_t> wg_reads;
    // Per 16-byte chunk of dynamic shared memory: 1 + the thread that wrote it through the
    // generic proxy (stores, cp.async) and has not fenced it for the async proxy since; 0 when
    // none (a wgmma may read it). Allocated at the first such write.
    std::vector<uint32_t> generic_writer;
    std::unordered_map<uintptr_t, MBar> mbars;
    bool failed = false;
    bool greedy = false;  // schedule 3
};

constexpr size_t kStackBytes = 256 * 1024;

thread_local Block* g_block = nullptr;
thread_local Fiber* g_fiber = nullptr;
thread_local std::string g_error;
thread_local Schedule g_schedule;

// Context switches. Under AddressSanitizer (MMKD_EMU_ASAN) each switch announces the stack it
// lands on, so the checks know which stack is live; the scheduler's own stack is learnt from
// the first switch into a fiber.
#ifdef MMKD_EMU_ASAN
thread_local const void* g_sched_stack = nullptr;
thread_local size_t g_sched_stack_bytes = 0;
#endif

#ifdef MMKD_EMU_ASAN
// The C library's own swapcontext. The sanitizer's wrapper of it clears the shadow of the whole
// target stack at every switch, which would erase the guards around a resumed thread's local
// arrays; with the switches announced (below), the wrapper has nothing left to do.
using SwapFn = int (*)(ucontext_t*, const ucontext_t*);
SwapFn real_swapcontext() {
    static SwapFn f = [] {
        void* libc = dlopen("libc.so.6", RTLD_NOLOAD | RTLD_LAZY);
        void* sym = libc != nullptr ? dlsym(libc, "swapcontext") : nullptr;
        return sym != nullptr ? reinterpret_cast<SwapFn>(sym) : &::swapcontext;
    }();
    return f;
}
#define MMKD_SWAPCONTEXT(from, to) real_swapcontext()(from, to)
#else
#define MMKD_SWAPCONTEXT(from, to) swapcontext(from, to)
#endif

void switch_to_fiber(Block& b, Fiber& f);
// `for_good`: the fiber never runs again (it exited or failed).
void switch_to_scheduler(Fiber& f, Block& b, bool for_good) {
#ifdef MMKD_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(for_good ? nullptr : &fake, g_sched_stack, g_sched_stack_bytes);
#else
    (void)for_good;
#endif
    MMKD_SWAPCONTEXT(&f.ctx, &b.sched);
#ifdef MMKD_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &g_sched_stack, &g_sched_stack_bytes);
#endif
}

// The first words a fiber runs: completes the switch that started it.
void fiber_started() {
#ifdef MMKD_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack, &g_sched_stack_bytes);
#endif
}

#ifdef MMKD_EMU_ASAN
// The first report of an out-of-bounds (or otherwise invalid) access inside the running block;
// the launch fails with it once the fiber yields. The build recovers from reports
// (-fsanitize-recover=address), so the kernel runs on until then.
thread_local std::string g_asan_report;

void on_asan_report(const char* report) {
    if (g_block == nullptr) {
        // Not inside an emulated kernel: host code is not ours to excuse.
        std::fputs(report, stderr);
        std::abort();
    }
    if (!g_asan_report.empty()) return;
    // "AddressSanitizer: KIND on address A" and "READ of size N", without registers.
    std::string r(report), line = "AddressSanitizer report";
    size_t at = r.find("AddressSanitizer: ");
    if (at != std::string::npos) line = r.substr(at, r.find(" at pc", at) - at);
    for (const char* what : {"READ of size ", "WRITE of size "}) {
        size_t w = r.find(what);
        if (w != std::string::npos) {
            size_t e = r.find(" at ", w);
            line += ", " + r.substr(w, e == std::string::npos ? std::string::npos : e - w);
            break;
        }
    }
    char buf[96] = "";
    if (g_fiber != nullptr)
        std::snprintf(buf, sizeof buf, " (block (%u,%u,%u), thread (%u,%u,%u))", g_block->bidx.x,
                      g_block->bidx.y, g_block->bidx.z, g_fiber->tid.x, g_fiber->tid.y, g_fiber->tid.z);
    // The access itself went ahead (the build recovers from reports) and the thread runs on
    // until it yields: the launch fails then.
    g_asan_report = "invalid memory access: " + line + buf;
}

// Installed when the library loads, so a report from host code before the first launch ends
// the process too instead of passing unnoticed (halt_on_error=0 applies to every report).
const bool g_asan_callback_installed = [] {
    __asan_set_error_report_callback(on_asan_report);
    return true;
}();
#endif

Schedule current_schedule() {
    if (g_schedule.mode >= 0) return g_schedule;
    Schedule s;
    s.mode = 0;
    if (const char* e = std::getenv("MMKD_EMU_SCHEDULE")) {
        std::string v(e);
        if (v == "reverse") s.mode = 1;
        else if (v == "greedy") s.mode = 3;
        else if (v.rfind("seed:", 0) == 0) {
            s.mode = 2;
            s.seed = std::strtoull(v.c_str() + 5, nullptr, 10);
        }
    }
    return s;
}

uint64_t splitmix(uint64_t& x) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void yield_to_scheduler() { switch_to_scheduler(*g_fiber, *g_block, false); }

void release_barrier(Block& b) {
    for (auto& f : b.fibers)
        if (f.state == WAIT_BAR) f.state = RUNNABLE;
    b.bar_arrived = 0;
}

unsigned expected_lanes(const Warp& w) { return (unsigned)__builtin_popcount(w.mask & w.existing); }

void release_warp(Block& b, unsigned warp) {
    Warp& w = b.warps[warp];
    std::memcpy(w.snap, w.deposit, sizeof(w.snap));
    w.arrived = 0;
    unsigned first = warp * 32, last = first + 32 < b.nthreads ? first + 32 : b.nthreads;
    for (unsigned i = first; i < last; ++i)
        if (b.fibers[i].state == WAIT_WARP) b.fibers[i].state = RUNNABLE;
}

void fiber_entry() {
    fiber_started();
    Block& b = *g_block;
    b.body(b.ctx);
    Fiber& f = *g_fiber;
    // Accumulators of an unfinished wgmma would be written after the thread is gone.
    if (!f.wg_open.empty() || !f.wg_groups.empty()) fail("thread exited with a wgmma not waited for");
    f.state = DONE;
    b.live--;
    // An exited thread no longer holds up a barrier.
    if (b.bar_arrived > 0 && b.bar_arrived == b.live) release_barrier(b);
    switch_to_scheduler(f, b, true);
}

void switch_to_fiber(Block& b, Fiber& f) {
#ifdef MMKD_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
    MMKD_SWAPCONTEXT(&b.sched, &f.ctx);
#ifdef MMKD_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Separate from run_block: getcontext returns twice, which would leave run_block's loop
// variables "clobbered" in the compiler's eyes.
__attribute__((noinline)) void init_fiber(Fiber& f) {
#ifdef MMKD_EMU_ASAN
    // A stack reused from an abandoned thread may keep the guards of its frames.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
}

bool run_block(Block& b, std::vector<char*>& stacks) {
    b.live = b.nthreads;
    b.bar_arrived = 0;
    for (unsigned w = 0; w < b.warps.size(); ++w) {
        Warp& wp = b.warps[w];
        unsigned lanes = b.nthreads - w * 32 < 32 ? b.nthreads - w * 32 : 32;
        wp.existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        wp.arrived = 0;
        wp.tag = 0;
        wp.mask = 0;
    }
    for (unsigned i = 0; i < b.nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.linear = i;
        f.tid = dim3{i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y)};
        f.state = RUNNABLE;
        f.open.clear();
        f.groups.clear();
        f.wg_open.clear();
        f.wg_groups.clear();
        f.unfenced.clear();
        f.wg_fenced = false;
        f.stack = stacks[i];
        init_fiber(f);
    }
    for (;;) {
        bool progress = false;
        for (unsigned k = 0; k < b.nthreads; ++k) {
            Fiber& f = b.fibers[b.order[k]];
            if (f.state != RUNNABLE) continue;
            g_fiber = &f;
            switch_to_fiber(b, f);
            g_fiber = nullptr;
#ifdef MMKD_EMU_ASAN
            if (!g_asan_report.empty()) {
                g_error = g_asan_report;
                g_asan_report.clear();
                return false;
            }
#endif
            if (b.failed) return false;
            progress = true;
            if (b.greedy) break;  // rescan from the first thread
        }
        if (b.live == 0) {
            // A tensor copy still in flight when the block ends writes into freed shared memory.
            for (auto& kv : b.mbars)
                if (!kv.second.copies.empty()) {
                    g_error = "block ended with a tensor copy (TMA) that no thread waited for";
                    return false;
                }
            return true;
        }
        if (!progress) {
            unsigned at_bar = 0, at_warp = 0, at_mbar = 0;
            for (auto& f : b.fibers) {
                at_bar += f.state == WAIT_BAR;
                at_warp += f.state == WAIT_WARP;
                at_mbar += f.state == WAIT_MBAR;
            }
            char buf[320];
            std::snprintf(buf, sizeof buf,
                          "deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u at a "
                          "warp operation, %u on an mbarrier whose arrivals never come, %u exited "
                          "(barrier in divergent code, or a lane of the mask exited)",
                          b.bidx.x, b.bidx.y, b.bidx.z, at_bar, at_warp, at_mbar, b.nthreads - b.live);
            g_error = buf;
            return false;
        }
    }
}

}  // namespace

const dim3& thread_idx() { return g_fiber->tid; }
const dim3& block_idx() { return g_block->bidx; }
const dim3& block_dim() { return g_block->bdim; }
const dim3& grid_dim() { return g_block->gdim; }
unsigned char* dynamic_smem() { return g_block->dyn_smem; }
unsigned lane_id() { return g_fiber->linear % 32; }

void fail(const char* msg) {
    char buf[320];
    std::snprintf(buf, sizeof buf, "%s (block (%u,%u,%u), thread (%u,%u,%u))", msg, g_block->bidx.x,
                  g_block->bidx.y, g_block->bidx.z, g_fiber->tid.x, g_fiber->tid.y, g_fiber->tid.z);
    g_error = buf;
    g_block->failed = true;
    g_fiber->state = DONE;
    switch_to_scheduler(*g_fiber, *g_block, true);
    std::abort();  // never resumed
}

void sync_threads() {
    Block& b = *g_block;
    b.bar_arrived++;
    g_fiber->state = WAIT_BAR;
    if (b.bar_arrived == b.live) {
        release_barrier(b);
        return;
    }
    yield_to_scheduler();
}

const uint32_t (*warp_exchange(int tag, unsigned mask, const uint32_t* words, int n))[8] {
    Block& b = *g_block;
    Fiber& f = *g_fiber;
    unsigned lane = f.linear % 32;
    Warp& w = b.warps[f.linear / 32];
    if (!((mask >> lane) & 1u)) fail("warp operation by a lane not in its mask");
    if (w.arrived == 0) {
        w.tag = tag;
        w.mask = mask;
    } else if (w.tag != tag || w.mask != mask) {
        fail("lanes of one warp at different warp operations (divergent warp code)");
    }
    for (int i = 0; i < n; ++i) w.deposit[lane][i] = words[i];
    w.arrived++;
    f.state = WAIT_WARP;
    if (w.arrived == expected_lanes(w)) {
        release_warp(b, f.linear / 32);
    } else {
        yield_to_scheduler();
    }
    // Safe to read after resuming: the snapshot changes only when this lane arrives again.
    return w.snap;
}

// A copy lands, by default, at the wait that covers it: the latest the hardware allows, so a
// read before that wait sees stale data. With eager copies it lands when issued, the earliest:
// a copy into a buffer that another warp still reads (a missing barrier before a refill) then
// changes what that warp reads. Correct kernels give the same results either way.
void cp_async(void* dst, const void* src, int bytes) {
    if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
        fail("cp.async: address not aligned to the copy size");
    Block& b = *g_block;
    unsigned char* d = static_cast<unsigned char*>(dst);
    if (d >= b.dyn_smem && d < b.dyn_smem + b.dyn_bytes && !b.wg_reads.empty() &&
        b.wg_reads[(size_t)(d - b.dyn_smem) / 16] != 0)
        fail("cp.async into shared memory that an unfinished wgmma reads");
    if (g_schedule.eager_copies) {
        std::memcpy(dst, src, (size_t)bytes);
        generic_write(dst, bytes);
        return;
    }
    g_fiber->open.push_back(Copy{dst, src, bytes});
}
void cp_async_commit() {
    Fiber& f = *g_fiber;
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
static void perform(const std::vector<Copy>& g) {
    for (const Copy& c : g) {
        std::memcpy(c.dst, c.src, (size_t)c.bytes);
        generic_write(c.dst, c.bytes);
    }
}

void generic_write(const void* p, int bytes) {
    Block& b = *g_block;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    if (q < b.dyn_smem || q >= b.dyn_smem + b.dyn_bytes) return;
    if (b.generic_writer.empty()) b.generic_writer.assign(b.dyn_bytes / 16 + 1, 0);
    Fiber& f = *g_fiber;
    const size_t first = (size_t)(q - b.dyn_smem) / 16, last = ((size_t)(q - b.dyn_smem) + bytes - 1) / 16;
    for (size_t c = first; c <= last && c < b.generic_writer.size(); ++c) {
        // A store (or a landing copy) into operands an issued wgmma has not read yet: the
        // product may see either value on the hardware.
        if (c < b.wg_reads.size() && b.wg_reads[c] != 0)
            fail("store into shared memory that an unfinished wgmma reads");
        b.generic_writer[c] = f.linear + 1;
        f.unfenced.push_back((uint32_t)c);
    }
}

void fence_proxy_async() {
    Block& b = *g_block;
    Fiber& f = *g_fiber;
    for (uint32_t c : f.unfenced)
        if (b.generic_writer[c] == f.linear + 1) b.generic_writer[c] = 0;
    f.unfenced.clear();
}

void wgmma_fence() { g_fiber->wg_fenced = true; }
void cp_async_wait(int pending_allowed) {
    Fiber& f = *g_fiber;
    while (f.groups.size() > (size_t)pending_allowed) {
        perform(f.groups.front());
        f.groups.erase(f.groups.begin());
    }
}
void cp_async_wait_all() {
    Fiber& f = *g_fiber;
    for (auto& g : f.groups) perform(g);
    f.groups.clear();
    perform(f.open);
    f.open.clear();
}

// mma.m16n8k16, fragments per the PTX ISA: groupID g = lane/4, t = lane%4.
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, D (16x8 f32):      c0,c1 = C[g][2t], C[g][2t+1]; c2,c3 = C[g+8][2t], C[g+8][2t+1]
// The lower-indexed element of a pair sits in the low 16 bits.
void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    uint32_t w[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    auto snap = warp_exchange(TAG_MMA, 0xffffffffu, w, 6);
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        int g = l >> 2, t = l & 3;
        const uint32_t* r = snap[l];
        auto lo = [](uint32_t v) { return bf16_to_f32((mmkd_bf16)(v & 0xffffu)); };
        auto hi = [](uint32_t v) { return bf16_to_f32((mmkd_bf16)(v >> 16)); };
        A[g][2 * t] = lo(r[0]);
        A[g][2 * t + 1] = hi(r[0]);
        A[g + 8][2 * t] = lo(r[1]);
        A[g + 8][2 * t + 1] = hi(r[1]);
        A[g][2 * t + 8] = lo(r[2]);
        A[g][2 * t + 9] = hi(r[2]);
        A[g + 8][2 * t + 8] = lo(r[3]);
        A[g + 8][2 * t + 9] = hi(r[3]);
        B[2 * t][g] = lo(r[4]);
        B[2 * t + 1][g] = hi(r[4]);
        B[2 * t + 8][g] = lo(r[5]);
        B[2 * t + 9][g] = hi(r[5]);
    }
    int lane = (int)lane_id(), g = lane >> 2, t = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // bf16 products are exact in fp32
        out[i] = acc;
    }
    for (int i = 0; i < 4; ++i) d[i] = out[i];  // d may alias c
}

// ldmatrix.m8n8.b16: lanes 8i..8i+7 give the row addresses of matrix i (16-byte aligned rows of
// 8 elements). Without .trans lane L receives row L/4, columns 2(L%4), 2(L%4)+1 of each matrix;
// with .trans it receives column L/4, rows 2(L%4), 2(L%4)+1.
void ldmatrix(int count, bool trans, unsigned* r, const void* row) {
    uint64_t p = reinterpret_cast<uint64_t>(row);
    if (p % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
    uint32_t w[2] = {(uint32_t)p, (uint32_t)(p >> 32)};
    auto snap = warp_exchange(TAG_LDMATRIX, 0xffffffffu, w, 2);
    int lane = (int)lane_id();
    for (int i = 0; i < count; ++i) {
        auto row_ptr = [&](int j) {
            const uint32_t* s = snap[8 * i + j];
            return reinterpret_cast<const uint16_t*>((uint64_t)s[0] | ((uint64_t)s[1] << 32));
        };
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* rp = row_ptr(lane >> 2);
            lo = rp[2 * (lane & 3)];
            hi = rp[2 * (lane & 3) + 1];
        } else {
            lo = row_ptr(2 * (lane & 3))[lane >> 2];
            hi = row_ptr(2 * (lane & 3) + 1)[lane >> 2];
        }
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

// ---- wgmma (sm_90a) ----------------------------------------------------------------------
// Descriptors address dynamic shared memory by byte offset (the emulation's shared window).
// The no-swizzle canonical layouts (below) and the 128-byte swizzle (wg_addr's layout 1).
// Without swizzle, core matrices are 128 contiguous bytes,
// LBO apart along K and SBO apart along M/N (the PTX ISA's canonical layouts, and CUTLASS's
// make_gmma_desc for INTERLEAVE in both majors). Element (r, k) of an operand (r along M/N):
//   K-major  (imm-trans 0): start + (r/8)·SBO + (k/8)·LBO + (r%8)·16 + (k%8)·2
//   MN-major (imm-trans 1): start + (r/8)·SBO + (k/8)·LBO + (k%8)·16 + (r%8)·2

uint64_t smem_offset(const void* p) {
    Block& b = *g_block;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    if (q < b.dyn_smem || q >= b.dyn_smem + b.dyn_bytes)
        fail("wgmma operand outside dynamic shared memory");
    uint64_t off = (uint64_t)(q - b.dyn_smem);
    if (off % 16 != 0) fail("wgmma operand not 16-byte aligned");
    if (off >= (1u << 18)) fail("wgmma operand beyond the descriptor's 18-bit address");
    return off;
}

// The 128-byte swizzle: the 16-byte chunk index within a 128-byte row (address bits 4-6) is
// XORed with the row's index within its 1024-byte group (bits 7-9), on the absolute address as
// the hardware does (here the host address; the emulation's dynamic shared memory starts 16
// bytes past a 1024-byte boundary, so a kernel that assumes more alignment than 16 bytes shows).
// Takes and returns offsets from the dynamic shared memory.
static uint64_t swizzle128(uint64_t off) {
    const uint64_t base = reinterpret_cast<uintptr_t>(g_block->dyn_smem), a = base + off;
    return (a ^ (((a >> 7) & 7) << 4)) - base;
}

// Byte offset of element (r, k) of the operand of `desc`. Layouts (r along M/N):
//   no swizzle, K-major:  start + (r/8)·SBO + (k/8)·LBO + (r%8)·16 + (k%8)·2
//   no swizzle, MN-major: start + (r/8)·SBO + (k/8)·LBO + (k%8)·16 + (r%8)·2
//   128-byte swizzle, K-major (rows of 64 k):  swz(start + (r/8)·SBO + (r%8)·128 + k·2)
//   128-byte swizzle, MN-major (rows of 64 r): swz(start + (r/64)·LBO + (k/8)·SBO + (k%8)·128 + (r%64)·2)
static uint64_t wg_addr(uint64_t desc, bool mn_major, int r, int k) {
    const unsigned layout = (unsigned)(desc >> 62);
    if (((desc >> 49) & 7) != 0) fail("wgmma: only descriptors with base offset 0 are emulated");
    uint64_t start = (desc & 0x3FFFu) << 4, lbo = ((desc >> 16) & 0x3FFFu) << 4,
             sbo = ((desc >> 32) & 0x3FFFu) << 4;
    if (layout == 0) {
        uint64_t row = mn_major ? (uint64_t)(k % 8) : (uint64_t)(r % 8);  // 16-byte row of the core matrix
        uint64_t col = mn_major ? (uint64_t)(r % 8) : (uint64_t)(k % 8);
        return start + (uint64_t)(r / 8) * sbo + (uint64_t)(k / 8) * lbo + row * 16 + col * 2;
    }
    if (layout == 1) {
        if (mn_major)
            return swizzle128(start + (uint64_t)(r / 64) * lbo + (uint64_t)(k / 8) * sbo +
                              (uint64_t)(k % 8) * 128 + (uint64_t)(r % 64) * 2);
        return swizzle128(start + (uint64_t)(r / 8) * sbo + (uint64_t)(r % 8) * 128 + (uint64_t)k * 2);
    }
    fail("wgmma: only the no-swizzle and 128-byte swizzle layouts are emulated");
}

// Element (r, k) of the operand of `desc`.
static float wg_elem(uint64_t desc, bool mn_major, int r, int k) {
    Block& b = *g_block;
    uint64_t off = wg_addr(desc, mn_major, r, k);
    if (off + 2 > b.dyn_bytes) fail("wgmma operand element outside dynamic shared memory");
    uint16_t v;
    std::memcpy(&v, b.dyn_smem + off, 2);
    return bf16_to_f32((mmkd_bf16)v);
}

// Adds `delta` to the pending-read count of every 16-byte chunk of the operand of `desc`
// (`rows` rows of 16 k).
static void wg_mark(uint64_t desc, bool mn_major, int rows, int delta) {
    Block& b = *g_block;
    // K-major: two chunks (k-groups) per row; MN-major: sixteen (one per k) per 8 rows.
    for (int r = 0; r < rows; r += mn_major ? 8 : 1)
        for (int k = 0; k < 16; k += mn_major ? 1 : 8) {
            uint64_t off = wg_addr(desc, mn_major, r, k) & ~(uint64_t)15;
            if (off + 16 > b.dyn_bytes) fail("wgmma operand outside dynamic shared memory");
            if (delta > 0 && !b.generic_writer.empty() && b.generic_writer[off / 16] != 0)
                fail("wgmma reads shared memory written through the generic proxy (a store or "
                     "cp.async) that its writer has not fenced with fence.proxy.async");
            b.wg_reads[off / 16] += (uint32_t)delta;
        }
}

// D += A·Bᵀ for this thread's accumulators: warp w of the warpgroup holds rows 16w + g (+8),
// lane (g = lane/4, q = lane%4) columns 8j + 2q (+1) in d[4j .. 4j+3].
static void wgmma_perform(const Wgmma& op) {
    unsigned lin = g_fiber->linear, lane = lin % 32, w = (lin / 32) % 4;
    int g = (int)lane / 4, q = (int)lane % 4;
    const int nj = op.n / 8;
    float a[2][16], bt[64][16];  // this thread's two rows of A and up to 64 columns of B
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 16; ++k) a[h][k] = wg_elem(op.desc_a, op.mn_a, 16 * (int)w + g + 8 * h, k);
    for (int j = 0; j < nj; ++j)
        for (int e = 0; e < 2; ++e)
            for (int k = 0; k < 16; ++k)
                bt[2 * j + e][k] = wg_elem(op.desc_b, op.mn_b, 8 * j + 2 * q + e, k);
    for (int j = 0; j < nj; ++j)
        for (int i = 0; i < 4; ++i) {
            const float* ar = a[i / 2];
            const float* bc = bt[2 * j + (i & 1)];
            float acc = op.d[4 * j + i];
            for (int k = 0; k < 16; ++k) acc += ar[k] * bc[k];  // bf16 products are exact in fp32
            op.d[4 * j + i] = acc;
        }
    wg_mark(op.desc_a, op.mn_a, 64, -1);
    wg_mark(op.desc_b, op.mn_b, op.n, -1);
}

void wgmma_issue(float* d, uint64_t desc_a, uint64_t desc_b, int mn_a, int mn_b, int n) {
    if (n != 128 && n != 256) fail("wgmma: only n = 128 and n = 256 are emulated");
    if (g_block->nthreads % 128 != 0) fail("wgmma in a block that is not whole warpgroups");
    // Accumulators that other code may have touched (before the first wgmma, or after a wait)
    // are handed to the tensor cores only after a wgmma.fence.
    if (!g_fiber->wg_fenced) fail("wgmma without a wgmma.fence since the thread's last wgmma wait");
    // The descriptors must agree across the warp (the instruction is .sync.aligned).
    uint32_t words[4] = {(uint32_t)desc_a, (uint32_t)(desc_a >> 32), (uint32_t)desc_b,
                         (uint32_t)(desc_b >> 32)};
    auto snap = warp_exchange(TAG_WGMMA, 0xffffffffu, words, 4);
    for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i)
            if (snap[l][i] != words[i]) fail("wgmma descriptors differ between lanes of a warp");
    if (g_block->wg_reads.empty()) g_block->wg_reads.assign(g_block->dyn_bytes / 16 + 1, 0);
    wg_mark(desc_a, mn_a != 0, 64, 1);
    wg_mark(desc_b, mn_b != 0, n, 1);
    g_fiber->wg_open.push_back(Wgmma{d, desc_a, desc_b, mn_a != 0, mn_b != 0, n});
}
void wgmma_commit() {
    Fiber& f = *g_fiber;
    f.wg_groups.push_back(std::move(f.wg_open));
    f.wg_open.clear();
}
void wgmma_wait(int pending_allowed) {
    Fiber& f = *g_fiber;
    f.wg_fenced = false;
    while (f.wg_groups.size() > (size_t)pending_allowed) {
        for (const Wgmma& op : f.wg_groups.front()) wgmma_perform(op);
        f.wg_groups.erase(f.wg_groups.begin());
    }
}

// ---- mbarrier and tensor copies (TMA, sm_90a) ----------------------------------------------
// A tensor copy is deferred like cp.async: it lands when a thread waits on its mbarrier and the
// phase can complete (no arrivals missing), so a read before the wait sees stale data. The
// phase then needs its transaction count back at zero: bytes announced by expect_tx and bytes
// copied must match, or the launch fails (on the hardware the wait would hang).

static MBar& mbar_of(uint64_t* bar, const char* what) {
    Block& b = *g_block;
    auto it = b.mbars.find(reinterpret_cast<uintptr_t>(bar));
    if (it == b.mbars.end() || it->second.count == 0) {
        char buf[128];
        std::snprintf(buf, sizeof buf, "%s on an mbarrier that was not initialised", what);
        fail(buf);
    }
    return it->second;
}

void mbarrier_init(uint64_t* bar, unsigned count) {
    Block& b = *g_block;
    unsigned char* p = reinterpret_cast<unsigned char*>(bar);
    if (reinterpret_cast<uintptr_t>(bar) % 8) fail("mbarrier not 8-byte aligned");
    if (p < b.dyn_smem || p + 8 > b.dyn_smem + b.dyn_bytes)
        fail("mbarrier outside dynamic shared memory");
    if (count == 0) fail("mbarrier initialised with an arrival count of 0");
    MBar& m = b.mbars[reinterpret_cast<uintptr_t>(bar)];
    if (!m.copies.empty()) fail("mbarrier re-initialised with tensor copies in flight");
    m = MBar{};
    m.count = count;
    m.pending = count;
    m.init_thread = g_fiber->linear;
}

void fence_barrier_init() {
    for (auto& kv : g_block->mbars)
        if (kv.second.init_thread == g_fiber->linear) kv.second.init_fenced = true;
}

static void wake_mbar_waiters(Block& b) {
    for (auto& f : b.fibers)
        if (f.state == WAIT_MBAR) f.state = RUNNABLE;
}

void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    MBar& m = mbar_of(bar, "arrive.expect_tx");
    if (m.pending == 0) fail("mbarrier: more arrivals than its count in one phase");
    m.tx += bytes;
    if (--m.pending == 0) wake_mbar_waiters(*g_block);
}

static void mbar_complete(MBar& m);

// A plain arrival. A phase with no bytes pending completes at its last arrival, as on the
// hardware (one whose tensor copies are still to land completes when a thread waits on it).
void mbarrier_arrive(uint64_t* bar) {
    MBar& m = mbar_of(bar, "arrive");
    if (m.pending == 0) fail("mbarrier: more arrivals than its count in one phase");
    if (--m.pending == 0) {
        if (m.tx == 0 && m.copies.empty()) mbar_complete(m);
        wake_mbar_waiters(*g_block);
    }
}

// Performs the copies of a phase whose arrivals are all in and completes it.
static void mbar_complete(MBar& m) {
    for (const TmaCopy& c : m.copies) {
        const size_t n = c.src.size();
        for (size_t i = 0; i < n; ++i) {
            uint64_t off = (uint64_t)(c.dst - g_block->dyn_smem) + i * 2;
            if (c.swizzle128) off = swizzle128(off);
            uint16_t v = c.src[i] ? *c.src[i] : 0;
            std::memcpy(g_block->dyn_smem + off, &v, 2);
        }
        m.tx -= (int64_t)(n * 2);
    }
    m.copies.clear();
    if (m.tx != 0) {
        char buf[160];
        std::snprintf(buf, sizeof buf,
                      "mbarrier: the phase's copies moved %lld bytes fewer than expect_tx announced",
                      (long long)m.tx);
        fail(buf);
    }
    m.phase++;
    m.pending = m.count;
}

void mbarrier_wait(uint64_t* bar, unsigned parity) {
    for (;;) {
        MBar& m = mbar_of(bar, "wait");
        if ((m.phase & 1u) != (parity & 1u)) return;  // the phase of this parity is complete
        if (m.pending == 0) {
            mbar_complete(m);
            continue;
        }
        g_fiber->state = WAIT_MBAR;
        yield_to_scheduler();
    }
}

// The emulation's tensor map (what `MapSpec::emulated` writes into the 128 bytes).
struct EmuTensorMap {
    uint64_t magic;
    uint64_t addr;
    uint64_t dims[3];     // elements: row length, rows, matrices
    uint64_t strides[2];  // bytes, of dims 1 and 2
    uint32_t box[2];      // elements: along dim 0, along dim 1
    uint32_t swizzle;     // 0 or 128
    uint32_t elem_bytes;
};
static_assert(sizeof(EmuTensorMap) <= 128, "fits CUtensorMap's 128 bytes");
constexpr uint64_t kTensorMapMagic = 0x50414d524f534e54ull;  // "TNSORMAP"

void tma_load_3d(void* dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
    Block& b = *g_block;
    EmuTensorMap t;
    std::memcpy(&t, map, sizeof t);
    if (t.magic != kTensorMapMagic) fail("TMA: not a tensor map made for the emulation");
    if (t.elem_bytes != 2) fail("TMA: only 2-byte elements are emulated");
    unsigned char* d = static_cast<unsigned char*>(dst);
    const uint64_t bytes = (uint64_t)t.box[0] * t.box[1] * 2;
    if (d < b.dyn_smem || d + bytes > b.dyn_smem + b.dyn_bytes)
        fail("TMA destination outside dynamic shared memory");
    const uint64_t off = (uint64_t)(d - b.dyn_smem);
    if (reinterpret_cast<uintptr_t>(d) % (t.swizzle ? 1024 : 128))
        fail("TMA destination not aligned (128 bytes; 1024 with the 128-byte swizzle)");
    if (t.swizzle && t.box[0] * 2 != 128) fail("TMA: the 128-byte swizzle needs 128-byte box rows");
    if (!b.wg_reads.empty())
        for (uint64_t o = off; o < off + bytes; o += 16)
            if (b.wg_reads[o / 16] != 0) fail("TMA into shared memory that an unfinished wgmma reads");
    MBar& m = mbar_of(bar, "TMA complete_tx");
    if (!m.init_fenced)
        fail("TMA completes on an mbarrier whose initialisation was not fenced "
             "(fence.mbarrier_init by the initialising thread)");
    TmaCopy c;
    c.dst = d;
    c.swizzle128 = t.swizzle == 128;
    c.src.resize((size_t)t.box[0] * t.box[1]);
    for (uint32_t j = 0; j < t.box[1]; ++j)
        for (uint32_t i = 0; i < t.box[0]; ++i) {
            const int64_t x = (int64_t)c0 + i, y = (int64_t)c1 + j;
            const bool in = x >= 0 && y >= 0 && c2 >= 0 && (uint64_t)x < t.dims[0] &&
                            (uint64_t)y < t.dims[1] && (uint64_t)c2 < t.dims[2];
            c.src[(size_t)j * t.box[0] + i] =
                in ? reinterpret_cast<const uint16_t*>(t.addr + (uint64_t)c2 * t.strides[1] +
                                                       (uint64_t)y * t.strides[0] + (uint64_t)x * 2)
                   : nullptr;
        }
    m.copies.push_back(std::move(c));
}

const char* run_grid(const LaunchCfg* cfg, void (*body)(void*), void* ctx) {
    g_error.clear();
#ifdef MMKD_EMU_ASAN
    g_asan_report.clear();
#endif
    if (g_block != nullptr) {
        g_error = "kernel launched from inside a kernel";
        return g_error.c_str();
    }
    dim3 gd{cfg->grid[0], cfg->grid[1], cfg->grid[2]};
    dim3 bd{cfg->block[0], cfg->block[1], cfg->block[2]};
    uint64_t nthreads = (uint64_t)bd.x * bd.y * bd.z;
    if (gd.x == 0 || gd.y == 0 || gd.z == 0 || nthreads == 0 || nthreads > 1024) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u)", gd.x, gd.y,
                      gd.z, bd.x, bd.y, bd.z);
        g_error = buf;
        return g_error.c_str();
    }
    Block b;
    b.bdim = bd;
    b.gdim = gd;
    b.nthreads = (unsigned)nthreads;
    b.fibers.resize(b.nthreads);
    b.warps.resize((b.nthreads + 31) / 32);
    b.order.resize(b.nthreads);
    b.body = body;
    b.ctx = ctx;
    std::vector<unsigned char> smem(cfg->shared_bytes + 1040);
    // Dynamic shared memory starts 16 bytes past a 1024-byte boundary: 16-byte aligned, as all
    // a kernel may assume, and no more, so code that needs 1024-byte alignment (the 128-byte
    // swizzle's pattern) must align itself here as on the GPU. It starts poisoned (0xff bytes:
    // NaN as float and bf16), so a read of something no thread wrote shows up.
    uintptr_t base = reinterpret_cast<uintptr_t>(smem.data());
    b.dyn_smem = smem.data() + ((1024 - base % 1024) % 1024) + 16;
    b.dyn_bytes = cfg->shared_bytes;
#ifdef MMKD_EMU_ASAN
    // The slack around dynamic shared memory is off limits, as it is on the GPU.
    ASAN_POISON_MEMORY_REGION(smem.data(), (size_t)(b.dyn_smem - smem.data()));
    ASAN_POISON_MEMORY_REGION(b.dyn_smem + b.dyn_bytes,
                              (size_t)(smem.data() + smem.size() - (b.dyn_smem + b.dyn_bytes)));
#endif
    std::vector<char*> stacks(b.nthreads);
    for (auto& s : stacks) s = static_cast<char*>(std::malloc(kStackBytes));
    Schedule sch = current_schedule();
    uint64_t rng = sch.seed;
    b.greedy = sch.mode == 3;
    bool ok = true;
    g_block = &b;
    for (unsigned z = 0; z < gd.z && ok; ++z)
        for (unsigned y = 0; y < gd.y && ok; ++y)
            for (unsigned x = 0; x < gd.x && ok; ++x) {
                b.bidx = dim3{x, y, z};
                std::memset(b.dyn_smem, 0xff, cfg->shared_bytes);
                b.wg_reads.clear();
                b.generic_writer.clear();
                b.mbars.clear();
                for (unsigned i = 0; i < b.nthreads; ++i) b.order[i] = sch.mode == 1 ? b.nthreads - 1 - i : i;
                if (sch.mode == 2)
                    for (unsigned i = b.nthreads; i > 1; --i) {
                        unsigned j = (unsigned)(splitmix(rng) % i);
                        unsigned tmp = b.order[i - 1];
                        b.order[i - 1] = b.order[j];
                        b.order[j] = tmp;
                    }
                ok = run_block(b, stacks);
            }
    g_block = nullptr;
#ifdef MMKD_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(smem.data(), smem.size());
#endif
    for (auto s : stacks) std::free(s);
    return ok ? nullptr : g_error.c_str();
}

}  // namespace mmkd_emu

/// Sets the fiber order for launches on this OS thread: 0 forward, 1 reverse, 2 shuffled by
/// `seed`; -1 returns to the default (MMKD_EMU_SCHEDULE, else forward). `eager_copies` != 0:
/// cp.async copies land when issued.
extern "C" void mmkd_emu_set_schedule(int mode, uint64_t seed, int eager_copies) {
    mmkd_emu::g_schedule.mode = mode;
    mmkd_emu::g_schedule.seed = seed;
    mmkd_emu::g_schedule.eager_copies = eager_copies != 0;
}

/// Marks host memory off limits to instrumented code (on != 0) or back in bounds; a no-op
/// unless the emulation is built with AddressSanitizer.
extern "C" void mmkd_emu_poison(const void* ptr, size_t bytes, int on) {
#ifdef MMKD_EMU_ASAN
    if (on) ASAN_POISON_MEMORY_REGION(ptr, bytes);
    else ASAN_UNPOISON_MEMORY_REGION(ptr, bytes);
#else
    (void)ptr;
    (void)bytes;
    (void)on;
#endif
}
