"""Starlight (docs/method.md, "Starlight"): train a star model θ that sees its sources along straight lines.

Every mini-batch draws a source θ_n uniformly and t from the configured scheme, forwards the batch through
the interpolated weights (1-t)·θ + t·θ_n (BatchNorm in train mode) and back-propagates into θ through the
interpolation, the chain rule's (1-t) applied exactly once. The step itself, the draws and the source bank
live in `objective` (one implementation, shared with `sd.Starlight` for users' own training loops); this
module is the training run around them.

BatchNorm buffers: an interpolated forward in train mode would update running statistics with the
statistics of the *interpolated* network. Those are not θ's statistics, so interpolated forwards run with
scratch buffers (a private copy that absorbs the updates); θ's own buffers are touched only by θ's own
forwards (the μ term) and are recomputed on training data after every epoch anyway (`recalibrate_bn`).

Alignment: sources are re-aligned to the current θ (weight matching) every epoch, every N steps or never.
Each alignment permutes the *original* source weights (weight matching warm-started from the previous
permutation); the permutations (small integer vectors) go into the resume state, so a restarted run
rebuilds the exact aligned copies without storing N models.

Training runs in `train.fit`, the loop regular training uses too: Starlight supplies its step, its epoch
start (alignment), its epoch end (BN recomputed, history) and its extra resumable state.

Resume: the star, optimiser, scheduler, the data-order generator, the (source, t) generator, the global
torch RNG, the permutations, progress and the counters the metadata reports (alignments, history, time
spent) are saved atomically after every epoch (`checkpoint.save_state`); a killed run re-run with the same
arguments ends with the bitwise-identical star and the same metadata (timings aside).
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import permute
from .checkpoint import weights_sha256
from .config import Config, StarConfig, TrainConfig
from .data import first_inputs, get_dataset, per_token
from .errors import UserError
from .interpolate import average, has_bn, recalibrate_bn
from .objective import Draws, SourceBank, check_sources, interpolated_forward
from .training import (Hooks, StopRule, autocast, config_digest, evaluate, evaluate_splits, fit, fit_record,
                       init_model)
from .utils import resolve_device

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the step

def star_loss(model: nn.Module, params: Mapping[str, torch.Tensor], draws: Sequence[tuple[Mapping[str, torch.Tensor], float]],
              x: torch.Tensor, y: torch.Tensor, *, mu: float = 0.0, label_smoothing: float = 0.0,
              scratch: Mapping[str, torch.Tensor] | None = None, backward: bool = True,
              pool: list | None = None) -> float:
    """One Starlight objective on a mini-batch split into len(draws) chunks, chunk i through its own
    (source_i, t_i) by `objective.interpolated_forward` (the step `sd.Starlight` runs too). L_interp is the
    mean loss over the whole batch; with μ > 0 the total is (L_interp + μ·L(θ)) / (1 + μ). With `backward`,
    θ's gradients (`params[k].grad`) receive ∂total/∂θ: for each chunk, d/dθ L((1-t)·θ + t·θ_n) =
    (1-t)·∇L at the interpolated point. `scratch`, when given, replaces the module's buffers in
    interpolated forwards (BatchNorm updates land there); `pool` keeps the interpolated weights' buffers
    for the next step. -> the total."""
    k = len(draws)
    n = y.numel()  # predictions in the batch: examples, or tokens of next-token data
    scale = 1.0 / (1.0 + mu)
    total = 0.0
    xs, ys = (torch.tensor_split(x, k), torch.tensor_split(y, k)) if k > 1 else ((x,), (y,))
    for (src, t), xc, yc in zip(draws, xs, ys):
        if len(yc) == 0:
            continue
        with torch.set_grad_enabled(backward):
            out, yt = per_token(interpolated_forward(model, params, src, t, (xc,), buffers=scratch, pool=pool), yc)
            loss = F.cross_entropy(out.float(), yt, label_smoothing=label_smoothing, reduction="sum") * (scale / n)
        if backward:
            loss.backward()
        total += loss.item()
    if mu > 0:
        with torch.set_grad_enabled(backward):
            out, yt = per_token(model(x), y)  # θ's own forward: its BatchNorm buffers get θ's statistics
            loss = F.cross_entropy(out.float(), yt, label_smoothing=label_smoothing) * (mu * scale)
        if backward:
            loss.backward()
        total += loss.item()
    return total


# ---------------------------------------------------------------- fit-matched stars

def source_train_losses(model: nn.Module, sources: Sequence[StateDict], data, batch_size: int) -> list[float]:
    """The sources' training losses: as their files record them (sources read from files offer
    `train_losses()`, files.SourceFiles), else measured on the training split in eval mode (what a file
    records is that same measurement)."""
    recorded = sources.train_losses() if hasattr(sources, "train_losses") else []
    if recorded and all(v is not None for v in recorded):
        return [float(v) for v in recorded]
    probe = copy.deepcopy(model).cpu()
    out = []
    for n in range(len(sources)):
        probe.load_state_dict(sources[n])
        out.append(evaluate(probe, data.train, batch_size, device="cpu")["loss"])
    return out


def stop_rule(cfg: Config, model: nn.Module, sources: Sequence[StateDict], data) -> StopRule | None:
    """The star's stopping rule: fit-matched (star.match_fit: its training loss at or below that quantile of
    its sources' training losses), else its train section's own (train.stop), else none."""
    sc, tc = cfg.star, cfg.star.train or cfg.train
    if sc.match_fit is None:
        return StopRule.of(tc.stop)
    losses = source_train_losses(model, sources, data, tc.eval_batch_size)
    target = float(np.quantile(np.asarray(losses, float), sc.match_fit))
    what = "median" if sc.match_fit == 0.5 else f"{sc.match_fit:g} quantile"
    return StopRule(loss=target, criterion=f"fit-matched: training loss <= {target:.6g}, the {what} of its "
                                           f"{len(losses)} sources' training losses")


# ---------------------------------------------------------------- training

def star_settings(sc: StarConfig) -> dict[str, Any]:
    """The settings recorded in a star file's metadata."""
    return {"t_sampling": sc.t_sampling, "beta": list(sc.beta), "t_constant": sc.t_constant, "mu": sc.mu,
            "align_every": sc.align_every, "init": sc.init, "init_source": sc.init_source, "chunks": sc.chunks,
            "bn_batches": sc.bn_batches, "match_iters": sc.match_iters, "match_fit": sc.match_fit}


