"""The Python API: the CLI's verbs as functions over live objects (`import stardomain as sd`).

Every verb takes what a notebook has at hand: a config (a `Config`, a dict, a YAML path or None for the
defaults) plus overrides; a model as a live `nn.Module`, a zero-argument callable building one, or the
config's; data as a registered name, a `DataBundle`, tensors `(x, y)` or a dict {"train": ..., "test": ...}
of `(x, y)`, Datasets or DataLoaders (a bare `(x, y)`, Dataset or DataLoader serves as both train and test
split, so its test metrics are training metrics). Results are small frozen dataclasses: `Trained` (sd.train, sd.star,
sd.load), `Aligned`, `Barrier`, `BMA`, `Study`; each carries what the next verb needs, so
`sd.barrier(sd.train(seed=0), sd.train(seed=1))` works without repeating the model or data.

Seeding: a live module is an architecture, not an initialisation. With `init="seed"` (the default) a deep
copy is re-initialised under the seed (`reset_parameters()` of every submodule), so the same seed gives the
same weights as it does for config models; `init="as_given"` trains from the module's own weights.
A DataLoader is read for its `dataset` only: its batching and shuffling are replaced by the config's
recipe (train.batch_size, seeded order), so results stay seeded and reproducible.
"""

from __future__ import annotations

import copy
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import checkpoint
from . import data as _data
from .averaging import BMASettings
from .averaging import evaluate_predictors as _evaluate_predictors
from .barriers import BarrierSettings
from .barriers import measure as _measure
from .report.averaging import predictors as _predictors
from .report.averaging import table as _table
from .report.barriers import plot as _plot
from .config import Config, apply_overrides, load_config, set_path, validate
from .errors import UserError
from .report.study import study_html as _study_html
from .starlight import train_star
from .training import StopRule, check_output, fit_record, init_model, model_meta
from .training import train as train_one
from .utils import resolve_device

__all__ = ["Config", "train", "star", "align", "barrier", "bma", "run", "load", "save",
           "Trained", "Aligned", "Barrier", "BMA", "Study"]

StateDict = dict[str, torch.Tensor]
LIVE = "live"  # the name a model file records for an architecture or data set given as a live object


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class Trained:
    """A trained model: `model` (eval mode), its `state_dict`, `metrics` {"train": {loss, acc}, "test": ...}
    and `meta` (what a model file records). `config` and `data` travel along for the next verb."""

    model: nn.Module
    state_dict: StateDict
    metrics: dict
    meta: dict
    config: Config | None = field(default=None, repr=False, compare=False)
    data: Any = field(default=None, repr=False, compare=False)

    def save(self, path: str | Path) -> dict:
        """Write a model file (`sd.save`). -> its metadata."""
        return save(self, path)


@dataclass(frozen=True)
class Aligned:
    """B permuted to match A: `state_dict` computes B's function; `perm` maps group -> index tensor;
    `info` holds distances before/after, the equivalence error and timings."""

    state_dict: StateDict
    perm: dict[str, torch.Tensor]
    info: dict


@dataclass(frozen=True)
class Barrier:
    """A loss-barrier `record` (the JSON `stardomain barrier` writes)."""

    record: dict

    @property
    def barrier(self) -> dict:
        """The barrier numbers (train/test loss and accuracy, with the t where each peaks)."""
        return self.record["barrier"]

    @property
    def curve(self) -> dict:
        """{"t": [...], "train": {"loss", "acc"}, "test": {...}} along the path."""
        return {k: self.record[k] for k in ("t", "train", "test")}

    def plot(self, path: str | Path | None = None) -> bytes:
        """PNG of the curve (written to `path` when given). -> the PNG bytes."""
        return _plot(self.record, path)

    def _repr_png_(self) -> bytes:  # a notebook shows the curve
        return self.plot()


@dataclass(frozen=True)
class BMA:
    """Every predictor's scores (`result`, the JSON `stardomain bma` writes)."""

    result: dict

    @property
    def predictors(self) -> list[str]:
        return _predictors(self.result)

    def table(self) -> str:
        """The plain-text table `stardomain bma` prints (one row per predictor)."""
        return _table(self.result)

    def _repr_html_(self) -> str:  # a notebook shows the table
        return f"<pre>{html.escape(self.table())}</pre>"


