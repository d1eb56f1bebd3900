"""Interpolation curves and loss/accuracy barriers between two models (PAPER.md, "Loss barrier").

Along θ(t) = (1-t)·θ_A + t·θ_B the curve holds the mean cross-entropy and accuracy (a fraction) on the
training split (never augmented) and on the test split. The endpoints t=0 and t=1 are the models
themselves with their own BatchNorm statistics; at every interior t the running statistics are reset
and recomputed on training data (as `interpolate.recalibrate_bn` does: cumulative average of per-batch
statistics, batch mean and unbiased batch variance), then the network is evaluated in eval mode.

Speed: all t values share each data batch. Their parameters are stacked along a leading axis and the
network runs once per batch under `torch.func.vmap` + `functional_call`, for BatchNorm recalibration
(one train-mode pass over the training data for *all* interior t) and for evaluation (one pass over
train and test for all t). `method="loop"` is the straightforward reference (one model at a time); it
is also the fallback for a user architecture with an operation vmap cannot batch.

Sign conventions of `barriers`: a loss barrier is max over interior t of (loss - chord), floored at 0;
an accuracy barrier is the largest *drop* below the accuracy chord, max over interior t of
(chord - acc), floored at 0, so both are >= 0 and "bigger = worse". The unfloored maxima are kept too.
"""

from __future__ import annotations

import copy
import io
import math
import time
import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataBundle, Split, batches, num_batches
from .errors import UserError
from .interpolate import bn_layers, lerp, recalibrate_bn

StateDict = dict[str, torch.Tensor]

ENDPOINTS = (0.0, 1.0)
# Largest activation tensor (elements) one vmapped call may create; bounds memory for wide nets.
DEFAULT_ACT_BUDGET = 2 ** 28


METHODS = ("auto", "vmap", "fused", "loop")


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def grid(points: int = 11) -> list[float]:
    """The paper's grid: `points` evenly spaced t values from 0 to 1 inclusive (11 -> 0, 0.1, ..., 1)."""
    if points < 2:
        raise UserError(f"a barrier needs at least 2 points (the two endpoints), got {points}")
    return [i / (points - 1) for i in range(points)]


def _is_endpoint(t: float) -> bool:
    return t == 0.0 or t == 1.0


# --------------------------------------------------------------------------------------------------
# reference path: one model at a time


@torch.no_grad()
def _eval_split(model: nn.Module, split: Split, batch_size: int, device) -> dict[str, float]:
    loss_sum, correct, n = 0.0, 0, 0
    model.eval()
    for x, y in batches(split, batch_size, device=device):
        out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return {"loss": loss_sum / n, "acc": correct / n}


def _curve_loop(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device, repair: bool = False) -> dict:
    """For each t: build the model, recalibrate BN (interior t), one pass over train and one over test.
    With `repair`, interior models are REPAIR-renormalised (stardomain.repair) instead."""
    from .repair import apply_repair, channel_stats, remove_repair

    m = copy.deepcopy(model).to(device)
    rec = {"t": list(ts), "train": {"loss": [], "acc": []}, "test": {"loss": [], "acc": []}}
    if repair:
        stats = []
        for sd in (sd_a, sd_b):
            m.load_state_dict(sd)
            stats.append(channel_stats(m, data.train, batch_size, bn_batches, device))
    for t in ts:
        sd = sd_a if t == 0.0 else sd_b if t == 1.0 else lerp(sd_a, sd_b, t)
        m.load_state_dict(sd)
        hooks = []
        if not _is_endpoint(t):
            if repair:
                hooks = apply_repair(m, stats[0], stats[1], t, data.train, batch_size, bn_batches, device)
            else:
                recalibrate_bn(m, data.train, batch_size, bn_batches, device)
        for s in ("train", "test"):
            r = _eval_split(m, data.split(s), batch_size, device)
            rec[s]["loss"].append(r["loss"])
            rec[s]["acc"].append(r["acc"])
        remove_repair(hooks)
    return rec


