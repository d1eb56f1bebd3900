"""Attention: the ViT's spec (residual stream with LayerNorm, MLP units, whole heads, units within
heads in q/k and v/out jointly), checked by function equivalence and exact recovery."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from stardomain.models import MODELS, build_model
from stardomain.permute import (align, apply_permutation, distance, equivalence_error, inverse, random_permutation,
                                spec_from_model, weight_matching)


def _vit(dim=12, heads=3, depth=2, mlp_dim=10, seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "vit", "kwargs": {"patch": 4, "dim": dim, "depth": depth, "heads": heads,
                                                   "mlp_dim": mlp_dim}}, (1, 8, 8), 5)


def test_vit_is_registered_and_runs():
    assert "vit" in MODELS
    assert _vit()(torch.zeros(3, 1, 8, 8)).shape == (3, 5)
    with pytest.raises(Exception):
        _vit(dim=10, heads=3)


def test_vit_spec_structure():
    m = _vit()
    spec = spec_from_model(m, torch.zeros(2, 1, 8, 8))
    sizes = sorted((g.size, g.heads) for g in spec.groups.values())
    # 1 residual stream (12), per block: MLP hidden (10), q/k and v/o (12 units in 3 heads)
    assert sizes == [(10, 0), (10, 0), (12, 0), (12, 3), (12, 3), (12, 3), (12, 3)]
    stream = [g for g in spec.groups.values() if any(m.tensor == "pos" for m in g.members)][0]
    assert {"cls_token", "patch.weight", "ln.weight", "blocks.1.ln2.bias", "head.weight",
            "blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.bias"} <= {m.tensor for m in stream.members}
    qk = spec.groups["blocks.0.attn.qk"]
    assert qk.couple == "blocks.0.attn.vo" and spec.groups[qk.couple].couple == qk.name
    assert spec.permutable_fraction() == pytest.approx(1 - 5 / sum(p.numel() for p in m.parameters()))


def _permuted_copy(heads, dh, depth, mlp_dim, seed):
    """A tiny ViT with noisy weights, and a randomly permuted copy of them."""
    m = _vit(dim=heads * dh, heads=heads, depth=depth, mlp_dim=mlp_dim, seed=seed)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    spec = spec_from_model(m, x)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)) for k, v in m.state_dict().items()}
    p = random_permutation(spec, torch.Generator().manual_seed(seed + 1))
    return m, x, spec, sd, p, apply_permutation(spec, sd, p)


def _check_recovered(spec, sd, sp, p, q):
    assert distance(sd, apply_permutation(spec, sp, q)) == 0.0
    for k in spec.groups:
        assert torch.equal(q[k], inverse(p)[k]), k


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(2, 4), st.integers(1, 2), st.integers(4, 8), st.integers(0, 99))
def test_random_vits_roundtrip(heads, dh, depth, mlp_dim, seed):
    m, x, spec, sd, p, sp = _permuted_copy(heads, dh, depth, mlp_dim, seed)
    assert equivalence_error(m, sd, sp, x) < 1e-10
    q, info = weight_matching(spec, sd, sp, seed=seed)  # the default start
    assert info["init"] == "informed" and info["converged"]
    _check_recovered(spec, sd, sp, p, q)


# (heads, head dim, depth, mlp_dim, seed): every tiny ViT of 960 (heads 1-4, head dim 2-4, depth 1-2,
# mlp_dim 4 or 8, seeds 0-19) whose permuted copy the paper's descent from the identity did not recover
STALLED = [(1, 2, 1, 8, 18), (1, 2, 2, 4, 6), (1, 2, 2, 8, 16), (1, 3, 1, 4, 9), (1, 4, 1, 4, 9), (1, 4, 1, 8, 5),
           (1, 4, 1, 8, 9), (1, 4, 2, 8, 2), (1, 4, 2, 8, 5), (2, 2, 1, 4, 18), (2, 2, 1, 8, 5), (2, 2, 1, 8, 18),
           (2, 3, 1, 8, 6), (2, 3, 2, 8, 16), (2, 4, 2, 4, 16), (2, 4, 2, 8, 16), (3, 2, 2, 8, 16), (4, 2, 2, 8, 16),
           (4, 3, 2, 4, 8)]


@pytest.mark.parametrize("heads,dh,depth,mlp_dim,seed", STALLED)
def test_default_start_recovers_where_the_identity_start_stalls(heads, dh, depth, mlp_dim, seed):
    """The paper's first pass reads unsolved neighbours through their arbitrary identity order and, in
    ViTs this narrow, settles in a wrong self-consistent optimum; the informed first pass does not."""
    _, _, spec, sd, p, sp = _permuted_copy(heads, dh, depth, mlp_dim, seed)
    q0, info0 = weight_matching(spec, sd, sp, seed=seed, init="identity")
    assert info0["converged"] and distance(sd, apply_permutation(spec, sp, q0)) > 0.1  # stalled
    q, _ = weight_matching(spec, sd, sp, seed=seed)
    _check_recovered(spec, sd, sp, p, q)
    q2, _ = weight_matching(spec, sd, sp, seed=seed, init="sorted")  # the costlier invariant start agrees
    _check_recovered(spec, sd, sp, p, q2)


def test_head_structure_is_necessary():
    """Moving one unit of q/k to another head (not a legal permutation) changes the function: the
    head constraint in the spec is real, not decoration."""
    m = _vit()
    x = torch.randn(2, 1, 8, 8)
    spec = spec_from_model(m, x)
    sd = m.state_dict()
    perm = {k: torch.arange(g.size) for k, g in spec.groups.items()}
    bad = torch.arange(12)
    bad[[3, 4]] = bad[[4, 3]]  # swap unit 3 (head 0) with unit 4 (head 1)
    perm["blocks.0.attn.qk"] = bad
    assert equivalence_error(m, sd, apply_permutation(spec, sd, perm), x) > 1e-4
    good = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11])  # swap heads 0 and 1 ...
    perm["blocks.0.attn.qk"] = good
    assert equivalence_error(m, sd, apply_permutation(spec, sd, perm), x) > 1e-4  # ... in q/k only: wrong
    perm["blocks.0.attn.vo"] = good  # ... and in v/o too: legal
    assert equivalence_error(m, sd, apply_permutation(spec, sd, perm), x) < 1e-10


class HandAttention(nn.Module):
    """Attention written from Linear layers, reshapes and matmuls (no nn.MultiheadAttention)."""

    def __init__(self, dim=8, heads=2, mask=False):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.emb = nn.Linear(3, dim)
        self.ln = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 6), nn.ReLU(), nn.Linear(6, dim))
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.emb(x)
        b, t, d = x.shape
        h = self.ln(x)
        q = self.q(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        s = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        if self.mask:  # an additive mask that differs per head: not understood, must pin q/k
            s = s + torch.arange(self.heads, dtype=s.dtype).view(1, -1, 1, 1)
        a = torch.softmax(s, dim=-1)
        x = x + self.o((a @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(x)
        return self.out(x.mean(1))


def _hand_copy(dim, heads, seed):
    torch.manual_seed(seed)
    m = HandAttention(dim=dim, heads=heads)
    x = torch.randn(2, 5, 3)
    spec = spec_from_model(m, x)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    p = random_permutation(spec, torch.Generator().manual_seed(seed + 1))
    return m, x, spec, sd, p, apply_permutation(spec, sd, p)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 4), st.integers(0, 99))
def test_random_hand_written_attention_roundtrip(heads, dh, seed):
    m, x, spec, sd, p, sp = _hand_copy(heads * dh, heads, seed)
    assert equivalence_error(m, sd, sp, x) < 1e-10
    q, _ = weight_matching(spec, sd, sp, seed=seed)
    _check_recovered(spec, sd, sp, p, q)


def test_hand_written_attention_where_the_identity_start_stalls():
    _, _, spec, sd, p, sp = _hand_copy(2, 1, 16)  # the one of 480 (heads 1/2/4, head dim 1-4, seeds 0-39)
    q0, _ = weight_matching(spec, sd, sp, seed=16, init="identity")
    assert distance(sd, apply_permutation(spec, sp, q0)) > 0.1
    q, _ = weight_matching(spec, sd, sp, seed=16)
    _check_recovered(spec, sd, sp, p, q)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_hand_written_attention_heads(heads):
    torch.manual_seed(heads)
    m = HandAttention(heads=heads)
    x = torch.randn(2, 5, 3)
    spec = spec_from_model(m, x)
    by_tensor = {(mm.tensor, mm.axis): g for g in spec.groups.values() for mm in g.members}
    qk, vo = by_tensor["q.weight", 0], by_tensor["v.weight", 0]
    assert by_tensor["k.weight", 0] is qk and by_tensor["o.weight", 1] is vo
    assert qk.heads == vo.heads == heads and qk.couple == vo.name and vo.couple == qk.name
    assert by_tensor["q.weight", 1] is by_tensor["emb.weight", 0]  # the residual stream
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in m.state_dict().items()}
    p = random_permutation(spec, torch.Generator().manual_seed(3))
    sp = apply_permutation(spec, sd, p)
    assert equivalence_error(m, sd, sp, x) < 1e-10
    q, _ = weight_matching(spec, sd, sp)
    assert distance(sd, apply_permutation(spec, sp, q)) == 0.0
    if heads > 1:  # swapping q/k heads without v/o heads breaks the function: the coupling is needed
        bad = dict(p)
        bad[vo.name] = torch.arange(vo.size)
        bad[qk.name] = torch.cat([torch.arange(2, 4), torch.arange(2), torch.arange(4, 8)]) if heads == 4 else \
            torch.cat([torch.arange(4, 8), torch.arange(4)])
        bad = {k: (v if k in (qk.name, vo.name) else torch.arange(spec.groups[k].size)) for k, v in bad.items()}
        assert equivalence_error(m, sd, apply_permutation(spec, sd, bad), x) > 1e-4


def test_hand_written_attention_with_unknown_mask_is_safe():
    torch.manual_seed(0)
    m = HandAttention(mask=True)
    x = torch.randn(2, 5, 3)
    spec = spec_from_model(m, x)
    permuted = {mm.tensor for g in spec.groups.values() for mm in g.members if mm.axis == 0}
    assert "q.weight" not in permuted and "k.weight" not in permuted and "v.weight" not in permuted
    assert any("per-head" in u.reason for u in spec.unpermuted)
    sd = m.state_dict()
    p = random_permutation(spec, torch.Generator().manual_seed(3))
    assert equivalence_error(m, sd, apply_permutation(spec, sd, p), x) < 1e-10


def test_vit_trained_twins_align_on_digits(digits_cfg):
    from stardomain.train import train

    cfg = digits_cfg.model_copy(update={"model": digits_cfg.model.model_validate(
        {"name": "vit", "kwargs": {"patch": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8}})})
    cfg.train.epochs = 1
    cfg.data.train_subset = 400
    ma, _ = train(cfg, 0, device="cpu", progress=False)
    mb, _ = train(cfg, 1, device="cpu", progress=False)
    x = torch.zeros(2, 1, 8, 8)
    for method in ("weight", "activation"):
        from stardomain.data import get_dataset

        data_x = get_dataset({"name": "digits"}).train.x[:256]
        out, info = align(ma, ma.state_dict(), mb.state_dict(), example_input=x, method=method, data_x=data_x)
        assert info["equivalence_error"] < 1e-5
        if method == "weight":
            assert info["distance_after"] < info["distance_before"]
