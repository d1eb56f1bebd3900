"""Coverage beyond the zoo (issue 26): convolutions whose kernel spans a whole non-channel axis
(the AG-News TextCNN). Each family: a hand-permuted copy is aligned back to distance 0, and the
permutation keeps the function in float64."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stardomain.permute import (align, apply_permutation, distance, inverse, random_permutation, spec_from_model,
                                weight_matching)
from stardomain.permute.rules.common import GROUPED_INPUTS
from stardomain.permute.spec import Member


class TextCNN(nn.Module):
    """Embedding -> Conv2d with kernels (k, embedding dim) -> max over time -> linear (Kim 2014)."""

    def __init__(self, vocab=30, dim=8, filters=4, kernels=(2, 3), classes=4, functional=False):
        super().__init__()
        self.functional = functional
        self.embed = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList(nn.Conv2d(1, filters, (k, dim)) for k in kernels)
        self.fc = nn.Linear(filters * len(kernels), classes)

    def forward(self, ids):
        x = self.embed(ids).unsqueeze(1)  # (B, 1, T, dim)
        if self.functional:
            hs = [F.relu(F.conv2d(x, c.weight, c.bias)).squeeze(3) for c in self.convs]
        else:
            hs = [F.relu(c(x)).squeeze(3) for c in self.convs]  # (B, filters, T - k + 1)
        hs = [F.max_pool1d(h, h.size(2)).squeeze(2) for h in hs]
        return self.fc(torch.cat(hs, 1))


class Conv1dOverFeatures(nn.Module):
    """The 1-D analogue: a feature vector read as one channel, a kernel as long as the vector."""

    def __init__(self, d=6, filters=5, kernel=None):
        super().__init__()
        kernel = kernel or d
        self.fc, self.conv = nn.Linear(3, d), nn.Conv1d(1, filters, kernel)
        self.out = nn.Linear(filters * (d - kernel + 1), 2)

    def forward(self, x):
        return self.out(torch.relu(self.conv(torch.tanh(self.fc(x)).unsqueeze(1))).flatten(1))


def _noisy(m, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v
            for k, v in m.state_dict().items()}


def _out64(m, sd, x):
    m = copy.deepcopy(m).double().eval()
    m.load_state_dict({k: v.double() for k, v in sd.items()})
    with torch.no_grad():
        return m(x if not torch.is_floating_point(x) else x.double())


def _round_trip(m, x, seed=0, recovered=True):
    """A random legal permutation keeps the function (float64); weight matching brings the copy back
    (recovered: exactly, the permutation's inverse; else, on random shapes where coordinate descent may
    stop in a local optimum, never farther than it was), and align's checks pass."""
    spec = spec_from_model(m, x)
    sd = _noisy(m, seed)
    p = random_permutation(spec, torch.Generator().manual_seed(seed + 1))
    sp = apply_permutation(spec, sd, p)
    ref = _out64(m, sd, x)
    assert (ref - _out64(m, sp, x)).abs().max() <= 1e-12 * ref.abs().max()
    q, _ = weight_matching(spec, sd, sp)
    if recovered:
        assert distance(sd, apply_permutation(spec, sp, q)) == pytest.approx(0.0, abs=1e-9)
        assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)
    _, info = align(m, sd, sp, example_input=x)  # checked: outputs and every probed activation
    assert info["equivalence_error"] < 1e-9 and info["distance_after"] <= info["distance_before"] + 1e-9
    if recovered:
        assert info["distance_after"] == pytest.approx(0.0, abs=1e-9)
    return spec


@pytest.mark.parametrize("functional", [False, True])
def test_textcnn_filters_and_embedding_units_are_permuted(functional):
    torch.manual_seed(0)
    m = TextCNN(functional=functional)
    spec = _round_trip(m, torch.randint(0, 30, (3, 7)))
    axes = {(mm.tensor, mm.axis) for g in spec.groups.values() for mm in g.members}
    # the filters are units (conv weight rows, fc columns); the embedding's units index the kernel's width
    assert {("convs.0.weight", 0), ("convs.1.weight", 0), ("fc.weight", 1), ("embed.weight", 1),
            ("convs.0.weight", 3), ("convs.1.weight", 3)} <= axes
    assert spec.permutable_fraction() == 1.0


