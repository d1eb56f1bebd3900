"""The file front ends: what the CLI's commands and the study's tasks run. Each reads model files (and a
config), calls the computation of `training`, `starlight`, `barriers` or `averaging` on state dicts, and
writes its outputs atomically: model files with their `OUT.csv` history (resumable through `OUT.state`),
JSON records, plots. The computing modules themselves never open a path; permutation files have their
own front end beside the alignment code (`permute/files.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from .averaging import BMASettings, evaluate_predictors
from .barriers import BarrierSettings, measure
from .checkpoint import (HISTORY_HEAD, atomic_write_json, atomic_write_text, build_from_meta, check_layout, compatible,
                         data_from_meta, read_model_file, read_pair, save_model, weights_sha256)
from .config import Config, validate
from .data import get_dataset
from .errors import UserError
from .report.averaging import plot_result
from .safety import check_meta_factories
from .population import train_population
from .starlight import train_star
from .training import StopRule, fit_record, model_meta, train
from .utils import json_safe, resolve_device


# ---------------------------------------------------------------- training and Starlight

def write_history_csv(path: str | Path, history: list[dict]) -> None:
    """Per-epoch training metrics as CSV (epoch,loss,acc), written atomically beside the model file."""
    rows = [HISTORY_HEAD.strip()] + [f"{h['epoch']},{h['loss']!r},{'' if h.get('acc') is None else repr(h['acc'])}"
                                  for h in history]
    atomic_write_text(path, "\n".join(rows) + "\n")


def train_to_file(cfg: Config, seed: int, out: str | Path, *, role: str = "source", device: str = "auto",
                  progress: bool | None = None, on_epoch: Callable[[int, dict], None] | None = None
                  ) -> dict[str, Any]:
    """Train and write a model file; resumable through `OUT.state` (removed when done); the per-epoch
    metrics also go to `OUT.csv` (and to `on_epoch`, see `fit`). -> metadata."""
    out = Path(out)
    history: list[dict] = []
    model, metrics = train(cfg, seed, device=device, state_path=_state_path(out), progress=progress,
                           history=history, on_epoch=on_epoch)
    return _write_trained(cfg, seed, out, role, device, (model, metrics, history))


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def _write_trained(cfg: Config, seed: int, out: Path, role: str, device: str,
                   trained: tuple[torch.nn.Module, dict, list[dict]]) -> dict[str, Any]:
    """A trained regular model's file, history CSV and metadata (solo or stacked: the same form)."""
    model, metrics, history = trained
    meta = save_model(out, model.state_dict(), model_meta(cfg, get_dataset(cfg.data), seed, role, metrics=metrics,
                                                          device=resolve_device(device), history=history,
                                                          fit=fit_record(StopRule.of(cfg.train.stop),
                                                                         cfg.train.epochs, history)))
    write_history_csv(out.with_name(out.name + ".csv"), history)
    _state_path(out).unlink(missing_ok=True)
    return meta


def train_population_to_files(cfg: Config, seeds: Sequence[int], outs: Sequence[str | Path], roles: Sequence[str], *,
                              device: str = "auto", progress: bool | None = None) -> list[dict[str, Any]]:
    """`train_to_file` for a population of one recipe, trained stacked (`population.train_population`):
    each model gets the same file, history CSV, metadata and `OUT.state` resume file its solo run would.
    -> the metadata of each."""
    outs = [Path(o) for o in outs]
    trained = train_population(cfg, seeds, device=device, state_paths=[_state_path(o) for o in outs],
                               progress=progress)
    return [_write_trained(cfg, s, o, r, device, t) for s, o, r, t in zip(seeds, outs, roles, trained)]


