"""Bayesian model averaging over star domains, against deep ensembles and single networks (PAPER.md).

Predictors, all scored on the same test split with the same metrics (`stardomain.metrics`):

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

import copy
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import metrics as M
from .data import Split
from .engine import Engine, Stack
from .errors import UserError

StateDict = dict[str, torch.Tensor]
METRICS = ("accuracy", "nll", "brier", "ece", "ace", "auroc_misclassification", "auroc_misclassification_entropy")
HIGHER_IS_BETTER = {"accuracy": True, "nll": False, "brier": False, "ece": False, "ace": False,
                    "auroc_misclassification": True, "auroc_misclassification_entropy": True,
                    "ood_auroc": True, "ood_auroc_entropy": True}
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
        for s, po in ood_probs.items():
            m[f"ood_auroc_{s}"] = M.ood_auroc(probs, po, "maxprob")
            m[f"ood_auroc_entropy_{s}"] = M.ood_auroc(probs, po, "entropy")
        m["ood_auroc"] = float(np.mean([m[f"ood_auroc_{s}"] for s in ood_probs]))
        m["ood_auroc_entropy"] = float(np.mean([m[f"ood_auroc_entropy_{s}"] for s in ood_probs]))
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
    from .permute import align as _align

    def fn(a, b):
        return _align(model, a, b, example_input=example_input, seed=seed)
    return fn


# ---------------------------------------------------------------- the predictors

def _float_keys(sd: StateDict) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


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


def evaluate_predictors(cfg, star_sd: StateDict | None, source_sds: list[StateDict], *, k: int = 32,
                        seed: int = 0, device: str | torch.device = "auto", fusion_sd: StateDict | None = None,
                        seeds: int = 3, align: bool = True, ns: Sequence[int] | None = None,
                        bn_batches: int | None = None, batch_size: int = 1000, chunk: int = 8,
                        ood: bool = True, ood_max: int | None = None, n_bins: int = 15,
                        vectorize: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Score every predictor (module docstring) on the test split of `cfg.data`.

    k: models per BMA run; seeds: BMA runs (evaluation seeds seed .. seed+seeds-1); align: weight
    matching before interpolating (needs stardomain.permute); ns: also report ensemble / BMA with only the
    first n sources, for each n (under `_by_n`); bn_batches: training batches for BN recalibration
    (None: the whole training split); ood: add OOD AUROC against shifted test inputs."""
    from .data import get_dataset
    from .models import build_model
    from .train import resolve_device

    if k < 1 or seeds < 1:
        raise UserError("k and seeds must be at least 1")
    if not source_sds:
        raise UserError("BMA needs at least one source model")
    dev = resolve_device(device)
    say = progress or (lambda s: None)
    data = get_dataset(cfg.data)
    if data.test.x is None or data.train.x is None:
        raise UserError("BMA evaluation needs a data set held in memory (x, y tensors)")
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    for i, sd in enumerate([star_sd, fusion_sd, *source_sds]):
        if sd is None:
            continue
        missing = set(model.state_dict()) ^ set(sd)
        if missing:
            raise UserError(f"a model's weights do not fit the architecture {cfg.model.name or cfg.model.factory} "
                            f"(mismatched tensors: {sorted(missing)[:3]})")
    ev = Engine(model, dev, "vmap" if vectorize else "loop", fall_back=True)
    x_test, y_test, x_train = data.test.x, data.test.y, data.train.x
    ood_x = ood_sets(data, seed=0, max_n=ood_max) if ood else {}
    example = x_train[:8]
    aligner = _aligner(align, model, example, seed)
    N = len(source_sds)
    ks = k_checkpoints(k)
    res: dict[str, Any] = {}
    info: dict[str, Any] = {"k": k, "seeds": list(range(seed, seed + seeds)), "n_sources": N, "aligned": align,
                            "bn_recalibrated": bool(ev.bn_keys), "bn_batches": bn_batches, "device": str(dev),
                            "test_size": len(y_test), "ood_shifts": list(ood_x), "vectorized": vectorize,
                            "n_bins": n_bins}

    def single(sd: StateDict) -> tuple[dict, dict[str, torch.Tensor], float]:
        t0 = time.perf_counter()
        w = Stack.of([sd], dev)
        probs = {"test": ev.probs(w, x_test, batch_size)[0].cpu()}
        for s, xo in ood_x.items():
            probs[s] = ev.probs(w, xo, batch_size)[0].cpu()
        sec = time.perf_counter() - t0
        return probs, score(probs["test"], y_test, {s: probs[s] for s in ood_x}, n_bins), sec

    def entry(m: dict, seconds: float, probs_test: torch.Tensor, **extra) -> dict:
        return {**m, "seconds": seconds, "reliability": M.calibration_bins(probs_test, y_test, n_bins), **extra}

    # ---- single sources and the deep ensemble
    say("sources")
    # warm-up (so the first timing is not inflated); a module vmap cannot run falls back to a loop
    ev.probs(ev.recalibrate(Stack.of(source_sds[:1], dev), Split(x_train[:8], data.train.y[:8]), 8, 1), x_test[:2])
    if ev.fallback_reason:
        info["vectorized"] = False
        info["vmap_error"] = ev.fallback_reason
    src_probs, src_seconds, src_runs = [], [], []
    for i, sd in enumerate(source_sds):
        p, m, sec = single(sd)
        src_probs.append(p)
        src_seconds.append(sec)
        src_runs.append(m)
        res[f"source_{i}"] = entry(m, sec, p["test"], kind="single")
    res["sources_mean"] = {**summarise(src_runs), "seconds": float(np.mean(src_seconds)), "kind": "mean over sources"}

    def ensemble(n: int) -> dict:
        t0 = time.perf_counter()
        p = {s: torch.stack([sp[s] for sp in src_probs[:n]]).mean(0) for s in src_probs[0]}
        sec = time.perf_counter() - t0
        m = score(p["test"], y_test, {s: p[s] for s in ood_x}, n_bins)
        # an ensemble costs its members' forward passes (done once above) plus the averaging
        return entry(m, sum(src_seconds[:n]) + sec, p["test"], kind="ensemble", n_sources=n)

    res["ensemble"] = ensemble(N)

    if star_sd is not None:
        say("star")
        p, m, sec = single(star_sd)
        res["star"] = entry(m, sec, p["test"], kind="single")
    if fusion_sd is not None:
        p, m, sec = single(fusion_sd)
        res["fusion_star"] = entry(m, sec, p["test"], kind="single")

    # ---- alignment (once; its cost is reported apart from the predictors')
    say("aligning")
    align_info: dict[str, Any] = {"seconds": 0.0}
    t0 = time.perf_counter()
    to_star = [aligner(star_sd, sd)[0] for sd in source_sds] if star_sd is not None else None
    align_info["to_star_seconds"] = time.perf_counter() - t0
    pair_cache: dict[tuple[int, int], StateDict] = {}

    def aligned_pair(i: int, j: int) -> StateDict:
        if (i, j) not in pair_cache:
            t1 = time.perf_counter()
            pair_cache[(i, j)] = aligner(source_sds[i], source_sds[j])[0]
            align_info["seconds"] += time.perf_counter() - t1
        return pair_cache[(i, j)]

    # ---- weight average of the sources aligned to source 0
    say("weight average")
    t0 = time.perf_counter()
    from .interpolate import average
    avg = average([source_sds[0]] + [aligned_pair(0, j) for j in range(1, N)])
    t1 = time.perf_counter()
    w = ev.recalibrate(Stack.of([avg], dev), data.train, batch_size, bn_batches)
    p = {"test": ev.probs(w, x_test, batch_size)[0].cpu()}
    for s, xo in ood_x.items():
        p[s] = ev.probs(w, xo, batch_size)[0].cpu()
    sec = time.perf_counter() - t1
    m = score(p["test"], y_test, {s: p[s] for s in ood_x}, n_bins)
    res["weight_average"] = entry(m, sec, p["test"], kind="single", anchor="source_0")

    # ---- BMA runs
    def run_star(n: int, s: int):
        idx, t = draw_star(n, k, _generator(s, f"star-bma-{n}"))
        star_w = {kk: v.to(dev) for kk, v in star_sd.items()}

        def chunk_weights(sl):
            rows = idx[sl].tolist()
            return (Stack({kk: v.expand(len(rows), *v.shape) for kk, v in star_w.items()}),
                    Stack({kk: torch.stack([to_star[r][kk] for r in rows]).to(dev) for kk in star_w}))
        return _bma_run(ev, chunk_weights, t, x_test, y_test, ood_x, data.train, chunk=chunk,
                        batch_size=batch_size, bn_batches=bn_batches, ks=ks, n_bins=n_bins), 0.0

    def run_regular(n: int, s: int):
        ii, jj, t = draw_pairs(n, k, _generator(s, f"regular-bma-{n}"))
        pairs = list(zip(ii.tolist(), jj.tolist()))
        t0 = time.perf_counter()
        for i, j in pairs:  # align the drawn pairs first: alignment cost is reported apart
            aligned_pair(i, j)
        t_align = time.perf_counter() - t0

        def chunk_weights(sl):
            rows = pairs[sl]
            return (Stack.of([source_sds[i] for i, _ in rows], dev),
                    Stack.of([aligned_pair(i, j) for i, j in rows], dev))
        return _bma_run(ev, chunk_weights, t, x_test, y_test, ood_x, data.train, chunk=chunk,
                        batch_size=batch_size, bn_batches=bn_batches, ks=ks, n_bins=n_bins), t_align

    def bma(kind: str, n: int) -> tuple[dict, dict]:
        runs, secs, curves, first = [], [], [], None
        for s in range(seed, seed + seeds):
            say(f"{kind} n={n} seed={s}")
            t0 = time.perf_counter()
            (final, curve, t_score), t_align = (run_star if kind == "star_bma" else run_regular)(n, s)
            secs.append(time.perf_counter() - t0 - t_align - t_score)
            m = score(final["test"], y_test, {sh: final[sh] for sh in ood_x}, n_bins)
            runs.append(m)
            curves.append(curve)
            first = first if first is not None else final["test"]
        out = {**summarise(runs), "seconds": float(np.mean(secs)), "seconds_per_model": float(np.mean(secs)) / k,
               "reliability": M.calibration_bins(first, y_test, n_bins), "kind": "bma", "k": k, "n_sources": n,
               "n_seeds": seeds}
        metric_names = list(curves[0][ks[0]])
        cur = {"k": ks}
        for mn in metric_names:
            vals = np.array([[c[kk][mn] for kk in ks] for c in curves], dtype=float)
            cur[mn] = vals.mean(0).tolist()
            cur[mn + "_std"] = (vals.std(0, ddof=1) if len(vals) > 1 else np.full(len(ks), np.nan)).tolist()
        return out, cur

    curves: dict[str, Any] = {"k": ks}
    if star_sd is not None:
        res["star_bma"], curves["star_bma"] = bma("star_bma", N)
    if N >= 2:
        res["regular_bma"], curves["regular_bma"] = bma("regular_bma", N)

    by_n: dict[str, Any] = {}
    for n in sorted(set(ns or [])):
        if not 1 <= n <= N:
            raise UserError(f"ns must lie in 1..{N} (the number of sources), got {n}")
        entry_n: dict[str, Any] = {"ensemble": ensemble(n)}
        if star_sd is not None:
            entry_n["star_bma"] = bma("star_bma", n)[0]
        if n >= 2:
            entry_n["regular_bma"] = bma("regular_bma", n)[0]
        by_n[str(n)] = entry_n

    align_info["seconds"] += align_info["to_star_seconds"]
    align_info["pairs_aligned"] = len(pair_cache)
    info["alignment"] = align_info
    res["_info"] = info
    res["_curves"] = curves
    if by_n:
        res["_by_n"] = by_n
    return res


