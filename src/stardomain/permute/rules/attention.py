"""Op rules for attention: heads split off a feature axis and merged back, q @ k^T and scores @ v,
scaled_dot_product_attention, grouped-query attention, nn.MultiheadAttention, fused q/k/v projections.

Heads are blocks: a permutation may move whole heads and reorder units within each head; q/k share
one group, v/o a second, coupled to share the head-level permutation."""

from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..layouts import Fused, HLay, Lay, dropped
from ..spec import Member
from .common import Pin, arg, shape_of


def split_heads(t, lay: Lay, si: tuple, so: tuple) -> "HLay | None":
    """(.., H*dh, ..) -> (.., H, dh, ..): the units of one group split into heads."""
    a = lay.axis
    gid, n, _ = lay.segs[0]
    pre, post = math.prod(si[:a]), math.prod(si[a + 1:])
    for b in range(len(so) - 1):
        if (math.prod(so[:b]) == pre and so[b] * so[b + 1] == n and math.prod(so[b + 2:]) == post
                and 1 <= so[b] <= n):
            t.b.set_heads(gid, so[b])
            return HLay(b, b + 1, gid)
    return None


def repeat_heads(t, lay: HLay, si: tuple, so: tuple) -> "HLay | None":
    """(.., Hkv, r, .., d) -> (.., Hkv * r, .., d): key/value heads repeated for grouped-query
    attention (repeat_kv); output head i comes from input head i // r."""
    h, u = lay.head_axis, lay.unit_axis
    if u is None or u <= h + 1 or len(so) != len(si) - 1:
        return None
    if so[:h] != si[:h] or so[h] != si[h] * si[h + 1] or so[h + 1:] != si[h + 2:]:
        return None
    return HLay(h, u - 1, lay.gid, lay.rep * si[h + 1])


def merge_heads(t, lay: HLay, si: tuple, so: tuple) -> Lay:
    """(.., H, dh, ..) -> (.., H*dh, ..): heads merged back into one feature axis; grouped-query
    output heads (each key/value head repeated rep times) give a segment with that rep."""
    h, u = lay.head_axis, lay.unit_axis
    if u == h - 1:
        raise Pin("reshape of per-head tensors interleaving the heads (a channel shuffle of one group's blocks, "
                  "ShuffleNet v1): a head's units would land the head count apart, which no member expresses")
    if u != h + 1:
        raise Pin("reshape of per-head tensors other than merging heads back")
    n = si[h] * si[u]
    size = t.b.n[t.b.find(lay.gid)]
    if n != size * lay.rep:
        raise Pin("merging heads of a group of another size")
    pre, post = math.prod(si[:h]), math.prod(si[u + 1:])
    for b in range(len(so)):
        if math.prod(so[:b]) == pre and so[b] == n and math.prod(so[b + 1:]) == post:
            return Lay(b, ((lay.gid, size, 1) if lay.rep == 1 else (lay.gid, size, 1, lay.rep),))
    raise Pin("reshape of per-head tensors other than merging heads back")


