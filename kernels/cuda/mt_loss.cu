// mt_loss.cu: the combined multi-teacher distillation loss (DESIGN.md §2), forward and backward
// in one sequence of launches; the CLIP loss is its `task` part.
//
// Student features x (image, text) (N, D) → x̂ = x / max(‖x‖, 1e-12). Teacher targets U (N, T, D)
// per modality with the availability mask (N, T), prepared into K slots of (N, D) targets with
// row weights w (K, N) and column keep flags (K, N):
//   random (K = 1): U[i, pick[i]], w = 1/N;  mean (K = 1): mean of the available teachers
//   (renormalised under l2), w = 1/N;  all (K = T): slot k = U[:, k], w_ki = m_ik / (count_i N),
//   keep_kj = m_jk (a sample without teacher k is neither positive nor negative for k).
// Under teacher_norm = l2 every teacher row is normalised first.
//   task  = ½ [ CE(e^s Î T̂ᵀ) + CE(e^s T̂ Îᵀ) ]                       (mean over rows)
//   fd    = Σ_k Σ_i w_ki ( ‖Î_i − U_I[k,i]‖² + ‖T̂_i − U_T[k,i]‖² ) / D
//   icl   = ½ Σ_k Σ_i w_ki [ CE_i(c Î U_T[k]ᵀ) + CE_i(c T̂ U_I[k]ᵀ) ]   (kept columns only)
//   total = task + λ fd + icl
// CLIP mode (no teachers, K = 0): only the normalisation, the task's two statistics and two
// gradient passes, mtl_finish with K = 0 and mtl_reduce with null icl/teacher sections run, so
// fd = icl = 0 and total = task; mtl_targets and the student–teacher passes never launch.
// The N×N logits are never stored: mtl_row_stats streams over the columns with an online
// softmax (running max and sum per row), and mtl_grad_rows recomputes each logit from the two
// feature rows to form dL/dz = w (softmax − onehot) on the fly. Everything past the input loads
// is fp32. Per-row partial results are summed by mtl_reduce in a fixed order, so a rerun is
// bit-identical (no float atomics).
//
// Defines: mtl_normalize_f32/_bf16, mtl_targets_f32/_bf16, mtl_row_stats, mtl_grad_rows (fp32,
// CUDA cores), mtl_row_stats_tc, mtl_grad_rows_tc (bf16 tensor cores), mtl_finish, mtl_reduce.
// Test-only variants: MMKD_MTL_BROKEN_ONLINE drops the rescale of the running sum when the
// running max grows (a classic online-softmax bug); MMKD_MTL_BROKEN_FRAG swaps two registers of
// the dL/dz fragment in mtl_grad_rows_tc (a fragment-layout bug).
// mmkd-emu-variant: broken_online MMKD_MTL_BROKEN_ONLINE
// mmkd-emu-variant: broken_frag MMKD_MTL_BROKEN_FRAG
#include "prelude.cuh"

#define MTL_THREADS 256
#define MTL_WARPS (MTL_THREADS / 32)
#define MTL_EPS 1e-12f

MMKD_DEVICE float mtl_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x == MTL_THREADS), returned to every thread. scratch: MTL_WARPS.
MMKD_DEVICE float mtl_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = mtl_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < MTL_WARPS ? scratch[lane] : 0.0f;
    t = mtl_warp_sum(t);
    __syncthreads();  // scratch is reused by the next call
    return t;
}

MMKD_DEVICE float mtl_ld(const float* p, long i) { return p[i]; }
MMKD_DEVICE float mtl_ld(const mmkd_bf16* p, long i) { return bf16_to_f32(p[i]); }

// ---- 1. student normalisation. grid (N, 2: image, text), block MTL_THREADS ----------------
template <typename T>
MMKD_DEVICE void mtl_normalize(const T* img, const T* txt, float* xhat, float* norms, int N,
                               int D) {
    __shared__ float scratch[MTL_WARPS];
    const long row = blockIdx.x;
    const T* src = (blockIdx.y == 0 ? img : txt) + row * D;
    float* dst = xhat + ((long)blockIdx.y * N + row) * D;
    float ss = 0.0f;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        const float v = mtl_ld(src, e);
        ss += v * v;
    }
    const float nrm = max(sqrtf(mtl_block_sum(ss, scratch)), MTL_EPS);
    for (int e = threadIdx.x; e < D; e += blockDim.x) dst[e] = mtl_ld(src, e) / nrm;
    if (threadIdx.x == 0) norms[blockIdx.y * N + row] = nrm;
}

