"""The spec cache: a spec is reused only for a model it would have been derived from again.

The key holds every module's class and everything reachable from its attributes that forward can
branch on (plain settings, and configuration objects such as a Hugging Face config, read through
their own attributes; functions by name and closure), the input's signature, the state dict's shapes
and the rule registry's version. A model with an attribute the key cannot read is not cached. A hit on
a torch.fx capture is also checked against a fresh symbolic trace (node for node), so a graph that
changed for a reason outside the modules (a global flag) is captured anew.
"""

from __future__ import annotations

import enum
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from .capture import GraphTracer, concrete_defaults, graph_signature
from .inputs import signature
from .rules.registry import RULES_VERSION
from .spec import PermutationSpec
from .tracer import spec_from_model

_CACHE: "OrderedDict[tuple, PermutationSpec]" = OrderedDict()
_SIZE = 32
_DEPTH = 6  # configuration objects nest (a config holding a text config): deeper than this is not read
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size, enum.Enum)


class _Unreadable(Exception):
    """An attribute the key cannot summarise: the model is not cached."""


def _fingerprint(v: Any, depth: int = 0) -> Any:
    if isinstance(v, _PLAIN):
        return (type(v).__qualname__, repr(v))
    if isinstance(v, nn.Module):
        return "module"  # its own entry in named_modules
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype))
    if depth > _DEPTH:
        raise _Unreadable
    if isinstance(v, (tuple, list)):
        return (type(v).__qualname__, tuple(_fingerprint(e, depth + 1) for e in v))
    if isinstance(v, (set, frozenset)):
        return (type(v).__qualname__, tuple(sorted(repr(_fingerprint(e, depth + 1)) for e in v)))
    if isinstance(v, dict):
        return ("dict", tuple((repr(k), _fingerprint(x, depth + 1)) for k, x in v.items()))
    if callable(v) and hasattr(v, "__qualname__"):
        cells = tuple(_fingerprint(c.cell_contents, depth + 1) for c in (getattr(v, "__closure__", None) or ()))
        owner = getattr(v, "__self__", None)
        if owner is None or isinstance(owner, (nn.Module, type, types.ModuleType)):
            owner = None  # a module's own method, or a function: its name says it
        return ("fn", getattr(v, "__module__", None), v.__qualname__, cells,
                None if owner is None else _fingerprint(owner, depth + 1))
    if hasattr(v, "__dict__"):
        return (type(v).__module__, type(v).__qualname__, _fingerprint(vars(v), depth + 1))
    raise _Unreadable


def architecture(model: nn.Module) -> tuple | None:
    """Every module's class and attributes as far as forward can read them (None: one could not be
    read). repr() is not enough: nn.MultiheadAttention's omits num_heads, and a Hugging Face model's
    attention implementation lives in its config object."""
    try:
        return tuple((name, type(m).__module__, type(m).__qualname__,
                      _fingerprint({k: v for k, v in vars(m).items() if k != "training"}))
                     for name, m in model.named_modules())
    except (_Unreadable, RecursionError, ValueError):
        return None


def _still_traces_alike(model: nn.Module, example_input: Any, spec: PermutationSpec) -> bool:
    ref = getattr(spec, "graph_signature", None)
    if spec.capture != "fx" or ref is None:
        return True
    try:
        graph = GraphTracer().trace(model, concrete_args=concrete_defaults(model, example_input) or None)
    except Exception:  # noqa: BLE001 - fx no longer traces it: not the model the spec was derived from
        return False
    return graph_signature(graph) == ref


def spec_for(model: nn.Module, example_input: Any) -> PermutationSpec:
    """spec_from_model, cached (see the module's docstring for what a hit requires)."""
    arch = architecture(model)
    if arch is None:
        return spec_from_model(model, example_input)
    key = (arch, signature(example_input), RULES_VERSION[0],
           tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    spec = _CACHE.get(key)
    if spec is not None and _still_traces_alike(model, example_input, spec):
        _CACHE.move_to_end(key)
        return spec
    spec = spec_from_model(model, example_input)
    _CACHE[key] = spec
    while len(_CACHE) > _SIZE:
        _CACHE.popitem(last=False)
    return spec
