"""Alignment variants: every group's role (heads, mlp, stream) read off the graph, specs restricted to one
role, alignment with a restricted spec (function kept, the other groups untouched, permuted copies
recovered), and the study's variant pair kinds (config, plan keys, a tiny study end to end, report)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from clitools import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from permute_families import FAMILIES, noisy, outputs_f64

from stardomain import pairkinds
from stardomain.config import AlignVariant, Config, validate
from stardomain.errors import UserError
from stardomain.models import build_model
from stardomain.permute import (ROLES, VARIANTS, PermutationSpec, align, apply_permutation, distance,
                                random_permutation, restrict, spec_from_model)
from stardomain.study import build_plan, run_study
from stardomain.files import measure_files

from stardomain.barriers import BarrierSettings

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
GPT_OPTS = {"rope": True, "kv_heads": 2, "norm": "rms", "mlp": "swiglu"}


def _zoo(name, **kw):
    torch.manual_seed(0)
    shape = (3, 32, 32) if name == "resnet" else (1, 8, 8)
    m = build_model({"name": name, "kwargs": kw}, shape, 10)
    return m, spec_from_model(m, torch.zeros(2, *shape))


def _roles(spec: PermutationSpec) -> dict[str, int]:
    return {r: sum(g.role == r for g in spec.groups.values()) for r in ROLES}


def _owners(spec: PermutationSpec, role: str) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for g in spec.groups.values() if g.role == role for m in g.members}


# ---------------------------------------------------------------- roles

@pytest.mark.parametrize("name,kwargs,counts", [
    ("gpt", {"dim": 16}, (4, 2, 1)),
    ("gpt", {"dim": 16, **GPT_OPTS}, (4, 2, 1)),  # grouped-query too: q/k and v/o head groups per layer
    ("bert", {"dim": 16}, (4, 3, 1)),  # the pooler's units are a hidden layer of the classifier
    ("vit", {"patch": 4, "dim": 16}, (4, 2, 1)),
    ("mlp", {}, (0, 1, 0)),
    ("resnet", {}, (0, 9, 3)),  # each block's inner channels; the stream of each stage
], ids=["gpt", "gpt-rope-gqa-rms-swiglu", "bert", "vit", "mlp", "resnet"])
def test_zoo_roles(name, kwargs, counts):
    _, spec = _zoo(name, **kwargs)
    assert tuple(_roles(spec).values()) == counts
    heads, mlp, stream = (_owners(spec, r) for r in ROLES)
    for g in spec.groups.values():  # coupled halves are both attention heads
        assert g.couple is None or spec.groups[g.couple].role == g.role == "heads"
    rows = {role: {t for t, ax in owners if ax == 0 and t.endswith("weight")} for role, owners in
            zip(ROLES, (heads, mlp, stream))}
    if name == "gpt":  # checked here by name; the library never reads names
        assert {t.split(".", 2)[2] for t in rows["heads"]} == {"attn.c_attn.weight"}
        assert rows["mlp"] == {f"h.{i}.mlp.{p}.weight" for i in range(2)
                               for p in (("c_fc", "c_gate") if kwargs.get("mlp") else ("c_fc",))}
        assert ("wte.weight", 1) in stream and {f"h.{i}.{p}.c_proj.weight" for i in range(2)
                                                for p in ("attn", "mlp")} <= rows["stream"]
    if name == "resnet":  # a block's first conv writes its inner channels; the stem and the shortcuts the stream
        assert rows["mlp"] and all(t.endswith(".conv1.weight") or ".bn1." in t for t in rows["mlp"])
        assert {"conv1.weight", "layers.1.0.shortcut.0.weight"} <= rows["stream"]


def test_roles_in_families_written_like_public_code():
    expected = {"gpt": (4, 2, 1), "gpt_manual": (4, 2, 1), "gpt_manual_full": (4, 2, 1), "llama": (4, 2, 1),
                "llama_mha_norope": (4, 2, 1), "llama_mha_rope": (4, 2, 1), "bert": (4, 2, 1), "vit": (4, 2, 1),
                "convnext": (0, 2, 1), "unet": (0, 10, 0), "mixer": (0, 4, 1), "shuffle": (0, 1, 0),
                "functional": (0, 3, 0)}  # functional: a GroupNorm splits units into groups, not attention heads
    for name, counts in expected.items():
        torch.manual_seed(0)
        m, x = FAMILIES[name]()
        assert tuple(_roles(spec_from_model(m, x)).values()) == counts, name


def test_roles_in_hugging_face_models():
    pytest.importorskip("transformers")
    import permute_hf

    # BERT's embedding stream is pinned there (token types, masks), so it has no stream group
    expected = {"bert": (4, 2, 0), "gpt2": (4, 2, 1), "vit": (4, 2, 1), "llama": (4, 2, 1)}
    for name, counts in expected.items():
        torch.manual_seed(0)
        spec = spec_from_model(permute_hf.MODELS[name](), permute_hf.example(name))
        assert tuple(_roles(spec).values()) == counts, name


class _Branches(nn.Module):
    """Two linear branches on one hidden layer, combined by `how`: summed (a stream), gated (a hidden layer
    of one block), or one branch plus a learned bias (still one block's hidden layer)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.inp, self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)
        self.bias = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        h = torch.relu(self.inp(x))
        z = {"sum": lambda: self.a(h) + self.b(h), "gate": lambda: self.a(h) * torch.sigmoid(self.b(h)),
             "bias": lambda: self.a(h) + self.bias}[self.how]()
        return self.out(torch.relu(z))


@pytest.mark.parametrize("how,role", [("sum", "stream"), ("gate", "mlp"), ("bias", "mlp")])
def test_role_is_read_off_how_branches_combine(how, role):
    spec = spec_from_model(_Branches(how), torch.randn(2, 4))
    by_tensor = {m.tensor: g.role for g in spec.groups.values() for m in g.members if m.axis == 0}
    assert by_tensor["a.weight"] == role and by_tensor["inp.weight"] == "mlp"


def test_role_survives_json_and_old_specs_load():
    _, spec = _zoo("gpt", dim=16)
    again = PermutationSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec and [g.role for g in again.groups.values()] == [g.role for g in spec.groups.values()]
    old = spec.to_dict()
    for g in old["groups"].values():
        del g["role"]
    legacy = PermutationSpec.from_dict(old)  # before roles: coupled attention halves are heads, the rest mlp
    assert [g.role for g in legacy.groups.values()] == ["heads" if g.couple else "mlp" for g in spec.groups.values()]


def test_spec_summary_names_roles():
    _, spec = _zoo("gpt", dim=16)
    text = spec.summary()
    assert "7 permutation groups (4 heads, 2 mlp, 1 stream)" in text
    assert "  wte [stream]: size 16" in text and "  h.0.mlp.c_fc [mlp]: size 32" in text


# ---------------------------------------------------------------- restriction and alignment

def test_restrict_keeps_one_role_and_lists_the_rest():
    _, spec = _zoo("gpt", dim=16)
    assert restrict(spec, "full") is spec
    assert not restrict(spec, "none").groups and restrict(spec, "none").permutable_fraction() == 0.0
    fracs = []
    for role in ROLES:
        r = restrict(spec, role)
        assert r.groups and all(g.role == role for g in r.groups.values())
        added = r.unpermuted[len(spec.unpermuted):]  # every other group, said so
        assert len(added) == len(spec.groups) - len(r.groups)
        assert all(f"by the '{role}' alignment variant (a " in u.reason and f"(a {role} group)" not in u.reason
                   for u in added)
        fracs.append(r.permutable_fraction())
    assert all(0 < f < 1 for f in fracs) and sum(fracs) == pytest.approx(1.0)  # the roles share the axes
    with pytest.raises(UserError, match="unknown alignment variant 'attention'; choose full, heads, mlp"):
        restrict(spec, "attention")


def test_variant_names_agree_between_config_and_library():
    assert tuple(v.value for v in AlignVariant) == VARIANTS == ("full", *ROLES, "none")
    assert pairkinds.VARIANTS == VARIANTS[1:]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), variant=st.sampled_from(VARIANTS), opts=st.booleans())
