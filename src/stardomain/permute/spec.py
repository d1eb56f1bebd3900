"""The permutation spec, as plain data: which tensor axes share a permutation.

A *group* is a set of hidden units (channels, features, heads) whose order is arbitrary: permuting
them consistently in every tensor axis they index leaves the network's function unchanged. Each
member of a group says "the slice [offset, offset + size*block) of this tensor axis, viewed as
(size, block), has its first dimension permuted" (block > 1 after a flatten: a channel owns H*W
inputs of the next Linear). Axes that cannot be permuted are listed with the reason. How a spec is
derived from a model: tracer.py (docs/architecture.md walks through the files).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Member:
    """Slice [offset, offset + size*block) of `tensor`'s `axis`, viewed as (size, block). rep > 1: the
    slice is rep times longer, viewed as (heads, rep, size // heads, block) (heads: the group's, or 1),
    every copy of a head permuted alike: the query heads sharing one key/value head (grouped-query
    attention) read the same key units and feed the output projection the same value units.
    by >= 0: the axis holds the units of one block only (size // heads: the group's units within a
    block), and which block depends on the position along the tensor's axis `by`, cut into `heads`
    equal parts: a grouped convolution's weight (out, in / groups, ...), whose rows in output group i
    read input group i. Each part of axis `by` is reordered by the within-block permutation of the
    block it reads; axis `by` must belong to the group coupled with this one (the same block
    permutation), so a row keeps reading its own group's units (apply: permutations.py)."""
    tensor: str
    axis: int
    offset: int = 0
    block: int = 1
    rep: int = 1
    by: int = -1

    def span(self, size: int, heads: int) -> int:
        """The length of the axis slice this member covers, in a group of `size` units and `heads` blocks."""
        return (size // max(heads, 1) if self.by >= 0 else size) * self.block * self.rep


@dataclass(frozen=True)
class Probe:
    """Where a group's units can be observed in the traced graph (for activation matching); rep as in
    Member."""
    node: str
    axis: int
    offset: int = 0
    block: int = 1
    rep: int = 1


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
    parent: str | None = None  # its `heads` blocks move as this group's units do (hierarchy.py: nested groups)


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
                           role=g.get("role", "heads" if g.get("couple") else "mlp"), parent=g.get("parent"))
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
                    done[m.tensor, m.axis] = done.get((m.tensor, m.axis), 0) + m.span(g.size, g.heads)
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
                     + (f" coupled with {g.couple}" if g.couple else "")
                     + (f" following the units of {g.parent}" if g.parent else "") if g.heads else "")
            ms = ", ".join(f"{m.tensor}[{m.axis}]" + (f"@{m.offset}" if m.offset else "")
                           + (f"x{m.block}" if m.block > 1 else "") + (f"*{m.rep}" if m.rep > 1 else "")
                           + (f" per block of [{m.by}]" if m.by >= 0 else "") for m in g.members)
            lines.append(f"  {g.name} [{g.role}]: size {g.size}{extra}: {ms}")
        if self.unpermuted:
            lines.append("unpermuted:")
            lines += [f"  {u.what}: {u.reason}" for u in self.unpermuted]
        return "\n".join(lines)

    __str__ = summary


def _boundary(reason: str) -> bool:
    """A pin that only says the axis is the model's input or output (no hidden units run along it)."""
    return all(r.startswith(("model output", "model input")) for r in reason.split("; "))
