"""Weight-space arithmetic on state dicts, and BatchNorm recalibration.

Only floating-point entries are interpolated; integer buffers (BatchNorm's num_batches_tracked) are
taken from the first model. An interpolated network's BatchNorm statistics are wrong, so callers
recompute them with `recalibrate_bn` on training data (PAPER.md, "BatchNorm").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .data import Split, batches

StateDict = dict[str, torch.Tensor]


def lerp(a: StateDict, b: StateDict, t: float) -> StateDict:
    """(1 - t)·a + t·b, entry by entry."""
    if a.keys() != b.keys():
        raise ValueError("state dicts have different keys")
    return {k: torch.lerp(a[k], b[k].to(a[k].device), t) if a[k].is_floating_point() else a[k].clone()
            for k in a}


def average(sds: Sequence[StateDict], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted average of state dicts (uniform by default)."""
    w = [1.0 / len(sds)] * len(sds) if weights is None else [float(x) for x in weights]
    out = {}
    for k, v in sds[0].items():
        out[k] = sum(wi * sd[k] for wi, sd in zip(w, sds)) if v.is_floating_point() else v.clone()
    return out


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_bn(model: nn.Module) -> bool:
    return bool(bn_layers(model))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batch_size: int = 1000, max_batches: int | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Reset BatchNorm running statistics and recompute them as the average over training batches
    (train-mode forward passes, no gradient). No-op for networks without BatchNorm. Leaves eval mode."""
    layers = bn_layers(model)
    if not layers:
        return model.eval()
    device = device or next(model.parameters()).device
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    model.train()
    for x, _ in batches(split, batch_size, device=device, max_batches=max_batches):
        model(x)
    for m, mom in zip(layers, saved):
        m.momentum = mom
    return model.eval()
