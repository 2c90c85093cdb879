// layernorm.cu: LayerNorm fused with the residual add, forward and backward.
//
// Forward, per row n of (N, C):   s = x + r  (rounded to bf16 and stored: the residual stream;
//                                 without r (null), s = x and nothing is stored: s is null too)
//                                 mean = Σ s / C,  rstd = 1 / sqrt(Σ (s - mean)² / C + eps)
//                                 y = (s - mean) · rstd · gamma + beta
// Backward, with xhat = (s - mean) · rstd and g = dy · gamma:
//                                 ds = rstd · (g - mean(g) - xhat · mean(g · xhat)) + dres
//                                 dgamma = Σ_n dy · xhat,  dbeta = Σ_n dy
// ds is the gradient of both x and r. dres is the gradient arriving at s along the residual
// path (may be null). Storage is bf16, statistics and sums fp32. dgamma/dbeta are reduced in
// two deterministic passes (per-block partials, then a fixed-order sum), so a rerun is
// bit-identical: no float atomics.
//
// layernorm_fwd_rows and layernorm_bwd_rows are the forward and backward for C a multiple of
// 256 up to 1024 (the models' 512, 768, 1024): one warp per row, the row held in registers
// between the passes, 16-byte accesses and warp-shuffle sums, so each input is read once and
// no block barrier is waited on. layernorm_fwd and layernorm_bwd (a block per row) take any C.
//
// Defines: layernorm_fwd, layernorm_fwd_rows, layernorm_bwd, layernorm_bwd_rows,
// layernorm_bwd_reduce.
// Test-only variants (kernels/build.rs, "mmkd-emu-variant" lines below):
//   MMKD_LN_BROKEN_INDEX   the forward reads x one column too far (off by one)
//   MMKD_LN_BROKEN_BARRIER the block reduction lacks the barrier before the partials are read
// mmkd-emu-variant: broken_index MMKD_LN_BROKEN_INDEX
// mmkd-emu-variant: broken_barrier MMKD_LN_BROKEN_BARRIER
#include "prelude.cuh"

#define LN_MAX_WARPS 32

MMKD_DEVICE float ln_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of v over the block, returned to every thread. `scratch` holds one float per warp.
// Requires blockDim.x to be a multiple of 32.
MMKD_DEVICE float ln_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = ln_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
#ifndef MMKD_LN_BROKEN_BARRIER
    __syncthreads();
#endif
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    t = ln_warp_sum(t);
    __syncthreads();  // scratch is reused by the next call
    return t;
}

// grid (N), block (T: multiple of 32, ≤ 1024)
MMKD_KERNEL void layernorm_fwd(const mmkd_bf16* __restrict__ x,      // (N, C)
                               const mmkd_bf16* __restrict__ r,      // (N, C) or null
                               const mmkd_bf16* __restrict__ gamma,  // (C)
                               const mmkd_bf16* __restrict__ beta,   // (C)
                               mmkd_bf16* __restrict__ s,            // (N, C) out: x + r, or null
                               mmkd_bf16* __restrict__ y,            // (N, C) out
                               float* __restrict__ mean,             // (N) out
                               float* __restrict__ rstd,             // (N) out
                               int C, float eps) {
    __shared__ float scratch[LN_MAX_WARPS];
    const long row = blockIdx.x;
    const mmkd_bf16* xr = x + row * C;
    // The row the statistics describe: the stored sum, or x itself without a residual.
    const mmkd_bf16* sr = r != nullptr ? s + row * C : xr;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
#ifdef MMKD_LN_BROKEN_INDEX
        const int cx = c + 1 < C ? c + 1 : c;
#else
        const int cx = c;
#endif
        float v = bf16_to_f32(xr[cx]);
        if (r != nullptr) {
            // Round the sum to bf16 first: the statistics must describe the stored stream.
            const mmkd_bf16 sb = f32_to_bf16(v + bf16_to_f32(r[row * C + c]));
            s[row * C + c] = sb;
            v = bf16_to_f32(sb);
        }
        sum += v;
    }
    const float mu = ln_block_sum(sum, scratch) / C;
    // Second pass over the row (from global memory, cached) for a numerically safe variance.
    float sq = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float d = bf16_to_f32(sr[c]) - mu;
        sq += d * d;
    }
    const float rs = rsqrtf(ln_block_sum(sq, scratch) / C + eps);
    mmkd_bf16* yr = y + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float xhat = (bf16_to_f32(sr[c]) - mu) * rs;
        yr[c] = f32_to_bf16(xhat * bf16_to_f32(gamma[c]) + bf16_to_f32(beta[c]));
    }
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}
MMKD_EXPORT(layernorm_fwd)

