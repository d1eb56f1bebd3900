"""The checks that make an alignment trustworthy: the permuted model computes the original's function,
judged on its outputs and on every probed hidden activation mapped back through the permutation."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .capture import capture_module
from .inputs import as_call, map_tensors, flat_tensors
from .permutations import axis_index
from .probes import load_into, observe
from .spec import PermutationSpec

# The outputs' relative tolerance: the coarse check (a model may compute steps in float32 whatever its
# dtype: ~1e-7 then); the tight one is the activations' (ACT_TOLERANCE, 1e-9 where it runs in float64).
TOLERANCE = 1e-5


class EquivalenceError(RuntimeError):
    """A permuted model computes a different function: a bug in the spec, never to be ignored."""


def _outputs(model: nn.Module, sd: dict, x: Any) -> torch.Tensor:
    """The model's outputs, any nest of tensors (tuples, dicts, dataclasses), flattened into one vector."""
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        args, kwargs = as_call(x)
        out = flat_tensors(model(*args, **kwargs))
    out = [o.reshape(-1) for o in out if torch.is_floating_point(o) or torch.is_complex(o)]
    if not out:
        raise EquivalenceError("the model's output holds no floating-point tensor, so the permuted model "
                               "cannot be compared with the original")
    return torch.cat([o.double() for o in out])


def _random_like(example: Any, seed: int) -> Any:
    """The example with every floating-point tensor replaced by a seeded standard-normal one."""
    g = torch.Generator().manual_seed(seed)
    return map_tensors(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype) if torch.is_floating_point(t)
                       else t, example)


def _any_float(example: Any) -> bool:
    found = []
    map_tensors(lambda t: found.append(torch.is_floating_point(t)) or t, example)
    return any(found)


def equivalence_error(model: nn.Module, sd: dict, sd_perm: dict, example_input: Any,
                      seed: int = 0, allow_zero: bool = False) -> float:
    """max |f_perm(x) - f(x)| / max |f(x)| in eval mode, over every output tensor, on the example input
    and (for float inputs) a seeded standard-normal batch of the same shape. Computed in float64
    where the model allows, so rounding (which deep normalised nets amplify to ~1e-6 in float32)
    cannot hide or fake an error. A model whose outputs are all zero is refused (EquivalenceError):
    any permutation would pass such a check. `model` is copied; its weights are untouched."""
    m = copy.deepcopy(model)
    xs = [example_input]
    if _any_float(example_input):
        xs.append(_random_like(example_input, seed))
    xs32, sd32, sdp32 = list(xs), sd, sd_perm
    try:
        m = m.double()
        sd, sd_perm = _to64(sd), _to64(sd_perm)
        xs = [map_tensors(lambda t: t.double() if torch.is_floating_point(t) else t, x) for x in xs]
        _outputs(m, sd, xs[0])
    except (RuntimeError, TypeError):  # an op without float64 support: compare in the model's dtype
        m, xs, sd, sd_perm = copy.deepcopy(model), xs32, sd32, sdp32
    dev = next((p.device for p in m.parameters()), torch.device("cpu"))
    err, scale = 0.0, 0.0
    for x in xs:
        x = map_tensors(lambda t: t.to(dev), x)
        a, b = _outputs(m, sd, x), _outputs(m, sd_perm, x)
        scale = max(scale, float(a.abs().max()))
        err = max(err, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    if not scale > 0 and not allow_zero:
        raise EquivalenceError("the model's outputs are all zero on the check's inputs, so comparing them "
                               "cannot tell a wrong permutation from a right one (give an example input "
                               "on which the model's output is not zero)")
    return err


def _to64(sd: dict) -> dict:
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()}


