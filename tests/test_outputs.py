"""Nothing is overwritten by surprise: every output option refuses a folder, one of the command's own
inputs, and an existing file that is not an earlier output of the same command (and, for model files,
of the same job), unless --force; an earlier output of the same job may be replaced (a re-run)."""

import json

import pytest
from clitools import run_cli

import stardomain.checkpoint as ck
from stardomain.config import load_config
from stardomain.errors import UserError
from stardomain.files import train_to_file

CFG = "data: {name: digits}\nmodel: {name: mlp, kwargs: {width: 8}}\ntrain: {epochs: 1, batch_size: 64}\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    conf = d / "c.yaml"
    conf.write_text(CFG)
    cfg = load_config(conf)
    a, b = d / "a.safetensors", d / "b.safetensors"
    train_to_file(cfg, 0, a, progress=False)
    train_to_file(cfg, 1, b, progress=False)
    return d, conf, a, b


def _main(monkeypatch, capsys, *args):
    """The CLI in process (the console script's main()): -> (exit code, stdout, stderr)."""
    return run_cli(monkeypatch, capsys, *args)


def _refused(code, err, *words):
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err


# ---------------------------------------------------------------- the policy itself

def test_header_metadata_is_read_without_the_weights(files, tmp_path):
    d, conf, a, _ = files
    assert ck.read_model_meta(a) == ck.read_model_file(a)[1]
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes(a.read_bytes()[:8 + 40])
    for p in (conf, trunc, tmp_path / "missing", tmp_path):
        assert ck.read_model_meta(p) is None


def test_model_outputs_are_replaced_only_by_the_same_job(files, tmp_path):
    d, conf, a, _ = files
    cfg = load_config(conf).model_dump()
    same = {"role": "source", "seed": 0, "config": cfg}
    ck.check_output(a, "train", same)  # the same job: a re-run may replace it
    ck.check_output(tmp_path / "new.safetensors", "train", same)  # nothing there
    with pytest.raises(UserError, match=r"another job \(different seed\); choose another --out or pass --force"):
        ck.check_output(a, "train", {**same, "seed": 1})
    other = load_config(conf, ["train.epochs=2"]).model_dump()
    with pytest.raises(UserError, match=r"different config"):
        ck.check_output(a, "train", {**same, "config": other})
    with pytest.raises(UserError, match=r"different role"):
        ck.check_output(a, "train", {**same, "role": "heldout"})
    with pytest.raises(UserError, match="is a stardomain train model file, not a `stardomain star` output"):
        ck.check_output(a, "star", {**same, "role": "star", "sources": []})
    with pytest.raises(UserError, match="is not a stardomain model file"):
        ck.check_output(conf, "train", same)
    with pytest.raises(UserError, match="is also an input"):
        ck.check_output(a, "train", same, inputs=[a])
    for kind in ("train", "star", "align"):  # --force allows any of it ...
        ck.check_output(conf, kind, same, force=True)
    with pytest.raises(UserError, match="is a folder"):  # ... but a folder is never replaced by a file
        ck.check_output(d, "train", same, force=True)
    with pytest.raises(UserError, match="--json and --plot name the same file"):
        ck.check_distinct(json=tmp_path / "x", plot=tmp_path / "." / "x")


# ---------------------------------------------------------------- the commands

def test_train_refuses_its_config_and_foreign_files(files, tmp_path, monkeypatch, capsys):
    d, conf, _, _ = files
    before = conf.read_bytes()
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", conf)
    _refused(code, err, str(conf), "--force")
    assert conf.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", notes)
    _refused(code, err, "is not a stardomain model file", "--force")
    assert notes.read_text() == "mine"
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", tmp_path)
    _refused(code, err, "is a folder")


def test_train_rerun_replaces_other_job_needs_force(files, tmp_path, monkeypatch, capsys):
    _, conf, _, _ = files
    out = tmp_path / "m.safetensors"
    for _ in range(2):  # the same command twice: the second is a refresh, not a surprise
        code, stdout, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", out)
        assert code in (0, None) and "wrote" in stdout, err
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", out, "--seed", "1")
    _refused(code, err, "different seed", "--force")
    assert ck.read_model_meta(out)["seed"] == 0
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", out, "--seed", "1", "--force")
    assert code in (0, None), err
    assert ck.read_model_meta(out)["seed"] == 1


