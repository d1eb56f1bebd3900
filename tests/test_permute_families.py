"""Property tests over model families written as public code writes them (tests/permute_families.py):
a random permutation over the whole spec preserves the function (float64, outputs compared here, not
by the library), a permuted copy is recovered at distance 0, and in the transformer families every
residual-stream, MLP-hidden and attention-head group is found (nothing permutable left pinned)."""


import pytest
import torch
from permute_families import FAMILIES, TRANSFORMERS, make_llama, noisy, outputs_f64

from stardomain.permute import (apply_permutation, distance, equivalence_error, inverse, random_permutation,
                                spec_from_model, weight_matching)


_SPECS = {}


def _family(name, seed):
    torch.manual_seed(seed)
    m, x = FAMILIES[name]()
    spec = spec_from_model(m, x)
    return m, x, spec, noisy(m, seed)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_random_permutation_preserves_function_and_is_recovered(name, seed):
    m, x, spec, sd = _family(name, seed)
    assert spec.groups and spec.capture in ("fx", "export")
    p = random_permutation(spec, torch.Generator().manual_seed(seed + 10))
    sp = apply_permutation(spec, sd, p)
    ref = outputs_f64(m, sd, x)
    assert ref.abs().max() > 0
    assert (outputs_f64(m, sp, x) - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert equivalence_error(m, sd, sp, x) < 1e-10
    q, info = weight_matching(spec, sd, sp, seed=seed)
    assert distance(sd, apply_permutation(spec, sp, q)) == 0.0
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers_leave_no_permutable_axis_pinned(name):
    """Only the model's outputs (vocabulary, classes) stay pinned among parameters; the causal-mask
    buffer of hand-written attention is data, not a parameter."""
    _, _, spec, _ = _family(name, 0)
    params = set(spec.parameters)
    pinned = [u for u in spec.unpermuted if any(t.split("[")[0] in params for t in u.what.split(", "))]
    boundary = ("model output", "model input: an embedding's rows", "combined with per-head tensors as a constant")
    assert all(r.startswith(boundary) for u in pinned for r in u.reason.split("; ")), \
        [(u.what[:80], u.reason[:120]) for u in pinned]
    assert spec.permutable_fraction() == 1.0
    assert any(g.heads and g.couple for g in spec.groups.values())
    if name.startswith("llama_"):  # every query/key and value/output unit inside a head moves
        assert all(not g.head_only for g in spec.groups.values() if g.heads) == ("norope" in name or "eager" in name)


def test_family_group_structure():
    _, _, gpt, _ = _family("gpt", 0)
    assert len(gpt.groups) == 1 + 2 * 3  # residual, and per layer: MLP hidden, q/k heads, v/o heads
    for name in ("llama", "llama_gqa_norope", "llama_gqa_eager"):
        _, _, llama, _ = _family(name, 0)
        qk = [g for g in llama.groups.values() if any(mm.tensor.endswith("k_proj.weight") and mm.axis == 0
                                                      for mm in g.members)]
        # 2 key/value heads of 4 units, each shared by 2 query heads: the key units with the same units of
        # both query heads (rep 2); the value units with both heads' output-projection columns
        assert [(g.size, g.heads, g.head_only) for g in qk] == [(8, 2, name == "llama")] * 2
        vo = llama.groups[qk[0].couple]
        assert (vo.size, vo.heads, vo.head_only, vo.couple) == (8, 2, False, qk[0].name)
        reps = {(mm.tensor.split(".")[-2], mm.axis): mm.rep for g in (qk[0], vo) for mm in g.members}
        assert reps == {("q_proj", 0): 2, ("k_proj", 0): 1, ("v_proj", 0): 1, ("o_proj", 1): 2}
    _, _, rope, _ = _family("llama_mha_rope", 0)
    qk = [g for g in rope.groups.values() if g.heads and g.head_only]
    vo = [g for g in rope.groups.values() if g.heads and not g.head_only]
    assert len(qk) == len(vo) == 2 and all(g.couple for g in qk + vo)
    _, _, fn, _ = _family("functional", 0)  # F.conv2d/group_norm/batch_norm/layer_norm/linear/pad/interpolate
    assert fn.permutable_fraction() == 1.0 and sorted(g.size for g in fn.groups.values()) == [6, 6, 8]
    _, _, unet, _ = _family("unet", 0)
    cat = [g for g in unet.groups.values() if any(mm.offset for mm in g.members)]
    assert cat  # the skip concatenation: the up path's channels sit after the skip's in the next conv


def test_rotary_heads_move_whole():
    """Permuting units inside a rotary q/k head changes the function: the spec must not allow it."""
    torch.manual_seed(0)
    m, x = make_llama(n_kv_heads=4, rope=True)
    spec = spec_from_model(m, x)
    sd = noisy(m, 0)
    (qk,) = [g for g in spec.groups.values() if g.head_only and g.name.startswith("layers.0")]
    p = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    p[qk.name] = torch.cat([torch.tensor([1, 0, 2, 3]), torch.arange(4, 16)])  # units 0, 1 of head 0
    ref = outputs_f64(m, sd, x)
    assert (outputs_f64(m, apply_permutation(spec, sd, p), x) - ref).abs().max() > 1e-6 * ref.abs().max()
    # while whole heads (with their v/o partners) may move
    heads = torch.cat([torch.arange(4, 8), torch.arange(4), torch.arange(8, 16)])
    p[qk.name], p[qk.couple] = heads, heads
    assert (outputs_f64(m, apply_permutation(spec, sd, p), x) - ref).abs().max() <= 1e-10 * ref.abs().max()


def _unit_swap(spec, group, i, j):
    p = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    p[group][[i, j]] = p[group][[j, i]]
    return p


@pytest.mark.parametrize("name", ["llama_gqa_norope", "llama_gqa_eager"])
def test_grouped_query_units_move_with_every_query_head_sharing_them(name):
    """The symmetry worked out by hand, checked in float64: swapping two units of a key/value head is
    exact when done in the key (value) head and in every query head (output-projection block) sharing
    it, as the spec's rep members do; done in one query head only, it changes the function."""
    m, x, spec, sd = _family(name, 0)
    ref = outputs_f64(m, sd, x)
    qk = next(g for g in spec.groups.values() if g.name.startswith("layers.0") and g.heads and
              any(mm.tensor.endswith("q_proj.weight") for mm in g.members))
    for group in (qk.name, qk.couple):
        sp = apply_permutation(spec, sd, _unit_swap(spec, group, 5, 6))  # units 1, 2 of key/value head 1
        moved = {t.split(".")[-2] for t in sd if not torch.equal(sp[t], sd[t])}
        assert moved == ({"q_proj", "k_proj"} if group == qk.name else {"v_proj", "o_proj"})
        assert (outputs_f64(m, sp, x) - ref).abs().max() <= 1e-10 * ref.abs().max()
    # q units 1, 2 swapped with the key's, but in query head 2 only (head 3 shares key head 1): wrong
    sp = apply_permutation(spec, sd, _unit_swap(spec, qk.name, 5, 6))
    w = sp["layers.0.self_attn.q_proj.weight"].clone()
    w[12:16] = sd["layers.0.self_attn.q_proj.weight"][12:16]
    assert (outputs_f64(m, {**sp, "layers.0.self_attn.q_proj.weight": w}, x) - ref).abs().max() > 1e-6 * ref.abs().max()


def test_channel_shuffle_and_token_mixing_are_pinned_with_reasons():
    _, _, shuffle, _ = _family("shuffle", 0)
    reasons = " ".join(u.reason for u in shuffle.unpermuted)
    assert "reshape of per-head tensors" in reasons
    assert "convolution groups) are coupled with is unpermutable" in reasons
    assert not any(mm.tensor.startswith("gconv") for g in shuffle.groups.values() for mm in g.members)
    _, _, mixer, _ = _family("mixer", 0)
    # the token-mixing MLPs' hidden units are a group (fc1's rows and bias, fc2's columns), the tokens
    # themselves stay pinned as the input's positions: coverage is complete
    tok = [g for g in mixer.groups.values() if "token_mlp" in g.name]
    assert [(g.size, sorted((mm.tensor.split(".", 2)[-1], mm.axis) for mm in g.members)) for g in tok] == [
        (6, [("token_mlp.0.bias", 0), ("token_mlp.0.weight", 0), ("token_mlp.2.weight", 1)])] * 2
    assert {u.what for u in mixer.unpermuted if "token axis" in u.reason} == {
        f"blocks.{i}.token_mlp.2.weight[0]" for i in (0, 1)}
    assert mixer.permutable_fraction() == 1.0
    assert any(g.size == 12 for g in mixer.groups.values())  # the channel MLPs' hidden units


class _TokenMlpReadTwice(torch.nn.Module):
    """A token-mixing MLP whose hidden activations are also read elsewhere: not the pattern, pinned."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(5, 6), torch.nn.Linear(6, 5)

    def forward(self, x):  # x: (B, tokens 5, 3)
        h = torch.relu(self.fc1(self.fc_in(x).transpose(1, 2)))
        return self.fc2(h).transpose(1, 2) + h[..., :1].transpose(1, 2)


def test_token_mixing_hidden_units_read_elsewhere_stay_pinned():
    spec = spec_from_model(_TokenMlpReadTwice(), torch.randn(2, 5, 3))
    assert not any(mm.tensor.startswith("fc1") for g in spec.groups.values() for mm in g.members)
    assert any(u.what.startswith("fc1.weight[0]") and "token mixing" in u.reason for u in spec.unpermuted)


@pytest.mark.parametrize("name", ["gpt", "llama", "llama_mha_rope", "llama_gqa_norope", "vit", "functional",
                                  "unet", "mixer"])
def test_activation_matching_recovers_permuted_copies(name):
    """Weight and activation matching agree: both recover a permuted copy exactly (fx and export
    captures, fused q/k/v parts, rotary whole-head groups, grouped-query key/value heads, token-mixing
    hidden units)."""
    from stardomain.permute import activation_matching

    m, x, spec, sd = _family(name, 0)
    p = random_permutation(spec, torch.Generator().manual_seed(5))
    sp = apply_permutation(spec, sd, p)
    g = torch.Generator().manual_seed(6)
    data = {k: v.repeat(16, *[1] * (v.dim() - 1)) for k, v in x.items()} if isinstance(x, dict) else (
        torch.randn(32, *x.shape[1:], generator=g) if torch.is_floating_point(x)
        else torch.randint(0, int(x.max()) + 1, (32, *x.shape[1:]), generator=g))
    q, _ = activation_matching(spec, m, sd, sp, data)
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups), [
        k for k in spec.groups if not torch.equal(q[k], inverse(p)[k])]
