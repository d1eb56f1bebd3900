"""Self-describing model files: one .safetensors file, JSON metadata under the key "stardomain".

Writes are atomic (temp file + rename). Loading never unpickles and never imports what a file names:
the file is parsed by safetensors, its metadata size- and depth-limited, validated against a schema and
checked against its digest (format 2: the sha256 of the canonical metadata, which holds the weights'
sha256) before anything else reads it. A user factory named in the metadata is used only when allowed
(stardomain.safety).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import stat
import struct
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import DataConfig, ModelConfig, format_validation_error, result_identity
from .errors import UserError
from .safety import check_json_limits, check_meta_factories, check_regular_file

FORMAT_VERSION = 2  # 2: `digest` covers the metadata (1: only the weights were covered, by `sha256`)
META_KEY = "stardomain"
REQUIRED = ("format_version", "model", "data", "seed", "role", "sha256")
MAX_INPUT_NUMEL = 2**24  # numbers in one input example (3x1024x1024 is 3.1M)


# ---- the metadata schema: known fields typed (strictly: no "1.5" for a float), others kept ----

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class SplitMetrics(_Open):
    loss: float
    acc: float


class MetricsMeta(_Open):
    train: SplitMetrics | None = None
    test: SplitMetrics | None = None


class DataMeta(_Open):
    name: str | None = None
    config: DataConfig
    input_shape: list[Annotated[int, Field(ge=1, le=2**20)]] = Field(min_length=1, max_length=4)
    num_classes: int = Field(ge=1, le=10**6)
    train_size: int | None = Field(None, ge=0)
    input_dtype: Literal["int64"] | None = None  # token ids (next-token data); absent: float inputs

    @model_validator(mode="after")
    def _small_enough(self) -> "DataMeta":
        n = 1
        for s in self.input_shape:
            n *= s
        if n > MAX_INPUT_NUMEL:  # example inputs of this shape are allocated to trace the model
            raise ValueError(f"input_shape {tuple(self.input_shape)}: inputs hold {n:,} numbers each, more than "
                             f"{MAX_INPUT_NUMEL:,}")
        return self


_HEX64 = r"^[0-9a-f]{64}$"

# The dtypes an example input may ask for: names read from a file never reach getattr(torch, ...) unchecked.
EXAMPLE_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
MAX_EXAMPLE_NUMEL = 2**20  # numbers in one sample of all keyword inputs together


class ExampleInput(BaseModel):
    """One keyword input of an imported model: {"shape": [16], "dtype": "int64", "high": 30522}; samples
    are seeded draws (integers in [low, high), floats standard normal)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    shape: list[Annotated[int, Field(ge=1, le=2**20)]] = Field(max_length=8)
    dtype: Literal[EXAMPLE_DTYPES] = "float32"
    low: int = Field(0, ge=-(2**62), le=2**62)
    high: int = Field(2, ge=-(2**62), le=2**62)

    @model_validator(mode="after")
    def _range(self) -> "ExampleInput":
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        return self


def _check_examples(spec: dict[str, ExampleInput]) -> dict[str, ExampleInput]:
    n = sum(math.prod(s.shape) for s in spec.values())
    if n > MAX_EXAMPLE_NUMEL:
        raise ValueError(f"example inputs hold {n:,} numbers per sample, more than {MAX_EXAMPLE_NUMEL:,}")
    return spec


ExampleInputs = Annotated[dict[Annotated[str, Field(max_length=200)], ExampleInput],
                          Field(min_length=1, max_length=64), AfterValidator(_check_examples)]


