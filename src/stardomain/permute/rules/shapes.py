"""Op rules for shape ops: reshape/view/flatten, transpose/permute, indexing and slicing, cat/stack,
split/chunk/unbind, squeeze/unsqueeze/expand, reductions and padding. They move, keep or refuse a
layout; they never create a group (except the pinned part of a concatenation)."""

from __future__ import annotations

import math
from typing import Any

import torch.fx as fx

from ..layouts import Fused, HLay, Lay, Rows, dropped
from .attention import cat_heads, index_fused, index_heads, merge_heads, repeat_heads, split_heads, split_parts
from .common import Pin, arg, dim_list, only_output, shape_of


def reshape(t, lay: Any, si: tuple | None, so: tuple | None) -> Any:
    if lay is None:
        return None
    if si is None or so is None:
        raise Pin("reshape of unknown shape")
    if tuple(si) == tuple(so):  # a reshape to the same shape moves nothing
        return lay
    if isinstance(lay, Fused):
        raise Pin("reshape of a fused projection split over a new axis")
    if isinstance(lay, Rows):
        return merge_rows(t, lay, si, so)
    if isinstance(lay, HLay):
        rep = repeat_heads(t, lay, si, so)
        return rep if rep is not None else merge_heads(t, lay, si, so)
    try:
        out = reshape_plain(t, lay, si, so)
        if (len(so) == len(si) + 1 and out.axis == len(so) - 1 and so[-2] == 1 and len(lay.segs) == 1
                and lay.segs[0][2] == 1):  # (B, T, d) -> (B, T, 1, d): a single attention head
            return split_heads(t, lay, si, so) or out
        return out
    except Pin:
        if len(lay.segs) == 1 and lay.segs[0][2] == 1:
            split = split_heads(t, lay, si, so)
            if split is None:
                split = split_parts(t, lay, si, so)
            if split is not None:
                return split
        rows = shuffle_rows(lay, si, so)
        if rows is None:
            raise
        return rows


def shuffle_rows(lay: Lay, si: tuple, so: tuple) -> "Rows | None":
    """(.., C, ..) -> (.., g, C/g, ..) where no segment spans two rows (a channel shuffle's view of
    concatenated branches): Rows. None: any other split of the feature axis."""
    a = lay.axis
    if len(so) != len(si) + 1 or so[:a] != si[:a] or so[a + 2:] != si[a + 1:] or so[a] < 2 or so[a + 1] < 2:
        return None
    rows, row, filled = [], [], 0
    for sg in lay.segs:
        if len(sg) != 3:
            return None
        row.append(sg)
        filled += sg[1] * sg[2]
        if filled == so[a + 1]:
            rows.append(tuple(row))
            row, filled = [], 0
        elif filled > so[a + 1]:
            return None
    return Rows(a, a + 1, tuple(rows)) if len(rows) == so[a] else None


def merge_rows(t, rows: Rows, si: tuple, so: tuple) -> Lay:
    """Rows merged back: in their order, the segments as they were; transposed (units first: the channel
    shuffle's (C/g, g) -> C), output position j*g + i is row i's position j. The rows are cut at every
    segment boundary any of them has (units_between); in each stretch, every row's units move in blocks
    following the units of the row with fewest, n (a group of its own when a row has as many, a rigid child
    of it otherwise, builder.nest_rigid): each of the n units owns g * (the stretch's length) / n
    consecutive output channels."""
    r, u = rows.row_axis, rows.unit_axis
    lo = min(r, u)
    if abs(r - u) != 1 or tuple(so) != tuple(si[:lo]) + (si[r] * si[u],) + tuple(si[lo + 2:]):
        raise Pin("reshape of a channel shuffle's rows other than merging them back")
    if r < u:
        return Lay(r, tuple(sg for row in rows.segs for sg in row))
    ends = sorted({e for row in rows.segs for e in _row_ends(t, row)})
    segs = []
    for a, b in zip([0] + ends[:-1], ends):
        pieces = [units_between(t, Lay(0, row), a, b).segs for row in rows.segs]
        if any(len(p) != 1 for p in pieces):
            raise Pin("a channel shuffle whose rows' units do not line up")
        segs.append(_tie_rows(t, [p[0] for p in pieces], len(pieces) * (b - a)))
    return Lay(lo, tuple(segs))


