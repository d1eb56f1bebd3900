"""Executing one task of a plan (any executor calls `execute`), and whether a task is already done.

Every task is deterministic on CPU and writes atomically, so a run killed at any point resumes with the
same command and ends with the same results. Pair records also store their inputs' weight sha256 and are
recomputed if those no longer match the model files they were measured on.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..averaging import BMASettings
from ..barriers import BarrierSettings
from ..barriers import measure as measure_barrier
from ..checkpoint import (atomic_write_json, build_from_meta, data_from_meta, load_model, read_model_file,
                          read_pair, save_model)
from ..config import Config, validate
from ..data import first_inputs, get_dataset, sample_examples
from ..errors import UserError
from ..interpolate import average, recalibrate_bn
from ..merge import merge_many
from ..population import recipe_unstackable
from ..permute import align, apply_permutation, check_equivalence, identity, spec_for, weight_matching
from ..safety import allowed, config_factories
from ..files import bma_files, star_to_file, train_population_to_files, train_to_file
from ..training import evaluate_splits, model_meta
from ..utils import TIMING_KEYS, json_safe, resolve_device
from .plan import _MODEL_OPS, Task

def _record_json(obj: Any) -> Any:
    """A record as plain JSON without its timing fields (they vary between runs and live in timings.json);
    ±inf kept as ±1e308 so an unbounded barrier keeps its sign."""
    return json_safe(obj, drop_timings=True, infinity=1e308)


def _timings(obj: Any, prefix: str = "") -> dict[str, float]:
    """The timing fields `_record_json` drops (but `*_time`), flattened, for timings.json."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{prefix}{k}"
            if (str(k) in TIMING_KEYS or str(k).endswith("_seconds")) and isinstance(v, (int, float)):
                out[name] = float(v)
            elif isinstance(v, dict):
                out.update(_timings(v, name + "."))
    return out


def _read_json(path: Path) -> dict | None:
    """A record of the study folder; None when it is missing, unreadable or not a regular file (a FIFO
    planted in a shared folder is not waited on)."""
    try:
        if not path.is_file():
            return None
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def is_done(task: Task, root: Path, plan_tasks: dict[str, Task] | None = None) -> bool:
    """Finished and still valid: the marker exists and (for pairs) was measured on today's model files."""
    rec = _read_json(root / task.output)
    if rec is None or rec.get("key") != task.key:
        return False
    if task.op in _MODEL_OPS:
        return _model_intact(root / f"models/{task.params['name']}.safetensors", rec.get("sha256"))
    if task.op == "pair" and plan_tasks is not None:
        for side, dep in zip("ab", task.deps):
            side_rec = _read_json(root / plan_tasks[dep].output) if dep in plan_tasks else None
            if side_rec is None or side_rec.get("sha256") != rec.get(f"sha256_{side}"):
                return False
    return True


def _model_intact(path: Path, sha256: str | None) -> bool:
    """A finished model file is reused only if it still verifies (its digest and weights' sha256) and is
    the one its marker recorded; otherwise it is rebuilt, and stderr says why."""
    if not path.is_file():
        return False
    try:
        _, meta = read_model_file(path)
    except UserError as e:
        print(f"warning: {e}; rebuilding it", file=sys.stderr)
        return False
    if meta["sha256"] != sha256:
        print(f"warning: {path} is not the model its task recorded (sha256 {str(sha256)[:12]}...); rebuilding it",
              file=sys.stderr)
        return False
    return True


def _config(params: dict) -> Config:
    return validate(Config, params["config"], "study task config")


def _model_metrics(model, cfg: Config) -> dict:
    return evaluate_splits(model, get_dataset(cfg.data), cfg.train.eval_batch_size)


def _finish_model(task: Task, root: Path, meta: dict, model=None, cfg: Config | None = None,
                  info: dict | None = None, seconds: float = 0.0) -> None:
    m = meta.get("metrics") or {}
    if not all(isinstance(m.get(s), dict) and "loss" in m[s] and "acc" in m[s] for s in ("train", "test")):
        if model is None:
            model, _ = load_model(root / f"models/{task.params['name']}.safetensors")
        m = _model_metrics(model, cfg or _config(task.params))
    side = {"key": task.key, "op": task.op, "label": task.label, "role": meta.get("role"),
            "seed": meta.get("seed"), "file": f"models/{task.params['name']}.safetensors",
            "sha256": meta["sha256"], "metrics": {s: {"loss": m[s]["loss"], "acc": m[s]["acc"]}
                                                  for s in ("train", "test")},
            "fit": _record_json(meta.get("fit")), "info": _record_json(info or {}),
            "timings": {"seconds": seconds, **_timings(info or {})}}
    atomic_write_json(root / task.output, side)


def _existing_model(path: Path) -> dict | None:
    """A model file a killed run wrote before its marker: reuse it (it is fully written or absent)."""
    if not path.is_file():
        return None

    try:
        return read_model_file(path)[1]
    except UserError:
        return None


