"""Keys and plan: a study config expanded into tasks as plain data.

Every artifact lives under a key that is the sha256 of exactly what determines it: the config sections it
reads, its seed, and the keys of its inputs. Which pairs are planned comes from the pair-kind table
(stardomain.pairkinds).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .. import pairkinds
from ..config import LEARNED_METHODS, SEED_BLOCK, Config, TrainConfig, deep_merge, result_identity, validate
from ..errors import UserError
from ..safety import config_factories

CACHE_VERSION = 1
# Model seeds: study seed s owns the block [s·SEED_BLOCK, (s+1)·SEED_BLOCK); inside it source i has offset i,
# held-out i 1000 + i, star j 2000 + j (up to 1000 of each). No two models of a study share an
# initialisation or a data order, and two study seeds share no model seed (independent replicates). Study
# seed 0 keeps the seeds it always had (sources 0.., held-outs 1000.., the star 2000).
ROLE_OFFSETS = {"source": 0, "heldout": 1000, "star": 2000}
PER_ROLE = 1000


def model_seed(study_seed: int, role: str, index: int) -> int:
    """The seed of model `index` of `role` in the study with seed `study_seed` (see ROLE_OFFSETS)."""
    if not 0 <= index < PER_ROLE:
        raise UserError(f"at most {PER_ROLE} models per role (asked for {role} {index})")
    return study_seed * SEED_BLOCK + ROLE_OFFSETS[role] + index


_MODEL_OPS = ("train", "star", "average", "merge")  # tasks whose output is a model file


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


def _model_cfg(cfg: dict, sections: Sequence[str] = ("data", "model", "train", "star")) -> dict:
    """The part of a config that determines an artifact: a regular model reads data, model, train; a
    star also reads star. Nothing else enters its key, so e.g. a star setting never retrains sources."""
    return {k: v for k, v in cfg.items() if k in sections}


# Settings added after studies were first cached: left out of a key while unset, so the artifacts of a
# study that does not use them keep their keys (and are reused) across the upgrade.
_LATER_SETTINGS = (("train", "stop"), ("star", "match_fit"), ("star", "train", "stop"))


def _ident_cfg(cfg: dict) -> dict:
    """`cfg` as it enters a key: _LATER_SETTINGS dropped where they are None."""
    out = copy.deepcopy(cfg)
    for path in _LATER_SETTINGS:
        node = out
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] is None:
            del node[path[-1]]
    return out


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
        ident = {"op": "train", "v": CACHE_VERSION, "config": _ident_cfg(result_identity(_model_cfg(cfgd, _REGULAR))),
                 "seed": seed, "role": role}
        key = key_of(ident)
        name = f"{role}{tag}-s{seed}-{key[:12]}"
        return self._add(Task(key, "train", f"{role} {idx}{tag}", {"config": _model_cfg(cfgd, _REGULAR), "seed": seed,
                                                                   "role": role, "name": name,
                                                                   "device": self.st.device,
                                                                   "stacked": self.st.stacked_training},
                                        (), **self._res()))

    def stars(self, cfgd: dict, sources: list[str], tag: str) -> list[str]:
        """study.n_stars stars on the same sources, star j from its own seed (model_seed(.., "star", j)):
        sharing a source's initialisation and data order would put a star in that source's basin (measured:
        star–source 0 barriers near zero). One star is labelled "star", several "star 0", "star 1", ..."""
        n = self.st.n_stars
        return [self.star(cfgd, sources, tag, j, f"star{tag}" if n == 1 else f"star {j}{tag}") for j in range(n)]

    def star(self, cfgd: dict, sources: list[str], tag: str, j: int, label: str) -> str:
        seed = model_seed(self.st.seed, "star", j)
        ident = {"op": "star", "v": CACHE_VERSION, "config": _ident_cfg(result_identity(_model_cfg(cfgd))),
                 "seed": seed, "sources": sources}
        key = key_of(ident)
        name = f"star{tag}-{key[:12]}"
        return self._add(Task(key, "star", label, {
            "config": _model_cfg(cfgd), "seed": seed, "name": name, "device": self.st.device,
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

    def pair(self, a: str, b: str, align: bool | None = None, variant: str | None = None,
             method: str | None = None) -> str:
        """A pair task; `align` overrides study.eval.align (the unaligned control), `variant` aligns only one
        role's groups (it enters the key; "none" is align=False, so the same pair as the control). The
        temperature options enter the key only when switched on, and the list of variants never does, so
        turning them on never invalidates other pairs. `method` overrides study.eval.align_method; the method
        and its settings enter the key only where they matter (weight matching: as before they existed)."""
        ev = self.st.eval.model_dump(exclude={"variants", "methods"})
        if align is not None:
            ev["align"] = align
        if variant not in (None, "none", "full"):
            ev["variant"] = variant
        if method is not None:
            ev["align_method"] = method
        drop = {"align_method", "learned"} if ev["align_method"] == "weight" or not ev["align"] else set()
        drop |= set() if ev["align_method"] in LEARNED_METHODS else {"learned"}
        ident_ev = {k: v for k, v in ev.items() if k not in drop}
        if not ev["temperature"]:
            ident_ev = {k: v for k, v in ident_ev.items() if not k.startswith("temperature")}
        if ident_ev["examples"] is None:  # as before the option existed: existing pairs stay valid
            ident_ev = {k: v for k, v in ident_ev.items() if k != "examples"}
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
        return config_factories(self.tasks[key].params.get("config"))

    def population(self, cfgd: dict, n_sources: int, n_heldouts: int, tag: str = "") -> tuple[list, list]:
        st = self.st
        src = [self.train(cfgd, model_seed(st.seed, "source", i), "source", i, tag) for i in range(n_sources)]
        ho_cfg = dict(cfgd)
        if st.heldout_train:
            merged = deep_merge(cfgd["train"], st.heldout_train)
            ho_cfg["train"] = validate(TrainConfig, merged, "study.heldout_train").model_dump()
        ho = [self.train(ho_cfg, model_seed(st.seed, "heldout", i), "heldout", i, tag) for i in range(n_heldouts)]
        return src, ho

    def pairs(self, kinds: Sequence[str], models: dict) -> dict[str, list[str]]:
        """The pair tasks of each kind (stardomain.pairkinds) over `models`: group or centre name -> key(s).
        A kind whose centre is not in `models` is left out; `a == b`: every unordered pair within."""
        out: dict[str, list[str]] = {}
        for name in kinds:
            kind = pairkinds.KINDS[name]
            if any(not models.get(c) for c in kind.centres):
                continue
            a, b = (_members(models, side) for side in (kind.a, kind.b))
            combos = ([(x, y) for i, x in enumerate(a) for y in a[i + 1:]] if kind.within
                      else [(x, y) for x in a for y in b])
            out[name] = [self.pair(x, y, align=kind.align, variant=kind.variant, method=kind.method)
                         for x, y in combos]
        return out


def _members(models: dict, side: str) -> list[str]:
    got = models.get(side)
    return [got] if isinstance(got, str) else list(got or [])


def _centres_needed(kinds: Sequence[str]) -> set[str]:
    return {c for k in kinds for c in pairkinds.KINDS[k].centres}


def build_plan(cfg: Config) -> Plan:
    """Expand a study config into tasks (topologically ordered) and a layout saying what is what."""
    st = cfg.study
    b = _Builder(cfg)
    base = cfg.model_dump(mode="json")
    kinds = pairkinds.with_variants(st.pairs, st.eval.variants, st.eval.methods)
    sw = st.sweeps
    pool = max([st.n_sources, *sw.n_sources])
    sources_all, heldouts = b.population(base, pool, st.n_heldouts)
    sources = sources_all[:st.n_sources]
    centres = _centres_needed(kinds)
    stars = b.stars(base, sources, "") if ("star" in centres or st.bma or sw.n_sources or sw.t_sampling) else []
    avg = b.average(base, sources, "") if "average" in centres else None
    merged = b.merge(base, sources, "") if "merged" in centres else None
    # "star": the list of stars (a star kind pairs every star with every member of its other side)
    main = {"sources": sources, "heldouts": heldouts, "star": stars, "average": avg, "merged": merged}
    main["pairs"] = b.pairs(kinds, main)
    layout: dict[str, Any] = {"main": main, "sweeps": {}}
    if st.bma and stars:
        layout["bma"] = b.bma(stars[0], sources)  # BMA around the first star

    if sw.n_sources:
        rows = []
        for k in sorted(set(sw.n_sources)):
            s_k = b.stars(base, sources_all[:k], f"-z{k}")
            rows.append({"value": k, "star": s_k,
                         "pairs": b.pairs(["star_heldout"], {"heldouts": heldouts, "star": s_k})})
        layout["sweeps"]["n_sources"] = rows
    if sw.t_sampling:
        if "star" not in base:
            raise UserError("study.sweeps.t_sampling needs the star section (stardomain.starlight)")
        rows = []
        for scheme in dict.fromkeys(sw.t_sampling):
            cfgd = deep_merge(base, {"star": {"t_sampling": scheme}})
            validate(Config, cfgd, f"study.sweeps.t_sampling={scheme}")
            s_t = b.stars(cfgd, sources, f"-t{scheme}")
            rows.append({"value": scheme, "star": s_t,
                         "pairs": b.pairs(["star_heldout"], {"heldouts": heldouts, "star": s_t})})
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
            s_v = b.stars(cfgd, src_v, tag)
            kinds_v = pairkinds.with_variants(["star_heldout", "regular_regular"], [], st.eval.methods)
            rows.append({"value": v, "star": s_v, "sources": src_v, "heldouts": ho_v,
                         "pairs": b.pairs(kinds_v, {"sources": src_v, "heldouts": ho_v, "star": s_v})})
        layout["sweeps"][dim] = rows
    return Plan(list(b.tasks.values()), layout)

