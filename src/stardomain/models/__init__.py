"""Model registry: a name (or "pkg.mod:factory") plus kwargs -> an nn.Module.

Every factory takes `in_shape` (C, H, W) and `num_classes` first, then its own kwargs. A user factory
gets `in_shape`/`num_classes` only if its signature names them.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Callable

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..data import check_kwargs
from ..errors import UserError
from . import gpt as _gpt
from . import vit as _vit
from . import zoo

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": zoo.mlp,
    "cnn": zoo.cnn,
    "resnet": zoo.resnet,
    "vgg": zoo.vgg,
    "wrn": zoo.wrn,
    "densenet": zoo.densenet,
    "vit": _vit.vit,
    "gpt": _gpt.gpt,
    "bert": _gpt.bert,
}


# Registered models that read token ids (next-token data, in_shape (T,)); the others read images or float
# vectors, and gpt reads images too. A user factory is trusted to know its own inputs.
TOKEN_MODELS = {"gpt"}


def _check_inputs(name: str, in_shape: tuple[int, ...], tokens: bool) -> None:
    if tokens and name not in TOKEN_MODELS:
        raise UserError(f"model {name} reads images or feature vectors, but this data set holds token ids "
                        f"(next-token data); use model {' or '.join(sorted(TOKEN_MODELS))}, or your own model.factory")
    if not tokens and name in TOKEN_MODELS and len(in_shape) == 1:
        raise UserError(f"model {name} reads token ids (next-token data) or images, but this data set holds "
                        f"feature vectors of shape {tuple(in_shape)}")


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    MODELS[name] = factory


MAX_PARAMS_ENV = "STARDOMAIN_MAX_PARAMS"


def max_params() -> int:
    """The largest model (numbers in parameters and buffers) built without asking: 5e8 (2 GB in float32)."""
    try:
        return int(os.environ.get(MAX_PARAMS_ENV) or 5 * 10**8)
    except ValueError:
        raise UserError(f"{MAX_PARAMS_ENV} must be a whole number") from None


def _size_on_meta(fn: Callable[..., nn.Module], kwargs: dict) -> int:
    """Build on the meta device (no memory) and count: an absurd width is refused before allocation."""
    with torch.device("meta"):
        m = fn(**kwargs)
    return sum(t.numel() for t in (*m.parameters(), *m.buffers()))


def build_model(cfg: ModelConfig | dict, in_shape: tuple[int, ...], num_classes: int,
                tokens: bool = False) -> nn.Module:
    """Registered models check their inputs (`tokens`: the data are token ids), kwargs and size first; any
    failure to build is one UserError."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    if cfg.factory:
        from ..data import import_object

        fn = import_object(cfg.factory, "model factory")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        extra = {k: v for k, v in (("in_shape", tuple(in_shape)), ("num_classes", num_classes)) if k in params}
        where = f"model factory {cfg.factory}"
    else:
        if cfg.name not in MODELS:
            raise UserError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)} "
                            "or give model.factory: 'package.module:function'")
        _check_inputs(cfg.name, tuple(in_shape), tokens)
        fn, extra, where = MODELS[cfg.name], {"in_shape": tuple(in_shape), "num_classes": num_classes}, f"model {cfg.name}"
    check_kwargs(fn, cfg.kwargs, f"{where}: model.kwargs", reserved={"in_shape": "the data set",
                                                                       "num_classes": "the data set"})
    kwargs = {**extra, **cfg.kwargs}
    try:
        if not cfg.factory:
            n = _size_on_meta(fn, kwargs)
            if n > max_params():
                raise UserError(f"{where} with kwargs {_short(cfg.kwargs)} has {n:,} parameters, more than the "
                                f"{max_params():,} allowed (raise {MAX_PARAMS_ENV} if you mean it)")
        model = fn(**kwargs)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"{where}: bad kwargs {_short(cfg.kwargs)} ({_first_line(e)})") from e
    except ValueError as e:
        raise UserError(f"{where}: {_first_line(e)}") from e
    except (RuntimeError, MemoryError, OverflowError) as e:
        raise UserError(f"{where} with kwargs {_short(cfg.kwargs)} could not be built "
                        f"({type(e).__name__}: {_first_line(e)})") from e
    except Exception as e:
        if not cfg.factory:
            raise
        raise UserError(f"{where} raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"{where} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def resolved(model: dict) -> dict:
    """A model section with a registered architecture's defaults filled in, so `{width: 16, depth: 1}` and
    `{}` compare equal where those are the defaults. A user factory's section is returned as it is: its
    code is not imported to read its signature (stardomain.safety)."""
    fn = MODELS.get(model.get("name")) if not model.get("factory") else None
    if fn is None or not isinstance(model.get("kwargs"), dict):
        return model
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if k not in ("in_shape", "num_classes") and p.default is not inspect.Parameter.empty}
    return {**model, "kwargs": json.loads(json.dumps({**defaults, **model["kwargs"]}, default=str))}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:200]


def _short(kwargs: dict) -> str:
    s = repr(kwargs)
    return s if len(s) <= 120 else s[:117] + "..."
