"""The finished spec from the tracer's groups: tied tensors merged, groups named, attention halves
coupled, every pinned axis listed with its reason."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.nn as nn

from .builder import GroupBuilder
from .rules.common import GROUPED_INPUTS
from .spec import Group, Member, PermutationSpec, Unpermuted

PARTNER_PINNED = "the group its blocks (attention heads, convolution groups) are coupled with is unpermutable"
PARENT_PINNED = ("its blocks (a convolution's groups of one input channel) follow the units of a group that is "
                 "unpermutable")
CHILD_PINNED = ("units whose order a pinned group's blocks follow (a convolution with one input channel per "
                "group reads them): pinned with it")
ONE_BLOCK = ("units keeping their order in the one block that follows a single unit (a channel shuffle's row tied to "
             "a unit that a later chunk or slice cut down to one): only the identity is left")
NESTED_MIXED = ("convolution groups of one input channel nested with another block structure on the same units "
                "(attention heads, GroupNorm groups, a grouped convolution's coupled groups): not expressed, so "
                "pinned")


def assemble(tr: Any, model: nn.Module, sd: dict, trace_error: str | None = None, capture: str = "fx",
             capture_error: str | None = None) -> PermutationSpec:
    """The finished spec: tied and shared tensors merged into one group, groups named, attention halves
    coupled, and every pinned axis listed with its reason."""
    params = {n for n, _ in model.named_parameters()}
    pinned = {a: why for t, why in tr.pinned.items() for a in tr.aliases.get(t, [t])}
    _merge_shared(tr, pinned)
    _pin_parents(tr.b)
    groups, unperm = _named_groups(tr.b)
    _couple_heads(tr.b, groups, unperm)
    _nest_families(tr.b, groups, unperm)
    _check_within_blocks(groups, unperm, sd)
    unperm += _pinned_elsewhere(pinned, groups, unperm, sd)
    if trace_error:
        unperm.append(Unpermuted("whole model", trace_error))
    return PermutationSpec(groups, unperm, {k: list(v.shape) for k, v in sd.items()},
                           [k for k in sd if k in params], capture, capture_error or trace_error)


def _merge_shared(tr: Any, pinned: dict[str, str]) -> None:
    """Tied tensors: every name of one tensor is permuted alike; a group touching a pinned tensor is
    pinned; a tensor axis slice owned by two groups makes them one group (shared weights)."""
    b = tr.b
    roots = list(dict.fromkeys(b.find(g) for g in range(len(b.parent))))  # in trace order: names stay stable
    for r in roots:
        b.members[r] = list(dict.fromkeys(replace(m, tensor=a) for m in b.members[r]
                                          for a in tr.aliases.get(m.tensor, [m.tensor])))
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


def _named_groups(b: GroupBuilder) -> tuple[dict[str, Group], list[Unpermuted]]:
    """One named Group per permutable root; roots with a reason (or rotary units outside heads) listed
    as unpermuted; single units dropped (nothing to permute)."""
    groups: dict[str, Group] = {}
    unperm: list[Unpermuted] = []
    for r in dict.fromkeys(b.find(g) for g in range(len(b.parent))):
        members = list(dict.fromkeys(b.members[r]))
        if not members:
            continue
        what = ", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in members))
        axes = [[m.tensor, m.axis, m.offset, m.span(b.n[r], b.heads[r])] for m in members]
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
        b.named[r] = name
    return groups, unperm


def _couple_heads(b: GroupBuilder, groups: dict[str, Group], unperm: list[Unpermuted]) -> None:
    """Attention: couple each q/k group with its v/o group by name; a group whose partner is pinned is
    pinned too (they share the head permutation)."""
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
                                         PARTNER_PINNED,
                                         [[m.tensor, m.axis, m.offset, m.span(gr.size, gr.heads)]
                                          for m in gr.members]))


def _pin_parents(b: GroupBuilder) -> None:
    """A pinned group's blocks cannot move, so neither can the units they follow (up the whole chain)."""
    todo = [r for r in dict.fromkeys(b.find(g) for g in range(len(b.parent))) if b.reasons[r]]
    while todo:
        r = b.find(todo.pop())
        p = b.nested_in[r]
        if p is not None and not b.reasons[b.find(p)]:
            b.fix(p, CHILD_PINNED)
            todo.append(p)


