#!/usr/bin/env python3
"""PyTorch baselines for the GEMM and fused-attention kernels (kernels/cuda/gemm.cu,
kernels/cuda/attention.cu) at the shapes of the student model (DESIGN.md §2), with the static
roofline model beside each figure.

GEMM: cuBLAS through torch (F.linear for the forward with bias, matmul for the input and weight
gradients), bf16 operands, at the four linear layers of a transformer block (qkv 768→2304,
attention out 768→768, MLP 768→3072 and 3072→768) for the image tower (M = batch·197) and the
text tower (M = batch·context, captions padded to the context), and the 768→512 projection
(M = batch). Attention: F.scaled_dot_product_attention, (B, H, L, 64) bf16, forward and
forward+backward, without a mask and with a key-padding mask (lengths drawn in [L/2, L]).

Every case records FLOPs, the fewest bytes it must move (each input read once, each output
written once), the roofline time on an H200 (790 TFLOP/s dense bf16, 4.3 TB/s: the ceilings
measured on this workplace's H200) and, when timed, the median of --iters runs measured with
CUDA events after --warmup runs, on random (never zero) inputs.

Usage:
  torch_gemm_attn_bench.py --model            print the static model as a Markdown table
                                              (no torch needed)
  torch_gemm_attn_bench.py [--json FILE] [--batch 256] [--context 256] [--iters 30]
"""
import argparse
import json
import math
import statistics
import sys

from gpu_timing import time_calls

PEAK_FLOPS = 790e12  # bf16 dense, measured ceiling (KINDS.md)
PEAK_BYTES = 4.3e12  # device copy, measured ceiling
HEAD_DIM = 64
HEADS = 12
WIDTH = 768


def gemm_cases(batch, context):
    """(tower, layer, M, N, K): Y (M, N) = X (M, K) · W (N, K)ᵀ."""
    out = []
    for tower, m in (("image", batch * 197), ("text", batch * context)):
        for layer, n, k in (
            ("qkv", 3 * WIDTH, WIDTH),
            ("attn_out", WIDTH, WIDTH),
            ("mlp_up", 4 * WIDTH, WIDTH),
            ("mlp_down", WIDTH, 4 * WIDTH),
        ):
            out.append((tower, layer, m, n, k))
    out.append(("image", "proj", batch, 512, WIDTH))
    return out


def attn_cases(batch, context):
    """(tower, B, L, causal)."""
    return [("image", batch, 197, False), ("text", batch, context, False)]


def roofline_us(flops, nbytes):
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES) * 1e6


def gemm_model(m, n, k, layout):
    """FLOPs and minimum bytes of one layout (bf16 operands; dW written in fp32)."""
    flops = 2 * m * n * k
    if layout == "fwd":  # X (M,K), W (N,K), bias (N) -> Y (M,N)
        nbytes = 2 * (m * k + n * k + n + m * n)
    elif layout == "dgrad":  # dY (M,N), W (N,K) -> dX (M,K)
        nbytes = 2 * (m * n + n * k + m * k)
    else:  # wgrad: dY (M,N), X (M,K) -> dW (N,K) fp32, db (N) fp32
        nbytes = 2 * (m * n + m * k) + 4 * (n * k + n)
    return flops, nbytes


def attn_model(bh, seq, direction):
    """FLOPs (the minimal count and what the kernels execute) and minimum bytes. Forward: two
    L×L×64 products. Backward: five products minimum (s, dp, dv, dk, dq); the kernels run seven
    (attn_bwd_dq recomputes s and dp instead of float atomics). The kernels multiply blocks of
    16 rows by 16 keys and skip the blocks wholly past L, so each product runs over L rounded up
    to 16 on both sides."""
    pad = math.ceil(seq / 16) * 16
    per_product = 2 * bh * seq * seq * HEAD_DIM
    per_product_pad = 2 * bh * pad * pad * HEAD_DIM
    tensor = 2 * bh * seq * HEAD_DIM  # one (BH, L, 64) bf16 tensor
    rows = 4 * bh * seq  # one (BH, L) fp32 vector
    if direction == "fwd":  # q, k, v -> o, lse
        return 2 * per_product, 2 * per_product_pad, 4 * tensor + rows
    # q, k, v, o, do, lse -> dq, dk, dv (+ D written and read once)
    return 5 * per_product, 7 * per_product_pad, 8 * tensor + 3 * rows


def model_rows(batch, context):
    rows = []
    for tower, layer, m, n, k in gemm_cases(batch, context):
        for layout in ("fwd", "dgrad", "wgrad"):
            f, b = gemm_model(m, n, k, layout)
            rows.append(
                {
                    "kind": "gemm",
                    "tower": tower,
                    "layer": layer,
                    "layout": layout,
                    "M": m,
                    "N": n,
                    "K": k,
                    "flops": f,
                    "min_bytes": b,
                    "roofline_us": roofline_us(f, b),
                    "bound": "compute" if f / PEAK_FLOPS >= b / PEAK_BYTES else "memory",
                }
            )
    for tower, bsz, seq, causal in attn_cases(batch, context):
        for direction in ("fwd", "bwd"):
            f, fx, b = attn_model(bsz * HEADS, seq, direction)
            rows.append(
                {
                    "kind": "attention",
                    "tower": tower,
                    "layout": direction,
                    "BH": bsz * HEADS,
                    "L": seq,
                    "causal": causal,
                    "flops": f,
                    "flops_executed": fx,
                    "min_bytes": b,
                    "roofline_us": roofline_us(f, b),
                    "roofline_executed_us": roofline_us(fx, b),
                    "bound": "compute" if f / PEAK_FLOPS >= b / PEAK_BYTES else "memory",
                }
            )
    return rows


