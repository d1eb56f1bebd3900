"""Bayesian model averaging over star domains, against deep ensembles and single networks (docs/method.md).

Predictors are objects in one registry, `PREDICTORS` (adding one is one entry, or `register_predictor`),
each giving its predictions (`runs`); one loop (`scored`) scores them all on the same test split with every
metric of `metrics.METRICS`. The built-in ones:

- `source_i`: each source alone; `sources_mean`: their mean (CI over sources).
- `ensemble`: the deep ensemble, softmax average of the n sources.
- `star`: the star model alone; `fusion_star`: a mu > 0 star, when given.
- `star_bma`: K models drawn uniformly from the union of segments star -> aligned source: source n
  uniform, t ~ U[0, 1], (1 - t)·θ* + t·π(θ_n); BatchNorm statistics recomputed for every draw; softmax average.
- `regular_bma` (control): K models on segments between pairs of sources, θ_j aligned to θ_i:
  pair {i, j} uniform, t ~ U[0, 1], (1 - t)·θ_i + t·π_i(θ_j); BN recomputed; softmax average.
- `weight_average`: one network, the average of the sources aligned to source 0, BN recomputed.

Cost: sampled models are never built as modules. A chunk of them is one stack of the stacked-weights
engine (`stardomain.engine`): weights stacked along a leading axis, interpolated with `torch.lerp`, run
through one module under `torch.vmap`; BatchNorm recalibration is batched the same way (one train-mode
pass per training batch for the whole chunk) with the engine's one convention, the one of
`interpolate.recalibrate_bn`.

Timing: `seconds` is the cost of producing a predictor's test and OOD probabilities (sampling weights,
BN recalibration, forward passes, averaging; for the ensemble its members' forward passes), not the
metric computation and not alignment (reported once under `_info.alignment`). BMA seconds are per run.

Evaluation seeds: the K draws of a BMA predictor are repeated with seeds seed, seed+1, ...; its metrics
are the mean over those runs with a 95% t-interval. Deterministic predictors have one value. The metric-
vs-K curves use prefixes of the same K draws (the first k models of each run).

Result layout (`evaluate_predictors`): one top-level entry per predictor name holding the metrics
(`accuracy`, `nll`, `brier`, `ece`, `ace`, `auroc_misclassification`, `auroc_misclassification_entropy`,
`ood_auroc` = mean over shifts, `ood_auroc_<shift>`, `ood_auroc_entropy`), `seconds`, and, for
predictors with several values, `std`, `ci95` (half-width), `values` and `n_values`. Keys starting with "_" are not
predictors: `_info` (settings, alignment), `_curves` (metric vs K), `_by_n` (predictors vs number of
sources, when asked for).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import metrics as M
from .checkpoint import (atomic_write_bytes, atomic_write_json, build_from_meta, check_layout, compatible,
                         read_model_file, weights_sha256)
from .config import Config, validate
from .data import Split, get_dataset
from .engine import Engine, Stack
from .errors import UserError
from .interpolate import average
from .models import build_model
from .permute import align as _align
from .safety import check_meta_factories
from .utils import json_safe, resolve_device

StateDict = dict[str, torch.Tensor]
BMA_KINDS = ("star_bma", "regular_bma")


# ---------------------------------------------------------------- draws

def _generator(seed: int, tag: str) -> torch.Generator:
    tag_id = sum((i + 1) * ord(c) for i, c in enumerate(tag))
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, tag_id]).generate_state(1)[0]))


def draw_star(n_sources: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K (source index, t) draws for star-domain BMA: index uniform over sources, t ~ U[0, 1]."""
    idx = torch.randint(0, n_sources, (k,), generator=gen)
    t = torch.rand(k, generator=gen, dtype=torch.float64)
    return idx, t


