// gemm_wgmma_tma.cu: the three products of gemm.cu on wgmma (sm_90a) with the operand tiles
// brought in by the tensor copy engine (TMA) instead of by the threads. Same tiling, pipeline,
// epilogues and results as gemm_wgmma.cu; what differs is how a tile reaches shared memory.
//
//   gemm_fwd_tma    A (M, K), B (N, K)   Y = X·Wᵀ (+ bias, act, + residual)
//   gemm_dgrad_tma  A (M, K), B (K, N)   dX = dY·W
//   gemm_wgrad_tma  A (K, M), B (K, N)   dW = dYᵀ·X, and dbias(m) = Σ_k A(k, m) when dbias is not null
//
// A and B come as tensor maps (CUtensorMap, built by the launcher over (batch, rows, row length)
// with the 128-byte swizzle); everything after them is gemm.cu's parameter list, whose lda, ldb,
// sa and sb the maps already hold.
//
// Copies: one thread arms the stage's mbarrier with the tile's byte count and issues the copies;
// every thread waits on that mbarrier (parity = round of the ring) before the tile is read. The
// engine zero-fills what lies outside the tensor, so any M, N, K need no special path (the
// launcher asks for 16-byte aligned operands and row lengths that are multiples of 8).
//
// Shared layouts, both with the 128-byte swizzle (16-byte chunk c of 128-byte row r stored at
// chunk c ^ (r % 8)), 1024-byte aligned:
//   K-major tile (128 rows × 64 k): one box, row r (64 k, 128 bytes) at 128·r. Descriptor: rows
//     in groups of 8, 1024 bytes apart (stride byte offset); k 16j.. reached by advancing the
//     start address 32·j bytes inside the swizzled row (the leading byte offset is unused).
//   MN-major tile (64 k × 128 rows): two boxes of 64 rows, k-row k (64 rows, 128 bytes) at 128·k
//     inside each. Descriptor: the two boxes 8192 bytes apart (leading byte offset), groups of 8 k
//     1024 bytes apart (stride byte offset); k 16j.. at start + 2048·j.
//
// Pipeline: WT_STAGES = 4 stages fetched two tiles ahead, one k tile's products in flight, one
// __syncthreads per k tile, as in gemm_wgmma.cu: the stage refilled at step kt held tile kt - 2,
// whose products every warpgroup has waited for before that barrier.
//
// Launch: grid (ceil(N/128), ceil(M/128), batch), block (256), dynamic shared memory
// WT_SMEM_BYTES (4 stages × 2 tiles × 16 KiB + the four mbarriers + 1 KiB of alignment room).
//
// Defines: gemm_fwd_tma, gemm_dgrad_tma, gemm_wgrad_tma.
// Test-only variants: MMKD_WT_NO_WAIT reads a tile without waiting on its mbarrier;
// MMKD_WT_SHORT_TX announces fewer bytes than the copies bring; MMKD_WT_NO_INIT_FENCE leaves out
// the fence that makes the initialised mbarriers visible to the tensor copies.
// mmkd-emu-variant: no_wait MMKD_WT_NO_WAIT
// mmkd-emu-variant: short_tx MMKD_WT_SHORT_TX
// mmkd-emu-variant: no_init_fence MMKD_WT_NO_INIT_FENCE
#include "prelude.cuh"

#define WT_BM 128
#define WT_BN 128
#define WT_BK 64
#define WT_STAGES 4
#define WT_AHEAD 2
#define WT_THREADS 256
#define WT_TILE_BYTES (128 * WT_BK * 2)  // one operand tile: 16384 bytes
#define WT_BAR_OFFSET (WT_STAGES * 2 * WT_TILE_BYTES)
// + 1024: room to align the tiles to 1024 bytes, whatever the dynamic area's own alignment.
#define WT_SMEM_BYTES (WT_BAR_OFFSET + WT_STAGES * 8 + 1024)
#define WT_ROW 128     // bytes per swizzled row
#define WT_GROUP 1024  // bytes per group of 8 swizzled rows
#define WT_BOX 8192    // bytes per 64-row box of an MN-major tile