MMKD_KERNEL void mtl_normalize_f32(const float* __restrict__ img,  // (N, D)
                                   const float* __restrict__ txt,  // (N, D)
                                   float* __restrict__ xhat,       // (2, N, D) out
                                   float* __restrict__ norms,      // (2, N) out
                                   int N, int D) {
    mtl_normalize(img, txt, xhat, norms, N, D);
}
MMKD_EXPORT(mtl_normalize_f32)

MMKD_KERNEL void mtl_normalize_bf16(const mmkd_bf16* __restrict__ img,  // (N, D)
                                    const mmkd_bf16* __restrict__ txt,  // (N, D)
                                    float* __restrict__ xhat,           // (2, N, D) out
                                    float* __restrict__ norms,          // (2, N) out
                                    int N, int D) {
    mtl_normalize(img, txt, xhat, norms, N, D);
}
MMKD_EXPORT(mtl_normalize_bf16)

// ---- 2. teacher targets. grid (N, 2: image, text), block MTL_THREADS ------------------------
// mode: 0 random (K = 1, slot pick[i]), 1 mean (K = 1), 2 all (K = T). bad[i] = 1 when sample
// i has no usable teacher (no available one, or pick out of range / unavailable); its weight is 0.
template <typename T>
MMKD_DEVICE void mtl_targets(const T* timg, const T* ttxt, const unsigned char* mask,
                             const int* pick, float* tgt, float* w, float* keep, float* bad,
                             int N, int TT, int D, int mode, int l2) {
    __shared__ float scratch[MTL_WARPS];
    const long i = blockIdx.x;
    const int y = blockIdx.y;
    const T* src = y == 0 ? timg : ttxt;
    const int K = mode == 2 ? TT : 1;
    float* out = tgt + (long)y * K * N * D;  // (K, N, D) of this modality
    int count = 0;
    for (int t = 0; t < TT; ++t) count += mask[i * TT + t] != 0;
    if (mode == 0) {
        const int k = pick[i];
        const bool ok = k >= 0 && k < TT && mask[i * TT + (k >= 0 && k < TT ? k : 0)] != 0;
        const T* u = src + (i * TT + (ok ? k : 0)) * D;
        float ss = 0.0f;
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            const float v = mtl_ld(u, e);
            ss += v * v;
        }
        const float inv = l2 ? 1.0f / max(sqrtf(mtl_block_sum(ss, scratch)), MTL_EPS) : 1.0f;
        for (int e = threadIdx.x; e < D; e += blockDim.x)
            out[i * D + e] = ok ? mtl_ld(u, e) * inv : 0.0f;
        if (y == 0 && threadIdx.x == 0) {
            w[i] = ok ? 1.0f / N : 0.0f;
            keep[i] = 1.0f;
            bad[i] = ok ? 0.0f : 1.0f;
        }
    } else if (mode == 1) {
        float* o = out + i * D;
        // Each thread owns columns e ≡ threadIdx.x (mod blockDim.x): accumulate in place.
        for (int e = threadIdx.x; e < D; e += blockDim.x) o[e] = 0.0f;
        for (int t = 0; t < TT; ++t) {
            if (mask[i * TT + t] == 0) continue;  // uniform over the block
            const T* u = src + (i * TT + t) * D;
            float ss = 0.0f;
            for (int e = threadIdx.x; e < D; e += blockDim.x) {
                const float v = mtl_ld(u, e);
                ss += v * v;
            }
            const float inv =
                l2 ? 1.0f / max(sqrtf(mtl_block_sum(ss, scratch)), MTL_EPS) : 1.0f;
            for (int e = threadIdx.x; e < D; e += blockDim.x) o[e] += mtl_ld(u, e) * inv / count;
        }
        if (l2) {
            float ss = 0.0f;
            for (int e = threadIdx.x; e < D; e += blockDim.x) ss += o[e] * o[e];
            const float inv = 1.0f / max(sqrtf(mtl_block_sum(ss, scratch)), MTL_EPS);
            for (int e = threadIdx.x; e < D; e += blockDim.x) o[e] *= inv;
        }
        if (y == 0 && threadIdx.x == 0) {
            w[i] = count > 0 ? 1.0f / N : 0.0f;
            keep[i] = 1.0f;
            bad[i] = count > 0 ? 0.0f : 1.0f;
        }
    } else {
        for (int k = 0; k < K; ++k) {
            const bool avail = mask[i * TT + k] != 0;
            const T* u = src + (i * TT + k) * D;
            float* o = out + ((long)k * N + i) * D;
            float ss = 0.0f;
            for (int e = threadIdx.x; e < D; e += blockDim.x) {
                const float v = mtl_ld(u, e);
                ss += v * v;
            }
            const float inv =
                l2 ? 1.0f / max(sqrtf(mtl_block_sum(ss, scratch)), MTL_EPS) : 1.0f;
            for (int e = threadIdx.x; e < D; e += blockDim.x)
                o[e] = avail ? mtl_ld(u, e) * inv : 0.0f;
            if (y == 0 && threadIdx.x == 0) {
                w[(long)k * N + i] = avail ? 1.0f / ((float)count * N) : 0.0f;
                keep[(long)k * N + i] = avail ? 1.0f : 0.0f;
            }
        }
        if (y == 0 && threadIdx.x == 0) bad[i] = count > 0 ? 0.0f : 1.0f;
    }
}

