"""BMA: the stacked functional evaluation against a plain loop over modules (an independent
implementation), single-model identities, and the CLI end to end on digits."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import stardomain.averaging as bma
from stardomain import metrics as M
from stardomain.checkpoint import save_model
from stardomain.cli import app
from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain.engine import Engine, Stack
from stardomain.interpolate import average, lerp, recalibrate_bn
from stardomain.models import build_model
from stardomain.training import init_model, model_meta
from stardomain.report.averaging import report_section
from stardomain.report.averaging import table as bma_table
from stardomain.averaging import BMASettings


def _cfg(model):
    return Config.model_validate({"data": {"name": "digits"}, "model": model,
                                  "train": {"epochs": 3, "batch_size": 64, "optimizer": {"lr": 0.05}}})


MLP_BN = {"name": "mlp", "kwargs": {"width": 16, "bn": True}}
CNN_BN = {"name": "cnn", "kwargs": {"widths": [4, 8], "norm": "bn"}}


def _perturbed(cfg, data, seed):
    """A random network with non-trivial BN parameters (so recalibration matters)."""
    sd = init_model(cfg, data, seed).state_dict()
    g = torch.Generator().manual_seed(100 + seed)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in sd.items()}


def _loop_bma(cfg, data, star, sources, idx, t, bn_batches, batch_size):
    """The straightforward way: build each sampled model as a module, recalibrate, softmax, average."""
    x = data.test.x
    total = torch.zeros(len(x), data.num_classes, dtype=torch.float64)
    for n, tt in zip(idx.tolist(), t.tolist()):
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        model.load_state_dict(lerp(star, sources[n], tt))
        recalibrate_bn(model, data.train, batch_size=batch_size, max_batches=bn_batches)
        with torch.no_grad():
            total += model(x).softmax(-1).double()
    return total / len(t)


@pytest.mark.parametrize("model", [MLP_BN, CNN_BN], ids=["mlp-bn", "cnn-bn"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_functional_bma_equals_module_loop(model, vectorize):
    cfg = _cfg(model)
    data = get_dataset(cfg.data)
    star = _perturbed(cfg, data, 0)
    sources = [_perturbed(cfg, data, s) for s in (1, 2, 3)]
    k = 6
    idx, t = bma.draw_star(len(sources), k, torch.Generator().manual_seed(0))
    ev = Engine(build_model(cfg.model, data.input_shape, data.num_classes), strategy="vmap" if vectorize else "loop")

    def chunk_weights(sl):
        rows = idx[sl].tolist()
        return Stack.of([star] * len(rows)), Stack.of([sources[r] for r in rows])

    ctx = bma.Context(ev, data, star, sources, None, None, BMASettings(k=k, chunk=4, batch_size=300, bn_batches=3),
                      {}, lambda s: None)
    (final, curve, _) = bma._bma_run(ctx, chunk_weights, t)
    want = _loop_bma(cfg, data, star, sources, idx, t, bn_batches=3, batch_size=300)
    assert (final["test"] - want).abs().max().item() < 1e-5
    # the prefix curve's last point is the final predictor
    assert curve[6]["nll"] == pytest.approx(M.nll(final["test"], data.test.y))
    # first point: one model only
    first = _loop_bma(cfg, data, star, sources, idx[:1], t[:1], bn_batches=3, batch_size=300)
    assert curve[1]["nll"] == pytest.approx(M.nll(first, data.test.y), abs=1e-5)


def test_batched_recalibration_matches_recalibrate_bn_whole_split():
    cfg = _cfg(CNN_BN)
    data = get_dataset(cfg.data)
    sds = [_perturbed(cfg, data, s) for s in (4, 5)]
    ev = Engine(build_model(cfg.model, data.input_shape, data.num_classes), strategy="vmap")
    w = ev.recalibrate(Stack.of(sds), data.train, batch_size=500).tensors  # last batch is smaller: equal weights
    for i, sd in enumerate(sds):
        m = build_model(cfg.model, data.input_shape, data.num_classes)
        m.load_state_dict(sd)
        recalibrate_bn(m, data.train, batch_size=500)
        for key, v in m.state_dict().items():
            if "running" in key:
                assert torch.allclose(w[key][i], v, atol=1e-5), key


def test_evaluate_predictors_against_independent_computation():
    cfg = _cfg(MLP_BN)
    data = get_dataset(cfg.data)
    star = _perturbed(cfg, data, 0)
    sources = [_perturbed(cfg, data, s) for s in (1, 2, 3)]
    res = bma.evaluate_predictors(cfg, star, sources, BMASettings(k=4, seed=7, seeds=2, align=False, bn_batches=2, batch_size=400, ns=(1,)), device="cpu")
    y = data.test.y

    def probs(sd, recal=False):
        m = build_model(cfg.model, data.input_shape, data.num_classes)
        m.load_state_dict(sd)
        if recal:
            recalibrate_bn(m, data.train, batch_size=400, max_batches=2)
        m.eval()
        with torch.no_grad():
            return m(data.test.x).softmax(-1).double()

    ps = [probs(sd) for sd in sources]
    assert res["source_1"]["nll"] == pytest.approx(M.nll(ps[1], y), abs=1e-6)
    assert res["ensemble"]["nll"] == pytest.approx(M.nll(sum(ps) / 3, y), abs=1e-6)
    assert res["ensemble"]["ece"] == pytest.approx(M.ece(sum(ps) / 3, y), abs=1e-6)
    assert res["star"]["brier"] == pytest.approx(M.brier(probs(star), y), abs=1e-6)
    assert res["weight_average"]["nll"] == pytest.approx(M.nll(probs(average(sources), recal=True), y), abs=1e-5)
    # star BMA: the same draws through the module loop, mean over the two evaluation seeds
    vals = []
    for s in (7, 8):
        idx, t = bma.draw_star(3, 4, bma._generator(s, "star-bma-3"))
        vals.append(M.nll(_loop_bma(cfg, data, star, sources, idx, t, bn_batches=2, batch_size=400), y))
    assert res["star_bma"]["nll"] == pytest.approx(sum(vals) / 2, abs=1e-5)
    assert res["star_bma"]["values"]["nll"] == pytest.approx(vals, abs=1e-5)
    assert res["star_bma"]["n_values"] == 2 and res["star_bma"]["n_sources"] == 3 and res["star_bma"]["ci95"]["nll"] >= 0
    # a 1-source ensemble is that source
    assert res["_by_n"]["1"]["ensemble"]["nll"] == pytest.approx(res["source_0"]["nll"])
    assert "regular_bma" not in res["_by_n"]["1"] and "star_bma" in res["_by_n"]["1"]
    # OOD shifts are scored, and the means are the means
    shifts = res["_info"]["ood_shifts"]
    assert set(shifts) == {"inverted", "rot90", "noise"}
    assert res["star"]["ood_auroc"] == pytest.approx(sum(res["star"][f"ood_auroc_{s}"] for s in shifts) / 3)
    assert res["_curves"]["k"] == [1, 2, 4]
    assert res["_curves"]["star_bma"]["nll"][-1] == pytest.approx(res["star_bma"]["nll"])


def test_ensemble_of_one_is_that_model():
    cfg = _cfg(MLP_BN)
    data = get_dataset(cfg.data)
    sd = _perturbed(cfg, data, 9)
    res = bma.evaluate_predictors(cfg, None, [sd], BMASettings(k=2, align=False, ood=False), device="cpu")
    for m in M.classification_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([0])):
        a, b = res["ensemble"][m], res["source_0"][m]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    assert "star_bma" not in res and "regular_bma" not in res


def test_ood_sets_are_deterministic_and_shifted():
    data = get_dataset("digits")
    a, b = bma.ood_sets(data, seed=0), bma.ood_sets(data, seed=0)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].shape == data.test.x.shape
    mean, std = data.info["normalisation"]["mean"][0], data.info["normalisation"]["std"][0]
    pix = data.test.x * std + mean
    assert torch.allclose(a["inverted"] * std + mean, 1 - pix, atol=1e-5)
    assert torch.equal(a["rot90"][0, 0], torch.rot90(data.test.x[0, 0]))
    noise = a["noise"] * std + mean
    assert noise.min() >= -1e-6 and noise.max() <= 1 + 1e-6


def _train_files(tmp_path):
    from stardomain.training import train

    cfg = _cfg(MLP_BN)
    data = get_dataset(cfg.data)
    paths = []
    for s in range(3):
        model, metrics = train(cfg, s, device="cpu", progress=False)
        p = tmp_path / f"s{s}.safetensors"
        save_model(p, model.state_dict(), model_meta(cfg, data, s, "source", metrics=metrics))
        paths.append(p)
    try:
        from stardomain.starlight import train_star

        star_model, info = train_star(cfg, [__import__("stardomain.checkpoint", fromlist=["x"]).read_model_file(p)[0]
                                            for p in paths[:2]], seed=0, device="cpu")
        star_sd = star_model.state_dict()
    except ImportError:  # starlight not available: any model file with role star will do
        star_sd = train(cfg, 10, device="cpu", progress=False)[0].state_dict()
    star = tmp_path / "star.safetensors"
    save_model(star, star_sd, model_meta(cfg, data, 0, "star"))
    return star, paths[:2]


def test_cli_end_to_end_on_digits(tmp_path):
    star, sources = _train_files(tmp_path)
    out, png, md = tmp_path / "bma.json", tmp_path / "bma.png", tmp_path / "bma.md"
    r = CliRunner().invoke(app, ["bma", "--star", str(star), "--sources", *map(str, sources), "--k", "4",
                                 "--seeds", "2", "--json-out", str(out), "--plot", str(png), "--report", str(md),
                                 "--bn-batches", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for name in ("source_0", "source_1", "ensemble", "star", "star_bma", "regular_bma", "weight_average"):
        e = res[name]
        for m in ("accuracy", "nll", "brier", "ece", "ace", "auroc_misclassification",
                  "auroc_misclassification_entropy", "ood_auroc", "seconds"):
            assert m in e, (name, m)
        assert 0 <= e["accuracy"] <= 1 and e["nll"] > 0 and 0 <= e["brier"] <= 2
    assert res["ensemble"]["accuracy"] > 0.8  # trained models on digits
    assert res["_info"]["aligned"] is True
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert "| star_bma |" in text and "ensemble" in text and "star BMA vs ensemble" in text
    assert text == report_section(res)


def test_cli_refuses_bad_input(tmp_path):
    from stardomain.cli import main
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from stardomain.cli import main; main()", "bma", "--star",
                        str(tmp_path / "nope.safetensors"), "--sources", str(tmp_path / "x.safetensors"),
                        "--json-out", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert main  # imported for the subprocess path


def test_report_section_says_where_star_bma_wins():
    ens = {"accuracy": 0.90, "nll": 0.30, "ece": 0.02, "auroc_misclassification": 0.80, "seconds": 1.0}
    sb = {"accuracy": 0.95, "nll": 0.31, "ece": 0.05, "auroc_misclassification": 0.85, "seconds": 2.0,
          "ci95": {"accuracy": 0.01, "nll": 0.02, "ece": 0.01, "auroc_misclassification": 0.01}}
    res = {"ensemble": ens, "star_bma": sb, "_info": {"k": 8, "seeds": [0, 1, 2], "n_sources": 5}}
    text = report_section(res)
    win = text.split("beats the deep ensemble on ")[1].split(";")[0]
    assert "acc (0.9500 vs 0.9000)" in win and "AUROC mis (max-p)" in win and "ECE" not in win
    assert "worse on ECE (0.0500 vs 0.0200)" in text
    assert "within the 95% CI on NLL (0.3100 vs 0.3000)" in text
    assert "| star_bma | 0.9500 ± 0.0100 |" in text


@settings(max_examples=30, deadline=None)
@given(ts=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_interpolate_stacked_equals_lerp(ts):
    a = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), "n": torch.tensor(5)}
    b = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(1)), "n": torch.tensor(7)}
    out = Stack.lerp_rows(Stack.of([a] * len(ts)), Stack.of([b] * len(ts)), torch.tensor(ts, dtype=torch.float64)).tensors
    for i, t in enumerate(ts):
        want = lerp(a, b, t)
        assert torch.allclose(out["w"][i], want["w"], atol=1e-6) and out["n"][i] == 5
        assert torch.equal(out["w"][i], want["w"])  # one interpolation: bit-identical to interpolate.lerp


@given(k=st.integers(1, 300))
def test_k_checkpoints(k):
    ks = bma.k_checkpoints(k)
    assert ks[-1] == k and ks[0] == 1 and ks == sorted(set(ks))
    assert all(x & (x - 1) == 0 for x in ks[:-1])


class ItemNet(torch.nn.Module):
    """Data-dependent Python control flow (.item()): vmap cannot run it, a loop can."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x):
        if self.fc.weight.abs().sum().item() >= 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def make_itemnet(in_shape, num_classes):
    return ItemNet(in_shape, num_classes)


