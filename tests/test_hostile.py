"""Hostile inputs: every one ends in one line on stderr and exit code 2, or in the correct result.

Families: code named by a model file (never imported unless allowed), decoding, import, construction,
types and shapes of metadata, numerics of data, CLI numbers, I/O (permissions, folders, full disk), and
the fallback for bugs (one line naming a traceback file, exit 1). The CLI runs in process through
cli.main, as the console script does; a few cases run it as a real subprocess.
"""

import errno
import json
import os
import subprocess
import sys
import time

import clitools
import pytest
import torch
from safetensors.torch import save_file

import stardomain.checkpoint as ck
from stardomain.config import Config
from stardomain.errors import UserError

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64}}
TINY_SET = ["--set", "data.name=digits", "--set", "model.kwargs.width=8", "--set", "train.epochs=1",
            "--set", "train.batch_size=64"]


def run_cli(capsys, monkeypatch, *args, env=None):
    """cli.main in process -> (exit code, stdout, stderr)."""
    return clitools.run_cli(monkeypatch, capsys, *args, env=env)


def assert_one_line(code, err, *words, code_want=2):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == code_want, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One tiny trained model file (digits, MLP width 8, one epoch) shared by the module."""
    from stardomain.files import train_to_file

    d = tmp_path_factory.mktemp("hostile")
    path = d / "good.safetensors"
    meta = train_to_file(Config.model_validate(TINY), 0, path, progress=False)
    return path, meta


def rewrite(src, dst, edit, *, digest=True):
    """Copy a model file with its metadata edited by `edit(meta)`; `digest`: recompute it (as an attacker
    who knows the format can), else keep the old one."""
    sd, meta = ck.read_model_file(src)
    meta = json.loads(json.dumps(meta))
    edit(meta)
    if digest:
        meta["digest"] = ck.meta_digest(meta)
    save_file(sd, str(dst), metadata={"stardomain": json.dumps(meta)})
    return dst


def raw_meta_file(dst, text, tensors=None):
    save_file(tensors or {"w": torch.ones(2)}, str(dst), metadata={"stardomain": text})
    return dst


# ---------------------------------------------------------------- code named by a model file

EVIL = """
import pathlib
pathlib.Path({sentinel!r}).write_text("this ran")

def make(**kwargs):
    pathlib.Path({sentinel!r}).write_text("this ran")
"""


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module whose import creates a sentinel file, importable from sys.path; -> (module, sentinel)."""
    sentinel = tmp_path / "SENTINEL"
    name = f"evilmod_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(EVIL.format(sentinel=str(sentinel)))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, sentinel
    sys.modules.pop(name, None)


def _set_model_factory(spec, kwargs=None):
    def edit(meta):
        meta["model"] = {"name": None, "factory": spec, "kwargs": kwargs or {}}
    return edit


def _set_data_factory(spec):
    def edit(meta):
        meta["data"]["config"] = {**meta["data"]["config"], "name": None, "factory": spec}
    return edit


@pytest.mark.parametrize("command", ["eval", "spec", "align", "barrier", "bma"])
def test_tampered_factory_runs_nothing(good, evil, tmp_path, capsys, monkeypatch, command):
    name, sentinel = evil
    bad = rewrite(good[0], tmp_path / "bad.safetensors", _set_model_factory(f"{name}:make"))
    args = {"eval": ["eval", bad], "spec": ["spec", bad],
            "align": ["align", bad, bad, "--out", tmp_path / "o.safetensors"],
            "barrier": ["barrier", bad, bad, "--json-out", tmp_path / "b.json"],
            "bma": ["bma", "--star", bad, "--sources", bad, "--json-out", tmp_path / "m.json"]}[command]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    line = assert_one_line(code, err, "--allow-factory", "STARDOMAIN_ALLOW_FACTORIES", f"{name}:make")
    assert not sentinel.exists(), "the file's factory module was imported"
    assert name not in sys.modules
    assert line.startswith("error:")


def test_tampered_data_factory_and_os_system_run_nothing(good, evil, tmp_path, capsys, monkeypatch):
    name, sentinel = evil
    bad = rewrite(good[0], tmp_path / "d.safetensors", _set_data_factory(f"{name}:make"))
    code, _, err = run_cli(capsys, monkeypatch, "eval", bad)
    assert_one_line(code, err, "data factory", "--allow-factory")
    touched = tmp_path / "touched"
    bad = rewrite(good[0], tmp_path / "os.safetensors",
                  _set_model_factory("os:system", {"command": f"touch {touched}"}))
    code, _, err = run_cli(capsys, monkeypatch, "eval", bad)
    assert_one_line(code, err, "os:system")
    assert not sentinel.exists() and not touched.exists()