MMKD_KERNEL void mtl_targets_f32(const float* __restrict__ timg,          // (N, T, D)
                                 const float* __restrict__ ttxt,          // (N, T, D)
                                 const unsigned char* __restrict__ mask,  // (N, T)
                                 const int* __restrict__ pick,            // (N), random mode
                                 float* __restrict__ tgt,                 // (2, K, N, D) out
                                 float* __restrict__ w,                   // (K, N) out
                                 float* __restrict__ keep,                // (K, N) out
                                 float* __restrict__ bad,                 // (N) out
                                 int N, int T, int D, int mode, int l2) {
    mtl_targets(timg, ttxt, mask, pick, tgt, w, keep, bad, N, T, D, mode, l2);
}
MMKD_EXPORT(mtl_targets_f32)

MMKD_KERNEL void mtl_targets_bf16(const mmkd_bf16* __restrict__ timg,     // (N, T, D)
                                  const mmkd_bf16* __restrict__ ttxt,     // (N, T, D)
                                  const unsigned char* __restrict__ mask, // (N, T)
                                  const int* __restrict__ pick,           // (N), random mode
                                  float* __restrict__ tgt,                // (2, K, N, D) out
                                  float* __restrict__ w,                  // (K, N) out
                                  float* __restrict__ keep,               // (K, N) out
                                  float* __restrict__ bad,                // (N) out
                                  int N, int T, int D, int mode, int l2) {
    mtl_targets(timg, ttxt, mask, pick, tgt, w, keep, bad, N, T, D, mode, l2);
}
MMKD_EXPORT(mtl_targets_bf16)

// ---- 3. row statistics of z = scale · A Bₖᵀ. grid (N, K), block MTL_THREADS ------------------
// Row i of slot k, weight wscale · w[k, i] (w null: 1), over the kept columns j:
//   stats[k, i] = (max_j z_ij, Σ_j exp(z_ij − max), weight · (logsumexp − z_ii)).
// A warp owns columns j ≡ warp (mod MTL_WARPS): its lanes split the dot product over D and keep
// a running max and sum; the warps' pairs are merged at the end. Rows of weight 0 are skipped.
// Dynamic shared memory: D floats (row i of A).
MMKD_KERNEL void mtl_row_stats(const float* __restrict__ A,     // (N, D)
                               const float* __restrict__ B,     // (K, N, D)
                               const float* __restrict__ keep,  // (K, N) or null: all kept
                               const float* __restrict__ w,     // (K, N) or null: all 1
                               float* __restrict__ stats,       // (K, N, 3) out
                               float wscale, float scale, int N, int D) {
    __shared__ float wm[MTL_WARPS], wl[MTL_WARPS], zdiag[1];
    MMKD_DYNAMIC_SMEM(float, a);  // (D)
    const long i = blockIdx.x, k = blockIdx.y;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* st = stats + (k * N + i) * 3;
    const float wi = wscale * (w != nullptr ? w[k * N + i] : 1.0f);
    if (wi == 0.0f) {  // the same for every thread: the block leaves together
        if (threadIdx.x == 0) {
            st[0] = 0.0f;
            st[1] = 1.0f;
            st[2] = 0.0f;
        }
        return;
    }
    for (int e = threadIdx.x; e < D; e += blockDim.x) a[e] = A[i * D + e];
    // NaN until row i's own column is seen: were it ever skipped, the loss would be NaN (which
    // stops the step) instead of reading what an earlier block left here.
    if (threadIdx.x == 0) zdiag[0] = __uint_as_float(0x7fc00000u);
    __syncthreads();
    const float* Bk = B + k * N * D;
    float m = __uint_as_float(0xff800000u), l = 0.0f;  // running max (−inf) and sum
    for (int j = warp; j < N; j += MTL_WARPS) {
        if (keep != nullptr && keep[k * N + j] == 0.0f) continue;  // uniform over the warp
        float dot = 0.0f;
        for (int e = lane; e < D; e += 32) dot += a[e] * Bk[(long)j * D + e];
        const float z = scale * mtl_warp_sum(dot);
        if (j == i && lane == 0) zdiag[0] = z;
        const float mn = max(m, z);
#ifdef MMKD_MTL_BROKEN_ONLINE
        l = l + expf(z - mn);
#else
        l = l * expf(m - mn) + expf(z - mn);
#endif
        m = mn;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = __uint_as_float(0xff800000u);
        for (int q = 0; q < MTL_WARPS; ++q)
            if (wl[q] > 0.0f) M = max(M, wm[q]);
        float L = 0.0f;
        for (int q = 0; q < MTL_WARPS; ++q)
            if (wl[q] > 0.0f) L += wl[q] * expf(wm[q] - M);
        st[0] = M;
        st[1] = L;
        // Row i's own column is always kept when its weight is non-zero (the targets kernel
        // gives weight only to available teachers), so zdiag was written.
        st[2] = wi * (M + logf(L) - zdiag[0]);
    }
}
MMKD_EXPORT(mtl_row_stats)

