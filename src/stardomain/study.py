"""The star-domain study, end to end: config -> plan (tasks as plain data) -> cached artifacts -> results.

Every artifact (a trained model, a star, an aligned average, a barrier record, a BMA result) lives under a
key that is the sha256 of exactly what determines it: the config sections it reads, its seed, and the keys
of its inputs (which in turn hash everything that determined them). Re-running skips finished artifacts;
a changed setting changes only the keys that depend on it. All writes are atomic and every task is
deterministic on CPU, so a run killed at any point resumes with the same command and ends with the same
`results.json`. Pair records also store their inputs' weight sha256 and are recomputed if those no longer
match the model files they were measured on.

`results.json` holds no timings (they vary run to run); those go to `timings.json`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import atomic_write_json
from .config import Config, TrainConfig, validate
from .errors import UserError

CACHE_VERSION = 1
RESULTS_FORMAT = 1
_TIMING_KEYS = {"timings", "seconds", "time", "elapsed", "wall", "wall_seconds"}


# ---------------------------------------------------------------- keys and plan

def key_of(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`: the identity of an artifact."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Task:
    """One unit of work. `params` is everything the task needs (paths relative to the study folder)."""

    key: str
    op: str  # train | star | average | pair | bma
    label: str
    params: dict
    deps: tuple[str, ...] = ()
    cpus: int = 1
    gpus: float = 0.0

    @property
    def output(self) -> str:
        """The file whose presence marks the task done (relative to the study folder)."""
        if self.op in ("train", "star", "average"):
            return f"models/{self.params['name']}.json"
        return f"cache/{self.op}/{self.key}.json"


@dataclass
class Plan:
    tasks: list[Task]
    layout: dict = field(default_factory=dict)

    def by_key(self) -> dict[str, Task]:
        return {t.key: t for t in self.tasks}

    def to_json(self) -> dict:
        return {"tasks": [asdict(t) for t in self.tasks], "layout": self.layout}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _model_cfg(cfg: dict, sections: Sequence[str] = ("data", "model", "train", "star")) -> dict:
    """The part of a config that determines an artifact: a regular model reads data, model, train; a
    star also reads star. Nothing else enters its key, so e.g. a star setting never retrains sources."""
    return {k: v for k, v in cfg.items() if k in sections}


_REGULAR = ("data", "model", "train")


class _Builder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.st = cfg.study
        self.tasks: dict[str, Task] = {}
        self.labels: dict[str, str] = {}

    def _add(self, task: Task) -> str:
        self.tasks.setdefault(task.key, task)
        self.labels.setdefault(task.key, task.label)
        return task.key

    def _res(self) -> dict:
        return {"cpus": self.st.cpus_per_task, "gpus": self.st.gpus_per_task}

    def model_file(self, key: str) -> str:
        return f"models/{self.tasks[key].params['name']}.safetensors"

    def train(self, cfgd: dict, seed: int, role: str, idx: int, tag: str) -> str:
        ident = {"op": "train", "v": CACHE_VERSION, "config": _model_cfg(cfgd, _REGULAR), "seed": seed,
                 "role": role}
        key = key_of(ident)
        name = f"{role}{tag}-s{seed}-{key[:12]}"
        return self._add(Task(key, "train", f"{role} {idx}{tag}", {"config": _model_cfg(cfgd, _REGULAR), "seed": seed,
                                                                   "role": role, "name": name,
                                                                   "device": self.st.device}, (), **self._res()))

    def star(self, cfgd: dict, sources: list[str], tag: str) -> str:
        ident = {"op": "star", "v": CACHE_VERSION, "config": _model_cfg(cfgd), "seed": self.st.seed,
                 "sources": sources}
        key = key_of(ident)
        name = f"star{tag}-{key[:12]}"
        return self._add(Task(key, "star", f"star{tag}", {
            "config": _model_cfg(cfgd), "seed": self.st.seed, "name": name, "device": self.st.device,
            "sources": [self.model_file(s) for s in sources]}, tuple(sources), **self._res()))

    def average(self, cfgd: dict, sources: list[str], tag: str) -> str:
        ev = self.st.eval
        ident = {"op": "average", "v": CACHE_VERSION, "sources": sources, "align": ev.align,
                 "bn_batches": ev.bn_batches, "batch_size": ev.batch_size, "seed": self.st.seed}
        key = key_of(ident)
        name = f"average{tag}-{key[:12]}"
        return self._add(Task(key, "average", f"average{tag}", {
            "config": _model_cfg(cfgd, _REGULAR), "seed": self.st.seed, "name": name, "align": ev.align,
            "bn_batches": ev.bn_batches, "batch_size": ev.batch_size,
            "sources": [self.model_file(s) for s in sources]}, tuple(sources), **self._res()))

    def pair(self, a: str, b: str) -> str:
        ev = self.st.eval.model_dump()
        key = key_of({"op": "pair", "v": CACHE_VERSION, "a": a, "b": b, "eval": ev, "seed": self.st.seed})
        return self._add(Task(key, "pair", f"{self.labels[a]} ↔ {self.labels[b]}", {
            "a": self.model_file(a), "b": self.model_file(b), "a_label": self.labels[a],
            "b_label": self.labels[b], "eval": ev, "seed": self.st.seed,
            "device": self.st.device, "allow": self._allow(a)}, (a, b), **self._res()))

    def bma(self, star: str, sources: list[str]) -> str:
        key = key_of({"op": "bma", "v": CACHE_VERSION, "star": star, "sources": sources, "k": self.st.bma_k,
                      "seed": self.st.seed})
        return self._add(Task(key, "bma", "bma", {
            "star": self.model_file(star), "sources": [self.model_file(s) for s in sources],
            "k": self.st.bma_k, "seed": self.st.seed, "device": self.st.device, "allow": self._allow(star)},
            (star, *sources), **self._res()))

    def _allow(self, key: str) -> list[str]:
        """Factories of the user's own config behind a model: a task may import those from its files."""
        from .safety import config_factories

        return config_factories(self.tasks[key].params.get("config"))

    def population(self, cfgd: dict, n_sources: int, n_heldouts: int, tag: str = "") -> tuple[list, list]:
        st = self.st
        src = [self.train(cfgd, st.seed + i, "source", i, tag) for i in range(n_sources)]
        ho_cfg = dict(cfgd)
        if st.heldout_train:
            merged = deep_merge(cfgd["train"], st.heldout_train)
            ho_cfg["train"] = validate(TrainConfig, merged, "study.heldout_train").model_dump()
        ho = [self.train(ho_cfg, st.seed + 1000 + i, "heldout", i, tag) for i in range(n_heldouts)]
        return src, ho

    def pairs(self, kinds: Sequence[str], sources, heldouts, star=None, avg=None) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind in kinds:
            if kind == "star_heldout" and star:
                out[kind] = [self.pair(star, h) for h in heldouts]
            elif kind == "regular_regular":
                out[kind] = [self.pair(s, h) for s in sources for h in heldouts]
            elif kind == "heldout_heldout":
                out[kind] = [self.pair(a, b) for i, a in enumerate(heldouts) for b in heldouts[i + 1:]]
            elif kind == "star_source" and star:
                out[kind] = [self.pair(star, s) for s in sources]
            elif kind == "average_heldout" and avg:
                out[kind] = [self.pair(avg, h) for h in heldouts]
        return out


