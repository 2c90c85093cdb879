#!/usr/bin/env python3
"""The student model and the stage-1 / stage-2 losses of mmkd in PyTorch, as a benchmark baseline.

    python3 tools/torch_reference.py --config configs/vit-b16-biomedbert.toml --stage kd \
        --batch 256 --steps 20 [--warmup 3] [--json FILE] [--device cpu|cuda|auto] \
        [--compile] [--text-layout padded|packed] [--set key=value ...]

It builds the same model as engine/src/model.rs from the same TOML config (DESIGN.md §2): an
open_clip ViT image tower (bias-free patch embedding, class token, learned positions, ln_pre,
pre-LN blocks, ln_post on the class token, bias-free projection) and a BERT-style text tower
(embeddings + LayerNorm, post-LN blocks, [CLS] pooling, the 2-layer bias-free MLP projection),
with parameters under the same open_clip / Hugging Face names. The losses are those of
engine/src/loss/ (the CLIP loss with exp(s); task + λ·fd + icl over [N, T, D] teacher targets
with an availability mask, teacher modes random / mean / all, teacher norm l2 / none, icl scale
const / learned), the optimiser is AdamW with open_clip's decay rule, gradient-norm clipping, the
warm-up + cosine schedule and the logit-scale clamp, as engine/src/trainer.rs applies them.

On CUDA it trains the way fast PyTorch trainers do: bf16 autocast, SDPA attention, fused AdamW
(and torch.compile with --compile). On the CPU it runs in fp32 with plain AdamW.

The synthetic batches have the shapes `mmkd bench train` uses, and the caption lengths are drawn
with the same SplitMix64 stream and formula. By default the captions are padded to the batch's
longest, as PyTorch trainers usually run them; `--text-layout packed` runs the text tower on the
valid tokens back to back, as mmkd does, with variable-length flash attention on CUDA (on the
CPU the attention alone goes through the padded layout). The JSON result has the shape of
`mmkd bench train --json`, with "engine": "torch-eager" or "torch-compile", and "text_layout".

Parity mode (no timing): `--parity-weights W.safetensors --parity-batch B.safetensors` loads
mmkd's weights (open_clip / HF names) and a batch (`mmkd bench train --save-parity DIR` writes
both, with the engine's loss on that batch in DIR/loss.json) and prints the loss parts as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

import torch
import torch.nn as nn
import torch.nn.functional as F

# The released reference's icl scale ln(1/0.07), multiplied in directly.
REFERENCE_ICL_SCALE = 2.659260036932778
LOGIT_SCALE_MAX = math.log(100.0)
# CLIP's image normalisation (loaders/src/batch.rs).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.2613026, 0.2757771)
# Measured bf16 dense peak of an H200 (issue 6), the default MFU denominator on CUDA.
H200_BF16_PEAK_TFLOPS = 790.0

TRAIN_DEFAULTS = {
    "batch_size": 32, "micro_batch": 0, "epochs": 1, "lr": 5e-5, "warmup": 2000,
    "weight_decay": 0.2, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "grad_clip": 1.0,
    "save_every": 100, "keep_last": 2, "seed": 0, "workers": 2, "fd_weight": 50.0,
    "icl_scale": "const", "icl_scale_value": REFERENCE_ICL_SCALE, "teacher_norm": "l2",
    "teacher_mode": "random", "checkpointing": False, "fault_nan_at_step": None,
    "stop_after": None,
}
VISION_DEFAULTS = {"channels": 3, "ln_eps": 1e-5}
TEXT_DEFAULTS = {"ln_eps": 1e-12, "type_vocab_size": 2}


# ----------------------------------------------------------------------------- configuration

def _parse_value(v: str):
    v = v.strip()
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v in ("true", "false"):
        return v == "true"
    return v


def load_configs(path: str, sets: list[str]) -> tuple[dict, dict]:
    """The model and train tables of a config file with `key=value` overrides, as
    `trainer::load_configs` reads them (model keys at the top level, `[train]` table)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    train = dict(doc.pop("train", {}))
    for s in sets:
        if "=" not in s:
            raise SystemExit(f"--set `{s}`: expected key=value")
        k, v = s.split("=", 1)
        key, value = k.strip(), _parse_value(v)
        if key.startswith("train."):
            train[key[len("train."):]] = value
        elif key in TRAIN_DEFAULTS:
            train[key] = value
        else:
            key = key[len("model."):] if key.startswith("model.") else key
            *parents, last = key.split(".")
            t = doc
            for p in parents:
                t = t.setdefault(p, {})
            if isinstance(t.get(last), float) and isinstance(value, int):
                value = float(value)
            t[last] = value
    unknown = set(train) - set(TRAIN_DEFAULTS)
    if unknown:
        raise SystemExit(f"{path}: [train]: unknown keys {sorted(unknown)}")
    model = dict(doc)
    model.setdefault("logit_scale_init", math.log(1 / 0.07))
    model.setdefault("seed", 0)
    model["vision"] = {**VISION_DEFAULTS, **model["vision"]}
    model["text"] = {**TEXT_DEFAULTS, **model["text"]}
    return model, {**TRAIN_DEFAULTS, **train}