class FileMeta(_Open):
    """The `stardomain` metadata of a model file (docs/architecture.md, "Contracts")."""

    format_version: int = Field(ge=1)
    model: ModelConfig
    data: DataMeta
    seed: int | None  # None: imported weights (`stardomain import`), trained elsewhere
    role: str = Field(max_length=100)
    sha256: str = Field(pattern=_HEX64)  # the weights' digest (pair records, star sources rely on it)
    digest: str | None = Field(None, pattern=_HEX64)  # format 2: sha256 of the canonical metadata
    metrics: MetricsMeta | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    sources: list[dict[str, Any]] | None = None
    alignment: dict[str, Any] | None = None
    star: dict[str, Any] | None = None
    example_input: ExampleInputs | None = None  # keyword inputs of an imported model (stardomain import)


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the metadata in canonical JSON, without the `digest` field itself. The metadata holds
    the weights' sha256, so this one digest covers weights and metadata."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                          .encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared as the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
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

    from ._version import __version__

    return {"stardomain": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def save_model(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    """Save weights + metadata atomically. `meta` needs model, data, seed, role; the rest is filled in."""
    tensors = _plain(state_dict)
    meta = {k: v for k, v in meta.items() if k != "digest"}
    meta["format_version"] = FORMAT_VERSION  # written now, so in this version's format
    meta.setdefault("versions", package_versions())
    meta["sha256"] = weights_sha256(tensors)
    for k in REQUIRED:
        if k not in meta:
            raise ValueError(f"model metadata needs {k!r}")
    meta = json.loads(json.dumps(meta))  # plain JSON types: exactly what a reader will see and digest
    meta["digest"] = meta_digest(meta)
    blob = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, blob)
    return meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_regular_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    (hlen,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (-1,)
    if not (0 < hlen <= len(data) - 8 and data[8:9] == b"{"):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise UserError(f"{path}: this is a pickle/torch.save file; stardomain only reads .safetensors "
                            "and never unpickles (convert it with safetensors.torch.save_file)")
        raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt header)")
    check_json_limits(data[8:8 + hlen], f"{path}: the safetensors header", max_bytes=64 * 2**20, max_depth=8)
    try:
        header = json.loads(data[8:8 + hlen])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = st_load(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt: {str(e)[:200]})") from None
    md = header.get("__metadata__") or {}
    return tensors, md if isinstance(md, dict) else {}


def read_model_file(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (state dict, metadata), validated: a pickle, a truncated file, metadata that is too big, too
    deep, of the wrong shape or edited (format 2), or a wrong weights sha256 is refused. Nothing the
    metadata names is imported here."""
    path = Path(path)
    tensors, raw_meta = _read_safetensors(path)
    if META_KEY not in raw_meta:
        raise UserError(f"{path}: a safetensors file without stardomain metadata; it was not written by "
                        "stardomain (wrap foreign weights with `stardomain import`)")
    meta = parse_meta(raw_meta[META_KEY], str(path))
    if verify and weights_sha256(tensors) != meta["sha256"]:
        raise UserError(f"{path}: weights do not match the sha256 in its metadata (file corrupted or edited)")
    check_weights(tensors, str(path))
    return tensors, meta


# Float weights are float32, float16 or bfloat16 (what the architectures hold); integer and bool tensors
# are buffers (counters, masks). float64 is refused rather than cast: a cast would change the bits the
# file's sha256 names.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool)


def check_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of a supported dtype and every float finite: a NaN weight would surface deep inside
    weight matching or interpolation, far from its cause."""
    for k, t in tensors.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise UserError(f"{where}: tensor {k!r} is {str(t.dtype).removeprefix('torch.')}; model files hold "
                            "float32, float16 or bfloat16 weights (convert it, e.g. to float32, and save again)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: tensor {k!r} holds NaN or infinite values; the model is broken "
                            "(training diverged?)")


def check_layout(want: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], where: str,
                 against: str = "the architecture in its metadata") -> None:
    """`sd` has exactly `want`'s tensors, with its shapes and dtypes: one line naming the first few that do
    not, before any code loads or interpolates them."""
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shape = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    dtype = [k for k in want if k in sd and k not in shape and sd[k].dtype != want[k].dtype]
    parts = [f"{what} {', '.join(repr(k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for what, keys in (("missing", missing), ("unexpected", extra), ("other shape for", shape),
                                ("other dtype for", dtype)) if keys]
    if parts:
        raise UserError(f"{where} does not fit {against} ({'; '.join(parts)})")


