// gemm_ws.cu: the three products of gemm.cu on wgmma (sm_90a), persistent and warp-specialised:
// one warpgroup copies operand tiles with the tensor copy engine (TMA) while two others multiply,
// each side waiting only on the mbarriers of the stages it needs, never on a block-wide barrier.
// Same parameters, epilogues and results as gemm_wgmma_tma.cu, plus the batch count.
//
//   gemm_fwd_ws    A (M, K), B (N, K)   Y = X·Wᵀ (+ bias, act, + residual)
//   gemm_dgrad_ws  A (M, K), B (K, N)   dX = dY·W
//   gemm_wgrad_ws  A (K, M), B (K, N)   dW = dYᵀ·X, and dbias(m) = Σ_k A(k, m) when dbias is not null
//
// Why: with K = 768 a 128 × 128 tile of gemm_wgmma_tma.cu computes for only 12 k tiles between
// filling its pipeline and running its epilogue, one block per multiprocessor, so neither is
// hidden; and its 128 × 128 × 64 tile does 64 FLOP per byte it fetches, more than the L2 can feed
// the tensor cores at full rate. Here a block tile is 128 × 256 (85 FLOP per byte), the grid is
// one block per multiprocessor looping over tiles, and the producer fetches the next tile's
// stages while the consumers run the epilogue of the last.
//
// Roles (384 threads, __launch_bounds__(384, 1)):
//   warpgroup 0, the producer: gives up registers (setmaxnreg.dec 40); one thread loops over
//     this block's tiles and their k tiles: wait until stage s is free (empty[s]), announce its
//     bytes on full[s], issue the copies of the A (128 × 64) and B (256 × 64) tiles.
//   warpgroups 1 and 2, the consumers (setmaxnreg.inc 232): rows 0-63 and 64-127 of the tile;
//     per k tile wait on full[s], issue four wgmma m64n256k16, keep one k tile's products in
//     flight (wgmma_wait<1>) and then free the previous stage (one arrival per warp on its
//     empty barrier, 8 per phase). After the last k tile: wait for all products, free the last
//     stage, run the epilogue from registers.
// The ring: stage s = i % WS_STAGES of the block's i-th k tile (counted across its tiles),
// phase parity (i / WS_STAGES) & 1 on full[s]; the producer waits on empty[s] with the
// opposite parity, which an untouched barrier satisfies at once (the first round is free).
//
// Tiles: t = blockIdx.x, + gridDim.x, ... < batch · ceil(M/128) · ceil(N/256), n fastest, so
// the blocks running at once share A's row tiles through the L2. Shared layouts and tensor maps
// as gemm_wgmma_tma.cu (128-byte swizzle, 1024-byte aligned tiles): A K-major one box (64 k, 128
// rows), MN-major two boxes (64 rows, 64 k); B K-major one box (64 k, 256 rows), MN-major four
// boxes (64 columns, 64 k), 8192 bytes apart.
//
// The bias gradient (gemm_wgrad_ws, tiles of the first column): the 256 consumer threads sum
// the A tile of each k tile as gemm_wgmma_tma.cu's threads do, before they free its stage.
//
// Launch: grid (min(tiles, 132): TUNED_SMS in gemm.rs, an H100/H200), block (384), dynamic
// shared memory WS_SMEM_BYTES
// (4 stages × 48 KiB + 8 mbarriers + 1 KiB of alignment room).
//
// Defines: gemm_fwd_ws, gemm_dgrad_ws, gemm_wgrad_ws.
// Test-only variants: MMKD_WS_NO_EMPTY_WAIT refills a stage without waiting until it is free;
// MMKD_WS_EARLY_RELEASE frees a stage before the products that read it are done.
// mmkd-emu-variant: no_empty_wait MMKD_WS_NO_EMPTY_WAIT
// mmkd-emu-variant: early_release MMKD_WS_EARLY_RELEASE
#include "prelude.cuh"

#define WS_BM 128
#define WS_BN 256
#define WS_BK 64
#define WS_STAGES 4
#define WS_THREADS 384
#define WS_A_BYTES (WS_BM * WS_BK * 2)  // 16384
#define WS_B_BYTES (WS_BN * WS_BK * 2)  // 32768
#define WS_STAGE_BYTES (WS_A_BYTES + WS_B_BYTES)
#define WS_BAR_OFFSET (WS_STAGES * WS_STAGE_BYTES)
#define WS_SMEM_BYTES (WS_BAR_OFFSET + 2 * WS_STAGES * 8 + 1024)
#define WS_ROW 128     // bytes per swizzled row
#define WS_GROUP 1024  // bytes per group of 8 swizzled rows
#define WS_BOX 8192    // bytes per 64-row box of an MN-major tile
#define WS_CONSUMER_WARPS 8

