"""Executors for study plans: `local` (this machine: in-process, or a pool of `workers` processes) and
`ray` (one Ray task per study task).

Both run the same `study.execute(task, root)` on the same plan and cache folder, so results do not depend
on the executor; they differ only in where and how many tasks run at once (`workers`, the one meaning of
`--workers` for every executor: at most that many tasks at once, each with `study.cpus_per_task` threads).
Tasks whose artifact already exists are skipped, which is what makes a killed study resume.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UserError
from .plan import Plan, Task
from .tasks import execute, execute_unit, is_done


class _Progress:
    """The study's progress where stderr goes: one tqdm bar (tasks done/total, the current task, elapsed
    time, an estimate) on a terminal; when stderr is a file or a pipe, a plain line at most every
    `train.PLAIN_EVERY_S` seconds as tasks start and finish (and a closing one if any was printed), so a
    log shows the study moving; nothing when `enabled` is False."""

    def __init__(self, total: int, done: int, enabled: bool | None):
        self.plain = enabled is None and not sys.stderr.isatty()
        self.total, self.done0, self.done, self.text = total, done, done, ""
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.bar = tqdm(total=total, initial=done, desc="study", unit="task", dynamic_ncols=True,
                        disable=True if self.plain else (None if enabled is None else not enabled),
                        bar_format="{desc}: {n_fmt}/{total_fmt} tasks |{bar}| {elapsed}<{remaining} {postfix}")

    def current(self, text: str) -> None:
        self.text = text
        self.bar.set_postfix_str(text[:60])
        self._line(running=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        self._line()

    def _line(self, running: bool = False, closing: bool = False) -> None:
        from ..training import PLAIN_EVERY_S

        now = time.monotonic()
        if not self.plain or (now - self.last < PLAIN_EVERY_S and not (closing and self.printed)):
            return
        self.last, self.printed = now, True
        ran = self.done - self.done0
        eta = f"  ETA {(now - self.t0) / ran * (self.total - self.done):.0f}s" if ran else ""
        what = f"  running: {self.text[:80]}" if running else ""
        print(f"study: {self.done}/{self.total} tasks  {now - self.t0:.0f}s{eta}{what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._line(closing=True)
        self.bar.close()


def pending(plan: Plan, root: Path) -> list[Task]:
    tasks = plan.by_key()
    return [t for t in plan.tasks if not is_done(t, root, tasks)]


def ready(waiting: dict[str, Task], busy: set[str]) -> list[Task]:
    """The waiting tasks none of whose inputs is still waiting or running (plan order kept)."""
    return [t for t in waiting.values() if not any(d in waiting or d in busy for d in t.deps)]


def units(todo: list[Task], workers: int) -> list[list[Task]]:
    """The pending tasks as units of work, plan order kept: the train tasks of one recipe (config, device,
    threads), unless study.stacked_training is "never", form one population (tasks.execute_unit trains it
    stacked), split into `workers` consecutive parts so every worker trains one; any other task is a unit of
    its own. Members are bitwise their solo models, so how a population is split never changes a result."""
    groups: dict[str, list[Task]] = {}
    order: list[str | Task] = []
    for t in todo:
        if t.op != "train" or t.params.get("stacked", "never") == "never":
            order.append(t)
            continue
        gid = json.dumps([t.params["config"], t.params.get("device"), t.cpus, t.gpus], sort_keys=True, default=str)
        if gid not in groups:
            groups[gid] = []
            order.append(gid)
        groups[gid].append(t)
    out: list[list[Task]] = []
    for item in order:
        if isinstance(item, Task):
            out.append([item])
            continue
        members = groups[item]
        parts = min(workers, len(members))
        bounds = [round(i * len(members) / parts) for i in range(parts + 1)]
        out += [members[a:b] for a, b in zip(bounds, bounds[1:])]
    return out


def ready_units(waiting: list[list[Task]], busy: set[str]) -> list[list[Task]]:
    """`ready` for units: those none of whose tasks needs a task outside the unit still waiting or running."""
    waiting_keys = {t.key for u in waiting for t in u}
    return [u for u in waiting
            if not any((d in waiting_keys or d in busy) and d not in {t.key for t in u} for t in u for d in t.deps)]


TASKS_PER_WORKER = 16


class LocalExecutor:
    """This machine. `workers` = 1: every task in this process, in plan order. `workers` > 1: a pool of
    that many processes (spawned, so no thread pool state is forked), each task submitted once its inputs
    exist. Every task fixes its own threads and seed and writes atomically under its key, so the results
    are byte-identical to the serial run's. A task that fails stops new submissions; the running ones
    finish and keep their work, then the failure is raised (a UserError as itself)."""

    name = "local"

    def __init__(self, workers: int = 1):
        if int(workers) < 1:
            raise UserError(f"--workers must be at least 1 (got {workers})")
        self.workers = int(workers)

    def run(self, plan: Plan, root: str | Path, progress: bool | None = None, only: set[str] | None = None) -> None:
        root = Path(root)
        todo = [t for t in pending(plan, root) if only is None or t.op in only]
        bar = _Progress(len(plan.tasks), len(plan.tasks) - len(todo), progress)
        try:
            work = units(todo, self.workers)
            if self.workers == 1 or len(work) <= 1:
                for unit in work:  # plan order is topological
                    bar.current(_label(unit))
                    execute_unit(unit, root)
                    bar.advance(len(unit))
            else:
                self._pool(work, root, bar)
        finally:
            bar.close()

    def _pool(self, work: list[list[Task]], root: Path, bar: _Progress) -> None:
        import multiprocessing as mp

        waiting = list(work)
        running: dict = {}  # future -> unit
        failure: BaseException | None = None
        # a worker is replaced after TASKS_PER_WORKER units: memory torch never returns (each TorchScript freeze
        # of the fused evaluation keeps 4-7 MB) stays bounded, for ~2 s of start-up per replacement
        with ProcessPoolExecutor(max_workers=min(self.workers, len(work)), mp_context=mp.get_context("spawn"),
                                 max_tasks_per_child=TASKS_PER_WORKER) as pool:
            try:
                while waiting or running:
                    if failure is None:
                        for u in ready_units(waiting, {t.key for r in running.values() for t in r}):
                            if len(running) >= self.workers:
                                break
                            running[pool.submit(execute_unit, u, str(root))] = u
                            waiting.remove(u)
                    if not running:
                        if failure is not None:
                            break
                        raise UserError("study plan has tasks whose inputs are never produced (a cycle?)")
                    bar.current(", ".join(_label(u) for u in list(running.values())[:2])
                                + (f" (+{len(running) - 2})" if len(running) > 2 else ""))
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        u = running.pop(fut)
                        try:
                            fut.result()
                        except BrokenProcessPool:
                            raise UserError(f"study task {_label(u)!r} failed: a worker process died (killed, or "
                                            "out of memory?); finished work is kept, re-run to resume it") from None
                        except Exception as e:  # let the others finish: their work is kept
                            failure = failure or e
                            continue
                        bar.advance(len(u))
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        if failure is not None:
            raise failure


def _label(unit: list[Task]) -> str:
    return unit[0].label if len(unit) == 1 else f"{unit[0].label} .. {unit[-1].label}"


def _ray_execute(task_dict: dict, root: str) -> str:
    return execute(Task(**{**task_dict, "deps": tuple(task_dict["deps"])}), root)


class RayExecutor:
    """Each study task becomes `ray.remote(num_cpus=task.cpus, num_gpus=task.gpus)`; a task is submitted when
    its inputs exist, at most `num_workers` at once when given (else as many as the cluster's resources
    allow). Joins the cluster at `address` if given, else starts a local one (`num_workers` tasks' CPUs,
    default all).
    Tasks read and write the study folder directly, so on a multi-machine cluster it must be on a file
    system every node mounts at the same path.

    A task whose worker process or node dies is retried (up to `MAX_RETRIES` times): tasks are idempotent,
    since every write is atomic and keyed, and a model task resumes from its `.state` file. An exception a
    task raises is not retried (it would raise again)."""

    name = "ray"
    MAX_RETRIES = 3

    def __init__(self, address: str | None = None, num_workers: int | None = None):
        self.address = address
        self.num_workers = num_workers

    def _init(self, cpus_per_task: int = 1):
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs Ray: pip install 'stardomain[ray]'") from None
        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address:
                try:
                    ray.init(address=self.address, **kw)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise UserError(f"cannot join the Ray cluster at {self.address}: {e}") from None
            else:
                ray.init(num_cpus=self.num_workers * cpus_per_task if self.num_workers else os.cpu_count(), **kw)
        return ray

    def run(self, plan: Plan, root: str | Path, progress: bool | None = None, only: set[str] | None = None) -> None:
        root = Path(root)
        todo = [t for t in pending(plan, root) if only is None or t.op in only]
        if not todo:
            return
        ray = self._init(max(t.cpus for t in todo))
        need_gpu = max(t.gpus for t in todo)
        have_gpu = ray.cluster_resources().get("GPU", 0)
        if need_gpu > have_gpu:
            raise UserError(f"study tasks ask for {need_gpu} GPU(s) each but the Ray cluster has {have_gpu}; "
                            "set study.gpus_per_task=0 or join a cluster with GPUs (--ray-address)")
        remote = ray.remote(_ray_execute)
        waiting = {t.key: t for t in todo}
        labels = {t.key: t.label for t in todo}
        running: dict = {}
        bar = _Progress(len(plan.tasks), len(plan.tasks) - len(todo), progress)
        try:
            while waiting or running:
                for t in ready(waiting, set(running.values())):
                    if self.num_workers and len(running) >= self.num_workers:
                        break
                    ref = remote.options(num_cpus=t.cpus, num_gpus=t.gpus, max_retries=self.MAX_RETRIES,
                                         retry_exceptions=False, name=t.label[:60]).remote(
                                             asdict(t), str(root.resolve()))
                    running[ref] = t.key
                    del waiting[t.key]
                if not running:
                    raise UserError("study plan has tasks whose inputs are never produced (a cycle?)")
                bar.current(", ".join(labels[k] for k in list(running.values())[:2])
                            + (f" (+{len(running) - 2})" if len(running) > 2 else ""))
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    key = running.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as e:  # a RayTaskError wraps the worker's exception
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, UserError):
                            raise UserError(str(cause)) from None
                        if isinstance(e, _system_failures(ray)):
                            raise UserError(f"study task {labels[key]!r} failed: its Ray worker died in all "
                                            f"{1 + self.MAX_RETRIES} attempts ({type(e).__name__}); finished work "
                                            "is kept, re-run to resume it") from None
                        raise
                    bar.advance()
        finally:
            bar.close()
            for ref in list(running):
                ray.cancel(ref, force=True)

    def shutdown(self):
        import ray

        if ray.is_initialized() and not self.address:
            ray.shutdown()


def _system_failures(ray) -> tuple[type, ...]:
    """What Ray raises when a task's process or node died (retried before it reaches us)."""
    ex = ray.exceptions
    return tuple(getattr(ex, n) for n in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError") if hasattr(ex, n))


def get_executor(name: str, *, address: str | None = None, num_workers: int | None = None):
    """`num_workers`: tasks run at once (local default 1; ray default: what the cluster's CPUs allow)."""
    if name == "local":
        if address:
            raise UserError("--ray-address only applies with --executor ray")
        return LocalExecutor(1 if num_workers is None else num_workers)
    if name == "ray":
        return RayExecutor(address, num_workers)
    raise UserError(f"unknown executor {name!r}; choose local or ray")


def timed_run(executor, plan: Plan, root: str | Path, only: set[str] | None = None) -> float:
    """Wall seconds of one executor run (benchmarks)."""
    t0 = time.perf_counter()
    executor.run(plan, root, progress=False, only=only)
    return time.perf_counter() - t0
