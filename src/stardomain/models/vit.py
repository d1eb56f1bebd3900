"""A small Vision Transformer (patch embedding, pre-norm encoder blocks with nn.MultiheadAttention,
class token, learned positions) for MNIST-sized studies of permutation symmetry in attention."""

from __future__ import annotations

import torch
import torch.nn as nn


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, in_shape, num_classes, patch: int, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        c, h, w = in_shape
        if h % patch or w % patch:
            raise ValueError(f"patch {patch} must divide the image size {h}x{w}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.patch = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (h // patch) * (w // patch) + 1, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1) + self.pos
        x = self.ln(self.blocks(x))
        return self.head(x[:, 0])


def vit(in_shape, num_classes, patch: int = 7, dim: int = 64, depth: int = 2, heads: int = 4,
        mlp_dim: int = 128) -> nn.Module:
    """ViT for small images: (H/patch)*(W/patch) tokens plus a class token (MNIST: patch 7 -> 16 tokens)."""
    from .zoo import image_shape, pos_int

    image_shape(in_shape, "vit")
    patch, dim, heads, mlp_dim = (pos_int(k, v) for k, v in (("patch", patch), ("dim", dim), ("heads", heads),
                                                              ("mlp_dim", mlp_dim)))
    depth = pos_int("depth", depth, 1000)
    return ViT(in_shape, num_classes, patch, dim, depth, heads, mlp_dim)
