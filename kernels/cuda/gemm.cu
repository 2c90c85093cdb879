// gemm.cu: bf16 matrix products on the tensor cores with fused epilogues, in the three layouts
// a linear layer's training step needs.
//
//   C(m, n) = epilogue( Σ_k A(m, k) · B(k, n) ),  fp32 accumulation, per batch z = blockIdx.z
//   epilogue: v = acc (+ bias[n]);  v = act(v);  v (+ residual(m, n));  store bf16 or fp32
//   act: 0 none, 1 GELU (erf form), 2 QuickGELU (v · sigmoid(1.702 v)); see prelude.cuh for the
//   modes that save or read a pre-activation instead of adding a residual
//
// Storage of the operands per entry point (ld = row length of the stored matrix):
//   gemm_fwd    A (M, K), B (N, K)  Y = X·Wᵀ + b          (A = X, B = W)
//   gemm_dgrad  A (M, K), B (K, N)  dX = dY·W              (A = dY, B = W)
//   gemm_wgrad  A (K, M), B (K, N)  dW = dYᵀ·X, db = Σ_k A (A = dY, B = X; k runs over tokens)
// gemm_wgrad also writes dbias(m) = Σ_k A(k, m) when dbias is not null: the blocks of the first
// column of tiles sum the A tiles they already hold in shared memory, so the bias gradient costs
// no extra pass over dY and needs no atomics (one thread owns one m for the whole k loop).
//
// Tiling: block tile 128 (m) × 64 (n) × 32 (k), 4 warps of 64 × 32, mma.sync m16n8k16 fed by
// ldmatrix (.trans for the operands stored with m or n contiguous), GEMM_STAGES-deep cp.async
// pipeline. Any M, N, K: a 16-byte chunk that is fully inside the matrix and aligned goes by
// cp.async, anything else (edges, K or N not a multiple of 8, unaligned rows) element by element
// with zero fill. Rows of shared tiles are padded by 16 bytes, so ldmatrix's eight row reads
// fall in distinct banks.
//
// Launch: grid (ceil(N/64), ceil(M/128), batch), block (128), dynamic shared memory
// GEMM_SMEM_BYTES (46080, under the 48 KiB default).
//
// Split K (any of the three files' gemm_wgrad*): a weight gradient with few output tiles and a
// long K (the tokens) runs as a batch of S products over consecutive chunks of K, each writing
// fp32 partials (and partial bias sums) into a workspace; gemm_splitk_reduce then adds the S
// partials in a fixed order, so the result does not depend on scheduling.
//
// Defines: gemm_fwd, gemm_dgrad, gemm_wgrad, gemm_splitk_reduce.
// Test-only variant: MMKD_GEMM_BROKEN_WAIT waits for one cp.async group too few, so the
// compute reads a tile before it has landed.
// mmkd-emu-variant: broken_wait MMKD_GEMM_BROKEN_WAIT
#include "prelude.cuh"

#define GEMM_BM 128
#define GEMM_BN 64
#define GEMM_BK 32
#define GEMM_STAGES 3
#define GEMM_THREADS 128
#define GEMM_KPITCH (GEMM_BK + 8)  // row of a tile stored k-contiguous: (BM or BN, BK)
#define GEMM_APITCH (GEMM_BM + 8)  // row of an A tile stored m-contiguous: (BK, BM)
#define GEMM_BPITCH (GEMM_BN + 8)  // row of a B tile stored n-contiguous: (BK, BN)
#define GEMM_A_STAGE (GEMM_BM * GEMM_KPITCH)  // elements; ≥ GEMM_BK * GEMM_APITCH
#define GEMM_B_STAGE (GEMM_BN * GEMM_KPITCH)  // elements; ≥ GEMM_BK * GEMM_BPITCH
#define GEMM_SMEM_BYTES (GEMM_STAGES * (GEMM_A_STAGE + GEMM_B_STAGE) * 2)

