// gemm_wgmma.cu: the three products of gemm.cu, with the same parameters, epilogues and
// results, on Hopper's warpgroup tensor-core instruction (wgmma, sm_90a). gemm.cu stays the path
// for other GPUs.
//
//   gemm_fwd_wgmma    A (M, K), B (N, K)   Y = X·Wᵀ (+ bias, act, + residual)
//   gemm_dgrad_wgmma  A (M, K), B (K, N)   dX = dY·W
//   gemm_wgrad_wgmma  A (K, M), B (K, N)   dW = dYᵀ·X, and dbias(m) = Σ_k A(k, m) when dbias
//                                          is not null (k runs over tokens)
//
// An operand stored with K contiguous is staged K-major; one stored with its M or N contiguous
// is staged MN-major and read through wgmma's transpose flag, so no layout needs a transposed
// copy of anything in global memory.
//
// Tiling: block tile 128 (m) × 128 (n) × 64 (k), two warpgroups of 64 × 128 (256 threads), each
// k tile four wgmma m64n128k16 per warpgroup with both operands read from shared memory. One
// k tile's products stay in flight while the next tile's are issued (wgmma_wait<1>), and
// cp.async fetches two tiles ahead into a WG_STAGES = 4 ring: the stage refilled at step kt
// held tile kt - 2, whose products every warpgroup has waited for before the barrier of step
// kt.
//
// Shared tiles use the no-swizzle canonical layouts, with one geometry for both majors: a core
// matrix is 128 contiguous bytes, the 8 k-groups of a group of 8 rows 128 bytes apart (the
// descriptor's leading byte offset) and row groups 1024 bytes apart (its stride byte offset). A
// K-major core matrix holds 8 rows × 8 k (16 bytes per row), an MN-major one 8 k × 8 rows
// (16 bytes per k). Each thread copies 16-byte chunks; eight consecutive lanes fill one
// 128-byte core matrix, so the shared stores do not conflict, and a warp reads whole 32-byte
// sectors of global memory (8 rows × 64 bytes). Chunks fully inside the matrix and aligned go
// by cp.async, the rest element by element with zero fill: any M, N, K.
//
// The bias gradient of gemm_wgrad_wgmma: the blocks of the first column of tiles sum the A tiles
// they already hold in shared memory. Thread t owns rows 8(t/16) .. +7 of the tile and every
// sixteenth k; the sixteen owners of a row group add up their sums by shuffles at the end, so it
// costs no extra pass over dY and needs no atomics.
//
// Launch: grid (ceil(N/128), ceil(M/128), batch), block (256), dynamic shared memory
// WG_SMEM_BYTES (131072: the kernel must opt in above 48 KiB).
//
// Defines: gemm_fwd_wgmma, gemm_dgrad_wgmma, gemm_wgrad_wgmma.
// Test-only variants, each refilling a stage while a wgmma that reads it may still run:
// MMKD_WG_BROKEN_WAIT does not wait inside the k loop; MMKD_WG_AHEAD3 fetches three tiles
// ahead, one too many for four stages with one k tile's products in flight.
// Two more leave out a fence the hardware needs and the emulation checks: MMKD_WG_NO_PROXY_FENCE
// the fence.proxy.async between the copies and the tensor cores' reads, MMKD_WG_NO_WGMMA_FENCE
// the wgmma.fence before each k tile's products.
// mmkd-emu-variant: broken_wait MMKD_WG_BROKEN_WAIT
// mmkd-emu-variant: ahead3 MMKD_WG_AHEAD3
// mmkd-emu-variant: no_proxy_fence MMKD_WG_NO_PROXY_FENCE
// mmkd-emu-variant: no_wgmma_fence MMKD_WG_NO_WGMMA_FENCE
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

