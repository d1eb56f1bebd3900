"""Users teach the spec their own layers (register_leaf_module): a layer the tracer cannot read is pinned
until registered, then permuted exactly; rules are plain data in one registry and can be removed."""

import pytest
import torch
import torch.nn as nn

from stardomain.permute import (apply_permutation, equivalence_error, random_permutation, register_leaf_module,
                                spec_for, spec_from_model, weight_matching)
from stardomain.permute.rules.registry import ATEN_RULES, FUNCTION_RULES, METHOD_RULES, MODULE_RULES


class ScaleShift(nn.Module):
    """A per-unit affine written with einsum (not understood by the spec's rules)."""

    def __init__(self, n):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.einsum("bc,c->bc", x, self.scale) + self.shift


class MaskedLinear(nn.Module):
    """A linear layer with a fixed connectivity mask, stored (in, out) like GPT-2's Conv1D."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out))
        self.b = nn.Parameter(torch.randn(n_out))
        self.register_buffer("mask", (torch.rand(n_in, n_out) > 0.3).float())

    def forward(self, x):
        return x @ (self.w * self.mask) + self.b


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ss, self.ml, self.fc2 = nn.Linear(3, 6), ScaleShift(6), MaskedLinear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ml(torch.relu(self.ss(self.fc1(x))))))


@pytest.fixture
def rules():
    yield
    register_leaf_module(ScaleShift, None)
    register_leaf_module(MaskedLinear, None)


def _roundtrip(m, x, spec):
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    p = random_permutation(spec, torch.Generator().manual_seed(1))
    sp = apply_permutation(spec, sd, p)
    assert equivalence_error(m, sd, sp, x) < 1e-10
    q, _ = weight_matching(spec, sd, sp)
    assert all(torch.equal(q[k][p[k]], torch.arange(len(p[k]))) for k in spec.groups)


def test_custom_layers_are_pinned_until_registered_then_permuted(rules):
    torch.manual_seed(0)
    m, x = Net(), torch.randn(4, 3)
    before = spec_for(m, x)
    assert before.permutable_fraction() < 0.5 and any("einsum" in u.reason for u in before.unpermuted)
    _roundtrip(m, x, before)
    register_leaf_module(ScaleShift, "per_unit", params={"scale": 0, "shift": 0})
    register_leaf_module(MaskedLinear, "linear", weights=("w", "mask"), biases=("b",), axes=(1, 0))
    after = spec_for(m, x)  # the cache knows the registry changed
    assert after.permutable_fraction() == 1.0 and sorted(g.size for g in after.groups.values()) == [5, 6]
    (g6,) = [g for g in after.groups.values() if g.size == 6]
    assert {(mm.tensor, mm.axis) for mm in g6.members} == {
        ("fc1.weight", 0), ("fc1.bias", 0), ("ss.scale", 0), ("ss.shift", 0), ("ml.w", 0), ("ml.mask", 0)}
    _roundtrip(m, x, after)
    register_leaf_module(ScaleShift, None)
    assert ScaleShift not in MODULE_RULES and spec_from_model(m, x).permutable_fraction() < 1.0


def test_opaque_rule_pins_with_its_reason(rules):
    register_leaf_module(MaskedLinear, "opaque", reason="connectivity is learned elsewhere")
    spec = spec_from_model(Net(), torch.randn(4, 3))
    assert any("connectivity is learned elsewhere" in u.reason for u in spec.unpermuted)
    assert not any(mm.tensor.startswith("ml.") for g in spec.groups.values() for mm in g.members)
    with pytest.raises(ValueError, match="kind"):
        register_leaf_module(MaskedLinear, "sideways")


def test_builtin_rules_live_in_one_registry():
    import torch.nn.functional as F

    for fn in (F.linear, F.layer_norm, F.scaled_dot_product_attention, F.pad, F.interpolate, torch.split):
        assert fn in FUNCTION_RULES
    for name in ("linear", "layer_norm", "scaled_dot_product_attention", "split", "addmm", "embedding"):
        assert name in ATEN_RULES
    assert {"split", "chunk", "unbind", "view", "masked_fill"} <= set(METHOD_RULES)
