// attention.cu: fused scaled-dot-product attention, forward and backward, head dim 64, in the
// FlashAttention-2 manner (bf16 operands on the tensor cores, fp32 accumulation).
//
// Per (batch·head) bh and query row i, over the keys j that are valid for i:
//   valid(i, j) = j < kvlen[b] (key padding; kvlen = L when seqlens is null) and, if causal,
//   j ≤ i
//   s_ij = scale · q_i · k_j,  p_ij = exp(s_ij − lse_i),  lse_i = log Σ_j exp(s_ij)
//   o_i = Σ_j p_ij v_j
// A row with no valid key (len[b] = 0) has o_i = 0 and lse_i = −inf, and its gradients are 0.
// Backward, with D_i = Σ_d do_id · o_id:
//   dp_ij = do_i · v_j,  ds_ij = p_ij (dp_ij − D_i)
//   dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij do_i
//
// Layout: token-major, the layout the projections write. q, k, v, o, do, dq, dk, dv are rows
// of bf16, the row of token i of sequence b at (row0[b] + i)·pitch, head h in columns
// h·64 .. h·64 + 64 of it; q, k, v, dq, dk, dv share one pitch (`ldqkv`), o and do another
// (`ldo`). So q, k and v can be column views of one (rows, 3·H·64) projection (pitch 3·H·64)
// and o is the (rows, H·64) input of the output projection: no head transposes. lse and D are
// token-major too: (rows, H) fp32, head h of row r at r·H + h.
// Where the sequences lie (`varlen`):
//   0 (padded): B·L rows, row0[b] = b·L, every sequence has L query rows; seqlens (B) int
//     holds kvlen[b], or is null (kvlen = L).
//   1 (packed, variable length): the sequences lie back to back, seqlens (3·B) int holds
//     kvlen[b], then row0[b], then qlen[b], the sequence's rows (kvlen ≤ qlen ≤ L: rows past
//     kvlen are queries only, e.g. filler rows that round a packed batch up to a tile). Rows
//     of no sequence are neither read nor written; L only bounds the lengths and the grid.
// A sequence's query rows i < qlen are computed and stored, its keys j < kvlen are read.
// Base pointers and pitches must be 16-byte multiples.
//
// Kernels (all: block 128 = 4 warps, each warp owns 16 rows of a 64-row tile; the other
// operand's 64-row tiles stream through shared memory, double-buffered by cp.async):
//   attn_fwd        grid (ceil(L/64), BH): a query tile in registers; online softmax over key
//                   tiles; stores o and lse.
//   attn_bwd_dq     grid (ceil(L/64), BH): a query tile (q and do) in registers; computes
//                   D = rowsum(do ∘ o) of its rows and stores it; recomputes p per key tile;
//                   accumulates dq. Runs first: attn_bwd_dkdv reads its D.
//   attn_bwd_dkdv   grid (ceil(L/64), BH): a key tile (k and v) in registers; recomputes pᵀ
//                   per query tile from lse; accumulates dk and dv.
// dq is computed by its own kernel instead of by float atomics from attn_bwd_dkdv: two more
// small products per tile pair, in exchange for a deterministic result.
// Masked blocks are skipped at 16-row granularity: a warp whose own 16 rows all lie past the
// sequence does no products, and the others stop at the last block of 16 keys (or queries)
// holding a valid one (attn_blocks); the exponentials of the skipped blocks are skipped too.
// Only masked zeros are left out, so results are the same bit for bit; at L = 197 the
// products and exponentials shrink from 256² to 208² per head.
// With packed sequences a tile past its sequence's query rows returns at once (the grid
// covers the longest).
// Dynamic shared memory: ATTN_SMEM_BYTES (attn_fwd), ATTN_DQ_SMEM_BYTES, ATTN_DKDV_SMEM_BYTES.
//
// Test-only variants: MMKD_ATTN_BROKEN_RESCALE drops the online-softmax rescale of the running
// output when the row maximum grows (right for a single key tile, wrong beyond it);
// MMKD_ATTN_NO_REFILL_BARRIER drops attn_fwd's barrier before a key/value buffer is refilled.
// mmkd-emu-variant: broken_rescale MMKD_ATTN_BROKEN_RESCALE
// mmkd-emu-variant: no_refill_barrier MMKD_ATTN_NO_REFILL_BARRIER
#include "prelude.cuh"

