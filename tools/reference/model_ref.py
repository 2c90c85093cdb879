#!/usr/bin/env python3
"""Independent NumPy forward of the mmkd CLIP student (both towers, projections, CLIP loss).

Usage: model_ref.py DIR
Reads   DIR/config.json            the model config (the TOML schema as JSON),
        DIR/weights.safetensors    parameters under open_clip / Hugging Face names,
        DIR/inputs.safetensors     images f32 (B,C,H,W), tokens u32 (B,L), lengths i64 (B),
writes  DIR/ref.json               {"img": [[...]], "txt": [[...]], "loss": x}.
Everything is computed in float64 from the float32 weights.
"""
import json
import math
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "U32": np.uint32, "I32": np.int32,
          "I64": np.int64, "F16": np.float16}


def load_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[base + a:base + b], dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float64 if info["dtype"].startswith("F") else np.int64)
    return out


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def act(name, x):
    return quick_gelu(x) if name == "quick_gelu" else gelu(x)


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def attention(x, w_qkv, b_qkv, w_out, b_out, heads, lengths, causal):
    """x (B, L, W); nn.Linear weights (out, in)."""
    B, L, W = x.shape
    d = W // heads
    qkv = x @ w_qkv.T + b_qkv
    q, k, v = qkv[..., :W], qkv[..., W:2 * W], qkv[..., 2 * W:]
    split = lambda t: t.reshape(B, L, heads, d).transpose(0, 2, 1, 3)  # (B, H, L, d)
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # (B, H, L, L)
    allowed = np.ones((B, 1, L, L), dtype=bool)
    if lengths is not None:
        allowed &= (np.arange(L)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones((L, L), dtype=bool))[None, None]
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(allowed, np.exp(s - m), 0.0)
    den = e.sum(-1, keepdims=True)
    p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(B, L, W)
    return o @ w_out.T + b_out


def vision(cfg, w, images):
    v = cfg["vision"]
    P = v["patch_size"]
    B, C, H, Wd = images.shape
    gh, gw = H // P, Wd // P
    conv = w["visual.conv1.weight"]  # (D, C, P, P)
    D = conv.shape[0]
    patches = images.reshape(B, C, gh, P, gw, P).transpose(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P)
    x = patches @ conv.reshape(D, -1).T  # (B, N, D)
    cls = np.broadcast_to(w["visual.class_embedding"], (B, 1, D))
    x = np.concatenate([cls, x], axis=1) + w["visual.positional_embedding"]
    eps = v.get("ln_eps", 1e-5)
    x = layer_norm(x, w["visual.ln_pre.weight"], w["visual.ln_pre.bias"], eps)
    for i in range(v["layers"]):
        p = f"visual.transformer.resblocks.{i}."
        h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        x = x + attention(h, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"],
                          w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"], v["heads"], None, False)
        h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        h = act(v["act"], h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x[:, 0], w["visual.ln_post.weight"], w["visual.ln_post.bias"], eps)
    return x @ w["visual.proj"]


def text(cfg, w, tokens, lengths):
    t = cfg["text"]
    B, L = tokens.shape
    e = "text.transformer.embeddings."
    eps = t.get("ln_eps", 1e-12)
    x = w[e + "word_embeddings.weight"][tokens] + w[e + "position_embeddings.weight"][:L][None] \
        + w[e + "token_type_embeddings.weight"][0]
    x = layer_norm(x, w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
    for i in range(t["layers"]):
        p = f"text.transformer.encoder.layer.{i}."
        wq = np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")])
        bq = np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        attn = lambda h: attention(h, wq, bq, w[p + "attention.output.dense.weight"],
                                   w[p + "attention.output.dense.bias"], t["heads"], lengths, t["causal"])
        mlp = lambda h: act(t["act"], h @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"]) \
            @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
        ln1 = lambda h: layer_norm(h, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        ln2 = lambda h: layer_norm(h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        if t["norm"] == "pre":
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        else:
            x = ln1(x + attn(x))
            x = ln2(x + mlp(x))
    rows = np.zeros(B, dtype=np.int64) if t["pooling"] == "cls" else np.asarray(lengths) - 1
    x = x[np.arange(B), rows]
    if t["norm"] == "pre":
        x = layer_norm(x, w["text.ln_final.weight"], w["text.ln_final.bias"], eps)
    h = gelu(x @ w["text.proj.0.weight"].T)
    return h @ w["text.proj.2.weight"].T


def cross_entropy(z):
    m = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
    return float(np.mean(lse - np.diag(z)))


def clip_loss(img, txt, s):
    i = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    t = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    logits = math.exp(s) * i @ t.T
    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: model_ref.py DIR")
    d = sys.argv[1]
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    w = load_safetensors(f"{d}/weights.safetensors")
    inp = load_safetensors(f"{d}/inputs.safetensors")
    img = vision(cfg, w, inp["images"])
    txt = text(cfg, w, inp["tokens"], inp["lengths"].tolist())
    loss = clip_loss(img, txt, float(w["logit_scale"]))
    with open(f"{d}/ref.json", "w") as f:
        json.dump({"img": img.tolist(), "txt": txt.tolist(), "loss": loss}, f)


if __name__ == "__main__":
    main()
