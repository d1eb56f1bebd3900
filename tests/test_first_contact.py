"""First contact (issue 16): threads and devices under control, progress that suits where output goes,
and the command-line conventions (--version, config, did-you-mean, enum choices, one --json rule, Ctrl-C)."""

import csv
import enum
import json
import os
import re
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
import typer
import yaml

from clitools import run_cli

DIGITS = ["--set", "data.name=digits", "--set", "train.batch_size=64"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _meta(path):
    from stardomain.checkpoint import read_model_meta

    return read_model_meta(path)


# ---------------------------------------------------------------- threads and devices


def test_thread_choice_precedence(monkeypatch):
    from stardomain import runtime
    from stardomain.errors import UserError

    monkeypatch.setattr(runtime, "_affinity_allocation", lambda: None)
    assert runtime.choose_threads(3, {"OMP_NUM_THREADS": "5"}) == (3, "--threads")
    assert runtime.choose_threads(None, {"OMP_NUM_THREADS": "5", "SLURM_CPUS_PER_TASK": "7"}) == (5, "OMP_NUM_THREADS")
    env = {"OMP_NUM_THREADS": "x", "SLURM_CPUS_PER_TASK": "7"}  # an unusable value is passed over
    assert runtime.choose_threads(None, env) == (7, "SLURM_CPUS_PER_TASK")
    assert runtime.choose_threads(None, {}) == (1, "default")
    monkeypatch.setattr(runtime, "_affinity_allocation", lambda: 3)
    assert runtime.choose_threads(None, {}) == (3, "CPU affinity")
    with pytest.raises(UserError):
        runtime.choose_threads(0, {})


def test_affinity_counts_only_when_restricted(monkeypatch):
    from stardomain import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert runtime._affinity_allocation() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert runtime._affinity_allocation() is None  # the whole machine is no allocation


def test_threads_device_version_recorded_and_restored(monkeypatch, capsys, tmp_path):
    from stardomain import __version__

    torch.set_num_threads(1)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--threads", 2, "--device", "cpu",
                           "--set", "train.epochs=1", *DIGITS)
    assert code == 0, err
    assert _meta(out)["runtime"] == {"threads": 2, "device": "cpu", "stardomain": __version__}
    assert torch.get_num_threads() == 1  # an in-process caller keeps its own setting
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--threads", 0, *DIGITS)
    assert code == 2 and "--threads" in err


def _interrupted_train(monkeypatch, cfg, out, threads):
    """Train at `threads`, stopped by a KeyboardInterrupt right after epoch 1's state is saved."""
    import stardomain.training as tr
    from stardomain.files import train_to_file

    real = tr.save_training_state

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    torch.set_num_threads(threads)
    with monkeypatch.context() as mp:
        mp.setattr(tr, "save_training_state", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train_to_file(cfg, 0, out, progress=False, device="cpu")
    assert out.with_name(out.name + ".state").exists()


@pytest.mark.parametrize("before, after, warned", [(2, 1, True), (1, 1, False)])
def test_resume_under_other_threads_warns(monkeypatch, capsys, tmp_path, digits_cfg, before, after, warned):
    from stardomain.files import train_to_file

    out = tmp_path / "m.safetensors"
    _interrupted_train(monkeypatch, digits_cfg, out, before)
    capsys.readouterr()
    torch.set_num_threads(after)
    meta = train_to_file(digits_cfg, 0, out, progress=False, device="cpu")
    err = capsys.readouterr().err
    assert ("threads 2 -> 1" in err and "differ bitwise" in err) == warned, err
    assert meta["runtime"]["threads"] == after
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]  # epoch 1 came from the saved state


# ---------------------------------------------------------------- progress and history

LINE = re.compile(r"^train seed 0: epoch (\d+)/(\d+)  loss (\d+\.\d{4})  acc (\d\.\d{4})  ETA (\d+)s$")


