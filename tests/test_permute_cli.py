"""`stardomain align` / `stardomain spec` end to end on digits, checked against the library."""

import json
import sys

import pytest
import torch

from stardomain.checkpoint import load_model, read_model_file
from stardomain.permute import apply_permutation, distance, spec_from_model

DIGITS = ["--set", "data.name=digits", "--set", "train.epochs=2", "--set", "train.batch_size=64"]


class _R:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def run(*args, ok=True):
    """The real entry point (`stardomain.cli.main`: exit codes, one-line errors), run in-process to
    spare a Python + torch start per command."""
    import contextlib
    import io

    from stardomain.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["stardomain", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    r = _R(code, out.getvalue(), err.getvalue())
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    a, b, c = d / "a.safetensors", d / "b.safetensors", d / "c.safetensors"
    run("train", "--seed", 0, "--out", a, *DIGITS, "--set", "model.kwargs.depth=2")
    run("train", "--seed", 1, "--out", b, *DIGITS, "--set", "model.kwargs.depth=2")
    run("train", "--seed", 2, "--out", c, *DIGITS, "--set", "model.kwargs.width=8")
    return d, a, b, c


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_cli_end_to_end(pair, method):
    d, a, b, _ = pair
    out, js = d / f"b_{method}.safetensors", d / f"{method}.json"
    line = run("align", a, b, "--out", out, "--method", method, "--json-out", js).stdout
    assert "distance" in line and "equivalence" in line
    rec = json.loads(js.read_text())
    sd_a, meta_a = read_model_file(a)
    sd_b, meta_b = read_model_file(b)
    sd_o, meta_o = read_model_file(out)
    assert rec["method"] == method and rec["reference_sha256"] == meta_a["sha256"]
    model, _ = load_model(b)
    params = [n for n, _ in model.named_parameters()]
    assert rec["distance_over"] == "parameters"
    assert rec["distance_before"] == pytest.approx(distance(sd_a, sd_b, params))
    assert rec["distance_after"] == pytest.approx(distance(sd_a, sd_o, params))
    if method == "weight":
        assert rec["distance_after"] <= rec["distance_before"]
    assert rec["equivalence_error"] < 1e-5
    # B's metadata kept, provenance added; the stored permutation reproduces the file
    assert meta_o["seed"] == meta_b["seed"] and meta_o["metrics"] == meta_b["metrics"]
    assert meta_o["alignment"]["source_sha256"] == meta_b["sha256"]
    spec = spec_from_model(model, torch.zeros(2, 1, 8, 8))
    perm = {k: torch.tensor(v) for k, v in meta_o["alignment"]["perm"].items()}
    again = apply_permutation(spec, sd_b, perm)
    assert all(torch.equal(again[k], sd_o[k]) for k in sd_o)
    # and the aligned model really computes B's function on data
    from stardomain.data import get_dataset

    x = get_dataset({"name": "digits"}).test.x[:200]
    mo, _ = load_model(out)
    with torch.no_grad():
        assert torch.allclose(mo(x), model(x), rtol=1e-5, atol=1e-5)


def test_align_init_option(pair):
    """--init identity runs the paper's descent (recorded), equal to the library call; a wrong start is
    refused with one line and exit code 2, writing nothing."""
    from stardomain.permute import weight_matching

    d, a, b, _ = pair
    out, js = d / "b_identity.safetensors", d / "identity.json"
    run("align", a, b, "--out", out, "--init", "identity", "--json-out", js)
    rec = json.loads(js.read_text())
    assert rec["init"] == "identity"
    model, _ = load_model(b)
    spec = spec_from_model(model, torch.zeros(2, 1, 8, 8))
    perm, _ = weight_matching(spec, read_model_file(a)[0], read_model_file(b)[0], init="identity")
    stored = read_model_file(out)[1]["alignment"]["perm"]
    assert all(stored[k] == perm[k].tolist() for k in perm)
    r = run("align", a, b, "--out", d / "y.safetensors", "--init", "bogus", ok=False)
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr
    assert not (d / "y.safetensors").exists()


def test_align_refuses_incompatible_models(pair):
    d, a, _, c = pair
    r = run("align", a, c, "--out", d / "x.safetensors", ok=False)
    assert r.returncode == 2 and "different architectures" in r.stderr and "Traceback" not in r.stderr
    assert not (d / "x.safetensors").exists()
    r = run("align", a, d / "missing.safetensors", "--out", d / "x.safetensors", ok=False)
    assert r.returncode == 2


def test_spec_cli(pair):
    d, a, _, _ = pair
    text = run("spec", a).stdout
    assert "2 permutation groups" in text and "size 16" in text and "model output" in text
    js = json.loads(run("spec", a, "--json").stdout)
    assert sorted(g["size"] for g in js["groups"].values()) == [16, 16]
    # two hidden layers of 16 units, 64 inputs, 10 classes: only the output bias is unpermuted
    total = 64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert f"{100 * (1 - 10 / total):.1f}%" in text