// ---- 4. gradient rows. grid (N), block MTL_THREADS ---------------------------------------
// For row i of A, over the K slots and the kept columns j, with p = exp(z − max) / sum from
// `stats`:  g_ij = w_ki (p_ij − δ_ij)  [+ wscale (q_ji − δ_ij) with q from stats_t, the row
// statistics of B Aᵀ (K = 1, all kept): the column direction of the CLIP loss].
//   dA_i  (+)= scale Σ_j g_ij B_j          dscale_i (+)= Σ_j g_ij A_i·B_j
// acc bit 0: add to dA instead of overwriting; bit 1: the same for dscale (null: not wanted).
// Each warp accumulates its columns' contributions into its own row of shared memory; the
// rows are summed in warp order at the end (no atomics, deterministic).
// Dynamic shared memory: (1 + MTL_WARPS) · D floats.
MMKD_KERNEL void mtl_grad_rows(const float* __restrict__ A,        // (N, D)
                               const float* __restrict__ B,        // (K, N, D)
                               const float* __restrict__ keep,     // (K, N) or null
                               const float* __restrict__ w,        // (K, N) or null
                               const float* __restrict__ stats,    // (K, N, 3)
                               const float* __restrict__ stats_t,  // (N, 3) or null
                               float* __restrict__ dA,             // (N, D) out
                               float* __restrict__ dscale,         // (N) out, or null
                               float wscale, float scale, int N, int D, int K, int acc) {
    __shared__ float scratch[MTL_WARPS];
    MMKD_DYNAMIC_SMEM(float, sm);
    float* a = sm;                       // (D)
    float* part = sm + D;                // (MTL_WARPS, D)
    const long i = blockIdx.x;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int e = threadIdx.x; e < D; e += blockDim.x) a[e] = A[i * D + e];
    for (int e = threadIdx.x; e < MTL_WARPS * D; e += blockDim.x) part[e] = 0.0f;
    __syncthreads();
    float* my = part + warp * D;
    float ds = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float wi = wscale * (w != nullptr ? w[(long)k * N + i] : 1.0f);
        if (wi == 0.0f && stats_t == nullptr) continue;  // uniform over the block
        const float mi = stats[((long)k * N + i) * 3], li = stats[((long)k * N + i) * 3 + 1];
        const float* Bk = B + (long)k * N * D;
        for (int j = warp; j < N; j += MTL_WARPS) {
            if (keep != nullptr && keep[(long)k * N + j] == 0.0f) continue;
            float dot = 0.0f;
            for (int e = lane; e < D; e += 32) dot += a[e] * Bk[(long)j * D + e];
            dot = mtl_warp_sum(dot);
            const float z = scale * dot;
            const float hit = j == i ? 1.0f : 0.0f;
            float g = 0.0f;
            if (wi != 0.0f) g += wi * (expf(z - mi) / li - hit);
            if (stats_t != nullptr)
                g += wscale * (expf(z - stats_t[(long)j * 3]) / stats_t[(long)j * 3 + 1] - hit);
            if (g == 0.0f) continue;
            // Lane `lane` owns elements e ≡ lane (mod 32) of this warp's row: no race.
            const float sg = scale * g;
            for (int e = lane; e < D; e += 32) my[e] += sg * Bk[(long)j * D + e];
            if (lane == 0) ds += g * dot;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < MTL_WARPS; ++q) s += part[q * D + e];
        dA[i * D + e] = (acc & 1) ? dA[i * D + e] + s : s;
    }
    ds = mtl_block_sum(ds, scratch);
    if (dscale != nullptr && threadIdx.x == 0) dscale[i] = (acc & 2) ? dscale[i] + ds : ds;
}
MMKD_EXPORT(mtl_grad_rows)