def test_tampered_file_in_a_study_folder_runs_nothing(good, evil, tmp_path):
    """study.execute (any executor runs tasks through it) allows only its own config's factories."""
    from stardomain.study import Task, execute

    name, sentinel = evil
    (tmp_path / "models").mkdir()
    rewrite(good[0], tmp_path / "models/a.safetensors", _set_model_factory(f"{name}:make"))
    task = Task("a" * 64, "pair", "a-a", {"a": "models/a.safetensors", "b": "models/a.safetensors",
                                          "a_label": "a", "b_label": "a", "seed": 0, "device": "cpu",
                                          "eval": {"points": 3, "align": False, "bn_batches": 1, "batch_size": 100},
                                          "allow": []})
    with pytest.raises(UserError, match="allow-factory"):
        execute(task, tmp_path)
    assert not sentinel.exists()


GOOD_FACTORY = """
from stardomain.models.zoo import mlp

def make(in_shape, num_classes, width=8):
    return mlp(in_shape, num_classes, width=width)
"""


def test_allowed_factory_is_used(good, tmp_path, capsys, monkeypatch):
    """A factory the user allows (flag or environment) builds the model; the numbers match the file's."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "goodmod_hostile.py").write_text(GOOD_FACTORY)
    sd, meta = ck.read_model_file(good[0])
    meta = {**meta, "model": {"name": None, "factory": "goodmod_hostile:make", "kwargs": {"width": 8}}}
    f = tmp_path / "user.safetensors"
    ck.save_model(f, sd, meta)
    code, _, err = run_cli(capsys, monkeypatch, "eval", f)
    assert_one_line(code, err, "--allow-factory 'goodmod_hostile:make'")
    code, out, err = run_cli(capsys, monkeypatch, "eval", f, "--json", "--allow-factory", "goodmod_hostile:make")
    assert code == 0, err
    assert json.loads(out)["test"]["acc"] == float(f"{good[1]['metrics']['test']['acc']:.6g}")  # --json: 6 digits
    code, out, err = run_cli(capsys, monkeypatch, "eval", f, "--json",
                             env={"STARDOMAIN_ALLOW_FACTORIES": "x:y, goodmod_hostile:make"})
    assert code == 0, err
    assert json.loads(out)["train"]["acc"] == float(f"{good[1]['metrics']['train']['acc']:.6g}")
    # the allowance ends with the call: the next one is refused again
    code, _, err = run_cli(capsys, monkeypatch, "eval", f)
    assert_one_line(code, err, "--allow-factory")


def test_subprocess_tampered_factory_is_refused(good, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    (tmp_path / "evil_sub.py").write_text(EVIL.format(sentinel=str(sentinel)))
    bad = rewrite(good[0], tmp_path / "bad.safetensors", _set_model_factory("evil_sub:make"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "stardomain.cli", "eval", str(bad)], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert_one_line(r.returncode, r.stderr, "--allow-factory")
    assert not sentinel.exists()


# ---------------------------------------------------------------- metadata: digest, schema, limits

def test_v2_metadata_edited_without_digest_is_refused(good, tmp_path, capsys, monkeypatch):
    def edit(meta):
        meta["seed"] = 12345
    bad = rewrite(good[0], tmp_path / "e.safetensors", edit, digest=False)
    code, _, err = run_cli(capsys, monkeypatch, "info", bad)
    assert_one_line(code, err, "digest")
    nodigest = rewrite(good[0], tmp_path / "n.safetensors", lambda m: m.pop("digest"), digest=False)
    code, _, err = run_cli(capsys, monkeypatch, "eval", nodigest)
    assert_one_line(code, err, "digest")


def test_version_1_files_open_and_say_what_is_not_covered(good, tmp_path, capsys, monkeypatch):
    def v1(meta):
        meta["format_version"] = 1
        meta.pop("digest")
    old = rewrite(good[0], tmp_path / "v1.safetensors", v1, digest=False)
    code, out, err = run_cli(capsys, monkeypatch, "info", old)
    assert code == 0, err
    assert "metadata is not" in out
    code, out, err = run_cli(capsys, monkeypatch, "eval", old, "--json")
    assert code == 0 and json.loads(out)["test"]["acc"] == pytest.approx(good[1]["metrics"]["test"]["acc"])
    newer = rewrite(good[0], tmp_path / "v3.safetensors", lambda m: m.update(format_version=3))
    code, _, err = run_cli(capsys, monkeypatch, "info", newer)
    assert_one_line(code, err, "newer", "upgrade")


def _edit(path_keys, value):
    def edit(meta):
        node = meta
        for k in path_keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path_keys[-1]]
        else:
            node[path_keys[-1]] = value
    return edit


@pytest.mark.parametrize("keys,value,word", [
    (["seed"], "zero", "seed"),
    (["seed"], KeyError, "seed"),
    (["model"], 5, "model"),
    (["model"], KeyError, "model"),
    (["model", "kwargs"], [1, 2], "kwargs"),
    (["model", "name"], None, "model"),
    (["model"], {"name": None, "factory": ":", "kwargs": {}}, "package.module:function"),
    (["data", "config"], {"name": None, "factory": "os.system"}, "package.module:function"),
    (["data", "num_classes"], "10", "num_classes"),
    (["data", "num_classes"], 0, "num_classes"),
    (["data", "input_shape"], [], "input_shape"),
    (["data", "input_shape"], [1, -8, 8], "input_shape"),
    (["data", "input_shape"], KeyError, "input_shape"),
    (["data", "config"], {"name": "digits", "bogus": 1}, "bogus"),
    (["data", "config", "split_seed"], 2**70, "split_seed"),
    (["metrics", "train", "loss"], "1.5", "loss"),
    (["metrics", "test"], [1], "test"),
    (["role"], {"x": 1}, "role"),
    (["sha256"], "abc", "sha256"),
    (["format_version"], "2", "format_version"),
    (["versions"], {"torch": 2}, "versions"),
])
def test_metadata_with_wrong_types_or_missing_keys(good, tmp_path, capsys, monkeypatch, keys, value, word):
    bad = rewrite(good[0], tmp_path / "t.safetensors", _edit(keys, value))
    for command in ("info", "eval"):
        code, _, err = run_cli(capsys, monkeypatch, command, bad)
        assert_one_line(code, err, word)


@pytest.mark.parametrize("text,word", [
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ('{"a": ' + "[" * 65 + "]" * 65 + "}", "nested"),
    (json.dumps({"pad": "x" * (5 * 2**20)}), "bytes"),
    ("[1, 2, 3]", "not a json object"),
    ("{not json", "not valid json"),
    ("", "not valid json"),
])
def test_metadata_too_deep_too_big_or_not_an_object(tmp_path, capsys, monkeypatch, text, word):
    bad = raw_meta_file(tmp_path / "deep.safetensors", text)
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, monkeypatch, "info", bad)
    assert_one_line(code, err, word)
    assert time.perf_counter() - t0 < 5


def test_deep_safetensors_header_is_refused(tmp_path, capsys, monkeypatch):
    header = b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    code, _, err = run_cli(capsys, monkeypatch, "eval", bad)
    assert_one_line(code, err, "nested")


def test_json_depth_counts_brackets_outside_strings_only():
    from stardomain.safety import json_depth

    assert json_depth('{"a": [1, {"b": "[[[[{{"}], "c": "\\"]]"}') == 3
    assert json_depth("[" * 100_000 + "]" * 100_000) == 100_000
    assert json_depth("3") == 0


# ---------------------------------------------------------------- configs: decoding, YAML bombs, types

def _cfg(tmp_path, data: bytes, name="c.yaml"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BOMB = b"""a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
model: {name: mlp, kwargs: {width: *i}}
"""


@pytest.mark.parametrize("data,words", [
    ("data: {name: digits}\n".encode("utf-16"), ["utf-16", "save it as utf-8"]),
    ("data: {name: digits}\n".encode("utf-16-le"), ["not utf-8"]),
    ("model: {name: mlp}\n# caf\xe9\n".encode("latin-1"), ["not utf-8", "save it as utf-8"]),
    (BOMB, ["expands"]),
    (b"model: " + b"[" * 100_000 + b"]" * 100_000, ["nested"]),
    (b"model: {name: mlp\n", ["not valid yaml"]),
    (b"- 1\n- 2\n", ["mapping"]),
    (b"model: {name: mlp, kwargs: {width: 0}}\n", ["width"]),
    (b"model: {name: mlp, kwargs: {width: -3}}\n", ["width"]),
    (b"model: {name: mlp, kwargs: {width: 1000000000000}}\n", ["width"]),
    (b"model: {name: mlp, kwargs: {width: '8'}}\n", ["width"]),
    (b"model: {name: mlp, kwargs: {width: 1048576, depth: 1000}}\n", ["parameters", "STARDOMAIN_MAX_PARAMS"]),
    (b"model: {name: mlp, kwargs: {depth: 0}}\n", ["depth"]),
    (b"model: {name: mlp, kwargs: {bn: 3}}\n", ["bn"]),
    (b"model: {name: mlp, kwargs: {nope: 3}}\n", ["nope"]),
    (b"model: {name: cnn, kwargs: {widths: []}}\n", ["widths"]),
    (b"model: {name: cnn, kwargs: {norm: zz}}\n", ["norm"]),
    (b"model: {name: resnet, kwargs: {depth: 2}}\n", ["depth"]),
    (b"model: {name: vit, kwargs: {heads: 0}}\n", ["heads"]),
    (b"model: {name: vit, kwargs: {patch: 3}}\n", ["patch"]),
    (b"model: {name: wrn, kwargs: {width_factor: 0}}\n", ["width_factor"]),
    (b"model: {name: densenet, kwargs: {growth: -1}}\n", ["growth"]),
    (b"model: {name: nosuch}\n", ["unknown model"]),
    (b"model: {factory: ':'}\n", ["package.module:function"]),
    (b"model: {factory: 'os:'}\n", ["package.module:function"]),
    (b"model: {factory: ':system'}\n", ["package.module:function"]),
    (b"model: {factory: 'no_such_module_xyz:f'}\n", ["cannot import"]),
    (b"model: {factory: 'math:pi'}\n", ["not a function"]),
    (b"model: {factory: 'json:nope'}\n", ["no attribute"]),
    (b"model: {factory: 'builtins:dict'}\n", ["not a torch.nn.module"]),
    (b"data: {name: digits, split_seed: -1}\n", ["split_seed"]),
    (b"data: {factory: 'builtins:len'}\n", ["data factory builtins:len raised TypeError"]),
    (b"data: {factory: 'builtins:dict'}\n", ["dict with 'train' and 'test'"]),
    (b"train: {epochs: 0}\n", ["epochs"]),
    (b"study: {seed: 1180591620717411303424}\n", ["seed"]),
    (b"study: {device: banana}\n", ["device"]),
    (b"train: {optimizer: {lr: " + b"[" * 50 + b"]" * 50 + b"}}\n", ["lr"]),
])
def test_hostile_configs(tmp_path, capsys, monkeypatch, data, words):
    import stardomain.training as training

    def no_training(*_a, **_k):
        raise AssertionError("training started before the config was refused")

    monkeypatch.setattr(training, "fit", no_training)  # refused before any work, however busy the machine
    cfg = _cfg(tmp_path, data)
    extra = [] if b"data:" in data else ["--set", "data.name=digits"]
    code, _, err = run_cli(capsys, monkeypatch, "train", "--config", cfg, "--out", tmp_path / "m.safetensors", *extra)
    assert_one_line(code, err, *words)
    assert not (tmp_path / "m.safetensors").exists()


def test_format_validation_error_never_walks_a_huge_value():
    from pydantic import ValidationError

    from stardomain.config import format_validation_error

    leaf = ["x"] * 10
    for _ in range(8):
        leaf = [leaf] * 10  # 10^9 leaves by reference
    try:
        Config.model_validate({"train": {"epochs": leaf}})
    except ValidationError as e:
        t0 = time.perf_counter()
        msg = format_validation_error(e)
        assert time.perf_counter() - t0 < 1 and len(msg) < 400 and "train.epochs" in msg


def test_utf8_bom_config_and_the_largest_seed_train(tmp_path, capsys, monkeypatch):
    """Accepted inputs give the right result: a BOM is not part of the YAML; seed 2**63-1 is a seed."""
    import yaml

    cfg = _cfg(tmp_path, b"\xef\xbb\xbf" + yaml.safe_dump(TINY).encode())
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, monkeypatch, "train", "--config", cfg, "--seed", 2**63 - 1, "--out", out)
    assert code == 0, err
    meta = ck.read_model_file(out)[1]
    assert meta["seed"] == 2**63 - 1 and meta["model"]["kwargs"] == {"width": 8}


# ---------------------------------------------------------------- data factories (the user's own code)

DATA = """
import torch

