"""benchmarks/paper_mnist.py: the extraction reads the paper's pair lists correctly (a hand-made file with
known answers) and the committed numbers give the published re-analysis."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("paper_mnist", ROOT / "benchmarks" / "paper_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pair(a: str, b: str, barrier: float, la: float, lb: float) -> dict:
    path = list(np.linspace(la, lb, 11))
    return {"model1_id": a, "model2_id": b, "train_loss_barrier": barrier, "train_losses": path,
            "train_accuracies": [100 - 10 * la] + [0.0] * 9 + [100 - 10 * lb]}


def test_extraction_of_a_hand_made_design():
    pm = _module()
    loss = {"s1": 0.1, "s2": 0.2, "h1": 0.3, "h2": 0.4, "h3": 0.5, "z": 0.9}
    rr = {("s1", "h1"): 1.0, ("s1", "h2"): 2.0, ("s1", "h3"): 3.0, ("s2", "h1"): 4.0, ("s2", "h2"): 5.0,
          ("s2", "h3"): 6.0}
    doc = {"anchor_held_out": [_pair(s, h, b, loss[s], loss[h]) for (s, h), b in rr.items()],
           "star_held_out": [_pair("z", h, b, loss["z"], loss[h]) for h, b in (("h1", 0.5), ("h2", 1.0), ("h3", 1.5))],
           "star_anchor": [_pair("z", s, 0.1, loss["z"], loss[s]) for s in ("s1", "s2")]}
    row = pm._one_width(doc)
    assert row["sources"] == ["s1", "s2"] and row["heldouts"] == ["h1", "h2", "h3"] and row["star"] == "z"
    assert row["regular_regular"] == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert row["train_loss"] == pytest.approx(loss)
    r = pm.analyse_width(row, n_boot=200)
    assert r["ratio"] == pytest.approx(1.0 / 3.5)  # star mean 1.0 over the grid mean 3.5
    assert r["regular_train_loss"]["median"] == pytest.approx(0.3) and r["star_train_loss"] == pytest.approx(0.9)
    doc["star_anchor"][0]["train_losses"][0] = 0.95  # the star's loss read differently in two pairs
    with pytest.raises(ValueError, match="differs"):
        pm._one_width(doc)


def test_committed_numbers_give_the_published_reanalysis():
    pm = _module()
    data = json.loads(pm.DATA.read_text())
    assert data["source"]["commit"] == "964a6f849394469419103cddf4c5790e50ce2475"
    res = pm.analyse(data)["widths"]
    for w, row in data["widths"].items():  # 17 sources x 3 held-outs, one star, at every width
        assert np.asarray(row["regular_regular"]).shape == (17, 3) and len(row["star_heldout"]) == 3
        assert res[w]["ratio"] == pytest.approx(np.mean(row["star_heldout"]) / np.mean(row["regular_regular"]))
    assert res["16"]["ratio"] == pytest.approx(0.36, abs=0.005)
    assert res["64"]["ratio"] == pytest.approx(0.42, abs=0.005)
    assert res["64"]["ratio_ci95"] == pytest.approx([0.37, 0.49], abs=0.005)
    assert res["16"]["regular_train_loss"]["mean"] == pytest.approx(0.057, abs=5e-4)
    assert res["16"]["star_train_loss"] == pytest.approx(0.130)


def _side_module():
    spec = importlib.util.spec_from_file_location("paper_side_by_side", ROOT / "benchmarks" / "paper_side_by_side.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(label: str, loss: float, epochs: int, reached: bool | None = None) -> dict:
    return {"label": label, "seed": 0, "file": f"models/{label}.safetensors",
            "metrics": {"train": {"loss": loss, "acc": 0.9}, "test": {"loss": loss, "acc": 0.9}},
            "fit": {"epochs": epochs, "reached": reached}}


def test_side_by_side_row_of_a_finished_study(tmp_path):
    """A hand-made results.json with two stars: pooled and per-star ratios, fits and epochs as computed by hand."""
    side = _side_module()
    rr = {("s0", "h0"): 1.0, ("s0", "h1"): 3.0, ("s1", "h0"): 2.0, ("s1", "h1"): 2.0}  # grid mean 2.0
    sh = {("star 0", "h0"): 0.5, ("star 0", "h1"): 1.5, ("star 1", "h0"): 2.0, ("star 1", "h1"): 2.0}
    rec = lambda a, b, v: {"a": a, "b": b, "barrier": {"train_loss": v}}  # noqa: E731
    res = {"config": {"train": {"epochs": 20, "optimizer": {"name": "adam", "lr": 0.002}, "schedule": {"name": "cosine"}}},
           "models": {"sources": [_model("s0", 0.01, 20), _model("s1", 0.03, 12)],
                      "heldouts": [_model("h0", 0.02, 20), _model("h1", 0.04, 20)],
                      "stars": [_model("star 0", 0.025, 30, True), _model("star 1", 0.05, 40, False)]},
           "pairs": {"regular_regular": [rec(*k, v) for k, v in rr.items()],
                     "star_heldout": [rec(*k, v) for k, v in sh.items()]},
           "headline": {"ratio": {"ci95": [0.1, 0.9]}, "p_value": 0.25, "min_p": 0.25}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    row = side._folder_row(tmp_path, target=0.02)
    assert row["ratio"] == pytest.approx(1.5 / 2.0) and row["ratio_ci95"] == [0.1, 0.9]
    assert [s["ratio"] for s in row["stars"]] == pytest.approx([0.5, 1.0])  # each star over the same grid
    assert row["regular_train_loss"]["median"] == pytest.approx(0.025)
    assert [s["fit_ratio"] for s in row["stars"]] == pytest.approx([1.0, 2.0])
    assert [s["fit_met"] for s in row["stars"]] == [True, False]
    table = "\n".join(side.tables({"labels": {"b": "B"}, "parts": {"b": {"16": row}}}))
    assert "0.0250 ✓, 0.0500 ✗" in table
    assert row["epochs"] == {"regular_min": 12, "regular_max": 20, "stars": [30, 40], "target_loss": 0.02,
                             "regular_reached": 2, "cap": 20, "recipe": "adam lr 0.002, cosine"}


def test_side_by_side_keeps_earlier_rows_it_does_not_remeasure():
    """`report --keep`: a (part, width) the runs folder finished replaces the earlier row; every other earlier
    row stays with its own part's label, and widths come out in numeric order."""
    side = _side_module()
    new = {"labels": {"a": "A new", "c": "C"}, "parts": {"a": {"8": {"ratio": 0.5}}, "c": {}}}
    earlier = {"labels": {"a": "A old", "c": "C old", "a_sgd15": "A earlier recipe"},
               "parts": {"a": {"8": {"ratio": 0.9}, "64": {"ratio": 0.7}}, "c": {"4": {"ratio": 1.0}},
                         "a_sgd15": {"16": {"ratio": 0.4}}}}
    out = side.keep_rows(new, earlier)
    assert out["parts"]["a"] == {"8": {"ratio": 0.5}, "64": {"ratio": 0.7}}
    assert list(out["parts"]["a"]) == ["8", "64"]
    assert out["parts"]["c"] == {"4": {"ratio": 1.0}} and out["parts"]["a_sgd15"] == {"16": {"ratio": 0.4}}
    assert out["labels"] == {"a": "A new", "c": "C", "a_sgd15": "A earlier recipe"}
    assert new["parts"]["a"] == {"8": {"ratio": 0.5}}  # the input is not changed