def draw_pairs(n_sources: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K (i, j, t) draws for regular-domain BMA: unordered pair i < j uniform, t ~ U[0, 1]."""
    if n_sources < 2:
        raise UserError("regular-domain BMA needs at least two sources")
    pairs = torch.tensor([(i, j) for i in range(n_sources) for j in range(i + 1, n_sources)])
    p = pairs[torch.randint(0, len(pairs), (k,), generator=gen)]
    t = torch.rand(k, generator=gen, dtype=torch.float64)
    return p[:, 0], p[:, 1], t


def k_checkpoints(k: int) -> list[int]:
    """1, 2, 4, ... and K: the prefix sizes of the metric-vs-K curve."""
    ks, c = [], 1
    while c < k:
        ks.append(c)
        c *= 2
    return ks + [k]


# ---------------------------------------------------------------- OOD sets

def ood_sets(data, seed: int = 0, max_n: int | None = None) -> dict[str, torch.Tensor]:
    """Shifted inputs built offline from the test split, in the model's normalised space:
    `inverted` (pixel values 1 - p), `rot90` (rotated 90 degrees, square images only) and `noise`
    (per-pixel Gaussian with the data's mean and std, clipped to [0, 1]). Pixel space is recovered
    from the data set's recorded normalisation; deterministic for a seed."""
    x = data.test.x
    if x is None or x.dim() != 4:
        return {}
    if max_n is not None and max_n < len(x):
        x = x[torch.randperm(len(x), generator=_generator(seed, "ood-subset"))[:max_n]]
    norm = (data.info or {}).get("normalisation") or {}
    c = x.shape[1]
    mean = torch.tensor(norm.get("mean", [0.0] * c), dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm.get("std", [1.0] * c), dtype=x.dtype).view(1, -1, 1, 1)
    if mean.numel() not in (1, c) or std.numel() not in (1, c):
        return {}
    pix = x * std + mean
    out = {"inverted": ((1 - pix) - mean) / std}
    if x.shape[2] == x.shape[3]:
        out["rot90"] = torch.rot90(x, 1, dims=(2, 3)).contiguous()
    g = _generator(seed, "ood-noise")
    noise = (mean + std * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
    out["noise"] = (noise - mean) / std
    return out


# ---------------------------------------------------------------- scoring

def score(probs: torch.Tensor, labels: torch.Tensor, ood_probs: dict[str, torch.Tensor] | None = None,
          n_bins: int = 15) -> dict[str, float]:
    """All metrics of one predictive distribution (test probabilities + probabilities on each shift)."""
    m = M.classification_metrics(probs, labels, n_bins)
    if ood_probs:
        ood = [d for d in M.METRICS if d.ood_score is not None]
        for s, po in ood_probs.items():
            for d in ood:
                m[f"{d.name}_{s}"] = M.ood_auroc(probs, po, d.ood_score)
        for d in ood:
            m[d.name] = float(np.mean([m[f"{d.name}_{s}"] for s in ood_probs]))
    return m


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean of each metric over runs, with sample std and a 95% t-interval half-width (NaN for one run)."""
    from scipy import stats

    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    out: dict[str, Any] = {}
    std, ci = {}, {}
    for k in keys:
        v = np.array([r[k] for r in runs], dtype=float)
        out[k] = float(np.mean(v))
        if len(v) > 1:
            sd = float(np.std(v, ddof=1))
            std[k], ci[k] = sd, float(stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v)))
        else:
            std[k], ci[k] = float("nan"), float("nan")
    out["std"], out["ci95"], out["n_values"] = std, ci, len(runs)
    out["values"] = {k: [r[k] for r in runs] for k in keys}
    return out


# ---------------------------------------------------------------- alignment

def _aligner(align: bool, model: nn.Module, example_input: torch.Tensor, seed: int):
    """-> fn(sd_a, sd_b) -> (π(sd_b) matched to sd_a, info), or the identity when align is False."""
    if not align:
        return lambda a, b: (b, {"method": "none", "seconds": 0.0})

    def fn(a, b):
        return _align(model, a, b, example_input=example_input, seed=seed)
    return fn


# ---------------------------------------------------------------- the predictors

def _bma_run(ev: Engine, chunk_weights: Callable[[slice], tuple[Stack, Stack]], t: torch.Tensor,
             x_test: torch.Tensor, labels: torch.Tensor, ood_x: dict[str, torch.Tensor], train: Split,
             *, chunk: int, batch_size: int, bn_batches: int | None, ks: list[int], n_bins: int):
    """One BMA run: the i-th model is (1 - t_i)·base_i + t_i·end_i, where `chunk_weights(slice)` gives the
    stacked (base, end) weights of a slice of the K draws. Streams the K models in chunks, never holding
    more than `chunk` weight sets or their probabilities at once.
    -> (final mean probabilities on test and each shift, metrics at each prefix size in ks, seconds spent
    scoring the prefixes)."""
    k = len(t)
    sums: dict[str, torch.Tensor] = {}
    curve: dict[int, dict[str, float]] = {}
    t_score = 0.0
    for start in range(0, k, chunk):
        sl = slice(start, min(k, start + chunk))
        base, ends = chunk_weights(sl)
        w = ev.recalibrate(Stack.lerp_rows(base, ends, t[sl]), train, batch_size, bn_batches)
        prefix = {}
        for s, xs in (("test", x_test), *ood_x.items()):
            p = ev.probs(w, xs, batch_size).cumsum(0)  # running sums after each model in the chunk
            prefix[s] = p + sums[s].unsqueeze(0) if s in sums else p
            sums[s] = prefix[s][-1]
        for j in range(sl.stop - sl.start):
            kk = start + j + 1
            if kk in ks:
                t0 = time.perf_counter()
                curve[kk] = score((prefix["test"][j] / kk).cpu(), labels,
                                  {s: (prefix[s][j] / kk).cpu() for s in ood_x}, n_bins)
                t_score += time.perf_counter() - t0
    final = {s: (v / k).cpu() for s, v in sums.items()}
    return final, curve, t_score


class Context:
    """What every predictor reads: the engine, the data, the settings, the networks, and the caches they
    share (the sources' predictions, alignments). Alignment cost is kept apart, in `align_info`."""

    def __init__(self, engine: Engine, data, star_sd, source_sds, fusion_sd, aligner, *, k: int, seed: int,
                 seeds: int, batch_size: int, bn_batches: int | None, chunk: int, ood_x: dict, n_bins: int,
                 say: Callable[[str], None]):
        self.engine, self.data, self.aligner, self.say = engine, data, aligner, say
        self.star_sd, self.source_sds, self.fusion_sd = star_sd, source_sds, fusion_sd
        self.k, self.seed, self.seeds, self.chunk, self.n_bins = k, seed, seeds, chunk, n_bins
        self.batch_size, self.bn_batches, self.ood_x = batch_size, bn_batches, ood_x
        self.labels = data.test.y.reshape(-1)  # one per prediction: next-token targets count every token
        self.ks = k_checkpoints(k)
        self.curves: dict[str, Any] = {"k": self.ks}
        self.align_info: dict[str, Any] = {"seconds": 0.0, "to_star_seconds": 0.0}
        self._pairs: dict[tuple[int, int], StateDict] = {}
        self._to_star: list[StateDict] | None = None
        self._source_runs: list[Run] | None = None

    @property
    def n_sources(self) -> int:
        return len(self.source_sds)

    def predict(self, sd: StateDict, recalibrate: bool = False) -> Run:
        """One network (the engine's K = 1 stack) on test and every shift; BN recomputed when asked."""
        t0 = time.perf_counter()
        w = Stack.of([sd], self.engine.device)
        if recalibrate:
            w = self.engine.recalibrate(w, self.data.train, self.batch_size, self.bn_batches)
        probs = {"test": self.engine.probs(w, self.data.test.x, self.batch_size)[0].cpu()}
        for s, xo in self.ood_x.items():
            probs[s] = self.engine.probs(w, xo, self.batch_size)[0].cpu()
        return Run(probs, time.perf_counter() - t0)

    def source_runs(self) -> list[Run]:
        if self._source_runs is None:
            self._source_runs = [self.predict(sd) for sd in self.source_sds]
        return self._source_runs

    def to_star(self) -> list[StateDict]:
        """Every source aligned to the star (once)."""
        if self._to_star is None:
            t0 = time.perf_counter()
            self._to_star = [self.aligner(self.star_sd, sd)[0] for sd in self.source_sds]
            self.align_info["to_star_seconds"] = time.perf_counter() - t0
        return self._to_star

    def aligned_pair(self, i: int, j: int) -> StateDict:
        """Source j aligned to source i (once per pair)."""
        if (i, j) not in self._pairs:
            t0 = time.perf_counter()
            self._pairs[(i, j)] = self.aligner(self.source_sds[i], self.source_sds[j])[0]
            self.align_info["seconds"] += time.perf_counter() - t0
        return self._pairs[(i, j)]

    def score(self, run: Run) -> dict[str, float]:
        return score(run.probs["test"], self.labels, {s: run.probs[s] for s in self.ood_x}, self.n_bins)

    def reliability(self, run: Run) -> dict:
        return M.calibration_bins(run.probs["test"], self.labels, self.n_bins)


@dataclass
class Run:
    """One prediction: probabilities on the test split and on each shift, the seconds they cost, and (for
    BMA) the metrics after the first k models for each k of the metric-vs-K curve."""

    probs: dict[str, torch.Tensor]
    seconds: float
    curve: dict[int, dict[str, float]] | None = None


class Predictor:
    """One way of predicting from the networks. `runs(ctx, n)`: its prediction from the first n sources,
    one per evaluation seed for a randomised predictor. `cost`: networks evaluated per prediction.
    `by_n`: also scored against the number of sources. `display`: rank in tables (lower first)."""

    name = ""
    kind = "single"
    cost = "1 network"
    by_n = False
    display = 55
    repeated = False  # several runs (evaluation seeds): the entry is their mean with a 95% CI

    def available(self, ctx: Context, n: int) -> bool:
        return True

    def runs(self, ctx: Context, n: int) -> list[Run]:
        raise NotImplementedError

    def meta(self, ctx: Context, n: int, runs: list[Run]) -> dict[str, Any]:
        return {"kind": self.kind}

    def entries(self, ctx: Context, n: int) -> dict[str, dict]:
        ctx.say(self.name)
        return {self.name: scored(self, ctx, n, self.runs(ctx, n))}


def scored(pred: Predictor, ctx: Context, n: int, runs: list[Run]) -> dict[str, Any]:
    """The one scoring loop: every metric of every run; several runs -> mean, std, 95% CI, values."""
    ms = [ctx.score(r) for r in runs]
    if not pred.repeated:
        return {**ms[0], "seconds": runs[0].seconds, "reliability": ctx.reliability(runs[0]),
                **pred.meta(ctx, n, runs)}
    secs = float(np.mean([r.seconds for r in runs]))
    return {**summarise(ms), "seconds": secs, "seconds_per_model": secs / ctx.k,
            "reliability": ctx.reliability(runs[0]), **pred.meta(ctx, n, runs)}


class Sources(Predictor):
    """Each source alone (`source_i`) and their mean over sources (`sources_mean`, CI over sources)."""

    name, display = "sources_mean", 60

    def runs(self, ctx, n):
        return ctx.source_runs()[:n]

    def entries(self, ctx, n):
        ctx.say("sources")
        runs = self.runs(ctx, n)
        out = {f"source_{i}": scored(self, ctx, n, [r]) for i, r in enumerate(runs)}
        out["sources_mean"] = {**summarise([ctx.score(r) for r in runs]),
                               "seconds": float(np.mean([r.seconds for r in runs])), "kind": "mean over sources"}
        return out


class Ensemble(Predictor):
    """The deep ensemble: softmax average of the sources (its cost: their forward passes + averaging)."""

    name, kind, cost, by_n, display = "ensemble", "ensemble", "n networks", True, 0

    def runs(self, ctx, n):
        src = ctx.source_runs()[:n]
        t0 = time.perf_counter()
        probs = {s: torch.stack([r.probs[s] for r in src]).mean(0) for s in src[0].probs}
        return [Run(probs, sum(r.seconds for r in src) + time.perf_counter() - t0)]

    def meta(self, ctx, n, runs):
        return {"kind": self.kind, "n_sources": n}


class Single(Predictor):
    """One given network (the star, a fusion star)."""

    def __init__(self, name: str, attr: str, display: int):
        self.name, self.attr, self.display = name, attr, display

    def available(self, ctx, n):
        return getattr(ctx, self.attr) is not None

    def runs(self, ctx, n):
        return [ctx.predict(getattr(ctx, self.attr))]


class WeightAverage(Predictor):
    """One network: the average of the sources aligned to source 0, BN recomputed (alignment and
    averaging are not in its seconds)."""

    name, display = "weight_average", 50

    def runs(self, ctx, n):
        avg = average([ctx.source_sds[0]] + [ctx.aligned_pair(0, j) for j in range(1, n)])
        return [ctx.predict(avg, recalibrate=True)]

    def meta(self, ctx, n, runs):
        return {"kind": self.kind, "anchor": "source_0"}


class BMA(Predictor):
    """K models drawn on segments, BN recomputed for each, softmax average; one run per evaluation seed.
    Subclasses give the draws (`segments`). The metric-vs-K curve of the full set of sources goes to
    `_curves`."""

    kind, cost, by_n, repeated = "bma", "K networks", True, True

    def segments(self, ctx, n, seed) -> tuple[Callable[[slice], tuple[Stack, Stack]], torch.Tensor, float]:
        """-> (chunk_weights(slice) -> (base, end) stacks, t, seconds spent aligning)."""
        raise NotImplementedError

    def runs(self, ctx, n):
        out = []
        for s in range(ctx.seed, ctx.seed + ctx.seeds):
            ctx.say(f"{self.name} n={n} seed={s}")
            t0 = time.perf_counter()
            chunk_weights, t, t_align = self.segments(ctx, n, s)
            final, curve, t_score = _bma_run(ctx.engine, chunk_weights, t, ctx.data.test.x, ctx.labels,
                                             ctx.ood_x, ctx.data.train, chunk=ctx.chunk, batch_size=ctx.batch_size,
                                             bn_batches=ctx.bn_batches, ks=ctx.ks, n_bins=ctx.n_bins)
            out.append(Run(final, time.perf_counter() - t0 - t_align - t_score, curve))
        return out

    def meta(self, ctx, n, runs):
        return {"kind": self.kind, "k": ctx.k, "n_sources": n, "n_seeds": ctx.seeds}

    def entries(self, ctx, n):
        runs = self.runs(ctx, n)
        if n == ctx.n_sources:
            ctx.curves[self.name] = _curve_summary([r.curve for r in runs], ctx.ks)
        return {self.name: scored(self, ctx, n, runs)}


class StarBMA(BMA):
    """Star-domain BMA: source uniform, t ~ U[0, 1], (1 - t)·θ* + t·π(θ_n)."""

    name, display = "star_bma", 10

    def available(self, ctx, n):
        return ctx.star_sd is not None

    def segments(self, ctx, n, seed):
        idx, t = draw_star(n, ctx.k, _generator(seed, f"star-bma-{n}"))
        dev = ctx.engine.device
        star_w = {kk: v.to(dev) for kk, v in ctx.star_sd.items()}
        to_star = ctx.to_star()

        def chunk_weights(sl):
            rows = idx[sl].tolist()
            return (Stack({kk: v.expand(len(rows), *v.shape) for kk, v in star_w.items()}),
                    Stack({kk: torch.stack([to_star[r][kk] for r in rows]).to(dev) for kk in star_w}))
        return chunk_weights, t, 0.0


class RegularBMA(BMA):
    """Regular-domain BMA (control): pair {i, j} uniform, t ~ U[0, 1], (1 - t)·θ_i + t·π_i(θ_j)."""

    name, display = "regular_bma", 20

    def available(self, ctx, n):
        return n >= 2

    def segments(self, ctx, n, seed):
        ii, jj, t = draw_pairs(n, ctx.k, _generator(seed, f"regular-bma-{n}"))
        pairs = list(zip(ii.tolist(), jj.tolist()))
        t0 = time.perf_counter()
        for i, j in pairs:  # align the drawn pairs first: alignment cost is reported apart
            ctx.aligned_pair(i, j)
        t_align = time.perf_counter() - t0
        dev = ctx.engine.device

        def chunk_weights(sl):
            rows = pairs[sl]
            return (Stack.of([ctx.source_sds[i] for i, _ in rows], dev),
                    Stack.of([ctx.aligned_pair(i, j) for i, j in rows], dev))
        return chunk_weights, t, t_align


def _curve_summary(curves: list[dict[int, dict[str, float]]], ks: list[int]) -> dict[str, Any]:
    """Mean and std over runs of every metric at each prefix size."""
    cur: dict[str, Any] = {"k": ks}
    for mn in curves[0][ks[0]]:
        vals = np.array([[c[kk][mn] for kk in ks] for c in curves], dtype=float)
        cur[mn] = vals.mean(0).tolist()
        cur[mn + "_std"] = (vals.std(0, ddof=1) if len(vals) > 1 else np.full(len(ks), np.nan)).tolist()
    return cur


# Adding a predictor is one entry here (or `register_predictor`); results are in this order.
PREDICTORS: list[Predictor] = [Sources(), Ensemble(), Single("star", "star_sd", 30),
                               Single("fusion_star", "fusion_sd", 40), WeightAverage(), StarBMA(), RegularBMA()]


def register_predictor(pred: Predictor) -> Predictor:
    """Add (or replace, by name) a predictor; `evaluate_predictors` scores it from then on."""
    PREDICTORS[:] = [p for p in PREDICTORS if p.name != pred.name] + [pred]
    return pred


def evaluate_predictors(cfg, star_sd: StateDict | None, source_sds: list[StateDict], *, k: int = 32,
                        seed: int = 0, device: str | torch.device = "auto", fusion_sd: StateDict | None = None,
                        seeds: int = 3, align: bool = True, ns: Sequence[int] | None = None,
                        bn_batches: int | None = None, batch_size: int = 1000, chunk: int = 8,
                        ood: bool = True, ood_max: int | None = None, n_bins: int = 15,
                        vectorize: bool = True, progress: Callable[[str], None] | None = None,
                        data=None, model: nn.Module | None = None) -> dict:
    """Score every predictor of PREDICTORS (module docstring) on the test split of `cfg.data`.

    k: models per BMA run; seeds: BMA runs (evaluation seeds seed .. seed+seeds-1); align: weight
    matching before interpolating (needs stardomain.permute); ns: also report the predictors with `by_n`
    with only the first n sources, for each n (under `_by_n`); bn_batches: training batches for BN
    recalibration (None: the whole training split); ood: add OOD AUROC against shifted test inputs.
    `data` (a DataBundle) and `model` (the architecture) replace cfg's for the Python API's live objects."""
    if k < 1 or seeds < 1:
        raise UserError("k and seeds must be at least 1")
    if not source_sds:
        raise UserError("BMA needs at least one source model")
    bad_n = [n for n in sorted(set(ns or [])) if not 1 <= n <= len(source_sds)]
    if bad_n:
        raise UserError(f"ns must lie in 1..{len(source_sds)} (the number of sources), got {bad_n[0]}")
    dev = resolve_device(device)
    data = data if data is not None else get_dataset(cfg.data)
    if data.test.x is None or data.train.x is None:
        raise UserError("BMA evaluation needs a data set held in memory (x, y tensors)")
    if model is None:
        model = build_model(cfg.model, data.input_shape, data.num_classes, tokens=data.sequence)
    _check_fit(cfg, model, [star_sd, fusion_sd, *source_sds])
    ev = Engine(model, dev, "vmap" if vectorize else "loop", fall_back=True)
    ood_x = ood_sets(data, seed=0, max_n=ood_max) if ood else {}
    ctx = Context(ev, data, star_sd, source_sds, fusion_sd, _aligner(align, model, data.train.x[:8], seed),
                  k=k, seed=seed, seeds=seeds, batch_size=batch_size, bn_batches=bn_batches, chunk=chunk,
                  ood_x=ood_x, n_bins=n_bins, say=progress or (lambda s: None))
    info: dict[str, Any] = {"k": k, "seeds": list(range(seed, seed + seeds)), "n_sources": len(source_sds),
                            "aligned": align, "bn_recalibrated": bool(ev.bn_keys), "bn_batches": bn_batches,
                            "device": str(dev), "test_size": len(data.test.y),
                            "test_predictions": data.test.y.numel(), "ood_shifts": list(ood_x),
                            "vectorized": vectorize, "n_bins": n_bins}
    # warm-up (so the first timing is not inflated); a module vmap cannot run falls back to a loop
    ev.probs(ev.recalibrate(Stack.of(source_sds[:1], dev), Split(data.train.x[:8], data.train.y[:8]), 8, 1),
             data.test.x[:2])
    if ev.fallback_reason:
        info["vectorized"] = False
        info["vmap_error"] = ev.fallback_reason
    res: dict[str, Any] = {}
    for pred in PREDICTORS:
        if pred.available(ctx, ctx.n_sources):
            res.update(pred.entries(ctx, ctx.n_sources))
    by_n = {str(n): {p.name: p.entries(ctx, n)[p.name] for p in PREDICTORS if p.by_n and p.available(ctx, n)}
            for n in sorted(set(ns or []))}
    ctx.align_info["seconds"] += ctx.align_info["to_star_seconds"]
    ctx.align_info["pairs_aligned"] = len(ctx._pairs)
    res["_info"] = {**info, "alignment": ctx.align_info}
    res["_curves"] = ctx.curves
    if by_n:
        res["_by_n"] = by_n
    return res


def _check_fit(cfg, model: nn.Module, sds: Sequence[StateDict | None]) -> None:
    for sd in sds:
        if sd is None:
            continue
        missing = set(model.state_dict()) ^ set(sd)
        if missing:
            raise UserError(f"a model's weights do not fit the architecture {cfg.model.name or cfg.model.factory} "
                            f"(mismatched tensors: {sorted(missing)[:3]})")


# ---------------------------------------------------------------- files, report, plots

def bma_files(star_path, source_paths: Sequence, *, k: int = 32, seed: int = 0, json_out=None,
              seeds: int = 3, plot=None, fusion_path=None, align: bool = True, ns: Sequence[int] | None = None,
              bn_batches: int | None = None, device: str = "auto", ood: bool = True,
              progress: Callable[[str], None] | None = None) -> dict:
    """Load the model files, check they fit together, evaluate every predictor, write JSON (NaN -> null)
    and the plot. The data set and architecture come from the star's metadata."""
    if not source_paths:
        raise UserError("give at least one source model file (--sources F1 F2 ...)")
    star_sd, star_meta = read_model_file(star_path)
    sources = [read_model_file(p) for p in source_paths]
    fusion = read_model_file(fusion_path) if fusion_path else None
    for p, (_, meta) in zip([*source_paths, *([fusion_path] if fusion else [])], [*sources, *([fusion] if fusion else [])]):
        why = compatible(star_meta, meta)
        if why:
            raise UserError(f"{p} cannot be compared with the star {star_path}: {why}")
    check_meta_factories(star_meta, str(star_path))  # its model and data are built below
    want = build_from_meta(star_meta, str(star_path), weights=star_sd).state_dict()
    for p, (sd, _) in zip([*source_paths, *([fusion_path] if fusion else [])], [*sources, *([fusion] if fusion else [])]):
        check_layout(want, sd, str(p), against=f"the star {star_path}'s architecture")
    cfg = validate(Config, {"data": star_meta["data"]["config"], "model": star_meta["model"]}, where=str(star_path))
    res = evaluate_predictors(cfg, star_sd, [sd for sd, _ in sources], k=k, seed=seed, device=device,
                              fusion_sd=fusion[0] if fusion else None, seeds=seeds, align=align, ns=ns,
                              bn_batches=bn_batches, ood=ood, progress=progress)
    res["_info"]["files"] = {"star": {"path": str(star_path), "sha256": weights_sha256(star_sd)},
                             "sources": [{"path": str(p), "sha256": weights_sha256(sd)}
                                         for p, (sd, _) in zip(source_paths, sources)]}
    if fusion:
        res["_info"]["files"]["fusion"] = {"path": str(fusion_path), "sha256": weights_sha256(fusion[0])}
    if json_out:
        atomic_write_json(json_out, json_safe(res))
    if plot:
        plot_result(res, plot)
    return res


def predictors(result: dict) -> list[str]:
    """Predictor names in a result, in display order (each predictor's `display` rank; names no
    registered predictor knows after those; individual sources last)."""
    rank = {p.name: p.display for p in PREDICTORS}
    names = [n for n in result if not n.startswith(("_", "source_"))]
    names = sorted(names, key=lambda n: rank.get(n, 1000))  # stable: unknown names keep their order
    return names + sorted((n for n in result if n.startswith("source_")), key=lambda s: int(s.split("_")[1]))


def _label(name: str) -> str:
    d = M.metric(name)
    return d.label if d else name


def table(result: dict, cols: Sequence[str] | None = None) -> str:
    """The plain-text table the CLI prints: one row per predictor (sources apart), one column per metric
    of metrics.METRICS present in the result, and seconds."""
    cols = list(cols) if cols is not None else [*_metric_columns(result), "seconds"]
    lines = [f"{'predictor':<16}" + "".join(f"{_label(c)[:12]:>13}" for c in cols)]
    for name in predictors(result):
        if not name.startswith("source_"):
            e = result[name]
            lines.append(f"{name:<16}" + "".join(f"{e[c]:>13.4f}" if isinstance(e.get(c), float) else f"{'n/a':>13}"
                                                 for c in cols))
    return "\n".join(lines)


def _metric_columns(result: dict) -> list[str]:
    """Every metric of metrics.METRICS that some predictor of the result has."""
    names = predictors(result)
    return [d.name for d in M.METRICS if any(d.name in result.get(n, {}) for n in names)]


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _cell(e: dict, m: str) -> str:
    v = _num(e.get(m))
    if math.isnan(v):
        return "n/a"
    ci = _num((e.get("ci95") or {}).get(m))
    return f"{v:.4f}" if math.isnan(ci) else f"{v:.4f} ± {ci:.4f}"


def report_section(result: dict) -> str:
    """A markdown section: predictors x metrics (± 95% CI half-width over evaluation seeds for BMA,
    over sources for the source mean), and sentences, generated from the numbers, saying where
    star-domain BMA beats the deep ensemble and where it does not."""
    info = result.get("_info", {})
    cols = _metric_columns(result)
    names = [n for n in predictors(result) if not n.startswith("source_")]
    lines = ["## Bayesian model averaging", ""]
    lines.append(f"K = {info.get('k')} sampled models per BMA run, {len(info.get('seeds', []))} evaluation seed(s), "
                 f"{info.get('n_sources')} sources, test set of {info.get('test_size')} examples; sources "
                 f"{'aligned by weight matching' if info.get('aligned') else 'NOT aligned'}; BatchNorm "
                 f"{'recomputed for every sampled model' if info.get('bn_recalibrated') else 'absent'}. "
                 "Values after ± are 95% CI half-widths (t-interval over evaluation seeds; over sources for "
                 "the source mean). ECE uses 15 equal-width bins, ACE 15 equal-mass bins; Brier is the "
                 "multi-class sum over classes. OOD shifts: "
                 f"{', '.join(info.get('ood_shifts', [])) or 'none'}.")
    lines += ["", "| predictor | " + " | ".join(_label(c) for c in cols) + " | seconds |",
              "|---|" + "---|" * (len(cols) + 1)]
    for n in names:
        e = result[n]
        lines.append(f"| {n} | " + " | ".join(_cell(e, c) for c in cols) + f" | {_num(e.get('seconds')):.2f} |")
    lines.append("")
    if "star_bma" in result and "ensemble" in result:
        lines += _star_bma_sentences(result, cols)
    if result.get("_by_n"):
        lines += _by_n_table(result["_by_n"])
    return "\n".join(lines) + "\n"


def _star_bma_sentences(result: dict, cols: list[str]) -> list[str]:
    """Where star-domain BMA beats the ensemble (each metric's direction from its descriptor), within
    the CI, or loses; then the star, the fusion star and the regular-domain control in numbers."""
    info = result.get("_info", {})
    sb, en = result["star_bma"], result["ensemble"]
    better, worse, tied = [], [], []
    for c in cols:
        a, b = _num(sb.get(c)), _num(en.get(c))
        if math.isnan(a) or math.isnan(b):
            continue
        ci = _num((sb.get("ci95") or {}).get(c))
        ci = 0.0 if math.isnan(ci) else ci
        txt = f"{_label(c)} ({a:.4f} vs {b:.4f})"
        if abs(a - b) <= ci:
            tied.append(txt)
        elif (a > b) == M.metric(c).higher_is_better:
            better.append(txt)
        else:
            worse.append(txt)
    parts, lines = [], []
    if better:
        parts.append("Star-domain BMA beats the deep ensemble on " + ", ".join(better))
    if worse:
        parts.append(("it is worse on " if better else "Star-domain BMA is worse than the deep ensemble on ")
                     + ", ".join(worse))
    if tied:
        parts.append("the difference lies within the 95% CI on " + ", ".join(tied))
    if parts:
        lines.append("; ".join(parts) + " (star BMA vs ensemble).")
    if "star" in result:
        st = result["star"]
        lines.append(f"The star alone reaches accuracy {_num(st.get('accuracy')):.4f} and NLL "
                     f"{_num(st.get('nll')):.4f} at the cost of one network, against "
                     f"{_num(en.get('accuracy')):.4f} and {_num(en.get('nll')):.4f} for the "
                     f"{info.get('n_sources')}-model ensemble.")
    if "fusion_star" in result:
        fu = result["fusion_star"]
        lines.append(f"The fusion star (mu > 0) reaches accuracy {_num(fu.get('accuracy')):.4f} and NLL "
                     f"{_num(fu.get('nll')):.4f}, one network against the ensemble's "
                     f"{_num(en.get('accuracy')):.4f} and {_num(en.get('nll')):.4f}.")
    if "regular_bma" in result:
        rb = result["regular_bma"]
        lines.append(f"Control: regular-domain BMA has NLL {_cell(rb, 'nll')} and misclassification AUROC "
                     f"{_cell(rb, 'auroc_misclassification')}, star-domain BMA {_cell(sb, 'nll')} and "
                     f"{_cell(sb, 'auroc_misclassification')}.")
    return lines


def _by_n_table(by_n: dict) -> list[str]:
    kinds = ("ensemble", "star_bma", "regular_bma")
    lines = ["", "Against the number of sources n (NLL / misclassification AUROC):", "",
             "| n | " + " | ".join(kinds) + " |", "|---|---|---|---|"]
    for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
        cells = [f"{_cell(e[p], 'nll')} / {_cell(e[p], 'auroc_misclassification')}" if p in e else "n/a"
                 for p in kinds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def plot_result(result: dict, path) -> None:
    """Reliability diagrams and metric-vs-K curves in one PNG (written atomically)."""
    from matplotlib.figure import Figure  # the object API: never switches a notebook's backend

    fig = Figure(figsize=(15, 9))
    axes = fig.subplots(2, 3)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    colours = {"ensemble": "C0", "star_bma": "C1", "regular_bma": "C2", "star": "C3", "weight_average": "C4",
               "fusion_star": "C5", "source_0": "C7"}
    for name, col in colours.items():
        rel = (result.get(name) or {}).get("reliability")
        if not rel:
            continue
        pts = [(c, a) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if n and c is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=col, ms=3, label=f"{name} (ECE {_num(result[name].get('ece')):.3f})")
    ax.set(xlabel="confidence (top-label)", ylabel="accuracy", title="reliability (15 equal-width bins)",
           xlim=(0, 1), ylim=(0, 1))
    rel_legend = ax.get_legend_handles_labels()  # drawn below the figure, where it covers no curve
    curves = result.get("_curves", {})
    panels = ("nll", "ece", "auroc_misclassification", "accuracy", "ood_auroc")
    for ax, m in zip(axes.flat[1:], panels):
        title = _label(m)
        for kind, col in (("star_bma", "C1"), ("regular_bma", "C2")):
            c = curves.get(kind)
            if not c or m not in c:
                continue
            mean = np.array([_num(v) for v in c[m]])
            sd = np.array([_num(v) for v in c.get(m + "_std", [None] * len(mean))])
            ax.plot(c["k"], mean, "o-", color=col, label=kind)
            if not np.isnan(sd).all():
                ax.fill_between(c["k"], mean - sd, mean + sd, color=col, alpha=0.2)
        for name, col, ls in (("ensemble", "C0", "--"), ("star", "C3", ":"), ("weight_average", "C4", "-.")):
            v = _num((result.get(name) or {}).get(m))
            if not math.isnan(v):
                ax.axhline(v, color=col, ls=ls, label=name)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="K (models averaged)", title=f"{title} vs K")
        if m == "nll":
            ax.set_ylabel("test cross-entropy (nats)")
    # the legends below the panels, where they cover no curve: reliability (with ECE), then the K panels
    handles: dict = {}
    for ax in axes.flat[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if rel_legend[0]:
        fig.legend(*rel_legend, loc="lower center", bbox_to_anchor=(0.5, 0.035), ncol=len(rel_legend[0]),
                   fontsize=8, frameon=False, title="reliability", title_fontsize=8)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
    fig.suptitle(f"BMA: {result.get('_info', {}).get('n_sources')} sources, K = {result.get('_info', {}).get('k')}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": "stardomain bma"})  # see checkpoint.check_output
    atomic_write_bytes(path, buf.getvalue())


