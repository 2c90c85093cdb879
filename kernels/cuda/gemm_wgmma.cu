// gemm_wgmma.cu: the forward product Y = X·Wᵀ (+ bias, act, + residual) on Hopper's warpgroup
// tensor-core instruction (wgmma, sm_90a). Same parameters, epilogue and results as gemm_fwd in
// gemm.cu (A (M, K), B (N, K), both K-contiguous), which stays the path for other GPUs.
//
// Tiling: block tile 128 (m) × 128 (n) × 64 (k), two warpgroups of 64 × 128 (256 threads), each
// k tile four wgmma m64n128k16 per warpgroup with both operands read from shared memory. One
// k tile's products stay in flight while the next tile's are issued (wgmma_wait<1>), and
// cp.async fetches two tiles ahead into a WG_STAGES = 4 ring: the stage refilled at step kt
// held tile kt - 2, whose products every warpgroup has waited for before the barrier of step
// kt. Shared tiles use the no-swizzle canonical layout: core
// matrices of 8 rows × 16 bytes (8 k) stored as 128 contiguous bytes, the 8 k-groups of a row
// group 128 bytes apart (the descriptor's leading byte offset) and row groups 1024 bytes apart
// (its stride byte offset). A warp's 16-byte copies fill 512 contiguous bytes, so the stores do
// not conflict, and each core matrix the tensor cores read is one contiguous 128-byte line.
// Any M, N, K: chunks that are fully inside the matrix and aligned go by cp.async, the rest
// element by element with zero fill.
//
// Launch: grid (ceil(N/128), ceil(M/128), batch), block (256), dynamic shared memory
// WG_SMEM_BYTES (131072: the kernel must opt in above 48 KiB).
//
// Defines: gemm_fwd_wgmma.
// Test-only variants, each refilling a stage while a wgmma that reads it may still run:
// MMKD_WG_BROKEN_WAIT does not wait inside the k loop; MMKD_WG_AHEAD3 fetches three tiles
// ahead, one too many for four stages with one k tile's products in flight.
// mmkd-emu-variant: broken_wait MMKD_WG_BROKEN_WAIT
// mmkd-emu-variant: ahead3 MMKD_WG_AHEAD3
#include "prelude.cuh"

#define WG_BM 128
#define WG_BN 128
#define WG_BK 64
#define WG_STAGES 4
#ifdef MMKD_WG_AHEAD3
#define WG_AHEAD 3
#else
#define WG_AHEAD 2  // tiles fetched ahead of the one computed
#endif
#define WG_THREADS 256
#define WG_TILE_BYTES (128 * WG_BK * 2)  // one operand tile: 16384 bytes
#define WG_SMEM_BYTES (WG_STAGES * 2 * WG_TILE_BYTES)
#define WG_LBO 128   // bytes between the core matrices of adjacent k-groups
#define WG_SBO 1024  // bytes between the core matrices of adjacent 8-row groups

// Copies rows r0.. r0+127, k0.. k0+63 of a row-major (rows, K) matrix with row length ld into
// one shared tile in the canonical layout; outside the matrix it writes zeros. Chunk p of the
// tile (16 bytes at byte 16p) holds row 8(p/64) + p%8, k-group (p/8)%8.
MMKD_DEVICE void wg_load_tile(unsigned char* s, const mmkd_bf16* __restrict__ g, int ld, int rows,
                              int K, int r0, int k0, bool vec) {
#pragma unroll
    for (int it = 0; it < 128 * 8 / WG_THREADS; ++it) {
        const int p = it * WG_THREADS + threadIdx.x;
        const int r = (p / 64) * 8 + p % 8, kg = (p / 8) % 8;
        const int gr = r0 + r, gk = k0 + kg * 8;
        mmkd_bf16* d = reinterpret_cast<mmkd_bf16*>(s + p * 16);
        const mmkd_bf16* src = g + (long)gr * ld + gk;
        if (vec && gr < rows && gk + 8 <= K) {
            cp_async_16(d, src);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) d[j] = (gr < rows && gk + j < K) ? src[j] : 0;
        }
    }
}

