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

from .checkpoint import atomic_write_json
from .config import Config, TrainConfig, validate
from .errors import UserError
from .stats import mann_whitney_less, paired_wilcoxon_less, summarize  # noqa: F401  (re-exported)
from .verdict import analyse, row_headline, verdict, verdict_line  # noqa: F401  (the words live in verdict)

CACHE_VERSION = 1
_MODEL_OPS = ("train", "star", "average", "merge")  # tasks whose output is a model file
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
    op: str  # train | star | average | merge | pair | bma
    label: str
    params: dict
    deps: tuple[str, ...] = ()
    cpus: int = 1
    gpus: float = 0.0

    @property
    def output(self) -> str:
        """The file whose presence marks the task done (relative to the study folder)."""
        if self.op in _MODEL_OPS:
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

    def merge(self, cfgd: dict, sources: list[str], tag: str) -> str:
        """Git Re-Basin's MergeMany centre (stardomain.merge): a stronger naive centre than `average`."""
        ev = self.st.eval
        ident = {"op": "merge", "v": CACHE_VERSION, "sources": sources, "rounds": self.st.merge_rounds,
                 "bn_batches": ev.bn_batches, "batch_size": ev.batch_size, "seed": self.st.seed}
        key = key_of(ident)
        name = f"merged{tag}-{key[:12]}"
        return self._add(Task(key, "merge", f"merge-many{tag}", {
            "config": _model_cfg(cfgd, _REGULAR), "seed": self.st.seed, "name": name, "rounds": self.st.merge_rounds,
            "bn_batches": ev.bn_batches, "batch_size": ev.batch_size,
            "sources": [self.model_file(s) for s in sources]}, tuple(sources), **self._res()))

    def pair(self, a: str, b: str, align: bool | None = None) -> str:
        """A pair task; `align` overrides study.eval.align (the unaligned control). The temperature
        options enter the key only when switched on, so turning them on never invalidates other pairs."""
        ev = self.st.eval.model_dump()
        if align is not None:
            ev["align"] = align
        ident_ev = ev if ev["temperature"] else {k: v for k, v in ev.items() if not k.startswith("temperature")}
        key = key_of({"op": "pair", "v": CACHE_VERSION, "a": a, "b": b, "eval": ident_ev, "seed": self.st.seed})
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

    def pairs(self, kinds: Sequence[str], sources, heldouts, star=None, avg=None, merged=None) -> dict[str, list[str]]:
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
            elif kind == "regular_regular_unaligned":
                out[kind] = [self.pair(s, h, align=False) for s in sources for h in heldouts]
            elif kind == "merged_heldout" and merged:
                out[kind] = [self.pair(merged, h) for h in heldouts]
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
    merged = b.merge(base, sources, "") if "merged_heldout" in kinds else None
    main = {"sources": sources, "heldouts": heldouts, "star": star, "average": avg, "merged": merged,
            "pairs": b.pairs(kinds, sources, heldouts, star, avg, merged)}
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
    if task.op in _MODEL_OPS:
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


def _run_merge(task: Task, root: Path) -> None:
    """The MergeMany centre: sources aligned to the first (as `average`), then jointly re-aligned to the
    leave-one-out mean round by round (stardomain.merge), averaged, BN recomputed."""
    from .checkpoint import load_model, read_model_file, save_model
    from .data import get_dataset
    from .interpolate import recalibrate_bn
    from .merge import merge_many
    from .permute import apply_permutation, check_equivalence, identity, spec_for, weight_matching
    from .train import model_meta

    p = task.params
    out = root / f"models/{p['name']}.safetensors"
    t0 = time.perf_counter()
    meta = _existing_model(out)
    if meta is None:
        cfg = _config(p)
        data = get_dataset(cfg.data)
        model, _ = load_model(root / p["sources"][0])
        ex = _example_input(data)
        spec = spec_for(model, ex)
        sds = [read_model_file(root / s)[0] for s in p["sources"]]
        start = [identity(spec)] + [weight_matching(spec, sds[0], sd, seed=p["seed"])[0] for sd in sds[1:]]
        centre, perms, info = merge_many(spec, sds, start=start, rounds=p["rounds"], seed=p["seed"])
        info["equivalence_error_max"] = max(check_equivalence(model, sd, apply_permutation(spec, sd, pm), ex)
                                            for sd, pm in zip(sds, perms))
        model.load_state_dict(centre)
        recalibrate_bn(model, data.train, p["batch_size"], p["bn_batches"])
        metrics = _model_metrics(model, cfg)
        meta = save_model(out, model.state_dict(), model_meta(
            cfg, data, p["seed"], "merged", metrics=metrics, merge={"sources": p["sources"], **info}))
    _finish_model(task, root, meta, info=(meta.get("merge") or {}), seconds=time.perf_counter() - t0)


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
                          device=device, temperature=ev.get("temperature", False),
                          temperature_fraction=ev.get("temperature_fraction", 0.2))
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

# summarize (n <= 2: no spread, no interval) and the pairwise tests live in stardomain.stats (imported above).


