"""Learned alignment: B's permutation chosen by the loss along the path from A, not by weights or
activations alone (docs/method.md, "Learned alignment"). The machinery both learned methods share (the
loss at an interpolated point, seeded training batches, the choice among candidate hard permutations)
and the straight-through estimator of Git Re-Basin (Ainsworth et al. 2023); `sinkhorn.py` holds
Sinkhorn re-basin (Pena et al. 2023).

Both are exact at the end: what they return is a hard permutation of B (checked like any other by
`align`); the proxy weights and soft matrices they learn never leave them. Every candidate is judged
on one fixed seeded sample of training examples by its barrier there, and weight matching's answer is
the first candidate, so a learned method never ends with a higher barrier on that sample than weight
matching.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import LearnedAlignConfig
from ..data import DataBundle, Split, batches
from ..errors import UserError
from .inputs import flat_tensors
from .matching import weight_matching
from .permutations import apply_permutation
from .spec import PermutationSpec

# Adam on the proxy weights (they start at A's): on a 64-wide digits MLP, 1e-3 changed the projection 8
# times in 100 steps (barrier 0.031 -> 0.027), 1e-2 31 times (-> 0.018)
STE_LR = 1e-2


def settings_of(settings: LearnedAlignConfig | dict | None) -> LearnedAlignConfig:
    if settings is None:
        return LearnedAlignConfig()
    if isinstance(settings, LearnedAlignConfig):
        return settings
    from ..config import validate

    return validate(LearnedAlignConfig, dict(settings), "learned alignment settings")


def training_split(data: Any, method: str) -> Split:
    """The split whose examples the loss is computed on: a data.Split with labels, or a bundle's train split."""
    if isinstance(data, DataBundle):
        data = data.train
    if not isinstance(data, Split) or len(data) == 0 or (data.x is not None and data.y is None):
        raise UserError(f"{method} alignment needs labelled training data (a data set: its train split), "
                        "since it learns the permutation from the loss along the path")
    return data


def cross_entropy(out: Any, y: torch.Tensor) -> torch.Tensor:
    """The training loss of a model's output: classes along the last axis (one prediction per example or per
    token, as `data.per_token`), or along axis 1 where the targets have the output's other axes."""
    logits = next((o for o in flat_tensors(out) if o.is_floating_point()), None)
    if logits is None:
        raise UserError("learned alignment needs a model whose output holds logits (a floating-point tensor)")
    if logits.shape[:-1] == y.shape:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    return F.cross_entropy(logits.float(), y)


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Eval mode, but BatchNorm normalises with each batch's own statistics (train mode): an interpolated
    network's running statistics are wrong, and recomputing them every step would cost a pass over data."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _tied(model: nn.Module) -> set[str]:
    """Names that alias an earlier name's tensor (a tied embedding and output head): functional_call is
    given the first name only, and ties the rest to it."""
    seen, out = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen and t.numel():
            out.add(name)
        seen.add(t.data_ptr())
    return out


def path_loss(model: nn.Module, sd_a: dict, sd_b: dict, t: float, x: torch.Tensor, y: torch.Tensor,
              skip: set[str] = frozenset()) -> torch.Tensor:
    """The loss at (1-t)·A + t·B on one batch (gradients flow into sd_b's tensors); integer buffers from
    A (copied: BatchNorm's counters are updated in place). Run inside `batch_statistics`."""
    state = {k: torch.lerp(a, sd_b[k], t) if a.is_floating_point() else a.clone()
             for k, a in sd_a.items() if k not in skip}
    return cross_entropy(functional_call(model, state, (x,)), y)


