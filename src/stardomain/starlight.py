"""Starlight (PAPER.md, Algorithm 1): train a star model θ that sees its sources along straight lines.

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

Resume: the star, optimiser, scheduler, the data-order generator, the (source, t) generator, the global
torch RNG, the permutations, progress and the counters the metadata reports (alignments, history) are
saved atomically after every epoch (`checkpoint.save_state`); a killed run re-run with the same arguments
ends with the bitwise-identical star and the same metadata, timings aside.
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
from tqdm.auto import tqdm

from . import permute
from .checkpoint import compatible, read_model_file, save_model, weights_sha256
from .config import Config, StarConfig, TrainConfig
from .data import get_dataset, num_batches, batches
from .errors import UserError
from .interpolate import average, has_bn, recalibrate_bn
from .train import (autocast, build_optimizer, build_scheduler, config_digest, evaluate_splits, init_model,
                    model_meta, resolve_device, resume_training_state, save_training_state)

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
    n = len(y)
    scale = 1.0 / (1.0 + mu)
    total = 0.0
    work = new_work(params) if work is None else work
    xs, ys = (torch.tensor_split(x, k), torch.tensor_split(y, k)) if k > 1 else ((x,), (y,))
    for (src, t), xc, yc in zip(draws, xs, ys):
        if len(yc) == 0:
            continue
        interpolate_into(work, params, src, t)
        with torch.set_grad_enabled(backward):
            out = functional_call(model, {**work, **scratch} if scratch else work, (xc,))
            loss = F.cross_entropy(out.float(), yc, label_smoothing=label_smoothing, reduction="sum") * (scale / n)
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
            out = model(x)  # θ's own forward: its BatchNorm buffers get θ's statistics
            loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing) * (mu * scale)
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


class SourceFiles(Sequence):
    """Sources as model files, read on access: the originals stay on disk, so only the aligned copies
    (N models) live in memory. Each read is checked against the file's sha256."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.metas = [read_model_file(p)[1] for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, n):  # type: ignore[override]
        sd, meta = read_model_file(self.paths[n])
        if meta["sha256"] != self.metas[n]["sha256"]:
            raise UserError(f"{self.paths[n]} changed while the star was training")
        return sd


# ---------------------------------------------------------------- training

def star_settings(sc: StarConfig) -> dict[str, Any]:
    """The settings recorded in a star file's metadata."""
    return {"t_sampling": sc.t_sampling, "beta": list(sc.beta), "t_constant": sc.t_constant, "mu": sc.mu,
            "align_every": sc.align_every, "init": sc.init, "init_source": sc.init_source, "chunks": sc.chunks,
            "bn_batches": sc.bn_batches, "match_iters": sc.match_iters}


def _check_sources(model: nn.Module, sources: Sequence[StateDict]) -> None:
    want = model.state_dict()
    for i in range(len(sources)):
        sd = sources[i]
        missing = [k for k in want if k not in sd]
        extra = [k for k in sd if k not in want]
        bad = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
        if missing or extra or bad:
            raise UserError(f"source {i} does not fit the configured model ({cfg_hint(missing, extra, bad)}); "
                            "give sources trained with the same model config")


def cfg_hint(missing, extra, bad) -> str:
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}")
    if bad:
        parts.append(f"shape differs for {bad[:3]}")
    return ", ".join(parts)