// Y = X·Wᵀ (+ bias, act, + residual). A (batch, M, lda ≥ K), B (batch, N, ldb ≥ K); `dbias`
// must be null (the forward layout reduces no bias gradient).
MMKD_KERNEL void gemm_fwd_wgmma(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                                const mmkd_bf16* __restrict__ bias,
                                const mmkd_bf16* __restrict__ res, void* __restrict__ C,
                                float* __restrict__ dbias, int M, int N, int K, int lda, int ldb,
                                int ldc, int sa, int sb, int sc, int act, int out_f32) {
    (void)dbias;
    MMKD_DYNAMIC_SMEM(unsigned char, smem);
    unsigned char* As = smem;                                // (STAGES, tile)
    unsigned char* Bs = smem + WG_STAGES * WG_TILE_BYTES;    // (STAGES, tile)
    const long z = blockIdx.z;
    A += z * sa;
    B += z * sb;
    const int m0 = blockIdx.y * WG_BM, n0 = blockIdx.x * WG_BN;
    const int wg = threadIdx.x / 128;  // warpgroup: rows 64·wg .. 64·wg + 63 of the tile
    const bool avec = (reinterpret_cast<unsigned long long>(A) & 15ull) == 0 && lda % 8 == 0;
    const bool bvec = (reinterpret_cast<unsigned long long>(B) & 15ull) == 0 && ldb % 8 == 0;
    const int KT = (K + WG_BK - 1) / WG_BK;

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

#pragma unroll
    for (int s = 0; s < WG_AHEAD; ++s) {
        if (s < KT) {
            wg_load_tile(As + s * WG_TILE_BYTES, A, lda, M, K, m0, s * WG_BK, avec);
            wg_load_tile(Bs + s * WG_TILE_BYTES, B, ldb, N, K, n0, s * WG_BK, bvec);
        }
        cp_async_commit();  // an empty group keeps the wait count uniform
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<WG_AHEAD - 1>();  // tile kt has landed (this thread's copies)
        fence_proxy_async();           // ... and is visible to the tensor cores' reads
        // Everyone's copies of tile kt are in, and every warpgroup has waited for the products
        // of tile kt - 2 (at most one group, kt - 1, is in flight): its stage can be refilled.
        __syncthreads();
        const int nk = kt + WG_AHEAD;
        if (nk < KT) {
            wg_load_tile(As + (nk % WG_STAGES) * WG_TILE_BYTES, A, lda, M, K, m0, nk * WG_BK, avec);
            wg_load_tile(Bs + (nk % WG_STAGES) * WG_TILE_BYTES, B, ldb, N, K, n0, nk * WG_BK, bvec);
        }
        cp_async_commit();

        const unsigned char* as = As + (kt % WG_STAGES) * WG_TILE_BYTES + wg * 8 * WG_SBO;
        const unsigned char* bs = Bs + (kt % WG_STAGES) * WG_TILE_BYTES;
        wgmma_fence();
        wgmma_hold(acc);
#pragma unroll
        for (int j = 0; j < WG_BK / 16; ++j)  // k 16j .. 16j + 15: k-groups 2j, 2j + 1
            wgmma_m64n128k16_bf16(acc, wgmma_desc(as + 2 * j * WG_LBO, WG_LBO, WG_SBO),
                                  wgmma_desc(bs + 2 * j * WG_LBO, WG_LBO, WG_SBO));
        wgmma_commit();
#ifndef MMKD_WG_BROKEN_WAIT
        wgmma_wait<1>();  // tile kt - 1's products are done; tile kt's may still run
#endif
        wgmma_hold(acc);
    }
    cp_async_wait_all();  // only empty groups remain; nothing may be in flight at exit
    wgmma_wait<0>();
    wgmma_hold(acc);

    // Epilogue from the accumulators: warp w of the group holds rows 16w + g (+8), columns
    // 8j + 2q (+1) in acc[4j .. 4j + 3]. The two columns go out as one store when they are
    // adjacent in memory and aligned.
    const int w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    const long cbase = z * sc;
    const bool cpair = ldc % 2 == 0 && (reinterpret_cast<unsigned long long>(C) &
                                        (out_f32 ? 7ull : 3ull)) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = m0 + wg * 64 + 16 * w + g + h * 8;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int col = n0 + 8 * j + 2 * q;
            if (col >= N) continue;
            const bool two = col + 1 < N;
            float v[2] = {acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]};
            gemm_store2(v, two, cpair, cbase + (long)row * ldc + col, col, bias, res, act, C,
                        out_f32);
        }
    }
}
MMKD_EXPORT(gemm_fwd_wgmma)