def _stream(split: Split, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(split, min(batch_size, len(split)), generator=gen)


def _sample(split: Split, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed seeded sample of n training examples (in data order), the candidates' common yardstick."""
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if split.x is not None:
        return split.x[idx], split.y[idx]
    items = [split.dataset[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(a) for a, _ in items]), torch.stack([torch.as_tensor(b) for _, b in items])


class Candidates:
    """Hard permutations of B judged by their barrier on the selection sample: the largest excess of the
    loss over its chord at the path's inner points (t = 1/2, or 1/4, 1/2, 3/4 for a random-t loss),
    floored at 0 as every barrier here (docs/method.md, "Loss barrier"). Each distinct one is measured
    once; the lowest wins, the earliest on a tie, so weight matching's answer (the first) stays unless a
    candidate lowers the barrier: a midpoint that dips below the chord is no better than one on it (a
    permuted copy of A keeps its exact inverse permutation)."""

    def __init__(self, model, spec: PermutationSpec, sd_a: dict, sd_b: dict, split: Split,
                 cfg: LearnedAlignConfig, seed: int):
        self.model, self.spec, self.sd_a, self.sd_b = model, spec, sd_a, sd_b
        self.x, self.y = _sample(split, cfg.select_examples, seed + 1)
        self.ts = (0.5,) if cfg.loss_at == "midpoint" else (0.25, 0.5, 0.75)
        self.chunk, self.skip = cfg.batch_size, _tied(model)
        # Each candidate's chord ends at its own permuted B: B's loss does not depend on the permutation in
        # exact arithmetic, but in float it differs in the last bits, enough to rank a permuted copy's exact
        # inverse (barrier 0) behind a wrong candidate whose midpoint dips below the chord.
        self.loss_a = self._loss(sd_b, 0.0)
        self.seen: dict[tuple, float] = {}
        self.best, self.best_barrier, self.first_barrier = None, float("inf"), None

    @torch.no_grad()
    def _loss(self, sd_p: dict, t: float) -> float:
        n, total = len(self.y), 0.0
        with batch_statistics(self.model):
            for i in range(0, n, self.chunk):
                x, y = self.x[i:i + self.chunk], self.y[i:i + self.chunk]
                total += float(path_loss(self.model, self.sd_a, sd_p, t, x, y, self.skip)) * len(y) / n
        return total

    def consider(self, perm: dict[str, torch.Tensor]) -> float:
        key = tuple((k, tuple(perm[k].tolist())) for k in sorted(perm))
        if key in self.seen:
            return self.seen[key]
        sd_p = apply_permutation(self.spec, self.sd_b, perm)
        loss_b = self._loss(sd_p, 1.0)
        barrier = max(0.0, *(self._loss(sd_p, t) - ((1 - t) * self.loss_a + t * loss_b) for t in self.ts))
        self.seen[key] = barrier
        if self.first_barrier is None:
            self.first_barrier = barrier
        if barrier < self.best_barrier:
            self.best, self.best_barrier = {k: v.clone() for k, v in perm.items()}, barrier
        return barrier


class Learner:
    """What both methods set up the same way: the model copy (batch statistics), weight matching's start,
    the candidates, the seeded stream of training batches and t values."""

    def __init__(self, spec: PermutationSpec, model: nn.Module, sd_a: dict, sd_b: dict, data: Any,
                 settings, seed: int, method: str):
        self.cfg = settings_of(settings)
        self.spec, self.sd_a, self.sd_b, self.seed = spec, sd_a, sd_b, seed
        split = training_split(data, method)
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.skip = _tied(self.model)
        self.start, self.wm_info = weight_matching(spec, sd_a, sd_b, seed=seed)
        self.candidates = Candidates(self.model, spec, sd_a, sd_b, split, self.cfg, seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.stream = _stream(split, self.cfg.batch_size, self.gen)
        self.losses: list[float] = []

    def t(self) -> float:
        return 0.5 if self.cfg.loss_at == "midpoint" else float(torch.rand((), generator=self.gen))

    def step_loss(self, sd_b_point: dict) -> torch.Tensor:
        x, y = next(self.stream)
        loss = path_loss(self.model, self.sd_a, sd_b_point, self.t(), x, y, self.skip)
        self.losses.append(float(loss.detach()))
        return loss

    def info(self, method: str, perm_changes: int) -> dict:
        c = self.candidates
        return {"iterations": self.cfg.steps, "converged": None, "groups": len(self.spec.groups),
                "init": self.wm_info.get("init"), "settings": {"method": method, **self.cfg.model_dump()},
                "selection_barrier_weight_matching": c.first_barrier, "selection_barrier": c.best_barrier,
                "candidates": len(c.seen), "permutation_changes": perm_changes,
                "train_loss_first": self.losses[0] if self.losses else None,
                "train_loss_last": self.losses[-1] if self.losses else None}


def straight_through(spec: PermutationSpec, model: nn.Module, sd_a: dict, sd_b: dict, data: Any, *,
                     settings: LearnedAlignConfig | dict | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Git Re-Basin's straight-through estimator -> (perm for B, info).

    A proxy copy of B's parameters starts at A's. Each step projects it onto the nearest permutation of
    B (weight matching between proxy and B, warm-started from the last answer), evaluates the loss at
    (1-t)·A + t·pi(B) on a training batch and passes the gradient straight through the projection into
    the proxy (Adam). Every projection is a candidate; the one with the lowest barrier on the selection
    sample is returned (weight matching's A-to-B answer is the first; see Candidates)."""
    run = Learner(spec, model, sd_a, sd_b, data, settings, seed, "ste")
    perm, changes = run.start, 0
    run.candidates.consider(perm)
    params = [k for k in spec.parameters if sd_a[k].is_floating_point()]
    if not spec.groups or not params:
        return perm, run.info("ste", 0)
    proxy = {k: sd_a[k].detach().clone().requires_grad_(True) for k in params}
    opt = torch.optim.Adam(proxy.values(), lr=run.cfg.lr or STE_LR)
    with batch_statistics(run.model):
        for step in range(run.cfg.steps + 1):
            if step:  # the proxy moved: project it again (step 0 projects A itself: weight matching's answer)
                new, _ = weight_matching(spec, {**sd_a, **{k: v.detach() for k, v in proxy.items()}}, sd_b,
                                         seed=seed + step, init=perm)
                changes += any(not torch.equal(new[k], perm[k]) for k in perm)
                perm = new
                run.candidates.consider(perm)
            if step == run.cfg.steps:
                break
            proj = apply_permutation(spec, sd_b, perm)
            point = {**proj, **{k: proj[k] + (proxy[k] - proxy[k].detach()) for k in params}}
            loss = run.step_loss(point)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run.candidates.best, run.info("ste", changes)