@dataclass(frozen=True)
class Study:
    """A finished study: its folder `path` and `results` (results.json)."""

    path: Path
    results: dict

    def _repr_html_(self) -> str:  # a notebook shows the verdict and the tables
        return _study_html(self.results)


# ---------------------------------------------------------------- inputs

def _config(config: Config | Mapping | str | Path | None, overrides: Sequence[str] | Mapping | None) -> Config:
    """Any config form + overrides ("train.epochs=2" strings, or a {"train.epochs": 2} dict) -> Config."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [(None, o) for o in (overrides or [])]
    if isinstance(config, (str, Path)):
        cfg = load_config(config, [o for k, o in items if k is None])
        raw = cfg.model_dump()
        items = [(k, v) for k, v in items if k is not None]
    elif isinstance(config, Config):
        raw = config.model_dump()
    elif isinstance(config, Mapping) or config is None:
        raw = copy.deepcopy(dict(config or {}))
    else:
        raise UserError(f"config must be a Config, a dict or a YAML path, not {type(config).__name__}")
    raw = apply_overrides(raw, [o for k, o in items if k is None])
    for k, v in items:
        if k is not None:
            set_path(raw, str(k).split("."), v)
    return validate(Config, raw)


def _split(v: Any, name: str) -> _data.Split:
    """(x, y), a Dataset or a DataLoader (its dataset) -> Split; tensors when the Dataset holds them."""
    if isinstance(v, DataLoader):
        v = v.dataset
    if isinstance(v, TensorDataset) and len(v.tensors) == 2:
        v = tuple(v.tensors)
    return _data._to_split(v, name)


def _bundle(data: Any, num_classes: int | None) -> _data.DataBundle:
    """Live data -> a checked DataBundle (`data.check_bundle`, the checks a factory's data gets).
    A bare (x, y) is both train and test split: test metrics are then training metrics."""
    if isinstance(data, _data.DataBundle):
        return _data.check_bundle(data)
    if isinstance(data, (tuple, list, Dataset, DataLoader)):
        data = {"train": data, "test": data}
    if not isinstance(data, Mapping) or "train" not in data or "test" not in data:
        raise UserError("data must be a data set name, a DataBundle, (x, y), a Dataset, a DataLoader or "
                        "a dict with 'train' and 'test'")
    splits = {k: _split(data[k], k) for k in ("train", "test", "val") if data.get(k) is not None}
    train = splits["train"]
    if len(train) == 0:
        raise UserError("data: the train split is empty")
    if num_classes is None:
        if train.y is None:
            raise UserError("data given as a Dataset of its own kind needs num_classes=")
        num_classes = int(max(int(s.y.max()) for s in splits.values() if s.y is not None)) + 1
    x0 = train.x[0] if train.x is not None else train.dataset[0][0]
    return _data.check_bundle(_data.DataBundle(name=LIVE, train=train, test=splits["test"], val=splits.get("val"),
                                               num_classes=int(num_classes), input_shape=tuple(x0.shape)))


def _resolve_data(data: Any, cfg: Config, num_classes: int | None) -> tuple[Config, _data.DataBundle]:
    if data is None:
        return cfg, _data.get_dataset(cfg.data)
    if isinstance(data, str):
        cfg = validate(Config, {**cfg.model_dump(), "data": {**cfg.data.model_dump(), "name": data, "factory": None}})
        return cfg, _data.get_dataset(cfg.data)
    return cfg, _bundle(data, num_classes)


def _reset(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of `module` re-initialised under `seed` (every submodule's reset_parameters())."""
    m = copy.deepcopy(module)
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in m.modules():
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                covered.update(id(p) for p in sub.parameters())
    left = [n for n, p in m.named_parameters() if id(p) not in covered]
    if left:
        raise UserError(f"cannot re-initialise {left[:3]} from the seed (no reset_parameters()); pass a callable "
                        "that builds the module, or init='as_given' to train from its own weights")
    return m


def _resolve_model(model: Any, cfg: Config, data: _data.DataBundle, seed: int, init: str) -> nn.Module:
    """The seeded initial module (see the module docstring on `init`)."""
    if init not in ("seed", "as_given"):
        raise UserError(f"init must be 'seed' or 'as_given', not {init!r}")
    if model is None:
        return init_model(cfg, data, seed)
    if isinstance(model, nn.Module):
        built = _reset(model, seed) if init == "seed" else copy.deepcopy(model)
    elif callable(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = model()
        if not isinstance(built, nn.Module):
            raise UserError(f"the model callable returned {type(built).__name__}, not an nn.Module")
    else:
        raise UserError(f"model must be an nn.Module or a callable building one, not {type(model).__name__}")
    check_output(built, data)
    return built


def _meta(cfg: Config, data: _data.DataBundle, module: nn.Module, live_model: bool, seed: int, role: str,
          **extra: Any) -> dict:
    """model_meta, with live objects recorded as "live:<Class>" (such files reload with sd.load(model=))."""
    meta = model_meta(cfg, data, seed, role, **extra)
    if live_model:
        meta["model"] = {"name": f"{LIVE}:{type(module).__name__}", "factory": None, "kwargs": {}}
    if data.name == LIVE:
        meta["data"]["config"] = {**cfg.data.model_dump(), "name": LIVE, "factory": None}
    return meta


def _trained(module: nn.Module, metrics: dict, meta: dict, cfg: Config, data) -> Trained:
    module.eval()
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return Trained(module, sd, metrics, meta, cfg, data)


# ---------------------------------------------------------------- verbs

def train(config: Config | Mapping | str | Path | None = None, *, model: Any = None, data: Any = None,
          seed: int = 0, overrides: Sequence[str] | Mapping | None = None, init: str = "seed",
          num_classes: int | None = None, device: str = "auto", progress: bool | None = False) -> Trained:
    """Train one model from its seed, like `stardomain train`. -> Trained (model in eval mode, metrics).

    config: a Config, dict, YAML path or None (defaults); overrides: ["train.epochs=2"] or {"train.epochs": 2};
    model: an nn.Module (re-initialised from the seed unless init="as_given") or a callable building one;
    data: a data set name, DataBundle, (x, y), Dataset, DataLoader or {"train": ..., "test": ...};
    num_classes: needed only for Datasets that do not hold tensors. With neither `model` nor `data` given
    this is exactly `train.train(cfg, seed)` (same weights)."""
    cfg = _config(config, overrides)
    cfg, bundle = _resolve_data(data, cfg, num_classes)
    module = _resolve_model(model, cfg, bundle, seed, init)
    dev = resolve_device(device)
    history: list[dict] = []
    module, metrics = train_one(cfg, seed, device=dev, progress=progress, history=history, model=module,
                                data=bundle)
    meta = _meta(cfg, bundle, module, model is not None, seed, "source", metrics=metrics, device=dev,
                 history=history, fit=fit_record(StopRule.of(cfg.train.stop), cfg.train.epochs, history))
    return _trained(module, metrics, meta, cfg, bundle)


def _state(x: Any) -> StateDict:
    """A Trained, an Aligned, a state dict or a model-file path -> state dict."""
    if isinstance(x, (Trained, Aligned)):
        return x.state_dict
    if isinstance(x, nn.Module):
        return x.state_dict()
    if isinstance(x, (str, Path)):
        return checkpoint.read_model_file(x)[0]
    if isinstance(x, Mapping):
        return dict(x)
    raise UserError(f"expected a Trained result, a state dict or a model file, not {type(x).__name__}")


def _fitting(arch: nn.Module, x: Any, what: str) -> StateDict:
    """x's state dict, checked against the architecture it is loaded into (and for NaN or infinite weights)."""
    sd = _state(x)
    checkpoint.check_fits(arch.state_dict(), sd, what, against="the model (give weights of one architecture)")
    return sd


def _first_trained(*xs: Any) -> Trained | None:
    for x in xs:
        if isinstance(x, (str, Path)):
            x = load(x)
        if isinstance(x, Trained):
            return x
    return None


def _context(ref: Trained | None, model: Any, data: Any, num_classes: int | None = None
             ) -> tuple[nn.Module, _data.DataBundle, Config]:
    """The architecture, data and config a verb on existing weights needs: given, or from a Trained."""
    cfg = ref.config if ref is not None and ref.config is not None else Config()
    if data is not None:
        cfg, bundle = _resolve_data(data, cfg, num_classes)
    elif ref is not None:
        bundle = ref.data if ref.data is not None else checkpoint.data_from_meta(ref.meta)
    else:
        raise UserError("give data= (or pass Trained results, which carry their data)")
    if isinstance(model, nn.Module):
        arch = model
    elif callable(model):
        arch = model()
    elif ref is not None:
        arch = ref.model
    else:
        raise UserError("give model= (or pass Trained results, which carry their model)")
    return arch, bundle, cfg


def star(sources: Sequence[Any], config: Config | Mapping | str | Path | None = None, *, model: Any = None,
         data: Any = None, seed: int = 0, overrides: Sequence[str] | Mapping | None = None, init: str = "seed",
         device: str = "auto", progress: bool | None = False) -> Trained:
    """Train a star model from `sources` (Trained results, state dicts or model files) with Starlight, like
    `stardomain star`. Config, model and data default to the first Trained source's. -> Trained
    (meta["star"] holds the settings, steps, alignments and per-epoch history)."""
    ref = _first_trained(*sources)
    base = config if config is not None else (ref.config if ref is not None else None)
    cfg = _config(base, overrides)
    if data is None and ref is not None and ref.data is not None:
        bundle = ref.data
    else:
        cfg, bundle = _resolve_data(data, cfg, None)
    live = model is not None or (ref is not None and (ref.meta["model"].get("name") or "").startswith(LIVE + ":"))
    arch = model if model is not None else (ref.model if live else None)
    module = _resolve_model(arch, cfg, bundle, seed, init)
    sds = [_state(s) for s in sources]
    out, info = train_star(cfg, sds, seed=seed, device=device, progress=progress, data=bundle, model=module)
    extra = {k: info[k] for k in ("epochs", "steps", "seconds", "align_seconds", "alignments", "history")}
    meta = _meta(cfg, bundle, out, live, seed, "star", device=info["device"], history=info["fit_history"],
                 metrics=info["metrics"], star={**info["star"], **extra}, fit=info["fit"],
                 sources=[{"sha256": checkpoint.weights_sha256(sd)} for sd in sds])
    return _trained(out, info["metrics"], meta, cfg, bundle)


def _example(bundle: _data.DataBundle, n: int = 2) -> torch.Tensor:
    return _data.first_inputs(bundle.train, n)


def align(a: Any, b: Any, *, model: Any = None, data: Any = None, example_input: Any = None,
          method: str = "weight", seed: int = 0, check: bool = True, variant: str = "full",
          learned: Any = None) -> Aligned:
    """Permute B's units to best match A, like `stardomain align`: weight matching, "activation" (a
    training batch's correlations), or learned from the loss along the path on the training split, "ste"
    or "sinkhorn" (settings `learned`: a LearnedAlignConfig or dict; docs/method.md). The result computes
    B's function (checked unless check=False). `variant`: align only "heads", "mlp" or "stream" groups
    (stardomain.permute.VARIANTS). -> Aligned."""
    ref = _first_trained(a, b)
    if example_input is not None and method == "weight" and data is None and model is not None:
        arch = model if isinstance(model, nn.Module) else model()  # nothing else is needed
        x, data_x = example_input, None
    else:
        arch, bundle, _ = _context(ref, model, data)
        x = example_input if example_input is not None else _example(bundle)
        data_x = {"activation": _example(bundle, 256), "ste": bundle, "sinkhorn": bundle}.get(method)
    from .permute import MatchingOptions, align as permute_align

    sd_p, info = permute_align(copy.deepcopy(arch).cpu(), _fitting(arch, a, "model A"), _fitting(arch, b, "model B"),
                               example_input=x, method=method,
                               data_x=data_x, seed=seed, check=check, variant=variant,
                               options=MatchingOptions(learned=learned))
    perm = {k: torch.as_tensor(v) for k, v in info.pop("perm").items()}
    return Aligned(sd_p, perm, info)


def barrier(a: Any, b: Any, *, model: Any = None, data: Any = None, points: int = 11, align: bool | str = True,
            seed: int = 0, device: str | None = None, **kwargs: Any) -> Barrier:
    """Loss barrier along the straight path from A to B (B aligned to A first unless align=False; a variant
    name such as "heads" aligns only those groups), like `stardomain barrier`. Other keywords are fields of
    `barriers.BarrierSettings` (align_method, learned, refine, repair, temperature, bn_batches, ...)."""
    arch, bundle, _ = _context(_first_trained(a, b), model, data)
    settings = _settings(BarrierSettings, points=points, align=align, seed=seed, **kwargs)
    rec = _measure(copy.deepcopy(arch), _fitting(arch, a, "model A"), _fitting(arch, b, "model B"), bundle, settings,
                   device=resolve_device(device or "auto"))
    return Barrier(rec)


def bma(star_model: Any, sources: Sequence[Any], *, model: Any = None, data: Any = None, k: int = 32,
        seeds: int = 3, seed: int = 0, align: bool = True, device: str = "auto", **kwargs: Any) -> BMA:
    """Score the star, the sources, their ensemble and the BMA predictors on the test split, like
    `stardomain bma`. Other keywords are fields of `averaging.BMASettings` (ns, ood, bn_batches, ...)."""
    ref = _first_trained(star_model, *sources)
    arch, bundle, cfg = _context(ref, model, data)
    settings = _settings(BMASettings, k=k, seeds=seeds, seed=seed, align=align, **kwargs)
    res = _evaluate_predictors(cfg, _fitting(arch, star_model, "the star"),
                               [_fitting(arch, s, f"source {i}") for i, s in enumerate(sources)], settings, device=device,
                               data=bundle, model=copy.deepcopy(arch).cpu())
    return BMA(res)


def _settings(cls, **fields: Any):
    """A settings object from keywords; an unknown keyword is a UserError naming the known ones."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}; {cls.__name__} has {', '.join(sorted(known))}")
    if isinstance(fields.get("ns"), list):
        fields["ns"] = tuple(fields["ns"])
    if isinstance(fields.get("ts"), list):
        fields["ts"] = tuple(fields["ts"])
    return cls(**fields)


def run(config: Config | Mapping | str | Path | None, out: str | Path, *,
        overrides: Sequence[str] | Mapping | None = None, executor: str = "local", progress: bool | None = False,
        report: bool = True, force: bool = False, workers: int | None = None, **kwargs: Any) -> Study:
    """Run (or resume) a whole study into the folder `out`, like `stardomain run`. -> Study.

    workers: tasks run at once, as `--workers` (the local executor's process pool starts its workers by
    spawning, so a script calling this with workers > 1 needs the usual `if __name__ == "__main__":`).
    Other keywords go to `study.run_study` (ray_address, ...)."""
    from .study import run_study

    res = run_study(_config(config, overrides), out, executor=executor, progress=progress, report=report,
                    force=force, num_workers=workers, **kwargs)
    return Study(Path(out), res)


def load(path: str | Path, *, model: Any = None, device: str = "cpu") -> Trained:
    """Read a model file (weights verified against its digest) -> Trained. Files of a live architecture
    ("live:<Class>") need `model=` (the module or a callable); the data is built on first use."""
    sd, meta = checkpoint.read_model_file(path)
    if model is None:
        module = checkpoint.build_from_meta(meta, str(path), weights=sd)
    else:
        module = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the architecture ({str(e).strip().splitlines()[-1][:200]})") \
            from None
    cfg = None
    if isinstance(meta.get("config"), dict):
        try:
            cfg = validate(Config, meta["config"])
        except UserError:
            cfg = None
    module.to(device).eval()
    return Trained(module, sd, meta.get("metrics") or {}, meta, cfg, None)


def save(obj: Trained | Mapping, path: str | Path, *, meta: Mapping | None = None) -> dict:
    """Write a model file atomically (safetensors + metadata). `obj`: a Trained (its meta, updated by
    `meta`) or a state dict (then `meta` needs model, data, seed and role, as model files do). -> metadata."""
    if isinstance(obj, Trained):
        sd, m = obj.state_dict, {**obj.meta, **(meta or {})}
    elif isinstance(obj, Mapping):
        sd, m = dict(obj), dict(meta or {})
    else:
        raise UserError(f"sd.save takes a Trained result or a state dict, not {type(obj).__name__}")
    try:
        return checkpoint.save_model(path, sd, m)
    except ValueError as e:
        raise UserError(f"sd.save: {e}") from None