#define ATTN_D 64
#define ATTN_TILE 64
#define ATTN_THREADS 128
#define ATTN_PITCH (ATTN_D + 8)  // padded row: ldmatrix row reads hit distinct banks
#define ATTN_TILE_ELEMS (ATTN_TILE * ATTN_PITCH)
// attn_fwd: the q tile + two buffers of (k, v) tiles.
#define ATTN_SMEM_BYTES (5 * ATTN_TILE_ELEMS * 2)
// attn_bwd_dq: two buffers of (k, v) tiles.
#define ATTN_DQ_SMEM_BYTES (4 * ATTN_TILE_ELEMS * 2)
// attn_bwd_dkdv: two buffers of (q, do) tiles, then lse and D of each buffer.
#define ATTN_DKDV_SMEM_BYTES (4 * ATTN_TILE_ELEMS * 2 + 4 * ATTN_TILE * 4)

MMKD_DEVICE float attn_neg_inf() { return __uint_as_float(0xff800000u); }

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f

// Where sequence b lies: its first row, its query rows and its valid keys (see `varlen`
// above), each length clamped to [0, L] and the keys to the queries.
struct AttnSeq {
    long row0;
    int qlen, kvlen;
};
MMKD_DEVICE int attn_clamp(int n, int hi) { return n < 0 ? 0 : (n > hi ? hi : n); }
MMKD_DEVICE AttnSeq attn_seq(const int* __restrict__ seqlens, int b, int B, int L, int varlen) {
    AttnSeq s;
    if (varlen) {
        s.qlen = attn_clamp(seqlens[2 * B + b], L);
        s.kvlen = attn_clamp(seqlens[b], s.qlen);
        s.row0 = seqlens[B + b];
    } else {
        s.qlen = L;
        s.kvlen = seqlens == nullptr ? L : attn_clamp(seqlens[b], L);
        s.row0 = (long)b * L;
    }
    return s;
}

// Offset of head h of a sequence's first row in a token-major tensor of pitch `ld`.
MMKD_DEVICE long attn_head_base(const AttnSeq& s, int h, int ld) {
    return s.row0 * ld + (long)h * ATTN_D;
}

// Copies rows [r0, r0 + 64) of a head's (rows, 64) matrix, rows `ld` elements apart, into a
// padded shared tile; rows from `end` on are zeros. Each thread copies four 16-byte chunks.
// Keys and values stop at the sequence's key length, not at its rows: a masked key's probability is
// exactly 0, but 0 · NaN is NaN, so whatever the padded rows hold must never be read.
MMKD_DEVICE void attn_load_tile(mmkd_bf16* s, const mmkd_bf16* __restrict__ g, int r0, int end,
                                int ld) {
#pragma unroll
    for (int it = 0; it < ATTN_TILE * ATTN_D / 8 / ATTN_THREADS; ++it) {
        const int i = it * ATTN_THREADS + threadIdx.x;
        const int r = i / 8, c = (i % 8) * 8;
        mmkd_bf16* d = s + r * ATTN_PITCH + c;
        if (r0 + r < end) {
            cp_async_16(d, g + (long)(r0 + r) * ld + c);
        } else {
            mmkd_u32x4 zero = {0u, 0u, 0u, 0u};
            store_u32x4(d, zero);
        }
    }
}

// A operand (16 rows × 64) of this warp from a shared tile: four k16 fragments.
MMKD_DEVICE void attn_load_a(unsigned f[4][4], const mmkd_bf16* s, int row0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        ldmatrix_x4(f[kk], s + (row0 + lane % 16) * ATTN_PITCH + kk * 16 + (lane / 16) * 8);
}

