"""Alignment coverage: how much of each architecture the permutation spec can permute.

For the zoo's models and small stand-ins written here in the shapes of third-party architectures (RegNetY,
ResNeXt, DPN, PNASNet (cells A and B), MobileNetV2, ShuffleNetV2, the AG-News TextCNN, an LSTM classifier (also as torch.export sees it),
a GRU cell loop, timm's ViT attention; nothing is downloaded), prints the spec's permutable share
(spec.permutable_fraction(): the permuted share of the parameter axes that carry hidden units), the share of
parameters in a tensor with at least one permuted axis, the number of groups, the distinct reasons for what
stays pinned, the seconds to derive the spec (one run, after a warm-up), the seconds weight matching takes
on an independent pair (the model against a second initialisation of its architecture), and whether it finds
a planted permutation: a seeded random legal permutation of the model's own weights, matched back against
the original (yes: the permutation's inverse exactly, distance 0; else the distance left, relative to the
distance before).

    .venv/bin/python benchmarks/align_coverage.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from stardomain.models import build_model
from stardomain.permute import (apply_permutation, distance, inverse, random_permutation, spec_from_model,
                                weight_matching)


def _cbr(i, o, k=1, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(i, o, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 (-> squeeze-excitation) -> 1x1, residual (ResNeXt; RegNetY with se=True)."""

    def __init__(self, c, width, groups, se=False):
        super().__init__()
        self.a, self.b = _cbr(c, width), _cbr(width, width, 3, groups)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width // 4, 1), nn.ReLU(),
                                nn.Conv2d(width // 4, width, 1), nn.Sigmoid()) if se else None
        self.c = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.b(self.a(x))
        if self.se is not None:
            h = h * self.se(h)
        return F.relu(x + self.c(h))


class DualPath(nn.Module):
    """DPN: a grouped bottleneck whose output is split into a residual part (added) and a dense part
    (concatenated)."""

    def __init__(self, c, dense, width, groups):
        super().__init__()
        self.c, self.dense = c, dense
        self.a, self.b = _cbr(c + dense, width), _cbr(width, width, 3, groups)
        self.out = nn.Sequential(nn.Conv2d(width, c + dense, 1, bias=False), nn.BatchNorm2d(c + dense))

    def forward(self, x):
        h = self.out(self.b(self.a(x)))
        return F.relu(torch.cat([x[:, :self.c] + h[:, :self.c], x[:, self.c:] + h[:, self.c:]], 1))


class SepConv(nn.Module):
    """PNASNet's separable convolution: a grouped convolution with one input channel per group."""

    def __init__(self, i, o):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(i, o, 3, 1, 1, groups=i, bias=False), nn.BatchNorm2d(o)

    def forward(self, x):
        return self.bn(self.conv(x))


class PnasCell(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.sep = SepConv(c, c * 2)
        self.proj = nn.Conv2d(c, c * 2, 1, bias=False)

    def forward(self, x):
        return F.relu(self.sep(x) + F.max_pool2d(self.proj(x), 3, 1, 1))


class PnasCellB(nn.Module):
    """PNASNet's cell B at a reduction: three separable convolutions of the input (multiplier 2) and a 1x1
    shortcut, summed in pairs, concatenated, reduced by a 1x1 convolution."""

    def __init__(self, c):
        super().__init__()
        self.s1, self.s2, self.s3 = SepConv(c, 2 * c), SepConv(c, 2 * c), SepConv(c, 2 * c)
        self.proj = _cbr(c, 2 * c)
        self.reduce = _cbr(4 * c, 2 * c)

    def forward(self, x):
        b1 = F.relu(self.s1(x) + self.s2(x))
        b2 = F.relu(self.proj(F.max_pool2d(x, 3, 1, 1)) + self.s3(x))
        return self.reduce(torch.cat([b1, b2], 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, depthwise 3x3, 1x1 projection, residual."""

    def __init__(self, c, expand):
        super().__init__()
        self.body = nn.Sequential(_cbr(c, c * expand), _cbr(c * expand, c * expand, 3, c * expand),
                                  nn.Conv2d(c * expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split the channels, transform one half, concatenate, shuffle."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(_cbr(h, h), nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    _cbr(h, h))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, hh, ww = y.shape
        return y.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


class ShuffleDown(nn.Module):
    """ShuffleNetV2's reducing unit: two branches of the whole input (depthwise then 1x1; 1x1, depthwise,
    1x1), concatenated, shuffled."""

    def __init__(self, i, o):
        super().__init__()
        h = o // 2
        self.left = nn.Sequential(nn.Conv2d(i, i, 3, 2, 1, groups=i, bias=False), nn.BatchNorm2d(i), _cbr(i, h))
        self.right = nn.Sequential(_cbr(i, h), nn.Conv2d(h, h, 3, 2, 1, groups=h, bias=False), nn.BatchNorm2d(h),
                                   _cbr(h, h))

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        n, c, hh, ww = y.shape
        return y.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)


def shufflenet_v2(widths=(116, 232, 464), units=(4, 8, 4)):
    """ShuffleNetV2 x1.0 at full size: stem 24, three stages of a reducing unit then stride-1 units, 1024."""
    blocks, c = [], 24
    for w, k in zip(widths, units):
        blocks += [ShuffleDown(c, w)] + [ShuffleUnit(w) for _ in range(k - 1)]
        c = w
    return Net(24, blocks + [_cbr(c, 1024)], 1024)


class Net(nn.Module):
    def __init__(self, stem, blocks, c, classes=10):
        super().__init__()
        self.stem, self.blocks, self.fc = _cbr(3, stem, 3), nn.Sequential(*blocks), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class TextCNN(nn.Module):
    def __init__(self, vocab=1000, dim=64, filters=32, kernels=(3, 4, 5), classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList(nn.Conv2d(1, filters, (k, dim)) for k in kernels)
        self.fc = nn.Linear(filters * len(kernels), classes)

    def forward(self, ids):
        x = self.embed(ids).unsqueeze(1)
        hs = [F.relu(c(x)).squeeze(3) for c in self.convs]
        return self.fc(torch.cat([F.max_pool1d(h, h.size(2)).squeeze(2) for h in hs], 1))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=1000, dim=64, hidden=64, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.fc(out[:, -1])


class LSTMExported(LSTMClassifier):
    """The LSTM classifier where only torch.export captures it (a size read off the input): nn.LSTM appears as
    aten.lstm, its weights a flat list."""

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids) + torch.zeros(ids.shape[0], 1, 1))
        return self.fc(out[:, -1])


class GRUCellLoop(nn.Module):
    """A GRU written as a loop over time with nn.GRUCell (the graph unrolls the loop)."""

    def __init__(self, vocab=1000, dim=64, hidden=64, steps=40, classes=4):
        super().__init__()
        self.hidden, self.steps = hidden, steps
        self.embed, self.cell, self.fc = nn.Embedding(vocab, dim), nn.GRUCell(dim, hidden), nn.Linear(hidden, classes)

    def forward(self, ids):
        x, h = self.embed(ids), ids.new_zeros(ids.shape[0], self.hidden, dtype=torch.float)
        for i in range(self.steps):
            h = self.cell(x[:, i], h)
        return self.fc(h)


class TimmAttention(nn.Module):
    """timm's Attention: fused qkv Linear, reshape to heads, permute, unbind, LayerNorm over each head's
    units (qk_norm), F.scaled_dot_product_attention, heads transposed back, output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.hd), nn.LayerNorm(self.hd)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), TimmAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm's VisionTransformer in miniature (patch embedding, class token, qk_norm blocks)."""

    def __init__(self, dim=64, heads=4, depth=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls, self.pos = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 17, dim))
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _zoo(name, **kw):
    return lambda: (build_model({"name": name, "kwargs": kw}, (3, 32, 32), 10), torch.randn(2, 3, 32, 32))


