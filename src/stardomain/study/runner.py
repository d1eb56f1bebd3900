"""Running a whole study: lock the folder, execute what is not cached, collect results.json, write the
report. The pieces it runs live beside it (plan, tasks, executors, results, lock)."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from ..checkpoint import atomic_write_json
from ..config import Config
from ..data import get_dataset
from ..errors import UserError
from ..population import recipe_unstackable
from ..report import write_report
from .executors import get_executor
from .folder import check_study_folder, mark_study_folder
from .lock import study_lock
from .plan import Plan, build_plan
from .results import collect
from .tasks import _read_json

def _timing_table(plan: Plan, root: Path) -> dict:
    out = {}
    for t in plan.tasks:
        rec = _read_json(root / t.output) or {}
        out[t.label] = {"op": t.op, **(rec.get("timings") or rec.get("timings_") or {})}
    by_op: dict[str, float] = {}
    for v in out.values():
        by_op[v["op"]] = by_op.get(v["op"], 0.0) + float(v.get("seconds", 0.0))
    return {"tasks": out, "total_seconds_by_op": by_op}


def run_study(cfg: Config, out: str | Path, *, executor: str = "local", ray_address: str | None = None,
              progress: bool | None = None, report: bool = True, num_workers: int | None = None,
              force: bool = False) -> dict:
    """Plan, execute what is not cached, collect, write results.json (+ timings.json, report). The folder is
    locked while this runs (`lock.study_lock`): a second run on it stops with a UserError naming the holder."""
    ex = get_executor(executor, address=ray_address, num_workers=num_workers)
    plan = build_plan(cfg)
    data = get_dataset(cfg.data)  # a missing data set stops here, before any work
    if cfg.study.stacked_training == "always":
        reason = recipe_unstackable(cfg, cfg.study.device, data, cfg.study.cpus_per_task)
        if reason:
            raise UserError(f"study.stacked_training is 'always', but {reason}")
    root = Path(out)
    check_study_folder(root, force)
    root.mkdir(parents=True, exist_ok=True)
    mark_study_folder(root)
    with study_lock(root):
        return _run_locked(cfg, plan, ex, executor, root, progress, report)


def _run_locked(cfg: Config, plan: Plan, ex, executor: str, root: Path, progress: bool | None, report: bool) -> dict:
    """run_study's work, with the folder's lock held."""
    atomic_write_json(root / "plan.json", plan.to_json())
    t0 = time.perf_counter()
    ex.run(plan, root, progress=progress)
    wall = time.perf_counter() - t0
    results = collect(cfg, plan, root)
    atomic_write_json(root / "results.json", results)
    atomic_write_json(root / "timings.json", {"executor": executor, "wall_seconds_this_run": wall,
                                              **_timing_table(plan, root)})
    if report:
        bma_raw = None
        if plan.layout.get("bma"):
            bma_raw = (_read_json(root / plan.by_key()[plan.layout["bma"]].output) or {}).get("raw")
        write_report(results, root, timings=_read_json(root / "timings.json"), bma_raw=bma_raw)
    return results


def default_config_path() -> Path:
    """The embedded default study (MNIST, MLP width 16), shipped inside the package."""
    return Path(str(files("stardomain") / "configs" / "default.yaml"))