// Copies rows r0 .. r0 + 127 and k0 .. k0 + 63 of an operand into one shared tile in the
// canonical layout; outside the matrix it writes zeros. K-major: the operand is stored
// (rows, K) with row length ld; MN-major: stored (K, rows) with row length ld.
template <bool KMAJOR>
MMKD_DEVICE void wg_load_tile(unsigned char* s, const mmkd_bf16* __restrict__ g, int ld, int rows,
                              int K, int r0, int k0, bool vec) {
#pragma unroll
    for (int it = 0; it < 128 * 8 / WG_THREADS; ++it) {
        const int i = it * WG_THREADS + threadIdx.x;
        // Chunk i: 8 elements along k (K-major) or along the rows (MN-major), from (r, k).
        int r, k, off;
        if (KMAJOR) {
            r = (i / 64) * 8 + i % 8;
            k = ((i / 8) % 8) * 8;
            off = i * 16;
        } else {
            const int kr = i % 8, rg = (i / 8) % 16, kg = i / 128;
            r = rg * 8;
            k = kg * 8 + kr;
            off = rg * WG_SBO + kg * WG_LBO + kr * 16;
        }
        const int gr = r0 + r, gk = k0 + k;
        mmkd_bf16* d = reinterpret_cast<mmkd_bf16*>(s + off);
        const mmkd_bf16* src = KMAJOR ? g + (long)gr * ld + gk : g + (long)gk * ld + gr;
        const bool whole = KMAJOR ? (gr < rows && gk + 8 <= K) : (gk < K && gr + 8 <= rows);
        if (vec && whole) {
            cp_async_16(d, src);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const bool in = KMAJOR ? (gr < rows && gk + j < K) : (gk < K && gr + j < rows);
                d[j] = in ? src[j] : 0;
            }
            note_generic_write(d, 16);  // read by the tensor cores: a proxy fence comes first
        }
    }
}

template <bool A_KMAJOR, bool B_KMAJOR>
MMKD_DEVICE void wg_body(const mmkd_bf16* __restrict__ A,    // see the table above
                         const mmkd_bf16* __restrict__ B,    // see the table above
                         const mmkd_bf16* __restrict__ bias, // (N) or null
                         mmkd_bf16* __restrict__ aux,  // (batch, M, ldc) or null
                         void* __restrict__ C,               // (batch, M, ldc) bf16 or fp32
                         float* __restrict__ dbias,          // (batch, M) or null; wgrad only
                         int M, int N, int K, int lda, int ldb, int ldc, int sa, int sb, int sc,
                         int act, int out_f32) {
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
    const bool sum_bias = !A_KMAJOR && dbias != nullptr && blockIdx.x == 0;
    const int KT = (K + WG_BK - 1) / WG_BK;

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    float db[8];  // bias gradient partial sums: rows 8(t/16) + e, k ≡ t (mod 16)
#pragma unroll
    for (int e = 0; e < 8; ++e) db[e] = 0.0f;

#pragma unroll
    for (int s = 0; s < WG_AHEAD; ++s) {
        if (s < KT) {
            wg_load_tile<A_KMAJOR>(As + s * WG_TILE_BYTES, A, lda, M, K, m0, s * WG_BK, avec);
            wg_load_tile<B_KMAJOR>(Bs + s * WG_TILE_BYTES, B, ldb, N, K, n0, s * WG_BK, bvec);
        }
        cp_async_commit();  // an empty group keeps the wait count uniform
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<WG_AHEAD - 1>();  // tile kt has landed (this thread's copies)
#ifndef MMKD_WG_NO_PROXY_FENCE
        fence_proxy_async();  // ... and is visible to the tensor cores' reads
#endif
        // Everyone's copies of tile kt are in, and every warpgroup has waited for the products
        // of tile kt - 2 (at most one group, kt - 1, is in flight): its stage can be refilled.
        __syncthreads();
        const int nk = kt + WG_AHEAD;
        if (nk < KT) {
            wg_load_tile<A_KMAJOR>(As + (nk % WG_STAGES) * WG_TILE_BYTES, A, lda, M, K, m0,
                                   nk * WG_BK, avec);
            wg_load_tile<B_KMAJOR>(Bs + (nk % WG_STAGES) * WG_TILE_BYTES, B, ldb, N, K, n0,
                                   nk * WG_BK, bvec);
        }
        cp_async_commit();

        const unsigned char* at = As + (kt % WG_STAGES) * WG_TILE_BYTES;
        const unsigned char* as = at + wg * 8 * WG_SBO;
        const unsigned char* bs = Bs + (kt % WG_STAGES) * WG_TILE_BYTES;
#ifndef MMKD_WG_NO_WGMMA_FENCE
        wgmma_fence();
#endif
        wgmma_hold(acc);
#pragma unroll
        for (int j = 0; j < WG_BK / 16; ++j)  // k 16j .. 16j + 15: k-groups 2j, 2j + 1
            wgmma_m64n128k16_bf16<A_KMAJOR ? 0 : 1, B_KMAJOR ? 0 : 1>(
                acc, wgmma_desc(as + 2 * j * WG_LBO, WG_LBO, WG_SBO),
                wgmma_desc(bs + 2 * j * WG_LBO, WG_LBO, WG_SBO));
        wgmma_commit();
        if (sum_bias) {
            // This stage is refilled only after the barrier of step kt + 2. Eight consecutive
            // lanes read eight consecutive k of one row group: one 128-byte core matrix.
            const int rg = threadIdx.x / 16;
#pragma unroll
            for (int i = 0; i < WG_BK / 16; ++i) {
                const int k = threadIdx.x % 16 + 16 * i;
                wg_dbias_add8(db, at + rg * WG_SBO + (k / 8) * WG_LBO + (k % 8) * 16);
            }
        }
#ifndef MMKD_WG_BROKEN_WAIT
        wgmma_wait<1>();  // tile kt - 1's products are done; tile kt's may still run
#endif
        wgmma_hold(acc);
    }
    cp_async_wait_all();  // only empty groups remain; nothing may be in flight at exit
    wgmma_wait<0>();
    wgmma_hold(acc);

    if (sum_bias) wg_dbias_store(db, dbias + z * M, m0, M, threadIdx.x);

    wg_epilogue(acc, m0, n0, wg, z * sc, M, N, ldc, bias, aux, C, act, out_f32);
}

