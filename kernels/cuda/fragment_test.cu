// fragment_test.cu: one-warp kernels that exercise the matrix-fragment instructions of the
// prelude (mma.sync m16n8k16 bf16, ldmatrix x1/x2/x4 with and without .trans, cp.async), so the
// emulation's fragment layouts are tested against a plain matrix product and against the
// PTX ISA's layout tables, and the compile gate sees tensor-core instructions in the SASS.
//
// Defines: frag_mma_direct, frag_mma_ldmatrix, frag_ldmatrix_dump. Launch: grid (1), block (32).
#include "prelude.cuh"

// D = A·B + C with fragments built straight from global memory per the PTX ISA tables.
MMKD_KERNEL void frag_mma_direct(const mmkd_bf16* __restrict__ A,  // (16, 16) row-major
                                 const mmkd_bf16* __restrict__ B,  // (16, 8) row-major (k, n)
                                 const float* __restrict__ C,      // (16, 8)
                                 float* __restrict__ D) {          // (16, 8) out
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned a[4], b[2];
    a[0] = pack_bf16x2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
    a[1] = pack_bf16x2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
    a[2] = pack_bf16x2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
    a[3] = pack_bf16x2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
    b[0] = pack_bf16x2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
    b[1] = pack_bf16x2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                  C[(g + 8) * 8 + 2 * t + 1]};
    mma_m16n8k16_bf16(c, a, b, c);  // accumulate in place, as GEMM loops do
    D[g * 8 + 2 * t] = c[0];
    D[g * 8 + 2 * t + 1] = c[1];
    D[(g + 8) * 8 + 2 * t] = c[2];
    D[(g + 8) * 8 + 2 * t + 1] = c[3];
}
MMKD_EXPORT(frag_mma_direct)

// The same product with operands staged through shared memory by cp.async and loaded by
// ldmatrix: A by x4, B once by x2 from its (n, k) copy and once by x2.trans from its (k, n) copy.
// D1 and D2 must both equal A·B + C.
MMKD_KERNEL void frag_mma_ldmatrix(const mmkd_bf16* __restrict__ A,   // (16, 16) row-major
                                   const mmkd_bf16* __restrict__ B,   // (16, 8) (k, n)
                                   const mmkd_bf16* __restrict__ Bt,  // (8, 16) (n, k)
                                   const float* __restrict__ C,       // (16, 8)
                                   float* __restrict__ D1,            // (16, 8) out
                                   float* __restrict__ D2) {          // (16, 8) out
    __shared__ __align__(16) mmkd_bf16 sA[16 * 16];
    __shared__ __align__(16) mmkd_bf16 sB[16 * 8];
    __shared__ __align__(16) mmkd_bf16 sBt[8 * 16];
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    // 16-byte chunks: A has 32, B 16, Bt 16; one A chunk per lane, B/Bt by lanes 0..15.
    cp_async_16(sA + lane * 8, A + lane * 8);
    if (lane < 16) {
        cp_async_16(sB + lane * 8, B + lane * 8);
        cp_async_16(sBt + lane * 8, Bt + lane * 8);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncwarp();
    unsigned a[4], b1[2], b2[2];
    // x4 matrices: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15 (= a0, a1, a2, a3).
    ldmatrix_x4(a, sA + (lane % 16) * 16 + (lane / 16) * 8);
    // (n, k) copy: matrix 0 = k 0-7, matrix 1 = k 8-15; rows are n. Lanes 16-31 repeat 0-15.
    ldmatrix_x2(b1, sBt + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
    // (k, n) copy, transposed on load: matrix 0 = rows k 0-7, matrix 1 = rows k 8-15.
    ldmatrix_x2_trans(b2, sB + (lane % 16) * 8);
    float c1[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                   C[(g + 8) * 8 + 2 * t + 1]};
    float c2[4] = {c1[0], c1[1], c1[2], c1[3]};
    float d1[4], d2[4];
    mma_m16n8k16_bf16(d1, a, b1, c1);
    mma_m16n8k16_bf16(d2, a, b2, c2);
    D1[g * 8 + 2 * t] = d1[0];
    D1[g * 8 + 2 * t + 1] = d1[1];
    D1[(g + 8) * 8 + 2 * t] = d1[2];
    D1[(g + 8) * 8 + 2 * t + 1] = d1[3];
    D2[g * 8 + 2 * t] = d2[0];
    D2[g * 8 + 2 * t + 1] = d2[1];
    D2[(g + 8) * 8 + 2 * t] = d2[2];
    D2[(g + 8) * 8 + 2 * t + 1] = d2[3];
}
MMKD_EXPORT(frag_mma_ldmatrix)

// Raw ldmatrix registers for the layout test. M holds four 8x8 matrices, matrix i at rows
// 8i..8i+7 of a (32, 8) row-major array; lane L points at row L (all x-variants use the first
// 8·count lanes). out (6, 32, 4): x1, x2, x4, x1.trans, x2.trans, x4.trans; unused registers 0.
MMKD_KERNEL void frag_ldmatrix_dump(const mmkd_bf16* __restrict__ M,  // (32, 8)
                                    unsigned* __restrict__ out) {    // (6, 32, 4) out
    __shared__ __align__(16) mmkd_bf16 sM[32 * 8];
    const int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) sM[lane * 8 + i] = M[lane * 8 + i];
    __syncwarp();
    const mmkd_bf16* row = sM + lane * 8;
    unsigned r[6][4] = {};
    ldmatrix_x1(r[0], row);
    ldmatrix_x2(r[1], row);
    ldmatrix_x4(r[2], row);
    ldmatrix_x1_trans(r[3], row);
    ldmatrix_x2_trans(r[4], row);
    ldmatrix_x4_trans(r[5], row);
#pragma unroll
    for (int v = 0; v < 6; ++v)
#pragma unroll
        for (int i = 0; i < 4; ++i) out[(v * 32 + lane) * 4 + i] = r[v][i];
}
MMKD_EXPORT(frag_ldmatrix_dump)
