"""Model-file front ends for the CLI: align two files, describe a file's permutation spec."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from pydantic import BaseModel

from ..checkpoint import (ExampleInput, ExampleInputs, build_from_meta, data_from_meta, read_model_file, read_pair,
                          save_model)
from ..config import LEARNED_METHODS
from ..data import first_inputs
from ..errors import UserError
from ..safety import check_regular_file
from .alignment import CoverageWarning, MatchingOptions, align
from .cache import spec_for
from .capture import aliases_of
from .spec import PermutationSpec


def example_input(meta: dict) -> "torch.Tensor | dict":
    """Zeros of shape (2, *input_shape): enough to trace shapes (weights and values are irrelevant);
    token ids (`data.input_dtype` int64) are seeded random ids in [0, num_classes), so the equivalence
    check sees varied sequences; for an imported model with keyword inputs, two seeded samples of them
    (meta["example_input"])."""
    if meta.get("example_input"):
        return _example_from_spec(meta["example_input"], 2)
    shape = (2, *[int(s) for s in meta["data"]["input_shape"]])
    if meta["data"].get("input_dtype") == "int64":
        return torch.randint(int(meta["data"]["num_classes"]), shape, generator=torch.Generator().manual_seed(0))
    return torch.zeros(shape)


def data_batch(meta: dict, n: int = 512, source: str = "the model file") -> "torch.Tensor | dict":
    """The first n training inputs of the file's data set (for activation matching); for keyword
    inputs, n seeded samples of them."""
    if meta.get("example_input"):
        return _example_from_spec(meta["example_input"], min(n, 64), seed=1)

    x = first_inputs(data_from_meta(meta, source).train, n)
    return x if meta["data"].get("input_dtype") == "int64" else x.float()


def spec_file(path: str | Path) -> tuple[PermutationSpec, dict]:
    sd, meta = read_model_file(path)
    return spec_for(build_from_meta(meta, str(path), weights=sd), example_input(meta)), meta


def align_files(path_a: str | Path, path_b: str | Path, out: str | Path, *, method: str = "weight",
                seed: int = 0, max_iter: int = 100, init: str = "informed", strict: bool = False,
                variant: str = "full", learned=None) -> dict:
    """Write pi(B), aligned to A, to `out` (B's metadata plus `alignment` provenance). -> the record
    (distances to A are over parameters: "distance_over": "parameters"). rec["warnings"] says when the
    model could not be captured or nothing is permutable; strict: refuse (UserError) instead. variant:
    align only one role's groups (permute.variants). method "ste" or "sinkhorn" learns on A's data set's
    train split (settings `learned`, recorded under "settings")."""
    sd_a, meta_a, sd_b, meta_b = read_pair(path_a, path_b, "align")
    model = build_from_meta(meta_a, str(path_a), weights=sd_a)
    x = example_input(meta_a)
    if strict:
        problems = spec_for(model, x).problems()
        if problems:
            raise UserError(f"--strict: {problems[0]}")
    data_x = data_batch(meta_a, source=str(path_a)) if method == "activation" else None
    if method in LEARNED_METHODS:
        data_x = data_from_meta(meta_a, str(path_a)).train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)  # the record carries them; the CLI prints them
        sd_p, info = align(model, sd_a, sd_b, example_input=x, method=method, data_x=data_x, seed=seed,
                           check=True, variant=variant,
                           options=MatchingOptions(init=init, max_iter=max_iter, learned=learned))
    rec = {k: info[k] for k in ("method", "variant", "iterations", "converged", "groups", "distance_before",
                                "distance_after", "distance_over", "equivalence_error", "seconds",
                                "permutable_fraction", "capture", "capture_error", "warnings")}
    rec.update({"init": info.get("init"), "settings": info.get("settings"), "seed": seed, "reference": str(path_a),
                "reference_sha256": meta_a["sha256"], "source": str(path_b), "source_sha256": meta_b["sha256"]})
    meta = {k: v for k, v in meta_b.items() if k not in ("sha256", "digest")}
    meta["alignment"] = {**rec, "perm": info["perm"]}
    saved = save_model(out, sd_p, meta)
    rec["out"] = str(out)
    rec["out_sha256"] = saved["sha256"]
    return rec


# ---- third-party weights ----

def _example_from_spec(spec: dict, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"input_ids": {"shape": [T], "dtype": "int64", "high": V}, ...} -> n seeded samples per input
    (integers uniform in [0, high), floats standard normal)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, raw in spec.items():
        s = ExampleInput.model_validate(raw)  # the file's schema checked it; an API caller's dict too
        shape = (n, *s.shape)
        dtype = getattr(torch, s.dtype)  # one of EXAMPLE_DTYPES
        if dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            out[name] = torch.randint(s.low, s.high, shape, generator=g).to(dtype)
    return out


class _Examples(BaseModel):
    example: ExampleInputs


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A plain safetensors state dict, or a Hugging Face model folder's *.safetensors shards; pickled
    weights (.bin, .pt, .pth, .ckpt) are refused, never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pickled = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        for f in files:
            check_regular_file(f)  # a link loop or a FIFO named *.safetensors: one line
        if not files:
            if any(p.suffix in pickled for p in path.iterdir()):
                raise UserError(f"{path}: only pickled weights (.bin/.pt) here; stardomain never unpickles files "
                                "(save them with safetensors, e.g. save_pretrained(..., safe_serialization=True))")
            raise UserError(f"{path}: no *.safetensors file in this folder")
    elif path.exists() or path.is_symlink():
        check_regular_file(path)
        if path.suffix in pickled:
            raise UserError(f"{path}: pickled weights are refused (stardomain never unpickles files); convert them "
                            "with safetensors.torch.save_file")
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        head = f.read_bytes()[:2]
        if head[:1] == b"\x80" or head == b"PK":
            raise UserError(f"{f}: a pickle/torch.save file under a .safetensors name; refused")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: not a valid safetensors file ({e})") from None
        dup = set(part) & set(sd)
        if dup:
            raise UserError(f"{f}: tensor {sorted(dup)[0]!r} appears in two shards")
        sd.update(part)
    return sd, [str(f) for f in files]


def _hf_renamed(model: torch.nn.Module, sd: dict, where: str) -> dict | None:
    """sd under the model's own names, converted by transformers itself (its from_pretrained with a
    state dict: the key renames of its checkpoint conversion mapping, e.g. transformers 5 names ViT's
    layers apart from what save_pretrained writes). None: not a transformers model, or the keys
    already are the model's."""
    import sys

    if "transformers" not in sys.modules or not type(model).__module__.startswith("transformers."):
        return None
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    if not isinstance(model, PreTrainedModel) or set(sd) <= set(model.state_dict()):
        return None
    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        loaded, info = type(model).from_pretrained(None, config=model.config, state_dict=sd, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers refusing the weights: one line
        raise UserError(f"{where}: transformers could not map these weights onto {type(model).__name__} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(level)
    bad = sorted(str(k) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(key) or [])
    if bad:
        raise UserError(f"{where}: the weights do not fit {type(model).__name__} even after transformers' key "
                        f"renaming ({len(bad)} missing, unexpected or misshapen, e.g. {bad[0][:120]}); "
                        "check --model-factory and --kwargs")
    return {k: v.detach() for k, v in loaded.state_dict().items()}


def _fit(model: torch.nn.Module, sd: dict, where: str) -> dict:
    """The model's own state dict filled from sd: names must match (a transformers model's checkpoint
    names are first mapped by transformers itself: _hf_renamed); tied tensors missing from the file
    (an output head sharing the embedding) are filled from their partner; non-persistent buffers are
    the model's."""
    renamed = _hf_renamed(model, sd, where)
    if renamed is not None:
        sd = renamed
    own = model.state_dict()
    aliases = aliases_of(own)
    out, missing = {}, []
    for k, v in own.items():
        src = k if k in sd else next((a for a in aliases.get(k, []) if a in sd), None)
        if src is None:
            missing.append(k)
        elif tuple(sd[src].shape) != tuple(v.shape):
            raise UserError(f"{where}: {src} has shape {list(sd[src].shape)}, the model expects {list(v.shape)}")
        else:
            out[k] = sd[src].to(v.dtype).contiguous().clone()  # tied names: separate copies on disk
    extra = sorted(set(sd) - set(out) - {a for k in out for a in aliases.get(k, [])})
    if missing or extra:
        raise UserError(f"{where}: the weights do not fit the model (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}); check --model-factory and --kwargs")
    return out


def import_weights(weights: str | Path, factory: str, kwargs: dict, data: dict | str, out: str | Path, *,
                   example: dict | None = None) -> dict:
    """Wrap third-party weights as a stardomain model file (the architecture from `factory(**kwargs)`,
    the data set's description for metadata), so spec, align, barrier and bma read it. `example`:
    the model's keyword inputs when it does not take images ({"input_ids": {"shape": [16], "dtype":
    "int64", "high": vocab}}), stored in the metadata and used for capture and checks. -> metadata."""
    from ..config import DataConfig, ModelConfig, validate
    from ..data import data_meta, get_dataset
    from ..models import build_model

    weights = Path(weights)
    mcfg = validate(ModelConfig, {"factory": factory, "kwargs": kwargs}, "--model-factory/--kwargs")
    dcfg = validate(DataConfig, {"name": data} if isinstance(data, str) else data, "--data")
    if example is not None:
        example = validate(_Examples, {"example": example}, "--example").model_dump()["example"]
    sd, files = _read_weights(weights)
    bundle = get_dataset(dcfg)
    model = build_model(mcfg, bundle.input_shape, bundle.num_classes, tokens=bundle.sequence)
    fitted = _fit(model, sd, str(weights))
    model.load_state_dict(fitted)
    meta = {"model": mcfg.model_dump(),
            "data": data_meta(bundle, dcfg),
            "seed": None, "role": "imported",
            "imported": {"weights": files, "factory": factory, "kwargs": kwargs}}
    if example:
        meta["example_input"] = example
    x = example_input(meta)
    try:
        with torch.no_grad():
            model.eval()(**x) if isinstance(x, dict) else model.eval()(x)
    except Exception as e:  # noqa: BLE001 - a user's model refusing its inputs: say so in one line
        raise UserError(f"{factory}: the model does not run on its example input ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); give --example for models that "
                        "take keyword inputs") from None
    return save_model(out, fitted, meta)
