"""The registered architectures: plain nn.Modules built from standard layers, so permutation specs
can be derived from a trace with no hand-written code."""

from __future__ import annotations

import torch
import torch.nn as nn

NORMS = ("bn", "ln", "gn", "none")


def pos_int(name: str, v, hi: int = 2**20) -> int:
    """A size a user wrote: a whole number in [1, hi] (0 would build a network with no units)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ValueError(f"{name} must be a whole number from 1 to {hi:,} (got {v!r})")
    return v


def pos_float(name: str, v, hi: float = 1024.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= hi:
        raise ValueError(f"{name} must be a number in (0, {hi:g}] (got {v!r})")
    return float(v)


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false (got {v!r})")
    return v


def norm_kind(v) -> str:
    if v not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)} (got {v!r})")
    return v


def image_shape(in_shape, model: str) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise ValueError(f"{model} needs images of shape (C, H, W); this data has inputs of shape {tuple(in_shape)}")
    return tuple(in_shape)


def _norm2d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "ln":  # LayerNorm over (C, H, W) with a per-channel affine
        return nn.GroupNorm(1, c)
    if kind == "gn":
        return nn.GroupNorm(min(32, c) if c % min(32, c) == 0 else 1, c)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of bn, ln, gn, none (got {kind!r})")


def mlp(in_shape, num_classes, width: int = 16, depth: int = 1, bn: bool = False) -> nn.Module:
    """`depth` hidden layers of `width` units with ReLU (the paper's MNIST MLP: depth 1, width 16)."""
    width, depth, bn = pos_int("width", width), pos_int("depth", depth, 1000), flag("bn", bn)
    d_in = 1
    for s in in_shape:
        d_in *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d_in, width)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def cnn(in_shape, num_classes, widths=(32, 64, 128, 256), norm: str = "bn") -> nn.Module:
    """Small VGG-style network: (Conv3x3-Norm-ReLU-MaxPool) per width, flatten, linear head."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= 64:
        raise ValueError(f"widths must be a list of 1 to 64 channel counts (got {widths!r})")
    widths = [pos_int("each of widths", v) for v in widths]
    norm = norm_kind(norm)
    c, h, w = image_shape(in_shape, "cnn")
    layers: list[nn.Module] = []
    for cw in widths:
        layers += [nn.Conv2d(c, cw, 3, padding=1, bias=norm == "none"), _norm2d(norm, cw), nn.ReLU(),
                   nn.MaxPool2d(2, ceil_mode=True)]
        c, h, w = cw, -(-h // 2), -(-w // 2)
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm2d(norm, c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_ch, num_classes, stage_widths, blocks, norm):
        super().__init__()
        c = stage_widths[0]
        self.conv1 = nn.Conv2d(in_ch, c, 3, 1, 1, bias=False)
        self.bn1 = _norm2d(norm, c)
        stages = []
        for i, (cw, nb) in enumerate(zip(stage_widths, blocks)):
            layers = []
            for j in range(nb):
                layers.append(BasicBlock(c, cw, 2 if (i > 0 and j == 0) else 1, norm))
                c = cw
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(x)


def resnet(in_shape, num_classes, depth: int = 20, width: float = 1, norm: str = "bn") -> nn.Module:
    """CIFAR-style ResNet: depth 6n+2 (20, 32, 56: widths 16/32/64) or 18 (64..512, [2,2,2,2])."""
    depth, width, norm = pos_int("depth", depth, 2000), pos_float("width", width), norm_kind(norm)
    image_shape(in_shape, "resnet")
    if depth == 18:
        widths, blocks = [64, 128, 256, 512], [2, 2, 2, 2]
    elif (depth - 2) % 6 == 0 and depth >= 8:
        n = (depth - 2) // 6
        widths, blocks = [16, 32, 64], [n, n, n]
    else:
        raise ValueError(f"depth must be 18 or 6n+2 (20, 32, 44, 56), got {depth}")
    return ResNet(in_shape[0], num_classes, [max(1, int(round(w * width))) for w in widths], blocks, norm)


_VGG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def vgg(in_shape, num_classes, depth: int = 11, bn: bool = False, width: float = 1) -> nn.Module:
    """VGG-11/13/16/19 for small images (ceil-mode pooling keeps 28x28 inputs valid)."""
    if isinstance(depth, bool) or depth not in _VGG:
        raise ValueError(f"depth must be one of {sorted(_VGG)}, got {depth!r}")
    bn, width = flag("bn", bn), pos_float("width", width)
    c, h, w = image_shape(in_shape, "vgg")
    layers: list[nn.Module] = []
    for v in _VGG[depth]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = -(-h // 2), -(-w // 2)
        else:
            cw = max(1, int(round(v * width)))
            layers += [nn.Conv2d(c, cw, 3, padding=1)] + ([nn.BatchNorm2d(cw)] if bn else []) + [nn.ReLU()]
            c = cw
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


class WideBlock(nn.Module):
    """Pre-activation wide residual block."""

    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.bn1 = _norm2d(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wrn(in_shape, num_classes, depth: int = 22, width_factor: int = 2, norm: str = "bn") -> nn.Module:
    """WideResNet-depth-k (depth = 6n+4)."""
    depth, width_factor, norm = pos_int("depth", depth, 2000), pos_int("width_factor", width_factor, 1024), norm_kind(norm)
    image_shape(in_shape, "wrn")
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40), got {depth}")
    n = (depth - 4) // 6
    widths = [16 * width_factor, 32 * width_factor, 64 * width_factor]
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)]
    c = 16
    for i, cw in enumerate(widths):
        for j in range(n):
            layers.append(WideBlock(c, cw, 2 if (i > 0 and j == 0) else 1, norm))
            c = cw
    layers += [_norm2d(norm, c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


def densenet(in_shape, num_classes, depth: int = 40, growth: int = 12) -> nn.Module:
    """DenseNet-40-12 style: 3 dense blocks of (depth-4)/3 BN-ReLU-Conv layers, no bottleneck."""
    depth, growth = pos_int("depth", depth, 2000), pos_int("growth", growth, 4096)
    image_shape(in_shape, "densenet")
    if (depth - 4) % 3 or depth < 7:
        raise ValueError(f"depth must be 3n+4 (40, 100), got {depth}")
    n = (depth - 4) // 3
    c = 2 * growth
    layers: list[nn.Module] = [nn.Conv2d(in_shape[0], c, 3, 1, 1, bias=False)]
    for b in range(3):
        for _ in range(n):
            layers.append(DenseLayer(c, growth))
            c += growth
        if b < 2:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(2, ceil_mode=True)]
    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)
