#!/usr/bin/env python3
"""The unfused PyTorch multi-teacher distillation loss (DESIGN.md §2, teacher mode `all`,
teacher_norm l2), forward and backward, timed with CUDA events at N=1024, T=8, D=512.

It is the baseline for the fused kernel (`mt_loss` in `mmkd selftest`): the same inputs
(bf16 features and targets, a 60 % availability mask with one teacher guaranteed per sample),
the same outputs (the four components, gradients of the student features and of the logit
scale). Two variants: fp32 arithmetic on the widened bf16 inputs (what the fused kernel
computes), and the same under bf16 autocast (what a PyTorch training step would run).

Usage: torch_loss_bench.py [--n 1024] [--t 8] [--d 512] [--iters 50] [--json FILE]
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

from gpu_timing import time_calls


def loss_fn(img, txt, s, ti, tt, mask, lam=50.0, c=math.log(1 / 0.07)):
    """img, txt (N, D) raw student features; ti, tt (N, T, D) targets; mask (N, T) bool."""
    n, t, d = ti.shape
    ih, th = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    ti, tt = F.normalize(ti, dim=-1), F.normalize(tt, dim=-1)
    logits = s.exp() * ih @ th.T
    labels = torch.arange(n, device=img.device)
    task = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    count = mask.sum(1, keepdim=True).float()  # (N, 1)
    w = mask.float() / (count * n)  # (N, T)
    fd = ih.new_zeros(())
    icl = ih.new_zeros(())
    for k in range(t):
        wk, keep = w[:, k], mask[:, k]
        fd = fd + (wk * (((ih - ti[:, k]) ** 2).sum(-1) + ((th - tt[:, k]) ** 2).sum(-1))).sum() / d
        for a, b in ((ih, tt[:, k]), (th, ti[:, k])):
            z = c * a @ b.T
            z = z.masked_fill(~keep[None, :], float("-inf"))
            ce = torch.logsumexp(z, dim=1) - z.diagonal()
            icl = icl + 0.5 * (wk * torch.where(wk > 0, ce, torch.zeros_like(ce))).sum()
    total = task + lam * fd + icl
    return total, task, fd, icl


def time_variant(args, autocast):
    torch.manual_seed(0)
    dev = "cuda"
    n, t, d = args.n, args.t, args.d
    bf = torch.bfloat16
    img0 = torch.rand(n, d, device=dev).mul(2).sub(1).to(bf)
    txt0 = torch.rand(n, d, device=dev).mul(2).sub(1).to(bf)
    ti = torch.rand(n, t, d, device=dev).mul(2).sub(1).to(bf).float()
    tt = torch.rand(n, t, d, device=dev).mul(2).sub(1).to(bf).float()
    mask = torch.rand(n, t, device=dev) < 0.6
    mask[torch.arange(n, device=dev), torch.randint(0, t, (n,), device=dev)] = True

    def step():
        img = img0.float().requires_grad_()
        txt = txt0.float().requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), device=dev, requires_grad=True)
        with torch.autocast("cuda", dtype=bf, enabled=autocast):
            total, *_ = loss_fn(img, txt, s, ti, tt, mask)
        total.backward()
        return total

    v = step()
    ms, reps = time_calls(step, 5, args.iters)
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "iters": args.iters,
            "reps": reps, "total": float(v)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--t", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 variant: real fp32, as the kernel
    res = {
        "n": args.n, "t": args.t, "d": args.d,
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "fp32": time_variant(args, autocast=False),
        "bf16_autocast": time_variant(args, autocast=True),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
