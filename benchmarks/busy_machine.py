"""The README's first command on an idle machine and on one whose cores are all busy with another process.

Runs `stardomain train --config configs/mnist_mlp.yaml --seed 0 --out ...` as a subprocess (the way a
user runs it), with OMP_NUM_THREADS unset so the package's own default applies, first with nothing else
started by this script, then while `--busy` processes (default: one per core) spin on the CPU. The same
for `--threads` values given with --also (e.g. 2: torch's old default on a 2-core machine), capped at
--limit seconds each (torch's multi-threaded default collapses on busy cores; a capped run is reported as
"> limit"). Prints a markdown table: wall seconds per run, the CPU seconds the run used (user + system:
equal idle and busy means the slowdown is only the CPU share the scheduler gives it, not threads spinning
on each other), and the busy/idle ratio of wall times. A single-threaded run next to k spinning
processes on c < k + 1 cores gets c / (k + 1) of a core: 1.5x is the floor for 2 spinners on 2 cores.

    .venv/bin/python benchmarks/busy_machine.py [--busy 2] [--also 2] [--limit 120]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _spin() -> None:
    while True:
        pass


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_train(threads: int | None, limit: float) -> tuple[float | None, float]:
    """(wall seconds of the README's first command or None when stopped at `limit`, its CPU seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "stardomain", "train", "--config", str(ROOT / "configs/mnist_mlp.yaml"),
               "--seed", "0", "--out", f"{tmp}/m0.safetensors"] + (["--threads", str(threads)] if threads else [])
        t0, c0 = time.perf_counter(), _child_cpu()
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return None, float("nan")  # a killed child's CPU time is not collected
        return time.perf_counter() - t0, _child_cpu() - c0


def busy(n: int):
    procs = [mp.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes (default: cores)")
    ap.add_argument("--also", type=int, nargs="*", default=[2], help="--threads values also measured")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds before a run is stopped")
    args = ap.parse_args()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"cores {os.cpu_count()}, load average before {os.getloadavg()[0]:.2f}, {when}", flush=True)
    rows = []
    for threads in [None, *args.also]:
        idle, idle_cpu = run_train(threads, args.limit)
        procs = busy(args.busy)
        try:
            time.sleep(1.0)
            loaded, loaded_cpu = run_train(threads, args.limit)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join()
        label = "default (no --threads, OMP_NUM_THREADS unset)" if threads is None else f"--threads {threads}"
        fmt = (lambda s: f"> {args.limit:.0f}" if s is None else f"{s:.1f}")
        ratio = "n/a" if idle is None or loaded is None else f"{loaded / idle:.2f}x"
        rows.append(f"| {label} | {fmt(idle)} | {idle_cpu:.1f} | {fmt(loaded)} | {loaded_cpu:.1f} | {ratio} |")
        print(rows[-1], flush=True)
    print(f"\n| threads | idle (s) | idle CPU (s) | {args.busy} cores busy (s) | busy CPU (s) | busy / idle |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
