"""Model inputs and outputs of any shape: an example input may be a tensor, a tuple of positional
arguments or a dict of keyword arguments (`input_ids`, `attention_mask`); an output may be any nest
of tensors, tuples, lists, dicts and dataclasses (Hugging Face's ModelOutput is a dict and a
dataclass). Every comparison and probe works on the flat list of output tensors."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


def as_call(example: Any) -> tuple[tuple, dict]:
    """An example input -> (args, kwargs) for model(*args, **kwargs)."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise TypeError(f"an example input must be a tensor, a tuple of arguments or a dict of keyword "
                    f"arguments, got {type(example).__name__}")


def call(model: torch.nn.Module, example: Any) -> Any:
    args, kwargs = as_call(example)
    return model(*args, **kwargs)


def forward_once(model: torch.nn.Module, example: Any) -> Any:
    """model(example) as an inspection that changes nothing: eval mode (the module's own mode restored), no
    gradients, the RNG untouched; the example's tensors moved to the model's device (floating ones to its
    floating dtype)."""
    p = next(model.parameters(), None)
    if p is not None:
        def to_model(v):
            if not torch.is_tensor(v):
                return v
            return v.to(p.device, p.dtype if v.is_floating_point() and p.is_floating_point() else v.dtype)
        example = {k: to_model(v) for k, v in example.items()} if isinstance(example, dict) else \
            tuple(map(to_model, example)) if isinstance(example, (tuple, list)) else to_model(example)
    was = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return call(model.eval(), example)
    finally:
        model.train(was)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and dataclasses, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in flat_tensors(getattr(out, f.name))]
    return []


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], example: Any) -> Any:
    """example with fn applied to every tensor (tensors, tuples, lists, dicts)."""
    if isinstance(example, torch.Tensor):
        return fn(example)
    if isinstance(example, dict):
        return {k: map_tensors(fn, v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(map_tensors(fn, v) for v in example)
    return example


def signature(example: Any) -> tuple:
    """A hashable description of an example input's structure, shapes and dtypes (for caching)."""
    if isinstance(example, torch.Tensor):
        return ("t", tuple(example.shape), str(example.dtype))
    if isinstance(example, dict):
        return ("d",) + tuple((k, signature(v)) for k, v in example.items())
    if isinstance(example, (tuple, list)):
        return ("l",) + tuple(signature(v) for v in example)
    return ("v", repr(example))
