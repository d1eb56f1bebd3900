"""Self-describing model files: one .safetensors file, JSON metadata under the key "stardomain".

Writes are atomic (temp file + rename). Loading never unpickles: the file is parsed by safetensors,
its metadata validated and the weights' sha256 checked before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import UserError

FORMAT_VERSION = 1
META_KEY = "stardomain"
REQUIRED = ("format_version", "model", "data", "seed", "role", "sha256")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, dtypes, shapes and bytes, independent of dict order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import numpy
    import safetensors

    from . import __version__

    return {"stardomain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_model(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """Save weights + metadata atomically. `meta` needs model, data, seed, role; the rest is filled in."""
    tensors = _plain(state_dict)
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("versions", package_versions())
    meta["sha256"] = weights_sha256(tensors)
    for k in REQUIRED:
        if k not in meta:
            raise ValueError(f"model metadata needs {k!r}")
    blob = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, blob)
    return meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (-1,)
    if not (0 < hlen <= len(data) - 8 and data[8:9] == b"{"):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise UserError(f"{path}: this is a pickle/torch.save file; stardomain only reads .safetensors "
                            "and never unpickles (convert it with safetensors.torch.save_file)")
        raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt header)")
    try:
        header = json.loads(data[8:8 + hlen])
        tensors = st_load(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt: {e})") from None
    return tensors, header.get("__metadata__") or {}


def read_model_file(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (state dict, metadata), validated: a pickle, a truncated file or a wrong sha256 is refused."""
    path = Path(path)
    tensors, raw_meta = _read_safetensors(path)
    if META_KEY not in raw_meta:
        raise UserError(f"{path}: a safetensors file without stardomain metadata; it was not written by "
                        "stardomain (wrap foreign weights with `stardomain import`)")
    try:
        meta = json.loads(raw_meta[META_KEY])
    except json.JSONDecodeError:
        raise UserError(f"{path}: its stardomain metadata is not valid JSON") from None
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{path}: metadata lacks {', '.join(missing)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path}: format_version {meta['format_version']} is newer than this stardomain "
                        f"reads ({FORMAT_VERSION}); upgrade stardomain")
    if verify and weights_sha256(tensors) != meta["sha256"]:
        raise UserError(f"{path}: weights do not match the sha256 in its metadata (file corrupted or edited)")
    return tensors, meta


def build_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the architecture a model file describes (weights not loaded)."""
    from .models import build_model

    d = meta["data"]
    return build_model(meta["model"], tuple(d["input_shape"]), int(d["num_classes"]))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """-> (module with the file's weights, in eval mode, metadata)."""
    sd, meta = read_model_file(path)
    model = build_from_meta(meta)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path}: weights do not fit the architecture in its metadata "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model.to(device).eval(), meta


def compatible(meta_a: dict, meta_b: dict) -> str | None:
    """Why two model files cannot be compared or interpolated, or None if they can."""
    if meta_a["model"] != meta_b["model"]:
        return f"different architectures ({meta_a['model']} vs {meta_b['model']})"
    da, db = meta_a["data"], meta_b["data"]
    if da.get("config") != db.get("config"):
        return f"trained on different data ({da.get('config')} vs {db.get('config')})"
    return None


def read_pair(path_a: str | Path, path_b: str | Path, verb: str = "compare"):
    """Two model files that can be compared or interpolated -> (sd_a, meta_a, sd_b, meta_b); a UserError
    saying why not otherwise."""
    sd_a, meta_a = read_model_file(path_a)
    sd_b, meta_b = read_model_file(path_b)
    why = compatible(meta_a, meta_b)
    if why:
        raise UserError(f"cannot {verb} {path_a} and {path_b}: {why}")
    return sd_a, meta_a, sd_b, meta_b


# ---- training state (resume): tensors in safetensors, structure in JSON, nothing pickled ----

def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save a nested training state (model/optimizer state dicts, RNG states, counters) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "s", tensors)
    atomic_write_bytes(path, st_save(tensors, metadata={"state": json.dumps(structure)}))


def load_state(path: str | Path) -> dict[str, Any]:
    tensors, meta = _read_safetensors(Path(path))
    if "state" not in meta:
        raise UserError(f"{path}: not a stardomain training state")
    return _unflatten(json.loads(meta["state"]), tensors)