def make(kind="ok", split_seed=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=g)
    y = torch.arange(40) % 3
    tr, te = (x, y), (x[:10], y[:10])
    if kind == "nan":
        x = x.clone(); x[3, 0, 0, 0] = float("nan"); tr = (x, y)
    elif kind == "inf_test":
        te = (x[:10] * float("inf"), y[:10])
    elif kind == "labels":
        tr = (x, y + 1)
    elif kind == "negative":
        te = (x[:10], y[:10] - 1)
    elif kind == "lengths":
        tr = (x, y[:30])
    elif kind == "empty":
        tr = (x[:0], y[:0])
    elif kind == "empty_test":
        te = (x[:0], y[:0])
    elif kind == "fractional":
        tr = (x, y.float() + 0.5)
    elif kind == "flat":
        tr = (torch.randn(40), y)
    elif kind == "shapes":
        te = (torch.randn(10, 1, 5, 5), y[:10])
    elif kind == "raise":
        raise RuntimeError("the data server is down")
    elif kind == "notdict":
        return [tr, te]
    elif kind == "strings":
        tr = ("abc", y)
    return {"train": tr, "test": te, "num_classes": 3}
"""


@pytest.mark.parametrize("kind,words", [
    ("nan", ["train", "nan"]), ("inf_test", ["test", "infinite"]), ("labels", ["train", "labels", "0..2"]),
    ("negative", ["test", "labels"]), ("lengths", ["train", "40 inputs", "30 labels"]), ("empty", ["train", "empty"]),
    ("empty_test", ["test", "empty"]), ("fractional", ["whole numbers"]), ("flat", ["shape"]),
    ("shapes", ["test", "shape"]), ("raise", ["data server is down"]), ("notdict", ["dict"]),
    ("strings", ["train"]),
])
def test_hostile_data(tmp_path, capsys, monkeypatch, kind, words):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "hostile_data.py").write_text(DATA)
    sys.modules.pop("hostile_data", None)
    cfg = _cfg(tmp_path, json.dumps({"data": {"factory": "hostile_data:make", "kwargs": {"kind": kind}},
                                     "model": {"name": "mlp", "kwargs": {"width": 4}},
                                     "train": {"epochs": 1}}).encode())
    code, _, err = run_cli(capsys, monkeypatch, "train", "--config", cfg, "--out", tmp_path / "m.safetensors")
    assert_one_line(code, err, *words)
    sys.modules.pop("hostile_data", None)


def test_clean_user_data_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "hostile_data_ok.py").write_text(DATA)
    cfg = _cfg(tmp_path, json.dumps({"data": {"factory": "hostile_data_ok:make"},
                                     "model": {"name": "mlp", "kwargs": {"width": 4}}, "train": {"epochs": 1}}).encode())
    code, _, err = run_cli(capsys, monkeypatch, "train", "--config", cfg, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    meta = ck.read_model_file(tmp_path / "m.safetensors")[1]
    assert meta["data"]["num_classes"] == 3 and meta["data"]["input_shape"] == [1, 4, 4]


# ---------------------------------------------------------------- CLI numbers

@pytest.mark.parametrize("args,words", [
    (["train", "--seed", 2**70, "--out", "{d}/m.safetensors"], ["--seed"]),
    (["train", "--seed", -1, "--out", "{d}/m.safetensors"], ["--seed"]),
    (["train", "--seed", "many", "--out", "{d}/m.safetensors"], ["--seed"]),
    (["train", "--device", "banana", "--out", "{d}/m.safetensors", *TINY_SET], ["unknown device 'banana'"]),
    (["eval", "{good}", "--device", "banana"], ["unknown device"]),
    (["eval", "{good}", "--device", "cuda:99"], ["cuda"]),
    (["eval", "{good}", "--batch-size", 0], ["--batch-size"]),
    (["barrier", "{good}", "{good}", "--json-out", "{d}/b.json", "--points", 1], ["--points"]),
    (["barrier", "{good}", "{good}", "--json-out", "{d}/b.json", "--bn-batches", 0], ["--bn-batches"]),
    (["barrier", "{good}", "{good}", "--json-out", "{d}/b.json", "--seed", 2**64], ["--seed"]),
    (["bma", "--star", "{good}", "--sources", "{good}", "--json-out", "{d}/m.json", "--k", 0], ["--k"]),
    (["bma", "--star", "{good}", "--sources", "{good}", "--json-out", "{d}/m.json", "--seeds", 0], ["--seeds"]),
    (["bma", "--star", "{good}", "--sources", "{good}", "--json-out", "{d}/m.json", "--ns", "0,1"], ["--ns"]),
    (["run", "--out", "{d}/study", "--workers", 0], ["--workers"]),
    (["train", "--out", "{d}/m.safetensors", "--set", "train.epochs=-1"], ["epochs"]),
    (["eval"], ["missing argument"]),
    (["nosuchcommand"], ["no such command"]),
])
def test_hostile_cli_numbers(good, tmp_path, capsys, monkeypatch, args, words):
    args = [str(a).format(d=tmp_path, good=good[0]) for a in args]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert_one_line(code, err, *words)


# ---------------------------------------------------------------- I/O

def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits; /sys refuses root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, "/sys"):
        try:
            fd, p = __import__("tempfile").mkstemp(dir=d)
        except OSError:
            return d
        os.close(fd)
        os.unlink(p)
    pytest.skip("no unwritable folder here")


def test_output_into_a_read_only_folder(good, tmp_path, capsys, monkeypatch):
    ro = _unwritable_folder(tmp_path)
    for args in (["train", "--out", f"{ro}/m.safetensors", *TINY_SET],
                 ["barrier", good[0], good[0], "--no-align", "--points", 3, "--json-out", f"{ro}/b.json"]):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert_one_line(code, err, "cannot write", str(ro))


def test_output_onto_a_folder_or_under_a_file(good, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "align", good[0], good[0], "--out", tmp_path)
    assert_one_line(code, err, "is a folder")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, monkeypatch, "align", good[0], good[0], "--out", blocker / "o.safetensors")
    assert_one_line(code, err, "cannot write")
    code, _, err = run_cli(capsys, monkeypatch, "eval", tmp_path)
    assert_one_line(code, err, "folder")
    code, _, err = run_cli(capsys, monkeypatch, "train", "--config", tmp_path, "--out", tmp_path / "m.safetensors")
    assert_one_line(code, err, "folder")


def test_full_disk(good, tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = run_cli(capsys, monkeypatch, "align", good[0], good[0], "--out", tmp_path / "o.safetensors")
    assert_one_line(code, err, "cannot write", "no space left")
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "o.safetensors").exists()


def test_os_errors_from_anywhere_are_one_line(good, tmp_path, capsys, monkeypatch):
    """An OSError the library did not wrap still names the path, exit 2."""
    import stardomain.checkpoint as ckm

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(ckm, "read_model_file", denied)
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0])
    assert_one_line(code, err, "permission denied", str(good[0]))


# ---------------------------------------------------------------- bugs: one line, traceback kept

def test_unexpected_exception_is_one_line_with_a_traceback_file(good, capsys, monkeypatch):
    import stardomain.checkpoint as ckm

    def bug(*a, **k):
        raise ZeroDivisionError("a bug in stardomain")

    monkeypatch.setattr(ckm, "read_model_file", bug)
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0])
    line = assert_one_line(code, err, "internal error: ZeroDivisionError", "--debug", code_want=1)
    path = line.split("traceback written to ")[1].split(";")[0]
    assert "Traceback" in open(path).read() and "a bug in stardomain" in open(path).read()
    os.unlink(path)
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0], "--debug")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0], env={"STARDOMAIN_DEBUG": "1"})
    assert code == 1 and "Traceback" in err


def test_user_error_with_debug_shows_the_traceback_and_keeps_exit_2(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "--debug", "info", tmp_path / "missing.safetensors")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")


def test_subprocess_yaml_bomb_ends_fast(tmp_path):
    cfg = _cfg(tmp_path, BOMB)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stardomain.cli", "train", "--config", str(cfg), "--out",
                        str(tmp_path / "m.safetensors")], capture_output=True, text=True, timeout=120)
    assert_one_line(r.returncode, r.stderr, "expands")
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("exc,words", [
    (MemoryError(), ["out of memory"]),
    (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ["not utf-8"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), ["/mnt/ro/x", "read-only"]),
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), ["/data/x", "no space left"]),
    (OSError(errno.EISDIR, "Is a directory", "/data/d"), ["/data/d", "folder"]),
    (OSError(errno.ENOTDIR, "Not a directory", "/data/f/x"), ["/data/f/x", "not a folder"]),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/nope"), ["/data/nope", "no such file"]),
])
def test_the_boundary_maps_each_family_to_one_line(good, capsys, monkeypatch, exc, words):
    """Whatever raises them, these failures of the user's inputs or machine are one line, exit 2."""
    import stardomain.checkpoint as ckm

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(ckm, "read_model_file", fail)
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0])
    assert_one_line(code, err, *words)