IMG = torch.randn(2, 3, 32, 32)
TOKENS = torch.randint(0, 1000, (2, 40))
CASES = {
    "zoo ResNet-20": _zoo("resnet", depth=20),
    "zoo VGG-11": _zoo("vgg", depth=11, bn=True),
    "zoo DenseNet-40": _zoo("densenet", depth=40),
    "zoo ViT": lambda: (build_model({"name": "vit", "kwargs": {}}, (1, 28, 28), 10), torch.randn(2, 1, 28, 28)),
    "zoo GPT (GQA, rotary, SwiGLU)": lambda: (build_model(
        {"name": "gpt", "kwargs": {"kv_heads": 2, "rope": True, "mlp": "swiglu", "norm": "rms"}}, (1, 28, 28), 10),
        torch.randn(2, 1, 28, 28)),
    "ResNeXt-shaped (2 groups)": lambda: (Net(32, [Bottleneck(32, 64, 2) for _ in range(3)], 32), IMG),
    "ResNeXt-shaped (32 groups of 8)": lambda: (Net(64, [Bottleneck(64, 256, 32) for _ in range(3)], 64), IMG),
    "RegNetY-shaped (group width 8, SE)": lambda: (Net(32, [Bottleneck(32, 48, 6, se=True) for _ in range(3)], 32),
                                                   IMG),
    "RegNetY-shaped (13, 26, 55 groups of 8, SE)": lambda: (Net(48, [Bottleneck(48, 8 * g, g, se=True)
                                                                       for g in (13, 26, 55)], 48), IMG),
    "DPN-shaped (dual path)": lambda: (Net(40, [DualPath(32, 8, 32, 4) for _ in range(2)], 40), IMG),
    "PNASNet-shaped (separable cells)": lambda: (Net(16, [PnasCell(16), PnasCell(32)], 64), IMG),
    "PNASNet-shaped (cell B: three separable branches, concatenated)": lambda: (Net(16, [PnasCellB(16)], 32), IMG),
    "MobileNetV2-shaped (depthwise-separable, inverted residuals)": lambda: (
        Net(16, [InvertedResidual(16, 6) for _ in range(3)], 16), IMG),
    "ShuffleNetV2-shaped (split, shuffle)": lambda: (Net(32, [ShuffleUnit(32) for _ in range(3)], 32), IMG),
    "ShuffleNetV2 x1.0-shaped, full size (116/232/464 channels, 4/8/4 units)": lambda: (shufflenet_v2(), IMG),
    "TextCNN (AG-News-shaped)": lambda: (TextCNN(), TOKENS),
    "LSTM classifier (2 layers, bidirectional)": lambda: (LSTMClassifier(), TOKENS),
    "LSTM classifier, torch.export only (aten.lstm)": lambda: (LSTMExported(), TOKENS),
    "GRU cell loop (nn.GRUCell over 40 steps)": lambda: (GRUCellLoop(), TOKENS),
    "timm-shaped ViT (fused qkv, qk_norm, SDPA)": lambda: (TimmViT(), IMG),
}