MMKD_DEVICE bool gemm_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Copies the (TR, TC) window at (r0, c0) of a row-major (rows, cols) matrix with row length ld
// into shared memory with row pitch P; outside the matrix it writes zeros. `vec`: rows start
// 16-byte aligned, so in-range chunks may go by cp.async.
template <int TR, int TC, int P>
MMKD_DEVICE void gemm_load_tile(mmkd_bf16* s, const mmkd_bf16* __restrict__ g, int ld, int rows,
                                int cols, int r0, int c0, bool vec) {
    constexpr int CPR = TC / 8;  // 16-byte chunks per tile row
    static_assert((TR * CPR) % GEMM_THREADS == 0, "every thread copies the same chunk count");
#pragma unroll
    for (int it = 0; it < TR * CPR / GEMM_THREADS; ++it) {
        const int i = it * GEMM_THREADS + threadIdx.x;
        const int r = i / CPR, c = (i % CPR) * 8;
        const int gr = r0 + r, gc = c0 + c;
        mmkd_bf16* d = s + r * P + c;
        const mmkd_bf16* src = g + (long)gr * ld + gc;
        if (vec && gr < rows && gc + 8 <= cols) {
            cp_async_16(d, src);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) d[j] = (gr < rows && gc + j < cols) ? src[j] : 0;
        }
    }
}

template <bool A_KMAJOR, bool B_KMAJOR>
MMKD_DEVICE void gemm_load_stage(mmkd_bf16* As, mmkd_bf16* Bs, const mmkd_bf16* __restrict__ A,
                                 const mmkd_bf16* __restrict__ B, int M, int N, int K, int lda,
                                 int ldb, int m0, int n0, int k0, bool avec, bool bvec) {
    if (A_KMAJOR)
        gemm_load_tile<GEMM_BM, GEMM_BK, GEMM_KPITCH>(As, A, lda, M, K, m0, k0, avec);
    else
        gemm_load_tile<GEMM_BK, GEMM_BM, GEMM_APITCH>(As, A, lda, K, M, k0, m0, avec);
    if (B_KMAJOR)
        gemm_load_tile<GEMM_BN, GEMM_BK, GEMM_KPITCH>(Bs, B, ldb, N, K, n0, k0, bvec);
    else
        gemm_load_tile<GEMM_BK, GEMM_BN, GEMM_BPITCH>(Bs, B, ldb, K, N, k0, n0, bvec);
}