def text_proj_hidden(cfg: dict) -> int:
    return (cfg["text"]["width"] + cfg["embed_dim"]) // 2


# ----------------------------------------------------------------------------- FLOPs (= engine/src/flops.rs)

def _block_flops(width: float, hidden: float, tokens: float, pairs: float) -> float:
    return 8 * tokens * width * width + 4 * tokens * width * hidden + 4 * pairs * width


def flops_per_sample(cfg: dict, text_tokens: float) -> float:
    """Training matmul FLOPs (3 × forward) of one image and one caption of `text_tokens` valid
    tokens; the same count as `mmkd_engine::flops::flops_per_sample`."""
    v, t = cfg["vision"], cfg["text"]
    w = float(v["width"])
    patches = (v["image_size"] // v["patch_size"]) ** 2
    tokens = patches + 1
    k = v["channels"] * v["patch_size"] ** 2
    image = (2 * patches * k * w
             + v["layers"] * _block_flops(w, v["mlp_ratio"] * w, tokens, tokens * tokens)
             + 2 * w * cfg["embed_dim"])
    tw = float(t["width"])
    n = float(text_tokens)
    pairs = n * (n + 1) / 2 if t["causal"] else n * n
    ph = text_proj_hidden(cfg)
    text = (t["layers"] * _block_flops(tw, t["mlp_ratio"] * tw, n, pairs)
            + 2 * tw * ph + 2 * ph * cfg["embed_dim"])
    return 3.0 * (image + text)


# ----------------------------------------------------------------------------- synthetic lengths

class SplitMix64:
    """The generator of tools/src/bench.rs: the same seed gives the same caption lengths."""
    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def next_f64(self) -> float:
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


def caption_lengths(rng: SplitMix64, batch: int, median: float, sigma: float, context: int):
    """Log-normal caption lengths, as `bench::caption_lengths`."""
    out = []
    for _ in range(batch):
        z = -6.0
        for _ in range(12):
            z += rng.next_f64()
        n = math.floor(median * math.exp(sigma * z))
        out.append(min(max(n, 2), max(context, 2)))
    return out


# ----------------------------------------------------------------------------- model

def attention(q, k, v, heads: int, key_mask, causal: bool):
    """SDPA over (B, L, W) projections; `key_mask` (B, L) bool marks valid keys or is None."""
    b, l, w = q.shape
    d = w // heads
    q, k, v = (x.view(b, l, heads, d).transpose(1, 2) for x in (q, k, v))  # (B, H, L, d)
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :]  # (B, 1, 1, L)
        if causal:
            mask = mask & torch.ones(l, l, dtype=torch.bool, device=q.device).tril()
        causal = False
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return o.transpose(1, 2).reshape(b, l, w)


def valid_rows(lengths: list[int], width: int) -> torch.Tensor:
    """(T,) int64: the index of each valid token in a (B, width) row-major layout, captions
    in order."""
    return torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)])


def pack_tokens(tokens: torch.Tensor, lengths: list[int]):
    """The valid tokens of host rows `tokens` (B, W) back to back, and their positions."""
    rows = valid_rows(lengths, tokens.shape[1])
    return tokens.reshape(-1)[rows], rows % tokens.shape[1]