class SourceFiles(Sequence):
    """Sources as model files, read on access: the originals stay on disk, so only the aligned copies
    (N models) live in memory. Each read is checked against the file's sha256."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.metas = [read_model_file(p)[1] for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, n):  # type: ignore[override]
        sd, meta = read_model_file(self.paths[n])
        if meta["sha256"] != self.metas[n]["sha256"]:
            raise UserError(f"{self.paths[n]} changed while the star was training")
        return sd

    def train_losses(self) -> list[float | None]:
        """Each source's training loss as its file records it (None where it records none): what a
        fit-matched star reads (starlight.source_train_losses)."""
        return [((m.get("metrics") or {}).get("train") or {}).get("loss") for m in self.metas]


def star_to_file(cfg: Config, source_paths: Sequence[str | Path], out: str | Path, *, seed: int = 0,
                 device: str | torch.device = "auto", progress: bool | None = None,
                 on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train a star from model files and write it (resumable through `OUT.state`, removed when done).
    The metadata lists the sources (path + sha256), the Starlight settings and final metrics. -> metadata."""
    if not source_paths:
        raise UserError("give at least one source model file (--sources F1 F2 ...)")
    files = SourceFiles(source_paths)
    data = get_dataset(cfg.data)
    want = {"model": cfg.model.model_dump(), "data": {"config": cfg.data.model_dump()}}
    for p, m in zip(files.paths, files.metas):
        why = compatible(want, m)
        if why:
            raise UserError(f"{p} does not match the config: {why}")
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    ids = [m["sha256"] for m in files.metas]
    model, info = train_star(cfg, files, seed=seed, device=device, state_path=state_path, progress=progress,
                             source_ids=ids, on_epoch=on_epoch)
    extra = {k: info[k] for k in ("epochs", "steps", "seconds", "align_seconds", "alignments", "history")}
    meta = save_model(out, model.state_dict(), model_meta(
        cfg, data, seed, "star", device=info["device"], history=info["fit_history"], metrics=info["metrics"],
        star={**info["star"], **extra}, fit=info["fit"],
        sources=[{"path": str(p), "sha256": m["sha256"], "seed": m.get("seed")}
                 for p, m in zip(files.paths, files.metas)]))
    write_history_csv(out.with_name(out.name + ".csv"), info["fit_history"])
    state_path.unlink(missing_ok=True)
    return meta


# ---------------------------------------------------------------- barriers and BMA

def measure_files(path_a, path_b, settings: BarrierSettings | None = None, *, device: str = "auto") -> dict:
    """`barriers.measure` on two model files; refuses incompatible pairs (UserError). Adds both files'
    paths and sha256 (and the sha256 of the aligned B that was interpolated)."""
    sd_a, meta_a, sd_b, meta_b = read_pair(path_a, path_b, "interpolate")
    model = build_from_meta(meta_a, str(path_a), weights=sd_a)
    data = data_from_meta(meta_a, str(path_a))
    rec = measure(model, sd_a, sd_b, data, settings, device=device)
    rec["files"] = {"a": str(path_a), "b": str(path_b)}
    rec["sha256"] = {"a": meta_a["sha256"], "b": meta_b["sha256"], "b_interpolated": rec["sha256"]["b"]}
    return rec


def bma_files(star_path, source_paths: Sequence, settings: BMASettings | None = None, *, fusion_path=None,
              json_out=None, plot=None, device: str = "auto", progress: Callable[[str], None] | None = None) -> dict:
    """Load the model files, check they fit together, evaluate every predictor, write JSON (NaN -> null)
    and the plot. The data set and architecture come from the star's metadata."""
    if not source_paths:
        raise UserError("give at least one source model file (--sources F1 F2 ...)")
    star_sd, star_meta = read_model_file(star_path)
    sources = [read_model_file(p) for p in source_paths]
    fusion = read_model_file(fusion_path) if fusion_path else None
    for p, (_, meta) in zip([*source_paths, *([fusion_path] if fusion else [])], [*sources, *([fusion] if fusion else [])]):
        why = compatible(star_meta, meta)
        if why:
            raise UserError(f"{p} cannot be compared with the star {star_path}: {why}")
    check_meta_factories(star_meta, str(star_path))  # its model and data are built below
    want = build_from_meta(star_meta, str(star_path), weights=star_sd).state_dict()
    for p, (sd, _) in zip([*source_paths, *([fusion_path] if fusion else [])], [*sources, *([fusion] if fusion else [])]):
        check_layout(want, sd, str(p), against=f"the star {star_path}'s architecture")
    cfg = validate(Config, {"data": star_meta["data"]["config"], "model": star_meta["model"]}, where=str(star_path))
    res = evaluate_predictors(cfg, star_sd, [sd for sd, _ in sources], settings, device=device,
                              fusion_sd=fusion[0] if fusion else None, progress=progress)
    res["_info"]["files"] = {"star": {"path": str(star_path), "sha256": weights_sha256(star_sd)},
                             "sources": [{"path": str(p), "sha256": weights_sha256(sd)}
                                         for p, (sd, _) in zip(source_paths, sources)]}
    if fusion:
        res["_info"]["files"]["fusion"] = {"path": str(fusion_path), "sha256": weights_sha256(fusion[0])}
    if json_out:
        atomic_write_json(json_out, json_safe(res))
    if plot:
        plot_result(res, plot)
    return res
