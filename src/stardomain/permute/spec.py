"""Permutation specs derived from a torch.fx trace: which tensor axes share a permutation.

A *group* is a set of hidden units (channels, features, heads) whose order is arbitrary: permuting
them consistently in every tensor axis they index leaves the network's function unchanged. Each
member of a group says "the slice [offset, offset + size*block) of this tensor axis, viewed as
(size, block), has its first dimension permuted" (block > 1 after a flatten: a channel owns H*W
inputs of the next Linear). Groups are found by abstract interpretation of the traced graph: every
value carries a layout of its feature axis (which groups own which slices), operations propagate or
merge layouts (union-find), and anything not understood pins its groups as unpermuted, with the
reason recorded. The rule is: never a wrong permutation.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Member:
    """Slice [offset, offset + size*block) of `tensor`'s `axis`, viewed as (size, block)."""
    tensor: str
    axis: int
    offset: int = 0
    block: int = 1


@dataclass(frozen=True)
class Probe:
    """Where a group's units can be observed in the traced graph (for activation matching)."""
    node: str
    axis: int
    offset: int = 0
    block: int = 1


@dataclass
class Group:
    name: str
    size: int
    members: list[Member]
    probes: list[Probe] = field(default_factory=list)
    heads: int = 0            # >0: permutations must map whole heads (blocks of size // heads) to heads
    couple: str | None = None  # a group that must share this group's head-level permutation


@dataclass
class Unpermuted:
    what: str      # the tensor axes concerned
    reason: str


