"""The study with another alignment method: study.eval.align_method aligns every aligned pair,
study.eval.methods measures star_heldout and regular_regular again per method, keyed apart; the method
and its settings travel into each pair's record."""

import copy
import json

import pytest

from stardomain import pairkinds
from stardomain.config import Config, validate
from stardomain.errors import UserError
from stardomain.study import build_plan, run_study

TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "kwargs": {"width": 8}},
    "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "star": {"align_every": "epoch"},
    "study": {"n_sources": 2, "n_heldouts": 1, "eval": {"points": 3, "learned": {"steps": 2, "select_examples": 64}},
              "bootstrap": 200, "pairs": ["star_heldout", "regular_regular", "regular_regular_unaligned"]},
}


def _cfg(**eval_over) -> Config:
    raw = copy.deepcopy(TINY)
    raw["study"]["eval"].update(eval_over)
    return validate(Config, raw)


def test_methods_config_is_checked():
    ev = validate(Config, {}).study.eval
    assert ev.align_method == "weight" and ev.methods == [] and ev.learned.steps == 100
    with pytest.raises(UserError, match=r"study.eval.align_method: Input should be 'weight', 'activation', 'ste'"):
        _cfg(align_method="sgd")
    with pytest.raises(UserError, match="study.eval.learned.steps"):
        _cfg(learned={"steps": 0})
    with pytest.raises(UserError, match="methods compare alignment methods; set align: true"):
        _cfg(align=False, methods=["ste"])


def test_plan_keys_methods_apart_and_leaves_weight_matched_pairs_alone():
    default = build_plan(validate(Config, {**TINY, "study": {**TINY["study"], "eval": {"points": 3}}}))
    plain, listed, ste = build_plan(_cfg()), build_plan(_cfg(methods=["ste", "weight"])), build_plan(_cfg(align_method="ste"))
    p0, p, s = (x.layout["main"]["pairs"] for x in (plain, listed, ste))
    # learned settings matter only where a learned method aligns: weight-matched pairs keep their keys
    assert p0 == default.layout["main"]["pairs"]
    assert {k: p[k] for k in p0} == p0
    assert list(p) == [*p0, "star_heldout_ste", "regular_regular_ste", "star_heldout_weight", "regular_regular_weight"]
    # a kind aligned by STE is the same task as the main kind of a study aligned by STE; weight the same as weight
    assert p["star_heldout_ste"] == s["star_heldout"] and p["regular_regular_ste"] == s["regular_regular"]
    assert p["regular_regular_weight"] == p0["regular_regular"]
    assert s["regular_regular_unaligned"] == p0["regular_regular_unaligned"]  # never aligned: no method in it
    assert not set(s["regular_regular"]) & set(p0["regular_regular"])
    tasks = listed.by_key()
    assert all(tasks[k].params["eval"]["align_method"] == "ste" for k in p["star_heldout_ste"])
    assert pairkinds.get("star_heldout_sinkhorn").method == "sinkhorn"
    # other settings of the learned method: other keys
    other = build_plan(_cfg(align_method="ste", learned={"steps": 3})).layout["main"]["pairs"]
    assert not set(other["star_heldout"]) & set(s["star_heldout"])


def test_study_aligned_by_ste_records_the_method_in_every_pair(tmp_path):
    run_study(_cfg(methods=["ste"]), tmp_path, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    for kind in ("star_heldout", "regular_regular"):
        for rec in res["pairs"][f"{kind}_ste"]:
            al = rec["alignment"]
            assert al["method"] == "ste" and al["settings"]["steps"] == 2 and al["equivalence_error"] < 1e-5
        assert all(r["alignment"]["method"] == "weight" for r in res["pairs"][kind])
        assert res["summary"][f"{kind}_ste"]["train_loss"]["n"] == len(res["pairs"][kind])
    hl = res["headline_by_method"]["ste"]
    star = [r["barrier"]["train_loss"] for r in res["pairs"]["star_heldout_ste"]]
    regular = [r["barrier"]["train_loss"] for r in res["pairs"]["regular_regular_ste"]]
    assert hl["difference"]["estimate"] == pytest.approx(sum(star) / len(star) - sum(regular) / len(regular), abs=1e-9)


def test_width_rows_measure_the_methods_too():
    cfg = validate(Config, {**TINY, "study": {**TINY["study"], "sweeps": {"width": [4]},
                                              "eval": {"points": 3, "methods": ["sinkhorn"]}}})
    row = build_plan(cfg).layout["sweeps"]["width"][0]
    assert list(row["pairs"]) == ["star_heldout", "regular_regular", "star_heldout_sinkhorn",
                                  "regular_regular_sinkhorn"]
