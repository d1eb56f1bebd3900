"""A stronger naive centre: Git Re-Basin's "merge many" (Ainsworth et al. 2023, MergeMany).

The aligned average (`study` op `average`) aligns every source to the first one and averages; the
centre then depends on which source came first. MergeMany instead re-aligns each source, in a seeded
random order, to the mean of the *other* (already aligned) sources, round after round, until no
permutation changes; the centre is the average of the jointly aligned sources. If Starlight's star
is special, it should beat this centre too, not only the simpler one. Pure functions over state dicts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .interpolate import average
from .permute import apply_permutation, distance, weight_matching
from .permute.spec import PermutationSpec

StateDict = dict[str, torch.Tensor]


def _same(p: dict, q: dict) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


def _rms_distance(spec: PermutationSpec, centre: StateDict, sds: Sequence[StateDict]) -> float:
    """Root-mean-square distance to the centre: sum_i |θ_i - c|² = (1/n) sum_{i<j} |θ_i - θ_j|², which each
    MergeMany step can only lower (it maximises θ_i's inner product with the others' mean)."""
    return float(np.sqrt(np.mean([distance(centre, sd, spec.parameters) ** 2 for sd in sds])))


def merge_many(spec: PermutationSpec, sds: Sequence[StateDict], *, start: Sequence[dict] | None = None,
               rounds: int = 20, seed: int = 0, max_iter: int = 100) -> tuple[StateDict, list[dict], dict]:
    """-> (the average of the jointly aligned sources, each source's permutation, info).

    `start`: permutations to begin from (e.g. each source aligned to the first); identity otherwise.
    Each step weight-matches source i to the leave-one-out mean of the others (so a source is never
    matched to a mean that contains itself), warm-started from its current permutation. Stops after a
    round in which no permutation changed, or after `rounds` rounds."""
    n = len(sds)
    perms = [dict(p) for p in start] if start is not None else [None] * n
    aligned = [sd if p is None else apply_permutation(spec, sd, p) for sd, p in zip(sds, perms)]
    before = _rms_distance(spec, average(aligned), aligned)
    rng = np.random.default_rng(seed)
    done, converged = 0, n < 2
    while not converged and done < rounds:
        changed = False
        for i in rng.permutation(n):
            others = average([a for j, a in enumerate(aligned) if j != i])
            init = perms[i] if perms[i] is not None else "identity"
            p, _ = weight_matching(spec, others, sds[i], seed=seed, max_iter=max_iter, init=init)
            if perms[i] is None or not _same(p, perms[i]):
                changed = True
            perms[i] = p
            aligned[i] = apply_permutation(spec, sds[i], p)
        done += 1
        converged = not changed
    centre = average(aligned)
    info = {"method": "merge_many", "rounds": done, "converged": converged, "order_seed": seed,
            "rms_distance_to_centre_start": before, "rms_distance_to_centre": _rms_distance(spec, centre, aligned)}
    return centre, perms, info
