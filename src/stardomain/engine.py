"""The stacked-weights engine: K weight sets of one architecture, interpolated, BatchNorm-recalibrated
and evaluated together. A single model is its K = 1 case (`interpolate.recalibrate_bn`, `train.evaluate`).

A `Stack` holds K weight sets as stacked tensors (every state-dict entry with a leading model axis).
Interpolation is `torch.lerp`, bit-identical to `interpolate.lerp` row by row. An `Engine` (one
architecture on one device) recalibrates and evaluates stacks with one convention for each:

- BatchNorm (docs/method.md, "BatchNorm along a path"): running statistics = the average over training batches of each
  batch's mean and unbiased variance, every batch normalised by its own statistics (a train-mode pass,
  PyTorch's momentum=None mode). The statistics are reduced in two passes over an (examples x channels)
  view and accumulated in float64 (`exact_batch_norm`).
- Evaluation: mean cross-entropy (summed per batch in float32, accumulated in float64; one model:
  `F.cross_entropy`, a vmapped stack: logsumexp - picked logit, equal up to float32 rounding) and accuracy
  (a fraction) in eval mode; probabilities are the float32 softmax, returned in float64.

Execution strategies, chosen for speed only (the conventions above do not change):

- "vmap": a chunk of models (sized by an activation budget) per call under `torch.func.vmap` +
  `functional_call`. For a segment stack (row k = lerp(A, B, t_k)) of an `nn.Sequential` whose first
  parametric layer is Linear/Conv, that layer runs for A and B only and its output is interpolated (the
  layer is affine in its weights): the bulk of an MLP's cost.
- "loop": one module, one row at a time; 2-D conv nets on CPU recalibrate channels-last (oneDNN).
- "fused": "loop", but evaluation runs through a frozen, BN-folded TorchScript module (conv nets: vmap
  over conv weights becomes grouped convolutions, slower on CPU than one model at a time).
- "auto": fused for conv nets with BatchNorm (folding it is the gain), vmap otherwise; vmap falls back to
  loop for an operation it cannot batch, or can batch only by looping inside.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .data import Split, batches, per_token
from .errors import UserError

StateDict = dict[str, torch.Tensor]
STRATEGIES = ("auto", "vmap", "fused", "loop")
# Largest activation tensor (elements) one vmapped call may create; bounds memory for wide nets.
DEFAULT_ACT_BUDGET = 2 ** 28
BN_STATS = ("running_mean", "running_var")


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_bn(model: nn.Module) -> bool:
    return bool(bn_layers(model))


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


# ---------------------------------------------------------------- stacks

@dataclass(frozen=True)
class Stack:
    """K weight sets: `tensors[key][k]` is entry `key` of weight set k (state-dict order and keys).
    `segment` = (A, B, t) when row k is lerp(A, B, t_k) (enables the vmap first-layer shortcut)."""

    tensors: dict[str, torch.Tensor]
    segment: tuple[StateDict, StateDict, torch.Tensor] | None = None

    @property
    def k(self) -> int:
        return len(next(iter(self.tensors.values())))

    @classmethod
    def of(cls, sds: Sequence[StateDict], device: torch.device | str = "cpu") -> "Stack":
        """Stack state dicts along a new leading axis."""
        return cls({key: torch.stack([sd[key].to(device) for sd in sds]) for key in sds[0]})

    @classmethod
    def between(cls, sd_a: StateDict, sd_b: StateDict, ts: Sequence[float],
                device: torch.device | str = "cpu") -> "Stack":
        """Row k = (1 - t_k)·A + t_k·B, bit-identical to `interpolate.lerp`. The endpoints t = 0 and 1 keep
        their own buffers (float and integer); interior rows take A's integer buffers."""
        tt = torch.tensor([float(t) for t in ts], dtype=torch.float64)
        a = {key: v.to(device) for key, v in sd_a.items()}
        b = {key: v.to(device) for key, v in sd_b.items()}
        out = {}
        for key, va in a.items():
            vb = b[key]
            if va.is_floating_point():
                w = tt.to(va.device, va.dtype).view(-1, *([1] * va.dim()))
                out[key] = torch.lerp(va.unsqueeze(0).expand(len(tt), *va.shape),
                                      vb.unsqueeze(0).expand(len(tt), *vb.shape), w)
            else:
                out[key] = va.unsqueeze(0).repeat(len(tt), *([1] * va.dim()))
            for i, t in enumerate(tt.tolist()):
                if t == 1.0 or (t == 0.0 and va.is_floating_point()):
                    out[key][i] = va if t == 0.0 else vb
        return cls(out, (a, b, tt))

    @classmethod
    def lerp_rows(cls, a: "Stack", b: "Stack", t: torch.Tensor) -> "Stack":
        """Row i = (1 - t_i)·a_i + t_i·b_i (torch.lerp, as `interpolate.lerp`); integer entries from `a`."""
        out = {}
        for key, va in a.tensors.items():
            if va.is_floating_point():
                w = t.to(va.device, va.dtype).view(-1, *([1] * (va.dim() - 1)))
                out[key] = torch.lerp(va, b.tensors[key].to(va.device, va.dtype), w)
            else:
                out[key] = va.clone()
        return cls(out)

    def state(self, i: int) -> StateDict:
        """Weight set i as an ordinary state dict (copies)."""
        return {key: v[i].clone() for key, v in self.tensors.items()}

    def states(self) -> list[StateDict]:
        return [self.state(i) for i in range(self.k)]