def _needs_star(kinds) -> bool:
    return any(k in kinds for k in ("star_heldout", "star_source"))


def build_plan(cfg: Config) -> Plan:
    """Expand a study config into tasks (topologically ordered) and a layout saying what is what."""
    st = cfg.study
    b = _Builder(cfg)
    base = cfg.model_dump(mode="json")
    kinds = list(dict.fromkeys(st.pairs))
    sw = st.sweeps
    pool = max([st.n_sources, *sw.n_sources])
    sources_all, heldouts = b.population(base, pool, st.n_heldouts)
    sources = sources_all[:st.n_sources]
    star = b.star(base, sources, "") if (_needs_star(kinds) or st.bma or sw.n_sources or sw.t_sampling) else None
    avg = b.average(base, sources, "") if "average_heldout" in kinds else None
    main = {"sources": sources, "heldouts": heldouts, "star": star, "average": avg,
            "pairs": b.pairs(kinds, sources, heldouts, star, avg)}
    layout: dict[str, Any] = {"main": main, "sweeps": {}}
    if st.bma and star:
        layout["bma"] = b.bma(star, sources)

    if sw.n_sources:
        rows = []
        for k in sorted(set(sw.n_sources)):
            s_k = b.star(base, sources_all[:k], f"-z{k}")
            rows.append({"value": k, "star": s_k, "pairs": b.pairs(["star_heldout"], [], heldouts, s_k)})
        layout["sweeps"]["n_sources"] = rows
    if sw.t_sampling:
        if "star" not in base:
            raise UserError("study.sweeps.t_sampling needs the star section (stardomain.starlight)")
        rows = []
        for scheme in dict.fromkeys(sw.t_sampling):
            cfgd = deep_merge(base, {"star": {"t_sampling": scheme}})
            validate(Config, cfgd, f"study.sweeps.t_sampling={scheme}")
            s_t = b.star(cfgd, sources, f"-t{scheme}")
            rows.append({"value": scheme, "star": s_t, "pairs": b.pairs(["star_heldout"], [], heldouts, s_t)})
        layout["sweeps"]["t_sampling"] = rows
    for dim in ("width", "depth"):
        values = getattr(sw, dim)
        if not values:
            continue
        rows = []
        for v in dict.fromkeys(values):
            cfgd = deep_merge(base, {"model": {"kwargs": {getattr(sw, f"{dim}_key"): v}}})
            validate(Config, cfgd, f"study.sweeps.{dim}={v}")
            tag = f"-{dim[0]}{v}"
            src_v, ho_v = b.population(cfgd, st.n_sources, st.n_heldouts, tag)
            s_v = b.star(cfgd, src_v, tag)
            rows.append({"value": v, "star": s_v, "sources": src_v, "heldouts": ho_v,
                         "pairs": b.pairs(["star_heldout", "regular_regular"], src_v, ho_v, s_v)})
        layout["sweeps"][dim] = rows
    return Plan(list(b.tasks.values()), layout)


