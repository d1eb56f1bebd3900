"""Sinkhorn re-basin (Pena et al. 2023): soft permutation matrices, learned from the loss along the path
and rounded to hard permutations (docs/method.md, "Learned alignment").

Each permutation group gets a matrix of logits; the Sinkhorn operator (alternate row and column
normalisation in the log domain) turns logits / temperature into a doubly stochastic matrix P, and
B's soft permutation P·B (every axis the group owns) enters the loss at (1-t)·A + t·P·B. Attention
head groups get a structured P: a soft permutation of whole heads (shared by coupled q/k and v/o
groups) times one soft permutation of units within each pair of heads (none for rotary q/k, whose
units keep their order), so a rounded P is always a legal head permutation. Rounding is the
assignment that maximises P's entries (per head structure for head groups), as weight matching solves it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import LearnedAlignConfig
from .learned import Learner, batch_statistics
from .hierarchy import is_family, solving_units
from .matching import assign
from .permutations import member_plan, within_block
from .spec import PermutationSpec

# Adam on the logits: on a 64-wide digits MLP, 0.1 changed the rounded permutation once in 100 steps, 1.0 six
# times (barrier 0.031 -> 0.017)
SINKHORN_LR = 1.0
START_MARGIN = 2.0  # start logits: log(n) + this on weight matching's entries (~88% of each row's mass there)


def log_sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(..., n, n) logits -> the log of a (nearly) doubly stochastic matrix: rows, then columns, normalised."""
    for _ in range(iters):
        logits = logits - logits.logsumexp(-1, keepdim=True)
        logits = logits - logits.logsumexp(-2, keepdim=True)
    return logits