# ---------------------------------------------------------------- BatchNorm statistics

def exact_batch_norm(bn: nn.modules.batchnorm._BatchNorm, record: list, vmapped: bool = False,
                     tag: int = 0) -> Callable:
    """A train-mode forward for `bn` that normalises by the batch's own statistics, computed in two passes
    (mean, then mean squared deviation) over an (examples x channels) view, and appends (tag, mean, biased
    variance, n) to `record`. Why our own: torch's channels-last CPU kernel accumulates the variance
    naively (relative error ~1e-4 on a 1000-image MNIST batch, enough to move an interpolated model's loss
    by 3e-4); this one agrees with float64 to ~1e-7, like the contiguous kernel. `vmapped`: for use under
    vmap, where F.batch_norm with batched statistics and square_ have no fast batching rule; the
    normalisation is then written out as x·scale + shift (the same up to float32 rounding)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])  # a view for channels-last and 2-D inputs
        n = rows.shape[0]
        if n < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input of size "
                             f"{list(x.shape)}")
        mean = rows.sum(0) / n
        dev = rows - mean
        var = (dev.square() if vmapped else dev.square_()).sum(0) / n
        record.append((tag, mean, var, n))
        if not vmapped:
            return F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        scale = torch.rsqrt(var + bn.eps)
        scale = scale * bn.weight if bn.weight is not None else scale
        if x.dim() == 2:  # rows is x itself: reuse the deviations
            return dev * scale + bn.bias if bn.bias is not None else dev * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
        return x * scale.view(shape) + shift.view(shape)

    return forward


class _Recording:
    """While active, every tracked BatchNorm layer of `module` runs `exact_batch_norm` (an instance
    attribute shadowing the class's forward) and the module is in train mode; `record` collects one
    (layer index, mean, var, n) per layer and call."""

    def __init__(self, module: nn.Module, vmapped: bool = False):
        self.module, self.vmapped = module, vmapped
        self.layers = [m for m in bn_layers(module) if m.track_running_stats]
        self.record: list = []

    def __enter__(self) -> "_Recording":
        for j, m in enumerate(self.layers):
            m.forward = exact_batch_norm(m, self.record, self.vmapped, j)
        self.module.train()
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            del m.forward
        self.module.eval()

    def take(self) -> tuple[torch.Tensor, ...]:
        """(mean_1, var_1, mean_2, var_2, ...) of the last call in the order of `layers` (not the order
        the forward calls them in), and clears the record."""
        rec = sorted(self.record, key=lambda r: r[0])
        self.record.clear()
        if [r[0] for r in rec] != list(range(len(self.layers))):
            raise UserError("BatchNorm recalibration needs every BatchNorm layer to run exactly once per "
                            "forward pass; this model skips or repeats one")
        self.ns = [n for _, _, _, n in rec]
        return tuple(t for _, mean, var, _ in rec for t in (mean, var))


class _Sums:
    """float64 running sums of per-batch means and unbiased variances, one row per model."""

    def __init__(self):
        self.sums: list[torch.Tensor] | None = None
        self.batches = 0

    def add(self, stats: Sequence[torch.Tensor], ns: Sequence[int], rows: slice | None = None, k: int = 1) -> None:
        """stats = (mean_1, var_1, ...) with a leading model axis for the models in `rows` (of k)."""
        if self.sums is None:
            self.sums = [torch.zeros(k, *s.shape[1:], dtype=torch.float64, device=s.device) for s in stats]
        for j, s in enumerate(stats):
            n = ns[j // 2]
            self.sums[j][rows if rows is not None else slice(None)] += \
                s.double() if j % 2 == 0 else s.double() * (n / (n - 1))

    def means(self) -> list[torch.Tensor]:
        if self.batches == 0:
            raise UserError("BatchNorm recalibration saw no training batch (empty training split?)")
        return [s / self.batches for s in self.sums]


@torch.no_grad()
def module_bn_statistics(model: nn.Module, split: Split, batch_size: int = 1000, max_batches: int | None = None,
                         device: torch.device | str | None = None) -> tuple[list[torch.Tensor], int]:
    """One model's recalibrated statistics: -> ([mean_1, var_1, ...] in float64 for its tracked BN layers,
    batches seen). 2-D conv nets on CPU run channels-last (oneDNN convolutions and pooling, 2-3x faster
    than NCHW; the statistics are reduced by `exact_batch_norm` either way). The module's weights are not
    changed; it is left contiguous, in eval mode."""
    device = torch.device(device or next(model.parameters()).device)
    channels_last = (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
                     and all(p.dim() != 5 for p in model.parameters()))  # Module.to would reject 5-D weights
    sums = _Sums()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        with _Recording(model) as rec:
            for x, _ in batches(split, batch_size, device=device, max_batches=max_batches):
                model(x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)
                stats = rec.take()
                sums.add([s.unsqueeze(0) for s in stats], rec.ns)
                sums.batches += 1
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return [s[0] for s in sums.means()], sums.batches


# ---------------------------------------------------------------- evaluation (the one loop)

def _ce_module(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-model summed cross-entropy, F.cross_entropy per model (one model: `train.evaluate`'s number)."""
    return torch.stack([F.cross_entropy(o, y, reduction="sum") for o in out])


