"""Aligning one model to another, with the function-preservation check that makes it trustworthy."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import torch
import torch.nn as nn

from ..errors import UserError
from .matching import INITS, activation_matching, apply_permutation, distance, weight_matching
from .spec import PermutationSpec, spec_from_model

TOLERANCE = 1e-5
_CACHE: "OrderedDict[tuple, PermutationSpec]" = OrderedDict()


class EquivalenceError(RuntimeError):
    """A permuted model computes a different function: a bug in the spec, never to be ignored."""


_PLAIN = (int, float, bool, str, type(None))


def _architecture(model: nn.Module) -> tuple:
    """Every module's class and plain attributes: what forward reads besides the weights. repr() is not
    enough: nn.MultiheadAttention's omits num_heads, so a 4-head and a 3-head ViT of one width looked
    alike and shared a spec."""
    def attrs(m):
        return tuple(sorted((k, repr(v)) for k, v in vars(m).items() if k != "training" and (
            isinstance(v, _PLAIN) or (isinstance(v, (tuple, list)) and all(isinstance(e, _PLAIN) for e in v)))))

    return tuple((name, type(m).__module__, type(m).__qualname__, attrs(m)) for name, m in model.named_modules())


def spec_for(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """spec_from_model, cached by architecture (every module's class and settings, input shape and dtype)."""
    key = (_architecture(model), tuple(example_input.shape), str(example_input.dtype),
           tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    spec = spec_from_model(model, example_input)
    _CACHE[key] = spec
    while len(_CACHE) > 32:
        _CACHE.popitem(last=False)
    return spec


def _outputs(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = torch.cat([o.reshape(-1) for o in out if isinstance(o, torch.Tensor)])
    return out.double()


def equivalence_error(model: nn.Module, sd: dict, sd_perm: dict, example_input: torch.Tensor,
                      seed: int = 0) -> float:
    """max |f_perm(x) - f(x)| / max |f(x)| in eval mode, on the example input and (for float inputs) a
    seeded standard-normal batch of the same shape. Computed in float64 where the model allows, so
    rounding (which deep normalised nets amplify to ~1e-6 in float32) cannot hide or fake an error.
    `model` is copied; its weights are untouched."""
    m = copy.deepcopy(model)
    xs = [example_input]
    if torch.is_floating_point(example_input):
        g = torch.Generator().manual_seed(seed)
        xs.append(torch.randn(example_input.shape, generator=g, dtype=example_input.dtype))
    xs32, sd32, sdp32 = list(xs), sd, sd_perm
    try:
        m = m.double()
        sd, sd_perm = _to64(sd), _to64(sd_perm)
        xs = [x.double() if torch.is_floating_point(x) else x for x in xs]
        _outputs(m, sd, xs[0])
    except (RuntimeError, TypeError):  # an op without float64 support: compare in the model's dtype
        m, xs, sd, sd_perm = copy.deepcopy(model), xs32, sd32, sdp32
    dev = next((p.device for p in m.parameters()), torch.device("cpu"))
    err = 0.0
    for x in xs:
        x = x.to(dev)
        a, b = _outputs(m, sd, x), _outputs(m, sd_perm, x)
        err = max(err, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    return err


def _to64(sd: dict) -> dict:
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()}


def check_equivalence(model, sd, sd_perm, example_input, tol: float = TOLERANCE) -> float:
    err = equivalence_error(model, sd, sd_perm, example_input)
    if not err <= tol:
        raise EquivalenceError(f"the permuted model's outputs differ from the original's by {err:.3g} "
                               f"(relative; tolerance {tol:g}): the permutation spec is wrong for this model")
    return err


def align(model: nn.Module, sd_a: dict, sd_b: dict, *, example_input: torch.Tensor, method: str = "weight",
          data_x: torch.Tensor | None = None, seed: int = 0, check: bool = True,
          spec: PermutationSpec | None = None, max_iter: int = 100, init: str = "informed") -> tuple[dict, dict]:
    """-> (pi(sd_b) best matching sd_a, info). `model` only provides the architecture.

    method "weight": weight matching (`init`: its start, see `weight_matching`; "identity" is the
    paper's algorithm); "activation": correlation of activations on `data_x`.
    With check=True (the default) pi(B) is verified to compute B's function, else EquivalenceError.
    info["distance_before"/"distance_after"] are L2 distances to A over parameters only
    (info["distance_over"] == "parameters"): the quantity weight matching minimises, so aligning
    never increases it. Buffers (BatchNorm running statistics) are permuted but not measured: they
    summarise data, and interpolation paths recompute them.
    """
    t0 = time.perf_counter()
    spec = spec if spec is not None else spec_for(model, example_input)
    if method == "weight":
        if init not in INITS:
            raise UserError(f"unknown weight-matching start {init!r}; choose {', '.join(INITS)}")
        perm, info = weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=max_iter, init=init)
    elif method == "activation":
        if data_x is None:
            raise UserError("activation matching needs data (data_x): a batch of inputs")
        perm, info = activation_matching(spec, model, sd_a, sd_b, data_x)
    else:
        raise UserError(f"unknown alignment method {method!r}; choose weight or activation")
    sd_p = apply_permutation(spec, sd_b, perm)
    seconds = time.perf_counter() - t0
    err = check_equivalence(model, sd_b, sd_p, example_input) if check else None
    info = {"method": method, **info, "distance_before": distance(sd_a, sd_b, spec.parameters),
            "distance_after": distance(sd_a, sd_p, spec.parameters), "distance_over": "parameters",
            "equivalence_error": err, "seconds": seconds, "permutable_fraction": spec.permutable_fraction(),
            "perm": {k: v.tolist() for k, v in perm.items()}}
    return sd_p, info
