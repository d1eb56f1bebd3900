"""The Starlight objective (docs/method.md, "Starlight") as a piece of any training loop: `Starlight`.

    light = sd.Starlight(star, sources, example_input=x0, align_every=500, seed=0)
    for x, y in loader:                       # your loader, augmentation, AMP, optimiser, schedule
        loss = F.cross_entropy(light(x), y)   # the interpolated network (1-t)·θ + t·π(θ_n) on x
        loss.backward(); opt.step(); opt.zero_grad()

This module holds the one implementation of the Starlight step, which `stardomain star` uses too
(`starlight.star_loss`): `interpolated_forward` runs the star's module at (1-t)·θ + t·θ_n by putting the
interpolated tensors where the module holds its own for the call, as `torch.func.functional_call` does but
from places found once per module (no second module), and back-propagation gives θ the gradient
(1-t)·∇L at the interpolated point, the chain rule's factor applied exactly once:

- the interpolated weights come from one autograd node over all parameters whose backward hands the
  incoming gradient to θ unchanged (one node for all: a view of each parameter as its own node, tried,
  costs more on models of many tensors), and the (1-t) is applied to the *output's* gradient (a few
  numbers per example, not one pass over every parameter), so a step costs one lerp per parameter
  (reading the drawn source from memory is most of it) and a few Python operations more than an
  ordinary one;
- when an input itself needs a gradient (adversarial training, an upstream encoder), scaling the output
  would scale that gradient too, and an output holding objects that torch's pytree cannot look into
  might hide a tensor from the scaling; in both cases the factor goes onto the parameters' gradients
  instead (one multiply per parameter in backward). The context form (`Starlight.drawn`, used by the
  Lightning and Hugging Face integrations, which cannot see the output) always works that way.

Gradients reach θ through autograd's ordinary accumulation, so gradient accumulation, `torch.autocast`,
gradient clipping and DistributedDataParallel (its hooks fire on θ) work as for any module. Activation
checkpointing does not: it re-runs parts of the forward during backward, after θ is back in place, so the
gradient would be taken at θ's activations; the first backward through an interpolated forward refuses
such a re-run (`_watch`), with one clear error and θ untouched.

BatchNorm: interpolated forwards run with scratch copies of the buffers, which absorb the running-stat
updates of the interpolated networks; θ's own statistics are untouched and are recomputed on training data
by `Starlight.recalibrate_bn` (`stardomain star` does that after every epoch).

Draws: a seeded numpy PCG64 stream (`Draws`), one (source, t) per call; alignment: every source is
re-aligned from its original weights to the current θ by weight matching (warm-started from its previous
permutation) every `align_every` calls and on `realign()`, with the seed `seed·100003 + calls so far`, as
`stardomain star` does per step. With the same seed, recipe and data order the two give the same star.
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import permute
from .checkpoint import check_fits, read_model_file
from .config import StarConfig, validate
from .data import Split, _to_split
from .errors import UserError
from .interpolate import has_bn, recalibrate_bn as _recalibrate_bn
from .permute.inputs import forward_once

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------- the step

class _Interpolated(torch.autograd.Function):
    """(1-t)·θ + t·θ_n for every parameter at once, written into a buffer set from `pool` (a list; reused
    once this node's backward has run, so steady training allocates nothing; a graph dropped without
    backward takes its set with it). Backward hands θ the incoming gradient times `factor["scale"]`, read
    at backward time: 1 when the (1-t) went onto the output's gradient instead (`interpolated_forward`
    decides after the forward, once it has seen the output)."""

    @staticmethod
    def forward(ctx, t: float, factor: dict, pool: list, sources: tuple, *params: torch.Tensor):  # type: ignore[override]
        bufs = pool.pop() if pool else [torch.empty_like(p) for p in params]
        # aliases without the outputs' history: holding the outputs themselves would make a cycle (output ->
        # node -> ctx -> output) that outlives a graph never back-propagated, a weight set leaked per call
        ctx.factor, ctx.pool, ctx.bufs = factor, pool, [b.detach() for b in bufs]
        return tuple(torch.lerp(p, s, t, out=b) for p, s, b in zip(params, sources, bufs))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if ctx.bufs is not None:  # this graph is done with its buffers (a second backward would be refused)
            ctx.pool.append(ctx.bufs)
            ctx.bufs = None
        if "watch" in ctx.factor:  # this backward ran the whole graph: no re-run of the forward in it
            _unwatch(ctx.factor.pop("watch"))
        scale = ctx.factor["scale"]
        if scale != 1.0:
            grads = tuple(None if g is None else g * scale for g in grads)
        return (None, None, None, None, *grads)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`. (A hook on a view of the output would
    cost a little less but is silently skipped when the caller modifies the output in place; this view
    refuses that.)"""

    @staticmethod
    def forward(ctx, factor: float, x: torch.Tensor):  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return None, g * ctx.factor