template <bool A_KMAJOR, bool B_KMAJOR>
MMKD_DEVICE void gemm_body(const mmkd_bf16* __restrict__ A,    // see the table above
                           const mmkd_bf16* __restrict__ B,    // see the table above
                           const mmkd_bf16* __restrict__ bias, // (N) or null
                           mmkd_bf16* __restrict__ aux,  // (batch, M, ldc) or null
                           void* __restrict__ C,               // (batch, M, ldc) bf16 or fp32
                           float* __restrict__ dbias,          // (batch, M) or null; wgrad only
                           int M, int N, int K, int lda, int ldb, int ldc, int sa, int sb,
                           int sc, int act, int out_f32) {
    MMKD_DYNAMIC_SMEM(mmkd_bf16, smem);
    mmkd_bf16* As = smem;                               // (STAGES, A_STAGE)
    mmkd_bf16* Bs = smem + GEMM_STAGES * GEMM_A_STAGE;  // (STAGES, B_STAGE)
    const long z = blockIdx.z;
    A += z * sa;
    B += z * sb;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * 64, wn = (warp % 2) * 32;  // this warp's 64 × 32 sub-tile
    const int lr = lane % 8, li = lane / 8;  // ldmatrix: row within a matrix, matrix index
    const bool avec = gemm_aligned16(A) && lda % 8 == 0;
    const bool bvec = gemm_aligned16(B) && ldb % 8 == 0;
    const bool sum_bias = !A_KMAJOR && dbias != nullptr && blockIdx.x == 0;
    const int KT = (K + GEMM_BK - 1) / GEMM_BK;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    float db = 0.0f;  // Σ_k A(k, m0 + threadIdx.x), when sum_bias

#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) {
        if (s < KT)
            gemm_load_stage<A_KMAJOR, B_KMAJOR>(As + s * GEMM_A_STAGE, Bs + s * GEMM_B_STAGE, A,
                                                B, M, N, K, lda, ldb, m0, n0, s * GEMM_BK,
                                                avec, bvec);
        cp_async_commit();  // an empty group keeps the wait count uniform
    }
    for (int kt = 0; kt < KT; ++kt) {
#ifdef MMKD_GEMM_BROKEN_WAIT
        cp_async_wait<GEMM_STAGES - 1>();
#else
        cp_async_wait<GEMM_STAGES - 2>();  // tile kt has landed (this thread's copies)
#endif
        // Everyone's copies of tile kt are visible, and everyone is done with tile kt - 1,
        // whose stage the prefetch below overwrites.
        __syncthreads();
        const int nk = kt + GEMM_STAGES - 1;
        if (nk < KT)
            gemm_load_stage<A_KMAJOR, B_KMAJOR>(
                As + (nk % GEMM_STAGES) * GEMM_A_STAGE, Bs + (nk % GEMM_STAGES) * GEMM_B_STAGE, A,
                B, M, N, K, lda, ldb, m0, n0, nk * GEMM_BK, avec, bvec);
        cp_async_commit();

        const mmkd_bf16* as = As + (kt % GEMM_STAGES) * GEMM_A_STAGE;
        const mmkd_bf16* bs = Bs + (kt % GEMM_STAGES) * GEMM_B_STAGE;
        if (sum_bias) {
#pragma unroll 8
            for (int k = 0; k < GEMM_BK; ++k) db += bf16_to_f32(as[k * GEMM_APITCH + threadIdx.x]);
        }
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; kk += 16) {
            unsigned af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                if (A_KMAJOR)  // matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), ...
                    ldmatrix_x4(af[mi], as + (wm + mi * 16 + lane % 16) * GEMM_KPITCH + kk +
                                            (lane / 16) * 8);
                else  // stored (k, m): the same four matrices, transposed on load
                    ldmatrix_x4_trans(af[mi], as + (kk + lr + (li / 2) * 8) * GEMM_APITCH + wm +
                                                  mi * 16 + (li % 2) * 8);
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                unsigned t[4];
                if (B_KMAJOR)  // stored (n, k): (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, ...)
                    ldmatrix_x4(t, bs + (wn + nj * 16 + lr + (li / 2) * 8) * GEMM_KPITCH + kk +
                                       (li % 2) * 8);
                else  // stored (k, n): (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
                    ldmatrix_x4_trans(t, bs + (kk + lr + (li % 2) * 8) * GEMM_BPITCH + wn +
                                             nj * 16 + (li / 2) * 8);
                bfr[2 * nj][0] = t[0];
                bfr[2 * nj][1] = t[1];
                bfr[2 * nj + 1][0] = t[2];
                bfr[2 * nj + 1][1] = t[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni)
                    mma_m16n8k16_bf16(acc[mi][ni], af[mi], bfr[ni], acc[mi][ni]);
        }
    }
    cp_async_wait_all();  // only empty groups remain; nothing may be in flight at exit

    // Epilogue straight from the accumulators: row g (+8), columns 2t, 2t+1 of each n8 tile.
    // The two columns go out as one 4-byte (bf16) or 8-byte (fp32) store when they are
    // adjacent in memory and aligned.
    const int g = lane / 4, t = lane % 4;
    const long cbase = z * sc;
    // The batch offset must keep pairs aligned too (z·sc is even for every shape used today).
    const bool cpair = ldc % 2 == 0 && cbase % 2 == 0 &&
                       (reinterpret_cast<unsigned long long>(C) & (out_f32 ? 7ull : 3ull)) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm + mi * 16 + g + h * 8;
            if (row >= M) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = n0 + wn + ni * 8 + 2 * t;
                if (col >= N) continue;
                const bool two = col + 1 < N;
                float v[2] = {acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]};
                gemm_store2(v, two, cpair, cbase + (long)row * ldc + col, col, bias, aux, act, C,
                            out_f32);
            }
        }
    if (sum_bias && m0 + (int)threadIdx.x < M) dbias[z * M + m0 + threadIdx.x] = db;
}