@dataclass
class PermutationSpec:
    groups: dict[str, Group]
    unpermuted: list[Unpermuted]
    shapes: dict[str, list[int]]      # every state-dict tensor's shape (parameters and buffers)
    parameters: list[str]             # which of them are parameters

    # ---- plain data ----
    def to_dict(self) -> dict:
        return {"groups": {k: asdict(g) for k, g in self.groups.items()},
                "unpermuted": [asdict(u) for u in self.unpermuted],
                "shapes": self.shapes, "parameters": self.parameters}

    @classmethod
    def from_dict(cls, d: dict) -> "PermutationSpec":
        groups = {k: Group(name=g["name"], size=g["size"], members=[Member(**m) for m in g["members"]],
                           probes=[Probe(**p) for p in g.get("probes", [])], heads=g.get("heads", 0),
                           couple=g.get("couple"))
                  for k, g in d["groups"].items()}
        return cls(groups, [Unpermuted(**u) for u in d["unpermuted"]],
                   {k: list(v) for k, v in d["shapes"].items()}, list(d["parameters"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __eq__(self, other) -> bool:
        return isinstance(other, PermutationSpec) and self.to_dict() == other.to_dict()

    def permutable_tensors(self) -> set[str]:
        return {m.tensor for g in self.groups.values() for m in g.members}

    def permutable_fraction(self) -> float:
        """Fraction of parameter numbers (not buffers) in tensors that at least one group permutes."""
        tot = sum(math.prod(self.shapes[p]) for p in self.parameters)
        perm = sum(math.prod(self.shapes[p]) for p in self.parameters if p in self.permutable_tensors())
        return perm / tot if tot else 0.0

    def summary(self) -> str:
        lines = [f"{len(self.groups)} permutation groups, "
                 f"{100 * self.permutable_fraction():.1f}% of parameters permutable"]
        for g in self.groups.values():
            extra = f", {g.heads} heads" + (f" coupled with {g.couple}" if g.couple else "") if g.heads else ""
            ms = ", ".join(f"{m.tensor}[{m.axis}]" + (f"@{m.offset}" if m.offset else "")
                           + (f"x{m.block}" if m.block > 1 else "") for m in g.members)
            lines.append(f"  {g.name}: size {g.size}{extra}: {ms}")
        if self.unpermuted:
            lines.append("unpermuted:")
            lines += [f"  {u.what}: {u.reason}" for u in self.unpermuted]
        return "\n".join(lines)

    __str__ = summary


# ---------------------------------------------------------------------------------------------
# abstract interpretation

@dataclass(frozen=True)
class _Lay:
    """The feature axis of a value and the groups owning consecutive slices of it: (gid, n, block)."""
    axis: int
    segs: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _HLay:
    """A feature axis split into heads: `head_axis` indexes heads, `unit_axis` (None once contracted
    away, as in attention scores) indexes units within a head; both belong to group `gid`."""
    head_axis: int
    unit_axis: int | None
    gid: int


class _Fix(Exception):
    pass


class _Builder:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.n: list[int] = []
        self.reasons: list[list[str]] = []
        self.members: list[list[Member]] = []
        self.probes: list[list[Probe]] = []
        self.label: list[str] = []
        self.heads: list[int] = []
        self.couple: list[int | None] = []

    def new(self, n: int, label: str, reason: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.n.append(n)
        self.reasons.append([reason] if reason else [])
        self.members.append([])
        self.probes.append([])
        self.label.append(label)
        self.heads.append(0)
        self.couple.append(None)
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if self.n[a] != self.n[b]:  # cannot happen for a consistent graph; be safe
            self.fix(a, "size mismatch in a merge")
            self.fix(b, "size mismatch in a merge")
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.reasons[a] += self.reasons[b]
        self.members[a] += self.members[b]
        self.probes[a] += self.probes[b]
        ha, hb = self.heads[a], self.heads[b]
        if ha and hb and ha != hb:
            self.fix(a, "merged groups split into different numbers of heads")
        self.heads[a] = ha or hb  # a head-structured permutation is legal for the merged group too
        ca, cb = self.couple[a], self.couple[b]
        if ca is not None and cb is not None and self.find(ca) != self.find(cb):
            self.fix(a, "attention heads coupled to two different groups")
        self.couple[a] = ca if ca is not None else cb
        return a

    def set_heads(self, g: int, h: int) -> None:
        r = self.find(g)
        if self.heads[r] and self.heads[r] != h:
            self.fix(r, "split into different numbers of heads")
        self.heads[r] = h

    def set_couple(self, a: int, b: int) -> None:
        """Two head-structured groups that must share their head-level permutation (q/k with v/o)."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        for x, y in ((a, b), (b, a)):
            if self.couple[x] is not None and self.find(self.couple[x]) != y:
                self.fix(x, "attention heads coupled to two different groups")
                self.fix(y, "attention heads coupled to two different groups")
            self.couple[x] = y

    def fix(self, g: int, reason: str) -> None:
        r = self.find(g)
        if reason not in self.reasons[r]:
            self.reasons[r].append(reason)

    def fix_lay(self, lay: "_Lay | None", reason: str) -> None:
        if isinstance(lay, _Lay):
            for gid, _, _ in lay.segs:
                self.fix(gid, reason)
        elif isinstance(lay, _HLay):
            self.fix(lay.gid, reason)
        elif isinstance(lay, (tuple, list)):
            for x in lay:
                self.fix_lay(x, reason)

    def add(self, gid: int, m: Member) -> None:
        self.members[self.find(gid)].append(m)


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)
_ELEMENTWISE_FUNCS = {
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.mish, F.elu, F.selu,
    F.leaky_relu, F.relu6, F.hardswish, F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp, torch.abs, torch.neg,
    torch.square, torch.sqrt, torch.rsqrt, torch.clamp, F.alpha_dropout,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "contiguous", "clone", "float",
                        "double", "half", "to", "detach", "softmax", "log_softmax", "clamp", "sqrt", "square",
                        "type_as", "relu_", "sigmoid_", "tanh_"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "maximum", "minimum"}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
               F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
               F.adaptive_max_pool2d}
_HLAY_FUNCS = {torch.softmax, F.softmax, F.dropout, operator.truediv, operator.mul, torch.div, torch.mul,
               torch.transpose, torch.permute, torch.reshape, getattr}
_HLAY_METHODS = {"softmax", "transpose", "permute", "view", "reshape", "contiguous", "size", "dim", "div", "mul",
                 "float", "to", "type_as", "clone"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "logsumexp"}


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape a tensor-valued node had on the example input (None for other values)."""
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


class _GraphTracer(fx.Tracer):
    """fx.Tracer without the per-node metadata (module stacks, scopes) the spec never reads: the same
    graph, ~10% faster to trace."""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        return self.graph.create_node(kind, target, args, kwargs, name, type_expr)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}  # the input's dims


def _shaped_like_output(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Zeros shaped like mod(x) without running mod, where its type (exactly: a subclass may override
    forward) fixes the shape: x's for elementwise layers and eval-mode BatchNorm; for zero-padded
    convolutions, the output-length formula of torch's docs,
    floor((L + 2 padding - dilation (kernel - 1) - 1) / stride) + 1. None: run mod. Only shapes are
    recorded, and the values downstream are as arbitrary as the example input's; at the traced batch
    the convolutions cost as much as the rest of the spec. (Zeros, not x itself: an in-place op
    downstream must not reach the caller's input or the model's weights through an alias.)"""
    kind = type(mod)
    if kind in _ELEMENTWISE_MODULES:
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


def _record_shapes(model: nn.Module, graph: fx.Graph, example_input: torch.Tensor, fast: bool = True) -> None:
    """Runs the traced graph on the module itself, recording each tensor-valued node's shape in
    node.meta["shape"]: all the spec needs. A plain loop rather than an fx.Interpreter (whose per-node
    dispatch cost as much as the batch-2 convolutions themselves); values are dropped after their last
    use, so memory stays that of a forward pass. fast: modules whose type fixes their output's shape
    are not run (see _shaped_like_output)."""
    last: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            last[a] = n
    env: dict[fx.Node, Any] = {}
    inputs = iter([example_input])
    modules = dict(model.named_modules())
    for n in graph.nodes:
        op = n.op
        if op == "output":
            break
        if op == "placeholder":  # the example, then declared defaults (as fx.Interpreter does)
            out = list(inputs) if n.target.startswith("*") else next(inputs, n.args[0] if n.args else None)
            if out is None and not n.args:
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
                out = _shaped_like_output(mod, args[0]) if one else None
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


def _seg_offsets(lay: _Lay):
    off = 0
    for gid, n, blk in lay.segs:
        yield gid, n, blk, off
        off += n * blk


class _Tracer:
    def __init__(self, model: nn.Module | None, graph: fx.Graph | None, sd_keys: set[str]):
        self.graph = graph
        self.b = _Builder()
        self.env: dict[fx.Node, Any] = {}
        self.sd_keys = sd_keys
        self.modules = dict(model.named_modules()) if model is not None else {}

    # -- helpers --
    def lay(self, a: Any) -> Any:
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def all_lays(self, args: Any) -> list:
        out: list = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n)) or n)
        return out

    def fix_args(self, node: fx.Node, reason: str) -> None:
        for lay in self.all_lays((node.args, node.kwargs)):
            self.b.fix_lay(lay, reason)

    def fresh(self, n: int, label: str, axis: int, members: list[tuple[str, int]]) -> _Lay:
        g = self.b.new(n, label)
        for name, ax in members:
            if name in self.sd_keys:
                self.b.add(g, Member(name, ax))
        return _Lay(axis, ((g, n, 1),))

    def add_members(self, lay: _Lay, tensors: list[tuple[str, int]], need_block1: bool = True) -> None:
        for gid, n, blk, off in _seg_offsets(lay):
            if need_block1 and blk != 1:
                raise _Fix("per-channel parameters on a flattened axis")
            for name, ax in tensors:
                if name in self.sd_keys:
                    self.b.add(gid, Member(name, ax, off, blk))

    def merge(self, lays: list[_Lay]) -> _Lay:
        first = lays[0]
        for other in lays[1:]:
            if [s[1:] for s in other.segs] != [s[1:] for s in first.segs]:
                raise _Fix("elementwise op on differently structured feature axes")
        for other in lays[1:]:
            for (g1, _, _), (g2, _, _) in zip(first.segs, other.segs):
                self.b.union(g1, g2)
        return first

    # -- the walk --
    def run(self) -> None:
        for node in self.graph.nodes:
            try:
                out = self.visit(node)
            except _Fix as e:
                self.fix_args(node, f"{e} (at {node.format_node()[:120]})")
                out = None
            self.env[node] = out
            if isinstance(out, _Lay) and node.op != "get_attr":
                for gid, n, blk, off in _seg_offsets(out):
                    self.b.probes[self.b.find(gid)].append(Probe(node.name, out.axis, off, blk))

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            return None
        if op == "output":
            self.fix_args(node, "model output")
            return None
        if op == "get_attr":
            shape = _shape(node)
            if node.target in self.sd_keys and shape:
                return self.fresh(shape[-1], str(node.target), len(shape) - 1, [(str(node.target), len(shape) - 1)])
            return None
        if op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if op == "call_function":
            return self.visit_function(node, node.target)
        if op == "call_method":
            return self.visit_method(node, node.target)
        raise _Fix(f"unknown node kind {op}")

    def visit_module(self, node: fx.Node, mod: nn.Module) -> Any:
        name = node.target
        if any(isinstance(lay, _HLay) for lay in self.all_lays((node.args, node.kwargs))):
            if isinstance(mod, (nn.Dropout, nn.Identity, nn.Softmax)):
                return self.lay(node.args[0])
            raise _Fix(f"{type(mod).__name__} on per-head tensors")
        x = node.args[0] if node.args else None
        lay = self.lay(x)
        shape_in, shape_out = _shape(x), _shape(node)
        if isinstance(mod, nn.Linear):
            if lay is not None:
                if lay.axis != len(shape_in) - 1:
                    raise _Fix("Linear applied across a non-feature axis")
                self.add_members(lay, [(f"{name}.weight", 1)], need_block1=False)
            return self.fresh(mod.out_features, name, len(shape_out) - 1, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if lay is not None and (lay.axis != 1 or any(s[2] != 1 for s in lay.segs)):
                raise _Fix("convolution over a non-channel axis")
            if mod.groups == 1:
                if lay is not None:
                    self.add_members(lay, [(f"{name}.weight", 1)])
                return self.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
            if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: a per-channel op
                if lay is None:
                    return None
                self.add_members(lay, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
                return lay
            raise _Fix(f"grouped convolution (groups={mod.groups}) ties channels to groups")
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and mod.groups == 1:
            if lay is not None:
                if lay.axis != 1 or any(s[2] != 1 for s in lay.segs):
                    raise _Fix("transposed convolution over a non-channel axis")
                self.add_members(lay, [(f"{name}.weight", 0)])
            return self.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 1), (f"{name}.bias", 0)])
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if lay is None:
                return None
            if lay.axis != 1:
                raise _Fix("BatchNorm over a non-channel axis")
            self.add_members(lay, [(f"{name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")])
            return lay
        if isinstance(mod, nn.GroupNorm):
            if lay is None:
                return None
            if lay.axis != 1:
                raise _Fix("GroupNorm over a non-channel axis")
            if mod.num_groups not in (1, mod.num_channels):
                # legal permutations move whole groups and reorder channels within each: the same
                # block structure as attention heads
                if len(lay.segs) != 1:
                    raise _Fix(f"GroupNorm with {mod.num_groups} groups over concatenated channels")
                self.b.set_heads(lay.segs[0][0], mod.num_groups)
            self.add_members(lay, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
            return lay
        if isinstance(mod, nn.LayerNorm):
            if lay is None:
                return None
            k = len(mod.normalized_shape)
            nd = len(shape_in)
            if lay.axis < nd - k:  # normalised over other axes: the feature axis just rides along
                return lay
            if k == 1:
                self.add_members(lay, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
                return lay
            raise _Fix("LayerNorm over several axes including the feature axis")
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return lay
        if isinstance(mod, _POOL_MODULES):
            if getattr(mod, "return_indices", False):
                raise _Fix("pooling that returns indices")
            if lay is not None and (lay.axis != 1 or len(shape_in) < 3):
                raise _Fix("pooling over the feature axis")
            return lay
        if isinstance(mod, nn.Flatten):
            return self.reshape(lay, shape_in, shape_out)
        if isinstance(mod, nn.Embedding):
            return self.fresh(mod.embedding_dim, name, len(shape_out) - 1, [(f"{name}.weight", 1)])
        if isinstance(mod, nn.MultiheadAttention):
            return self.visit_mha(node, mod)
        if isinstance(mod, nn.Sequential) and len(mod) == 0:
            return lay
        raise _Fix(f"unsupported module {type(mod).__name__}")

    def visit_mha(self, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
        """nn.MultiheadAttention: its inputs share in_proj's input axis; out_proj's outputs are a new
        group; inside, whole heads permute as blocks, and units within a head permute jointly in q/k
        (one group) and in v/out_proj's input (a second group sharing the head permutation)."""
        name = node.target
        names = ("query", "key", "value")
        ins = [node.args[i] if len(node.args) > i else node.kwargs.get(names[i]) for i in range(3)]
        extra = [a for a in list(node.args[3:]) + [v for k, v in node.kwargs.items() if k not in names]
                 if isinstance(a, fx.Node)]
        if extra:
            raise _Fix("MultiheadAttention with masks")
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            raise _Fix("MultiheadAttention with separate q/k/v projections or extra key/value biases")
        lays = [self.lay(a) for a in ins]
        present = [lay for lay in lays if lay is not None]
        if present:
            if len(present) < 3:
                raise _Fix("attention over a mix of permutable and unpermutable inputs")
            for a, lay in zip(ins, lays):
                if lay.axis != len(_shape(a)) - 1 or any(sg[2] != 1 for sg in lay.segs):
                    raise _Fix("attention over a non-feature axis")
            lay = self.merge(present)  # one in_proj input axis: q, k and v inputs share a permutation
            self.add_members(lay, [(f"{name}.in_proj_weight", 1)])
        e, h = mod.embed_dim, mod.num_heads
        if h >= 1 and e // h >= 1:
            qk = self.b.new(e, f"{name}.qk")
            vo = self.b.new(e, f"{name}.vo")
            for off in (0, e):
                self.b.add(qk, Member(f"{name}.in_proj_weight", 0, off))
                if f"{name}.in_proj_bias" in self.sd_keys:
                    self.b.add(qk, Member(f"{name}.in_proj_bias", 0, off))
            self.b.add(vo, Member(f"{name}.in_proj_weight", 0, 2 * e))
            if f"{name}.in_proj_bias" in self.sd_keys:
                self.b.add(vo, Member(f"{name}.in_proj_bias", 0, 2 * e))
            self.b.add(vo, Member(f"{name}.out_proj.weight", 1))
            self.b.heads[qk] = self.b.heads[vo] = h
            self.b.couple[qk], self.b.couple[vo] = vo, qk
        so = _shape(node)
        nd = len(so[0]) if so and isinstance(so[0], (tuple, list)) else len(_shape(ins[0]))
        out = self.fresh(e, f"{name}.out_proj", nd - 1, [(f"{name}.out_proj.weight", 0), (f"{name}.out_proj.bias", 0)])
        return (out, None)

    def visit_function(self, node: fx.Node, fn: Any) -> Any:
        args = node.args
        if fn in (operator.matmul, torch.matmul, torch.bmm):
            return self.matmul(node)
        if fn not in _HLAY_FUNCS and any(isinstance(lay, _HLay) for lay in self.all_lays((node.args, node.kwargs))):
            raise _Fix(f"{getattr(fn, '__name__', fn)} on per-head tensors")
        if fn in _ELEMENTWISE_FUNCS:
            return self.lay(args[0])
        if fn in _BINARY:
            return self.binary(node)
        if fn is torch.cat or fn is torch.concat:
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, list(args[0]), dim)
        if fn in (torch.flatten, torch.reshape):
            return self.reshape(self.lay(args[0]), _shape(args[0]), _shape(node))
        if fn is torch.transpose:
            return self.transpose(node, args[0], args[1], args[2])
        if fn is torch.permute:
            return self.permute(node, args[0], args[1])
        if fn in _POOL_FUNCS:
            lay = self.lay(args[0])
            if lay is not None and (lay.axis != 1 or len(_shape(args[0])) < 3):
                raise _Fix("pooling over the feature axis")
            return lay
        if fn in _REDUCE_FUNCS:
            return self.reduce(node, args[0], args[1] if len(args) > 1 else node.kwargs.get("dim"),
                               args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is torch.unsqueeze:
            return self.unsqueeze(node, args[0], args[1] if len(args) > 1 else node.kwargs["dim"])
        if fn is getattr:
            return None  # x.shape and friends: no values flow
        raise _Fix(f"unsupported function {getattr(fn, '__name__', fn)}")

    def visit_method(self, node: fx.Node, name: str) -> Any:
        args = node.args
        if name in ("matmul", "bmm"):
            return self.matmul(node)
        if name not in _HLAY_METHODS and any(isinstance(lay, _HLay) for lay in self.all_lays((node.args, node.kwargs))):
            raise _Fix(f".{name}() on per-head tensors")
        if name in _SHAPE_METHODS:
            return None
        if name in _ELEMENTWISE_METHODS:
            return self.lay(args[0])
        if name in _BINARY_METHODS:
            return self.binary(node)
        if name in ("flatten", "view", "reshape"):
            return self.reshape(self.lay(args[0]), _shape(args[0]), _shape(node))
        if name == "transpose":
            return self.transpose(node, args[0], args[1], args[2])
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return self.permute(node, args[0], dims)
        if name in _REDUCE_METHODS:
            return self.reduce(node, args[0], args[1] if len(args) > 1 else node.kwargs.get("dim"),
                               args[2] if len(args) > 2 else node.kwargs.get("keepdim", False))
        if name == "unsqueeze":
            return self.unsqueeze(node, args[0], args[1] if len(args) > 1 else node.kwargs["dim"])
        if name == "expand":
            lay = self.lay(args[0])
            if lay is None:
                return None
            si, so = _shape(args[0]), _shape(node)
            ax = lay.axis + len(so) - len(si)
            if so[ax] != si[lay.axis]:
                raise _Fix("expand along the feature axis")
            return _Lay(ax, lay.segs)
        raise _Fix(f"unsupported method .{name}()")

    # -- layout rules --
    def binary(self, node: fx.Node) -> Any:
        so = _shape(node)
        if so is None:
            return None
        tensor_args = [a for a in list(node.args) + list(node.kwargs.values())
                       if isinstance(a, fx.Node) and _shape(a) is not None]
        hl = [self.lay(a) for a in tensor_args if isinstance(self.lay(a), _HLay)]
        if hl:
            if len(tensor_args) > 1:
                raise _Fix("elementwise op between per-head tensors")
            return hl[0]
        lays, plain = [], []
        for a in list(node.args) + list(node.kwargs.values()):
            if not isinstance(a, fx.Node):
                continue
            lay, sa = self.lay(a), _shape(a)
            if lay is not None:
                lays.append(_Lay(lay.axis + len(so) - len(sa), lay.segs))
            elif sa is not None:
                plain.append(sa)
        if not lays:
            return None
        ax = lays[0].axis
        if any(lay.axis != ax for lay in lays):
            raise _Fix("elementwise op on tensors with different feature axes")
        for sa in plain:  # an unpermuted operand must be constant along the feature axis
            k = ax - (len(so) - len(sa))
            if k >= 0 and sa[k] != 1:
                raise _Fix("elementwise op with an unpermutable tensor")
        return self.merge(lays)

    def cat(self, node: fx.Node, parts: list, dim: int) -> Any:
        so = _shape(node)
        dim = dim % len(so)
        lays = [self.lay(p) for p in parts]
        if all(lay is None for lay in lays):
            return None
        if any(lay is not None and lay.axis != dim for lay in lays):  # cat along another axis: merge
            if any(lay is None for lay in lays):
                raise _Fix("concatenation of permutable and unpermutable tensors")
            return self.merge(lays)
        segs: list = []
        for p, lay in zip(parts, lays):
            if lay is None:
                size = _shape(p)[dim]
                g = self.b.new(size, f"{node.name}:part", "concatenated with an unpermutable tensor")
                segs.append((g, size, 1))
            else:
                segs += list(lay.segs)
        return _Lay(dim, tuple(segs))

    def reshape(self, lay: Any, si: tuple | None, so: tuple | None) -> Any:
        if lay is None:
            return None
        if si is None or so is None:
            raise _Fix("reshape of unknown shape")
        if isinstance(lay, _HLay):
            return self.merge_heads(lay, si, so)
        try:
            return self.reshape_plain(lay, si, so)
        except _Fix:
            if len(lay.segs) == 1 and lay.segs[0][2] == 1:
                split = self.split_heads(lay, si, so)
                if split is not None:
                    return split
            raise

    def reshape_plain(self, lay: _Lay, si: tuple, so: tuple) -> _Lay:
        a = lay.axis
        pre = math.prod(si[:a])
        c = si[a]
        # the output axis b with prod(so[:b]) == pre and so[b] == c * prod(si[a+1:k]) for some k
        acc, b = 1, 0
        while acc < pre and b < len(so):
            acc *= so[b]
            b += 1
        if acc != pre or b >= len(so) or so[b] % c:
            raise _Fix("reshape that splits the feature axis")
        mult, k, m = so[b] // c, a + 1, 1
        while m < mult and k < len(si):
            m *= si[k]
            k += 1
        if m != mult:
            raise _Fix("reshape that mixes the feature axis with others")
        return _Lay(b, tuple((g, n, blk * mult) for g, n, blk in lay.segs))

    def split_heads(self, lay: _Lay, si: tuple, so: tuple) -> "_HLay | None":
        """(.., H*dh, ..) -> (.., H, dh, ..): the units of one group split into heads."""
        a = lay.axis
        gid, n, _ = lay.segs[0]
        pre, post = math.prod(si[:a]), math.prod(si[a + 1:])
        for b in range(len(so) - 1):
            if (math.prod(so[:b]) == pre and so[b] * so[b + 1] == n and math.prod(so[b + 2:]) == post
                    and 1 <= so[b] <= n):
                self.b.set_heads(gid, so[b])
                return _HLay(b, b + 1, gid)
        return None

    def merge_heads(self, lay: _HLay, si: tuple, so: tuple) -> _Lay:
        """(.., H, dh, ..) -> (.., H*dh, ..): heads merged back into one feature axis."""
        h, u = lay.head_axis, lay.unit_axis
        if u != h + 1:
            raise _Fix("reshape of per-head tensors other than merging heads back")
        n = si[h] * si[u]
        pre, post = math.prod(si[:h]), math.prod(si[u + 1:])
        for b in range(len(so)):
            if math.prod(so[:b]) == pre and so[b] == n and math.prod(so[b + 1:]) == post:
                return _Lay(b, ((lay.gid, n, 1),))
        raise _Fix("reshape of per-head tensors other than merging heads back")

    def matmul(self, node: fx.Node) -> Any:
        """Attention's two products: q @ k^T contracts units (q and k share a group, heads kept);
        scores @ v keeps v's units and pairs the score heads with v's heads (coupled groups)."""
        x, y = node.args[:2]
        lx, ly = self.lay(x), self.lay(y)
        if lx is None and ly is None:
            return None
        if not (isinstance(lx, _HLay) and isinstance(ly, _HLay)):
            raise _Fix("matrix product involving permuted units")
        nx, ny, no = len(_shape(x)), len(_shape(y)), len(_shape(node))
        hx, hy = lx.head_axis - nx, ly.head_axis - ny  # batch axes, counted from the end
        if hx != hy or hx > -3:
            raise _Fix("matrix product across heads")
        if lx.unit_axis == nx - 1 and ly.unit_axis == ny - 2:  # q @ k^T
            g = self.b.union(lx.gid, ly.gid)
            return _HLay(no + hx, None, g)
        if lx.unit_axis is None and ly.unit_axis == ny - 1:  # scores @ v
            self.b.set_couple(lx.gid, ly.gid)
            return _HLay(no + hx, no - 1, ly.gid)
        raise _Fix("matrix product of per-head tensors in an unrecognised pattern")

    def transpose(self, node, x, d0, d1) -> Any:
        lay = self.lay(x)
        if lay is None:
            return None
        nd = len(_shape(x))
        d0, d1 = d0 % nd, d1 % nd

        def mv(ax):
            return ax if ax is None else d1 if ax == d0 else d0 if ax == d1 else ax

        if isinstance(lay, _HLay):
            return _HLay(mv(lay.head_axis), mv(lay.unit_axis), lay.gid)
        return _Lay(mv(lay.axis), lay.segs)

    def permute(self, node, x, dims) -> Any:
        lay = self.lay(x)
        if lay is None:
            return None
        nd = len(_shape(x))
        dims = [d % nd for d in dims]
        if isinstance(lay, _HLay):
            return _HLay(dims.index(lay.head_axis), None if lay.unit_axis is None else dims.index(lay.unit_axis),
                         lay.gid)
        return _Lay(dims.index(lay.axis), lay.segs)

    def reduce(self, node, x, dim, keepdim) -> Any:
        lay = self.lay(x)
        if lay is None:
            return None
        nd = len(_shape(x))
        if dim is None:
            return None  # a full reduction is invariant to permutations
        dims = [d % nd for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
        if lay.axis in dims:
            return None  # summing/averaging over units does not depend on their order
        return _Lay(lay.axis if keepdim else lay.axis - sum(d < lay.axis for d in dims), lay.segs)

    def getitem(self, node: fx.Node) -> Any:
        x, idx = node.args
        lay = self.lay(x)
        if isinstance(lay, (tuple, list)):
            return lay[idx] if isinstance(idx, int) and -len(lay) <= idx < len(lay) else None
        if lay is None:
            return None
        if isinstance(lay, _HLay):
            raise _Fix("indexing per-head tensors")
        nd = len(_shape(x))
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(e is Ellipsis for e in idx) > 1:
            raise _Fix("advanced indexing")
        if Ellipsis in idx:  # expand to full slices over the axes it stands for
            k = idx.index(Ellipsis)
            used = sum(e is not None and e is not Ellipsis for e in idx)
            idx[k:k + 1] = [slice(None)] * (nd - used)
        i_in = i_out = 0
        for e in idx:
            if e is None:
                i_out += 1
                continue
            if isinstance(e, fx.Node) or not isinstance(e, (int, slice)):
                raise _Fix("advanced indexing")
            if i_in == lay.axis:
                if not (isinstance(e, slice) and e == slice(None)):
                    raise _Fix("indexing into the feature axis")
                return _Lay(i_out, lay.segs)
            i_in += 1
            i_out += isinstance(e, slice)
        return _Lay(i_out + (lay.axis - i_in), lay.segs)  # the feature axis is past the index

    def unsqueeze(self, node: fx.Node, x, dim) -> Any:
        lay = self.lay(x)
        if lay is None:
            return None
        if isinstance(lay, _HLay):
            raise _Fix("unsqueeze of per-head tensors")
        dim = dim % len(_shape(node))
        return _Lay(lay.axis + (dim <= lay.axis), lay.segs)

    # -- result --
    def spec(self, model: nn.Module, sd: dict, trace_error: str | None = None) -> PermutationSpec:
        b = self.b
        params = {n for n, _ in model.named_parameters()}
        roots: dict[int, list[Member]] = {}
        for g in range(len(b.parent)):
            r = b.find(g)
            roots.setdefault(r, b.members[r])
        # a tensor axis slice owned by two groups: they must be one group (shared weights)
        owner: dict[tuple[str, int, int], int] = {}
        for r in list(roots):
            for m in b.members[b.find(r)]:
                key = (m.tensor, m.axis, m.offset)
                if key in owner and b.find(owner[key]) != b.find(r):
                    b.union(owner[key], r)
                owner[key] = b.find(r)
        groups: dict[str, Group] = {}
        unperm: list[Unpermuted] = []
        seen = set()
        for g in range(len(b.parent)):
            r = b.find(g)
            if r in seen:
                continue
            seen.add(r)
            members = list(dict.fromkeys(b.members[r]))
            if not members:
                continue
            what = ", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in members))
            if b.reasons[r]:
                unperm.append(Unpermuted(what, "; ".join(dict.fromkeys(b.reasons[r]))))
                continue
            if b.n[r] < 2:
                continue
            name = b.label[r]
            while name in groups:
                name += "'"
            groups[name] = Group(name, b.n[r], members, list(dict.fromkeys(b.probes[r])), b.heads[r])
            b.label[r] = name
        for g in range(len(b.parent)):  # attention: couple q/k with v/o groups by their names
            r = b.find(g)
            c = b.couple[r]
            if c is not None and b.label[r] in groups:
                other = b.label[b.find(c)]
                if other in groups:
                    groups[b.label[r]].couple = other
                else:  # partner pinned: pin this one too (they share the head permutation)
                    gr = groups.pop(b.label[r])
                    unperm.append(Unpermuted(", ".join(f"{m.tensor}[{m.axis}]" for m in gr.members),
                                             "its attention heads' partner group is unpermutable"))
        if trace_error:
            unperm.append(Unpermuted("whole model", trace_error))
        return PermutationSpec(groups, unperm, {k: list(v.shape) for k, v in sd.items()},
                               [k for k in sd if k in params])


def spec_from_model(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the permutation spec of `model` by tracing it on `example_input` (weights unused)."""
    sd = model.state_dict()
    sd_keys = set(sd)
    training = [m for m in model.modules() if m.training]  # restored exactly afterwards
    try:
        graph = _GraphTracer().trace(model)
        for m in training:
            m.training = False
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a batch of 2: threads only add contention (50x slower on a busy machine)
        try:
            with torch.no_grad():
                try:
                    _record_shapes(model, graph, example_input)
                except Exception:  # noqa: BLE001 - an op downstream refused zeros: the real values then
                    _record_shapes(model, graph, example_input, fast=False)
        finally:
            torch.set_num_threads(threads)
    except Exception as e:  # noqa: BLE001 - any trace failure means: permute nothing
        tr = _Tracer(None, None, sd_keys)
        return tr.spec(model, sd, f"torch.fx could not trace the model ({type(e).__name__}: {str(e)[:200]})")
    finally:
        for m in training:
            m.training = True
    tr = _Tracer(model, graph, sd_keys)
    tr.run()
    return tr.spec(model, sd)