def test_piped_progress_lines_history_and_csv(monkeypatch, capsys, tmp_path):
    import stardomain.training as tr

    monkeypatch.setattr(tr, "PLAIN_EVERY_S", 0.0)  # a line after every batch
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--set", "train.epochs=2", *DIGITS)
    assert code == 0, err
    assert "\r" not in err  # no bar redraws in a log
    lines = [LINE.match(x) for x in err.splitlines()]
    assert lines and all(lines), err
    meta = _meta(out)
    epochs = [int(m.group(1)) for m in lines]
    assert epochs == sorted(epochs) and epochs[0] == 1 and epochs[-1] == 2 and {int(m.group(2)) for m in lines} == {2}
    assert int(lines[-1].group(5)) == 0
    hist = meta["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    # the last line of each epoch shows that epoch's mean loss and accuracy, as recorded
    for e, h in zip((1, 2), hist):
        last = [m for m in lines if int(m.group(1)) == e][-1]
        assert float(last.group(3)) == pytest.approx(h["loss"], abs=5e-5)
        assert float(last.group(4)) == pytest.approx(h["acc"], abs=5e-5)
    train_size = meta["data"]["train_size"]
    seen = (train_size // 64) * 64  # drop_last: whole batches only
    for h in hist:  # accuracy is a count of right answers over the examples seen
        assert abs(h["acc"] * seen - round(h["acc"] * seen)) < 1e-6
    rows = list(csv.DictReader(open(out.with_name(out.name + ".csv"))))
    assert [(int(r["epoch"]), float(r["loss"]), float(r["acc"])) for r in rows] == \
        [(h["epoch"], h["loss"], h["acc"]) for h in hist]


def test_piped_progress_is_rate_limited(monkeypatch, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--set", "train.epochs=3", *DIGITS)
    assert code == 0, err
    lines = err.splitlines()  # a run of ~1 s: only the closing line (interval 5 s)
    assert len(lines) == 1 and LINE.match(lines[0]) and lines[0].startswith("train seed 0: epoch 3/3"), err


def test_ctrl_c_prints_the_resume_line(tmp_path):
    out = tmp_path / "m.safetensors"
    state = out.with_name(out.name + ".state")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "stardomain", "train", "--out", str(out),
                          "--set", "train.epochs=100000", *DIGITS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         # as from a terminal: a suite started in the background (`... &`) hands its children
                         # SIGINT ignored, and Python then never raises KeyboardInterrupt
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.monotonic()
        while not state.exists() and p.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.1)
        assert state.exists(), "no epoch finished within 60 s"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; completed work is saved and a re-run resumes it"
    assert state.exists() and not out.exists()


# ---------------------------------------------------------------- command-line conventions


def test_version(monkeypatch, capsys):
    from stardomain import __version__

    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert (code, out, err) == (0, f"stardomain {__version__}\n", "")


def test_completion_offered_and_completes_choices(monkeypatch, capsys):
    from pathlib import Path

    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    script = Path(sys.executable).with_name("stardomain")  # completion is keyed to the console script's name
    if not script.exists():
        pytest.skip("no stardomain console script next to this Python")
    env = {**os.environ, "_STARDOMAIN_COMPLETE": "complete_bash", "COMP_WORDS": "stardomain align --method ",
           "COMP_CWORD": "3"}
    r = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["weight", "activation", "ste", "sinkhorn"], r.stderr


def test_config_prints_the_resolved_config(monkeypatch, capsys, tmp_path):
    from stardomain.config import Config

    f = tmp_path / "c.yaml"
    f.write_text("data: {name: digits}\nmodel: {name: mlp, kwargs: {width: 8}}\n")
    code, out, err = run_cli(monkeypatch, capsys, "config", f, "--set", "train.epochs=3")
    assert code == 0, err
    printed = yaml.safe_load(out)
    expected = Config.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
                                      "train": {"epochs": 3}})
    assert Config.model_validate(printed) == expected  # reads back as the same config
    assert printed["train"]["epochs"] == 3 and printed["star"]["t_sampling"] == "uniform"  # defaults filled in
    code, out, _ = run_cli(monkeypatch, capsys, "config", "--json")
    assert code == 0 and json.loads(out) == Config().model_dump(mode="json")
    from stardomain.config import load_config
    from stardomain.study import default_config_path

    code, out, _ = run_cli(monkeypatch, capsys, "config", "--study", "--json")
    assert code == 0 and json.loads(out) == load_config(default_config_path()).model_dump(mode="json")
    assert run_cli(monkeypatch, capsys, "config", f, "--study")[0] == 2