# ---------------------------------------------------------------- files, report, plots

def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def bma_files(star_path, source_paths: Sequence, *, k: int = 32, seed: int = 0, json_out=None,
              seeds: int = 3, plot=None, fusion_path=None, align: bool = True, ns: Sequence[int] | None = None,
              bn_batches: int | None = None, device: str = "auto", ood: bool = True,
              progress: Callable[[str], None] | None = None) -> dict:
    """Load the model files, check they fit together, evaluate every predictor, write JSON (NaN -> null)
    and the plot. The data set and architecture come from the star's metadata."""
    from .checkpoint import atomic_write_json, compatible, read_model_file, weights_sha256
    from .config import Config, validate

    if not source_paths:
        raise UserError("give at least one source model file (--sources F1 F2 ...)")
    star_sd, star_meta = read_model_file(star_path)
    sources = [read_model_file(p) for p in source_paths]
    fusion = read_model_file(fusion_path) if fusion_path else None
    for p, (_, meta) in zip([*source_paths, *([fusion_path] if fusion else [])], [*sources, *([fusion] if fusion else [])]):
        why = compatible(star_meta, meta)
        if why:
            raise UserError(f"{p} cannot be compared with the star {star_path}: {why}")
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
        atomic_write_json(json_out, _json_safe(res))
    if plot:
        plot_result(res, plot)
    return res