def test_align_refuses_its_inputs_and_other_pairs(files, tmp_path, monkeypatch, capsys):
    _, _, a, b = files
    before = b.read_bytes()
    code, _, err = _main(monkeypatch, capsys, "align", a, b, "--out", b)
    _refused(code, err, "is also an input", "--force")
    assert b.read_bytes() == before
    out, rec = tmp_path / "b_to_a.safetensors", tmp_path / "rec.json"
    for _ in range(2):
        code, _, err = _main(monkeypatch, capsys, "align", a, b, "--out", out, "--json-out", rec)
        assert code in (0, None), err
    code, _, err = _main(monkeypatch, capsys, "align", b, a, "--out", out)
    _refused(code, err, "different reference_sha256, source_sha256", "--force")
    code, _, err = _main(monkeypatch, capsys, "align", a, b, "--out", tmp_path / "x", "--json-out", tmp_path / "x")
    _refused(code, err, "--out and --json-out name the same file")
    # an align record is not a barrier record, nor the reverse
    with pytest.raises(UserError, match=r"is not a `stardomain barrier` output \(json\)"):
        ck.check_output(rec, "barrier.json", option="--json")


def test_barrier_outputs(files, tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, conf, a, b = files
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    for _ in range(2):
        code, _, err = _main(monkeypatch, capsys, "barrier", a, b, "--json-out", js, "--plot", png, "--points", "3")
        assert code in (0, None), err
    assert ck._png_software(png) == "stardomain barrier"
    code, _, err = _main(monkeypatch, capsys, "barrier", a, b, "--json-out", conf, "--points", "3")
    _refused(code, err, "--json-out", "is not a `stardomain barrier` output (json)", "--force")
    foreign = tmp_path / "photo.png"
    plt.figure().savefig(foreign)
    plt.close("all")
    code, _, err = _main(monkeypatch, capsys, "barrier", a, b, "--json-out", js, "--plot", foreign, "--points", "3")
    _refused(code, err, "--plot", "is not a `stardomain barrier` output (png)", "--force")
    with pytest.raises(UserError):
        ck.check_output(js, "bma.json", option="--json")
    code, _, err = _main(monkeypatch, capsys, "barrier", a, b, "--json-out", js, "--plot", foreign, "--points", "3",
                         "--force")
    assert code in (0, None), err
    assert ck._png_software(foreign) == "stardomain barrier"
    assert json.loads(js.read_text())["files"] == {"a": str(a), "b": str(b)}


def test_star_outputs(files, tmp_path, monkeypatch, capsys):
    _, conf, a, b = files
    out = tmp_path / "star.safetensors"
    args = ["star", "--config", conf, "--sources", a, b, "--set", "star.align_every=never"]
    code, _, err = _main(monkeypatch, capsys, *args, "--out", a)
    _refused(code, err, "is also an input", "--force")
    for _ in range(2):
        code, _, err = _main(monkeypatch, capsys, *args, "--out", out)
        assert code in (0, None), err
    code, _, err = _main(monkeypatch, capsys, "star", "--config", conf, "--sources", a, "--set",
                         "star.align_every=never", "--out", out)
    _refused(code, err, "(different sources)", "--force")
    code, _, err = _main(monkeypatch, capsys, *args, "--out", out, "--seed", "2")
    _refused(code, err, "different seed")
    code, _, err = _main(monkeypatch, capsys, *args, "--out", tmp_path / "m.safetensors")
    assert code in (0, None), err
    code, _, err = _main(monkeypatch, capsys, "train", "--config", conf, "--out", out)  # a star is not a train output
    _refused(code, err, "is a stardomain star model file")


def test_bma_outputs_refused_before_any_work(files, tmp_path, monkeypatch, capsys):
    d, conf, a, b = files
    code, _, err = _main(monkeypatch, capsys, "bma", "--star", a, "--sources", a, b, "--json-out", conf)
    _refused(code, err, "--json-out", "is not a `stardomain bma` output (json)", "--force")
    code, _, err = _main(monkeypatch, capsys, "bma", "--star", a, "--sources", a, b, "--json-out", tmp_path / "r.json",
                         "--report", b)
    _refused(code, err, "--report", "is also an input")
    code, _, err = _main(monkeypatch, capsys, "bma", "--star", a, "--sources", a, b, "--json-out", tmp_path / "r.json",
                         "--plot", tmp_path / "r.json")
    _refused(code, err, "--json-out and --plot name the same file")


def test_bma_outputs_are_recognised_as_its_own(files, tmp_path, monkeypatch, capsys):
    _, _, a, b = files
    js, png, md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    code, _, err = _main(monkeypatch, capsys, "bma", "--star", a, "--sources", a, b, "--k", "2", "--seeds", "1",
                         "--no-ood", "--json-out", js, "--plot", png, "--report", md)
    assert code in (0, None), err
    for path, kind in ((js, "bma.json"), (png, "bma.png"), (md, "bma.md")):
        ck.check_output(path, kind)  # a re-run may replace them ...
    for path, kind in ((js, "barrier.json"), (png, "barrier.png"), (md, "bma.json")):
        with pytest.raises(UserError, match="--force"):  # ... another command may not
            ck.check_output(path, kind)