def interpolated_weights(params: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], t: float,
                         factor: dict, pool: list | None = None) -> dict[str, torch.Tensor]:
    """{name: (1-t)·params[name] + t·source[name]}, differentiable in params with the gradient times
    factor["scale"] (a dict, so the caller may still change it after the forward). `pool`: a list the
    caller keeps, of buffer sets to reuse (see _Interpolated)."""
    names = list(params)
    if not torch.is_grad_enabled():
        return {k: torch.lerp(params[k], source[k], t) for k in names}
    out = _Interpolated.apply(t, factor, [] if pool is None else pool, tuple(source[k] for k in names),
                              *(params[k] for k in names))
    return dict(zip(names, out))


def _needs_grad(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the common call, without pytree's walk
        return any(a.requires_grad for a in args)
    return any(torch.is_tensor(v) and v.requires_grad for v in pytree.tree_leaves((args, kwargs)))


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None))


def _scale_output(out: Any, factor: float) -> Any | None:
    """`out` with every tensor that needs a gradient passed through _ScaleGrad, or None when the output
    holds objects whose tensors pytree cannot reach (then the factor must go onto θ's gradients)."""
    if type(out) is torch.Tensor:  # the common output, without pytree's walk
        return _ScaleGrad.apply(factor, out) if out.requires_grad else out
    leaves = pytree.tree_leaves(out)
    if not all(isinstance(v, _PLAIN) for v in leaves):
        return None
    return pytree.tree_map(lambda v: _ScaleGrad.apply(factor, v)
                           if torch.is_tensor(v) and v.requires_grad else v, out)


Slot = tuple[str, dict, str, torch.Tensor]
_SLOTS: "weakref.WeakKeyDictionary[nn.Module, tuple[list[Slot], list[tuple[Any, str, Any]]]]" = \
    weakref.WeakKeyDictionary()


def _slots(model: nn.Module) -> list[Slot]:
    """Where `model` holds each parameter and buffer: (the tensor's first name, the owning submodule's
    `_parameters` or `_buffers` dict, the key there, the tensor found there), once per place, so a tensor held
    under several names (tied weights, a shared submodule) is replaced everywhere by its first name's value.
    Found once per module (resolving dotted names on every call was a tenth of a small model's step) and again
    when a submodule or tensor was replaced since (checked on each call: every link of the module tree and
    every place still holds what it held)."""
    found = _SLOTS.get(model)
    if found is not None and all((p := parent()) is not None and p._modules.get(key) is child()
                                 for parent, key, child in found[1]) \
            and all(d.get(key) is v for _, d, key, v in found[0]):
        return found[0]
    if isinstance(model, (torch.jit.ScriptModule, nn.DataParallel)):
        raise UserError(f"a {type(model).__name__} cannot run with interpolated weights: give the plain module")
    links = [(weakref.ref(m), key, weakref.ref(child))  # weak references: the cache keeps no module alive
             for m in model.modules() for key, child in m._modules.items() if child is not None]
    first: dict[int, str] = {}
    slots, seen = [], set()
    for kind, named in (("_parameters", model.named_parameters), ("_buffers", model.named_buffers)):
        for name, v in named(remove_duplicate=False):
            owner, _, key = name.rpartition(".")
            d = getattr(model.get_submodule(owner), kind)
            first.setdefault(id(v), name)
            if (id(d), key) not in seen:
                seen.add((id(d), key))
                slots.append((first[id(v)], d, key, v))
    _SLOTS[model] = (slots, links)
    return slots


