// prelude.cuh: the one place where kernels touch the hardware.
//
// Every kernel source (`kernels/cuda/*.cu`) includes this header first and uses only what it
// defines for thread indices, barriers, warp exchange, atomics, bf16 conversion, vector loads and
// the matrix-fragment instructions. Two builds read it:
//   - NVRTC (`__CUDACC_RTC__` defined): everything maps to CUDA intrinsics or inline PTX.
//   - the host C++ compiler (emulation, `kernels/build.rs`): everything maps to `mmkd_emu.h`,
//     which runs the kernel on the CPU with CUDA's execution semantics (see kernels/README.md).
//
// Names a kernel may use from here:
//   threadIdx blockIdx blockDim gridDim, __syncthreads(), __syncwarp()
//   MMKD_KERNEL (extern "C" __global__), MMKD_DEVICE (inline device function),
//   MMKD_DYNAMIC_SMEM(type, name)             dynamic shared memory
//   __shfl_sync __shfl_xor_sync __shfl_down_sync __shfl_up_sync (float, int, unsigned)
//   __ballot_sync __all_sync __any_sync, atomicAdd (float, int, unsigned)
//   mmkd_bf16 (16-bit storage type), bf16_to_f32, f32_to_bf16 (round to nearest even),
//   f16_to_f32, f32_to_f16, pack_bf16x2, load_u32x4 / store_u32x4 (16-byte vector access)
//   mma_m16n8k16_bf16(d[4], a[4], b[2], c[4])  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   ldmatrix_x1/x2/x4 and ldmatrix_x1/x2/x4_trans (shared memory, .b16)
//   cp_async_16/8/4 (shared dst, global src), cp_async_commit(), cp_async_wait<N>(), cp_async_wait_all()
//   MMKD_EXPORT(kernel) after each kernel: the emulation's C entry point (nothing under NVRTC).
//   smem_addr(p)                              a shared-memory address (for alignment arithmetic)
//   mmkd_act(v, kind), mmkd_act_grad(v, kind)   GELU (erf) and QuickGELU and their derivatives
//   gemm_store2(...)                     the GEMM epilogue shared by gemm.cu and the wgmma GEMMs
//   wg_epilogue, wg_dbias_add8, wg_dbias_store   what the two wgmma GEMM files share
//   Hopper, for files compiled for sm_90a only (MinArch::Sm90a):
//   wgmma_desc(smem, lbo, sbo)      matrix descriptor of a no-swizzle operand in dynamic shared
//                                   memory: core matrices of 128 contiguous bytes, `lbo` bytes
//                                   apart along K, `sbo` apart along M/N. A K-major core matrix
//                                   is 8 rows x 8 k (16 bytes per row); an MN-major one is 8 k x
//                                   8 rows (16 bytes per k, the rows contiguous)
//   wgmma_m64n128k16_bf16<TA, TB>(d[64], desc_a, desc_b)   D += A·Bᵀ, issued by a whole
//                                   warpgroup; TA/TB = 1 for an MN-major operand (default 0);
//                                   thread t of the group holds rows 16(t/32) + (t%32)/4 (+8)
//                                   and columns 8j + 2(t%4) (+1) of D: d[4j..4j+3]
//   wgmma_desc_sw128(smem, lbo, sbo)   the same for the 128-byte swizzle (see gemm_wgmma_tma.cu
//                                   for the two majors' layouts); the tile must be 1024-byte aligned
//   mmkd_tensor_map                 a CUtensorMap (128 bytes, 128-byte aligned), passed to kernels
//                                   as `const __grid_constant__ mmkd_tensor_map`
//   mbarrier_init(bar, count), fence_barrier_init(), mbarrier_arrive_expect_tx(bar, bytes),
//   mbarrier_arrive(bar), mbarrier_wait(bar, parity)
//                                   mbarriers (`unsigned long long` in shared memory)
//   wgmma_m64n256k16_bf16<TA, TB>(d[128], desc_a, desc_b)   the same as m64n128k16 with 256
//                                   columns of D: d[4j..4j+3] for columns 8j .. 8j + 7
//   wgmma_hold_n<N>(d)              wgmma_hold for N accumulators
//   setmaxnreg_inc<N>(), setmaxnreg_dec<N>()   a warpgroup's register budget (warp-specialised
//                                   kernels with __launch_bounds__(threads, 1))
//   tma_load_3d(smem, &map, c0, c1, c2, bar)   one box of the map's tensor at (c0, c1, c2) into
//                                   shared memory, completing `bytes` on `bar`
//   wgmma_fence() before the first wgmma that reads accumulators written by other code,
//   wgmma_hold(d) around issue and wait (pins the accumulators in their registers),
//   wgmma_commit(), wgmma_wait<N>() (all but the newest N committed groups are done), and
//   fence_proxy_async() after ordinary or cp.async writes to shared memory that wgmma reads.
#ifndef MMKD_PRELUDE_CUH
#define MMKD_PRELUDE_CUH

