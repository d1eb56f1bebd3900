"""Permutations as plain data: {group name: index tensor}, applied to state dicts.

Convention: a permutation `p` of a group of size n puts unit p[i] of the input at position i
(new = old.index_select(axis, p)). Head groups permute whole heads as blocks and units within each.
"""

from __future__ import annotations

import torch

from .hierarchy import family_of, nested
from .spec import PermutationSpec


def identity(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {k: torch.arange(g.size) for k, g in spec.groups.items()}


def inverse(perm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.argsort(p) for k, p in perm.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A uniformly random legal permutation (head groups: heads permuted together, units within each; nested
    groups: each child's blocks following its parent's units, its units reordered within each block)."""
    out: dict[str, torch.Tensor] = {}
    parents = {g.parent for g in spec.groups.values()}
    for k, g in spec.groups.items():
        if g.parent is not None or k in parents:
            for kk in family_of(spec, k):  # nested groups: the root, then each child following its parent
                if kk not in out:
                    gg = spec.groups[kk]
                    out[kk] = (torch.randperm(gg.size, generator=generator) if gg.parent is None else
                               nested(out[gg.parent], [torch.arange(gg.size // gg.heads) if gg.head_only else
                                                       torch.randperm(gg.size // gg.heads, generator=generator)
                                                       for _ in range(gg.heads)]))
        elif g.heads:
            if k in out:
                continue
            hp = torch.randperm(g.heads, generator=generator)
            for name in [k] + ([g.couple] if g.couple else []):
                dh = spec.groups[name].size // g.heads  # (coupled groups may differ in size: a grouped conv's sides)
                out[name] = head_perm(hp, [torch.arange(dh) if spec.groups[name].head_only else
                                            torch.randperm(dh, generator=generator) for _ in range(g.heads)], dh)
        else:
            out[k] = torch.randperm(g.size, generator=generator)
    return out


def head_perm(head_perm: torch.Tensor, within: list[torch.Tensor], dh: int) -> torch.Tensor:
    """Position block i takes source head head_perm[i], its units reordered by within[i]."""
    return torch.cat([int(h) * dh + w for h, w in zip(head_perm, within)])


def member_plan(spec: PermutationSpec, tensors=None) -> dict[str, list[tuple[int, int, int, int, str, int, int, int]]]:
    """tensor -> [(axis, offset, size, block, group, rep, heads, by)], over the tensors named in `tensors` if
    given (rep, heads and by: see Member)."""
    keep = None if tensors is None else set(tensors)
    plan: dict[str, list] = {}
    for k, g in spec.groups.items():
        for m in g.members:
            if keep is None or m.tensor in keep:
                plan.setdefault(m.tensor, []).append((m.axis, m.offset, g.size, m.block, k, m.rep, g.heads, m.by))
    return plan


def within_block(item) -> bool:
    """A plan item of a member that holds one block's units, chosen along another axis (Member.by)."""
    return len(item) > 7 and item[7] >= 0


def _member_index(p: torch.Tensor, n: int, blk: int, rep: int = 1, heads: int = 0) -> torch.Tensor:
    """The gather index within one member's slice (n * blk * rep long) for its group's permutation p."""
    p = p.cpu().long()
    if rep == 1:
        return p if blk == 1 else (p.view(-1, 1) * blk + torch.arange(blk)).reshape(-1)
    h = heads or 1
    dh = n // h
    src = p.view(h, 1, dh, 1)  # viewed as (heads, rep, units per head, block): every copy alike
    idx = (src // dh * (rep * dh * blk) + torch.arange(rep).view(1, rep, 1, 1) * (dh * blk)
           + src % dh * blk + torch.arange(blk))
    return idx.reshape(-1)


def axis_index(length: int, items, perm) -> torch.Tensor:
    """The gather index along one axis for the groups (items, as _plan's) owning slices of it."""
    if len(items) == 1 and items[0][1] == 0 and items[0][2] * items[0][3] * _rep(items[0]) == length:
        _, _, n, blk, k, *rest = items[0]  # one group owns the whole axis (the usual case)
        return _member_index(perm[k], n, blk, *rest[:2])
    idx = torch.arange(length)
    for _, off, n, blk, k, *rest in items:
        idx[off:off + n * blk * (rest[0] if rest else 1)] = off + _member_index(perm[k], n, blk, *rest[:2])
    return idx


def _rep(item) -> int:
    return item[5] if len(item) > 5 else 1


def unit_major(t: torch.Tensor, ax: int, off: int, n: int, blk: int, rep: int = 1, heads: int = 0):
    """A member's slice with its axis moved first and ordered unit by unit (a unit's rep copies and
    block adjacent): reshaped to (n, -1), row i holds everything unit i owns."""
    s = t.narrow(ax, off, n * blk * rep).movedim(ax, 0)
    if rep == 1:
        return s
    h = heads or 1
    return s.reshape(h, rep, n // h, blk, *s.shape[1:]).transpose(1, 2).reshape(n * rep * blk, *s.shape[1:])


def local_orders(p: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads, units per block): row b is the within-block order that a head-structured permutation p
    gives the units of B's block b (wherever the block goes)."""
    p = p.cpu().long().view(heads, -1)
    dh = p.shape[1]
    out = torch.empty_like(p)
    out[p[:, 0] // dh] = p % dh
    return out


def permute_within(t: torch.Tensor, item, perm) -> torch.Tensor:
    """A Member.by axis permuted: each part of axis `by` (one block of rows) reordered by the local order of
    the block it reads. Applied before axis `by` itself is permuted, so a part is found by its old position;
    the result is the same as after, because the group owning axis `by` moves blocks as this group does."""
    ax, _, n, _, k, _, heads, by = item
    local = local_orders(perm[k], heads)
    rows = t.shape[by] // heads
    s = t.movedim((by, ax), (0, 1))
    idx = local.repeat_interleave(rows, 0).to(t.device).view(t.shape[by], n // heads, *[1] * (s.dim() - 2))
    return s.gather(1, idx.expand_as(s)).movedim((0, 1), (by, ax))


def permute_tensor(t: torch.Tensor, items, perm) -> torch.Tensor:
    axes: dict[int, list] = {}
    for it in items:
        if within_block(it):
            t = permute_within(t, it, perm)
            continue
        axes.setdefault(it[0], []).append(it)
    for ax, its in axes.items():
        t = t.index_select(ax, axis_index(t.shape[ax], its, perm).to(t.device))
    return t


class CpuThreads:
    """Run small CPU work on one thread: matrices of a few hundred rows gain little from threads on an idle
    machine and lose 10-50x to OpenMP contention on a busy one. Large problems keep torch's setting."""

    def __init__(self, numel: int, device: torch.device):
        self.active = device.type == "cpu" and numel < (1 << 24)

    def __enter__(self):
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.saved)


def apply_permutation(spec: PermutationSpec, sd: dict, perm: dict[str, torch.Tensor]) -> dict:
    """A new state dict with every tensor axis a group touches permuted (parameters and buffers; tied
    names, one tensor under two names, stay one tensor)."""
    missing = set(spec.groups) - set(perm)
    if missing:
        raise ValueError(f"permutation lacks groups {sorted(missing)[:5]}")
    out = dict(sd)
    plan = {t: items for t, items in member_plan(spec).items() if t in sd}
    if not plan:
        return out
    done: dict[tuple, torch.Tensor] = {}  # tied names (an embedding and its output head): one result, shared
    with CpuThreads(sum(sd[t].numel() for t in plan), sd[next(iter(plan))].device):
        for name, items in plan.items():
            t = sd[name]
            key = (t.data_ptr(), t.dtype, t.shape, t.stride(), tuple(items)) if t.numel() else (name,)
            if key not in done:
                done[key] = permute_tensor(t, items, perm)
            out[name] = done[key]
    return out


def distance(sd_a: dict, sd_b: dict, keys=None) -> float:
    """L2 distance over the floating-point tensors named in `keys` (default: all, buffers included).

    Alignment is judged with keys=spec.parameters: weight matching minimises the distance between
    parameters only, so that is the distance aligning never increases (BatchNorm running statistics
    are data summaries, recomputed along interpolation paths, not weights)."""
    tot = 0.0
    for k in (sd_a if keys is None else keys):
        a = sd_a[k]
        if torch.is_floating_point(a):
            tot += float((a.double() - sd_b[k].double()).pow(2).sum())
    return tot ** 0.5


def slice_rows(t: torch.Tensor, ax: int, off: int, n: int, blk: int, rep: int = 1, heads: int = 0) -> torch.Tensor:
    return unit_major(t, ax, off, n, blk, rep, heads).reshape(n, -1)
