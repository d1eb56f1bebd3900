"""The README's first command on an idle machine and on one whose cores are all busy with another process.

Runs `stardomain train --config configs/mnist_mlp.yaml --seed 0 --out ...` as a subprocess (the way a
user runs it), with OMP_NUM_THREADS unset so the package's own default applies, in interleaved rounds:

- idle: nothing started by this script;
- busy, other session: `--busy` processes (default: one per core) spin on the CPU, started in a session
  of their own (`setsid`), as a job started from another terminal, by another user or by a scheduler is;
- busy, same session: the same spinners as children of this script, in its session.

The two busy cases differ where the kernel groups processes by session before sharing the CPU
(`/proc/sys/kernel/sched_autogroup_enabled` = 1, the default of most desktop and many server kernels):
then the command's session gets its share of the machine whatever the other session runs, and a
single-threaded command next to 2 spinners on 2 cores keeps a whole core. In one session (or with
autogroup off) the scheduler shares the cores among the 3 runnable threads: 2/3 of a core each, so
1.5x is the floor for a single thread there, and the command's CPU seconds show whether it lost more.

Prints one row per sample (wall and CPU seconds of the command, the 1-minute load average and the
runnable count of /proc/loadavg just before, the other processes using a CPU) and the medians.

    .venv/bin/python benchmarks/busy_machine.py [--busy 2] [--rounds 3] [--also 2] [--limit 120]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = ("import multiprocessing as mp, sys\n"
        "def spin():\n    while True: pass\n"
        "ps = [mp.Process(target=spin) for _ in range(int(sys.argv[1]))]\n"
        "[p.start() for p in ps]\n[p.join() for p in ps]\n")


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _loadavg() -> str:
    f = Path("/proc/loadavg").read_text().split()
    return f"{f[0]} ({f[3].split('/')[0]} runnable)"


def _others() -> str:
    """Processes other than ours using a CPU now (what this script cannot control)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,comm", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return "?"
    mine = {os.getpid()}
    rows = []
    for line in out:
        pid, ppid, pcpu, comm = line.split(None, 3)
        if int(pid) in mine or int(ppid) in mine or float(pcpu) < 5:
            continue
        rows.append(f"{comm} {float(pcpu):.0f}%")
    return ", ".join(rows[:4]) or "none"


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


class Spinners:
    """`n` processes spinning on the CPU: in a session of their own (`own_session`) or in this script's."""

    def __init__(self, n: int, own_session: bool):
        self.p = subprocess.Popen([sys.executable, "-c", SPIN, str(n)], start_new_session=own_session)
        self.own = own_session
        time.sleep(1.0)

    def autogroup(self) -> str:
        try:
            return Path(f"/proc/{self.p.pid}/autogroup").read_text().split()[0]
        except OSError:
            return "?"

    def stop(self) -> None:
        if self.own:
            os.killpg(self.p.pid, signal.SIGTERM)  # the spinners are the session's only processes
        else:
            for child in Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split():
                os.kill(int(child), signal.SIGTERM)
            self.p.terminate()
        self.p.wait()


CASES = (("idle", None), ("busy, other session", True), ("busy, same session", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes (default: cores)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three cases")
    ap.add_argument("--also", type=int, nargs="*", default=[], help="--threads values also measured")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds before a run is stopped")
    args = ap.parse_args()
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip()
    except OSError:
        autogroup = "absent"
    print(f"cores {os.cpu_count()}, sched_autogroup_enabled {autogroup}, this script in "
          f"{Path('/proc/self/autogroup').read_text().split()[0] if autogroup == '1' else '-'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n", flush=True)
    print("| threads | case | wall (s) | CPU (s) | CPU / wall | load before | others using a CPU before |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    walls: dict[tuple, list[float]] = {}
    for threads in [None, *args.also]:
        label = "default" if threads is None else f"--threads {threads}"
        for _ in range(args.rounds):
            for case, own in CASES:
                load, others = _loadavg(), _others()
                spin = Spinners(args.busy, own) if own is not None else None
                try:
                    wall, cpu = run_train(threads, args.limit)
                finally:
                    if spin is not None:
                        spin.stop()
                walls.setdefault((label, case), []).append(float("inf") if wall is None else wall)
                shown = f"> {args.limit:.0f}" if wall is None else f"{wall:.1f}"
                share = "–" if wall is None else f"{cpu / wall:.2f}"
                print(f"| {label} | {case} | {shown} | {cpu:.1f} | {share} | {load} | {others} |", flush=True)
    print("\n| threads | case | median wall (s) | median / idle median |\n|---|---|---|---|")
    for (label, case), ws in walls.items():
        med, idle = statistics.median(ws), statistics.median(walls[(label, "idle")])
        print(f"| {label} | {case} | {med:.1f} | {med / idle:.2f}x |")


if __name__ == "__main__":
    main()