@pytest.mark.parametrize("text, where, hint", [
    ("trian: {epochs: 3}\n", "trian", "did you mean 'train'?"),
    ("train: {epohcs: 3}\n", "train.epohcs", "did you mean 'epochs'?"),
    ("star: {train: {batch_sise: 3}}\n", "star.train.batch_sise", "did you mean 'batch_size'?"),
    ("study: {eval: {pionts: 3}}\n", "study.eval.pionts", "did you mean 'points'?"),
    ("train: {zzzz: 1}\n", "train.zzzz", "expected one of: epochs, batch_size,"),
])
def test_unknown_config_key_did_you_mean(monkeypatch, capsys, tmp_path, text, where, hint):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    code, out, err = run_cli(monkeypatch, capsys, "config", f)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert f"{where}: unknown key ({hint}" in err, err


def _command(name):
    from stardomain.cli import app

    return typer.main.get_command(app).commands[name]


def _param(cmd, opt):
    return next(p for p in _command(cmd).params if opt in p.opts)


def _choices(cmd, opt) -> list[str]:
    """The values an option accepts, as click (p.type.choices) or typer >= 0.20 (the annotation) holds them."""
    p = _param(cmd, opt)
    if hasattr(getattr(p, "type", None), "choices"):
        return [getattr(c, "value", c) for c in p.type.choices]
    ann = p.type_descriptor.annotation
    ann = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, enum.Enum)))
    return [m.value for m in ann]


def test_enum_choices_shared_with_the_library():
    from stardomain.config import AlignMethod, Executor, MatchInit
    from stardomain.permute.matching import INITS

    assert tuple(m.value for m in MatchInit) == INITS
    assert _choices("align", "--method") == [m.value for m in AlignMethod] == ["weight", "activation", "ste", "sinkhorn"]
    assert _choices("align", "--init") == list(INITS)
    assert _choices("run", "--executor") == [m.value for m in Executor] == ["local", "ray"]


def test_enum_choices_in_help(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "align", "--help", env={"COLUMNS": "250"})
    assert code == 0 and "weight|activation" in out and "informed|identity|sorted" in out
    code, out, _ = run_cli(monkeypatch, capsys, "run", "--help", env={"COLUMNS": "250"})
    assert code == 0 and "local|ray" in out


def test_options_that_do_not_apply_are_refused(monkeypatch, capsys, tmp_path):
    a = tmp_path / "a.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "align", a, a, "--out", tmp_path / "o.safetensors",
                           "--method", "activation", "--init", "identity")
    assert code == 2 and "--init applies to --method weight only" in err
    code, _, err = run_cli(monkeypatch, capsys, "align", a, a, "--out", tmp_path / "o.safetensors", "--method", "act")
    assert code == 2 and "--method" in err


def test_one_json_rule_on_every_command():
    """--json is a flag that prints JSON on stdout; a JSON file is always --json-out PATH."""
    from stardomain.cli import app

    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            if "--json" in p.opts:
                assert p.is_flag, name
            if any("json" in o for o in p.opts) and not p.is_flag:
                assert p.opts == ["--json-out"], (name, p.opts)


def test_every_computing_command_takes_threads_and_device():
    for name in ("train", "eval", "star", "align", "barrier", "bma", "run", "spec"):
        assert _param(name, "--threads")
    for name in ("train", "eval", "star", "barrier", "bma", "run"):
        assert _param(name, "--device")


