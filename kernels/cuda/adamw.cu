// adamw.cu: AdamW over every parameter in one launch, and the global gradient norm for clipping.
//
// Gradient norm (two passes, deterministic): grad_sumsq writes one partial Σ g² per block
// (grid-stride over P); grad_norm_finish sums the partials in a fixed order and writes
//   out[0] = ‖g‖,  out[1] = clip coefficient = min(1, max_norm / (‖g‖ + 1e-6))  (1 when max_norm ≤ 0).
// AdamW (PyTorch's formulation), with g = clip · grad and bias corrections bc1 = 1 − β1^t,
// bc2 = 1 − β2^t computed by the caller:
//   p ← p − lr · wd · p            (only where decay[i] ≠ 0; decay null: everywhere)
//   m ← β1 m + (1 − β1) g,  v ← β2 v + (1 − β2) g²
//   p ← p − lr · (m / bc1) / (sqrt(v / bc2) + eps)
// Master weights, moments and gradients are fp32; a bf16 copy of the new weights is written
// for the forward pass when `p_bf16` is not null. The clip coefficient is read on the device
// (no host round trip between the norm and the step).
//
// Defines: grad_sumsq, grad_norm_finish, adamw_step.
#include "prelude.cuh"

#define AW_THREADS 256

MMKD_DEVICE float aw_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

MMKD_DEVICE float aw_block_sum(float v) {
    __shared__ float scratch[AW_THREADS / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = aw_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < AW_THREADS / 32 ? scratch[lane] : 0.0f;
    t = aw_warp_sum(t);
    __syncthreads();
    return t;
}

// grid (G), block AW_THREADS
MMKD_KERNEL void grad_sumsq(const float* __restrict__ g,  // (P)
                            float* __restrict__ part,     // (G) out
                            int P) {
    float s = 0.0f;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < P;
         e += (long)gridDim.x * blockDim.x) {
        const float v = g[e];
        s += v * v;
    }
    s = aw_block_sum(s);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
MMKD_EXPORT(grad_sumsq)

// grid (1), block AW_THREADS
MMKD_KERNEL void grad_norm_finish(const float* __restrict__ part,  // (G)
                                  float* __restrict__ out,         // (2) out: norm, clip
                                  int G, float max_norm) {
    float s = 0.0f;
    for (int b = threadIdx.x; b < G; b += blockDim.x) s += part[b];
    s = aw_block_sum(s);
    if (threadIdx.x == 0) {
        const float nrm = sqrtf(s);
        out[0] = nrm;
        out[1] = max_norm > 0.0f ? min(1.0f, max_norm / (nrm + 1e-6f)) : 1.0f;
    }
}
MMKD_EXPORT(grad_norm_finish)

// grid (ceil(P / AW_THREADS) capped; grid-stride), block AW_THREADS
MMKD_KERNEL void adamw_step(float* __restrict__ p,                    // (P) in/out
                            const float* __restrict__ g,              // (P)
                            float* __restrict__ m,                    // (P) in/out
                            float* __restrict__ v,                    // (P) in/out
                            mmkd_bf16* __restrict__ p_bf16,           // (P) out, or null
                            const unsigned char* __restrict__ decay,  // (P) or null
                            const float* __restrict__ norm,           // (2) or null: [1] = clip
                            int P, float lr, float beta1, float beta2, float eps, float wd,
                            float bc1, float bc2) {
    const float clip = norm != nullptr ? norm[1] : 1.0f;
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < P;
         e += (long)gridDim.x * blockDim.x) {
        const float gr = clip * g[e];
        float w = p[e];
        if (decay == nullptr || decay[e] != 0) w -= lr * wd * w;
        const float mm = beta1 * m[e] + (1.0f - beta1) * gr;
        const float vv = beta2 * v[e] + (1.0f - beta2) * gr * gr;
        w -= lr * (mm / bc1) / (sqrtf(vv / bc2) + eps);
        m[e] = mm;
        v[e] = vv;
        p[e] = w;
        if (p_bf16 != nullptr) p_bf16[e] = f32_to_bf16(w);
    }
}
MMKD_EXPORT(adamw_step)