// Issues the copies of one operand tile: rows r0 .. r0 + 127, k0 .. k0 + 63 of batch z.
template <bool KMAJOR>
MMKD_DEVICE void wt_issue(unsigned char* s, const mmkd_tensor_map* map, int r0, int k0, int z,
                          unsigned long long* bar) {
    if (KMAJOR) {
        tma_load_3d(s, map, k0, r0, z, bar);  // box (64 k, 128 rows)
    } else {
        tma_load_3d(s, map, r0, k0, z, bar);  // box (64 rows, 64 k)
        tma_load_3d(s + WT_BOX, map, r0 + 64, k0, z, bar);
    }
}

// Descriptor of k 16j .. 16j + 15 of rows `row0` .. of a tile (row0: 0 or 64).
template <bool KMAJOR>
MMKD_DEVICE unsigned long long wt_desc(const unsigned char* tile, int row0, int j) {
    if (KMAJOR) return wgmma_desc_sw128(tile + row0 * WT_ROW + 32 * j, 16, WT_GROUP);
    return wgmma_desc_sw128(tile + (row0 / 64) * WT_BOX + 2 * j * WT_GROUP, WT_BOX, WT_GROUP);
}

template <bool A_KMAJOR, bool B_KMAJOR>
MMKD_DEVICE void wt_body(const mmkd_tensor_map* ta, const mmkd_tensor_map* tb,
                         const mmkd_bf16* __restrict__ bias,  // (N) or null
                         mmkd_bf16* __restrict__ aux,   // (batch, M, ldc) or null
                         void* __restrict__ C,                // (batch, M, ldc) bf16 or fp32
                         float* __restrict__ dbias,           // (batch, M) or null; wgrad only
                         int M, int N, int K, int ldc, int sc, int act, int out_f32) {
    MMKD_DYNAMIC_SMEM(unsigned char, smem_raw);
    // The swizzle is a function of shared-memory address bits 4-9, for the copy engine and the
    // tensor cores alike; tiles aligned to 1024 bytes keep descriptors' base offset at 0.
    unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    unsigned char* As = smem;                              // (STAGES, tile)
    unsigned char* Bs = smem + WT_STAGES * WT_TILE_BYTES;  // (STAGES, tile)
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + WT_BAR_OFFSET);
    const int z = blockIdx.z;
    const int m0 = blockIdx.y * WT_BM, n0 = blockIdx.x * WT_BN;
    const int wg = threadIdx.x / 128;  // warpgroup: rows 64·wg .. 64·wg + 63 of the tile
    const bool sum_bias = !A_KMAJOR && dbias != nullptr && blockIdx.x == 0;
    const int KT = (K + WT_BK - 1) / WT_BK;
#ifdef MMKD_WT_SHORT_TX
    const unsigned tx = 2 * WT_TILE_BYTES - 16;
#else
    const unsigned tx = 2 * WT_TILE_BYTES;  // the engine moves whole boxes, zeros included