// acc (16 × 64) += a (16 × 64) · tileᵀ, the shared tile stored (n = 64 rows, k = 64): the
// B operand is "column-major" already, no transpose. Only the first `nb` blocks of 16 tile rows
// (columns of acc) are multiplied: the caller masks the rest, whose rows hold no valid key or
// query, so skipping them changes no result.
MMKD_DEVICE void attn_mma_nt(float acc[8][4], const unsigned a[4][4], const mmkd_bf16* s,
                             int nb) {
    const int lane = threadIdx.x % 32, lr = lane % 8, li = lane / 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
            if (nj >= nb) break;
            unsigned t[4];
            ldmatrix_x4(t, s + (nj * 16 + lr + (li / 2) * 8) * ATTN_PITCH + kk * 16 + (li % 2) * 8);
            const unsigned b0[2] = {t[0], t[1]}, b1[2] = {t[2], t[3]};
            mma_m16n8k16_bf16(acc[2 * nj], a[kk], b0, acc[2 * nj]);
            mma_m16n8k16_bf16(acc[2 * nj + 1], a[kk], b1, acc[2 * nj + 1]);
        }
}

// acc (16 × 64) += a (16 × 64, k over the tile's rows) · tile, the tile stored (k = 64 rows,
// n = 64): the B operand is loaded transposed. Only the first `nb` blocks of 16 tile rows (k)
// are summed: a's columns past them are zeros (masked probabilities), so skipping them changes
// no result.
MMKD_DEVICE void attn_mma_nn(float acc[8][4], const unsigned a[4][4], const mmkd_bf16* s,
                             int nb) {
    const int lane = threadIdx.x % 32, lr = lane % 8, li = lane / 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        if (kk >= nb) break;
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
            unsigned t[4];
            ldmatrix_x4_trans(t, s + (kk * 16 + lr + (li % 2) * 8) * ATTN_PITCH + nj * 16 +
                                     (li / 2) * 8);
            const unsigned b0[2] = {t[0], t[1]}, b1[2] = {t[2], t[3]};
            mma_m16n8k16_bf16(acc[2 * nj], a[kk], b0, acc[2 * nj]);
            mma_m16n8k16_bf16(acc[2 * nj + 1], a[kk], b1, acc[2 * nj + 1]);
        }
    }
}

// The accumulator layout of a 16 × 64 product, rounded to bf16, is the A-operand layout of the
// next product with k over those 64 columns.
MMKD_DEVICE void attn_acc_to_a(unsigned a[4][4], const float p[8][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        a[kk][0] = pack_bf16x2(f32_to_bf16(p[2 * kk][0]), f32_to_bf16(p[2 * kk][1]));
        a[kk][1] = pack_bf16x2(f32_to_bf16(p[2 * kk][2]), f32_to_bf16(p[2 * kk][3]));
        a[kk][2] = pack_bf16x2(f32_to_bf16(p[2 * kk + 1][0]), f32_to_bf16(p[2 * kk + 1][1]));
        a[kk][3] = pack_bf16x2(f32_to_bf16(p[2 * kk + 1][2]), f32_to_bf16(p[2 * kk + 1][3]));
    }
}

MMKD_DEVICE void attn_zero(float acc[8][4]) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
}

// Stores a warp's 16 × 64 accumulator (times `mul`) as bf16 rows row0.. of a head's (rows, 64)
// matrix, rows `ld` elements apart, up to row `end`.
MMKD_DEVICE void attn_store_rows(mmkd_bf16* __restrict__ g, const float acc[8][4], int row0,
                                 int end, int ld, float mul0, float mul1) {
    const int lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + gq + h * 8;
        if (row >= end) continue;
        const float mul = h ? mul1 : mul0;
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
            const int col = ni * 8 + 2 * t;
            *reinterpret_cast<unsigned*>(g + (long)row * ld + col) =
                pack_bf16x2(f32_to_bf16(acc[ni][2 * h] * mul), f32_to_bf16(acc[ni][2 * h + 1] * mul));
        }
    }
}

