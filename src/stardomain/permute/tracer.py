"""The tracer: abstract interpretation of a captured graph into a permutation spec.

Every value carries a layout of its hidden units (layouts.py: which groups own which slices of which
axis); each op's rule (rules/) propagates, merges or splits layouts, and the groups grow in a
union-find (builder.py); anything not understood pins its groups as unpermuted, with the reason
recorded. The rule is: never a wrong permutation. spec_from_model puts capture (capture.py), the walk
and the finished spec (assembly.py) together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .assembly import assemble
from .builder import GroupBuilder
from .capture import aliases_of, export_graph, fx_graph, graph_signature, short_error
from .layouts import Fused, HLay, Lay, Param
from .rules.common import SHAPE_ONLY, Pin, aten_name, is_aten, shape_of
from .rules.layers import ModuleCall, leaf
from .rules.registry import BUILTIN_MODULE_RULES, HEAD_MODULES, rule_of, user_rule
from .spec import Member, PermutationSpec, Probe


class Tracer:
    """Walks a captured graph once, in order, keeping each value's layout in `env` and growing the
    groups in `b`; the op rules (rules/registry.py) say what each op does. Anything not understood pins
    what flows in, with the reason."""

    def __init__(self, model: nn.Module | None, graph: fx.Graph | None, sd_keys: set[str],
                 params: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None):
        self.graph = graph
        self.b = GroupBuilder()
        self.env: dict[fx.Node, Any] = {}
        self.sd_keys = sd_keys
        self.modules = dict(model.named_modules()) if model is not None else {}
        self.params = params or {}          # exported graph input -> state-dict name
        self.aliases = aliases or {}
        self.pinned: dict[str, str] = {}    # tensors an op not understood reads: never permuted
        self.materialised: dict[fx.Node, Any] = {}
        self.token_out: set[fx.Node] = set()  # linear layers back onto the tokens (see token_hidden)
        self.cells: dict[str, int] = {}     # recurrent cell module -> its hidden units' group (every call)

    # -- helpers --
    def lay(self, a: Any) -> Any:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, Param):  # a parameter used as a plain value: its last axis is its feature axis
            if a not in self.materialised:
                self.materialised[a] = (self.fresh(v.shape[-1], v.name, len(v.shape) - 1,
                                                   [(v.name, len(v.shape) - 1)]) if v.shape else None)
                if self.materialised[a] is not None:
                    self.b.mark(self.b.as_value, self.materialised[a].segs[0][0])
            return self.materialised[a]
        return v

    def pname(self, a: Any) -> str | None:
        """The state-dict name of a parameter argument (None for None); a computed weight is refused."""
        if a is None:
            return None
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, Param):
            return v.name
        if isinstance(a, fx.Node) and self.lay(a) is None and shape_of(a) is not None:
            return ""  # a weight that carries no permutation (a constant): no member, nothing to pin
        raise Pin("a layer whose weight is computed, not a parameter")

    def all_lays(self, args: Any) -> list:
        out: list = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n)) or n)
        return out

    def fix_value(self, v: Any, reason: str) -> None:
        if isinstance(v, (tuple, list)):
            for x in v:
                self.fix_value(x, reason)
        elif hasattr(v, "pin"):
            v.pin(self, reason)

    def fix_args(self, node: fx.Node, reason: str) -> None:
        for n in node.all_input_nodes:
            self.fix_value(self.env.get(n), reason)
            if n in self.materialised:
                self.fix_value(self.materialised[n], reason)

    def pinned_like(self, node: fx.Node, reason: str) -> "Lay | None":
        """The output of an op not understood, where a plain input's feature axis survives in its
        shape (cumsum, an unknown activation): a pinned group there, so what reads it downstream is
        listed as pinned too (and anything merged with it is pinned: never less safe than nothing)."""
        so = shape_of(node)
        lays = [(n, self.env.get(n)) for n in node.all_input_nodes if isinstance(self.env.get(n), (Lay, HLay))]
        if so is None or node.op == "output" or len(lays) != 1:
            return None
        n, lay = lays[0]
        si = shape_of(n)
        if si is None:
            return None
        if isinstance(lay, Lay) and len(si) == len(so) and si[lay.axis] == so[lay.axis]:
            ax = lay.axis
        else:  # the units' count along exactly one output axis (a channel shuffle's reshape back)
            units = si[lay.axis] if isinstance(lay, Lay) else self.b.n[self.b.find(lay.gid)]
            axes = [i for i, d in enumerate(so) if d == units]
            if len(axes) != 1 or units < 2:
                return None
            ax = axes[0]
        g = self.b.new(so[ax], f"{node.name}:pinned", f"after an op not understood: {reason}")
        return Lay(ax, ((g, so[ax], 1),))

    def fix_module(self, node: fx.Node, reason: str) -> None:
        """A module not understood: its own parameters' unit axes are pinned and said so."""
        if node.op != "call_module":
            return
        for pname, p in self.modules[node.target].named_parameters(recurse=False):
            for ax in range(min(p.dim(), 2)):
                self.pin_axis(f"{node.target}.{pname}", ax, reason)

    def fresh(self, n: int, label: str, axis: int, members: list[tuple[str, int]]) -> Lay:
        g = self.b.new(n, label)
        for name, ax in members:
            if name in self.sd_keys:
                self.b.add(g, Member(name, ax))
        return Lay(axis, ((g, n, 1),))

    def add_members(self, lay: Lay, tensors: list[tuple[str, int]], need_block1: bool = True) -> None:
        for gid, n, blk, off, rep in lay.seg_offsets():
            if need_block1 and (blk != 1 or rep != 1):
                raise Pin("per-channel parameters on a flattened axis")
            for name, ax in tensors:
                if name in self.sd_keys:
                    self.b.add(gid, Member(name, ax, off, blk, rep))

    def merge(self, lays: list[Lay]) -> Lay:
        first = lays[0]
        if any(not isinstance(lay, Lay) or lay.axis != first.axis for lay in lays):
            raise Pin("combining tensors whose units lie on different axes")
        for other in lays[1:]:
            if [s[1:] for s in other.segs] != [s[1:] for s in first.segs]:
                raise Pin("elementwise op on differently structured feature axes")
        for other in lays[1:]:
            for s1, s2 in zip(first.segs, other.segs):
                self.b.union(s1[0], s2[0])
        return first

    # -- the walk --
    def run(self) -> None:
        for node in self.graph.nodes:
            try:
                out = self.visit(node)
                if out is SHAPE_ONLY:
                    out = None
            except Pin as e:
                self.fix_args(node, f"{e} (at {node.format_node()[:120]})")
                self.fix_module(node, f"{e}")
                out = self.pinned_like(node, f"{e}")
            except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as e:
                # a rule met a use it does not expect: pin what flows in rather than guess
                self.fix_args(node, f"not understood ({type(e).__name__}: {e}) (at {node.format_node()[:120]})")
                out = None
            self.env[node] = out
            if isinstance(out, Lay) and node.op not in ("get_attr", "placeholder"):
                for gid, n, blk, off, rep in out.seg_offsets():
                    self.b.probes[self.b.find(gid)].append(Probe(node.name, out.axis, off, blk, rep))

    def visit(self, node: fx.Node) -> Any:
        op = node.op
        if op == "placeholder":
            name = self.params.get(node.name)
            if name is not None and name in self.sd_keys and shape_of(node) is not None:
                return Param(name, shape_of(node))
            return None
        if op == "output":
            self.fix_args(node, "model output")
            return None
        if op == "get_attr":
            shape = shape_of(node)
            if node.target in self.sd_keys and shape is not None:
                return Param(str(node.target), shape)
            return None
        if op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        if op == "call_function":
            fn = node.target
            what = f"aten.{aten_name(fn)}" if is_aten(fn) else getattr(fn, "__name__", str(fn))
            return self.apply_rule(node, rule_of(node), what)
        if op == "call_method":
            return self.apply_rule(node, rule_of(node), f".{node.target}()")
        raise Pin(f"unknown node kind {op}")

    def visit_module(self, node: fx.Node, mod: nn.Module) -> Any:
        """A module call: the user's registered rule for its type first, else the first entry of
        BUILTIN_MODULE_RULES whose types match (one table, as FUNCTION_RULES for functions); else pinned
        with a reason."""
        rule = user_rule(mod)
        if rule is not None:
            return leaf(self, node, node.target, rule)
        if any(isinstance(lay, HLay) for lay in self.all_lays((node.args, node.kwargs))) and not isinstance(
                mod, HEAD_MODULES):
            if isinstance(mod, (nn.Dropout, nn.Identity, nn.Softmax)):
                return self.lay(node.args[0])
            raise Pin(f"{type(mod).__name__} on per-head tensors")
        x = node.args[0] if node.args else None
        call = ModuleCall(node, mod, node.target, x, self.lay(x), shape_of(x), shape_of(node))
        for types, visit in BUILTIN_MODULE_RULES:
            if isinstance(mod, types):
                return visit(self, call)
        raise Pin(f"unsupported module {type(mod).__name__}")


    def apply_rule(self, node: fx.Node, rule: Any, what: str) -> Any:
        if rule is SHAPE_ONLY:
            return SHAPE_ONLY
        if all(self.env.get(n) is None for n in node.all_input_nodes):
            return None  # nothing permuted flows in (masks, positions, constants)
        if rule is None:
            raise Pin(f"unsupported function {what}")
        kind, fn = rule
        if kind == "plain":
            for v in (self.env.get(n) for n in node.all_input_nodes):
                if isinstance(v, (HLay, Fused)):
                    raise Pin(f"{what} on {v.what}")
        return fn(self, node)

    def sd_shape(self, name: str) -> tuple:
        v = next((x for x in self.env.values() if isinstance(x, Param) and x.name == name), None)
        if v is not None:
            return tuple(v.shape)
        mod, _, attr = name.rpartition(".")
        t = getattr(self.modules.get(mod), attr, None)
        return tuple(t.shape) if isinstance(t, torch.Tensor) else ()

    def pin_axis(self, tensor: str, axis: int, reason: str) -> None:
        if tensor in self.sd_keys:
            g = self.b.new(0, tensor, reason)
            self.b.add(g, Member(tensor, axis))

    def rule_of(self, node: fx.Node) -> Any:
        return rule_of(node)