def _metrics_of(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k, v in (r.get("barrier") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    return names


_GRID_KINDS = ("regular_regular", "regular_regular_unaligned")  # source × held-out: pairs share models


def summarize_pairs(pairs: dict[str, list[dict]], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """Per kind and metric: `summarize`. The CI resamples what the pairs' models are: source × held-out
    kinds resample sources and held-outs (two-way cluster bootstrap); star–held-out, star–source and
    centre–held-out pairs each have their own held-out or source, so resampling pairs is resampling models.
    (Held-out–held-out pairs share held-outs; their CI resamples pairs: `ci_method` says which.)"""
    from .stats import grid_mean_ci
    from .verdict import grid

    out: dict = {}
    for kind, recs in pairs.items():
        out[kind] = {}
        for m in _metrics_of(recs):
            s = summarize([r["barrier"].get(m) for r in recs], seed=seed, n_boot=n_boot)
            g = grid(recs, m) if kind in _GRID_KINDS else None
            if g is not None and s["n"] >= 3:
                s["ci95"] = grid_mean_ci(g[0], n_boot=n_boot, seed=seed)
                s["ci_method"] = "two-way cluster bootstrap over sources and held-outs"
            elif s["ci95"][0] is not None:
                s["ci_method"] = "bootstrap over pairs" + (" (pairs share held-outs)" if kind == "heldout_heldout"
                                                           else "")
            out[kind][m] = s
    return out


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
    for name in ("star", "average", "merged"):
        if L.get(name):
            models[name] = _model_entry(root, tasks[L[name]])
    pairs = {kind: _pair_records(root, tasks, keys) for kind, keys in L["pairs"].items()}
    summary = summarize_pairs(pairs, seed=st.seed, n_boot=st.bootstrap)

    tests = _tests(pairs)
    regular = models["sources"] + models["heldouts"]
    star_quality = {"regular": _quality(regular)}
    if "star" in models:
        star_quality["star"] = models["star"]["metrics"]
    for name in ("average", "merged"):
        if name in models:
            star_quality[name] = models[name]["metrics"]

    sweeps: dict[str, list] = {}
    for dim, rows in plan.layout.get("sweeps", {}).items():
        out_rows = []
        for row in rows:
            p = {kind: _pair_records(root, tasks, keys) for kind, keys in row["pairs"].items()}
            entry = {"value": row["value"], "star": _model_entry(root, tasks[row["star"]]),
                     "summary": summarize_pairs(p, seed=st.seed, n_boot=st.bootstrap), "pairs": p}
            if "sources" in row:
                entry["regular"] = _quality([_model_entry(root, tasks[k]) for k in row["sources"] + row["heldouts"]])
                entry["headline"] = row_headline(_json_safe(p), alpha=st.alpha, n_boot=st.bootstrap, seed=st.seed)
            out_rows.append(entry)
        sweeps[dim] = out_rows

    results = {"format_version": RESULTS_FORMAT, "config": cfg.model_dump(mode="json"), "models": models,
               "pairs": pairs, "summary": summary, "tests": tests, "star_quality": star_quality,
               "sweeps": sweeps}
    if plan.layout.get("bma"):
        rec = _read_json(root / tasks[plan.layout["bma"]].output)
        results["bma"] = rec["result"] if rec else None
    results.update(analyse(_json_safe(results), alpha=st.alpha, n_boot=st.bootstrap, seed=st.seed))
    results = _json_safe(results)
    results["verdict_line"] = verdict_line(results)
    results["verdict"] = verdict(results)
    return _rounded(results)


_PAIRED = "secondary (paired by held-out, rank test; the headline uses the sign-flip test on the same pairing)"
_HEADLINE = "headline (per-held-out paired differences; valid although pairs share models)"


def _tests(pairs: dict[str, list[dict]]) -> dict:
    """Pairwise tests (secondary: they treat pairs as independent) beside the per-held-out sign-flip tests."""
    from .stats import paired_differences, sign_flip_test
    from .verdict import CENTRES, MAIN_METRICS, SECONDARY, grid, heldout_values

    tests: dict[str, Any] = {}
    sh = pairs.get("star_heldout") or []
    if not sh:
        return tests
    metrics = _metrics_of(sh)
    if pairs.get("regular_regular"):
        for m in metrics:
            tests.setdefault("star_heldout_below_regular_regular", {})[m] = _role(mann_whitney_less(
                [r["barrier"][m] for r in sh], [r["barrier"][m] for r in pairs["regular_regular"]]), SECONDARY)
        for m in metrics:
            g = grid(pairs["regular_regular"], m)
            star = heldout_values(sh, m, g[2]) if g else None
            if star is None:
                continue
            tests.setdefault("star_heldout_below_regular_regular_paired", {})[m] = _role(
                paired_wilcoxon_less(star, g[0].mean(0)), _PAIRED)
            if m in MAIN_METRICS:
                tests.setdefault("star_heldout_below_regular_regular_sign_flip", {})[m] = _role(
                    sign_flip_test(paired_differences(star, g[0])), _HEADLINE)
    heldouts = [r["b"] for r in sh]
    for kind in CENTRES:
        if not pairs.get(kind):
            continue
        for m in metrics:
            star, c = heldout_values(sh, m, heldouts), heldout_values(pairs[kind], m, heldouts)
            if star is None or c is None:
                continue
            tests.setdefault(f"star_heldout_below_{kind}", {})[m] = _role(paired_wilcoxon_less(star, c), _PAIRED)
            if m in MAIN_METRICS:
                tests.setdefault(f"star_heldout_below_{kind}_sign_flip", {})[m] = _role(
                    sign_flip_test(star - c), _HEADLINE)
    return tests


def _role(test: dict | None, role: str) -> dict | None:
    return None if test is None else {**test, "role": role}


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