// Issues the copies of one operand tile of `rows` rows (128 or 256): rows r0 .., k0 .. k0 + 63
// of batch z.
template <bool KMAJOR, int ROWS>
MMKD_DEVICE void ws_issue(unsigned char* s, const mmkd_tensor_map* map, int r0, int k0, int z,
                          unsigned long long* bar) {
    if (KMAJOR) {
        tma_load_3d(s, map, k0, r0, z, bar);  // box (64 k, ROWS rows)
    } else {
#pragma unroll
        for (int b = 0; b < ROWS / 64; ++b)  // boxes (64 rows, 64 k)
            tma_load_3d(s + b * WS_BOX, map, r0 + 64 * b, k0, z, bar);
    }
}

// Descriptor of k 16j .. 16j + 15 of the rows from `row0` (a multiple of 64) of a tile.
template <bool KMAJOR>
MMKD_DEVICE unsigned long long ws_desc(const unsigned char* tile, int row0, int j) {
    if (KMAJOR) return wgmma_desc_sw128(tile + row0 * WS_ROW + 32 * j, 16, WS_GROUP);
    return wgmma_desc_sw128(tile + (row0 / 64) * WS_BOX + 2 * j * WS_GROUP, WS_BOX, WS_GROUP);
}

template <bool A_KMAJOR, bool B_KMAJOR>
MMKD_DEVICE void ws_body(const mmkd_tensor_map* ta, const mmkd_tensor_map* tb,
                         const mmkd_bf16* __restrict__ bias,  // (N) or null
                         mmkd_bf16* __restrict__ aux,         // (batch, M, ldc) or null
                         void* __restrict__ C,                // (batch, M, ldc) bf16 or fp32
                         float* __restrict__ dbias,           // (batch, M) or null; wgrad only
                         int M, int N, int K, int ldc, int sc, int act, int out_f32,
                         int batch) {
    MMKD_DYNAMIC_SMEM(unsigned char, smem_raw);
    unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + WS_BAR_OFFSET);
    unsigned long long* empty = full + WS_STAGES;
    const int tiles_m = (M + WS_BM - 1) / WS_BM, tiles_n = (N + WS_BN - 1) / WS_BN;
    const int tiles = batch * tiles_m * tiles_n;
    const int KT = (K + WS_BK - 1) / WS_BK;

    if (threadIdx.x == 0) {
        for (int s = 0; s < WS_STAGES; ++s) {
            mbarrier_init(&full[s], 1);
            mbarrier_init(&empty[s], WS_CONSUMER_WARPS);
        }
        fence_barrier_init();
    }
    __syncthreads();  // the last block-wide barrier: the roles part here

    if (threadIdx.x < 128) {
        // ---- producer ----
        setmaxnreg_dec<40>();
        if (threadIdx.x != 0) return;
        int i = 0;  // this block's k tiles so far
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            const int z = t / (tiles_m * tiles_n), r = t % (tiles_m * tiles_n);
            const int m0 = (r / tiles_n) * WS_BM, n0 = (r % tiles_n) * WS_BN;
            for (int kt = 0; kt < KT; ++kt, ++i) {
                const int s = i % WS_STAGES;
#ifndef MMKD_WS_NO_EMPTY_WAIT
                mbarrier_wait(&empty[s], ((i / WS_STAGES) & 1) ^ 1);  // stage s is free
#endif
                unsigned char* st = smem + s * WS_STAGE_BYTES;
                // The engine moves whole boxes, the zeros outside the tensor included.
                mbarrier_arrive_expect_tx(&full[s], WS_STAGE_BYTES);
                ws_issue<A_KMAJOR, WS_BM>(st, ta, m0, kt * WS_BK, z, &full[s]);
                ws_issue<B_KMAJOR, WS_BN>(st + WS_A_BYTES, tb, n0, kt * WS_BK, z, &full[s]);
            }
        }
        return;
    }

    // ---- consumers ----
    setmaxnreg_inc<232>();
    const int ct = threadIdx.x - 128;  // 0 .. 255
    const int wg = ct / 128;           // rows 64·wg .. 64·wg + 63 of the tile
    const int lane = threadIdx.x % 32;
    float acc[128];
    int i = 0;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
        const int z = t / (tiles_m * tiles_n), r = t % (tiles_m * tiles_n);
        const int m0 = (r / tiles_n) * WS_BM, n0 = (r % tiles_n) * WS_BN;
        const bool sum_bias = !A_KMAJOR && dbias != nullptr && n0 == 0;
#pragma unroll
        for (int e = 0; e < 128; ++e) acc[e] = 0.0f;
        float db[8];  // bias gradient partial sums: rows 8(ct/16) + e, k ≡ ct (mod 16)
