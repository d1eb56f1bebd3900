"""The equivalence check cannot be fooled: a wrong permutation inside a branch scaled by 1e-6 (layer
scale at its usual init) or behind an all-zero output is caught through the probed activations."""

import copy

import pytest
import torch
import torch.nn as nn
from permute_families import make_convnext, make_gpt

from stardomain.permute import (EquivalenceError, Group, PermutationSpec, activation_error, align,
                                apply_permutation, check_equivalence, equivalence_error, random_permutation,
                                spec_from_model)


def _drop_member(spec, group, tensor, axis):
    """A wrong spec: `group` without one of its members (the classic bug: a tensor left unpermuted)."""
    s = copy.deepcopy(spec)
    g = s.groups[group]
    s.groups[group] = Group(g.name, g.size, [m for m in g.members if (m.tensor, m.axis) != (tensor, axis)],
                            g.probes, g.heads, g.couple, g.head_only)
    return s


def _hidden(spec, tensor):
    return next(k for k, g in spec.groups.items() if any(m.tensor == tensor and m.axis == 0 for m in g.members))


def test_layer_scale_branch_cannot_hide_a_wrong_permutation():
    torch.manual_seed(0)
    m, x = make_convnext()  # gamma = 1e-6: the blocks' MLPs barely reach the output
    spec = spec_from_model(m, x)
    sd = m.state_dict()
    k = _hidden(spec, "stages.0.pwconv1.weight")
    bad = _drop_member(spec, k, "stages.0.pwconv2.weight", 1)
    perm = {kk: torch.arange(g.size) for kk, g in spec.groups.items()}
    perm[k] = torch.roll(torch.arange(spec.groups[k].size), 3)
    sp = apply_permutation(bad, sd, perm)
    assert equivalence_error(m, sd, sp, x) < 1e-5  # the outputs alone are fooled ...
    err, n, tol = activation_error(m, bad, sd, sp, perm, x)
    assert n > 0 and err > 1e-3 > tol  # ... the activations are not
    with pytest.raises(EquivalenceError, match="hidden activations"):
        check_equivalence(m, sd, sp, x, spec=bad, perm=perm)
    good = apply_permutation(spec, sd, perm)
    assert check_equivalence(m, sd, good, x, spec=spec, perm=perm) < 1e-12
    assert activation_error(m, spec, sd, good, perm, x)[0] < 1e-12


class _ZeroHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 4)
        self.head = nn.Linear(4, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)  # zero-initialised classifier (timm's ViTs and others)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_all_zero_output_is_checked_through_activations():
    torch.manual_seed(0)
    m, x = _ZeroHead(), torch.randn(4, 3)
    spec = spec_from_model(m, x)
    sd = m.state_dict()
    with pytest.raises(EquivalenceError, match="all zero"):
        equivalence_error(m, sd, sd, x)  # outputs alone: refused, not vacuously passed
    sd_b = {k: v + 0.1 * torch.randn_like(v) if "head" not in k else v for k, v in sd.items()}
    out, info = align(m, sd, sd_b, example_input=x)  # the activations make the check meaningful
    assert info["equivalence_error"] == 0.0
    bad = _drop_member(spec, "fc1", "fc2.weight", 1)
    perm = {"fc1": torch.roll(torch.arange(6), 1), "fc2": torch.arange(4)}
    with pytest.raises(EquivalenceError, match="hidden activations"):
        check_equivalence(m, sd_b, apply_permutation(bad, sd_b, perm), x, spec=bad, perm=perm)


def test_exported_model_activation_check():
    """torch.export captures are checked in float64 (the model cast, re-exported: its graph names the
    same nodes as the capture's), at the float64 tolerance."""
    torch.manual_seed(0)
    m, idx = make_gpt()
    spec = spec_from_model(m, idx)
    assert spec.capture == "export"
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(0))
    err, n, tol = activation_error(m, spec, sd, apply_permutation(spec, sd, p), p, idx)
    assert n >= 10 and err < tol == 1e-9
    k = _hidden(spec, "transformer.h.0.mlp.c_fc.weight")
    bad = _drop_member(spec, k, "transformer.h.0.mlp.c_proj.weight", 1)
    err, _, _ = activation_error(m, bad, sd, apply_permutation(bad, sd, p), p, idx)
    assert err > 1e-2


def test_spec_round_trips_through_json_with_new_fields():
    torch.manual_seed(0)
    m, idx = make_gpt()
    spec = spec_from_model(m, idx)
    again = PermutationSpec.from_dict(__import__("json").loads(spec.to_json()))
    assert again == spec and again.capture == "export" and again.permutable_fraction() == spec.permutable_fraction()


class _DtypeBranch(nn.Module):
    """branch: exports to different graphs in float32 and float64 (an op only in float32); cast: computes
    a step in float32 whatever the model's dtype."""

    def __init__(self, branch, cast):
        super().__init__()
        self.fc1, self.fc2, self.branch, self.cast = nn.Linear(3, 6), nn.Linear(6, 2), branch, cast

    def forward(self, x):
        assert x.shape[0] > 0  # torch.fx cannot trace this: captured by torch.export
        h = torch.relu(self.fc1(x))
        if self.branch and h.dtype == torch.float32:
            h = h * 1.0
        if self.cast:
            h = h.float().to(x.dtype)
        return self.fc2(h)


@pytest.mark.parametrize("branch,cast,tol", [(False, False, 1e-9), (True, False, 1e-4), (False, True, 1e-4)])
def test_export_check_is_float64_only_where_the_graph_is_the_same_and_never_casts_down(branch, cast, tol):
    torch.manual_seed(0)
    m, x = _DtypeBranch(branch, cast), torch.randn(4, 3)
    spec = spec_from_model(m, x)
    assert spec.capture == "export"
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(0))
    err, n, t = activation_error(m, spec, sd, apply_permutation(spec, sd, p), p, x)
    assert n > 0 and err < t == tol
    bad = _drop_member(spec, "fc1", "fc2.weight", 1)
    p = {"fc1": torch.roll(torch.arange(6), 1)}
    with pytest.raises(EquivalenceError):
        check_equivalence(m, sd, apply_permutation(bad, sd, p), x, spec=bad, perm=p)
