"""Weight matching (Git Re-Basin): the permutation of B that brings its parameters closest to A's in L2,
by coordinate descent over groups, one linear assignment per group (head groups: block-structured).
`weight_matching(spec, a, b)` returns the p to apply to b (conventions: permutations.py).
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .permutations import (CpuThreads, axis_index, identity, local_orders, member_plan, permute_tensor, slice_rows,
                           unit_major, within_block)
from .hierarchy import is_family, parents_in, solving_units
from .spec import PermutationSpec


def lsa(score: np.ndarray) -> np.ndarray:
    """The assignment maximising `score` (columns for rows 0..n-1). Solved as the equivalent
    minimisation of rowmax - score, column-reduced: same optima, and scipy is ~1.35x faster on the
    near-degenerate matrices of BatchNorm networks than with maximize=True."""
    d = score.max(1, keepdims=True) - score
    d -= d.min(0)
    return linear_sum_assignment(d)[1]


def solve_blocks(costs: list[np.ndarray], heads: int, fixed: list[bool] | tuple = (), bilinear: list = (),
                 start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Best block-structured assignment for groups sharing one block permutation (attention q/k with v/o,
    a grouped convolution's inputs with its outputs). costs: one (A unit x B unit, float64) matrix per
    group; fixed[i]: group i's units keep their order within a block (rotary q/k): whole blocks move only.
    bilinear: (i, j, A, B) terms <A, B with its rows in group i's and its columns in group j's within-block
    order>, A and B shaped (blocks, rows per block, columns per block, rest) (a grouped convolution's
    weight). With them, the within-block orders of each pairing of A's block a with B's block b come from
    one round of assignments (each group given the others' orders, starting at `start`'s order of block b,
    a new order taken only if it gains); the block permutation is the best on those values, and its chosen
    pairings then alternate to convergence. Each step only gains, so the value `start` has never drops.
    Without them each within-block order is one assignment."""
    fixed = list(fixed) + [False] * (len(costs) - len(fixed))
    sizes = [c.shape[0] // heads for c in costs]
    mats = [c.reshape(heads, d, heads, d).transpose(0, 2, 1, 3) for c, d in zip(costs, sizes)]
    pa, pb = np.repeat(np.arange(heads), heads), np.tile(np.arange(heads), heads)  # every pairing (a, b)
    begin = ([local_orders(p, heads).numpy() for p in start] if start is not None and bilinear else
             [np.tile(np.arange(d), (heads, 1)) for d in sizes])
    ws = [o[pb] for o in begin]  # (pairings, units per block) per group
    _round(mats, fixed, bilinear, pa, pb, ws)
    hp = lsa(_values(mats, bilinear, pa, pb, ws).reshape(heads, heads))
    chosen = np.arange(heads) * heads + hp
    ws = [w[chosen] for w in ws]
    for _ in range(50 if bilinear else 0):
        if not _round(mats, fixed, bilinear, np.arange(heads), hp, ws):
            break
    return [torch.from_numpy((hp[:, None] * d + w).reshape(-1)).long() for w, d in zip(ws, sizes)]


def solve_family(costs: list[np.ndarray], parents: list[int], rigid: list[bool] | tuple = ()) -> list[torch.Tensor]:
    """The best legal permutation of a family of nested groups (hierarchy.py) for costs linear in each
    group's permutation: costs[i] is group i's (A unit x B unit) matrix, parents[i] its parent's position
    (-1: the root, listed first; each child after its parent). Exact, by dynamic programming up the tree:
    the value of putting B's unit j of a parent at A's position i is its own cost plus, for each child, the
    best assignment of the child's block j to its block i (itself such a value, from the child's children);
    then the root's assignment, and down the tree each chosen block's best order within it (rigid[i]: group
    i's units keep their order within a block)."""
    rigid = list(rigid) + [False] * (len(costs) - len(rigid))
    value = [c.astype(np.float64, copy=True) for c in costs]
    orders: list = [None] * len(costs)
    for k in reversed(range(len(costs))):
        if parents[k] >= 0:
            m = value[parents[k]].shape[0]
            r = value[k].shape[0] // m
            blocks = value[k].reshape(m, r, m, r).transpose(0, 2, 1, 3)
            if rigid[k]:
                best, orders[k] = np.trace(blocks, axis1=2, axis2=3), np.broadcast_to(np.arange(r), (m, m, r))
            else:
                best, orders[k] = _block_pairings(blocks)
            value[parents[k]] += best
    perms: list = [None] * len(costs)
    for k in range(len(costs)):
        if parents[k] < 0:
            perms[k] = lsa(value[k])
        else:
            src = perms[parents[k]]
            r = orders[k].shape[-1]
            perms[k] = (src[:, None] * r + orders[k][np.arange(len(src)), src]).reshape(-1)
    return [torch.from_numpy(np.asarray(p)).long() for p in perms]


def _block_pairings(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, m, r, r) score blocks -> (m, m) best assignment value of each and (m, m, r) its order: every
    order of r at once where r is small (r! of them), else one assignment per pairing."""
    m, r = blocks.shape[0], blocks.shape[-1]
    if math.factorial(r) * m * m <= 1 << 22:
        orders = np.array(list(itertools.permutations(range(r))), dtype=np.int64)  # (r!, r)
        vals = blocks[:, :, np.arange(r)[None, :], orders].sum(-1)  # (m, m, r!)
        pick = vals.argmax(-1)
        return np.take_along_axis(vals, pick[..., None], -1)[..., 0], orders[pick]
    flat = blocks.reshape(m * m, r, r)
    order = np.stack([lsa(x) for x in flat])
    best = np.take_along_axis(flat, order[:, :, None], 2)[..., 0].sum(1)
    return best.reshape(m, m), order.reshape(m, m, r)


def assign(spec: PermutationSpec, u: tuple[str, ...], costs: list[np.ndarray]) -> list[torch.Tensor]:
    """The best legal permutation of a solving unit (hierarchy.solving_units) for costs linear in each of its
    groups' permutations (one (A unit x B unit) matrix per group): a family, a coupled pair of block groups
    or one group."""
    if is_family(spec, u):
        return solve_family(costs, parents_in(spec, u), head_only_flags(spec, u))
    if spec.groups[u[0]].heads:
        return solve_blocks(costs, spec.groups[u[0]].heads, head_only_flags(spec, u))
    return [torch.from_numpy(lsa(costs[0])).long()]


def _round(mats: list, fixed: list, bilinear: list, pa: np.ndarray, pb: np.ndarray, ws: list) -> bool:
    """One assignment per group and pairing (pa[p], pb[p]), the other groups' orders held at ws (updated in
    place; with bilinear terms a new order only where it gains) -> whether any order moved."""
    moved = False
    rows = np.arange(len(pa))[:, None]
    for g, m in enumerate(mats):
        if fixed[g]:
            continue
        c = m[pa, pb] + sum(_bilinear_cost(g, t, pa, pb, ws) for t in bilinear)
        new = np.stack([lsa(x) for x in c])
        units = np.arange(c.shape[1])[None, :]
        take = (c[rows, units, new].sum(1) > (old := c[rows, units, ws[g]].sum(1)) + 1e-12 * np.maximum(1.0, abs(old))
                if bilinear else np.ones(len(pa), dtype=bool))
        moved = moved or bool((new[take] != ws[g][take]).any())
        ws[g][take] = new[take]
    return moved


def _bilinear_cost(g: int, term: tuple, pa: np.ndarray, pb: np.ndarray, ws: list):
    """Group g's within-block cost matrices (pairings x units x units) from one bilinear term, the other
    group's orders held at ws (0 if g is on neither side)."""
    i, j, A, B = term
    if g not in (i, j):
        return 0.0
    n = len(pa)
    if g == i:  # B's columns in j's order of each pairing: sum over columns and rest of A's row r, B's row s
        a = A.transpose(0, 2, 1, 3)[pa]  # (pairings, columns, rows, rest)
        b = B.transpose(0, 2, 1, 3)[pb[:, None], ws[j]]
        return np.einsum("pcrk,pcsk->prs", a, b, optimize=True)
    b = B[pb[:, None], ws[i]]  # B's rows in i's order: sum over rows and rest of A's column c, B's column v
    return np.einsum("prck,prvk->pcv", A[pa], b, optimize=True)


