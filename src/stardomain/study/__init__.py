"""The star-domain study, end to end: config -> plan (tasks as plain data) -> cached artifacts -> results.

By concern: `plan` (keys, Task, Plan, build_plan), `tasks` (running one task, is_done), `results`
(collect: summaries, tests, verdict blocks), `executors` (local pool, Ray), `lock` (one run per folder),
`runner` (the whole study: run_study). Every artifact lives under
a key that is the sha256 of exactly what determines it; re-running skips finished artifacts, and a
changed setting changes only the keys that depend on it. All writes are atomic and every task is
deterministic on CPU, so a run killed at any point resumes with the same command and ends with the same
`results.json`.

`results.json` holds no timings (they vary run to run); those go to `timings.json`.
"""

from __future__ import annotations

from .plan import CACHE_VERSION, Plan, Task, build_plan, deep_merge, key_of
from .results import RESULTS_FORMAT, collect, summarize_pairs
from .runner import check_study_folder, default_config_path, run_study
from .tasks import CRASH_ENV, execute, is_done

__all__ = ["CACHE_VERSION", "CRASH_ENV", "RESULTS_FORMAT", "Plan", "Task", "build_plan", "check_study_folder",
           "collect", "deep_merge", "default_config_path", "execute", "is_done", "key_of", "run_study",
           "summarize_pairs"]
