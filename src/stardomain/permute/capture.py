"""Capture: a model's graph from torch.fx (with each value's shape on the example) or, where fx cannot
trace it, from torch.export; and the same capture again as a runnable graph module (for probes)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .inputs import as_call, flat_tensors
from .rules.pointwise import ELEMENTWISE_MODULES
from .rules.registry import user_rule


class GraphTracer(fx.Tracer):
    """fx.Tracer without the per-node metadata (module stacks, scopes) the spec never reads: the same
    graph, ~10% faster to trace."""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        return self.graph.create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return user_rule(m) is not None or super().is_leaf_module(m, qualname)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}  # the input's dims


def shaped_like_output(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Zeros shaped like mod(x) without running mod, where its type (exactly: a subclass may override
    forward) fixes the shape: x's for elementwise layers and eval-mode BatchNorm; for zero-padded
    convolutions, the output-length formula of torch's docs,
    floor((L + 2 padding - dilation (kernel - 1) - 1) / stride) + 1. None: run mod. Only shapes are
    recorded, and the values downstream are as arbitrary as the example input's; at the traced batch
    the convolutions cost as much as the rest of the spec. (Zeros, not x itself: an in-place op
    downstream must not reach the caller's input or the model's weights through an alias.)"""
    kind = type(mod)
    if kind in ELEMENTWISE_MODULES:
        return torch.zeros_like(x)
    if kind in _BATCH_NORM_DIMS:
        ok = x.dim() in _BATCH_NORM_DIMS[kind] and x.shape[1] == mod.num_features and not mod.training
        return torch.zeros_like(x) if ok else None
    if kind not in _CONVS or mod.padding_mode != "zeros" or x.dtype != mod.weight.dtype:
        return None
    nd = len(mod.kernel_size)
    if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != mod.in_channels:
        return None
    if mod.padding == "same":
        spatial = list(x.shape[-nd:])
    else:
        pad = (0,) * nd if mod.padding == "valid" else mod.padding
        spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                   for n, p, d, k, s in zip(x.shape[-nd:], pad, mod.dilation, mod.kernel_size, mod.stride)]
    if min(spatial) < 1:
        return None  # the module raises its own error
    return x.new_zeros((*x.shape[:-nd - 1], mod.out_channels, *spatial))


def record_shapes(model: nn.Module, graph: fx.Graph, example_input: Any, fast: bool = True) -> None:
    """Runs the traced graph on the module itself, recording each tensor-valued node's shape in
    node.meta["shape"]: all the spec needs. A plain loop rather than an fx.Interpreter (whose per-node
    dispatch cost as much as the batch-2 convolutions themselves); values are dropped after their last
    use, so memory stays that of a forward pass. fast: modules whose type fixes their output's shape
    are not run (see shaped_like_output)."""
    last: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last[a] = n
    env: dict[fx.Node, Any] = {}
    bound = _bind(model, example_input)
    names = [p.name for p in _forward_params(model)]
    placeholders = 0
    modules = dict(model.named_modules())
    for n in graph.nodes:
        op = n.op
        if op == "output":
            break
        if op == "placeholder":  # forward's parameters in order: the example's, else their defaults
            name = names[placeholders] if placeholders < len(names) else n.target
            placeholders += 1
            if n.target.startswith("*"):
                out = list(as_call(example_input)[0][placeholders - 1:])
            elif name in bound:
                out = bound[name]
            elif n.args:
                out = n.args[0]
            else:
                raise TypeError(f"forward needs an argument {n.target!r} beyond the example input")
        elif op == "get_attr":
            out = model
            for part in n.target.split("."):
                out = getattr(out, part)
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            if op == "call_module":
                mod = modules[n.target]
                one = fast and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                out = shaped_like_output(mod, args[0]) if one else None
                if out is None:
                    out = mod(*args, **kwargs)
            elif op == "call_function":
                out = n.target(*args, **kwargs)
            else:
                out = getattr(args[0], n.target)(*args[1:], **kwargs)
        if isinstance(out, torch.Tensor):
            n.meta["shape"] = tuple(out.shape)
        env[n] = out
        for a in n.all_input_nodes:
            if last[a] is n:
                del env[a]


