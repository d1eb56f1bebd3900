"""What the tracer knows about one value: where its hidden units lie (its layout).

Each layout is a small immutable type that renumbers its own axes (transpose, permute, a dropped or
inserted axis), names the axes units run along, and pins its groups when an op is not understood; the
op rules (rules/) decide how an op changes a layout. A value whose layout is None carries no units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

Renumber = Callable[[Any], Any]  # old axis -> new axis (None stays None)


@dataclass(frozen=True)
class Lay:
    """The feature axis of a value and the groups owning consecutive slices of it: (gid, n, block), or
    (gid, n, block, rep) for the merged heads of grouped-query attention (see Member.rep)."""
    axis: int
    segs: tuple[tuple[int, ...], ...]

    what: ClassVar[str] = "plain"

    def moved(self, mv: Renumber) -> "Lay":
        return Lay(mv(self.axis), self.segs)

    def axes(self) -> tuple:
        return (self.axis,)

    def gids(self) -> list[int]:
        return [s[0] for s in self.segs]

    def pin(self, tracer: Any, reason: str) -> None:
        for gid in self.gids():
            tracer.b.fix(gid, reason)

    def seg_offsets(self):
        """-> (group, units, block, offset, rep) of each segment."""
        off = 0
        for gid, n, blk, *r in self.segs:
            rep = r[0] if r else 1
            yield gid, n, blk, off, rep
            off += n * blk * rep


@dataclass(frozen=True)
class HLay:
    """A feature axis split into heads: `head_axis` indexes heads, `unit_axis` (None once contracted
    away, as in attention scores) indexes units within a head; both belong to group `gid`."""
    head_axis: int
    unit_axis: int | None
    gid: int
    rep: int = 1  # >1: each head repeated rep times along the head axis (grouped-query key/value heads)

    what: ClassVar[str] = "per-head tensors"

    def moved(self, mv: Renumber) -> "HLay":
        return HLay(mv(self.head_axis), mv(self.unit_axis), self.gid, self.rep)

    def axes(self) -> tuple:
        return (self.head_axis, self.unit_axis)

    def gids(self) -> list[int]:
        return [self.gid]

    def pin(self, tracer: Any, reason: str) -> None:
        tracer.b.fix(self.gid, reason)


@dataclass(frozen=True)
class Rows:
    """A feature axis viewed as rows (a channel shuffle's (g, C/g) view): index i along `row_axis` is row i,
    whose positions along `unit_axis` the segments segs[i] ((gid, n, block), ...) own. Only moving the
    axes and merging them back (in either order) is understood (rules/shapes.py)."""
    row_axis: int
    unit_axis: int
    segs: tuple[tuple[tuple[int, int, int], ...], ...]

    what: ClassVar[str] = "a feature axis viewed as rows (a channel shuffle)"

    def moved(self, mv: Renumber) -> "Rows":
        return Rows(mv(self.row_axis), mv(self.unit_axis), self.segs)

    def axes(self) -> tuple:
        return (self.row_axis, self.unit_axis)

    def gids(self) -> list[int]:
        return [s[0] for row in self.segs for s in row]

    def pin(self, tracer: Any, reason: str) -> None:
        for gid in self.gids():
            tracer.b.fix(gid, reason)


@dataclass(frozen=True)
class Fused:
    """A fused projection split over a new axis (q/k/v from reshape(B, T, 3, H, d)): index i along
    `axis` is part i, whose layout (in this tensor's axes) is parts[i]."""
    axis: int
    parts: tuple

    what: ClassVar[str] = "a fused projection split over a new axis"

    def moved(self, mv: Renumber) -> "Fused":
        return Fused(mv(self.axis), tuple(p.moved(mv) for p in self.parts))

    def axes(self) -> tuple:
        return (self.axis,)

    def pin(self, tracer: Any, reason: str) -> None:
        for part in self.parts:
            part.pin(tracer, reason)


@dataclass(frozen=True)
class Param:
    """A parameter or buffer read as a value (a get_attr node, or an exported graph's input): the op
    using it decides its layout (F.linear's weight, a layer scale, a position embedding)."""
    name: str
    shape: tuple

    def pin(self, tracer: Any, reason: str) -> None:
        tracer.pinned.setdefault(self.name, reason)


def dropped(lay: Any, ax: int) -> Any:
    """A layout after axis `ax` is removed (selected away)."""
    return lay.moved(lambda a: a if a is None or a < ax else a - 1)


def shifted(lay: Any, d: int) -> Any:
    """A layout after d axes are put in front (broadcasting, expand)."""
    return lay.moved(lambda a: a if a is None else a + d)
