import json
import subprocess
import sys

import pytest

DIGITS = ["--set", "data.name=digits", "--set", "train.epochs=3", "--set", "train.batch_size=64"]


def run(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "stardomain.cli", *map(str, args)], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    a, b = d / "a.safetensors", d / "b.safetensors"
    run("train", "--seed", 0, "--out", a, *DIGITS)
    run("train", "--seed", 0, "--out", b, *DIGITS)
    return d, a, b


def test_train_info_eval_end_to_end(trained):
    d, a, b = trained
    info = run("info", a).stdout
    for word in ("mlp", "digits", "seed", "sha256", "test"):
        assert word in info
    meta = json.loads(run("info", a, "--json").stdout)
    assert meta["sha256"] == json.loads(run("info", b, "--json").stdout)["sha256"]  # same seed, same bits
    res = json.loads(run("eval", a, "--json").stdout)
    assert set(res) == {"train", "test"}
    for split in res.values():
        assert set(split) == {"loss", "acc"} and 0 <= split["acc"] <= 1
    assert res["test"]["acc"] == pytest.approx(meta["metrics"]["test"]["acc"])
    assert "acc" in run("eval", a).stdout


def test_bad_inputs_exit_2_with_one_line(trained, tmp_path):
    d, a, _ = trained
    pt = tmp_path / "m.pt"
    import torch

    torch.save({"w": torch.ones(1)}, pt)
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(a.read_bytes()[:200])
    cases = [("eval", pt), ("info", trunc), ("eval", tmp_path / "missing.safetensors"),
             ("train", "--out", tmp_path / "x.safetensors", "--set", "train.optimizer.name=sgdd")]
    for args in cases:
        r = run(*args, ok=False)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert "Traceback" not in r.stderr


def test_help_teaches():
    out = run("train", "--help").stdout
    assert "--seed" in out and "Example" in out
