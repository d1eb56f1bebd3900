"""The end-to-end study: plan/cache keys, resume after SIGKILL, ray == local, statistics, report files."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clitools import run_cli
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from stardomain.config import Config, load_config, validate
from stardomain.errors import UserError
from stardomain.study.executors import pending
from stardomain.stats import mann_whitney_less, paired_wilcoxon_less, summarize
from stardomain.study import build_plan, check_study_folder, default_config_path, run_study
from stardomain.study.folder import MARK_NAME, MARK_TEXT
from stardomain.files import measure_files
from stardomain.barriers import BarrierSettings

ROOT = Path(__file__).resolve().parents[1]
STARDOMAIN = str(Path(sys.executable).with_name("stardomain"))



TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "kwargs": {"width": 8}},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "star": {"align_every": "epoch"},
    "study": {"n_sources": 3, "n_heldouts": 2, "eval": {"points": 5, "align": True}, "bootstrap": 500},
}


def tiny_cfg(**over) -> Config:
    from stardomain.study import deep_merge

    return validate(Config, deep_merge(TINY, over))


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_yaml):
    out = tmp_path_factory.mktemp("local")
    res = run_study(load_config(tiny_yaml), out, progress=False)
    return out, res


# ---------------------------------------------------------------- plan and cache keys

def _keys(plan, op=None):
    return [t.key for t in plan.tasks if op is None or t.op == op]


def test_plan_shape_and_determinism():
    cfg = tiny_cfg()
    p1, p2 = build_plan(cfg), build_plan(cfg)
    assert p1.to_json() == p2.to_json()
    L = p1.layout["main"]
    assert len(_keys(p1, "train")) == 5 and len(_keys(p1, "star")) == 1 and len(_keys(p1, "average")) == 1
    n = {k: len(v) for k, v in L["pairs"].items()}
    assert n == {"star_heldout": 2, "regular_regular": 6, "heldout_heldout": 1, "star_source": 3,
                 "average_heldout": 2}
    # every dependency comes earlier in the plan (topological order)
    seen = set()
    for t in p1.tasks:
        assert set(t.deps) <= seen
        seen.add(t.key)


def test_keys_change_exactly_with_their_inputs():
    base = build_plan(tiny_cfg())
    by_op = {op: set(_keys(base, op)) for op in ("train", "star", "average", "pair")}
    L = base.layout["main"]
    rr = set(L["pairs"]["regular_regular"])

    # evaluation settings: only pair keys change
    for ev in ({"points": 7}, {"examples": 100}):
        p = build_plan(tiny_cfg(study={"eval": ev}))
        assert set(_keys(p, "train")) == by_op["train"] and set(_keys(p, "star")) == by_op["star"]
        assert not set(_keys(p, "pair")) & by_op["pair"]

    # a star setting: star and pairs touching the star change; models and regular pairs stay
    p = build_plan(tiny_cfg(star={"mu": 0.5}))
    assert set(_keys(p, "train")) == by_op["train"] and set(_keys(p, "average")) == by_op["average"]
    assert not set(_keys(p, "star")) & by_op["star"]
    assert rr <= set(_keys(p, "pair"))
    assert not set(p.layout["main"]["pairs"]["star_heldout"]) & set(L["pairs"]["star_heldout"])

    # the recipe: everything changes
    p = build_plan(tiny_cfg(train={"epochs": 3}))
    assert not set(_keys(p)) & set(_keys(base))

    # a held-out recipe: sources and the star stay, held-outs and every pair with a held-out change
    p = build_plan(tiny_cfg(study={"heldout_train": {"optimizer": {"lr": 0.05}}}))
    assert set(p.layout["main"]["sources"]) == set(L["sources"]) and p.layout["main"]["star"] == L["star"]
    assert not set(p.layout["main"]["heldouts"]) & set(L["heldouts"])
    assert set(p.layout["main"]["pairs"]["star_source"]) == set(L["pairs"]["star_source"])

    # one more held-out: every old key survives (a superset), nothing is recomputed
    p = build_plan(tiny_cfg(study={"n_heldouts": 3}))
    assert set(_keys(base)) <= set(_keys(p))

    # another study seed: an independent replicate, no model shared (study.plan.model_seed)
    p = build_plan(tiny_cfg(study={"seed": 1}))
    assert not set(_keys(p, "train")) & by_op["train"] and not set(_keys(p, "star")) & by_op["star"]

    # more stars: the first star is the one star of before, the others are new
    p = build_plan(tiny_cfg(study={"n_stars": 3}))
    assert p.layout["main"]["star"][0] == L["star"][0] and len(set(p.layout["main"]["star"])) == 3
    assert set(_keys(base)) - set(_keys(p)) == set()  # nothing recomputed


def test_sweeps_add_stars_and_populations():
    p = build_plan(tiny_cfg(study={"sweeps": {"n_sources": [1, 3, 4], "width": [4, 8]}}))
    sw = p.layout["sweeps"]
    assert [r["value"] for r in sw["n_sources"]] == [1, 3, 4]
    # |Z| = n_sources is the main star itself; the pool grows to the largest |Z|
    assert sw["n_sources"][1]["star"] == p.layout["main"]["star"]
    assert len(_keys(p, "train")) == 4 + 2 + (3 + 2)  # pool of 4 + held-outs, width 4 population (8 = main)
    assert sw["width"][1]["star"] == p.layout["main"]["star"]

    p = build_plan(tiny_cfg(study={"sweeps": {"t_sampling": ["uniform", "beta", "constant"], "depth": [2]}}))
    stars = [tuple(r["star"]) for r in p.layout["sweeps"]["t_sampling"]]
    assert list(stars[0]) == p.layout["main"]["star"] and len(set(stars)) == 3  # uniform is the default scheme
    assert p.layout["sweeps"]["depth"][0]["star"] != p.layout["main"]["star"]
    with pytest.raises(UserError):
        build_plan(tiny_cfg(study={"sweeps": {"t_sampling": ["sideways"]}}))


def test_bad_study_config_is_a_user_error():
    with pytest.raises(UserError):
        validate(Config, {**TINY, "study": {"pairs": ["star_heldout", "nonsense"]}})
    with pytest.raises(UserError):
        build_plan(tiny_cfg(study={"heldout_train": {"epochs": 0}}))


# ---------------------------------------------------------------- statistics

@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=30))
def test_summary_invariants(xs):
    s = summarize(xs, seed=3, n_boot=500)
    x = np.asarray(xs)
    assert s["n"] == len(xs)
    assert s["mean"] == pytest.approx(float(np.mean(x)))
    if len(xs) <= 2:  # two values cannot estimate a spread: no std, no interval (issue 13)
        assert s["std"] is None and s["ci95"] == [None, None]
        return
    assert s["std"] == pytest.approx(float(np.std(x, ddof=1)))
    lo, hi = s["ci95"]
    tol = 1e-9 * (1 + abs(s["mean"]))
    assert s["min"] - tol <= lo <= hi <= s["max"] + tol
    assert summarize(xs, seed=3, n_boot=500) == s  # seeded


def test_bootstrap_ci_matches_normal_theory():
    x = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    s = summarize(x, seed=0, n_boot=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert s["ci95"][0] < x.mean() < s["ci95"][1]
    assert s["ci95"][0] == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert s["ci95"][1] == pytest.approx(x.mean() + half, abs=0.25 * half)


def test_mann_whitney_against_hand_and_scipy():
    r = mann_whitney_less([1, 2, 3], [4, 5, 6])
    assert r["statistic"] == 0 and r["p_value"] == pytest.approx(1 / 20)  # 1 / C(6, 3), exact
    a, b = [0.1, 0.5, 0.2, 0.9], [0.4, 0.8, 1.2, 0.7, 1.1]
    ref = sps.mannwhitneyu(a, b, alternative="less")
    r = mann_whitney_less(a, b)
    assert r["p_value"] == pytest.approx(ref.pvalue) and r["statistic"] == pytest.approx(ref.statistic)
    assert mann_whitney_less([], [1.0]) is None


def test_paired_wilcoxon_all_below():
    r = paired_wilcoxon_less([0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 1.1, 1.5, 1.2, 1.3])
    assert r["p_value"] == pytest.approx(1 / 32)  # every difference negative: 1 / 2^5, exact


# ---------------------------------------------------------------- the whole study

def test_local_study_results_and_report(local_run, tiny_yaml):
    out, res = local_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == res
    assert {"pairs", "summary", "tests", "star_quality", "verdict", "models"} <= set(res)
    for kind, recs in res["pairs"].items():
        vals = [r["barrier"]["train_loss"] for r in recs]
        s = res["summary"][kind]["train_loss"]
        assert s["n"] == len(vals) and s["mean"] == pytest.approx(np.mean(vals))
        if len(vals) <= 2:  # no spread, no interval from two values
            assert s["std"] is None and s["ci95"] == [None, None]
        elif kind == "regular_regular":  # 3 sources x 2 held-outs: the cluster bootstrap needs 3 held-outs
            assert s["ci95"] == [None, None] and s["std"] is not None
        else:
            assert s["min"] <= s["ci95"][0] <= s["ci95"][1] <= s["max"]
        assert all(len(r["t"]) == 5 and r["barrier"]["train_loss"] >= 0 for r in recs)
    t = res["tests"]["star_heldout_below_regular_regular"]["train_loss"]
    ref = sps.mannwhitneyu([r["barrier"]["train_loss"] for r in res["pairs"]["star_heldout"]],
                           [r["barrier"]["train_loss"] for r in res["pairs"]["regular_regular"]], alternative="less")
    assert t["p_value"] == pytest.approx(ref.pvalue)
    # paired by held-out: star->h against the mean over sources of source->h (regular_regular is source-major)
    sh = [r["barrier"]["train_loss"] for r in res["pairs"]["star_heldout"]]
    rr = {(r["a"], r["b"]): r["barrier"]["train_loss"] for r in res["pairs"]["regular_regular"]}
    per_h = [np.mean([v for (a, b), v in rr.items() if b == r["b"]]) for r in res["pairs"]["star_heldout"]]
    paired = res["tests"]["star_heldout_below_regular_regular_paired"]["train_loss"]
    if paired is not None:
        assert paired["p_value"] == pytest.approx(sps.wilcoxon(np.subtract(sh, per_h), alternative="less").pvalue)
    # no timings in results.json
    assert "seconds" not in json.dumps(res) and "timings" not in json.dumps(res)
    # the star's own quality sits beside the regular models'
    assert set(res["star_quality"]) >= {"regular", "star", "average"}
    assert f"{res['summary']['star_heldout']['train_loss']['mean']:.3f}" in res["verdict"]

    # report files; the HTML embeds every plot
    html = (out / "report.html").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"curves", "barriers"}
    assert html.count("data:image/png;base64,") == len(pngs)
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verdict" in (out / "report.md").read_text()
    # issue 13: a design-aware headline, and the reports open with the one-line verdict
    assert res["headline"]["test"]["test"] == "sign_flip" and res["headline"]["min_p"] == 1 / 4
    assert any(f.startswith("too few held-outs") for f in res["headline"]["flags"])
    assert (out / "report.md").read_text().splitlines()[2] == f"**{res['verdict_line']}**"
    assert len(list((out / "models").glob("*.safetensors"))) == 7


def test_pair_record_matches_direct_measurement(local_run):
    out, res = local_run
    rec = res["pairs"]["regular_regular"][0]
    direct = measure_files(out / rec["a_file"], out / rec["b_file"], BarrierSettings(points=5, align=True), device="cpu")
    for m in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert rec["barrier"][m] == pytest.approx(direct["barrier"][m], abs=1e-6)


def test_rerun_skips_and_changed_setting_recomputes_only_dependents(local_run, tiny_yaml):
    out, res = local_run
    cfg = load_config(tiny_yaml)
    assert pending(build_plan(cfg), out) == []
    assert run_study(cfg, out, progress=False, report=False) == res
    cfg2 = load_config(tiny_yaml, ["study.eval.points=3"])
    todo = pending(build_plan(cfg2), out)
    assert todo and {t.op for t in todo} == {"pair"}
    cfg3 = load_config(tiny_yaml, ["star.mu=0.5"])
    assert {t.op for t in pending(build_plan(cfg3), out)} == {"star", "pair"}


def test_stale_pair_is_recomputed(local_run, tmp_path, tiny_yaml):
    """A pair record whose inputs' sha256 no longer match the model files is not trusted."""
    import shutil

    out, _ = local_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    plan = build_plan(load_config(tiny_yaml))
    t = next(t for t in plan.tasks if t.op == "pair")
    rec = json.loads((copy / t.output).read_text())
    rec["sha256_a"] = "0" * 64
    (copy / t.output).write_text(json.dumps(rec))
    assert [x.key for x in pending(plan, copy)] == [t.key]


