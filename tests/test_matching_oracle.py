"""Weight matching checked against a plain reference written here, independent of the package's cost
cache, incremental updates, informed first pass, skipping and threads.

The reference is Ainsworth et al.'s coordinate descent as the paper states it: per group, in a seeded
random order, the full n x n cost sum over every parameter slice the group touches of <A's unit i,
B's unit j with every other group's permutation applied>, solved by scipy's linear_sum_assignment,
repeated until a pass changes nothing. Different visiting orders may end in different local optima,
so the checks do not compare optima: (i) the package's result is a fixed point of the reference's step
(no single group's assignment improves the objective), (ii) on a permuted copy both recover distance 0,
(iii) the objective the package computes (and the gain its descent reports) equals the reference's
evaluation of it. Specs with head groups are left out (the reference solves plain assignments).
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

import stardomain.permute.matching as matching
from stardomain.models import build_model
from stardomain.permute import apply_permutation, random_permutation, spec_from_model, weight_matching


# ---- the reference ------------------------------------------------------------------------------

def ref_permute(spec, sd, perm):
    """Every parameter with each group's permutation applied on the slices it owns (unit p[i] -> i)."""
    out = {}
    for t in spec.parameters:
        x = sd[t]
        for ax in range(x.dim()):
            idx = torch.arange(x.shape[ax])
            for k, g in spec.groups.items():
                for m in g.members:
                    if m.tensor == t and m.axis == ax:
                        units = perm[k].long().view(-1, 1) * m.block + torch.arange(m.block)
                        idx[m.offset:m.offset + g.size * m.block] = m.offset + units.reshape(-1)
            x = x.index_select(ax, idx)
        out[t] = x
    return out


def ref_objective(spec, sd_a, sd_b, perm):
    """sum over parameters of <A, perm(B)>, in float64."""
    pb = ref_permute(spec, sd_b, perm)
    return sum(float((sd_a[t].double() * pb[t].double()).sum()) for t in spec.parameters)


def ref_cost(spec, sd_a, sd_b, perm, k):
    """Group k's n x n cost with every other group at its current permutation (k itself at the identity)."""
    g = spec.groups[k]
    pb = ref_permute(spec, sd_b, {**perm, k: torch.arange(g.size)})
    c = np.zeros((g.size, g.size))
    for m in g.members:
        if m.tensor in spec.parameters:
            rows = [x.double().narrow(m.axis, m.offset, g.size * m.block).movedim(m.axis, 0).reshape(g.size, -1)
                    for x in (sd_a[m.tensor], pb[m.tensor])]
            c += (rows[0] @ rows[1].T).numpy()
    return c


def ref_step(spec, sd_a, sd_b, perm, k):
    """-> (k's best permutation with the others fixed, its value, the value of k's current one)."""
    c = ref_cost(spec, sd_a, sd_b, perm, k)
    best = linear_sum_assignment(c, maximize=True)[1]
    return torch.from_numpy(best).long(), c[np.arange(len(best)), best].sum(), c[np.arange(len(best)),
                                                                                  perm[k].numpy()].sum()


def ref_weight_matching(spec, sd_a, sd_b, seed=0, max_passes=100):
    """The paper's descent from the identity; a group moves only on a strict improvement."""
    perm = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_passes):
        changed = False
        for i in rng.permutation(len(names)):
            k = names[i]
            new, v_new, v_old = ref_step(spec, sd_a, sd_b, perm, k)
            if v_new > v_old + 1e-12 * max(1.0, abs(v_old)):
                perm[k], changed = new, True
        if not changed:
            return perm
    raise AssertionError("the reference descent did not converge")


# ---- cases --------------------------------------------------------------------------------------

def _mlp(widths, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), (widths[0],)


def _cases():
    """(model, input shape without batch) pairs: random plain MLPs, zoo CNNs and a residual net."""
    rng = np.random.default_rng(0)
    out = []
    for seed in range(12):
        depth = int(rng.integers(1, 4))
        out.append(_mlp([int(rng.integers(2, 7))] + [int(rng.integers(2, 9)) for _ in range(depth)] + [3], seed))
    zoo = [("mlp", {"width": 6, "depth": 2, "bn": True}, (1, 4, 4)),
           ("cnn", {"widths": [4, 6]}, (1, 6, 6)),
           ("cnn", {"widths": [3, 5], "norm": "ln"}, (1, 6, 6)),
           ("cnn", {"widths": [4, 5], "norm": "none"}, (1, 6, 6)),
           ("resnet", {"depth": 8, "width": 0.25, "norm": "bn"}, (3, 4, 4)),
           ("resnet", {"depth": 8, "width": 0.25, "norm": "ln"}, (3, 4, 4))]
    for i, (name, kwargs, shape) in enumerate(zoo):
        for seed in range(2):
            torch.manual_seed(100 * i + seed)
            out.append((build_model({"name": name, "kwargs": kwargs}, shape, 3), shape))
    return out


CASES = _cases()


