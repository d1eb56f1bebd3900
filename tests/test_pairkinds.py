"""Adding a pair kind is one entry in stardomain.pairkinds: a kind registered by a fixture is accepted by
the config, planned, measured, summarised and reported with no other change."""

from __future__ import annotations


import pytest

from stardomain import pairkinds

from stardomain.config import DEFAULT_PAIRS, Config, validate
from stardomain.errors import UserError
from stardomain.pairkinds import PairKind
from stardomain.study import build_plan, run_study
from stardomain.files import measure_files
from stardomain.barriers import BarrierSettings

TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "kwargs": {"width": 8}},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "study": {"n_sources": 3, "n_heldouts": 2, "eval": {"points": 5, "align": True}, "bootstrap": 500,
              "pairs": ["regular_regular", "source_source"]},
}


@pytest.fixture
def source_source(monkeypatch):
    kind = PairKind("source_source", "source – source", "tab:brown", "sources", "sources", default=False)
    monkeypatch.setitem(pairkinds.KINDS, kind.name, kind)
    return kind


def test_unregistered_kind_is_a_user_error():
    with pytest.raises(UserError, match=r"study.pairs.1: Input should be 'star_heldout', .* \(got 'source_source'\)"):
        validate(Config, TINY)


def test_builtin_table_keeps_the_config_defaults():
    assert DEFAULT_PAIRS == ("star_heldout", "regular_regular", "heldout_heldout", "star_source", "average_heldout")
    assert pairkinds.names()[len(DEFAULT_PAIRS):] == (
        "regular_regular_unaligned", "merged_heldout", "star_heldout_heads", "star_heldout_mlp", "star_heldout_stream",
        "star_heldout_unaligned", "regular_regular_heads", "regular_regular_mlp", "regular_regular_stream")
    assert [k for k, v in pairkinds.KINDS.items() if v.grid] == ["regular_regular", "regular_regular_unaligned",
                                                                 "regular_regular_heads", "regular_regular_mlp",
                                                                 "regular_regular_stream"]
    assert pairkinds.naive_centres() == {"average_heldout": "aligned average", "merged_heldout": "merge-many centre"}


def test_a_registered_kind_is_planned_measured_and_reported(source_source, tmp_path):
    cfg = validate(Config, TINY)
    plan = build_plan(cfg)
    main, tasks = plan.layout["main"], plan.by_key()
    src = main["sources"]
    assert main["star"] is None and main["average"] is None  # no measured kind pairs a centre
    assert [tasks[k].deps for k in main["pairs"]["source_source"]] == [(src[0], src[1]), (src[0], src[2]),
                                                                       (src[1], src[2])]

    out = tmp_path / "s"
    res = run_study(cfg, out, progress=False)
    recs = res["pairs"]["source_source"]
    assert [(r["a"], r["b"]) for r in recs] == [("source 0", "source 1"), ("source 0", "source 2"),
                                                ("source 1", "source 2")]
    for rec in recs:  # measured: each record is the barrier of its two model files, measured directly
        direct = measure_files(out / rec["a_file"], out / rec["b_file"], BarrierSettings(points=5, align=True), device="cpu")
        for m in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert rec["barrier"][m] == pytest.approx(direct["barrier"][m], abs=1e-6)
    s = res["summary"]["source_source"]["train_loss"]
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(sum(r["barrier"]["train_loss"] for r in recs) / 3, rel=1e-9)
    assert s["ci_method"] == "bootstrap over pairs (pairs share sources)"

    report = (out / "report.md").read_text().splitlines()
    assert f"| source – source | train_loss | {s['mean']:.4f} | {s['std']:.4f} | " in "\n".join(report)
    assert (out / "plots" / "curves.png").is_file()


def test_views_follow_the_table(source_source, monkeypatch):
    from stardomain.report.study import KIND_COLORS, KIND_NAMES
    from stardomain.verdict import CENTRES

    assert KIND_NAMES["source_source"] == "source – source" and KIND_COLORS["source_source"] == "tab:brown"
    assert dict(CENTRES) == {"average_heldout": "aligned average", "merged_heldout": "merge-many centre"}
    centre = PairKind("median_heldout", "median – held-out", "k", "average", "heldouts", centre_name="median")
    monkeypatch.setitem(pairkinds.KINDS, centre.name, centre)
    assert CENTRES["median_heldout"] == "median" and len(CENTRES) == 3