def test_aligned_variant_computes_b_and_moves_only_its_groups(seed, variant, opts):
    m, spec = _zoo("gpt", dim=16, **(GPT_OPTS if opts else {}))
    a, b = noisy(m, seed), noisy(m, seed + 1)
    sd_p, info = align(m, a, b, example_input=X, variant=variant, seed=seed)
    assert info["variant"] == variant
    err = (outputs_f64(m, sd_p, X) - outputs_f64(m, b, X)).abs().max() / outputs_f64(m, b, X).abs().max()
    assert err < 1e-10  # B's function, compared here in float64
    kept = restrict(spec, variant)
    assert set(info["perm"]) == set(kept.groups)
    untouched = set(spec.shapes) - kept.permutable_tensors()
    assert all(torch.equal(sd_p[t], b[t]) for t in untouched)
    assert info["distance_after"] <= info["distance_before"] + 1e-9
    if variant == "none":
        assert all(torch.equal(sd_p[t], b[t]) for t in b)


@pytest.mark.parametrize("variant", ["heads", "mlp", "stream"])
def test_activation_matching_with_a_variant_keeps_b_and_the_other_groups(variant):
    """B: A with the variant's groups permuted and every other group too; activation matching with the
    variant undoes the first and leaves the rest as B has them."""
    m, spec = _zoo("vit", patch=4, dim=16)
    a, kept = noisy(m, 0), restrict(spec, variant)
    p = random_permutation(spec, torch.Generator().manual_seed(4))
    b = apply_permutation(spec, a, p)
    data = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    sd_p, info = align(m, a, b, example_input=X, method="activation", data_x=data, variant=variant)
    assert (outputs_f64(m, sd_p, data) - outputs_f64(m, b, data)).abs().max() / outputs_f64(m, b, data).abs().max() < 1e-10
    assert set(info["perm"]) == set(kept.groups)
    rest = {k: p[k] for k in spec.groups if k not in kept.groups}  # B's order in the other groups
    expected = apply_permutation(spec, a, {**{k: torch.arange(g.size) for k, g in kept.groups.items()}, **rest})
    assert distance(expected, sd_p) == 0.0


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("opts", [{}, GPT_OPTS], ids=["gpt", "gpt-rope-gqa-rms-swiglu"])
def test_a_copy_permuted_in_one_role_is_recovered_by_that_variant(role, opts):
    m, spec = _zoo("gpt", dim=16, **opts)
    a = noisy(m, 0)
    only = restrict(spec, role)
    perms = (random_permutation(only, torch.Generator().manual_seed(s)) for s in range(100))
    b = next(b for b in (apply_permutation(only, a, p) for p in perms) if distance(a, b) > 1.0)  # not the identity
    sd_p, info = align(m, a, b, example_input=X, variant=role)
    assert distance(a, sd_p) == 0.0 and info["distance_after"] == 0.0


