"""Model registry: a name (or "pkg.mod:factory") plus kwargs -> an nn.Module.

Every factory takes `in_shape` (C, H, W) and `num_classes` first, then its own kwargs. A user factory
gets `in_shape`/`num_classes` only if its signature names them.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from ..config import ModelConfig
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


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    MODELS[name] = factory


def build_model(cfg: ModelConfig | dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    if cfg.factory:
        from ..data import import_object

        fn = import_object(cfg.factory, "model factory")
        params = inspect.signature(fn).parameters
        extra = {k: v for k, v in (("in_shape", tuple(in_shape)), ("num_classes", num_classes)) if k in params}
        where = f"model factory {cfg.factory}"
    else:
        if cfg.name not in MODELS:
            raise UserError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)} "
                            "or give model.factory: 'package.module:function'")
        fn, extra, where = MODELS[cfg.name], {"in_shape": tuple(in_shape), "num_classes": num_classes}, f"model {cfg.name}"
    try:
        return fn(**extra, **cfg.kwargs)
    except TypeError as e:
        raise UserError(f"{where}: bad kwargs {cfg.kwargs} ({e})") from None
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