def _values(mats: list, bilinear: list, pa: np.ndarray, pb: np.ndarray, ws: list) -> np.ndarray:
    """The value of each pairing at the orders ws: its groups' costs and its bilinear terms."""
    rows = np.arange(len(pa))[:, None]
    v = sum(m[pa, pb][rows, np.arange(w.shape[1])[None, :], w].sum(1) for m, w in zip(mats, ws))
    for i, j, A, B in bilinear:
        b = B[pb[:, None], ws[i]]  # (pairings, rows in i's order, columns, rest)
        b = np.take_along_axis(b, ws[j][:, None, :, None], axis=2)
        v = v + (A[pa] * b).reshape(len(pa), -1).sum(1)
    return v


def head_only_flags(spec: PermutationSpec, names) -> list[bool]:
    return [spec.groups[k].head_only for k in names]


def np64(c: torch.Tensor) -> np.ndarray:
    return c.detach().cpu().double().numpy()


_POOL_MIN_SIZE = 128
_INCREMENTAL_MIN_MACS = 1 << 20  # a cost term updated from the units that moved, not recomputed, from this size


INITS = ("informed", "identity", "sorted")  # weight_matching's named starts


def weight_matching(spec: PermutationSpec, sd_a: dict, sd_b: dict, *, seed: int = 0, max_iter: int = 100,
                    init: dict[str, torch.Tensor] | str | None = "informed",
                    workers: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Git Re-Basin weight matching -> (perm to apply to B, {"iterations", "converged", "groups", "init"}).

    The objective is Ainsworth et al.'s: the L2 distance between *parameters* (spec.parameters);
    buffers such as BatchNorm running statistics are permuted by apply_permutation but not matched.
    init "informed" (default): coordinate descent from the identity whose first pass visits the groups
    in trace order (from the input on) and matches each only on what is known when its turn comes: its
    fixed terms (parameters no other group permutes: biases, norm affines, first-layer weights,
    classifier columns) and the groups already solved in that pass. The paper's first pass also reads
    each neighbour not yet solved through its arbitrary identity order; in tiny networks (ViTs and
    MLPs a few units wide) that noise outweighs the fixed terms and sends the descent to a wrong,
    self-consistent optimum: 2-3% of their permuted copies were not recovered. Informed, a copy is
    recovered exactly (its fixed terms are maximised by the true permutation alone, and so is each
    later step once its neighbours are right), and independent pairs need fewer passes. Half-blind
    first steps may lower the objective: if the result ends farther from A than B itself, the
    paper's descent runs instead, so the distance to A never grows.
    init "identity": the paper's algorithm, coordinate descent from the identity.
    init "sorted": start from a permutation-invariant matching (each unit described by the sorted
    values of its weights, which no other group's permutation changes); about 2-4x the cost. If that
    start ends farther from A than the identity would, the descent from the identity runs too and the
    better result is kept. Or a dict of permutations to start from.
    workers: threads solving independent assignments at once (default: torch's thread count, at most
    4); the result is identical for every value.
    """
    plan = member_plan(spec, spec.parameters)
    if not plan:
        return identity(spec), {"iterations": 0, "converged": True, "groups": len(spec.groups), "init": "identity"}
    if workers is None:
        workers = min(torch.get_num_threads(), 4)
    numel = sum(sd_a[t].numel() for t in plan)
    kw = dict(seed=seed, max_iter=max_iter, workers=workers)
    with CpuThreads(numel, sd_a[next(iter(plan))].device):
        if isinstance(init, dict):
            perm, info, _ = _weight_matching(spec, sd_a, sd_b, init=init, **kw)
            return perm, {**info, "init": "given"}
        if init == "informed":
            perm, info, (gain, scale) = _weight_matching(spec, sd_a, sd_b, informed=True, **kw)
            ok = gain > 1e-4 * scale  # gained beyond the rounding of the weights' dtype
            if not ok and gain >= -1e-4 * scale:  # within rounding of 0 (or no step taken): decide in float64
                ok = scale == 0 or _objective(spec, sd_a, sd_b, perm) >= _objective(spec, sd_a, sd_b, identity(spec))
            if ok:
                return perm, {**info, "init": "informed"}
            init = "identity"  # it ended farther from A than B itself: the paper's descent instead
        if init in (None, "identity"):
            perm, info, _ = _weight_matching(spec, sd_a, sd_b, **kw)
            return perm, {**info, "init": "identity"}
        if init != "sorted":
            raise ValueError(f"init must be one of {INITS} or a permutation dict, got {init!r}")
        perm, info, _ = _weight_matching(spec, sd_a, sd_b, init=_sorted_init(spec, sd_a, sd_b), **kw)
        info["init"] = "sorted"
        if _objective(spec, sd_a, sd_b, perm) < _objective(spec, sd_a, sd_b, identity(spec)):
            perm2, info2, _ = _weight_matching(spec, sd_a, sd_b, **kw)
            if _objective(spec, sd_a, sd_b, perm2) > _objective(spec, sd_a, sd_b, perm):
                perm, info = perm2, {**info2, "init": "identity"}
        return perm, info


def _objective(spec: PermutationSpec, sd_a: dict, sd_b: dict, perm: dict) -> float:
    """sum over permuted parameters of <A, perm(B)> (the rest of the distance does not depend on perm)."""
    plan = member_plan(spec, spec.parameters)
    return sum(float((sd_a[t].double() * permute_tensor(sd_b[t], items, perm).double()).sum())
               for t, items in plan.items())


def _sorted_init(spec: PermutationSpec, sd_a: dict, sd_b: dict) -> dict[str, torch.Tensor]:
    """Per group, match units by -||sort(a_i) - sort(b_j)||^2 summed over the parameters it touches: the
    sorted values of a unit's slice are invariant to every other group's permutation."""
    params = set(spec.parameters)
    out: dict[str, torch.Tensor] = {}
    for ks in solving_units(spec):
        cs = []
        for kk in ks:
            n = spec.groups[kk].size  # (coupled groups may differ in size: a grouped conv's two sides)
            c = torch.zeros(n, n)
            for m in spec.groups[kk].members:
                if m.tensor not in params or m.by >= 0:  # (a within-block axis: sorted along its rows' axis)
                    continue
                where = (m.axis, m.offset, n, m.block, m.rep, spec.groups[kk].heads)
                a = slice_rows(sd_a[m.tensor].float(), *where).sort(dim=1).values
                b = slice_rows(sd_b[m.tensor].float(), *where).sort(dim=1).values
                c += 2 * a @ b.T - (a * a).sum(1, keepdim=True) - (b * b).sum(1)
            cs.append(np64(c))
        if not any(m.tensor in params for kk in ks for m in spec.groups[kk].members):
            out.update({kk: torch.arange(spec.groups[kk].size) for kk in ks})  # nothing to match: keep the order
        else:
            out.update(zip(ks, assign(spec, ks, cs)))
    return out


def _group_costs(spec: PermutationSpec, plan: dict, A: dict, B: dict):
    """Per group k: (constant part of its cost matrix or None, varying terms), so that
    cost_k = const + sum over terms of rows(A) @ rows(B permuted along the other groups' axes).T; and the
    bilinear terms: tensor -> (row group, within-block group, A, B as (blocks, rows, columns, rest)), the
    tensors with a within-block axis (Member.by: a grouped convolution's weight), solved with their two
    coupled groups at once (solve_blocks).

    Everything that does not change during the descent is prepared once: A's row matrices, and B's
    slice with k's axis moved first, so a step costs one gather per other axis and a matmul. Both are
    views where they can be (a weight's second axis: its transpose), not copies: alignment's memory stays
    within a few model copies. A tensor no other group permutes (on another axis) contributes a constant
    term."""
    fixed: dict[str, list] = {k: [] for k in spec.groups}  # (rows of A, rows of B) of the constant part
    terms: dict[str, list] = {k: [] for k in spec.groups}
    bilinear: dict[str, tuple] = {}
    for t, items in plan.items():
        inner = [it for it in items if within_block(it)]
        if inner:  # (assembly checked: one more item, the coupled group's, whole along axis `by`)
            ax, _, n, _, k, _, heads, by = inner[0]
            row = next(it[4] for it in items if it is not inner[0])
            shape = (heads, A[t].shape[by] // heads, n // heads, -1)
            bilinear[t] = (row, k, *(x[t].movedim((by, ax), (0, 1)).reshape(shape) for x in (A, B)))
            continue
        for ax, off, n, blk, k, rep, heads, _ in items:
            if ax == 0 and off == 0 and rep == 1 and n * blk == B[t].shape[0]:  # the usual case: views, no copies
                ra, bm = A[t].reshape(n, -1).contiguous(), B[t]
            else:
                ra = slice_rows(A[t], ax, off, n, blk, rep, heads)
                bm = unit_major(B[t], ax, off, n, blk, rep, heads)
            # other groups' axes (items on k's own axis permute other slices; k's own are skipped)
            others: dict[int, list] = {}
            for it in items:
                if it[4] != k and it[0] != ax:
                    others.setdefault(it[0] + (it[0] < ax), []).append(it)
            if not others:
                fixed[k].append((ra, bm.reshape(n, -1)))
            else:
                terms[k].append((ra, bm, others))
    return {k: _constant(fs) for k, fs in fixed.items()}, terms, bilinear


def _constant(fs: list) -> torch.Tensor | None:
    """sum of rows(A) @ rows(B).T over a group's constant terms: the narrow ones (biases, norm affines:
    single columns) concatenated into one matmul, the wide ones (an embedding) each its own, uncopied."""
    narrow = [(a, b) for a, b in fs if a.shape[1] <= 256]
    out = None
    if narrow:
        out = torch.cat([a for a, _ in narrow], 1) @ torch.cat([b for _, b in narrow], 1).T
    for a, b in fs:
        if a.shape[1] > 256:
            out = a @ b.T if out is None else out.addmm_(a, b.T)
    return out


class _CostCache:
    """Each group's cost matrix at the current permutations of the other groups. The constant part is
    prepared once (_group_costs); the terms read through one other axis are summed per group they read
    through (an MLP's two weights, both through the residual stream: one n x n matrix kept, not two), kept
    with the indices they were computed at, reused while those groups have not moved and updated from the
    units that did."""

    def __init__(self, spec: PermutationSpec, plan: dict, A: dict, B: dict, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self.const, self.terms, self.bilinear = _group_costs(spec, plan, A, B)
        self.numpy_terms: dict[tuple[str, ...], list] = {}
        self.last: dict[tuple[str, tuple], tuple[dict, torch.Tensor]] = {}  # -> (term -> index, matrix)

    def touches_parameters(self, k: str) -> bool:
        return self.const[k] is not None or bool(self.terms[k]) or any(k in b[:2] for b in self.bilinear.values())

    def bilinear_of(self, u: tuple[str, ...]) -> list[tuple]:
        """Unit u's bilinear terms, as solve_blocks takes them (group positions in u, numpy arrays)."""
        if u not in self.numpy_terms:
            self.numpy_terms[u] = [(u.index(r), u.index(k), np64(a), np64(b)) for r, k, a, b in self.bilinear.values()
                                   if r in u and k in u]
        return self.numpy_terms[u]

    def matrix(self, k: str, perm: dict, unknown: set[str]) -> tuple[np.ndarray, list | None]:
        """-> (the cost matrix the assignment is solved on, the terms left out of it or None): terms read
        through a group in `unknown` (not yet solved in the informed first pass) are left out, as a list of
        (rows of A, rows of B read through the current permutations): only their value at the old and the
        new permutation is needed, <A, B[p]>, n times cheaper than their matrix."""
        n = self.spec.groups[k].size
        c = self.const[k].clone() if self.const[k] is not None else torch.zeros(n, n, dtype=self.dtype)
        blind, buckets = [], {}
        for j, (ra, bm, others) in enumerate(self.terms[k]):
            left_out = bool(unknown) and any(it[4] in unknown for its in others.values() for it in its)
            if not left_out and len(others) == 1:
                buckets.setdefault(tuple(sorted({it[4] for its in others.values() for it in its})), []).append(j)
                continue
            b = bm  # read B through every other axis (several: recomputed each time)
            for ax, its in others.items():
                b = b.index_select(ax, axis_index(b.shape[ax], its, perm))
            if left_out:
                blind.append((ra, b.reshape(n, -1)))
            else:
                c.addmm_(ra, b.reshape(n, -1).T)
        for key, js in buckets.items():
            c += self._terms(k, key, js, perm)
        return np64(c), (blind or None)

    def _terms(self, k: str, key: tuple, js: list[int], perm: dict) -> torch.Tensor:
        """The sum of group k's terms js (rows of A, B's slice), each read through its single other axis,
        all through the groups in `key`: reused, updated from the units that moved, or recomputed."""
        n = self.spec.groups[k].size
        terms = [(self.terms[k][j][0], self.terms[k][j][1], *next(iter(self.terms[k][j][2].items()))) for j in js]
        idx = {j: axis_index(bm.shape[ax], its, perm) for j, (_, bm, ax, its) in zip(js, terms)}
        prev = self.last.get((k, key))
        if prev is not None and all(prev[0][j] is idx[j] for j in js):  # the groups have not moved (same tensor)
            return prev[1]
        # testing which units moved costs three small ops: worth it only where the matmuls are large
        ch = None
        if prev is not None and sum(ra.numel() for ra, *_ in terms) * n >= _INCREMENTAL_MIN_MACS:
            ch = {j: (idx[j] != prev[0][j]).nonzero().flatten() for j in js}
            if any(2 * len(ch[j]) >= len(idx[j]) for j in js):
                ch = None
        if ch is not None:
            # the groups moved only a few units: update the last sum with those slices alone (late passes
            # change a few units of a group; its neighbours' matmuls shrink accordingly)
            total = prev[1]
            for j, (ra, bm, ax, _) in zip(js, terms):
                if len(ch[j]):
                    a = ra.reshape(bm.shape).index_select(ax, ch[j]).reshape(n, -1)
                    d = bm.index_select(ax, idx[j][ch[j]]) - bm.index_select(ax, prev[0][j][ch[j]])
                    total.addmm_(a, d.reshape(n, -1).T)
        else:
            total = None
            for j, (ra, bm, ax, _) in zip(js, terms):
                b = bm.index_select(ax, idx[j]).reshape(n, -1)
                total = ra @ b.T if total is None else total.addmm_(ra, b.T)
        self.last[k, key] = (idx, total)
        return total


def _solve_unit(spec: PermutationSpec, u: tuple[str, ...], cs: list[tuple[np.ndarray, list | None]],
                olds: list[torch.Tensor], bilinear: list,
                exact=None) -> tuple[list[torch.Tensor], float, float, float, float]:
    """One step for unit u (a group, or coupled block groups, with their bilinear terms) -> (new permutations
    of u's groups, value of the old ones, of the new ones (on the matrices solved), the same two on the full
    cost, left-out terms included). A family of nested groups (hierarchy.py) is solved on its matrices,
    each read through the others' current permutations; where a tensor crosses two of its groups (a shortcut
    convolution from a parent to its child) it enters the matrices linearised, so the step is judged by
    `exact` (its groups' permutations -> the objective over every tensor they touch). Reads no shared
    state, so it can run on a thread."""
    g = spec.groups[u[0]]
    seen = [c for c, _ in cs]
    if exact is not None:
        new = assign(spec, u, seen)
        old_v, new_v = exact(olds), exact(new)
        return new, old_v, new_v, old_v, new_v
    if g.heads and not is_family(spec, u):  # block groups: their bilinear terms enter the assignment
        new = solve_blocks(seen, g.heads, head_only_flags(spec, u), bilinear, olds)
    else:  # a family (no tensor crosses two of its groups: its matrices are its exact costs) or one group
        new = assign(spec, u, seen)

    def value(ps, full):
        v = sum(float(c[np.arange(len(p)), p.numpy()].sum()) for (c, _), p in zip(cs, ps))
        v += sum(_bilinear_total(t, ps, g.heads) for t in bilinear)
        if full:  # sum_i <A_i, B_p(i)> of each term left out
            v += sum(float(torch.dot(a.reshape(-1), b.index_select(0, p).reshape(-1)))
                     for (_, bl), p in zip(cs, ps) if bl is not None for a, b in bl)
        return v

    old_v, new_v = value(olds, False), value(new, False)
    if all(b is None for _, b in cs):  # nothing left out: the full cost is the one solved
        return new, old_v, new_v, old_v, new_v
    return new, old_v, new_v, value(olds, True), value(new, True)


def _bilinear_total(term: tuple, ps: list[torch.Tensor], heads: int) -> float:
    """A bilinear term's value at the permutations ps of its unit's groups (see solve_blocks)."""
    i = term[0]
    src = (ps[i].view(heads, -1)[:, 0] // (len(ps[i]) // heads)).numpy()
    ws = [local_orders(p, heads).numpy()[src] for p in ps]
    return float(_values([], [term], np.arange(heads), src, ws).sum())


def _units(spec: PermutationSpec, costs: _CostCache) -> list[tuple[str, ...]]:
    """The descent's units in trace order: single groups, coupled head groups or families of nested groups
    solved jointly (hierarchy.solving_units); groups touching no parameter have a zero cost and never move."""
    return [u for u in solving_units(spec) if any(costs.touches_parameters(kk) for kk in u)]


def _crossed(plan: dict, u: tuple[str, ...]) -> bool:
    """Whether two of unit u's groups permute one tensor (on two axes): then its cost matrices are
    linearised at the others' permutations and a step must be judged on the exact objective."""
    return any(len({it[4] for it in items if it[4] in u}) > 1 for items in plan.values())


class _ExactValue:
    """The objective over the tensors in `plan` (those unit u's groups touch), as a function of u's
    permutations ps, every other group held at `perm`: sum of <A, B permuted>."""

    def __init__(self, plan: dict, A: dict, B: dict, u: tuple[str, ...], perm: dict):
        self.plan = plan
        self.A, self.B, self.u, self.perm = A, B, u, perm

    def __call__(self, ps: list[torch.Tensor]) -> float:
        p = {**self.perm, **dict(zip(self.u, ps))}
        return sum(float((self.A[t] * permute_tensor(self.B[t], items, p)).sum()) for t, items in self.plan.items())


def _neighbours(plan: dict, units: list[tuple[str, ...]]) -> dict[tuple[str, ...], set[str]]:
    """unit -> the other groups sharing a parameter with it: the only ones its cost matrices depend on."""
    tensors: dict[str, set[str]] = {}
    for t, items in plan.items():
        for it in items:
            tensors.setdefault(it[4], set()).add(t)
    return {u: {it[4] for k in u for t in tensors.get(k, ()) for it in plan[t]} - set(u) for u in units}


class _Progress:
    """The step at which each group last moved and each unit was last solved on its full cost: a unit's
    cost matrices depend only on its neighbours, so if none moved since, solving it again is skipped."""

    def __init__(self, spec: PermutationSpec, nbrs: dict):
        self.nbrs, self.moved_at, self.solved_at = nbrs, {k: -1 for k in spec.groups}, {}

    def stale(self, u: tuple[str, ...]) -> bool:
        s = self.solved_at.get(u)
        return s is None or any(self.moved_at[k] >= s for k in self.nbrs[u])


def _passes(units: list, seed: int, informed: bool, max_iter: int):
    """The visiting order of each pass: seeded random orders; the informed first pass goes in trace order,
    from the input on, so each group comes after the layers feeding it (its random draw is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(max_iter if units else 0):
        order = [units[j] for j in torch.randperm(len(units), generator=gen).tolist()]
        yield list(units) if informed and i == 0 else order


def _batches(order: list, pool, workers: int, big: set, nbrs: dict):
    """Consecutive large units sharing no tensor with each other (single units without a pool): neither
    one's cost matrices depend on the other's answer, so solving them at once gives the same result."""
    i = 0
    while i < len(order):
        batch = [order[i]]
        while (pool is not None and len(batch) < workers and i + len(batch) < len(order)
               and {order[i], order[i + len(batch)]} <= big
               and not any(set(order[i + len(batch)]) & nbrs[v] for v in batch)):
            batch.append(order[i + len(batch)])
        i += len(batch)
        yield batch


def _solve_all(pool, spec: PermutationSpec, jobs: list) -> list:
    """_solve_unit on each job's arguments: all but the last on the pool while the last runs here."""
    if pool is None or len(jobs) < 2:
        return [_solve_unit(spec, *args) for args in jobs]
    futures = [pool.submit(_solve_unit, spec, *args) for args in jobs[:-1]]
    last = _solve_unit(spec, *jobs[-1])
    return [f.result() for f in futures] + [last]


def _weight_matching(spec: PermutationSpec, sd_a: dict, sd_b: dict, *, seed: int = 0, max_iter: int = 100,
                     init: dict[str, torch.Tensor] | None = None, workers: int = 1,
                     informed: bool = False) -> tuple[dict[str, torch.Tensor], dict, tuple[float, float]]:
    """Git Re-Basin weight matching: -> (perm for B maximising sum_k <A_k, perm(B)_k> over parameters, info,
    (objective gained over the start, the largest cost value summed into it: its rounding scale)).

    Coordinate descent over groups in a seeded random order; each step is one linear assignment on
    the summed inner products of every parameter slice the group touches, with all other groups'
    current permutations applied to B. A step is taken only if it strictly improves the objective,
    so the distance to A never grows; stops after a full pass with no change (or max_iter passes).
    A unit none of whose neighbours moved since it was last solved is skipped (same answer again).
    informed: the first pass goes in trace order and leaves out of each assignment the terms read
    through a group not solved yet in that pass (see weight_matching); such a step is judged on the
    terms it saw, its effect on the objective is still counted, and the group is solved again in the
    next pass. With workers > 1, independent large units of a pass are solved at once (_batches).
    """
    plan = member_plan(spec, spec.parameters)
    dtype = torch.float64 if any(sd_a[t].dtype == torch.float64 for t in plan) else torch.float32
    A, B = ({t: sd[t].to(dtype) for t in plan} for sd in (sd_a, sd_b))
    costs = _CostCache(spec, plan, A, B, dtype)
    perm = {k: v.detach().cpu().long().clone() for k, v in (init or identity(spec)).items()}
    units = _units(spec, costs)
    judged = {u: partial(_ExactValue, {t: its for t, its in plan.items() if any(it[4] in u for it in its)}, A, B, u)
              for u in units if is_family(spec, u) and _crossed(plan, u)}  # steps judged exactly (_solve_unit)
    nbrs = _neighbours(plan, units)
    unknown = {k for u in units for k in u} if informed else set()  # not yet solved in the informed first pass
    progress = _Progress(spec, nbrs)
    step, gain, scale, it, converged = 0, 0.0, 0.0, 0, not units
    big = {u for u in units if spec.groups[u[0]].size >= _POOL_MIN_SIZE}  # threads pay off from a few hundred
    pool = ThreadPoolExecutor(workers - 1) if workers > 1 and len(big) > 1 else None
    try:
        for it, order in enumerate(_passes(units, seed, informed, max_iter), 1):
            changed = pending = False
            for batch in _batches(order, pool, workers, big, nbrs):
                todo = []
                for u in batch:
                    step += 1
                    if progress.stale(u):
                        todo.append((u, step, [costs.matrix(k, perm, unknown) for k in u]))
                        unknown.difference_update(u)
                        if any(b is not None for _, b in todo[-1][2]):
                            pending = True  # solved on part of its cost: solve it again next pass
                        else:
                            progress.solved_at[u] = step
                results = _solve_all(pool, spec, [(u, cs, [perm[k] for k in u], costs.bilinear_of(u),
                                                   judged[u](dict(perm)) if u in judged else None)
                                                  for u, _, cs in todo])
                for (u, s, _), (new, old_v, new_v, old_f, new_f) in zip(todo, results):
                    if new_v > old_v + 1e-9 * max(1.0, abs(old_v)):
                        gain, scale = gain + new_f - old_f, max(scale, abs(old_f), abs(new_f))
                        perm.update(zip(u, new))
                        progress.moved_at.update(dict.fromkeys(u, s))
                        changed = True
            if not changed and not pending:
                converged = True
                break
    finally:
        if pool is not None:
            pool.shutdown()
    return perm, {"iterations": it, "converged": converged, "groups": len(spec.groups)}, (gain, scale)