// ---- 3b/4b. tensor-core variants of the two logit passes (bf16 operands, fp32 sums) --------
// Used for bf16 inputs when D % 16 == 0: the normalised rows are rounded to bf16 as they are
// loaded into mma.m16n8k16 fragments (the PTX ISA layouts; g = lane / 4, t = lane % 4):
//   A (16×16, row): a0 (g, 2t..2t+1), a1 (g+8, ·), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16×8, col):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16×8):       c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// One warp per 16 rows; fragments come straight from global memory (rows are contiguous in
// D, so each lane reads pairs of neighbouring floats). Same outputs as the SIMT kernels.

// Loads the A fragment of rows (r0, r0 + 8) at columns k0.. of a (rows, D) fp32 matrix;
// rows ≥ rows read as zero.
MMKD_DEVICE void mtl_frag_a(unsigned a[4], const float* M, long r0, int rows, int D, int k0) {
    const int g = threadIdx.x / 4 % 8, t = threadIdx.x % 4;
    const long ra = r0 + g, rb = r0 + g + 8;
    const int c = k0 + 2 * t;
    const float* pa = M + ra * D;
    const float* pb = M + rb * D;
    const bool oka = ra < rows, okb = rb < rows;
    a[0] = oka ? pack_bf16x2(f32_to_bf16(pa[c]), f32_to_bf16(pa[c + 1])) : 0u;
    a[1] = okb ? pack_bf16x2(f32_to_bf16(pb[c]), f32_to_bf16(pb[c + 1])) : 0u;
    a[2] = oka ? pack_bf16x2(f32_to_bf16(pa[c + 8]), f32_to_bf16(pa[c + 9])) : 0u;
    a[3] = okb ? pack_bf16x2(f32_to_bf16(pb[c + 8]), f32_to_bf16(pb[c + 9])) : 0u;
}

// C (16×8 tile at rows r0.., columns j0..) = A[r0..] · B[j0..]ᵀ over D (both (rows, D)).
MMKD_DEVICE void mtl_logit_tile(float c[4], const float* A, long r0, const float* B, long j0,
                                int N, int D) {
    const int g = threadIdx.x / 4 % 8, t = threadIdx.x % 4;
    const long j = j0 + g;
    const float* pb = B + j * D;
    c[0] = c[1] = c[2] = c[3] = 0.0f;
    for (int k0 = 0; k0 < D; k0 += 16) {
        unsigned a[4], b[2];
        mtl_frag_a(a, A, r0, N, D, k0);
        const int k = k0 + 2 * t;
        b[0] = j < N ? pack_bf16x2(f32_to_bf16(pb[k]), f32_to_bf16(pb[k + 1])) : 0u;
        b[1] = j < N ? pack_bf16x2(f32_to_bf16(pb[k + 8]), f32_to_bf16(pb[k + 9])) : 0u;
        mma_m16n8k16_bf16(c, a, b, c);
    }
}

// Merges a (max, sum) pair with the one of lane ^ o; empty pairs (sum 0) have max −inf.
MMKD_DEVICE void mtl_merge(float& m, float& l, int o) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, o);
    const float lo = __shfl_xor_sync(0xffffffffu, l, o);
    const float mn = max(m, mo);
    float r = 0.0f;
    if (l > 0.0f) r += l * expf(m - mn);
    if (lo > 0.0f) r += lo * expf(mo - mn);
    m = mn;
    l = r;
}