def check_fits(want: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], where: str, against: str) -> None:
    """`sd` can be loaded where `want` (a state dict) is: the same names and shapes, dtypes equal up to
    floating-point precision (a bfloat16 model takes float32 weights), and finite floating-point weights."""
    def layout(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.empty(v.shape, dtype=torch.float32 if v.is_floating_point() else v.dtype, device="meta")
                for k, v in d.items()}
    check_layout(layout(want), layout(sd), where, against)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{where} has NaN or infinite weights ({', '.join(repr(k) for k in bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''})")


def parse_meta(text: str, where: str) -> dict[str, Any]:
    """Limits, JSON, version, schema, digest - in that order, before anything else reads the metadata."""
    check_json_limits(text, f"{where}: its stardomain metadata")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"{where}: its stardomain metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its stardomain metadata is not a JSON object")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UserError(f"{where}: format_version {version} is newer than this stardomain "
                        f"reads ({FORMAT_VERSION}); upgrade stardomain")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise UserError(f"{where}: metadata lacks {', '.join(missing)}")
    try:
        FileMeta.model_validate(meta)
    except ValidationError as e:
        raise UserError(f"{where}: its stardomain metadata is malformed: {format_validation_error(e)}") from None
    if version >= 2:
        if meta.get("digest") is None:
            raise UserError(f"{where}: format {version} metadata without its digest (file edited)")
        if meta_digest(meta) != meta["digest"]:
            raise UserError(f"{where}: its metadata does not match its digest (file edited or corrupted)")
    return meta


def build_from_meta(meta: dict[str, Any], source: str = "the model file",
                    weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Rebuild the architecture a model file describes (weights not loaded; `weights`, when given, are
    checked to fit it). A user factory it names is imported only when allowed (stardomain.safety)."""
    from .models import build_model

    check_meta_factories(meta, source)
    d = meta["data"]
    model = build_model(meta["model"], tuple(d["input_shape"]), int(d["num_classes"]),
                        tokens=d.get("input_dtype") == "int64")
    if weights is not None:
        check_layout(model.state_dict(), weights, source)
    return model


def data_from_meta(meta: dict[str, Any], source: str = "the model file"):
    """The data set a model file was trained on; a user data factory it names only when allowed."""
    from .data import get_dataset

    check_meta_factories(meta, source)
    return get_dataset(meta["data"]["config"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """-> (module with the file's weights, in eval mode, metadata)."""
    sd, meta = read_model_file(path)
    model = build_from_meta(meta, str(path), weights=sd)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval(), meta


def compatible(meta_a: dict, meta_b: dict) -> str | None:
    """Why two model files cannot be compared or interpolated, or None if they can."""
    from .models import resolved

    if resolved(meta_a["model"]) != resolved(meta_b["model"]):
        return f"different architectures ({_short(meta_a['model'])} vs {_short(meta_b['model'])})"
    da, db = meta_a["data"], meta_b["data"]
    if da.get("config") != db.get("config"):
        return f"trained on different data ({_short(da.get('config'))} vs {_short(db.get('config'))})"
    return None


def _short(obj: Any, limit: int = 200) -> str:
    s = str(obj)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def read_pair(path_a: str | Path, path_b: str | Path, verb: str = "compare"):
    """Two model files that can be compared or interpolated -> (sd_a, meta_a, sd_b, meta_b); a UserError
    saying why not otherwise."""
    sd_a, meta_a = read_model_file(path_a)
    sd_b, meta_b = read_model_file(path_b)
    why = compatible(meta_a, meta_b)
    if why:
        raise UserError(f"cannot {verb} {path_a} and {path_b}: {why}")
    check_layout(sd_a, sd_b, f"cannot {verb} {path_a} and {path_b}: {path_b}",
                 against=f"{path_a} (the same tensors, shapes and dtypes)")
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
    fix = "delete it (or pass --force) to start afresh"
    try:
        tensors, meta = _read_safetensors(Path(path))
    except UserError as e:
        raise UserError(f"{e}; it is the resume state of an interrupted run: {fix}") from None
    if "state" not in meta:
        raise UserError(f"{path}: not a stardomain training state; {fix}")
    check_json_limits(meta["state"], f"{path}: its state structure", max_bytes=64 * 2**20)
    try:
        return _unflatten(json.loads(meta["state"]), tensors)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: a corrupt training state; {fix}") from None


# ---- output policy: nothing is overwritten by surprise ----

# What each output option writes, and how to recognise a file an earlier run of the same command wrote.
_JSON_KEYS = {"barrier.json": {"t", "train", "test", "barrier", "files"},
              "align.json": {"method", "reference_sha256", "source_sha256", "out_sha256"}}
_PNG_SOFTWARE = {"barrier.png": "stardomain barrier", "bma.png": "stardomain bma"}
_MD_HEAD = {"bma.md": "## Bayesian model averaging"}
MODEL_KINDS = ("train", "star", "align", "import")


def _header(path: str | Path) -> dict | None:
    """The safetensors JSON header of a regular file (a FIFO is not waited on), None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    size = os.fstat(fd)
    if not stat.S_ISREG(size.st_mode):  # a folder, a FIFO, a device
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= 100_000_000 or size.st_size < 8 + n:
                return None
            header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError, RecursionError):
            return None
    return header if isinstance(header, dict) else None


def read_model_meta(path: str | Path) -> dict | None:
    """The stardomain metadata of a model file from its header alone (no weights read, nothing verified):
    cheap enough to ask of any path. None when it is not a stardomain model file."""
    try:
        meta = json.loads((_header(path) or {})["__metadata__"][META_KEY])
        return meta if isinstance(meta, dict) else None
    except (KeyError, TypeError, ValueError, RecursionError):
        return None


def model_kind(meta: dict) -> str:
    """Which command made a model file: align (has an alignment record), star, merged, or train."""
    if "alignment" in meta:
        return "align"
    if "imported" in meta:
        return "import"
    if meta.get("role") == "star" and "sources" in meta:
        return "star"
    return "merged" if "merge" in meta else "train"


def model_job(kind: str, meta: dict) -> dict:
    """What identifies the job that wrote a model file: re-running that job may replace the file (a refresh
    or a resume, not a surprise). train: role, seed, config; star: + the sources' sha256; align: A's and B's
    sha256. Normalised through JSON so a live config and one read back from a file compare equal."""
    if kind == "align":
        a = meta.get("alignment") or {}
        job = {"reference_sha256": a.get("reference_sha256"), "source_sha256": a.get("source_sha256")}
    elif kind == "import":
        imp = meta.get("imported") or {}
        job = {"factory": imp.get("factory"), "kwargs": imp.get("kwargs")}
    else:
        cfg = meta.get("config")
        job = {"role": meta.get("role"), "seed": meta.get("seed"),
               "config": result_identity(cfg) if isinstance(cfg, dict) else cfg}
        if kind == "star":
            job["sources"] = [s.get("sha256") for s in meta.get("sources") or []]
    return json.loads(json.dumps(job, sort_keys=True, default=str))


def _png_software(path: Path) -> str | None:
    """The PNG's tEXt "Software" entry (stardomain's plots name themselves there), read from the chunks
    before the image data; None when it is not a PNG or has none."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    i = 8
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + n]
        if kind == b"IDAT":
            return None
        if kind == b"tEXt" and body.startswith(b"Software\0"):
            return body[9:].decode("latin-1")
        i += 12 + n
    return None