# ---------------------------------------------------------------- executing one task

def _json_safe(obj: Any) -> Any:
    """Plain JSON types; drops timing fields (they vary between runs and live in timings.json)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()
                if not (str(k) in _TIMING_KEYS or str(k).endswith("_seconds") or str(k).endswith("_time"))}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else (1e308 if obj > 0 else -1e308)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _timings(obj: Any, prefix: str = "") -> dict[str, float]:
    """The timing fields `_json_safe` drops, flattened, for timings.json."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = f"{prefix}{k}"
            if (str(k) in _TIMING_KEYS or str(k).endswith("_seconds")) and isinstance(v, (int, float)):
                out[name] = float(v)
            elif isinstance(v, dict):
                out.update(_timings(v, name + "."))
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(task: Task, root: Path, plan_tasks: dict[str, Task] | None = None) -> bool:
    """Finished and still valid: the marker exists and (for pairs) was measured on today's model files."""
    rec = _read_json(root / task.output)
    if rec is None or rec.get("key") != task.key:
        return False
    if task.op in ("train", "star", "average"):
        return (root / f"models/{task.params['name']}.safetensors").is_file()
    if task.op == "pair" and plan_tasks is not None:
        for side, dep in zip("ab", task.deps):
            side_rec = _read_json(root / plan_tasks[dep].output) if dep in plan_tasks else None
            if side_rec is None or side_rec.get("sha256") != rec.get(f"sha256_{side}"):
                return False
    return True


def _config(params: dict) -> Config:
    return validate(Config, params["config"], "study task config")


def _model_metrics(model, cfg: Config) -> dict:
    from .data import get_dataset
    from .train import evaluate_splits

    return evaluate_splits(model, get_dataset(cfg.data), cfg.train.eval_batch_size)