def units(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """Groups touching a parameter, a coupled pair of head groups as one unit (they share a head permutation),
    a family of nested groups as one unit (hierarchy.py)."""
    touched = {it[4] for items in member_plan(spec, spec.parameters).values() for it in items}
    return [u for u in solving_units(spec) if any(kk in touched for kk in u)]


def soft_matrices(spec: PermutationSpec, logits: dict[str, torch.Tensor], cfg: LearnedAlignConfig) -> dict:
    """Group -> its doubly stochastic matrix (rows: positions in the result, columns: B's units), for every
    group with logits."""
    out = {}
    for u in units(spec):
        g = spec.groups[u[0]]
        if is_family(spec, u):
            out.update(_family_matrices(spec, u, logits, cfg))
            continue
        if not g.heads:
            out[u[0]] = log_sinkhorn(logits[u[0]] / cfg.temperature, cfg.sinkhorn_iters).exp()
            continue
        h = g.heads
        size = {k: spec.groups[k].size for k in u}  # (coupled groups may differ: a grouped conv's two sides)
        blocks = {k: (logits[k] / cfg.temperature).view(h, size[k] // h, h, size[k] // h).permute(0, 2, 1, 3)
                  for k in u}
        heads = log_sinkhorn(sum(b.logsumexp((-2, -1)) for b in blocks.values()), cfg.sinkhorn_iters).exp()
        for k in u:
            dh = size[k] // h
            within = (torch.eye(dh, dtype=heads.dtype).expand(h, h, dh, dh) if spec.groups[k].head_only
                      else log_sinkhorn(blocks[k], cfg.sinkhorn_iters).exp())
            out[k] = (heads[:, :, None, None] * within).permute(0, 2, 1, 3).reshape(size[k], size[k])
    return out


def _family_matrices(spec: PermutationSpec, u: tuple[str, ...], logits: dict, cfg: LearnedAlignConfig) -> dict:
    """A family of nested groups: the root's matrix as a plain group's; each child's is its parent's matrix
    (moving whole blocks as the parent's units move) times one soft permutation within each pair of blocks
    (the identity for a rigid child), so a rounded matrix is always a legal nested permutation."""
    out = {u[0]: log_sinkhorn(logits[u[0]] / cfg.temperature, cfg.sinkhorn_iters).exp()}
    for k in u[1:]:
        g = spec.groups[k]
        m, r = g.heads, g.size // g.heads
        blocks = (logits[k] / cfg.temperature).view(m, r, m, r).permute(0, 2, 1, 3)
        within = (torch.eye(r, dtype=blocks.dtype).expand(m, m, r, r) if g.head_only  # (rigid: order kept)
                  else log_sinkhorn(blocks, cfg.sinkhorn_iters).exp())
        out[k] = (out[g.parent][:, :, None, None] * within).permute(0, 2, 1, 3).reshape(g.size, g.size)
    return out


def one_hot(p: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The permutation matrix of p in this module's convention: row i has its 1 in column p[i]."""
    m = torch.zeros(len(p), len(p), dtype=dtype)
    m[torch.arange(len(p)), p.long()] = 1
    return m


def _soft_axis(t: torch.Tensor, ax: int, items, mats: dict) -> torch.Tensor:
    """t with every slice of axis `ax` a group owns replaced by its matrix times the slice's units (a
    unit's block and rep copies move with it, as in matching._unit_major)."""
    pieces, pos = [], 0
    for _, off, n, blk, k, rep, heads, _ in sorted(items, key=lambda it: it[1]):
        if off > pos:
            pieces.append(t.narrow(ax, pos, off - pos))
        length = n * blk * rep
        s = t.narrow(ax, off, length).movedim(ax, 0)
        h = heads or 1
        u = s.reshape(n, -1) if rep == 1 else s.reshape(h, rep, n // h, blk, -1).transpose(1, 2).reshape(n, -1)
        v = mats[k].to(u.dtype) @ u
        v = v.reshape(s.shape) if rep == 1 else v.reshape(h, n // h, rep, blk, -1).transpose(1, 2).reshape(s.shape)
        pieces.append(v.movedim(0, ax))
        pos = off + length
    if pos < t.shape[ax]:
        pieces.append(t.narrow(ax, pos, t.shape[ax] - pos))
    return torch.cat(pieces, ax) if len(pieces) > 1 else pieces[0]


def _block_diagonal(t: torch.Tensor, item, inverse: bool = False) -> torch.Tensor:
    """A within-block member's tensor (Member.by) written out whole: axis `ax` as long as the group, block i
    of axis `by` holding its values in block i of axis `ax` and zeros elsewhere (a grouped convolution's
    weight as the dense one it equals). inverse: the diagonal blocks taken back out."""
    ax, _, n, _, _, _, h, by = item
    s = t.movedim((by, ax), (0, 1))
    rows, rest = s.shape[0] // h, s.shape[2:]
    if inverse:
        d = s.reshape(h, rows, h, n // h, *rest).diagonal(dim1=0, dim2=2).movedim(-1, 0)
        return d.reshape(h * rows, n // h, *rest).movedim((0, 1), (by, ax))
    eye = torch.eye(h, dtype=t.dtype, device=t.device).view(h, 1, h, 1, *[1] * len(rest))
    d = s.reshape(h, rows, 1, s.shape[1], *rest) * eye
    return d.reshape(h * rows, h * s.shape[1], *rest).movedim((0, 1), (by, ax))


def soft_apply(spec: PermutationSpec, sd: dict, mats: dict[str, torch.Tensor]) -> dict:
    """A new state dict with every axis a group owns multiplied by the group's matrix (`mats`: every
    group); with permutation matrices (`one_hot`) this is exactly `apply_permutation`. A within-block axis
    (a grouped convolution's inputs) is multiplied in the tensor's dense form, whose diagonal blocks are
    then kept: at soft matrices a block pairing's weight enters squared, at permutations it is exact."""
    out = dict(sd)
    for name, items in member_plan(spec).items():
        if name not in sd or not sd[name].is_floating_point():
            continue
        t = sd[name]
        inner = next((it for it in items if within_block(it)), None)
        if inner is not None:
            t = _block_diagonal(t, inner)
            items = [it[:7] + (-1,) if it is inner else it for it in items]
        for ax in sorted({it[0] for it in items}):
            t = _soft_axis(t, ax, [it for it in items if it[0] == ax], mats)
        out[name] = t if inner is None else _block_diagonal(t, inner, inverse=True)
    return out


def round_matrices(spec: PermutationSpec, mats: dict[str, torch.Tensor], start: dict) -> dict:
    """The hard permutation closest to the soft one: per unit, the assignment maximising the matrix's
    entries (heads: whole heads, then units within each); groups without a matrix keep `start`."""
    out = {k: v.clone() for k, v in start.items()}
    for u in units(spec):
        out.update(zip(u, assign(spec, u, [mats[k].detach().double().numpy() for k in u])))
    return out


def sinkhorn(spec: PermutationSpec, model: torch.nn.Module, sd_a: dict, sd_b: dict, data: Any, *,
             settings: LearnedAlignConfig | dict | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Sinkhorn re-basin -> (perm for B, info). The logits start at weight matching's answer (log n + 2 on
    its entries, 0 elsewhere) and follow Adam on the loss at (1-t)·A + t·P·B; every `select_every` steps
    (and at the end) the soft matrices are rounded to a candidate, and the candidate with the lowest barrier
    on the selection sample is returned (weight matching's answer is the first; see learned.Candidates)."""
    run = Learner(spec, model, sd_a, sd_b, data, settings, seed, "sinkhorn")
    cfg, start = run.cfg, run.start
    run.candidates.consider(start)
    todo = units(spec)
    if not todo:
        return start, run.info("sinkhorn", 0)
    dtype = next(v.dtype for v in sd_b.values() if v.is_floating_point())
    logits = {k: (one_hot(start[k], dtype) * (math.log(spec.groups[k].size) + START_MARGIN)).requires_grad_(True)
              for u in todo for k in u}
    fixed = {k: one_hot(p, dtype) for k, p in start.items() if k not in logits}
    params = set(spec.parameters)
    opt = torch.optim.Adam(logits.values(), lr=cfg.lr or SINKHORN_LR)
    last, changes = start, 0
    with batch_statistics(run.model):
        for step in range(1, cfg.steps + 1):
            mats = {**fixed, **soft_matrices(spec, logits, cfg)}
            point = {k: v if k in params else v.detach() for k, v in soft_apply(spec, sd_b, mats).items()}
            loss = run.step_loss(point)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.select_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    hard = round_matrices(spec, soft_matrices(spec, logits, cfg), start)
                changes += any(not torch.equal(hard[k], last[k]) for k in hard)
                last = hard
                run.candidates.consider(hard)
    return run.candidates.best, run.info("sinkhorn", changes)
