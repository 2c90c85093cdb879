// image_norm.cu: u8 image crops → normalised bf16, with an optional per-sample horizontal flip.
//
//   dst[b, c, y, x] = (src[b, c, y, x'] / 255 − mean_c) / std_c,   x' = flip[b] ? W − 1 − x : x
// computed as src · scale_c + bias_c with scale_c = 1 / (255 std_c), bias_c = −mean_c / std_c
// (the launcher passes those). Layout (B, 3, H, W) on both sides; one thread per output element,
// grid-stride, so consecutive threads write consecutive bf16 values.
//
// Defines: image_normalize.
#include "prelude.cuh"

// grid (G), block (256)
MMKD_KERNEL void image_normalize(const unsigned char* __restrict__ src,   // (B, 3, H, W)
                                 const unsigned char* __restrict__ flip,  // (B) or null
                                 mmkd_bf16* __restrict__ dst,             // (B, 3, H, W) out
                                 float scale0, float scale1, float scale2, float bias0,
                                 float bias1, float bias2, int B, int H, int W) {
    const long total = (long)B * 3 * H * W;
    for (long o = (long)blockIdx.x * blockDim.x + threadIdx.x; o < total;
         o += (long)gridDim.x * blockDim.x) {
        const int x = (int)(o % W);
        const long plane = o / ((long)H * W);  // b * 3 + c
        const int c = (int)(plane % 3);
        const long b = plane / 3;
        const int xs = (flip != nullptr && flip[b] != 0) ? W - 1 - x : x;
        const float v = (float)src[o - x + xs];
        const float s = c == 0 ? scale0 : (c == 1 ? scale1 : scale2);
        const float t = c == 0 ? bias0 : (c == 1 ? bias1 : bias2);
        dst[o] = f32_to_bf16(v * s + t);
    }
}
MMKD_EXPORT(image_normalize)