def spec_from_model(model: nn.Module, example_input: Any) -> PermutationSpec:
    """Derive the permutation spec of `model` from its graph on `example_input` (weights unused): a
    tensor, a tuple of positional arguments or a dict of keyword arguments. The graph comes from
    torch.fx where it can trace the model, else from torch.export; if neither can capture it,
    nothing is permuted and the spec says why (spec.capture == "failed", spec.capture_error)."""
    sd = model.state_dict()
    sd_keys = set(sd)
    aliases = aliases_of(sd)
    try:
        graph = fx_graph(model, example_input)
    except Exception as e:  # noqa: BLE001 - any trace failure: try torch.export
        fx_error = f"torch.fx could not trace the model ({short_error(e)})"
    else:
        tr = Tracer(model, graph, sd_keys, aliases=aliases)
        tr.run()
        spec = assemble(tr, model, sd)
        spec.graph_signature = graph_signature(graph)  # not saved: lets the cache check a hit (cache.py)
        return spec
    try:
        ep, names = export_graph(model, example_input)
    except Exception as e:  # noqa: BLE001 - neither could: permute nothing, and say why
        err = f"{fx_error}; torch.export could not either ({short_error(e)})"
        return assemble(Tracer(None, None, sd_keys), model, sd, err, capture="failed")
    tr = Tracer(None, ep.graph, sd_keys, params=names, aliases=aliases)
    tr.run()
    spec = assemble(tr, model, sd, capture="export", capture_error=fx_error)
    spec.graph_signature = graph_signature(ep.graph)  # not saved: lets a check re-capture without a second export
    return spec
