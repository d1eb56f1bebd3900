"""What every op rule uses: the exception that pins, reading a node's arguments and shapes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


class Pin(Exception):
    """Raised by a rule that does not understand a use: what flows into the op is pinned, with the
    message as the reason."""


SHAPE_ONLY = object()  # marker: a rule that returns no layout and must not pin its arguments

EMBEDDING_ROWS = "model input: an embedding's rows are looked up by token id"
TOKEN_AXIS = "model input: the token axis (the input's positions) of a token-mixing MLP"
GROUPED_INPUTS = ("a grouped convolution's inputs keep their order within a group (its weight's input axis follows "
                  "them only where its rows are another group sharing their blocks)")


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The shape a tensor-valued node had on the example input (None for other values)."""
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def dim_list(d: Any) -> Any:
    return d if d is None or isinstance(d, (tuple, list)) else [d]


def aten_name(op: Any) -> str:
    return op._schema.name.split("::")[-1]


def is_aten(fn: Any) -> bool:
    return isinstance(fn, torch._ops.OpOverload)


def is_sum(node: fx.Node) -> bool:
    """x + y, x - y, in place or not, as a function, method or ATen op."""
    t = node.target
    name = aten_name(t) if is_aten(t) else (t if isinstance(t, str) else getattr(t, "__name__", ""))
    return name.rstrip("_") in ("add", "sub", "iadd", "isub")


def only_output(node: fx.Node) -> bool:
    """node's value goes straight to the model's output (a slice of logits: pinned as output anyway)."""
    return bool(node.users) and all(u.op == "output" for u in node.users)
