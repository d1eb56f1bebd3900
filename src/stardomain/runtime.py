"""Where a computation runs: the one place that decides torch's CPU thread count, and the record of it.

Why it matters: torch's default (one thread per physical core) collapses when those cores are busy with
other processes (the README's first `train` took 189 s instead of ~15 s on a 2-core machine with both
cores loaded), and the thread count changes the order of floating-point reductions, so the same seed
gives different weights at 1 and 2 threads. The choice is therefore explicit, never load-dependent:

    --threads N  >  OMP_NUM_THREADS  >  the scheduler's allocation (SLURM_CPUS_PER_TASK, PBS NCPUS,
    a restricted CPU affinity)  >  1

1 is the default because it is the one setting that is both fast on a busy machine and the same on every
machine (see benchmarks/RESULTS.md, "Busy machine"). Model files record {threads, device, stardomain}.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

from .errors import UserError

MAX_THREADS = 1024
_ALLOC_VARS = ("SLURM_CPUS_PER_TASK", "PBS_NUM_PPN", "NCPUS", "NSLOTS", "LSB_DJOB_NUMPROC")


def _positive(text: str | None) -> int | None:
    try:
        n = int(str(text).strip())
    except (TypeError, ValueError):
        return None
    return n if 1 <= n <= MAX_THREADS else None


def _affinity_allocation() -> int | None:
    """A CPU set smaller than the machine (taskset, cgroup cpusets, batch schedulers) is an allocation."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return mine if mine < (os.cpu_count() or mine) else None


def choose_threads(explicit: int | None = None, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """-> (threads, why): --threads, else OMP_NUM_THREADS, else the scheduler's allocation, else 1."""
    env = os.environ if env is None else env
    if explicit is not None:
        if not 1 <= int(explicit) <= MAX_THREADS:
            raise UserError(f"--threads must be between 1 and {MAX_THREADS} (got {explicit})")
        return int(explicit), "--threads"
    n = _positive(env.get("OMP_NUM_THREADS"))
    if n:
        return n, "OMP_NUM_THREADS"
    for var in _ALLOC_VARS:
        n = _positive(env.get(var))
        if n:
            return n, var
    n = _affinity_allocation()
    if n:
        return n, "CPU affinity"
    return 1, "default"


def use_threads(explicit: int | None = None) -> int:
    """Set torch's intra-op thread count by `choose_threads` (each CLI command calls this once). -> n."""
    import torch

    n, _ = choose_threads(explicit)
    torch.set_num_threads(n)
    return n


def record(device) -> dict:
    """What the metadata and the resume state keep about where a run ran (results depend on it)."""
    import torch

    from ._version import __version__

    return {"threads": torch.get_num_threads(), "device": str(device), "stardomain": __version__}


def warn_if_changed(saved: dict | None, now: dict, what: str = "run") -> bool:
    """One stderr line when a resumed run continues under other threads or another device. -> warned."""
    if not saved:
        return False
    diff = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in ("threads", "device") if saved.get(k) != now.get(k)]
    if not diff:
        return False
    print(f"warning: resuming a {what} started with other settings ({', '.join(diff)}); the result may "
          "differ bitwise from an uninterrupted run", file=sys.stderr)
    return True


def warn_if_study_changed(root, threads: int, device) -> bool:
    """`run` on an existing study folder: one warning when its finished models ran under other threads
    or another device than the tasks still to run will (their results may then differ bitwise)."""
    from pathlib import Path

    from .checkpoint import read_model_meta

    now = {"threads": int(threads), "device": str(device)}
    for path in sorted(Path(root, "models").glob("*.safetensors")):
        saved = (read_model_meta(path) or {}).get("runtime")  # None: unreadable or from an older version
        if saved and warn_if_changed(saved, now, what="study"):
            return True
    return False