def print_model(rows):
    """Markdown: one row per GEMM shape (its three layouts side by side), one per attention."""
    print("| kernel | tower | shape | GFLOP | min MB (fwd / dgrad / wgrad) | roofline µs (fwd / dgrad / wgrad) | measured |")
    print("|---|---|---|---:|---|---|---|")
    gemm = {}
    for r in rows:
        if r["kind"] == "gemm":
            gemm.setdefault((r["tower"], r["layer"], r["M"], r["N"], r["K"]), []).append(r)
    for (tower, layer, m, n, k), rs in gemm.items():
        mb = " / ".join(f"{r['min_bytes'] / 1e6:.1f}" for r in rs)
        us = " / ".join(f"{r['roofline_us']:.1f}" for r in rs)
        print(
            f"| gemm | {tower} | {layer} M={m} N={n} K={k} | {rs[0]['flops'] / 1e9:.1f} | {mb} "
            f"| {us} ({rs[0]['bound']}) | never ran on a GPU |"
        )
    print()
    print("| kernel | tower | shape | GFLOP minimal (executed) | min MB | roofline µs minimal (executed) | measured |")
    print("|---|---|---|---|---:|---|---|")
    for r in rows:
        if r["kind"] != "attention":
            continue
        print(
            f"| attention {r['layout']} | {r['tower']} | BH={r['BH']} L={r['L']} d=64 "
            f"| {r['flops'] / 1e9:.1f} ({r['flops_executed'] / 1e9:.1f}) | {r['min_bytes'] / 1e6:.1f} "
            f"| {r['roofline_us']:.1f} ({r['roofline_executed_us']:.1f}) | never ran on a GPU |"
        )


def time_ms(fn, warmup, iters):
    """Median and spread of the milliseconds per call (`gpu_timing.time_calls`)."""
    times, _ = time_calls(fn, warmup, iters)
    return statistics.median(times), statistics.pstdev(times)


def run_torch(args, rows):
    import torch
    import torch.nn.functional as F

    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, device=dev).mul_(2).sub_(1).to(bf)

    for r in rows:
        if r["kind"] != "gemm":
            continue
        m, n, k = r["M"], r["N"], r["K"]
        if r["layout"] == "fwd":
            x, w, b = rand(m, k), rand(n, k), rand(n)
            fn = lambda: F.linear(x, w, b)  # noqa: E731
        elif r["layout"] == "dgrad":
            dy, w = rand(m, n), rand(n, k)
            fn = lambda: dy @ w  # noqa: E731
        else:
            dy, x = rand(m, n), rand(m, k)
            # cuBLAS with fp32 output where it can: bf16 product then the bias-gradient sum.
            fn = lambda: ((dy.t() @ x).float(), dy.float().sum(0))  # noqa: E731
        med, sd = time_ms(fn, args.warmup, args.iters)
        r["torch_ms"], r["torch_ms_stdev"] = med, sd
        r["torch_tflops"] = r["flops"] / (med * 1e-3) / 1e12
        r["torch_over_roofline"] = med * 1e3 / r["roofline_us"]
        del fn
        torch.cuda.empty_cache()

    for r in rows:
        if r["kind"] != "attention":
            continue
        bh, seq = r["BH"], r["L"]
        bsz = bh // HEADS
        q, k, v = (rand(bsz, HEADS, seq, HEAD_DIM) for _ in range(3))
        lens = torch.randint(seq // 2, seq + 1, (bsz,), device=dev)
        keep = torch.arange(seq, device=dev)[None, :] < lens[:, None]  # (B, L)
        mask = keep[:, None, None, :]  # (B, 1, 1, L): key padding
        for masked in (False, True):
            kw = {"attn_mask": mask} if masked else {}
            if r["layout"] == "fwd":
                fn = lambda: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
            else:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                do = rand(bsz, HEADS, seq, HEAD_DIM)

                def fn():
                    o = F.scaled_dot_product_attention(qg, kg, vg, **kw)
                    o.backward(do)

            med, sd = time_ms(fn, args.warmup, args.iters)
            tag = "torch_masked" if masked else "torch"
            r[f"{tag}_ms"], r[f"{tag}_ms_stdev"] = med, sd
            # The backward row times forward + backward, as a training step runs them.
            r[f"{tag}_includes_forward"] = r["layout"] == "bwd"
        torch.cuda.empty_cache()
    r0 = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    return r0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", action="store_true", help="print the static model and exit")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=256, help="padded caption length")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    rows = model_rows(args.batch, args.context)
    if args.model:
        print_model(rows)
        return 0
    env = run_torch(args, rows)
    result = {"env": env, "peak_flops": PEAK_FLOPS, "peak_bytes": PEAK_BYTES, "cases": rows}
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    for r in rows:
        name = f"{r['kind']} {r['tower']} {r.get('layer', '')} {r['layout']}"
        print(f"{name:40s} roofline {r['roofline_us']:9.1f} us  torch {r.get('torch_ms', float('nan')) * 1e3:9.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
