"""The zoo's transformers (gpt: fused q/k/v, SDPA, tied embeddings, rotary/GQA/RMSNorm/SwiGLU options;
bert: post-norm encoder): every hidden axis permutable, permutations preserve the function in float64,
permuted copies recovered, trained twins aligned on digits."""

import pytest
import torch

from stardomain.models import build_model
from stardomain.permute import (activation_error, align, apply_permutation, distance, equivalence_error, inverse,
                                random_permutation, spec_from_model, weight_matching)

ZOO = [
    ("gpt", {}),
    ("gpt", {"rope": True}),
    ("gpt", {"rope": True, "kv_heads": 2, "norm": "rms", "mlp": "swiglu"}),
    ("gpt", {"kv_heads": 2}),
    ("gpt", {"kv_heads": 1}),
    ("bert", {}),
]


@pytest.mark.parametrize("name,kwargs", ZOO, ids=[f"{n}-{k}" for n, k in ZOO])
def test_zoo_transformers_permute_exactly(name, kwargs):
    torch.manual_seed(0)
    m = build_model({"name": name, "kwargs": {"dim": 16, **kwargs}}, (1, 8, 8), 10)
    x = torch.randn(2, 1, 8, 8)
    spec = spec_from_model(m, x)
    assert spec.permutable_fraction() == 1.0
    heads = [g for g in spec.groups.values() if g.heads]
    kv = kwargs.get("kv_heads", 4)  # per layer: q/k and v/o groups of kv_heads heads of 4 units each
    assert len(heads) == 4 and all((g.heads, g.size) == (kv, 4 * kv) and g.couple for g in heads)
    qk = [g for g in heads if any(mm.axis == 0 and (mm.tensor.endswith("query.weight") or mm.offset == 0 and
                                                    mm.tensor.endswith("c_attn.weight")) for mm in g.members)]
    assert len(qk) == 2 and all(g.head_only == kwargs.get("rope", False) for g in qk)
    assert not any(g.head_only for g in heads if g not in qk)
    # the query rows (offset 0) repeat each key head's units for its 4 // kv query heads
    assert all(mm.rep == 4 // kv for g in qk for mm in g.members if mm.tensor.endswith("c_attn.weight")
               and mm.offset == 0 and mm.axis == 0)
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}
    p = random_permutation(spec, torch.Generator().manual_seed(2))
    sp = apply_permutation(spec, sd, p)
    assert equivalence_error(m, sd, sp, x) < 1e-10
    err, n, tol = activation_error(m, spec, sd, sp, p, x)  # every probed node, the fused q/k/v output included
    assert n > 0 and err < tol == 1e-9
    q, _ = weight_matching(spec, sd, sp)
    assert distance(sd, apply_permutation(spec, sp, q)) == 0.0
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_zoo_transformer_trained_twins_align(digits_cfg, name):
    from stardomain.training import train

    cfg = digits_cfg.model_copy(update={"model": digits_cfg.model.model_validate(
        {"name": name, "kwargs": {"dim": 16, "heads": 2, "depth": 1}})})
    cfg.train.epochs = 1
    cfg.data.train_subset = 400
    ma, _ = train(cfg, 0, device="cpu", progress=False)
    mb, _ = train(cfg, 1, device="cpu", progress=False)
    x = torch.zeros(2, 1, 8, 8)
    out, info = align(ma, ma.state_dict(), mb.state_dict(), example_input=x)
    assert info["equivalence_error"] < 1e-9 and info["distance_after"] < info["distance_before"]
    assert info["permutable_fraction"] == 1.0 and not info["warnings"]


@pytest.mark.parametrize("kwargs", [{}, {"rope": True}, {"rope": True, "kv_heads": 2, "norm": "rms", "mlp": "swiglu"},
                                    {"kv_heads": 2}])
def test_fx_and_export_captures_give_the_same_groups(kwargs):
    """The two capture paths read the same model alike (the zoo's gpt traces with torch.fx; its export
    is read op by op from ATen)."""
    from stardomain.permute.assembly import assemble
    from stardomain.permute.capture import aliases_of, export_graph
    from stardomain.permute.tracer import Tracer

    torch.manual_seed(0)
    m = build_model({"name": "gpt", "kwargs": {"dim": 16, **kwargs}}, (1, 8, 8), 10)
    x = torch.randn(2, 1, 8, 8)
    sd = m.state_dict()
    fx_spec = spec_from_model(m, x)
    ep, names = export_graph(m, x)
    tr = Tracer(None, ep.graph, set(sd), params=names, aliases=aliases_of(sd))
    tr.run()
    ex_spec = assemble(tr, m, sd, capture="export")
    assert fx_spec.capture == "fx"

    def shape(spec):
        return {frozenset((mm.tensor, mm.axis, mm.offset, mm.block, mm.rep) for mm in g.members):
                (g.size, g.heads, g.head_only)
                for g in spec.groups.values()}

    assert shape(fx_spec) == shape(ex_spec)
    assert fx_spec.permutable_fraction() == ex_spec.permutable_fraction() == 1.0