def _ce_stacked(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-model summed cross-entropy of (k, batch, classes) logits as logsumexp - picked logit, all k at
    once: the same quantity up to float32 rounding, ~9x cheaper than F.cross_entropy per model on 50k x 10
    logits (measured)."""
    picked = out.gather(2, y.view(1, -1, 1).expand(out.shape[0], out.shape[1], 1)).squeeze(2)
    return (torch.logsumexp(out, 2) - picked).sum(1)


@torch.no_grad()
def score_batches(logits: Callable[[torch.Tensor, int], torch.Tensor], split: Split, batch_size: int,
                  device, k: int = 1, stacked: bool = False) -> dict[str, list[float]]:
    """Mean cross-entropy and accuracy of k models over a split. `logits(x, offset)` -> (k, batch, classes)
    for the batch starting at example `offset`. Per batch and model the loss is summed in float32
    (`_ce_stacked` when `stacked`, else F.cross_entropy), then accumulated in float64."""
    loss = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    n = preds = 0  # examples (the offset of the next batch); predictions (tokens of next-token data)
    for x, y in batches(split, batch_size, device=device):
        out, yt = per_token(logits(x, n).float(), y)
        loss += (_ce_stacked if stacked else _ce_module)(out, yt).double()
        correct += (out.argmax(2) == yt.unsqueeze(0)).sum(1)
        n, preds = n + len(y), preds + len(yt)
    if n == 0:
        raise UserError("cannot evaluate on an empty split")
    return {"loss": (loss / preds).tolist(), "acc": (correct.double() / preds).tolist()}


def evaluate_module(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int,
                    device) -> dict[str, float]:
    """One model (K = 1): {"loss", "acc"} of `forward` (a module in eval mode, or a frozen one)."""
    r = score_batches(lambda x, _n: forward(x).unsqueeze(0), split, batch_size, device)
    return {"loss": r["loss"][0], "acc": r["acc"][0]}


def inference_module(m: nn.Module, example: torch.Tensor) -> nn.Module:
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


# ---------------------------------------------------------------- the vmap strategy

_PARAM_FREE = (nn.Flatten, nn.Identity, nn.Dropout)


def split_first_layer(m: nn.Module):
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


class _Vmapped:
    """One stack under vmap: `call(fn, x, rows)` runs the stack's rows `rows` on a batch, `fn` picking the
    output (logits, or the BatchNorm statistics recorded by `rec`). Rows go in chunks of `chunk` models."""

    def __init__(self, m: nn.Module, rec: _Recording, stack: Stack, chunk: int):
        self.m, self.rec, self.chunk, self.k = m, rec, chunk, stack.k
        # state-dict entries only: non-persistent buffers (rotary tables) stay the module's own; every name of
        # a tied parameter (an embedding and its output head), since the call below does not tie weights
        floats = {k for k, v in m.named_buffers() if k in stack.tensors and v.is_floating_point()}
        ints = {k for k, v in m.named_buffers() if k in stack.tensors and not v.is_floating_point()}
        pnames = [k for k, _ in m.named_parameters(remove_duplicate=False)]
        self.params = {k: stack.tensors[k] for k in pnames}
        self.bufs = {k: stack.tensors[k] for k in floats}
        self.ints = {k: stack.tensors[k][0] for k in ints}  # not read in eval mode nor by exact_batch_norm
        split = split_first_layer(m) if stack.segment is not None else None
        self.first = None if split is None else self._first_layer(split, stack.segment)
        target = m if self.first is None else self.first["rest"]
        names = None if self.first is None else self.first["names"]

        def run(p, b, x):
            if names is not None:
                p, b, i = ({rk: p[ok] for rk, ok in names["p"]}, {rk: b[ok] for rk, ok in names["b"]},
                           {rk: self.ints[ok] for rk, ok in names["i"]})
            else:
                i = self.ints
            return functional_call(target, (p, b, i), (x,), tie_weights=False)

        def stats(p, b, x):
            run(p, b, x)
            return rec.take()

        dims = (0, 0, None) if self.first is None else (0, 0, 0)
        self.fns = {"logits": vmap(run, in_dims=dims, randomness="different"),
                    "stats": vmap(stats, in_dims=dims, randomness="different")}

    def _first_layer(self, split, segment) -> dict:
        """The first layer is affine in its parameters and sees the same input for every t, so its output at
        t is (1-t)·out_A + t·out_B: two evaluations instead of K. A's and B's side by side: one wider call."""
        pre, first, first_name, rest, names = split
        a, b, tt = segment
        fkeys = [k for k, _ in first.named_parameters()]
        both = {k: torch.cat([a[f"{first_name}.{k}"], b[f"{first_name}.{k}"]], 0) for k in fkeys}
        return {"rest": rest, "names": names, "tt": tt, "n_out": a[f"{first_name}.{fkeys[0]}"].shape[0],
                "out": lambda x: functional_call(first, both, (pre(x),))}

    def first_out(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.first is None else self.first["out"](x)

    def weights(self, rows: torch.Tensor) -> tuple[dict, dict]:
        """The parameters and float buffers of `rows` (no copy when they are all the rows)."""
        if len(rows) == self.k and bool((rows == torch.arange(self.k, device=rows.device)).all()):
            return self.params, self.bufs
        return {k: v[rows] for k, v in self.params.items()}, {k: v[rows] for k, v in self.bufs.items()}

    def call(self, fn: str, x: torch.Tensor, rows: torch.Tensor, hab: torch.Tensor | None = None,
             weights: tuple[dict, dict] | None = None):
        p, b = weights if weights is not None else self.weights(rows)
        if self.first is None:
            return self.fns[fn](p, b, x)
        hab = self.first["out"](x) if hab is None else hab
        n_out = self.first["n_out"]
        ha, hb = hab[:, :n_out], hab[:, n_out:]
        w = self.first["tt"].to(ha.device, ha.dtype)[rows.to(self.first["tt"].device)].view(-1, *([1] * ha.dim()))
        h = torch.lerp(ha.unsqueeze(0).expand(len(w), *ha.shape), hb.unsqueeze(0).expand(len(w), *hb.shape), w)
        return self.fns[fn](p, b, h)

    def chunks(self, rows: Sequence[int]) -> list[tuple[int, torch.Tensor, tuple[dict, dict]]]:
        """(position in `rows`, row indices, their weights) of each chunk; weights gathered once per pass."""
        device = next(iter(self.params.values())).device
        out = []
        for i in range(0, len(rows), self.chunk):
            sel = torch.tensor(list(rows[i:i + self.chunk]), device=device)
            out.append((i, sel, self.weights(sel)))
        return out


# ---------------------------------------------------------------- the engine

class Engine:
    """Recalibrates and evaluates stacks of one architecture on one device (module docstring).
    `model` is any module of the architecture (its weights are not used). After a call, `strategy` is the
    strategy that ran ("loop" after a vmap fallback, whose reason is in `fallback_reason`). `fall_back`
    (default: only under "auto"): an operation vmap cannot batch switches the engine to loop."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", strategy: str = "auto", *,
                 act_budget: int = DEFAULT_ACT_BUDGET, max_models: int | None = None,
                 fall_back: bool | None = None):
        if strategy not in STRATEGIES:
            raise UserError(f"method must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
        self.device = torch.device(device)
        self.module = copy.deepcopy(model).to(self.device).eval()
        # fused needs BatchNorm to fold: a BN-free ViT (one patch convolution) ran 2x slower fused than
        # looped, and every freeze keeps ~4-7 MB of TorchScript graphs until the process ends
        # (benchmarks/engine_transformers.py)
        self.strategy = (("fused" if has_conv(model) and has_bn(model) else "vmap") if strategy == "auto"
                         else strategy)
        self.may_fall_back = strategy == "auto" if fall_back is None else fall_back
        self.fallback_reason: str | None = None
        self.act_budget, self.max_models = act_budget, max_models
        self.bn_keys = [f"{n}.{s}" if n else s for n, m in self.module.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                        for s in BN_STATS]
        self.bn_batches_seen = 0
        self.models_per_call: int | None = None
        self.eval_batch_size: int | None = None
        self._first_cache: tuple | None = None  # (split, segment, first-layer outputs on the whole split)
        self._per_example: dict[tuple, int] = {}

    def _guarded(self, run_vmap: Callable, run_loop: Callable):
        """vmap when the strategy says so; under "auto", an operation vmap cannot batch falls back to loop,
        and so does one it can only batch by looping inside (torch warns "no batching rule": scaled
        dot-product attention on CPU: 2.2x slower than the loop on a small GPT, benchmarks/engine_transformers.py)."""
        if self.strategy != "vmap":
            return run_loop()
        try:
            with warnings.catch_warnings():
                if self.may_fall_back:
                    warnings.filterwarnings("error", message=".*batching rule.*", category=UserWarning)
                return run_vmap()
        except (RuntimeError, NotImplementedError, UserWarning) as e:
            if not self.may_fall_back or ("vmap" not in str(e).lower() and "batch" not in str(e).lower()):
                raise
            self.strategy, self.fallback_reason = "loop", str(e).splitlines()[0][:200]
            return run_loop()

    def _vmapped(self, stack: Stack, x0: torch.Tensor, batch_size: int, rec: _Recording) -> _Vmapped:
        """Models per call from the activation budget (and `max_models`); evaluation batches as big as the
        budget allows (evaluation has no batch-size semantics, unlike BatchNorm statistics)."""
        shape = tuple(x0.shape[1:])
        if shape not in self._per_example:  # one forward per input shape (a new shape costs oneDNN set-up)
            self._per_example[shape] = _peak_elements_per_example(self.module, x0[:1].to(self.device))
            if self.may_fall_back:  # two models on one example: an op vmap cannot batch shows up cheaply here
                probe = Stack.of([self.module.state_dict()] * 2, self.device)
                _Vmapped(self.module, rec, probe, 2).call("logits", x0[:1].to(self.device), torch.arange(2))
        per_ex = self._per_example[shape]
        chunk = max(1, min(stack.k, self.act_budget // max(1, per_ex * batch_size)))
        if self.max_models:
            chunk = max(1, min(chunk, self.max_models))
        self.models_per_call = chunk
        self.eval_batch_size = max(batch_size, self.act_budget // max(1, per_ex * chunk))
        return _Vmapped(self.module, rec, stack, chunk)

    # ---- BatchNorm recalibration

    def recalibrate(self, stack: Stack, split: Split, batch_size: int = 1000, max_batches: int | None = None,
                    rows: Sequence[int] | None = None) -> Stack:
        """A new stack whose rows `rows` (default all) have BatchNorm statistics recomputed on `split`
        (the convention of the module docstring) and num_batches_tracked = batches seen. No-op without BN."""
        rows = list(range(stack.k)) if rows is None else list(rows)
        if not self.bn_keys or not rows:
            return stack
        stats, seen = self._guarded(lambda: self._vmap_stats(stack, rows, split, batch_size, max_batches),
                                    lambda: self._loop_stats(stack, rows, split, batch_size, max_batches))
        out = dict(stack.tensors)
        idx = torch.tensor(rows, device=self.device)
        for key, s in zip(self.bn_keys, stats):
            out[key] = out[key].clone()
            out[key][idx] = s.to(out[key].dtype)
            nbt = key.rsplit(".", 1)[0] + ".num_batches_tracked" if "." in key else "num_batches_tracked"
            if nbt in out:
                out[nbt] = out[nbt].clone()
                out[nbt][idx] = seen
        return replace(stack, tensors=out)

    def _loop_stats(self, stack, rows, split, batch_size, max_batches):
        m = self.module
        per_row = []
        for r in rows:
            m.load_state_dict(stack.state(r))
            s, seen = module_bn_statistics(m, split, batch_size, max_batches, self.device)
            per_row.append(s)
        self.bn_batches_seen = seen
        return [torch.stack([s[j] for s in per_row]) for j in range(len(per_row[0]))], seen

    def _vmap_stats(self, stack, rows, split, batch_size, max_batches):
        """All rows per batch; the first-layer outputs on the whole split are kept for `evaluate` when they
        fit in half the budget (the same in the BN pass and the evaluation)."""
        self._first_cache = None
        x0 = next(batches(split, 1, device=self.device))[0]
        rec = _Recording(self.module, vmapped=True)
        v = self._vmapped(stack, x0, batch_size, rec)
        with torch.no_grad():
            numel = 0 if v.first is None else v.first_out(x0)[0].numel()
        keep = [] if (v.first is not None and max_batches is None
                      and len(split) * numel <= self.act_budget // 2) else None
        sums = _Sums()
        with rec, torch.no_grad():
            chunks = v.chunks(rows)
            for x, _ in batches(split, batch_size, device=self.device, max_batches=max_batches):
                hab = v.first_out(x)
                if keep is not None:
                    keep.append(hab)
                for pos, sel, w in chunks:
                    stats = v.call("stats", x, sel, hab, w)
                    sums.add(stats, rec.ns, slice(pos, pos + len(sel)), len(rows))
                sums.batches += 1
        self.bn_batches_seen = sums.batches
        if keep:
            self._first_cache = (split, stack.segment, torch.cat(keep))
        return sums.means(), sums.batches

    # ---- evaluation

    def evaluate(self, stack: Stack, splits: dict[str, Split], batch_size: int = 1000) -> dict[str, dict]:
        """{name: {"loss": [...], "acc": [...]}}: mean cross-entropy and accuracy of every row on each split."""
        return self._guarded(lambda: {s: self._vmap_evaluate(stack, sp, batch_size) for s, sp in splits.items()},
                             lambda: self._loop_evaluate(stack, splits, batch_size))

    def _loop_evaluate(self, stack, splits, batch_size):
        m = self.module
        out: dict[str, dict] = {s: {"loss": [], "acc": []} for s in splits}
        first = next(iter(splits.values()))
        x0 = next(batches(first, 2, device=self.device))[0] if self.strategy == "fused" else None
        for r in range(stack.k):
            m.load_state_dict(stack.state(r))
            fwd = inference_module(copy.deepcopy(m), x0) if x0 is not None else m.eval()
            for s, sp in splits.items():
                res = evaluate_module(fwd, sp, batch_size, self.device)
                out[s]["loss"].append(res["loss"])
                out[s]["acc"].append(res["acc"])
        return out

    def _vmap_evaluate(self, stack, split, batch_size):
        x0 = next(batches(split, 1, device=self.device))[0]
        v = self._vmapped(stack, x0, batch_size, _Recording(self.module))
        cache = self._first_cache
        kept = cache[2] if cache is not None and cache[0] is split and cache[1] is stack.segment else None
        chunks = v.chunks(list(range(stack.k)))

        def logits(x, offset):
            hab = kept[offset:offset + len(x)] if kept is not None else None
            outs = [v.call("logits", x, sel, hab, w) for _, sel, w in chunks]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        return score_batches(logits, split, self.eval_batch_size, self.device, stack.k, stacked=True)

    @torch.no_grad()
    def probs(self, stack: Stack, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """(k, N, classes) softmax probabilities (float32 softmax, returned as float64) over an input tensor;
        a next-token model's (k, N, T, vocab) come as (k, N*T, vocab), in the order of `data.per_token`."""
        def run_vmap():
            v = self._vmapped(stack, x[:1], batch_size, _Recording(self.module))
            chunks = v.chunks(list(range(stack.k)))
            return self._batched(x, batch_size, lambda xb: torch.cat(
                [v.call("logits", xb, sel, None, w) for _, sel, w in chunks]))

        def run_loop():
            outs = []
            for r in range(stack.k):
                self.module.load_state_dict(stack.state(r))
                outs.append(self._batched(x, batch_size, lambda xb: self.module.eval()(xb).unsqueeze(0)))
            return torch.cat(outs)

        return self._guarded(run_vmap, run_loop)

    def _batched(self, x: torch.Tensor, batch_size: int, logits: Callable) -> torch.Tensor:
        out = [logits(x[i:i + batch_size].to(self.device)).float().softmax(-1).double()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out, 1).flatten(1, -2)  # next-token models: one row per token