#ifdef __CUDACC_RTC__
// ============================================================================================
// Device build (NVRTC)
// ============================================================================================
typedef unsigned short mmkd_bf16;  // raw bits: one storage type for both builds

#define MMKD_KERNEL extern "C" __global__
#define MMKD_DEVICE __device__ __forceinline__
#define MMKD_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define MMKD_EXPORT(kernel)

MMKD_DEVICE float bf16_to_f32(mmkd_bf16 h) { return __uint_as_float(((unsigned)h) << 16); }
MMKD_DEVICE mmkd_bf16 f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
MMKD_DEVICE float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
MMKD_DEVICE unsigned short f32_to_f16(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

struct mmkd_u32x4 { unsigned x, y, z, w; };
MMKD_DEVICE mmkd_u32x4 load_u32x4(const void* p) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    mmkd_u32x4 r = {v.x, v.y, v.z, v.w};
    return r;
}
MMKD_DEVICE void store_u32x4(void* p, mmkd_u32x4 v) {
    *reinterpret_cast<uint4*>(p) = make_uint4(v.x, v.y, v.z, v.w);
}

MMKD_DEVICE unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// D = A * B + C; fragments as in the PTX ISA, "Matrix Fragments for mma.m16n8k16".
MMKD_DEVICE void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                   const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

MMKD_DEVICE void ldmatrix_x1(unsigned r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(smem_addr(row)));
}
MMKD_DEVICE void ldmatrix_x2(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
MMKD_DEVICE void ldmatrix_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
MMKD_DEVICE void ldmatrix_x1_trans(unsigned r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
                 : "=r"(r[0]) : "r"(smem_addr(row)));
}
MMKD_DEVICE void ldmatrix_x2_trans(unsigned r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
MMKD_DEVICE void ldmatrix_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}

MMKD_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src));
}
MMKD_DEVICE void cp_async_8(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src));
}
MMKD_DEVICE void cp_async_4(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src));
}
MMKD_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// The waits clobber memory so that the compiler keeps every shared-memory read of the copied
// data after them, barrier or not.
template <int N>
MMKD_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
MMKD_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }


