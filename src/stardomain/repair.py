"""REPAIR (Jordan et al., ICLR 2023) for networks without BatchNorm.

An interpolated network's hidden units lose variance ("variance collapse"), which inflates barriers
that say more about the statistics than about the weights. REPAIR rescales every hidden pre-activation
channel of the interpolated network so that its mean and standard deviation on training data equal the
interpolation of the endpoints' own: target = (1-t)·stat_A + t·stat_B. Like BatchNorm recalibration it
needs one pass over training data per t, with all corrections active at once (each layer is normalised
with its batch statistics during the pass, so later layers see corrected inputs).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from .data import Split, batches

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def repair_points(model: nn.Module) -> list[str]:
    """The Linear/Conv layers whose outputs are renormalised: all but the last (the logits)."""
    names = [n for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    return names[:-1]


def _channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel (axis 1) sum and sum of squares over every other axis, in float64."""
    y = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
    return y.sum(1), (y * y).sum(1), y.shape[1]


class _Stats:
    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, y: torch.Tensor) -> None:
        s, ss, n = _channel_moments(y)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += n

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0).sqrt()


@torch.no_grad()
def channel_stats(model: nn.Module, split: Split, batch_size: int = 1000, max_batches: int | None = None,
                  device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of every repair point's output over training data, model in eval mode."""
    device = device or next(model.parameters()).device
    names = repair_points(model)
    acc = {n: _Stats() for n in names}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, out, n=n: acc[n].add(out)) for n in names]
    model.eval()
    try:
        for x, _ in batches(split, batch_size, device=device, max_batches=max_batches):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: a.mean_std() for n, a in acc.items()}


class _Reset:
    """A forward hook that renormalises a layer's output channels to a target mean/std: with the batch's
    statistics while calibrating (accumulating their average), with the accumulated ones afterwards."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5):
        self.mean, self.std, self.eps = mean.float(), std.float(), eps
        self.calibrating = True
        self.acc = _Stats()
        self.run_mean = self.run_std = None

    def __call__(self, _m, _i, y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (y.dim() - 2)
        if self.calibrating:
            self.acc.add(y)
            s, ss, n = _channel_moments(y)
            mean = s / n
            std = (ss / n - mean * mean).clamp_min(0).sqrt()
        else:
            mean, std = self.run_mean, self.run_std
        scale = self.std.to(y.device) / (std.float().to(y.device) + self.eps)
        return (y - mean.float().to(y.device).view(shape)) * scale.view(shape) + self.mean.to(y.device).view(shape)

    def freeze(self) -> None:
        self.run_mean, self.run_std = self.acc.mean_std()
        self.calibrating = False


@torch.no_grad()
def apply_repair(model: nn.Module, stats_a: dict, stats_b: dict, t: float, split: Split, batch_size: int = 1000,
                 max_batches: int | None = None, device=None) -> list:
    """Install REPAIR hooks on `model` (already holding the interpolated weights at t) and calibrate them
    on training data. -> the hook handles; `remove_repair(handles)` takes them off."""
    device = device or next(model.parameters()).device
    mods = dict(model.named_modules())
    resets, handles = [], []
    for name in repair_points(model):
        (ma, sa), (mb, sb) = stats_a[name], stats_b[name]
        r = _Reset((1 - t) * ma + t * mb, (1 - t) * sa + t * sb)
        resets.append(r)
        handles.append(mods[name].register_forward_hook(r))
    model.eval()
    for x, _ in batches(split, batch_size, device=device, max_batches=max_batches):
        model(x)
    for r in resets:
        r.freeze()
    return handles


def remove_repair(handles: Iterator) -> None:
    for h in handles:
        h.remove()