def test_barrier_json_prints_what_json_out_writes(monkeypatch, capsys, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, f in ((0, a), (1, b)):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--out", f, "--seed", seed, "--set", "train.epochs=1", *DIGITS)
        assert code == 0, err
    js = tmp_path / "b.json"
    code, out, err = run_cli(monkeypatch, capsys, "barrier", a, b, "--points", 3, "--no-align", "--json",
                             "--json-out", js)
    assert code == 0, err
    printed, written = json.loads(out), json.loads(js.read_text())
    printed.pop("timings"), written.pop("timings")
    assert printed == written and set(printed["barrier"]) >= {"train_loss", "test_loss"}
    code, out, err = run_cli(monkeypatch, capsys, "barrier", a, b, "--points", 3, "--no-align")
    assert code == 0 and out.startswith("barrier  train loss") and "wrote" not in out


def test_star_records_runtime_history_and_csv(tmp_path, digits_cfg):
    from stardomain.files import star_to_file
    from stardomain.files import train_to_file

    cfg = digits_cfg.model_copy(update={"train": digits_cfg.train.model_copy(update={"epochs": 1})})
    srcs = [tmp_path / f"s{i}.safetensors" for i in range(2)]
    for i, p in enumerate(srcs):
        train_to_file(cfg, i, p, progress=False, device="cpu")
    torch.set_num_threads(1)
    out = tmp_path / "star.safetensors"
    meta = star_to_file(cfg.model_copy(update={"train": digits_cfg.train.model_copy(update={"epochs": 2})}),
                        srcs, out, seed=0, device="cpu", progress=False)
    assert meta["runtime"]["threads"] == 1 and meta["runtime"]["device"] == "cpu"
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    # fit's per-epoch mean loss is Starlight's interpolated loss, the same number its own history keeps
    assert [h["loss"] for h in meta["history"]] == [h["interp_loss"] for h in meta["star"]["history"]]
    assert all(h["acc"] is None for h in meta["history"])  # Starlight's step counts no right answers
    rows = list(csv.DictReader(open(out.with_name(out.name + ".csv"))))
    assert [(float(r["loss"]), r["acc"]) for r in rows] == [(h["loss"], "") for h in meta["history"]]


def test_run_on_a_study_made_under_other_threads_warns(monkeypatch, capsys, tmp_path, digits_cfg):
    from stardomain.runtime import warn_if_study_changed
    from stardomain.files import train_to_file

    (tmp_path / "models").mkdir()
    torch.set_num_threads(2)
    train_to_file(digits_cfg, 0, tmp_path / "models" / "source-0.safetensors", progress=False, device="cpu")
    capsys.readouterr()
    assert not warn_if_study_changed(tmp_path, 2, "cpu")
    assert warn_if_study_changed(tmp_path, 1, "cpu")
    err = capsys.readouterr().err
    assert err.startswith("warning: resuming a study") and "threads 2 -> 1" in err and len(err.splitlines()) == 1
    assert not warn_if_study_changed(tmp_path / "nothing-here", 1, "cpu")


def test_run_threads_and_device_reach_the_tasks_and_a_rerun_warns(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64}, "star": {"align_every": "never"},
        "study": {"n_sources": 2, "n_heldouts": 1, "pairs": ["star_heldout"], "bootstrap": 100}}))
    out = tmp_path / "study"
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", out, "--threads", 2, "--device", "cpu")
    assert code == 0, err
    metas = [_meta(p) for p in sorted((out / "models").glob("*.safetensors"))]
    assert metas and all(m["runtime"]["threads"] == 2 and m["runtime"]["device"] == "cpu" for m in metas)
    assert "warning" not in err
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", out, "--threads", 1)
    assert code == 0 and "warning: resuming a study" in err and "threads 2 -> 1" in err, err


@pytest.mark.parametrize("argv, line", [
    (["train", "--out", "m"], "interrupted; completed work is saved and a re-run resumes it"),
    (["--debug", "star", "--sources", "a"], "interrupted; completed work is saved and a re-run resumes it"),
    (["run", "--out", "o"], "interrupted; completed work is saved and a re-run resumes it"),
    (["barrier", "a", "b"], "interrupted; stardomain barrier does not resume: re-run it to start over"),
    (["bma", "--star", "s"], "interrupted; stardomain bma does not resume: re-run it to start over"),
])
def test_ctrl_c_line_promises_a_resume_only_where_there_is_one(argv, line):
    from stardomain.cli import _interrupted

    assert _interrupted(argv) == line


