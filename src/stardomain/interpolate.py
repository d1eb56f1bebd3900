"""Weight-space arithmetic on state dicts, and BatchNorm recalibration of one model (the K = 1 case of
the stacked-weights engine, `stardomain.engine`, which interpolates and recalibrates many at once).

Only floating-point entries are interpolated; integer buffers (BatchNorm's num_batches_tracked) are
taken from the first model. An interpolated network's BatchNorm statistics are wrong, so callers
recompute them with `recalibrate_bn` on training data (docs/method.md, "BatchNorm along a path").
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .data import Split
from .engine import bn_layers, has_bn, module_bn_statistics  # noqa: F401 (has_bn: part of this API)

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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batch_size: int = 1000, max_batches: int | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """Reset BatchNorm running statistics and recompute them as the average over training batches of the
    batch mean and unbiased batch variance, every batch normalised by its own statistics as in a train-mode
    pass (PyTorch's momentum=None cumulative mode; docs/method.md, "BatchNorm along a path"). No-op for networks without BN.
    The stacked-weights engine's convention (`engine.module_bn_statistics`), for one model in place.
    Leaves the model contiguous, in eval mode."""
    layers = [m for m in bn_layers(model) if m.track_running_stats]
    if not layers:
        return model.eval()
    stats, seen = module_bn_statistics(model, split, batch_size, max_batches, device)
    for j, m in enumerate(layers):
        m.running_mean.copy_(stats[2 * j])
        m.running_var.copy_(stats[2 * j + 1])
        m.num_batches_tracked.fill_(seen)
    return model.eval()
