"""Interpolation curves and loss/accuracy barriers between two models (docs/method.md, "Loss barrier").

Along θ(t) = (1-t)·θ_A + t·θ_B the curve holds the mean cross-entropy and accuracy (a fraction) on the
training split (never augmented) and on the test split. The endpoints t=0 and t=1 are the models
themselves with their own BatchNorm statistics; at every interior t the running statistics are reset
and recomputed on training data (as `interpolate.recalibrate_bn` does: cumulative average of per-batch
statistics, batch mean and unbiased batch variance), then the network is evaluated in eval mode.

Speed: the t values are one stack of the stacked-weights engine (`stardomain.engine`): for MLPs all t
share each data batch under `torch.func.vmap` (one train-mode pass over the training data for *all*
interior t, one pass over train and test for all t); conv nets go one t at a time through a frozen,
BN-folded module. `method="loop"` is the straightforward reference (one model at a time); it is also the
fallback for a user architecture with an operation vmap cannot batch.

Sign conventions of `barriers`: a loss barrier is max over interior t of (loss - chord), floored at 0;
an accuracy barrier is the largest *drop* below the accuracy chord, max over interior t of
(chord - acc), floored at 0, so both are >= 0 and "bigger = worse". The unfloored maxima are kept too.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import weights_sha256
from .data import DataBundle, Split, batches, first_inputs, per_token
from .engine import DEFAULT_ACT_BUDGET, Engine, Stack, bn_layers, evaluate_module
from .engine import STRATEGIES as METHODS
from .errors import UserError
from .interpolate import lerp, recalibrate_bn
from .permute import align as permute_align
from .permute.variants import check_variant
from .repair import apply_repair, channel_stats, remove_repair
from .utils import resolve_device

StateDict = dict[str, torch.Tensor]

ENDPOINTS = (0.0, 1.0)


@dataclass(frozen=True)
class BarrierSettings:
    """How a barrier is measured: the path's t values, the alignment of B, how each point is evaluated,
    and the opt-in extras. One object travels from the CLI, the API and the study to `measure` and `curve`.

    points / ts: the grid (`ts` overrides `points`). align: True ("full"), False ("none") or an alignment
    variant ("heads", "mlp", "stream"). seed: the alignment's and the temperature split's seed.
    bn_batches: training batches that recalibrate BatchNorm at interior t (None: the whole split).
    method: the engine strategy ("auto", "vmap", "fused", "loop"; speed only). repair: REPAIR for networks
    without BatchNorm. refine: extra t values around the worst grid point. temperature (+ fraction): the
    temperature-scaled control. max_models / act_budget: the engine's memory bounds."""

    points: int = 11
    ts: tuple[float, ...] | None = None
    align: bool | str = True
    seed: int = 0
    bn_batches: int | None = None
    batch_size: int = 1000
    method: str = "auto"
    repair: bool = False
    refine: int = 0
    temperature: bool = False
    temperature_fraction: float = 0.2
    max_models: int | None = None
    act_budget: int = DEFAULT_ACT_BUDGET

    def grid(self) -> list[float]:
        return [float(t) for t in self.ts] if self.ts is not None else grid(self.points)

    def variant(self) -> str:
        """The alignment variant this asks for ("none" when B is not aligned)."""
        a = self.align
        return check_variant(a if isinstance(a, str) else "full" if a else "none")


def grid(points: int = 11) -> list[float]:
    """The paper's grid: `points` evenly spaced t values from 0 to 1 inclusive (11 -> 0, 0.1, ..., 1)."""
    if points < 2:
        raise UserError(f"a barrier needs at least 2 points (the two endpoints), got {points}")
    return [i / (points - 1) for i in range(points)]


def _is_endpoint(t: float) -> bool:
    return t == 0.0 or t == 1.0


# --------------------------------------------------------------------------------------------------
# curves


