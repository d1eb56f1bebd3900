"""Probes: the values of named nodes of a captured graph module, for activation matching and the
check that an aligned model computes the same function."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import FLAT
from .inputs import as_call


def load_into(gm: fx.GraphModule, model: nn.Module, sd: dict) -> None:
    """Load a full state dict into the model and the graph module captured from it (which holds only
    the tensors its forward uses: unused parameters and buffers are not an error)."""
    model.load_state_dict(sd)
    own = {k: k.removeprefix(FLAT) for k in gm.state_dict()}  # an export holds the model as `wrapped`
    found = {k: sd[name] for k, name in own.items() if name in sd}
    if own and not found:
        raise RuntimeError("the captured graph's tensors match none of the state dict's names")
    gm.load_state_dict(found, strict=False)


def observe(gm: fx.GraphModule, example: Any, nodes: set[str]) -> dict[str, torch.Tensor]:
    """The values of the named nodes of gm on `example` (no grad). gm's graph is instrumented once,
    for one set of nodes; later calls with the same set reuse it."""
    key = frozenset(nodes)
    if getattr(gm, "_stardomain_probes", None) is None:
        gm._stardomain_probes, gm._stardomain_acts = key, {}
        acts = gm._stardomain_acts

        def store(value, name):
            if isinstance(value, torch.Tensor):  # a copy: views of parameters change with the next load
                acts[name] = value.detach().clone()

        for n in list(gm.graph.nodes):
            if n.name in nodes and n.op != "output":
                with gm.graph.inserting_after(n):
                    gm.graph.call_function(store, (n, n.name))
        gm.recompile()
    elif gm._stardomain_probes != key:
        raise ValueError("this graph module is instrumented for other nodes")
    gm._stardomain_acts.clear()
    with torch.no_grad():
        args, kwargs = as_call(example)
        gm(*args, **kwargs)
    return dict(gm._stardomain_acts)
