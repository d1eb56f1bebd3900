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

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import metrics as M
from .data import Split, get_dataset
from .engine import Engine, Stack
from .errors import UserError
from .interpolate import average
from .models import build_model
from .permute import align as _align
from .utils import resolve_device

StateDict = dict[str, torch.Tensor]
BMA_KINDS = ("star_bma", "regular_bma")


@dataclass(frozen=True)
class BMASettings:
    """How the predictors are drawn and scored (one object from the CLI, the API and the study).

    k: models per BMA run; seed / seeds: BMA runs with evaluation seeds seed .. seed+seeds-1; align:
    weight matching before interpolating; ns: also score the `by_n` predictors with only the first n
    sources, for each n (under `_by_n`); bn_batches: training batches for BN recalibration (None: the
    whole training split); batch_size / chunk: evaluation batch and weight sets per stacked call; ood
    (+ ood_max): OOD AUROC against shifted test inputs; n_bins: calibration bins; vectorize: vmap the
    stacked weights (False: a loop, the reference)."""

    k: int = 32
    seed: int = 0
    seeds: int = 3
    align: bool = True
    ns: tuple[int, ...] | None = None
    bn_batches: int | None = None
    batch_size: int = 1000
    chunk: int = 8
    ood: bool = True
    ood_max: int | None = None
    n_bins: int = 15
    vectorize: bool = True


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

def _bma_run(ctx: Context, chunk_weights: Callable[[slice], tuple[Stack, Stack]], t: torch.Tensor):
    """One BMA run: the i-th model is (1 - t_i)·base_i + t_i·end_i, where `chunk_weights(slice)` gives the
    stacked (base, end) weights of a slice of the K draws. Streams the K models in chunks, never holding
    more than `chunk` weight sets or their probabilities at once.
    -> (final mean probabilities on test and each shift, metrics at each prefix size in ks, seconds spent
    scoring the prefixes)."""
    ev, ood_x, chunk, batch_size, ks = ctx.engine, ctx.ood_x, ctx.chunk, ctx.batch_size, ctx.ks
    k = len(t)
    sums: dict[str, torch.Tensor] = {}
    curve: dict[int, dict[str, float]] = {}
    t_score = 0.0
    for start in range(0, k, chunk):
        sl = slice(start, min(k, start + chunk))
        base, ends = chunk_weights(sl)
        w = ev.recalibrate(Stack.lerp_rows(base, ends, t[sl]), ctx.data.train, batch_size, ctx.bn_batches)
        prefix = {}
        for s, xs in (("test", ctx.data.test.x), *ood_x.items()):
            p = ev.probs(w, xs, batch_size).cumsum(0)  # running sums after each model in the chunk
            prefix[s] = p + sums[s].unsqueeze(0) if s in sums else p
            sums[s] = prefix[s][-1]
        for j in range(sl.stop - sl.start):
            kk = start + j + 1
            if kk in ks:
                t0 = time.perf_counter()
                curve[kk] = score((prefix["test"][j] / kk).cpu(), ctx.labels,
                                  {s: (prefix[s][j] / kk).cpu() for s in ood_x}, ctx.n_bins)
                t_score += time.perf_counter() - t0
    final = {s: (v / k).cpu() for s, v in sums.items()}
    return final, curve, t_score


class Context:
    """What every predictor reads: the engine, the data, the settings, the networks, and the caches they
    share (the sources' predictions, alignments). Alignment cost is kept apart, in `align_info`."""

    def __init__(self, engine: Engine, data, star_sd, source_sds, fusion_sd, aligner, settings: BMASettings,
                 ood_x: dict, say: Callable[[str], None]):
        self.engine, self.data, self.aligner, self.say = engine, data, aligner, say
        self.star_sd, self.source_sds, self.fusion_sd = star_sd, source_sds, fusion_sd
        st = settings
        self.k, self.seed, self.seeds, self.chunk, self.n_bins = st.k, st.seed, st.seeds, st.chunk, st.n_bins
        self.batch_size, self.bn_batches, self.ood_x = st.batch_size, st.bn_batches, ood_x
        self.labels = data.test.y.reshape(-1)  # one per prediction: next-token targets count every token
        self.ks = k_checkpoints(st.k)
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