def _inference_module(m: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-mode module for fast inference: TorchScript-frozen with BatchNorm folded into the
    convolutions (oneDNN layouts on CPU) where the architecture scripts, else the module itself."""
    m.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still fastest on CPU
            fm = torch.jit.optimize_for_inference(torch.jit.script(m))
            fm(example)
        return fm
    except Exception:  # an architecture TorchScript cannot compile: plain module, same numbers
        return m


def _curve_fused(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device) -> dict:
    """Conv nets, one t at a time but evaluated through a frozen, BN-folded inference module (TorchScript,
    oneDNN on CPU). (vmap over conv weights becomes grouped convolutions, slower than this on CPU.)"""
    m = copy.deepcopy(model).to(device)
    layers = bn_layers(m)
    rec: dict[str, Any] = {"t": list(ts), "train": {"loss": [], "acc": []}, "test": {"loss": [], "acc": []}}
    n_bn = 0
    for t in ts:
        sd = sd_a if t == 0.0 else sd_b if t == 1.0 else lerp(sd_a, sd_b, t)
        m.load_state_dict(sd)
        if not _is_endpoint(t) and layers:
            recalibrate_bn(m, data.train, batch_size, bn_batches, device)  # channels-last, exact statistics
            n_bn = num_batches(data.train, batch_size) if bn_batches is None else \
                min(bn_batches, num_batches(data.train, batch_size))
        m.eval()
        x0 = data.train.x[:2].to(device) if data.train.x is not None else next(batches(data.train, 2, device=device))[0]
        fm = _inference_module(copy.deepcopy(m), x0)
        for s in ("train", "test"):
            r = _eval_split(fm, data.split(s), batch_size, device)
            rec[s]["loss"].append(r["loss"])
            rec[s]["acc"].append(r["acc"])
    rec["bn_batches_used"] = n_bn
    return rec


# --------------------------------------------------------------------------------------------------
# fast path: all t values per batch under vmap


def _stacked(sd_a: StateDict, sd_b: StateDict, names: Sequence[str], tt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entry k of every stacked tensor is lerp(a, b, tt[k]), bit-identical to interpolate.lerp."""
    out = {}
    for k in names:
        a, b = sd_a[k], sd_b[k].to(sd_a[k].device)
        w = tt.to(a.device, a.dtype).view(-1, *([1] * a.dim()))
        out[k] = torch.lerp(a.unsqueeze(0).expand(len(tt), *a.shape), b.unsqueeze(0).expand(len(tt), *b.shape), w)
    return out


def _peak_elements_per_example(model: nn.Module, x: torch.Tensor) -> int:
    """Largest single module output per example (one model), to size the number of models per call."""
    peak = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            peak[0] = max(peak[0], out[0].numel())

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hs:
            h.remove()
    return max(peak[0], 1)


def _call(vrun, p, b, x, sel, split, first=None):
    return vrun(p, b, x) if split is None else vrun(p, b, x, sel, first)


_PARAM_FREE = (nn.Flatten, nn.Identity, nn.Dropout)


def _split_first_layer(m: nn.Module):
    """For an nn.Sequential whose first parametric module is a Linear/Conv preceded only by reshaping
    modules: (pre, first, first_name, rest, name maps of rest -> original), else None."""
    if not isinstance(m, nn.Sequential):
        return None
    mods = list(m.named_children())
    for i, (name, mod) in enumerate(mods):
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups == 1
                                          and not isinstance(mod, nn.modules.conv._ConvTransposeNd)):
            break
        if not isinstance(mod, _PARAM_FREE) or list(mod.parameters(recurse=True)) or list(mod.buffers()):
            return None
    else:
        return None
    if i + 1 >= len(mods):
        return None
    pre = nn.Sequential(*[mm for _, mm in mods[:i]])
    rest = nn.Sequential(*[mm for _, mm in mods[i + 1:]])
    orig_p = {id(v): k for k, v in m.named_parameters()}
    orig_b = {id(v): k for k, v in m.named_buffers()}
    names = {"p": [(k, orig_p[id(v)]) for k, v in rest.named_parameters()],
             "b": [(k, orig_b[id(v)]) for k, v in rest.named_buffers() if v.is_floating_point()],
             "i": [(k, orig_b[id(v)]) for k, v in rest.named_buffers() if not v.is_floating_point()]}
    return pre, mods[i][1], name, rest, names


