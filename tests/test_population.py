"""Stacked population training (stardomain.population; docs/method.md, "Stacked population training"):
every member is bitwise the model one-at-a-time training gives its seed (weights, metrics, history, stop
rule), whatever population it is trained in, and a killed stacked run resumes to the same files."""

from __future__ import annotations

import pytest
import torch

from stardomain import population as pop
from stardomain.checkpoint import read_model_file
from stardomain.config import Config, deep_merge, validate
from stardomain.data import get_dataset
from stardomain.errors import UserError
from stardomain.files import train_population_to_files, train_to_file
from stardomain.study.executors import units
from stardomain.study.plan import build_plan
from stardomain import training as tr


@pytest.fixture(autouse=True)
def one_thread():
    """The contract holds at one torch thread (both sides run with it; `unstackable` refuses more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _with(cfg: Config, **over) -> Config:
    return validate(Config, deep_merge(cfg.model_dump(), over))


def _solo(cfg: Config, seed: int):
    hist: list[dict] = []
    model, metrics = tr.train(cfg, seed, device="cpu", progress=False, history=hist)
    return model.state_dict(), metrics, hist


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("over", [
    {"train": {"optimizer": {"weight_decay": 1e-3}, "schedule": {"name": "cosine"}}},
    {"model": {"kwargs": {"depth": 2}}, "train": {"optimizer": {"name": "adam", "lr": 0.01},
                                                  "label_smoothing": 0.1}},
    {"data": {"augment": True}, "train": {"epochs": 2}},
])
def test_each_member_is_bitwise_its_solo_run(digits_cfg, over):
    """Weights, final metrics and per-epoch history of every member equal the solo run's exactly (SGD with
    momentum, weight decay and a cosine schedule; Adam, two hidden layers, label smoothing; augmentation
    drawn from each member's own generator)."""
    cfg = _with(digits_cfg, **over)
    seeds = [5, 2, 9]
    for seed, (model, metrics, hist) in zip(seeds, pop.train_population(cfg, seeds, progress=False)):
        sd, m, h = _solo(cfg, seed)
        assert _same(model.state_dict(), sd) and metrics == m and hist == h


def test_a_member_does_not_depend_on_its_population(digits_cfg):
    """Seed 2 alone, with one other seed, and third of four: the same bits every time."""
    runs = [pop.train_population(digits_cfg, seeds, progress=False)
            for seeds in ([2], [2, 9], [7, 1, 2, 5])]
    ones = [r[[0, 0, 2][i]][0].state_dict() for i, r in enumerate(runs)]
    assert _same(ones[0], ones[1]) and _same(ones[0], ones[2])
    assert not _same(runs[1][0][0].state_dict(), runs[1][1][0].state_dict())  # the seeds differ, so do the models


def _rule_cfg(digits_cfg: Config) -> Config:
    """A loss target the seeds 0, 1, 2 meet at different epochs (checked where used), within a 6-epoch cap:
    the lowest training loss any of them has after epoch 2."""
    cfg = _with(digits_cfg, train={"epochs": 6})
    checks = {s: [h["check"]["loss"] for h in _solo(_with(cfg, train={"stop": {"acc": 1.0}}), s)[2]]
              for s in (0, 1, 2)}
    return _with(cfg, train={"stop": {"loss": min(c[1] for c in checks.values())}})


def test_each_member_stops_by_its_own_rule(digits_cfg, tmp_path):
    """Members meet train.stop at different epochs; each stops changing there, and its file's history
    and `fit` record say what the solo run's file says."""
    cfg = _rule_cfg(digits_cfg)
    seeds = [0, 1, 2]
    stacked = train_population_to_files(cfg, seeds, [tmp_path / f"s{s}.safetensors" for s in seeds],
                                        ["source"] * 3, device="cpu", progress=False)
    solo = [train_to_file(cfg, s, tmp_path / f"solo{s}.safetensors", device="cpu", progress=False) for s in seeds]
    assert len({m["fit"]["epochs"] for m in solo}) > 1  # the rule ends them at different epochs
    for a, b in zip(stacked, solo):
        assert a["sha256"] == b["sha256"] and a["fit"] == b["fit"] and a["history"] == b["history"]
        assert a["metrics"] == b["metrics"]