def _alignments_before(sc: StarConfig, epoch: int, step: int) -> int:
    """How many alignments a run has done when it has finished `epoch` epochs (`step` steps): for resume
    states written before the counter was saved."""
    if sc.align_every == "epoch":
        return epoch
    return -(-step // sc.align_every) if isinstance(sc.align_every, int) else 0


def _init_star(model: nn.Module, cfg: Config, sources: Sequence[StateDict], data, spec, seed: int) -> None:
    """θ_0: random (seeded, already in `model`), a source, or the aligned average of the sources."""
    sc = cfg.star
    tc: TrainConfig = sc.train or cfg.train
    if sc.init == "source":
        model.load_state_dict(sources[sc.init_source])
    elif sc.init == "average":
        anchor = sources[sc.init_source]
        aligned = []
        for n in range(len(sources)):
            if n == sc.init_source:
                aligned.append(anchor)
                continue
            perm, _ = permute.weight_matching(spec, anchor, sources[n], seed=seed + n, max_iter=sc.match_iters)
            aligned.append(permute.apply_permutation(spec, sources[n], perm))
        model.load_state_dict(average(aligned))
        del aligned
        recalibrate_bn(model, data.train, tc.eval_batch_size, sc.bn_batches)


def _check_star_config(cfg: Config, model: nn.Module, sources: Sequence[StateDict]) -> None:
    sc = cfg.star
    tc: TrainConfig = sc.train or cfg.train
    check_sources(model, sources)
    if has_bn(model) and tc.batch_size // sc.chunks < 2:
        raise UserError(f"star.chunks={sc.chunks} leaves chunks of under 2 examples at batch size {tc.batch_size}; "
                        "BatchNorm needs at least 2: lower star.chunks or raise the batch size")
    if sc.init_source >= len(sources) and sc.init in ("source", "average"):
        raise UserError(f"star.init_source={sc.init_source} but only {len(sources)} sources were given")


class _StarRun:
    """Starlight as a use of `train.fit`: its step (draws, interpolated forward/backward), its epoch start
    (alignment), its epoch end (BN recomputed, history) and its extra resumable state (draws, permutations,
    history, alignment counter and time)."""

    def __init__(self, cfg: Config, model: nn.Module, sources, data, spec, bank: SourceBank, seed: int,
                 device: torch.device, on_epoch: Callable[[int, dict], None] | None):
        self.sc, self.tc = cfg.star, cfg.star.train or cfg.train
        self.model, self.data, self.spec, self.bank, self.seed, self.device = model, data, spec, bank, seed, device
        self.draws = Draws(self.sc, len(sources), seed)
        self.on_epoch = on_epoch
        self.history: list[dict] = []
        self.align_seconds, self.alignments = 0.0, 0
        self.seconds_before, self.t0 = 0.0, time.perf_counter()  # training time of earlier processes, this one's start
        self.params = dict(model.named_parameters())

    def hooks(self, stop: StopRule | None = None) -> Hooks:
        return Hooks(self.step, self.diverged, desc="starlight", ready=self.ready, epoch_start=self.epoch_start,
                     epoch_end=self.epoch_end, saved=self.saved, state=self.state, restore=self.restore, stop=stop)

    def ready(self) -> None:
        """After a resume: scratch BN buffers from θ's (restored) ones; an empty pool of weight buffers."""
        self.scratch = ({k: b.detach().clone() for k, b in self.model.named_buffers()} if has_bn(self.model)
                        else None)
        self.pool: list = []  # the interpolated weights' buffers, reused every step

    def align(self, n_step: int) -> None:
        a0 = time.perf_counter()
        self.bank.align_to_model(self.model, self.spec, self.seed, n_step, self.sc.match_iters)
        self.align_seconds += time.perf_counter() - a0
        self.alignments += 1

    def epoch_start(self, epoch: int, n_step: int) -> None:
        if self.sc.align_every == "epoch":
            self.align(n_step)

    def step(self, x: torch.Tensor, y: torch.Tensor, n_step: int) -> tuple[float, None]:
        if isinstance(self.sc.align_every, int) and n_step % self.sc.align_every == 0:
            self.align(n_step)
        chosen = [self.draws.draw() for _ in range(self.sc.chunks)]
        with autocast(self.device, self.tc.amp):
            loss = star_loss(self.model, self.params, [(self.bank.get(n), t) for n, t in chosen], x, y,
                             mu=self.sc.mu, label_smoothing=self.tc.label_smoothing, scratch=self.scratch,
                             pool=self.pool)
        return loss, None

    def diverged(self, loss: float, epoch: int) -> str:
        return (f"Starlight diverged: loss {loss} at epoch {epoch + 1}; lower the learning rate "
                f"({'star.train' if self.sc.train else 'train'}.optimizer.lr) or set grad_clip")

    def epoch_end(self, epoch: int, loss: float) -> None:
        recalibrate_bn(self.model, self.data.train, self.tc.eval_batch_size, self.sc.bn_batches, self.device)
        self.history.append({"epoch": epoch + 1, "interp_loss": loss})

    def saved(self, epoch: int) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch, self.history[-1])

    def state(self) -> dict:
        return {"draws": self.draws.get_state(), "perms": self.bank.perms, "history": self.history,
                "alignments": self.alignments, "align_seconds": self.align_seconds, "seconds": self.seconds()}

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def restore(self, st: dict) -> None:
        self.draws.set_state(st["draws"])
        for n, perm in enumerate(st["perms"]):
            if perm is not None:
                self.bank.set_perm(n, perm, permute, self.spec)
        self.history = list(st["history"])
        self.alignments = int(st["alignments"]) if "alignments" in st else \
            _alignments_before(self.sc, st["epoch"], st["step"])
        self.align_seconds = float(st.get("align_seconds", 0.0))
        self.seconds_before = float(st.get("seconds", 0.0))