def _nest_families(b: GroupBuilder, groups: dict[str, Group], unperm: list[Unpermuted]) -> None:
    """Name each nested group's parent (hierarchy.py). A family is kept only where the tree is plain: every
    child's blocks are its parent's units, the root has no blocks and nothing is coupled; else the family
    is pinned (never a wrong permutation). A child whose parent is pinned is pinned too."""
    for r, name in b.named.items():
        p = b.find(b.nested_in[r]) if b.nested_in[r] is not None else None
        if p is None or name not in groups:
            continue
        if b.n[p] == 1 and not b.reasons[p] and not groups[name].head_only:  # one block: its units move freely
            groups[name].heads = 0
        elif b.n[p] == 1 and not b.reasons[p]:
            g = groups.pop(name)
            unperm.append(Unpermuted(", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in g.members)), ONE_BLOCK,
                                     [[m.tensor, m.axis, m.offset, m.span(g.size, g.heads)] for m in g.members]))
        else:
            groups[name].parent = b.named.get(p, "")
    while True:
        bad = {k: PARENT_PINNED for k, g in groups.items() if g.parent is not None and g.parent not in groups}
        bad.update({k: PARTNER_PINNED for k, g in groups.items() if g.couple is not None and g.couple not in groups})
        for k, g in groups.items():
            if g.parent is not None or any(h.parent == k for h in groups.values()):
                fam = _family(groups, k)
                if any(_mixed(groups, kk) for kk in fam):
                    bad.update(dict.fromkeys(fam, NESTED_MIXED))
        if not bad:
            return
        for k, why in bad.items():
            gr = groups.pop(k)
            unperm.append(Unpermuted(", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in gr.members)), why,
                                     [[m.tensor, m.axis, m.offset, m.span(gr.size, gr.heads)] for m in gr.members]))


def _family(groups: dict[str, Group], k: str) -> list[str]:
    """Group k's root and every group below it (parents that are missing end the walk up)."""
    while groups[k].parent in groups:
        k = groups[k].parent
    out = [k]
    for x in out:
        out += [kk for kk, g in groups.items() if g.parent == x]
    return out


def _mixed(groups: dict[str, Group], k: str) -> bool:
    """A member of a family with a structure the tree does not express."""
    g = groups[k]
    return (g.couple is not None or (g.parent is None and (g.heads > 0 or g.head_only))
            or (g.parent in groups and g.heads != groups[g.parent].size))


def _check_within_blocks(groups: dict[str, Group], unperm: list[Unpermuted], sd: dict) -> None:
    """A within-block member (Member.by: a grouped convolution's input axis) is exact only where the tensor's
    axis `by` is owned, whole and plainly, by the group coupled with this one (the same block permutation)
    and nothing else permutes the tensor. Elsewhere (a grouped convolution reading its own output through a
    residual, say) the units keep their order within a block: the member is dropped and its axis pinned."""
    owners: dict[str, list[tuple[str, Member]]] = {}
    for k, g in groups.items():
        for m in g.members:
            owners.setdefault(m.tensor, []).append((k, m))
    for k, g in groups.items():
        for m in [m for m in g.members if m.by >= 0]:
            partner = groups.get(g.couple) if g.couple else None
            rows = [(o, r) for o, r in owners[m.tensor] if r != m]
            ok = (partner is not None and partner.name != k and partner.heads == g.heads > 0 and m.offset == 0
                  and m.block == m.rep == 1 and len(rows) == 1 and rows[0][0] == partner.name
                  and rows[0][1] == Member(m.tensor, m.by) and sd[m.tensor].shape[m.by] == partner.size
                  and sd[m.tensor].shape[m.axis] * g.heads == g.size)
            if not ok:
                g.members.remove(m)
                g.head_only = True
                unperm.append(Unpermuted(f"{m.tensor}[{m.axis}]", GROUPED_INPUTS,
                                         [[m.tensor, m.axis, 0, sd[m.tensor].shape[m.axis]]]))


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
