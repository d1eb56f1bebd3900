"""Capture on real code: outputs of any pytree shape, keyword inputs, torch.export where torch.fx fails,
failures said out loud (warning + record + --strict), activation matching with unused parameters."""

import warnings

import pytest
import torch
import torch.nn as nn
from permute_families import DataclassOut, make_bert, make_gpt

from stardomain.permute import (CoverageWarning, EquivalenceError, activation_matching, align, apply_permutation,
                                distance, equivalence_error, inverse, random_permutation, spec_from_model,
                                weight_matching)


def _noisy(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v
            for k, v in model.state_dict().items()}


def _outputs64(model, sd, x):
    """Every output tensor of model(x) in float64, flattened by hand (independent of the library)."""
    import copy

    m = copy.deepcopy(model).double().eval()
    m.load_state_dict({k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()})
    x = {k: v for k, v in x.items()} if isinstance(x, dict) else x
    with torch.no_grad():
        out = m(**x) if isinstance(x, dict) else m(x.double() if torch.is_floating_point(x) else x)
    flat = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            flat.append(o.reshape(-1))
        elif isinstance(o, dict):
            [walk(v) for v in o.values()]
        elif isinstance(o, (list, tuple)):
            [walk(v) for v in o]
        elif hasattr(o, "__dataclass_fields__"):
            [walk(getattr(o, f)) for f in o.__dataclass_fields__]
    walk(out)
    return torch.cat(flat)


def test_dataclass_and_nested_list_outputs_are_compared():
    torch.manual_seed(0)
    m, x = DataclassOut(), torch.randn(5, 4)
    spec = spec_from_model(m, x)
    assert list(spec.groups) == ["fc1"] and spec.capture == "fx"
    sd = _noisy(m)
    p = random_permutation(spec, torch.Generator().manual_seed(1))
    sp = apply_permutation(spec, sd, p)
    assert equivalence_error(m, sd, sp, x) < 1e-12
    # a wrong permutation (fc1's rows without fc2's columns) is caught through the dataclass output
    bad = dict(sd, **{"fc1.weight": sd["fc1.weight"].roll(1, 0), "fc1.bias": sd["fc1.bias"].roll(1, 0)})
    assert equivalence_error(m, sd, bad, x) > 1e-3
    assert (_outputs64(m, sd, x) - _outputs64(m, bad, x)).abs().max() > 1e-3
    out, info = align(m, sd, sp, example_input=x)
    assert info["equivalence_error"] < 1e-12 and distance(sd, out) == 0.0


def test_dict_output_with_keyword_inputs_and_empty_spec():
    class Pinned(nn.Module):  # every unit is an output: the spec is empty, align must not crash
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, input_ids, attention_mask=None):
            return {"a": self.fc(input_ids * attention_mask), "b": [self.fc(input_ids)]}

    m = Pinned()
    x = {"input_ids": torch.randn(4, 3), "attention_mask": torch.ones(4, 3)}
    spec = spec_from_model(m, x)
    assert not spec.groups
    with pytest.warns(CoverageWarning, match="no permutable units"):
        out, info = align(m, m.state_dict(), m.state_dict(), example_input=x)
    assert info["warnings"] and info["equivalence_error"] == 0.0


def test_gpt_with_size_assert_and_optional_targets_is_captured_by_export():
    torch.manual_seed(0)
    m, idx = make_gpt()
    spec = spec_from_model(m, idx)
    assert spec.capture == "export" and "torch.fx" in spec.capture_error
    # the residual stream, the MLP hidden units, and q/k + v/o of each layer's heads
    assert len(spec.groups) == 1 + 2 * 3
    heads = [g for g in spec.groups.values() if g.heads]
    assert len(heads) == 4 and all(g.heads == 2 and g.couple for g in heads)
    # tied weights: both names of the embedding/head matrix permuted alike
    res = next(g for g in spec.groups.values() if any(mm.tensor == "lm_head.weight" for mm in g.members))
    assert {("lm_head.weight", 1), ("transformer.wte.weight", 1)} <= {(mm.tensor, mm.axis) for mm in res.members}
    assert {u.reason for u in spec.unpermuted} == {  # the vocabulary and positions: the model's input/output
        "model input: an embedding's rows are looked up by token id; model output",
        "model input: an embedding's rows are looked up by token id"}
    sd = _noisy(m)
    sd["transformer.wte.weight"] = sd["lm_head.weight"]  # still tied
    p = random_permutation(spec, torch.Generator().manual_seed(2))
    sp = apply_permutation(spec, sd, p)
    assert torch.equal(sp["transformer.wte.weight"], sp["lm_head.weight"])
    ref = _outputs64(m, sd, idx)
    assert (ref - _outputs64(m, sp, idx)).abs().max() <= 1e-10 * ref.abs().max()
    q, _ = weight_matching(spec, sd, sp)
    assert distance(sd, apply_permutation(spec, sp, q)) == 0.0
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # a branch on values: neither torch.fx nor torch.export can capture it
            h = -h
        return self.b(torch.relu(h))


