"""Nested groups: a group whose blocks move as the units of another group do (Group.parent).

A convolution with one input channel per group (a depthwise convolution with a channel multiplier r, as in
PNASNet's and Xception's separable convolutions) reads input channel i into the r output channels of its
block i and nothing else: permuting the inputs by p is undone by moving the outputs' blocks by the same p,
and the r outputs of a block may also be reordered among themselves. So the outputs are a group of
`heads` = (the inputs' count) blocks whose block permutation *is* the inputs' permutation, and whatever that
permutation is constrained by (the inputs may themselves follow an earlier group's units) the outputs
inherit. Chains of such convolutions nest: a family is a root group (no parent) with every group whose
blocks descend from it, one tree. A rigid child (Group.head_only) keeps its units' order within a block:
a channel shuffle's row whose units join another row's coarser units (rules/shapes.py). Every solver
takes a family as one unit (matching.assign); a legal permutation of it is the root's permutation, then
each child's blocks following its parent's units and its units reordered within each block (rigid: not).
"""

from __future__ import annotations

import torch

from .spec import PermutationSpec


def family_of(spec: PermutationSpec, k: str) -> tuple[str, ...]:
    """The family of group k (k alone if it has no parent and no children): the root first, then every
    descendant after its parent."""
    root, seen = k, {k}
    while spec.groups[root].parent is not None:
        root = spec.groups[root].parent
        if root in seen or root not in spec.groups:
            raise ValueError(f"group {k}'s parents do not end in a root group: the spec is not a valid one")
        seen.add(root)
    kids: dict[str, list[str]] = {}
    for name, g in spec.groups.items():
        if g.parent is not None:
            kids.setdefault(g.parent, []).append(name)
    out, i = [root], 0
    while i < len(out):
        out += kids.get(out[i], [])
        i += 1
    return tuple(out)


def solving_units(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """The units every solver assigns at once, in the spec's order: a family of nested groups (root first),
    a coupled pair of block groups (attention q/k with v/o, a grouped convolution's two sides), or a group."""
    out, done = [], set()
    parents = {g.parent for g in spec.groups.values()}
    for k, g in spec.groups.items():
        if k in done:
            continue
        u = family_of(spec, k) if g.parent is not None or k in parents else (k, g.couple) if g.couple else (k,)
        done.update(u)
        out.append(u)
    return out


def is_family(spec: PermutationSpec, u: tuple[str, ...]) -> bool:
    return any(spec.groups[k].parent is not None for k in u)


def parents_in(spec: PermutationSpec, u: tuple[str, ...]) -> list[int]:
    """Each member's parent as a position in u (-1: the root)."""
    return [u.index(spec.groups[k].parent) if spec.groups[k].parent is not None else -1 for k in u]


def nested(parent_perm: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
    """A child's permutation: position block i takes the block of B's unit parent_perm[i], its units
    reordered by within[i] (the convention of permutations.py: p[i] is the source of position i)."""
    r = len(within[0]) if within else 1
    return torch.cat([int(s) * r + w for s, w in zip(parent_perm.tolist(), within)])