#pragma unroll
        for (int e = 0; e < 8; ++e) db[e] = 0.0f;
        for (int kt = 0; kt < KT; ++kt, ++i) {
            const int s = i % WS_STAGES;
            mbarrier_wait(&full[s], (i / WS_STAGES) & 1);  // k tile kt has landed
            const unsigned char* at = smem + s * WS_STAGE_BYTES;
            const unsigned char* bt = at + WS_A_BYTES;
            wgmma_fence();
            wgmma_hold_n<128>(acc);
#pragma unroll
            for (int j = 0; j < WS_BK / 16; ++j)
                wgmma_m64n256k16_bf16<A_KMAJOR ? 0 : 1, B_KMAJOR ? 0 : 1>(
                    acc, ws_desc<A_KMAJOR>(at, 64 * wg, j), ws_desc<B_KMAJOR>(bt, 0, j));
            wgmma_commit();
            if (sum_bias) {
                // As gemm_wgmma_tma.cu: thread ct sums rows 8(ct/16) .. +7 over k ≡ ct (mod 16).
                const int rg = ct / 16, box = rg / 8, c = rg % 8;
#pragma unroll
                for (int q = 0; q < WS_BK / 16; ++q) {
                    const int k = ct % 16 + 16 * q;
                    wg_dbias_add8(db, at + box * WS_BOX + k * WS_ROW + ((c ^ (k % 8)) * 16));
                }
                // The copy engine refills this stage next: order these ordinary reads before
                // its writes (a cross-proxy access).
                fence_proxy_async();
            }
#ifdef MMKD_WS_EARLY_RELEASE
            __syncwarp();
            if (lane == 0) mbarrier_arrive(&empty[s]);
            wgmma_wait<1>();
            wgmma_hold_n<128>(acc);
#else
            wgmma_wait<1>();  // the previous k tile's products are done: free its stage
            wgmma_hold_n<128>(acc);
            if (kt > 0) {
                __syncwarp();
                if (lane == 0) mbarrier_arrive(&empty[(i - 1) % WS_STAGES]);
            }
#endif
        }
        wgmma_wait<0>();
        wgmma_hold_n<128>(acc);
#ifndef MMKD_WS_EARLY_RELEASE
        __syncwarp();
        // (KT ≥ 1: the launcher refuses K = 0, which would name empty[−1] here.)
        if (lane == 0) mbarrier_arrive(&empty[(i - 1) % WS_STAGES]);
#endif
        if (sum_bias) wg_dbias_store(db, dbias + (long)z * M, m0, M, ct);
        wg_epilogue<32>(acc, m0, n0, wg, (long)z * sc, M, N, ldc, bias, aux, C, act, out_f32);
    }
}

// The entry points take gemm_wgmma_tma.cu's parameters and the batch count; lda, ldb, sa and
// sb are unused (the maps hold them).

// Y = X·Wᵀ (+ bias, act, + residual). A: X (batch, M, K), B: W (batch, N, K).
MMKD_KERNEL void __launch_bounds__(WS_THREADS, 1)
    gemm_fwd_ws(const __grid_constant__ mmkd_tensor_map ta,
                const __grid_constant__ mmkd_tensor_map tb, const mmkd_bf16* __restrict__ bias,
                mmkd_bf16* __restrict__ aux, void* __restrict__ C, float* __restrict__ dbias,
                int M, int N, int K, int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                int out_f32, int batch) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    ws_body<true, true>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32, batch);
}
MMKD_EXPORT(gemm_fwd_ws)

// dX = dY·W. A: dY (batch, M, K), B: W (batch, K, N).
MMKD_KERNEL void __launch_bounds__(WS_THREADS, 1)
    gemm_dgrad_ws(const __grid_constant__ mmkd_tensor_map ta,
                  const __grid_constant__ mmkd_tensor_map tb, const mmkd_bf16* __restrict__ bias,
                  mmkd_bf16* __restrict__ aux, void* __restrict__ C, float* __restrict__ dbias,
                  int M, int N, int K, int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                  int out_f32, int batch) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    ws_body<true, false>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32, batch);
}
MMKD_EXPORT(gemm_dgrad_ws)

// dW = dYᵀ·X, dbias = column sums of dY. A: dY (batch, K, M), B: X (batch, K, N).
MMKD_KERNEL void __launch_bounds__(WS_THREADS, 1)
    gemm_wgrad_ws(const __grid_constant__ mmkd_tensor_map ta,
                  const __grid_constant__ mmkd_tensor_map tb, const mmkd_bf16* __restrict__ bias,
                  mmkd_bf16* __restrict__ aux, void* __restrict__ C, float* __restrict__ dbias,
                  int M, int N, int K, int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                  int out_f32, int batch) {
    (void)lda, (void)ldb, (void)sa, (void)sb;
    ws_body<false, false>(&ta, &tb, bias, aux, C, dbias, M, N, K, ldc, sc, act, out_f32, batch);
}
MMKD_EXPORT(gemm_wgrad_ws)