// Y = X·Wᵀ (+ bias, act, + residual). A (batch, M, lda ≥ K), B (batch, N, ldb ≥ K).
MMKD_KERNEL void gemm_fwd(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                          const mmkd_bf16* __restrict__ bias, mmkd_bf16* __restrict__ aux,
                          void* __restrict__ C, float* __restrict__ dbias, int M, int N, int K,
                          int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                          int out_f32) {
    gemm_body<true, true>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                          out_f32);
}
MMKD_EXPORT(gemm_fwd)

// dX = dY·W. A (batch, M, lda ≥ K), B (batch, K, ldb ≥ N).
MMKD_KERNEL void gemm_dgrad(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                            const mmkd_bf16* __restrict__ bias, mmkd_bf16* __restrict__ aux,
                            void* __restrict__ C, float* __restrict__ dbias, int M, int N, int K,
                            int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                            int out_f32) {
    gemm_body<true, false>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                           out_f32);
}
MMKD_EXPORT(gemm_dgrad)

// dW = dYᵀ·X, dbias = column sums of dY. A (batch, K, lda ≥ M), B (batch, K, ldb ≥ N).
MMKD_KERNEL void gemm_wgrad(const mmkd_bf16* __restrict__ A, const mmkd_bf16* __restrict__ B,
                            const mmkd_bf16* __restrict__ bias, mmkd_bf16* __restrict__ aux,
                            void* __restrict__ C, float* __restrict__ dbias, int M, int N, int K,
                            int lda, int ldb, int ldc, int sa, int sb, int sc, int act,
                            int out_f32) {
    gemm_body<false, false>(A, B, bias, aux, C, dbias, M, N, K, lda, ldb, ldc, sa, sb, sc, act,
                            out_f32);
}
MMKD_EXPORT(gemm_wgrad)

// C(i) = Σ_s ws(s, i) for i < MN, and dbias(m) = Σ_s ws(S·MN + s·M + m) for m < M when dbias
// is not null: the split-K partials of a weight gradient, added in the order s = 0, 1, ...
// Launch: 1-d, any grid (grid-stride); four C elements per thread and step when ws and C are
// 16-byte aligned and MN is a multiple of 4 (so every partial stays aligned), else one.
MMKD_KERNEL void gemm_splitk_reduce(const float* __restrict__ ws, float* __restrict__ C,
                                    float* __restrict__ dbias, int MN, int M, int S) {
    const long stride = (long)gridDim.x * blockDim.x;
    const long t0 = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = MN % 4 == 0 && ((reinterpret_cast<unsigned long long>(ws) |
                                      reinterpret_cast<unsigned long long>(C)) & 15ull) == 0;
    if (vec) {
        for (long i = t0; i < MN / 4; i += stride) {
            mmkd_u32x4 v = load_u32x4(ws + 4 * i);
            float acc[4] = {__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                            __uint_as_float(v.w)};
            for (int s = 1; s < S; ++s) {
                v = load_u32x4(ws + (long)s * MN + 4 * i);
                acc[0] += __uint_as_float(v.x);
                acc[1] += __uint_as_float(v.y);
                acc[2] += __uint_as_float(v.z);
                acc[3] += __uint_as_float(v.w);
            }
            const mmkd_u32x4 o = {__float_as_uint(acc[0]), __float_as_uint(acc[1]),
                                  __float_as_uint(acc[2]), __float_as_uint(acc[3])};
            store_u32x4(C + 4 * i, o);
        }
    } else {
        for (long i = t0; i < MN; i += stride) {
            float acc = ws[i];
            for (int s = 1; s < S; ++s) acc += ws[(long)s * MN + i];
            C[i] = acc;
        }
    }
    if (dbias == nullptr) return;
    const float* wd = ws + (long)S * MN;
    for (long m = t0; m < M; m += stride) {
        float acc = wd[m];
        for (int s = 1; s < S; ++s) acc += wd[(long)s * M + m];
        dbias[m] = acc;
    }
}
MMKD_EXPORT(gemm_splitk_reduce)
