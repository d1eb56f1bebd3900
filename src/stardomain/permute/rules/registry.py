"""The op-rule registry: what every function, tensor method, ATen op (torch.export graphs) and module
type does to the layouts of its arguments. One place to extend: write the rule in its family's file
(shapes, pointwise, layers, attention) and add its key to the table here.

A rule is (kind, fn(tracer, node) -> layout): kind "plain" rules see only plain layouts (per-head or
fused ones are pinned before they run), "any" rules handle all. A module rule is fn(tracer,
ModuleCall); the first entry of BUILTIN_MODULE_RULES whose types match wins, after a user's rule
(register_leaf_module)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .attention import _sdpa, mha
from .common import SHAPE_ONLY, Pin, aten_name, is_aten
from .layers import (POOL_MODULES, _addmm, _batch_norm_aten, _batch_norm_aten_tuple, _batch_norm_f, _conv_f,
                     _conv_transpose_f, _convolution, _embedding, _group_norm, _layer_norm, _linear, _m_batch_norm,
                     _m_conv, _m_conv_transpose, _m_embedding, _m_group_norm, _m_layer_norm, _m_linear, _m_pad,
                     _m_pinned, _m_pool, _m_reshape, _m_rms_norm, _m_sequential, _m_upsample, _matmul,
                     _native_layer_norm, _rms_norm, _spatial, _spatial_tuple)
from .pointwise import ELEMENTWISE_MODULES, _binary, _type_as, _unary
from .recurrent import aten_cell, aten_stack, recurrent, recurrent_cell
from .shapes import (_cat, _chunk, _expand, _getitem, _narrow, _pad, _permute, _reduce, _reshape, _select, _slice,
                     _split, _squeeze, _stack, _transpose, _unbind, _unsqueeze)


def _pinned(reason):
    def rule(t, node):
        raise Pin(reason)
    return ("plain", rule)


def _rules(kind, fn, *keys):
    return {k: (kind, fn) for k in keys}


_UNARY_FUNCS = [torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.mish, F.elu,
                F.selu, F.celu, F.leaky_relu, F.relu6, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.dropout,
                F.dropout1d, F.dropout2d, F.alpha_dropout, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                torch.exp, torch.abs, torch.neg, torch.square, torch.sqrt, torch.rsqrt, torch.clamp, torch.erf,
                torch.log, torch.reciprocal, torch.pow, torch.clone, torch.detach, torch.nn.functional.logsigmoid]
FUNCTION_RULES: dict[Any, Any] = {
    **_rules("any", _unary, *_UNARY_FUNCS),
    **_rules("any", _binary, operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
             operator.isub, operator.imul, operator.itruediv, operator.neg, torch.add, torch.sub, torch.mul,
             torch.div, torch.maximum, torch.minimum, torch.where, torch.masked_fill, operator.eq, operator.ne,
             operator.lt, operator.le, operator.gt, operator.ge, operator.pow),
    **_rules("any", _matmul, operator.matmul, torch.matmul, torch.bmm),
    **_rules("any", _cat, torch.cat, torch.concat),
    **_rules("plain", _stack, torch.stack),
    **_rules("any", _reshape, torch.flatten, torch.reshape),
    **_rules("any", _transpose, torch.transpose, torch.t, torch.swapaxes),
    **_rules("any", _permute, torch.permute),
    **_rules("plain", _spatial, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
             F.adaptive_max_pool2d, F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear),
    **_rules("any", _reduce, torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.var, torch.std),
    **_rules("any", _getitem, operator.getitem),
    **_rules("any", _unsqueeze, torch.unsqueeze),
    **_rules("any", _squeeze, torch.squeeze),
    **_rules("any", _split, torch.split),
    **_rules("any", _chunk, torch.chunk),
    **_rules("any", _unbind, torch.unbind),
    **_rules("any", _narrow, torch.narrow),
    **_rules("any", _select, torch.select),
    **_rules("plain", _linear, F.linear),
    **_rules("plain", _addmm, torch.addmm),
    **_rules("plain", _embedding, F.embedding),
    **_rules("any", _layer_norm, F.layer_norm),
    **_rules("any", _rms_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else [])),
    **_rules("plain", _group_norm, F.group_norm),
    **_rules("plain", _batch_norm_f, F.batch_norm),
    **_rules("plain", _conv_f, F.conv1d, F.conv2d, F.conv3d),
    **_rules("plain", _conv_transpose_f, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    **_rules("any", _pad, F.pad),
    **_rules("any", _sdpa, F.scaled_dot_product_attention),
    F.channel_shuffle: _pinned("a channel shuffle mixes channels across groups"),
    getattr: SHAPE_ONLY,
    fx._symbolic_trace._assert_is_none: SHAPE_ONLY,
}
METHOD_RULES: dict[str, Any] = {
    **_rules("any", _unary, "relu", "sigmoid", "tanh", "exp", "abs", "neg", "contiguous", "clone", "float",
             "double", "half", "bfloat16", "to", "detach", "softmax", "log_softmax", "clamp", "sqrt", "square",
             "rsqrt", "erf", "log", "reciprocal", "pow", "relu_", "sigmoid_", "tanh_", "clamp_", "clamp_min"),
    **_rules("any", _type_as, "type_as", "type"),
    **_rules("any", _binary, "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum",
             "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge"),
    **_rules("any", _matmul, "matmul", "bmm"),
    **_rules("any", _reshape, "flatten", "view", "reshape"),
    **_rules("any", _transpose, "transpose", "t", "swapaxes"),
    **_rules("any", _permute, "permute"),
    **_rules("any", _reduce, "mean", "sum", "amax", "amin", "logsumexp", "var", "std"),
    **_rules("any", _unsqueeze, "unsqueeze"),
    **_rules("any", _squeeze, "squeeze"),
    **_rules("any", _expand, "expand"),
    **_rules("any", _split, "split"),
    **_rules("any", _chunk, "chunk"),
    **_rules("any", _unbind, "unbind"),
    **_rules("any", _narrow, "narrow"),
    **_rules("any", _select, "select"),
    **{k: SHAPE_ONLY for k in ("size", "dim", "numel", "ndimension")},
}
ATEN_RULES: dict[str, Any] = {
    **_rules("any", _unary, "relu", "gelu", "silu", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "erf",
             "log", "reciprocal", "square", "clone", "contiguous", "_to_copy", "to", "alias", "detach",
             "lift_fresh_copy", "dropout", "softmax", "_softmax", "log_softmax", "_log_softmax", "clamp",
             "clamp_min", "clamp_max", "mish", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "relu6",
             "celu", "selu", "softplus", "pow.Tensor_Scalar", "type_as", "logsigmoid", "log_sigmoid", "relu_",
             "gelu_", "silu_"),
    **_rules("any", _binary, "add", "sub", "mul", "div", "maximum", "minimum", "where", "masked_fill", "eq", "ne",
             "lt", "le", "gt", "ge", "rsub", "pow", "add_", "mul_", "logical_and", "logical_or", "bitwise_and"),
    **_rules("any", _matmul, "matmul", "bmm", "mm"),
    **_rules("plain", _addmm, "addmm"),
    **_rules("any", _cat, "cat", "concat"),
    **_rules("plain", _stack, "stack"),
    **_rules("any", _reshape, "view", "_unsafe_view", "reshape", "flatten", "unflatten"),
    **_rules("any", _transpose, "transpose", "t", "swapaxes"),
    **_rules("any", _permute, "permute"),
    **_rules("any", _reduce, "mean", "sum", "amax", "amin", "logsumexp", "var", "std"),
    **_rules("any", _unsqueeze, "unsqueeze"),
    **_rules("any", _squeeze, "squeeze"),
    **_rules("any", _expand, "expand"),
    **_rules("any", _split, "split", "split_with_sizes", "unsafe_split"),
    **_rules("any", _chunk, "chunk"),
    **_rules("any", _unbind, "unbind"),
    **_rules("any", _slice, "slice"),
    **_rules("any", _narrow, "narrow"),
    **_rules("any", _select, "select"),
    **_rules("plain", _linear, "linear"),
    **_rules("plain", lambda t, n: _embedding(t, n, aten=True), "embedding"),
    **_rules("any", _layer_norm, "layer_norm"),
    **_rules("any", _native_layer_norm, "native_layer_norm"),
    **_rules("any", _rms_norm, "rms_norm"),
    **_rules("plain", _group_norm, "group_norm"),
    **_rules("plain", aten_cell, "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"),
    **_rules("plain", aten_stack, "lstm.input", "gru.input", "rnn_tanh.input", "rnn_relu.input"),
    **_rules("plain", _batch_norm_aten, "batch_norm"),
    **_rules("plain", _batch_norm_aten_tuple, "_native_batch_norm_legit_no_training", "native_batch_norm",
             "_native_batch_norm_legit"),
    **_rules("plain", _conv_f, "conv1d", "conv2d", "conv3d"),
    **_rules("plain", _conv_transpose_f, "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
    **_rules("plain", _convolution, "convolution"),
    **_rules("any", _pad, "pad", "constant_pad_nd"),
    **_rules("plain", _spatial, "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
             "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "_upsample_nearest_exact2d",
             "_upsample_bilinear2d_aa", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
             "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
             "_adaptive_avg_pool2d"),
    **_rules("plain", _spatial_tuple, "max_pool2d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool1d"),
    **_rules("any", _sdpa, "scaled_dot_product_attention"),
    "channel_shuffle": _pinned("a channel shuffle mixes channels across groups"),
    **{k: SHAPE_ONLY for k in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
                                "_assert_scalar", "sym_constrain_range_for_size", "_assert_async", "arange",
                                "scalar_tensor", "full", "zeros", "ones", "empty", "zeros_like", "ones_like",
                                "full_like", "empty_like", "_local_scalar_dense", "item")},
}


# ---- rules users register for their own leaf modules ----

@dataclass(frozen=True)
class LeafRule:
    cls: type
    kind: str
    params: dict = field(default_factory=dict)
    weights: tuple = ()
    biases: tuple = ()
    axes: tuple = (0, 1)
    reason: str | None = None


MODULE_RULES: dict[type, LeafRule] = {}
# module types whose rules read per-head tensors themselves (others are pinned on them before their rule)
HEAD_MODULES = (nn.LayerNorm, *(t for t in (getattr(nn, "RMSNorm", None),) if t is not None))
RULES_VERSION = [0]


# Module types -> how a call propagates unit layouts, first match wins (users: register_leaf_module).
BUILTIN_MODULE_RULES: list[tuple[tuple[type, ...], Any]] = [
    ((nn.Linear,), _m_linear),
    (tuple(t for t in (getattr(nn, "RMSNorm", None),) if t is not None), _m_rms_norm),
    ((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), _m_upsample),
    ((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d), _m_pad),
    ((nn.ChannelShuffle,), _m_pinned("a channel shuffle mixes channels across groups")),
    ((nn.Unflatten, nn.Flatten), _m_reshape),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _m_conv),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _m_conv_transpose),
    ((nn.modules.batchnorm._BatchNorm,), _m_batch_norm),
    ((nn.GroupNorm,), _m_group_norm),
    ((nn.LayerNorm,), _m_layer_norm),
    (ELEMENTWISE_MODULES, lambda t, c: c.lay),
    (POOL_MODULES, _m_pool),
    ((nn.Embedding,), _m_embedding),
    ((nn.MultiheadAttention,), lambda t, c: mha(t, c.node, c.mod)),
    ((nn.RNNBase,), recurrent),
    ((nn.RNNCellBase,), recurrent_cell),
    ((nn.Sequential,), _m_sequential),
]


def user_rule(mod: nn.Module) -> "LeafRule | None":
    return MODULE_RULES.get(type(mod)) if MODULE_RULES else None


def register_leaf_module(cls: type, kind: str | None, *, params: dict[str, int] | None = None,
                         weights: tuple[str, ...] = ("weight",), biases: tuple[str, ...] = ("bias",),
                         axes: tuple[int, int] = (0, 1), reason: str | None = None) -> None:
    """Teach the permutation spec a custom layer. Modules of exactly this class are captured as one
    step (torch.fx does not trace inside them) and read as:

    kind "elementwise": acts on each unit alike (an activation): units pass through unchanged.
    kind "per_unit": one value per unit, like a norm's affine: `params` maps parameter names to the
        axis indexing the units (params={"scale": 0, "shift": 0}).
    kind "linear": mixes units like nn.Linear: each of `weights` is indexed (out, in) along `axes`
        (for a (in, out) layout give axes=(1, 0)); `biases` are indexed by the outputs; the outputs
        are a new group of units.
    kind "opaque": nothing about it can be permuted (its inputs and parameters are pinned, `reason`
        says why).
    kind None: forget the rule.

    Rules apply where torch.fx captures the model; a model only torch.export can capture is read
    op by op, and its custom layers need no rule where their ops are understood.
    Example: register_leaf_module(ScaleShift, "per_unit", params={"scale": 0, "shift": 0})
    """
    if kind is None:
        MODULE_RULES.pop(cls, None)
    elif kind not in ("elementwise", "per_unit", "linear", "opaque"):
        raise ValueError(f"kind must be elementwise, per_unit, linear, opaque or None, got {kind!r}")
    else:
        MODULE_RULES[cls] = LeafRule(cls, kind, dict(params or {}), tuple(weights), tuple(biases), tuple(axes),
                                     reason)
    RULES_VERSION[0] += 1


def rule_of(node: fx.Node) -> Any:
    """The registered rule for a function, method or ATen node (None: none registered)."""
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if is_aten(node.target):
        name = aten_name(node.target)
        return ATEN_RULES.get(f"{name}.{node.target._overloadname}", ATEN_RULES.get(name))
    return FUNCTION_RULES.get(node.target)