def _curve_vmap(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device, max_models, act_budget,
                states_only: bool = False):
    from torch.func import functional_call, vmap

    m = copy.deepcopy(model).to(device).eval()
    sd_a = {k: v.to(device) for k, v in sd_a.items()}
    sd_b = {k: v.to(device) for k, v in sd_b.items()}
    K = len(ts)
    tt = torch.tensor(ts, dtype=torch.float64)
    pnames = [k for k, _ in m.named_parameters()]
    bns = {name: mod for name, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    bn_stat = {f"{n}.{s}" for n in bns for s in ("running_mean", "running_var")}
    fnames = [k for k, v in m.named_buffers() if v.is_floating_point()]
    inames = [k for k, v in m.named_buffers() if not v.is_floating_point()]

    params = _stacked(sd_a, sd_b, pnames, tt)
    # Float buffers: lerp like interpolate.lerp; endpoints keep their own; BN stats replaced below.
    bufs = _stacked(sd_a, sd_b, fnames, tt)
    for k in fnames:
        for i, t in enumerate(ts):
            if t == 0.0:
                bufs[k][i] = sd_a[k]
            elif t == 1.0:
                bufs[k][i] = sd_b[k]
    ints = {k: sd_a[k].clone() for k in inames}

    x0 = data.train.x[:1].to(device) if data.train.x is not None else next(batches(data.train, 1, device=device))[0]
    per_ex = _peak_elements_per_example(m, x0)
    chunk = max(1, min(K, act_budget // max(1, per_ex * batch_size)))
    if max_models:
        chunk = max(1, min(chunk, max_models))

    # Evaluation has no batch-size semantics (unlike BN statistics): use big batches within the budget.
    eval_bs = max(batch_size, act_budget // max(1, per_ex * chunk))

    def chunks(idx: list[int]):
        return [idx[i:i + chunk] for i in range(0, len(idx), chunk)]

    split = _split_first_layer(m)
    first_numel = 0
    if split is None:
        def run(p, b, x):
            return functional_call(m, (p, b, ints), (x,), tie_weights=False)

        vrun = vmap(run, in_dims=(0, 0, None))
    else:
        # The first layer is affine in its parameters and sees the same input for every t, so its output
        # at t is (1-t)·out_A + t·out_B: two evaluations instead of K (the bulk of an MLP's cost).
        pre, first, first_name, rest, rest_names = split
        fkeys = [k for k, _ in first.named_parameters()]

        def run_rest(p, b, h):
            return functional_call(rest, ({rk: p[ok] for rk, ok in rest_names["p"]},
                                          {rk: b[ok] for rk, ok in rest_names["b"]},
                                          {rk: ints[ok] for rk, ok in rest_names["i"]}), (h,), tie_weights=False)

        vrest = vmap(run_rest, in_dims=(0, 0, 0))

        # A's and B's first layers side by side: one wider matmul/conv instead of two.
        both = {k: torch.cat([sd_a[f"{first_name}.{k}"], sd_b[f"{first_name}.{k}"]], 0) for k in fkeys}
        n_out = sd_a[f"{first_name}.{fkeys[0]}"].shape[0]

        def first_out(x):
            return functional_call(first, both, (pre(x),))

        with torch.no_grad():
            first_numel = first_out(x0)[0].numel()

        def vrun(p, b, x, sel=None, hab=None):
            hab = first_out(x) if hab is None else hab
            ha, hb = hab[:, :n_out], hab[:, n_out:]
            w = tt.to(device, ha.dtype)[sel].view(-1, *([1] * ha.dim()))
            h = torch.lerp(ha.unsqueeze(0).expand(len(w), *ha.shape), hb.unsqueeze(0).expand(len(w), *hb.shape), w)
            return vrest(p, b, h)
    interior = [i for i, t in enumerate(ts) if not _is_endpoint(t)]
    n_bn_batches = 0
    # The first layer's outputs on the training split are the same in the BN pass and in the evaluation:
    # kept from the one for the other when the BN pass sees the whole split and they fit in half the budget.
    keep_first = [] if (split is not None and bn_batches is None and not states_only and len(data.train)
                        * first_numel <= act_budget // 2) else None
    if bns and interior:
        # Momentum 1 makes each train-mode call leave exactly that batch's statistics in the (stacked)
        # running buffers; we average them over batches ourselves, as recalibrate_bn's cumulative mode.
        saved = {n: (mod.momentum, mod.training) for n, mod in bns.items()}
        sums = {k: torch.zeros_like(bufs[k][interior], dtype=torch.float64) for k in bn_stat}
        idx_t = torch.tensor(interior, device=device)
        try:
            for mod in bns.values():
                mod.momentum = 1.0
                mod.train()
            with torch.no_grad():
                for x, _ in batches(data.train, batch_size, device=device, max_batches=bn_batches):
                    hab = first_out(x) if split is not None else None
                    if keep_first is not None:
                        keep_first.append(hab)
                    for c in chunks(list(range(len(interior)))):
                        sel = idx_t[c]
                        p = {k: v[sel] for k, v in params.items()}
                        b = {k: v[sel].clone() for k, v in bufs.items()}
                        _call(vrun, p, b, x, sel, split, hab)
                        for k in bn_stat:
                            sums[k][c] += b[k].double()
                    n_bn_batches += 1
        finally:
            for n, mod in bns.items():
                mod.momentum, mod.training = saved[n]
        if n_bn_batches == 0:
            raise UserError("BatchNorm recalibration saw no training batch (empty training split?)")
        for k in bn_stat:
            bufs[k][idx_t] = (sums[k] / n_bn_batches).to(bufs[k].dtype)
    m.eval()
    if states_only:
        out = []
        for i, t in enumerate(ts):
            sd = {**{k: v[i].clone() for k, v in params.items()}, **{k: v[i].clone() for k, v in bufs.items()}}
            for k in inames:
                own = sd_a[k] if t != 1.0 else sd_b[k]
                sd[k] = own.clone() if _is_endpoint(t) or not k.endswith("num_batches_tracked") or not bns \
                    else torch.full_like(own, n_bn_batches)
            out.append(sd)
        return out

    rec: dict[str, Any] = {"t": list(ts)}
    with torch.no_grad():
        for s in ("train", "test"):
            loss = torch.zeros(K, dtype=torch.float64, device=device)
            correct = torch.zeros(K, dtype=torch.int64, device=device)
            n = 0
            kept = torch.cat(keep_first) if s == "train" and keep_first else None
            for x, y in batches(data.split(s), eval_bs, device=device):
                hab = kept[n:n + len(y)] if kept is not None else None
                for c in chunks(list(range(K))):
                    sel = torch.tensor(c, device=device)
                    out = _call(vrun, {k: v[sel] for k, v in params.items()}, {k: v[sel] for k, v in bufs.items()}, x,
                                sel, split, hab).float()
                    kc, bsz, ncls = out.shape
                    # cross-entropy = logsumexp - picked logit (cheaper than F.cross_entropy on K·B rows)
                    picked = out.gather(2, y.view(1, -1, 1).expand(kc, bsz, 1)).squeeze(2)
                    loss[sel] += (torch.logsumexp(out, 2) - picked).sum(1).double()
                    correct[sel] += (out.argmax(2) == y.unsqueeze(0)).sum(1)
                n += len(y)
            rec[s] = {"loss": (loss / n).tolist(), "acc": (correct.double() / n).tolist()}
    rec["bn_batches_used"] = n_bn_batches
    rec["models_per_call"] = chunk
    rec["eval_batch_size"] = eval_bs
    return rec


def curve(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle, ts: Sequence[float], *,
          bn_batches: int | None = None, batch_size: int = 1000, device=None, method: str = "auto",
          max_models: int | None = None, act_budget: int = DEFAULT_ACT_BUDGET, repair: bool = False) -> dict:
    """Loss and accuracy along (1-t)·A + t·B for every t in `ts`, on train (no augmentation) and test.

    -> {"t": [...], "train": {"loss": [...], "acc": [...]}, "test": {...}, "method": ...}.
    `model` is any module of the architecture (its weights are not used). `bn_batches`: how many
    training batches recalibrate BatchNorm at interior t (None: the whole training split).
    `method`: "vmap" (all t share each batch, first layer evaluated twice instead of K times), "fused"
    (one t at a time, evaluated through a frozen BN-folded TorchScript module), "loop" (the reference:
    one t at a time, plain modules) or "auto" (fused for conv nets, where vmap would mean slow grouped
    convolutions; vmap otherwise, falling back to loop for an operation vmap cannot batch).
    `repair`: for networks without BatchNorm, renormalise interior models with REPAIR (Jordan et al.
    2023; `stardomain.repair`), evaluated one t at a time.
    """
    from .train import resolve_device

    ts = [float(t) for t in ts]
    if not ts:
        raise UserError("no t values to evaluate")
    bad = [t for t in ts if not (0.0 <= t <= 1.0) or math.isnan(t)]
    if bad:
        raise UserError(f"t values must lie in [0, 1]; got {bad}")
    if bn_batches is not None and bn_batches < 1:
        raise UserError(f"bn_batches must be >= 1 (or None for the whole training split), got {bn_batches}")
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    device = resolve_device(device or "cpu")
    if repair and bn_layers(model):
        raise UserError("REPAIR is for networks without BatchNorm; BatchNorm networks are recalibrated "
                        "at every interior t already (drop --repair)")
    t0 = time.perf_counter()
    used = method
    if repair:
        method = used = "loop"
    if method == "auto":
        method = used = "fused" if _has_conv(model) else "auto"
    if method == "loop":
        rec = _curve_loop(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device, repair)
    elif method == "fused":
        rec = _curve_fused(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device)
    else:
        try:
            rec = _curve_vmap(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device, max_models, act_budget)
            used = "vmap"
        except (RuntimeError, NotImplementedError) as e:
            if method == "vmap" or "vmap" not in str(e).lower() and "batch" not in str(e).lower():
                raise
            rec = _curve_loop(model, sd_a, sd_b, data, ts, bn_batches, batch_size, device)
            used = "loop"
            rec["vmap_fallback_reason"] = str(e).splitlines()[0][:200]
    rec["method"] = used
    rec["bn"] = {"recalibrated": bool(bn_layers(model)) and any(not _is_endpoint(t) for t in ts),
                 "repair": repair, "batches": "all" if bn_batches is None else bn_batches, "batch_size": batch_size}
    rec["seconds"] = time.perf_counter() - t0
    return rec


def interpolated_states(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle,
                        ts: Sequence[float], *, bn_batches: int | None = None, batch_size: int = 1000,
                        device=None, max_models: int | None = None) -> list[StateDict]:
    """The state dicts (1-t)·A + t·B for every t, BatchNorm statistics recomputed at interior t exactly
    as `interpolate.recalibrate_bn` would, but for all t in one pass over the training data."""
    from .train import resolve_device

    return _curve_vmap(model, sd_a, sd_b, data, [float(t) for t in ts], bn_batches, batch_size,
                       resolve_device(device or "cpu"), max_models, DEFAULT_ACT_BUDGET, states_only=True)


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
        outs.append(model(x).double().cpu())
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
        out = model(x).double()
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
    from .train import resolve_device

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
    """Barriers of a curve record (PAPER.md). All four headline numbers are >= 0, bigger = worse:

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


def measure(model: nn.Module, sd_a: StateDict, sd_b: StateDict, data: DataBundle, *, points: int = 11,
            align: bool = True, example_input: torch.Tensor | None = None, bn_batches: int | None = None,
            seed: int = 0, device=None, ts: Sequence[float] | None = None, refine: int = 0,
            batch_size: int = 1000, method: str = "auto", repair: bool = False, temperature: bool = False,
            temperature_fraction: float = 0.2) -> dict:
    """The barrier record of DESIGN.md: t, train, test, barrier{...}, alignment{...}, bn, timings.

    With `temperature`, also `temperature_scaled` (see `temperature_curve`) and barrier fields
    `train_loss_ts` / `test_loss_ts`: the loss barriers after temperature scaling every point.

    With `align`, B is first replaced by the permutation of B that best matches A (weight matching,
    `stardomain.permute.align`). `refine` > 0 evaluates that many extra t values between the grid
    neighbours of the worst grid point (train and test loss) and reports `barrier_refined` beside the
    grid barrier.
    """
    t_start = time.perf_counter()
    ts = list(ts) if ts is not None else grid(points)
    alignment: dict[str, Any] = {"aligned": False}
    t_align = 0.0
    if align:
        from .permute import align as permute_align
        if example_input is None:
            x = data.train.x[:2] if data.train.x is not None else next(batches(data.train, 2))[0]
            example_input = x
        ta = time.perf_counter()
        sd_b, info = permute_align(copy.deepcopy(model).cpu(), {k: v.cpu() for k, v in sd_a.items()},
                                   {k: v.cpu() for k, v in sd_b.items()}, example_input=example_input.cpu(),
                                   method="weight", seed=seed)
        t_align = time.perf_counter() - ta
        alignment = {"aligned": True, **{k: v for k, v in info.items() if k != "perm" and _jsonable(v)}}
    rec = curve(model, sd_a, sd_b, data, ts, bn_batches=bn_batches, batch_size=batch_size, device=device,
                method=method, repair=repair)
    out: dict[str, Any] = {"t": rec["t"], "train": rec["train"], "test": rec["test"], "barrier": barriers(rec)}
    t_refine = 0.0
    if refine > 0:
        tr = time.perf_counter()
        b = out["barrier"]
        extra = sorted(set(_refine_points(ts, b["train_loss_t"], refine)) | set(_refine_points(ts, b["test_loss_t"], refine)))
        if extra:
            r2 = curve(model, sd_a, sd_b, data, extra, bn_batches=bn_batches, batch_size=batch_size,
                       device=device, method=method, repair=repair)
            merged = _merge(rec, r2)
            rb = barriers(merged)
            out["barrier_refined"] = {"t": r2["t"], "train": r2["train"], "test": r2["test"],
                                      **{k: rb[k] for k in rb if k != "definition"}}
        t_refine = time.perf_counter() - tr
    t_temp = 0.0
    if temperature:
        tt = time.perf_counter()
        ts_rec = temperature_curve(model, sd_a, sd_b, data, ts, bn_batches=bn_batches, batch_size=batch_size,
                                   device=device, fraction=temperature_fraction, seed=seed)
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
    from .checkpoint import weights_sha256

    return weights_sha256(sd)


def measure_files(path_a, path_b, *, points: int = 11, align: bool = True, bn_batches: int | None = None,
                  device: str = "auto", refine: int = 0, seed: int = 0, repair: bool = False,
                  temperature: bool = False, temperature_fraction: float = 0.2) -> dict:
    """`measure` on two model files; refuses incompatible pairs (UserError). Adds both files' sha256."""
    from .checkpoint import build_from_meta, data_from_meta, read_pair

    sd_a, meta_a, sd_b, meta_b = read_pair(path_a, path_b, "interpolate")
    model = build_from_meta(meta_a, str(path_a))
    data = data_from_meta(meta_a, str(path_a))
    rec = measure(model, sd_a, sd_b, data, points=points, align=align, bn_batches=bn_batches, device=device,
                  refine=refine, seed=seed, repair=repair, temperature=temperature,
                  temperature_fraction=temperature_fraction)
    rec["files"] = {"a": str(path_a), "b": str(path_b)}
    rec["sha256"] = {"a": meta_a["sha256"], "b": meta_b["sha256"], "b_interpolated": rec["sha256"]["b"]}
    return rec


# --------------------------------------------------------------------------------------------------
# plot


def plot(rec: dict, out=None, title: str | None = None) -> bytes:
    """PNG of loss and accuracy against t (train solid, test dashed, chords dotted). Written atomically
    to `out` when given; the PNG bytes are returned either way."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write_bytes

    ts = rec["t"]
    b = rec.get("barrier") or barriers(rec)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    colors = {"train": "tab:blue", "test": "tab:orange"}
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for s in ("train", "test"):
            ys = rec[s][metric]
            ax.plot(ts, ys, "-" if s == "train" else "--", marker="o", ms=4, color=colors[s],
                    label=f"{s}  barrier {b[f'{s}_{metric}']:.4g}")
            y0, y1 = ys[ts.index(0.0)], ys[ts.index(1.0)]
            ax.plot([0, 1], [y0, y1], ":", color=colors[s], lw=1)
        ax.set_xlabel("t   (0 = A, 1 = B)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dotted: chord" if metric == "loss" else "barrier = drop below chord",
                  title_fontsize=8)
    aligned = (rec.get("alignment") or {}).get("aligned")
    fig.suptitle(title or f"interpolation A→B ({'aligned' if aligned else 'not aligned'}, "
                 f"{rec.get('data', '')})", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "stardomain barrier"})  # see checkpoint.check_output
    plt.close(fig)
    png = buf.getvalue()
    if out is not None:
        atomic_write_bytes(out, png)
    return png