def _curve_repair(model, sd_a, sd_b, data, ts, st: BarrierSettings, device) -> dict:
    """For each t: build the model, REPAIR-renormalise it (interior t; stardomain.repair), one pass over
    train and one over test."""
    m = copy.deepcopy(model).to(device)
    rec = {"t": list(ts), "train": {"loss": [], "acc": []}, "test": {"loss": [], "acc": []}}
    stats = []
    for sd in (sd_a, sd_b):
        m.load_state_dict(sd)
        stats.append(channel_stats(m, data.train, st.batch_size, st.bn_batches, device))
    for t in ts:
        m.load_state_dict(sd_a if t == 0.0 else sd_b if t == 1.0 else lerp(sd_a, sd_b, t))
        hooks = [] if _is_endpoint(t) else apply_repair(m, stats[0], stats[1], t, data.train, st.batch_size,
                                                        st.bn_batches, device)
        for s in ("train", "test"):
            r = evaluate_module(m.eval(), data.split(s), st.batch_size, device)
            rec[s]["loss"].append(r["loss"])
            rec[s]["acc"].append(r["acc"])
        remove_repair(hooks)
    return rec


def _curve_engine(model, sd_a, sd_b, data, ts, st: BarrierSettings, device) -> dict:
    """The stacked-weights engine (`stardomain.engine`): the segment's K models, BatchNorm recomputed at
    interior t, evaluated on train and test."""
    eng = Engine(model, device, st.method, act_budget=st.act_budget, max_models=st.max_models)
    stack = Stack.between(sd_a, sd_b, ts, device)
    stack = eng.recalibrate(stack, data.train, st.batch_size, st.bn_batches,
                            rows=[i for i, t in enumerate(ts) if not _is_endpoint(t)])
    rec: dict[str, Any] = {"t": list(ts),
                           **eng.evaluate(stack, {"train": data.train, "test": data.test}, st.batch_size)}
    rec["method"] = eng.strategy
    rec["bn_batches_used"] = eng.bn_batches_seen
    if eng.strategy == "vmap":
        rec["models_per_call"] = eng.models_per_call
        rec["eval_batch_size"] = eng.eval_batch_size
    if eng.fallback_reason:
        rec["vmap_fallback_reason"] = eng.fallback_reason
    return rec


def curve(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle, ts: Sequence[float],
          settings: BarrierSettings | None = None, *, device=None) -> dict:
    """Loss and accuracy along (1-t)·A + t·B for every t in `ts`, on train (no augmentation) and test.

    -> {"t": [...], "train": {"loss": [...], "acc": [...]}, "test": {...}, "method": ...}.
    `model` is any module of the architecture (its weights are not used). From `settings`: `bn_batches`,
    how many training batches recalibrate BatchNorm at interior t (None: the whole training split);
    `method`, an execution strategy of `stardomain.engine`: "vmap" (all t share each batch, first layer
    evaluated twice instead of K times), "fused" (one t at a time, evaluated through a frozen BN-folded
    TorchScript module), "loop" (one t at a time, plain modules) or "auto" (fused for conv nets, vmap
    otherwise, falling back to loop for an operation vmap cannot batch).
    `repair`: for networks without BatchNorm, renormalise interior models with REPAIR (Jordan et al.
    2023; `stardomain.repair`), evaluated one t at a time.
    """
    st = settings or BarrierSettings()
    ts = [float(t) for t in ts]
    if not ts:
        raise UserError("no t values to evaluate")
    bad = [t for t in ts if not (0.0 <= t <= 1.0) or math.isnan(t)]
    if bad:
        raise UserError(f"t values must lie in [0, 1]; got {bad}")
    if st.bn_batches is not None and st.bn_batches < 1:
        raise UserError(f"bn_batches must be >= 1 (or None for the whole training split), got {st.bn_batches}")
    if st.method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)} (got {st.method!r})")
    device = resolve_device(device or "cpu")
    if st.repair and bn_layers(model):
        raise UserError("REPAIR is for networks without BatchNorm; BatchNorm networks are recalibrated "
                        "at every interior t already (drop --repair)")
    t0 = time.perf_counter()
    if st.repair:
        rec = {**_curve_repair(model, sd_a, sd_b, data, ts, st, device), "method": "loop"}
    else:
        rec = _curve_engine(model, sd_a, sd_b, data, ts, st, device)
    rec["bn"] = {"recalibrated": bool(bn_layers(model)) and any(not _is_endpoint(t) for t in ts),
                 "repair": st.repair, "batches": "all" if st.bn_batches is None else st.bn_batches,
                 "batch_size": st.batch_size}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def interpolated_states(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle,
                        ts: Sequence[float], *, bn_batches: int | None = None, batch_size: int = 1000,
                        device=None, max_models: int | None = None) -> list[StateDict]:
    """The state dicts (1-t)·A + t·B for every t, BatchNorm statistics recomputed at interior t exactly
    as `interpolate.recalibrate_bn` would: the engine's recalibrated segment stack, all t in one pass
    over the training data (vmap) or one t at a time (conv nets)."""
    device = resolve_device(device or "cpu")
    ts = [float(t) for t in ts]
    eng = Engine(model, device, "auto", max_models=max_models)
    stack = eng.recalibrate(Stack.between(sd_a, sd_b, ts, device), data.train, batch_size, bn_batches,
                            rows=[i for i, t in enumerate(ts) if not _is_endpoint(t)])
    return stack.states()