def test_interrupt_is_one_line_and_130(good, capsys, monkeypatch):
    import stardomain.checkpoint as ckm

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckm, "read_model_file", stop)
    code, _, err = run_cli(capsys, monkeypatch, "info", good[0])
    assert_one_line(code, err, "interrupted", code_want=130)


def test_star_refuses_a_tampered_source_without_importing_it(good, evil, tmp_path, capsys, monkeypatch):
    name, sentinel = evil
    bad = rewrite(good[0], tmp_path / "bad.safetensors", _set_model_factory(f"{name}:make"))
    code, _, err = run_cli(capsys, monkeypatch, "star", "--sources", good[0], bad, "--out",
                           tmp_path / "star.safetensors", *TINY_SET)
    assert_one_line(code, err, "does not match the config")
    assert not sentinel.exists()


def test_override_alias_bomb_is_refused(tmp_path, capsys, monkeypatch):
    # 10^6 values from 50 aliases: each level holds 10 references to the one before
    bomb = "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
           "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]}"
    code, _, err = run_cli(capsys, monkeypatch, "train", "--out", tmp_path / "m.safetensors",
                           "--set", f"model.kwargs={bomb}", "--set", "data.name=digits")
    assert_one_line(code, err, "expands")


def test_a_study_task_imports_the_factories_of_its_own_config(good, tmp_path, monkeypatch):
    """execute() allows exactly the factories its task's (the user's) config names: the pair is measured."""
    from stardomain.study import Task, execute

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "goodmod_study.py").write_text(GOOD_FACTORY)
    (tmp_path / "models").mkdir()
    sd, meta = ck.read_model_file(good[0])
    ck.save_model(tmp_path / "models/a.safetensors", sd,
                  {**meta, "model": {"name": None, "factory": "goodmod_study:make", "kwargs": {"width": 8}}})
    params = {"a": "models/a.safetensors", "b": "models/a.safetensors", "a_label": "a", "b_label": "a", "seed": 0,
              "device": "cpu", "eval": {"points": 3, "align": False, "bn_batches": 1, "batch_size": 500}}
    with pytest.raises(UserError, match="allow-factory"):
        execute(Task("b" * 64, "pair", "a-a", {**params, "allow": []}), tmp_path)
    execute(Task("c" * 64, "pair", "a-a", {**params, "allow": ["goodmod_study:make"]}), tmp_path)
    rec = json.loads((tmp_path / f"cache/pair/{'c' * 64}.json").read_text())
    # A with itself: every point is A, so the test loss is A's own and the barrier is 0
    assert rec["test"]["loss"] == pytest.approx([good[1]["metrics"]["test"]["loss"]] * 3, rel=1e-6)
    assert rec["barrier"]["test_loss"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("edit,words", [
    (_edit(["data", "input_shape"], [3, 2**20, 2**20]), ["input_shape", "numbers each"]),
    (_edit(["data", "config", "kwargs"], {"test_fraction": "abc"}), ["test_fraction"]),
    (_edit(["data", "config", "kwargs"], {"test_fraction": 0}), ["test_fraction"]),
    (_edit(["data", "config", "kwargs"], {"bogus": 1, "split_seed": 3}), ["split_seed"]),
])
def test_hostile_shapes_and_data_kwargs_in_a_file(good, tmp_path, capsys, monkeypatch, edit, words):
    bad = rewrite(good[0], tmp_path / "k.safetensors", edit)
    code, _, err = run_cli(capsys, monkeypatch, "eval", bad)
    assert_one_line(code, err, *words)