def test_ctrl_c_in_a_command_that_does_not_resume(monkeypatch, capsys, tmp_path):
    import stardomain.checkpoint as ckm

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckm, "read_model_file", stop)
    code, _, err = run_cli(monkeypatch, capsys, "info", tmp_path / "m.safetensors")
    assert (code, err) == (130, "interrupted; stardomain info does not resume: re-run it to start over\n")


# ---------------------------------------------------------------- the report and JSON that read well

def _floats(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)


def test_json_results_show_six_significant_digits(monkeypatch, capsys, tmp_path):
    """--json and --json-out show floats to 6 significant digits, the measured values rounded."""
    from stardomain.files import measure_files

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for seed, f in ((0, a), (1, b)):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--out", f, "--seed", seed, "--set", "train.epochs=1",
                               *DIGITS)
        assert code == 0, err
    js = tmp_path / "b.json"
    code, out, err = run_cli(monkeypatch, capsys, "barrier", a, b, "--points", 3, "--json", "--json-out", js)
    assert code == 0, err
    printed = json.loads(out)
    assert json.loads(js.read_text()) == printed
    assert all(float(f"{x:.6g}") == x for x in _floats(printed))
    direct = measure_files(a, b, BarrierSettings(points=3), device="cpu")
    assert printed["train"]["loss"] == [float(f"{x:.6g}") for x in direct["train"]["loss"]]
    assert any(float(f"{x:.6g}") != x for x in direct["train"]["loss"])  # the rounding did something
    code, out, err = run_cli(monkeypatch, capsys, "eval", a, "--json")
    assert code == 0 and all(float(f"{x:.6g}") == x for x in _floats(json.loads(out)))


TIMING_WORDS = re.compile(r"(^|_)(s|seconds?|secs|time|timings?|elapsed|wall|duration)($|_)")