# --------------------------------------------------------------------------------------------------
# temperature scaling (an opt-in control: part of a loss barrier can be miscalibration, not error)


def calibration_split(data: DataBundle, fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split, dict]:
    """(calibration split, test split to evaluate, description). The data set's `val` split when it has one
    (the test split stays whole); else a seeded `fraction` of the test split, which the returned test split
    then leaves out, so no example both fits a temperature and scores it."""
    if data.val is not None:
        return data.val, data.test, {"source": "val", "n_calibration": len(data.val), "n_test": len(data.test)}
    n = len(data.test)
    k = max(1, min(n - 1, int(round(n * fraction))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cal_idx, test_idx = perm[:k].sort().values, perm[k:].sort().values

    def sub(idx):
        t = data.test
        if t.x is not None:
            return Split(t.x[idx], t.y[idx])
        return Split(dataset=torch.utils.data.Subset(t.dataset, idx.tolist()))

    return sub(cal_idx), sub(test_idx), {"source": f"test (seeded {fraction:g} slice, seed {seed}; excluded from the "
                                                   "temperature-scaled test loss)", "n_calibration": k, "n_test": n - k}


@torch.no_grad()
def _logits(model: nn.Module, split: Split, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs, ys = [], []
    for x, y in batches(split, batch_size, device=device):
        out, y = per_token(model(x).double(), y)
        outs.append(out.cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, bounds: tuple[float, float] = (-4.0, 4.0)) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T): a 1-D bounded search over log T."""
    from scipy.optimize import minimize_scalar

    lg, yy = logits.double(), y

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(lg / math.exp(log_t), yy))

    res = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


@torch.no_grad()
def _scaled_loss(model: nn.Module, split: Split, batch_size: int, device, temps: Sequence[float]) -> list[float]:
    """Mean cross-entropy of logits / T on `split`, for each T in `temps`, in one pass."""
    model.eval()
    sums, n = [0.0] * len(temps), 0
    for x, y in batches(split, batch_size, device=device):
        out, y = per_token(model(x).double(), y)
        for i, T in enumerate(temps):
            sums[i] += F.cross_entropy(out / T, y, reduction="sum").item()
        n += len(y)
    return [v / n for v in sums]


def temperature_curve(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle, ts: Sequence[float], *,
                      bn_batches: int | None = None, batch_size: int = 1000, device=None, fraction: float = 0.2,
                      seed: int = 0) -> dict:
    """Loss along the path after temperature scaling each point's logits (T fitted per t by NLL on a
    calibration split, see `calibration_split`), with the unscaled loss on the same splits beside it.
    BatchNorm at interior t is recalibrated as in `curve`. One t at a time (a separate, opt-in pass)."""
    device = resolve_device(device or "cpu")
    cal, test, info = calibration_split(data, fraction, seed)
    m = copy.deepcopy(model).to(device)
    rec: dict[str, Any] = {"t": [float(t) for t in ts], "temperature": [], "train": {"loss": [], "loss_t1": []},
                           "test": {"loss": [], "loss_t1": []}, "calibration": info}
    for t in rec["t"]:
        m.load_state_dict(sd_a if t == 0.0 else sd_b if t == 1.0 else lerp(sd_a, sd_b, t))
        if not _is_endpoint(t):
            recalibrate_bn(m, data.train, batch_size, bn_batches, device)
        T = fit_temperature(*_logits(m, cal, batch_size, device))
        rec["temperature"].append(T)
        for name, split in (("train", data.train), ("test", test)):
            scaled, plain = _scaled_loss(m, split, batch_size, device, (T, 1.0))
            rec[name]["loss"].append(scaled)
            rec[name]["loss_t1"].append(plain)
    rec["barrier"] = {}
    for name in ("train", "test"):
        for field, suffix in (("loss", ""), ("loss_t1", "_t1")):
            r = _one(rec["t"], rec[name][field], 1.0)
            rec["barrier"][f"{name}_loss{suffix}"] = r["value"]
            rec["barrier"][f"{name}_loss{suffix}_t"] = r["t"]
    return rec


# --------------------------------------------------------------------------------------------------
# barriers


def _endpoints(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Values at t=0 and t=1 (both must be on the grid: the chord joins them)."""
    if 0.0 not in ts or 1.0 not in ts:
        raise UserError("a barrier needs both endpoints t=0 and t=1 in the grid")
    return ys[ts.index(0.0)], ys[ts.index(1.0)]


def _one(ts: list[float], ys: list[float], sign: float) -> dict:
    """Max over interior t of sign·(y - chord): sign +1 for loss, -1 for accuracy (a drop)."""
    y0, y1 = _endpoints(ts, ys)
    dev = [(t, sign * (y - ((1 - t) * y0 + t * y1))) for t, y in zip(ts, ys) if not _is_endpoint(t)]
    if not dev:
        return {"value": 0.0, "max": None, "t": None, "mid": None}
    t_max, d_max = max(dev, key=lambda p: p[1])
    mid = next((d for t, d in dev if t == 0.5), None)
    return {"value": max(0.0, d_max), "max": d_max, "t": t_max, "mid": mid}


def barriers(rec: dict) -> dict:
    """Barriers of a curve record (docs/method.md). All four headline numbers are >= 0, bigger = worse:

    train_loss / test_loss: max over interior t of loss(t) - [(1-t)·loss(0) + t·loss(1)], floored at 0.
    train_acc / test_acc: max over interior t of [(1-t)·acc(0) + t·acc(1)] - acc(t), floored at 0, i.e.
    the most negative deviation of accuracy from its chord, reported as a positive drop (a fraction).
    Extras per metric M: M_max (unfloored maximum; negative when the curve lies below its chord
    everywhere), M_t (t of the maximum), M_mid (deviation at t=0.5, None if 0.5 is not on the grid).
    """
    ts = [float(t) for t in rec["t"]]
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        for metric, sign in (("loss", 1.0), ("acc", -1.0)):
            r = _one(ts, rec[split][metric], sign)
            key = f"{split}_{metric}"
            out[key] = r["value"]
            out[f"{key}_max"] = r["max"]
            out[f"{key}_t"] = r["t"]
            out[f"{key}_mid"] = r["mid"]
    out["definition"] = ("loss: max over interior t of loss minus its chord, floored at 0; acc: max over "
                         "interior t of the accuracy chord minus accuracy (a drop, fraction), floored at 0")
    return out


def _refine_points(ts: list[float], dev_t: float | None, n: int) -> list[float]:
    """n points strictly between the grid neighbours of the worst grid point, not already on the grid."""
    if dev_t is None or n <= 0:
        return []
    s = sorted(ts)
    i = s.index(dev_t)
    lo, hi = s[i - 1], s[i + 1]
    pts = [lo + (hi - lo) * (j + 1) / (n + 1) for j in range(n)]
    return [p for p in pts if p not in ts and 0.0 < p < 1.0]


# --------------------------------------------------------------------------------------------------
# the whole measurement


def measure(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle,
            settings: BarrierSettings | None = None, *, example_input: torch.Tensor | None = None,
            device=None) -> dict:
    """The barrier record of docs/architecture.md ("Contracts"): t, train, test, barrier{...}, alignment{...}, bn, timings.

    With `settings.align`, B is first replaced by the permutation of B that best matches A (weight
    matching, `stardomain.permute.align`); a variant name ("heads", "mlp", "stream") aligns only that
    role's groups. `refine` > 0 evaluates that many extra t values between the grid neighbours of the
    worst grid point (train and test loss) and reports `barrier_refined` beside the grid barrier. With
    `temperature`, also `temperature_scaled` (see `temperature_curve`) and barrier fields `train_loss_ts` /
    `test_loss_ts`: the loss barriers after temperature scaling every point.
    """
    st = settings or BarrierSettings()
    t_start = time.perf_counter()
    ts = st.grid()
    sd_b, alignment, t_align = _aligned_b(model, sd_a, sd_b, data, st, example_input)
    rec = curve(model, sd_a, sd_b, data, ts, st, device=device)
    out: dict[str, Any] = {"t": rec["t"], "train": rec["train"], "test": rec["test"], "barrier": barriers(rec)}
    t_refine = _refine(out, rec, model, sd_a, sd_b, data, st, device) if st.refine > 0 else 0.0
    t_temp = 0.0
    if st.temperature:
        tt = time.perf_counter()
        ts_rec = temperature_curve(model, sd_a, sd_b, data, ts, bn_batches=st.bn_batches, batch_size=st.batch_size,
                                   device=device, fraction=st.temperature_fraction, seed=st.seed)
        out["temperature_scaled"] = ts_rec
        out["barrier"]["train_loss_ts"] = ts_rec["barrier"]["train_loss"]
        out["barrier"]["test_loss_ts"] = ts_rec["barrier"]["test_loss"]
        t_temp = time.perf_counter() - tt
    out["alignment"] = alignment
    out["bn"] = rec["bn"]
    out["method"] = rec["method"]
    out["points"] = len(ts)
    out["data"] = data.name
    out["timings"] = {"align_s": t_align, "curve_s": rec["seconds"], "refine_s": t_refine,
                      "temperature_s": t_temp, "total_s": time.perf_counter() - t_start}
    out["sha256"] = {"a": _sha(sd_a), "b": _sha(sd_b)}  # b: the (aligned) weights interpolated
    return out


def _aligned_b(model, sd_a, sd_b, data, st: BarrierSettings, example_input) -> tuple[StateDict, dict, float]:
    """B as the barrier interpolates it (aligned to A as the settings ask), the alignment record, seconds."""
    variant = st.variant()
    if variant == "none":
        return sd_b, {"aligned": False, "variant": "none"}, 0.0
    if example_input is None:
        example_input = first_inputs(data.train)
    ta = time.perf_counter()
    sd_b, info = permute_align(copy.deepcopy(model).cpu(), {k: v.cpu() for k, v in sd_a.items()},
                               {k: v.cpu() for k, v in sd_b.items()}, example_input=example_input.cpu(),
                               method="weight", seed=st.seed, variant=variant)
    alignment = {"aligned": True, **{k: v for k, v in info.items() if k != "perm" and _jsonable(v)}}
    return sd_b, alignment, time.perf_counter() - ta


def _refine(out: dict, rec: dict, model, sd_a, sd_b, data, st: BarrierSettings, device) -> float:
    """Add `barrier_refined` to `out`: extra t values around the worst grid point. -> seconds."""
    tr = time.perf_counter()
    ts, b = rec["t"], out["barrier"]
    extra = sorted(set(_refine_points(ts, b["train_loss_t"], st.refine)) | set(_refine_points(ts, b["test_loss_t"], st.refine)))
    if extra:
        r2 = curve(model, sd_a, sd_b, data, extra, st, device=device)
        rb = barriers(_merge(rec, r2))
        out["barrier_refined"] = {"t": r2["t"], "train": r2["train"], "test": r2["test"],
                                  **{k: rb[k] for k in rb if k != "definition"}}
    return time.perf_counter() - tr


def _merge(r1: dict, r2: dict) -> dict:
    pairs = sorted(zip(r1["t"] + r2["t"], range(len(r1["t"]) + len(r2["t"]))))
    order = [i for _, i in pairs]

    def cat(s, m):
        v = r1[s][m] + r2[s][m]
        return [v[i] for i in order]

    return {"t": [t for t, _ in pairs], **{s: {m: cat(s, m) for m in ("loss", "acc")} for s in ("train", "test")}}


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (list, tuple)) and all(_jsonable(x) for x in v)) or (
        isinstance(v, dict) and all(isinstance(k, str) and _jsonable(x) for k, x in v.items()))


def _sha(sd: StateDict) -> str:
    return weights_sha256(sd)
