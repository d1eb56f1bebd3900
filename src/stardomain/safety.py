"""What stardomain trusts: code named inside a model file is never imported unless the user allows it.

A model file's metadata may name a user factory ("pkg.mod:make") for its model or data. Opening a file
must not run code its author chose, so such a factory is imported only when the user allows it for this
call: `--allow-factory pkg.mod:make` (the CLI), `STARDOMAIN_ALLOW_FACTORIES=pkg.mod:make,...` (the
environment) or `allowed(...)` (the Python API). Factories written in a config the user passes are the
user's own and need no allowance. Registered names (mlp, cnn, ..., mnist, digits, ...) never do.

Also here: size and nesting limits for JSON read from files, checked without recursion before parsing.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import stat
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import UserError

ENV_ALLOW = "STARDOMAIN_ALLOW_FACTORIES"
_ALLOWED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("stardomain_allowed", default=frozenset())


def allowed_factories() -> frozenset[str]:
    """The factories allowed now: those of `allowed(...)` / `--allow-factory` plus the environment's."""
    env = {s.strip() for s in os.environ.get(ENV_ALLOW, "").split(",") if s.strip()}
    return _ALLOWED.get() | env


def allow(specs: Iterable[str]) -> None:
    """Allow `specs` for the rest of the current context (the CLI runs each command in a fresh one)."""
    _ALLOWED.set(_ALLOWED.get() | {s.strip() for s in specs if s and s.strip()})


@contextlib.contextmanager
def allowed(specs: Iterable[str]) -> Iterator[None]:
    """`with allowed(["pkg.mod:make"]): load_model(path)` - the allowance ends with the block."""
    token = _ALLOWED.set(_ALLOWED.get() | {s.strip() for s in specs if s and s.strip()})
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def config_factories(cfg: Any) -> list[str]:
    """The user factories a (trusted) config names: model.factory and data.factory, where given."""
    if cfg is None:
        return []
    if not isinstance(cfg, dict):
        cfg = cfg.model_dump()
    out = []
    for section in ("model", "data"):
        f = (cfg.get(section) or {}).get("factory")
        if isinstance(f, str) and f:
            out.append(f)
    return out


def check_factory(spec: str, what: str, source: str) -> None:
    """Refuse (before importing anything) a factory named by a file unless the user allowed it."""
    if spec in allowed_factories():
        return
    shown = spec if len(spec) <= 120 else spec[:117] + "..."
    raise UserError(f"{source} names the {what} {shown!r}, and stardomain never imports code a file names "
                    f"unless you allow it: if you trust that code, pass --allow-factory '{shown}' or set "
                    f"{ENV_ALLOW}='{shown}'")


def check_meta_factories(meta: dict, source: str) -> None:
    """The gate every path that builds a model or data set from a file's metadata goes through."""
    f = (meta.get("model") or {}).get("factory")
    if f:
        check_factory(str(f), "model factory", source)
    f = ((meta.get("data") or {}).get("config") or {}).get("factory")
    if f:
        check_factory(str(f), "data factory", source)


def check_regular_file(path: str | Path, what: str = "") -> None:
    """A file to read exists and is a regular file: a folder, a FIFO (reading it would wait forever), a
    device or a link loop is one line."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        why = {errno.ENOENT: "no such file", errno.ELOOP: "a loop of symbolic links",
               errno.ENOTDIR: "no such file (a part of the path is not a folder)"}.get(e.errno)
        raise UserError(f"{what}{path}: {why or (e.strerror or str(e)).lower()}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what}{path}: no such file (it is a folder)")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what}{path}: not a regular file (a FIFO, socket or device)")


# ---- JSON from files: limits checked before json.loads ----

MAX_META_BYTES = 4 * 2**20  # a model file's stardomain metadata
MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(text: bytes | str) -> int:
    """Deepest nesting of [ and { outside strings, without recursion (a 100k-deep array is fine here)."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    bare = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = (np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}"))))
    return int(np.cumsum(steps).max()) if len(steps) else 0


def check_json_limits(text: bytes | str, what: str, max_bytes: int = MAX_META_BYTES, max_depth: int = MAX_DEPTH) -> None:
    if len(text) > max_bytes:
        raise UserError(f"{what} is {len(text):,} bytes, more than the {max_bytes:,} stardomain reads")
    depth = json_depth(text)
    if depth > max_depth:
        raise UserError(f"{what} is nested {depth} levels deep, more than the {max_depth} stardomain reads")