def _finish_model(task: Task, root: Path, meta: dict, model=None, cfg: Config | None = None,
                  info: dict | None = None, seconds: float = 0.0) -> None:
    m = meta.get("metrics") or {}
    if not all(isinstance(m.get(s), dict) and "loss" in m[s] and "acc" in m[s] for s in ("train", "test")):
        from .checkpoint import load_model

        if model is None:
            model, _ = load_model(root / f"models/{task.params['name']}.safetensors")
        m = _model_metrics(model, cfg or _config(task.params))
    side = {"key": task.key, "op": task.op, "label": task.label, "role": meta.get("role"),
            "seed": meta.get("seed"), "file": f"models/{task.params['name']}.safetensors",
            "sha256": meta["sha256"], "metrics": {s: {"loss": m[s]["loss"], "acc": m[s]["acc"]}
                                                  for s in ("train", "test")},
            "info": _json_safe(info or {}), "timings": {"seconds": seconds, **_timings(info or {})}}
    atomic_write_json(root / task.output, side)


def _existing_model(path: Path) -> dict | None:
    """A model file a killed run wrote before its marker: reuse it (it is fully written or absent)."""
    if not path.is_file():
        return None
    from .checkpoint import read_model_file

    try:
        return read_model_file(path)[1]
    except UserError:
        return None


def _run_train(task: Task, root: Path) -> None:
    from .train import train_to_file

    p = task.params
    out = root / f"models/{p['name']}.safetensors"
    t0 = time.perf_counter()
    meta = _existing_model(out) or train_to_file(_config(p), p["seed"], out, role=p["role"],
                                                 device=p.get("device", "auto"), progress=False)
    _finish_model(task, root, meta, seconds=time.perf_counter() - t0)


def _run_star(task: Task, root: Path) -> None:
    from . import starlight

    p = task.params
    out = root / f"models/{p['name']}.safetensors"
    t0 = time.perf_counter()
    meta = _existing_model(out)
    if meta is None:
        meta = starlight.star_to_file(_config(p), [str(root / s) for s in p["sources"]], out, seed=p["seed"],
                                      device=p.get("device", "auto"), progress=False)
        meta = _existing_model(out) or meta
    info = {k: v for k, v in meta.items() if k in ("star", "starlight", "info", "alignment")}
    _finish_model(task, root, meta, info=info, seconds=time.perf_counter() - t0)


def _run_average(task: Task, root: Path) -> None:
    """The "would any centre do?" baseline: the sources aligned to the first one, averaged, BN recomputed."""
    from .checkpoint import load_model, read_model_file, save_model
    from .data import get_dataset
    from .interpolate import average, recalibrate_bn
    from .train import model_meta

    p = task.params
    out = root / f"models/{p['name']}.safetensors"
    t0 = time.perf_counter()
    meta = _existing_model(out)
    if meta is None:
        cfg = _config(p)
        data = get_dataset(cfg.data)
        model, _ = load_model(root / p["sources"][0])
        sds = [read_model_file(root / s)[0] for s in p["sources"]]
        aligned, infos = [sds[0]], []
        if p["align"] and len(sds) > 1:
            from .permute import align

            ex = _example_input(data)
            for sd in sds[1:]:
                sd_b, info = align(model, sds[0], sd, example_input=ex, seed=p["seed"])
                aligned.append(sd_b)
                infos.append(info)
        else:
            aligned = sds
        model.load_state_dict(average(aligned))
        recalibrate_bn(model, data.train, p["batch_size"], p["bn_batches"])
        metrics = _model_metrics(model, cfg)
        meta = save_model(out, model.state_dict(), model_meta(
            cfg, data, p["seed"], "merged", metrics=metrics, merge={"method": "aligned_average",
                                                                    "sources": p["sources"], "align": p["align"]}))
    _finish_model(task, root, meta, seconds=time.perf_counter() - t0)


def _example_input(data):
    import torch

    x = data.train.x[:2] if data.train.x is not None else torch.stack([data.train.dataset[i][0] for i in range(2)])
    return x


