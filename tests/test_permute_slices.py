"""Slices of the feature axis (issue 26): DPN's dual paths (x[:, :d], x[:, d:] at static boundaries: the
units on each side are groups of their own) and ShuffleNetV2's channel split and shuffle. Each structure:
a random legal permutation keeps the function in float64 (outputs compared here, not by the library), a
planted permutation is recovered exactly, and what the rules cannot express is pinned with its reason."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from permute_families import noisy_bn, outputs_f64

from stardomain.permute import (activation_matching, align, apply_permutation, inverse, random_permutation,
                                spec_from_model, weight_matching)


def _keeps_function(m, x, spec, seed=0):
    sd = noisy_bn(m, seed)
    p = random_permutation(spec, torch.Generator().manual_seed(seed + 1))
    sp = apply_permutation(spec, sd, p)
    ref = outputs_f64(m, sd, x)
    assert (ref - outputs_f64(m, sp, x)).abs().max() <= 1e-12 * ref.abs().max()
    return sd, p, sp


def _round_trip(m, x, seed=0, exact=True):
    """The function is kept (float64), weight matching and activation matching recover the planted
    permutation exactly (exact; else, with grouped convolutions of random shapes, where coordinate descent
    may stop in a local optimum, never farther than it was), align's checks pass. Activation matching cannot
    tell apart units that are dead on every input of its batch (random tiny nets have them): where it does
    not return the inverse, its answer must still compute the same outputs on that batch."""
    spec = spec_from_model(m, x)
    sd, p, sp = _keeps_function(m, x, spec, seed)
    q, _ = weight_matching(spec, sd, sp)
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups) or not exact
    if exact:
        data = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(seed))
        q, _ = activation_matching(spec, m, sd, sp, data)
        if not all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups):
            ref = outputs_f64(m, sd, data)
            assert (ref - outputs_f64(m, apply_permutation(spec, sp, q), data)).abs().max() <= 1e-12 * ref.abs().max()
    _, info = align(m, sd, sp, example_input=x)
    assert info["equivalence_error"] < 1e-9 and info["distance_after"] <= info["distance_before"] + 1e-9
    assert info["distance_after"] == pytest.approx(0.0, abs=1e-9) or not exact
    return spec


def _cbr(i, o, k=1, groups=1):
    return nn.Sequential(nn.Conv2d(i, o, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class DualPath(nn.Module):
    """DPN's block as public code writes it: a grouped bottleneck whose output's first d channels are added
    to the residual path and the rest concatenated to the dense path (which grows by `dense` each block);
    the first block of a stage projects its input (shortcut)."""

    def __init__(self, cin, d, dense, width, groups, first, functional=False):
        super().__init__()
        self.d, self.functional = d, functional
        self.a, self.b = _cbr(cin, width), _cbr(width, width, 3, groups)
        self.c = nn.Sequential(nn.Conv2d(width, d + dense, 1, bias=False), nn.BatchNorm2d(d + dense))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, d + dense, 1, bias=False),
                                      nn.BatchNorm2d(d + dense)) if first else nn.Identity()

    def forward(self, x):
        out = self.c(self.b(self.a(x)))
        x = self.shortcut(x)
        d = self.d
        if self.functional:
            return F.relu(torch.cat([x.narrow(1, 0, d) + out.narrow(1, 0, d), x.narrow(1, d, x.shape[1] - d),
                                     out.narrow(1, d, out.shape[1] - d)], 1))
        return F.relu(torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1))


class DPN(nn.Module):
    def __init__(self, d=8, dense=2, width=8, groups=2, blocks=2, functional=False):
        super().__init__()
        self.stem = _cbr(3, 6, 3)
        layers, cin = [], 6
        for i in range(blocks):
            layers.append(DualPath(cin, d, dense, width, groups, i == 0, functional))
            cin = d + (i + 2) * dense
        self.blocks, self.fc = nn.Sequential(*layers), nn.Linear(cin, 3)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
def test_dual_path_slices_are_groups_of_their_own(functional):
    torch.manual_seed(0)
    spec = _round_trip(DPN(functional=functional), torch.randn(2, 3, 6, 6))
    assert spec.permutable_fraction() == 1.0
    assert not [u for u in spec.unpermuted if not u.reason.startswith("model output")]
    sizes = sorted(g.size for g in spec.groups.values()
                   if any(m.tensor == "blocks.0.shortcut.0.weight" and m.axis == 0 for m in g.members))
    assert sizes == [2, 8]  # the shortcut's outputs cut at d: the residual path's 8, the dense path's 2


@settings(max_examples=10, deadline=None)
@given(d=st.integers(1, 6), dense=st.integers(1, 3), groups=st.integers(1, 3), blocks=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_dual_paths_over_split_points(d, dense, groups, blocks, seed):
    torch.manual_seed(seed)
    spec = _round_trip(DPN(d, dense, 2 * groups, groups, blocks), torch.randn(2, 3, 5, 5), seed, exact=groups == 1)
    assert spec.permutable_fraction() == 1.0


def test_a_slice_inside_a_unit_leaves_that_unit_in_place():
    """A slice ending inside a unit (a flattened channel's 4 positions): that channel becomes a group of one
    unit (it cannot move), the channels on either side stay permutable; a slice with a step is pinned."""
    class Flat(nn.Module):
        def __init__(self, step):
            super().__init__()
            self.step, self.conv, self.fc = step, nn.Conv2d(3, 6, 1), nn.Linear(12 if step == 2 else 14, 2)
            self.rest = nn.Linear(10, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x)).flatten(1)  # (B, 6 * 4): each channel's 4 positions
            if self.step == 2:
                return self.fc(h[:, ::2])
            return self.fc(h[:, :14]) + self.rest(h[:, 14:])  # channel 3 cut: positions 12, 13 | 14, 15

    torch.manual_seed(0)
    m, x = Flat(1), torch.randn(2, 3, 2, 2)
    spec = _round_trip(m, x)
    assert sorted(g.size for g in spec.groups.values()) == [2, 3]  # channels 4-5 and 0-2; channel 3 alone
    m, x = Flat(2), torch.randn(2, 3, 2, 2)
    spec = spec_from_model(m, x)
    assert any("indexing into the feature axis" in u.reason for u in spec.unpermuted) and not spec.groups

def channel_shuffle(x, groups):
    """torchvision's channel shuffle."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2's unit, generalised to g parts: at a reduction every part is a branch of the whole input
    (torchvision's branch1 and branch2); else the input is chunked into g parts, the first passed through,
    the others transformed; the parts concatenated and shuffled with g groups."""

    def __init__(self, cin, part, g, reduce):
        super().__init__()
        self.g, self.reduce = g, reduce
        ins = cin if reduce else cin // g
        self.branches = nn.ModuleList(
            nn.Sequential(_cbr(ins, part), nn.Conv2d(part, part, 3, 1, 1, groups=part, bias=False),
                          nn.BatchNorm2d(part), _cbr(part, part)) for _ in range(g if reduce else g - 1))

    def forward(self, x):
        if self.reduce:
            parts = [b(x) for b in self.branches]
        else:
            first, *rest = x.chunk(self.g, dim=1)
            parts = [first] + [b(r) for b, r in zip(self.branches, rest)]
        return channel_shuffle(torch.cat(parts, 1), self.g)


class ShuffleNetV2(nn.Module):
    def __init__(self, part=4, g=2, units=3):
        super().__init__()
        self.stem = _cbr(3, 6, 3)
        self.blocks = nn.Sequential(*[ShuffleBlock(6 if i == 0 else g * part, part, g, i == 0) for i in range(units)])
        self.head, self.fc = _cbr(g * part, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def test_shuffle_units_are_permuted_through_split_and_shuffle():
    torch.manual_seed(0)
    spec = _round_trip(ShuffleNetV2(part=8), torch.randn(2, 3, 6, 6))
    assert spec.permutable_fraction() == 1.0
    assert not [u for u in spec.unpermuted if not u.reason.startswith("model output")]
    # the second unit's branch output joins the passthrough's coarser units as a rigid child
    assert any(g.parent is not None and g.head_only for g in spec.groups.values())


@settings(max_examples=10, deadline=None)
@given(part=st.sampled_from([2, 4, 6, 8]), g=st.integers(2, 3), units=st.integers(1, 4), seed=st.integers(0, 100))
def test_shuffles_over_widths_groups_and_depths(part, g, units, seed):
    """Every legal permutation keeps the function; the planted one is recovered; what the rules pin (a chunk
    inside a unit once the passthrough's units own many channels) is pinned with its reason."""
    torch.manual_seed(seed)
    m, x = ShuffleNetV2(part, g, units), torch.randn(2, 3, 5, 5)
    spec = spec_from_model(m, x)
    sd, p, sp = _keeps_function(m, x, spec, seed)
    q, _ = weight_matching(spec, sd, sp)
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)
    assert all(u.reason for u in spec.unpermuted)


def test_shuffled_rows_of_several_segments_line_up():
    """Three tensors concatenated and shuffled in 2 rows: the rows are cut where either has a boundary, and
    each stretch's units tied; the function is kept and the planted permutation found."""
    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = channel_shuffle(torch.cat([self.a(x), self.b(x), self.c(x)], 1), 2)
            return self.fc(torch.relu(y).mean((2, 3)))

    torch.manual_seed(0)
    spec = _round_trip(Uneven(), torch.randn(2, 3, 4, 4))
    assert spec.permutable_fraction() == 1.0 and sorted(g.size for g in spec.groups.values()) == [2, 2]


def test_a_shuffle_the_rules_cannot_express_is_pinned_with_the_reason():
    """Rows whose units do not nest (2 units of 3 channels beside 3 units of 2, after shuffles with 3 and
    with 2 groups): pinned, the function kept."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ModuleList(nn.Conv2d(3, 2, 1) for _ in range(3))
            self.q = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(2))
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            a = channel_shuffle(torch.cat([c(x) for c in self.p], 1), 3)  # 2 units of 3 channels
            b = channel_shuffle(torch.cat([c(x) for c in self.q], 1), 2)  # 3 units of 2 channels
            y = channel_shuffle(torch.cat([a, b], 1), 2)
            return self.fc(torch.relu(y).mean((2, 3)))

    m, x = Mixed(), torch.randn(2, 3, 4, 4)
    spec = spec_from_model(m, x)
    assert any("unit counts do not nest" in u.reason for u in spec.unpermuted)
    _keeps_function(m, x, spec)


def digits_separable(in_shape, num_classes):
    from test_permute_nesting import Chain
    m = Chain(3, (2, 2), classes=num_classes)
    m.stem[0] = nn.Conv2d(in_shape[0], 3, 3, padding=1)
    return m


def digits_dpn(in_shape, num_classes):
    m = DPN()
    m.stem[0], m.fc = nn.Conv2d(in_shape[0], 6, 3, 1, 1, bias=False), nn.Linear(m.fc.in_features, num_classes)
    return m


def digits_shuffle(in_shape, num_classes):
    m = ShuffleNetV2(part=8)
    m.stem[0], m.fc = nn.Conv2d(in_shape[0], 6, 3, 1, 1, bias=False), nn.Linear(5, num_classes)
    return m


@pytest.mark.parametrize("factory, shown", [
    ("digits_separable", "size 12, 6 heads following the units of cells.0.sep"),
    ("digits_dpn", "blocks.0.shortcut.0[0:8] [stream]: size 8"),
    ("digits_shuffle", "(whole heads only) following the units of")])
def test_spec_cli_reports_the_new_groups(tmp_path, factory, shown):
    from safetensors.torch import save_file
    from test_permute_cli import run

    torch.manual_seed(0)
    raw, model = tmp_path / "w.safetensors", tmp_path / "m.safetensors"
    save_file({k: v.clone() for k, v in globals()[factory]((1, 8, 8), 10).state_dict().items()}, str(raw))
    run("import", raw, "--model-factory", f"test_permute_slices:{factory}", "--data", "digits", "--out", model)
    out = run("spec", model, "--allow-factory", f"test_permute_slices:{factory}").stdout
    assert shown in out, out
    assert "100.0% of the parameter axes" in out