#define LNR_MAX_CHUNKS 4  // 16-byte chunks per lane: C ≤ 4 · 32 · 8

// 8 bf16 at p as floats: one 16-byte load when `vec`, else element by element.
MMKD_DEVICE void ln_load8(float v[8], const mmkd_bf16* p, bool vec) {
    if (vec) {
        const mmkd_u32x4 w = load_u32x4(p);
        const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            v[2 * e] = bf16_to_f32((mmkd_bf16)(u[e] & 0xffffu));
            v[2 * e + 1] = bf16_to_f32((mmkd_bf16)(u[e] >> 16));
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = bf16_to_f32(p[e]);
    }
}

// Stores 8 bf16 at p, as one 16-byte store when `vec`.
MMKD_DEVICE void ln_store8(mmkd_bf16* p, const mmkd_bf16 b[8], bool vec) {
    if (vec) {
        const mmkd_u32x4 w = {pack_bf16x2(b[0], b[1]), pack_bf16x2(b[2], b[3]),
                              pack_bf16x2(b[4], b[5]), pack_bf16x2(b[6], b[7])};
        store_u32x4(p, w);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) p[e] = b[e];
    }
}

MMKD_DEVICE bool ln_aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// layernorm_fwd's parameters and results for C = 256·k, k ≤ 4, plus the row count N.
// grid (ceil(N/4)), block (128): warp w of block b normalises row 4b + w; lane l holds
// columns 256·i + 8l .. + 7 of it for i < C/256.
MMKD_KERNEL void layernorm_fwd_rows(const mmkd_bf16* __restrict__ x,      // (N, C)
                                    const mmkd_bf16* __restrict__ r,      // (N, C) or null
                                    const mmkd_bf16* __restrict__ gamma,  // (C)
                                    const mmkd_bf16* __restrict__ beta,   // (C)
                                    mmkd_bf16* __restrict__ s,            // (N, C) out, or null
                                    mmkd_bf16* __restrict__ y,            // (N, C) out
                                    float* __restrict__ mean,             // (N) out
                                    float* __restrict__ rstd,             // (N) out
                                    int C, float eps, int N) {
    const long row = (long)blockIdx.x * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= N) return;  // whole warps leave together: no shuffle misses a lane
    const int chunks = C / 256;
    // Row starts are 16-byte aligned when the bases are (C is a multiple of 8).
    const bool vx = ln_aligned16(x) && (r == nullptr || (ln_aligned16(r) && ln_aligned16(s)));
    const bool vy = ln_aligned16(y) && ln_aligned16(gamma) && ln_aligned16(beta);
    float v[LNR_MAX_CHUNKS][8];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
        if (i >= chunks) break;
        const long off = row * C + 256 * i + 8 * lane;
        ln_load8(v[i], x + off, vx);
        if (r != nullptr) {
            // Round the sum to bf16 first: the statistics must describe the stored stream.
            float rv[8];
            ln_load8(rv, r + off, vx);
            mmkd_bf16 sb[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                sb[e] = f32_to_bf16(v[i][e] + rv[e]);
                v[i][e] = bf16_to_f32(sb[e]);
            }
            ln_store8(s + off, sb, vx);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += v[i][e];
    }
    const float mu = ln_warp_sum(sum) / C;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
        if (i >= chunks) break;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float d = v[i][e] - mu;
            sq += d * d;
        }
    }
    const float rs = rsqrtf(ln_warp_sum(sq) / C + eps);