def _row_ends(t, row: tuple) -> list[int]:
    """Where the units of a row's groups (as cut so far: builder.leaves) end, in positions along the row."""
    out, off = [], 0
    for gid, n, blk in row:
        for _, m in (t.b.leaves(gid) if sum(m for _, m in t.b.leaves(gid)) == n else [(gid, n)]):
            off += m * blk
            out.append(off)
    return out


def _tie_rows(t, pieces: list, width: int) -> tuple:
    """One stretch of every row -> the output's segment: the rows' units tied to the row with fewest."""
    counts = [n for _, n, _ in pieces]
    n = min(counts)
    if any(k % n for k in counts):
        raise Pin("a channel shuffle of rows whose unit counts do not nest (neither divides the other)")
    parent = pieces[counts.index(n)][0]
    for gid, k, _ in pieces:
        if k == n:
            t.b.union(gid, parent)
        elif not t.b.nest_rigid(gid, parent):
            raise Pin("a channel shuffle of a row whose units already follow another group's blocks")
    return (parent, n, width // n)


def reshape_plain(t, lay: Lay, si: tuple, so: tuple) -> Lay:
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
        raise Pin("reshape that splits the feature axis")
    mult, k, m = so[b] // c, a + 1, 1
    while m < mult and k < len(si):
        m *= si[k]
        k += 1
    if m != mult:
        raise Pin("reshape that mixes the feature axis with others")
    return Lay(b, tuple((g, n, blk * mult) for g, n, blk in lay.segs))


def transpose(t, node, x, d0, d1) -> Any:
    lay = t.lay(x)
    if lay is None:
        return None
    nd = len(shape_of(x))
    d0, d1 = d0 % nd, d1 % nd

    def mv(ax):
        return ax if ax is None else d1 if ax == d0 else d0 if ax == d1 else ax

    return lay.moved(mv)


def permute_axes(t, node, x, dims) -> Any:
    lay = t.lay(x)
    if lay is None:
        return None
    nd = len(shape_of(x))
    dims = [d % nd for d in dims]
    return lay.moved(lambda a: a if a is None else dims.index(a))


def reduce(t, node, x, dim, keepdim) -> Any:
    lay = t.lay(x)
    if lay is None:
        return None
    nd = len(shape_of(x))
    if dim is None:
        return None  # a full reduction is invariant to permutations
    dims = [d % nd for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    if lay.axis in dims:
        return None  # summing/averaging over units does not depend on their order
    return Lay(lay.axis if keepdim else lay.axis - sum(d < lay.axis for d in dims), lay.segs)


def getitem(t, node: fx.Node) -> Any:
    x, idx = node.args
    lay = t.lay(x)
    if isinstance(lay, (tuple, list)):
        return lay[idx] if isinstance(idx, int) and -len(lay) <= idx < len(lay) else None
    if lay is None:
        return None
    if isinstance(lay, Fused):
        return index_fused(t, node, lay, idx, len(shape_of(x)))
    nd = len(shape_of(x))
    if isinstance(lay, HLay):
        return index_heads(t, lay, idx, nd)
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(e is Ellipsis for e in idx) > 1:
        raise Pin("advanced indexing")
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
            raise Pin("advanced indexing")
        if i_in == lay.axis:
            if isinstance(e, slice) and e == slice(None):
                return Lay(i_out, lay.segs)
            if only_output(node):
                raise Pin("model output (a slice of it)")
            if (not isinstance(lay, Lay) or not isinstance(e, slice) or e.step not in (None, 1)
                    or not isinstance(e.start, (int, type(None)))):
                raise Pin("indexing into the feature axis")
            lo = slice(e.start, None).indices(shape_of(x)[i_in])[0]  # (the end: read off the output's shape)
            return Lay(i_out, units_between(t, lay, lo, lo + shape_of(node)[i_out]).segs)
        i_in += 1
        i_out += isinstance(e, slice)
    return Lay(i_out + (lay.axis - i_in), lay.segs)  # the feature axis is past the index


def unsqueeze(t, node: fx.Node, x, dim) -> Any:
    lay = t.lay(x)
    if lay is None:
        return None
    if isinstance(lay, HLay):
        raise Pin("unsqueeze of per-head tensors")
    dim = dim % len(shape_of(node))
    return Lay(lay.axis + (dim <= lay.axis), lay.segs)


def cat(t, node: fx.Node, parts: list, dim: int) -> Any:
    so = shape_of(node)
    dim = dim % len(so)
    # empty pieces (an empty key/value cache) add nothing
    parts = [p for p in parts if not (shape_of(p) is not None and math.prod(shape_of(p)) == 0)]
    lays = [t.lay(p) for p in parts]
    if all(lay is None for lay in lays):
        return None
    if any(isinstance(lay, HLay) for lay in lays):
        return cat_heads(t, lays, dim)
    if any(lay is not None and not isinstance(lay, Lay) for lay in lays):
        raise Pin("concatenation of per-head tensors")
    if any(lay is not None and lay.axis != dim for lay in lays):  # cat along another axis: merge
        if any(lay is None for lay in lays):
            raise Pin("concatenation of permutable and unpermutable tensors")
        return t.merge(lays)
    segs: list = []
    for p, lay in zip(parts, lays):
        if lay is None:
            size = shape_of(p)[dim]
            g = t.b.new(size, f"{node.name}:part", "concatenated with an unpermutable tensor")
            segs.append((g, size, 1))
        else:
            segs += list(lay.segs)
    return Lay(dim, tuple(segs))


def stack(t, node: fx.Node, parts: list, dim: int) -> Any:
    so = shape_of(node)
    dim %= len(so)
    lays = [t.lay(p) for p in parts]
    if all(lay is None for lay in lays):
        return None
    if any(not isinstance(lay, Lay) for lay in lays):
        raise Pin("stacking permuted and unpermuted tensors")
    merged = t.merge(lays)
    return Lay(merged.axis + (dim <= merged.axis), merged.segs)


def split(t, node: fx.Node, x: Any, sizes: Any, dim: int) -> Any:
    """torch.split / chunk: along the feature axis a fused projection's output is cut into groups
    of their own (q, k, v); along any other axis every piece keeps the layout."""
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    dim %= len(si)
    length = si[dim]
    if isinstance(sizes, int):
        sizes = [sizes] * (length // sizes) + ([length % sizes] if length % sizes else [])
    sizes = list(sizes)
    if isinstance(lay, HLay):
        if dim in (lay.head_axis, lay.unit_axis):
            raise Pin("splitting per-head tensors across heads or units")
        return tuple(lay for _ in sizes)
    if isinstance(lay, Fused):
        raise Pin("splitting a fused projection split over a new axis")
    if dim != lay.axis:
        return tuple(lay for _ in sizes)
    segs = list(lay.segs)
    out, cur, want = [], [], list(sizes)
    while segs:
        g, n, blk = segs.pop(0)
        need = want[0] - sum(m * bb for _, m, bb in cur)
        if n * blk <= need:
            cur.append((g, n, blk))
        elif len(segs) == 0 and len(cur) == 0 and sum(want) == n * blk and all(w % blk == 0 for w in want):
            subs = t.b.split(g, [w // blk for w in want])
            if subs is None:
                raise Pin("splitting a feature axis whose units are tied to other tensors")
            return tuple(Lay(dim, ((sg, w // blk, blk),)) for sg, w in zip(subs, want))
        else:  # a piece ends inside a segment: each piece's units cut out (a slice each)
            ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
            return tuple(units_between(t, lay, a, b) for a, b in zip([0] + ends[:-1], ends))
        if sum(m * bb for _, m, bb in cur) == want[0]:
            out.append(Lay(dim, tuple(cur)))
            cur, want = [], want[1:]
    if want or cur:
        raise Pin("split of the feature axis across a group")
    return tuple(out)


def unbind(t, node: fx.Node, x: Any, dim: int) -> Any:
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    dim %= len(si)
    if isinstance(lay, Fused):
        if dim != lay.axis:
            raise Pin("unbinding a fused projection other than by part")
        return tuple(dropped(p, dim) for p in lay.parts)
    if isinstance(lay, HLay):
        if dim in (lay.head_axis, lay.unit_axis):
            raise Pin("unbinding per-head tensors across heads or units")
        return tuple(dropped(lay, dim) for _ in range(si[dim]))
    if dim == lay.axis:
        raise Pin("unbinding the feature axis")
    return tuple(dropped(lay, dim) for _ in range(si[dim]))


def units_between(t, lay: Lay, lo: int, hi: int) -> Lay:
    """The feature axis sliced at static positions [lo, hi) (DPN's dual paths: x[:, :d] and x[:, d:]): the
    segments inside, and where a slice ends inside a segment, its group cut there (each side a group of its
    own, as a split; builder.cut). A unit the slice ends inside (a flattened channel's positions, a channel
    shuffle's block) becomes a group of one unit, which cannot move: its positions lie on both sides. A group
    that cannot be cut (a block structure, tied to other tensors), repeated heads, or the axis of a parameter
    read as a value (a causal mask's token axis, sliced to the sequence): pinned."""
    segs, off = [], 0
    for gid, n, blk, *r in lay.segs:
        length = n * blk * (r[0] if r else 1)
        a, b = max(lo, off), min(hi, off + length)
        if a < b and (a, b) == (off, off + length):
            segs.append((gid, n, blk, *r))
        elif a < b:
            if r and r[0] != 1:
                raise Pin("slicing the feature axis inside repeated heads")
            segs += _segment_part(t, gid, n, blk, a - off, b - off)
        off += length
    return Lay(lay.axis, tuple(segs))


def _segment_part(t, gid: int, n: int, blk: int, a: int, b: int) -> list:
    """Positions [a, b) of one segment (n units of blk positions) as segments of the groups it is cut into;
    a unit cut inside is a one-unit group, the part its piece (gid, 1, positions inside)."""
    if t.b.as_value[t.b.find(gid)]:  # (a causal mask's token axis, sliced to the sequence's length)
        raise Pin("indexing into the feature axis of a parameter read as a value")
    cuts = {a // blk, a // blk + (a % blk > 0), b // blk, b // blk + (b % blk > 0)}
    if not all(t.b.cut(gid, c) for c in sorted(cuts) if 0 < c < n):
        raise Pin("slicing a feature axis whose units are tied to other tensors or to blocks")
    out, pos = [], 0
    for leaf, m in t.b.leaves(gid):
        x, y = max(a, pos * blk), min(b, (pos + m) * blk)
        if x < y:
            out.append((leaf, m, blk) if (x, y) == (pos * blk, (pos + m) * blk) else (leaf, 1, y - x))
        pos += m
    return out


def narrow(t, node: fx.Node, x: Any, dim: int, full: bool, bounds: tuple | None = None) -> Any:
    """x[.., a:b, ..] along `dim` (full: the whole axis; bounds: (a, b) where static and unit-strided)."""
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    dim %= len(si)
    if isinstance(lay, HLay) and dim == lay.unit_axis and not full:  # x[..., :d/2] (rotary)
        t.b.fix_units(lay.gid)
        return lay
    axes = lay.axes()
    if dim in axes and not full and only_output(node):
        raise Pin("model output (a slice of it)")
    if dim in axes and not full and isinstance(lay, Lay) and bounds is not None:
        return units_between(t, lay, *bounds)
    if dim in axes and not full:
        raise Pin("slicing into the feature axis (or heads, or a head's units)")
    if isinstance(lay, Fused) and dim != lay.axis:
        raise Pin("slicing a fused projection")
    return lay


def select(t, node: fx.Node, x: Any, dim: int, index: int) -> Any:
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    dim %= len(si)
    if isinstance(lay, Fused):
        if dim != lay.axis:
            raise Pin("selecting from a fused projection other than by part")
        return dropped(lay.parts[index], dim)
    if dim in lay.axes():
        raise Pin("selecting a single unit or head")
    return dropped(lay, dim)


def pad(t, node: fx.Node, x: Any, pad: Any) -> Any:
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    padded = {len(si) - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    axes = set(lay.axes())
    if padded & axes or isinstance(lay, Fused):
        raise Pin("padding the feature axis")
    return lay


def _reshape(t, node):
    return reshape(t, t.lay(node.args[0]), shape_of(node.args[0]), shape_of(node))


def _transpose(t, node):
    x = node.args[0]
    if len(node.args) < 3 and len(shape_of(x) or ()) == 2:  # .t()
        return transpose(t, node, x, 0, 1)
    return transpose(t, node, x, arg(node, 1, "dim0"), arg(node, 2, "dim1"))


def _permute(t, node):
    a = node.args
    dims = a[1] if len(a) == 2 and isinstance(a[1], (tuple, list)) else a[1:] or node.kwargs.get("dims")
    return permute_axes(t, node, a[0], dims)


def _reduce(t, node):
    dim = arg(node, 1, "dim")
    if isinstance(dim, fx.Node) or dim is not None and not isinstance(dim, (int, tuple, list)):
        raise Pin("a reduction over axes computed at run time")
    keepdim = len(shape_of(node) or ()) == len(shape_of(node.args[0]) or ())  # read off the shapes: positions vary
    lay = t.lay(node.args[0])
    if isinstance(lay, (HLay, Fused)):
        raise Pin("reduction of per-head tensors")
    return reduce(t, node, node.args[0], dim_list(dim), keepdim)


def _cat(t, node):
    return cat(t, node, list(node.args[0]), arg(node, 1, "dim", 0))


def _stack(t, node):
    return stack(t, node, list(node.args[0]), arg(node, 1, "dim", 0))


def _unsqueeze(t, node):
    if isinstance(t.lay(node.args[0]), Fused):
        raise Pin("unsqueeze of a fused projection")
    if isinstance(t.lay(node.args[0]), HLay):
        lay, nd = t.lay(node.args[0]), len(shape_of(node))
        d = arg(node, 1, "dim") % nd
        return lay.moved(lambda a: a if a is None or a < d else a + 1)
    return unsqueeze(t, node, node.args[0], arg(node, 1, "dim"))


def _squeeze(t, node):
    lay, si, so = t.lay(node.args[0]), shape_of(node.args[0]), shape_of(node)
    if lay is None:
        return None
    gone = [i for i in range(len(si)) if si[i] == 1] if len(si) != len(so) else []
    dims = dim_list(arg(node, 1, "dim"))
    if dims is not None:
        gone = [d % len(si) for d in dims if si[d % len(si)] == 1]
    out = lay
    for d in sorted(gone, reverse=True):
        out = dropped(out, d) if not isinstance(out, Fused) else None
        if out is None:
            raise Pin("squeeze of a fused projection")
    return out


def _expand(t, node):
    lay, si, so = t.lay(node.args[0]), shape_of(node.args[0]), shape_of(node)
    if lay is None:
        return None
    d = len(so) - len(si)
    moved = lay.moved(lambda a: a if a is None else a + d)
    axes = moved.axes()
    if any(a is not None and so[a] != si[a - d] for a in axes):
        raise Pin("expand along the feature axis")
    return moved


def _getitem(t, node):
    return getitem(t, node)


def _split(t, node):
    return split(t, node, node.args[0], arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size")),
                 arg(node, 2, "dim", 0))


def _chunk(t, node):
    x, n = node.args[0], arg(node, 1, "chunks")
    length = shape_of(x)[arg(node, 2, "dim", 0)]
    size = -(-length // n)
    return split(t, node, x, size, arg(node, 2, "dim", 0))


def _unbind(t, node):
    return unbind(t, node, node.args[0], arg(node, 1, "dim", 0))


def _slice(t, node):  # aten.slice.Tensor(x, dim, start, end, step)
    x = node.args[0]
    dim = arg(node, 1, "dim", 0) % len(shape_of(x))
    full = shape_of(node)[dim] == shape_of(x)[dim]
    start, step = arg(node, 2, "start"), arg(node, 4, "step", 1)
    static = (start is None or isinstance(start, int)) and step == 1  # (the end: read off the output's shape)
    start = slice(start, None).indices(shape_of(x)[dim])[0] if static else 0
    return narrow(t, node, x, dim, full, (start, start + shape_of(node)[dim]) if static else None)


def _narrow(t, node):  # torch.narrow(x, dim, start, length)
    x = node.args[0]
    dim = arg(node, 1, "dim") % len(shape_of(x))
    start = arg(node, 2, "start")
    static = isinstance(start, int)  # (the length: read off the output's shape)
    start = start % shape_of(x)[dim] if static else 0
    return narrow(t, node, x, dim, shape_of(node)[dim] == shape_of(x)[dim],
                  (start, start + shape_of(node)[dim]) if static else None)


def _select(t, node):
    return select(t, node, node.args[0], arg(node, 1, "dim"), arg(node, 2, "index"))


def _pad(t, node):
    return pad(t, node, node.args[0], arg(node, 1, "pad"))

