"""Training-phase speed-up of the study with 2 Ray workers against 1, in one process.

The training phase of the default study (10 sources + 5 held-outs, MNIST MLP width 16) runs twice into
fresh folders: on a local Ray cluster with 1 CPU, then with 2 CPUs; every task uses 1 torch thread
(study.cpus_per_task = 1). Worker start-up (importing torch, loading MNIST) counts in both runs. The
two runs must produce bit-identical model files (the executor never changes results).

    .venv/bin/python benchmarks/study.py [--config configs/default.yaml] [--set train.epochs=3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from stardomain.config import load_config
from stardomain.study.executors import RayExecutor
from stardomain.study import build_plan


def train_phase(plan, root: Path, workers: int) -> float:
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t0 = time.perf_counter()
        RayExecutor(num_workers=workers).run(plan, root, progress=False, only={"train"})
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def _spin(_=None) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t


def machine_parallelism() -> float:
    """Control: how much faster 2 pure-Python busy processes finish than 2 runs in a row (ideal 2.0).
    Below 2 means other load on the machine leaves less than 2 cores to this benchmark."""
    import multiprocessing as mp

    one = _spin()
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [0, 1])  # start-up
        t = time.perf_counter()
        pool.map(_spin, [0, 1])
        two = time.perf_counter() - t
    return 2 * one / two


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, ["study.cpus_per_task=1", *args.set])
    plan = build_plan(cfg)
    n = sum(t.op == "train" for t in plan.tasks)
    par_before = machine_parallelism()
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        t1 = train_phase(plan, Path(d1), 1)
        t2 = train_phase(plan, Path(d2), 2)
        busy = [sum(json.loads((Path(d) / t.output).read_text())["timings"]["seconds"]
                    for t in plan.tasks if t.op == "train") for d in (d1, d2)]
        same = all(json.loads((Path(d1) / t.output).read_text())["sha256"] ==
                   json.loads((Path(d2) / t.output).read_text())["sha256"] for t in plan.tasks if t.op == "train")
    par_after = machine_parallelism()
    print(f"training phase: {n} models, {cfg.train.epochs} epochs each")
    print(f"1 Ray worker : {t1:7.1f} s")
    print(f"2 Ray workers: {t2:7.1f} s")
    print(f"speed-up     : {t1 / t2:.2f}x  (target >= 1.6x)")
    print(f"task-seconds / wall (mean concurrency): {busy[0] / t1:.2f} and {busy[1] / t2:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"machine control, 2 busy processes vs 1 (ideal 2.00): {par_before:.2f}x before, {par_after:.2f}x after")
    print(f"identical model files: {same}")


if __name__ == "__main__":
    main()