#pragma unroll
    for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
        if (i >= chunks) break;
        const int c0 = 256 * i + 8 * lane;
        float g[8], b[8];
        ln_load8(g, gamma + c0, vy);
        ln_load8(b, beta + c0, vy);
        mmkd_bf16 out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = f32_to_bf16((v[i][e] - mu) * rs * g[e] + b[e]);
        ln_store8(y + row * C + c0, out, vy);
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}
MMKD_EXPORT(layernorm_fwd_rows)

// grid (G ≤ N), block (T: multiple of 32); dynamic shared memory 2·C floats.
// Block b handles rows b, b + G, ... and writes its column partials to part[b].
MMKD_KERNEL void layernorm_bwd(const mmkd_bf16* __restrict__ dy,     // (N, C)
                               const mmkd_bf16* __restrict__ s,      // (N, C)
                               const mmkd_bf16* __restrict__ gamma,  // (C)
                               const float* __restrict__ mean,       // (N)
                               const float* __restrict__ rstd,       // (N)
                               const mmkd_bf16* __restrict__ dres,   // (N, C) or null
                               mmkd_bf16* __restrict__ ds,           // (N, C) out
                               float* __restrict__ part,             // (G, 2, C) out: dgamma, dbeta
                               int N, int C) {
    __shared__ float scratch[LN_MAX_WARPS];
    MMKD_DYNAMIC_SMEM(float, acc);  // (2, C): this block's dgamma, dbeta
    // Column c belongs to one thread for the whole kernel, so acc needs no atomics.
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        acc[c] = 0.0f;
        acc[C + c] = 0.0f;
    }
    for (long row = blockIdx.x; row < N; row += gridDim.x) {
        const mmkd_bf16* dyr = dy + row * C;
        const mmkd_bf16* sr = s + row * C;
        const float mu = mean[row], rs = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            const float xhat = (bf16_to_f32(sr[c]) - mu) * rs;
            const float g = bf16_to_f32(dyr[c]) * bf16_to_f32(gamma[c]);
            sg += g;
            sgx += g * xhat;
        }
        const float mg = ln_block_sum(sg, scratch) / C;
        const float mgx = ln_block_sum(sgx, scratch) / C;
        mmkd_bf16* dsr = ds + row * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            const float xhat = (bf16_to_f32(sr[c]) - mu) * rs;
            const float d = bf16_to_f32(dyr[c]);
            float v = rs * (d * bf16_to_f32(gamma[c]) - mg - xhat * mgx);
            if (dres != nullptr) v += bf16_to_f32(dres[row * C + c]);
            dsr[c] = f32_to_bf16(v);
            acc[c] += d * xhat;
            acc[C + c] += d;
        }
    }
    float* pb = part + (long)blockIdx.x * 2 * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        pb[c] = acc[c];
        pb[C + c] = acc[C + c];
    }
}
MMKD_EXPORT(layernorm_bwd)

