"""Trust no file field: metadata that reaches an allocation or a getattr is checked by the schema, weights
are checked for dtype, finiteness and fit when read, and any failure in loading is one line (exit 2).
Also: divergence stops a run like NaN does, and architectures compare with their defaults filled in.
"""

from __future__ import annotations

import json
import os

import clitools
import pytest
import torch
from safetensors.torch import save_file

import stardomain.checkpoint as ck
from stardomain.config import Config
from stardomain.errors import UserError

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny digits models (MLP width 8, one epoch)."""
    from stardomain.files import train_to_file

    d = tmp_path_factory.mktemp("files")
    paths = [d / f"d{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        train_to_file(Config.model_validate(TINY), i, p, progress=False)
    return paths


def forge(src, dst, weights=None, meta_edit=None):
    """A copy of a model file with its weights and/or metadata changed and every digest recomputed, as an
    attacker (or a careless script) who knows the format would."""
    sd, meta = ck.read_model_file(src)
    sd = weights(dict(sd)) if weights else sd
    if meta_edit:
        meta_edit(meta)
    meta["sha256"] = ck.weights_sha256(sd)
    meta["digest"] = ck.meta_digest(meta)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dst), metadata={"stardomain": json.dumps(meta)})
    return dst


def cli(monkeypatch, capsys, *args):
    return clitools.run_cli(monkeypatch, capsys, *args)


def one_line(code, err, *words):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "internal error" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def _nan(sd):
    k = next(iter(sd))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")
    return sd


def _inf(sd):
    k = list(sd)[-1]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("-inf")
    return sd


def _flatten_a_matrix(sd):
    """One weight matrix flattened (a file's tensor order is not fixed: pick by name, not by position)."""
    k = min(k for k, v in sd.items() if v.dim() >= 2)
    return {**sd, k: sd[k].reshape(-1)}


WEIGHTS = {
    "nan": (_nan, ["NaN or infinite"]),
    "inf": (_inf, ["NaN or infinite"]),
    "float64": (lambda sd: {k: v.double() for k, v in sd.items()}, ["float64", "float32"]),
    "extra": (lambda sd: {**sd, "bogus": torch.ones(3)}, ["unexpected 'bogus'"]),
    "missing": (lambda sd: dict(list(sd.items())[1:]), ["missing"]),
    "reshaped": (_flatten_a_matrix, ["other shape"]),
    "float16": (lambda sd: {k: v.half() for k, v in sd.items()}, ["other dtype"]),
    "float8": (lambda sd: {**sd, next(iter(sd)): torch.zeros_like(next(iter(sd.values())), dtype=torch.float8_e4m3fn)},
            ["float8"]),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_hostile_weights_are_one_line_in_every_command(pair, tmp_path, monkeypatch, capsys, case):
    edit, words = WEIGHTS[case]
    bad = forge(pair[1], tmp_path / f"{case}.safetensors", weights=edit)
    for args in (["barrier", pair[0], bad, "--points", 3], ["align", pair[0], bad, "--out", tmp_path / "o.safetensors"],
                 ["spec", bad], ["eval", bad],
                 ["bma", "--star", pair[0], "--sources", bad, "--k", 2, "--seeds", 1, "--no-ood"]):
        code, _, err = cli(monkeypatch, capsys, *args)
        one_line(code, err, *words)


@pytest.mark.parametrize("example,words", [
    ({"x": {"shape": [100000, 100000, 100], "dtype": "float32"}}, ["1,048,576"]),
    ({"x": {"shape": [4], "dtype": "load"}}, ["dtype", "load"]),
    ({"x": {"shape": [4], "dtype": "__class__"}}, ["dtype"]),
    ({"x": {"shape": [0], "dtype": "float32"}}, ["shape"]),
    ({"x": {"shape": [4], "dtype": "int64", "low": 5, "high": 5}}, ["high"]),
    ({"x": {"shape": [4], "dtype": "int64", "high": 10**30}}, ["high"]),
    ({"x": {"shape": [1] * 20}}, ["shape"]),
    ({"x": {"shape": [4], "extra": 1}}, ["extra"]),
    ({}, ["example_input"]),
])
def test_example_input_is_schema_checked_before_any_allocation(pair, tmp_path, monkeypatch, capsys, example, words):
    bad = forge(pair[1], tmp_path / "ex.safetensors", meta_edit=lambda m: m.__setitem__("example_input", example))
    for args in (["spec", bad], ["align", bad, bad, "--out", tmp_path / "o.safetensors"], ["info", bad],
                 ["barrier", bad, bad, "--points", 3]):
        code, _, err = cli(monkeypatch, capsys, *args)
        one_line(code, err, "malformed", *words)


def test_import_refuses_a_hostile_example_and_factory_before_reading_weights(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "x.safetensors"
    for extra, words in ((["--model-factory", "relfac"], ["--model-factory", "package.module:function"]),
                         (["--model-factory", "a.b:c", "--example", '{"x": {"shape": [4], "dtype": "load"}}'],
                          ["--example", "dtype"]),
                         (["--model-factory", "a.b:c", "--data", '{"name": "digits", "nonsense": 1}'],
                          ["--data", "nonsense"])):
        args = ["import", pair[0], "--out", out, *extra]
        if "--data" not in extra:
            args += ["--data", "digits"]
        code, _, err = cli(monkeypatch, capsys, *args)
        one_line(code, err, *words)
        assert not out.exists()


def test_import_of_a_folder_with_a_symlink_loop_or_fifo(tmp_path, monkeypatch, capsys):
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "a.safetensors").symlink_to(loop / "b.safetensors")
    (loop / "b.safetensors").symlink_to(loop / "a.safetensors")
    code, _, err = cli(monkeypatch, capsys, "import", loop, "--model-factory", "a.b:c", "--data", "digits",
                       "--out", tmp_path / "x.safetensors")
    one_line(code, err, "loop of symbolic links")
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    code, _, err = cli(monkeypatch, capsys, "import", fifo, "--model-factory", "a.b:c", "--data", "digits",
                       "--out", tmp_path / "x.safetensors")
    one_line(code, err, "not a regular file")


def test_a_fifo_where_a_file_is_expected_is_not_a_regular_file(pair, tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["info", fifo], ["eval", fifo], ["barrier", pair[0], fifo], ["config", fifo],
                 ["train", "--config", fifo, "--out", tmp_path / "m.safetensors"]):
        code, _, err = cli(monkeypatch, capsys, *args)
        one_line(code, err, "not a regular file")


def test_info_says_a_factory_needs_allow_factory(pair, tmp_path, monkeypatch, capsys):
    spec = "evil.mod:make"
    bad = forge(pair[1], tmp_path / "fac.safetensors",
                meta_edit=lambda m: m.__setitem__("model", {"name": None, "factory": spec, "kwargs": {}}))
    code, out, err = cli(monkeypatch, capsys, "info", bad)
    assert code == 0, err
    assert f"--allow-factory '{spec}'" in out and "imports nothing" in out


def test_default_kwargs_spelled_out_are_the_same_architecture(pair, tmp_path, monkeypatch, capsys):
    """{width: 8, depth: 1} (depth's default spelled out) is the architecture {width: 8}."""
    from stardomain.models import resolved

    spelled = forge(pair[1], tmp_path / "spelled.safetensors",
                    meta_edit=lambda m: m["model"]["kwargs"].update({"depth": 1, "bn": False}))
    code, _, err = cli(monkeypatch, capsys, "barrier", pair[0], spelled, "--points", 3, "--no-align")
    assert code == 0, err
    other = forge(pair[1], tmp_path / "deeper.safetensors", meta_edit=lambda m: m["model"]["kwargs"].update({"depth": 2}))
    code, _, err = cli(monkeypatch, capsys, "barrier", pair[0], other, "--points", 3)
    one_line(code, err, "different architectures")
    assert resolved({"name": "mlp", "factory": None, "kwargs": {}}) == \
        resolved({"name": "mlp", "factory": None, "kwargs": {"width": 16, "depth": 1}})
    # a user factory's code is never imported to read its defaults: compared as written
    fac = {"name": None, "factory": "evil.mod:make", "kwargs": {}}
    assert resolved(fac) == fac


# ---------------------------------------------------------------- divergence

def test_divergence_rule():
    from stardomain.training import divergence

    assert divergence(2.0, 2.3, 1000.0) is None
    assert divergence(float("nan"), 2.3, 1000.0) == ""
    assert "1000 times" in divergence(2301.0, 2.3, 1000.0)
    assert divergence(900.0, 0.01, 1000.0) is None  # a start near zero: bounded by 1000 x 1, not 1000 x 0.01
    assert divergence(1e16, 2.3, None) is None  # the guard off: only NaN/inf stop a run


def test_a_training_loss_that_explodes_stops_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.safetensors"
    code, _, err = cli(monkeypatch, capsys, "train", "--out", out, "--set", "data.name=digits",
                       "--set", "model.kwargs.width=8", "--set", "train.epochs=3", "--set", "train.optimizer.lr=50",
                       "--set", "train.optimizer.momentum=0.99", "--set", "train.divergence_factor=50")
    one_line(code, err, "diverged")
    assert not out.exists()


def test_a_starlight_loss_that_explodes_stops_the_run(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "star.safetensors"
    code, _, err = cli(monkeypatch, capsys, "star", "--sources", *pair, "--out", out, "--set", "data.name=digits",
                       "--set", "model.kwargs.width=8", "--set", "train.epochs=2", "--set", "train.optimizer.lr=50",
                       "--set", "train.optimizer.momentum=0.99", "--set", "train.divergence_factor=20")
    one_line(code, err, "Starlight diverged")
    assert not out.exists()


def test_the_divergence_guard_does_not_enter_keys_or_digests():
    from stardomain.config import validate
    from stardomain.study import build_plan
    from stardomain.training import config_digest

    a = validate(Config, TINY)
    b = validate(Config, {**TINY, "train": {**TINY["train"], "divergence_factor": 5.0}})
    assert config_digest(a) == config_digest(b)
    assert [t.key for t in build_plan(a).tasks] == [t.key for t in build_plan(b).tasks]
    assert ck.model_job("train", {"config": a.model_dump(mode="json")}) == \
        ck.model_job("train", {"config": b.model_dump(mode="json")})


def test_readme_says_what_the_digest_protects():
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "unkeyed sha256" in text and "--allow-factory" in text
    assert "editing either is refused" not in text
