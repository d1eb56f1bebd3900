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
    kinds = {("heads" if g.heads else "plain") for g in spec.groups.values()}
    if name != "llama":  # grouped-query heads are one plain group of key/value heads
        assert "heads" in kinds


def test_family_group_structure():
    _, _, gpt, _ = _family("gpt", 0)
    assert len(gpt.groups) == 1 + 2 * 3  # residual, and per layer: MLP hidden, q/k heads, v/o heads
    _, _, llama, _ = _family("llama", 0)
    gq = [g for g in llama.groups.values() if any(mm.tensor.endswith("k_proj.weight") and mm.axis == 0
                                                  for mm in g.members)]
    # 2 key/value heads shared by 2 query heads each: q blocks of 2x4 rows move with k/v blocks of 4
    assert [g.size for g in gq] == [2, 2]
    blocks = {mm.tensor.split(".")[-2]: mm.block for mm in gq[0].members}
    assert blocks == {"q_proj": 8, "k_proj": 4, "v_proj": 4, "o_proj": 8}
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


def test_channel_shuffle_and_token_mixing_are_pinned_with_reasons():
    _, _, shuffle, _ = _family("shuffle", 0)
    reasons = " ".join(u.reason for u in shuffle.unpermuted)
    assert "grouped convolution" in reasons
    assert not any(mm.tensor.startswith("gconv") for g in shuffle.groups.values() for mm in g.members)
    _, _, mixer, _ = _family("mixer", 0)
    assert any("token mixing" in u.reason for u in mixer.unpermuted)
    assert any(g.size == 12 for g in mixer.groups.values())  # the channel MLPs' hidden units


@pytest.mark.parametrize("name", ["gpt", "llama", "llama_mha_rope", "vit", "functional", "unet"])
def test_activation_matching_recovers_permuted_copies(name):
    """Weight and activation matching agree: both recover a permuted copy exactly (fx and export
    captures, fused q/k/v parts, rotary whole-head groups, grouped-query key/value heads)."""
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
