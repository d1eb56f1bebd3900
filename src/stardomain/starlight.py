"""Starlight (docs/method.md, "Starlight"): train a star model θ that sees its sources along straight lines.

Every mini-batch draws a source θ_n uniformly and t from the configured scheme, forwards the batch through
the interpolated weights (1-t)·θ + t·θ_n (BatchNorm in train mode) and back-propagates into θ *through the
interpolation itself*: the interpolated parameters are written by `torch.lerp` into reusable leaf tensors
that `torch.func.functional_call` runs the module with (no second module), and the chain rule's (1-t)
factor is applied exactly once, on the loss, so back-propagation delivers (1-t)·∇L at the interpolated
point, which becomes θ's gradient. The cost over an ordinary step is one lerp per parameter tensor.

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

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import permute
from .checkpoint import check_layout, weights_sha256
from .config import Config, StarConfig, TrainConfig
from .data import first_inputs, get_dataset, per_token
from .errors import UserError
from .interpolate import average, has_bn, recalibrate_bn
from .training import Hooks, autocast, config_digest, evaluate_splits, fit, init_model
from .utils import resolve_device

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the step

def interpolate_into(work: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                     source: Mapping[str, torch.Tensor], t: float) -> None:
    """work[k] <- (1-t)·params[k] + t·source[k], in place and outside autograd."""
    with torch.no_grad():
        for k, p in params.items():
            torch.lerp(p, source[k], t, out=work[k])


def new_work(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Leaf tensors that hold the interpolated weights; reused every step so nothing is allocated."""
    return {k: torch.empty_like(p, requires_grad=True) for k, p in params.items()}


def star_loss(model: nn.Module, params: Mapping[str, torch.Tensor], draws: Sequence[tuple[Mapping[str, torch.Tensor], float]],
              x: torch.Tensor, y: torch.Tensor, *, mu: float = 0.0, label_smoothing: float = 0.0,
              scratch: Mapping[str, torch.Tensor] | None = None, backward: bool = True,
              work: Mapping[str, torch.Tensor] | None = None) -> float:
    """One Starlight objective on a mini-batch split into len(draws) chunks, chunk i through its own
    (source_i, t_i). L_interp is the mean loss over the whole batch; with μ > 0 the total is
    (L_interp + μ·L(θ)) / (1 + μ). With `backward`, θ's gradients (`params[k].grad`) receive
    ∂total/∂θ: for each chunk, d/dθ L((1-t)·θ + t·θ_n) = (1-t)·∇L at the interpolated point, computed by
    back-propagating (1-t)·L into the interpolated leaves `work` (see `new_work`). `scratch`, when given,
    replaces the module's buffers in interpolated forwards (BatchNorm updates land there). -> the total."""
    k = len(draws)
    n = y.numel()  # predictions in the batch: examples, or tokens of next-token data
    scale = 1.0 / (1.0 + mu)
    total = 0.0
    work = new_work(params) if work is None else work
    xs, ys = (torch.tensor_split(x, k), torch.tensor_split(y, k)) if k > 1 else ((x,), (y,))
    for (src, t), xc, yc in zip(draws, xs, ys):
        if len(yc) == 0:
            continue
        interpolate_into(work, params, src, t)
        with torch.set_grad_enabled(backward):
            out, yt = per_token(functional_call(model, {**work, **scratch} if scratch else work, (xc,)), yc)
            loss = F.cross_entropy(out.float(), yt, label_smoothing=label_smoothing, reduction="sum") * (scale / n)
        if backward:
            (loss * (1.0 - t)).backward()
            for name, p in params.items():
                g, work[name].grad = work[name].grad, None
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        total += loss.item()
    if mu > 0:
        with torch.set_grad_enabled(backward):
            out, yt = per_token(model(x), y)  # θ's own forward: its BatchNorm buffers get θ's statistics
            loss = F.cross_entropy(out.float(), yt, label_smoothing=label_smoothing) * (mu * scale)
        if backward:
            loss.backward()
        total += loss.item()
    return total


# ---------------------------------------------------------------- draws

class Draws:
    """The seeded (source, t) generator: numpy's PCG64, whose state is plain JSON (resumable, no pickle)."""

    def __init__(self, sc: StarConfig, n_sources: int, seed: int):
        self.sc, self.n = sc, n_sources
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5747])))

    def draw(self) -> tuple[int, float]:
        n = int(self.rng.integers(self.n))
        if self.sc.t_sampling == "uniform":
            t = float(self.rng.random())
        elif self.sc.t_sampling == "beta":
            t = float(self.rng.beta(*self.sc.beta))
        else:
            t = float(self.sc.t_constant)
        return n, t

    def get_state(self) -> str:
        return json.dumps(self.rng.bit_generator.state)

    def set_state(self, s: str) -> None:
        self.rng.bit_generator.state = json.loads(s)


# ---------------------------------------------------------------- sources

