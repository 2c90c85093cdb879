// elementwise.cu: the small kernels the engine needs around the big ones.
//
//   cast_f32_bf16 / cast_bf16_f32   y = x in the other precision (round to nearest even)
//   axpby_f32 / axpby_bf16          y = a·x + b·y (fp32 arithmetic); a = 0 reads no x and
//                                   b = 0 no y, so a = b = 0 clears y whatever it holds
//   embedding_gather                out[n, :] = table[idx[n], :]
//   embedding_scatter_add           dtable[v, :] += Σ dout[n, :] over the rows n with index v,
//                                   from the host's segment tables, in a fixed order
//   act_fwd / act_bwd               kind 0: GELU (erf form, BERT), kind 1: QuickGELU x·σ(1.702x)
//   softmax_rows                    y = softmax(scale · x) per row, fp32 statistics
// Out-of-range gather indices write zeros and are counted in `bad[0]`, which the caller reads
// back (the scatter's tables are built, and checked, on the host). bf16 storage, fp32
// arithmetic.
#include "prelude.cuh"

#define EW_MAX_WARPS 32

// ---- casts and axpby: grid-stride, any grid ----------------------------------------------
MMKD_KERNEL void cast_f32_bf16(const float* __restrict__ x,  // (n)
                               mmkd_bf16* __restrict__ y,    // (n) out
                               int n) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x)
        y[e] = f32_to_bf16(x[e]);
}
MMKD_EXPORT(cast_f32_bf16)

MMKD_KERNEL void cast_bf16_f32(const mmkd_bf16* __restrict__ x,  // (n)
                               float* __restrict__ y,            // (n) out
                               int n) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x)
        y[e] = bf16_to_f32(x[e]);
}
MMKD_EXPORT(cast_bf16_f32)

MMKD_KERNEL void axpby_f32(const float* __restrict__ x,  // (n)
                           float* __restrict__ y,        // (n) in/out
                           float a, float b, int n) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x) {
        // b = 0 must not read y: it may hold garbage (NaN) on the first write; a = 0 likewise x.
        const float ax = a == 0.0f ? 0.0f : a * x[e];
        y[e] = b == 0.0f ? ax : ax + b * y[e];
    }
}
MMKD_EXPORT(axpby_f32)

MMKD_KERNEL void axpby_bf16(const mmkd_bf16* __restrict__ x,  // (n)
                            mmkd_bf16* __restrict__ y,        // (n) in/out
                            float a, float b, int n) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x) {
        const float ax = a == 0.0f ? 0.0f : a * bf16_to_f32(x[e]);
        y[e] = f32_to_bf16(b == 0.0f ? ax : ax + b * bf16_to_f32(y[e]));
    }
}
MMKD_EXPORT(axpby_bf16)

// ---- embeddings: grid (N), block (any) ------------------------------------------------------
MMKD_KERNEL void embedding_gather(const mmkd_bf16* __restrict__ table,  // (V, C)
                                  const int* __restrict__ idx,          // (N)
                                  mmkd_bf16* __restrict__ out,          // (N, C) out
                                  int* __restrict__ bad,                // (1) in/out
                                  int V, int C) {
    const long n = blockIdx.x;
    const int r = idx[n];
    const bool ok = r >= 0 && r < V;
    if (!ok && threadIdx.x == 0) atomicAdd(bad, 1);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        out[n * C + c] = ok ? table[(long)r * C + c] : (mmkd_bf16)0;
}
MMKD_EXPORT(embedding_gather)