def test_report_carries_config_versions_date_and_the_bma_figure_and_results_no_timings(tmp_path):
    """A tiny study with BMA: report.md/.html show when and with what they were written, the resolved
    config (YAML that loads back to results.json's config; collapsed in the HTML) and the BMA figure;
    results.json has no timing field anywhere (they are all in timings.json)."""
    from stardomain import __version__
    from stardomain.config import Config
    from stardomain.study import run_study

    cfg = Config.model_validate({
        "data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "study": {"n_sources": 2, "n_heldouts": 1, "eval": {"points": 3}, "bootstrap": 100, "bma": True,
                  "bma_k": 2}})
    res = run_study(cfg, tmp_path / "s", progress=False)
    md = (tmp_path / "s" / "report.md").read_text()
    html = (tmp_path / "s" / "report.html").read_text()
    assert re.search(rf"Written \d{{4}}-\d\d-\d\d \d\d:\d\d UTC by stardomain {re.escape(__version__)} "
                     rf"\(torch {re.escape(torch.__version__)}, numpy ", md)
    block = md.split("## Config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == res["config"] == cfg.model_dump(mode="json")
    assert "<details><summary>the config as YAML</summary>" in html and "</code></pre>\n</details>" in html
    png = (tmp_path / "s" / "plots" / "bma.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "![bma](plots/bma.png)" in md
    import base64
    assert base64.b64encode(png).decode() in html

    def keys(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield f"{path}.{k}", str(k)
                yield from keys(v, f"{path}.{k}")
        elif isinstance(obj, list):
            for v in obj:
                yield from keys(v, path)

    on_disk = json.loads((tmp_path / "s" / "results.json").read_text())
    timed = [p for p, k in keys(on_disk) if TIMING_WORDS.search(k.lower())]
    assert timed == []
    timings = json.loads((tmp_path / "s" / "timings.json").read_text())
    assert timings["tasks"] and all("seconds" in v for v in timings["tasks"].values())


# ---------------------------------------------------------------- TensorBoard (optional)

def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_what_the_history_holds(monkeypatch, capsys, tmp_path):
    """--tensorboard DIR: per epoch, the history's loss and accuracy (train) and the star's interpolated
    loss, at step = epoch, as float32."""
    pytest.importorskip("tensorboard")
    srcs = [tmp_path / f"s{i}.safetensors" for i in range(2)]
    for i, f in enumerate(srcs):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--out", f, "--seed", i, "--set", "train.epochs=2",
                               *DIGITS, "--tensorboard", tmp_path / f"tb{i}")
        assert code == 0, err
    got = _scalars(tmp_path / "tb0")
    hist = _meta(srcs[0])["history"]
    assert set(got) == {"train/loss", "train/acc"}
    for m in ("loss", "acc"):
        assert got[f"train/{m}"] == [(h["epoch"], pytest.approx(h[m], rel=1e-6)) for h in hist]
    star = tmp_path / "star.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "star", "--sources", *srcs, "--out", star, "--set", "train.epochs=2",
                           *DIGITS, "--tensorboard", tmp_path / "tbs")
    assert code == 0, err
    got = _scalars(tmp_path / "tbs")
    hist = _meta(star)["star"]["history"]
    assert got["star/interp_loss"] == [(h["epoch"], pytest.approx(h["interp_loss"], rel=1e-6)) for h in hist]
    assert len(hist) == 2


def test_tensorboard_without_the_package_warns_and_trains(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--set", "train.epochs=1", *DIGITS,
                           "--tensorboard", tmp_path / "tb")
    assert code == 0 and out.is_file() and not (tmp_path / "tb").exists()
    assert [ln for ln in err.splitlines() if ln.startswith("warning")] == [
        "warning: --tensorboard needs the tensorboard package (pip install tensorboard); training without it "
        "(per-epoch metrics are still in the model's metadata and OUT.csv)"]


# ---------------------------------------------------------------- less fixed cost on a busy machine

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stardomain.barriers import BarrierSettings


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, -1.5, 3e38, -3e38, 1e-40, float("nan"), float("inf"), -float("inf")]),
                min_size=0, max_size=12))
def test_all_finite_is_isfinite_all(values):
    """data._all_finite (two reductions, no mask) says what torch.isfinite(x).all() says."""
    from stardomain.data import _all_finite

    x = torch.tensor(values, dtype=torch.float32).view(-1, 1)
    assert _all_finite(x) == bool(torch.isfinite(x).all())


def test_run_piped_prints_plain_study_lines(monkeypatch, capsys, tmp_path):
    """`run` with stderr in a log: plain lines (tasks done/total, elapsed, ETA, what runs), no bar."""
    import stardomain.study.executors as ex
    import stardomain.training as tr
    from stardomain.config import load_config
    from stardomain.study import build_plan
    monkeypatch.setattr(tr, "PLAIN_EVERY_S", 0.0)  # a line at every task start and end
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
        "train": {"epochs": 1, "batch_size": 64}, "star": {"align_every": "never"},
        "study": {"n_sources": 2, "n_heldouts": 1, "pairs": ["star_heldout"], "bootstrap": 100}}))
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "s")
    assert code == 0, err
    assert "\r" not in err
    line = re.compile(r"^study: (\d+)/(\d+) tasks  \d+s(  ETA \d+s)?(  running: .+)?$")
    got = [line.match(x) for x in err.splitlines()]
    assert got and all(got), err
    total = {int(m.group(2)) for m in got}
    todo = ex.pending(build_plan(load_config(cfg)), tmp_path / "nothing")
    n = len(todo)
    assert total == {n}
    assert [int(m.group(1)) for m in got][-1] == n and got[-1].group(4) is None
    # one line as each unit of work starts: a task, or a population trained stacked (its first .. last task)
    work = ex.units(todo, 1)
    assert len(work) < n and max(len(u) for u in work) == 3  # the 2 sources and the held-out, one population
    starts = [m.group(4) for m in got if m.group(4)]
    assert len(starts) == len(work) and ".." in starts[0]