def _touched(spec) -> float:
    """Share of parameters (elements) in a tensor with at least one permuted axis."""
    params = set(spec.parameters)
    size = {t: torch.Size(spec.shapes[t]).numel() for t in params}
    touched = {m.tensor for g in spec.groups.values() for m in g.members} & params
    return sum(size[t] for t in touched) / max(1, sum(size.values()))


def _planted(spec, model) -> str:
    """Weight matching of a randomly permuted copy back onto the model: 'yes' if it returns the inverse."""
    if not spec.groups:
        return "-"
    sd = model.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(1))
    sp = apply_permutation(spec, sd, p)
    q, _ = weight_matching(spec, sd, sp)
    if all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups):
        return "yes"
    before = distance(sd, sp, spec.parameters)
    return f"no ({distance(sd, apply_permutation(spec, sp, q), spec.parameters) / max(before, 1e-30):.2f})"


def main() -> None:
    torch.manual_seed(0)
    print("| model | parameters | permutable share | parameters touched | groups | seconds | matching s | "
          "planted found | pinned because |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name, make in CASES.items():
        model, x = make()
        model.eval()
        spec_from_model(model, x)  # warm-up
        t0 = time.perf_counter()
        spec = spec_from_model(model, x)
        secs = time.perf_counter() - t0
        other = make()[0].state_dict()
        t0 = time.perf_counter()
        weight_matching(spec, model.state_dict(), other)
        match_secs = time.perf_counter() - t0
        reasons = sorted({r.split(" (at ")[0] for u in spec.unpermuted for r in u.reason.split("; ")
                          if not r.startswith(("model output", "model input"))})
        n = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {n:,} | {100 * spec.permutable_fraction():.1f}% | {100 * _touched(spec):.1f}% | "
              f"{len(spec.groups)} | {secs:.2f} | {match_secs:.2f} | {_planted(spec, model)} | "
              f"{'; '.join(reasons)[:240] or '-'} |")


if __name__ == "__main__":
    main()