// ---- Hopper (sm_90a only; the files that use these are compiled for sm_90a alone) ----------
// wgmma: the four warps of a warpgroup (128 consecutive threads starting at a multiple of 128)
// multiply operands that sit in shared memory, described by 64-bit matrix descriptors, into
// fp32 accumulators in registers; issue, commit and wait are asynchronous (see prelude docs).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
MMKD_DEVICE unsigned long long wgmma_desc(const void* smem, unsigned lbo_bytes, unsigned sbo_bytes) {
    // Start address, leading and stride byte offsets, each >> 4 in 14 bits; no swizzle.
    return (unsigned long long)((smem_addr(smem) & 0x3FFFFu) >> 4) |
           ((unsigned long long)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
           ((unsigned long long)((sbo_bytes >> 4) & 0x3FFFu) << 32);
}
MMKD_DEVICE unsigned long long wgmma_desc_sw128(const void* smem, unsigned lbo_bytes,
                                                unsigned sbo_bytes) {
    return wgmma_desc(smem, lbo_bytes, sbo_bytes) | (1ull << 62);  // layout type 1: 128-byte swizzle
}
MMKD_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

struct __align__(128) mmkd_tensor_map {
    unsigned long long opaque[16];
};
MMKD_DEVICE void mbarrier_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count)
                 : "memory");
}
// Makes initialised mbarriers visible to the tensor-copy (async) proxy.
MMKD_DEVICE void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
MMKD_DEVICE void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
// One arrival (release: this thread's earlier shared-memory accesses happen before the phase
// completes for whoever waits on it).
MMKD_DEVICE void mbarrier_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
template <int N>
MMKD_DEVICE void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
MMKD_DEVICE void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
MMKD_DEVICE void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred p;\nmmkd_wait:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra mmkd_wait;\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
MMKD_DEVICE void tma_load_3d(void* dst, const mmkd_tensor_map* map, int c0, int c1, int c2,
                             unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2),
        "r"(smem_addr(bar))
        : "memory");
}
MMKD_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
MMKD_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
MMKD_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Declares plain stores of `bytes` at `p` in shared memory that a wgmma will read: nothing on
// the GPU; the emulation then requires a fence.proxy.async before that read, as it does for
// 16-byte stores and cp.async.
MMKD_DEVICE void note_generic_write(const void*, int) {}
// Keeps the compiler from moving accesses of the accumulators across an issue or a wait.
template <int N>
MMKD_DEVICE void wgmma_hold_n(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
MMKD_DEVICE void wgmma_hold(float d[64]) { wgmma_hold_n<64>(d); }
// D(64 x 128) += A(64 x 16) · B(128 x 16)ᵀ, operands in shared memory; TA/TB = 1: that
// operand is MN-major (the instruction's imm-trans-a/-b), else K-major.
template <int TA = 0, int TB = 0>
MMKD_DEVICE void wgmma_m64n128k16_bf16(float d[64], unsigned long long desc_a,
                                       unsigned long long desc_b) {
    // scale-d is a predicate: set, so D accumulates (accumulators start from zeros).
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB)
        : "memory");
}
// D(64 x 256) += A(64 x 16) · B(256 x 16)ᵀ: as wgmma_m64n128k16_bf16 with 256 columns.
template <int TA = 0, int TB = 0>
MMKD_DEVICE void wgmma_m64n256k16_bf16(float d[128], unsigned long long desc_a,
                                       unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %131, %132;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TA), "n"(TB)
        : "memory");
}
#endif

#else
// ============================================================================================
// Host build (emulation)
// ============================================================================================
#include "mmkd_emu.h"
#endif