class Packed:
    """The valid tokens of a caption batch back to back, as mmkd's text tower runs them.

    `cu` (B+1,) int32 holds each caption's first row and the total; `rows` (T,) int64 maps each
    packed row to its place in the padded (B·L) layout, which the CPU path needs."""

    def __init__(self, lengths: list[int], device: torch.device):
        self.batch, self.max_len = len(lengths), max(lengths)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.total = cu[-1]
        self.cu = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)
        self.rows = valid_rows(lengths, self.max_len).to(device, non_blocking=True)
        lens = torch.tensor(lengths, dtype=torch.int64).to(device, non_blocking=True)
        self.key_mask = torch.arange(self.max_len, device=device)[None, :] < lens[:, None]


def packed_attention(q, k, v, heads: int, packed: Packed, causal: bool):
    """Attention over (T, W) projections of packed captions. On CUDA, PyTorch's
    variable-length flash attention reads each caption's rows where they lie; on the CPU (no
    such kernel) the rows go to the padded layout for SDPA and come back."""
    t, w = q.shape
    d = w // heads
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn
        o = varlen_attn(q.view(t, heads, d), k.view(t, heads, d), v.view(t, heads, d),
                        packed.cu, packed.cu, packed.max_len, packed.max_len,
                        window_size=(-1, 0) if causal else (-1, -1))
        return o.reshape(t, w)
    b, l = packed.batch, packed.max_len

    def pad(x):  # (T, W) -> (B, L, W), zeros past each caption
        return x.new_zeros(b * l, w).index_copy(0, packed.rows, x).view(b, l, w)

    o = attention(pad(q), pad(k), pad(v), heads, packed.key_mask, causal)
    return o.reshape(b * l, w).index_select(0, packed.rows)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class _Attn(nn.Module):
    """open_clip's nn.MultiheadAttention parameters (packed in_proj), run through SDPA."""

    def __init__(self, w: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * w, w))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * w))
        self.out_proj = nn.Linear(w, w)