def test_killed_stacked_run_resumes_to_the_same_files(digits_cfg, tmp_path, monkeypatch):
    """Killed when one member has saved one epoch more than the others (and, with a stop rule, members
    may be done): the re-run resumes each from its own state file and writes the solo run's files."""
    cfg = _rule_cfg(digits_cfg)
    seeds = [0, 1, 2]
    outs = [tmp_path / f"m{s}.safetensors" for s in seeds]
    real, calls = pop._finish_epoch, []

    class Killed(Exception):
        pass

    def finish(run, m, epoch, seen):
        if len(calls) == 4:
            raise Killed
        calls.append(m.seed)
        real(run, m, epoch, seen)

    monkeypatch.setattr(pop, "_finish_epoch", finish)
    with pytest.raises(Killed):
        train_population_to_files(cfg, seeds, outs, ["source"] * 3, device="cpu", progress=False)
    monkeypatch.setattr(pop, "_finish_epoch", real)
    assert [tr.load_state(o.with_name(o.name + ".state"))["epoch"] for o in outs] == [2, 1, 1]
    got = train_population_to_files(cfg, seeds, outs, ["source"] * 3, device="cpu", progress=False)
    for s, meta in zip(seeds, got):
        ref = train_to_file(cfg, s, tmp_path / f"ref{s}.safetensors", device="cpu", progress=False)
        assert meta["sha256"] == ref["sha256"] and meta["fit"] == ref["fit"]
        assert (tmp_path / f"m{s}.safetensors.csv").read_text() == (tmp_path / f"ref{s}.safetensors.csv").read_text()
    assert not any(o.with_name(o.name + ".state").exists() for o in outs)


def test_what_cannot_be_stacked_is_named_and_refused(digits_cfg):
    data = get_dataset(digits_cfg.data)
    bn = _with(digits_cfg, model={"kwargs": {"bn": True}})
    assert "BatchNorm1d" in pop.recipe_unstackable(bn, "cpu", data)
    assert "grad_clip" in pop.recipe_unstackable(_with(digits_cfg, train={"grad_clip": 1.0}), "cpu", data)
    assert pop.recipe_unstackable(digits_cfg, "cpu", data) is None
    assert "one torch thread" in pop.recipe_unstackable(digits_cfg, "cpu", data, threads=2)
    with pytest.raises(UserError, match="cannot train stacked: .*BatchNorm1d"):
        pop.train_population(bn, [0, 1], progress=False)


def _study(digits_cfg: Config, mode: str, **model) -> Config:
    return _with(digits_cfg, model={"kwargs": model}, train={"epochs": 1},
                 study={"n_sources": 3, "n_heldouts": 2, "stacked_training": mode, "pairs": ["regular_regular"]})


def test_study_trains_one_recipe_as_populations_split_per_worker(digits_cfg):
    plan = build_plan(_study(digits_cfg, "auto"))
    trains = [t for t in plan.tasks if t.op == "train"]
    assert [len(u) for u in units(trains, 1)] == [5]  # sources and held-outs share the recipe
    assert [[t.key for t in u] for u in units(trains, 2)] == [[t.key for t in trains[:2]], [t.key for t in trains[2:]]]
    assert all(len(u) == 1 for u in units(build_plan(_study(digits_cfg, "never")).tasks, 2))


def test_study_results_do_not_depend_on_stacking(digits_cfg, tmp_path, capsys):
    """The same study stacked, one at a time, and with a recipe that cannot be stacked (BatchNorm: trained
    one at a time under "auto", with the reason on stderr; refused under "always")."""
    from stardomain.study import run_study

    files = {}
    for mode in ("auto", "never"):
        run_study(_study(digits_cfg, mode), tmp_path / mode, progress=False, report=False)
        files[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode / "models").glob("*.safetensors")}
    assert files["auto"] == files["never"] and len(files["auto"]) == 5
    results = {m: (tmp_path / m / "results.json").read_text() for m in ("auto", "never")}
    assert results["auto"].count('"stacked_training": "auto"') == 1  # the config it records: otherwise equal
    assert results["auto"] == results["never"].replace('"stacked_training": "never"', '"stacked_training": "auto"')
    # a killed run's leftovers: two models written but not marked done, one marked but its file lost
    models = sorted((tmp_path / "auto" / "models").glob("*.safetensors"))
    for p in models[:2]:
        p.with_suffix(".json").unlink()
    models[2].unlink()
    kept = {p: p.stat().st_mtime_ns for p in models[:2]}
    run_study(_study(digits_cfg, "auto"), tmp_path / "auto", progress=False, report=False)
    assert {p: p.stat().st_mtime_ns for p in models[:2]} == kept  # reused, not retrained
    assert {p.name: p.read_bytes() for p in models} == files["auto"]
    assert (tmp_path / "auto" / "results.json").read_text() == results["auto"]
    capsys.readouterr()
    run_study(_study(digits_cfg, "auto", bn=True), tmp_path / "bn", progress=False, report=False)
    assert "one model at a time: stacked training handles Flatten, Linear and ReLU" in capsys.readouterr().err
    with pytest.raises(UserError, match="'always', but .*BatchNorm1d"):
        run_study(_study(digits_cfg, "always", bn=True), tmp_path / "bn2", progress=False, report=False)
    assert read_model_file(next((tmp_path / "bn" / "models").glob("source*.safetensors")))[1]["role"] == "source"