class SourceBank:
    """The sources' parameters as the star trains against them: N aligned copies (parameters only), on the
    training device when they fit there, else on the CPU with the drawn one moved per step. Originals are
    read through `originals[n]` (a list, or a lazy sequence that reads files) and never modified."""

    def __init__(self, originals: Sequence[StateDict], param_names: list[str], device: torch.device, where: str):
        self.originals = originals
        self.names = param_names
        self.device = device
        self.perms: list[dict[str, torch.Tensor] | None] = [None] * len(originals)
        first = originals[0]
        bytes_per = sum(first[k].numel() * first[k].element_size() for k in param_names)
        if where == "auto":
            where = "device"
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                where = "device" if bytes_per * len(originals) < 0.3 * free else "cpu"
        self.on_device = where == "device" or device.type == "cpu"
        self.bytes = bytes_per * len(originals)
        self.params: list[StateDict] = [self._params(originals[n]) for n in range(len(originals))]

    def _params(self, sd: StateDict) -> StateDict:
        dev = self.device if self.on_device else torch.device("cpu")
        return {k: sd[k].detach().to(dev, torch.float32 if sd[k].is_floating_point() else sd[k].dtype)
                for k in self.names}

    def __len__(self) -> int:
        return len(self.params)

    def get(self, n: int) -> StateDict:
        p = self.params[n]
        if self.on_device:
            return p
        return {k: v.to(self.device, non_blocking=True) for k, v in p.items()}

    def set_perm(self, n: int, perm: dict[str, torch.Tensor] | None, permute=None, spec=None) -> None:
        """Make copy n the original permuted by `perm` (None: the original itself)."""
        sd = self.originals[n]
        if perm is not None:
            sd = permute.apply_permutation(spec, sd, perm)
        self.perms[n] = perm
        self.params[n] = self._params(sd)

    def align_to(self, star_sd: StateDict, permute, spec, seed: int, max_iter: int) -> dict[str, float]:
        """Re-align every source (from its original weights) to the star by weight matching."""
        iters = []
        for n in range(len(self.params)):
            # warm start from the last permutation (saved in the resume state, so this stays reproducible)
            kw = {"init": self.perms[n]} if self.perms[n] is not None else {}
            perm, info = permute.weight_matching(spec, star_sd, self.originals[n], seed=seed + n, max_iter=max_iter,
                                                 **kw)
            perm = {g: p.detach().cpu().to(torch.int64) for g, p in perm.items()}
            self.set_perm(n, perm, permute, spec)
            iters.append(info.get("iterations", 0) if isinstance(info, dict) else 0)
        return {"mean_iterations": float(np.mean(iters)) if iters else 0.0}


# ---------------------------------------------------------------- training

def star_settings(sc: StarConfig) -> dict[str, Any]:
    """The settings recorded in a star file's metadata."""
    return {"t_sampling": sc.t_sampling, "beta": list(sc.beta), "t_constant": sc.t_constant, "mu": sc.mu,
            "align_every": sc.align_every, "init": sc.init, "init_source": sc.init_source, "chunks": sc.chunks,
            "bn_batches": sc.bn_batches, "match_iters": sc.match_iters}


def _check_sources(model: nn.Module, sources: Sequence[StateDict]) -> None:
    want = model.state_dict()
    for i in range(len(sources)):
        check_layout(want, sources[i], f"source {i}", against="the configured model (give sources trained "
                     "with the same model config)")


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
    _check_sources(model, sources)
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

    def hooks(self) -> Hooks:
        return Hooks(self.step, self.diverged, desc="starlight", ready=self.ready, epoch_start=self.epoch_start,
                     epoch_end=self.epoch_end, saved=self.saved, state=self.state, restore=self.restore)

    def ready(self) -> None:
        """After a resume: scratch BN buffers from θ's (restored) ones, reusable interpolation leaves."""
        self.scratch = ({k: b.detach().clone() for k, b in self.model.named_buffers()} if has_bn(self.model)
                        else None)
        self.work = new_work(self.params)

    def align(self, n_step: int) -> None:
        a0 = time.perf_counter()
        star_sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        self.bank.align_to(star_sd, permute, self.spec, seed=self.seed * 100003 + n_step, max_iter=self.sc.match_iters)
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
                             work=self.work)
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
    bank = SourceBank(sources, [k for k, _ in model.named_parameters()], device, sc.sources_on)
    ids = list(source_ids) if source_ids is not None else [weights_sha256(sources[n]) for n in range(len(sources))]
    digest = config_digest(cfg) + ":" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:16]
    run = _StarRun(cfg, model, sources, data, spec, bank, seed, device, on_epoch)
    fit_history: list[dict] = []
    steps = fit(model, data, tc, seed, digest, run.hooks(), device=device, state_path=state_path, progress=progress,
                history=fit_history)
    seconds = run.seconds()
    model.eval()
    metrics = evaluate_splits(model, data, tc.eval_batch_size)
    info = {"metrics": metrics, "star": star_settings(sc), "epochs": tc.epochs, "steps": steps,
            "n_sources": len(sources), "seconds": seconds, "align_seconds": run.align_seconds,
            "alignments": run.alignments, "sources_on": "device" if bank.on_device else "cpu",
            "source_bytes": bank.bytes, "history": run.history, "fit_history": fit_history, "device": str(device)}
    return model, info
