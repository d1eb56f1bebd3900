"""Result objects show themselves in Jupyter (a barrier as its curve, BMA as its table; a study's verdict and
tables are tested beside the study run in test_controls.py), and docs/tutorial.ipynb runs top to bottom."""

import html
import os
from pathlib import Path

import pytest

import stardomain as sd
from stardomain.config import Config

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


@pytest.fixture(scope="module")
def pair():
    cfg = Config.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
                                 "train": {"epochs": 1, "batch_size": 64}})
    return sd.train(cfg, seed=0), sd.train(cfg, seed=1)


def test_a_barrier_shows_itself_as_its_curve(pair):
    r = sd.barrier(*pair, points=3)
    png = r._repr_png_()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == r.plot()


def test_bma_shows_itself_as_its_table(pair):
    res = sd.bma(pair[0], [pair[1]], k=2, seeds=1)
    shown = res._repr_html_()
    assert shown == f"<pre>{html.escape(res.table())}</pre>"
    assert all(html.escape(p) in shown for p in ("star", "ensemble"))


@pytest.mark.slow
def test_the_tutorial_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(TUTORIAL, as_version=4)
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIAL.parent)}}).execute(
        env={**os.environ, "OMP_NUM_THREADS": "2"})
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    assert not any(o.get("output_type") == "error" for outs in outputs.values() for o in outs)
    shown = [o.get("data", {}) for outs in outputs.values() for o in outs if o.get("output_type") == "execute_result"]
    assert sum("image/png" in d for d in shown) == 2  # the two barriers, as curves
    assert any("text/html" in d and "<pre>" in d["text/html"] for d in shown)  # the BMA table
