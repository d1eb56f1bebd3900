"""stardomain.utils: the one JSON-safety function (both of its former meanings, by example), device
resolution and factory imports, and that the old import paths still work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stardomain.errors import UserError
from stardomain.utils import import_object, is_timing_key, json_safe, resolve_device

RECORD = {"barrier": {"train_loss": float("nan"), "test_loss": float("inf"), "drop": -float("inf"), "acc": 0.5},
          "seconds": 1.5, "align_seconds": 0.1, "fit_time": 2.0, "wall": 3.0, "time_points": [0, 1],
          "n": np.float32(0.25), "grid": np.arange(3), "tensor": torch.tensor([1.0, 2.0]), "pair": (1, "a"),
          "flag": np.bool_(True), 7: Path("models/a.safetensors")}


def test_json_safe_default_nulls_non_finite_and_keeps_timings():
    """bma's former `_json_safe`: NaN and ±inf -> null, nothing dropped."""
    assert json_safe(RECORD) == {
        "barrier": {"train_loss": None, "test_loss": None, "drop": None, "acc": 0.5},
        "seconds": 1.5, "align_seconds": 0.1, "fit_time": 2.0, "wall": 3.0, "time_points": [0, 1],
        "n": 0.25, "grid": [0, 1, 2], "tensor": [1.0, 2.0], "pair": [1, "a"], "flag": True,
        "7": "models/a.safetensors"}


def test_json_safe_for_records_drops_timings_and_clamps_infinity():
    """the study's former `_json_safe`: timing fields left out, ±inf as ±1e308, NaN -> null."""
    out = json_safe(RECORD, drop_timings=True, infinity=1e308)
    assert out == {"barrier": {"train_loss": None, "test_loss": 1e308, "drop": -1e308, "acc": 0.5},
                   "time_points": [0, 1], "n": 0.25, "grid": [0, 1, 2], "tensor": [1.0, 2.0], "pair": [1, "a"],
                   "flag": True, "7": "models/a.safetensors"}
    json.dumps(out, allow_nan=False)  # strict JSON
    assert type(out["n"]) is float and type(out["flag"]) is bool


@pytest.mark.parametrize("key,timing", [("seconds", True), ("wall_seconds", True), ("star_seconds", True),
                                        ("fit_time", True), ("timings", True), ("elapsed", True),
                                        ("seconds_per_model", True),
                                        ("time_points", False), ("second", False), ("times", False)])
def test_timing_keys(key, timing):
    assert is_timing_key(key) is timing


def test_resolve_device_and_import_object():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert import_object("math:sqrt", "factory") is math.sqrt
    with pytest.raises(UserError, match="has no attribute nope"):
        import_object("math:nope", "factory")
    with pytest.raises(UserError, match="must look like"):
        import_object("math", "factory")


def test_old_import_paths_still_work():
    from stardomain.data import import_object as old_import
    from stardomain.training import resolve_device as old_resolve

    assert old_import is import_object and old_resolve is resolve_device