// Blocks of 16 rows of the 64-row tile starting at r0 that hold rows below `end` (0 .. 4): the
// products skip the others, whose rows are all masked (L = 197 leaves 5 rows in the last tile,
// one block instead of four).
MMKD_DEVICE int attn_blocks(int end, int r0) {
    const int n = (end - r0 + 15) / 16;
    return n < 0 ? 0 : (n > 4 ? 4 : n);
}

// Number of 64-key tiles query tile q0 needs.
MMKD_DEVICE int attn_key_tiles(int kvlen, int q0, int causal) {
    int end = kvlen;
    if (causal && q0 + ATTN_TILE < end) end = q0 + ATTN_TILE;
    return (end + ATTN_TILE - 1) / ATTN_TILE;
}

MMKD_KERNEL void attn_fwd(const mmkd_bf16* __restrict__ q,  // (rows, ldqkv)
                          const mmkd_bf16* __restrict__ k,  // (rows, ldqkv)
                          const mmkd_bf16* __restrict__ v,  // (rows, ldqkv)
                          const int* __restrict__ seqlens,  // (B), (3·B) or null: see varlen
                          mmkd_bf16* __restrict__ o,        // (rows, ldo) out
                          float* __restrict__ lse,          // (rows, H) out
                          int H, int L, int ldqkv, int ldo, float scale, int causal,
                          int varlen) {
    MMKD_DYNAMIC_SMEM(mmkd_bf16, smem);
    mmkd_bf16* Qs = smem;                        // (64, PITCH)
    mmkd_bf16* KVs = smem + ATTN_TILE_ELEMS;     // (2 buffers, k then v, 64, PITCH)
    const int bh = blockIdx.y, q0 = blockIdx.x * ATTN_TILE, hh = bh % H;
    const AttnSeq sq = attn_seq(seqlens, bh / H, gridDim.y / H, L, varlen);
    if (q0 >= sq.qlen) return;  // a tile past a packed sequence's rows: nothing to store
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const long base = attn_head_base(sq, hh, ldqkv);
    const int kvlen = sq.kvlen, qlen = sq.qlen;
    const int ntiles = attn_key_tiles(kvlen, q0, causal);
    const float sl2 = scale * ATTN_LOG2E;  // scores in log2 units: exp2 is the cheap exponential

    attn_load_tile(Qs, q + base, q0, qlen, ldqkv);
    if (ntiles > 0) {
        attn_load_tile(KVs, k + base, 0, kvlen, ldqkv);
        attn_load_tile(KVs + ATTN_TILE_ELEMS, v + base, 0, kvlen, ldqkv);
    }
    cp_async_commit();

    unsigned qf[4][4];
    float oacc[8][4];
    attn_zero(oacc);
    float mrow[2] = {attn_neg_inf(), attn_neg_inf()}, lrow[2] = {0.0f, 0.0f};
    const int row0 = q0 + warp * 16 + gq;  // this thread's rows: row0, row0 + 8
    // The keys this warp's rows can see end at kend; a warp whose rows all lie past the
    // sequence's queries does no products (its rows are never stored).
    int kend = causal && q0 + warp * 16 + 16 < kvlen ? q0 + warp * 16 + 16 : kvlen;
    if (q0 + warp * 16 >= qlen) kend = 0;

    for (int j = 0; j < ntiles; ++j) {
        mmkd_bf16* ks = KVs + (j % 2) * 2 * ATTN_TILE_ELEMS;
        mmkd_bf16* vs = ks + ATTN_TILE_ELEMS;
        if (j + 1 < ntiles) {
            // Buffer (j + 1) % 2 was last read in iteration j − 1, before its closing barrier.
            mmkd_bf16* kn = KVs + ((j + 1) % 2) * 2 * ATTN_TILE_ELEMS;
            attn_load_tile(kn, k + base, (j + 1) * ATTN_TILE, kvlen, ldqkv);
            attn_load_tile(kn + ATTN_TILE_ELEMS, v + base, (j + 1) * ATTN_TILE, kvlen, ldqkv);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (j == 0) attn_load_a(qf, Qs, warp * 16);

        const int nb = attn_blocks(kend, j * ATTN_TILE);
        float sacc[8][4];
        attn_zero(sacc);
        attn_mma_nt(sacc, qf, ks, nb);
        // The key blocks past nb are all masked: they are left out of the maximum, the
        // exponentials and the sums (each would add −inf to a max, 0 to a sum), and the
        // product with v does not read them.
        float mx[2] = {attn_neg_inf(), attn_neg_inf()};
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
            if (ni >= 2 * nb) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * ATTN_TILE + ni * 8 + 2 * t + (e & 1);
                const int row = row0 + (e >> 1) * 8;
                const bool ok = key < kvlen && (!causal || key <= row);
                sacc[ni][e] = ok ? sacc[ni][e] * sl2 : attn_neg_inf();
                mx[e >> 1] = fmaxf(mx[e >> 1], sacc[ni][e]);
            }
        }
        float alpha[2], mbase[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // The four threads of a quad hold one row.
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float mnew = fmaxf(mrow[h], mx[h]);
            // While a row has seen no valid key its maximum is −inf; exponentiate against 0
            // then, so that exp2(−inf − (−inf)) never makes a NaN.
            mbase[h] = mnew == attn_neg_inf() ? 0.0f : mnew;
            alpha[h] = exp2f(mrow[h] - mbase[h]);
            mrow[h] = mnew;
        }
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
            if (ni >= 2 * nb) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) sacc[ni][e] = exp2f(sacc[ni][e] - mbase[e >> 1]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float rs = 0.0f;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                if (ni >= 2 * nb) break;
                rs += sacc[ni][2 * h] + sacc[ni][2 * h + 1];
            }
            lrow[h] = lrow[h] * alpha[h] + rs;  // this thread's columns; the quad sums at the end