class _Mlp(nn.Module):
    def __init__(self, w: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(w, hidden)
        self.gelu = activation(act)
        self.c_proj = nn.Linear(hidden, w)


class ClipBlock(nn.Module):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, w: int, heads: int, hidden: int, act: str, eps: float, layers: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(w, eps=eps)
        self.attn = _Attn(w)
        self.ln_2 = nn.LayerNorm(w, eps=eps)
        self.mlp = _Mlp(w, hidden, act)
        attn_std = w ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        nn.init.normal_(self.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.normal_(self.mlp.c_fc.weight, std=(2 * w) ** -0.5)
        nn.init.zeros_(self.mlp.c_fc.bias)
        nn.init.normal_(self.mlp.c_proj.weight, std=proj_std)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, x):
        h = self.ln_1(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(attention(q, k, v, self.heads, None, False))
        return x + self.mlp.c_proj(self.mlp.gelu(self.mlp.c_fc(self.ln_2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        v = cfg["vision"]
        w, p, c = v["width"], v["patch_size"], v["channels"]
        patches = (v["image_size"] // p) ** 2
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(c, w, kernel_size=p, stride=p, bias=False)
        bound = (c * p * p) ** -0.5
        nn.init.uniform_(self.conv1.weight, -bound, bound)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=v["ln_eps"])
        hidden = int(v["mlp_ratio"] * w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ClipBlock(w, v["heads"], hidden, v["act"], v["ln_eps"], v["layers"])
            for _ in range(v["layers"]))
        self.ln_post = nn.LayerNorm(w, eps=v["ln_eps"])
        self.proj = nn.Parameter(scale * torch.randn(w, cfg["embed_dim"]))
        self.checkpointing = False

    def forward(self, images):  # (B, C, S, S) -> (B, J)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, P, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for blk in self.transformer.resblocks:
            x = _run(blk, self.checkpointing, x)
        return self.ln_post(x[:, 0]) @ self.proj


class _SelfAttn(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.query = nn.Linear(w, w)
        self.key = nn.Linear(w, w)
        self.value = nn.Linear(w, w)


class _Dense(nn.Module):
    def __init__(self, w_in: int, w_out: int, eps: float | None):
        super().__init__()
        self.dense = nn.Linear(w_in, w_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(w_out, eps=eps)


class BertLayer(nn.Module):
    """Hugging Face BertLayer parameters; post-LN as BERT (or pre-LN when configured, with the
    same names, as the engine does)."""

    def __init__(self, w: int, heads: int, hidden: int, act: str, eps: float, pre: bool,
                 causal: bool):
        super().__init__()
        self.heads, self.pre, self.causal = heads, pre, causal
        self.attention = nn.Module()
        self.attention.self = _SelfAttn(w)
        self.attention.output = _Dense(w, w, eps)
        self.intermediate = _Dense(w, hidden, None)
        self.output = _Dense(hidden, w, eps)
        self.act = activation(act)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _attn(self, x, keys):
        """`keys`: the (B, L) valid-key mask of a padded batch, or the `Packed` layout of
        (T, W) rows."""
        s = self.attention.self
        # One packed QKV product, as the engine's fused projection (weights laid out q, k, v).
        wqkv = torch.cat([s.query.weight, s.key.weight, s.value.weight])
        bqkv = torch.cat([s.query.bias, s.key.bias, s.value.bias])
        q, k, v = F.linear(x, wqkv, bqkv).chunk(3, dim=-1)
        if isinstance(keys, Packed):
            o = packed_attention(q, k, v, self.heads, keys, self.causal)
        else:
            o = attention(q, k, v, self.heads, keys, self.causal)
        return self.attention.output.dense(o)

    def _mlp(self, x):
        return self.output.dense(self.act(self.intermediate.dense(x)))

    def forward(self, x, key_mask):
        ln1, ln2 = self.attention.output.LayerNorm, self.output.LayerNorm
        if self.pre:
            x = x + self._attn(ln1(x), key_mask)
            return x + self._mlp(ln2(x))
        x = ln1(x + self._attn(x, key_mask))
        return ln2(x + self._mlp(x))


class TextTower(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        t = cfg["text"]
        w = t["width"]
        self.pooling = t["pooling"]
        self.transformer = nn.Module()
        emb = nn.Module()
        emb.word_embeddings = nn.Embedding(t["vocab_size"], w)
        emb.position_embeddings = nn.Embedding(t["context_length"], w)
        emb.token_type_embeddings = nn.Embedding(t["type_vocab_size"], w)
        emb.LayerNorm = nn.LayerNorm(w, eps=t["ln_eps"])
        for e in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            nn.init.normal_(e.weight, std=0.02)
        self.transformer.embeddings = emb
        self.transformer.encoder = nn.Module()
        hidden = int(t["mlp_ratio"] * w)
        pre = t["norm"] == "pre"
        self.transformer.encoder.layer = nn.ModuleList(
            BertLayer(w, t["heads"], hidden, t["act"], t["ln_eps"], pre, t["causal"])
            for _ in range(t["layers"]))
        self.ln_final = nn.LayerNorm(w, eps=t["ln_eps"]) if pre else None
        ph = text_proj_hidden(cfg)
        self.proj = nn.Sequential(nn.Linear(w, ph, bias=False), nn.GELU(),
                                  nn.Linear(ph, cfg["embed_dim"], bias=False))
        nn.init.uniform_(self.proj[0].weight, -w ** -0.5, w ** -0.5)
        nn.init.uniform_(self.proj[2].weight, -ph ** -0.5, ph ** -0.5)
        self.checkpointing = False

    def forward(self, tokens, lengths):  # (B, L) int64, (B,) int64 -> (B, J)
        emb = self.transformer.embeddings
        b, l = tokens.shape
        x = (emb.word_embeddings(tokens) + emb.position_embeddings.weight[:l]
             + emb.token_type_embeddings.weight[0])
        x = emb.LayerNorm(x)
        key_mask = torch.arange(l, device=tokens.device)[None, :] < lengths[:, None]  # (B, L)
        for layer in self.transformer.encoder.layer:
            x = _run(layer, self.checkpointing, x, key_mask)
        if self.pooling == "cls":
            x = x[:, 0]
        else:
            x = x[torch.arange(b, device=x.device), lengths - 1]
        return self._head(x)

    def forward_packed(self, tokens, positions, packed: Packed):  # (T,), (T,) int64 -> (B, J)
        """The same tower on the valid tokens only, back to back: every op but attention is
        row-wise, so each caption gets what the padded batch gives it."""
        emb = self.transformer.embeddings
        x = (emb.word_embeddings(tokens) + emb.position_embeddings(positions)
             + emb.token_type_embeddings.weight[0])
        x = emb.LayerNorm(x)
        for layer in self.transformer.encoder.layer:
            x = _run(layer, self.checkpointing, x, packed)
        first = packed.cu[:-1].long()
        x = x[first] if self.pooling == "cls" else x[packed.cu[1:].long() - 1]
        return self._head(x)

    def _head(self, x):  # pooled (B, W) -> (B, J)
        if self.ln_final is not None:
            x = self.ln_final(x)
        return self.proj(x)


def _run(block, checkpointing: bool, *args):
    if checkpointing:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ClipStudent(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.visual = VisionTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg["logit_scale_init"])))


def decays(name: str, p: torch.Tensor) -> bool:
    """open_clip's weight-decay rule as `ParamInfo::decays` applies it."""
    return not (p.dim() < 2 or "bias" in name or "logit_scale" in name or ".ln_" in name
                or "LayerNorm" in name or "layer_norm" in name)


# ----------------------------------------------------------------------------- losses

def _ce_rows(logits, keep_cols):
    """Per-row CE against the diagonal over the columns in `keep_cols` (N,) bool. Dropped
    columns get a finite -1e9 (exp underflows to exactly 0 beside any kept column), so a row or
    a teacher slot with nothing kept stays finite and is removed by its zero weight, without a
    data-dependent branch (no host sync, compile-friendly)."""
    logits = logits.masked_fill(~keep_cols[None, :], -1e9)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device),
                           reduction="none")


def clip_task(i_hat, t_hat, s):
    logits = s.exp() * (i_hat @ t_hat.t())
    n = logits.shape[0]
    diag = torch.arange(n, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, diag) + F.cross_entropy(logits.t(), diag))


def distill_parts(i_hat, t_hat, s, u_img, u_txt, mask, train: dict, icl_log_c):
    """task, fd, icl of engine/src/loss/distill.rs on normalised student rows (N, D), targets
    (N, T, D) and mask (N, T) bool (T = 1 in random mode: the drawn teacher)."""
    n, tt, d = u_img.shape
    task = clip_task(i_hat, t_hat, s)
    if train["teacher_norm"] == "l2":
        u_img, u_txt = F.normalize(u_img, dim=-1), F.normalize(u_txt, dim=-1)
    counts = mask.sum(1).to(i_hat.dtype)  # (N,)
    mode = train["teacher_mode"]
    if mode == "mean":
        m = mask.to(i_hat.dtype)[..., None]
        u_img = ((u_img * m).sum(1) / counts[:, None])[:, None]
        u_txt = ((u_txt * m).sum(1) / counts[:, None])[:, None]
        if train["teacher_norm"] == "l2":
            u_img, u_txt = F.normalize(u_img, dim=-1), F.normalize(u_txt, dim=-1)
        mask = torch.ones(n, 1, dtype=torch.bool, device=mask.device)
        counts = torch.ones_like(counts)
    c = icl_log_c.exp() if icl_log_c is not None else train["icl_scale_value"]
    fd = i_hat.new_zeros(())
    icl = i_hat.new_zeros(())
    for k in range(u_img.shape[1]):
        keep = mask[:, k]
        w = keep.to(i_hat.dtype) / (counts * n)  # (N,)
        ui, ut = u_img[:, k], u_txt[:, k]
        fd = fd + (w * (((i_hat - ui) ** 2).sum(1) + ((t_hat - ut) ** 2).sum(1))).sum() / d
        ce1 = _ce_rows(c * (i_hat @ ut.t()), keep)
        ce2 = _ce_rows(c * (t_hat @ ui.t()), keep)
        # Rows without teacher k have weight 0 (their CE is large but finite).
        icl = icl + 0.5 * (w * (ce1 + ce2)).sum()
    return task, fd, icl


def loss_parts(model, images, text, stage, targets, train, icl_log_c):
    """`text`: (tokens (B, L), lengths (B,)) padded, or (tokens (T,), positions (T,), Packed)."""
    img = model.visual(images)
    txt = model.text.forward_packed(*text) if len(text) == 3 else model.text(*text)
    # The losses run in fp32 at least (the engine's run in f64 internally); parity runs in f64.
    # Outside autocast: under it the products below would run in bf16 whatever their inputs.
    with torch.autocast(img.device.type, enabled=False):
        return _losses(img, txt, model.logit_scale, stage, targets, train, icl_log_c)


def _losses(img, txt, logit_scale, stage, targets, train, icl_log_c):
    wide = torch.float64 if img.dtype == torch.float64 else torch.float32
    i_hat, t_hat = F.normalize(img.to(wide), dim=-1), F.normalize(txt.to(wide), dim=-1)
    s = logit_scale.to(wide)
    if stage == "clip":
        task = clip_task(i_hat, t_hat, s)
        zero = task.new_zeros(())
        return task, zero, zero, task
    u_img, u_txt, mask = targets
    task, fd, icl = distill_parts(i_hat, t_hat, s, u_img.to(wide), u_txt.to(wide), mask, train,
                                  icl_log_c)
    return task, fd, icl, task + train["fd_weight"] * fd + icl


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / span, 1.0))) * base


