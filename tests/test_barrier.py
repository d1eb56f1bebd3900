"""Barriers and interpolation curves, each checked against an independent computation."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from stardomain.barriers import barriers, curve, grid, interpolated_states, measure
from stardomain.report.barriers import plot
from stardomain.config import Config
from stardomain.data import DataBundle, Split, get_dataset
from stardomain.errors import UserError
from stardomain.interpolate import lerp, recalibrate_bn
from stardomain.models import build_model
from stardomain.barriers import BarrierSettings

CURVE_KEYS = [(s, m) for s in ("train", "test") for m in ("loss", "acc")]


def max_diff(r1, r2):
    return max(abs(a - b) for s, m in CURVE_KEYS for a, b in zip(r1[s][m], r2[s][m]))


@pytest.fixture(scope="module")
def digits():
    return get_dataset({"name": "digits"})


@pytest.fixture(scope="module")
def mlp_pair():
    """Two digits MLPs (width 16) from different seeds: an MNIST-like pair, trained in about a second."""
    from stardomain.training import train

    cfg = Config.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 16}},
                                 "train": {"epochs": 4, "batch_size": 64}})
    a, _ = train(cfg, 0, progress=False)
    b, _ = train(cfg, 1, progress=False)
    return a, a.state_dict(), b.state_dict()


def _with_bn_stats(model, x, seed):
    """An untrained model with non-trivial weights and running statistics (a few train-mode passes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.train()
        for i in range(3):
            model(x[i * 100:(i + 1) * 100])
    return model.eval()


# ---- barriers() on hand-made curves -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(y0=st.floats(0, 5), y1=st.floats(0, 5), bump=st.floats(-1, 1), k=st.integers(1, 9))
def test_barrier_of_chord_plus_bump(y0, y1, bump, k):
    ts = grid(11)
    loss = [(1 - t) * y0 + t * y1 for t in ts]
    acc = [0.9] * 11
    loss[k] += bump
    acc[k] -= bump / 10
    rec = {"t": ts, "train": {"loss": loss, "acc": acc}, "test": {"loss": loss, "acc": acc}}
    b = barriers(rec)
    assert b["train_loss"] == pytest.approx(max(0.0, bump), abs=1e-9)
    if bump > 1e-9:
        assert b["train_loss_t"] == ts[k] and b["train_loss_max"] == pytest.approx(bump, abs=1e-9)
    # accuracy barrier is the drop below the chord, a positive number
    assert b["test_acc"] == pytest.approx(max(0.0, bump / 10), abs=1e-9)
    assert b["train_loss_mid"] == pytest.approx(bump if k == 5 else 0.0, abs=1e-9)


def test_barrier_needs_endpoints():
    with pytest.raises(UserError):
        barriers({"t": [0.0, 0.5], "train": {"loss": [1, 2], "acc": [1, 1]}, "test": {"loss": [1, 2], "acc": [1, 1]}})


# ---- a hand-computable case ---------------------------------------------------------------------


def _toy(c_a, c_b):
    """x = +1 (class 0), x = -1 (class 1); logits of Linear(1, 2) with W = [[c], [-c]], b = 0 are
    [c·x, -c·x], so the loss of either example is softplus(-2c) and along the path c(t) = (1-t)c_a + t·c_b."""
    x = torch.tensor([[1.0], [-1.0]])
    y = torch.tensor([0, 1])
    data = DataBundle(name="toy", train=Split(x, y), test=Split(x, y), num_classes=2, input_shape=(1,))
    model = nn.Sequential(nn.Linear(1, 2))

    def sd(c):
        return {"0.weight": torch.tensor([[c], [-c]]), "0.bias": torch.zeros(2)}

    return model, sd(c_a), sd(c_b), data


@pytest.mark.parametrize("method", ["vmap", "loop"])
@pytest.mark.parametrize("c_a,c_b", [(2.0, -2.0), (0.0, 3.0), (1.5, 0.5)])
def test_closed_form_logistic_path(c_a, c_b, method):
    model, sa, sb, data = _toy(c_a, c_b)
    ts = grid(11)
    rec = curve(model, sa, sb, data, ts, BarrierSettings(method=method))
    sp = lambda z: math.log1p(math.exp(z)) if z < 30 else z  # noqa: E731
    want = [sp(-2 * ((1 - t) * c_a + t * c_b)) for t in ts]
    assert np.allclose(rec["train"]["loss"], want, atol=1e-6)
    # accuracy: both correct when c(t) > 0, both wrong when < 0, one (argmax ties -> class 0) when = 0
    acc = [1.0 if c > 0 else 0.5 if c == 0 else 0.0 for c in ((1 - t) * c_a + t * c_b for t in ts)]
    assert rec["test"]["acc"] == acc
    b = barriers(rec)
    dev = [w - ((1 - t) * want[0] + t * want[-1]) for t, w in zip(ts, want)][1:-1]
    assert b["train_loss_max"] == pytest.approx(max(dev), abs=1e-6)
    assert b["train_loss"] == pytest.approx(max(0.0, max(dev)), abs=1e-6)


# ---- a model against itself, and against a permuted copy ----------------------------------------


def test_model_against_itself_has_zero_barrier(mlp_pair, digits):
    model, sa, _ = mlp_pair
    rec = measure(model, sa, sa, digits, BarrierSettings(align=False))
    for s, m in CURVE_KEYS:
        assert np.allclose(rec[s][m], rec[s][m][0], atol=1e-6)
    for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert rec["barrier"][k] == pytest.approx(0.0, abs=1e-6)


def test_bn_model_against_itself_after_recalibration(digits):
    """With its own statistics already recomputed on the full training split, interior recalibration
    reproduces them, so the curve is flat."""
    model = build_model({"name": "cnn", "kwargs": {"widths": [8, 16]}}, (1, 8, 8), 10)
    _with_bn_stats(model, digits.train.x, 0)
    recalibrate_bn(model, digits.train, 1000)
    sd = model.state_dict()
    rec = curve(model, sd, sd, digits, grid(5))
    for s, m in CURVE_KEYS:
        assert np.allclose(rec[s][m], rec[s][m][0], atol=1e-5)


def _permute_mlp(sd, perm):
    """Hand-written permutation of a one-hidden-layer MLP's hidden units (the function is unchanged)."""
    out = dict(sd)
    out["1.weight"], out["1.bias"] = sd["1.weight"][perm], sd["1.bias"][perm]
    out["3.weight"] = sd["3.weight"][:, perm]
    return out


def test_permuted_copy(mlp_pair, digits):
    model, sa, _ = mlp_pair
    sp = _permute_mlp(sa, torch.randperm(16, generator=torch.Generator().manual_seed(3)))
    plain = measure(model, sa, sp, digits, BarrierSettings(align=False))
    aligned = measure(model, sa, sp, digits, BarrierSettings(align=True))
    # the endpoints compute the same function
    assert plain["train"]["loss"][0] == pytest.approx(plain["train"]["loss"][-1], abs=1e-5)
    assert plain["barrier"]["train_loss"] > 0.05
    assert aligned["alignment"]["aligned"] and not plain["alignment"]["aligned"]
    assert aligned["alignment"]["distance_after"] == pytest.approx(0.0, abs=1e-5)
    for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert aligned["barrier"][k] == pytest.approx(0.0, abs=1e-5)


# ---- BatchNorm recalibration --------------------------------------------------------------------


def test_bn_recalibration_equals_full_batch_statistics(digits):
    """One batch holding the whole training split: running mean/var must be the full-batch mean and
    unbiased variance of the pre-BN activations, computed here by hand in float64."""
    model = build_model({"name": "mlp", "kwargs": {"width": 12, "bn": True}}, (1, 8, 8), 10)
    _with_bn_stats(model, digits.train.x, 1)
    sa = model.state_dict()
    sb = _with_bn_stats(build_model({"name": "mlp", "kwargs": {"width": 12, "bn": True}}, (1, 8, 8), 10),
                        digits.train.x, 2).state_dict()
    ts = [0.0, 0.3, 0.5, 1.0]
    states = interpolated_states(model, sa, sb, digits, ts, batch_size=len(digits.train))
    x = digits.train.x.reshape(len(digits.train), -1).double()
    for t, sd in zip(ts, states):
        if t in (0.0, 1.0):
            own = sa if t == 0.0 else sb
            assert torch.equal(sd["2.running_mean"], own["2.running_mean"])
            continue
        w = (1 - t) * sa["1.weight"].double() + t * sb["1.weight"].double()
        bias = (1 - t) * sa["1.bias"].double() + t * sb["1.bias"].double()
        h = x @ w.T + bias
        assert torch.allclose(sd["2.running_mean"].double(), h.mean(0), atol=1e-5)
        assert torch.allclose(sd["2.running_var"].double(), h.var(0, unbiased=True), rtol=1e-4, atol=1e-5)
        assert int(sd["2.num_batches_tracked"]) == 1


@pytest.mark.parametrize("spec, shape", [({"name": "cnn", "kwargs": {"widths": [6, 8]}}, (1, 8, 8)),
                                         ({"name": "mlp", "kwargs": {"width": 16, "depth": 2, "bn": True}}, (1, 8, 8))])
def test_recalibrate_bn_equals_float64_train_mode_pass(digits, spec, shape):
    """recalibrate_bn (channels-last convolutions, own two-pass statistics) against PyTorch's contiguous
    train-mode BatchNorm run in float64 with momentum=None (the cumulative average over batches)."""
    model = _with_bn_stats(build_model(spec, shape, 10), digits.train.x, 3)
    ref = build_model(spec, shape, 10).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    ref.train()
    with torch.no_grad():
        for i in range(0, len(digits.train), 250):
            ref(digits.train.x[i:i + 250].double())
    recalibrate_bn(model, digits.train, 250)
    assert not model.training and all(p.is_contiguous() for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())  # the temporary forwards are gone
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if "running" in k:
            assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
        if "num_batches" in k:
            assert int(got[k]) == int(v) == math.ceil(len(digits.train) / 250)


@pytest.mark.parametrize("bn_batches", [None, 2])
def test_bn_recalibration_equals_recalibrate_bn_over_batches(digits, bn_batches):
    """Several batches (average of per-batch statistics) for a CNN: the same as recalibrate_bn run on
    each interpolated model from scratch."""
    spec = {"name": "cnn", "kwargs": {"widths": [6, 8]}}
    model = _with_bn_stats(build_model(spec, (1, 8, 8), 10), digits.train.x, 1)
    sa, sb = model.state_dict(), _with_bn_stats(build_model(spec, (1, 8, 8), 10), digits.train.x, 2).state_dict()
    ts = [0.0, 0.25, 0.6, 1.0]
    states = interpolated_states(model, sa, sb, digits, ts, batch_size=300, bn_batches=bn_batches)
    ref = build_model(spec, (1, 8, 8), 10)
    for t, sd in zip(ts[1:-1], states[1:-1]):
        ref.load_state_dict(lerp(sa, sb, t))
        recalibrate_bn(ref, digits.train, 300, bn_batches)
        for k, v in ref.state_dict().items():
            assert torch.allclose(sd[k].double(), v.double(), atol=1e-5, rtol=1e-5), k


# ---- fast paths against the reference -----------------------------------------------------------


@pytest.mark.parametrize("spec", [
    {"name": "mlp", "kwargs": {"width": 16}},
    {"name": "mlp", "kwargs": {"width": 16, "depth": 2, "bn": True}},
    {"name": "cnn", "kwargs": {"widths": [8, 16]}},
    pytest.param({"name": "resnet", "kwargs": {"depth": 20, "width": 0.25}}, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("bn_batches", [None, 1])
def test_fast_paths_equal_reference(digits, spec, bn_batches):
    m = _with_bn_stats(build_model(spec, (1, 8, 8), 10), digits.train.x, 1)
    sa, sb = m.state_dict(), _with_bn_stats(build_model(spec, (1, 8, 8), 10), digits.train.x, 2).state_dict()
    ts = [0.0, 0.1, 0.35, 0.5, 0.9, 1.0]
    ref = curve(m, sa, sb, digits, ts, BarrierSettings(method='loop', batch_size=500, bn_batches=bn_batches))
    for method in ("vmap", "fused", "auto"):
        fast = curve(m, sa, sb, digits, ts, BarrierSettings(method=method, batch_size=500, bn_batches=bn_batches, max_models=4))
        assert max_diff(fast, ref) < 1e-4, method


# ---- the paper's protocol, implemented independently --------------------------------------------


def _independent_protocol(sa, sb, data):
    """Weight matching for a one-hidden-layer MLP is one assignment problem over the hidden units
    (Ainsworth et al.); then an 11-point path evaluated in float64 numpy, barriers as in docs/method.md."""
    A = {k: v.double().numpy() for k, v in sa.items()}
    B = {k: v.double().numpy() for k, v in sb.items()}
    sim = A["1.weight"] @ B["1.weight"].T + np.outer(A["1.bias"], B["1.bias"]) + A["3.weight"].T @ B["3.weight"]
    _, col = linear_sum_assignment(sim, maximize=True)
    B = {"1.weight": B["1.weight"][col], "1.bias": B["1.bias"][col], "3.weight": B["3.weight"][:, col],
         "3.bias": B["3.bias"]}
    ts = np.linspace(0, 1, 11)
    out = {}
    for split in ("train", "test"):
        s = data.split(split)
        x, y = s.x.reshape(len(s), -1).double().numpy(), s.y.numpy()
        losses, accs = [], []
        for t in ts:
            p = {k: (1 - t) * A[k] + t * B[k] for k in A}
            z = np.maximum(x @ p["1.weight"].T + p["1.bias"], 0) @ p["3.weight"].T + p["3.bias"]
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            losses.append(float(np.mean(lse - z[np.arange(len(y)), y])))
            accs.append(float(np.mean(z.argmax(1) == y)))
        L, Acc = np.array(losses), np.array(accs)
        chord = (1 - ts) * L[0] + ts * L[-1]
        achord = (1 - ts) * Acc[0] + ts * Acc[-1]
        out[split] = {"loss": losses, "acc": accs, "barrier": max(0.0, float((L - chord)[1:-1].max())),
                      "acc_barrier": max(0.0, float((achord - Acc)[1:-1].max()))}
    return out


def test_agrees_with_independent_protocol(mlp_pair, digits):
    model, sa, sb = mlp_pair
    rec = measure(model, sa, sb, digits, BarrierSettings(points=11, align=True))
    ind = _independent_protocol(sa, sb, digits)
    for split in ("train", "test"):
        assert np.allclose(rec[split]["loss"], ind[split]["loss"], atol=1e-3)
        assert np.allclose(rec[split]["acc"], ind[split]["acc"], atol=1e-3)
        assert rec["barrier"][f"{split}_loss"] == pytest.approx(ind[split]["barrier"], abs=1e-3)
        assert rec["barrier"][f"{split}_acc"] == pytest.approx(ind[split]["acc_barrier"], abs=1e-3)
    assert rec["barrier"]["train_loss"] > 0  # a real pair has a barrier; the comparison is not vacuous


def test_refinement_reports_both(mlp_pair, digits):
    model, sa, sb = mlp_pair
    rec = measure(model, sa, sb, digits, BarrierSettings(points=6, align=False, refine=3))
    r = rec["barrier_refined"]
    t_worst = rec["barrier"]["train_loss_t"]
    assert any(abs(t - t_worst) <= 0.2 + 1e-12 and t not in rec["t"] for t in r["t"])
    assert r["train_loss"] >= rec["barrier"]["train_loss"] - 1e-12
    # a refined point's value is the value of the curve there
    again = curve(model, sa, sb, digits, [0.0, r["t"][0], 1.0], BarrierSettings(method='loop'))
    assert again["train"]["loss"][1] == pytest.approx(r["train"]["loss"][0], abs=1e-5)


def test_bad_inputs(mlp_pair, digits):
    model, sa, sb = mlp_pair
    with pytest.raises(UserError):
        curve(model, sa, sb, digits, [0.0, 1.5])
    with pytest.raises(UserError):
        curve(model, sa, sb, digits, [0.0, 1.0], BarrierSettings(bn_batches=0))
    with pytest.raises(UserError):
        grid(1)


def test_plot_is_a_png(mlp_pair, digits, tmp_path):
    model, sa, sb = mlp_pair
    rec = measure(model, sa, sb, digits, BarrierSettings(points=5, align=False))
    png = plot(rec, tmp_path / "p.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").read_bytes() == png


# ---- CLI end to end -----------------------------------------------------------------------------


def _cli(capsys, monkeypatch, *args):
    """Run `stardomain ...` in process through cli.main (the console entry point) -> (exit code, stderr)."""
    from stardomain import cli

    monkeypatch.setattr(sys, "argv", ["stardomain", *map(str, args)])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    from stardomain.files import train_to_file

    base = {"data": {"name": "digits"}, "train": {"epochs": 1, "batch_size": 64}}
    cfg = Config.model_validate({**base, "model": {"name": "mlp", "kwargs": {"width": 16}}})
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    train_to_file(cfg, 0, a, progress=False)
    train_to_file(cfg, 1, b, progress=False)
    train_to_file(Config.model_validate({**base, "model": {"name": "mlp", "kwargs": {"width": 8}}}), 0, c,
                  progress=False)
    out, png = tmp_path / "ab.json", tmp_path / "ab.png"
    code, err = _cli(capsys, monkeypatch, "barrier", a, b, "--points", 6, "--json-out", out, "--plot", png)
    assert code == 0, err
    rec = json.loads(out.read_text())
    assert rec["t"] == grid(6) and rec["alignment"]["aligned"] is True
    assert set(rec["barrier"]) >= {"train_loss", "test_loss", "train_acc", "test_acc"}
    assert all(0 <= v <= 1 for s in ("train", "test") for v in rec[s]["acc"])
    from stardomain.checkpoint import read_model_file

    assert rec["sha256"]["a"] == read_model_file(a)[1]["sha256"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the same numbers as the library
    model = build_model({"name": "mlp", "kwargs": {"width": 16}}, (1, 8, 8), 10)
    lib = measure(model, read_model_file(a)[0], read_model_file(b)[0], get_dataset({"name": "digits"}), BarrierSettings(points=6, align=True))
    assert rec["barrier"]["train_loss"] == float(f"{lib['barrier']['train_loss']:.6g}")  # --json-out: 6 digits

    code, err = _cli(capsys, monkeypatch, "barrier", a, c, "--json-out", tmp_path / "ac.json")
    assert code == 2
    assert err.strip().count("\n") == 0 and "different architectures" in err
    assert not (tmp_path / "ac.json").exists()