#ifndef MMKD_ATTN_BROKEN_RESCALE
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                oacc[ni][2 * h] *= alpha[h];
                oacc[ni][2 * h + 1] *= alpha[h];
            }
#endif
        }
        unsigned pf[4][4];
        attn_acc_to_a(pf, sacc);
        attn_mma_nn(oacc, pf, vs, nb);
#ifndef MMKD_ATTN_NO_REFILL_BARRIER
        __syncthreads();  // the next iteration's prefetch overwrites this buffer's partner
#endif
    }
    cp_async_wait_all();  // the q tile is in flight when there is no key tile

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
        inv[h] = lrow[h] > 0.0f ? 1.0f / lrow[h] : 0.0f;
        const int row = row0 + h * 8;
        if (t == 0 && row < qlen)
            lse[(sq.row0 + row) * H + hh] =
                lrow[h] > 0.0f ? (mrow[h] + log2f(lrow[h])) * ATTN_LN2 : attn_neg_inf();
    }
    attn_store_rows(o + attn_head_base(sq, hh, ldo), oacc, q0 + warp * 16, qlen, ldo, inv[0], inv[1]);
}
MMKD_EXPORT(attn_fwd)

MMKD_KERNEL void attn_bwd_dkdv(const mmkd_bf16* __restrict__ q,   // (rows, ldqkv)
                               const mmkd_bf16* __restrict__ k,   // (rows, ldqkv)
                               const mmkd_bf16* __restrict__ v,   // (rows, ldqkv)
                               const mmkd_bf16* __restrict__ dO,  // (rows, ldo)
                               const float* __restrict__ lse,     // (rows, H)
                               const float* __restrict__ D,       // (rows, H)
                               const int* __restrict__ seqlens,   // (B), (3·B) or null
                               mmkd_bf16* __restrict__ dk,        // (rows, ldqkv) out
                               mmkd_bf16* __restrict__ dv,        // (rows, ldqkv) out
                               int H, int L, int ldqkv, int ldo, float scale, int causal,
                               int varlen) {
    MMKD_DYNAMIC_SMEM(mmkd_bf16, smem);
    mmkd_bf16* QD = smem;  // (2 buffers, q then do, 64, PITCH)
    float* stats = reinterpret_cast<float*>(smem + 4 * ATTN_TILE_ELEMS);  // (2, lse·log2e | D, 64)
    const int bh = blockIdx.y, k0 = blockIdx.x * ATTN_TILE, hh = bh % H;
    const AttnSeq sq = attn_seq(seqlens, bh / H, gridDim.y / H, L, varlen);
    // Rows kvlen .. qlen of the sequence are not keys: their dk and dv are stored as zeros.
    if (k0 >= sq.qlen) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const long base = attn_head_base(sq, hh, ldqkv), obase = attn_head_base(sq, hh, ldo);
    const int kvlen = sq.kvlen, qlen = sq.qlen;
    const float* lse_h = lse + sq.row0 * H + hh;  // row r's statistics at r·H
    const float* D_h = D + sq.row0 * H + hh;
    const float sl2 = scale * ATTN_LOG2E;
    const int krow = k0 + warp * 16 + gq;  // this thread's keys: krow, krow + 8
    const bool keys = k0 + warp * 16 < kvlen;  // this warp has a valid key: else no products

    float dkacc[8][4], dvacc[8][4];
    attn_zero(dkacc);
    attn_zero(dvacc);
    // Query tiles that can see a key of this tile: all of them, or from the diagonal on.
    const int qt0 = causal ? k0 / ATTN_TILE : 0;
    const int qt1 = k0 < kvlen ? (qlen + ATTN_TILE - 1) / ATTN_TILE : qt0;  // none: all masked
    if (qt0 < qt1) {
        // k and v go through the first buffer into registers, then the buffers stream q, do.
        attn_load_tile(QD, k + base, k0, kvlen, ldqkv);
        attn_load_tile(QD + ATTN_TILE_ELEMS, v + base, k0, kvlen, ldqkv);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        unsigned kf[4][4], vf[4][4];
        attn_load_a(kf, QD, warp * 16);
        attn_load_a(vf, QD + ATTN_TILE_ELEMS, warp * 16);
        __syncthreads();

        for (int i = qt0; i < qt1; ++i) {
            const int bi = (i - qt0) % 2;
            // Stage tile i (the first one now, each next one while this one computes).
            if (i == qt0) {
                attn_load_tile(QD, q + base, i * ATTN_TILE, qlen, ldqkv);
                attn_load_tile(QD + ATTN_TILE_ELEMS, dO + obase, i * ATTN_TILE, qlen, ldo);
                if (threadIdx.x < ATTN_TILE) {
                    const int r = i * ATTN_TILE + threadIdx.x;
                    stats[threadIdx.x] = r < qlen ? lse_h[(long)r * H] * ATTN_LOG2E : 0.0f;
                    stats[ATTN_TILE + threadIdx.x] = r < qlen ? D_h[(long)r * H] : 0.0f;
                }
                cp_async_commit();
            }
            if (i + 1 < qt1) {
                const int nb = 1 - bi;
                mmkd_bf16* qn = QD + nb * 2 * ATTN_TILE_ELEMS;
                attn_load_tile(qn, q + base, (i + 1) * ATTN_TILE, qlen, ldqkv);
                attn_load_tile(qn + ATTN_TILE_ELEMS, dO + obase, (i + 1) * ATTN_TILE, qlen, ldo);
                if (threadIdx.x < ATTN_TILE) {
                    const int r = (i + 1) * ATTN_TILE + threadIdx.x;
                    float* st = stats + nb * 2 * ATTN_TILE;
                    st[threadIdx.x] = r < qlen ? lse_h[(long)r * H] * ATTN_LOG2E : 0.0f;
                    st[ATTN_TILE + threadIdx.x] = r < qlen ? D_h[(long)r * H] : 0.0f;
                }
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const mmkd_bf16* qs = QD + bi * 2 * ATTN_TILE_ELEMS;
            const mmkd_bf16* ds = qs + ATTN_TILE_ELEMS;
            const float* lse2 = stats + bi * 2 * ATTN_TILE;
            const float* dd = lse2 + ATTN_TILE;

            // pᵀ (16 keys × 64 queries) = exp2(k·qᵀ · scale·log2e − lse·log2e), 0 where masked.
            const int nb = keys ? attn_blocks(qlen, i * ATTN_TILE) : 0;  // queries below qlen
            float pacc[8][4];
            attn_zero(pacc);
            attn_mma_nt(pacc, kf, qs, nb);
            float dpacc[8][4];
            attn_zero(dpacc);
            attn_mma_nt(dpacc, vf, ds, nb);  // dpᵀ = v·doᵀ
            // Query blocks past nb: no exponentials (the products below do not read them).
#pragma unroll
            for (int ni = 0; ni < 8; ++ni) {
                if (ni >= 2 * nb) break;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = ni * 8 + 2 * t + (e & 1);
                    const int query = i * ATTN_TILE + c;
                    const int key = krow + (e >> 1) * 8;
                    const bool ok = query < qlen && key < kvlen && (!causal || key <= query);
                    const float p = ok ? exp2f(pacc[ni][e] * sl2 - lse2[c]) : 0.0f;
                    pacc[ni][e] = p;
                    dpacc[ni][e] = p * (dpacc[ni][e] - dd[c]);  // dsᵀ
                }
            }
            unsigned af[4][4];
            attn_acc_to_a(af, pacc);
            attn_mma_nn(dvacc, af, ds, nb);  // dv += pᵀ·do
            attn_acc_to_a(af, dpacc);
            attn_mma_nn(dkacc, af, qs, nb);  // dk += dsᵀ·q
            __syncthreads();  // buffer bi is restaged two iterations on
        }
    }
    cp_async_wait_all();
    attn_store_rows(dk + base, dkacc, k0 + warp * 16, qlen, ldqkv, scale, scale);
    attn_store_rows(dv + base, dvacc, k0 + warp * 16, qlen, ldqkv, 1.0f, 1.0f);
}
MMKD_EXPORT(attn_bwd_dkdv)