def test_modules_vmap_rejects_fall_back_to_a_loop():
    cfg = _cfg({"factory": "test_bma:make_itemnet"})
    data = get_dataset(cfg.data)
    star, *sources = [_perturbed(cfg, data, s) for s in range(3)]
    res = bma.evaluate_predictors(cfg, star, sources, BMASettings(k=3, seed=1, seeds=1, align=False, ood=False), device="cpu")
    assert res["_info"]["vectorized"] is False and "vmap_error" in res["_info"]
    idx, t = bma.draw_star(2, 3, bma._generator(1, "star-bma-2"))
    want = M.nll(_loop_bma(cfg, data, star, sources, idx, t, bn_batches=None, batch_size=1000), data.test.y)
    assert res["star_bma"]["nll"] == pytest.approx(want, abs=1e-6)


def test_a_predictor_is_one_registration(monkeypatch):
    """A new predictor (here: the sources' geometric-mean ensemble) added by one register_predictor call
    is scored like the others, in the result, the report table and the CLI table."""

    class GeometricEnsemble(bma.Predictor):
        name, kind, cost, by_n = "geometric_ensemble", "ensemble", "n networks", True

        def runs(self, ctx, n):
            src = ctx.source_runs()[:n]
            probs = {s: torch.stack([r.probs[s] for r in src]).log().mean(0).softmax(-1) for s in src[0].probs}
            return [bma.Run(probs, sum(r.seconds for r in src))]

    monkeypatch.setattr(bma, "PREDICTORS", list(bma.PREDICTORS))
    bma.register_predictor(GeometricEnsemble())
    cfg = _cfg(MLP_BN)
    data = get_dataset(cfg.data)
    sources = [_perturbed(cfg, data, s) for s in (1, 2)]
    res = bma.evaluate_predictors(cfg, None, sources, BMASettings(k=2, seeds=1, align=False, ns=(1,)), device="cpu")
    ps = []
    for sd in sources:
        m = build_model(cfg.model, data.input_shape, data.num_classes)
        m.load_state_dict(sd)
        with torch.no_grad():
            ps.append(m.eval()(data.test.x).softmax(-1).double())
    want = torch.stack(ps).log().mean(0).softmax(-1)
    assert res["geometric_ensemble"]["nll"] == pytest.approx(M.nll(want, data.test.y), abs=1e-6)
    # one source: its own probabilities, up to the log/softmax round trip
    assert res["_by_n"]["1"]["geometric_ensemble"]["nll"] == pytest.approx(res["source_0"]["nll"], abs=1e-7)
    assert "| geometric_ensemble |" in report_section(res)
    assert "geometric_ensemble" in bma_table(res)