# ---------------------------------------------------------------- config and plan

TINY = {
    "data": {"name": "digits"},
    "model": {"name": "vit", "kwargs": {"patch": 4, "dim": 8, "depth": 1, "heads": 2, "mlp_dim": 16}},
    "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01}},
    "star": {"align_every": "epoch"},
    "study": {"n_sources": 2, "n_heldouts": 2, "eval": {"points": 3, "variants": ["heads", "mlp", "none"]},
              "bootstrap": 200, "pairs": ["star_heldout", "regular_regular"]},
}


def _cfg(**eval_over) -> Config:
    raw = copy.deepcopy(TINY)
    raw["study"]["eval"].update(eval_over)
    return validate(Config, raw)


def test_variants_config_is_checked():
    assert validate(Config, {}).study.eval.variants == []
    with pytest.raises(UserError, match=r"study.eval.variants.0: Input should be 'heads', 'mlp', 'stream' or 'none'"):
        _cfg(variants=["attention"])
    with pytest.raises(UserError, match="variants compare partial alignments with full alignment; set align: true"):
        _cfg(align=False)


def test_plan_keys_variants_apart_and_leaves_other_pairs_alone():
    plain, plan = build_plan(_cfg(variants=[])), build_plan(_cfg())
    tasks = plan.by_key()
    p0, p = plain.layout["main"]["pairs"], plan.layout["main"]["pairs"]
    assert list(p) == ["star_heldout", "regular_regular", "star_heldout_heads", "regular_regular_heads",
                       "star_heldout_mlp", "regular_regular_mlp", "star_heldout_unaligned", "regular_regular_unaligned"]
    assert {k: p[k] for k in p0} == p0  # listing variants recomputes nothing already measured
    for kind, keys in p.items():
        entry = pairkinds.get(kind)
        evs = [tasks[k].params["eval"] for k in keys]
        assert all(ev.get("variant") == (entry.variant if entry.variant != "none" else None) for ev in evs)
        assert all(ev["align"] == (entry.variant != "none") and "variants" not in ev for ev in evs)
    assert len({k for keys in p.values() for k in keys}) == sum(map(len, p.values()))  # every variant keyed apart
    # "none" is the unaligned control: listing it or the control kind plans the same tasks
    ctrl = build_plan(validate(Config, {**TINY, "study": {**TINY["study"], "eval": {"points": 3},
                                                          "pairs": ["regular_regular", "regular_regular_unaligned"]}}))
    assert ctrl.layout["main"]["pairs"]["regular_regular_unaligned"] == p["regular_regular_unaligned"]
    only_rr = build_plan(validate(Config, {**TINY, "study": {**TINY["study"], "pairs": ["regular_regular"]}}))
    assert list(only_rr.layout["main"]["pairs"]) == ["regular_regular", "regular_regular_heads",
                                                     "regular_regular_mlp", "regular_regular_unaligned"]