def _state(model, seed):
    """Random float64 parameters (affines included: BN/LN weights are ones at initialisation)."""
    g = torch.Generator().manual_seed(seed)
    params = {n for n, _ in model.named_parameters()}
    return {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) if k in params else v.double()
                if torch.is_floating_point(v) else v) for k, v in model.state_dict().items()}


def _spec(model, shape):
    spec = spec_from_model(model, torch.zeros(2, *shape))
    assert spec.groups and not any(g.heads for g in spec.groups.values())
    for g in spec.groups.values():  # the reference's cost is linear in k only if k owns one axis per tensor
        axes = [(m.tensor, m.axis) for m in g.members]
        assert len(axes) == len(set(axes))
    return spec


def _pdist2(spec, sd_a, sd_b_perm):
    return sum(float((sd_a[t].double() - sd_b_perm[t].double()).pow(2).sum()) for t in spec.parameters)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_package_result_is_a_fixed_point_of_the_reference_step(case):
    model, shape = CASES[case]
    spec = _spec(model, shape)
    sd_a, sd_b = _state(model, 2 * case), _state(model, 2 * case + 1)
    for init in ("informed", "identity"):
        q, info = weight_matching(spec, sd_a, sd_b, seed=case, init=init)
        assert info["converged"]
        here = ref_objective(spec, sd_a, sd_b, q)
        scale = max(1.0, abs(here))
        # (i) one reference pass from the package's result: no group's own assignment improves it
        perm = dict(q)
        for k in spec.groups:
            new, v_new, v_old = ref_step(spec, sd_a, sd_b, perm, k)
            assert v_new <= v_old + 1e-9 * scale, (init, k)
            perm[k] = new
        assert ref_objective(spec, sd_a, sd_b, perm) <= here + 1e-6 * scale
        # aligning never increases the distance: the objective is at least B's own
        assert here >= ref_objective(spec, sd_a, sd_b, {k: torch.arange(g.size) for k, g in spec.groups.items()}) \
            - 1e-9 * scale
        # (iii) the package's objective and the reference's agree (the package leaves out the constant
        # <A, B> of parameters no group permutes), and so do their distances
        touched = {m.tensor for g in spec.groups.values() for m in g.members}
        const = sum(float((sd_a[t] * sd_b[t]).sum()) for t in spec.parameters if t not in touched)
        assert matching._objective(spec, sd_a, sd_b, q) + const == pytest.approx(here, rel=1e-12, abs=1e-12)
        assert _pdist2(spec, sd_a, apply_permutation(spec, sd_b, q)) == pytest.approx(
            _pdist2(spec, sd_a, ref_permute(spec, sd_b, q)), rel=1e-12, abs=1e-12)
    # the reference's own optimum is a fixed point of the package's descent started there
    r = ref_weight_matching(spec, sd_a, sd_b, seed=case)
    q, info = weight_matching(spec, sd_a, sd_b, seed=case, init=r)
    assert info["converged"] and info["iterations"] == 1
    assert ref_objective(spec, sd_a, sd_b, q) == pytest.approx(ref_objective(spec, sd_a, sd_b, r), rel=1e-12)


@pytest.mark.parametrize("informed", [False, True])
@pytest.mark.parametrize("case", range(0, len(CASES), 3))
def test_descent_gain_is_the_reference_objective_change(case, informed):
    """(iii) the gain the descent sums step by step (which decides the informed start's fallback) is the
    reference's objective at its result minus the objective at its start."""
    model, shape = CASES[case]
    spec = _spec(model, shape)
    sd_a, sd_b = _state(model, 2 * case), _state(model, 2 * case + 1)
    q, _, (gain, scale) = matching._weight_matching(spec, sd_a, sd_b, seed=case, informed=informed)
    start = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    ref = ref_objective(spec, sd_a, sd_b, q) - ref_objective(spec, sd_a, sd_b, start)
    assert gain == pytest.approx(ref, rel=1e-9, abs=1e-9 * max(1.0, scale))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_both_recover_a_permuted_copy(case):
    """(ii) B = a random permutation of A: the package recovers A exactly; the reference's descent from the
    identity, on these cases, too (its objective then reaches <A, A>, the Cauchy-Schwarz maximum)."""
    model, shape = CASES[case]
    spec = _spec(model, shape)
    sd_a = _state(model, 3 * case)
    sd_b = apply_permutation(spec, sd_a, random_permutation(spec, torch.Generator().manual_seed(case)))
    top = ref_objective(spec, sd_a, sd_a, {k: torch.arange(g.size) for k, g in spec.groups.items()})
    q, _ = weight_matching(spec, sd_a, sd_b, seed=case)
    assert _pdist2(spec, sd_a, ref_permute(spec, sd_b, q)) == 0.0
    r = ref_weight_matching(spec, sd_a, sd_b, seed=case)
    assert _pdist2(spec, sd_a, ref_permute(spec, sd_b, r)) == pytest.approx(0.0, abs=1e-20)
    assert ref_objective(spec, sd_a, sd_b, q) == pytest.approx(top, rel=1e-12)