def test_capture_failure_is_said_and_both_matchings_return_b_unchanged():
    m, x = _DataDependent(), torch.randn(4, 3)
    spec = spec_from_model(m, x)
    assert spec.capture == "failed" and not spec.groups
    assert "torch.fx" in spec.capture_error and "torch.export" in spec.capture_error
    assert "could not be captured" in spec.summary()
    sd_b = _noisy(m, 1)
    for method in ("weight", "activation"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out, info = align(m, m.state_dict(), sd_b, example_input=x, method=method, data_x=torch.randn(8, 3))
        assert any(issubclass(r.category, CoverageWarning) and "could not be captured" in str(r.message) for r in w)
        assert info["capture"] == "failed" and "could not be captured" in info["warnings"][0]
        assert all(torch.equal(out[k], sd_b[k]) for k in sd_b)


def test_activation_matching_with_unused_parameters_and_buffers():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
            self.spare = nn.Linear(5, 5)  # never called
            self.register_buffer("stat", torch.zeros(3))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    m = Unused()
    x = torch.randn(2, 4)
    spec = spec_from_model(m, x)
    sd = _noisy(m)
    p = random_permutation(spec, torch.Generator().manual_seed(3))
    sp = apply_permutation(spec, sd, p)
    perm, _ = activation_matching(spec, m, sd, sp, torch.randn(64, 4))
    assert torch.equal(perm["fc1"], inverse(p)["fc1"])
    wperm, _ = weight_matching(spec, sd, sp)
    assert torch.equal(wperm["fc1"], perm["fc1"])


def test_activation_matching_on_an_exported_model_with_keyword_inputs():
    torch.manual_seed(0)
    m, x = make_bert()
    spec = spec_from_model(m, x)
    assert spec.capture == "export"
    sd = _noisy(m)
    p = random_permutation(spec, torch.Generator().manual_seed(4))
    sp = apply_permutation(spec, sd, p)
    data = {"input_ids": torch.randint(0, 17, (32, 6)), "attention_mask": torch.ones(32, 6, dtype=torch.long)}
    out, info = align(m, sd, sp, example_input=x, method="activation", data_x=data)
    assert info["distance_after"] == 0.0 and info["equivalence_error"] < 1e-10


def test_all_zero_output_is_refused():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) * 0.0

    m, x = Zero(), torch.randn(2, 3)
    with pytest.raises(EquivalenceError, match="all zero"):
        equivalence_error(m, m.state_dict(), m.state_dict(), x)


def test_per_channel_vector_reshaped_to_broadcast_is_not_a_head_split():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.scale = nn.Conv2d(3, 4, 3), nn.Parameter(torch.randn(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.conv(x) * self.scale.view(1, -1, 1, 1)).mean((2, 3)))

    spec = spec_from_model(Scaled(), torch.randn(2, 3, 5, 5))
    (g,) = spec.groups.values()
    assert g.heads == 0 and ("scale", 0) in {(m.tensor, m.axis) for m in g.members}
    assert spec.permutable_fraction() == 1.0


def test_every_pinned_parameter_axis_is_listed():
    from permute_families import make_shuffle

    m, x = make_shuffle()
    spec = spec_from_model(m, x)
    listed = {(t, ax) for u in spec.unpermuted for t, ax, *_ in u.axes}
    grouped = {(mm.tensor, mm.axis) for g in spec.groups.values() for mm in g.members}
    # every axis of every weight matrix that carries units is either permuted or listed with a reason
    for name in ("conv1.weight", "gconv.weight", "conv2.weight"):
        assert {(name, 0), (name, 1)} - {("conv1.weight", 1)} <= listed | grouped, name
    assert ("gconv.weight", 0) in listed and ("fc.weight", 0) in listed


def test_attention_bias_per_head_pins_the_heads():
    """An additive bias that differs per head (ALiBi) passed to scaled_dot_product_attention: moving
    heads would change the function, so they are pinned; a mask broadcast over heads is fine."""
    import torch.nn.functional as F

    class Alibi(nn.Module):
        def __init__(self, per_head):
            super().__init__()
            self.qkv, self.o, self.per_head = nn.Linear(8, 24), nn.Linear(8, 3), per_head

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in self.qkv(x).split(8, dim=-1))
            bias = torch.arange(2.0).view(1, 2, 1, 1) if self.per_head else torch.zeros(1, 1, 1, 1)
            bias = bias * torch.arange(T).view(1, 1, 1, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.o(y.transpose(1, 2).reshape(B, T, 8))

    x = torch.randn(2, 5, 8)
    per = spec_from_model(Alibi(True), x)
    assert not any(g.heads for g in per.groups.values())
    assert any("differs across heads" in u.reason for u in per.unpermuted)
    same = spec_from_model(Alibi(False), x)
    assert sum(g.heads == 2 for g in same.groups.values()) == 2
    for m, spec in ((Alibi(True), per), (Alibi(False), same)):
        sd = _noisy(m)
        sp = apply_permutation(spec, sd, random_permutation(spec, torch.Generator().manual_seed(0)))
        assert equivalence_error(m, sd, sp, x) < 1e-10


def test_fused_qkv_cut_by_chunk():
    import torch.nn.functional as F

    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(6, 18), nn.Linear(6, 2)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.reshape(B, T, 3, 2).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))

    m, x = Chunked(), torch.randn(2, 4, 6)
    spec = spec_from_model(m, x)
    heads = sorted((g.name, g.heads, g.couple is not None) for g in spec.groups.values())
    assert heads == [("qkv[0:6]", 3, True), ("qkv[12:18]", 3, True)]
    sd = _noisy(m)
    p = random_permutation(spec, torch.Generator().manual_seed(0))
    assert equivalence_error(m, sd, apply_permutation(spec, sd, p), x) < 1e-10


def test_per_unit_clamp_bounds_are_permuted_with_their_units():
    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 2)
            self.lo, self.hi = nn.Parameter(-torch.rand(5)), nn.Parameter(torch.rand(5))

        def forward(self, x):
            return self.fc2(torch.clamp(self.fc1(x), self.lo, self.hi))

    m, x = Clamped(), torch.randn(6, 3)
    spec = spec_from_model(m, x)
    (g,) = spec.groups.values()
    assert {("lo", 0), ("hi", 0)} <= {(mm.tensor, mm.axis) for mm in g.members}
    sd = _noisy(m)
    sp = apply_permutation(spec, sd, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert equivalence_error(m, sd, sp, x) < 1e-10