def _run_pair(task: Task, root: Path) -> None:
    from . import barrier
    from .checkpoint import build_from_meta, data_from_meta, read_pair
    from .train import resolve_device

    p = task.params
    ev = p["eval"]
    t0 = time.perf_counter()
    sd_a, meta_a, sd_b, meta_b = read_pair(root / p["a"], root / p["b"])
    data = data_from_meta(meta_a, str(root / p["a"]))
    device = resolve_device(p.get("device", "auto"))
    model = build_from_meta(meta_a, str(root / p["a"])).to(device)
    rec = barrier.measure(model, sd_a, sd_b, data, points=ev["points"], align=ev["align"],
                          example_input=_example_input(data), bn_batches=ev["bn_batches"], seed=p["seed"],
                          device=device)
    out = {"key": task.key, "a": p["a_label"], "b": p["b_label"], "a_file": p["a"], "b_file": p["b"],
           "sha256_a": meta_a["sha256"], "sha256_b": meta_b["sha256"], **_json_safe(rec),
           "timings_": {"seconds": time.perf_counter() - t0, **_timings(rec)}}
    atomic_write_json(root / task.output, out)


def _run_bma(task: Task, root: Path) -> None:
    from . import bma

    p = task.params
    t0 = time.perf_counter()
    res = bma.bma_files(str(root / p["star"]), [str(root / s) for s in p["sources"]], k=p["k"], seed=p["seed"],
                        device=p.get("device", "auto"))
    files = (res.get("_info") or {}).get("files") or {}
    for entry in [files.get("star"), *(files.get("sources") or [])]:
        if isinstance(entry, dict) and "path" in entry:  # relative: results must not depend on the folder
            entry["path"] = str(Path(entry["path"]).resolve().relative_to(root.resolve()))
    atomic_write_json(root / task.output, {"key": task.key, "result": _json_safe(res), "raw": bma._json_safe(res),
                                           "timings_": {"seconds": time.perf_counter() - t0, **_timings(res)}})


_OPS = {"train": _run_train, "star": _run_star, "average": _run_average, "pair": _run_pair, "bma": _run_bma}


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
    import torch

    from .safety import allowed, config_factories

    root = Path(root)
    _test_crash_once(task)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(task.cpus)))
    # The study config is the user's own: its factories may be imported from the study's model files
    # (in whatever process runs the task); a factory only a file names is still refused.
    trusted = config_factories(task.params.get("config")) + list(task.params.get("allow") or [])
    try:
        with torch.random.fork_rng(devices=[]), allowed(trusted):
            torch.manual_seed(int(task.key[:8], 16))
            _OPS[task.op](task, root)
    finally:
        torch.set_num_threads(threads)
    return task.key


# ---------------------------------------------------------------- statistics

