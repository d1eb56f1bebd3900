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

from .inputs import as_call


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
    head_only: bool = False   # units keep their order within a head (rotary q/k): whole heads move only
    role: str = "mlp"         # what the units are (ROLES): attention heads, a block's hidden units, the stream


# A group's role, read off the graph where the group is formed (never off names): "heads" if its units
# meet in an attention product (q/k, or v/o sharing the scores' heads); else "stream" if it is the sum of
# several computed values (residual additions: the embedding dimension every block reads and writes);
# else "mlp": the hidden units of one layer or block (a feed-forward or gated SwiGLU hidden layer, a
# conv block's inner channels, an MLP's hidden layer). Alignment variants align one role at a time.
ROLES = ("heads", "mlp", "stream")


@dataclass
class Unpermuted:
    what: str      # the tensor axes concerned
    reason: str
    axes: list = field(default_factory=list)  # [tensor, axis, offset, length] of each pinned slice


@dataclass
class PermutationSpec:
    groups: dict[str, Group]
    unpermuted: list[Unpermuted]
    shapes: dict[str, list[int]]      # every state-dict tensor's shape (parameters and buffers)
    parameters: list[str]             # which of them are parameters
    capture: str = "fx"               # how the graph was captured: "fx", "export", or "failed"
    capture_error: str | None = None  # why torch.fx (and torch.export, if "failed") could not capture it

    # ---- plain data ----
    def to_dict(self) -> dict:
        return {"groups": {k: asdict(g) for k, g in self.groups.items()},
                "unpermuted": [asdict(u) for u in self.unpermuted],
                "shapes": self.shapes, "parameters": self.parameters,
                "capture": self.capture, "capture_error": self.capture_error}

    @classmethod
    def from_dict(cls, d: dict) -> "PermutationSpec":
        groups = {k: Group(name=g["name"], size=g["size"], members=[Member(**m) for m in g["members"]],
                           probes=[Probe(**p) for p in g.get("probes", [])], heads=g.get("heads", 0),
                           couple=g.get("couple"), head_only=g.get("head_only", False),
                           role=g.get("role", "heads" if g.get("couple") else "mlp"))
                  for k, g in d["groups"].items()}
        return cls(groups, [Unpermuted(u["what"], u["reason"], [list(a) for a in u.get("axes", [])])
                            for u in d["unpermuted"]],
                   {k: list(v) for k, v in d["shapes"].items()}, list(d["parameters"]),
                   d.get("capture", "fx"), d.get("capture_error"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __eq__(self, other) -> bool:
        return isinstance(other, PermutationSpec) and self.to_dict() == other.to_dict()

    def permutable_tensors(self) -> set[str]:
        return {m.tensor for g in self.groups.values() for m in g.members}

    def permutable_fraction(self) -> float:
        """Coverage over the parameter axes that could carry a permutation: each axis of a parameter
        that indexes hidden units (found in a group, or pinned for a reason other than being the
        model's output) weighs the parameter's size; the fraction is the permuted share of that
        weight (a slice of an axis counts for its share of the axis). A tensor permuted on one axis
        and pinned on another counts half; axes no unit runs along (kernel taps, the model's inputs
        and outputs) count for nothing. Buffers are not counted."""
        params = set(self.parameters)
        done: dict[tuple[str, int], int] = {}
        for g in self.groups.values():
            for m in g.members:
                if m.tensor in params:
                    done[m.tensor, m.axis] = done.get((m.tensor, m.axis), 0) + g.size * m.block
        pinned: set[tuple[str, int]] = set()
        for u in self.unpermuted:
            if not _boundary(u.reason):
                pinned |= {(t, ax) for t, ax, *_ in u.axes if t in params}
        num = den = 0.0
        for t, ax in set(done) | pinned:
            size, length = math.prod(self.shapes[t]), self.shapes[t][ax]
            share = min(1.0, done.get((t, ax), 0) / length)
            num += size * share
            den += size if (t, ax) in pinned else size * share
        return num / den if den else 0.0

    def problems(self) -> list[str]:
        """What a user must be told about this spec: the capture failed, or nothing can be permuted."""
        out = []
        if self.capture == "failed":
            out.append(f"the model could not be captured, so nothing is permuted: {self.capture_error}")
        elif not self.groups:
            out.append("no permutable units were found in this model: aligning leaves it unchanged "
                       "(see `stardomain spec` for what is pinned and why)")
        return out

    def summary(self) -> str:
        how = {"fx": "torch.fx", "export": "torch.export"}.get(self.capture, "nothing")
        roles = ", ".join(f"{n} {r}" for r in ROLES if (n := sum(g.role == r for g in self.groups.values())))
        lines = [f"{len(self.groups)} permutation groups" + (f" ({roles})" if roles else "") + ", "
                 f"{100 * self.permutable_fraction():.1f}% of the parameter axes that carry hidden units "
                 f"permuted (captured with {how})"]
        lines += [f"warning: {p}" for p in self.problems()]
        for g in self.groups.values():
            extra = (f", {g.heads} heads" + (" (whole heads only)" if g.head_only else "")
                     + (f" coupled with {g.couple}" if g.couple else "") if g.heads else "")
            ms = ", ".join(f"{m.tensor}[{m.axis}]" + (f"@{m.offset}" if m.offset else "")
                           + (f"x{m.block}" if m.block > 1 else "") for m in g.members)
            lines.append(f"  {g.name} [{g.role}]: size {g.size}{extra}: {ms}")
        if self.unpermuted:
            lines.append("unpermuted:")
            lines += [f"  {u.what}: {u.reason}" for u in self.unpermuted]
        return "\n".join(lines)

    __str__ = summary


def _boundary(reason: str) -> bool:
    """A pin that only says the axis is the model's input or output (no hidden units run along it)."""
    return all(r.startswith(("model output", "model input")) for r in reason.split("; "))


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
    rep: int = 1  # >1: each head repeated rep times along the head axis (grouped-query key/value heads)


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
        self.parts: dict[int, list[int]] = {}  # a group cut into sub-groups (a fused q/k/v projection)
        self.head_only: list[bool] = []
        self.attention: list[bool] = []  # units met in an attention product (role "heads")
        self.summed: list[bool] = []     # the sum of several computed values (role "stream")

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
        self.head_only.append(False)
        self.attention.append(False)
        self.summed.append(False)
        return g

    def role(self, g: int) -> str:
        r = self.find(g)
        return "heads" if self.attention[r] else "stream" if self.summed[r] else "mlp"

    def mark(self, flags: list[bool], *gids: int) -> None:
        for g in gids:
            flags[self.find(g)] = True

    def _inherit(self, new: int, r: int) -> None:
        self.attention[new], self.summed[new] = self.attention[r], self.summed[r]

    def split(self, g: int, sizes: list[int]) -> list[int] | None:
        """Cut group g's units into consecutive sub-groups (q, k and v of one fused projection). Only a
        group whose members all span its units plainly can be cut; using the whole again later pins
        every part (see union, add, fix). None: it cannot be cut."""
        r = self.find(g)
        if self.heads[r] or self.couple[r] is not None or r in self.parts or sum(sizes) != self.n[r]:
            return None
        if any(m.block != 1 for m in self.members[r]):
            return None
        subs, off = [], 0
        for n in sizes:
            sg = self.new(n, f"{self.label[r]}[{off}:{off + n}]")
            self.reasons[sg] = list(self.reasons[r])
            self._inherit(sg, r)
            self.members[sg] = [Member(m.tensor, m.axis, m.offset + off, 1) for m in self.members[r]]
            self.probes[sg] = [Probe(p.node, p.axis, p.offset + off * p.block, p.block) for p in self.probes[r]]
            subs.append(sg)
            off += n
        self.members[r], self.probes[r] = [], []
        self.parts[r] = subs
        return subs

    def coarsen(self, g: int, blocks: int) -> int | None:
        """A group of `blocks` units standing for g's units in consecutive blocks (grouped-query heads):
        g's members become block members of it; later uses of g alone pin both (as after a split)."""
        r = self.find(g)
        if r in self.parts or self.n[r] % blocks or any(m.block != 1 for m in self.members[r]):
            return None
        per = self.n[r] // blocks
        c = self.new(blocks, self.label[r], None)
        self.reasons[c] = list(self.reasons[r])
        self._inherit(c, r)
        self.members[c] = [Member(m.tensor, m.axis, m.offset, per) for m in self.members[r]]
        self.probes[c] = [Probe(p.node, p.axis, p.offset, p.block * per) for p in self.probes[r]]
        self.members[r], self.probes[r] = [], []
        self.parts[r] = [c]
        self.heads[r] = 0
        return c

    def _whole_used(self, r: int) -> None:
        for sg in self.parts.get(r, []):
            self.fix(sg, "a fused projection used both whole and in parts")

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a in self.parts or b in self.parts:
            self._whole_used(a)
            self._whole_used(b)
            self.reasons[a].append("a fused projection used both whole and in parts")
        if self.n[a] <= 0 or self.n[b] <= 0:  # a pin (size unknown): takes the other's size
            self.n[a] = self.n[b] = max(self.n[a], self.n[b])
        elif self.n[a] != self.n[b]:  # cannot happen for a consistent graph; be safe
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
        self.head_only[a] = self.head_only[a] or self.head_only[b]
        self.attention[a] = self.attention[a] or self.attention[b]
        self.summed[a] = self.summed[a] or self.summed[b]
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
        self.mark(self.attention, a, b)
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
            for sg in self.parts.get(r, []):
                self.fix(sg, reason)

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
        r = self.find(gid)
        if r in self.parts:
            self._whole_used(r)
            self.fix(r, "a fused projection used both whole and in parts")
        self.members[r].append(m)


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


def _shape(node: Any) -> tuple[int, ...] | None:
    """The shape a tensor-valued node had on the example input (None for other values)."""
    return node.meta.get("shape") if isinstance(node, fx.Node) else None


class _GraphTracer(fx.Tracer):
    """fx.Tracer without the per-node metadata (module stacks, scopes) the spec never reads: the same
    graph, ~10% faster to trace."""

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        return self.graph.create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _user_rule(m) is not None or super().is_leaf_module(m, qualname)


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


def _record_shapes(model: nn.Module, graph: fx.Graph, example_input: Any, fast: bool = True) -> None:
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


@dataclass(frozen=True)
class _P:
    """A parameter or buffer read as a value (a get_attr node, or an exported graph's input): the op
    using it decides its layout (F.linear's weight, a layer scale, a position embedding)."""
    name: str
    shape: tuple


@dataclass(frozen=True)
class _Fused:
    """A fused projection split over a new axis (q/k/v from reshape(B, T, 3, H, d)): index i along
    `axis` is part i, whose layout (in this tensor's axes) is parts[i]."""
    axis: int
    parts: tuple


_SHAPE_ONLY = object()  # marker: a rule that returns no layout and must not pin its arguments


class _Tracer:
    def __init__(self, model: nn.Module | None, graph: fx.Graph | None, sd_keys: set[str],
                 params: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None):
        self.graph = graph
        self.b = _Builder()
        self.env: dict[fx.Node, Any] = {}
        self.sd_keys = sd_keys
        self.modules = dict(model.named_modules()) if model is not None else {}
        self.params = params or {}          # exported graph input -> state-dict name
        self.aliases = aliases or {}
        self.pinned: dict[str, str] = {}    # tensors an op not understood reads: never permuted
        self.materialised: dict[fx.Node, Any] = {}

    # -- helpers --
    def lay(self, a: Any) -> Any:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, _P):  # a parameter used as a plain value: its last axis is its feature axis
            if a not in self.materialised:
                self.materialised[a] = (self.fresh(v.shape[-1], v.name, len(v.shape) - 1,
                                                   [(v.name, len(v.shape) - 1)]) if v.shape else None)
            return self.materialised[a]
        return v

    def pname(self, a: Any) -> str | None:
        """The state-dict name of a parameter argument (None for None); a computed weight is refused."""
        if a is None:
            return None
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, _P):
            return v.name
        if isinstance(a, fx.Node) and self.lay(a) is None and _shape(a) is not None:
            return ""  # a weight that carries no permutation (a constant): no member, nothing to pin
        raise _Fix("a layer whose weight is computed, not a parameter")

    def all_lays(self, args: Any) -> list:
        out: list = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n)) or n)
        return out

    def fix_value(self, v: Any, reason: str) -> None:
        if isinstance(v, _P):
            self.pinned.setdefault(v.name, reason)
        elif isinstance(v, _Fused):
            for part in v.parts:
                self.fix_value(part, reason)
        elif isinstance(v, (tuple, list)):
            for x in v:
                self.fix_value(x, reason)
        else:
            self.b.fix_lay(v, reason)

    def fix_args(self, node: fx.Node, reason: str) -> None:
        for n in node.all_input_nodes:
            self.fix_value(self.env.get(n), reason)
            if n in self.materialised:
                self.fix_value(self.materialised[n], reason)

    def visit_leaf(self, node: fx.Node, name: str, rule: "LeafRule") -> Any:
        """A user-registered leaf module (register_leaf_module)."""
        x = node.args[0] if node.args else None
        lay = self.lay(x)
        if rule.kind == "opaque":
            raise _Fix(rule.reason or f"{rule.cls.__name__} is registered as opaque")
        if isinstance(lay, (_HLay, _Fused)):
            raise _Fix(f"{rule.cls.__name__} on per-head tensors")
        if rule.kind == "elementwise":
            return lay
        if rule.kind == "per_unit":
            if lay is not None:
                self.add_members(lay, [(f"{name}.{p}", ax) for p, ax in rule.params.items()])
            return lay
        # linear: every weight (out, in) along rule.axes, biases along out
        out_ax, in_ax = rule.axes
        if lay is not None:
            if lay.axis != len(_shape(x)) - 1:
                raise _Fix(f"{rule.cls.__name__} applied across a non-feature axis")
            self.add_members(lay, [(f"{name}.{w}", in_ax) for w in rule.weights], need_block1=False)
        so = _shape(node)
        return self.fresh(so[-1], name, len(so) - 1,
                          [(f"{name}.{w}", out_ax) for w in rule.weights] + [(f"{name}.{b}", 0) for b in rule.biases])

    def pinned_like(self, node: fx.Node, reason: str) -> "_Lay | None":
        """The output of an op not understood, where a plain input's feature axis survives in its
        shape (cumsum, an unknown activation): a pinned group there, so what reads it downstream is
        listed as pinned too (and anything merged with it is pinned: never less safe than nothing)."""
        so = _shape(node)
        lays = [(n, self.env.get(n)) for n in node.all_input_nodes if isinstance(self.env.get(n), (_Lay, _HLay))]
        if so is None or node.op == "output" or len(lays) != 1:
            return None
        n, lay = lays[0]
        si = _shape(n)
        if si is None:
            return None
        if isinstance(lay, _Lay) and len(si) == len(so) and si[lay.axis] == so[lay.axis]:
            ax = lay.axis
        else:  # the units' count along exactly one output axis (a channel shuffle's reshape back)
            units = si[lay.axis] if isinstance(lay, _Lay) else self.b.n[self.b.find(lay.gid)]
            axes = [i for i, d in enumerate(so) if d == units]
            if len(axes) != 1 or units < 2:
                return None
            ax = axes[0]
        g = self.b.new(so[ax], f"{node.name}:pinned", f"after an op not understood: {reason}")
        return _Lay(ax, ((g, so[ax], 1),))

    def fix_module(self, node: fx.Node, reason: str) -> None:
        """A module not understood: its own parameters' unit axes are pinned and said so."""
        if node.op != "call_module":
            return
        for pname, p in self.modules[node.target].named_parameters(recurse=False):
            for ax in range(min(p.dim(), 2)):
                self.pin_axis(f"{node.target}.{pname}", ax, reason)

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
        if any(not isinstance(lay, _Lay) or lay.axis != first.axis for lay in lays):
            raise _Fix("combining tensors whose units lie on different axes")
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
                if out is _SHAPE_ONLY:
                    out = None
            except _Fix as e:
                self.fix_args(node, f"{e} (at {node.format_node()[:120]})")
                self.fix_module(node, f"{e}")
                out = self.pinned_like(node, f"{e}")
            except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as e:
                # a rule met a use it does not expect: pin what flows in rather than guess
                self.fix_args(node, f"not understood ({type(e).__name__}: {e}) (at {node.format_node()[:120]})")
                out = None
            self.env[node] = out
            if isinstance(out, _Lay) and node.op not in ("get_attr", "placeholder"):
                for gid, n, blk, off in _seg_offsets(out):
                    self.b.probes[self.b.find(gid)].append(Probe(node.name, out.axis, off, blk))

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            name = self.params.get(node.name)
            if name is not None and name in self.sd_keys and _shape(node) is not None:
                return _P(name, _shape(node))
            return None
        if op == "output":
            self.fix_args(node, "model output")
            return None
        if op == "get_attr":
            shape = _shape(node)
            if node.target in self.sd_keys and shape is not None:
                return _P(str(node.target), shape)
            return None
        if op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if op == "call_function":
            if isinstance(node.target, torch._ops.OpOverload):
                return self.visit_aten(node, node.target)
            return self.visit_function(node, node.target)
        if op == "call_method":
            return self.visit_method(node, node.target)
        raise _Fix(f"unknown node kind {op}")

    def visit_module(self, node: fx.Node, mod: nn.Module) -> Any:
        """A module call: the user's registered rule for its type first, else the first entry of
        BUILTIN_MODULE_RULES whose types match (one table, as FUNCTION_RULES for functions); else pinned
        with a reason."""
        rule = _user_rule(mod)
        if rule is not None:
            return self.visit_leaf(node, node.target, rule)
        if any(isinstance(lay, _HLay) for lay in self.all_lays((node.args, node.kwargs))):
            if isinstance(mod, (nn.Dropout, nn.Identity, nn.Softmax)):
                return self.lay(node.args[0])
            raise _Fix(f"{type(mod).__name__} on per-head tensors")
        x = node.args[0] if node.args else None
        call = _ModuleCall(node, mod, node.target, x, self.lay(x), _shape(x), _shape(node))
        for types, visit in BUILTIN_MODULE_RULES:
            if isinstance(mod, types):
                return visit(self, call)
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
            self.b.mark(self.b.attention, qk, vo)
        so = _shape(node)
        nd = len(so[0]) if so and isinstance(so[0], (tuple, list)) else len(_shape(ins[0]))
        out = self.fresh(e, f"{name}.out_proj", nd - 1, [(f"{name}.out_proj.weight", 0), (f"{name}.out_proj.bias", 0)])
        return (out, None)

    def visit_function(self, node: fx.Node, fn: Any) -> Any:
        rule = FUNCTION_RULES.get(fn)
        return self.apply_rule(node, rule, getattr(fn, "__name__", str(fn)))

    def visit_method(self, node: fx.Node, name: str) -> Any:
        return self.apply_rule(node, METHOD_RULES.get(name), f".{name}()")

    def visit_aten(self, node: fx.Node, op: Any) -> Any:
        name = op._schema.name.split("::")[-1]
        rule = ATEN_RULES.get(f"{name}.{op._overloadname}", ATEN_RULES.get(name))
        return self.apply_rule(node, rule, f"aten.{name}")

    def apply_rule(self, node: fx.Node, rule: Any, what: str) -> Any:
        if rule is _SHAPE_ONLY:
            return _SHAPE_ONLY
        if all(self.env.get(n) is None for n in node.all_input_nodes):
            return None  # nothing permuted flows in (masks, positions, constants)
        if rule is None:
            raise _Fix(f"unsupported function {what}")
        kind, fn = rule
        if kind == "plain":
            for v in (self.env.get(n) for n in node.all_input_nodes):
                if isinstance(v, _HLay):
                    raise _Fix(f"{what} on per-head tensors")
                if isinstance(v, _Fused):
                    raise _Fix(f"{what} on a fused projection split over a new axis")
        return fn(self, node)

    # -- layout rules --
    def binary(self, node: fx.Node) -> Any:
        so = _shape(node)
        if so is None:
            return None
        tensor_args = [a for a in list(node.args) + list(node.kwargs.values())
                       if isinstance(a, fx.Node) and _shape(a) is not None]
        if any(isinstance(self.lay(a), _Fused) for a in tensor_args):
            raise _Fix("elementwise op on a fused projection split over a new axis")
        hl = [(a, self.lay(a)) for a in tensor_args if isinstance(self.lay(a), _HLay)]
        if hl:
            return self.binary_heads(node, tensor_args, hl)
        lays, plain, computed = [], [], set()
        for a in list(node.args) + list(node.kwargs.values()):
            if not isinstance(a, fx.Node):
                continue
            lay, sa = self.lay(a), _shape(a)
            if lay is not None:
                lays.append(_Lay(lay.axis + len(so) - len(sa), lay.segs))
                if not isinstance(self.env.get(a), _P):  # a parameter added (a bias, positions) is no branch
                    computed.add(tuple(self.b.find(g) for g, _, _ in lay.segs))
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
        out = self.merge(lays)
        if len(computed) > 1 and _is_sum(node):  # branches summed (a residual connection): a stream
            self.b.mark(self.b.summed, *(g for g, _, _ in out.segs))
        return out

    def binary_heads(self, node: fx.Node, tensor_args: list, hl: list) -> _HLay:
        """Per-head tensors with scalars, or with tensors constant across heads and units (a causal or
        padding mask broadcast over heads); anything varying per head (ALiBi) is not understood."""
        so = _shape(node)
        a0, h0 = hl[0]
        sh = len(so) - len(_shape(a0))
        out = _HLay(h0.head_axis + sh, None if h0.unit_axis is None else h0.unit_axis + sh, h0.gid, h0.rep)
        for a in tensor_args:
            lay, sa = self.lay(a), _shape(a)
            d = len(so) - len(sa)
            if isinstance(lay, _HLay):
                if (lay.head_axis + d, None if lay.unit_axis is None else lay.unit_axis + d, lay.rep) != (
                        out.head_axis, out.unit_axis, out.rep):
                    raise _Fix("elementwise op between differently laid out per-head tensors")
                self.b.union(lay.gid, out.gid)
            else:
                if lay is not None:  # units of its own (a causal-mask buffer, a learned bias): pinned,
                    if isinstance(lay, _Fused):  # then read as a constant
                        raise _Fix("elementwise op between per-head tensors and a fused projection")
                    self.fix_value(lay, "combined with per-head tensors as a constant")
                if out.head_axis - d >= 0 and sa[out.head_axis - d] != 1:
                    raise _Fix("elementwise op on per-head tensors with a tensor that differs across heads")
                if out.unit_axis is not None and out.unit_axis - d >= 0 and sa[out.unit_axis - d] != 1:
                    self.units_fixed(out.gid)  # the same per-unit factor in every head (rotary cos/sin)
        return out

    def cat_heads(self, lays: list, dim: int) -> _HLay:
        """Per-head tensors laid out alike, concatenated along another axis, or along the units (rotary
        rotate_half: cat(-x2, x1)): one group, and in the second case its units stay in place."""
        first = lays[0]
        if not all(isinstance(lay, _HLay) and (lay.head_axis, lay.unit_axis, lay.rep) == (
                first.head_axis, first.unit_axis, first.rep) for lay in lays):
            raise _Fix("concatenation of per-head and other tensors")
        if dim == first.head_axis:
            raise _Fix("concatenation of per-head tensors across heads")
        for lay in lays[1:]:
            self.b.union(first.gid, lay.gid)
        if dim == first.unit_axis:
            self.units_fixed(first.gid)
        return first

    def index_heads(self, lay: _HLay, idx: Any, nd: int) -> _HLay:
        """Slices of per-head tensors (None inserts an axis): full over the heads; a slice of the units
        (rotary x[..., :d/2]) keeps whole heads permutable but fixes the units within them."""
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(e is Ellipsis for e in idx) > 1 or not all(isinstance(e, slice) or e is None or e is Ellipsis
                                                          for e in idx):
            raise _Fix("indexing per-head tensors")
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx[k:k + 1] = [slice(None)] * (nd - sum(e is not None and e is not Ellipsis for e in idx))
        pos: dict[int, int] = {}
        i_in = i_out = 0
        for e in idx:
            if e is None:
                i_out += 1
                continue
            # bounds computed at run time are fine off the head axis: any slice of a head's units
            # treats every head alike
            if e != slice(None) and i_in == lay.head_axis:
                raise _Fix("indexing some heads of per-head tensors")
            if e != slice(None) and i_in == lay.unit_axis:
                self.units_fixed(lay.gid)
            pos[i_in] = i_out
            i_in, i_out = i_in + 1, i_out + 1
        for i in range(i_in, nd):
            pos[i] = i_out + i - i_in
        return _HLay(pos[lay.head_axis], None if lay.unit_axis is None else pos[lay.unit_axis], lay.gid, lay.rep)

    def units_fixed(self, gid: int) -> None:
        """Something treats each unit within a head by its position (rotary embeddings): the group may
        still move whole heads (every head is treated alike), never units within a head."""
        self.b.head_only[self.b.find(gid)] = True

    def cat(self, node: fx.Node, parts: list, dim: int) -> Any:
        so = _shape(node)
        dim = dim % len(so)
        # empty pieces (an empty key/value cache) add nothing
        parts = [p for p in parts if not (_shape(p) is not None and math.prod(_shape(p)) == 0)]
        lays = [self.lay(p) for p in parts]
        if all(lay is None for lay in lays):
            return None
        if any(isinstance(lay, _HLay) for lay in lays):
            return self.cat_heads(lays, dim)
        if any(lay is not None and not isinstance(lay, _Lay) for lay in lays):
            raise _Fix("concatenation of per-head tensors")
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
        if tuple(si) == tuple(so):  # a reshape to the same shape moves nothing
            return lay
        if isinstance(lay, _Fused):
            raise _Fix("reshape of a fused projection split over a new axis")
        if isinstance(lay, _HLay):
            rep = self.repeat_heads(lay, si, so)
            return rep if rep is not None else self.merge_heads(lay, si, so)
        try:
            out = self.reshape_plain(lay, si, so)
            if (len(so) == len(si) + 1 and out.axis == len(so) - 1 and so[-2] == 1 and len(lay.segs) == 1
                    and lay.segs[0][2] == 1):  # (B, T, d) -> (B, T, 1, d): a single attention head
                return self.split_heads(lay, si, so) or out
            return out
        except _Fix:
            if len(lay.segs) == 1 and lay.segs[0][2] == 1:
                split = self.split_heads(lay, si, so)
                if split is None:
                    split = self.split_parts(lay, si, so)
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
        while b < len(so) and so[b] == 1 and c != 1:  # (C,) -> (1, C, 1, 1): size-1 axes around it
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

    def repeat_heads(self, lay: _HLay, si: tuple, so: tuple) -> "_HLay | None":
        """(.., Hkv, r, .., d) -> (.., Hkv * r, .., d): key/value heads repeated for grouped-query
        attention (repeat_kv); output head i comes from input head i // r."""
        h, u = lay.head_axis, lay.unit_axis
        if u is None or u <= h + 1 or len(so) != len(si) - 1:
            return None
        if so[:h] != si[:h] or so[h] != si[h] * si[h + 1] or so[h + 1:] != si[h + 2:]:
            return None
        return _HLay(h, u - 1, lay.gid, lay.rep * si[h + 1])

    def merge_heads(self, lay: _HLay, si: tuple, so: tuple) -> _Lay:
        """(.., H, dh, ..) -> (.., H*dh, ..): heads merged back into one feature axis."""
        h, u = lay.head_axis, lay.unit_axis
        if u != h + 1 or lay.rep != 1:
            raise _Fix("reshape of per-head tensors other than merging heads back")
        n = si[h] * si[u]
        size = self.b.n[self.b.find(lay.gid)]  # a grouped-query group counts key/value heads, not units
        if n % size:
            raise _Fix("merging heads of a group of another size")
        pre, post = math.prod(si[:h]), math.prod(si[u + 1:])
        for b in range(len(so)):
            if math.prod(so[:b]) == pre and so[b] == n and math.prod(so[b + 1:]) == post:
                return _Lay(b, ((lay.gid, size, n // size),))
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
        if lx.rep != 1 or ly.rep != 1:
            raise _Fix("matrix product of repeated (grouped-query) heads")
        nx, ny, no = len(_shape(x)), len(_shape(y)), len(_shape(node))
        hx, hy = lx.head_axis - nx, ly.head_axis - ny  # batch axes, counted from the end
        if hx != hy or hx > -3:
            raise _Fix("matrix product across heads")
        if lx.unit_axis == nx - 1 and ly.unit_axis == ny - 2:  # q @ k^T
            g = self.b.union(lx.gid, ly.gid)
            self.b.mark(self.b.attention, g)
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

        return self.moved(lay, mv)

    def permute(self, node, x, dims) -> Any:
        lay = self.lay(x)
        if lay is None:
            return None
        nd = len(_shape(x))
        dims = [d % nd for d in dims]
        return self.moved(lay, lambda a: a if a is None else dims.index(a))

    def moved(self, lay: Any, mv: Any) -> Any:
        """A layout after its axes are renumbered by mv (transpose, permute)."""
        if isinstance(lay, _HLay):
            return _HLay(mv(lay.head_axis), mv(lay.unit_axis), lay.gid, lay.rep)
        if isinstance(lay, _Fused):
            return _Fused(mv(lay.axis), tuple(self.moved(p, mv) for p in lay.parts))
        return _Lay(mv(lay.axis), lay.segs)

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
        if isinstance(lay, _Fused):
            return self.index_fused(node, lay, idx, len(_shape(x)))
        nd = len(_shape(x))
        if isinstance(lay, _HLay):
            return self.index_heads(lay, idx, nd)
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
                    raise _Fix("model output (a slice of it)" if _only_output(node) else "indexing into the feature axis")
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

    # -- fused projections, heads and functional layers --
    def index_fused(self, node: fx.Node, lay: _Fused, idx: Any, nd: int) -> Any:
        """qkv[0] / qkv[:, :, 1]: an integer index on the parts axis, full slices elsewhere."""
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        if Ellipsis in idx or None in idx or len(idx) > lay.axis + 1:
            raise _Fix("indexing a fused projection other than by part")
        if any(e != slice(None) for e in idx[:lay.axis]) or len(idx) != lay.axis + 1 or not isinstance(idx[-1], int):
            raise _Fix("indexing a fused projection other than by part")
        return self.drop_axis(lay.parts[idx[-1]], lay.axis)

    def drop_axis(self, lay: Any, ax: int) -> Any:
        """A layout after axis `ax` is removed (selected away)."""
        def mv(a):
            return a if a is None or a < ax else a - 1

        return self.moved(lay, mv)

    def split_parts(self, lay: _Lay, si: tuple, so: tuple) -> "_Fused | None":
        """(.., P*n, ..) -> (.., P, n, ..) or (.., P, H, d, ..): a fused projection (q/k/v) split into
        P parts over a new axis, each part (and its heads) a group of its own."""
        if len(lay.segs) != 1 or lay.segs[0][2] != 1:
            return None
        a = lay.axis
        gid, n, _ = lay.segs[0]
        pre, post = math.prod(si[:a]), math.prod(si[a + 1:])
        for b in range(len(so) - 1):
            p = so[b]
            if math.prod(so[:b]) != pre or p < 2 or n % p:
                continue
            for width in (1, 2):  # the rest of a part: one axis (units) or two (heads, units)
                inner = so[b + 1:b + 1 + width]
                if len(inner) == width and math.prod(inner) == n // p and math.prod(so[b + 1 + width:]) == post:
                    subs = self.b.split(gid, [n // p] * p)
                    if subs is None:
                        return None
                    if width == 1:
                        parts = tuple(_Lay(b + 1, ((g, n // p, 1),)) for g in subs)
                    else:
                        for g in subs:
                            self.b.set_heads(g, inner[0])
                        parts = tuple(_HLay(b + 1, b + 2, g) for g in subs)
                    return _Fused(b, parts)
        return None

    def split(self, node: fx.Node, x: Any, sizes: Any, dim: int) -> Any:
        """torch.split / chunk: along the feature axis a fused projection's output is cut into groups
        of their own (q, k, v); along any other axis every piece keeps the layout."""
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        dim %= len(si)
        length = si[dim]
        if isinstance(sizes, int):
            sizes = [sizes] * (length // sizes) + ([length % sizes] if length % sizes else [])
        sizes = list(sizes)
        if isinstance(lay, _HLay):
            if dim in (lay.head_axis, lay.unit_axis):
                raise _Fix("splitting per-head tensors across heads or units")
            return tuple(lay for _ in sizes)
        if isinstance(lay, _Fused):
            raise _Fix("splitting a fused projection split over a new axis")
        if dim != lay.axis:
            return tuple(lay for _ in sizes)
        segs = list(lay.segs)
        out, cur, want = [], [], list(sizes)
        while segs:
            g, n, blk = segs.pop(0)
            need = want[0] - sum(m * bb for _, m, bb in cur)
            if n * blk <= need:
                cur.append((g, n, blk))
            elif blk == 1 and len(segs) == 0 and len(cur) == 0 and sum(want) == n:
                subs = self.b.split(g, want)
                if subs is None:
                    raise _Fix("splitting a feature axis whose units are tied to other tensors")
                return tuple(_Lay(dim, ((sg, w, 1),)) for sg, w in zip(subs, want))
            else:
                raise _Fix("split of the feature axis across a group")
            if sum(m * bb for _, m, bb in cur) == want[0]:
                out.append(_Lay(dim, tuple(cur)))
                cur, want = [], want[1:]
        if want or cur:
            raise _Fix("split of the feature axis across a group")
        return tuple(out)

    def unbind(self, node: fx.Node, x: Any, dim: int) -> Any:
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        dim %= len(si)
        if isinstance(lay, _Fused):
            if dim != lay.axis:
                raise _Fix("unbinding a fused projection other than by part")
            return tuple(self.drop_axis(p, dim) for p in lay.parts)
        if isinstance(lay, _HLay):
            if dim in (lay.head_axis, lay.unit_axis):
                raise _Fix("unbinding per-head tensors across heads or units")
            return tuple(self.drop_axis(lay, dim) for _ in range(si[dim]))
        if dim == lay.axis:
            raise _Fix("unbinding the feature axis")
        return tuple(self.drop_axis(lay, dim) for _ in range(si[dim]))

    def narrow(self, node: fx.Node, x: Any, dim: int, full: bool) -> Any:
        """x[.., a:b, ..] along `dim` (full: the whole axis); select=True drops the axis."""
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        dim %= len(si)
        if isinstance(lay, _HLay) and dim == lay.unit_axis and not full:  # x[..., :d/2] (rotary)
            self.units_fixed(lay.gid)
            return lay
        axes = (lay.head_axis, lay.unit_axis) if isinstance(lay, _HLay) else (lay.axis,)
        if dim in axes and not full and _only_output(node):
            raise _Fix("model output (a slice of it)")
        if dim in axes and not full:
            raise _Fix("slicing into the feature axis (or heads, or a head's units)")
        if isinstance(lay, _Fused) and dim != lay.axis:
            raise _Fix("slicing a fused projection")
        return lay

    def select(self, node: fx.Node, x: Any, dim: int, index: int) -> Any:
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        dim %= len(si)
        if isinstance(lay, _Fused):
            if dim != lay.axis:
                raise _Fix("selecting from a fused projection other than by part")
            return self.drop_axis(lay.parts[index], dim)
        if dim in ((lay.head_axis, lay.unit_axis) if isinstance(lay, _HLay) else (lay.axis,)):
            raise _Fix("selecting a single unit or head")
        return self.drop_axis(lay, dim)

    def stack(self, node: fx.Node, parts: list, dim: int) -> Any:
        so = _shape(node)
        dim %= len(so)
        lays = [self.lay(p) for p in parts]
        if all(lay is None for lay in lays):
            return None
        if any(not isinstance(lay, _Lay) for lay in lays):
            raise _Fix("stacking permuted and unpermuted tensors")
        merged = self.merge(lays)
        return _Lay(merged.axis + (dim <= merged.axis), merged.segs)

    def linear(self, node: fx.Node, x: Any, w: str | None, b: str | None, out_features: int, label: str) -> _Lay:
        """y = x W^T + b: x's units index W's columns, the outputs are a new group (W's rows, b)."""
        lay, si, so = self.lay(x), _shape(x), _shape(node)
        if lay is not None:
            if not isinstance(lay, _Lay):
                raise _Fix("a linear layer on per-head tensors")
            if lay.axis != len(si) - 1:  # applied over another axis (token mixing): units ride along
                if w:
                    self.pin_axis(w, 0, "a linear layer over an axis other than the features (token "
                                        "mixing): its units are on an axis the spec does not follow")
                return lay
            if w:
                self.add_members(lay, [(w, 1)], need_block1=False)
        return self.fresh(out_features, label, len(so) - 1, [(w, 0), (b, 0)] if b else [(w, 0)])

    def pin_axis(self, tensor: str, axis: int, reason: str) -> None:
        if tensor in self.sd_keys:
            g = self.b.new(0, tensor, reason)
            self.b.add(g, Member(tensor, axis))

    def norm_last(self, node: fx.Node, x: Any, k: int, params: list) -> Any:
        """LayerNorm / RMSNorm over the last k axes, affine parameters shaped like them."""
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        if not isinstance(lay, _Lay):
            raise _Fix("normalisation of per-head tensors")
        if lay.axis < len(si) - k:  # normalised over other axes: the feature axis rides along
            return lay
        if k != 1:
            raise _Fix("normalisation over several axes including the feature axis")
        self.add_members(lay, [(p, 0) for p in params if p])
        return lay

    def channel_op(self, node: fx.Node, x: Any, params: list, what: str, min_rank: int = 2) -> Any:
        """Per-channel ops on axis 1 (BatchNorm, pooling, upsampling): parameters indexed by channel."""
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        if not isinstance(lay, _Lay) or lay.axis != 1 or len(si) < min_rank:
            raise _Fix(f"{what} over a non-channel axis")
        self.add_members(lay, [(p, 0) for p in params if p])
        return lay

    def group_norm(self, node: fx.Node, x: Any, groups: int, params: list) -> Any:
        lay = self.channel_op(node, x, [], "GroupNorm")
        if lay is None:
            return None
        if groups not in (1, _shape(x)[1]):
            if len(lay.segs) != 1:
                raise _Fix(f"GroupNorm with {groups} groups over concatenated channels")
            self.b.set_heads(lay.segs[0][0], groups)
        self.add_members(lay, [(p, 0) for p in params if p])
        return lay

    def conv(self, node: fx.Node, x: Any, w: str | None, b: str | None, groups: int, transposed: bool) -> Any:
        lay, so = self.lay(x), _shape(node)
        if not isinstance(self.env.get(node.args[1]), _P):
            raise _Fix("a convolution whose weight is computed")
        if lay is not None and (not isinstance(lay, _Lay) or lay.axis != 1 or any(sg[2] != 1 for sg in lay.segs)):
            raise _Fix("convolution over a non-channel axis")
        out_ch = so[1]
        if groups == 1:
            if lay is not None and w:
                self.add_members(lay, [(w, 0 if transposed else 1)])
            return self.fresh(out_ch, w.removesuffix(".weight") if w else "conv", 1,
                              [(w, 1 if transposed else 0)] + ([(b, 0)] if b else []))
        if not transposed and groups == _shape(x)[1] == out_ch:  # depthwise: a per-channel op
            if lay is None:
                return None
            self.add_members(lay, [(w, 0)] + ([(b, 0)] if b else []))
            return lay
        raise _Fix(f"grouped convolution (groups={groups}) ties channels to groups")

    def pad(self, node: fx.Node, x: Any, pad: Any) -> Any:
        lay, si = self.lay(x), _shape(x)
        if lay is None:
            return None
        padded = {len(si) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
        axes = {lay.head_axis, lay.unit_axis} if isinstance(lay, _HLay) else {lay.axis}
        if padded & axes or isinstance(lay, _Fused):
            raise _Fix("padding the feature axis")
        return lay

    def sdpa(self, node: fx.Node, q: Any, k: Any, v: Any, mask: Any, gqa: bool) -> Any:
        """softmax(q k^T / sqrt(d) + mask) v, heads on axis -3 and units last: q and k share a group
        (units within a head permute jointly), v's group shares the head permutation (coupled)."""
        lq, lk, lv = self.lay(q), self.lay(k), self.lay(v)
        if mask is not None and self.lay(mask) is not None:
            raise _Fix("attention with a mask that carries permuted units")
        ms = _shape(mask) if mask is not None else None
        if ms is not None and len(ms) >= 3 and ms[-3] != 1:  # a bias per head (ALiBi): heads are not alike
            raise _Fix("attention with a mask or bias that differs across heads")
        if not all(isinstance(lay, _HLay) for lay in (lq, lk, lv)):
            raise _Fix("attention over tensors not split into heads")
        nq, nk, nv = len(_shape(q)), len(_shape(k)), len(_shape(v))
        for lay, nd in ((lq, nq), (lk, nk), (lv, nv)):
            if lay.head_axis != nd - 3 or lay.unit_axis != nd - 1:
                raise _Fix("attention whose heads are not on axis -3 or units not last")
        hq, hk, hv = _shape(q)[-3], _shape(k)[-3] * (1 if lk.rep > 1 else 1), _shape(v)[-3]
        if lq.rep != 1 or lk.rep != lv.rep or hk != hv:
            raise _Fix("attention with repeated query heads or unequal key/value heads")
        if lk.rep > 1 or hk != hq:  # grouped-query: key/value heads shared by consecutive query heads
            return self.grouped_query(node, lq, lk, lv, hq, hk // lk.rep if lk.rep > 1 else hk, gqa or lk.rep > 1)
        g = self.b.union(lq.gid, lk.gid)
        self.b.set_couple(g, lv.gid)
        no = len(_shape(node))
        return _HLay(no - 3, no - 1, lv.gid)

    def grouped_query(self, node: fx.Node, lq: _HLay, lk: _HLay, lv: _HLay, hq: int, hkv: int, ok: bool) -> _HLay:
        """Grouped-query attention: query head i uses key/value head i // (hq / hkv). What stays exact:
        permuting the key/value heads, the blocks of query heads sharing each (and the output
        projection's matching columns) with them; units within heads stay in place. One group of
        hkv units whose members are those blocks."""
        if not ok or hkv < 1 or hq % hkv:
            raise _Fix("attention with fewer key/value heads than query heads, not grouped by enable_gqa or repeats")
        coarse = [self.b.coarsen(lay.gid, hkv) for lay in (lq, lk, lv)]
        if any(c is None for c in coarse):
            raise _Fix("grouped-query attention over projections tied to other tensors")
        g = self.b.union(self.b.union(coarse[0], coarse[1]), coarse[2])
        self.b.mark(self.b.attention, g)
        no = len(_shape(node))
        return _HLay(no - 3, no - 1, g)

    def addmm(self, node: fx.Node, bias: Any, x: Any, w: Any) -> Any:
        """bias + x @ W with W a (in, out) parameter (GPT-2's Conv1D)."""
        wn = self.pname(w)
        if not wn:
            raise _Fix("a matrix product with a computed or constant matrix")
        bn = self.pname(bias)
        lay = self.lay(x)
        if lay is not None:
            if not isinstance(lay, _Lay) or lay.axis != len(_shape(x)) - 1:
                raise _Fix("a matrix product over a non-feature axis")
            self.add_members(lay, [(wn, 0)], need_block1=False)
        return self.fresh(_shape(node)[-1], wn.removesuffix(".weight"), len(_shape(node)) - 1,
                          [(wn, 1)] + ([(bn, 0)] if bn else []))

    # -- result --
    def spec(self, model: nn.Module, sd: dict, trace_error: str | None = None, capture: str = "fx",
             capture_error: str | None = None) -> PermutationSpec:
        """The finished spec: tied and shared tensors merged into one group, groups named, attention halves
        coupled, and every pinned axis listed with its reason."""
        params = {n for n, _ in model.named_parameters()}
        pinned = {a: why for t, why in self.pinned.items() for a in self.aliases.get(t, [t])}
        self._merge_shared(pinned)
        groups, unperm = self._named_groups()
        self._couple_heads(groups, unperm)
        unperm += self._pinned_elsewhere(pinned, groups, unperm, sd)
        if trace_error:
            unperm.append(Unpermuted("whole model", trace_error))
        return PermutationSpec(groups, unperm, {k: list(v.shape) for k, v in sd.items()},
                               [k for k in sd if k in params], capture, capture_error or trace_error)

    def _merge_shared(self, pinned: dict[str, str]) -> None:
        """Tied tensors: every name of one tensor is permuted alike; a group touching a pinned tensor is
        pinned; a tensor axis slice owned by two groups makes them one group (shared weights)."""
        b = self.b
        roots = list(dict.fromkeys(b.find(g) for g in range(len(b.parent))))  # in trace order: names stay stable
        for r in roots:
            b.members[r] = list(dict.fromkeys(Member(a, m.axis, m.offset, m.block) for m in b.members[r]
                                              for a in self.aliases.get(m.tensor, [m.tensor])))
            for m in b.members[r]:
                if m.tensor in pinned:
                    b.fix(r, f"{m.tensor} is read by an op not understood: {pinned[m.tensor]}")
        owner: dict[tuple[str, int, int], int] = {}
        for r in roots:
            for m in b.members[b.find(r)]:
                key = (m.tensor, m.axis, m.offset)
                if key in owner and b.find(owner[key]) != b.find(r):
                    b.union(owner[key], r)
                owner[key] = b.find(r)

    def _named_groups(self) -> tuple[dict[str, Group], list[Unpermuted]]:
        """One named Group per permutable root; roots with a reason (or rotary units outside heads) listed
        as unpermuted; single units dropped (nothing to permute)."""
        b = self.b
        groups: dict[str, Group] = {}
        unperm: list[Unpermuted] = []
        for r in dict.fromkeys(b.find(g) for g in range(len(b.parent))):
            members = list(dict.fromkeys(b.members[r]))
            if not members:
                continue
            what = ", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in members))
            axes = [[m.tensor, m.axis, m.offset, b.n[r] * m.block] for m in members]
            if b.reasons[r]:
                unperm.append(Unpermuted(what, "; ".join(dict.fromkeys(b.reasons[r])), axes))
                continue
            if b.head_only[r] and not b.heads[r]:
                unperm.append(Unpermuted(what, "units tied to their positions (rotary embedding) outside "
                                               "attention heads", axes))
                continue
            if b.n[r] < 2:
                continue
            name = b.label[r]
            while name in groups:
                name += "'"
            groups[name] = Group(name, b.n[r], members, list(dict.fromkeys(b.probes[r])), b.heads[r],
                                 head_only=b.head_only[r] and b.heads[r] > 0, role=b.role(r))
            b.label[r] = name
        return groups, unperm

    def _couple_heads(self, groups: dict[str, Group], unperm: list[Unpermuted]) -> None:
        """Attention: couple each q/k group with its v/o group by name; a group whose partner is pinned is
        pinned too (they share the head permutation)."""
        b = self.b
        for g in range(len(b.parent)):
            r = b.find(g)
            c = b.couple[r]
            if c is not None and b.label[r] in groups:
                other = b.label[b.find(c)]
                if other in groups:
                    groups[b.label[r]].couple = other
                else:
                    gr = groups.pop(b.label[r])
                    unperm.append(Unpermuted(", ".join(f"{m.tensor}[{m.axis}]" for m in gr.members),
                                             "its attention heads' partner group is unpermutable",
                                             [[m.tensor, m.axis, m.offset, gr.size * m.block] for m in gr.members]))

    @staticmethod
    def _pinned_elsewhere(pinned: dict[str, str], groups: dict[str, Group], unperm: list[Unpermuted],
                          sd: dict) -> list[Unpermuted]:
        """Tensors read by an op not understood that are in no group and not yet listed: still said."""
        listed = {(t, ax) for u in unperm for t, ax, *_ in u.axes} | {
            (m.tensor, m.axis) for g in groups.values() for m in g.members}
        out = []
        for t, why in pinned.items():
            shape = sd[t].shape if t in sd else ()
            axes = [[t, ax, 0, shape[ax]] for ax in range(min(len(shape), 2)) if (t, ax) not in listed]
            if axes:
                out.append(Unpermuted(", ".join(f"{t}[{a[1]}]" for a in axes), why, axes))
        return out


# ---------------------------------------------------------------------------------------------
# the rule registry: what each function, tensor method and ATen op (torch.export graphs) does to
# the layouts of its arguments. A rule is (kind, fn(tracer, node) -> layout): kind "plain" rules see
# only plain layouts (per-head or fused ones are pinned before they run), "any" rules handle all.

_EMBEDDING_ROWS = "model input: an embedding's rows are looked up by token id"


def _is_sum(node: fx.Node) -> bool:
    """x + y, x - y, in place or not, as a function, method or ATen op."""
    t = node.target
    name = t._schema.name.split("::")[-1] if isinstance(t, torch._ops.OpOverload) else (
        t if isinstance(t, str) else getattr(t, "__name__", ""))
    return name.rstrip("_") in ("add", "sub", "iadd", "isub")


def _only_output(node: fx.Node) -> bool:
    """node's value goes straight to the model's output (a slice of logits: pinned as output anyway)."""
    return bool(node.users) and all(u.op == "output" for u in node.users)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dim_list(d: Any) -> Any:
    return d if d is None or isinstance(d, (tuple, list)) else [d]


def _unary(t, node):
    """Elementwise on one tensor; another tensor among the arguments (clamp bounds, a tensor exponent)
    makes it a binary op, with its broadcasting rules."""
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node) and
              _shape(a) is not None]
    return t.binary(node) if others else t.lay(node.args[0])


def _binary(t, node):
    return t.binary(node)


def _reshape(t, node):
    return t.reshape(t.lay(node.args[0]), _shape(node.args[0]), _shape(node))


def _transpose(t, node):
    x = node.args[0]
    if len(node.args) < 3 and len(_shape(x) or ()) == 2:  # .t()
        return t.transpose(node, x, 0, 1)
    return t.transpose(node, x, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))


def _permute(t, node):
    a = node.args
    dims = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:] or node.kwargs.get("dims")
    return t.permute(node, a[0], dims)


def _reduce(t, node):
    dim = _arg(node, 1, "dim")
    if isinstance(dim, fx.Node) or dim is not None and not isinstance(dim, (int, tuple, list)):
        raise _Fix("a reduction over axes computed at run time")
    keepdim = len(_shape(node) or ()) == len(_shape(node.args[0]) or ())  # read off the shapes: positions vary
    lay = t.lay(node.args[0])
    if isinstance(lay, (_HLay, _Fused)):
        raise _Fix("reduction of per-head tensors")
    return t.reduce(node, node.args[0], _dim_list(dim), keepdim)


def _cat(t, node):
    return t.cat(node, list(node.args[0]), _arg(node, 1, "dim", 0))


def _stack(t, node):
    return t.stack(node, list(node.args[0]), _arg(node, 1, "dim", 0))


def _unsqueeze(t, node):
    if isinstance(t.lay(node.args[0]), _Fused):
        raise _Fix("unsqueeze of a fused projection")
    if isinstance(t.lay(node.args[0]), _HLay):
        lay, nd = t.lay(node.args[0]), len(_shape(node))
        d = _arg(node, 1, "dim") % nd
        return t.moved(lay, lambda a: a if a is None or a < d else a + 1)
    return t.unsqueeze(node, node.args[0], _arg(node, 1, "dim"))


def _squeeze(t, node):
    lay, si, so = t.lay(node.args[0]), _shape(node.args[0]), _shape(node)
    if lay is None:
        return None
    gone = [i for i in range(len(si)) if si[i] == 1] if len(si) != len(so) else []
    dims = _dim_list(_arg(node, 1, "dim"))
    if dims is not None:
        gone = [d % len(si) for d in dims if si[d % len(si)] == 1]
    out = lay
    for d in sorted(gone, reverse=True):
        out = t.drop_axis(out, d) if not isinstance(out, _Fused) else None
        if out is None:
            raise _Fix("squeeze of a fused projection")
    return out


def _expand(t, node):
    lay, si, so = t.lay(node.args[0]), _shape(node.args[0]), _shape(node)
    if lay is None:
        return None
    d = len(so) - len(si)
    moved = t.moved(lay, lambda a: a if a is None else a + d)
    axes = (moved.head_axis, moved.unit_axis) if isinstance(moved, _HLay) else (moved.axis,)
    if any(a is not None and so[a] != si[a - d] for a in axes):
        raise _Fix("expand along the feature axis")
    return moved


def _getitem(t, node):
    return t.getitem(node)


def _split(t, node):
    return t.split(node, node.args[0], _arg(node, 1, "split_size_or_sections", _arg(node, 1, "split_size")),
                   _arg(node, 2, "dim", 0))


def _chunk(t, node):
    x, n = node.args[0], _arg(node, 1, "chunks")
    length = _shape(x)[_arg(node, 2, "dim", 0)]
    size = -(-length // n)
    return t.split(node, x, size, _arg(node, 2, "dim", 0))


def _unbind(t, node):
    return t.unbind(node, node.args[0], _arg(node, 1, "dim", 0))


def _slice(t, node):  # aten.slice.Tensor(x, dim, start, end, step)
    x = node.args[0]
    dim = _arg(node, 1, "dim", 0) % len(_shape(x))
    full = _shape(node)[dim] == _shape(x)[dim]
    return t.narrow(node, x, dim, full)


def _narrow(t, node):  # torch.narrow(x, dim, start, length)
    x = node.args[0]
    dim = _arg(node, 1, "dim") % len(_shape(x))
    return t.narrow(node, x, dim, _shape(node)[dim] == _shape(x)[dim])


def _select(t, node):
    return t.select(node, node.args[0], _arg(node, 1, "dim"), _arg(node, 2, "index"))


def _matmul(t, node):
    x, y = node.args[:2]
    if isinstance(t.env.get(y), _P) and len(t.env[y].shape) == 2 and not isinstance(t.lay(x), _HLay):  # x @ W
        return t.addmm(node, None, x, y)
    return t.matmul(node)


def _addmm(t, node):
    return t.addmm(node, node.args[0], node.args[1], node.args[2])


def _linear(t, node):
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    wn, bn = t.pname(w), t.pname(b)
    return t.linear(node, node.args[0], wn, bn, _shape(w)[0], (wn or "linear").removesuffix(".weight"))


def _embedding(t, node, aten=False):
    w = node.args[0] if aten else _arg(node, 1, "weight")
    wn = t.pname(w)
    if not wn:
        raise _Fix("an embedding whose table is computed")
    ids = node.args[1] if aten else node.args[0]
    if t.lay(ids) is not None:
        raise _Fix("embedding lookup by permuted values")
    so = _shape(node)
    t.pin_axis(wn, 0, _EMBEDDING_ROWS)
    return t.fresh(so[-1], wn.removesuffix(".weight"), len(so) - 1, [(wn, 1)])


def _layer_norm(t, node):
    shape = _arg(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    return t.norm_last(node, node.args[0], k, [t.pname(_arg(node, 2, "weight")), t.pname(_arg(node, 3, "bias"))])


def _rms_norm(t, node):
    shape = _arg(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    return t.norm_last(node, node.args[0], k, [t.pname(_arg(node, 2, "weight"))])


def _native_layer_norm(t, node):
    return (_layer_norm(t, node), None, None)


def _group_norm(t, node):
    return t.group_norm(node, node.args[0], _arg(node, 1, "num_groups"),
                        [t.pname(_arg(node, 2, "weight")), t.pname(_arg(node, 3, "bias"))])


def _batch_norm_f(t, node):  # F.batch_norm(x, running_mean, running_var, weight, bias, ...)
    names = [t.pname(_arg(node, i, k))
             for i, k in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    return t.channel_op(node, node.args[0], names, "BatchNorm")


def _batch_norm_aten(t, node):  # aten.batch_norm(x, weight, bias, running_mean, running_var, ...)
    names = [t.pname(a) for a in node.args[1:5]]
    return t.channel_op(node, node.args[0], names, "BatchNorm")


def _batch_norm_aten_tuple(t, node):
    return (_batch_norm_aten(t, node), None, None)


def _conv_f(t, node):  # F.conv2d(x, w, b, stride, padding, dilation, groups) and aten.conv2d
    return t.conv(node, node.args[0], t.pname(node.args[1]), t.pname(_arg(node, 2, "bias")),
                  _arg(node, 6, "groups", 1), False)


def _conv_transpose_f(t, node):  # (x, w, b, stride, padding, output_padding, groups, dilation)
    return t.conv(node, node.args[0], t.pname(node.args[1]), t.pname(_arg(node, 2, "bias")),
                  _arg(node, 6, "groups", 1), True)


def _convolution(t, node):  # aten.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)
    return t.conv(node, node.args[0], t.pname(node.args[1]), t.pname(node.args[2]), node.args[8], node.args[6])


def _pad(t, node):
    return t.pad(node, node.args[0], _arg(node, 1, "pad"))


def _spatial(t, node):  # pooling and upsampling: channels on axis 1, spatial axes after it
    return t.channel_op(node, node.args[0], [], "pooling or upsampling", min_rank=3)


def _spatial_tuple(t, node):
    return (_spatial(t, node), None)


def _sdpa(t, node):
    return t.sdpa(node, node.args[0], node.args[1], node.args[2], _arg(node, 3, "attn_mask"),
                  bool(_arg(node, 7, "enable_gqa", False)))


def _type_as(t, node):
    return t.lay(node.args[0])


def _pinned(reason):
    def rule(t, node):
        raise _Fix(reason)
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
    **_rules("plain", _layer_norm, F.layer_norm),
    **_rules("plain", _rms_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else [])),
    **_rules("plain", _group_norm, F.group_norm),
    **_rules("plain", _batch_norm_f, F.batch_norm),
    **_rules("plain", _conv_f, F.conv1d, F.conv2d, F.conv3d),
    **_rules("plain", _conv_transpose_f, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    **_rules("any", _pad, F.pad),
    **_rules("any", _sdpa, F.scaled_dot_product_attention),
    F.channel_shuffle: _pinned("a channel shuffle mixes channels across groups"),
    getattr: _SHAPE_ONLY,
    fx._symbolic_trace._assert_is_none: _SHAPE_ONLY,
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
    **{k: _SHAPE_ONLY for k in ("size", "dim", "numel", "ndimension")},
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
    **_rules("plain", _layer_norm, "layer_norm"),
    **_rules("plain", _native_layer_norm, "native_layer_norm"),
    **_rules("plain", _rms_norm, "rms_norm"),
    **_rules("plain", _group_norm, "group_norm"),
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
    **{k: _SHAPE_ONLY for k in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
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
_RULES_VERSION = [0]



# ---------------------------------------------------------------- built-in module rules

@dataclass(frozen=True)
class _ModuleCall:
    """What a module rule sees of one call: the node, the module, its name, its input, the input's unit
    layout (None: no permuted axis reaches it) and the input and output shapes."""

    node: fx.Node
    mod: nn.Module
    name: str
    x: Any
    lay: Any
    shape_in: Any
    shape_out: Any


def _m_linear(v, c: _ModuleCall) -> Any:
    return v.linear(c.node, c.x, f"{c.name}.weight", f"{c.name}.bias", c.mod.out_features, c.name)


def _m_rms_norm(v, c: _ModuleCall) -> Any:
    return v.norm_last(c.node, c.x, len(c.mod.normalized_shape), [f"{c.name}.weight"])


def _m_upsample(v, c: _ModuleCall) -> Any:
    return v.channel_op(c.node, c.x, [], "upsampling", min_rank=3)


def _m_pad(v, c: _ModuleCall) -> Any:
    return v.pad(c.node, c.x, c.mod.padding)


def _m_reshape(v, c: _ModuleCall) -> Any:
    return v.reshape(c.lay, c.shape_in, c.shape_out)


def _m_conv(v, c: _ModuleCall) -> Any:
    lay, name, mod = c.lay, c.name, c.mod
    if lay is not None and (lay.axis != 1 or any(s[2] != 1 for s in lay.segs)):
        raise _Fix("convolution over a non-channel axis")
    if mod.groups == 1:
        if lay is not None:
            v.add_members(lay, [(f"{name}.weight", 1)])
        return v.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
    if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: a per-channel op
        if lay is None:
            return None
        v.add_members(lay, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
        return lay
    raise _Fix(f"grouped convolution (groups={mod.groups}) ties channels to groups")


def _m_conv_transpose(v, c: _ModuleCall) -> Any:
    lay, name, mod = c.lay, c.name, c.mod
    if mod.groups != 1:
        raise _Fix(f"unsupported module {type(mod).__name__}")
    if lay is not None:
        if lay.axis != 1 or any(s[2] != 1 for s in lay.segs):
            raise _Fix("transposed convolution over a non-channel axis")
        v.add_members(lay, [(f"{name}.weight", 0)])
    return v.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 1), (f"{name}.bias", 0)])


def _m_batch_norm(v, c: _ModuleCall) -> Any:
    if c.lay is None:
        return None
    if c.lay.axis != 1:
        raise _Fix("BatchNorm over a non-channel axis")
    v.add_members(c.lay, [(f"{c.name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")])
    return c.lay


def _m_group_norm(v, c: _ModuleCall) -> Any:
    lay, mod = c.lay, c.mod
    if lay is None:
        return None
    if lay.axis != 1:
        raise _Fix("GroupNorm over a non-channel axis")
    if mod.num_groups not in (1, mod.num_channels):
        # legal permutations move whole groups and reorder channels within each: the same block structure
        # as attention heads
        if len(lay.segs) != 1:
            raise _Fix(f"GroupNorm with {mod.num_groups} groups over concatenated channels")
        v.b.set_heads(lay.segs[0][0], mod.num_groups)
    v.add_members(lay, [(f"{c.name}.weight", 0), (f"{c.name}.bias", 0)])
    return lay


def _m_layer_norm(v, c: _ModuleCall) -> Any:
    if c.lay is None:
        return None
    k = len(c.mod.normalized_shape)
    if c.lay.axis < len(c.shape_in) - k:  # normalised over other axes: the feature axis just rides along
        return c.lay
    if k == 1:
        v.add_members(c.lay, [(f"{c.name}.weight", 0), (f"{c.name}.bias", 0)])
        return c.lay
    raise _Fix("LayerNorm over several axes including the feature axis")


def _m_pool(v, c: _ModuleCall) -> Any:
    if getattr(c.mod, "return_indices", False):
        raise _Fix("pooling that returns indices")
    if c.lay is not None and (c.lay.axis != 1 or len(c.shape_in) < 3):
        raise _Fix("pooling over the feature axis")
    return c.lay


def _m_embedding(v, c: _ModuleCall) -> Any:
    v.pin_axis(f"{c.name}.weight", 0, _EMBEDDING_ROWS)
    return v.fresh(c.mod.embedding_dim, c.name, len(c.shape_out) - 1, [(f"{c.name}.weight", 1)])


def _m_sequential(v, c: _ModuleCall) -> Any:
    if len(c.mod) == 0:
        return c.lay
    raise _Fix(f"unsupported module {type(c.mod).__name__}")


def _m_pinned(reason: str):
    def visit(v, c: _ModuleCall) -> Any:
        raise _Fix(reason)
    return visit


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
    (_ELEMENTWISE_MODULES, lambda v, c: c.lay),
    (_POOL_MODULES, _m_pool),
    ((nn.Embedding,), _m_embedding),
    ((nn.MultiheadAttention,), lambda v, c: v.visit_mha(c.node, c.mod)),
    ((nn.Sequential,), _m_sequential),
]

def _user_rule(mod: nn.Module) -> "LeafRule | None":
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
    _RULES_VERSION[0] += 1


def _forward_params(model: nn.Module) -> list:
    import inspect

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


def _concrete_defaults(model: nn.Module, example: Any) -> dict[str, Any]:
    """The optional arguments the example leaves out (targets=None, labels=None): traced at their
    default, so `if targets is not None:` is decided rather than traced."""
    given = _bind(model, example)
    return {p.name: p.default for p in _forward_params(model)
            if p.name not in given and p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _fx_graph(model: nn.Module, example: Any) -> fx.Graph:
    """fx trace plus the shape pass (the model in eval mode; its training flags restored)."""
    training = [m for m in model.modules() if m.training]  # restored exactly afterwards
    try:
        graph = _GraphTracer().trace(model, concrete_args=_concrete_defaults(model, example) or None)
        for m in training:
            m.training = False
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a batch of 2: threads only add contention (50x slower on a busy machine)
        try:
            with torch.no_grad():
                try:
                    _record_shapes(model, graph, example)
                except Exception:  # noqa: BLE001 - an op downstream refused zeros: the real values then
                    _record_shapes(model, graph, example, fast=False)
        finally:
            torch.set_num_threads(threads)
    finally:
        for m in training:
            m.training = True
    return graph


_FLAT = "wrapped."


class _Flat(nn.Module):
    """The model with its outputs flattened to a tuple of tensors: torch.export refuses outputs it does
    not know (a Hugging Face key/value cache); what the spec protects is the tensors."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, *args, **kwargs):
        from .inputs import flat_tensors

        return tuple(flat_tensors(self.wrapped(*args, **kwargs)))


def _export(model: nn.Module, example: Any):
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
    names = {s.arg.name: s.target.removeprefix(_FLAT) for s in ep.graph_signature.input_specs
             if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target is not None}
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            n.meta["shape"] = tuple(int(d) for d in val.shape)
    return ep, names


def _aliases(model: nn.Module, sd: dict) -> dict[str, list[str]]:
    """state-dict name -> every state-dict name of the same tensor (tied weights: an embedding and the
    output head sharing one matrix appear under two names, and must be permuted alike)."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, v in sd.items():
        if v.numel():
            by_ptr.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), []).append(k)
    return {k: names for names in by_ptr.values() if len(names) > 1 for k in names}


def _short(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:240]}"


def spec_from_model(model: nn.Module, example_input: Any) -> PermutationSpec:
    """Derive the permutation spec of `model` from its graph on `example_input` (weights unused): a
    tensor, a tuple of positional arguments or a dict of keyword arguments. The graph comes from
    torch.fx where it can trace the model, else from torch.export; if neither can capture it,
    nothing is permuted and the spec says why (spec.capture == "failed", spec.capture_error)."""
    sd = model.state_dict()
    sd_keys = set(sd)
    aliases = _aliases(model, sd)
    try:
        graph = _fx_graph(model, example_input)
    except Exception as e:  # noqa: BLE001 - any trace failure: try torch.export
        fx_error = f"torch.fx could not trace the model ({_short(e)})"
    else:
        tr = _Tracer(model, graph, sd_keys, aliases=aliases)
        tr.run()
        return tr.spec(model, sd)
    try:
        ep, names = _export(model, example_input)
    except Exception as e:  # noqa: BLE001 - neither could: permute nothing, and say why
        err = f"{fx_error}; torch.export could not either ({_short(e)})"
        tr = _Tracer(None, None, sd_keys)
        return tr.spec(model, sd, err, capture="failed")
    tr = _Tracer(None, ep.graph, sd_keys, params=names, aliases=aliases)
    tr.run()
    return tr.spec(model, sd, capture="export", capture_error=fx_error)


def capture_module(model: nn.Module, example: Any, capture: str) -> fx.GraphModule:
    """The model as a runnable graph module, captured as its spec was ("fx" or "export"): node names
    match the spec's probes. The export is specialised to the example's shapes."""
    if capture == "export":
        ep, _ = _export(model, example)
        return ep.module()
    return fx.GraphModule(model, _GraphTracer().trace(model, concrete_args=_concrete_defaults(model, example) or None))


def load_into(gm: fx.GraphModule, model: nn.Module, sd: dict) -> None:
    """Load a full state dict into the model and the graph module captured from it (which holds only
    the tensors its forward uses: unused parameters and buffers are not an error)."""
    model.load_state_dict(sd)
    own = {k: k.removeprefix(_FLAT) for k in gm.state_dict()}  # an export holds the model as `wrapped`
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