// grid (ceil(N / 16), K), block 32. Same contract as mtl_row_stats; D % 16 == 0.
MMKD_KERNEL void mtl_row_stats_tc(const float* __restrict__ A,     // (N, D)
                                  const float* __restrict__ B,     // (K, N, D)
                                  const float* __restrict__ keep,  // (K, N) or null
                                  const float* __restrict__ w,     // (K, N) or null
                                  float* __restrict__ stats,       // (K, N, 3) out
                                  float wscale, float scale, int N, int D) {
    const long r0 = (long)blockIdx.x * 16, k = blockIdx.y;
    const int g = threadIdx.x / 4, t = threadIdx.x % 4;
    const float* Bk = B + k * N * D;
    const float ninf = __uint_as_float(0xff800000u);
    float m[2] = {ninf, ninf}, l[2] = {0.0f, 0.0f}, zd[2] = {0.0f, 0.0f};
    const long rows[2] = {r0 + g, r0 + g + 8};
    for (long j0 = 0; j0 < N; j0 += 8) {
        float c[4];
        mtl_logit_tile(c, A, r0, Bk, j0, N, D);
        for (int q = 0; q < 4; ++q) {
            const int h = q / 2;  // 0: row g, 1: row g + 8
            const long j = j0 + 2 * t + q % 2;
            if (j >= N || (keep != nullptr && keep[k * N + j] == 0.0f)) continue;
            const float z = scale * c[q];
            if (j == rows[h]) zd[h] = z;
            const float mn = max(m[h], z);
            l[h] = (l[h] > 0.0f ? l[h] * expf(m[h] - mn) : 0.0f) + expf(z - mn);
            m[h] = mn;
        }
    }
    for (int h = 0; h < 2; ++h) {
        // The four lanes of a quad hold the same row: merge them.
        mtl_merge(m[h], l[h], 1);
        mtl_merge(m[h], l[h], 2);
        zd[h] += __shfl_xor_sync(0xffffffffu, zd[h], 1);
        zd[h] += __shfl_xor_sync(0xffffffffu, zd[h], 2);
        const long i = rows[h];
        if (t == 0 && i < N) {
            const float wi = wscale * (w != nullptr ? w[k * N + i] : 1.0f);
            float* st = stats + (k * N + i) * 3;
            st[0] = wi == 0.0f ? 0.0f : m[h];
            st[1] = wi == 0.0f ? 1.0f : l[h];
            st[2] = wi == 0.0f ? 0.0f : wi * (m[h] + logf(l[h]) - zd[h]);
        }
    }
}
MMKD_EXPORT(mtl_row_stats_tc)