def test_a_kernel_narrower_than_the_axis_stays_pinned():
    torch.manual_seed(0)
    spec = spec_from_model(Conv1dOverFeatures(d=6, kernel=5), torch.randn(4, 3))  # slides along the units
    assert any("convolution over a non-channel axis" in u.reason for u in spec.unpermuted)
    assert not any(mm.tensor == "fc.weight" and mm.axis == 0 for g in spec.groups.values() for mm in g.members)


@settings(max_examples=8, deadline=None)
@given(dim=st.integers(2, 6), filters=st.integers(2, 5), kernels=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       seed=st.integers(0, 100))
def test_textcnn_round_trip_over_shapes(dim, filters, kernels, seed):
    torch.manual_seed(seed)
    _round_trip(TextCNN(dim=dim, filters=filters, kernels=tuple(kernels)), torch.randint(0, 30, (2, 5)), seed,
                recovered=False)


def test_conv1d_spanning_the_feature_vector():
    torch.manual_seed(0)
    spec = _round_trip(Conv1dOverFeatures(), torch.randn(4, 3))
    assert spec.permutable_fraction() == 1.0


RNNS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Recurrent(nn.Module):
    """Embedding -> a recurrent stack -> its last step (or its final state) -> linear."""

    def __init__(self, kind="lstm", layers=2, bidirectional=True, batch_first=True, hidden=5, dim=4,
                 use_state=False, export=False):
        super().__init__()
        self.batch_first, self.use_state, self.export = batch_first, use_state, export
        self.embed = nn.Embedding(20, dim)
        self.rnn = RNNS[kind](dim, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
        self.fc = nn.Linear(hidden * (2 if bidirectional and not use_state else 1), 3)

    def forward(self, ids):
        x = self.embed(ids)
        if self.export:  # beyond torch.fx (a size read off the input): torch.export captures aten.lstm and co.
            x = x + torch.zeros(ids.shape[0], 1, 1, dtype=x.dtype)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, state = self.rnn(x)
        if self.use_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.fc(h[-1])
        return self.fc(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_hidden_units_are_permuted_per_layer_and_direction(kind, export):
    torch.manual_seed(0)
    m = Recurrent(kind, export=export)
    spec = _round_trip(m, torch.randint(0, 20, (3, 6)))
    assert spec.capture == ("export" if export else "fx")
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    hidden = [g for g in spec.groups.values() if g.name.startswith("rnn.")]
    assert len(hidden) == 4 and all(g.size == 5 for g in hidden)  # 2 layers x 2 directions
    ih = {(mm.tensor, mm.offset, mm.rep) for g in hidden for mm in g.members if mm.axis == 0}
    assert ("rnn.weight_ih_l1_reverse", 0, gates) in ih and ("rnn.bias_hh_l0", 0, gates) in ih
    assert spec.permutable_fraction() == 1.0


@pytest.mark.parametrize("export", [False, True])
def test_a_read_final_state_pins_the_recurrent_units(export):
    torch.manual_seed(0)
    m = Recurrent("lstm", use_state=True, export=export)
    spec = _round_trip(m, torch.randint(0, 20, (3, 6)))
    assert not any(g.name.startswith("rnn.") for g in spec.groups.values())
    assert any("final state" in u.reason for u in spec.unpermuted)


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(sorted(RNNS)), layers=st.integers(1, 3), bidirectional=st.booleans(),
       batch_first=st.booleans(), hidden=st.integers(2, 6), export=st.booleans(), seed=st.integers(0, 100))
def test_recurrent_round_trip_over_shapes(kind, layers, bidirectional, batch_first, hidden, export, seed):
    torch.manual_seed(seed)
    m = Recurrent(kind, layers, bidirectional, batch_first, hidden, export=export)
    spec = _round_trip(m, torch.randint(0, 20, (2, 4)), seed, recovered=False)
    assert sum(g.name.startswith("rnn.") for g in spec.groups.values()) == layers * (1 + bidirectional)


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 -> 1x1 bottleneck with BatchNorm and a residual add (ResNeXt, RegNet's X block);
    se=True adds RegNetY's squeeze-and-excitation on the grouped convolution's output."""

    def __init__(self, c=8, width=12, groups=3, se=False, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(c, width, 1), nn.BatchNorm2d(width)
        self.b, self.bn_b = nn.Conv2d(width, width, 3, padding=1, groups=groups), nn.BatchNorm2d(width)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 4, 1), nn.ReLU(), nn.Conv2d(4, width, 1),
                                nn.Sigmoid()) if se else None
        self.c, self.bn_c = nn.Conv2d(width, c, 1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)))
        if self.se is not None:
            h = h * self.se(h)
        h = torch.relu(x + self.bn_c(self.c(h)))
        return self.fc(h.mean((2, 3)))


def _bn_noisy(m, seed):
    g = torch.Generator().manual_seed(seed + 50)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    return m.eval()


@pytest.mark.parametrize("se", [False, True])
def test_grouped_convolution_moves_whole_groups_and_units_within(se):
    torch.manual_seed(0)
    m = _bn_noisy(ResNeXtBlock(se=se), 0)
    spec = _round_trip(m, torch.randn(2, 3, 6, 6))
    inner = next(g for g in spec.groups.values() if any(mm.tensor == "b.weight" and mm.axis == 0 for mm in g.members))
    outer = spec.groups[inner.couple]  # the grouped convolution's inputs: the 1x1 conv's outputs
    assert inner.heads == outer.heads == 3 and outer.couple == inner.name
    assert not outer.head_only and not inner.head_only and inner.role == outer.role == "mlp"
    assert any(mm.tensor == "a.weight" and mm.axis == 0 for mm in outer.members)
    # the grouped weight's input axis: the inputs' units within a group, one order per block of rows
    assert Member("b.weight", 1, by=0) in outer.members
    assert not [u for u in spec.unpermuted if not u.reason.startswith("model output")]
    assert spec.permutable_fraction() == 1.0


def _grouped_pair(groups=2, per_in=3, per_out=2, seed=0):
    """1x1 conv -> grouped 3x3 -> linear: the grouped weight's input axis holds one group's units."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, groups * per_in, 1), nn.ReLU(),
                         nn.Conv2d(groups * per_in, groups * per_out, 3, padding=1, groups=groups), nn.ReLU(),
                         nn.Flatten(), nn.Linear(groups * per_out * 16, 2))


@settings(max_examples=10, deadline=None)
@given(groups=st.integers(2, 4), per_in=st.integers(1, 4), per_out=st.integers(1, 4), seed=st.integers(0, 100))
def test_grouped_sides_of_any_widths_are_recovered(groups, per_in, per_out, seed):
    """Random group counts and widths on each side (depthwise with a channel multiplier at per_in 1): a
    planted permutation (groups swapped, units reordered within them on both sides) is found exactly."""
    _round_trip(_grouped_pair(groups, per_in, per_out, seed), torch.randn(2, 3, 4, 4), seed)


@pytest.mark.parametrize("init", ["informed", "identity", "sorted"])
def test_grouped_planted_permutation_is_found_from_every_start(init):
    m, x = _grouped_pair(3, 2, 4, 1), torch.randn(2, 3, 4, 4)
    spec = spec_from_model(m, x)
    sd = _noisy(m, 1)
    p = random_permutation(spec, torch.Generator().manual_seed(2))
    q, _ = weight_matching(spec, sd, apply_permutation(spec, sd, p), init=init)
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


def test_grouped_convolution_under_the_other_methods():
    """Sinkhorn's soft application at permutation matrices is the permutation (the within-group axis goes
    through the weight's dense form), and activation matching finds a planted permutation."""
    from stardomain.permute import activation_matching
    from stardomain.permute.sinkhorn import one_hot, soft_apply

    m = _bn_noisy(ResNeXtBlock(width=12, groups=3), 3)
    x = torch.randn(8, 3, 6, 6)
    spec = spec_from_model(m, x)
    sd = _noisy(m, 3)
    p = random_permutation(spec, torch.Generator().manual_seed(4))
    sp = apply_permutation(spec, sd, p)
    soft = soft_apply(spec, sd, {k: one_hot(v, torch.float32) for k, v in p.items()})
    assert all(torch.equal(sp[k], soft[k]) for k in sd if sd[k].is_floating_point())
    q, _ = activation_matching(spec, m, sd, sp, x)
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


def test_grouped_convolution_golden():
    """Hand-written: groups (0 1 2)(3 4 5) of the inputs become (4 3 5)(2 0 1) (the groups swapped, units
    reordered within each), so the outputs' groups (0 1)(2 3) swap too, here as (3 2)(0 1); the weight's
    rows follow the outputs and each row's input taps follow its own group's order."""
    m = _grouped_pair()
    x = torch.randn(2, 3, 4, 4)
    spec = spec_from_model(m, x)
    gin = next(k for k, g in spec.groups.items() if any(mm.tensor == "0.weight" for mm in g.members))
    gout = spec.groups[gin].couple
    p = {gin: torch.tensor([4, 3, 5, 2, 0, 1]), gout: torch.tensor([3, 2, 0, 1])}
    sd = {k: v.double() for k, v in m.state_dict().items()}
    sp = apply_permutation(spec, sd, p)
    w = sd["2.weight"]  # (4, 3, 3, 3): rows 0, 1 read inputs 0-2; rows 2, 3 read inputs 3-5
    expected = torch.stack([w[3][[1, 0, 2]], w[2][[1, 0, 2]], w[0][[2, 0, 1]], w[1][[2, 0, 1]]])
    assert torch.equal(sp["2.weight"], expected)
    assert torch.equal(sp["0.weight"], sd["0.weight"][[4, 3, 5, 2, 0, 1]])
    ref = _out64(m, sd, x)
    assert (ref - _out64(m, sp, x)).abs().max() <= 1e-12 * ref.abs().max()


def test_grouped_convolution_permutations_outside_the_rule_change_the_function():
    """What the rule forbids does change the function: a unit moved to another group (the inputs'
    permutation not block-structured), or the inputs reordered within a group while the weight's input
    axis keeps its order (or follows another group's order)."""
    m = _grouped_pair()
    x = torch.randn(2, 3, 4, 4)
    sd = {k: v.double() for k, v in _noisy(m, 0).items()}
    ref = _out64(m, sd, x)

    def changed(sp):
        return (ref - _out64(m, sp, x)).abs().max() > 1e-6 * ref.abs().max()

    across = [0, 1, 3, 2, 4, 5]  # unit 2 of group 0 swapped with unit 0 of group 1, the weight's taps alike
    sp = {**sd, "0.weight": sd["0.weight"][across], "0.bias": sd["0.bias"][across]}
    sp["2.weight"] = sd["2.weight"].clone()
    sp["2.weight"][:, [2, 0]] = sd["2.weight"][:, [0, 2]]
    assert changed(sp)
    within = [1, 0, 2, 3, 4, 5]  # group 0's units 0, 1 swapped
    sp = {**sd, "0.weight": sd["0.weight"][within], "0.bias": sd["0.bias"][within]}
    assert changed(sp)  # the weight's input axis left as it was
    sp["2.weight"] = sd["2.weight"][:, [1, 0, 2]]  # every row's taps swapped: wrong for group 1's rows
    assert changed(sp)
    sp["2.weight"] = torch.cat([sd["2.weight"][:2, [1, 0, 2]], sd["2.weight"][2:]])  # the rule's answer
    assert not changed(sp)


def test_grouped_convolution_reading_its_own_output_keeps_the_order_within_groups():
    """x + grouped(x): the weight's rows and its inputs are one group, so the within-group order would
    meet itself on both axes; it is kept (whole groups still move) and said, and the function is kept."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.fc(torch.relu(h + self.g(h)).mean((2, 3)))

    torch.manual_seed(0)
    spec = _round_trip(Residual(), torch.randn(2, 3, 5, 5))
    (g,) = spec.groups.values()
    assert g.heads == 2 and g.head_only
    assert [(u.axes, u.reason) for u in spec.unpermuted if u.reason == GROUPED_INPUTS] == [
        ([["g.weight", 1, 0, 4]], GROUPED_INPUTS)]


def test_grouped_convolution_of_the_raw_input_stays_pinned():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    spec = spec_from_model(m, torch.randn(2, 4, 6, 6))
    assert not spec.groups and any("groups cannot move" in u.reason for u in spec.unpermuted)


@settings(max_examples=8, deadline=None)
@given(groups=st.integers(1, 4), per_group=st.integers(1, 3), se=st.booleans(), seed=st.integers(0, 100))
def test_grouped_round_trip_over_group_counts(groups, per_group, se, seed):
    torch.manual_seed(seed)
    m = _bn_noisy(ResNeXtBlock(width=groups * per_group, groups=groups, se=se), seed)
    _round_trip(m, torch.randn(2, 3, 5, 5), seed, recovered=False)


# ---- the new groups through the CLI: factories over 8x8 digits (rows read as a sequence of 8 steps) ----
class DigitsRows(nn.Module):
    def __init__(self, kind, classes):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.body = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(12, classes)
        else:  # textcnn: kernels as wide as a row
            self.body = nn.Conv2d(1, 5, (3, 8))
            self.fc = nn.Linear(5, classes)

    def forward(self, x):
        if self.kind == "lstm":
            out, _ = self.body(x.squeeze(1))
            return self.fc(out[:, -1])
        h = torch.relu(self.body(x)).squeeze(3)
        return self.fc(F.max_pool1d(h, h.size(2)).squeeze(2))


def digits_lstm(in_shape, num_classes):
    return DigitsRows("lstm", num_classes)


def digits_textcnn(in_shape, num_classes):
    return DigitsRows("textcnn", num_classes)


def digits_resnext(in_shape, num_classes):
    m = ResNeXtBlock(c=6, width=8, groups=4, se=True, classes=num_classes)
    m.stem = nn.Conv2d(in_shape[0], 6, 3, padding=1)
    return m


@pytest.mark.parametrize("factory, shown", [("digits_lstm", "body.l1_reverse [mlp]: size 6"),
                                             ("digits_textcnn", "body [mlp]: size 5: body.weight[0]"),
                                             ("digits_resnext", "b.weight[1] per block of [0]")])
def test_spec_cli_reports_the_new_groups(tmp_path, factory, shown):
    from safetensors.torch import save_file
    from test_permute_cli import run

    torch.manual_seed(0)
    raw, model = tmp_path / "w.safetensors", tmp_path / "m.safetensors"
    save_file({k: v.clone() for k, v in globals()[factory]((1, 8, 8), 10).state_dict().items()}, str(raw))
    run("import", raw, "--model-factory", f"test_permute_coverage:{factory}", "--data", "digits", "--out", model)
    out = run("spec", model, "--allow-factory", f"test_permute_coverage:{factory}").stdout
    assert shown in out
    if factory == "digits_resnext":  # the grouped convolution's coupled blocks
        assert "size 8, 4 heads coupled with b" in out and "size 8, 4 heads coupled with a" in out
    assert "100.0% of the parameter axes" in out


class TimmAttention(nn.Module):
    """Attention written as timm writes it: one fused qkv Linear, reshape to (3, heads), permute, unbind,
    optional LayerNorm over each head's units (qk_norm), q @ k^T or F.scaled_dot_product_attention, and
    the heads transposed back into the features."""

    def __init__(self, dim=8, heads=2, qk_norm=False, fused=False):
        super().__init__()
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmViT(nn.Module):
    def __init__(self, dim=8, heads=2, depth=2, qk_norm=False, fused=False):
        super().__init__()
        self.embed, self.head = nn.Linear(5, dim), nn.Linear(dim, 3)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attns = nn.ModuleList(TimmAttention(dim, heads, qk_norm, fused) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(depth))

    def forward(self, x):
        x = self.embed(x)
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_attention_heads_are_permuted(qk_norm, fused):
    torch.manual_seed(0)
    m = TimmViT(qk_norm=qk_norm, fused=fused)
    spec = _round_trip(m, torch.randn(2, 4, 5))
    heads = [g for g in spec.groups.values() if g.role == "heads"]
    assert len(heads) == 4 and all(g.heads == 2 and g.couple for g in heads)
    qk = [g for g in heads if any(mm.tensor.endswith("qkv.weight") and mm.offset == 0 for mm in g.members)]
    assert len(qk) == 2 and all(g.head_only == qk_norm for g in qk)  # a shared per-unit norm: whole heads only
    assert all(not g.head_only for g in heads if g not in qk)  # v/o: units within a head move too
    pinned = sorted(u.what for u in spec.unpermuted if not u.reason.startswith("model output"))
    assert pinned == ([f"attns.{i}.{n}_norm.{p}[0]" for i in range(2) for n in "kq" for p in ("bias", "weight")]
                      if qk_norm else [])
    # every other parameter axis is permuted whole: the share is all but the 8 norm vectors of 4
    size = {t: torch.Size(spec.shapes[t]).numel() for t in spec.parameters}
    done = sum(size[t] for t, _ in {(mm.tensor, mm.axis) for g in spec.groups.values() for mm in g.members
                                    if mm.tensor in size})
    assert spec.permutable_fraction() == pytest.approx(done / (done + (32 if qk_norm else 0)), abs=1e-12)


def test_timm_qk_norm_pins_units_within_a_head_for_a_reason():
    """With a LayerNorm over each head's q units (its affine shared by every head), reordering the q/k
    units inside one head changes the function, though moving whole heads does not."""
    torch.manual_seed(0)
    m = TimmViT(depth=1, qk_norm=True).double().eval()
    sd = {k: v.double() for k, v in _noisy(m, 0).items()}
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    ref = _out64(m, sd, x)
    swap = torch.arange(24)  # qkv rows: q 0-7, k 8-15, v 16-23; head 0 is the first 4 of each
    swap[[0, 1]], swap[[8, 9]] = torch.tensor([1, 0]), torch.tensor([9, 8])  # q and k units 0, 1 of head 0

    def qkv(rows):
        return {"attns.0.qkv.weight": sd["attns.0.qkv.weight"][rows], "attns.0.qkv.bias": sd["attns.0.qkv.bias"][rows]}

    assert (ref - _out64(m, {**sd, **qkv(swap)}, x)).abs().max() > 1e-6 * ref.abs().max()
    plain = {**sd, "attns.0.q_norm.weight": torch.ones(4, dtype=torch.float64),
             "attns.0.k_norm.weight": torch.ones(4, dtype=torch.float64),
             "attns.0.q_norm.bias": torch.zeros(4, dtype=torch.float64),
             "attns.0.k_norm.bias": torch.zeros(4, dtype=torch.float64)}
    ref_plain = _out64(m, plain, x)
    assert (ref_plain - _out64(m, {**plain, **qkv(swap)}, x)).abs().max() <= 1e-12 * ref_plain.abs().max()
    heads = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])  # whole heads swapped (q, k, v and the projection's columns)
    sp = {**sd, **qkv(torch.cat([heads, 8 + heads, 16 + heads])),
          "attns.0.proj.weight": sd["attns.0.proj.weight"][:, heads]}
    assert (ref - _out64(m, sp, x)).abs().max() <= 1e-12 * ref.abs().max()


@settings(max_examples=8, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(2, 3), qk_norm=st.booleans(), fused=st.booleans(),
       seed=st.integers(0, 100))
def test_timm_attention_round_trip_over_shapes(heads, head_dim, qk_norm, fused, seed):
    torch.manual_seed(seed)
    m = TimmViT(dim=heads * head_dim, heads=heads, qk_norm=qk_norm, fused=fused)
    _round_trip(m, torch.randn(2, 4, 5), seed)


CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class CellLoop(nn.Module):
    """A recurrent cell written as a loop over time (the graph unrolls it): embedding -> cell per step ->
    linear on the last state; learned_h0: the first state a parameter (its units are the cell's)."""

    def __init__(self, kind="lstm", hidden=5, dim=4, steps=4, learned_h0=False, export=False):
        super().__init__()
        self.kind, self.hidden, self.steps, self.export = kind, hidden, steps, export
        self.embed, self.cell, self.fc = nn.Embedding(20, dim), CELLS[kind](dim, hidden), nn.Linear(hidden, 3)
        self.h0 = nn.Parameter(0.1 * torch.randn(hidden)) if learned_h0 else None

    def forward(self, ids):
        x = torch.tanh(self.embed(ids))
        # torch.zeros(batch, hidden) is beyond torch.fx: torch.export captures the model, each step an aten cell op
        b = ids.shape[0]
        zeros = torch.zeros(b, self.hidden, dtype=x.dtype) if self.export else ids.new_zeros(b, self.hidden,
                                                                                              dtype=x.dtype)
        h = zeros if self.h0 is None else self.h0.expand(ids.shape[0], -1)
        c = zeros
        for i in range(self.steps):
            if self.kind == "lstm":
                h, c = self.cell(x[:, i], (h, c))
            else:
                h = self.cell(x[:, i], h)
        return self.fc(h)


@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("learned_h0", [False, True])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_recurrent_cells_in_a_loop_share_one_group(kind, learned_h0, export):
    torch.manual_seed(0)
    spec = _round_trip(CellLoop(kind, learned_h0=learned_h0, export=export), torch.randint(0, 20, (3, 6)))
    assert spec.capture == ("export" if export else "fx")
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind]
    (cell,) = [g for g in spec.groups.values() if any(mm.tensor == "cell.weight_hh" for mm in g.members)]
    expected = {Member("cell.weight_ih", 0, rep=gates), Member("cell.weight_hh", 0, rep=gates),
                Member("cell.bias_ih", 0, rep=gates), Member("cell.bias_hh", 0, rep=gates),
                Member("cell.weight_hh", 1), Member("fc.weight", 1)} | ({Member("h0", 0)} if learned_h0 else set())
    assert set(cell.members) == expected and cell.size == 5
    assert spec.permutable_fraction() == 1.0


def test_a_recurrent_cell_state_from_a_layer_joins_its_group():
    """A first state computed by a linear layer: that layer's outputs are the cell's hidden units."""
    class Fed(nn.Module):
        def __init__(self):
            super().__init__()
            self.init, self.cell, self.fc = nn.Linear(4, 5), nn.GRUCell(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(self.cell(x, torch.tanh(self.init(x))))

    torch.manual_seed(0)
    spec = _round_trip(Fed(), torch.randn(3, 4))
    (g,) = [g for g in spec.groups.values() if Member("cell.weight_hh", 1) in g.members]
    assert {Member("init.weight", 0), Member("init.bias", 0)} <= set(g.members)


class CellCumsum(nn.Module):
    """A cell whose hidden units are then read by position (a cumulative sum over them)."""

    def __init__(self):
        super().__init__()
        self.cell, self.fc = nn.RNNCell(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.cumsum(self.cell(x), 1))


def test_a_recurrent_cell_whose_units_are_read_by_position_stays_pinned():
    """Pinned because it must be: reordering the cell's units (its rows, its recurrent matrix on both sides,
    the next layer's columns) changes the function once a cumsum reads them by position."""
    torch.manual_seed(0)
    m, x = CellCumsum(), torch.randn(3, 4)
    spec = spec_from_model(m, x)
    assert not any(mm.tensor.startswith("cell.") for g in spec.groups.values() for mm in g.members)
    assert any("cumsum" in u.reason for u in spec.unpermuted if u.what.startswith("cell."))
    sd = {k: v.double() for k, v in m.state_dict().items()}
    p = torch.tensor([1, 0, 2, 3, 4])
    sp = {"cell.weight_ih": sd["cell.weight_ih"][p], "cell.weight_hh": sd["cell.weight_hh"][p][:, p],
          "cell.bias_ih": sd["cell.bias_ih"][p], "cell.bias_hh": sd["cell.bias_hh"][p],
          "fc.weight": sd["fc.weight"][:, p], "fc.bias": sd["fc.bias"]}
    ref = _out64(m, sd, x)
    assert (ref - _out64(m, sp, x)).abs().max() > 1e-6 * ref.abs().max()
    m2 = nn.Sequential(m.cell, nn.Linear(5, 2))  # the same reorder without the cumsum keeps the function
    sd2 = {"0." + k.removeprefix("cell."): v for k, v in sd.items() if k.startswith("cell.")}
    sd2.update({"1.weight": sd["fc.weight"], "1.bias": sd["fc.bias"]})
    sp2 = {"0." + k.removeprefix("cell."): v for k, v in sp.items() if k.startswith("cell.")}
    sp2.update({"1.weight": sp["fc.weight"], "1.bias": sp["fc.bias"]})
    ref2 = _out64(m2, sd2, x)
    assert (ref2 - _out64(m2, sp2, x)).abs().max() <= 1e-12 * ref2.abs().max()


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(sorted(CELLS)), hidden=st.integers(2, 6), steps=st.integers(1, 4),
       learned_h0=st.booleans(), seed=st.integers(0, 100))
def test_recurrent_cell_round_trip_over_shapes(kind, hidden, steps, learned_h0, seed):
    torch.manual_seed(seed)
    _round_trip(CellLoop(kind, hidden, steps=steps, learned_h0=learned_h0), torch.randint(0, 20, (2, 5)), seed,
                recovered=False)