def summarize(values: Sequence[float], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """mean, std (n-1), n, min, max, median and a seeded 95% percentile-bootstrap CI of the mean."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None, "median": None, "ci95": [None, None]}
    if n == 1:
        lo = hi = float(x[0])
    else:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        lo, hi = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if n > 1 else 0.0, "n": n,
            "min": float(x.min()), "max": float(x.max()), "median": float(np.median(x)), "ci95": [lo, hi]}


def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> dict | None:
    """One-sided Mann–Whitney U: are values in x stochastically smaller than those in y?"""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return None
    res = mannwhitneyu(np.asarray(x, float), np.asarray(y, float), alternative="less")
    return {"test": "mann_whitney_u", "alternative": "less", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "n_x": len(x), "n_y": len(y)}


def paired_wilcoxon_less(x: Sequence[float], y: Sequence[float]) -> dict | None:
    """One-sided Wilcoxon signed-rank on paired values (x_i - y_i < 0?)."""
    from scipy.stats import wilcoxon

    d = np.asarray(x, float) - np.asarray(y, float)
    if d.size == 0 or not np.any(d != 0):
        return None
    res = wilcoxon(d, alternative="less")
    return {"test": "wilcoxon_signed_rank", "alternative": "less", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "n": int(d.size), "mean_difference": float(d.mean())}


def _metrics_of(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k, v in (r.get("barrier") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    return names


def summarize_pairs(pairs: dict[str, list[dict]], *, seed: int = 0, n_boot: int = 10000) -> dict:
    return {kind: {m: summarize([r["barrier"].get(m) for r in recs], seed=seed, n_boot=n_boot)
                   for m in _metrics_of(recs)} for kind, recs in pairs.items()}


# ---------------------------------------------------------------- assembling results

def _model_entry(root: Path, task: Task) -> dict:
    side = _read_json(root / task.output)
    if side is None:
        raise UserError(f"study artifact {task.output} is missing; re-run the study to finish it")
    return {k: side[k] for k in ("label", "role", "seed", "file", "sha256", "metrics", "info") if k in side}


def _pair_records(root: Path, tasks: dict[str, Task], keys: list[str]) -> list[dict]:
    out = []
    for k in keys:
        rec = _read_json(root / tasks[k].output)
        if rec is None:
            raise UserError(f"study artifact {tasks[k].output} is missing; re-run the study to finish it")
        out.append({kk: v for kk, v in rec.items() if kk not in ("key", "timings_")})
    return out


def _quality(entries: list[dict]) -> dict:
    return {f"{s}_{m}": summarize([e["metrics"][s][m] for e in entries], n_boot=1000)
            for s in ("train", "test") for m in ("loss", "acc")}


def collect(cfg: Config, plan: Plan, root: str | Path) -> dict:
    """Read every artifact and build results.json (deterministic: no timings, fixed order)."""
    root = Path(root)
    st = cfg.study
    tasks = plan.by_key()
    L = plan.layout["main"]
    models = {"sources": [_model_entry(root, tasks[k]) for k in L["sources"]],
              "heldouts": [_model_entry(root, tasks[k]) for k in L["heldouts"]]}
    for name in ("star", "average"):
        if L.get(name):
            models[name] = _model_entry(root, tasks[L[name]])
    pairs = {kind: _pair_records(root, tasks, keys) for kind, keys in L["pairs"].items()}
    summary = summarize_pairs(pairs, seed=st.seed, n_boot=st.bootstrap)

    tests: dict[str, Any] = {}
    if pairs.get("star_heldout") and pairs.get("regular_regular"):
        for m in _metrics_of(pairs["star_heldout"]):
            tests.setdefault("star_heldout_below_regular_regular", {})[m] = mann_whitney_less(
                [r["barrier"][m] for r in pairs["star_heldout"]], [r["barrier"][m] for r in pairs["regular_regular"]])
        # paired by held-out: the star's barrier to h vs the mean of the sources' barriers to h
        nh = len(L["heldouts"])
        for m in _metrics_of(pairs["star_heldout"]):
            reg = np.array([r["barrier"][m] for r in pairs["regular_regular"]], float).reshape(-1, nh).mean(0)
            tests.setdefault("star_heldout_below_regular_regular_paired", {})[m] = paired_wilcoxon_less(
                [r["barrier"][m] for r in pairs["star_heldout"]], reg)
    if pairs.get("star_heldout") and pairs.get("average_heldout"):
        tests["star_heldout_below_average_heldout"] = {
            m: paired_wilcoxon_less([r["barrier"][m] for r in pairs["star_heldout"]],
                                    [r["barrier"][m] for r in pairs["average_heldout"]])
            for m in _metrics_of(pairs["star_heldout"])}

    regular = models["sources"] + models["heldouts"]
    star_quality = {"regular": _quality(regular)}
    if "star" in models:
        star_quality["star"] = models["star"]["metrics"]
    if "average" in models:
        star_quality["average"] = models["average"]["metrics"]

    sweeps: dict[str, list] = {}
    for dim, rows in plan.layout.get("sweeps", {}).items():
        out_rows = []
        for row in rows:
            p = {kind: _pair_records(root, tasks, keys) for kind, keys in row["pairs"].items()}
            entry = {"value": row["value"], "star": _model_entry(root, tasks[row["star"]]),
                     "summary": summarize_pairs(p, seed=st.seed, n_boot=st.bootstrap), "pairs": p}
            if "sources" in row:
                entry["regular"] = _quality([_model_entry(root, tasks[k]) for k in row["sources"] + row["heldouts"]])
            out_rows.append(entry)
        sweeps[dim] = out_rows

    results = {"format_version": RESULTS_FORMAT, "config": cfg.model_dump(mode="json"), "models": models,
               "pairs": pairs, "summary": summary, "tests": tests, "star_quality": star_quality,
               "sweeps": sweeps}
    if plan.layout.get("bma"):
        rec = _read_json(root / tasks[plan.layout["bma"]].output)
        results["bma"] = rec["result"] if rec else None
    results["verdict"] = verdict(results)
    return _rounded(_json_safe(results))


def _rounded(obj: Any, digits: int = 12) -> Any:
    """Floats to 12 significant digits: reductions whose order depends on memory alignment (diagnostics such
    as alignment distances) can differ in the last bit between processes; the file should not."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def verdict(results: dict, metric: str = "train_loss") -> str:
    """A paragraph written from the numbers: what the study says about the conjecture."""
    s = results.get("summary", {})
    sh, rr = s.get("star_heldout", {}).get(metric), s.get("regular_regular", {}).get(metric)
    parts: list[str] = []
    if sh and rr and sh["n"] and rr["n"]:
        ratio = sh["mean"] / rr["mean"] if rr["mean"] else float("inf")
        below = sh["mean"] < rr["mean"]
        t = (results.get("tests", {}).get("star_heldout_below_regular_regular") or {}).get(metric)
        p = t["p_value"] if t else None
        sig = p is not None and p < 0.05
        parts.append(
            f"The star–held-out {metric.replace('_', ' ')} barrier is {_fmt(sh['mean'])} ± {_fmt(sh['std'])} "
            f"(95% CI {_fmt(sh['ci95'][0])}–{_fmt(sh['ci95'][1])}, n={sh['n']}) against "
            f"{_fmt(rr['mean'])} ± {_fmt(rr['std'])} (95% CI {_fmt(rr['ci95'][0])}–{_fmt(rr['ci95'][1])}, "
            f"n={rr['n']}) for regular–regular pairs: {'lower' if below else 'not lower'}, "
            f"{ratio:.2f}× the regular barrier. A one-sided Mann–Whitney U test "
            + (f"gives p = {p:.3g}, " if p is not None else "could not be run, ")
            + ("so the difference is significant at the 5% level; this supports the star-domain conjecture on "
               "this task." if sig and below else
               "so the data do not establish that the star's barriers are lower (not significant at the 5% "
               "level)." if below else "so this study gives no evidence for the star-domain conjecture on this task."))
    q = results.get("star_quality", {})
    if "star" in q:
        reg = q["regular"]["train_loss"]
        star_l = q["star"]["train"]["loss"]
        if star_l > reg["max"]:
            judge = (f"higher than every regular model's ({star_l / reg['mean']:.2f}× their mean), so the star is a "
                     "worse fit than a regular solution and a low barrier to it says less")
        elif star_l < reg["min"]:
            judge = "lower than every regular model's: the star is at least as good a solution"
        else:
            judge = "within the range of the regular models': the star is as good a solution as they are"
        parts.append(
            f"The star's own training loss is {_fmt(star_l, 4)} (test accuracy {100 * q['star']['test']['acc']:.2f}%)"
            f" against {_fmt(reg['mean'], 4)} on average (range {_fmt(reg['min'], 4)}–{_fmt(reg['max'], 4)}; test "
            f"accuracy {100 * q['regular']['test_acc']['mean']:.2f}%) for the regular models: {judge}.")
    av = s.get("average_heldout", {}).get(metric)
    if av and sh and av["n"] and sh["n"]:
        avg_q = q.get("average")
        worse_fit = bool(avg_q and "star" in q and avg_q["train"]["loss"] > q["star"]["train"]["loss"])
        own = f" (its own training loss {_fmt(avg_q['train']['loss'], 4)})" if avg_q else ""
        if sh["mean"] < av["mean"]:
            judge = "Starlight's star is a better centre than plain averaging."
        elif worse_fit:
            judge = ("its barriers are as low as the star's, but it is a worse fit than the star, and a low barrier "
                     "to a poor model is cheap; of the two, the star is the better centre.")
        else:
            judge = "plain averaging does as well as Starlight here, so the star is not special."
        parts.append(f"The aligned weight average of the sources, a naive centre{own}, has a held-out barrier of "
                     f"{_fmt(av['mean'])} ± {_fmt(av['std'])}: {judge}")
    hh = s.get("heldout_heldout", {}).get(metric)
    if hh and hh["n"]:
        parts.append(f"Held-out–held-out pairs have {_fmt(hh['mean'])} ± {_fmt(hh['std'])} (n={hh['n']}).")
    ss = s.get("star_source", {}).get(metric)
    if ss and ss["n"]:
        parts.append(f"The star to its own sources: {_fmt(ss['mean'])} ± {_fmt(ss['std'])}.")
    z = results.get("sweeps", {}).get("n_sources")
    if z and len(z) > 1:
        vals = [(r["value"], (r["summary"].get("star_heldout", {}).get(metric) or {}).get("mean")) for r in z]
        vals = [(k, v) for k, v in vals if v is not None]
        if len(vals) > 1:
            trend = "falls" if vals[-1][1] < vals[0][1] else "does not fall"
            mono = all(b[1] <= a[1] for a, b in zip(vals, vals[1:]))
            parts.append(f"From |Z|={vals[0][0]} to |Z|={vals[-1][0]} the star–held-out barrier {trend}"
                         f"{' steadily' if mono and trend == 'falls' else ''}: "
                         + ", ".join(f"|Z|={k}: {_fmt(v)}" for k, v in vals) + ".")
    return " ".join(parts) if parts else "Not enough pairs were measured to say anything."


# ---------------------------------------------------------------- the whole study

def _timing_table(plan: Plan, root: Path) -> dict:
    out = {}
    for t in plan.tasks:
        rec = _read_json(root / t.output) or {}
        out[t.label] = {"op": t.op, **(rec.get("timings") or rec.get("timings_") or {})}
    by_op: dict[str, float] = {}
    for v in out.values():
        by_op[v["op"]] = by_op.get(v["op"], 0.0) + float(v.get("seconds", 0.0))
    return {"tasks": out, "total_seconds_by_op": by_op}


_STUDY_MARKS = ("plan.json", ".lock", "results.json")


def check_study_folder(root: Path, force: bool = False) -> None:
    """The study folder is DIR itself: refuse a file, and a non-empty folder that is not a study folder
    (a run writes report.md, plots/, ... into it) unless `force`."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; a study writes a folder (give a folder path)")
    if not force and root.is_dir() and any(root.iterdir()) and not any((root / m).exists() for m in _STUDY_MARKS):
        raise UserError(f"--out {root} is a folder with other files in it, not a study folder; choose another "
                        "--out or pass --force to write the study into it")


def run_study(cfg: Config, out: str | Path, *, executor: str = "local", ray_address: str | None = None,
              progress: bool | None = None, report: bool = True, num_workers: int | None = None,
              force: bool = False) -> dict:
    """Plan, execute what is not cached, collect, write results.json (+ timings.json, report). The folder is
    locked while this runs (`lock.study_lock`): a second run on it stops with a UserError naming the holder."""
    from .data import get_dataset
    from .executors import get_executor
    from .lock import study_lock

    ex = get_executor(executor, address=ray_address, num_workers=num_workers)
    plan = build_plan(cfg)
    get_dataset(cfg.data)  # a missing data set stops here, before any work
    root = Path(out)
    check_study_folder(root, force)
    root.mkdir(parents=True, exist_ok=True)
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
        from .report import write_report

        bma_raw = None
        if plan.layout.get("bma"):
            bma_raw = (_read_json(root / plan.by_key()[plan.layout["bma"]].output) or {}).get("raw")
        write_report(results, root, timings=_read_json(root / "timings.json"), bma_raw=bma_raw)
    return results


def default_config_path() -> Path:
    """The embedded default study (MNIST, MLP width 16), shipped inside the package."""
    from importlib.resources import files

    return Path(str(files("stardomain") / "configs" / "default.yaml"))