# ---------------------------------------------------------------- a tiny study end to end

@pytest.fixture(scope="module")
def variant_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return out, run_study(_cfg(), out, progress=False)


def test_tiny_study_measures_each_variant(variant_study):
    out, res = variant_study
    pairs = res["pairs"]
    for kind in ("star_heldout", "regular_regular"):
        for v in ("full", "heads", "mlp", "none"):
            name = kind if v == "full" else pairkinds.variant_of(kind, v)
            recs = pairs[name]
            assert recs and all(r["alignment"]["variant"] == v for r in recs)
            assert all(r["alignment"]["aligned"] == (v != "none") for r in recs)
            assert res["summary"][name]["train_loss"]["n"] == len(recs)
    # a variant record is the barrier of its two files with that alignment, measured directly
    rec = pairs["regular_regular_heads"][0]
    direct = measure_files(out / rec["a_file"], out / rec["b_file"], BarrierSettings(points=3, align='heads'), device="cpu")
    assert rec["barrier"]["train_loss"] == pytest.approx(direct["barrier"]["train_loss"], rel=1e-9)
    assert rec["alignment"]["permutable_fraction"] == pytest.approx(direct["alignment"]["permutable_fraction"])
    assert 0 < rec["alignment"]["permutable_fraction"] < 1
    md = (out / "report.md").read_text()
    assert "## Which symmetry carries the barrier" in md and "![variants](plots/variants.png)" in md
    assert "| attention heads only |" in md and (out / "plots" / "variants.png").stat().st_size > 1000
    again = run_study(_cfg(), out, progress=False)  # everything cached: the same results
    assert again == res


def test_cli_barrier_and_align_take_a_variant(variant_study, tmp_path, monkeypatch, capsys):
    out, res = variant_study
    rec = res["pairs"]["regular_regular_mlp"][0]
    a, b = out / rec["a_file"], out / rec["b_file"]
    code, text, _ = run_cli(monkeypatch, capsys, "barrier", a, b, "--points", "3", "--align", "mlp", "--json",
                            "--device", "cpu")
    assert code == 0 and json.loads(text)["barrier"]["train_loss"] == pytest.approx(rec["barrier"]["train_loss"],
                                                                                     rel=5e-6)  # --json: 6 digits
    code, _, err = run_cli(monkeypatch, capsys, "barrier", a, b, "--no-align", "--align", "heads")
    assert code == 2 and "--no-align and --align heads contradict each other" in err
    for cmd, opt in (("barrier", "--align"), ("align", "--only")):  # the choices are shown in --help
        code, text, _ = run_cli(monkeypatch, capsys, cmd, "--help", env={"COLUMNS": "300"})
        assert code == 0 and any(opt in line and "full|heads|mlp|stream|none" in line for line in text.splitlines())
    code, text, _ = run_cli(monkeypatch, capsys, "align", a, b, "--only", "heads", "--out", tmp_path / "p.safetensors",
                            "--json")
    got = json.loads(text)
    assert code == 0 and got["variant"] == "heads" and got["distance_after"] <= got["distance_before"]
    code, text, _ = run_cli(monkeypatch, capsys, "spec", a)
    assert code == 0 and "4 permutation groups (2 heads, 1 mlp, 1 stream)" in text and "  patch [stream]:" in text
