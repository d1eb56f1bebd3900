"""The shipped study configs plan what their comments promise (no training: build_plan only)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from clitools import run_cli

from stardomain.config import load_config
from stardomain.study import build_plan

ROOT = Path(__file__).resolve().parents[1]


def test_mnist_width_sweep_plans_the_papers_setting():
    cfg = load_config(ROOT / "configs" / "mnist_width_sweep.yaml")
    assert cfg.data.name == "mnist" and cfg.model.name == "mlp" and cfg.model.kwargs["depth"] == 1
    assert (cfg.study.n_sources, cfg.study.n_heldouts) == (17, 3)
    widths = [4, 8, 16, 32, 64, 128, 256]
    assert cfg.study.sweeps.width == widths
    plan = build_plan(cfg)
    # 20 models and one star per width; the main population (width 16) is the width-16 row, shared
    ops = Counter(t.op for t in plan.tasks)
    assert ops == {"train": 20 * len(widths), "star": len(widths), "pair": (17 * 3 + 3) * len(widths)}
    rows = plan.layout["sweeps"]["width"]
    assert [r["value"] for r in rows] == widths
    for r in rows:
        assert len(r["sources"]) == 17 and len(r["heldouts"]) == 3
        assert {k: len(v) for k, v in r["pairs"].items()} == {"star_heldout": 3, "regular_regular": 51}
    w16 = rows[widths.index(16)]
    main = plan.layout["main"]
    assert (w16["sources"], w16["heldouts"], w16["star"]) == (main["sources"], main["heldouts"], main["star"])
    # every model of a row has that row's width
    tasks = plan.by_key()
    for r in rows:
        for k in [*r["sources"], *r["heldouts"], *r["star"]]:
            assert tasks[k].params["config"]["model"]["kwargs"]["width"] == r["value"]


def test_width_sweep_star_recipe_is_the_default_studys():
    """The sweep's width-16 row is the default setting, so it must use the default's recipes."""
    sweep = load_config(ROOT / "configs" / "mnist_width_sweep.yaml")
    default = load_config(ROOT / "configs" / "default.yaml")
    assert sweep.train == default.train and sweep.star == default.star


def test_transformer_studies_plan_controls_and_the_sources_sweep():
    """configs/text_gpt.yaml and configs/mnist_vit.yaml: a transformer per study, the naive-centre and
    no-alignment controls, the attention alignment variants, n_stars stars per |Z| in the sweep, held-outs enough
    for a significant sign-flip test."""
    for name, data, model in (("text_gpt", "pydoc_text", "gpt"), ("mnist_vit", "mnist", "vit")):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.data.name, cfg.model.name) == (data, model)
        assert {"regular_regular_unaligned", "average_heldout", "merged_heldout"} <= set(cfg.study.pairs)
        assert {"heads", "mlp", "none"} <= set(cfg.study.eval.variants)  # which symmetry carries the barrier
        assert 2 ** -cfg.study.n_heldouts < cfg.study.alpha  # the smallest sign-flip p can be significant
        plan = build_plan(cfg)
        ops = Counter(t.op for t in plan.tasks)
        assert ops["star"] == len(cfg.study.sweeps.n_sources) * cfg.study.n_stars and ops["train"] == cfg.study.n_sources + cfg.study.n_heldouts
        rows = plan.layout["sweeps"]["n_sources"]
        assert [r["value"] for r in rows] == sorted(cfg.study.sweeps.n_sources)
        assert rows[-1]["value"] == cfg.study.n_sources and rows[-1]["star"] == plan.layout["main"]["star"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["text_gpt", "mnist_vit"])
def test_transformer_study_runs_end_to_end_at_tiny_scale(name, tmp_path, monkeypatch, capsys):
    """The shipped config as written, shrunk by --set only: every task kind (sources, stars of the sweep,
    centres, every variant's pairs) runs, the report is written, and a second run recomputes nothing."""
    small = ["data.train_subset=96", "train.epochs=1", "star.train.epochs=1", "study.n_sources=2",
             "study.n_heldouts=1", "study.sweeps.n_sources=[2]", "study.eval.points=3",
             "study.eval.examples=32", "study.bootstrap=100", "model.kwargs.depth=1"]
    args = ["run", ROOT / "configs" / f"{name}.yaml", "--out", tmp_path / "out"]
    for s in small:
        args += ["--set", s]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for kind in ("star_heldout", "regular_regular_heads", "regular_regular_mlp", "regular_regular_unaligned",
                 "average_heldout", "merged_heldout"):
        assert res["pairs"][kind], kind
    before = (tmp_path / "out" / "results.json").read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and (tmp_path / "out" / "results.json").read_bytes() == before