#endif

    if (threadIdx.x == 0) {
        for (int s = 0; s < WT_STAGES; ++s) mbarrier_init(&full[s], 1);
#ifndef MMKD_WT_NO_INIT_FENCE
        fence_barrier_init();  // the tensor copies see the initialised barriers
#endif
    }
    __syncthreads();

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    float db[8];  // bias gradient partial sums: rows 8(t/16) + e, k ≡ t (mod 16)
#pragma unroll
    for (int e = 0; e < 8; ++e) db[e] = 0.0f;

    if (threadIdx.x == 0)
        for (int t = 0; t < WT_AHEAD && t < KT; ++t) {
            mbarrier_arrive_expect_tx(&full[t], tx);
            wt_issue<A_KMAJOR>(As + t * WT_TILE_BYTES, ta, m0, t * WT_BK, z, &full[t]);
            wt_issue<B_KMAJOR>(Bs + t * WT_TILE_BYTES, tb, n0, t * WT_BK, z, &full[t]);
        }
    for (int kt = 0; kt < KT; ++kt) {
        const int st = kt % WT_STAGES;
#ifndef MMKD_WT_NO_WAIT
        mbarrier_wait(&full[st], (kt / WT_STAGES) & 1);  // tile kt has landed
#endif
        // Every warpgroup has waited for the products of tile kt - 2: its stage can be refilled.
        __syncthreads();
        const int nk = kt + WT_AHEAD;
        if (threadIdx.x == 0 && nk < KT) {
            const int ns = nk % WT_STAGES;
            mbarrier_arrive_expect_tx(&full[ns], tx);
            wt_issue<A_KMAJOR>(As + ns * WT_TILE_BYTES, ta, m0, nk * WT_BK, z, &full[ns]);
            wt_issue<B_KMAJOR>(Bs + ns * WT_TILE_BYTES, tb, n0, nk * WT_BK, z, &full[ns]);
        }

        const unsigned char* at = As + st * WT_TILE_BYTES;
        const unsigned char* bt = Bs + st * WT_TILE_BYTES;
        wgmma_fence();
        wgmma_hold(acc);
#pragma unroll
        for (int j = 0; j < WT_BK / 16; ++j)
            wgmma_m64n128k16_bf16<A_KMAJOR ? 0 : 1, B_KMAJOR ? 0 : 1>(
                acc, wt_desc<A_KMAJOR>(at, 64 * wg, j), wt_desc<B_KMAJOR>(bt, 0, j));
        wgmma_commit();
        if (sum_bias) {
            // Thread t sums rows 8(t/16) .. +7 (one 16-byte chunk of a swizzled k-row) over
            // k ≡ t (mod 16); eight consecutive lanes read eight k-rows of one 1024-byte group,
            // whose swizzle puts the chunk in eight different bank groups.
            const int rg = threadIdx.x / 16, box = rg / 8, c = rg % 8;
#pragma unroll
            for (int i = 0; i < WT_BK / 16; ++i) {
                const int k = threadIdx.x % 16 + 16 * i;
                wg_dbias_add8(db, at + box * WT_BOX + k * WT_ROW + ((c ^ (k % 8)) * 16));
            }
            // The copy engine refills this stage next: order these ordinary reads before
            // its writes (a cross-proxy access).
            fence_proxy_async();
        }
        wgmma_wait<1>();  // tile kt - 1's products are done; tile kt's may still run
        wgmma_hold(acc);
    }
    wgmma_wait<0>();
    wgmma_hold(acc);

    if (sum_bias) wg_dbias_store(db, dbias + (long)z * M, m0, M, threadIdx.x);

    wg_epilogue(acc, m0, n0, wg, (long)z * sc, M, N, ldc, bias, aux, C, act, out_f32);
}

// The entry points take gemm.cu's parameters with A and B as tensor maps; lda, ldb, sa and sb
// are unused (the maps hold them).

// Y = X·Wᵀ (+ bias, act, + residual). A: X (batch, M, K), B: W (batch, N, K).
MMKD_KERNEL void gemm_fwd_tma(const __grid_constant__ mmkd_tensor_map ta,
                              const __grid_constant__ mmkd_tensor_map tb,
                              const mmkd_bf16* __restrict__ bias,
                              mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                              float* __restrict__ dbias, int M, int N, int K, int lda, int ldb,
                              int ldc, int sa, int sb, int sc, int act, int out_f32) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    wt_body<true, true>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32);
}
MMKD_EXPORT(gemm_fwd_tma)

// dX = dY·W. A: dY (batch, M, K), B: W (batch, K, N).
MMKD_KERNEL void gemm_dgrad_tma(const __grid_constant__ mmkd_tensor_map ta,
                                const __grid_constant__ mmkd_tensor_map tb,
                                const mmkd_bf16* __restrict__ bias,
                                mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                                float* __restrict__ dbias, int M, int N, int K, int lda, int ldb,
                                int ldc, int sa, int sb, int sc, int act, int out_f32) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    wt_body<true, false>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32);
}
MMKD_EXPORT(gemm_dgrad_tma)

// dW = dYᵀ·X, dbias = column sums of dY. A: dY (batch, K, M), B: X (batch, K, N).
MMKD_KERNEL void gemm_wgrad_tma(const __grid_constant__ mmkd_tensor_map ta,
                                const __grid_constant__ mmkd_tensor_map tb,
                                const mmkd_bf16* __restrict__ bias,
                                mmkd_bf16* __restrict__ aux, void* __restrict__ C,
                                float* __restrict__ dbias, int M, int N, int K, int lda, int ldb,
                                int ldc, int sa, int sb, int sc, int act, int out_f32) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    wt_body<false, false>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32);
}
MMKD_EXPORT(gemm_wgrad_tma)