// ---- shared by both builds -------------------------------------------------------------------
MMKD_DEVICE unsigned pack_bf16x2(mmkd_bf16 lo, mmkd_bf16 hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

// ---- activations (elementwise.cu's act_fwd/act_bwd and the GEMM epilogue) -------------------
// kind 1: GELU, erf form (BERT): x Φ(x); kind 2: QuickGELU (CLIP): x σ(1.702 x); else identity.
MMKD_DEVICE float mmkd_act(float v, int kind) {
    if (kind == 1) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (kind == 2) return v * (1.0f / (1.0f + expf(-1.702f * v)));
    return v;
}
// d/dv of mmkd_act.
MMKD_DEVICE float mmkd_act_grad(float v, int kind) {
    if (kind == 1) {
        // Φ(v) + v φ(v)
        const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        return cdf + v * 0.39894228040143268f * expf(-0.5f * v * v);
    }
    if (kind == 2) {
        const float s = 1.0f / (1.0f + expf(-1.702f * v));
        return s + 1.702f * v * s * (1.0f - s);
    }
    return 1.0f;
}

// ---- the GEMM epilogue (gemm.cu, gemm_wgmma.cu, gemm_wgmma_tma.cu) ---------------------------
// `act` = kind | mode: bits 0-1 the activation kind (mmkd_act), bits 2-3 what `aux`
// ((batch, M, ldc) bf16, C's layout) is:
//   GEMM_AUX_RESIDUAL  null, or a residual added after the activation;
//   GEMM_AUX_SAVE      written: the pre-activation v + bias, rounded to bf16; the activation is
//                      applied to that rounded value, so C and aux are exactly what a separate
//                      activation kernel reading aux would pair (a linear layer + activation
//                      whose backward needs its input);
//   GEMM_AUX_GRAD      read: a saved pre-activation u; C = v · act'(u) (the input gradient of
//                      the layer before the activation, fused with the activation's backward).
#define GEMM_AUX_RESIDUAL 0
#define GEMM_AUX_SAVE 4
#define GEMM_AUX_GRAD 8

// The sums v of C(row, col) and C(row, col + 1) (the second only when `two`) at element `idx`
// of C through the epilogue `act` (above), stored as bf16 or fp32 (`out_f32`). `pair`: C's row
// length and base allow one 4-byte (bf16) or 8-byte (fp32) store of both (aux shares them).
MMKD_DEVICE void gemm_store2(float v[2], bool two, bool pair, long idx, int col,
                             const mmkd_bf16* __restrict__ bias, mmkd_bf16* __restrict__ aux,
                             int act, void* __restrict__ C, int out_f32) {
    const int kind = act & 3, mode = act & 12;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (e == 1 && !two) break;
        if (bias != nullptr) v[e] += bf16_to_f32(bias[col + e]);
        if (mode == GEMM_AUX_SAVE) {
            const mmkd_bf16 u = f32_to_bf16(v[e]);
            aux[idx + e] = u;
            v[e] = mmkd_act(bf16_to_f32(u), kind);
        } else if (mode == GEMM_AUX_GRAD) {
            v[e] *= mmkd_act_grad(bf16_to_f32(aux[idx + e]), kind);
        } else {
            v[e] = mmkd_act(v[e], kind);
            if (aux != nullptr) v[e] += bf16_to_f32(aux[idx + e]);
        }
    }
    if (two && pair) {
        if (out_f32) {
            *reinterpret_cast<unsigned long long*>(static_cast<float*>(C) + idx) =
                (unsigned long long)__float_as_uint(v[0]) |
                ((unsigned long long)__float_as_uint(v[1]) << 32);
        } else {
            *reinterpret_cast<unsigned*>(static_cast<mmkd_bf16*>(C) + idx) =
                pack_bf16x2(f32_to_bf16(v[0]), f32_to_bf16(v[1]));
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        if (e == 1 && !two) break;
        if (out_f32)
            static_cast<float*>(C)[idx + e] = v[e];
        else
            static_cast<mmkd_bf16*>(C)[idx + e] = f32_to_bf16(v[e]);
    }
}

// ---- shared by the wgmma GEMMs (gemm_wgmma.cu, gemm_wgmma_tma.cu) ----------------------------
// The bias gradient: thread t of a block of 256 owns rows 8(t/16) .. +7 of the 128-row tile
// and sums them over its share of k, one 16-byte chunk (8 bf16) at a time.
MMKD_DEVICE void wg_dbias_add8(float db[8], const void* chunk) {
    const mmkd_u32x4 v = load_u32x4(chunk);
    const unsigned w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        db[2 * e] += bf16_to_f32((mmkd_bf16)(w4[e] & 0xffffu));
        db[2 * e + 1] += bf16_to_f32((mmkd_bf16)(w4[e] >> 16));
    }
}
// Adds up the sums of the sixteen owners of a row group (lanes 16h .. 16h + 15 of one warp) and
// stores rows m0 + 8(t/16) + e below M of `dbias` (already offset to the batch); t: the
// thread's index among the 256 that sum (threadIdx.x, or less the warpgroups before them).
MMKD_DEVICE void wg_dbias_store(float db[8], float* __restrict__ dbias, int m0, int M, int t) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
        for (int o = 8; o > 0; o /= 2) db[e] += __shfl_xor_sync(0xffffffffu, db[e], o);
    const int row = m0 + (t / 16) * 8;
    if (t % 16 == 0)
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (row + e < M) dbias[row + e] = db[e];
}
// The epilogue of warpgroup wg's 64 × 8NJ accumulators (rows m0 + 64 wg .., columns n0 ..):
// warp w of the group holds rows 16w + g (+8), columns 8j + 2q (+1) in acc[4j .. 4j + 3]
// (g = lane/4, q = lane%4). The two columns go out as one store when they are adjacent in
// memory and aligned. `cbase`: the batch's first element of C.
template <int NJ = 16>
MMKD_DEVICE void wg_epilogue(const float* acc, int m0, int n0, int wg, long cbase, int M, int N,
                             int ldc, const mmkd_bf16* __restrict__ bias,
                             mmkd_bf16* __restrict__ aux, void* __restrict__ C, int act,
                             int out_f32) {
    const int w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    // The batch offset must keep pairs aligned too (even for every shape used today).
    const bool cpair = ldc % 2 == 0 && cbase % 2 == 0 &&
                       (reinterpret_cast<unsigned long long>(C) & (out_f32 ? 7ull : 3ull)) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = m0 + wg * 64 + 16 * w + g + h * 8;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const int col = n0 + 8 * j + 2 * q;
            if (col >= N) continue;
            const bool two = col + 1 < N;
            float v[2] = {acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]};
            gemm_store2(v, two, cpair, cbase + (long)row * ldc + col, col, bias, aux, act, C,
                        out_f32);
        }
    }
}

#endif  // MMKD_PRELUDE_CUH