def test_a_metric_is_one_descriptor(monkeypatch):
    """A new metric descriptor (mean top-label confidence) shows up for every predictor, in the report
    table under its label, in the CLI table, and its direction drives the star-BMA-vs-ensemble sentence."""
    monkeypatch.setattr(M, "METRICS", list(M.METRICS))
    M.register_metric(M.Metric("confidence", "mean conf", False, lambda p, y, b: float(p.max(1).values.mean())))
    cfg = _cfg(MLP_BN)
    data = get_dataset(cfg.data)
    star = _perturbed(cfg, data, 0)
    sources = [_perturbed(cfg, data, s) for s in (1, 2)]
    res = bma.evaluate_predictors(cfg, star, sources, BMASettings(k=2, seeds=2, align=False, ood=False), device="cpu")
    m = build_model(cfg.model, data.input_shape, data.num_classes)
    m.load_state_dict(star)
    with torch.no_grad():
        p = m.eval()(data.test.x).softmax(-1).double()
    assert res["star"]["confidence"] == pytest.approx(float(p.max(1).values.mean()), abs=1e-6)
    assert len(res["star_bma"]["values"]["confidence"]) == 2 and "confidence" in res["_curves"]["star_bma"]
    text = report_section(res)
    header = next(line for line in text.splitlines() if line.startswith("| predictor"))
    assert "mean conf" in header and "mean conf" in bma_table(res).splitlines()[0]
    assert "mean conf (" in text  # compared with the ensemble in the sentences
