#!/usr/bin/env python3
"""Independent NumPy implementation of mmkd's training losses, for parity checks.

Reads the same safetensors input as `mmkd loss` (image, text [N, D]; logit_scale; for kd
teacher_image, teacher_text [N, D] or [N, T, D] with teacher_mask [N, T]; optional icl_scale when
learned) and prints one JSON object: task, fd, icl, total and the gradients (image, text,
logit_scale, icl_scale) as nested lists. Written in matrix form with NumPy only; safetensors is
parsed by hand so no other package is needed.

Usage: loss_ref.py --stage clip|kd --in FILE [--fd-weight W] [--icl-scale S|learned]
                   [--teacher-norm l2|none] [--teacher-mode mean|all|random]
Random mode here requires one teacher slot (the draw is the caller's business).
"""
import argparse
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "U8": np.uint8, "BOOL": np.bool_}
REFERENCE_ICL_SCALE = float(np.log(1 / 0.07))


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + hlen])
    base = 8 + hlen
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        arr = np.frombuffer(raw[base + a : base + b], dtype=DTYPES[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"]).astype(np.float64)
    return out


def normalize(x):
    n = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x / n, n


def normalize_back(xh, n, g):
    return (g - xh * np.sum(g * xh, axis=1, keepdims=True)) / n


def ce_diag(z, w, keep):
    """sum_i w_i * CE(z_i, i) over kept columns; returns loss and dL/dz."""
    zm = np.where(keep[None, :], z, -np.inf)
    m = zm.max(axis=1, keepdims=True)
    e = np.exp(zm - m)
    p = e / e.sum(axis=1, keepdims=True)
    lse = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]
    idx = np.arange(z.shape[0])
    live = w > 0
    loss = float(np.sum(w[live] * (lse[live] - z[idx, idx][live])))
    dz = w[:, None] * (p - np.eye(z.shape[0]))
    return loss, dz


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["clip", "kd"], required=True)
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--fd-weight", type=float, default=50.0)
    ap.add_argument("--icl-scale", default=str(REFERENCE_ICL_SCALE))
    ap.add_argument("--teacher-norm", choices=["l2", "none"], default="l2")
    ap.add_argument("--teacher-mode", choices=["random", "mean", "all"], default="random")
    a = ap.parse_args()
    t = read_safetensors(a.inp)
    img, txt = t["image"], t["text"]
    n, d = img.shape
    s = float(t["logit_scale"].reshape(-1)[0])
    ih, inorm = normalize(img)
    th, tnorm = normalize(txt)

    # task: symmetric CLIP loss.
    es = np.exp(s)
    z = es * ih @ th.T
    keep = np.ones(n, dtype=bool)
    l1, dz1 = ce_diag(z, np.full(n, 0.5 / n), keep)
    l2, dz2 = ce_diag(z.T, np.full(n, 0.5 / n), keep)
    dz = dz1 + dz2.T
    task = l1 + l2
    d_ih = es * dz @ th
    d_th = es * dz.T @ ih
    d_s = float(np.sum(dz * z))
    fd = icl = 0.0
    d_l = None

    if a.stage == "kd":
        ti, tt = t["teacher_image"], t["teacher_text"]
        if ti.ndim == 2:
            ti, tt = ti[:, None, :], tt[:, None, :]
        k = ti.shape[1]
        mask = t["teacher_mask"].reshape(n, k) != 0 if "teacher_mask" in t else np.ones((n, k), bool)
        count = mask.sum(axis=1)
        if np.any(count == 0):
            sys.exit(f"sample {int(np.argmin(count))} has no teacher")
        if a.teacher_norm == "l2":
            ti = ti / np.maximum(np.linalg.norm(ti, axis=2, keepdims=True), 1e-12)
            tt = tt / np.maximum(np.linalg.norm(tt, axis=2, keepdims=True), 1e-12)
        if a.teacher_mode == "random":
            if k != 1:
                sys.exit("random mode needs one teacher slot")
            w = np.ones((n, 1)) / n
            km = np.ones((n, 1), bool)
        elif a.teacher_mode == "mean":
            ti = (ti * mask[:, :, None]).sum(axis=1, keepdims=True) / count[:, None, None]
            tt = (tt * mask[:, :, None]).sum(axis=1, keepdims=True) / count[:, None, None]
            if a.teacher_norm == "l2":
                ti = ti / np.linalg.norm(ti, axis=2, keepdims=True)
                tt = tt / np.linalg.norm(tt, axis=2, keepdims=True)
            w = np.ones((n, 1)) / n
            km = np.ones((n, 1), bool)
        else:
            w = mask / (count[:, None] * n)
            km = mask
        learned = a.icl_scale == "learned"
        if learned:
            ell = float(t["icl_scale"].reshape(-1)[0]) if "icl_scale" in t else np.log(REFERENCE_ICL_SCALE)
            c = float(np.exp(ell))
        else:
            c = float(a.icl_scale)
        dc = 0.0
        for j in range(ti.shape[1]):
            if not km[:, j].any():
                continue
            ui, ut = ti[:, j, :], tt[:, j, :]
            wj = w[:, j]
            ri, rt = ih - ui, th - ut
            fd += float(np.sum(wj[:, None] * (ri**2 + rt**2)) / d)
            d_ih += a.fd_weight * 2 * wj[:, None] * ri / d
            d_th += a.fd_weight * 2 * wj[:, None] * rt / d
            za = c * ih @ ut.T
            la, dza = ce_diag(za, 0.5 * wj, km[:, j])
            zb = c * th @ ui.T
            lb, dzb = ce_diag(zb, 0.5 * wj, km[:, j])
            icl += la + lb
            d_ih += c * dza @ ut
            d_th += c * dzb @ ui
            dc += float(np.sum(dza * (ih @ ut.T)) + np.sum(dzb * (th @ ui.T)))
        if learned:
            d_l = c * dc

    total = task + a.fd_weight * fd + icl if a.stage == "kd" else task
    out = {
        "task": task,
        "fd": fd,
        "icl": icl,
        "total": total,
        "grads": {
            "image": normalize_back(ih, inorm, d_ih).tolist(),
            "text": normalize_back(th, tnorm, d_th).tolist(),
            "logit_scale": d_s,
        },
    }
    if d_l is not None:
        out["grads"]["icl_scale"] = d_l
    print(json.dumps(out))


if __name__ == "__main__":
    main()
