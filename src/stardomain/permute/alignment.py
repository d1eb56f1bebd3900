"""Aligning one model to another: a matching method over the spec, then the check (checks.py) that the
permuted model computes the same function. A method is one function in METHODS."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..errors import UserError
from .activations import activation_matching
from .cache import spec_for
from .checks import check_equivalence
from .matching import INITS, weight_matching
from .permutations import apply_permutation, distance
from .spec import PermutationSpec
from .variants import restrict


class CoverageWarning(UserWarning):
    """Aligning this model cannot do what was asked: its graph could not be captured, or nothing in it
    can be permuted (the model is returned unchanged)."""


@dataclass(frozen=True)
class MatchingOptions:
    """A matching method's own settings: weight matching's start (`init`, see weight_matching;
    "identity" is the paper's algorithm) and most coordinate-descent passes."""
    init: str = "informed"
    max_iter: int = 100


def _by_weights(spec: PermutationSpec, model: nn.Module, sd_a: dict, sd_b: dict, data_x: Any, seed: int,
                options: MatchingOptions) -> tuple[dict, dict]:
    if options.init not in INITS:
        raise UserError(f"unknown weight-matching start {options.init!r}; choose {', '.join(INITS)}")
    return weight_matching(spec, sd_a, sd_b, seed=seed, max_iter=options.max_iter, init=options.init)


def _by_activations(spec: PermutationSpec, model: nn.Module, sd_a: dict, sd_b: dict, data_x: Any, seed: int,
                    options: MatchingOptions) -> tuple[dict, dict]:
    if data_x is None:
        raise UserError("activation matching needs data (data_x): a batch of inputs")
    return activation_matching(spec, model, sd_a, sd_b, data_x)


# name -> fn(spec, model, sd_a, sd_b, data_x, seed, options) -> (perm to apply to B, info)
METHODS: dict[str, Callable[..., tuple[dict, dict]]] = {"weight": _by_weights, "activation": _by_activations}


def align(model: nn.Module, sd_a: dict, sd_b: dict, *, example_input: Any, method: str = "weight",
          data_x: Any = None, seed: int = 0, check: bool = True, variant: str = "full",
          options: MatchingOptions = MatchingOptions()) -> tuple[dict, dict]:
    """-> (pi(sd_b) best matching sd_a, info). `model` only provides the architecture.

    method "weight": weight matching; "activation": correlation of activations on `data_x` (METHODS);
    `options` (MatchingOptions): the method's own settings (weight matching's start and passes).
    With check=True (the default) pi(B) is verified to compute B's function, else EquivalenceError.
    info["distance_before"/"distance_after"] are L2 distances to A over parameters only
    (info["distance_over"] == "parameters"): the quantity weight matching minimises, so aligning
    never increases it. Buffers (BatchNorm running statistics) are permuted but not measured: they
    summarise data, and interpolation paths recompute them.
    example_input (and data_x): a tensor, a tuple of positional arguments or a dict of keyword
    arguments. If the model's graph cannot be captured or nothing in it is permutable, a
    CoverageWarning says so and info["warnings"] holds the same lines (B is returned unchanged).
    variant: align only one role's groups ("heads", "mlp", "stream"; permute.variants), the rest left
    at the identity; "none" returns B unchanged; info["permutable_fraction"] is the share it aligns.
    """
    if method not in METHODS:
        raise UserError(f"unknown alignment method {method!r}; choose {' or '.join(METHODS)}")
    t0 = time.perf_counter()
    spec = spec_for(model, example_input)
    problems = spec.problems()  # of the whole model: a variant with no groups of its role is no problem
    for problem in problems:
        warnings.warn(problem, CoverageWarning, stacklevel=2)
    spec = restrict(spec, variant)
    perm, info = METHODS[method](spec, model, sd_a, sd_b, data_x, seed, options)
    sd_p = apply_permutation(spec, sd_b, perm)
    seconds = time.perf_counter() - t0
    err = check_equivalence(model, sd_b, sd_p, example_input, spec=spec, perm=perm) if check else None
    info = {"method": method, "variant": variant, **info,
            "distance_before": distance(sd_a, sd_b, spec.parameters),
            "distance_after": distance(sd_a, sd_p, spec.parameters), "distance_over": "parameters",
            "equivalence_error": err, "seconds": seconds, "permutable_fraction": spec.permutable_fraction(),
            "capture": spec.capture, "capture_error": spec.capture_error, "warnings": problems,
            "perm": {k: v.tolist() for k, v in perm.items()}}
    return sd_p, info
