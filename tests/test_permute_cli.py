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


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_learned_methods_through_align_and_barrier(pair, method):
    """--method ste|sinkhorn with --learned settings: the file's permutation keeps B's function and its
    record names the settings; the barrier record carries them too, and its aligned B is align's output."""
    d, a, b, _ = pair
    out, js = d / f"b_{method}.safetensors", d / f"{method}.json"
    run("align", a, b, "--out", out, "--method", method, "--learned", "steps=4", "--learned", "select_every=2",
        "--json-out", js)
    rec = json.loads(js.read_text())
    assert rec["method"] == method and rec["settings"]["steps"] == 4 and rec["settings"]["method"] == method
    assert rec["equivalence_error"] < 1e-5
    meta_o = read_model_file(out)[1]
    assert meta_o["alignment"]["settings"]["select_every"] == 2
    line = run("barrier", a, b, "--method", method, "--learned", "steps=4", "--learned", "select_every=2",
               "--json").stdout
    br = json.loads(line)
    assert br["alignment"]["method"] == method and br["alignment"]["settings"]["steps"] == 4
    assert br["sha256"]["b_interpolated"] == meta_o["sha256"]  # the same permutation as `align` wrote
    r = run("align", a, b, "--out", d / "z.safetensors", "--learned", "steps=4", ok=False)
    assert r.returncode == 2 and "--learned applies to --method" in r.stderr
    r = run("barrier", a, b, "--method", method, "--learned", "steps=-1", ok=False)
    assert r.returncode == 2 and "steps" in r.stderr and "Traceback" not in r.stderr


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
    # two hidden layers of 16 units, 64 inputs, 10 classes: every axis carrying units is permuted
    assert "100.0% of the parameter axes that carry hidden units permuted" in text


def test_align_says_when_nothing_can_be_permuted_and_strict_refuses(tmp_path):
    """A model neither torch.fx nor torch.export can capture: a warning on stderr and in the record, B
    written unchanged; with --strict exit code 2, one line, nothing written."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    dd = ["--set", "model.factory=permute_families:data_dependent"]
    run("train", "--seed", 0, "--out", a, *DIGITS, *dd)
    run("train", "--seed", 1, "--out", b, *DIGITS, *dd)
    out, js = tmp_path / "o.safetensors", tmp_path / "o.json"
    allow = ["--allow-factory", "permute_families:data_dependent"]  # a file's factory runs only when allowed
    r = run("align", a, b, "--out", out, "--json-out", js, *allow)
    assert "warning: the model could not be captured" in r.stderr and "Traceback" not in r.stderr
    rec = json.loads(js.read_text())
    assert rec["capture"] == "failed" and rec["warnings"] and rec["permutable_fraction"] == 0.0
    sd_b, sd_o = read_model_file(b)[0], read_model_file(out)[0]
    assert all(torch.equal(sd_b[k], sd_o[k]) for k in sd_b)
    r = run("align", a, b, "--out", tmp_path / "s.safetensors", "--strict", *allow, ok=False)
    assert r.returncode == 2 and "--strict" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.safetensors").exists()
    assert "could not be captured" in run("spec", a, *allow).stdout


def test_import_a_plain_state_dict_then_spec_align_and_barrier(tmp_path):
    """Third-party weights of a user architecture (a ViT written timm-style, fused qkv reshaped to
    (B, N, 3, H, d)): imported, they are model files like any other."""
    from safetensors.torch import save_file

    from permute_families import vit_digits

    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        raw = tmp_path / f"w{seed}.safetensors"
        save_file({k: v.clone() for k, v in vit_digits((1, 8, 8), 10).state_dict().items()}, str(raw))
        files.append(tmp_path / f"m{seed}.safetensors")
        run("import", raw, "--model-factory", "permute_families:vit_digits", "--data", "digits", "--out", files[-1])
    sd, meta = read_model_file(files[0])
    assert meta["role"] == "imported" and meta["seed"] is None and meta["data"]["name"] == "digits"
    allow = ["--allow-factory", "permute_families:vit_digits"]  # a file's factory runs only when allowed
    assert "100.0% of the parameter axes" in run("spec", files[0], *allow).stdout
    js = tmp_path / "a.json"
    run("align", *files, "--out", tmp_path / "al.safetensors", "--json-out", js, "--strict", *allow)
    rec = json.loads(js.read_text())
    assert rec["permutable_fraction"] == 1.0 and rec["distance_after"] < rec["distance_before"]
    run("barrier", *files, "--points", "3", "--json-out", tmp_path / "b.json", *allow)
    assert "barrier" in json.loads((tmp_path / "b.json").read_text())
    r = run("import", raw, "--model-factory", "permute_families:vit_digits", "--kwargs", "[1]", "--data", "digits",
            "--out", tmp_path / "x.safetensors", ok=False)
    assert r.returncode == 2 and "--kwargs must be a JSON object" in r.stderr