MMKD_KERNEL void attn_bwd_dq(const mmkd_bf16* __restrict__ q,   // (rows, ldqkv)
                             const mmkd_bf16* __restrict__ k,   // (rows, ldqkv)
                             const mmkd_bf16* __restrict__ v,   // (rows, ldqkv)
                             const mmkd_bf16* __restrict__ o,   // (rows, ldo)
                             const mmkd_bf16* __restrict__ dO,  // (rows, ldo)
                             const float* __restrict__ lse,     // (rows, H)
                             float* __restrict__ D,             // (rows, H) out
                             const int* __restrict__ seqlens,   // (B), (3·B) or null
                             mmkd_bf16* __restrict__ dq,        // (rows, ldqkv) out
                             int H, int L, int ldqkv, int ldo, float scale, int causal,
                             int varlen) {
    MMKD_DYNAMIC_SMEM(mmkd_bf16, smem);
    mmkd_bf16* KVs = smem;  // (2 buffers, k then v, 64, PITCH); q and do pass through buffer 1
    const int bh = blockIdx.y, q0 = blockIdx.x * ATTN_TILE, hh = bh % H;
    const AttnSeq sq = attn_seq(seqlens, bh / H, gridDim.y / H, L, varlen);
    if (q0 >= sq.qlen) return;  // as attn_fwd
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, t = lane % 4;
    const long base = attn_head_base(sq, hh, ldqkv);
    const int kvlen = sq.kvlen, qlen = sq.qlen;
    const int ntiles = attn_key_tiles(kvlen, q0, causal);
    const float sl2 = scale * ATTN_LOG2E;
    const int row0 = q0 + warp * 16 + gq;
    // As attn_fwd: the keys this warp's rows see end at kend, none for rows all past qlen.
    int kend = causal && q0 + warp * 16 + 16 < kvlen ? q0 + warp * 16 + 16 : kvlen;
    if (q0 + warp * 16 >= qlen) kend = 0;
    // D = rowsum(do ∘ o) of this thread's two rows: the quad's four lanes take 16 columns
    // each (two 16-byte loads per tensor), then add up across the quad.
    const long obase = attn_head_base(sq, hh, ldo);
    float lse2[2], drow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + h * 8;
        const long at_stat = (sq.row0 + row) * H + hh;
        lse2[h] = row < qlen ? lse[at_stat] * ATTN_LOG2E : 0.0f;
        float d = 0.0f;
        if (row < qlen) {
            const long at = obase + (long)row * ldo + t * 16;
#pragma unroll
            for (int c = 0; c < 16; c += 8) {
                const mmkd_u32x4 ov = load_u32x4(o + at + c), dv = load_u32x4(dO + at + c);
                const unsigned ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    d += bf16_to_f32((mmkd_bf16)(ow[e] & 0xffffu)) *
                             bf16_to_f32((mmkd_bf16)(dw[e] & 0xffffu)) +
                         bf16_to_f32((mmkd_bf16)(ow[e] >> 16)) *
                             bf16_to_f32((mmkd_bf16)(dw[e] >> 16));
            }
        }
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        d += __shfl_xor_sync(0xffffffffu, d, 2);
        drow[h] = d;
        if (t == 0 && row < qlen) D[at_stat] = d;
    }

    float dqacc[8][4];
    attn_zero(dqacc);
    unsigned qf[4][4], df[4][4];
    if (ntiles > 0) {
        // q and do through buffer 1 into registers, key tile 0 into buffer 0, one group.
        attn_load_tile(KVs + 2 * ATTN_TILE_ELEMS, q + base, q0, qlen, ldqkv);
        attn_load_tile(KVs + 3 * ATTN_TILE_ELEMS, dO + obase, q0, qlen, ldo);
        attn_load_tile(KVs, k + base, 0, kvlen, ldqkv);
        attn_load_tile(KVs + ATTN_TILE_ELEMS, v + base, 0, kvlen, ldqkv);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        attn_load_a(qf, KVs + 2 * ATTN_TILE_ELEMS, warp * 16);
        attn_load_a(df, KVs + 3 * ATTN_TILE_ELEMS, warp * 16);
        __syncthreads();  // buffer 1 is restaged below
    }
    for (int j = 0; j < ntiles; ++j) {
        mmkd_bf16* ks = KVs + (j % 2) * 2 * ATTN_TILE_ELEMS;
        mmkd_bf16* vs = ks + ATTN_TILE_ELEMS;
        if (j + 1 < ntiles) {
            mmkd_bf16* kn = KVs + ((j + 1) % 2) * 2 * ATTN_TILE_ELEMS;
            attn_load_tile(kn, k + base, (j + 1) * ATTN_TILE, kvlen, ldqkv);
            attn_load_tile(kn + ATTN_TILE_ELEMS, v + base, (j + 1) * ATTN_TILE, kvlen, ldqkv);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int nb = attn_blocks(kend, j * ATTN_TILE);
        float pacc[8][4], dpacc[8][4];
        attn_zero(pacc);
        attn_zero(dpacc);
        attn_mma_nt(pacc, qf, ks, nb);   // s = q·kᵀ
        attn_mma_nt(dpacc, df, vs, nb);  // dp = do·vᵀ
        // Key blocks past nb: no exponentials (the product with k does not read them).
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
            if (ni >= 2 * nb) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * ATTN_TILE + ni * 8 + 2 * t + (e & 1);
                const int row = row0 + (e >> 1) * 8;
                const bool ok = row < qlen && key < kvlen && (!causal || key <= row);
                const float p = ok ? exp2f(pacc[ni][e] * sl2 - lse2[e >> 1]) : 0.0f;
                dpacc[ni][e] = p * (dpacc[ni][e] - drow[e >> 1]);  // ds
            }
        }
        unsigned af[4][4];
        attn_acc_to_a(af, dpacc);
        attn_mma_nn(dqacc, af, ks, nb);  // dq += ds·k
        __syncthreads();
    }
    cp_async_wait_all();
    attn_store_rows(dq + base, dqacc, q0 + warp * 16, qlen, ldqkv, scale, scale);
}
MMKD_EXPORT(attn_bwd_dq)