// layernorm_bwd's parameters and results for C = 256·k, k ≤ 4, with G = 4·gridDim.x partial
// rows. grid (G/4), block (128): warp g = 4b + w handles rows g, g + G, ... (lane l holds
// columns 256·i + 8l .. + 7) and writes its column partials to part[g].
MMKD_KERNEL void layernorm_bwd_rows(const mmkd_bf16* __restrict__ dy,     // (N, C)
                                    const mmkd_bf16* __restrict__ s,      // (N, C)
                                    const mmkd_bf16* __restrict__ gamma,  // (C)
                                    const float* __restrict__ mean,       // (N)
                                    const float* __restrict__ rstd,       // (N)
                                    const mmkd_bf16* __restrict__ dres,   // (N, C) or null
                                    mmkd_bf16* __restrict__ ds,           // (N, C) out
                                    float* __restrict__ part,             // (G, 2, C) out
                                    int N, int C) {
    const int G = 4 * gridDim.x;
    const int gw = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    const int chunks = C / 256;
    const bool vec = ln_aligned16(dy) && ln_aligned16(s) && ln_aligned16(ds) &&
                     ln_aligned16(gamma) && (dres == nullptr || ln_aligned16(dres));
    float dg[LNR_MAX_CHUNKS][8], db[LNR_MAX_CHUNKS][8];  // this lane's dgamma, dbeta partials
#pragma unroll
    for (int i = 0; i < LNR_MAX_CHUNKS; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) dg[i][e] = db[i][e] = 0.0f;
    for (long row = gw; row < N; row += G) {
        const float mu = mean[row], rs = rstd[row];
        float d[LNR_MAX_CHUNKS][8], xh[LNR_MAX_CHUNKS][8];
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
            if (i >= chunks) break;
            const int c0 = 256 * i + 8 * lane;
            float g[8];
            ln_load8(d[i], dy + row * C + c0, vec);
            ln_load8(xh[i], s + row * C + c0, vec);
            ln_load8(g, gamma + c0, vec);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                xh[i][e] = (xh[i][e] - mu) * rs;
                const float ge = d[i][e] * g[e];
                sg += ge;
                sgx += ge * xh[i][e];
            }
        }
        const float mg = ln_warp_sum(sg) / C, mgx = ln_warp_sum(sgx) / C;
#pragma unroll
        for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
            if (i >= chunks) break;
            const int c0 = 256 * i + 8 * lane;
            float g[8], dr[8];
            ln_load8(g, gamma + c0, vec);
            if (dres != nullptr) {
                ln_load8(dr, dres + row * C + c0, vec);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) dr[e] = 0.0f;
            }
            mmkd_bf16 out[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                out[e] = f32_to_bf16(rs * (d[i][e] * g[e] - mg - xh[i][e] * mgx) + dr[e]);
                dg[i][e] += d[i][e] * xh[i][e];
                db[i][e] += d[i][e];
            }
            ln_store8(ds + row * C + c0, out, vec);
        }
    }
    float* pg = part + (long)gw * 2 * C;
#pragma unroll
    for (int i = 0; i < LNR_MAX_CHUNKS; ++i) {
        if (i >= chunks) break;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            pg[256 * i + 8 * lane + e] = dg[i][e];
            pg[C + 256 * i + 8 * lane + e] = db[i][e];
        }
    }
}
MMKD_EXPORT(layernorm_bwd_rows)

// grid (ceil(2C / 32)), block (256). Column j of the 2C partial columns (dgamma's C, then
// dbeta's) is summed by lane j % 32 of the eight warps of block j / 32: warp w adds rows
// w, w + 8, ... in order, then lane j of warp 0 adds the eight warp sums in warp order. The
// order is fixed, so a rerun is bit-identical; the G rows are read by 256 threads per column
// group at once instead of one thread walking all of them.
MMKD_KERNEL void layernorm_bwd_reduce(const float* __restrict__ part,  // (G, 2, C)
                                      float* __restrict__ dgamma,      // (C) out
                                      float* __restrict__ dbeta,       // (C) out
                                      int G, int C) {
    __shared__ float sums[8][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * 32 + lane;  // 0 .. 2C
    float acc = 0.0f;
    if (j < 2 * C)
        for (int i = warp; i < G; i += 8) acc += part[(long)i * 2 * C + j];
    sums[warp][lane] = acc;
    __syncthreads();
    if (warp != 0 || j >= 2 * C) return;
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) t += sums[w][lane];
    if (j < C)
        dgamma[j] = t;
    else
        dbeta[j - C] = t;
}
MMKD_EXPORT(layernorm_bwd_reduce)