def split_parts(t, lay: Lay, si: tuple, so: tuple) -> "Fused | None":
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
                subs = t.b.split(gid, [n // p] * p)
                if subs is None:
                    return None
                if width == 1:
                    parts = tuple(Lay(b + 1, ((g, n // p, 1),)) for g in subs)
                else:
                    for g in subs:
                        t.b.set_heads(g, inner[0])
                    parts = tuple(HLay(b + 1, b + 2, g) for g in subs)
                return Fused(b, parts)
    return None


def index_fused(t, node: fx.Node, lay: Fused, idx: Any, nd: int) -> Any:
    """qkv[0] / qkv[:, :, 1]: an integer index on the parts axis, full slices elsewhere."""
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    if Ellipsis in idx or None in idx or len(idx) > lay.axis + 1:
        raise Pin("indexing a fused projection other than by part")
    if any(e != slice(None) for e in idx[:lay.axis]) or len(idx) != lay.axis + 1 or not isinstance(idx[-1], int):
        raise Pin("indexing a fused projection other than by part")
    return dropped(lay.parts[idx[-1]], lay.axis)


def index_heads(t, lay: HLay, idx: Any, nd: int) -> HLay:
    """Slices of per-head tensors (None inserts an axis): full over the heads; a slice of the units
    (rotary x[..., :d/2]) keeps whole heads permutable but fixes the units within them."""
    idx = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(e is Ellipsis for e in idx) > 1 or not all(isinstance(e, slice) or e is None or e is Ellipsis
                                                      for e in idx):
        raise Pin("indexing per-head tensors")
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
            raise Pin("indexing some heads of per-head tensors")
        if e != slice(None) and i_in == lay.unit_axis:
            t.b.fix_units(lay.gid)
        pos[i_in] = i_out
        i_in, i_out = i_in + 1, i_out + 1
    for i in range(i_in, nd):
        pos[i] = i_out + i - i_in
    return HLay(pos[lay.head_axis], None if lay.unit_axis is None else pos[lay.unit_axis], lay.gid, lay.rep)


HEAD_NORM = ("a normalisation over each head's units whose parameters every head shares: units keep their "
             "position within a head")


def head_norm(t, lay: HLay, ndim: int, k: int, params: list, what: str) -> HLay:
    """LayerNorm or RMSNorm over each head's units (timm's qk_norm): every head is normalised alike, so whole
    heads still move; its parameters index a unit's position within a head, which then stays (pinned)."""
    if k != 1 or lay.unit_axis != ndim - 1:
        raise Pin(f"{what} on per-head tensors over other axes than a head's units")
    t.b.fix_units(lay.gid)
    for p in params:
        if p:
            t.pin_axis(p, 0, HEAD_NORM)
    return lay


def cat_heads(t, lays: list, dim: int) -> HLay:
    """Per-head tensors laid out alike, concatenated along another axis, or along the units (rotary
    rotate_half: cat(-x2, x1)): one group, and in the second case its units stay in place."""
    first = lays[0]
    if not all(isinstance(lay, HLay) and (lay.head_axis, lay.unit_axis, lay.rep) == (
            first.head_axis, first.unit_axis, first.rep) for lay in lays):
        raise Pin("concatenation of per-head and other tensors")
    if dim == first.head_axis:
        raise Pin("concatenation of per-head tensors across heads")
    for lay in lays[1:]:
        t.b.union(first.gid, lay.gid)
    if dim == first.unit_axis:
        t.b.fix_units(first.gid)
    return first


def binary_heads(t, node: fx.Node, tensor_args: list, hl: list) -> HLay:
    """Per-head tensors with scalars, or with tensors constant across heads and units (a causal or
    padding mask broadcast over heads); anything varying per head (ALiBi) is not understood."""
    so = shape_of(node)
    a0, h0 = hl[0]
    sh = len(so) - len(shape_of(a0))
    out = HLay(h0.head_axis + sh, None if h0.unit_axis is None else h0.unit_axis + sh, h0.gid, h0.rep)
    for a in tensor_args:
        lay, sa = t.lay(a), shape_of(a)
        d = len(so) - len(sa)
        if isinstance(lay, HLay):
            if (lay.head_axis + d, None if lay.unit_axis is None else lay.unit_axis + d, lay.rep) != (
                    out.head_axis, out.unit_axis, out.rep):
                raise Pin("elementwise op between differently laid out per-head tensors")
            t.b.union(lay.gid, out.gid)
        else:
            if lay is not None:  # units of its own (a causal-mask buffer, a learned bias): pinned,
                if isinstance(lay, Fused):  # then read as a constant
                    raise Pin("elementwise op between per-head tensors and a fused projection")
                t.fix_value(lay, "combined with per-head tensors as a constant")
            if out.head_axis - d >= 0 and sa[out.head_axis - d] != 1:
                raise Pin("elementwise op on per-head tensors with a tensor that differs across heads")
            if out.unit_axis is not None and out.unit_axis - d >= 0 and sa[out.unit_axis - d] != 1:
                t.b.fix_units(out.gid)  # the same per-unit factor in every head (rotary cos/sin)
    return out


def matmul(t, node: fx.Node) -> Any:
    """Attention's two products: q @ k^T contracts units (q and k share a group, heads kept);
    scores @ v keeps v's units and pairs the score heads with v's heads (coupled groups)."""
    x, y = node.args[:2]
    lx, ly = t.lay(x), t.lay(y)
    if lx is None and ly is None:
        return None
    if not (isinstance(lx, HLay) and isinstance(ly, HLay)):
        raise Pin("matrix product involving permuted units")
    nx, ny, no = len(shape_of(x)), len(shape_of(y)), len(shape_of(node))
    hx, hy = lx.head_axis - nx, ly.head_axis - ny  # batch axes, counted from the end
    if hx != hy or hx > -3:
        raise Pin("matrix product across heads")
    if lx.unit_axis == nx - 1 and ly.unit_axis == ny - 2 and lx.rep == 1:  # q @ k^T
        if ly.rep > 1:  # keys repeated for grouped-query attention (repeat_kv)
            if not t.b.fold(lx.gid, ly.gid, ly.rep):
                raise Pin("grouped-query attention over projections tied to other tensors")
            return HLay(no + hx, None, ly.gid, ly.rep)
        g = t.b.union(lx.gid, ly.gid)
        t.b.mark(t.b.attention, g)
        return HLay(no + hx, None, g)
    if lx.unit_axis is None and ly.unit_axis == ny - 1 and lx.rep == ly.rep:  # scores @ v
        t.b.set_couple(lx.gid, ly.gid)
        return HLay(no + hx, no - 1, ly.gid, ly.rep)
    raise Pin("matrix product of per-head tensors in an unrecognised pattern")


def sdpa(t, node: fx.Node, q: Any, k: Any, v: Any, mask: Any, gqa: bool) -> Any:
    """softmax(q k^T / sqrt(d) + mask) v, heads on axis -3 and units last: q and k share a group
    (units within a head permute jointly), v's group shares the head permutation (coupled)."""
    lq, lk, lv = t.lay(q), t.lay(k), t.lay(v)
    if mask is not None and t.lay(mask) is not None:
        raise Pin("attention with a mask that carries permuted units")
    ms = shape_of(mask) if mask is not None else None
    if ms is not None and len(ms) >= 3 and ms[-3] != 1:  # a bias per head (ALiBi): heads are not alike
        raise Pin("attention with a mask or bias that differs across heads")
    if not all(isinstance(lay, HLay) for lay in (lq, lk, lv)):
        raise Pin("attention over tensors not split into heads")
    nq, nk, nv = len(shape_of(q)), len(shape_of(k)), len(shape_of(v))
    for lay, nd in ((lq, nq), (lk, nk), (lv, nv)):
        if lay.head_axis != nd - 3 or lay.unit_axis != nd - 1:
            raise Pin("attention whose heads are not on axis -3 or units not last")
    hq, hk, hv = shape_of(q)[-3], shape_of(k)[-3] * (1 if lk.rep > 1 else 1), shape_of(v)[-3]
    if lq.rep != 1 or lk.rep != lv.rep or hk != hv:
        raise Pin("attention with repeated query heads or unequal key/value heads")
    if lk.rep > 1 or hk != hq:  # grouped-query: key/value heads shared by consecutive query heads
        return grouped_query(t, node, lq, lk, lv, hq, hk // lk.rep if lk.rep > 1 else hk, gqa or lk.rep > 1)
    g = t.b.union(lq.gid, lk.gid)
    t.b.set_couple(g, lv.gid)
    no = len(shape_of(node))
    return HLay(no - 3, no - 1, lv.gid)


def grouped_query(t, node: fx.Node, lq: HLay, lk: HLay, lv: HLay, hq: int, hkv: int, ok: bool) -> HLay:
    """Grouped-query attention: query head i uses key/value head i // r (r = hq / hkv). Exact:
    permuting the key/value heads with their blocks of r query heads (and the output projection's
    matching columns); within a key/value head, its key units with the same units of each of its r
    query heads (one permutation per key head, shared by the group), and its value units with the
    output projection's columns of each of its r query heads. So: the query group folds into the
    key group as rep-r members (Member.rep), coupled as usual with the value group, whose merged
    output carries rep r into the output projection."""
    if not ok or hkv < 1 or hq % hkv:
        raise Pin("attention with fewer key/value heads than query heads, not grouped by enable_gqa or repeats")
    r = hq // hkv
    if not t.b.fold(lq.gid, lk.gid, r):
        raise Pin("grouped-query attention over projections tied to other tensors")
    t.b.set_couple(lk.gid, lv.gid)  # (marks both as attention heads)
    no = len(shape_of(node))
    return HLay(no - 3, no - 1, lv.gid, r)


def mha(t, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
    """nn.MultiheadAttention: its inputs share in_proj's input axis; out_proj's outputs are a new
    group; inside, whole heads permute as blocks, and units within a head permute jointly in q/k
    (one group) and in v/out_proj's input (a second group sharing the head permutation)."""
    name = node.target
    names = ("query", "key", "value")
    ins = [node.args[i] if len(node.args) > i else node.kwargs.get(names[i]) for i in range(3)]
    extra = [a for a in list(node.args[3:]) + [v for k, v in node.kwargs.items() if k not in names]
             if isinstance(a, fx.Node)]
    if extra:
        raise Pin("MultiheadAttention with masks")
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
        raise Pin("MultiheadAttention with separate q/k/v projections or extra key/value biases")
    lays = [t.lay(a) for a in ins]
    present = [lay for lay in lays if lay is not None]
    if present:
        if len(present) < 3:
            raise Pin("attention over a mix of permutable and unpermutable inputs")
        for a, lay in zip(ins, lays):
            if lay.axis != len(shape_of(a)) - 1 or any(sg[2] != 1 for sg in lay.segs):
                raise Pin("attention over a non-feature axis")
        lay = t.merge(present)  # one in_proj input axis: q, k and v inputs share a permutation
        t.add_members(lay, [(f"{name}.in_proj_weight", 1)])
    e, h = mod.embed_dim, mod.num_heads
    if h >= 1 and e // h >= 1:
        qk = t.b.new(e, f"{name}.qk")
        vo = t.b.new(e, f"{name}.vo")
        for off in (0, e):
            t.b.add(qk, Member(f"{name}.in_proj_weight", 0, off))
            if f"{name}.in_proj_bias" in t.sd_keys:
                t.b.add(qk, Member(f"{name}.in_proj_bias", 0, off))
        t.b.add(vo, Member(f"{name}.in_proj_weight", 0, 2 * e))
        if f"{name}.in_proj_bias" in t.sd_keys:
            t.b.add(vo, Member(f"{name}.in_proj_bias", 0, 2 * e))
        t.b.add(vo, Member(f"{name}.out_proj.weight", 1))
        t.b.heads[qk] = t.b.heads[vo] = h
        t.b.couple[qk], t.b.couple[vo] = vo, qk
        t.b.mark(t.b.attention, qk, vo)
    so = shape_of(node)
    nd = len(so[0]) if so and isinstance(so[0], (tuple, list)) else len(shape_of(ins[0]))
    out = t.fresh(e, f"{name}.out_proj", nd - 1, [(f"{name}.out_proj.weight", 0), (f"{name}.out_proj.bias", 0)])
    return (out, None)


def _sdpa(t, node):
    return sdpa(t, node, node.args[0], node.args[1], node.args[2], arg(node, 3, "attn_mask"),
               bool(arg(node, 7, "enable_gqa", False)))