ACT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def activation_error(model: nn.Module, spec: PermutationSpec, sd: dict, sd_perm: dict, perm: dict,
                     example_input: Any) -> tuple[float, int, float]:
    """Every group's probed activations, mapped back through the permutation: at each probed graph
    node, pi(B)'s value must equal B's with the node's unit axis permuted. A wrong permutation inside a
    branch the output barely sees (layer scale at 1e-6) or cannot see (an all-zero head) shows here.
    -> (max over nodes of max |pi(B)'s - permuted B's| / max |B's|, number of non-zero nodes compared,
    the tolerance it was judged at).
    In float64 where the model runs in float64 (the model cast): rounding then cannot hide an error of
    1e-9. An export is specialised to its dtype and names its nodes in order, so a float64 export is
    used only where its graph is node for node the one captured in the model's dtype (the spec's
    probes name those nodes); else the check runs in the model's dtype. Judged at a float32 tolerance
    (ACT_TOLERANCE) wherever it ran in float32 or the graph itself casts values down to float32 or
    below (Hugging Face's RMSNorm computes in float32 whatever the model's dtype)."""
    items: dict[str, list] = {}
    for k, g in spec.groups.items():
        for p in g.probes:
            items.setdefault(p.node, []).append((p.axis, p.offset, g.size, p.block, k, p.rep, g.heads))
    if not items:
        return 0.0, 0, 0.0
    m, x, gm = _graph_in_float64(model, example_input, spec)
    if _dtype(m) == torch.float64:
        sd, sd_perm = _to64(sd), _to64(sd_perm)
    load_into(gm, m, sd)
    a = observe(gm, x, set(items))
    load_into(gm, m, sd_perm)
    b = observe(gm, x, set(items))
    err, n = 0.0, 0
    for node, its in items.items():
        if node not in a or node not in b or a[node].shape != b[node].shape:
            continue
        ta, tb = a[node], b[node]
        if any(ax >= ta.dim() or off + size * blk * r > ta.shape[ax] for ax, off, size, blk, _, r, _ in its):
            continue  # not the node the spec saw: nothing to compare
        expected = ta
        for ax in sorted({it[0] for it in its}):
            idx = axis_index(ta.shape[ax], [it for it in its if it[0] == ax], perm)
            expected = expected.index_select(ax, idx.to(ta.device))
        scale = float(ta.abs().max()) if ta.numel() else 0.0
        if scale > 0:
            n += 1
            err = max(err, float((tb - expected).abs().max()) / scale)
    exact = _dtype(m) == torch.float64 and not _casts_down(gm)
    return err, n, ACT_TOLERANCE[torch.float64 if exact else torch.float32]


def _graph_in_float64(model: nn.Module, x: Any, spec: PermutationSpec) -> tuple[nn.Module, Any, Any]:
    """-> (model, example, captured graph module): in float64 where the model runs so and (for an
    export) its float64 graph names the same nodes for the same ops as the one the spec was derived
    from (spec.graph_signature, else a capture in the model's own dtype)."""

    capture = spec.capture
    try:
        m64 = copy.deepcopy(model).eval().double()
        x64 = map_tensors(lambda t: t.double() if torch.is_floating_point(t) else t, x)
        _outputs(m64, m64.state_dict(), x64)
        gm64 = capture_module(m64, x64, capture)
    except Exception:  # noqa: BLE001 - an op without float64 support (or its capture): the model's dtype
        m = copy.deepcopy(model).eval()
        return m, x, capture_module(m, x, capture)
    if capture == "fx":
        return m64, x64, gm64
    ref = getattr(spec, "graph_signature", None)
    if ref is not None and ref == gm64.graph_signature:
        return m64, x64, gm64
    m = copy.deepcopy(model).eval()
    gm = capture_module(m, x, capture)
    if gm.graph_signature != gm64.graph_signature:
        return m, x, gm
    return m64, x64, gm64


_LOW = (torch.float32, torch.float16, torch.bfloat16)
_CAST_METHODS = ("float", "half", "bfloat16")


def _casts_down(gm) -> bool:
    """Does the graph convert values to float32 or lower (.float(), .to(torch.float32), aten._to_copy)?"""
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target in _CAST_METHODS:
            return True
        if n.op in ("call_method", "call_function"):
            vals = list(n.args[1:]) + list(n.kwargs.values())
            if any(isinstance(v, torch.dtype) and v in _LOW for v in vals):
                return True
    return False


def check_equivalence(model, sd, sd_perm, example_input, tol: float = TOLERANCE, *,
                      spec: PermutationSpec | None = None, perm: dict | None = None) -> float:
    """Raise EquivalenceError unless pi(B) computes B's function: its outputs (relative error within
    tol) and, given the spec and permutation, every probed activation mapped back through the
    permutation (see activation_error). An all-zero output is refused unless activations were
    compared. -> the outputs' relative error."""
    acts, n, atol = (activation_error(model, spec, sd, sd_perm, perm, example_input)
                     if spec is not None and perm is not None else (0.0, 0, 0.0))
    err = equivalence_error(model, sd, sd_perm, example_input, allow_zero=n > 0)
    if not err <= tol:
        raise EquivalenceError(f"the permuted model's outputs differ from the original's by {err:.3g} "
                               f"(relative; tolerance {tol:g}): the permutation spec is wrong for this model")
    if not acts <= atol:
        raise EquivalenceError(f"the permuted model's hidden activations differ from the original's, mapped "
                               f"through the permutation, by {acts:.3g} (relative; tolerance {atol:g}): the "
                               "permutation spec is wrong for this model")
    return err


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if torch.is_floating_point(p)), torch.float32)