// Y = X·Wᵀ (+ bias, act, + residual). A (batch, M, lda ≥ K), B (batch, N, ldb ≥ K).
MMKD_KERNEL void gemm_fwd_wgmma(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                                const mmkd_bf16* __restrict__ bias,
                                mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                                float* __restrict__ dbias, int M, int N, int K, int lda, int ldb,
                                int ldc, int sa, int sb, int sc, int act, int out_f32) {
    wg_body<true, true>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                        out_f32);
}
MMKD_EXPORT(gemm_fwd_wgmma)

// dX = dY·W. A (batch, M, lda ≥ K), B (batch, K, ldb ≥ N).
MMKD_KERNEL void gemm_dgrad_wgmma(const mmkd_bf16* __restrict__ A,
                                  const mmkd_bf16* __restrict__ B,
                                  const mmkd_bf16* __restrict__ bias,
                                  mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                                  float* __restrict__ dbias, int M, int N, int K, int lda,
                                  int ldb, int ldc, int sa, int sb, int sc, int act, int out_f32) {
    wg_body<true, false>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                         out_f32);
}
MMKD_EXPORT(gemm_dgrad_wgmma)

// dW = dYᵀ·X, dbias = column sums of dY. A (batch, K, lda ≥ M), B (batch, K, ldb ≥ N).
MMKD_KERNEL void gemm_wgrad_wgmma(const mmkd_bf16* __restrict__ A,
                                  const mmkd_bf16* __restrict__ B,
                                  const mmkd_bf16* __restrict__ bias,
                                  mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                                  float* __restrict__ dbias, int M, int N, int K, int lda,
                                  int ldb, int ldc, int sa, int sb, int sc, int act, int out_f32) {
    wg_body<false, false>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                          out_f32);
}
MMKD_EXPORT(gemm_wgrad_wgmma)