def _model_task(task: Task, root: Path, make: Callable[[dict, Path], dict],
                info: Callable[[dict], dict | None] = lambda meta: None) -> None:
    """A task whose artifact is a model file: reuse the file a killed run finished (it is written whole or
    not at all), else `make(params, out) -> metadata`; then write the marker that says the task is done."""
    out = root / f"models/{task.params['name']}.safetensors"
    t0 = time.perf_counter()
    meta = _reusable_model(task, root) or make(task.params, out)
    _finish_model(task, root, meta, info=info(meta), seconds=time.perf_counter() - t0)


def _reusable_model(task: Task, root: Path) -> dict | None:
    """The metadata of the model file a killed run of `task` finished, or None when it must be made."""
    meta = _existing_model(root / f"models/{task.params['name']}.safetensors")
    done = _read_json(root / task.output) or {}
    if meta is not None and done.get("key") == task.key and meta["sha256"] != done.get("sha256"):
        return None  # a valid model file, but not the one this task made: rebuilt
    return meta


def _run_train(task: Task, root: Path) -> None:
    _model_task(task, root, lambda p, out: train_to_file(_config(p), p["seed"], out, role=p["role"],
                                                         device=p.get("device", "auto"), progress=False))


def _run_star(task: Task, root: Path) -> None:
    def make(p: dict, out: Path) -> dict:
        meta = star_to_file(_config(p), [str(root / s) for s in p["sources"]], out, seed=p["seed"],
                            device=p.get("device", "auto"), progress=False)
        return _existing_model(out) or meta

    _model_task(task, root, make, info=lambda meta: {k: v for k, v in meta.items()
                                                     if k in ("star", "starlight", "info", "alignment")})


def _run_average(task: Task, root: Path) -> None:
    """The "would any centre do?" baseline: the sources aligned to the first one, averaged, BN recalibrated."""
    def make(p: dict, out: Path) -> dict:
        cfg = _config(p)
        data = get_dataset(cfg.data)
        model, _ = load_model(root / p["sources"][0])
        sds = [read_model_file(root / s)[0] for s in p["sources"]]
        aligned = [sds[0]]
        if p["align"] and len(sds) > 1:
            ex = first_inputs(data.train)
            aligned += [align(model, sds[0], sd, example_input=ex, seed=p["seed"])[0] for sd in sds[1:]]
        else:
            aligned = sds
        model.load_state_dict(average(aligned))
        recalibrate_bn(model, data.train, p["batch_size"], p["bn_batches"])
        return save_model(out, model.state_dict(), model_meta(
            cfg, data, p["seed"], "merged", metrics=_model_metrics(model, cfg), device="cpu",
            merge={"method": "aligned_average", "sources": p["sources"], "align": p["align"]}))

    _model_task(task, root, make)


def _run_merge(task: Task, root: Path) -> None:
    """The MergeMany centre: sources aligned to the first (as `average`), then jointly re-aligned to the
    leave-one-out mean round by round (stardomain.merge), averaged, BN recalibrated."""
    def make(p: dict, out: Path) -> dict:
        cfg = _config(p)
        data = get_dataset(cfg.data)
        model, _ = load_model(root / p["sources"][0])
        ex = first_inputs(data.train)
        spec = spec_for(model, ex)
        sds = [read_model_file(root / s)[0] for s in p["sources"]]
        start = [identity(spec)] + [weight_matching(spec, sds[0], sd, seed=p["seed"])[0] for sd in sds[1:]]
        centre, perms, info = merge_many(spec, sds, start=start, rounds=p["rounds"], seed=p["seed"])
        info["equivalence_error_max"] = max(check_equivalence(model, sd, apply_permutation(spec, sd, pm), ex)
                                            for sd, pm in zip(sds, perms))
        model.load_state_dict(centre)
        recalibrate_bn(model, data.train, p["batch_size"], p["bn_batches"])
        return save_model(out, model.state_dict(), model_meta(
            cfg, data, p["seed"], "merged", metrics=_model_metrics(model, cfg), device="cpu",
            merge={"sources": p["sources"], **info}))

    _model_task(task, root, make, info=lambda meta: meta.get("merge") or {})


def _run_pair(task: Task, root: Path) -> None:
    p = task.params
    ev = p["eval"]
    t0 = time.perf_counter()
    sd_a, meta_a, sd_b, meta_b = read_pair(root / p["a"], root / p["b"])
    data = sample_examples(data_from_meta(meta_a, str(root / p["a"])), ev.get("examples"), p["seed"])
    device = resolve_device(p.get("device", "auto"))
    model = build_from_meta(meta_a, str(root / p["a"]), weights=sd_a).to(device)
    settings = BarrierSettings(points=ev["points"], align=ev.get("variant", ev["align"]), seed=p["seed"],
                               bn_batches=ev["bn_batches"], temperature=ev.get("temperature", False),
                               temperature_fraction=ev.get("temperature_fraction", 0.2),
                               align_method=ev.get("align_method", "weight"), learned=ev.get("learned"))
    rec = measure_barrier(model, sd_a, sd_b, data, settings, example_input=first_inputs(data.train), device=device)
    out = {"key": task.key, "a": p["a_label"], "b": p["b_label"], "a_file": p["a"], "b_file": p["b"],
           "sha256_a": meta_a["sha256"], "sha256_b": meta_b["sha256"], **_record_json(rec),
           "timings_": {"seconds": time.perf_counter() - t0, **_timings(rec)}}
    atomic_write_json(root / task.output, out)


