"""Small helpers every layer uses: device resolution, importing a user's "pkg.mod:attr" factory, and
turning nested results into plain JSON. Depends only on torch, the config's patterns and errors."""

from __future__ import annotations

import importlib
import math
import re
from typing import Any

import torch

from .config import DEVICE_PATTERN
from .errors import UserError

# Fields that hold wall-clock times: they vary run to run, so results files leave them out.
TIMING_KEYS = frozenset({"timings", "seconds", "time", "elapsed", "wall", "wall_seconds"})


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto, cpu, cuda, cuda:N or mps -> a device that exists here; anything else is a UserError."""
    name = str(device)
    if not re.match(DEVICE_PATTERN, name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise UserError(f"unknown device {shown!r}; use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available here; use --device auto or cpu")
    return torch.device(name)


def import_object(spec: str, what: str):
    """"pkg.mod:attr" -> a callable; a clear error when it cannot be found. Imports run the module's
    code: callers that got `spec` from a file check it with stardomain.safety first."""
    mod_name, _, attr = str(spec).partition(":")
    if not mod_name.strip() or not attr.strip() or mod_name.startswith("."):
        raise UserError(f"{what} {spec!r} must look like 'package.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise UserError(f"{what} {spec!r}: cannot import {mod_name} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{what} {spec!r}: module {mod_name} has no attribute {attr}") from None
    if not callable(obj):
        raise UserError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def is_timing_key(key: Any) -> bool:
    k = str(key)
    return k in TIMING_KEYS or k.endswith("_seconds") or k.startswith("seconds_") or k.endswith("_time")


def json_safe(obj: Any, *, drop_timings: bool = False, infinity: float | None = None) -> Any:
    """Plain JSON types (strict JSON has no NaN or Infinity): NaN -> None; ±inf -> None, or ±`infinity`
    when given (a study's records keep the sign of an unbounded barrier that way); arrays and tensors via
    `tolist`, dict keys as strings, anything else as its str. `drop_timings`: leave out timing fields
    (`is_timing_key`), so the result does not change from run to run."""
    def conv(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items() if not (drop_timings and is_timing_key(k))}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if hasattr(o, "tolist"):
            return conv(o.tolist())
        if isinstance(o, float) and not math.isfinite(o):
            return None if math.isnan(o) or infinity is None else math.copysign(infinity, o)
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        return str(o)

    return conv(obj)


def round_floats(obj: Any, digits: int) -> Any:
    """Every float in nested dicts and lists to `digits` significant digits (ints, bools, None kept)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [round_floats(v, digits) for v in obj]
    return obj
