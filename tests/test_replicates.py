"""Replicating a study over study seeds (`run --seeds`): disjoint models, one combined verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stardomain.config import Config, validate
from stardomain.errors import UserError
from stardomain.stats import paired_differences, sign_flip_test
from stardomain.study import run_study
from stardomain.study.replicates import parse_seeds, run_replicates
from stardomain.verdict import _star_and_grid

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64},
        "study": {"n_sources": 2, "n_heldouts": 3, "n_stars": 2, "pairs": ["star_heldout", "regular_regular"],
                  "eval": {"points": 3}, "bootstrap": 200}}


def test_parse_seeds():
    assert parse_seeds("0-2,7, 1") == [0, 1, 2, 7]
    for bad in ("", "a", "3-x", "-1"):
        with pytest.raises(UserError):
            parse_seeds(bad)


def test_replicates_are_disjoint_and_pool_into_one_test(tmp_path):
    cfg = validate(Config, TINY)
    res = run_replicates(cfg, tmp_path / "rep", [0, 1], run_one=lambda c, d: run_study(c, d, progress=False))
    assert json.loads((tmp_path / "rep" / "combined.json").read_text())["verdict_line"] == res["verdict_line"]
    per = [json.loads((tmp_path / "rep" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    shas = [{m["sha256"] for g in ("sources", "heldouts", "stars") for m in r["models"][g]} for r in per]
    assert not shas[0] & shas[1]  # independent replicates: no model in common
    d = np.concatenate([paired_differences(*_star_and_grid(r["pairs"], "train_loss")[:2]) for r in per])
    hl = res["headline"]
    assert hl["p_value"] == pytest.approx(sign_flip_test(d)["p_value"]) and hl["n_heldouts"] == 6
    assert hl["n_stars"] == 4 and hl["n_replicates"] == 2
    assert res["replicates"] == [r["verdict_line"] for r in per]
