"""Op rules for pointwise ops: activations, dropout, casts (one tensor: the layout passes through) and
arithmetic between tensors (broadcasting: layouts on one axis merge into one group; a sum of computed
branches marks the group as the residual stream)."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..layouts import Fused, HLay, Lay, Param
from .attention import binary_heads
from .common import Pin, is_sum, shape_of

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)


def binary(t, node: fx.Node) -> Any:
    so = shape_of(node)
    if so is None:
        return None
    tensor_args = [a for a in list(node.args) + list(node.kwargs.values())
                   if isinstance(a, fx.Node) and shape_of(a) is not None]
    if any(isinstance(t.lay(a), Fused) for a in tensor_args):
        raise Pin("elementwise op on a fused projection split over a new axis")
    hl = [(a, t.lay(a)) for a in tensor_args if isinstance(t.lay(a), HLay)]
    if hl:
        return binary_heads(t, node, tensor_args, hl)
    lays, plain, computed = [], [], set()
    for a in list(node.args) + list(node.kwargs.values()):
        if not isinstance(a, fx.Node):
            continue
        lay, sa = t.lay(a), shape_of(a)
        if lay is not None:
            lays.append(Lay(lay.axis + len(so) - len(sa), lay.segs))
            if not isinstance(t.env.get(a), Param):  # a parameter added (a bias, positions) is no branch
                computed.add(tuple(t.b.find(g) for g, _, _ in lay.segs))
        elif sa is not None:
            plain.append(sa)
    if not lays:
        return None
    ax = lays[0].axis
    if any(lay.axis != ax for lay in lays):
        raise Pin("elementwise op on tensors with different feature axes")
    for sa in plain:  # an unpermuted operand must be constant along the feature axis
        k = ax - (len(so) - len(sa))
        if k >= 0 and sa[k] != 1:
            raise Pin("elementwise op with an unpermutable tensor")
    out = t.merge(lays)
    if len(computed) > 1 and is_sum(node):  # branches summed (a residual connection): a stream
        t.b.mark(t.b.summed, *(g for g, _, _ in out.segs))
    return out


def _unary(t, node):
    """Elementwise on one tensor; another tensor among the arguments (clamp bounds, a tensor exponent)
    makes it a binary op, with its broadcasting rules."""
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node) and
              shape_of(a) is not None]
    return binary(t, node) if others else t.lay(node.args[0])


def _binary(t, node):
    return binary(t, node)


def _type_as(t, node):
    return t.lay(node.args[0])


def is_unary(t, node: fx.Node) -> bool:
    """An op acting on each element alike, on one tensor (an activation, dropout)."""
    if len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        return type(t.modules.get(node.target)) in ELEMENTWISE_MODULES and not isinstance(
            t.modules[node.target], (nn.Softmax, nn.LogSoftmax))
    if node.op not in ("call_function", "call_method"):
        return False
    rule = t.rule_of(node)
    name = getattr(node.target, "__name__", str(node.target))
    return isinstance(rule, tuple) and rule[1] is _unary and "softmax" not in name