def _alignments_before(sc: StarConfig, epoch: int, step: int) -> int:
    """How many alignments a run has done when it has finished `epoch` epochs (`step` steps)."""
    if sc.align_every == "epoch":
        return epoch
    return -(-step // sc.align_every) if isinstance(sc.align_every, int) else 0


def train_star(cfg: Config, sources: Sequence[StateDict], *, seed: int = 0, device: str | torch.device = "auto",
               state_path: str | Path | None = None, progress: bool | None = None,
               source_ids: Sequence[str] | None = None,
               on_epoch: Callable[[int, dict], None] | None = None) -> tuple[nn.Module, dict]:
    """Train a star model from `sources` (state dicts of cfg.model trained on cfg.data) with Algorithm 1.
    -> (star module in eval mode, info: metrics, settings, timings, per-epoch history).

    `state_path`: resume file, written after every epoch. `source_ids`: digests identifying the sources in
    the resume state (default: their weights' sha256). `on_epoch(epoch, record)` is called after each
    epoch's state is saved (progress reporting; tests use it to interrupt a run)."""
    sc = cfg.star
    tc: TrainConfig = sc.train or cfg.train
    if len(sources) < 1:
        raise UserError("Starlight needs at least one source model")
    device = resolve_device(device)
    data = get_dataset(cfg.data)
    model = init_model(cfg, data, seed)
    _check_sources(model, sources)
    param_names = [k for k, _ in model.named_parameters()]
    align_on = sc.align_every != "never" or sc.init == "average"
    drop_last = len(data.train) > tc.batch_size
    if has_bn(model) and tc.batch_size // sc.chunks < 2:
        raise UserError(f"star.chunks={sc.chunks} leaves chunks of under 2 examples at batch size {tc.batch_size}; "
                        "BatchNorm needs at least 2: lower star.chunks or raise the batch size")
    if sc.init_source >= len(sources) and sc.init in ("source", "average"):
        raise UserError(f"star.init_source={sc.init_source} but only {len(sources)} sources were given")

    example = data.train.x[:2] if data.train.x is not None else torch.stack([data.train.dataset[i][0] for i in (0, 1)])
    spec = permute.spec_for(model, example) if align_on else None

    # θ_0: random (seeded), a source, or the aligned average of the sources
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
    model.to(device)

    bank = SourceBank(sources, param_names, device, sc.sources_on)
    opt = build_optimizer(model.parameters(), tc.optimizer)
    steps = num_batches(data.train, tc.batch_size, drop_last=drop_last)
    sched = build_scheduler(opt, tc, steps)
    gen = torch.Generator().manual_seed(seed)
    draws = Draws(sc, len(sources), seed)
    torch.manual_seed(seed)
    ids = list(source_ids) if source_ids is not None else [weights_sha256(sources[n]) for n in range(len(sources))]
    digest = config_digest(cfg) + ":" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:16]
    start_epoch, step, history = 0, 0, []
    # counters that reach the metadata continue across a resume, so a resumed star's file says the same
    # as an uninterrupted one's (timings too, though those are allowed to differ)
    n_align, align_seconds, seconds_before = 0, 0.0, 0.0

    st = resume_training_state(state_path, digest, seed, model, opt, sched, gen, device)
    if st is not None:
        draws.set_state(st["draws"])
        for n, perm in enumerate(st["perms"]):
            if perm is not None:
                bank.set_perm(n, perm, permute, spec)
        start_epoch, step, history = st["epoch"], st["step"], list(st["history"])
        n_align = st.get("alignments", _alignments_before(sc, start_epoch, step))  # old states lack it
        align_seconds, seconds_before = st.get("align_seconds", 0.0), st.get("seconds", 0.0)

    params = dict(model.named_parameters())
    scratch = {k: b.detach().clone() for k, b in model.named_buffers()} if has_bn(model) else None
    work = new_work(params)
    label_smoothing = tc.label_smoothing
    t0 = time.perf_counter()

    def align():
        nonlocal align_seconds, n_align
        a0 = time.perf_counter()
        star_sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        bank.align_to(star_sd, permute, spec, seed=seed * 100003 + step, max_iter=sc.match_iters)
        align_seconds += time.perf_counter() - a0
        n_align += 1

    bar = tqdm(total=tc.epochs * steps, initial=start_epoch * steps, disable=None if progress is None else not progress,
               desc="starlight", unit="batch", leave=False, dynamic_ncols=True)
    for epoch in range(start_epoch, tc.epochs):
        if sc.align_every == "epoch":
            align()
        model.train()
        loss_sum, seen = 0.0, 0
        for x, y in batches(data.train, tc.batch_size, generator=gen, augment=data.augment, device=device,
                            drop_last=drop_last):
            if isinstance(sc.align_every, int) and step % sc.align_every == 0:
                align()
            chosen = [draws.draw() for _ in range(sc.chunks)]
            opt.zero_grad(set_to_none=True)
            with autocast(device, tc.amp):
                loss = star_loss(model, params, [(bank.get(n), t) for n, t in chosen], x, y, mu=sc.mu,
                                 label_smoothing=label_smoothing, scratch=scratch, work=work)
            if not np.isfinite(loss):
                bar.close()
                raise UserError(f"Starlight diverged: loss {loss} at epoch {epoch + 1}; lower the learning rate "
                                f"({'star.train' if sc.train else 'train'}.optimizer.lr) or set grad_clip")
            if tc.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss * len(y)
            seen += len(y)
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", loss=f"{loss_sum / seen:.4f}")
        recalibrate_bn(model, data.train, tc.eval_batch_size, sc.bn_batches, device)
        history.append({"epoch": epoch + 1, "interp_loss": loss_sum / max(1, seen)})
        if state_path:
            save_training_state(state_path, digest, seed, epoch + 1, model, opt, sched, gen, device, step=step,
                                draws=draws.get_state(), perms=bank.perms, history=history, alignments=n_align,
                                align_seconds=align_seconds, seconds=seconds_before + time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    model.eval()
    metrics = evaluate_splits(model, data, tc.eval_batch_size)
    info = {"metrics": metrics, "star": star_settings(sc), "epochs": tc.epochs, "steps": step,
            "n_sources": len(sources), "seconds": seconds, "align_seconds": align_seconds, "alignments": n_align,
            "sources_on": "device" if bank.on_device else "cpu", "source_bytes": bank.bytes, "history": history}
    return model, info


def star_to_file(cfg: Config, source_paths: Sequence[str | Path], out: str | Path, *, seed: int = 0,
                 device: str | torch.device = "auto", progress: bool | None = None,
                 on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train a star from model files and write it (resumable through `OUT.state`, removed when done).
    The metadata lists the sources (path + sha256), the Starlight settings and final metrics. -> metadata."""
    if not source_paths:
        raise UserError("give at least one source model file (--sources F1 F2 ...)")
    files = SourceFiles(source_paths)
    data = get_dataset(cfg.data)
    want = {"model": cfg.model.model_dump(), "data": {"config": cfg.data.model_dump()}}
    for p, m in zip(files.paths, files.metas):
        why = compatible(want, m)
        if why:
            raise UserError(f"{p} does not match the config: {why}")
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    ids = [m["sha256"] for m in files.metas]
    model, info = train_star(cfg, files, seed=seed, device=device, state_path=state_path, progress=progress,
                             source_ids=ids, on_epoch=on_epoch)
    extra = {k: info[k] for k in ("epochs", "steps", "seconds", "align_seconds", "alignments", "history")}
    meta = save_model(out, model.state_dict(), model_meta(
        cfg, data, seed, "star", metrics=info["metrics"], star={**info["star"], **extra},
        sources=[{"path": str(p), "sha256": m["sha256"], "seed": m.get("seed")}
                 for p, m in zip(files.paths, files.metas)]))
    state_path.unlink(missing_ok=True)
    return meta
