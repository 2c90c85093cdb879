// wgmma_test.cu: one warpgroup multiplies through wgmma (sm_90a), so the emulation's
// descriptor decoding, accumulator layout and deferred completion are tested against a plain
// matrix product, and the compile gate sees HGMMA in the SASS.
//
// Defines: frag_wgmma (both operands K-major), frag_wgmma_mn (both MN-major, through the
// instruction's transpose flags). Launch: grid (1), block (128), dynamic shared memory 6144
// bytes.
// Test-only variant: MMKD_WGMMA_EARLY_READ stores the accumulators before waiting for the
// product, which must read the values from before it.
// mmkd-emu-variant: early_read MMKD_WGMMA_EARLY_READ
#include "prelude.cuh"

// Byte offset of the 16-byte chunk (r, kc) (row r, k = 8kc .. 8kc + 7) of a K-major operand of
// 16 k in the no-swizzle canonical layout: core matrices of 8 rows × 16 bytes, the two k halves
// 128 bytes apart (LBO), successive groups of 8 rows 256 bytes apart (SBO).
MMKD_DEVICE int wgt_chunk(int r, int kc) { return ((r / 8) * 2 + kc) * 128 + (r % 8) * 16; }

// Index in the row-major (64, 128) accumulator matrix of this thread's d[4j + i]: rows
// 16(t/32) + (t%32)/4 (+8), columns 8j + 2(t%4) (+1).
MMKD_DEVICE int wgt_elem(int j, int i) {
    const int t = threadIdx.x;
    return (16 * (t / 32) + (t % 32) / 4 + (i / 2) * 8) * 128 + 8 * j + 2 * (t % 4) + (i % 2);
}

// D = A·Bᵀ + C. A (64, 16), B (128, 16) row-major (n, k), C and D (64, 128) fp32.
MMKD_KERNEL void frag_wgmma(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                            const float* __restrict__ C, float* __restrict__ D) {
    MMKD_DYNAMIC_SMEM(unsigned char, smem);
    unsigned char* sa = smem;         // 64 rows: 2048 bytes
    unsigned char* sb = smem + 2048;  // 128 rows: 4096 bytes
    const int t = threadIdx.x;
    // A by cp.async (one chunk per thread), B by ordinary 16-byte stores (two per thread).
    cp_async_16(sa + wgt_chunk(t / 2, t % 2), A + (t / 2) * 16 + (t % 2) * 8);
    cp_async_commit();
    for (int c = t; c < 256; c += 128)
        store_u32x4(sb + wgt_chunk(c / 2, c % 2), load_u32x4(B + (c / 2) * 16 + (c % 2) * 8));
    cp_async_wait<0>();
    fence_proxy_async();  // the writes above are read by the tensor cores' proxy
    __syncthreads();

    float d[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) d[j] = C[wgt_elem(j / 4, j % 4)];
    wgmma_fence();
    wgmma_hold(d);
    wgmma_m64n128k16_bf16(d, wgmma_desc(sa, 128, 256), wgmma_desc(sb, 128, 256));
    wgmma_commit();
#ifdef MMKD_WGMMA_EARLY_READ
    float early[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) early[i] = d[i];
#endif
    wgmma_wait<0>();
    wgmma_hold(d);
#ifdef MMKD_WGMMA_EARLY_READ
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = early[i];
#endif
#pragma unroll
    for (int j = 0; j < 64; ++j) D[wgt_elem(j / 4, j % 4)] = d[j];
}
MMKD_EXPORT(frag_wgmma)

// Byte offset of the 16-byte chunk (k, c) (k, rows 8c .. 8c + 7) of an MN-major operand of 16 k
// with `groups` groups of 8 rows: core matrices of 8 k × 16 bytes; here, unlike the K-major
// test, the row groups are adjacent (SBO 128) and the two k halves far apart (LBO 128·groups),
// so a hardware run tells the two offsets apart.
MMKD_DEVICE int wgt_chunk_mn(int k, int c, int groups) {
    return (k / 8) * 128 * groups + c * 128 + (k % 8) * 16;
}

// D = A·Bᵀ + C as frag_wgmma, with the operands stored transposed: At (16, 64) = Aᵀ and
// Bt (16, 128) = Bᵀ, row-major (k, m) and (k, n).
MMKD_KERNEL void frag_wgmma_mn(const mmkd_bf16* __restrict__ At, const mmkd_bf16* __restrict__ Bt,
                               const float* __restrict__ C, float* __restrict__ D) {
    MMKD_DYNAMIC_SMEM(unsigned char, smem);
    unsigned char* sa = smem;         // 8 row groups: 2048 bytes
    unsigned char* sb = smem + 2048;  // 16 row groups: 4096 bytes
    const int t = threadIdx.x;
    cp_async_16(sa + wgt_chunk_mn(t / 8, t % 8, 8), At + (t / 8) * 64 + (t % 8) * 8);
    cp_async_commit();
    for (int c = t; c < 256; c += 128)
        store_u32x4(sb + wgt_chunk_mn(c / 16, c % 16, 16),
                    load_u32x4(Bt + (c / 16) * 128 + (c % 16) * 8));
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();

    float d[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) d[j] = C[wgt_elem(j / 4, j % 4)];
    wgmma_fence();
    wgmma_hold(d);
    wgmma_m64n128k16_bf16<1, 1>(d, wgmma_desc(sa, 128 * 8, 128), wgmma_desc(sb, 128 * 16, 128));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(d);
#pragma unroll
    for (int j = 0; j < 64; ++j) D[wgt_elem(j / 4, j % 4)] = d[j];
}
MMKD_EXPORT(frag_wgmma_mn)