def _run_bma(task: Task, root: Path) -> None:
    p = task.params
    t0 = time.perf_counter()
    res = bma_files(str(root / p["star"]), [str(root / s) for s in p["sources"]],
                    BMASettings(k=p["k"], seed=p["seed"]), device=p.get("device", "auto"))
    files = (res.get("_info") or {}).get("files") or {}
    for entry in [files.get("star"), *(files.get("sources") or [])]:
        if isinstance(entry, dict) and "path" in entry:  # relative: results must not depend on the folder
            entry["path"] = str(Path(entry["path"]).resolve().relative_to(root.resolve()))
    atomic_write_json(root / task.output, {"key": task.key, "result": _record_json(res), "raw": json_safe(res),
                                           "timings_": {"seconds": time.perf_counter() - t0, **_timings(res)}})


_OPS = {"train": _run_train, "star": _run_star, "average": _run_average, "merge": _run_merge, "pair": _run_pair,
        "bma": _run_bma}


CRASH_ENV = "STARDOMAIN_TEST_CRASH_ONCE"


def _test_crash_once(task: Task) -> None:
    """Tests of fault tolerance only: with STARDOMAIN_TEST_CRASH_ONCE=OP:DIR in the environment (Ray workers
    inherit it), the first process to start a task of op OP creates DIR/crashed-OP and kills itself with
    SIGKILL, as if the machine had killed the worker; every later attempt runs normally."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or spec.split(":", 1)[0] != task.op:
        return
    try:
        os.close(os.open(os.path.join(spec.split(":", 1)[1], f"crashed-{task.op}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def execute(task: Task, root: str | Path) -> str:
    """Run one task in this process (any executor calls this). Deterministic: fixed torch threads and a
    global RNG seeded from the task key, so the result never depends on what ran before in the process."""
    _test_crash_once(task)
    _in_task(task, lambda: _OPS[task.op](task, Path(root)))
    return task.key


def _in_task(task: Task, run: Callable[[], None]) -> None:
    """`run()` with the task's threads, a global RNG seeded from its key and its config's factories trusted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(task.cpus)))
    # The study config is the user's own: its factories may be imported from the study's model files
    # (in whatever process runs the task); a factory only a file names is still refused.
    trusted = config_factories(task.params.get("config")) + list(task.params.get("allow") or [])
    try:
        with torch.random.fork_rng(devices=[]), allowed(trusted):
            torch.manual_seed(int(task.key[:8], 16))
            run()
    finally:
        torch.set_num_threads(threads)


def execute_unit(tasks: list[Task], root: str | Path) -> list[str]:
    """One task (`execute`), or train tasks of one recipe (executors.units) trained as one stacked population
    (stardomain.population) when study.stacked_training and the recipe allow, else one at a time. Stacked
    members are bitwise their solo models: each file and marker is what `execute` writes for its task."""
    if len(tasks) == 1:
        return [execute(tasks[0], root)]
    root = Path(root)
    for t in tasks:
        _test_crash_once(t)
    todo = []
    for t in tasks:
        meta = _reusable_model(t, root)
        if meta is None:
            todo.append(t)
        else:
            _finish_model(t, root, meta)
    if len(todo) == 1:
        execute(todo[0], root)
    elif todo:
        _in_task(todo[0], lambda: _train_stacked(todo, root) if _stacking(todo[0]) else
                 [execute(t, root) for t in todo])
    return [t.key for t in tasks]


def _stacking(task: Task) -> bool:
    """Whether a train task's recipe is trained stacked: study.stacked_training, and whether the recipe
    allows it (under "auto", the reason it does not goes to stderr; under "always" it is an error)."""
    mode = task.params.get("stacked", "never")
    if mode == "never":
        return False
    reason = recipe_unstackable(_config(task.params), task.params.get("device", "auto"))
    if reason and mode == "always":
        raise UserError(f"study.stacked_training is 'always', but {reason}")
    if reason:
        print(f"study: training {task.label} and its recipe one model at a time: {reason}", file=sys.stderr)
    return reason is None


def _train_stacked(tasks: list[Task], root: Path) -> None:
    p = tasks[0].params
    t0 = time.perf_counter()
    metas = train_population_to_files(_config(p), [t.params["seed"] for t in tasks],
                                      [root / f"models/{t.params['name']}.safetensors" for t in tasks],
                                      [t.params["role"] for t in tasks], device=p.get("device", "auto"), progress=False)
    share = (time.perf_counter() - t0) / len(tasks)  # the population's time, shared equally
    for t, meta in zip(tasks, metas):
        _finish_model(t, root, meta, seconds=share)

