// elementwise.cu: the small kernels the engine needs around the big ones.
//
//   cast_f32_bf16 / cast_bf16_f32   y = x in the other precision (round to nearest even)
//   axpby_f32 / axpby_bf16          y = a·x + b·y (fp32 arithmetic); a = 0 reads no x and
//                                   b = 0 no y, so a = b = 0 clears y whatever it holds
//   embedding_gather                out[n, :] = table[idx[n], :]
//   embedding_scatter_add           dtable[idx[n], :] += dout[n, :]  (fp32 atomics: rows repeat)
//   act_fwd / act_bwd               kind 0: GELU (erf form, BERT), kind 1: QuickGELU x·σ(1.702x)
//   softmax_rows                    y = softmax(scale · x) per row, fp32 statistics
// Out-of-range embedding indices write zeros (gather) or nothing (scatter) and are counted in
// `bad[0]`, which the caller reads back. bf16 storage, fp32 arithmetic.
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

MMKD_KERNEL void embedding_scatter_add(const mmkd_bf16* __restrict__ dout,  // (N, C)
                                       const int* __restrict__ idx,         // (N)
                                       float* __restrict__ dtable,          // (V, C) in/out
                                       int* __restrict__ bad,               // (1) in/out
                                       int V, int C) {
    const long n = blockIdx.x;
    const int r = idx[n];
    if (r < 0 || r >= V) {
        if (threadIdx.x == 0) atomicAdd(bad, 1);
        return;
    }
    // Several n may share a row r, and their blocks run concurrently: atomics.
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        atomicAdd(&dtable[(long)r * C + c], bf16_to_f32(dout[n * C + c]));
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