// grid (ceil(N / 16), S), block 32; dynamic shared memory 16 · D floats (this warp's dA rows).
// Same contract as mtl_grad_rows, D % 16 == 0, except that the (slot k, 16-column tile) pairs
// are split into S contiguous ranges, one per blockIdx.y, each writing its own partial:
// dA (S, N, D) and dscale (S, N), summed in a fixed order by mtl_finish and mtl_reduce (so a
// few row tiles still fill the GPU). dL/dz for 16 columns at a time becomes the A fragment of
// a second mma against those 16 rows of B (the C layout of two 16×8 tiles is the A layout of
// one 16×16 tile), accumulated into shared memory.
MMKD_KERNEL void mtl_grad_rows_tc(const float* __restrict__ A,        // (N, D)
                                  const float* __restrict__ B,        // (K, N, D)
                                  const float* __restrict__ keep,     // (K, N) or null
                                  const float* __restrict__ w,        // (K, N) or null
                                  const float* __restrict__ stats,    // (K, N, 3)
                                  const float* __restrict__ stats_t,  // (N, 3) or null
                                  float* __restrict__ dA,             // (S, N, D) out
                                  float* __restrict__ dscale,         // (S, N) out, or null
                                  float wscale, float scale, int N, int D, int K, int acc) {
    MMKD_DYNAMIC_SMEM(float, part);  // (16, D)
    const long r0 = (long)blockIdx.x * 16;
    const long jt = (N + 15) / 16, total = (long)K * jt, S = gridDim.y;
    const long it0 = total * blockIdx.y / S, it1 = total * (blockIdx.y + 1) / S;
    dA += (long)blockIdx.y * N * D;
    if (dscale != nullptr) dscale += (long)blockIdx.y * N;
    const int g = threadIdx.x / 4, t = threadIdx.x % 4;
    for (int e = threadIdx.x; e < 16 * D; e += 32) part[e] = 0.0f;
    __syncwarp();
    const long rows[2] = {r0 + g, r0 + g + 8};
    float ds[2] = {0.0f, 0.0f};
    for (long it = it0; it < it1; ++it) {
        const long k = it / jt, j0 = it % jt * 16;
        const float* Bk = B + k * N * D;
        float wi[2], mi[2], li[2];
        for (int h = 0; h < 2; ++h) {
            const long i = rows[h];
            const bool in = i < N;
            wi[h] = in ? wscale * (w != nullptr ? w[(long)k * N + i] : 1.0f) : 0.0f;
            mi[h] = in ? stats[((long)k * N + i) * 3] : 0.0f;
            li[h] = in ? stats[((long)k * N + i) * 3 + 1] : 1.0f;
        }
        {
            float c[2][4];
            mtl_logit_tile(c[0], A, r0, Bk, j0, N, D);
            mtl_logit_tile(c[1], A, r0, Bk, j0 + 8, N, D);
            float gs[2][4];
            for (int s = 0; s < 2; ++s) {
                for (int q = 0; q < 4; ++q) {
                    const int h = q / 2;
                    const long i = rows[h], j = j0 + 8 * s + 2 * t + q % 2;
                    float gv = 0.0f;
                    const bool ok =
                        i < N && j < N && (keep == nullptr || keep[k * N + j] != 0.0f);
                    if (ok) {
                        const float z = scale * c[s][q], hit = j == i ? 1.0f : 0.0f;
                        if (wi[h] != 0.0f) gv += wi[h] * (expf(z - mi[h]) / li[h] - hit);
                        if (stats_t != nullptr)
                            gv += wscale * (expf(z - stats_t[j * 3]) / stats_t[j * 3 + 1] - hit);
                    }
                    ds[h] += gv * c[s][q];
                    gs[s][q] = scale * gv;
                }
            }
            unsigned ga[4];
            ga[0] = pack_bf16x2(f32_to_bf16(gs[0][0]), f32_to_bf16(gs[0][1]));
#ifdef MMKD_MTL_BROKEN_FRAG
            ga[2] = pack_bf16x2(f32_to_bf16(gs[0][2]), f32_to_bf16(gs[0][3]));
            ga[1] = pack_bf16x2(f32_to_bf16(gs[1][0]), f32_to_bf16(gs[1][1]));
#else
            ga[1] = pack_bf16x2(f32_to_bf16(gs[0][2]), f32_to_bf16(gs[0][3]));
            ga[2] = pack_bf16x2(f32_to_bf16(gs[1][0]), f32_to_bf16(gs[1][1]));
#endif
            ga[3] = pack_bf16x2(f32_to_bf16(gs[1][2]), f32_to_bf16(gs[1][3]));
            // B operand (k = column j0 + kk, n = feature e0 + g): rows j of B, read across.
            const long ja = j0 + 2 * t, jb = j0 + 2 * t + 8;
            for (int e0 = 0; e0 < D; e0 += 8) {
                const int e = e0 + g;
                const float v0 = ja < N ? Bk[ja * D + e] : 0.0f;
                const float v1 = ja + 1 < N ? Bk[(ja + 1) * D + e] : 0.0f;
                const float v2 = jb < N ? Bk[jb * D + e] : 0.0f;
                const float v3 = jb + 1 < N ? Bk[(jb + 1) * D + e] : 0.0f;
                unsigned b[2];
                b[0] = pack_bf16x2(f32_to_bf16(v0), f32_to_bf16(v1));
                b[1] = pack_bf16x2(f32_to_bf16(v2), f32_to_bf16(v3));
                float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_m16n8k16_bf16(d, ga, b, d);
                // Lane (g, t) owns rows g, g + 8 at columns e0 + 2t, e0 + 2t + 1: no race.
                part[g * D + e0 + 2 * t] += d[0];
                part[g * D + e0 + 2 * t + 1] += d[1];
                part[(g + 8) * D + e0 + 2 * t] += d[2];
                part[(g + 8) * D + e0 + 2 * t + 1] += d[3];
            }
        }
    }
    __syncwarp();
    for (int e = threadIdx.x; e < 16 * D; e += 32) {
        const long i = r0 + e / D;
        if (i >= N) continue;
        const long o = i * D + e % D;
        dA[o] = (acc & 1) ? dA[o] + part[e] : part[e];
    }
    for (int h = 0; h < 2; ++h) {
        ds[h] += __shfl_xor_sync(0xffffffffu, ds[h], 1);
        ds[h] += __shfl_xor_sync(0xffffffffu, ds[h], 2);
        const long i = rows[h];
        if (dscale != nullptr && t == 0 && i < N)
            dscale[i] = (acc & 2) ? dscale[i] + ds[h] : ds[h];
    }
}
MMKD_EXPORT(mtl_grad_rows_tc)