def test_killed_study_resumes_to_identical_results(local_run, tiny_yaml, tmp_path):
    out_ref, _ = local_run
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([STARDOMAIN, "run", str(tiny_yaml), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "models").glob("*.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert not (out / "results.json").exists()
    done = len(list((out / "models").glob("*.json")))
    assert 3 <= done < 7
    r = subprocess.run([STARDOMAIN, "run", str(tiny_yaml), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "results.json").read_bytes() == (out_ref / "results.json").read_bytes()


def test_study_interrupted_inside_the_star_resumes_to_identical_results(local_run, tiny_yaml, tmp_path, monkeypatch):
    """Stopped after the star's first epoch (its resume state on disk), then re-run: results.json byte for
    byte as uninterrupted, the star's provenance (number of alignments, history) included."""
    import stardomain.study.tasks as tasks

    out_ref, _ = local_run
    real = tasks.star_to_file

    class Killed(Exception):
        pass

    def die_after_epoch_1(epoch, rec):
        if epoch == 1:
            raise Killed

    monkeypatch.setattr(tasks, "star_to_file", lambda *a, **kw: real(*a, **kw, on_epoch=die_after_epoch_1))
    out = tmp_path / "s"
    with pytest.raises(Killed):
        run_study(load_config(tiny_yaml), out, progress=False, report=False)
    assert list((out / "models").glob("star-*.safetensors.state"))
    assert not list((out / "models").glob("star-*.safetensors"))
    monkeypatch.setattr(tasks, "star_to_file", real)
    res = run_study(load_config(tiny_yaml), out, progress=False, report=False)
    assert res["models"]["stars"][0]["info"]["star"]["alignments"] == 2  # align_every epoch, 2 epochs
    assert (out / "results.json").read_bytes() == (out_ref / "results.json").read_bytes()


# ---------------------------------------------------------------- one run per folder

def _main(monkeypatch, capsys, *args):
    """The CLI in process (the console script's main()): -> (exit code, stderr)."""
    code, _, err = run_cli(monkeypatch, capsys, *args)
    return code, err


def test_second_run_on_a_locked_folder_exits_2_naming_the_holder(tiny_yaml, tmp_path, monkeypatch, capsys):
    import socket

    from stardomain.study.lock import study_lock

    out = tmp_path / "busy"
    out.mkdir()
    with study_lock(out, command="test"):
        line = (out / ".lock").read_text()
        assert line.startswith(f"pid {os.getpid()} host {socket.gethostname()} since ") and "command test" in line
        # a second open file description of .lock, as another process would have: flock refuses it too
        code, err = _main(monkeypatch, capsys, "run", tiny_yaml, "--out", out)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"study folder {out} is in use by pid {os.getpid()} on {socket.gethostname()} since " in err
        assert "wait for it or use another --out" in err
        with pytest.raises(UserError, match="is in use by pid"):  # the library entry is locked too
            run_study(load_config(tiny_yaml), out, progress=False)
        assert not (out / "models").exists()
    assert (out / ".lock").read_text() == ""  # released: nobody named


def test_lock_of_a_killed_run_is_released(tmp_path):
    from stardomain.study.lock import study_lock

    code = ("import sys, time; from stardomain.study.lock import study_lock\n"
            "with study_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by pid {proc.pid} "):
            with study_lock(tmp_path):
                pass
    finally:
        proc.kill()  # SIGKILL: no cleanup runs in the holder
        proc.wait()
    with study_lock(tmp_path) as p:  # the kernel dropped the dead holder's lock
        assert p.read_text().startswith(f"pid {os.getpid()} ")


def test_out_must_be_a_study_folder(tiny_yaml, tmp_path, monkeypatch, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        run_study(load_config(tiny_yaml), f, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    code, err = _main(monkeypatch, capsys, "run", tiny_yaml, "--out", other)
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in other.iterdir()) == ["notes.md"]
    check_study_folder(other, force=True)  # what --force allows
    (other / "plan.json").write_text("{}")  # a file of that name is not a study's mark
    with pytest.raises(UserError, match="not a study folder"):
        check_study_folder(other)
    (other / MARK_NAME).write_text(MARK_TEXT)
    check_study_folder(other)  # a study folder (of any config: artifacts are keyed) is reused
    with pytest.raises(UserError, match="is a file"):
        check_study_folder(f, force=True)


def test_ray_executor_gives_the_same_results(local_run, tiny_yaml, tmp_path):
    pytest.importorskip("ray")
    import ray

    out_ref, _ = local_run
    out = tmp_path / "ray"
    try:
        run_study(load_config(tiny_yaml), out, executor="ray", num_workers=2, progress=False, report=False)
    finally:
        ray.shutdown()
    assert (out / "results.json").read_bytes() == (out_ref / "results.json").read_bytes()


@pytest.mark.slow
def test_ray_worker_killed_mid_study_is_retried(tmp_path, monkeypatch):
    """A local cluster of a head and a worker node; the worker process that starts the star kills itself
    (SIGKILL, once): Ray retries the task and the study ends with the local executor's results.json."""
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    from stardomain.study import CRASH_ENV

    cfg = tiny_cfg(study={"n_sources": 2, "n_heldouts": 1})
    ref = tmp_path / "local"
    run_study(cfg, ref, progress=False, report=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv(CRASH_ENV, f"star:{marks}")  # before the nodes start: their workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_study(cfg, tmp_path / "ray", executor="ray", ray_address=cluster.address, progress=False, report=False)
        assert len(ray.nodes()) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert (marks / "crashed-star").exists()  # a worker did die starting the star
    assert (tmp_path / "ray" / "results.json").read_bytes() == (ref / "results.json").read_bytes()


# ---------------------------------------------------------------- configs and CLI

def test_default_config_is_embedded_and_identical():
    repo = ROOT / "configs" / "default.yaml"
    assert default_config_path().read_bytes() == repo.read_bytes()
    cfg = load_config(repo)
    p = build_plan(cfg)
    assert cfg.data.name == "mnist" and cfg.model.kwargs["width"] == 16
    # 10 sources, 10 held-outs, 3 fit-matched stars on the same sources (issue 21): every held-out
    # meets every star, and 2^-10 < alpha
    assert len(_keys(p, "train")) == 20 and len(_keys(p, "star")) == 3 and cfg.star.match_fit == 0.5
    assert {k: len(v) for k, v in p.layout["main"]["pairs"].items()} == {
        "star_heldout": 30, "regular_regular": 100, "star_source": 30, "average_heldout": 10}
    assert 2.0 ** -cfg.study.n_heldouts < cfg.study.alpha


@pytest.mark.parametrize("name", ["cifar10_resnet18", "cifar100_resnet18", "cifar10_vgg11", "cifar10_vgg19",
                                  "cifar10_densenet40", "cifar10_wrn22", "mnist_cnn"])
def test_ready_configs_validate_and_plan(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert build_plan(cfg).tasks


def test_cli_missing_data_stops_at_once(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"name": "cifar10", "kwargs": {"root": str(tmp_path / "none"),
                                                                                   "download": False}}}))
    r = subprocess.run([STARDOMAIN, "run", str(cfg), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "models").exists()


def test_cli_bad_executor(tmp_path, tiny_yaml):
    r = subprocess.run([STARDOMAIN, "run", str(tiny_yaml), "--out", str(tmp_path / "o"), "--executor", "spark"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'spark' is not one of 'local', 'ray'" in r.stderr


# ---------------------------------------------------------------- the local process pool (--workers)

def test_local_pool_gives_the_serial_results(local_run, tiny_yaml, tmp_path, monkeypatch):
    """--workers 2 runs independent tasks in two processes; every task is keyed, seeded and written
    atomically, so results.json is byte-identical to the serial run's, also when workers are replaced
    every few tasks (here every 3)."""
    from stardomain.study import executors

    monkeypatch.setattr(executors, "TASKS_PER_WORKER", 3)
    out_ref, _ = local_run
    run_study(load_config(tiny_yaml), tmp_path / "pool", num_workers=2, progress=False, report=False)
    assert (tmp_path / "pool" / "results.json").read_bytes() == (out_ref / "results.json").read_bytes()


def test_local_pool_failure_is_one_line_and_keeps_finished_work(local_run, tiny_yaml, tmp_path):
    """The process running the star dies (SIGKILL, once): `run --workers 2` exits 2 with one line; the
    sources finished before are kept (not rewritten by the re-run), and the re-run ends with the serial
    results.json."""
    from stardomain.study import CRASH_ENV

    out_ref, _ = local_run
    out, marks = tmp_path / "pool", tmp_path / "marks"
    marks.mkdir()
    cmd = [STARDOMAIN, "run", str(tiny_yaml), "--out", str(out), "--workers", "2"]
    env = {**os.environ, CRASH_ENV: f"star:{marks}"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert (marks / "crashed-star").exists()
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "re-run to resume" in lines[0], r.stderr
    plan = build_plan(load_config(tiny_yaml))
    sources = [out / f"models/{t.params['name']}.safetensors" for t in plan.tasks
               if t.op == "train" and t.params["role"] == "source"]
    before = {p: p.stat().st_mtime_ns for p in sources}  # the star's inputs: all finished before it started
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in sources} == before
    assert (out / "results.json").read_bytes() == (out_ref / "results.json").read_bytes()


def test_workers_must_be_positive():
    from stardomain.study.executors import get_executor

    assert get_executor("local").workers == 1 and get_executor("local", num_workers=3).workers == 3
    with pytest.raises(UserError, match="--workers"):
        get_executor("local", num_workers=0)


def test_no_two_models_share_a_seed():
    """Sources, held-outs and stars each get their own initialisation and data order (a star seeded like
    source 0 starts in that source's basin)."""
    plan = build_plan(tiny_cfg(study={"sweeps": {"n_sources": [1, 2]}}))
    seeds = [(t.op, t.params["seed"]) for t in plan.tasks if t.op in ("train", "star")]
    train_seeds = [s for op, s in seeds if op == "train"]
    assert len(set(train_seeds)) == len(train_seeds)
    assert not {s for op, s in seeds if op == "star"} & set(train_seeds)
