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
template <int N>
MMKD_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}
MMKD_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;"); }

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

#endif  // MMKD_PRELUDE_CUH