def sidecars(out: str | Path) -> dict[str, Path]:
    """The files written beside a trained model file: the per-epoch history and the resume state."""
    out = Path(out)
    return {"history.csv": out.with_name(out.name + ".csv"), "state": out.with_name(out.name + ".state")}


HISTORY_HEAD = "epoch,loss,acc\n"  # the first line of every history CSV (train.write_history_csv)


def is_training_state(path: str | Path) -> bool:
    """A readable training state `save_state` wrote (the header alone is read)."""
    md = (_header(path) or {}).get("__metadata__")
    return isinstance(md, dict) and "state" in md


def prepare_training_outputs(out: str | Path, kind: str, job: dict, *, force: bool = False,
                             inputs: Sequence[str | Path | None] = ()) -> None:
    """`train`/`star`, before any work: the model file and its sidecars (OUT.csv, OUT.state) under the one
    policy (each is new, an earlier output of this job, or replaced only with `force`). With `force`, a
    state file that is no training state (truncated, foreign) is removed: it would block the run."""
    check_output(out, kind, job, force=force, inputs=inputs)
    for side_kind, side in sidecars(out).items():
        check_output(side, side_kind, force=force, inputs=inputs, beside=str(out))
    state = sidecars(out)["state"]
    if force and (state.exists() or state.is_symlink()) and not is_training_state(state):
        state.unlink()