def train_star(cfg: Config, sources: Sequence[StateDict], *, seed: int = 0, device: str | torch.device = "auto",
               state_path: str | Path | None = None, progress: bool | None = None,
               source_ids: Sequence[str] | None = None,
               on_epoch: Callable[[int, dict], None] | None = None, data=None,
               model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Train a star model from `sources` (state dicts of cfg.model trained on cfg.data) with Algorithm 1.
    -> (star module in eval mode, info: metrics, settings, timings, per-epoch history).

    `state_path`: resume file, written after every epoch. `source_ids`: digests identifying the sources in
    the resume state (default: their weights' sha256). `on_epoch(epoch, record)` is called after each
    epoch's state is saved (progress reporting; tests use it to interrupt a run). `data` (a DataBundle)
    and `model` (the seeded initial module) replace cfg's for the Python API's live objects."""
    sc = cfg.star
    tc: TrainConfig = sc.train or cfg.train
    if len(sources) < 1:
        raise UserError("Starlight needs at least one source model")
    device = resolve_device(device)
    data = data if data is not None else get_dataset(cfg.data)
    model = model if model is not None else init_model(cfg, data, seed)
    _check_star_config(cfg, model, sources)
    example = first_inputs(data.train)
    spec = permute.spec_for(model, example) if sc.align_every != "never" or sc.init == "average" else None
    _init_star(model, cfg, sources, data, spec, seed)
    model.to(device)
    bank = SourceBank(sources, {k: p.dtype for k, p in model.named_parameters()}, device, sc.sources_on)
    ids = list(source_ids) if source_ids is not None else [weights_sha256(sources[n]) for n in range(len(sources))]
    digest = config_digest(cfg) + ":" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:16]
    run = _StarRun(cfg, model, sources, data, spec, bank, seed, device, on_epoch)
    rule = stop_rule(cfg, model, sources, data)
    fit_history: list[dict] = []
    steps = fit(model, data, tc, seed, digest, run.hooks(rule), device=device, state_path=state_path,
                progress=progress, history=fit_history)
    seconds = run.seconds()
    model.eval()
    metrics = evaluate_splits(model, data, tc.eval_batch_size)
    info = {"metrics": metrics, "star": star_settings(sc), "epochs": len(fit_history), "steps": steps,
            "fit": fit_record(rule, tc.epochs, fit_history),
            "n_sources": len(sources), "seconds": seconds, "align_seconds": run.align_seconds,
            "alignments": run.alignments, "sources_on": "device" if bank.on_device else "cpu",
            "source_bytes": bank.bytes, "history": run.history, "fit_history": fit_history, "device": str(device)}
    return model, info
