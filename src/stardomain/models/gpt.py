"""Small transformers, for studying permutation symmetry in the architectures language models use, on
data sets that fit a laptop: a language model over token ids, or a reader of images as token sequences.

An image is average-pooled to a `grid` x `grid` map per channel and each value quantised to one of
`levels` tokens (fixed bin edges on normalised data), giving C * grid**2 tokens.

- `gpt`: a decoder (causal, pre-norm, fused q/k/v projection split with .split, scaled dot-product
  attention). On next-token data (token ids of shape (T,)) it is a language model predicting the next
  token at every position. On images it reads the pixel tokens and predicts the next token, which is
  the class: the vocabulary holds the pixel levels and one token per class, the output head is tied to the token
  embedding, and the model returns the logits of the class tokens. Options: rotary embeddings
  instead of learned positions, grouped-query attention (kv_heads < heads), RMSNorm, SwiGLU.
- `bert`: an encoder (bidirectional, post-norm, separate q/k/v, a class token, a tanh pooler).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * weight, written out (as LLaMA-style code does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return RMSNorm(dim)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Tokens(nn.Module):
    """Image -> (B, C * grid**2) token ids in [0, levels)."""

    def __init__(self, grid: int, levels: int):
        super().__init__()
        self.grid = grid
        self.register_buffer("edges", torch.linspace(-2.0, 2.0, levels - 1), persistent=False)

    def forward(self, x):
        return torch.bucketize(F.adaptive_avg_pool2d(x, self.grid).flatten(1).contiguous(), self.edges)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rope = heads, kv_heads, dim // heads, rope
        self.c_attn = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        d = self.head_dim
        q, k, v = self.c_attn(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=2)
        q = q.view(B, T, self.heads, d).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, d).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, d).transpose(1, 2)
        if self.rope:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, kind: str):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {kind!r}")
        self.kind = kind
        self.c_fc = nn.Linear(dim, hidden)
        self.c_gate = nn.Linear(dim, hidden) if kind == "swiglu" else None
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        if self.c_gate is not None:
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, norm, mlp, rope):
        super().__init__()
        self.ln_1 = _norm(norm, dim)
        self.attn = CausalSelfAttention(dim, heads, kv_heads, rope)
        self.ln_2 = _norm(norm, dim)
        self.mlp = MLP(dim, hidden, mlp)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class GPTShape:
    """The decoder's architecture (the `gpt` model's kwargs): width, depth, heads (kv_heads < heads:
    grouped-query attention), MLP ratio, the pixel tokens on images (grid, levels), rotary positions,
    norm ("layer" or "rms") and MLP ("gelu" or "swiglu")."""

    dim: int = 32
    depth: int = 2
    heads: int = 4
    kv_heads: int | None = None
    mlp_ratio: int = 2
    grid: int = 4
    levels: int = 16
    rope: bool = False
    norm: str = "layer"
    mlp: str = "gelu"


class GPT(nn.Module):
    def __init__(self, in_shape, num_classes, shape: GPTShape):
        super().__init__()
        dim, depth, heads, mlp_ratio, rope = shape.dim, shape.depth, shape.heads, shape.mlp_ratio, shape.rope
        grid, levels, norm, mlp = shape.grid, shape.levels, shape.norm, shape.mlp
        kv_heads = shape.kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}, and heads by kv_heads {kv_heads}")
        if rope and (dim // heads) % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {dim // heads}")
        if len(in_shape) == 1:  # next-token data: the input is T token ids, the vocabulary num_classes ids
            self.levels, self.tokens, n, vocab = 0, None, in_shape[0], num_classes
        else:
            self.levels, self.tokens, n = levels, Tokens(grid, levels), in_shape[0] * grid * grid
            vocab = levels + num_classes
        self.num_classes = num_classes
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = None if rope else nn.Embedding(n, dim)
        self.h = nn.ModuleList([Block(dim, heads, kv_heads, mlp_ratio * dim, norm, mlp, rope) for _ in range(depth)])
        self.ln_f = _norm(norm, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        hd = dim // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(n).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, x):
        idx = x if self.tokens is None else self.tokens(x)
        T = idx.size(1)
        h = self.wte(idx)
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:  # T is always the context (or the image's token count): the tables fit it exactly
            h = block(h, self.cos, self.sin)
        if self.tokens is None:
            return self.lm_head(self.ln_f(h))  # (B, T, vocab): the next token at every position
        logits = self.lm_head(self.ln_f(h[:, -1]))  # the next token after the image
        return logits[:, self.levels:]  # ... is the class


def gpt(in_shape, num_classes, **shape) -> nn.Module:
    """GPT-style decoder; tied embedding/head; kv_heads < heads: grouped-query attention. On next-token data
    (in_shape (T,), num_classes the vocabulary) a language model returning (B, T, vocab) logits; on images,
    a reader of C * grid**2 pixel tokens (MNIST, grid 4: 16 tokens) predicting the class as the next token.
    kwargs: the fields of `GPTShape` (an unknown one is a TypeError, as for any function)."""
    return GPT(in_shape, num_classes, GPTShape(**shape))


# What `inspect.signature(gpt)` shows (the registry's kwargs checks and docs read it): GPTShape's fields.
gpt.__signature__ = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("in_shape", "num_classes")]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields(GPTShape)])


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim)

    def split(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).permute(0, 2, 1, 3)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // self.heads), dim=-1)
        ctx = (a @ v).permute(0, 2, 1, 3).reshape(B, T, C)
        x = self.attn_norm(x + self.attn_out(ctx))  # post-norm
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class Bert(nn.Module):
    def __init__(self, in_shape, num_classes, dim, depth, heads, mlp_ratio, grid, levels):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.tokens = Tokens(grid, levels)
        n = in_shape[0] * grid * grid + 1
        self.word_embeddings = nn.Embedding(levels + 1, dim)  # the last token id is [CLS]
        self.position_embeddings = nn.Embedding(n, dim)
        self.LayerNorm = nn.LayerNorm(dim)
        self.layer = nn.ModuleList([BertLayer(dim, heads, mlp_ratio * dim) for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.cls_id = levels

    def forward(self, x):
        idx = self.tokens(x)
        idx = torch.cat([torch.full_like(idx[:, :1], self.cls_id), idx], dim=1)
        h = self.word_embeddings(idx) + self.position_embeddings(torch.arange(idx.size(1), device=idx.device))
        h = self.LayerNorm(h)
        for layer in self.layer:
            h = layer(h)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


def bert(in_shape, num_classes, dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, grid: int = 4,
         levels: int = 16) -> nn.Module:
    """BERT-style encoder over a [CLS] token and C * grid**2 pixel tokens; post-norm; tanh pooler."""
    return Bert(in_shape, num_classes, dim, depth, heads, mlp_ratio, grid, levels)