def _why_not_replaceable(path: Path, kind: str, job: dict | None) -> str | None:
    """None when `path` is an earlier output of this kind (and, for model files, of this job)."""
    if kind == "history.csv":
        with open(path, "rb") as f:
            ok = f.read(len(HISTORY_HEAD)) == HISTORY_HEAD.encode()
        return None if ok else "is not a training history a model file's run wrote"
    if kind == "state":
        return None if is_training_state(path) else ("is not a training state stardomain wrote (truncated or "
                                                    "foreign: delete it to start afresh)")
    if kind in MODEL_KINDS:
        meta = read_model_meta(path)
        if meta is None:
            return "is not a stardomain model file"
        if model_kind(meta) != kind:
            return f"is a stardomain {model_kind(meta)} model file, not a `stardomain {kind}` output"
        if job is not None:
            have, want = model_job(kind, meta), model_job(kind, job)
            diff = [k for k in want if have.get(k) != want[k]]
            if diff:
                return f"was written by `stardomain {kind}` for another job (different {', '.join(diff)})"
        return None
    what = f"`stardomain {kind.split('.')[0]}` output ({kind.split('.')[1]})"
    if path.stat().st_size > 200_000_000:
        return f"is not a {what}"
    if kind in _PNG_SOFTWARE:
        ok = _png_software(path) == _PNG_SOFTWARE[kind]
    elif kind in _MD_HEAD:
        ok = path.read_bytes().startswith(_MD_HEAD[kind].encode())
    else:
        try:
            obj = json.loads(path.read_bytes())
        except ValueError:
            obj = None
        if kind == "bma.json":
            ok = isinstance(obj, dict) and isinstance(obj.get("_info"), dict) and "files" in obj["_info"]
        else:
            ok = isinstance(obj, dict) and _JSON_KEYS[kind] <= set(obj)
    return None if ok else f"is not a {what}"


def check_output(path: str | Path | None, kind: str, job: dict | None = None, *, force: bool = False,
                 inputs: Sequence[str | Path | None] = (), option: str = "--out", beside: str | None = None) -> None:
    """Refuse, before any work, to write `path` where that would destroy something the user did not mean
    to replace: a folder or a FIFO/device (always), one of the command's own inputs, or an existing file
    that is not an earlier output of the same kind (`kind`: train/star/align model files, barrier.json,
    bma.json, align.json, barrier.png, bma.png, bma.md, history.csv, state) and, for model files, of the
    same job (`job`: the metadata fields `model_job` reads); and a place that cannot be written. `force`
    allows all but the folder, the FIFO and the unwritable. `beside`: `path` is a file written beside the
    output that `option` names (OUT.csv beside --out OUT)."""
    if path is None:
        return
    p = Path(path)
    what = f"{p} (written beside {option} {beside})" if beside else f"{option} {p}"
    if p.is_dir():
        raise UserError(f"{what} is a folder; give the path of a file to write")
    if p.exists() and not p.is_file():
        raise UserError(f"{what} is not a regular file (a FIFO, socket or device); give a file path")
    check_writable(p, option)
    if force or not p.exists():
        return
    for q in inputs:
        if q is not None and Path(q).exists() and os.path.samefile(p, q):
            raise UserError(f"{what} is also an input of this command and would be overwritten; "
                            f"choose another {option} (or pass --force)")
    why = _why_not_replaceable(p, kind, job)
    if why:
        raise UserError(f"{what} already exists and {why}; choose another {option} or pass --force to replace it")


def check_writable(path: str | Path, option: str = "--out") -> None:
    """Before any work: a file can be created where `path` will be written (in its folder, or the nearest
    folder above it that exists: the write makes the rest). Probed with a real temporary file, since
    permission bits say nothing of root, read-only mounts or /proc."""
    p = Path(path).absolute()
    folder = p.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {option} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".stardomain-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {option} {path}: {folder}: {(e.strerror or str(e)).lower()}") from None


def check_distinct(**outputs: str | Path | None) -> None:
    """Two output options naming one file would overwrite each other: refused (e.g. --json-out x --plot x)."""
    seen: dict[str, str] = {}
    for name, p in outputs.items():
        if p is None:
            continue
        key = os.path.abspath(p)
        if key in seen:
            raise UserError(f"--{seen[key]} and --{name} name the same file {p}; give each its own path")
        seen[key] = name
