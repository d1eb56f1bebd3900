"""Model-file front ends for the CLI: align two files, describe a file's permutation spec."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..checkpoint import build_from_meta, read_model_file, read_pair, save_model
from ..errors import UserError
from .align import CoverageWarning, align, spec_for
from .spec import PermutationSpec


def example_input(meta: dict) -> torch.Tensor:
    """Zeros of shape (2, *input_shape): enough to trace shapes (weights and values are irrelevant)."""
    return torch.zeros(2, *[int(s) for s in meta["data"]["input_shape"]])


def data_batch(meta: dict, n: int = 512) -> torch.Tensor:
    """The first n training inputs of the file's data set (for activation matching)."""
    from ..data import get_dataset

    data = get_dataset(meta["data"]["config"])
    x = getattr(data.train, "x", None)
    if x is None:
        x = torch.stack([data.train.dataset[i][0] for i in range(min(n, len(data.train.dataset)))])
    return x[:n].float()


def spec_file(path: str | Path) -> tuple[PermutationSpec, dict]:
    sd, meta = read_model_file(path)
    return spec_for(build_from_meta(meta), example_input(meta)), meta


def align_files(path_a: str | Path, path_b: str | Path, out: str | Path, *, method: str = "weight",
                seed: int = 0, max_iter: int = 100, init: str = "informed", strict: bool = False) -> dict:
    """Write pi(B), aligned to A, to `out` (B's metadata plus `alignment` provenance). -> the record
    (distances to A are over parameters: "distance_over": "parameters"). rec["warnings"] says when the
    model could not be captured or nothing is permutable; strict: refuse (UserError) instead."""
    sd_a, meta_a, sd_b, meta_b = read_pair(path_a, path_b, "align")
    model = build_from_meta(meta_a)
    x = example_input(meta_a)
    if strict:
        problems = spec_for(model, x).problems()
        if problems:
            raise UserError(f"--strict: {problems[0]}")
    data_x = data_batch(meta_a) if method == "activation" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)  # the record carries them; the CLI prints them
        sd_p, info = align(model, sd_a, sd_b, example_input=x, method=method, data_x=data_x, seed=seed,
                           check=True, max_iter=max_iter, init=init)
    rec = {k: info[k] for k in ("method", "iterations", "converged", "groups", "distance_before", "distance_after",
                                "distance_over", "equivalence_error", "seconds", "permutable_fraction",
                                "capture", "capture_error", "warnings")}
    rec.update({"init": info.get("init"), "seed": seed, "reference": str(path_a), "reference_sha256": meta_a["sha256"],
                "source": str(path_b), "source_sha256": meta_b["sha256"]})
    meta = {k: v for k, v in meta_b.items() if k != "sha256"}
    meta["alignment"] = {**rec, "perm": info["perm"]}
    saved = save_model(out, sd_p, meta)
    rec["out"] = str(out)
    rec["out_sha256"] = saved["sha256"]
    return rec