class SegmentBMA(Predictor):
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
            final, curve, t_score = _bma_run(ctx, chunk_weights, t)
            out.append(Run(final, time.perf_counter() - t0 - t_align - t_score, curve))
        return out

    def meta(self, ctx, n, runs):
        return {"kind": self.kind, "k": ctx.k, "n_sources": n, "n_seeds": ctx.seeds}

    def entries(self, ctx, n):
        runs = self.runs(ctx, n)
        if n == ctx.n_sources:
            ctx.curves[self.name] = _curve_summary([r.curve for r in runs], ctx.ks)
        return {self.name: scored(self, ctx, n, runs)}


class StarBMA(SegmentBMA):
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


class RegularBMA(SegmentBMA):
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


def evaluate_predictors(cfg, star_sd: StateDict | None, source_sds: list[StateDict],
                        settings: BMASettings | None = None, *, fusion_sd: StateDict | None = None,
                        device: str | torch.device = "auto", progress: Callable[[str], None] | None = None,
                        data=None, model: nn.Module | None = None) -> dict:
    """Score every predictor of PREDICTORS (module docstring) on the test split of `cfg.data`, drawn and
    scored as `settings` (BMASettings) says. `data` (a DataBundle) and `model` (the architecture) replace
    cfg's for the Python API's live objects."""
    st = settings or BMASettings()
    _check_settings(st, len(source_sds))
    dev = resolve_device(device)
    data = data if data is not None else get_dataset(cfg.data)
    if data.test.x is None or data.train.x is None:
        raise UserError("BMA evaluation needs a data set held in memory (x, y tensors)")
    if model is None:
        model = build_model(cfg.model, data.input_shape, data.num_classes, tokens=data.sequence)
    _check_fit(cfg, model, [star_sd, fusion_sd, *source_sds])
    ev = Engine(model, dev, "vmap" if st.vectorize else "loop", fall_back=True)
    ood_x = ood_sets(data, seed=0, max_n=st.ood_max) if st.ood else {}
    ctx = Context(ev, data, star_sd, source_sds, fusion_sd, _aligner(st.align, model, data.train.x[:8], st.seed),
                  st, ood_x, progress or (lambda s: None))
    info: dict[str, Any] = {"k": st.k, "seeds": list(range(st.seed, st.seed + st.seeds)),
                            "n_sources": len(source_sds), "aligned": st.align, "bn_recalibrated": bool(ev.bn_keys),
                            "bn_batches": st.bn_batches, "device": str(dev), "test_size": len(data.test.y),
                            "test_predictions": data.test.y.numel(), "ood_shifts": list(ood_x),
                            "vectorized": st.vectorize, "n_bins": st.n_bins}
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
            for n in sorted(set(st.ns or []))}
    ctx.align_info["seconds"] += ctx.align_info["to_star_seconds"]
    ctx.align_info["pairs_aligned"] = len(ctx._pairs)
    res["_info"] = {**info, "alignment": ctx.align_info}
    res["_curves"] = ctx.curves
    if by_n:
        res["_by_n"] = by_n
    return res


def _check_settings(st: BMASettings, n_sources: int) -> None:
    if st.k < 1 or st.seeds < 1:
        raise UserError("k and seeds must be at least 1")
    if not n_sources:
        raise UserError("BMA needs at least one source model")
    bad_n = [n for n in sorted(set(st.ns or [])) if not 1 <= n <= n_sources]
    if bad_n:
        raise UserError(f"ns must lie in 1..{n_sources} (the number of sources), got {bad_n[0]}")


def _check_fit(cfg, model: nn.Module, sds: Sequence[StateDict | None]) -> None:
    for sd in sds:
        if sd is None:
            continue
        missing = set(model.state_dict()) ^ set(sd)
        if missing:
            raise UserError(f"a model's weights do not fit the architecture {cfg.model.name or cfg.model.factory} "
                            f"(mismatched tensors: {sorted(missing)[:3]})")
