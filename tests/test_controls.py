"""Controls beyond the paper (issue 13): MergeMany centre, temperature scaling, unaligned pairs, and the
study's headline/verdict blocks, each against an independent computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import stardomain.barriers as barrier
from stardomain.config import Config, validate
from stardomain.data import get_dataset
from stardomain.merge import merge_many
from stardomain.models import build_model
from stardomain.permute import apply_permutation, distance, random_permutation, spec_for, weight_matching
from stardomain.study import build_plan, deep_merge, run_study

STARDOMAIN = str(Path(sys.executable).with_name("stardomain"))


# ---------------------------------------------------------------- MergeMany

def _mlp(seed: int):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "kwargs": {"width": 16, "depth": 2}}, (1, 8, 8), 5)


def test_merge_many_recovers_a_model_from_its_permuted_copies():
    model = _mlp(0)
    x = torch.randn(2, 1, 8, 8)
    spec = spec_for(model, x)
    sd = model.state_dict()
    copies = [sd] + [apply_permutation(spec, sd, random_permutation(spec, torch.Generator().manual_seed(i)))
                     for i in range(1, 4)]
    start = [weight_matching(spec, sd, c)[0] for c in copies]
    centre, perms, info = merge_many(spec, copies, start=start, rounds=5, seed=0)
    assert info["converged"] and info["rms_distance_to_centre"] < 1e-5
    assert distance(centre, sd, spec.parameters) < 1e-5


def test_merge_many_never_moves_sources_farther_from_their_centre():
    model = _mlp(0)
    spec = spec_for(model, torch.randn(2, 1, 8, 8))
    sds = [_mlp(s).state_dict() for s in range(5)]
    _, perms, info = merge_many(spec, sds, rounds=10, seed=0)
    assert info["rms_distance_to_centre"] <= info["rms_distance_to_centre_start"] + 1e-9
    # the reported centre is the plain average of the permuted sources (independent recomputation)
    aligned = [apply_permutation(spec, sd, p) for sd, p in zip(sds, perms)]
    centre, _, _ = merge_many(spec, sds, rounds=10, seed=0)
    for k in spec.parameters:
        torch.testing.assert_close(centre[k], sum(a[k] for a in aligned) / len(aligned))


# ---------------------------------------------------------------- temperature scaling

def test_fit_temperature_matches_a_grid_search():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=g, dtype=torch.float64) * 4
    y = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=g).view(-1)  # calibrated at T = 2.5
    T = barrier.fit_temperature(logits, y)
    assert 1.5 < T < 4
    grid = torch.exp(torch.linspace(-3, 3, 3001, dtype=torch.float64))
    scaled = logits.unsqueeze(0) / grid.view(-1, 1, 1)  # every grid temperature at once
    nll = (torch.logsumexp(scaled, 2) - scaled.gather(2, y.view(1, -1, 1).expand(len(grid), -1, 1)).squeeze(2)).mean(1)
    best = int(nll.argmin())
    assert T == pytest.approx(float(grid[best]), rel=3e-3)
    assert float(F.cross_entropy(logits / T, y)) <= float(nll[best]) + 1e-9
    assert float(F.cross_entropy(logits / T, y)) <= float(F.cross_entropy(logits, y)) + 1e-12


def test_calibration_split_is_val_or_a_disjoint_test_slice():
    from dataclasses import replace

    digits = get_dataset({"name": "digits"})
    n = len(digits.test)
    cal, test, info = barrier.calibration_split(digits, 0.2, seed=0)
    assert info["n_calibration"] == len(cal) == round(0.2 * n) and len(test) == n - len(cal)
    # together they are the test split, each example once (tag every example by its position)
    tagged = replace(digits, test=type(digits.test)(torch.arange(n, dtype=torch.float32).view(-1, 1), digits.test.y))
    c2, t2, _ = barrier.calibration_split(tagged, 0.2, seed=0)
    ids = torch.cat([c2.x.view(-1), t2.x.view(-1)]).long()
    assert sorted(ids.tolist()) == list(range(n))
    # a data set with a val split calibrates on it and keeps the whole test split
    with_val = replace(digits, val=digits.test)
    c3, t3, info3 = barrier.calibration_split(with_val, 0.2)
    assert info3["source"] == "val" and c3 is digits.test and t3 is digits.test


# ---------------------------------------------------------------- the study with every control on

TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "kwargs": {"width": 8}},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "star": {"align_every": "epoch"},
    "study": {"n_sources": 3, "n_heldouts": 3, "eval": {"points": 5, "align": True, "temperature": True},
              "bootstrap": 500,
              "pairs": ["star_heldout", "regular_regular", "average_heldout", "regular_regular_unaligned",
                        "merged_heldout"]},
}


def test_control_keys():
    base = validate(Config, {k: v for k, v in TINY.items()})
    p = build_plan(base)
    L = p.layout["main"]
    assert len(L["pairs"]["regular_regular_unaligned"]) == 9 and len(L["pairs"]["merged_heldout"]) == 3
    assert not set(L["pairs"]["regular_regular_unaligned"]) & set(L["pairs"]["regular_regular"])
    assert L["merged"] and [t.op for t in p.tasks].count("merge") == 1
    # temperature options enter pair keys only when temperature is on
    off = validate(Config, deep_merge(TINY, {"study": {"eval": {"temperature": False}}}))
    off2 = validate(Config, deep_merge(TINY, {"study": {"eval": {"temperature": False, "temperature_fraction": 0.5}}}))
    k_off = [t.key for t in build_plan(off).tasks]
    assert k_off == [t.key for t in build_plan(off2).tasks]
    assert set(L["pairs"]["regular_regular"]).isdisjoint(build_plan(off).layout["main"]["pairs"]["regular_regular"])


@pytest.fixture(scope="module")
def controls_run(tmp_path_factory):
    here = tmp_path_factory.mktemp("controls")
    cfg_path, out = here / "cfg.yaml", here / "study"
    cfg_path.write_text(yaml.safe_dump(TINY))
    res = run_study(validate(Config, TINY), out, progress=False)
    return out, res, cfg_path


def test_controls_in_results_report_and_plots(controls_run):
    out, res, _ = controls_run
    assert set(res["pairs"]) == set(TINY["study"]["pairs"])
    assert all(not r["alignment"]["aligned"] for r in res["pairs"]["regular_regular_unaligned"])
    assert all(r["alignment"]["aligned"] for r in res["pairs"]["regular_regular"])
    assert res["models"]["merged"]["info"]["method"] == "merge_many" and "merged" in res["star_quality"]
    c = res["controls"]
    assert set(c["centres"]) == {"average_heldout", "merged_heldout"}
    assert c["alignment"]["unaligned_mean"] == pytest.approx(
        np.mean([r["barrier"]["train_loss"] for r in res["pairs"]["regular_regular_unaligned"]]))
    assert c["alignment"]["share_removed"]["estimate"] == pytest.approx(
        1 - c["alignment"]["aligned_mean"] / c["alignment"]["unaligned_mean"])
    for kind in res["pairs"]:
        for r in res["pairs"][kind]:
            ts = r["temperature_scaled"]
            assert r["barrier"]["train_loss_ts"] == ts["barrier"]["train_loss"] >= 0
            # unscaled losses of the temperature pass agree with the main (vmap) curve on the same split
            np.testing.assert_allclose(ts["train"]["loss_t1"], r["train"]["loss"], rtol=1e-5, atol=1e-6)
            assert ts["calibration"]["source"].startswith("test")  # digits has no val split
            assert all(t > 0 for t in ts["temperature"])
    assert "train_loss_ts" in res["summary"]["star_heldout"] and "temperature_scaled" in c
    md = (out / "report.md").read_text()
    for text in ("merge-many centre", "not aligned", "temperature", "## Controls"):
        assert text in md
    assert "train_loss_ts" in md
    assert {p.stem for p in (out / "plots").glob("*.png")} >= {"curves", "barriers", "alignment_control"}
    assert "alignment_control" in md


def test_a_notebook_shows_a_study_as_its_verdict_and_tables(controls_run):
    import html
    import re

    import stardomain as sd

    out, res, _ = controls_run
    shown = sd.Study(out, res)._repr_html_()
    assert res["verdict_line"] in html.unescape(shown)
    report = (out / "report.html").read_text()
    tables = re.findall(r"<table>.*?</table>", shown, flags=re.S)
    assert len(tables) >= 2 and all(t in report for t in tables)  # the report's own tables (timings aside)
    assert "<img" not in shown and "<html" not in shown  # a fragment, without the figures


def test_headline_recomputed_from_pair_records(controls_run):
    out, res, _ = controls_run
    hl = res["headline"]
    sh = {r["b"]: r["barrier"]["train_loss"] for r in res["pairs"]["star_heldout"]}
    hs = sorted(sh)
    srcs = sorted({r["a"] for r in res["pairs"]["regular_regular"]})
    rr = {(r["a"], r["b"]): r["barrier"]["train_loss"] for r in res["pairs"]["regular_regular"]}
    table = np.array([[rr[(s, h)] for h in hs] for s in srcs])
    star = np.array([sh[h] for h in hs])
    d = star - table.mean(0)
    # exact sign-flip p by brute force over the 8 patterns
    pats = [np.mean(np.array(sg) * np.abs(d)) for sg in np.array(np.meshgrid(*[[1, -1]] * 3)).T.reshape(-1, 3)]
    assert hl["p_value"] == pytest.approx(np.mean([p <= d.mean() + 1e-12 for p in pats]))
    assert hl["min_p"] == 1 / 8 and hl["ratio"]["estimate"] == pytest.approx(star.mean() / table.mean())
    assert hl["verdict"] in ("supported", "not supported", "inconclusive")
    assert any(f.startswith("too few held-outs") for f in hl["flags"])  # 1/8 > 0.05
    assert hl["verdict"] != "supported"
    assert res["verdict_line"].startswith(hl["verdict"].capitalize() + " on this task")
    t = res["tests"]
    assert t["star_heldout_below_regular_regular"]["train_loss"]["role"].startswith("secondary")
    assert t["star_heldout_below_regular_regular_sign_flip"]["train_loss"]["role"].startswith("headline")
    # the report and the CLI open with the verdict line
    md_lines = [ln for ln in (out / "report.md").read_text().splitlines() if ln.strip()]
    assert md_lines[1] == f"**{res['verdict_line']}**"
    assert res["verdict_line"] in (out / "report.html").read_text().split("<p>")[1].replace("&#x27;", "'")


def test_cli_prints_the_verdict_line_first(controls_run):
    out, res, cfg_path = controls_run
    r = subprocess.run([STARDOMAIN, "run", str(cfg_path), "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == res["verdict_line"]


def test_no_interval_with_two_heldouts():
    star = [{"a": "star", "b": "h0", "barrier": {"train_loss": 0.1}},
            {"a": "star", "b": "h1", "barrier": {"train_loss": 0.2}}]
    reg = [{"a": s, "b": h, "barrier": {"train_loss": v}}
           for s, row in (("s0", (1.0, 1.2)), ("s1", (0.8, 1.0))) for h, v in zip(("h0", "h1"), row)]
    res = {"pairs": {"star_heldout": star, "regular_regular": reg}}
    from stardomain.verdict import analyse, verdict_line

    res.update(analyse(res, n_boot=200))
    assert res["headline"]["ratio"]["ci95"] == [None, None]
    line = verdict_line(res)
    assert "no interval with 2 held-outs" in line and line.startswith("Inconclusive")
    assert math.isclose(res["headline"]["ratio"]["estimate"], 0.15)


def test_barrier_cli_temperature_matches_the_study_record(controls_run, tmp_path):
    from typer.testing import CliRunner

    from stardomain.cli import app

    out, res, _ = controls_run
    rec = res["pairs"]["regular_regular"][0]
    j = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["barrier", str(out / rec["a_file"]), str(out / rec["b_file"]), "--points", "5",
                                 "--temperature", "--json-out", str(j), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    direct = json.loads(j.read_text())
    assert "temperature-scaled" in r.output
    for k in ("train_loss_ts", "test_loss_ts"):
        assert direct["barrier"][k] == pytest.approx(rec["barrier"][k], abs=1e-6)
    np.testing.assert_allclose(direct["temperature_scaled"]["temperature"], rec["temperature_scaled"]["temperature"],
                               rtol=1e-4)