def _swap(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> list[tuple[dict, str, torch.Tensor]]:
    """Put weights[name] into every place of `model` that holds the tensor called name (what
    `torch.func.functional_call` does, without re-resolving names per call). -> what `_restore` puts back."""
    undo = []
    for name, d, key, _ in _slots(model):
        w = weights.get(name)
        if w is not None:
            undo.append((d, key, d[key]))
            d[key] = w
    return undo


def _restore(undo: list[tuple[dict, str, torch.Tensor]]) -> None:
    for d, key, v in reversed(undo):
        d[key] = v


_WATCHED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_CAN_WATCH = hasattr(torch._C, "_current_graph_task_id")  # a private torch function: without it, no guard
RECOMPUTE = ("the star re-runs part of its forward during backward (activation checkpointing: "
             "torch.utils.checkpoint, gradient_checkpointing); the re-run reads the star's own weights, not the "
             "interpolated ones, so its gradients would be wrong: train the star without activation checkpointing")


def _recompute_guard(theta: frozenset, module: nn.Module, args: Any) -> None:
    """A forward inside a backward (checkpointing's re-run) of a submodule holding θ's own tensors `theta`
    (ids) is refused; inside `Starlight.drawn()` the module holds the interpolated ones and the re-run is right."""
    if torch._C._current_graph_task_id() != -1 and any(id(v) in theta for v in module._parameters.values()):
        raise UserError(RECOMPUTE)


def _watch(model: nn.Module, factor: dict) -> None:
    """Activation checkpointing re-runs forwards during backward, after the interpolated weights were put
    back: the gradient would silently be taken at activations of θ. Until one backward through an
    interpolated forward of `model` has finished (its `_Interpolated` node runs last, after any re-run),
    every submodule carries a pre-hook that refuses such a re-run; then the hooks go, so steady training
    pays nothing."""
    hooks = _WATCHED.get(model)
    if hooks == [] or not _CAN_WATCH:
        return
    if hooks is None:
        guard = functools.partial(_recompute_guard, frozenset(id(p) for p in model.parameters()))
        _WATCHED[model] = [m.register_forward_pre_hook(guard) for m in model.modules()]
    factor["watch"] = model


def _unwatch(model: nn.Module) -> None:
    for h in _WATCHED.get(model, ()):
        h.remove()
    _WATCHED[model] = []


def interpolated_forward(model: nn.Module, params: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
                         t: float, args: tuple, kwargs: Mapping[str, Any] | None = None,
                         buffers: Mapping[str, torch.Tensor] | None = None, pool: list | None = None) -> Any:
    """The Starlight step's forward: `model` run at (1-t)·params + t·source on (args, kwargs), its buffers
    replaced by `buffers` when given; `pool` as for `interpolated_weights`. Back-propagating any loss of the
    output gives params the gradient (1-t)·∇L at the interpolated point (see the module docstring for where
    the factor goes)."""
    kwargs = kwargs or {}
    factor = {"scale": 1.0 - t}
    weights = interpolated_weights(params, source, t, factor, pool)
    if buffers:
        weights.update(buffers)
    undo = _swap(model, weights)
    try:
        out = model(*args, **kwargs)
    finally:
        _restore(undo)
    if torch.is_grad_enabled():
        _watch(model, factor)
    if not torch.is_grad_enabled() or _needs_grad(args, kwargs):
        return out
    scaled = _scale_output(out, 1.0 - t)
    if scaled is None:
        return out
    factor["scale"] = 1.0  # the output's gradient carries (1-t) now
    return scaled


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

    def __init__(self, originals: Sequence[StateDict], dtypes: Mapping[str, torch.dtype], device: torch.device,
                 where: str):
        self.originals = originals
        self.dtypes = dict(dtypes)  # the star's own parameter dtypes: a bfloat16 star lerps with bfloat16 sources
        self.names = list(dtypes)
        self.device = device
        self.perms: list[dict[str, torch.Tensor] | None] = [None] * len(originals)
        first = originals[0]
        bytes_per = sum(first[k].numel() * self.dtypes[k].itemsize for k in self.names)
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
        return {k: sd[k].detach().to(dev, self.dtypes[k] if sd[k].is_floating_point() else sd[k].dtype)
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

    def align_to_model(self, model: nn.Module, spec, seed: int, n_step: int, max_iter: int) -> None:
        """Re-align to the module's current weights with the seed of step `n_step` (`stardomain star`'s
        and `Starlight`'s common rule)."""
        star_sd = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                   for k, v in model.state_dict().items()}  # matching in float32 whatever the star's dtype
        self.align_to(star_sd, permute, spec, seed=seed * 100003 + n_step, max_iter=max_iter)


def source_states(sources: Any) -> Sequence[StateDict]:
    """Sources as state dicts: model files are read (weights checked against their digest); state dicts,
    modules and results carrying a `state_dict` (`sd.train`'s Trained) are taken as they are; a sequence
    of another kind (`files.SourceFiles`, reading files on access) is passed through."""
    if isinstance(sources, (str, Path, Mapping)) or not isinstance(sources, Sequence):
        raise UserError("sources must be a list (of state dicts, Trained results or model files)")
    if not isinstance(sources, (list, tuple)):
        return sources
    out = []
    for i, s in enumerate(sources):
        if isinstance(s, (str, Path)):
            s = read_model_file(s)[0]
        elif isinstance(s, nn.Module):
            s = s.state_dict()
        elif not isinstance(s, Mapping) and isinstance(getattr(s, "state_dict", None), Mapping):
            s = s.state_dict
        if not isinstance(s, Mapping):
            raise UserError(f"source {i} is a {type(s).__name__}: give a state dict, a Trained result or a model file")
        out.append(dict(s))
    return out


def check_sources(model: nn.Module, sources: Sequence[StateDict]) -> None:
    """Every source has exactly the model's state-dict names and shapes, its dtypes up to floating-point
    precision (a bfloat16 star may train against float32 sources) and finite weights, one clear line if not."""
    want = model.state_dict()
    for i in range(len(sources)):
        check_fits(want, sources[i], f"source {i}", against="the star's model (give sources trained "
                   "with the same architecture)")


# ---------------------------------------------------------------- the objective

class Starlight:
    """Train `star` (an nn.Module; its parameters are what your optimiser updates) as a star model of
    `sources`. `light(*args, **kwargs)` draws a source and t (`last_draw` = (index, t)) and returns the
    output of the interpolated network (1-t)·θ + t·π(θ_n); any loss of it, back-propagated, gives θ
    (1-t)·∇L at that point. `example_input`: a batch the star accepts, to find its permutation symmetry
    (needed unless align_every=None). `t_sampling`: "uniform", "beta" (Beta(*beta)) or "constant"
    (t_constant). `align_every`: calls between re-alignments (None: only on `realign()`).
    Create it after moving the star to its device."""

    def __init__(self, star: nn.Module, sources: Sequence[Any], *, example_input: Any = None,
                 t_sampling: str = "uniform", align_every: int | None = 500, seed: int = 0,
                 beta: tuple[float, float] = (2.0, 2.0), t_constant: float = 0.5, match_iters: int = 100):
        if not isinstance(star, nn.Module):
            raise UserError(f"the star must be an nn.Module, not {type(star).__name__}")
        if next(star.parameters(), None) is None:
            raise UserError(f"the star ({type(star).__name__}) has no parameters to train")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise UserError(f"seed must be a whole number from 0 to 2**63-1, not {seed!r}")
        if align_every is not None and (isinstance(align_every, bool) or not isinstance(align_every, int)
                                        or align_every < 1):
            raise UserError(f"align_every must be a positive number of calls or None, not {align_every!r}")
        self.settings = validate(StarConfig, {"t_sampling": t_sampling, "beta": beta, "t_constant": t_constant,
                                              "match_iters": match_iters})
        self.star, self.seed, self.align_every = star, int(seed), align_every
        originals = source_states(sources)
        if len(originals) < 1:
            raise UserError("Starlight needs at least one source")
        check_sources(star, originals)
        self.spec = None
        if align_every is not None or example_input is not None:
            if example_input is None:
                raise UserError("give example_input= (a batch the star accepts) so the sources can be aligned, "
                                "or align_every=None to train against them as given")
            _runs_on(star, example_input)
            self.spec = permute.spec_for(star, example_input)
        self.params = dict(star.named_parameters())
        first = next(iter(self.params.values()))
        self.device, self.dtype = first.device, first.dtype
        self.bank = SourceBank(originals, {k: p.dtype for k, p in self.params.items()}, self.device, "auto")
        self.draws = Draws(self.settings, len(originals), self.seed)
        self.scratch = ({k: b.detach().clone() for k, b in star.named_buffers()} if has_bn(star) else None)
        self.calls, self.alignments = 0, 0
        self.last_draw: tuple[int, float] | None = None
        self.pool: list = []  # interpolated-weight buffers, reused across steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n, t = self.next_draw()
        return interpolated_forward(self.star, self.params, self.bank.get(n), t, args, kwargs, self.scratch,
                                    self.pool)

    def next_draw(self) -> tuple[int, float]:
        """Align when due, then draw the next (source, t) and count the call. -> (source index, t)."""
        first = next(iter(self.params.values()))
        if first.device != self.device or first.dtype != self.dtype:
            raise UserError(f"the star moved to {first.device}/{first.dtype} after Starlight was created (on "
                            f"{self.device}/{self.dtype}); create Starlight after .to()")
        if self.align_every is not None and self.calls % self.align_every == 0:
            self.realign()
        self.last_draw = self.draws.draw()
        self.calls += 1
        return self.last_draw

    @contextlib.contextmanager
    def drawn(self) -> Iterator[tuple[int, float]]:
        """Inside, the star module itself *is* the interpolated network of the next draw (its parameters
        and BatchNorm buffers swapped), for loops whose forward you do not call yourself. The (1-t) factor
        goes on θ's gradients. Leave the block before `backward()` so the optimiser sees θ. -> (index, t)"""
        n, t = self.next_draw()
        factor, grad = {"scale": 1.0 - t}, torch.is_grad_enabled()
        weights = interpolated_weights(self.params, self.bank.get(n), t, factor, self.pool)
        if self.scratch:
            weights.update(self.scratch)
        undo = _swap(self.star, weights)
        try:
            yield n, t
        finally:
            _restore(undo)
            if grad:
                _watch(self.star, factor)

    def realign(self) -> None:
        """Re-align every source to the star's current weights now (weight matching)."""
        if self.spec is None:
            raise UserError("realign() needs the star's permutation spec: create Starlight with example_input=")
        self.bank.align_to_model(self.star, self.spec, self.seed, self.calls, self.settings.match_iters)
        self.alignments += 1

    @property
    def aligned_sources(self) -> list[StateDict]:
        """The sources as the star currently sees them: each original permuted by its last alignment
        (parameters and buffers; computes the same function as the original)."""
        out = []
        for n in range(len(self.bank)):
            sd, perm = self.bank.originals[n], self.bank.perms[n]
            out.append(dict(sd) if perm is None else permute.apply_permutation(self.spec, sd, perm))
        return out

    @property
    def permutations(self) -> list[dict[str, torch.Tensor] | None]:
        """Each source's last permutation (group -> index tensor; None before the first alignment)."""
        return list(self.bank.perms)

    def recalibrate_bn(self, data: Any, batch_size: int = 1000, max_batches: int | None = None) -> None:
        """Recompute the star's BatchNorm statistics on training data ((x, y), x alone, a Dataset or a
        DataLoader of (x, y)), as `stardomain star` does after every epoch. Leaves the star in eval mode."""
        _recalibrate_bn(self.star, _as_split(data), batch_size, max_batches, self.device)

    def state_dict(self) -> dict:
        """Everything to continue bit for bit: draws, call and alignment counters, permutations, scratch."""
        return {"draws": self.draws.get_state(), "calls": self.calls, "alignments": self.alignments,
                "perms": self.bank.perms, "scratch": self.scratch}

    def load_state_dict(self, st: Mapping) -> None:
        self.draws.set_state(st["draws"])
        self.calls, self.alignments = int(st["calls"]), int(st["alignments"])
        for n, perm in enumerate(st["perms"]):
            self.bank.set_perm(n, perm, permute, self.spec)
        if self.scratch is not None and st.get("scratch") is not None:
            for k, v in st["scratch"].items():
                self.scratch[k].copy_(v)


def _runs_on(star: nn.Module, example_input: Any) -> None:
    """The star runs on example_input (a tensor, a tuple of arguments or a dict of keywords): one line if not,
    before the permutation spec is captured from it (a capture of a failing call only warns)."""
    try:
        forward_once(star, example_input)
    except Exception as e:  # noqa: BLE001 (whatever the user's module raises is reported in one line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"example_input: the star cannot run on it ({first[:200]})") from None


def _as_split(data: Any) -> Split:
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        data = tuple(data.tensors) if len(data.tensors) == 2 else data.tensors[0]
    if torch.is_tensor(data):
        return Split(x=data, y=torch.zeros(len(data), dtype=torch.long))
    if isinstance(data, Dataset):
        return Split(dataset=data)
    return _to_split(data, "train")