def predictors(result: dict) -> list[str]:
    """Predictor names in a result, in display order (individual sources last)."""
    order = ["ensemble", "star_bma", "regular_bma", "star", "fusion_star", "weight_average", "sources_mean"]
    names = [n for n in order if n in result]
    return names + sorted((n for n in result if n.startswith("source_")), key=lambda s: int(s.split("_")[1]))


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
    cols = [m for m in (*METRICS, "ood_auroc", "ood_auroc_entropy") if any(m in result.get(n, {}) for n in predictors(result))]
    names = [n for n in predictors(result) if not n.startswith("source_")]
    short = {"accuracy": "acc", "auroc_misclassification": "AUROC mis (max-p)",
             "auroc_misclassification_entropy": "AUROC mis (entropy)", "ood_auroc": "OOD AUROC (max-p)",
             "ood_auroc_entropy": "OOD AUROC (entropy)", "nll": "NLL", "brier": "Brier", "ece": "ECE",
             "ace": "ACE"}
    lines = ["## Bayesian model averaging", ""]
    lines.append(f"K = {info.get('k')} sampled models per BMA run, {len(info.get('seeds', []))} evaluation seed(s), "
                 f"{info.get('n_sources')} sources, test set of {info.get('test_size')} examples; sources "
                 f"{'aligned by weight matching' if info.get('aligned') else 'NOT aligned'}; BatchNorm "
                 f"{'recomputed for every sampled model' if info.get('bn_recalibrated') else 'absent'}. "
                 "Values after ± are 95% CI half-widths (t-interval over evaluation seeds; over sources for "
                 "the source mean). ECE uses 15 equal-width bins, ACE 15 equal-mass bins; Brier is the "
                 "multi-class sum over classes. OOD shifts: "
                 f"{', '.join(info.get('ood_shifts', [])) or 'none'}.")
    lines += ["", "| predictor | " + " | ".join(short.get(c, c) for c in cols) + " | seconds |",
              "|---|" + "---|" * (len(cols) + 1)]
    for n in names:
        e = result[n]
        lines.append(f"| {n} | " + " | ".join(_cell(e, c) for c in cols) + f" | {_num(e.get('seconds')):.2f} |")
    lines.append("")
    if "star_bma" in result and "ensemble" in result:
        sb, en = result["star_bma"], result["ensemble"]
        better, worse, tied = [], [], []
        for c in cols:
            a, b = _num(sb.get(c)), _num(en.get(c))
            if math.isnan(a) or math.isnan(b):
                continue
            ci = _num((sb.get("ci95") or {}).get(c))
            ci = 0.0 if math.isnan(ci) else ci
            txt = f"{short.get(c, c)} ({a:.4f} vs {b:.4f})"
            if abs(a - b) <= ci:
                tied.append(txt)
            elif (a > b) == HIGHER_IS_BETTER[c]:
                better.append(txt)
            else:
                worse.append(txt)
        parts = []
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
    by_n = result.get("_by_n")
    if by_n:
        lines += ["", "Against the number of sources n (NLL / misclassification AUROC):", "",
                  "| n | " + " | ".join(p for p in ("ensemble", "star_bma", "regular_bma")) + " |", "|---|---|---|---|"]
        for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
            cells = [f"{_cell(e[p], 'nll')} / {_cell(e[p], 'auroc_misclassification')}" if p in e else "n/a"
                     for p in ("ensemble", "star_bma", "regular_bma")]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_result(result: dict, path) -> None:
    """Reliability diagrams and metric-vs-K curves in one PNG (written atomically)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write_bytes

    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
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
    ax.legend(fontsize=7)
    curves = result.get("_curves", {})
    panels = [("nll", "NLL"), ("ece", "ECE"), ("auroc_misclassification", "misclassification AUROC (max-p)"),
              ("accuracy", "accuracy"), ("ood_auroc", "OOD AUROC (max-p)")]
    for ax, (m, title) in zip(axes.flat[1:], panels):
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
        ax.legend(fontsize=7)
    fig.suptitle(f"BMA: {result.get('_info', {}).get('n_sources')} sources, K = {result.get('_info', {}).get('k')}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