// Rows share a table row (repeated tokens, every caption's position 0, the one token type), so
// their sums are gathered by segment instead of added with float atomics, whose order, and so
// whose rounding, would change from run to run. The host sorts the row indices by table row:
// segment s adds the rows order[starts[s] .. starts[s + 1]) into row targets[s] (−1: an unused
// segment). Block (s, y) owns 64 columns of one segment, so no two blocks write the same
// element; its 8 warps take every 8th row and their partial sums are added in warp order.
// Grid (S, ceil(C / 64)), block 256.
#define SCATTER_WARPS 8
#define SCATTER_COLS 64
MMKD_KERNEL void embedding_scatter_add(const mmkd_bf16* __restrict__ dout,  // (N, C)
                                       const int* __restrict__ order,       // (N)
                                       const int* __restrict__ starts,      // (S + 1)
                                       const int* __restrict__ targets,     // (S)
                                       float* __restrict__ dtable,          // (V, C) in/out
                                       int C) {
    __shared__ float part[SCATTER_WARPS][SCATTER_COLS];
    const int s = blockIdx.x;
    const int v = targets[s];
    if (v < 0) return;  // the whole block: an unused segment
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.y * SCATTER_COLS + 2 * lane;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int j = starts[s] + warp; j < starts[s + 1]; j += SCATTER_WARPS) {
        const long row = order[j];
        if (c < C) acc0 += bf16_to_f32(dout[row * C + c]);
        if (c + 1 < C) acc1 += bf16_to_f32(dout[row * C + c + 1]);
    }
    part[warp][2 * lane] = acc0;
    part[warp][2 * lane + 1] = acc1;
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (c + e >= C) continue;
            float t = dtable[(long)v * C + c + e];
#pragma unroll
            for (int w = 0; w < SCATTER_WARPS; ++w) t += part[w][2 * lane + e];
            dtable[(long)v * C + c + e] = t;
        }
    }
}
MMKD_EXPORT(embedding_scatter_add)

// ---- activations: grid-stride --------------------------------------------------------------
// kind 0: GELU (erf form), 1: QuickGELU: the prelude's mmkd_act kinds 1 and 2, which the GEMM
// epilogue applies too, so a fused and a separate activation agree bit for bit.
MMKD_KERNEL void act_fwd(const mmkd_bf16* __restrict__ x,  // (n)
                         mmkd_bf16* __restrict__ y,        // (n) out
                         int n, int kind) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x)
        y[e] = f32_to_bf16(mmkd_act(bf16_to_f32(x[e]), kind + 1));
}
MMKD_EXPORT(act_fwd)

MMKD_KERNEL void act_bwd(const mmkd_bf16* __restrict__ x,   // (n)
                         const mmkd_bf16* __restrict__ dy,  // (n)
                         mmkd_bf16* __restrict__ dx,        // (n) out
                         int n, int kind) {
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long)gridDim.x * blockDim.x)
        dx[e] = f32_to_bf16(mmkd_act_grad(bf16_to_f32(x[e]), kind + 1) * bf16_to_f32(dy[e]));
}
MMKD_EXPORT(act_bwd)

// ---- row softmax: grid (R), block (multiple of 32, ≤ 1024) ---------------------------------
MMKD_DEVICE float ew_block_reduce(float v, bool is_max, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? max(v, u) : v + u;
    }
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : (is_max ? __uint_as_float(0xff800000u) : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, t, o);
        t = is_max ? max(t, u) : t + u;
    }
    __syncthreads();
    return t;
}

MMKD_KERNEL void softmax_rows(const mmkd_bf16* __restrict__ x,  // (R, C)
                              mmkd_bf16* __restrict__ y,        // (R, C) out
                              int C, float scale) {
    __shared__ float scratch[EW_MAX_WARPS];
    const long r = blockIdx.x;
    const mmkd_bf16* xr = x + r * C;
    float m = __uint_as_float(0xff800000u);
    for (int c = threadIdx.x; c < C; c += blockDim.x) m = max(m, scale * bf16_to_f32(xr[c]));
    m = ew_block_reduce(m, true, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += expf(scale * bf16_to_f32(xr[c]) - m);
    const float inv = 1.0f / ew_block_reduce(s, false, scratch);
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        y[r * C + c] = f32_to_bf16(expf(scale * bf16_to_f32(xr[c]) - m) * inv);
}
MMKD_EXPORT(softmax_rows)