def _forward_params(model: nn.Module) -> list:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _bind(model: nn.Module, example: Any) -> dict[str, Any]:
    """forward's parameter name -> the example's value for it (positional or keyword)."""
    args, kwargs = as_call(example)
    params = [p for p in _forward_params(model) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                                 p.KEYWORD_ONLY)]
    out = dict(zip([p.name for p in params], args))
    out.update(kwargs)
    return out


def concrete_defaults(model: nn.Module, example: Any) -> dict[str, Any]:
    """The optional arguments the example leaves out (targets=None, labels=None): traced at their
    default, so `if targets is not None:` is decided rather than traced."""
    given = _bind(model, example)
    return {p.name: p.default for p in _forward_params(model)
            if p.name not in given and p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def fx_graph(model: nn.Module, example: Any) -> fx.Graph:
    """fx trace plus the shape pass (the model in eval mode; its training flags restored)."""
    training = [m for m in model.modules() if m.training]  # restored exactly afterwards
    try:
        graph = GraphTracer().trace(model, concrete_args=concrete_defaults(model, example) or None)
        for m in training:
            m.training = False
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a batch of 2: threads only add contention (50x slower on a busy machine)
        try:
            with torch.no_grad():
                try:
                    record_shapes(model, graph, example)
                except Exception:  # noqa: BLE001 - an op downstream refused zeros: the real values then
                    record_shapes(model, graph, example, fast=False)
        finally:
            torch.set_num_threads(threads)
    finally:
        for m in training:
            m.training = True
    return graph


FLAT = "wrapped."


class _Flat(nn.Module):
    """The model with its outputs flattened to a tuple of tensors: torch.export refuses outputs it does
    not know (a Hugging Face key/value cache); what the spec protects is the tensors."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, *args, **kwargs):
        return tuple(flat_tensors(self.wrapped(*args, **kwargs)))


def export_graph(model: nn.Module, example: Any):
    """torch.export of the model in eval mode on the example -> (ExportedProgram, graph-input name ->
    state-dict name for its parameters and buffers)."""
    from torch.export.graph_signature import InputKind

    args, kwargs = as_call(example)
    training = [m for m in model.modules() if m.training]
    try:
        for m in training:
            m.training = False
        with torch.no_grad():
            ep = torch.export.export(_Flat(model), args, kwargs, strict=False)
    finally:
        for m in training:
            m.training = True
    names = {s.arg.name: s.target.removeprefix(FLAT) for s in ep.graph_signature.input_specs
             if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target is not None}
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            n.meta["shape"] = tuple(int(d) for d in val.shape)
    return ep, names


def aliases_of(sd: dict) -> dict[str, list[str]]:
    """state-dict name -> every state-dict name of the same tensor (tied weights: an embedding and the
    output head sharing one matrix appear under two names, and must be permuted alike)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, v in sd.items():
        if v.numel():
            by_ptr.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), []).append(k)
    return {k: names for names in by_ptr.values() if len(names) > 1 for k in names}


def short_error(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:240]}"


def graph_signature(graph: fx.Graph) -> tuple:
    """Each node's name, kind and target: two captures with equal signatures name the same nodes for the
    same ops (an export names its nodes in order, so one op more or less renames the rest)."""
    return tuple((n.name, n.op, str(n.target)) for n in graph.nodes)


def capture_module(model: nn.Module, example: Any, capture: str) -> fx.GraphModule:
    """The model as a runnable graph module, captured as its spec was ("fx" or "export"): node names
    match the spec's probes. The export is specialised to the example's shapes."""
    if capture == "export":
        ep, _ = export_graph(model, example)
        gm = ep.module()
        gm.graph_signature = graph_signature(ep.graph)
        return gm
    return fx.GraphModule(model, GraphTracer().trace(model, concrete_args=concrete_defaults(model, example) or None))
