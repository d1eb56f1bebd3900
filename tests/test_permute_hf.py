"""Tiny random Hugging Face models (transformers is an optional test extra: skipped without it) align
from Python and, after `stardomain import`, from the command line: every hidden axis permutable, the
function preserved, a permuted copy recovered."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

import permute_hf as H  # noqa: E402
from test_permute_cli import run  # noqa: E402

from stardomain.checkpoint import read_model_file  # noqa: E402
from stardomain.permute import (activation_error, align, apply_permutation, distance, inverse,  # noqa: E402
                                random_permutation, spec_for, spec_from_model, weight_matching)
from stardomain.permute.inputs import flat_tensors  # noqa: E402

NAMES = ["bert", "gpt2", "vit", "llama"]


def _model(name, seed):
    torch.manual_seed(seed)
    return H.MODELS[name]().eval()


def _out64(model, sd, x):
    m = copy.deepcopy(model).double().eval()
    m.load_state_dict({k: v.double() if torch.is_floating_point(v) else v for k, v in sd.items()})
    with torch.no_grad():
        out = m(**x) if isinstance(x, dict) else m(x.double())
    return torch.cat([o.reshape(-1) for o in flat_tensors(out) if torch.is_floating_point(o)])


@pytest.mark.parametrize("name", NAMES)
def test_hugging_face_models_align_from_python(name):
    a, b = _model(name, 0), _model(name, 1)
    x = H.example(name)
    spec = spec_from_model(a, x)
    assert spec.capture == "export" and spec.permutable_fraction() == 1.0
    sd_a, sd_b = a.state_dict(), b.state_dict()
    out, info = align(a, sd_a, sd_b, example_input=x)
    assert info["permutable_fraction"] == 1.0 and not info["warnings"]
    assert info["distance_after"] < info["distance_before"]
    ref = _out64(b, sd_b, x)
    # LlamaRMSNorm computes in float32 whatever the model's dtype: rounding of ~1e-7 remains there
    assert (_out64(b, out, x) - ref).abs().max() <= (1e-6 if name == "llama" else 1e-10) * ref.abs().max()
    p = random_permutation(spec, torch.Generator().manual_seed(3))
    sp = apply_permutation(spec, sd_a, p)
    err, n, tol = activation_error(a, spec, sd_a, sp, p, x)  # float64; Llama's RMSNorm casts to float32
    assert n > 0 and err < tol == (1e-4 if name == "llama" else 1e-9)
    q, _ = weight_matching(spec, sd_a, sp)
    assert distance(sd_a, apply_permutation(spec, sp, q)) == 0.0
    assert all(torch.equal(q[k], inverse(p)[k]) for k in spec.groups)


def test_hugging_face_llama_grouped_query_heads_keep_their_units_free():
    """LlamaForCausalLM (2 key/value heads of 4 units for 4 query heads, rotary): per layer, the key heads
    move whole with both query heads of each (rotary pins units inside a q/k head), and the value units
    inside a head move with the output-projection columns of both query heads sharing it."""
    spec = spec_from_model(_model("llama", 0), H.example("llama"))
    heads = [g for g in spec.groups.values() if g.heads]
    assert len(heads) == 4 and all((g.size, g.heads) == (8, 2) and g.couple for g in heads)
    reps = {(mm.tensor.split(".")[-2], mm.axis): (mm.rep, g.head_only) for g in heads for mm in g.members
            if mm.tensor.startswith("model.layers.0.")}
    assert reps == {("q_proj", 0): (2, True), ("k_proj", 0): (1, True), ("v_proj", 0): (1, False),
                    ("o_proj", 1): (2, False)}


EXAMPLES = {"gpt2": {"input_ids": {"shape": [7], "dtype": "int64", "high": 50}},
            "llama": {"input_ids": {"shape": [7], "dtype": "int64", "high": 50}},
            "bert": {"input_ids": {"shape": [7], "dtype": "int64", "high": 50},
                     "attention_mask": {"shape": [7], "dtype": "int64", "low": 1, "high": 2}}}


@pytest.mark.parametrize("name", NAMES)
def test_hugging_face_models_align_from_the_cli_after_import(tmp_path, name):
    files = []
    for seed in (0, 1):
        folder = tmp_path / f"{name}{seed}"
        if name in ("gpt2", "vit"):
            # a model folder: config.json + model.safetensors (transformers 5 writes ViT's layers under
            # other names than its modules have: mapped back by transformers' own conversion on import)
            _model(name, seed).save_pretrained(folder)
        else:  # a plain safetensors state dict
            from safetensors.torch import save_file

            folder = tmp_path / f"{name}{seed}.raw.safetensors"
            save_file({k: v.clone() for k, v in _model(name, seed).state_dict().items()}, str(folder))
        out = tmp_path / f"{name}{seed}.safetensors"
        ex = ["--example", json.dumps(EXAMPLES[name])] if name in EXAMPLES else []
        line = run("import", folder, "--model-factory", f"permute_hf:{name}", "--data", "digits", *ex,
                   "--out", out).stdout
        assert "wrote" in line
        files.append(out)
    sd0, meta0 = read_model_file(files[0])
    assert meta0["role"] == "imported" and meta0["model"]["factory"] == f"permute_hf:{name}"
    ref = _model(name, 0).state_dict()
    assert set(sd0) == set(ref) and all(torch.equal(sd0[k], ref[k]) for k in ref)
    allow = ["--allow-factory", f"permute_hf:{name}"]  # a file's factory runs only when allowed
    text = run("spec", files[0], *allow).stdout
    # (BertModel returns its hidden states: its residual stream is the model's output, listed as such,
    # and not counted among the axes that could carry a permutation)
    assert "torch.export" in text and "100.0% of the parameter axes" in text
    js = tmp_path / "rec.json"
    r = run("align", files[0], files[1], "--out", tmp_path / "aligned.safetensors", "--json-out", js, "--strict",
            *allow)
    assert "warning" not in r.stderr
    rec = json.loads(js.read_text())
    assert rec["capture"] == "export" and rec["equivalence_error"] < 1e-5
    assert rec["permutable_fraction"] == 1.0
    assert rec["distance_after"] < rec["distance_before"]


def test_import_refuses_pickles_and_misfits(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    r = run("import", folder, "--model-factory", "permute_hf:gpt2", "--data", "digits", "--out",
            tmp_path / "x.safetensors", ok=False)
    assert r.returncode == 2 and "never unpickles" in r.stderr and "Traceback" not in r.stderr
    r = run("import", folder / "pytorch_model.bin", "--model-factory", "permute_hf:gpt2", "--data", "digits",
            "--out", tmp_path / "x.safetensors", ok=False)
    assert r.returncode == 2 and "pickled" in r.stderr
    _model("gpt2", 0).save_pretrained(tmp_path / "g")
    r = run("import", tmp_path / "g", "--model-factory", "permute_hf:bert", "--data", "digits", "--out",
            tmp_path / "x.safetensors", ok=False)
    assert r.returncode == 2 and "do not fit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_two_berts_differing_only_in_config_each_align_exactly_in_one_process():
    """The stale-cache case: the attention implementation and return_dict live in the config object, not
    in any module's plain attributes; each model must get its own spec."""
    torch.manual_seed(0)
    a, b = H.bert(attn_implementation="eager", return_dict=True), H.bert(attn_implementation="sdpa", return_dict=False)
    b.load_state_dict(a.state_dict())
    x = H.example("bert")
    assert spec_for(a, x) is not spec_for(b, x) and spec_for(b, x) == spec_from_model(b, x)
    g = torch.Generator().manual_seed(1)
    for m in (a, b):
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v
              for k, v in m.state_dict().items()}
        spec = spec_for(m, x)
        sp = apply_permutation(spec, sd, random_permutation(spec, torch.Generator().manual_seed(2)))
        _, info = align(m, sd, sp, example_input=x)
        assert info["distance_after"] == 0.0 and info["equivalence_error"] < 1e-10