// ---- 5. feature MSE and the normalisation backward. grid (N, 2), block MTL_THREADS ---------
// g = dL/dx̂ (the logit terms, S partials) + λ Σ_k 2 w_ki (x̂ − U[k, i]) / D;
// dx = (g − x̂ (g·x̂)) / ‖x‖  (g / 1e-12 below the norm floor, where the map is linear).
// K = 0 (CLIP mode): tgt and w are not read and may be null; fd_part is written as 0.
MMKD_KERNEL void mtl_finish(const float* __restrict__ xhat,   // (2, N, D)
                            const float* __restrict__ norms,  // (2, N)
                            const float* __restrict__ tgt,    // (2, K, N, D), null if K = 0
                            const float* __restrict__ w,      // (K, N), null if K = 0
                            float* __restrict__ dxhat,        // (2, S, N, D) in: logit terms
                            float* __restrict__ fd_part,      // (2, N) out
                            float* __restrict__ dimg,         // (N, D) out
                            float* __restrict__ dtxt,         // (N, D) out
                            float lambda, int N, int D, int K, int S) {
    __shared__ float scratch[MTL_WARPS];
    const long i = blockIdx.x;
    const int y = blockIdx.y;
    const float* x = xhat + ((long)y * N + i) * D;
    // The S partials of the logit terms, summed in order into partial 0 (own elements only).
    float* g = dxhat + ((long)y * S * N + i) * D;
    for (int s = 1; s < S; ++s)
        for (int e = threadIdx.x; e < D; e += blockDim.x) g[e] += g[(long)s * N * D + e];
    // Targets of the same modality: image features are matched to teacher image features.
    const float* u = tgt + (long)y * K * N * D;
    float fd = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float wk = w[(long)k * N + i];
        if (wk == 0.0f) continue;
        const float* uk = u + ((long)k * N + i) * D;
        const float f = wk / D;
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            const float r = x[e] - uk[e];
            fd += f * r * r;
            g[e] += lambda * 2.0f * f * r;  // this thread's own elements: no race
        }
    }
    fd = mtl_block_sum(fd, scratch);
    float dot = 0.0f;
    for (int e = threadIdx.x; e < D; e += blockDim.x) dot += g[e] * x[e];
    dot = mtl_block_sum(dot, scratch);
    const float nrm = norms[y * N + i];
    float* dx = (y == 0 ? dimg : dtxt) + i * D;
    for (int e = threadIdx.x; e < D; e += blockDim.x)
        dx[e] = nrm <= MTL_EPS ? g[e] / nrm : (g[e] - x[e] * dot) / nrm;
    if (threadIdx.x == 0) fd_part[y * N + i] = fd;
}
MMKD_EXPORT(mtl_finish)

// ---- 6. final sums. grid (1), block MTL_THREADS -------------------------------------------
// out: task, fd, icl, total, d total/d s, d total/d ℓ (learned icl scale; else 0), samples
// without a usable teacher, 0. CLIP mode: K = 0, st_icl, dc and bad null (icl, d/dℓ and the
// count are then 0).
MMKD_KERNEL void mtl_reduce(const float* __restrict__ st_task,  // (2, N, 3)
                            const float* __restrict__ st_icl,   // (2, K, N, 3), null if K = 0
                            const float* __restrict__ fd_part,  // (2, N)
                            const float* __restrict__ ds_task,  // (S, N)
                            const float* __restrict__ dc,       // (S, N) or null
                            const float* __restrict__ bad,      // (N) or null
                            float* __restrict__ out,            // (8) out
                            float lambda, float logit_scale_exp, float icl_c, int learned,
                            int N, int K, int S) {
    __shared__ float scratch[MTL_WARPS];
    float task = 0.0f, fd = 0.0f, icl = 0.0f, ds = 0.0f, dcs = 0.0f, nb = 0.0f;
    for (int r = threadIdx.x; r < 2 * N; r += blockDim.x) {
        task += st_task[(long)r * 3 + 2];
        fd += fd_part[r];
    }
    for (long r = threadIdx.x; r < 2L * K * N; r += blockDim.x) icl += st_icl[r * 3 + 2];
    for (long r = threadIdx.x; r < (long)S * N; r += blockDim.x) {
        ds += ds_task[r];
        if (dc != nullptr) dcs += dc[r];
    }
    if (bad != nullptr)
        for (int r = threadIdx.x; r < N; r += blockDim.x) nb += bad[r];
    task = mtl_block_sum(task, scratch);
    fd = mtl_block_sum(fd, scratch);
    icl = mtl_block_sum(icl, scratch);
    ds = mtl_block_sum(ds, scratch);
    dcs = mtl_block_sum(dcs, scratch);
    nb = mtl_block_sum(nb, scratch);
    if (threadIdx.x == 0) {
        out[0] = task;
        out[1] = fd;
        out[2] = icl;
        out[3] = task + lambda * fd + icl;
        out[4] = logit_scale_exp * ds;  // d/ds of f(e^s) = e^s · df/d(e^s)
        out[5] = learned ? icl_c * dcs : 0.0f;
        out[6] = nb;
        out[7] = 0.0f;
    }
}
MMKD_EXPORT(mtl_reduce)
