// emu_test.cu: small kernels that pin down the emulation's warp and memory semantics (shuffles,
// votes, exited threads at barriers, deferred cp.async). They also compile under NVRTC, so the
// same checks can run on a GPU.
//
// Defines: emu_warp_ops, emu_exit_before_barrier, emu_shfl_after_exit, emu_cp_async_order,
// emu_copy_n, emu_smem_n, emu_local_n.
#include "prelude.cuh"

// block (64): two warps. out (64, 10) ints.
MMKD_KERNEL void emu_warp_ops(int* __restrict__ out) {
    const int t = threadIdx.x, lane = t % 32;
    const unsigned full = 0xffffffffu;
    int* o = out + t * 10;
    o[0] = __shfl_sync(full, t, (lane * 7) % 32);
    o[1] = __shfl_xor_sync(full, t, 5);
    o[2] = __shfl_down_sync(full, t, 3);
    o[3] = __shfl_up_sync(full, t, 2);
    o[4] = __shfl_sync(full, t, 1, 8);       // lane 1 of each group of 8
    o[5] = __shfl_xor_sync(full, t, 4, 4);   // source outside the width-4 group: own value
    o[6] = (int)__ballot_sync(full, lane % 3 == 0);
    o[7] = __any_sync(full, t == 40);
    o[8] = __all_sync(full, t < 40);
    o[9] = __float_as_uint(__shfl_xor_sync(full, 0.5f * t, 1)) == __float_as_uint(0.5f * (t ^ 1));
}
MMKD_EXPORT(emu_warp_ops)

// block (64): thread 0 exits before the barrier; the others must still pass it.
MMKD_KERNEL void emu_exit_before_barrier(int* __restrict__ out) {
    __shared__ int seen[64];
    const int t = threadIdx.x;
    if (t == 0) return;
    seen[t] = t;
    __syncthreads();
    out[t] = seen[(t % 63) + 1];
}
MMKD_EXPORT(emu_exit_before_barrier)

// block (32): lane 5 exits, the rest shuffle with the full mask: undefined on a GPU, reported as
// a deadlock by the emulation. Not for GPU runs.
MMKD_KERNEL void emu_shfl_after_exit(int* __restrict__ out) {
    const int t = threadIdx.x;
    if (t == 5) return;
    out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
}
MMKD_EXPORT(emu_shfl_after_exit)

// block (32), dynamic shared memory 128 bytes. out (3, 32): the destination read before the
// wait (stale), after waiting for all but the newest group, and after waiting for all.
MMKD_KERNEL void emu_cp_async_order(const float* __restrict__ src,  // (2, 32)
                                    float* __restrict__ out) {      // (3, 32)
    MMKD_DYNAMIC_SMEM(float, buf);  // (2, 32)
    const int t = threadIdx.x;
    cp_async_4(buf + t, src + t);
    cp_async_commit();
    cp_async_4(buf + 32 + t, src + 32 + t);
    cp_async_commit();
    out[t] = buf[t];  // may be stale: nothing waited yet
    cp_async_wait<1>();
    out[32 + t] = buf[t];
    cp_async_wait_all();
    out[64 + t] = buf[32 + t];
}
MMKD_EXPORT(emu_cp_async_order)

// One block. y[i] = x[i] for i < n: correct for any n the buffers hold. The sanitizer's test
// (MMKD_EMU_SANITIZE=address) launches it with n one past the end of x, which must fail.
MMKD_KERNEL void emu_copy_n(const float* __restrict__ x,  // (n)
                            float* __restrict__ y,        // (n)
                            int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i];
}
MMKD_EXPORT(emu_copy_n)

// One block, dynamic shared memory of at least n floats: out[i] = i through shared memory. The
// sanitizer's test launches it with one float too little shared memory, which must fail.
MMKD_KERNEL void emu_smem_n(float* __restrict__ out,  // (n)
                            int n) {
    MMKD_DYNAMIC_SMEM(float, buf);  // (n)
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = buf[i];
}
MMKD_EXPORT(emu_smem_n)

// One block: out[t] = loc[i] of a local array of 8, read after a barrier (so each thread has
// been suspended and resumed in between). The sanitizer's test reads loc[8], which must fail.
MMKD_KERNEL void emu_local_n(float* __restrict__ out,  // (blockDim.x)
                             int i) {
    volatile float loc[8];
    for (int k = 0; k < 8; ++k) loc[k] = (float)(k + threadIdx.x);
    __syncthreads();
    out[threadIdx.x] = loc[i];
}
MMKD_EXPORT(emu_local_n)