# ----------------------------------------------------------------------------- benchmark

def peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resolve_device(req: str) -> torch.device:
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {req}: this PyTorch sees no CUDA device")
        return torch.device(req)
    if req != "cpu":
        raise SystemExit(f"unknown device `{req}`: expected cpu, cuda, cuda:N or auto")
    return torch.device("cpu")


def make_optimizer(model, extra, train, dev):
    named = list(model.named_parameters()) + extra
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": train["weight_decay"]},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    kw = {"lr": train["lr"], "betas": (train["beta1"], train["beta2"]), "eps": train["eps"]}
    if dev.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw)


def bench(args) -> dict:
    model_cfg, train = load_configs(args.config, args.set + [f"train.batch_size={args.batch}"])
    dev = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = ClipStudent(model_cfg).to(dev)
    # The flag or the config's `train.checkpointing`, as `mmkd bench train` takes either.
    checkpointing = bool(args.checkpointing or train["checkpointing"])
    model.visual.checkpointing = model.text.checkpointing = checkpointing
    icl_log_c = None
    extra = []
    if args.stage == "kd" and train["icl_scale"] == "learned":
        icl_log_c = nn.Parameter(torch.tensor(math.log(train["icl_scale_value"]), device=dev))
        extra = [("icl_scale", icl_log_c)]
    elif train["icl_scale"] not in ("const", "learned"):
        raise SystemExit(f"train.icl_scale: `{train['icl_scale']}` is not `const` or `learned`")
    opt = make_optimizer(model, extra, train, dev)
    params = [p for g in opt.param_groups for p in g["params"]]

    b = args.batch
    packed = args.text_layout == "packed"
    v, t = model_cfg["vision"], model_cfg["text"]
    s, c, ctx, d = v["image_size"], v["channels"], t["context_length"], model_cfg["embed_dim"]
    # Raw synthetic data, built once: u8 images, full-context token rows, unit-norm targets.
    gen = torch.Generator().manual_seed(args.seed)
    images_u8 = torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=gen)
    tokens_all = torch.randint(0, t["vocab_size"], (b, ctx), generator=gen)
    tokens_all[:, 0] = 2 % t["vocab_size"]
    if dev.type == "cuda":
        images_u8, tokens_all = images_u8.pin_memory(), tokens_all.pin_memory()
    tt = args.teachers
    # The teacher targets stay on the host and travel with each batch, as they do in mmkd's
    # step (and in training, where they come from the shards with the images).
    t_img_h = F.normalize(torch.rand(b, tt, d, generator=gen) * 2 - 1, dim=-1)
    t_txt_h = F.normalize(torch.rand(b, tt, d, generator=gen) * 2 - 1, dim=-1)
    t_mask_h = torch.rand(b, tt, generator=gen) < 0.75
    none = ~t_mask_h.any(1)
    t_mask_h[none, torch.randint(0, tt, (int(none.sum()),), generator=gen)] = True
    if dev.type == "cuda":
        t_img_h, t_txt_h, t_mask_h = t_img_h.pin_memory(), t_txt_h.pin_memory(), t_mask_h.pin_memory()
    mean = torch.tensor(CLIP_MEAN * (c // 3 + 1), device=dev)[:c].view(1, c, 1, 1)
    std = torch.tensor(CLIP_STD * (c // 3 + 1), device=dev)[:c].view(1, c, 1, 1)
    median = args.caption_median if args.caption_median is not None else ctx / 4.0
    len_rng = SplitMix64(args.seed)

    def assemble(lengths):
        """The batch as the loader hands it over: normalised images, the captions (padded, or
        packed on the host from the lengths it knows), targets."""
        images = (images_u8.to(dev, non_blocking=True).float() / 255.0 - mean) / std
        if packed:
            layout = Packed(lengths, dev)
            tok, pos = pack_tokens(tokens_all, lengths)
            if dev.type == "cuda":
                tok, pos = tok.pin_memory(), pos.pin_memory()
            text = (tok.to(dev, non_blocking=True), pos.to(dev, non_blocking=True), layout)
        else:
            l = max(lengths)
            lens = torch.tensor(lengths, dtype=torch.int64).to(dev, non_blocking=True)
            tok = tokens_all[:, :l].to(dev, non_blocking=True)
            tok = tok.masked_fill(torch.arange(l, device=dev)[None, :] >= lens[:, None], 0)
            text = (tok, lens)
        targets = None
        if args.stage == "kd":
            t_img = t_img_h.to(dev, non_blocking=True)
            t_txt = t_txt_h.to(dev, non_blocking=True)
            t_mask = t_mask_h.to(dev, non_blocking=True)
            if train["teacher_mode"] == "random":
                # One available teacher per sample, drawn uniformly.
                pick = torch.rand(b, tt, device=dev).masked_fill(~t_mask, -1.0).argmax(1)
                idx = pick[:, None, None].expand(b, 1, d)
                targets = (t_img.gather(1, idx), t_txt.gather(1, idx),
                           torch.ones(b, 1, dtype=torch.bool, device=dev))
            else:
                targets = (t_img, t_txt, t_mask)
        return images, text, targets

    def forward(images, text, targets):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return loss_parts(model, images, text, args.stage, targets, train, icl_log_c)

    fwd = torch.compile(forward) if args.compile else forward
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(dev)

    total_steps = args.warmup + args.steps
    times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    flops = 0.0
    tokens, text_rows = 0, 0
    last = float("nan")
    act_max = 0
    for i in range(total_steps):
        timed = i >= args.warmup
        sync()
        t0 = time.perf_counter()
        lengths = caption_lengths(len_rng, b, median, args.caption_sigma, ctx)
        batch = assemble(lengths)
        if args.compile:
            # The padded caption length (or the packed token count) changes every step: compile
            # it as a symbolic size once instead of recompiling for each new length. "maybe": a
            # guard the compiler adds on the length (SDPA kernels may want a multiple of 8) then
            # specialises instead of failing, as mark_dynamic would.
            mark = getattr(torch._dynamo, "maybe_mark_dynamic", torch._dynamo.mark_dynamic)
            text = batch[1]
            if packed:
                mark(text[0], 0)
                mark(text[1], 0)
                mark(text[2].rows, 0)
                mark(text[2].key_mask, 1)
            else:
                mark(text[0], 1)
        sync()
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        t1 = time.perf_counter()
        task, fd, icl, total = fwd(*batch)
        sync()
        t2 = time.perf_counter()
        if dev.type == "cuda" and timed:
            # What the forward keeps for backward (synchronised above: outside the timing).
            act_max = max(act_max, torch.cuda.memory_allocated(dev) - before)
            t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total.backward()
        sync()
        t3 = time.perf_counter()
        gnorm = torch.nn.utils.clip_grad_norm_(params, train["grad_clip"]) \
            if train["grad_clip"] > 0 else torch.zeros((), device=dev)
        if not (torch.isfinite(total) and torch.isfinite(gnorm)):
            raise SystemExit(f"non-finite loss or gradient at benchmark step {i + 1}: "
                             f"total {float(total)}, grad norm {float(gnorm)}")
        for g in opt.param_groups:
            g["lr"] = cosine_lr(i, train["lr"], train["warmup"], total_steps)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
        sync()
        t4 = time.perf_counter()
        last = float(total.detach())
        if timed:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k] += dt
            flops += sum(flops_per_sample(model_cfg, n) for n in lengths)
            tokens += sum(lengths)
            text_rows += sum(lengths) if packed else b * max(lengths)
        print(f"{'timed' if timed else 'warm-up'} step {i + 1}/{total_steps}: "
              f"{(t4 - t0) * 1e3:.1f} ms, loss {last:.4f}", file=sys.stderr)

    steps = args.steps
    total_s = sum(times.values())
    achieved = flops / total_s
    peak = args.peak_tflops
    if peak is None and dev.type == "cuda":
        peak = H200_BF16_PEAK_TFLOPS
    device_used = None
    if dev.type == "cuda":
        # The allocator's peak of live tensors (the context left out, as in mmkd's figure),
        # and the whole device's use at the end, context and allocator cache included.
        peak_mem = torch.cuda.max_memory_allocated(dev)
        free, total = torch.cuda.mem_get_info(dev)
        device_used = total - free
        device_name = f"cuda:{dev.index or 0}"
    else:
        peak_mem = peak_rss_bytes()
        device_name = "cpu"
    return {
        "engine": "torch-compile" if args.compile else "torch-eager",
        "device": device_name,
        "config": args.config,
        "stage": args.stage,
        "batch": b,
        "steps": steps,
        "warmup": args.warmup,
        "samples_per_s": b * steps / total_s,
        "ms_per_step": {**{k: v / steps * 1e3 for k, v in times.items()},
                        "total": total_s / steps * 1e3},
        "peak_mem_bytes": peak_mem,
        "device_used_bytes": device_used,
        "flops_per_sample": flops / (b * steps),
        "activation_bytes_per_sample": act_max / b if dev.type == "cuda" else None,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "text_tokens_per_sample": tokens / (b * steps),
        "text_rows_per_sample": text_rows / (b * steps),
        "text_layout": args.text_layout,
        "teacher_mode": train["teacher_mode"],
        "checkpointing": checkpointing,
        "last_loss": last,
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- parity

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "U8": torch.uint8, "BOOL": torch.bool}


def load_file(path: str) -> dict:
    """Reads a safetensors file (8-byte little-endian header size, JSON header, raw data)
    without the safetensors package, so the GPU machine needs nothing beyond torch."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise SystemExit(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise SystemExit(f"{path}: bad safetensors header: {e}") from e
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise SystemExit(f"{path}: tensor `{name}` has unsupported dtype {meta['dtype']}")
        lo, hi = meta["data_offsets"]
        raw = bytearray(data[base + lo:base + hi])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(meta["shape"])
    return out


def parity(args) -> dict:
    """The loss of mmkd's weights on a saved batch, for comparison with the engine's."""
    model_cfg, train = load_configs(args.config, args.set)
    model = ClipStudent(model_cfg)
    weights = load_file(args.parity_weights)
    icl_log_c = None
    if "icl_scale" in weights:
        icl_log_c = weights.pop("icl_scale").float()
    missing, unexpected = model.load_state_dict(
        {k: w.float() for k, w in weights.items()}, strict=False)
    if missing or unexpected:
        raise SystemExit(f"{args.parity_weights}: missing {missing}, unexpected {unexpected}")
    batch = load_file(args.parity_batch)
    images = batch["images"].float()
    tokens = batch["tokens"].long()
    lengths = batch["lengths"].long()
    targets = None
    if args.stage == "kd":
        targets = (batch["teacher_image"].float(), batch["teacher_text"].float(),
                   batch["teacher_mask"].bool())
    text = (tokens, lengths)
    if args.text_layout == "packed":
        lens = lengths.tolist()
        text = (*pack_tokens(tokens, lens), Packed(lens, torch.device("cpu")))
    with torch.no_grad():
        model.double()
        task, fd, icl, total = loss_parts(
            model, images.double(), text, args.stage,
            None if targets is None else (targets[0].double(), targets[1].double(), targets[2]),
            train, None if icl_log_c is None else icl_log_c.double())
    return {"task": float(task), "fd": float(fd), "icl": float(icl), "total": float(total)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=["clip", "kd"], required=True)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--teachers", type=int, default=8)
    ap.add_argument("--caption-median", type=float)
    ap.add_argument("--caption-sigma", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    ap.add_argument("--text-layout", choices=["padded", "packed"], default="padded",
                    help="captions padded to the batch's longest (the default), or their valid "
                         "tokens back to back as mmkd runs them (variable-length attention)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--parity-weights")
    ap.add_argument("--parity-batch")
    args = ap.parse_args(argv)
    if args.parity_weights or args.parity_batch:
        if not (args.parity_weights and args.parity_batch):
            ap.error("--parity-weights and --parity-batch go together")
        out = parity(args)
    else:
        if not args.batch or not args.steps or args.batch < 1 or args.steps < 1:
            ap.error("--batch and --steps must be at least 1")
        if args.teachers < 1:
            ap.error("--teachers must be at least 1")
        if args.peak_tflops is not None and not args.peak_tflops > 0:
            ap.error("--peak-tflops must be positive")
        out = bench(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
